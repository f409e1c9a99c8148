"""Which weight layouts the fused weight-only kernel reads, and a helper that makes one.

The kernel computes ``x[M, K] @ W`` for a 2-D QArray ``W``. It reads ``W`` in
either orientation without moving bytes:

* ``'nk'``: logical ``[N, K]`` (contract axis 1). With 4-bit formats packed
  along K (the default last axis) each row holds consecutive K bytes, so a
  thread loads 16 K-bytes at once. :func:`prepare_weight` builds this layout.
* ``'kn'``: logical ``[K, N]`` (contract axis 0), the orientation of a Flax
  ``Dense`` kernel. 4-bit formats must then be packed along K (``pack_axis=0``).

Scales may be per (n, K-tile), per n, shared along n, or per tensor; any
scale that is shared along N is broadcast to N outside the kernel (it is
tiny). Zero points, other formats and odd tile sizes are not read by the
kernel: :func:`describe` says why, and the caller falls back to XLA.

Example:
  >>> import jax.numpy as jnp
  >>> from qarray.ops.kernels import layout
  >>> q = layout.prepare_weight(jnp.ones((256, 128)), 'int4', tile=128)
  >>> q.shape, q.qvalue.shape, q.scale.shape      # [N, K], packed along K
  ((128, 256), (128, 128), (128, 2))
  >>> layout.describe(q, rhs_contracting_dim=1).tile
  128
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from qarray import _array, qtypes, _quantize

__all__ = ['WeightLayout', 'describe', 'prepare_weight', 'kernel_operands', 'FORMATS']

# qtype name -> kernel format family.
FORMATS = {'int4': 'int4', 'nf4': 'nf4', 'int8': 'int8',
           'float8_e4m3fn': 'float', 'float8_e5m2': 'float'}
MIN_TILE = {'int4': 32, 'nf4': 32, 'int8': 16, 'float': 16}  # Triton's dot needs K >= 16 per dot
MAX_TILE = 256  # a larger K step per loop iteration would spill registers


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """Static description of a weight the kernel can read.

    Attributes:
      fmt: ``'int4'``, ``'nf4'``, ``'int8'`` or ``'float'`` (fp8).
      orient: ``'nk'`` (logical [N, K]) or ``'kn'`` (logical [K, N]).
      k: contraction size. n: output size.
      tile: K-tile of the scales, or ``None`` for one scale per n (or tensor).

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from qarray.ops.kernels import layout
      >>> layout.describe(qarray.quantize(jnp.ones((64, 32)), 'int8', channelwise_axes=(1,)), 0)
      WeightLayout(fmt='int8', orient='kn', k=64, n=32, tile=None)
    """

    fmt: str
    orient: str
    k: int
    n: int
    tile: int | None


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def describe(q: Any, rhs_contracting_dim: int) -> WeightLayout | str:
    """The kernel layout of ``q`` contracted on ``rhs_contracting_dim``, or why there is none.

    Returns a :class:`WeightLayout`, or a string naming the reason the kernel
    cannot read ``q`` (the caller then uses the XLA path).

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from qarray.ops.kernels import layout
      >>> layout.describe(qarray.quantize(jnp.ones((64, 32)), 'int4'), rhs_contracting_dim=0)
      'int4 weight is packed along axis 1, not the contraction axis 0'
    """
    if not isinstance(q, _array.QArray):
        return f'weight is a {type(q).__name__}, not a QArray'
    if q.ndim != 2:
        return f'weight has {q.ndim} dims; the kernel reads 2-D weights'
    if rhs_contracting_dim not in (0, 1):
        return f'rhs_contracting_dim must be 0 or 1; got {rhs_contracting_dim!r}'
    fmt = FORMATS.get(q.qtype.name)
    if fmt is None:
        return f'format {q.qtype.name} has no kernel (kernels: {", ".join(FORMATS)})'
    if q.zero_point is not None:
        return 'weight has a zero point (asymmetric); the kernel reads symmetric weights'
    if isinstance(q.scale, _array.QArray):
        return 'weight has quantized scales (double quantization); the kernel reads plain scales'
    if q.tile_sizes:
        return f'weight has a partial last tile {q.uneven_tiles}; the kernel reads whole tiles'
    kd = rhs_contracting_dim
    nd = 1 - kd
    k, n = q.shape[kd], q.shape[nd]
    if q.qtype.packed and (q.packed_axis is None or q.packed_axis % 2 != kd):
        return (f'{q.qtype.name} weight is packed along axis {None if q.packed_axis is None else q.packed_axis % 2}'
                f', not the contraction axis {kd}')
    if q.qtype.packed and k % 2:
        return f'contraction size {k} is odd; packed 4-bit rows need an even K'
    sk, sn = q.scale.shape[kd], q.scale.shape[nd]
    if sn not in (1, n):
        return f'scales have {sn} groups along N={n}; the kernel reads one per n or one shared'
    tile = None
    if sk != 1:
        tile = k // sk
        if not (_is_pow2(tile) and MIN_TILE[fmt] <= tile <= MAX_TILE):
            return (f'K-tile {tile} is not a power of two in [{MIN_TILE[fmt]}, {MAX_TILE}]'
                    f' for {q.qtype.name}')
    return WeightLayout(fmt, 'nk' if kd == 1 else 'kn', k, n, tile)


def kernel_operands(q: _array.QArray, layout: WeightLayout) -> tuple[jax.Array, jax.Array]:
    """The weight bytes and a scale array with N full size, in the weight's orientation.

    A scale shared along N is broadcast (its size is K/tile x N at most, tiny
    next to the weight), so the kernel only handles per-n scales.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from qarray.ops.kernels import layout
      >>> q = qarray.quantize(jnp.ones((32, 16)), 'int8')        # one scale for all
      >>> w, s = layout.kernel_operands(q, layout.describe(q, 0))
      >>> s.shape
      (1, 16)
    """
    nd = 1 if layout.orient == 'kn' else 0
    shape = list(q.scale.shape)
    shape[nd] = layout.n
    scale = q.scale
    if tuple(shape) != tuple(scale.shape):
        scale = jnp.broadcast_to(scale, shape)
    return q.qvalue, scale


def prepare_weight(w: Any, qtype: Any, tile: int | None = 128, *, scale_dtype: Any = None) -> _array.QArray:
    """Quantize a ``[K, N]`` weight into the layout the kernel reads fastest.

    Returns ``quantize(w.T, qtype, tiles=tile)``: logical ``[N, K]``, sub-byte
    values packed along K (each row's K bytes contiguous), one scale per
    (n, K-tile) — or per n when ``tile`` is None. Use it with the contraction
    on its axis 1: ``qarray.ops.kernels.weight_only_matmul(x, q,
    rhs_contracting_dim=1)`` or ``qarray.dot_general(x, q, (((1,), (1,)),
    ((), ())))``. Avoid ``x @ q.T`` under ``jit``: XLA would copy the
    transposed bytes before the kernel reads them.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.ops.kernels import layout
      >>> layout.prepare_weight(jnp.ones((512, 64)), 'nf4', tile=64).scale.shape
      (64, 8)
    """
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D [K, N] weight; got shape {w.shape}.")
    if tile is None:
        return _quantize.quantize(w.T, qtype, channelwise_axes=(0,), scale_dtype=scale_dtype)
    return _quantize.quantize(w.T, qtype, tiles=tile, scale_dtype=scale_dtype)
