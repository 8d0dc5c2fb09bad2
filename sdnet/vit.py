"""Vision Transformers with per-example stochastic depth ("drop path"), Flax Linen.

The ViT of Dosovitskiy et al. (ICLR 2021) in the layout of DeiT (Touvron et al., ICML
2021) and timm's `vit_*_patch16_224`: a P x P patch embedding (a convolution of stride
P), a class token and learned position embeddings, `depth` pre-norm encoder blocks, a
final LayerNorm and a dense head on the class token. Every block holds two stochastic
residuals (`sdnet.residual.StochasticResidual`):

    x = x + drop(attn(LN(x)))
    x = x + drop(mlp(LN(x))),   mlp = Dense(r D) - GELU - Dense(D),

and both residuals of block i survive with the same p_i of timm's schedule,
p_i = 1 - drop_path_rate * i / (depth - 1) (`sdnet.survival.drop_path_linear`). With the
default `mode="row"` every example draws its own gates (DeiT's drop path); `skip="gather"`
runs a branch on the kept examples only (`sdnet.rows`), which is exact here: nothing in a
ViT mixes examples (LayerNorm, attention within an example, no BatchNorm).

    model = ViT_S16(num_classes=1000, drop_path_rate=0.1)
    variables = model.init(jax.random.key(0), images)          # images: (B, 224, 224, 3)
    logits = model.apply(variables, images, train=True, key=gate_key)
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sdnet import gates as gates_lib
from sdnet import options
from sdnet import residual as residual_lib
from sdnet import stacks
from sdnet import survival as survival_lib


def trunc_normal(std: float = 0.02) -> nn.initializers.Initializer:
  """timm's `trunc_normal_(std=std)`: N(0, std^2) cut at +-2 in absolute value, which at
  std 0.02 is +-100 standard deviations (Flax's `truncated_normal(std)` cuts at +-2 of
  them, leaving a standard deviation of 0.88 std)."""
  return nn.initializers.truncated_normal(std, lower=-2.0 / std, upper=2.0 / std)


def network_gates(train: bool, key, gates, probs: np.ndarray, mode: options.Mode,
                  batch_size: int, groups: int):
  """The gates of a network's residuals and which of them a gate decides.

  Returns (gates, gated): gates is None (nothing to gate) or (L,) / (L, batch_size) bool;
  gated[j] says whether residual j takes its row of gates (none does without gates). Gates drawn from `key` skip
  the residuals with p_j = 1 (always open: no gate, no mask); explicit `gates` decide
  every residual they name, at evaluation too (a chosen sub-network).
  """
  if train:
    gates = gates_lib.resolve(key, gates, probs, mode, batch_size, groups)
  elif key is not None:
    raise ValueError("key= draws training gates; at evaluation every block runs. Pass "
                     "gates= to evaluate a chosen sub-network.")
  elif gates is not None:
    gates = gates_lib.check_gates(gates, len(probs), mode, batch_size)
  if gates is None:
    gated = np.zeros(len(probs), bool)
  else:
    gated = probs < 1.0 if key is not None else np.ones(len(probs), bool)
  return gates, gated


def check_stochastic_options(module: Any) -> None:
  """ValueError for a bad mode, skip, scaling, row_groups or scan_unroll of a network
  `module`."""
  options.check("mode", module.mode, options.Mode)
  options.check("skip implementation", module.skip, options.Skip)
  options.check_skip_for_mode(module.skip, module.mode)
  options.check("scaling rule", module.scaling, options.Scaling)
  if not isinstance(module.row_groups, (int, np.integer)) or module.row_groups < 1:
    raise ValueError(f"row_groups must be a positive integer (the number of devices the "
                     f"batch is sharded over), got {module.row_groups!r}.")
  unroll = module.scan_unroll
  if unroll not in (True, "auto") and (isinstance(unroll, bool)
                                       or not isinstance(unroll, int) or unroll < 1):
    raise ValueError(f"scan_unroll must be a positive integer (blocks per iteration of the "
                     f"scan), True (all) or 'auto', got {unroll!r}.")


def check_positive_int(name: str, value) -> None:
  """ValueError naming `name` unless `value` is an integer >= 1."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")


