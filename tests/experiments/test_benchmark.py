"""The benchmark times the training loop's own step."""
import json

from absl import flags
from absl.testing import flagsaver
import pytest

from benchmarks import train_step
from experiments.lib import steps


def test_benchmark_small_run_writes_a_row_per_variant(tmp_path):
  flags.FLAGS(["benchmark"], known_only=True)
  out = tmp_path / "bench.json"
  with flagsaver.flagsaver(small=True, out=str(out), repeats=1, calls=1):
    train_step.main([])
  rows = json.loads(out.read_text())["rows"]
  assert [r["variant"] for r in rows] == ["constant", "SD auto", "SD cond", "SD mask",
                                          "SD compact", "SD open", "SD closed"]
  assert rows[0]["ratio_to_constant"] == 1.0
  for r in rows:
    assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["compile_s"] > 0
    assert r["memory_gib"] > 0


def test_compile_only_reports_memory_that_remat_lowers(tmp_path):
  flags.FLAGS(["benchmark"], known_only=True)
  memory = {}
  for remat in (False, True):
    out = tmp_path / f"remat{remat}.json"
    with flagsaver.flagsaver(small=False, cases=["20:64"], out=str(out), compile_only=True,
                             remat=remat, skips=["compact"]):
      train_step.main([])
    rows = json.loads(out.read_text())["rows"]
    assert all(r["median_ms"] is None and r["compile_s"] > 0 for r in rows)
    memory[remat] = [r["memory_gib"] for r in rows]
  assert all(m_remat < m for m, m_remat in zip(memory[False], memory[True])), memory


def test_suite_runs_each_setting_in_its_own_process_and_merges_the_rows(tmp_path,
                                                                        monkeypatch):
  from benchmarks import common, suite
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

  monkeypatch.setattr(suite.subprocess, "run", fake_run)
  flags.FLAGS(["suite"], known_only=True)
  with flagsaver.flagsaver(out_dir=str(tmp_path), settings=["x20", "cmdbuf_x20", "bf16_x20"],
                           small=False, extra=["--repeats=9"]):
    suite.main([])
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


def test_suite_rejects_an_unknown_setting_before_running_anything():
  from absl import app
  from benchmarks import suite
  flags.FLAGS(["suite"], known_only=True)
  with flagsaver.flagsaver(settings=["x20", "fast"]):
    with pytest.raises(app.UsageError, match="unknown settings \\['fast'\\]"):
      suite.main([])


def test_benchmark_and_training_loop_build_their_step_with_the_same_builder(tmp_path,
                                                                            monkeypatch):
  from experiments.lib import loop
  from tests.experiments.test_training import tiny_config, tiny_dataset
  built = []
  original = steps.make_train_step

  def recording_builder(*args, **kwargs):
    built.append(kwargs["augment"])
    return original(*args, **kwargs)

  monkeypatch.setattr(steps, "make_train_step", recording_builder)
  flags.FLAGS(["benchmark"], known_only=True)
  with flagsaver.flagsaver(small=True, out="", repeats=1, calls=1, skips=["mask"],
                           forced_gates=False, compile_only=True):
    train_step.main([])
  assert len(built) == 2  # constant depth and SD mask
  loop.train_and_evaluate(tiny_config(halt_after_steps=1), str(tmp_path),
                          dataset=tiny_dataset())
  assert len(built) == 3
