"""Tests for sam_jax.data and sam_jax.tfds_data (no download, CPU, tiny)."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given, settings
from hypothesis import strategies as st

from sam_jax import data, tfds_data

# ---------------------------------------------------------------- MNIST-1D

_N = 500  # 50 signals per digit: ~0.3 s per generation.


@pytest.fixture(scope="module")
def mnist1d_small():
  return data.load_mnist1d(num_samples=_N, seed=3)


def test_mnist1d_shapes_dtypes_standardised(mnist1d_small):
  d = mnist1d_small
  assert d["x_train"].shape == (400, data.MNIST1D_LENGTH)
  assert d["x_test"].shape == (100, data.MNIST1D_LENGTH)
  assert d["x_train"].dtype == d["x_test"].dtype == np.float32
  assert d["y_train"].shape == (400,) and d["y_test"].shape == (100,)
  assert d["y_train"].dtype == d["y_test"].dtype == np.int32
  y = np.concatenate([d["y_train"], d["y_test"]])
  # 50 signals per digit, split between train and test.
  np.testing.assert_array_equal(np.bincount(y), np.full(10, 50))
  # Standardised by training statistics; 1e-5 ~ float32 rounding of 16k sums.
  assert abs(d["x_train"].mean()) < 1e-5
  assert abs(d["x_train"].std() - 1.0) < 1e-5
  assert np.all(np.isfinite(d["x_test"]))


def test_mnist1d_matches_package_reference(mnist1d_small):
  """Same signals as mnist1d's own make_dataset, up to the standardisation."""
  from mnist1d.data import get_dataset_args, make_dataset

  args = get_dataset_args()
  args.num_samples, args.seed = _N, 3  # Package default train_split 0.8.
  np_state = np.random.get_state()
  ref = make_dataset(args)
  np.random.set_state(np_state)
  x_ref = ref["x"]
  x_ref = (x_ref - x_ref.mean()) / x_ref.std()
  # float32 output vs float64 reference of unit scale.
  np.testing.assert_allclose(mnist1d_small["x_train"], x_ref, atol=1e-5)
  np.testing.assert_array_equal(mnist1d_small["y_train"], ref["y"])
  np.testing.assert_array_equal(mnist1d_small["y_test"], ref["y_test"])


def test_mnist1d_deterministic_and_keeps_global_rng(mnist1d_small):
  np.random.seed(123)
  random.seed(123)
  again = data.load_mnist1d(num_samples=_N, seed=3)
  after_np, after_py = np.random.random(), random.random()
  np.random.seed(123)
  random.seed(123)
  assert after_np == np.random.random() and after_py == random.random()
  for k in mnist1d_small:
    np.testing.assert_array_equal(again[k], mnist1d_small[k])
  other = data.load_mnist1d(num_samples=_N, seed=4)
  assert not np.array_equal(other["x_train"], mnist1d_small["x_train"])


def test_mnist1d_cache_dir(tmp_path, monkeypatch, mnist1d_small):
  first = data.load_mnist1d(num_samples=_N, seed=3, cache_dir=tmp_path)
  assert len(list(tmp_path.glob("mnist1d_*.npz"))) == 1
  import mnist1d.data

  def fail(*args, **kwargs):
    raise AssertionError("regenerated instead of reading the cache")

  monkeypatch.setattr(mnist1d.data, "make_dataset", fail)
  second = data.load_mnist1d(num_samples=_N, seed=3, cache_dir=tmp_path)
  for k in first:
    np.testing.assert_array_equal(second[k], mnist1d_small[k])
    assert second[k].dtype == mnist1d_small[k].dtype


@pytest.mark.parametrize(
  "kwargs, field",
  [
    (dict(num_samples=505), "num_samples"),
    (dict(num_samples=0), "num_samples"),
    (dict(test_fraction=1.0), "test_fraction"),
    (dict(args_overrides={"nope": 1}), "args_overrides"),
    (dict(args_overrides={"seed": 1}), "args_overrides"),
  ],
)
def test_mnist1d_bad_args(kwargs, field):
  with pytest.raises(ValueError, match=field):
    data.load_mnist1d(**kwargs)


