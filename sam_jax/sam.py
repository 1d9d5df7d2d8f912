"""SAM, its granularity (n-, m-, 1-SAM) and its logit/Jacobian split.

One code path computes every variant (PAPERS.md A1, A2). For each group of
examples (the whole batch for n-SAM, groups of m for m-SAM, single examples
for 1-SAM) with clean logits `z = f(w, x)` and residual `r = dl/dz`:

  g   = J(w)^T r(w)                     clean group gradient
  eps = rho g / ||g||                   (adaptive: rho T^2 g / ||T g||)
  sam      : J(w+eps)^T r(w+eps)
  logit    : J(w)^T     r(w+eps)        L-SAM, logit-scale effect only
  jacobian : J(w+eps)^T r(w)            J-SAM, Jacobian effect only

Both factors come from `jax.vjp`, so every variant costs two passes. The group
gradients are averaged (never summed). For 1-SAM on models built from
`nn.Dense`/`nn.Conv` (and per-example normalisers: LayerNorm, GroupNorm; not
BatchNorm, which mixes examples) a fast path (`sam_jax.per_example`) injects the
per-example perturbations into the layers instead of running one backward
pass per example; the general per-group path below is its reference.
"""

import math
import warnings
import weakref
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sam_jax import objective, per_example
from sam_jax.objective import Batch, Objective, Params, trainable

VARIANTS = ("sam", "logit", "jacobian")


def global_norm(tree: Any) -> jax.Array:
  """Euclidean norm of a pytree, accumulated in at least float32.

  Scaled before squaring: `s ||x / s||` with `s` the largest `|x|`, so that
  neither a tiny gradient (below ~1e-19 the float32 squares underflow to 0)
  nor a huge one (above ~1e19 they overflow) loses its norm. A NaN entry
  gives NaN, an infinite one inf, the zero tree 0.
  """
  leaves = [x for x in jax.tree.leaves(tree) if jnp.size(x)]
  if not leaves:
    return jnp.zeros([], jnp.float32)
  acc = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
  leaves = [jnp.asarray(x).astype(acc) for x in leaves]
  # `s ||x / s||` equals `||x||` for every fixed s > 0, so holding s fixed
  # (stop_gradient) leaves every derivative exact.
  top = jax.lax.stop_gradient(
    jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves]))
  )
  scale = jnp.where(jnp.isfinite(top) & (top > 0), top, 1.0).astype(acc)
  sq = sum(jnp.sum(jnp.square(x / scale)) for x in leaves)
  # sqrt has an infinite derivative at 0: select a safe branch instead, so
  # that double backprop through the norm (gradient penalties) stays finite.
  # A NaN sum of squares stays NaN (it is reported, not hidden).
  positive = sq > 0
  return scale * jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), sq)


def _is_usable(norm: jax.Array) -> jax.Array:
  return (norm > 0) & jnp.isfinite(norm)


def safe_inverse(norm: jax.Array) -> jax.Array:
  """`1/norm`, or 0 where the norm is zero or not finite (never NaN).

  Selected with `jnp.where` on a safe denominator, so neither branch nor its
  derivative produces NaN.
  """
  ok = _is_usable(norm)
  return jnp.where(ok, 1.0 / jnp.where(ok, norm, 1.0), 0.0)


def _scale(tree: Any, norm: jax.Array, factor: Any) -> Any:
  """`factor * x / norm` leafwise, exactly 0 where the norm is unusable.

  Divides (`x / norm <= 1`) rather than multiplying by `1 / norm`, which
  overflows for a norm below float32's smallest normal number.
  """
  ok = _is_usable(norm)
  safe = jnp.where(ok, norm, 1.0)
  return jax.tree.map(
    lambda x, f: jnp.where(ok, f * (x / safe), 0.0).astype(x.dtype),
    tree,
    factor,
  )


def dual_vector(grads: Any) -> Any:
  """Solution of `max_{||e|| <= 1} <g, e>`: `g / ||g||`.

  Exactly 0 when g is zero or not finite: a bad gradient must never move the
  perturbed point to NaN.
  """
  ones = jax.tree.map(lambda _: 1.0, grads)
  return _scale(grads, global_norm(grads), ones)


