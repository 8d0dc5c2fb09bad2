"""ImageNet input pipelines timed side by side (`python -m benchmarks.input_pipeline --imagenet`).

  ours         `experiments.data.imagenet`: grain over the files, decoded and cropped as
               fb.resnet.torch does, in worker processes ("processes", what training
               runs) or threads ("threads", what evaluation runs); jitter, lighting and
               normalisation are the device's (not timed here)
  tf.data      flax's examples/imagenet `input_pipeline.py` on the same files:
               `decode_and_crop_jpeg` of `sample_distorted_bounding_box`'s crop, bicubic
               resize, flip, normalisation on the host; `cores` threads
  torchvision  `ImageFolder` + `DataLoader(num_workers=cores)`: RandomResizedCrop,
               flip, to a uint8 tensor (where PyTorch is installed)

Each returns images/s of training batches after a warm-up (workers started, first
batches made), and of evaluation batches (shorter side 256, centre 224), both made of
the tree's training images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import itertools
import time

import numpy as np

from experiments.data import Shard
from experiments.data import imagenet
from experiments.data import imagenet_files


def _rate(batches: Iterator, count: Callable[[object], int], warmup: int,
          timed: int) -> float:
  for _ in range(warmup):
    next(batches)
  start, images = time.perf_counter(), 0
  for batch in itertools.islice(batches, timed):
    images += count(batch)
  return images / (time.perf_counter() - start)


def ours(root: str, batch: int, cores: int, kind: str, train: bool, warmup: int,
         timed: int) -> float:
  """images/s of `experiments.data.imagenet` with `cores` worker processes
  (kind="processes") or threads ("threads")."""
  train_dir, _, classes = imagenet.class_folders(root)
  files = imagenet_files.list_files(train_dir, classes)  # (evaluated too: more images)
  source = imagenet.StreamingImageNet("bench", files, files, len(classes), tuple(classes),
                                      workers=cores if kind == "processes" else 0,
                                      threads=cores)
  steps = warmup + timed
  if train:
    batches = source.train_batches(0, batch, 0, [1] * steps, Shard())
  else:
    batches = source.eval_batches("validation", batch, Shard())
  return _rate(batches, lambda b: b["labels"].size, warmup, timed)


def tf_data(root: str, batch: int, cores: int, train: bool, warmup: int,
            timed: int) -> float:
  """images/s of flax's examples/imagenet pipeline (its preprocess_for_train/eval)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  train_dir, _, classes = imagenet.class_folders(root)
  files = imagenet_files.list_files(train_dir, classes)
  paths = [files.path(i) for i in range(len(files))]
  labels = files.labels.astype(np.int64)
  mean = tf.constant([0.485 * 255, 0.456 * 255, 0.406 * 255], shape=[1, 1, 3])
  std = tf.constant([0.229 * 255, 0.224 * 255, 0.225 * 255], shape=[1, 1, 3])

  def train_image(path, label):
    data = tf.io.read_file(path)
    shape = tf.io.extract_jpeg_shape(data)
    box = tf.image.sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
    offset_y, offset_x, _ = tf.unstack(box[0])
    height, width, _ = tf.unstack(box[1])
    window = tf.stack([offset_y, offset_x, height, width])
    image = tf.io.decode_and_crop_jpeg(data, window, channels=3)
    image = tf.image.resize([image], [224, 224], method="bicubic")[0]
    image = tf.image.random_flip_left_right(image)
    return (image - mean) / std, label

  def eval_image(path, label):
    data = tf.io.read_file(path)
    shape = tf.io.extract_jpeg_shape(data)
    side = tf.cast(224 / 256 * tf.cast(tf.minimum(shape[0], shape[1]), tf.float32),
                   tf.int32)
    window = tf.stack([(shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side])
    image = tf.io.decode_and_crop_jpeg(data, window, channels=3)
    image = tf.image.resize([image], [224, 224], method="bicubic")[0]
    return (image - mean) / std, label

  dataset = tf.data.Dataset.from_tensor_slices((paths, labels)).repeat()
  dataset = dataset.shuffle(16 * batch, seed=0) if train else dataset
  dataset = dataset.map(train_image if train else eval_image,
                        num_parallel_calls=cores).batch(batch, drop_remainder=True)
  options = tf.data.Options()
  options.threading.private_threadpool_size = cores
  options.threading.max_intra_op_parallelism = 1
  dataset = dataset.with_options(options).prefetch(2)
  batches = iter(dataset.as_numpy_iterator())
  return _rate(batches, lambda b: b[1].shape[0], warmup, timed)


def torchvision_loader(root: str, batch: int, cores: int, train: bool, warmup: int,
                       timed: int) -> float | None:
  """images/s of torchvision's ImageFolder + DataLoader, or None without PyTorch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torchvision import datasets, transforms  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.set_num_threads(1)
  transform = transforms.Compose(
      [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
       transforms.PILToTensor()] if train else
      [transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()])
  folder = datasets.ImageFolder(f"{root}/train", transform)
  sampler = torch.utils.data.RandomSampler(folder, replacement=True,
                                           num_samples=10 ** 9)
  loader = torch.utils.data.DataLoader(folder, batch_size=batch, sampler=sampler,
                                       num_workers=cores, prefetch_factor=2,
                                       persistent_workers=True)
  return _rate(iter(loader), lambda b: b[1].shape[0], warmup, timed)


PIPELINES = ("ours, processes", "ours, threads", "tf.data (flax)", "torchvision")


def _one(pipeline: str, root: str, batch: int, cores: int, train: bool,
         batches: int) -> float | None:
  if pipeline.startswith("ours"):
    return ours(root, batch, cores, pipeline.split(", ")[1], train, 2, batches)
  if pipeline.startswith("tf.data"):
    return tf_data(root, batch, cores, train, 2, batches)
  return torchvision_loader(root, batch, cores, train, 2, batches)


def measure(root: str, cores: list[int], batch: int, batches: int, repeats: int
            ) -> list[dict]:
  """A row per (pipeline, split, cores): median images/s of `repeats` measurements,
  the pipelines interleaved within each repetition."""
  times: dict = {}
  for _ in range(repeats):
    for n in cores:
      for train in (True, False):
        for pipeline in PIPELINES:
          if pipeline == "ours, processes" and not train:
            continue  # evaluation decodes in threads
          rate = _one(pipeline, root, batch, n, train, batches)
          times.setdefault((pipeline, train, n), []).append(rate)
  rows = []
  for (pipeline, train, n), rates in times.items():
    if any(r is None for r in rates):
      continue
    median = float(np.median(rates))
    rows.append({"pipeline": pipeline, "split": "train" if train else "eval", "cores": n,
                 "images_per_s": median, "images_per_s_per_core": median / n,
                 "min": float(min(rates)), "max": float(max(rates))})
  return rows


def format_table(rows: list[dict]) -> str:
  lines = [f"{'pipeline':>18} {'split':>5} {'cores':>5} {'images/s':>9} {'per core':>9} "
           f"{'spread':>13}"]
  for r in rows:
    lines.append(f"{r['pipeline']:>18} {r['split']:>5} {r['cores']:>5} "
                 f"{r['images_per_s']:9.1f} {r['images_per_s_per_core']:9.1f} "
                 f"{r['min']:6.1f}-{r['max']:6.1f}")
  return "\n".join(lines)
