"""Independent numpy reference for the FP4/FP8 block formats and for NF4 double quantization.

Written from the published specifications (no library code is used or imitated), so that the library's
implementations can be tested against it:

* OCP Microscaling Formats (MX) v1.0, Sept 2023:
    - E8M0 scale: 8 exponent bits, bias 127, no sign, no mantissa; code c in 0..254 means 2**(c - 127)
      (so 0x00 = 2**-127 and 0xFE = 2**127), 0xFF = NaN; there is no zero and no infinity.
    - FP4 E2M1 element: bias 1, codes S.EE.M; subnormals 0 and 0.5; largest normal 6; no Inf, no NaN.
      emax_elem (the exponent of the largest normal) is 2.
    - Conversion (section 6.3; Algorithm 1 of Rouhani et al. 2023, arXiv:2310.10537)::

          shared_exp = floor(log2(max_i |V_i|)) - emax_elem
          X          = 2 ** shared_exp
          P_i        = quantize_to_element_format(V_i / X)    # round to nearest even, normal numbers clamped
                                                              # to the largest magnitude, sign kept

    - Special values: when X is NaN every element of the block is NaN whatever its code.
* OCP 8-bit Floating Point (OFP8) v1.0: E4M3 has bias 7, largest normal S.1111.110 = 448 (emax_elem 8),
  S.1111.111 = NaN, no infinity; subnormals are multiples of 2**-9.
* NVFP4 (NVIDIA): E2M1 elements, one E4M3 scale per 16 consecutive elements and one float32 scale per
  tensor: ``global = amax(|x|) / (6 * 448)`` (stored as float32), ``block = RNE_e4m3(block_amax / (6 * global))``,
  ``element = RNE_e2m1(x / (block * global))``; decoding multiplies the three back together.
* NF4 (QLoRA, Dettmers et al. 2023, appendix E) with absmax block scales, and bitsandbytes-style double
  quantization of those scales: subtract their mean, then quantize them in blocks of 256 to the signed 8-bit
  "dynamic" code (Dettmers 2015, arXiv:1511.04561) with one float32 absmax per block.

Decisions this reference makes where the specs leave room (documented so the library can match or differ
on purpose):

* Arithmetic is float64. For float32/bfloat16 inputs every division below is by a value with at most
  31 significant bits, so no float64 rounding can create or destroy a rounding tie: the results are the
  exactly rounded ones.
* An all-zero MX block has floor(log2(0)) = -inf; the shared exponent is clamped to E8M0's smallest, so
  the scale code is 0x00 (2**-127) and every element is +0 (codes 0).
* A block that contains NaN or +-Inf gets scale code 0xFF (NaN); its element codes are set to 0. Decoding
  such a block gives NaN everywhere (0 * NaN = NaN).
* A shared exponent above 127 (only possible for float64 inputs beyond float32's range) also gives scale
  NaN, as in the MX authors' reference implementation (microsoft/microxcaling); below -127 it is clamped to
  -127 (values then flush towards zero).
* Element codes keep the sign of zero (-0.1 in E2M1 rounds to -0, code 0x8), as ml_dtypes does.
* NVFP4: a block whose E4M3 scale rounds to 0 has all element codes 0 (decodes to zero); a tensor whose
  finite values are all zero gets global scale 1.0. The global amax ignores non-finite values; a block
  containing NaN/Inf gets E4M3 scale code 0x7F (NaN) and element codes 0.
"""

from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------------------------------------------
# Element formats
# ----------------------------------------------------------------------------------------------------

E2M1_MAX = 6.0
E2M1_EMAX = 2
E4M3_MAX = 448.0
E4M3_EMAX = 8
E8M0_BIAS = 127
E8M0_NAN = 0xFF
E4M3_NAN = 0x7F

# mbits: stored mantissa bits; emin: exponent of the smallest normal (subnormal quantum is 2**(emin-mbits)).
_FORMATS = {
    'e2m1': dict(ebits=2, mbits=1, bias=1, emin=0, emax=E2M1_EMAX, max=E2M1_MAX, bits=4),
    'e4m3': dict(ebits=4, mbits=3, bias=7, emin=-6, emax=E4M3_EMAX, max=E4M3_MAX, bits=8),
}


