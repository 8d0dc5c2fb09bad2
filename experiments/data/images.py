"""Image files decoded to 8-bit RGB at their real bit depth, or refused in words.

Every image a source trains on goes through `to_rgb`: JPEG (also CMYK and greyscale, as
ILSVRC-2012 holds), PNG (also 16-bit, palette and greyscale, and a PNG whose name says
.JPEG), decided by the file's content, not its name. A 16-bit image is scaled to 8 bits
(v * 255 / 65535, rounded) rather than clipped, which is what a plain
`Image.convert("RGB")` would do to it; an alpha channel is dropped, as torchvision's
ImageFolder drops it.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

# Pillow's modes of 16-bit greyscale images (PNG), and of 32-bit integer ones.
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class UnreadableImage(ValueError):
  """A file that is no image this project can decode (the message says why)."""


def open_image(source: str | os.PathLike | bytes) -> Image.Image:
  """The image in a path or in bytes, opened lazily (nothing decoded yet)."""
  try:
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
  except Exception as e:  # pylint: disable=broad-except
    raise UnreadableImage(f"not an image ({e})") from None


def as_rgb(image: Image.Image) -> Image.Image:
  """The opened `image` as an 8-bit RGB image (module docstring); itself if it is one."""
  try:
    if image.mode in _SIXTEEN_BIT or image.mode == "I":
      values = np.asarray(image, np.int64)
      if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
        raise UnreadableImage(f"{image.mode} pixel values outside 0..65535")
      eight = ((values * 255 + 32767) // 65535).astype(np.uint8)
      return Image.fromarray(np.repeat(eight[..., None], 3, axis=-1))
    if image.mode == "F":
      raise UnreadableImage("floating-point pixels: convert it to 8 or 16 bits first")
    if image.mode == "RGB":
      image.load()
      return image
    return image.convert("RGB")
  except UnreadableImage:
    raise
  except Exception as e:  # pylint: disable=broad-except  (truncated, corrupt data)
    raise UnreadableImage(f"cannot decode it ({e})") from None


def to_rgb(image: Image.Image) -> np.ndarray:
  """uint8 [H, W, 3] of an opened image (module docstring)."""
  return np.asarray(as_rgb(image), np.uint8)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
  """uint8 [H, W, 3] of the image file at `path`."""
  with open_image(path) as image:
    return to_rgb(image)
