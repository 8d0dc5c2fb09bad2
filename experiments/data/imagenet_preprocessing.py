"""fb.resnet.torch's ImageNet preprocessing (what the paper's ImageNet runs used), on the host.

Huang et al. (2016), Sec. 4, trained on fb.resnet.torch (`datasets/imagenet.lua`,
`datasets/transforms.lua`):

  train  RandomSizedCrop(224): a crop of 8-100% of the area with aspect ratio in
         [3/4, 4/3] (its width and height swapped with probability 1/2), the image's
         centre crop after 10 failed tries, resized to 224x224 (bicubic);
         ColorJitter(brightness, contrast, saturation 0.4, in random order: the three
         blends commute, so any order gives the same image);
         Lighting(0.1, the PCA eigenvalues and eigenvectors below); ColorNormalize;
         HorizontalFlip(0.5)
  eval   Scale(256): the shorter side resized to 256 (bicubic); ColorNormalize;
         CenterCrop(224)

The host decodes, crops, resizes and flips (the costly part): a JPEG is decoded by
libjpeg-turbo (simplejpeg) at the smallest of its DCT scales (1/8, ..., 1) that keeps the
crop at least `size` px on each side, and resized with OpenCV's bicubic (as Torch7's
image.scale, no antialiasing kernel); Pillow decodes what libjpeg-turbo cannot (PNGs).
Measured on one core, 500x375 JPEGs: 1.1 ms an image against 2.3 ms with Pillow's
decoder and resize (README.md's ImageNet section). What is arithmetic on pixels (jitter,
lighting, normalisation) runs on the device (`on_device.JitterLightingNormalise`), with
per-example parameters the host draws (`augment_parameters`), so every random choice of
an example is a function of (seed, step, row) alone, whatever the devices.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import simplejpeg

from experiments.data import images as images_lib

cv2.setNumThreads(1)  # the workers are the parallelism

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
AUGMENT_SIZE = 7  # horizontal flip, 3 jitter factors, 3 lighting alphas


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
  0.4) (brightness, contrast, saturation), Lighting's three alphas N(0, 0.1^2).

  ColorJitter's random order is not drawn: fb.resnet.torch's three blends are linear
  and unclamped, and commute (`on_device.color_jitter`), so every order gives the same
  image."""
  flip = float(rng.uniform() < 0.5)
  factors = 1.0 + rng.uniform(-JITTER, JITTER, 3)
  alphas = rng.normal(0.0, LIGHTING_STD, 3)
  return np.concatenate([[flip], factors, alphas]).astype(np.float32)


def decoded(source, min_size: tuple[int, int] | None = None, fast: bool = False
            ) -> tuple[np.ndarray, tuple[int, int]]:
  """(uint8 [h, w, 3] RGB pixels, (full width, full height)) of an image given as encoded
  bytes, a path or an RGB array. A JPEG is decoded by libjpeg-turbo (simplejpeg) at the
  smallest DCT scale that keeps it at least `min_size` (width, height), with its fast
  integer DCT and upsampling if `fast` (tf.image's default; ~10% less time); anything else
  (a PNG named .JPEG, a JPEG with errors: Pillow decodes one whose errors it can pass,
  refuses a truncated one) by Pillow, at full size."""
  if isinstance(source, np.ndarray):
    return source.astype(np.uint8), (source.shape[1], source.shape[0])
  if not isinstance(source, bytes):
    with open(source, "rb") as f:
      source = f.read()
  try:
    height, width, _, _ = simplejpeg.decode_jpeg_header(source, strict=False)
    min_w, min_h = min_size or (0, 0)
    return simplejpeg.decode_jpeg(source, min_width=min_w, min_height=min_h,
                                  fastdct=fast, fastupsample=fast), (width, height)
  except Exception:  # pylint: disable=broad-except  (no JPEG, or one with errors)
    pixels = images_lib.to_rgb(images_lib.open_image(source))
    return pixels, (pixels.shape[1], pixels.shape[0])


def image_size(source) -> tuple[int, int]:
  """(width, height) of an image, from its header where it has one."""
  if isinstance(source, np.ndarray):
    return source.shape[1], source.shape[0]
  if not isinstance(source, bytes):
    with open(source, "rb") as f:
      source = f.read()
  try:
    height, width, _, _ = simplejpeg.decode_jpeg_header(source, strict=False)
    return width, height
  except Exception:  # pylint: disable=broad-except  (Pillow reads other headers)
    with images_lib.open_image(source) as image:
      return image.size


def _resized(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
  """Bicubic resampling to width x height, as Torch7's image.scale and tf.image.resize:
  the cubic kernel at the source grid (no wider antialiasing kernel when shrinking)."""
  return cv2.resize(pixels, (width, height), interpolation=cv2.INTER_CUBIC)


def train_example(source, rng: np.random.Generator, size: int) -> tuple[np.ndarray,
                                                                        np.ndarray]:
  """(uint8 [size, size, 3] crop, float32 augment parameters) of one training image
  (`source`: encoded bytes, a path or a uint8 array), drawn with `rng`: RandomSizedCrop,
  then the horizontal flip; the rest is done on the device with the parameters."""
  if not isinstance(source, (bytes, np.ndarray)):
    with open(source, "rb") as f:
      source = f.read()
  width, height = image_size(source)
  crop = random_sized_crop(rng, width, height)
  if crop is None:  # fb.resnet.torch: CenterCrop(size) of Scale(size)
    pixels = eval_example(source, size, size)
  else:
    left, top, w, h = crop
    full, _ = decoded(source, (math.ceil(width * size / w), math.ceil(height * size / h)),
                      fast=True)
    sx, sy = full.shape[1] / width, full.shape[0] / height
    x0, y0 = round(left * sx), round(top * sy)
    x1, y1 = max(x0 + 1, round((left + w) * sx)), max(y0 + 1, round((top + h) * sy))
    pixels = _resized(full[y0:y1, x0:x1], size, size)
  augment = augment_parameters(rng)
  if augment[0]:
    pixels = pixels[:, ::-1]
  return pixels, augment


def eval_example(source, size: int, resize: int) -> np.ndarray:
  """uint8 [size, size, 3]: the shorter side resized to `resize` (bicubic), then the
  centre `size` x `size` crop (Scale(resize), CenterCrop(size))."""
  if not isinstance(source, (bytes, np.ndarray)):
    with open(source, "rb") as f:
      source = f.read()
  width, height = image_size(source)
  scale = resize / min(width, height)
  new_w, new_h = max(resize, round(width * scale)), max(resize, round(height * scale))
  full, _ = decoded(source, (new_w, new_h))
  scaled = _resized(full, new_w, new_h)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  return scaled[top:top + size, left:left + size]
