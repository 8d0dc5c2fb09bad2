"""Data sources: a dataset added from outside experiments/ trains and resumes like CIFAR."""
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import data
from experiments.data import batching
from experiments.runtime import errors
from experiments.training import checkpoints
from experiments.training import loop
from tests.experiments.test_training import tiny_config


class Stripes(data.Source):
  """A source written here, against the interface alone: 8x8 images of horizontal or
  vertical stripes of one of 4 periods (8 classes), made on the fly from the example's
  index, and normalised on the device by its own rule."""
  name, num_classes, num_train, image_shape = "stripes", 8, 64, (8, 8, 1)

  @property
  def evaluation_splits(self):
    return {"validation": 16}

  def _examples(self, index):
    labels = (index * 7 + 3) % self.num_classes
    period, vertical = (labels % 4 + 1)[..., None, None], (labels >= 4)[..., None, None]
    coordinate = np.where(vertical, np.arange(8)[None, :], np.arange(8)[:, None])
    images = coordinate // period % 2 * 200 + (index % 5)[..., None, None]
    return images[..., None].astype(np.uint8), labels.astype(np.int32)

  def train_batches(self, seed, global_batch, start_step, chunks, shard):
    for _, index in batching.train_indices(seed, self.num_train, global_batch,
                                           start_step, chunks, shard):
      images, labels = self._examples(index)
      yield {"images": images, "labels": labels}

  def eval_batches(self, split, batch_size, shard):
    for index, mask in batching.eval_indices(16, batch_size, shard):
      images, labels = self._examples(index + 1000)
      yield {"images": images, "labels": labels, "mask": mask}

  def identity(self):
    return {"name": self.name, "examples": self.num_train,
            "generator": hashlib.sha256(self._examples(np.arange(64))[0]).hexdigest()}

  def preprocess(self, batch, key):
    del key  # no augmentation
    return batch["images"].astype(jnp.float32) / 100.0 - 1.0


@data.register("stripes")
def stripes(config):
  del config
  return Stripes()


def final_checksums(workdir):
  manager = checkpoints.Checkpoints(workdir)
  try:
    return manager.read_meta(manager.steps()[-1])["checksums"]
  finally:
    manager.close()


def test_a_registered_source_trains_and_resumes_bit_identically(tmp_path):
  config = tiny_config(dataset="stripes", epochs=2, log_every_steps=3)  # 8 steps/epoch
  straight = loop.train_and_evaluate(config, str(tmp_path / "straight"))
  assert straight.results.finished and straight.results.steps == 16
  assert straight.results.dataset == ("stripes: 64 train, 16 validation, no test split, "
                                      "8 classes, images (8, 8, 1)")
  config.halt_after_steps = 5
  halted = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert halted.results.steps == 5 and not halted.results.finished
  config.halt_after_steps = 0
  resumed = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed.results.finished
  assert final_checksums(tmp_path / "resumed") == final_checksums(tmp_path / "straight")
  assert resumed.results.best_validation_error == straight.results.best_validation_error


def test_the_registry_names_its_sources_and_refuses_a_second_one_of_a_name():
  assert {"cifar10", "cifar100", "svhn_cropped", "folder", "synthetic", "stripes"} <= set(
      data.registered())
  with pytest.raises(ValueError, match="'stripes' is already registered"):
    data.register("stripes")(lambda config: Stripes())
  with pytest.raises(errors.UserError, match="unknown dataset 'strips'; choose one of .*stripes"):
    data.build(tiny_config(dataset="strips"))


def test_train_batches_are_the_seeded_epoch_order_split_by_process_and_device():
  """Global batch s of an epoch is positions [s B, (s + 1) B) of the epoch's permutation;
  process i of k takes rows [i B/k, (i + 1) B/k) of it, device d of each process its
  consecutive share."""
  order = np.random.default_rng([3, 1]).permutation(64)  # epoch 1 of seed 3
  shard = data.Shard(index=1, count=2, devices=2)
  [(first, index)] = list(batching.train_indices(3, 64, 16, 5, [1], shard))  # step 5
  assert first == 5 and index.shape == (2, 1, 4)
  np.testing.assert_array_equal(index.reshape(-1), order[16:32][8:16])
  masks = [mask for _, mask in batching.eval_indices(10, 8, data.Shard(0, 1, 2))]
  assert [m.sum() for m in masks] == [8, 2]  # the last batch padded, padding masked
  assert jax.device_count() == 4
