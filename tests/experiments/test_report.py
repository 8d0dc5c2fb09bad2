"""The report: figures and tables from small fake workdirs (nothing is trained)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from matplotlib import image as mpl_image
import numpy as np
import pytest

from experiments.report import document
from experiments.report import figures
from experiments.report import paper
from experiments.report import runs as runs_lib
from experiments.report import tables

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WINDOW_STEPS = (3, 2)  # two log windows per epoch, of unequal length
STEPS_PER_EPOCH = sum(WINDOW_STEPS)
BATCH = 128


def config_dict(dataset="cifar10", depth=110, p_last=0.5, rule="linear_decay", epochs=10,
                **extra):
  return {"dataset": dataset, "data_dir": "", "model": {"family": "cifar", "depth": depth},
          "survival": {"p_last": p_last, "rule": rule, "scaling": "paper"},
          "epochs": epochs, "lr_drop_fractions": [0.5, 0.75], "learning_rate": 0.1,
          "lr_drop_factor": 0.1, "warmup_epochs": 0.0, "batch_size": BATCH, "seed": 0,
          "log_every_steps": 3, **extra}


def fake_records(epochs, p_last, test=True):
  """Train windows and one evaluation per epoch; values that differ per window."""
  records, step = [], 0
  for epoch in range(1, epochs + 1):
    for window, steps in enumerate(WINDOW_STEPS):
      step += steps
      records.append({
          "step": step, "time": 1000.0 + step, "epoch": step / STEPS_PER_EPOCH,
          "train/loss": 2.0 / epoch + window, "train/error": 0.5 / epoch,
          "train/learning_rate": 0.1, "train/images_per_s": 1000.0 * (2 - p_last),
          "train/first_block_grad_abs": 1e-3 * (epoch + window) * (2 - p_last),
          "train/steps": steps,
          "train/seconds": steps * BATCH / (1000.0 * (2 - p_last))})
    evaluation = {"step": step, "time": 1000.5 + step, "epoch": step / STEPS_PER_EPOCH,
                  "validation/error": 0.3 - 0.01 * epoch + (0.05 if epoch == epochs else 0),
                  "validation/loss": 1.0}
    if test:
      evaluation.update({"test/error": 0.31 - 0.011 * epoch * p_last, "test/loss": 1.1})
    records.append(evaluation)
  return records


def make_run(root, name, *, with_results=True, finished=True, test=True, epochs=10,
             logged_epochs=None, **config_kw):
  """A workdir like the training loop's; returns (path, results or None, records)."""
  path = root / name
  path.mkdir()
  config = config_dict(epochs=epochs, **config_kw)
  records = fake_records(logged_epochs or epochs, config["survival"]["p_last"], test)
  (path / "config.json").write_text(json.dumps(config))
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  if not with_results:
    return path, None, records
  p_last = config["survival"]["p_last"]
  blocks = (config["model"]["depth"] - 2) // 2
  if config["survival"]["rule"] == "uniform":
    probs = [p_last] * blocks
  else:
    probs = [1 - (l / blocks) * (1 - p_last) for l in range(1, blocks + 1)]
  train_s = 100.0 * (1 + p_last)
  results = {
      "config": config, "dataset": f"{config['dataset']}: fake", "steps": 50,
      "epochs": float(logged_epochs or epochs), "steps_per_epoch": STEPS_PER_EPOCH,
      "finished": finished,
      "timing": {"train_s": train_s, "train_steps": 50, "evaluate_s": 3.0,
                 "checkpoint_s": 1.0, "compile_s": 5.0, "wall_s": train_s + 9},
      "train_images_per_s": 50 * BATCH / train_s,
      "seconds_per_epoch": train_s / epochs, "best_validation_error": 0.21,
      "best_validation_step": 45, "test_error_at_best_validation": 0.2 if test else None,
      "survival_probs": probs, "expected_depth": float(sum(probs)), "num_blocks": blocks,
      "parameters": 1000, "config_changes": []}
  if finished:
    results["final_validation_error"] = 0.26
    if test:
      results["final_test_error"] = 0.25 - 0.1 * (1 - p_last)
  (path / "results.json").write_text(json.dumps(results))
  return path, results, records


def line(ax, gid):
  [found] = [l for l in ax.get_lines() if l.get_gid() == gid]
  return found


def curves(ax):
  return [l for l in ax.get_lines() if l.get_gid() != figures.LR_DROP_GID]


