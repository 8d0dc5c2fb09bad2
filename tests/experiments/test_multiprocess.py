"""Real runs of several processes on one machine: 2 processes x 2 CPU devices (issue 11).

Every run is the command line of the README's "Many hosts" section: JAX's multi-process
runtime on 127.0.0.1 with gloo collectives, one shared workdir. Faults are injected into
one process and the other must follow: SIGTERM or SIGINT (both checkpoint one step and
exit 75), SIGKILL, a hang, a peer that never starts (the other stops within a bound
instead of waiting for minutes). A gs:// workdir is checked without network: its path
stays a URL and every report goes through etils.epath (orbax's own gs:// I/O needs a
real bucket).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import results as results_lib
from experiments.runtime import multihost
from experiments.runtime import workdir as workdir_lib
from experiments.training import checkpoints as checkpoint_lib
from experiments.training import writer

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# The README's two-process run: 500 training examples at batch 32 = 15 steps/epoch.
RUN_FLAGS = ("--config=experiments/configs/quick.py", "--config.epochs=2",
             "--config.model.depth=8", "--config.validation_size=2500",
             "--config.batch_size=32", "--config.eval_batch_size=500")
TOTAL_STEPS = 30
# Runs that a fault ends: long enough never to finish first, progress logged early.
FAULT_FLAGS = ("--config.epochs=20", "--config.log_every_steps=5")
RUN_TIMEOUT_S = 300  # a whole run, on 2 busy cores
FAILURE_BOUND_S = 90  # a process must follow a dead or hung one within this


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cli_env(devices: int) -> dict[str, str]:
  # None of the test session's JAX settings but its compilation cache (the fault tests
  # run one program many times): the tolerance of the comparison with one process is
  # that of XLA's optimised programs.
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("JAX_") or k.startswith(("JAX_COMPILATION_CACHE",
                                                      "JAX_PERSISTENT_CACHE"))}
  return {**env, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def command(workdir: pathlib.Path, *extra: str, port: int = 0, processes: int = 1,
            process_id: int = 0) -> list[str]:
  """The README's command line for process `process_id` of `processes`."""
  distributed = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                  f"--process_id={process_id}"] if processes > 1 else [])
  return [sys.executable, "-m", "experiments.cifar", *RUN_FLAGS, f"--workdir={workdir}",
          *distributed, *extra]


