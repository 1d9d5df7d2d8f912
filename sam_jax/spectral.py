"""Spectra and traces of a symmetric linear map given only as a matvec.

Every function takes `matvec(v) -> M v` on parameter-shaped pytrees (e.g.
`lambda v: curvature.gnvp(obj, params, batch, v)`, the Hessian, the NME, or
a user's own) and `params`, which fixes the pytree structure and dtype.
Vectors are flattened with `ravel_pytree` only here, at the boundary.

Loops over matvecs are one `lax.fori_loop` each, rolled by default
(`unroll=None`: one loop body, compiled once, on every backend). On CPU a
rolled loop used to be slow: XLA:CPU brings convolutions into the layout of
its fast kernel only in a program's top-level computation, so inside a
while-loop body the backward convolutions of an HVP ran a generic kernel,
and a 20-step Lanczos on the 3-conv CNN of benchmarks/curvature_cost.py
cost 15x its 20 HVPs rolled (1.2x unrolled, at compile time linear in k).
`canonicalize_convs` rewrites every convolution of the matvec into that
layout (same arithmetic), so rolled loops run at the cost of their
matvecs: measured on that CNN (batch 128, 2 CPU cores, 2026-12-04),
`lanczos` k=20 costs 1.08x its 20 HVPs (40x a gradient; PyHessian's
20-step power iteration is ~41-43x in PyTorch on the same CPU) and compiles
in 1.5 s; unrolled it costs 1.11x and compiles in 5.6 s. Off CPU the
rewrite is a no-op and the loop is rolled. The basis lives in the loop
carry, written in place one row per step: no copy of it per step.
Nothing here jits itself; `num_iters`, `num_samples`, `unroll` and the grid
size are static.
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import flatten_util
from jax.extend import core as jex_core

Array = jax.Array
Params = Any
MatVec = Callable[[Params], Params]

_DISTS = ("rademacher", "gaussian")


def _flat_matvec(matvec: MatVec, params: Params):
  flat, unravel = flatten_util.ravel_pytree(params)
  mv = lambda q: flatten_util.ravel_pytree(matvec(unravel(q)))[0]
  return flat, unravel, mv


def _resolve_unroll(unroll: bool | int | None) -> bool | int:
  return False if unroll is None else unroll


_CONV = jax.lax.conv_general_dilated_p


def _has_conv(jaxpr) -> bool:
  return any(e.primitive is _CONV for e in jaxpr.eqns) or any(
    _has_conv(sub) for sub in jex_core.subjaxprs(jaxpr)
  )


def _canonical_conv(lhs, rhs, *, dimension_numbers, **params):
  """One convolution in XLA:CPU's canonical layout (NWC, WIO -> NWC).

  The operands are transposed into batch-spatial-feature and
  spatial-in-out order, and the result back: the same numbers, but the
  form that XLA:CPU maps to its fast (Eigen) kernel in any computation.
  """
  lhs_spec, rhs_spec, out_spec = map(tuple, dimension_numbers)
  n = len(lhs_spec)
  nwc = (0, n - 1, *range(1, n - 1))
  wio = (n - 1, n - 2, *range(n - 2))
  if lhs_spec == out_spec == nwc and rhs_spec == wio:
    return _CONV.bind(lhs, rhs, dimension_numbers=dimension_numbers, **params)
  lhs = jax.lax.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
  rhs = jax.lax.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
  dnums = jax.lax.ConvDimensionNumbers(nwc, wio, nwc)
  out = _CONV.bind(lhs, rhs, dimension_numbers=dnums, **params)
  perm = [0] * n
  perm[out_spec[0]], perm[out_spec[1]] = 0, n - 1
  for i, d in enumerate(out_spec[2:]):
    perm[d] = i + 1
  return jax.lax.transpose(out, perm)


def _rewrite_param(value):
  if isinstance(value, jex_core.ClosedJaxpr):
    return _rewrite_closed(value)
  if (
    isinstance(value, tuple)
    and value
    and all(isinstance(v, jex_core.ClosedJaxpr) for v in value)
  ):
    return tuple(_rewrite_closed(v) for v in value)
  return value


def _rewrite_closed(closed):
  if not _has_conv(closed.jaxpr):
    return closed
  avals = [v.aval for v in closed.jaxpr.invars]
  fn = lambda *args: _eval_canonical(closed.jaxpr, closed.consts, args)
  return jax.make_jaxpr(fn)(*avals)


def _eval_canonical(jaxpr, consts, args) -> list:
  """`eval_jaxpr` with every convolution (also in loop bodies, branches
  and nested calls) replaced by `_canonical_conv`."""
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    if eqn.primitive is _CONV:
      outs = [_canonical_conv(*ins, **eqn.params)]
    else:
      params = eqn.primitive.get_bind_params(eqn.params)
      params = {k: _rewrite_param(v) for k, v in params.items()}
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*ins, **params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for v, out in zip(eqn.outvars, outs, strict=True):
      if not isinstance(v, jex_core.DropVar):
        env[v] = out
  return [read(v) for v in jaxpr.outvars]


def canonicalize_convs(fn: Callable) -> Callable:
  """`fn` with its convolutions in XLA:CPU's fast form, also inside loops.

  XLA:CPU brings convolutions into the layout of its fast kernel only in
  the top-level computation of a program, so in a while-loop body (a
  `fori_loop`, `scan`, `lax.map`) the backward convolutions of a gradient
  or curvature product run a slow generic kernel (~15x slower measured on
  the MNIST-1D CNNs, see the module docstring). This traces `fn` to a
  jaxpr and rebinds it with every convolution, in nested calls, loops and
  branches too, transposed into that form (`_canonical_conv`): the same
  arithmetic, so the result is unchanged. A no-op off CPU and for
  functions without convolutions (then `fn` is traced once more only).
  Arguments and results are pytrees of arrays.
  """
  if jax.default_backend() != "cpu":
    return fn

  def canonical(*args):
    flat, tree = jax.tree.flatten(args)
    closed, out_shape = jax.make_jaxpr(
      lambda *xs: fn(*jax.tree.unflatten(tree, xs)), return_shape=True
    )(*flat)
    outs = _eval_canonical(closed.jaxpr, closed.consts, flat)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return canonical


def _probes(key: Array, num: int, dim: int, dist: str, dtype) -> Array:
  if dist == "rademacher":
    return jax.random.rademacher(key, (num, dim), dtype=dtype)
  if dist == "gaussian":
    return jax.random.normal(key, (num, dim), dtype=dtype)
  raise ValueError(f"dist must be one of {_DISTS}, got {dist!r}")


def _check_iters(name: str, num: int, dim: int | None = None) -> None:
  if isinstance(num, bool) or not isinstance(num, int) or num < 1:
    raise ValueError(f"{name} must be a positive int, got {num!r}")
  if dim is not None and num > dim:
    raise ValueError(f"{name}={num} exceeds the dimension {dim}")


_HI = jax.lax.Precision.HIGHEST


def _project(basis_NKP: Array, w_NMP: Array) -> Array:
  """One classical Gram-Schmidt pass `w - Q^T (Q w)` of M vectors.

  `basis [*N, K, P]`, `w [*N, M, P]` with the same leading axes N (none or
  one, e.g. probes): two matvec-shaped products with the whole basis (its
  unwritten rows are zero, so they drop out without slicing).
  """
  batch = tuple(range(basis_NKP.ndim - 2))
  nb = len(batch)
  dot = functools.partial(jax.lax.dot_general, precision=_HI)
  # Operand order matters on XLA:CPU: basis first measured 16x faster for
  # the first product (a plain gemv) than the vector first.
  c_NKM = dot(basis_NKP, w_NMP, (((nb + 1,), (nb + 1,)), (batch, batch)))
  return w_NMP - dot(c_NKM, basis_NKP, (((nb,), (nb,)), (batch, batch)))


def _unit(w_NP: Array, norm_N: Array) -> Array:
  return w_NP / jnp.where(norm_N > 0, norm_N, 1)[..., None]


def _lanczos_flat(mv, q0_NP: Array, num_iters: int, key_N: Array, unroll):
  """Lanczos with full reorthogonalisation on flat vectors.

  `q0_NP [*N, P]` is one unit start vector (N empty) or a batch of them
  (N one axis, e.g. SLQ probes, each its own recurrence); `mv` maps
  `[*N, P] -> [*N, P]` and `key_N [*N]` holds the restart keys. Returns
  `(alpha [*N, k], beta [*N, k], Q [*N, k, P])` with `T = tridiag(beta[:-1],
  alpha, beta[:-1])` and `Q M Q^T = T` for each start vector.

  Each step: `w = M q_j`, the three-term recurrence `w0 = w - alpha_j q_j -
  beta_{j-1} q_{j-1}`, then one Gram-Schmidt pass against the whole basis,
  `w1 = w0 - Q^T Q w0`. By Kahan-Parlett's "twice is enough", `w1` is kept
  when `|w1| > |w0| / sqrt 2`; otherwise (rare: a Krylov space is nearly
  exhausted) a second pass gives `w2`, and `|w2| <= |w1| / sqrt 2` means
  breakdown: beta is set to 0 and the recurrence restarts from a random
  vector orthogonalised twice against Q, so `T`'s eigenvalues stay
  eigenvalues of `M` (e.g. low-rank GN, num_iters = P). The rare branch
  is a `lax.cond` on "any start vector needs it", so a step reads the
  basis twice (under a user's vmap the cond becomes a select: six reads).
  The basis lives in the loop carry, written one row per step in place
  (`dynamic_update_slice`, i.e. `.at[j].set`): no copy of it per step.
  """
  dim, dtype = q0_NP.shape[-1], q0_NP.dtype
  half = jnp.sqrt(jnp.asarray(0.5, dtype))
  k_axis = q0_NP.ndim - 1  # the step axis of basis [*N, K, P]
  # Restart candidates are cyclic shifts of one Gaussian vector: linearly
  # independent with probability 1, so each restart adds a new direction,
  # and no random-number graph sits in the loop body.
  normal = lambda k: jax.random.normal(k, (dim,), dtype)
  r0_NP = normal(key_N) if q0_NP.ndim == 1 else jax.vmap(normal)(key_N)

  def body(j, carry):
    basis, q, q_prev, b_prev, alpha, beta = carry
    basis = jax.lax.dynamic_update_index_in_dim(basis, q, j, k_axis)
    w = mv(q)
    a = jnp.sum(q * w, axis=-1)
    w0 = w - a[..., None] * q - b_prev[..., None] * q_prev
    w1 = _project(basis, w0[..., None, :])[..., 0, :]
    n0, n1 = jnp.linalg.norm(w0, axis=-1), jnp.linalg.norm(w1, axis=-1)
    again = n1 <= n0 * half

    def keep():
      return _unit(w1, n1), n1

    def second_pass():
      r = jnp.roll(r0_NP, j + 1, axis=-1)
      w2_r1 = _project(basis, jnp.stack([w1, r], axis=-2))
      w2, r2 = w2_r1[..., 0, :], _project(basis, w2_r1[..., 1:, :])[..., 0, :]
      n2 = jnp.where(again, jnp.linalg.norm(w2, axis=-1), n1)
      w2 = jnp.where(again[..., None], w2, w1)
      breakdown = again & (n2 <= n1 * half)
      restart = _unit(r2, jnp.linalg.norm(r2, axis=-1))
      q_next = jnp.where(breakdown[..., None], restart, _unit(w2, n2))
      return q_next, jnp.where(breakdown, 0, n2)

    q_next, b = jax.lax.cond(jnp.any(again), second_pass, keep)
    alpha = jax.lax.dynamic_update_index_in_dim(alpha, a, j, k_axis)
    beta = jax.lax.dynamic_update_index_in_dim(beta, b, j, k_axis)
    return basis, q_next, q, b, alpha, beta

  lead = q0_NP.shape[:-1]
  zeros_NK = jnp.zeros((*lead, num_iters), dtype)
  carry = (
    jnp.zeros((*lead, num_iters, dim), dtype),
    q0_NP,
    jnp.zeros_like(q0_NP),
    jnp.zeros(lead, dtype),
    zeros_NK,
    zeros_NK,
  )
  if unroll is True:  # a straight-line program with static indices
    for j in range(num_iters):
      carry = body(j, carry)
  else:
    carry = jax.lax.fori_loop(0, num_iters, body, carry, unroll=unroll)
  basis, _, _, _, alpha, beta = carry
  return alpha, beta, basis


def _tridiag(alpha: Array, beta: Array) -> Array:
  off = beta[:-1]
  return jnp.diag(alpha) + jnp.diag(off, 1) + jnp.diag(off, -1)


class RitzPairs(NamedTuple):
  """Ritz values of a Lanczos run, their residual norms and vectors."""

  values: Array  # [k], ascending
  residuals: Array  # [k], ||M y_i - theta_i y_i|| for the unit Ritz vectors
  vectors: Any  # params-shaped, leading axis k (None unless requested)


def lanczos_ritz(
  matvec: MatVec,
  params: Params,
  num_iters: int,
  key: Array,
  *,
  return_vectors: bool = False,
  unroll: bool | int | None = None,
) -> RitzPairs:
  """`lanczos` with the residual norm of every Ritz pair.

  From the Lanczos relation `M Q^T = Q^T T + beta_k q_{k+1} e_k^T`, the
  residual of the Ritz pair `(theta_i, y_i = Q^T s_i)` is
  `||M y_i - theta_i y_i|| = beta_k |s_{k,i}|`: free (no extra matvec),
  and a bound on the distance from `theta_i` to an eigenvalue of `M`
  (`|theta_i - lambda| <= residual_i`). Arguments as in `lanczos`.
  """
  flat, unravel, mv = _flat_matvec(matvec, params)
  _check_iters("num_iters", num_iters, flat.size)
  k_start, k_restart = jax.random.split(key)
  q0 = jax.random.normal(k_start, flat.shape, flat.dtype)
  q0 = q0 / jnp.linalg.norm(q0)
  alpha, beta, basis_KxP = _lanczos_flat(
    canonicalize_convs(mv), q0, num_iters, k_restart, _resolve_unroll(unroll)
  )
  values, s_KxK = jnp.linalg.eigh(_tridiag(alpha, beta))
  residuals = jnp.abs(beta[-1] * s_KxK[-1])
  vectors = None
  if return_vectors:
    vectors_KxP = jnp.matmul(s_KxK.T, basis_KxP, precision=_HI)
    vectors = jax.vmap(unravel)(vectors_KxP)
  return RitzPairs(values, residuals, vectors)


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
  Gaussian start vector with full reorthogonalisation (the three-term
  recurrence, then Gram-Schmidt against the whole basis, twice where
  needed), and diagonalises `T = Q M Q^T`. Costs `num_iters` matvecs plus
  two reads of the `[num_iters, P]` basis per step (measured <= 1.15x the
  matvecs alone, module docstring). The extreme Ritz values converge
  first; with `num_iters = P` they are all eigenvalues of `M`. For the
  residual of each Ritz pair, see `lanczos_ritz`.

  Args:
    matvec: symmetric linear `v -> M v` on pytrees shaped like `params`.
    params: pytree fixing structure and dtype (its values are not used).
    num_iters: number of Lanczos steps k, `1 <= k <= P` (static).
    key: PRNG key for the start vector (and restarts after breakdown).
    return_vectors: also return the Ritz vectors.
    unroll: `None` (default) or `False` rolls the loop (one `fori_loop`
      body, compiled once), an int is the `fori_loop` unroll factor,
      `True` unrolls it into a straight-line program (compile time linear
      in k, no faster: module docstring).

  Returns:
    Ritz values `[k]` in ascending order; with `return_vectors`, a tuple
    `(values, vectors)` where `vectors` is a params-shaped pytree whose
    leaves have a leading axis k, unit norm, in the order of `values`.
  """
  ritz = lanczos_ritz(
    matvec,
    params,
    num_iters,
    key,
    return_vectors=return_vectors,
    unroll=unroll,
  )
  return (ritz.values, ritz.vectors) if return_vectors else ritz.values


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
  mv = canonicalize_convs(mv)
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
    unroll=_resolve_unroll(unroll),
  )
  return eigenvalue, unravel(v)


