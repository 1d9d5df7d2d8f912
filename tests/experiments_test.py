"""End-to-end tests of experiments/: the CLI, the main job and tuning.

All run the real label-noise config shrunk on the command line (or with
`--set`): 160 training examples, a 2-channel CNN, 2 epochs, 2 seeds.
"""

import errno
import json
import math
import pathlib
import subprocess
import sys

import pytest
from absl import flags

from experiments import errors, label_noise, report
from experiments import main as main_lib
from experiments.configs import label_noise_mnist1d
from sam_jax import run_io

CONFIG = pathlib.Path(__file__).parents[1] / (
  "experiments/configs/label_noise_mnist1d.py"
)
TINY = {
  "data.num_samples": 200,
  "model.channels": (2,),
  "model.kernel_size": 3,
  "model.dense": (4,),
  "batch_size": 16,
  "num_epochs": 2,
  "num_seeds": 2,
  "progress": False,
}


@pytest.fixture
def cli(monkeypatch):
  def run(argv):
    # ml_collections reads --config.* overrides from sys.argv.
    monkeypatch.setattr(sys, "argv", ["main"] + argv)
    flags.FLAGS.unparse_flags()
    for name in list(flags.FLAGS):  # Defined by the previous parse.
      if name.startswith("config."):
        delattr(flags.FLAGS, name)
    flags.FLAGS(sys.argv)
    main_lib.main(["main"])

  yield run
  flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("label", list(label_noise_mnist1d.METHODS))
def test_cli_trains_each_method(label, tmp_path, cli, capsys):
  tiny = [f"--config.{k}={v}" for k, v in TINY.items()]
  cli([f"--config={CONFIG}:{label}", f"--workdir={tmp_path}", *tiny])
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["status"] == "ok"
  assert summary["method"] == label_noise_mnist1d.METHODS[label]["method"]
  for k, v in label_noise_mnist1d.METHODS[label].items():
    assert summary["config"][k] == v
  assert summary["config"]["model"]["channels"] == [2]
  assert len(summary["best_test_accuracy"]) == 2
  assert '"best_test_accuracy"' in capsys.readouterr().out
  recs = report.load_records(tmp_path)
  assert len(recs) == 2 * 2  # Epochs x seeds.
  for r in recs:
    for k in (
      "train_loss",
      "test_accuracy",
      "clean_accuracy",
      "noisy_accuracy",
    ):
      assert math.isfinite(r[k]), (k, r)


def test_cli_overrides_method_fields(tmp_path, cli, capsys):
  tiny = [f"--config.{k}={v}" for k, v in TINY.items()]
  argv = [f"--config={CONFIG}:sam", f"--workdir={tmp_path}", *tiny]
  cli(argv + ["--config.rho=0.07", "--config.group_size=4"])
  config = json.loads((tmp_path / "summary.json").read_text())["config"]
  assert config["rho"] == 0.07 and config["group_size"] == 4
  with pytest.raises(SystemExit) as e:
    cli(argv + ["--config.group_size=3"])  # 3 does not divide 16.
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: config.group_size"), err


ROOT = pathlib.Path(__file__).parents[1]
TINY_ARGS = [f"--config.{k}={v}" for k, v in TINY.items()]


