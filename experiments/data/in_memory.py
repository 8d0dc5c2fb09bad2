"""Sources held in host memory as uint8 NHWC arrays: CIFAR, SVHN, image folders, synthetic.

Splits follow the paper (Huang et al., 2016, Sec. 4): a seeded random hold-out of the
training images for validation (CIFAR: 5,000 of 50,000) or so many per class (SVHN);
normalisation by the per-pixel mean image and one global std of the training images,
and CIFAR's shift and flip, on the device (`on_device.NormaliseAndShift`). Batches are
gathered from the arrays by `batching`'s indices.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
import hashlib

import jax
import numpy as np

from experiments.data import batching
from experiments.data import on_device
from experiments.data.source import Shard
from experiments.data.source import Source
from experiments.runtime import errors


@dataclasses.dataclass
class Split:
  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N]

  def __len__(self) -> int:
    return int(self.labels.shape[0])


def take(split: Split, index: np.ndarray) -> Split:
  return Split(split.images[index], split.labels[index])


def concat(*splits: Split) -> Split:
  return Split(np.concatenate([s.images for s in splits]),
               np.concatenate([s.labels for s in splits]))


def holdout_random(split: Split, size: int, seed: int) -> tuple[Split, Split]:
  """(train, validation): `size` examples drawn at random (seeded) for validation."""
  if not 0 < size < len(split):
    raise errors.UserError(f"validation_size must be in (0, {len(split)}) for a training "
                           f"set of {len(split)} images, got {size}.")
  order = np.random.default_rng(seed).permutation(len(split))
  val, train = np.sort(order[:size]), np.sort(order[size:])
  return take(split, train), take(split, val)


def holdout_per_class(split: Split, per_class: int, seed: int) -> tuple[Split, Split]:
  """(train, validation): `per_class` random examples of every class for validation."""
  rng = np.random.default_rng(seed)
  val = []
  for c in np.unique(split.labels):
    members = np.flatnonzero(split.labels == c)
    if len(members) <= per_class:
      raise errors.UserError(f"class {c} has {len(members)} examples, cannot hold out "
                             f"{per_class} for validation.")
    val.append(rng.choice(members, per_class, replace=False))
  val = np.sort(np.concatenate(val))
  train = np.setdiff1d(np.arange(len(split)), val)
  return take(split, train), take(split, val)


def normalisation(images: np.ndarray) -> tuple[np.ndarray, float]:
  """Per-pixel mean image and global scalar std of uint8 images (float64 sums)."""
  mean = np.zeros(images.shape[1:], np.float64)
  for chunk in np.array_split(images, max(1, len(images) // 10000)):
    mean += chunk.sum(axis=0, dtype=np.float64)
  mean /= len(images)
  var = 0.0
  for chunk in np.array_split(images, max(1, len(images) // 10000)):
    var += np.sum((chunk.astype(np.float64) - mean) ** 2)
  std = float(np.sqrt(var / images.size))
  return mean.astype(np.float32), std


@dataclasses.dataclass(eq=False)
class InMemorySource(Source):
  """Train / validation / optional test splits held as arrays, and the training
  normalisation. `from_splits` computes the normalisation; the constructor checks that
  the splits can be trained and evaluated (shapes, labels, sizes) before anything runs."""
  name: str
  train: Split
  validation: Split
  test: Split | None
  num_classes: int
  mean_image: np.ndarray  # float32 [H, W, C], per-pixel mean of the training images
  std: float  # one global scalar std of the training images
  augment: bool
  class_names: tuple[str, ...] | None = None

  @classmethod
  def from_splits(cls, name: str, train: Split, validation: Split, test: Split | None,
                  num_classes: int, augment: bool,
                  class_names: Sequence[str] | None = None) -> InMemorySource:
    mean, std = normalisation(train.images)
    return cls(name, train, validation, test, num_classes, mean, std, augment,
               None if class_names is None else tuple(class_names))

  def __post_init__(self):
    shape = self.train.images.shape[1:]
    for split_name, split in self._splits().items():
      if len(split) == 0:
        raise errors.UserError(f"the {split_name} split of {self.name} is empty.")
      if split.images.shape[1:] != shape:
        raise errors.UserError(
            f"{self.name}: {split_name} images are {split.images.shape[1:]}, training "
            f"images {shape}: every split must have the training image size.")
      bad = (split.labels < 0) | (split.labels >= self.num_classes)
      if bad.any():
        raise errors.UserError(
            f"{self.name}: {split_name} labels {sorted(set(split.labels[bad].tolist()))[:5]}"
            f" are outside the {self.num_classes} classes.")

  def _splits(self) -> dict[str, Split]:
    splits = {"train": self.train, "validation": self.validation, "test": self.test}
    return {name: split for name, split in splits.items() if split is not None}

  @property
  def num_train(self) -> int:
    return len(self.train)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.train.images.shape[1:])

  @property
  def evaluation_splits(self) -> dict[str, int]:
    return {name: len(split) for name, split in self._splits().items() if name != "train"}

  def train_batches(self, seed: int, global_batch: int, start_step: int,
                    chunks: Sequence[int], shard: Shard) -> Iterator[dict]:
    for _, index in batching.train_indices(seed, len(self.train), global_batch,
                                           start_step, chunks, shard):
      yield {"images": self.train.images[index], "labels": self.train.labels[index]}

  def eval_batches(self, split: str, batch_size: int, shard: Shard) -> Iterator[dict]:
    data = self._splits()[split]
    for index, mask in batching.eval_indices(len(data), batch_size, shard):
      yield {"images": data.images[index], "labels": data.labels[index], "mask": mask}

  def preprocess(self, batch: dict, key: jax.Array | None) -> jax.Array:
    return self.device_preprocessing()(batch, key)

  def device_preprocessing(self) -> on_device.NormaliseAndShift:
    return on_device.NormaliseAndShift(self.mean_image, self.std, self.augment)

  def identity(self) -> dict:
    """The class names and their order (where known), image shape, example counts, and a
    fingerprint of every image and label (so other files, or the same files with other
    labels, differ)."""
    digest = hashlib.blake2b(digest_size=16)
    for split in (self.train, self.validation, self.test):
      if split is not None:
        for array in (split.images, split.labels):
          digest.update(str((array.shape, array.dtype)).encode())
          digest.update(np.ascontiguousarray(array).data)
    return {"name": self.name, "num_classes": self.num_classes,
            "class_names": None if self.class_names is None else list(self.class_names),
            "image_shape": list(self.image_shape),
            "examples": {"train": len(self.train), "validation": len(self.validation),
                         "test": None if self.test is None else len(self.test)},
            "fingerprint": digest.hexdigest()}
