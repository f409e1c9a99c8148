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

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from qarray import _layout, _numerics, packing, qtypes
from qarray import calibration as _calibration
from qarray._array import QArray

__all__ = ['quantize', 'quantize_with_scale', 'dequantize', 'codes', 'unpacked_codes', 'values_from_codes',
           'check_when_known',
           'check_input', 'resolve_args', 'quantize_codes', 'codes_with_scale']


def quantize_codes(x, qt, cw, tile_map, calibration, scale_dtype, with_overflow: bool = False):
    """Codes (logical shape), scale and zero point (rank of x); with ``with_overflow`` also a scalar bool:
    whether some finite group needs a scale beyond ``scale_dtype``'s largest value."""
    view, reduce_axes, scale_shape = _layout.group_view(x.shape, cw, tile_map)
    if x.size == 0:  # nothing to calibrate: unit scales, no codes
        out = _empty_codes(x, qt, calibration, scale_shape, scale_dtype)
        return out + (jnp.zeros((), bool),) if with_overflow else out
    xv = x.reshape(view).astype(_numerics.compute_dtype(x.dtype))
    rng = _calibration.calibrate(calibration, xv, tuple(reduce_axes), qt)
    scale, zp = _numerics.scale_and_zero_point(rng.lo, rng.hi, rng.symmetric, qt, scale_dtype)
    scale = jnp.broadcast_to(scale, [1 if i in reduce_axes else d for i, d in enumerate(view)])
    if zp is not None:
        zp = jnp.broadcast_to(zp, scale.shape)
    q = _numerics.to_codes(xv, scale, zp, qt, calibrated=True)
    out = (q.reshape(x.shape), scale.reshape(scale_shape), None if zp is None else zp.reshape(scale_shape))
    if with_overflow:
        out = out + (jnp.any(_numerics.scale_overflows(rng.lo, rng.hi, rng.symmetric, qt, scale_dtype)),)
    return out


def _empty_codes(x, qt, calibration, scale_shape, scale_dtype):
    symmetric = _calibration.calibrate(calibration, jnp.array([-1.0, 1.0]), (0,), qt).symmetric
    zp = jnp.zeros(scale_shape, qt.code_dtype) if _numerics.uses_zero_point(qt, symmetric) else None
    return jnp.zeros(x.shape, qt.code_dtype), jnp.ones(scale_shape, scale_dtype), zp


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
    qt, cw, tile_map, scale_dtype = resolve_args(x, qtype, channelwise_axes, tiles, calibration, scale_dtype)
    if qt.packed:
        _check_pack_axis(x, qt, pack_axis)
    q, overflow = _quantize_jit(x, qt, cw, tuple(sorted(tile_map.items())), calibration, scale_dtype, pack_axis)
    if not isinstance(overflow, jax.core.Tracer) and bool(overflow):
        raise ValueError(
            f"x's range needs a scale larger than {scale_dtype.name} can hold (max {jnp.finfo(scale_dtype).max:.4g}) "
            f"for qtype {qt.name!r} with calibration {calibration!r}: the scale would saturate and values clip. "
            f"Use a wider scale_dtype (float32) or scale x down first (e.g. by a power of two) and the QArray's "
            f"scale back up. (Under jit no error is possible: such groups saturate, or get a NaN scale.)")
    return q


def resolve_args(x, qtype, channelwise_axes, tiles, calibration, scale_dtype):
    """Validate everything static up front, so errors name the argument before any tracing."""
    qt = qtypes.get(qtype)
    cw, tile_map = _layout.normalize_layout(x.shape, channelwise_axes, tiles)
    _calibration.parse(calibration)
    scale_dtype = jnp.dtype(scale_dtype or x.dtype)
    if not jnp.issubdtype(scale_dtype, jnp.floating):
        raise TypeError(f"scale_dtype must be a floating dtype (float32, bfloat16, float16); got {scale_dtype}.")
    return qt, cw, tile_map, scale_dtype


