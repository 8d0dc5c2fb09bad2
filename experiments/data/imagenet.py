"""ImageNet (ILSVRC-2012) as streaming sources: an image-folder tree, and TFDS's imagenet2012.

    imagenet_folder   ROOT/train/<wnid>/**/*.JPEG and ROOT/val/<wnid>/**/*.JPEG (the
                      layout of valprep.sh, imagenette and other ImageNet subsets)
    imagenet2012      TFDS, from ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in
                      its manual directory (prepared as ArrayRecord, which reads at random)

Nothing holds the images in memory: each is read and decoded when its batch is made by
grain, in threads or worker processes (`config.input_workers`; evaluation always in
threads: no process to start at every evaluation), and `imagenet_preprocessing` crops it
as fb.resnet.torch does. The images and augmentations of step s are a pure function of
(seed, s): global batch s is `batching`'s (seed, s) indices, and the example in row r draws
its crop, flip, jitter and lighting from `np.random.default_rng([seed, 2, s, r])`. The
50,000 validation images are the paper's reported split (there is no test split).

Files are decoded by their content, not their name: CMYK and greyscale JPEGs and PNGs
named .JPEG (all in ILSVRC-2012) become RGB. A file that cannot be decoded is not
trained on: a grey image takes its place in its batch, and the log names it and counts
such files. Empty files, class folders without images and classes that the training
split lacks are refused before training.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
import os
import pathlib

from absl import logging
import jax
import ml_collections
import numpy as np

from experiments.data import batching
from experiments.data import imagenet_files as examples_lib
from experiments.data import images as images_lib
from experiments.data import imagenet_preprocessing as preprocessing
from experiments.data import on_device
from experiments.data.source import Shard
from experiments.data.source import Source
from experiments.data.source import register
from experiments.runtime import errors

AUGMENT_STREAM = 2  # the seed sequence of examples' draws: [seed, 2, step, row]


# ------------------------------------------------------------- what the workers make


def _grey(size: int) -> np.ndarray:
  return np.full((size, size, 3), 128, np.uint8)


@dataclasses.dataclass(frozen=True)
class TrainExample:
  """Example k of this process's stream from `start_step` (row `first_row + k %
  per_process` of global batch `start_step + k // per_process`): its crop, label,
  augmentation parameters, and the index of its file if it could not be decoded (-1)."""
  examples: examples_lib.Files | examples_lib.Records
  seed: int
  global_batch: int
  start_step: int
  first_row: int
  per_process: int
  size: int

  def __call__(self, k: int) -> dict:
    step, row = divmod(int(k), self.per_process)
    step, row = self.start_step + step, self.first_row + row
    index = int(batching.batch_indices(self.seed, step, len(self.examples),
                                       self.global_batch)[row])
    source, label = self.examples[index]
    rng = np.random.default_rng([self.seed, AUGMENT_STREAM, step, row])
    try:
      pixels, augment = preprocessing.train_example(source, rng, self.size)
      unreadable = -1
    except (images_lib.UnreadableImage, OSError):
      pixels, unreadable = _grey(self.size), index
      augment = np.array([0, 1, 1, 1, 0, 0, 0], np.float32)  # no change
    return {"images": pixels, "labels": np.int32(label), "augment": augment,
            "unreadable": np.int64(unreadable)}


@dataclasses.dataclass(frozen=True)
class EvalBatch:
  """This process's rows of padded evaluation batch b: centre crops, labels, mask."""
  examples: examples_lib.Files | examples_lib.Records
  batch_size: int
  shard: Shard
  size: int
  resize: int

  def __call__(self, b: int) -> dict:
    index, mask = batching.eval_batch_indices(len(self.examples), self.batch_size,
                                              self.shard, int(b))
    images, labels, unreadable = [], [], []
    for i in index.reshape(-1):
      source, label = self.examples[int(i)]
      try:
        images.append(preprocessing.eval_example(source, self.size, self.resize))
        unreadable.append(-1)
      except (images_lib.UnreadableImage, OSError):
        images.append(_grey(self.size))
        unreadable.append(int(i))
      labels.append(label)
    shape = index.shape
    return {"images": np.stack(images).reshape(shape + images[0].shape),
            "labels": np.asarray(labels, np.int32).reshape(shape), "mask": mask,
            "unreadable": np.asarray(unreadable, np.int64)}


