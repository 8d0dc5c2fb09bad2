"""What a run writes into its workdir: config.json, metrics.jsonl, TensorBoard, results.json.

Only process 0 writes (`enabled`). Every file is written atomically (`write_text_atomic`):
metrics.jsonl is rewritten whole at each flush, which works on object stores too and
never interleaves two writers; records of steps after the checkpoint a run resumes from
are dropped, so a resumed run's file reads as if never interrupted. TensorBoard gets
the same scalars.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os

from absl import logging
from etils import epath

from experiments import results as results_lib
from experiments.runtime import workdir as workdir_lib


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


class RunWriter:
  """The run's files in `workdir` (module docstring); a no-op unless `enabled`."""

  def __init__(self, workdir: epath.Path, enabled: bool = True, start_step: int = 0):
    self.enabled = enabled
    self.workdir = workdir
    self._lines: list[str] = []
    self._tb = None
    if not enabled:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "metrics.jsonl"
    if path.exists():
      records, damaged = results_lib.read_records(path.read_bytes())
      if damaged:
        logging.warning("%s: %d damaged line(s) dropped (the rest is kept).", path, damaged)
      self._lines = [json.dumps(r) for r in records if r[results_lib.STEP] <= start_step]
    # Written now, not at the first checkpoint: a file that cannot be (immutable, a
    # directory in its place) stops the run before it trains.
    workdir_lib.write_text_atomic(path, "".join(line + "\n" for line in self._lines))
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    if not workdir_lib.is_local(workdir):
      route_tensorboard_urls_through_epath()
    self._tb = SummaryWriter(os.fspath(workdir / "tensorboard"),
                             purge_step=start_step or None)

  def write_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self._lines.append(results_lib.record_line(step, metrics))
    for name, value in metrics.items():
      self._tb.add_scalar(name, float(value), int(step))

  def flush(self) -> None:
    if not self.enabled:
      return
    workdir_lib.write_text_atomic(self.workdir / "metrics.jsonl",
                                  "".join(line + "\n" for line in self._lines))
    self._tb.flush()

  def write_results(self, results: results_lib.Results) -> None:
    if self.enabled:
      workdir_lib.write_text_atomic(self.workdir / "results.json",
                                    results_lib.results_text(results))

  def write_config(self, config: dict) -> None:
    if self.enabled:
      workdir_lib.write_text_atomic(self.workdir / "config.json",
                                    json.dumps(config, indent=2, sort_keys=True))

  def close(self) -> None:
    """Flushes and closes the files (again: nothing)."""
    if self.enabled and self._tb is not None:
      self.flush()
      self._tb.close()
      self._tb = None

  def __enter__(self) -> RunWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