def ascent_direction(
  grads: Any,
  params: Params,
  rho: float | jax.Array,
  *,
  adaptive: bool = False,
  eta: float = 0.01,
) -> Any:
  """SAM's perturbation `eps` (Foret et al.; ASAM, Kwon et al. 2021).

  Plain: `eps = rho g / ||g||`. Adaptive: `eps = rho T^2 g / ||T g||` with
  `T = |w| + eta` elementwise. `eps = 0` when the gradient is zero or not
  finite, so no NaN ever enters the perturbed point. The norm is accumulated
  in float32 even for bfloat16 gradients.
  """
  if not adaptive:
    return jax.tree.map(lambda d: (rho * d).astype(d.dtype), dual_vector(grads))
  scale = jax.tree.map(lambda w: jnp.abs(w) + eta, params)
  tg = jax.tree.map(lambda t, g: t * g, scale, grads)
  t2 = jax.tree.map(lambda t: rho * t * t, scale)
  return _scale(grads, global_norm(tg), t2)


def _add(a: Any, b: Any) -> Any:
  return jax.tree.map(lambda x, y: x + y.astype(x.dtype), a, b)


def select_variant(
  variant: str,
  clean: tuple[jax.Array, Callable],
  perturbed: tuple[jax.Array, Callable],
  residual_fn: Callable[[jax.Array], jax.Array],
) -> Any:
  """Combines the clean and perturbed passes into the variant's gradient.

  Args:
    variant: "sam", "logit" or "jacobian".
    clean: `(r(w), vjp of f at w)` with r already scaled for the mean loss.
    perturbed: `(z(w+eps), vjp of f at w+eps)`.
    residual_fn: logits -> scaled residual.
  """
  r_clean, vjp_clean = clean
  z_pert, vjp_pert = perturbed
  residual = r_clean if variant == "jacobian" else residual_fn(z_pert)
  vjp_fn = vjp_clean if variant == "logit" else vjp_pert
  return vjp_fn(jax.lax.stop_gradient(residual))


def _group_sam_gradient(
  obj: Objective,
  params: Params,
  x: jax.Array,
  y: jax.Array,
  rho: Any,
  variant: str,
  adaptive: bool,
  eta: float,
  clean_grads: Optional[Any] = None,
  has_aux: bool = False,
) -> tuple[Any, Any]:
  """SAM gradient of one group (its mean loss), any variant.

  `has_aux`: the loss is `(loss, aux)` with aux that of the clean pass.
  """
  apply = lambda p: obj.apply_fn(p, x)
  # aux is None for an objective without apply_with_aux.
  z, vjp_clean, aux = jax.vjp(
    lambda p: obj.apply_and_aux(p, x), params, has_aux=True
  )
  loss, r = obj.residual(z, y)
  unwrap = lambda fn: lambda u: fn(u)[0]
  if clean_grads is None:
    clean_grads = unwrap(vjp_clean)(r)
  eps = ascent_direction(clean_grads, params, rho, adaptive=adaptive, eta=eta)
  z_pert, vjp_pert = jax.vjp(apply, _add(params, eps))
  grads = select_variant(
    variant,
    (r, unwrap(vjp_clean)),
    (z_pert, unwrap(vjp_pert)),
    lambda z_: obj.residual(z_, y)[1],
  )
  return ((loss, aux) if has_aux else loss), grads


class FastPathWarning(UserWarning):
  """m-SAM / 1-SAM fell back from the fast path to one pass per group."""


class FastPath(NamedTuple):
  """Whether `sam_gradient` with groups takes the fast path, and why not.

  Attributes:
    applies: the fast path (`sam_jax.per_example`) would run.
    reason: why not (the layer, the parameter or the argument), else None.
  """

  applies: bool
  reason: Optional[str]

  def __bool__(self) -> bool:
    return self.applies


FAST_CHOICES = ("auto", True, False)


