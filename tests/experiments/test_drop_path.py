"""The drop-path experiment: ViT and ConvNeXt through the protocol, with DeiT's recipe."""
import json
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import default
from experiments.configs import drop_path
from experiments.training import checks
from experiments.training import loop
from experiments.training import recipe
from experiments.training import steps
from experiments.runtime import errors
from tests.experiments.test_faults import CLI_ENV
from tests.experiments.test_faults import ROOT
from tests.experiments.test_faults import comparable
from tests.experiments.test_faults import latest_meta
from tests.experiments.test_faults import read_metrics
from tests.experiments.test_training import tiny_dataset

ARGS = [f"{model}{method}{quick}" for model in drop_path.MODELS
        for method in ("", ",gather", ",mask", ",subset") for quick in ("", ",quick")]


@pytest.mark.parametrize("arg", ARGS)
def test_every_drop_path_config_builds_its_model_and_passes_the_checks(arg):
  config = drop_path.get_config(arg)
  checks.check_config(config)
  model = recipe.build_model(config, 10)
  probs = model.survival_probs()
  assert probs[0] == 1.0 and probs[-1] == pytest.approx(0.9)  # timm's linspace to 0.1
  assert model.mode == ("subset" if "subset" in arg else "row")
  assert model.scaling == "inverted"


def test_an_unknown_drop_path_argument_names_the_choices():
  with pytest.raises(ValueError, match="give one of vit, convnext"):
    drop_path.get_config("swin")
  with pytest.raises(ValueError, match="unknown drop-path run 'vit,fast'"):
    drop_path.get_config("vit,fast")


def test_the_cosine_schedule_warms_up_linearly_then_decays_to_the_minimum():
  config = drop_path.get_config("vit")  # 200 epochs, 5 of warm-up from 1e-6 to 1e-3
  lr = recipe.learning_rate_schedule(config, 100)
  assert float(lr(0)) == pytest.approx(1e-6, rel=1e-4)  # (float32)
  assert float(lr(250)) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
  assert float(lr(500)) == pytest.approx(1e-3)
  halfway = 500 + (20000 - 500) // 2
  assert float(lr(halfway)) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2, rel=1e-3)
  assert float(lr(20000)) == pytest.approx(1e-5)


def test_adamw_decays_kernels_only():
  config = drop_path.get_config("vit,quick")
  model = recipe.build_model(config, 10)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  tx = recipe.make_optimizer(config, optax.constant_schedule(1.0))
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # With no gradient AdamW's update is -lr * weight_decay * w where it decays, else 0.
  for path, update in jax.tree_util.tree_leaves_with_path(updates):
    param = helpers_get(params, path)
    decays = path[-1].key == "kernel"
    np.testing.assert_allclose(update, -0.05 * param if decays else 0 * param, rtol=1e-6)


def helpers_get(tree, path):
  for entry in path:
    tree = tree[entry.key]
  return tree


def test_label_smoothing_is_the_mixture_of_one_hot_and_uniform():
  logits = jax.random.normal(jax.random.key(0), (4, 10))
  labels = jnp.array([0, 3, 9, 3])
  smoothed = steps.cross_entropy(logits, labels, 0.1)
  log_p = jax.nn.log_softmax(logits)
  want = -(0.9 * log_p[jnp.arange(4), labels] + 0.1 * log_p.mean(-1))
  np.testing.assert_allclose(smoothed, want, rtol=1e-6)
  np.testing.assert_array_equal(steps.cross_entropy(logits, labels),
                                optax.softmax_cross_entropy_with_integer_labels(logits, labels))


@pytest.mark.parametrize("field,value,says", [
    ("optimizer", "adam", "optimizer must be one of sgd, adamw"),
    ("schedule", "linear", "schedule must be one of piecewise, cosine"),
    ("label_smoothing", 1.0, "label_smoothing must be a number in [0, 1)"),
    ("survival.drop_path_rate", -0.1, "survival.drop_path_rate must be a number in [0, 1)"),
    ("survival.mode", "token", "survival.mode must be one of batch, row, subset"),
    ("model.family", "swin", "model.family must be one of cifar, imagenet, vit, convnext"),
    ("min_learning_rate", 1.0, "min_learning_rate must be a number in [0, learning_rate"),
])
def test_a_bad_recipe_setting_is_one_line(field, value, says):
  config = default.override(drop_path.get_config("vit,quick"), {field: value})
  with pytest.raises(errors.UserError) as error:
    checks.check_config(config)
  assert says in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("model", [
    "vit", pytest.param("convnext", marks=pytest.mark.e2e)])  # (the everyday suite's time)
