"""The paper's optimisation (Huang et al., 2016, Sec. 4) as pure, pmapped steps.

One SGD step on every local device: cross-replica BatchNorm, gradients averaged with
`pmean`, one gate key per step that is the same on every device (the replicated seed key
folded with the step), augmentation keys that differ per device. Several steps can run in
one compiled call ("iterations per loop"); their metrics accumulate on the devices and
are read only when the loop needs them.

`make_train_step` is the one builder of the compiled training step: the training loop
and the benchmark both call it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import functools
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments.lib import data as data_lib
from sdnet import backend
from sdnet import models

AXIS = "batch"
GATE_STREAM, AUGMENT_STREAM = 0, 1


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


# ------------------------------------------------------------------- model, optimiser


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                axis_name: str | None = AXIS) -> models.ResNet:
  """The configured ResNet (validates depth and survival settings)."""
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

  lr = base_lr * drop^k after the k-th boundary (boundaries at fractions of the run:
  CIFAR 250/500 and 375/500 epochs, SVHN 30/50 and 35/50); with a warm-up (ResNet-1202)
  lr = warmup_lr for the first warmup_epochs.
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


def create_train_state(model, tx, image_shape, seed: int) -> TrainState:
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(seed), jnp.zeros((1,) + tuple(image_shape), jnp.float32))
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


# -------------------------------------------------------------------------- metrics

# Every metric the train step accumulates, with how two partial values combine. The
# loop reads them only at its events, so checking them costs no extra host sync.
TRAIN_METRICS: Mapping[str, Callable] = {
    "loss_sum": jnp.add,        # summed softmax cross-entropy
    "correct": jnp.add,         # examples classified right
    "count": jnp.add,           # examples seen
    "steps": jnp.add,           # train steps taken
    "first_block_grad_abs": jnp.add,  # sum over steps of mean |dL/dW| (paper, Fig. 7)
    "first_nonfinite_step": jnp.minimum,  # first step with a non-finite loss or gradient
}
NO_NONFINITE_STEP = np.iinfo(np.int32).max


def empty_metrics() -> dict:
  metrics = {name: jnp.zeros((), jnp.float32) for name in TRAIN_METRICS}
  metrics["first_nonfinite_step"] = jnp.asarray(NO_NONFINITE_STEP, jnp.int32)
  return metrics


def accumulate(metrics: dict, step_metrics: dict) -> dict:
  return {name: combine(metrics[name], step_metrics[name])
          for name, combine in TRAIN_METRICS.items()}


def summarize(totals: Mapping[str, Any]) -> dict:
  """Mean loss and error (and, for training, mean first-block |gradient|) of summed
  metrics; the same summary for training windows and evaluation."""
  totals = {k: np.asarray(v) for k, v in totals.items()}
  count = float(totals["count"])
  summary = {"loss": float(totals["loss_sum"]) / count,
             "error": 1.0 - float(totals["correct"]) / count, "count": count}
  if "steps" in totals:
    summary["first_block_grad_abs"] = float(totals["first_block_grad_abs"]) / float(
        totals["steps"])
  return summary


def first_block_kernel(params) -> jax.Array:
  """The first convolution of the first residual block (the paper's Fig. 7 layer).

  In a scanned stage its kernel is stacked along a leading block axis: take block 1.
  """
  stage = params.get("stage1_first") or params["stage1_blocks"]
  kernel = stage["branch"]["Conv_0"]["kernel"]
  return kernel if "stage1_first" in params else kernel[0]


def cross_entropy(logits, labels):
  """Softmax cross-entropy per example."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


# ------------------------------------------------------------------------ pure steps


def train_step(state: TrainState, batch: dict, metrics: dict, *, model, tx, seed_key,
               mean_image, std, augment: bool, axis_name: str | None = AXIS):
  """One SGD step on this device's share of the global batch.

  The gate key depends only on (seed, step): identical on every device, as the paper's
  one-mask-per-mini-batch and cross-replica BatchNorm require.
  """
  gate_key = jax.random.fold_in(jax.random.fold_in(seed_key, GATE_STREAM), state.step)
  images = data_lib.normalise(batch["images"], mean_image, std)
  if augment:
    device = jax.lax.axis_index(axis_name) if axis_name else 0
    aug_key = jax.random.fold_in(
        jax.random.fold_in(jax.random.fold_in(seed_key, AUGMENT_STREAM), state.step), device)
    images = data_lib.augment(aug_key, images)

  def loss_fn(params):
    logits, new_state = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        key=gate_key, mutable=["batch_stats"])
    losses = cross_entropy(logits, batch["labels"])
    return jnp.mean(losses), (logits, losses, new_state["batch_stats"])

  grads, (logits, losses, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  if axis_name:
    grads = jax.lax.pmean(grads, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state)
  sums = {"loss_sum": jnp.sum(losses),
          "correct": jnp.sum(jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32),
          "count": jnp.asarray(losses.shape[0], jnp.float32)}
  if axis_name:
    sums = jax.lax.psum(sums, axis_name)
  finite = jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(optax.tree.norm(grads))
  step_metrics = {
      **sums, "steps": jnp.ones((), jnp.float32),
      "first_block_grad_abs": jnp.mean(jnp.abs(first_block_kernel(grads))),
      "first_nonfinite_step": jnp.where(finite, NO_NONFINITE_STEP, state.step + 1)}
  return new_state, accumulate(metrics, step_metrics)


def train_steps(state, batches, metrics, **kwargs):
  """`train_step` over the leading (steps) axis of `batches`, in one compiled call."""
  def body(carry, batch):
    return train_step(carry[0], batch, carry[1], **kwargs), None
  (state, metrics), _ = jax.lax.scan(body, (state, metrics), batches)
  return state, metrics


def eval_step(state: TrainState, batch: dict, *, model, mean_image, std,
              axis_name: str | None = AXIS):
  """Summed loss, correct predictions and count of one padded evaluation batch."""
  images = data_lib.normalise(batch["images"], mean_image, std)
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                       train=False)
  mask = batch["mask"]
  sums = {"loss_sum": jnp.sum(cross_entropy(logits, batch["labels"]) * mask),
          "correct": jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * mask),
          "count": jnp.sum(mask)}
  return jax.lax.psum(sums, axis_name) if axis_name else sums


# -------------------------------------------------------------- the compiled steps


def make_train_step(model, tx, *, seed: int, mean_image, std: float, augment: bool):
  """The training step as every caller runs it: `train_steps` pmapped over the local
  devices, state and metrics donated. Called as (state, batches, metrics)."""
  step = functools.partial(train_steps, model=model, tx=tx, seed_key=jax.random.key(seed),
                           mean_image=jnp.asarray(mean_image), std=float(std),
                           augment=augment)
  return jax.pmap(step, axis_name=AXIS, donate_argnums=(0, 2))


def make_eval_step(model, *, mean_image, std: float):
  """`eval_step` pmapped over the local devices; `model` without a BatchNorm axis."""
  return jax.pmap(functools.partial(eval_step, model=model, mean_image=jnp.asarray(mean_image),
                                    std=float(std)), axis_name=AXIS)


def compile_ahead(pmapped, *args) -> tuple[Any, float]:
  """(compiled, seconds): `pmapped` compiled for the shapes of `args` (arrays or
  `jax.ShapeDtypeStruct`s), so compile time is measured apart from run time; with the
  backend's compiler options (`sdnet.backend.compiler_options`)."""
  start = time.perf_counter()
  compiled = pmapped.lower(*args).compile(compiler_options=backend.compiler_options())
  return compiled, time.perf_counter() - start
