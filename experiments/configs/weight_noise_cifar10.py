r"""CIFAR-10: weight noise vs Hessian-trace and GN-trace penalties.

The GPU-scale version of the weight-noise study (Dauphin et al., NeurIPS
2024; PAPERS.md B4): test accuracy against sigma^2 for training on
`L(w + delta)`, `delta ~ N(0, sigma^2 I)` (weight noise), on
`L + (sigma^2 / 2) Tr H` (Hutchinson, `num_probes` probes) and on
`L + (sigma^2 / 2) Tr GN` (the unbiased JVP estimator). Same data and
optimiser as `label_noise_cifar10` but clean labels and augmentation on;
ResNet-18 with LayerNorm (the paper's architecture is [open]).

One point of the curve (the config argument is a label of `METHODS`):

  python -m experiments.main \
    --config=experiments/configs/weight_noise_cifar10.py:trace-gn \
    --workdir=runs/weight_noise_cifar10/trace-gn/sigma0.01 \
    --config.sigma=0.01 --config.data.data_dir=/path/to/tensorflow_datasets

  The curve: sigma in 0.003 0.01 0.03 0.1, seeds 0 1 (--config.seed).
  With several devices, --config.sam_per_device=True draws independent
  noise per device (`sam_jax.parallel.per_device`).

Expected runtime: an ESTIMATE from FLOPs, not measured (no GPU was
available). An SGD epoch of ResNet-18 is ~145 TFLOP (XLA's cost analysis,
see `label_noise_cifar10`), ~15 s at an assumed effective 10 TFLOP/s:
200 epochs ~50 min. Weight noise costs about one SGD step (~50 min); the
trace penalties add a Hessian- or GN-vector product per probe, ~3-4x SGD
with one probe (~2.5-3.5 h per run).

The paper's results to compare against (PAPERS.md B4; curves, not numbers
we have): the GN-trace penalty is consistently best; weight noise is close
to the Hessian-trace penalty; the Hessian-trace penalty is unstable and
drives Tr NME negative.
"""

import ml_collections

from experiments.configs import label_noise_cifar10

# Each label's method (`sam_jax.methods`) and its own fields.
METHODS = {
  "sgd": dict(method="sgd"),
  "weight-noise": dict(method="weight-noise"),
  "trace-h": dict(method="trace-h", num_probes=1),
  "trace-gn": dict(method="trace-gn", num_probes=1, estimator="jvp"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """CIFAR-10, clean labels, the method of label `arg`."""
  label = arg or "trace-gn"
  if label not in METHODS:
    raise ValueError(f"unknown method label {label!r}; valid: {list(METHODS)}")
  config = label_noise_cifar10.base_config()
  config.label = label
  config.update(METHODS[label])
  config.sigma = 0.01
  config.model.activation = "gelu"
  config.data.noise_rate = 0.0
  config.data.augment = True
  config.data.eval_train_examples = 0
  return config
