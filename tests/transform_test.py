"""The optax transform `sam_jax.sam`: peers, contract, numerics."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from flax import nnx

import sam_jax as sj
from sam_jax import parallel
from sam_jax.sam import check_eta, check_rho

D = 4


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def quadratic_problem(dtype=jnp.float64):
  """MSE of a linear model: L(w) = mean_i (x_i.w - y_i)^2 / 2, a parabola."""
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (8, D), dtype)
  w_star = jnp.arange(1.0, D + 1, dtype=dtype)
  y = (x @ w_star)[:, None]
  obj = sj.Objective(lambda w, x: (x @ w)[:, None], sj.mse)
  return obj, (x, y), w_star


def nonlinear_problem():
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (8, D))
  y = jnp.arange(8) % 3
  params = {
    "w1": jax.random.normal(kw, (D, 5)) * 0.5,
    "w2": jnp.ones((5, 3)) * 0.1,
  }
  apply_fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
  return sj.Objective(apply_fn, sj.softmax_cross_entropy), params, (x, y)


def test_trajectory_matches_optax_contrib_sam_opaque():
  """20 steps of chain(sam, sgd+momentum) == optax.contrib.sam opaque."""
  obj, params, batch = nonlinear_problem()
  rho, lr = 0.1, 0.05
  loss = lambda p: obj.loss(p, batch)
  ours = optax.chain(sj.sam(rho), optax.sgd(lr, momentum=0.9))
  peer = optax.contrib.sam(
    optax.sgd(lr, momentum=0.9),
    optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
    sync_period=2,
    opaque_mode=True,
  )
  p_ours, p_peer = params, params
  s_ours, s_peer = ours.init(params), peer.init(params)
  for _ in range(20):
    u, s_ours = ours.update(
      jax.grad(loss)(p_ours), s_ours, p_ours, grad_fn=jax.grad(loss)
    )
    p_ours = optax.apply_updates(p_ours, u)
    u, s_peer = peer.update(
      jax.grad(loss)(p_peer),
      s_peer,
      p_peer,
      grad_fn=lambda p, _: jax.grad(loss)(p),
    )
    p_peer = optax.apply_updates(p_peer, u)
  chex.assert_trees_all_close(p_ours, p_peer, rtol=1e-12, atol=1e-12)
  # SAM moved the trajectory away from plain momentum SGD.
  base = optax.sgd(lr, momentum=0.9)
  p_sgd, s_sgd = params, base.init(params)
  for _ in range(20):
    u, s_sgd = base.update(jax.grad(loss)(p_sgd), s_sgd, p_sgd)
    p_sgd = optax.apply_updates(p_sgd, u)
  diff = optax.tree.norm(jax.tree.map(jnp.subtract, p_ours, p_sgd))
  assert diff > 1e-3


# ---- The contract every variant passes (optax contrib/_common_test idea) ----

VARIANTS = {
  "sam": dict(),
  "asam": dict(adaptive=True),
  "l-sam": dict(variant="logit"),
  "j-sam": dict(variant="jacobian"),
  "1-sam": dict(group_size=1),
  "m-sam": dict(group_size=2),
  "1-l-sam": dict(variant="logit", group_size=1),
  "1-j-sam": dict(variant="jacobian", group_size=1),
}
USES_GRAD_FN = ("sam", "asam")


def extra_args(name, obj, batch):
  if name in USES_GRAD_FN:
    return dict(grad_fn=jax.grad(lambda p: obj.loss(p, batch)))
  return dict(objective=obj, batch=batch)


def run(tx, name, obj, batch, params, steps):
  """`steps` jitted steps; the step must compile exactly once."""
  chex.clear_trace_counter()  # counters are keyed by the step's code
  state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    grads = jax.grad(obj.loss)(params, batch)
    updates, state = tx.update(
      grads, state, params, **extra_args(name, obj, batch)
    )
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


@pytest.mark.parametrize("name", list(VARIANTS))
def test_contract_converges_on_parabola(name):
  obj, batch, w_star = quadratic_problem()
  rho = 0.01
  tx = optax.chain(sj.sam(rho, **VARIANTS[name]), optax.sgd(0.1))
  w0 = jnp.zeros(D)
  w, _ = run(tx, name, obj, batch, w0, 300)
  # SAM's fixed point on a quadratic is within O(rho) of the minimum.
  assert float(jnp.linalg.norm(w - w_star)) < 10 * rho
  assert float(jnp.linalg.norm(w - w_star)) < 1e-2 * float(
    jnp.linalg.norm(w0 - w_star)
  )


@pytest.mark.parametrize("name", list(VARIANTS))
def test_contract_inject_hyperparams_and_state(name):
  obj, params, batch = nonlinear_problem()
  kwargs = VARIANTS[name]
  plain = optax.chain(sj.sam(0.2, **kwargs), optax.sgd(0.1, momentum=0.9))
  injected = optax.chain(
    optax.inject_hyperparams(sj.sam, static_args=("group_size",))(
      rho=0.2, **kwargs
    ),
    optax.sgd(0.1, momentum=0.9),
  )
  p1, s1 = run(plain, name, obj, batch, params, 3)
  p2, s2 = run(injected, name, obj, batch, params, 3)
  chex.assert_trees_all_close(p1, p2, rtol=1e-14)
  # State structure, shapes and dtypes are stable across steps.
  s0 = injected.init(params)
  chex.assert_trees_all_equal_structs(s0, s2)
  chex.assert_trees_all_equal_shapes_and_dtypes(s0, s2)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_contract_keeps_param_dtype(name, dtype):
  obj, params, batch = nonlinear_problem()
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  batch = (batch[0].astype(dtype), batch[1])
  tx = optax.chain(sj.sam(0.1, **VARIANTS[name]), optax.sgd(0.1))
  new, _ = run(tx, name, obj, batch, params, 2)
  chex.assert_trees_all_equal_dtypes(new, params)
  assert all(jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new))


def test_scheduled_rho():
  obj, params, batch = nonlinear_problem()
  schedule = optax.linear_schedule(0.0, 0.3, transition_steps=2)
  tx = optax.inject_hyperparams(sj.sam)(rho=schedule)
  state = tx.init(params)
  grad_fn = jax.grad(lambda p: obj.loss(p, batch))
  g = grad_fn(params)
  seen, updates = [], []
  for _ in range(3):
    u, state = tx.update(g, state, params, grad_fn=grad_fn)
    seen.append(float(state.hyperparams["rho"]))
    updates.append(u)
  # Step k uses rho = schedule(k): 0, 0.15, 0.3 (float32 schedule values).
  np.testing.assert_allclose(seen, [0.0, 0.15, 0.3], rtol=1e-6)
  chex.assert_trees_all_equal(updates[0], g)  # rho = 0: the clean gradient
  assert optax.tree.norm(jax.tree.map(jnp.subtract, updates[2], g)) > 1e-3


@pytest.mark.parametrize("name", list(VARIANTS))
def test_rho_zero_is_exactly_the_base_optimizer(name):
  obj, params, batch = nonlinear_problem()
  base = optax.sgd(0.1, momentum=0.9)
  tx = optax.chain(sj.sam(0.0, **VARIANTS[name]), base)
  grads = jax.grad(obj.loss)(params, batch)
  u, _ = tx.update(
    grads, tx.init(params), params, **extra_args(name, obj, batch)
  )
  u_base, _ = base.update(grads, base.init(params), params)
  # Not merely close: w + 0 == w, so the same numbers come out. Float ops in
  # a different association (per-group means) may differ in the last bit.
  chex.assert_trees_all_close(u, u_base, rtol=1e-15, atol=1e-17)


def test_missing_extra_args_fail_loudly():
  obj, params, batch = nonlinear_problem()
  g = jax.grad(obj.loss)(params, batch)
  tx = sj.sam(0.1)
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(g, tx.init(params), params)
  tx = sj.sam(0.1, variant="logit")
  with pytest.raises(ValueError, match="objective"):
    tx.update(g, tx.init(params), params, grad_fn=lambda p: g)
  with pytest.raises(ValueError, match="params"):
    tx.update(g, tx.init(params), None, grad_fn=lambda p: g)


def test_zero_gradient_and_non_finite_batch_never_make_nan_params():
  obj, batch, w_star = quadratic_problem()
  tx = optax.chain(sj.sam(0.1), optax.sgd(0.1))
  grad_fn = jax.grad(lambda w: obj.loss(w, batch))
  # At the exact minimum the gradient is 0: SAM must not divide by it.
  u, _ = tx.update(grad_fn(w_star), tx.init(w_star), w_star, grad_fn=grad_fn)
  assert jnp.all(jnp.isfinite(u))
  np.testing.assert_allclose(u, 0.0, atol=1e-12)
  # A non-finite batch: apply_if_finite after sj.sam skips the step and
  # counts it, parameters stay finite and unchanged.
  bad = (batch[0].at[0, 0].set(jnp.nan), batch[1])
  bad_grad_fn = jax.grad(lambda w: obj.loss(w, bad))
  safe = optax.chain(sj.sam(0.1), optax.apply_if_finite(optax.sgd(0.1), 3))
  w0 = jnp.zeros(D)
  state = safe.init(w0)
  u, state = safe.update(bad_grad_fn(w0), state, w0, grad_fn=bad_grad_fn)
  w1 = optax.apply_updates(w0, u)
  assert jnp.all(w1 == w0)
  assert int(state[1].notfinite_count) == 1


@pytest.mark.parametrize("group_size", [None, 1])
def test_apply_if_finite_after_sam_skips_a_nan_sam_step(group_size):
  """A label out of range makes the SAM gradient NaN (the incoming one is
  None: n-SAM takes the objective's own clean gradient, 1-SAM ignores it).
  `chain(sj.sam, apply_if_finite(sgd))` skips the step and counts it, then
  applies the next good one. Around the chain, apply_if_finite checks only
  the incoming zeros of a group variant: the documented trap."""
  obj, params, (x, y) = nonlinear_problem()
  bad = (x, y.at[0].set(7))
  safe = optax.chain(
    sj.sam(0.1, group_size=group_size),
    optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3),
  )
  state = safe.init(params)
  u, state = safe.update(None, state, params, objective=obj, batch=bad)
  assert all(not jnp.any(a) for a in jax.tree.leaves(u))
  assert int(state[1].notfinite_count) == 1
  assert int(state[1].total_notfinite) == 1
  u, state = safe.update(None, state, params, objective=obj, batch=(x, y))
  _, want = sj.sam_gradient(obj, params, (x, y), 0.1, group_size=group_size)
  chex.assert_trees_all_close(u, jax.tree.map(lambda g: -0.1 * g, want))
  assert int(state[1].notfinite_count) == 0
  if group_size:
    outer = optax.apply_if_finite(
      optax.chain(sj.sam(0.1, group_size=1), optax.sgd(0.1)), 3
    )
    zeros = optax.tree.zeros_like(params)
    u, _ = outer.update(
      zeros, outer.init(params), params, objective=obj, batch=bad
    )
    assert all(bool(jnp.all(jnp.isnan(a))) for a in jax.tree.leaves(u))


def test_ghost_batch_norm_through_the_transform():
  """m-SAM on a model with BatchNorm in training mode: the error names
  ghost_batch_norm=True, which sj.sam accepts like sam_gradient."""
  net = nn.Sequential(
    [nn.Dense(4), nn.BatchNorm(use_running_average=False), nn.Dense(3)]
  )
  x, y = jax.random.normal(jax.random.key(0), (8, D)), jnp.arange(8) % 3
  v = net.init(jax.random.key(1), x)
  obj = sj.Objective(
    lambda p, x_: net.apply({**v, "params": p}, x_, mutable=["batch_stats"])[0],
    sj.softmax_cross_entropy,
  )
  params = v["params"]
  tx = sj.sam(0.1, group_size=2)
  with pytest.raises(ValueError, match="ghost_batch_norm=True"):
    tx.update(None, tx.init(params), params, objective=obj, batch=(x, y))
  tx = sj.sam(0.1, group_size=2, ghost_batch_norm=True)
  u, _ = tx.update(None, tx.init(params), params, objective=obj, batch=(x, y))
  _, want = sj.sam_gradient(
    obj, params, (x, y), 0.1, group_size=2, ghost_batch_norm=True
  )
  chex.assert_trees_all_close(u, want, rtol=1e-12)


class _DropoutNet(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(D, 8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.drop(jnp.tanh(self.hidden(x))))


def test_nnx_dropout_n_sam_shares_the_masks_of_its_objective():
  """NNX with Dropout, n-SAM in nnx.Optimizer: with None as the incoming
  gradient (or the gradient of obj.loss) the clean and perturbed passes
  share the objective's dropout masks: the update is sam_gradient's. A
  gradient from nnx.value_and_grad(model) uses the model's own stream:
  other masks, another update (documented)."""
  _, _, (x, y) = nonlinear_problem()
  model = _DropoutNet(nnx.Rngs(0, dropout=1))
  obj = sj.Objective.from_nnx(model, sj.softmax_cross_entropy)
  params = nnx.state(model, nnx.Param)
  _, want = sj.sam_gradient(obj, params, (x, y), 0.1)
  tx = sj.sam(0.1)
  for incoming in (None, jax.grad(obj.loss)(params, (x, y))):
    got, _ = tx.update(
      incoming, tx.init(params), params, objective=obj, batch=(x, y)
    )
    chex.assert_trees_all_close(got, want, rtol=1e-12)
  ce = lambda m: jnp.mean(sj.softmax_cross_entropy(m(x), y))
  model_grads = nnx.grad(ce)(model)
  other, _ = tx.update(
    nnx.state(model_grads, nnx.Param),
    tx.init(params),
    params,
    objective=obj,
    batch=(x, y),
  )
  diff = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), other, want)
  assert max(jax.tree.leaves(diff)) > 1e-3
  # The documented loop: nnx.Optimizer, None, inside nnx.jit.
  opt = nnx.Optimizer(
    model, optax.chain(sj.sam(0.1), optax.sgd(0.5)), wrt=nnx.Param
  )

  @nnx.jit
  def step(model, opt, x, y):
    obj = sj.Objective.from_nnx(model, sj.softmax_cross_entropy)
    params = nnx.state(model, nnx.Param)
    _, grads = sj.sam_gradient(obj, params, (x, y), 0.1)
    opt.update(model, None, objective=obj, batch=(x, y))
    return grads

  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  grads = step(model, opt, x, y)
  after = nnx.state(model, nnx.Param)
  moved = jax.tree.map(lambda a, b, g: a - 0.5 * g - b, before, after, grads)
  assert max(float(jnp.max(jnp.abs(m))) for m in jax.tree.leaves(moved)) < 1e-12


def test_transform_with_objective_equals_sam_gradient():
  obj, params, batch = nonlinear_problem()
  for variant in sj.VARIANTS:
    tx = sj.sam(0.1, variant=variant)
    grads = jax.grad(obj.loss)(params, batch)
    u, _ = tx.update(grads, tx.init(params), params, objective=obj, batch=batch)
    _, want = sj.sam_gradient(obj, params, batch, 0.1, variant=variant)
    chex.assert_trees_all_close(u, want, rtol=1e-13)


# ---- Validation at the boundary; NaN inside jit -----------------------------


def test_bad_arguments_fail_at_construction_naming_the_argument():
  msg = "rho must be a number or a schedule, got a GradientTransformation"
  with pytest.raises(TypeError, match=msg) as info:
    sj.sam(optax.sgd(0.1))  # sj.sam wraps no optimizer
  assert "optax.chain(sj.sam(rho), optax.sgd(lr))" in str(info.value)
  bad_values = [-1.0, jnp.nan, jnp.inf, jnp.array(-0.5)]
  for rho in bad_values:
    with pytest.raises(ValueError, match="rho must be finite and >= 0"):
      sj.sam(rho)
  for rho in (
    "0.1",
    True,
    None,
    jnp.ones(2),
    optax.MultiSteps(optax.sgd(1), 2),
  ):
    with pytest.raises(TypeError, match="rho must be"):
      sj.sam(rho)
  with pytest.raises(ValueError, match=r"rho\(0\) of the schedule"):
    sj.sam(optax.constant_schedule(-0.1))
  for group_size in (0, -2):
    with pytest.raises(ValueError, match="group_size must be >= 1"):
      sj.sam(0.1, group_size=group_size)
  for group_size in (1.5, True, jnp.array(2)):
    with pytest.raises(ValueError, match="group_size must be None or"):
      sj.sam(0.1, group_size=group_size)
  with pytest.raises(ValueError, match="variant"):
    sj.sam(0.1, variant="lsam")
  for eta in (0.0, -1.0, jnp.nan):
    with pytest.raises(ValueError, match="eta must be finite and > 0"):
      sj.sam(0.1, adaptive=True, eta=eta)
  # group_size through inject_hyperparams without static_args: a traced
  # group size cannot work; the message says how to fix it, at init.
  tx = optax.inject_hyperparams(sj.sam)(rho=0.1, group_size=2)
  with pytest.raises(ValueError, match="static_args=\\('group_size',\\)"):
    tx.init(jnp.zeros(3))


def test_check_rho_and_check_eta():
  assert check_rho(0.0) == 0.0 and check_rho(np.float32(0.1)) == 0.1
  schedule = optax.linear_schedule(0.0, 0.1, 10)
  assert check_rho(schedule, allow_schedule=True) is schedule
  with pytest.raises(TypeError, match="rho must be a number here"):
    check_rho(schedule)
  with pytest.raises(TypeError, match="rho must be a number, got a Gradient"):
    check_rho(optax.sgd(0.1))
  with pytest.raises(ValueError, match="radius must be finite"):
    check_rho(-1, name="radius")
  with pytest.raises(ValueError, match="eta"):
    check_eta(jnp.array(0.0))
  # A traced value cannot be checked, and is accepted.
  out = jax.jit(lambda r, e: check_rho(r) + check_eta(e))(-1.0, -1.0)
  assert out == -2.0


def test_bad_traced_rho_makes_the_update_nan():
  """rho(step) < 0 inside jit cannot raise: the update is NaN instead, which
  apply_if_finite and the trainer's finiteness check report."""
  obj, params, batch = nonlinear_problem()
  grad_fn = jax.grad(lambda p: obj.loss(p, batch))
  tx = optax.chain(sj.sam(lambda count: 0.1 - 0.2 * count), optax.sgd(0.1))
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
  state = tx.init(params)
  u, state = update(grad_fn(params), state, params)  # rho(0) = 0.1
  assert all(jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(u))
  u, state = update(grad_fn(params), state, params)  # rho(1) = -0.1
  assert all(jnp.all(jnp.isnan(x)) for x in jax.tree.leaves(u))


# ---- Numerics of the norm ---------------------------------------------------


def _norm64(tree):
  return np.sqrt(
    sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))
  )


