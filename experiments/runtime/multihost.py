"""Several processes (hosts) of one run: how they start, what they must agree on."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets

from absl import logging
from etils import epath
import jax
import numpy as np

from experiments.runtime import errors
from experiments.runtime import workdir as workdir_lib


def gather_int64(values) -> np.ndarray:
  """Every process's `values` (int64 [n]), as [processes, n]. JAX's collectives carry
  32-bit integers unless x64 is on, so each int64 travels as two int32 halves (a plain
  int64 gather would truncate: a step or a hash would arrive garbled)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  halves = np.ascontiguousarray(np.asarray(values, np.int64).reshape(-1)).view(np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(halves))
  return np.ascontiguousarray(gathered.reshape(jax.process_count(), -1)).view(np.int64)


def agree_on_start_step(step: int) -> int:
  """`step` if every process found the same checkpoint step; else a UserError naming
  the processes that differ (e.g. a workdir that is not shared by every host)."""
  if jax.process_count() == 1:
    return step
  steps = gather_int64([step])[:, 0]
  if np.all(steps == steps[0]):
    return step
  found = ", ".join(f"process {i}: step {int(s)}" for i, s in enumerate(steps))
  raise errors.UserError(
      f"the processes found different checkpoints to resume from ({found}): every host "
      "must see the same --workdir (a shared filesystem or a gs:// bucket).")


