"""sam_jax: sharpness-aware minimization, its logit/Jacobian split, and the
Gauss-Newton / NME structure of the Hessian, as pure JAX functions and optax
transforms."""

from sam_jax.objective import (
  Batch,
  Objective,
  logistic_loss,
  mse,
  softmax_cross_entropy,
)
from sam_jax.sam import (
  VARIANTS,
  SamState,
  ascent_direction,
  dual_vector,
  global_norm,
  sam,
  sam_gradient,
)

__version__ = "0.1.0"