# ------------------------------------------------------------- label noise


@settings(max_examples=40, deadline=None)
@given(
  n=st.integers(1, 300),
  k=st.integers(2, 12),
  rate=st.floats(0.0, 0.999),
  kind=st.sampled_from(["symmetric", "asymmetric"]),
  seed=st.integers(0, 2**31),
)
def test_label_noise_exact_rate_and_mask(n, k, rate, kind, seed):
  clean = np.random.default_rng(seed).integers(0, k, n)
  noisy, mask = data.label_noise(
    clean, rate, num_classes=k, seed=seed, kind=kind
  )
  assert noisy.dtype == np.int32 and mask.dtype == bool
  assert mask.sum() == round(rate * n)
  np.testing.assert_array_equal(mask, noisy != clean)
  assert noisy.min() >= 0 and noisy.max() < k
  if kind == "asymmetric":
    np.testing.assert_array_equal(noisy[mask], (clean[mask] + 1) % k)


def test_label_noise_symmetric_uniform_over_other_classes():
  k, n, rate = 4, 20000, 0.9
  clean = np.arange(n) % k
  noisy, mask = data.label_noise(clean, rate, num_classes=k, seed=0)
  counts = np.zeros((k, k), int)
  np.add.at(counts, (clean[mask], noisy[mask]), 1)
  assert np.all(np.diag(counts) == 0)
  expected = mask.sum() / (k * (k - 1))  # 1500 per off-diagonal cell.
  off = counts[~np.eye(k, dtype=bool)]
  # Multinomial cell sd ~ sqrt(1500) ~ 39: 6 sd ~ 230.
  assert np.all(np.abs(off - expected) < 6 * np.sqrt(expected)), counts


def test_label_noise_custom_mapping_and_rounding():
  clean = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
  mapping = np.array([2, 0, 1])
  noisy, mask = data.label_noise(
    clean, 0.25, num_classes=3, seed=1, kind="asymmetric", mapping=mapping
  )
  assert mask.sum() == 2  # round(2.5) = 2 (halves to even).
  np.testing.assert_array_equal(noisy[mask], mapping[clean[mask]])
  np.testing.assert_array_equal(noisy[~mask], clean[~mask])


def test_label_noise_deterministic_and_rate_zero():
  clean = np.arange(1000) % 10
  a = data.label_noise(clean, 0.3, num_classes=10, seed=7)
  b = data.label_noise(clean, 0.3, num_classes=10, seed=7)
  c = data.label_noise(clean, 0.3, num_classes=10, seed=8)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], c[1])
  for kind in ("symmetric", "asymmetric"):
    noisy, mask = data.label_noise(
      clean, 0.0, num_classes=10, seed=7, kind=kind
    )
    np.testing.assert_array_equal(noisy, clean)
    assert not mask.any()


@pytest.mark.parametrize(
  "kwargs, field",
  [
    (dict(rate=-0.1), "rate"),
    (dict(rate=1.0), "rate"),
    (dict(rate=float("nan")), "rate"),
    (dict(kind="pairflip"), "kind"),
    (dict(num_classes=1), "num_classes"),
    (dict(num_classes=3), "num_classes"),  # Labels go up to 4.
    (dict(kind="asymmetric", mapping=[0, 2, 3, 4, 1]), "fixed point"),
    (dict(kind="asymmetric", mapping=[1, 2, 0]), "mapping"),
  ],
)
def test_label_noise_bad_args(kwargs, field):
  args = dict(labels=np.arange(10) % 5, rate=0.2, num_classes=5, seed=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=field):
    data.label_noise(**args)


# --------------------------------------------------------------- splitting


