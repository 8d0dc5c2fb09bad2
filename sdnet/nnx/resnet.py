"""ResNets with stochastic depth in Flax NNX: the twins of `sdnet.models`' Linen ResNets.

The same networks (CIFAR/SVHN 6n + 2 with basic blocks and pool-and-pad shortcuts;
ImageNet bottleneck ResNets with projection shortcuts; `sdnet.models` has the design),
the same survival schedules (`sdnet.survival`), gate draws (`sdnet.gates`: one key per
call, one gate per block for the whole global batch in batch mode) and block math
(`sdnet.nnx.residual`, which shares `sdnet.residual`'s functions), and the same layout:
a stage's first block where it changes the shape ("stage2_first"), its other blocks
stacked along a leading axis ("stage2_blocks", created with `nnx.vmap`, run with
`nnx.scan`). `from_linen` turns a Linen ResNet's variables into this model's state.

    model = nnx_models.CifarResNet110(num_classes=10, rngs=nnx.Rngs(0))
    logits = model(images, key=gate_key)        # training: BatchNorm updates statistics
    model.eval(); logits = model(images)         # evaluation: every block, scaled by p_l

Skipping: "cond" (per block, inside the stage's scan; the branch keeps only its
convolutions' outputs for the backward pass, `sdnet.backend.branch_policy`) or "mask";
"auto" resolves as for a lone block (`sdnet.backend.auto_skip(stage=False)`). Stages
unroll as the Linen ResNet's (`sdnet.backend.unroll_stages`). Stage compaction
("compact") and rematerialising whole blocks (`remat=True`) are the Linen ResNet's alone;
"compact" is refused here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import re
from typing import Any, Literal

from flax import nnx
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from sdnet import backend
from sdnet import gates as gates_lib
from sdnet import models as linen_models
from sdnet import options
from sdnet import survival as survival_lib
from sdnet.nnx.residual import StochasticResidual


def _pad(kernel: int):
  return ((kernel // 2, kernel // 2),) * 2


def _named(y):
  """A convolution's output, named for remat policies (`sdnet.backend.branch_policy`)."""
  return checkpoint_name(y, linen_models.CONV_OUTPUT)


class Layers:
  """How a network builds its convolutions and BatchNorms (one place for their settings),
  drawing initial parameters from `rngs`."""

  def __init__(self, *, conv_bias: bool, dtype: Any, axis_name: str | None,
               rngs: nnx.Rngs):
    self.conv_bias, self.dtype, self.axis_name, self.rngs = conv_bias, dtype, axis_name, rngs

  def drawing_from(self, rngs: nnx.Rngs) -> Layers:
    return Layers(conv_bias=self.conv_bias, dtype=self.dtype, axis_name=self.axis_name,
                  rngs=rngs)

  def conv(self, in_features: int, features: int, kernel: int, strides: int = 1):
    return nnx.Conv(in_features, features, (kernel, kernel), (strides, strides),
                    padding=_pad(kernel), use_bias=self.conv_bias, dtype=self.dtype,
                    kernel_init=linen_models.he_normal,
                    conv_general_dilated=backend.conv_general_dilated(), rngs=self.rngs)

  def norm(self, features: int):
    return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                         axis_name=self.axis_name, rngs=self.rngs)


class BasicBranch(nnx.Module):
  """f_l of a basic block: conv3x3(stride) - BN - ReLU - conv3x3 - BN."""
  expansion = 1

  def __init__(self, in_features: int, features: int, strides: int, layers: Layers):
    self.conv1 = layers.conv(in_features, features, 3, strides)
    self.norm1 = layers.norm(features)
    self.conv2 = layers.conv(features, features, 3)
    self.norm2 = layers.norm(features)

  def __call__(self, x):
    y = nnx.relu(self.norm1(_named(self.conv1(x))))
    return self.norm2(_named(self.conv2(y)))


