"""sdnet.conv: lax's convolution with gradients made of canonical forward convolutions."""
import functools
import re

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from sdnet import backend
from sdnet import conv
from sdnet import models
from tests import helpers

NHWC = ("NHWC", "HWIO", "NHWC")

# (input shape, kernel shape, strides, padding): every convolution of the CIFAR and
# ImageNet ResNets (3x3 stride 1 and 2, the 7x7/2 stem, 1x1 projections of stride 1 and
# 2), odd sizes (a remainder in the strided output), and lax's padding strings.
CASES = [
    ((4, 32, 32, 3), (3, 3, 3, 16), (1, 1), ((1, 1), (1, 1))),    # CIFAR stem
    ((4, 16, 16, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1))),  # CIFAR block
    ((4, 16, 16, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1))),  # CIFAR transition
    ((2, 33, 29, 8), (7, 7, 8, 8), (2, 2), ((3, 3), (3, 3))),     # ImageNet stem, odd
    ((2, 14, 14, 16), (1, 1, 16, 8), (1, 1), ((0, 0), (0, 0))),   # bottleneck 1x1
    ((2, 15, 14, 16), (1, 1, 16, 32), (2, 2), ((0, 0), (0, 0))),  # projection 1x1/2
    ((2, 15, 15, 8), (3, 3, 8, 8), (2, 2), ((1, 1), (1, 1))),     # 3x3/2, odd
    ((2, 11, 10, 4), (3, 3, 4, 6), (3, 2), "SAME"),
    ((2, 11, 10, 4), (3, 2, 4, 6), (2, 1), "VALID"),
]


def value_and_grads(conv_fn, x, w, strides, padding, dy):
  y, vjp = jax.vjp(lambda x, w: conv_fn(x, w, strides, padding, dimension_numbers=NHWC),
                   x, w)
  return y, vjp(dy)


def random_case(x_shape, w_shape, strides, padding, seed=0, groups=1):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
  y_shape = jax.eval_shape(lambda: lax.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=NHWC, feature_group_count=groups)).shape
  dy = jnp.asarray(rng.normal(size=y_shape), jnp.float32)
  return x, w, dy


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", CASES)
def test_values_and_gradients_equal_lax(x_shape, w_shape, strides, padding):
  x, w, dy = random_case(x_shape, w_shape, strides, padding)
  expected = value_and_grads(lax.conv_general_dilated, x, w, strides, padding, dy)
  got = value_and_grads(conv.conv_general_dilated, x, w, strides, padding, dy)
  helpers.assert_trees_close(got, expected, rtol=1e-5, atol=1e-4)


def test_gradients_inside_a_conditional_and_a_loop_equal_lax():
  x, w, dy = random_case(*CASES[2])
  strides, padding = CASES[2][2:]

  def nested(conv_fn):
    def loss(x, w, p):
      f = lambda x, w: conv_fn(x, w, strides, padding, dimension_numbers=NHWC)
      y = lax.cond(p, f, lambda x, w: jnp.zeros(dy.shape), x, w)
      y2, _ = lax.scan(lambda h, _: (h + f(x, w), None), y, None, length=2)
      return jnp.sum(y2 * dy)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w, jnp.asarray(True))

  helpers.assert_trees_close(nested(conv.conv_general_dilated),
                             nested(lax.conv_general_dilated), rtol=1e-5, atol=1e-3)


def test_gradients_under_pmap_equal_lax():
  devices = jax.local_device_count()
  x, w, dy = random_case((devices * 2, 16, 16, 8), (3, 3, 8, 8), (2, 2), ((1, 1), (1, 1)))
  shard = lambda a: a.reshape((devices, -1) + a.shape[1:])

  def grads(conv_fn):
    def per_device(x, w, dy):
      _, (gx, gw) = value_and_grads(conv_fn, x, w, (2, 2), ((1, 1), (1, 1)), dy)
      return gx, lax.psum(gw, "d")
    return jax.pmap(per_device, axis_name="d", in_axes=(0, None, 0))(shard(x), w, shard(dy))

  helpers.assert_trees_close(grads(conv.conv_general_dilated),
                             grads(lax.conv_general_dilated), rtol=1e-5, atol=1e-4)


def test_gradients_under_shard_map_equal_lax():
  # A kernel replicated over the mesh gets the devices' summed gradient, as with lax.
  from jax.sharding import Mesh, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  shard_map = getattr(jax, "shard_map", None)
  if shard_map is None:  # older jax
    from jax.experimental.shard_map import shard_map  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
  x, w, dy = random_case((8, 16, 16, 8), (3, 3, 8, 8), (2, 2), ((1, 1), (1, 1)))

  def grads(conv_fn):
    per_device = lambda x, w, dy: value_and_grads(conv_fn, x, w, (2, 2), ((1, 1), (1, 1)),
                                                  dy)[1]
    return jax.jit(shard_map(per_device, mesh=mesh, in_specs=(P("d"), P(), P("d")),
                             out_specs=(P("d"), P())))(x, w, dy)

  helpers.assert_trees_close(grads(conv.conv_general_dilated),
                             grads(lax.conv_general_dilated), rtol=1e-5, atol=1e-4)


