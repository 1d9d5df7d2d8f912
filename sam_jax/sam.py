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

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sam_jax import per_example
from sam_jax.objective import Batch, Objective, Params

VARIANTS = ("sam", "logit", "jacobian")


def global_norm(tree: Any) -> jax.Array:
  """Euclidean norm of a pytree, accumulated in at least float32."""
  leaves = jax.tree.leaves(tree)
  acc = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
  sq = sum(jnp.sum(jnp.square(x.astype(acc))) for x in leaves)
  # sqrt has an infinite derivative at 0: select a safe branch instead, so
  # that double backprop through the norm (gradient penalties) stays finite.
  # A NaN sum of squares stays NaN (it is reported, not hidden).
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), sq)


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
  """`factor * x / norm` leafwise, exactly 0 where the norm is unusable."""
  ok, inv = _is_usable(norm), safe_inverse(norm)
  return jax.tree.map(
    lambda x, f: jnp.where(ok, f * inv * x, 0.0).astype(x.dtype), tree, factor
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


def _check_args(variant: str, group_size: Any, batch_size: int) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  if group_size is None:
    return
  if not isinstance(group_size, int) or isinstance(group_size, bool):
    raise ValueError(
      "group_size must be None or a Python int (with "
      "optax.inject_hyperparams pass static_args=('group_size',)), got "
      f"{group_size!r}"
    )
  if group_size < 1 or batch_size % group_size:
    raise ValueError(
      f"group_size={group_size} must be >= 1 and divide the batch size "
      f"{batch_size}"
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
  fast: bool = True,
  has_aux: bool = False,
) -> tuple[Any, Any]:
  """The SAM gradient of the batch loss, in any variant and granularity.

  Args:
    obj: the model/loss split.
    params: parameters `w`.
    batch: `(x, y)` with leading batch axis B.
    rho: perturbation radius (may be traced, e.g. scheduled).
    variant: "sam" `J(w+e)^T r(w+e)`, "logit" (L-SAM) `J(w)^T r(w+e)` or
      "jacobian" (J-SAM) `J(w+e)^T r(w)` (PAPERS.md A2).
    group_size: None for n-SAM (one `e` from the batch gradient), m for
      m-SAM (groups of m, one `e` each), 1 for 1-SAM (per example). Must
      divide B. Group gradients are averaged.
    adaptive: ASAM perturbation `rho T^2 g/||T g||`, `T = |w| + eta`.
    eta: ASAM's offset.
    clean_grads: optional precomputed clean batch gradient; only used for
      n-SAM (group_size None or B), to avoid recomputing it.
    fast: use the per-example fast path for 1-SAM when the model supports
      it (`sam_jax.per_example`); False forces the general path.
    has_aux: also return the aux of `obj.apply_with_aux` from the clean
      full-batch pass at `w` (n-SAM), e.g. a BatchNorm model's new state;
      None for m-SAM and 1-SAM, whose clean passes are per group.

  Returns:
    `(loss, grads)`: the clean batch loss at `w` and the averaged group
    gradients at their perturbed points; `((loss, aux), grads)` with
    `has_aux`.
  """
  x, y = batch
  batch_size = x.shape[0]
  _check_args(variant, group_size, batch_size)
  if group_size is None or group_size == batch_size:
    return _group_sam_gradient(
      obj, params, x, y, rho, variant, adaptive, eta, clean_grads, has_aux
    )
  loss, grads = _grouped_sam_gradient(
    obj, params, batch, rho, variant, group_size, adaptive, eta, fast
  )
  return ((loss, None) if has_aux else loss), grads


def _grouped_sam_gradient(
  obj, params, batch, rho, variant, group_size, adaptive, eta, fast
):
  """m-SAM and 1-SAM: `(loss, grads)` averaged over groups of group_size."""
  x, y = batch
  batch_size = x.shape[0]
  if group_size == 1 and fast and not adaptive:
    plan = per_example.plan(obj.apply_fn, params, x)
    if plan is not None:
      return per_example.sam_gradient(obj, params, batch, rho, variant, plan)
  num_groups = batch_size // group_size
  split = lambda a: a.reshape((num_groups, group_size) + a.shape[1:])
  group_fn = lambda xg, yg: _group_sam_gradient(
    obj, params, xg, yg, rho, variant, adaptive, eta
  )
  losses, grads = jax.vmap(group_fn)(split(x), split(y))
  return jnp.mean(losses), jax.tree.map(lambda g: jnp.mean(g, 0), grads)


class SamState(NamedTuple):
  """State of `sam`: nothing but the step count."""

  count: jax.Array  # [] int32


def sam(
  rho: float | jax.Array = 0.05,
  *,
  variant: str = "sam",
  group_size: Optional[int] = None,
  adaptive: bool = False,
  eta: float = 0.01,
) -> optax.GradientTransformationExtraArgs:
  """SAM as an optax transform that turns the clean gradient into SAM's.

  Chain it before any base optimizer::

    tx = optax.chain(sj.sam(rho=0.05), optax.sgd(0.1, momentum=0.9))
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)

  `grad_fn(params) -> grads` evaluates the gradient of the same batch; it
  suffices for plain n-SAM (and adaptive). Variants that need the logits
  (logit, jacobian, or any group_size) take `objective=obj, batch=batch`
  instead. For n-SAM the incoming clean gradient sets the perturbation; for
  m-/1-SAM it is recomputed per group. rho is a numeric hyperparameter, so
  `optax.inject_hyperparams(sam, static_args=("group_size",))(rho=sched)`
  schedules it. rho = 0 returns the incoming gradient's base updates exactly
  (`w + 0 = w`). Wrap the chain in `optax.apply_if_finite` to skip
  non-finite steps.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")

  def init_fn(params: Params) -> SamState:
    del params
    return SamState(count=jnp.zeros([], jnp.int32))

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
    if objective is not None and batch is not None:
      n_sam = group_size is None or group_size == batch[0].shape[0]
      _, grads = sam_gradient(
        objective,
        params,
        batch,
        rho,
        variant=variant,
        group_size=group_size,
        adaptive=adaptive,
        eta=eta,
        clean_grads=updates if n_sam else None,
      )
    elif grad_fn is not None:
      if variant != "sam" or group_size is not None:
        raise ValueError(
          f"sam(variant={variant!r}, group_size={group_size}) needs "
          "objective= and batch= extra args, not grad_fn="
        )
      eps = ascent_direction(updates, params, rho, adaptive=adaptive, eta=eta)
      grads = grad_fn(_add(params, eps))
    else:
      raise ValueError(
        "sam needs grad_fn= (plain SAM) or objective= and batch= extra args"
      )
    grads = jax.tree.map(lambda g, u: g.astype(u.dtype), grads, updates)
    return grads, SamState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
