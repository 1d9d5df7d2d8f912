"""The group (1-SAM, m-SAM) fast path in the idioms researchers write.

Every case compares the fast path (`fast=True`, which raises if it does not
apply) with the general path (`fast=False`: one backward pass per group,
`jax.vmap`), itself checked against a dense reference in sam_test.py, in
float64 to 1e-10: linen with the params dict and with the full variables
dict (BatchNorm running averages, a constants collection), flax NNX
(`Objective.from_nnx`), and m-SAM. Then what is loud: the fall-back
warning, `fast=True`, `sj.fast_path`'s reasons, BatchNorm with batch
statistics, bad batches.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import sam_jax as sj

B, K = 8, 3
RHO = 0.2


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


class LinenNet(nn.Module):
  """Conv -> [BatchNorm (running averages)] -> LayerNorm -> GroupNorm ->
  Dense -> Dense, and a fixed projection in a 'constants' collection."""

  batch_norm: bool = False

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3,), padding="SAME")(x))
    if self.batch_norm:
      h = nn.BatchNorm(use_running_average=True)(h)
    h = nn.GroupNorm(num_groups=2)(nn.LayerNorm()(h))
    proj = self.variable(
      "constants", "proj", lambda: jnp.linspace(-1.0, 1.0, 4 * 5)
    )
    h = h.reshape(h.shape[0], -1) * proj.value
    return nn.Dense(K)(jnp.tanh(nn.Dense(6)(h)))


class NnxNet(nnx.Module):
  def __init__(self, rngs, dropout=0.0, batch_norm=False):
    f64 = dict(param_dtype=jnp.float64, rngs=rngs)
    self.conv = nnx.Conv(2, 4, kernel_size=3, padding="SAME", **f64)
    self.bn = nnx.BatchNorm(4, **f64) if batch_norm else None
    self.ln = nnx.LayerNorm(4, **f64)
    self.gn = nnx.GroupNorm(4, num_groups=2, **f64)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.l1 = nnx.Linear(20, 6, **f64)
    self.l2 = nnx.Linear(6, K, **f64)

  def __call__(self, x):
    h = nnx.relu(self.conv(x))
    if self.bn is not None:
      h = self.bn(h)
    h = self.gn(self.ln(h))
    h = self.dropout(h.reshape(h.shape[0], -1))
    return self.l2(jnp.tanh(self.l1(h)))


def batch():
  x = jax.random.normal(jax.random.key(0), (B, 5, 2), jnp.float64)
  return x, jnp.arange(B) % K


def to64(tree):
  return jax.tree.map(lambda a: a.astype(jnp.float64), tree)


def linen_problem(batch_norm=False):
  model = LinenNet(batch_norm)
  variables = to64(model.init(jax.random.key(1), batch()[0]))
  if batch_norm:  # running averages away from (0, 1), so that they matter
    stats = variables["batch_stats"]
    variables["batch_stats"] = jax.tree.map(lambda a: a + 0.3, stats)
  return model, variables


def rel_err(a, b):
  fa, fb = ravel_pytree(a)[0], ravel_pytree(b)[0]
  return float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fb))


def both_paths(obj, params, group_size, variant):
  run = lambda fast: sj.sam_gradient(
    obj,
    params,
    batch(),
    RHO,
    variant=variant,
    group_size=group_size,
    fast=fast,
  )
  (loss_f, g_f), (loss_g, g_g) = run(True), run(False)
  assert abs(float(loss_f - loss_g)) < 1e-12
  return g_f, g_g


@pytest.mark.parametrize("group_size", [1, 2])
@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "bn-eval"])
def test_linen_full_variables_dict(group_size, batch_norm):
  """`Objective(model.apply, loss)` with `model.init`'s whole dict: the
  fast path applies; only 'params' is perturbed and differentiated."""
  model, variables = linen_problem(batch_norm)
  obj = sj.Objective(model.apply, sj.softmax_cross_entropy)
  assert set(variables) == (
    {"params", "constants", "batch_stats"}
    if batch_norm
    else {"params", "constants"}
  )
  assert sj.fast_path(obj, variables, batch(), group_size=group_size)
  for variant in sj.VARIANTS:
    fast, general = both_paths(obj, variables, group_size, variant)
    assert rel_err(fast, general) < 1e-10
    for name in set(variables) - {"params"}:
      zeros = jax.tree.leaves(jax.tree.map(jnp.any, fast[name]))
      assert not any(zeros), name  # state: zero gradient
  # The params-only idiom gives the same gradient of the params.
  p_obj = sj.Objective(
    lambda p, x: model.apply({**variables, "params": p}, x),
    sj.softmax_cross_entropy,
  )
  run = lambda o, p: sj.sam_gradient(
    o, p, batch(), RHO, group_size=group_size, fast=True
  )[1]
  fast = run(obj, variables)
  assert rel_err(run(p_obj, variables["params"]), fast["params"]) < 1e-12
  # The SAM gradient differs from the clean one (the test can fail).
  clean = jax.grad(obj.loss)(variables, batch())["params"]
  assert rel_err(fast["params"], clean) > 1e-3


@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_m_sam_fast_path_matches_general(group_size):
  model, variables = linen_problem()
  obj = sj.Objective(model.apply, sj.softmax_cross_entropy)
  for variant in sj.VARIANTS:
    fast, general = both_paths(obj, variables, group_size, variant)
    assert rel_err(fast, general) < 1e-10


def test_m_sam_dense_low_rank_and_dense_forms_agree():
  """Dense group gradients as m rank-one factors (small m) or as the
  matrix (large m): both forms against the general path."""
  mlp = nn.Sequential([nn.Dense(3), nn.tanh, nn.Dense(K)])
  x = jax.random.normal(jax.random.key(2), (B, 40), jnp.float64)
  y = jnp.arange(B) % K
  params = to64(mlp.init(jax.random.key(3), x))
  obj = sj.Objective(mlp.apply, sj.softmax_cross_entropy)
  for m in (1, 2, 4):  # 40 -> 3: m * 43 > 120 from m = 4 (matrix form)
    run = lambda fast, m=m: sj.sam_gradient(
      obj, params, (x, y), RHO, group_size=m, fast=fast
    )[1]
    assert rel_err(run(True), run(False)) < 1e-10


class ConvNet(nn.Module):
  conv: nn.Conv

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(self.conv(x))
    return nn.Dense(K)(h.reshape(h.shape[0], -1))


# name -> (conv, example shape, batch size, group size, form the conv takes)
CONV_FORMS = {
  "factors, stride 2": (nn.Conv(16, (3,), strides=2), (4, 8), 8, 2, "factors"),
  "matrix, many groups": (nn.Conv(4, (3,)), (6, 1), 40, 1, "matrix"),
  "kernels, 2-D dilated": (
    nn.Conv(3, (2, 2), kernel_dilation=2, padding=((1, 0), (0, 1))),
    (5, 5, 2),
    8,
    2,
    "kernels",
  ),
  "matrix, input dilation": (
    nn.Conv(3, (3,), input_dilation=2, padding=((1, 1),)),
    (5, 2),
    8,
    2,
    "matrix",
  ),
}


@pytest.mark.parametrize("case", CONV_FORMS)
def test_conv_group_gradient_forms(case, monkeypatch):
  """A convolution's perturbed pass from the group gradient's `m P`
  rank-one factors, from the [F, O] matrix (patches times the perturbed
  kernel of each group), or with one `lax.conv` per group (few groups):
  each form against the general path, and the form taken is the one the
  rules pick."""
  from sam_jax import per_example  # noqa: PLC0415

  conv, shape, b, m, want = CONV_FORMS[case]
  x = jax.random.normal(jax.random.key(4), (b, *shape), jnp.float64)
  y = jnp.arange(b) % K
  model = ConvNet(conv)
  params = to64(model.init(jax.random.key(5), x))
  obj = sj.Objective(model.apply, sj.softmax_cross_entropy)
  forms = []
  form = per_example._form

  def spy(layer, stats, num_groups):
    forms.append((form(layer, stats, num_groups), layer))
    return forms[-1][0]

  monkeypatch.setattr(per_example, "_form", spy)
  for variant in sj.VARIANTS:
    run = lambda fast, variant=variant: sj.sam_gradient(
      obj, params, (x, y), RHO, variant=variant, group_size=m, fast=fast
    )
    (loss_f, fast), (loss_g, general) = run(True), run(False)
    assert abs(float(loss_f - loss_g)) < 1e-12
    assert rel_err(fast, general) < 1e-10
  conv_forms = {f for f, layer in forms if layer.conv is not None}
  assert conv_forms == {want}, forms


@pytest.mark.parametrize("group_size", [1, 2])
def test_layers_without_bias_or_scale(group_size):
  """Norms and convolutions built without bias (or scale) in every form."""
  net = nn.Sequential(
    [
      nn.Conv(4, (3,), use_bias=False),
      nn.LayerNorm(use_bias=False),
      nn.GroupNorm(num_groups=2, use_scale=False, use_bias=False),
      lambda h: h.reshape(h.shape[0], -1),
      nn.Dense(K, use_bias=False),
    ]
  )
  x, y = batch()
  params = to64(net.init(jax.random.key(6), x))
  obj = sj.Objective(net.apply, sj.softmax_cross_entropy)
  for variant in sj.VARIANTS:
    run = lambda fast, variant=variant: sj.sam_gradient(
      obj,
      params,
      (x, y),
      RHO,
      variant=variant,
      group_size=group_size,
      fast=fast,
    )[1]
    assert rel_err(run(True), run(False)) < 1e-10


@pytest.mark.parametrize("group_size", [1, 2])
def test_nnx_from_nnx_matches_general_path(group_size):
  model = NnxNet(nnx.Rngs(0))
  obj = sj.Objective.from_nnx(model, sj.softmax_cross_entropy)
  params = nnx.state(model, nnx.Param)
  assert sj.fast_path(obj, params, batch(), group_size=group_size)
  for variant in sj.VARIANTS:
    fast, general = both_paths(obj, params, group_size, variant)
    assert rel_err(fast, general) < 1e-10
  # The same numbers as the linen-style reference: jax.grad through the
  # objective is the model's gradient.
  grads = jax.grad(obj.loss)(params, batch())
  want = nnx.grad(
    lambda m: jnp.mean(sj.softmax_cross_entropy(m(batch()[0]), batch()[1]))
  )(model)
  assert rel_err(grads, nnx.state(want, nnx.Param)) < 1e-12


def test_nnx_dropout_and_batch_norm_in_nnx_jit_with_optimizer():
  """Dropout: one fork of the RNG streams per objective (same masks in the
  clean and perturbed passes, new masks next step); BatchNorm: n-SAM with
  has_aux returns the new running averages; 1-SAM is refused."""
  x, y = batch()
  model = NnxNet(nnx.Rngs(0, dropout=1), dropout=0.5, batch_norm=True)
  opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    obj = sj.Objective.from_nnx(model, sj.softmax_cross_entropy)
    params = nnx.state(model, nnx.Param)
    (loss, aux), grads = sj.sam_gradient(obj, params, (x, y), RHO, has_aux=True)
    nnx.update(model, aux)
    opt.update(model, grads)
    # The same objective twice: the same dropout masks.
    again = obj.loss(params, (x, y))
    return loss, again, obj.loss(params, (x, y))

  mean_before = model.bn.mean[...]
  losses = [step(model, opt, x, y) for _ in range(3)]
  for _, a, b in losses:
    assert float(a) == float(b)
  assert not jnp.allclose(model.bn.mean[...], mean_before)  # stats moved
  # New masks each step: with the same params the clean loss would repeat;
  # here params change too, so check the masks directly.
  masks = []
  for _ in range(2):
    obj = sj.Objective.from_nnx(model, sj.softmax_cross_entropy)
    params = nnx.state(model, nnx.Param)
    masks.append(float(obj.loss(params, (x, y))))
  assert masks[0] != masks[1]
  obj = sj.Objective.from_nnx(model, sj.softmax_cross_entropy)
  with pytest.raises(ValueError, match="mixes the examples"):
    sj.sam_gradient(obj, nnx.state(model, nnx.Param), (x, y), RHO, group_size=1)


def test_batch_norm_with_batch_statistics_is_refused_for_groups():
  """Linen BatchNorm in training mode (the trainer's make_objective): a
  ValueError before any computation, for 1-SAM and m-SAM; m-SAM may opt in
  to ghost batch norm."""
  net = nn.Sequential(
    [nn.Dense(4), nn.BatchNorm(use_running_average=False), nn.Dense(K)]
  )
  x, y = jnp.ones((B, 3)), jnp.arange(B) % K
  v = net.init(jax.random.key(0), x)
  obj = sj.Objective(
    lambda p, x_: net.apply({**v, "params": p}, x_, mutable=["batch_stats"])[0],
    sj.softmax_cross_entropy,
  )
  for g in (1, 2):
    with pytest.raises(ValueError, match="BatchNorm.*mixes the examples"):
      sj.sam_gradient(obj, v["params"], (x, y), RHO, group_size=g)
    with pytest.raises(ValueError, match="mixes the examples"):
      sj.fast_path(obj, v["params"], (x, y), group_size=g)
  with pytest.raises(ValueError, match="group_size=1"):
    sj.sam_gradient(
      obj, v["params"], (x, y), RHO, group_size=1, ghost_batch_norm=True
    )
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # an explicit choice: no warning
    _, g = sj.sam_gradient(
      obj, v["params"], (x, y), RHO, group_size=2, ghost_batch_norm=True
    )
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g))
  sj.sam_gradient(obj, v["params"], (x, y), RHO)  # n-SAM is fine


def test_fall_back_warns_once_per_objective_and_names_the_reason():
  gain_net = nn.Sequential([nn.Dense(4), nn.tanh, nn.Dense(K)])
  x, y = batch()[0].reshape(B, -1), batch()[1]
  p = to64(gain_net.init(jax.random.key(0), x))
  p = {**p, "gain": jnp.ones(())}  # a bare parameter: not covered
  apply_fn = lambda q, x_: (
    q["gain"] * gain_net.apply({"params": q["params"]}, x_)
  )
  obj = sj.Objective(apply_fn, sj.softmax_cross_entropy)
  verdict = sj.fast_path(obj, p, (x, y))
  assert not verdict and "parameter 'gain'" in verdict.reason
  with pytest.warns(sj.FastPathWarning, match="parameter 'gain'"):
    sj.sam_gradient(obj, p, (x, y), RHO, group_size=1)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sj.sam_gradient(obj, p, (x, y), RHO, group_size=1)  # once only
    sj.sam_gradient(obj, p, (x, y), RHO, group_size=1, fast=False)
  with pytest.raises(ValueError, match="fast=True.*parameter 'gain'"):
    sj.sam_gradient(obj, p, (x, y), RHO, group_size=1, fast=True)
  with pytest.raises(ValueError, match="fast must be"):
    sj.sam_gradient(obj, p, (x, y), RHO, group_size=1, fast="yes")


def test_fast_path_reasons_name_the_layer():
  x = jnp.ones((B, 6, 2))
  cases = [
    (nn.Conv(4, (3,), feature_group_count=2), "grouped convolution"),
    (nn.Conv(4, (3,), padding="CIRCULAR"), "padding 'CIRCULAR'"),
    (nn.Embed(4, 3), "parameter 'params/embedding'"),
  ]
  for layer, why in cases:
    inputs = jnp.ones((B, 6), jnp.int32) if isinstance(layer, nn.Embed) else x
    v = layer.init(jax.random.key(0), inputs)
    obj = sj.Objective(
      lambda p, x_, layer=layer: layer.apply(p, x_).reshape(B, -1),
      sj.mse,
    )
    targets = jnp.zeros_like(obj.apply_fn(v, inputs))
    verdict = sj.fast_path(obj, v, (inputs, targets))
    assert not verdict and why in verdict.reason, verdict.reason
  # A plain function: no layer at all.
  obj = sj.Objective(lambda w, x_: x_ @ w, sj.mse)
  verdict = sj.fast_path(
    obj, jnp.ones((2, 3)), (jnp.ones((B, 2)), jnp.ones((B, 3)))
  )
  assert not verdict and "is not the weight of a layer" in verdict.reason
  # ASAM has no fast path; n-SAM has no groups.
  model, variables = linen_problem()
  obj = sj.Objective(model.apply, sj.softmax_cross_entropy)
  assert (
    "adaptive" in sj.fast_path(obj, variables, batch(), adaptive=True).reason
  )
  assert "n-SAM" in sj.fast_path(obj, variables, batch(), group_size=B).reason


def test_bad_batches_are_named():
  model, variables = linen_problem()
  obj = sj.Objective(model.apply, sj.softmax_cross_entropy)
  x, y = batch()
  for bad, match in [
    ((x, y, y), "tuple \\(x, y\\)"),
    (x, "tuple \\(x, y\\)"),
    ((x[:0], y[:0]), "empty"),
    ((x, y[:3]), "disagree"),
  ]:
    with pytest.raises(ValueError, match=match):
      sj.sam_gradient(obj, variables, bad, RHO, group_size=1)