class BottleneckBranch(nnx.Module):
  """f_l of a bottleneck block: 1x1 - BN - ReLU - 3x3(stride) - BN - ReLU - 1x1(4x) - BN."""
  expansion = 4

  def __init__(self, in_features: int, features: int, strides: int, layers: Layers):
    self.conv1 = layers.conv(in_features, features, 1)
    self.norm1 = layers.norm(features)
    self.conv2 = layers.conv(features, features, 3, strides)
    self.norm2 = layers.norm(features)
    self.conv3 = layers.conv(features, features * 4, 1)
    self.norm3 = layers.norm(features * 4)

  def __call__(self, x):
    y = nnx.relu(self.norm1(_named(self.conv1(x))))
    y = nnx.relu(self.norm2(_named(self.conv2(y))))
    return self.norm3(_named(self.conv3(y)))


class ProjectionShortcut(nnx.Module):
  """1x1 convolution (stride) + BN, for blocks that change shape (ImageNet ResNets)."""

  def __init__(self, in_features: int, features: int, strides: int, layers: Layers):
    self.conv = layers.conv(in_features, features, 1, strides)
    self.norm = layers.norm(features)

  def __call__(self, x):
    return self.norm(_named(self.conv(x)))


class Block(StochasticResidual):
  """A residual block: its branch and shortcut built, wrapped stochastically (post-
  activation: ReLU after the addition). Called as block(x, xs) with xs = {"prob": p_l,
  "gate": b_l}, each optional: the signature `nnx.scan` runs."""

  def __init__(self, in_features: int, features: int, strides: int, *, bottleneck: bool,
               projection: bool, skip: str, scaling: options.Scaling, mode: options.Mode,
               layers: Layers):
    branch_cls = BottleneckBranch if bottleneck else BasicBranch
    out_features = features * branch_cls.expansion
    if projection:
      shortcut = ProjectionShortcut(in_features, out_features, strides, layers)
    elif strides != 1 or in_features != out_features:
      shortcut = functools.partial(linen_models.pool_and_pad_shortcut,
                                   features=out_features, strides=strides)
    else:
      shortcut = None
    # A branch in a conditional keeps its convolutions' outputs only, as the Linen
    # ResNet's (`sdnet.backend.branch_policy`).
    policy = (backend.branch_policy(linen_models.CONV_OUTPUT, gated=True)
              if skip == "cond" else None)
    super().__init__(branch_cls(in_features, features, strides, layers), shortcut=shortcut,
                     activation=nnx.relu, skip=skip, scaling=scaling, mode=mode,
                     branch_policy=policy)

  def __call__(self, x, xs=None):  # pylint: disable=arguments-differ
    xs = xs or {}
    return super().__call__(x, gate=xs.get("gate"), survival_prob=xs.get("prob", 1.0))


