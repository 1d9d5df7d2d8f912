"""The trainer: one pure step for every method, several seeds as one program.

  state, metrics = train_step(state, batch, key)     # pure, any method

`make_train_step` builds the step from a config: the method (`sgd`, `sam`,
`l-sam`, `j-sam`, `sgd+reg`, ... see `sam_jax.methods`) gives the gradient,
momentum SGD (+ weight decay, optional cosine schedule) applies it. The step
key is `fold_in(key, state.step)`.

`train_and_evaluate(config, workdir)` runs the label-noise study on MNIST-1D:
`config.num_seeds` seeds train as one vmapped program (params, optimizer
state, keys and noisy labels stacked on a leading seed axis): the vmapped
step is jitted once with donated state and dispatched step by step; batches
are gathered on device from a per-seed permutation per epoch. Seed i uses the
integer `config.seed + i` for its init, batch order, step keys and label
noise. An image dataset (`config.data.name` cifar10, cifar100 or
fashion_mnist) goes to `sam_jax.train_sharded` instead: one seed, the batch
sharded over the devices (and hosts).

Workdir layout:

  config.json      the config (a rerun must match it, see
                   `sam_jax.run_io.IGNORED_FIELDS`)
  metrics.jsonl    one JSON line per evaluated epoch per seed: epoch, step,
                   seed, train_loss (mean step loss of the epoch, noisy
                   labels) and the quantities of `sam_jax.metrics`
  checkpoints/     orbax checkpoints of the stacked state, named by epoch,
                   every `checkpoint_every_epochs` and at the end
  summary.json     `sam_jax.metrics.summarize` + status and config
  curvature.jsonl  with `config.curvature.every_epochs > 0`: one JSON line
                   per logging event per seed (`sam_jax.curvature_log`):
                   epoch, step, seed, seconds (the event, all seeds), the
                   top Ritz values and traces of H, GN and NME on a fixed
                   set of training batches (each seed's training labels)

A rerun with the same workdir resumes from the latest checkpoint and gives
the same result as an uninterrupted run. A non-finite loss, gradient or
parameter stops training with a FloatingPointError naming the step, epoch
and seed; checkpoints are only written from finite states.
"""

import functools
import pathlib
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from sam_jax import curvature_log, data, methods, metrics, models, run_io
from sam_jax.objective import Batch, Params, softmax_cross_entropy
from sam_jax.sam import global_norm
from sam_jax.train_config import activation, validate_config

Array = jax.Array
ConfigDict = ml_collections.ConfigDict


class TrainState(flax.struct.PyTreeNode):
  """Step count, parameters, optimizer state and model state.

  `model_state` holds the non-parameter collections of the model (BatchNorm
  running averages, see `sam_jax.models.init`); `{}` for stateless models.
  One seed, or stacked on a leading seed axis.
  """

  step: Array  # int32 [] (or [S])
  params: Params
  opt_state: optax.OptState
  model_state: dict = flax.struct.field(default_factory=dict)


def make_optimizer(config: ConfigDict, steps_per_epoch: int):
  """Momentum SGD with coupled weight decay and an optional cosine decay."""
  lr = config.learning_rate
  if config.schedule == "cosine":
    lr = optax.cosine_decay_schedule(lr, config.num_epochs * steps_per_epoch)
  momentum = config.momentum or None
  return optax.chain(
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(lr, momentum=momentum),
  )


def _residual_net(m: ConfigDict, num_classes: int, act):
  """ResNet-18 / WideResNet from `config.model` (fields with defaults)."""
  norm = m.get("norm", "batch")
  if norm not in models.NORMS:
    raise ValueError(
      f"config.model.norm must be one of {models.NORMS}, got {norm!r}"
    )

  def positive_int(field, default):
    value = m.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(
        f"config.model.{field} must be an int >= 1, got {value!r}"
      )
    return value

  net = dict(
    num_classes=num_classes,
    norm=norm,
    activation=act,
    num_groups=positive_int("num_groups", 32),
  )
  if m.name == "resnet18":
    w = positive_int("width", 64)
    return models.ResNet18(widths=(w, 2 * w, 4 * w, 8 * w), **net)
  return models.WideResNet(
    depth=positive_int("depth", 28),
    widen_factor=positive_int("widen_factor", 10),
    **net,
  )


