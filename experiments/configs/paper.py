r"""The paper's runs (Huang et al., 2016, Table 1), one argument each.

  python -m experiments.cifar --config=experiments/configs/paper.py:cifar10 --workdir=runs/c10_sd
  python -m experiments.cifar --config=experiments/configs/paper.py:cifar10,constant \
      --workdir=runs/c10

Argument: a run, then optionally ",constant" for its constant-depth twin (p_L = 1):
  cifar10       CIFAR-10+, ResNet-110 (paper: 5.25% test error; constant depth 6.41%)
  cifar100      CIFAR-100+, ResNet-110 (24.98%; 27.22%)
  svhn          SVHN train + extra, ResNet-152 (1.75%; 1.80%). No augmentation; 50 epochs,
                LR /10 after epochs 30 and 35; validation of 400 per class from train +
                200 per class from extra; evaluation every 200 steps (test error only
                where validation improves).
  cifar10_1202  CIFAR-10+, ResNet-1202 (4.91%; 6.67%). 300 epochs; LR 0.01 for the first
                10 epochs (warm-up), then 0.1, divided by 10 at epochs 150 and 225.
Everything else is `default.py` (the paper's protocol, Sec. 4).
"""
from experiments.configs import default

RUNS = ("cifar10", "cifar100", "svhn", "cifar10_1202")


def get_config(arg: str = "cifar10"):
  run, *variants = (part.strip() for part in arg.split(","))
  if run not in RUNS or any(v != "constant" for v in variants):
    raise ValueError(f"unknown paper run {arg!r}: give one of {', '.join(RUNS)}, "
                     "optionally followed by ',constant'.")
  config = default.get_config()
  if run == "cifar100":
    config.dataset = "cifar100"
  elif run == "svhn":
    config.dataset = "svhn_cropped"
    config.model.depth = 152
    config.epochs = 50
    config.lr_drop_fractions = (0.6, 0.7)
    config.eval_every_steps = 200
    config.checkpoint_every_steps = 2000
    config.test_every_eval = False  # 26k test images every 200 steps: only at new bests
  elif run == "cifar10_1202":
    config.model.depth = 1202
    config.epochs = 300
    config.lr_drop_fractions = (0.5, 0.75)
    config.warmup_epochs = 10.0
    config.warmup_learning_rate = 0.01
  if variants:
    config.survival.p_last = 1.0
  return config
