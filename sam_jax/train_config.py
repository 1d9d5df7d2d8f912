"""Checks of a training config, run before anything trains.

`validate_config(config)` raises a `ConfigError` (a ValueError) naming the
first bad field
(`config.rho`, `config.data.noise_rate`, ...), so a sweep fails at once
rather than after hours. Method-specific fields are checked by the method's
own validator (`sam_jax.methods.register(name, validate=...)`).
"""

import math
from typing import Any

import ml_collections

from sam_jax import activations, curvature_log, methods, parallel, tfds_data

ConfigDict = ml_collections.ConfigDict


def activation(config: ConfigDict):
  try:
    return activations.get(config.model.activation, config.model.beta)
  except ValueError as e:
    raise ValueError(f"config.model.activation / config.model.beta: {e}") from e


def _check(ok: bool, field: str, value: Any, want: str) -> None:
  if not ok:
    raise ValueError(f"config.{field} must be {want}, got {value!r}")


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
  return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


# Image datasets read through tfds.data_source (`sam_jax.tfds_data`) and
# trained by `sam_jax.train_sharded`.
TFDS_DATASETS = tuple(tfds_data.NUM_CLASSES)
COMPUTE_DTYPES = tuple(parallel.DTYPES)


def _validate_tfds(config: ConfigDict) -> None:
  """Fields of the sharded image trainer (`sam_jax.train_sharded`)."""
  d = config.data
  _check(
    d.data_dir is None or isinstance(d.data_dir, str),
    "data.data_dir",
    d.data_dir,
    "None or a path",
  )
  _check(isinstance(d.augment, bool), "data.augment", d.augment, "a bool")
  _check(isinstance(d.in_memory, bool), "data.in_memory", d.in_memory, "a bool")
  _check(
    _is_int(d.eval_train_examples) and d.eval_train_examples >= 0,
    "data.eval_train_examples",
    d.eval_train_examples,
    "an int >= 0",
  )
  n = config.num_devices
  _check(
    n is None or (_is_int(n) and n > 0),
    "num_devices",
    n,
    "None (all devices) or a positive int",
  )
  _check(
    isinstance(config.sam_per_device, bool),
    "sam_per_device",
    config.sam_per_device,
    "a bool",
  )
  _check(
    config.dtype in COMPUTE_DTYPES, "dtype", config.dtype, str(COMPUTE_DTYPES)
  )
  seeds = config.num_seeds
  _check(seeds == 1, "num_seeds", seeds, "1 (one seed per run)")
  v = config.checkpoint_every_steps
  _check(_is_int(v) and v > 0, "checkpoint_every_steps", v, "a positive int")


def _validate_mnist1d(config: ConfigDict) -> None:
  d = config.data
  _check(
    _is_int(d.num_samples) and d.num_samples >= 10 and d.num_samples % 10 == 0,
    "data.num_samples",
    d.num_samples,
    "a positive multiple of 10",
  )
  _check(
    _is_num(d.test_fraction) and 0 < d.test_fraction < 1,
    "data.test_fraction",
    d.test_fraction,
    "in (0, 1)",
  )
  _check(
    _is_num(d.val_fraction) and 0 <= d.val_fraction < 1,
    "data.val_fraction",
    d.val_fraction,
    "in [0, 1)",
  )
  v = config.checkpoint_every_epochs
  _check(_is_int(v) and v > 0, "checkpoint_every_epochs", v, "a positive int")
  n = num_train_examples(config)
  _check(
    config.batch_size <= n,
    "batch_size",
    config.batch_size,
    f"at most the {n} training examples",
  )


def num_train_examples(config: ConfigDict) -> int:
  """Training-set size implied by `config.data` (after the val split)."""
  d = config.data
  n = d.num_samples - int(round(d.test_fraction * d.num_samples))
  return n - int(round(d.val_fraction * n)) if d.val_fraction else n


class ConfigError(ValueError):
  """A bad config value, named (`config.rho must be ...`): the user's
  mistake, which `python -m experiments.main` prints as one line."""


def validate_config(config: ConfigDict) -> None:
  """Checks a training config before anything runs.

  Raises:
    ConfigError: (a ValueError) naming the first bad field, e.g.
      `config.rho`, also for the checks of the method's own validator.
  """
  try:
    _validate(config)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _validate(config: ConfigDict) -> None:
  d, m = config.data, config.model
  names = ("mnist1d",) + TFDS_DATASETS
  _check(d.name in names, "data.name", d.name, f"one of {names}")
  _check(
    _is_num(d.noise_rate) and 0 <= d.noise_rate < 1,
    "data.noise_rate",
    d.noise_rate,
    "in [0, 1)",
  )
  kinds = ("symmetric", "asymmetric")
  _check(d.noise_kind in kinds, "data.noise_kind", d.noise_kind, str(kinds))
  model_names = ("cnn1d", "mlp", "resnet18", "wrn")
  _check(m.name in model_names, "model.name", m.name, f"one of {model_names}")
  activation(config)
  curvature_log.resolve_config(config.get("curvature"))
  for field in ("channels", "dense"):
    v = m[field]
    _check(
      all(_is_int(c) and c > 0 for c in v),
      f"model.{field}",
      v,
      "a sequence of positive ints",
    )
  _check(
    _is_int(m.kernel_size) and m.kernel_size > 0,
    "model.kernel_size",
    m.kernel_size,
    "a positive int",
  )
  _check(config.optimizer == "sgd", "optimizer", config.optimizer, "'sgd'")
  _check(
    _is_num(config.learning_rate) and config.learning_rate > 0,
    "learning_rate",
    config.learning_rate,
    "a finite number > 0",
  )
  _check(
    _is_num(config.momentum) and 0 <= config.momentum < 1,
    "momentum",
    config.momentum,
    "in [0, 1)",
  )
  _check(
    _is_num(config.weight_decay) and config.weight_decay >= 0,
    "weight_decay",
    config.weight_decay,
    "a finite number >= 0",
  )
  schedules = ("constant", "cosine")
  _check(
    config.schedule in schedules, "schedule", config.schedule, str(schedules)
  )
  for field in (
    "batch_size",
    "num_epochs",
    "num_seeds",
    "eval_every_epochs",
    "eval_batch_size",
  ):
    v = config[field]
    _check(_is_int(v) and v > 0, field, v, "a positive int")
  _check(_is_int(config.seed), "seed", config.seed, "an int")
  _check(
    _is_num(config.rho) and config.rho >= 0,
    "rho",
    config.rho,
    "a finite number >= 0",
  )
  if d.name == "mnist1d":
    _validate_mnist1d(config)
  else:
    _validate_tfds(config)
  methods.validate(config)
