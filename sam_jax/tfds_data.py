"""Image datasets through `tfds.data_source`, normalisation, augmentation.

CIFAR-10, CIFAR-100 and Fashion-MNIST are read with `tfds.data_source`
(random access to ArrayRecord files, NumPy output, no TensorFlow needed to
read) into NumPy arrays (or read on demand, `StreamedImages`); batches are
augmented on device inside the jitted step (`augment`).

Preparing the data, once, on a machine with internet access. Writing the
files needs TensorFlow (TFDS encodes the images with `tf.image.encode_png`);
reading them needs only `tensorflow-datasets`, `array_record` (installed with
it on Linux) and Pillow or OpenCV to decode the PNGs. `tfds.data_source` reads
only the ArrayRecord file format, not the default TFRecord:

    pip install tensorflow tensorflow-datasets
    tfds build cifar10 cifar100 fashion_mnist \\
        --data_dir=/path/to/tensorflow_datasets --file_format=array_record

or, in Python,

    tfds.builder("cifar10", data_dir=DIR, file_format="array_record")
        .download_and_prepare()

Then copy `DIR` to the training machines and pass it as `data_dir` (or set
`TFDS_DATA_DIR`; the default is `~/tensorflow_datasets`). `load_tfds` never
downloads: a missing dataset is an error. `load_tfds` reads a whole split
into memory (CIFAR: 150 MB); `StreamedImages` reads records on demand, so
that each host of a multi-host run reads only its slice of each global
batch (`sam_jax.parallel.process_slice`, `sam_jax.train_sharded`). The label
noise and the batch order, pure functions of the seed, are the same on
every host.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "fashion_mnist": 10}

# Per-channel mean and standard deviation of the training images scaled to
# [0, 1], the values in common use. For CIFAR-10 the standard deviation is
# that of all training pixels (0.2470, ...), not the often-copied
# (0.2023, 0.1994, 0.2010), which averages per-image standard deviations.
CHANNEL_STATS = {
  "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
  "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
  "fashion_mnist": ((0.2860,), (0.3530,)),
}


def open_tfds(name: str, split: str, data_dir: str | os.PathLike | None = None):
  """The `tfds.data_source` of a split (random access, nothing read yet).

  Raises:
    ValueError: on an unsupported `name`.
    FileNotFoundError: if the dataset is not prepared as ArrayRecord files
      (nothing is downloaded).
  """
  import tensorflow_datasets as tfds  # Only needed here; slow to import.

  if name not in NUM_CLASSES:
    raise ValueError(f"name must be one of {sorted(NUM_CLASSES)}, got {name!r}")
  try:
    return tfds.data_source(
      name, split=split, data_dir=data_dir, download=False
    )
  except NotImplementedError as e:  # What TFDS raises when no ArrayRecord.
    raise FileNotFoundError(
      f"{name} is not prepared in the ArrayRecord format under data_dir="
      f"{data_dir!r} (None: TFDS's default); prepare it once as described "
      "in the sam_jax.tfds_data docstring"
    ) from e


class StreamedImages:
  """The images of a data source, read on demand: `images[idx]`.

  Indexing with an int array or a slice reads those records from the
  ArrayRecord files (one at a time: `__getitems__` would batch the reads,
  but the `tfds.testing.mock_data` source of tfds 4.9 breaks on it) and
  returns `uint8 [len(idx), H, W, C]`, like the in-memory array of
  `load_tfds`. A multi-host trainer reads only its slice of each batch.
  """

  def __init__(self, source):
    self.source = source
    self.shape = (len(source),) + tuple(
      source.dataset_info.features["image"].shape
    )

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, index) -> np.ndarray:
    idx = np.arange(len(self))[index]
    out = np.empty((len(idx),) + self.shape[1:], np.uint8)
    for j, i in enumerate(idx):
      out[j] = self.source[int(i)]["image"]
    return out


def read_labels(source) -> np.ndarray:
  """All labels of a data source, `int32 [N]` (reads every record)."""
  return np.asarray([source[i]["label"] for i in range(len(source))], np.int32)


def load_tfds(
  name: str, split: str, data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Reads a whole split of an image dataset into memory.

  Args:
    name: `"cifar10"`, `"cifar100"` or `"fashion_mnist"`.
    split: a TFDS split, e.g. `"train"`, `"test"`, `"train[:90%]"`.
    data_dir: where the prepared dataset lives (see the module docstring);
      None for TFDS's default.

  Returns:
    `(x [N, H, W, C] uint8, y [N] int32)` in the order of the files. For
    CIFAR-100 `y` is the fine label (100 classes).

  Raises:
    ValueError: on an unsupported `name`.
    FileNotFoundError: if the dataset is not prepared as ArrayRecord files
      (nothing is downloaded).
  """
  source = open_tfds(name, split, data_dir)
  images = StreamedImages(source)
  x = np.empty(images.shape, np.uint8)
  y = np.empty((len(images),), np.int32)
  # One pass, one record at a time; 60k single reads take seconds.
  for i in range(len(images)):
    example = source[i]
    x[i] = example["image"]
    y[i] = example["label"]
  return x, y


