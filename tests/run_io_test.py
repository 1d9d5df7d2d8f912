"""Tests of sam_jax.run_io: the workdir files shared by both trainers."""

import json

import ml_collections
import pytest

from sam_jax import run_io


def _config(**fields):
  base = dict(method="sam", progress=False, checkpoint_every_steps=2, lr=0.1)
  return ml_collections.ConfigDict({**base, **fields})


def test_config_check_ignores_only_the_ignored_fields(tmp_path):
  run_io.check_workdir_config(tmp_path, _config())
  rerun = _config(progress=True, checkpoint_every_steps=5)
  run_io.check_workdir_config(tmp_path, rerun)
  written = json.loads((tmp_path / "config.json").read_text())
  assert written == json.loads(rerun.to_json())
  with pytest.raises(ValueError, match=r"different config \(fields \['lr'\]"):
    run_io.check_workdir_config(tmp_path, _config(lr=0.2))


def test_records_round_trip_and_drop_after(tmp_path):
  path = tmp_path / "m.jsonl"
  assert run_io.read_records(path) == []
  recs = [dict(epoch=e, step=10 * e, x=e / 3) for e in range(1, 5)]
  run_io.write_records(path, recs[:2], "w")
  run_io.write_records(path, recs[2:], "a")
  assert run_io.read_records(path) == recs
  run_io.drop_records_after(path, 30, "step")
  assert run_io.read_records(path) == recs[:3]
  run_io.drop_records_after(path, 1, "epoch")
  assert run_io.read_records(path) == recs[:1]


def test_progress_bar_counts_what_was_done():
  bar = run_io.progress_bar(_config(label="x", progress=True), range(3, 7), 3)
  assert list(bar) == [3, 4, 5, 6]
  assert (bar.n, bar.total, bar.desc) == (7, 7, "x")
  quiet = run_io.progress_bar(_config(), range(3, 7), 3)
  assert quiet.disable and list(quiet) == [3, 4, 5, 6]
