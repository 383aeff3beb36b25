"""2-D convolution (NHWC / HWIO) whose backward pass is fast on CPU, plus a linen ``Conv`` layer.

Why this exists
---------------
On the XLA CPU backend (jax 0.10.2) the *kernel* gradient of a convolution is far slower than the
forward pass: batch 64, 3x3, 16->32 channels on a 40x50 map takes ~20 ms forward and ~20 ms for
the input gradient but ~260-290 ms for the kernel gradient. XLA computes the kernel gradient as
one convolution whose "kernel" is the whole output gradient (40x50 spatially, contracting over
batch x height x width) and whose output is the tiny 3x3 weight tensor, a shape the CPU runtime
handles badly. Small CNN encoders therefore train several times slower per step than their
forward cost suggests.

What ``impl='cpu'`` does instead (values equal ``lax.conv_general_dilated`` up to float
summation order; figures are medians on 2 AMD EPYC cores, batch 64, see ``mmjax.bench.convolution``):

* **Kernel gradient**: the same XLA kernel-gradient convolution, issued once per *chunk of
  examples* (about ``_CHUNK_BYTES`` of input each, i.e. one 40x50x16 example or four 25x20x16
  ones) and summed in float32. Short contractions are fast: 40x50 16->32 ~23 ms (up to ~45 ms
  on a loaded host) instead of ~260-290 ms; 25x20 16->32 ~9 ms instead of ~16 ms.
* **Kernel gradient with 32 or more input channels**: per chunk of examples (about
  ``_PATCH_CHUNK_BYTES`` of patches), one matmul of the ``[rows, kh*kw*cin]`` patch matrix with
  the output gradient, contracted over the rows: 8x8 32->64 ~2.5 ms instead of ~4.4 ms, 12x10
  32->64 ~5 ms instead of ~8 ms (forward ~1.7-3 ms). With 16 or fewer channels the patch matrix
  is too narrow for a fast matmul and XLA's convolution per chunk stays faster.
* **One input channel** (spectrograms, grayscale images): XLA's convolution is ~7-10x slower
  than it should be for ``cin == 1``. The forward pass is a fused sum of ``kh*kw`` shifted
  broadcast multiplies (50x40 1->16: ~0.9 ms instead of ~6-9 ms) and the input gradient is one
  small matmul plus shifted adds (~2 ms instead of ~7 ms).
* Otherwise the forward pass and the input gradient are XLA's own (already fast; for stride 2
  XLA's input gradient takes ~2x the forward time, as it convolves the zero-dilated output
  gradient).

``impl='auto'`` picks ``'cpu'`` when ``jax.default_backend() == 'cpu'`` *at trace time* and
plain XLA (``'xla'``) otherwise, so GPU/TPU runs use cuDNN / XLA unchanged. To trace on a CPU
host for an accelerator, pass ``impl='xla'``.

``'cpu'`` is a ``jax.custom_vjp``: reverse-mode AD (``grad``, ``vjp``, ``value_and_grad``) works,
also under ``jit``, ``vmap``, ``remat`` and a batch sharded over devices, but forward-mode AD
(``jvp``, ``jacfwd``) does not; use ``impl='xla'`` for that.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from mmjax.nn.common import int_pair

IMPLS = ("auto", "xla", "cpu")
"""Valid values of ``impl``: ``'auto'`` (``'cpu'`` on the CPU backend, else ``'xla'``),
``'xla'`` (plain ``lax.conv_general_dilated``) and ``'cpu'`` (the CPU-tuned path)."""

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# Kernel gradient as one convolution: x's channels act as the batch and its batch as the
# contracted feature; the output gradient acts as the kernel; the result is HWIO.
_KERNEL_GRAD_DIMENSION_NUMBERS = ("CHWN", "IHWO", "HWNC")

_CHUNK_BYTES = 128 * 1024
"""Input bytes per kernel-gradient chunk. Of 32, 64, 128, 256 and 512 KiB, 128 KiB was fastest
or within noise of it for every benchmark layer (8x8 to 50x40 maps, 1 to 32 input channels)."""

_MATMUL_MIN_CHANNELS = 32
"""From this many input channels on, each chunk's kernel gradient is one patch matmul
(:func:`_kernel_grad_matmul`) instead of XLA's kernel-gradient convolution: 1.3-1.8x faster for
8x8, 12x10 and 25x20 (stride 2) maps with 32 input channels; slower for 16 or fewer channels."""

_PATCH_CHUNK_BYTES = 2 * 1024 * 1024
"""Patch-matrix bytes per chunk for the matmul kernel gradient. Layers alone ran as fast with 0.5-2 MiB; inside
the encoders' train steps 2 MiB (8 examples of 13x10x32, 16 of 8x8x32) was 10% faster than 1 MiB and 4 MiB (fewer
chunks, less per-op overhead against equally fast matmuls)."""

_MAX_CHUNKS = 64
"""Upper bound on the number of chunk convolutions, to bound program size and compile time."""

Padding = str | int | Sequence[int | tuple[int, int]]


def resolve_impl(impl: str) -> str:
    """Map ``impl`` to the implementation that will run: ``'xla'`` or ``'cpu'``.

    ``'auto'`` reads ``jax.default_backend()`` when called (i.e. at trace time).
    Raises ``ValueError`` naming the valid choices for anything else.
    """
    if impl not in IMPLS:
        raise ValueError(f"Unknown conv impl {impl!r}; expected one of {IMPLS}.")
    if impl == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return impl


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: int | Sequence[int] = (1, 1),
    padding: Padding = "SAME",
    impl: str = "auto",
) -> jax.Array:
    """2-D cross-correlation, equal to ``lax.conv_general_dilated`` with NHWC/HWIO/NHWC.

    Args:
      x: input ``[batch, height, width, in_channels]``.
      kernel: weights ``[kh, kw, in_channels, out_channels]``.
      strides: int or ``(sh, sw)``.
      padding: ``'SAME'``, ``'VALID'``, an int (same on every side), or per spatial
        dimension an int or a ``(low, high)`` pair.
      impl: ``'auto'``, ``'xla'`` or ``'cpu'`` (see the module docstring).

    Returns:
      ``[batch, out_height, out_width, out_channels]`` in the promoted dtype of the inputs.
    """
    impl = resolve_impl(impl)
    _check_operands(x, kernel)
    dtype = jnp.promote_types(x.dtype, kernel.dtype)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    strides = int_pair(strides, "strides")
    pads = explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
    if impl == "xla":
        return _xla_conv(x, kernel, strides, pads)
    return _conv2d_cpu(x, kernel, strides, pads)


def explicit_padding(
    padding: Padding,
    in_hw: Sequence[int],
    kernel_hw: Sequence[int],
    strides: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Normalise ``padding`` to ``((top, bottom), (left, right))`` exactly as lax does."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(
                f"padding must be 'SAME', 'VALID', an int or pairs; got {padding!r}."
            )
        pads = lax.padtype_to_pads(tuple(in_hw), tuple(kernel_hw), strides, padding.upper())
    elif isinstance(padding, int):
        pads = [(padding, padding)] * 2
    else:
        pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
        if len(pads) != 2 or any(len(p) != 2 for p in pads):
            raise ValueError(
                f"padding must give one int or (low, high) pair per spatial dim; got {padding!r}."
            )
    return tuple((int(lo), int(hi)) for lo, hi in pads)  # type: ignore[return-value]


def kernel_grad(
    x: jax.Array,
    g: jax.Array,
    kernel_hw: Sequence[int],
    *,
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
    examples_per_chunk: int | None = None,
) -> jax.Array:
    """Gradient of ``sum(conv2d(x, k) * g)`` with respect to ``k``, as float32 (or wider).

    Issues XLA's kernel-gradient convolution once per chunk of ``examples_per_chunk``
    examples (default: :func:`examples_per_chunk_for` with ``jax.device_count()`` read at
    trace time) and sums the partial results in float32. Chunk ``j`` holds examples
    ``j, j + K, j + 2K, ...`` (``K`` chunks): a batch sharded in contiguous blocks over
    devices then splits into chunks locally on each device, with no data movement.
    """
    batch = x.shape[0]
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    if g.size == 0:
        return jnp.zeros((*kernel_hw, x.shape[-1], g.shape[-1]), acc_dtype)
    if examples_per_chunk is None:
        if x.shape[-1] >= _MATMUL_MIN_CHANNELS:  # Chunk by the size of the patch matrix.
            example_bytes = g[0, ..., 0].size * math.prod(kernel_hw) * x.shape[-1] * x.dtype.itemsize
            chunk_bytes = _PATCH_CHUNK_BYTES
        else:
            example_bytes, chunk_bytes = x[0].size * x.dtype.itemsize, _CHUNK_BYTES
        examples_per_chunk = examples_per_chunk_for(batch, example_bytes, jax.device_count(), chunk_bytes)
    if batch % examples_per_chunk:
        raise ValueError(f"examples_per_chunk={examples_per_chunk} must divide the batch {batch}.")
    num_chunks = batch // examples_per_chunk
    one_chunk = functools.partial(
        _kernel_grad_matmul if x.shape[-1] >= _MATMUL_MIN_CHANNELS else _kernel_grad_conv,
        kernel_hw=tuple(kernel_hw), strides=strides, pads=pads,
    )
    if num_chunks == 1:
        return one_chunk(x, g)
    xs = x.reshape(examples_per_chunk, num_chunks, *x.shape[1:])
    gs = g.reshape(examples_per_chunk, num_chunks, *g.shape[1:])
    partials = [one_chunk(xs[:, j], gs[:, j]) for j in range(num_chunks)]
    return functools.reduce(jnp.add, partials)


def examples_per_chunk_for(
    batch: int, example_bytes: int, num_devices: int = 1, chunk_bytes: int = _CHUNK_BYTES
) -> int:
    """How many examples each kernel-gradient chunk holds (a divisor of ``batch``).

    Aims at ``chunk_bytes`` per chunk and at most ``_MAX_CHUNKS`` chunks. When
    several devices exist and divide the batch, the chunk size is a multiple of the device
    count so that a batch-sharded chunk still splits evenly across devices.
    """
    step = num_devices if num_devices > 1 and batch % num_devices == 0 else 1
    sizes = [c for c in range(step, batch + 1, step) if batch % c == 0]
    allowed = [c for c in sizes if batch // c <= _MAX_CHUNKS] or [batch]
    target = max(1, chunk_bytes // max(1, example_bytes))
    fitting = [c for c in allowed if c <= target]
    return max(fitting) if fitting else min(allowed)


def _kernel_grad_conv(x, g, *, kernel_hw, strides, pads):
    """XLA's kernel-gradient convolution for one chunk, accumulated in at least float32."""
    (kh, kw), (sh, sw) = kernel_hw, strides
    (h, w), (ho, wo) = x.shape[1:3], g.shape[1:3]
    # Same padding as jax's transpose rule (_conv_general_vjp_rhs_padding), no dilation:
    # the high side may be negative, which crops rows/columns the forward never read.
    grad_pads = [
        (lo, (out - 1) * s + 1 - size + k - 1 - lo)
        for (lo, _), out, s, size, k in zip(pads, (ho, wo), (sh, sw), (h, w), (kh, kw))
    ]
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    return lax.conv_general_dilated(
        x,
        g.astype(x.dtype),
        window_strides=(1, 1),
        padding=grad_pads,
        rhs_dilation=strides,
        dimension_numbers=_KERNEL_GRAD_DIMENSION_NUMBERS,
        preferred_element_type=acc_dtype,
    )


