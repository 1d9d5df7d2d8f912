"""`experiments.main` under `tfds.testing.mock_data`, for subprocess tests.

  python tests/mock_main.py --config=... --workdir=...

Environment: `MOCK_NUM_EXAMPLES` (examples per split, default 64) and
`MOCK_STEP_DELAY_S` (seconds slept before each batch is sent to the
devices, default 0, so that a test can kill a run mid-way). The mock images
are the same in every process (TFDS draws them from a fixed seed).
"""

import os
import pathlib
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # Run as a script: the repository's packages.

import orbax.checkpoint as ocp  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from absl import app  # noqa: E402

from experiments import main as main_lib  # noqa: E402
from sam_jax import parallel  # noqa: E402

# label_noise_cifar10 shrunk for subprocess runs: an MLP of width 8,
# batches of 16 (4 steps per epoch on 64 mock examples), 3 epochs.
TINY = {
  "model.name": "mlp",
  "model.dense": (8,),
  "batch_size": 16,
  "eval_batch_size": 16,
  "num_epochs": 3,
  "checkpoint_every_steps": 2,
  "data.eval_train_examples": 16,
  "data.augment": True,
  "progress": False,
}


def set_fields(config, fields):
  """`config.<a.b> = value` for each dotted field, any type; returns it."""
  for field, value in fields.items():
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
      node = node[p]
    with node.ignore_type():
      node[leaf] = value
  return config


def command(workdir, fields=None, label="sam"):
  """The argv of this script on label_noise_cifar10 with `fields`."""
  config = os.path.join(
    ROOT, f"experiments/configs/label_noise_cifar10.py:{label}"
  )
  return [
    sys.executable,
    os.path.abspath(__file__),
    f"--config={config}",
    f"--workdir={workdir}",
  ] + [f"--config.{k}={v}" for k, v in (fields or TINY).items()]


def checkpoint_steps(workdir):
  """The steps of a run's checkpoints, ascending ([] before the first)."""
  root = pathlib.Path(workdir) / "checkpoints"
  if not root.exists():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


def final_params(workdir, step=None):
  """The parameters of a run's checkpoint `step` (default: the latest)."""
  root = pathlib.Path(workdir) / "checkpoints"
  step = step or checkpoint_steps(workdir)[-1]
  with warnings.catch_warnings():  # "Sharding info not provided": none.
    warnings.simplefilter("ignore", UserWarning)
    tree = ocp.PyTreeCheckpointer().restore(root / str(step) / "tree")
  return tree["state"]["params"]


def _slow(fn, delay):
  def wrapped(*args, **kwargs):
    time.sleep(delay)
    return fn(*args, **kwargs)

  return wrapped


if __name__ == "__main__":
  delay = float(os.environ.get("MOCK_STEP_DELAY_S", "0"))
  if delay:
    parallel.global_batch = _slow(parallel.global_batch, delay)
  num = int(os.environ.get("MOCK_NUM_EXAMPLES", "64"))
  with tfds.testing.mock_data(num_examples=num):
    app.run(main_lib.main)
