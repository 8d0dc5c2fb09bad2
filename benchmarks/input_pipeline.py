r"""Throughput of the training input pipeline alone: host gather, then transfer to devices.

  python -m benchmarks.input_pipeline --config=experiments/configs/paper.py:cifar10
  python -m benchmarks.input_pipeline --config=experiments/configs/quick.py --calls=50

Loads the config's dataset as a run does and times `--calls` calls' worth of batches
(`config.steps_per_call` steps each) of the source's `train_batches` through
`flax.jax_utils.prefetch_to_device` (`benchmarks.timing.input_images_per_s`), nothing computed on them: if this is not well above
a run's train images/s, the input pipeline, not the step, limits training.
"""

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from benchmarks import timing
from experiments import data

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A training config file.", lock_config=True)
flags.DEFINE_integer("calls", 20, "Calls' worth of batches to time.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  source = data.build(FLAGS.config)
  rate = timing.input_images_per_s(source, FLAGS.config, FLAGS.calls)
  print(f"{source.describe()}\ninput pipeline alone: {rate:.0f} images/s "
        f"(batch {FLAGS.config.batch_size}, {jax.local_device_count()} devices)")


if __name__ == "__main__":
  app.run(main)
