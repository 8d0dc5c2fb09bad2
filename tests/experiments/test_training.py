"""The training protocol: schedule, data, end-to-end runs, resuming, bad configs."""
import importlib
import json
import os
import pathlib

from flax import jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from experiments import data
from experiments.configs import default
from experiments.configs import paper
from experiments.configs import quick
from experiments.data import batching
from experiments.data import in_memory
from experiments.data import on_device
from experiments.data import synthetic
from experiments.training import evaluation
from experiments.training import loop
from experiments.training import recipe
from experiments.training import setup as setup_lib
from experiments.training import steps
from tests import helpers

CONFIGS = [("paper", f"{run}{variant}") for run in paper.RUNS for variant in ("", ",constant")
           ] + [("quick", ""), ("quick", "tiny")]


def tiny_config(**overrides):
  return default.override(quick.get_config("tiny"), overrides)


def tiny_dataset(n=48, seed=0):
  split = synthetic.images(num_examples=n + 16, size=8, seed=seed)
  train_split, val = in_memory.holdout_random(in_memory.take(split, np.arange(n)), 8, 0)
  test = in_memory.take(split, np.arange(n, n + 16))
  return in_memory.InMemorySource.from_splits("tiny", train_split, val, test, 10, True)


def folder_source(root, **overrides):
  """The `folder` source of ROOT (a data config of its own; `overrides` its fields)."""
  return data.build(tiny_config(dataset="folder", data_dir=str(root), **overrides))


def test_paper_schedule_boundaries():
  config = default.get_config()  # 500 epochs, drops after epochs 250 and 375
  spe = 351
  lr = recipe.learning_rate_schedule(config, spe)
  assert float(lr(0)) == pytest.approx(0.1)
  assert float(lr(250 * spe - 1)) == pytest.approx(0.1)
  assert float(lr(250 * spe)) == pytest.approx(0.01)
  assert float(lr(375 * spe - 1)) == pytest.approx(0.01)
  assert float(lr(375 * spe)) == pytest.approx(0.001)
  assert float(lr(500 * spe)) == pytest.approx(0.001)


def test_resnet1202_warmup_and_svhn_schedule():
  config = paper.get_config("cifar10_1202")
  lr = recipe.learning_rate_schedule(config, 100)
  assert [float(lr(s)) for s in (0, 999, 1000, 14999, 15000, 22500)] == pytest.approx(
      [0.01, 0.01, 0.1, 0.1, 0.01, 0.001])
  svhn = paper.get_config("svhn")
  lr = recipe.learning_rate_schedule(svhn, 100)  # 50 epochs: drops after 30 and 35
  assert [float(lr(s)) for s in (2999, 3000, 3499, 3500)] == pytest.approx(
      [0.1, 0.01, 0.01, 0.001])


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_every_config_builds_its_model(name, arg):
  config = importlib.import_module(f"experiments.configs.{name}").get_config(arg)
  model = recipe.build_model(config, 10)
  assert model.num_blocks == 3 * (config.model.depth - 2) // 6
  assert (model.survival_probs()[-1] == 1.0) == arg.endswith("constant")


def test_an_unknown_config_argument_names_the_choices():
  with pytest.raises(ValueError, match="give one of cifar10, cifar100, svhn, cifar10_1202"):
    paper.get_config("cifar10,shallow")
  with pytest.raises(ValueError, match="give none or 'tiny'"):
    quick.get_config("huge")


def test_validation_split_is_disjoint_seeded_and_stable():
  split = in_memory.Split(np.zeros((1000, 1, 1, 1), np.uint8),
                          (np.arange(1000) % 10).astype(np.int32))
  ids = in_memory.Split(np.zeros((1000, 1, 1, 1), np.uint8), np.arange(1000, dtype=np.int32))
  train_a, val_a = in_memory.holdout_random(ids, 100, seed=3)
  train_b, val_b = in_memory.holdout_random(ids, 100, seed=3)
  _, val_c = in_memory.holdout_random(ids, 100, seed=4)
  assert len(val_a) == 100 and len(train_a) == 900
  assert not set(train_a.labels) & set(val_a.labels)
  assert set(train_a.labels) | set(val_a.labels) == set(range(1000))
  np.testing.assert_array_equal(val_a.labels, val_b.labels)
  assert not np.array_equal(val_a.labels, val_c.labels)
  _, per_class = in_memory.holdout_per_class(split, 20, seed=0)
  assert np.all(np.bincount(per_class.labels) == 20)


