"""Matrix-free curvature products through the model/loss split.

The Hessian of the batch loss `L(w) = mean_i l(f(w, x_i), y_i)` splits into
a Gauss-Newton and a nonlinear-modeling-error part (PAPERS.md B1):

  H = GN + NME,  GN = mean_i J_i^T H_z,i J_i,  NME = mean_i sum_k r_ik
  grad^2 z_ik,

with `J_i = dz_i/dw`, `H_z = d^2 l/dz^2` and residual `r = dl/dz`. All
products take and return parameter-shaped pytrees; nothing is flattened
except by the dense helpers for tiny models. Nothing here jits itself: the
caller wraps the product (or the Lanczos loop using it) in `jax.jit`.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import flatten_util

from sam_jax import objective
from sam_jax.objective import Batch, Objective

Array = jax.Array
Params = Any
MatVec = Callable[[Params], Params]


def hvp(obj: Objective, params: Params, batch: Batch, v: Params) -> Params:
  """Hessian-vector product `H v` of the batch loss, forward-over-reverse.

  `H v = jvp(grad L, (w,), (v,))` (PAPERS.md B1); costs about two
  gradients.
  """
  grad_fn = jax.grad(obj.loss)
  return jax.jvp(lambda w: grad_fn(w, batch), (params,), (v,))[1]


def logit_hessian_vp(
  loss_fn: Callable[[Array, Array], Array], z: Array, y: Array, u: Array
) -> Array:
  """Product with the Hessian of the MEAN loss in logit space, `H_z u / B`.

  Closed forms for `softmax_cross_entropy` (`H_z u = p*u - p (p.u)`) and
  `mse` (`H_z = I`); for any other loss, forward-over-reverse autodiff of
  `mean_i l(z_i, y_i)` in logit space (cheap: no model is involved).

  Args:
    loss_fn: per-example loss on logits, as in `Objective.loss_fn`.
    z: logits `[B, ...]`.
    y: targets.
    u: logit-shaped direction, e.g. `J v`.

  Returns:
    `H_z u / B`, logit-shaped, block diagonal over examples.
  """
  num_examples = z.shape[0]
  if loss_fn is objective.softmax_cross_entropy:
    p = jax.nn.softmax(z, axis=-1)
    pu = jnp.sum(p * u, axis=-1, keepdims=True)
    return (p * u - p * pu) / num_examples
  if loss_fn is objective.mse:
    return u / num_examples
  mean_loss = lambda z_: jnp.mean(loss_fn(z_, y))
  return jax.jvp(jax.grad(mean_loss), (z,), (u,))[1]


def gnvp(obj: Objective, params: Params, batch: Batch, v: Params) -> Params:
  """Gauss-Newton-vector product `GN v = mean_i J_i^T H_z,i J_i v`.

  `z, Jv = jvp(f, w, v)`, the logit-space product `u = H_z Jv` (see
  `logit_hessian_vp`), then `J^T u = vjp(f, w)(u)` (PAPERS.md B1); costs
  about one gradient plus one jvp (1.3x a gradient measured on the MNIST-1D
  CNN). GN is positive semi-definite for convex losses.
  """
  x, y = batch
  f = lambda w: obj.apply_fn(w, x)
  # jvp then a separate vjp: XLA merges the two identical forward passes,
  # and this measured faster on CPU (1.3x vs 1.5-1.6x a gradient) than
  # linearize + linear_transpose.
  z, jv = jax.jvp(f, (params,), (v,))
  u = logit_hessian_vp(obj.loss_fn, z, y, jv)
  return jax.vjp(f, params)[1](u)[0]


def nmevp(obj: Objective, params: Params, batch: Batch, v: Params) -> Params:
  """NME-vector product `NME v = mean_i sum_k r_ik (grad^2 z_ik) v`.

  Computed directly (not as `H v - GN v`) as the jvp of the model's vjp with
  the residual held fixed (PAPERS.md B1):
  `NME v = jvp(w' -> vjp(f, w')(SG[r(w)]), (w,), (v,))`. It vanishes for a
  model linear in `w` and at interpolation (`r = 0`).
  """
  x, y = batch
  f = lambda w: obj.apply_fn(w, x)
  _, r = obj.residual(f(params), y)
  r = jax.lax.stop_gradient(r)

  def jt_r(w):
    return jax.vjp(f, w)[1](r)[0]

  return jax.jvp(jt_r, (params,), (v,))[1]


def mean_over_batches(product_fn: Callable[..., Params]) -> Callable:
  """Average a product over minibatches stacked on a leading axis.

  `mean_over_batches(gnvp)(obj, params, batches, v)` with each leaf of
  `batches` shaped `[NB, B, ...]` returns `mean_b product_fn(obj, params,
  batch_b, v)`, accumulated by one `lax.scan` (memory of one minibatch).
  With equal batch sizes this is the product of the full-data loss.

  Args:
    product_fn: `(obj, params, batch, v) -> params-shaped`, e.g. `hvp`,
      `gnvp`, `nmevp`, or any function with that signature.

  Returns:
    A function with the same signature taking stacked batches.
  """

  def batched_fn(obj, params, batches, v):
    sizes = {leaf.shape[0] for leaf in jax.tree.leaves(batches)}
    if len(sizes) != 1 or any(
      leaf.ndim < 2 for leaf in jax.tree.leaves(batches)
    ):
      raise ValueError(
        "batches must be stacked with one leading axis [NB, B, ...] shared "
        f"by all leaves, got shapes {jax.tree.map(jnp.shape, batches)}"
      )
    (num_batches,) = sizes

    def step(acc, batch):
      out = product_fn(obj, params, batch, v)
      return jax.tree.map(jnp.add, acc, out), None

    zeros = jax.tree.map(jnp.zeros_like, v)
    total, _ = jax.lax.scan(step, zeros, batches)
    return jax.tree.map(lambda t: t / num_batches, total)

  return batched_fn


def dense_matrix(matvec: MatVec, params: Params) -> Array:
  """The `[P, P]` matrix of a linear map on parameter-shaped pytrees.

  Applies `matvec` to every basis vector (vmapped) and flattens with
  `ravel_pytree` in the order of `params`. For tiny models only
  (tests, theory checks): memory and time grow as `P^2`.

  Args:
    matvec: linear `v -> M v` on pytrees shaped like `params`.
    params: pytree fixing the structure, dtypes and flat ordering.

  Returns:
    `M` with `M[:, j] = ravel(matvec(unravel(e_j)))`.
  """
  flat, unravel = flatten_util.ravel_pytree(params)
  basis = jnp.eye(flat.size, dtype=flat.dtype)

  def column(e):
    return flatten_util.ravel_pytree(matvec(unravel(e)))[0]

  return jax.vmap(column)(basis).T


def hessian_matrix(obj: Objective, params: Params, batch: Batch) -> Array:
  """Dense Hessian `[P, P]` of the batch loss (flat order of `params`)."""
  return dense_matrix(lambda v: hvp(obj, params, batch, v), params)


def gauss_newton_matrix(obj: Objective, params: Params, batch: Batch) -> Array:
  """Dense Gauss-Newton matrix `[P, P]`, `mean_i J_i^T H_z,i J_i`."""
  return dense_matrix(lambda v: gnvp(obj, params, batch, v), params)


def nme_matrix(obj: Objective, params: Params, batch: Batch) -> Array:
  """Dense NME matrix `[P, P]`, `mean_i sum_k r_ik grad^2 z_ik`."""
  return dense_matrix(lambda v: nmevp(obj, params, batch, v), params)
