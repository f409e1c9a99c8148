"""Stochastic rounding: unbiased (E[q(x)] = x inside the range) with the Bernoulli variance p(1-p)*step^2,
for every kind of format; reproducible from the key; refused where it does not apply. And the 8-bit
non-linear code books for optimizer states."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qarray
from qarray import qtypes

N = 20000  # draws: the mean is within 5 standard errors of x, i.e. 5*sqrt(var/N)


def _grid_neighbours(qt, y):
    """The two representable code-unit values around y (independent of the library: enumerate the grid)."""
    qt = qtypes.get(qt)
    if qt.kind == 'float':
        grid = np.unique(np.arange(256, dtype=np.uint8).view(qt.native_dtype).astype(np.float64)
                         if qt.bits == 8 else np.array([0, .5, 1, 1.5, 2, 3, 4, 6], np.float64))
        grid = np.unique(np.concatenate([grid, -grid]))
        grid = grid[np.isfinite(grid)]
    elif qt.kind == 'codebook':
        grid = qt.codebook.astype(np.float64)
    else:
        grid = np.arange(qt.qmin, qt.qmax + 1, dtype=np.float64)
    lo = grid[grid <= y].max()
    hi = grid[grid >= y].min()
    return lo, hi


@pytest.mark.parametrize('qt', ['int8', 'int4', 'float8_e4m3fn', 'float8_e5m2', 'float4_e2m1fn', 'nf4', 'dynamic8'])
def test_unbiased_with_bernoulli_variance(qt):
    scale = 0.5
    # a fixed range makes the scale exactly `scale`: x / scale lands between two known grid points
    bound = qtypes.get(qt).calibration_bound
    x = jnp.array([0.37, -1.21, 0.05, 2.6]) * (1.0 if qt not in ('nf4', 'dynamic8') else 0.15)
    cal = f'fixed,{-scale * bound},{scale * bound}'
    keys = jax.random.split(jax.random.key(1), N)
    ys = jax.jit(jax.vmap(lambda k: qarray.dequantize(qarray.quantize(x, qt, calibration=cal, rounding='stochastic',
                                                                      key=k))))(keys)
    ys = np.asarray(ys, np.float64)
    s = float(qarray.quantize(x, qt, calibration=cal).scale.reshape(()))
    for j, xv in enumerate(np.asarray(x, np.float64)):
        lo, hi = _grid_neighbours(qt, xv / s)
        step = (hi - lo) * s
        p = 0.0 if hi == lo else (xv / s - lo) / (hi - lo)
        var = p * (1 - p) * step**2
        assert set(np.unique(ys[:, j])) <= {lo * s, hi * s}
        assert abs(ys[:, j].mean() - xv) <= 5 * np.sqrt(var / N) + 1e-12
        if var > 0:
            assert abs(ys[:, j].var() - var) <= 0.1 * var


def test_same_key_same_codes_and_nearest_is_default():
    x = jax.random.normal(jax.random.key(2), (8, 64))
    a = qarray.quantize(x, 'int4', tiles=32, rounding='stochastic', key=jax.random.key(3))
    b = qarray.quantize(x, 'int4', tiles=32, rounding='stochastic', key=jax.random.key(3))
    c = qarray.quantize(x, 'int4', tiles=32, rounding='stochastic', key=jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(a.qvalue), np.asarray(b.qvalue))
    assert not np.array_equal(np.asarray(a.qvalue), np.asarray(c.qvalue))
    near = qarray.dequantize(qarray.quantize(x, 'int4', tiles=32))
    # stochastic codes are one of the two neighbours: within a whole step, where nearest is within half
    assert float(jnp.max(jnp.abs(qarray.dequantize(a) - x) - 2 * jnp.abs(near - x) - 1e-6)) <= float(a.scale.max())
    fq = qarray.fake_quant(x, 'int4', tiles=32, rounding='stochastic', key=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(fq), np.asarray(qarray.dequantize(a)))


def test_errors():
    x = jnp.ones((4, 32))
    with pytest.raises(ValueError, match='needs key='):
        qarray.quantize(x, 'int8', rounding='stochastic')
    with pytest.raises(ValueError, match="rounding must be 'nearest' or 'stochastic'"):
        qarray.quantize(x, 'int8', rounding='down')
    with pytest.raises(ValueError, match='key is only used with'):
        qarray.quantize(x, 'int8', key=jax.random.key(0))
    with pytest.raises(ValueError, match='microscaling'):
        qarray.quantize(x, 'mxfp4', rounding='stochastic', key=jax.random.key(0))


@pytest.mark.parametrize('name,signed', [('dynamic8', True), ('dynamic8u', False)])
def test_dynamic8_code_books(name, signed):
    cb = qtypes.get(name).codebook
    assert cb.shape == (256,) and np.all(np.diff(cb) > 0) and cb.max() <= 1.0 and (cb.min() < 0) == signed
    # relative precision over many decades: decade 10**-k holds 2**(d-k) levels (d = 6 signed, 7 unsigned), so
    # from 1e-4 up a value is within half the widest gap of its decade: 0.45 / 2**(d-4) relative, at worst
    mags = np.geomspace(1e-4, 0.99, 200)
    x = jnp.asarray(np.concatenate([mags, -mags] if signed else [mags]), jnp.float32)
    y = np.asarray(qarray.dequantize(qarray.quantize(x, name)), np.float64)
    rel = np.abs(y - np.asarray(x, np.float64)) / np.abs(np.asarray(x, np.float64))
    worst = 0.9 / 2 / 2 ** ((6 if signed else 7) - 4) / 0.1
    assert rel.max() <= worst and np.median(rel) < 0.05