def _kernel_grad_matmul(x, g, *, kernel_hw, strides, pads):
    """The kernel gradient of one chunk as one matmul: patches ``[rows, kh*kw*cin]`` contracted with the
    output gradient ``[rows, cout]`` over the rows (``rows`` = examples x output positions).

    The patch matrix is built from ``kh*kw`` strided slices of the padded input. With 32 or more input
    channels its inner dimension is long enough for a fast matmul, which then beats XLA's kernel-gradient
    convolution (see the module docstring)."""
    (kh, kw), (sh, sw) = kernel_hw, strides
    n, _, _, cin = x.shape
    _, ho, wo, cout = g.shape
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    (top, bottom), (left, right) = pads
    pad_config = ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0))
    xp = lax.pad(x, jnp.zeros((), x.dtype), pad_config)
    taps = [
        lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin), (1, sh, sw, 1))
        for i in range(kh)
        for j in range(kw)
    ]
    patches = jnp.concatenate(taps, axis=-1).reshape(-1, kh * kw * cin)
    grad = lax.dot_general(
        patches, g.astype(x.dtype).reshape(-1, cout), (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype
    )
    return grad.reshape(kh, kw, cin, cout)


def _xla_conv(x, kernel, strides, pads):
    return lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=_DIMENSION_NUMBERS
    )


