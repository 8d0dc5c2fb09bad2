"""ConvNeXts with per-example stochastic depth ("drop path"), Flax Linen.

The ConvNeXt of Liu et al. ("A ConvNet for the 2020s", CVPR 2022) in timm's
`convnext_*` layout: a 4 x 4 stride-4 "patchify" stem and LayerNorm, four stages of
blocks at 1/4, 1/8, 1/16 and 1/32 of the input, a LayerNorm and 2 x 2 stride-2
convolution between stages, and global average pooling - LayerNorm - dense head. A block
is one stochastic residual (`sdnet.residual.StochasticResidual`) with identity shortcut:

    x = x + drop(gamma * Dense(C)(GELU(Dense(4C)(LN(dwconv7x7(x)))))),

gamma a per-channel layer scale (initialised to 1e-6). Block l of all L = sum(depths)
survives with timm's p_l = 1 - drop_path_rate * l / (L - 1) (`survival.drop_path_linear`,
counted over the whole network, not per stage). Nothing in a ConvNeXt mixes examples
(LayerNorm, no BatchNorm), so `skip="gather"`, which runs a branch on the kept examples
only (`sdnet.rows`), is exact.

    model = ConvNeXt_T(num_classes=1000, drop_path_rate=0.1)
    variables = model.init(jax.random.key(0), images)          # images: (B, 224, 224, 3)
    logits = model.apply(variables, images, train=True, key=gate_key)
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sdnet import backend
from sdnet import options
from sdnet import residual as residual_lib
from sdnet import stacks
from sdnet import survival as survival_lib
from sdnet.vit import check_positive_int, check_stochastic_options, network_gates
from sdnet.vit import trunc_normal


class ConvNeXtBranch(nn.Module):
  """f(x) = gamma * Dense(C)(GELU(Dense(4C)(LN(dwconv7x7(x))))), (B, H, W, C) -> same.

  The depthwise 7 x 7 convolution (one filter per channel, bias) and the 1 x 1
  convolutions as dense layers on channels-last data are timm's; GELU is exact (erf).
  Convolutions compute with `sdnet.backend.conv_general_dilated()` (on CPU,
  `sdnet.conv`'s depthwise form).
  """
  dim: int
  layer_scale_init: float | None = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = dict(kernel_init=trunc_normal(), bias_init=nn.initializers.zeros)
    y = nn.Conv(self.dim, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=self.dim,
                dtype=self.dtype, conv_general_dilated=backend.conv_general_dilated(),
                name="dwconv", **init)(x)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(y)
    y = nn.gelu(nn.Dense(4 * self.dim, dtype=self.dtype, name="fc1", **init)(y),
                approximate=False)
    y = nn.Dense(self.dim, dtype=self.dtype, name="fc2", **init)(y)
    if self.layer_scale_init:
      gamma = self.param("gamma", nn.initializers.constant(self.layer_scale_init),
                         (self.dim,), jnp.float32)
      y = y * gamma.astype(y.dtype)
    return y


class ConvNeXtBlock(nn.Module):
  """x + drop(f(x)), f a `ConvNeXtBranch`: one stochastic residual, identity shortcut.

  Called as block(x, xs) -> (y, None), the signature of `sdnet.stacks` (and `nn.scan`):
  xs = {"prob": p_l, "gate": its gate}, each optional (no gate: the branch runs; no prob:
  `survival_prob`, else 1).
  """
  dim: int
  layer_scale_init: float | None = 1e-6
  train: bool = False
  survival_prob: float | None = None
  skip: options.Skip = "auto"
  scaling: options.Scaling = "inverted"
  mode: options.Mode = "row"
  row_groups: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, xs=None):
    xs = xs or {}
    branch = ConvNeXtBranch(self.dim, self.layer_scale_init, dtype=self.dtype, name="branch")
    x = residual_lib.StochasticResidual(
        branch=branch, skip=self.skip, scaling=self.scaling, mode=self.mode,
        row_groups=self.row_groups, name="residual")(
            x, train=self.train,
            survival_prob=(self.survival_prob if self.survival_prob is not None
                           else xs.get("prob", 1.0)),
            gate=xs.get("gate"))
    return x, None


class ConvNeXt(nn.Module):
  """A ConvNeXt whose blocks have stochastic depth.

  Images (B, H, W, C) -> stem (B, H/4, W/4, dims[0]) -> stages (each after the first
  halves the resolution) -> mean over H, W -> LayerNorm -> head (B, num_classes).

  Initialisation as timm's: convolution and dense kernels trunc_normal(0.02)
  (`sdnet.vit.trunc_normal`), biases zero, LayerNorms one and zero, layer scales
  `layer_scale_init`; the head trunc_normal(0.02) too (timm's head_init_scale 1).

  Attributes:
    num_classes: outputs of the head.
    depths: blocks per stage.
    dims: channels per stage.
    layer_scale_init: initial value of every block's per-channel scale gamma; 0 or None
      for no layer scale (no parameter).
    drop_path_rate: the drop probability of the last block, 0 to disable; block l of
      L = sum(depths) survives with p_l = 1 - drop_path_rate * l / (L - 1).
    mode: "row" (one gate per example, timm's drop path), "subset" (exactly
      round(p_l * B) examples) or "batch" (one per mini-batch, the paper).
    skip: "mask", "gather" (row modes: the branch runs on the kept examples only),
      "cond" (batch mode) or "auto" (`sdnet.backend.auto_skip`).
    scaling: "inverted" (branch / p_l in training, timm's), "paper" or "none".
    row_groups: contiguous parts of the batch that gather their kept rows apart (the
      devices the batch is sharded over under `jit`; 1 on one device).
    scan_unroll: each stage's blocks run as scans over their stacked parameters
      (`sdnet.stacks`); blocks per iteration, True to unroll them all, or "auto"
      (`sdnet.backend.unroll_blocks`).
    dtype: computation dtype (parameters stay float32; logits are float32).
  """
  num_classes: int = 1000
  depths: Sequence[int] = (3, 3, 9, 3)
  dims: Sequence[int] = (96, 192, 384, 768)
  layer_scale_init: float | None = 1e-6
  drop_path_rate: float = 0.0
  mode: options.Mode = "row"
  skip: options.Skip = "auto"
  scaling: options.Scaling = "inverted"
  row_groups: int = 1
  scan_unroll: int | bool | Literal["auto"] = "auto"
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_positive_int("num_classes", self.num_classes)
    if not len(self.depths) == len(self.dims) >= 1:
      raise ValueError("depths and dims must have one entry per stage, got "
                       f"{self.depths} and {self.dims}.")
    for d in self.depths:
      check_positive_int("every entry of depths", d)
    for d in self.dims:
      check_positive_int("every entry of dims", d)
    if self.layer_scale_init is not None and not self.layer_scale_init >= 0:
      raise ValueError("layer_scale_init must be a non-negative float (0 or None: no "
                       f"layer scale), got {self.layer_scale_init!r}.")
    self.survival_probs()  # validates drop_path_rate
    check_stochastic_options(self)
    super().__post_init__()

  @property
  def num_residuals(self) -> int:
    """L, the number of blocks (one stochastic residual each)."""
    return int(sum(self.depths))

  def survival_probs(self) -> np.ndarray:
    """p_l of every block l (NumPy, static), timm's linspace over all stages."""
    return survival_lib.drop_path_linear(self.num_residuals, self.drop_path_rate)

  @nn.compact
  def __call__(self, x, train: bool = False, *, key=None, gates=None):
    """Logits (B, num_classes) of images x (B, H, W, C), H and W multiples of
    4 * 2^(stages - 1).

    train=True draws the gates from `key` (or takes explicit bool `gates` of shape
    (L, B) in the row modes, (L,) in batch mode); without drop path (drop_path_rate 0)
    it needs neither and equals evaluation. At evaluation a `key` is refused; `gates`
    may name a sub-network to run.
    """
    probs = self.survival_probs()
    gates, gated = network_gates(train, key, gates, probs, self.mode, x.shape[0],
                                 self.row_groups)
    init = dict(kernel_init=trunc_normal(), bias_init=nn.initializers.zeros)
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype)
    conv = functools.partial(nn.Conv, padding="VALID", dtype=self.dtype,
                             conv_general_dilated=backend.conv_general_dilated(), **init)
    kinds = stacks.block_kinds(probs, gated, train=train, skip=self.skip, mode=self.mode,
                               rows_per_group=x.shape[0] // self.row_groups)
    x = jnp.asarray(x, self.dtype)
    x = conv(self.dims[0], (4, 4), strides=(4, 4), name="stem_conv")(x)
    x = norm(name="stem_norm")(x)
    start = 0
    for stage, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      if stage > 0:
        x = norm(name=f"stage{stage + 1}_downsample_norm")(x)
        x = conv(dim, (2, 2), strides=(2, 2), name=f"stage{stage + 1}_downsample_conv")(x)
      blocks = slice(start, start + depth)
      x = stacks.run_stack(
          self, f"stage{stage + 1}_blocks", ConvNeXtBlock,
          dict(dim=dim, layer_scale_init=self.layer_scale_init, train=train,
               scaling=self.scaling, mode=self.mode, row_groups=self.row_groups,
               dtype=self.dtype),
          x, kinds[blocks], jnp.asarray(probs[blocks], jnp.float32),
          None if gates is None else gates[blocks], unroll=self.scan_unroll)
      start += depth

    x = jnp.mean(x, axis=(1, 2))
    x = norm(name="head_norm")(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head", **init)(x)
    return jnp.asarray(x, jnp.float32)


ConvNeXt_T = functools.partial(ConvNeXt, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))
ConvNeXt_S = functools.partial(ConvNeXt, depths=(3, 3, 27, 3), dims=(96, 192, 384, 768))
ConvNeXt_B = functools.partial(ConvNeXt, depths=(3, 3, 27, 3),
                               dims=(128, 256, 512, 1024))
# For tests and quick runs: two stages of 1 and 2 blocks, 16 and 32 channels (16 px
# images: 4 x 4 then 2 x 2).
ConvNeXt_Test = functools.partial(ConvNeXt, depths=(1, 2), dims=(16, 32))
