"""QArray, quantize, dequantize, fake_quant: numerics against numpy float64 references, layout,
pytree/transform behaviour, NaN/Inf policy and every error message."""

import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

import qarray
from qarray import _fake_quant, _layout, qtypes
from tolerances import U32, gamma

INTS = [f'int{b}' for b in range(1, 9)]
UINTS = [f'uint{b}' for b in range(1, 9)]
ALL = INTS + UINTS + ['float8_e4m3fn', 'float8_e5m2', 'nf4']
F32_TINY = float(np.finfo(np.float32).tiny)


def default_cal(name):
    return 'minmax' if name.startswith('uint') else 'absmax'


def np_deq(q) -> np.ndarray:
    """float64 reconstruction from the stored codes/scales, computed in numpy."""
    c = np.asarray(qarray.codes(q)).astype(np.float64)
    s = np.asarray(q.scale).astype(np.float64)
    vshape, sshape = _layout.tiled_view(q.shape, q.scale.shape)
    if q.qtype.kind == 'codebook':
        c = q.qtype.codebook.astype(np.float64)[c.astype(int)]
    if q.zero_point is not None:
        c = c.reshape(vshape) - np.asarray(q.zero_point).astype(np.float64).reshape(sshape)
    return (c.reshape(vshape) * s.reshape(sshape)).reshape(q.shape)


def full_scale(q) -> np.ndarray:
    vshape, sshape = _layout.tiled_view(q.shape, q.scale.shape)
    s = np.asarray(q.scale).astype(np.float64).reshape(sshape)
    return np.broadcast_to(s, vshape).reshape(q.shape)


# One shape per test keeps hypothesis from recompiling per example (shapes are covered in test_packing).
arrays_2d = hnp.arrays(np.float32, (3, 16), elements=st.floats(-1e4, 1e4, width=32))


# --------------------------------------------------------------------------- error bounds
@pytest.mark.parametrize('name', INTS)
@given(x=arrays_2d)
def test_absmax_int_error_at_most_half_step(name, x):
    q = qarray.quantize(x, name, channelwise_axes=(0,))
    s = full_scale(q)
    x64 = x.astype(np.float64)
    # int1 is binary: its step is 2*scale, so the bound is one scale.
    half_step = s * qtypes.get(name).step_in_scales / 2
    err = np.abs(np_deq(q) - x64)
    # Plus float32 rounding of the scale and its reciprocal, relative to the value (matters at the extremes,
    # e.g. a constant negative row lands on -(qmax + 1/2) * (1 + eps) and rounds to the code -qmax - 1).
    # (The code is round(x * fl(1 / s)) in float32: 2 roundings of x / s, i.e. <= 2 u |x| off; 8 u |x| is safe.)
    assert np.all(err <= half_step + 4 * np.finfo(np.float32).eps * np.abs(x64) + 1e-30), (err / s).max()
    # The library's float32 output is that reconstruction rounded once: relative u = 6e-8 <= 1e-7.
    np.testing.assert_allclose(np.asarray(qarray.dequantize(q), np.float64), np_deq(q), rtol=1e-7, atol=0)
    # Independent scale: absmax / (qmax + half step), in float32 as numpy computes it.
    absmax = np.abs(x).max(axis=1, keepdims=True)
    bound = qtypes.get(name).qmax + qtypes.get(name).step_in_scales / 2
    ref_scale = np.maximum(np.float32(absmax) * np.float32(1 / bound), np.float32(F32_TINY))
    np.testing.assert_array_equal(np.asarray(q.scale), ref_scale)


@pytest.mark.parametrize('name', INTS)
@pytest.mark.parametrize('jit', [False, True])
def test_absmax_int_codes_match_numpy_reference(name, jit):
    qt = qtypes.get(name)
    x = np.random.default_rng(qt.bits).standard_t(3, size=(8, 64)).astype(np.float32)
    quantize = lambda v: qarray.quantize(v, name, tiles=16)
    q = (jax.jit(quantize) if jit else quantize)(x)  # inside a user's jit too
    xv = x.reshape(8, 4, 16)
    s = np.float32(np.abs(xv).max(-1, keepdims=True)) * np.float32(1 / qt.calibration_bound)
    y = xv * (np.float32(1) / s)  # float32, as documented in _numerics.to_codes
    if qt.bits == 1:
        ref = np.where(y >= 0, 1, -1)
    else:
        ref = np.clip(np.rint(y), -qt.qmax - 1, qt.qmax)  # np.rint: half to even; full two's-complement range
    np.testing.assert_array_equal(np.asarray(qarray.codes(q)), ref.reshape(8, 64))
    np.testing.assert_array_equal(np.asarray(q.scale), s.reshape(8, 4))