def _single_channel_conv(x, kernel, strides, pads):
    """Forward conv for ``in_channels == 1`` as a fused sum of shifted broadcast multiplies.

    Accumulates in at least float32 and casts back, so bf16 inputs lose no extra precision.
    """
    (kh, kw, _, cout), (sh, sw) = kernel.shape, strides
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    # lax.pad accepts negative padding (cropping), as the convolution does.
    (top, bottom), (left, right) = pads
    pad_config = ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0))
    xp = lax.pad(x.astype(acc_dtype), jnp.zeros((), acc_dtype), pad_config)
    n, hp, wp, _ = xp.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    if ho < 1 or wo < 1:
        return _xla_conv(x, kernel, strides, pads)
    k = kernel.astype(acc_dtype)
    out = jnp.zeros((n, ho, wo, cout), acc_dtype)
    for i in range(kh):
        for j in range(kw):
            limit = (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, 1)
            window = lax.slice(xp, (0, i, j, 0), limit, (1, sh, sw, 1))
            out = out + window * k[i, j, 0]
    return out.astype(x.dtype)


def _single_channel_input_grad(x_shape, kernel, g, strides, pads):
    """Input gradient for ``in_channels == 1``: one small matmul, then shifted adds (col2im).

    ``z = g @ kernel^T`` gives each tap's contribution ``[n, ho, wo, kh*kw]``; tap ``(i, j)``
    lands on padded input rows ``ho * sh + i`` and columns ``wo * sw + j``, which ``lax.pad``
    with interior padding expresses without a scatter. XLA's transposed convolution is
    ~3x slower for this shape.
    """
    (kh, kw, _, cout), (sh, sw) = kernel.shape, strides
    (top, bottom), (left, right) = pads
    n, ho, wo, _ = g.shape
    hp, wp = x_shape[1] + top + bottom, x_shape[2] + left + right
    acc_dtype = jnp.promote_types(g.dtype, jnp.float32)
    taps = kernel.astype(acc_dtype).reshape(kh * kw, cout)
    z = (g.astype(acc_dtype).reshape(-1, cout) @ taps.T).reshape(n, ho, wo, kh * kw)
    zero = jnp.zeros((), acc_dtype)
    dxp = jnp.zeros((n, hp, wp, 1), acc_dtype)
    for i in range(kh):
        for j in range(kw):
            tap = z[..., i * kw + j : i * kw + j + 1]
            rows = (i, hp - i - ((ho - 1) * sh + 1), sh - 1)
            cols = (j, wp - j - ((wo - 1) * sw + 1), sw - 1)
            dxp = dxp + lax.pad(tap, zero, ((0, 0, 0), rows, cols, (0, 0, 0)))
    # Undo the forward padding (negative padding crops; padded-away inputs get zeros back).
    return lax.pad(dxp, zero, ((0, 0, 0), (-top, -bottom, 0), (-left, -right, 0), (0, 0, 0)))


