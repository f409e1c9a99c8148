"""Tests of the numpy format reference against facts from the specs, with ml_dtypes as a second source."""

import math

import ml_dtypes
import numpy as np
import pytest

from . import formats_reference as fr

E2M1_FACTS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def ml_decode(bits, dtype):
    return np.asarray(bits, dtype=np.uint8).view(dtype).astype(np.float64)


# ------------------------------------------------------------------ element formats


def test_e2m1_values_are_the_spec_table():
    v = fr.e2m1_values()
    np.testing.assert_array_equal(v, E2M1_FACTS)
    assert np.array_equal(np.signbit(v), [False] * 8 + [True] * 8)  # code 0x8 is -0
    assert len(set(v.tolist())) == 15  # 16 codes, 15 distinct values (+0 == -0)
    np.testing.assert_array_equal(v, ml_decode(np.arange(16), ml_dtypes.float4_e2m1fn))


def test_e4m3_values_match_ofp8_and_ml_dtypes():
    v = fr.e4m3_values()
    ref = ml_decode(np.arange(256), ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(v, ref)  # NaN positions compare equal too
    assert np.isnan(v[0x7F]) and np.isnan(v[0xFF]) and np.sum(np.isnan(v)) == 2
    assert v[0x7E] == 448.0 and v[0x01] == 2.0**-9 and v[0x08] == 2.0**-6 and v[0x38] == 1.0


def test_e8m0_decode_edges_and_ml_dtypes():
    d = fr.e8m0_decode(np.arange(256))
    assert d[0x00] == 2.0**-127 and d[0xFE] == 2.0**127 and d[127] == 1.0 and np.isnan(d[0xFF])
    np.testing.assert_array_equal(d, ml_decode(np.arange(256), ml_dtypes.float8_e8m0fnu))
    np.testing.assert_array_equal(fr.e8m0_encode_exponent([-127, 0, 127]), [0, 127, 254])
    with pytest.raises(ValueError):
        fr.e8m0_encode_exponent(128)


@pytest.mark.parametrize('x, want', [
    (0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0),
    (-2.5, -2.0), (-5.0, -4.0), (0.2, 0.0), (0.3, 0.5), (2.6, 3.0), (4.9, 4.0), (5.1, 6.0),
])
def test_e2m1_round_half_even(x, want):
    assert fr.round_to_e2m1(x) == want
    assert float(np.float64(x).astype(ml_dtypes.float4_e2m1fn)) == want


@pytest.mark.parametrize('x', [6.0, 6.5, 7.0, 8.0, 1e30, np.inf])
def test_e2m1_saturates(x):
    assert fr.round_to_e2m1(x) == 6.0 and fr.round_to_e2m1(-x) == -6.0


def test_e2m1_sign_of_zero_and_nan():
    r = fr.round_to_e2m1([-0.1, 0.1, np.nan])
    assert np.signbit(r[0]) and r[0] == 0 and not np.signbit(r[1]) and np.isnan(r[2])
    assert fr.e2m1_encode(r[:2]).tolist() == [0x8, 0x0]


def test_e2m1_rounding_matches_ml_dtypes_on_every_midpoint_and_random():
    pos = fr.e2m1_values()[:8]
    mids = (pos[:-1] + pos[1:]) / 2
    rng = np.random.default_rng(0)
    x = np.concatenate([pos, mids, np.nextafter(mids, 0), np.nextafter(mids, 10),
                        rng.uniform(-8, 8, 5000), rng.standard_normal(2000) * 0.3])
    x = np.concatenate([x, -x])
    want = x.astype(ml_dtypes.float4_e2m1fn).astype(np.float64)
    got = fr.round_to_e2m1(x)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


def test_e4m3_rounding_matches_ml_dtypes_below_overflow():
    v = fr.e4m3_values()
    pos = v[:0x7F]
    mids = (pos[:-1] + pos[1:]) / 2  # every tie, subnormal ones included
    rng = np.random.default_rng(1)
    x = np.concatenate([pos, mids, np.nextafter(mids, 0), np.nextafter(mids, 1e3),
                        rng.uniform(-463, 463, 5000), np.exp(rng.uniform(-14, 6, 5000))])
    x = np.concatenate([x, -x])
    np.testing.assert_array_equal(fr.round_to_e4m3(x), x.astype(ml_dtypes.float8_e4m3fn).astype(np.float64))


def test_e4m3_saturates_where_ml_dtypes_overflows_to_nan():
    assert fr.round_to_e4m3(470.0) == 448.0 and fr.round_to_e4m3(-1e9) == -448.0
    assert fr.round_to_e4m3(np.inf) == 448.0 and np.isnan(fr.round_to_e4m3(np.nan))
    assert np.isnan(float(np.float64(500.0).astype(ml_dtypes.float8_e4m3fn)))  # why we clip first


def test_encode_decode_round_trips():
    codes = np.arange(16)
    np.testing.assert_array_equal(fr.e2m1_encode(fr.e2m1_decode(codes)), codes)
    codes = np.array([c for c in range(256) if c not in (0x7F, 0xFF)])
    np.testing.assert_array_equal(fr.e4m3_encode(fr.e4m3_decode(codes)), codes)
    assert fr.e4m3_encode(np.nan) == 0x7F
    with pytest.raises(ValueError):
        fr.e2m1_encode(2.5)


# ------------------------------------------------------------------ MX


def spec_mx_by_hand(x, elem):
    """Independent path: python math for the exponent, ml_dtypes for the element cast (clip first)."""
    emax, vmax, dt = {'e2m1': (2, 6.0, ml_dtypes.float4_e2m1fn), 'e4m3': (8, 448.0, ml_dtypes.float8_e4m3fn)}[elem]
    out = np.empty_like(x, dtype=np.float64)
    for i, blk in enumerate(x.reshape(-1, 32)):
        amax = float(np.max(np.abs(blk)))
        e = -127 if amax == 0 else max(-127, math.floor(math.log2(amax)) - emax)
        q = np.clip(blk.astype(np.float64) / 2.0**e, -vmax, vmax).astype(dt).astype(np.float64)
        out.reshape(-1, 32)[i] = q * 2.0**e
    return out


@pytest.mark.parametrize('elem', ['e2m1', 'e4m3'])
def test_mx_spec_matches_independent_path(elem):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((16, 128)) * np.exp(rng.uniform(-20, 20, (16, 1)))).astype(np.float32)
    x[3, :32] = 0.0
    codes, bits = fr.mx_quantize(x, elem, 32, -1, 'spec')
    assert codes.shape == x.shape and bits.shape == (16, 4) and codes.dtype == bits.dtype == np.uint8
    np.testing.assert_array_equal(fr.mx_dequantize(codes, bits, elem), spec_mx_by_hand(x, elem))


