"""Calibration methods against numpy, the spec parser, and its error messages."""

import jax.numpy as jnp
import numpy as np
import pytest

import qarray
from qarray import calibration, qtypes

X = np.random.default_rng(0).standard_t(3, size=(4, 64)).astype(np.float32)
INT8 = qtypes.get('int8')


def test_absmax_minmax_rms_fixed_percentile_match_numpy():
    r = calibration.calibrate('absmax', X, (1,), INT8)
    np.testing.assert_array_equal(np.asarray(r.hi), np.abs(X).max(1, keepdims=True))
    assert r.symmetric
    r = calibration.calibrate('minmax', X, (1,), INT8)
    np.testing.assert_array_equal(np.asarray(r.lo), X.min(1, keepdims=True))
    np.testing.assert_array_equal(np.asarray(r.hi), X.max(1, keepdims=True))
    assert not r.symmetric
    for spec, k in (('rms', 3.0), ('rms,0.5', 0.5), ('rms,100', 100.0)):
        r = calibration.calibrate(spec, X, (1,), INT8)
        ref = np.minimum(k * np.sqrt(np.mean(X.astype(np.float64) ** 2, 1, keepdims=True)),
                         np.abs(X).max(1, keepdims=True))
        np.testing.assert_allclose(np.asarray(r.hi), ref, rtol=1e-5)
    r = calibration.calibrate('fixed,-2,3', X, (0, 1), INT8)
    assert r.hi.shape == (1, 1) and float(r.lo[0, 0]) == -2 and float(r.hi[0, 0]) == 3 and not r.symmetric
    assert calibration.calibrate('fixed, -2.5, 2.5', X, (1,), INT8).symmetric
    r = calibration.calibrate('percentile,90', X, (1,), INT8)
    np.testing.assert_allclose(np.asarray(r.hi), np.percentile(np.abs(X), 90, axis=1, keepdims=True), rtol=1e-6)


def test_mse_picks_a_ratio_no_worse_than_absmax():
    x = np.random.default_rng(1).standard_t(2, size=(4, 256)).astype(np.float32)
    r = calibration.calibrate('mse', x, (1,), qtypes.get('int4'))
    absmax = np.abs(x).max(1, keepdims=True)
    assert np.all(np.asarray(r.hi) <= absmax) and np.all(np.asarray(r.hi) >= 0.3 * absmax * (1 - 1e-6))
    assert np.any(np.asarray(r.hi) < absmax)  # heavy tails: clipping pays off
    r = calibration.calibrate('mse,8,0.5', x, (1,), qtypes.get('int4'))
    assert np.all(np.asarray(r.hi) >= 0.5 * absmax * (1 - 1e-6))


def test_calibrations_through_quantize():
    x = jnp.asarray(X)
    for spec in ('absmax', 'rms', 'rms,2', 'percentile,99', 'mse', 'fixed,-3,3'):
        q = qarray.quantize(x, 'int4', channelwise_axes=0, calibration=spec)
        assert q.zero_point is None
    q = qarray.quantize(x, 'uint4', channelwise_axes=0, calibration='minmax')
    assert q.zero_point is not None and q.zero_point.dtype == jnp.uint8
    q = qarray.quantize(x, 'int4', calibration='fixed,-1,3')  # asymmetric fixed range: zero point
    assert q.zero_point is not None


def test_parse_and_methods():
    assert calibration.parse('rms') == ('rms', ())
    assert calibration.parse(' percentile , 99.9 ') == ('percentile', (99.9,))
    assert calibration.parse('fixed,-1,1') == ('fixed', (-1.0, 1.0))
    assert calibration.parse('mse,32,0.5') == ('mse', (32.0, 0.5))
    names = calibration.methods()
    for m in ('absmax', 'minmax', 'rms', 'fixed', 'percentile', 'mse'):
        assert any(u.startswith(m) for u in names)


@pytest.mark.parametrize('spec, exc, msg', [
    ('maxabs', ValueError, r"Unknown calibration 'maxabs'; valid methods are: absmax, minmax, rms\[,k\]"),
    ('fixed,a,b', ValueError, r"calibration 'fixed,a,b': arguments must be numbers; usage: fixed,lo,hi"),
    ('fixed,1', ValueError, r"calibration 'fixed,1' takes 2\.\.2 arguments; usage: fixed,lo,hi"),
    ('absmax,2', ValueError, r"calibration 'absmax,2' takes 0\.\.0 arguments; usage: absmax"),
    ('percentile', ValueError, r"calibration 'percentile' takes 1\.\.1 arguments; usage: percentile,p"),
    ('rms,1,2', ValueError, r"calibration 'rms,1,2' takes 0\.\.1 arguments"),
    (3, TypeError, r"calibration must be a string like 'absmax' or 'percentile,99\.9'; got 3"),
])
def test_parse_errors(spec, exc, msg):
    with pytest.raises(exc, match=msg):
        calibration.parse(spec)
    with pytest.raises(exc, match=msg):
        qarray.quantize(jnp.ones((2, 2)), 'int8', calibration=spec)


@pytest.mark.parametrize('spec, msg', [
    ('rms,0', r"calibration 'rms,k' needs k > 0; got k=0\.0"),
    ('fixed,2,1', r"calibration 'fixed,lo,hi' needs lo < hi; got lo=2\.0, hi=1\.0"),
    ('percentile,0', r"calibration 'percentile,p' needs 0 < p <= 100; got p=0\.0"),
    ('percentile,101', r"needs 0 < p <= 100; got p=101\.0"),
    ('mse,1', r"calibration 'mse,steps,min_ratio' needs steps >= 2 and 0 < min_ratio < 1; got steps=1"),
    ('mse,8,1.5', r"needs steps >= 2 and 0 < min_ratio < 1; got steps=8, min_ratio=1\.5"),
])
def test_bad_arguments(spec, msg):
    with pytest.raises(ValueError, match=msg):
        qarray.quantize(jnp.ones((2, 2)), 'int8', calibration=spec)


def test_registered_method_gets_nonfinite_groups_enforced():
    @calibration.register('test_half', usage='test_half')
    def half(x, axes, qtype):
        hi = jnp.full([1 if a in axes else d for a, d in enumerate(x.shape)], 0.5)
        return calibration.Range(-hi, hi, True)

    x = np.ones((2, 4), np.float32)
    x[1, 2] = np.nan
    r = calibration.calibrate('test_half', x, (1,), INT8)
    assert float(r.hi[0, 0]) == 0.5 and np.isnan(float(r.hi[1, 0]))
    d = np.asarray(qarray.dequantize(qarray.quantize(x, 'int8', channelwise_axes=0, calibration='test_half')))
    assert np.allclose(d[0], 127 * 0.5 / 127.5) and np.all(np.isnan(d[1]))  # clipped to the top level
