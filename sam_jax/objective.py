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
  """
  if labels_B.ndim != 1 or not jnp.issubdtype(labels_B.dtype, jnp.integer):
    raise ValueError(
      "softmax_cross_entropy expects integer labels of shape [B], got "
      f"dtype {labels_B.dtype} shape {labels_B.shape}"
    )
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxK, labels_B)


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
  """

  apply_fn: Callable[[Params, Array], Array]
  loss_fn: Callable[[Array, Array], Array]
  apply_with_aux: Optional[Callable[[Params, Array], tuple[Array, Any]]] = None

  def apply_and_aux(self, params: Params, x: Array) -> tuple[Array, Any]:
    """`(logits, aux)` of one pass; aux is None without `apply_with_aux`."""
    if self.apply_with_aux is None:
      return self.apply_fn(params, x), None
    return self.apply_with_aux(params, x)

  def loss_and_aux(self, params: Params, batch: Batch) -> tuple[Array, Any]:
    """`(L(w), aux)` from one pass (see `apply_and_aux`)."""
    x, y = batch
    logits, aux = self.apply_and_aux(params, x)
    return jnp.mean(self.loss_fn(logits, y)), aux

  def per_example_loss(self, params: Params, batch: Batch) -> Array:
    """Per-example losses `l(f(w, x_i), y_i)`, shape [B]."""
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