def check_shared_workdir(workdir: epath.Path) -> None:
  """Returns if every process sees `workdir` as process 0 does: process 0 writes a fresh
  token there, every process reads it back. Else a UserError on every process, naming
  the processes that do not see it (hosts given different --workdir values, or a local
  path on hosts that share no filesystem), before anything is read or trained."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  token_path = workdir / "processes.token"
  token = secrets.randbits(62)
  if jax.process_index() == 0:
    workdir_lib.write_text_atomic(token_path, f"{token}\n")
  token = int(gather_int64([token if jax.process_index() == 0 else 0])[0, 0])
  try:
    seen = int(token_path.read_text().strip()) == token
  except (OSError, ValueError):
    seen = False
  multihost_utils.sync_global_devices("read the workdir token")
  blind = [i for i, ok in enumerate(gather_int64([int(seen)])[:, 0]) if not ok]
  if blind:
    raise errors.UserError(
        f"process(es) {', '.join(map(str, blind))} of {jax.process_count()} do not see the "
        f"workdir process 0 writes to (process {jax.process_index()} was given {workdir}): "
        "every host must see the same --workdir (the same path on a shared filesystem, "
        "or a gs:// bucket).")


def agree_on(values: dict) -> None:
  """Returns if every process holds the same `values` ({name: JSON-able value}); else a
  UserError, on every process, naming the processes and the names that differ from
  process 0 (hosts launched with other flags, or other data)."""
  if jax.process_count() == 1:
    return
  hashes = [int.from_bytes(hashlib.blake2b(
      json.dumps(v, sort_keys=True, default=str).encode(), digest_size=8).digest(),
      "little", signed=True) for v in values.values()]
  gathered = gather_int64(hashes)
  differ = [(name, [p for p in range(len(gathered)) if gathered[p, j] != gathered[0, j]])
            for j, name in enumerate(values)]
  differ = [(name, processes) for name, processes in differ if processes]
  if differ:
    listed = "; ".join(f"{name} (process {', '.join(map(str, ps))})" for name, ps in differ)
    raise errors.UserError(
        f"the processes were started with different settings or data than process 0: "
        f"{listed}. Start every process with the same flags and the same data.")


def _env_int(name: str) -> int:
  try:
    return int(os.environ.get(name, ""))
  except ValueError:
    return 0


def cluster_detected(coordinator_address: str | None = None) -> str | None:
  """What makes "auto" start the multi-process runtime, or None for a one-process run.

  An explicit coordinator (argument or JAX_COORDINATOR_ADDRESS), a multi-host TPU slice
  on GKE (TPU_WORKER_HOSTNAMES), a Slurm step of several tasks (srun: the variables JAX
  reads), or an Open MPI job of several ranks (mpirun). A Cloud TPU VM slice started with
  gcloud announces itself only through its metadata server: there pass --distributed=yes.
  """
  if coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "a coordinator address"
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return "a multi-host TPU slice (TPU_WORKER_HOSTNAMES)"
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
           "SLURM_LOCALID")
  if all(name in os.environ for name in slurm) and _env_int("SLURM_NTASKS") > 1:
    return "a Slurm step of several tasks"
  if _env_int("OMPI_COMM_WORLD_SIZE") > 1:
    return "an Open MPI job of several ranks"
  return None


# The first JAX whose multi-process CPU programs hang when loaded from the persistent cache.
_CACHED_CPU_COLLECTIVES_HANG_SINCE = (0, 12, 1)


def _avoid_cached_cpu_collectives() -> None:
  """Turns JAX's persistent compilation cache off in a CPU run of several processes, from
  jax 0.12.1 on (still so in 0.12.1, the newest on 2026-12-06).

  There a program with collectives that comes out of the cache (a second run, or a resumed
  one) waits forever in its first collective on every process, with no error: the
  executable compiled afresh runs; 0.10.2 runs both. Compiling again costs seconds on
  CPU; a hang costs the run.
  """
  if (jax.default_backend() != "cpu" or not jax.config.jax_enable_compilation_cache
      or _jax_version() < _CACHED_CPU_COLLECTIVES_HANG_SINCE):
    return
  jax.config.update("jax_enable_compilation_cache", False)
  if jax.config.jax_compilation_cache_dir:
    logging.warning("persistent compilation cache off: JAX %s hangs in CPU collectives "
                    "of several processes loaded from it", jax.__version__)


def _jax_version() -> tuple[int, ...]:
  return tuple(int(part) for part in re.findall(r"\d+", jax.__version__)[:3])


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None, *,
               heartbeat_timeout_seconds: int = 60,
               initialization_timeout_seconds: int = 300) -> None:
  """Starts JAX's multi-process runtime (`jax.distributed.initialize`) if asked.

  mode "yes": always; "no": never; "auto": when `cluster_detected` names a reason. Unset
  settings are left to JAX, which reads them from the environment or the cluster (Cloud
  TPU, Slurm, Open MPI, ...).

  Guarantees on return: either this is a run of one process, or the runtime is up, with
  JAX's preemption service (a SIGTERM on any host reaches every host), CPU collectives
  over gloo (unless JAX_CPU_COLLECTIVES_IMPLEMENTATION chose another), and failure
  detection: a process that stops sending heartbeats for `heartbeat_timeout_seconds`
  (dead, hung, or cut off) makes every other process terminate, as does a process that
  does not connect within `initialization_timeout_seconds` (JAX ends the process, naming
  the failed RPC); no persistent compilation cache where its programs would hang
  (`_avoid_cached_cpu_collectives`). Missing or inconsistent settings, and a run of
  several processes without the runtime, give a UserError.
  """
  if mode == "yes" or (mode == "auto" and cluster_detected(coordinator_address)):
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
      # Collectives across processes on CPU: JAX's default today, absent in older ones.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
      jax.distributed.initialize(
          coordinator_address=coordinator_address, num_processes=num_processes,
          process_id=process_id, initialization_timeout=initialization_timeout_seconds,
          heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    except (ValueError, TypeError) as e:
      raise errors.UserError(
          f"cannot start the multi-process runtime: {e} (give --coordinator_address, "
          "--num_processes and --process_id, or run under Slurm, Open MPI or Cloud TPU)."
      ) from None
  if jax.process_count() > 1:
    if not jax.distributed.is_initialized():
      raise errors.UserError(
          f"this run spans {jax.process_count()} processes but JAX's multi-process "
          "runtime is not started, so a preemption or a dead host would go unnoticed: "
          "pass --distributed=yes.")
    _avoid_cached_cpu_collectives()
