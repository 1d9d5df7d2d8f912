"""Evaluation for the label-noise study, and its per-seed summary.

Per epoch the trainer measures (PAPERS.md A6):

  <split>_accuracy       accuracy on the evaluation split ("test", or "val"
                         when tuning on a validation split of the training
                         set; a val split carries noisy labels, like training)
  <split>_true_accuracy  val only: the same against the true labels
  train_accuracy         on all training examples, against their (noisy)
                         training labels
  clean_accuracy         on the clean training examples (label unchanged)
  noisy_accuracy         on the noisy training examples, against their noisy
                         labels: memorisation
  noisy_true_accuracy    on the noisy training examples, against their true
                         labels
  train_eval_loss        mean loss on all training examples (noisy labels)
  feature_norm           mean_i ||phi(x_i)|| over training examples
  head_norm              ||V_head||_F, the last layer's kernel

A subset with no example (e.g. no noise) gives None.
"""

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def chunked_apply(fn: Callable[[Array], Any], x_N: Array, chunk: int) -> Any:
  """`fn` over `x_N` in chunks of `chunk` examples (lax.map), concatenated.

  Bounds the memory of a forward pass over a whole dataset. `fn` maps
  `[C, ...] -> pytree of [C, ...]`.
  """
  n = x_N.shape[0]
  c = max(1, min(chunk, n))
  pad = (-n) % c
  x_pad = jnp.pad(x_N, [(0, pad)] + [(0, 0)] * (x_N.ndim - 1))
  out = jax.lax.map(fn, x_pad.reshape((-1, c) + x_N.shape[1:]))
  return jax.tree.map(lambda o: o.reshape((-1,) + o.shape[2:])[:n], out)


def _masked_mean(v_N: Array, m_N: Array) -> Array:
  """Mean of `v` where `m`; NaN on an empty subset (reported as None)."""
  count = jnp.sum(m_N)
  total = jnp.sum(jnp.where(m_N, v_N, 0.0))
  return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)


def noise_accuracies(
  pred_N: Array, labels_N: Array, true_N: Array, noisy_N: Array
) -> dict[str, Array]:
  """Training accuracies split by the noise mask.

  Args:
    pred_N: predicted classes.
    labels_N: the labels trained on (noisy where `noisy_N`).
    true_N: the true labels.
    noisy_N: bool noise mask.

  Returns:
    `train_accuracy` (all, vs labels), `clean_accuracy` (~noisy, vs labels),
    `noisy_accuracy` (noisy, vs labels), `noisy_true_accuracy` (noisy, vs
    true labels); NaN for an empty subset.
  """
  hit = (pred_N == labels_N).astype(jnp.float32)
  hit_true = (pred_N == true_N).astype(jnp.float32)
  return {
    "train_accuracy": jnp.mean(hit),
    "clean_accuracy": _masked_mean(hit, ~noisy_N),
    "noisy_accuracy": _masked_mean(hit, noisy_N),
    "noisy_true_accuracy": _masked_mean(hit_true, noisy_N),
  }


def make_evaluate(
  features_fn: Callable[[Any, Array], tuple[Array, Array]],
  loss_fn: Callable[[Array, Array], Array],
  chunk: int,
  split: str,
) -> Callable[..., dict[str, Array]]:
  """One seed's evaluation (pure; vmap it over seeds, then jit).

  Args:
    features_fn: `(params, x) -> (logits [B, K], features [B, D])`.
    loss_fn: per-example loss on logits.
    chunk: examples per forward pass.
    split: name of the evaluation split, "test" or "val".

  Returns:
    `evaluate(params, train, eval_) -> metrics` where `train = (x, labels,
    true_labels, noisy_mask)` and `eval_ = (x, labels, true_labels)`.
  """

  def forward(params, x_N):
    def fn(x_C):
      logits, feats = features_fn(params, x_C)
      return logits, jnp.linalg.norm(feats.reshape(feats.shape[0], -1), axis=1)

    return chunked_apply(fn, x_N, chunk)

  def evaluate(params, train, eval_):
    x_N, labels_N, true_N, noisy_N = train
    logits_NxK, fnorm_N = forward(params, x_N)
    out = noise_accuracies(
      jnp.argmax(logits_NxK, -1), labels_N, true_N, noisy_N
    )
    out["train_eval_loss"] = jnp.mean(loss_fn(logits_NxK, labels_N))
    out["feature_norm"] = jnp.mean(fnorm_N)
    out["head_norm"] = jnp.linalg.norm(params["head"]["kernel"])
    xe_M, labels_M, true_M = eval_
    pred_M = jnp.argmax(forward(params, xe_M)[0], -1)
    out[f"{split}_accuracy"] = jnp.mean(pred_M == labels_M)
    if split != "test":
      out[f"{split}_true_accuracy"] = jnp.mean(pred_M == true_M)
    return out

  return evaluate


def to_records(
  stats: dict[str, Any], seeds: Sequence[int], **common: Any
) -> list[dict[str, Any]]:
  """Splits `{name: [S, ...]}` into one JSON-ready dict per seed.

  Each record holds `common`, the seed and every field: a scalar as a float
  (NaN or inf -> None), an array as a list. The values are fetched from the
  device in one transfer.
  """
  host = jax.device_get(stats)
  records = []
  for i, seed in enumerate(seeds):
    rec = dict(common, seed=int(seed))
    for k, v in host.items():
      v = np.asarray(v[i])
      if v.ndim:
        rec[k] = v.tolist()
      else:
        x = float(v)
        rec[k] = x if math.isfinite(x) else None
    records.append(rec)
  return records


def summarize(
  records: Sequence[dict[str, Any]], split: str = "test"
) -> dict[str, Any]:
  """Per-seed best and final `<split>_accuracy`, with mean and std.

  "Best" is the peak over evaluated epochs (early stopping, as in the paper);
  ties go to the earliest epoch. Std is the population std over seeds (0
  for one seed).

  Returns:
    `{"seeds", "epochs", "best_<split>_accuracy", "best_epoch",
    "final_<split>_accuracy", "final_clean_accuracy", "final_noisy_accuracy",
    "mean": {...}, "std": {...}}`, lists ordered by seed; empty lists when
    no epoch was evaluated.
  """
  key = f"{split}_accuracy"
  seeds = sorted({r["seed"] for r in records})
  out: dict[str, Any] = {"seeds": seeds, "epochs": []}
  cols = ("best_" + key, "best_epoch", "final_" + key)
  cols += ("final_clean_accuracy", "final_noisy_accuracy")
  for c in cols:
    out[c] = []
  for seed in seeds:
    rs = sorted(
      (r for r in records if r["seed"] == seed), key=lambda r: r["epoch"]
    )
    accs = [r[key] for r in rs]
    best = int(np.argmax(accs))
    out["best_" + key].append(accs[best])
    out["best_epoch"].append(rs[best]["epoch"])
    out["final_" + key].append(accs[-1])
    out["final_clean_accuracy"].append(rs[-1].get("clean_accuracy"))
    out["final_noisy_accuracy"].append(rs[-1].get("noisy_accuracy"))
    out["epochs"].append(rs[-1]["epoch"])
  out["mean"], out["std"] = {}, {}
  for c in cols:
    vals = [v for v in out[c] if v is not None]
    out["mean"][c] = float(np.mean(vals)) if vals else None
    out["std"][c] = float(np.std(vals)) if vals else None
  return out
