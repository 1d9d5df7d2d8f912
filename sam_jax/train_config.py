"""Checks of a training config, run before anything trains.

`validate_config(config)` raises a ValueError naming the first bad field
(`config.rho`, `config.data.noise_rate`, ...), so a sweep fails at once
rather than after hours. Method-specific fields are checked by the method's
own validator (`sam_jax.methods.register(name, validate=...)`).
"""

import math
from typing import Any

import ml_collections

from sam_jax import activations, methods

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


def num_train_examples(config: ConfigDict) -> int:
  """Training-set size implied by `config.data` (after the val split)."""
  d = config.data
  n = d.num_samples - int(round(d.test_fraction * d.num_samples))
  return n - int(round(d.val_fraction * n)) if d.val_fraction else n


def validate_config(config: ConfigDict) -> None:
  """Checks a training config before anything runs.

  Raises:
    ValueError: naming the first bad field, e.g. `config.rho`.
  """
  d, m = config.data, config.model
  _check(d.name == "mnist1d", "data.name", d.name, "'mnist1d'")
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
  _check(
    _is_num(d.noise_rate) and 0 <= d.noise_rate < 1,
    "data.noise_rate",
    d.noise_rate,
    "in [0, 1)",
  )
  kinds = ("symmetric", "asymmetric")
  _check(d.noise_kind in kinds, "data.noise_kind", d.noise_kind, str(kinds))
  _check(m.name in ("cnn1d", "mlp"), "model.name", m.name, "'cnn1d' or 'mlp'")
  activation(config)
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
    "checkpoint_every_epochs",
  ):
    v = config[field]
    _check(_is_int(v) and v > 0, field, v, "a positive int")
  _check(_is_int(config.seed), "seed", config.seed, "an int")
  n = num_train_examples(config)
  _check(
    config.batch_size <= n,
    "batch_size",
    config.batch_size,
    f"at most the {n} training examples",
  )
  _check(
    _is_num(config.rho) and config.rho >= 0,
    "rho",
    config.rho,
    "a finite number >= 0",
  )
  methods.validate(config)
