r"""Weight noise vs Hessian-/GN-trace penalties on MNIST-1D (issue 7, B4).

  python -m experiments.weight_noise --workdir=runs/weight_noise

trains every `<method>@<sigma2>` of `experiments/configs/
weight_noise_mnist1d.py` (2 vmapped seeds each, curvature logging on) and
writes `<workdir>/summary.json`, `table.md` (best test accuracy vs sigma^2),
`test_accuracy.png` and `traces.png` (Tr H, Tr GN, Tr NME over training at
the middle sigma^2 of the sweep). `--tiny` / `--set` as in activation_penalty.
"""

import pathlib
import sys

from experiments import report, runner
from experiments.configs import weight_noise_mnist1d as cfg


def main(argv) -> dict:
  workdir, base, tiny = runner.parse_cli(argv, cfg.BASE, cfg.TINY)
  sigma2 = cfg.SIGMA2[-1:] if tiny else cfg.SIGMA2
  runs = cfg.sweep(sigma2=sigma2)
  summary, text = runner.run_and_report(
    workdir,
    runs,
    base,
    lambda own: own["sigma"] ** 2,
    "sigma^2",
    "Weight noise vs trace penalties",
  )
  root = pathlib.Path(workdir)
  shown = sigma2[len(sigma2) // 2]
  top = [label for label in runs if label.endswith(f"@{shown:g}")]
  curv = {
    label: report.load_records(root / label, "curvature.jsonl") for label in top
  }
  runner.plot_curvature(
    curv, ("trace_h", "trace_gn", "trace_nme"), root / "traces.png"
  )
  print(text)
  return summary


if __name__ == "__main__":
  main(sys.argv[1:])
