r"""The main job: SGD vs SAM and its variants under label noise on MNIST-1D.

  python -m experiments.label_noise --workdir=runs/label_noise

trains every label of `experiments/configs/label_noise_mnist1d.py`
(`sgd`, `sam`, `1-sam`, `l-sam`, `j-sam`, `sgd+reg`), each over
`num_seeds` seeds as one vmapped program, then writes

  <workdir>/<label>/             the run (metrics.jsonl, checkpoints, ...)
  <workdir>/summary.json         per label: per-seed best test accuracy, its
                                 epoch, final test accuracy, mean/std, the
                                 hyperparameters and the status
  <workdir>/test_accuracy.png, clean_noisy.png, norms.png

and prints the table. A label whose loss turns non-finite is recorded as
`diverged` (with the error naming the step) from the epochs before; seeds
that end below twice chance accuracy (20%) without a NaN are listed in
`collapsed_seeds` (status `collapsed`). Rerunning resumes (finished runs
are only re-read).

  python -m experiments.label_noise --tune --workdir=runs/label_noise_tune

picks each label's own rho / lambda from `TUNE_GRID` by the best validation
accuracy (mean over seeds of the peak over epochs) on a validation split of
the noisy training set; the test set is not used. Paste the printed choice
into `METHODS`.

`--set field=value` overrides a config field for every label (repeatable),
e.g. `--set num_epochs=20 --set num_seeds=1` for a short run.
"""

import ast
import json
import math
import pathlib
import time
from typing import Any, Sequence

from absl import app, flags, logging

from experiments import errors, report
from experiments.configs import label_noise_mnist1d as base
from sam_jax import metrics, train
from sam_jax.train_config import ConfigError

