"""Train-step cost of every SAM variant as a ratio to the SGD step.

    python -m benchmarks.step_cost [--reps 15] [--steps 10] [--batch 128]
    python -m benchmarks.step_cost --idioms [--reps 15] [--steps 10]
    python -m benchmarks.step_cost [--idioms] --tiny
    python -m benchmarks.step_cost --idioms --models cnn3 --methods 1-sam

Same model, batch and base optimizer (SGD, momentum 0.9) for every method;
each step is one jitted function with donated state. Methods are timed
interleaved (round-robin over repetitions) in one process, and the table
shows the median step time over repetitions divided by SGD's median.

Default table: every method and the two optax transforms on
`models.CNN1D()` and `models.MLP()` (`models.make_objective`).

`--idioms`: SGD, n-SAM, 1-SAM, J-SAM(1), L-SAM(1) and m-SAM(16) on four
models, 10 classes, each written in the idioms a researcher writes:

  linen-vars    `sj.Objective(model.apply, loss)`, params the variables
                dict `model.init(key, x)`
  linen-params  `sj.Objective(lambda p, x: model.apply({"params": p}, x),
                loss)`, params `model.init(key, x)["params"]`
  nnx           the same net as an `nnx.Module` (nnx.Conv, nnx.Linear),
                `sj.Objective.from_nnx(model, loss)`, params
                `nnx.state(model, nnx.Param)`, a `jax.jit` step with optax

  cnn1d        `models.CNN1D()`: three stride-2 'SAME' convs of 32
               channels, kernel 5, dense 64 (the MNIST-1D CNN of the
               experiments), inputs [B, 40]
  cnn3         three stride-1 'SAME' convs of 32 channels, kernel 5, dense
               256, inputs [B, 40, 1] (`benchmarks.curvature_cost`
               `build("cnn3")`)
  cnn2d        CIFAR-shaped: 3x3 'SAME' convs of 32, 64, 64 channels
               (strides 1, 2, 2) on [B, 32, 32, 3], then the head
  resnet18-ln  `resnet.ResNet18(widths=(16, 32, 64, 128), norm="layer")`
               (the label-noise paper's model at width 16) on
               [B, 32, 32, 3]; linen idioms only (sam_jax has no NNX
               ResNet)

All (model, idiom) columns are timed interleaved in one round-robin, and
`sj.fast_path` says per column whether 1-SAM takes the fast path.
`--tiny`: widths 4 (dense 8), batch 8, m = 4, 2 reps of 1 step (a smoke
test, not a measurement). `--methods` keeps the rows named (SGD always,
for the ratios), `--models` the idiom table's models named.

Targets (DESIGN.md, issue #14): n-SAM <= 2.05x, L-/J-SAM (n) <= 2.1x,
1-SAM <= 3x, L-/J-SAM (1) <= 3x, m-SAM (16) <= 2.5x.
"""

import argparse
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import optax.contrib
from flax import nnx

import sam_jax as sj
from benchmarks import timing
from sam_jax import models, resnet

BASE = dict(learning_rate=0.05, momentum=0.9)
LENGTH, CLASSES = 40, 10
LOSS = sj.softmax_cross_entropy


def sam_method(**kwargs):
  return lambda obj, p, batch: sj.sam_gradient(obj, p, batch, 0.01, **kwargs)


def sgd_method(obj, p, batch):
  return jax.value_and_grad(obj.loss)(p, batch)


def methods(m=16):
  """label -> gradient function (obj, params, batch) -> (loss, grads)."""
  return {
    "sgd": sgd_method,
    "n-sam": sam_method(),
    f"m-sam (m={m})": sam_method(group_size=m),
    "1-sam": sam_method(group_size=1),
    "1-sam (general path)": sam_method(group_size=1, fast=False),
    "l-sam (n)": sam_method(variant="logit"),
    "j-sam (n)": sam_method(variant="jacobian"),
    "l-sam (1)": sam_method(variant="logit", group_size=1),
    "j-sam (1)": sam_method(variant="jacobian", group_size=1),
    "asam (n)": sam_method(adaptive=True),
  }


