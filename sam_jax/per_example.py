"""Fast 1-SAM: per-example perturbations injected into Dense and Conv layers.

1-SAM needs, for every example i, the gradient at its own point
`w + eps_i`, `eps_i = rho g_i / ||g_i||` (PAPERS.md A1). A `vmap` over
examples runs B separate backward passes. For a linear layer `y = a W + b`
the per-example gradient is `G_i = sum_p a_ip (x) delta_ip` (p over
positions: one for Dense on [B, D], the output positions of a convolution),
so the perturbed layer is

  y'_i = a'_i (W + c_i G_i) + b + c_i gb_i,    c_i = rho / ||g_i||,

i.e. the clean layer plus a correction built from the clean pass's inputs
`a_i` and output cotangents `delta_i`. For Dense on [B, D], `G_i` is rank
one and the correction is `c_i delta_i ((a'_i . a_i) + 1)`: almost free.
For convolutions, `G_i` is formed from patches (strided slices of the
input) at the cost of one more convolution. Gradients w.r.t. `W` of the
perturbed pass are exactly those at `W + eps_i` because the correction is
held constant. `flax.linen.intercept_methods` injects all of this into any
model made of `nn.Dense`/`nn.Conv` without changing the model.

Per-example normalisations `nn.LayerNorm`/`nn.GroupNorm` (features on the
last axis, no statistics across the batch) are covered the same way:
`y = xhat(a) s + b` with the parameter-free `xhat` recomputed from the
layer's input, per-example gradients `gs_i = sum_p xhat_ip * delta_ip`,
`gb_i = sum_p delta_ip` (per channel), and the correction
`c_i (xhat(a'_i) gs_i + gb_i)`. `plan` returns None (and `sam_gradient`
falls back to the general path) for anything else: other parametrised
layers (BatchNorm), shared layers, grouped or circular convolutions, or
non-flax models.
"""

import itertools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sam_jax.objective import Batch, Objective, Params


class Layer(NamedTuple):
  """A linear layer the fast path knows: where it is and its geometry."""

  name: str  # "/".join(module path)
  out_shape: tuple[int, ...]
  out_dtype: Any
  use_bias: bool
  conv: Optional[dict]  # None for Dense, else patch arguments
  # Per-example norms: the layer without scale and bias (`xhat`), else None.
  normalize: Optional[nn.Module] = None
  use_scale: bool = False


def _conv_args(module: nn.Conv, ndim: int) -> Optional[dict]:
  """Arguments of `conv_general_dilated_patches` for a flax Conv, or None."""
  nd = ndim - 2
  as_tuple = lambda v: (
    (v,) * nd if isinstance(v, int) else tuple(v or (1,) * nd)
  )
  if module.feature_group_count != 1 or module.mask is not None:
    return None
  padding = module.padding
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):
      return None
  elif isinstance(padding, int):
    padding = ((padding, padding),) * nd
  else:
    padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  spatial = "WHD"[:nd][::-1]
  lhs = "N" + spatial + "C"
  return dict(
    filter_shape=as_tuple(module.kernel_size),
    window_strides=as_tuple(module.strides),
    padding=padding,
    lhs_dilation=as_tuple(module.input_dilation),
    rhs_dilation=as_tuple(module.kernel_dilation),
    dimension_numbers=(lhs, spatial + "IO", lhs),
  )


def _normalizer(module: nn.Module, ndim: int) -> Optional[nn.Module]:
  """`module` without its affine part, if it normalises each example alone
  with per-channel (last axis) scale and bias; else None."""
  if module.axis_name is not None:
    return None
  if type(module) is nn.LayerNorm:
    as_tuple = lambda v: (v,) if isinstance(v, int) else tuple(v)
    reduced = {a % ndim for a in as_tuple(module.reduction_axes)}
    if 0 in reduced or {a % ndim for a in as_tuple(module.feature_axes)} != {
      ndim - 1
    }:
      return None
  elif module.reduction_axes is not None:  # GroupNorm: default is per example
    return None
  return module.clone(parent=None, name=None, use_scale=False, use_bias=False)


_NORMS = (nn.LayerNorm, nn.GroupNorm)