def _mean_and_stderr(samples_S: Array) -> tuple[Array, Array]:
  num = samples_S.shape[0]
  if num < 2:
    return jnp.mean(samples_S), jnp.full((), jnp.nan, samples_S.dtype)
  return jnp.mean(samples_S), jnp.std(samples_S, ddof=1) / jnp.sqrt(num)


def hutchinson_trace(
  matvec: MatVec,
  params: Params,
  key: Array,
  num_samples: int,
  *,
  dist: str = "rademacher",
  return_stderr: bool = False,
):
  """Hutchinson's estimate `mean_s z_s^T M z_s` of `Tr M`.

  Unbiased for `E[z z^T] = I`. Variance per sample: Rademacher
  `2 (||M||_F^2 - sum_i M_ii^2)`, Gaussian `2 ||M||_F^2`. The
  `num_samples` matvecs are vmapped (memory of that many products).
  With `return_stderr`, returns `(estimate, stderr)`, the standard error
  `std(z^T M z, ddof=1) / sqrt(num_samples)` (NaN for one sample).
  """
  flat, unravel, mv = _flat_matvec(matvec, params)
  _check_iters("num_samples", num_samples)
  z_SxP = _probes(key, num_samples, flat.size, dist, flat.dtype)
  quad_S = jnp.sum(z_SxP * canonicalize_convs(jax.vmap(mv))(z_SxP), axis=-1)
  estimate, stderr = _mean_and_stderr(quad_S)
  return (estimate, stderr) if return_stderr else estimate


