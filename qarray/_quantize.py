"""quantize, dequantize and codes: floats to a :class:`~qarray.QArray` and back.

NaN/Inf policy: a group (tile/channel) whose data holds NaN or ±Inf gets a
NaN scale, so every value of that group dequantizes to NaN — never a silently
finite number. Pass ``check_finite=True`` to raise a ``ValueError`` instead
(eagerly on concrete input, at run time under ``jit``).

Example:
  >>> import jax.numpy as jnp, qarray
  >>> q = qarray.quantize(jnp.array([[1., -2.], [3., 4.]]), 'int8', channelwise_axes=1)
  >>> qarray.dequantize(q).shape
  (2, 2)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qarray import _layout, _microscaling, _numerics, packing, qtypes
from qarray import calibration as _calibration
from qarray._array import QArray

__all__ = ['quantize', 'quantize_with_scale', 'dequantize', 'codes', 'unpacked_codes', 'values_from_codes',
           'check_when_known',
           'check_input', 'resolve_args', 'quantize_codes', 'codes_with_scale', 'Spec', 'quantize_scales',
           'scale_blocks']


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything static about one quantization (hashable: a jit cache key).

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray._quantize import resolve_args
      >>> resolve_args(jnp.ones((4, 64)), 'mxfp4', (), None, 'absmax', None).tiles
      ((1, 32),)
    """

    qtype: qtypes.QType
    channelwise_axes: tuple[int, ...]
    tiles: tuple[tuple[int, int], ...]
    calibration: str
    scale_dtype: Any
    scale_qtype: qtypes.QType | None = None  # quantize the scales themselves (double quantization)
    rounding: str = 'nearest'  # or 'stochastic' (then quantize_codes needs a key)


def quantize_codes(x, spec: Spec, with_overflow: bool = False, key: jax.Array | None = None):
    """Codes (logical shape), scale (rank of x; a QArray for quantized scales) and zero point; with
    ``with_overflow`` also a scalar bool: whether some finite group needs a scale beyond ``scale_dtype``.
    ``key`` drives stochastic rounding (``spec.rounding == 'stochastic'``)."""
    qt, scale_dtype = spec.qtype, spec.scale_dtype
    uneven = [(a, t) for a, t in spec.tiles if x.shape[a] % t]
    if uneven:
        return _uneven_codes(x, spec, uneven[0], with_overflow, key)
    view, reduce_axes, scale_shape = _layout.group_view(x.shape, spec.channelwise_axes, dict(spec.tiles))
    no_overflow = jnp.zeros((), bool)
    if x.size == 0:  # nothing to calibrate: unit scales, no codes
        if not qt.microscaling:  # but an asymmetric calibration on a format without a zero point is still refused
            probe = _calibration.calibrate(spec.calibration, jnp.zeros([1] * len(view), jnp.float32),
                                           tuple(reduce_axes), qt)
            if not probe.symmetric:
                qt.asym_range  # raises the documented error for int1, fp8, code books  # noqa: B018
        out = _empty_codes(x, spec, scale_shape)
        return out + (no_overflow,) if with_overflow else out
    xv = x.reshape(view).astype(_numerics.compute_dtype(x.dtype))
    bshape = [1 if i in reduce_axes else d for i, d in enumerate(view)]
    if qt.microscaling:
        out = _microscaling_codes(xv, tuple(reduce_axes), spec, x.shape, scale_shape)
        return out + (no_overflow,) if with_overflow else out
    rng = _calibration.calibrate(spec.calibration, xv, tuple(reduce_axes), qt)
    scale, zp = _numerics.scale_and_zero_point(rng.lo, rng.hi, rng.symmetric, qt, scale_dtype)
    stored = scale = jnp.broadcast_to(scale, bshape)
    if spec.scale_qtype is not None:  # double quantization: codes follow the scale as stored
        stored = quantize_scales(scale.reshape(scale_shape), spec.scale_qtype)
        scale = dequantize(stored, jnp.float32).reshape(bshape)
        if zp is not None:
            zp = _numerics.zero_point_for(rng.lo, rng.hi, rng.symmetric, qt, scale)
    if zp is not None:
        zp = jnp.broadcast_to(zp, bshape)
    noise = None if spec.rounding == 'nearest' else jax.random.uniform(key, xv.shape, xv.dtype)
    q = _numerics.to_codes(xv, scale, zp, qt, calibrated=True, noise=noise)
    out = (q.reshape(x.shape), stored if spec.scale_qtype is not None else scale.reshape(scale_shape),
           None if zp is None else zp.reshape(scale_shape))
    if with_overflow:
        out = out + (jnp.any(_numerics.scale_overflows(rng.lo, rng.hi, rng.symmetric, qt, scale_dtype)),)
    return out


