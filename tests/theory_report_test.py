"""The theory table's rows: verdicts from the tolerance or the criterion's
parts, the summary line, cells that keep the markdown table intact, and the
JSON."""

import json
import math

import pytest

from theory import report


def test_identity_passes_only_finite_errors_inside_the_tolerance():
  assert report.identity("A3", "c", "m", "p", 1e-13, 1e-12).verdict == "pass"
  assert report.identity("A3", "c", "m", "p", 2e-12, 1e-12).verdict == "fail"
  assert report.identity("A3", "c", "m", "p", math.nan, 1e-12).failed
  # A further condition of the criterion (e.g. "the NME is not 0").
  row = report.identity("B1", "c", "m", "p", 1e-13, 1e-12, also=False)
  assert row.failed and row.value == 1e-13
  assert row.criterion == "p: error <= 1e-12"


def test_claim_verdicts_from_parts_never_fail_the_program():
  verdict = lambda parts: report.claim("A5", "c", "m", "p", 0.4, parts).verdict
  assert verdict([True]) == "holds"
  assert verdict([False]) == "does not hold"
  assert verdict([True, False]) == "partly"
  assert verdict([True, True]) == "holds"
  assert not report.claim("A5", "c", "m", "p", 0.4, [False]).failed
  given = report.claim("A3", "c", "m", "p", 0.1, verdict="partly")
  assert given.verdict == "partly"
  with pytest.raises(ValueError, match="parts"):
    report.claim("A3", "c", "m", "p", 0.1)
  with pytest.raises(ValueError, match="cannot be"):
    report.claim("A3", "c", "m", "p", 0.1, verdict="pass")


def _rows():
  return [
    report.identity("A3", "|x| small", "1", "0", 0.5, 1.0),
    report.identity("B1", "y", "a | b", "0", 2.0, 1.0),
    report.claim("A5", "z", "0.41", "<= 0.2", 0.41, [False]),
    report.claim("B4", "w", "0.01", "in CI", 0.01, [True, True]),
    report.claim("A3", "v", "0.1", "two parts", 0.1, [True, False]),
  ]


def test_table_escapes_pipes_and_marks_failures():
  lines = report.format_table(_rows()).splitlines()
  assert len(lines) == 7
  # Every row has the header's 7 unescaped separators.
  for line in lines:
    assert line.replace("\\|", "").count("|") == 7, line
  assert lines[2].endswith("| **pass** |")
  assert lines[3].endswith("| **FAIL** |")
  assert lines[4].endswith("| **does not hold** |")
  assert "| A5 | claim |" in lines[4]


def test_summary_line_and_json():
  rows = _rows()
  assert report.summary_line(rows) == (
    "identities 1/2 pass · claims: 1 hold, 1 partly, 1 does not hold"
  )
  doc = json.loads(report.to_json(rows, command="python -m theory"))
  assert doc["command"] == "python -m theory"
  assert doc["summary"]["identities_pass"] == 1
  assert doc["summary"]["claims_does_not_hold"] == 1
  assert [r["verdict"] for r in doc["rows"]] == [r.verdict for r in rows]
  assert doc["rows"][2]["tolerance"] is None  # nan is written as null
  assert doc["rows"][2]["value"] == 0.41