def test_round_half_to_even_and_explicit_clipping():
    x = jnp.array([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 300.0, -300.0]])
    c = qarray.codes(qarray.quantize_with_scale(x, 'int8', jnp.ones((1, 1))))
    assert c.tolist() == [[0, 2, 2, 0, -2, -2, 127, -128]]
    c = qarray.codes(qarray.quantize_with_scale(x, 'int4', jnp.ones((1, 1))))
    assert c.tolist() == [[0, 2, 2, 0, -2, -2, 7, -8]]
    c = qarray.codes(qarray.quantize_with_scale(x, 'int4_narrow', jnp.ones((1, 1))))
    assert c.tolist() == [[0, 2, 2, 0, -2, -2, 7, -7]]
    # A group's negative extreme sits at -(qmax + 1/2) steps and rounds (half to even) to the extra code.
    assert qarray.codes(qarray.quantize(jnp.array([-7.5, 1.0, 3.0]), 'int4')).tolist() == [-8, 1, 3]
    # With a zero point the full two's-complement range is used too.
    c = qarray.codes(qarray.quantize_with_scale(x, 'int4', jnp.ones((1, 1)), jnp.zeros((1, 1))))
    assert c.tolist() == [[0, 2, 2, 0, -2, -2, 7, -8]]
    c = qarray.codes(qarray.quantize_with_scale(x, 'uint4', jnp.ones((1, 1)), jnp.full((1, 1), 3)))
    assert c.tolist() == [[3, 5, 5, 3, 1, 1, 15, 0]]


def test_int1_is_binary():
    x = jnp.array([[-3.0, -0.1, 0.0, 0.2, 2.0]])
    q = qarray.quantize(x, 'int1')
    assert qarray.codes(q).tolist() == [[-1, -1, 1, 1, 1]]
    assert float(q.scale[0, 0]) == 1.5  # absmax / 2: every value within one scale of ±scale
    assert qarray.dequantize(q).tolist() == [[-1.5, -1.5, 1.5, 1.5, 1.5]]


@given(x=arrays_2d)
def test_nf4_error_is_distance_to_nearest_code(x):
    q = qarray.quantize(x, 'nf4', channelwise_axes=(0,))
    s = full_scale(q)
    cb = qtypes.get('nf4').codebook.astype(np.float64)
    x64 = x.astype(np.float64)
    nearest = np.abs(x64[..., None] / s[..., None] - cb).min(-1) * s
    deq = np.asarray(qarray.dequantize(q), np.float64)
    err = np.abs(deq - x64)
    # The float32 x * fl(1 / s) is within 2 u |x| / s of x / s, so at a near-tie the other level may win (its
    # distance is within 4 u |x| of the nearest); the output is one float32 product (u |deq|).
    assert np.all(np.abs(err - nearest) <= 4 * U32 * np.abs(x64) + U32 * np.abs(deq) + F32_TINY)
    np.testing.assert_array_equal(np.asarray(q.scale), np.maximum(np.abs(x).max(1, keepdims=True), F32_TINY))


@pytest.mark.parametrize('name', ['float8_e4m3fn', 'float8_e5m2'])
def test_fp8_codes_equal_ml_dtypes_rounding(name):
    dt = {'float8_e4m3fn': ml_dtypes.float8_e4m3fn, 'float8_e5m2': ml_dtypes.float8_e5m2}[name]
    fmax = float(ml_dtypes.finfo(dt).max)
    rng = np.random.default_rng(0)
    x = (rng.standard_t(2, size=(16, 128)) * 10.0 ** rng.integers(-6, 6, size=(16, 1))).astype(np.float32)
    q = qarray.quantize(x, name, channelwise_axes=(0,))
    s = np.float32(np.abs(x).max(1, keepdims=True)) * np.float32(1 / fmax)
    np.testing.assert_array_equal(np.asarray(q.scale), s)
    y = np.clip(x * (np.float32(1) / s), -fmax, fmax)
    ref = y.astype(dt)  # ml_dtypes' own float32 -> fp8 rounding (round to nearest even)
    codes = np.asarray(qarray.codes(q))
    assert codes.dtype == dt
    np.testing.assert_array_equal(codes.view(np.uint8), ref.view(np.uint8))
    # Saturation: values far beyond the range become ±max, never inf/NaN.
    big = qarray.quantize_with_scale(jnp.array([[1e30, -1e30, 3e38, fmax * 1.1]]), name, jnp.ones((1, 1)))
    assert np.asarray(qarray.codes(big)).astype(np.float32).tolist() == [[fmax, -fmax, fmax, fmax]]


