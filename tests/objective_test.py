"""sam_jax.objective: the per-example losses against optax and closed
forms, bad labels (NaN inside jit instead of raising); flax variables dicts
recognised by their structure whatever wraps `model.apply` (only `params`
differentiated unless `trainable=` says otherwise); and bad params or
batches named in one line on every path."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sam_jax as sj

B, K = 4, 3


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _logits():
  return jax.random.normal(jax.random.key(0), (B, K))


def _loss_and_grad(labels):
  """Mean CE and its gradient w.r.t. the logits, jitted (labels traced)."""
  fn = lambda z, y: jnp.mean(sj.softmax_cross_entropy(z, y))
  return jax.jit(jax.value_and_grad(fn))(_logits(), jnp.asarray(labels))


def test_softmax_cross_entropy_valid_labels_match_optax():
  z, y = _logits(), jnp.array([0, 2, 1, 2])
  want = optax.softmax_cross_entropy_with_integer_labels(z, y)
  np.testing.assert_array_equal(sj.softmax_cross_entropy(z, y), want)
  loss, grad = _loss_and_grad(y)
  ref = lambda z: jnp.mean(
    optax.softmax_cross_entropy_with_integer_labels(z, y)
  )
  np.testing.assert_array_equal(loss, ref(z))
  np.testing.assert_array_equal(grad, jax.grad(ref)(z))
  # The residual is softmax(z) - onehot(y), over B for the mean.
  np.testing.assert_allclose(
    grad, (jax.nn.softmax(z) - jax.nn.one_hot(y, K)) / B, rtol=1e-14
  )


@pytest.mark.parametrize("bad", [K, -1, K + 5, -K])
def test_out_of_range_label_gives_nan_loss_and_nan_gradient(bad):
  """Label K used to give a NaN loss but a finite gradient, and -1 silently
  meant class K-1. Now both poison the loss and the gradient (of that
  example), so that a finiteness check stops training."""
  labels = [0, bad, 1, 2]
  per_example = jax.jit(sj.softmax_cross_entropy)(_logits(), jnp.array(labels))
  assert jnp.isnan(per_example[1])
  assert jnp.all(jnp.isfinite(per_example[jnp.array([0, 2, 3])]))
  loss, grad = _loss_and_grad(labels)
  assert jnp.isnan(loss)
  assert jnp.all(jnp.isnan(grad[1]))
  # The other examples keep their gradient.
  _, good = _loss_and_grad([0, 0, 1, 2])
  keep = jnp.array([0, 2, 3])
  np.testing.assert_array_equal(grad[keep], good[keep])


def test_bad_label_reaches_the_parameter_gradient():
  """Through a model: the parameter gradient is NaN, not merely the loss."""
  x = jax.random.normal(jax.random.key(1), (B, 5))
  w = jnp.ones((5, K)) * 0.1
  obj = sj.Objective(lambda w, x: x @ w, sj.softmax_cross_entropy)
  for labels, finite in (([0, 1, 2, 0], True), ([0, 1, K, 0], False)):
    loss, g = jax.jit(jax.value_and_grad(obj.loss))(w, (x, jnp.array(labels)))
    assert bool(jnp.isfinite(loss)) == finite
    assert bool(jnp.all(jnp.isfinite(g))) == finite
    assert finite or bool(jnp.all(jnp.isnan(g)))


def test_softmax_cross_entropy_checks_label_shape_and_dtype():
  with pytest.raises(ValueError, match="integer labels"):
    sj.softmax_cross_entropy(_logits(), jnp.zeros(B))
  with pytest.raises(ValueError, match="shape"):
    sj.softmax_cross_entropy(_logits(), jnp.zeros((B, 1), jnp.int32))


def test_softmax_cross_entropy_keeps_low_precision_dtypes():
  z = _logits().astype(jnp.bfloat16)
  out = sj.softmax_cross_entropy(z, jnp.array([0, 1, 2, K]))
  assert out.dtype == jnp.bfloat16
  assert jnp.isnan(out[3]) and jnp.all(jnp.isfinite(out[:3]))


def test_logistic_loss_and_mse_closed_forms():
  z = jnp.array([[0.5], [-2.0], [0.0]])
  t = jnp.array([1, -1, 1])
  np.testing.assert_allclose(
    sj.logistic_loss(z, t), np.log1p(np.exp(-np.array([0.5, 2.0, 0.0])))
  )
  np.testing.assert_allclose(
    sj.logistic_loss(z[:, 0], t), sj.logistic_loss(z, t)
  )
  with pytest.raises(ValueError, match="one logit"):
    sj.logistic_loss(jnp.zeros((3, 2)), t)
  y = jnp.arange(6.0).reshape(3, 2)
  np.testing.assert_allclose(
    sj.mse(jnp.zeros((3, 2)), y), 0.5 * jnp.sum(y**2, axis=1)
  )


# ----------------------------------------- flax variables dicts (trainable)


class _BNNet(nn.Module):
  """Dense -> BatchNorm -> Dense with a `train` flag: the model a researcher
  wraps (`functools.partial(model.apply, train=...)`)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(4)(x)
    h = nn.BatchNorm(use_running_average=not train)(h)
    return nn.Dense(K)(jnp.tanh(h))


