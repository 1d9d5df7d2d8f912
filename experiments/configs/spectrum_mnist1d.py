"""Spectral densities of H, GN and NME during training (PAPERS.md B1/B2).

SGD vs SAM, ReLU vs GELU on MNIST-1D (clean labels, the MLP): each run
trains 2 vmapped seeds, checkpoints at mid-training and at the end; the SLQ
density (`sam_jax.spectral.spectral_density`, Gaussian probes) of H, GN and
NME of seed 0 is computed at initialisation, mid-training and the end on a
fixed set of `SLQ["num_batches"] x SLQ["batch_size"]` training examples.

`RUNS` maps a label to its overrides, `BASE` the shared ones, `TINY` the shrunk
setting of the tests. Runtime (measured 2026-11-23): 57 s for the 4 runs and 36
SLQ densities on 2 idle CPU cores (273 s while sharing them with 3 other jobs,
load ~7). Each run compiles once and then trains in well under a second per
epoch."""

from experiments.configs import activation_penalty_mnist1d

RUNS = {
  "sgd-relu": {"method": "sgd", "model.activation": "relu"},
  "sam-relu": {"method": "sam", "rho": 0.05, "model.activation": "relu"},
  "sgd-gelu": {"method": "sgd", "model.activation": "gelu"},
  "sam-gelu": {"method": "sam", "rho": 0.05, "model.activation": "gelu"},
}
# The shared setup of the second paper's MNIST-1D experiments (the runner
# sets checkpoint_every_epochs to mid-training itself).
BASE = activation_penalty_mnist1d.BASE
SLQ = dict(num_batches=2, batch_size=256, num_iters=40, num_probes=4)
TINY = {**activation_penalty_mnist1d.TINY, "num_epochs": 2}
TINY_SLQ = dict(num_batches=1, batch_size=32, num_iters=5, num_probes=2)
