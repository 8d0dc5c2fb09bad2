"""The benchmark times the training loop's own step."""
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import common
from benchmarks import settings
from benchmarks import timing
from experiments.training import steps

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_benchmark_small_run_writes_a_row_per_variant(tmp_path):
  out = tmp_path / "bench.json"
  subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--small", "--repeats=1",
                  "--calls=1", f"--out={out}"], cwd=REPO, check=True, capture_output=True,
                 env={**os.environ, "XLA_FLAGS": "", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"})
  rows = json.loads(out.read_text())["rows"]
  assert [r["variant"] for r in rows] == ["constant", "SD auto", "SD cond", "SD mask",
                                          "SD compact", "SD open", "SD closed"]
  assert rows[0]["ratio_to_constant"] == 1.0
  open_row = rows[5]
  assert open_row["variant"] == "SD open" and open_row["ratio_to_open"] == 1.0
  assert rows[0]["ratio_to_open"] == pytest.approx(rows[0]["median_ms"] /
                                                   open_row["median_ms"])
  for r in rows:
    assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["compile_s"] > 0
    assert r["memory_gib"] > 0


def test_compile_only_reports_memory_that_remat_lowers():
  # ResNet-20: stages of 3 blocks, which remat recomputes inside stage scans. (In
  # ResNet-8, whose blocks are all transitions, and ResNet-14's stages of 2, unrolled on
  # jax 0.12, the CPU's policy of keeping only convolution outputs needs as little memory
  # as full remat, whose recomputation peaks as high.)
  memory = {}
  for remat in (False, True):
    rows = timing.measure(common.cases(["20:16"]), compile_only=True, remat=remat,
                          skips=[], forced_gates=False)
    assert all(r["median_ms"] is None and r["compile_s"] > 0 for r in rows)
    memory[remat] = [r["memory_gib"] for r in rows]
  assert all(m_remat < m for m, m_remat in zip(memory[False], memory[True])), memory


def test_suite_runs_each_setting_in_its_own_process_and_merges_the_rows(tmp_path,
                                                                        monkeypatch):
  calls = []

  def fake_run(argv, env, check):
    del check
    calls.append((argv, env))
    out = next(a.split("=", 1)[1] for a in argv if a.startswith("--out="))
    failed = "--dtype=bfloat16" in argv
    if not failed:
      rows = [common.row(110, 128, "constant", [0.010, 0.011], 0.010, 1.0, 0.5),
              common.row(110, 128, "SD compact", [0.008], 0.010, 2.0, 0.4)]
      with open(out, "w") as f:
        json.dump({"jax": "x", "rows": rows}, f)
    return type("Done", (), {"returncode": 1 if failed else 0})()

  monkeypatch.setattr(settings.subprocess, "run", fake_run)
  settings.run_all(["x20", "cmdbuf_x20", "bf16_x20"], str(tmp_path), extra=["--repeats=9"])
  assert len(calls) == 3
  (x20, x20_env), (cmdbuf, cmdbuf_env), _ = calls
  assert "--steps_per_call=20" in x20 and "--repeats=9" in x20
  assert "command_buffer" not in x20_env.get("XLA_FLAGS", "")
  assert "+CONDITIONAL,+WHILE" in cmdbuf_env["XLA_FLAGS"]
  merged = json.loads((tmp_path / "suite.json").read_text())
  assert [(r["setting"], r["variant"]) for r in merged["rows"]] == [
      ("x20", "constant"), ("x20", "SD compact"),
      ("cmdbuf_x20", "constant"), ("cmdbuf_x20", "SD compact")]  # bf16 failed: left out
  assert abs(merged["rows"][1]["ratio_to_constant"] - 0.8) < 1e-9


def test_the_suites_imagenet_setting_times_the_papers_networks_and_checks_small():
  argv, _ = settings.command("imagenet_bf16", "out.json", small=False, extra=[])
  assert {"--family=imagenet", "--cases=50:256,152:128", "--dtype=bfloat16"} <= set(argv)
  argv, _ = settings.command("imagenet_bf16", "out.json", small=True, extra=[])
  assert "--small" in argv and "--image_size=64" in argv
  assert common.cases(["50:256"], small=True, family="imagenet") == [(14, 8)]
  assert common.cases(["50:256"], small=True) == [(8, 8)]


def test_suite_rejects_an_unknown_setting_before_running_anything(tmp_path, monkeypatch):
  monkeypatch.setattr(settings.subprocess, "run", lambda *a, **k: pytest.fail("ran"))
  with pytest.raises(ValueError, match="unknown settings \\['fast'\\]"):
    settings.run_all(["x20", "fast"], str(tmp_path))


def test_benchmark_and_training_loop_build_their_step_with_the_same_builder(tmp_path,
                                                                            monkeypatch):
  from experiments.training import loop
  from tests.experiments.test_training import tiny_config, tiny_dataset
  built = []
  original = steps.make_train_step

  def recording_builder(*args, **kwargs):
    built.append(kwargs["preprocess"])
    return original(*args, **kwargs)

  monkeypatch.setattr(steps, "make_train_step", recording_builder)
  timing.measure(common.cases([], small=True), skips=["mask"], forced_gates=False,
                 compile_only=True)
  assert len(built) == 2  # constant depth and SD mask
  loop.train_and_evaluate(tiny_config(halt_after_steps=1), str(tmp_path),
                          source=tiny_dataset())
  assert len(built) == 3


def test_interleaving_runs_every_variant_once_per_repetition_from_a_rotating_start():
  calls = []
  def run(name):
    calls.append(name)
    return float(len(calls))
  times = common.interleave({n: functools.partial(run, n) for n in "abc"}, repeats=6)
  assert calls == list("abc" "bca" "cab" "abc" "bca" "cab")
  # Each variant ran first, second and third twice; its times are its own runs'.
  assert times == {"a": [1.0, 6.0, 8.0, 10.0, 15.0, 17.0],
                   "b": [2.0, 4.0, 9.0, 11.0, 13.0, 18.0],
                   "c": [3.0, 5.0, 7.0, 12.0, 14.0, 16.0]}


def test_input_pipeline_rate_counts_every_image_it_moved():
  from tests.experiments.test_training import tiny_config, tiny_dataset
  config = tiny_config(steps_per_call=2)  # batch 8 over the 4 test devices, 2 steps/call
  ticks = iter([0.0, 2.0])
  rate = timing.input_images_per_s(tiny_dataset(), config, calls=3,
                                   clock=lambda: next(ticks))
  assert rate == 3 * 2 * 8 / 2.0


def test_the_kernel_benchmark_lists_every_convolution_of_the_network():
  import collections
  import jax
  from benchmarks import conv_kernels
  from sdnet import models
  for depth in (8, 20):
    model = models.CifarResNet(depth)
    params = jax.eval_shape(lambda m=model: m.init(jax.random.key(0),
                                                   jax.numpy.zeros((1, 32, 32, 3))))["params"]
    in_model = collections.Counter()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      if path[-1].key == "kernel" and leaf.ndim >= 4:  # (blocks,)? 3, 3, in, out
        in_model[leaf.shape[-2:]] += leaf.shape[0] if leaf.ndim == 5 else 1
    listed = collections.Counter()
    for conv in conv_kernels.inventory(depth):
      listed[(conv.in_features, conv.out_features)] += conv.count
      widens = conv.in_features != conv.out_features and conv.name != "stem"
      assert conv.stride == (2 if widens else 1), conv  # a stage's first convolution
    assert listed == in_model and sum(listed.values()) == depth - 1


def test_the_kernel_benchmark_sums_each_convolution_count_times_over_a_step(monkeypatch):
  from benchmarks import conv_kernels
  seconds = {"forward": 0.001, "input gradient": 0.002, "kernel gradient": 0.004}
  fake = lambda conv, batch, rng: {k: (lambda k=k: seconds[k], ()) for k in conv.kernels}
  monkeypatch.setattr(conv_kernels, "jax_kernels", fake)
  monkeypatch.setattr(conv_kernels, "_time", lambda fn, args, calls, block: fn())
  rows = conv_kernels.measure(20, 8, with_torch=False, repeats=3, calls=1)
  step = rows[-1]
  assert step["convolution"] == "ResNet-20 step" and step["count"] == 19
  # the stem has no input gradient: 19 forward, 18 input and 19 kernel gradients
  assert abs(step["median_ms"] - (19 * 1 + 18 * 2 + 19 * 4)) < 1e-9
  assert len(rows) == 1 + sum(len(c.kernels) for c in conv_kernels.inventory(20))


def test_the_imagenet_step_builds_with_its_augmentation_parameters():
  """ImageNet cases compile the experiments' step on 224 px (here 32) crops with the
  host's augmentation parameters in the batch, as the streaming source feeds it."""
  rows = timing.measure(common.cases(["14:4"]), compile_only=True, skips=[],
                        forced_gates=False, family="imagenet", image_size=32)
  assert [(r["variant"], r["family"]) for r in rows] == [("constant", "imagenet")]
  assert "ImageNet-14" in common.format_table(rows)
  _, classes, batch = timing.step_inputs("imagenet", 32, (4, 1, 2),
                                         np.random.default_rng(0))
  assert classes == 1000 and batch["augment"].shape == (4, 1, 2, 7)


@pytest.mark.e2e
def test_the_imagenet_input_benchmark_times_every_pipeline_it_has(tmp_path):
  out = tmp_path / "pipelines.json"
  done = subprocess.run([sys.executable, "-m", "benchmarks.input_pipeline", "--imagenet",
                         "--cores=1", "--batch=8", "--batches=2", "--repeats=1",
                         f"--out={out}"], cwd=REPO, capture_output=True, text=True,
                        timeout=600, env={**os.environ, "XLA_FLAGS": ""})
  assert done.returncode == 0, done.stderr[-3000:]
  rows = json.loads(out.read_text())["rows"]
  assert {(r["pipeline"], r["split"]) for r in rows} >= {
      ("ours, processes", "train"), ("ours, threads", "train"), ("ours, threads", "eval"),
      ("tf.data (flax)", "train"), ("tf.data (flax)", "eval")}
  assert all(r["images_per_s"] > 0 and r["cores"] == 1 for r in rows)


# ------------------------------------------------------------- where the step's time goes

_STAGE = "jit(_fun)/while/body/{}(ResNet)/ResNet._run_stage/while/body/Block/residual/"


@pytest.mark.parametrize("name, opcode, op_name, category", [
    ("custom-call.1.clone", "custom-call:__onednn$convolution",
     _STAGE.format("jvp") + "branch/Conv_0/add", "conv forward"),
    ("conv_general_dilated.86", "convolution",
     _STAGE.format("transpose(jvp") + "branch/Conv_0/input_gradient/conv_general_dilated",
     "conv input gradient"),
    ("transpose_copy_fusion.3", "fusion",
     _STAGE.format("transpose(jvp") + "branch/Conv_1/kernel_gradient/transpose",
     "conv kernel gradient"),
    # a backward convolution that absorbed the shortcut's gradient add (oneDNN's sum)
    ("custom-call.80.clone", "custom-call:__onednn$convolution",
     _STAGE.format("transpose(jvp") + "add_any", "conv input gradient"),
    ("wrapped_reduce-precision.4", "fusion",
     _STAGE.format("jvp") + "branch/reduce_precision", "remat copies (reduce_precision)"),
    ("bitcast_dynamic-update-slice_fusion", "fusion",
     "jit(_fun)/while/body/jvp(ResNet)/ResNet._run_stage/while/body/"
     "jit(dynamic_update_index_in_dim)/dynamic_update_slice", "loop slices, copies"),
    ("copy.12", "copy", "", "loop slices, copies"),
    ("broadcast_subtract_fusion.5", "fusion", _STAGE.format("jvp") + "branch/BatchNorm_0/sub",
     "BatchNorm, ReLU, add: forward"),
    ("compare_select_fusion.2", "fusion", _STAGE.format("transpose(jvp") + "branch/select_n",
     "BatchNorm, ReLU, add: backward"),
    ("add_multiply_fusion", "fusion", "jit(_fun)/while/body/update/mul", "update"),
    ("reverse_select_fusion", "fusion", "jit(_fun)/while/body/vmap(jit(_where))/select_n",
     "other"),
])
def test_the_profile_puts_each_instruction_of_the_step_in_its_category(name, opcode, op_name,
                                                                       category):
  from benchmarks import step_profile
  assert step_profile.categorize(name, opcode, op_name) == category


def test_the_profile_ends_an_asynchronous_thunk_at_its_end_event_and_splits_overlaps():
  from benchmarks import step_profile
  events = [(0, 10, "conv.1"), (40, 1, "end: conv.1"),     # asynchronous: 0-41
            (20, 40, "fusion.2"), (60, 2, "end: fusion.2"),  # 20-62, overlaps conv.1
            (5, 100, "ThunkExecutor::Execute"), (70, 10, "conv.1"), (80, 1, "end: conv.1")]
  intervals = step_profile.thunk_intervals(events)
  assert sorted(intervals) == [(0, 41, "conv.1"), (20, 62, "fusion.2"), (70, 81, "conv.1")]
  totals = step_profile.shared_time(intervals, lambda name: name.split(".")[0])
  # 0-20 conv alone, 20-41 shared, 41-62 fusion alone, 70-81 conv alone
  assert totals == {"conv": 20 + 10.5 + 11, "fusion": 10.5 + 21}
  assert sum(totals.values()) == 41 + 21 + 11  # the union of the busy time, never more


def test_the_profile_knows_every_instruction_the_compiled_step_runs():
  """Each traced thunk (an event with an "end: <name>" event) names an instruction of the
  program, on both JAX versions; the convolutions' three kernels and the update get time,
  and the categories add up to the time a thunk ran, which the step's wall time bounds."""
  from benchmarks import step_profile
  variant = timing.make_variant(8, 8, 0.5, "auto", 1)
  table = step_profile.instructions(variant["fn"].as_text())
  events, _ = step_profile.trace_events(variant, 1)
  thunks = {name[len("end: "):] for _, _, name in events if name.startswith("end: ")}
  assert len(thunks) > 50 and thunks <= set(table), sorted(thunks - set(table))[:5]
  breakdown = step_profile.jax_breakdown(variant, 2)
  for category in ("conv forward", "conv input gradient", "conv kernel gradient", "update"):
    assert breakdown[category] > 0, category
  assert breakdown["busy"] == pytest.approx(
      sum(breakdown[c] for c in step_profile.CATEGORIES))
  assert breakdown["busy"] <= 1.05 * breakdown["wall"] + 1.0


@pytest.mark.parametrize("op, ancestors, category", [
    ("aten::mkldnn_convolution", ("aten::conv2d",), "conv forward"),
    ("aten::convolution_backward", ("autograd::engine::evaluate_function: "
                                    "ConvolutionBackward0",), "conv gradients"),
    ("aten::native_batch_norm", ("aten::batch_norm",), "BatchNorm, ReLU, add: forward"),
    ("aten::add_", ("autograd::engine::evaluate_function: AddBackward0",),
     "BatchNorm, ReLU, add: backward"),
    ("aten::add_", ("Optimizer.step#SGD.step",), "update"),
    ("aten::nll_loss_forward", (), "other"),
])
def test_the_profile_puts_each_pytorch_operator_in_its_category(op, ancestors, category):
  from benchmarks import step_profile
  assert step_profile.torch_category(op, ancestors) == category


def test_forced_gates_give_the_model_exactly_the_pattern_asked_for():
  class Recorder:
    num_blocks = 5
    def apply(self, variables, x, train=False, **kwargs):
      return kwargs["gates"]
  pattern = [True, False, True, True, False]
  for key in range(3):
    gates = timing.ForcedGates(Recorder(), pattern).apply({}, None, train=True,
                                                          key=jax.random.key(key))
    assert gates.tolist() == pattern
  every = timing.ForcedGates(Recorder(), False).apply({}, None, train=True,
                                                      key=jax.random.key(0))
  assert every.tolist() == [False] * 5


def test_the_expected_sd_step_subtracts_each_blocks_drop_probability_times_its_saving():
  from benchmarks import expected_depth
  medians = {"open": 100.0, "stage1 closed": 80.0, "stage2 closed": 90.0}
  probs = np.array([1.0, 0.75, 0.5, 0.25])  # stages of two blocks
  out = expected_depth.expected_step(medians, (2, 2), probs)
  assert out["saving_stage1"] == 10.0 and out["saving_stage2"] == 5.0
  assert out["expected SD"] == 100.0 - (0.0 + 0.25) * 10.0 - (0.5 + 0.75) * 5.0
  sizes, p = expected_depth.stage_blocks(20, 0.5)
  assert sizes == (3, 3, 3) and p[-1] == 0.5 and np.all(np.diff(p) < 0)


def test_rows_merged_over_processes_take_each_ratio_within_its_process():
  def process(constant_s, sd_s, open_s, sd_blocks):
    rows = [common.row(110, 128, name, [s], constant_s, 1.0, 0.5, blocks_computed=blocks)
            for name, s, blocks in (("constant", constant_s, 1.0), ("SD auto", sd_s, sd_blocks),
                                    ("SD open", open_s, 1.0))]
    return common.with_ratio_to(rows, "SD open")
  # The second process's clock runs 1.5x slower: its ratios still count as its own.
  runs = [process(1.0, 0.8, 1.1, 0.7), process(1.5, 1.29, 1.5, 0.8),
          process(1.1, 0.9, 1.0, 0.78)]
  merged = common.merge_processes(runs)
  assert [r["variant"] for r in merged] == ["constant", "SD auto", "SD open"]
  constant, sd, _ = merged
  assert sd["ratio_to_constant"] == pytest.approx(np.median([0.8, 0.86, 0.9 / 1.1]))
  assert sd["ratio_to_constant_range"] == pytest.approx([0.8, 0.86])
  assert constant["ratio_to_open"] == pytest.approx(1.0)
  assert constant["ratio_to_open_range"] == pytest.approx([1.0 / 1.1, 1.1])
  assert sd["median_ms"] == pytest.approx(900) and (sd["min_ms"], sd["max_ms"]) == (800, 1290)
  assert sd["processes"] == 3 and sd["images_per_s"] == pytest.approx(128 / 0.9)
  assert sd["blocks_computed"] == pytest.approx(0.76)  # each process drew other gates
  assert "ratio range" in common.format_table(merged)
  with pytest.raises(ValueError, match="different variants"):
    common.merge_processes([runs[0], runs[1][:2]])


def test_a_measurement_across_processes_runs_the_program_once_per_process(tmp_path,
                                                                          monkeypatch):
  commands = []

  def fake_run(argv, check):
    del check
    commands.append(argv)
    out = next(a.split("=", 1)[1] for a in argv if a.startswith("--out="))
    seconds = 1.0 + len(commands) / 10
    rows = [common.row(20, 128, "constant", [seconds], seconds, 1.0, 0.5),
            common.row(20, 128, "SD auto", [0.8 * seconds], seconds, 1.0, 0.5)]
    with open(out, "w") as f:
      json.dump({"jax": "x", "rows": rows}, f)
    return subprocess.CompletedProcess(argv, 0)

  monkeypatch.setattr(common.subprocess, "run", fake_run)
  monkeypatch.setattr(sys, "argv", ["train_step.py", "--cases=20:128", "--processes=3",
                                    f"--out={tmp_path / 'ignored.json'}"])
  out = tmp_path / "merged.json"
  result = common.across_processes("benchmarks.train_step", 3, str(out))
  assert len(commands) == 3 and len({c[-1] for c in commands}) == 3
  for argv in commands:
    assert argv[1:5] == ["-m", "benchmarks.train_step", "--cases=20:128", "--processes=1"]
    assert sum(a.startswith("--out=") for a in argv) == 1
  assert json.loads(out.read_text()) == result
  assert len(result["processes"]) == 3 and result["jax"] == "x"
  assert result["rows"][1]["ratio_to_constant"] == pytest.approx(0.8)
  assert result["rows"][0]["median_ms"] == pytest.approx(1200)


def test_the_fraction_of_blocks_computed_is_what_the_timed_steps_drew(monkeypatch):
  from experiments.training import recipe
  from sdnet import gates as gates_lib
  drawn = []

  class RecordingGates(timing.ForcedGates):
    """The model, drawing its gates as it does and recording them on the host."""

    def survival_probs(self):
      return self.model.survival_probs()

    def apply(self, variables, x, train=False, *, key=None, **kwargs):
      if not train:
        return self.model.apply(variables, x, **kwargs)
      gates = gates_lib.resolve(key, None, self.model.survival_probs())
      jax.debug.callback(lambda g: drawn.append(np.asarray(g)), gates)
      return self.model.apply(variables, x, train=True, gates=gates, **kwargs)

  build = recipe.build_model
  monkeypatch.setattr(recipe, "build_model",
                      lambda *a, **k: RecordingGates(build(*a, **k), True))
  variant = timing.make_variant(8, 8, 0.5, "cond", 2, seed=3)
  assert timing.blocks_computed(variant) is None  # only the warm-up ran
  drawn.clear()
  timing.run_variant(variant, 3, 2)
  jax.effects_barrier()
  # Each step records its gates as often as its program runs the callback (forward and
  # recomputation), every step alike.
  steps_drawn = np.unique(np.stack(drawn), axis=0, return_counts=True)
  assert len(drawn) % 6 == 0 and len(steps_drawn[0]) > 1
  assert timing.blocks_computed(variant) == pytest.approx(np.mean(drawn))


def test_a_failed_process_stops_the_measurement_in_one_line(monkeypatch):
  monkeypatch.setattr(common.subprocess, "run",
                      lambda argv, check: subprocess.CompletedProcess(argv, 3))
  with pytest.raises(SystemExit, match="process 1 of 2 failed with exit code 3"):
    common.across_processes("benchmarks.train_step", 2)


def test_a_benchmark_pinned_to_one_core_runs_there_with_the_threads_it_starts():
  # In a process of its own: pinning the test worker would slow every later test.
  program = (
      "import os, threading\n"
      "from benchmarks import common\n"
      "print(common.use_cores(1))\n"
      "seen = []\n"
      "thread = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))\n"
      "thread.start(); thread.join()\n"
      "print(sorted(seen[0]))\n")
  done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                        check=True, cwd=REPO)
  pinned, thread_cpus = done.stdout.split("\n")[:2]
  first = min(os.sched_getaffinity(0))
  assert pinned == thread_cpus == f"[{first}]"


