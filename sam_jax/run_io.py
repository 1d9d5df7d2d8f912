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

Faults (a kill, a full disk, a second run): `lock_workdir` refuses a second
run naming the process that holds the workdir (the lock dies with its
process); JSON files are replaced atomically, a JSONL line cut by a kill is
dropped with a warning, any other damaged file is a `WorkdirError` naming
it; `save_checkpoint` writes each checkpoint's SHA-256 sums beside it, and
`restore_latest` restores the newest checkpoint that matches them, restores
and is finite, moving each damaged one aside to `<workdir>/damaged/`. A
SIGTERM is recorded by `Preemption`: the trainers checkpoint, write a
"preempted" summary and stop; a rerun resumes.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import signal
import socket
import sys
import time
from typing import Any, Iterator, Optional

import jax
import ml_collections
import numpy as np
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


class WorkdirError(ValueError):
  """A workdir file that cannot be used as it is (one line, naming it)."""


def warn(message: str) -> None:
  """One line on stderr: what the run did about a damaged file."""
  print(f"warning: {message}", file=sys.stderr, flush=True)


def _writes_files() -> bool:
  return jax.process_index() == 0


def write_atomic(path: pathlib.Path, text: str) -> None:
  """`path` holds either its old or its new text, whatever kills the
  process (a temporary file in the same directory, then `os.replace`)."""
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with tmp.open("w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WorkdirError(
      f"{path} is damaged ({e}); move it aside or use a new workdir"
    ) from None


@contextlib.contextmanager
def lock_workdir(workdir: pathlib.Path) -> Iterator[None]:
  """Holds `<workdir>/.lock` while a run writes the workdir.

  A second run (another process, or the same one) gets a `WorkdirError`
  naming the holder's process id and host. The lock is an `flock`, which
  the kernel releases when its process dies, so a lock left by a killed run
  is simply taken over. Only process 0 locks (it alone writes).
  """
  if not _writes_files():
    yield
    return
  path = pathlib.Path(workdir) / ".lock"
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
      raise WorkdirError(
        f"workdir {workdir} is in use by {holder or 'another run'} "
        f"(lock {path}); wait for it to end or use another workdir"
      ) from None
    os.ftruncate(fd, 0)
    holder = f"process {os.getpid()} on {socket.gethostname()}"
    os.pwrite(fd, holder.encode(), 0)
    yield
  finally:
    os.close(fd)  # Releases the flock.


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
    old = _result_fields(_read_json(path))
    new = _result_fields(config_dict)
    if old != new:
      diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      raise WorkdirError(
        f"workdir {workdir} holds a run with a different config (fields "
        f"{diff}); use a new workdir"
      )
  write_atomic(path, json.dumps(config_dict, indent=2))


def read_records(path: pathlib.Path) -> list[dict]:
  """The records of a JSONL file, `[]` if there is none.

  A last line without its newline that does not parse was cut by a kill
  mid-write: it is dropped from the file with a warning. Any other line
  that does not parse is a `WorkdirError` naming the file and line.
  """
  if not path.exists():
    return []
  text = path.read_text(errors="replace")
  lines = text.split("\n")
  records = []
  for i, line in enumerate(lines):
    if not line:
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:  # No newline after it: a cut write.
        warn(f"dropped the cut last line {i + 1} of {path}")
        write_records(path, records, "w")
        break
      raise WorkdirError(
        f"{path} line {i + 1} is damaged ({e}); move the file aside or "
        "use a new workdir"
      ) from None
  return records


def write_records(path: pathlib.Path, records: list[dict], mode: str) -> None:
  """Writes (`mode="w"`, atomically) or appends (`"a"`) one JSON line per
  record."""
  if not _writes_files():
    return
  lines = "".join(json.dumps(r) + "\n" for r in records)
  if mode == "w":
    write_atomic(path, lines)
    return
  with path.open(mode) as f:
    f.write(lines)


def drop_records_after(path: pathlib.Path, last: int, field: str) -> None:
  """Rewrites a JSONL file without its records whose `field` (epoch or
  step) is past `last`: a resume from checkpoint `last` redoes them."""
  kept = [r for r in read_records(path) if r[field] <= last]
  write_records(path, kept, "w")


def evaluation_epochs(config: ConfigDict) -> list[int]:
  """The epochs after which the trainers evaluate and write metrics: every
  `eval_every_epochs`-th and the last."""
  n, every = config.num_epochs, config.eval_every_epochs
  return [e for e in range(1, n + 1) if e % every == 0 or e == n]


def metrics_cover(
  path: pathlib.Path, due: list[int], field: str, seeds: list[int]
) -> Optional[int]:
  """The last `field` value (epoch or step) up to which the records of
  `path` hold every record due: one per seed at each value of `due` (the
  evaluations, ascending). None when none is missing. A checkpoint past it
  would skip the evaluation of a record that was lost (a cut last line):
  `restore_latest(..., newest=)` moves it aside."""
  have = {(r[field], r["seed"]) for r in read_records(path)}
  for value in due:
    if any((value, s) not in have for s in seeds):
      return value - 1
  return None


