"""Curvature products against dense autodiff references, in float64.

References are assembled plainly: `jax.hessian` of the flat loss, the dense
Jacobian `J [B, K, P]` of the logits, the dense logit Hessian `[B, K, B, K]`
and the dense model Hessian `[B, K, P, P]`, so GN = J^T H_z J and
NME = sum_ik r_ik grad^2 z_ik are built without any jvp/vjp composition.
Float64 round-off on these ~35-parameter models is ~1e-15 relative; 1e-10
leaves room for summation-order differences while catching any wrong term.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import flatten_util

from sam_jax import curvature, spectral
from sam_jax.objective import (
  Objective,
  logistic_loss,
  mse,
  softmax_cross_entropy,
)

RTOL = 1e-10
B, D, H, K = 5, 3, 4, 3


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def mlp(act):
  def apply(p, x):
    return act(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]

  return apply


def cnn_apply(p, x_BxL):
  """Conv (kernel 3, 2 channels, VALID) -> GELU -> dense."""
  h = jax.lax.conv_general_dilated(
    x_BxL[..., None],
    p["conv"],
    (1,),
    "VALID",
    dimension_numbers=("NWC", "WIO", "NWC"),
  )
  h = jax.nn.gelu(h + p["cb"])
  return h.reshape(h.shape[0], -1) @ p["W"] + p["b"]


def init(kind, k_out, key):
  ks = jax.random.split(key, 4)
  n = lambda i, s: jax.random.normal(ks[i], s) / np.sqrt(s[0])
  if kind == "cnn":  # input length 6 -> 4 positions x 2 channels
    return {
      "conv": n(0, (3, 1, 2)),
      "cb": n(1, (2,)),
      "W": n(2, (8, k_out)),
      "b": n(3, (k_out,)),
    }
  if kind == "linear":
    return {"W": n(0, (D, k_out)), "b": n(1, (k_out,))}
  return {
    "W1": n(0, (D, H)),
    "b1": n(1, (H,)),
    "W2": n(2, (H, k_out)),
    "b2": n(3, (k_out,)),
  }


def problem(kind, loss, act=jax.nn.gelu, key=0, num=B):
  """(objective, params, batch) for a tiny model and loss."""
  k_out = 1 if loss == "logistic" else K
  ks = jax.random.split(jax.random.PRNGKey(key), 3)
  params = init(kind, k_out, ks[0])
  x = jax.random.normal(ks[1], (num, 6 if kind == "cnn" else D))
  apply = {
    "cnn": cnn_apply,
    "linear": lambda p, x: x @ p["W"] + p["b"],
    "mlp": mlp(act),
  }[kind]
  if loss == "ce":
    y, loss_fn = jax.random.randint(ks[2], (num,), 0, K), softmax_cross_entropy
  elif loss == "mse":
    y, loss_fn = jax.random.normal(ks[2], (num, K)), mse
  else:
    y = jnp.where(jax.random.bernoulli(ks[2], 0.5, (num,)), 1, -1)
    loss_fn = logistic_loss
  return Objective(apply, loss_fn), params, (x, y)


def dense_hessian_and_gn(obj, params, batch):
  """Dense H by jax.hessian; GN = J^T H_z J from dense J and logit Hessian."""
  x, y = batch
  flat, unravel = flatten_util.ravel_pytree(params)
  logits = lambda w: obj.apply_fn(unravel(w), x)
  mean_loss_z = lambda z: jnp.mean(obj.loss_fn(z, y))
  hess = jax.hessian(lambda w: mean_loss_z(logits(w)))(flat)
  jac = jax.jacobian(logits)(flat)  # [B, K, P]
  hz = jax.hessian(mean_loss_z)(logits(flat))  # [B, K, B, K]
  return hess, jnp.einsum("ikp,ikjl,jlq->pq", jac, hz, jac)


def dense_nme(obj, params, batch):
  """NME = sum_ik r_ik grad^2 z_ik from the dense model Hessian [B,K,P,P]."""
  x, y = batch
  flat, unravel = flatten_util.ravel_pytree(params)
  logits = lambda w: obj.apply_fn(unravel(w), x)
  r = jax.grad(lambda z: jnp.mean(obj.loss_fn(z, y)))(logits(flat))
  return jnp.einsum("ik,ikpq->pq", r, jax.hessian(logits)(flat))


def rel_err(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def flat(tree):
  return flatten_util.ravel_pytree(tree)[0]


def random_like(params, seed=7):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return tree.unflatten(
    [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
  )


PRODUCTS = (curvature.hvp, curvature.gnvp, curvature.nmevp)


@pytest.mark.parametrize(
  "kind,loss",
  [("mlp", "ce"), ("mlp", "mse"), ("mlp", "logistic"), ("cnn", "ce")],
)
def test_products_match_dense(kind, loss):
  obj, params, batch = problem(kind, loss)
  v = random_like(params)

  @jax.jit
  def run(p, v):
    return dense_hessian_and_gn(obj, p, batch), [
      f(obj, p, batch, v) for f in PRODUCTS
    ]

  (hess, gn), prods = run(params, v)
  for got, want in zip(prods, (hess, gn, hess - gn), strict=True):
    assert rel_err(flat(got), want @ flat(v)) < RTOL


def test_decomposition_and_dense_matrices():
  """H = GN + NME with NME = sum r grad^2 z assembled independently."""
  obj, params, batch = problem("mlp", "ce")

  @jax.jit
  def run(p):
    ref = (*dense_hessian_and_gn(obj, p, batch), dense_nme(obj, p, batch))
    lib = [
      f(obj, p, batch)
      for f in (
        curvature.hessian_matrix,
        curvature.gauss_newton_matrix,
        curvature.nme_matrix,
      )
    ]
    return ref, lib

  (hess, gn, nme), (lib_h, lib_gn, lib_nme) = run(params)
  assert rel_err(gn + nme, hess) < RTOL
  assert rel_err(lib_h, hess) < RTOL
  assert rel_err(lib_gn, gn) < RTOL
  assert rel_err(lib_nme, nme) < RTOL
  eig = jnp.linalg.eigvalsh(lib_gn)
  # Round-off on a PSD matrix: eigenvalues >= -1e-12 of the largest.
  assert eig.min() >= -1e-12 * jnp.abs(eig).max()
  # The Hessian of the same GELU model is indefinite, so the check bites.
  h_eig = jnp.linalg.eigvalsh(lib_h)
  assert h_eig.min() < -1e-6 * jnp.abs(h_eig).max()


@pytest.mark.parametrize("loss", ["ce", "mse", "logistic"])
def test_logit_hessian_vp_matches_dense(loss):
  obj, params, (x, y) = problem("mlp", loss)
  z = obj.apply_fn(params, x)
  u = jax.random.normal(jax.random.PRNGKey(3), z.shape)
  hz = jax.jit(jax.hessian(lambda z: jnp.mean(obj.loss_fn(z, y))))(z)
  want = jnp.einsum("ikjl,jl->ik", hz, u)
  got = jax.jit(curvature.logit_hessian_vp, static_argnums=0)(
    obj.loss_fn, z, y, u
  )
  assert rel_err(got, want) < RTOL


@pytest.mark.parametrize("loss", ["mse", "logistic"])
def test_gauss_newton_is_psd(loss):
  obj, params, batch = problem("mlp", loss)
  gn = jax.jit(curvature.gauss_newton_matrix, static_argnums=0)
  eig = jnp.linalg.eigvalsh(gn(obj, params, batch))
  assert eig.max() > 1e-3
  assert eig.min() >= -1e-12 * eig.max()  # round-off only


def test_nme_vanishes_for_linear_model():
  obj, params, batch = problem("linear", "ce")
  lib_h, lib_nme = jax.jit(
    lambda p: (
      curvature.hessian_matrix(obj, p, batch),
      curvature.nme_matrix(obj, p, batch),
    )
  )(params)
  np.testing.assert_array_equal(lib_nme, 0.0)
  _, gn = jax.jit(lambda p: dense_hessian_and_gn(obj, p, batch))(params)
  assert rel_err(lib_h, gn) < RTOL


def test_nme_vanishes_at_interpolation_with_mse():
  obj, params, (x, _) = problem("mlp", "mse")
  exact = obj.apply_fn(params, x)
  nme_fn = jax.jit(lambda y: curvature.nme_matrix(obj, params, (x, y)))
  assert jnp.abs(nme_fn(exact)).max() <= 1e-14  # r = z - y is exactly 0
  # Control: slightly off targets give a nonzero NME of the residual's size.
  assert jnp.abs(nme_fn(exact + 0.1)).max() > 1e-3


def block_mask(params, names):
  return flat({k: jnp.full(v.shape, k in names) for k, v in params.items()})


@pytest.mark.parametrize(
  "act,zero", [(jax.nn.relu, True), (jax.nn.gelu, False)]
)
def test_same_layer_nme_block_relu_vs_gelu(act, zero):
  obj, params, batch = problem("mlp", "ce", act=act)
  nme = jax.jit(lambda p: curvature.nme_matrix(obj, p, batch))(params)
  first = block_mask(params, ("W1", "b1"))
  last = block_mask(params, ("W2", "b2"))
  # The last layer is linear in its own weights: zero for any activation.
  np.testing.assert_array_equal(nme[last][:, last], 0.0)
  # The first layer's own block is sum r W2 phi''(.) x x^T: 0 for ReLU.
  block = nme[first][:, first]
  if zero:
    np.testing.assert_array_equal(block, 0.0)
  else:
    assert jnp.abs(block).max() > 1e-3 * jnp.abs(nme).max()
  # Cross-layer blocks are nonzero either way: the NME itself is not 0.
  assert jnp.abs(nme[first][:, last]).max() > 1e-3


def test_mean_over_batches_equals_full_data():
  obj, params, (x, y) = problem("mlp", "ce", num=12)
  v = random_like(params)
  stacked = (x.reshape(3, 4, D), y.reshape(3, 4))

  @jax.jit
  def run(p, v):
    return [
      (curvature.mean_over_batches(f)(obj, p, stacked, v), f(obj, p, (x, y), v))
      for f in PRODUCTS
    ]

  for got, want in run(params, v):
    assert rel_err(flat(got), flat(want)) < RTOL


def test_mean_over_batches_rejects_unstacked():
  obj, params, (x, y) = problem("mlp", "ce", num=12)
  v = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(ValueError, match="batches"):
    curvature.mean_over_batches(curvature.hvp)(
      obj, params, (x.reshape(3, 4, D), y), v
    )


def test_dense_matrix_builds_nonsymmetric_map_in_ravel_order():
  m = jax.random.normal(jax.random.PRNGKey(0), (5, 5))
  params = {"a": jnp.zeros(2), "b": jnp.zeros((1, 3))}

  def matvec(v):  # written per leaf, not through ravel_pytree
    a, b = v["a"], v["b"][0]
    return {
      "a": m[:2, :2] @ a + m[:2, 2:] @ b,
      "b": (m[2:, :2] @ a + m[2:, 2:] @ b)[None],
    }

  np.testing.assert_allclose(curvature.dense_matrix(matvec, params), m)


def test_lanczos_on_curvature_matches_eigh():
  obj, params, batch = problem("mlp", "ce")  # P = 31; GN has rank <= 10

  @jax.jit
  def run(p):
    out = []
    for mv, dense in (
      (curvature.hvp, curvature.hessian_matrix),
      (curvature.gnvp, curvature.gauss_newton_matrix),
    ):
      matvec = lambda v, mv=mv: mv(obj, p, batch, v)
      ritz = spectral.lanczos(
        matvec, p, 31, jax.random.PRNGKey(1), unroll=False
      )
      out.append((ritz, jnp.linalg.eigvalsh(dense(obj, p, batch))))
    return out

  for ritz, eig in run(params):
    scale = jnp.abs(eig).max()
    # num_iters = P spans the whole space: exact up to round-off (~1e-14
    # of the spectral radius with full reorthogonalisation); the low-rank
    # GN exercises the restart after breakdown.
    assert jnp.abs(ritz[0] - eig[0]) < RTOL * scale
    assert jnp.abs(ritz[-1] - eig[-1]) < RTOL * scale


# --- the Curvature facade ------------------------------------------------


def dense_of(obj, params, batch):
  hess, gn = dense_hessian_and_gn(obj, params, batch)
  return {"h": hess, "gn": gn, "nme": dense_nme(obj, params, batch)}


@pytest.mark.parametrize("of", curvature.CURVATURES)
def test_curvature_facade_matches_dense(of):
  obj, params, batch = problem("mlp", "ce", jax.nn.tanh, num=8)
  dense = dense_of(obj, params, batch)[of]
  eigs = np.linalg.eigvalsh(np.asarray(dense))[::-1]
  num = eigs.size
  curv = curvature.Curvature(obj, params, batch)
  assert curv.num_params == num
  top = curv.eigenvalues(k=3, of=of, num_iters=num, return_vectors=True)
  np.testing.assert_allclose(top.values, eigs[:3], rtol=1e-9, atol=1e-12)
  assert np.all(np.asarray(top.residuals) < 1e-8)
  v0 = flatten_util.ravel_pytree(jax.tree.map(lambda a: a[0], top.vectors))[0]
  np.testing.assert_allclose(
    np.asarray(dense) @ v0, eigs[0] * v0, rtol=1e-8, atol=1e-10
  )
  # Hutch++ with 3P probes sketches the whole space: exact.
  exact = curv.trace(of=of, num_probes=3 * num, key=jax.random.PRNGKey(3))
  np.testing.assert_allclose(exact.value, np.trace(dense), rtol=1e-9)
  est = curv.trace(of=of, num_probes=60, method="hutchinson")
  assert abs(float(est.value) - np.trace(dense)) < 5 * float(est.stderr)
  density = curv.density(of=of, num_iters=num, num_probes=2, grid=64)
  nodes = np.asarray(density.nodes)
  np.testing.assert_allclose(np.sort(nodes[0]), np.sort(eigs), atol=1e-8)


def test_curvature_of_several_batches_is_the_full_data_curvature():
  obj, params, (x, y) = problem("mlp", "ce", jax.nn.tanh, num=10)
  dense = dense_of(obj, params, (x, y))["h"]
  # Two batches of 4 (one scan) and one of 2 (weighted by its size).
  batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
  curv = curvature.Curvature(obj, params, batches)
  v = random_like(params)
  np.testing.assert_allclose(
    flat(curv.matvec("h")(v)), np.asarray(dense) @ flat(v), rtol=1e-10
  )
  top = curv.eigenvalues(k=1, num_iters=curv.num_params)
  np.testing.assert_allclose(
    top.values[0], np.linalg.eigvalsh(np.asarray(dense))[-1], rtol=1e-9
  )


class ScaledMLP(nn.Module):
  """A linen MLP with a non-trainable collection (like batch_stats)."""

  @nn.compact
  def __call__(self, x):
    scale = self.variable("constants", "scale", lambda: jnp.full((D,), 0.5))
    h = nn.tanh(nn.Dense(H)(x * scale.value))
    return nn.Dense(K)(h)


def test_curvature_of_linen_variables_dict_is_over_params_only():
  model = ScaledMLP()
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(ks[0], (6, D))
  y = jax.random.randint(ks[1], (6,), 0, K)
  variables = model.init(ks[2], x)  # float32 params: cast for the check
  variables = jax.tree.map(lambda a: a.astype(jnp.float64), variables)
  assert set(variables) == {"params", "constants"}
  full = Objective(model.apply, softmax_cross_entropy)
  plain = Objective(
    lambda p, x_: model.apply({**variables, "params": p}, x_),
    softmax_cross_entropy,
  )
  dense = curvature.hessian_matrix(plain, variables["params"], (x, y))
  curv = curvature.Curvature(full, variables, (x, y))
  assert curv.num_params == dense.shape[0]
  top = curv.eigenvalues(k=2, num_iters=curv.num_params, return_vectors=True)
  np.testing.assert_allclose(
    top.values, np.linalg.eigvalsh(np.asarray(dense))[::-1][:2], rtol=1e-9
  )
  assert jax.tree.structure(
    jax.tree.map(lambda a: a[0], top.vectors)
  ) == jax.tree.structure(variables["params"])


def test_curvature_compiles_once_per_objective_and_query():
  obj, params, batch = problem("mlp", "ce", jax.nn.tanh)
  first = curvature.Curvature(obj, params, batch).eigenvalues(k=2, num_iters=5)
  other = jax.tree.map(lambda a: 1.1 * a, params)
  again = curvature.Curvature(obj, other, batch)
  again.eigenvalues(k=2, num_iters=5)
  fn = curvature._compiled("eig", "h", obj, (5, 2, False), (1.0,))
  assert fn._cache_size() == 1
  assert not np.allclose(
    first.values, again.eigenvalues(k=2, num_iters=5).values
  )


def test_curvature_bad_arguments_raise():
  obj, params, batch = problem("mlp", "ce")
  curv = curvature.Curvature(obj, params, batch)
  with pytest.raises(ValueError, match="of must be one of"):
    curv.eigenvalues(of="hessian")
  with pytest.raises(ValueError, match="k="):
    curv.eigenvalues(k=curv.num_params + 1)
  with pytest.raises(ValueError, match="num_iters=2 must be >= k=3"):
    curv.eigenvalues(k=3, num_iters=2)
  with pytest.raises(ValueError, match="method must be one of"):
    curv.trace(method="exact")
  with pytest.raises(ValueError, match="batches is empty"):
    curvature.Curvature(obj, params, [])
  with pytest.raises(ValueError, match=r"batches\[1\]"):
    curvature.Curvature(obj, params, [batch, (batch[0], batch[1][:2])])
  with pytest.raises(ValueError, match="sequence of them"):
    curvature.Curvature(obj, params, batch[0])