def test_asking_for_more_cores_than_the_process_may_use_fails_before_pinning():
  allowed = os.sched_getaffinity(0)
  with pytest.raises(SystemExit, match=f"--cores={len(allowed) + 1}: this process may use "
                                       f"only {len(allowed)} CPUs"):
    common.use_cores(len(allowed) + 1)
  assert os.sched_getaffinity(0) == allowed
  assert common.use_cores(0) == sorted(allowed)


def remat_marks_its_residuals() -> bool:
  """Whether `jax.checkpoint` marks a saved residual with `reduce_precision` now."""
  saves_y = jax.checkpoint_policies.save_only_these_names("y")
  def loss(x):
    block = lambda x: jax.numpy.sin(jax.ad_checkpoint.checkpoint_name(x * x, "y")).sum()
    return jax.checkpoint(block, policy=saves_y)(x)
  return "reduce_precision" in str(jax.make_jaxpr(jax.grad(loss))(np.ones(3)))


def test_the_variant_without_reduce_precision_leaves_remats_copies_out_while_traced():
  from benchmarks import backend_choices  # pylint: disable=g-import-not-at-top
  assert remat_marks_its_residuals()
  with backend_choices.choices(False, None, reduce_precision=False):
    assert not remat_marks_its_residuals()
  assert remat_marks_its_residuals()


