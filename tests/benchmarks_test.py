"""Smoke tests of the benchmark scripts (their numbers are not asserted)."""

import jax
import jax.numpy as jnp

import sam_jax as sj
from benchmarks import model_flops, step_cost, timing


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


def test_timing_interleaves_rounds_after_a_first_call():
  calls = []
  runs = {name: (lambda n, name=name: calls.append((name, n))) for name in "ab"}
  results = timing.time_interleaved(runs, reps=2, steps=3)
  assert calls == [("a", 1), ("b", 1)] + [("a", 3), ("b", 3)] * 2
  assert all(
    len(r["times"]) == 2 and r["first_s"] >= 0 for r in results.values()
  )
  assert timing.medians({"a": dict(times=[3.0, 1.0, 2.0])}) == {"a": 2.0}


def test_stepper_carries_the_state():
  seen = []
  run = timing.stepper(lambda s, d: (s + d, seen.append(s)), 0, 2)
  run(2)
  run(1)
  assert seen == [0, 2, 4]


def test_step_cost_idioms_runs_tiny(capsys):
  # One model and two rows keep it to six compilations; `--idioms --tiny`
  # alone runs every row on both CNNs.
  step_cost.main(
    ["--idioms", "--tiny", "--models", "cnn3", "--methods", "1-sam"]
  )
  out = capsys.readouterr().out
  header = next(
    line for line in out.splitlines() if line.startswith("| method")
  )
  assert header.split(" | ")[2:] == [
    "cnn3 linen-vars",
    "cnn3 linen-params",
    "cnn3 nnx |",
  ]
  for idiom in step_cost.IDIOMS:
    assert f"# cnn3 {idiom}: 1-SAM fast path: True\n" in out
  rows = [line.split(" | ")[0] for line in out.splitlines() if line[:2] == "| "]
  assert rows == ["| method", "| sgd", "| 1-sam"]


def test_step_cost_idiom_models_take_the_fast_path():
  """The CIFAR-shaped 2-D CNN (three idioms) and ResNet-18-LN (linen
  idioms) of `--idioms`, tiny: 1-SAM's fast path applies to each."""
  built = 0
  for name in ("cnn2d", "resnet18-ln"):
    model = step_cost.idiom_models(tiny=True)[name]
    batch = step_cost.make_batch((4, *model.shape))
    for idiom in step_cost.IDIOMS:
      out = step_cost.build_idiom(model, idiom, batch[0])
      if out is None:
        assert (name, idiom) == ("resnet18-ln", "nnx")
        continue
      obj, params = out
      verdict = sj.fast_path(obj, params, batch)
      assert verdict, (name, idiom, verdict.reason)
      built += 1
  assert built == 5


def test_step_cost_default_table_runs_tiny(capsys):
  step_cost.main(["--tiny", "--methods", "sj.sam transform (n)"])
  out = capsys.readouterr().out
  assert "| sj.sam transform (n) |  | " in out
  assert "# MLP (8,8): SGD step" in out


def test_curvature_facade_runs_tiny(capsys):
  from benchmarks import curvature_facade

  curvature_facade.main(["--tiny"])
  out = capsys.readouterr().out
  for query in ("of='h'", "of='gn'", "of='nme'", "trace(", "density("):
    assert query in out
  assert "| **total** |" in out
