"""Residual nets for 32x32 images: ResNet-18 and WideResNet-28-k.

Both follow the contract of `sam_jax.models` (`__call__(x,
return_features=False)`, last layer an `nn.Dense` named "head", features
the globally average-pooled activations it reads) and take inputs
`[B, H, W, C]` (channels last).

`norm` selects the normalisation after every convolution:

  "batch"  BatchNorm over (B, H, W) per channel, momentum 0.9. The model
           has a `batch_stats` collection; it normalises with the batch's
           statistics when `batch_stats` is mutable (training, init) and with
           the running averages otherwise (evaluation). See
           `sam_jax.models` (`init`, `make_objective`) for how training
           keeps it.
  "layer"  LayerNorm over (H, W, C) per example with a per-channel scale and
           bias: GroupNorm with one group (Wu & He 2018), the swap the
           label-noise paper makes for per-example SAM (PAPERS.md A1).
  "group"  GroupNorm with `num_groups` groups (must divide every width).

Layer and group norm act on each example alone, so per-example
perturbations (1-SAM) are well defined and the fast path of
`sam_jax.per_example` covers them. Convolutions have no bias (a norm
follows); `dtype` is the compute dtype of convolutions and the head
(e.g. bfloat16; parameters and normalisation stay at least float32).

ResNet-18 is the CIFAR variant (He et al. 2016, as in most SAM papers): a
3x3 stem convolution without max-pooling, four stages of two basic blocks
(post-activation) with widths 64/128/256/512, strides 1/2/2/2.
WideResNet-d-k (Zagoruyko & Komodakis 2016) has three stages of
(d - 4) / 6 pre-activation blocks with widths 16k/32k/64k.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
NORMS = ("batch", "layer", "group")
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _at_least_f32(x: Array):
  return jnp.promote_types(x.dtype, jnp.float32)


class _Norm(nn.Module):
  """The normalisation named by `kind` (see the module docstring)."""

  kind: str
  num_groups: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = x.astype(_at_least_f32(x))
    if self.kind == "batch":
      training = self.is_mutable_collection("batch_stats")
      return nn.BatchNorm(
        use_running_average=not training, momentum=0.9, name="norm"
      )(x)
    if self.kind == "layer":
      return nn.LayerNorm(reduction_axes=(-3, -2, -1), name="norm")(x)
    if self.kind == "group":
      if x.shape[-1] % self.num_groups:
        raise ValueError(
          f"model.num_groups={self.num_groups} must divide every width; "
          f"got a layer of {x.shape[-1]} channels"
        )
      return nn.GroupNorm(self.num_groups, name="norm")(x)
    raise ValueError(f"model.norm: unknown norm {self.kind!r}; valid: {NORMS}")


class _Net(nn.Module):
  """Fields and layers shared by the residual nets."""

  num_classes: int = 10
  norm: str = "batch"
  num_groups: int = 32
  activation: Callable[[Array], Array] = nn.relu
  dtype: Any = None  # compute dtype of convs and head; None: from inputs

  def _conv(self, width: int, kernel: int = 3, stride: int = 1, name=None):
    return nn.Conv(
      width,
      (kernel, kernel),
      strides=(stride, stride),
      padding="SAME",
      use_bias=False,
      kernel_init=_conv_init,
      dtype=self.dtype,
      name=name,
    )

  def _norm(self, name=None) -> _Norm:
    return _Norm(self.norm, self.num_groups, name=name)

  def _head(self, h: Array, return_features: bool):
    feats = jnp.mean(h.astype(_at_least_f32(h)), axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(feats)
    return (logits, feats) if return_features else logits


def _check_image(x: Array, name: str) -> None:
  if x.ndim != 4:
    raise ValueError(f"{name} expects images [B, H, W, C], got {x.shape}")


class ResNet18(_Net):
  """ResNet-18 for 32x32 inputs; `widths` of the four stages."""

  widths: Sequence[int] = (64, 128, 256, 512)
  blocks_per_stage: int = 2

  @nn.compact
  def __call__(self, x: Array, return_features: bool = False):
    _check_image(x, "ResNet18")
    act = self.activation
    h = act(self._norm()(self._conv(self.widths[0])(x)))
    for stage, width in enumerate(self.widths):
      for block in range(self.blocks_per_stage):
        stride = 2 if stage > 0 and block == 0 else 1
        out = act(self._norm()(self._conv(width, stride=stride)(h)))
        out = self._norm()(self._conv(width)(out))
        if stride != 1 or h.shape[-1] != width:
          h = self._norm()(self._conv(width, 1, stride)(h))
        h = act(out + h)
    return self._head(h, return_features)


class WideResNet(_Net):
  """WideResNet-`depth`-`widen_factor` (pre-activation blocks).

  Stage widths are `base_width * (1, 2, 4) * widen_factor` after a stem of
  `base_width` channels (16 in the paper; tests use less).
  """

  depth: int = 28
  widen_factor: int = 10
  base_width: int = 16

  @nn.compact
  def __call__(self, x: Array, return_features: bool = False):
    _check_image(x, "WideResNet")
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ValueError(
        f"model.depth must be 6n + 4 with n >= 1, got {self.depth}"
      )
    act = self.activation
    h = self._conv(self.base_width)(x)
    for stage in range(3):
      width = self.base_width * self.widen_factor * 2**stage
      for block in range((self.depth - 4) // 6):
        stride = 2 if stage > 0 and block == 0 else 1
        pre = act(self._norm()(h))
        out = self._conv(width, stride=stride)(pre)
        out = self._conv(width)(act(self._norm()(out)))
        if stride != 1 or h.shape[-1] != width:
          h = self._conv(width, 1, stride)(pre)
        h = out + h
    return self._head(act(self._norm()(h)), return_features)
