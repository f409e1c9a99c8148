"""Scalar numerics shared by quantize, fake_quant and calibration search.

A calibrated range ``(lo, hi)`` becomes a ``scale`` (and, for asymmetric
ranges and unsigned formats, an integer ``zero_point``); values become codes
by rounding half to even and clipping explicitly to the format's range.

Example:
  >>> import jax.numpy as jnp, numpy as np
  >>> from qarray import qtypes
  >>> from qarray._numerics import scale_and_zero_point
  >>> s, zp = scale_and_zero_point(jnp.array(-2.), jnp.array(2.), True, qtypes.get('int8'))
  >>> bool(float(s) == np.float32(2 / 127.5)), zp is None
  (True, True)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import ml_dtypes
import numpy as np

from qarray.qtypes import QType

__all__ = ['scale_and_zero_point', 'zero_point_for', 'scale_overflows', 'to_codes', 'from_codes', 'unscaled_values', 'code_range',
           'compute_dtype']


def code_range(qtype: QType, has_zero_point: bool) -> tuple[float, float]:
    """The (lowest, highest) code used for this format and range kind.

    Example:
      >>> from qarray import qtypes
      >>> from qarray._numerics import code_range
      >>> code_range(qtypes.get('int4'), has_zero_point=False), code_range(qtypes.get('int4_narrow'), False)
      ((-8, 7), (-7, 7))
    """
    if has_zero_point:
        return qtype.asym_range
    return qtype.qmin, qtype.qmax


def compute_dtype(dtype) -> np.dtype:
    """The dtype quantization arithmetic runs in: float64 for float64 data (under ``jax_enable_x64``), else float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray._numerics import compute_dtype
      >>> compute_dtype(jnp.bfloat16)
      dtype('float32')
    """
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def uses_zero_point(qtype: QType, symmetric: bool) -> bool:
    """Unsigned formats always carry a zero point; others only for asymmetric ranges.

    Example:
      >>> from qarray import qtypes
      >>> from qarray._numerics import uses_zero_point
      >>> uses_zero_point(qtypes.get('uint4'), symmetric=True)
      True
    """
    return qtype.kind == 'uint' or not symmetric


def scale_and_zero_point(lo: jnp.ndarray, hi: jnp.ndarray, symmetric: bool, qtype: QType,
                         scale_dtype=jnp.float32) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """Scale (and zero point or None) that map ``[lo, hi]`` onto the format's codes.

    Symmetric: ``scale = |hi| * float32(1 / qtype.calibration_bound)`` (absmax
    lands on the outer edge of the top code's rounding cell). Asymmetric (and
    every uintB): ``scale = (hi - lo) * float32(1 / (qb - qa))`` over the range
    widened to contain 0 (where ``hi - lo`` overflows, ``(hi/2 - lo/2) *
    float32(2 / (qb - qa))``), and an integer zero point so that 0 is a level.
    (Multiplies, not divisions: XLA rewrites a division by a constant into one,
    so spelling it out keeps eager, jit and numpy equal; and no product feeds a
    subtraction, so LLVM cannot contract it into an FMA in one fusion and not
    in another.)

    The asymmetric scale and zero point (about ten ops per group) come out of
    a reduce (an exact ``v + 0``), which XLA:CPU never fuses into a consumer:
    they are computed once per group and stored, instead of being recomputed
    for every element of the codes pass or of a dequantize fused with it (so
    ``fake_quant``, eager and jitted ``dequantize(quantize(x))`` see the same
    bits). The symmetric scale (three ops) is left to fuse.

    The scale is always finite, positive and normal in ``scale_dtype`` for
    finite input: an all-zero (or subnormal) group gets the smallest normal
    scale, so it dequantizes to exact zeros; a range beyond what
    ``scale_dtype`` holds saturates at its largest finite value. A scale that
    rounds down in a narrow ``scale_dtype`` is bumped one ulp up, so the range
    is never clipped by the rounding. A group whose range is NaN or infinite
    gets a NaN scale, so its values dequantize to NaN instead of silently
    wrong finite numbers.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import qtypes
      >>> from qarray._numerics import scale_and_zero_point
      >>> s, zp = scale_and_zero_point(jnp.array(0.), jnp.array(255.), False, qtypes.get('uint8'))
      >>> float(s), int(zp)
      (1.0, 0)
    """
    return _scale_and_zero_point(lo, hi, bool(symmetric), qtype, jnp.dtype(scale_dtype))


# One program per layout for eager callers (a calibration loop, a Flax init), not one per op; inlined under jit.
@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _scale_and_zero_point(lo, hi, symmetric, qtype, scale_dtype):
    raw, zero_level = _raw_scale(lo, hi, symmetric, qtype, scale_dtype)
    scale = _finite_positive(raw, scale_dtype)
    if zero_level is None:
        return scale, None
    scale = _materialize(scale)
    return scale, _materialize(_zero_point(zero_level, scale.astype(raw.dtype), qtype))


def _materialize(v: jnp.ndarray) -> jnp.ndarray:
    """Exactly ``v`` (``v + 0``: NaN stays NaN; scales are never -0), but the result of a reduce, which XLA
    stores instead of fusing the computation of ``v`` into every element of a consumer.
    (``lax.optimization_barrier`` does not do it on CPU: it is removed before fusion.)"""
    return jnp.sum(jnp.stack([v, jnp.zeros_like(v)]), axis=0, dtype=v.dtype)


def _zero_point(zero_level, scale, qtype: QType) -> jnp.ndarray:
    qa, qb = code_range(qtype, True)
    zp = jnp.clip(jnp.round(qa - zero_level / scale), qa, qb)
    return jnp.where(jnp.isfinite(zp), zp, 0).astype(qtype.code_dtype)


def zero_point_for(lo, hi, symmetric: bool, qtype: QType, scale: jnp.ndarray) -> jnp.ndarray | None:
    """The integer zero point of range ``[lo, hi]`` for a given (e.g. stored, double-quantized) scale.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import qtypes
      >>> from qarray._numerics import zero_point_for
      >>> int(zero_point_for(jnp.array(-1.), jnp.array(3.), False, qtypes.get('uint8'), jnp.array(4 / 255)))
      64
    """
    ct = compute_dtype(jnp.result_type(lo, hi, scale))
    _, zero_level = _raw_scale(lo, hi, symmetric, qtype, ct)
    return None if zero_level is None else _zero_point(zero_level, jnp.asarray(scale).astype(ct), qtype)


def _raw_scale(lo, hi, symmetric: bool, qtype: QType, scale_dtype):
    """The exact scale a range needs (in the compute dtype), and the range's low end widened to 0 (None
    when there is no zero point)."""
    ct = compute_dtype(jnp.result_type(lo, hi, scale_dtype))
    lo = jnp.asarray(lo).astype(ct)
    hi = jnp.asarray(hi).astype(ct)
    if uses_zero_point(qtype, symmetric):
        if symmetric:
            lo = -jnp.abs(hi)
            hi = jnp.abs(hi)
        qa, qb = code_range(qtype, True)
        lo0, hi0 = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)  # zero must be a level
        inv_n = ct.type(1.0 / (qb - qa))  # a multiply, as XLA would rewrite the division anyway
        # FMA-proof: no product may feed the subtraction, or XLA:CPU's LLVM contracts ``a*c - b*c`` into an
        # FMA in some fusions and not in others (eager, jitted and fake_quant scales then differ by an ulp).
        # Where ``hi0 - lo0`` overflows, both ends are huge and their halves exact: products that round nothing.
        width = hi0 - lo0
        halves = (hi0 * ct.type(0.5) - lo0 * ct.type(0.5)) * ct.type(2.0 / (qb - qa))
        return jnp.where(jnp.isfinite(width), width * inv_n, halves), lo0
    return jnp.abs(hi) * ct.type(1.0 / qtype.calibration_bound), None


def scale_overflows(lo: jnp.ndarray, hi: jnp.ndarray, symmetric: bool, qtype: QType, scale_dtype) -> jnp.ndarray:
    """True where a *finite* range needs a scale beyond the largest finite ``scale_dtype`` value.

    Such a group would get a saturated scale (its values clip) or, when even
    the compute dtype overflows (e.g. ``hi - lo`` past float32's max for
    ``uint1``), a NaN scale. :func:`qarray.quantize` raises for it eagerly.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import qtypes
      >>> from qarray._numerics import scale_overflows
      >>> bool(scale_overflows(jnp.array(-1e38), jnp.array(1e38), True, qtypes.get('int8'), jnp.float16))
      True
    """
    raw, _ = _raw_scale(lo, hi, symmetric, qtype, scale_dtype)
    finite = jnp.isfinite(jnp.asarray(lo)) & jnp.isfinite(jnp.asarray(hi))
    return finite & ~(raw <= float(jnp.finfo(scale_dtype).max))


def _finite_positive(raw: jnp.ndarray, scale_dtype) -> jnp.ndarray:
    """``raw`` (compute dtype) in ``scale_dtype``: never rounded down, within [tiny, max]; NaN if raw is not finite.

    Kept to a few ops: XLA:CPU fuses a symmetric scale's per-group computation
    into the per-element loop of whatever consumes the scale and recomputes it
    there (asymmetric ones are stored once, see :func:`scale_and_zero_point`).
    """
    info = jnp.finfo(scale_dtype)
    if jnp.dtype(scale_dtype) == raw.dtype:
        scale = jnp.maximum(raw, float(info.tiny))  # a finite raw is already <= max
    else:
        tiny, big = jnp.asarray(info.tiny, scale_dtype), jnp.asarray(info.max, scale_dtype)
        scale = jnp.clip(raw, float(info.tiny), float(info.max)).astype(scale_dtype)
        # Rounding to a narrow dtype may land below raw, which would clip the range's top: bump one ulp.
        scale = jnp.where(scale.astype(raw.dtype) < raw, jnp.nextafter(scale, big), scale)
        scale = jnp.clip(scale, tiny, big)
    return jnp.where(jnp.isfinite(raw), scale, jnp.asarray(jnp.nan, scale_dtype))


def to_codes(x: jnp.ndarray, scale: jnp.ndarray, zero_point: jnp.ndarray | None,
             qtype: QType, *, calibrated: bool = False, noise: jnp.ndarray | None = None) -> jnp.ndarray:
    """Round (half to even) and clip ``x / scale`` to codes in ``qtype.code_dtype``.

    ``scale``/``zero_point`` must broadcast against ``x``. ``x / scale`` is
    computed in float32 as ``x * (1 / scale)`` with the reciprocal taken once
    per group (XLA rewrites the division that way under ``jit`` anyway; doing
    it explicitly keeps eager and jitted codes identical). For nf4 the code is
    the index of the nearest code-book level. ``calibrated=True`` promises the
    scale came from :func:`scale_and_zero_point` (so it is bounded by the
    format), which lets wide formats skip the guard for near-overflow scales.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import qtypes
      >>> from qarray._numerics import to_codes
      >>> to_codes(jnp.array([0.5, 1.5, 300.]), jnp.array(1.), None, qtypes.get('int8')).tolist()
      [0, 2, 127]
    """
    huge = not calibrated or _may_exceed_2_126(qtype, zero_point is not None)
    y = _divide_by_scale(x, scale, huge)
    if noise is not None:
        return _stochastic_codes(y, zero_point, qtype, noise)
    if qtype.kind == 'float':
        m = qtype.qmax
        return jnp.clip(y, -m, m).astype(qtype.native_dtype)
    if qtype.kind == 'codebook':
        cb = qtype.codebook
        mids = (cb[1:] + cb[:-1]) / 2  # nearest level = number of midpoints below y
        if len(cb) <= 16:  # a handful of compares vectorises best
            idx = sum((y > float(m)).astype(jnp.uint8) for m in mids)
        elif y.dtype == np.float32:  # 256 levels: a table over the float32 bit patterns, then K compares
            idx = _nearest_level_float32(y, mids)
        else:  # binary search over the midpoints
            idx = jnp.searchsorted(jnp.asarray(mids, y.dtype), y, side='left')
        return jnp.asarray(idx, jnp.uint8)
    if qtype.kind == 'int' and qtype.bits == 1:
        return jnp.where(y >= 0, 1, -1).astype(jnp.int8)  # binary {-1, +1}; 0 goes to +1
    qa, qb = code_range(qtype, zero_point is not None)
    q = jnp.round(y)
    if zero_point is not None:
        q = q + zero_point.astype(y.dtype)
    # A NaN group's codes are whatever the convert makes of NaN: its NaN scale decides the values.
    return jnp.clip(q, qa, qb).astype(qtype.code_dtype)


_BUCKET_BITS = 16  # buckets over the top 16 bits of a float32 (sign, exponent, 7 mantissa bits): 0.8 % wide


def _monotone_key(bits):
    """float32 bit patterns (uint32) -> uint32 keys in the order of the values (-0 just below +0)."""
    return np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000)) if isinstance(bits, np.ndarray) else \
        jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


@functools.lru_cache(maxsize=None)
def _bucket_table(mids_bytes: bytes) -> tuple[np.ndarray, np.ndarray, int]:
    """For sorted float32 midpoints: per bucket of float32 keys the number of midpoints below the bucket's lowest
    value (uint8), the midpoints padded with +inf, and K, the most midpoints any bucket holds."""
    mids = np.frombuffer(mids_bytes, np.float32)
    starts = np.arange(2**_BUCKET_BITS, dtype=np.uint32) << np.uint32(32 - _BUCKET_BITS)
    bits = np.where(starts >> 31 == 1, starts & np.uint32(0x7fffffff), ~starts)  # the inverse of _monotone_key
    lo = bits.view(np.float32)
    finite = ~np.isnan(lo)
    below = np.where(finite, np.searchsorted(mids, np.where(finite, lo, 0), side='left'), 0)
    nxt = np.append(below[1:], len(mids))
    k = int(np.max(np.where(finite, nxt - below, 0)))
    return below.astype(np.int32), np.append(mids, np.full(k, np.inf, np.float32)), k


def _nearest_level_float32(y: jnp.ndarray, mids: np.ndarray) -> jnp.ndarray:
    """``searchsorted(mids, y, side='left')`` for float32 ``y`` (the number of midpoints strictly below ``y``): a
    table lookup on ``y``'s top bits, then ``K`` compares (K = 1 for dynamic8/dynamic8u) -- gathers from a 256 KiB
    table and the midpoints instead of an 8-step binary search, about 20x faster on CPU. NaN gives 0."""
    below, padded, k = _bucket_table(np.asarray(mids, np.float32).tobytes())
    key = _monotone_key(lax.bitcast_convert_type(y, jnp.uint32))
    t = jnp.asarray(below)[(key >> (32 - _BUCKET_BITS)).astype(jnp.int32)]
    m = jnp.asarray(padded)
    return t + sum((y > m[t + j]).astype(jnp.int32) for j in range(k))


def _may_exceed_2_126(qtype: QType, has_zero_point: bool) -> bool:
    """Whether a calibrated scale can exceed 2**126, past which its float32 reciprocal is subnormal.

    Largest scales: ``float32_max / calibration_bound`` (symmetric) or
    ``2 * float32_max / (qb - qa)`` (with a zero point). True for narrow
    formats (int1..int3, nf4, uint1, uint2); int8, int4 and fp8 never get there.
    """
    fmax = float(np.finfo(np.float32).max)
    if has_zero_point:
        qa, qb = code_range(qtype, True)
        biggest = 2 * fmax / (qb - qa)
    else:
        biggest = fmax / qtype.calibration_bound
    return biggest * 1.01 > 2.0**126


def _divide_by_scale(x: jnp.ndarray, scale: jnp.ndarray, huge_scales: bool = True) -> jnp.ndarray:
    """``x / scale`` in the compute dtype (float32; float64 for float64 data) as ``x * (1 / scale)``,
    the reciprocal once per group.

    With ``huge_scales``, a scale above 2**100 (float64: 2**1000; only for
    data near the dtype's limit) would have a subnormal reciprocal, which XLA
    flushes to zero; both operands are then pre-scaled by 2**-64 (2**-512),
    which is exact. Formats whose scales cannot get there skip that multiply.
    """
    ct = compute_dtype(jnp.result_type(x, scale))
    s = scale.astype(ct)
    if not huge_scales and ct == np.float32:
        return x.astype(ct) * (1.0 / s)
    big, pre_by = (2.0**100, 2.0**-64) if ct == np.float32 else (2.0**1000, 2.0**-512)
    pre = jnp.where(s > big, ct.type(pre_by), ct.type(1.0))
    return (x.astype(ct) * pre) * (1.0 / (s * pre))


def from_codes(codes: jnp.ndarray, scale: jnp.ndarray, zero_point: jnp.ndarray | None,
               qtype: QType, dtype=jnp.float32) -> jnp.ndarray:
    """Dequantize codes: ``(codes - zero_point) * scale`` or ``codebook[codes] * scale``.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import qtypes
      >>> from qarray._numerics import from_codes
      >>> from_codes(jnp.array([3], jnp.int8), jnp.array(0.5), None, qtypes.get('int8')).tolist()
      [1.5]
    """
    ct = compute_dtype(dtype)
    if zero_point is not None and jnp.issubdtype(zero_point.dtype, jnp.floating):  # value space: c * s - zp
        v = unscaled_values(codes, None, qtype).astype(ct) * scale.astype(ct) - zero_point.astype(ct)
    else:
        v = unscaled_values(codes, zero_point, qtype).astype(ct) * scale.astype(ct)
    # A level just past the dtype's max (e.g. int8's code -128 for data at -float32 max, or any level in a
    # narrow dtype) must not become inf: it is within half a step of a finite value. NaN stays NaN.
    big = float(jnp.finfo(dtype).max)
    return jnp.clip(v, -big, big).astype(dtype)


def unscaled_values(codes: jnp.ndarray, zero_point: jnp.ndarray | None, qtype: QType) -> jnp.ndarray:
    """float32 ``codes - zero_point`` (integers, fp8) or the code-book level of each code (nf4).

    The code-book lookup is a select tree over the code's bits, not a gather:
    it vectorises on CPU and needs no sharding rule for the table, so it works
    on meshes with explicit axes.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import qtypes
      >>> from qarray._numerics import unscaled_values
      >>> unscaled_values(jnp.array([0, 15], jnp.uint8), None, qtypes.get('nf4')).tolist()
      [-1.0, 1.0]
    """
    if qtype.kind == 'codebook':
        return _codebook_lookup(codes, qtype.codebook)
    v = codes.astype(jnp.float32)
    if zero_point is not None:
        v = v - zero_point.astype(jnp.float32)
    return v


def _codebook_lookup(c: jnp.ndarray, codebook: np.ndarray) -> jnp.ndarray:
    if len(codebook) > 16:  # 256 levels: a gather (a select tree would be 255 selects per value)
        return jnp.asarray(codebook)[c.astype(jnp.int32)]
    levels = [jnp.float32(v) for v in codebook]
    c = c.astype(jnp.uint8)
    for i in range(int(np.log2(len(levels)))):
        bit = ((c >> i) & 1).astype(bool)
        levels = [jnp.where(bit, levels[2 * j + 1], levels[2 * j]) for j in range(len(levels) // 2)]
    return levels[0]


def _stochastic_codes(y: jnp.ndarray, zero_point, qtype: QType, noise: jnp.ndarray) -> jnp.ndarray:
    """Stochastic rounding of ``y`` (in code units) to the format's grid: up with probability equal to the
    distance from the level below, so E[value] = y inside the representable range. ``noise`` ~ U[0, 1)."""
    if qtype.kind == 'float':
        info = ml_dtypes.finfo(qtype.native_dtype)
        m = float(qtype.qmax)
        ay = jnp.minimum(jnp.abs(y), m)
        _, ex = jnp.frexp(ay)
        e = jnp.maximum(ex - 1, int(info.minexp))  # the binade (subnormals share the smallest normal's spacing)
        ulp = jnp.exp2((e - int(info.nmant)).astype(y.dtype))
        lo = jnp.floor(ay / ulp) * ulp
        r = jnp.minimum(lo + ulp * (noise < (ay - lo) / ulp), m)
        return (jnp.sign(y) * r).astype(qtype.native_dtype)
    if qtype.kind == 'codebook':
        levels = jnp.asarray(qtype.codebook, y.dtype)
        yc = jnp.clip(y, levels[0], levels[-1])
        i = jnp.clip(jnp.searchsorted(levels, yc, side='right') - 1, 0, len(qtype.codebook) - 2)
        lo, hi = levels[i], levels[i + 1]
        return (i + (noise < (yc - lo) / (hi - lo))).astype(jnp.uint8)
    if qtype.kind == 'int' and qtype.bits == 1:  # levels -1, +1
        return jnp.where(noise < (jnp.clip(y, -1, 1) + 1) / 2, 1, -1).astype(jnp.int8)
    qa, qb = code_range(qtype, zero_point is not None)
    q = jnp.floor(y + noise.astype(y.dtype))
    if zero_point is not None:
        q = q + zero_point.astype(y.dtype)
    return jnp.clip(q, qa, qb).astype(qtype.code_dtype)
