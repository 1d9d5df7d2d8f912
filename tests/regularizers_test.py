"""Tests for sam_jax.regularizers against dense float64 references.

References are written plainly here: dense `jax.hessian` of the flattened
loss, dense Jacobians `J [B, K, P]` with `H_z = diag(p) - p p^T` for the
Gauss-Newton matrix, and `jax.grad` of the written-out objectives. Each
test makes one compiled call holding both the library result and its
reference (eager nested autodiff and many small compiles are slow on CPU).
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import flatten_util

from sam_jax import activations, curvature, models, regularizers
from sam_jax.objective import mse, softmax_cross_entropy

B, K = 4, 3
RHO = 0.3

# Identities on O(1) float64 quantities built from a few thousand flops:
# they agree to ~1e-14; 1e-10 leaves room for summation order.
TOL = 1e-10


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _jit(fn, *args, **kwargs):
  """fn(*args, **kwargs), compiled.

  Float keyword arguments (rho, sigma, lambdas) are traced, so every call
  also checks that the hyperparameters may be traced (schedules).
  """
  traced = {k: v for k, v in kwargs.items() if isinstance(v, float)}
  static = {k: v for k, v in kwargs.items() if k not in traced}
  return jax.jit(lambda **t: fn(*args, **static, **t))(**traced)


def _flat(tree):
  return flatten_util.ravel_pytree(tree)[0]


@functools.cache
def _problem(kind):
  """A tiny GELU classifier in float64 and its dense references.

  Fields: model, obj, params, batch, flat, unravel, loss (of flat params),
  gn (flat params -> dense GN), and the dense h, g, gn_mat at params.
  """
  with jax.enable_x64(True):
    act = activations.get("gelu")
    if kind == "mlp":
      model = models.MLP((3,), num_classes=K, activation=act)
      x = jax.random.normal(jax.random.key(1), (B, 2))
    else:
      # One conv layer (double backprop through a convolution) keeps the
      # compile time small.
      model = models.CNN1D((2,), 3, dense=(), num_classes=K, activation=act)
      x = jax.random.normal(jax.random.key(1), (B, 6))
    batch = (x, jnp.array([0, 1, 2, 1]))
    init = jax.jit(models.init_params, static_argnums=0)
    params = init(model, jax.random.key(0), x)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    obj = models.make_objective(model, softmax_cross_entropy)
    flat, unravel = flatten_util.ravel_pytree(params)
    loss = lambda f: obj.loss(unravel(f), batch)

    def gn(f):
      apply = lambda f_: obj.apply_fn(unravel(f_), x)
      jac = jax.jacobian(apply)(f)  # [B, K, P]
      p = jax.nn.softmax(apply(f))
      hz = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
      return jnp.einsum("bkp,bkl,blq->pq", jac, hz, jac) / x.shape[0]

    h, g, gn_mat = jax.jit(
      lambda f: (jax.hessian(loss)(f), jax.grad(loss)(f), gn(f))
    )(flat)
  return types.SimpleNamespace(**locals())


@pytest.mark.parametrize(
  "kind, squared", [("mlp", False), ("mlp", True), ("cnn", False)]
)
def test_gradient_penalties(kind, squared):
  pr = _problem(kind)
  rg = regularizers.regularized_gradient

  def run(rho):
    full = rg("penalty", pr.obj, pr.params, pr.batch, rho=rho,
              squared=squared)  # fmt: skip
    gn_only = rg("penalty-gn", pr.obj, pr.params, pr.batch,
                 rho=rho, squared=squared)  # fmt: skip
    total, _ = regularizers.penalized_loss(
      "penalty-gn", pr.obj, pr.params, pr.batch, rho=rho,
      squared=squared,
    )  # fmt: skip
    # The loss-term path (double backprop) of the full penalty.
    term = lambda w: regularizers.penalized_loss(
      "penalty", pr.obj, w, pr.batch, rho=rho, squared=squared
    )[0]
    term_grad = _flat(jax.grad(term)(pr.params))
    norm_fn = (lambda v: jnp.sum(v**2)) if squared else jnp.linalg.norm
    written = lambda f: pr.loss(f) + rho * norm_fn(jax.grad(pr.loss)(f))
    g_tree = jax.grad(pr.obj.loss)(pr.params, pr.batch)
    nme_g = curvature.nmevp(pr.obj, pr.params, pr.batch, g_tree)
    written_grad = jax.grad(written)(pr.flat)
    return full, gn_only, total, written_grad, term_grad, _flat(nme_g)

  full, gn_only, total, written_grad, term_grad, nme_g = _jit(run, RHO)
  h, g, gn_mat = pr.h, pr.g, pr.gn_mat
  norm = jnp.linalg.norm(g)
  # d(rho ||g||)/dw = rho M g/||g||, d(rho ||g||^2)/dw = 2 rho M g.
  scale = 2 * RHO if squared else RHO / norm
  value = norm**2 if squared else norm
  for clean in (full[0], gn_only[0]):
    np.testing.assert_allclose(clean, pr.loss(pr.flat), rtol=TOL)
  # Full penalty: autodiff of the written-out objective, and the formula.
  np.testing.assert_allclose(_flat(full[1]), written_grad, atol=TOL)
  np.testing.assert_allclose(term_grad, written_grad, atol=TOL)
  np.testing.assert_allclose(_flat(full[1]), g + scale * h @ g, atol=TOL)
  # GN-only: same value, update g + scale GN g.
  np.testing.assert_allclose(total, pr.loss(pr.flat) + RHO * value, rtol=TOL)
  np.testing.assert_allclose(_flat(gn_only[1]), g + scale * gn_mat @ g,
                             atol=TOL)  # fmt: skip
  # Their difference is the NME part, matrix-free and dense; for this GELU
  # net it is not negligible.
  diff = _flat(full[1]) - _flat(gn_only[1])
  np.testing.assert_allclose(diff, scale * nme_g, atol=TOL)
  np.testing.assert_allclose(diff, scale * (h - gn_mat) @ g, atol=TOL)
  assert jnp.linalg.norm(diff) > 1e-3 * jnp.linalg.norm(scale * h @ g)


def test_penalties_safe_at_zero_gradient():
  # A zero linear model with zero MSE targets: residual and g are exactly 0.
  model = models.Linear(num_classes=2)
  x = jax.random.normal(jax.random.key(0), (3, 4))
  params = jax.tree.map(
    jnp.zeros_like, models.init_params(model, jax.random.key(1), x)
  )
  obj = models.make_objective(model, mse)
  batch = (x, jnp.zeros((3, 2)))

  def run():
    return [
      regularizers.regularized_gradient(
        name, obj, params, batch, rho=1.0, squared=squared
      )
      for name in ("penalty", "penalty-gn")
      for squared in (False, True)
    ]

  for loss, grads in _jit(run):
    assert float(loss) == 0.0
    np.testing.assert_array_equal(_flat(grads), 0.0)


def test_quadratic_forms():
  # Values against the dense matrices; their gradients are checked against
  # finite differences of the penalties in test_trace_penalties.
  pr = _problem("mlp")
  v = jax.random.normal(jax.random.key(3), pr.flat.shape)
  # {sqrt(P) e_j} has mean v v^T = I exactly, like the Rademacher average:
  # the probe mean of a quadratic form is the trace.
  probes = jnp.sqrt(pr.flat.size) * jnp.eye(pr.flat.size)
  qfs = (regularizers.hessian_quadratic_form, regularizers.gn_quadratic_form)

  def run():
    out = []
    for qf in qfs:
      lib = lambda v, qf=qf: qf(pr.obj, pr.params, pr.batch, pr.unravel(v))
      out.append((lib(v), jnp.mean(jax.vmap(lib)(probes))))
    return out

  for (val, mean), m in zip(_jit(run), [pr.h, pr.gn_mat], strict=True):
    np.testing.assert_allclose(val, v @ m @ v, rtol=TOL)
    np.testing.assert_allclose(mean, jnp.trace(m), rtol=TOL)


def test_trace_estimators_monte_carlo():
  pr = _problem("mlp")
  num = 2000
  key = jax.random.key(5)
  ests = _jit(
    lambda: [
      fn(pr.obj, pr.params, pr.batch, key, num)
      for fn in (regularizers.gn_trace, regularizers.hessian_trace)
    ]
  )
  for est, m in zip(ests, [pr.gn_mat, pr.h], strict=True):
    # Rademacher Hutchinson: Var = 2 (||M||_F^2 - sum_i M_ii^2) per probe;
    # 5 standard errors of the mean of `num` probes.
    se = jnp.sqrt(2 * (jnp.sum(m**2) - jnp.sum(jnp.diag(m) ** 2)) / num)
    assert abs(est - jnp.trace(m)) < 5 * se, (est, jnp.trace(m), se)


@functools.cache
def _per_label_values():
  """For score_term in (True, False): v[i, c] and grad v[i, c], the
  sampled-label estimator on example i alone with label c; and grad Tr GN."""
  pr = _problem("mlp")
  x = pr.batch[0]

  def per_ic(score_term):
    def v(f, xi, c):
      return regularizers.sampled_label_sq_grad_norm(
        pr.obj, pr.unravel(f), xi[None], c[None], score_term=score_term
      )

    per_c = jax.vmap(jax.value_and_grad(v), in_axes=(None, None, 0))
    return jax.vmap(per_c, in_axes=(None, 0, None))(pr.flat, x, jnp.arange(K))

  with jax.enable_x64(True):
    return _jit(
      lambda: (
        per_ic(True),
        per_ic(False),
        jax.grad(lambda f: jnp.trace(pr.gn(f)))(pr.flat),
      )
    )


def test_sampled_label_estimator_value_and_gradient():
  # Exact expectation over yhat_i ~ softmax(z_i): the estimator is a mean of
  # per-example terms, so E = mean_i sum_c p_ic v(i, c).
  pr = _problem("mlp")
  p = jax.nn.softmax(pr.obj.apply_fn(pr.params, pr.batch[0]))
  (val, grad), (val_fixed, grad_fixed), ref_grad = _per_label_values()
  np.testing.assert_allclose(
    jnp.einsum("ic,ic->", p, val) / B, jnp.trace(pr.gn_mat), rtol=TOL
  )
  np.testing.assert_allclose(
    jnp.einsum("ic,icp->p", p, grad) / B, ref_grad, atol=TOL
  )
  # The pitfall: labels held fixed -> same values, biased gradient.
  np.testing.assert_allclose(val_fixed, val, rtol=TOL)
  grad_fixed = jnp.einsum("ic,icp->p", p, grad_fixed) / B
  bias = jnp.linalg.norm(grad_fixed - ref_grad) / jnp.linalg.norm(ref_grad)
  assert bias > 0.05, bias


def test_sampled_label_gn_trace_monte_carlo():
  pr = _problem("mlp")
  num = 2000
  est = _jit(
    regularizers.gn_trace,
    pr.obj,
    pr.params,
    pr.batch,
    jax.random.key(2),
    num,
    estimator="sampled-label",
  )
  # Exact per-probe variance of mean_i q_i(yhat_i): sum_i Var_{p_i} v / B^2;
  # 5 standard errors of the mean of `num` probes.
  p = jax.nn.softmax(pr.obj.apply_fn(pr.params, pr.batch[0]))
  (val, _), _, _ = _per_label_values()
  var_i = jnp.sum(p * val**2, -1) - jnp.sum(p * val, -1) ** 2
  se = jnp.sqrt(jnp.sum(var_i) / B**2 / num)
  assert abs(est - jnp.trace(pr.gn_mat)) < 5 * se, (est, se)


def test_weight_noise_expectation_is_half_sigma_sq_trace():
  pr = _problem("mlp")
  num = 4000

  def run():
    # xi ~ N(0, I): the noise of sample_weight_noise at sigma = 1 (its own
    # sampling is checked in the next test).
    xi = jax.random.normal(jax.random.key(4), (num, pr.flat.size))

    def sym_excess(sigma):
      # Antithetic pairs: (L(w + d) + L(w - d))/2 - L(w), d = sigma xi.
      pair = lambda d: 0.5 * (pr.loss(pr.flat + d) + pr.loss(pr.flat - d))
      return jax.vmap(pair)(sigma * xi) - pr.loss(pr.flat)

    quad = lambda s: 0.5 * s**2 * jnp.einsum("np,pq,nq->n", xi, pr.h, xi)
    rem = [jnp.mean(sym_excess(s) - quad(s)) for s in (0.2, 0.1)]
    return sym_excess(0.01), rem

  excess, rem = _jit(run)
  mc, se = jnp.mean(excess), jnp.std(excess) / jnp.sqrt(num)
  target = 0.5 * 0.01**2 * jnp.trace(pr.h)
  # Monte Carlo error dominates: SE is 2.1% of the target with 4000 pairs,
  # the O(sigma^4) bias 1.7e-4 of it (both measured); 4 standard errors.
  assert abs(mc - target) < 4 * se, (mc, target, se)
  # Pathwise, with the same xi, the remainder after the quadratic term is
  # O(sigma^4): halving sigma divides it by 16 (1 + O(sigma^2)); 15.5
  # measured for sigma 0.2 -> 0.1.
  assert 14 < rem[0] / rem[1] < 18, rem


def test_weight_noise_gradient_is_at_the_perturbed_point():
  pr = _problem("mlp")
  sigma = 0.1

  @jax.jit
  def run(key):
    clean, grads = regularizers.regularized_gradient(
      "weight-noise", pr.obj, pr.params, pr.batch, key, sigma=sigma
    )
    delta = regularizers.sample_weight_noise(pr.params, key, sigma)
    noisy = jax.tree.map(jnp.add, pr.params, delta)
    return clean, grads, _flat(delta), jax.grad(pr.obj.loss)(noisy, pr.batch)

  clean, grads, delta, ref = run(jax.random.key(9))
  assert delta.shape == pr.flat.shape and 0.05 < jnp.std(delta) < 0.2
  np.testing.assert_allclose(clean, pr.loss(pr.flat), rtol=TOL)
  np.testing.assert_allclose(_flat(grads), _flat(ref), atol=TOL)
  # Fresh noise per key.
  assert not np.allclose(_flat(grads), _flat(run(jax.random.key(10))[1]))


def test_sgd_reg_matches_written_out_objective():
  pr = _problem("mlp")
  x, y = pr.batch
  lw, la = 0.1, 0.2

  def written(f):
    p = pr.unravel(f)
    gelu = activations.get("gelu")
    feats = gelu(x @ p["dense0"]["kernel"] + p["dense0"]["bias"])
    logits = feats @ p["head"]["kernel"] + p["head"]["bias"]
    ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(B), y])
    return (
      ce
      + lw * jnp.sum(p["head"]["kernel"] ** 2)
      + la * jnp.mean(jnp.sum(feats**2, -1))
    )

  def run(lambda_w, lambda_a):
    out = regularizers.regularized_gradient(
      "sgd+reg",
      pr.obj,
      pr.params,
      pr.batch,
      features_fn=models.features_fn(pr.model),
      lambda_w=lambda_w,
      lambda_a=lambda_a,
    )
    return out, jax.grad(written)(pr.flat)

  (clean, grads), ref = _jit(run, lambda_w=lw, lambda_a=la)
  np.testing.assert_allclose(clean, pr.loss(pr.flat), rtol=TOL)
  np.testing.assert_allclose(_flat(grads), ref, atol=TOL)


@pytest.mark.parametrize(
  "name, estimator",
  [("trace-h", None), ("trace-gn", "jvp"), ("trace-gn", "sampled")],
)
def test_trace_penalties(name, estimator):
  # Value L + sigma^2/2 estimate (same key); gradient = derivative of the
  # value, checked by a central difference along a random direction u.
  pr = _problem("mlp")
  key, num, step = jax.random.key(3), 2, 1e-5
  u = jax.random.normal(jax.random.key(8), pr.flat.shape)
  if estimator == "sampled":
    cases = [
      {"estimator": "sampled-label-fixed"},
      {"estimator": "sampled-label"},
    ]
  else:
    cases = [{} if estimator is None else {"estimator": estimator}]

  def run(sigma):
    out = []
    for hp in cases:
      total = lambda f, hp=hp: regularizers.penalized_loss(
        name, pr.obj, pr.unravel(f), pr.batch, key, sigma=sigma,
        num_probes=num, **hp,
      )  # fmt: skip
      (value, clean), grads = jax.value_and_grad(total, has_aux=True)(pr.flat)
      if name == "trace-h":
        est = regularizers.hessian_trace(pr.obj, pr.params, pr.batch, key, num)
      else:
        est = regularizers.gn_trace(pr.obj, pr.params, pr.batch, key, num,
                                    **hp)  # fmt: skip
      fd = (total(pr.flat + step * u)[0] - total(pr.flat - step * u)[0]) / (
        2 * step
      )
      out.append((value, clean, est, grads @ u, fd))
    return out

  sigma = 0.5
  results = _jit(run, sigma)
  for value, clean, est, _, _ in results:
    np.testing.assert_allclose(clean, pr.loss(pr.flat), rtol=TOL)
    np.testing.assert_allclose(value, clean + 0.5 * sigma**2 * est, rtol=TOL)
  # Central difference: truncation O(step^2) (3e-7 relative measured at
  # step 1e-4, so ~3e-9 here) and roundoff eps/step ~ 1e-11; labels drawn
  # from SG[z] do not flip within +-step.
  np.testing.assert_allclose(results[0][3], results[0][4], rtol=1e-7)
  if estimator == "sampled":
    # With the score term: same value, a different (unbiased) gradient.
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=TOL)
    assert abs(results[1][3] - results[1][4]) > 1e-4 * abs(results[1][4])


def test_bad_input():
  pr = _problem("mlp")
  obj, params, batch = pr.obj, pr.params, pr.batch
  key = jax.random.key(0)
  rg = regularizers.regularized_gradient
  with pytest.raises(ValueError, match="valid"):
    rg("sharpness", obj, params, batch, rho=0.1)
  with pytest.raises(ValueError, match="rho"):
    rg("penalty", obj, params, batch, rho=-0.1)
  with pytest.raises(ValueError, match="rho"):
    rg("penalty", obj, params, batch)
  with pytest.raises(ValueError, match="sigma"):
    rg("weight-noise", obj, params, batch, key, sigma=-1.0)
  with pytest.raises(ValueError, match="sigma"):
    rg("trace-gn", obj, params, batch, key, sigma=float("nan"))
  with pytest.raises(ValueError, match="sigmaa"):
    rg("weight-noise", obj, params, batch, key, sigmaa=1.0)
  with pytest.raises(ValueError, match="key"):
    rg("trace-h", obj, params, batch, sigma=0.1)
  with pytest.raises(ValueError, match="num_probes"):
    rg("trace-h", obj, params, batch, key, sigma=0.1, num_probes=0)
  with pytest.raises(ValueError, match="squared"):
    rg("penalty", obj, params, batch, rho=0.1, squared=1)
  with pytest.raises(ValueError, match="features_fn"):
    rg("sgd+reg", obj, params, batch, lambda_w=0.1)
  with pytest.raises(ValueError, match="estimator"):
    rg("trace-gn", obj, params, batch, key, sigma=0.1, estimator="kfac")
  with pytest.raises(ValueError, match="softmax_cross_entropy"):
    regularizers.gn_trace(
      obj._replace(loss_fn=mse), params, batch, key, estimator="sampled-label"
    )