@pytest.mark.parametrize("factor", [1e-25, 1e-30, 1e25])
def test_tiny_and_huge_float32_gradients_keep_their_norm(factor):
  """Below ~1e-19 the float32 squares underflow (above ~1e19 they overflow):
  the norm is scaled before squaring, so ||eps|| is still rho."""
  obj, params, batch = nonlinear_problem()
  g = jax.grad(obj.loss)(params, batch)
  small = jax.tree.map(lambda x: (x * factor).astype(jnp.float32), g)
  params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  norm = sj.global_norm(small)
  assert norm.dtype == jnp.float32
  np.testing.assert_allclose(norm, _norm64(small), rtol=1e-6)
  eps = sj.ascent_direction(small, params32, 0.05)
  np.testing.assert_allclose(_norm64(eps), 0.05, rtol=1e-6)
  direction = jax.tree.map(lambda x: x / _norm64(g), g)
  chex.assert_trees_all_close(
    jax.tree.map(lambda e: e / 0.05, eps), direction, rtol=1e-5, atol=1e-7
  )
  eps = sj.ascent_direction(small, params32, 0.05, adaptive=True)
  t = jax.tree.map(lambda w: jnp.abs(w) + 0.01, params32)
  tinv_eps = jax.tree.map(lambda e, t_: e / t_, eps, t)
  np.testing.assert_allclose(_norm64(tinv_eps), 0.05, rtol=1e-6)