def normalize_images(
  images: Array, mean: tuple[float, ...], std: tuple[float, ...]
) -> Array:
  """`(images / 255 - mean) / std` per channel, as float32.

  Args:
    images: `[..., C]` uint8 (or float in [0, 255]) images.
    mean: `C` channel means of the images scaled to [0, 1], e.g.
      `CHANNEL_STATS["cifar10"][0]`.
    std: `C` channel standard deviations, likewise.
  """
  mean_C = jnp.asarray(mean, jnp.float32)
  std_C = jnp.asarray(std, jnp.float32)
  if mean_C.shape != std_C.shape or mean_C.shape[-1:] != images.shape[-1:]:
    raise ValueError(
      f"mean and std must have one entry per channel ({images.shape[-1]}), "
      f"got {mean_C.shape} and {std_C.shape}"
    )
  return (jnp.asarray(images, jnp.float32) / 255.0 - mean_C) / std_C


def augment(
  key: Array, images_BxHxWxC: Array, *, crop_padding: int = 4, flip: bool = True
) -> Array:
  """Random crop after zero padding and random horizontal flip, per example.

  The standard CIFAR augmentation: pad each side with `crop_padding` zeros,
  take an `H x W` window at a uniformly random offset in
  `[0, 2 * crop_padding]^2`, then mirror left-right with probability 1/2.
  Applied after `normalize_images`, the zeros are the channel means.
  `crop_padding` and `flip` are static; `crop_padding=0, flip=False` is the
  identity. Jit-compatible.

  Args:
    key: PRNG key.
    images_BxHxWxC: a batch of images.
    crop_padding: padding of the random crop; 0 turns cropping off.
    flip: whether to flip at random.

  Returns:
    The augmented images, same shape and dtype.
  """
  if images_BxHxWxC.ndim != 4:
    raise ValueError(
      f"images_BxHxWxC must be [B, H, W, C], got shape {images_BxHxWxC.shape}"
    )
  if crop_padding < 0:
    raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
  b, h, w, c = images_BxHxWxC.shape
  crop_key, flip_key = jax.random.split(key)
  out = images_BxHxWxC
  if crop_padding:
    p = crop_padding
    padded = jnp.pad(out, ((0, 0), (p, p), (p, p), (0, 0)))
    offsets_Bx2 = jax.random.randint(crop_key, (b, 2), 0, 2 * p + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
    out = jax.vmap(crop)(padded, offsets_Bx2)
  if flip:
    flip_B = jax.random.bernoulli(flip_key, 0.5, (b,))
    out = jnp.where(flip_B[:, None, None, None], out[:, :, ::-1, :], out)
  return out
