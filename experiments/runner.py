"""Shared machinery of the sweep experiments (activation_penalty, weight_noise).

A sweep is a dict `label -> overrides` (dotted config fields) applied on top
of a base config (the label-noise config with its own overrides). Each label
trains through `experiments.label_noise.run_label` (vmapped seeds, a
non-finite loss recorded as `diverged`); `run_sweep` writes
`<workdir>/summary.json` with per-label results, the overrides and the
measured runtime. `sweep_table` and `plot_sweep` turn a summary into a
markdown table and a "metric vs swept value" plot (mean ± std over seeds).
"""

import json
import pathlib
import time
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import label_noise, report  # noqa: E402


def make_config(overrides: dict[str, Any]):
  """The label-noise config (method sgd) with dotted `overrides` applied; the
  `curvature` block is the one field they may add."""
  return label_noise.make_config("sgd", overrides, new_fields=("curvature",))


def run_sweep(
  workdir: str, runs: dict[str, dict], base: dict[str, Any]
) -> dict[str, Any]:
  """Trains every label of `runs` on `base`; writes and returns the summary."""
  root = pathlib.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  results = {}
  for label, own in runs.items():
    config = make_config({**base, **own, "label": label})
    results[label] = label_noise.run_label(config, root / label)
    results[label]["overrides"] = own
  summary = {
    "runs": results,
    "base": base,
    "runtime_s": time.perf_counter() - t0,
  }
  (root / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


def _pm(values: Sequence[float], scale: float = 100.0) -> str:
  v = scale * np.asarray(values, float)
  return f"{v.mean():.1f} ± {v.std():.1f}" if v.size else "-"


def sweep_table(
  summary: dict, group_of: dict[str, str], x_of: dict[str, float], x_name: str
) -> str:
  """Markdown table: rows = groups, columns = swept values, cells = best
  test accuracy in % (mean ± std over seeds); `diverged` marked."""
  xs = sorted(set(x_of.values()))
  groups = list(dict.fromkeys(group_of.values()))
  cell = {}
  for label, s in summary["runs"].items():
    text = _pm(s.get("best_test_accuracy", []))
    if s.get("status") != "ok":
      text += f" ({s.get('status')})"
    cell[group_of[label], x_of[label]] = text
  head = "| group | " + " | ".join(f"{x_name}={x:g}" for x in xs) + " |"
  lines = [head, "|" + "---|" * (len(xs) + 1)]
  for g in groups:
    row = " | ".join(cell.get((g, x), "") for x in xs)
    lines.append(f"| {g} | {row} |")
  return "\n".join(lines)


def plot_sweep(
  summary: dict,
  group_of: dict[str, str],
  x_of: dict[str, float],
  x_name: str,
  path,
  *,
  log_x: bool = True,
) -> None:
  """Best test accuracy vs the swept value, one line per group."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, g in enumerate(dict.fromkeys(group_of.values())):
    labels = sorted((x_of[k], k) for k in group_of if group_of[k] == g)
    xs, mean, std = [], [], []
    for x, label in labels:
      acc = np.asarray(summary["runs"][label].get("best_test_accuracy", []))
      if acc.size:
        xs.append(x)
        mean.append(acc.mean())
        std.append(acc.std())
    # Ten colours, then the same colours dashed with other markers.
    ax.errorbar(
      xs,
      mean,
      yerr=std,
      color=f"C{i % 10}",
      linestyle=("-", "--", ":")[i // 10 % 3],
      marker="osD"[i // 10 % 3],
      capsize=3,
      label=g,
    )
  if log_x:
    ax.set_xscale("log")
  ax.set_xlabel(x_name)
  ax.set_ylabel("best test accuracy")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_and_report(
  workdir: str,
  runs: dict[str, dict],
  base: dict[str, Any],
  x_fn,
  x_name: str,
  title: str,
) -> tuple[dict, str]:
  """`run_sweep`, then `table.md` and `test_accuracy.png` in `workdir`.

  Labels are `<group>@<x>`; `x_fn(overrides)` gives the swept value.
  """
  summary = run_sweep(workdir, runs, base)
  group_of = {label: label.split("@")[0] for label in runs}
  x_of = {label: float(x_fn(own)) for label, own in runs.items()}
  table = sweep_table(summary, group_of, x_of, x_name)
  root = pathlib.Path(workdir)
  text = (
    f"# {title}\n\nBest test accuracy (%), mean ± std over "
    f"{base.get('num_seeds')} seeds; runtime {summary['runtime_s']:.0f} s."
    f"\n\n{table}\n"
  )
  (root / "table.md").write_text(text)
  plot_sweep(summary, group_of, x_of, x_name, root / "test_accuracy.png")
  return summary, text


def parse_cli(
  argv: Sequence[str], base: dict, tiny: dict
) -> tuple[str, dict, bool]:
  """`--workdir=DIR [--tiny] [--set field=value ...]` -> (workdir, base,
  whether --tiny was given)."""
  workdir, overrides, is_tiny = None, [], False
  args = list(argv)
  while args:
    a = args.pop(0)
    if a.startswith("--workdir="):
      workdir = a.split("=", 1)[1]
    elif a == "--tiny":
      base, is_tiny = {**base, **tiny}, True
    elif a == "--set":
      overrides.append(args.pop(0))
    elif a.startswith("--set="):
      overrides.append(a.split("=", 1)[1])
    else:
      raise ValueError(f"unknown argument {a!r}")
  if workdir is None:
    raise ValueError("--workdir=DIR is required")
  return workdir, {**base, **label_noise.parse_overrides(overrides)}, is_tiny


def plot_curvature(runs: dict[str, list], keys: Sequence[str], path) -> None:
  """One panel per curvature field, one line per run (mean ± std)."""
  fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8))
  for ax, key in zip(np.atleast_1d(axes), keys, strict=True):
    for label, recs in runs.items():
      if not recs:
        continue
      e, m, sd = report.curves(recs, key)
      ax.plot(e, m, marker=".", label=label)
      ax.fill_between(e, m - sd, m + sd, alpha=0.2)
    ax.set_title(key)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
  np.atleast_1d(axes)[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
