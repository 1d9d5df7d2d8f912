r"""MNIST-1D with 30% symmetric label noise: SGD vs SAM and its variants.

Reproduces the study of Baek et al. (ICLR 2024; PAPERS.md A1-A6) at CPU
scale: a small 1-D CNN on MNIST-1D (generated offline), trained with each
method at the same shared hyperparameters; only a method's own rho / lambda
differ, chosen on a validation split carved from the (noisy) training set.

One method (the config argument is a label of `METHODS`):

  python -m experiments.main \
    --config=experiments/configs/label_noise_mnist1d.py:1-sam \
    --workdir=runs/label_noise/1-sam

  Overrides: --config.rho=0.02 --config.num_seeds=1 --config.num_epochs=20

All methods, their table and plots (the main job):

  python -m experiments.label_noise --workdir=runs/label_noise

Re-tune each method's rho / lambda on the validation split (never on the
test set); it prints the chosen values to copy into `METHODS` below:

  python -m experiments.label_noise --tune --workdir=runs/label_noise_tune \
    --set num_seeds=2

Shared hyperparameters (all methods): CNN1D (3 stride-2 convs of 32
channels, kernel 5, dense 64, ReLU), momentum SGD lr 0.05, momentum 0.9, no
weight decay, constant lr, batch 128, 60 epochs; MNIST-1D 4000 train / 1000
test, 30% symmetric noise. At these SGD memorises the noisy labels (85% of
them by epoch 60) and its test accuracy falls from its peak (~68% at epoch
~12) to ~51%, so early stopping matters as in the paper.

Expected runtime: the main job took 5 min 14 s wall on 2 shared CPU cores
(load ~2-3 from other work); one label alone 20-80 s.
Expected result (main job, 3 seeds, best test accuracy mean ± std, %):
sgd 67.7 ± 0.8, sam 77.1 ± 1.7, 1-sam 75.9 ± 0.3, l-sam 70.7 ± 1.2,
j-sam 76.3 ± 0.1, sgd+reg 72.3 ± 1.0.

Tuning (the command above: 2 seeds, 20% validation split, 60 epochs) took
14.5 + 4.7 min in two passes (the first before the fast 1-SAM path landed,
the second adding the grid's upper values); it chose the values in METHODS
(best validation accuracy against the noisy validation labels). For sam,
1-sam and j-sam the largest rho tried left seeds at chance accuracy (no NaN).
"""

import ml_collections
from ml_collections import config_dict

# Each label's method and its own hyperparameters. The rho / lambda values
# are the ones `--tune` chose on the validation split (see module docstring).
METHODS = {
  "sgd": dict(method="sgd"),
  "sam": dict(method="sam", rho=0.2),
  "1-sam": dict(method="sam", rho=0.02, group_size=1),
  "l-sam": dict(method="l-sam", rho=0.05, group_size=1),
  "j-sam": dict(method="j-sam", rho=0.02, group_size=1),
  "sgd+reg": dict(method="sgd+reg", lambda_w=1e-2, lambda_a=1e-3),
}

# The candidates `--tune` tries for each label: each is a dict of fields.
_RHO = lambda *rhos: tuple({"rho": r} for r in rhos)
TUNE_GRID = {
  "sgd": ({},),  # Nothing to tune: its validation score, for reference.
  "sam": _RHO(0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
  "1-sam": _RHO(0.005, 0.01, 0.02, 0.05),
  "l-sam": _RHO(0.005, 0.01, 0.02, 0.05),
  "j-sam": _RHO(0.005, 0.01, 0.02, 0.05),
  "sgd+reg": tuple(
    {"lambda_w": lw, "lambda_a": la}
    for lw in (1e-3, 1e-2, 1e-1)
    for la in (1e-3, 1e-2)
  ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The shared config, with the method of label `arg` (default "sgd")."""
  label = arg or "sgd"
  if label not in METHODS:
    raise ValueError(f"unknown method label {label!r}; valid: {list(METHODS)}")
  config = ml_collections.ConfigDict()
  config.label = label

  # Method (sam_jax.methods): its own hyperparameters come from METHODS.
  config.method = "sgd"
  config.rho = 0.0  # SAM radius.
  config.group_size = config_dict.placeholder(int)  # None: n-SAM; 1: 1-SAM.
  config.adaptive = False  # ASAM perturbation.
  config.lambda_w = 0.0  # sgd+reg: lambda_w ||head kernel||^2.
  config.lambda_a = 0.0  # sgd+reg: lambda_a mean_i ||features_i||^2.
  # Penalties of sam_jax.regularizers (not used by this study's METHODS).
  config.sigma = 0.0  # weight-noise, trace-h, trace-gn.
  config.num_probes = 1  # trace-h, trace-gn.
  config.estimator = "jvp"  # trace-gn.
  config.squared = False  # gradient penalties: ||g||^2 instead of ||g||.

  # Data: MNIST-1D generated offline, symmetric label noise on the train set.
  config.data = ml_collections.ConfigDict()
  config.data.name = "mnist1d"
  config.data.num_samples = 5000  # Train + test.
  config.data.test_fraction = 0.2
  config.data.seed = 42  # Generation seed: the dataset itself.
  config.data.noise_rate = 0.3
  config.data.noise_kind = "symmetric"
  config.data.val_fraction = 0.0  # > 0: evaluate on a validation split.

  # Model.
  config.model = ml_collections.ConfigDict()
  config.model.name = "cnn1d"
  config.model.channels = (32, 32, 32)  # cnn1d.
  config.model.kernel_size = 5  # cnn1d.
  config.model.dense = (64,)  # cnn1d dense layers; mlp hidden widths.
  config.model.activation = "relu"
  config.model.beta = 1.0  # beta-gelu and relu-synthetic-nme.

  # Optimisation, shared by all methods.
  config.optimizer = "sgd"  # Momentum SGD.
  config.learning_rate = 0.05
  config.momentum = 0.9
  config.weight_decay = 0.0
  config.schedule = "constant"  # Or "cosine".
  config.batch_size = 128
  config.num_epochs = 60

  # Seeds: seed i uses config.seed + i for init, batch order and noise.
  config.seed = 0
  config.num_seeds = 3

  # Evaluation, checkpoints and logging.
  config.eval_every_epochs = 1
  config.eval_batch_size = 1024
  config.checkpoint_every_epochs = 10
  config.progress = True

  config.update(METHODS[label])
  return config
