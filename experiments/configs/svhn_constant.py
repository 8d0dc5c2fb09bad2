"""SVHN, ResNet-152, constant depth (paper: 1.80%)."""
from experiments.configs import svhn_sd


def get_config():
  config = svhn_sd.get_config()
  config.survival.p_last = 1.0
  return config