def test_mx_spec_hand_example():
    blk = np.zeros(32)
    blk[:4] = [1.0, 0.3, -0.6, 0.1]  # amax 1 -> X = 0 - 2 = -2; elements x * 4
    codes, bits = fr.mx_quantize(blk, 'e2m1')
    assert bits.tolist() == [125]
    np.testing.assert_array_equal(fr.e2m1_decode(codes[:4]), [4.0, 1.0, -2.0, 0.5])  # 1.2->1, 2.4->2, 0.4->0.5
    blk[0] = 7.9  # X = 2 - 2 = 0: 7.9 saturates to 6 (spec clamps normals)
    codes, bits = fr.mx_quantize(blk, 'e2m1')
    assert bits.tolist() == [127] and fr.e2m1_decode(codes[0]) == 6.0


def test_mx_all_zero_block():
    for elem in ['e2m1', 'e4m3']:
        for mode in fr.MX_EXPONENT_MODES:
            codes, bits = fr.mx_quantize(np.zeros((2, 32)), elem, exponent=mode)
            assert bits.tolist() == [[0], [0]] and not codes.any()
            assert not fr.mx_dequantize(codes, bits, elem).any()


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_mx_nan_or_inf_block_is_nan(bad):
    x = np.random.default_rng(3).standard_normal((2, 64))
    x[0, 40] = bad
    for elem in ['e2m1', 'e4m3']:
        for mode in fr.MX_EXPONENT_MODES:
            codes, bits = fr.mx_quantize(x, elem, exponent=mode)
            assert bits[0, 1] == 0xFF and np.sum(bits == 0xFF) == 1
            y = fr.mx_dequantize(codes, bits, elem)
            assert np.all(np.isnan(y[0, 32:])) and not np.any(np.isnan(np.delete(y, np.s_[32:], 1)))