def _decode_sem(code: int, ebits: int, mbits: int, bias: int) -> float:
    """Value of a sign/exponent/mantissa code with IEEE-style subnormals (no special values)."""
    sign = -1.0 if (code >> (ebits + mbits)) & 1 else 1.0
    e = (code >> mbits) & ((1 << ebits) - 1)
    m = code & ((1 << mbits) - 1)
    if e == 0:
        return sign * 2.0 ** (1 - bias) * (m / 2**mbits)
    return sign * 2.0 ** (e - bias) * (1 + m / 2**mbits)


def e2m1_values() -> np.ndarray:
    """All 16 FP4 E2M1 code values in code order (0x0..0xF), float64. Codes 0x0 and 0x8 are +0 and -0."""
    f = _FORMATS['e2m1']
    return np.array([_decode_sem(c, f['ebits'], f['mbits'], f['bias']) for c in range(16)])


def e4m3_values() -> np.ndarray:
    """All 256 FP8 E4M3 (OCP, 'fn') code values in code order, float64; 0x7F and 0xFF are NaN."""
    f = _FORMATS['e4m3']
    v = np.array([_decode_sem(c, f['ebits'], f['mbits'], f['bias']) for c in range(256)])
    v[[0x7F, 0xFF]] = np.nan
    return v


def _round_to_grid(x, mbits: int, emin: int, maxval: float) -> np.ndarray:
    """Round to nearest, ties to even, onto a binary float grid; |result| saturates at maxval.

    Inf saturates too (to +-maxval); NaN stays NaN. The result is float64. With maxval=inf the grid is
    unbounded above (used to ask whether rounding would overflow).
    """
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    with np.errstate(invalid='ignore', over='ignore'):
        _, e = np.frexp(a)  # a = f * 2**e with f in [0.5, 1)  =>  floor(log2 a) = e - 1
        e = np.maximum(e.astype(np.int64) - 1, emin)
        quantum = np.ldexp(1.0, e - mbits)
        r = np.round(a / quantum) * quantum  # np.round rounds half to even; a / quantum is exact
        r = np.where(r > maxval, maxval, r)
    r = np.copysign(r, x)
    return np.where(np.isnan(x), np.nan, r)


def round_to_e2m1(x) -> np.ndarray:
    """RNE to FP4 E2M1 values, saturating at +-6 (Inf too); NaN stays NaN (E2M1 cannot encode it)."""
    f = _FORMATS['e2m1']
    return _round_to_grid(x, f['mbits'], f['emin'], f['max'])


def round_to_e4m3(x) -> np.ndarray:
    """RNE to FP8 E4M3 values, saturating at +-448 (Inf too); NaN stays NaN."""
    f = _FORMATS['e4m3']
    return _round_to_grid(x, f['mbits'], f['emin'], f['max'])


def _encode_exact(values, positive_table: np.ndarray, sign_bit: int, nan_code: int | None) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    mag = np.abs(v)
    idx = np.searchsorted(positive_table, np.where(np.isnan(mag), 0.0, mag))
    idx = np.minimum(idx, len(positive_table) - 1)
    ok = np.isnan(mag) | (positive_table[idx] == mag)
    if not np.all(ok):
        raise ValueError(f'values not representable: {v[~ok][:5]}')
    code = idx.astype(np.int64) | np.where(np.signbit(v), sign_bit, 0)
    if nan_code is not None:
        code = np.where(np.isnan(v), nan_code, code)
    elif np.any(np.isnan(v)):
        raise ValueError('NaN has no code in this format')
    return code.astype(np.uint8)


def e2m1_encode(values) -> np.ndarray:
    """4-bit codes (in uint8) of values that are exactly E2M1 values (e.g. from round_to_e2m1)."""
    return _encode_exact(values, e2m1_values()[:8], 0x8, None)


def e2m1_decode(codes) -> np.ndarray:
    return e2m1_values()[np.asarray(codes, dtype=np.int64) & 0xF]


