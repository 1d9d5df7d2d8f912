"""Curvature of a trained model: top eigenvalues, trace and density.

  python examples/curvature_analysis.py [--tiny] [--out DIR]

The PyHessian use-case (`hessian(model, criterion, data).eigenvalues()`,
`.trace()`, `.density()`) with sam_jax's split of the Hessian into its
Gauss-Newton part and the nonlinear modeling error, H = GN + NME
(PAPERS.md B1). Trains a small tanh MLP on MNIST-1D (generated offline)
with SGD and with SAM, then for each asks `sj.Curvature` for the top-5
eigenvalues of H (with Ritz residuals), the top eigenvalue of GN and NME,
Hutch++ traces with standard errors, and the SLQ density of H, drawn into
DIR/density.png. DIR/results.json holds the numbers.
"""

import argparse
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import optax

import sam_jax as sj
from sam_jax import data

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 -- after choosing the backend


class MLP(nn.Module):
  width: int = 64

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(self.width)(x))
    x = nn.tanh(nn.Dense(self.width)(x))
    return nn.Dense(10)(x)


def train(obj, variables, x, y, tx, epochs, batch=64):
  opt_state = tx.init(variables)

  @jax.jit
  def step(v, opt_state, xb, yb):
    loss_fn = lambda w: obj.loss(w, (xb, yb))
    grads = jax.grad(loss_fn)(v)
    updates, opt_state = tx.update(
      grads, opt_state, v, grad_fn=jax.grad(loss_fn)
    )
    return optax.apply_updates(v, updates), opt_state

  for epoch in range(epochs):
    perm = jax.random.permutation(jax.random.key(epoch), x.shape[0])
    for i in range(0, x.shape[0] - batch + 1, batch):
      idx = perm[i : i + batch]
      variables, opt_state = step(variables, opt_state, x[idx], y[idx])
  return variables


def analyse(obj, variables, batches, key):
  curv = sj.Curvature(obj, variables, batches)
  top = curv.eigenvalues(k=5, of="h")
  gn = curv.eigenvalues(k=1, of="gn")
  nme = curv.eigenvalues(k=1, of="nme")
  traces = {of: curv.trace(of=of, num_probes=99, key=key) for of in ("h", "gn")}
  density = curv.density(of="h", key=key)
  result = {
    "top5_h": [float(v) for v in top.values],
    "top5_h_residuals": [float(r) for r in top.residuals],
    "top_gn": float(gn.values[0]),
    "top_nme": float(nme.values[0]),
    **{
      f"trace_{of}": [float(t.value), float(t.stderr)]
      for of, t in traces.items()
    },
  }
  return result, density


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true")
  parser.add_argument("--out", default="out/curvature_analysis")
  args = parser.parse_args(argv)
  n, epochs, width = (256, 2, 16) if args.tiny else (4000, 20, 64)
  d = data.load_mnist1d(num_samples=n + n // 4, test_fraction=0.2)
  x, y = jnp.asarray(d["x_train"]), jnp.asarray(d["y_train"])
  model = MLP(width)
  obj = sj.Objective(model.apply, sj.softmax_cross_entropy)
  variables = model.init(jax.random.key(0), x[:1])
  base = optax.sgd(0.05, momentum=0.9)
  # The curvature over 4 batches of 256 training examples (full: 1024).
  size = min(256, x.shape[0])
  batches = [
    (x[i : i + size], y[i : i + size])
    for i in range(0, min(4 * size, x.shape[0]) - size + 1, size)
  ]
  fig, ax = plt.subplots(figsize=(6, 4))
  results = {}
  for name, tx in {"sgd": base, "sam": optax.chain(sj.sam(0.05), base)}.items():
    trained = train(obj, variables, x, y, tx, epochs)
    results[name], density = analyse(obj, trained, batches, jax.random.key(1))
    density.plot(ax, label=name)
    r = results[name]
    print(
      f"{name}: top-5 H {[round(v, 3) for v in r['top5_h']]}, "
      f"top GN {r['top_gn']:.3f}, top NME {r['top_nme']:.3f}, "
      f"Tr H {r['trace_h'][0]:.2f} +- {r['trace_h'][1]:.2f}, "
      f"Tr GN {r['trace_gn'][0]:.2f} +- {r['trace_gn'][1]:.2f}"
    )
  ax.legend()
  ax.set_title("Hessian spectral density (SLQ)")
  os.makedirs(args.out, exist_ok=True)
  fig.savefig(os.path.join(args.out, "density.png"), dpi=100)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
