"""The image trainer: one seed, the batch sharded over a device mesh.

`train_and_evaluate(config, workdir)` trains `config.method` on CIFAR-10,
CIFAR-100 or Fashion-MNIST (`config.data.name`, read through
`tfds.data_source` by `sam_jax.tfds_data`) on one device, many devices or
many hosts with the same code (`sam_jax.parallel`):

- Data. Every host reads the (small) image split into host memory once and
  draws the same label noise (`sam_jax.data.label_noise`, seeded by
  `config.seed`). The batch order is a pure function of `(seed, epoch)`:
  a permutation of the training set cut into global batches (the last
  partial batch dropped). Each host takes only its slice of each global
  batch (`parallel.process_slice`) and sends it, as uint8 images, to its
  own devices (`parallel.global_batch`); normalisation and augmentation
  (`data.augment`: random crop with padding 4 and horizontal flip) run on
  device inside the jitted step.
- Step. `sam_jax.train.make_train_step` (any method), jitted on the mesh
  with the state replicated and donated and the batch sharded along
  `"data"`. SAM's perturbation comes from the global gradient, or from each
  device's own shard with `config.sam_per_device` (`parallel.per_device`,
  m-SAM with m = batch / devices). `config.dtype = "bfloat16"` runs the
  passes in bfloat16 with float32 parameters (`parallel.ComputeDtype`).
- Keys. Step t uses `fold_in(fold_in(key, 0), t)` for the method's noise
  (inside `make_train_step`) and `fold_in(fold_in(key, 1), t)` for the
  augmentation, `key = PRNGKey(config.seed)`.

Workdir layout:

  config.json      the config (a rerun must match it, see
                   `sam_jax.run_io.IGNORED_FIELDS`)
  metrics.jsonl    one JSON line per evaluation (every `eval_every_epochs`
                   and at the end): epoch, step, seed, train_loss (mean step
                   loss of the epoch's steps run by this invocation),
                   test_accuracy, test_loss, head_norm and, on the first
                   `data.eval_train_examples` training examples (unaugmented),
                   train/clean/noisy/noisy_true accuracy, train_eval_loss and
                   feature_norm (`sam_jax.metrics`)
  checkpoints/     orbax: the train state, the base PRNG key and the data
                   position (epoch, step in epoch, best accuracy so far),
                   every `checkpoint_every_steps` steps, at the end of
                   training and on SIGTERM (one process)
  best/            the parameters at the best test accuracy so far
  summary.json     `sam_jax.metrics.summarize`, status, timings, devices

A run killed at any point (SIGKILL, SIGTERM, preemption) and restarted with
the same command resumes from its latest checkpoint, at the same step of
the same epoch, and ends with the same parameters as an uninterrupted run
(bitwise on CPU: the same programs run on the same data). A non-finite
loss, gradient or parameter stops training with a FloatingPointError naming
the step; checkpoints are only written from finite states.
"""

import pathlib
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sam_jax import data, models, parallel, run_io, tfds_data
from sam_jax import train as train_lib
from sam_jax.objective import softmax_cross_entropy
from sam_jax.train_config import validate_config

Array = jax.Array
ConfigDict = ml_collections.ConfigDict


class ImageData(flax.struct.PyTreeNode):
  """A split in host memory: uint8 images and labels, noisy and true."""

  x: Any  # uint8 [N, H, W, C]: np.ndarray or tfds_data.StreamedImages
  labels: np.ndarray  # int32 [N], trained on (noisy where `noisy`)
  true_labels: np.ndarray  # int32 [N]
  noisy: np.ndarray  # bool [N]


