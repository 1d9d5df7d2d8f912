"""Sharpness regularisers as loss terms and as gradients, selected by name.

Each regulariser is a differentiable scalar (a loss term) built on an
`Objective`; `penalized_loss(name, ...)` adds it to the data loss and
`regularized_gradient(name, ...)` differentiates the sum, returning the clean
data loss for logging. Notation of PAPERS.md: `L` batch loss, `g = grad L`,
`H = GN + NME`.

  penalty              L + rho ||g||  (or ||g||^2), double backprop:
                       grad = g + rho H g/||g||  (2 rho H g)          [B3]
  penalty-gn           same value, NME dropped (full NME ablation):
                       grad = g + rho GN g/||g|| (2 rho GN g)         [B3]
  weight-noise         L(w + delta), delta ~ N(0, sigma^2 I) per key  [B4]
  trace-h              L + sigma^2/2 v^T H v, Rademacher v (Hutchinson)
  trace-gn             L + sigma^2/2 v^T GN v, one JVP per probe, or the
                       sampled-label estimator                        [B4]
  sgd+reg              L + lambda_w ||V_head||^2
                         + lambda_a mean_i ||phi(x_i)||^2              [A5]

The sigma of the trace penalties is the weight-noise sigma:
`E L(w + delta) = L + sigma^2/2 Tr H + O(sigma^4)`. Nothing here jits; the
names and the static hyperparameters (`squared`, `num_probes`, `estimator`)
are Python values, `rho`, `sigma` and the lambdas may be traced.

Every regulariser evaluates the clean loss `L(w)` in a forward pass at the
unperturbed `w` (weight noise too, for logging; its gradient is taken at
`w + delta`). With `has_aux=True` that pass also returns the aux of
`Objective.apply_with_aux` (a BatchNorm model's new running averages), so a
trainer needs no pass of its own for the model state.
"""

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax import flatten_util, lax

from sam_jax import curvature, objective, sam
from sam_jax.objective import Batch, Objective

Array = jax.Array
Params = Any
FeaturesFn = Callable[[Params, Array], tuple[Array, Array]]


def _sq_norm(tree: Params) -> Array:
  return sum(jnp.vdot(a, a) for a in jax.tree.leaves(tree))


def safe_norm(tree: Params) -> Array:
  """`||tree||_2` whose gradient at 0 is 0 rather than NaN."""
  sq = _sq_norm(tree)
  nonzero = sq > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


# Gradient penalties (PAPERS.md B3). ----------------------------------------


def _clean_value_and_grad(obj, params, batch):
  """`((L(w), aux), grad L(w))` from one pass (`Objective.loss_and_aux`;
  aux is None for an objective without apply_with_aux)."""
  return jax.value_and_grad(obj.loss_and_aux, has_aux=True)(params, batch)


def _loss_and_grad_norm(obj, params, batch, squared):
  (loss, aux), g = _clean_value_and_grad(obj, params, batch)
  return (loss, aux), _sq_norm(g) if squared else safe_norm(g)


def _gradient_penalty_grad(obj, params, batch, rho, squared):
  (loss, aux), g = _clean_value_and_grad(obj, params, batch)
  if squared:
    d = jax.tree.map(lambda a: 2 * a, g)
  else:
    norm = safe_norm(g)
    d = jax.tree.map(lambda a: a / jnp.where(norm > 0, norm, 1), g)
  hd = curvature.hvp(obj, params, batch, d)
  return (loss, aux), jax.tree.map(lambda a, b: a + rho * b, g, hd)


def gradient_norm(
  obj: Objective, params: Params, batch: Batch, *, squared: bool = False
) -> Array:
  """`||grad L||` (or its square) as a differentiable loss term.

  Differentiating it is double backprop through the full Hessian:
  `grad ||g|| = H g/||g||` (0 at g = 0), `grad ||g||^2 = 2 H g`.
  """
  return _loss_and_grad_norm(obj, params, batch, squared)[1]


