"""Sweeps run their configs in turn, skip finished runs, resume interrupted ones."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from experiments.configs import quick
from experiments.sweep import sweeps
from experiments.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[2]
OVERRIDES = ["--config.model.depth=8", "--config.epochs=1", "--config.batch_size=128",
             "--config.log_every_steps=5"]


def quick_config(p_last):
  config = quick.get_config()
  config.model.depth, config.epochs, config.batch_size = 8, 1, 128
  config.log_every_steps = 5
  config.survival.p_last = p_last
  return config


def test_the_named_sweeps():
  assert sweeps.sweep_configs("pair", 0.5) == [
      ("stochastic", ["--config.survival.p_last=0.5"]),
      ("constant", ["--config.survival.p_last=1.0"])]
  grid = sweeps.sweep_configs("p_last", 0.5)
  assert len(grid) == 19 and grid[0][0] == "linear_decay_p0.1" and grid[-1][0] == "uniform_p0.9"
  assert ("linear_decay_p1.0", ["--config.survival.rule=linear_decay",
                                "--config.survival.p_last=1.0"]) in grid
  assert sweeps.config_overrides(["--sweep=pair", "--config.epochs=40", "--root=r"]) == [
      "--config.epochs=40"]


@pytest.mark.e2e
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
  assert finished.finished
  report = (root / "report" / "REPORT.md").read_text()
  assert "stochastic" in report and "constant" in report


def sweep_command(root, *extra):
  return [sys.executable, "-m", "experiments.sweep", "--sweep=pair",
          "--config=experiments/configs/quick.py", f"--root={root}", *OVERRIDES, *extra]


@pytest.mark.e2e
def test_ctrl_c_reaches_the_running_config_once_and_the_sweep_exits_75(tmp_path):
  # Ctrl-C signals the terminal's whole foreground process group: the sweep and its run.
  root = tmp_path / "pair"
  env = {**os.environ, "XLA_FLAGS": ""}
  sweep = subprocess.Popen(sweep_command(root, "--config.epochs=3"), cwd=ROOT, env=env,
                           start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 300
  while not (root / "stochastic" / "config.json").exists():
    assert sweep.poll() is None and time.monotonic() < deadline
    time.sleep(0.2)
  time.sleep(3)
  os.killpg(sweep.pid, signal.SIGINT)
  _, stderr = sweep.communicate(timeout=300)
  assert sweep.returncode == 75, stderr[-3000:]
  assert "passed on to the running config" in stderr
  assert os.listdir(root / "stochastic" / "checkpoints")  # it saved before exiting
  assert not (root / "constant").exists()  # the next config never started
  with pytest.raises(ProcessLookupError):
    os.killpg(sweep.pid, 0)  # nothing of the sweep's group is left running

  done = subprocess.run(sweep_command(root, "--config.epochs=3"), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resumed from step" in done.stderr
  assert json.loads((root / "constant" / "results.json").read_text())["finished"]


@pytest.mark.e2e
def test_a_config_that_cannot_work_stops_the_sweep_before_any_run(tmp_path):
  done = subprocess.run(sweep_command(tmp_path / "pair", "--config.survival.rule=steep"),
                        cwd=ROOT, env={**os.environ, "XLA_FLAGS": ""}, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 2, done.stderr[-3000:]
  assert done.stderr.strip().splitlines()[-1] == (
      "error: the sweep's run 'stochastic': model: unknown survival rule 'steep'; choose "
      "one of ('linear_decay', 'uniform').")
  assert not (tmp_path / "pair").exists()  # nothing started


@pytest.mark.e2e
def test_a_failed_config_makes_the_sweep_exit_1_and_names_it(tmp_path):
  # Valid settings whose data is missing: each run fails when it starts, not the sweep.
  missing = tmp_path / "no_such_images"
  done = subprocess.run(sweep_command(tmp_path / "pair", "--config.dataset=folder",
                                      f"--config.data_dir={missing}"),
                        cwd=ROOT, env={**os.environ, "XLA_FLAGS": ""}, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 1, done.stderr[-3000:]
  assert "failed runs (no report: none of them logged): stochastic (exit 2), " \
         "constant (exit 2)" in done.stderr
  assert not (tmp_path / "pair" / "report").exists()


def test_the_report_lists_a_failed_config_with_its_exit_status(tmp_path, monkeypatch):
  """One run finishes, one diverges (it logged), one fails before logging (a p_last
  sweep cut to three): the sweep exits 1 and the report shows the two that logged and
  lists both failures with their exit statuses."""
  from experiments.report import document
  from tests.experiments.test_report import make_run
  outcomes = {"linear_decay_p0.1": 0, "linear_decay_p0.2": 3, "linear_decay_p0.3": 2}
  every_run = sweeps.sweep_configs
  monkeypatch.setattr(sweeps, "sweep_configs",
                      lambda sweep, p_last: every_run(sweep, p_last)[:3])

  def fake_run(self, command):
    del self
    workdir = pathlib.Path(next(a.split("=", 1)[1] for a in command
                                if a.startswith("--workdir=")))
    code = outcomes[workdir.name]
    if code != 2:
      make_run(workdir.parent, workdir.name, finished=code == 0)
    return code

  def report_in_process(command, check):
    del check
    dirs = [a for a in command[3:] if not a.startswith("--")]
    out = next(a.split("=", 1)[1] for a in command if a.startswith("--out="))
    failed = [a.split("=", 1)[1] for a in command if a.startswith("--failed=")]
    return type("Done", (), {"returncode": document.report(dirs, out, failed)})()

  monkeypatch.setattr(sweeps.ChildProcess, "run", fake_run)
  monkeypatch.setattr(sweeps.subprocess, "run", report_in_process)
  assert sweeps.run_sweep("p_last", "quick.py", str(tmp_path), 0.5, []) == 1
  report = (tmp_path / "report" / "REPORT.md").read_text()
  runs_table = report.split("## Failed runs")[0]
  assert "linear_decay_p0.1" in runs_table and "linear_decay_p0.3" not in runs_table
  # Each run once, with one status: the one that logged, then failed, says both.
  [row] = [line for line in runs_table.splitlines() if "| linear_decay_p0.2 |" in line]
  assert "unfinished (epoch 10.0 of 10); failed (exit 3)" in row
  failed_table = report.split("## Failed runs")[1].split("##")[0]
  assert "linear_decay_p0.2" not in failed_table
  assert "| linear_decay_p0.3 | 2 |" in failed_table


@pytest.mark.e2e
def test_a_killed_sweep_leaves_no_run_behind_and_its_rerun_waits_for_a_live_one(tmp_path):
  """SIGKILL to the sweep alone: its running config sees it gone, checkpoints and exits
  within seconds. Started again while another process holds a config's workdir, the
  sweep waits for it, naming it, instead of counting that config failed; then it resumes
  the stopped run, runs the rest and reports each run once, with one status."""
  root = tmp_path / "pair"
  env = {**os.environ, "XLA_FLAGS": ""}
  sweep = subprocess.Popen(sweep_command(root, "--config.epochs=3"), cwd=ROOT, env=env,
                           start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  while not (root / "stochastic" / "metrics.jsonl").exists():  # training under way
    assert sweep.poll() is None and time.monotonic() < deadline
    time.sleep(0.2)
  child = int((root / "stochastic" / "lock").read_text().split()[1])
  sweep.kill()
  sweep.wait(30)
  gone_by = time.monotonic() + 30
  while process_alive(child):
    assert time.monotonic() < gone_by, "the sweep's run outlived it"
    time.sleep(0.2)
  assert os.listdir(root / "stochastic" / "checkpoints")  # it stopped with a checkpoint
  holder = subprocess.Popen(
      [sys.executable, "-c", "import time; from experiments.runtime import workdir as w; "
       f"lock = w.Lock(w.resolve({str(root / 'constant')!r})); lock.acquire(); "
       "print('held', flush=True); time.sleep(600)"], cwd=ROOT, stdout=subprocess.PIPE,
      text=True)
  assert holder.stdout.readline().strip() == "held"
  rerun = subprocess.Popen(sweep_command(root, "--config.epochs=3"), cwd=ROOT, env=env,
                           stderr=subprocess.PIPE, text=True)
  try:
    log = []
    for line in rerun.stderr:
      log.append(line)
      if f"[constant] {root / 'constant'} is in use by pid {holder.pid} " in line:
        time.sleep(2)  # it waits...
        assert rerun.poll() is None
        holder.kill()  # ... until the holder is gone
        break
    log.append(rerun.stderr.read())
    assert rerun.wait(600) == 0, "".join(log)[-3000:]
  finally:
    holder.kill()
    rerun.kill()
  log = "".join(log)
  assert "is in use by" in log and "resumed from step" in log and "failed" not in log
  report = (root / "report" / "REPORT.md").read_text()
  assert "## Failed runs" not in report
  runs_table = report.split("## Runs")[1].split("##")[0]
  assert runs_table.count("| stochastic |") == 1 and runs_table.count("| constant |") == 1


def process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True
