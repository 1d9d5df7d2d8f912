r"""Trains one config: `python -m experiments.main --config=... --workdir=...`.

  python -m experiments.main \
    --config=experiments/configs/label_noise_mnist1d.py:1-sam \
    --workdir=runs/label_noise/1-sam --config.rho=0.02

Rerunning with the same workdir resumes from its latest checkpoint.

Multi-host (one process per host, the same command on every host): pass
`--distributed` on a Cloud TPU pod or under SLURM (jax finds the
coordinator), or set `JAX_COORDINATOR_ADDRESS=host0:1234`,
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (then the flag is not needed);
see `sam_jax.parallel.maybe_initialize_distributed`.
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sam_jax import parallel, run_io, train

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Training config file (ml_collections).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for this run.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  None,
  "Initialise multi-host jax (jax.distributed.initialize). Default: only "
  "when JAX_COORDINATOR_ADDRESS is set.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  parallel.maybe_initialize_distributed(_DISTRIBUTED.value)
  try:
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except run_io.WorkdirError as e:  # A busy or damaged workdir: one line.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  keys = [k for k in summary if k != "config"]
  print(json.dumps({k: summary[k] for k in keys}, indent=2))


if __name__ == "__main__":
  app.run(main)
