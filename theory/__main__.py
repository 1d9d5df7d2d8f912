"""`python -m theory [--out DIR] [--quick]`: run every check, print the table.

Exits with status 1 if any row fails. Figures are written to `--out`
(default `docs/theory`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax

from theory import hessian, linear_logistic, two_layer_linear
from theory.report import format_table

MODULES = (linear_logistic, two_layer_linear, hessian)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m theory")
  parser.add_argument(
    "--out", default="docs/theory", help="directory for figures and table.md"
  )
  parser.add_argument(
    "--quick", action="store_true", help="tiny sizes (what the tests run)"
  )
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  start = time.time()
  results = []
  with jax.enable_x64(True):
    for module in MODULES:
      results.extend(module.run_all(out, quick=args.quick))
  table = format_table(results)
  seconds = time.time() - start
  print(table)
  print(
    f"\n{sum(r.passed for r in results)}/{len(results)} passed "
    f"in {seconds:.0f} s"
  )
  (out / "table.md").write_text(table + "\n")
  return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
