"""Fast 1-SAM and m-SAM: group perturbations injected into the layers.

1-SAM needs, for every example i, the gradient at its own point
`w + eps_i`, `eps_i = rho g_i / ||g_i||` (PAPERS.md A1); m-SAM the same
with one `eps_g` per group of m examples. A `vmap` over groups runs B/m
separate backward passes. For a linear layer `y = a W + b` the gradient of
a group is `G_g = sum_{i in g} sum_p a_ip (x) delta_ip` (p over positions:
one for Dense on [B, D], the output positions of a convolution), so the
perturbed layer for example j of group g is

  y'_j = a'_j (W + c_g G_g) + b + c_g gb_g,    c_g = rho / ||g_g||,

built from the clean pass's inputs `a_i` and output cotangents `delta_i`
in one of three forms (`_form`, chosen by cost):

- factors: `G_g` has rank m P (P output positions; patches, strided
  slices of the input, for a convolution); when `m P (F + O) <= F O` the
  layer is the clean one plus `c_g sum_r (a'_jp . a_r) delta_r`, from
  Gram matrices, never forming `G_g`;
- kernels (a convolution with at most `MAX_KERNEL_GROUPS` groups): one
  `lax.conv` per group with the kernel `W + c_g G_g`;
- matrix: `patches(a'_j) @ (W + c_g G_g)`, one batched matmul.

The last two cost one layer, not a layer plus a correction. Gradients
w.r.t. `W` of the perturbed pass are exactly those at `W + eps_g` because
`c_g G_g` is held constant.

Per-example normalisations (LayerNorm, GroupNorm, features on the last
axis; BatchNorm with its running averages, i.e. in evaluation mode) are
covered the same way: `y = xhat(a) s + b` with the parameter-free `xhat`
recomputed from the layer's input, per-example gradients
`gs_i = sum_p xhat_ip * delta_ip`, `gb_i = sum_p delta_ip` and the
correction `c_g (xhat(a'_j) gs_g + gb_g)`.

The layers are found by interception, without changing the model: flax
linen modules through `flax.linen.intercept_methods`, flax NNX modules by
wrapping the `__call__` of the NNX layer classes while a pass runs. Which
parameter belongs to which layer is decided by identity: every leaf of
`params` must be the weight of exactly one intercepted call, so the same
check serves a linen params dict, a full linen variables dict, an NNX
`nnx.Param` state and a hand-written pytree. `plan` says *why* it declines
(`Plan.reason`): an uncovered parameter, a shared layer, a grouped
convolution, ...; and which layer mixes examples (`Plan.mixes`: BatchNorm
with batch statistics), for which no per-example or per-group SAM exists.

Not detected: a weight that a covered layer owns but that the model also
reads elsewhere (tied embeddings); such models need `fast=False`.
"""

import contextlib
import itertools
import math
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from sam_jax.objective import Batch, Objective, Params


class Layer(NamedTuple):
  """A layer the fast path knows: its geometry and how to recompute it."""

  name: str  # for messages: the path of its weights
  out_shape: tuple[int, ...]
  out_dtype: Any
  use_bias: bool
  conv: Optional[dict]  # None for Dense, else patch arguments
  norm: bool = False  # `y = xhat(a) s + b`, xhat recomputed in each pass
  use_scale: bool = False


class Plan(NamedTuple):
  """What the fast path would do for one model, params and batch shape.

  Attributes:
    layers: the intercepted layers in call order (empty if declined).
    reason: why the fast path does not apply, None if it does.
    mixes: the name of a layer that mixes the examples of a batch
      (BatchNorm with batch statistics), or None. With such a layer no
      group smaller than the batch has a gradient of its own.
  """

  layers: tuple[Layer, ...]
  reason: Optional[str]
  mixes: Optional[str]

  @property
  def applies(self) -> bool:
    return self.reason is None


KNOWN = (
  "nn.Dense, nn.Conv, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm (running "
  "averages); nnx.Linear, nnx.Conv, nnx.LayerNorm, nnx.GroupNorm, "
  "nnx.BatchNorm (running averages)"
)


def _as_tuple(v: Any, nd: int) -> tuple:
  if v is None:
    return (1,) * nd
  return (v,) * nd if isinstance(v, int) else tuple(v)


