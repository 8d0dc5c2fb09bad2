r"""Trains an ImageNet ResNet with stochastic depth (the paper's Sec. 4), streamed from
disk: TFDS's imagenet2012 or an image folder (`experiments.data.imagenet`).

  python -m experiments.imagenet --config=experiments/configs/imagenet.py:resnet152 \
      --workdir=runs/imagenet152_sd [--config.data_dir=TFDS_DATA_DIR]

The same command line, flags and exit statuses as `python -m experiments.cifar`; started
again with the same --workdir, a run resumes from its newest good checkpoint and trains
on exactly the batches an uninterrupted one would.
"""

from absl import app

from experiments.runtime import command_line
from experiments.runtime import training_command

training_command.define_flags()

if __name__ == "__main__":
  app.run(training_command.main, flags_parser=command_line.parse_flags)
