"""Test-suite setup: 8 simulated CPU devices; a persistent compilation cache.

XLA reads `--xla_force_host_platform_device_count` once, when jax first
initialises its CPU backend, so it is set here, at import time, before any
test module imports jax. Other tests keep running on the first device; the
flag only adds devices and does not slow them down: tests/transform_test.py
took 55.1 and 56.2 s without this file (`--noconftest`), 54.8 and 50.9 s
with it (2 shared CPU cores, load ~4.5).

Most of the suite's time is XLA compiling tiny models, and many tests
compile the same programs (the same tiny model and step in several tests,
files and xdist workers). JAX's persistent compilation cache, keyed on the
program, the compile options and the jax version, so it never changes a
result, lets each program compile once per suite run, and once at all on
a developer's machine (the cache lives in `.pytest_cache/jax`, which
`rm -rf` clears; a clean clone starts cold). An entry being written by one
worker while another reads it fails to decompress; JAX then warns and
compiles. A JAX_COMPILATION_CACHE_DIR set by the caller wins.
"""

import os
import pathlib

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8"
  ).strip()

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_CACHE = _ROOT / ".pytest_cache" / "jax"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
# Cache every program, however small or quick to compile.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
