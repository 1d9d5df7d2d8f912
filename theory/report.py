"""The result of one theory check, the table `python -m theory` prints, and
the figure helpers the check modules share."""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class CheckResult:
  """One row of the theory table.

  Attributes:
    claim: the statement checked, in a few words.
    measured: what was computed, as a short string (numbers with their spread
      where they are random).
    predicted: what the theory says, as a short string.
    error: the size of the disagreement (relative or absolute, as `claim`
      says); nan where the check is qualitative.
    tolerance: the largest `error` that passes.
    passed: whether the claim holds; usually `error <= tolerance`, but a check
      may set it from a qualitative condition.
    figure: path of a saved figure, if any.
  """

  claim: str
  measured: str
  predicted: str
  error: float
  tolerance: float
  passed: bool
  figure: str | None = None


def within(
  claim: str,
  measured: str,
  predicted: str,
  error: float,
  tolerance: float,
  figure: str | None = None,
) -> CheckResult:
  """A result that passes when `error <= tolerance` (and is finite)."""
  error = float(error)
  passed = math.isfinite(error) and error <= tolerance
  return CheckResult(
    claim, measured, predicted, error, float(tolerance), passed, figure
  )


def format_table(results: Sequence[CheckResult]) -> str:
  """A markdown table: claim | measured | predicted | error | tol | pass."""
  header = "| claim | measured | predicted | error | tolerance | pass |"
  rule = "|---|---|---|---:|---:|---|"

  def cell(text: str) -> str:
    return text.replace("|", "\\|")  # A bare | would split the cell.

  rows = [
    f"| {cell(r.claim)} | {cell(r.measured)} | {cell(r.predicted)} "
    f"| {r.error:.2e} "
    f"| {r.tolerance:.0e} | {'PASS' if r.passed else 'FAIL'} |"
    for r in results
  ]
  return "\n".join([header, rule, *rows])


def pyplot():
  """`matplotlib.pyplot` on the file-only Agg backend (imported lazily)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig, path, dpi: int = 120) -> pathlib.Path:
  """Lays out `fig`, writes it to `path` and closes it; returns the path."""
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=dpi)
  pyplot().close(fig)
  return path
