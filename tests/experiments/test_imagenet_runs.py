"""ImageNet runs of the command line on a generated JPEG tree (CMYK, greyscale and
PNG-named-.JPEG files among them): the README's quick commands train end to end with
worker processes decoding, a run killed after a checkpoint resumes bit-identically, and
two processes train what one does."""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks import imagenet_like
from tests.experiments.test_faults import comparable
from tests.experiments.test_faults import read_metrics
from tests.experiments.test_multiprocess import final_checkpoint
from tests.experiments.test_multiprocess import flat
from tests.experiments.test_multiprocess import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def readme_command(program: str) -> list[str]:
  """The arguments of the README's first `python -m PROGRAM` command (lines joined)."""
  text = re.sub(r"\s*\\\n\s*", " ", README)
  return text.split(f"python -m {program} ", 1)[1].split("\n", 1)[0].split()


# The README's quick run: its tree (4 classes x 16 training images) at batch 32 is 2 steps
# an epoch, 2 epochs; a checkpoint at every epoch.
TREE_ARGS = readme_command("benchmarks.imagenet_like")
TRAIN_ARGS = [a for a in readme_command("experiments.imagenet")
              if not a.startswith(("--workdir=", "--config.data_dir="))]
TOTAL_STEPS = 4


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet") / "tree"
  args = [a if not a.startswith("--root=") else f"--root={root}" for a in TREE_ARGS]
  subprocess.run([sys.executable, "-m", "benchmarks.imagenet_like", *args], cwd=ROOT,
                 check=True, capture_output=True, timeout=300)
  return root


def command(tree, workdir, *extra):
  return [sys.executable, "-m", "experiments.imagenet", *TRAIN_ARGS,
          f"--config.data_dir={tree}", f"--workdir={workdir}", *extra]


def test_the_readme_shows_the_quick_commands_these_tests_run():
  assert TREE_ARGS[0].startswith("--root=") and "--classes=4" in TREE_ARGS
  assert TRAIN_ARGS == ["--config=experiments/configs/imagenet.py:quick"]


def env(devices=1):
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


@pytest.fixture(scope="module")
def straight(tree, tmp_path_factory):
  """The README's quick command (decoding in two worker processes), uninterrupted."""
  workdir = tmp_path_factory.mktemp("straight") / "run"
  done = subprocess.run(command(tree, workdir, "--config.input_workers=2"), cwd=ROOT,
                        env=env(), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir, done.stderr


@pytest.mark.e2e
def test_the_quick_imagenet_config_trains_end_to_end(straight):
  workdir, log = straight
  results = json.loads((workdir / "results.json").read_text())
  assert results["finished"] and results["steps"] == TOTAL_STEPS
  assert results["best_validation_top5_error"] == 0.0  # 4 classes
  assert 0 <= results["best_validation_error"] <= 1 and results["train_images_per_s"] > 0
  assert results["final_test_error"] is None and "no test split" in results["dataset"]
  assert "Traceback" not in log and "leaked" not in log
  assert "input wait" in log


def checksums(workdir):
  return final_checkpoint(workdir)[2]["checksums"]


@pytest.mark.e2e
def test_a_run_killed_after_a_checkpoint_resumes_bit_identically(tree, straight, tmp_path):
  workdir = tmp_path / "run"
  with open(tmp_path / "killed.log", "w") as log:
    process = subprocess.Popen(command(tree, workdir, "--config.input_workers=1"),
                               cwd=ROOT, env=env(), stderr=log)
  try:
    deadline = time.monotonic() + 300
    while not (workdir / "checkpoints" / "2").is_dir():  # orbax finalised it
      assert process.poll() is None and time.monotonic() < deadline
      time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(60)
  finally:
    process.kill()
  assert process.returncode == -signal.SIGKILL
  assert not (workdir / "results.json").exists()
  resumed = subprocess.run(command(tree, workdir, "--config.input_workers=0"), cwd=ROOT,
                           env=env(), capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 2" in resumed.stderr  # the killed run's checkpoint
  assert checksums(workdir) == checksums(straight[0])  # whatever the worker count
  a, b = (json.loads((d / "results.json").read_text()) for d in (workdir, straight[0]))
  assert a["best_validation_error"] == b["best_validation_error"]
  assert a["timing"]["train_steps"] == TOTAL_STEPS
  ours, theirs = (comparable(read_metrics(d)) for d in (workdir, straight[0]))
  assert [r["step"] for r in ours] == [r["step"] for r in theirs]  # none lost or doubled
  for mine, straight_record in zip(ours, theirs):
    assert mine == pytest.approx(straight_record, rel=1e-6, abs=1e-7), mine["step"]


@pytest.mark.e2e
def test_two_processes_train_what_one_process_trains(tree, tmp_path):
  """After two steps: the same arrays up to 1e-4 of the largest move, what the rounding
  of cross-device sums allows (test_multiprocess), 1 process of 2 devices against 2
  processes of 1 device each, every process decoding its own rows."""
  halt = "--config.halt_after_steps=2"
  one = tmp_path / "one"
  done = subprocess.run(command(tree, one, halt), cwd=ROOT, env=env(2),
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  two, port = tmp_path / "two", free_port()
  processes = [subprocess.Popen(
      command(tree, two, halt, f"--coordinator_address=127.0.0.1:{port}",
              "--num_processes=2", f"--process_id={i}"), cwd=ROOT, env=env(1),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
  deadline = time.monotonic() + 600
  logs = [p.communicate(timeout=max(1, deadline - time.monotonic()))[1] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  states = [flat({k: final_checkpoint(w)[1][k] for k in ("params", "batch_stats")})
            for w in (two, one)]
  initial = flat(initial_variables())
  largest_move = max(np.abs(states[1][name] - initial[name]).max() for name in initial)
  assert largest_move > 1e-3  # the steps trained
  for name in states[1]:
    np.testing.assert_allclose(states[0][name], states[1][name], rtol=0,
                               atol=1e-4 * largest_move, err_msg=name)


def initial_variables() -> dict:
  """The params and batch_stats the README's quick run starts from (its seed, its model)."""
  # pylint: disable=import-outside-toplevel
  import jax
  from experiments.configs import imagenet as imagenet_configs
  from experiments.training import recipe
  from experiments.training import steps
  config = imagenet_configs.get_config("quick")
  model = recipe.build_model(config, 4)
  tx = recipe.make_optimizer(config, recipe.learning_rate_schedule(config, 4))
  state = jax.device_get(steps.create_train_state(model, tx, (64, 64, 3), config.seed))
  return {"params": state.params, "batch_stats": state.batch_stats}
