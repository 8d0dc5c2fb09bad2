"""Faults injected into real runs, and what survives them (issue: reliability)."""
import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.data import in_memory
from experiments.runtime import errors
from experiments.runtime import session
from experiments.runtime import workdir as workdir_lib
from experiments.training import checkpoints as checkpoint_lib
from experiments.training import loop
from tests.experiments.test_training import folder_source
from tests.experiments.test_training import tiny_config
from tests.experiments.test_training import tiny_dataset
from tests.experiments.test_training import write_image_folder

ROOT = pathlib.Path(__file__).resolve().parents[2]
# 40 train examples at batch 8 = 5 steps/epoch.
DATASET = tiny_dataset()


def latest_meta(workdir):
  manager = checkpoint_lib.Checkpoints(workdir_lib.resolve(workdir))
  try:
    step = manager.steps()[-1]
    return step, manager.read_meta(step)
  finally:
    manager.close()


def all_finite(workdir, name):
  manager = checkpoint_lib.Checkpoints(workdir_lib.resolve(workdir))
  try:
    mgr = manager.best if name == "best" else manager.latest
    for step in mgr.all_steps():
      state = mgr.restore(step)["state"]
      assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(state)), (name, step)
    return sorted(mgr.all_steps())
  finally:
    manager.close()


# --------------------------------------------------------------------- divergence


def test_divergence_stops_the_run_and_saves_nothing_non_finite(tmp_path):
  config = tiny_config(epochs=4, learning_rate=1e6, checkpoint_every_steps=1)
  with pytest.raises(errors.Diverged, match="not finite at step") as raised:
    loop.train_and_evaluate(config, str(tmp_path), source=DATASET)
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["diverged"] and not results["finished"] and results["version"] == 2
  assert results["diverged_at_step"] == raised.value.step >= 1
  # Every checkpoint and best/ holds a finite state from before the bad step.
  assert all_finite(tmp_path, "latest")[-1] < raised.value.step
  assert all(s < raised.value.step for s in all_finite(tmp_path, "best"))


# ------------------------------------------------------------------ config changes


def test_a_restart_with_other_training_settings_is_refused_naming_the_fields(tmp_path):
  config = tiny_config(epochs=2, halt_after_steps=3)
  loop.train_and_evaluate(config, str(tmp_path), source=DATASET)
  changed = tiny_config(epochs=2, learning_rate=0.05, **{"survival.p_last": 1.0})
  with pytest.raises(errors.UserError,
                     match=r"learning_rate: 0.1 -> 0.05; survival.p_last: 0.5 -> 1.0.*"
                           r"--allow_config_change"):
    loop.train_and_evaluate(changed, str(tmp_path), source=DATASET)
  # Settings that do not change the model may differ; an explicit flag allows the rest.
  loop.train_and_evaluate(tiny_config(epochs=2, halt_after_steps=4, log_every_steps=1,
                                      eval_batch_size=8), str(tmp_path), source=DATASET)
  run = loop.train_and_evaluate(changed, str(tmp_path), source=DATASET,
                                allow_config_change=True)
  assert run.results.finished
  assert run.results.config_changes == [
      {"step": 4, "field": "learning_rate", "from": 0.1, "to": 0.05},
      {"step": 4, "field": "survival.p_last", "from": 0.5, "to": 1.0}]
  assert run.results.config["learning_rate"] == 0.05


def test_a_restart_on_other_data_is_refused_naming_what_differs(tmp_path):
  config = tiny_config(epochs=2, halt_after_steps=3)
  loop.train_and_evaluate(config, str(tmp_path), source=DATASET)
  permuted = in_memory.Split(DATASET.train.images, (DATASET.train.labels + 1) % 10)
  relabelled = dataclasses.replace(DATASET, train=permuted)  # same files, other labels
  with pytest.raises(errors.UserError, match=r"data.fingerprint: '[0-9a-f]+' -> '[0-9a-f]+'"):
    loop.train_and_evaluate(config, str(tmp_path), source=relabelled)
  n = len(DATASET.train)
  fewer = dataclasses.replace(DATASET, train=in_memory.take(DATASET.train, np.arange(n - 8)))
  with pytest.raises(errors.UserError,
                     match=rf"data.examples: .*'train': {n}.* -> .*'train': {n - 8}"):
    loop.train_and_evaluate(config, str(tmp_path), source=fewer)
  config.halt_after_steps = 0  # the same data resumes
  assert loop.train_and_evaluate(config, str(tmp_path), source=DATASET).results.finished


# ------------------------------------------------------------------- one run per dir