def e4m3_encode(values) -> np.ndarray:
    """8-bit codes of values that are exactly E4M3 values; NaN -> 0x7F."""
    return _encode_exact(values, e4m3_values()[:0x7F], 0x80, E4M3_NAN)


def e4m3_decode(codes) -> np.ndarray:
    return e4m3_values()[np.asarray(codes, dtype=np.int64)]


def e8m0_decode(bits) -> np.ndarray:
    """E8M0 codes -> float64: 2**(bits - 127), 0xFF -> NaN."""
    b = np.asarray(bits, dtype=np.int64)
    return np.where(b == E8M0_NAN, np.nan, np.ldexp(1.0, b - E8M0_BIAS))


def e8m0_encode_exponent(exponent) -> np.ndarray:
    """Unbiased exponent in [-127, 127] -> E8M0 code."""
    e = np.asarray(exponent, dtype=np.int64)
    if np.any((e < -E8M0_BIAS) | (e > E8M0_BIAS)):
        raise ValueError('E8M0 exponent out of range [-127, 127]')
    return (e + E8M0_BIAS).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------


def _to_blocks(x: np.ndarray, block: int, axis: int) -> np.ndarray:
    """Move `axis` last and split it into (n // block, block)."""
    xm = np.moveaxis(x, axis, -1)
    n = xm.shape[-1]
    if n % block:
        raise ValueError(f'axis length {n} is not a multiple of block {block}')
    return xm.reshape(*xm.shape[:-1], n // block, block)


def _from_blocks(xb: np.ndarray, axis: int) -> np.ndarray:
    xm = xb.reshape(*xb.shape[:-2], xb.shape[-2] * xb.shape[-1])
    return np.moveaxis(xm, -1, axis)


def _floor_log2(a: np.ndarray) -> np.ndarray:
    """Exact floor(log2(a)) for finite a > 0 (int64); a == 0 -> a very negative sentinel."""
    _, e = np.frexp(a)
    return np.where(a > 0, e.astype(np.int64) - 1, np.int64(-(1 << 40)))


def _ceil_log2_ratio(a: np.ndarray, m: float) -> np.ndarray:
    """Exact smallest k with a <= m * 2**k, for finite a > 0 (a == 0 -> sentinel)."""
    with np.errstate(divide='ignore', invalid='ignore'):
        k = _floor_log2(a / m)
    k = np.where(np.ldexp(m, np.clip(k, -2000, 2000)) >= a, k, k + 1)
    k = np.where(np.ldexp(m, np.clip(k - 1, -2000, 2000)) >= a, k - 1, k)
    return np.where(a > 0, k, np.int64(-(1 << 40)))


MX_EXPONENT_MODES = ('spec', 'best', 'ceil', 'rne')


def mx_shared_exponent(amax, elem: str = 'e2m1', exponent: str = 'spec') -> np.ndarray:
    """Unclamped shared exponent of blocks with the given finite absolute maxima.

    'spec': floor(log2(amax)) - emax_elem (OCP MX v1.0).
    'ceil': ceil(log2(amax / max_elem)), the smallest power of two with no clipping at all (the "round up"
            scale that cuBLAS/cuDNN and jax.nn.scaled_dot_general's own mxfp8 quantizer use).
    'rne':  spec + 1 when RNE(amax / 2**spec) on the element grid extended upwards would exceed max_elem
            (i.e. amax / 2**spec >= 7 for e2m1, > 464 for e4m3), else spec: the block max is never
            saturated beyond ordinary rounding. Qwix HEAD's mxfp4/mxfp8 scales are this rule up to a
            bfloat16 rounding of its threshold.
    """
    f = _FORMATS[elem]
    a = np.asarray(amax, dtype=np.float64)
    if exponent in ('spec', 'rne'):
        e = _floor_log2(a) - f['emax']
        if exponent == 'rne':
            r = _round_to_grid(np.ldexp(a, -np.clip(e, -2000, 2000)), f['mbits'], f['emin'], np.inf)
            e = e + ((a > 0) & (r > f['max']))
        return e
    if exponent == 'ceil':
        return _ceil_log2_ratio(a, f['max'])
    raise ValueError(f'unknown exponent mode {exponent!r}')


def _round_elem(v: np.ndarray, elem: str) -> np.ndarray:
    return round_to_e2m1(v) if elem == 'e2m1' else round_to_e4m3(v)


def _encode_elem(v: np.ndarray, elem: str) -> np.ndarray:
    return e2m1_encode(v) if elem == 'e2m1' else e4m3_encode(v)


def _decode_elem(c: np.ndarray, elem: str) -> np.ndarray:
    return e2m1_decode(c) if elem == 'e2m1' else e4m3_decode(c)


def mx_quantize(x, elem: str = 'e2m1', block: int = 32, axis: int = -1, exponent: str = 'spec',
                candidates=(0, 1)):
    """MX block quantization along `axis`.

    Args:
      x: array (any float dtype; computed in float64).
      elem: 'e2m1' (MXFP4) or 'e4m3' (MXFP8).
      block: elements per shared scale (32 in the MX spec).
      axis: the blocked axis; its length must be a multiple of `block`.
      exponent: 'spec' (OCP MX v1.0), 'ceil' or 'rne' (see mx_shared_exponent), or 'best': per block, of the
        exponents spec + c for c in `candidates`, the one with the least squared error (ties go to the
        earlier candidate, so to the spec exponent with the default (0, 1)).
      candidates: offsets from the spec exponent tried in 'best' mode.

    Returns:
      (codes, scale_bits): uint8 element codes (4-bit codes for e2m1, OCP E4M3 codes for e4m3) in x's
      shape, and uint8 E8M0 codes with x's shape except `axis`, which is divided by `block`.
    """
    if elem not in _FORMATS:
        raise ValueError(f'unknown element format {elem!r}')
    if exponent not in MX_EXPONENT_MODES:
        raise ValueError(f'unknown exponent mode {exponent!r}')
    x = np.asarray(x, dtype=np.float64)
    xb = _to_blocks(x, block, axis)  # (..., nb, block)
    finite = np.all(np.isfinite(xb), axis=-1)
    amax = np.where(finite, np.max(np.abs(np.where(np.isfinite(xb), xb, 0.0)), axis=-1), 0.0)

    def clamp(e):
        bad = e > E8M0_BIAS
        return np.clip(e, -E8M0_BIAS, E8M0_BIAS), bad

    def quant(e):
        vals = _round_elem(np.ldexp(xb, -e[..., None]), elem)
        return vals, np.ldexp(vals, e[..., None])

    if exponent == 'best':
        base = mx_shared_exponent(amax, elem, 'spec')
        best_e = best_err = None
        for c in candidates:
            e, _ = clamp(base + c)
            _, deq = quant(e)
            err = np.sum((deq - xb) ** 2, axis=-1)
            if best_e is None:
                best_e, best_err = e, err
            else:
                take = err < best_err
                best_e = np.where(take, e, best_e)
                best_err = np.where(take, err, best_err)
        e, overflow = clamp(best_e)
    else:
        e, overflow = clamp(mx_shared_exponent(amax, elem, exponent))
    nan_block = ~finite | overflow
    e = np.where(nan_block, 0, e)
    vals, _ = quant(e)
    vals = np.where(nan_block[..., None], 0.0, vals)
    codes = _encode_elem(vals, elem)
    bits = np.where(nan_block, E8M0_NAN, e + E8M0_BIAS).astype(np.uint8)
    return _from_blocks(codes, axis), np.moveaxis(bits, -1, axis)


def mx_dequantize(codes, scale_bits, elem: str = 'e2m1', block: int = 32, axis: int = -1) -> np.ndarray:
    """Inverse of mx_quantize: element value * 2**(scale - 127), float64; NaN scale -> NaN block."""
    cb = _to_blocks(np.asarray(codes), block, axis)
    s = e8m0_decode(np.moveaxis(np.asarray(scale_bits), axis, -1))
    return _from_blocks(_decode_elem(cb, elem) * s[..., None], axis)


# ----------------------------------------------------------------------------------------------------
# NVFP4
# ----------------------------------------------------------------------------------------------------


def nvfp4_global_scale(x) -> np.float32:
    """float32(amax / (6 * 448)) over the finite values; 1.0 when that amax is 0."""
    x = np.asarray(x, dtype=np.float64)
    fin = x[np.isfinite(x)]
    amax = float(np.max(np.abs(fin))) if fin.size else 0.0
    return np.float32(amax / (E2M1_MAX * E4M3_MAX)) if amax > 0 else np.float32(1.0)


def nvfp4_quantize(x, block: int = 16, axis: int = -1, global_scale=None):
    """NVFP4: returns (e2m1 codes uint8 in x's shape, E4M3 block scale codes uint8, float32 global scale).

    block scale = RNE_e4m3(block_amax / (6 * global)), saturating at 448;
    element     = RNE_e2m1(x / (block_scale * global)), saturating at +-6.
    """
    x = np.asarray(x, dtype=np.float64)
    g = nvfp4_global_scale(x) if global_scale is None else np.float32(global_scale)
    gd = float(g)
    xb = _to_blocks(x, block, axis)
    finite = np.all(np.isfinite(xb), axis=-1)
    amax = np.where(finite, np.max(np.abs(np.where(np.isfinite(xb), xb, 0.0)), axis=-1), 0.0)
    s = round_to_e4m3(amax / (E2M1_MAX * gd))
    denom = (s * gd)[..., None]
    with np.errstate(divide='ignore', invalid='ignore'):
        vals = np.where(denom > 0, round_to_e2m1(xb / np.where(denom > 0, denom, 1.0)), 0.0)
    vals = np.where(finite[..., None], vals, 0.0)
    codes = e2m1_encode(vals)
    s_codes = np.where(finite, e4m3_encode(s), E4M3_NAN).astype(np.uint8)
    return _from_blocks(codes, axis), np.moveaxis(s_codes, -1, axis), g


def nvfp4_dequantize(codes, scale_codes, global_scale, block: int = 16, axis: int = -1) -> np.ndarray:
    cb = _to_blocks(np.asarray(codes), block, axis)
    s = e4m3_decode(np.moveaxis(np.asarray(scale_codes), axis, -1)) * float(np.float32(global_scale))
    return _from_blocks(e2m1_decode(cb) * s[..., None], axis)


# ----------------------------------------------------------------------------------------------------
# Nibble packing (two 4-bit codes per byte; element 2i in the low nibble, 2i+1 in the high nibble)
# ----------------------------------------------------------------------------------------------------


def pack_nibbles(codes, axis: int = -1) -> np.ndarray:
    c = np.moveaxis(np.asarray(codes, dtype=np.uint8), axis, -1)
    if c.shape[-1] % 2:
        raise ValueError('need an even number of codes along the packed axis')
    if np.any(c > 0xF):
        raise ValueError('codes must be 4-bit')
    packed = (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)
    return np.moveaxis(packed, -1, axis)


def unpack_nibbles(packed, axis: int = -1) -> np.ndarray:
    p = np.moveaxis(np.asarray(packed, dtype=np.uint8), axis, -1)
    out = np.stack([p & 0xF, p >> 4], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])
    return np.moveaxis(out, -1, axis)