def test_norm_keeps_its_nan_rule_and_finite_double_backprop():
  norm = jax.jit(sj.global_norm)
  assert jnp.isnan(norm({"a": jnp.array([1.0, jnp.nan])}))
  assert norm({"a": jnp.array([1.0, -jnp.inf])}) == jnp.inf
  assert norm({"a": jnp.zeros(3), "b": jnp.zeros(())}) == 0.0
  assert sj.global_norm({}) == 0.0
  x = jnp.array([3.0, 0.0, -4.0])
  assert norm(x) == 5.0
  chex.assert_trees_all_close(jax.jit(jax.grad(sj.global_norm))(x), x / 5.0)
  # The Hessian of ||x||, (I - u u^T) / ||x||: the stop_gradient'ed scale
  # leaves second derivatives exact; at 0 they are finite.
  hessian = jax.jit(jax.hessian(sj.global_norm))
  u = x / 5.0
  chex.assert_trees_all_close(hessian(x), (jnp.eye(3) - jnp.outer(u, u)) / 5)
  assert jnp.all(jnp.isfinite(hessian(jnp.zeros(3))))
  d = jax.jit(jax.grad(lambda g: sj.global_norm(sj.dual_vector(g))))
  assert jnp.all(jnp.isfinite(d(jnp.zeros(3))))


