r"""Writes an ImageNet-like image tree: ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG.

  python -m benchmarks.imagenet_like --root=/tmp/imagenet_like --classes=10 \
      --train_per_class=100 --val_per_class=10 [--width=500 --height=375]

As ILSVRC-2012 is: JPEGs of random sizes around width x height (each side within
+-30%), quality 90, among them CMYK JPEGs, greyscale JPEGs and PNG files named .JPEG
(1 in 50 files, the first file of every class among them). Each class has its
own colour and stripe pattern under noise, so a network can learn them. For the tests
and `benchmarks.input_pipeline`; there is no ImageNet on the machines that built this.
"""

from __future__ import annotations

import os
import pathlib

from absl import app
from absl import flags
import numpy as np
from PIL import Image

KINDS = ("rgb", "cmyk", "grey", "png")  # the first file of each class cycles through them


def image(rng: np.random.Generator, label: int, width: int, height: int) -> np.ndarray:
  """uint8 [h, w, 3]: class `label`'s colour and stripes, at a random size and phase."""
  w = int(width * rng.uniform(0.7, 1.3))
  h = int(height * rng.uniform(0.7, 1.3))
  colour = np.random.default_rng(label).uniform(40, 215, 3)
  period = 4 + (label % 7) * 3
  y, x = np.mgrid[0:h, 0:w]
  angle = (label % 4) * np.pi / 4
  stripes = np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period
                   + rng.uniform(0, 2 * np.pi))
  pixels = colour + 40 * stripes[..., None] + rng.normal(0, 25, (h, w, 3))
  return np.clip(pixels, 0, 255).astype(np.uint8)


def save(pixels: np.ndarray, path: pathlib.Path, kind: str) -> None:
  picture = Image.fromarray(pixels)
  if kind == "png":
    picture.save(path, format="PNG")  # a PNG behind a .JPEG name
  elif kind == "cmyk":
    picture.convert("CMYK").save(path, format="JPEG", quality=90)
  elif kind == "grey":
    picture.convert("L").save(path, format="JPEG", quality=90)
  else:
    picture.save(path, format="JPEG", quality=90)


def write_tree(root: str | os.PathLike, classes: int, train_per_class: int,
               val_per_class: int, width: int = 500, height: int = 375,
               seed: int = 0, special_every: int = 50) -> pathlib.Path:
  """Writes the tree (module docstring) and returns ROOT; `special_every` = 0 writes
  RGB JPEGs only."""
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  for split, per_class in (("train", train_per_class), ("val", val_per_class)):
    for label in range(classes):
      folder = root / split / f"n{label:08d}"
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(per_class):
        kind = "rgb"
        if special_every and i == 0:
          kind = KINDS[label % len(KINDS)]
        elif special_every and i % special_every == special_every // 2:
          kind = KINDS[1 + i % 3]
        save(image(rng, label, width, height), folder / f"n{label:08d}_{i}.JPEG", kind)
  return root


def main(argv):
  del argv
  root = write_tree(FLAGS.root, FLAGS.classes, FLAGS.train_per_class, FLAGS.val_per_class,
                    FLAGS.width, FLAGS.height, FLAGS.seed, FLAGS.special_every)
  print(root)


if __name__ == "__main__":
  FLAGS = flags.FLAGS
  flags.DEFINE_string("root", None, "Where the tree goes.")
  flags.DEFINE_integer("classes", 10, "Number of classes (wnid folders).")
  flags.DEFINE_integer("train_per_class", 100, "Training images per class.")
  flags.DEFINE_integer("val_per_class", 10, "Validation images per class.")
  flags.DEFINE_integer("width", 500, "Typical width (each image within +-30%).")
  flags.DEFINE_integer("height", 375, "Typical height.")
  flags.DEFINE_integer("seed", 0, "Seed of the images.")
  flags.DEFINE_integer("special_every", 50, "One CMYK, greyscale or PNG file in this "
                       "many (0: RGB JPEGs only).")
  flags.mark_flag_as_required("root")
  app.run(main)
