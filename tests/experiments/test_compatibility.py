"""Workdirs written before the results schema had a version still load and resume.

tests/fixtures/v1 was written by the code of commit 0bd6762 (Python 3.11, jax 0.10.2):
`resumable` is `quick.py:tiny --config.eval_every_steps=2
--config.checkpoint_every_steps=1000 --config.halt_after_steps=2` (a checkpoint of
step 2), `finished` a whole two-epoch run of `quick.py:tiny` with batch 64 (its
results.json and metrics.jsonl).
"""
import json
import pathlib
import shutil

import pytest

from experiments import results as results_lib
from experiments.report import runs as runs_lib
from experiments.report import tables
from experiments.training import checkpoints
from experiments.training import loop
from tests.experiments.test_training import tiny_config

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "v1"


def test_a_checkpoint_of_the_old_code_resumes_with_its_record(tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(FIXTURES / "resumable", workdir)
  old = json.loads((workdir / "results.json").read_text())
  assert "version" not in old and old["steps"] == 2
  manager = checkpoints.Checkpoints(workdir)
  saved_meta = manager.read_meta(2)
  manager.close()
  config = tiny_config(dataset="synthetic", eval_every_steps=2,
                       checkpoint_every_steps=1000, halt_after_steps=4)
  run = loop.train_and_evaluate(config, str(workdir))
  results = run.results
  assert results.version == 2 and results.steps == 4 and not results.finished
  assert results.config_changes == []  # the same config and data: nothing refused
  assert results.timing["train_steps"] == 4  # the old segment's 2 steps counted too
  # The record the old checkpoint carried goes on: its best (step 2, or a better 4).
  assert results.best_validation_step in (2, 4)
  if results.best_validation_step == 2:
    assert results.best_validation_error == old["best_validation_error"]
    assert results.test_error_at_best_validation == old["test_error_at_best_validation"]
  steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text(
  ).splitlines()]
  assert steps == [2, 2, 4, 4]  # the old records kept, the new ones after them
  # The old checkpoint is still there, verified by its own checksums.
  manager = checkpoints.Checkpoints(workdir)
  try:
    assert manager.steps() == [2, 4]
    assert manager.read_meta(2)["checksums"] == saved_meta["checksums"]
  finally:
    manager.close()


def test_an_old_results_file_reads_with_the_same_numbers():
  text = (FIXTURES / "finished" / "results.json").read_text()
  old = json.loads(text)
  results = results_lib.parse_results(text)
  assert results.version == 1 and "version" not in old
  for field in ("best_validation_error", "test_error_at_best_validation",
                "final_test_error", "final_validation_error", "steps", "seconds_per_epoch",
                "train_images_per_s", "survival_probs", "parameters", "config"):
    assert getattr(results, field) == old[field], field
  assert results.timing == {**old["timing"], "input_wait_s": 0.0}
  run = runs_lib.load_run(FIXTURES / "finished")
  [row] = tables.table1_rows([run])
  assert row.errors.split == "test"
  assert (row.errors.at_best_validation, row.errors.final) == (
      old["test_error_at_best_validation"], old["final_test_error"])
  assert runs_lib.timing(run).seconds_per_epoch == old["seconds_per_epoch"]


@pytest.mark.parametrize("text, says", [
    ("[1, 2]", "holds no JSON object"), ('{"steps": 3}', "lacks config, finished"),
    ("{garbled", "is no JSON"), ('{"config": {}, "steps": 1, "finished": true, "seed": 1,'
                                  ' "timing": 5}', "its timing is 5")])
def test_a_damaged_results_file_is_refused_in_words(text, says):
  with pytest.raises(ValueError, match=says):
    results_lib.parse_results(text)