def _check_args(variant: str, group_size: Any, batch_size: int, fast) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  if not any(fast is c for c in FAST_CHOICES) and fast != "auto":
    raise ValueError(f"fast must be 'auto', True or False, got {fast!r}")
  check_group_size(group_size)
  if group_size is not None and batch_size % group_size:
    raise ValueError(
      f"group_size={group_size} must divide the batch size {batch_size}"
    )


def check_group_size(group_size: Any) -> None:
  """None (n-SAM) or a Python int >= 1 (m-SAM; 1: 1-SAM)."""
  if group_size is None:
    return
  if not isinstance(group_size, int) or isinstance(group_size, bool):
    raise ValueError(
      "group_size must be None or a Python int (with "
      "optax.inject_hyperparams pass static_args=('group_size',)), got "
      f"{group_size!r}"
    )
  if group_size < 1:
    raise ValueError(f"group_size must be >= 1, got {group_size}")


def _fast_path(
  obj: Objective,
  params: Params,
  x: Any,
  group_size: int,
  adaptive: bool,
  ghost_batch_norm: bool = False,
) -> tuple[FastPath, Optional[per_example.Plan]]:
  """The plan and the verdict for groups of group_size (< B)."""
  plan = per_example.plan(obj.apply_fn, params, x)
  if plan.mixes is not None:
    if ghost_batch_norm and group_size > 1:
      return FastPath(False, f"ghost_batch_norm: {plan.mixes}"), None
    raise ValueError(
      f"group_size={group_size} is smaller than the batch, but {plan.mixes}, "
      "which mixes the examples of the batch: no group has a gradient of "
      "its own. Use group_size=None (n-SAM), the layer's running averages "
      "(evaluation mode), a per-example norm (LayerNorm, GroupNorm), or, "
      "for groups of 2 or more, ghost_batch_norm=True (each group "
      "normalised by its own statistics, as per-device SAM does)"
    )
  if adaptive:
    return FastPath(False, "adaptive=True (ASAM) has no fast path"), None
  if not plan.applies:
    return FastPath(False, plan.reason), None
  return FastPath(True, None), plan


def fast_path(
  obj: Objective,
  params: Params,
  batch: Batch,
  *,
  group_size: int = 1,
  adaptive: bool = False,
) -> FastPath:
  """Does `sam_gradient(..., group_size=group_size)` take the fast path?

  Returns a `FastPath` (truthy when it does) with the reason when it does
  not: the layer or parameter the fast path does not cover. Raises the
  `ValueError` `sam_gradient` would raise (e.g. BatchNorm with batch
  statistics and groups smaller than the batch). Runs the model abstractly
  (`jax.eval_shape`): no computation.
  """
  batch_size = objective.batch_size(batch)
  _check_args("sam", group_size, batch_size, "auto")
  if group_size >= batch_size:
    return FastPath(False, "group_size >= batch size: n-SAM, no groups")
  obj, params = trainable(obj, params)[:2]
  return _fast_path(obj, params, batch[0], group_size, adaptive)[0]


_warned: "weakref.WeakKeyDictionary[Any, set]" = weakref.WeakKeyDictionary()


def _warn_once(obj: Objective, reason: str) -> None:
  """One FastPathWarning per objective (its apply_fn) and reason."""
  try:
    seen = _warned.setdefault(obj.apply_fn, set())
  except TypeError:  # not weak-referenceable: warn every time
    seen = set()
  if reason in seen:
    return
  seen.add(reason)
  warnings.warn(
    f"sam_jax: group SAM takes the general path (one backward pass per "
    f"group, much slower) because {reason}. sj.fast_path(obj, params, "
    "batch) says why; fast=False silences this, fast=True raises.",
    FastPathWarning,
    stacklevel=4,
  )