METHODS = methods()
TRANSFORMS = ("sj.sam transform (n)", "optax.contrib.sam (opaque)")
IDIOM_LABELS = ("sgd", "n-sam", "1-sam", "j-sam (1)", "l-sam (1)", "m-sam")
TARGETS = {
  "n-sam": 2.05,
  "1-sam": 3.0,
  "l-sam (n)": 2.1,
  "j-sam (n)": 2.1,
  "l-sam (1)": 3.0,
  "j-sam (1)": 3.0,
  "m-sam (m=16)": 2.5,
}


def make_step(label, obj, grad_methods=None):
  """A jitted `((params, opt_state), batch) -> ((params, opt_state), loss)`
  and its optimizer."""
  grad_methods = METHODS if grad_methods is None else grad_methods
  if label in grad_methods:
    tx = optax.sgd(**BASE)
    grad_method = grad_methods[label]

    def step(state, batch):
      params, opt_state = state
      loss, grads = grad_method(obj, params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

  else:
    if label.startswith("sj.sam"):
      tx = optax.chain(sj.sam(0.01), optax.sgd(**BASE))
      wrap = lambda g: g
    else:
      tx = optax.contrib.sam(
        optax.sgd(**BASE),
        optax.chain(optax.contrib.normalize(), optax.sgd(0.01)),
        sync_period=2,
        opaque_mode=True,
      )
      wrap = lambda g: lambda p, _: g(p)

    def step(state, batch):
      params, opt_state = state
      grad_fn = jax.grad(lambda p: obj.loss(p, batch))
      loss, grads = jax.value_and_grad(obj.loss)(params, batch)
      updates, opt_state = tx.update(
        grads, opt_state, params, grad_fn=wrap(grad_fn)
      )
      return (optax.apply_updates(params, updates), opt_state), loss

  return jax.jit(step, donate_argnums=0), tx


def runs(obj, params, batch, labels, grad_methods=None, prefix=""):
  """`{prefix + label: timing.stepper}` of every label's step, each on its
  own copy of params (the steps donate their state)."""
  out = {}
  for label in labels:
    step, tx = make_step(label, obj, grad_methods)
    p = jax.tree.map(jnp.copy, params)
    out[prefix + label] = timing.stepper(step, (p, tx.init(p)), batch)
  return out


def make_batch(shape):
  kx, ky = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, shape)
  return x, jax.random.randint(ky, (shape[0],), 0, CLASSES)


# --- The idiom table ---------------------------------------------------------


class NNXCNN1D(nnx.Module):
  """`models.CNN1D` written with nnx layers: 'SAME' convs, dense, head."""

  def __init__(self, channels, kernel_size, stride, dense, *, rngs):
    chans = (1, *channels)
    self.convs = nnx.List(
      [
        nnx.Conv(
          a, b, (kernel_size,), strides=stride, padding="SAME", rngs=rngs
        )
        for a, b in zip(chans, chans[1:])
      ]
    )
    length = LENGTH
    for _ in channels:
      length = -(-length // stride)  # 'SAME': ceil(L / stride)
    widths = (length * channels[-1], *dense)
    self.dense = nnx.List(
      [nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths, widths[1:])]
    )
    self.head = nnx.Linear(widths[-1], CLASSES, rngs=rngs)

  def __call__(self, x):
    h = x[..., None] if x.ndim == 2 else x
    for conv in self.convs:
      h = nnx.relu(conv(h))
    h = h.reshape(h.shape[0], -1)
    for layer in self.dense:
      h = nnx.relu(layer(h))
    return self.head(h)


class CNN2D(nn.Module):
  """CIFAR-shaped: 3x3 'SAME' convs (stride 1, then 2), ReLU, the head."""

  widths: Sequence[int] = (32, 64, 64)

  @nn.compact
  def __call__(self, x):
    h = x
    for i, width in enumerate(self.widths):
      stride = (1, 1) if i == 0 else (2, 2)
      h = nn.relu(nn.Conv(width, (3, 3), strides=stride, padding="SAME")(h))
    return nn.Dense(CLASSES, name="head")(h.reshape(h.shape[0], -1))


