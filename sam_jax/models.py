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

ResNet-18 and WideResNet (`sam_jax.resnet`, re-exported here) take a `norm`.
With BatchNorm a model has state besides its parameters, the `batch_stats`
collection; `model_state` below is the dict of such collections (`{}` for
every other model):

  params, model_state = init(model, key, x)
  make_objective / features_fn   training mode: batch statistics; the
                                 running averages are neither read nor
                                 written, so the objective is a function of
                                 params alone (SAM's perturbed pass cannot
                                 touch them)
  make_objective(model, loss_fn, model_state)
                                 the same objective, whose clean pass can
                                 also return the running averages moved by
                                 this batch's statistics (`apply_with_aux`
                                 of `Objective`): a method's gradient
                                 delivers the new state from the forward
                                 pass it runs anyway at the unperturbed
                                 params (`methods.make_state_grad_fn`)
  update_state(model, params, model_state, x)
                                 the running averages after a separate
                                 clean forward pass at `params` (the
                                 fallback for methods without a full-batch
                                 clean pass, e.g. m-SAM)
  eval_features_fn               evaluation: running averages
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sam_jax.objective import Objective
from sam_jax.resnet import NORMS, ResNet18, WideResNet  # noqa: F401

Array = jax.Array
Params = Any
ModelState = dict  # {collection name: pytree}; {} for stateless models
# Collections that hold model state and are updated by training.
STATE_COLLECTIONS = ("batch_stats",)


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


_TINY = ("mlp", "cnn", "two-layer-linear", "linear", "resnet18", "wrn")


def tiny(
  name: str,
  num_classes: int = 3,
  activation: Callable[[Array], Array] = nn.relu,
  norm: str = "layer",
) -> nn.Module:
  """A tiny model for tests (few parameters, dense Hessians are cheap).

  `mlp`: widths (4, 4); `cnn`: two conv layers of 2 channels, kernel 3, one
  dense layer of 4; `two-layer-linear`: hidden 3; `linear`; `resnet18`:
  the full ResNet-18 topology with widths (2, 2, 4, 4); `wrn`: WRN-10-1
  with base width 2 (widths 2/4/8). The residual nets take `norm` (GroupNorm
  with 2 groups); the linear models ignore `activation`.

  Raises:
    ValueError: unknown name.
  """
  if name in ("resnet18", "wrn"):
    net = dict(num_classes=num_classes, activation=activation, norm=norm)
    if name == "resnet18":
      return ResNet18(widths=(2, 2, 4, 4), num_groups=2, **net)
    return WideResNet(
      depth=10, widen_factor=1, base_width=2, num_groups=2, **net
    )
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


def init(model: nn.Module, key: Array, x: Array) -> tuple[Params, ModelState]:
  """`(params, model_state)`; x is a sample batch (only its shape matters
  for the parameters; BatchNorm's running averages start at mean 0, var 1).
  """
  variables = dict(model.init(key, x))
  params = variables.pop("params")
  return params, {k: variables[k] for k in STATE_COLLECTIONS if k in variables}


def init_params(model: nn.Module, key: Array, x: Array) -> Params:
  """`model.init(key, x)["params"]`; x is a sample batch (only its shape)."""
  return init(model, key, x)[0]


def train_apply(model: nn.Module, params: Params, x: Array, **kwargs) -> Any:
  """`model(params, x)` in training mode: BatchNorm uses batch statistics.

  The state collections are mutable (that selects the mode) and their
  updates are dropped: the result depends on `params` and `x` alone.
  """
  out, _ = model.apply(
    {"params": params}, x, mutable=STATE_COLLECTIONS, **kwargs
  )
  return out


def state_apply(
  model: nn.Module,
  params: Params,
  model_state: ModelState,
  x: Array,
  **kwargs,
) -> tuple[Any, ModelState]:
  """`(model(params, x), new model_state)` of one training-mode pass.

  The output equals `train_apply`'s; the state (BatchNorm) is moved towards
  this batch's statistics. `model_state` must not be empty.
  """
  variables = {"params": params, **model_state}
  out, new = model.apply(variables, x, mutable=tuple(model_state), **kwargs)
  return out, dict(new)


def update_state(
  model: nn.Module, params: Params, model_state: ModelState, x: Array
) -> ModelState:
  """The model state after a training-mode forward pass at `params` on `x`.

  For BatchNorm: running averages moved towards this batch's statistics.
  `{}` (stateless model) is returned as is, at no cost. This is a pass of
  its own; the trainer uses it only where the method's gradient has no
  full-batch clean pass to take the state from.
  """
  if not model_state:
    return model_state
  return state_apply(model, params, model_state, x)[1]


def make_objective(
  model: nn.Module,
  loss_fn: Callable[[Array, Array], Array],
  model_state: ModelState | None = None,
) -> Objective:
  """`Objective` with `apply_fn(p, x)` the model in training mode.

  With a non-empty `model_state` it also has `apply_with_aux(p, x) ->
  (logits, new model_state)` (`state_apply`): the same logits, and the
  state moved by the batch statistics of that pass.
  """
  apply_fn = lambda p, x: train_apply(model, p, x)
  if not model_state:
    return Objective(apply_fn, loss_fn)
  with_state = lambda p, x: state_apply(model, p, model_state, x)
  return Objective(apply_fn, loss_fn, with_state)


def features_fn(
  model: nn.Module, model_state: ModelState | None = None
) -> Callable[[Params, Array], Any]:
  """`(params, x) -> (logits [B, K], features [B, D])` for the penalties
  (training mode, like `make_objective`).

  With a non-empty `model_state`: `(params, x) -> ((logits, features),
  new model_state)`, the `has_aux` form of `regularizers.penalized_loss`.
  """
  if not model_state:
    return lambda p, x: train_apply(model, p, x, return_features=True)
  return lambda p, x: state_apply(
    model, p, model_state, x, return_features=True
  )


def eval_features_fn(
  model: nn.Module,
) -> Callable[[Params, Array, ModelState], Any]:
  """`(params, x, model_state) -> (logits, features)` for evaluation.

  BatchNorm normalises with the running averages, so the output of an
  example does not depend on the rest of the batch. Inside a jitted
  evaluation, bind the state with a closure for `sam_jax.metrics`:
  `make_evaluate(lambda p, x: fn(p, x, model_state), ...)`.
  """
  return lambda p, x, s: model.apply(
    {"params": p, **s}, x, return_features=True
  )


def num_params(params: Params) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(jnp.size(a)) for a in jax.tree.leaves(params))
