"""Kill and resume of sam_jax.train_sharded, through `experiments.main`.

Runs `experiments.main` in subprocesses (through tests/mock_main.py, which
enters `tfds.testing.mock_data`), stops them with SIGTERM and SIGKILL and
checks that the resumed run ends with bitwise the parameters of an
uninterrupted one.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import time

import jax
import mock_main
import numpy as np
import tensorflow_datasets as tfds

from experiments.configs import label_noise_cifar10
from sam_jax import train

ROOT = pathlib.Path(__file__).parents[1]


def _command(workdir):
  return mock_main.command(workdir)  # 12 steps, a checkpoint every 2.


def _env(delay):
  return dict(os.environ, MOCK_STEP_DELAY_S=str(delay), JAX_PLATFORMS="cpu")


_checkpoints = mock_main.checkpoint_steps


def _run_until(workdir, sig, past_step, delay=0.3, timeout=120):
  """Starts the run, sends `sig` once a checkpoint after `past_step` is
  written, waits for the process; returns its exit code."""
  proc = subprocess.Popen(
    _command(workdir),
    env=_env(delay),
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )
  deadline = time.monotonic() + timeout
  while not any(s > past_step for s in _checkpoints(workdir)):
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    assert time.monotonic() < deadline, "no checkpoint written"
    time.sleep(0.05)
  proc.send_signal(sig)
  proc.communicate(timeout=timeout)
  return proc.returncode


def test_kill_and_resume_is_bitwise_identical(tmp_path):
  """SIGTERM (checkpoint at the next step, exit) then SIGKILL (no warning)
  then a full rerun, against one uninterrupted run (in this process, the
  same program on the same data): same final parameters, bit for bit."""
  ref, run = tmp_path / "ref", tmp_path / "run"
  c = mock_main.set_fields(
    label_noise_cifar10.get_config("sam"), mock_main.TINY
  )
  with tfds.testing.mock_data(num_examples=64):  # As tests/mock_main.py.
    train.train_and_evaluate(c, str(ref))
  assert _checkpoints(ref)[-1] == 12

  assert _run_until(run, signal.SIGTERM, past_step=0) == 0
  summary = json.loads((run / "summary.json").read_text())
  assert summary["status"] == "preempted"
  first = _checkpoints(run)[-1]
  assert first < 12
  code = _run_until(run, signal.SIGKILL, past_step=first)
  assert code == -signal.SIGKILL
  assert _checkpoints(run)[-1] < 12, "killed too late to test a resume"
  done = subprocess.run(
    _command(run), env=_env(0), cwd=ROOT, capture_output=True, timeout=300
  )
  assert done.returncode == 0, done.stderr.decode()[-3000:]
  summary = json.loads((run / "summary.json").read_text())
  assert summary["status"] == "ok"

  a, b = mock_main.final_params(ref), mock_main.final_params(run)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert u.dtype == v.dtype and np.array_equal(u, v)
  # The metrics of the resumed run are those of the uninterrupted one.
  rec = lambda w: [json.loads(x) for x in open(w / "metrics.jsonl")]
  acc = lambda rs: [(r["epoch"], r["test_accuracy"]) for r in rs]
  assert acc(rec(ref)) == acc(rec(run))
  assert (run / "best").exists()


def test_damage_after_a_finished_run_redoes_the_last_evaluation(tmp_path):
  """A finished mock-CIFAR run, damaged three times: the newest
  checkpoint's item folder deleted; the last metrics line cut (its
  checkpoint kept); a byte of the newest checkpoint flipped (values finite).
  Each rerun moves the newest checkpoint aside (kept under damaged/),
  resumes from the one before and ends with bitwise the parameters and
  the metrics of the undamaged run."""
  ref, run = tmp_path / "ref", tmp_path / "run"
  c = mock_main.set_fields(
    label_noise_cifar10.get_config("sam"), mock_main.TINY
  )
  rec = lambda w: [json.loads(x) for x in open(w / "metrics.jsonl")]
  acc = lambda rs: [(r["step"], r["test_accuracy"]) for r in rs]

  def cut_last_line(workdir):
    path = workdir / "metrics.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])

  def flip_a_byte(workdir):
    # Low in the largest data file: the values stay finite (the checksum
    # is what tells).
    item = workdir / "checkpoints" / "12" / "tree"
    path = max(
      (p for p in item.rglob("*") if p.is_file() and p.parent.name == "d"),
      key=lambda p: p.stat().st_size,
    )
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

  damages = [
    lambda w: shutil.rmtree(w / "checkpoints" / "12" / "tree"),
    cut_last_line,
    flip_a_byte,
  ]
  with tfds.testing.mock_data(num_examples=64):
    train.train_and_evaluate(c, str(ref))
    train.train_and_evaluate(c, str(run))
    for damage in damages:
      damage(run)
      assert train.train_and_evaluate(c, str(run))["status"] == "ok"
      a, b = mock_main.final_params(ref), mock_main.final_params(run)
      for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert u.dtype == v.dtype and np.array_equal(u, v)
      assert acc(rec(ref)) == acc(rec(run))
  kept = sorted(p.name for p in (run / "damaged").iterdir())
  assert kept == ["checkpoints-12", "checkpoints-12.2", "checkpoints-12.3"]
