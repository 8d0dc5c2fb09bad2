"""SVHN (train + extra), ResNet-152, stochastic depth p_L = 0.5 (paper: 1.75%).

No augmentation; 50 epochs, LR 0.1 divided by 10 after epochs 30 and 35; validation of
400 per class from train + 200 per class from extra; evaluation every 200 steps (test error only where validation improves).
"""
from experiments.configs import default


def get_config():
  config = default.get_config()
  config.dataset = "svhn_cropped"
  config.model.depth = 152
  config.epochs = 50
  config.lr_drop_fractions = (0.6, 0.7)
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 2000
  config.test_every_eval = False  # 26k test images every 200 steps: only at new bests
  return config