@pytest.mark.parametrize('name', UINTS + ['int2', 'int5', 'int8'])
@given(x=arrays_2d, data=st.data())
def test_minmax_represents_zero_exactly(name, x, data):
    x = x.copy()
    x[data.draw(st.integers(0, x.shape[0] - 1)), data.draw(st.integers(0, x.shape[1] - 1))] = 0.0
    x = x + np.float32(data.draw(st.sampled_from([0.0, 50.0, -50.0])))  # one-sided ranges too
    x[0, 0] = 0.0
    q = qarray.quantize(x, name, channelwise_axes=(0,), calibration='minmax')
    deq = np.asarray(qarray.dequantize(q))
    assert np.all(deq[x == 0] == 0.0)
    err = np.abs(np_deq(q) - x.astype(np.float64))
    s = full_scale(q)
    assert np.all(err <= s / 2 + 4 * np.finfo(np.float32).eps * np.abs(x) + 1e-30)  # + the float32 x / s


def test_mse_never_worse_than_absmax_on_heavy_tails():
    x = np.random.default_rng(1).standard_t(2, size=(8, 256)).astype(np.float32)
    for name in ('int4', 'int3', 'nf4'):
        errs = {}
        for cal in ('absmax', 'mse'):
            d = np.asarray(qarray.dequantize(qarray.quantize(x, name, tiles=64, calibration=cal)), np.float64)
            errs[cal] = np.square(d - x).reshape(8, 4, 64).sum(-1)  # per tile
        # mse compares the candidates' errors in float32 (64 squares summed: gamma_66 relative, all terms
        # positive); recomputed in float64 they can swap order by twice that.
        assert np.all(errs['mse'] <= errs['absmax'] * (1 + 2 * gamma(66))), name
        assert errs['mse'].sum() < errs['absmax'].sum(), name


# --------------------------------------------------------------------------- zeros, extremes
@pytest.mark.parametrize('name, cals', [(n, [default_cal(n)]) for n in ALL] +
                         [('int4', ['minmax', 'rms', 'mse', 'percentile,90']), ('nf4', ['mse'])])
def test_zero_tile_dequantizes_to_exact_zeros(name, cals):
    x = np.random.default_rng(0).normal(size=(4, 32)).astype(np.float32)
    x[1] = 0.0
    x[2, :8] = 0.0
    for cal in cals:
        q = qarray.quantize(x, name, tiles=8, calibration=cal)
        s = np.asarray(q.scale)
        assert np.all(np.isfinite(s)) and np.all(s > 0)
        deq = np.asarray(qarray.dequantize(q))
        if name != 'int1':  # int1 has no zero level
            assert np.all(deq[1] == 0.0) and np.all(deq[2, :8] == 0.0), cal


@pytest.mark.parametrize('name', ['int8', 'int3', 'int1', 'uint4', 'fp8', 'nf4'])
@pytest.mark.parametrize('x_dtype, scale_dtype', [(jnp.float32, None), (jnp.float32, jnp.bfloat16),
                                                  (jnp.bfloat16, None), (jnp.float16, None)])
def test_extreme_magnitudes_give_finite_positive_scales(name, x_dtype, scale_dtype):
    info = jnp.finfo(x_dtype)
    mags = [1e-40, 1e-39, 1e-30, 1e30, 1e38, 3.3e38]
    rows = [[m * v for v in (1.0, -0.5, 0.25, 0.0)] for m in mags] + [[float(info.tiny), 0, 0, 0]]
    if jnp.dtype(x_dtype).itemsize < 4 and not name.startswith('uint'):
        rows.append([float(info.max), -float(info.max), 1, 0])  # output clips to the dtype's range
    x = jnp.asarray(np.clip(np.array(rows), -float(info.max), float(info.max)), x_dtype)
    q = qarray.quantize(x, name, channelwise_axes=(0,), scale_dtype=scale_dtype,
                        calibration=default_cal(name))
    sdt = jnp.dtype(scale_dtype or x_dtype)
    s = np.asarray(q.scale).astype(np.float64)
    assert q.scale.dtype == sdt
    assert np.all(np.isfinite(s)) and np.all(s >= float(jnp.finfo(sdt).tiny)), s.ravel()
    deq = np.asarray(qarray.dequantize(q), np.float64)
    assert np.all(np.isfinite(deq))
    # Within the step bound wherever the scale dtype can hold the range (it saturates beyond).
    qt = qtypes.get(name)
    if qt.is_integer:
        x64 = np.asarray(x, np.float64)
        fits = (np.abs(x64).max(1) / qt.calibration_bound * 1.01 < float(jnp.finfo(sdt).max))
        # + tiny: XLA flushes subnormal inputs to zero, so they may be off by their own size. Codes use the
        # stored (rounded) scale; the float32 x * fl(1 / s) adds <= 2 u |x| (8 u |x| is safe).
        bound = full_scale(q) * qt.step_in_scales / 2 + 8 * U32 * np.abs(x64) + float(info.tiny)
        assert np.all((np.abs(np_deq(q) - x64) <= bound)[fits])  # before rounding to the output dtype


