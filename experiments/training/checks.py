"""Settings that cannot work, refused before anything long starts (one line each)."""

from __future__ import annotations

import math
import os

import jax
import ml_collections

from experiments.runtime import errors
from experiments.training import recipe
from sdnet import options

DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("piecewise", "cosine")
# Decoding processes beyond this many a core only fill the memory (each holds its own
# interpreter, ~200 MB): a user asking more made a typo.
MAX_WORKERS_PER_CORE = 4

# name: (lowest, highest, whether the lowest is allowed); None: the number of epochs.
_RANGES = {
    "learning_rate": (0.0, math.inf, False), "warmup_learning_rate": (0.0, math.inf, False),
    "lr_drop_factor": (0.0, 1.0, False), "momentum": (0.0, 1.0, True),
    "weight_decay": (0.0, 1.0, True), "warmup_epochs": (0.0, None, True)}


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises `errors.UserError` on settings that cannot work, naming the field."""
  devices = jax.device_count()
  for name in ("batch_size", "eval_batch_size"):
    value = config[name]
    if not isinstance(value, int) or value < 1:
      raise errors.UserError(f"{name} must be a positive integer, got {value!r}.")
    if value % devices:
      raise errors.UserError(
          f"{name} {value} does not split over {devices} devices: choose a multiple of "
          f"{devices} (e.g. --config.{name}={devices * max(1, value // devices)}).")
  if config.epochs <= 0:
    raise errors.UserError(f"epochs must be positive, got {config.epochs}.")
  for name, (low, high, low_allowed) in _RANGES.items():
    high = config.epochs if high is None else high
    value = config[name]
    if not (isinstance(value, (int, float)) and math.isfinite(value)
            and (low <= value if low_allowed else low < value) and value <= high):
      raise errors.UserError(
          f"{name} must be a finite number in {'[' if low_allowed else '('}{low:g}, "
          f"{high:g}{')' if math.isinf(high) else ']'}, got {value!r}.")
  if any(not 0 < f < 1 for f in config.lr_drop_fractions):
    raise errors.UserError(
        f"lr_drop_fractions must lie in (0, 1), got {config.lr_drop_fractions}.")
  for name, value, allowed in (
      ("model.family", config.model.family, recipe.FAMILIES),
      ("optimizer", config.optimizer, OPTIMIZERS), ("schedule", config.schedule, SCHEDULES),
      ("survival.mode", config.survival.mode, options.choices(options.Mode))):
    if value not in allowed:
      raise errors.UserError(f"{name} must be one of {', '.join(allowed)}, got {value!r}.")
  for name, value, high in (("label_smoothing", config.label_smoothing, 1.0),
                            ("survival.drop_path_rate", config.survival.drop_path_rate, 1.0)):
    if not (isinstance(value, (int, float)) and 0 <= value < high):
      raise errors.UserError(f"{name} must be a number in [0, {high:g}), got {value!r}.")
  value = config.min_learning_rate
  if not (isinstance(value, (int, float)) and 0 <= value <= config.learning_rate):
    raise errors.UserError(
        f"min_learning_rate must be a number in [0, learning_rate = "
        f"{config.learning_rate:g}], got {value!r}.")
  if config.dtype not in DTYPES:
    raise errors.UserError(f"dtype must be float32, bfloat16 or float16, got {config.dtype!r}.")
  for name in ("eval_every_steps", "log_every_steps", "checkpoint_every_steps",
               "halt_after_steps", "steps_per_call"):
    if config[name] < 0:
      raise errors.UserError(f"{name} must be >= 0, got {config[name]}.")
  if config.image_size < 1 or config.eval_resize < config.image_size:
    raise errors.UserError(
        f"image_size must be >= 1 and eval_resize >= image_size (the evaluation crop is "
        f"cut from the resized image), got {config.image_size} and {config.eval_resize}.")
  most = MAX_WORKERS_PER_CORE * (os.cpu_count() or 1)
  if not -1 <= config.input_workers <= most:
    raise errors.UserError(
        f"input_workers must be in [-1, {most}] ({MAX_WORKERS_PER_CORE} processes a "
        f"core of this host; -1: automatic, 0: threads), got {config.input_workers}.")
