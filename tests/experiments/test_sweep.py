"""Sweeps run their configs in turn, skip finished runs, resume interrupted ones."""
import importlib
import json
import os
import pathlib
import subprocess
import sys

from experiments import sweep
from experiments.lib import loop

ROOT = pathlib.Path(__file__).resolve().parents[2]
OVERRIDES = ["--config.model.depth=8", "--config.epochs=1", "--config.batch_size=128",
             "--config.log_every_steps=5"]


def quick_config(p_last):
  config = importlib.import_module("experiments.configs.quick").get_config()
  config.model.depth, config.epochs, config.batch_size = 8, 1, 128
  config.log_every_steps = 5
  config.survival.p_last = p_last
  return config


def test_the_named_sweeps():
  assert sweep.runs("pair", 0.5) == [
      ("stochastic", ["--config.survival.p_last=0.5"]),
      ("constant", ["--config.survival.p_last=1.0"])]
  grid = sweep.runs("p_last", 0.5)
  assert len(grid) == 19 and grid[0][0] == "linear_decay_p0.1" and grid[-1][0] == "uniform_p0.9"
  assert ("linear_decay_p1.0", ["--config.survival.rule=linear_decay",
                                "--config.survival.p_last=1.0"]) in grid
  assert sweep.config_overrides(["--sweep=pair", "--config.epochs=40", "--root=r"]) == [
      "--config.epochs=40"]


def test_a_pair_sweep_skips_the_finished_run_resumes_the_other_and_reports(tmp_path):
  root = tmp_path / "pair"
  finished = loop.train_and_evaluate(quick_config(1.0), str(root / "constant")).results
  interrupted = quick_config(0.5)
  interrupted.halt_after_steps = 5
  loop.train_and_evaluate(interrupted, str(root / "stochastic"))
  constant_results = (root / "constant" / "results.json").read_text()

  done = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", "--sweep=pair",
       "--config=experiments/configs/quick.py", f"--root={root}", *OVERRIDES],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resumed from step 5" in done.stderr
  assert "already reached step 19: nothing to do" in done.stderr
  assert (root / "constant" / "results.json").read_text() == constant_results
  stochastic = json.loads((root / "stochastic" / "results.json").read_text())
  assert stochastic["finished"] and stochastic["timing"]["train_steps"] == 19
  assert finished["finished"]
  report = (root / "report" / "REPORT.md").read_text()
  assert "stochastic" in report and "constant" in report