@pytest.mark.e2e
def test_a_live_workdir_is_refused_naming_the_holder_and_freed_when_it_dies(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from experiments.runtime import workdir as w; "
       f"lock = w.Lock(w.resolve({str(tmp_path)!r})); lock.acquire(); print('held', flush=True); "
       "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(errors.WorkdirBusy, match=f"in use by pid {holder.pid} on "):
      train_in_session(tiny_config(halt_after_steps=1), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
  finally:
    holder.kill()  # dies without releasing anything by hand
    holder.wait(30)
  assert train_in_session(tiny_config(halt_after_steps=1), tmp_path).results.steps == 1


def train_in_session(config, workdir, source=DATASET):
  """A run in the shell the command line puts around it: the workdir lock, signals."""
  path = workdir_lib.resolve(workdir)
  with session.run_session(path) as stop_requested:
    return loop.train_and_evaluate(config, path, source, stop=stop_requested)


def test_removing_or_damaging_the_lock_file_never_lets_a_second_run_in(tmp_path):
  workdir = workdir_lib.resolve(tmp_path)
  first = workdir_lib.Lock(workdir)
  first.acquire()
  assert (tmp_path / "lock").read_text().startswith(f"pid {os.getpid()} on ")
  (tmp_path / "lock").unlink()
  with pytest.raises(errors.WorkdirBusy, match="in use by another process"):
    workdir_lib.Lock(workdir).acquire()
  (tmp_path / "lock").write_bytes(b"\xff\xfe garbage")
  with pytest.raises(errors.WorkdirBusy):
    workdir_lib.Lock(workdir).acquire()
  first.release()
  second = workdir_lib.Lock(workdir)
  second.acquire()  # free once released
  second.release()


# ------------------------------------------------------------- damaged checkpoints


def largest_file(directory: pathlib.Path) -> pathlib.Path:
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path, damage):
  config = tiny_config(epochs=2, checkpoint_every_steps=2)
  straight = loop.train_and_evaluate(config, str(tmp_path / "straight"), source=DATASET)
  config.halt_after_steps = 6
  loop.train_and_evaluate(config, str(tmp_path / "run"), source=DATASET)
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["4", "6"]
  target = largest_file(tmp_path / "run" / "checkpoints" / "6" / "state")
  data = bytearray(target.read_bytes())
  if damage == "truncate":
    target.write_bytes(bytes(data[:len(data) // 2]))
  else:
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64 * [0x5A])
    target.write_bytes(bytes(data))
  config.halt_after_steps = 0
  resumed = loop.train_and_evaluate(config, str(tmp_path / "run"), source=DATASET)
  assert (tmp_path / "run" / "damaged" / "checkpoint-6").is_dir()
  assert resumed.results.finished
  np.testing.assert_array_equal(np.asarray(resumed.state.params["head"]["kernel"]),
                                np.asarray(straight.state.params["head"]["kernel"]))
  assert latest_meta(tmp_path / "run")[1]["checksums"] == latest_meta(
      tmp_path / "straight")[1]["checksums"]


def test_a_checkpoint_the_filesystem_fails_to_read_is_kept_and_used_once_it_reads(
    tmp_path, monkeypatch):
  """A fault of the disk is not damage: the run stops naming it, nothing is set aside."""
  config = tiny_config(epochs=2, checkpoint_every_steps=2, halt_after_steps=4)
  loop.train_and_evaluate(config, str(tmp_path / "run"), source=DATASET)
  config.halt_after_steps = 0
  faults = [
      ("read_meta", OSError(13, "Permission denied", "meta")),  # EACCES
      ("restore", ValueError("Error reading local file \"d/0\": Failed reading "
                             "\"d/0\" [os_error_code='5']")),  # EIO, as tensorstore says it
  ]
  for method, fault in faults:
    def fail(*args, fault=fault, **kwargs):
      raise fault
    with monkeypatch.context() as patch:
      patch.setattr(checkpoint_lib.Checkpoints, method, fail)
      with pytest.raises(type(fault)) as raised:
        loop.train_and_evaluate(config, str(tmp_path / "run"), source=DATASET)
    assert errors.filesystem_error(raised.value).errno in (13, 5)
    assert not (tmp_path / "run" / "damaged").exists()
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "4"]
  resumed = loop.train_and_evaluate(config, str(tmp_path / "run"), source=DATASET)
  assert resumed.results.finished and resumed.results.timing["train_steps"] == 10


def test_checksums_name_the_array_that_changed():
  state = {"a": np.arange(4.0), "b": {"c": np.ones(3, np.float32)}}
  sums = checkpoint_lib.checksums(state)
  state["b"]["c"][1] = 1.0000001
  assert checkpoint_lib.damaged_arrays(state, sums) == ["['b']['c']"]


# ------------------------------------------------------- checks before training


def test_problems_are_found_before_training(tmp_path):
  def fails(match, config=None):
    with pytest.raises(errors.UserError, match=match):
      loop.train_and_evaluate(config or tiny_config(), str(tmp_path / "w"), source=DATASET)
    assert not (tmp_path / "w" / "checkpoints").exists()  # nothing was trained

  fails("eval_batch_size must be a positive integer", tiny_config(eval_batch_size=0))
  fails("batch_size must be a positive integer", tiny_config(batch_size=0))
  fails("does not split over 4 devices", tiny_config(eval_batch_size=6))
  small_test = in_memory.Split(DATASET.test.images[:, :4, :4], DATASET.test.labels)
  with pytest.raises(errors.UserError,
                     match=r"test images are \(4, 4, 3\), training images \(8, 8, 3\)"):
    dataclasses.replace(DATASET, test=small_test)  # refused as it is made
  bad_labels = in_memory.Split(DATASET.test.images, DATASET.test.labels + 10)
  with pytest.raises(errors.UserError, match="outside the 10 classes"):
    dataclasses.replace(DATASET, test=bad_labels)
  fails("model: CIFAR ResNet depth must be 6n \\+ 2", tiny_config(**{"model.depth": 9}))
  fails(r"learning_rate must be a finite number in \(0, inf\), got nan",
        tiny_config(learning_rate=float("nan")))
  fails(r"learning_rate must be a finite number in \(0, inf\), got -0.1",
        tiny_config(learning_rate=-0.1))
  fails(r"momentum must be a finite number in \[0, 1\], got 5", tiny_config(momentum=5.0))
  fails(r"warmup_epochs must be a finite number in \[0, 1\]", tiny_config(warmup_epochs=2.0))


def test_image_folder_surprises_are_named(tmp_path):
  write_image_folder(tmp_path / "empty_class")
  (tmp_path / "empty_class" / "train" / "fox").mkdir()
  with pytest.raises(errors.UserError, match="class folder .*fox holds no .jpg/.png images"):
    folder_source(tmp_path / "empty_class", validation_size=4)
  write_image_folder(tmp_path / "typo")
  (tmp_path / "typo" / "test" / "dog").rename(tmp_path / "typo" / "test" / "dgo")
  with pytest.raises(errors.UserError, match=r"has class folders that .* lacks: \['dgo'\]"):
    folder_source(tmp_path / "typo", validation_size=4)
  write_image_folder(tmp_path / "sizes")
  odd = tmp_path / "sizes" / "train" / "emu" / "3.png"
  from PIL import Image  # pylint: disable=import-outside-toplevel
  Image.new("RGB", (9, 9)).save(odd)
  with pytest.raises(errors.UserError, match=f"{odd} is \\(9, 9\\)"):
    folder_source(tmp_path / "sizes", validation_size=4)
  odd.write_bytes(b"not an image")
  with pytest.raises(errors.UserError, match=f"cannot read image {odd}"):
    folder_source(tmp_path / "sizes", validation_size=4)


# ------------------------------------------------------------ records after resume


def test_timings_add_up_over_segments_and_a_finished_run_is_left_as_it_was(tmp_path):
  config = tiny_config(epochs=2, halt_after_steps=3)
  first = loop.train_and_evaluate(config, str(tmp_path), source=DATASET)
  config.halt_after_steps = 0
  run = loop.train_and_evaluate(config, str(tmp_path), source=DATASET)
  timing = run.results.timing
  assert timing["train_steps"] == 10  # both segments' steps, each counted once
  assert timing["compile_s"] > first.results.timing["compile_s"] > 0
  assert timing["wall_s"] > first.results.timing["wall_s"]
  saved = (tmp_path / "results.json").read_text()
  again = loop.train_and_evaluate(config, str(tmp_path), source=DATASET)
  assert (tmp_path / "results.json").read_text() == saved
  assert again.results.to_json() == json.loads(saved)


def test_a_truncated_metrics_file_does_not_block_the_restart(tmp_path):
  config = tiny_config(epochs=2, halt_after_steps=4)
  loop.train_and_evaluate(config, str(tmp_path), source=DATASET)
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text(metrics.read_text()[:-25])  # the last line cut short
  config.halt_after_steps = 0
  done = loop.train_and_evaluate(config, str(tmp_path), source=DATASET).results
  records = [json.loads(line) for line in metrics.read_text().splitlines()]  # all valid
  assert max(r["step"] for r in records) == done.steps and done.finished
  assert any(r["step"] <= 4 for r in records)  # the readable records before the cut stay


@pytest.mark.parametrize("damage", ["removed", "garbled"])
def test_a_finished_run_whose_results_were_lost_writes_them_again(tmp_path, damage):
  # A stop between the last checkpoint and results.json (SIGKILL, a full disk) leaves a
  # workdir whose checkpoint is its final step: the restart writes what the run would have.
  config = tiny_config(epochs=2)
  done = loop.train_and_evaluate(config, str(tmp_path), source=DATASET).results.to_json()
  results = tmp_path / "results.json"
  if damage == "removed":
    results.unlink()
  else:
    results.write_text(results.read_text()[:40])
  again = loop.train_and_evaluate(config, str(tmp_path), source=DATASET).results.to_json()
  assert json.loads(results.read_text()) == again
  for key in ("steps", "finished", "best_validation_error", "best_validation_step",
              "test_error_at_best_validation", "final_validation_error", "final_test_error",
              "parameters", "survival_probs", "dataset", "config"):
    assert again[key] == done[key], key
  assert again["timing"]["train_steps"] == done["timing"]["train_steps"]


# ---------------------------------------------------------------- the command line


def cli(workdir, *extra, env=None):
  return [sys.executable, "-m", "experiments.cifar", "--config=experiments/configs/quick.py",
          f"--workdir={workdir}", "--config.model.depth=8", "--config.batch_size=64",
          "--config.epochs=2", "--config.log_every_steps=5",
          *extra]


CLI_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


@pytest.mark.e2e
def test_cli_user_errors_are_one_line_and_divergence_exits_3(tmp_path):
  bad = subprocess.run(cli(tmp_path / "a", "--config.batch_size=0"), cwd=ROOT, env=CLI_ENV,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == (
      "error: batch_size must be a positive integer, got 0.")
  assert "Traceback" not in bad.stderr
  diverged = subprocess.run(cli(tmp_path / "b", "--config.learning_rate=1e6"), cwd=ROOT,
                            env=CLI_ENV, capture_output=True, text=True, timeout=300)
  assert diverged.returncode == 3, diverged.stderr[-2000:]
  assert "diverged: training diverged: the loss or a gradient is not finite at step" in (
      diverged.stderr)
  assert "Traceback" not in diverged.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("flag, says", [
    ("--config.foo=1", "foo"), ("--config=experiments/configs/nope.py", "nope.py"),
    ("--config.epochs=many", "epochs"),
    ("--config.epochs=0.5", "--config.epochs takes a whole number, got 0.5: the schedule "
     "is in whole epochs; to stop sooner, add --config.halt_after_steps=N"), ("--config=experiments/configs/paper.py:mnist",
                                         "unknown paper run 'mnist'")])
def test_a_bad_flag_or_config_is_one_error_line(tmp_path, flag, says):
  done = subprocess.run(cli(tmp_path / "w", flag), cwd=ROOT, env=CLI_ENV,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stderr[-2000:]
  line = done.stderr.strip().splitlines()[-1]
  assert line.startswith("error: ") and says in line, done.stderr[-2000:]
  assert "Traceback" not in done.stderr
  assert not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The workdir of `cli`'s run without faults, to compare the faulted runs with."""
  workdir = tmp_path_factory.mktemp("straight") / "run"
  done = subprocess.run(cli(workdir), cwd=ROOT, env=CLI_ENV, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  return workdir


@pytest.mark.e2e
def test_sigterm_checkpoints_exits_75_and_the_restart_is_bit_identical(tmp_path, straight):
  process = subprocess.Popen(cli(tmp_path / "run"), cwd=ROOT, env=CLI_ENV,
                             stderr=subprocess.PIPE, text=True)
  try:
    for line in process.stderr:
      if "step 10/" in line:  # training is under way
        process.send_signal(signal.SIGTERM)
        break
    rest = process.stderr.read()
    assert process.wait(120) == 75, rest[-2000:]
  finally:
    process.kill()
  assert "SIGTERM received: saving a checkpoint" in rest
  stopped_at, _ = latest_meta(tmp_path / "run")
  assert 10 <= stopped_at < 78  # 39 steps per epoch
  assert f"stopped: stopped by request at step {stopped_at}" in rest
  assert not (tmp_path / "run" / "results.json").exists()
  resumed = subprocess.run(cli(tmp_path / "run"), cwd=ROOT, env=CLI_ENV,
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resumed from step {stopped_at}" in resumed.stderr
  # The console holds this project's lines only (orbax's INFO chatter is hidden), and
  # the summary prints errors as percentages.
  sources = {re.search(r" ([\w.]+\.py):\d+\]", line).group(1)
             for line in resumed.stderr.splitlines() if re.match(r"I\d{4} ", line)}
  ours = {path.name for path in (ROOT / "experiments").rglob("*.py")}
  assert {"training_command.py", "loop.py"} <= sources <= ours, sources
  assert re.search(r"best validation error \d+\.\d\d% at step \d+; test error there "
                   r"\d+\.\d\d%", resumed.stderr)
  assert_ends_as(tmp_path / "run", straight)


def signal_when(workdir, line_says, signum=signal.SIGTERM):
  """Runs `cli(workdir)`, sends `signum` as soon as a stderr line contains `line_says`,
  and returns (exit status, the rest of stderr)."""
  process = subprocess.Popen(cli(workdir), cwd=ROOT, env=CLI_ENV, stderr=subprocess.PIPE,
                             text=True)
  try:
    for line in process.stderr:
      if line_says in line:
        process.send_signal(signum)
        break
    rest = process.stderr.read()
    return process.wait(120), rest
  finally:
    process.kill()


@pytest.mark.e2e
def test_a_signal_while_compiling_or_finishing_ends_defined_and_loses_nothing(tmp_path,
                                                                             straight):
  """While compiling (right after the model line): the run trains its first call,
  checkpoints and exits 75. While finishing (right after the final evaluation): it writes
  its final checkpoint and results and exits 0. Neither prints a traceback, and the same
  command again ends exactly as the run without signals."""
  compiling, rest = signal_when(tmp_path / "compiling", "model: cifar-8")
  assert compiling == 75, rest[-3000:]
  assert "stopped: stopped by request at step 1;" in rest and "Traceback" not in rest
  resumed = subprocess.run(cli(tmp_path / "compiling"), cwd=ROOT, env=CLI_ENV,
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0 and "resumed from step 1" in resumed.stderr
  assert_ends_as(tmp_path / "compiling", straight)

  finishing, rest = signal_when(tmp_path / "finishing", "step 78: validation error")
  assert finishing == 0, rest[-3000:]
  assert "SIGTERM received" in rest and "Traceback" not in rest
  assert_ends_as(tmp_path / "finishing", straight)


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["sigint", "sighup"])
def test_sigint_and_sighup_are_stop_requests_like_sigterm(tmp_path, signum):
  """Closing the terminal (SIGHUP) or Ctrl-C while compiling: the run trains its first
  call, saves a checkpoint and exits 75."""
  status, rest = signal_when(tmp_path / "run", "model: cifar-8", signum)
  assert status == 75, rest[-3000:]
  assert f"{signal.Signals(signum).name} received: saving a checkpoint" in rest
  assert "stopped: stopped by request at step 1;" in rest and "Traceback" not in rest
  assert latest_meta(tmp_path / "run")[0] == 1


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["sigint", "sigterm", "sighup"])
def test_a_second_signal_stops_at_once_even_while_compiling(tmp_path, signum):
  """Two signals 0.05 s apart while XLA compiles (the main thread in compiled code,
  where Python runs no handler and two signals coalesce): the second ends the process
  at once, with 128 + the signal's number and one line."""
  process = subprocess.Popen(cli(tmp_path / "run"), cwd=ROOT, env=CLI_ENV,
                             stderr=subprocess.PIPE, text=True)
  try:
    for line in process.stderr:
      if "model: cifar-8" in line:  # compiling now
        process.send_signal(signum)
        time.sleep(0.05)
        process.send_signal(signum)
        sent = time.monotonic()
        break
    rest = process.stderr.read()
    status = process.wait(60)
    took = time.monotonic() - sent
  finally:
    process.kill()
  assert status == 128 + signum, rest[-3000:]
  assert took < 5, took  # not after the compilation, the first call and a checkpoint
  assert rest.strip().splitlines()[-1] == (
      "stopped at once by a second signal: run the same command again to resume (from "
      "the newest checkpoint, if one was saved)."), rest[-3000:]
  assert "Traceback" not in rest


def assert_ends_as(workdir, straight):
  """`workdir`'s run ended exactly as the straight one: same results, bit-identical
  final checkpoint (every array's CRC-32 agrees), every step trained once, and
  metrics.jsonl record for record the straight run's (but for what measures time)."""
  a, b = (json.loads((d / "results.json").read_text()) for d in (workdir, straight))
  for key in ("finished", "best_validation_error", "best_validation_step",
              "final_test_error"):
    assert a[key] == b[key], key
  assert latest_meta(workdir)[1]["checksums"] == latest_meta(straight)[1]["checksums"]
  assert a["timing"]["train_steps"] == b["timing"]["train_steps"] == 78
  ours, theirs = (comparable(read_metrics(d)) for d in (workdir, straight))
  assert [r["step"] for r in ours] == [r["step"] for r in theirs]
  for mine, straight_record in zip(ours, theirs):
    assert mine == pytest.approx(straight_record, rel=1e-6, abs=1e-7), mine["step"]


# ------------------------------------------------------------ faults of the filesystem


@pytest.fixture
def small_filesystem(tmp_path):
  """An 8 MiB tmpfs of its own (skipped where this machine may not mount one)."""
  mount_point = tmp_path / "fs"
  mount_point.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs",
                            str(mount_point)], capture_output=True, text=True, check=False)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
  try:
    yield mount_point
  finally:
    subprocess.run(["chattr", "-R", "-i", str(mount_point)], capture_output=True, check=False)
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_fault_of_the_filesystem_is_found_in_orbax_words_and_in_exception_chains():
  tensorstore = ValueError(
      'RESOURCE_EXHAUSTED: Error writing "params.head.kernel/0" in OCDBT database at local '
      'file "/w/checkpoints/78.tmp/": Failed writing: "/w/checkpoints/78.tmp/d/9c7c": '
      "Failed to write 477111 bytes to file 25: No space left on device "
      "[os_error_code='28']")
  found = errors.filesystem_error(tensorstore)
  assert (found.errno, found.filename) == (28, "/w/checkpoints/78.tmp/d/9c7c")
  assert errors.filesystem_message(found).startswith(
      "No space left on device (/w/checkpoints/78.tmp/d/9c7c): free some space, then run "
      "the same command again")
  try:
    try:
      raise PermissionError(13, "Permission denied", "/w/metrics.jsonl")
    except OSError as e:
      raise RuntimeError("closing the checkpoint managers failed") from e
  except RuntimeError as chained:
    assert errors.filesystem_error(chained).filename == "/w/metrics.jsonl"
  assert errors.filesystem_error(ValueError("shapes differ")) is None
  assert errors.filesystem_message(OSError(28, "No space left on device"), "/w") == (
      "No space left on device (in /w): free some space, then run the same command again "
      "(it resumes from the newest good checkpoint).")


def test_a_background_thread_ended_by_a_full_disk_is_one_warning_line(capfd, caplog):
  from experiments.runtime import logs
  import threading

  def write_events():
    raise OSError(28, "No space left on device", "/w/tensorboard/events")
  logs.quiet_libraries(True)
  try:
    thread = threading.Thread(target=write_events, name="EventFileWriter")
    thread.start()
    thread.join()
  finally:
    logs.quiet_libraries(False)
  assert "Traceback" not in capfd.readouterr().err
  assert "EventFileWriter stopped: No space left on device (/w/tensorboard/events)" in (
      caplog.text)


def fill(filesystem, leave_bytes):
  """Fills `filesystem` with a ballast file until only `leave_bytes` are free."""
  stats = os.statvfs(filesystem)
  ballast = filesystem / "ballast"
  ballast.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - leave_bytes))
  return ballast


def assert_one_error_line(done, says):
  assert done.returncode == errors.FILESYSTEM_EXIT_CODE, done.stderr[-3000:]
  # One error line (a background writer that the fault stopped may add a warning line).
  [line] = [l for l in done.stderr.splitlines() if l.startswith("error: ")]
  assert line.startswith(f"error: {says}") and "run the same command again" in line, line
  for noise in ("Traceback", "Event loop is closed", "exception was never retrieved"):
    assert noise not in done.stderr, noise


@pytest.mark.e2e
def test_every_fault_of_the_filesystem_is_one_line_exit_5_and_loses_nothing(
    small_filesystem, straight):
  """Read-only, immutable, then full while saving the final checkpoint: each run ends in
  one line naming the fault and its fix; the checkpoint of step 39 survives them all,
  and once the fault is gone the same command ends exactly as a run without faults."""
  workdir = small_filesystem / "run"
  run = lambda *extra: subprocess.run(cli(workdir, *extra), cwd=ROOT, env=CLI_ENV,
                                      capture_output=True, text=True, timeout=300)
  assert run("--config.halt_after_steps=39").returncode == 0
  checkpoint_39 = latest_meta(workdir)

  subprocess.run(["mount", "-o", "remount,ro", str(small_filesystem)], check=True)
  assert_one_error_line(run(), f"Read-only file system ({workdir}")
  subprocess.run(["mount", "-o", "remount,rw", str(small_filesystem)], check=True)

  subprocess.run(["chattr", "+i", str(workdir)], check=True)
  immutable = run()
  assert_one_error_line(immutable, f"Operation not permitted ({workdir}")
  assert "chattr -i" in immutable.stderr
  subprocess.run(["chattr", "-i", str(workdir)], check=True)

  ballast = fill(small_filesystem, leave_bytes=64 * 1024)  # a checkpoint takes ~600 KiB
  full = run()
  assert_one_error_line(full, "No space left on device (")
  assert "compiled in" in full.stderr  # it failed saving, after training
  assert not list(workdir.glob("*.tmp")), list(workdir.glob("*.tmp"))
  assert latest_meta(workdir) == checkpoint_39
  ballast.unlink()

  resumed = run()
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 39" in resumed.stderr
  assert_ends_as(workdir, straight)


# ------------------------------------------------------ reliability, third round


TIMING_METRICS = ("time", "train/seconds", "train/images_per_s", "train/input_wait_fraction")


def comparable(records):
  """metrics.jsonl records without what measures time (the rest must match)."""
  return [{k: v for k, v in r.items() if k not in TIMING_METRICS and not k.startswith(
      "timing/")} for r in records]


def read_metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_of_a_halted_and_resumed_run_are_the_uninterrupted_runs(tmp_path):
  """Halted at step 6 with a log every 4 steps: no partial record at 6, and the record
  at 8 covers steps 5-8, as in a run never stopped (the window is in the checkpoint)."""
  config = tiny_config(epochs=2, log_every_steps=4)  # 5 steps an epoch
  loop.train_and_evaluate(config, str(tmp_path / "straight"), source=DATASET)
  config.halt_after_steps = 6
  loop.train_and_evaluate(config, str(tmp_path / "resumed"), source=DATASET)
  assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [4, 5, 5]
  config.halt_after_steps = 0
  loop.train_and_evaluate(config, str(tmp_path / "resumed"), source=DATASET)
  straight, resumed = (read_metrics(tmp_path / d) for d in ("straight", "resumed"))
  assert [r["step"] for r in resumed] == [r["step"] for r in straight] == [
      4, 5, 5, 8, 10, 10]
  for a, b in zip(comparable(resumed), comparable(straight)):
    assert a.keys() == b.keys()
    for key in a:
      assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
  window = [r for r in resumed if r["step"] == 8][0]
  assert window["train/steps"] == 3  # steps 6, 7, 8: across the halt


def test_a_finished_run_started_again_needs_no_data(tmp_path):
  config = tiny_config(epochs=1)
  done = loop.train_and_evaluate(config, str(tmp_path), source=DATASET)
  saved = (tmp_path / "results.json").read_text()

  class Gone:  # a source whose data has moved away: any use of it fails
    def __getattr__(self, name):
      raise AssertionError(f"the data was used ({name})")

  again = loop.train_and_evaluate(config, str(tmp_path), source=Gone())
  assert again.state is None and again.results == done.results
  assert (tmp_path / "results.json").read_text() == saved


def test_a_checkpoint_the_new_settings_cannot_load_is_refused_and_kept(tmp_path):
  """Another depth is another model: refused naming the field, with or without
  --allow_config_change; the checkpoints stay where they are, nothing is damaged."""
  loop.train_and_evaluate(tiny_config(epochs=2, halt_after_steps=4), str(tmp_path),
                          source=DATASET)
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  deeper = tiny_config(epochs=2, **{"model.depth": 14})
  with pytest.raises(errors.UserError, match=r"model.depth: 8 -> 14\)\. Its checkpoints "
                     r"cannot take them .*: resume with the settings it was trained with"):
    loop.train_and_evaluate(deeper, str(tmp_path), source=DATASET)
  with pytest.raises(errors.IncompatibleCheckpoint,
                     match=r"model.depth: 8 -> 14: the checkpoint of step 4 .* cannot be "
                           r"loaded with the current settings: .* It is kept as it is"):
    loop.train_and_evaluate(deeper, str(tmp_path), source=DATASET, allow_config_change=True)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before
  assert not (tmp_path / "damaged").exists()
  # A class more: the head cannot take it either.
  wider = dataclasses.replace(DATASET, num_classes=11)
  with pytest.raises(errors.IncompatibleCheckpoint, match="data.num_classes: 10 -> 11"):
    loop.train_and_evaluate(tiny_config(epochs=2), str(tmp_path), source=wider,
                            allow_config_change=True)
  assert loop.train_and_evaluate(tiny_config(epochs=2), str(tmp_path),
                                 source=DATASET).results.finished


def test_loading_never_changes_drops_or_narrows_data_silently(tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  write_image_folder(tmp_path / "deep")
  nested = tmp_path / "deep" / "train" / "cat" / "more"
  nested.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(nested / "x.png")
  assert folder_source(tmp_path / "deep", validation_size=4).num_train == 37 - 4
  write_image_folder(tmp_path / "sixteen")
  Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(
      tmp_path / "sixteen" / "train" / "cat" / "0.png")
  source = folder_source(tmp_path / "sixteen", validation_size=4)
  images = np.concatenate([source.train.images, source.validation.images])
  assert (images == round(1000 * 255 / 65535)).all(axis=(1, 2, 3)).sum() == 1  # scaled
  write_image_folder(tmp_path / "missing")
  for image in (tmp_path / "missing" / "test" / "emu").iterdir():
    image.unlink()
  (tmp_path / "missing" / "test" / "emu").rmdir()
  with pytest.raises(errors.UserError, match=r"test lacks the class folders \['emu'\]"):
    folder_source(tmp_path / "missing", validation_size=4)
  write_image_folder(tmp_path / "one", with_test=False)
  for name in ("dog", "emu"):
    for image in (tmp_path / "one" / "train" / name).iterdir():
      image.unlink()
    (tmp_path / "one" / "train" / name).rmdir()
  with pytest.raises(errors.UserError, match="one class folder .* at least two classes"):
    folder_source(tmp_path / "one", validation_size=4)


def test_workdir_entries_of_the_wrong_kind_are_refused_before_training(tmp_path):
  """Found by injecting faults: a file given as the workdir, a file where the
  checkpoints go, a directory where metrics.jsonl or config.json go."""
  (tmp_path / "file").write_text("x")
  with pytest.raises(errors.UserError, match="--workdir .*file is a file, not a directory"):
    loop.train_and_evaluate(tiny_config(), str(tmp_path / "file"), source=DATASET)
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "checkpoints").write_text("x")
  with pytest.raises(errors.UserError, match="checkpoints is a file where the run keeps"):
    loop.train_and_evaluate(tiny_config(), str(tmp_path / "a"), source=DATASET)
  for name in ("metrics.jsonl", "config.json"):
    workdir = tmp_path / name.split(".")[0]
    (workdir / name).mkdir(parents=True)
    with pytest.raises(OSError) as raised:
      loop.train_and_evaluate(tiny_config(), str(workdir), source=DATASET)
    fault = errors.filesystem_error(raised.value)
    assert fault is not None and "move it away" in errors.filesystem_message(fault), name
    assert not any((workdir / "checkpoints").glob("*")), name  # before any training


def test_settings_found_by_fault_injection_are_refused_in_one_line(tmp_path):
  with pytest.raises(errors.UserError, match=r"input_workers must be in \[-1, \d+\]"):
    loop.train_and_evaluate(tiny_config(input_workers=1000), str(tmp_path), source=DATASET)
  from experiments.configs import quick  # pylint: disable=import-outside-toplevel
  from experiments.sweep import sweeps  # pylint: disable=import-outside-toplevel
  base = quick.get_config()
  base.survival.p_last = 1.5
  with pytest.raises(errors.UserError, match="the sweep's run 'stochastic': model: p_last"):
    sweeps.check_configs("pair", base, str(tmp_path / "sweep"))
  assert not (tmp_path / "sweep").exists()  # nothing ran


def test_divergence_before_any_checkpoint_says_so(tmp_path):
  with pytest.raises(errors.Diverged, match="no checkpoint was saved before it"):
    loop.train_and_evaluate(tiny_config(learning_rate=1e30), str(tmp_path), source=DATASET)


def test_a_symbolic_link_named_like_an_image_that_leads_nowhere_is_refused(tmp_path):
  write_image_folder(tmp_path / "links")
  loop_link = tmp_path / "links" / "train" / "cat" / "loop.png"
  os.symlink(loop_link, loop_link)
  with pytest.raises(errors.UserError, match="loop.png is a broken or looping symbolic"):
    folder_source(tmp_path / "links", validation_size=4)


def test_a_tfds_dataset_that_cannot_be_downloaded_is_one_line(monkeypatch, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  import socket  # pylint: disable=import-outside-toplevel
  def no_network(*args, **kwargs):
    raise socket.gaierror(-2, "Name or service not known")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
  with pytest.raises(errors.UserError, match=r"cifar10 is not in .* and TFDS could not "
                                             r"download it \(.*Name or service not known"):
    loop.train_and_evaluate(tiny_config(dataset="cifar10", data_dir=str(tmp_path)),
                            str(tmp_path / "w"))
  assert errors.filesystem_error(socket.gaierror(-2, "Name or service not known")) is None
