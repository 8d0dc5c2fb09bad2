r"""The baseline to beat: the authors' way of skipping, in PyTorch eager.

  python -m benchmarks.torch_reference --out=torch.json   # needs PyTorch (on the GPU)
  python -m benchmarks.torch_reference --beside_jax --cases=56:128,110:128 --repeats=7 \
      --calls=1   # the library's steps and PyTorch's, interleaved in one process

The CIFAR ResNet of `sdnet.models.CifarResNet` (post-activation basic blocks, biased
convolutions, 2x2 average-pool + zero-channel shortcuts) written in PyTorch. In training
each block survives with probability p_l, drawn on the host per mini-batch; a dropped
block is skipped with a Python `if`, as in the authors' Torch code (Huang et al., 2016).
The step is forward, cross-entropy, backward and SGD with Nesterov momentum 0.9 and
weight decay 1e-4 on random input already on the device, with cuDNN autotuning on.
Full depth and stochastic depth (p_L = 0.5, linear decay) run interleaved and repeated;
the rows have the schema of `benchmarks.train_step`'s, "memory_gib" being the peak
allocated while that variant ran. PyTorch is not a dependency of sdnet: install it
yourself to run this.
"""

import time

from absl import app
from absl import flags
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from benchmarks import common

FLAGS = flags.FLAGS


class Block(nn.Module):
  """relu(shortcut(x) + f(x)), f = conv-BN-relu-conv-BN; skipped when its gate is closed."""

  def __init__(self, in_features: int, features: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_features, features, 3, stride, 1)
    self.bn1 = nn.BatchNorm2d(features, momentum=0.1, eps=1e-5)
    self.conv2 = nn.Conv2d(features, features, 3, 1, 1)
    self.bn2 = nn.BatchNorm2d(features, momentum=0.1, eps=1e-5)
    self.stride, self.extra = stride, features - in_features

  def shortcut(self, x):
    if self.stride != 1:
      x = F.avg_pool2d(x, self.stride)
    return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x

  def forward(self, x, gate: bool):
    if not gate:
      return F.relu(self.shortcut(x))
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(self.shortcut(x) + y)


class CifarResNet(nn.Module):

  def __init__(self, depth: int, num_classes: int = 10):
    super().__init__()
    n = (depth - 2) // 6
    self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
    blocks, features = [], 16
    for stage, width in enumerate((16, 32, 64)):
      for i in range(n):
        blocks.append(Block(features, width, 2 if stage and not i else 1))
        features = width
    self.blocks = nn.ModuleList(blocks)
    self.head = nn.Linear(64, num_classes)

  def forward(self, x, gates):
    x = self.stem(x)
    for block, gate in zip(self.blocks, gates):
      x = block(x, gate)
    return self.head(x.mean(dim=(2, 3)))


def make_variant(depth, batch, p_last, device, seed=0):
  model = CifarResNet(depth).to(device).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                        weight_decay=1e-4)
  num_blocks = len(model.blocks)  # p_l = 1 - l / L (1 - p_L), the paper's Eq. 4
  probs = 1 - np.arange(1, num_blocks + 1) / num_blocks * (1 - p_last)
  images = torch.randn(batch, 3, 32, 32, device=device)
  labels = torch.randint(0, 10, (batch,), device=device)
  generator = np.random.default_rng(seed)
  variant = {"times": [], "memory": 0.0, "computed": []}

  def step():
    gates = (generator.random(len(probs)) < probs).tolist()  # host-side, per mini-batch
    variant["computed"].append(np.mean(gates))
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(images, gates), labels).backward()
    opt.step()
  variant["step"] = step
  return variant


def synchronize(device):
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def run_variant(variant, calls, device):
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
  synchronize(device)
  start = time.perf_counter()
  for _ in range(calls):
    variant["step"]()
  synchronize(device)
  elapsed = (time.perf_counter() - start) / calls
  if device.type == "cuda":
    variant["memory"] = max(variant["memory"], torch.cuda.max_memory_allocated(device) / 2**30)
  return elapsed


def torch_variants(depth, batch, device) -> dict:
  """{name: (variant, run)} of PyTorch's full and SD steps."""
  runs = {}
  for name, p_last in (("torch full", 1.0), ("torch SD if", FLAGS.p_last)):
    variant = make_variant(depth, batch, p_last, device, FLAGS.seed)
    run_variant(variant, 2, device)  # warm-up: cuDNN autotuning, allocator
    variant["computed"].clear()
    runs[name] = (variant, lambda v=variant: run_variant(v, FLAGS.calls, device))
  return runs


def jax_variants(depth, batch) -> dict:
  """{name: (variant, run)} of the library's plain, SD and all-open steps
  (`benchmarks.timing`), for timing beside PyTorch's in this process."""
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  runs = {}
  for name, p_last, forced in (("jax plain", 1.0, None), ("jax SD", FLAGS.p_last, None),
                               ("jax open", FLAGS.p_last, True)):
    variant = timing.make_variant(depth, batch, p_last, "auto", 1, forced_gates=forced,
                                  seed=FLAGS.seed)
    runs[name] = (variant, lambda v=variant: timing.run_variant(v, FLAGS.calls, 1))
  return runs


def jax_blocks_computed(variant) -> float | None:
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  return timing.blocks_computed(variant)


def main(argv):
  del argv
  if FLAGS.processes > 1:
    common.across_processes("benchmarks.torch_reference", FLAGS.processes, FLAGS.out,
                            FLAGS.seed)
    return
  cpus = common.prepare_host(FLAGS.cores)
  if FLAGS.cores:
    torch.set_num_threads(len(cpus))
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.backends.cudnn.benchmark = True
  name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
  print(f"PyTorch {torch.__version__}, {name}")
  if FLAGS.beside_jax:
    import jax  # pylint: disable=g-import-not-at-top
    print(f"beside JAX {jax.__version__} ({jax.default_backend()}), in this process")
  if device.type == "cpu":
    print("CPU: these figures say nothing about accelerator speed.")
  rows = []
  for depth, batch in common.cases(FLAGS.cases, FLAGS.small):
    variants = torch_variants(depth, batch, device)
    if FLAGS.beside_jax:
      variants.update(jax_variants(depth, batch))
    times = common.interleave({label: run for label, (_, run) in variants.items()},
                              FLAGS.repeats)
    for label, (variant, _) in variants.items():
      variant["times"] = times[label]
    base = np.median(variants["torch full"][0]["times"])
    for label, (variant, _) in variants.items():
      memory = variant.get("memory") if device.type == "cuda" else None
      blocks = (float(np.mean(variant["computed"])) if "computed" in variant
                else jax_blocks_computed(variant))
      rows.append(common.row(depth, batch, label, variant["times"], base,
                             variant.get("compile_s"), memory, blocks_computed=blocks))
    del variants
  print(common.format_table(rows))
  if FLAGS.out:
    common.write_json(FLAGS.out, {"torch": torch.__version__, "device": name,
                                  "backend": device.type, "date": time.strftime("%Y-%m-%d"),
                                  "beside_jax": FLAGS.beside_jax, "rows": rows})


if __name__ == "__main__":
  common.define_flags()
  flags.DEFINE_bool("beside_jax", False, "Also time the library's plain, SD and all-open "
                    "steps in this process, interleaved with PyTorch's (an interpreter "
                    "with both installed): ratios that drifting clocks cannot bias.")
  app.run(main)
