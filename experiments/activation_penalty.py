r"""Gradient penalty vs activation on MNIST-1D (issue 7, PAPERS.md B3/B5).

  python -m experiments.activation_penalty --workdir=runs/activation_penalty

trains every `<group>@<rho>` of `experiments/configs/
activation_penalty_mnist1d.py` (SAM / PSAM / GN-only update with ReLU, GELU,
beta-GELU, NME-ablated GELU, ReLU + synthetic NME), 2 vmapped seeds each,
and writes `<workdir>/summary.json`, `table.md` (best test accuracy vs rho,
mean ± std over seeds) and `test_accuracy.png`. `--tiny` shrinks everything
(tests); `--set field=value` overrides a field for every run.
"""

import sys

from experiments import runner
from experiments.configs import activation_penalty_mnist1d as cfg


def main(argv) -> dict:
  workdir, base, tiny = runner.parse_cli(argv, cfg.BASE, cfg.TINY)
  runs = (
    cfg.sweep(
      ("sam-gelu", "psam-relu", "psam-relu-synthetic-nme"), cfg.RHOS[:2]
    )
    if tiny
    else cfg.sweep()
  )
  summary, text = runner.run_and_report(
    workdir,
    runs,
    base,
    lambda own: own["rho"],
    "rho",
    "Gradient penalty vs activation",
  )
  print(text)
  return summary


if __name__ == "__main__":
  main(sys.argv[1:])
