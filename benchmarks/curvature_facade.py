"""Wall time of a researcher's curvature script through `sj.Curvature`.

  python -m benchmarks.curvature_facade [--tiny]

The script of issue #14: a 2-64-64-3 tanh MLP (linen, full variables dict)
on 256 examples; top-5 eigenvalues of H, the top eigenvalue of GN and of
NME, a Hutch++ trace of H (99 probes) and the SLQ density of H, with the
facade's defaults. Each query's wall time includes its compilation (the
first call), as a researcher experiences it. Target (issue #14): <= 20 s
in all on 2 CPU cores (PyHessian-style defaults of the previous version:
175 s).
"""

import argparse
import time

import flax.linen as nn
import jax

import sam_jax as sj
from benchmarks import timing
from sam_jax import models


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true")
  args = parser.parse_args(argv)
  width, num = (8, 32) if args.tiny else (64, 256)
  start = time.perf_counter()
  model = models.MLP((width, width), num_classes=3, activation=nn.tanh)
  kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (num, 2))
  y = jax.random.randint(ky, (num,), 0, 3)
  variables = model.init(kp, x)
  obj = sj.Objective(model.apply, sj.softmax_cross_entropy)
  curv = sj.Curvature(obj, variables, (x, y))
  key = jax.random.PRNGKey(1)
  queries = {
    "eigenvalues(k=5, of='h')": lambda: curv.eigenvalues(k=5, of="h"),
    "eigenvalues(k=1, of='gn')": lambda: curv.eigenvalues(k=1, of="gn"),
    "eigenvalues(k=1, of='nme')": lambda: curv.eigenvalues(k=1, of="nme"),
    "trace(of='h', num_probes=99)": lambda: curv.trace("h", 99, key),
    "density(of='h')": lambda: curv.density("h", key),
  }
  print(timing.machine_line())
  print(f"# MLP 2-{width}-{width}-3, {num} examples, {curv.num_params} params")
  print("\n| query | s (incl. compile) | result |\n|---|---:|---|")
  setup = time.perf_counter() - start
  print(f"| setup (init, Curvature) | {setup:.2f} | |")
  for name, query in queries.items():
    t = time.perf_counter()
    out = jax.block_until_ready(query())
    seconds = time.perf_counter() - t
    if name.startswith("eigen"):
      shown = f"values {[round(float(v), 4) for v in out.values]}, "
      shown += f"max residual {float(out.residuals.max()):.1e}"
    elif name.startswith("trace"):
      shown = f"{float(out.value):.3f} +- {float(out.stderr):.3f}"
    else:
      shown = f"{out.density.shape[0]} grid points"
    print(f"| {name} | {seconds:.2f} | {shown} |")
  total = time.perf_counter() - start
  print(f"| **total** | **{total:.2f}** | target <= 20 s |")


if __name__ == "__main__":
  main()