def _uneven_codes(x, spec: Spec, uneven: tuple[int, int], with_overflow: bool, key):
    """A tile that does not divide its axis: the whole tiles and the partial last one are quantized as two
    parts (each part's groups calibrate on their own values only) and joined along the axis."""
    a, t = uneven
    n = x.shape[a]
    whole = (n // t) * t
    tail = dataclasses.replace(spec, tiles=tuple((b, n - whole if b == a else u) for b, u in spec.tiles))
    parts = [(jax.lax.slice_in_dim(x, whole, n, axis=a), tail)]
    if whole:
        parts.insert(0, (jax.lax.slice_in_dim(x, 0, whole, axis=a), spec))
    keys = [None] * len(parts) if key is None else [jax.random.fold_in(key, i) for i in range(len(parts))]
    outs = [quantize_codes(p, s, with_overflow, k) for (p, s), k in zip(parts, keys)]
    if len(outs) == 1:
        return outs[0]
    join = lambda i: None if outs[0][i] is None else jnp.concatenate([o[i] for o in outs], axis=a)
    out = (join(0), join(1), join(2))
    return out + (outs[0][3] | outs[1][3],) if with_overflow else out


def _microscaling_codes(xv, reduce_axes, spec: Spec, shape, scale_shape):
    qt = spec.qtype
    if qt.scale_format == 'e8m0':
        codes_, scale = _microscaling.mx_groups(xv, reduce_axes, qt, spec.calibration)
        return codes_.reshape(shape), scale.reshape(scale_shape), None
    codes_, s8, g = _microscaling.nvfp4_groups(xv, reduce_axes, qt, spec.calibration)
    inner = QArray(s8.reshape(scale_shape), g.reshape((1,) * len(scale_shape)), qtype='float8_e4m3fn',
                   dtype=jnp.float32)
    return codes_.reshape(shape), inner, None


def scale_blocks(shape: Sequence[int], block: int = 256) -> tuple[tuple[int, ...], dict[int, int]]:
    """``(channelwise_axes, tiles)`` that group ``shape`` into blocks of (up to) ``block`` values, filled from
    the last axis: how the scales of a double-quantized QArray are blocked (256 per second-level scale, as
    bitsandbytes does). Axes the blocks cover whole are shared; axes past them are per index.

    Example:
      >>> from qarray._quantize import scale_blocks
      >>> scale_blocks((1024, 16)), scale_blocks((4096, 64)), scale_blocks((512, 64, 8))
      (((), {0: 16}), ((), {0: 4}), ((0,), {1: 32}))
    """
    tiles, room, a = {}, block, len(shape) - 1
    while a >= 0 and room > 1:
        n = shape[a]
        t = max(d for d in range(1, min(n, room) + 1) if n % d == 0) if n else 1
        if 1 < t < n:
            tiles[a] = t
        room //= max(t, 1)
        a -= 1
        if t < n:
            break
    return tuple(range(a + 1)), dict(sorted(tiles.items()))


def quantize_scales(scale: jax.Array, scale_qtype: qtypes.QType, block: int = 256) -> QArray:
    """Double quantization: the (float) scales of a QArray as a QArray of their own -- their mean taken out
    (kept as a float zero point, in value space), then ``scale_qtype`` codes with one float32 scale per
    block of up to 256 scales (:func:`scale_blocks`). Dequantizes to ``codes * s2 - zero_point``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from qarray import qtypes
      >>> from qarray._quantize import quantize_scales
      >>> s = 1.0 + jax.random.uniform(jax.random.key(0), (64, 8))
      >>> q = quantize_scales(s, qtypes.get('int8'))
      >>> q.qvalue.dtype, q.scale.shape, bool(jnp.abs(q.__jax_array__() - s).max() < 2 * q.scale.max() / 2)
      (dtype('int8'), (2, 1), True)
    """
    scale = scale.astype(jnp.float32)
    mean = jnp.mean(scale)
    cw, tiles = scale_blocks(scale.shape, block)
    spec = Spec(scale_qtype, cw, tuple(tiles.items()), 'absmax', jnp.dtype(jnp.float32))
    c, s2, zp = quantize_codes(scale - mean, spec)
    zp = jnp.broadcast_to(-mean, s2.shape).astype(jnp.float32)  # value space: scale = c * s2 - zp
    return _pack(c, s2, zp, scale_qtype, scale, -1)


def _empty_codes(x, spec: Spec, scale_shape):
    qt = spec.qtype
    if qt.microscaling:
        ones = jnp.ones(scale_shape, jnp.float32)
        if qt.scale_format == 'e8m0':
            return jnp.zeros(x.shape, qt.code_dtype), ones.astype(qt.scale_dtype), None
        inner = QArray(ones.astype(jnp.float8_e4m3fn), jnp.ones((1,) * len(scale_shape)), qtype='float8_e4m3fn')
        return jnp.zeros(x.shape, qt.code_dtype), inner, None
    symmetric = _calibration.calibrate(spec.calibration, jnp.array([-1.0, 1.0]), (0,), qt).symmetric
    zp = jnp.zeros(scale_shape, qt.code_dtype) if _numerics.uses_zero_point(qt, symmetric) else None
    return jnp.zeros(x.shape, qt.code_dtype), jnp.ones(scale_shape, spec.scale_dtype), zp


def check_input(x: Any, check_finite: bool) -> jax.Array:
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
      >>> import jax.numpy as jnp
      >>> from qarray._quantize import check_when_known
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
             scale_dtype: Any = None, pack_axis: int = -1, check_finite: bool = False,
             scale_qtype: Any = None, rounding: str = 'nearest', key: jax.Array | None = None) -> QArray:
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
      scale_qtype: quantize the scales themselves (double quantization, as
        QLoRA does for nf4): the scales' mean is taken out and the rest stored
        as ``scale_qtype`` codes (e.g. ``'int8'``) with one float32 scale per
        block of 256 scales; ``q.scale`` is then a QArray. nf4 t64 goes from
        4.5 to about 4.13 bits per value. Any format but the microscaling ones
        (whose scales are already one byte).
      rounding: ``'nearest'`` (half to even) or ``'stochastic'``: round up with
        probability equal to the distance from the level below, so the
        expected dequantized value is ``x`` wherever ``x`` is inside the
        format's range (unbiased; for gradients and optimizer states). Needs
        ``key`` (a ``jax.random`` key). Any int, uint, fp8/fp4 or code-book
        format (not the microscaling formats).
      key: the random key for ``rounding='stochastic'``.
      check_finite: raise ``ValueError`` if ``x`` holds NaN/Inf. Under ``jit`` the
        check runs inside the compiled program, so it surfaces as JAX's
        ``jax.errors.JaxRuntimeError`` carrying the ``ValueError``'s message
        (no Python exception can be raised from traced code); quantize eagerly
        to get the ``ValueError`` itself.

    Limits: arithmetic runs in float32 (float64 for float64 data). A finite
    group whose range needs a scale beyond ``scale_dtype``'s largest value
    (e.g. 1e38 with ``scale_dtype=float16``, or ``uint1`` data spanning
    ±1.8e38) raises a ``ValueError`` here; under ``jit`` it cannot, and such a
    group gets a saturated scale (its values clip) or a NaN scale. A size-0
    array gets unit scales and no codes.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> q = qarray.quantize(jnp.array([[1., -2.], [3., 4.]]), 'int8', channelwise_axes=1)
      >>> q.scale.shape
      (1, 2)
    """
    x = check_input(x, check_finite)
    spec = resolve_args(x, qtype, channelwise_axes, tiles, calibration, scale_dtype, scale_qtype, rounding, key)
    qt, scale_dtype = spec.qtype, spec.scale_dtype
    if qt.packed:
        _check_pack_axis(x, qt, pack_axis)
    q, overflow = _quantize_jit(x, spec, pack_axis, key)
    if not isinstance(overflow, jax.core.Tracer) and bool(overflow):
        raise ValueError(
            f"x's range needs a scale larger than {scale_dtype.name} can hold (max {jnp.finfo(scale_dtype).max:.4g}) "
            f"for qtype {qt.name!r} with calibration {calibration!r}: the scale would saturate and values clip. "
            f"Use a wider scale_dtype (float32) or scale x down first (e.g. by a power of two) and the QArray's "
            f"scale back up. (Under jit no error is possible: such groups saturate, or get a NaN scale.)")
    return q


def resolve_args(x, qtype, channelwise_axes, tiles, calibration, scale_dtype, scale_qtype=None,
                 rounding: str = 'nearest', key: Any = None) -> Spec:
    """Validate everything static up front, so errors name the argument before any tracing."""
    qt = qtypes.get(qtype)
    if rounding not in ('nearest', 'stochastic'):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic'; got {rounding!r}.")
    if rounding == 'stochastic':
        if key is None:
            raise ValueError("rounding='stochastic' needs key=jax.random.key(...) (the random bits of the rounding).")
        if qt.microscaling:
            raise ValueError(f"rounding='stochastic' is not available for the microscaling format {qt.name!r}; use "
                             "its element format with tiles (e.g. 'fp4' or 'fp8') or rounding='nearest'.")
    elif key is not None:
        raise ValueError("key is only used with rounding='stochastic'; pass rounding='stochastic' or drop key.")
    if qt.microscaling:
        return _resolve_microscaling(x, qt, channelwise_axes, tiles, calibration, scale_dtype, scale_qtype)
    cw, tile_map = _layout.normalize_layout(x.shape, channelwise_axes, tiles)
    _calibration.parse(calibration)
    # As JAX stores it: float64 is float32 unless jax_enable_x64 (so the scale floor is float32's tiny, not 0)
    scale_dtype = jax.dtypes.canonicalize_dtype(jnp.dtype(scale_dtype or x.dtype))
    if not jnp.issubdtype(scale_dtype, jnp.floating):
        raise TypeError(f"scale_dtype must be a floating dtype (float32, bfloat16, float16); got {scale_dtype}.")
    uneven = {a: t for a, t in tile_map.items() if x.shape[a] % t}
    sqt = None
    if scale_qtype is not None and uneven:
        raise ValueError(f"scale_qtype: double quantization needs tiles that divide their axes; tiles {uneven} "
                         f"leave a partial last tile on shape {tuple(x.shape)}.")
    if scale_qtype is not None:
        sqt = qtypes.get(scale_qtype)
        if sqt.microscaling or sqt.kind == 'uint':
            raise ValueError(f"scale_qtype: the scales are quantized symmetrically after their mean is taken out; use "
                             f"a signed int, fp8 or nf4 format such as 'int8'; got {sqt.name!r}.")
    return Spec(qt, cw, tuple(sorted(tile_map.items())), calibration, scale_dtype, sqt, rounding)


def _resolve_microscaling(x, qt, channelwise_axes, tiles, calibration, scale_dtype, scale_qtype) -> Spec:
    what = f"qtype {qt.name!r} (blocks of {qt.block} values along one axis, {qt.scale_format} scales)"
    if scale_dtype is not None:
        raise ValueError(f"scale_dtype: {what} stores its own scale dtype; pass scale_dtype=None.")
    if scale_qtype is not None:
        raise ValueError(f"scale_qtype: {what} already stores one-byte scales; pass scale_qtype=None.")
    if calibration not in _microscaling.CALIBRATIONS:
        raise ValueError(f"calibration: {what} takes 'absmax' (the OCP MX spec's shared exponent) or 'mse' (the "
                         f"better of two exponents per block); got {calibration!r}.")
    if x.ndim == 0:
        raise ValueError(f"{what} needs an array with at least one axis.")
    if tiles is None:
        tiles = {x.ndim - 1: qt.block}
    elif isinstance(tiles, int) and not isinstance(tiles, bool):
        tiles = {x.ndim - 1: tiles}
    if not isinstance(tiles, dict) or len(tiles) != 1 or list(tiles.values())[0] != qt.block:
        raise ValueError(f"tiles: {what} needs tiles={qt.block} (last axis) or {{axis: {qt.block}}}; got {tiles!r}.")
    _, tile_map = _layout.normalize_layout(x.shape, (), tiles)
    axis = next(iter(tile_map))
    if qt.scale_format == 'e4m3' and x.shape[axis] % qt.block:
        raise ValueError(f"{what} needs an axis that is a multiple of {qt.block} (its per-tensor scale is computed over "
                         f"whole blocks); axis {axis} of shape {tuple(x.shape)} has {x.shape[axis]}.")
    cw = tuple(a for a in range(x.ndim) if a != axis)
    del channelwise_axes  # every other axis is per index: each block of the tiled axis has its own scale
    return Spec(qt, cw, tuple(tile_map.items()), calibration, qt.scale_dtype, None)


# One compiled program per (format, layout, shape): eager calls run as fast as jitted ones
# and an outer jit simply inlines it.
@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_jit(x, spec: Spec, pack_axis, key) -> tuple[QArray, jax.Array]:
    codes_, scale, zp, overflow = quantize_codes(x, spec, with_overflow=True, key=key)
    return _pack(codes_, scale, zp, spec.qtype, x, pack_axis, uneven_tiles(x.shape, spec.tiles)), overflow


def uneven_tiles(shape, tiles) -> tuple[tuple[int, int], ...]:
    """The ``QArray.tile_sizes`` entries (axis from the end, tile) of the tiles that do not divide their axis."""
    return tuple((a - len(shape), t) for a, t in tiles if shape[a] % t)


def quantize_with_scale(x: Any, qtype: Any, scale: Any, zero_point: Any = None, *,
                        pack_axis: int = -1) -> QArray:
    """Quantize ``x`` with a given ``scale`` (and zero point), e.g. static-range activations.

    ``scale`` (and ``zero_point``) must have the rank of ``x`` with every axis
    1, the full size, or a divisor of it (tiles). Unsigned formats need a zero point.
    A scale must be positive and finite, and a zero point an integer code of
    the format (checked when they are concrete; under ``jit`` a zero scale
    gives inf/NaN codes and a zero point is wrapped to the code dtype, so
    check them before tracing).

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> q = qarray.quantize_with_scale(jnp.array([[0.5, -1.0]]), 'int8', jnp.full((1, 1), 0.01))
      >>> qarray.codes(q).tolist()
      [[50, -100]]
    """
    x = check_input(x, False)
    qt = qtypes.get(qtype)
    c, scale, zero_point = codes_with_scale(x, qt, scale, zero_point)
    return _pack(c, scale, zero_point, qt, x, pack_axis)


def codes_with_scale(x, qt, scale, zero_point):
    """Codes of ``x`` (logical shape) for a given scale / zero point, both checked and broadcast."""
    scale, zero_point = check_scale(x, qt, scale, zero_point)
    vshape, sshape = _layout.tiled_view(x.shape, scale.shape)
    zpv = None if zero_point is None else zero_point.reshape(sshape)
    c = _numerics.to_codes(x.reshape(vshape), scale.reshape(sshape), zpv, qt).reshape(x.shape)
    return c, scale, zero_point


def check_scale(x, qt, scale, zero_point):
    """``scale`` and ``zero_point`` (broadcast to the scale's shape, code dtype) checked against ``x`` and ``qt``;
    their values too when they are concrete (eager)."""
    scale = jnp.asarray(scale)
    if not jnp.issubdtype(scale.dtype, jnp.floating):
        raise TypeError(f"scale must be a floating-point array; got dtype {scale.dtype}.")
    misfit = lambda n, s: s not in (0, 1) if n == 0 else (s == 0 or n % s != 0)  # an empty axis: 1 or 0 scales
    if scale.ndim != x.ndim or any(misfit(n, s) for n, s in zip(x.shape, scale.shape)):
        raise ValueError(f"scale of shape {scale.shape} does not fit x of shape {x.shape}: it needs the rank "
                         "of x with every axis 1, the full size, or a divisor of it.")
    if _concrete(scale):  # numpy: an eager check compiles nothing
        s = np.asarray(scale, np.float32 if scale.dtype.itemsize < 4 else scale.dtype)
        if not np.all(np.isfinite(s) & (s > 0)):
            raise ValueError("scale must be positive and finite everywhere (a zero, negative, NaN or Inf scale "
                             "has no codes); got min %s." % float(np.min(s)))
    if qt.kind == 'uint' and zero_point is None:
        raise ValueError(f"qtype {qt.name!r} is unsigned and needs a zero_point.")
    if zero_point is not None:
        qa, qb = qt.asym_range  # raises for formats without a zero point
        zero_point = jnp.asarray(zero_point)
        if _concrete(zero_point):
            z = np.asarray(zero_point).astype(np.float64)
            if not np.all((z == np.round(z)) & (z >= qa) & (z <= qb)):
                raise ValueError(f"zero_point must hold integer codes of {qt.name!r} in [{qa}, {qb}]; got values in "
                                 f"[{float(np.min(z))}, {float(np.max(z))}].")
        zero_point = jnp.broadcast_to(zero_point, scale.shape).astype(qt.code_dtype)
    return scale, zero_point


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_pack_axis(x, qt, pack_axis) -> None:
    if x.ndim == 0:
        raise ValueError(f"qtype {qt.name!r} is bit-packed and needs an array with at least one axis.")
    _layout.normalize_axis(pack_axis, x.ndim, 'pack_axis')


def _pack(codes_, scale, zp, qt, x, pack_axis, tile_sizes=()) -> QArray:
    if not qt.packed:
        return QArray(codes_, scale, zp, qtype=qt, dtype=x.dtype, tile_sizes=tile_sizes)
    _check_pack_axis(x, qt, pack_axis)
    pa = pack_axis % x.ndim
    if qt.bits in (2, 4):
        # The same bytes as packing.pack, but elementwise ops and bitcasts only (no word reduce, which would
        # end the fusion): under jit the packing fuses into the codes pass, and a dequantize in the same
        # program cancels it instead of re-reading the packed codes.
        signed = qt.kind == 'int'  # int2/int4 codes are already two's-complement fields in int8
        qvalue = packing.pack_native(codes_ if signed else qt.to_field(codes_), qt.bits, axis=pa, signed=signed)
    else:
        qvalue = packing.pack(qt.to_field(codes_), qt.bits, axis=pa)
    return QArray(qvalue, scale, zp, qtype=qt, dtype=x.dtype, packed_axis=pa - x.ndim, packed_length=x.shape[pa],
                  tile_sizes=tile_sizes)


def codes(q: QArray) -> jax.Array:
    """Unpacked codes of ``q`` in logical shape (int8 / uint8 / fp8 / nf4 indices).

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> qarray.codes(qarray.quantize(jnp.array([-0.5, 1.]), 'int2')).tolist()
      [-1, 1]
    """
    if not isinstance(q, QArray):
        raise TypeError(f"codes expects a QArray; got {type(q).__name__}.")
    q.check()
    return unpacked_codes(q.qvalue, q.qtype, q.packed_axis, q.packed_length)


def repack(q: QArray, pack_axis: int) -> QArray:
    """``q`` with its bit-packed codes packed along ``pack_axis`` instead: same codes, scales and values.

    Lossless (the codes are unpacked and packed again), for moving stored
    weights to another layout: e.g. a checkpoint written before
    ``flax_integration`` packed dense, einsum and conv weights along their
    contraction axis (restore it without a target, repack, then use it), or
    the layout a GPU kernel reads.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> q = qarray.quantize(jnp.arange(12.).reshape(4, 3), 'int4')   # packed along the last axis
      >>> r = qarray.repack(q, 0)
      >>> r.packed_axis, r.qvalue.shape, bool((qarray.dequantize(r) == qarray.dequantize(q)).all())
      (-2, (2, 3), True)
    """
    if not isinstance(q, QArray):
        raise TypeError(f"repack expects a QArray; got {type(q).__name__}.")
    q.check()
    if q.packed_axis is None:
        raise ValueError(f"repack: {q.qtype.name!r} codes are stored one per element (not bit-packed); there is "
                         "no packed axis to move.")
    axis = _layout.normalize_axis(pack_axis, q.ndim, 'pack_axis', f'a QArray of shape {q.shape}')
    if axis == q.packed_axis % q.ndim:
        return q
    like = jax.ShapeDtypeStruct(q.shape, q.dtype)
    return _pack(codes(q), q.scale, q.zero_point, q.qtype, like, axis, q.tile_sizes)


def unpacked_codes(qvalue: jax.Array, qt, packed_axis: int | None, packed_length: int | None) -> jax.Array:
    """Codes in logical shape from stored values (bit-packed or not); ``qt`` a QType."""
    if packed_axis is None:
        return qvalue
    return _unpack_codes_jit(qvalue, qt, packed_axis % qvalue.ndim, packed_length)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _unpack_codes_jit(qvalue: jax.Array, qt, axis: int, length: int) -> jax.Array:
    if 8 % qt.bits == 0:  # 1, 2, 4 bits: one broadcast shift per byte; signed ints sign-extend in it
        signed = qt.kind == 'int' and qt.bits > 1
        v = packing.split_bytes(qvalue, qt.bits, length, axis, signed=signed)
        return v if signed else qt.from_field(v)
    return qt.from_field(packing.unpack(qvalue, qt.bits, length, axis=axis))


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
    q.check()
    dtype = q.dtype if dtype is None else jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype: a QArray dequantizes to a floating dtype (float32, bfloat16, float16, float64); "
                        f"got {dtype}. Cast the result yourself if you need integers (codes: qarray.codes(q)).")
    return _dequantize_jit(q, dtype)


@functools.partial(jax.jit, static_argnums=(1,))
def _dequantize_jit(q: QArray, dtype) -> jax.Array:
    return values_from_codes(codes(q), q.scale, q.zero_point, q.qtype, dtype, q.uneven_tiles)


def values_from_codes(codes_: jax.Array, scale: Any, zero_point: jax.Array | None, qt, dtype,
                      uneven: dict[int, int] | None = None) -> jax.Array:
    """Codes in logical shape -> values, scales (a QArray for quantized scales) broadcast over their tiles
    (``uneven``: ``{axis: tile}`` of tiles with a partial last tile)."""
    if isinstance(scale, QArray):  # quantized scales (double quantization, nvfp4, GGUF K-quants)
        scale = dequantize(scale, _numerics.compute_dtype(dtype))
    if isinstance(zero_point, QArray):  # a quantized offset in value space (GGUF K-quants' mins)
        zero_point = dequantize(zero_point, _numerics.compute_dtype(dtype))
    if uneven:
        full = lambda a: _layout.broadcast_scale(a, codes_.shape, uneven)
        return _numerics.from_codes(codes_, full(scale), None if zero_point is None else full(zero_point), qt, dtype)
    vshape, sshape = _layout.tiled_view(codes_.shape, scale.shape)
    zp = None if zero_point is None else zero_point.reshape(sshape)
    # split / merge axes one at a time: an Explicit-mesh array sharded on two axes cannot reshape in one step
    values = _numerics.from_codes(_layout.split_axes(codes_, vshape), scale.reshape(sshape), zp, qt, dtype)
    return _layout.merge_axes(values, codes_.shape)
