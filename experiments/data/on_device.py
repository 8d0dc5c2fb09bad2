"""Preprocessing that runs on the accelerator, inside the train and eval steps.

The paper's CIFAR/SVHN protocol (Huang et al., 2016, Sec. 4): normalise by the per-pixel
mean image and one global std of the training images; in training, CIFAR's augmentation,
a random translation by an integer in [-4, 4] on each axis with zero fill after
normalisation (= 4-px zero pad and a random 32x32 crop) and a horizontal flip with
probability 1/2 (`NormaliseAndShift`). ImageNet's colour augmentation and normalisation
(fb.resnet.torch, `JitterLightingNormalise`). Uploading uint8 images and doing this on
the device moves a quarter of the bytes float32 images would.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments.data import imagenet_preprocessing as host


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


def grayscale(images: jax.Array) -> jax.Array:
  """Luma 0.299 R + 0.587 G + 0.114 B of images [..., 3] (fb.resnet.torch's grayscale)."""
  return images @ jnp.asarray([0.299, 0.587, 0.114], images.dtype)


def color_jitter(images: jax.Array, factors: jax.Array) -> jax.Array:
  """fb.resnet.torch's ColorJitter of images [B, H, W, 3] in [0, 1], per example with
  `factors` [B, 3] = (a_b, a_c, a_s):

    brightness  x <- a_b x
    contrast    x <- a_c x + (1 - a_c) mean(gray(x))
    saturation  x <- a_s x + (1 - a_s) gray(x)

  fb.resnet.torch applies them in random order; as they are linear, unclamped and gray()
  of a gray image is itself, they commute, and this applies them in the order above."""
  a = factors[:, None, None, :]
  images = a[..., 0:1] * images
  mean = jnp.mean(grayscale(images), axis=(1, 2), keepdims=True)[..., None]
  images = a[..., 1:2] * images + (1.0 - a[..., 1:2]) * mean
  return a[..., 2:3] * images + (1.0 - a[..., 2:3]) * grayscale(images)[..., None]


def lighting(images: jax.Array, alphas: jax.Array) -> jax.Array:
  """fb.resnet.torch's Lighting: x <- x + V (alpha * lambda), per example, V and lambda
  the PCA eigenvectors and eigenvalues of ImageNet's pixels, alpha [B, 3] ~ N(0, 0.1^2)."""
  rgb = (alphas * jnp.asarray(host.EIGENVALUES)) @ jnp.asarray(host.EIGENVECTORS).T
  return images + rgb[:, None, None, :]


@dataclasses.dataclass(frozen=True, eq=False)
class JitterLightingNormalise:
  """`Source.preprocess` of fb.resnet.torch's ImageNet protocol on the device: uint8
  crops (already cropped, resized and flipped on the host) to [0, 1]; in training
  ColorJitter and Lighting with the host's per-example parameters (batch["augment"],
  `imagenet_preprocessing.augment_parameters`); then ColorNormalize, (x - mean) / std
  per channel."""

  def __call__(self, batch: dict, key: jax.Array | None) -> jax.Array:
    del key  # every random choice came from the host
    images = batch["images"].astype(jnp.float32) / 255.0
    if "augment" in batch:
      augment = batch["augment"]
      images = color_jitter(images, augment[:, 1:4])
      images = lighting(images, augment[:, 4:7])
    return (images - jnp.asarray(host.MEAN)) / jnp.asarray(host.STD)


@dataclasses.dataclass(frozen=True, eq=False)
class NormaliseAndShift:
  """`Source.preprocess` of the paper's protocol: `normalise`, then in training (a key
  given) `shift_and_flip` if `augment`."""
  mean_image: np.ndarray  # float32 [H, W, C]
  std: float
  augment: bool

  def __call__(self, batch: dict, key: jax.Array | None) -> jax.Array:
    images = normalise(batch["images"], jnp.asarray(self.mean_image), float(self.std))
    if key is not None and self.augment:
      images = shift_and_flip(key, images)
    return images