def sam_gradient(
  obj: Objective,
  params: Params,
  batch: Batch,
  rho: float | jax.Array,
  *,
  variant: str = "sam",
  group_size: Optional[int] = None,
  adaptive: bool = False,
  eta: float = 0.01,
  clean_grads: Optional[Any] = None,
  fast: bool | str = "auto",
  has_aux: bool = False,
  ghost_batch_norm: bool = False,
) -> tuple[Any, Any]:
  """The SAM gradient of the batch loss, in any variant and granularity.

  Args:
    obj: the model/loss split.
    params: parameters `w`: any pytree, a flax linen variables dict (only
      its 'params' collection is perturbed and differentiated; the other
      collections are state and get zero gradients), or an NNX
      `nnx.Param` state (with `Objective.from_nnx`).
    batch: `(x, y)` with leading batch axis B.
    rho: perturbation radius >= 0 (may be traced, e.g. scheduled).
    variant: "sam" `J(w+e)^T r(w+e)`, "logit" (L-SAM) `J(w)^T r(w+e)` or
      "jacobian" (J-SAM) `J(w+e)^T r(w)` (PAPERS.md A2).
    group_size: None for n-SAM (one `e` from the batch gradient), m for
      m-SAM (groups of m, one `e` each), 1 for 1-SAM (per example). Must
      divide B. Group gradients are averaged. Groups smaller than the batch
      on a model with BatchNorm in training mode raise a ValueError (see
      ghost_batch_norm).
    adaptive: ASAM perturbation `rho T^2 g/||T g||`, `T = |w| + eta`.
    eta: ASAM's offset, > 0.
    clean_grads: optional precomputed clean batch gradient; only used for
      n-SAM (group_size None or B), to avoid recomputing it.
    fast: groups (m-SAM, 1-SAM) through the layer-injection fast path
      (`sam_jax.per_example`) when the model is built from the layers it
      covers. "auto": fall back to one pass per group with one
      `FastPathWarning` per objective naming the reason; True: raise
      instead; False: always the general path, silently.
    has_aux: also return the aux of `obj.apply_with_aux` from the clean
      pass at `w` (n-SAM and the fast path), e.g. a BatchNorm model's new
      state; None for the general group path, whose clean passes are per
      group.
    ghost_batch_norm: allow m-SAM (group_size >= 2) on a model with
      BatchNorm in training mode: each group is normalised by its own batch
      statistics (one pass per group, the general path).

  Returns:
    `(loss, grads)`: the clean batch loss at `w` and the averaged group
    gradients at their perturbed points; `((loss, aux), grads)` with
    `has_aux`.
  """
  batch_size = objective.batch_size(batch)
  _check_args(variant, group_size, batch_size, fast)
  rho = _radius(check_rho(rho), check_eta(eta), adaptive)
  obj, params, rebuild, select = trainable(obj, params)
  if clean_grads is not None:
    clean_grads = select(clean_grads)
  x, y = batch
  if group_size is None or group_size == batch_size:
    out, grads = _group_sam_gradient(
      obj, params, x, y, rho, variant, adaptive, eta, clean_grads, has_aux
    )
    return out, rebuild(grads)
  verdict, plan = _fast_path(
    obj, params, x, group_size, adaptive, ghost_batch_norm
  )
  if fast is False:
    verdict, plan = None, None
  if plan is not None:
    out, grads = per_example.sam_gradient(
      obj, params, batch, rho, variant, plan.layers, group_size, has_aux
    )
    return out, rebuild(grads)
  if verdict is not None and not verdict.reason.startswith("ghost"):
    if fast is True:
      raise ValueError(f"fast=True, but no fast path: {verdict.reason}")
    _warn_once(obj, verdict.reason)
  num_groups = batch_size // group_size
  split = lambda a: a.reshape((num_groups, group_size) + a.shape[1:])
  group_fn = lambda xg, yg: _group_sam_gradient(
    obj, params, xg, yg, rho, variant, adaptive, eta
  )
  losses, grads = jax.vmap(group_fn)(
    jax.tree.map(split, x), jax.tree.map(split, y)
  )
  loss = jnp.mean(losses)
  grads = rebuild(jax.tree.map(lambda g: jnp.mean(g, 0), grads))
  return ((loss, None) if has_aux else loss), grads


