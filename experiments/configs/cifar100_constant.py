"""CIFAR-100+, ResNet-110, constant depth (paper: 27.22% test error)."""
from experiments.configs import cifar100_sd


def get_config():
  config = cifar100_sd.get_config()
  config.survival.p_last = 1.0
  return config
