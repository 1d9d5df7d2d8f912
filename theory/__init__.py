"""Numerical checks of the papers' linear and two-layer linear results.

`python -m theory` runs every check at full size and prints one table; each
check is a `check_*` function usable at tiny size, and the tests call the same
functions. Every gradient and curvature product goes through `sam_jax`.
"""
