"""Gradients through quantized ops: weight-only and QAT's straight-through estimator vs the float op."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qarray
from qarray import ops
from ops_testlib import conv64, quant, rand
from tolerances import U32, abs_dot, assert_within, dot_bound, gamma

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
    # g = (cos(y) c) @ w^T. The two y = x @ w (K=128) differ by dy <= 2 gamma_{K+1} |x| . |w| (+1: the op may
    # scale after the sum); cos is 1-Lipschitz and each cos is within a few ulps (16 u, absolute, as |cos| <= 1);
    # then the N=16 sum of the backward dot, evaluated twice: 2 gamma_{N+2} (|c| . |w|^T) (+2: cos * c, dequantize).
    dy = dot_bound(x, w, extra=1)
    cw = abs_dot(c, np.asarray(w).T)
    assert_within(g, g_ref, abs_dot((dy + 16 * U32) * np.abs(np.asarray(c)), np.asarray(w).T) + 2 * gamma(18) * cw)


def test_grad_through_weight_only_conv():
    x = rand(0, (1, 6, 6, 4))
    q = quant(rand(1, (3, 3, 4, 8)), 'int8', channelwise_axes=(3,))
    kw = dict(window_strides=(1, 1), padding='SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    g = jax.grad(lambda v: jnp.sum(ops.conv_general_dilated(v, q, **kw) ** 2))(x)
    g_ref = jax.grad(lambda v: jnp.sum(jax.lax.conv_general_dilated(v, qarray.dequantize(q), **kw) ** 2))(x)
    # g = 2 conv^T(y): the two y (K = 3*3*4 = 36 terms) differ by dy <= 2 gamma_{K+1} conv(|x|, |w|); the
    # transposed conv sums K' = 3*3*8 = 72 terms of 2 y w, evaluated twice: 2 gamma_{K'+2} conv^T(2 |y|, |w|).
    w = np.abs(np.asarray(qarray.dequantize(q), np.float64))
    dy = 2 * gamma(37) * conv64(np.abs(np.asarray(x, np.float64)), w, **kw)
    y = np.abs(conv64(np.asarray(x, np.float64), np.asarray(qarray.dequantize(q), np.float64), **kw))

    def conv_t(v):  # the transpose the VJP applies, with |w|, in float64
        with jax.enable_x64(True):
            f = lambda z: jax.lax.conv_general_dilated(z, jnp.asarray(w), **kw)  # noqa: E731
            return np.asarray(jax.vjp(f, jnp.zeros(x.shape, jnp.float64))[1](jnp.asarray(v))[0])

    assert_within(g, g_ref, conv_t(2 * dy) + 2 * gamma(74) * conv_t(2 * y))


def test_qat_straight_through_gradients_vs_float_op():
    """fake_quant + the float op: STE gradients. Linear loss: identical; quadratic: within 2% (int8)."""
    x, w, c = rand(0, (8, 128)), rand(1, (128, 16)) * 0.1, rand(2, (8, 16))

    def loss(wv, quantized, quad):
        wq = qarray.fake_quant(wv, 'int8', channelwise_axes=(1,)) if quantized else wv
        y = ops.matmul(x, wq)
        return jnp.sum((y - c) ** 2) if quad else jnp.sum(y * c)

    # Linear loss: both gradients are x^T c (every weight is inside its absmax range), two float32 evaluations
    # of an 8-term sum: |dg| <= 2 gamma_8 |x|^T |c| elementwise, so the relative norm is below that norm ratio.
    # Quadratic loss: 2 x^T (x wq - c) carries int8's quantization error of y; 2 % bounds that effect (a
    # fixed, seeded sample), over 1000 times the float32 rounding (gamma_128 ~ 8e-6).
    lin_tol = 2 * gamma(8) * float(np.linalg.norm(abs_dot(np.asarray(x).T, c)))
    for quad, tol in ((False, None), (True, 2e-2)):
        g = jax.grad(loss)(w, True, quad)
        g_ref = jax.grad(loss)(w, False, quad)
        rel = float(jnp.linalg.norm(g - g_ref) / jnp.linalg.norm(g_ref))
        assert rel <= (tol or lin_tol / float(jnp.linalg.norm(g_ref))), (quad, rel)


# ---------------------------------------------------------------------------------------- registry