@pytest.fixture
def pair(tmp_path):
  sd = make_run(tmp_path, "sd", p_last=0.5)
  constant = make_run(tmp_path, "constant", p_last=1.0)
  return sd, constant


def test_report_writes_markdown_that_embeds_pngs_that_decode(pair, tmp_path):
  out = tmp_path / "report"
  report, warnings = document.write_report([pair[0][0], pair[1][0]], out)
  assert warnings == []
  text = report.read_text()
  embedded = [part.split(")")[0] for part in text.split("](")[1:]]
  assert set(embedded) == {"learning_curves.png", "first_block_gradients.png",
                           "survival_probabilities.png"}
  for name in embedded:
    pixels = mpl_image.imread(out / name)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
  assert "p_L sweep" not in text  # two runs are no sweep


def test_learning_curves_hold_epoch_mean_loss_and_test_error_per_run(pair):
  runs = [runs_lib.load_run(p) for p, _, _ in pair]
  ax_error, ax_loss = figures.learning_curves_figure(runs).axes
  assert len(curves(ax_error)) == 2 and len(curves(ax_loss)) == 2
  for (path, _, records), p_last in zip(pair, (0.5, 1.0)):
    loss = line(ax_loss, f"{path.name}/loss")
    np.testing.assert_array_equal(loss.get_xdata(), np.arange(1, 11))
    # Epoch e: windows of 3 and 2 steps with losses 2/e and 2/e + 1.
    np.testing.assert_allclose(loss.get_ydata(), [2 / e + 2 / 5 for e in range(1, 11)])
    error = line(ax_error, f"{path.name}/error")
    tests = [100 * r["test/error"] for r in records if "test/error" in r]
    np.testing.assert_allclose(error.get_ydata(), tests)
    np.testing.assert_allclose(tests[-1], 100 * (0.31 - 0.11 * p_last))
  labels = [l.get_label() for l in curves(ax_error)]
  assert labels == ["SD p_L=0.5 (sd): test error", "constant depth (constant): test error"]
  drops = [l.get_xdata()[0] for l in ax_error.get_lines() if l.get_gid() == "lr_drop"]
  assert drops == [5.0, 7.5]
  assert ax_error.get_ylabel().startswith("test error")


def test_runs_without_test_split_plot_validation_error_and_say_so(tmp_path):
  path, _, records = make_run(tmp_path, "folder_run", test=False, dataset="folder",
                              warmup_epochs=1.0)
  run = runs_lib.load_run(path)
  ax_error, _ = figures.learning_curves_figure([run]).axes
  [error] = curves(ax_error)
  np.testing.assert_allclose(error.get_ydata(),
                             [100 * r["validation/error"] for r in records
                              if "validation/error" in r])
  assert "validation error" in error.get_label()
  assert ax_error.get_ylabel().startswith("validation error")
  assert sorted(l.get_xdata()[0] for l in ax_error.get_lines()
                if l.get_gid() == "lr_drop") == [1.0, 5.0, 7.5]
  [row] = tables.table1_rows([run])
  assert row.errors.split == "validation" and row.errors.at_best_validation == 0.21
  assert row.errors.final == 0.26 and row.paper_error is None
  markdown = tables.table1_markdown([row])
  assert "21.00% (validation)" in markdown and "no test split" in markdown


def test_table1_numbers_are_the_results_beside_the_papers(pair, tmp_path):
  svhn = make_run(tmp_path, "svhn", dataset="svhn_cropped", depth=152, epochs=50)
  other = make_run(tmp_path, "p08", p_last=0.8, epochs=500)
  runs = [runs_lib.load_run(p) for p, _, _ in (*pair, svhn, other)]
  rows = tables.table1_rows(runs)
  for row, (_, results, _) in zip(rows, (*pair, svhn, other)):
    assert row.errors.at_best_validation == results["test_error_at_best_validation"]
    assert row.errors.final == results["final_test_error"]
  assert [row.paper_error for row in rows] == [5.25, 6.41, 1.75, None]
  assert rows[0].notes == ("10 of 500 epochs: not comparable",)
  assert rows[2].notes == () and rows[3].notes == ()
  markdown = tables.table1_markdown(rows).splitlines()
  assert markdown[2].split(" | ")[5:8] == ["20.00%", "20.00%", "5.25%"]
  assert markdown[3].split(" | ")[5:8] == ["20.00%", "25.00%", "6.41%"]
  assert markdown[5].split(" | ")[7] == "-"


