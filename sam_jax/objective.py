"""The split point between a model and its loss.

Both papers reason about the chain `params -> logits -> per-example loss`:
SAM's logit/Jacobian split (PAPERS.md A2) perturbs one factor of
`J(w)^T r(w)`, and the Gauss-Newton/NME split (B1) separates the curvature of
the loss in logit space from the curvature of the model. `Objective` keeps the
two halves apart so that every product in `sam_jax` can be written once.

  apply_fn(params, x) -> logits [B, K]
  loss_fn(logits, y)  -> per-example loss [B]
  batch = (x, y)

An `Objective` may also carry `apply_with_aux(params, x) -> (logits, aux)`,
the same pass as `apply_fn` with a by-product (a BatchNorm model's updated
running averages, `sam_jax.models.make_objective`). Callers that ask for it
(`has_aux=True` of `sam_gradient`, `regularizers.penalized_loss`, ...) take
the aux of their clean pass at `params` instead of running another pass.
"""

from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
Params = Any
Batch = tuple[Array, Array]


def softmax_cross_entropy(logits_BxK: Array, labels_B: Array) -> Array:
  """Per-example softmax cross-entropy with integer labels.

  Residual: `dl/dz = softmax(z) - onehot(y)`; logit Hessian
  `diag(p) - p p^T`.

  A label outside [0, K) cannot raise inside jit; it gives that example a
  NaN loss and a NaN gradient (not class K-1 for -1, nor a NaN loss with a
  finite gradient for K), which the trainer's finiteness check reports.
  """
  if labels_B.ndim != 1 or not jnp.issubdtype(labels_B.dtype, jnp.integer):
    raise ValueError(
      "softmax_cross_entropy expects integer labels of shape [B], got "
      f"dtype {labels_B.dtype} shape {labels_B.shape}"
    )
  valid_B = (labels_B >= 0) & (labels_B < logits_BxK.shape[-1])
  nan_B = jnp.where(valid_B, 0.0, jnp.nan).astype(logits_BxK.dtype)
  return optax.softmax_cross_entropy_with_integer_labels(
    logits_BxK + nan_B[:, None], labels_B
  )


def logistic_loss(logits_Bx1: Array, signs_B: Array) -> Array:
  """Per-example binary logistic loss `-log sigmoid(t z)` with t in {-1, +1}.

  The model has one logit (shape [B, 1] or [B]); residual
  `dl/dz = -t sigmoid(-t z)` (PAPERS.md A3).
  """
  z_B = logits_Bx1.reshape(logits_Bx1.shape[0], -1)
  if z_B.shape[1] != 1:
    raise ValueError(
      f"logistic_loss expects one logit per example, got {logits_Bx1.shape}"
    )
  t_B = signs_B.astype(z_B.dtype)
  return jax.nn.softplus(-t_B * z_B[:, 0])


def mse(logits_BxK: Array, targets_BxK: Array) -> Array:
  """Per-example squared error `0.5 ||z - y||^2` (logit Hessian = identity)."""
  diff = (logits_BxK - targets_BxK).reshape(logits_BxK.shape[0], -1)
  return 0.5 * jnp.sum(diff**2, axis=-1)


