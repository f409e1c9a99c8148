"""Calibration methods against numpy, the spec parser, and its error messages."""

import functools

import jax
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
        # k sqrt(mean(x^2)) in float32: 64 positive squares summed (gamma_65 relative), halved by the sqrt, and
        # 3 more roundings: 2.3e-6 < 1e-5
        np.testing.assert_allclose(np.asarray(r.hi), ref, rtol=1e-5)
    r = calibration.calibrate('fixed,-2,3', X, (0, 1), INT8)
    assert r.hi.shape == (1, 1) and float(r.lo[0, 0]) == -2 and float(r.hi[0, 0]) == 3 and not r.symmetric
    assert calibration.calibrate('fixed, -2.5, 2.5', X, (1,), INT8).symmetric
    r = calibration.calibrate('percentile,90', X, (1,), INT8)
    # linear interpolation a + (b - a) f between two order statistics: <= 3 roundings of values <= b = max
    np.testing.assert_allclose(np.asarray(r.hi), np.percentile(np.abs(X), 90, axis=1, keepdims=True), rtol=0,
                               atol=4 * 2.0 ** -24 * float(np.abs(X).max()))


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
    # clipped to the top level; 127 * fl(0.5 * fl(1/127.5)): 3 roundings, far inside allclose's 1e-5
    assert np.allclose(d[0], 127 * 0.5 / 127.5) and np.all(np.isnan(d[1]))


# --------------------------------------------------------------------------- NaN-safe one-pass absmax / minmax
from qarray import _numerics  # noqa: E402
from qarray.calibration import _reduce, registry  # noqa: E402


def test_group_max_min_match_numpy():
    rng = np.random.default_rng(2)

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def three(x, axes, levels):
        return (_reduce.group_max(x, axes, leaf=jnp.abs, levels=levels), _reduce.group_max(x, axes, levels=levels),
                _reduce.group_min(x, axes, levels=levels))

    for shape, axes, levels in [((5,), (0,), 3), ((7, 3), (0,), 3), ((7, 3), (1,), 1), ((4, 9, 6), (0, 1), 3),
                                ((4, 9, 6), (1, 2), 6), ((4, 9, 6), (0, 2), 3), ((2, 3, 4, 5), (1, 2), 3),
                                ((3, 1, 33), (1, 2), 0), ((6, 4), (), 3), ((1, 1), (0, 1), 3), ((3, 17), (0, 1), 6)]:
        x = rng.standard_normal(shape).astype(np.float32)
        a, b, c = three(x, axes, levels)
        np.testing.assert_array_equal(np.asarray(a), np.abs(x).max(axis=axes, keepdims=True))
        np.testing.assert_array_equal(np.asarray(b), x.max(axis=axes, keepdims=True))
        np.testing.assert_array_equal(np.asarray(c), x.min(axis=axes, keepdims=True))
    i = jnp.arange(-6, 6, dtype=jnp.int32).reshape(3, 4)
    assert _reduce.group_max(i, (1,), leaf=jnp.abs).tolist() == [[6], [2], [5]]


def test_only_absmax_and_minmax_skip_the_isfinite_pass():
    assert {n for n, m in registry._METHODS.items() if m.nan_safe} == {'absmax', 'minmax'}
    for spec in ('absmax', 'minmax', 'rms', 'percentile,99', 'mse,4', 'fixed,-1,1'):
        jaxpr = str(jax.make_jaxpr(lambda v, s=spec: calibration.calibrate(s, v, (1,), INT8))(X))
        assert ('is_finite' in jaxpr) == (spec not in ('absmax', 'minmax')), spec
    # A nan_safe method's range has the dtype of the guarded path (float32 for narrower data).
    r = calibration.calibrate('minmax', jnp.asarray(X, jnp.bfloat16), (1,), INT8)
    assert r.lo.dtype == r.hi.dtype == jnp.float32