def test_bfloat16_gradients_keep_the_input_dtypes():
  x, w, dy = random_case(*CASES[1])
  x, w, dy = (a.astype(jnp.bfloat16) for a in (x, w, dy))
  y, (gx, gw) = value_and_grads(conv.conv_general_dilated, x, w, (1, 1), "SAME", dy)
  _, (ex, ew) = value_and_grads(lax.conv_general_dilated, x, w, (1, 1), "SAME", dy)
  assert y.dtype == gx.dtype == gw.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(gw), np.float32(ew), rtol=0.05, atol=0.5)
  np.testing.assert_allclose(np.float32(gx), np.float32(ex), rtol=0.05, atol=0.5)


# Depthwise convolutions (one filter per channel): ConvNeXt's 7x7, strided, odd sizes,
# asymmetric and string paddings.
DEPTHWISE = [
    ((4, 16, 16, 8), (7, 7, 1, 8), (1, 1), ((3, 3), (3, 3))),
    ((2, 15, 13, 6), (3, 3, 1, 6), (2, 2), ((1, 1), (1, 1))),
    ((2, 11, 10, 5), (3, 2, 1, 5), (3, 2), "SAME"),
    ((2, 11, 10, 5), (5, 5, 1, 5), (1, 2), "VALID"),
    ((2, 9, 9, 4), (3, 3, 1, 4), (2, 2), ((0, 2), (2, 0))),
]


def depthwise(conv_fn, channels):
  return functools.partial(conv_fn, feature_group_count=channels)


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", DEPTHWISE)
def test_depthwise_values_and_gradients_equal_lax(x_shape, w_shape, strides, padding):
  x, w, dy = random_case(x_shape, w_shape, strides, padding, groups=x_shape[-1])
  channels = x_shape[-1]
  expected = value_and_grads(depthwise(lax.conv_general_dilated, channels), x, w, strides,
                             padding, dy)
  got = value_and_grads(depthwise(conv.conv_general_dilated, channels), x, w, strides,
                        padding, dy)
  helpers.assert_trees_close(got, expected, rtol=1e-5, atol=1e-4)


def test_depthwise_gradients_inside_a_conditional_and_under_shard_map_equal_lax():
  from jax.sharding import Mesh, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  shard_map = getattr(jax, "shard_map", None)
  if shard_map is None:  # older jax
    from jax.experimental.shard_map import shard_map  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
  shape, w_shape, strides, padding = DEPTHWISE[0]
  x, w, dy = random_case(shape, w_shape, strides, padding, groups=shape[-1])

  def grads(conv_fn):
    f = depthwise(conv_fn, shape[-1])

    def per_device(x, w, dy, p):
      loss = lambda x, w: jnp.sum(dy * lax.cond(
          p, lambda x, w: f(x, w, strides, padding, dimension_numbers=NHWC),
          lambda x, w: x * 0.0, x, w))  # ConvNeXt's: the output has x's shape
      return jax.grad(loss, argnums=(0, 1))(x, w)
    return jax.jit(shard_map(per_device, mesh=mesh, in_specs=(P("d"), P(), P("d"), P()),
                             out_specs=(P("d"), P())))(x, w, dy, jnp.asarray(True))

  helpers.assert_trees_close(grads(conv.conv_general_dilated),
                             grads(lax.conv_general_dilated), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(rhs_dilation=(2, 2)), dict(lhs_dilation=(2, 2)),
                                    dict(feature_group_count=2)])
def test_unsupported_features_fall_back_to_lax(kwargs):
  groups = kwargs.get("feature_group_count", 1)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 9, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 4 // groups, 4)), jnp.float32)
  grad = lambda c, **kw: jax.grad(lambda w: jnp.sum(
      c(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC, **kw) ** 2))
  assert "custom_vjp" not in str(jax.make_jaxpr(grad(conv.conv_general_dilated, **kwargs))(w))
  if groups == 1:  # the same call without the feature: ours
    assert "custom_vjp" in str(jax.make_jaxpr(grad(conv.conv_general_dilated))(w))
  else:  # one filter per channel (kernel (3, 3, 1, 4)) is ours too
    depthwise_grad = jax.grad(lambda w: jnp.sum(conv.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC, feature_group_count=4)))
    assert "custom_vjp" in str(jax.make_jaxpr(depthwise_grad)(w[:, :, :1]))
  np.testing.assert_allclose(grad(conv.conv_general_dilated, **kwargs)(w),
                             grad(lax.conv_general_dilated, **kwargs)(w))


