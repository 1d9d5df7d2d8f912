"""Datasets as arrays, label noise, train/validation splits, on-device batches.

The label-noise study (PAPERS.md A1-A6) runs on MNIST-1D, generated offline
by the `mnist1d` package in a few seconds, so the main job and the tests need
no download. A whole small dataset lives on the device; each epoch is a
permutation of its indices cut into batches (`epoch_permutation_batches`) that
the jitted step gathers with `take_batch`.

Label noise is a pure function of `(labels, rate, kind, num_classes, seed)`
that also returns the noise mask, so that training accuracy on clean and on
noisy examples can be tracked separately (the paper's Figure 1 view).

CIFAR-10/100 and Fashion-MNIST through `tfds.data_source` live in
`sam_jax.tfds_data`, which this module does not import.
"""

import hashlib
import json
import os
import random
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

MNIST1D_NUM_CLASSES = 10
MNIST1D_LENGTH = 40

# Arguments of `mnist1d.data.make_dataset` that `load_mnist1d` sets itself.
_MNIST1D_OWN_ARGS = ("num_samples", "seed", "train_split", "url")


def load_mnist1d(
  num_samples: int = 5000,
  seed: int = 42,
  test_fraction: float = 0.2,
  *,
  args_overrides: Mapping[str, Any] | None = None,
  cache_dir: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
  """Generates MNIST-1D (Greydanus & Kobak, 2020) offline with `mnist1d`.

  The generation arguments are those of `mnist1d.data.get_dataset_args()`:
  template_len=12, padding=[36, 60], scale_coeff=0.4, max_translation=48,
  corr_noise_scale=0.25, iid_noise_scale=2e-2, shear_scale=0.75,
  shuffle_seq=False, final_seq_length=40; `num_samples` and `seed` come from
  this function (the package defaults are 5000 and 42, i.e. the standard
  4000/1000 split with `test_fraction=0.2`; any multiple of 10 is allowed,
  `num_samples // 10` signals per digit). Other arguments can be changed with
  `args_overrides`. The examples are shuffled by the package; the first
  `N - round(test_fraction * N)` form the training set, the rest the test set.

  Standardisation: the package centres and scales the whole dataset (train and
  test together) by one scalar mean and standard deviation. To keep test
  statistics out of training, the inputs are re-standardised here by the
  scalar mean and standard deviation of the training inputs (one scalar each,
  not per position, which keeps the shape of each signal). The training
  inputs then have mean 0 and standard deviation 1 over all their entries.

  `mnist1d` seeds Python's and NumPy's global random number generators; their
  states are saved and restored, so the caller's global random state is not
  disturbed (not thread-safe: do not generate from two threads at once).

  Args:
    num_samples: total number of examples (train + test), a positive
      multiple of 10.
    seed: seed of the generator; the same arguments give the same data.
    test_fraction: fraction of the examples in the test set, in (0, 1).
    args_overrides: other keys of `get_dataset_args()` to change.
    cache_dir: if given, the arrays are stored in (and later read from) an
      `.npz` file in this directory whose name hashes all the arguments.
      Nothing is written to disk otherwise.

  Returns:
    A dict of NumPy arrays `x_train [N_train, 40] float32`, `y_train [N_train]
    int32`, `x_test [N_test, 40] float32`, `y_test [N_test] int32`.

  Raises:
    ValueError: if an argument is out of range or an override is unknown.
  """
  from mnist1d import data as mnist1d_data  # Imports matplotlib: keep lazy.
  from mnist1d import utils as mnist1d_utils

  if isinstance(num_samples, bool) or not isinstance(num_samples, int):
    raise ValueError(f"num_samples must be an int, got {num_samples!r}")
  if num_samples < 10 or num_samples % MNIST1D_NUM_CLASSES:
    raise ValueError(
      f"num_samples must be a positive multiple of 10, got {num_samples}"
    )
  num_test = _held_out_size(
    "test_fraction",
    test_fraction,
    num_samples,
    f"test set with num_samples={num_samples}",
  )
  args = mnist1d_data.get_dataset_args(as_dict=True)
  for key, value in dict(args_overrides or {}).items():
    if key not in args or key in _MNIST1D_OWN_ARGS:
      raise ValueError(
        f"args_overrides: unknown or reserved key {key!r}; allowed: "
        f"{sorted(set(args) - set(_MNIST1D_OWN_ARGS))}"
      )
    args[key] = value
  args.update(num_samples=num_samples, seed=seed, train_split=1.0)
  args.pop("url")

  path = None
  if cache_dir is not None:
    spec = json.dumps([args, test_fraction], sort_keys=True, default=str)
    digest = hashlib.sha1(spec.encode()).hexdigest()[:16]
    path = os.path.join(os.fspath(cache_dir), f"mnist1d_{digest}.npz")
    if os.path.exists(path):
      with np.load(path) as cached:
        return {k: cached[k] for k in cached.files}

  py_state, np_state = random.getstate(), np.random.get_state()
  try:
    raw = mnist1d_data.make_dataset(mnist1d_utils.ObjectView(dict(args)))
  finally:
    random.setstate(py_state)
    np.random.set_state(np_state)

  x = np.asarray(raw["x"], np.float64)
  y = np.asarray(raw["y"]).astype(np.int32)
  num_train = num_samples - num_test
  mean, std = x[:num_train].mean(), x[:num_train].std()
  x = ((x - mean) / std).astype(np.float32)
  out = {
    "x_train": x[:num_train],
    "y_train": y[:num_train],
    "x_test": x[num_train:],
    "y_test": y[num_train:],
  }
  if path is not None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
      np.savez(f, **out)
    os.replace(tmp, path)  # Atomic: a concurrent reader never sees half.
  return out


def label_noise(
  labels: np.ndarray,
  rate: float,
  *,
  num_classes: int,
  seed: int,
  kind: str = "symmetric",
  mapping: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Corrupts exactly `round(rate * N)` labels, chosen uniformly at random.

  - `"symmetric"`: each chosen example gets a label drawn uniformly from the
    `num_classes - 1` classes other than its own. Drawing from the other
    classes (rather than from all classes, where a "flip" may land on the
    true label) makes the realised noise rate exactly `round(rate * N) / N`
    and the mask exactly `noisy != clean`. The common all-classes convention
    at rate `r'` is this one at `r = r' (K - 1) / K`.
  - `"asymmetric"`: each chosen example `c` gets `mapping[c]`; by default the
    "pair flip" `c -> (c + 1) % K`. `mapping` must have no fixed point, so
    again the mask is exactly `noisy != clean`.

  The examples to corrupt are drawn from all examples (not per class), so
  the per-class noise rate is `rate` only in expectation. Python's `round`
  is used (halves to even).

  Args:
    labels: clean integer labels `[N]` in `[0, num_classes)`.
    rate: fraction of labels to corrupt, in `[0, 1)`.
    num_classes: number of classes `K >= 2`.
    seed: seed of `np.random.default_rng`; same inputs give the same output.
    kind: `"symmetric"` or `"asymmetric"`.
    mapping: `[K]` class map for `"asymmetric"` (default pair flip).

  Returns:
    `(noisy_labels [N] int32, noise_mask [N] bool)`, with
    `noise_mask == (noisy_labels != labels)`.

  Raises:
    ValueError: on a rate outside `[0, 1)`, an unknown kind, a bad mapping,
      or labels that are not integers in range.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f"labels must be a 1-D integer array, got dtype {labels.dtype} shape "
      f"{labels.shape}"
    )
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
      f"labels must lie in [0, num_classes={num_classes}), got range "
      f"[{labels.min()}, {labels.max()}]"
    )
  rate = float(rate)
  if not 0.0 <= rate < 1.0:  # Also rejects NaN.
    raise ValueError(f"rate must be in [0, 1), got {rate}")
  if kind == "symmetric":
    if mapping is not None:
      raise ValueError("mapping is only used with kind='asymmetric'")
  elif kind == "asymmetric":
    if mapping is None:
      mapping = (np.arange(num_classes) + 1) % num_classes
    mapping = np.asarray(mapping)
    if (
      mapping.shape != (num_classes,)
      or not np.issubdtype(mapping.dtype, np.integer)
      or mapping.min() < 0
      or mapping.max() >= num_classes
    ):
      raise ValueError(
        f"mapping must be {num_classes} integers in [0, {num_classes}), got "
        f"{mapping!r}"
      )
    if np.any(mapping == np.arange(num_classes)):
      raise ValueError(f"mapping must have no fixed point, got {mapping!r}")
  else:
    raise ValueError(f"kind must be 'symmetric' or 'asymmetric', got {kind!r}")

  n = labels.shape[0]
  num_noisy = int(round(rate * n))
  rng = np.random.default_rng(seed)
  idx = rng.choice(n, size=num_noisy, replace=False)
  clean = labels.astype(np.int32)
  noisy = clean.copy()
  if kind == "symmetric":
    # An offset in [1, K) moves to each other class with probability 1/(K-1).
    offsets = rng.integers(1, num_classes, size=num_noisy)
    noisy[idx] = (clean[idx] + offsets) % num_classes
  else:
    noisy[idx] = mapping[clean[idx]]
  mask = np.zeros(n, bool)
  mask[idx] = True
  return noisy, mask


