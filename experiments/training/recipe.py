"""The recipe from a config: the model, the learning-rate schedule, the optimiser.

The paper's (Huang et al., 2016, Sec. 4): SGD with Nesterov momentum 0.9 and weight decay
1e-4 as coupled L2, the learning rate divided by 10 at fixed fractions of the run (CIFAR
250/500 and 375/500 epochs, SVHN 30/50 and 35/50, ImageNet every 30 epochs), a warm-up
for ResNet-1202. The drop-path models' (DeiT, Touvron et al. 2021; ConvNeXt, Liu et al.
2022): AdamW with decoupled weight decay on the kernels, a linear warm-up then a cosine
decay, label smoothing (`experiments/configs/drop_path.py`). Every caller (the training
loop, the benchmarks, the report) builds these here.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax

import jax

from sdnet import models

# The pmap axis of the training and evaluation steps (cross-replica BatchNorm, pmean).
AXIS = "batch"

FAMILIES = ("cifar", "imagenet", "vit", "convnext")
# The drop-path families' sizes (`config.model.size`).
VIT_SIZES = {"ti": dict(hidden_size=192, depth=12, num_heads=3),
             "s": dict(hidden_size=384, depth=12, num_heads=6),
             "b": dict(hidden_size=768, depth=12, num_heads=12),
             "test": dict(hidden_size=32, depth=2, num_heads=2)}
CONVNEXT_SIZES = {"t": models.ConvNeXt_T, "s": models.ConvNeXt_S, "b": models.ConvNeXt_B,
                  "test": models.ConvNeXt_Test}


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                axis_name: str | None = AXIS):
  """The configured network (its constructor validates depth and survival settings)."""
  family, survival = config.model.family, config.survival
  dtype = jnp.dtype(config.dtype)
  if family in ("vit", "convnext"):
    kwargs = dict(num_classes=num_classes, drop_path_rate=survival.drop_path_rate,
                  mode=survival.mode, skip=config.skip, scaling=survival.scaling,
                  dtype=dtype)
    sizes = VIT_SIZES if family == "vit" else CONVNEXT_SIZES
    if config.model.size not in sizes:
      raise ValueError(f"unknown {family} size {config.model.size!r}; choose one of "
                       f"{sorted(sizes)} (--config.model.size).")
    if family == "vit":
      return models.VisionTransformer(patch_size=config.model.patch_size,
                                      **VIT_SIZES[config.model.size], **kwargs)
    return CONVNEXT_SIZES[config.model.size](**kwargs)
  kwargs = dict(
      num_classes=num_classes, p_last=survival.p_last, survival_rule=survival.rule,
      skip=config.skip, scaling=survival.scaling, mode=survival.mode, dtype=dtype,
      axis_name=axis_name, remat=config.remat)
  if family == "cifar":
    return models.CifarResNet(config.model.depth, **kwargs)
  if family == "imagenet":
    return models.ImageNetResNet(config.model.depth, **kwargs)
  raise ValueError(f"unknown model family {family!r}; choose one of {FAMILIES}.")


def describe_model(config: ml_collections.ConfigDict) -> str:
  """"cifar-110", "vit-s/4", "convnext-t": the network a config trains."""
  family = config.model.family
  if family == "vit":
    return f"vit-{config.model.size}/{config.model.patch_size}"
  if family == "convnext":
    return f"convnext-{config.model.size}"
  return f"{family}-{config.model.depth}"


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  return int(round(config.epochs * steps_per_epoch))


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """The configured schedule.

  piecewise (the paper's): lr = base_lr * drop^k after the k-th boundary (boundaries at
    `lr_drop_fractions` of the run); with a warm-up (ResNet-1202) lr = warmup_lr for the
    first warmup_epochs.
  cosine (DeiT's, ConvNeXt's): lr rises linearly from warmup_lr to base_lr over
    warmup_epochs, then lr = min_lr + (base_lr - min_lr) (1 + cos(pi t)) / 2, t the
    fraction of the remaining steps done.
  """
  total = total_steps(config, steps_per_epoch)
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=config.warmup_learning_rate if warmup else config.learning_rate,
        peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(total, warmup + 1), end_value=config.min_learning_rate)
  scales = {}
  init = config.learning_rate
  if warmup > 0:
    init = config.warmup_learning_rate
    scales[warmup] = config.learning_rate / config.warmup_learning_rate
  for fraction in config.lr_drop_fractions:
    boundary = int(round(fraction * total))
    scales[boundary] = scales.get(boundary, 1.0) * config.lr_drop_factor
  return optax.piecewise_constant_schedule(init, scales)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule):
  """sgd: coupled L2 (added to the gradient before momentum) + Nesterov SGD, as Torch's
  SGD (the paper). adamw: AdamW (beta 0.9, 0.999) with decoupled weight decay on the
  kernels only (timm's: no decay of biases, norms, layer scales, tokens, positions)."""
  if config.optimizer == "adamw":
    return optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=config.weight_decay,
                       mask=decays)
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))


def decays(params):
  """True for the parameters weight decay applies to under AdamW: kernels."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)
