"""Convolutions whose backward pass is made of ordinary forward convolutions.

XLA:CPU computes a convolution fast when it is "canonical": input (batch, space...,
channels), kernel (space..., in, out), output like the input, each spatial padding given
to the convolution itself. `lax`'s gradients of a convolution are convolutions with other
dimension numbers. At the top level of a program XLA:CPU rewrites them into canonical
ones; inside a nested computation (a `lax.cond` branch, a `scan`/`while` body) it does
not, and runs them on a slow generic path: jax issue #12868. Measured on 2 cores (NHWC
128x16x16x32, 3x3 kernel): the kernel gradient took 1000 ms inside `lax.cond` against 13 ms
at the top level, the input gradient 122 ms against 9 ms. So a block skipped by `cond`,
or a stage run as a rolled loop, paid more than it saved.

`conv_general_dilated` here is `lax.conv_general_dilated` with a custom VJP whose two
gradients are canonical convolutions of transposed operands. For an N-d convolution with
stride s, padding (lo, hi) and kernel size k per spatial dimension of input size n,
output size m = (n + lo + hi - k) // s + 1:

    y     = conv(x, W)                          x: (B, n, C), W: (k, C, O), y: (B, m, O)
    dL/dx = conv(dilate_s(dy), flip(W)^T)       flip(W)^T: (k, O, C), kernel reversed;
                                                padding (k - 1 - lo, k - 1 - hi + r),
                                                r = (n + lo + hi - k) mod s
    dL/dW = conv(x^T, dy^T, kernel dilation s)  x^T: (C, n, B) (batch <-> channels),
                                                dy^T: (m, B, O) as the kernel; padding
                                                (lo, (m - 1) s + k - n - lo); the result
                                                (C, k, O) transposed to (k, C, O); summed
                                                over chunks of the batch (kernel_gradient)

(dilate_s inserts s - 1 zeros between neighbours, as `lhs_dilation`). Both are exact: the
same sums as `lax`'s transposes, in the same order on XLA:CPU (the tests compare them).
The padding of dL/dW must be the convolution's own: padding x first with `jnp.pad` made
the same kernel gradient 2.2x slower (jax 0.10.2).

Depthwise convolutions (feature_group_count = C, one filter per channel: kernel
(k..., 1, C), ConvNeXt's 7x7) are XLA:CPU's slow path everywhere: lax's forward pass was
19x and its gradients 8x slower than the form below at the top level, and the gradients
60x slower again inside a conditional (benchmarks/README.md, "Drop path"). Here

    y     = sum over offsets o of slice_o(pad(x)) * W[o]     (k_1 * k_2 ... shifted products)
    dL/dx = the same with dilate_s(dy), flip(W) and the padding of dL/dx above
    dL/dW = conv(x^T, dy^T) grouped by channel: x as one example of C * B features
            (channel-major), dy as the kernel (m..., B, C), feature_group_count C, so each
            channel's B features contract with its own B kernel rows

which are fused elementwise sums and one grouped forward convolution; they equal lax's to
float rounding (the sums run in another order).

Supported: channels-last layouts (what `flax.linen.Conv` passes), any strides and
paddings, no dilation, no batch groups, no feature groups other than depthwise ones;
anything else falls back to `lax.conv_general_dilated` (whose gradients are then lax's
own). Forward-mode differentiation (`jax.jvp`) is not defined for a custom VJP: use `lax`
convolutions there.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import itertools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp


def _channels_last(ndim: int) -> lax.ConvDimensionNumbers:
  """(batch, space..., channels), (space..., in, out), (batch, space..., channels)."""
  spatial = tuple(range(1, ndim - 1))
  return lax.ConvDimensionNumbers(lhs_spec=(0, ndim - 1) + spatial,
                                  rhs_spec=(ndim - 1, ndim - 2) + tuple(range(ndim - 2)),
                                  out_spec=(0, ndim - 1) + spatial)


def _is_unit(value) -> bool:
  return value is None or all(v == 1 for v in value)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         **kwargs):
  """`lax.conv_general_dilated`, differentiated by canonical convolutions (module doc).
  Further keywords of newer lax (`out_sharding`, which `flax.nnx.Conv` passes) go to
  lax where they are set, and are dropped where they are None (the default)."""
  kwargs = {k: v for k, v in kwargs.items() if v is not None}
  ndim = lhs.ndim
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  depthwise = (feature_group_count > 1 and feature_group_count == lhs.shape[-1]
               == rhs.shape[-1] and rhs.shape[-2] == 1)
  if (dn != _channels_last(ndim) or not _is_unit(lhs_dilation) or not _is_unit(rhs_dilation)
      or (feature_group_count != 1 and not depthwise) or batch_group_count != 1
      or preferred_element_type is not None or kwargs):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type,
        **kwargs)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:-2], strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if depthwise:
    return _depthwise(lhs, rhs, strides, pads)
  return _conv(lhs, rhs, strides, pads, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, pads, precision):
  return lax.conv_general_dilated(x, kernel, strides, pads, precision=precision,
                                  dimension_numbers=_channels_last(x.ndim))


def _conv_fwd(x, kernel, strides, pads, precision):
  return _conv(x, kernel, strides, pads, precision), (x, kernel)


def _conv_bwd(strides, pads, precision, residuals, dy):
  x, kernel = residuals
  # The scopes name the two gradients in profiles (`benchmarks.step_profile`).
  with jax.named_scope("input_gradient"):
    dx = _summed_like(input_gradient(dy, kernel, x.shape, strides, pads, precision), x)
  with jax.named_scope("kernel_gradient"):
    dw = _summed_like(kernel_gradient(x, dy, kernel.shape, strides, pads, precision),
                      kernel)
  return dx, dw


def _summed_like(cotangent, primal):
  """Under `shard_map`, the cotangent of an input that is the same on every device (a
  replicated kernel) is the sum of the devices' cotangents: psum over the mesh axes the
  cotangent varies along and the input does not, as JAX's transpose of `pvary` does for
  lax's convolution. Elsewhere the cotangent itself."""
  extra = sorted(_varying_axes(cotangent) - _varying_axes(primal))
  return lax.psum(cotangent, tuple(extra)) if extra else cotangent


