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

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import flatten_util

from sam_jax import objective, spectral
from sam_jax.objective import Batch, Objective
from sam_jax.objective import trainable as obj_trainable

Array = jax.Array
Params = Any
MatVec = Callable[[Params], Params]


def _check_inputs(params: Params, batch: Batch) -> None:
  """One-line errors naming the argument (at trace time, no cost)."""
  objective.check_params(params)
  objective.batch_size(batch)


def hvp(obj: Objective, params: Params, batch: Batch, v: Params) -> Params:
  """Hessian-vector product `H v` of the batch loss, forward-over-reverse.

  `H v = jvp(grad L, (w,), (v,))` (PAPERS.md B1); costs about two
  gradients.
  """
  _check_inputs(params, batch)
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
  _check_inputs(params, batch)
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
  _check_inputs(params, batch)
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


CURVATURES = ("h", "gn", "nme")
_PRODUCTS = {"h": hvp, "gn": gnvp, "nme": nmevp}
TRACE_METHODS = ("hutchpp", "hutchinson")


class Estimate(NamedTuple):
  """A stochastic estimate and its standard error."""

  value: Array
  stderr: Array


def _is_batch(batch) -> bool:
  return (
    isinstance(batch, (tuple, list))
    and len(batch) == 2
    and not isinstance(batch[0], (tuple, list))
  )


def _stack_batches(batches) -> tuple[list, list]:
  """`(stacked groups, weights)`: batches of equal shapes stacked on a
  leading axis (one `lax.scan` each), weighted by their share of examples.
  """
  if _is_batch(batches):
    items = [batches]
  elif isinstance(batches, (tuple, list)):
    items = list(batches)
  else:
    raise ValueError(
      "batches must be one batch (x, y) or a sequence of them, got "
      f"{type(batches).__name__}"
    )
  if not items:
    raise ValueError("batches is empty")
  groups: dict = {}
  for i, batch in enumerate(items):
    objective.batch_size(batch, f"batches[{i}]")
    batch = tuple(jnp.asarray(a) for a in batch)
    shapes = tuple((a.shape, a.dtype) for a in batch)
    groups.setdefault(shapes, []).append(batch)
  total = sum(len(g) * g[0][0].shape[0] for g in groups.values())
  stacked = [jax.tree.map(lambda *a: jnp.stack(a), *g) for g in groups.values()]
  weights = [len(g) * g[0][0].shape[0] / total for g in groups.values()]
  return stacked, weights