# --------------------------------------------------------------------------- NaN / Inf policy
@pytest.mark.parametrize('cal', ['absmax', 'minmax', 'rms', 'rms,2', 'percentile,50', 'fixed,-1,1',
                                 'fixed,-1,3', 'mse'])
@pytest.mark.parametrize('jit', [False, True])
def test_nonfinite_group_dequantizes_to_nan(cal, jit):
    name = 'uint4' if cal in ('minmax', 'fixed,-1,3') else 'int4'
    f = lambda v: qarray.dequantize(qarray.quantize(v, name, channelwise_axes=(0,), calibration=cal))
    f = jax.jit(f) if jit else f
    for bad in (np.nan, np.inf, -np.inf):
        x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
        x[1, 3] = bad
        deq = np.asarray(f(x))
        assert np.all(np.isnan(deq[1]))
        assert np.all(np.isfinite(deq[[0, 2]]))


@pytest.mark.parametrize('cal', ['absmax', 'minmax', 'rms', 'mse'])
def test_nonfinite_group_is_nan_on_large_groups(cal):
    # XLA's vectorised CPU max drops NaN on larger arrays; the policy must not depend on it.
    x = np.random.default_rng(1).normal(size=(128, 256)).astype(np.float32)
    x[5, 7] = np.nan
    name = 'uint4' if cal == 'minmax' else 'int4'
    q = qarray.quantize(x.T, name, tiles=64, calibration=cal)  # groups of 64 along the rows of x
    scale = np.asarray(q.scale)
    assert np.isnan(scale[7, 0]) and np.isnan(scale).sum() == 1
    deq = np.asarray(qarray.dequantize(q))
    assert np.all(np.isnan(deq[7, :64])) and np.isfinite(np.delete(deq, 7, axis=0)).all()


def test_check_finite_raises_eagerly_and_under_jit():
    x = jnp.array([1.0, jnp.nan])
    with pytest.raises(ValueError, match='x contains NaN or Inf and check_finite=True'):
        qarray.quantize(x, 'int8', check_finite=True)
    with pytest.raises(ValueError, match='check_finite=True'):
        qarray.quantize(jnp.array([jnp.inf]), 'nf4', check_finite=True)
    qarray.quantize(jnp.ones(3), 'int8', check_finite=True)  # finite input passes
    jf = jax.jit(lambda v: qarray.quantize(v, 'int8', check_finite=True).scale)
    jf(jnp.ones(2)).block_until_ready()
    # Under jit the check runs on the host at run time; JAX re-raises it as a runtime error.
    with pytest.raises(Exception, match='x contains NaN or Inf and check_finite=True'):
        jf(x).block_until_ready()


# --------------------------------------------------------------------------- layouts
@pytest.mark.parametrize('kw, scale_shape, tiles, cw', [
    (dict(), (1, 1, 1), {}, ()),
    (dict(channelwise_axes=(0,)), (4, 1, 1), {}, (0,)),
    (dict(channelwise_axes=-1), (1, 1, 32), {}, (2,)),
    (dict(channelwise_axes=(0, 2)), (4, 1, 32), {}, (0, 2)),
    (dict(tiles=8), (4, 6, 4), {2: 8}, (0, 1)),
    (dict(tiles={0: 2}), (2, 1, 1), {0: 2}, ()),
    (dict(tiles={0: 2, 2: 16}), (2, 1, 2), {0: 2, 2: 16}, ()),  # 2-D tiles
    (dict(tiles={2: 16}, channelwise_axes=(1,)), (1, 6, 2), {2: 16}, (1,)),
    (dict(tiles={1: 3}, channelwise_axes=(0, 2)), (4, 2, 32), {1: 3}, (0, 2)),
])
def test_scale_shapes(kw, scale_shape, tiles, cw):
    for name in ['int4', 'uint3'] if 'tiles' in kw else ['int4']:  # zero points: tiled layouts suffice
        _check_scale_shape(name, kw, scale_shape, tiles, cw)


