"""Tests for sam_jax.parallel on 8 simulated CPU devices (tests/conftest.py).

The data-parallel step must compute what one device computes: SGD and
global-perturbation SAM equal their single-device steps, and per-device SAM
equals single-device m-SAM with m = per-device batch. Checked in float64,
where the only difference (the order of the cross-device sums) is at
rounding level.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import label_noise_cifar10
from sam_jax import models, parallel, train
from sam_jax.objective import softmax_cross_entropy
from sam_jax.sam import sam_gradient

NUM_DEVICES = 8
B = 16  # Global batch: 2 examples per device.


@pytest.fixture(scope="module", autouse=True)
def _needs_devices():
  if jax.device_count() < NUM_DEVICES:
    pytest.skip(f"needs {NUM_DEVICES} devices (see tests/conftest.py)")


def tiny_config(label="sgd", **fields):
  c = label_noise_cifar10.get_config(label)
  c.model.name = "mlp"
  c.model.dense = (5,)
  c.batch_size = B
  c.learning_rate = 0.1
  c.update(fields)
  return c


def _problem(dtype=jnp.float64):
  """A tiny MLP on random 4x4x3 images, 10 classes, and two batches."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, B, 4, 4, 3)), dtype)
  y = jnp.asarray(rng.integers(0, 10, size=(2, B)), jnp.int32)
  model = models.MLP((5,), num_classes=10)
  params = model.init(jax.random.PRNGKey(0), x[0])["params"]
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  return model, params, [(x[0], y[0]), (x[1], y[1])]


def _run(config, model, params, batches, num_devices, per_device=False):
  """Two steps of `make_train_step` jitted on a mesh of `num_devices`."""
  mesh = parallel.make_mesh(num_devices)
  tx = train.make_optimizer(config, steps_per_epoch=2)
  wrap = (lambda fn: parallel.per_device(fn, mesh)) if per_device else None
  step = train.make_train_step(config, model, tx, wrap_grad_fn=wrap)
  state = train.TrainState(jnp.zeros([], jnp.int32), params, tx.init(params))
  state = parallel.replicate(state, mesh)
  step_fn = parallel.jit_train_step(step, mesh, state)
  key = parallel.replicate(jax.random.PRNGKey(1), mesh)
  for batch in batches:
    state, out = step_fn(state, parallel.global_batch(batch, mesh), key)
  return state, out


def _assert_trees_close(a, b, rtol=1e-12):
  # float64: the sums over devices are only reordered, errors ~1e-16.
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=0)


@pytest.mark.parametrize("label", ["sgd", "sam"])
def test_data_parallel_equals_one_device(label):
  """SGD, and SAM with the perturbation from the global gradient (n-SAM)."""
  with jax.enable_x64(True):
    model, params, batches = _problem()
    c = tiny_config(label, rho=0.5)
    many, out8 = _run(c, model, params, batches, NUM_DEVICES)
    one, out1 = _run(c, model, params, batches, 1)
    assert many.params["head"]["kernel"].sharding.is_fully_replicated
    _assert_trees_close(many.params, one.params)
    _assert_trees_close(many.opt_state, one.opt_state)
    _assert_trees_close(out8, out1)
    assert int(many.step) == 2


def test_per_device_sam_equals_m_sam():
  """sam_per_device on 8 devices = m-SAM with m = 16 / 8 on one device."""
  with jax.enable_x64(True):
    model, params, batches = _problem()
    c = tiny_config("sam", rho=0.5)
    many, _ = _run(c, model, params, batches, NUM_DEVICES, per_device=True)
    m = B // NUM_DEVICES
    one, _ = _run(c.copy_and_resolve_references(), model, params, batches, 1)
    c_m = tiny_config("sam", rho=0.5, group_size=m)
    ref, _ = _run(c_m, model, params, batches, 1)
    _assert_trees_close(many.params, ref.params)
    # And it differs from n-SAM: the option is not a no-op.
    a, b = many.params["head"]["kernel"], one.params["head"]["kernel"]
    assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-6


def test_per_device_gradient_is_mean_of_device_gradients():
  """The pmean'd per-device gradient against an independent computation:
  the mean of n-SAM gradients over the 8 slices of the batch."""
  with jax.enable_x64(True):
    model, params, batches = _problem()
    obj = models.make_objective(model, softmax_cross_entropy)
    fn = lambda p, batch, key: sam_gradient(obj, p, batch, 0.5)
    mesh = parallel.make_mesh(NUM_DEVICES)
    wrapped = jax.jit(parallel.per_device(fn, mesh))
    batch = parallel.global_batch(batches[0], mesh)
    loss, grads = wrapped(params, batch, jax.random.PRNGKey(0))
    x, y = batches[0]
    m = B // NUM_DEVICES
    parts = [
      fn(params, (x[i : i + m], y[i : i + m]), None) for i in range(0, B, m)
    ]
    ref = jax.tree.map(lambda *g: sum(g) / len(g), *[g for _, g in parts])
    _assert_trees_close(grads, ref)
    np.testing.assert_allclose(loss, np.mean([lo for lo, _ in parts]))


