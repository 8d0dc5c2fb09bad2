"""CIFAR-10+, ResNet-1202, stochastic depth p_L = 0.5 (paper: 4.91%; constant depth 6.67%).

300 epochs; LR 0.01 for the first 10 epochs (warm-up), then 0.1, divided by 10 at epochs
150 and 225.
"""
from experiments.configs import default


def get_config():
  config = default.get_config()
  config.model.depth = 1202
  config.epochs = 300
  config.lr_drop_fractions = (0.5, 0.75)
  config.warmup_epochs = 10.0
  config.warmup_learning_rate = 0.01
  return config
