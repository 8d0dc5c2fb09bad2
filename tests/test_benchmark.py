import json

from absl.testing import flagsaver
from absl import flags

from benchmarks import train_step


def test_benchmark_small_run_writes_a_row_per_variant(tmp_path):
  flags.FLAGS(["benchmark"], known_only=True)
  out = tmp_path / "bench.json"
  with flagsaver.flagsaver(small=True, out=str(out), repeats=1, calls=1):
    train_step.main([])
  rows = json.loads(out.read_text())["rows"]
  assert [r["variant"] for r in rows] == ["constant", "SD cond", "SD mask", "SD compact"]
  assert rows[0]["ratio_to_constant"] == 1.0
  for r in rows:
    assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["compile_s"] > 0