def plan(apply_fn: Any, params: Params, x: jax.Array) -> Optional[tuple]:
  """The layers of `apply_fn` if the fast path covers every parameter."""
  layers, seen, ok = [], set(), [True]

  def survey(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or type(module) not in (
      nn.Dense,
      nn.Conv,
      *_NORMS,
    ):
      return out  # other modules: their parameters fail the coverage check
    a = args[0]
    name = "/".join(module.path)
    conv, normalize, use_scale = None, None, False
    if type(module) is nn.Conv:
      conv = _conv_args(module, a.ndim) if a.ndim >= 3 else None
      ok[0] &= conv is not None
    if type(module) in _NORMS:
      normalize, use_scale = _normalizer(module, a.ndim), module.use_scale
      ok[0] &= normalize is not None
    batched = a.ndim >= 2 and a.shape[0] == out.shape[0] == x.shape[0]
    ok[0] &= batched and name not in seen  # a shared layer sums per call
    seen.add(name)
    layers.append(
      Layer(
        name, out.shape, out.dtype, module.use_bias, conv, normalize, use_scale
      )
    )
    return out

  try:
    with nn.intercept_methods(survey):
      # A fresh function: eval_shape caches traces by function, and a
      # cached trace would skip the interceptor (and find no layers).
      jax.eval_shape(lambda p, x_: apply_fn(p, x_), params, x)
  except Exception:  # noqa: BLE001 -- any failure means "not supported"
    return None
  if not ok[0] or not layers:
    return None
  covered = set()
  for layer in layers:
    if layer.normalize is None or layer.use_scale:
      is_norm = layer.normalize is not None
      covered.add(layer.name + ("/scale" if is_norm else "/kernel"))
    if layer.use_bias:
      covered.add(layer.name + "/bias")
  leaves = jax.tree_util.tree_leaves_with_path(params)
  names = {
    "/".join(str(getattr(k, "key", k)) for k in path) for path, _ in leaves
  }
  return tuple(layers) if names == covered else None


def _conv_patches(a: jax.Array, conv: dict) -> jax.Array:
  """Patches [B, *out, K*C] of a channels-last input, by strided slicing.

  `lax.conv_general_dilated_patches` is a convolution with a one-hot kernel,
  C*K times the cost of the layer itself; slicing only moves data. The
  feature order (kernel offset major) differs from the kernel's, which does
  not matter: patches are only ever contracted with per-example gradients
  built from patches.
  """
  if any(d != 1 for d in conv["lhs_dilation"]):
    return jax.lax.conv_general_dilated_patches(a, **conv)
  k, s, d = conv["filter_shape"], conv["window_strides"], conv["rhs_dilation"]
  spatial = a.shape[1:-1]
  eff = tuple((ki - 1) * di + 1 for ki, di in zip(k, d))
  pads = conv["padding"]
  if isinstance(pads, str):
    pads = jax.lax.padtype_to_pads(spatial, eff, s, pads)
  a = jnp.pad(a, [(0, 0)] + [tuple(p) for p in pads] + [(0, 0)])
  out = [(n - e) // si + 1 for n, e, si in zip(a.shape[1:-1], eff, s)]
  slices = []
  for offset in itertools.product(*(range(ki) for ki in k)):
    start = [0] + [o * di for o, di in zip(offset, d)] + [0]
    limit = (
      [a.shape[0]]
      + [st + (n - 1) * si + 1 for st, n, si in zip(start[1:], out, s)]
      + [a.shape[-1]]
    )
    slices.append(jax.lax.slice(a, start, limit, [1, *s, 1]))
  return jnp.concatenate(slices, axis=-1)


def _patches(layer: Layer, a: jax.Array) -> jax.Array:
  """Layer input as [B, P, F] so that the layer is `patches @ K'`."""
  if layer.conv is not None:
    a = _conv_patches(a, layer.conv)
  return a.reshape(a.shape[0], -1, a.shape[-1])


def _rank_one(layer: Layer, a: jax.Array) -> bool:
  return layer.conv is None and a.ndim == 2


def _xhat_BxPxC(layer: Layer, a: jax.Array) -> jax.Array:
  """A norm layer's normalised input `xhat(a)` as [B, P, C]."""
  xhat = layer.normalize.apply({}, a)
  return xhat.reshape(xhat.shape[0], -1, xhat.shape[-1])


def _per_example_stats(layer: Layer, a: jax.Array, delta: jax.Array):
  """Per-example gradient of the layer (as needed) and its squared norm."""
  acc = jnp.promote_types(delta.dtype, jnp.float32)
  a, delta = a.astype(acc), delta.astype(acc)
  d_BxPxO = delta.reshape(delta.shape[0], -1, delta.shape[-1])
  gb_BxO = jnp.sum(d_BxPxO, axis=1)
  sq_b = jnp.sum(gb_BxO**2, -1) if layer.use_bias else 0.0
  if layer.normalize is not None:
    scale = 1.0 if layer.use_scale else 0.0
    gs_BxO = scale * jnp.sum(_xhat_BxPxC(layer, a) * d_BxPxO, axis=1)
    return (gs_BxO, gb_BxO), jnp.sum(gs_BxO**2, -1) + sq_b
  if _rank_one(layer, a):
    sq_w = jnp.sum(a**2, -1) * jnp.sum(delta**2, -1)
    return (a, delta), sq_w + sq_b
  g_BxFxO = jnp.einsum("bpf,bpo->bfo", _patches(layer, a), d_BxPxO)
  return (g_BxFxO, gb_BxO), jnp.sum(g_BxFxO**2, (1, 2)) + sq_b


def _correction(layer: Layer, stats, c_B: jax.Array, a2: jax.Array):
  """`y'(a2) - y(a2)` for the layer perturbed by `c_i G_i` per example."""
  bias = 1.0 if layer.use_bias else 0.0
  if layer.normalize is not None:
    gs_BxO, gb_BxO = stats
    xhat = _xhat_BxPxC(layer, a2).astype(gs_BxO.dtype)
    y_BxPxO = xhat * gs_BxO[:, None] + bias * gb_BxO[:, None]
    y_BxPxO = c_B[:, None, None] * y_BxPxO
    return y_BxPxO.reshape(layer.out_shape).astype(layer.out_dtype)
  if _rank_one(layer, a2):
    a_BxI, d_BxO = stats
    coef_B = c_B * (jnp.sum(a2.astype(a_BxI.dtype) * a_BxI, -1) + bias)
    return (coef_B[:, None] * d_BxO).astype(layer.out_dtype)
  g_BxFxO, gb_BxO = stats
  p_BxPxF = _patches(layer, a2).astype(g_BxFxO.dtype)
  y_BxPxO = (
    jnp.einsum("bpf,bfo->bpo", p_BxPxF, g_BxFxO) + bias * gb_BxO[:, None]
  )
  y_BxPxO = c_B[:, None, None] * y_BxPxO
  return y_BxPxO.reshape(layer.out_shape).astype(layer.out_dtype)


def _intercepting(layers: tuple, on_call):
  """An interceptor calling `on_call(layer, a, y)` for planned layers."""
  by_name = {layer.name: layer for layer in layers}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    layer = by_name.get("/".join(context.module.path))
    if context.method_name != "__call__" or layer is None:
      return out
    return on_call(layer, args[0], out)

  return nn.intercept_methods(interceptor)


def sam_gradient(
  obj: Objective,
  params: Params,
  batch: Batch,
  rho: Any,
  variant: str,
  layers: tuple,
) -> tuple[jax.Array, Any]:
  """1-SAM gradient (any variant) through layer interception.

  Equals `sam.sam_gradient(..., group_size=1, fast=False)`; see the module
  docstring. `layers` comes from `plan`.
  """
  from sam_jax.sam import safe_inverse, select_variant  # noqa: PLC0415

  x, y = batch
  probes = {
    layer.name: jnp.zeros(layer.out_shape, layer.out_dtype) for layer in layers
  }

  def clean_apply(p, probes):
    inputs = {}

    def record(layer, a, out):
      inputs[layer.name] = a
      return out + probes[layer.name]

    with _intercepting(layers, record):
      z = obj.apply_fn(p, x)
    return z, inputs

  z, vjp_clean, inputs = jax.vjp(clean_apply, params, probes, has_aux=True)
  loss, r = obj.residual(z, y)
  _, deltas = vjp_clean(r)
  stats, sq_B = {}, 0.0
  for layer in layers:
    stats[layer.name], sq = _per_example_stats(
      layer, inputs[layer.name], deltas[layer.name]
    )
    sq_B = sq_B + sq
  stats = jax.lax.stop_gradient(stats)
  c_B = jax.lax.stop_gradient(rho * safe_inverse(jnp.sqrt(sq_B)))

  def perturbed_apply(p):
    def perturb(layer, a, out):
      return out + _correction(layer, stats[layer.name], c_B, a)

    with _intercepting(layers, perturb):
      return obj.apply_fn(p, x)

  z_pert, vjp_pert = jax.vjp(perturbed_apply, params)
  grads = select_variant(
    variant,
    (r, lambda u: vjp_clean(u)[0]),
    (z_pert, lambda u: vjp_pert(u)[0]),
    lambda z_: obj.residual(z_, y)[1],
  )
  return loss, grads
