"""``take`` and indexing for QArrays: gather rows, dequantize only those (embedding lookups).

``take(q, indices, axis)`` gathers the stored codes, scales and zero points of the requested rows and
dequantizes just them, so a lookup in a ``[V, D]`` table costs the rows it returns, never the table
in float. The result equals ``jnp.take(qarray.dequantize(q), indices, axis)`` bit for bit (the same
elementwise dequantize on the same codes and scales), for every format and layout:

* scales along the gathered axis: one per row (the embedding layout), tiles (a row takes its tile's
  scale), or shared; along other axes anything (e.g. int4 tiles of 64 along the feature axis);
* bit-packed formats: packed along another axis (the embedding layout), each gathered row is whole
  bytes; packed along the gathered axis, each value's bits are read from the one or two bytes that
  hold it and repacked, so the gather never unpacks the table;
* quantized scales (double quantization, nvfp4) and zero points are gathered as QArrays, recursively.

Indices follow ``jnp.take``: ``mode=None`` / ``'fill'`` (negative indices count from the end; out of
range gives ``fill_value``, NaN by default), ``'clip'``, ``'wrap'``. :func:`getitem` is ``q[key]``:
``dequantize(q)[key]`` for keys that index axis 0 (an int, a slice, an integer or boolean array), optionally
followed by ints and slices for the other axes; ``q[...]`` is ``q`` itself (still quantized, as Flax's
``param[...]`` reads expect).

Example:
  >>> import jax, jax.numpy as jnp, qarray
  >>> table = qarray.quantize(jax.random.normal(jax.random.key(0), (1000, 64)), 'int4', tiles=32)
  >>> rows = qarray.ops.take(table, jnp.array([[3, 7], [999, 0]]))
  >>> rows.shape, bool((rows[0, 1] == qarray.dequantize(table)[7]).all())
  ((2, 2, 64), True)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qarray import _layout, _quantize, packing
from qarray._array import QArray

__all__ = ['take', 'getitem', 'gather']

_MODES = (None, 'fill', 'clip', 'wrap')


def take(q: Any, indices: Any, axis: int | None = 0, *, mode: str | None = None, fill_value: Any = None,
         unique_indices: bool = False, indices_are_sorted: bool = False) -> jax.Array:
    """``jnp.take(qarray.dequantize(q), indices, axis)`` without dequantizing more than the gathered rows.

    Args:
      q: a QArray (a plain array goes to ``jnp.take``).
      indices: integer array of any shape; the output has ``indices.shape`` in place of ``axis``.
      axis: the axis to gather along (default 0: rows of a table). ``None`` gathers from the flattened
        array (``q.reshape(-1)``: only where the layout allows it).
      mode: ``None``/``'fill'`` (out-of-range indices give ``fill_value``), ``'clip'`` or ``'wrap'``.
      fill_value: what out-of-range indices give in fill mode (default NaN).
      unique_indices, indices_are_sorted: hints, as for ``jnp.take``.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> q = qarray.quantize(jnp.arange(12.).reshape(4, 3), 'int8', channelwise_axes=(0,))
      >>> rows = qarray.take(q, jnp.array([3, -4, 4]))   # -4 is row 0; 4 is out of range: NaN
      >>> table = qarray.dequantize(q)
      >>> bool((rows[0] == table[3]).all()), bool((rows[1] == table[0]).all()), bool(jnp.isnan(rows[2]).all())
      (True, True, True)
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}; got {mode!r}.")
    if not isinstance(q, QArray):
        return jnp.take(q, indices, axis=axis, mode=mode, fill_value=fill_value, unique_indices=unique_indices,
                        indices_are_sorted=indices_are_sorted)
    idx = jnp.asarray(indices)
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"indices must be integers; got dtype {idx.dtype}.")
    if axis is None:
        try:
            q = q.reshape(-1)
        except ValueError as e:
            e.add_note("take(q, indices, axis=None) gathers from the flattened QArray; give an axis instead.")
            raise
        axis = 0
    axis = _layout.normalize_axis(axis, q.ndim, 'axis', 'a QArray')
    fill = jnp.asarray(jnp.nan if fill_value is None else fill_value, q.dtype)
    return _take_jit(q, idx, fill, axis=axis, mode=mode)