def test_mx_tiny_blocks_clamp_exponent_to_minus_127():
    x = np.zeros(32)
    x[:3] = [2.0**-128, 2.0**-130, -(2.0**-127)]
    codes, bits = fr.mx_quantize(x, 'e2m1')
    assert bits.tolist() == [0]
    np.testing.assert_array_equal(fr.mx_dequantize(codes, bits, 'e2m1')[:3], [2.0**-128, 0.0, -(2.0**-127)])


def test_mx_axis():
    x = np.random.default_rng(4).standard_normal((64, 3))
    c0, b0 = fr.mx_quantize(x, 'e4m3', axis=0)
    c1, b1 = fr.mx_quantize(x.T, 'e4m3', axis=-1)
    assert b0.shape == (2, 3)
    np.testing.assert_array_equal(c0, c1.T)
    np.testing.assert_array_equal(b0, b1.T)
    np.testing.assert_array_equal(fr.mx_dequantize(c0, b0, 'e4m3', axis=0), fr.mx_dequantize(c1, b1, 'e4m3').T)


@pytest.mark.parametrize('elem', ['e2m1', 'e4m3'])
def test_mx_exponent_modes(elem):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 256))
    err = {}
    bits = {}
    for mode in fr.MX_EXPONENT_MODES:
        c, b = fr.mx_quantize(x, elem, exponent=mode)
        bits[mode] = b.astype(int)
        err[mode] = ((fr.mx_dequantize(c, b, elem) - x) ** 2).reshape(64, 8, 32).sum(-1)
    for mode in ('best', 'ceil', 'rne'):
        assert np.all((bits[mode] - bits['spec'] >= 0) & (bits[mode] - bits['spec'] <= 1))
    assert np.all(err['best'] <= err['spec']) and np.all(err['best'] <= err['rne'])
    assert err['best'].sum() < err['spec'].sum()
    np.testing.assert_array_equal(fr.mx_quantize(x, elem, exponent='best', candidates=(0,))[1], bits['spec'])
    amax = np.abs(x).reshape(64, 8, 32).max(-1)  # 'ceil': the block max is never clipped
    assert np.all(amax <= fr._FORMATS[elem]['max'] * fr.e8m0_decode(bits['ceil']))


@pytest.mark.parametrize('elem, stays, bumps', [('e2m1', 6.99, 7.0), ('e4m3', 464.0, 464.5)])
def test_mx_rne_exponent_threshold(elem, stays, bumps):
    # block max in units of the spec scale: RNE overflows max_elem from 7 on (e2m1), above 464 (e4m3)
    emax = fr._FORMATS[elem]['emax']
    for r, bump in [(stays, 0), (bumps, 1)]:
        x = np.zeros(32)
        x[0] = r * 2.0**-emax  # floor(log2(x[0])) = 0, so the spec exponent is -emax
        assert fr.mx_quantize(x, elem, exponent='rne')[1].tolist() == [127 - emax + bump]


# ------------------------------------------------------------------ NVFP4


def test_nvfp4_matches_independent_path():
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((8, 64)) * np.exp(rng.uniform(-3, 3, (8, 1)))).astype(np.float32)
    x[2, 16:32] = 0.0
    codes, scodes, g = fr.nvfp4_quantize(x)
    assert g.dtype == np.float32 and g == np.float32(np.abs(x).max() / 2688.0)
    assert codes.shape == x.shape and scodes.shape == (8, 4)
    # independent: ml_dtypes casts (clip first, e4m3 is non-saturating in ml_dtypes)
    blk = x.astype(np.float64).reshape(8, 4, 16)
    s = np.clip(np.abs(blk).max(-1) / (6 * float(g)), 0, 448).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(scodes, s.view(np.uint8))
    d = s.astype(np.float64)[..., None] * float(g)
    with np.errstate(invalid='ignore', divide='ignore'):
        e = np.where(d > 0, np.clip(blk / d, -6, 6), 0).astype(ml_dtypes.float4_e2m1fn).astype(np.float64)
    np.testing.assert_array_equal(fr.nvfp4_dequantize(codes, scodes, g), (e * d).reshape(8, 64))
    # the tensor max decodes to 6 * 448 * g, i.e. the max up to the float32 rounding of g
    np.testing.assert_allclose(np.abs(fr.nvfp4_dequantize(codes, scodes, g)).max(), np.abs(x).max(), rtol=2**-23)