def test_train_val_split_partitions():
  x = np.arange(50 * 3).reshape(50, 3)
  y = np.arange(50)
  x_tr, y_tr, x_val, y_val = data.train_val_split(x, y, 0.2, seed=0)
  assert len(y_val) == 10 and len(y_tr) == 40
  np.testing.assert_array_equal(np.sort(np.concatenate([y_tr, y_val])), y)
  np.testing.assert_array_equal(x_tr, x[y_tr])  # Rows stay paired.
  np.testing.assert_array_equal(x_val, x[y_val])
  again = data.train_val_split(x, y, 0.2, seed=0)[3]
  other = data.train_val_split(x, y, 0.2, seed=1)[3]
  np.testing.assert_array_equal(again, y_val)
  assert not np.array_equal(other, y_val)
  with pytest.raises(ValueError, match="val_fraction"):
    data.train_val_split(x, y, 0.0, seed=0)
  with pytest.raises(ValueError, match="same number"):
    data.train_val_split(x, y[:-1], 0.2, seed=0)


# ---------------------------------------------------------------- batching


def test_epoch_permutation_batches():
  key = jax.random.key(0)
  idx = data.epoch_permutation_batches(key, 103, 10)
  assert idx.shape == (10, 10)
  flat = np.asarray(idx).ravel()
  assert len(np.unique(flat)) == 100 and flat.min() >= 0 and flat.max() < 103
  full = np.asarray(data.epoch_permutation_batches(key, 100, 20)).ravel()
  np.testing.assert_array_equal(np.sort(full), np.arange(100))
  other = data.epoch_permutation_batches(jax.random.key(1), 100, 20)
  assert not np.array_equal(np.asarray(other).ravel(), full)
  jitted = jax.jit(data.epoch_permutation_batches, static_argnums=(1, 2))(
    key, 100, 20
  )
  np.testing.assert_array_equal(np.asarray(jitted).ravel(), full)
  with pytest.raises(ValueError, match="batch_size"):
    data.epoch_permutation_batches(key, 5, 6)


def test_take_batch():
  x = np.arange(24.0).reshape(12, 2)
  y = np.arange(12, dtype=np.int32) * 10
  idx = jnp.array([3, 0, 11])
  xb, yb = jax.jit(data.take_batch)((x, y), idx)
  np.testing.assert_array_equal(xb, x[[3, 0, 11]])
  np.testing.assert_array_equal(yb, y[[3, 0, 11]])


# ------------------------------------------------------------ augmentation

_B, _H, _W, _C, _P = 24, 8, 6, 3, 2


@pytest.fixture(scope="module")
def images():
  # Distinct random values, so a window of the padded image is unique.
  return np.random.default_rng(0).normal(size=(_B, _H, _W, _C)).astype("f4")


def _window_offsets(out, img, p):
  """All (dy, dx) whose window of the zero-padded image equals `out`."""
  padded = np.pad(img, ((p, p), (p, p), (0, 0)))
  return [
    (dy, dx)
    for dy in range(2 * p + 1)
    for dx in range(2 * p + 1)
    if np.array_equal(padded[dy : dy + _H, dx : dx + _W], out)
  ]


def test_augment_off_is_identity(images):
  out = tfds_data.augment(jax.random.key(0), images, crop_padding=0, flip=False)
  np.testing.assert_array_equal(out, images)


def test_augment_flip_only(images):
  out = np.asarray(tfds_data.augment(jax.random.key(0), images, crop_padding=0))
  same = np.all(out == images, axis=(1, 2, 3))
  mirrored = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same ^ mirrored)
  assert same.any() and mirrored.any()  # P(all one way) = 2^-23.


def test_augment_crop_only(images):
  out = np.asarray(
    tfds_data.augment(jax.random.key(1), images, crop_padding=_P, flip=False)
  )
  pairs = zip(out, images, strict=True)
  offsets = [_window_offsets(o, i, _P) for o, i in pairs]
  assert all(len(o) == 1 for o in offsets)
  assert len({o[0] for o in offsets}) > 1  # Per example, not per batch.


def test_augment_crop_and_flip_jit(images):
  key = jax.random.key(2)
  aug = jax.jit(tfds_data.augment, static_argnames=("crop_padding", "flip"))
  out = np.asarray(aug(key, images, crop_padding=_P, flip=True))
  np.testing.assert_array_equal(
    out, tfds_data.augment(key, images, crop_padding=_P)
  )
  assert out.shape == images.shape and out.dtype == images.dtype
  for o, i in zip(out, images, strict=True):
    assert _window_offsets(o, i, _P) or _window_offsets(o[:, ::-1], i, _P)
  u8 = (np.arange(_B * _H * _W * _C) % 256).astype(np.uint8)
  u8 = u8.reshape(images.shape)
  assert aug(key, u8, crop_padding=_P, flip=True).dtype == np.uint8


