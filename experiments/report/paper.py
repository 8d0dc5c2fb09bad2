"""The paper's reference numbers: Huang et al., "Deep Networks with Stochastic Depth",
ECCV 2016.

Test error (%) from Table 1 (CIFAR-10+, CIFAR-100+, SVHN; "+" is the standard
augmentation), and from Sec. 4 for the 1202-layer ResNet on CIFAR-10+ and for ImageNet
(ResNet-152, top-1 error on the 50,000 validation images, which is what the paper
reports there: ImageNet has no public test labels), after 90 epochs and after 120;
training times from Table 2. Stochastic depth there is the linear decay rule with
p_L = 0.5; p_L = 1 is constant depth. The paper gives no number for any other p_L,
rule, depth or dataset.
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
  constant_error: float  # test error (ImageNet: top-1 validation error), percent
  stochastic_error: float
  constant_train_s: float | None = None  # Table 2
  stochastic_train_s: float | None = None
  augmented: bool = True
  family: str = "cifar"


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
    Setting("ImageNet (90 epochs)", "imagenet", 152, 90, 23.06, 23.38, family="imagenet"),
    Setting("ImageNet (120 epochs)", "imagenet", 152, 120, 21.78, 21.98,
            family="imagenet"),
)
IMAGENET_DATASETS = ("imagenet2012", "imagenet_folder")
ILSVRC_2012 = "1281167 train, 50000 validation, no test split, 1000 classes"


@dataclasses.dataclass(frozen=True)
class Match:
  """The paper's setting a run compares to (None if none) and why it may not compare."""
  setting: Setting | None
  notes: tuple[str, ...] = ()


def find(dataset: str, depth: int, epochs: float | None = None,
         family: str = "cifar") -> Setting | None:
  """The paper's setting for this project's `dataset` name and ResNet `family` and
  `depth`; of several schedules (ImageNet's 90 and 120 epochs) the longest that `epochs`
  reaches, else the shortest."""
  if dataset in IMAGENET_DATASETS:
    dataset = "imagenet"
  found = sorted((s for s in SETTINGS if (s.dataset, s.depth, s.family)
                  == (dataset, depth, family)), key=lambda s: s.epochs)
  reached = [s for s in found if epochs is not None and s.epochs <= epochs]
  return (reached or found or [None])[-1 if reached else 0]


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

  A folder dataset whose name says CIFAR-10/100 gets that setting, noted as other data
  (an ImageNet folder: unless its description is ILSVRC-2012's); fewer epochs than the
  paper's schedule are noted as not comparable.
  """
  dataset, model = config.get("dataset", ""), config.get("model", {})
  notes = []
  if dataset == "folder":
    stands_for = _folder_stands_for(config.get("data_dir", ""), description)
    if stands_for is None:
      return Match(None)
    notes.append(f"folder data: the paper's number is on {stands_for}; data may differ")
    dataset = stands_for
  if dataset == "imagenet_folder" and ILSVRC_2012 not in description:
    notes.append("an image folder: the paper's number is on ILSVRC-2012; data may differ")
  epochs = config.get("epochs")
  setting = find(dataset, model.get("depth"), epochs, model.get("family", "cifar"))
  if setting is None:
    return Match(None)
  augment = config.get("augment")
  if augment is not None and bool(augment) != setting.augmented:
    notes.append(f"{'with' if augment else 'without'} augmentation, unlike the paper")
  if epochs is not None and epochs < setting.epochs:
    notes.append(f"{epochs:g} of {setting.epochs} epochs: not comparable")
  return Match(setting, tuple(notes))