# ---- Schedules and inject_hyperparams ---------------------------------------


def jitted_update(tx, name, obj, batch):
  extra = extra_args(name, obj, batch)
  return jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))


@pytest.mark.parametrize("name", ["sam", "1-l-sam"])
def test_schedule_rho_equals_constant_rho_at_each_step(name):
  """sj.sam(rho=schedule) evaluates it at its count, like optax learning
  rates; each step equals the constant-rho transform at that value."""
  obj, params, batch = nonlinear_problem()
  schedule = optax.linear_schedule(0.0, 0.3, transition_steps=2)
  kwargs = VARIANTS[name]
  tx = optax.chain(sj.sam(schedule, **kwargs), optax.sgd(0.1))
  update = jitted_update(tx, name, obj, batch)
  state, p = tx.init(params), params
  extra = extra_args(name, obj, batch)

  @jax.jit
  def constant(rho, g, p):  # a fresh constant-rho transform at each step
    ref = optax.chain(sj.sam(rho, **kwargs), optax.sgd(0.1))
    return ref.update(g, ref.init(p), p, **extra)[0]

  for k in range(3):
    g = jax.grad(obj.loss)(p, batch)
    u, state = update(g, state, p)
    u_ref = constant(schedule(jnp.int32(k)), g, p)  # the count is int32
    chex.assert_trees_all_close(u, u_ref, rtol=1e-14, atol=1e-16)
    p = optax.apply_updates(p, u)
  assert int(state[0].count) == 3