def test_each_backend_choice_builds_the_network_it_names(monkeypatch):
  from benchmarks import backend_choices  # pylint: disable=g-import-not-at-top
  built = {}
  def make_variant(depth, batch, p_last, skip, steps_per_call, forced_gates=None):
    del depth, batch, skip, steps_per_call
    marks = "marks" if remat_marks_its_residuals() else "unmarked"
    name = f"{p_last}/{forced_gates}/{marks}"
    built[name] = built.get(name, 0) + 1
    return {"name": name, "compile_s": 0.0, "memory_gib": 0.0}
  monkeypatch.setattr(timing, "make_variant", make_variant)
  monkeypatch.setattr(timing, "run_variant", lambda variant, calls, steps: 1.0)
  rows = backend_choices.measure([(20, 8)], repeats=1, calls=1,
                                 variants=("plain", "plain without reduce_precision",
                                           "open without reduce_precision"))
  assert [r["variant"] for r in rows] == ["plain", "plain without reduce_precision",
                                          "open without reduce_precision", "open"]
  # Plain: p_L = 1 with no gate forced (False would close every gate); open: forced open.
  assert built == {"1.0/None/marks": 1, "1.0/None/unmarked": 1, "0.5/True/unmarked": 1,
                   "0.5/True/marks": 1}


