"""Tests for sam_jax.train_sharded and the CIFAR configs, on mock TFDS data.

8 simulated CPU devices (tests/conftest.py). Kill and resume:
tests/train_sharded_resume_test.py.
"""

import json
import os

import jax
import jax.numpy as jnp
import mock_main
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.configs import (
  activation_penalty_cifar10,
  label_noise_cifar10,
  weight_noise_cifar10,
)
from sam_jax import metrics, parallel, tfds_data, train, train_sharded
from sam_jax.objective import softmax_cross_entropy
from sam_jax.train_config import validate_config

CIFAR_STATS = tfds_data.CHANNEL_STATS["cifar10"]
CONFIGS = (
  label_noise_cifar10,
  activation_penalty_cifar10,
  weight_noise_cifar10,
)


def tiny_config(label="sgd", **fields):
  """label_noise_cifar10 shrunk: an MLP of width 8, batches of 16 (4 steps
  per epoch on 64 mock examples), 2 epochs."""
  c = label_noise_cifar10.get_config(label)
  c.model.name = "mlp"
  c.model.dense = (8,)
  c.batch_size = 16
  c.eval_batch_size = 16
  c.num_epochs = 2
  c.checkpoint_every_steps = 3
  c.data.eval_train_examples = 32
  c.progress = False
  c.update(fields)
  return c


@pytest.mark.parametrize(
  "module,label",
  [(m, label) for m in CONFIGS for label in m.METHODS],
)
def test_configs_load_and_validate(module, label):
  c = module.get_config(label)
  validate_config(c)
  assert c.label == label and c.data.name == "cifar10"
  assert c.model.name == "resnet18" and c.model.norm == "layer"


def test_label_noise_cifar10_matches_the_paper_setup():
  c = label_noise_cifar10.get_config("1-sam")
  assert (c.batch_size, c.learning_rate, c.weight_decay) == (128, 0.01, 5e-4)
  assert (c.num_epochs, c.rho, c.group_size) == (200, 0.01, 1)
  assert (c.data.noise_rate, c.data.noise_kind) == (0.3, "symmetric")


@pytest.mark.parametrize(
  "field,value",
  [
    ("dtype", "float16"),
    ("num_seeds", 2),
    ("data.augment", "yes"),
    ("data.data_dir", 3),
    ("num_devices", 0),
    ("sam_per_device", 1),
    ("checkpoint_every_steps", 0),
    ("data.eval_train_examples", -1),
    ("data.in_memory", None),
    ("data.name", "imagenet2012"),
  ],
)
def test_bad_tfds_config_names_the_field(field, value):
  c = tiny_config()
  mock_main.set_fields(c, {field: value})
  with pytest.raises(ValueError, match=f"config.{field}"):
    validate_config(c)


def test_batch_must_split_over_devices(tmp_path):
  # Checked before any data is read.
  with pytest.raises(ValueError, match="config.batch_size"):
    train.train_and_evaluate(tiny_config(batch_size=12), str(tmp_path))
  c = tiny_config("sam", group_size=4, sam_per_device=True)
  with pytest.raises(ValueError, match="config.group_size"):
    train.train_and_evaluate(c, str(tmp_path / "b"))  # 2 per device.


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
  a = train_sharded.epoch_order(0, 1, 50)
  np.testing.assert_array_equal(a, train_sharded.epoch_order(0, 1, 50))
  np.testing.assert_array_equal(np.sort(a), np.arange(50))
  assert not np.array_equal(a, train_sharded.epoch_order(0, 2, 50))
  assert not np.array_equal(a, train_sharded.epoch_order(1, 1, 50))


def test_load_data_label_noise():
  c = tiny_config()
  with tfds.testing.mock_data(num_examples=40):
    tr, te = train_sharded.load_data(c)
    x, y = tfds_data.load_tfds("cifar10", "train")
  assert tr.x.shape == (40, 32, 32, 3) and tr.x.dtype == np.uint8
  np.testing.assert_array_equal(tr.true_labels, y)
  assert tr.noisy.sum() == 12  # round(0.3 * 40).
  np.testing.assert_array_equal(tr.noisy, tr.labels != y)
  assert not te.noisy.any()
  np.testing.assert_array_equal(te.labels, te.true_labels)


@pytest.mark.parametrize("augment", [False, True])
def test_augmentation_switch(augment):
  """The step normalises on device; augmentation only when switched on."""
  c = tiny_config()
  c.data.augment = augment
  seen = []
  fake_step = lambda state, batch, key: seen.append(batch[0]) or (state, {})
  step = train_sharded.make_image_step(fake_step, c)
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  state = train.TrainState(jnp.zeros([], jnp.int32), {}, ())
  step(state, (x, np.zeros(4, np.int32)), jax.random.PRNGKey(0))
  ref = tfds_data.normalize_images(x, *tfds_data.CHANNEL_STATS["cifar10"])
  assert np.array_equal(seen[0], ref) != augment