# --------------------------------------------------------------------- the source


@dataclasses.dataclass(eq=False)
class StreamingImageNet(Source):
  """ImageNet streamed from `train` and `validation` examples (module docstring)."""
  name: str
  train: examples_lib.Files | examples_lib.Records
  validation: examples_lib.Files | examples_lib.Records
  num_classes: int
  class_names: tuple[str, ...] | None
  image_size: int = 224
  eval_resize: int = 256
  workers: int = 0  # processes decoding training images (0: threads of this process)
  threads: int = 1  # threads decoding evaluation images (and training ones, without workers)

  def __post_init__(self):
    self._unreadable: set[tuple[int, int]] = set()  # (split's id, file index)
    if self.eval_resize < self.image_size:
      raise errors.UserError(f"eval_resize {self.eval_resize} is smaller than image_size "
                             f"{self.image_size}: the centre crop would not fit.")

  @property
  def num_train(self) -> int:
    return len(self.train)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return (self.image_size, self.image_size, 3)

  @property
  def evaluation_splits(self) -> dict[str, int]:
    return {"validation": len(self.validation)}

  def batch_spec(self, leading: tuple[int, ...], train: bool) -> dict:
    spec = super().batch_spec(leading, train)
    if train:
      spec["augment"] = jax.ShapeDtypeStruct(leading + (preprocessing.AUGMENT_SIZE,),
                                             np.float32)
    return spec

  def preprocess(self, batch: dict, key: jax.Array | None) -> jax.Array:
    return on_device.JitterLightingNormalise()(batch, key)

  def identity(self) -> dict:
    return {"name": self.name, "num_classes": self.num_classes,
            "class_names": None if self.class_names is None else list(self.class_names),
            "image_size": self.image_size, "eval_resize": self.eval_resize,
            "train": self.train.identity(), "validation": self.validation.identity()}

  def train_batches(self, seed: int, global_batch: int, start_step: int,
                    chunks: Sequence[int], shard: Shard) -> Iterator[dict]:
    first, per_device = shard.rows(global_batch)
    per_process = shard.devices * per_device
    example = TrainExample(self.train, seed, global_batch, start_step, first, per_process,
                           self.image_size)
    dataset = _map(sum(chunks) * per_process, example).batch(per_process)
    with _parallel(dataset, self.workers, 1 if self.workers else self.threads) as batches:
      for length in chunks:
        steps = [next(batches) for _ in range(length)]
        self._report(self.train, np.concatenate([s.pop("unreadable") for s in steps]))
        yield {name: _by_device([s[name] for s in steps], shard.devices)
               for name in steps[0]}

  def eval_batches(self, split: str, batch_size: int, shard: Shard) -> Iterator[dict]:
    examples = {"validation": self.validation}[split]
    num_batches = -(-len(examples) // batch_size)
    batch = EvalBatch(examples, batch_size, shard, self.image_size, self.eval_resize)
    with _parallel(_map(num_batches, batch), 0, self.threads) as batches:
      for _ in range(num_batches):
        item = next(batches)
        self._report(examples, item.pop("unreadable"))
        yield item

  def _report(self, examples: examples_lib.Files | examples_lib.Records, unreadable: np.ndarray) -> None:
    """Logs each file that could not be decoded, once, with the count so far."""
    for index in sorted(set(int(i) for i in unreadable if i >= 0)):
      if (id(examples), index) not in self._unreadable:
        self._unreadable.add((id(examples), index))
        logging.warning("cannot decode %s: a grey image takes its place (%d such file(s) "
                        "so far).", examples.path(index), len(self._unreadable))


def _by_device(per_step: list[np.ndarray], devices: int) -> np.ndarray:
  """[per_process, ...] of each step -> [devices, steps, per_device, ...]."""
  stacked = per_step[0][None] if len(per_step) == 1 else np.stack(per_step)
  steps, per_process = stacked.shape[:2]
  split = stacked.reshape((steps, devices, per_process // devices) + stacked.shape[2:])
  return np.swapaxes(split, 0, 1)


def _map(length: int, function):
  import grain  # pylint: disable=g-import-not-at-top
  return grain.MapDataset.range(length).map(function)


class _parallel:  # pylint: disable=invalid-name
  """An iterator over `dataset`, its elements made by `workers` processes (0: this
  process) with `threads` threads each, closed (its workers stopped) on exit."""

  def __init__(self, dataset, workers: int, threads: int):
    import grain  # pylint: disable=g-import-not-at-top
    iterable = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=2 * max(1, threads)))
    if workers > 0:
      # Batches come back through the workers' queues rather than shared memory, which
      # grain frees from a thread of its own that the end of the program can outrun
      # (the interpreter then warns of "leaked shared_memory objects").
      iterable = grain.experimental.WithOptionsIterDataset(
          iterable, grain.experimental.DatasetOptions(min_shm_size=2 ** 62))
      iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=workers, per_worker_buffer_size=2))
    self._iterator = iter(iterable)

  def __enter__(self):
    return self._iterator

  def __exit__(self, *exc):
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


