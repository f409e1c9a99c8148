"""QArray, quantize, dequantize and fake_quant.

A :class:`QArray` stores ``x ≈ (codes − zero_point) · scale`` (or
``codebook[codes] · scale`` for nf4). ``scale`` has the rank of ``x``; each of
its axes is 1 (shared), the full size (per channel) or ``size / tile``
(sub-channel tiles). Formats narrower than 8 bits are bit-packed into uint8
along one axis (the last by default), so ``qvalue.nbytes`` is the real size.

Only the format, the output dtype and the packing (axis, logical length) are
static metadata; the logical shape and the tile sizes are derived from the
array shapes, so a QArray stays consistent under ``vmap`` and ``tree_map``.

NaN/Inf policy: a group (tile/channel) whose data holds NaN or ±Inf gets a
NaN scale, so every value of that group dequantizes to NaN — never a silently
finite number. Pass ``check_finite=True`` to raise a ``ValueError`` instead
(eagerly on concrete input, at run time under ``jit``).

Example:
  >>> import jax, qarray
  >>> w = jax.random.normal(jax.random.key(0), (256, 512))
  >>> q = qarray.quantize(w, 'int4', tiles=128)
  >>> q.shape, q.qvalue.shape, q.scale.shape
  ((256, 512), (256, 256), (256, 4))
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qarray import calibration as _calibration
from qarray import numerics, packing, qtypes

__all__ = ['QArray', 'quantize', 'quantize_with_scale', 'dequantize', 'fake_quant', 'fake_quant_with_scale',
           'codes', 'group_view', 'tiled_view', 'representable_range', 'straight_through']


# --------------------------------------------------------------------------- QArray
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

    __slots__ = ('qvalue', 'scale', 'zero_point', 'qtype', 'dtype', 'packed_axis', 'packed_length')

    def __init__(self, qvalue: Any, scale: Any, zero_point: Any = None, *, qtype: Any,
                 dtype: Any = jnp.float32, packed_axis: int | None = None,
                 packed_length: int | None = None):
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

    # pytree -------------------------------------------------------------------
    def tree_flatten_with_keys(self):
        K = jax.tree_util.GetAttrKey
        children = ((K('qvalue'), self.qvalue), (K('scale'), self.scale),
                    (K('zero_point'), self.zero_point))
        return children, (self.qtype, self.dtype, self.packed_axis, self.packed_length)

    @classmethod
    def tree_unflatten(cls, aux, children):
        qtype, dtype, packed_axis, packed_length = aux
        obj = object.__new__(cls)
        obj.qvalue, obj.scale, obj.zero_point = children
        obj.qtype, obj.dtype, obj.packed_axis, obj.packed_length = qtype, dtype, packed_axis, packed_length
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
        """Sub-channel tile size per tiled axis (axes with 1 < scale size < size)."""
        return {a: n // s for a, (n, s) in enumerate(zip(self.shape, self.scale.shape)) if 1 < s < n}

    @property
    def channelwise_axes(self) -> tuple[int, ...]:
        """Axes with one scale per index (size > 1)."""
        return tuple(a for a, (n, s) in enumerate(zip(self.shape, self.scale.shape)) if s == n > 1)

    @property
    def nbytes(self) -> int:
        """Stored bytes: values + scales + zero points."""
        leaves = [self.qvalue, self.scale, self.zero_point]
        return sum(math.prod(l.shape) * jnp.dtype(l.dtype).itemsize for l in leaves if l is not None)

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
        zp = None if self.zero_point is None else jnp.transpose(self.zero_point, axes)
        return QArray(jnp.transpose(self.qvalue, axes), jnp.transpose(self.scale, axes), zp,
                      qtype=self.qtype, dtype=self.dtype, packed_axis=packed_axis,
                      packed_length=self.packed_length)

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
        new_scale_shape, packed_new = _reshape_layout(self.shape, self.scale.shape, new_shape,
                                                      self.packed_axis)
        qshape = list(new_shape)
        if packed_new is not None:
            qshape[packed_new] = self.qvalue.shape[self.packed_axis]
        zp = None if self.zero_point is None else self.zero_point.reshape(new_scale_shape)
        return QArray(self.qvalue.reshape(qshape), self.scale.reshape(new_scale_shape), zp,
                      qtype=self.qtype, dtype=self.dtype,
                      packed_axis=None if packed_new is None else packed_new - len(new_shape),
                      packed_length=self.packed_length)

    def astype(self, dtype: Any) -> jax.Array:
        """Dequantize to ``dtype``."""
        return dequantize(self, dtype)

    def __jax_array__(self) -> jax.Array:
        return dequantize(self)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(dequantize(self), dtype=dtype)

    def __matmul__(self, other: Any) -> jax.Array:
        from qarray import ops
        return ops.matmul(self, other)

    def __rmatmul__(self, other: Any) -> jax.Array:
        from qarray import ops
        return ops.matmul(other, self)

    def __neg__(self):
        return -dequantize(self)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        try:
            tiles = self.tiles
            parts = [self.qtype.name, f"shape={self.shape}"]
            if self.channelwise_axes:
                parts.append(f"channelwise_axes={self.channelwise_axes}")
            if tiles:
                parts.append(f"tiles={tiles}")
            if self.zero_point is not None:
                parts.append("zero_point")
            if self.packed_axis is not None:
                parts.append(f"packed_axis={self.packed_axis}")
            parts.append(f"stored={self.nbytes} B")
            parts.append(f"dtype={self.dtype.name}")
            return f"QArray({', '.join(parts)})"
        except Exception:  # leaves that are not arrays (e.g. inside tree utilities)
            return (f"QArray(qtype={self.qtype.name}, qvalue={self.qvalue!r}, scale={self.scale!r}, "
                    f"zero_point={self.zero_point!r})")


def _binary(op):
    def method(self, other):
        return op(dequantize(self), other)

    def rmethod(self, other):
        return op(other, dequantize(self))

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


# --------------------------------------------------------------------------- layout helpers
def _normalize_layout(shape: tuple[int, ...], channelwise_axes: Any,
                      tiles: int | Mapping[int, int] | None) -> tuple[tuple[int, ...], dict[int, int]]:
    ndim = len(shape)
    if isinstance(channelwise_axes, int):
        channelwise_axes = (channelwise_axes,)
    try:
        cw = tuple(sorted({int(a) % ndim if -ndim <= int(a) < ndim else _bad_axis(a, ndim)
                           for a in channelwise_axes}))
    except TypeError:
        raise TypeError(f"channelwise_axes must be a sequence of ints; got {channelwise_axes!r}.") from None
    if tiles is None:
        tile_map = {}
    elif isinstance(tiles, (int, np.integer)) and not isinstance(tiles, bool):
        if ndim == 0:
            raise ValueError("tiles needs an array with at least one axis.")
        tile_map = {ndim - 1: int(tiles)}
        if ndim - 1 not in cw:  # (a tiled last axis in channelwise_axes is reported below)
            cw = tuple(range(ndim - 1))  # block-wise: every run of `tiles` values has its own scale
    elif isinstance(tiles, Mapping):
        tile_map = {}
        for a, t in tiles.items():
            if not -ndim <= int(a) < ndim:
                _bad_axis(a, ndim, 'tiles')
            tile_map[int(a) % ndim] = t
    else:
        raise TypeError(f"tiles must be None, an int (tile of the last axis) or a dict {{axis: tile}}; "
                        f"got {tiles!r}.")
    for a, t in tile_map.items():
        if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or t <= 0:
            raise ValueError(f"tiles[{a}] must be a positive int; got {t!r}.")
        if shape[a] % t:
            raise ValueError(f"tiles[{a}]={t} does not divide axis {a} of size {shape[a]} (shape {shape}); "
                             f"pick a tile that divides it.")
        if a in cw:
            raise ValueError(f"axis {a} is both in channelwise_axes and tiles; choose one.")
    return cw, {a: int(t) for a, t in tile_map.items()}


def normalize_axis(axis: Any, ndim: int, name: str = 'axis', what: str = 'an array') -> int:
    """``axis`` as a non-negative int, or a ValueError naming ``name`` and the allowed range.

    Example:
      >>> normalize_axis(-1, 3)
      2
    """
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool) or not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis!r} is out of range for {what} with {ndim} dims; "
                         f"use an int in [{-ndim}, {ndim - 1}].")
    return int(axis) % ndim


def _bad_axis(a, ndim, name='channelwise_axes'):
    raise ValueError(f"{name} axis {a} is out of range for an array with {ndim} dims.")


def tiled_view(shape: Sequence[int], scale_shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes that make ``scale`` broadcast against values: each tiled axis splits in (tiles, tile).

    Returns ``(value_view_shape, scale_view_shape)``.

    Example:
      >>> tiled_view((4, 256), (1, 2))
      ((4, 2, 128), (1, 2, 1))
    """
    vshape, sshape = [], []
    for n, s in zip(shape, scale_shape):
        if 1 < s < n:
            vshape += [s, n // s]
            sshape += [s, 1]
        else:
            vshape.append(n)
            sshape.append(s)
    return tuple(vshape), tuple(sshape)


# --------------------------------------------------------------------------- quantize
def group_view(shape: Sequence[int], channelwise_axes: Sequence[int], tiles: Mapping[int, int] | None
               ) -> tuple[list[int], tuple[int, ...], tuple[int, ...]]:
    """How ``shape`` splits into scale groups: ``(view, reduce_axes, scale_shape)``.

    Each tiled axis becomes ``(tiles, tile)`` in ``view``; calibration reduces
    ``view`` over ``reduce_axes`` (tile axes and axes neither channelwise nor
    tiled), and the result reshapes to ``scale_shape`` (the rank of ``shape``).

    Example:
      >>> group_view((4, 256), channelwise_axes=(0,), tiles={1: 128})
      ([4, 2, 128], (2,), (4, 2))
    """
    view, reduce_axes, scale_shape = [], [], []
    tiles = tiles or {}
    for a, n in enumerate(shape):
        if a in tiles:
            t = tiles[a]
            if n % t:
                raise ValueError(f"tile {t} does not divide axis {a} of size {n} (shape {tuple(shape)}).")
            view += [n // t, t]
            reduce_axes.append(len(view) - 1)
            scale_shape.append(n // t)
        else:
            view.append(n)
            if a not in channelwise_axes:
                reduce_axes.append(len(view) - 1)
            scale_shape.append(n if a in channelwise_axes else 1)
    return view, tuple(reduce_axes), tuple(scale_shape)


def _quantize_codes(x, qt, cw, tile_map, calibration, scale_dtype):
    """Codes (logical shape), scale and zero point (rank of x), plus the view shapes."""
    view, reduce_axes, scale_shape = group_view(x.shape, cw, tile_map)
    xv = x.reshape(view).astype(jnp.float32)
    rng = _calibration.calibrate(calibration, xv, tuple(reduce_axes), qt)
    scale, zp = numerics.scale_and_zero_point(rng.lo, rng.hi, rng.symmetric, qt, scale_dtype)
    scale = jnp.broadcast_to(scale, [1 if i in reduce_axes else d for i, d in enumerate(view)])
    if zp is not None:
        zp = jnp.broadcast_to(zp, scale.shape)
    q = numerics.to_codes(xv, scale, zp, qt, calibrated=True)
    return (q.reshape(x.shape), scale.reshape(scale_shape),
            None if zp is None else zp.reshape(scale_shape))


def _check_input(x: Any, check_finite: bool) -> jax.Array:
    if isinstance(x, QArray):
        raise TypeError("x is already a QArray; dequantize it first to re-quantize.")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array; got dtype {x.dtype}.")
    if check_finite:
        check_when_known(jnp.all(jnp.isfinite(x)), _raise_nonfinite)
    return x


def check_when_known(ok: Any, raise_unless_ok: Callable[[Any], None]) -> None:
    """Call ``raise_unless_ok(ok)`` now if ``ok`` is concrete, else when the traced program runs.

    Example:
      >>> def must_hold(ok):
      ...     if not bool(ok):
      ...         raise ValueError('it did not hold')
      >>> check_when_known(jnp.all(jnp.ones(3) > 0), must_hold)
    """
    try:
        concrete = bool(ok)
    except jax.errors.ConcretizationTypeError:  # traced (jit, vmap, ...): check at run time
        jax.debug.callback(raise_unless_ok, ok)
    else:
        raise_unless_ok(concrete)


def _raise_nonfinite(all_finite) -> None:
    if not bool(all_finite):
        raise ValueError("x contains NaN or Inf and check_finite=True; clean the data or pass "
                         "check_finite=False (non-finite groups then dequantize to NaN).")


def quantize(x: Any, qtype: Any, *, channelwise_axes: int | Sequence[int] = (),
             tiles: int | Mapping[int, int] | None = None, calibration: str = 'absmax',
             scale_dtype: Any = None, pack_axis: int = -1, check_finite: bool = False) -> QArray:
    """Quantize ``x`` to ``qtype``.

    Args:
      x: floating-point array.
      qtype: format name (``'int8'``, ``'int4'``, ``'uint4'``, ``'nf4'``, ``'fp8'``, ...),
        a dtype, or a :class:`~qarray.qtypes.QType`.
      channelwise_axes: axes with one scale per index.
      tiles: ``128`` is block-wise (as bitsandbytes): every run of 128 values
        along the last axis has its own scale, i.e. the last axis is tiled and
        every other axis is channelwise. ``{0: 128}`` tiles axis 0 only; with the
        dict form, axes neither channelwise nor tiled share one scale.
      calibration: ``'absmax'``, ``'minmax'``, ``'rms[,k]'``, ``'fixed,lo,hi'``,
        ``'percentile,p'`` or ``'mse[,steps[,min_ratio]]'``.
      scale_dtype: dtype of scales (default: ``x.dtype``).
      pack_axis: axis along which sub-byte formats are bit-packed.
      check_finite: raise ``ValueError`` if ``x`` holds NaN/Inf.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> q = qarray.quantize(jnp.array([[1., -2.], [3., 4.]]), 'int8', channelwise_axes=1)
      >>> q.scale.shape
      (1, 2)
    """
    x = _check_input(x, check_finite)
    qt, cw, tile_map, scale_dtype = _resolve_args(x, qtype, channelwise_axes, tiles, calibration, scale_dtype)
    if qt.packed:
        _check_pack_axis(x, qt, pack_axis)
    return _quantize_jit(x, qt, cw, tuple(sorted(tile_map.items())), calibration, scale_dtype, pack_axis)


def _resolve_args(x, qtype, channelwise_axes, tiles, calibration, scale_dtype):
    """Validate everything static up front, so errors name the argument before any tracing."""
    qt = qtypes.get(qtype)
    cw, tile_map = _normalize_layout(x.shape, channelwise_axes, tiles)
    _calibration.parse(calibration)
    scale_dtype = jnp.dtype(scale_dtype or x.dtype)
    if not jnp.issubdtype(scale_dtype, jnp.floating):
        raise TypeError(f"scale_dtype must be a floating dtype (float32, bfloat16, float16); got {scale_dtype}.")
    return qt, cw, tile_map, scale_dtype


# One compiled program per (format, layout, shape): eager calls run as fast as jitted ones
# and an outer jit simply inlines it.
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _quantize_jit(x, qt, cw, tile_items, calibration, scale_dtype, pack_axis) -> QArray:
    codes_, scale, zp = _quantize_codes(x, qt, cw, dict(tile_items), calibration, scale_dtype)
    return _pack(codes_, scale, zp, qt, x, pack_axis)


def quantize_with_scale(x: Any, qtype: Any, scale: Any, zero_point: Any = None, *,
                        pack_axis: int = -1) -> QArray:
    """Quantize ``x`` with a given ``scale`` (and zero point), e.g. static-range activations.

    ``scale`` (and ``zero_point``) must have the rank of ``x`` with every axis
    1, the full size, or a divisor of it (tiles). Unsigned formats need a zero point.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> q = qarray.quantize_with_scale(jnp.array([[0.5, -1.0]]), 'int8', jnp.full((1, 1), 0.01))
      >>> qarray.codes(q).tolist()
      [[50, -100]]
    """
    x = _check_input(x, False)
    qt = qtypes.get(qtype)
    c, scale, zero_point = _codes_with_scale(x, qt, scale, zero_point)
    return _pack(c, scale, zero_point, qt, x, pack_axis)


def _codes_with_scale(x, qt, scale, zero_point):
    """Codes of ``x`` (logical shape) for a given scale / zero point, both checked and broadcast."""
    scale = jnp.asarray(scale)
    if scale.ndim != x.ndim or any(n % s for n, s in zip(x.shape, scale.shape)):
        raise ValueError(f"scale of shape {scale.shape} does not fit x of shape {x.shape}: it needs the rank "
                         "of x with every axis 1, the full size, or a divisor of it.")
    if qt.kind == 'uint' and zero_point is None:
        raise ValueError(f"qtype {qt.name!r} is unsigned and needs a zero_point.")
    if zero_point is not None:
        qt.asym_range  # raises for formats without a zero point
        zero_point = jnp.broadcast_to(jnp.asarray(zero_point), scale.shape).astype(qt.code_dtype)
    vshape, sshape = tiled_view(x.shape, scale.shape)
    zpv = None if zero_point is None else zero_point.reshape(sshape)
    c = numerics.to_codes(x.reshape(vshape), scale.reshape(sshape), zpv, qt).reshape(x.shape)
    return c, scale, zero_point


def _check_pack_axis(x, qt, pack_axis) -> None:
    if x.ndim == 0:
        raise ValueError(f"qtype {qt.name!r} is bit-packed and needs an array with at least one axis.")
    normalize_axis(pack_axis, x.ndim, 'pack_axis')


def _pack(codes_, scale, zp, qt, x, pack_axis) -> QArray:
    if not qt.packed:
        return QArray(codes_, scale, zp, qtype=qt, dtype=x.dtype)
    _check_pack_axis(x, qt, pack_axis)
    pa = pack_axis % x.ndim
    qvalue = packing.pack(qt.to_field(codes_), qt.bits, axis=pa)
    return QArray(qvalue, scale, zp, qtype=qt, dtype=x.dtype, packed_axis=pa - x.ndim,
                  packed_length=x.shape[pa])


def codes(q: QArray) -> jax.Array:
    """Unpacked codes of ``q`` in logical shape (int8 / uint8 / fp8 / nf4 indices).

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> qarray.core.codes(qarray.quantize(jnp.array([-0.5, 1.]), 'int2')).tolist()
      [-1, 1]
    """
    if q.packed_axis is None:
        return q.qvalue
    return _unpack_codes_jit(q)


@jax.jit
def _unpack_codes_jit(q: QArray) -> jax.Array:
    if 8 % q.qtype.bits == 0:
        return _split_bytes(q)
    fields = packing.unpack(q.qvalue, q.qtype.bits, q.packed_length, axis=q.packed_axis % q.ndim)
    return q.qtype.from_field(fields)


def _split_bytes(q: QArray) -> jax.Array:
    """Codes of a 1/2/4-bit QArray: one broadcast shift splits every byte into its ``8 // bits`` fields.

    Same layout as :func:`packing.unpack` (field ``i`` of a byte at bits
    ``[i*bits, (i+1)*bits)``); signed fields are sign-extended by moving them to
    the top of the byte and shifting back arithmetically. Cheaper than the
    general unpacker, and XLA fuses it into the consumer.
    """
    bits, qt = q.qtype.bits, q.qtype
    per = 8 // bits
    axis = q.packed_axis % q.ndim
    b = jnp.expand_dims(q.qvalue, axis + 1)
    shifts = (np.arange(per) * bits).reshape([per if i == axis + 1 else 1 for i in range(q.ndim + 1)])
    if qt.kind == 'int' and bits > 1:
        up = jax.lax.shift_left(b, jnp.asarray(8 - bits - shifts, jnp.uint8))
        v = jax.lax.shift_right_arithmetic(jax.lax.bitcast_convert_type(up, jnp.int8), jnp.int8(8 - bits))
    else:
        v = jax.lax.shift_right_logical(b, jnp.asarray(shifts, jnp.uint8)) & jnp.uint8(2**bits - 1)
        v = qt.from_field(v)
    shape = list(q.qvalue.shape)
    shape[axis] *= per
    return jax.lax.slice_in_dim(v.reshape(shape), 0, q.packed_length, axis=axis)


def dequantize(q: QArray, dtype: Any = None) -> jax.Array:
    """Reconstruct the float array (in ``q.dtype`` unless ``dtype`` is given).

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> q = qarray.quantize(jnp.array([0., 2., -7.5]), 'int4')  # scale = absmax / 7.5 = 1
      >>> qarray.dequantize(q).tolist()   # -7.5 rounds half to even: to the extra negative code, -8
      [0.0, 2.0, -8.0]
    """
    if not isinstance(q, QArray):
        raise TypeError(f"dequantize expects a QArray; got {type(q).__name__}.")
    return _dequantize_jit(q, q.dtype if dtype is None else jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1,))
def _dequantize_jit(q: QArray, dtype) -> jax.Array:
    return _values(codes(q), q.scale, q.zero_point, q.qtype, dtype)


def _values(codes_: jax.Array, scale: jax.Array, zero_point: jax.Array | None, qt, dtype) -> jax.Array:
    """Codes in logical shape -> values, scales broadcast over their tiles."""
    vshape, sshape = tiled_view(codes_.shape, scale.shape)
    zp = None if zero_point is None else zero_point.reshape(sshape)
    values = numerics.from_codes(codes_.reshape(vshape), scale.reshape(sshape), zp, qt, dtype)
    return values.reshape(codes_.shape)


# --------------------------------------------------------------------------- fake quant
@jax.custom_jvp
def straight_through(x: jax.Array, y: jax.Array, inside: jax.Array) -> jax.Array:
    """Returns ``y``; its gradient w.r.t. ``x`` is 1 where ``inside`` and 0 elsewhere.

    The straight-through estimator every fake-quant path shares (``y`` and
    ``inside`` carry no gradient).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> g = jax.grad(lambda v: straight_through(v, jnp.round(v), v < 1).sum())
      >>> g(jnp.array([0.4, 1.6])).tolist()
      [1.0, 0.0]
    """
    return y


@straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    x, y, inside = primals
    tx = tangents[0]
    return y, jnp.where(inside, tx, jnp.zeros_like(tx))


def representable_range(scale: jax.Array, zero_point: jax.Array | None, qtype: Any
                        ) -> tuple[jax.Array, jax.Array]:
    """The range of values that quantize without clipping (the STE's pass-through range).

    For integer formats it reaches half a step beyond the extreme levels
    (their rounding cells), so a value at the calibrated absmax — which lands
    on ``qmax + 1/2`` — still gets a gradient; signed ints go one code further
    down (``-qmax - 1``). fp8 and nf4: their largest level times ``scale``.

    Example:
      >>> import jax.numpy as jnp
      >>> lo, hi = representable_range(jnp.array(0.5), None, 'int8')
      >>> float(lo), float(hi)
      (-64.25, 63.75)
    """
    qt = qtypes.get(qtype)
    s = scale.astype(jnp.float32)
    qa, qb = numerics.code_range(qt, zero_point is not None)
    half = qt.step_in_scales / 2 if qt.is_integer else 0.0
    qa, qb = qa - half, qb + half
    if zero_point is not None:
        zpf = zero_point.astype(jnp.float32)
        return (qa - zpf) * s, (qb - zpf) * s
    return qa * s, qb * s


def fake_quant(x: Any, qtype: Any, *, channelwise_axes: int | Sequence[int] = (),
               tiles: int | Mapping[int, int] | None = None, calibration: str = 'absmax',
               scale_dtype: Any = None, ste: str = 'clipped') -> jax.Array:
    """Quantize then dequantize, with a straight-through gradient.

    The forward value equals ``dequantize(quantize(x, ...))`` bit for bit.
    Gradient: ``ste='clipped'`` (default) passes it through where ``x`` lies
    inside the representable range and gives zero outside; ``ste='plain'``
    passes it everywhere. Scales get no gradient.

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> g = jax.grad(lambda v: qarray.fake_quant(v, 'int8', calibration='fixed,-1,1').sum())
      >>> g(jnp.array([0.5, 2.0])).tolist()
      [1.0, 0.0]
    """
    _check_ste(ste)
    x = _check_input(x, False)
    qt, cw, tile_map, scale_dtype = _resolve_args(x, qtype, channelwise_axes, tiles, calibration, scale_dtype)
    return _fake_quant_jit(x, qt, cw, tuple(sorted(tile_map.items())), calibration, scale_dtype, ste)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _fake_quant_jit(x, qt, cw, tile_items, calibration, scale_dtype, ste) -> jax.Array:
    xs = jax.lax.stop_gradient(x)
    c, scale, zp = _quantize_codes(xs, qt, cw, dict(tile_items), calibration, scale_dtype)
    return straight_through(x, _values(c, scale, zp, qt, x.dtype), _pass_mask(xs, scale, zp, qt, ste))


def _check_ste(ste: str) -> None:
    if ste not in ('clipped', 'plain'):
        raise ValueError(f"ste must be 'clipped' or 'plain'; got {ste!r}.")


def _pass_mask(xs, scale, zero_point, qt, ste) -> jax.Array:
    """Where the gradient passes: everywhere ('plain') or inside the representable range ('clipped')."""
    if ste == 'plain':
        return jnp.ones(xs.shape, bool)
    vshape, sshape = tiled_view(xs.shape, scale.shape)
    zp = None if zero_point is None else jnp.broadcast_to(zero_point, scale.shape).reshape(sshape)
    lo, hi = representable_range(scale.reshape(sshape), zp, qt)
    xv = xs.reshape(vshape).astype(jnp.float32)
    return ((xv >= lo) & (xv <= hi)).reshape(xs.shape)


def fake_quant_with_scale(x: Any, qtype: Any, scale: Any, zero_point: Any = None, *,
                          ste: str = 'clipped') -> jax.Array:
    """``dequantize(quantize_with_scale(x, ...))`` with a straight-through gradient (static scales).

    The static-range counterpart of :func:`fake_quant`: the forward value is
    bit-identical to quantizing with the stored scale; the gradient is as in
    :func:`fake_quant`, and ``scale``/``zero_point`` get none.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> g = jax.grad(lambda v: fake_quant_with_scale(v, 'int8', jnp.full((1,), 0.01)).sum())
      >>> g(jnp.array([0.5, 2.0])).tolist()
      [1.0, 0.0]
    """
    _check_ste(ste)
    x = _check_input(x, False)
    xs = jax.lax.stop_gradient(x)
    scale = jax.lax.stop_gradient(jnp.asarray(scale))
    zero_point = None if zero_point is None else jax.lax.stop_gradient(jnp.asarray(zero_point))
    qt = qtypes.get(qtype)
    c, scale, zero_point = _codes_with_scale(xs, qt, scale, zero_point)  # no pack/unpack round trip
    return straight_through(x, _values(c, scale, zero_point, qt, x.dtype), _pass_mask(xs, scale, zero_point, qt, ste))
