"""fb.resnet.torch's ImageNet preprocessing (what the paper's ImageNet runs used), on the host.

Huang et al. (2016), Sec. 4, trained on fb.resnet.torch (`datasets/imagenet.lua`,
`datasets/transforms.lua`):

  train  RandomSizedCrop(224): a crop of 8-100% of the area with aspect ratio in
         [3/4, 4/3] (its width and height swapped with probability 1/2), the image's
         centre crop after 10 failed tries, resized to 224x224 (bicubic);
         ColorJitter(brightness, contrast, saturation 0.4, in random order);
         Lighting(0.1, the PCA eigenvalues and eigenvectors below); ColorNormalize;
         HorizontalFlip(0.5)
  eval   Scale(256): the shorter side resized to 256 (bicubic); ColorNormalize;
         CenterCrop(224)

The host decodes, crops, resizes and flips (the costly part), decoding only what the crop
needs: a JPEG is decoded at the smallest of libjpeg's DCT scales (1/8, 1/4, 1/2, 1) that
keeps the crop at least `size` px on each side. What is arithmetic on pixels (jitter,
lighting, normalisation) runs on the device (`on_device.JitterLightingNormalise`), with
per-example parameters the host draws (`augment_parameters`), so every random choice of
an example is a function of (seed, step, row) alone, whatever the devices.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from experiments.data import images as images_lib

AREA = (0.08, 1.0)
ASPECT = (3 / 4, 4 / 3)
ATTEMPTS = 10
JITTER = 0.4  # brightness, contrast, saturation
LIGHTING_STD = 0.1
# PCA of ImageNet's RGB pixels in [0, 1] (fb.resnet.torch's `pca`).
EIGENVALUES = np.array([0.2175, 0.0188, 0.0045], np.float32)
EIGENVECTORS = np.array([[-0.5675, 0.7192, 0.4009],
                         [-0.5808, -0.0045, -0.8140],
                         [-0.5836, -0.6948, 0.4203]], np.float32)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
# The orders ColorJitter's RandomOrder applies brightness (0), contrast (1) and
# saturation (2) in; an example's order is an index into this table.
ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
AUGMENT_SIZE = 8  # horizontal flip, 3 jitter factors, order index, 3 lighting alphas


def random_sized_crop(rng: np.random.Generator, width: int, height: int
                      ) -> tuple[int, int, int, int] | None:
  """(left, top, crop width, crop height) of RandomSizedCrop's crop of an image of
  `width` x `height`, or None when 10 tries all fell outside the image (the caller then
  takes the centre crop)."""
  area = width * height
  for _ in range(ATTEMPTS):
    target = rng.uniform(*AREA) * area
    aspect = rng.uniform(*ASPECT)
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if rng.uniform() < 0.5:
      w, h = h, w
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
  return None


def augment_parameters(rng: np.random.Generator) -> np.ndarray:
  """float32 [AUGMENT_SIZE]: whether to flip, ColorJitter's three factors 1 + U(-0.4,
  0.4) and the index of its order in ORDERS, Lighting's three alphas N(0, 0.1^2)."""
  flip = float(rng.uniform() < 0.5)
  factors = 1.0 + rng.uniform(-JITTER, JITTER, 3)
  order = float(rng.integers(0, len(ORDERS)))
  alphas = rng.normal(0.0, LIGHTING_STD, 3)
  return np.concatenate([[flip], factors, [order], alphas]).astype(np.float32)


def _decode_at_least(image: Image.Image, box: tuple[int, int, int, int],
                     size: int) -> tuple[Image.Image, tuple[float, float, float, float]]:
  """`image` decoded at the smallest DCT scale that keeps `box` (left, top, width,
  height) at least `size` px on each side, and the box in the decoded image's pixels."""
  left, top, w, h = box
  full_w, full_h = image.size
  if image.format == "JPEG":
    image.draft("RGB", (math.ceil(full_w * size / w), math.ceil(full_h * size / h)))
  sx, sy = image.size[0] / full_w, image.size[1] / full_h
  return image, (left * sx, top * sy, (left + w) * sx, (top + h) * sy)


def train_example(source, rng: np.random.Generator, size: int) -> tuple[np.ndarray,
                                                                        np.ndarray]:
  """(uint8 [size, size, 3] crop, float32 augment parameters) of one training image
  (`source`: encoded bytes, a path or a uint8 array), drawn with `rng`: RandomSizedCrop,
  then the horizontal flip; the rest is done on the device with the parameters."""
  image = _opened(source)
  crop = random_sized_crop(rng, *image.size)
  if crop is None:  # fb.resnet.torch: CenterCrop(size) of Scale(size)
    pixels = eval_example(image, size, size)
  else:
    image, box = _decode_at_least(image, crop, size)
    rgb = Image.fromarray(images_lib.to_rgb(image))
    pixels = np.asarray(rgb.resize((size, size), Image.BICUBIC, box=box), np.uint8)
  augment = augment_parameters(rng)
  if augment[0]:
    pixels = pixels[:, ::-1]
  return np.ascontiguousarray(pixels), augment


def eval_example(source, size: int, resize: int) -> np.ndarray:
  """uint8 [size, size, 3]: the shorter side resized to `resize` (bicubic), then the
  centre `size` x `size` crop (Scale(resize), CenterCrop(size))."""
  image = _opened(source)
  width, height = image.size
  scale = resize / min(width, height)
  new_w, new_h = max(resize, round(width * scale)), max(resize, round(height * scale))
  if image.format == "JPEG":
    image.draft("RGB", (new_w, new_h))
  rgb = Image.fromarray(images_lib.to_rgb(image)).resize((new_w, new_h), Image.BICUBIC)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  return np.asarray(rgb, np.uint8)[top:top + size, left:left + size]


def _opened(source) -> Image.Image:
  if isinstance(source, np.ndarray):
    return Image.fromarray(source.astype(np.uint8))
  return images_lib.open_image(source)
