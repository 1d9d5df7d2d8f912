"""Tests for sam_jax.train, sam_jax.methods, sam_jax.metrics (tiny sizes)."""

import json
import os
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.configs import label_noise_mnist1d
from sam_jax import methods, metrics, models, train
from sam_jax.objective import softmax_cross_entropy
from sam_jax.sam import sam_gradient


def tiny_config(label="sgd", **fields):
  """The real label-noise config, shrunk: 160 train / 40 test examples, a
  CNN of 2 channels, batches of 16 (10 steps per epoch), 2 seeds."""
  c = label_noise_mnist1d.get_config(label)
  c.data.num_samples = 200
  c.model.channels = (2,)
  c.model.kernel_size = 3
  c.model.dense = (4,)
  c.batch_size = 16
  c.num_epochs = 2
  c.num_seeds = 2
  c.progress = False
  c.checkpoint_every_epochs = 1
  c.update(fields)
  return c


# Metrics --------------------------------------------------------------------


def test_noise_accuracies_use_the_right_subsets():
  true = jnp.array([0, 1, 2, 3, 0, 1])
  noisy = jnp.array([False, False, False, True, True, True])
  labels = jnp.where(noisy, (true + 1) % 4, true)  # [0 1 2 0 1 2]
  # Predicting the true labels: all clean right, no noisy label memorised.
  acc = metrics.noise_accuracies(true, labels, true, noisy)
  assert float(acc["clean_accuracy"]) == 1.0
  assert float(acc["noisy_accuracy"]) == 0.0
  assert float(acc["noisy_true_accuracy"]) == 1.0
  assert float(acc["train_accuracy"]) == 0.5
  # Predicting the noisy labels: everything memorised.
  acc = metrics.noise_accuracies(labels, labels, true, noisy)
  assert float(acc["noisy_accuracy"]) == 1.0
  assert float(acc["noisy_true_accuracy"]) == 0.0
  # Mixed: clean 2 of 3 right; noisy: one memorised, one true, one neither.
  pred = jnp.array([0, 1, 3, 0, 0, 3])
  acc = metrics.noise_accuracies(pred, labels, true, noisy)
  np.testing.assert_allclose(acc["clean_accuracy"], 2 / 3)
  np.testing.assert_allclose(acc["noisy_accuracy"], 1 / 3)
  np.testing.assert_allclose(acc["noisy_true_accuracy"], 1 / 3)
  np.testing.assert_allclose(acc["train_accuracy"], 3 / 6)
  # No noisy example: NaN on device, None in the JSON records.
  acc = metrics.noise_accuracies(true, true, true, jnp.zeros(6, bool))
  assert np.isnan(acc["noisy_accuracy"])
  (rec,) = metrics.to_records({k: v[None] for k, v in acc.items()}, [7])
  assert rec["noisy_accuracy"] is None and rec["seed"] == 7


def test_chunked_apply_matches_one_pass():
  x = jnp.arange(23.0).reshape(23, 1)
  out = metrics.chunked_apply(lambda c: (2 * c, c.sum(1)), x, 5)
  np.testing.assert_array_equal(out[0], 2 * x)
  np.testing.assert_array_equal(out[1], x[:, 0])


def test_summarize_best_and_final():
  recs = [
    {"seed": 0, "epoch": 1, "test_accuracy": 0.5},
    {"seed": 0, "epoch": 2, "test_accuracy": 0.7},
    {"seed": 0, "epoch": 3, "test_accuracy": 0.6},
    {"seed": 1, "epoch": 1, "test_accuracy": 0.8},
    {"seed": 1, "epoch": 2, "test_accuracy": 0.8},
    {"seed": 1, "epoch": 3, "test_accuracy": 0.4},
  ]
  s = metrics.summarize(recs)
  assert s["best_test_accuracy"] == [0.7, 0.8]
  assert s["best_epoch"] == [2, 1]  # Ties: the earliest epoch.
  assert s["final_test_accuracy"] == [0.6, 0.4]
  np.testing.assert_allclose(s["mean"]["best_test_accuracy"], 0.75)
  np.testing.assert_allclose(s["std"]["final_test_accuracy"], 0.1)


