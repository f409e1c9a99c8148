"""Number formats: names, aliases, dtypes, code ranges, NF4 code book, field mapping."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from qarray import qtypes


def test_every_required_format_is_registered():
    expected = {f'int{b}' for b in range(1, 9)} | {f'uint{b}' for b in range(1, 9)} | {
        'float8_e4m3fn', 'float8_e5m2', 'nf4', 'float4_e2m1fn', 'mxfp8', 'mxfp4', 'nvfp4', 'dynamic8', 'dynamic8u'}
    assert set(qtypes.names()) == expected


@pytest.mark.parametrize('spec, name', [
    ('int4', 'int4'), (' INT3 ', 'int3'), ('fp8', 'float8_e4m3fn'), ('e4m3', 'float8_e4m3fn'),
    ('e5m2', 'float8_e5m2'), ('nf4', 'nf4'), (jnp.int8, 'int8'), (np.uint8, 'uint8'),
    (jnp.float8_e4m3fn, 'float8_e4m3fn'), (jnp.float8_e5m2, 'float8_e5m2'), (jnp.int4, 'int4'),
    (np.dtype(ml_dtypes.uint4), 'uint4'), (jnp.int2, 'int2'),
])
def test_get_by_name_alias_and_dtype(spec, name):
    assert qtypes.get(spec).name == name
    assert qtypes.get(qtypes.get(spec)) is qtypes.get(spec)


@pytest.mark.parametrize('bad', ['int9', 'float16', 'nf5', '', jnp.float32, np.int16, 3.5, None])
def test_unknown_qtype_lists_valid_names(bad):
    with pytest.raises(ValueError, match=r"Unknown qtype .*valid qtypes are: int1, uint1.*nf4.*fp8"):
        qtypes.get(bad)


@pytest.mark.parametrize('bits', range(1, 9))
def test_integer_code_ranges(bits):
    i, u = qtypes.get(f'int{bits}'), qtypes.get(f'uint{bits}')
    if bits == 1:
        assert (i.qmin, i.qmax, i.step_in_scales, i.calibration_bound) == (-1, 1, 2, 2.0)
        with pytest.raises(ValueError, match="'int1' has no zero level.*'uint1'"):
            i.asym_range
    else:
        assert (i.qmin, i.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)  # full two's complement
        assert i.asym_range == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        assert i.calibration_bound == i.qmax + 0.5
        n = qtypes.narrow_range(i)
        assert (n.qmin, n.qmax, n.bits, n.name) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1, bits, f'int{bits}_narrow')
        assert qtypes.get(f'int{bits}_narrow') == n and n.calibration_bound == i.calibration_bound
    assert (u.qmin, u.qmax, u.asym_range) == (0, 2**bits - 1, (0, 2**bits - 1))
    assert qtypes.narrow_range(u) is u and qtypes.narrow_range('int1').qmin == -1
    assert i.packed == u.packed == (bits < 8)
    assert i.is_integer and u.is_integer
    assert i.code_dtype == np.int8 and u.code_dtype == np.uint8


def test_float_and_codebook_properties():
    e4, e5, nf4 = qtypes.get('fp8'), qtypes.get('float8_e5m2'), qtypes.get('nf4')
    assert (e4.qmax, e5.qmax, nf4.qmax) == (448.0, 57344.0, 1.0)
    assert e4.code_dtype == jnp.float8_e4m3fn and e5.code_dtype == jnp.float8_e5m2
    assert not e4.packed and not e4.is_integer and nf4.packed and nf4.code_dtype == np.uint8
    assert e4.calibration_bound == 448.0 and nf4.calibration_bound == 1.0
    for qt in (e4, nf4):
        with pytest.raises(ValueError, match='has no zero point; asymmetric calibration needs an integer'):
            qt.asym_range
    assert qtypes.get('int4').codebook is None


def test_nf4_codebook_is_the_qlora_table_exact_in_float32():
    # Appendix E of the QLoRA paper (arXiv:2305.14314), as printed there.
    paper = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
    cb = qtypes.get('nf4').codebook
    assert cb.dtype == np.float32
    np.testing.assert_array_equal(cb, np.array(paper, np.float32))
    # Independent derivation (bitsandbytes' create_normal_map): normal quantiles, normalised.
    from scipy.stats import norm
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    # bnb derives it in float32: the normalisation and the stored float32 value, <= 3 u |v| <= 1.8e-7 (|v| <= 1)
    np.testing.assert_allclose(cb, v / v.max(), rtol=0, atol=2e-7)


@pytest.mark.parametrize('name', [f'int{b}' for b in range(1, 9)] + [f'uint{b}' for b in range(1, 9)] + ['nf4'])
def test_fields_round_trip_over_every_code(name):
    qt = qtypes.get(name)
    if qt.kind == 'int' and qt.bits == 1:
        codes = np.array([-1, 1])
    elif qt.kind == 'int':
        codes = np.arange(qt.asym_range[0], qt.asym_range[1] + 1)
    else:
        codes = np.arange(0, 2**qt.bits)
    codes = jnp.asarray(codes, qt.code_dtype)
    fields = qt.to_field(codes)
    assert fields.dtype == jnp.uint8 and int(fields.max()) < 2**qt.bits
    assert len(set(np.asarray(fields).tolist())) == codes.size  # injective
    back = qt.from_field(fields)
    assert back.dtype == qt.code_dtype
    np.testing.assert_array_equal(np.asarray(back), np.asarray(codes))


def test_repr():
    assert repr(qtypes.get('nf4')) == 'QType(nf4)'