def _conv_args(module: Any, ndim: int) -> tuple[Optional[dict], str]:
  """Arguments of `conv_general_dilated_patches` for a linen or NNX Conv,
  or `(None, why not)`."""
  nd = ndim - 2
  if nd < 1:
    return None, "input without a batch axis"
  if module.feature_group_count != 1:
    return None, "grouped convolution"
  if getattr(module, "mask", None) is not None:
    return None, "masked kernel"
  padding = module.padding
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):
      return None, f"padding {padding!r}"
  elif isinstance(padding, int):
    padding = ((padding, padding),) * nd
  else:
    padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  spatial = "WHD"[:nd][::-1]
  lhs = "N" + spatial + "C"
  return dict(
    filter_shape=_as_tuple(module.kernel_size, nd),
    window_strides=_as_tuple(module.strides, nd),
    padding=padding,
    lhs_dilation=_as_tuple(module.input_dilation, nd),
    rhs_dilation=_as_tuple(module.kernel_dilation, nd),
    dimension_numbers=(lhs, spatial + "IO", lhs),
  ), ""


def _norm_xhat(module: Any, ndim: int) -> tuple[Optional[Callable], str]:
  """`xhat` of a LayerNorm/GroupNorm (linen or NNX) that normalises each
  example alone with per-channel (last axis) scale and bias."""
  if module.axis_name is not None:
    return None, "statistics across devices (axis_name)"
  reduced = module.reduction_axes
  common = dict(
    epsilon=module.epsilon,
    dtype=module.dtype,
    use_bias=False,
    use_scale=False,
    use_fast_variance=module.use_fast_variance,
  )
  if isinstance(module, (nn.LayerNorm, nnx.LayerNorm)):
    reduced = {a % ndim for a in _as_tuple(reduced, 1)}
    features = {a % ndim for a in _as_tuple(module.feature_axes, 1)}
    if 0 in reduced or features != {ndim - 1}:
      return None, "normalises over the batch axis or not over channels last"
    bare = nn.LayerNorm(
      reduction_axes=module.reduction_axes,
      feature_axes=module.feature_axes,
      **common,
    )
  else:  # GroupNorm: the default reduction is per example
    if reduced is not None or getattr(module, "feature_axis", -1) != -1:
      return None, "custom reduction axes"
    bare = nn.GroupNorm(num_groups=module.num_groups, group_size=None, **common)
  return lambda a: bare.apply({}, a), ""


def _batch_norm_xhat(module: Any, ndim: int, mean: Any, var: Any):
  """`xhat` of a BatchNorm that uses its running averages."""
  axis = _as_tuple(module.axis, 1)
  if [a % ndim for a in axis] != [ndim - 1]:
    return None, "features not on the last axis"
  mean, var = jax.lax.stop_gradient((mean, var))

  def xhat(a):
    dtype = module.dtype or jnp.result_type(a, mean)
    a = a.astype(dtype)
    return (a - mean.astype(dtype)) * jax.lax.rsqrt(
      var.astype(dtype) + module.epsilon
    )

  return xhat, ""


class _Call(NamedTuple):
  """One intercepted call, as `describe` sees it."""

  kind: str  # "dense", "conv", "norm" or "unsupported"
  weights: dict  # role -> array, the weights it reads
  use_bias: bool
  conv: Optional[dict] = None
  normalize: Optional[Callable] = None
  use_scale: bool = False
  why: str = ""  # for "unsupported": why not
  mixes: bool = False


def _running_average(module: Any, args: tuple, kwargs: dict) -> bool:
  flag = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
  return bool(module.use_running_average if flag is None else flag)