@pytest.mark.parametrize("name", ["sam", "1-l-sam"])
def test_inject_hyperparams_schedule_equals_native_schedule(name):
  obj, params, batch = nonlinear_problem()
  schedule = optax.cosine_decay_schedule(0.3, decay_steps=3)
  kwargs = VARIANTS[name]
  native = sj.sam(schedule, **kwargs)
  injected = optax.inject_hyperparams(
    sj.sam, static_args=("group_size", "variant")
  )(rho=schedule, **kwargs)
  results = []
  for tx in (native, injected):
    update = jitted_update(tx, name, obj, batch)
    state, p = tx.init(params), params
    for _ in range(3):
      u, state = update(jax.grad(obj.loss)(p, batch), state, p)
      p = jax.tree.map(lambda w, d: w - 0.1 * d, p, u)
    results.append(p)
  chex.assert_trees_all_close(*results, rtol=1e-14)
  np.testing.assert_allclose(state.hyperparams["rho"], schedule(2))


# ---- Composition: what goes before and after sj.sam -------------------------


@jax.jit
def _sam_grad(params, batch, rho):
  """The n-SAM gradient of nonlinear_problem's objective, via sj.sam."""
  obj = nonlinear_problem()[0]
  tx = sj.sam(rho)
  g = jax.grad(obj.loss)(params, batch)
  grad_fn = jax.grad(lambda p: obj.loss(p, batch))
  return tx.update(g, tx.init(params), params, grad_fn=grad_fn)[0]


