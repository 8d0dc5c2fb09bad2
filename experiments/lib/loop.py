"""Training and evaluation with the paper's protocol (Huang et al., 2016, Sec. 4).

Pure, pmapped steps over all local devices: cross-replica BatchNorm, gradients averaged
with `pmean`, one gate key per step that is the same on every device (the replicated seed
key folded with the step), augmentation keys that differ per device. Several steps can run
in one compiled call (`lax.scan`, "iterations per loop"); metrics accumulate on the
devices and are read only at log points.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Optional

from absl import logging
import flax
from flax import jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sdnet import checkpoint as checkpoint_lib
from sdnet import data as data_lib
from sdnet import models
from sdnet import reporting
from sdnet import survival as survival_lib

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
                axis_name: Optional[str] = AXIS) -> models.ResNet:
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


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  return int(round(config.epochs * steps_per_epoch))


def create_train_state(model, tx, image_shape, seed: int) -> TrainState:
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(seed), jnp.zeros((1,) + tuple(image_shape), jnp.float32))
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


# ------------------------------------------------------------------------ pure steps


def cross_entropy(logits, labels):
  """Softmax cross-entropy per example."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, batch: dict, metrics: dict, *, model, tx, seed_key,
               mean_image, std, augment: bool, axis_name: Optional[str] = AXIS):
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
  step_metrics = {
      "loss_sum": jnp.sum(losses),
      "correct": jnp.sum(jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32),
      "count": jnp.asarray(losses.shape[0], jnp.float32)}
  if axis_name:
    step_metrics = jax.lax.psum(step_metrics, axis_name)
  return new_state, jax.tree.map(jnp.add, metrics, step_metrics)


def train_steps(state, batches, metrics, **kwargs):
  """`train_step` over the leading (steps) axis of `batches`, in one compiled call."""
  if jax.default_backend() == "cpu":
    # XLA:CPU runs convolutions inside any loop ~20x slower: trace the steps one by one.
    for i in range(jax.tree.leaves(batches)[0].shape[0]):
      state, metrics = train_step(state, jax.tree.map(lambda a: a[i], batches), metrics,
                                  **kwargs)
    return state, metrics

  def body(carry, batch):
    return train_step(carry[0], batch, carry[1], **kwargs), None
  (state, metrics), _ = jax.lax.scan(body, (state, metrics), batches)
  return state, metrics


def empty_metrics():
  return {"loss_sum": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.float32),
          "count": jnp.zeros((), jnp.float32)}


def eval_step(state: TrainState, batch: dict, *, model, mean_image, std,
              axis_name: Optional[str] = AXIS):
  """Summed loss, correct predictions and count of one padded evaluation batch."""
  images = data_lib.normalise(batch["images"], mean_image, std)
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                       train=False)
  mask = batch["mask"]
  sums = {"loss_sum": jnp.sum(cross_entropy(logits, batch["labels"]) * mask),
          "correct": jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * mask),
          "count": jnp.sum(mask)}
  return jax.lax.psum(sums, axis_name) if axis_name else sums


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Plan:
  """Step counts of a run and the steps at which something happens."""
  steps_per_epoch: int
  total_steps: int
  eval_every: int
  log_every: int
  checkpoint_every: int
  steps_per_call: int

  def is_event(self, step: int) -> bool:
    return (step % self.eval_every == 0 or step % self.log_every == 0 or
            step % self.checkpoint_every == 0 or step == self.total_steps)

  def chunks(self, start: int, stop: int) -> list[int]:
    """Call lengths from `start` to `stop` (<= steps_per_call, never across an event)."""
    out, step = [], start
    while step < stop:
      length = 1
      while length < self.steps_per_call and step + length < stop and not self.is_event(
          step + length):
        length += 1
      out.append(length)
      step += length
    return out


def make_plan(config, num_train: int) -> Plan:
  per_epoch = data_lib.steps_per_epoch(num_train, config.batch_size)
  total = total_steps(config, per_epoch)
  eval_every = config.eval_every_steps or per_epoch
  return Plan(per_epoch, total, eval_every, config.log_every_steps or per_epoch,
              config.checkpoint_every_steps or eval_every, max(1, config.steps_per_call))


