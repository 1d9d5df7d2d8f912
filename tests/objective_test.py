"""The per-example losses of sam_jax.objective: values against optax and
closed forms, and bad labels, which inside jit give NaN instead of raising."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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