def test_eval_metrics_match_a_direct_computation():
  """Padded, sharded evaluation (40 examples in batches of 16 on 8
  devices) against one dense forward pass and `sam_jax.metrics`."""
  c = tiny_config(eval_batch_size=16)
  c.data.eval_train_examples = 40
  with tfds.testing.mock_data(num_examples=40):
    tr, te = train_sharded.load_data(c)
  model = train.make_model(c, 10)
  tx = train.make_optimizer(c, 1)
  mesh = parallel.make_mesh()
  x0 = tfds_data.normalize_images(tr.x[:1], *CIFAR_STATS)
  state = train_sharded.init_state(model, tx, jax.random.PRNGKey(0), x0, mesh)
  eval_step = jax.jit(train_sharded.make_eval_step(model, c))
  got = train_sharded.eval_metrics(eval_step, state, tr, te, c, mesh)

  params = jax.tree.map(np.asarray, state.params)
  logits = lambda x: model.apply(
    {"params": params}, tfds_data.normalize_images(x, *CIFAR_STATS)
  )
  z_test = logits(te.x)
  np.testing.assert_allclose(
    got["test_accuracy"], np.mean(np.argmax(z_test, -1) == te.labels)
  )
  loss = softmax_cross_entropy(z_test, jnp.asarray(te.labels))
  np.testing.assert_allclose(got["test_loss"], np.mean(loss), rtol=1e-5)
  pred = jnp.argmax(logits(tr.x), -1)
  ref = metrics.noise_accuracies(pred, tr.labels, tr.true_labels, tr.noisy)
  for k, v in ref.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-6)


def test_label_noise_cifar10_one_step_tiny_resnet(tmp_path):
  """The real config with a width-2 ResNet-18-LN, one SAM step on 8
  devices; then the checkpoints and metrics it leaves."""
  c = label_noise_cifar10.get_config("sam")
  c.model.width, c.model.num_groups = 2, 2
  c.batch_size = c.eval_batch_size = 8
  c.num_epochs, c.data.eval_train_examples, c.progress = 1, 8, False
  with tfds.testing.mock_data(num_examples=8):
    s = train.train_and_evaluate(c, str(tmp_path))
  assert s["status"] == "ok" and s["steps_per_epoch"] == 1
  assert s["devices"]["device_count"] == 8
  assert 0 <= s["best_test_accuracy"][0] <= 1
  (rec,) = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rec["step"] == 1 and np.isfinite(rec["train_loss"])
  assert {"clean_accuracy", "noisy_accuracy", "feature_norm"} <= set(rec)
  assert os.listdir(tmp_path / "checkpoints") == ["1"]
  assert os.listdir(tmp_path / "best") == ["1"]


def test_streamed_images_train_like_in_memory(tmp_path):
  """`data.in_memory=False` reads each batch from the files: the same run."""
  runs = {}
  for in_memory in (True, False):
    c = tiny_config("sam", num_epochs=1)
    c.data.in_memory = in_memory
    with tfds.testing.mock_data(num_examples=40):
      train.train_and_evaluate(c, str(tmp_path / str(in_memory)))
    runs[in_memory] = mock_main.final_params(tmp_path / str(in_memory))
  for u, v in zip(*map(jax.tree.leaves, runs.values()), strict=True):
    assert np.array_equal(u, v)


def test_bfloat16_per_device_sam_run(tmp_path):
  """bf16 compute, per-device perturbation, 2 devices: trains, keeps
  float32 parameters, and resumes as a no-op once finished."""
  c = tiny_config("sam", dtype="bfloat16", sam_per_device=True, num_devices=2)
  with tfds.testing.mock_data(num_examples=64):
    s = train.train_and_evaluate(c, str(tmp_path))
    again = train.train_and_evaluate(c, str(tmp_path))
  assert s["status"] == "ok" and s["devices"]["device_count"] == 2
  params = mock_main.final_params(tmp_path)
  assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))
  assert again["final_test_accuracy"] == s["final_test_accuracy"]
  with pytest.raises(ValueError, match="different config"):
    c.seed = 1
    train.train_and_evaluate(c, str(tmp_path))


def test_non_finite_loss_stops_with_the_step(tmp_path):
  c = tiny_config(learning_rate=1e30, checkpoint_every_steps=1)
  with tfds.testing.mock_data(num_examples=64):
    with pytest.raises(FloatingPointError, match=r"at step \d"):
      train.train_and_evaluate(c, str(tmp_path))
  # Only finite states were checkpointed.
  for step in os.listdir(tmp_path / "checkpoints"):
    params = mock_main.final_params(tmp_path, int(step))
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))