# Config validation ----------------------------------------------------------

BAD = [
  ("method", "adam", "config.method"),
  ("rho", -0.1, "config.rho"),
  ("data.noise_rate", 1.0, "config.data.noise_rate"),
  ("data.noise_rate", -0.1, "config.data.noise_rate"),
  ("data.noise_kind", "pairs", "config.data.noise_kind"),
  ("learning_rate", 0.0, "config.learning_rate"),
  ("batch_size", 0, "config.batch_size"),
  ("batch_size", 1000, "config.batch_size"),  # More than 160 examples.
  ("num_epochs", 0, "config.num_epochs"),
  ("num_seeds", 0, "config.num_seeds"),
  ("momentum", 1.0, "config.momentum"),
  ("schedule", "step", "config.schedule"),
  ("model.name", "resnet", "config.model.name"),
  ("model.activation", "tanh", "config.model.activation"),
  ("model.channels", (2, 0), "config.model.channels"),
]


def _set(config, field, value):
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value


@pytest.mark.parametrize("field,value,name", BAD)
def test_validate_config_names_the_field(field, value, name):
  c = tiny_config()
  train.validate_config(c)  # The shrunk real config is valid.
  _set(c, field, value)
  with pytest.raises(ValueError, match=re.escape(name)):
    train.validate_config(c)


@pytest.mark.parametrize(
  "label,fields,name",
  [
    ("1-sam", {"group_size": 3}, "config.group_size"),  # 3 does not divide 16.
    ("sam", {"rho": float("nan")}, "config.rho"),
    ("sgd+reg", {"lambda_a": -1.0}, "config.lambda_a"),
  ],
)
def test_validate_method_fields(label, fields, name, tmp_path):
  c = tiny_config(label, **fields)
  with pytest.raises(ValueError, match=re.escape(name)):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # Failed before doing anything.


# Methods --------------------------------------------------------------------


def _tiny_problem():
  model = models.MLP((5,), num_classes=3)
  x = jax.random.normal(jax.random.key(0), (8, 6))
  y = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])
  params = models.init_params(model, jax.random.key(1), x)
  return model, params, (x, y)


@pytest.mark.parametrize(
  "method,variant,group_size",
  [
    ("sam", "sam", None),
    ("sam", "sam", 1),
    ("l-sam", "logit", 1),
    ("j-sam", "jacobian", 1),
  ],
)
def test_sam_methods_dispatch_to_their_variant(method, variant, group_size):
  model, params, batch = _tiny_problem()
  c = tiny_config(method=method, rho=0.1, group_size=group_size)
  loss, grads = methods.make_grad_fn(c, model, softmax_cross_entropy)(
    params, batch, jax.random.key(0)
  )
  obj = models.make_objective(model, softmax_cross_entropy)
  ref_loss, ref = sam_gradient(
    obj, params, batch, 0.1, variant=variant, group_size=group_size
  )
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), grads, ref
  )


def test_sgd_reg_gradient_is_that_of_the_penalised_loss():
  model, params, (x, y) = _tiny_problem()
  c = tiny_config("sgd+reg", lambda_w=0.3, lambda_a=0.2)
  loss, grads = methods.make_grad_fn(c, model, softmax_cross_entropy)(
    params, (x, y), None
  )

  def total(p):
    logits, feats = model.apply({"params": p}, x, return_features=True)
    ce = jnp.mean(softmax_cross_entropy(logits, y))
    head = jnp.sum(p["head"]["kernel"] ** 2)
    return ce + 0.3 * head + 0.2 * jnp.mean(jnp.sum(feats**2, 1)), ce

  (_, ce), ref = jax.value_and_grad(total, has_aux=True)(params)
  np.testing.assert_allclose(loss, ce, rtol=1e-6)  # Logged: the data loss.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), grads, ref
  )


