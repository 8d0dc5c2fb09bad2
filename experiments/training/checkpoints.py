"""Checkpoints with orbax: the latest ones (to resume) and the best-validation one.

- Orbax writes each checkpoint into a temporary directory and renames it when complete,
  and the latest two are kept, so a crash while saving never loses the previous one.
- Every array's CRC-32 is saved in the checkpoint's metadata and checked on restore, so
  overwritten bytes are found, not trained on. A damaged checkpoint (bytes that fail
  their checksums, files that are missing or do not parse) is moved aside to
  WORKDIR/damaged/, kept for inspection, and the next older one is used. A checkpoint
  whose arrays have other shapes than the current settings give (another depth, other
  classes) is not damaged: it is refused (`errors.IncompatibleCheckpoint`) and left
  where it is. Nor is one that the filesystem fails to read (EIO, EACCES: an errno):
  the error is raised, the run stops in one line (exit 5), and the checkpoint is used
  when the run is started again.
- On many hosts every process takes part in every save; the two managers use their own
  barrier names, so saving the latest and the best checkpoint of one step never collide.
"""

from __future__ import annotations

from collections.abc import Callable
import errno
from typing import Any
import zlib

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments.runtime import errors


def checksums(state: Any) -> dict[str, int]:
  """CRC-32 of every array of a host (NumPy) state, keyed by its path in the tree."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(path): zlib.crc32(np.ascontiguousarray(leaf).tobytes())
          for path, leaf in leaves}


def damaged_arrays(state: Any, expected: dict[str, int]) -> list[str]:
  """Paths of the arrays whose CRC-32 differs from `expected` (or that are missing)."""
  found = checksums(state)
  return sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))


# What a checkpoint's own files can be missing or be: its damage, not the filesystem's.
_DAMAGE_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR})


def _path_name(path) -> str:
  """"params/head/kernel": a tree path, whether its nodes are dicts, attributes (a
  TrainState's fields) or sequence items (optax's states)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def shapes(tree: Any) -> dict[str, tuple]:
  """{path: shape} of every array (or array metadata) of a tree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_name(path): tuple(leaf.shape) for path, leaf in leaves}


def shape_differences(saved: dict[str, tuple], template: dict[str, tuple]) -> list[str]:
  """One phrase per array whose shape (or presence) differs between two `shapes`."""
  return [f"{path} is {saved.get(path, 'absent')} there and "
          f"{template.get(path, 'absent')} now"
          for path in sorted(set(saved) | set(template)) if saved.get(path) != template.get(path)]


class Checkpoints:
  """`WORKDIR/checkpoints` (latest `keep` steps) and `WORKDIR/best` (one)."""

  def __init__(self, workdir: epath.Path, keep: int = 2):
    self.workdir = workdir
    for name in ("checkpoints", "best"):
      if (workdir / name).exists() and not (workdir / name).is_dir():
        raise errors.UserError(f"{workdir / name} is a file where the run keeps its "
                               "checkpoints: move it away.")

    def manager(name: str, max_to_keep: int):
      return ocp.CheckpointManager(
          workdir / name,
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "meta": ocp.JsonCheckpointHandler()},
          options=ocp.CheckpointManagerOptions(
              max_to_keep=max_to_keep, create=True,
              multiprocessing_options=ocp.options.MultiprocessingOptions(
                  barrier_sync_key_prefix=name)))

    self.latest = manager("checkpoints", keep)
    self.best = manager("best", 1)
    self._closed = False

  def steps(self) -> list[int]:
    return sorted(self.latest.all_steps())

  def save(self, step: int, state: Any, meta: dict, best: bool = False) -> None:
    """Saves host (NumPy) `state` and JSON `meta` (plus the arrays' checksums) at `step`."""
    manager = self.best if best else self.latest
    meta = {**meta, "checksums": checksums(state)}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)))

  def read_meta(self, step: int, best: bool = False) -> dict:
    manager = self.best if best else self.latest
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def saved_shapes(self, step: int) -> dict[str, tuple]:
    """`shapes` of the state saved at `step`, from its metadata (no array is read)."""
    return shapes(self.latest.item_metadata(step)["state"])

  def restore(self, step: int, template: Any, best: bool = False) -> tuple[Any, dict]:
    """(state, meta) saved at `step`, shaped like `template`; ValueError if damaged."""
    manager = self.best if best else self.latest
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
    state, meta = restored["state"], restored["meta"]
    bad = damaged_arrays(state, meta.get("checksums", {}))
    if bad:
      raise ValueError(f"{len(bad)} array(s) differ from their checksums, e.g. {bad[0]}")
    return state, meta

  def restore_newest_good(self, template: Any, check_meta: Callable[[dict, bool], None]
                          ) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest checkpoint that restores and verifies.

    `check_meta(meta, fits)` runs first on each one's metadata (`fits`: whether its
    arrays have the template's shapes) and may raise (a config that does not match is the
    user's to resolve, not a damaged file); then the saved shapes must be the template's
    (else `errors.IncompatibleCheckpoint`, the checkpoint kept).
    Damaged checkpoints are reported in one line each and moved to WORKDIR/damaged/; a
    fault of the filesystem while reading one is raised, the checkpoint kept
    (`_set_aside`).
    None if none is left.
    """
    for step in reversed(self.steps()):
      try:
        meta = self.read_meta(step)
        saved = self.saved_shapes(step)
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
        continue
      differences = shape_differences(saved, shapes(template))
      check_meta(meta, not differences)
      if differences:
        raise errors.IncompatibleCheckpoint(
            f"the checkpoint of step {step} in {self.workdir} cannot be loaded with the "
            f"current settings: {'; '.join(differences[:3])}"
            f"{f' (and {len(differences) - 3} more)' if len(differences) > 3 else ''}. "
            "It is kept as it is: resume with the settings it was trained with, or use "
            "a new --workdir.")
      try:
        state, meta = self.restore(step, template)
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
        continue
      return step, state, meta
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    """Moves the checkpoint of `step`, which reading raised `error`, to WORKDIR/damaged/;
    but raises `error` where it is a fault of the filesystem (an errno other than a
    missing file: EIO, EACCES, ENOSPC, ETIMEDOUT, ...), not of the checkpoint's own
    files, so that a transient fault never sets a good checkpoint aside. A bucket's error
    without an errno still counts as damage."""
    fault = errors.filesystem_error(error)
    if fault is not None and fault.errno not in _DAMAGE_ERRNOS:
      raise error
    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(
        error).__name__
    older = [s for s in self.steps() if s < step]
    logging.warning("checkpoint of step %d is damaged (%s): moved to %s; %s", step, reason,
                    self.workdir / "damaged", f"falling back to step {older[-1]}"
                    if older else "no older checkpoint: starting from step 0")
    if jax.process_index() == 0:
      target = self.workdir / "damaged" / f"checkpoint-{step}"
      target.parent.mkdir(parents=True, exist_ok=True)
      if target.exists():
        target.rmtree()
      (self.latest.directory / str(step)).rename(target)
    self.latest.reload()

  def wait(self) -> None:
    """Waits for the pending (asynchronous) saves; raises the fault that stopped one."""
    for manager in (self.latest, self.best):
      manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending writes and closes the managers (again: nothing)."""
    if self._closed:
      return
    self._closed = True
    for manager in (self.latest, self.best):
      manager.wait_until_finished()
      manager.close()

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