def _input_grad(x, kernel, g, strides, pads):
    if g.size == 0:
        return jnp.zeros_like(x)
    if kernel.shape[2] == 1:
        return _single_channel_input_grad(x.shape, kernel, g, strides, pads).astype(x.dtype)
    input_transpose = jax.linear_transpose(
        lambda x_: _xla_conv(x_, kernel, strides, pads), jax.ShapeDtypeStruct(x.shape, x.dtype)
    )
    return input_transpose(g.astype(x.dtype))[0]


def _forward(x, kernel, strides, pads):
    if kernel.shape[2] == 1:
        return _single_channel_conv(x, kernel, strides, pads)
    return _xla_conv(x, kernel, strides, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d_cpu(x, kernel, strides, pads):
    return _forward(x, kernel, strides, pads)


def _conv2d_cpu_fwd(x, kernel, strides, pads):
    return _forward(x, kernel, strides, pads), (x, kernel)


def _conv2d_cpu_bwd(strides, pads, residuals, g):
    x, kernel = residuals
    dx = _input_grad(x, kernel, g, strides, pads)
    dk = kernel_grad(x, g, kernel.shape[:2], strides=strides, pads=pads)
    return dx, dk.astype(kernel.dtype)


_conv2d_cpu.defvjp(_conv2d_cpu_fwd, _conv2d_cpu_bwd)


def _check_operands(x, kernel):
    if x.ndim != 4:
        raise ValueError(
            f"conv2d expects x as [batch, height, width, channels]; got shape {x.shape}."
        )
    if kernel.ndim != 4:
        raise ValueError(
            "conv2d expects kernel as [kh, kw, in_channels, out_channels]; "
            f"got shape {kernel.shape}."
        )
    if x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"Channel mismatch: x has shape {x.shape} ({x.shape[-1]} channels) but kernel has "
            f"shape {kernel.shape} (expects {kernel.shape[2]} input channels)."
        )



