"""Inputs at the edges: values near the float limits, float64, size 0, and arguments that must be refused.

Each case was once a silently wrong answer (or an unreadable error); each now either computes a finite
result within the format's error bound or raises an error that names the argument.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qarray

F32_MAX = float(np.finfo(np.float32).max)


def half_step_bound(q):
    """Per-element bound for symmetric int formats: half a step = scale / 2 (broadcast to q's shape)."""
    from qarray._layout import tiled_view
    vshape, sshape = tiled_view(q.shape, q.scale.shape)
    s = np.asarray(q.scale, np.float64).reshape(sshape)
    return np.broadcast_to(s / 2, vshape).reshape(q.shape)


# ------------------------------------------------------------------------------------------ float limits
def test_extra_negative_code_at_float32_max_stays_finite():
    """-3.4e38 lands on int8's extra code -128 (or -127): -128 * scale overflows float32; it must not be -inf."""
    x = jnp.array([[-3.4e38, 1.0], [3.4e38, -F32_MAX]], jnp.float32)
    q = qarray.quantize(x, 'int8', channelwise_axes=(0,))
    y = np.asarray(qarray.dequantize(q), np.float64)
    assert np.all(np.isfinite(y))
    assert np.all(np.abs(y - np.asarray(x, np.float64)) <= half_step_bound(q) * (1 + 2**-20))


def test_range_needing_a_scale_past_float32_raises_eagerly_and_is_nan_under_jit():
    x = jnp.array([-1.8e38, 1.8e38])  # uint1 with a zero level: the scale would be 3.6e38 > float32 max
    with pytest.raises(ValueError, match=r"needs a scale larger than float32 can hold.*'uint1'"):
        qarray.quantize(x, 'uint1', calibration='minmax')
    # Under jit no Python error is possible: documented, the group gets a NaN scale (loud, never finite garbage).
    y = jax.jit(lambda v: qarray.dequantize(qarray.quantize(v, 'uint1', calibration='minmax')))(x)
    assert np.all(np.isnan(np.asarray(y)))


def test_narrow_scale_dtype_that_would_saturate_raises():
    with pytest.raises(ValueError, match='float16 can hold'):
        qarray.quantize(jnp.array([1e38, 1.0]), 'int8', scale_dtype=jnp.float16)
    q = qarray.quantize(jnp.array([6e4, 1.0]), 'int8', scale_dtype=jnp.float16)  # fits: fine
    assert q.scale.dtype == jnp.float16


def test_float64_data_is_quantized_in_float64():
    """Beyond float32's range and below its normal range: computed in float64, not flushed to inf/0."""
    with jax.enable_x64(True):
        for x in (np.array([1e300, -2e300, 3.0]), np.array([1e-40, -3e-41, 2e-40])):
            q = qarray.quantize(jnp.asarray(x, jnp.float64), 'int8')
            assert q.scale.dtype == jnp.float64
            y = np.asarray(qarray.dequantize(q))
            assert y.dtype == np.float64 and np.all(np.isfinite(y))
            assert np.all(np.abs(y - x) <= half_step_bound(q) * (1 + 2**-40))
            assert np.any(y != 0)


# ------------------------------------------------------------------------------------------ size 0, rank 0
@pytest.mark.parametrize('qtype,kw', [('int8', {}), ('int4', dict(channelwise_axes=(1,))),
                                      ('uint4', dict(calibration='minmax', tiles=2)), ('nf4', dict(tiles=2)),
                                      ('float8_e4m3fn', {})])
def test_size_zero_arrays(qtype, kw):
    x = jnp.zeros((0, 4), jnp.float32)
    q = qarray.quantize(x, qtype, **kw)
    assert q.shape == (0, 4) and qarray.dequantize(q).shape == (0, 4)
    assert q.nbytes == sum(a.nbytes for a in (q.qvalue, q.scale, q.zero_point) if a is not None)
    assert qarray.fake_quant(x, qtype, **kw).shape == (0, 4)


def test_len_of_rank0_qarray():
    q = qarray.quantize(jnp.float32(2.0), 'int8')
    with pytest.raises(TypeError, match='rank-0 QArray'):
        len(q)
    assert float(qarray.dequantize(q)) == pytest.approx(2.0, rel=1 / 127.5)


# ------------------------------------------------------------------------------------------ refused arguments
X = jnp.ones((4, 6))


@pytest.mark.parametrize('exc,msg,fn', [
    (TypeError, 'channelwise_axes must be an int or a sequence of ints', lambda: qarray.quantize(X, 'int8', channelwise_axes='01')),
    (TypeError, 'channelwise_axes must hold ints; got 1.7', lambda: qarray.quantize(X, 'int8', channelwise_axes=(1.7,))),
    (TypeError, 'channelwise_axes must hold ints', lambda: qarray.quantize(X, 'int8', channelwise_axes=(True,))),
    (ValueError, 'channelwise_axes names an axis twice', lambda: qarray.quantize(X, 'int8', channelwise_axes=(1, -1))),
    (ValueError, 'tiles names axis 1 twice', lambda: qarray.quantize(X, 'int8', tiles={1: 3, -1: 2})),
    (TypeError, 'tiles keys must be int axes', lambda: qarray.quantize(X, 'int8', tiles={'1': 2})),
    (TypeError, 'dtype: a QArray dequantizes to a floating dtype', lambda: qarray.dequantize(qarray.quantize(X, 'int8'), jnp.int32)),
    (TypeError, 'dtype: a QArray dequantizes to a floating dtype', lambda: qarray.dequantize(qarray.quantize(X, 'int8'), jnp.int8)),
    (ValueError, 'scale must be positive and finite', lambda: qarray.quantize_with_scale(X, 'int8', jnp.zeros((1, 1)))),
    (ValueError, 'scale must be positive and finite', lambda: qarray.quantize_with_scale(X, 'int8', jnp.full((1, 1), jnp.nan))),
    (TypeError, 'scale must be a floating-point array', lambda: qarray.quantize_with_scale(X, 'int8', jnp.ones((1, 1), int))),
    (ValueError, r"zero_point must hold integer codes of 'uint8' in \[0, 255\]",
     lambda: qarray.quantize_with_scale(X, 'uint8', jnp.ones((1, 1)), jnp.full((1, 1), 300))),
    (ValueError, r"zero_point must hold integer codes of 'int8'",
     lambda: qarray.quantize_with_scale(X, 'int8', jnp.ones((1, 1)), jnp.full((1, 1), 0.5))),
])
def test_refused_arguments(exc, msg, fn):
    with pytest.raises(exc, match=msg):
        fn()


def test_hand_built_qarrays_are_checked():
    q = qarray.quantize(jnp.ones((4, 6)), 'int4', channelwise_axes=(1,))
    with pytest.raises(TypeError, match='qvalue has dtype int8, but int4 codes are stored as uint8'):
        qarray.QArray(q.qvalue.astype(jnp.int8), q.scale, qtype='int4', packed_axis=-1, packed_length=6)
    with pytest.raises(ValueError, match='8 values of 4 bits take 4 bytes along the packed axis, but qvalue has 3'):
        qarray.QArray(q.qvalue, q.scale, qtype='int4', packed_axis=-1, packed_length=8)
    with pytest.raises(ValueError, match=r'scale of shape \(1, 4\) does not fit shape \(4, 6\)'):
        qarray.QArray(q.qvalue, jnp.ones((1, 4)), qtype='int4', packed_axis=-1, packed_length=6)
    with pytest.raises(ValueError, match='bit-packed format needs packed_axis'):
        qarray.QArray(jnp.zeros((4, 6), jnp.uint8), q.scale, qtype='int4')
    with pytest.raises(ValueError, match=r"zero_point must have the scale's shape \(1, 6\)"):
        qarray.QArray(jnp.zeros((4, 6), jnp.uint8), jnp.ones((1, 6)), jnp.zeros((1, 3), jnp.uint8), qtype='uint8')
    with pytest.raises(ValueError, match="as integer codes or a float offset"):
        qarray.QArray(jnp.zeros((4, 6), jnp.uint8), jnp.ones((1, 6)), jnp.zeros((1, 6), bool), qtype='uint8')


def test_leaf_by_leaf_astype_is_caught_with_advice():
    q = qarray.quantize(jnp.ones((4, 6)), 'int4')
    mapped = jax.tree.map(lambda a: a.astype(jnp.float32), q)
    with pytest.raises(TypeError, match=r'rebuilt leaf by leaf .* use q.astype\(dtype\)'):
        qarray.dequantize(mapped)
    assert qarray.dequantize(q.astype(jnp.bfloat16)).dtype == jnp.bfloat16  # the intended way stays quantized


# ------------------------------------------------------------------------------------------ check_finite under jit
def test_check_finite_raises_value_error_eagerly_and_a_runtime_error_under_jit():
    bad = jnp.array([1.0, jnp.nan])
    with pytest.raises(ValueError, match='contains NaN or Inf and check_finite=True'):
        qarray.quantize(bad, 'int8', check_finite=True)
    # Documented: under jit the check runs inside the compiled program and surfaces as JAX's runtime error
    # carrying the ValueError's message.
    with pytest.raises(jax.errors.JaxRuntimeError, match='contains NaN or Inf and check_finite=True'):
        jax.block_until_ready(jax.jit(lambda v: qarray.quantize(v, 'int8', check_finite=True).scale)(bad))


# ------------------------------------------------------------------------------------------ x @ q
def test_matmul_operators_promise():
    """q @ x and qarray.matmul(x, q) take the quantized path; x @ q (a JAX array on the left) is JAX's own
    operator, which dequantizes q first: the same numbers, documented, not the quantized path."""
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (8, 64))
    w = jax.random.normal(kw, (64, 16))
    qx = qarray.quantize(x, 'int8', channelwise_axes=(0,))
    qw = qarray.quantize(w, 'int8', channelwise_axes=(1,))
    hlo = jax.jit(lambda a, b: a @ b).lower(qx, qw).as_text()
    assert 'i32' in hlo and 'i8' in hlo  # int8 x int8 -> int32 dot: the quantized path
    hlo_fn = jax.jit(lambda a, b: qarray.matmul(a, b)).lower(qx, qw).as_text()
    assert 'i32' in hlo_fn
    fallback = np.asarray(x @ qw)
    ref = np.asarray(x, np.float64) @ np.asarray(qarray.dequantize(qw), np.float64)
    bound = 2 * 64 * 2**-24 * (np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(qarray.dequantize(qw), np.float64)))
    assert np.all(np.abs(fallback - ref) <= bound + 1e-30)
