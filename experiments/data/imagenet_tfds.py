"""TFDS's imagenet2012 as random-access data sources, with its manual download named.

TFDS cannot download ImageNet: the user puts ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar (from image-net.org) into TFDS's manual directory,
DATA_DIR/downloads/manual. With them there, the first run prepares the dataset as
ArrayRecord (hours, and ~150 GB beside the tars), the format `tfds.data_source` reads at
random; without them, one line says which files go where before anything else happens.
"""

from __future__ import annotations

import os

from absl import logging

from experiments.runtime import errors

NAME = "imagenet2012"
TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def load(data_dir: str | None):
  """(train, validation, class names): the splits as TFDS data sources whose records
  keep their images encoded (decoded by the workers, crop first)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.UserError(f"imagenet2012 needs tensorflow-datasets ({e}): pip install "
                           "tensorflow-datasets, or use --config.dataset=imagenet_folder."
                           ) from None
  builder = tfds.builder(NAME, data_dir=data_dir)
  try:
    splits = _data_sources(tfds, data_dir)
  except (tfds.core.registered.DatasetNotFoundError, AssertionError, FileNotFoundError,
          NotImplementedError, ValueError) as e:
    if builder.is_prepared():  # in a format that cannot be read at random
      root = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
      raise errors.UserError(
          f"{NAME} in {builder.data_dir} cannot be read at random ({first_line(e)}): "
          f"prepare it as ArrayRecord: tfds build {NAME} --data_dir={root} "
          "--file_format=array_record") from None
    _prepare(builder)
    splits = _data_sources(tfds, data_dir)
  return splits["train"], splits["validation"], builder.info.features["label"].names


def first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _data_sources(tfds, data_dir):
  return tfds.data_source(NAME, split={"train": "train", "validation": "validation"},
                          data_dir=data_dir, download=False,
                          decoders={"image": tfds.decode.SkipDecoding()})


def manual_dir(builder) -> str:
  """Where TFDS looks for the manually downloaded tars."""
  root = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
  return os.path.join(root, "downloads", "manual")


def _prepare(builder) -> None:
  """Prepares imagenet2012 from its tars as ArrayRecord, or refuses naming what is missing."""
  where = manual_dir(builder)
  missing = [name for name in TARS if not os.path.exists(os.path.join(where, name))]
  if missing:
    raise errors.MissingFileError(
        f"{NAME} is not prepared and its manual download is missing: put "
        f"{' and '.join(missing)} (from image-net.org) into {where}, then start again "
        "(the first run prepares it: hours, ~150 GB), or train on an image folder with "
        "--config.dataset=imagenet_folder --config.data_dir=ROOT.")
  logging.warning("preparing %s from %s as ArrayRecord (hours, ~150 GB in %s)", NAME, where,
                  builder.data_dir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder.download_and_prepare(file_format=tfds.core.FileFormat.ARRAY_RECORD)
