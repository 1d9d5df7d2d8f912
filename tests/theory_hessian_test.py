"""theory/hessian.py at tiny size: the checks can fail (their rows run,
once, in tests/theory_main_test.py).

The checks compare sam_jax's dense curvature with `jax.hessian` and a dense
`J^T H_z J` in float64 (identities to 1e-12, round-off ~1e-16), and Monte
Carlo / Hutchinson estimates with their 95% CIs (seeded, so deterministic).
Negative controls show the criteria reject what they should: GN alone is not
H for a deep linear net, the expansion breaks at large sigma, and the
same-layer NME of GELU (the measurement the ReLU check uses) is not 0.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax import activations
from theory import hessian

SIZES = hessian.QUICK


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def test_deep_linear_identity_and_gn_alone_is_not_h():
  c, layer_ids = hessian.deep_linear_curvature(**SIZES)
  result = hessian.deep_linear_row(c, layer_ids)
  assert result.verdict == "pass", result
  # Negative control: with the NME dropped (GN alone as H) the same
  # criterion fails, by 9+ orders of magnitude.
  no_nme = c._replace(nme=jnp.zeros_like(c.nme))
  assert hessian.deep_linear_row(no_nme, layer_ids).verdict == "fail"
  assert hessian.identity_error(no_nme) > hessian.NONZERO


def test_kink_share_matches_quadrature():
  # The closed form of the share of |phi_1''| near the kink against a
  # trapezoid rule on sam_jax's closed-form beta-GELU second derivative.
  t = np.linspace(0.0, 12.0, 200_001)
  density = np.abs(np.asarray(activations.beta_gelu_second(jnp.asarray(t))))
  cum = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2)])
  for window in (0.5, math.sqrt(2.0), 3.0):
    numeric = np.interp(window, t, cum) / cum[-1]
    assert abs(hessian._kink_share(window) - numeric) < 1e-8
  assert abs(hessian._kink_share(hessian._kink_quantile(0.9)) - 0.9) < 1e-12


def test_weight_noise_expansion_and_trace():
  m = hessian.measure_weight_noise(
    (1e-3, 1e-2, 1.0), num_pairs=2**12, num_probes=300
  )
  assert hessian.trace_row(m).verdict == "pass"
  assert hessian.weight_noise_row(m).verdict == "holds"
  # Negative controls: at sigma = 1 the O(sigma^4) terms put Tr H/2 far
  # outside the CI, and Tr GN/2 is outside it even at the smallest sigma.
  assert abs(m.mean[-1] - m.trace_h / 2) > 3 * m.half[-1]
  assert abs(m.mean[0] - m.trace_gn / 2) > 3 * m.half[0]


def test_bad_input():
  with pytest.raises(ValueError, match="loss"):
    hessian.problem(jnp.tanh, loss="hinge", **SIZES)
  obj, params, batch = hessian.noise_problem()
  with pytest.raises(ValueError, match="num_pairs"):
    hessian.weight_noise_ratios(
      obj, params, batch, (0.1,), 1000, jax.random.PRNGKey(0)
    )
