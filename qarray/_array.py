"""The :class:`QArray` pytree: quantized values, scales and zero points, and its reshape rules.

A QArray stores ``x ≈ (codes − zero_point) · scale`` (or ``codebook[codes] ·
scale`` for nf4). ``scale`` has the rank of ``x``; each of its axes is 1
(shared), the full size (per channel) or ``size / tile`` (sub-channel tiles).
Formats narrower than 8 bits are bit-packed into uint8 along one axis (the
last by default), so ``qvalue.nbytes`` is the real size.

Only the format, the output dtype and the packing (axis, logical length) are
static metadata; the logical shape and the tile sizes are derived from the
array shapes, so a QArray stays consistent under ``vmap`` and ``tree_map``.

Example:
  >>> import jax, qarray
  >>> q = qarray.quantize(jax.random.normal(jax.random.key(0), (256, 512)), 'int4', tiles=128)
  >>> q.shape, q.qvalue.shape, q.scale.shape
  ((256, 512), (256, 256), (256, 4))
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qarray import qtypes

__all__ = ['QArray']


def _dequantize(q: 'QArray') -> jax.Array:
    from qarray._quantize import dequantize  # the module that builds QArrays imports this one
    return dequantize(q)


@jax.tree_util.register_pytree_with_keys_class
class QArray:
    """A quantized array; a pytree with children ``qvalue``, ``scale``, ``zero_point``.

    Build one with :func:`quantize`. Array-like: ``shape``, ``ndim``, ``dtype``
    (the dequantized dtype), ``.T``, ``transpose``, ``reshape``; any ``jnp``
    function accepts it (it dequantizes), and ``x @ q`` / ``q @ x`` run the
    quantized matmul.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> q = qarray.quantize(jnp.arange(8.).reshape(2, 4), 'int3')
      >>> q.qvalue.nbytes   # 2 rows x ceil(4*3/8) bytes
      4
    """

    __slots__ = ('qvalue', 'scale', 'zero_point', 'qtype', 'dtype', 'packed_axis', 'packed_length', 'tile_sizes')

    def __init__(self, qvalue: Any, scale: Any, zero_point: Any = None, *, qtype: Any,
                 dtype: Any = jnp.float32, packed_axis: int | None = None,
                 packed_length: int | None = None, tile_sizes: tuple[tuple[int, int], ...] = ()):
        self.qvalue = qvalue
        self.scale = scale
        self.zero_point = zero_point
        self.qtype = qtypes.get(qtype)
        self.dtype = jnp.dtype(dtype)
        if (packed_axis is None) != (packed_length is None):
            raise ValueError("packed_axis and packed_length must be given together.")
        if packed_axis is not None and packed_axis >= 0:
            raise ValueError(f"packed_axis is counted from the end and must be negative; got {packed_axis}.")
        self.packed_axis = packed_axis
        self.packed_length = packed_length
        # Tiles that do not divide their axis (the last tile is partial): (axis counted from the end, tile).
        self.tile_sizes = tuple(sorted((int(a), int(t)) for a, t in tile_sizes))
        if any(a >= 0 or t <= 0 for a, t in self.tile_sizes):
            raise ValueError(f"tile_sizes must be (negative axis, positive tile) pairs; got {tile_sizes!r}.")
        if all(hasattr(leaf, 'shape') and hasattr(leaf, 'dtype') for leaf in (qvalue, scale)):
            self.check()  # (leaves may also be shardings or specs, e.g. in checkpoint code: nothing to check)

    def check(self) -> 'QArray':
        """Raise ``ValueError``/``TypeError`` if the stored arrays do not fit the format and each other;
        returns ``self``.

        Checks the code storage dtype (uint8 for bit-packed formats, the
        format's own dtype otherwise), the packed length, and that the scale
        (and zero point) have the rank of the array with every axis 1, the full
        size, or a divisor of it. Run by the constructor and by ``dequantize``
        (which also sees QArrays rebuilt leaf by leaf, e.g. by ``jax.tree.map``).

        Example:
          >>> import jax.numpy as jnp, qarray
          >>> q = qarray.quantize(jnp.ones((2, 4)), 'int4')
          >>> q.check() is q
          True
        """
        qt, qv = self.qtype, self.qvalue
        want = np.dtype(np.uint8) if qt.packed else qt.native_dtype
        if np.dtype(qv.dtype) != want:
            raise TypeError(
                f"QArray({qt.name}): qvalue has dtype {np.dtype(qv.dtype).name}, but {qt.name} codes are stored as "
                f"{want.name}{' (bit-packed)' if qt.packed else ''}. Was the QArray rebuilt leaf by leaf (e.g. "
                "jax.tree.map(lambda a: a.astype(...), q))? To change what it dequantizes to, use q.astype(dtype).")
        if qt.packed != (self.packed_axis is not None):
            need = 'a bit-packed format needs' if qt.packed else 'an unpacked format takes no'
            raise ValueError(f"QArray({qt.name}): {need} packed_axis/packed_length; got packed_axis={self.packed_axis}.")
        ndim = len(qv.shape)
        if self.packed_axis is not None:
            from qarray import packing
            if not -ndim <= self.packed_axis < 0:
                raise ValueError(f"QArray({qt.name}): packed_axis={self.packed_axis} is out of range for qvalue of "
                                 f"rank {ndim}.")
            need = packing.packed_length(self.packed_length, qt.bits)
            if qv.shape[self.packed_axis] != need:
                raise ValueError(f"QArray({qt.name}): {self.packed_length} values of {qt.bits} bits take {need} bytes "
                                 f"along the packed axis, but qvalue has {qv.shape[self.packed_axis]} "
                                 f"(shape {tuple(qv.shape)}).")
        shape, sshape = self.shape, tuple(self.scale.shape)
        for a, t in self.tile_sizes:
            if not -ndim <= a < 0 or len(sshape) != ndim or sshape[a] != -(-shape[a] // t):
                raise ValueError(f"QArray({qt.name}): an uneven tile {t} on axis {a} of shape {shape} needs "
                                 f"ceil(n / tile) scales along it; scale shape {sshape}.")
        uneven = {a % ndim for a, _ in self.tile_sizes}
        if len(sshape) != ndim or any(not (a in uneven or s == 1 or s == n or (s and n % s == 0))
                                      for a, (n, s) in enumerate(zip(shape, sshape))):
            raise ValueError(f"QArray({qt.name}): scale of shape {sshape} does not fit shape {shape}: it needs the "
                             "same rank, with every axis 1, the full size, or a divisor of it (tiles).")
        if not isinstance(self.scale, QArray) and not jnp.issubdtype(self.scale.dtype, jnp.floating):
            raise TypeError(f"QArray({qt.name}): scale must be floating; got {np.dtype(self.scale.dtype).name}.")
        zp = self.zero_point
        if zp is not None and hasattr(zp, 'shape'):
            if tuple(zp.shape) != sshape or not (isinstance(zp, QArray) or jnp.issubdtype(zp.dtype, jnp.integer)
                                                  or jnp.issubdtype(zp.dtype, jnp.floating)):
                raise ValueError(f"QArray({qt.name}): zero_point must have the scale's shape {sshape}, as integer "
                                 f"codes or a float offset in value space; got {np.dtype(zp.dtype).name}"
                                 f"{tuple(zp.shape)}.")
        return self

    # pytree -------------------------------------------------------------------
    def tree_flatten_with_keys(self):
        K = jax.tree_util.GetAttrKey
        children = ((K('qvalue'), self.qvalue), (K('scale'), self.scale),
                    (K('zero_point'), self.zero_point))
        return children, (self.qtype, self.dtype, self.packed_axis, self.packed_length, self.tile_sizes)

    @classmethod
    def tree_unflatten(cls, aux, children):
        qtype, dtype, packed_axis, packed_length, tile_sizes = aux
        obj = object.__new__(cls)
        obj.qvalue, obj.scale, obj.zero_point = children
        obj.qtype, obj.dtype, obj.packed_axis, obj.packed_length = qtype, dtype, packed_axis, packed_length
        obj.tile_sizes = tile_sizes
        return obj

    # array-like ---------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """Logical (unpacked) shape."""
        shape = list(self.qvalue.shape)
        if self.packed_axis is not None:
            shape[self.packed_axis] = self.packed_length
        return tuple(shape)

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.qvalue.shape)

    @property
    def size(self) -> int:
        """Number of logical values."""
        return math.prod(self.shape)

    @property
    def tiles(self) -> dict[int, int]:
        """Sub-channel tile size per tiled axis (axes with 1 < scale size < size); a microscaling format's
        block axis always (even when it holds a single block)."""
        shape, sshape = self.shape, tuple(self.scale.shape)
        uneven = self.uneven_tiles
        tiles = {a: uneven.get(a, n // s) for a, (n, s) in enumerate(zip(shape, sshape)) if 1 < s < n or a in uneven}
        block = self.qtype.block
        if block and not tiles:
            axes = [a for a, (n, s) in enumerate(zip(shape, sshape)) if n == s * block and n > 1]
            if axes:
                tiles = {axes[-1]: block}
        return tiles

    @property
    def uneven_tiles(self) -> dict[int, int]:
        """``{axis: tile}`` for tiled axes whose tile does not divide them (their last tile is partial).

        Example:
          >>> import jax.numpy as jnp, qarray
          >>> q = qarray.quantize(jnp.ones((4, 300)), 'int8', tiles=128)
          >>> q.uneven_tiles, q.scale.shape
          ({1: 128}, (4, 3))
        """
        nd = len(self.qvalue.shape)
        return {a % nd: t for a, t in self.tile_sizes}

    @property
    def channelwise_axes(self) -> tuple[int, ...]:
        """Axes with one scale per index (size > 1)."""
        tiled = self.tiles
        return tuple(a for a, (n, s) in enumerate(zip(self.shape, self.scale.shape)) if s == n > 1 and a not in tiled)

    @property
    def nbytes(self) -> int:
        """Stored bytes: values + scales + zero points (a quantized scale counts its own stored bytes)."""
        total = 0
        for leaf in (self.qvalue, self.scale, self.zero_point):
            if isinstance(leaf, QArray):
                total += leaf.nbytes
            elif leaf is not None:
                total += math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        return total

    @property
    def T(self) -> 'QArray':
        """Reversed axes, like ``ndarray.T``."""
        return self.transpose()

    def transpose(self, *axes: int) -> 'QArray':
        """Permute axes; values, scales and the packed axis move together.

        Example:
          >>> import jax.numpy as jnp, qarray
          >>> qarray.quantize(jnp.ones((2, 3)), 'int4').T.shape
          (3, 2)
        """
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        axes = tuple(reversed(range(self.ndim))) if not axes else tuple(a % self.ndim for a in axes)
        if sorted(axes) != list(range(self.ndim)):
            raise ValueError(f"transpose axes must be a permutation of 0..{self.ndim - 1}; got {axes}.")
        packed_axis = None
        if self.packed_axis is not None:
            packed_axis = axes.index(self.packed_axis % self.ndim) - self.ndim
        zp = None if self.zero_point is None else _transpose(self.zero_point, axes)
        tile_sizes = tuple((axes.index(a % self.ndim) - self.ndim, t) for a, t in self.tile_sizes)
        return self.replace(qvalue=jnp.transpose(self.qvalue, axes), scale=_transpose(self.scale, axes),
                            zero_point=zp, packed_axis=packed_axis, tile_sizes=tile_sizes)

    def reshape(self, *shape: Any) -> 'QArray':
        """Reshape where the scale layout allows it (else ``ValueError``).

        Axes may merge or split when the scales stay a valid (channel, tile,
        shared) layout on the new axes; the packed axis must stay unchanged.

        Example:
          >>> import jax.numpy as jnp, qarray
          >>> qarray.quantize(jnp.ones((4, 6)), 'int8', channelwise_axes=(1,)).reshape(2, 2, 6).scale.shape
          (1, 1, 6)
        """
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        new_shape = _resolve_shape(self.shape, shape)
        if self.tile_sizes and tuple(new_shape) != tuple(self.shape):
            raise ValueError(f"cannot reshape QArray {tuple(self.shape)} -> {tuple(new_shape)}: it has uneven tiles "
                             f"{self.uneven_tiles} (a partial last tile); dequantize or re-quantize first.")
        new_scale_shape, packed_new = _reshape_layout(self.shape, self.scale.shape, new_shape,
                                                      self.packed_axis)
        qshape = list(new_shape)
        if packed_new is not None:
            qshape[packed_new] = self.qvalue.shape[self.packed_axis]
        zp = None if self.zero_point is None else self.zero_point.reshape(new_scale_shape)  # (QArray or array)
        return self.replace(qvalue=self.qvalue.reshape(qshape), scale=self.scale.reshape(new_scale_shape),
                            zero_point=zp, packed_axis=None if packed_new is None else packed_new - len(new_shape),
                            packed_length=None if packed_new is None else self.packed_length)

    def astype(self, dtype: Any) -> 'QArray':
        """The same codes with a new output dtype: still quantized (``dtype`` is what dequantizing gives).

        ``astype`` never dequantizes, for ``QArray`` and Flax's ``QuantizedParam`` alike, so dtype
        promotion (e.g. a bfloat16 model) keeps weights in their stored format. To get a float array,
        call :func:`qarray.dequantize` (or ``jnp.asarray(q)``).

        Example:
          >>> import jax.numpy as jnp, qarray
          >>> q = qarray.quantize(jnp.ones((2, 4)), 'int4').astype(jnp.bfloat16)
          >>> type(q).__name__, q.dtype, qarray.dequantize(q).dtype
          ('QArray', dtype(bfloat16), dtype(bfloat16))
        """
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"astype: a QArray dequantizes to a floating dtype (float32, bfloat16, float16, "
                            f"float64); got {dtype}. Dequantize first to convert to other types.")
        return self.replace(dtype=dtype)

    def replace(self, **fields: Any) -> 'QArray':
        """A copy with some fields replaced (``qvalue``, ``scale``, ``zero_point``, ``qtype``, ``dtype``,
        ``packed_axis``, ``packed_length``); the others are shared.

        Example:
          >>> import jax.numpy as jnp, qarray
          >>> q = qarray.quantize(jnp.ones((2, 4)), 'int8')
          >>> q2 = q.replace(scale=q.scale * 2)
          >>> bool((qarray.dequantize(q2) == 2 * qarray.dequantize(q)).all()), q2.qvalue is q.qvalue
          (True, True)
        """
        unknown = set(fields) - set(self.__slots__)
        if unknown:
            raise TypeError(f"replace: unknown QArray fields {sorted(unknown)}; fields are {list(self.__slots__)}.")
        current = {k: getattr(self, k) for k in self.__slots__}
        current.update(fields)
        return QArray(current['qvalue'], current['scale'], current['zero_point'], qtype=current['qtype'],
                      dtype=current['dtype'], packed_axis=current['packed_axis'],
                      packed_length=current['packed_length'], tile_sizes=current['tile_sizes'])

    def __jax_array__(self) -> jax.Array:
        return _dequantize(self)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(_dequantize(self), dtype=dtype)

    def __matmul__(self, other: Any) -> jax.Array:
        from qarray import ops
        return ops.matmul(self, other)

    def __rmatmul__(self, other: Any) -> jax.Array:
        from qarray import ops
        return ops.matmul(other, self)

    def __getitem__(self, key: Any) -> Any:
        """``q[key]``: the rows ``key`` selects along axis 0, dequantized (only those rows); ``q[...]`` is ``q``.

        Example:
          >>> import jax.numpy as jnp, qarray
          >>> q = qarray.quantize(jnp.ones((4, 3)), 'int8', channelwise_axes=(0,))
          >>> q[jnp.array([0, 3])].shape, q[...] is q
          ((2, 3), True)
        """
        from qarray.ops.take import getitem
        return getitem(self, key)

    def __neg__(self):
        return -_dequantize(self)

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a rank-0 QArray (it has no first axis); use q.size or q.shape.")
        return self.shape[0]

    def __repr__(self) -> str:
        try:
            tiles = self.tiles
            parts = [self.qtype.name, f"shape={self.shape}"]
            if self.channelwise_axes:
                parts.append(f"channelwise_axes={self.channelwise_axes}")
            if tiles:
                parts.append(f"tiles={tiles}")
            if isinstance(self.scale, QArray):
                parts.append(f"scale={self.scale.qtype.name} codes")
            elif self.qtype.microscaling:
                parts.append(f"scale={jnp.dtype(self.scale.dtype).name}")
            if self.zero_point is not None:
                parts.append("zero_point" if jnp.issubdtype(self.zero_point.dtype, jnp.integer) else "offset")
            if self.packed_axis is not None:
                parts.append(f"packed_axis={self.packed_axis}")
            parts.append(f"stored={self.nbytes} B")
            parts.append(f"dtype={self.dtype.name}")
            return f"QArray({', '.join(parts)})"
        except (AttributeError, TypeError):  # leaves that are not arrays (e.g. inside tree utilities)
            return (f"QArray(qtype={self.qtype.name}, qvalue={self.qvalue!r}, scale={self.scale!r}, "
                    f"zero_point={self.zero_point!r})")


def _transpose(x: Any, axes: tuple[int, ...]) -> Any:
    """Transpose an array, or a QArray without dequantizing it (a quantized scale stays quantized)."""
    return x.transpose(axes) if isinstance(x, QArray) else jnp.transpose(x, axes)


def _binary(op):
    def method(self, other):
        return op(_dequantize(self), other)

    def rmethod(self, other):
        return op(other, _dequantize(self))

    return method, rmethod


for _name, _op in [('add', jnp.add), ('sub', jnp.subtract), ('mul', jnp.multiply),
                   ('truediv', jnp.true_divide)]:
    _m, _r = _binary(_op)
    setattr(QArray, f'__{_name}__', _m)
    setattr(QArray, f'__r{_name}__', _r)


def _resolve_shape(old: tuple[int, ...], new: Sequence[int]) -> tuple[int, ...]:
    new = [int(d) for d in new]
    total = math.prod(old)
    if new.count(-1) > 1:
        raise ValueError(f"reshape: at most one -1 allowed; got {tuple(new)}.")
    if -1 in new:
        rest = math.prod(d for d in new if d != -1)
        new[new.index(-1)] = total // rest if rest else 0
    if math.prod(new) != total:
        raise ValueError(f"cannot reshape QArray of shape {old} into {tuple(new)}.")
    return tuple(new)


def _merge_scale(sizes: Sequence[int], scales: Sequence[int]) -> int | None:
    """Scale count on the merged axis, or None when the scales do not form tiles of it."""
    j = 0
    while j < len(sizes) and scales[j] == sizes[j]:
        j += 1
    if j < len(sizes) and any(s != 1 for s in scales[j + 1:]):
        return None
    return math.prod(scales)


def _split_scale(total_scales: int, total: int, sizes: Sequence[int]) -> list[int] | None:
    """Per-axis scale counts when splitting one axis with ``total_scales`` scales into ``sizes``."""
    tile = total // total_scales
    out = []
    for n in reversed(sizes):
        if tile % n == 0:
            out.append(1)
            tile //= n
        elif n % tile == 0:
            out.append(n // tile)
            tile = 1
        else:
            return None
    return list(reversed(out))


def _reshape_layout(old, old_scale, new, packed_axis):
    """Scale shape on the new axes, and the new packed axis (or None)."""
    groups, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        gi, gj = [i], [j]
        pi = old[i] if i < len(old) else 1
        pj = new[j] if j < len(new) else 1
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= old[i]; gi.append(i); i += 1
            else:
                pj *= new[j]; gj.append(j); j += 1
        groups.append(([a for a in gi if a < len(old)], [b for b in gj if b < len(new)]))
    packed_old = None if packed_axis is None else packed_axis % len(old)
    packed_new = None
    scale = []
    for gi, gj in groups:
        if packed_old in gi:
            if len(gi) != 1 or len(gj) != 1:
                raise ValueError(f"cannot reshape QArray {tuple(old)} -> {tuple(new)}: the packed axis "
                                 f"{packed_old} would change; unpack (dequantize) or re-quantize first.")
            packed_new = gj[0]
        merged = _merge_scale([old[a] for a in gi], [old_scale[a] for a in gi]) if gi else 1
        split = None if merged is None else _split_scale(merged, math.prod(old[a] for a in gi) if gi else 1,
                                                         [new[b] for b in gj])
        if split is None:
            raise ValueError(
                f"cannot reshape QArray {tuple(old)} -> {tuple(new)}: scales of shape {tuple(old_scale)} "
                "do not form channels/tiles on the new axes.")
        scale.extend(split)
    return tuple(scale), packed_new