# One compiled program per (format, layout, shape): eager calls run as fast as jitted ones
# and an outer jit simply inlines it.
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _quantize_jit(x, qt, cw, tile_items, calibration, scale_dtype, pack_axis) -> tuple[QArray, jax.Array]:
    codes_, scale, zp, overflow = quantize_codes(x, qt, cw, dict(tile_items), calibration, scale_dtype,
                                                 with_overflow=True)
    return _pack(codes_, scale, zp, qt, x, pack_axis), overflow


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
    scale = jnp.asarray(scale)
    if not jnp.issubdtype(scale.dtype, jnp.floating):
        raise TypeError(f"scale must be a floating-point array; got dtype {scale.dtype}.")
    if scale.ndim != x.ndim or any(s == 0 or n % s for n, s in zip(x.shape, scale.shape) if n):
        raise ValueError(f"scale of shape {scale.shape} does not fit x of shape {x.shape}: it needs the rank "
                         "of x with every axis 1, the full size, or a divisor of it.")
    if _concrete(scale) and not bool(jnp.all(jnp.isfinite(scale) & (scale > 0))):
        raise ValueError("scale must be positive and finite everywhere (a zero, negative, NaN or Inf scale has "
                         "no codes); got min %s." % float(jnp.min(scale)))
    if qt.kind == 'uint' and zero_point is None:
        raise ValueError(f"qtype {qt.name!r} is unsigned and needs a zero_point.")
    if zero_point is not None:
        qa, qb = qt.asym_range  # raises for formats without a zero point
        zero_point = jnp.asarray(zero_point)
        if _concrete(zero_point):
            z = jnp.asarray(zero_point, jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
            if not bool(jnp.all((z == jnp.round(z)) & (z >= qa) & (z <= qb))):
                raise ValueError(f"zero_point must hold integer codes of {qt.name!r} in [{qa}, {qb}]; got values in "
                                 f"[{float(jnp.min(z))}, {float(jnp.max(z))}].")
        zero_point = jnp.broadcast_to(zero_point, scale.shape).astype(qt.code_dtype)
    vshape, sshape = _layout.tiled_view(x.shape, scale.shape)
    zpv = None if zero_point is None else zero_point.reshape(sshape)
    c = _numerics.to_codes(x.reshape(vshape), scale.reshape(sshape), zpv, qt).reshape(x.shape)
    return c, scale, zero_point


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_pack_axis(x, qt, pack_axis) -> None:
    if x.ndim == 0:
        raise ValueError(f"qtype {qt.name!r} is bit-packed and needs an array with at least one axis.")
    _layout.normalize_axis(pack_axis, x.ndim, 'pack_axis')


def _pack(codes_, scale, zp, qt, x, pack_axis) -> QArray:
    if not qt.packed:
        return QArray(codes_, scale, zp, qtype=qt, dtype=x.dtype)
    _check_pack_axis(x, qt, pack_axis)
    pa = pack_axis % x.ndim
    qvalue = packing.pack(qt.to_field(codes_), qt.bits, axis=pa)
    return QArray(qvalue, scale, zp, qtype=qt, dtype=x.dtype, packed_axis=pa - x.ndim, packed_length=x.shape[pa])


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
    return values_from_codes(codes(q), q.scale, q.zero_point, q.qtype, dtype)


def values_from_codes(codes_: jax.Array, scale: jax.Array, zero_point: jax.Array | None, qt, dtype) -> jax.Array:
    """Codes in logical shape -> values, scales broadcast over their tiles."""
    vshape, sshape = _layout.tiled_view(codes_.shape, scale.shape)
    zp = None if zero_point is None else zero_point.reshape(sshape)
    values = _numerics.from_codes(codes_.reshape(vshape), scale.reshape(sshape), zp, qt, dtype)
    return values.reshape(codes_.shape)
