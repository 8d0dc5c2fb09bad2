"""ImageNet's examples: the files of a folder tree, or TFDS's records, at random access.

Both give (encoded image, label) by index, what grain's workers read, and an identity
that tells other data apart on resume without reading every image: the file list,
sizes and labels, and the contents of an even sample of 64 files (records).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import hashlib
import os
import pathlib

import numpy as np

from experiments.runtime import errors

SUFFIXES = (".jpeg", ".jpg", ".png")
_SAMPLED = 64  # files whose contents the identity hashes


@dataclasses.dataclass(frozen=True, eq=False)
class Files:
  """The images of one split of a folder tree and their labels, packed (one bytes
  object of paths) so that sending them to worker processes is cheap."""
  root: str
  paths: bytes  # relative paths, each followed by "\n"
  offsets: np.ndarray  # int64 [n + 1], where each path starts in `paths`
  labels: np.ndarray  # int32 [n]
  sizes: np.ndarray  # int64 [n], bytes of each file

  def __len__(self) -> int:
    return len(self.labels)

  def path(self, i: int) -> str:
    start, end = self.offsets[i], self.offsets[i + 1] - 1
    return os.path.join(self.root, self.paths[start:end].decode())

  def __getitem__(self, i: int) -> tuple[str, int]:
    return self.path(i), int(self.labels[i])

  def identity(self) -> dict:
    """The file list, their sizes and labels, and the contents of an even sample of
    files: other data differs, and nothing but the sample is read."""
    listing = hashlib.blake2b(self.paths, digest_size=16)
    listing.update(self.sizes.tobytes())
    listing.update(self.labels.tobytes())
    contents = hashlib.blake2b(digest_size=16)
    for i in np.linspace(0, len(self) - 1, min(_SAMPLED, len(self))).astype(int):
      with open(self.path(i), "rb") as f:
        contents.update(f.read())
    return {"files": len(self), "listing": listing.hexdigest(),
            "sampled_contents": contents.hexdigest()}


def list_files(split_dir: pathlib.Path, classes: Sequence[str]) -> Files:
  """The images under split_dir/<class>/ (subfolders included) for every class, refusing
  a class folder without images and empty files."""
  paths, labels, sizes = [], [], []
  for label, name in enumerate(classes):
    found = 0
    for dirpath, _, filenames in os.walk(split_dir / name, followlinks=True):
      for filename in sorted(filenames):
        if os.path.splitext(filename)[1].lower() not in SUFFIXES:
          continue
        path = os.path.join(dirpath, filename)
        try:
          size = os.stat(path).st_size
        except OSError as e:  # a broken or looping symbolic link
          raise errors.UserError(f"{path} cannot be read ({e.strerror}): restore it or "
                                 "remove it.") from None
        if size == 0:
          raise errors.UserError(f"{path} is empty (0 bytes): restore it or remove it.")
        paths.append(os.path.relpath(path, split_dir))
        labels.append(label)
        sizes.append(size)
        found += 1
    if not found:
      raise errors.UserError(f"class folder {split_dir / name} holds no .JPEG/.jpg/.png "
                             "images: add images or remove the folder.")
  order = sorted(range(len(paths)), key=lambda i: (labels[i], paths[i]))
  joined = "".join(paths[i] + "\n" for i in order).encode()
  lengths = [len(paths[i].encode()) + 1 for i in order]
  return Files(os.fspath(split_dir), joined, np.concatenate([[0], np.cumsum(lengths)]),
               np.asarray([labels[i] for i in order], np.int32),
               np.asarray([sizes[i] for i in order], np.int64))


@dataclasses.dataclass(frozen=True, eq=False)
class Records:
  """A split of TFDS's imagenet2012 as an ArrayRecord data source (random access, the
  images still encoded)."""
  data_source: object

  def __len__(self) -> int:
    return len(self.data_source)

  def path(self, i: int) -> str:
    return f"imagenet2012 record {i}"

  def __getitem__(self, i: int) -> tuple[bytes, int]:
    record = self.data_source[int(i)]
    return record["image"], int(record["label"])

  def identity(self) -> dict:
    contents = hashlib.blake2b(digest_size=16)
    for i in np.linspace(0, len(self) - 1, min(_SAMPLED, len(self))).astype(int):
      image, label = self[i]
      contents.update(image if isinstance(image, bytes) else np.asarray(image).tobytes())
      contents.update(str(label).encode())
    return {"files": len(self), "sampled_contents": contents.hexdigest()}