class Processes:
  """The processes of one run, each logging to WORKDIR.<process>.log beside the workdir."""

  def __init__(self, workdir: pathlib.Path, *extra: str, processes: int = 2,
               devices: int = 2, extra_for: dict[int, Sequence[str]] | None = None):
    self.workdir = workdir
    self.logs = [workdir.parent / f"{workdir.name}.{i}.log" for i in range(processes)]
    port = free_port()
    self.popens: list[subprocess.Popen] = []
    for i, log in enumerate(self.logs):
      with open(log, "w") as out:
        self.popens.append(subprocess.Popen(
            command(workdir, *extra, *(extra_for or {}).get(i, ()), port=port,
                    processes=processes, process_id=i),
            cwd=ROOT, env=cli_env(devices), stdout=out, stderr=subprocess.STDOUT))

  def log(self, i: int) -> str:
    return self.logs[i].read_text(errors="replace")

  def tails(self) -> str:
    return "\n".join(f"--- process {i}:\n{self.log(i)[-3000:]}" for i in range(len(self.logs)))

  def wait(self, timeout_s: float = RUN_TIMEOUT_S, only: Sequence[int] | None = None
           ) -> list[int]:
    """Exit statuses of the processes (`only` those), failing with their logs if any
    is still running after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    statuses = []
    for i in (range(len(self.popens)) if only is None else only):
      try:
        statuses.append(self.popens[i].wait(max(0.1, deadline - time.monotonic())))
      except subprocess.TimeoutExpired:
        pytest.fail(f"process {i} still running after {timeout_s} s\n{self.tails()}")
    return statuses

  def wait_for_line(self, i: int, text: str, timeout_s: float = RUN_TIMEOUT_S) -> None:
    """Returns once process `i` has logged `text` (fails if it exits first)."""
    deadline = time.monotonic() + timeout_s
    while text not in self.log(i):
      if self.popens[i].poll() is not None or time.monotonic() > deadline:
        pytest.fail(f"process {i} never logged {text!r}\n{self.tails()}")
      time.sleep(0.2)

  def kill(self) -> None:
    for popen in self.popens:
      if popen.poll() is None:
        popen.kill()
      popen.wait(30)


@contextlib.contextmanager
def started(workdir: pathlib.Path, *extra: str, processes: int = 2, devices: int = 2,
            extra_for: dict[int, Sequence[str]] | None = None) -> Iterator[Processes]:
  """The run's processes (`extra_for`: flags of some processes only); whatever happens,
  none outlives the block."""
  run = Processes(workdir, *extra, processes=processes, devices=devices,
                  extra_for=extra_for)
  try:
    yield run
  finally:
    run.kill()


def finish(workdir: pathlib.Path, *extra: str, processes: int = 2, devices: int = 2
           ) -> Processes:
  """A run to its end; every process must exit 0."""
  with started(workdir, *extra, processes=processes, devices=devices) as run:
    assert run.wait() == [0] * processes, run.tails()
  return run


def results(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / "results.json").read_text())


@contextlib.contextmanager
def latest_checkpoints(workdir: pathlib.Path) -> Iterator[checkpoint_lib.Checkpoints]:
  checkpoints = checkpoint_lib.Checkpoints(workdir_lib.resolve(workdir))
  try:
    yield checkpoints
  finally:
    checkpoints.close()


def final_checkpoint(workdir: pathlib.Path) -> tuple[int, dict, dict]:
  """(step, state as nested dicts of arrays, meta) of the workdir's newest checkpoint."""
  with latest_checkpoints(workdir) as checkpoints:
    step = checkpoints.steps()[-1]
    restored = checkpoints.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    return step, restored["state"], restored["meta"]


# ---------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Processes:
  """The README's run: 2 processes x 2 CPU devices, uninterrupted."""
  return finish(tmp_path_factory.mktemp("two_processes") / "run")


# Two steps: the equivalence of two processes with one is checked where float rounding
# (sums over devices in another order) cannot yet have grown into the trajectory.
EQUIVALENCE_STEPS = 2


@pytest.fixture(scope="module")
def halted_two_processes(tmp_path_factory) -> Processes:
  """The README's run halted after EQUIVALENCE_STEPS steps (2 processes x 2 devices)."""
  return finish(tmp_path_factory.mktemp("halted_two_processes") / "run",
                f"--config.halt_after_steps={EQUIVALENCE_STEPS}")


@pytest.fixture(scope="module")
def halted_one_process(tmp_path_factory) -> Processes:
  """The same, in 1 process x 4 CPU devices."""
  return finish(tmp_path_factory.mktemp("halted_one_process") / "run",
                f"--config.halt_after_steps={EQUIVALENCE_STEPS}", processes=1, devices=4)


# ---------------------------------------------------------------------- tests


def test_the_readme_shows_the_command_this_file_runs():
  text = re.sub(r"\s*\\\n\s*", " ", README.read_text())  # join continued lines
  assert "XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu" in text
  pattern = (r"python -m experiments\.cifar " + re.escape(" ".join(RUN_FLAGS)) +
             r" --workdir=\S+ --coordinator_address=127\.0\.0\.1:\d+ --num_processes=2"
             r" --process_id=\$i &")
  assert re.search(pattern, text), "README's two-process command differs from the test's"