class ResNet(nnx.Module):
  """A post-activation ResNet whose residual blocks have stochastic depth (NNX).

  Args: as `sdnet.models.ResNet`'s, with `bottleneck` for its `branch_cls`, the input's
  channels (`in_features`) and `rngs` for the parameters; `skip` is "cond", "mask" or
  "auto" (module docstring). In training (`model.train()`, the default; `deterministic`
  False) a call takes `key=` (or explicit `gates=`, one per block, or per block and
  example in the row modes); blocks with p_l = 1 are always open (their draw is True).
  """

  def __init__(self, stage_sizes: Sequence[int], stage_features: Sequence[int], *,
               num_classes: int, bottleneck: bool = False,
               stem: Literal["cifar", "imagenet"] = "cifar", projection: bool = False,
               p_last: float = 0.5,
               survival_rule: options.SurvivalRule = options.PAPER_SURVIVAL_RULE,
               survival: tuple[float, ...] | None = None, skip: str = "auto",
               scaling: options.Scaling = "paper", mode: options.Mode = "batch",
               dtype: Any = jnp.float32, axis_name: str | None = None,
               conv_bias: bool = True, in_features: int = 3, rngs: nnx.Rngs):
    if skip == "compact":
      raise ValueError("skip='compact' (stage compaction) is the Linen ResNet's "
                       "(sdnet.models); the NNX ResNet skips per block: 'cond', 'mask' "
                       "or 'auto'.")
    linen_models.check_resnet(stage_sizes, stage_features, stem, skip, options.Skip,
                              scaling, mode)
    self.probs = tuple(float(p) for p in survival_lib.schedule(
        int(sum(stage_sizes)), p_last, survival_rule, survival))
    self.mode, self.stem, self.dtype = mode, stem, dtype
    self.deterministic = False
    self.skip = skip = "mask" if mode in options.ROW_MODES else backend.resolve_skip(
        skip, mode, stage=False)
    layers = Layers(conv_bias=conv_bias, dtype=dtype, axis_name=axis_name, rngs=rngs)
    width = stage_features[0] if stem == "cifar" else 64
    self.stem_conv = layers.conv(in_features, width, 3 if stem == "cifar" else 7,
                                 1 if stem == "cifar" else 2)
    self.stem_norm = layers.norm(width)
    block = functools.partial(Block, bottleneck=bottleneck, projection=projection,
                              skip=skip, scaling=scaling, mode=mode)
    expansion = 4 if bottleneck else 1
    layout = []  # (attribute, blocks) in order
    for stage, (size, features) in enumerate(zip(stage_sizes, stage_features)):
      strides = 1 if stage == 0 else 2
      out_features = features * expansion
      scanned = size
      if strides != 1 or projection or width != out_features:
        name = f"stage{stage + 1}_first"
        setattr(self, name, block(width, features, strides, layers=layers))
        layout.append((name, 1))
        scanned -= 1
      if scanned:
        name = f"stage{stage + 1}_blocks"
        make = functools.partial(block, out_features, features, 1)
        setattr(self, name, _stacked(
            scanned, lambda rngs, make=make: make(layers=layers.drawing_from(rngs)), rngs))
        layout.append((name, scanned))
      width = out_features
    self.layout = tuple(layout)
    self.head = nnx.Linear(width, num_classes, dtype=dtype,
                           kernel_init=linen_models.torch_linear_uniform, rngs=rngs)

  def __call__(self, x, *, key=None, gates=None):
    """Logits of images x (NHWC); `key` or `gates` decide the blocks in training."""
    probs = np.asarray(self.probs)
    if not self.deterministic:
      gates = gates_lib.resolve(key, gates, probs, self.mode, x.shape[0])
    elif key is not None:
      raise ValueError("key= draws training gates; at evaluation every block runs. "
                       "Pass gates= to evaluate a chosen sub-network.")
    elif gates is not None:
      gates = gates_lib.check_gates(gates, len(probs), self.mode, x.shape[0])
    x = nnx.relu(self.stem_norm(self.stem_conv(jnp.asarray(x, self.dtype))))
    if self.stem == "imagenet":
      x = nnx.max_pool(x, (3, 3), (2, 2), padding=_pad(3))
    start = 0
    for name, length in self.layout:
      blocks = slice(start, start + length)
      xs = {}
      if (probs[blocks] < 1).any():
        xs["prob"] = jnp.asarray(probs[blocks], jnp.float32)
      if gates is not None:
        xs["gate"] = gates[blocks]
      if name.endswith("_first"):
        x = getattr(self, name)(x, {k: v[0] for k, v in xs.items()})
      else:
        # Unrolled or not as the Linen ResNet's stages (a masked block always runs).
        unroll = backend.unroll_stages(length, remat=False,
                                       gated="gate" in xs and self.skip != "mask")
        x = _run_stacked(getattr(self, name), x, xs, unroll)
      start += length
    x = jnp.mean(x, axis=(1, 2))
    return jnp.asarray(self.head(x), jnp.float32)