@pytest.mark.parametrize("method", methods.names())
def test_every_registered_method_takes_a_finite_step(method):
  model, params, batch = _tiny_problem()
  c = tiny_config(method=method, rho=0.05, sigma=0.01, lambda_w=1e-3)
  tx = train.make_optimizer(c, 10)
  step = jax.jit(train.make_train_step(c, model, tx))
  state = train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  new, out = step(state, batch, jax.random.key(0))
  assert int(new.step) == 1
  assert np.isfinite(out["loss"]) and float(out["grad_norm"]) > 0
  moved = jax.tree.map(
    lambda a, b: float(jnp.max(jnp.abs(a - b))), new.params, params
  )
  assert max(jax.tree.leaves(moved)) > 0


# The vmapped program --------------------------------------------------------


def test_vmapped_seeds_equal_separate_runs():
  c = tiny_config("1-sam", rho=0.05)
  c.model.name = "mlp"  # Compiles faster than the CNN; same program shape.
  ds = train.load_data(c, [0, 1])
  model = train.make_model(c, 10)
  n = ds.x_train.shape[0]
  tx = train.make_optimizer(c, n // c.batch_size)
  step = train.make_train_step(c, model, tx)
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(2))

  # One compiled epoch per number of seeds (the S=1 program serves both).
  fns = {k: train.make_epoch_fn(step, n, c.batch_size) for k in (1, 2)}

  def run(idx):
    states = train.init_states(model, tx, keys[idx], ds.x_train[:1])
    for epoch in (1, 2):
      states, out = fns[len(idx)](
        states, keys[idx], ds.x_train, ds.labels[idx], epoch
      )
    return states, out

  both = run(np.array([0, 1]))
  for s in (0, 1):
    alone = run(np.array([s]))
    # vmap batches the convolutions and matmuls differently, so float32
    # results differ by rounding only, after 20 steps still ~1e-6 relative.
    for a, b in zip(jax.tree.leaves(both), jax.tree.leaves(alone), strict=True):
      np.testing.assert_allclose(
        np.asarray(a)[s], np.asarray(b)[0], rtol=2e-5, atol=2e-6
      )
  # The seeds really differ (different init, order and label noise).
  assert not np.allclose(both[1]["loss"][0], both[1]["loss"][1])


# train_and_evaluate ---------------------------------------------------------


def test_train_and_evaluate_writes_metrics(tmp_path):
  c = tiny_config("sgd+reg", lambda_w=1e-3, lambda_a=1e-3)
  s = train.train_and_evaluate(c, str(tmp_path))
  recs = [
    json.loads(x)
    for x in (tmp_path / "metrics.jsonl").read_text().split("\n")
    if x
  ]
  assert [(r["epoch"], r["seed"]) for r in recs] == [
    (1, 0),
    (1, 1),
    (2, 0),
    (2, 1),
  ]
  for r in recs:
    for k in (
      "test_accuracy",
      "clean_accuracy",
      "noisy_accuracy",
      "train_loss",
      "head_norm",
      "feature_norm",
      "noisy_true_accuracy",
    ):
      assert r[k] is not None and np.isfinite(r[k]), k
    assert r["step"] == 10 * r["epoch"]
  assert s["status"] == "ok" and s["seeds"] == [0, 1]
  assert len(s["best_test_accuracy"]) == 2
  assert json.loads((tmp_path / "summary.json").read_text())["status"] == "ok"


def test_huge_learning_rate_raises_naming_the_step(tmp_path):
  c = tiny_config(learning_rate=1e12)
  with pytest.raises(
    FloatingPointError,
    match=r"non-finite \w+ (at|after) step \d+ \(epoch 1, seed \d\)",
  ):
    train.train_and_evaluate(c, str(tmp_path))
  assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


def test_first_non_finite_is_the_earliest_step_then_seed():
  nan, inf = float("nan"), float("inf")
  loss = np.array([[1.0, 1.0, nan], [1.0, 1.0, 1.0], [1.0, nan, 1.0]])
  gnorm = np.array([[1.0, 1.0, 1.0], [1.0, inf, 1.0], [1.0, 1.0, 1.0]])
  assert train.first_non_finite(loss, gnorm) == (1, 1, "gradient")
  assert train.first_non_finite(loss, np.ones_like(gnorm)) == (2, 1, "loss")
  assert train.first_non_finite(np.ones(3)[None], np.ones(3)[None]) is None


