r"""SLQ spectral densities of H, GN and NME: SGD vs SAM, ReLU vs GELU.

  python -m experiments.spectrum --workdir=runs/spectrum

trains every run of `experiments/configs/spectrum_mnist1d.py` (checkpoints
at mid-training and the end), then for seed 0 at initialisation, mid and
end computes the SLQ density of H, GN and NME on a fixed set of training
batches, and writes `<workdir>/summary.json` (accuracies, densities on
their grids, extreme Ritz values), `table.md` (extreme Ritz values) and
`spectrum.png` (rows H/GN/NME, columns runs, one line per time).
`--tiny` / `--set` as in activation_penalty.
"""

import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from experiments import label_noise, runner
from experiments.configs import spectrum_mnist1d as cfg
from sam_jax import curvature, data, models, spectral, train
from sam_jax.objective import softmax_cross_entropy

PRODUCTS = {"H": curvature.hvp, "GN": curvature.gnvp, "NME": curvature.nmevp}


def params_over_training(config, run_dir: pathlib.Path, mid: int):
  """`{"init", "mid", "end"}` -> stacked params, the model and the data."""
  seeds = [config.seed + i for i in range(config.num_seeds)]
  ds = train.load_data(config, seeds)
  model = train.make_model(config, data.MNIST1D_NUM_CLASSES)
  steps = ds.x_train.shape[0] // config.batch_size
  tx = train.make_optimizer(config, steps)
  keys_S = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds))
  states = train.init_states(model, tx, keys_S, ds.x_train[:1])
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, states)
  out = {"init": states.params}
  with ocp.CheckpointManager(run_dir.absolute() / "checkpoints") as mgr:
    for name, epoch in (("mid", mid), ("end", config.num_epochs)):
      restored = mgr.restore(epoch, args=ocp.args.StandardRestore(abstract))
      out[name] = restored.params
  return out, model, ds


@functools.lru_cache(maxsize=4)
def _density_fns(model, num_iters: int, num_probes: int) -> dict:
  """Jitted `(params, batches, key) -> SpectralDensity` per matrix, one
  compilation per model (shared by SGD/SAM and by init/mid/end)."""
  obj = models.make_objective(model, softmax_cross_entropy)

  def make(product):
    def fn(params, batches, key):
      mv = lambda v: curvature.mean_over_batches(product)(
        obj, params, batches, v
      )
      return spectral.spectral_density(
        mv, params, key, num_iters, num_probes, grid=400, unroll=False
      )

    return jax.jit(fn)

  return {name: make(product) for name, product in PRODUCTS.items()}


def densities(model, ds, params_S, slq: dict, key) -> dict:
  """SLQ density of H, GN, NME for seed 0 of stacked params."""
  n = slq["num_batches"] * slq["batch_size"]
  shape = (slq["num_batches"], slq["batch_size"])
  batches = (
    ds.x_train[:n].reshape(shape + ds.x_train.shape[1:]),
    ds.labels[0, :n].reshape(shape),
  )
  params = jax.tree.map(lambda a: a[0], params_S)
  fns = _density_fns(model, slq["num_iters"], slq["num_probes"])
  out = {}
  for name, fn in fns.items():
    d = fn(params, batches, key)
    out[name] = {
      "grid": np.asarray(d.grid).tolist(),
      "density": np.asarray(d.density).tolist(),
      "min_ritz": float(np.min(d.nodes)),
      "max_ritz": float(np.max(d.nodes)),
    }
  return out


def plot(spectra: dict, path) -> None:
  import matplotlib.pyplot as plt

  labels = list(spectra)
  fig, axes = plt.subplots(
    3, len(labels), figsize=(3.6 * len(labels), 8), squeeze=False
  )
  for j, label in enumerate(labels):
    for i, mat in enumerate(PRODUCTS):
      ax = axes[i, j]
      for when, by_mat in spectra[label].items():
        d = by_mat[mat]
        ax.semilogy(d["grid"], np.maximum(d["density"], 1e-8), label=when)
      ax.set_title(f"{label}: {mat}", fontsize=9)
      ax.set_ylim(1e-6, None)
      ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def table(spectra: dict) -> str:
  lines = [
    "| run | time | " + " | ".join(f"{m} [min, max]" for m in PRODUCTS) + " |",
    "|---|---|" + "---|" * len(PRODUCTS),
  ]
  for label, by_time in spectra.items():
    for when, by_mat in by_time.items():
      cells = " | ".join(
        f"[{d['min_ritz']:.3g}, {d['max_ritz']:.3g}]" for d in by_mat.values()
      )
      lines.append(f"| {label} | {when} | {cells} |")
  return "\n".join(lines)


def compact(summary: dict, every: int = 4) -> dict:
  """The summary as stored: densities on every `every`-th grid point, 4
  significant digits (the full-resolution curves are in the PNG)."""
  spectra = {
    label: {
      when: {
        mat: {
          **d,
          "grid": [float(f"{v:.4g}") for v in d["grid"][::every]],
          "density": [float(f"{v:.4g}") for v in d["density"][::every]],
        }
        for mat, d in by_mat.items()
      }
      for when, by_mat in by_time.items()
    }
    for label, by_time in summary["spectra"].items()
  }
  return {**summary, "spectra": spectra}


def main(argv) -> dict:
  workdir, base, tiny = runner.parse_cli(argv, cfg.BASE, cfg.TINY)
  slq = cfg.TINY_SLQ if tiny else cfg.SLQ
  root = pathlib.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  mid = max(1, base["num_epochs"] // 2)
  results, spectra = {}, {}
  for label, own in cfg.RUNS.items():
    config = runner.make_config(
      {**base, **own, "label": label, "checkpoint_every_epochs": mid}
    )
    results[label] = label_noise.run_label(config, root / label)
    params, model, ds = params_over_training(config, root / label, mid)
    key = jax.random.PRNGKey(config.seed)
    spectra[label] = {
      when: densities(model, ds, p, slq, key) for when, p in params.items()
    }
  summary = {
    "runs": results,
    "spectra": spectra,
    "base": base,
    "slq": slq,
    "runtime_s": time.perf_counter() - t0,
  }
  (root / "summary.json").write_text(json.dumps(compact(summary)))
  text = (
    "# Spectra of H, GN, NME (seed 0; extreme Ritz values)\n\n"
    f"runtime {summary['runtime_s']:.0f} s\n\n{table(spectra)}\n"
  )
  (root / "table.md").write_text(text)
  plot(spectra, root / "spectrum.png")
  print(text)
  return summary


if __name__ == "__main__":
  main(sys.argv[1:])
