"""Fault injection: a finished tiny MNIST-1D run, damaged in each way a kill,
a full disk, a bad copy or a flipped bit damages a workdir, then rerun.

Every damage that loses data the run can make again ends with the rerun
equal to the undamaged run (metrics.jsonl byte for byte, the final
checkpoint bitwise on CPU); a damaged checkpoint is moved to
`<workdir>/damaged/`, never deleted. A damage the run cannot repair (its
config.json) stops it with one error naming the file. The mock-CIFAR
trainer's cases are in tests/train_sharded_resume_test.py, the unit cases
of `restore_latest` in tests/run_io_test.py.
"""

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from train_test import tiny_config

from sam_jax import run_io, train

EPOCHS = 3


def _checkpoint(workdir, step=EPOCHS):
  return workdir / "checkpoints" / str(step)


def _data_files(workdir):
  item = _checkpoint(workdir) / "default"
  return [p for p in item.rglob("*") if p.is_file() and p.parent.name == "d"]


def _cut(path, fraction=0.5):
  data = path.read_bytes()
  path.write_bytes(data[: int(len(data) * fraction)])


def _flip(workdir):
  path = max(_data_files(workdir), key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01  # Low bits of a value: it stays finite.
  path.write_bytes(bytes(data))


def _cut_last_line(workdir, whole=False):
  path = workdir / "metrics.jsonl"
  lines = path.read_text().splitlines(keepends=True)
  last = "" if whole else lines[-1][: len(lines[-1]) // 2]
  path.write_text("".join(lines[:-1]) + last)


# name -> (damage, whether a checkpoint ends up under damaged/)
REPAIRED = {
  "checkpoint data files cut": (
    lambda w: [_cut(p) for p in _data_files(w)],
    True,
  ),
  "checkpoint data files emptied": (
    lambda w: [_cut(p, 0.0) for p in _data_files(w)],
    True,
  ),
  "checkpoint data files deleted": (
    lambda w: [p.unlink() for p in _data_files(w)],
    True,
  ),
  "checkpoint manifest cut": (
    lambda w: _cut(_checkpoint(w) / "default" / "manifest.ocdbt"),
    True,
  ),
  "checkpoint metadata deleted": (
    lambda w: (_checkpoint(w) / "default" / "_METADATA").unlink(),
    True,
  ),
  "checkpoint item folder deleted": (
    lambda w: shutil.rmtree(_checkpoint(w) / "default"),
    True,
  ),
  "checkpoint bytes flipped, values finite": (_flip, True),
  "checkpoint checksums cut": (
    lambda w: _cut(_checkpoint(w) / run_io.CHECKSUMS),
    True,
  ),
  "newest checkpoint deleted": (
    lambda w: shutil.rmtree(_checkpoint(w)),
    False,
  ),
  "metrics last line cut": (_cut_last_line, True),
  "metrics last line lost": (lambda w: _cut_last_line(w, whole=True), True),
  "metrics.jsonl deleted": (lambda w: (w / "metrics.jsonl").unlink(), True),
  "summary.json cut": (lambda w: _cut(w / "summary.json"), False),
  "lock file left with garbage": (
    lambda w: (w / ".lock").write_text("process 1 on elsewhere"),
    False,
  ),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished run (reference) and the config it ran."""
  config = tiny_config(num_epochs=EPOCHS)
  workdir = tmp_path_factory.mktemp("reference")
  train.train_and_evaluate(config, str(workdir))
  return config, workdir


def _final_params(workdir):
  mngr = ocp.CheckpointManager(workdir / "checkpoints")
  return jax.tree.leaves(mngr.restore(EPOCHS, args=ocp.args.StandardRestore()))


@pytest.mark.parametrize("name", list(REPAIRED))
def test_rerun_after_damage_ends_as_the_undamaged_run(name, finished, tmp_path):
  config, reference = finished
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  damage, moved_aside = REPAIRED[name]
  damage(workdir)
  summary = train.train_and_evaluate(config, str(workdir))
  assert summary["status"] == "ok"
  read = lambda w: (w / "metrics.jsonl").read_text()
  assert read(workdir) == read(reference)
  for a, b in zip(
    _final_params(reference), _final_params(workdir), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  kept = list((workdir / "damaged").glob("checkpoints-*"))
  assert bool(kept) == moved_aside, kept
  assert json.loads((workdir / "summary.json").read_text())["status"] == "ok"


def test_damaged_config_stops_the_rerun_naming_it(finished, tmp_path):
  config, reference = finished
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  _cut(workdir / "config.json")
  before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
  with pytest.raises(run_io.WorkdirError, match="config.json is damaged"):
    train.train_and_evaluate(config, str(workdir))
  after = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
  assert after == before  # Nothing deleted, nothing moved.