class AttentionBranch(nn.Module):
  """attn(LN(x)): multi-head self-attention of pre-normalised tokens, (B, N, D) -> same.

  q, k, v and the output projection are separate biased dense layers of Flax's
  `MultiHeadDotProductAttention`: the parameters of timm's fused qkv, split.
  """
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    return nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, kernel_init=trunc_normal(),
        bias_init=nn.initializers.zeros, name="attention")(y)


class MlpBranch(nn.Module):
  """mlp(LN(x)) = Dense(D)(GELU(Dense(mlp_dim)(LN(x)))), exact (erf) GELU as timm's."""
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=trunc_normal(),
                              bias_init=nn.initializers.zeros)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    y = nn.gelu(dense(self.mlp_dim, name="fc1")(y), approximate=False)
    return dense(x.shape[-1], name="fc2")(y)


class EncoderBlock(nn.Module):
  """A pre-norm encoder block: two stochastic residuals sharing one survival p_i.

  Called as block(x, xs) -> (y, None), the signature of `sdnet.stacks` (and `nn.scan`):
  xs = {"prob": p_i, "gate": (2, ...) the gates of attention and MLP}, each optional (no
  gate: the residuals run; no prob: `survival_prob`, else 1).
  """
  num_heads: int
  mlp_dim: int
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
    prob = self.survival_prob if self.survival_prob is not None else xs.get("prob", 1.0)
    gates = xs.get("gate")
    residual = functools.partial(
        residual_lib.StochasticResidual, skip=self.skip, scaling=self.scaling,
        mode=self.mode, row_groups=self.row_groups)
    attn = AttentionBranch(self.num_heads, dtype=self.dtype, name="attn")
    x = residual(branch=attn, name="attn_residual")(
        x, train=self.train, survival_prob=prob, gate=None if gates is None else gates[0])
    mlp = MlpBranch(self.mlp_dim, dtype=self.dtype, name="mlp")
    x = residual(branch=mlp, name="mlp_residual")(
        x, train=self.train, survival_prob=prob, gate=None if gates is None else gates[1])
    return x, None


