"""A flax.linen training loop with SAM, then 1-SAM, then J-SAM.

  python examples/linen_loop.py [--tiny] [--out DIR]

The loop a researcher already has: `variables = model.init(...)` (the full
dict), an optax optimizer, a jitted step. SAM is one more transform in the
chain, `sj.sam(rho)`, before the optimizer; it needs the gradient of the
same batch at another point (`grad_fn=`) or, for the per-example variants,
the objective and the batch (`objective=`, `batch=`), and then ignores the
incoming gradient (pass None: no backward pass is wasted).
Data: MNIST-1D (generated offline), 20% of the training labels flipped.
`--out DIR` writes DIR/results.json.
"""

import argparse
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import sam_jax as sj
from sam_jax import data


class CNN(nn.Module):
  width: int = 32

  @nn.compact
  def __call__(self, x):  # x: [B, 40]
    h = x[..., None]
    for _ in range(3):
      h = nn.relu(nn.Conv(self.width, (5,), padding="SAME")(h))
    h = nn.relu(nn.Dense(256)(h.reshape(h.shape[0], -1)))
    return nn.Dense(10)(h)


def make_step(obj, tx, method):
  """One jitted step of `method` in ("sgd", "sam", "1-sam", "j-sam")."""

  @jax.jit
  def step(variables, opt_state, x, y):
    loss_fn = lambda v: obj.loss(v, (x, y))
    if method in ("sgd", "sam"):
      loss, grads = jax.value_and_grad(loss_fn)(variables)
      updates, opt_state = tx.update(
        grads, opt_state, variables, grad_fn=jax.grad(loss_fn)
      )
    else:  # group variants recompute what they need: no clean gradient
      updates, opt_state = tx.update(
        None, opt_state, variables, objective=obj, batch=(x, y)
      )
      loss = opt_state[0].loss  # sj.sam's state keeps the clean loss
    return optax.apply_updates(variables, updates), opt_state, loss

  return step


def accuracy(obj, variables, x, y):
  return float(jnp.mean(jnp.argmax(obj.apply_fn(variables, x), -1) == y))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true")
  parser.add_argument("--out", default="out/linen_loop")
  args = parser.parse_args(argv)
  n, epochs, width = (400, 2, 8) if args.tiny else (4000, 30, 32)
  d = data.load_mnist1d(num_samples=n + n // 4, test_fraction=0.2)
  noisy, _ = data.label_noise(d["y_train"], 0.2, num_classes=10, seed=0)
  x, y = jnp.asarray(d["x_train"]), jnp.asarray(noisy)
  model = CNN(width)
  obj = sj.Objective(model.apply, sj.softmax_cross_entropy)
  variables = model.init(jax.random.key(0), x[:1])
  print("1-SAM fast path:", sj.fast_path(obj, variables, (x[:32], y[:32])))
  base = optax.sgd(optax.cosine_decay_schedule(0.05, epochs * (n // 32)), 0.9)
  transforms = {
    "sgd": base,
    "sam": optax.chain(sj.sam(0.05), base),
    "1-sam": optax.chain(sj.sam(0.02, group_size=1), base),
    "j-sam": optax.chain(sj.sam(0.02, group_size=1, variant="jacobian"), base),
  }
  results = {}
  for method, tx in transforms.items():
    v, opt_state = variables, tx.init(variables)
    step = make_step(obj, tx, method)
    for epoch in range(epochs):
      perm = jax.random.permutation(jax.random.key(epoch), x.shape[0])
      for i in range(0, x.shape[0] - 31, 32):
        idx = perm[i : i + 32]
        v, opt_state, loss = step(v, opt_state, x[idx], y[idx])
    test = accuracy(obj, v, jnp.asarray(d["x_test"]), jnp.asarray(d["y_test"]))
    results[method] = {"final_loss": float(loss), "test_accuracy": test}
    print(
      f"{method:6s} final batch loss {float(loss):.3f}  test acc {test:.3f}"
    )
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
