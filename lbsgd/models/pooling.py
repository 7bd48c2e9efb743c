"""The stem's 3x3 max pool (padding 1), with a gradient that needs no scatter.

Why: XLA differentiates a max pool into select-and-scatter, which its GPU compiler runs as an
argmax reduce-window (writing the maxima and four int32 index arrays), a zero-filled padded
buffer, a scatter with atomic adds into it and a copy out of the padding: 4 kernels, and 4.46
GB of operands and results for ResNet-50's stem at 256 images of 112x112x64 in bf16 on an H100
(benchmarks/README.md, section 2). Routed instead by comparing each of the 9 strided views of
the input with the pooled output, the gradient is 2 elementwise kernels (2.06 GB), and it adds
in a fixed order where atomics do not.

It is the same gradient: a tie goes where select-and-scatter sends it, to the window's first
maximum in row-major order, and each input adds the gradients of its windows in the order
select-and-scatter does (the outputs' row-major order); tests/test_models.py checks that the
two are bitwise equal on ties and odd sizes.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

WINDOW = 3
# select-and-scatter scans a window in row-major order and keeps the first maximum it meets.
OFFSETS = tuple((dh, dw) for dh in range(WINDOW) for dw in range(WINDOW))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x: jax.Array, stride: int) -> jax.Array:
    """3x3 max pool of NHWC `x` with padding 1 and `stride`, as nnx.max_pool computes it."""
    return nnx.max_pool(x, (WINDOW, WINDOW), strides=(stride, stride), padding=((1, 1), (1, 1)))


def _forward(x, stride):
    y = max_pool(x, stride)
    return y, (x, y)


def _backward(stride, residuals, g):
    x, y = residuals
    _, h, w, _ = x.shape
    _, ho, wo, _ = y.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    # The element at offset k of every window is one strided view of the padded input.
    limits = [(x.shape[0], dh + stride * (ho - 1) + 1, dw + stride * (wo - 1) + 1, x.shape[3])
              for dh, dw in OFFSETS]
    views = [lax.slice(padded, (0, dh, dw, 0), limit, (1, stride, stride, 1))
             for (dh, dw), limit in zip(OFFSETS, limits, strict=True)]
    # Each window's first maximum, as one int8 offset per output: what XLA keeps between the
    # two kernels (a mask per offset would be 9 arrays).
    first = jnp.full(y.shape, len(OFFSETS), jnp.int8)
    for k in reversed(range(len(OFFSETS))):
        first = jnp.where(views[k] == y, jnp.int8(k), first)
    zero = jnp.zeros((), g.dtype)
    # Back where each view came from: a strided slice's inverse is a pad with interior
    # padding, an elementwise op where a scatter would need atomics.
    parts = [lax.pad(jnp.where(first == k, g, zero), zero,
                     ((0, 0, 0), (dh, h + 2 - limit[1], stride - 1),
                      (dw, w + 2 - limit[2], stride - 1), (0, 0, 0)))
             for k, ((dh, dw), limit) in enumerate(zip(OFFSETS, limits, strict=True))]
    # An input gets its windows' gradients in the outputs' row-major order, which is the
    # offsets' order reversed (a later window reaches an input through an earlier offset).
    dx = functools.reduce(jnp.add, reversed(parts))
    return (dx[:, 1:h + 1, 1:w + 1, :],)


max_pool.defvjp(_forward, _backward)