def test_gathering_and_masking_train_the_same_run_over_4_devices(tmp_path, model):
  """Per-example skipping and masking, same seed: the same losses, errors and parameters
  to float rounding over a few steps of the real loop (pmap over 4 devices, 2 rows
  each, gates drawn per device)."""
  dataset = tiny_dataset()
  runs = {}
  for method in ("gather", "mask"):
    config = drop_path.get_config(f"{model},{method},quick")
    config.survival.drop_path_rate = 0.5
    config.halt_after_steps, config.log_every_steps, config.eval_every_steps = 4, 1, 4
    runs[method] = loop.train_and_evaluate(config, str(tmp_path / method), source=dataset)
  gathered, masked = (comparable(read_metrics(tmp_path / m)) for m in ("gather", "mask"))
  assert len(gathered) == len(masked) >= 4
  for a, b in zip(gathered, masked):
    assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
  # Attention's key bias has zero gradient in exact arithmetic (softmax ignores a shift),
  # so Adam turns the float noise of its gradient into steps of about the learning rate:
  # it is compared at that scale, every other parameter to float rounding.
  for path, got in jax.tree_util.tree_leaves_with_path(runs["gather"].state.params):
    want = helpers_get(runs["mask"].state.params, path)
    key_bias = [getattr(e, "key", None) for e in path[-2:]] == ["key", "bias"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 if key_bias else 1e-6,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("mode,distinct", [("batch", 1), ("row", 4), ("subset", 4)])
def test_per_example_gates_are_drawn_per_device_and_batch_gates_alike(mode, distinct):
  """The train step gives every device the same gate key in batch mode (one mask per
  global batch) and its own in the row modes (else the i-th example of every device
  would share its gates)."""
  seen = []

  class Recorder:
    """A model that records the gate key it is given and returns zero logits."""
    def __init__(self):
      self.mode = mode

    def apply(self, variables, images, train, key, mutable):
      del train, mutable
      jax.debug.callback(lambda k: seen.append(tuple(np.asarray(k).ravel())),
                         jax.random.key_data(key))
      return jnp.zeros((images.shape[0], 10)) * variables["params"]["kernel"], {}

  params = {"kernel": jnp.ones(())}
  tx = optax.sgd(0.1)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                           opt_state=tx.init(params))
  batch = {"images": jnp.zeros((4, 2, 1)), "labels": jnp.zeros((4, 2), jnp.int32)}
  step = jax.pmap(lambda s, b, m: steps.train_step(
      s, b, m, model=Recorder(), tx=tx, seed_key=jax.random.key(0),
      preprocess=lambda b, k: b["images"]), axis_name=recipe.AXIS,
      in_axes=(None, 0, None), out_axes=(None, None))
  jax.block_until_ready(step(state, batch, steps.empty_metrics()))
  assert len(seen) == 4 and len(set(seen)) == distinct


def quick_cli(workdir, *extra):
  return [sys.executable, "-m", "experiments.cifar",
          "--config=experiments/configs/drop_path.py:vit,quick", f"--workdir={workdir}",
          "--config.batch_size=64", "--config.epochs=1", "--config.log_every_steps=5",
          "--config.checkpoint_every_steps=10", "--config.survival.drop_path_rate=0.5",
          *extra]


@pytest.mark.e2e
def test_the_quick_drop_path_run_resumes_bit_identically_after_sigkill(tmp_path):
  straight = subprocess.run(quick_cli(tmp_path / "straight"), cwd=ROOT, env=CLI_ENV,
                            capture_output=True, text=True, timeout=600)
  assert straight.returncode == 0, straight.stderr[-2000:]
  process = subprocess.Popen(quick_cli(tmp_path / "run"), cwd=ROOT, env=CLI_ENV,
                             stderr=subprocess.PIPE, text=True)
  try:
    for line in process.stderr:
      if "step 25/" in line:  # past the checkpoint of step 20
        process.send_signal(signal.SIGKILL)
        break
    assert process.wait(120) == -signal.SIGKILL
  finally:
    process.kill()
  killed_at, _ = latest_meta(tmp_path / "run")
  assert 10 <= killed_at < 25
  resumed = subprocess.run(quick_cli(tmp_path / "run"), cwd=ROOT, env=CLI_ENV,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resumed from step {killed_at}" in resumed.stderr
  a, b = (json.loads((d / "results.json").read_text())
          for d in (tmp_path / "run", tmp_path / "straight"))
  assert a["finished"] and b["finished"]
  for key in ("best_validation_error", "best_validation_step", "final_test_error", "steps"):
    assert a[key] == b[key], key
  assert latest_meta(tmp_path / "run")[1]["checksums"] == latest_meta(
      tmp_path / "straight")[1]["checksums"]
  ours, theirs = (comparable(read_metrics(tmp_path / d)) for d in ("run", "straight"))
  assert [r["step"] for r in ours] == [r["step"] for r in theirs]
  for mine, straight_record in zip(ours, theirs):
    assert mine == pytest.approx(straight_record, rel=1e-6, abs=1e-7), mine["step"]
