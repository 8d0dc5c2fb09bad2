"""CIFAR-100+, ResNet-110, stochastic depth p_L = 0.5 (paper: 24.98% test error)."""
from experiments.configs import default


def get_config():
  config = default.get_config()
  config.dataset = "cifar100"
  return config
