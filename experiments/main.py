r"""Trains one config: `python -m experiments.main --config=... --workdir=...`.

  python -m experiments.main \
    --config=experiments/configs/label_noise_mnist1d.py:1-sam \
    --workdir=runs/label_noise/1-sam --config.rho=0.02

Rerunning with the same workdir resumes from its latest checkpoint.

An error the user or the machine causes (a bad or unknown config field, a
busy, damaged, unwritable or misplaced workdir, a non-finite loss, a full
disk) is one line `error: ...` on stderr and exit status 2; `--debug` shows
its traceback instead. A bug of the program keeps its traceback.

Multi-host (one process per host, the same command on every host): pass
`--distributed` on a Cloud TPU pod or under SLURM (jax finds the
coordinator), or set `JAX_COORDINATOR_ADDRESS=host0:1234`,
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (then the flag is not needed);
see `sam_jax.parallel.maybe_initialize_distributed`.
"""

import difflib
import importlib.util
import json
import pathlib
import re

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import errors
from sam_jax import parallel, train

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
_DEBUG = flags.DEFINE_bool(
  "debug",
  False,
  "Show the traceback of a user or machine error instead of one line.",
)
flags.mark_flags_as_required(["config", "workdir"])


def _check_workdir(path: str) -> None:
  workdir = pathlib.Path(path)
  if workdir.exists() and not workdir.is_dir():
    errors.fail(f"--workdir {workdir} is a file, not a directory")


def _config_fields(argv: list[str]) -> list[str]:
  """The dotted fields of the config named by `--config=` (empty if it
  cannot be loaded)."""
  spec = next(
    (a.split("=", 1)[1] for a in argv if a.startswith("--config=")), ""
  )
  path, _, arg = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception:  # noqa: BLE001 - only for the suggestion
    return []

  def walk(node, prefix):
    for key in node.keys():
      value = node[key]
      yield prefix + key
      if hasattr(value, "keys"):
        yield from walk(value, prefix + key + ".")

  return list(walk(config, ""))


def _unknown_field(argv: list[str], e: Exception) -> str:
  """`--config.foo: no such field; nearest: ...` from a failed override."""
  text = str(e).replace("\\'", "'")
  match = re.search(r"'([A-Za-z_]\w*)'", text)
  key = match.group(1) if match else ""
  overrides = [
    a.split("=", 1)[0][len("--config.") :]
    for a in argv
    if a.startswith("--config.")
  ]
  field = next(
    (f for f in overrides if f.split(".")[-1] == key or key in f.split(".")),
    key,
  )
  nearest = difflib.get_close_matches(field, _config_fields(argv), n=3)
  hint = f"; nearest: {', '.join(nearest)}" if nearest else ""
  return f"--config.{field}: the config has no field {key!r}{hint}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with its errors as one line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    errors.fail(str(e).strip().splitlines()[0])
  except (AttributeError, KeyError) as e:  # An unknown --config.<field>.
    if "--debug" in argv:
      raise
    errors.fail(_unknown_field(argv, e))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  parallel.maybe_initialize_distributed(_DISTRIBUTED.value)
  _check_workdir(_WORKDIR.value)
  summary = errors.one_line_errors(
    train.train_and_evaluate,
    _CONFIG.value,
    _WORKDIR.value,
    debug=_DEBUG.value,
  )
  keys = [k for k in summary if k != "config"]
  print(json.dumps({k: summary[k] for k in keys}, indent=2))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
