"""Classifiers (flax.linen) with the activation as a field and exposed features.

Contract shared by every model here:

  logits_BxK = model.apply({"params": p}, x)
  logits_BxK, features_BxD = model.apply({"params": p}, x, return_features=True)

`features` are the penultimate activations, the input of the last layer, an
`nn.Dense` named `"head"`: `logits = features @ p["head"]["kernel"] (+ bias)`.
They feed the feature-norm penalty and the last-layer norm of PAPERS.md A5.
Nonlinear models take `activation` (default `nn.relu`; see
`sam_jax.activations` for GELU, beta-GELU and the NME interventions of B3).
MLP and CNN1D have no normalisation layers, so per-example SAM (A1) and the
exact same-layer NME structure of ReLU nets (B2) hold as stated.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sam_jax.objective import Objective

Array = jax.Array
Params = Any


def _flatten(x: Array) -> Array:
  return x.reshape(x.shape[0], -1)


class MLP(nn.Module):
  """Fully connected net: `features` hidden widths, then the head.

  Inputs `[B, ...]` are flattened. With no hidden layers the features are the
  flattened inputs (a linear model).
  """

  features: Sequence[int] = (128, 128)
  num_classes: int = 10
  activation: Callable[[Array], Array] = nn.relu

  @nn.compact
  def __call__(self, x: Array, return_features: bool = False):
    h = _flatten(x)
    for i, width in enumerate(self.features):
      h = self.activation(nn.Dense(width, name=f"dense{i}")(h))
    logits = nn.Dense(self.num_classes, name="head")(h)
    return (logits, h) if return_features else logits


class CNN1D(nn.Module):
  """1-D convnet for MNIST-1D: strided convs, then dense layers, then head.

  Each conv has `kernel_size`, "SAME" padding and stride `stride`, so a
  length-40 input with three stride-2 layers ends at length 5. Inputs are
  `[B, L]` (one channel) or `[B, L, C]`.
  """

  channels: Sequence[int] = (32, 32, 32)
  kernel_size: int = 5
  stride: int = 2
  dense: Sequence[int] = (64,)
  num_classes: int = 10
  activation: Callable[[Array], Array] = nn.relu

  @nn.compact
  def __call__(self, x: Array, return_features: bool = False):
    if x.ndim == 2:
      x = x[..., None]
    if x.ndim != 3:
      raise ValueError(
        f"CNN1D expects x of shape [B, L] or [B, L, C], got {x.shape}"
      )
    h = x
    for i, c in enumerate(self.channels):
      conv = nn.Conv(
        c,
        (self.kernel_size,),
        strides=(self.stride,),
        padding="SAME",
        name=f"conv{i}",
      )
      h = self.activation(conv(h))
    h = _flatten(h)
    for i, width in enumerate(self.dense):
      h = self.activation(nn.Dense(width, name=f"dense{i}")(h))
    logits = nn.Dense(self.num_classes, name="head")(h)
    return (logits, h) if return_features else logits


class TwoLayerLinear(nn.Module):
  """Two-layer linear network `f = V W x` (PAPERS.md A4).

  `W` is `params["hidden"]["kernel"]` (shape [d, hidden]); `V` is
  `params["head"]["kernel"]` (shape [hidden, K]); features are `W x`.
  """

  hidden: int
  num_classes: int = 1
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: Array, return_features: bool = False):
    h = nn.Dense(self.hidden, use_bias=self.use_bias, name="hidden")(
      _flatten(x)
    )
    logits = nn.Dense(self.num_classes, use_bias=self.use_bias, name="head")(h)
    return (logits, h) if return_features else logits


class Linear(nn.Module):
  """Linear model `f = W x (+ b)` (PAPERS.md A3); features are the inputs."""

  num_classes: int = 1
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: Array, return_features: bool = False):
    h = _flatten(x)
    logits = nn.Dense(self.num_classes, use_bias=self.use_bias, name="head")(h)
    return (logits, h) if return_features else logits


_TINY = ("mlp", "cnn", "two-layer-linear", "linear")


def tiny(
  name: str,
  num_classes: int = 3,
  activation: Callable[[Array], Array] = nn.relu,
) -> nn.Module:
  """A tiny model for tests (few parameters, dense Hessians are cheap).

  `mlp`: widths (4, 4); `cnn`: two conv layers of 2 channels, kernel 3, one
  dense layer of 4; `two-layer-linear`: hidden 3; `linear`. The linear models
  ignore `activation`.

  Raises:
    ValueError: unknown name.
  """
  if name == "mlp":
    return MLP((4, 4), num_classes=num_classes, activation=activation)
  if name == "cnn":
    return CNN1D(
      (2, 2),
      kernel_size=3,
      dense=(4,),
      num_classes=num_classes,
      activation=activation,
    )
  if name == "two-layer-linear":
    return TwoLayerLinear(3, num_classes=num_classes)
  if name == "linear":
    return Linear(num_classes=num_classes)
  raise ValueError(f"unknown tiny model name {name!r}; valid: {_TINY}")


def init_params(model: nn.Module, key: Array, x: Array) -> Params:
  """`model.init(key, x)["params"]`; x is a sample batch (only its shape)."""
  return model.init(key, x)["params"]


def make_objective(
  model: nn.Module, loss_fn: Callable[[Array, Array], Array]
) -> Objective:
  """`Objective` for a parameter-only model: `apply_fn(p, x) = model(p, x)`."""
  return Objective(lambda p, x: model.apply({"params": p}, x), loss_fn)


def features_fn(model: nn.Module) -> Callable[[Params, Array], Any]:
  """`(params, x) -> (logits [B, K], features [B, D])` for the penalties."""
  return lambda p, x: model.apply({"params": p}, x, return_features=True)


def num_params(params: Params) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(jnp.size(a)) for a in jax.tree.leaves(params))