def load_data(config: ConfigDict) -> tuple[ImageData, ImageData]:
  """`(train, test)` of `config.data.name`; label noise on train only.

  With `data.in_memory` the images are read into host memory once;
  otherwise they stay in the files and each host reads only the records of
  its batch slices (`tfds_data.StreamedImages`). Labels are always read.

  Raises:
    FileNotFoundError: the dataset is not prepared under `data.data_dir`.
  """
  d = config.data
  k = tfds_data.NUM_CLASSES[d.name]

  def split(name):
    if d.in_memory:
      return tfds_data.load_tfds(d.name, name, d.data_dir)
    source = tfds_data.open_tfds(d.name, name, d.data_dir)
    return tfds_data.StreamedImages(source), tfds_data.read_labels(source)

  x, y = split("train")
  labels, noisy = data.label_noise(
    y, d.noise_rate, kind=d.noise_kind, num_classes=k, seed=config.seed
  )
  x_test, y_test = split("test")
  clean = np.zeros(len(y_test), bool)
  return ImageData(x, labels, y, noisy), ImageData(
    x_test, y_test, y_test, clean
  )


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The training permutation of `epoch`, a pure function of its inputs."""
  return np.random.default_rng((seed, 1, epoch)).permutation(num_examples)


def make_image_step(
  train_step: Callable, config: ConfigDict
) -> Callable[[Any, tuple[Array, Array], Array], tuple[Any, dict]]:
  """Wraps `train_step` with on-device normalisation and augmentation.

  The step takes uint8 images; `key` is the run's base key.
  """
  mean, std = tfds_data.CHANNEL_STATS[config.data.name]
  crop = 4 if config.data.augment else 0

  def step(state, batch, key):
    x_u8, y = batch
    x = tfds_data.normalize_images(x_u8, mean, std)
    if config.data.augment:
      aug_key = jax.random.fold_in(jax.random.fold_in(key, 1), state.step)
      x = tfds_data.augment(aug_key, x, crop_padding=crop, flip=True)
    return train_step(state, (x, y), jax.random.fold_in(key, 0))

  return step


def make_eval_step(model, config: ConfigDict) -> Callable[..., dict]:
  """`eval_step(params, model_state, x_u8, labels, true, noisy, valid)`.

  Returns sums over the valid examples of a (padded) batch; the host adds
  them up. BatchNorm normalises with its running averages.
  """
  mean, std = tfds_data.CHANNEL_STATS[config.data.name]
  features_fn = models.eval_features_fn(model)

  def eval_step(params, model_state, x_u8, labels, true, noisy, valid):
    x = tfds_data.normalize_images(x_u8, mean, std)
    logits, feats = features_fn(params, x, model_state)
    pred = jnp.argmax(logits, -1)
    w = valid.astype(jnp.float32)
    hit = (pred == labels) * w
    fnorm = jnp.linalg.norm(feats.reshape(feats.shape[0], -1), axis=1)
    return {
      "count": jnp.sum(w),
      "hit": jnp.sum(hit),
      "loss": jnp.sum(softmax_cross_entropy(logits, labels) * w),
      "feature_norm": jnp.sum(fnorm * w),
      "noisy_count": jnp.sum(noisy * w),
      "noisy_hit": jnp.sum(hit * noisy),
      "noisy_true_hit": jnp.sum((pred == true) * noisy * w),
    }

  return eval_step


def evaluate(
  eval_step: Callable, state, ds: ImageData, batch_size: int, mesh
) -> dict[str, float]:
  """Sums of `eval_step` over `ds` in padded global batches, on the host
  (fetched once, after every batch is dispatched)."""
  n = len(ds.labels)
  part = parallel.process_slice(batch_size)
  outs = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)[part]
    valid = idx < n
    idx = np.where(valid, idx, 0)
    local = (ds.x[idx], ds.labels[idx], ds.true_labels[idx], ds.noisy[idx])
    batch = parallel.global_batch(local + (valid,), mesh)
    outs.append(eval_step(state.params, state.model_state, *batch))
  totals: dict[str, float] = {}
  for out in jax.device_get(outs):
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return totals


def _ratio(a: float, b: float) -> float | None:
  return a / b if b else None


def eval_metrics(
  eval_step, state, train: ImageData, test: ImageData, config, mesh
) -> dict[str, Any]:
  """Test accuracy and loss; train-subset accuracies (clean/noisy)."""
  bs, params = config.eval_batch_size, state.params
  t = evaluate(eval_step, state, test, bs, mesh)
  out = {
    "test_accuracy": t["hit"] / t["count"],
    "test_loss": t["loss"] / t["count"],
    "head_norm": float(jnp.linalg.norm(params["head"]["kernel"])),
  }
  m = min(config.data.eval_train_examples, len(train.labels))
  if m:
    sub = jax.tree.map(lambda a: a[:m], train)
    s = evaluate(eval_step, state, sub, bs, mesh)
    clean = s["count"] - s["noisy_count"]
    out.update(
      train_accuracy=s["hit"] / s["count"],
      clean_accuracy=_ratio(s["hit"] - s["noisy_hit"], clean),
      noisy_accuracy=_ratio(s["noisy_hit"], s["noisy_count"]),
      noisy_true_accuracy=_ratio(s["noisy_true_hit"], s["noisy_count"]),
      train_eval_loss=s["loss"] / s["count"],
      feature_norm=s["feature_norm"] / s["count"],
    )
  return out


def check_finite(outs: list[dict], first_step: int, config) -> None:
  """FloatingPointError naming the first step with a non-finite loss or
  gradient norm; `outs[i]` is the output of step `first_step + i`."""
  if not outs:
    return
  loss = np.array([[float(o["loss"]) for o in outs]])
  gnorm = np.array([[float(o["grad_norm"]) for o in outs]])
  bad = train_lib.first_non_finite(loss, gnorm)
  if bad:
    _, i, what = bad
    raise FloatingPointError(
      f"non-finite {what} at step {first_step + i} with "
      f"{train_lib.describe_run(config)}; the last good checkpoint is kept"
    )


_all_finite = jax.jit(train_lib.all_finite)


# Jitted with the model static: flax initialisers are slow to run eagerly.
# On CPU without LLVM's expensive passes: the init runs once, and compiling
# a ResNet's initialisers otherwise takes 5x longer.
_CPU_FAST_COMPILE = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
}


def _init(model, key: Array, x: Array):
  options = _CPU_FAST_COMPILE if jax.default_backend() == "cpu" else None
  init = jax.jit(models.init, static_argnums=0, compiler_options=options)
  return init(model, key, x)


def init_state(model, tx, key: Array, x_sample: Array, mesh):
  """The replicated initial state (parameters from `fold_in(key, 2)`)."""
  params, model_state = _init(model, jax.random.fold_in(key, 2), x_sample)
  step = jnp.zeros([], jnp.int32)
  state = train_lib.TrainState(step, params, tx.init(params), model_state)
  return parallel.replicate(state, mesh)


def _checkpoint_tree(state, key_data) -> dict:
  # A device copy: the state's buffers are donated to the next step while
  # orbax may still be writing asynchronously.
  return {"state": jax.tree.map(jnp.copy, state), "rng": key_data}


def _seconds_per_step(t_first, first_done: int, last_step: int):
  """Wall seconds per step since `t_first`, when `first_done` steps were
  done, to now, `last_step + 1` steps done; None if no step since."""
  steps = last_step + 1 - first_done
  if t_first is None or steps <= 0:
    return None
  return (time.perf_counter() - t_first) / steps


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains one seed of `config.method` on an image dataset.

  Returns:
    The summary written to `<workdir>/summary.json`: best / final test
    accuracy (`sam_jax.metrics.summarize`), status, label, method,
    `runtime_s` (this invocation), `step_s` (wall seconds per training
    step of this invocation after its first, which compiles; evaluation
    and checkpoints included),
    `steps_per_epoch`, devices and the config. Status is "preempted" when a
    SIGTERM stopped the run after a checkpoint.

  Raises:
    ValueError: a bad config (before training), or a workdir holding a run
      with another config.
    FileNotFoundError: the dataset is not prepared.
    FloatingPointError: a non-finite loss, gradient or parameter.
  """
  validate_config(config)
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  with run_io.lock_workdir(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ConfigDict, workdir: pathlib.Path) -> dict:
  t0 = time.perf_counter()
  run_io.check_workdir_config(workdir, config)
  mesh = parallel.make_mesh(config.num_devices)
  parallel.check_batch_size(config.batch_size, mesh, "batch_size")
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  parallel.process_slice(config.batch_size)  # Raises if hosts cannot split.
  parallel.process_slice(config.eval_batch_size)
  if config.sam_per_device and config.group_size is not None:
    per = config.batch_size // mesh.shape[parallel.DATA]
    if per % config.group_size:
      raise ValueError(
        f"config.group_size={config.group_size} must divide the per-device "
        f"batch {per} (config.sam_per_device)"
      )

  train, test = load_data(config)
  n, batch_size = len(train.labels), config.batch_size
  if batch_size > n:
    raise ValueError(
      f"config.batch_size={batch_size} exceeds the {n} training examples"
    )
  steps_per_epoch = n // batch_size
  num_steps = config.num_epochs * steps_per_epoch
  k = tfds_data.NUM_CLASSES[config.data.name]
  model = parallel.with_compute_dtype(
    train_lib.make_model(config, k), config.dtype
  )
  tx = train_lib.make_optimizer(config, steps_per_epoch)
  key = jax.random.PRNGKey(config.seed)
  mean, std = tfds_data.CHANNEL_STATS[config.data.name]
  x_sample = tfds_data.normalize_images(train.x[:1], mean, std)
  state = init_state(model, tx, key, x_sample, mesh)

  ckpt = run_io.checkpoint_manager(workdir / "checkpoints", max_to_keep=2)
  best_ckpt = run_io.checkpoint_manager(workdir / "best", max_to_keep=1)
  key_data = np.asarray(key)
  meta = {"best_accuracy": -1.0}
  like = {"state": state, "rng": key_data}  # Shapes only: no copy.
  metrics_path = workdir / "metrics.jsonl"
  # The steps the loop evaluates at (ends of the evaluation epochs).
  due = [e * steps_per_epoch for e in run_io.evaluation_epochs(config)]
  covered = run_io.metrics_cover(metrics_path, due, "step", [config.seed])
  start, restored = run_io.restore_latest(
    ckpt, like, newest=covered, meta=ocp.args.JsonRestore()
  )
  if start:
    state, meta = restored.tree["state"], restored.meta
    key_data = np.asarray(restored.tree["rng"])
  for later in [s for s in best_ckpt.all_steps() if s > start]:
    best_ckpt.delete(later)  # From after the checkpoint: it is redone.
  run_io.drop_records_after(metrics_path, start, "step")

  wrap = None
  if config.sam_per_device:
    wrap = lambda fn: parallel.per_device(fn, mesh)
  train_step = train_lib.make_train_step(config, model, tx, wrap_grad_fn=wrap)
  step_fn = parallel.jit_train_step(
    make_image_step(train_step, config), mesh, state
  )
  eval_step = jax.jit(make_eval_step(model, config))
  part = parallel.process_slice(batch_size)
  key = parallel.replicate(jnp.asarray(key_data), mesh)

  def save(step: int, epoch: int) -> None:
    if not bool(_all_finite(state.params)):
      raise FloatingPointError(
        f"non-finite parameters after step {step} (epoch {epoch}) with "
        f"{config.method}; the last good checkpoint is kept"
      )
    m = dict(meta, step=step, epoch=step // steps_per_epoch)
    m["step_in_epoch"] = step % steps_per_epoch
    run_io.save_checkpoint(
      ckpt,
      step,
      ocp.args.Composite(
        tree=ocp.args.StandardSave(_checkpoint_tree(state, key_data)),
        meta=ocp.args.JsonSave(m),
      ),
    )

  bar = run_io.progress_bar(config, range(start, num_steps), start)
  status, outs, step = "ok", [], start
  t_first, first_step = None, start  # Timing starts after the first step.
  try:
    with run_io.Preemption() as preemption:
      for step in bar:
        epoch, t = divmod(step, steps_per_epoch)
        if t == 0 or step == start:
          order = epoch_order(config.seed, epoch + 1, n)
        idx = order[t * batch_size : (t + 1) * batch_size][part]
        batch = parallel.global_batch((train.x[idx], train.labels[idx]), mesh)
        state, out = step_fn(state, batch, key)
        outs.append(out)
        done = step + 1
        end_of_epoch = done % steps_per_epoch == 0
        evaluate_now = end_of_epoch and done in due
        stop = preemption.requested or ckpt.reached_preemption(done)
        save_now = (
          done % config.checkpoint_every_steps == 0 or done == num_steps or stop
        )
        if save_now or end_of_epoch:  # (evaluate_now implies end_of_epoch)
          outs = jax.device_get(outs)  # One fetch; later reads are free.
          check_finite(outs, done - len(outs) + 1, config)
        if evaluate_now:
          ep = done // steps_per_epoch
          m = eval_metrics(eval_step, state, train, test, config, mesh)
          m["train_loss"] = float(np.mean([float(o["loss"]) for o in outs]))
          rec = dict(epoch=ep, step=done, seed=config.seed, **m)
          run_io.write_records(metrics_path, [rec], "a")
          bar.set_postfix({"test_accuracy": m["test_accuracy"]})
          if m["test_accuracy"] > meta["best_accuracy"]:
            meta = dict(best_accuracy=m["test_accuracy"], best_step=done)
            if done not in best_ckpt.all_steps():
              run_io.save_checkpoint(
                best_ckpt,
                done,
                ocp.args.StandardSave(jax.tree.map(jnp.copy, state.params)),
              )
        if end_of_epoch:
          outs = []
        if save_now:
          save(done, epoch + 1)
        if t_first is None:
          jax.block_until_ready(out)
          t_first, first_step = time.perf_counter(), done
        if stop and done < num_steps:
          status = "preempted"
          break
  finally:
    run_io.close_checkpoints(ckpt, best_ckpt)
    bar.close()

  return run_io.write_summary(
    workdir,
    config,
    "test",
    t0,
    status,
    step_s=_seconds_per_step(t_first, first_step, step),
    steps_per_epoch=steps_per_epoch,
    best_checkpoint_step=meta.get("best_step"),
    devices=parallel.devices_summary(mesh),
  )
