r"""Every speed measurement of the project in one command, one table.

  python -m benchmarks.suite --out_dir=bench                     # all settings (GPU)
  python -m benchmarks.suite --out_dir=bench --settings=x20,cmdbuf_x20
  python -m benchmarks.suite --out_dir=bench --small             # CPU check of the script

Each setting runs `benchmarks.train_step` in its own process, because XLA flags take
effect only when a process starts; `torch` runs `benchmarks.torch_reference`, the
authors' way of skipping (PyTorch eager, a Python `if` per block), when PyTorch is
installed. Ratios to constant depth are measured within one process; compare absolute
times across settings only from one machine and session. Every setting writes
OUT_DIR/SETTING.json; the merged rows go to OUT_DIR/suite.json.
"""

import json
import os
import subprocess
import sys

from absl import app
from absl import flags

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
    "torch": ("PyTorch eager, Python if per block (the authors' skipping)", "",
              "torch_reference", []),
}

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", "bench", "Where the JSON files go.")
flags.DEFINE_list("settings", list(SETTINGS), f"Settings to run, of {list(SETTINGS)}.")
flags.DEFINE_list("extra", [], "More arguments for every train_step run, e.g. "
                  "--extra=--repeats=9,--cases=110:128.")


def command(setting: str, out: str, small: bool, extra):
  """The argv and environment that run `setting`, writing its rows to `out`."""
  _, xla_flags, module, args = SETTINGS[setting]
  argv = [sys.executable, "-m", f"benchmarks.{module}", f"--out={out}", *args]
  if small:
    argv += ["--small", "--repeats=2", "--calls=1"]
  if module == "train_step":
    argv += list(extra)
    if small:
      argv = [a.replace("--steps_per_call=20", "--steps_per_call=2") for a in argv]
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


def main(argv):
  del argv
  unknown = sorted(set(FLAGS.settings) - set(SETTINGS))
  if unknown:
    raise app.UsageError(f"unknown settings {unknown}; choose from {list(SETTINGS)}.")
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  rows, runs = [], {}
  for setting in FLAGS.settings:
    if SETTINGS[setting][2] == "torch_reference" and not torch_available():
      print(f"[{setting}] skipped: PyTorch is not installed.")
      continue
    out = os.path.join(FLAGS.out_dir, f"{setting}.json")
    argv, env = command(setting, out, FLAGS.small, FLAGS.extra)
    print(f"[{setting}] {SETTINGS[setting][0]}: {' '.join(argv[1:])}", flush=True)
    result = subprocess.run(argv, env=env, check=False)
    if result.returncode != 0:
      print(f"[{setting}] failed with exit code {result.returncode}; going on.")
      continue
    with open(out) as f:
      run = json.load(f)
    runs[setting] = {k: v for k, v in run.items() if k != "rows"}
    rows += [{"setting": setting, **row} for row in run["rows"]]
  if not rows:
    raise SystemExit("no setting produced rows.")
  print("\n" + common.format_table(rows, max(len(r["setting"]) for r in rows)))
  with open(os.path.join(FLAGS.out_dir, "suite.json"), "w") as f:
    json.dump({"runs": runs, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
