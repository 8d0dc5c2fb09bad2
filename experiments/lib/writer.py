"""What a run writes (`RunWriter`): progress lines, metrics.jsonl, TensorBoard events, results.json.

Only process 0 writes files. metrics.jsonl is rewritten whole (atomically) at each flush,
which works on object stores too and never interleaves two writers; records of steps
after the checkpoint a run resumes from are dropped, so a resumed run's file reads as
if never interrupted.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import logging as std_logging
import os
import sys
import threading
import time
from typing import Any

from absl import logging
from etils import epath

from experiments.lib import errors
from experiments.lib import workdir as workdir_lib

_OUR_CODE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class OnlyOurInfo(std_logging.Filter):
  """Keeps this project's log lines and every library's warnings and errors, the latter
  without their tracebacks (orbax logs each failed write of a full disk with one); drops
  the libraries' INFO chatter (orbax's temporary directories, barriers, ...) and
  asyncio's reports of the other writes of a failed checkpoint, which fail alike."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if os.path.abspath(record.pathname).startswith(_OUR_CODE):
      return True
    if record.name == "asyncio" and "exception was never retrieved" in record.getMessage():
      return False  # the other writes of a failed checkpoint, collected at exit
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return record.levelno >= std_logging.WARNING


def _without_closed_loop_noise(unraisable) -> None:
  """sys.unraisablehook that drops the "Event loop is closed" errors of tensorstore's
  late completions: when a checkpoint write or read fails, orbax closes its event loop
  while the other writes still complete, and each prints a traceback from a C++ thread,
  dozens of them burying the real error (which the run reports in one line)."""
  if (isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == "Event loop is closed"):
    return
  sys.__unraisablehook__(unraisable)


def _filesystem_faults_in_one_line(failure) -> None:
  """threading.excepthook: a background thread (orbax's writers, TensorBoard's event
  writer) that dies of a fault of the filesystem says so in one warning line; the run
  itself reports the fault (exit 5). Any other exception keeps its traceback."""
  fault = errors.filesystem_error(failure.exc_value)
  if fault is None:
    threading.__excepthook__(failure)
    return
  name = failure.thread.name if failure.thread is not None else "a background thread"
  logging.warning("%s stopped: %s", name, errors.filesystem_message(fault))


def quiet_libraries(enabled: bool = True) -> None:
  """Silences other libraries' INFO logging and tracebacks on absl's handler, the
  closed-event-loop noise of failed checkpoint writes, and the tracebacks of background
  threads that a fault of the filesystem ends (or restores all of them)."""
  handler = logging.get_absl_handler()
  for f in [f for f in handler.filters if isinstance(f, OnlyOurInfo)]:
    handler.removeFilter(f)
  sys.unraisablehook = sys.__unraisablehook__
  threading.excepthook = threading.__excepthook__
  if enabled:
    handler.addFilter(OnlyOurInfo())
    sys.unraisablehook = _without_closed_loop_noise
    threading.excepthook = _filesystem_faults_in_one_line


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def percent(fraction: float | None) -> str:
  return "-" if fraction is None else f"{100 * fraction:.2f}%"


class _EpathEventFiles:
  """tensorboardX's writer factory for URL logdirs (gs://, s3://, ...): event files are
  opened through etils.epath, the layer every other file of the run goes through."""

  def open(self, path: str):
    return epath.Path(path).open("wb")

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def route_tensorboard_urls_through_epath() -> None:
  """Makes tensorboardX write gs://, s3:// and az:// logdirs with etils.epath (TensorFlow's
  gfile or fsspec, as checkpoints and results) instead of its own clients, which need
  packages this project does not install (google-cloud-storage, boto3)."""
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  for scheme in ("gs", "s3", "az"):
    record_writer.register_writer_factory(scheme, _EpathEventFiles())


def read_records(data: bytes) -> tuple[list[dict], int]:
  """The records of a metrics.jsonl file and the number of its damaged lines (not JSON
  objects with a step, e.g. the half-written last line of a run killed mid-write)."""
  records, damaged = [], 0
  for line in data.decode("utf-8", errors="replace").splitlines():
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      record = None
    if isinstance(record, dict) and isinstance(record.get("step"), int):
      records.append(record)
    else:
      damaged += 1
  return records, damaged


class RunWriter:
  """Writes every metric to metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: epath.Path, enabled: bool = True, start_step: int = 0):
    self.enabled = enabled
    self.workdir = workdir
    self._records: list[str] = []
    self._tb = None
    if not enabled:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "metrics.jsonl"
    if path.exists():
      records, damaged = read_records(path.read_bytes())
      if damaged:
        logging.warning("%s: %d damaged line(s) dropped (the rest is kept).", path, damaged)
      self._records = [json.dumps(r) for r in records if r["step"] <= start_step]
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    if not workdir_lib.is_local(workdir):
      route_tensorboard_urls_through_epath()
    self._tb = SummaryWriter(os.fspath(workdir / "tensorboard"),
                             purge_step=start_step or None)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "time": time.time(),
              **{k: float(v) for k, v in metrics.items()}}
    self._records.append(json.dumps(record))
    for name, value in metrics.items():
      self._tb.add_scalar(name, float(value), int(step))

  def flush(self) -> None:
    if not self.enabled:
      return
    workdir_lib.write_text_atomic(self.workdir / "metrics.jsonl",
                                  "".join(r + "\n" for r in self._records))
    self._tb.flush()

  def results(self, results: Mapping[str, Any]) -> None:
    if self.enabled:
      workdir_lib.write_text_atomic(self.workdir / "results.json",
                                    json.dumps(results, indent=2, sort_keys=True))

  def close(self) -> None:
    """Flushes and closes the files (again: nothing)."""
    if self.enabled and self._tb is not None:
      self.flush()
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "RunWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