HPARAM_FIELDS = ("method", "rho", "group_size", "lambda_w", "lambda_a")
SHARED_FIELDS = (
  "learning_rate",
  "momentum",
  "weight_decay",
  "schedule",
  "batch_size",
  "num_epochs",
  "num_seeds",
  "seed",
  "model",
  "data",
)
CHANCE = 0.1  # MNIST-1D has 10 balanced classes.


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
  """`["a.b=1", "c=x"] -> {"a.b": 1, "c": "x"}` (Python literals, else str)."""
  out = {}
  for item in items:
    field, sep, value = item.partition("=")
    if not sep:
      raise ConfigError(f"--set expects field=value, got {item!r}")
    try:
      out[field.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[field.strip()] = value
  return out


def make_config(
  label: str,
  overrides: dict[str, Any] | None = None,
  new_fields: Sequence[str] = (),
):
  """`get_config(label)` with dotted `overrides` applied.

  An override of a field the config lacks is an error (a typo would be
  silently ignored), except for the dotted names in `new_fields`.
  """
  if label not in base.METHODS:
    raise ConfigError(
      f"--labels: unknown label {label!r}; valid: {list(base.METHODS)}"
    )
  config = base.get_config(label)
  for field, value in (overrides or {}).items():
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
      if p not in node:
        raise ConfigError(f"--set: unknown config field {field!r}")
      node = node[p]
    if leaf not in node and field not in new_fields:
      raise ConfigError(f"--set: unknown config field {field!r}")
    node[leaf] = value
  return config


def run_label(config, workdir: pathlib.Path) -> dict[str, Any]:
  """Trains one label; a non-finite loss is recorded, not raised."""
  split = "val" if config.data.val_fraction else "test"
  try:
    summary = train.train_and_evaluate(config, str(workdir))
  except FloatingPointError as e:
    records = report.load_records(workdir)
    summary = metrics.summarize(records, split)
    summary.update(status="diverged", error=str(e))
  summary.pop("config", None)
  final = summary.get(f"final_{split}_accuracy", [])
  # Divergence without a NaN: a seed ending near chance accuracy.
  summary["collapsed_seeds"] = [
    s
    for s, f in zip(summary.get("seeds", []), final, strict=True)
    if f < 2 * CHANCE
  ]
  if summary["collapsed_seeds"] and summary["status"] == "ok":
    summary["status"] = "collapsed"
  summary["hparams"] = {
    k: config[k] for k in HPARAM_FIELDS if config[k] not in (None, 0.0)
  }
  return summary


def run_all(
  workdir: str,
  labels: Sequence[str] = tuple(base.METHODS),
  overrides: dict[str, Any] | None = None,
  *,
  plots: bool = True,
) -> dict[str, Any]:
  """Runs `labels`, writes summary.json and the plots; returns the summary."""
  root = pathlib.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  methods, runs = {}, {}
  for label in labels:
    config = make_config(label, overrides)
    methods[label] = run_label(config, root / label)
    runs[label] = report.load_records(root / label)
  shared = json.loads(config.to_json())
  summary = {
    "methods": methods,
    "shared": {k: shared[k] for k in SHARED_FIELDS},
    "runtime_s": time.perf_counter() - t0,
  }
  (root / "summary.json").write_text(json.dumps(summary, indent=2))
  if plots:
    report.plot_accuracy(runs, root / "test_accuracy.png")
    report.plot_clean_noisy(runs, root / "clean_noisy.png")
    report.plot_norms(runs, root / "norms.png")
  return summary


def _name(fields: dict[str, Any]) -> str:
  return ",".join(f"{k}={v}" for k, v in fields.items()) or "default"


def tune(
  workdir: str,
  labels: Sequence[str] = tuple(base.TUNE_GRID),
  overrides: dict[str, Any] | None = None,
  val_fraction: float = 0.2,
) -> dict[str, Any]:
  """Tries each label's candidates of `TUNE_GRID` on a validation split.

  Score: mean over seeds of the best validation accuracy over epochs
  (validation labels are noisy, as the training labels are); a diverged
  run scores -1. Ties go to the first candidate. Writes
  `<workdir>/tune.json`.

  Returns:
    `{label: {"choice": fields, "scores": {candidate name: score}}}`.
  """
  root = pathlib.Path(workdir)
  overrides = dict(overrides or {}, **{"data.val_fraction": val_fraction})
  out = {}
  for label in labels:
    if label not in base.TUNE_GRID:
      continue
    scores, best, best_score = {}, None, -math.inf
    for fields in base.TUNE_GRID[label]:
      config = make_config(label, {**overrides, **fields})
      s = run_label(config, root / label / _name(fields))
      score = s["mean"].get("best_val_accuracy")
      if s["status"] == "diverged" or score is None:
        score = -1.0
      scores[_name(fields)] = score
      if score > best_score:
        best, best_score = fields, score
    out[label] = {"choice": best, "scores": scores}
  root.mkdir(parents=True, exist_ok=True)
  record = {"tuned": out, "overrides": overrides}
  (root / "tune.json").write_text(json.dumps(record, indent=2))
  return out


def _define_flags() -> None:
  # Defined only when run as a script, so that importing this module (tests,
  # notebooks) does not clash with experiments.main's --workdir.
  flags.DEFINE_string("workdir", None, "Output directory.", required=True)
  flags.DEFINE_bool("tune", False, "Tune rho / lambda on a val split.")
  flags.DEFINE_list("labels", list(base.METHODS), "Labels to run.")
  flags.DEFINE_multi_string(
    "set", [], "field=value config override for every label (repeatable)."
  )
  flags.DEFINE_bool(
    "debug", False, "Show the traceback of a user or machine error."
  )


LEGEND = """\
Accuracies in %, mean ± std over the seeds (population std; README's table
gives the sample std). best test: peak test accuracy over epochs (early
stopping), at 'best epoch'; final test: the last epoch. clean / noisy train:
final training accuracy on the examples whose label was kept / flipped,
measured against the (noisy) training label, i.e. how much noise is
memorised. Per-method metrics and plots: see the workdir."""


def main(argv):
  """The CLI; a user or machine error is one line `error: ...`, exit 2."""
  errors.one_line_errors(_main, argv, debug=flags.FLAGS.debug)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  overrides = parse_overrides(FLAGS.set)
  if FLAGS.tune:
    tuned = tune(FLAGS.workdir, FLAGS.labels, overrides)
    for label, t in tuned.items():
      scores = ", ".join(f"{k}: {v:.3f}" for k, v in t["scores"].items())
      print(f"{label}: {_name(t['choice'])}  (best val accuracy {scores})")
    return
  summary = run_all(FLAGS.workdir, FLAGS.labels, overrides)
  print(report.format_table(summary["methods"]))
  print(LEGEND)
  print(
    f"total runtime {summary['runtime_s']:.0f} s; outputs in {FLAGS.workdir}"
  )


if __name__ == "__main__":
  _define_flags()
  app.run(main)