@pytest.mark.e2e
def test_two_processes_finish_and_only_process_0_writes_the_reports(two_processes):
  for i in range(2):
    assert "JAX " in two_processes.log(i) and "on 2 process(es), 4 device(s)" in (
        two_processes.log(i))
    # The session's compilation cache is off where its programs would hang (jax 0.12.1);
    # the runs after this one load the same programs and finish.
    assert ("persistent compilation cache off" in two_processes.log(i)) == (
        multihost._jax_version() >= multihost._CACHED_CPU_COLLECTIVES_HANG_SINCE)
  workdir = two_processes.workdir
  result = results(workdir)
  assert result["finished"] and result["steps"] == TOTAL_STEPS
  assert result["timing"]["train_steps"] == TOTAL_STEPS
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics if "validation/error" in m] == [15, 30]
  assert len(list((workdir / "tensorboard").iterdir())) == 1  # one writer: process 0
  step, state, meta = final_checkpoint(workdir)
  assert step == TOTAL_STEPS and int(state["step"]) == TOTAL_STEPS
  # Every array arrived whole: the same CRC-32s as the state that was saved.
  assert sorted(checkpoint_lib.checksums(state).values()) == sorted(
      meta["checksums"].values())


@pytest.mark.e2e
def test_two_processes_train_what_one_process_of_four_devices_trains(halted_two_processes,
                                                                     halted_one_process):
  """The state after two steps: every array equal to the one-process run's up to
  1e-4 of the largest move of any array from the initial state. That bound is ~800 ulps
  of float32 at the scale that moved: what summing the same per-device terms in another
  order (gloo's ring vs in-process) gives, measured at 5.8e-6 of it (AMD EPYC, jax 0.10.2 and 0.12).
  A wrong batch slice (every process feeding process 0's rows) differs by 5e-2, and
  per-device gates crash the run (a cross-replica BatchNorm in a conditional that runs on
  some devices only): both fail here."""
  states = [final_checkpoint(run.workdir) for run in (halted_two_processes, halted_one_process)]
  assert [step for step, _, _ in states] == [EQUIVALENCE_STEPS] * 2
  two, one = (flat({k: state[k] for k in ("params", "batch_stats")}) for _, state, _ in states)
  assert two.keys() == one.keys() and len(one) > 20
  initial = flat(initial_variables())
  largest_move = max(np.abs(one[name] - initial[name]).max() for name in one)
  assert largest_move > 1e-2  # the steps trained
  for name in one:
    np.testing.assert_allclose(two[name], one[name], rtol=0, atol=1e-4 * largest_move,
                               err_msg=name)


def initial_variables() -> dict:
  """The params and batch_stats that RUN_FLAGS' run starts from (its seed, its model)."""
  # pylint: disable=import-outside-toplevel
  from experiments.configs import quick
  from experiments.training import recipe
  from experiments.training import steps
  config = quick.get_config()
  config.model.depth = 8
  model = recipe.build_model(config, 10)
  tx = recipe.make_optimizer(config, recipe.learning_rate_schedule(config, 15))
  state = jax.device_get(steps.create_train_state(model, tx, (32, 32, 3), config.seed))
  return {"params": state.params, "batch_stats": state.batch_stats}


def flat(state: dict) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


