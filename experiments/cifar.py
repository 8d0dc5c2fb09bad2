r"""Trains a ResNet with stochastic depth on CIFAR-10/100, SVHN or an image folder.

  python -m experiments.cifar --config=experiments/configs/cifar10_sd.py \
      --workdir=runs/cifar10_sd [--config.survival.p_last=0.8 ...]

Started again with the same --workdir, a run resumes from its latest checkpoint.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from sdnet import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                  "Call jax.distributed.initialize() (auto: on a multi-host TPU slice).")
flags.mark_flags_as_required(["config", "workdir"])


def multi_host_tpu() -> bool:
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.distributed == "yes" or (FLAGS.distributed == "auto" and multi_host_tpu()):
    jax.distributed.initialize()
  logging.info("JAX %s on %d process(es), %d device(s): %s", jax.__version__,
               jax.process_count(), jax.device_count(), jax.devices()[0].device_kind)
  results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  logging.info("best validation error %.4f at step %s; test error there %s",
               results["best_validation_error"], results["best_validation_step"],
               results["test_error_at_best_validation"])


if __name__ == "__main__":
  app.run(main)
