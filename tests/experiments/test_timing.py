"""Timing that is true: train steps, evaluation, checkpoints and compiling apart."""
import json
import time

import pytest

from experiments.training import evaluation
from experiments.training import loop
from experiments.training import stopwatch
from tests.experiments.test_training import tiny_config, tiny_dataset


def test_a_slow_evaluation_does_not_count_as_training_time(tmp_path, monkeypatch):
  calls, skew = [], [0.0]
  real_evaluate = evaluation.Evaluator.__call__

  def slow_evaluate(*args, **kwargs):  # each evaluation takes 100 s more on the clock
    calls.append(1)
    skew[0] += 100.0
    return real_evaluate(*args, **kwargs)

  monkeypatch.setattr(evaluation.Evaluator, "__call__", slow_evaluate)
  config = tiny_config(epochs=3, log_every_steps=2)  # 5 steps/epoch
  run = loop.train_and_evaluate(config, str(tmp_path), source=tiny_dataset(),
                                clock=lambda: time.perf_counter() + skew[0])
  timing = run.results.timing
  # Validation + test after each of 3 epochs; the final errors are the last evaluation's.
  assert len(calls) == 6
  assert run.results.final_test_error == json.loads(
      (tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["test/error"]
  assert timing["evaluate_s"] >= 100.0 * len(calls)
  assert timing["train_s"] < 100.0  # 15 tiny steps: none of the evaluations' time
  assert timing["train_steps"] == 15
  assert (timing["train_s"] + timing["evaluate_s"] + timing["checkpoint_s"]
          + timing["compile_s"] <= timing["wall_s"])
  assert run.results.train_images_per_s == pytest.approx(
      15 * config.batch_size / timing["train_s"])
  assert run.results.seconds_per_epoch == pytest.approx(timing["train_s"] / 3)
  # The progress windows partition the train time: none holds evaluation time, none
  # counts steps it did not time.
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  windows = [r for r in records if "train/loss" in r]
  assert sum(r["train/steps"] for r in windows) == 15
  assert sum(r["train/seconds"] for r in windows) == pytest.approx(timing["train_s"],
                                                                  rel=1e-9)
  for r in windows:
    assert r["train/images_per_s"] == pytest.approx(
        r["train/steps"] * config.batch_size / r["train/seconds"])
  # Windows never straddle an epoch, so per-epoch means can be formed from them.
  assert [r["step"] for r in windows] == [2, 4, 5, 6, 8, 10, 12, 14, 15]
  # Block 1 (p_1 = 5/6 here) is dropped in some steps: its gradient is 0 there.
  grads = [r["train/first_block_grad_abs"] for r in windows]
  assert min(grads) >= 0 and max(grads) > 0
  # TensorBoard holds the same scalars, the gradient magnitude and timing included.
  assert tensorboard_scalars(tmp_path / "tensorboard") == {
      name: [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in records if name in r]
      for name in {k for r in records for k in r} - {"step", "time"}}
  assert {"train/first_block_grad_abs", "timing/train_s", "timing/evaluate_s",
          "validation/error", "test/error"} <= {k for r in records for k in r}


def tensorboard_scalars(logdir) -> dict:
  """{tag: [(step, value), ...]} of every scalar in the event files under `logdir`."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  scalars = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    for record in tf.data.TFRecordDataset(str(path)):
      event = event_pb2.Event.FromString(record.numpy())
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_stopwatch_books_time_between_events_as_training_only():
  now = [0.0]
  watch = stopwatch.Stopwatch(10, totals={"train_s": 5.0, "train_steps": 10, "wall_s": 7.0},
                              clock=lambda: now[0])
  now[0] = 2.0
  watch.end_train(14)                 # 2 s of train steps (4 of them) since the start
  with watch.measure("evaluate"):
    now[0] = 12.0                     # a 10 s evaluation
  now[0] = 12.5
  with watch.waiting_for_input():
    now[0] = 12.75                    # waiting 0.25 s for a batch is train time too
  now[0] = 13.0
  watch.end_train(15)                 # 1 s more of training, after the evaluation
  assert watch.take_window() == stopwatch.Window(3.0, 5, 0.25)
  assert watch.take_window() == stopwatch.Window()
  assert watch.snapshot() == {"train_s": 8.0, "train_steps": 15, "input_wait_s": 0.25,
                              "evaluate_s": 10.0, "checkpoint_s": 0.0, "compile_s": 0.0,
                              "wall_s": 20.0}
  assert watch.rates(batch_size=2, steps_per_epoch=5) == (30 / 8.0, 8.0 / 15 * 5)
