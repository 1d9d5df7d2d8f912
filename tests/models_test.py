"""Tests for sam_jax.models: shapes, features, activation field, init."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax import activations, models
from sam_jax.objective import softmax_cross_entropy

B, L, K = 5, 40, 3


# Compiled init: eager flax init dispatches (and compiles) op by op.
_init = jax.jit(models.init_params, static_argnums=0)


def _apply(model, params, x, return_features=False):
  return model.apply({"params": params}, x, return_features=return_features)


def _x(shape=(B, L)):
  return jax.random.normal(jax.random.key(1), shape)


ALL = ["mlp", "cnn", "two-layer-linear", "linear"]


@pytest.mark.parametrize("name", ALL)
def test_shapes_and_features_are_the_head_input(name):
  model = models.tiny(name, num_classes=K)
  x = _x()
  params = _init(model, jax.random.key(0), x)
  logits = _apply(model, params, x)
  logits2, feats = models.features_fn(model)(params, x)
  assert logits.shape == (B, K)
  assert feats.ndim == 2 and feats.shape[0] == B
  np.testing.assert_array_equal(logits, logits2)
  head = params["head"]
  ref = feats @ head["kernel"] + head.get("bias", 0.0)
  # float32 matmul of width <= 40: a few ulps of O(1) logits.
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)


def test_cnn_default_architecture():
  model = models.CNN1D()
  x = jax.ShapeDtypeStruct((2, 40), jnp.float32)
  init = lambda k, x: models.init_params(model, k, x)
  params = jax.eval_shape(init, jax.random.key(0), x)
  # 40 -> 20 -> 10 -> 5 after three stride-2 convs of 32 channels.
  assert params["conv2"]["kernel"].shape == (5, 32, 32)
  assert params["dense0"]["kernel"].shape == (5 * 32, 64)
  assert params["head"]["kernel"].shape == (64, 10)
  logits, feats = jax.eval_shape(
    lambda p, x: model.apply({"params": p}, x, return_features=True),
    params,
    x,
  )
  assert logits.shape == (2, 10) and feats.shape == (2, 64)


def test_cnn_input_layouts():
  model = models.tiny("cnn", num_classes=K)
  x = _x()
  params = _init(model, jax.random.key(0), x)
  # [B, L] and [B, L, 1] are the same input.
  np.testing.assert_array_equal(
    _apply(model, params, x), _apply(model, params, x[..., None])
  )
  with pytest.raises(ValueError, match="CNN1D"):
    _apply(model, params, x[None, ..., None])


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_activation_field_is_used(name):
  x = _x()
  relu = models.tiny(name, num_classes=K, activation=nn.relu)
  gelu = models.tiny(name, num_classes=K, activation=activations.get("gelu"))
  params = _init(relu, jax.random.key(0), x)
  out_relu = _apply(relu, params, x)
  out_gelu = _apply(gelu, params, x)
  assert float(jnp.max(jnp.abs(out_relu - out_gelu))) > 1e-4
  # relu-synthetic-nme has ReLU's forward pass exactly.
  synth = models.tiny(
    name, num_classes=K, activation=activations.get("relu-synthetic-nme")
  )
  np.testing.assert_array_equal(_apply(synth, params, x), out_relu)


@pytest.mark.parametrize("name", ALL)
def test_deterministic_init(name):
  model = models.tiny(name, num_classes=K)
  x = _x()
  p1 = _init(model, jax.random.key(0), x)
  p2 = _init(model, jax.random.key(0), x)
  p3 = _init(model, jax.random.key(7), x)
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  assert not np.array_equal(p1["head"]["kernel"], p3["head"]["kernel"])


def test_two_layer_linear_is_vwx():
  model = models.TwoLayerLinear(3, num_classes=2)
  x = _x()
  p = _init(model, jax.random.key(0), x)
  assert set(p) == {"hidden", "head"} and "bias" not in p["head"]
  ref = x @ p["hidden"]["kernel"] @ p["head"]["kernel"]
  np.testing.assert_allclose(_apply(model, p, x), ref, rtol=1e-5)


def test_make_objective():
  model = models.tiny("mlp", num_classes=K)
  x = _x()
  y = jnp.arange(B) % K
  p = _init(model, jax.random.key(0), x)
  obj = models.make_objective(model, softmax_cross_entropy)
  logits = _apply(model, p, x)
  log_p = jax.nn.log_softmax(logits)
  ref = -jnp.mean(log_p[jnp.arange(B), y])
  np.testing.assert_allclose(obj.loss(p, (x, y)), ref, rtol=1e-6)
  assert models.num_params(p) == (L * 4 + 4) + (4 * 4 + 4) + (4 * K + K)


def test_tiny_unknown_name():
  with pytest.raises(ValueError, match="valid"):
    models.tiny("resnet")
