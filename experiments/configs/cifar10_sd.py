"""CIFAR-10+, ResNet-110, stochastic depth p_L = 0.5 (paper: 5.25% test error)."""
from experiments.configs import default


def get_config():
  return default.get_config()
