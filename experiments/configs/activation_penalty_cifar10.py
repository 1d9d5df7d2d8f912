r"""CIFAR-10: gradient penalty (PSAM) vs SAM across activations.

The GPU-scale version of the activation-penalty study (Dauphin et al.,
NeurIPS 2024; PAPERS.md B2, B3): test accuracy against rho for SAM and the
gradient penalty `L + rho ||grad L||` with ReLU, GELU and beta-GELU, PSAM
with the NME-ablated GELU and with ReLU + synthetic NME, and the GN-only
update. Same data and optimiser as `label_noise_cifar10` but clean labels
and augmentation on; ResNet-18 with LayerNorm (the paper's architecture is
[open]; note that LayerNorm's own second derivative makes the NME of a ReLU
net nonzero, unlike the norm-free nets of B2).

One point of the curve (the config argument is a label of `METHODS`):

  python -m experiments.main \
    --config=experiments/configs/activation_penalty_cifar10.py:penalty-gelu \
    --workdir=runs/activation_penalty_cifar10/penalty-gelu/rho0.05 \
    --config.rho=0.05 --config.data.data_dir=/path/to/tensorflow_datasets

  The curve: rho in 0.01 0.02 0.05 0.1 0.2 0.5, seeds 0 1 (--config.seed).

Expected runtime: an ESTIMATE from FLOPs, not measured (no GPU was
available). An SGD epoch of ResNet-18 is ~145 TFLOP (XLA's cost analysis,
see `label_noise_cifar10`), ~15 s at an assumed effective 10 TFLOP/s:
200 epochs ~50 min. SAM costs ~2x (~1.6 h); the gradient penalty adds a
Hessian-vector product, ~3-4x SGD (~2.5-3.5 h per run).

The paper's results to compare against (PAPERS.md B3; it reports curves,
not numbers we have): PSAM-GELU tracks SAM over rho; PSAM-ReLU degrades
badly at large rho; SAM is insensitive to the activation; the NME-ablated
GELU behaves like ReLU; ReLU + synthetic NME recovers; the GN-only update
is worse at every rho.
"""

import ml_collections

from experiments.configs import label_noise_cifar10

# Each label: the method (`sam_jax.methods`) and the activation
# (`sam_jax.activations`).
METHODS = {
  "sam-relu": dict(method="sam", activation="relu"),
  "sam-gelu": dict(method="sam", activation="gelu"),
  "penalty-relu": dict(method="penalty", activation="relu"),
  "penalty-gelu": dict(method="penalty", activation="gelu"),
  "penalty-beta-gelu": dict(method="penalty", activation="beta-gelu"),
  "penalty-nme-ablated-gelu": dict(
    method="penalty", activation="nme-ablated-gelu"
  ),
  "penalty-relu-synthetic-nme": dict(
    method="penalty", activation="relu-synthetic-nme"
  ),
  "penalty-gn-gelu": dict(method="penalty-gn", activation="gelu"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """CIFAR-10, clean labels, the method and activation of label `arg`."""
  label = arg or "penalty-gelu"
  if label not in METHODS:
    raise ValueError(f"unknown method label {label!r}; valid: {list(METHODS)}")
  config = label_noise_cifar10.base_config()
  config.label = label
  config.method = METHODS[label]["method"]
  config.model.activation = METHODS[label]["activation"]
  config.model.beta = 4.0  # beta-gelu / synthetic NME; sweep it too.
  config.rho = 0.05
  config.data.noise_rate = 0.0
  config.data.augment = True
  config.data.eval_train_examples = 0
  return config
