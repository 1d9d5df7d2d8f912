"""Every script in examples/ runs at tiny size, as a researcher runs it."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = sorted(
  (pathlib.Path(__file__).parent.parent / "examples").glob("*.py")
)


def test_the_four_examples_exist():
  names = {p.stem for p in EXAMPLES}
  assert {
    "linen_loop",
    "nnx_loop",
    "migrate_from_optax_contrib",
    "curvature_analysis",
  } <= names


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_tiny(script, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [sys.executable, str(script), "--tiny", "--out", str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert list(tmp_path.iterdir()), "the example wrote nothing to --out"