def test_non_finite_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  real = train.make_train_step

  def poisoned(*args, **kw):
    step = real(*args, **kw)

    def wrapped(state, batch, key):
      new, out = step(state, batch, key)
      # The 13th step (epoch 2, 3rd of 10 per epoch) reports a NaN loss.
      out["loss"] = jnp.where(state.step == 12, jnp.nan, out["loss"])
      return new, out

    return wrapped

  monkeypatch.setattr(train, "make_train_step", poisoned)
  c = tiny_config(num_epochs=3)
  with pytest.raises(
    FloatingPointError, match=r"loss at step 13 \(epoch 2, seed 0\)"
  ):
    train.train_and_evaluate(c, str(tmp_path))
  mngr = ocp.CheckpointManager(tmp_path / "checkpoints")
  assert mngr.all_steps() == [1]
  recs = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(r)["epoch"] for r in recs] == [1, 1]


def test_resume_gives_the_uninterrupted_result(tmp_path, monkeypatch):
  c = tiny_config(num_epochs=3)
  train.train_and_evaluate(c, str(tmp_path / "a"))

  real = train._raise_non_finite

  def killed_in_epoch_3(out, config, epoch, seeds):
    if epoch == 3:
      raise KeyboardInterrupt
    real(out, config, epoch, seeds)

  monkeypatch.setattr(train, "_raise_non_finite", killed_in_epoch_3)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(c, str(tmp_path / "b"))
  monkeypatch.setattr(train, "_raise_non_finite", real)
  assert (
    ocp.CheckpointManager(tmp_path / "b" / "checkpoints").latest_step() == 2
  )
  # What a full disk leaves: the newest checkpoint cut short, a metrics
  # line cut mid-write. The resume goes back to epoch 1, moves the damaged
  # checkpoint aside and ends exactly as the uninterrupted run.
  latest = tmp_path / "b" / "checkpoints" / "2" / "default"
  for path in [p for p in latest.rglob("*") if p.is_file()]:
    if path.parent.name == "d":
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
    f.write('{"epoch": 3, "se')
  train.train_and_evaluate(c, str(tmp_path / "b"))
  assert (tmp_path / "b" / "damaged" / "checkpoints-2").is_dir()

  def final(run):
    mngr = ocp.CheckpointManager(tmp_path / run / "checkpoints")
    return mngr.restore(3, args=ocp.args.StandardRestore())

  for a, b in zip(
    jax.tree.leaves(final("a")), jax.tree.leaves(final("b")), strict=True
  ):
    np.testing.assert_array_equal(a, b)  # Same program, same inputs: exact.
  read = lambda run: (tmp_path / run / "metrics.jsonl").read_text()
  assert read("a") == read("b")

  # SIGTERM during epoch 2: the epoch ends, is checkpointed, the summary
  # says "preempted"; the rerun ends as the uninterrupted run.
  def sigterm_in_epoch_2(out, config, epoch, seeds):
    if epoch == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    real(out, config, epoch, seeds)

  monkeypatch.setattr(train, "_raise_non_finite", sigterm_in_epoch_2)
  summary = train.train_and_evaluate(c, str(tmp_path / "c"))
  assert summary["status"] == "preempted"
  assert ocp.CheckpointManager(tmp_path / "c" / "checkpoints").all_steps() == [
    1,
    2,
  ]
  monkeypatch.setattr(train, "_raise_non_finite", real)
  assert train.train_and_evaluate(c, str(tmp_path / "c"))["status"] == "ok"
  assert read("a") == read("c")
  for a, b in zip(
    jax.tree.leaves(final("a")), jax.tree.leaves(final("c")), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  # A rerun with another config in the same workdir is refused.
  with pytest.raises(ValueError, match="learning_rate"):
    train.train_and_evaluate(
      tiny_config(num_epochs=3, learning_rate=0.1), str(tmp_path / "b")
    )
