"""FLOPs per image of ResNet-18 (forward, gradient) from XLA's cost analysis.

    python -m benchmarks.model_flops [--norm layer] [--width 64] [--batch 128]

Compiles (does not run) the forward pass and the gradient of the mean
softmax cross-entropy at batch `--batch` of 32x32x3 images and prints XLA's
FLOP count per image. The runtime estimates in the CIFAR configs' docstrings
come from these numbers.
"""

import argparse

import jax
import jax.numpy as jnp

from sam_jax import models, resnet
from sam_jax.objective import softmax_cross_entropy


def flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax: one dict per device.
    analysis = analysis[0]
  return float(analysis["flops"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--norm", default="layer", choices=resnet.NORMS)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--batch", type=int, default=128)
  args = parser.parse_args()
  w = args.width
  model = resnet.ResNet18(
    num_classes=10, norm=args.norm, widths=(w, 2 * w, 4 * w, 8 * w)
  )
  x = jnp.zeros((args.batch, 32, 32, 3))
  y = jnp.zeros((args.batch,), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1]))
  params = params["params"]
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  obj = models.make_objective(model, softmax_cross_entropy)
  gradient = jax.jit(jax.grad(obj.loss))
  per_image = {
    "forward": flops(forward.lower(params, x).compile()) / args.batch,
    "gradient": flops(gradient.lower(params, (x, y)).compile()) / args.batch,
  }
  print(
    f"ResNet-18 ({args.norm} norm, width {w}), batch {args.batch}: "
    + ", ".join(f"{k} {v / 1e9:.2f} GFLOP/image" for k, v in per_image.items())
  )


if __name__ == "__main__":
  main()
