"""qarray's fp4, mxfp8, mxfp4, nvfp4 and double quantization against the independent numpy reference.

The reference (tests/reference/formats_reference.py) implements the OCP MX v1.0 rules, NVIDIA's nvfp4
recipe and bitsandbytes' double quantization in float64 numpy, itself tested against the specs' tables and
ml_dtypes. Here every code and scale qarray stores must equal the reference's, bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import budget
import qarray
from reference import formats_reference as fr

ELEM = {'mxfp4': 'e2m1', 'mxfp8': 'e4m3'}


def _bits(a) -> np.ndarray:
    return np.asarray(a).view(np.uint8)


def assert_same_values(got, want) -> None:
    """Bit-equal, except that a float32 subnormal result may be flushed to (signed) zero: XLA:CPU computes with
    flush-to-zero, so a value below float32's normal range (|v| < 2**-126) dequantizes to 0 there."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    sub = np.abs(want) < np.finfo(np.float32).tiny
    np.testing.assert_array_equal(got[~sub], want[~sub])
    assert np.all((got[sub] == 0) | (got[sub] == want[sub]))


def _mx_data(seed: int, shape=(6, 96)) -> np.ndarray:
    """Normal values with per-row magnitudes over 12 binades, a zero block, a tiny block and exact ties."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-6, 6, (shape[0], 1)))
    x[1, 32:64] = 0.0
    x[2, :32] = rng.standard_normal(32) * 2.0 ** -130  # block max below float32's normal range of scales
    x[3, :8] = [0.25, 0.75, 1.25, 2.5, 5.0, 6.0, 7.0, -7.0]  # element ties and a saturating value
    return x.astype(np.float32)


# ------------------------------------------------------------------------------------------------ fp4
def test_fp4_every_code_and_its_rounding():
    values = np.array(fr.e2m1_values(), np.float32)  # all 16 codes (+-0 included)
    q = qarray.quantize_with_scale(jnp.asarray(values), 'fp4', jnp.ones(1, jnp.float32))
    np.testing.assert_array_equal(np.asarray(qarray.dequantize(q)), values)
    # every midpoint (ties to even), values beyond the max (saturate at +-6), random values
    mids = (values[1:8] + values[:7]) / 2
    x = np.concatenate([mids, -mids, [6.5, 7.0, 100.0, -1e30], np.random.default_rng(0).uniform(-7, 7, 200)])
    x = x.astype(np.float32)
    q = qarray.quantize_with_scale(jnp.asarray(x), 'fp4', jnp.ones(1, jnp.float32))
    np.testing.assert_array_equal(np.asarray(qarray.dequantize(q), np.float64), fr.round_to_e2m1(x))
    assert q.nbytes == (x.size + 1) // 2 + 4  # two codes per byte + one float32 scale


# ------------------------------------------------------------------------------------------------ MX
@pytest.mark.parametrize('qtype', ['mxfp4', 'mxfp8'])
@pytest.mark.parametrize('calibration,mode', [('absmax', 'spec'), ('mse', 'best')])
def test_mx_codes_and_scales_equal_the_reference(qtype, calibration, mode):
    x = _mx_data(1)
    q = qarray.quantize(jnp.asarray(x), qtype, calibration=calibration)
    codes, scale_bits = fr.mx_quantize(x, ELEM[qtype], exponent=mode)
    assert q.scale.dtype == jnp.float8_e8m0fnu and q.scale.shape == (6, 3)
    np.testing.assert_array_equal(_bits(q.scale), scale_bits)
    assert_same_values(qarray.dequantize(q), fr.mx_dequantize(codes, scale_bits, ELEM[qtype]))
    bits = {'mxfp4': 4, 'mxfp8': 8}[qtype]
    assert 8 * q.nbytes == x.size * bits + x.size // 32 * 8  # 4.25 / 8.25 bits per value, nothing else


@pytest.mark.parametrize('qtype', ['mxfp4', 'mxfp8'])
def test_mx_edge_blocks(qtype):
    x = np.zeros((3, 64), np.float32)
    x[0, :32] = 0.0                                    # all-zero block: exponent -127, decodes to 0
    x[0, 32:] = np.linspace(-1, 1, 32)
    x[1, 5] = np.nan                                   # NaN block: the NaN scale 0xFF, all NaN
    x[1, 40] = np.inf                                  # Inf block too
    x[2, :] = 1e30                                     # huge but finite: saturates to the element max * 2**X
    q = qarray.quantize(jnp.asarray(x), qtype)
    s = _bits(q.scale)
    assert s[0, 0] == 0 and s[1, 0] == 0xFF and s[1, 1] == 0xFF
    y = np.asarray(qarray.dequantize(q))
    assert not y[0, :32].any() and np.isnan(y[1]).all()
    assert_same_values(y, fr.mx_dequantize(*fr.mx_quantize(x, ELEM[qtype]), ELEM[qtype]))
    assert np.isfinite(y[2]).all() and np.all(np.abs(y[2] - 1e30) <= 0.5 * 1e30)


@settings(max_examples=budget.examples(10), deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.sampled_from(['mxfp4', 'mxfp8']), st.sampled_from([0, 1]))
def test_mx_reference_on_random_blocks_and_axes(seed, qtype, axis):
    x = _mx_data(seed, (64, 64))
    q = qarray.quantize(jnp.asarray(x), qtype, tiles={axis: 32})
    codes, scale_bits = fr.mx_quantize(x, ELEM[qtype], axis=axis)
    np.testing.assert_array_equal(_bits(q.scale), scale_bits)
    assert_same_values(qarray.dequantize(q), fr.mx_dequantize(codes, scale_bits, ELEM[qtype], axis=axis))


def test_mx_mse_never_worse_than_the_spec_per_block():
    x = _mx_data(7, (32, 256))
    for qtype in ('mxfp4', 'mxfp8'):
        errs = [np.square(np.asarray(qarray.dequantize(qarray.quantize(jnp.asarray(x), qtype, calibration=c)),
                                     np.float64) - x).reshape(32, 8, 32).sum(-1) for c in ('absmax', 'mse')]
        assert np.all(errs[1] <= errs[0]) and errs[1].sum() < errs[0].sum()


# ------------------------------------------------------------------------------------------------ nvfp4
def test_nvfp4_equals_the_reference():
    x = _mx_data(3, (8, 64))
    x[4, 16:32] = 0.0
    q = qarray.quantize(jnp.asarray(x), 'nvfp4')
    assert isinstance(q.scale, qarray.QArray)  # E4M3 block scales under one float32 tensor scale
    assert 8 * q.nbytes == x.size * 4 + x.size // 16 * 8 + 32
    g = np.float32(np.asarray(q.scale.scale).item())   # amax * fl(1/2688): within one ulp of the recipe's
    g_recipe = fr.nvfp4_global_scale(x)
    assert abs(float(g) - float(g_recipe)) <= float(np.spacing(g_recipe))
    codes, scodes, g = fr.nvfp4_quantize(x, global_scale=g)
    np.testing.assert_array_equal(_bits(q.scale.qvalue), scodes)             # E4M3 block scales, bit for bit
    # values: e2m1 * (e4m3 * g) in float32 is two roundings where the reference rounds once
    want = fr.nvfp4_dequantize(codes, scodes, g)
    got = np.asarray(qarray.dequantize(q), np.float64)
    assert np.all(np.abs(got - want) <= 2 * 2.0 ** -24 * np.abs(want) + np.finfo(np.float32).tiny)


def test_nvfp4_mse_picks_the_better_neighbouring_block_scale():
    x = _mx_data(5, (16, 128))
    g = float(fr.nvfp4_global_scale(x))
    exact = np.abs(x.astype(np.float64)).reshape(16, 8, 16).max(-1) / (6 * g)
    ys = {c: np.asarray(qarray.dequantize(qarray.quantize(jnp.asarray(x), 'nvfp4', calibration=c)), np.float64)
          for c in ('absmax', 'mse')}
    errs = {c: np.square(y - x).reshape(16, 8, 16).sum(-1) for c, y in ys.items()}
    assert np.all(errs['mse'] <= errs['absmax']) and errs['mse'].sum() < 0.9 * errs['absmax'].sum()
    # each block's scale is one of the two E4M3 values around the exact scale amax_block / 6 / g (widened by
    # 1e-6 for the float32 roundings of that quotient, so a quotient at a representable value allows both sides)
    q = qarray.quantize(jnp.asarray(x), 'nvfp4', calibration='mse')
    g = float(np.asarray(q.scale.scale).item())
    exact = np.abs(x.astype(np.float64)).reshape(16, 8, 16).max(-1) / 6 / g
    e4m3 = fr.e4m3_values()
    e4m3 = np.unique(e4m3[np.isfinite(e4m3) & (e4m3 >= 0)])
    lo = e4m3[np.clip(np.searchsorted(e4m3, exact * (1 - 1e-6), side='right') - 1, 0, len(e4m3) - 1)]
    hi = e4m3[np.clip(np.searchsorted(e4m3, exact * (1 + 1e-6), side='left'), 0, len(e4m3) - 1)]
    chosen = np.asarray(q.scale.qvalue).astype(np.float64)
    assert np.all((chosen >= lo) & (chosen <= hi)), (chosen, lo, hi)
    assert np.any(chosen != np.asarray(qarray.quantize(jnp.asarray(x), 'nvfp4').scale.qvalue).astype(np.float64))


# ------------------------------------------------------------------------------------------------ double quant
def test_double_quantized_nf4_budget_and_error():
    x = jax.random.normal(jax.random.key(0), (512, 512))
    plain = qarray.quantize(x, 'nf4', tiles=64)
    dq = qarray.quantize(x, 'nf4', tiles=64, scale_qtype='int8')
    assert 8 * dq.nbytes / x.size <= 4.15 < 8 * plain.nbytes / x.size
    err = [float(jnp.linalg.norm(qarray.dequantize(q) - x)) for q in (plain, dq)]
    assert err[1] <= 1.01 * err[0]
    # the second-level scales reconstruct the first-level ones within half an int8 step of their block
    s1, s2 = np.asarray(plain.scale, np.float64), np.asarray(qarray.dequantize(dq.scale), np.float64)
    assert np.all(np.abs(s2 - s1) <= (s1.max() - s1.min()) / 254 * 1.0001)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize('qtype,tiles,block', [('mxfp4', 16, 32), ('mxfp8', 64, 32), ('nvfp4', 32, 16)])
def test_wrong_block_size_names_the_formats_block(qtype, tiles, block):
    with pytest.raises(ValueError, match=rf"{qtype}.*needs tiles={block}"):
        qarray.quantize(jnp.ones((4, 64)), qtype, tiles=tiles)


def test_microscaling_refuses_double_quantization_and_other_calibrations():
    with pytest.raises(ValueError, match='scale_qtype'):
        qarray.quantize(jnp.ones((4, 64)), 'mxfp4', scale_qtype='int8')
    with pytest.raises(ValueError, match="calibration"):
        qarray.quantize(jnp.ones((4, 64)), 'mxfp4', calibration='minmax')