# (shape, reduced axes, quantize layout giving those groups) for n elements
def _nan_layouts(n):
    out = [((n,), (0,), {})]
    if n % 8 == 0:
        out += [((8, n // 8), (0,), dict(channelwise_axes=1)),        # Dense [in, out]: a major-axis reduce
                ((n // 8, 8), (1,), dict(channelwise_axes=0)),        # per token: the minor axis, groups of 8
                ((2, n // 2), (1,), dict(channelwise_axes=0)),        # per token, long groups
                ((4, 2, n // 8), (0, 1), dict(channelwise_axes=2)),   # two adjacent reduced axes
                ((n // 128, 128), (0,), dict(channelwise_axes=1, tiles={0: n // 512}))]  # tiled: 4 groups per column
    return out


def _bad_groups(x, axes, quantize_kw):
    if 'tiles' in quantize_kw:
        t = quantize_kw['tiles'][0]
        v = x.reshape(x.shape[0] // t, t, x.shape[1])
        return ~np.isfinite(v).all(axis=1)
    return ~np.isfinite(x).all(axis=axes, keepdims=True)


# XLA:CPU hands reduces of >= 4096 input elements to YNNPACK, whose max drops NaN: sizes around that
# threshold and larger, NaN / Inf at several positions, the calibration alone (eager and jitted) and a
# jitted quantize (scale) / quantize -> dequantize (values).
@pytest.mark.parametrize('n', [4095, 4096, 4097, 2**18])
def test_nan_or_inf_group_gets_nan_range_at_every_size(n):
    rng = np.random.default_rng(n)
    base = rng.standard_normal(n).astype(np.float32)
    positions = sorted({0, n // 2 + 3, n - 1, int(rng.integers(n))})
    for shape, axes, kw in _nan_layouts(n):
        cal = {s: jax.jit(lambda v, s=s: calibration.calibrate(s, v, axes, INT8)) for s in ('absmax', 'minmax')}
        quant = {name: jax.jit(lambda v, name=name, c=c: qarray.quantize(v, name, calibration=c, **kw).scale)
                 for name, c in (('int8', 'absmax'), ('uint8', 'minmax'))}
        qdq = jax.jit(lambda v: qarray.dequantize(qarray.quantize(v, 'int8', **kw)))
        for value in (np.nan, -np.nan, np.inf, -np.inf, None):
            for p in positions if value is not None else [None]:
                x = base.copy()
                if p is not None:
                    x[p] = value
                x = x.reshape(shape)
                if 'tiles' in kw:
                    bad = _bad_groups(x, axes, kw)
                    scale_bad = bad
                else:
                    bad = scale_bad = _bad_groups(x, axes, kw)
                    scale_bad = scale_bad.reshape(np.asarray(quant['int8'](x)).shape)
                for s, f in cal.items():
                    eager = n == 4096 and len(shape) == 1  # op by op: every reduce its own program
                    for r in [f(x)] + ([calibration.calibrate(s, x, axes, INT8)] if eager else []):
                        if 'tiles' not in kw:
                            np.testing.assert_array_equal(np.isnan(np.asarray(r.lo)), bad, err_msg=f'{s} {shape} {p}')
                            np.testing.assert_array_equal(np.isnan(np.asarray(r.hi)), bad, err_msg=f'{s} {shape} {p}')
                for name, f in quant.items():
                    sc = np.asarray(f(x))
                    np.testing.assert_array_equal(np.isnan(sc), scale_bad, err_msg=f'{name} {shape} {p}')
                    assert np.isfinite(sc[~scale_bad]).all()
                d = np.asarray(qdq(x))
                assert np.isnan(d).sum() == x.size // scale_bad.size * scale_bad.sum(), (shape, p)


# --------------------------------------------------------------------------- FMA-proof asymmetric scale
def test_minmax_scale_is_fusion_independent():
    """Eager, jitted and fake-quant paths compute the asymmetric scale in different fusions; XLA:CPU used to
    contract ``hi*c - lo*c`` into an FMA in some of them (~25k of 131k values differed by an ulp of the scale)."""
    x = jax.random.normal(jax.random.key(0), (256, 512)) * 3
    for name in ('uint4', 'int8', 'uint2'):
        kw = dict(calibration='minmax', tiles=64)
        q = qarray.quantize(x, name, **kw)
        eager = np.asarray(qarray.dequantize(q))
        jitted = np.asarray(jax.jit(lambda v: qarray.dequantize(qarray.quantize(v, name, **kw)))(x))
        fake = np.asarray(qarray.fake_quant(x, name, **kw))
        assert eager.view(np.uint32).tolist() == jitted.view(np.uint32).tolist() == fake.view(np.uint32).tolist()
        js = jax.jit(lambda v: qarray.quantize(v, name, **kw).scale * 1.0)(x)  # the scale inside a larger program
        np.testing.assert_array_equal(np.asarray(js).view(np.uint32), np.asarray(q.scale).view(np.uint32))


def test_asymmetric_raw_scale_is_width_times_inverse_count():
    rng = np.random.default_rng(5)
    lo = (-np.abs(rng.standard_normal(1000)) * 10.0 ** rng.integers(-30, 30, 1000)).astype(np.float32)
    hi = (np.abs(rng.standard_normal(1000)) * 10.0 ** rng.integers(-30, 30, 1000)).astype(np.float32)
    lo[:3], hi[:3] = [-3e38, -1e38, -3.4e38], [3e38, 3.4e38, 1e37]  # hi - lo overflows float32: halves first
    for name in ('uint8', 'uint4', 'uint1'):
        qt = qtypes.get(name)
        qa, qb = qt.asym_range
        with np.errstate(over='ignore'):
            width = hi - lo
            ref = np.where(np.isfinite(width), width * np.float32(1 / (qb - qa)),
                           (hi * np.float32(0.5) - lo * np.float32(0.5)) * np.float32(2 / (qb - qa)))
        f = lambda a, b: _numerics._raw_scale(a, b, False, qt, jnp.float32)[0]
        for got in (f(lo, hi), jax.jit(f)(lo, hi)):
            np.testing.assert_array_equal(np.asarray(got).view(np.uint32), ref.view(np.uint32))
        assert np.isfinite(ref[:3]).all() or name == 'uint1'  # uint1: 2 * float32 max overflows (NaN scale)