class Objective(NamedTuple):
  """A model and a per-example loss on its logits.

  Attributes:
    apply_fn: `(params, x) -> logits [B, K]`.
    loss_fn: `(logits [B, K], y) -> per-example loss [B]`.
    apply_with_aux: optional `(params, x) -> (logits, aux)`, the logits of
      `apply_fn` and a by-product of the same pass (None: no aux).
    trainable: the collections of a flax variables dict that are
      differentiated (see `trainable`); default `("params",)`; None: every
      leaf of `params` is a parameter.
  """

  apply_fn: Callable[[Params, Array], Array]
  loss_fn: Callable[[Array, Array], Array]
  apply_with_aux: Optional[Callable[[Params, Array], tuple[Array, Any]]] = None
  trainable: Optional[tuple[str, ...]] = ("params",)

  @classmethod
  def from_nnx(
    cls, model: Any, loss_fn: Callable[[Array, Array], Array], wrt: Any = None
  ) -> "Objective":
    """An Objective of a flax NNX module, differentiable in its parameters.

    `apply_fn(params, x)` merges `params` (the `nnx.Param` state, exactly
    what `nnx.Optimizer(model, tx, wrt=nnx.Param)` hands to optax, or
    `nnx.state(model, nnx.Param)`) with the model's other state into a
    fresh copy of the model and calls it on x; the model itself is never
    mutated by a pass, so the objective works inside `jax.grad`, `vmap` and
    `nnx.jit`. `apply_with_aux` also returns the copy's new non-parameter
    state (BatchNorm running averages): apply it with
    `nnx.update(model, aux)`.

    Randomness (Dropout): construction forks the model's RNG streams once
    (each stream's count advances by one), and every pass of this
    objective draws from the fork. So the clean and the perturbed passes
    of one SAM step see the same dropout masks, and the next objective
    (build one per step, inside the train step) sees new ones. Create it
    where the model may be mutated: eagerly or in the `nnx.jit` function
    that receives the model.

    Args:
      model: an `nnx.Module` mapping x to logits.
      loss_fn: per-example loss on the logits.
      wrt: the trainable variable filter (default `nnx.Param`).
    """
    from flax import nnx  # noqa: PLC0415 -- linen users need not load nnx

    wrt = nnx.Param if wrt is None else wrt
    streams = [
      node
      for _, node in nnx.iter_graph(model)
      if isinstance(node, nnx.RngStream)
    ]
    saved = [(s.key[...], s.count[...]) for s in streams]
    for s, (key, count) in zip(streams, saved):
      s.key[...] = jax.random.fold_in(key, count)
      s.count[...] = jnp.zeros_like(count)
    graphdef, _, rest = nnx.split(model, wrt, ...)
    rest = nnx.as_pure(rest)
    for s, (key, count) in zip(streams, saved):
      s.key[...] = key
      s.count[...] = count + 1

    def apply_with_aux(params: Params, x: Array) -> tuple[Array, Any]:
      copy = nnx.merge(graphdef, params, rest)
      logits = copy(x)
      return logits, nnx.as_pure(nnx.split(copy, wrt, ...)[2])

    return cls(lambda p, x: apply_with_aux(p, x)[0], loss_fn, apply_with_aux)

  def apply_and_aux(self, params: Params, x: Array) -> tuple[Array, Any]:
    """`(logits, aux)` of one pass; aux is None without `apply_with_aux`."""
    if self.apply_with_aux is None:
      return self.apply_fn(params, x), None
    return self.apply_with_aux(params, x)

  def loss_and_aux(self, params: Params, batch: Batch) -> tuple[Array, Any]:
    """`(L(w), aux)` from one pass (see `apply_and_aux`)."""
    batch_size(batch)
    x, y = batch
    logits, aux = self.apply_and_aux(params, x)
    return jnp.mean(self.loss_fn(logits, y)), aux

  def per_example_loss(self, params: Params, batch: Batch) -> Array:
    """Per-example losses `l(f(w, x_i), y_i)`, shape [B]."""
    batch_size(batch)
    x, y = batch
    return self.loss_fn(self.apply_fn(params, x), y)

  def loss(self, params: Params, batch: Batch) -> Array:
    """Batch loss `L(w) = mean_i l(f(w, x_i), y_i)`."""
    return jnp.mean(self.per_example_loss(params, batch))

  def residual(self, logits: Array, y: Array) -> tuple[Array, Array]:
    """Mean loss and its gradient w.r.t. the logits, `r_i / B`.

    Returns `(mean loss, R)` with `R[i] = dl_i/dz_i / B`, so that
    `vjp(f, w)(R)` is the gradient of the batch loss. Works for any loss_fn.
    """
    mean_loss, vjp_fn = jax.vjp(lambda z: jnp.mean(self.loss_fn(z, y)), logits)
    (r,) = vjp_fn(jnp.ones_like(mean_loss))
    return mean_loss, r


def is_variables_dict(params: Params) -> bool:
  """A flax variables dict: a mapping of collections (each a mapping) with
  a top-level `params` collection beside at least one other (batch_stats,
  constants, ...), whatever the function that applies it."""
  return (
    isinstance(params, Mapping)
    and "params" in params
    and len(params) > 1
    and all(isinstance(c, Mapping) for c in params.values())
  )


