"""Weight noise vs trace penalties on MNIST-1D (PAPERS.md B4; issue 7).

Test accuracy vs sigma^2 for `weight-noise` (L(w + delta), delta ~
N(0, sigma^2 I)), `trace-h` (L + sigma^2/2 Tr H, Hutchinson, `num_probes`)
and `trace-gn` (L + sigma^2/2 Tr GN, JVP estimator); curvature logging every
`curvature.every_epochs` records Tr H, Tr GN and Tr NME = Tr H - Tr GN over
training on a fixed set of training batches. Clean labels, the MLP, 2 seeds.

Labels are `<method>@<sigma2>`; `sweep()` returns `label -> overrides`; `BASE`
the shared overrides, `TINY` the shrunk setting of the tests. Runtime (measured
2026-11-23): 57 s for the 9 runs (curvature logging included) on 2 idle CPU
cores (305 s while sharing them with 3 other jobs, load ~7). Each run compiles
once and then trains in well under a second per epoch."""

import math

from experiments.configs import activation_penalty_mnist1d

GROUPS = {
  "weight-noise": {"method": "weight-noise"},
  "trace-h": {"method": "trace-h", "num_probes": 1},
  "trace-gn": {"method": "trace-gn", "num_probes": 1, "estimator": "jvp"},
}
SIGMA2 = (1e-3, 1e-2, 1e-1)
BASE = {
  **activation_penalty_mnist1d.BASE,
  "model.activation": "gelu",
  "curvature": dict(
    every_epochs=5,
    num_batches=2,
    batch_size=256,
    lanczos_iters=10,
    top_k=1,
    trace_probes=12,
    estimator="hutch++",
  ),
}
TINY = {
  **activation_penalty_mnist1d.TINY,
  "num_epochs": 2,
  "curvature": dict(
    BASE["curvature"],
    every_epochs=1,
    num_batches=1,
    batch_size=32,
    lanczos_iters=3,
    trace_probes=3,
  ),
}


def sweep(groups=tuple(GROUPS), sigma2=SIGMA2) -> dict[str, dict]:
  """`label -> overrides` for every method at every sigma^2."""
  return {
    f"{g}@{s2:g}": {**GROUPS[g], "sigma": math.sqrt(s2)}
    for g in groups
    for s2 in sigma2
  }
