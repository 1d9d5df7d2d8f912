"""The theory checks of PAPERS.md A3 (linear logistic) and A4 (two-layer
linear), at tiny size: the same `check_*` functions `python -m theory` runs.

Identities are asserted to float64 rounding; each comes with a negative
control (a wrong formula or a wrong variant), so the comparison can fail.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from theory import linear_logistic as ll
from theory import two_layer_linear as tl

# Float64 identities: observed errors are ~1e-16; 1e-13 leaves headroom.
EXACT = 1e-13


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def test_one_sam_reweighting_matches_sam_jax():
  result = ll.check_reweighting(n=12, d=4, seeds=2)
  assert result.passed and result.error < EXACT, result


def test_reweighting_control_wrong_radius_fails():
  w, x, t = ll._random_problem(jax.random.PRNGKey(0), 12, 4, 2.0)
  a_B, g_BxD = ll.closed_form_one_sam(w, x, t, 0.33)  # sam_jax uses 0.3
  err = ll.rel_err(ll.per_example_sam(w, x, t, 0.3), a_B[:, None] * g_BxD)
  assert err > 1e-3


def test_weight_properties():
  result = ll.check_weight_properties(samples=30, d=4, margins=9)
  assert result.passed, result


def test_jsam_is_sgd_but_sam_is_not():
  result = ll.check_jsam_is_sgd(n=12, d=4, seeds=2)
  assert result.passed and result.error < EXACT, result
  # Control: full 1-SAM is not SGD, so the comparison can tell them apart.
  w, x, t = ll._random_problem(jax.random.PRNGKey(1), 12, 4, 2.0)
  sgd = ll.closed_form_one_sam(w, x, t, 0.3)[1].mean(0)
  assert ll.rel_err(ll.batch_one_sam(w, x, t, 0.3), sgd) > 1e-2


def test_gaussian_mixture_noise_and_validation():
  mix = ll.gaussian_mixture(40, 10, 6, num_classes=3, noise_rate=0.25, seed=1)
  assert mix.x.shape == (40, 6) and mix.x_test.shape == (10, 6)
  assert int(mix.noisy.sum()) == 10
  with pytest.raises(ValueError, match="d must be"):
    ll.gaussian_mixture(10, 10, 2, num_classes=3)


def test_label_noise_experiment_tiny(tmp_path):
  rows = ll.check_label_noise(
    tmp_path, rhos=(0.0, 0.4), seeds=2, n=60, n_test=100, d=10, steps=40
  )
  assert len(rows) == 2
  assert all(np.isfinite(r.error) for r in rows)
  assert all(r.passed for r in rows), rows
  assert (tmp_path / "linear_logistic_init0.png").exists()
  with pytest.raises(ValueError, match="rhos"):
    ll.check_label_noise(None, rhos=(0.1, 0.2), seeds=1, n=10, steps=2)


def test_half_decay_step_and_ties():
  ratio = jnp.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.6])  # halfway = 0.8
  assert int(ll.half_decay_step(ratio)) == 2
  np.testing.assert_array_equal(
    ll.correct(jnp.array([-2.0, 0.0, 3.0])), [0.0, 0.5, 1.0]
  )


@pytest.mark.parametrize("num_classes", [1, 3])
def test_jsam_equals_penalized_sgd(num_classes):
  result = tl.check_jsam_penalty(num_classes, n=6, d=4, hidden=3, seeds=2)
  assert result.passed and result.error < EXACT, result


@pytest.mark.parametrize("num_classes", [1, 3])
def test_penalty_control_wrong_constant_fails(num_classes):
  result = tl.check_jsam_penalty(
    num_classes, n=6, d=4, hidden=3, seeds=1, constant=1.0
  )
  assert not result.passed and result.error > 1e-3, result
  assert tl.constant_control([result]).passed


def test_a4_weights_match_penalty_gradient():
  # The batch-averaged weights reproduce the penalty's gradient on v.
  params, x, t = tl._random_problem(jax.random.PRNGKey(2), 7, 4, 3, 1)
  rho = 0.2
  lambda_w, _ = tl.a4_weights(params, x, t, rho)
  grads = tl._penalty_gradients(params, x, t, rho, 1, 0.5)
  loss_grads = tl._penalty_gradients(params, x, t, 0.0, 1, 0.5)
  pen_v = (grads["head"]["kernel"] - loss_grads["head"]["kernel"]).mean(0)
  np.testing.assert_allclose(
    pen_v, 2 * lambda_w * params["head"]["kernel"], rtol=1e-12
  )


def test_explicit_penalty_experiment_tiny(tmp_path):
  rows = tl.check_explicit_penalty(
    tmp_path, seeds=2, n=40, n_test=60, d=8, hidden=4, steps=10
  )
  assert len(rows) == 6
  assert all(np.isfinite(r.error) for r in rows)
  assert (tmp_path / "two_layer_linear_penalty.png").exists()
  with pytest.raises(ValueError, match="method"):
    mix = ll.gaussian_mixture(8, 8, 4)
    tl.train("gd", mix, None, hidden=2, lr=0.1, steps=1)
