"""The paper's reference numbers: Huang et al., "Deep Networks with Stochastic Depth",
ECCV 2016.

Test error (%) from Table 1 (CIFAR-10+, CIFAR-100+, SVHN; "+" is the standard
augmentation), and from Sec. 4 for the 1202-layer ResNet on CIFAR-10+; training times
from Table 2. Stochastic depth there is the linear decay rule with p_L = 0.5; p_L = 1
is constant depth. The paper gives no number for any other p_L, rule, depth or dataset.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import os
import re
from typing import Any

from sdnet import options

P_LAST = 0.5  # the paper's stochastic-depth setting (Sec. 4)
RULE = options.PAPER_SURVIVAL_RULE


@dataclasses.dataclass(frozen=True)
class Setting:
  """One dataset and depth of the paper: its schedule, errors and training times."""
  name: str  # as the paper writes it
  dataset: str  # this project's dataset name
  depth: int
  epochs: int
  constant_error: float  # test error, percent
  stochastic_error: float
  constant_train_s: float | None = None  # Table 2
  stochastic_train_s: float | None = None
  augmented: bool = True


def _hours(hours: int, minutes: int) -> float:
  return 3600.0 * hours + 60.0 * minutes


SETTINGS = (
    Setting("CIFAR-10+", "cifar10", 110, 500, 6.41, 5.25,
            _hours(20, 42), _hours(15, 7)),
    Setting("CIFAR-100+", "cifar100", 110, 500, 27.22, 24.98,
            _hours(20, 51), _hours(15, 20)),
    Setting("SVHN", "svhn_cropped", 152, 50, 1.80, 1.75,
            _hours(33, 43), _hours(25, 33), augmented=False),
    Setting("CIFAR-10+ (1202 layers)", "cifar10", 1202, 300, 6.67, 4.91),
)


@dataclasses.dataclass(frozen=True)
class Match:
  """The paper's setting a run compares to (None if none) and why it may not compare."""
  setting: Setting | None
  notes: tuple[str, ...] = ()


def find(dataset: str, depth: int) -> Setting | None:
  """The paper's setting for this project's `dataset` name and ResNet `depth`."""
  for setting in SETTINGS:
    if setting.dataset == dataset and setting.depth == depth:
      return setting
  return None


def _reported(setting: Setting | None, p_last: float, rule: str, quantity: str):
  """The paper's `{stochastic,constant}_{quantity}` for a run at `p_last` and `rule`: the
  constant-depth figure at p_L = 1, the stochastic one at the paper's p_L and rule, else
  None (the paper reports no other)."""
  if setting is None:
    return None
  if p_last == 1.0:
    return getattr(setting, f"constant_{quantity}")
  if abs(p_last - P_LAST) < 1e-9 and rule == RULE:
    return getattr(setting, f"stochastic_{quantity}")
  return None


def error(setting: Setting | None, p_last: float, rule: str) -> float | None:
  """The paper's test error (%) at survival `p_last` and `rule`, or None."""
  return _reported(setting, p_last, rule, "error")


def train_seconds(setting: Setting | None, p_last: float, rule: str) -> float | None:
  """The paper's total training time (Table 2) at `p_last` and `rule`, or None."""
  return _reported(setting, p_last, rule, "train_s")


def _folder_stands_for(data_dir: str, description: str) -> str | None:
  """The paper's dataset a folder dataset's name says it copies ("cifar10", "cifar100")."""
  name = os.path.basename(os.path.normpath(data_dir)) if data_dir else ""
  if not name and description.startswith("folder:"):
    name = description.split(":")[1]
  name = re.sub(r"[^a-z0-9]", "", name.lower())
  if "cifar100" in name:
    return "cifar100"
  if "cifar10" in name:
    return "cifar10"
  return None


def match(config: Mapping[str, Any], description: str = "") -> Match:
  """The paper's setting for a run's config (a dict), with notes where they differ.

  A folder dataset whose name says CIFAR-10/100 gets that setting, noted as other data;
  fewer epochs than the paper's schedule are noted as not comparable.
  """
  dataset, depth = config.get("dataset", ""), config.get("model", {}).get("depth")
  notes = []
  if dataset == "folder":
    stands_for = _folder_stands_for(config.get("data_dir", ""), description)
    if stands_for is None:
      return Match(None)
    notes.append(f"folder data: the paper's number is on {stands_for}; data may differ")
    dataset = stands_for
  setting = find(dataset, depth)
  if setting is None:
    return Match(None)
  if config.get("model", {}).get("family", "cifar") != "cifar":
    return Match(None)
  augment = config.get("augment")
  if augment is not None and bool(augment) != setting.augmented:
    notes.append(f"{'with' if augment else 'without'} augmentation, unlike the paper")
  epochs = config.get("epochs")
  if epochs is not None and epochs < setting.epochs:
    notes.append(f"{epochs:g} of {setting.epochs} epochs: not comparable")
  return Match(setting, tuple(notes))