def check_params(params: Params, name: str = "params") -> None:
  """Raises a TypeError naming `name` (and the leaf's path) unless `params`
  is a pytree of floating-point arrays: not a flax module (pass its
  variables), nor a tree with a string, integer or key leaf, which autodiff
  cannot perturb."""
  if callable(params):
    raise TypeError(
      f"{name} must be the model's variables, got the {type(params).__name__}"
      " itself: pass model.init(...) (linen) or nnx.state(model, nnx.Param) "
      "(NNX)"
    )
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    dtype = getattr(leaf, "dtype", None)
    if isinstance(leaf, float) or (
      dtype is not None and jnp.issubdtype(dtype, jnp.inexact)
    ):
      continue
    what = f"dtype {dtype}" if dtype is not None else type(leaf).__name__
    raise TypeError(
      f"{name}{jax.tree_util.keystr(path)} must be a floating-point array, "
      f"got {what}"
    )


class Trainable(NamedTuple):
  """The trainable part of `params` (`trainable`).

  Attributes:
    obj: the objective on the trainable part (the rest held fixed).
    params: the trainable part.
    rebuild: trainable-shaped gradients -> full structure (zeros for state).
    select: a full-structure tree (e.g. a clean gradient) -> its trainable
      part.
  """

  obj: Objective
  params: Params
  rebuild: Callable[[Any], Any]
  select: Callable[[Any], Any]


def trainable(obj: Objective, params: Params) -> Trainable:
  """The objective and parameters that sam_jax differentiates.

  The rule, in one sentence: when `params` is a flax variables dict (a
  mapping of collections with `params` beside others, `is_variables_dict`)
  only its `obj.trainable` collections (default `params`) are perturbed and
  differentiated, whatever `apply_fn` is (a bound `model.apply`, a
  `functools.partial` or a lambda around it), and the others (batch_stats,
  ...) are state that get zero gradients; `Objective(..., trainable=None)`
  makes every leaf a parameter. The trainable part is `params["params"]` (a
  dict of the collections when several are trainable); any other params
  are trainable as they are. Every function of sam_jax that differentiates
  goes through this, so the state is never perturbed, penalised or part of
  a spectrum. Raises (naming the leaf) if the trainable part is not a tree
  of floating-point arrays.
  """
  names = obj.trainable
  if names is None or not is_variables_dict(params):
    check_params(params)
    same = lambda tree: tree
    return Trainable(obj, params, same, same)
  names = (names,) if isinstance(names, str) else tuple(names)
  missing = [n for n in names if n not in params]
  if missing or not names:
    raise ValueError(
      f"Objective.trainable={obj.trainable!r} names collections the "
      f"variables dict does not have (it has {sorted(params)})"
    )
  if len(names) == 1:
    select = lambda tree: tree[names[0]]
    merge = lambda p: {names[0]: p}
  else:
    select = lambda tree: {n: tree[n] for n in names}
    merge = dict
  check_params(select(params), f"params[{names[0]!r}]")
  state = {k: v for k, v in params.items() if k not in names}
  full = lambda p: type(params)({**state, **merge(p)})
  apply_fn, with_aux = obj.apply_fn, obj.apply_with_aux
  obj = obj._replace(
    apply_fn=lambda p, x: apply_fn(full(p), x),
    apply_with_aux=None
    if with_aux is None
    else lambda p, x: with_aux(full(p), x),
    trainable=None,
  )

  def rebuild(grads):
    return full(grads) | {
      k: jax.tree.map(jnp.zeros_like, v) for k, v in state.items()
    }

  return Trainable(obj, select(params), rebuild, select)


def batch_size(batch: Any, name: str = "batch") -> int:
  """B of a batch `(x, y)`, after checking its structure; errors name
  the argument `name`."""
  if not isinstance(batch, (tuple, list)) or len(batch) != 2:
    raise ValueError(
      f"{name} must be a tuple (x, y), got {type(batch).__name__}"
      + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )
  sizes = {
    leaf.shape[0] if getattr(leaf, "ndim", 0) else None
    for leaf in jax.tree.leaves(batch)
  }
  if not sizes or None in sizes:
    raise ValueError(
      f"{name} (x, y) must hold arrays with a leading batch axis"
    )
  if len(sizes) > 1:
    raise ValueError(f"{name}: x and y disagree on the batch size: {sizes}")
  (size,) = sizes
  if size == 0:
    raise ValueError(f"{name} is empty (batch size 0)")
  return size
