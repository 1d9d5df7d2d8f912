"""Training methods as gradient functions, selected by name from a config.

A method turns a model and its loss into one gradient function

  grad_fn(params, batch, key) -> (loss, grads)

where `loss` is the clean mean data loss at `params` (what is logged, for
every method) and `grads` the direction handed to the optimizer. The trainer
(`sam_jax.train`) has one step for all of them; a method is a config value.

  sgd       grads of L(w)
  sam       SAM (PAPERS.md A1): n-SAM (`group_size` None), m-SAM, 1-SAM
            (`group_size` 1); `adaptive` for ASAM. Radius `rho`.
  l-sam     logit-only SAM `J(w)^T r(w+eps)` (A2), any `group_size`.
  j-sam     Jacobian-only SAM `J(w+eps)^T r(w)` (A2), any `group_size`.
  sgd+reg   the cheap alternative of A5:
            L + lambda_w ||V_head||^2 + lambda_a mean_i ||phi(x_i)||^2.
  penalty, penalty-gn, weight-noise, trace-h, trace-gn
            the penalties of B3-B4 (`sam_jax.regularizers`), reading the
            config fields of `REGULARIZER_FIELDS`.

More methods plug in by name with `register`; the factory reads its own
hyperparameters from the config and may validate them.

Models with BatchNorm: every gradient here is taken in training mode (batch
statistics; `models.make_objective`), and the running averages move only by
the statistics of the clean full-batch pass at the unperturbed `params`,
never by SAM's perturbed pass or weight noise. `make_state_grad_fn` gives

  state_grad_fn(params, batch, key, model_state)
      -> (loss, grads, new model_state)

Every built-in method (registered `state_aware`) takes the new state from
the clean forward pass its gradient runs anyway: the pass of `grad L(w)`
(sgd, sam/ASAM, l-sam, j-sam, penalty), of the clean logits (penalty-gn,
sgd+reg's features), or of the clean loss `L(w)` that is logged (weight
noise, whose gradient is at `w + delta`; trace-h, trace-gn). m-SAM has no
full-batch clean pass (each group is normalised with its own statistics),
and plug-in methods are not state-aware: for them the state comes from a
separate clean pass, `models.update_state`. Per-example SAM (`group_size`
1) with BatchNorm is ill-defined and raises. A stateless model
(`model_state == {}`) runs the plain `grad_fn`, unchanged.
"""

import math
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax

from sam_jax import models, regularizers
from sam_jax.objective import Batch, Objective, Params
from sam_jax.sam import sam_gradient

Array = jax.Array
GradFn = Callable[[Params, Batch, Array], tuple[Array, Params]]
StateGradFn = Callable[
  [Params, Batch, Array, models.ModelState],
  tuple[Array, Params, models.ModelState],
]
LossFn = Callable[[Array, Array], Array]
Factory = Callable[[Any, nn.Module, LossFn], GradFn]


class Method(NamedTuple):
  """A registered method: its gradient-function factory and its checks.

  `make(config, model, loss_fn) -> grad_fn`; `validate(config)` raises
  ValueError naming the offending `config.<field>` (or is None).
  `state_aware`: `grad_fn(params, batch, key, model_state)` with a
  non-empty model state returns `(loss, grads, new_state)`, new_state from
  the method's own clean full-batch pass at `params` (None if it has none).
  """

  make: Factory
  validate: Optional[Callable[[Any], None]]
  state_aware: bool = False


_REGISTRY: dict[str, Method] = {}


def register(
  name: str,
  *,
  validate: Optional[Callable[[Any], None]] = None,
  state_aware: bool = False,
) -> Callable[[Factory], Factory]:
  """Decorator registering `factory(config, model, loss_fn) -> grad_fn`.

  `state_aware`: see `Method`; otherwise a BatchNorm model's state is
  updated by a separate clean pass.
  """

  def deco(factory: Factory) -> Factory:
    if name in _REGISTRY:
      raise ValueError(f"method {name!r} is already registered")
    _REGISTRY[name] = Method(factory, validate, state_aware)
    return factory

  return deco


def names() -> tuple[str, ...]:
  """The registered method names."""
  return tuple(_REGISTRY)


def validate(config: Any) -> None:
  """Checks `config.method` and that method's own fields.

  Raises:
    ValueError: naming the field, for an unknown method or a bad value.
  """
  if config.method not in _REGISTRY:
    raise ValueError(
      f"config.method: unknown method {config.method!r}; valid: {names()}"
    )
  check = _REGISTRY[config.method].validate
  if check is not None:
    check(config)


def make_grad_fn(config: Any, model: nn.Module, loss_fn: LossFn) -> GradFn:
  """The gradient function of `config.method` for `model` and `loss_fn`."""
  validate(config)
  return _REGISTRY[config.method].make(config, model, loss_fn)


def make_state_grad_fn(
  config: Any, model: nn.Module, loss_fn: LossFn
) -> StateGradFn:
  """`(params, batch, key, model_state) -> (loss, grads, new model_state)`.

  A stateless model (`{}`) runs `make_grad_fn`'s function as it is. With a
  model state (BatchNorm), a state-aware method returns the state of its
  clean full-batch pass at `params`; otherwise (m-SAM, plug-ins) it comes
  from a separate clean pass (`models.update_state`), with the same result.
  """
  grad_fn = make_grad_fn(config, model, loss_fn)
  state_aware = _REGISTRY[config.method].state_aware

  def state_grad_fn(params, batch, key, model_state):
    if not model_state:
      return (*grad_fn(params, batch, key), model_state)
    new_state = None
    if state_aware:
      loss, grads, new_state = grad_fn(params, batch, key, model_state)
    else:
      loss, grads = grad_fn(params, batch, key)
    if new_state is None:
      new_state = models.update_state(model, params, model_state, batch[0])
    return loss, grads, new_state

  return state_grad_fn