def _varying_axes(value) -> set:
  """The manual mesh axes `value` varies along (empty outside shard_map)."""
  typeof = getattr(jax, "typeof", None)
  if typeof is None:
    return set()
  aval = typeof(value)
  manual = getattr(aval, "manual_axis_type", None)  # newer jax
  return set(manual.varying) if manual is not None else set(getattr(aval, "vma", ()))


_conv.defvjp(_conv_fwd, _conv_bwd)


def input_gradient(dy, kernel, input_shape: Sequence[int], strides, pads, precision=None):
  """dL/dx = conv(dilate_s(dy), flip(W)^T), padding (k-1-lo, k-1-hi+r) (module doc)."""
  ndim = dy.ndim
  spatial = tuple(range(ndim - 2))
  flipped = lax.rev(kernel, spatial)
  flipped = lax.transpose(flipped, spatial + (ndim - 1, ndim - 2))  # (k..., O, C)
  padding = []
  for n, k, s, (lo, hi) in zip(input_shape[1:-1], kernel.shape[:-2], strides, pads):
    padding.append((k - 1 - lo, k - 1 - hi + (n + lo + hi - k) % s))
  dx = lax.conv_general_dilated(dy, flipped, (1,) * len(strides), padding,
                                lhs_dilation=strides, precision=precision,
                                dimension_numbers=_channels_last(ndim))
  return dx.astype(dy.dtype) if dx.dtype != dy.dtype else dx


def kernel_gradient(x, dy, kernel_shape: Sequence[int], strides, pads, precision=None):
  """dL/dW = sum over chunks c of the batch of conv(x_c^T, dy_c^T) (module doc).

  The sum over the batch runs in chunks of at least `MIN_CHUNK` examples: XLA:CPU
  computes the kernel gradient 2-3x faster from chunks of 16 than from a batch of 128
  (ResNet shapes, 2 cores: 32x32x16 18 -> 8 ms, 16x32x32 14 -> 5 ms on jax 0.12; 28 -> 10
  and 24 -> 9 ms on jax 0.10.2); the chunks' sums add in float32.
  """
  # Without the barrier XLA fuses the elementwise producers of x and dy (BatchNorm's
  # backward) into the transposes below, which then read six inputs in a cache-hostile
  # order: a plain unrolled ResNet-56 step took 1635 ms with the fusion, 1220 without
  # (jax 0.12); steps of rolled stages and of skipped blocks were unchanged. jax 0.10.2's
  # XLA:CPU drops the barrier before it fuses, so there plain stages stay loops
  # (`backend.unroll_stages`).
  x, dy = lax.optimization_barrier((x, dy))
  chunk = batch_chunk(x.shape[0])
  parts = [_kernel_gradient(x[i:i + chunk], dy[i:i + chunk], kernel_shape, strides, pads,
                            precision) for i in range(0, x.shape[0], chunk)]
  return functools.reduce(lambda a, b: a + b, parts)


MIN_CHUNK = 16


def batch_chunk(batch: int) -> int:
  """The smallest divisor of `batch` of at least MIN_CHUNK examples (or `batch`)."""
  return next((c for c in range(MIN_CHUNK, batch) if batch % c == 0), batch)


