"""The paper's recipe from a config: the model, the learning-rate schedule, the optimiser.

Huang et al. (2016), Sec. 4: SGD with Nesterov momentum 0.9 and weight decay 1e-4 as
coupled L2, the learning rate divided by 10 at fixed fractions of the run (CIFAR 250/500
and 375/500 epochs, SVHN 30/50 and 35/50, ImageNet every 30 epochs), a warm-up for
ResNet-1202. Every caller (the training loop, the benchmarks, the report) builds these
here.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax

from sdnet import models

# The pmap axis of the training and evaluation steps (cross-replica BatchNorm, pmean).
AXIS = "batch"


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                axis_name: str | None = AXIS) -> models.ResNet:
  """The configured ResNet (its constructor validates depth and survival settings)."""
  kwargs = dict(
      num_classes=num_classes, p_last=config.survival.p_last,
      survival_rule=config.survival.rule, skip=config.skip,
      scaling=config.survival.scaling, dtype=jnp.dtype(config.dtype),
      axis_name=axis_name, remat=config.remat)
  if config.model.family == "cifar":
    return models.CifarResNet(config.model.depth, **kwargs)
  if config.model.family == "imagenet":
    return models.ImageNetResNet(config.model.depth, **kwargs)
  raise ValueError(f"unknown model family {config.model.family!r}; use 'cifar' or 'imagenet'.")


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  return int(round(config.epochs * steps_per_epoch))


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """The paper's piecewise-constant schedule.

  lr = base_lr * drop^k after the k-th boundary (boundaries at `lr_drop_fractions` of
  the run); with a warm-up (ResNet-1202) lr = warmup_lr for the first warmup_epochs.
  """
  total = total_steps(config, steps_per_epoch)
  scales = {}
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  init = config.learning_rate
  if warmup > 0:
    init = config.warmup_learning_rate
    scales[warmup] = config.learning_rate / config.warmup_learning_rate
  for fraction in config.lr_drop_fractions:
    boundary = int(round(fraction * total))
    scales[boundary] = scales.get(boundary, 1.0) * config.lr_drop_factor
  return optax.piecewise_constant_schedule(init, scales)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule):
  """Coupled L2 (added to the gradient before momentum) + Nesterov SGD, as Torch's SGD."""
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
