"""Tests for sam_jax.methods' state-aware gradients (BatchNorm).

Every method's train step moves the running averages by the clean pass of
its own gradient; it must equal the two-pass step it replaces (the method's
gradient, then a separate clean forward at the unperturbed params), and
compile to one clean forward pass.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sam_jax import methods, models, train
from sam_jax.objective import softmax_cross_entropy

IMG, K, LR = (4, 8, 8, 3), 3, 0.1

# method label -> config fields (besides method).
METHODS = {
  "sgd": {},
  "sam": dict(rho=0.05),
  "asam": dict(method="sam", rho=0.05, adaptive=True),
  "m-sam": dict(method="sam", rho=0.05, group_size=2),
  "l-sam": dict(rho=0.05),
  "j-sam": dict(rho=0.05),
  "sgd+reg": dict(lambda_w=0.1, lambda_a=0.1),
  "penalty": dict(rho=0.05),
  "penalty-gn": dict(rho=0.05, squared=True),
  "weight-noise": dict(sigma=0.01),
  "trace-h": dict(sigma=0.1),
  "trace-gn": dict(sigma=0.1),
}


def _config(label):
  fields = dict(method=label, rho=0.0, group_size=None, adaptive=False)
  fields.update(batch_size=IMG[0], model=dict(norm="batch"))
  fields.update(METHODS[label])
  return ml_collections.ConfigDict(fields)


@functools.lru_cache(maxsize=None)
def _net(norm):
  """Stem and one residual block: three BatchNorms, the residual path."""
  return models.ResNet18(
    widths=(2,), blocks_per_stage=1, num_classes=K, norm=norm, num_groups=2
  )


def _data(dtype):
  x = jax.random.normal(jax.random.key(1), IMG, dtype)
  return x, jnp.arange(IMG[0]) % K


def _init(norm, dtype):
  x, _ = _data(dtype)
  params, state = models.init(_net(norm), jax.random.key(0), x)
  cast = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)
  return cast(params), cast(state)


def _two_pass_step(config, model, params, model_state, batch, key):
  """The step before the change, written out: the method's stateless
  gradient, SGD, and the running averages of a separate clean
  training-mode pass at the unperturbed params (flax's own update)."""
  grad_fn = methods.make_grad_fn(config, model, softmax_cross_entropy)
  loss, grads = grad_fn(params, batch, key)
  _, new_state = model.apply(
    {"params": params, **model_state}, batch[0], mutable=["batch_stats"]
  )
  new_params = jax.tree.map(lambda p, g: p - LR * g, params, grads)
  return loss, new_params, dict(new_state)


@pytest.mark.parametrize("label", list(METHODS))
def test_step_equals_gradient_then_separate_state_pass(label):
  with jax.enable_x64(True):
    model, config = _net("batch"), _config(label)
    params, state = _init("batch", jnp.float64)
    batch, tx = _data(jnp.float64), optax.sgd(LR)
    step = jax.jit(train.make_train_step(config, model, tx))
    s0 = train.TrainState(
      jnp.zeros([], jnp.int32), params, tx.init(params), state
    )
    key = jax.random.key(3)
    new, out = step(s0, batch, key)
    folded = jax.random.fold_in(key, 0)  # the step folds in its counter
    loss, params1, state1 = jax.jit(
      functools.partial(_two_pass_step, config, model)
    )(params, state, batch, folded)
    close = lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-12, atol=1e-12
    )
    jax.tree.map(close, (new.params, new.model_state), (params1, state1))
    close(out["loss"], loss)
    # The state moved (momentum 0.9 from mean 0) and is float64 throughout.
    means = [v["norm"]["mean"] for v in new.model_state["batch_stats"].values()]
    assert all(m.dtype == jnp.float64 for m in means)
    assert min(float(jnp.max(jnp.abs(m))) for m in means) > 0


def _num_convs(step, state, batch):
  hlo = jax.jit(step).lower(state, batch, jax.random.key(0)).compile()
  return hlo.as_text().count("convolution(")


@pytest.mark.parametrize("label", ["sgd", "sam", "sgd+reg", "penalty-gn"])
def test_batchnorm_step_compiles_one_clean_pass(label):
  model, config, tx = _net("batch"), _config(label), optax.sgd(LR)
  params, state = _init("batch", jnp.float32)
  step = train.make_train_step(config, model, tx)
  opt = tx.init(params)
  zero = jnp.zeros([], jnp.int32)
  with_state = train.TrainState(zero, params, opt, state)
  # The same network and gradient with no state to update.
  without = train.TrainState(zero, params, opt, {})
  batch = _data(jnp.float32)
  assert _num_convs(step, with_state, batch) == _num_convs(step, without, batch)


def test_stateless_model_runs_the_plain_gradient():
  # Bitwise: a stateless model's step is the method's gradient, as before.
  model, config, tx = models.tiny("mlp", K), _config("sam"), optax.sgd(LR)
  x = jax.random.normal(jax.random.key(1), (4, 6))
  batch = (x, jnp.arange(4) % K)
  params, state = models.init(model, jax.random.key(0), x)
  assert state == {}
  grad_fn = methods.make_grad_fn(config, model, softmax_cross_entropy)

  def plain_step(s, batch, key):
    loss, grads = grad_fn(s.params, batch, jax.random.fold_in(key, s.step))
    updates, _ = tx.update(grads, s.opt_state, s.params)
    return optax.apply_updates(s.params, updates), loss

  s0 = train.TrainState(jnp.zeros([], jnp.int32), params, tx.init(params), {})
  key = jax.random.key(3)
  new, out = jax.jit(train.make_train_step(config, model, tx))(s0, batch, key)
  params1, loss = jax.jit(plain_step)(s0, batch, key)
  jax.tree.map(np.testing.assert_array_equal, new.params, params1)
  np.testing.assert_array_equal(out["loss"], loss)
  assert new.model_state == {}


def test_state_grad_fn_falls_back_for_plain_methods(monkeypatch):
  # A registered method that is not state-aware gets a separate clean pass.
  name = "test-plain-sgd"

  def factory(config, model, loss_fn):
    loss = models.make_objective(model, loss_fn).loss
    return lambda p, batch, key: jax.value_and_grad(loss)(p, batch)

  # Registered for this test only (monkeypatch restores the registry).
  monkeypatch.setitem(methods._REGISTRY, name, methods.Method(factory, None))
  model = _net("batch")
  params, state = _init("batch", jnp.float32)
  batch = _data(jnp.float32)
  config = _config("sgd")
  config.method = name
  fn = methods.make_state_grad_fn(config, model, softmax_cross_entropy)
  _, _, new = jax.jit(fn)(params, batch, jax.random.key(0), state)
  expected = models.update_state(model, params, state, batch[0])
  moved = jax.tree.map(
    lambda a, b: float(jnp.max(jnp.abs(a - b))), expected, state
  )
  assert min(jax.tree.leaves(moved)) > 0
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  jax.tree.map(close, new, expected)