def test_clipping_and_weight_decay_go_after_sam():
  obj, params, batch = nonlinear_problem()
  rho, lr, c, wd = 0.1, 0.5, 1e-3, 0.01
  g = jax.grad(obj.loss)(params, batch)
  grad_fn = jax.grad(lambda p: obj.loss(p, batch))
  s = _sam_grad(params, batch, rho)
  assert optax.tree.norm(s) > 10 * c

  def update(*transforms):
    tx = optax.chain(*transforms)
    return tx.update(g, tx.init(params), params, grad_fn=grad_fn)[0]

  # After sj.sam: clips the SAM gradient, then decays.
  u = update(sj.sam(rho), optax.clip_by_global_norm(c), optax.sgd(lr))
  np.testing.assert_allclose(optax.tree.norm(u), lr * c, rtol=1e-12)
  want = jax.tree.map(lambda x: -lr * c * x / optax.tree.norm(s), s)
  chex.assert_trees_all_close(u, want, rtol=1e-12)
  u = update(sj.sam(rho), optax.add_decayed_weights(wd), optax.sgd(lr))
  want = jax.tree.map(lambda x, w: -lr * (x + wd * w), s, params)
  chex.assert_trees_all_close(u, want, rtol=1e-12)
  # Before sj.sam: only shapes eps. Clipping rescales g, and eps = rho
  # g/||g|| does not see the scale: nothing is clipped.
  u = update(optax.clip_by_global_norm(c), sj.sam(rho), optax.sgd(lr))
  chex.assert_trees_all_close(u, jax.tree.map(lambda x: -lr * x, s))
  # Weight decay before sj.sam tilts eps and never reaches the update.
  u = update(optax.add_decayed_weights(wd), sj.sam(rho), optax.sgd(lr))
  tilted = jax.tree.map(lambda x, w: x + wd * w, g, params)
  eps = sj.ascent_direction(tilted, params, rho)
  want = jax.tree.map(
    lambda x: -lr * x, grad_fn(jax.tree.map(jnp.add, params, eps))
  )
  chex.assert_trees_all_close(u, want, rtol=1e-12)


def _micro_batches(k, size=4):
  kx = jax.random.split(jax.random.key(7), k)
  return [
    (jax.random.normal(kx[i], (size, D)), (jnp.arange(size) + i) % 3)
    for i in range(k)
  ]