@functools.partial(jax.jit, static_argnames=('axis', 'mode'))
def _take_jit(q: QArray, idx: jax.Array, fill: jax.Array, *, axis: int, mode: str | None) -> jax.Array:
    n = q.shape[axis]
    flat = idx.reshape(-1)
    # Where each output row comes from, by jnp.take's own index rules (-1: filled).
    src = jnp.take(jnp.arange(n, dtype=jnp.int32), flat, mode=mode, fill_value=-1) if n else \
        jnp.full(flat.shape, -1, jnp.int32)
    rows = gather(q, jnp.maximum(src, 0), axis) if n else None
    shape = q.shape[:axis] + (flat.shape[0],) + q.shape[axis + 1:]
    out = _quantize.dequantize(rows) if n else jnp.full(shape, fill, q.dtype)
    if mode in (None, 'fill') and n:
        keep = (src >= 0).reshape((1,) * axis + (-1,) + (1,) * (q.ndim - axis - 1))
        out = jnp.where(keep, out, fill)
    return out.reshape(q.shape[:axis] + idx.shape + q.shape[axis + 1:])


def gather(q: QArray, rows: jax.Array, axis: int) -> QArray:
    """The QArray of ``q``'s entries ``rows`` (in-range, 1-D) along ``axis``: codes, scales and zero points
    gathered, still quantized (what :func:`take` dequantizes).

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from qarray.ops.take import gather
      >>> q = qarray.quantize(jnp.ones((8, 64)), 'int4', tiles=32)
      >>> g = gather(q, jnp.array([5, 1]), 0)
      >>> g.shape, g.qvalue.shape, g.scale.shape
      ((2, 64), (2, 32), (2, 2))
    """
    n = q.shape[axis]
    tile = q.uneven_tiles.get(axis)  # a partial last tile along the gathered axis: its scale is still rows // tile
    qvalue, length = _gather_values(q, rows, axis)
    scale = _gather_group(q.scale, rows, axis, n, tile)
    zp = _gather_group(q.zero_point, rows, axis, n, tile)
    # The gathered axis has a scale per gathered row (or one shared): no uneven tile along it any more.
    tile_sizes = tuple((a, t) for a, t in q.tile_sizes if a % q.ndim != axis)
    return q.replace(qvalue=qvalue, scale=scale, zero_point=zp, tile_sizes=tile_sizes,
                     packed_length=q.packed_length if length is None else length)


def _gather_group(s: Any, rows: jax.Array, axis: int, n: int, tile: int | None) -> Any:
    """A scale / zero point (array or QArray) for the gathered rows: per row, the row's tile, or shared."""
    if s is None or (s.shape[axis] == 1 and tile is None):
        return s
    k = s.shape[axis]
    idx = rows if k == n and tile is None else rows // (tile or n // k)
    if isinstance(s, QArray):
        return gather(s, idx, axis)
    return jnp.take(s, idx, axis=axis)


def _gather_values(q: QArray, rows: jax.Array, axis: int) -> tuple[jax.Array, int | None]:
    """Stored values of the gathered rows, and the new packed length when the packed axis is ``axis``."""
    qv = q.qvalue
    if q.packed_axis is None or q.packed_axis % q.ndim != axis:
        return jnp.take(qv, rows, axis=axis), None
    # Packed along the gathered axis: value i is stream bits [i*B, (i+1)*B), in byte i*B//8 and maybe the next.
    bits = q.qtype.bits
    nbytes = qv.shape[axis]
    off = rows.astype(jnp.int32) * bits
    first = off // 8
    b0 = jnp.take(qv, first, axis=axis).astype(jnp.uint16)
    b1 = jnp.take(qv, jnp.minimum(first + 1, nbytes - 1), axis=axis).astype(jnp.uint16)
    shift = (off % 8).astype(jnp.uint16).reshape((1,) * axis + (-1,) + (1,) * (q.ndim - axis - 1))
    field = ((b0 | (b1 << 8)) >> shift) & jnp.uint16(2 ** bits - 1)
    return packing.pack(field.astype(jnp.uint8), bits, axis=axis), int(rows.shape[0])