AxisName = Any  # a str, or a tuple of str: a mapped axis (shard_map, pmap)

_CHAIN_HINT = (
  "sj.sam is chained before the optimizer: "
  "optax.chain(sj.sam(rho), optax.sgd(lr))"
)


def _is_transformation(value: Any) -> bool:
  """An optax GradientTransformation, or an object like one (MultiSteps)."""
  return isinstance(value, optax.GradientTransformation) or (
    hasattr(value, "init") and hasattr(value, "update")
  )


def _check_number(value: Any, name: str, *, strict: bool) -> None:
  """A finite real scalar, `> 0` (strict) or `>= 0`; traced ones pass."""
  if isinstance(value, jax.core.Tracer):
    return  # inside jit: cannot be checked (sam() maps bad ones to NaN)
  dtype = getattr(value, "dtype", None)
  numeric = isinstance(value, (int, float)) or (
    dtype is not None
    and (
      jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
    )
  )
  if isinstance(value, bool) or not numeric:
    raise TypeError(f"{name} must be a number, got {type(value).__name__}")
  if jnp.ndim(value) != 0:
    raise TypeError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
  v = float(value)
  if not (math.isfinite(v) and (v > 0 if strict else v >= 0)):
    bound = "> 0" if strict else ">= 0"
    raise ValueError(f"{name} must be finite and {bound}, got {v}")


def check_rho(
  rho: Any, *, name: str = "rho", allow_schedule: bool = False
) -> Any:
  """Raises unless `rho` is a SAM radius; returns it unchanged.

  A finite number >= 0: a Python number or a concrete jax/NumPy scalar (a
  traced one cannot be checked and is accepted); with `allow_schedule`, also
  an optax schedule (a callable of the step count). TypeError for the wrong
  kind (an optax transformation in particular), ValueError for a bad value.
  """
  if _is_transformation(rho):
    if allow_schedule:
      raise TypeError(
        f"{name} must be a number or a schedule, got a "
        f"GradientTransformation; {_CHAIN_HINT}"
      )
    raise TypeError(f"{name} must be a number, got a GradientTransformation")
  if callable(rho):
    if allow_schedule:
      return rho
    raise TypeError(
      f"{name} must be a number here, got the schedule {rho!r}: evaluate it "
      "at the step count (sj.sam(rho=schedule) does)"
    )
  _check_number(rho, name, strict=False)
  return rho


def check_eta(eta: Any) -> Any:
  """Raises unless ASAM's offset `eta` is finite and > 0; returns it."""
  _check_number(eta, "eta", strict=True)
  return eta


def nan_unless_valid(value: Any, strict: bool = False) -> Any:
  """Inside jit nothing raises: a traced rho that is negative or not finite
  (with `strict`, an eta that is not > 0) becomes NaN, which makes the
  gradient NaN for `optax.apply_if_finite` or the trainer's finiteness
  check. A concrete value (already checked) is returned as it is."""
  if not isinstance(value, jax.core.Tracer):
    return value
  ok = jnp.isfinite(value) & ((value > 0) if strict else (value >= 0))
  return jnp.where(ok, value, jnp.nan)


def _radius(rho: Any, eta: Any, adaptive: bool) -> Any:
  """rho, NaN if it is traced and bad, or if ASAM's traced eta is not > 0
  (whose NaN eps alone would be zeroed, giving SGD without a word)."""
  rho = nan_unless_valid(rho)
  if adaptive and isinstance(eta, jax.core.Tracer):
    rho = jnp.where(jnp.isnan(nan_unless_valid(eta, strict=True)), jnp.nan, rho)
  return rho


def _loss_dtype(params: Params) -> Any:
  leaves = jax.tree.leaves(params)
  if not leaves:
    return jnp.float32
  return jnp.promote_types(jnp.result_type(*leaves), jnp.float32)