def make_model(config: ConfigDict, num_classes: int):
  """The flax model of `config.model`.

  `cnn1d`, `mlp`; `resnet18` (fields `norm` in batch/layer/group, default
  batch; `width`, the first stage's width, default 64; `num_groups` for
  GroupNorm, default 32) and `wrn` (WideResNet: `depth` 28, `widen_factor`
  10, `norm`, `num_groups`).
  """
  m = config.model
  act = activation(config)
  if m.name in ("resnet18", "wrn"):
    return _residual_net(m, num_classes, act)
  if m.name == "cnn1d":
    return models.CNN1D(
      channels=tuple(m.channels),
      kernel_size=m.kernel_size,
      dense=tuple(m.dense),
      num_classes=num_classes,
      activation=act,
    )
  if m.name == "mlp":
    return models.MLP(
      features=tuple(m.dense), num_classes=num_classes, activation=act
    )
  raise ValueError(f"config.model.name: unknown model {m.name!r}")


def make_train_step(
  config: ConfigDict,
  model,
  tx: optax.GradientTransformation,
  loss_fn: Callable[[Array, Array], Array] = softmax_cross_entropy,
  wrap_grad_fn: Callable[[Callable], Callable] | None = None,
) -> Callable[[TrainState, Batch, Array], tuple[TrainState, dict]]:
  """`train_step(state, batch, key) -> (state, {"loss", "grad_norm"})`.

  Pure (jit and vmap it); `loss` is the clean data loss before the update.
  `wrap_grad_fn` optionally wraps the method's gradient function, e.g.
  `sam_jax.parallel.per_device` for a per-device SAM perturbation.

  Model state (BatchNorm): every method's gradient uses batch statistics
  and never reads the running averages; they are moved once per step by
  the statistics of the clean training-mode pass at the unperturbed
  `params` on the step's batch, so SAM's perturbed pass (or weight noise,
  ...) never changes them. That pass is the one the method's gradient runs
  anyway (`methods.make_state_grad_fn`): no forward pass is repeated. Only
  m-SAM, plug-in methods and a wrapped gradient function (per-device SAM:
  its clean passes see one device's shard) take the state from a separate
  clean pass (`models.update_state`). Stateless models run the method's
  gradient alone.
  """
  if wrap_grad_fn is None:
    state_grad_fn = methods.make_state_grad_fn(config, model, loss_fn)
  else:
    grad_fn = wrap_grad_fn(methods.make_grad_fn(config, model, loss_fn))

    def state_grad_fn(params, batch, key, model_state):
      loss, grads = grad_fn(params, batch, key)
      return (
        loss,
        grads,
        models.update_state(model, params, model_state, batch[0]),
      )

  def train_step(state: TrainState, batch: Batch, key: Array):
    key = jax.random.fold_in(key, state.step)
    loss, grads, model_state = state_grad_fn(
      state.params, batch, key, state.model_state
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      model_state=model_state,
    )
    return new, {"loss": loss, "grad_norm": global_norm(grads)}

  return train_step


# Jitted with the (hashable) model static, so that runs of the same model in
# one process compile it once: flax's initialisers take seconds to compile.
_init_params = jax.jit(models.init_params, static_argnums=0)


def init_states(model, tx, keys_S: Array, x_sample: Array) -> TrainState:
  """Stacked initial states; seed s initialises from `fold_in(keys_S[s], 0)`.

  One compiled init run S times, then stacked: on CPU, compiling the
  vmapped init is several times slower than this.
  """
  params = [
    _init_params(model, jax.random.fold_in(k, 0), x_sample) for k in keys_S
  ]
  params = jax.tree.map(lambda *a: jnp.stack(a), *params)
  steps = jnp.zeros((keys_S.shape[0],), jnp.int32)
  return TrainState(steps, params, jax.vmap(tx.init)(params))


@functools.lru_cache(maxsize=8)
def _eval_fn(model, chunk: int, split: str):
  evaluate = metrics.make_evaluate(
    models.features_fn(model), softmax_cross_entropy, chunk, split
  )
  return jax.jit(
    jax.vmap(evaluate, in_axes=(0, (None, 0, None, 0), (None, 0, None)))
  )


def make_seeds_step(train_step):
  """`step(states, keys_S, x_N, labels_SxN, idx_SxTxB, t) -> (states, out)`.

  `train_step` vmapped over seeds; seed s trains on the batch
  `idx_SxTxB[s, t]` of the shared inputs `x_N` with its own labels, and
  step keys from `fold_in(keys_S[s], 2)`.
  """

  def one_seed(state, key, x_N, labels_N, idx_TxB, t):
    batch = data.take_batch((x_N, labels_N), idx_TxB[t])
    return train_step(state, batch, jax.random.fold_in(key, 2))

  return jax.vmap(one_seed, in_axes=(0, 0, None, 0, 0, None))