def test_paper_matches_dataset_depth_and_p_last():
  assert paper.error(paper.find("cifar100", 110), 0.5, "linear_decay") == 24.98
  assert paper.error(paper.find("cifar10", 1202), 1.0, "uniform") == 6.67
  assert paper.error(paper.find("cifar10", 110), 0.5, "uniform") is None
  assert paper.find("cifar10", 56) is None
  folder = paper.match(config_dict(dataset="folder", data_dir="/data/CIFAR-10", epochs=500))
  assert folder.setting.name == "CIFAR-10+" and "data may differ" in folder.notes[0]
  assert paper.match(config_dict(dataset="folder", data_dir="/data/flowers")).setting is None


def test_table2_pairs_stochastic_with_constant_and_gives_the_time_ratio(pair, tmp_path):
  make_run(tmp_path, "other_depth", p_last=1.0, depth=56)
  runs = [runs_lib.load_run(tmp_path / n) for n in ("sd", "constant", "other_depth")]
  [row] = tables.table2_rows(runs)
  assert (row.stochastic.name, row.constant.name) == ("sd", "constant")
  assert row.stochastic_timing.train_s == 150.0 and row.constant_timing.train_s == 200.0
  assert row.stochastic_timing.seconds_per_epoch == 15.0
  assert row.epoch_ratio == pytest.approx(0.75) and row.total_ratio == pytest.approx(0.75)
  cells = tables.table2_markdown([row]).splitlines()[2].split(" | ")
  assert cells[2:4] == ["15.0", "20.0"] and cells[8:10] == ["0.75", "0.75"]
  assert cells[10] == "15h07m vs 20h42m (0.73)"


def test_gradient_figure_holds_the_epoch_mean_of_each_run(pair):
  runs = [runs_lib.load_run(p) for p, _, _ in pair]
  ax = figures.gradient_figure(runs).axes[0]
  assert len(curves(ax)) == 2
  for run, factor in zip(runs, (1.5, 1.0)):
    values = line(ax, f"{run.name}/gradient").get_ydata()
    # Epoch e: windows of 3 and 2 steps with e and e + 1 (x 1e-3 x (2 - p_L)).
    np.testing.assert_allclose(values, [1e-3 * factor * (e + 0.4) for e in range(1, 11)])


def test_unfinished_runs_come_from_metrics_and_dirs_without_metrics_are_skipped(tmp_path):
  path, _, records = make_run(tmp_path, "halfway", with_results=False, logged_epochs=4)
  (tmp_path / "never_logged").mkdir()
  (tmp_path / "never_logged" / "config.json").write_text(json.dumps(config_dict()))
  runs, warnings = runs_lib.load_runs([path, tmp_path / "never_logged"])
  assert [r.name for r in runs] == ["halfway"]
  assert len(warnings) == 1 and "never_logged" in warnings[0]
  [row] = tables.table1_rows(runs)
  best = min((r for r in records if "validation/error" in r),
             key=lambda r: r["validation/error"])
  assert row.errors.at_best_validation == best["test/error"] and row.errors.final is None
  assert row.notes[0] == "unfinished (epoch 4.0 of 10)"
  assert "- (unfinished)" in tables.table1_markdown([row])
  timing = runs_lib.timing(runs[0])
  assert timing.images_per_s == pytest.approx(1500.0)
  assert timing.seconds_per_epoch == pytest.approx(STEPS_PER_EPOCH * BATCH / 1500.0)
  constant = runs_lib.load_run(make_run(tmp_path, "constant", p_last=1.0)[0])
  [pair] = tables.table2_rows([runs[0], constant])
  assert pair.epoch_ratio == pytest.approx(timing.seconds_per_epoch / 20.0)
  assert pair.total_ratio is None  # half a run's time is no total
  [(_, blocks, expected)] = tables.expected_depth_rows(runs)
  assert (blocks, expected) == (54, pytest.approx(40.25))


def test_diverged_runs_are_marked_and_use_their_metrics(tmp_path):
  path, _, records = make_run(tmp_path, "diverged", with_results=False, logged_epochs=3)
  results = {"diverged": True, "diverged_at_step": 16, "finished": False, "steps": 15,
             "config": config_dict(), "timing": {"train_s": 1.0},
             "best_validation_error": 0.27}
  (path / "results.json").write_text(json.dumps(results))
  [row] = tables.table1_rows([runs_lib.load_run(path)])
  assert row.notes[0] == "diverged at step 16"
  evaluations = [r for r in records if "validation/error" in r]
  assert row.errors.at_best_validation == evaluations[1]["test/error"]  # epoch 2 is best
  assert "- (diverged)" in tables.table1_markdown([row])


