"""Vision Transformers and ConvNeXts with drop path (`sdnet.vit`, `sdnet.convnext`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdnet import convnext, gates as gates_lib, models, vit
from tests import helpers

X = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
# The small configs, each with a visible branch (ConvNeXt's layer scale 1e-6 would hide
# any difference between skip methods in the logits).
SMALL = {
    "vit": lambda **kw: vit.ViT_Test(num_classes=5, **kw),
    "convnext": lambda **kw: convnext.ConvNeXt_Test(num_classes=5, layer_scale_init=0.5, **kw),
}


def init(model):
  """The variables of a small model at X (jitted: eager initialisation compiles every
  random draw apart, several times slower)."""
  return jax.jit(model.init)(jax.random.key(0), X)


def applier(model):
  """model.apply, jitted (op by op, the first call compiles every operation apart)."""
  return jax.jit(model.apply, static_argnames="train")


@pytest.mark.parametrize("make,expected", [
    (models.ViT_Ti16, 5_717_416),
    (models.ViT_S16, 22_050_664),
    (models.ViT_B16, 86_567_656),
    (models.ConvNeXt_T, 28_589_128),
    (models.ConvNeXt_S, 50_223_688),
    (models.ConvNeXt_B, 88_591_464),
])
def test_parameter_counts_are_timms(make, expected):
  model = make(num_classes=1000)
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  assert models.count_params(shapes["params"]) == expected
  assert jax.eval_shape(model.apply, shapes, images).shape == (2, 1000)


def test_survival_schedules_are_timms_linspace():
  rate = 0.3
  p = vit.ViT_Test(drop_path_rate=rate).survival_probs()
  np.testing.assert_allclose(p, np.repeat(1 - np.linspace(0, rate, 2), 2))
  model = models.ViT_S16(drop_path_rate=0.1)
  assert model.num_residuals == 24
  p = model.survival_probs()
  assert p[0] == p[1] == 1.0 and p[-2] == p[-1] == pytest.approx(0.9)
  np.testing.assert_allclose(p[::2], p[1::2])  # a block's two residuals share p_i
  model = models.ConvNeXt_T(drop_path_rate=0.1)  # one linspace over all 18 blocks
  assert model.num_residuals == 18
  np.testing.assert_allclose(model.survival_probs(), 1 - np.linspace(0, 0.1, 18))
  np.testing.assert_allclose(convnext.ConvNeXt_Test(drop_path_rate=rate).survival_probs(),
                             [1.0, 1 - rate / 2, 1 - rate])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_without_drop_path_training_equals_evaluation(name):
  model = SMALL[name]()
  v = init(model)
  apply = applier(model)
  evaluated = apply(v, X)
  assert evaluated.shape == (8, 5) and evaluated.dtype == jnp.float32
  helpers.assert_trees_close(apply(v, X, train=True), evaluated)
  helpers.assert_trees_close(apply(v, X, train=True, key=jax.random.key(3)), evaluated)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_evaluation_is_deterministic_and_unscaled_and_refuses_a_key(name):
  model = SMALL[name](drop_path_rate=0.5)
  v = init(model)
  apply = applier(model)
  evaluated = apply(v, X)
  np.testing.assert_array_equal(apply(v, X), evaluated)
  # "inverted" scales in training only: evaluation is the network without drop path.
  np.testing.assert_array_equal(applier(SMALL[name]())(v, X), evaluated)
  with pytest.raises(ValueError, match="at evaluation every block runs"):
    apply(v, X, key=jax.random.key(0))
  with pytest.raises(ValueError, match="train=True needs the block gates"):
    apply(v, X, train=True)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_key_draws_the_gates_that_explicit_gates_give(name):
  model = SMALL[name](drop_path_rate=0.5)
  v = init(model)
  apply = applier(model)
  key = jax.random.key(7)
  drawn = gates_lib.draw(key, model.survival_probs(), "row", X.shape[0])
  assert drawn.shape == (model.num_residuals, 8)
  trained = apply(v, X, train=True, key=key)
  helpers.assert_trees_close(apply(v, X, train=True, gates=drawn), trained)
  assert not np.allclose(trained, apply(v, X), atol=1e-3)  # some branch dropped
  with pytest.raises(ValueError, match="gates must have shape"):
    apply(v, X, train=True, gates=drawn[1:])


def _logits_and_grads(model, v):
  weights = jax.random.normal(jax.random.key(2), (8, 5))

  @jax.jit
  def run(params, key):
    def loss(params):
      logits = model.apply({"params": params}, X, train=True, key=key)
      return jnp.sum(logits * weights), logits
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, grads
  return run


@pytest.mark.parametrize("mode", ["row", "subset"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_gather_equals_mask_in_logits_and_gradients(name, mode):
  # Row mode in four groups of 2 rows (as on four devices): a switch over 2 batch sizes
  # per branch, not 8, which saves most of the compile time.
  kw = dict(drop_path_rate=0.5, mode=mode, row_groups=4 if mode == "row" else 1)
  masked = SMALL[name](skip="mask", **kw)
  gathered = SMALL[name](skip="gather", **kw)
  v = init(masked)
  # gather runs its branches in conditionals (row mode: a switch over batch sizes); the
  # gated blocks are one scan, so the program holds one block's conditionals.
  count = lambda m: helpers.count_primitives(jax.make_jaxpr(
      lambda p: m.apply(p, X, train=True, key=jax.random.key(0)))(v).jaxpr, "cond")
  assert count(masked) == 0
  if mode == "row":
    assert count(gathered) == (2 if name == "vit" else 1)
  run_masked, run_gathered = _logits_and_grads(masked, v), _logits_and_grads(gathered, v)
  for seed in range(3):
    key = jax.random.key(seed)
    logits, grads = run_masked(v["params"], key)
    helpers.assert_trees_close(run_gathered(v["params"], key), (logits, grads),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,message", [
    (lambda: vit.ViT_Test(scan_unroll=0), "scan_unroll must be a positive integer"),
    (lambda: convnext.ConvNeXt_Test(scan_unroll=False), "scan_unroll must be"),
    (lambda: vit.ViT_Test(drop_path_rate=1.0), "drop_path_rate must lie in"),
    (lambda: vit.ViT_Test(drop_path_rate=-0.1), "drop_path_rate must lie in"),
    (lambda: vit.ViT_Test(mode="rows"), "unknown mode 'rows'"),
    (lambda: vit.ViT_Test(skip="cond"), "skip='gather'"),
    (lambda: vit.ViT_Test(scaling="paperr"), "unknown scaling rule"),
    (lambda: vit.ViT_Test(row_groups=0), "row_groups must be a positive"),
    (lambda: vit.ViT_Test(num_heads=3), "num_heads \\(3\\) must divide hidden_size"),
    (lambda: convnext.ConvNeXt_Test(drop_path_rate=1.0), "drop_path_rate must lie in"),
    (lambda: convnext.ConvNeXt_Test(drop_path_rate=-0.1), "drop_path_rate must lie in"),
    (lambda: convnext.ConvNeXt_Test(mode="rows"), "unknown mode 'rows'"),
    (lambda: convnext.ConvNeXt_Test(skip="fast"), "unknown skip implementation"),
    (lambda: convnext.ConvNeXt_Test(dims=(16,)), "one entry per stage"),
    (lambda: convnext.ConvNeXt_Test(layer_scale_init=-1.0), "layer_scale_init"),
])
def test_bad_attributes_fail_at_construction(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_models_reexports_the_vision_families():
  assert models.ViT_S16 is vit.ViT_S16 and models.VisionTransformer is vit.VisionTransformer
  assert models.ConvNeXt_T is convnext.ConvNeXt_T and models.ConvNeXt is convnext.ConvNeXt
