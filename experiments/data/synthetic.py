"""`synthetic`: a small learnable dataset generated on the fly (the `quick` configs).

3,000 training images (of which `config.validation_size` are held out) and 1,000 test
images of 32x32 px, 10 classes; no download, the same images on every machine.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from experiments.data import in_memory
from experiments.data.source import register


def images(num_examples: int = 4000, num_classes: int = 10, size: int = 32,
           seed: int = 1234) -> in_memory.Split:
  """Noisy, shifted class templates: a classification set a small CNN must learn.

  Each class is a fixed random smooth colour pattern; an example is its template rolled
  by up to 6 px, flipped at random and covered with strong pixel noise (chance is
  1/num_classes).
  """
  rng = np.random.default_rng(seed)
  coarse = rng.normal(size=(num_classes, 4, 4, 3))
  templates = np.kron(coarse, np.ones((1, size // 4, size // 4, 1)))
  labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
  shifts = rng.integers(-6, 7, (num_examples, 2))
  out = np.empty((num_examples, size, size, 3), np.float64)
  for i, (label, (dy, dx)) in enumerate(zip(labels, shifts)):
    image = np.roll(templates[label], (dy, dx), axis=(0, 1))
    out[i] = image[:, ::-1] if rng.random() < 0.5 else image
  out += rng.normal(scale=1.0, size=out.shape)
  return in_memory.Split(np.clip(128 + 40 * out, 0, 255).astype(np.uint8), labels)


@register("synthetic")
def synthetic(config: ml_collections.ConfigDict) -> in_memory.InMemorySource:
  full = images(seed=1234)
  train, validation = in_memory.holdout_random(
      in_memory.take(full, np.arange(3000)), config.validation_size, config.seed)
  test = in_memory.take(full, np.arange(3000, len(full)))
  return in_memory.InMemorySource.from_splits(
      "synthetic", train, validation, test, 10,
      True if config.augment is None else bool(config.augment))
