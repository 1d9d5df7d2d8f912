"""From `optax.contrib.sam` to `sam_jax.sam`: the same loop, twice, then more.

  python examples/migrate_from_optax_contrib.py [--tiny] [--out DIR]

1. One tiny training loop (a two-layer MLP on synthetic 3-class data) run with
   `optax.contrib.sam` in opaque mode (sync_period=2: one adversarial step,
   then the outer step, inside one `update`) and with
   `optax.chain(sj.sam(rho), base)`. Both compute plain SAM; the parameters
   agree to float32 rounding.
2. What sam_jax adds, in the same loop: 1-SAM (one perturbation per example),
   J-SAM (only the Jacobian is perturbed), and a scheduled rho.

The table in docs/optax.md lists what changes and what has no counterpart.
`--out DIR` writes DIR/results.json; `--tiny` runs in a few seconds.
"""

import argparse
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import optax.contrib

import sam_jax as sj

RHO, LR, K = 0.05, 0.1, 3


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(K)(nn.gelu(nn.Dense(32)(x)))


def make_data(n, key):
  """Three Gaussian blobs in 8 dimensions, 20% of the labels flipped."""
  kc, kx, kn, kf = jax.random.split(key, 4)
  centers = 1.5 * jax.random.normal(kc, (K, 8))
  y = jnp.arange(n) % K
  x = centers[y] + jax.random.normal(kx, (n, 8))
  noisy = jax.random.bernoulli(kn, 0.2, (n,))
  y = jnp.where(noisy, jax.random.randint(kf, (n,), 0, K), y)
  return x, y


def train(update_fn, tx, params, data, steps, batch_size):
  """`steps` jitted steps of `update_fn(tx, grads, state, params, batch)`."""
  x, y = data

  @jax.jit
  def step(params, state, i):
    start = (i * batch_size) % x.shape[0]
    batch = (
      jax.lax.dynamic_slice_in_dim(x, start, batch_size),
      jax.lax.dynamic_slice_in_dim(y, start, batch_size),
    )
    updates, state = update_fn(tx, state, params, batch)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for i in range(steps):
    params, state = step(params, state, i)
  return params, state


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tiny", action="store_true", help="a few seconds")
  parser.add_argument("--out", help="directory for results.json")
  args = parser.parse_args(argv)
  steps, batch_size = (20, 32) if args.tiny else (400, 64)

  data = make_data(512, jax.random.key(0))
  model = MLP()
  params = model.init(jax.random.key(1), data[0][:1])["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  obj = sj.Objective(apply_fn, sj.softmax_cross_entropy)

  # ---- 1. optax.contrib.sam and sj.sam: plain SAM, the same numbers --------
  base = optax.sgd(LR, momentum=0.9)

  def contrib_update(tx, state, params, batch):
    grads = jax.grad(obj.loss)(params, batch)
    # contrib's grad_fn takes (params, adversarial step index).
    grad_fn = lambda p, _: jax.grad(obj.loss)(p, batch)
    return tx.update(grads, state, params, grad_fn=grad_fn)

  contrib = optax.contrib.sam(
    base,
    optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),  # eps = rho g/|g|
    sync_period=2,
    opaque_mode=True,
  )
  p_contrib, _ = train(contrib_update, contrib, params, data, steps, batch_size)

  def sj_update(tx, state, params, batch):
    grads = jax.grad(obj.loss)(params, batch)
    grad_fn = lambda p: jax.grad(obj.loss)(p, batch)  # params only
    return tx.update(grads, state, params, grad_fn=grad_fn)

  ours = optax.chain(sj.sam(RHO), base)  # sj.sam before the optimizer
  p_ours, _ = train(sj_update, ours, params, data, steps, batch_size)
  diff = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_contrib))
  )
  print(f"plain SAM, {steps} steps: max |sj - optax.contrib| = {diff:.2e}")
  if diff > 1e-4:
    raise SystemExit(f"sj.sam and optax.contrib.sam disagree by {diff}")

  # ---- 2. What sam_jax adds ------------------------------------------------
  def group_update(tx, state, params, batch):
    # Variants that need the logits take objective= and batch=. Groups
    # (1-SAM) recompute the clean gradient per group and ignore the
    # incoming one: pass zeros rather than computing a gradient nobody uses.
    zeros = optax.tree.zeros_like(params)
    return tx.update(zeros, state, params, objective=obj, batch=batch)

  def objective_update(tx, state, params, batch):
    # n-SAM variants (J-SAM here) take the perturbation from the gradient.
    grads = jax.grad(obj.loss)(params, batch)
    return tx.update(grads, state, params, objective=obj, batch=batch)

  def sgd_update(tx, state, params, batch):
    return tx.update(jax.grad(obj.loss)(params, batch), state, params)

  schedule = optax.linear_schedule(0.0, 2 * RHO, transition_steps=steps)
  runs = {
    "sgd": (base, sgd_update),
    "sam": (ours, sj_update),
    "1-sam": (optax.chain(sj.sam(RHO, group_size=1), base), group_update),
    "j-sam": (optax.chain(sj.sam(RHO, variant="jacobian"), base), None),
    "sam, rho 0 -> 0.1": (optax.chain(sj.sam(schedule), base), sj_update),
  }
  results = {"steps": steps, "max_abs_diff_sam_vs_contrib": diff}
  accuracy = lambda p: jnp.mean(jnp.argmax(apply_fn(p, data[0]), -1) == data[1])
  for name, (tx, update_fn) in runs.items():
    p, state = train(
      update_fn or objective_update, tx, params, data, steps, batch_size
    )
    results[name] = {
      "train_loss": float(obj.loss(p, data)),
      "train_accuracy": float(accuracy(p)),
    }
    if update_fn in (None, group_update):
      # The objective path exposes the clean batch loss of the last step.
      results[name]["last_batch_loss"] = float(state[0].loss)
    print(
      f"{name:>18}: train loss {results[name]['train_loss']:.4f}, "
      f"accuracy {results[name]['train_accuracy']:.3f}"
    )
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