class VisionTransformer(nn.Module):
  """ViT / DeiT with stochastic depth on both residuals of every encoder block.

  Images (B, H, W, C) -> patches (B, N, D), N = (H / P) (W / P) -> [cls; patches] + pos
  (B, N + 1, D) -> `depth` encoder blocks -> LayerNorm -> head(class token) (B, classes).

  The position embeddings have shape (1, N + 1, D), N set by the images at `init` (196
  at 224 px, P = 16); other image sizes need new variables.

  Initialisation as timm's `vit_*` (DeiT's) for training from scratch: dense, attention
  and patch kernels trunc_normal(0.02) (`trunc_normal`), biases zero, position
  embeddings trunc_normal(0.02), class token zero, LayerNorms one and zero; the head
  trunc_normal(0.02) as well (timm zeroes it only in its "jax" mode and for
  fine-tuning). timm leaves the patch convolution at PyTorch's default,
  U(+-1/sqrt(fan_in)): std 1/sqrt(3 * 768) = 0.021 at P = 16, near 0.02.

  Attributes:
    num_classes: outputs of the head.
    patch_size: P, the side of a square patch (the stride of the patch embedding).
    hidden_size: D, the token width.
    depth: the number of encoder blocks (2 * depth stochastic residuals).
    num_heads: attention heads; must divide D.
    mlp_ratio: the MLP's hidden width over D.
    drop_path_rate: the drop probability of the last block, 0 to disable; block i
      survives with p_i = 1 - drop_path_rate * i / (depth - 1), both its residuals alike.
    mode: "row" (one gate per example, timm's drop path), "subset" (exactly
      round(p_i * B) examples) or "batch" (one per mini-batch, the paper).
    skip: "mask", "gather" (row modes: the branch runs on the kept examples only),
      "cond" (batch mode) or "auto" (`sdnet.backend.auto_skip`).
    scaling: "inverted" (branch / p_i in training, timm's), "paper" or "none".
    row_groups: contiguous parts of the batch that gather their kept rows apart (the
      devices the batch is sharded over under `jit`; 1 on one device).
    scan_unroll: the blocks run as scans over their stacked parameters (`sdnet.stacks`);
      blocks per iteration, True to unroll them all, or "auto"
      (`sdnet.backend.unroll_blocks`).
    dtype: computation dtype (parameters stay float32; logits are float32).
  """
  num_classes: int = 1000
  patch_size: int = 16
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  mode: options.Mode = "row"
  skip: options.Skip = "auto"
  scaling: options.Scaling = "inverted"
  row_groups: int = 1
  scan_unroll: int | bool | Literal["auto"] = "auto"
  dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("num_classes", "patch_size", "hidden_size", "depth", "num_heads"):
      check_positive_int(name, getattr(self, name))
    if self.hidden_size % self.num_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size "
                       f"({self.hidden_size}).")
    if not self.mlp_ratio > 0 or int(self.mlp_ratio * self.hidden_size) < 1:
      raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}.")
    self.survival_probs()  # validates drop_path_rate
    check_stochastic_options(self)
    super().__post_init__()

  @property
  def num_residuals(self) -> int:
    """The stochastic residuals: two per encoder block (attention, MLP)."""
    return 2 * self.depth

  def survival_probs(self) -> np.ndarray:
    """p_j of every residual j (NumPy, static): block i's p_i at j = 2i and 2i + 1."""
    return np.repeat(survival_lib.drop_path_linear(self.depth, self.drop_path_rate), 2)

  @nn.compact
  def __call__(self, x, train: bool = False, *, key=None, gates=None):
    """Logits (B, num_classes) of images x (B, H, W, C), H and W multiples of P.

    train=True draws the gates from `key` (or takes explicit bool `gates` of shape
    (2 * depth, B) in the row modes, (2 * depth,) in batch mode: rows 2i and 2i + 1 are
    block i's attention and MLP); without drop path (drop_path_rate 0) it needs neither
    and equals evaluation. At evaluation a `key` is refused; `gates` may name a
    sub-network to run.
    """
    probs = self.survival_probs()
    gates, gated = network_gates(train, key, gates, probs, self.mode, x.shape[0],
                                 self.row_groups)
    x = jnp.asarray(x, self.dtype)
    p = self.patch_size
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID",
                dtype=self.dtype, kernel_init=trunc_normal(),
                bias_init=nn.initializers.zeros, name="patch_embed")(x)
    batch, height, width, dim = x.shape
    x = x.reshape(batch, height * width, dim)
    cls = self.param("cls_token", nn.initializers.zeros, (1, 1, dim), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, dim)), x], 1)
    pos = self.param("pos_embedding", trunc_normal(), (1, height * width + 1, dim),
                     jnp.float32)
    x = x + pos.astype(x.dtype)

    block_probs = probs[::2]
    kinds = stacks.block_kinds(block_probs, gated[::2], train=train, skip=self.skip,
                               mode=self.mode, rows_per_group=batch // self.row_groups)
    x = stacks.run_stack(
        self, "blocks", EncoderBlock,
        dict(num_heads=self.num_heads, mlp_dim=int(self.mlp_ratio * self.hidden_size),
             train=train, scaling=self.scaling, mode=self.mode, row_groups=self.row_groups,
             dtype=self.dtype),
        x, kinds, jnp.asarray(block_probs, jnp.float32),
        None if gates is None else gates.reshape((self.depth, 2) + gates.shape[1:]),
        unroll=self.scan_unroll)

    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=trunc_normal(),
                 bias_init=nn.initializers.zeros, name="head")(x[:, 0])
    return jnp.asarray(x, jnp.float32)


ViT_Ti16 = functools.partial(VisionTransformer, patch_size=16, hidden_size=192, depth=12,
                             num_heads=3)
ViT_S16 = functools.partial(VisionTransformer, patch_size=16, hidden_size=384, depth=12,
                            num_heads=6)
ViT_B16 = functools.partial(VisionTransformer, patch_size=16, hidden_size=768, depth=12,
                            num_heads=12)
# For tests and quick runs: 4 x 4 patches (16 tokens at 16 px), D 32, two blocks.
ViT_Test = functools.partial(VisionTransformer, patch_size=4, hidden_size=32, depth=2,
                             num_heads=2)
