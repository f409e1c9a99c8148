"""The ops on fp4, mxfp8, mxfp4, nvfp4 and double-quantized weights: equal to the float op on the dequantized
operands within the accumulation bound; the native block-scaled path (jax.nn.scaled_matmul) is probed,
falls back where the backend lacks it, and lays its operands out right where it exists."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qarray
from qarray.ops import _block_scaled
from qarray.ops.dot_general import choose_path

WEIGHTS = [('float4_e2m1fn', dict(tiles={0: 32})), ('mxfp8', dict(tiles={0: 32})), ('mxfp4', dict(tiles={0: 32})),
           ('nvfp4', dict(tiles={0: 16})), ('nf4', dict(tiles={0: 32}, scale_qtype='int8')),
           ('int4', dict(tiles={0: 32}, scale_qtype='float8_e4m3fn'))]


def assert_dot_bound(got, x, w):
    """float32 accumulation of a length-K dot: |err| <= gamma_K * (|x| @ |w|) (+ the output rounding)."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    k = x64.shape[-1]
    u = 2.0 ** -24
    bound = (k + 1) * u / (1 - (k + 1) * u) * (np.abs(x64) @ np.abs(w64)) + 1e-30
    err = np.abs(np.asarray(got, np.float64) - x64 @ w64)
    assert np.all(err <= bound), f"max err {err.max():.3g} vs bound {bound.flat[err.argmax()]:.3g}"


@pytest.mark.parametrize('qtype,kw', WEIGHTS, ids=[w[0] + ('_dq' if 'scale_qtype' in w[1] else '') for w in WEIGHTS])
def test_weight_only_ops(qtype, kw):
    kx, kw_ = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (6, 64))
    q = qarray.quantize(jax.random.normal(kw_, (64, 24)), qtype, **kw)
    w = qarray.dequantize(q)
    assert_dot_bound(qarray.matmul(x, q), x, w)
    assert_dot_bound(qarray.einsum('bk,kn->bn', x, q), x, w)
    assert_dot_bound(jax.jit(qarray.dot)(x, q), x, w)
    conv_w = qarray.quantize(jax.random.normal(kw_, (1, 1, 64, 24)), qtype, **{k: ({2: v[0]} if k == 'tiles' else v)
                                                                              for k, v in kw.items()})
    y = qarray.conv_general_dilated(x.reshape(6, 1, 1, 64), conv_w, (1, 1), 'VALID',
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    assert_dot_bound(y.reshape(6, 24), x, qarray.dequantize(conv_w).reshape(64, 24))


@pytest.mark.parametrize('qtype', ['mxfp8', 'mxfp4', 'nvfp4'])
def test_two_microscaling_operands_fall_back_where_the_backend_has_no_block_scaled_dot(qtype):
    x = qarray.quantize(jax.random.normal(jax.random.key(1), (8, 64)), qtype)
    w = qarray.quantize(jax.random.normal(jax.random.key(2), (16, 64)), qtype)
    dn = (((1,), (1,)), ((), ()))
    elem, scale = w.qtype.element_type.native_dtype, ('float8_e8m0fnu' if qtype != 'nvfp4' else 'float8_e4m3fn')
    expected = 'block_scaled' if _block_scaled.supported(elem, scale, w.qtype.block) else 'float'
    assert choose_path(x, w, dn) == expected
    if jax.default_backend() == 'cpu':
        assert expected == 'float'  # scaled_matmul has no CPU lowering: the probe says so, cheaply
    out = qarray.dot_general(x, w, dn)
    assert_dot_bound(out, qarray.dequantize(x), qarray.dequantize(w).T)


def _reference_scaled_matmul(lhs, rhs, lhs_scales, rhs_scales, preferred_element_type=jnp.float32):
    """jax.nn.scaled_matmul's documented math, for checking our operand layout on any backend."""
    a = lhs.astype(jnp.float32) * jnp.repeat(lhs_scales.astype(jnp.float32), lhs.shape[-1] // lhs_scales.shape[-1], -1)
    b = rhs.astype(jnp.float32) * jnp.repeat(rhs_scales.astype(jnp.float32), rhs.shape[-1] // rhs_scales.shape[-1], -1)
    return jnp.einsum('BMK,BNK->BMN', a, b).astype(preferred_element_type)


@pytest.mark.parametrize('qtype', ['mxfp8', 'mxfp4', 'nvfp4'])
def test_block_scaled_path_lays_out_operands_like_the_float_op(qtype, monkeypatch):
    monkeypatch.setattr(_block_scaled, 'supported', lambda *a, **k: True)
    monkeypatch.setattr(jax.nn, 'scaled_matmul', _reference_scaled_matmul)
    x = qarray.quantize(jax.random.normal(jax.random.key(3), (2, 8, 64)), qtype)
    w = qarray.quantize(jax.random.normal(jax.random.key(4), (2, 16, 64)), qtype)
    dn = (((2,), (2,)), ((0,), (0,)))  # batched: [B, M, K] . [B, N, K]
    assert choose_path(x, w, dn) == 'block_scaled'
    out = jax.jit(lambda a, b: qarray.dot_general(a, b, dn))(x, w)
    xd, wd = qarray.dequantize(x), qarray.dequantize(w)
    for i in range(2):
        assert_dot_bound(out[i], xd[i], wd[i].T)