def _bn_problem():
  x = jax.random.normal(jax.random.key(1), (8, 3))
  y = jnp.arange(8) % K
  model = _BNNet()
  variables = model.init(jax.random.key(0), x)
  # Move the running averages off their init, so eval mode uses them.
  _, upd = model.apply(
    variables, x * 2 + 1, train=True, mutable=["batch_stats"]
  )
  return model, {**variables, **upd}, (x, y)


def _params_only(model, variables, **kw):
  state = {k: v for k, v in variables.items() if k != "params"}
  return sj.Objective(
    lambda p, x: model.apply({**state, "params": p}, x, **kw),
    sj.softmax_cross_entropy,
  )


@pytest.mark.parametrize("wrap", ["partial", "lambda"])
def test_wrapped_linen_apply_differentiates_params_only_in_eval_mode(wrap):
  """`functools.partial(model.apply, train=False)` or a lambda: the variables
  dict is recognised by its structure, batch_stats get zero gradients and
  the params' gradient is that of the params-only objective, for n-SAM and
  1-SAM (BatchNorm on running averages: the fast path applies)."""
  model, variables, batch = _bn_problem()
  apply = (
    functools.partial(model.apply, train=False)
    if wrap == "partial"
    else lambda v, x: model.apply(v, x, train=False)
  )
  obj = sj.Objective(apply, sj.softmax_cross_entropy)
  ref = _params_only(model, variables, train=False)
  for group_size in (None, 1):
    loss, grads = sj.sam_gradient(
      obj, variables, batch, 0.05, group_size=group_size
    )
    want_loss, want = sj.sam_gradient(
      ref, variables["params"], batch, 0.05, group_size=group_size
    )
    assert set(grads) == {"params", "batch_stats"}
    assert all(not jnp.any(g) for g in jax.tree.leaves(grads["batch_stats"]))
    chex.assert_trees_all_close(grads["params"], want, rtol=1e-12)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-12)
  assert sj.fast_path(obj, variables, batch, group_size=1)
  # An optax step moves the params, never the running statistics.
  tx = optax.chain(sj.sam(0.05, group_size=1), optax.sgd(0.1))
  updates, _ = tx.update(
    None, tx.init(variables), variables, objective=obj, batch=batch
  )
  new = optax.apply_updates(variables, updates)
  chex.assert_trees_all_equal(new["batch_stats"], variables["batch_stats"])


