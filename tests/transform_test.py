"""The optax transform `sam_jax.sam`: peers, contract, numerics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

import sam_jax as sj

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
  # A non-finite batch: wrapped in apply_if_finite, the step is skipped and
  # counted, parameters stay finite and unchanged.
  bad = (batch[0].at[0, 0].set(jnp.nan), batch[1])
  bad_grad_fn = jax.grad(lambda w: obj.loss(w, bad))
  safe = optax.apply_if_finite(tx, max_consecutive_errors=3)
  w0 = jnp.zeros(D)
  state = safe.init(w0)
  u, state = safe.update(bad_grad_fn(w0), state, w0, grad_fn=bad_grad_fn)
  w1 = optax.apply_updates(w0, u)
  assert jnp.all(w1 == w0)
  assert int(state.notfinite_count) == 1


def test_transform_with_objective_equals_sam_gradient():
  obj, params, batch = nonlinear_problem()
  for variant in sj.VARIANTS:
    tx = sj.sam(0.1, variant=variant)
    grads = jax.grad(obj.loss)(params, batch)
    u, _ = tx.update(grads, tx.init(params), params, objective=obj, batch=batch)
    _, want = sj.sam_gradient(obj, params, batch, 0.1, variant=variant)
    chex.assert_trees_all_close(u, want, rtol=1e-13)
