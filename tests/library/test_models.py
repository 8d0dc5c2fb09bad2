import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdnet import backend, models, survival
from tests import helpers

X = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))


def cifar_param_count(depth, num_classes=10):
  """Parameters of the 6n+2 CIFAR ResNet with biased convs, counted by hand."""
  n = (depth - 2) // 6
  conv = lambda cin, cout, k=3: k * k * cin * cout + cout
  bn = lambda c: 2 * c
  total = conv(3, 16) + bn(16)
  cin = 16
  for c in (16, 32, 64):
    for _ in range(n):
      total += conv(cin, c) + bn(c) + conv(c, c) + bn(c)
      cin = c
  return total + 64 * num_classes + num_classes


@pytest.mark.parametrize("depth", [20, 56, 110, 1202])
def test_cifar_parameter_counts(depth):
  model = models.CifarResNet(depth)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), X, train=False))
  assert models.count_params(shapes["params"]) == cifar_param_count(depth)
  assert model.num_blocks == 3 * (depth - 2) // 6


def test_known_parameter_counts_and_output_shapes():
  expected = {20: 270_410, 56: 855_050, 110: 1_732_010, 1202: 19_466_090}
  for depth, count in expected.items():
    assert cifar_param_count(depth) == count
  r50 = jax.eval_shape(lambda: models.ImageNetResNet50().init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  assert models.count_params(r50["params"]) == 25_557_032  # the standard ResNet-50
  out = jax.eval_shape(lambda v: models.ImageNetResNet50(num_classes=1000).apply(
      v, jnp.zeros((2, 64, 64, 3))), r50)
  assert out.shape == (2, 1000)
  model = models.CifarResNet20(num_classes=100)
  v = model.init(jax.random.key(0), X)
  assert model.apply(v, X).shape == (4, 100)
  assert v["params"]["stage2_blocks"]["branch"]["Conv_0"]["kernel"].shape == (2, 3, 3, 32, 32)


@pytest.mark.parametrize("make,message", [
    (lambda: models.CifarResNet(21), "6n \\+ 2"),
    (lambda: models.CifarResNet(2), "6n \\+ 2"),
    (lambda: models.ImageNetResNet(34), "must be one of"),
    (lambda: models.CifarResNet20(p_last=0.0), "p_last must lie in"),
    (lambda: models.CifarResNet20(survival=(0.5,) * 8), "got 8 survival probabilities"),
    (lambda: models.CifarResNet20(skip="cond", mode="row"), "cannot skip it whole"),
    (lambda: models.CifarResNet20(skip="compact", mode="row"), "cannot skip it whole"),
    (lambda: models.CifarResNet20(skip="fast"), "unknown skip implementation 'fast'"),
])
def test_bad_configuration_fails_at_construction(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_bad_call_arguments_fail_clearly():
  model = models.CifarResNet8()
  v = model.init(jax.random.key(0), X)
  train = lambda **kw: model.apply(v, X, train=True, mutable=["batch_stats"], **kw)
  with pytest.raises(ValueError, match="train=True needs the block gates"):
    train()
  with pytest.raises(ValueError, match=r"gates must have shape \(3,\)"):
    train(gates=jnp.ones((4,), bool))
  with pytest.raises(ValueError, match="Integers and seeds are not keys"):
    train(key=0)
  with pytest.raises(ValueError, match="not both"):
    train(key=jax.random.key(0), gates=jnp.ones((3,), bool))
  with pytest.raises(ValueError, match="at evaluation every block runs"):
    model.apply(v, X, key=jax.random.key(0))


def test_constant_depth_trains_without_key():
  model = models.CifarResNet8(p_last=1.0)
  v = model.init(jax.random.key(0), X)
  out, _ = model.apply(v, X, train=True, mutable=["batch_stats"])
  assert out.shape == (4, 10)


def train_step_outputs(model, variables, gates):
  def loss(params):
    logits, state = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                X, train=True, gates=gates, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(logits)), (logits, state["batch_stats"])
  grads, (logits, stats) = jax.grad(loss, has_aux=True)(variables["params"])
  return logits, grads, stats


GATE_PATTERNS = [
    [1, 1, 1, 1, 1, 1, 1, 1, 1],
    [1, 0, 1, 0, 1, 1, 0, 0, 1],  # transition of stage 2 (block 4) open, stage 3's closed
    [0, 0, 0, 1, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 0, 0],
]


@functools.lru_cache(maxsize=None)
def resnet20_variables():
  return models.CifarResNet20().init(jax.random.key(0), X)


@functools.lru_cache(maxsize=None)
def resnet20_step(skip):
  """One compiled training gradient per skip method; the gates are its argument."""
  model = models.CifarResNet20(skip=skip)
  return jax.jit(lambda v, gates: train_step_outputs(model, v, gates))


@functools.lru_cache(maxsize=None)
def resnet20_outputs(skip, pattern):
  return resnet20_step(skip)(resnet20_variables(), jnp.array(pattern, bool))


@pytest.mark.parametrize("pattern", GATE_PATTERNS)
@pytest.mark.parametrize("skip", ["cond", "compact"])
def test_skipping_gives_the_mask_references_logits_gradients_and_statistics(pattern, skip):
  helpers.assert_trees_close(resnet20_outputs(skip, tuple(pattern)),
                             resnet20_outputs("mask", tuple(pattern)), rtol=2e-5, atol=2e-5)


def test_imagenet_constant_depth_computes_what_every_gate_open_computes():
  """The bottleneck network too: its transitions' projection shortcuts sit inside the
  plain block's policy, outside the gated branch's."""
  images = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
  plain_model = models.ImageNetResNet(14, num_classes=5, p_last=1.0)
  gated_model = models.ImageNetResNet(14, num_classes=5, skip="cond")
  variables = plain_model.init(jax.random.key(0), images)

  # Images and variables are arguments: closed over, XLA spends tens of seconds
  # constant-folding the stem's max-pool gradient.
  @functools.partial(jax.jit, static_argnums=0)
  def outputs(model, variables, images, gates):
    def loss(params):
      logits, state = model.apply({"params": params,
                                   "batch_stats": variables["batch_stats"]}, images,
                                  train=True, gates=gates, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(logits)), (logits, state["batch_stats"])
    grads, (logits, stats) = jax.grad(loss, has_aux=True)(variables["params"])
    return logits, grads, stats
  helpers.assert_trees_close(outputs(plain_model, variables, images, None),
                             outputs(gated_model, variables, images, jnp.ones(4, bool)),
                             rtol=1e-4, atol=1e-4)  # gradients of up to ~100: rounding


def test_constant_depth_computes_what_every_gate_open_computes():
  """The plain network (p_L = 1: no gate, no conditional, each whole block saving for the
  backward pass what `sdnet.backend.branch_policy` says) gives the logits, gradients and
  statistics of the stochastic network with every gate open (whose branches save it)."""
  plain_model = models.CifarResNet20(p_last=1.0)
  plain = jax.jit(lambda v: train_step_outputs(plain_model, v, None))(resnet20_variables())
  helpers.assert_trees_close(plain, resnet20_outputs("cond", (1,) * 9),
                             rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("skip", ["cond", "mask", "compact"])
def test_dropped_blocks_get_zero_gradient_and_keep_statistics(skip):
  gates = GATE_PATTERNS[1]
  v = resnet20_variables()
  _, grads, stats = resnet20_outputs(skip, tuple(gates))
  # Blocks 1-3 form the stage1 scan; block 4 is stage2_first; 5-6 stage2 scan; ...
  layout = {"stage1_blocks": [0, 1, 2], "stage2_first": [3], "stage2_blocks": [4, 5],
            "stage3_first": [6], "stage3_blocks": [7, 8]}
  for name, blocks in layout.items():
    for leaf_grad, leaf_new, leaf_old in zip(
        jax.tree.leaves(grads[name]), jax.tree.leaves(stats[name]),
        jax.tree.leaves(v["batch_stats"][name])):
      for i, block in enumerate(blocks):
        pick = (lambda a: a[i]) if name.endswith("blocks") else (lambda a: a)
        if not gates[block]:
          assert np.all(pick(leaf_grad) == 0), (name, block)
          np.testing.assert_array_equal(pick(leaf_new), pick(leaf_old))
        else:
          assert not np.array_equal(pick(leaf_new), pick(leaf_old)), (name, block)
  assert np.any(grads["head"]["kernel"] != 0)


def test_evaluation_scales_each_branch_by_its_survival_probability():
  """Eval output = a constant-depth net whose last BN of branch l is scaled by p_l."""
  stochastic = models.CifarResNet20(p_last=0.3)
  p = stochastic.survival_probs()
  v = stochastic.init(jax.random.key(0), X)
  # Perturb statistics so that eval-mode BatchNorm is not the identity.
  v = jax.tree.map(lambda a: a + 0.1 * jnp.abs(jax.random.normal(jax.random.key(2), a.shape)),
                   v)
  layout = {"stage1_blocks": p[0:3], "stage2_first": p[3], "stage2_blocks": p[4:6],
            "stage3_first": p[6], "stage3_blocks": p[7:9]}
  params = jax.tree.map(lambda a: a, v["params"])
  for name, probs in layout.items():
    bn = dict(params[name]["branch"]["BatchNorm_1"])
    probs = jnp.asarray(probs, jnp.float32)
    scale = probs[:, None] if probs.ndim else probs
    bn = {k: val * scale for k, val in bn.items()}
    params[name] = {**params[name], "branch": {**params[name]["branch"], "BatchNorm_1": bn}}
  expected = models.CifarResNet20(p_last=1.0).apply({**v, "params": params}, X)
  got = stochastic.apply(v, X)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert not np.allclose(got, models.CifarResNet20(p_last=1.0).apply(v, X), atol=1e-3)


def test_explicit_gates_at_evaluation_run_a_sub_network():
  model = models.CifarResNet8(p_last=0.5)
  v = model.init(jax.random.key(0), X)
  np.testing.assert_allclose(model.apply(v, X, gates=jnp.ones(3, bool)), model.apply(v, X),
                             rtol=1e-6, atol=1e-6)
  assert not np.allclose(model.apply(v, X, gates=jnp.array([1, 0, 1], bool)),
                         model.apply(v, X))
  gates = jnp.array(GATE_PATTERNS[1], bool)
  v = models.CifarResNet20().init(jax.random.key(0), X)
  np.testing.assert_allclose(models.CifarResNet20(skip="compact").apply(v, X, gates=gates),
                             models.CifarResNet20(skip="mask").apply(v, X, gates=gates),
                             rtol=1e-5, atol=1e-6)


def test_dropped_branch_sits_in_a_conditional():
  model = models.CifarResNet8(skip="cond")
  v = model.init(jax.random.key(0), X)
  fn = lambda v, g: model.apply(v, X, train=True, gates=g, mutable=["batch_stats"])[0]
  jaxpr = jax.make_jaxpr(fn)(v, jnp.ones(3, bool)).jaxpr
  # Only the stem conv runs unconditionally; both convs of all three blocks are in conds.
  assert helpers.count_primitives(jaxpr, "conv_general_dilated", inside_cond=False) == 1
  assert helpers.count_primitives(jaxpr, "conv_general_dilated", inside_cond=True) == 6
  assert helpers.count_primitives(jaxpr, "cond") == 3
  lowered = jax.jit(fn).lower(v, jnp.ones(3, bool)).as_text()
  assert lowered.count("stablehlo.case") == 3
  mask_jaxpr = jax.make_jaxpr(
      lambda v, g: models.CifarResNet8(skip="mask").apply(
          v, X, train=True, gates=g, mutable=["batch_stats"])[0])(v, jnp.ones(3, bool))
  assert helpers.count_primitives(mask_jaxpr.jaxpr, "cond") == 0


def test_program_size_does_not_grow_with_depth():
  """ResNet-1202's train step lowers to the program size of ResNet-20's: stages scan.
  With compaction the program grows with the number of segments, bit_length(n)."""
  def lowered(model):
    loss, args = helpers.abstract_train_loss(model)
    return jax.jit(jax.grad(loss)).lower(*args)
  small = lowered(models.CifarResNet20(skip="cond", scan_unroll=1)).as_text()
  big = lowered(models.CifarResNet1202(skip="cond", scan_unroll=1))
  assert len(big.as_text()) < 1.1 * len(small)
  start = time.perf_counter()
  big.compile()
  print(f"ResNet-1202 train-step gradient compiled in {time.perf_counter() - start:.1f} s")
  compact_110 = lowered(models.CifarResNet110(skip="compact", scan_unroll=1)).as_text()
  compact_1202 = lowered(models.CifarResNet1202(skip="compact", scan_unroll=1)).as_text()
  assert len(compact_1202) < 8 / 5 * 1.1 * len(compact_110)  # 8 vs 5 segments per stage


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
  model = models.CifarResNet8(dtype=jnp.bfloat16)
  v = model.init(jax.random.key(0), X)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v))
  out, _ = model.apply(v, X, train=True, key=jax.random.key(1), mutable=["batch_stats"])
  assert out.dtype == jnp.float32
  ref = models.CifarResNet8().apply(v, X)
  np.testing.assert_allclose(model.apply(v, X), ref, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("skip", ["cond", "compact"])
def test_remat_gives_the_same_gradients(skip):
  pattern = tuple(GATE_PATTERNS[1])
  model = models.CifarResNet20(skip=skip, remat=True)
  remat = jax.jit(lambda v, gates: train_step_outputs(model, v, gates))(
      resnet20_variables(), jnp.array(pattern, bool))
  helpers.assert_trees_close(resnet20_outputs(skip, pattern), remat)


def test_row_mode_trains_with_per_example_gates():
  model = models.CifarResNet8(mode="row", p_last=0.5)
  v = model.init(jax.random.key(0), X)
  gates = jnp.zeros((3, 4), bool).at[:, 0].set(True)
  out, _ = model.apply(v, X, train=True, gates=gates, mutable=["batch_stats"])
  assert out.shape == (4, 10)
  with pytest.raises(ValueError, match=r"shape \(3, 4\)"):
    model.apply(v, X, train=True, gates=jnp.ones(3, bool), mutable=["batch_stats"])


def kernel_gradient_transpose_reads(text: str) -> list[int]:
  """For every fused transpose of a kernel gradient (`sdnet.conv`) in a compiled
  program's text, how many buffers it reads."""
  fusions = re.finditer(r"= f32\[[^\]]*\]\{[^}]*\} fusion\(([^)]*)\)[^\n]*"
                        r"kernel_gradient[^\n]*transpose\"", text)
  return [len(re.findall(r"%[\w.\-]+", f.group(1))) for f in fusions]


def test_plain_stages_unroll_only_where_xla_keeps_the_recomputation_out_of_transposes():
  """`backend.unroll_stages` unrolls a plain stage where this XLA keeps an
  optimization barrier out of its fusions: there a kernel gradient's transposes of an
  unrolled plain ResNet-20 each read one buffer; where it does not (jax 0.10.2), some
  recompute earlier blocks from their convolutions' outputs (many buffers), and the
  stages stay loops."""
  def compiled_gradient(model):
    loss, args = helpers.abstract_train_loss(model)
    return jax.jit(jax.grad(loss)).lower(*args).compile(
        compiler_options=backend.compiler_options()).as_text()
  unrolled = kernel_gradient_transpose_reads(
      compiled_gradient(models.CifarResNet20(p_last=1.0, scan_unroll=True)))
  assert unrolled
  recomputes = max(unrolled) > 2
  assert backend._fuses_through_barriers() == recomputes
  loss, args = helpers.abstract_train_loss(models.CifarResNet20(p_last=1.0))
  loops = jax.jit(jax.grad(loss)).lower(*args).as_text().count("stablehlo.while")
  assert (loops > 0) == recomputes