def hutchpp_trace(
  matvec: MatVec,
  params: Params,
  key: Array,
  num_samples: int,
  *,
  dist: str = "rademacher",
  return_stderr: bool = False,
):
  """Hutch++ estimate of `Tr M` (Meyer, Musco, Musco, Woodruff 2021).

  With `k = num_samples // 3` and `g = num_samples - 2k` (so exactly
  `num_samples` matvecs): `Q = qr(M S)` for k probes S, then
  `Tr(Q^T M Q) + (1/g) Tr(G^T P M P G)` with `P = I - Q Q^T` and g probes
  G. Unbiased; exact when `rank M <= k`. Needs `num_samples >= 3`. With
  `return_stderr`, returns `(estimate, stderr)`: the standard error of the
  residual term over its g probes (the sketch term is exact given `Q`;
  NaN when g = 1).
  """
  flat, unravel, mv = _flat_matvec(matvec, params)
  _check_iters("num_samples", num_samples)
  if num_samples < 3:
    raise ValueError(f"num_samples must be >= 3, got {num_samples}")
  mv_S = canonicalize_convs(jax.vmap(mv))
  k = num_samples // 3
  g = num_samples - 2 * k
  key_s, key_g = jax.random.split(key)
  s_KxP = _probes(key_s, k, flat.size, dist, flat.dtype)
  q_PxK, _ = jnp.linalg.qr(mv_S(s_KxP).T)
  q_KxP = q_PxK.T
  low_rank = jnp.sum(q_KxP * mv_S(q_KxP))
  g_GxP = _probes(key_g, g, flat.size, dist, flat.dtype)
  g_GxP = g_GxP - (g_GxP @ q_PxK) @ q_KxP
  residual, stderr = _mean_and_stderr(jnp.sum(g_GxP * mv_S(g_GxP), axis=-1))
  estimate = low_rank + residual
  return (estimate, stderr) if return_stderr else estimate