def _gn_gradient_norm(obj, params, batch, squared):
  x, y = batch
  f = lambda w: obj.apply_fn(w, x)
  z_BxK, f_vjp, aux = jax.vjp(
    lambda w: obj.apply_and_aux(w, x), params, has_aux=True
  )
  loss, r_BxK = obj.residual(z_BxK, y)  # r = dL/dz, differentiable in w
  g = lax.stop_gradient(f_vjp(r_BxK)[0])
  norm = safe_norm(g)
  if squared:
    value, d = norm**2, jax.tree.map(lambda a: 2 * a, g)
  else:
    value, d = norm, jax.tree.map(lambda a: a / jnp.where(norm > 0, norm, 1), g)
  # c = J d with J, d held fixed: grad_w <c, r(w)> = J^T (H_z/B) c = GN d.
  c_BxK = lax.stop_gradient(jax.jvp(f, (params,), (d,))[1])
  cr = jnp.vdot(c_BxK, r_BxK)
  penalty = lax.stop_gradient(value) + cr - lax.stop_gradient(cr)
  return (loss, aux), penalty


def gn_gradient_norm(
  obj: Objective, params: Params, batch: Batch, *, squared: bool = False
) -> Array:
  """`||grad L||` (or its square) whose gradient keeps only the GN part.

  Value `||g||` (`||g||^2`); gradient `GN g/||g||` (`2 GN g`), i.e. the
  gradient penalty's update with the NME ablated (PAPERS.md B3). Written as
  `SG[||g||] + <SG[J d], r(w)> - SG[<J d, r(w)>]` with `d = SG[g/||g||]`
  and `r = dL/dz`: the gradient of `<c, r(w)>` for fixed `c` is
  `J^T (H_z/B) c`, so with `c = J d` it is `GN d` (one JVP, no NME term).
  """
  return _gn_gradient_norm(obj, params, batch, squared)[1]


# Weight noise and trace penalties (PAPERS.md B4). --------------------------


