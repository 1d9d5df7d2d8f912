"""Tests for sam_jax.models and sam_jax.resnet: shapes, features, activation
field, init, BatchNorm state through the trainer, 1-SAM on normalised nets."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sam_jax import activations, metrics, models, per_example, train
from sam_jax.objective import softmax_cross_entropy
from sam_jax.sam import global_norm, sam_gradient

B, L, K = 5, 40, 3


# Compiled init: eager flax init dispatches (and compiles) op by op.
_init = jax.jit(models.init_params, static_argnums=0)


def _apply(model, params, x, return_features=False):
  return model.apply({"params": params}, x, return_features=return_features)


def _x(shape=(B, L)):
  return jax.random.normal(jax.random.key(1), shape)


ALL = ["mlp", "cnn", "two-layer-linear", "linear"]


@pytest.mark.parametrize("name", ALL)
def test_shapes_and_features_are_the_head_input(name):
  model = models.tiny(name, num_classes=K)
  x = _x()
  params = _init(model, jax.random.key(0), x)
  logits = _apply(model, params, x)
  logits2, feats = models.features_fn(model)(params, x)
  assert logits.shape == (B, K)
  assert feats.ndim == 2 and feats.shape[0] == B
  np.testing.assert_array_equal(logits, logits2)
  head = params["head"]
  ref = feats @ head["kernel"] + head.get("bias", 0.0)
  # float32 matmul of width <= 40: a few ulps of O(1) logits.
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)


def test_cnn_default_architecture():
  model = models.CNN1D()
  x = jax.ShapeDtypeStruct((2, 40), jnp.float32)
  init = lambda k, x: models.init_params(model, k, x)
  params = jax.eval_shape(init, jax.random.key(0), x)
  # 40 -> 20 -> 10 -> 5 after three stride-2 convs of 32 channels.
  assert params["conv2"]["kernel"].shape == (5, 32, 32)
  assert params["dense0"]["kernel"].shape == (5 * 32, 64)
  assert params["head"]["kernel"].shape == (64, 10)
  logits, feats = jax.eval_shape(
    lambda p, x: model.apply({"params": p}, x, return_features=True),
    params,
    x,
  )
  assert logits.shape == (2, 10) and feats.shape == (2, 64)


def test_cnn_input_layouts():
  model = models.tiny("cnn", num_classes=K)
  x = _x()
  params = _init(model, jax.random.key(0), x)
  # [B, L] and [B, L, 1] are the same input.
  np.testing.assert_array_equal(
    _apply(model, params, x), _apply(model, params, x[..., None])
  )
  with pytest.raises(ValueError, match="CNN1D"):
    _apply(model, params, x[None, ..., None])


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_activation_field_is_used(name):
  x = _x()
  relu = models.tiny(name, num_classes=K, activation=nn.relu)
  gelu = models.tiny(name, num_classes=K, activation=activations.get("gelu"))
  params = _init(relu, jax.random.key(0), x)
  out_relu = _apply(relu, params, x)
  out_gelu = _apply(gelu, params, x)
  assert float(jnp.max(jnp.abs(out_relu - out_gelu))) > 1e-4
  # relu-synthetic-nme has ReLU's forward pass exactly.
  synth = models.tiny(
    name, num_classes=K, activation=activations.get("relu-synthetic-nme")
  )
  np.testing.assert_array_equal(_apply(synth, params, x), out_relu)


@pytest.mark.parametrize("name", ALL)
def test_deterministic_init(name):
  model = models.tiny(name, num_classes=K)
  x = _x()
  p1 = _init(model, jax.random.key(0), x)
  p2 = _init(model, jax.random.key(0), x)
  p3 = _init(model, jax.random.key(7), x)
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  assert not np.array_equal(p1["head"]["kernel"], p3["head"]["kernel"])


def test_two_layer_linear_is_vwx():
  model = models.TwoLayerLinear(3, num_classes=2)
  x = _x()
  p = _init(model, jax.random.key(0), x)
  assert set(p) == {"hidden", "head"} and "bias" not in p["head"]
  ref = x @ p["hidden"]["kernel"] @ p["head"]["kernel"]
  np.testing.assert_allclose(_apply(model, p, x), ref, rtol=1e-5)


def test_make_objective():
  model = models.tiny("mlp", num_classes=K)
  x = _x()
  y = jnp.arange(B) % K
  p = _init(model, jax.random.key(0), x)
  obj = models.make_objective(model, softmax_cross_entropy)
  logits = _apply(model, p, x)
  log_p = jax.nn.log_softmax(logits)
  ref = -jnp.mean(log_p[jnp.arange(B), y])
  np.testing.assert_allclose(obj.loss(p, (x, y)), ref, rtol=1e-6)
  assert models.num_params(p) == (L * 4 + 4) + (4 * 4 + 4) + (4 * K + K)


def test_tiny_unknown_name():
  with pytest.raises(ValueError, match="valid"):
    models.tiny("resnet")


# Residual nets ---------------------------------------------------------------

IMG = (4, 8, 8, 3)  # tiny images: 8 -> 4 -> 2 -> 1 through the strides


def _img(shape=IMG, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(1), shape, dtype)


@functools.lru_cache(maxsize=None)
def _tiny_net(name, norm):
  # Eager: the nets share their ops, so after the first one each init costs
  # ~1 s, where compiling a jitted init takes ~10 s per net on CPU.
  model = models.tiny(name, num_classes=K, norm=norm)
  return model, models.init(model, jax.random.key(0), _img())


@pytest.mark.parametrize(
  "name,norm",
  [("resnet18", n) for n in models.NORMS]
  + [("wrn", "batch"), ("wrn", "group")],
)
def test_residual_forward_backward_and_features(name, norm):
  model, (params, state) = _tiny_net(name, norm)
  x, y = _img(), jnp.arange(IMG[0]) % K
  assert set(state) == ({"batch_stats"} if norm == "batch" else set())
  obj = models.make_objective(model, softmax_cross_entropy)
  logits, feats = models.features_fn(model)(params, x)
  logits2, grads = obj.apply_fn(params, x), jax.grad(obj.loss)(params, (x, y))
  assert logits.shape == (IMG[0], K) and feats.shape[0] == IMG[0]
  np.testing.assert_array_equal(logits, logits2)
  head = params["head"]
  ref = feats @ head["kernel"] + head["bias"]
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
  # Every parameter gets a finite gradient, and every layer a nonzero one.
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
  for layer, g in grads.items():
    assert max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(g)) > 0, (
      layer
    )


def _count_convs(params, kernel_hw):
  kernels = [
    a.shape
    for path, a in jax.tree_util.tree_leaves_with_path(params)
    if path[-1].key == "kernel" and a.ndim == 4
  ]
  return sum(s[:2] == kernel_hw for s in kernels), kernels


def test_full_size_architectures():
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  r18 = models.ResNet18(num_classes=10)
  p, _ = jax.eval_shape(lambda x: models.init(r18, jax.random.key(0), x), x)
  # CIFAR stem (3x3, no max-pool), 16 block convs, 3 projection shortcuts.
  n3, kernels = _count_convs(p, (3, 3))
  assert (n3, _count_convs(p, (1, 1))[0]) == (17, 3)
  assert p["Conv_0"]["kernel"].shape == (3, 3, 3, 64)
  assert p["head"]["kernel"].shape == (512, 10)
  logits, feats = jax.eval_shape(
    lambda p, x: r18.apply(
      {"params": p}, x, return_features=True, mutable=["batch_stats"]
    )[0],
    p,
    x,
  )
  assert logits.shape == (2, 10) and feats.shape == (2, 512)
  wrn = models.WideResNet(num_classes=100, widen_factor=10, norm="layer")
  p, state = jax.eval_shape(lambda x: models.init(wrn, jax.random.key(0), x), x)
  # WRN-28-10: stem + 3 stages x 4 blocks x 2 convs; widths 160/320/640.
  assert _count_convs(p, (3, 3))[0] == 25 and state == {}
  assert p["head"]["kernel"].shape == (640, 100)
  with pytest.raises(ValueError, match="model.depth"):
    models.WideResNet(depth=27).init(jax.random.key(0), jnp.zeros(IMG))


def test_group_norm_groups_must_divide_widths():
  model = models.ResNet18(widths=(2, 2, 4, 4), norm="group", num_groups=3)
  with pytest.raises(ValueError, match="model.num_groups"):
    jax.eval_shape(lambda: models.init(model, jax.random.key(0), _img()))
  bad = models.ResNet18(widths=(2, 2, 4, 4), norm="instance")
  with pytest.raises(ValueError, match="model.norm"):
    jax.eval_shape(lambda: models.init(bad, jax.random.key(0), _img()))


def test_batchnorm_train_vs_eval_mode():
  model, (params, state) = _tiny_net("resnet18", "batch")
  x = _img()
  train_logits = models.make_objective(model, softmax_cross_entropy).apply_fn
  eval_fn = models.eval_features_fn(model)

  @jax.jit
  def run(p, s):
    # Training mode normalises with the batch: an example's logits change
    # with the rest of the batch; evaluation (running averages) does not.
    half_train = train_logits(p, x[:2])
    full_train = train_logits(p, x)
    half_eval = eval_fn(p, x[:2], s)[0]
    full_eval = eval_fn(p, x, s)[0]
    # Running averages converge to this batch's statistics (momentum 0.9:
    # 0.9^300 ~ 2e-14), after which evaluation equals training mode.
    s_conv = jax.lax.fori_loop(
      0, 300, lambda _, s: models.update_state(model, p, s, x), s
    )
    return half_train, full_train, half_eval, full_eval, eval_fn(p, x, s_conv)

  half_train, full_train, half_eval, full_eval, (conv_eval, _) = run(
    params, state
  )
  assert float(jnp.max(jnp.abs(half_train - full_train[:2]))) > 1e-3
  np.testing.assert_allclose(half_eval, full_eval[:2], rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(full_eval - full_train))) > 1e-3
  np.testing.assert_allclose(conv_eval, full_train, rtol=1e-4, atol=1e-4)
  # Stateless models: no state, and update_state is the identity.
  assert models.update_state(model, params, {}, x) == {}


def test_metrics_evaluate_uses_running_averages():
  model, (params, state) = _tiny_net("resnet18", "batch")
  x, y = _img(), jnp.arange(IMG[0]) % K
  eval_fn = models.eval_features_fn(model)

  @jax.jit
  def evaluate(p, s):
    fn = metrics.make_evaluate(
      lambda p_, x_: eval_fn(p_, x_, s), softmax_cross_entropy, 3, "test"
    )
    noisy = jnp.zeros_like(y, bool)
    return fn(p, (x, y, y, noisy), (x, y, y))

  out = evaluate(params, state)
  logits = eval_fn(params, x, state)[0]
  # Chunks of 3 of 4 examples: per-example evaluation, chunking is invisible.
  np.testing.assert_allclose(
    out["train_eval_loss"],
    jnp.mean(softmax_cross_entropy(logits, y)),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    out["test_accuracy"], jnp.mean(jnp.argmax(logits, -1) == y)
  )


# Through the trainer ---------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _mini_net(norm):
  """Two stages of one block (one projection shortcut): the residual code
  path at a fraction of the tiny ResNet-18's compile time."""
  model = models.ResNet18(
    widths=(2, 4), blocks_per_stage=1, num_classes=K, norm=norm, num_groups=2
  )
  return model, models.init(model, jax.random.key(0), _img())