def _check_scale_shape(name, kw, scale_shape, tiles, cw):
    x = jax.random.normal(jax.random.key(0), (4, 6, 32))
    q = qarray.quantize(x, name, calibration=default_cal(name), **kw)
    assert q.scale.shape == scale_shape
    assert q.tiles == tiles and q.channelwise_axes == cw
    assert q.shape == x.shape and q.ndim == 3 and q.size == x.size
    if q.zero_point is not None:
        assert q.zero_point.shape == scale_shape
    # Each scale is the calibration of exactly its group: check against numpy absmax/minmax.
    vshape, sshape = _layout.tiled_view(x.shape, scale_shape)
    reduce = tuple(i for i, (a, b) in enumerate(zip(vshape, sshape)) if b == 1)
    xv = np.asarray(x).reshape(vshape)
    qt = qtypes.get(name)
    if name.startswith('uint'):
        lo = np.minimum(xv.min(reduce, keepdims=True), 0)
        hi = np.maximum(xv.max(reduce, keepdims=True), 0)
        ref = (hi - lo) / (qt.asym_range[1] - qt.asym_range[0])
    else:
        ref = np.abs(xv).max(reduce, keepdims=True) / qt.calibration_bound
    # absmax * fl(1 / bound) vs numpy's float32 absmax / bound (minmax: (hi - lo) scaled, lo <= 0 <= hi so no
    # cancellation): <= 5 roundings, 3e-7 < 1e-6.
    np.testing.assert_allclose(np.asarray(q.scale).reshape(sshape), ref, rtol=1e-6)


def test_pack_axis():
    x = jax.random.normal(jax.random.key(1), (10, 3))
    q = qarray.quantize(x, 'int3', pack_axis=0)
    assert q.packed_axis == -2 and q.qvalue.shape == (4, 3) and q.shape == (10, 3)
    chex.assert_trees_all_equal(qarray.dequantize(q), qarray.dequantize(qarray.quantize(x, 'int3')))


# --------------------------------------------------------------------------- transforms
def test_vmap_quantize_matches_per_slice():
    x = jax.random.normal(jax.random.key(3), (3, 4, 16))
    qb = jax.vmap(lambda v: qarray.quantize(v, 'int3', tiles=8))(x)
    assert qb.shape == (3, 4, 16) and qb.scale.shape == (3, 4, 2) and qb.packed_axis == -1
    deq = jax.vmap(qarray.dequantize)(qb)
    for i in range(3):
        chex.assert_trees_all_equal(deq[i], qarray.dequantize(qarray.quantize(x[i], 'int3', tiles=8)))
    chex.assert_trees_all_equal(qarray.dequantize(qb), deq)


def test_pytree_flatten_unflatten_tree_map_and_eval_shape():
    x = jax.random.normal(jax.random.key(4), (4, 16))
    q = qarray.quantize(x, 'uint4', tiles=8, calibration='minmax')
    leaves, treedef = jax.tree.flatten(q)
    assert len(leaves) == 3
    q2 = jax.tree.unflatten(treedef, leaves)
    chex.assert_trees_all_equal(q, q2)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(q)[0]]
    assert paths == ['.qvalue', '.scale', '.zero_point']
    q3 = jax.tree.map(lambda a: a + 0, q)
    assert isinstance(q3, qarray.QArray) and q3.qtype == q.qtype and q3.packed_length == 16
    assert len(jax.tree.leaves(qarray.quantize(x, 'int8'))) == 2  # no zero point leaf
    abstract = jax.eval_shape(lambda v: qarray.quantize(v, 'nf4', tiles=8), x)
    assert isinstance(abstract, qarray.QArray) and abstract.shape == (4, 16)
    assert abstract.qvalue.shape == (4, 8) and abstract.scale.shape == (4, 2)
    assert 'nf4' in repr(abstract) and abstract.nbytes == 4 * 8 + 4 * 2 * 4


def test_nnx_module_data():
    from flax import nnx

    class Layer(nnx.Module):
        def __init__(self, w):
            self.w = nnx.Param(qarray.quantize(w, 'int4', tiles=8))
            self.v = nnx.Variable(qarray.quantize(w, 'nf4', tiles=8))

        def __call__(self, x):
            return x @ qarray.dequantize(self.w.get_value()) + x @ qarray.dequantize(self.v.get_value())

    w = jax.random.normal(jax.random.key(5), (16, 8))
    m = Layer(w)
    x = jnp.ones((2, 16))
    y = m(x)
    graphdef, state = nnx.split(m)
    m2 = nnx.merge(graphdef, state)
    chex.assert_trees_all_equal(m2(x), y)
    st_ = nnx.state(m, nnx.Param)
    assert isinstance(jax.tree.leaves(st_, is_leaf=lambda l: isinstance(l, qarray.QArray))[0], qarray.QArray)
    chex.assert_trees_all_equal(nnx.jit(lambda mod, v: mod(v))(m, x), y)
    params = nnx.state(m, nnx.Param)
    assert {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]} >= {
        "['w'].qvalue" if False else jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(params)[0][0][0])}