class Conv(nn.Module):
    """2-D convolution layer, parameter-compatible with ``flax.linen.Conv``.

    Same ``kernel`` ``[kh, kw, in_features, features]`` and ``bias`` ``[features]``
    parameters, defaults and dtype promotion as ``nn.Conv``, so parameters can be swapped
    between the two. Differences: 2-D only (an int ``kernel_size`` means a square kernel,
    whereas ``nn.Conv`` reads it as a 1-D kernel); no dilation, groups, masks, or
    CIRCULAR/REFLECT/CAUSAL padding; the extra ``impl`` chooses the implementation
    (see :func:`conv2d`).

    Inputs are ``[..., height, width, channels]``: no batch dimension, one, or several
    (flattened for the convolution and restored), as with ``nn.Conv``.
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Padding = "SAME"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    impl: str = "auto"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if inputs.ndim < 3:
            raise ValueError(
                f"Conv expects inputs [..., height, width, channels] (rank >= 3); got shape "
                f"{inputs.shape}."
            )
        batch_shape, image_shape = inputs.shape[:-3], inputs.shape[-3:]
        x = inputs.reshape((-1, *image_shape))
        kernel_shape = (*int_pair(self.kernel_size, "kernel_size"), image_shape[-1], self.features)
        self._check_existing_kernel(kernel_shape, inputs.shape)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv2d(x, kernel, strides=self.strides, padding=self.padding, impl=self.impl)
        if bias is not None:
            y = y + bias
        return y.reshape((*batch_shape, *y.shape[1:]))

    def _check_existing_kernel(self, kernel_shape, input_shape):
        """Fail clearly when given parameters do not fit the input's channel count."""
        if self.has_variable("params", "kernel"):
            existing = tuple(self.get_variable("params", "kernel").shape)
            if existing != tuple(kernel_shape):
                raise ValueError(
                    f"Conv kernel has shape {existing} but inputs of shape {input_shape} need "
                    f"{tuple(kernel_shape)} ([kh, kw, in_channels, features])."
                )
