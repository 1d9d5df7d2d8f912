"""The rows of the theory table, their verdicts, the table and its JSON, and
the figure helpers the check modules share.

Two kinds of row (`../shared/DESIGN.md`, theory):

- **identity**: sam_jax computes what the math says (a gradient equals a
  closed form, H = GN + NME, ...). Verdict `pass` / `fail` against the
  tolerance in the row; one `fail` makes `python -m theory` exit 1.
- **claim**: what a paper says happens (SAM beats GD under label noise, a
  penalty tracks J-SAM, ...). Verdict `holds` / `partly` / `does not hold`
  from a criterion fixed in the code before the run; a claim the
  measurement does not support is a finding and never changes the exit
  status.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

IDENTITY, CLAIM = "identity", "claim"
PASS, FAIL = "pass", "fail"
HOLDS, PARTLY, DOES_NOT_HOLD = "holds", "partly", "does not hold"
VERDICTS = {IDENTITY: (PASS, FAIL), CLAIM: (HOLDS, PARTLY, DOES_NOT_HOLD)}


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of the theory table.

  Attributes:
    id: the section of `../shared/PAPERS.md` it checks ("A3", "B1", ...).
    kind: `IDENTITY` or `CLAIM`.
    compared: what is compared, in a few words, with the setup.
    measured: what was computed, as a short string (numbers with their
      spread where they are random).
    criterion: what makes an identity pass or a claim hold.
    verdict: `pass` / `fail` (identity), `holds` / `partly` /
      `does not hold` (claim).
    value: the row's headline number: an identity's error, a claim's
      statistic (the one its criterion reads first). The tests pin it.
    tolerance: an identity's largest passing error; a claim's threshold on
      `value` (nan where the criterion is not one threshold).
    figure: path of a saved figure, if any.
  """

  id: str
  kind: str
  compared: str
  measured: str
  criterion: str
  verdict: str
  value: float
  tolerance: float
  figure: str | None = None

  def __post_init__(self):
    if self.verdict not in VERDICTS.get(self.kind, ()):
      raise ValueError(f"a {self.kind} row cannot be {self.verdict!r}")

  @property
  def failed(self) -> bool:
    """An identity that does not hold: `python -m theory` exits 1."""
    return self.kind == IDENTITY and self.verdict == FAIL


def identity(
  id: str,
  compared: str,
  measured: str,
  criterion: str,
  error: float,
  tolerance: float,
  *,
  also: bool = True,
  figure: str | None = None,
) -> Row:
  """An identity row: `pass` when `error <= tolerance` (finite) and `also`
  (a further condition the row states in `criterion`, e.g. that the
  compared quantity is not 0)."""
  error = float(error)
  ok = math.isfinite(error) and error <= tolerance and bool(also)
  return Row(
    id, IDENTITY, compared, f"error {error:.1e}; {measured}",
    f"{criterion}: error <= {tolerance:.0e}", PASS if ok else FAIL, error,
    float(tolerance), figure,
  )  # fmt: skip


def claim(
  id: str,
  compared: str,
  measured: str,
  criterion: str,
  value: float,
  parts: Sequence[bool] = (),
  *,
  verdict: str | None = None,
  tolerance: float = math.nan,
  figure: str | None = None,
) -> Row:
  """A claim row. From `parts` (the parts of its criterion): `holds` when
  every part is met, `does not hold` when none is, `partly` in between (a
  criterion of one part is met or not). A criterion that is not a list of
  parts gives its `verdict` itself (and says how in `criterion`)."""
  if verdict is None:
    parts = [bool(p) for p in parts]
    if not parts:
      raise ValueError("a claim needs the parts of its criterion or a verdict")
    verdict = (
      HOLDS if all(parts) else DOES_NOT_HOLD if not any(parts) else PARTLY
    )
  return Row(
    id, CLAIM, compared, measured, criterion, verdict, float(value),
    float(tolerance), figure,
  )  # fmt: skip


def summary(rows: Sequence[Row]) -> dict[str, int]:
  """Counts: identities (passed / all) and claims by verdict."""
  ids = [r for r in rows if r.kind == IDENTITY]
  claims = [r.verdict for r in rows if r.kind == CLAIM]
  return {
    "identities": len(ids),
    "identities_pass": sum(r.verdict == PASS for r in ids),
    "claims": len(claims),
    **{
      f"claims_{v.replace(' ', '_')}": claims.count(v) for v in VERDICTS[CLAIM]
    },
  }


def summary_line(rows: Sequence[Row]) -> str:
  """`identities 13/13 pass · claims: 9 hold, 1 partly, 2 does not hold`."""
  s = summary(rows)
  return (
    f"identities {s['identities_pass']}/{s['identities']} pass · claims: "
    f"{s['claims_holds']} hold, {s['claims_partly']} partly, "
    f"{s['claims_does_not_hold']} does not hold"
  )


def format_table(rows: Sequence[Row]) -> str:
  """A markdown table: id | kind | compared | measured | criterion | verdict
  (a failing identity's in capitals)."""
  header = "| id | kind | compared | measured | criterion | verdict |"
  rule = "|---|---|---|---|---|---|"

  def cell(text: str) -> str:
    return text.replace("|", "\\|")  # A bare | would split the cell.

  lines = [header, rule]
  for r in rows:
    verdict = r.verdict.upper() if r.failed else r.verdict
    lines.append(
      f"| {r.id} | {r.kind} | {cell(r.compared)} | {cell(r.measured)} "
      f"| {cell(r.criterion)} | **{verdict}** |"
    )
  return "\n".join(lines)


def to_json(rows: Sequence[Row], **meta: Any) -> str:
  """The rows as JSON (`meta` first, then `summary` and `rows`); a
  non-finite number is written as null."""

  def finite(x):
    return x if not isinstance(x, float) or math.isfinite(x) else None

  records = [
    {k: finite(v) for k, v in dataclasses.asdict(r).items()} for r in rows
  ]
  doc = {**meta, "summary": summary(rows), "rows": records}
  return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


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
