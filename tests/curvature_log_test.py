"""Curvature logging against dense float64 references on a tiny model.

With `lanczos_iters = P` Lanczos (full reorthogonalisation) recovers every
eigenvalue, so the logged top Ritz values of H, GN and NME must equal the
top of `eigh` of the dense matrices of the loss on the whole evaluation set
(the mean over equal-size minibatches). The traces must equal the same
estimator applied to the dense matrices with the same probes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax import curvature, curvature_log, metrics, models, spectral
from sam_jax.activations import get as get_activation
from sam_jax.objective import softmax_cross_entropy

NB, B, D, K = 2, 4, 5, 3


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _setup(seed=0):
  model = models.tiny("mlp", num_classes=K, activation=get_activation("gelu"))
  kx, ky, kp = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, (NB, B, D), jnp.float64)
  y = jax.random.randint(ky, (NB, B), 0, K)
  params = models.init_params(model, kp, x[0])
  params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  obj = models.make_objective(model, softmax_cross_entropy)
  return obj, params, (x, y)


def test_top_ritz_values_and_traces_match_dense():
  obj, params, (x, y) = _setup()
  p = models.num_params(params)
  cfg = dict(lanczos_iters=p, top_k=3, trace_probes=6, estimator="hutch++")
  key = jax.random.PRNGKey(3)
  stats = curvature_log.make_curvature_fn(obj, cfg)(params, (x, y), key)
  full = (x.reshape(NB * B, D), y.reshape(-1))
  dense = {
    "h": curvature.hessian_matrix(obj, params, full),
    "gn": curvature.gauss_newton_matrix(obj, params, full),
    "nme": curvature.nme_matrix(obj, params, full),
  }
  for name, mat in dense.items():
    eig = np.linalg.eigvalsh(np.asarray(mat))[::-1]
    np.testing.assert_allclose(
      stats[f"{name}_top"], eig[:3], rtol=1e-7, atol=1e-9, err_msg=name
    )
    if name == "nme":
      np.testing.assert_allclose(stats["nme_min"], eig[-1], rtol=1e-7)
  _, k_tr = jax.random.split(key)
  for name in ("h", "gn"):
    want = spectral.hutchpp_trace(
      lambda v, m=dense[name]: m @ v, jnp.zeros(p), k_tr, 6
    )
    np.testing.assert_allclose(stats[f"trace_{name}"], want, rtol=1e-8)
  np.testing.assert_allclose(
    stats["trace_nme"], stats["trace_h"] - stats["trace_gn"], rtol=1e-12
  )
  assert stats["nme_min"] < 0 < stats["gn_top"][0]


def test_stacked_seeds_match_per_seed():
  obj, params0, (x, _) = _setup(0)
  _, params1, _ = _setup(1)
  params = jax.tree.map(lambda a, b: jnp.stack([a, b]), params0, params1)
  y_S = jax.random.randint(jax.random.PRNGKey(9), (2, NB, B), 0, K)
  keys = jax.random.split(jax.random.PRNGKey(4), 2)
  cfg = dict(lanczos_iters=8, top_k=2, trace_probes=3)
  stacked = curvature_log.make_curvature_fn(obj, cfg, stacked_seeds=True)(
    params, (x, y_S), keys
  )
  one = curvature_log.make_curvature_fn(obj, cfg)
  for s, p in enumerate((params0, params1)):
    single = one(p, (x, y_S[s]), keys[s])
    for name, value in single.items():
      np.testing.assert_allclose(stacked[name][s], value, rtol=1e-8)
  recs = metrics.to_records(stacked, [10, 11], epoch=1)
  assert [r["seed"] for r in recs] == [10, 11]
  assert all(np.isfinite(r["trace_h"]) and len(r["h_top"]) == 2 for r in recs)


@pytest.mark.parametrize(
  "block, field",
  [
    (dict(every_epochs=-1), "every_epochs"),
    (dict(top_k=5, lanczos_iters=4), "top_k"),
    (dict(estimator="kfac"), "estimator"),
    (dict(estimator="hutch++", trace_probes=2), "trace_probes"),
    (dict(batch_size=0), "batch_size"),
    (dict(lanczos=3), "unknown"),
  ],
)
def test_bad_config_raises(block, field):
  with pytest.raises(ValueError, match=field):
    curvature_log.resolve_config(block)
