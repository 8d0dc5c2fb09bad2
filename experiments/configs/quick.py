"""A one-minute CPU run with no download: ResNet-20 with stochastic depth on `synthetic`.

Give an image folder instead with --config.dataset=folder --config.data_dir=ROOT.
"""
from experiments.configs import default


def get_config():
  config = default.get_config()
  config.dataset = "synthetic"
  config.validation_size = 500
  config.model.depth = 20
  config.batch_size = 64
  config.epochs = 4
  config.learning_rate = 0.05
  config.eval_batch_size = 500
  config.log_every_steps = 20
  config.steps_per_call = 1  # on CPU a loop over steps is slow too (see models)
  return config
