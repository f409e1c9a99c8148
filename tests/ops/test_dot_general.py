"""dot_general: every path equals the float op on the dequantized operands (float64 reference)."""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import budget
import qarray
from qarray import ops
from qarray.ops import _scaled_dot
from ops_testlib import assert_close_to, assert_dot_close, np_dot_general, op_rtol, quant, rand, random_qarray
from tolerances import abs_dot, assert_dot_close as assert_evaluations_close, assert_within, gamma, unit_roundoff

MK = (((1,), (0,)), ((), ()))


def test_int8_x_int8_per_token_per_channel():
    x, w = rand(0, (16, 256)), rand(1, (256, 32))
    qx = quant(x, 'int8', channelwise_axes=(0,))
    qw = quant(w, 'int8', channelwise_axes=(1,))
    assert ops.choose_path(qx, qw, MK) == 'int'
    assert_dot_close(ops.dot_general(qx, qw, MK), qx, qw, MK)


@pytest.mark.parametrize('order', ['batched', 'loop'])
@pytest.mark.parametrize('zp', [False, True])
def test_tiled_orders_agree(order, zp, monkeypatch):
    x, w = rand(2, (8, 512)), rand(3, (512, 16))
    qx = quant(x, 'int8', channelwise_axes=(0,), calibration='minmax' if zp else 'absmax')
    qw = quant(w, 'int4', tiles={0: 128}, channelwise_axes=(1,),
                         calibration='minmax' if zp else 'absmax')
    calls = []
    monkeypatch.setattr(_scaled_dot, 'tile_order', lambda *a: calls.append(order) or order)
    jax.clear_caches()  # force a fresh trace under the patched choice
    out = ops.dot_general(qx, qw, MK)
    jax.clear_caches()
    assert calls == [order]
    assert_dot_close(out, qx, qw, MK)


def test_tile_order_choice():
    assert _scaled_dot.tile_order(1, 1, 4096, 4096, 32) == 'batched'   # decode: small [S, M, N]
    assert _scaled_dot.tile_order(1, 512, 4096, 4096, 32) == 'loop'    # prefill: never [S, M, N]
    assert _scaled_dot.tile_order(1, 512, 4096, 4096, 1) == 'single'


def test_both_zero_points_and_uint8():
    x, w = rand(4, (6, 128)) + 1.0, rand(5, (128, 10)) - 0.5
    qx = quant(x, 'uint8', channelwise_axes=(0,))
    qw = quant(w, 'int8', channelwise_axes=(1,), calibration='minmax')
    assert qx.zero_point is not None and qw.zero_point is not None
    assert ops.choose_path(qx, qw, MK) == 'int'
    assert_dot_close(ops.dot_general(qx, qw, MK), qx, qw, MK)


def test_static_activation_scale_and_blockwise_weight():
    x, w = rand(6, (4, 256)), rand(7, (32, 256))       # w is (N, K): block-wise tiles on K (its last axis)
    qx = qarray.quantize_with_scale(x, 'int8', jnp.full((1, 1), 0.05))
    qw = qarray.quantize(w, 'int4', tiles=128)
    dn = (((1,), (1,)), ((), ()))
    assert ops.choose_path(qx, qw, dn) == 'int'
    assert_dot_close(ops.dot_general(qx, qw, dn), qx, qw, dn)


@pytest.mark.parametrize('lhs_fmt,rhs_fmt', [('fp8', 'fp8'), ('float8_e5m2', 'fp8')])
@pytest.mark.parametrize('layout', ['tensor', 'channel', 'tiles'])
def test_fp8(lhs_fmt, rhs_fmt, layout):
    x, w = rand(8, (8, 256)), rand(9, (256, 16))
    kw = {'tensor': {}, 'channel': {'channelwise_axes': (1,)}, 'tiles': {'tiles': {0: 128}}}[layout]
    qx = quant(x, lhs_fmt, **({} if layout == 'tensor' else {'channelwise_axes': (0,)}))
    qw = quant(w, rhs_fmt, **kw)
    assert ops.choose_path(qx, qw, MK) == 'fp8'
    # fp8 x fp8 products are exact in float32: only float32 accumulation error remains.
    assert_dot_close(ops.dot_general(qx, qw, MK), qx, qw, MK)


@pytest.mark.parametrize('fmt,kw', [
    ('int8', dict(channelwise_axes=(1,))),
    ('int4', dict(tiles={0: 128}, channelwise_axes=(1,))),
    ('nf4', dict(tiles={0: 64}, channelwise_axes=(1,))),
    ('uint4', dict(tiles={0: 64}, channelwise_axes=(1,))),
    ('fp8', dict(channelwise_axes=(1,))),
    ('int3', dict(channelwise_axes=(1,))),
])
@pytest.mark.parametrize('m', [1, 64])
def test_weight_only(fmt, kw, m):
    x, w = rand(10, (m, 256)), rand(11, (256, 24))
    qw = quant(w, fmt, **kw)
    assert ops.choose_path(x, qw, MK) == 'float'
    out = jax.jit(lambda a, b: ops.dot_general(a, b, MK))(x, qw)
    assert_dot_close(out, x, qw, MK)


class WeightOnlyVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_bf16_activations(self):
        x, w = rand(12, (4, 128), jnp.bfloat16), rand(13, (128, 8))
        qw = qarray.quantize(w.astype(jnp.bfloat16), 'int4', tiles={0: 64}, channelwise_axes=(1,))
        out = self.variant(lambda a, b: ops.dot_general(a, b, MK))(x, qw)
        assert out.dtype == jnp.bfloat16
        wd = qarray.dequantize(qw)
        ref = jax.lax.dot_general(x, wd, MK)
        # Both accumulate the K=128 bf16 products in float32 (XLA's bf16 dot) and round the result to bf16;
        # the op may use its float32 dequantized weight where the reference rounds it to bf16 first:
        # |out - ref| <= (2 gamma_{K+1} + u_bf16) |x| . |w| + u_bf16 (|out| + |ref|), u_bf16 = 2**-8.
        ub = unit_roundoff(jnp.bfloat16)
        o, r = np.asarray(out, np.float64), np.asarray(ref, np.float64)
        bound = (2 * gamma(129) + ub) * abs_dot(x, wd) + ub * (np.abs(o) + np.abs(r))
        assert_within(o, r, bound)

    @chex.variants(with_jit=True, without_jit=True)
    def test_preferred_element_type(self):
        qx = quant(rand(14, (4, 128)), 'int8')
        qw = quant(rand(15, (128, 8)), 'int8', channelwise_axes=(1,))
        out = self.variant(lambda a, b: ops.dot_general(a, b, MK, preferred_element_type=jnp.bfloat16))(qx, qw)
        assert out.dtype == jnp.bfloat16


def test_mixed_int8_activations_int4_weights():
    qx = quant(rand(16, (8, 128)), 'int8', channelwise_axes=(0,))
    qw = quant(rand(17, (128, 16)), 'int4', channelwise_axes=(1,))
    assert ops.choose_path(qx, qw, MK) == 'int'
    assert_dot_close(ops.dot_general(qx, qw, MK), qx, qw, MK)


@pytest.mark.parametrize('lhs,rhs', [
    (('int8', {}), ('fp8', {'channelwise_axes': (1,)})),
    (('nf4', {}), ('int8', {'channelwise_axes': (1,)})),
    (('int8', {'channelwise_axes': (1,)}), ('int8', {})),              # per-channel on the contracting axis
    (('int8', {'tiles': {1: 16}}), ('int4', {'channelwise_axes': (1,)})),  # tiles below MIN_TILE
])
def test_float_fallbacks(lhs, rhs):
    qx = quant(rand(18, (4, 128)), lhs[0], **lhs[1])
    qw = quant(rand(19, (128, 8)), rhs[0], **rhs[1])
    assert ops.choose_path(qx, qw, MK) == 'float'
    assert_dot_close(ops.dot_general(qx, qw, MK), qx, qw, MK)


def test_plain_arrays_pass_through():
    a, b = rand(20, (3, 4)), rand(21, (4, 5))
    np.testing.assert_array_equal(ops.dot_general(a, b, MK), jax.lax.dot_general(a, b, MK))


def test_vmap():
    qw = quant(rand(22, (64, 8)), 'int8', channelwise_axes=(1,))
    xs = rand(23, (3, 4, 64))
    out = jax.vmap(lambda x: ops.dot_general(x, qw, MK))(xs)
    ref = jnp.einsum('bmk,kn->bmn', xs, qarray.dequantize(qw))
    # Two float32 evaluations of a K=64 dot (+1: the op may scale after the sum).
    assert_evaluations_close(out, ref, xs, qarray.dequantize(qw), extra=1)


# ---------------------------------------------------------------------------------------- hypothesis
INT_FMTS = ['int8', 'int4', 'uint8', 'uint4', 'int2', 'int1', 'int3']
ALL_FMTS = INT_FMTS + ['fp8', 'float8_e5m2', 'nf4', None]   # None: a plain float array


@st.composite
def problems(draw):
    nb = draw(st.integers(0, 1))
    nc = draw(st.integers(1, 2))
    nlf, nrf = draw(st.integers(0, 1)), draw(st.integers(0, 2))
    batch = [draw(st.sampled_from([1, 3])) for _ in range(nb)]
    ksizes = [draw(st.sampled_from([128, 256]))] + [draw(st.sampled_from([2, 3])) for _ in range(nc - 1)]
    if draw(st.booleans()):
        ksizes.reverse()
    lfree = [draw(st.sampled_from([1, 4])) for _ in range(nlf)]
    rfree = [draw(st.sampled_from([2, 5])) for _ in range(nrf)]
    lroles = [('b', i) for i in range(nb)] + [('f', i) for i in range(nlf)] + [('c', i) for i in range(nc)]
    rroles = [('b', i) for i in range(nb)] + [('c', i) for i in range(nc)] + [('f', i) for i in range(nrf)]
    lroles = [lroles[p] for p in draw(st.permutations(range(len(lroles))))]
    rroles = [rroles[p] for p in draw(st.permutations(range(len(rroles))))]
    size = {'b': batch, 'c': ksizes}

    def shape(roles, free):
        return tuple(free[i] if r == 'f' else size[r][i] for r, i in roles)

    lshape, rshape = shape(lroles, lfree), shape(rroles, rfree)
    dn = ((tuple(lroles.index(('c', i)) for i in range(nc)), tuple(rroles.index(('c', i)) for i in range(nc))),
          (tuple(lroles.index(('b', i)) for i in range(nb)), tuple(rroles.index(('b', i)) for i in range(nb))))
    fmts = INT_FMTS if draw(st.booleans()) else ALL_FMTS
    lf, rf = draw(st.sampled_from(fmts)), draw(st.sampled_from(fmts))

    def layout(roles, shp, fmt):
        if fmt is None:
            return None
        cw = tuple(a for a, (r, _) in enumerate(roles) if r != 'c' and shp[a] > 1 and draw(st.booleans()))
        tiles = {}
        big = [a for a, (r, _) in enumerate(roles) if r == 'c' and shp[a] >= 128]
        if big and draw(st.booleans()):
            tiles = {big[0]: draw(st.sampled_from([128, 32]))}
        zp = fmt.startswith('int') and fmt != 'int1' and draw(st.booleans())
        return dict(channelwise_axes=cw, tiles=tiles, zero_point=zp,
                    pack_axis=draw(st.integers(-len(shp), -1)))

    return lshape, rshape, dn, (lf, layout(lroles, lshape, lf)), (rf, layout(rroles, rshape, rf)), \
        draw(st.integers(0, 1000))


def _make(shape, spec, seed):
    fmt, kw = spec
    if fmt is None:
        x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
        return jnp.asarray(x), x.astype(np.float64)
    return random_qarray(seed, shape, fmt, **kw)


@settings(max_examples=budget.examples(10))
@given(problems())
def test_hypothesis_dot_general(problem):
    """Random formats / layouts / dimension numbers; reference built from the codes in numpy float64."""
    lshape, rshape, dn, lspec, rspec, seed = problem
    (lhs, a), (rhs, b) = _make(lshape, lspec, seed), _make(rshape, rspec, seed + 1)
    path = ops.choose_path(lhs, rhs, dn)
    if lspec[0] in INT_FMTS and rspec[0] in INT_FMTS:
        assert path in ('int', 'float')
    out = ops.dot_general(lhs, rhs, dn)
    k = int(np.prod([lshape[i] for i in dn[0][0]]))
    assert_close_to(out, np_dot_general(a, b, dn), np_dot_general(np.abs(a), np.abs(b), dn), op_rtol(k))
