"""Train-step cost of every SAM variant as a ratio to the SGD step.

    python -m benchmarks.step_cost [--reps 15] [--steps 10] [--batch 128]

Same model, batch and base optimizer (SGD, momentum 0.9) for every method;
each step is one jitted function with donated state. Methods are timed
interleaved (round-robin over repetitions) in one process, and the table
shows the median step time over repetitions divided by SGD's median.
Targets (DESIGN.md): n-SAM <= 2.05x, L-/J-SAM (n) <= 2.1x, 1-SAM <= 3x.
"""

import argparse

import jax
import jax.numpy as jnp
import optax
import optax.contrib

import sam_jax as sj
from benchmarks import timing
from sam_jax import models

BASE = dict(learning_rate=0.05, momentum=0.9)


def sam_method(**kwargs):
  return lambda obj, p, batch: sj.sam_gradient(obj, p, batch, 0.01, **kwargs)


def sgd_method(obj, p, batch):
  return jax.value_and_grad(obj.loss)(p, batch)


# label -> gradient function (obj, params, batch) -> (loss, grads)
METHODS = {
  "sgd": sgd_method,
  "n-sam": sam_method(),
  "m-sam (m=16)": sam_method(group_size=16),
  "1-sam": sam_method(group_size=1),
  "1-sam (general path)": sam_method(group_size=1, fast=False),
  "l-sam (n)": sam_method(variant="logit"),
  "j-sam (n)": sam_method(variant="jacobian"),
  "l-sam (1)": sam_method(variant="logit", group_size=1),
  "j-sam (1)": sam_method(variant="jacobian", group_size=1),
  "asam (n)": sam_method(adaptive=True),
}
TRANSFORMS = ("sj.sam transform (n)", "optax.contrib.sam (opaque)")


def make_step(label, obj):
  """A jitted `((params, opt_state), batch) -> ((params, opt_state), loss)`
  and its optimizer."""
  if label in METHODS:
    tx = optax.sgd(**BASE)
    grad_method = METHODS[label]

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


def bench(model, batch_size, reps, steps, labels):
  """`timing.time_interleaved` of every label's step on `model`."""
  key = jax.random.key(0)
  x = jax.random.normal(key, (batch_size, 40))
  y = jax.random.randint(key, (batch_size,), 0, 10)
  batch = (x, y)
  obj = models.make_objective(model, sj.softmax_cross_entropy)
  runs = {}
  for label in labels:
    step, tx = make_step(label, obj)
    params = models.init_params(model, jax.random.key(1), x)
    runs[label] = timing.stepper(step, (params, tx.init(params)), batch)
  return timing.time_interleaved(runs, reps, steps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=15)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=128)
  args = parser.parse_args()
  labels = list(METHODS) + list(TRANSFORMS)
  nets = {
    "CNN1D (32,32,32)+64": models.CNN1D(),
    "MLP (128,128)": models.MLP(),
  }
  print(
    f"# step cost / SGD step, batch {args.batch}, medians of {args.reps} "
    f"interleaved reps x {args.steps} steps"
  )
  print(timing.machine_line())
  medians = {
    name: timing.medians(bench(net, args.batch, args.reps, args.steps, labels))
    for name, net in nets.items()
  }
  names = list(nets)
  print("\n| method | " + " | ".join(f"{n} ratio" for n in names) + " |")
  print("|---|" + "---:|" * len(names))
  for label in labels:
    cells = [f"{medians[n][label] / medians[n]['sgd']:.2f}" for n in names]
    print(f"| {label} | " + " | ".join(cells) + " |")
  print()
  for name in names:
    print(f"# {name}: SGD step {medians[name]['sgd'] * 1e3:.2f} ms")


if __name__ == "__main__":
  jnp.zeros(()).block_until_ready()
  main()
