"""Test-suite setup: 8 simulated CPU devices for the data-parallel tests.

XLA reads `--xla_force_host_platform_device_count` once, when jax first
initialises its CPU backend, so it is set here, at import time, before any
test module imports jax. Other tests keep running on the first device; the
flag only adds devices and does not slow them down: tests/transform_test.py
took 55.1 and 56.2 s without this file (`--noconftest`), 54.8 and 50.9 s
with it (2 shared CPU cores, load ~4.5).
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8"
  ).strip()