def check_config(config: ml_collections.ConfigDict) -> None:
  """Fails before anything long starts on settings that cannot work."""
  devices = jax.device_count()
  if config.batch_size % devices:
    raise ValueError(
        f"batch_size {config.batch_size} does not split over {devices} devices: choose a "
        f"multiple of {devices} (e.g. --config.batch_size={devices * max(1, config.batch_size // devices)}).")
  if config.eval_batch_size % devices:
    raise ValueError(f"eval_batch_size {config.eval_batch_size} must be a multiple of the "
                     f"{devices} devices.")
  if config.epochs <= 0:
    raise ValueError(f"epochs must be positive, got {config.epochs}.")
  if any(not 0 < f < 1 for f in config.lr_drop_fractions):
    raise ValueError(f"lr_drop_fractions must lie in (0, 1), got {config.lr_drop_fractions}.")
  if config.dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {config.dtype!r}.")


def evaluate(p_eval, state, split, config) -> dict:
  totals = None
  for batch in data_lib.eval_batches(split, config.eval_batch_size, jax.local_device_count(),
                                     jax.process_index(), jax.process_count()):
    sums = p_eval(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(jax_utils.unreplicate(totals))
  return {"error": 1.0 - totals["correct"] / totals["count"],
          "loss": totals["loss_sum"] / totals["count"]}


def pipeline_images_per_s(dataset, config, devices: int, repeats: int = 20) -> float:
  """Throughput of the input pipeline alone: host gather + transfer to the devices."""
  chunks = [max(1, config.steps_per_call)] * repeats
  batches = data_lib.train_batches(dataset.train, config.seed, config.batch_size, 0, chunks,
                                   devices, jax.process_index(), jax.process_count())
  start = time.perf_counter()
  for batch in jax_utils.prefetch_to_device(batches, 2):
    jax.block_until_ready(batch)
  return sum(chunks) * config.batch_size / (time.perf_counter() - start)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: Optional[data_lib.Dataset] = None) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns results."""
  check_config(config)
  started = time.time()
  is_chief = jax.process_index() == 0
  if dataset is None:
    dataset = data_lib.load(config.dataset, config.data_dir or None, seed=config.seed,
                            validation_size=config.validation_size,
                            augment=None if config.augment is None else config.augment)
  logging.info("data: %s", dataset.describe())
  if dataset.test is None:
    logging.warning("no test split: reporting validation error only.")
  model = build_model(config, dataset.num_classes)
  plan = make_plan(config, len(dataset.train))
  schedule = learning_rate_schedule(config, plan.steps_per_epoch)
  tx = make_optimizer(config, schedule)
  probs = model.survival_probs()
  logging.info("model: %s-%d, %d blocks, expected depth %.2f, skip=%s, %d steps (%d/epoch)",
               config.model.family, config.model.depth, model.num_blocks,
               survival_lib.expected_depth(probs), config.skip, plan.total_steps,
               plan.steps_per_epoch)

  state = create_train_state(model, tx, dataset.train.images.shape[1:], config.seed)
  state = jax.device_get(state)
  checkpoints = checkpoint_lib.Checkpoints(workdir)
  best = {"validation_error": None, "step": None, "test_error": None, "seed": config.seed}
  start_step = checkpoints.latest_step() or 0
  if start_step:
    state, best = checkpoints.restore(start_step, state)
    if best.get("seed") != config.seed:
      raise ValueError(f"{workdir} holds a run with seed {best.get('seed')}, not "
                       f"{config.seed}: use a new --workdir or the same seed.")
    logging.info("resumed from step %d", start_step)
  if is_chief:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  seed_key = jax.random.key(config.seed)
  mean_image, std = jnp.asarray(dataset.mean_image), float(dataset.std)
  step_kwargs = dict(model=model, tx=tx, seed_key=seed_key, mean_image=mean_image, std=std,
                     augment=dataset.augment)
  p_train = jax.pmap(functools.partial(train_steps, **step_kwargs), axis_name=AXIS,
                     donate_argnums=(0, 2))
  eval_model = build_model(config, dataset.num_classes, axis_name=None)
  p_eval = jax.pmap(functools.partial(eval_step, model=eval_model, mean_image=mean_image,
                                      std=std), axis_name=AXIS)

  devices = jax.local_device_count()
  pipeline_rate = pipeline_images_per_s(dataset, config, devices)
  logging.info("input pipeline alone: %.0f images/s", pipeline_rate)

  reporter = reporting.Reporter(workdir, enabled=is_chief)
  stop_step = plan.total_steps
  if config.halt_after_steps:
    stop_step = min(stop_step, config.halt_after_steps)
  state = jax_utils.replicate(state)
  metrics = jax_utils.replicate(empty_metrics())
  chunks = plan.chunks(start_step, stop_step)
  batches = jax_utils.prefetch_to_device(
      data_lib.train_batches(dataset.train, config.seed, config.batch_size, start_step,
                             chunks, devices, jax.process_index(), jax.process_count()), 2)
  step = start_step
  window_start, window_steps, train_time, train_steps_timed = time.perf_counter(), 0, 0.0, 0
  for length, batch in zip(chunks, batches):
    state, metrics = p_train(state, batch, metrics)
    step += length
    window_steps += length
    if step % plan.log_every == 0 or step == stop_step:
      totals = jax.device_get(jax_utils.unreplicate(metrics))  # the only sync per window
      elapsed = time.perf_counter() - window_start
      rate = window_steps * config.batch_size / elapsed
      if step - window_steps > start_step:  # the first window holds compilation
        train_time += elapsed
        train_steps_timed += window_steps
      train_loss = totals["loss_sum"] / totals["count"]
      reporter.progress(step=step, total_steps=plan.total_steps,
                        steps_per_epoch=plan.steps_per_epoch, loss=train_loss,
                        accuracy=totals["correct"] / totals["count"],
                        learning_rate=float(schedule(step - 1)), images_per_s=rate,
                        seconds_left=(plan.total_steps - step) * elapsed / window_steps)
      reporter.write(step, {"train/loss": train_loss,
                            "train/error": 1 - totals["correct"] / totals["count"],
                            "train/learning_rate": float(schedule(step - 1)),
                            "train/images_per_s": rate})
      metrics = jax_utils.replicate(empty_metrics())
      window_start, window_steps = time.perf_counter(), 0
    if step % plan.eval_every == 0 or step == plan.total_steps:
      val = evaluate(p_eval, state, dataset.validation, config)
      record = {"validation/error": val["error"], "validation/loss": val["loss"],
                "epoch": step / plan.steps_per_epoch}
      improved = best["validation_error"] is None or val["error"] < best["validation_error"]
      if improved:
        best.update(validation_error=float(val["error"]), step=int(step))
        if dataset.test is not None:
          best["test_error"] = float(evaluate(p_eval, state, dataset.test, config)["error"])
          record["test/error_at_best_validation"] = best["test_error"]
      reporter.write(step, record)
      logging.info("step %d: validation error %.4f (best %.4f at step %d)", step,
                   val["error"], best["validation_error"], best["step"])
      if improved:
        checkpoints.save(step, jax.device_get(jax_utils.unreplicate(state)), best, best=True)
      window_start = time.perf_counter()
    if step % plan.checkpoint_every == 0 or step == stop_step:
      checkpoints.save(step, jax.device_get(jax_utils.unreplicate(state)), best)
      window_start = time.perf_counter()

  final_state = jax.device_get(jax_utils.unreplicate(state))
  results = {"config": json.loads(config.to_json_best_effort()), "seed": config.seed,
             "dataset": dataset.describe(), "steps": int(step),
             "epochs": step / plan.steps_per_epoch, "finished": step == plan.total_steps,
             "wall_time_s": time.time() - started,
             "train_images_per_s": (train_steps_timed * config.batch_size / train_time
                                    if train_time else None),
             "seconds_per_epoch": (train_time / train_steps_timed * plan.steps_per_epoch
                                   if train_time else None),
             "pipeline_images_per_s": pipeline_rate,
             "best_validation_error": best["validation_error"],
             "best_validation_step": best["step"],
             "test_error_at_best_validation": best["test_error"],
             "expected_depth": survival_lib.expected_depth(probs),
             "num_blocks": model.num_blocks,
             "parameters": models.count_params(final_state.params)}
  if step == plan.total_steps:
    results["final_validation_error"] = float(
        evaluate(p_eval, state, dataset.validation, config)["error"])
    if dataset.test is not None:
      results["final_test_error"] = float(
          evaluate(p_eval, state, dataset.test, config)["error"])
  reporter.results(results)
  reporter.close()
  checkpoints.close()
  results["state"] = final_state
  return results