def epoch_batches(
  keys_S: Array, num_examples: int, batch_size: int, epoch: Array
) -> Array:
  """Each seed's batches for `epoch`: idx [S, T, B] from
  `fold_in(fold_in(key, 1), epoch)`."""

  def one_seed(key):
    order_key = jax.random.fold_in(jax.random.fold_in(key, 1), epoch)
    return data.epoch_permutation_batches(order_key, num_examples, batch_size)

  return jax.vmap(one_seed)(keys_S)


def all_finite(params: Params) -> Array:
  """bool []: whether every entry of every leaf of `params` is finite."""
  return jnp.all(
    jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])
  )


# Module level, so that runs in one process share their compilations.
_batches_fn = jax.jit(epoch_batches, static_argnums=(1, 2))
_finite_fn = jax.jit(jax.vmap(all_finite))


def make_epoch_fn(train_step, num_examples: int, batch_size: int):
  """`epoch_fn(states, keys_S, x_N, labels_SxN, epoch) -> (states, out)`.

  One epoch for all seeds: a Python loop over the jitted, vmapped step with
  donated state (XLA:CPU runs a `lax.scan` of this step ~20x slower than
  the same steps dispatched one by one). `out` holds per-step `loss` and
  `grad_norm` [S, T] and `params_finite` [S] as NumPy arrays; the host waits
  once per epoch.
  """
  step_fn = jax.jit(make_seeds_step(train_step), donate_argnums=0)
  steps = num_examples // batch_size

  def epoch_fn(states, keys_S, x_N, labels_SxN, epoch):
    idx_SxTxB = _batches_fn(keys_S, num_examples, batch_size, epoch)
    outs = []
    for t in range(steps):
      states, out = step_fn(states, keys_S, x_N, labels_SxN, idx_SxTxB, t)
      outs.append(out)
    out = {k: np.stack([np.asarray(o[k]) for o in outs], 1) for k in outs[0]}
    out["params_finite"] = np.asarray(_finite_fn(states.params))
    return states, out

  return epoch_fn


class NoisyData(flax.struct.PyTreeNode):
  """Training set with per-seed noisy labels, and the evaluation split."""

  x_train: Array  # [N, L]
  labels: Array  # int32 [S, N], the (noisy) labels trained on
  true_labels: Array  # int32 [N]
  noisy: Array  # bool [S, N], noise mask
  x_eval: Array  # [M, L]
  eval_labels: Array  # int32 [S, M] (noisy for a val split)
  eval_true_labels: Array  # int32 [M]
  split: str = flax.struct.field(pytree_node=False, default="test")


@functools.lru_cache(maxsize=2)
def _mnist1d(num_samples: int, seed: int, test_fraction: float):
  # Generating 5000 examples takes seconds; the main job reuses them.
  return data.load_mnist1d(num_samples, seed, test_fraction)


def load_data(config: ConfigDict, seeds: list[int]) -> NoisyData:
  """MNIST-1D with label noise drawn per seed (`label_noise(seed=seed)`).

  With `data.val_fraction > 0` the evaluation split is a validation set
  carved from the training set (split seeded by `data.seed`, the same for
  all seeds) and the test set is not touched; its labels carry the same
  noise as training, since in practice only noisy labels are available.
  """
  d = config.data
  raw = _mnist1d(d.num_samples, d.seed, d.test_fraction)
  x, y = raw["x_train"], raw["y_train"]
  k = data.MNIST1D_NUM_CLASSES
  noisy = [
    data.label_noise(
      y, d.noise_rate, kind=d.noise_kind, num_classes=k, seed=int(s)
    )
    for s in seeds
  ]
  labels = np.stack([n[0] for n in noisy])
  mask = np.stack([n[1] for n in noisy])
  if d.val_fraction:
    tr, va = data.split_indices(len(y), d.val_fraction, d.seed)
    return NoisyData(
      jnp.asarray(x[tr]),
      jnp.asarray(labels[:, tr]),
      jnp.asarray(y[tr]),
      jnp.asarray(mask[:, tr]),
      jnp.asarray(x[va]),
      jnp.asarray(labels[:, va]),
      jnp.asarray(y[va]),
      split="val",
    )
  y_test = np.broadcast_to(raw["y_test"], (len(seeds),) + raw["y_test"].shape)
  return NoisyData(
    jnp.asarray(x),
    jnp.asarray(labels),
    jnp.asarray(y),
    jnp.asarray(mask),
    jnp.asarray(raw["x_test"]),
    jnp.asarray(y_test),
    jnp.asarray(raw["y_test"]),
    split="test",
  )


