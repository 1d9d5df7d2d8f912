"""Spectra and traces of a symmetric linear map given only as a matvec.

Every function takes `matvec(v) -> M v` on parameter-shaped pytrees (e.g.
`lambda v: curvature.gnvp(obj, params, batch, v)`, the Hessian, the NME, or
a user's own) and `params`, which fixes the pytree structure and dtype.
Vectors are flattened with `ravel_pytree` only here, at the boundary.

Loops over matvecs are one `lax.fori_loop` each, fully unrolled or rolled
by the `unroll` argument. `unroll=None` unrolls on CPU for up to
`MAX_AUTO_UNROLL` steps and rolls otherwise (and always on GPU/TPU).
Why: XLA:CPU leaves the backward (filter/input-gradient) convolutions inside
a while-loop body in a slow non-canonical form, so on the MNIST-1D CNN a
rolled Lanczos or power iteration measured ~10x slower per step than the
unrolled one, which runs at the cost of its matvecs
(benchmarks/curvature_cost.py). Unrolling costs compile time linear in the
number of steps (Lanczos k=30 on that CNN: 27 s unrolled against 4 s
rolled, 2 shared CPU cores), so for a one-off spectrum on CPU pass
`unroll=False`; MLPs (no convolutions) lose nothing when rolled.
Nothing here jits itself; `num_iters`, `num_samples`, `unroll` and the grid
size are static.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import flatten_util

Array = jax.Array
Params = Any
MatVec = Callable[[Params], Params]

_DISTS = ("rademacher", "gaussian")


def _flat_matvec(matvec: MatVec, params: Params):
  flat, unravel = flatten_util.ravel_pytree(params)
  mv = lambda q: flatten_util.ravel_pytree(matvec(unravel(q)))[0]
  return flat, unravel, mv


MAX_AUTO_UNROLL = 64


def _resolve_unroll(unroll: bool | int | None, num_iters: int) -> bool | int:
  if unroll is None:
    cpu = jax.default_backend() == "cpu"
    return cpu and num_iters <= MAX_AUTO_UNROLL
  return unroll


def _probes(key: Array, num: int, dim: int, dist: str, dtype) -> Array:
  if dist == "rademacher":
    return jax.random.rademacher(key, (num, dim), dtype=dtype)
  if dist == "gaussian":
    return jax.random.normal(key, (num, dim), dtype=dtype)
  raise ValueError(f"dist must be one of {_DISTS}, got {dist!r}")


def _check_iters(name: str, num: int, dim: int | None = None) -> None:
  if not isinstance(num, int) or num < 1:
    raise ValueError(f"{name} must be a positive int, got {num!r}")
  if dim is not None and num > dim:
    raise ValueError(f"{name}={num} exceeds the dimension {dim}")


def _orthogonalize(basis_KxP: Array, w_NxP: Array) -> tuple[Array, Array]:
  """Classical Gram-Schmidt twice on rows; returns (after 1 pass, after 2)."""
  w1 = w_NxP - (w_NxP @ basis_KxP.T) @ basis_KxP
  return w1, w1 - (w1 @ basis_KxP.T) @ basis_KxP


def _lanczos_flat(mv, q0_P: Array, num_iters: int, key: Array, unroll):
  """Lanczos with full reorthogonalisation on flat vectors.

  Returns `(alpha [k], beta [k], Q [k, P])` with `T = tridiag(beta[:-1],
  alpha, beta[:-1])` and `Q M Q^T = T`. On breakdown (the new vector lies in
  the span of Q by the "twice is enough" test), beta is set to 0 and the
  recurrence restarts from a random vector orthogonal to Q, so `T`'s
  eigenvalues stay eigenvalues of `M` (e.g. low-rank GN, num_iters = P).
  """
  dim = q0_P.size
  # Restart candidates are cyclic shifts of one Gaussian vector: linearly
  # independent with probability 1, so each restart adds a new direction,
  # and no random-number graph sits in the loop body.
  r0 = jax.random.normal(key, (dim,), q0_P.dtype)
  # One spare row so that the last step's write stays in bounds.
  basis = jnp.zeros((num_iters + 1, dim), q0_P.dtype).at[0].set(q0_P)
  alpha = jnp.zeros((num_iters,), q0_P.dtype)
  beta = jnp.zeros((num_iters,), q0_P.dtype)

  def body(j, carry):
    basis, alpha, beta = carry
    q = basis[j]
    w = mv(q)
    alpha = alpha.at[j].set(jnp.vdot(q, w))
    # The new vector and the restart candidate are orthogonalised together
    # (two-row products: fewer kernels, so an unrolled loop compiles
    # faster than with a lax.cond). Rows > j of `basis` are zero; with a
    # static j (unrolled) only rows 0..j are read, halving the traffic.
    rows = basis[: j + 1] if isinstance(j, int) else basis
    w1, w2 = _orthogonalize(rows, jnp.stack([w, jnp.roll(r0, j + 1)]))
    n1, n2 = jnp.linalg.norm(w1, axis=1), jnp.linalg.norm(w2, axis=1)
    breakdown = n2[0] <= n1[0] * jnp.sqrt(0.5).astype(n1.dtype)
    safe = jnp.where(n2 > 0, n2, 1)
    q_next = jnp.where(breakdown, w2[1] / safe[1], w2[0] / safe[0])
    beta = beta.at[j].set(jnp.where(breakdown, 0.0, n2[0]))
    basis = basis.at[j + 1].set(q_next)
    return basis, alpha, beta

  carry = (basis, alpha, beta)
  if unroll is True:  # a straight-line program with static indices
    for j in range(num_iters):
      carry = body(j, carry)
  else:
    carry = jax.lax.fori_loop(0, num_iters, body, carry, unroll=unroll)
  basis, alpha, beta = carry
  return alpha, beta, basis[:num_iters]


def _tridiag(alpha: Array, beta: Array) -> Array:
  off = beta[:-1]
  return jnp.diag(alpha) + jnp.diag(off, 1) + jnp.diag(off, -1)


def lanczos(
  matvec: MatVec,
  params: Params,
  num_iters: int,
  key: Array,
  *,
  return_vectors: bool = False,
  unroll: bool | int | None = None,
):
  """Ritz values (and vectors) of a symmetric map by Lanczos.

  Builds an orthonormal Krylov basis `Q` of `num_iters` vectors from a
  Gaussian start vector with full reorthogonalisation (Gram-Schmidt twice
  per step), and diagonalises `T = Q M Q^T`. Costs `num_iters` matvecs plus
  `O(num_iters^2 P)` flops. The extreme Ritz values converge first; with
  `num_iters = P` they are all eigenvalues of `M`.

  Args:
    matvec: symmetric linear `v -> M v` on pytrees shaped like `params`.
    params: pytree fixing structure and dtype (its values are not used).
    num_iters: number of Lanczos steps k, `1 <= k <= P` (static).
    key: PRNG key for the start vector (and restarts after breakdown).
    return_vectors: also return the Ritz vectors.
    unroll: `True` unrolls the loop, `False`/int rolls it (`fori_loop`
      unroll factor), `None` unrolls on CPU up to `MAX_AUTO_UNROLL` steps
      (see the module docstring for the compile/run trade-off).

  Returns:
    Ritz values `[k]` in ascending order; with `return_vectors`, a tuple
    `(values, vectors)` where `vectors` is a params-shaped pytree whose
    leaves have a leading axis k, unit norm, in the order of `values`.
  """
  flat, unravel, mv = _flat_matvec(matvec, params)
  _check_iters("num_iters", num_iters, flat.size)
  k_start, k_restart = jax.random.split(key)
  q0 = jax.random.normal(k_start, flat.shape, flat.dtype)
  q0 = q0 / jnp.linalg.norm(q0)
  alpha, beta, basis = _lanczos_flat(
    mv, q0, num_iters, k_restart, _resolve_unroll(unroll, num_iters)
  )
  values, s_KxK = jnp.linalg.eigh(_tridiag(alpha, beta))
  if not return_vectors:
    return values
  return values, jax.vmap(unravel)(s_KxK.T @ basis)


def power_iteration(
  matvec: MatVec,
  params: Params,
  key: Array,
  num_iters: int,
  *,
  unroll: bool | int | None = None,
) -> tuple[Array, Params]:
  """Eigenvalue of largest magnitude by power iteration.

  `v <- M v / ||M v||` from a Gaussian start, `num_iters` matvecs. Returns
  the Rayleigh quotient `v^T M v` of the last iterate (signed: it is the
  eigenvalue with the largest |lambda|, which for a PSD map such as GN is
  the top eigenvalue) and the next unit iterate. Converges as
  `(|lambda_2| / |lambda_1|)^(2 num_iters)`; if `lambda` and `-lambda` are
  both extreme it does not converge (use `lanczos`). `unroll` as in
  `lanczos`.

  Returns:
    `(eigenvalue, eigenvector)`, the vector shaped like `params`.
  """
  flat, unravel, mv = _flat_matvec(matvec, params)
  _check_iters("num_iters", num_iters)
  v = jax.random.normal(key, flat.shape, flat.dtype)
  v = v / jnp.linalg.norm(v)

  def body(_, carry):
    v, _ = carry
    w = mv(v)
    norm = jnp.linalg.norm(w)
    return w / jnp.where(norm > 0, norm, 1), jnp.vdot(v, w)

  v, eigenvalue = jax.lax.fori_loop(
    0,
    num_iters,
    body,
    (v, jnp.zeros((), flat.dtype)),
    unroll=_resolve_unroll(unroll, num_iters),
  )
  return eigenvalue, unravel(v)


def hutchinson_trace(
  matvec: MatVec,
  params: Params,
  key: Array,
  num_samples: int,
  *,
  dist: str = "rademacher",
) -> Array:
  """Hutchinson's estimate `mean_s z_s^T M z_s` of `Tr M`.

  Unbiased for `E[z z^T] = I`. Variance per sample: Rademacher
  `2 (||M||_F^2 - sum_i M_ii^2)`, Gaussian `2 ||M||_F^2`. The
  `num_samples` matvecs are vmapped (memory of that many products).
  """
  flat, unravel, mv = _flat_matvec(matvec, params)
  _check_iters("num_samples", num_samples)
  z_SxP = _probes(key, num_samples, flat.size, dist, flat.dtype)
  return jnp.mean(jnp.sum(z_SxP * jax.vmap(mv)(z_SxP), axis=-1))


def hutchpp_trace(
  matvec: MatVec,
  params: Params,
  key: Array,
  num_samples: int,
  *,
  dist: str = "rademacher",
) -> Array:
  """Hutch++ estimate of `Tr M` (Meyer, Musco, Musco, Woodruff 2021).

  With `k = num_samples // 3` and `g = num_samples - 2k` (so exactly
  `num_samples` matvecs): `Q = qr(M S)` for k probes S, then
  `Tr(Q^T M Q) + (1/g) Tr(G^T P M P G)` with `P = I - Q Q^T` and g probes
  G. Unbiased; exact when `rank M <= k`. Needs `num_samples >= 3`.
  """
  flat, unravel, mv = _flat_matvec(matvec, params)
  _check_iters("num_samples", num_samples)
  if num_samples < 3:
    raise ValueError(f"num_samples must be >= 3, got {num_samples}")
  k = num_samples // 3
  g = num_samples - 2 * k
  key_s, key_g = jax.random.split(key)
  s_KxP = _probes(key_s, k, flat.size, dist, flat.dtype)
  q_PxK, _ = jnp.linalg.qr(jax.vmap(mv)(s_KxP).T)
  q_KxP = q_PxK.T
  low_rank = jnp.sum(q_KxP * jax.vmap(mv)(q_KxP))
  g_GxP = _probes(key_g, g, flat.size, dist, flat.dtype)
  g_GxP = g_GxP - (g_GxP @ q_PxK) @ q_KxP
  residual = jnp.sum(g_GxP * jax.vmap(mv)(g_GxP)) / g
  return low_rank + residual


class SpectralDensity(NamedTuple):
  """Smoothed spectral density from stochastic Lanczos quadrature."""

  grid: Array  # [G] eigenvalue axis
  density: Array  # [G] integrates to 1 over the grid
  nodes: Array  # [num_probes, num_iters] Ritz values per probe
  weights: Array  # [num_probes, num_iters] quadrature weights, rows sum to 1


def spectral_density(
  matvec: MatVec,
  params: Params,
  key: Array,
  num_iters: int,
  num_probes: int,
  *,
  grid: int | Array = 1024,
  sigma: float | None = None,
  dist: str = "gaussian",
  unroll: bool | int | None = None,
  probe_batch_size: int | None = None,
) -> SpectralDensity:
  """Spectral density by stochastic Lanczos quadrature (SLQ).

  For each unit probe `v`, Lanczos from `v` gives `T = S diag(theta) S^T`
  and the Gauss quadrature `v^T f(M) v ~ sum_j S_0j^2 f(theta_j)`, exact
  for polynomials of degree < 2 num_iters. Averaging over probes estimates
  `(1/P) Tr f(M)`; with `f` a Gaussian of width `sigma` it gives the density
  `phi(t) = mean_v sum_j w_j N(t; theta_j, sigma^2)` (Ghorbani, Krishnan,
  Xiao 2019). Probes are vmapped (memory `num_probes * num_iters * P`)
  unless `probe_batch_size` is set (then `lax.map` in chunks of that size).

  Args:
    matvec: symmetric linear map on params-shaped pytrees.
    params: pytree fixing structure and dtype.
    key: PRNG key.
    num_iters: Lanczos steps per probe (static, `<= P`).
    num_probes: number of probe vectors (static).
    grid: number of grid points (spanning the nodes +- 6 sigma) or an
      explicit 1-D array of points.
    sigma: Gaussian width; default 1% of the Ritz value range.
    dist: "gaussian" or "rademacher" probes (normalised to unit norm).
    unroll: as in `lanczos`.
    probe_batch_size: probes per chunk of a sequential `lax.map`; None runs
      all probes at once.

  Returns:
    `SpectralDensity(grid, density, nodes, weights)`.
  """
  flat, unravel, mv = _flat_matvec(matvec, params)
  _check_iters("num_iters", num_iters, flat.size)
  _check_iters("num_probes", num_probes)
  if isinstance(grid, int) and grid < 2:
    raise ValueError(f"grid must have at least 2 points, got {grid}")
  if not isinstance(grid, int) and jnp.ndim(grid) != 1:
    raise ValueError(f"grid must be 1-D, got shape {jnp.shape(grid)}")
  if probe_batch_size is not None:
    _check_iters("probe_batch_size", probe_batch_size)
  unroll = _resolve_unroll(unroll, num_iters)
  key_v, key_r = jax.random.split(key)
  v_NxP = _probes(key_v, num_probes, flat.size, dist, flat.dtype)

  def one_probe(v, k):
    alpha, beta, _ = _lanczos_flat(
      mv, v / jnp.linalg.norm(v), num_iters, k, unroll
    )
    theta, s_KxK = jnp.linalg.eigh(_tridiag(alpha, beta))
    return theta, s_KxK[0] ** 2

  keys = jax.random.split(key_r, num_probes)
  if probe_batch_size is None:
    nodes, weights = jax.vmap(one_probe)(v_NxP, keys)
  else:
    nodes, weights = jax.lax.map(
      lambda a: one_probe(*a), (v_NxP, keys), batch_size=probe_batch_size
    )
  lo, hi = jnp.min(nodes), jnp.max(nodes)
  if sigma is None:
    sigma = 0.01 * (hi - lo)
    sigma = jnp.where(sigma > 0, sigma, 0.01 * jnp.maximum(jnp.abs(hi), 1.0))
  sigma = jnp.asarray(sigma, flat.dtype)
  if isinstance(grid, int):
    grid = jnp.linspace(lo - 6 * sigma, hi + 6 * sigma, grid, dtype=flat.dtype)
  grid = jnp.asarray(grid, flat.dtype)
  gauss = jnp.exp(-0.5 * ((grid[:, None, None] - nodes) / sigma) ** 2)
  gauss = gauss / (sigma * jnp.sqrt(2 * jnp.pi))
  density = jnp.sum(gauss * weights, axis=(1, 2)) / num_probes
  return SpectralDensity(grid, density, nodes, weights)