def test_wrapped_linen_apply_in_training_mode_n_sam_and_1_sam_refused():
  """Training mode (batch statistics): n-SAM differentiates params only;
  groups smaller than the batch are refused (BatchNorm mixes them)."""
  model, variables, batch = _bn_problem()
  train = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0]
  obj = sj.Objective(train, sj.softmax_cross_entropy)
  ref = _params_only(model, variables, train=True, mutable=["batch_stats"])
  ref = ref._replace(apply_fn=lambda p, x, f=ref.apply_fn: f(p, x)[0])
  _, grads = sj.sam_gradient(obj, variables, batch, 0.05)
  _, want = sj.sam_gradient(ref, variables["params"], batch, 0.05)
  chex.assert_trees_all_close(grads["params"], want, rtol=1e-12)
  assert all(not jnp.any(g) for g in jax.tree.leaves(grads["batch_stats"]))
  with pytest.raises(ValueError, match="BatchNorm.*mixes the examples"):
    sj.sam_gradient(obj, variables, batch, 0.05, group_size=1)


def test_trainable_names_the_collections_and_none_means_every_leaf():
  model, variables, batch = _bn_problem()
  apply = functools.partial(model.apply, train=False)
  every = sj.Objective(apply, sj.softmax_cross_entropy, trainable=None)
  _, grads = sj.sam_gradient(every, variables, batch, 0.05)
  assert any(jnp.any(g) for g in jax.tree.leaves(grads["batch_stats"]))
  both = sj.Objective(
    apply, sj.softmax_cross_entropy, trainable=("params", "batch_stats")
  )
  _, g2 = sj.sam_gradient(both, variables, batch, 0.05)
  chex.assert_trees_all_close(g2, grads, rtol=1e-12)
  bad = sj.Objective(apply, sj.softmax_cross_entropy, trainable=("weights",))
  with pytest.raises(ValueError, match="trainable=.*weights"):
    sj.sam_gradient(bad, variables, batch, 0.05)
  # Not a variables dict: a plain dict with a "params" array is all params.
  plain = {"params": jnp.ones((3, K)), "bias": jnp.zeros(K)}
  obj = sj.Objective(
    lambda p, x: x @ p["params"] + p["bias"], sj.softmax_cross_entropy
  )
  _, g = sj.sam_gradient(obj, plain, batch, 0.05)
  assert jnp.any(g["bias"])


# ------------------------------------------ bad input names its argument


def test_a_module_or_a_bad_leaf_where_params_go_is_named():
  model, variables, batch = _bn_problem()
  obj = sj.Objective(
    functools.partial(model.apply, train=False), sj.softmax_cross_entropy
  )
  with pytest.raises(TypeError, match="params must be the model's variables"):
    sj.sam_gradient(obj, model, batch, 0.05)
  net = nnx.Linear(3, K, rngs=nnx.Rngs(0))
  nnx_obj = sj.Objective.from_nnx(net, sj.softmax_cross_entropy)
  with pytest.raises(TypeError, match="nnx.state"):
    sj.sam_gradient(nnx_obj, net, batch, 0.05)
  with pytest.raises(TypeError, match=r"params\['params'\].*int32"):
    ints = {**variables, "params": {"w": jnp.ones(3, jnp.int32)}}
    sj.sam_gradient(obj, ints, batch, 0.05)
  with pytest.raises(TypeError, match="params.*nnx.state"):
    sj.hvp(nnx_obj, net, batch, net)


def test_empty_or_malformed_batches_are_named_on_every_path():
  model, variables, batch = _bn_problem()
  obj = sj.Objective(
    functools.partial(model.apply, train=False), sj.softmax_cross_entropy
  )
  x, y = batch
  empty = (x[:0], y[:0])
  with pytest.raises(ValueError, match="batch is empty"):
    obj.loss(variables, empty)
  # The grad_fn idiom of sj.sam: the user's gradient of obj.loss raises.
  tx = sj.sam(0.05)
  grad_fn = lambda p: jax.grad(obj.loss)(p, empty)
  with pytest.raises(ValueError, match="batch is empty"):
    tx.update(
      grad_fn(variables), tx.init(variables), variables, grad_fn=grad_fn
    )
  params = variables["params"]
  ref = _params_only(model, variables, train=False)
  for fn in (sj.hvp, sj.gnvp, sj.nmevp):
    with pytest.raises(ValueError, match="batch must be a tuple"):
      fn(ref, params, {"x": x, "y": y}, params)
    with pytest.raises(ValueError, match="batch is empty"):
      fn(ref, params, empty, params)
