"""Cost of curvature products and spectra relative to one gradient.

Models (`--model`), softmax cross-entropy, float32, random inputs (the
cost does not depend on their values), batch `--batch` (128):

  cnn3   three 'SAME' stride-1 convs of 32 channels, kernel 5, a dense
         layer of 256, 10 classes, on MNIST-1D-shaped inputs [B, 40, 1]
         (341,002 parameters; the model of issue #14)
  cnn1d  `sam_jax.models.CNN1D()`, the MNIST-1D CNN of the experiments
         (three stride-2 convs of 32 channels, dense 64)
  mlp    `sam_jax.models.MLP((64, 64))` on [B, 40] inputs

Every function is jitted with params, vector and key as arguments,
compiled (the compile time is reported) and warmed up; then all are timed
in interleaved rounds (`block_until_ready`) and the median per function
is reported. Lanczos and power iteration use the HVP as matvec (as
PyHessian does). `sj.lanczos` runs in its default form (rolled) and fully
unrolled, beside a plain reference: the 25-line Lanczos loop a user would
write (`plain_lanczos`: `fori_loop`, basis in the carry, Gram-Schmidt
twice), rolled and unrolled. Columns: the time over k standalone HVPs,
over a k-step power iteration (the same k HVPs in the same rolled loop,
where XLA hoists the HVP's loop-invariant primal pass out of the body, so
a matvec costs less than standalone: the fair measure of what Lanczos
adds), over k HVPs chained in a straight line (each on the last one's
normalised output: what k matvecs cost at best, XLA sharing their primal
work), and over the plain loop unrolled. `sj.lanczos` is timed called
directly with the user's matvec and through `sj.Curvature`'s matvec. The
two "free matvec" rows run
both Lanczos loops with an elementwise matvec `d * v`, so they time the
orthogonalisation alone.

  python -m benchmarks.curvature_cost [--model cnn3] [--steps 20] [--reps 9]

Targets (DESIGN.md): GN-vp <= 1.3x, HVP <= 2x, NME-vp <= 2.5x one gradient;
Lanczos of k steps <= 1.15x the cost of k matvecs in its default form.
PyTorch on the same CPU: HVP 2.9-3.8x, GGN-vp 2.4-2.6x, PyHessian
20-iteration top eigenvalue ~41-43x a gradient.
"""

import argparse
import time

import jax
import jax.numpy as jnp
from jax import flatten_util

from benchmarks import timing
from sam_jax import curvature, models, objective, spectral

LENGTH, CLASSES = 40, 10
MODELS = ("cnn3", "cnn1d", "mlp")


def plain_lanczos(matvec, params, num_iters, key, unroll=False):
  """Reference: Lanczos with full reorthogonalisation as a user writes it.

  Ritz values only; Gram-Schmidt twice against the whole basis per step,
  no breakdown handling. The yardstick for `sj.lanczos`'s overhead.
  """
  flat, unravel = flatten_util.ravel_pytree(params)
  mv = lambda q: flatten_util.ravel_pytree(matvec(unravel(q)))[0]
  q = jax.random.normal(key, flat.shape, flat.dtype)
  q = q / jnp.linalg.norm(q)

  def body(j, carry):
    basis_KxP, q_P, alpha_K, beta_K = carry
    basis_KxP = basis_KxP.at[j].set(q_P)
    w_P = mv(q_P)
    alpha_K = alpha_K.at[j].set(jnp.vdot(q_P, w_P))
    w_P = w_P - basis_KxP.T @ (basis_KxP @ w_P)
    w_P = w_P - basis_KxP.T @ (basis_KxP @ w_P)
    beta = jnp.linalg.norm(w_P)
    return basis_KxP, w_P / beta, alpha_K, beta_K.at[j].set(beta)

  zeros_K = jnp.zeros((num_iters,), flat.dtype)
  basis_KxP = jnp.zeros((num_iters, flat.size), flat.dtype)
  carry = (basis_KxP, q, zeros_K, zeros_K)
  _, _, alpha_K, beta_K = jax.lax.fori_loop(
    0, num_iters, body, carry, unroll=unroll
  )
  off = beta_K[:-1]
  t_KxK = jnp.diag(alpha_K) + jnp.diag(off, 1) + jnp.diag(off, -1)
  return jnp.linalg.eigvalsh(t_KxK)