def _config(method="sgd", rho=0.0, group_size=None, batch_size=IMG[0]):
  return ml_collections.ConfigDict(
    dict(
      method=method,
      rho=rho,
      group_size=group_size,
      adaptive=False,
      batch_size=batch_size,
      model=dict(norm="?"),
    )
  )


def _state(model_state, params, tx):
  return train.TrainState(
    jnp.zeros([], jnp.int32), params, tx.init(params), model_state
  )


def _stem_stats(kernel, x):
  """Mean and (biased) variance over (B, H, W) of the stem conv's output."""
  h = jax.lax.conv_general_dilated(
    x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return jnp.mean(h, (0, 1, 2)), jnp.var(h, (0, 1, 2))


def test_batchnorm_stats_come_from_the_clean_pass_under_sam():
  model, (params, state) = _tiny_net("resnet18", "batch")
  x, y = _img(), jnp.arange(IMG[0]) % K
  rho, tx = 0.5, optax.sgd(0.1)
  step = train.make_train_step(_config("sam", rho), model, tx)
  new, out = step(_state(state, params, tx), (x, y), jax.random.key(0))
  # Stem BatchNorm, by hand: momentum 0.9 from (mean 0, var 1) towards the
  # statistics of conv(x) at the clean kernel.
  stem = new.model_state["batch_stats"]["_Norm_0"]["norm"]
  mean, var = _stem_stats(params["Conv_0"]["kernel"], x)
  np.testing.assert_allclose(stem["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stem["var"], 0.9 + 0.1 * var, rtol=1e-4)
  # ... and not at SAM's perturbed kernel w + rho g/||g||, which differs.
  obj = models.make_objective(model, softmax_cross_entropy)
  g = jax.grad(obj.loss)(params, (x, y))
  eps = jax.tree.map(lambda a: rho * a / global_norm(g), g)
  mean_p, _ = _stem_stats(
    params["Conv_0"]["kernel"] + eps["Conv_0"]["kernel"], x
  )
  assert float(jnp.max(jnp.abs(0.1 * (mean_p - mean)))) > 1e-4
  # Every layer: the state of one clean pass at the unperturbed params.
  clean = models.update_state(model, params, state, x)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    new.model_state,
    clean,
  )
  np.testing.assert_allclose(out["loss"], obj.loss(params, (x, y)), rtol=1e-6)


@pytest.mark.parametrize(
  "norm,method,group_size",
  [
    ("batch", "sam", None),
    ("batch", "l-sam", None),
    ("batch", "j-sam", None),
    ("layer", "sam", 1),
    ("layer", "l-sam", 1),
    ("layer", "j-sam", 1),
  ],
)
def test_trainer_steps(norm, method, group_size):
  model, (params, state) = _mini_net(norm)
  x, y = _img(), jnp.arange(IMG[0]) % K
  tx = optax.sgd(0.1, momentum=0.9)
  sgd = train.make_train_step(_config(), model, tx)
  step = train.make_train_step(_config(method, 0.05, group_size), model, tx)
  zero = train.make_train_step(_config(method, 0.0, group_size), model, tx)
  s0, key = _state(state, params, tx), jax.random.key(0)
  s1, out1 = step(s0, (x, y), key)
  s2, out2 = step(s1, (x, y), key)
  assert np.isfinite(out1["loss"]) and np.isfinite(out2["loss"])
  assert not np.array_equal(
    s1.params["head"]["kernel"], params["head"]["kernel"]
  )
  assert int(s2.step) == 2
  if norm == "batch":
    stats = lambda s: s.model_state["batch_stats"]["_Norm_2"]["norm"]["mean"]
    assert float(jnp.max(jnp.abs(stats(s2) - stats(s1)))) > 0
  # rho = 0: SAM and its variants are exactly SGD (params and model state).
  (s_sgd, _), (s_zero, _) = sgd(s0, (x, y), key), zero(s0, (x, y), key)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    (s_sgd.params, s_sgd.model_state),
    (s_zero.params, s_zero.model_state),
  )


@pytest.mark.parametrize("method", ["sam", "l-sam", "j-sam"])
def test_per_example_sam_rejects_batchnorm(method):
  model, _ = _mini_net("batch")
  with pytest.raises(ValueError, match="config.model.norm"):
    train.make_train_step(_config(method, 0.05, 1), model, optax.sgd(0.1))


def _one_sam_reference(obj, params, x, y, rho):
  """mean_i grad l_i(w + rho g_i/||g_i||), each example on its own (vmap)."""

  def one(x_i, y_i):
    loss_i = lambda p: obj.loss(p, (x_i[None], y_i[None]))
    g = jax.grad(loss_i)(params)
    scale = rho / global_norm(g)
    return jax.grad(loss_i)(jax.tree.map(lambda w, d: w + scale * d, params, g))

  return jax.tree.map(lambda a: jnp.mean(a, 0), jax.vmap(one)(x, y))


def test_fast_one_sam_plan_covers_per_example_norms_only():
  x = _img()
  for norm, covered in [("layer", True), ("group", True), ("batch", False)]:
    model, (params, _) = _mini_net(norm)
    obj = models.make_objective(model, softmax_cross_entropy)
    assert per_example.plan(obj.apply_fn, params, x).applies == covered
  # A LayerNorm over the batch axis mixes examples: not covered.
  for axes, covered in [(-1, True), ((0, 1), False)]:
    net = nn.Sequential([nn.Dense(3), nn.LayerNorm(reduction_axes=axes)])
    p = net.init(jax.random.key(0), x[:, 0, 0])["params"]
    apply_fn = lambda p, x_: net.apply({"params": p}, x_)  # noqa: B023
    assert per_example.plan(apply_fn, p, x[:, 0, 0]).applies == covered


def test_one_sam_on_resnet_ln_matches_per_example_gradients():
  """Float64: the fast path (LayerNorm covered) equals, for each example,
  the gradient at its own point w + rho g_i/||g_i||."""
  rho = 0.3
  with jax.enable_x64(True):
    model, (params, _) = _mini_net("layer")
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x, y = _img((3,) + IMG[1:], jnp.float64), jnp.arange(3) % K
    obj = models.make_objective(model, softmax_cross_entropy)
    assert per_example.plan(obj.apply_fn, params, x).applies
    ref = jax.jit(_one_sam_reference, static_argnums=0)(obj, params, x, y, rho)
    loss, got = jax.jit(
      lambda p: sam_gradient(obj, p, (x, y), rho, group_size=1)
    )(params)
    np.testing.assert_allclose(loss, obj.loss(params, (x, y)), rtol=1e-12)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12),
      got,
      ref,
    )


def test_make_model_from_config():
  def config(**model):
    return ml_collections.ConfigDict(
      dict(model=dict(activation="relu", beta=1.0, **model))
    )

  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  shapes = lambda m: jax.eval_shape(
    lambda x: models.init(m, jax.random.key(0), x), x
  )
  m = train.make_model(config(name="resnet18", norm="layer", width=8), 10)
  p, state = shapes(m)
  assert m.norm == "layer" and state == {}
  assert p["head"]["kernel"].shape == (64, 10)
  m = train.make_model(config(name="wrn", depth=16, widen_factor=2), 100)
  p, state = shapes(m)
  assert m.norm == "batch" and set(state) == {"batch_stats"}
  assert p["head"]["kernel"].shape == (128, 100)
  assert _count_convs(p, (3, 3))[0] == 13
  with pytest.raises(ValueError, match="config.model.norm"):
    train.make_model(config(name="resnet18", norm="instance"), 10)
  with pytest.raises(ValueError, match="config.model.width"):
    train.make_model(config(name="resnet18", width=0), 10)
  with pytest.raises(ValueError, match="config.model.widen_factor"):
    train.make_model(config(name="wrn", widen_factor=1.5), 10)
