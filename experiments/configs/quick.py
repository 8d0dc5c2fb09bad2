r"""Small runs with no download, on generated images (`synthetic`).

  python -m experiments.cifar --config=experiments/configs/quick.py --workdir=runs/quick
  python -m experiments.cifar --config=experiments/configs/quick.py:tiny --workdir=runs/t

Argument:
  (none)  a one-minute CPU run: ResNet-20 with stochastic depth, 4 epochs.
  tiny    the tests' run: ResNet-8, batch 8, one epoch (the tests feed it 48 images).
Give an image folder instead with --config.dataset=folder --config.data_dir=ROOT.
"""
from experiments.configs import default


VARIANTS = {
    "": {"validation_size": 500, "model.depth": 20, "batch_size": 64, "epochs": 4,
         "learning_rate": 0.05, "eval_batch_size": 500, "log_every_steps": 20},
    "tiny": {"validation_size": 8, "model.depth": 8, "batch_size": 8, "eval_batch_size": 16,
             "epochs": 1, "log_every_steps": 2},
}


def get_config(arg: str = ""):
  if arg not in VARIANTS:
    raise ValueError(f"unknown quick run {arg!r}: give none or 'tiny'.")
  return default.override(default.get_config(),
                          {"dataset": "synthetic", **VARIANTS[arg]})