def _host_copy(tree: Any) -> Any:
  # A real copy: the device buffers are donated to the next epoch while
  # orbax may still be writing asynchronously.
  return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def first_non_finite(loss_SxT, grad_norm_SxT) -> tuple[int, int, str] | None:
  """`(s, t, "loss" or "gradient")`: the earliest step t at which a seed s
  (the first such) had a non-finite loss or gradient norm; None if none."""
  loss = np.asarray(loss_SxT)
  bad = ~(np.isfinite(loss) & np.isfinite(np.asarray(grad_norm_SxT)))
  if not bad.any():
    return None
  t = int(np.nonzero(bad.any(0))[0][0])
  s = int(np.nonzero(bad[:, t])[0][0])
  return s, t, "loss" if not np.isfinite(loss[s, t]) else "gradient"


def describe_run(config: ConfigDict) -> str:
  """`method (lr=..., rho=...)`, for error messages."""
  return f"{config.method} (lr={config.learning_rate}, rho={config.rho})"


def _raise_non_finite(out: dict, config: ConfigDict, epoch: int, seeds):
  """Raises FloatingPointError naming the first bad step, if there is one."""
  finite = np.asarray(out["params_finite"])
  steps = np.shape(out["loss"])[1]
  where = describe_run(config)
  bad = first_non_finite(out["loss"], out["grad_norm"])
  if bad:
    s, t, what = bad
    step = (epoch - 1) * steps + t + 1
    raise FloatingPointError(
      f"non-finite {what} at step {step} (epoch {epoch}, seed {seeds[s]}) "
      f"with {where}; the last good checkpoint is kept"
    )
  if not finite.all():
    s = int(np.argmin(finite))
    raise FloatingPointError(
      f"non-finite parameters after step {epoch * steps} (epoch {epoch}, "
      f"seed {seeds[s]}) with {where}; the last good checkpoint is kept"
    )


@functools.lru_cache(maxsize=8)
def _curvature_fn(model, curvature_items: tuple):
  # Cached: runs of one process with the same model (e.g. a sweep over
  # methods) share one compiled logging function.
  obj = models.make_objective(model, softmax_cross_entropy)
  return curvature_log.make_curvature_fn(
    obj, dict(curvature_items), stacked_seeds=True
  )