def _stacked(length: int, make: Callable[[nnx.Rngs], nnx.Module],
             rngs: nnx.Rngs) -> nnx.Module:
  """`length` blocks make(rngs), their variables stacked along a leading axis (the NNX
  way to build a deep stack: `nnx.vmap` over split keys)."""
  @nnx.split_rngs(splits=length)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return make(rngs)
  return create(rngs)


def _run_stacked(blocks: nnx.Module, x, xs: dict, unroll: int | bool = 1):
  """x through stacked `blocks` with `nnx.scan`, block l reading its slice of xs."""
  @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=nnx.Carry, unroll=unroll)
  def run(block, h, block_xs):
    return block(h, block_xs)
  return run(blocks, x, xs)


def CifarResNet(depth: int, num_classes: int = 10, *, rngs: nnx.Rngs, **kwargs) -> ResNet:
  """The CIFAR/SVHN ResNet of depth 6n + 2: n basic blocks in each of 3 stages."""
  linen_models.CifarResNet(depth)  # the depth check, in one place
  n = (depth - 2) // 6
  return ResNet((n, n, n), linen_models.CIFAR_FEATURES, num_classes=num_classes,
                stem="cifar", rngs=rngs, **kwargs)


def ImageNetResNet(depth: int, num_classes: int = 1000, *, rngs: nnx.Rngs,
                   **kwargs) -> ResNet:
  """The bottleneck ImageNet ResNet (50, 101 or 152; 14 or 26) with projection shortcuts."""
  linen_models.ImageNetResNet(depth)  # the depth check, in one place
  kwargs.setdefault("conv_bias", False)
  return ResNet(linen_models.IMAGENET_STAGES[depth], (64, 128, 256, 512),
                num_classes=num_classes, bottleneck=True, stem="imagenet", projection=True,
                rngs=rngs, **kwargs)


CifarResNet8 = functools.partial(CifarResNet, 8)  # one block per stage: for tests
CifarResNet20 = functools.partial(CifarResNet, 20)
CifarResNet32 = functools.partial(CifarResNet, 32)
CifarResNet44 = functools.partial(CifarResNet, 44)
CifarResNet56 = functools.partial(CifarResNet, 56)
CifarResNet110 = functools.partial(CifarResNet, 110)  # the paper's CIFAR network
CifarResNet152 = functools.partial(CifarResNet, 152)  # the paper's SVHN network
CifarResNet1202 = functools.partial(CifarResNet, 1202)
ImageNetResNet50 = functools.partial(ImageNetResNet, 50)
ImageNetResNet101 = functools.partial(ImageNetResNet, 101)
ImageNetResNet152 = functools.partial(ImageNetResNet, 152)


def from_linen(variables: dict) -> dict:
  """A Linen ResNet's variables ({"params": ..., "batch_stats": ...}, either optional: a
  checkpoint of the experiments, or gradients) as the pure state dict of its NNX twin,
  for `nnx.replace_by_pure_dict`: the same arrays, NNX's names (a branch's Conv_i and
  BatchNorm_i are conv{i+1} and norm{i+1}; a shortcut's are conv and norm), statistics
  beside the parameters of their BatchNorm."""
  def merge(a, b):
    out = dict(a)
    for k, v in b.items():
      out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out

  def rename(tree, parent=""):
    out = {}
    for key, value in tree.items():
      match = re.fullmatch(r"(Conv|BatchNorm)_(\d+)", key)
      if match:
        key = ("conv" if match.group(1) == "Conv" else "norm") + (
            "" if parent == "shortcut" else str(int(match.group(2)) + 1))
      out[key] = rename(value, key) if isinstance(value, dict) else value
    return out
  return rename(merge(dict(variables.get("params", {})),
                      dict(variables.get("batch_stats", {}))))


def load_linen(model: ResNet, variables: dict) -> ResNet:
  """`model` holding a Linen ResNet's variables (`from_linen`); returns it."""
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, from_linen(variables))
  nnx.update(model, state)
  return model