def checkpoint_manager(
  directory: pathlib.Path, max_to_keep: int
) -> ocp.CheckpointManager:
  """An orbax manager keeping the latest `max_to_keep` checkpoints."""
  return ocp.CheckpointManager(
    directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)
  )


CHECKSUMS = "sha256sums.json"


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(
    p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS
  )


def save_checkpoint(ckpt: ocp.CheckpointManager, step: int, args: Any) -> None:
  """`ckpt.save(step, args)`, finished, then `<step>/sha256sums.json`: the
  SHA-256 of every file of the checkpoint, which `restore_latest` checks
  (flipped bytes that leave the values finite are damage too)."""
  ckpt.save(step, args=args)
  ckpt.wait_until_finished()
  if not _writes_files():
    return
  folder = pathlib.Path(ckpt.directory) / str(step)
  sums = {str(p.relative_to(folder)): _sha256(p) for p in _files(folder)}
  write_atomic(folder / CHECKSUMS, json.dumps(sums, indent=1))


def _checksum_damage(folder: pathlib.Path) -> Optional[str]:
  """Why checkpoint `folder` does not match its checksums (None if it does,
  or if it has none: written before checksums, or killed before them)."""
  path = folder / CHECKSUMS
  if not path.exists():
    return None
  try:
    want = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError):
    return f"{path} is damaged"
  for name, digest in want.items():
    file = folder / name
    if not file.is_file():
      return f"{file} is missing"
    if _sha256(file) != digest:
      return f"{file} does not match its SHA-256 in {CHECKSUMS}"
  return None


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


def _finite(tree: Any) -> bool:
  leaves = [np.asarray(a) for a in jax.tree.leaves(tree)]
  return all(
    np.isfinite(a).all() for a in leaves if np.issubdtype(a.dtype, np.inexact)
  )


def _move_aside(ckpt: ocp.CheckpointManager, step: int, why: str) -> None:
  """Moves checkpoint `step` to `<workdir>/damaged/` (never deleted)."""
  source = pathlib.Path(ckpt.directory) / str(step)
  damaged = source.parent.parent / "damaged"
  damaged.mkdir(exist_ok=True)
  target = damaged / f"{source.parent.name}-{step}"
  n = 1
  while target.exists():
    n += 1
    target = damaged / f"{source.parent.name}-{step}.{n}"
  shutil.move(source, target)
  warn(f"checkpoint {source} is damaged ({why}); moved to {target}")


def restore_latest(
  ckpt: ocp.CheckpointManager,
  like: Any,
  *,
  newest: Optional[int] = None,
  **extra: Any,
) -> tuple[int, Optional[Any]]:
  """`(step, restored)` of the newest checkpoint that restores (`restore`
  with `like` and `extra`) and holds only finite values; `(0, None)` if
  there is none. Each newer one that does not is moved aside to
  `<workdir>/damaged/` with a warning line naming it.

  `newest`: the last step the run's metrics cover (their records up to it
  are all there). A checkpoint past it is moved aside the same way, so
  that the steps whose records were lost are run and evaluated again.
  """
  items = ["tree", *extra] if extra else ["default"]
  ckpt.reload()
  for step in sorted(ckpt.all_steps(), reverse=True):
    folder = pathlib.Path(ckpt.directory) / str(step)
    missing = [i for i in items if not (folder / i).is_dir()]
    if newest is not None and step > newest:
      why = f"newer than the metrics, which are complete up to {newest}"
    elif missing:
      # Checked before orbax sees it: a restore of a checkpoint with an
      # item folder gone leaves the manager unable to restore any other.
      why = f"item folder {folder / missing[0]} is missing"
    elif damage := _checksum_damage(folder):
      why = damage
    else:
      try:
        restored = restore(ckpt, step, like, **extra)
      except Exception as e:  # noqa: BLE001 - any damage: try an older one
        first = (str(e).strip().splitlines() or [""])[0][:160]
        why = f"{type(e).__name__}: {first}"
      else:
        if _finite(restored.tree if extra else restored):
          return step, restored
        why = "non-finite values"
    if _writes_files():
      _move_aside(ckpt, step, why)
    ckpt.reload()
  return 0, None


class Preemption:
  """Records a SIGTERM so that the loop can checkpoint and stop cleanly.

  Only with one process: on a multi-host run each host may get the signal
  at a different step, so there orbax's `reached_preemption` (jax's
  preemption sync point) decides instead.
  """

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    if jax.process_count() == 1:
      try:
        self._old = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # Not the main thread: no handler, no harm.
        self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


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
    write_atomic(workdir / "summary.json", json.dumps(summary, indent=2))
  return summary
