r"""Throughput of the training input pipeline alone: host work, then transfer to devices.

  python -m benchmarks.input_pipeline --config=experiments/configs/paper.py:cifar10
  python -m benchmarks.input_pipeline --config=experiments/configs/quick.py --calls=50
  python -m benchmarks.input_pipeline --imagenet [--root=DIR] [--cores=1,2]

ImageNet mode times the ImageNet pipelines alone side by side in one run, on generated
ImageNet-sized JPEGs (`benchmarks.imagenet_like`, unless --root names a tree): ours (grain
worker processes, and threads), the tf.data pipeline of flax's examples/imagenet, and
torchvision's ImageFolder + DataLoader where PyTorch is installed
(`benchmarks.imagenet_pipelines`), for training and evaluation batches, on each number
of host cores of --cores, repeated and interleaved; it prints images/s and images/s per
core (medians).

Loads the config's dataset as a run does and times `--calls` calls' worth of batches
(`config.steps_per_call` steps each) of the source's `train_batches` through
`flax.jax_utils.prefetch_to_device` (`benchmarks.timing.input_images_per_s`), nothing computed on them: if this is not well above
a run's train images/s, the input pipeline, not the step, limits training.
"""

import os

try:  # torchvision crashes (SIGSEGV) when imported after TensorFlow: import it first.
  import torchvision  # pylint: disable=unused-import
except ImportError:
  pass
from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from benchmarks import common
from benchmarks import timing
from experiments import data

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "A training config file.",
                                  lock_config=True)
  flags.DEFINE_integer("calls", 20, "Calls' worth of batches to time.")
  flags.DEFINE_bool("imagenet", False, "Time the ImageNet pipelines side by side.")
  flags.DEFINE_string("root", "", "ImageNet mode: a ROOT/train, ROOT/val tree (default: "
                      "one generated in a temporary directory).")
  flags.DEFINE_list("cores", ["1", "2"], "ImageNet mode: numbers of host cores to time.")
  flags.DEFINE_integer("batch", 64, "ImageNet mode: images per batch.")
  flags.DEFINE_integer("batches", 8, "ImageNet mode: timed batches per measurement.")
  flags.DEFINE_integer("repeats", 3, "ImageNet mode: interleaved repetitions.")
  flags.DEFINE_string("out", "", "ImageNet mode: write the rows as JSON here.")


def main(argv):
  del argv
  if FLAGS.imagenet:
    imagenet_main()
    return
  if FLAGS.config is None:
    raise app.UsageError("give --config (or --imagenet).")
  source = data.build(FLAGS.config)
  rate = timing.input_images_per_s(source, FLAGS.config, FLAGS.calls)
  print(f"{source.describe()}\ninput pipeline alone: {rate:.0f} images/s "
        f"(batch {FLAGS.config.batch_size}, {jax.local_device_count()} devices)")


def imagenet_main() -> None:
  # pylint: disable=g-import-not-at-top
  import tempfile
  from benchmarks import imagenet_like
  from benchmarks import imagenet_pipelines
  root = FLAGS.root or os.fspath(imagenet_like.write_tree(
      tempfile.mkdtemp(prefix="imagenet_like_"), classes=10,
      train_per_class=FLAGS.batch * FLAGS.batches // 5, val_per_class=FLAGS.batch // 2,
      special_every=0))
  print(f"ImageNet-like tree {root}; batch {FLAGS.batch}, {FLAGS.batches} timed batches "
        "after 2 warm-up ones, medians of", FLAGS.repeats, "interleaved repetitions")
  rows = imagenet_pipelines.measure(root, [int(c) for c in FLAGS.cores], FLAGS.batch,
                                    FLAGS.batches, FLAGS.repeats)
  print(imagenet_pipelines.format_table(rows))
  if FLAGS.out:
    common.write_json(FLAGS.out, {"root": root, "rows": rows})


if __name__ == "__main__":
  define_flags()
  app.run(main)
