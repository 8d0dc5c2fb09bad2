"""Datasets for the paper's protocol (Sec. 4), held in memory as uint8 NHWC arrays.

Sources: TFDS (`cifar10`, `cifar100`, `svhn_cropped`), a local image folder
(`ROOT/train/<class>/*.jpg|png`, optional `ROOT/test/<class>/...`) and `synthetic`, a small
learnable dataset generated on the fly (the `quick` config).

Protocol:
- CIFAR: 5,000 random training images (seeded) held out for validation, 45,000 trained on.
- SVHN: train + extra; validation = 400 per class from train + 200 per class from extra.
- Normalisation: subtract the per-pixel mean image of the training images, divide by one
  global scalar std of the training images.
- Augmentation (train only, CIFAR): random translation by an integer in [-4, 4] on each
  axis with zero fill after normalisation (= 4-px zero pad + random crop), horizontal flip
  with probability 1/2. It runs on the accelerator inside the train step (`augment`).

Batches are a pure function of (seed, step): epoch e visits the training set in the order
`np.random.default_rng([seed, e]).permutation(n)`, dropping the last partial batch, so a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import pathlib
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.lib import errors

TFDS_NAMES = ("cifar10", "cifar100", "svhn_cropped")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass
class Split:
  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N]

  def __len__(self) -> int:
    return int(self.labels.shape[0])


@dataclasses.dataclass
class Dataset:
  """Train / validation / (optional) test splits and the training normalisation."""
  train: Split
  validation: Split
  test: Split | None
  num_classes: int
  mean_image: np.ndarray  # float32 [H, W, C], per-pixel mean of the training images
  std: float  # one global scalar std of the training images
  augment: bool
  name: str
  class_names: tuple[str, ...] | None = None  # folder datasets: label i is class_names[i]

  def identity(self) -> dict:
    """What a model trained on this data depends on: the class names and their order
    (where known), image shape, example counts, and a fingerprint of every image and
    label (so other files, or the same files with other labels, differ)."""
    digest = hashlib.blake2b(digest_size=16)
    for split in (self.train, self.validation, self.test):
      if split is not None:
        for array in (split.images, split.labels):
          digest.update(str((array.shape, array.dtype)).encode())
          digest.update(np.ascontiguousarray(array).data)
    return {"name": self.name, "num_classes": self.num_classes,
            "class_names": None if self.class_names is None else list(self.class_names),
            "image_shape": list(self.train.images.shape[1:]),
            "examples": {"train": len(self.train), "validation": len(self.validation),
                         "test": None if self.test is None else len(self.test)},
            "fingerprint": digest.hexdigest()}

  def describe(self) -> str:
    test = f"{len(self.test)} test" if self.test is not None else "no test split"
    return (f"{self.name}: {len(self.train)} train, {len(self.validation)} validation, "
            f"{test}, {self.num_classes} classes, images {self.train.images.shape[1:]}")


# ---------------------------------------------------------------- splitting, normalising


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


def take(split: Split, index: np.ndarray) -> Split:
  return Split(split.images[index], split.labels[index])


def concat(*splits: Split) -> Split:
  return Split(np.concatenate([s.images for s in splits]),
               np.concatenate([s.labels for s in splits]))


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


def finish(name: str, train: Split, validation: Split, test: Split | None,
           num_classes: int, augment: bool, class_names=None) -> Dataset:
  mean, std = normalisation(train.images)
  return Dataset(train, validation, test, num_classes, mean, std, augment, name,
                 None if class_names is None else tuple(class_names))


# ------------------------------------------------------------------------------ sources


def load(name: str, data_dir: str | None = None, seed: int = 0,
         validation_size: int = 5000, augment: bool | None = None) -> Dataset:
  """The dataset `name` split by the paper's protocol (see module docstring).

  name: "cifar10", "cifar100", "svhn_cropped" (TFDS), "folder" (data_dir = ROOT), or
  "synthetic". `validation_size` is the CIFAR/folder hold-out; `augment` defaults to the
  paper (on for CIFAR and folders, off for SVHN).
  """
  if name in ("cifar10", "cifar100"):
    full = _tfds_split(name, "train", data_dir)
    train, val = holdout_random(full, validation_size, seed)
    test = _tfds_split(name, "test", data_dir)
    return finish(name, train, val, test, 10 if name == "cifar10" else 100,
                  True if augment is None else augment)
  if name == "svhn_cropped":
    train, val_a = holdout_per_class(_tfds_split(name, "train", data_dir), 400, seed)
    extra, val_b = holdout_per_class(_tfds_split(name, "extra", data_dir), 200, seed + 1)
    return finish(name, concat(train, extra), concat(val_a, val_b),
                  _tfds_split(name, "test", data_dir), 10,
                  False if augment is None else augment)
  if name == "folder":
    if not data_dir:
      raise errors.UserError("dataset 'folder' needs data_dir=ROOT holding "
                             "ROOT/train/<class>/*.jpg|png (and optionally "
                             "ROOT/test/<class>/...).")
    train_full, test, classes = load_image_folder(data_dir)
    train, val = holdout_random(train_full, validation_size, seed)
    return finish(f"folder:{os.path.basename(os.path.normpath(data_dir))}", train, val,
                  test, len(classes), True if augment is None else augment, classes)
  if name == "synthetic":
    full = synthetic(seed=1234)
    train, val = holdout_random(Split(full.images[:3000], full.labels[:3000]),
                                validation_size, seed)
    test = Split(full.images[3000:], full.labels[3000:])
    return finish("synthetic", train, val, test, 10, True if augment is None else augment)
  raise errors.UserError(
      f"unknown dataset {name!r}; choose one of {TFDS_NAMES + ('folder', 'synthetic')}.")


def _tfds_split(name: str, split: str, data_dir: str | None) -> Split:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.UserError(
        f"loading {name} from TFDS needs tensorflow-datasets and TensorFlow ({e}). "
        "Install them with: pip install tensorflow-datasets tensorflow-cpu") from e
  tf.config.set_visible_devices([], "GPU")  # keep TensorFlow off the accelerators
  # Batches of 4096 rather than batch_size=-1, which crashes TensorFlow 2.21 on
  # datasets of unknown cardinality (as TFDS mock data is).
  dataset = tfds.load(name, split=split, data_dir=data_dir, as_supervised=True)
  images, labels = [], []
  for image_batch, label_batch in tfds.as_numpy(dataset.batch(4096)):
    images.append(image_batch)
    labels.append(label_batch)
  return Split(np.concatenate(images).astype(np.uint8),
               np.concatenate(labels).astype(np.int32))


def load_image_folder(root: str) -> tuple[Split, Split | None, list[str]]:
  """ROOT/train/<class>/*.{jpg,png} (+ optional ROOT/test/): labels = sorted class names."""
  root_path = pathlib.Path(root)
  train_dir = root_path / "train"
  if not train_dir.is_dir():
    raise errors.MissingFileError(
        f"image folder {root!r} has no train/ directory: expected "
        f"{root}/train/<class>/*.jpg|png (and optionally {root}/test/<class>/...).")
  classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
  if not classes:
    raise errors.MissingFileError(f"{train_dir} holds no class directories.")
  train = _read_class_dirs(train_dir, classes)
  test_dir = root_path / "test"
  test = None
  if test_dir.is_dir():
    unknown = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in classes)
    if unknown:
      raise errors.UserError(
          f"{test_dir} has class folders that {train_dir} lacks: {unknown}. Test classes "
          f"must be training classes ({classes}); rename or remove them.")
    present = [c for c in classes if (test_dir / c).is_dir()]
    test = _read_class_dirs(test_dir, classes, present)
  return train, test, classes


def _read_class_dirs(directory: pathlib.Path, classes: Sequence[str],
                     present: Sequence[str] | None = None) -> Split:
  """The images of `directory/<class>/` for each class in `present` (default: all, and
  every one must hold images); labels are positions in `classes`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  files, labels = [], []
  for label, name in enumerate(classes):
    if present is not None and name not in present:
      continue
    found = sorted(p for p in (directory / name).glob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
      raise errors.UserError(
          f"class folder {directory / name} holds no .jpg/.png images: add images or "
          "remove the folder (every folder is a class).")
    files += found
    labels += [label] * len(found)

  def read(path):
    try:
      with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), np.uint8)
    except Exception as e:  # pylint: disable=broad-except
      raise errors.UserError(f"cannot read image {path}: {e}") from None

  with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
    images = list(pool.map(read, files, chunksize=256))
  first = images[0].shape
  for path, image in zip(files, images):
    if image.shape != first:
      raise errors.UserError(
          f"images under {directory} differ in size: {path} is {image.shape[:2]}, "
          f"{files[0]} is {first[:2]}. Resize them to one size first.")
  return Split(np.stack(images), np.asarray(labels, np.int32))


def check(dataset: Dataset, eval_batch_size: int | None = None) -> None:
  """Fails before training on data that would fail later: splits whose images differ
  in shape from the training images, labels outside the classes, empty splits."""
  shape = dataset.train.images.shape[1:]
  splits = {"validation": dataset.validation, "test": dataset.test}
  for name, split in [("train", dataset.train), *splits.items()]:
    if split is None:
      continue
    if len(split) == 0:
      raise errors.UserError(f"the {name} split of {dataset.name} is empty.")
    if split.images.shape[1:] != shape:
      raise errors.UserError(
          f"{dataset.name}: {name} images are {split.images.shape[1:]}, training images "
          f"{shape}: every split must have the training image size.")
    bad = (split.labels < 0) | (split.labels >= dataset.num_classes)
    if bad.any():
      raise errors.UserError(
          f"{dataset.name}: {name} labels {sorted(set(split.labels[bad].tolist()))[:5]} "
          f"are outside the {dataset.num_classes} classes.")
  if eval_batch_size is not None and eval_batch_size < 1:
    raise errors.UserError(f"eval_batch_size must be >= 1, got {eval_batch_size}.")


def synthetic(num_examples: int = 4000, num_classes: int = 10, size: int = 32,
              seed: int = 1234) -> Split:
  """A small, learnable image-classification set: noisy, shifted class templates.

  Each class is a fixed random smooth colour pattern; an example is its template rolled
  by up to 6 px, flipped at random and covered with strong pixel noise, so a small CNN
  must learn the patterns (chance is 1/num_classes).
  """
  rng = np.random.default_rng(seed)
  coarse = rng.normal(size=(num_classes, 4, 4, 3))
  templates = np.kron(coarse, np.ones((1, size // 4, size // 4, 1)))
  labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
  shifts = rng.integers(-6, 7, (num_examples, 2))
  images = np.empty((num_examples, size, size, 3), np.float64)
  for i, (label, (dy, dx)) in enumerate(zip(labels, shifts)):
    image = np.roll(templates[label], (dy, dx), axis=(0, 1))
    images[i] = image[:, ::-1] if rng.random() < 0.5 else image
  images += rng.normal(scale=1.0, size=images.shape)
  images = np.clip(128 + 40 * images, 0, 255).astype(np.uint8)
  return Split(images, labels)


# ----------------------------------------------------------------------- batches


def steps_per_epoch(num_train: int, global_batch: int) -> int:
  if global_batch < 1:
    raise errors.UserError(f"batch_size must be >= 1, got {global_batch}.")
  if num_train < global_batch:
    raise errors.UserError(f"the training set ({num_train}) is smaller than one batch "
                           f"({global_batch}).")
  return num_train // global_batch


def batch_indices(seed: int, step: int, num_train: int, global_batch: int) -> np.ndarray:
  """Indices of the training examples of global batch `step` (see module docstring)."""
  per_epoch = steps_per_epoch(num_train, global_batch)
  epoch, position = divmod(step, per_epoch)
  order = _epoch_order(seed, epoch, num_train)
  return order[position * global_batch:(position + 1) * global_batch]


_ORDER_CACHE: dict = {}


def _epoch_order(seed: int, epoch: int, num_train: int) -> np.ndarray:
  key = (seed, epoch, num_train)
  if key not in _ORDER_CACHE:
    _ORDER_CACHE.clear()
    _ORDER_CACHE[key] = np.random.default_rng([seed, epoch]).permutation(num_train)
  return _ORDER_CACHE[key]


def train_batches(split: Split, seed: int, global_batch: int, start_step: int,
                  chunks: Sequence[int], num_devices: int,
                  process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Host batches for `chunks` calls of several steps each, from `start_step` on.

  Each item has "images" uint8 [num_devices, steps, per_device, H, W, C] and "labels"
  int32 [num_devices, steps, per_device]: this process's slice of each global batch.
  """
  per_process = global_batch // process_count
  per_device = per_process // num_devices
  step = start_step
  for length in chunks:
    index = np.stack([batch_indices(seed, s, len(split), global_batch)
                      for s in range(step, step + length)])
    index = index[:, process_index * per_process:(process_index + 1) * per_process]
    index = index.reshape(length, num_devices, per_device).transpose(1, 0, 2)
    yield {"images": split.images[index], "labels": split.labels[index]}
    step += length


def eval_batches(split: Split, batch_size: int, num_devices: int,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Padded evaluation batches [num_devices, per_device, ...] with a 0/1 "mask"."""
  per_device = batch_size // (num_devices * process_count)
  for start in range(0, len(split), batch_size):
    stop = min(start + batch_size, len(split))
    index = np.arange(start, start + batch_size)
    mask = (index < stop).astype(np.float32)
    index = np.minimum(index, len(split) - 1)
    lo = process_index * num_devices * per_device
    index = index[lo:lo + num_devices * per_device].reshape(num_devices, per_device)
    mask = mask[lo:lo + num_devices * per_device].reshape(num_devices, per_device)
    yield {"images": split.images[index], "labels": split.labels[index], "mask": mask}


# ------------------------------------------------------------------ on the accelerator


def normalise(images: jax.Array, mean_image: jax.Array, std) -> jax.Array:
  """(x - per-pixel mean) / global std, in float32."""
  return (images.astype(jnp.float32) - mean_image) / std


def augment(key: jax.Array, images: jax.Array, max_shift: int = 4) -> jax.Array:
  """The paper's CIFAR augmentation on normalised images [B, H, W, C].

  Zero-pad `max_shift` px, crop at a random offset (= translate by an integer in
  [-max_shift, max_shift] per axis with zero fill), flip horizontally with probability 1/2.
  """
  batch, height, width, _ = images.shape
  shift_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(shift_key, (batch, 2), 0, 2 * max_shift + 1)
  flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
  padded = jnp.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)))

  def one(image, offset, flip):
    crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                 (height, width, image.shape[-1]))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(one)(padded, offsets, flips)
