"""Which examples make each batch: pure functions of (seed, step), shared by all sources.

Training: epoch e visits the training set in the order
`np.random.default_rng([seed, e]).permutation(n)`, dropping the last partial batch, so
global batch s holds the examples at positions [p * B, (p + 1) * B) of its epoch's order
(e, p = divmod(s, n // B)). Process i of k feeds rows [i * B/k, (i + 1) * B/k) of it,
split evenly over its devices. A resumed run therefore sees exactly the batches an
uninterrupted one would, and k processes train what one does.

Evaluation: consecutive batches of a split, the last one padded (a 0/1 mask marks the
real examples), each process taking its rows of every batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from experiments.data.source import Shard
from experiments.runtime import errors


def steps_per_epoch(num_train: int, global_batch: int) -> int:
  if num_train < global_batch:
    raise errors.UserError(f"the training set ({num_train}) is smaller than one batch "
                           f"({global_batch}).")
  return num_train // global_batch


_ORDER_CACHE: dict = {}


def _epoch_order(seed: int, epoch: int, num_train: int) -> np.ndarray:
  key = (seed, epoch, num_train)
  if key not in _ORDER_CACHE:
    _ORDER_CACHE.clear()
    _ORDER_CACHE[key] = np.random.default_rng([seed, epoch]).permutation(num_train)
  return _ORDER_CACHE[key]


def batch_indices(seed: int, step: int, num_train: int, global_batch: int) -> np.ndarray:
  """Indices of the training examples of global batch `step` (module docstring)."""
  per_epoch = steps_per_epoch(num_train, global_batch)
  epoch, position = divmod(step, per_epoch)
  order = _epoch_order(seed, epoch, num_train)
  return order[position * global_batch:(position + 1) * global_batch]


def train_indices(seed: int, num_train: int, global_batch: int, start_step: int,
                  chunks: Sequence[int], shard: Shard) -> Iterator[tuple[int, np.ndarray]]:
  """(first step, indices [devices, steps, per_device]) of this process's examples for
  each call of `chunks[i]` steps from `start_step` on."""
  first, per_device = shard.rows(global_batch)
  step = start_step
  for length in chunks:
    index = np.stack([batch_indices(seed, s, num_train, global_batch)
                      for s in range(step, step + length)])
    index = index[:, first:first + shard.devices * per_device]
    yield step, index.reshape(length, shard.devices, per_device).transpose(1, 0, 2)
    step += length


def eval_batch_indices(num_examples: int, batch_size: int, shard: Shard,
                       b: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices, mask), each [devices, per_device], of this process's rows of padded
  evaluation batch `b` of a split of `num_examples`."""
  first, per_device = shard.rows(batch_size)
  rows = slice(first, first + shard.devices * per_device)
  index = np.arange(b * batch_size, (b + 1) * batch_size)
  mask = (index < num_examples).astype(np.float32)
  index = np.minimum(index, num_examples - 1)
  return (index[rows].reshape(shard.devices, per_device),
          mask[rows].reshape(shard.devices, per_device))


def eval_indices(num_examples: int, batch_size: int,
                 shard: Shard) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """`eval_batch_indices` of every evaluation batch of the split, in order."""
  for b in range(-(-num_examples // batch_size)):
    yield eval_batch_indices(num_examples, batch_size, shard, b)
