"""`folder`: a local image folder of one image size, held in memory (CIFAR-like data).

    ROOT/train/<class>/**/*.jpg|jpeg|png     every folder of train/ is a class
    ROOT/test/<class>/**/*.jpg|jpeg|png      optional; the same classes as train/

Labels are the positions of the sorted class names; images in subfolders of a class
folder belong to it (as torchvision's ImageFolder reads them). `config.validation_size`
random training images (seeded) are held out for validation; augmentation is CIFAR's
unless `config.augment` is false. Every file is read before training: a problem (no
images, an unreadable file, another image size, test classes that are not the training
classes, fewer than two classes) is one error naming the file or folder.
"""

from __future__ import annotations

from collections.abc import Sequence
import concurrent.futures
import os
import pathlib

import ml_collections
import numpy as np

from experiments.data import images as images_lib
from experiments.data import in_memory
from experiments.data.source import register
from experiments.runtime import errors

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@register("folder")
def folder(config: ml_collections.ConfigDict) -> in_memory.InMemorySource:
  if not config.data_dir:
    raise errors.UserError("dataset 'folder' needs data_dir=ROOT holding "
                           "ROOT/train/<class>/*.jpg|png (and optionally "
                           "ROOT/test/<class>/...).")
  train_full, test, classes = load_image_folder(config.data_dir)
  train, validation = in_memory.holdout_random(train_full, config.validation_size,
                                               config.seed)
  name = f"folder:{os.path.basename(os.path.normpath(config.data_dir))}"
  return in_memory.InMemorySource.from_splits(
      name, train, validation, test, len(classes),
      True if config.augment is None else bool(config.augment), classes)


def class_folders(root: str) -> tuple[pathlib.Path, list[str]]:
  """(ROOT/train, the sorted class names), refusing a layout that cannot be trained."""
  train_dir = pathlib.Path(root) / "train"
  if not train_dir.is_dir():
    raise errors.MissingFileError(
        f"image folder {root!r} has no train/ directory: expected "
        f"{root}/train/<class>/*.jpg|png (and optionally {root}/test/<class>/...).")
  classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
  if not classes:
    raise errors.MissingFileError(f"{train_dir} holds no class directories.")
  if len(classes) < 2:
    raise errors.UserError(
        f"{train_dir} holds one class folder ({classes[0]}): a classifier needs at least "
        "two classes (every folder of train/ is one).")
  return train_dir, classes


def check_test_classes(test_dir: pathlib.Path, train_dir: pathlib.Path,
                       classes: Sequence[str]) -> None:
  """Refuses a test split whose class folders are not exactly the training classes."""
  found = {p.name for p in test_dir.iterdir() if p.is_dir()}
  unknown, missing = sorted(found - set(classes)), sorted(set(classes) - found)
  if unknown:
    raise errors.UserError(
        f"{test_dir} has class folders that {train_dir} lacks: {unknown}. Test classes "
        f"must be training classes ({list(classes)}); rename or remove them.")
  if missing:
    raise errors.UserError(
        f"{test_dir} lacks the class folders {missing} of {train_dir}: the test error "
        "would leave those classes out. Add their test images, or remove test/.")


def load_image_folder(root: str) -> tuple[in_memory.Split, in_memory.Split | None, list[str]]:
  """(train, test or None, class names) of an image folder (module docstring)."""
  train_dir, classes = class_folders(root)
  train = read_class_folders(train_dir, classes)
  test_dir = pathlib.Path(root) / "test"
  test = None
  if test_dir.is_dir():
    check_test_classes(test_dir, train_dir, classes)
    test = read_class_folders(test_dir, classes)
  return train, test, classes


def image_files(class_dir: pathlib.Path) -> list[pathlib.Path]:
  """The image files under `class_dir`, its subfolders included, in sorted order (a
  broken or looping symbolic link named like an image is refused, not left out)."""
  found = []
  for path in class_dir.rglob("*"):
    if path.suffix.lower() not in IMAGE_SUFFIXES:
      continue
    if path.is_symlink() and not path.exists():
      raise errors.UserError(f"{path} is a broken or looping symbolic link: restore it "
                             "or remove it.")
    if path.is_file():
      found.append(path)
  return sorted(found)


def read_class_folders(directory: pathlib.Path, classes: Sequence[str]) -> in_memory.Split:
  """The images of `directory/<class>/` for every class (each must hold images); labels
  are positions in `classes`."""
  files, labels = [], []
  for label, name in enumerate(classes):
    found = image_files(directory / name)
    if not found:
      raise errors.UserError(
          f"class folder {directory / name} holds no .jpg/.png images: add images or "
          "remove the folder (every folder is a class).")
    files += found
    labels += [label] * len(found)

  def read(path):
    try:
      return images_lib.read_rgb(path)
    except (images_lib.UnreadableImage, OSError) as e:
      raise errors.UserError(f"cannot read image {path}: {e}") from None

  with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
    decoded = list(pool.map(read, files, chunksize=256))
  first = decoded[0].shape
  for path, image in zip(files, decoded):
    if image.shape != first:
      raise errors.UserError(
          f"images under {directory} differ in size: {path} is {image.shape[:2]}, "
          f"{files[0]} is {first[:2]}. Resize them to one size first.")
  return in_memory.Split(np.stack(decoded), np.asarray(labels, np.int32))