def test_repr_and_nbytes():
    q = qarray.quantize(jnp.ones((8, 256)), 'int3', tiles=128)
    r = repr(q)
    for part in ('int3', 'shape=(8, 256)', 'tiles={1: 128}', f'stored={q.nbytes} B'):
        assert part in r, r
    assert q.nbytes == 8 * 96 + 8 * 2 * 4 == q.qvalue.nbytes + q.scale.nbytes
    qz = qarray.quantize(jnp.ones((8, 256)), 'uint4', tiles=128, calibration='minmax')
    assert qz.nbytes == 8 * 128 + 8 * 2 * 4 + 8 * 2 * 1 and 'zero_point' in repr(qz)


def test_transpose_and_T():
    x = jax.random.normal(jax.random.key(6), (4, 6, 8))
    q = qarray.quantize(x, 'int3', tiles={2: 4}, channelwise_axes=(0,))
    for axes in [(1, 0, 2), (0, 2, 1)]:
        t = q.transpose(axes)
        assert t.shape == tuple(x.shape[a] for a in axes)
        chex.assert_trees_all_equal(qarray.dequantize(t), jnp.transpose(qarray.dequantize(q), axes))
    chex.assert_trees_all_equal(qarray.dequantize(q.T), qarray.dequantize(q).T)
    chex.assert_trees_all_equal(qarray.dequantize(q.transpose(1, 0, 2)),
                                jnp.transpose(qarray.dequantize(q), (1, 0, 2)))
    with pytest.raises(ValueError, match=r'transpose axes must be a permutation of 0\.\.2; got \(0, 0, 1\)'):
        q.transpose(0, 0, 1)


@pytest.mark.parametrize('name, kw, new_shape', [
    ('int8', dict(channelwise_axes=(1,)), (2, 2, 6)),
    ('int8', dict(channelwise_axes=(0, 1)), (24,)),
    ('int8', dict(tiles={0: 2}), (2, 2, 6)),
    ('int8', dict(tiles={1: 3}), (4, 2, 3)),
    ('int4', dict(channelwise_axes=(0,)), (2, 2, 6)),
    ('int4', dict(tiles=3), (2, 2, 6)),
    ('int8', dict(), (-1,)),
])
def test_reshape_where_layout_allows(name, kw, new_shape):
    x = jax.random.normal(jax.random.key(7), (4, 6))
    q = qarray.quantize(x, name, **kw)
    r = q.reshape(new_shape)
    chex.assert_trees_all_equal(qarray.dequantize(r), qarray.dequantize(q).reshape(new_shape))


def test_reshape_errors():
    x = jax.random.normal(jax.random.key(7), (4, 6))
    with pytest.raises(ValueError, match='the packed axis 1 would change'):
        qarray.quantize(x, 'int4').reshape(24)
    with pytest.raises(ValueError, match=r'scales of shape \(4, 1\) do not form channels/tiles'):
        qarray.quantize(x, 'int8', channelwise_axes=(0,)).reshape(6, 4)
    with pytest.raises(ValueError, match='at most one -1 allowed'):
        qarray.quantize(x, 'int8').reshape(-1, -1)
    with pytest.raises(ValueError, match=r'cannot reshape QArray of shape \(4, 6\) into \(5, 5\)'):
        qarray.quantize(x, 'int8').reshape(5, 5)


def test_jnp_functions_accept_qarray():
    x = jax.random.normal(jax.random.key(8), (4, 8))
    q = qarray.quantize(x, 'int4', tiles=4)
    d = qarray.dequantize(q)
    # fused reduction order may differ: two float32 sums of 32 values, 2 gamma_31 sum |d|
    chex.assert_trees_all_close(jnp.sum(q), jnp.sum(d), atol=2 * gamma(31) * float(jnp.sum(jnp.abs(d))))
    chex.assert_trees_all_equal(jnp.tanh(q), jnp.tanh(d))
    chex.assert_trees_all_equal(jnp.asarray(q), d)
    chex.assert_trees_all_equal(q + 1.0, d + 1.0)
    chex.assert_trees_all_equal(2.0 * q, 2.0 * d)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(d))
    assert q.astype(jnp.bfloat16).dtype == jnp.bfloat16 and len(q) == 4


def test_bf16_input_keeps_dtype_and_bound():
    x = (jax.random.normal(jax.random.key(9), (4, 64)) * 5).astype(jnp.bfloat16)
    q = qarray.quantize(x, 'int4', tiles=32)
    assert q.dtype == jnp.bfloat16 and q.scale.dtype == jnp.bfloat16
    assert qarray.dequantize(q).dtype == jnp.bfloat16
    err = np.abs(np_deq(q) - np.asarray(x, np.float64))
    assert np.all(err <= full_scale(q) / 2 + 8 * U32 * np.abs(np.asarray(x, np.float64)))  # + the float32 x / s


