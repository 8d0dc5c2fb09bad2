"""What the training loop consumes of a dataset (`Source`), and the registry of sources.

A source yields training batches as a pure function of (seed, step), which is what makes
a resumed run train on exactly the batches an uninterrupted one would; evaluation
batches of its splits, every example once; its sizes; an identity that tells other data
apart on resume; and its preprocessing on the device, which the train and eval steps
run (normalisation, and augmentation that is cheap on an accelerator, such as CIFAR's
shift and flip). Host work (decoding, cropping) is the source's own: an in-memory source
gathers arrays (`in_memory.InMemorySource`), a streaming one decodes files in parallel
workers while the devices train.

A new dataset is a function config -> Source registered under a name:

    @source.register("my_data")
    def my_data(config):
      return in_memory.InMemorySource.from_splits("my_data", train, validation, test, ...)

and is trained with `--config.dataset=my_data`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
import dataclasses

import jax
import ml_collections
import numpy as np

from experiments.runtime import errors

# preprocess(batch, key) -> float32 images, on the device, inside the step: `batch` is
# this device's part of a host batch; `key` (one per device and step) may draw the
# augmentation in training and is None at evaluation.
Preprocess = Callable[[dict, "jax.Array | None"], jax.Array]


@dataclasses.dataclass(frozen=True)
class Shard:
  """The part of every global batch this process feeds: rows [index * per_process,
  (index + 1) * per_process) of it, split evenly over its `devices` local devices."""
  index: int = 0
  count: int = 1
  devices: int = 1

  @classmethod
  def of_this_process(cls) -> Shard:
    return cls(jax.process_index(), jax.process_count(), jax.local_device_count())

  def rows(self, global_batch: int) -> tuple[int, int]:
    """(first row of this process, rows per device) of a global batch."""
    per_process = global_batch // self.count
    return self.index * per_process, per_process // self.devices


class Source(abc.ABC):
  """A dataset as the training loop consumes it (module docstring).

  Host batches are dicts of NumPy arrays with leading axes [devices, steps, per_device]
  (training) or [devices, per_device] (evaluation, with a 0/1 "mask" of padded rows):
  "images" of `image_shape` and `image_dtype`, "labels" int32, and any field of the
  source's own that its `batch_spec` declares (what `preprocess` needs on the device).
  """
  name: str  # what the logs and the report call it
  num_classes: int
  num_train: int  # training examples; an epoch is num_train // batch_size steps
  image_shape: tuple[int, ...]
  image_dtype: np.dtype = np.dtype(np.uint8)
  class_names: tuple[str, ...] | None = None  # label i is class_names[i], where known

  @property
  @abc.abstractmethod
  def evaluation_splits(self) -> dict[str, int]:
    """{split: examples} of the splits evaluated: "validation", and "test" if present."""

  @abc.abstractmethod
  def train_batches(self, seed: int, global_batch: int, start_step: int,
                    chunks: Sequence[int], shard: Shard) -> Iterator[dict]:
    """This process's part of the global batches from `start_step` on, one item per
    call of `chunks[i]` steps: a pure function of (seed, step)."""

  @abc.abstractmethod
  def eval_batches(self, split: str, batch_size: int, shard: Shard) -> Iterator[dict]:
    """This process's part of padded batches of `split`: every example once over all
    processes."""

  @abc.abstractmethod
  def identity(self) -> dict:
    """What a model trained on this data depends on (JSON): a restart refuses other data
    by comparing it, field by field."""

  @abc.abstractmethod
  def preprocess(self, batch: dict, key: jax.Array | None) -> jax.Array:
    """The preprocessing on the device (see `Preprocess`); pure, traced into the step."""

  def batch_spec(self, leading: tuple[int, ...], train: bool) -> dict:
    """The shapes and dtypes of a host batch with `leading` axes (to compile ahead)."""
    spec = {"images": jax.ShapeDtypeStruct(leading + tuple(self.image_shape),
                                           self.image_dtype),
            "labels": jax.ShapeDtypeStruct(leading, np.int32)}
    if not train:
      spec["mask"] = jax.ShapeDtypeStruct(leading, np.float32)
    return spec

  def describe(self) -> str:
    splits = ", ".join(f"{n} {split}" for split, n in self.evaluation_splits.items())
    test = "" if "test" in self.evaluation_splits else ", no test split"
    return (f"{self.name}: {self.num_train} train, {splits}{test}, {self.num_classes} "
            f"classes, images {tuple(self.image_shape)}")


# ---------------------------------------------------------------------- the registry

SourceFactory = Callable[[ml_collections.ConfigDict], Source]
_SOURCES: dict[str, SourceFactory] = {}


def register(name: str) -> Callable[[SourceFactory], SourceFactory]:
  """Registers `factory(config) -> Source` as the dataset `name` (`config.dataset`)."""
  def decorate(factory: SourceFactory) -> SourceFactory:
    if name in _SOURCES and _SOURCES[name] is not factory:
      raise ValueError(f"a data source named {name!r} is already registered.")
    _SOURCES[name] = factory
    return factory
  return decorate


def registered() -> tuple[str, ...]:
  return tuple(sorted(_SOURCES))


def build(config: ml_collections.ConfigDict) -> Source:
  """The source `config.dataset`, built from the config's data settings."""
  factory = _SOURCES.get(config.dataset)
  if factory is None:
    raise errors.UserError(f"unknown dataset {config.dataset!r}; choose one of "
                           f"{', '.join(registered())}.")
  return factory(config)
