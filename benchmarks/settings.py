"""The settings of `benchmarks.suite`, and running them one process each."""

import json
import os
import subprocess
import sys

from benchmarks import common

COMMAND_BUFFERS = ("--xla_gpu_enable_command_buffer=+CONDITIONAL,+WHILE "
                   "--xla_gpu_graph_min_graph_size=1")

# name: (what it measures, extra XLA_FLAGS, module, arguments)
SETTINGS = {
    "x1": ("one step per call, float32", "", "train_step", ["--steps_per_call=1"]),
    "x20": ("20 steps per call, float32", "", "train_step", ["--steps_per_call=20"]),
    "cmdbuf_x20": ("20 steps per call, conditionals and loops in CUDA graphs",
                   COMMAND_BUFFERS, "train_step", ["--steps_per_call=20"]),
    "bf16_x20": ("20 steps per call, bfloat16 compute", "", "train_step",
                 ["--steps_per_call=20", "--dtype=bfloat16"]),
    "remat_1202": ("ResNet-1202 with each block rematerialised", "", "train_step",
                   ["--steps_per_call=1", "--remat", "--cases=1202:128"]),
    "imagenet_bf16": ("ImageNet's ResNet-50 and ResNet-152 (224 px), bfloat16 compute", "",
                      "train_step", ["--family=imagenet", "--cases=50:256,152:128",
                                     "--dtype=bfloat16", "--steps_per_call=1"]),
    "torch": ("PyTorch eager, Python if per block (the authors' skipping)", "",
              "torch_reference", []),
    "drop_path": ("ViT-S/16 and ConvNeXt-T (224 px) per drop-path method, and PyTorch's "
                  "timm masking and DINOv2 subset where installed", "", "drop_path",
                  ["--models=vit_s16:224:128,convnext_t:224:128", "--calls=5"]),
}

def command(setting: str, out: str, small: bool, extra):
  """The argv and environment that run `setting`, writing its rows to `out`."""
  _, xla_flags, module, args = SETTINGS[setting]
  argv = [sys.executable, "-m", f"benchmarks.{module}", f"--out={out}", *args]
  if small:
    argv += ["--small", "--repeats=2", "--calls=1"]
    if "--family=imagenet" in args:
      argv.append("--image_size=64")
  if module == "train_step":
    argv += list(extra)
    if small:
      argv = [a.replace("--steps_per_call=20", "--steps_per_call=2") for a in argv]
  if module == "drop_path":
    argv = [a for a in argv if not (small and a == "--calls=5")]
    argv += ["--rates=0.5"] * small + ["--torch"] * torch_available()
  env = dict(os.environ)
  if xla_flags:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
  return argv, env


def torch_available() -> bool:
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def run_all(settings, out_dir: str, small: bool = False, extra=()):
  """Runs every setting in its own process (OUT_DIR/SETTING.json each), writes the merged
  rows to OUT_DIR/suite.json and returns them; a failed setting is reported and left
  out, an unknown one refused before anything runs."""
  unknown = sorted(set(settings) - set(SETTINGS))
  if unknown:
    raise ValueError(f"unknown settings {unknown}; choose from {list(SETTINGS)}.")
  os.makedirs(out_dir, exist_ok=True)
  rows, runs = [], {}
  for setting in settings:
    if SETTINGS[setting][2] == "torch_reference" and not torch_available():
      print(f"[{setting}] skipped: PyTorch is not installed.")
      continue
    out = os.path.join(out_dir, f"{setting}.json")
    argv, env = command(setting, out, small, extra)
    print(f"[{setting}] {SETTINGS[setting][0]}: {' '.join(argv[1:])}", flush=True)
    result = subprocess.run(argv, env=env, check=False)
    if result.returncode != 0:
      print(f"[{setting}] failed with exit code {result.returncode}; going on.")
      continue
    with open(out) as f:
      run = json.load(f)
    runs[setting] = {k: v for k, v in run.items() if k != "rows"}
    rows += [{"setting": setting, **row} for row in run["rows"]]
  if rows:
    common.write_json(os.path.join(out_dir, "suite.json"), {"runs": runs, "rows": rows})
  return rows