def test_multisteps_after_sam_averages_per_micro_batch_sam_gradients():
  """chain(sj.sam, MultiSteps(sgd, k)): each micro-batch gets its own SAM
  gradient; every k-th update is sgd of their mean, the others are 0."""
  obj, params, _ = nonlinear_problem()
  rho, lr, k = 0.1, 0.5, 3
  micro = _micro_batches(k)
  acc = dict(accumulator_dtype=jnp.float64)  # float32 by default

  def jitted(tx):
    def update(state, p, b):
      grad_fn = jax.grad(lambda q: obj.loss(q, b))
      return tx.update(grad_fn(p), state, p, grad_fn=grad_fn)

    return jax.jit(update)

  tx = optax.chain(sj.sam(rho), optax.MultiSteps(optax.sgd(lr), k, **acc))
  update = jitted(tx)
  state, p = tx.init(params), params
  for i, b in enumerate(micro):
    u, state = update(state, p, b)
    if i < k - 1:
      assert all(jnp.all(x == 0) for x in jax.tree.leaves(u))
    p = optax.apply_updates(p, u)
  sam_grads = [_sam_grad(params, b, rho) for b in micro]
  mean = jax.tree.map(lambda *g: sum(g) / k, *sam_grads)
  chex.assert_trees_all_close(
    u, jax.tree.map(lambda x: -lr * x, mean), rtol=1e-12
  )
  # The other way round, MultiSteps hands sj.sam the running mean of the
  # clean gradients and the last micro-batch's grad_fn: the applied update
  # is the last micro-batch's gradient at w + rho * mean/||mean||.
  wrong = optax.MultiSteps(optax.chain(sj.sam(rho), optax.sgd(lr)), k, **acc)
  update, state = jitted(wrong), wrong.init(params)
  for b in micro:
    u, state = update(state, params, b)
  grad = jax.jit(jax.grad(obj.loss))
  clean = [grad(params, b) for b in micro]
  eps = sj.ascent_direction(
    jax.tree.map(lambda *g: sum(g) / k, *clean), params, rho
  )
  last = grad(jax.tree.map(jnp.add, params, eps), micro[-1])
  chex.assert_trees_all_close(
    u, jax.tree.map(lambda x: -lr * x, last), rtol=1e-12
  )


# ---- Data parallel: axis_name -----------------------------------------------

NUM_DEVICES = 8
AXIS_CASES = {  # name: (extra args of that VARIANTS name, sam kwargs)
  "grad_fn-sam": ("sam", dict()),
  "grad_fn-asam": ("asam", dict(adaptive=True)),
  "objective-sam": ("l-sam", dict()),
  "objective-l-sam": ("l-sam", dict(variant="logit")),
  "objective-j-sam": ("j-sam", dict(variant="jacobian")),
  "objective-1-sam": ("1-sam", dict(group_size=1)),
  "objective-m-sam": ("m-sam", dict(group_size=2)),  # = the local batch
}


def _step(tx, name, obj, params, batch, loss_fn=None):
  loss_fn = obj.loss if loss_fn is None else loss_fn
  g = jax.grad(loss_fn)(params, batch)
  if name in USES_GRAD_FN:
    extra = dict(grad_fn=jax.grad(lambda p: loss_fn(p, batch)))
  else:
    extra = dict(objective=obj, batch=batch)
  u, state = tx.update(g, tx.init(params), params, **extra)
  return u, state.loss


def _on_8_devices(fn):
  if jax.device_count() < NUM_DEVICES:
    pytest.skip(f"needs {NUM_DEVICES} devices (see tests/conftest.py)")
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  mesh = parallel.make_mesh(NUM_DEVICES)
  specs = dict(in_specs=(P(), P(parallel.DATA)), out_specs=P())
  return jax.jit(jax.shard_map(fn, mesh=mesh, **specs))


@pytest.mark.parametrize("case", list(AXIS_CASES))
def test_axis_name_equals_the_global_batch_on_one_device(case):
  """Under shard_map on 8 devices (2 examples each) with per-device
  gradients, axis_name makes the update and the loss those of the
  16-example batch on one device."""
  name, kwargs = AXIS_CASES[case]
  obj, params, _ = nonlinear_problem()
  batch = (jax.random.normal(jax.random.key(3), (16, D)), jnp.arange(16) % 3)
  tx = sj.sam(0.2, axis_name=parallel.DATA, **kwargs)

  def local(params, batch):
    # Per-device (varying) params: jax.grad is then the local gradient,
    # as under pmap. (Replicated params under shard_map get gradients
    # already summed over the devices: see the next test.)
    to_varying = lambda a: jax.lax.pcast(a, parallel.DATA, to="varying")
    params = jax.tree.map(to_varying, params)
    return _step(tx, name, obj, params, batch)

  u, loss = _on_8_devices(local)(params, batch)
  one_device = lambda p, b: _step(sj.sam(0.2, **kwargs), name, obj, p, b)
  u_ref, loss_ref = jax.jit(one_device)(params, batch)
  chex.assert_trees_all_close(u, u_ref, rtol=1e-12, atol=1e-15)
  if name in USES_GRAD_FN:
    assert jnp.isnan(loss) and jnp.isnan(loss_ref)
  else:
    np.testing.assert_allclose(loss, obj.loss(params, batch), rtol=1e-13)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-13)