class SamState(NamedTuple):
  """State of `sam`.

  Attributes:
    count: [] int32, the updates so far (a schedule rho is evaluated at it).
    loss: [] the clean batch loss at the params of the last update, when
      it was computed (the `objective=, batch=` path; the mean over the
      devices with `axis_name`); NaN with `grad_fn=` and before the first
      update. float32, or the params' dtype if wider.
  """

  count: jax.Array
  loss: jax.Array


def sam(
  rho: optax.ScalarOrSchedule = 0.05,
  *,
  variant: str = "sam",
  group_size: Optional[int] = None,
  adaptive: bool = False,
  eta: float = 0.01,
  axis_name: Optional[AxisName] = None,
  ghost_batch_norm: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """SAM as an optax transform that turns the clean gradient into SAM's.

  Chain it before the base optimizer::

    tx = optax.chain(sj.sam(rho=0.05), optax.sgd(0.1, momentum=0.9))
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)

  `grad_fn(params) -> grads` evaluates the gradient of the same batch; it
  suffices for plain n-SAM (and adaptive). Variants that need the logits
  (logit, jacobian, or any group_size) take `objective=obj, batch=batch`
  instead. n-SAM (group_size None or B) takes its perturbation from the
  incoming clean gradient `updates`; on the objective path (without
  axis_name) `updates` may be None, and the clean gradient is then the
  objective's own pass (an NNX model with Dropout: the same masks as the
  perturbed pass, which a gradient from `nnx.value_and_grad(model)` does
  not share). Groups (m-/1-SAM) recompute it per group and ignore
  `updates` (only its dtypes are kept): pass None (or zeros) rather than
  computing a clean gradient nobody uses; `sj.sam_gradient` followed by
  any optax optimizer is the same computation. `state.loss` holds the clean
  batch loss of the objective path.

  Composition: sj.sam replaces the incoming gradient by the SAM gradient, so
  a transform chained before it only shapes eps (n-SAM's direction; eps is
  invariant to the gradient's scale, so `clip_by_global_norm` before sj.sam
  does nothing, weight decay before it only tilts eps) and never reaches the
  update. Clipping and weight decay go after sj.sam:
  `chain(sj.sam(rho), clip_by_global_norm(c), add_decayed_weights(wd),
  sgd(lr))`, or `chain(sj.sam(rho), adamw(lr, weight_decay=wd))`. Gradient
  accumulation goes after it too: `chain(sj.sam(rho), MultiSteps(sgd(lr),
  k))` applies the mean of the k per-micro-batch SAM gradients (the other
  way round, `MultiSteps(chain(sj.sam(rho), sgd(lr)), k)`, perturbs the last
  micro-batch along the mean clean gradient and applies only its gradient).
  sj.sam after the optimizer (`chain(sgd(lr), sj.sam(rho))`) cannot be
  detected: it perturbs along the lr-scaled, sign-flipped update and returns
  a raw gradient as the update (gradient ascent).

  Args:
    rho: the radius >= 0, a number or an optax schedule of the count of
      this transform's updates (micro-batches under MultiSteps), like an
      optax learning rate. `optax.inject_hyperparams(sj.sam,
      static_args=("group_size",))(rho=...)` works too. Validated here; an
      optax transformation is a TypeError (sj.sam wraps no optimizer).
    variant: "sam", "logit" (L-SAM) or "jacobian" (J-SAM).
    group_size: None (n-SAM), or an int >= 1 (m-SAM; 1: 1-SAM).
    adaptive: ASAM's perturbation; `eta` (> 0) its offset.
    eta: see adaptive.
    axis_name: for data-parallel callers inside shard_map or pmap, whose
      `updates` and `grad_fn`/`batch` are per-device: n-SAM takes eps from
      the `pmean` of the clean gradient, and the SAM gradient (and loss)
      is `pmean`ed over the axis, so that every replica gets the result of
      the global batch on one device (m-/1-SAM: groups within each device's
      batch). Without it, each device would perturb along its own gradient
      and the replicas drift apart.
    ghost_batch_norm: m-SAM on a model with BatchNorm in training mode,
      each group normalised by its own statistics (see `sam_gradient`).

  rho = 0 returns the incoming gradient's base updates exactly
  (`w + 0 = w`). To skip non-finite steps put `optax.apply_if_finite` after
  sj.sam, around the optimizer: `chain(sj.sam(rho), apply_if_finite(
  sgd(lr), n))`; wrapped around the chain it checks only the incoming
  gradient, which group variants ignore (zeros pass) and which misses a
  non-finite perturbed pass.
  """
  check_rho(rho, allow_schedule=True)
  if callable(rho):
    check_rho(rho(jnp.zeros([], jnp.int32)), name="rho(0) of the schedule")
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  check_group_size(group_size)
  check_eta(eta)
  if axis_name is None:
    pmean = lambda tree: tree
  else:
    pmean = lambda tree: jax.lax.pmean(tree, axis_name)

  def init_fn(params: Params) -> SamState:
    return SamState(
      count=jnp.zeros([], jnp.int32),
      loss=jnp.full([], jnp.nan, _loss_dtype(params)),
    )

  def update_fn(
    updates: Any,
    state: SamState,
    params: Optional[Params] = None,
    *,
    grad_fn: Optional[Callable[[Params], Any]] = None,
    objective: Optional[Objective] = None,
    batch: Optional[Batch] = None,
    **extra_args: Any,
  ) -> tuple[Any, SamState]:
    del extra_args
    if params is None:
      raise ValueError("sam needs params (pass them to update)")
    rho_t = rho(state.count) if callable(rho) else rho
    if not isinstance(rho_t, jax.core.Tracer):  # eager: raise, as elsewhere
      check_rho(
        rho_t, name=f"rho({int(state.count)})" if callable(rho) else "rho"
      )
    local_size = None if batch is None else jax.tree.leaves(batch)[0].shape[0]
    n_sam = group_size is None or group_size == local_size
    has_objective = objective is not None and batch is not None
    # None, or the empty state nnx.Optimizer makes of None.
    no_updates = updates is None or not jax.tree.leaves(updates)
    if n_sam and no_updates and not (has_objective and not axis_name):
      raise ValueError(
        "sam(group_size=None) is n-SAM, whose perturbation comes from the "
        "incoming clean gradient: pass it as updates, not None (None is "
        "allowed with objective= and batch= and no axis_name: the clean "
        "gradient is then the objective's own)"
      )
    loss = state.loss
    if has_objective:
      if no_updates or not n_sam:  # the objective's own clean pass
        clean = None
      elif group_size is None:  # n-SAM of the global batch
        clean = pmean(updates)
      else:  # group_size == local batch: that group's own gradient
        clean = updates
      loss, grads = sam_gradient(
        objective,
        params,
        batch,
        rho_t,
        variant=variant,
        group_size=group_size,
        adaptive=adaptive,
        eta=eta,
        clean_grads=clean,
        ghost_batch_norm=ghost_batch_norm,
      )
      loss, grads = pmean((loss, grads))
    elif grad_fn is not None:
      if variant != "sam" or group_size is not None:
        raise ValueError(
          f"sam(variant={variant!r}, group_size={group_size}) needs "
          "objective= and batch= extra args, not grad_fn="
        )
      # A traced rho (a schedule, inject_hyperparams) that is bad becomes
      # NaN, as sam_gradient does on the objective path.
      eps = ascent_direction(
        pmean(updates),
        params,
        _radius(rho_t, eta, adaptive),
        adaptive=adaptive,
        eta=eta,
      )
      grads = pmean(grad_fn(_add(params, eps)))
    else:
      raise ValueError(
        "sam needs grad_fn= (plain SAM) or objective= and batch= extra args"
      )
    # Group variants ignore updates (None, zeros, or the empty state that
    # nnx.Optimizer makes of None): the dtypes come from params.
    like = params if no_updates or not n_sam else updates
    grads = jax.tree.map(lambda g, u: g.astype(u.dtype), grads, like)
    return grads, SamState(
      count=optax.safe_increment(state.count),
      loss=jnp.asarray(loss).astype(state.loss.dtype),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