def sample_weight_noise(params: Params, key: Array, sigma) -> Params:
  """`delta ~ N(0, sigma^2 I)`, shaped like params, independent per leaf."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  noise = [
    sigma * jax.random.normal(k, a.shape, a.dtype)
    for k, a in zip(keys, leaves, strict=True)
  ]
  return jax.tree.unflatten(treedef, noise)


def hessian_quadratic_form(
  obj: Objective, params: Params, batch: Batch, v: Params
) -> Array:
  """`v^T H v = d^2/dt^2 L(w + t v)` at t = 0, by forward-over-forward."""
  dir_deriv = lambda w: jax.jvp(lambda u: obj.loss(u, batch), (w,), (v,))[1]
  return jax.jvp(dir_deriv, (params,), (v,))[1]


def gn_quadratic_form(
  obj: Objective, params: Params, batch: Batch, v: Params
) -> Array:
  """`v^T GN v = mean_i u_i^T H_z,i u_i` with `u = J v` from one JVP.

  For softmax CE `u^T H_z u = sum_c p_c u_c^2 - (p.u)^2` (PAPERS.md B4).
  Differentiable in params: its gradient for a fixed v is `grad(v^T GN v)`.
  """
  x, y = batch
  z_BxK, u_BxK = jax.jvp(lambda w: obj.apply_fn(w, x), (params,), (v,))
  return jnp.vdot(
    u_BxK, curvature.logit_hessian_vp(obj.loss_fn, z_BxK, y, u_BxK)
  )


def _rademacher_probes(params: Params, key: Array, num: int) -> Params:
  flat, unravel = flatten_util.ravel_pytree(params)
  v_SxP = jax.random.rademacher(key, (num, flat.size), dtype=flat.dtype)
  return jax.vmap(unravel)(v_SxP)


def hessian_trace(
  obj: Objective, params: Params, batch: Batch, key: Array, num_probes: int = 1
) -> Array:
  """Hutchinson estimate `mean_s v_s^T H v_s` of `Tr H`, Rademacher v_s.

  Unbiased for `Tr H`; as the probes do not depend on params its gradient is
  an unbiased estimate of `grad Tr H` (third derivatives of L).
  """
  vs = _rademacher_probes(params, key, num_probes)
  qf = lambda v: hessian_quadratic_form(obj, params, batch, v)
  return jnp.mean(jax.vmap(qf)(vs))


def sampled_label_sq_grad_norm(
  obj: Objective,
  params: Params,
  x: Array,
  labels_hat: Array,
  *,
  score_term: bool = True,
) -> Array:
  """`mean_i ||grad_w l(z_i, yhat_i)||^2` for given sampled labels.

  With `yhat_i ~ softmax(z_i)` its expectation is `Tr GN` for softmax CE
  (`E (p - e_y)(p - e_y)^T = H_z`). Its gradient with the labels held fixed
  is biased: it drops the score-function term of the label distribution
  (PAPERS.md B4 pitfall). `score_term=True` adds the zero-valued
  `SG[q_i] (log p(yhat_i) - SG[log p(yhat_i)])` with `log p = -l` (l must
  be the label's negative log-likelihood, as softmax CE is), so that the
  gradient `mean_i grad q_i + q_i grad log p(yhat_i)` is unbiased for
  `grad Tr GN`. Costs B per-example gradients (vmapped).
  """
  per_example = lambda w, xi, yi: obj.loss_fn(
    obj.apply_fn(w, xi[None]), yi[None]
  )[0]

  def sq_grad(xi, yi):
    return _sq_norm(jax.grad(per_example)(params, xi, yi))

  q_B = jax.vmap(sq_grad)(x, labels_hat)
  if score_term:
    log_p_B = -obj.loss_fn(obj.apply_fn(params, x), labels_hat)
    q_B = q_B + lax.stop_gradient(q_B) * (log_p_B - lax.stop_gradient(log_p_B))
  return jnp.mean(q_B)


_GN_ESTIMATORS = ("jvp", "sampled-label", "sampled-label-fixed")


def gn_trace(
  obj: Objective,
  params: Params,
  batch: Batch,
  key: Array,
  num_probes: int = 1,
  estimator: str = "jvp",
) -> Array:
  """Unbiased estimate of `Tr GN` (PAPERS.md B4).

  `estimator`:
    "jvp": `mean_s v_s^T GN v_s` with Rademacher v_s, one JVP each
      (`gn_quadratic_form`); the gradient is unbiased for `grad Tr GN`.
      Works for any loss.
    "sampled-label": `sampled_label_sq_grad_norm` with
      `yhat ~ softmax(z)` per probe, score-function term included: value
      and gradient unbiased. Softmax CE only.
    "sampled-label-fixed": the same value, gradient with labels held fixed
      (biased; kept to reproduce the pitfall).
  """
  if estimator not in _GN_ESTIMATORS:
    raise ValueError(
      f"estimator must be one of {_GN_ESTIMATORS}, got {estimator!r}"
    )
  if estimator == "jvp":
    vs = _rademacher_probes(params, key, num_probes)
    qf = lambda v: gn_quadratic_form(obj, params, batch, v)
    return jnp.mean(jax.vmap(qf)(vs))
  if obj.loss_fn is not objective.softmax_cross_entropy:
    raise ValueError(
      f"estimator={estimator!r} samples labels from softmax(z) and needs "
      "loss_fn=softmax_cross_entropy"
    )
  x, _ = batch
  z_BxK = lax.stop_gradient(obj.apply_fn(params, x))
  keys = jax.random.split(key, num_probes)
  labels_SxB = jax.vmap(lambda k: jax.random.categorical(k, z_BxK))(keys)
  score = estimator == "sampled-label"
  est = lambda yh: sampled_label_sq_grad_norm(
    obj, params, x, yh, score_term=score
  )
  return jnp.mean(jax.vmap(est)(labels_SxB))


# Cheap alternatives (PAPERS.md A5). ----------------------------------------


def last_layer_sq_norm(params: Params) -> Array:
  """`||V_head||^2`: squared Frobenius norm of `params["head"]["kernel"]`."""
  return jnp.sum(jnp.square(params["head"]["kernel"]))


def mean_feature_sq_norm(features_BxD: Array) -> Array:
  """`mean_i ||phi(x_i)||^2` over the batch (penultimate features)."""
  return jnp.mean(jnp.sum(jnp.square(features_BxD), axis=-1))


# One place to select them. -------------------------------------------------

_REQUIRED = object()
_HPARAMS = {
  "penalty": {"rho": _REQUIRED, "squared": False},
  "penalty-gn": {"rho": _REQUIRED, "squared": False},
  "weight-noise": {"sigma": _REQUIRED},
  "trace-h": {"sigma": _REQUIRED, "num_probes": 1},
  "trace-gn": {"sigma": _REQUIRED, "num_probes": 1, "estimator": "jvp"},
  "sgd+reg": {"lambda_w": 0.0, "lambda_a": 0.0},
}
NAMES = tuple(_HPARAMS)
_RANDOM = ("weight-noise", "trace-h", "trace-gn")


def _resolve(name: str, hparams: dict) -> dict:
  if name not in _HPARAMS:
    raise ValueError(f"unknown regularizer {name!r}; valid: {NAMES}")
  spec = _HPARAMS[name]
  unknown = set(hparams) - set(spec)
  if unknown:
    raise ValueError(
      f"{name}: unknown hyperparameters {sorted(unknown)}; "
      f"valid: {sorted(spec)}"
    )
  hp = {**spec, **hparams}
  for field, value in hp.items():
    if value is _REQUIRED:
      raise ValueError(f"{name}: missing hyperparameter {field!r}")
    if field in ("rho", "sigma", "lambda_w", "lambda_a"):
      # Concrete numbers are checked; traced ones (schedules, grids) cannot
      # be, and become NaN when bad (as in sam_jax.sam: the step is NaN).
      if isinstance(value, bool) or (
        isinstance(value, (int, float))
        and not (math.isfinite(value) and value >= 0)
      ):
        raise ValueError(
          f"{name}: {field} must be a finite number >= 0, got {value}"
        )
      hp[field] = sam.nan_unless_valid(value)
  if "num_probes" in hp and not (
    isinstance(hp["num_probes"], int) and hp["num_probes"] >= 1
  ):
    raise ValueError(
      f"{name}: num_probes must be an int >= 1, got {hp['num_probes']}"
    )
  if "squared" in hp and not isinstance(hp["squared"], bool):
    raise ValueError(f"{name}: squared must be a bool, got {hp['squared']}")
  return hp


def penalized_loss(
  name: str,
  obj: Objective,
  params: Params,
  batch: Batch,
  key: Optional[Array] = None,
  *,
  features_fn: Optional[FeaturesFn] = None,
  has_aux: bool = False,
  **hparams,
) -> tuple[Array, Any]:
  """The regularised objective of `name` and the clean batch loss.

  Args:
    name: one of `NAMES` (see the module docstring for the formulas).
    obj: the model and loss.
    params: parameters w.
    batch: `(x, y)`.
    key: PRNG key; required by weight-noise, trace-h and trace-gn.
    features_fn: `(params, x) -> (logits, features)`, required by sgd+reg
      (e.g. `sam_jax.models.features_fn(model)`).
    has_aux: also return the aux of the clean pass at `params`
      (`obj.apply_with_aux`; for sgd+reg, whose clean pass is
      `features_fn`, `features_fn` must then return
      `((logits, features), aux)`).
    **hparams: `rho` (>= 0), `squared` for the gradient penalties; `sigma`
      (>= 0) for weight noise and the traces; `num_probes` (int >= 1) and
      `estimator` ("jvp", "sampled-label", "sampled-label-fixed") for the
      traces; `lambda_w`, `lambda_a` (>= 0) for sgd+reg.

  Returns:
    `(total, clean_loss)`: differentiate `total`; `clean_loss = L(w)`.
    With `has_aux`: `(total, (clean_loss, aux))`.

  Raises:
    ValueError: unknown name or hyperparameter, a bad value, or a missing
      key / features_fn.
  """
  hp = _resolve(name, hparams)
  if name in _RANDOM and key is None:
    raise ValueError(f"{name}: needs a PRNG key, got key=None")
  total, (loss, aux) = _penalized_loss(
    name, hp, obj, params, batch, key, features_fn, has_aux
  )
  return total, ((loss, aux) if has_aux else loss)


def _penalized_loss(name, hp, obj, params, batch, key, features_fn, has_aux):
  """`(total, (clean_loss, aux))` of `penalized_loss` (aux None unless
  has_aux)."""
  if name == "penalty":
    (loss, aux), pen = _loss_and_grad_norm(obj, params, batch, hp["squared"])
    return loss + hp["rho"] * pen, (loss, aux)
  if name == "penalty-gn":
    (loss, aux), pen = _gn_gradient_norm(obj, params, batch, hp["squared"])
    return loss + hp["rho"] * pen, (loss, aux)
  if name == "sgd+reg":
    if features_fn is None:
      raise ValueError(
        "sgd+reg: needs features_fn(params, x) -> (logits, features)"
      )
    x, y = batch
    out, aux = features_fn(params, x), None
    if has_aux:
      out, aux = out
    logits, feats = out
    loss = jnp.mean(obj.loss_fn(logits, y))
    total = loss + hp["lambda_w"] * last_layer_sq_norm(params)
    total = total + hp["lambda_a"] * mean_feature_sq_norm(feats)
    return total, (loss, aux)
  loss, aux = obj.loss_and_aux(params, batch)
  sigma = hp["sigma"]
  if name == "weight-noise":
    delta = sample_weight_noise(params, key, sigma)
    noisy = jax.tree.map(jnp.add, params, lax.stop_gradient(delta))
    return obj.loss(noisy, batch), (lax.stop_gradient(loss), aux)
  if name == "trace-h":
    trace = hessian_trace(obj, params, batch, key, hp["num_probes"])
  else:
    trace = gn_trace(obj, params, batch, key, hp["num_probes"], hp["estimator"])
  return loss + 0.5 * sigma**2 * trace, (loss, aux)


def regularized_gradient(
  name: str,
  obj: Objective,
  params: Params,
  batch: Batch,
  key: Optional[Array] = None,
  *,
  features_fn: Optional[FeaturesFn] = None,
  has_aux: bool = False,
  **hparams,
) -> tuple[Any, Params]:
  """`(clean_loss, grad of penalized_loss)`; same arguments as `penalized_loss`.

  With `has_aux`: `((clean_loss, aux), grads)`, aux from the clean pass.

  The gradient is the method's update direction, e.g. for penalty
  `g + rho H g/||g||`, for weight-noise `grad L(w + delta)`. For
  penalty it is computed as `g + rho hvp(g/||g||)` (forward-over-
  reverse), the same vector as double backprop through `penalized_loss` but
  measured ~3x cheaper on the MNIST-1D CNN on CPU (2.7 vs 6-8.6 gradients).
  """
  if name == "penalty":
    hp = _resolve(name, hparams)
    (loss, aux), grads = _gradient_penalty_grad(
      obj, params, batch, hp["rho"], hp["squared"]
    )
    return ((loss, aux) if has_aux else loss), grads
  fn = lambda w: penalized_loss(
    name,
    obj,
    w,
    batch,
    key,
    features_fn=features_fn,
    has_aux=has_aux,
    **hparams,
  )
  (_, out), grads = jax.value_and_grad(fn, has_aux=True)(params)
  return out, grads