class SpectralDensity(NamedTuple):
  """Smoothed spectral density from stochastic Lanczos quadrature."""

  grid: Array  # [G] eigenvalue axis
  density: Array  # [G] integrates to 1 over the grid
  nodes: Array  # [num_probes, num_iters] Ritz values per probe
  weights: Array  # [num_probes, num_iters] quadrature weights, rows sum to 1

  def plot(self, ax=None, *, log: bool = True, **line_kwargs):
    """Draws the density over the grid with matplotlib; returns the Axes.

    Args:
      ax: Axes to draw into; None uses `plt.gca()`.
      log: logarithmic density axis (the bulk near 0 dominates linearly;
        values are floored at 1e-12 of the maximum).
      **line_kwargs: passed to `ax.plot`.
    """
    import matplotlib.pyplot as plt  # Lazy: only plotting needs it.
    import numpy as np

    if ax is None:
      ax = plt.gca()
    grid, density = np.asarray(self.grid), np.asarray(self.density)
    if log:
      density = np.maximum(density, 1e-12 * max(float(density.max()), 1e-300))
      ax.set_yscale("log")
    ax.plot(grid, density, **line_kwargs)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    return ax


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
  unroll = _resolve_unroll(unroll)
  key_v, key_r = jax.random.split(key)
  v_NxP = _probes(key_v, num_probes, flat.size, dist, flat.dtype)
  v_NxP = v_NxP / jnp.linalg.norm(v_NxP, axis=1, keepdims=True)
  keys_N = jax.random.split(key_r, num_probes)
  mv_B = canonicalize_convs(jax.vmap(mv))

  def probes(v_BxP, keys_B):  # one Lanczos loop over a batch of probes
    alpha, beta, _ = _lanczos_flat(mv_B, v_BxP, num_iters, keys_B, unroll)
    theta_BxK, s_BxKxK = jnp.linalg.eigh(jax.vmap(_tridiag)(alpha, beta))
    return theta_BxK, s_BxKxK[:, 0, :] ** 2

  size = num_probes if probe_batch_size is None else probe_batch_size
  num_full = num_probes // size
  parts = []
  if num_full == 1:
    parts.append(probes(v_NxP[:size], keys_N[:size]))
  elif num_full > 1:  # sequential chunks, each a batched loop (no vmap)
    chunk = lambda a: a[: num_full * size].reshape(num_full, size, *a.shape[1:])
    out = jax.lax.map(lambda a: probes(*a), (chunk(v_NxP), chunk(keys_N)))
    parts.append(jax.tree.map(lambda o: o.reshape(-1, num_iters), out))
  if num_probes > num_full * size:
    rest = slice(num_full * size, None)
    parts.append(probes(v_NxP[rest], keys_N[rest]))
  nodes = jnp.concatenate([n for n, _ in parts])
  weights = jnp.concatenate([w for _, w in parts])
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
