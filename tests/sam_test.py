"""SAM variants against independent references (PAPERS.md A1-A4).

References are written plainly: an explicit Python loop over groups,
`jax.grad` of the group loss for the SAM gradient, and the dense Jacobian
`jax.jacobian` of the logits w.r.t. the flat parameters for the logit and
Jacobian variants. Everything runs in float64, where agreement to 1e-10
relative error is far above round-off (~1e-15) and far below any
algorithmic difference (a wrong perturbation moves the gradient by O(rho)).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import sam_jax as sj
from sam_jax import per_example

RHO = 0.3  # large enough that every variant differs from SGD by O(1)
B, D, K = 4, 10, 3


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


class TinyMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(5)(x))
    x = jnp.tanh(nn.Dense(4, use_bias=False)(x))
    return nn.Dense(K, name="head")(x)


class TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x[..., None]
    x = nn.relu(nn.Conv(2, (3,), strides=2, padding="SAME")(x))
    x = nn.gelu(nn.Conv(3, (3,), padding=1, kernel_dilation=2)(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(K, name="head")(x)


class TinyLayerNormMLP(nn.Module):
  """Has a per-example LayerNorm, which the 1-SAM fast path covers."""

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(nn.gelu(nn.Dense(5)(x)))
    return nn.Dense(K, name="head")(x)


class TinyGainMLP(nn.Module):
  """Has a bare parameter (a gain), which the 1-SAM fast path does not know."""

  @nn.compact
  def __call__(self, x):
    gain = self.param("gain", nn.initializers.ones, (5,))
    return nn.Dense(K, name="head")(gain * nn.gelu(nn.Dense(5)(x)))


def make_problem(module, seed=0):
  kx, kp = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (B, D))
  y = jnp.arange(B) % K
  params = module.init(kp, x)["params"]
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  obj = sj.Objective(
    lambda p, x: module.apply({"params": p}, x), sj.softmax_cross_entropy
  )
  return obj, params, (x, y)


def reference(obj, params, batch, rho, variant, group_size, adaptive, eta):
  """Per-group loop with dense Jacobians; averages the group gradients."""
  x, y = batch
  flat, unravel = ravel_pytree(params)
  m = x.shape[0] if group_size is None else group_size
  logits = lambda w, xg: obj.apply_fn(unravel(w), xg)

  def residual(z, yg):  # d mean_i CE_i / dz, written out
    p = jax.nn.softmax(z)
    return (p - jax.nn.one_hot(yg, z.shape[-1])) / z.shape[0]

  grads = []
  for start in range(0, x.shape[0], m):
    xg, yg = x[start : start + m], y[start : start + m]
    loss_g = lambda w, xg=xg, yg=yg: jnp.mean(obj.loss_fn(logits(w, xg), yg))
    g = jax.grad(loss_g)(flat)
    if adaptive:
      t = jnp.abs(flat) + eta
      eps = rho * t**2 * g / jnp.linalg.norm(t * g)
    else:
      eps = rho * g / jnp.linalg.norm(g)
    if variant == "sam":
      grads.append(jax.grad(loss_g)(flat + eps))
      continue
    w_jac = flat if variant == "logit" else flat + eps
    w_res = flat + eps if variant == "logit" else flat
    jac = jax.jacobian(logits)(w_jac, xg)  # [m, K, P]
    r = residual(logits(w_res, xg), yg)  # [m, K]
    grads.append(jnp.einsum("mkp,mk->p", jac, r))
  return unravel(jnp.mean(jnp.stack(grads), 0))


# Jitted once per case: eager dispatch of many tiny ops is the slow part.
sam_gradient = jax.jit(
  sj.sam_gradient,
  static_argnums=0,
  static_argnames=("variant", "group_size", "adaptive", "fast"),
)
reference = jax.jit(reference, static_argnums=(0, 4, 5, 6, 7))


def rel_err(a, b):
  fa, fb = ravel_pytree(a)[0], ravel_pytree(b)[0]
  return float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fb))


@pytest.mark.parametrize("module", [TinyMLP(), TinyCNN()], ids=["mlp", "cnn"])
@pytest.mark.parametrize("variant", sj.VARIANTS)
@pytest.mark.parametrize(
  "group_size,fast",
  [(None, True), (2, True), (2, False), (1, True), (1, False)],
  ids=["n-sam", "m-sam-fast", "m-sam-general", "1-sam-fast", "1-sam-general"],
)
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "asam"])
def test_matches_reference(module, variant, group_size, fast, adaptive):
  obj, params, batch = make_problem(module)
  if adaptive and group_size is not None and fast:
    with pytest.raises(ValueError, match="adaptive"):
      sam_gradient(
        obj, params, batch, RHO, group_size=group_size, adaptive=True, fast=True
      )
    fast = False  # ASAM has no fast path
  loss, grads = sam_gradient(
    obj,
    params,
    batch,
    RHO,
    variant=variant,
    group_size=group_size,
    adaptive=adaptive,
    fast=fast,
  )
  want = reference(obj, params, batch, RHO, variant, group_size, adaptive, 0.01)
  assert rel_err(grads, want) < 1e-10
  np.testing.assert_allclose(loss, obj.loss(params, batch), rtol=1e-12)
  # The variant must actually differ from plain SGD (the test could not
  # fail otherwise).
  clean = jax.grad(obj.loss)(params, batch)
  assert rel_err(grads, clean) > 1e-3


def test_fast_path_used_only_where_it_is_exact():
  for module, expected in [
    (TinyMLP(), True),
    (TinyCNN(), True),
    (TinyLayerNormMLP(), True),
    (TinyGainMLP(), False),
  ]:
    obj, params, batch = make_problem(module)
    plan = per_example.plan(obj.apply_fn, params, batch[0])
    assert plan.applies == expected, (module, plan.reason)
    assert (plan.reason is None) == expected
  # A layer applied twice sums two per-call gradients: not rank one.
  dense = nn.Dense(D)
  shared = lambda p, x: dense.apply(
    {"params": p}, dense.apply({"params": p}, x)
  )
  x = jnp.ones((B, D))
  p = dense.init(jax.random.key(0), x)["params"]
  assert "more than once" in per_example.plan(shared, p, x).reason
  # A plain-JAX model (no flax layers) uses the general path.
  reason = per_example.plan(lambda w, x: x @ w, jnp.ones((D, K)), x).reason
  assert "is not the weight of a layer" in reason


@pytest.mark.parametrize("module", [TinyGainMLP(), TinyLayerNormMLP()])
def test_fallback_and_norm_layers_match_reference(module):
  obj, params, batch = make_problem(module)
  for variant in sj.VARIANTS:
    _, grads = sam_gradient(
      obj, params, batch, RHO, variant=variant, group_size=1
    )
    want = reference(obj, params, batch, RHO, variant, 1, False, 0.01)
    assert rel_err(grads, want) < 1e-10


def test_group_size_of_whole_batch_is_n_sam():
  obj, params, batch = make_problem(TinyMLP())
  for variant in sj.VARIANTS:
    _, a = sj.sam_gradient(obj, params, batch, RHO, variant=variant)
    _, b = sj.sam_gradient(
      obj, params, batch, RHO, variant=variant, group_size=B
    )
    assert rel_err(a, b) < 1e-14


def test_bad_arguments_are_named():
  obj, params, batch = make_problem(TinyMLP())
  with pytest.raises(ValueError, match="group_size=3"):
    sj.sam_gradient(obj, params, batch, RHO, group_size=3)
  with pytest.raises(ValueError, match="group_size"):
    sj.sam_gradient(obj, params, batch, RHO, group_size=0)
  with pytest.raises(ValueError, match="variant"):
    sj.sam_gradient(obj, params, batch, RHO, variant="lsam")
  with pytest.raises(ValueError, match="variant"):
    sj.sam(0.1, variant="nope")


def test_bad_traced_rho_or_eta_gives_nan_inside_jit():
  """Outside jit a bad rho / eta raises (above); inside, where nothing can
  raise, it gives a NaN gradient, as sj.sam and the regularizers do."""
  obj, params, batch = make_problem(TinyMLP())
  nan = lambda tree: all(
    bool(jnp.all(jnp.isnan(g))) for g in jax.tree.leaves(tree)
  )
  sam_at = jax.jit(lambda r: sj.sam_gradient(obj, params, batch, r)[1])
  assert nan(sam_at(-0.1)) and nan(sam_at(jnp.inf))
  assert not nan(sam_at(0.1))
  one_sam = jax.jit(
    lambda r: sj.sam_gradient(obj, params, batch, r, group_size=1)[1]
  )
  assert nan(one_sam(-0.1))
  asam = jax.jit(
    lambda e: sj.sam_gradient(obj, params, batch, RHO, adaptive=True, eta=e)[1]
  )
  assert nan(asam(0.0)) and not nan(asam(0.01))
  penalty = jax.jit(
    lambda r: sj.regularized_gradient("penalty", obj, params, batch, rho=r)[1]
  )
  assert nan(penalty(-0.1)) and not nan(penalty(0.1))
  with pytest.raises(ValueError, match="rho"):
    sj.sam_gradient(obj, params, batch, -0.1)


# ---- Closed forms (PAPERS.md A3, A4) ----------------------------------------


def test_jacobian_sam_on_linear_model_is_sgd():
  """f = xW + b has a Jacobian independent of w: J-SAM == SGD."""
  obj, params, batch = make_problem(nn.Dense(K))
  clean = jax.grad(obj.loss)(params, batch)
  for group_size in (None, 2, 1):
    _, grads = sj.sam_gradient(
      obj, params, batch, RHO, variant="jacobian", group_size=group_size
    )
    assert rel_err(grads, clean) < 1e-14


def test_one_sam_on_logistic_regression_is_reweighted_sgd():
  """grad_i = -t_i sigmoid(-m_i + rho ||x_i||) x_i (PAPERS.md A3).

  J is x for every w, so L-SAM equals 1-SAM here.
  """
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (6, 5))
  t = jnp.array([1, -1, 1, 1, -1, -1])
  w = jax.random.normal(kw, (5,))
  obj = sj.Objective(lambda w, x: (x @ w)[:, None], sj.logistic_loss)
  margin = t * (x @ w)
  c = RHO * jnp.linalg.norm(x, axis=1)
  per_ex = -(t * jax.nn.sigmoid(-margin + c))[:, None] * x
  want = jnp.mean(per_ex, 0)
  for variant in ("sam", "logit"):
    _, grads = sj.sam_gradient(
      obj, w, (x, t), RHO, variant=variant, group_size=1
    )
    np.testing.assert_allclose(grads, want, rtol=1e-12)
  # The weight a_i = sigma(-m + c)/sigma(-m) >= 1 and grows with the margin.
  a = jax.nn.sigmoid(-margin + c) / jax.nn.sigmoid(-margin)
  assert jnp.all(a >= 1)


def _two_layer(num_out):
  kx, kv, kw = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(kx, (5, 4))
  params = {
    "W": jax.random.normal(kw, (3, 4)),
    "V": jax.random.normal(kv, (num_out, 3)),
  }
  apply_fn = lambda p, x: x @ p["W"].T @ p["V"].T
  return apply_fn, params, x


def test_jacobian_sam_two_layer_linear_binary():
  """J-SAM == SGD on l + rho/2 SG[s/Z](|x|^2|v|^2 + |Wx|^2) (A4)."""
  apply_fn, params, x = _two_layer(1)
  t = jnp.array([1, -1, -1, 1, 1])
  obj = sj.Objective(apply_fn, sj.logistic_loss)

  def penalised(p, xi, ti):
    f = (p["V"] @ p["W"] @ xi)[0]
    s = jax.nn.sigmoid(-ti * f)
    wx, v = p["W"] @ xi, p["V"][0]
    z = jnp.sqrt(wx @ wx + (v @ v) * (xi @ xi))
    weight = jax.lax.stop_gradient(s / z)
    return jax.nn.softplus(-ti * f) + RHO / 2 * weight * (
      (xi @ xi) * (v @ v) + wx @ wx
    )

  want = jax.tree.map(
    lambda *g: jnp.mean(jnp.stack(g), 0),
    *[jax.grad(penalised)(params, x[i], t[i]) for i in range(len(t))],
  )
  _, grads = sj.sam_gradient(
    obj, params, (x, t), RHO, variant="jacobian", group_size=1
  )
  assert rel_err(grads, want) < 1e-12


def test_jacobian_sam_two_layer_linear_multiclass():
  """J-SAM == SGD on CE + rho/N (|x|^2|V^T r|^2 + |r|^2|Wx|^2)/2 (A4)."""
  apply_fn, params, x = _two_layer(K)
  y = jnp.array([0, 2, 1, 1, 0])
  obj = sj.Objective(apply_fn, sj.softmax_cross_entropy)

  def penalised(p, xi, yi):
    z = p["V"] @ p["W"] @ xi
    r = jax.lax.stop_gradient(jax.nn.softmax(z) - jax.nn.one_hot(yi, K))
    wx, vtr = p["W"] @ xi, p["V"].T @ r
    n = jax.lax.stop_gradient(
      jnp.sqrt((r @ r) * (wx @ wx) + (vtr @ vtr) * (xi @ xi))
    )
    ce = -jax.nn.log_softmax(z)[yi]
    return ce + RHO / n * 0.5 * ((xi @ xi) * (vtr @ vtr) + (r @ r) * (wx @ wx))

  want = jax.tree.map(
    lambda *g: jnp.mean(jnp.stack(g), 0),
    *[jax.grad(penalised)(params, x[i], y[i]) for i in range(len(y))],
  )
  _, grads = sj.sam_gradient(
    obj, params, (x, y), RHO, variant="jacobian", group_size=1
  )
  assert rel_err(grads, want) < 1e-12


# ---- Numerics ----------------------------------------------------------------


def test_zero_gradient_gives_zero_perturbation():
  params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
  grads = jax.tree.map(jnp.zeros_like, params)
  for adaptive in (False, True):
    eps = sj.ascent_direction(grads, params, 0.5, adaptive=adaptive)
    assert all(jnp.all(e == 0) for e in jax.tree.leaves(eps))
  # Its derivative through the safe norm is finite too (used by penalties).
  d = jax.grad(lambda g: sj.global_norm(sj.dual_vector(g)))(jnp.zeros(3))
  assert jnp.all(jnp.isfinite(d))


def test_non_finite_gradient_gives_zero_perturbation():
  params = jnp.ones(3)
  for bad in (jnp.inf, jnp.nan):
    eps = sj.ascent_direction(jnp.array([1.0, bad, 0.0]), params, 0.5)
    assert jnp.all(eps == 0)


def test_norm_accumulates_in_float32_for_bfloat16():
  g = {
    "a": jnp.full((4096,), 0.01, jnp.bfloat16),
    "b": jnp.ones(3, jnp.bfloat16),
  }
  norm = sj.global_norm(g)
  assert norm.dtype == jnp.float32
  want = np.sqrt(4096 * float(jnp.bfloat16(0.01)) ** 2 + 3)
  np.testing.assert_allclose(norm, want, rtol=1e-6)
  eps = sj.ascent_direction(g, jax.tree.map(jnp.zeros_like, g), 0.1)
  assert all(e.dtype == jnp.bfloat16 for e in jax.tree.leaves(eps))