def test_sparse_test_records_are_named_in_the_legend(tmp_path):
  path, _, records = make_run(tmp_path, "svhn", dataset="svhn_cropped", depth=152)
  sparse = [{k: v for k, v in r.items() if not k.startswith("test/") or r["epoch"] < 4}
            for r in records]  # test only at the first evaluations, as at new bests
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sparse))
  fig = figures.learning_curves_figure([runs_lib.load_run(path)])
  [error] = curves(fig.axes[0])
  assert len(error.get_xdata()) == 3
  labels = [t.get_text() for t in fig.legends[0].get_texts()]
  assert labels[0] == "SD p_L=0.5 (svhn), test error at new best validation only"


def test_survival_figure_plots_each_runs_probabilities(pair):
  runs = [runs_lib.load_run(p) for p, _, _ in pair]
  ax = figures.survival_figure(runs).axes[0]
  assert len(ax.get_lines()) == 2
  for run, (_, results, _) in zip(runs, pair):
    plotted = line(ax, f"{run.name}/survival")
    np.testing.assert_array_equal(plotted.get_xdata(), np.arange(1, 55))
    np.testing.assert_allclose(plotted.get_ydata(), results["survival_probs"])
  assert "| sd | 0.5 (linear_decay) | 54 | 40.25 | 0.745 |" in tables.expected_depth_markdown(
      tables.expected_depth_rows(runs))


def test_sweep_has_a_line_per_rule_and_the_report_includes_it(tmp_path):
  settings = [("linear_decay", 0.2), ("linear_decay", 0.5), ("linear_decay", 1.0),
              ("uniform", 0.5), ("uniform", 0.8)]
  dirs = [make_run(tmp_path, f"{rule}_p{p}", rule=rule, p_last=p)[0] for rule, p in settings]
  dirs.insert(1, make_run(tmp_path, "again_p0.2", with_results=False, logged_epochs=3,
                          p_last=0.2)[0])  # unfinished: the finished p_L = 0.2 run is used
  make_run(tmp_path, "other_data", dataset="cifar100")
  fig = figures.plot_sweep(runs_lib.load_runs(dirs)[0])
  figures.save_figure(fig, tmp_path / "sweep.png")
  assert mpl_image.imread(tmp_path / "sweep.png").ndim == 3
  ax_error, ax_time = fig.axes
  linear, uniform = line(ax_error, "error/linear_decay"), line(ax_error, "error/uniform")
  np.testing.assert_allclose(linear.get_xdata(), [0.2, 0.5, 1.0])
  np.testing.assert_allclose(linear.get_ydata(), [20.0, 20.0, 20.0])
  np.testing.assert_allclose(uniform.get_xdata(), [0.5, 0.8, 1.0])  # constant on both
  np.testing.assert_allclose(uniform.get_ydata(), [20.0, 20.0, 20.0])
  np.testing.assert_allclose(line(ax_time, "time/linear_decay").get_ydata(),
                             [100 * (1 + p) / 60 for p in (0.2, 0.5, 1.0)])
  runs, _ = runs_lib.load_runs([*dirs, tmp_path / "other_data"])
  assert [len(g) for g in runs_lib.sweep_groups(runs)] == [6]
  report, _ = document.write_report([*dirs, tmp_path / "other_data"], tmp_path / "out")
  assert "![p_L sweep](p_last_sweep.png)" in report.read_text()


def test_cli_writes_the_report_and_warns_of_skipped_dirs(pair, tmp_path, capsys):
  (tmp_path / "never_logged").mkdir()
  (tmp_path / "never_logged" / "config.json").write_text(json.dumps(config_dict()))
  dirs = [str(pair[0][0]), str(pair[1][0]), str(tmp_path / "never_logged")]
  assert document.report(dirs, str(tmp_path / "out")) == 0
  assert (tmp_path / "out" / "REPORT.md").exists()
  printed = capsys.readouterr()
  assert printed.out.strip().endswith("REPORT.md")
  assert printed.err.startswith("warning: skipping") and "never_logged" in printed.err