@pytest.mark.e2e
def test_a_halted_run_restarted_on_both_processes_ends_bit_identical(
    two_processes, halted_two_processes, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(halted_two_processes.workdir, workdir)
  assert not results(workdir)["finished"]
  resumed = finish(workdir)
  for i in range(2):
    assert f"resumed from step {EQUIVALENCE_STEPS}" in resumed.log(i)
  a, b = results(workdir), results(two_processes.workdir)
  for key in ("best_validation_error", "best_validation_step", "final_validation_error",
              "final_test_error"):
    assert a[key] == b[key], key
  assert a["timing"]["train_steps"] == TOTAL_STEPS
  # Bit-identical: every array's CRC-32 in the final checkpoints agrees.
  assert final_checkpoint(workdir)[2]["checksums"] == final_checkpoint(
      two_processes.workdir)[2]["checksums"]


@pytest.mark.parametrize("signum, target", [(signal.SIGTERM, 1), (signal.SIGINT, 0)],
                         ids=["sigterm_to_worker", "sigint_to_coordinator"])
@pytest.mark.e2e
def test_a_stop_signal_to_one_process_checkpoints_one_step_on_all_and_all_exit_75(
    tmp_path, signum, target):
  workdir = tmp_path / "run"
  with started(workdir, *FAULT_FLAGS) as run:
    run.wait_for_line(target, " step 5/")  # training is under way on both
    run.popens[target].send_signal(signum)
    assert run.wait(120) == [75, 75], run.tails()
  stopped = [re.findall(r"stopped: stopped by request at step (\d+)", run.log(i))
             for i in range(2)]
  assert stopped[0] and stopped[0] == stopped[1], run.tails()
  step = int(stopped[0][0])
  assert 5 <= step < 300
  saved_step, state, meta = final_checkpoint(workdir)
  assert saved_step == step and int(state["step"]) == step
  assert sorted(checkpoint_lib.checksums(state).values()) == sorted(
      meta["checksums"].values())
  assert not (workdir / "results.json").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("victim", [1, 0], ids=["worker_killed", "coordinator_killed"])
def test_a_killed_process_makes_the_other_stop_within_a_bound(tmp_path, victim):
  survivor = 1 - victim
  with started(tmp_path / "run", *FAULT_FLAGS) as run:
    run.wait_for_line(victim, " step 5/")
    run.popens[victim].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    [status] = run.wait(FAILURE_BOUND_S, only=[survivor])
    elapsed = time.monotonic() - killed_at
  log = run.log(survivor)
  assert status != 0, log[-3000:]
  assert elapsed < FAILURE_BOUND_S
  # Ours (a collective with the dead process failed: exit 4) or JAX's (its heartbeats
  # stopped: JAX ends the process itself).
  ours = f"error: process {survivor} of 2 failed" in log
  assert ours or "the JAX distributed service detected fatal errors" in log, log[-3000:]
  assert status == 4 or not ours, (status, log[-3000:])


@pytest.mark.e2e
def test_a_hung_process_makes_the_other_stop_after_the_heartbeat_timeout(tmp_path):
  heartbeat_timeout_s = 10  # well under the default 60 s, so the flag must take effect
  with started(tmp_path / "run", *FAULT_FLAGS,
               f"--heartbeat_timeout_seconds={heartbeat_timeout_s}") as run:
    run.wait_for_line(1, " step 5/")
    run.popens[1].send_signal(signal.SIGSTOP)  # alive, silent, holding its sockets
    stopped_at = time.monotonic()
    [status] = run.wait(FAILURE_BOUND_S, only=[0])
    elapsed = time.monotonic() - stopped_at
    run.popens[1].send_signal(signal.SIGCONT)
  log = run.log(0)
  assert status != 0 and elapsed < heartbeat_timeout_s + 35, (elapsed, log[-3000:])
  assert "stopped sending heartbeats" in log, log[-3000:]


@pytest.mark.e2e
def test_processes_started_with_other_settings_refuse_naming_process_and_field(tmp_path):
  with started(tmp_path / "run", extra_for={1: ("--config.survival.p_last=1.0",)}) as run:
    assert run.wait(FAILURE_BOUND_S) == [2, 2], run.tails()
  for i in range(2):
    assert "setting survival.p_last (process 1)" in run.log(i), run.tails()
  assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained


@pytest.mark.e2e
def test_a_process_whose_peer_never_starts_gives_up_after_the_initialization_timeout(
    tmp_path):
  started_at = time.monotonic()
  alone = subprocess.run(  # killed if it outlives the timeout
      command(tmp_path / "run", "--initialization_timeout_seconds=5", port=free_port(),
              processes=2, process_id=0),
      cwd=ROOT, env=cli_env(2), capture_output=True, text=True, timeout=FAILURE_BOUND_S)
  assert alone.returncode != 0 and time.monotonic() - started_at < FAILURE_BOUND_S
  assert "DEADLINE_EXCEEDED" in alone.stderr, alone.stderr[-3000:]  # JAX names the wait
  assert not (tmp_path / "run").exists()  # nothing started


# -------------------------------------------------------------- gs:// workdirs


@contextlib.contextmanager
def gs_bucket_in(directory: pathlib.Path, monkeypatch) -> Iterator[None]:
  """gs:// paths lead into `directory` (etils' own epath mock), no network involved."""

  def local(path) -> str:
    text = os.fspath(path)
    return os.fspath(directory / text[len("gs://"):]) if text.startswith("gs://") else text

  def one(fn, path, *args, **kwargs):
    return fn(local(path), *args, **kwargs)

  def two(fn, path, dst, *args, **kwargs):
    return fn(local(path), local(dst), *args, **kwargs)

  # With TensorFlow installed epath sends gs:// to TensorFlow's GCS client, not the mock.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  with epath_testing.mock_epath(
      open=one, exists=one, isdir=one, listdir=one, glob=one, makedirs=one, mkdir=one,
      remove=one, rmtree=one, stat=one, walk=one, rename=two, replace=two, copy=two):
    yield