# ---- Group variants need no clean gradient; the clean loss is exposed --------


@pytest.mark.parametrize("name", ["1-sam", "m-sam", "1-l-sam", "1-j-sam"])
def test_group_variants_ignore_the_incoming_gradient(name):
  """m-/1-SAM recompute the clean gradient per group: zeros (or None) in
  place of the clean batch gradient give the identical update, which is
  sj.sam_gradient fed to the optimizer."""
  obj, params, batch = nonlinear_problem()
  tx = optax.chain(sj.sam(0.2, **VARIANTS[name]), optax.sgd(0.1))
  state = tx.init(params)
  extra = extra_args(name, obj, batch)
  clean = jax.grad(obj.loss)(params, batch)
  u, _ = tx.update(clean, state, params, **extra)
  u0, s0 = tx.update(optax.tree.zeros_like(params), state, params, **extra)
  u_none, _ = tx.update(None, state, params, **extra)
  chex.assert_trees_all_equal(u, u0)
  chex.assert_trees_all_equal(u, u_none)
  chex.assert_trees_all_equal_dtypes(u_none, params)
  loss, g = sj.sam_gradient(obj, params, batch, 0.2, **VARIANTS[name])
  sgd = optax.sgd(0.1)
  chex.assert_trees_all_close(u, sgd.update(g, sgd.init(params))[0], rtol=1e-15)
  np.testing.assert_allclose(s0[0].loss, loss, rtol=1e-15)


def test_n_sam_without_incoming_gradient_uses_the_objectives_own():
  """n-SAM's eps comes from `updates`; None is refused with grad_fn (and
  with axis_name), and on the objective path means the objective's own
  clean gradient: the same update as `sam_gradient`."""
  obj, params, batch = nonlinear_problem()
  tx = sj.sam(0.1)
  with pytest.raises(ValueError, match="updates"):
    grad_fn = jax.grad(lambda p: obj.loss(p, batch))
    tx.update(None, tx.init(params), params, grad_fn=grad_fn)
  for variant in ("sam", "logit", "jacobian"):
    tx = sj.sam(0.1, variant=variant)
    got, state = tx.update(
      None, tx.init(params), params, objective=obj, batch=batch
    )
    loss, want = sj.sam_gradient(obj, params, batch, 0.1, variant=variant)
    chex.assert_trees_all_close(got, want, rtol=1e-6)
    assert float(state.loss) == pytest.approx(float(loss))
  tx = sj.sam(0.1, axis_name="data")
  with pytest.raises(ValueError, match="axis_name"):
    tx.update(None, tx.init(params), params, objective=obj, batch=batch)


def test_state_exposes_the_clean_loss():
  """state.loss: the clean batch loss of the objective path (1-SAM: see
  above), NaN with grad_fn (which returns no loss) and before any update;
  float32, or the params' dtype if wider."""
  obj, params, batch = nonlinear_problem()
  g = jax.grad(obj.loss)(params, batch)
  for dtype, want in ((jnp.bfloat16, jnp.float32), (jnp.float64, jnp.float64)):
    state = sj.sam(0.1).init({"w": jnp.ones(3, dtype)})
    assert state.loss.dtype == want and jnp.isnan(state.loss)
  for name in ("l-sam", "sam"):
    tx = sj.sam(0.1, **VARIANTS[name])
    _, state = tx.update(
      g, tx.init(params), params, **extra_args(name, obj, batch)
    )
    if name in USES_GRAD_FN:
      assert jnp.isnan(state.loss)
    else:
      np.testing.assert_allclose(state.loss, obj.loss(params, batch), 1e-15)


def test_axis_name_is_harmless_with_gradients_already_reduced():
  """Replicated params under shard_map: jax.grad of a pmean'ed loss is
  already the global gradient on every device; axis_name changes nothing."""
  obj, params, _ = nonlinear_problem()
  batch = (jax.random.normal(jax.random.key(3), (16, D)), jnp.arange(16) % 3)
  tx = sj.sam(0.2, axis_name=parallel.DATA)
  loss_fn = lambda p, b: jax.lax.pmean(obj.loss(p, b), parallel.DATA)
  local = lambda p, b: _step(tx, "sam", obj, p, b, loss_fn)[0]
  u = _on_8_devices(local)(params, batch)
  u_ref, _ = jax.jit(lambda p, b: _step(sj.sam(0.2), "sam", obj, p, b))(
    params, batch
  )
  chex.assert_trees_all_close(u, u_ref, rtol=1e-12, atol=1e-15)