def test_cli_refuses_a_directory_that_is_not_a_run_in_one_line(tmp_path):
  (tmp_path / "not_a_run").mkdir()
  done = subprocess.run(
      [sys.executable, "-m", "experiments.report", str(tmp_path / "not_a_run"),
       f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, check=False,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 2
  [message] = done.stderr.strip().splitlines()
  assert message.startswith("error: ") and str(tmp_path / "not_a_run") in message
  assert not (tmp_path / "out" / "REPORT.md").exists()


def test_damaged_side_files_are_left_out_and_named(pair, tmp_path):
  (sd_dir, _, _), (constant_dir, _, _) = pair
  with open(sd_dir / "metrics.jsonl", "a") as f:
    f.write('{"step": 99, "train/lo')  # a line cut short by a kill
  (constant_dir / "results.json").write_text("{garbled")
  report, warnings = document.write_report([sd_dir, constant_dir], tmp_path / "out")
  sd, constant = (runs_lib.load_run(d) for d in (sd_dir, constant_dir))
  assert sd.problems == ("1 damaged line(s) of metrics.jsonl left out",)
  assert all(r["step"] != 99 for r in sd.records)
  assert constant.results is None and "results.json is damaged" in constant.problems[0]
  assert len(warnings) == 2 and all(w in report.read_text() for w in warnings)


def imagenet_run(root, name, p_last, epochs, top1, top5):
  """An ImageNet ResNet-152 run's workdir: validation errors only, top-5 beside top-1."""
  path, results, _ = make_run(root, name, p_last=p_last, epochs=epochs, test=False,
                              dataset="imagenet2012", depth=152)
  config = {**results["config"], "model": {"family": "imagenet", "depth": 152}}
  results.update(config=config, best_validation_error=top1, final_validation_error=top1,
                 best_validation_top5_error=top5, final_validation_top5_error=top5,
                 dataset="imagenet2012: " + paper.ILSVRC_2012)
  (path / "config.json").write_text(json.dumps(config))
  (path / "results.json").write_text(json.dumps(results))
  return path


def test_imagenet_runs_show_top1_and_top5_beside_the_papers_validation_errors(tmp_path):
  dirs = [imagenet_run(tmp_path, "sd90", 0.5, 90, 0.2351, 0.0702),
          imagenet_run(tmp_path, "constant90", 1.0, 90, 0.2312, 0.0688),
          imagenet_run(tmp_path, "sd120", 0.5, 120, 0.2210, 0.0610)]
  rows = tables.table1_rows([runs_lib.load_run(d) for d in dirs])
  assert [row.paper_error for row in rows] == [23.38, 23.06, 21.98]
  assert rows[0].notes == ("validation error: the paper's ImageNet figures are "
                           "validation errors too",)
  markdown = tables.table1_markdown(rows).splitlines()
  assert markdown[2].split(" | ")[5:8] == [
      "23.51% (validation), top-5 7.02%", "23.51% (validation), top-5 7.02%", "23.38%"]
  [pair] = tables.table2_rows([runs_lib.load_run(d) for d in dirs])
  assert (pair.stochastic.name, pair.constant.name) == ("sd90", "constant90")
  report, _ = document.write_report(dirs, tmp_path / "out")
  assert "21.98%" in report.read_text() and "ImageNet: top-1 validation error" in (
      report.read_text())
  folder = paper.match({**json.loads((dirs[0] / "config.json").read_text()),
                        "dataset": "imagenet_folder"}, "imagenet_folder:imagenette: 9469")
  assert folder.setting.name == "ImageNet (90 epochs)" and "data may differ" in (
      folder.notes[0])


def test_side_files_of_the_wrong_kind_are_left_out_and_unwritable_outs_are_one_line(
    pair, tmp_path, capsys):
  """Found by injecting faults: fields of results.json of the wrong type, records of
  metrics.jsonl without an epoch or with non-numbers, an --out that is a file."""
  (sd_dir, sd_results, _), (constant_dir, _, _) = pair
  (sd_dir / "results.json").write_text(json.dumps({**sd_results, "survival_probs": "x"}))
  with open(constant_dir / "metrics.jsonl", "a") as f:
    f.write('{"step": 10}\n{"step": 11, "epoch": "e", "train/loss": 1}\n')
  report, warnings = document.write_report([sd_dir, constant_dir], tmp_path / "out")
  assert any("results.json is damaged (its survival_probs is 'x'" in w for w in warnings)
  assert any("2 damaged line(s) of metrics.jsonl" in w for w in warnings)
  (tmp_path / "a_file").write_text("x")
  assert document.report([str(sd_dir)], str(tmp_path / "a_file")) == 5
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
      f"error: cannot write the report into {tmp_path / 'a_file'}: File exists")
  assert document.report([str(tmp_path / "nowhere")], str(tmp_path / "o")) == 2
  assert "nowhere does not exist" in capsys.readouterr().err
