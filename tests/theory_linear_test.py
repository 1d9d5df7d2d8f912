"""theory/linear_logistic.py and theory/two_layer_linear.py (PAPERS.md A3,
A4): the helpers, and the negative controls of the identities (a wrong
formula or a wrong variant), so each comparison can fail. The rows
themselves run once, at tiny size, in tests/theory_main_test.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from theory import linear_logistic as ll
from theory import two_layer_linear as tl


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def test_reweighting_control_wrong_radius_fails():
  w, x, t = ll._random_problem(jax.random.PRNGKey(0), 12, 4, 2.0)
  a_B, g_BxD = ll.closed_form_one_sam(w, x, t, 0.33)  # sam_jax uses 0.3
  err = ll.rel_err(ll.per_example_sam(w, x, t, 0.3), a_B[:, None] * g_BxD)
  assert err > 1e-3


def test_one_sam_is_not_sgd():
  # Control of the J-SAM = SGD identity (tests/theory_main_test.py): full
  # 1-SAM is not SGD, so the comparison can tell them apart.
  w, x, t = ll._random_problem(jax.random.PRNGKey(1), 12, 4, 2.0)
  sgd = ll.closed_form_one_sam(w, x, t, 0.3)[1].mean(0)
  assert ll.rel_err(ll.batch_one_sam(w, x, t, 0.3), sgd) > 1e-2


def test_gaussian_mixture_noise_and_validation():
  mix = ll.gaussian_mixture(40, 10, 6, num_classes=3, noise_rate=0.25, seed=1)
  assert mix.x.shape == (40, 6) and mix.x_test.shape == (10, 6)
  assert int(mix.noisy.sum()) == 10
  with pytest.raises(ValueError, match="d must be"):
    ll.gaussian_mixture(10, 10, 2, num_classes=3)


def test_label_noise_experiment_needs_gd_first():
  # The experiment itself runs in tests/theory_main_test.py.
  with pytest.raises(ValueError, match="rhos"):
    ll.check_label_noise(None, rhos=(0.1, 0.2), seeds=1, n=10, steps=2)


def test_half_decay_step_and_ties():
  ratio = jnp.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.6])  # halfway = 0.8
  assert int(ll.half_decay_step(ratio)) == 2
  np.testing.assert_array_equal(
    ll.correct(jnp.array([-2.0, 0.0, 3.0])), [0.0, 0.5, 1.0]
  )


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


def test_train_refuses_an_unknown_method():
  # The experiment itself runs in tests/theory_main_test.py.
  with pytest.raises(ValueError, match="method"):
    mix = ll.gaussian_mixture(8, 8, 4)
    tl.train("gd", mix, None, hidden=2, lr=0.1, steps=1)