class NNXCNN2D(nnx.Module):
  """`CNN2D` written with nnx layers."""

  def __init__(self, widths, *, rngs):
    chans = (3, *widths)
    self.convs = nnx.List(
      [
        nnx.Conv(
          a, b, (3, 3), strides=1 if i == 0 else 2, padding="SAME", rngs=rngs
        )
        for i, (a, b) in enumerate(zip(chans, chans[1:]))
      ]
    )
    side = 32 // 2 ** (len(widths) - 1)
    self.head = nnx.Linear(side * side * widths[-1], CLASSES, rngs=rngs)

  def __call__(self, x):
    h = x
    for conv in self.convs:
      h = nnx.relu(conv(h))
    return self.head(h.reshape(h.shape[0], -1))


def linen_vars(model, x):
  return sj.Objective(model.apply, LOSS), model.init(jax.random.key(1), x)


def linen_params(model, x):
  obj = sj.Objective(lambda p, x: model.apply({"params": p}, x), LOSS)
  return obj, model.init(jax.random.key(1), x)["params"]


def nnx_module(make_nnx, x):
  del x
  model = make_nnx(nnx.Rngs(1))
  return sj.Objective.from_nnx(model, LOSS), nnx.state(model, nnx.Param)


# idiom -> (model, sample x) -> (objective, params); the model is the linen
# module for linen idioms and `rngs -> nnx.Module` for nnx.
IDIOMS = {
  "linen-vars": linen_vars,
  "linen-params": linen_params,
  "nnx": nnx_module,
}


class IdiomModel(NamedTuple):
  linen: nn.Module
  nnx: Any  # rngs -> nnx.Module, or None (no NNX version)
  shape: tuple[int, ...]  # input shape without the batch axis


def idiom_models(tiny=False) -> dict[str, IdiomModel]:
  """name -> the model in each idiom and its input shape."""
  c, d1, d3 = ((4,) * 3, (8,), (8,)) if tiny else ((32,) * 3, (64,), (256,))
  net1 = dict(channels=c, kernel_size=5, stride=2, dense=d1)
  net3 = dict(channels=c, kernel_size=5, stride=1, dense=d3)
  w2 = (4, 8, 8) if tiny else (32, 64, 64)
  wr = (4, 4, 4, 4) if tiny else (16, 32, 64, 128)
  cnn1d = lambda net: models.CNN1D(**net, num_classes=CLASSES)
  nnx1d = lambda net: lambda rngs: NNXCNN1D(**net, rngs=rngs)
  return {
    "cnn1d": IdiomModel(cnn1d(net1), nnx1d(net1), (LENGTH,)),
    "cnn3": IdiomModel(cnn1d(net3), nnx1d(net3), (LENGTH, 1)),
    "cnn2d": IdiomModel(
      CNN2D(w2), lambda rngs: NNXCNN2D(w2, rngs=rngs), (32, 32, 3)
    ),
    "resnet18-ln": IdiomModel(
      resnet.ResNet18(num_classes=CLASSES, norm="layer", widths=wr),
      None,
      (32, 32, 3),
    ),
  }


MODEL_NAMES = ("cnn1d", "cnn3", "cnn2d", "resnet18-ln")
DEFAULT_MODELS = MODEL_NAMES


def build_idiom(model: IdiomModel, idiom: str, x):
  """`(objective, params)` of `model` written in `idiom` (None if the model
  has no version in it)."""
  if idiom == "nnx":
    return None if model.nnx is None else nnx_module(model.nnx, x)
  return IDIOMS[idiom](model.linen, x)


def select(labels, only):
  """The labels named in `only` (all for None), SGD always first."""
  unknown = set(only or ()) - set(labels)
  if unknown:
    raise SystemExit(f"--methods: unknown {sorted(unknown)}; valid: {labels}")
  return ["sgd"] + [x for x in labels if x != "sgd" and x in (only or labels)]