def _outputs(out: tuple[Any, Params], model_state: Any) -> tuple:
  """`(loss, grads)`, or `(loss, grads, aux)` from `((loss, aux), grads)`
  when called with a model state."""
  if not model_state:
    return out
  (loss, aux), grads = out
  return loss, grads, aux


def _nonneg(config: Any, field: str) -> None:
  value = config[field]
  if not isinstance(value, (int, float)) or not (
    math.isfinite(value) and value >= 0
  ):
    raise ValueError(
      f"config.{field} must be a finite number >= 0, got {value}"
    )


def _check_sam(config: Any) -> None:
  _nonneg(config, "rho")
  g = config.group_size
  if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
    raise ValueError(f"config.group_size must be None or an int >= 1, got {g}")
  if g is not None and config.batch_size % g:
    raise ValueError(
      f"config.group_size={g} must divide config.batch_size={config.batch_size}"
    )


@register("sgd", state_aware=True)
def _sgd(config: Any, model: nn.Module, loss_fn: LossFn) -> GradFn:
  del config

  def grad_fn(params: Params, batch: Batch, key: Array, model_state=None):
    del key
    obj = models.make_objective(model, loss_fn, model_state)
    out = jax.value_and_grad(obj.loss_and_aux, has_aux=True)(params, batch)
    (loss, aux), grads = out
    return (loss, grads, aux) if model_state else (loss, grads)

  return grad_fn


def _check_per_example_norm(config: Any, model: nn.Module) -> None:
  """1-SAM perturbs each example alone; BatchNorm couples the batch."""
  if config.group_size == 1 and getattr(model, "norm", None) == "batch":
    raise ValueError(
      f"config.method={config.method!r} with config.group_size=1 "
      "(per-example SAM) is ill-defined with config.model.norm='batch': "
      "BatchNorm mixes the examples of a batch. Use config.model.norm="
      "'layer' or 'group' (the paper swaps BatchNorm for LayerNorm)."
    )


def _sam_factory(variant: str) -> Factory:
  def factory(config: Any, model: nn.Module, loss_fn: LossFn) -> GradFn:
    _check_per_example_norm(config, model)
    rho, group_size, adaptive = config.rho, config.group_size, config.adaptive

    def grad_fn(params: Params, batch: Batch, key: Array, model_state=None):
      del key
      obj: Objective = models.make_objective(model, loss_fn, model_state)
      out = sam_gradient(
        obj,
        params,
        batch,
        rho,
        variant=variant,
        group_size=group_size,
        adaptive=adaptive,
        has_aux=bool(model_state),
        # m-SAM with BatchNorm: each group uses its own statistics, as
        # per-device SAM does (group_size 1 is refused above).
        ghost_batch_norm=True,
      )
      return _outputs(out, model_state)

    return grad_fn

  return factory


_SAM_VARIANTS = {"sam": "sam", "l-sam": "logit", "j-sam": "jacobian"}
for _name, _variant in _SAM_VARIANTS.items():
  register(_name, validate=_check_sam, state_aware=True)(_sam_factory(_variant))


# Regularisers of sam_jax.regularizers (A5, B3, B4), each a method by its
# own name; the config fields each one reads (missing optional ones take the
# regulariser's default).
REGULARIZER_FIELDS = {
  "sgd+reg": ("lambda_w", "lambda_a"),
  "penalty": ("rho", "squared"),
  "penalty-gn": ("rho", "squared"),
  "weight-noise": ("sigma",),
  "trace-h": ("sigma", "num_probes"),
  "trace-gn": ("sigma", "num_probes", "estimator"),
}
_REQUIRED_FIELDS = ("rho", "sigma")


def _check_regularizer(name: str) -> Callable[[Any], None]:
  def check(config: Any) -> None:
    for field in REGULARIZER_FIELDS[name]:
      if field not in config:
        if field in _REQUIRED_FIELDS:
          raise ValueError(f"config.{field} is required by method {name!r}")
        continue
      value = config[field]
      if field == "num_probes" and not (
        isinstance(value, int) and not isinstance(value, bool) and value >= 1
      ):
        raise ValueError(f"config.num_probes must be an int >= 1, got {value}")
      elif field == "squared" and not isinstance(value, bool):
        raise ValueError(f"config.squared must be a bool, got {value!r}")
      elif field == "estimator" and not isinstance(value, str):
        # The value itself is checked by sam_jax.regularizers.gn_trace.
        raise ValueError(f"config.estimator must be a str, got {value!r}")
      elif field not in ("num_probes", "squared", "estimator"):
        _nonneg(config, field)

  return check


def _regularizer_factory(name: str) -> Factory:
  def factory(config: Any, model: nn.Module, loss_fn: LossFn) -> GradFn:
    hparams = {f: config[f] for f in REGULARIZER_FIELDS[name] if f in config}

    def grad_fn(params: Params, batch: Batch, key: Array, model_state=None):
      out = regularizers.regularized_gradient(
        name,
        models.make_objective(model, loss_fn, model_state),
        params,
        batch,
        key,
        features_fn=models.features_fn(model, model_state),
        has_aux=bool(model_state),
        **hparams,
      )
      return _outputs(out, model_state)

    return grad_fn

  return factory


for _name in REGULARIZER_FIELDS:
  register(_name, validate=_check_regularizer(_name), state_aware=True)(
    _regularizer_factory(_name)
  )