@pytest.mark.parametrize(
  "args, says",
  [
    (["--config.rho=-1"], "error: config.rho must be a finite number >= 0"),
    (["--config.foo=1"], "error: --config.foo: the config has no field 'foo'"),
    (
      ["--config.data.nosie_rate=0.1"],
      "error: --config.data.nosie_rate: the config has no field 'nosie_rate'"
      "; nearest: data.noise_rate",
    ),
    (["--config.rho=abc"], "error: flag --config.rho=abc: could not convert"),
    (["WORKDIR_IS_A_FILE"], "error: --workdir {workdir} is a file"),
    (
      ["--config.learning_rate=1e30", "--config.num_seeds=1", *TINY_ARGS],
      "error: non-finite loss at step",
    ),
  ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, args, says):
  """What the user or the machine gets wrong: one line on stderr naming it,
  exit status 2, no traceback."""
  workdir = tmp_path / "run"
  if args == ["WORKDIR_IS_A_FILE"]:
    workdir.write_text("")
    args = []
  main = ["experiments.main", f"--config={CONFIG}:sam"]
  _assert_one_line_error(main, workdir, args, says.format(workdir=workdir))


def _assert_one_line_error(module_args, workdir, args, says):
  """`python -m <module_args> --workdir=... <args>` exits 2 with one line
  on stderr starting with `says`."""
  done = subprocess.run(
    [sys.executable, "-m", *module_args, f"--workdir={workdir}", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  err = [line for line in done.stderr.splitlines() if line.strip()]
  assert done.returncode == 2, done.stderr[-2000:]
  assert len(err) == 1 and err[0].startswith(says), err


def test_machine_errors_are_named_bugs_are_not():
  assert (
    errors.user_error(PermissionError(13, "Permission denied", "/runs/x/.lock"))
    == "Permission denied: /runs/x/.lock"
  )
  full = OSError(28, "No space left on device", "/runs/x/metrics.jsonl")
  assert errors.user_error(full).startswith("No space left on device")
  xla = ValueError("RESOURCE_EXHAUSTED: write failed\n  more")
  assert errors.user_error(xla).startswith("the disk is full")
  assert errors.user_error(KeyError("params")) is None  # A bug: traceback.
  assert errors.user_error(ValueError("shapes do not match")) is None


def test_main_job_writes_summary_table_and_plots(tmp_path):
  s = label_noise.run_all(str(tmp_path), ["sgd", "1-sam"], TINY)
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert list(on_disk["methods"]) == ["sgd", "1-sam"]
  assert on_disk["shared"]["num_epochs"] == 2
  for label, m in on_disk["methods"].items():
    # A 2-epoch tiny run may end near chance: that is flagged, not hidden.
    low = [sd for sd, f in zip(m["seeds"], m["final_test_accuracy"]) if f < 0.2]
    assert m["collapsed_seeds"] == low
    assert m["status"] == ("collapsed" if low else "ok"), label
    for col in ("best_test_accuracy", "best_epoch", "final_test_accuracy"):
      assert len(m[col]) == 2
      assert m["mean"][col] is not None and m["std"][col] is not None
  assert (
    on_disk["methods"]["1-sam"]["hparams"]
    == (label_noise_mnist1d.METHODS["1-sam"])
  )
  for png in ("test_accuracy.png", "clean_noisy.png", "norms.png"):
    assert (tmp_path / png).stat().st_size > 1000
  table = report.format_table(s["methods"])
  rho = label_noise_mnist1d.METHODS["1-sam"]["rho"]
  assert "1-sam" in table and f"rho={rho},m=1" in table
  # A rerun re-reads the finished runs: the same numbers.
  again = label_noise.run_all(
    str(tmp_path), ["sgd", "1-sam"], TINY, plots=False
  )
  timing = {"runtime_s": None, "epoch_s": None}
  drop = lambda ms: {k: {**m, **timing} for k, m in ms.items()}
  assert drop(again["methods"]) == drop(s["methods"])
  assert again["runtime_s"] < s["runtime_s"]


def test_main_job_records_divergence(tmp_path):
  config = label_noise.make_config("sgd", {**TINY, "learning_rate": 1e12})
  s = label_noise.run_label(config, tmp_path)
  assert s["status"] == "diverged"
  assert "non-finite" in s["error"] and "step" in s["error"]


def test_tune_uses_a_validation_split(tmp_path, monkeypatch):
  grid = {"sgd+reg": ({"lambda_a": 0.0}, {"lambda_a": 0.5})}
  monkeypatch.setattr(label_noise_mnist1d, "TUNE_GRID", grid)
  tuned = label_noise.tune(str(tmp_path), ["sgd+reg"], TINY)["sgd+reg"]
  scores = tuned["scores"]
  assert set(scores) == {"lambda_a=0.0", "lambda_a=0.5"}
  assert "lambda_a=" + str(tuned["choice"]["lambda_a"]) == max(
    scores, key=scores.get
  )
  for name in scores:
    recs = report.load_records(tmp_path / "sgd+reg" / name)
    assert recs and all("test_accuracy" not in r for r in recs)
    assert all(0 <= r["val_accuracy"] <= 1 for r in recs)
  assert json.loads((tmp_path / "tune.json").read_text())["tuned"]


def test_overrides_are_checked():
  assert label_noise.parse_overrides(["a.b=1", "c=x", "d=(1, 2)"]) == {
    "a.b": 1,
    "c": "x",
    "d": (1, 2),
  }
  with pytest.raises(ValueError, match="field=value"):
    label_noise.parse_overrides(["novalue"])
  with pytest.raises(ValueError, match="unknown config field"):
    label_noise.make_config("sgd", {"rhoo": 0.1})


def test_cli_refuses_a_busy_workdir_in_one_line(tmp_path, cli, capsys):
  (tmp_path / "w").mkdir()
  with run_io.lock_workdir(tmp_path / "w"):
    with pytest.raises(SystemExit) as exit_:
      cli([f"--config={CONFIG}:sgd", f"--workdir={tmp_path / 'w'}"])
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "is in use by process" in err[0], err


def test_main_job_user_errors_are_one_line_and_exit_2(tmp_path):
  for args, says in (
    (["--set", "rhoo=1"], "error: --set: unknown config field 'rhoo'"),
    (["--labels", "nsam"], "error: --labels: unknown label 'nsam'"),
  ):
    _assert_one_line_error(["experiments.label_noise"], tmp_path, args, says)


def test_full_disk_and_unwritable_workdir_are_one_line(
  tmp_path, cli, capsys, monkeypatch
):
  """The machine's errors through the real CLI path (injected: the tests
  run as root, which chmod does not stop, and cannot fill a disk): one
  line, exit 2; after space is freed the rerun ends bitwise as a run that
  never failed."""
  argv = [f"--config={CONFIG}:sgd", *TINY_ARGS]
  cli(argv + [f"--workdir={tmp_path / 'ref'}"])
  real_write = run_io.write_records

  def full_disk_in_epoch_2(path, records, mode):
    if mode == "a" and records[0].get("epoch") == 2:
      raise OSError(errno.ENOSPC, "No space left on device", str(path))
    real_write(path, records, mode)

  monkeypatch.setattr(run_io, "write_records", full_disk_in_epoch_2)
  run = tmp_path / "run"
  with pytest.raises(SystemExit) as e:
    cli(argv + [f"--workdir={run}"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"error: No space left on device: {run / 'metrics.jsonl'}"]
  monkeypatch.setattr(run_io, "write_records", real_write)  # Space freed.
  cli(argv + [f"--workdir={run}"])
  read = lambda w: (w / "metrics.jsonl").read_text()
  assert read(run) == read(tmp_path / "ref")

  def read_only(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied", args[0])

  monkeypatch.setattr(run_io.os, "open", read_only)
  with pytest.raises(SystemExit) as e:
    cli(argv + [f"--workdir={tmp_path / 'locked'}"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"error: Permission denied: {tmp_path / 'locked' / '.lock'}"]