def _describe(module: Any, args: tuple, kwargs: dict) -> Optional[_Call]:
  """What a call of a known layer class does; None for other modules."""
  a = args[0]
  kind = type(module)
  if kind in (nn.Dense, nn.Conv, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm):
    params = module.variables.get("params", {})
    weights = {k: params[k] for k in ("kernel", "scale", "bias") if k in params}
  elif kind in (nnx.Linear, nnx.Conv, nnx.LayerNorm, nnx.GroupNorm):
    weights = {
      k: getattr(module, k)[...]
      for k in ("kernel", "scale", "bias")
      if getattr(module, k, None) is not None
    }
  elif kind is nnx.BatchNorm:
    weights = {
      k: getattr(module, k)[...]
      for k in ("scale", "bias")
      if getattr(module, k, None) is not None
    }
  else:
    return None
  use_bias = "bias" in weights
  if kind in (nn.Dense, nnx.Linear):
    return _Call("dense", weights, use_bias)
  if kind in (nn.Conv, nnx.Conv):
    conv, why = _conv_args(module, a.ndim)
    if conv is None:
      return _Call("unsupported", weights, use_bias, why=why)
    return _Call("conv", weights, use_bias, conv=conv)
  if kind in (nn.BatchNorm, nnx.BatchNorm):
    if not _running_average(module, args, kwargs):
      return _Call(
        "unsupported", weights, use_bias, why="batch statistics", mixes=True
      )
    if kind is nn.BatchNorm:
      stats = module.variables["batch_stats"]
      mean, var = stats["mean"], stats["var"]
    else:
      mean, var = module.mean[...], module.var[...]
    xhat, why = _batch_norm_xhat(module, a.ndim, mean, var)
  else:
    xhat, why = _norm_xhat(module, a.ndim)
  if xhat is None:
    return _Call("unsupported", weights, use_bias, why=why)
  return _Call(
    "norm", weights, use_bias, normalize=xhat, use_scale="scale" in weights
  )


_NNX_CLASSES = (
  nnx.Linear,
  nnx.Conv,
  nnx.LayerNorm,
  nnx.GroupNorm,
  nnx.BatchNorm,
)


_PAUSED = [0]  # > 0 while the fast path runs layers of its own


@contextlib.contextmanager
def _paused():
  _PAUSED[0] += 1
  try:
    yield
  finally:
    _PAUSED[0] -= 1


@contextlib.contextmanager
def _intercept(on_call: Callable):
  """Calls `on_call(module, args, kwargs, run)` for each call of a linen or
  NNX layer class (`run()` computes the original output)."""

  def linen_interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__" or _PAUSED[0]:
      return next_fun(*args, **kwargs)
    run = lambda: next_fun(*args, **kwargs)
    return on_call(context.module, args, kwargs, run)

  originals = {cls: cls.__dict__["__call__"] for cls in _NNX_CLASSES}

  def wrap(cls, original):
    def __call__(self, *args, **kwargs):
      run = lambda: original(self, *args, **kwargs)
      if type(self) is not cls or _PAUSED[0]:  # a subclass calling super()
        return run()
      return on_call(self, args, kwargs, run)

    return __call__

  try:
    for cls, original in originals.items():
      cls.__call__ = wrap(cls, original)
    with nn.intercept_methods(linen_interceptor):
      yield
  finally:
    for cls, original in originals.items():
      cls.__call__ = original


def _path_name(path: tuple) -> str:
  """'a/b/c' of a key path (an NNX Variable's trailing '.value' dropped)."""
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey):
    path = path[:-1]
  keys = (getattr(k, "key", getattr(k, "idx", k)) for k in path)
  return "/".join(str(k) for k in keys) or "<the params array>"


def plan(apply_fn: Any, params: Params, x: Any) -> Plan:
  """The layers of `apply_fn` and whether the fast path covers `params`.

  Runs `apply_fn(params, x)` abstractly (`jax.eval_shape`) under
  interception. Exceptions of `apply_fn` itself propagate.
  """
  found: dict = {}

  def survey(p, x_):
    leaves = jax.tree_util.tree_leaves_with_path(p)
    owner = {id(leaf): _path_name(path) for path, leaf in leaves}
    claimed: dict = {}
    layers, reason, mixes = [], None, None
    batch = jax.tree.leaves(x_)[0].shape[0]

    def on_call(module, args, kwargs, run):
      nonlocal reason, mixes
      out = run()
      call = _describe(module, args, kwargs)
      if call is None:
        return out
      names = [owner.get(id(w)) for w in call.weights.values()]
      name = next((n.rsplit("/", 1)[0] for n in names if n), None)
      name = name or type(module).__name__
      label = f"layer '{name}' ({type(module).__module__.split('.')[1]}."
      label += f"{type(module).__name__})"
      if call.mixes:
        mixes = mixes or f"{label} uses {call.why}"
      why = call.why
      if not why and None in names:
        why = "reads weights that are not in params"
      if not why and any(n in claimed for n in names):
        why = "is called more than once (shared weights)"
      a = args[0]
      if not why and not (a.ndim >= 2 and a.shape[0] == out.shape[0] == batch):
        why = "input or output without the batch axis first"
      if why:
        reason = reason or f"{label}: {why}"
      for n in names:
        claimed[n] = name
      layers.append(
        Layer(
          name,
          out.shape,
          out.dtype,
          call.use_bias,
          call.conv,
          call.kind == "norm",
          call.use_scale,
        )
      )
      return out

    with _intercept(on_call):
      out = apply_fn(p, x_)
    if reason is None:
      uncovered = [n for n in owner.values() if n not in claimed]
      if uncovered:
        reason = (
          f"parameter '{uncovered[0]}' is not the weight of a layer the "
          f"fast path covers ({KNOWN})"
        )
      elif not layers:
        reason = f"no layer the fast path covers was called ({KNOWN})"
    found["plan"] = Plan(tuple(layers) if reason is None else (), reason, mixes)
    return out

  # A fresh function: eval_shape caches traces by function, and a cached
  # trace would skip the interceptor (and find no layers).
  jax.eval_shape(lambda p, x_: survey(p, x_), params, x)
  return found["plan"]


