"""Gradient penalty vs activation on MNIST-1D (PAPERS.md B3, B5; issue 7).

SAM and the gradient penalty (PSAM, `penalty`, non-squared `rho ||g||`) over
a rho sweep with ReLU, GELU and beta-GELU (beta sweep); PSAM with the
NME-ablated GELU and with ReLU + synthetic NME; the GN-only update
(`penalty-gn`). Clean labels, the MLP of the label-noise config's MNIST-1D,
2 seeds (vmapped).

`GROUPS` maps a group name to its fixed overrides; every group runs at every
rho of `RHOS`; `sweep()` returns `label -> overrides` with labels
`<group>@<rho>`; `BASE` holds the shared overrides and `TINY` the shrunk
setting of the tests.

Runtime (measured 2026-11-23): 111 s for the 33 runs on 2 CPU cores shared
with two other jobs (before beta=3 and 30 were added: 96 s for 27 runs on
idle cores, 547 s at load ~7). Each run compiles once and then trains in
well under a second per epoch."""

GROUPS = {
  "sam-relu": {"method": "sam", "model.activation": "relu"},
  "sam-gelu": {"method": "sam", "model.activation": "gelu"},
  "psam-relu": {"method": "penalty", "model.activation": "relu"},
  "psam-gelu": {"method": "penalty", "model.activation": "gelu"},
  "psam-beta-gelu-1": {
    "method": "penalty",
    "model.activation": "beta-gelu",
    "model.beta": 1.0,
  },
  "psam-beta-gelu-3": {
    "method": "penalty",
    "model.activation": "beta-gelu",
    "model.beta": 3.0,
  },
  "psam-beta-gelu-10": {
    "method": "penalty",
    "model.activation": "beta-gelu",
    "model.beta": 10.0,
  },
  "psam-beta-gelu-30": {
    "method": "penalty",
    "model.activation": "beta-gelu",
    "model.beta": 30.0,
  },
  "psam-nme-ablated-gelu": {
    "method": "penalty",
    "model.activation": "nme-ablated-gelu",
  },
  "psam-relu-synthetic-nme": {
    "method": "penalty",
    "model.activation": "relu-synthetic-nme",
    "model.beta": 1.0,
  },
  "penalty-gn-gelu": {"method": "penalty-gn", "model.activation": "gelu"},
}
RHOS = (0.02, 0.2, 1.0)
BASE = {
  "data.noise_rate": 0.0,
  "data.num_samples": 4000,
  "model.name": "mlp",
  "model.dense": (64, 64),
  "num_epochs": 30,
  "num_seeds": 2,
  "checkpoint_every_epochs": 100,
  "progress": False,
}
TINY = {
  "data.num_samples": 200,
  "model.dense": (4,),
  "batch_size": 32,
  "num_epochs": 1,
}


def sweep(groups=tuple(GROUPS), rhos=RHOS) -> dict[str, dict]:
  """`label -> overrides` for every group at every rho."""
  return {
    f"{g}@{rho:g}": {**GROUPS[g], "rho": rho} for g in groups for rho in rhos
  }
