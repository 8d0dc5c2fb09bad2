"""Base config: CIFAR-10, ResNet-110, stochastic depth (linear decay to p_L = 0.5).

The paper's protocol (Huang et al., 2016, Sec. 4): 500 epochs, batch 128, SGD with Nesterov
momentum 0.9, weight decay 1e-4, LR 0.1 divided by 10 after epochs 250 and 375; 45k/5k
train/validation split; per-pixel mean / global std; 4-px shift + flip augmentation.
Every other config imports this one and overrides it.
"""

import ml_collections

# Fields that do not change the trained model or its reported numbers: a restart may
# change them freely (where the data lives, how often to log or checkpoint, how steps are
# grouped into calls, how dropped blocks are skipped: the same math).
RESTART_MAY_CHANGE = frozenset({
    "data_dir", "eval_batch_size", "log_every_steps", "checkpoint_every_steps",
    "steps_per_call", "halt_after_steps", "skip", "remat", "input_workers",
})


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.dataset = "cifar10"  # a registered source: experiments.data.registered()
  config.data_dir = ""  # TFDS data_dir, or ROOT of a folder dataset
  config.validation_size = 5000  # CIFAR / folder hold-out (SVHN uses 400 + 200 per class)
  config.augment = ml_collections.FieldReference(None, field_type=bool)  # None: the paper's
  config.image_size = 224  # ImageNet: the side of the training and evaluation crops
  config.eval_resize = 256  # ImageNet evaluation: shorter side resized to this, centre crop
  config.input_workers = -1  # ImageNet: decoding processes (0: threads; -1: automatic)

  config.model = ml_collections.ConfigDict()
  config.model.family = "cifar"  # cifar (6n+2) | imagenet (50/101/152; 14/26 small) | vit | convnext
  config.model.depth = 110  # cifar and imagenet families
  config.model.size = ""  # vit: ti | s | b | test; convnext: t | s | b | test
  config.model.patch_size = 16  # vit: the side of a patch

  config.survival = ml_collections.ConfigDict()
  config.survival.p_last = 0.5  # 1.0 = constant depth
  config.survival.rule = "linear_decay"  # linear_decay | uniform
  config.survival.scaling = "paper"  # paper | inverted | none
  config.survival.mode = "batch"  # batch (the paper) | row (drop path) | subset (DINOv2)
  config.survival.drop_path_rate = 0.1  # vit / convnext: timm's linear schedule to this
  config.skip = "auto"  # auto | cond | mask | compact | gather (sdnet.backend.auto_skip)
  config.dtype = "float32"  # float32 | bfloat16 | float16
  config.remat = False

  config.batch_size = 128  # global, split over all devices
  config.epochs = 500
  config.learning_rate = 0.1
  config.lr_drop_fractions = (0.5, 0.75)  # after epochs 250 and 375 of 500
  config.lr_drop_factor = 0.1
  config.warmup_epochs = 0.0
  config.warmup_learning_rate = 0.01
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 1e-4
  config.optimizer = "sgd"  # sgd (Nesterov, coupled L2: the paper) | adamw (decoupled)
  config.schedule = "piecewise"  # piecewise (the paper) | cosine (linear warm-up, cosine)
  config.min_learning_rate = 0.0  # cosine: the rate it ends at
  config.label_smoothing = 0.0  # training loss only; evaluation reports plain cross-entropy

  config.eval_every_steps = 0  # 0: every epoch
  config.eval_batch_size = 1000
  config.test_every_eval = True  # test error at every evaluation (Fig. 3 curves)
  config.log_every_steps = 100
  config.checkpoint_every_steps = 0  # 0: at every evaluation
  config.steps_per_call = 1  # steps per compiled call ("iterations per loop")
  config.halt_after_steps = 0  # stop early (e.g. to test resuming); 0: run to the end
  config.seed = 0
  return config


def override(config: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  """`config` with `values` set, keys in dotted form ("model.depth"); returns it."""
  for dotted, value in values.items():
    *parents, leaf = dotted.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def with_values(values: dict) -> ml_collections.ConfigDict:
  """The default config with the fields of a recorded config (a nested dict, e.g. a
  run's config.json) set; fields the defaults lack are left out."""
  config = get_config()
  def merge(node: ml_collections.ConfigDict, recorded: dict) -> None:
    for key, value in recorded.items():
      if key not in node:
        continue
      if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
        merge(node[key], value)
      else:
        node[key] = tuple(value) if isinstance(value, list) else value
  merge(config, values)
  return config
