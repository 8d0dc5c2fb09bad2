"""Preprocessing that runs on the accelerator, inside the train and eval steps.

The paper's CIFAR/SVHN protocol (Huang et al., 2016, Sec. 4): normalise by the per-pixel
mean image and one global std of the training images; in training, CIFAR's augmentation,
a random translation by an integer in [-4, 4] on each axis with zero fill after
normalisation (= 4-px zero pad and a random 32x32 crop) and a horizontal flip with
probability 1/2. Uploading uint8 images and doing this on the device moves a quarter of
the bytes float32 images would.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def normalise(images: jax.Array, mean_image: jax.Array, std) -> jax.Array:
  """(x - per-pixel mean) / global std, in float32."""
  return (images.astype(jnp.float32) - mean_image) / std


def shift_and_flip(key: jax.Array, images: jax.Array, max_shift: int = 4) -> jax.Array:
  """The paper's CIFAR augmentation of normalised images [B, H, W, C].

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


@dataclasses.dataclass(frozen=True, eq=False)
class NormaliseAndShift:
  """`Source.preprocess` of the paper's protocol: `normalise`, then in training (a key
  given) `shift_and_flip` if `augment`."""
  mean_image: np.ndarray  # float32 [H, W, C]
  std: float
  augment: bool

  def __call__(self, images: jax.Array, key: jax.Array | None) -> jax.Array:
    images = normalise(images, jnp.asarray(self.mean_image), float(self.std))
    if key is not None and self.augment:
      images = shift_and_flip(key, images)
    return images