def test_batches_are_a_function_of_seed_and_step():
  seen = np.concatenate([batching.batch_indices(0, s, 100, 10) for s in range(10)])
  assert sorted(seen) == list(range(100))  # one epoch visits every example once
  np.testing.assert_array_equal(batching.batch_indices(0, 13, 100, 10),
                                batching.batch_indices(0, 13, 100, 10))
  assert not np.array_equal(batching.batch_indices(0, 3, 100, 10),
                            batching.batch_indices(0, 13, 100, 10))  # reshuffled per epoch
  ids = in_memory.Split(np.zeros((100, 1, 1, 1), np.uint8), np.arange(100, dtype=np.int32))
  source = in_memory.InMemorySource.from_splits("ids", ids, ids, None, 100, False)
  whole = next(source.train_batches(0, 8, 5, [2], data.Shard(0, 1, 2)))["labels"]
  parts = [next(source.train_batches(0, 8, 5, [2], data.Shard(p, 2, 2)))["labels"]
           for p in range(2)]
  assert whole.shape == (2, 2, 4) and parts[0].shape == (2, 2, 2)
  np.testing.assert_array_equal(np.sort(np.concatenate(parts, -1).ravel()),
                                np.sort(whole.ravel()))


def test_augment_is_a_zero_filled_shift_and_flip():
  images = jax.random.normal(jax.random.key(0), (64, 8, 8, 1)) + 10.0
  out = np.asarray(on_device.shift_and_flip(jax.random.key(1), images, max_shift=2))
  images = np.asarray(images)
  for original, augmented in zip(images, out):
    matches = 0
    for flip in (False, True):
      source = original[:, ::-1] if flip else original
      for dy in range(-2, 3):
        for dx in range(-2, 3):
          padded = np.pad(source, ((2, 2), (2, 2), (0, 0)))
          crop = padded[2 + dy:10 + dy, 2 + dx:10 + dx]
          matches += np.array_equal(crop, augmented)
    assert matches == 1


def test_normalisation_uses_per_pixel_mean_and_global_std():
  images = np.random.default_rng(0).integers(0, 255, (50, 4, 4, 3)).astype(np.uint8)
  mean, std = in_memory.normalisation(images)
  np.testing.assert_allclose(mean, images.mean(0), rtol=1e-6)
  np.testing.assert_allclose(std, (images - images.mean(0)).std(), rtol=1e-6)


def write_image_folder(root: pathlib.Path, n_per_class=12, with_test=True):
  split = synthetic.images(num_examples=400, num_classes=3, size=8, seed=5)
  splits = {"train": n_per_class, "test": 4} if with_test else {"train": n_per_class}
  for name, count in splits.items():
    for c, cls in enumerate(["cat", "dog", "emu"]):
      (root / name / cls).mkdir(parents=True)
      images = split.images[split.labels == c]
      for i in range(count):
        Image.fromarray(images[i + (0 if name == "train" else n_per_class)]).save(
            root / name / cls / f"{i}.png")


