"""Gradients through quantized ops: weight-only and QAT's straight-through estimator vs the float op."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qarray
from qarray import ops
from ops_testlib import quant, rand

MK = (((1,), (0,)), ((), ()))


@pytest.mark.parametrize('fmt,kw', [('int8', dict(channelwise_axes=(1,))),
                                    ('int4', dict(tiles={0: 64}, channelwise_axes=(1,))),
                                    ('nf4', dict(tiles={0: 64}, channelwise_axes=(1,)))])
def test_grad_wrt_float_operand_matches_float_op(fmt, kw):
    x = rand(0, (4, 128))
    q = quant(rand(1, (128, 16)), fmt, **kw)
    w = qarray.dequantize(q)
    c = rand(2, (4, 16))
    g = jax.grad(lambda v: jnp.sum(jnp.sin(ops.dot_general(v, q, MK)) * c))(x)
    g_ref = jax.grad(lambda v: jnp.sum(jnp.sin(v @ w) * c))(x)
    # Both sides carry float32 rounding of y (|y| ~ 30) amplified by cos: ~3e-5 each vs float64.
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_grad_through_weight_only_conv():
    x = rand(0, (1, 6, 6, 4))
    q = quant(rand(1, (3, 3, 4, 8)), 'int8', channelwise_axes=(3,))
    kw = dict(window_strides=(1, 1), padding='SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    g = jax.grad(lambda v: jnp.sum(ops.conv_general_dilated(v, q, **kw) ** 2))(x)
    g_ref = jax.grad(lambda v: jnp.sum(jax.lax.conv_general_dilated(v, qarray.dequantize(q), **kw) ** 2))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_qat_straight_through_gradients_vs_float_op():
    """fake_quant + the float op: STE gradients. Linear loss: identical; quadratic: within 2% (int8)."""
    x, w, c = rand(0, (8, 128)), rand(1, (128, 16)) * 0.1, rand(2, (8, 16))

    def loss(wv, quantized, quad):
        wq = qarray.fake_quant(wv, 'int8', channelwise_axes=(1,)) if quantized else wv
        y = ops.matmul(x, wq)
        return jnp.sum((y - c) ** 2) if quad else jnp.sum(y * c)

    for quad, tol in ((False, 1e-6), (True, 2e-2)):
        g = jax.grad(loss)(w, True, quad)
        g_ref = jax.grad(loss)(w, False, quad)
        rel = float(jnp.linalg.norm(g - g_ref) / jnp.linalg.norm(g_ref))
        assert rel <= tol, (quad, rel)


# ---------------------------------------------------------------------------------------- registry
