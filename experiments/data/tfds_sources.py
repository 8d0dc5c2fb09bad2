"""The paper's TFDS datasets as in-memory sources: CIFAR-10, CIFAR-100 and SVHN.

Huang et al. (2016), Sec. 4: CIFAR holds out `config.validation_size` (5,000) random
training images for validation and trains on the rest, with the shift-and-flip
augmentation; SVHN trains on train + extra, holds out 400 images per class of train and
200 per class of extra for validation, and is not augmented. `config.augment` overrides
the paper's choice; `config.data_dir` is TFDS's data_dir.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from experiments.data import in_memory
from experiments.data.source import register
from experiments.runtime import errors


def _paper_augment(config: ml_collections.ConfigDict, paper: bool) -> bool:
  return paper if config.augment is None else bool(config.augment)


def tfds_split(name: str, split: str, data_dir: str | None) -> in_memory.Split:
  """All of TFDS `name`'s `split` as uint8 images and int32 labels."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.UserError(
        f"loading {name} from TFDS needs tensorflow-datasets and TensorFlow ({e}). "
        "Install them with: pip install tensorflow-datasets tensorflow-cpu") from e
  tf.config.set_visible_devices([], "GPU")  # keep TensorFlow off the accelerators
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except  (TFDS's own, requests', OSError)
      first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
      raise errors.UserError(
          f"{name} is not in {builder.data_dir} and TFDS could not download it ({first}): "
          "connect to the network, or prepare it where there is one (tfds build "
          f"{name}) and give that directory as --config.data_dir.") from None
  # Batches of 4096 rather than batch_size=-1, which crashes TensorFlow 2.21 on
  # datasets of unknown cardinality (as TFDS mock data is).
  dataset = builder.as_dataset(split=split, as_supervised=True)
  images, labels = [], []
  for image_batch, label_batch in tfds.as_numpy(dataset.batch(4096)):
    images.append(image_batch)
    labels.append(label_batch)
  return in_memory.Split(np.concatenate(images).astype(np.uint8),
                         np.concatenate(labels).astype(np.int32))


def _cifar(name: str, num_classes: int, config) -> in_memory.InMemorySource:
  data_dir = config.data_dir or None
  train, validation = in_memory.holdout_random(tfds_split(name, "train", data_dir),
                                               config.validation_size, config.seed)
  return in_memory.InMemorySource.from_splits(
      name, train, validation, tfds_split(name, "test", data_dir), num_classes,
      _paper_augment(config, True))


@register("cifar10")
def cifar10(config: ml_collections.ConfigDict) -> in_memory.InMemorySource:
  return _cifar("cifar10", 10, config)


@register("cifar100")
def cifar100(config: ml_collections.ConfigDict) -> in_memory.InMemorySource:
  return _cifar("cifar100", 100, config)


@register("svhn_cropped")
def svhn(config: ml_collections.ConfigDict) -> in_memory.InMemorySource:
  name, data_dir, seed = "svhn_cropped", config.data_dir or None, config.seed
  train, validation_a = in_memory.holdout_per_class(tfds_split(name, "train", data_dir),
                                                    400, seed)
  extra, validation_b = in_memory.holdout_per_class(tfds_split(name, "extra", data_dir),
                                                    200, seed + 1)
  return in_memory.InMemorySource.from_splits(
      name, in_memory.concat(train, extra), in_memory.concat(validation_a, validation_b),
      tfds_split(name, "test", data_dir), 10, _paper_augment(config, False))