# ----------------------------------------------------------------------------------------------------
# NF4 and double quantization of its block scales
# ----------------------------------------------------------------------------------------------------

# The 16 NF4 levels as published in QLoRA (Dettmers et al. 2023), appendix E.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


def _nearest_index(sorted_levels: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Index of the nearest level (ties to the lower level)."""
    mid = (sorted_levels[:-1] + sorted_levels[1:]) / 2
    return np.searchsorted(mid, v, side='left')


def nf4_quantize(x, block: int = 64, axis: int = -1):
    """NF4 with float32 absmax per block: returns (codes uint8 0..15, absmax float32)."""
    xb = _to_blocks(np.asarray(x, dtype=np.float32), block, axis)
    absmax = np.max(np.abs(xb), axis=-1)
    safe = np.where(absmax > 0, absmax, 1.0).astype(np.float64)
    codes = _nearest_index(NF4_LEVELS, xb.astype(np.float64) / safe[..., None]).astype(np.uint8)
    return _from_blocks(codes, axis), np.moveaxis(absmax.astype(np.float32), -1, axis)


def nf4_dequantize(codes, absmax, block: int = 64, axis: int = -1) -> np.ndarray:
    cb = _to_blocks(np.asarray(codes), block, axis)
    s = np.moveaxis(np.asarray(absmax, dtype=np.float32), axis, -1)
    return _from_blocks((NF4_LEVELS.astype(np.float32)[cb] * s[..., None]).astype(np.float32), axis)


def dynamic_map_signed() -> np.ndarray:
    """The signed 8-bit dynamic (tree) code, 256 sorted float32 values in [-1, 1] (1 but not -1).

    For i = 0..6 the magnitude decade 10**(i-6) holds 2**i values: the midpoints of linspace(0.1, 1, 2**i + 1)
    scaled by 10**(i-6), with both signs; plus 0 and +1.  (7 exponent bits max, 8 bits total.)
    """
    vals = [0.0, 1.0]
    for i in range(7):
        b = np.linspace(0.1, 1.0, 2**i + 1)
        means = (b[:-1] + b[1:]) / 2 * 10.0 ** (i - 6)
        vals += list(means) + list(-means)
    out = np.sort(np.array(vals, dtype=np.float64)).astype(np.float32)
    assert out.shape == (256,)
    return out


def double_quant_scales(absmax, block: int = 256) -> dict:
    """bitsandbytes-style double quantization of first-level float32 block scales.

    Steps: mean = mean(absmax) (float32); c = absmax - mean; per block of `block` consecutive scales
    s2 = max|c| (float32); code = nearest entry of dynamic_map_signed() to c / s2 (uint8 index).
    Dequantized scale = code_value * s2 + mean (float32). A short last block is allowed.

    Returns dict(codes uint8 [n], mean float32 scalar, scales2 float32 [ceil(n / block)],
                 dequantized float32 in absmax's shape).
    """
    a = np.asarray(absmax, dtype=np.float32)
    flat = a.ravel()
    n = flat.size
    mean = np.float32(np.mean(flat, dtype=np.float64))
    c = (flat - mean).astype(np.float32)
    nb = -(-n // block)
    cp = np.zeros(nb * block, np.float32)
    cp[:n] = c
    cp = cp.reshape(nb, block)
    s2 = np.max(np.abs(cp), axis=-1).astype(np.float32)
    safe = np.where(s2 > 0, s2, 1.0).astype(np.float64)
    code = dynamic_map_signed()
    idx = _nearest_index(code.astype(np.float64), cp.astype(np.float64) / safe[:, None])
    idx = idx.reshape(-1)[:n].astype(np.uint8)
    deq = (code[idx] * np.repeat(s2, block)[:n]).astype(np.float32) + mean
    return dict(codes=idx, mean=mean, scales2=s2, dequantized=deq.astype(np.float32).reshape(a.shape))


# ----------------------------------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------------------------------


def relative_error(x, y) -> float:
    """||y - x||_F / ||x||_F in float64."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return float(np.linalg.norm(y - x) / np.linalg.norm(x))


def storage_bits_per_value(fmt: str, n: int) -> float:
    """Stored bits per value for n values (a multiple of the block sizes), scales included.

    'mxfp4' 4 + 8/32; 'mxfp8' 8 + 8/32; 'nvfp4' 4 + 8/16 + one float32 per tensor;
    'nf4' 4 + 32/64; 'nf4_dq' 4 + 8/64 + 32/(64*256) (rounded up per block) + one float32 mean.
    """
    if fmt == 'mxfp4':
        bits = 4 * n + 8 * (n // 32)
    elif fmt == 'mxfp8':
        bits = 8 * n + 8 * (n // 32)
    elif fmt == 'nvfp4':
        bits = 4 * n + 8 * (n // 16) + 32
    elif fmt == 'nf4':
        bits = 4 * n + 32 * (n // 64)
    elif fmt == 'nf4_dq':
        nb = n // 64
        bits = 4 * n + 8 * nb + 32 * (-(-nb // 256)) + 32
    else:
        raise ValueError(fmt)
    return bits / n