def idiom_columns(args):
  """`({column: {label: median s}}, {column: fast_path})`, one column per
  (model, idiom), all timed in one round-robin."""
  grad_methods = methods(4 if args.tiny else 16)
  labels = select(
    [next(k for k in grad_methods if k.startswith(x)) for x in IDIOM_LABELS],
    args.methods,
  )
  all_runs, verdicts = {}, {}
  for model_name, model in idiom_models(args.tiny).items():
    if model_name not in (args.models or DEFAULT_MODELS):
      continue
    batch = make_batch((args.batch, *model.shape))
    for idiom in IDIOMS:
      built = build_idiom(model, idiom, batch[0])
      if built is None:
        continue
      column = f"{model_name} {idiom}"
      obj, params = built
      verdicts[column] = sj.fast_path(obj, params, batch)
      all_runs |= runs(obj, params, batch, labels, grad_methods, column + "|")
  results = timing.time_interleaved(all_runs, args.reps, args.steps)
  columns = {}
  for key, median in timing.medians(results).items():
    column, label = key.split("|")
    columns.setdefault(column, {})[label] = median
  return columns, verdicts


# --- The default table -------------------------------------------------------


def bench(model, batch_size, reps, steps, labels):
  """`timing.time_interleaved` of every label's step on `model`."""
  batch = make_batch((batch_size, LENGTH))
  obj = models.make_objective(model, LOSS)
  params = models.init_params(model, jax.random.key(1), batch[0])
  return timing.time_interleaved(runs(obj, params, batch, labels), reps, steps)


def default_columns(args):
  nets = {
    "CNN1D (32,32,32)+64": models.CNN1D(),
    "MLP (128,128)": models.MLP(),
  }
  if args.tiny:
    nets = {
      "CNN1D (4,4,4)+8": models.CNN1D((4, 4, 4), dense=(8,)),
      "MLP (8,8)": models.MLP((8, 8)),
    }
  labels = select(list(METHODS) + list(TRANSFORMS), args.methods)
  return {
    name: timing.medians(bench(net, args.batch, args.reps, args.steps, labels))
    for name, net in nets.items()
  }


def print_table(columns):
  """Rows: methods (ratio to the column's SGD step), with their targets."""
  names = list(columns)
  labels = list(columns[names[0]])
  print("\n| method | target | " + " | ".join(names) + " |")
  print("|---|---:|" + "---:|" * len(names))
  misses = []
  for label in labels:
    target = TARGETS.get(label)
    cells = []
    for name in names:
      ratio = columns[name][label] / columns[name]["sgd"]
      miss = target is not None and ratio > target
      misses += [f"{label} on {name}: {ratio:.2f}x > {target}x"] * miss
      cells.append(f"**{ratio:.2f}**" if miss else f"{ratio:.2f}")
    bound = "" if target is None else f"<= {target}x"
    print(f"| {label} | {bound} | " + " | ".join(cells) + " |")
  print()
  for name in names:
    print(f"# {name}: SGD step {columns[name]['sgd'] * 1e3:.2f} ms")
  print("# target misses (bold): " + ("; ".join(misses) or "none"))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=15)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument(
    "--idioms",
    action="store_true",
    help="the (model, idiom) table: linen-vars, linen-params, nnx",
  )
  parser.add_argument(
    "--tiny", action="store_true", help="smoke test: widths 4, batch 8"
  )
  parser.add_argument("--methods", nargs="+", help="rows (labels) to time")
  parser.add_argument(
    "--models",
    nargs="+",
    choices=MODEL_NAMES,
    help=f"with --idioms (default: {' '.join(DEFAULT_MODELS)})",
  )
  args = parser.parse_args(argv)
  if args.tiny:
    args.batch, args.reps, args.steps = 8, 2, 1
  print(
    f"# step cost / SGD step, batch {args.batch}, medians of {args.reps} "
    f"interleaved reps x {args.steps} steps" + (" (tiny)" * args.tiny)
  )
  print(timing.machine_line())
  if not args.idioms:
    print_table(default_columns(args))
    return
  columns, verdicts = idiom_columns(args)
  for column, verdict in verdicts.items():
    reason = "" if verdict else f" ({verdict.reason})"
    print(f"# {column}: 1-SAM fast path: {bool(verdict)}{reason}")
  print_table(columns)


if __name__ == "__main__":
  jnp.zeros(()).block_until_ready()
  main()
