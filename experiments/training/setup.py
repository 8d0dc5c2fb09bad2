"""What a run trains (`Setup`): the data and the model, plan, schedule and optimiser its
config builds; the state it starts from; its compiled train step."""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import jax
import ml_collections
import optax

from experiments import data
from experiments.runtime import errors
from experiments.runtime import multihost
from experiments.training import checkpoints as checkpoints_lib
from experiments.training import plan as plan_lib
from experiments.training import recipe
from experiments.training import resume
from experiments.training import steps
from sdnet import survival as survival_lib


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a run trains: its config and data, and the model (with a cross-replica
  BatchNorm axis; `eval_model` without), plan, schedule and optimiser built from them."""
  config: ml_collections.ConfigDict
  source: data.Source
  identity: dict  # the source's identity, what a restart compares
  model: Any  # models.ResNet, VisionTransformer or ConvNeXt
  eval_model: Any
  plan: plan_lib.Plan
  schedule: optax.Schedule
  tx: optax.GradientTransformation

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, source: data.Source) -> Setup:
    """The setup of `config` on `source`, the same on every host (else a UserError
    naming the processes and fields that differ)."""
    logging.info("data: %s", source.describe())
    identity = source.identity()
    multihost.agree_on({  # (a host's data_dir may be a local copy of its own)
        **{f"setting {k}": v for k, v in resume.flatten(resume.config_dict(config)).items()
           if k != "data_dir"},
        **{f"data {k}": v for k, v in identity.items() if k != "name"}})
    try:
      model = recipe.build_model(config, source.num_classes)
      eval_model = recipe.build_model(config, source.num_classes, axis_name=None)
    except ValueError as e:
      raise errors.UserError(f"model: {e}") from None
    plan = plan_lib.Plan.of(config, source.num_train)
    schedule = recipe.learning_rate_schedule(config, plan.steps_per_epoch)
    probs = model.survival_probs()
    skip = (model.stage_skip() if hasattr(model, "stage_skip") else config.skip)
    logging.info("model: %s, %d stochastic blocks, expected depth %.2f, skip=%s; %d steps "
                 "(%d/epoch)", recipe.describe_model(config), len(probs),
                 survival_lib.expected_depth(probs),
                 skip if min(probs) < 1 else "none (every p_l = 1)",
                 plan.total_steps, plan.steps_per_epoch)
    return cls(config, source, identity, model, eval_model, plan, schedule,
               recipe.make_optimizer(config, schedule))

  @property
  def top5(self) -> bool:
    """Whether evaluations report top-5 error too (the paper's ImageNet experiment)."""
    return self.config.model.family == "imagenet"


def restore_or_initialise(setup: Setup, checkpoints: checkpoints_lib.Checkpoints,
                          allow_config_change: bool) -> tuple[int, Any, resume.Record]:
  """(step, host state, record) to start from: the newest good checkpoint's, else the
  initial state; every host starts from the same step."""
  config, identity = setup.config, setup.identity
  state = jax.device_get(steps.create_train_state(setup.model, setup.tx,
                                                  setup.source.image_shape, config.seed))
  restored = resume.restore(checkpoints, state, config, identity, allow_config_change)
  step = multihost.agree_on_start_step(restored[0] if restored else 0)
  if restored is None:
    return step, state, resume.Record(resume.config_dict(config), config.seed, data=identity)
  logging.info("resumed from step %d", step)
  return restored


def compile_train_steps(setup: Setup, state, metrics, lengths) -> dict:
  """The train step compiled ahead of time for every call length the plan uses.

  On several processes JAX's pmap cannot run an ahead-of-time compiled step on this
  process's (host-local) arrays: there each length maps to the pmapped step itself,
  which compiles on its first call (its compile time is then booked as train time).
  """
  source = setup.source
  p_train = steps.make_train_step(setup.model, setup.tx, seed=setup.config.seed,
                                  preprocess=source.preprocess,
                                  label_smoothing=setup.config.label_smoothing)
  if jax.process_count() > 1:
    return {length: p_train for length in lengths}
  shard = data.Shard.of_this_process()
  _, per_device = shard.rows(setup.config.batch_size)
  compiled = {}
  for length in sorted(lengths):
    batch = source.batch_spec((shard.devices, length, per_device), train=True)
    compiled[length] = steps.compile_ahead(p_train, state, batch, metrics)[0]
  return compiled
