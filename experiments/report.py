"""Tables and plots for the label-noise study (from the runs' metrics files).

Each method's run directory holds `metrics.jsonl` (one line per evaluated
epoch per seed, see `sam_jax.train`); these helpers read them back, average
over seeds and draw the paper's views (PAPERS.md A6).
"""

import pathlib
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # Files only, no display.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sam_jax import run_io  # noqa: E402


def load_records(
  run_dir: str | pathlib.Path, name: str = "metrics.jsonl"
) -> list[dict[str, Any]]:
  """The records of the JSONL log `<run_dir>/<name>` (`metrics.jsonl`,
  `curvature.jsonl`); empty if there is none."""
  return run_io.read_records(pathlib.Path(run_dir) / name)


def curves(records: Sequence[dict], key: str) -> tuple[np.ndarray, ...]:
  """`(epochs [E], mean [E], std [E])` of `key` over seeds, per epoch.

  None values (empty subsets) are skipped; an epoch with none gives NaN.
  """
  epochs = sorted({r["epoch"] for r in records})
  mean, std = [], []
  for e in epochs:
    vals = [
      r[key] for r in records if r["epoch"] == e and r.get(key) is not None
    ]
    mean.append(np.mean(vals) if vals else np.nan)
    std.append(np.std(vals) if vals else np.nan)
  return np.array(epochs), np.array(mean), np.array(std)


def _pm(stats: dict, col: str, scale: float = 100.0, fmt: str = ".1f") -> str:
  mean, std = stats["mean"].get(col), stats["std"].get(col)
  if mean is None:
    return "-"
  return f"{scale * mean:{fmt}} ± {scale * std:{fmt}}"


_SHORT = {"group_size": "m", "lambda_w": "lw", "lambda_a": "la"}


def format_table(summary: dict[str, dict], split: str = "test") -> str:
  """A fixed-width table, one row per method label (accuracies in %).

  Own hparams: m = group size (1: per-example SAM), lw / la = lambda_w /
  lambda_a of sgd+reg. Accuracies are mean ± std over seeds; "noisy train"
  is accuracy on the noisy examples against their noisy labels.
  """
  head = (
    f"{'label':<8} {'method':<8} {'own hparams':<20} {'best ' + split:>13} "
    f"{'best epoch':>10} {'final ' + split:>13} {'clean train':>13} "
    f"{'noisy train':>13}  status"
  )
  lines = [head, "-" * len(head)]
  for label, s in summary.items():
    hparams = dict(s.get("hparams", {}))
    method = hparams.pop("method", "?")
    hp = ",".join(f"{_SHORT.get(k, k)}={v}" for k, v in hparams.items())
    lines.append(
      f"{label:<8} {method:<8} {hp:<20} "
      f"{_pm(s, f'best_{split}_accuracy'):>13} "
      f"{_pm(s, 'best_epoch', 1.0, '.0f'):>10} "
      f"{_pm(s, f'final_{split}_accuracy'):>13} "
      f"{_pm(s, 'final_clean_accuracy'):>13} "
      f"{_pm(s, 'final_noisy_accuracy'):>13}  {s.get('status', '?')}"
    )
  return "\n".join(lines)


def _band(ax, records, key, label, **kw):
  e, m, s = curves(records, key)
  (line,) = ax.plot(e, m, label=label, **kw)
  ax.fill_between(e, m - s, m + s, color=line.get_color(), alpha=0.2, lw=0)


def plot_accuracy(runs: dict[str, list], path, key: str = "test_accuracy"):
  """`key` over epochs, one line per method (mean ± std over seeds)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, records in runs.items():
    _band(ax, records, key, label)
  ax.set(xlabel="epoch", ylabel=key.replace("_", " "))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_clean_noisy(runs: dict[str, list], path):
  """Training accuracy on clean vs noisy examples (the paper's Figure 1).

  Noisy examples are scored against their noisy labels: a rising curve is
  memorisation. One panel per method.
  """
  n = len(runs)
  cols = min(n, 3)
  rows = -(-n // cols)
  fig, axes = plt.subplots(
    rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharey=True
  )
  for ax, (label, records) in zip(axes.flat, runs.items(), strict=False):
    _band(ax, records, "clean_accuracy", "clean")
    _band(ax, records, "noisy_accuracy", "noisy (vs noisy label)")
    ax.set(title=label, xlabel="epoch", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
  for ax in axes.flat[n:]:
    ax.axis("off")
  axes[0, 0].set_ylabel("training accuracy")
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_norms(runs: dict[str, list], path):
  """Last-layer weight norm and mean feature norm over epochs."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for label, records in runs.items():
    _band(axes[0], records, "head_norm", label)
    _band(axes[1], records, "feature_norm", label)
  axes[0].set(xlabel="epoch", ylabel="||V_head||_F")
  axes[1].set(xlabel="epoch", ylabel="mean ||phi(x)||")
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
