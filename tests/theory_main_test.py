"""`python -m theory --quick` (the same `check_*` functions at tiny size),
run once.

Every identity passes; every row carries a kind and a verdict; the program
exits 0 with one summary line and writes the table, its JSON and the
figures. Each claim row's measured number is pinned: its verdict may
legitimately change when the code changes, the number must not change
silently (a change here is a finding to explain, then a new pin).
"""

import contextlib
import io
import json
import re

import pytest

from theory import __main__ as theory_main
from theory import report

# The quick run's claims in table order: (id, start of `compared`, value).
# Values measured 2026-12-07 (jax 0.10.2, CPU, float64).
PINNED_CLAIMS = [
  ("A3", "1-SAM's peak test acc beats GD's", 0.0100),
  ("A3", "clean/noisy grad-weight ratio", 7.0),
  ("A3", "1-SAM's peak test acc beats GD's", 0.0275),
  ("A3", "clean/noisy grad-weight ratio", 3.0),
  ("A5", "GD + penalty (lambda: A4 weights at init) tracks", 0.27563),
  ("A5", "GD + penalty (lambda: A4 weights at init) matches", 0.0050),
  ("A5", "GD + penalty (lambda: A4 weights averaged", 0.081077),
  ("A5", "GD + penalty (lambda: A4 weights averaged", 0.0075),
  ("A5", "GD + penalty (lambda: A4 weights of the current", 0.0095941),
  ("A5", "GD + penalty (lambda: A4 weights of the current", 0.0050),
  ("B2", "beta-GELU's same-layer NME lives", -0.90329),
  ("B4", "weight noise", 0.010869),
]
PAPERS_IDS = {f"A{i}" for i in range(1, 7)} | {f"B{i}" for i in range(1, 6)}


def test_quick_run(tmp_path):
  # One test, so that the program runs once whatever worker takes it.
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    rc = theory_main.main(
      ["--quick", "--out", str(tmp_path), "--json", str(tmp_path / "rows.json")]
    )
  assert rc == 0
  doc = json.loads((tmp_path / "rows.json").read_text())
  _check_output(stdout.getvalue(), doc, tmp_path)
  _check_identities(doc["rows"])
  _check_claims(doc["rows"])


def _check_output(stdout, doc, out):
  """One summary line; table.md, table.json (= --json) and the figures."""
  last = stdout.strip().splitlines()[-1]
  assert re.fullmatch(
    r"identities (\d+)/\1 pass · claims: \d+ hold, \d+ partly, \d+ does not "
    r"hold \(in \d+ s\)",
    last,
  ), last
  table = (out / "table.md").read_text()
  assert table.startswith("| id | kind | compared |")
  assert table.strip().splitlines()[-1] == last.rsplit(" (in", 1)[0]
  assert doc == json.loads((out / "table.json").read_text())
  assert doc["command"] == "python -m theory --quick"
  for name in (
    "linear_logistic_init0.png",
    "linear_logistic_init3.png",
    "two_layer_linear_penalty.png",
    "hessian_beta_gelu_concentration.png",
    "hessian_weight_noise.png",
  ):
    assert (out / name).stat().st_size > 0, name


def _check_identities(rows):
  """Every row has a kind, a verdict and a PAPERS.md id; identities pass."""
  for row in rows:
    assert row["id"] in PAPERS_IDS, row
    assert row["verdict"] in report.VERDICTS[row["kind"]], row
  identities = [r for r in rows if r["kind"] == report.IDENTITY]
  assert len(identities) == 13
  for row in identities:
    assert row["verdict"] == report.PASS, row


def _check_claims(rows):
  """Each claim's measured number is its pin."""
  claims = [r for r in rows if r["kind"] == report.CLAIM]
  assert len(claims) == len(PINNED_CLAIMS)
  for row, (id_, start, value) in zip(claims, PINNED_CLAIMS):
    assert (row["id"], row["compared"][: len(start)]) == (id_, start)
    assert row["value"] == pytest.approx(value, rel=1e-3, abs=1e-9), row


def test_bad_json_path_is_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    theory_main.main(
      ["--out", str(tmp_path), "--json", str(tmp_path / "no" / "x.json")]
    )
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "--json" in err and "does not exist" in err
