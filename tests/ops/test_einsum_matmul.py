"""einsum, dot and matmul against numpy float64 on dequantized operands."""

import numpy as np
import pytest

import qarray
from qarray import ops
from ops_testlib import assert_close_to, deq64, einsum_k, op_rtol, quant, rand
from tolerances import assert_dot_close as assert_evaluations_close


def _einsum_check(sub, operands):
    out = ops.einsum(sub, *operands)
    arrays = [deq64(o) for o in operands]
    ref = np.einsum(sub, *arrays)
    bound = np.einsum(sub, *[np.abs(a) for a in arrays])
    # Three operands: (a b) c rounds each term through both sums; K = the product of all summed letters
    # bounds K_1 + K_2 roundings.
    assert_close_to(out, np.asarray(ref), np.asarray(bound), op_rtol(einsum_k(sub, [a.shape for a in arrays])))


@pytest.mark.parametrize('sub,shapes', [
    ('mk,kn->mn', [(4, 128), (128, 6)]),
    ('bmk,bkn->bmn', [(2, 4, 128), (2, 128, 6)]),
    ('bsd,dnh->bsnh', [(2, 3, 128), (128, 4, 5)]),
    ('bsnh,nhd->bsd', [(2, 3, 4, 64), (4, 64, 8)]),        # two contracting letters
    ('...k,kn->...n', [(2, 3, 128), (128, 5)]),
    ('ij,jk', [(3, 64), (64, 2)]),                          # implicit output
    ('ij,ij->ij', [(3, 4), (3, 4)]),                        # batch only
    ('ij,jk->', [(3, 64), (64, 2)]),                        # full contraction
    ('ij,k->ijk', [(2, 3), (4,)]),                          # outer product
    ('ij,jk,kl->il', [(3, 64), (64, 64), (64, 2)]),         # three operands
    ('bqhd,bkhd->bhqk', [(2, 3, 2, 64), (2, 5, 2, 64)]),    # attention logits
])
@pytest.mark.parametrize('fmt', ['int8', 'int4'])
def test_einsum_int_x_int(sub, shapes, fmt):
    ops_ = [quant(rand(i, s), 'int8' if i == 0 else fmt) for i, s in enumerate(shapes)]
    _einsum_check(sub, ops_)


@pytest.mark.parametrize('sub,shapes', [
    ('mk,nk->mn', [(4, 256), (6, 256)]),
    ('bsd,dnh->bsnh', [(2, 3, 128), (128, 4, 5)]),
    ('ii->i', [(4, 4)]),                        # diagonal: jnp.einsum fallback
    ('ij,jk->ik', [(3, 64), (64, 2)]),
    ('ab,cb->ca', [(3, 64), (2, 64)]),
])
def test_einsum_weight_only(sub, shapes):
    ops_ = [rand(0, shapes[0])] + [quant(rand(i, s), 'nf4', tiles=64) if s[-1] % 64 == 0 else
                                   quant(rand(i, s), 'int8') for i, s in enumerate(shapes[1:], 1)]
    if len(shapes) == 1:
        ops_ = [quant(rand(0, shapes[0]), 'int8')]
    _einsum_check(sub, ops_)


def test_einsum_sums_a_letter_only_one_operand_has():
    a, b = quant(rand(0, (3, 4, 64)), 'int8'), quant(rand(1, (64, 2)), 'int8')
    _einsum_check('ixk,kj->ij', [a, b])


@pytest.mark.parametrize('ashape,bshape', [
    ((4, 128), (128, 6)), ((2, 4, 128), (128, 6)), ((128,), (128, 6)), ((4, 128), (128,)), ((128,), (128,)),
    ((4, 128), (3, 128, 6)), ((3, 4, 128), (3, 128, 6)), ((1, 4, 128), (3, 128, 6)),
])
def test_matmul_shapes(ashape, bshape):
    a = quant(rand(0, ashape), 'int4')   # packed on both sides, 1-D included
    b = quant(rand(1, bshape), 'int4')
    out = ops.matmul(a, b)
    ref = np.matmul(deq64(a), deq64(b))
    assert_close_to(out, ref, np.matmul(np.abs(deq64(a)), np.abs(deq64(b))), op_rtol(ashape[-1]))
    out2 = ops.matmul(rand(2, ashape), b)
    assert out2.shape == ref.shape


def test_matmul_operator_dispatch():
    x = rand(0, (4, 128))
    q = quant(rand(1, (128, 6)), 'int8', channelwise_axes=(1,))
    # Two float32 evaluations of one K=128 dot (the quantized op, the float matmul): 2 gamma_{K+1} |x| . |w|
    # (+1: the op may apply the per-channel scale after the sum instead of dequantizing first).
    assert_evaluations_close(x @ q, x @ qarray.dequantize(q), x, qarray.dequantize(q), extra=1)
    qt = q.T
    assert_evaluations_close(qt @ x.T, qarray.dequantize(qt) @ x.T, qarray.dequantize(qt), x.T, extra=1)


@pytest.mark.parametrize('ashape,bshape', [((4, 128), (128, 6)), ((2, 128), (3, 128, 5)), ((128,), (128,)),
                                           ((2, 3, 128), (128,)), ((), (3,))])
def test_dot_shapes(ashape, bshape):
    a = rand(0, ashape)
    b = quant(rand(1, bshape), 'int8') if bshape else rand(1, bshape)
    a_ = quant(a, 'int8') if ashape else a
    out = ops.dot(a_, b)
    ref = np.dot(deq64(a_), deq64(b))
    # One float32 evaluation vs float64; np.dot sums over a's last axis (nothing for a scalar).
    bound = np.dot(np.abs(deq64(a_)), np.abs(deq64(b)))
    assert_close_to(out, ref, np.asarray(bound), op_rtol(ashape[-1] if ashape else 1))