def test_a_gs_workdir_stays_a_url_and_every_report_is_written_through_epath(
    tmp_path, monkeypatch):
  path = workdir_lib.resolve("gs://bucket/run")
  assert isinstance(path, epath.Path) and os.fspath(path) == "gs://bucket/run"
  assert os.fspath(path / "results.json") == "gs://bucket/run/results.json"
  assert not workdir_lib.is_local(path)
  monkeypatch.chdir(tmp_path)
  assert os.fspath(workdir_lib.resolve("runs/a")) == os.fspath(tmp_path / "runs" / "a")
  with gs_bucket_in(tmp_path / "gcs", monkeypatch):
    workdir_lib.Lock(path).acquire()  # object stores have no lock: not enforced there
    run_writer = writer.RunWriter(path, start_step=0)
    run_writer.write_metrics(1, {"train/loss": 2.5, "epoch": 0.5})
    run_writer.write_metrics(2, {"train/loss": 2.0, "epoch": 1.0})
    run_writer.flush()
    run_writer.write_results(results_lib.Results(config={}, steps=2, finished=False))
    run_writer.write_config({})
    run_writer.close()
    resumed = writer.RunWriter(path, start_step=1)  # reads metrics.jsonl back
    resumed.close()
  bucket = tmp_path / "gcs" / "bucket" / "run"
  assert json.loads((bucket / "results.json").read_text())["steps"] == 2
  assert json.loads((bucket / "config.json").read_text()) == {}
  steps = [json.loads(line)["step"] for line in (bucket / "metrics.jsonl").read_text(
  ).splitlines()]
  assert steps == [1]  # the resumed writer kept the records up to its start step
  events = list((bucket / "tensorboard").glob("events.out.tfevents.*"))
  assert events and all(e.stat().st_size > 0 for e in events)  # TensorBoard, via epath
  assert not list(tmp_path.glob("gs*")) and not (tmp_path / "bucket").exists()


@pytest.mark.e2e
def test_hosts_that_do_not_share_the_workdir_are_refused_before_anything_starts(tmp_path):
  """Each process given a workdir of its own (as hosts without a shared filesystem see a
  local path): every process exits 2 naming process 1; nothing is trained or called
  damaged, and a second start says the same."""
  port = free_port()
  for _ in range(2):
    popens = [subprocess.Popen(
        command(tmp_path / f"run{i}", port=port, processes=2, process_id=i), cwd=ROOT,
        env=cli_env(2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    logs = [p.communicate(timeout=FAILURE_BOUND_S)[1] for p in popens]
    assert [p.returncode for p in popens] == [2, 2], logs
    for i, log in enumerate(logs):
      assert log.strip().splitlines()[-1].startswith(
          "error: process(es) 1 of 2 do not see the workdir process 0 writes to (process "
          f"{i} was given {tmp_path / f'run{i}'})"), log[-2000:]
      assert "Traceback" not in log
    port = free_port()
  assert not (tmp_path / "run0" / "checkpoints").exists()
  assert not (tmp_path / "run0" / "damaged").exists()
