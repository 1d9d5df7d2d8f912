"""Errors the user or the machine causes, as one line for the CLIs.

`user_error(e)` says whether an exception is one (a bad or unknown config
field, a busy, damaged, unwritable or misplaced workdir, a non-finite loss,
a full disk) and gives its line; anything else is a bug of the program and
keeps its traceback. `one_line_errors` runs a CLI's body with that rule:
`error: ...` on stderr, exit status 2 (`debug=True`: the traceback).
"""

import errno
import sys
from typing import Optional

from sam_jax import run_io, train_config

# OS errors of the machine or the user's paths, not of the program.
_MACHINE_ERRNOS = {
  errno.EACCES,
  errno.EPERM,
  errno.EROFS,
  errno.ENOSPC,
  errno.EDQUOT,
  errno.EEXIST,
  errno.ENOTDIR,
  errno.EISDIR,
}


def user_error(e: BaseException) -> Optional[str]:
  """The one-line message of an error the user or the machine caused, or
  None for anything else (a bug: its traceback is shown)."""
  if isinstance(
    e, (train_config.ConfigError, run_io.WorkdirError, FloatingPointError)
  ):
    return str(e).strip().splitlines()[0]
  if isinstance(e, OSError) and e.errno in _MACHINE_ERRNOS:
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or e}{where}"
  text = str(e)
  if "RESOURCE_EXHAUSTED" in text or "No space left on device" in text:
    first = next((line for line in text.splitlines() if line.strip()), "")
    return f"the disk is full; free space and rerun to resume ({first[:200]})"
  return None


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def one_line_errors(fn, *args, debug: bool = False):
  """`fn(*args)`, with a user or machine error (`user_error`) printed as
  one line `error: ...` and exit status 2, unless `debug`."""
  try:
    return fn(*args)
  except Exception as e:  # noqa: BLE001 - sorted by user_error
    message = user_error(e)
    if message is None or debug:
      raise
    fail(message)