# --------------------------------------------------------------------------- fake quant
FQ = [('int8', dict(channelwise_axes=(1,))), ('int4', dict(tiles=8)), ('uint3', dict(calibration='minmax')),
      ('nf4', dict(tiles=16)), ('fp8', dict()), ('int2', dict(calibration='fixed,-1,1')),
      ('uint4', dict(calibration='fixed,-1,3')), ('int1', dict()), ('int5', dict(calibration='mse')),
      ('int8', dict(calibration='percentile,90'))]


@pytest.mark.parametrize('name, kw, dtype', [c + (jnp.float32,) for c in FQ] +
                         [c + (jnp.bfloat16,) for c in FQ[1:3]])
def test_fake_quant_forward_is_bit_exact(name, kw, dtype):
    x = (jax.random.normal(jax.random.key(10), (4, 32)) * 1.5).astype(dtype)
    y = qarray.fake_quant(x, name, **kw)
    assert y.dtype == dtype
    chex.assert_trees_all_equal(y, qarray.dequantize(qarray.quantize(x, name, **kw)))


def np_pass_mask(x, name, lo, hi):
    """Reference STE mask for a per-tensor 'fixed,lo,hi' range, from the math in numpy float64."""
    qt = qtypes.get(name)
    if lo == -hi and qt.kind != 'uint':
        s = np.float32(hi) * np.float32(1 / qt.calibration_bound)
        half = qt.step_in_scales / 2 if qt.is_integer else 0
        r = (qt.qmax + half) * np.float64(s)
        low = (-qt.qmin + half) * np.float64(s)  # signed ints reach one code further down: -qmax - 1
        return (x >= -low) & (x <= r)
    qa, qb = qt.asym_range
    c = np.float32(1 / (qb - qa))
    s = np.float32(hi) * c - np.float32(lo) * c
    zp = np.clip(np.rint(qa - lo / np.float64(s)), qa, qb)
    return (x >= (qa - 0.5 - zp) * np.float64(s)) & (x <= (qb + 0.5 - zp) * np.float64(s))


@pytest.mark.parametrize('name, lo, hi', [('int8', -1, 1), ('int4', -1, 1), ('int3', -2, 2), ('int1', -1, 1),
                                          ('uint4', -1, 3), ('uint8', -0.5, 2), ('int4', -1, 2),
                                          ('fp8', -1, 1), ('nf4', -1, 1)])
def test_fake_quant_gradient_mask(name, lo, hi):
    x = np.linspace(-4, 4, 203).astype(np.float32)  # avoids landing exactly on a boundary
    cal = f'fixed,{lo},{hi}'
    g = jax.grad(lambda v: jnp.sum(qarray.fake_quant(v, name, calibration=cal) * 3.0))(jnp.asarray(x))
    mask = np_pass_mask(x.astype(np.float64), name, lo, hi)
    assert 0 < mask.sum() < x.size
    np.testing.assert_array_equal(np.asarray(g), np.where(mask, 3.0, 0.0))
    if name not in ('int4', 'uint4'):
        return
    gp = jax.grad(lambda v: jnp.sum(qarray.fake_quant(v, name, calibration=cal, ste='plain') * 3.0))(x)
    np.testing.assert_array_equal(np.asarray(gp), np.full_like(x, 3.0))


def test_fake_quant_absmax_passes_every_gradient():
    x = jax.random.normal(jax.random.key(11), (4, 32))
    for name in ('int4', 'int1', 'nf4', 'fp8'):
        g = jax.grad(lambda v: qarray.fake_quant(v, name, tiles=8).sum())(x)
        np.testing.assert_array_equal(np.asarray(g), 1.0)


