"""The files of a training run's workdir, shared by both trainers.

`sam_jax.train` (MNIST-1D, vmapped seeds) and `sam_jax.train_sharded`
(images, one seed on a device mesh) keep the same workdir files:

  config.json     `check_workdir_config`: a rerun must match it
  *.jsonl         one JSON record a line: `read_records`, `write_records`,
                  `drop_records_after` (a resume redoes what came after its
                  checkpoint)
  checkpoints/    orbax: `checkpoint_manager`, `restore`,
                  `close_checkpoints`
  summary.json    `write_summary`

With several processes (hosts) only process 0 writes the shared files; the
others would race it. Training is watched through `progress_bar`.
"""

import json
import pathlib
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
import tqdm

from sam_jax import metrics

ConfigDict = ml_collections.ConfigDict
# Config fields that do not change the result: a rerun may change them.
IGNORED_FIELDS = (
  "progress",
  "checkpoint_every_epochs",
  "checkpoint_every_steps",
)


def _writes_files() -> bool:
  return jax.process_index() == 0


def run_name(config: ConfigDict) -> str:
  """The run's name in progress bars and summaries (default: the method)."""
  return config.get("label", config.method)


def _result_fields(config_dict: dict) -> dict:
  return {k: v for k, v in config_dict.items() if k not in IGNORED_FIELDS}


def check_workdir_config(workdir: pathlib.Path, config: ConfigDict) -> None:
  """Writes `config.json`; raises ValueError if the workdir holds a run with
  another config (`IGNORED_FIELDS` aside)."""
  if not _writes_files():
    return
  path = workdir / "config.json"
  config_dict = json.loads(config.to_json())
  if path.exists():
    old = _result_fields(json.loads(path.read_text()))
    new = _result_fields(config_dict)
    if old != new:
      diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      raise ValueError(
        f"workdir {workdir} holds a run with a different config (fields "
        f"{diff}); use a new workdir"
      )
  path.write_text(json.dumps(config_dict, indent=2))


def read_records(path: pathlib.Path) -> list[dict]:
  """The records of a JSONL file, `[]` if there is none."""
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line]


def write_records(path: pathlib.Path, records: list[dict], mode: str) -> None:
  """Writes (`mode="w"`) or appends (`"a"`) one JSON line per record."""
  if not _writes_files():
    return
  with path.open(mode) as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def drop_records_after(path: pathlib.Path, last: int, field: str) -> None:
  """Rewrites a JSONL file without its records whose `field` (epoch or
  step) is past `last`: a resume from checkpoint `last` redoes them."""
  kept = [r for r in read_records(path) if r[field] <= last]
  write_records(path, kept, "w")


def checkpoint_manager(
  directory: pathlib.Path, max_to_keep: int
) -> ocp.CheckpointManager:
  """An orbax manager keeping the latest `max_to_keep` checkpoints."""
  return ocp.CheckpointManager(
    directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)
  )


def restore(ckpt: ocp.CheckpointManager, step: int, like: Any, **extra):
  """Checkpoint `step` restored with the structure and shapes of `like`.

  With no `extra` the checkpoint is the tree itself; otherwise it is a
  composite whose item `tree` is restored like `like` and whose other
  items are restored with the orbax args given (e.g. `meta=JsonRestore()`).
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  tree = ocp.args.StandardRestore(abstract)
  if not extra:
    return ckpt.restore(step, args=tree)
  return ckpt.restore(step, args=ocp.args.Composite(tree=tree, **extra))


def progress_bar(config: ConfigDict, todo: range, done: int) -> tqdm.tqdm:
  """tqdm over `todo` (epochs or steps) after `done` already done; off
  without `config.progress` and on processes other than 0."""
  return tqdm.tqdm(
    todo,
    desc=run_name(config),
    disable=not config.progress or not _writes_files(),
    initial=done,
    total=done + len(todo),
  )


def close_checkpoints(*managers: ocp.CheckpointManager) -> None:
  """Waits for asynchronous saves to finish, then closes the managers."""
  for m in managers:
    m.wait_until_finished()
  for m in managers:
    m.close()


def write_summary(
  workdir: pathlib.Path,
  config: ConfigDict,
  split: str,
  start_time: float,
  status: str,
  **fields: Any,
) -> dict[str, Any]:
  """`<workdir>/summary.json`: `sam_jax.metrics.summarize` of
  `metrics.jsonl` on `split`, then status, label, method, `runtime_s`
  (since `start_time`, a `time.perf_counter()`), `fields` and the config.
  Returns it."""
  records = read_records(workdir / "metrics.jsonl")
  summary = metrics.summarize(records, split)
  summary.update(
    status=status,
    label=run_name(config),
    method=config.method,
    runtime_s=time.perf_counter() - start_time,
    **fields,
    config=json.loads(config.to_json()),
  )
  if _writes_files():
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary
