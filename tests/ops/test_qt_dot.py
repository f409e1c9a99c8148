"""Quantized training ops (qarray.ops.qt_dot): quantized backward contractions vs float64 gradients of the
same quantized forward, their layouts, jit / vmap / grad-of-grad, stochastic rounding, and the lowered HLO."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import budget
from hlo_lib import dot_types
import qarray
from qarray.ops.qt_dot import BackwardQuant, ForwardQuant, qt_dot_general, quantized_training_op
from ops_testlib import rand
from tolerances import U32, gamma

MK = (((1,), (0,)), ((), ()))
CONV = dict(window_strides=(1, 1), padding='SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
GROUPS = np.array([2, 0, 3])

# op name -> (fn on arrays or QArrays, the same op in lax for float64 references, lhs shape, rhs shape,
#             extra args, forward channelwise axes of (lhs, rhs))
CASES = {
    'dot_general': (lambda a, b: qarray.ops.dot_general(a, b, MK), lambda a, b: jax.lax.dot_general(a, b, MK),
                    (6, 16), (16, 5), (), ((0,), (1,))),
    'einsum': (functools.partial(qarray.ops.einsum, 'btd,dnh->btnh'), functools.partial(jnp.einsum, 'btd,dnh->btnh'),
               (2, 3, 8), (8, 2, 4), (), ((0, 1), (1, 2))),
    'conv': (lambda a, b: qarray.ops.conv_general_dilated(a, b, **CONV),
             lambda a, b: jax.lax.conv_general_dilated(a, b, **CONV), (2, 5, 5, 3), (3, 3, 3, 4), (), ((), (3,))),
    'ragged_dot': (lambda a, b, gs: qarray.ops.ragged_dot(a, b, gs), jax.lax.ragged_dot, (6, 8), (3, 8, 4),
                   (jnp.asarray(GROUPS),), ((0,), (0, 2))),
}

# Largest rounding error of one element of a tensor quantized with *any* of its per-channel layouts: a
# channel's scale is at most the per-tensor one (absmax / top), so the error is at most that scale's half
# step (int), or half an ulp relative plus half the smallest subnormal step (fp8).
ERR = {
    'int8': lambda v: np.full(v.shape, np.abs(v).max() / 127.5 / 2),
    'float8_e4m3fn': lambda v: 2.0 ** -4 * np.abs(v) + np.abs(v).max() / 448 * 2.0 ** -10,
    'float8_e5m2': lambda v: 2.0 ** -3 * np.abs(v) + np.abs(v).max() / 57344 * 2.0 ** -17,
}


def _transpose64(op64, wrt, g, other, primal_shape, extra):
    """The transpose of the op w.r.t. operand ``wrt`` applied to ``g``, in float64 (the exact backward)."""
    with jax.enable_x64(True):
        g, other = jnp.asarray(g, jnp.float64), jnp.asarray(other, jnp.float64)
        f = (lambda a: op64(a, other, *extra)) if wrt == 0 else (lambda b: op64(other, b, *extra))
        return np.asarray(jax.linear_transpose(f, jax.ShapeDtypeStruct(primal_shape, jnp.float64))(g)[0])


def _grads(name, fwd_qtype, bwd_qtype, residual_qtype, seed=0, **kw):
    fn, op64, ls, rs, extra, (lcw, rcw) = CASES[name]
    lhs, rhs = rand(seed, ls), rand(seed + 1, rs)
    out_shape = jax.eval_shape(fn, lhs, rhs, *extra).shape
    c = rand(seed + 2, out_shape)
    lf, rf = ForwardQuant(fwd_qtype, lcw), ForwardQuant(fwd_qtype, rcw)
    bwd = BackwardQuant(bwd_qtype, residual_qtypes=(residual_qtype, residual_qtype))
    loss = lambda a, b: jnp.sum(quantized_training_op(fn, a, b, *extra, lhs_fwd=lf, rhs_fwd=rf, bwd=bwd, **kw) * c)
    dl, dr = jax.jit(jax.grad(loss, (0, 1)))(lhs, rhs)
    return dl, dr, (lhs, rhs, lf.fake(lhs), rf.fake(rhs), c, op64, extra)


@pytest.mark.parametrize('name,fwd,bwd,res', [(n, 'int8', 'int8', 'int8') for n in CASES] + [
    (n, 'float8_e4m3fn', 'float8_e5m2', 'float8_e4m3fn') for n in ('dot_general', 'conv')])
def test_gradients_match_float64_gradients_of_the_quantized_forward(name, fwd, bwd, res):
    dl, dr, (lhs, rhs, lv, rv, c, op64, extra) = _grads(name, fwd, bwd, res)
    g = np.asarray(c, np.float64)
    for wrt, d, primal, other in ((0, dl, lhs, rv), (1, dr, rhs, lv)):
        other = np.asarray(other, np.float64)
        # STE (absmax: every value inside its range): the exact gradient is T(g, other) in float64. The
        # backward contracts Q(g) with Q(other); each differs from its input by at most e(.), so by bilinearity
        # with 0/1 coefficients |T(Qg, Qo) - T(g, o)| <= T(|g|, e_o) + T(e_g, |o|) + T(e_g, e_o); plus the
        # float32 accumulation of the (at most g.size)-term sums and the scale products.
        eg, eo = ERR[bwd](g), ERR[res](other)
        t = lambda a, b: _transpose64(op64, wrt, a, b, primal.shape, extra)
        ref = t(g, other)
        bound = t(np.abs(g), eo) + t(eg, np.abs(other)) + t(eg, eo)
        bound += 2 * gamma(g.size + 4) * t(np.abs(g) + eg, np.abs(other) + eo) + 1e-30
        err = np.abs(np.asarray(d, np.float64) - ref)
        assert (err <= bound).all(), (name, wrt, float((err / bound).max()))
        assert not np.allclose(np.asarray(d), ref, rtol=0, atol=0)  # the backward really rounded something


def test_backward_dots_quantize_along_their_own_non_contracting_axes():
    # y = x @ w (x[M, K], w[K, N]). dx = g @ w^T contracts N: g per row (its axis 0), w per row K (axis 0) --
    # not w's forward layout (per column N). dw = x^T @ g contracts M: x and g per column (axis 1).
    x, w, c = rand(0, (6, 16)), rand(1, (16, 5)), rand(2, (6, 5))
    wq = ForwardQuant('int8', (1,))
    loss = lambda x, w: jnp.sum(quantized_training_op(lambda a, b: qarray.ops.dot_general(a, b, MK), x, w,
                                                      rhs_fwd=wq, bwd=BackwardQuant('int8')) * c)
    dx, dw = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    def deq(v, axis):
        return np.asarray(qarray.dequantize(qarray.quantize(v, 'int8', channelwise_axes=(axis,))), np.float64)
    for d, a, b in ((dx, deq(c, 0), deq(wq.fake(w), 0).T), (dw, deq(x, 1).T, deq(c, 1))):
        exact = a @ b
        # int32 sums are exact; the two scale products (and each dequantized value) round once in float32.
        bound = gamma(4) * (np.abs(a) @ np.abs(b)) + 1e-30
        assert (np.abs(np.asarray(d, np.float64) - exact) <= bound).all()


@settings(max_examples=budget.examples(3))
@given(m=st.integers(1, 5), k=st.integers(1, 20), n=st.integers(1, 5), tile=st.sampled_from([None, 4]))
def test_qt_dot_general_tiles_and_shapes(m, k, n, tile):
    x, w = rand(m, (m, k)), rand(k, (k, n))
    dx, dw = jax.jit(jax.grad(lambda x, w: qt_dot_general(x, w, MK, lhs_qtype='int8', rhs_qtype='int8',
                                                           bwd_qtype='int8', bwd_tile_size=tile).sum(), (0, 1)))(x, w)
    lv = np.asarray(qarray.fake_quant(x, 'int8', channelwise_axes=(0,)), np.float64)
    rv = np.asarray(qarray.fake_quant(w, 'int8', channelwise_axes=(1,)), np.float64)
    g = np.ones((m, n))
    e = ERR['int8']
    for d, a, b in ((dx, g, rv.T), (dw, lv.T, g)):
        # as in the test above: the bilinear bound of both operands' rounding (tiles only shrink the scales)
        bound = np.abs(a) @ e(b) + e(a) @ np.abs(b) + e(a) @ e(b)
        bound += 2 * gamma(m + k + n + 4) * ((np.abs(a) + e(a)) @ (np.abs(b) + e(b))) + 1e-30
        assert (np.abs(np.asarray(d) - a @ b) <= bound).all()


def test_fwd_quantized_runs_the_integer_forward_with_the_fake_quant_values():
    x, w = rand(0, (4, 32)), rand(1, (32, 3))
    kw = dict(lhs_qtype='int8', rhs_qtype='int8', bwd_qtype='int8')
    real = qt_dot_general(x, w, MK, fwd_quantized=True, **kw)
    fake = qt_dot_general(x, w, MK, **kw)
    a = np.asarray(qarray.fake_quant(x, 'int8', channelwise_axes=(0,)), np.float64)
    b = np.asarray(qarray.fake_quant(w, 'int8', channelwise_axes=(1,)), np.float64)
    bound = 2 * gamma(32 + 3) * (np.abs(a) @ np.abs(b))  # two float32 evaluations of the same products
    assert (np.abs(np.asarray(real) - np.asarray(fake)) <= bound).all()


def test_vmap_agrees_with_one_example_at_a_time():
    x, w = rand(0, (3, 4, 16)), rand(1, (16, 5))
    per_example = jax.grad(lambda x, w: qt_dot_general(x, w, MK, lhs_qtype='int8', rhs_qtype='int8',
                                                        bwd_qtype='int8', fwd_quantized=True).sum() ** 2, (0, 1))
    jitted = jax.jit(per_example)
    vmapped = jax.jit(jax.vmap(per_example, (0, None)))(x, w)
    for j in (0, 1):
        # same integer sums; float32 scale products and the loss' squares may round differently when batched
        ref = np.stack([jitted(x[i], w)[j] for i in range(3)])
        np.testing.assert_allclose(vmapped[j], ref, rtol=8 * U32 * 16, atol=1e-30)


def test_grad_of_grad():
    x, w, v = rand(0, (4, 8)), rand(1, (8, 3)), rand(2, (4, 8))
    lf, rf = ForwardQuant('int8', (0,)), ForwardQuant('int8', (1,))
    op = lambda a, b: qarray.ops.dot_general(a, b, MK)
    # Float backward (bwd=None, forward quantized only): second derivatives are the STE model's.
    f = lambda x, w: jnp.sum(jnp.sin(quantized_training_op(op, x, w, lhs_fwd=lf, rhs_fwd=rf)))
    f_ref = lambda x, w: jnp.sum(jnp.sin(lf.fake(x) @ rf.fake(w)))
    hvp = lambda f: jax.jit(jax.grad(lambda w: jnp.vdot(jax.grad(f)(x, w), v)))(w)
    ref = hvp(f_ref)
    # K = 8 sums of |x||w| terms per y, then the backward and the hvp's dots: a few gamma_K of the magnitudes.
    np.testing.assert_allclose(hvp(f), ref, rtol=0, atol=float(4 * gamma(16) * 8 * 8 * np.abs(ref).max() + 1e-6))
    # Quantized backward: rounding has zero derivative, so only finiteness is meaningful.
    fq = lambda x, w: jnp.sum(jnp.sin(quantized_training_op(op, x, w, lhs_fwd=lf, rhs_fwd=rf,
                                                            bwd=BackwardQuant('int8'))))
    assert np.isfinite(np.asarray(hvp(fq))).all()


def test_stochastic_rounding_uses_the_key():
    x, w = rand(0, (6, 16)), rand(1, (16, 5))
    loss = lambda x, **kw: jnp.sum(jnp.sin(qt_dot_general(x, w, MK, bwd_qtype='int8', **kw)))
    grad = jax.jit(lambda key: jax.grad(lambda x: loss(x, stochastic_rounding=True, key=key))(x))
    a, b, c = grad(jax.random.key(1)), grad(jax.random.key(1)), grad(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Each stochastic code is one of the two neighbours of its value (within a full step, where rounding to
    # nearest is within half a step): the bilinear bound of test 1 with twice the gradient's error.
    g = np.cos(np.asarray(x, np.float64) @ np.asarray(w, np.float64))
    wv, e = np.asarray(w, np.float64), ERR['int8']
    bound = np.abs(g) @ e(wv).T + 2 * e(g) @ np.abs(wv).T + 2 * e(g) @ e(wv).T
    bound += 2 * gamma(16 + 5 + 4) * ((np.abs(g) + 2 * e(g)) @ (np.abs(wv) + e(wv)).T) + 1e-6
    assert (np.abs(np.asarray(a, np.float64) - g @ wv.T) <= bound).all()


@pytest.mark.parametrize('fwd,bwd,want', [('int8', 'int8', {('s8', 's8', 's32')}),
                                          ('float8_e4m3fn', 'float8_e5m2',
                                           {('f8e4m3fn', 'f8e4m3fn', 'f32'), ('f8e5m2', 'f8e4m3fn', 'f32'),
                                            ('f8e4m3fn', 'f8e5m2', 'f32')})])
def test_lowered_backward_has_low_precision_dots(fwd, bwd, want):
    x, w = rand(0, (6, 16)), rand(1, (16, 5))
    f = lambda x, w: qt_dot_general(x, w, MK, lhs_qtype=fwd, rhs_qtype=fwd, bwd_qtype=bwd, fwd_quantized=True,
                                    key=None).sum() ** 2
    hlo = jax.jit(jax.grad(f, (0, 1))).lower(x, w).as_text(dialect='hlo')
    dots = dot_types(hlo)
    assert len(dots) == 3 and set(dots) <= want, dots  # the forward dot and both backward dots
    if bwd == 'float8_e5m2':
        assert sum('f8e5m2' in d[:2] for d in dots) == 2  # the gradient enters both backward dots in e5m2


def test_conv_backward_lowers_to_integer_convolutions():
    fn = CASES['conv'][0]
    x, w = rand(0, (2, 5, 5, 3)), rand(1, (3, 3, 3, 4))
    f = lambda x, w: jnp.sum(quantized_training_op(fn, x, w, rhs_fwd=ForwardQuant('int8', (3,)),
                                                   bwd=BackwardQuant('int8'), fwd_quantized=True) ** 2)
    dots = dot_types(jax.jit(jax.grad(f, (0, 1))).lower(x, w).as_text(dialect='hlo'))
    assert dots.count(('s8', 's8', 's32')) == 2, dots  # both backward convolutions (the forward is weight-only)


def test_bad_input():
    op = lambda a, b: qarray.ops.dot_general(a, b, MK)
    x, w = jnp.ones((2, 4)), jnp.ones((4, 3))
    with pytest.raises(TypeError, match='fn must be'):
        quantized_training_op('dot', x, w)
    with pytest.raises(TypeError, match='lhs_fwd must be a ForwardQuant'):
        quantized_training_op(op, x, w, lhs_fwd='int8')
    with pytest.raises(TypeError, match='bwd must be a BackwardQuant'):
        quantized_training_op(op, x, w, bwd='int8')
    with pytest.raises(TypeError, match='lhs must be a float array'):
        quantized_training_op(op, qarray.quantize(x, 'int8'), w)
    with pytest.raises(ValueError, match='needs key'):
        quantized_training_op(op, x, w, bwd=BackwardQuant('int8', stochastic_rounding=True))
    with pytest.raises(ValueError, match='int7x'):
        BackwardQuant('int7x')
    with pytest.raises(ValueError, match='microscaling'):
        BackwardQuant('mxfp8')
    with pytest.raises(ValueError, match='dlhs_tile_size must be None or a positive int'):
        BackwardQuant('int8', dlhs_tile_size=0)
