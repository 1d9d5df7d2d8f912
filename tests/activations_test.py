"""Tests for sam_jax.activations: values and derivatives up to second order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm

from sam_jax import activations


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _grid():
  # Negative and positive values, none exactly 0 (ReLU's kink).
  return jnp.linspace(-4.0, 4.0, 40) + 0.013


def _d(f, order):
  """Elementwise derivative of a scalar function, by plain autodiff."""
  for _ in range(order):
    f = jax.grad(f)
  return jax.jit(jax.vmap(f))


def _d_rev(f):
  """Second derivative by reverse-over-reverse on the summed function."""
  return jax.jit(lambda x: jnp.diag(jax.hessian(lambda x: jnp.sum(f(x)))(x)))


# float64 roundoff on O(1) values; erf-based GELU vs ndtr differ ~1e-16.
TOL = 1e-12


def test_beta_gelu_one_is_exact_gelu():
  x = _grid()
  np.testing.assert_allclose(
    activations.beta_gelu(x, 1.0),
    jax.nn.gelu(x, approximate=False),
    rtol=TOL,
    atol=TOL,
  )


@pytest.mark.parametrize("beta", [0.5, 1.0, 3.0, 10.0])
def test_beta_gelu_derivatives_closed_form(beta):
  x = _grid()
  f = lambda s: activations.beta_gelu(s, beta)
  # Independent reference written from the definition x Phi(beta x).
  d1_ref = norm.cdf(beta * x) + beta * x * norm.pdf(beta * x)
  d2_ref = beta * norm.pdf(beta * x) * (2 - beta**2 * x**2)
  np.testing.assert_allclose(_d(f, 1)(x), d1_ref, atol=TOL)
  np.testing.assert_allclose(_d(f, 2)(x), d2_ref, atol=TOL * beta)
  np.testing.assert_allclose(
    activations.beta_gelu_second(x, beta), d2_ref, atol=TOL * beta
  )


def test_large_beta_approaches_relu():
  # |x Phi(b x) - relu(x)| = |x| Phi(-b|x|) <= max_u u Phi(-u) / b
  # = 0.1700.. / b; the grid includes 0 here on purpose.
  x = jnp.linspace(-2.0, 2.0, 401)
  errs = []
  for beta in [1.0, 10.0, 100.0, 1000.0]:
    err = jnp.max(jnp.abs(activations.beta_gelu(x, beta) - jax.nn.relu(x)))
    assert err <= 0.1701 / beta
    errs.append(float(err))
  assert errs[-1] < 2e-4
  assert all(a > b for a, b in zip(errs, errs[1:], strict=False))


@pytest.mark.parametrize(
  "phi",
  [
    lambda x: jax.nn.gelu(x, approximate=False),
    lambda x: activations.beta_gelu(x, 3.0),
    jnp.tanh,
  ],
)
def test_nme_ablated_keeps_value_and_slope_drops_curvature(phi):
  x = _grid()
  ablated = activations.nme_ablated(phi)
  np.testing.assert_allclose(ablated(x), phi(x), rtol=TOL, atol=TOL)
  np.testing.assert_allclose(_d(ablated, 1)(x), _d(phi, 1)(x), atol=TOL)
  # The original has a nonzero phi'' on this grid; the ablated one has none,
  # whichever way the second derivative is taken.
  assert jnp.max(jnp.abs(_d(phi, 2)(x))) > 0.1
  np.testing.assert_array_equal(_d(ablated, 2)(x), 0.0)
  np.testing.assert_array_equal(_d_rev(ablated)(x), 0.0)
  fwd_over_rev = jax.jit(jax.vmap(jax.jacfwd(jax.grad(ablated))))(x)
  np.testing.assert_array_equal(fwd_over_rev, 0.0)


def test_nme_ablated_in_a_layer_removes_only_the_phi_second_terms():
  # f(W, v) = v . phi(W x). Its Hessian has the W-W block
  # sum_j v_j phi''(w_j x) x x^T (an NME block) and the mixed block
  # d2f/dv_j dW_j = phi'(w_j x) x. Ablation must zero the first only.
  key_w, key_v, key_x = jax.random.split(jax.random.key(0), 3)
  w = jax.random.normal(key_w, (3, 2))
  v = jax.random.normal(key_v, (3,))
  x = jax.random.normal(key_x, (2,))
  phi = lambda s: jax.nn.gelu(s, approximate=False)

  def f(act, w, v):
    return jnp.dot(v, act(w @ x))

  hess = lambda act: jax.jit(jax.hessian(f, argnums=(1, 2)), static_argnums=0)(
    act, w, v
  )
  h, h_abl = hess(phi), hess(activations.nme_ablated(phi))
  assert jnp.max(jnp.abs(h[0][0])) > 1e-3
  np.testing.assert_array_equal(h_abl[0][0], 0.0)
  np.testing.assert_allclose(h_abl[0][1], h[0][1], atol=TOL)
  # Written out: d/dv_k d/dW_jl = delta_jk phi'(w_j x) x_l.
  dphi = _d(phi, 1)(w @ x)
  mixed_ref = jnp.einsum("jk,j,l->jlk", jnp.eye(3), dphi, x)
  np.testing.assert_allclose(h_abl[0][1], mixed_ref, atol=TOL)


@pytest.mark.parametrize("beta", [1.0, 4.0])
def test_relu_with_synthetic_nme(beta):
  x = _grid()
  act = activations.relu_with_synthetic_nme(beta)
  np.testing.assert_array_equal(act(x), jnp.maximum(x, 0.0))
  np.testing.assert_array_equal(_d(act, 1)(x), (x > 0).astype(x.dtype))
  # True ReLU has phi'' = 0 pointwise; the synthetic one has beta-GELU's.
  np.testing.assert_array_equal(_d(jax.nn.relu, 2)(x), 0.0)
  d2_ref = beta * norm.pdf(beta * x) * (2 - beta**2 * x**2)
  np.testing.assert_allclose(_d(act, 2)(x), d2_ref, atol=TOL * beta)
  np.testing.assert_allclose(_d_rev(act)(x), d2_ref, atol=TOL * beta)


def test_interventions_under_jit_and_vmap():
  x = _grid().reshape(4, 10)
  for name in ["nme-ablated-gelu", "relu-synthetic-nme"]:
    act = activations.get(name)
    d2 = jax.jit(jax.vmap(jax.vmap(jax.grad(jax.grad(act)))))(x)
    assert d2.shape == x.shape and bool(jnp.all(jnp.isfinite(d2)))


def test_get_names():
  x = _grid()
  np.testing.assert_array_equal(activations.get("relu")(x), jax.nn.relu(x))
  np.testing.assert_allclose(
    activations.get("gelu")(x), jax.nn.gelu(x, approximate=False), atol=TOL
  )
  np.testing.assert_allclose(
    activations.get("beta-gelu", beta=2.0)(x),
    x * norm.cdf(2.0 * x),
    atol=TOL,
  )
  np.testing.assert_allclose(
    activations.get("nme-ablated-gelu")(x),
    jax.nn.gelu(x, approximate=False),
    atol=TOL,
  )
  np.testing.assert_array_equal(
    activations.get("relu-synthetic-nme", beta=2.0)(x), jax.nn.relu(x)
  )


def test_bad_input():
  with pytest.raises(ValueError, match="valid"):
    activations.get("swish")
  with pytest.raises(ValueError, match="beta"):
    activations.get("beta-gelu", beta=0.0)
  with pytest.raises(ValueError, match="beta"):
    activations.relu_with_synthetic_nme(-1.0)
  with pytest.raises(ValueError, match="phi"):
    activations.nme_ablated(3.0)
