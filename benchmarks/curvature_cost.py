"""Cost of curvature products and spectra relative to one gradient.

Model: `sam_jax.models.CNN1D()` (the MNIST-1D CNN: three stride-2 convs of
32 channels, kernel 5, a dense layer of 64, 10 classes) on a batch of 128
inputs of length 40 (random values: the cost does not depend on them),
softmax cross-entropy, float32. Every function is jitted with params,
vector and key as arguments, compiled and warmed up first; then all are
timed in interleaved rounds (`block_until_ready`) and the median per
function is reported. Lanczos and power iteration use the HVP as matvec
(as PyHessian does) and run both unrolled and rolled (`lax.fori_loop`).

  python benchmarks/curvature_cost.py [--reps 9]

Targets (DESIGN.md): GN-vp <= 1.3x, HVP <= 2x, NME-vp <= 2.5x one gradient;
Lanczos k=30 <= 1.15x the cost of 30 matvecs. PyTorch on the same CPU:
HVP 2.9-3.8x, GGN-vp 2.4-2.6x, PyHessian 20-iteration top eigenvalue ~41x.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from benchmarks import timing
from sam_jax import curvature, models, objective, spectral

BATCH, LENGTH, CLASSES = 128, 40, 10


def build():
  model = models.CNN1D(num_classes=CLASSES)
  kx, ky, kp, kv = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(kx, (BATCH, LENGTH))
  y = jax.random.randint(ky, (BATCH,), 0, CLASSES)
  params = models.init_params(model, kp, x)
  obj = models.make_objective(model, objective.softmax_cross_entropy)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(kv, len(leaves))
  v = tree.unflatten(
    [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
  )
  return obj, params, (x, y), v


def functions(obj, batch):
  hvp = lambda p, v: curvature.hvp(obj, p, batch, v)

  def lanczos(unroll):
    return lambda p, v, key: spectral.lanczos(
      lambda u: hvp(p, u), p, 30, key, unroll=unroll
    )

  def power(unroll):
    return lambda p, v, key: spectral.power_iteration(
      lambda u: hvp(p, u), p, key, 20, unroll=unroll
    )[0]

  return {
    "gradient": lambda p, v, key: jax.grad(obj.loss)(p, batch),
    "GN-vp": lambda p, v, key: curvature.gnvp(obj, p, batch, v),
    "HVP": lambda p, v, key: hvp(p, v),
    "NME-vp": lambda p, v, key: curvature.nmevp(obj, p, batch, v),
    "Lanczos k=30, unrolled": lanczos(True),
    "Lanczos k=30, rolled": lanczos(False),
    "power iteration 20, unrolled": power(True),
    "power iteration 20, rolled": power(False),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=9)
  args = parser.parse_args()
  obj, params, batch, v = build()
  key = jax.random.PRNGKey(1)
  print(
    f"backend {jax.default_backend()}, {jax.device_count()} device(s), "
    f"{sum(p.size for p in jax.tree.leaves(params))} parameters"
  )
  runs, compile_s = {}, {}
  for name, fn in functions(obj, batch).items():
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(params, v, key).compile()
    compile_s[name] = time.perf_counter() - start
    runs[name] = timing.caller(compiled, params, v, key)
  # The first call of each (a warm-up) is not in the medians.
  med = timing.medians(timing.time_interleaved(runs, args.reps))
  grad, hvp = med["gradient"], med["HVP"]
  targets = {
    "GN-vp": "<= 1.3x (PyTorch 2.4-2.6x)",
    "HVP": "<= 2x (PyTorch 2.9-3.8x)",
    "NME-vp": "<= 2.5x",
    "Lanczos k=30, unrolled": "<= 1.15x 30 HVPs",
    "Lanczos k=30, rolled": "<= 1.15x 30 HVPs",
    "power iteration 20, unrolled": "PyHessian ~41x",
    "power iteration 20, rolled": "PyHessian ~41x",
  }
  print(f"\nmedian of {args.reps} interleaved runs; batch {BATCH}\n")
  print("| quantity | ms | x gradient | x matvecs (HVP) | compile s | target |")
  print("|---|---:|---:|---:|---:|---|")
  for name, t in med.items():
    steps = 30 if "Lanczos" in name else 20 if "power" in name else 0
    per_mv = f"{t / (steps * hvp):.2f}" if steps else ""
    print(
      f"| {name} | {t * 1e3:.2f} | {t / grad:.2f} | {per_mv} | "
      f"{compile_s[name]:.1f} | {targets.get(name, '')} |"
    )


if __name__ == "__main__":
  jnp.zeros(())  # initialise the backend before timing anything
  main()
