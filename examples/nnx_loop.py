"""A flax NNX training loop with SAM through `nnx.Optimizer`.

  python examples/nnx_loop.py [--tiny] [--out DIR]

`sj.Objective.from_nnx(model, loss)` is an Objective whose `apply_fn` takes
the model's `nnx.Param` state: exactly what `nnx.Optimizer(model, tx,
wrt=nnx.Param)` hands to optax, so `sj.sam` sits in the optimizer's chain
and gets the objective and the batch as extra arguments of
`optimizer.update`. Build the objective inside the `nnx.jit` step, once per
step: it forks the model's RNG streams, so the clean and perturbed passes of
a step share their dropout masks and the next step draws new ones.
A model with BatchNorm runs n-SAM through `sj.sam_gradient(...,
has_aux=True)` and applies the new running averages with `nnx.update`
(1-SAM is refused: BatchNorm mixes the examples). Data: MNIST-1D.
`--out DIR` writes DIR/results.json.
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import sam_jax as sj
from sam_jax import data


class CNN(nnx.Module):
  def __init__(self, width: int, rngs: nnx.Rngs, batch_norm: bool = False):
    chans = [1, width, width, width]
    self.convs = nnx.List(
      [
        nnx.Conv(a, b, kernel_size=5, padding="SAME", rngs=rngs)
        for a, b in zip(chans, chans[1:])
      ]
    )
    self.norm = nnx.BatchNorm(width, rngs=rngs) if batch_norm else None
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.hidden = nnx.Linear(40 * width, 256, rngs=rngs)
    self.head = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):  # x: [B, 40]
    h = x[..., None]
    for conv in self.convs:
      h = nnx.relu(conv(h))
    if self.norm is not None:
      h = self.norm(h)
    h = self.dropout(h.reshape(h.shape[0], -1))
    return self.head(nnx.relu(self.hidden(h)))


@nnx.jit(static_argnames="with_state")
def train_step(model, optimizer, x, y, with_state=False):
  obj = sj.Objective.from_nnx(model, sj.softmax_cross_entropy)
  if with_state:  # BatchNorm: n-SAM, the new running averages applied
    params = nnx.state(model, nnx.Param)
    (loss, new_state), grads = sj.sam_gradient(
      obj, params, (x, y), 0.05, has_aux=True
    )
    nnx.update(model, new_state)
    optimizer.update(model, grads)
    return loss
  # 1-SAM in the optimizer's chain: no clean gradient needed (None).
  optimizer.update(model, None, objective=obj, batch=(x, y))
  return optimizer.opt_state[0].loss


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true")
  parser.add_argument("--out", default="out/nnx_loop")
  args = parser.parse_args(argv)
  n, epochs, width = (400, 2, 8) if args.tiny else (4000, 20, 32)
  d = data.load_mnist1d(num_samples=n + n // 4, test_fraction=0.2)
  x, y = jnp.asarray(d["x_train"]), jnp.asarray(d["y_train"])
  x_test, y_test = jnp.asarray(d["x_test"]), jnp.asarray(d["y_test"])
  results = {}
  for name, batch_norm in [("1-sam", False), ("n-sam + batchnorm", True)]:
    model = CNN(width, nnx.Rngs(0, dropout=1), batch_norm=batch_norm)
    chain = [sj.sam(0.02, group_size=1)] if not batch_norm else []
    tx = optax.chain(*chain, optax.sgd(0.05, momentum=0.9))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    if not batch_norm:
      obj = sj.Objective.from_nnx(model, sj.softmax_cross_entropy)
      params = nnx.state(model, nnx.Param)
      print("1-SAM fast path:", sj.fast_path(obj, params, (x[:32], y[:32])))
    for epoch in range(epochs):
      perm = jax.random.permutation(jax.random.key(epoch), x.shape[0])
      for i in range(0, x.shape[0] - 31, 32):
        idx = perm[i : i + 32]
        loss = train_step(model, optimizer, x[idx], y[idx], batch_norm)
    model.eval()  # dropout off, BatchNorm on its running averages
    acc = float(jnp.mean(jnp.argmax(model(x_test), -1) == y_test))
    results[name] = {"final_loss": float(loss), "test_accuracy": acc}
    print(f"{name:18s} final batch loss {float(loss):.3f}  test acc {acc:.3f}")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
