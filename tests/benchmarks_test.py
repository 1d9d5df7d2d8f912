"""Smoke tests of the benchmark scripts (their numbers are not asserted)."""

import jax
import jax.numpy as jnp

from benchmarks import model_flops


def test_flops_counts_a_matmul():
  f = jax.jit(lambda a, b: a @ b)
  compiled = f.lower(jnp.ones((4, 8)), jnp.ones((8, 3))).compile()
  assert model_flops.flops(compiled) == 2 * 4 * 8 * 3


def test_model_flops_runs_tiny(monkeypatch, capsys):
  argv = ["model_flops", "--width", "2", "--batch", "2", "--norm", "layer"]
  monkeypatch.setattr("sys.argv", argv)
  model_flops.main()
  out = capsys.readouterr().out
  assert "forward" in out and "gradient" in out