def test_per_device_folds_the_device_index_into_keys():
  mesh = parallel.make_mesh(NUM_DEVICES)
  fn = lambda x, batch, key: (jax.random.normal(key), x)
  wrapped = jax.jit(parallel.per_device(fn, mesh))
  noise, _ = wrapped(jnp.zeros(()), jnp.zeros((B,)), jax.random.PRNGKey(3))
  keys = [jax.random.fold_in(jax.random.PRNGKey(3), i) for i in range(8)]
  ref = np.mean([jax.random.normal(k) for k in keys])
  np.testing.assert_allclose(noise, ref, rtol=1e-6)


def test_step_donates_state_and_keeps_shardings():
  model, params, batches = _problem(jnp.float32)
  c = tiny_config("sgd")
  mesh = parallel.make_mesh(NUM_DEVICES)
  tx = optax.sgd(0.1)
  step = train.make_train_step(c, model, tx)
  state = train.TrainState(jnp.zeros([], jnp.int32), params, tx.init(params))
  state = parallel.replicate(state, mesh)
  step_fn = parallel.jit_train_step(step, mesh, state)
  batch = parallel.global_batch(batches[0], mesh)
  assert batch[0].sharding.spec == parallel.batch_sharding(mesh).spec
  assert len(batch[0].addressable_shards) == NUM_DEVICES
  assert batch[0].addressable_shards[0].data.shape == (B // 8, 4, 4, 3)
  old = state.params["head"]["kernel"]
  new, _ = step_fn(state, batch, jax.random.PRNGKey(0))
  assert old.is_deleted()  # Donated: updated in place.
  assert new.params["head"]["kernel"].sharding.is_fully_replicated


def test_bfloat16_compute_keeps_float32_params():
  model, params, batches = _problem(jnp.float32)
  bf16 = parallel.with_compute_dtype(model, "bfloat16")
  assert parallel.with_compute_dtype(model, "float32") is model
  x, y = batches[0]
  logits = bf16.apply({"params": params}, x)
  ref = model.apply({"params": params}, x)
  assert logits.dtype == jnp.float32
  # bfloat16 has an 8-bit mantissa: relative error ~2^-8 per operation.
  np.testing.assert_allclose(logits, ref, rtol=0.05, atol=0.05)
  assert not np.array_equal(logits, ref)  # It did run in bfloat16.
  obj = models.make_objective(bf16, softmax_cross_entropy)
  loss, grads = sam_gradient(obj, params, (x, y), 0.1)
  assert loss.dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  with pytest.raises(ValueError, match="config.dtype"):
    parallel.with_compute_dtype(model, "float16")


def test_mesh_and_batch_checks():
  assert parallel.make_mesh().shape == {"data": NUM_DEVICES}
  assert parallel.make_mesh(2).shape == {"data": 2}
  with pytest.raises(ValueError, match="num_devices"):
    parallel.make_mesh(NUM_DEVICES + 1)
  with pytest.raises(ValueError, match="config.batch_size"):
    parallel.check_batch_size(12, parallel.make_mesh(), "batch_size")
  assert parallel.process_slice(16) == slice(0, 16)  # One process: all.


def test_maybe_initialize_distributed():
  calls = []
  init = lambda **kw: calls.append(kw)
  assert not parallel.maybe_initialize_distributed(None, {}, init)
  assert not parallel.maybe_initialize_distributed(False, {}, init)
  assert calls == []
  env = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
    "JAX_NUM_PROCESSES": "4",
    "JAX_PROCESS_ID": "2",
  }
  assert parallel.maybe_initialize_distributed(None, env, init)
  assert calls[-1] == dict(
    coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2
  )
  # A TPU pod / SLURM: jax detects everything itself.
  assert parallel.maybe_initialize_distributed(True, {}, init)
  assert calls[-1] == {}
  with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
    parallel.maybe_initialize_distributed(
      True, dict(env, JAX_PROCESS_ID="two"), init
    )


def test_two_processes_equal_one_process(tmp_path):
  """Multi-host on one machine: 2 processes of 4 CPU devices each
  (`jax.distributed` through the JAX_* variables, per-host data slices)
  train like this process on 8 devices, up to float32 reassociation in
  the cross-process all-reduce."""
  import socket
  import subprocess

  import mock_main
  import tensorflow_datasets as tfds

  from sam_jax import train_sharded

  fields = dict(mock_main.TINY, num_epochs=2, checkpoint_every_steps=4)
  c = mock_main.set_fields(label_noise_cifar10.get_config("sam"), fields)
  with tfds.testing.mock_data(num_examples=64):
    ref = train_sharded.train_and_evaluate(c, str(tmp_path / "one"))

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  cmd = mock_main.command(tmp_path / "two", fields)
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
    JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
    JAX_NUM_PROCESSES="2",
  )
  procs = [
    subprocess.Popen(
      cmd,
      env=dict(env, JAX_PROCESS_ID=str(i)),
      cwd=mock_main.ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err.decode()[-3000:]
  two = json.loads((tmp_path / "two" / "summary.json").read_text())
  assert two["devices"]["process_count"] == 2
  assert two["devices"]["device_count"] == 8
  rec = lambda d: [json.loads(x) for x in open(tmp_path / d / "metrics.jsonl")]
  for a, b in zip(rec("one"), rec("two"), strict=True):
    assert a["step"] == b["step"]
    for k in ("test_loss", "train_eval_loss", "head_norm", "train_loss"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5)  # float32 sums.
  assert ref["final_test_accuracy"] == two["final_test_accuracy"]
