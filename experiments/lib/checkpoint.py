"""Checkpoints with orbax: the latest ones (to resume) and the best-validation one.

Orbax writes each checkpoint into a temporary directory and renames it when complete, and
the latest two are kept, so a crash while saving never loses the previous good one.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import orbax.checkpoint as ocp


class Checkpoints:
  """`WORKDIR/checkpoints` (latest `keep` steps) and `WORKDIR/best` (one)."""

  def __init__(self, workdir: str, keep: int = 2):
    workdir = os.path.abspath(workdir)
    options = lambda n: ocp.CheckpointManagerOptions(max_to_keep=n, create=True)
    self.latest = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                        options=options(keep))
    self.best = ocp.CheckpointManager(os.path.join(workdir, "best"), options=options(1))

  def latest_step(self) -> Optional[int]:
    return self.latest.latest_step()

  def save(self, step: int, state: Any, meta: dict, best: bool = False) -> None:
    """Saves host (NumPy) `state` and JSON `meta` at `step`."""
    manager = self.best if best else self.latest
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, template: Any, best: bool = False) -> tuple[Any, dict]:
    """(state, meta) saved at `step`, shaped like `template`."""
    manager = self.best if best else self.latest
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def close(self) -> None:
    for manager in (self.latest, self.best):
      manager.wait_until_finished()
      manager.close()
