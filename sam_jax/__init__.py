"""sam_jax: sharpness-aware minimization, its logit/Jacobian split, and the
Gauss-Newton / NME structure of the Hessian, as pure JAX functions and optax
transforms."""

from sam_jax import activations, data, models, regularizers
from sam_jax.curvature import (
  Curvature,
  Estimate,
  dense_matrix,
  gauss_newton_matrix,
  gnvp,
  hessian_matrix,
  hvp,
  logit_hessian_vp,
  mean_over_batches,
  nme_matrix,
  nmevp,
)
from sam_jax.objective import (
  Batch,
  Objective,
  logistic_loss,
  mse,
  softmax_cross_entropy,
)
from sam_jax.regularizers import penalized_loss, regularized_gradient
from sam_jax.sam import (
  VARIANTS,
  FastPath,
  FastPathWarning,
  SamState,
  ascent_direction,
  dual_vector,
  fast_path,
  global_norm,
  sam,
  sam_gradient,
)
from sam_jax.spectral import (
  RitzPairs,
  SpectralDensity,
  hutchinson_trace,
  hutchpp_trace,
  lanczos,
  lanczos_ritz,
  power_iteration,
  spectral_density,
)

__version__ = "0.1.0"