def _kernel_gradient(x, dy, kernel_shape, strides, pads, precision):
  """conv(x^T, dy^T) with kernel dilation s, batch and channels of x swapped."""
  ndim = x.ndim
  spatial = tuple(range(1, ndim - 1))
  lhs = lax.transpose(x, (ndim - 1,) + spatial + (0,))          # (C, n..., B)
  rhs = lax.transpose(dy, spatial + (0, ndim - 1))               # (m..., B, O)
  padding = []
  for n, m, k, s, (lo, _) in zip(x.shape[1:-1], dy.shape[1:-1], kernel_shape[:-2],
                                 strides, pads):
    padding.append((lo, (m - 1) * s + k - n - lo))
  dw = lax.conv_general_dilated(lhs, rhs, (1,) * len(strides), padding,
                                rhs_dilation=strides, precision=precision,
                                dimension_numbers=_channels_last(ndim))  # (C, k..., O)
  dw = lax.transpose(dw, tuple(range(1, ndim - 1)) + (0, ndim - 1))
  return dw.astype(x.dtype) if dw.dtype != x.dtype else dw


def shifted_sum(x, kernel, strides, pads, dilation=None):
  """sum over kernel offsets o of slice_o(pad(x)) * W[o]: a depthwise convolution of x
  (B, n..., C) with `kernel` (k..., 1, C), `pads` (lo, hi) per spatial dimension (negative
  crops) and x dilated by `dilation` (s - 1 zeros between neighbours). Accumulates in at
  least float32; returns x's dtype."""
  dilation = dilation or (1,) * len(strides)
  config = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(pads, dilation)] + [(0, 0, 0)]
  padded = lax.pad(x, jnp.zeros((), x.dtype), config)
  sizes = kernel.shape[:-2]
  out = [(n - k) // s + 1 for n, k, s in zip(padded.shape[1:-1], sizes, strides)]
  accumulate = jnp.promote_types(x.dtype, jnp.float32)
  total = None
  for offset in itertools.product(*(range(k) for k in sizes)):
    start = (0,) + offset + (0,)
    limit = ((x.shape[0],) + tuple(o + (m - 1) * s + 1 for o, m, s in
                                   zip(offset, out, strides)) + (x.shape[-1],))
    window = lax.slice(padded, start, limit, (1,) + tuple(strides) + (1,))
    term = window.astype(accumulate) * kernel[offset + (0,)].astype(accumulate)
    total = term if total is None else total + term
  return total.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, strides, pads):
  return shifted_sum(x, kernel, strides, pads)


def _depthwise_fwd(x, kernel, strides, pads):
  return _depthwise(x, kernel, strides, pads), (x, kernel)


def _depthwise_bwd(strides, pads, residuals, dy):
  x, kernel = residuals
  with jax.named_scope("input_gradient"):
    padding = [(k - 1 - lo, k - 1 - hi + (n + lo + hi - k) % s) for n, k, s, (lo, hi)
               in zip(x.shape[1:-1], kernel.shape[:-2], strides, pads)]
    flipped = lax.rev(kernel, tuple(range(kernel.ndim - 2)))
    dx = _summed_like(shifted_sum(dy, flipped, (1,) * len(strides), padding, strides)
                      .astype(x.dtype), x)
  with jax.named_scope("kernel_gradient"):
    dw = _summed_like(depthwise_kernel_gradient(x, dy, kernel.shape, strides, pads),
                      kernel)
  return dx, dw


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_kernel_gradient(x, dy, kernel_shape: Sequence[int], strides, pads):
  """dL/dW of a depthwise convolution as one convolution grouped by channel (module doc):
  x (B, n..., C) -> (1, n..., C * B), dy (B, m..., C) -> (m..., B, C)."""
  ndim = x.ndim
  batch, channels = x.shape[0], x.shape[-1]
  spatial = tuple(range(1, ndim - 1))
  lhs = lax.transpose(x, spatial + (ndim - 1, 0)).reshape((1,) + x.shape[1:-1]
                                                           + (channels * batch,))
  rhs = lax.transpose(dy, spatial + (0, ndim - 1))               # (m..., B, C)
  padding = [(lo, (m - 1) * s + k - n - lo) for n, m, k, s, (lo, _) in
             zip(x.shape[1:-1], dy.shape[1:-1], kernel_shape[:-2], strides, pads)]
  dw = lax.conv_general_dilated(lhs, rhs, (1,) * len(strides), padding,
                                rhs_dilation=strides, feature_group_count=channels,
                                dimension_numbers=_channels_last(ndim))  # (1, k..., C)
  return dw.reshape(tuple(kernel_shape)).astype(x.dtype)


class Conv(nn.Conv):
  """`flax.linen.Conv` computing with `sdnet.conv.conv_general_dilated`.

  The same parameters (names, shapes, initialisers) as `nn.Conv`, so the two load each
  other's checkpoints; only the gradient program differs.
  """
  conv_general_dilated: nn.linear.ConvGeneralDilatedT | None = conv_general_dilated

