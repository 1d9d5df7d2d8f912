"""The methods and activations of issue 7 through the real MNIST-1D trainer.

Every method (`penalty`, `penalty-gn`, `weight-noise`, `trace-h`,
`trace-gn`) and every activation trains a tiny CNN for one epoch of a few
steps over 2 vmapped seeds, with the curvature logging on: the run ends
`ok` with finite losses, and curvature.jsonl holds finite records for the
initialisation and the end, per seed.
"""

import json
import math

import numpy as np
import pytest

from experiments.configs import label_noise_mnist1d
from sam_jax import train

CASES = [
  ("penalty", "gelu", dict(rho=0.05, squared=True)),
  ("penalty-gn", "relu", dict(rho=0.05)),
  ("weight-noise", "beta-gelu", dict(sigma=0.01)),
  ("trace-h", "nme-ablated-gelu", dict(sigma=0.01, num_probes=2)),
  ("trace-gn", "relu-synthetic-nme", dict(sigma=0.01)),
]


def tiny_config(method, act, hparams, curvature_every=0):
  config = label_noise_mnist1d.get_config("sgd")
  config.method = method
  for k, v in hparams.items():
    config[k] = v
  config.model.activation = act
  config.model.beta = 2.0
  config.model.channels = (2,)
  config.model.kernel_size = 3
  config.model.dense = (4,)
  config.data.num_samples = 120
  config.data.noise_rate = 0.0
  config.batch_size = 32
  config.num_epochs = 1
  config.num_seeds = 2
  config.progress = False
  config.curvature = dict(
    every_epochs=curvature_every,
    num_batches=2,
    batch_size=16,
    lanczos_iters=4,
    top_k=2,
    trace_probes=3,
    estimator="hutch++",
  )
  return config


@pytest.mark.parametrize("method, act, hparams", CASES)
def test_method_and_activation_train_with_curvature_log(
  method, act, hparams, tmp_path
):
  summary = train.train_and_evaluate(
    tiny_config(method, act, hparams, curvature_every=1), str(tmp_path)
  )
  assert summary["status"] == "ok" and summary["method"] == method
  assert summary["config"]["model"]["activation"] == act
  recs = [
    json.loads(line)
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
  ]
  assert all(math.isfinite(r["train_loss"]) for r in recs)
  curv = [
    json.loads(line)
    for line in (tmp_path / "curvature.jsonl").read_text().splitlines()
  ]
  assert sorted((r["epoch"], r["seed"]) for r in curv) == [
    (0, 0),
    (0, 1),
    (1, 0),
    (1, 1),
  ]
  for r in curv:
    values = r["h_top"] + r["gn_top"] + r["nme_top"]
    values += [r["nme_min"], r["trace_h"], r["trace_gn"], r["trace_nme"]]
    assert len(r["h_top"]) == 2 and all(math.isfinite(v) for v in values)
    assert r["gn_top"][0] >= 0 and r["seconds"] > 0


def test_curvature_log_off_by_default(tmp_path):
  config = tiny_config("penalty", "relu", dict(rho=0.05))
  del config["curvature"]
  train.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / "curvature.jsonl").read_text() == ""


def test_bad_curvature_config_raises(tmp_path):
  config = tiny_config("penalty", "relu", dict(rho=0.05), curvature_every=1)
  config.curvature.top_k = 9
  with pytest.raises(ValueError, match="curvature.top_k"):
    train.train_and_evaluate(config, str(tmp_path))


def test_activation_penalty_runner_tiny(tmp_path):
  from experiments import activation_penalty

  summary = activation_penalty.main([f"--workdir={tmp_path}", "--tiny"])
  assert set(summary["runs"]) == {
    f"{g}@{r:g}"
    for g in ("sam-gelu", "psam-relu", "psam-relu-synthetic-nme")
    for r in (0.02, 0.2)
  }
  for s in summary["runs"].values():
    assert len(s["best_test_accuracy"]) == 2
  table = (tmp_path / "table.md").read_text()
  assert "| psam-relu-synthetic-nme |" in table and "rho=0.2" in table
  assert (tmp_path / "test_accuracy.png").stat().st_size > 0


def test_weight_noise_runner_tiny(tmp_path):
  from experiments import weight_noise

  summary = weight_noise.main([f"--workdir={tmp_path}", "--tiny"])
  assert sorted(summary["runs"]) == [
    "trace-gn@0.1",
    "trace-h@0.1",
    "weight-noise@0.1",
  ]
  curv = [
    json.loads(line)
    for line in (tmp_path / "trace-h@0.1" / "curvature.jsonl")
    .read_text()
    .splitlines()
  ]
  assert {r["epoch"] for r in curv} == {0, 1, 2}
  assert all(math.isfinite(r["trace_nme"]) for r in curv)
  assert (tmp_path / "traces.png").stat().st_size > 0


def test_spectrum_runner_tiny(tmp_path):
  from experiments import spectrum

  summary = spectrum.main([f"--workdir={tmp_path}", "--tiny"])
  assert sorted(summary["spectra"]) == sorted(
    ["sgd-relu", "sam-relu", "sgd-gelu", "sam-gelu"]
  )
  for by_time in summary["spectra"].values():
    assert sorted(by_time) == ["end", "init", "mid"]
    for by_mat in by_time.values():
      gn = by_mat["GN"]
      assert gn["min_ritz"] > -1e-4  # GN is PSD (float32 round-off).
      for d in by_mat.values():
        dens = np.asarray(d["density"])
        assert np.all(np.isfinite(dens)) and np.all(dens >= 0)
        # The density integrates to ~1 over its grid.
        assert abs(np.trapezoid(dens, d["grid"]) - 1) < 0.05
  # SGD and SAM start from the same initialisation.
  assert (
    summary["spectra"]["sgd-relu"]["init"]
    == (summary["spectra"]["sam-relu"]["init"])
  )
  assert (tmp_path / "spectrum.png").stat().st_size > 0


def test_runner_config_rejects_unknown_fields_but_takes_curvature():
  from experiments import runner

  config = runner.make_config({"curvature": dict(every_epochs=1)})
  assert config.curvature.every_epochs == 1
  with pytest.raises(ValueError, match="num_epoch"):
    runner.make_config({"num_epoch": 3})
