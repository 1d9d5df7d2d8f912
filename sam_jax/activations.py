"""Activations and the second-derivative interventions of PAPERS.md B2-B3.

Within one layer the NME block of the Hessian depends on the activation only
through its second derivative phi''. The interventions below keep a
network's forward pass and gradient unchanged and only change what a
second-order pass (a gradient penalty's double backprop, an HVP) sees:

  beta_gelu(x, beta)           x Phi(beta x): GELU at beta = 1, ReLU as
                               beta -> inf.
  nme_ablated(phi)             phi, phi' unchanged; phi'' = 0.
  relu_with_synthetic_nme(b)   ReLU, step function; phi'' = beta-GELU's.

All are elementwise and built with `jax.custom_jvp`, so they work under
`jit`, `vmap`, `grad` and nested differentiation. `get(name)` selects one by
name (the config value).
"""

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import ndtr

Array = jax.Array
Activation = Callable[[Array], Array]

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _check_beta(beta) -> None:
  # Only concrete values can be checked; a traced beta is the caller's job.
  if isinstance(beta, (int, float)) and not beta > 0:
    raise ValueError(f"beta must be > 0, got {beta}")


def _normal_pdf(x: Array) -> Array:
  return jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI


def beta_gelu(x: Array, beta: float = 1.0) -> Array:
  """beta-GELU `phi(x) = x Phi(beta x)` (PAPERS.md B2).

  `Phi` is the standard normal CDF. `beta = 1` is the exact GELU
  (`jax.nn.gelu(x, approximate=False)`); as `beta -> inf` it tends to ReLU.
  Derivatives (N the standard normal density):

    phi'(x)  = Phi(beta x) + beta x N(beta x)
    phi''(x) = beta N(beta x) (2 - beta^2 x^2)      (`beta_gelu_second`)

  Args:
    x: pre-activations, any shape.
    beta: sharpness, > 0.

  Returns:
    `x * Phi(beta * x)`, shaped like x.
  """
  _check_beta(beta)
  return x * ndtr(beta * x)


def beta_gelu_second(x: Array, beta: float = 1.0) -> Array:
  """Closed-form second derivative of beta-GELU, `beta N(beta x)(2 - b^2x^2)`.

  This is the smooth surrogate phi'' that `relu_with_synthetic_nme` injects
  into second-order passes (PAPERS.md B3).
  """
  _check_beta(beta)
  bx = beta * x
  return beta * _normal_pdf(bx) * (2.0 - bx * bx)


def nme_ablated(phi: Activation) -> Activation:
  """The activation `phi` with its second derivative removed (PAPERS.md B3).

  Forward value and first derivative equal those of the elementwise `phi`;
  the tangent rule is `t -> SG[phi'(x)] t`, so any second differentiation
  sees `phi'' = 0`. In a penalty's double backprop (PSAM) this drops the
  activation's NME terms: GELU then behaves like ReLU.

  Args:
    phi: an elementwise activation, differentiable once.

  Returns:
    The ablated activation (a `jax.custom_jvp` function of one array).
  """
  if not callable(phi):
    raise ValueError(f"phi must be callable, got {phi!r}")

  @jax.custom_jvp
  def ablated(x: Array) -> Array:
    return phi(x)

  @ablated.defjvp
  def _ablated_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    # phi is elementwise, so one forward pass with unit tangents gives phi'.
    y, dy = jax.jvp(phi, (x,), (jnp.ones_like(x),))
    return y, lax.stop_gradient(dy) * t

  return ablated


def relu_with_synthetic_nme(beta: float = 1.0) -> Activation:
  """ReLU whose second-order passes see beta-GELU's phi'' (PAPERS.md B3).

  Forward `max(x, 0)`, first derivative the step `1[x > 0]`, but the step's
  own derivative (which is 0 almost everywhere for true ReLU) is replaced by
  `beta_gelu_second(x, beta)`. Gradients, and so SGD and SAM, are exactly
  those of ReLU; a gradient penalty or an HVP sees a smooth NME.

  Args:
    beta: sharpness of the surrogate, a Python number > 0.

  Returns:
    The activation (a `jax.custom_jvp` function of one array).
  """
  _check_beta(beta)

  @jax.custom_jvp
  def step(x: Array) -> Array:
    return (x > 0).astype(x.dtype)

  @step.defjvp
  def _step_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return step(x), beta_gelu_second(x, beta) * t

  @jax.custom_jvp
  def relu(x: Array) -> Array:
    return jnp.maximum(x, 0)

  @relu.defjvp
  def _relu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return relu(x), step(x) * t

  return relu


def gelu(x: Array) -> Array:
  """Exact GELU `x Phi(x)` (not the tanh approximation)."""
  return jax.nn.gelu(x, approximate=False)


_NAMES = (
  "relu",
  "gelu",
  "beta-gelu",
  "nme-ablated-gelu",
  "relu-synthetic-nme",
)


def get(name: str, beta: float = 1.0) -> Activation:
  """An activation by name, for configs.

  Names: `relu`; `gelu` (exact); `beta-gelu` (`beta_gelu` at `beta`);
  `nme-ablated-gelu` (`nme_ablated(beta_gelu(., beta))`, plain GELU at the
  default beta = 1); `relu-synthetic-nme` (`relu_with_synthetic_nme(beta)`).
  `beta` is ignored by `relu` and `gelu`.

  Raises:
    ValueError: unknown name, or beta <= 0.
  """
  _check_beta(beta)
  if name == "relu":
    return jax.nn.relu
  if name == "gelu":
    return gelu
  if name == "beta-gelu":
    return functools.partial(beta_gelu, beta=beta)
  if name == "nme-ablated-gelu":
    return nme_ablated(functools.partial(beta_gelu, beta=beta))
  if name == "relu-synthetic-nme":
    return relu_with_synthetic_nme(beta)
  raise ValueError(f"unknown activation name {name!r}; valid: {_NAMES}")