def _conv_patches(a: jax.Array, conv: dict) -> jax.Array:
  """Patches [B, *out, K*C] of a channels-last input, by strided slicing.

  `lax.conv_general_dilated_patches` is a convolution with a one-hot kernel,
  C*K times the cost of the layer itself; slicing only moves data. The
  feature order (kernel offset major) differs from the kernel's, which does
  not matter: patches are only ever contracted with gradients built from
  patches.
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


def _xhat(call: _Call, a: jax.Array) -> jax.Array:
  """A norm layer's normalised input `xhat(a)`."""
  with _paused():
    return call.normalize(a)


def _low_rank(layer: Layer, a: jax.Array, m: int) -> bool:
  """Dense or convolution: keep the group gradient as its `m * P`
  rank-one factors (patch (x) cotangent, P output positions) when that is
  cheaper than the [F, O] matrix: `m P (F + O) <= F O`."""
  if layer.norm:
    return False
  positions = math.prod(layer.out_shape[1:-1])
  features = a.shape[-1]
  if layer.conv is not None:
    features *= math.prod(layer.conv["filter_shape"])
  elif a.ndim != 2:
    return False
  out = layer.out_shape[-1]
  return m * positions * (features + out) <= features * out


def _groups(t: jax.Array, m: int) -> jax.Array:
  """[B, ...] -> [B/m, m, ...]."""
  return t.reshape((t.shape[0] // m, m) + t.shape[1:])


def _group_stats(layer: Layer, a: jax.Array, delta: jax.Array, m: int):
  """Group gradient of the layer (in the form `_perturbed` uses) and its
  squared norm per group [G]. For a norm layer `a` is `xhat(a)`."""
  acc = jnp.promote_types(delta.dtype, jnp.float32)
  a, delta = a.astype(acc), delta.astype(acc)
  d_BxPxO = delta.reshape(delta.shape[0], -1, delta.shape[-1])
  gb_GxO = jnp.sum(_groups(d_BxPxO, m), axis=(1, 2))
  sq_b = jnp.sum(gb_GxO**2, -1) if layer.use_bias else 0.0
  if layer.norm:
    scale = 1.0 if layer.use_scale else 0.0
    xhat_BxPxC = a.reshape(a.shape[0], -1, a.shape[-1])
    gs_BxO = scale * jnp.sum(xhat_BxPxC * d_BxPxO, axis=1)
    gs_GxO = jnp.sum(_groups(gs_BxO, m), axis=1)
    return (gs_GxO, gb_GxO), jnp.sum(gs_GxO**2, -1) + sq_b
  p_BxPxF = _patches(layer, a)
  num_groups = a.shape[0] // m
  p_GxMPxF = p_BxPxF.reshape(num_groups, -1, p_BxPxF.shape[-1])
  d_GxMPxO = d_BxPxO.reshape(num_groups, -1, d_BxPxO.shape[-1])
  if _low_rank(layer, a, m):  # ||sum_r p_r (x) d_r||^2 from the Gram matrices
    gram_p = jnp.einsum("gpf,gqf->gpq", p_GxMPxF, p_GxMPxF)
    gram_d = jnp.einsum("gpo,gqo->gpq", d_GxMPxO, d_GxMPxO)
    sq_G = jnp.sum(gram_p * gram_d, (1, 2))
    return (p_GxMPxF, d_GxMPxO, gb_GxO), sq_G + sq_b
  g_GxFxO = jnp.einsum("gpf,gpo->gfo", p_GxMPxF, d_GxMPxO)
  return (g_GxFxO, gb_GxO), jnp.sum(g_GxFxO**2, (1, 2)) + sq_b


MAX_KERNEL_GROUPS = 16


def _form(layer: Layer, stats, num_groups: int) -> str:
  """How the perturbed pass computes a layer (see `_perturbed`)."""
  if layer.norm:
    return "norm"
  if len(stats) == 3:
    return "factors"
  if (
    layer.conv is not None
    and num_groups <= MAX_KERNEL_GROUPS
    and all(d == 1 for d in layer.conv["lhs_dilation"])
  ):
    return "kernels"
  return "matrix"


def _flat_kernel(layer: Layer, kernel: jax.Array) -> jax.Array:
  """The kernel as the [F, O] matrix that `_patches` multiplies: window
  offsets major, then channels (`_conv_patches`); channels major for
  `conv_general_dilated_patches` (input dilation)."""
  if layer.conv is not None and any(d != 1 for d in layer.conv["lhs_dilation"]):
    kernel = jnp.moveaxis(kernel, -2, 0)
  return kernel.reshape(-1, kernel.shape[-1])


def _bias_B(layer: Layer, call, gb_GxO, c_G, m: int, perturbed_only: bool):
  """`[B, O]`: `c_g gb_g`, plus the layer's bias unless `perturbed_only`;
  zeros for a layer without bias."""
  if not layer.use_bias:
    return jnp.zeros((c_G.shape[0] * m, gb_GxO.shape[-1]), gb_GxO.dtype)
  b_GxO = c_G[:, None] * gb_GxO
  if not perturbed_only:
    b_GxO = b_GxO + call.weights["bias"]
  return jnp.repeat(b_GxO, m, axis=0)


def _perturbed(layer: Layer, call, stats, c_G, a2, out, m: int):
  """The layer's output `y'(a2)` with the weights of group g at
  `W + c_g G_g`, from its clean output `out = y(a2)` at `W`:

  - "norm", "factors": `out` plus a correction built from the clean
    pass's factors (for factors `sum_s (p2_r . p_s) d_s`, rank m P);
  - "kernels" (a convolution, few groups): one `lax.conv` per group with
    its perturbed kernel, the cost of the layer (`out` unused);
  - "matrix": `patches(a2) @ (W + c_g G_g)` per group, one batched matmul
    (`out` unused).
  """
  num_groups = c_G.shape[0]
  expand = lambda t: jnp.repeat(t, m, axis=0)  # [G, ...] -> [B, ...]
  form = _form(layer, stats, num_groups)
  dtype = layer.out_dtype
  if form == "norm":
    gs_GxO, gb_GxO = stats
    xhat = _xhat(call, a2).astype(gs_GxO.dtype)
    xhat = xhat.reshape(xhat.shape[0], -1, xhat.shape[-1])
    y_BxPxO = xhat * expand(gs_GxO)[:, None]
    y_BxPxO = expand(c_G)[:, None, None] * y_BxPxO
    y_BxPxO = y_BxPxO + _bias_B(layer, call, gb_GxO, c_G, m, True)[:, None]
    return out + y_BxPxO.reshape(layer.out_shape).astype(dtype)
  if form == "kernels":
    g_GxFxO, gb_GxO = stats
    kernel, conv = call.weights["kernel"], layer.conv
    outs = []
    for g in range(num_groups):
      k_g = kernel + (c_G[g] * g_GxFxO[g]).reshape(kernel.shape)
      outs.append(
        jax.lax.conv_general_dilated(
          a2[g * m : (g + 1) * m].astype(dtype),
          k_g.astype(dtype),
          conv["window_strides"],
          conv["padding"],
          rhs_dilation=conv["rhs_dilation"],
          dimension_numbers=conv["dimension_numbers"],
        )
      )
    y = jnp.concatenate(outs, axis=0)
    b_BxO = _bias_B(layer, call, gb_GxO, c_G, m, False)
    y = y + b_BxO.reshape((y.shape[0],) + (1,) * (y.ndim - 2) + (-1,))
    return y.astype(dtype)
  p_BxPxF = _patches(layer, a2)
  p_GxMPxF = p_BxPxF.reshape(num_groups, -1, p_BxPxF.shape[-1])
  if form == "factors":
    p1_GxMPxF, d_GxMPxO, gb_GxO = stats
    p_GxMPxF = p_GxMPxF.astype(p1_GxMPxF.dtype)
    coef_GxMPxMP = jnp.einsum("gpf,gqf->gpq", p_GxMPxF, p1_GxMPxF)
    y_GxMPxO = jnp.einsum("gpq,gqo->gpo", coef_GxMPxMP, d_GxMPxO)
    y_GxMPxO = c_G[:, None, None] * y_GxMPxO
  else:  # matrix
    g_GxFxO, gb_GxO = stats
    kernel = _flat_kernel(layer, call.weights["kernel"])
    k_GxFxO = (kernel + c_G[:, None, None] * g_GxFxO).astype(dtype)
    y_GxMPxO = jnp.einsum("gpf,gfo->gpo", p_GxMPxF.astype(dtype), k_GxFxO)
  y_BxPxO = y_GxMPxO.reshape(p_BxPxF.shape[:2] + (y_GxMPxO.shape[-1],))
  b_BxO = _bias_B(layer, call, gb_GxO, c_G, m, form == "factors")
  y_BxPxO = y_BxPxO + b_BxO[:, None]
  y = y_BxPxO.reshape(layer.out_shape).astype(dtype)
  return out + y if form == "factors" else y


@contextlib.contextmanager
def _on_layers(layers: tuple, fn: Callable):
  """Intercepts the planned layers, in call order:
  `fn(i, layer, call, a, out)` with `call` this pass's `_describe`."""
  index = [0]

  def on_call(module, args, kwargs, run):
    out = run()
    call = _describe(module, args, kwargs)
    if call is None:
      return out
    i = index[0]
    index[0] += 1
    if i >= len(layers) or layers[i].out_shape != out.shape:
      raise RuntimeError(
        "sam_jax.per_example: the model called its layers differently "
        "from the planned pass; pass fast=False"
      )
    return fn(i, layers[i], call, args[0], out)

  with _intercept(on_call):
    yield


def sam_gradient(
  obj: Objective,
  params: Params,
  batch: Batch,
  rho: Any,
  variant: str,
  layers: tuple,
  group_size: int = 1,
  has_aux: bool = False,
) -> tuple[Any, Any]:
  """m-SAM gradient (any variant; 1-SAM for group_size 1) by interception.

  Equals `sam.sam_gradient(..., group_size=group_size, fast=False)`; see
  the module docstring. `layers` comes from `plan`. Returns `(loss, grads)`,
  `((loss, aux), grads)` with `has_aux` (aux of the clean pass).
  """
  from sam_jax.sam import safe_inverse, select_variant  # noqa: PLC0415

  x, y = batch
  m = group_size
  probes = [jnp.zeros(layer.out_shape, layer.out_dtype) for layer in layers]

  def clean_apply(p, probes):
    inputs = [None] * len(layers)

    def record(i, layer, call, a, out):
      inputs[i] = _xhat(call, a) if layer.norm else a
      return out + probes[i]

    with _on_layers(layers, record):
      z, aux = obj.apply_and_aux(p, x)
    return z, (inputs, aux)

  z, vjp_clean, (inputs, aux) = jax.vjp(
    clean_apply, params, probes, has_aux=True
  )
  loss, r = obj.residual(z, y)
  _, deltas = vjp_clean(r)
  stats, sq_G = [], 0.0
  for layer, a, delta in zip(layers, inputs, deltas):
    s, sq = _group_stats(layer, a, delta, m)
    stats.append(s)
    sq_G = sq_G + sq
  stats = jax.lax.stop_gradient(stats)
  c_G = jax.lax.stop_gradient(rho * safe_inverse(jnp.sqrt(sq_G)))

  def perturbed_apply(p):
    def perturb(i, layer, call, a, out):
      return _perturbed(layer, call, stats[i], c_G, a, out, m)

    with _on_layers(layers, perturb):
      return obj.apply_fn(p, x)

  z_pert, vjp_pert = jax.vjp(perturbed_apply, params)
  grads = select_variant(
    variant,
    (r, lambda u: vjp_clean(u)[0]),
    (z_pert, lambda u: vjp_pert(u)[0]),
    lambda z_: obj.residual(z_, y)[1],
  )
  return ((loss, aux) if has_aux else loss), grads
