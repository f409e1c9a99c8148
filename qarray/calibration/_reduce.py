"""NaN-safe group reductions in one pass over the data: :func:`group_max`, :func:`group_min`.

``jnp.max`` is not NaN-safe on every backend: XLA:CPU hands a reduce of 4096
or more input elements to YNNPACK, whose max drops NaN (below that size XLA's
own loop keeps it). Guarding it with a second reduction, ``all(isfinite(x))``,
costs a second pass that XLA:CPU does not fuse with the first. These helpers
get both the value and the NaN in one pass:

1. ``levels`` halvings of the group axes, ``maximum(first half, second half)``
   (elementwise HLO ``maximum``/``minimum``, which propagate NaN by definition;
   XLA fuses the levels into one pass that reads each element once, 2**levels:1,
   and on CPU it beats the vectorised reduce on major, middle and tiled axes);
2. NaN -> +inf (-inf for a min) on that 2**levels times smaller rest, which any
   max/min keeps;
3. one ordinary reduce of the rest. A reduce is a fusion boundary: a consumer
   (the codes pass, a fused dequantize) reads the finished per-group value
   instead of re-running the tree once per element.

So a group holding NaN comes out as +inf (max) / -inf (min), exactly like a
group holding that infinity; finite groups get their exact max / min.

Example:
  >>> import jax.numpy as jnp
  >>> from qarray.calibration._reduce import group_max, group_min
  >>> x = jnp.array([[1., -5., 2.], [0., jnp.nan, 3.]])
  >>> group_max(x, (1,), leaf=jnp.abs).tolist(), group_min(x, (1,)).tolist()
  ([[5.0], [inf]], [[-5.0], [-inf]])
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ['group_max', 'group_min']


def group_max(x: jnp.ndarray, axes: Sequence[int], *, leaf: Callable | None = None, levels: int = 3
              ) -> jnp.ndarray:
    """Max of ``leaf(x)`` over ``axes`` (kept as size 1); a NaN counts as +inf.

    ``leaf`` (an elementwise map such as ``jnp.abs``) is applied to the two
    halves of the first halving only, so XLA never has to write ``leaf(x)`` out.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.calibration._reduce import group_max
      >>> group_max(jnp.arange(12.).reshape(3, 4), (0,)).tolist()
      [[8.0, 9.0, 10.0, 11.0]]
    """
    return _group_reduce(x, _axes(axes), jnp.maximum, jnp.max, jnp.inf, leaf, levels)


def group_min(x: jnp.ndarray, axes: Sequence[int], *, levels: int = 3) -> jnp.ndarray:
    """Min of ``x`` over ``axes`` (kept as size 1); a NaN counts as -inf.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.calibration._reduce import group_min
      >>> group_min(jnp.arange(12.).reshape(3, 4), (1,)).tolist()
      [[0.0], [4.0], [8.0]]
    """
    return _group_reduce(x, _axes(axes), jnp.minimum, jnp.min, -jnp.inf, None, levels)


def _axes(axes: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(a) for a in axes)


# Jitted so an eager call (a Flax init, a calibration loop) compiles one program per shape instead of one per
# halving step; under an outer jit it is inlined and XLA fuses it exactly as before.
@functools.partial(jax.jit, static_argnums=tuple(range(1, 7)))
def _group_reduce(x, axes, op, reduce, nan_to, leaf, levels):
    x = jnp.asarray(x)
    src = x.shape
    axes = {a % x.ndim for a in axes} if x.ndim else set()
    last = x.ndim - 1
    # Merge runs of adjacent reduced axes (a free reshape; fewer, longer tree axes), never into the minor axis.
    shape, red = [], []
    for a, n in enumerate(src):
        if shape and a in axes and a - 1 in axes and a != last:
            shape[-1] *= n
        else:
            shape.append(n)
            if a in axes:
                red.append(len(shape) - 1)
    x = x.reshape(shape)
    minor = len(shape) - 1
    done = 0
    for a in sorted(red, key=lambda b: b == minor):  # major axes first: each halving is a vector op
        while x.shape[a] > 1 and done < levels:
            n = x.shape[a]
            h = (n + 1) // 2  # odd n: the halves overlap by one element (max/min are idempotent)
            lo, hi = lax.slice_in_dim(x, 0, h, axis=a), lax.slice_in_dim(x, n - h, n, axis=a)
            if leaf is not None:
                lo, hi, leaf = leaf(lo), leaf(hi), None
            x, done = op(lo, hi), done + 1
    if leaf is not None:  # nothing was halved
        x = leaf(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        x = jnp.where(jnp.isnan(x), jnp.asarray(nan_to, x.dtype), x)
    x = reduce(x, axis=tuple(red), keepdims=True)
    return x.reshape([1 if a in axes else d for a, d in enumerate(src)])