# ---------------------------------------------------------------------- registering


def class_folders(root: str) -> tuple[pathlib.Path, pathlib.Path, list[str]]:
  """(ROOT/train, ROOT/val, sorted class names), refusing a layout that cannot work."""
  train_dir, val_dir = pathlib.Path(root) / "train", pathlib.Path(root) / "val"
  for split_dir in (train_dir, val_dir):
    if not split_dir.is_dir():
      raise errors.MissingFileError(
          f"ImageNet folder {root!r} has no {split_dir.name}/ directory: expected "
          f"{root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG.")
  classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
  if len(classes) < 2:
    raise errors.UserError(f"{train_dir} holds {len(classes)} class folder(s): a "
                           "classifier needs at least two (every folder of train/ is one).")
  found = {p.name for p in val_dir.iterdir() if p.is_dir()}
  unknown, missing = sorted(found - set(classes)), sorted(set(classes) - found)
  if unknown or missing:
    raise errors.UserError(
        f"{val_dir} must hold the class folders of {train_dir}: "
        + "; ".join(part for part in (f"unknown {unknown}" if unknown else "",
                                      f"missing {missing}" if missing else "") if part)
        + ". The validation error is over every training class.")
  return train_dir, val_dir, classes


THREADS_UP_TO_CORES = 8


def _parallelism(config: ml_collections.ConfigDict) -> dict:
  """The source's `workers` and `threads` for `config.input_workers`: N > 0 processes
  decoding training images; 0 threads instead, one per core; -1 (the default) threads on
  hosts of up to THREADS_UP_TO_CORES cores, one process per core beyond. Threads measure
  faster where there are few cores (no worker to start, nothing to copy between
  processes: benchmarks/README.md), but share the interpreter: ~20% of an image's time is
  Python, so they stop scaling near 5 cores."""
  cores = os.cpu_count() or 1
  workers = config.input_workers
  if workers < 0:
    workers = 0 if cores <= THREADS_UP_TO_CORES else cores
  return {"workers": workers, "threads": cores if workers == 0 else workers}


@register("imagenet_folder")
def imagenet_folder(config: ml_collections.ConfigDict) -> StreamingImageNet:
  if not config.data_dir:
    raise errors.UserError("dataset 'imagenet_folder' needs data_dir=ROOT holding "
                           "ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG.")
  train_dir, val_dir, classes = class_folders(config.data_dir)
  name = f"imagenet_folder:{os.path.basename(os.path.normpath(config.data_dir))}"
  return StreamingImageNet(name, examples_lib.list_files(train_dir, classes), examples_lib.list_files(val_dir, classes),
                           len(classes), tuple(classes), config.image_size,
                           config.eval_resize, **_parallelism(config))


@register("imagenet2012")
def imagenet2012(config: ml_collections.ConfigDict) -> StreamingImageNet:
  from experiments.data import imagenet_tfds  # pylint: disable=g-import-not-at-top
  train, validation, class_names = imagenet_tfds.load(config.data_dir or None)
  return StreamingImageNet("imagenet2012", examples_lib.Records(train), examples_lib.Records(validation),
                           len(class_names), tuple(class_names), config.image_size,
                           config.eval_resize, **_parallelism(config))