class Curvature:
  """The curvature of a loss at one point: top eigenvalues, trace, density.

  The PyHessian use-case in three calls, for the Hessian `"h"`, its
  Gauss-Newton part `"gn"` or the nonlinear modeling error `"nme"`
  (`H = GN + NME`, PAPERS.md B1) of the mean loss over `batches`:

      curv = sj.Curvature(obj, params, batches)
      curv.eigenvalues(k=5, of="h")          # top-5 with Ritz residuals
      curv.trace(of="gn", num_probes=99, key=key)   # Hutch++ and stderr
      curv.density(of="h", key=key).plot()   # SLQ spectral density

  `batches` is one batch `(x, y)` or a sequence of them; the loss is the
  mean over all their examples (batches of one shape run in one
  `lax.scan`, so memory is that of one batch; others are weighted by their
  size). With a linen variables dict only the "params" collection varies
  (`objective.trainable`): eigenvectors are shaped like
  `params["params"]`.

  Each query is one jitted program with params and batches as arguments,
  cached per (objective, query) across instances: a second `Curvature` of
  the same objective at other params (a later checkpoint) of the same
  shapes does not compile again. Defaults are chosen to be cheap on CPU:
  Lanczos rolled (see `spectral`), `num_iters` a few times k.
  """

  def __init__(self, objective: Objective, params: Params, batches):
    self.objective, self.params = objective, params
    self._batches, self._weights = _stack_batches(batches)
    leaves = jax.tree.leaves(obj_trainable(objective, params).params)
    self.num_params = sum(jnp.size(leaf) for leaf in leaves)

  def matvec(self, of: str = "h") -> MatVec:
    """`v -> M v` for `of` in "h" | "gn" | "nme" (not jitted); v is shaped
    like the trainable params (`params["params"]` of a linen variables
    dict)."""
    return functools.partial(
      _mean_product,
      _check_of(of),
      self.objective,
      self.params,
      self._batches,
      tuple(self._weights),
    )

  def eigenvalues(
    self,
    k: int = 1,
    of: str = "h",
    *,
    num_iters: int | None = None,
    key: Array | None = None,
    return_vectors: bool = False,
  ) -> spectral.RitzPairs:
    """The top-k (algebraically largest) eigenvalues of `of`, by Lanczos.

    Args:
      k: how many.
      of: "h" | "gn" | "nme".
      num_iters: Lanczos steps (default `min(P, max(2k + 10, 20))`; the
        extreme Ritz values converge first, the residuals say how far).
      key: start vector's key (default `PRNGKey(0)`: reproducible).
      return_vectors: also return the unit Ritz vectors.

    Returns:
      `RitzPairs(values [k] descending, residuals [k], vectors)`, where
      `residuals[i] = ||M y_i - values[i] y_i||` bounds the distance of
      `values[i]` to an eigenvalue of M; vectors is None unless requested,
      else params-shaped with a leading axis k.
    """
    spectral._check_iters("k", k, self.num_params)
    if num_iters is None:
      num_iters = min(self.num_params, max(2 * k + 10, 20))
    spectral._check_iters("num_iters", num_iters, self.num_params)
    if num_iters < k:
      raise ValueError(f"num_iters={num_iters} must be >= k={k}")
    fn = _compiled(
      "eig",
      _check_of(of),
      self.objective,
      (num_iters, k, bool(return_vectors)),
      tuple(self._weights),
    )
    return fn(self.params, self._batches, _key(key))

  def trace(
    self,
    of: str = "h",
    num_probes: int = 99,
    key: Array | None = None,
    *,
    method: str = "hutchpp",
  ) -> Estimate:
    """`Tr M` of `of` with its standard error, from `num_probes` matvecs.

    `method`: "hutchpp" (default; exact up to the residual when M is
    dominated by a few eigenvalues, as Hessians are) or "hutchinson". The
    standard error is that of the Monte-Carlo part (NaN with too few
    probes for a spread).
    """
    if method not in TRACE_METHODS:
      raise ValueError(f"method must be one of {TRACE_METHODS}, got {method!r}")
    spectral._check_iters("num_probes", num_probes)
    fn = _compiled(
      "trace",
      _check_of(of),
      self.objective,
      (num_probes, method),
      tuple(self._weights),
    )
    return Estimate(*fn(self.params, self._batches, _key(key)))

  def density(
    self,
    of: str = "h",
    key: Array | None = None,
    *,
    num_iters: int | None = None,
    num_probes: int = 4,
    grid: int = 512,
    sigma: float | None = None,
  ) -> spectral.SpectralDensity:
    """SLQ spectral density of `of` (`spectral.spectral_density`).

    Defaults: `num_iters = min(P, 64)` Lanczos steps per probe, 4 probes
    (PyHessian: 100 steps, 1 probe), 512 grid points; `.plot(ax)` draws it.
    """
    if num_iters is None:
      num_iters = min(self.num_params, 64)
    spectral._check_iters("num_iters", num_iters, self.num_params)
    spectral._check_iters("num_probes", num_probes)
    fn = _compiled(
      "density",
      _check_of(of),
      self.objective,
      (num_iters, num_probes, grid, sigma),
      tuple(self._weights),
    )
    return fn(self.params, self._batches, _key(key))


def _check_of(of: str) -> str:
  if of not in CURVATURES:
    raise ValueError(f"of must be one of {CURVATURES}, got {of!r}")
  return of


def _key(key: Array | None) -> Array:
  return jax.random.PRNGKey(0) if key is None else key


def _mean_product(of, obj, params, batches, weights, v):
  """`sum_g weight_g * mean over group g's batches of the product`, in
  the trainable part of `params` (`objective.trainable`)."""
  obj, params = obj_trainable(obj, params)[:2]
  product = mean_over_batches(_PRODUCTS[of])
  total = None
  for group, weight in zip(batches, weights):
    scale = functools.partial(jnp.multiply, weight)
    out = jax.tree.map(scale, product(obj, params, group, v))
    total = out if total is None else jax.tree.map(jnp.add, total, out)
  return total


@functools.lru_cache(maxsize=128)
def _compiled(query: str, of: str, obj: Objective, statics: tuple, weights):
  """One jitted `(params, batches, key) -> result` per query and statics."""

  def run(params, batches, key):
    mv = functools.partial(_mean_product, of, obj, params, batches, weights)
    params = obj_trainable(obj, params).params
    if query == "eig":
      num_iters, k, vectors = statics
      ritz = spectral.lanczos_ritz(
        mv, params, num_iters, key, return_vectors=vectors
      )
      top = slice(None, -k - 1, -1)  # the k largest, descending
      return spectral.RitzPairs(
        ritz.values[top],
        ritz.residuals[top],
        None
        if ritz.vectors is None
        else jax.tree.map(lambda a: a[top], ritz.vectors),
      )
    if query == "trace":
      num_probes, method = statics
      estimator = (
        spectral.hutchpp_trace
        if method == "hutchpp"
        else spectral.hutchinson_trace
      )
      return estimator(mv, params, key, num_probes, return_stderr=True)
    num_iters, num_probes, grid, sigma = statics
    return spectral.spectral_density(
      mv, params, key, num_iters, num_probes, grid=grid, sigma=sigma
    )

  return jax.jit(run)
