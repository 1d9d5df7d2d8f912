"""Lanczos, power iteration, trace estimators and SLQ on explicit matrices.

The matvec is a dense symmetric matrix `A = U diag(lam) U^T` with a chosen
spectrum, applied to a two-leaf pytree (so unravelling is exercised); the
references are `numpy.linalg.eigh`, `trace` and `trace(A^2)`. Float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax import spectral

PARAMS = {"a": np.zeros(6), "b": np.zeros((4, 5))}  # P = 26
DIM = 26


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def sym_matrix(eigs, seed=0):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(DIM, DIM)))
  return (q * eigs) @ q.T, q


def as_matvec(a):
  a = jnp.asarray(a)

  def matvec(v):  # leaf by leaf, not through ravel_pytree
    x = jnp.concatenate([v["a"], v["b"].reshape(-1)])
    y = a @ x
    return {"a": y[:6], "b": y[6:].reshape(4, 5)}

  return matvec


def spread_spectrum(seed=0):
  rng = np.random.default_rng(seed)
  return np.sort(np.concatenate([[-3.0, 7.0], rng.uniform(-1, 2, DIM - 2)]))


@pytest.mark.parametrize("unroll", [False, True])
def test_lanczos_full_krylov_matches_eigh(unroll):
  eigs = spread_spectrum()
  a, _ = sym_matrix(eigs)
  num = DIM if unroll is False else 8  # unrolled compiles per step: keep short
  ritz = jax.jit(
    lambda a, key: spectral.lanczos(
      as_matvec(a), PARAMS, num, key, unroll=unroll
    )
  )(a, jax.random.PRNGKey(0))
  if num == DIM:
    # num_iters = P: all Ritz values are eigenvalues up to round-off.
    np.testing.assert_allclose(ritz, eigs, rtol=0, atol=1e-10 * 7.0)
  else:
    # The separated outliers 7 and -3 converge first (gaps >= 2).
    np.testing.assert_allclose(ritz[0], eigs[0], atol=1e-6)
    np.testing.assert_allclose(ritz[-1], eigs[-1], atol=1e-6)
    rolled = jax.jit(
      lambda a, key: spectral.lanczos(
        as_matvec(a), PARAMS, num, key, unroll=False
      )
    )(a, jax.random.PRNGKey(0))
    np.testing.assert_allclose(ritz, rolled, atol=1e-12)  # same arithmetic


def test_lanczos_low_rank_restarts_after_breakdown():
  eigs = np.zeros(DIM)
  eigs[:4] = [5.0, 2.0, 1.0, 0.5]  # rank 4: breakdown after ~5 steps
  a, _ = sym_matrix(np.sort(eigs))
  ritz = jax.jit(
    lambda a, key: spectral.lanczos(
      as_matvec(a), PARAMS, DIM, key, unroll=False
    )
  )(a, jax.random.PRNGKey(1))
  assert np.all(np.isfinite(ritz))
  np.testing.assert_allclose(ritz, np.sort(eigs), rtol=0, atol=1e-10 * 5.0)


def test_lanczos_partial_converges_and_returns_ritz_vectors():
  eigs = spread_spectrum()
  a, q = sym_matrix(eigs)
  k = 12
  vals, vecs = jax.jit(
    lambda a, key: spectral.lanczos(
      as_matvec(a), PARAMS, k, key, return_vectors=True, unroll=False
    )
  )(a, jax.random.PRNGKey(2))
  assert vals.shape == (k,)
  assert vecs["a"].shape == (k, 6) and vecs["b"].shape == (k, 4, 5)
  u = np.concatenate([vecs["a"], vecs["b"].reshape(k, -1)], axis=1)
  np.testing.assert_allclose(u @ u.T, np.eye(k), atol=1e-10)
  # Outliers 7 and -3 are separated from the bulk [-1, 2] by gaps >= 2,
  # so 12 steps converge them far below 1e-8 (Kaniel-Paige bound).
  for i, want in ((-1, eigs[-1]), (0, eigs[0])):
    assert abs(vals[i] - want) < 1e-8
    # Ritz value error ~ residual^2 / gap, so residual ~ sqrt(1e-8 * 2).
    assert np.linalg.norm(a @ u[i] - vals[i] * u[i]) < 1e-4


@pytest.mark.parametrize("unroll", [False, True])
def test_power_iteration_finds_largest_magnitude(unroll):
  eigs = np.linspace(-1.0, 2.0, DIM)
  eigs[0] = -5.0  # largest |lambda| is negative
  a, q = sym_matrix(eigs)
  val, vec = jax.jit(
    lambda a, key: spectral.power_iteration(
      as_matvec(a), PARAMS, key, 40, unroll=unroll
    )
  )(a, jax.random.PRNGKey(3))
  # Rayleigh quotient error ~ (2/5)^80 ~ 1e-32: round-off only.
  assert abs(val - (-5.0)) < 1e-10
  v = np.concatenate([vec["a"], vec["b"].reshape(-1)])
  # The iterate alternates in sign; its direction is q[:, 0] to ~(2/5)^40.
  assert abs(abs(v @ q[:, 0]) - 1.0) < 1e-10


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_hutchinson_within_four_standard_deviations(dist):
  a, _ = sym_matrix(spread_spectrum())
  m = 200
  est = jax.jit(
    lambda a, key: spectral.hutchinson_trace(
      as_matvec(a), PARAMS, key, m, dist=dist
    )
  )(a, jax.random.PRNGKey(4))
  fro2 = np.sum(a**2)
  var = (
    2 * (fro2 - np.sum(np.diag(a) ** 2)) if dist == "rademacher" else 2 * fro2
  )
  # Fixed seed; the bound holds for a fresh seed with prob. ~0.99994.
  assert abs(est - np.trace(a)) < 4 * np.sqrt(var / m)
  assert est != np.trace(a)  # a Monte Carlo estimate, not the exact value


def test_hutchinson_rademacher_exact_on_diagonal():
  d = np.diag(np.arange(1.0, DIM + 1))
  est = spectral.hutchinson_trace(
    as_matvec(d), PARAMS, jax.random.PRNGKey(5), 1
  )
  np.testing.assert_allclose(est, np.trace(d), rtol=1e-14)


def test_hutchpp_exact_for_low_rank_and_better_than_hutchinson():
  eigs = np.zeros(DIM)
  eigs[:4] = [5.0, -2.0, 1.0, 0.5]
  low, _ = sym_matrix(eigs)
  decay, _ = sym_matrix(2.0 ** -np.arange(DIM))
  run = jax.jit(
    jax.vmap(
      lambda a, key: spectral.hutchpp_trace(as_matvec(a), PARAMS, key, 15),
      in_axes=(None, 0),
    )
  )
  keys = jax.random.split(jax.random.PRNGKey(6), 20)
  # rank 4 <= k = 5 sketch vectors: the sketch captures A exactly.
  np.testing.assert_allclose(run(low, keys[:1]), np.trace(low), rtol=1e-10)
  # Spectrum 2^-i, 15 matvecs: Hutchinson's variance is
  # 2 (|A|_F^2 - sum diag^2) / 15; Hutch++ only sees the ~3% tail beyond
  # its 5-vector sketch, so its mean squared error over 20 seeds is far
  # smaller (measured 0.012 of Hutchinson's variance; asserted < 1/20).
  est = run(decay, keys)
  mse_pp = np.mean((np.asarray(est) - np.trace(decay)) ** 2)
  var_hutch = 2 * (np.sum(decay**2) - np.sum(np.diag(decay) ** 2)) / 15
  assert mse_pp < var_hutch / 20


def test_spectral_density_normalised_and_moments_match():
  eigs = spread_spectrum()
  a, _ = sym_matrix(eigs)
  num_probes = 40
  sd = jax.jit(
    lambda a, key: spectral.spectral_density(
      as_matvec(a), PARAMS, key, 8, num_probes, unroll=False
    )
  )(a, jax.random.PRNGKey(7))
  assert sd.nodes.shape == sd.weights.shape == (num_probes, 8)
  np.testing.assert_allclose(sd.weights.sum(axis=1), 1.0, rtol=1e-12)
  # Grid spacing is ~0.1 sigma: the trapezoid rule on a Gaussian mixture
  # is accurate far below 1e-6.
  assert abs(np.trapezoid(sd.density, sd.grid) - 1.0) < 1e-6
  assert sd.nodes.min() >= eigs[0] - 1e-10
  assert sd.nodes.max() <= eigs[-1] + 1e-10
  for k in (1, 2):
    # Gauss quadrature with 8 nodes is exact for degree < 16: per probe
    # these are v^T A^k v / |v|^2, unbiased for Tr(A^k)/P; the tolerance
    # is 4 standard errors over the probes.
    per_probe = np.sum(sd.weights * sd.nodes**k, axis=1)
    want = np.trace(np.linalg.matrix_power(a, k)) / DIM
    se = per_probe.std(ddof=1) / np.sqrt(num_probes)
    assert abs(per_probe.mean() - want) < 4 * se


def test_spectral_density_explicit_grid_and_sequential_probes():
  a, _ = sym_matrix(spread_spectrum())
  grid = jnp.linspace(-10.0, 15.0, 2001)
  run = lambda a, batch_size: spectral.spectral_density(
    as_matvec(a),
    PARAMS,
    jax.random.PRNGKey(8),
    6,
    4,
    grid=grid,
    sigma=0.2,
    unroll=False,
    probe_batch_size=batch_size,
  )
  vmapped, chunked = jax.jit(lambda a: (run(a, None), run(a, 2)))(a)
  np.testing.assert_allclose(chunked.nodes, vmapped.nodes, atol=1e-12)
  np.testing.assert_allclose(chunked.density, vmapped.density, atol=1e-12)
  assert abs(np.trapezoid(vmapped.density, grid) - 1.0) < 1e-6


def test_bad_arguments_raise():
  mv = as_matvec(np.eye(DIM))
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="num_iters"):
    spectral.lanczos(mv, PARAMS, 0, key)
  with pytest.raises(ValueError, match="num_iters"):
    spectral.lanczos(mv, PARAMS, DIM + 1, key)
  with pytest.raises(ValueError, match="dist"):
    spectral.hutchinson_trace(mv, PARAMS, key, 3, dist="uniform")
  with pytest.raises(ValueError, match="num_samples"):
    spectral.hutchpp_trace(mv, PARAMS, key, 2)
  with pytest.raises(ValueError, match="grid"):
    spectral.spectral_density(mv, PARAMS, key, 3, 2, grid=1)
  with pytest.raises(ValueError, match="grid"):
    spectral.spectral_density(mv, PARAMS, key, 3, 2, grid=jnp.zeros((2, 2)))


def test_lanczos_ritz_residuals_are_the_true_residuals():
  eigs = spread_spectrum(3)
  a, _ = sym_matrix(eigs, seed=3)
  ritz = spectral.lanczos_ritz(
    as_matvec(a), PARAMS, 8, jax.random.PRNGKey(2), return_vectors=True
  )
  y_KxP = np.concatenate(
    [
      np.asarray(ritz.vectors["a"]),
      np.asarray(ritz.vectors["b"]).reshape(8, -1),
    ],
    axis=1,
  )
  true = np.linalg.norm(y_KxP @ a - ritz.values[:, None] * y_KxP, axis=1)
  np.testing.assert_allclose(ritz.residuals, true, rtol=1e-8, atol=1e-12)
  # Partial run: the residuals are not all tiny, and each bounds the
  # distance of its Ritz value to the spectrum.
  assert float(np.max(true)) > 1e-3
  gap = np.min(np.abs(np.asarray(ritz.values)[:, None] - eigs[None]), axis=1)
  assert np.all(gap <= np.asarray(ritz.residuals) + 1e-12)


def test_lanczos_holds_one_basis_buffer():
  # The compiled loop keeps the [k, P] basis in its carry, written in
  # place: temporaries stay a small multiple of one basis (the issue saw
  # 19 copies), measured by XLA's own memory analysis.
  dim, k = 20_000, 16
  params = jnp.zeros(dim, jnp.float32)
  d = jnp.linspace(0.0, 1.0, dim, dtype=jnp.float32)
  fn = jax.jit(
    lambda p, key: spectral.lanczos(lambda v: d * v, p, k, key)
  ).lower(params, jax.random.PRNGKey(0))
  analysis = fn.compile().memory_analysis()
  if analysis is None:
    pytest.skip("no memory analysis on this backend")
  basis_bytes = k * dim * 4
  assert analysis.temp_size_in_bytes < 3 * basis_bytes


def test_trace_estimators_return_standard_errors():
  eigs = spread_spectrum(4)
  a, _ = sym_matrix(eigs, seed=4)
  key = jax.random.PRNGKey(5)
  est, err = spectral.hutchinson_trace(
    as_matvec(a), PARAMS, key, 40, dist="gaussian", return_stderr=True
  )
  # Gaussian probes: z^T A z has variance 2 ||A||_F^2.
  expected_err = np.sqrt(2 * np.sum(eigs**2) / 40)
  assert 0.5 * expected_err < float(err) < 2 * expected_err
  assert abs(float(est) - eigs.sum()) < 4 * float(err)
  assert float(est) == float(
    spectral.hutchinson_trace(as_matvec(a), PARAMS, key, 40, dist="gaussian")
  )
  _, err1 = spectral.hutchinson_trace(
    as_matvec(a), PARAMS, key, 1, return_stderr=True
  )
  assert np.isnan(float(err1))
  est_pp, err_pp = spectral.hutchpp_trace(
    as_matvec(a), PARAMS, key, 30, return_stderr=True
  )
  assert float(err_pp) > 0 and abs(float(est_pp) - eigs.sum()) < 4 * float(
    err_pp
  )


def test_density_plot_draws_on_given_axes():
  matplotlib = pytest.importorskip("matplotlib")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  a, _ = sym_matrix(spread_spectrum(1))
  density = spectral.spectral_density(
    as_matvec(a), PARAMS, jax.random.PRNGKey(0), 10, 2, grid=64
  )
  fig, ax = plt.subplots()
  assert density.plot(ax, color="k") is ax
  (line,) = ax.get_lines()
  np.testing.assert_allclose(line.get_xdata(), density.grid)
  assert ax.get_yscale() == "log" and np.all(line.get_ydata() > 0)
  plt.close(fig)


def conv_loop_fn(lhs_spec):
  """A gradient of convolutions inside a fori_loop, in a given layout."""
  dn = (lhs_spec, "OIW" if lhs_spec == "NCW" else "WIO", lhs_spec)

  def loss(w, x):
    y = jax.lax.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=dn)
    return jnp.sum(jnp.tanh(y) ** 2)

  def fn(w, x):
    body = lambda i, g: g + jax.grad(loss)(w + 0.1 * i * g, x)
    return jax.lax.fori_loop(0, 3, body, jnp.zeros_like(w))

  return fn


@pytest.mark.parametrize("lhs_spec", ["NWC", "NCW"])
def test_canonicalize_convs_keeps_the_numbers(lhs_spec):
  rng = np.random.default_rng(0)
  if lhs_spec == "NCW":
    w, x = rng.normal(size=(4, 3, 5)), rng.normal(size=(2, 3, 9))
  else:
    w, x = rng.normal(size=(5, 3, 4)), rng.normal(size=(2, 9, 3))
  fn = conv_loop_fn(lhs_spec)
  expected = jax.jit(fn)(w, x)
  canonical = spectral.canonicalize_convs(fn)
  np.testing.assert_allclose(jax.jit(canonical)(w, x), expected, rtol=1e-12)
  # Every convolution left in the program (also in the loop body) is in
  # the canonical NWC / WIO layout.
  text = str(jax.make_jaxpr(canonical)(w, x))
  if jax.default_backend() == "cpu":
    assert "conv_general_dilated" in text
    specs = [line for line in text.splitlines() if "dimension_numbers" in line]
    assert specs and all(
      "lhs_spec=(0, 2, 1)" in line and "out_spec=(0, 2, 1)" in line
      for line in specs
    ), specs
