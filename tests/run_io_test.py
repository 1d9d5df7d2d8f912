"""Tests of sam_jax.run_io: the workdir files shared by both trainers."""

import json
import os
import shutil
import signal
import subprocess
import sys

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
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
  with pytest.raises(
    run_io.WorkdirError, match=r"different config \(fields \['lr'\]"
  ):
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


# --- Faults: a second run, a kill mid-write, damaged files -------------------


def test_second_run_in_a_workdir_is_refused_naming_the_holder(tmp_path):
  with run_io.lock_workdir(tmp_path):
    with pytest.raises(run_io.WorkdirError, match=f"process {os.getpid()}"):
      with run_io.lock_workdir(tmp_path):
        pass
  # Another process holds it; once killed, its lock is taken over.
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import pathlib, sys, time; from sam_jax import run_io\n"
      f"with run_io.lock_workdir(pathlib.Path({str(tmp_path)!r})):\n"
      "  print('locked', flush=True); time.sleep(60)",
    ],
    stdout=subprocess.PIPE,
  )
  try:
    assert holder.stdout.readline().strip() == b"locked"
    with pytest.raises(run_io.WorkdirError, match=f"process {holder.pid}"):
      with run_io.lock_workdir(tmp_path):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with run_io.lock_workdir(tmp_path):
    assert f"process {os.getpid()}" in (tmp_path / ".lock").read_text()


def test_cut_last_line_is_dropped_other_damage_named(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  recs = [dict(epoch=e, x=e / 3) for e in range(1, 4)]
  run_io.write_records(path, recs, "w")
  with path.open("a") as f:
    f.write('{"epoch": 4, "x"')  # A kill mid-write.
  assert run_io.read_records(path) == recs
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and str(path) in err[0] and "cut last line 4" in err[0]
  assert run_io.read_records(path) == recs  # The file itself was mended.
  lines = path.read_text().splitlines()
  path.write_text("\n".join([lines[0], "{oops", lines[2]]) + "\n")
  with pytest.raises(run_io.WorkdirError, match=f"{path} line 2 is damaged"):
    run_io.read_records(path)


def test_damaged_config_json_is_named(tmp_path):
  run_io.check_workdir_config(tmp_path, _config())
  text = (tmp_path / "config.json").read_text()
  (tmp_path / "config.json").write_text(text[: len(text) // 2])
  match = f"{tmp_path / 'config.json'} is damaged"
  with pytest.raises(run_io.WorkdirError, match=match):
    run_io.check_workdir_config(tmp_path, _config())


def _data_files(checkpoint):
  item = checkpoint / "default"
  return [p for d in ("d", "ocdbt.process_0/d") for p in (item / d).iterdir()]


def _cut(paths, fraction):
  for path in paths:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


# What a full disk or a killed copy leaves in the newest checkpoint.
DAMAGE = {
  "data files cut in half": lambda d: _cut(_data_files(d), 0.5),
  "data files empty": lambda d: _cut(_data_files(d), 0.0),
  "data files deleted": lambda d: [p.unlink() for p in _data_files(d)],
  "manifest cut": lambda d: _cut([d / "default" / "manifest.ocdbt"], 0.5),
  "metadata deleted": lambda d: (d / "default" / "_METADATA").unlink(),
  "item folder deleted": lambda d: shutil.rmtree(d / "default"),
  "bytes flipped, values finite": lambda d: _flip(_data_files(d)),
  "checksums cut": lambda d: _cut([d / run_io.CHECKSUMS], 0.5),
}


def _flip(paths):
  # The largest data file holds the array: flip a byte of a float64 in the
  # middle, low in its mantissa, so that the value stays finite.
  path = max(paths, key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  data[len(data) // 2 // 8 * 8] ^= 0x01
  path.write_bytes(bytes(data))


def _tree(step):
  # Large enough not to be stored inline in the manifest.
  return {"w": np.arange(20000.0) * step, "n": np.full(3, step, np.int32)}


@pytest.mark.parametrize("damage", [*DAMAGE, "non-finite"])
def test_restore_latest_skips_a_damaged_checkpoint(damage, tmp_path, capsys):
  directory = tmp_path / "checkpoints"
  ckpt = run_io.checkpoint_manager(directory, max_to_keep=3)
  for step in (1, 2, 3):
    tree = _tree(step)
    if damage == "non-finite" and step == 3:
      tree["w"][5] = np.nan
    run_io.save_checkpoint(ckpt, step, ocp.args.StandardSave(tree))
  run_io.close_checkpoints(ckpt)
  if damage != "non-finite":
    DAMAGE[damage](directory / "3")
  capsys.readouterr()
  ckpt = run_io.checkpoint_manager(directory, max_to_keep=3)
  step, restored = run_io.restore_latest(ckpt, _tree(0))
  assert step == 2
  np.testing.assert_array_equal(restored["w"], _tree(2)["w"])
  assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
  assert (tmp_path / "damaged" / "checkpoints-3").is_dir()  # Kept.
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and str(directory / "3") in err[0], err
  ckpt.close()
