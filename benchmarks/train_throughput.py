"""Training throughput (images/s) of SGD and the SAM variants on ResNet-18.

    python -m benchmarks.train_throughput [--batch 128] [--width 64]
        [--reps 5] [--steps 3] [--tiny]

Each row is the trainer's own step (`sam_jax.train.make_train_step`: the
method's gradient, whose clean pass also moves the BatchNorm running
averages, and momentum SGD with weight decay), jitted with donated state,
on random 32x32x3 images and 10 classes.
Rows are timed interleaved (round-robin over repetitions) in one process;
the table gives images/s from the median step time, the median and range
of the step time over repetitions, and the ratio of the median to the SGD
step of the same network.

Networks: ResNet-18 with BatchNorm (SGD, n-SAM, m-SAM with groups of 16,
ASAM, and the logit/Jacobian variants) and with LayerNorm, the paper's
network for per-example SAM (everything, 1-SAM included). Two rows
isolate the running averages: `sgd w/o BN stats update` runs the BN step
with an empty model state (the difference to `sgd` is what updating them
costs now: a few elementwise ops on the statistics the gradient's pass
computes anyway), and `sgd + separate BN stats pass` takes them from a
second clean forward pass (`models.update_state`, the trainer's fallback
for m-SAM and per-device SAM, and how every step worked before).
`--width` is the first stage's width (64 is ResNet-18); `--tiny` runs
width 4, batch 16, 1 rep (a smoke test).
"""

import argparse

import jax
import jax.numpy as jnp
import ml_collections

from benchmarks import timing
from sam_jax import models, train

# label -> (norm, method, group_size[, adaptive]); rho is 0.05 for every
# SAM row (ASAM's rho is in its own, parameter-scaled units).
ROWS = {
  "sgd (BN)": ("batch", "sgd", None),
  "sgd w/o BN stats update (BN)": ("batch", "sgd", None),
  "sgd + separate BN stats pass (BN)": ("batch", "sgd", None),
  "sam (BN)": ("batch", "sam", None),
  "m-sam(16) (BN)": ("batch", "sam", 16),
  "asam (BN)": ("batch", "sam", None, True),
  "l-sam (BN)": ("batch", "l-sam", None),
  "j-sam (BN)": ("batch", "j-sam", None),
  "sgd (LN)": ("layer", "sgd", None),
  "sam (LN)": ("layer", "sam", None),
  "l-sam (LN)": ("layer", "l-sam", None),
  "j-sam (LN)": ("layer", "j-sam", None),
  "1-sam (LN)": ("layer", "sam", 1),
  "l-sam(1) (LN)": ("layer", "l-sam", 1),
  "j-sam(1) (LN)": ("layer", "j-sam", 1),
}
NUM_CLASSES = 10


def make_config(
  method: str, group_size, batch: int, width: int, norm: str, adaptive=False
):
  return ml_collections.ConfigDict(
    dict(
      method=method,
      rho=0.05,
      group_size=group_size,
      adaptive=adaptive,
      batch_size=batch,
      learning_rate=0.01,
      momentum=0.9,
      weight_decay=5e-4,
      schedule="constant",
      num_epochs=1,
      model=dict(
        name="resnet18", norm=norm, width=width, activation="relu", beta=1.0
      ),
    )
  )


def make_run(label: str, batch: int, width: int, x):
  """A jitted, donated `state -> state` step and its initial state."""
  norm, method, group_size, *adaptive = ROWS[label]
  config = make_config(method, group_size, batch, width, norm, *adaptive)
  model = train.make_model(config, NUM_CLASSES)
  tx = train.make_optimizer(config, steps_per_epoch=1)
  params, model_state = models.init(model, jax.random.key(0), x[:1])
  if "w/o BN stats update" in label:
    model_state = {}
  state = train.TrainState(
    jnp.zeros([], jnp.int32), params, tx.init(params), model_state
  )
  # Any wrapped gradient function gets the separate state pass.
  wrap = (lambda fn: fn) if "separate BN stats pass" in label else None
  step = train.make_train_step(config, model, tx, wrap_grad_fn=wrap)
  step = jax.jit(step, donate_argnums=0)
  return step, state


def bench(labels, batch: int, width: int, reps: int, steps: int):
  """`timing.time_interleaved` of the rows: `{label: {"times": [s per step,
  per rep], "first_s": first step, compilation included}}`."""
  key = jax.random.key(0)
  x = jax.random.normal(key, (batch, 32, 32, 3))
  data = (x, jax.random.randint(key, (batch,), 0, NUM_CLASSES))
  runs = {
    label: timing.stepper(*make_run(label, batch, width, x), data, key)
    for label in labels
  }
  return timing.time_interleaved(runs, reps, steps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--tiny", action="store_true")
  parser.add_argument(
    "--rows", default="", help="comma-separated row labels (default: all)"
  )
  args = parser.parse_args()
  if args.tiny:
    args.batch, args.width, args.reps, args.steps = 16, 4, 1, 1
  labels = [r.strip() for r in args.rows.split(",") if r.strip()] or list(ROWS)
  for label in labels:
    if label not in ROWS:
      parser.error(f"unknown row {label!r}; valid: {list(ROWS)}")
  runs = bench(labels, args.batch, args.width, args.reps, args.steps)
  print(
    f"# ResNet-18 (width {args.width}), batch {args.batch} of 32x32x3, "
    f"medians of {args.reps} interleaved reps x {args.steps} steps"
  )
  print(timing.machine_line(device_kind=True))
  print(
    "\n| step | images/s | step ms (min-max over reps) | / SGD step | "
    "compile s |"
  )
  print("|---|---:|---:|---:|---:|")
  medians = timing.medians(runs)
  for label in labels:
    med = medians[label]
    sgd_label = "sgd (BN)" if label.endswith("(BN)") else "sgd (LN)"
    ratio = f"{med / medians[sgd_label]:.2f}" if sgd_label in runs else "-"
    lo, hi = min(runs[label]["times"]), max(runs[label]["times"])
    print(
      f"| {label} | {args.batch / med:.1f} | {med * 1e3:.0f} "
      f"({lo * 1e3:.0f}-{hi * 1e3:.0f}) | {ratio} | "
      f"{runs[label]['first_s']:.1f} |"
    )


if __name__ == "__main__":
  jnp.zeros(()).block_until_ready()
  main()