def test_nvfp4_zero_and_nan_blocks():
    x = np.zeros((1, 48))
    x[0, :16] = np.linspace(-1, 1, 16)
    x[0, 40] = np.nan
    codes, scodes, g = fr.nvfp4_quantize(x)
    assert scodes[0, 1] == 0 and scodes[0, 2] == 0x7F and np.isfinite(g)
    y = fr.nvfp4_dequantize(codes, scodes, g)
    assert not y[0, 16:32].any() and np.all(np.isnan(y[0, 32:])) and np.all(np.isfinite(y[0, :16]))
    codes, scodes, g = fr.nvfp4_quantize(np.zeros((2, 16)))
    assert g == 1.0 and not codes.any() and not scodes.any()


# ------------------------------------------------------------------ packing, NF4, double quantization


def test_pack_nibbles_layout_and_round_trip():
    assert fr.pack_nibbles([0x1, 0x2, 0xF, 0x0]).tolist() == [0x21, 0x0F]
    c = np.random.default_rng(7).integers(0, 16, (3, 10, 4)).astype(np.uint8)
    for axis in (1, -1):
        p = fr.pack_nibbles(c, axis)
        assert p.shape[axis] == c.shape[axis] // 2
        np.testing.assert_array_equal(fr.unpack_nibbles(p, axis), c)


def test_nf4_levels_and_nearest():
    lv = fr.NF4_LEVELS
    assert lv.shape == (16,) and np.all(np.diff(lv) > 0) and lv[0] == -1 and lv[-1] == 1 and lv[7] == 0
    codes, absmax = fr.nf4_quantize(np.tile(lv, 4)[None, :], 64)
    np.testing.assert_array_equal(codes[0], np.tile(np.arange(16), 4))
    assert absmax.tolist() == [[1.0]]


def test_dynamic_map():
    m = fr.dynamic_map_signed()
    assert m.dtype == np.float32 and m.shape == (256,) and len(np.unique(m)) == 256
    assert m[-1] == 1.0 and 0.0 in m and -1.0 not in m and np.all(np.diff(m) > 0)
    np.testing.assert_array_equal(np.sort(-m[m < 0]), m[(m > 0) & (m < 1)])  # symmetric except +1
    assert np.isclose(m[0], -0.99296875) and np.isclose(m[m > 0].min(), 5.5e-7)


def test_double_quant_scales():
    rng = np.random.default_rng(8)
    absmax = np.abs(rng.standard_normal((1000,))).astype(np.float32) + 2.0
    dq = fr.double_quant_scales(absmax, 256)
    assert dq['codes'].dtype == np.uint8 and dq['codes'].shape == (1000,)
    assert dq['scales2'].shape == (4,) and dq['scales2'].dtype == np.float32 and dq['mean'].dtype == np.float32
    assert np.isclose(dq['mean'], absmax.mean())
    c = absmax - dq['mean']
    np.testing.assert_allclose(dq['scales2'], [np.abs(c[i:i + 256]).max() for i in range(0, 1000, 256)])
    assert np.max(np.abs(dq['dequantized'] - absmax)) < 0.02 * np.abs(c).max()
    # the largest |c| of each block is coded exactly up to float32 (+1 exists in the map, -1 does not)
    const = fr.double_quant_scales(np.full(300, 3.0, np.float32))
    np.testing.assert_array_equal(const['dequantized'], np.full(300, 3.0, np.float32))


def test_nf4_double_quant_budget():
    x = np.random.default_rng(9).standard_normal((256, 256)).astype(np.float32)
    codes, absmax = fr.nf4_quantize(x, 64)
    plain = fr.relative_error(x, fr.nf4_dequantize(codes, absmax, 64))
    dq = fr.double_quant_scales(absmax, 256)
    double = fr.relative_error(x, fr.nf4_dequantize(codes, dq['dequantized'], 64))
    assert 0.08 < plain < 0.10 and double <= 1.01 * plain
    assert fr.storage_bits_per_value('nf4_dq', x.size) <= 4.15
    assert fr.storage_bits_per_value('nf4', 1 << 20) == 4.5


def test_storage_bits():
    n = 1 << 20
    assert fr.storage_bits_per_value('mxfp4', n) == 4.25 and fr.storage_bits_per_value('mxfp8', n) == 8.25
    assert fr.storage_bits_per_value('nvfp4', n) == 4.5 + 32 / n
    assert fr.storage_bits_per_value('nf4_dq', n) == 4 + 8 / 64 + 32 / (64 * 256) + 32 / n
