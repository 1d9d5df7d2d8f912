"""`python -m theory [--out DIR] [--json PATH] [--quick]`: every check, one
table.

Each row is an identity (verdict pass / fail) or a claim of a paper
(verdict holds / partly / does not hold; `theory.report`). Prints the table
and one summary line; writes `table.md` and `table.json` and the figures to
`--out` (default `docs/theory`), and the JSON also to `--json PATH`. Exits 1
if an identity fails (a claim's verdict never changes the exit status), 2
with one line naming the path if a file cannot be written.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys
import time

import jax

from sam_jax.run_io import write_atomic
from theory import hessian, linear_logistic, two_layer_linear
from theory.report import format_table, summary_line, to_json

MODULES = (linear_logistic, two_layer_linear, hessian)


def run(out: pathlib.Path, quick: bool = False) -> list:
  """Every row of every module, in float64, figures into `out`."""
  rows = []
  with jax.enable_x64(True):
    for module in MODULES:
      rows.extend(module.run_all(out, quick=quick))
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m theory")
  parser.add_argument(
    "--out",
    default="docs/theory",
    help="directory for the figures, table.md and table.json",
  )
  parser.add_argument("--json", help="also write the rows as JSON here")
  parser.add_argument(
    "--quick", action="store_true", help="tiny sizes (what the tests run)"
  )
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    parser.error(f"--out {out}: {e.strerror}")
  if args.json and not pathlib.Path(args.json).parent.is_dir():
    parser.error(f"--json {args.json}: its directory does not exist")
  start = time.perf_counter()
  rows = run(out, quick=args.quick)
  seconds = time.perf_counter() - start
  table, line = format_table(rows), summary_line(rows)
  print(table)
  print(f"\n{line} (in {seconds:.0f} s)")
  cmd = "python -m theory" + (" --quick" if args.quick else "")
  doc = to_json(
    rows,
    command=cmd,
    date=datetime.date.today().isoformat(),
    runtime_s=round(seconds, 1),
    jax_version=jax.__version__,
    backend=jax.default_backend(),
  )
  files = {out / "table.md": f"{table}\n\n{line}\n", out / "table.json": doc}
  if args.json:
    files[pathlib.Path(args.json)] = doc
  for path, text in files.items():
    try:
      write_atomic(path, text)
    except OSError as e:
      print(f"error: cannot write {path}: {e.strerror}", file=sys.stderr)
      return 2
  return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
