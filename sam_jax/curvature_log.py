"""Curvature logged during training: top Ritz values and traces of H, GN, NME.

On a fixed evaluation set of minibatches stacked `[NB, B, ...]` (the products
are averaged over them with `curvature.mean_over_batches`, so they are those
of the loss on the whole set), one logging event computes (PAPERS.md B1, B4):

  h_top, gn_top, nme_top  the `top_k` largest Ritz values of H, GN, NME
                          (Lanczos, `lanczos_iters` steps, descending)
  nme_min                 the smallest Ritz value of NME (it is indefinite)
  trace_h, trace_gn       Tr H and Tr GN (Hutchinson or Hutch++ with
                          `trace_probes` matvecs each)
  trace_nme               trace_h - trace_gn (same probes for both)

`make_curvature_fn(obj, config)` returns a jitted
`(params, batches, key) -> dict of arrays`; `stacked_seeds=True` vmaps it over
a leading seed axis of params, key and the labels of the batches (the
trainer's stacked seeds; the inputs are shared). Config block
`config.curvature` (all fields optional, defaults in `DEFAULTS`):

  every_epochs   0 = off; else log every that many epochs (and at the end)
  num_batches    minibatches in the fixed evaluation set
  batch_size     examples per minibatch
  lanczos_iters  Lanczos steps per matrix
  top_k          Ritz values kept (<= lanczos_iters)
  trace_probes   matvecs per trace estimate
  estimator      "hutchinson" or "hutch++" (needs trace_probes >= 3)

Cost of one event per seed: `3 * lanczos_iters + 2 * trace_probes` matvecs,
each over `num_batches * batch_size` examples.
"""

import functools
from typing import Any, Callable

import jax
import ml_collections

from sam_jax import curvature, spectral
from sam_jax.objective import Batch, Objective, Params

Array = jax.Array
DEFAULTS = dict(
  every_epochs=0,
  num_batches=2,
  batch_size=256,
  lanczos_iters=20,
  top_k=3,
  trace_probes=10,
  estimator="hutchinson",
)
ESTIMATORS = ("hutchinson", "hutch++")
_INT_FIELDS = ("num_batches", "batch_size", "lanczos_iters", "top_k")


def resolve_config(block: Any) -> ml_collections.ConfigDict:
  """`config.curvature` with defaults filled in and checked.

  Raises:
    ValueError: an unknown field or a bad value, naming the field.
  """
  given = dict(block or {})
  unknown = set(given) - set(DEFAULTS)
  if unknown:
    raise ValueError(
      f"config.curvature: unknown fields {sorted(unknown)}; "
      f"valid: {sorted(DEFAULTS)}"
    )
  c = {**DEFAULTS, **given}

  def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)

  if not (is_int(c["every_epochs"]) and c["every_epochs"] >= 0):
    raise ValueError(
      f"config.curvature.every_epochs must be an int >= 0, got "
      f"{c['every_epochs']!r}"
    )
  for field in _INT_FIELDS:
    if not (is_int(c[field]) and c[field] >= 1):
      raise ValueError(
        f"config.curvature.{field} must be an int >= 1, got {c[field]!r}"
      )
  if c["top_k"] > c["lanczos_iters"]:
    raise ValueError(
      f"config.curvature.top_k ({c['top_k']}) must be <= lanczos_iters "
      f"({c['lanczos_iters']})"
    )
  if c["estimator"] not in ESTIMATORS:
    raise ValueError(
      f"config.curvature.estimator must be one of {ESTIMATORS}, got "
      f"{c['estimator']!r}"
    )
  minimum = 3 if c["estimator"] == "hutch++" else 1
  if not (is_int(c["trace_probes"]) and c["trace_probes"] >= minimum):
    raise ValueError(
      f"config.curvature.trace_probes must be an int >= {minimum} for "
      f"{c['estimator']}, got {c['trace_probes']!r}"
    )
  return ml_collections.ConfigDict(c)


def curvature_stats(
  obj: Objective, params: Params, batches: Batch, key: Array, config: Any
) -> dict[str, Array]:
  """One logging event for one parameter vector (not jitted).

  Args:
    obj: model and loss.
    params: parameters (one seed).
    batches: `(x [NB, B, ...], y [NB, B, ...])`.
    key: PRNG key (Lanczos start vectors and trace probes).
    config: a resolved `config.curvature` (`resolve_config`).

  Returns:
    The dict of the module docstring.
  """
  products = {
    name: functools.partial(
      curvature.mean_over_batches(fn), obj, params, batches
    )
    for name, fn in (
      ("h", curvature.hvp),
      ("gn", curvature.gnvp),
      ("nme", curvature.nmevp),
    )
  }
  k_lz, k_tr = jax.random.split(key)
  keys = dict(zip(products, jax.random.split(k_lz, 3)))
  out = {}
  for name, mv in products.items():
    # Rolled loop: compiles once per matrix regardless of lanczos_iters.
    # Unrolling (faster for a bare HVP on CPU, see sam_jax.spectral) buys
    # nothing here: the products already run inside mean_over_batches'
    # lax.scan. Measured on CNN1D, 2 x 256 examples, 20 steps, H/GN/NME, 2
    # shared CPU cores: per event 17.3 s rolled vs 16.1 s unrolled, compile
    # 27 s vs 86 s.
    ritz = spectral.lanczos(
      mv, params, config.lanczos_iters, keys[name], unroll=False
    )
    out[f"{name}_top"] = ritz[::-1][: config.top_k]
    if name == "nme":
      out["nme_min"] = ritz[0]
  trace = (
    spectral.hutchpp_trace
    if config.estimator == "hutch++"
    else spectral.hutchinson_trace
  )
  for name in ("h", "gn"):
    out[f"trace_{name}"] = trace(
      products[name], params, k_tr, config.trace_probes
    )
  out["trace_nme"] = out["trace_h"] - out["trace_gn"]
  return out


def make_curvature_fn(
  obj: Objective, config: Any, *, stacked_seeds: bool = False
) -> Callable[[Params, Batch, Array], dict[str, Array]]:
  """Jitted `curvature_stats` with `obj` and `config` bound.

  With `stacked_seeds`, params and key carry a leading seed axis S, and so
  do the labels of the batches (`y [S, NB, B]`); the inputs `x` are shared.
  """
  config = resolve_config(config)
  fn = lambda p, b, k: curvature_stats(obj, p, b, k, config)
  if stacked_seeds:
    fn = jax.vmap(fn, in_axes=(0, (None, 0), 0))
  return jax.jit(fn)