def test_conv_module_has_the_parameters_of_flax_conv():
  x = jnp.ones((2, 8, 8, 3))
  ours = conv.Conv(8, (3, 3), strides=2).init(jax.random.key(0), x)
  flax_conv = nn.Conv(8, (3, 3), strides=2).init(jax.random.key(0), x)
  helpers.assert_trees_close(ours, flax_conv, rtol=0, atol=0)
  np.testing.assert_allclose(conv.Conv(8, (3, 3), strides=2).apply(ours, x),
                             nn.Conv(8, (3, 3), strides=2).apply(ours, x), rtol=1e-6)


def convolutions_in_compiled_step(model):
  """The dimension labels of every convolution XLA compiles for a train step's gradient."""
  return _convolutions(_compiled_gradient(model))


def _compiled_gradient(model, compiler_options=None) -> str:
  loss, args = helpers.abstract_train_loss(model)
  return jax.jit(jax.grad(loss)).lower(*args).compile(
      compiler_options=compiler_options).as_text()


@functools.cache
def compiled_resnet8_gradient(skip: str, with_compiler_options: bool = False) -> str:
  """The compiled train-step gradient of a ResNet-8 with rolled stages (several tests
  read the same programs: compiled once per process)."""
  return _compiled_gradient(models.CifarResNet8(skip=skip, scan_unroll=1),
                            backend.compiler_options() if with_compiler_options else None)


def _convolutions(text: str) -> list:
  return re.findall(r"convolution\(.*dim_labels=([\w>-]+)", text)


@pytest.mark.parametrize("skip", ["cond", "compact"])
def test_cpu_train_step_holds_canonical_convolutions_only(skip):
  """The guard for jax #12868: XLA:CPU's fast path takes canonical convolutions only
  (input b01f, kernel 01io, output b01f); the library's models on CPU compute every
  gradient, also inside conditionals and loops, with such convolutions."""
  labels = _convolutions(compiled_resnet8_gradient(skip))
  assert labels and set(labels) == {"b01f_01io->b01f"}, labels
  lax_conv = functools.partial(nn.Conv, conv_general_dilated=lax.conv_general_dilated)
  lax_labels = convolutions_in_compiled_step(
      models.CifarResNet8(skip=skip, scan_unroll=1, conv=lax_conv))
  assert set(lax_labels) != {"b01f_01io->b01f"}  # what the test guards against


onednn = pytest.mark.skipif(not backend._rewrites_convolutions_to_onednn(),
                            reason="this jaxlib's XLA:CPU has no oneDNN convolutions")


def test_compiler_options_are_for_the_cpu_only(monkeypatch):
  assert backend.compiler_options()  # these tests run on CPU, with jax 0.10.2 or newer
  monkeypatch.setattr(backend, "platform", lambda: "gpu")
  assert backend.compiler_options() == {}


def test_with_the_compiler_options_no_convolution_is_ynnpack_s():
  """XLA:CPU's default gives convolutions of more than 16 channels to YNNPACK (slower
  than Eigen, and than oneDNN where the options can reach it: `sdnet.backend`)."""
  assert _ynn_fused_convolutions(compiled_resnet8_gradient("cond"))  # what it guards against
  assert not _ynn_fused_convolutions(compiled_resnet8_gradient("cond", True))


def _ynn_fused_convolutions(text: str) -> list:
  """The names of the computations that YNNPACK fusions call and hold a convolution."""
  called = set(re.findall(r"calls=%([\w.\-]+), [^\n]*__ynn_fusion", text))
  bodies = re.findall(r"^%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", text, re.M | re.S)
  return [name for name, body in bodies if name in called and "convolution(" in body]


@onednn
@pytest.mark.parametrize("x_shape,w_shape,strides,padding", CASES[:3])
def test_values_and_gradients_in_onednn_equal_lax(x_shape, w_shape, strides, padding):
  x, w, dy = random_case(x_shape, w_shape, strides, padding)
  expected = value_and_grads(lax.conv_general_dilated, x, w, strides, padding, dy)
  compute = jax.jit(functools.partial(value_and_grads, conv.conv_general_dilated,
                                      strides=strides, padding=padding),
                    compiler_options=backend.compiler_options())
  helpers.assert_trees_close(compute(x=x, w=w, dy=dy), expected, rtol=1e-5, atol=1e-3)


@onednn
def test_with_the_compiler_options_every_convolution_but_dilated_ones_is_onednn():
  """Also inside conditionals and rolled loops; oneDNN's rewrite leaves the input
  gradients of strided convolutions (input-dilated) to XLA's own kernels."""
  text = compiled_resnet8_gradient("cond", True)
  left = re.findall(r"convolution\(.*window=\{([^}]*)\}", text)
  assert len(left) == 2 and all("lhs_dilate=2x2" in window for window in left), left
  # The stem and 6 branch convolutions: 7 forward, 7 kernel gradients, 6 input gradients
  # (none for the stem), of which the 2 strided ones are left.
  assert text.count("__onednn$convolution") == 7 + 7 + 6 - 2
