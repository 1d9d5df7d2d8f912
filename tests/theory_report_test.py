"""The theory table: pass/fail from the tolerance, and cells that keep the
markdown table intact."""

import math

from theory.report import format_table, within


def test_within_passes_only_finite_errors_inside_the_tolerance():
  assert within("c", "m", "p", 1e-13, 1e-12).passed
  assert not within("c", "m", "p", 2e-12, 1e-12).passed
  assert not within("c", "m", "p", math.nan, 1e-12).passed


def test_table_escapes_pipes_and_marks_failures():
  rows = [
    within("|x| small", "1", "0", 0.5, 1.0),
    within("y", "a | b", "0", 2.0, 1.0),
  ]
  lines = format_table(rows).splitlines()
  assert len(lines) == 4
  # Every row has the header's 7 unescaped separators.
  for line in lines:
    assert line.replace("\\|", "").count("|") == 7, line
  assert lines[2].endswith("| PASS |") and lines[3].endswith("| FAIL |")