def test_end_to_end_on_an_image_folder_with_4_devices(tmp_path):
  write_image_folder(tmp_path / "data")
  config = tiny_config(dataset="folder", data_dir=str(tmp_path / "data"), epochs=2,
                       validation_size=4)
  run = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert jax.device_count() == 4
  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  assert saved["version"] == 2
  assert saved["steps"] == 2 * (32 // 8) and saved["finished"]
  assert saved["dataset"].startswith("folder:data: 32 train, 4 validation, 12 test, 3 classes")
  for key in ("best_validation_error", "test_error_at_best_validation", "final_test_error",
              "final_validation_error", "seed", "config"):
    assert saved[key] is not None, key
  assert saved["timing"]["wall_s"] > saved["timing"]["train_s"] > 0
  lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert any("validation/error" in l for l in lines) and any("train/loss" in l for l in lines)
  assert os.listdir(tmp_path / "run" / "tensorboard")
  assert os.listdir(tmp_path / "run" / "best")
  assert run.state.step == 8 and run.results.to_json() == saved


def test_an_evaluation_over_4_devices_counts_every_example_once_without_a_collective():
  """16 test examples in batches of 12 (the second one padded) over 4 devices sum to what
  one forward pass over the split gives, and the compiled eval step has no collective
  (with one, jax 0.10.2's XLA:CPU hung: `steps.sum_over_devices`)."""
  source = tiny_dataset()
  setup = setup_lib.Setup.of(tiny_config(), source)
  state = steps.create_train_state(setup.model, setup.tx, source.image_shape, seed=3)
  evaluate = evaluation.Evaluator(setup.eval_model, source, batch_size=12)
  replicated = jax_utils.replicate(state)
  evaluate.compile(replicated)
  assert jax.local_device_count() == 4 and "all-reduce" not in evaluate.step.as_text()
  summary = evaluate(replicated, "test")
  images, labels = source.test.images, source.test.labels
  logits = setup.eval_model.apply({"params": state.params, "batch_stats": state.batch_stats},
                                  source.preprocess({"images": images, "labels": labels},
                                                    None), train=False)
  assert summary["count"] == 16 == len(labels)
  assert summary["error"] == float(np.mean(np.argmax(logits, -1) != labels))
  assert summary["loss"] == pytest.approx(float(jnp.mean(steps.cross_entropy(logits, labels))),
                                          rel=1e-5)


def test_image_folder_errors_name_the_layout(tmp_path):
  with pytest.raises(FileNotFoundError, match="has no train/ directory"):
    folder_source(tmp_path)
  with pytest.raises(ValueError, match="needs data_dir"):
    folder_source("")
  write_image_folder(tmp_path / "d", with_test=False)
  source = folder_source(tmp_path / "d", validation_size=6)
  assert source.test is None and source.num_train == 30
  assert source.evaluation_splits == {"validation": 6}


def test_tfds_path_on_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=40):
    source = data.build(tiny_config(dataset="cifar10", validation_size=8))
  assert source.train.images.shape == (32, 32, 32, 3) and source.train.images.dtype == np.uint8
  assert len(source.validation) == 8 and source.test is not None
  assert source.num_classes == 10 and source.augment
  run = loop.train_and_evaluate(tiny_config(halt_after_steps=2), str(tmp_path),
                                 source=source)
  assert run.results.steps == 2


def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path):
  dataset = tiny_dataset()
  config = tiny_config(epochs=2, steps_per_call=2, log_every_steps=3)  # 5 steps/epoch
  straight = loop.train_and_evaluate(config, str(tmp_path / "straight"), source=dataset)
  config.halt_after_steps = 4
  first = loop.train_and_evaluate(config, str(tmp_path / "resumed"), source=dataset)
  assert first.results.steps == 4 and not first.results.finished
  config.halt_after_steps = 0
  resumed = loop.train_and_evaluate(config, str(tmp_path / "resumed"), source=dataset)
  assert resumed.results.steps == 10 and resumed.results.finished
  helpers.assert_trees_close(resumed.state, straight.state, rtol=1e-6, atol=1e-6)
  assert resumed.results.best_validation_error == straight.results.best_validation_error


def test_no_results_claim_a_step_whose_checkpoint_failed_to_save(tmp_path, monkeypatch):
  # Orbax saves in the background; a fault in the final save must surface before
  # results.json says the run finished, or the next run would find nothing to do.
  from experiments.training import checkpoints as checkpoints_lib  # pylint: disable=g-import-not-at-top
  def disk_full(self):
    raise OSError(28, "No space left on device", str(self.workdir))
  monkeypatch.setattr(checkpoints_lib.Checkpoints, "wait", disk_full)
  with pytest.raises(OSError, match="No space left on device"):
    loop.train_and_evaluate(tiny_config(epochs=1), str(tmp_path), source=tiny_dataset())
  assert not (tmp_path / "results.json").exists()


def test_bad_configuration_fails_before_training(tmp_path):
  with pytest.raises(ValueError, match="does not split over 4 devices"):
    loop.train_and_evaluate(tiny_config(batch_size=10), str(tmp_path), source=tiny_dataset())
  with pytest.raises(ValueError, match="6n \\+ 2"):
    loop.train_and_evaluate(tiny_config(**{"model.depth": 9}), str(tmp_path),
                             source=tiny_dataset())
  with pytest.raises(ValueError, match="unknown dataset 'mnist'; choose one of .*cifar10"):
    data.build(tiny_config(dataset="mnist"))
