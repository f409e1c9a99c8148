"""Scalar numerics shared by quantize, fake_quant and calibration search.

A calibrated range ``(lo, hi)`` becomes a ``scale`` (and, for asymmetric
ranges and unsigned formats, an integer ``zero_point``); values become codes
by rounding half to even and clipping explicitly to the format's range.

Example:
  >>> import jax.numpy as jnp
  >>> from qarray import qtypes
  >>> s, zp = scale_and_zero_point(jnp.array(-2.), jnp.array(2.), True, qtypes.get('int8'))
  >>> float(s) == 2 / 127, zp is None
  (True, True)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qarray.qtypes import QType

__all__ = ['scale_and_zero_point', 'to_codes', 'from_codes', 'code_range']


def code_range(qtype: QType, has_zero_point: bool) -> tuple[float, float]:
    """The (lowest, highest) code used for this format and range kind.

    Example:
      >>> from qarray import qtypes
      >>> code_range(qtypes.get('int4'), has_zero_point=False)
      (-7, 7)
    """
    if has_zero_point:
        return qtype.asym_range
    return qtype.qmin, qtype.qmax


def uses_zero_point(qtype: QType, symmetric: bool) -> bool:
    """Unsigned formats always carry a zero point; others only for asymmetric ranges.

    Example:
      >>> from qarray import qtypes
      >>> uses_zero_point(qtypes.get('uint4'), symmetric=True)
      True
    """
    return qtype.kind == 'uint' or not symmetric


def scale_and_zero_point(lo: jnp.ndarray, hi: jnp.ndarray, symmetric: bool, qtype: QType,
                         scale_dtype=jnp.float32) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """Scale (and zero point or None) that map ``[lo, hi]`` onto the format's codes.

    The scale is always finite and positive for finite input (an all-zero
    group gets the smallest normal scale, so it dequantizes to exact zeros);
    a group whose range is NaN or infinite gets a NaN scale, so its values
    dequantize to NaN instead of silently wrong finite numbers.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import qtypes
      >>> s, zp = scale_and_zero_point(jnp.array(0.), jnp.array(255.), False, qtypes.get('uint8'))
      >>> float(s), int(zp)
      (1.0, 0)
    """
    lo = jnp.asarray(lo, jnp.float32)
    hi = jnp.asarray(hi, jnp.float32)
    if uses_zero_point(qtype, symmetric):
        if symmetric:
            lo = -hi
        qa, qb = code_range(qtype, True)
        lo0, hi0 = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)  # zero must be a level
        raw = (hi0 - lo0) / (qb - qa)
        scale = _finite_positive(raw, scale_dtype)
        s32 = scale.astype(jnp.float32)
        zp = jnp.clip(jnp.round(qa - lo0 / s32), qa, qb)
        zp = jnp.where(jnp.isfinite(zp), zp, 0).astype(qtype.code_dtype)
        return scale, zp
    raw = jnp.abs(hi) / float(qtype.qmax)
    scale = _finite_positive(raw, scale_dtype)
    # A scale rounded down by a narrow scale dtype would clip the range's top; bump it one ulp.
    low = scale.astype(jnp.float32) < raw
    scale = jnp.where(low, jnp.nextafter(scale, jnp.asarray(jnp.inf, scale.dtype)), scale)
    return scale, None


def _finite_positive(raw: jnp.ndarray, scale_dtype) -> jnp.ndarray:
    tiny = np.finfo(np.dtype(scale_dtype)).tiny if np.dtype(scale_dtype) != np.dtype('bfloat16') \
        else float(jnp.finfo(jnp.bfloat16).tiny)
    scale = raw.astype(scale_dtype)
    scale = jnp.where(scale > 0, scale, jnp.asarray(tiny, scale_dtype))
    return jnp.where(jnp.isfinite(raw), scale, jnp.asarray(jnp.nan, scale_dtype))


def to_codes(x: jnp.ndarray, scale: jnp.ndarray, zero_point: jnp.ndarray | None,
             qtype: QType) -> jnp.ndarray:
    """Round (half to even) and clip ``x / scale`` to codes in ``qtype.code_dtype``.

    ``scale``/``zero_point`` must broadcast against ``x``. For nf4 the code is
    the index of the nearest code-book level.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import qtypes
      >>> to_codes(jnp.array([0.5, 1.5, 300.]), jnp.array(1.), None, qtypes.get('int8')).tolist()
      [0, 2, 127]
    """
    y = x.astype(jnp.float32) / scale.astype(jnp.float32)
    if qtype.kind == 'float':
        m = qtype.qmax
        return jnp.clip(y, -m, m).astype(qtype.native_dtype)
    if qtype.kind == 'codebook':
        cb = qtype.codebook
        mids = (cb[1:] + cb[:-1]) / 2  # nearest level = number of midpoints below y
        y = jnp.clip(y, -1.0, 1.0)
        idx = sum((y > float(m)).astype(jnp.uint8) for m in mids)
        return jnp.asarray(idx, jnp.uint8)
    if qtype.kind == 'int' and qtype.bits == 1:
        return jnp.where(y >= 0, 1, -1).astype(jnp.int8)  # binary {-1, +1}; 0 goes to +1
    qa, qb = code_range(qtype, zero_point is not None)
    q = jnp.round(y)
    if zero_point is not None:
        q = q + zero_point.astype(jnp.float32)
    q = jnp.clip(q, qa, qb)
    q = jnp.where(jnp.isnan(q), 0.0, q)  # NaN groups carry a NaN scale instead
    return q.astype(qtype.code_dtype)


def from_codes(codes: jnp.ndarray, scale: jnp.ndarray, zero_point: jnp.ndarray | None,
               qtype: QType, dtype=jnp.float32) -> jnp.ndarray:
    """Dequantize codes: ``(codes - zero_point) * scale`` or ``codebook[codes] * scale``.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import qtypes
      >>> from_codes(jnp.array([3], jnp.int8), jnp.array(0.5), None, qtypes.get('int8')).tolist()
      [1.5]
    """
    if qtype.kind == 'codebook':
        v = jnp.asarray(qtype.codebook)[codes.astype(jnp.int32)]
    else:
        v = codes.astype(jnp.float32)
        if zero_point is not None:
            v = v - zero_point.astype(jnp.float32)
    return (v * scale.astype(jnp.float32)).astype(dtype)