def build(name="cnn3", batch=128):
  if name == "cnn3":
    model = models.CNN1D(
      (32, 32, 32), kernel_size=5, stride=1, dense=(256,), num_classes=CLASSES
    )
    shape = (batch, LENGTH, 1)
  elif name == "cnn1d":
    model, shape = models.CNN1D(num_classes=CLASSES), (batch, LENGTH)
  elif name == "mlp":
    model, shape = models.MLP((64, 64), num_classes=CLASSES), (batch, LENGTH)
  else:
    raise ValueError(f"--model must be one of {MODELS}, got {name!r}")
  kx, ky, kp, kv = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(kx, shape)
  y = jax.random.randint(ky, (batch,), 0, CLASSES)
  params = models.init_params(model, kp, x)
  obj = models.make_objective(model, objective.softmax_cross_entropy)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(kv, len(leaves))
  v = tree.unflatten(
    [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
  )
  return obj, params, (x, y), v


def functions(obj, batch, steps):
  hvp = lambda p, v: curvature.hvp(obj, p, batch, v)
  # A nearly free matvec with a spread spectrum (`d * v`, d in [0, 1]):
  # what is left is the Lanczos loop's own cost.
  scale = lambda v: jax.tree.map(
    lambda a: a * jnp.linspace(0.0, 1.0, a.size).reshape(a.shape), v
  )

  def lanczos(matvec, **kwargs):
    return lambda p, v, key: spectral.lanczos(
      lambda u: matvec(p, u), p, steps, key, **kwargs
    )

  def plain(matvec, unroll):
    return lambda p, v, key: plain_lanczos(
      lambda u: matvec(p, u), p, steps, key, unroll
    )

  free = lambda p, u: scale(u)

  def chained(p, v, key):
    # k HVPs in a straight line, each on the last one's normalised output:
    # what a k-step loop could cost at best (XLA shares their primal work).
    del key
    for _ in range(steps):
      v = hvp(p, v)
      norm = jnp.sqrt(sum(jnp.vdot(a, a) for a in jax.tree.leaves(v)))
      v = jax.tree.map(lambda a, n=norm: a / n, v)
    return v

  def facade(p, v, key):
    # The same Lanczos through sj.Curvature's matvec (its compiled queries
    # run this program: `curvature._compiled`).
    curv = curvature.Curvature(obj, p, batch)
    return spectral.lanczos(curv.matvec("h"), p, steps, key)

  return {
    "gradient": lambda p, v, key: jax.grad(obj.loss)(p, batch),
    "GN-vp": lambda p, v, key: curvature.gnvp(obj, p, batch, v),
    "HVP": lambda p, v, key: hvp(p, v),
    "NME-vp": lambda p, v, key: curvature.nmevp(obj, p, batch, v),
    f"{steps} HVPs, unrolled chain": chained,
    f"sj.lanczos k={steps} (default: rolled)": lanczos(hvp),
    f"sj.lanczos k={steps} through sj.Curvature": facade,
    f"sj.lanczos k={steps}, unrolled": lanczos(hvp, unroll=True),
    f"plain Lanczos k={steps}, rolled": plain(hvp, False),
    f"plain Lanczos k={steps}, unrolled": plain(hvp, True),
    f"power iteration k={steps} (default: rolled)": (
      lambda p, v, key: spectral.power_iteration(
        lambda u: hvp(p, u), p, key, steps
      )[0]
    ),
    f"sj.lanczos k={steps}, free matvec": lanczos(free),
    f"plain Lanczos k={steps}, free matvec, rolled": plain(free, False),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=MODELS, default="cnn3")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--reps", type=int, default=9)
  args = parser.parse_args(argv)
  obj, params, batch, v = build(args.model, args.batch)
  key = jax.random.PRNGKey(1)
  print(timing.machine_line())
  print(
    f"# model {args.model}, batch {args.batch}, "
    f"{sum(p.size for p in jax.tree.leaves(params))} parameters"
  )
  runs, compile_s = {}, {}
  for name, fn in functions(obj, batch, args.steps).items():
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(params, v, key).compile()
    compile_s[name] = time.perf_counter() - start
    runs[name] = timing.caller(compiled, params, v, key)
  # The first call of each (a warm-up) is not in the medians.
  med = timing.medians(timing.time_interleaved(runs, args.reps))
  grad, hvp = med["gradient"], med["HVP"]
  plain = med[f"plain Lanczos k={args.steps}, unrolled"]
  chain = med[f"{args.steps} HVPs, unrolled chain"]
  power = med[f"power iteration k={args.steps} (default: rolled)"]
  targets = {
    "GN-vp": "<= 1.3x (PyTorch 2.4-2.6x)",
    "HVP": "<= 2x (PyTorch 2.9-3.8x)",
    "NME-vp": "<= 2.5x",
    f"sj.lanczos k={args.steps} (default: rolled)": "<= 1.15x k HVPs",
    f"power iteration k={args.steps} (default: rolled)": (
      "PyHessian (k=20) ~41-43x gradient"
    ),
  }
  print(f"\nmedian of {args.reps} interleaved runs\n")
  print(
    "| quantity | ms | x gradient | x k HVPs | x k HVPs chained | "
    "x power it. k | x plain unrolled | compile s | target |"
  )
  print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
  for name, t in med.items():
    loop = ("anczos" in name or "power" in name or "chain" in name) and (
      "free" not in name
    )
    cols = (
      [
        f"{t / (args.steps * hvp):.2f}",
        f"{t / chain:.2f}",
        f"{t / power:.2f}",
        f"{t / plain:.2f}",
      ]
      if loop
      else ["", "", "", ""]
    )
    print(
      f"| {name} | {t * 1e3:.2f} | {t / grad:.2f} | {' | '.join(cols)} | "
      f"{compile_s[name]:.1f} | {targets.get(name, '')} |"
    )


if __name__ == "__main__":
  jnp.zeros(())  # initialise the backend before timing anything
  main()
