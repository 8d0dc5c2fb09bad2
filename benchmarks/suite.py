r"""Every speed measurement of the project in one command, one table.

  python -m benchmarks.suite --out_dir=bench                     # all settings (GPU)
  python -m benchmarks.suite --out_dir=bench --settings=x20,cmdbuf_x20
  python -m benchmarks.suite --out_dir=bench --small             # CPU check of the script

Each setting runs `benchmarks.train_step` in its own process, because XLA flags take
effect only when a process starts; `torch` runs `benchmarks.torch_reference`, the
authors' way of skipping (PyTorch eager, a Python `if` per block), when PyTorch is
installed; `drop_path` runs `benchmarks.drop_path` (a table of its own). Ratios to
constant depth are measured within one process; compare absolute
times across settings only from one machine and session. Every setting writes
OUT_DIR/SETTING.json; the merged rows go to OUT_DIR/suite.json (`benchmarks.settings`).
"""


from absl import app
from absl import flags

from benchmarks import common
from benchmarks import settings as settings_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", "bench", "Where the JSON files go.")
flags.DEFINE_list("settings", list(settings_lib.SETTINGS),
                  f"Settings to run, of {list(settings_lib.SETTINGS)}.")
flags.DEFINE_list("extra", [], "More arguments for every train_step run, e.g. "
                  "--extra=--repeats=9,--cases=110:128.")
flags.DEFINE_bool("small", False, "ResNet-8 at batch 8: a CPU check of the script.")


def main(argv):
  del argv
  try:
    rows = settings_lib.run_all(FLAGS.settings, FLAGS.out_dir, FLAGS.small, FLAGS.extra)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if not rows:
    raise SystemExit("no setting produced rows.")
  step_rows = [r for r in rows if "depth" in r]
  if step_rows:
    print("\n" + common.format_table(step_rows, max(len(r["setting"]) for r in step_rows)))
  drop_path_rows = [r for r in rows if "depth" not in r]
  if drop_path_rows:
    from benchmarks import drop_path  # pylint: disable=g-import-not-at-top
    print("\n" + drop_path.format_table(drop_path_rows))


if __name__ == "__main__":
  app.run(main)
