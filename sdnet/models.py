"""ResNets with stochastic depth (Huang et al., ECCV 2016), Flax Linen.

CIFAR/SVHN ResNets of depth 6n + 2 (He et al., 2016; the paper's Sec. 4): a 3x3 stem,
three stages of n post-activation basic blocks with 16/32/64 filters at 32/16/8 px, global
average pooling and a dense layer. The first block of stages 2 and 3 halves the resolution;
its shortcut is a 2x2 average pool (stride 2) followed by zero channels (option A, no 1x1
convolution). The authors' published runs subsampled with a 1x1 pool of stride 2; a later
fix of their code made it a true 2x2 average, which is what this module does.

ImageNet ResNets 50/101/152 use bottleneck blocks with projection shortcuts (Sec. 4).

Every residual block, transition blocks included, is a `StochasticResidual`; the stem
never drops. The same-shape blocks of a stage run under `nn.scan` with stacked parameters
(leading axis = block), so the compiled program holds a few blocks whatever the depth.

    model = CifarResNet110(num_classes=10)
    variables = model.init(jax.random.key(0), x, train=False)
    logits, state = model.apply(variables, x, train=True, key=gate_key,
                                mutable=["batch_stats"])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
from typing import Any, Literal
import warnings

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from sdnet import backend
from sdnet import compaction
from sdnet import gates as gates_lib
from sdnet import options
from sdnet import residual as residual_lib
from sdnet import survival as survival_lib

ModuleDef = Any

# He-normal, std = sqrt(2 / fan_in) (untruncated), as in the authors' Torch code.
he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# Torch's default for nn.Linear weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_uniform = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


# The name of a branch convolution's output, for remat policies (`backend.branch_policy`).
CONV_OUTPUT = "sdnet.branch_conv_output"


def _named(y):
  return checkpoint_name(y, CONV_OUTPUT)


def _pad(kernel: int):
  return ((kernel // 2, kernel // 2),) * 2


class BasicBranch(nn.Module):
  """f_l of a basic block: conv3x3(stride) - BN - act - conv3x3 - BN."""
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable

  names_conv_outputs = True  # its convolutions' outputs carry CONV_OUTPUT

  @nn.compact
  def __call__(self, x):
    y = _named(self.conv(self.features, (3, 3), (self.strides,) * 2, padding=_pad(3))(x))
    y = self.act(self.norm()(y))
    y = _named(self.conv(self.features, (3, 3), padding=_pad(3))(y))
    return self.norm()(y)


class BottleneckBranch(nn.Module):
  """f_l of a bottleneck block: 1x1 - BN - act - 3x3(stride) - BN - act - 1x1(4x) - BN."""
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  expansion: int = 4

  names_conv_outputs = True  # its convolutions' outputs carry CONV_OUTPUT

  @nn.compact
  def __call__(self, x):
    y = self.act(self.norm()(_named(self.conv(self.features, (1, 1))(x))))
    y = _named(self.conv(self.features, (3, 3), (self.strides,) * 2, padding=_pad(3))(y))
    y = self.act(self.norm()(y))
    y = _named(self.conv(self.features * self.expansion, (1, 1))(y))
    return self.norm()(y)


def pool_and_pad_shortcut(x, features: int, strides: int):
  """Parameter-free shortcut: 2x2 average pool (stride 2), then zero channels appended."""
  if strides != 1:
    x = nn.avg_pool(x, (strides, strides), (strides, strides))
  extra = features - x.shape[-1]
  if extra > 0:
    x = jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (extra,), x.dtype)], axis=-1)
  return x


class ProjectionShortcut(nn.Module):
  """1x1 convolution (stride) + BN, for blocks that change shape (ImageNet ResNets)."""
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    # Named so that a policy around the whole block keeps it (`backend.branch_policy`).
    return self.norm()(_named(self.conv(self.features, (1, 1), (self.strides,) * 2)(x)))


class Block(nn.Module):
  """One residual block: builds its branch and shortcut, wraps them stochastically.

  Called as block(x, xs) -> (y, None) so that the same class serves `nn.scan`, where
  xs = {"prob": p_l, "gate": b_l} holds this block's slice of the per-block arrays.
  """
  branch_cls: ModuleDef
  features: int
  strides: int
  projection: bool
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  train: bool
  skip: options.Skip
  scaling: options.Scaling
  mode: options.Mode
  gated_branch_policy: Callable | None = None  # remat policy of a branch in a cond
  # ... and of one that always runs, where the caller does not wrap the whole block
  plain_branch_policy: Callable | None = None

  @nn.compact
  def __call__(self, x, xs):
    branch_cls = self.branch_cls
    in_cond = (not isinstance(xs.get("gate", True), bool)
               and residual_lib.resolve_skip(self.skip, self.mode) == "cond")
    masked = (not isinstance(xs.get("gate", True), bool)
              and residual_lib.resolve_skip(self.skip, self.mode) == "mask")
    policy = self.gated_branch_policy if in_cond else (
        None if masked else self.plain_branch_policy)
    if policy is not None:
      branch_cls = nn.remat(branch_cls, policy=policy)
    branch = branch_cls(features=self.features, strides=self.strides,
                        conv=self.conv, norm=self.norm, act=self.act, name="branch")
    out_features = self.features * getattr(self.branch_cls, "expansion", 1)
    if self.projection:
      shortcut = ProjectionShortcut(out_features, self.strides, self.conv, self.norm,
                                    name="shortcut")
    elif self.strides != 1 or x.shape[-1] != out_features:
      shortcut = functools.partial(pool_and_pad_shortcut, features=out_features,
                                   strides=self.strides)
    else:
      shortcut = None
    y = residual_lib.StochasticResidual(
        branch=branch, shortcut=shortcut, activation=self.act, skip=self.skip,
        scaling=self.scaling, mode=self.mode, name="residual")(
            x, train=self.train, survival_prob=xs.get("prob", 1.0),
            gate=xs.get("gate"))
    return y, None


def check_resnet(stage_sizes, stage_features, stem, skip, skips, scaling, mode) -> None:
  """ValueError for a ResNet's (Linen's or NNX's) stages, stem, skip (one of the Literal
  type `skips`), scaling or mode that cannot work, in one line each."""
  if len(stage_sizes) != len(stage_features) or min(stage_sizes) < 1:
    raise ValueError("stage_sizes and stage_features must have one positive entry per "
                     f"stage, got {stage_sizes} and {stage_features}.")
  if stem not in ("cifar", "imagenet"):
    raise ValueError(f"unknown stem {stem!r}; choose 'cifar' or 'imagenet'.")
  options.check("skip implementation", skip, skips)
  options.check("scaling rule", scaling, options.Scaling)
  options.check("mode", mode, options.Mode)
  options.check_skip_for_mode(skip, mode)
  if mode in options.ROW_MODES and skip == "gather":
    raise ValueError(
        "skip='gather' runs a branch on the kept examples only, and a ResNet's branches "
        "hold BatchNorm, whose batch statistics would then differ from masking's: use "
        "skip='mask' (or 'auto') with per-example gates.")


class ResNet(nn.Module):
  """A post-activation ResNet whose residual blocks have stochastic depth.

  Attributes:
    stage_sizes: blocks per stage.
    stage_features: branch width per stage (bottleneck output is 4x this).
    branch_cls: BasicBranch or BottleneckBranch.
    stem: "cifar" (conv3x3-BN-act) or "imagenet" (conv7x7/2-BN-act-maxpool3x3/2).
    projection: projection shortcuts (ImageNet) instead of pool + zero channels (CIFAR).
    p_last: survival probability p_L of the last block; 1 is constant depth.
    survival_rule: "linear_decay" (the paper's default) or "uniform".
    survival: explicit per-block survival probabilities (overrides the two above).
    skip: "cond" or "mask" per block (`sdnet.residual`), "compact" per stage
      (`sdnet.compaction`: a stage's survivors run in a few fixed-length scans), or
      "auto" (`sdnet.backend.auto_skip`). All give the same math.
    scaling: "paper" (branch x p_l at test), "inverted" (branch / p_l in training), "none".
    mode: "batch" (one gate per block and mini-batch, the paper), "row" (per example) or
      "subset" (exactly round(p_l * B) examples per block; `sdnet.options.Mode`).
    dtype: computation dtype (parameters and BatchNorm statistics stay float32).
    axis_name: the pmap/shard_map axis for cross-replica BatchNorm, or None.
    conv_bias: convolutions carry a bias (the authors' CIFAR code does).
    conv: the convolution module (called like `nn.Conv`); None: `nn.Conv` computing with
      `sdnet.backend.conv_general_dilated()` (on CPU, `sdnet.conv`'s gradients).
    remat: rematerialise each block in the backward pass (saves memory, costs compute).
    scan_unroll: blocks per iteration of each stage's scan, True for all, or "auto"
      (`sdnet.backend.unroll_stages`).
  """
  stage_sizes: Sequence[int]
  stage_features: Sequence[int]
  branch_cls: ModuleDef
  num_classes: int
  stem: Literal["cifar", "imagenet"] = "cifar"
  projection: bool = False
  p_last: float = 0.5
  survival_rule: options.SurvivalRule = options.PAPER_SURVIVAL_RULE
  survival: tuple[float, ...] | None = None
  skip: options.StageSkip = "auto"
  scaling: options.Scaling = "paper"
  mode: options.Mode = "batch"
  dtype: Any = jnp.float32
  axis_name: str | None = None
  conv_bias: bool = True
  conv: ModuleDef | None = None
  remat: bool = False
  scan_unroll: int | bool | Literal["auto"] = "auto"

  def __post_init__(self):
    check_resnet(self.stage_sizes, self.stage_features, self.stem, self.skip,
                 options.StageSkip, self.scaling, self.mode)
    self.survival_probs()  # validates p_last / survival_rule / survival
    super().__post_init__()

  def stage_skip(self) -> str:
    """"cond", "mask" or "compact": what `skip` stands for on this backend and mode (per
    example, a ResNet masks: its branches hold BatchNorm)."""
    if self.mode in options.ROW_MODES:
      return "mask"
    return backend.resolve_skip(self.skip, self.mode, stage=True)

  @property
  def num_blocks(self) -> int:
    """L, the number of residual blocks (every one droppable)."""
    return int(sum(self.stage_sizes))

  def survival_probs(self) -> np.ndarray:
    """p_1..p_L of this network (NumPy, static)."""
    return survival_lib.schedule(self.num_blocks, self.p_last, self.survival_rule,
                                 self.survival)

  @nn.compact
  def __call__(self, x, train: bool = False, *, key=None, gates=None):
    """Logits of images x (NHWC).

    train=True draws the block gates from `key` (or takes explicit bool `gates`, one per
    block); BatchNorm then uses and updates batch statistics (mutable "batch_stats").
    Blocks with p_l = 1 are statically open under `key`: no gate, no conditional.
    At evaluation every block runs with the test-time rule; `gates` may still name a
    sub-network to run.
    """
    probs = self.survival_probs()
    if train:
      gates = gates_lib.resolve(key, gates, probs, self.mode, x.shape[0])
    elif key is not None:
      raise ValueError("key= draws training gates; at evaluation every block runs. "
                       "Pass gates= to evaluate a chosen sub-network.")
    elif gates is not None:
      gates = gates_lib.check_gates(gates, self.num_blocks, self.mode, x.shape[0])
    # Which blocks a traced gate decides: all of them for explicit gates, else those
    # that can be dropped (p_l < 1); the others run as in a plain ResNet.
    gated = np.zeros(self.num_blocks, bool) if gates is None else (
        probs < 1.0 if key is not None else np.ones(self.num_blocks, bool))
    # Blocks scaled at evaluation (p_l < 1, "paper" scaling) carry their p_l.
    scaled = probs < 1.0

    conv = functools.partial(self.conv or nn.Conv, use_bias=self.conv_bias,
                             dtype=self.dtype, kernel_init=he_normal)
    if self.conv is None:
      conv = functools.partial(conv, conv_general_dilated=backend.conv_general_dilated())
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype, axis_name=self.axis_name)
    act = nn.relu

    x = jnp.asarray(x, self.dtype)
    if self.stem == "cifar":
      x = act(norm(name="stem_norm")(
          conv(self.stage_features[0], (3, 3), padding=_pad(3), name="stem_conv")(x)))
    else:
      x = conv(64, (7, 7), (2, 2), padding=_pad(7), name="stem_conv")(x)
      x = act(norm(name="stem_norm")(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=_pad(3))

    # What a block keeps for the backward pass (`backend.branch_policy`): a branch inside
    # a cond, or a whole block that always runs; only where the branch names its
    # convolutions' outputs, and not under remat=True (which recomputes all).
    gated_policy = plain_policy = None
    if getattr(self.branch_cls, "names_conv_outputs", False) and not self.remat:
      gated_policy = backend.branch_policy(CONV_OUTPUT, gated=True)
      plain_policy = backend.branch_policy(CONV_OUTPUT, gated=False)
    # A block that compaction does not cover (a stage's first) skips with a cond.
    common = dict(branch_cls=self.branch_cls, conv=conv, norm=norm, act=act, train=train,
                  skip="cond" if self.stage_skip() == "compact" else self.stage_skip(),
                  scaling=self.scaling, mode=self.mode, gated_branch_policy=gated_policy)
    start = 0
    for stage, (size, features) in enumerate(zip(self.stage_sizes, self.stage_features)):
      strides = 1 if stage == 0 else 2
      blocks = slice(start, start + size)
      xs = {"prob": jnp.asarray(probs[blocks], jnp.float32)}
      if gates is not None:
        xs["gate"] = gates[blocks]
      out_features = features * getattr(self.branch_cls, "expansion", 1)
      scan_from = 1
      if strides == 1 and not self.projection and x.shape[-1] == out_features:
        scan_from = 0  # the first block has the shape of the others: scan it too
      else:
        first_xs = {k: v[0] for k, v in xs.items()
                    if (k == "gate" and gated[start]) or (k == "prob" and scaled[start])}
        block_cls = nn.remat(Block) if self.remat else Block
        if not gated[start] and plain_policy is not None:
          block_cls = nn.remat(Block, policy=plain_policy)
        x, _ = block_cls(features=features, strides=strides, projection=self.projection,
                         name=f"stage{stage + 1}_first", **common)(x, first_xs)
      if size > scan_from:
        rest = slice(start + scan_from, start + size)
        block_kwargs = dict(features=features, strides=1, projection=False, **common)
        x = self._run_stage(f"stage{stage + 1}_blocks", block_kwargs, x,
                            {k: v[scan_from:] for k, v in xs.items()},
                            gated[rest], scaled[rest], plain_policy)
      start += size

    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=torch_linear_uniform,
                 name="head")(x)
    return jnp.asarray(x, jnp.float32)

  def _run_stage(self, name: str, block_kwargs: dict, x, xs, gated: np.ndarray,
                 scaled: np.ndarray, plain_policy: Callable | None = None):
    """The same-shape blocks `name` of a stage, on stacked variables (leading axis =
    block), in runs of consecutive blocks of one kind:

      gated (a traced gate decides)   skipped by `stage_skip()`: per block cond or mask
                                      inside a scan, or compaction (sdnet.compaction)
      not gated                       a plain scan, no conditional, as a plain ResNet

    A block that is not gated keeps for its backward pass what `plain_policy` says,
    around the whole block; a survivor of compaction, around its branch.

    `nn.scan` creates the stacked variables at initialisation; afterwards every run reads
    and writes its slice of them, so every skip method runs on one set of weights.
    """
    if self.is_initializing():
      scanned = nn.scan(Block, variable_axes={"params": 0, "batch_stats": 0},
                        split_rngs={"params": True}, length=len(gated))
      x, _ = scanned(**block_kwargs, name=name)(x, {})
      return x
    variables = {"params": self.get_variable("params", name),
                 "batch_stats": self.get_variable("batch_stats", name, {})}
    mutable = ["batch_stats"] if self.is_mutable_collection("batch_stats") else False

    def applier(block: Block):
      def apply_block(block_variables, h, block_xs):
        out = block.apply(block_variables, h, block_xs, mutable=mutable)
        if mutable:
          (h, _), state = out
          return h, state["batch_stats"]
        return out[0], block_variables["batch_stats"]
      return jax.checkpoint(apply_block) if self.remat else apply_block

    apply_block = applier(Block(**block_kwargs, parent=None))
    plain_block = apply_block
    if plain_policy is not None:
      plain_block = jax.checkpoint(apply_block, policy=plain_policy)
    # Compaction's survivors run inside conditionals, whose forward pass a policy around
    # the whole block would recompute as well: their branches carry the policy instead.
    compact_block = applier(Block(**block_kwargs, plain_branch_policy=plain_policy,
                                  parent=None))

    def scan_run(h, run_variables, run_xs, unroll, block_fn=apply_block):
      return jax.lax.scan(lambda h, v_xs: block_fn(v_xs[0], h, v_xs[1]), h,
                          (run_variables, run_xs), unroll=unroll)

    new_stats = []
    for lo, hi in _runs(gated):
      run_variables = jax.tree.map(lambda a: a[lo:hi], variables)  # pylint: disable=cell-var-from-loop
      run_xs = {"prob": xs["prob"][lo:hi]} if scaled[lo:hi].any() else {}
      # A masked block always runs: its stage unrolls like a plain one.
      unroll = self._unroll(hi - lo, gated=bool(gated[lo]) and self.stage_skip() != "mask")
      if not gated[lo]:
        x, stats = scan_run(x, run_variables, run_xs, unroll, plain_block)
      elif self.stage_skip() == "compact":
        x, stats = compaction.run_stage(
            lambda v, h, p: compact_block(v, h, {"prob": p, "gate": True}),
            run_variables, x, xs["gate"][lo:hi], xs["prob"][lo:hi], unroll=unroll)
      else:
        x, stats = scan_run(x, run_variables, {**run_xs, "gate": xs["gate"][lo:hi]},
                            unroll)
      new_stats.append(stats)
    if mutable:
      self.put_variable("batch_stats", name,
                        jax.tree.map(lambda *s: jnp.concatenate(s), *new_stats))
    return x

  def _unroll(self, length: int, gated: bool) -> int | bool:
    if self.scan_unroll != "auto":
      return self.scan_unroll
    return backend.unroll_stages(length, self.remat, gated)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
  """[lo, hi) ranges of consecutive equal entries of `flags`."""
  edges = [0] + [i for i in range(1, len(flags)) if flags[i] != flags[i - 1]] + [len(flags)]
  return list(zip(edges[:-1], edges[1:]))


CIFAR_FEATURES = (16, 32, 64)


def CifarResNet(depth: int, num_classes: int = 10, **kwargs) -> ResNet:
  """The CIFAR/SVHN ResNet of depth 6n + 2: n basic blocks in each of 3 stages."""
  if not isinstance(depth, (int, np.integer)) or depth < 8 or (depth - 2) % 6:
    raise ValueError(
        f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, 152, 1202, "
        f"...), got {depth!r}.")
  n = (depth - 2) // 6
  return ResNet(stage_sizes=(n, n, n), stage_features=CIFAR_FEATURES,
                branch_cls=BasicBranch, num_classes=num_classes, stem="cifar",
                projection=False, **kwargs)


# Bottleneck blocks per stage of the ImageNet ResNets (He et al., 2016): 50, 101, 152, and
# the small 14 and 26 of the same design, for tests and quick runs.
IMAGENET_STAGES = {14: (1, 1, 1, 1), 26: (2, 2, 2, 2), 50: (3, 4, 6, 3),
                   101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def ImageNetResNet(depth: int, num_classes: int = 1000, **kwargs) -> ResNet:
  """The bottleneck ImageNet ResNet (50, 101 or 152; 14 or 26) with projection shortcuts."""
  stages = IMAGENET_STAGES
  if depth not in stages:
    raise ValueError(f"ImageNet ResNet depth must be one of {sorted(stages)}, got {depth!r}.")
  kwargs.setdefault("conv_bias", False)
  return ResNet(stage_sizes=stages[depth], stage_features=(64, 128, 256, 512),
                branch_cls=BottleneckBranch, num_classes=num_classes, stem="imagenet",
                projection=True, **kwargs)


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

# Names of sdnet 0.1, kept one release with a DeprecationWarning. `ResNet152` was the
# CIFAR/SVHN network, not the ImageNet one that flax and torchvision call ResNet152.
_DEPRECATED = {
    **{f"ResNet{d}": f"CifarResNet{d}" for d in (8, 20, 32, 44, 56, 110, 152, 1202)},
    "ResNet50": "ImageNetResNet50",
    "ResNet101": "ImageNetResNet101",
}


def __getattr__(name: str):
  if name in _DEPRECATED:
    new = _DEPRECATED[name]
    warnings.warn(f"sdnet.models.{name} is deprecated: use {new}"
                  + (" (the CIFAR/SVHN network; the ImageNet one is ImageNetResNet152)"
                     if name == "ResNet152" else "") + ".",
                  DeprecationWarning, stacklevel=2)
    return globals()[new]
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The other model families, re-exported so that every network is `models.<Name>`; their
# modules do not import this one.
from sdnet.convnext import (  # noqa: E402  pylint: disable=wrong-import-position
    ConvNeXt, ConvNeXt_B, ConvNeXt_S, ConvNeXt_T, ConvNeXt_Test)
from sdnet.vit import (  # noqa: E402  pylint: disable=wrong-import-position
    VisionTransformer, ViT_B16, ViT_S16, ViT_Test, ViT_Ti16)


def count_params(params) -> int:
  """Number of scalar parameters in a parameter tree."""
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