def test_augment_bad_args(images):
  with pytest.raises(ValueError, match="crop_padding"):
    tfds_data.augment(jax.random.key(0), images, crop_padding=-1)
  with pytest.raises(ValueError, match="images_BxHxWxC"):
    tfds_data.augment(jax.random.key(0), images[0])


def test_normalize_images():
  x = np.random.default_rng(0).integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
  mean, std = tfds_data.CHANNEL_STATS["cifar10"]
  ref = (x.astype(np.float64) / 255 - np.array(mean)) / np.array(std)
  out = tfds_data.normalize_images(x, mean, std)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)  # float32.
  with pytest.raises(ValueError, match="channel"):
    tfds_data.normalize_images(x, *tfds_data.CHANNEL_STATS["fashion_mnist"])


# -------------------------------------------------------------------- TFDS

_SHAPES = {"cifar10": (32, 32, 3), "cifar100": (32, 32, 3)}
_SHAPES["fashion_mnist"] = (28, 28, 1)


@pytest.mark.parametrize("name", sorted(_SHAPES))
def test_load_tfds_under_mock_data(name, tmp_path):
  with tfds.testing.mock_data(num_examples=6):
    x, y = tfds_data.load_tfds(name, "train")
    x2, y2 = tfds_data.load_tfds(name, "train", data_dir=tmp_path)
    ref = tfds.data_source(name, split="train")[4]
  assert x.shape == (6, *_SHAPES[name]) and x.dtype == np.uint8
  assert y.shape == (6,) and y.dtype == np.int32
  assert y.min() >= 0 and y.max() < tfds_data.NUM_CLASSES[name]
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(y, y2)
  np.testing.assert_array_equal(x[4], ref["image"])
  assert y[4] == ref["label"]
  assert len(tfds_data.CHANNEL_STATS[name][0]) == _SHAPES[name][-1]


def test_tfds_pipeline_under_mock_data():
  """Load -> label noise -> device -> batches -> normalise -> augment."""
  with tfds.testing.mock_data(num_examples=16):
    x, y = tfds_data.load_tfds("cifar10", "train")
  noisy, mask = data.label_noise(y, 0.25, num_classes=10, seed=0)
  assert mask.sum() == 4
  idx = data.epoch_permutation_batches(jax.random.key(0), 16, 8)
  xb, yb = data.take_batch((jnp.asarray(x), jnp.asarray(noisy)), idx[0])
  xb = tfds_data.normalize_images(xb, *tfds_data.CHANNEL_STATS["cifar10"])
  xb = tfds_data.augment(jax.random.key(1), xb)
  assert xb.shape == (8, 32, 32, 3) and xb.dtype == jnp.float32
  assert np.all(np.isfinite(xb))
  np.testing.assert_array_equal(yb, noisy[np.asarray(idx[0])])


def test_load_tfds_errors(tmp_path):
  with pytest.raises(ValueError, match="name"):
    tfds_data.load_tfds("imagenet2012", "train")
  # An empty data_dir: an error at once, never a download.
  with pytest.raises(FileNotFoundError, match="ArrayRecord"):
    tfds_data.load_tfds("cifar10", "train", data_dir=tmp_path)


def test_streamed_images_match_load_tfds():
  with tfds.testing.mock_data(num_examples=10):
    x, y = tfds_data.load_tfds("cifar10", "train")
    source = tfds_data.open_tfds("cifar10", "train")
    images = tfds_data.StreamedImages(source)
    labels = tfds_data.read_labels(source)
    idx = np.array([7, 2, 2, 9])
    np.testing.assert_array_equal(images[idx], x[idx])
    np.testing.assert_array_equal(images[3:6], x[3:6])
  assert images.shape == x.shape and len(images) == 10
  assert images[idx].dtype == np.uint8
  np.testing.assert_array_equal(labels, y)