def _curvature_logger(config, model, ds, seeds, workdir, start, steps):
  """`log(params_S, epoch, last)`: appends to curvature.jsonl when due.

  Off (a no-op) unless `config.curvature.every_epochs > 0`. The evaluation
  set is the first `num_batches * batch_size` training examples with each
  seed's training labels; the key is fixed, so events differ only by params.
  Epoch 0 (the initialisation) is logged too.
  """
  cc = curvature_log.resolve_config(config.get("curvature"))
  path = workdir / "curvature.jsonl"
  run_io.drop_records_after(path, start, "epoch")
  if not cc.every_epochs:
    return lambda params, epoch, last: None
  n = cc.num_batches * cc.batch_size
  if n > ds.x_train.shape[0]:
    raise ValueError(
      f"config.curvature: num_batches * batch_size = {n} exceeds the "
      f"{ds.x_train.shape[0]} training examples"
    )
  shape = (cc.num_batches, cc.batch_size)
  x = ds.x_train[:n].reshape(shape + ds.x_train.shape[1:])
  y = ds.labels[:, :n].reshape((len(seeds),) + shape)
  fn = _curvature_fn(model, tuple(sorted(cc.items())))
  keys = jax.random.split(jax.random.PRNGKey(config.seed), len(seeds))

  def log(params, epoch, last):
    if epoch % cc.every_epochs and not last:
      return
    t = time.perf_counter()
    stats = jax.block_until_ready(fn(params, (x, y), keys))
    recs = metrics.to_records(
      stats,
      seeds,
      epoch=epoch,
      step=epoch * steps,
      seconds=time.perf_counter() - t,
    )
    run_io.write_records(path, recs, "a")

  return log


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config.num_seeds` seeds of `config.method`, evaluating per epoch.

  Returns:
    The summary written to `<workdir>/summary.json`: per-seed best / final
    evaluation accuracy (`sam_jax.metrics.summarize`), `status`, `method`,
    `label`, `runtime_s` (this invocation, compilation included), `epoch_s`
    (median seconds per epoch of this invocation, the first excluded) and
    the config.

  Raises:
    ValueError: a bad config (before training), or a workdir holding a run
      with another config.
    FloatingPointError: a non-finite loss, gradient or parameter.
  """
  if config.data.name != "mnist1d":  # Image datasets: one seed, sharded.
    from sam_jax import train_sharded

    return train_sharded.train_and_evaluate(config, workdir)
  validate_config(config)
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  with run_io.lock_workdir(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ConfigDict, workdir: pathlib.Path) -> dict:
  run_io.check_workdir_config(workdir, config)
  t0 = time.perf_counter()
  seeds = [config.seed + i for i in range(config.num_seeds)]
  ds = load_data(config, seeds)
  n, batch_size = ds.x_train.shape[0], config.batch_size
  steps_per_epoch = n // batch_size
  model = make_model(config, data.MNIST1D_NUM_CLASSES)
  tx = make_optimizer(config, steps_per_epoch)
  keys_S = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds))
  states = init_states(model, tx, keys_S, ds.x_train[:1])

  ckpt = run_io.checkpoint_manager(workdir / "checkpoints", max_to_keep=2)
  metrics_path = workdir / "metrics.jsonl"
  due = run_io.evaluation_epochs(config)  # The loop evaluates at these.
  covered = run_io.metrics_cover(metrics_path, due, "epoch", seeds)
  start, restored = run_io.restore_latest(ckpt, states, newest=covered)
  if start:
    states = restored
  # Drop metrics past the checkpoint: those epochs are run again.
  run_io.drop_records_after(metrics_path, start, "epoch")
  log_curvature = _curvature_logger(
    config, model, ds, seeds, workdir, start, steps_per_epoch
  )
  if not start:
    log_curvature(states.params, 0, False)

  train_step = make_train_step(config, model, tx)
  epoch_fn = make_epoch_fn(train_step, n, batch_size)
  eval_fn = _eval_fn(model, config.eval_batch_size, ds.split)
  train_set = (ds.x_train, ds.labels, ds.true_labels, ds.noisy)
  eval_set = (ds.x_eval, ds.eval_labels, ds.eval_true_labels)
  acc_key = f"{ds.split}_accuracy"
  bar = run_io.progress_bar(
    config, range(start + 1, config.num_epochs + 1), start
  )
  epoch_times, status = [], "ok"
  # SIGTERM: the epoch ends, is checkpointed, and the run stops.
  with run_io.Preemption() as preemption:
    try:
      for epoch in bar:
        t_epoch = time.perf_counter()
        states, out = epoch_fn(states, keys_S, ds.x_train, ds.labels, epoch)
        _raise_non_finite(out, config, epoch, seeds)
        stop = preemption.requested
        last = epoch == config.num_epochs
        if epoch in due:
          m = eval_fn(states.params, train_set, eval_set)
          m["train_loss"] = jnp.mean(out["loss"], axis=1)
          recs = metrics.to_records(
            m, seeds, epoch=epoch, step=epoch * steps_per_epoch
          )
          run_io.write_records(metrics_path, recs, "a")
          bar.set_postfix({acc_key: np.mean([r[acc_key] for r in recs])})
        if epoch % config.checkpoint_every_epochs == 0 or last or stop:
          run_io.save_checkpoint(
            ckpt, epoch, ocp.args.StandardSave(_host_copy(states))
          )
        epoch_times.append(time.perf_counter() - t_epoch)
        log_curvature(states.params, epoch, last)
        if stop and epoch < config.num_epochs:
          status = "preempted"  # Checkpointed above: a rerun resumes here.
          break
    finally:
      run_io.close_checkpoints(ckpt)
      bar.close()

  return run_io.write_summary(
    workdir,
    config,
    ds.split,
    t0,
    status,
    # Median epoch (train, eval, checkpoint) after the first, which compiles.
    epoch_s=float(np.median(epoch_times[1:])) if epoch_times[1:] else None,
    steps_per_epoch=steps_per_epoch,
  )
