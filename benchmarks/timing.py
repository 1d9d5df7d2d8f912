"""Interleaved timing shared by the benchmarks.

A variant is a `run(n)` closure that runs `n` steps (or calls) and waits
for the device (`stepper`, `caller`). `time_interleaved` times each
variant's first call (compilation included), then `reps` rounds over all
variants, so that a change in the machine's load hits every variant alike;
the tables report medians over the rounds (`medians`) and their ratios.
"""

import datetime
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax

Run = Callable[[int], None]


def stepper(step: Callable, state: Any, *args: Any) -> Run:
  """`run(n)`: `state, out = step(state, *args)` n times, then waits for the
  last `out`; the state carries over from call to call."""

  def run(n: int) -> None:
    nonlocal state
    for _ in range(n):
      state, out = step(state, *args)
    jax.block_until_ready(out)

  return run


def caller(fn: Callable, *args: Any) -> Run:
  """`run(n)`: `fn(*args)` n times, waiting for each result."""

  def run(n: int) -> None:
    for _ in range(n):
      jax.block_until_ready(fn(*args))

  return run


def time_interleaved(
  runs: dict[str, Run], reps: int, steps: int = 1
) -> dict[str, dict[str, Any]]:
  """`{label: {"first_s": seconds, "times": [seconds per step] * reps}}`.

  `first_s` is one step of the first call (compilation included); then
  every round runs `steps` steps of each variant in turn.
  """
  out = {}
  for label, run in runs.items():
    t0 = time.perf_counter()
    run(1)
    out[label] = dict(first_s=time.perf_counter() - t0, times=[])
  for _ in range(reps):  # Round-robin: load changes hit every variant alike.
    for label, run in runs.items():
      t0 = time.perf_counter()
      run(steps)
      out[label]["times"].append((time.perf_counter() - t0) / steps)
  return out


def medians(results: dict[str, dict[str, Any]]) -> dict[str, float]:
  """The median seconds per step of each variant of `time_interleaved`."""
  return {label: statistics.median(r["times"]) for label, r in results.items()}


def machine_line(device_kind: bool = False) -> str:
  """`# <date>, <cpu>, <n> cores, jax <version> (<backend>[: <device>])`."""
  backend = jax.default_backend()
  if device_kind:
    backend += f": {jax.devices()[0].device_kind}"
  return (
    f"# {datetime.date.today()}, {platform.processor() or platform.machine()}"
    f", {os.cpu_count()} cores, jax {jax.__version__} ({backend})"
  )