# --------------------------------------------------------------------------- errors
def test_error_messages():
    x = jnp.ones((4, 6))
    cases = [
        (TypeError, 'x must be a floating-point array; got dtype int32', lambda: qarray.quantize(jnp.ones(3, int), 'int8')),
        (TypeError, 'x is already a QArray', lambda: qarray.quantize(qarray.quantize(x, 'int8'), 'int8')),
        (ValueError, r'Unknown qtype .*valid qtypes are', lambda: qarray.quantize(x, 'int12')),
        (ValueError, r'axis 1 is both in channelwise_axes and tiles',
         lambda: qarray.quantize(jnp.ones((4, 8)), 'int4', channelwise_axes=(1,), tiles=4)),
        (ValueError, r'tiles\[0\] must be a positive int; got 0', lambda: qarray.quantize(x, 'int8', tiles={0: 0})),
        (ValueError, r'tiles\[0\] must be a positive int; got 2.0', lambda: qarray.quantize(x, 'int8', tiles={0: 2.0})),
        (TypeError, r'tiles must be None, an int .* or a dict \{axis: tile\}; got', lambda: qarray.quantize(x, 'int8', tiles=[2])),
        (ValueError, 'tiles axis 5 is out of range for an array with 2 dims', lambda: qarray.quantize(x, 'int8', tiles={5: 2})),
        (ValueError, 'channelwise_axes axis 2 is out of range for an array with 2 dims',
         lambda: qarray.quantize(x, 'int8', channelwise_axes=(2,))),
        (TypeError, 'channelwise_axes must be an int or a sequence of ints', lambda: qarray.quantize(x, 'int8', channelwise_axes=1.5)),
        (ValueError, 'axis 0 is both in channelwise_axes and tiles', lambda: qarray.quantize(x, 'int8', channelwise_axes=0, tiles={0: 2})),
        (ValueError, 'tiles needs an array with at least one axis', lambda: qarray.quantize(jnp.float32(1), 'int8', tiles=2)),
        (TypeError, 'scale_dtype must be a floating dtype', lambda: qarray.quantize(x, 'int8', scale_dtype=jnp.int32)),
        (ValueError, r'pack_axis=2 is out of range for an array with 2 dims; use an int in \[-2, 1\]',
         lambda: qarray.quantize(x, 'int4', pack_axis=2)),
        (ValueError, "qtype 'int4' is bit-packed and needs an array with at least one axis",
         lambda: qarray.quantize(jnp.float32(1), 'int4')),
        (ValueError, r"Unknown calibration 'maxabs'; valid methods are: absmax, minmax",
         lambda: qarray.quantize(x, 'int8', calibration='maxabs')),
        (ValueError, "qtype 'int1' has no zero level", lambda: qarray.quantize(x, 'int1', calibration='minmax')),
        (ValueError, "qtype 'float8_e4m3fn' has no zero point", lambda: qarray.quantize(x, 'fp8', calibration='minmax')),
        (ValueError, "qtype 'nf4' has no zero point", lambda: qarray.quantize(x, 'nf4', calibration='fixed,-1,2')),
        (ValueError, r'scale of shape \(3, 1\) does not fit x of shape \(4, 6\)',
         lambda: qarray.quantize_with_scale(x, 'int8', jnp.ones((3, 1)))),
        (ValueError, r'scale of shape \(4,\) does not fit x of shape \(4, 6\)',
         lambda: qarray.quantize_with_scale(x, 'int8', jnp.ones((4,)))),
        (ValueError, "qtype 'uint4' is unsigned and needs a zero_point",
         lambda: qarray.quantize_with_scale(x, 'uint4', jnp.ones((1, 1)))),
        (ValueError, "qtype 'float8_e4m3fn' has no zero point",
         lambda: qarray.quantize_with_scale(x, 'fp8', jnp.ones((1, 1)), jnp.zeros((1, 1)))),
        (TypeError, 'dequantize expects a QArray; got ArrayImpl', lambda: qarray.dequantize(x)),
        (ValueError, "ste must be 'clipped' or 'plain'; got 'none'", lambda: qarray.fake_quant(x, 'int8', ste='none')),
        (TypeError, 'scale_dtype must be a floating dtype', lambda: qarray.fake_quant(x, 'int8', scale_dtype=jnp.int8)),
        (ValueError, 'packed_axis and packed_length must be given together',
         lambda: qarray.QArray(x, x, qtype='int4', packed_axis=-1)),
        (ValueError, 'packed_axis is counted from the end and must be negative; got 1',
         lambda: qarray.QArray(x, x, qtype='int4', packed_axis=1, packed_length=6)),
    ]
    for exc, msg, fn in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_representable_range():
    lo, hi = _fake_quant.representable_range(jnp.array(0.5), None, 'int8')
    assert (float(lo), float(hi)) == (-64.25, 63.75)  # codes -128..127, each +-half a step
    lo, hi = _fake_quant.representable_range(jnp.array(0.5), None, 'int8_narrow')
    assert (float(lo), float(hi)) == (-63.75, 63.75)
    lo, hi = _fake_quant.representable_range(jnp.array(1.0), jnp.array(3, jnp.uint8), 'uint4')
    assert (float(lo), float(hi)) == (-3.5, 12.5)
    lo, hi = _fake_quant.representable_range(jnp.array(2.0), None, 'fp8')
    assert (float(lo), float(hi)) == (-896.0, 896.0)
    lo, hi = _fake_quant.representable_range(jnp.array(2.0), None, 'int1')
    assert (float(lo), float(hi)) == (-4.0, 4.0)