def _held_out_size(field: str, fraction: float, total: int, part: str) -> int:
  """`round(fraction * total)`, the size of a held-out `part` (test or
  validation set, as named in the message); ValueError naming `field`
  unless `fraction` is in (0, 1) and leaves both parts non-empty."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"{field} must be in (0, 1), got {fraction}")
  size = int(round(fraction * total))
  if not 0 < size < total:
    raise ValueError(f"{field}={fraction} leaves an empty train or {part}")
  return size


def split_indices(
  num_examples: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """A random split of `range(num_examples)` into train and validation.

  The validation set has `round(val_fraction * num_examples)` examples; both
  index arrays are sorted, so the original order is kept within each part.

  Returns:
    `(train_idx, val_idx)`, int arrays that partition `range(num_examples)`.

  Raises:
    ValueError: if `val_fraction` is not in (0, 1) or leaves a part empty.
  """
  num_val = _held_out_size(
    "val_fraction",
    val_fraction,
    num_examples,
    f"validation set with {num_examples} examples",
  )
  perm = np.random.default_rng(seed).permutation(num_examples)
  return np.sort(perm[num_val:]), np.sort(perm[:num_val])


def train_val_split(
  x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Carves a validation set out of the training set (to tune rho, lambda).

  See `split_indices` for the split; use it directly to split further
  arrays (e.g. a noise mask) the same way.

  Returns:
    `(x_train, y_train, x_val, y_val)`.
  """
  x, y = np.asarray(x), np.asarray(y)
  if x.shape[0] != y.shape[0]:
    raise ValueError(
      f"x and y must have the same number of examples, got {x.shape[0]} "
      f"and {y.shape[0]}"
    )
  train_idx, val_idx = split_indices(x.shape[0], val_fraction, seed)
  return x[train_idx], y[train_idx], x[val_idx], y[val_idx]


def epoch_permutation_batches(
  key: Array, num_examples: int, batch_size: int
) -> Array:
  """Indices of one epoch's batches: a random permutation, cut in batches.

  The last `num_examples % batch_size` indices of the permutation are
  dropped (a different subset each epoch). `num_examples` and `batch_size`
  are static; under `jax.jit` mark them `static_argnames`.

  Returns:
    `idx [num_examples // batch_size, batch_size]` integers, each index of
    `range(num_examples)` at most once.

  Raises:
    ValueError: if `batch_size` is not in `[1, num_examples]`.
  """
  if not 1 <= batch_size <= num_examples:
    raise ValueError(
      f"batch_size must be in [1, num_examples={num_examples}], got "
      f"{batch_size}"
    )
  steps = num_examples // batch_size
  perm = jax.random.permutation(key, num_examples)
  return perm[: steps * batch_size].reshape(steps, batch_size)


def take_batch(arrays: Any, idx: Array) -> Any:
  """Gathers `a[idx]` along the leading axis of every array of a pytree.

  Example: `x_B, y_B = take_batch((x_N, y_N), idx_SxB[step])`.
  """
  return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), arrays)