def getitem(q: QArray, key: Any) -> Any:
    """``q[key]``: ``qarray.dequantize(q)[key]``, gathering only the rows ``key`` selects along axis 0.

    ``key`` indexes axis 0 (an int, a slice, an integer or boolean array, with JAX's rules: negative
    indices count from the end, out-of-range array entries are clamped; a static int out of range raises
    ``IndexError``, as numpy does), optionally followed by ints, slices and
    one Ellipsis for the other axes. ``q[...]`` (and ``q[()]``) is ``q`` itself, still quantized. Other
    keys raise ``TypeError``; index ``qarray.dequantize(q)`` for them.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from qarray.ops.take import getitem
      >>> q = qarray.quantize(jnp.arange(12.).reshape(4, 3), 'int8', channelwise_axes=(0,))
      >>> table = qarray.dequantize(q)
      >>> bool((getitem(q, 2) == table[2]).all()), bool((getitem(q, (jnp.array([0, -1]), 1)) == table[[0, 3], 1]).all())
      (True, True)
      >>> getitem(q, ...) is q
      True
    """
    if key is Ellipsis or (isinstance(key, tuple) and (len(key) == 0 or (len(key) == 1 and key[0] is Ellipsis))):
        return q
    head, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
    if isinstance(head, list):
        head = np.asarray(head)
    if head is None or head is Ellipsis or not _axis0_key(head):
        raise TypeError(f"QArray indexing takes an int, slice or integer/boolean array for axis 0 first; got "
                        f"{head!r}. Index qarray.dequantize(q) (the whole array in float) for other keys.")
    if q.ndim == 0:
        raise IndexError("a rank-0 QArray has no axis to index; use q[...] or qarray.dequantize(q).")
    if len([k for k in rest if k is not Ellipsis]) > q.ndim - 1 or sum(k is Ellipsis for k in rest) > 1:
        raise IndexError(f"too many indices for a QArray of rank {q.ndim}: {key!r}.")
    for k in rest:
        if not (k is Ellipsis or isinstance(k, slice) or _is_int(k)):
            raise TypeError(f"QArray indexing: after axis 0, only ints, slices and one Ellipsis are supported; "
                            f"got {k!r}. Index qarray.dequantize(q) for other keys.")
    if _is_int(head) and not isinstance(head, jax.core.Tracer) and not -q.shape[0] <= int(head) < q.shape[0]:
        # numpy's rule for a static int (what ends iteration by the sequence protocol, ``for row in q``)
        raise IndexError(f"index {int(head)} is out of bounds for axis 0 with size {q.shape[0]}.")
    src = jnp.arange(q.shape[0], dtype=jnp.int32)[head]  # JAX's own rules for axis 0 (wrap, clamp, masks)
    rows = take(q, src, axis=0, mode='clip')
    return rows[(slice(None),) * src.ndim + tuple(rest)] if rest else rows


def _is_int(k: Any) -> bool:
    if isinstance(k, (bool, np.bool_)):
        return False
    if isinstance(k, (int, np.integer)):
        return True
    return hasattr(k, 'shape') and hasattr(k, 'dtype') and k.shape == () and jnp.issubdtype(k.dtype, jnp.integer)


def _axis0_key(k: Any) -> bool:
    if isinstance(k, slice) or _is_int(k):
        return True
    try:
        a = np.asarray(k) if isinstance(k, (list, tuple)) else k
        dt = a.dtype
    except (AttributeError, TypeError, ValueError):
        return False
    return jnp.issubdtype(dt, jnp.integer) or jnp.issubdtype(dt, jnp.bool_)
