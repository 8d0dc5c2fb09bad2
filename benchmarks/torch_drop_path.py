"""The peers of `benchmarks.drop_path` in PyTorch eager: timm's drop path and DINOv2's subset.

ViT: timm's `VisionTransformer` layout (pre-norm blocks, fused qkv, exact GELU) written
here, its residuals dropped by timm's `drop_path` (`x * bernoulli(keep) / keep` per
example: every row computed) or by DINOv2's `drop_add_residual_stochastic_depth`
(k = max(int(B * keep), 1) rows `randperm(B)[:k]` run the branch, added back with
`index_add` scaled by B / k). ConvNeXt: torchvision's `convnext_tiny` (its
`StochasticDepth(mode="row")` is timm's drop path), with the subset variant's blocks
running DINOv2's function instead. Both use timm's linear schedule (block i of L drops with
rate * i / (L - 1)). The step: forward, label-smoothed (0.1) cross-entropy, backward,
AdamW (weight decay 0.05), on random images; PyTorch's threads set to the CPUs this
process may use. PyTorch is not a dependency of sdnet: install it to run this.
"""

import os
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


def drop_path(x, drop: float, training: bool):
  """timm's `drop_path`: each example's residual kept with probability 1 - drop, / keep."""
  if drop == 0.0 or not training:
    return x
  keep = 1.0 - drop
  mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
  return x * mask / keep


def subset_residual(x, residual, drop: float):
  """DINOv2's `drop_add_residual_stochastic_depth`: x + (B / k) residual on k rows."""
  b = x.shape[0]
  k = max(int(b * (1 - drop)), 1)
  rows = torch.randperm(b, device=x.device)[:k]
  out = residual(x[rows])
  return torch.index_add(x.flatten(1), 0, rows, out.flatten(1).to(x.dtype),
                         alpha=b / k).view_as(x)


class Block(nn.Module):
  """timm's ViT block: x + dp(attn(norm1(x))), x + dp(mlp(norm2(x)))."""

  def __init__(self, dim: int, heads: int, drop: float, subset: bool):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
    self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
    self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
    self.heads, self.drop, self.subset = heads, drop, subset

  def attn(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(
        2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v)
    return self.proj(y.transpose(1, 2).reshape(b, n, d))

  def mlp(self, x):
    return self.fc2(F.gelu(self.fc1(self.norm2(x))))

  def forward(self, x):
    if self.training and self.subset and self.drop > 0:
      x = subset_residual(x, self.attn, self.drop)
      return subset_residual(x, self.mlp, self.drop)
    x = x + drop_path(self.attn(x), self.drop, self.training)
    return x + drop_path(self.mlp(x), self.drop, self.training)


class ViT(nn.Module):

  def __init__(self, image_size, patch, dim, depth, heads, classes, rate, subset):
    super().__init__()
    self.patch = nn.Conv2d(3, dim, patch, patch)
    tokens = (image_size // patch) ** 2 + 1
    self.cls = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
    rates = np.linspace(0.0, rate, depth)
    self.blocks = nn.ModuleList(Block(dim, heads, float(r), subset) for r in rates)
    self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, classes)

  def forward(self, x):
    x = self.patch(x).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x)[:, 0])


VITS = {"vit_ti16": (16, 192, 12, 3), "vit_s16": (16, 384, 12, 6), "vit_b16": (16, 768, 12, 12),
        "vit_test": (4, 32, 2, 2)}


def convnext(name: str, rate: float, subset: bool):
  """torchvision's ConvNeXt of `name`, its blocks' residuals made DINOv2's subset if asked."""
  from torchvision.models import convnext as tv  # pylint: disable=g-import-not-at-top
  if name == "convnext_test":
    settings = [tv.CNBlockConfig(16, 32, 1), tv.CNBlockConfig(32, None, 2)]
    model = tv.ConvNeXt(settings, stochastic_depth_prob=rate, num_classes=1000)
  else:
    model = getattr(tv, name.replace("convnext_t", "convnext_tiny").replace(
        "convnext_s", "convnext_small").replace("convnext_b", "convnext_base"))(
            stochastic_depth_prob=rate)
  if subset:
    for module in model.modules():
      if isinstance(module, tv.CNBlock) and module.stochastic_depth.p > 0:
        module.forward = _subset_forward(module)
  return model


def _subset_forward(block):
  def forward(x):
    if not block.training:
      return x + block.layer_scale * block.block(x)
    return subset_residual(x, lambda h: block.layer_scale * block.block(h),
                           block.stochastic_depth.p)
  return forward


def build(name: str, image_size: int, rate: float, subset: bool):
  if name.startswith("vit"):
    patch, dim, depth, heads = VITS[name]
    return ViT(image_size, patch, dim, depth, heads, 1000, rate, subset)
  return convnext(name, rate, subset)


def variants(name: str, image_size: int, batch: int, rates, calls: int, seed: int) -> dict:
  """{variant: (run, rows)}: `run()` times `calls` steps (seconds per step); `rows` the
  mean fraction of block rows the variant computes."""
  torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count())
  torch.manual_seed(seed)
  images = torch.randn(batch, 3, image_size, image_size)
  labels = torch.arange(batch) % 1000
  out = {}
  for label, rate, subset in [("none", 0.0, False)] + [
      (f"{method} {rate:g}", rate, method == "subset")
      for rate in rates for method in ("mask", "subset")]:
    model = build(name, image_size, rate, subset).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

    def step(model=model, opt=opt):
      opt.zero_grad(set_to_none=True)
      loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
      loss.backward()
      opt.step()

    def run(step=step):
      start = time.perf_counter()
      for _ in range(calls):
        step()
      return (time.perf_counter() - start) / calls

    step()  # warm-up
    depth = len(model.blocks) if hasattr(model, "blocks") else None
    drops = (np.linspace(0.0, rate, depth) if depth else
             [m.stochastic_depth.p for m in model.modules() if hasattr(m, "stochastic_depth")])
    rows = (float(np.mean([max(int(batch * (1 - d)), 1) / batch if d > 0 else 1.0
                           for d in drops])) if subset else 1.0)
    out[f"torch {label}"] = (run, rows)
  return out