@pytest.mark.e2e
def test_the_drop_path_benchmark_times_every_method_and_counts_the_rows_computed():
  from benchmarks import drop_path  # pylint: disable=g-import-not-at-top
  rows = drop_path.measure([("vit_test", 16, 8)], [0.5], ["mask", "gather", "subset"],
                           repeats=1, calls=2, seed=0)
  by_variant = {r["variant"]: r for r in rows}
  assert list(by_variant) == ["none", "mask 0.5", "gather 0.5", "subset 0.5"]
  assert by_variant["none"]["ratio_to_none"] == 1.0
  assert by_variant["mask 0.5"]["ratio_to_mask"] == 1.0
  assert by_variant["none"]["rows"] == by_variant["mask 0.5"]["rows"] == 1.0
  # ViT-Test: 2 blocks (p = 1 and 0.5), so subset runs 8 and 4 of 8 rows: 0.75.
  assert by_variant["subset 0.5"]["rows"] == 0.75
  # Bernoulli rows rounded up to capacities of 1 row (8 / 8): between 1/8 and 1 of the
  # gated residuals' rows, the ungated block's all.
  assert 0.5 + 0.5 / 8 <= by_variant["gather 0.5"]["rows"] <= 1.0
  for r in rows:
    assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["compile_s"] > 0


def test_the_drop_path_benchmark_builds_each_method_auto_and_rolled():
  from benchmarks import drop_path  # pylint: disable=g-import-not-at-top
  built = {m: drop_path.build("vit_test", 0.5, m) for m in
           ("none", "mask", "gather-rolled", "subset-mask-rolled", "subset")}
  assert [(b.mode, b.skip, b.drop_path_rate, b.scan_unroll) for b in built.values()] == [
      ("row", "auto", 0.0, "auto"), ("row", "mask", 0.5, "auto"), ("row", "gather", 0.5, 1),
      ("subset", "mask", 0.5, 1), ("subset", "gather", 0.5, "auto")]


def test_the_suites_drop_path_setting_runs_the_papers_models_and_checks_small():
  argv, _ = settings.command("drop_path", "out.json", small=False, extra=[])
  assert argv[1:3] == ["-m", "benchmarks.drop_path"]
  assert "--models=vit_s16:224:128,convnext_t:224:128" in argv
  argv, _ = settings.command("drop_path", "out.json", small=True, extra=[])
  assert {"--small", "--rates=0.5", "--calls=1"} <= set(argv)
  assert ("--torch" in argv) == settings.torch_available()


@pytest.mark.e2e
def test_the_nnx_benchmark_times_both_apis_on_the_same_variables():
  from benchmarks import nnx_step  # pylint: disable=g-import-not-at-top
  rows = nnx_step.measure([(8, 8)], ["cond", "mask"], 0.5, repeats=1, calls=1)
  assert [(r["api"], r["skip"]) for r in rows] == [
      ("linen", "cond"), ("nnx", "cond"), ("linen", "mask"), ("nnx", "mask")]
  for r in rows:
    assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["compile_s"] > 0
    assert (r["ratio_to_linen"] == 1.0) == (r["api"] == "linen")
