"""qarray.ragged_dot / ragged_dot_general: mixture-of-experts matmuls with QArray experts or activations.

Reference: a float64 loop over the groups on the dequantized operands (rows past ``sum(group_sizes)`` are
zero), built from numpy only. Bound (tests/tolerances.py): the op is one float32 evaluation of each row's dot
product of length K, ``gamma_{K + EXTRA} * (|lhs| . |rhs_g|)`` per element, EXTRA counting the roundings a
term goes through besides the sum (dequantize, the scale products). A wrong expert, scale, tile or zero point
is an O(1) relative error, far outside it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import budget
import qarray
from ops_testlib import EXTRA, deq64, op_rtol, rand, random_qarray
from qarray.ops.ragged_dot import RAGGED_DOT_DIMENSION_NUMBERS, ragged_path, row_groups
from tolerances import U32, gamma

M, K, N, G = 10, 64, 8, 4
GS = np.array([3, 0, 4, 1])          # an empty group, and sum(GS) = 8 < M: rows 8, 9 belong to no group


def ragged64(x, w, gs) -> np.ndarray:
    """``jax.lax.ragged_dot`` semantics in float64: a loop over the groups."""
    x, w, gs = deq64(x), deq64(w), np.asarray(gs)
    out = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for g, n in enumerate(gs):
        out[start:start + n] = x[start:start + n] @ w[g]
        start += n
    return out


def assert_ragged_close(y, x, w, gs, *, evals=1):
    """``y`` is a float32 evaluation of ``ragged_dot(x, w, gs)``; rows past the groups are exactly zero."""
    ref = ragged64(x, w, gs)
    bound = evals * op_rtol(x.shape[1]) * ragged64(np.abs(deq64(x)), np.abs(deq64(w)), gs) + 1e-30
    y = np.asarray(y, np.float64)
    assert y.shape == ref.shape
    err = np.abs(y - ref)
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3g}, max err {err.max():.3g}"
    assert np.all(y[int(np.sum(gs)):] == 0)


@pytest.fixture(scope='module')
def x():
    return rand(0, (M, K))


@pytest.mark.parametrize('fmt, tiles, zero_point', [
    ('int8', None, False), ('int4', {1: 16}, False), ('nf4', {1: 32}, False), ('float8_e4m3fn', None, False),
    ('int3', None, False), ('uint4', {1: 16}, True)])
def test_weight_only_matches_float64_loop_over_groups(x, fmt, tiles, zero_point):
    w, _ = random_qarray(1, (G, K, N), fmt, channelwise_axes=(0, 2), tiles=tiles, zero_point=zero_point)
    assert ragged_path(x, w) == 'float'
    assert_ragged_close(qarray.ragged_dot(x, w, jnp.asarray(GS)), x, w, GS)


@pytest.mark.parametrize('wfmt, afmt, tiles, zero_point, path', [
    ('int8', 'int8', None, False, 'int'),            # w8a8: int8 x int8 -> int32, scales on the output
    ('int4', 'int8', None, False, 'int'),
    ('uint8', 'uint8', None, True, 'int'),           # zero points on both sides: correction terms per group
    ('int8', 'int8', {1: 128}, False, 'int'),        # two K tiles: each summed exactly, scaled on its own
    ('uint4', 'uint8', {1: 128}, True, 'int'),
    ('float8_e4m3fn', 'float8_e4m3fn', None, False, 'fp8'),
    ('int8', 'int8', {1: 32}, False, 'float'),       # tiles finer than MIN_TILE: dequantized
])
def test_both_quantized_matches_float64_loop(wfmt, afmt, tiles, zero_point, path):
    k = 256
    w, _ = random_qarray(1, (G, k, N), wfmt, channelwise_axes=(0, 2), tiles=tiles, zero_point=zero_point)
    a, _ = random_qarray(2, (M, k), afmt, channelwise_axes=(0,), tiles=tiles, zero_point=zero_point)
    assert ragged_path(a, w) == path
    assert_ragged_close(qarray.ragged_dot(a, w, jnp.asarray(GS)), a, w, GS)


def test_activation_quantized_rhs_float(x):
    a = qarray.quantize(x, 'int8', channelwise_axes=(0,))
    w = rand(3, (G, K, N))
    assert_ragged_close(qarray.ragged_dot(a, w, jnp.asarray(GS)), a, w, GS)


@pytest.mark.parametrize('fmt', ['nvfp4'])
def test_microscaling_and_quantized_scales_dequantize(x, fmt):
    w = qarray.quantize(rand(4, (G, K, N)), fmt, channelwise_axes=(0, 2), tiles={1: qarray.qtypes.get(fmt).block})
    assert_ragged_close(qarray.ragged_dot(x, w, jnp.asarray(GS)), x, w, GS)
    w2 = qarray.quantize(rand(4, (G, K, N)), 'int4', channelwise_axes=(0, 2), tiles={1: 16}, scale_qtype='int8')
    assert_ragged_close(qarray.ragged_dot(x, w2, jnp.asarray(GS)), x, w2, GS)


@settings(max_examples=budget.examples(8))
@given(sizes=st.lists(st.integers(0, 5), min_size=G, max_size=G).filter(lambda s: sum(s) <= M),
       both=st.booleans())
def test_any_group_sizes(sizes, both):
    """Empty groups anywhere, any total up to M (shapes fixed: one compile, group sizes are data)."""
    w, _ = random_qarray(5, (G, 128, N), 'int8', channelwise_axes=(0, 2))
    lhs = rand(6, (M, 128))
    if both:
        lhs = qarray.quantize(lhs, 'int8', channelwise_axes=(0,))
    gs = np.array(sizes)
    assert_ragged_close(qarray.ragged_dot(lhs, w, jnp.asarray(gs, jnp.int32)), lhs, w, gs)


def test_all_groups_empty_and_no_rows(x):
    w, _ = random_qarray(1, (G, K, N), 'int8', channelwise_axes=(0, 2))
    a = qarray.quantize(x, 'int8', channelwise_axes=(0,))
    for lhs in (x, a):
        assert np.all(np.asarray(qarray.ragged_dot(lhs, w, jnp.zeros(G, jnp.int32))) == 0)
    assert qarray.ragged_dot(jnp.zeros((0, K)), w, jnp.zeros(G, jnp.int32)).shape == (0, N)


def test_jit_equals_eager_and_float64(x):
    w, _ = random_qarray(1, (G, K, N), 'int4', channelwise_axes=(0, 2), tiles={1: 16})
    a = qarray.quantize(x, 'int8', channelwise_axes=(0,))
    for lhs in (x, a):
        eager = qarray.ragged_dot(lhs, w, jnp.asarray(GS))
        jitted = jax.jit(qarray.ragged_dot)(lhs, w, jnp.asarray(GS))
        assert_ragged_close(jitted, lhs, w, GS)
        assert_ragged_close(jitted, lhs, w, GS, evals=1)
        # two float32 evaluations of one sum: within twice the bound of each vs the exact value
        bound = 2 * op_rtol(K) * ragged64(np.abs(deq64(lhs)), np.abs(deq64(w)), GS) + 1e-30
        assert np.all(np.abs(np.asarray(eager, np.float64) - np.asarray(jitted, np.float64)) <= bound)


def test_grads_match_float64(x):
    """d/dx sum(c * y) = c_m @ w[g(m)].T per row of group g(m) (zero past the groups); d/dw[g] = x_g.T @ c_g."""
    w, _ = random_qarray(1, (G, K, N), 'int8', channelwise_axes=(0, 2))
    c = rand(7, (M, N))
    gx = jax.grad(lambda x: jnp.sum(c * qarray.ragged_dot(x, w, jnp.asarray(GS))))(x)
    gid = np.asarray(row_groups(jnp.asarray(GS), M))
    w64, c64, x64 = deq64(w), np.asarray(c, np.float64), np.asarray(x, np.float64)
    want = np.stack([c64[m] @ w64[g].T if g < G else np.zeros(K) for m, g in enumerate(gid)])
    # each element: a float32 sum of N products (and the dequantize): gamma_{N + EXTRA} |c| |w|^T
    bound = (gamma(N + EXTRA) + gamma(N, 2.0 ** -53)) * np.stack(
        [np.abs(c64[m]) @ np.abs(w64[g]).T if g < G else np.zeros(K) for m, g in enumerate(gid)]) + 1e-30
    assert np.all(np.abs(np.asarray(gx, np.float64) - want) <= bound)
    # activation-only: the float rhs gets its gradient through the quantized lhs
    a = qarray.quantize(x, 'int8', channelwise_axes=(0,))
    wf = rand(3, (G, K, N))
    gw = jax.grad(lambda wf: jnp.sum(c * qarray.ragged_dot(a, wf, jnp.asarray(GS))))(wf)
    a64 = deq64(a)
    start = 0
    for g, n in enumerate(GS):
        rows = slice(start, start + n)
        want = a64[rows].T @ c64[rows]
        bound = (gamma(max(n, 1) + EXTRA) + 1e-15) * (np.abs(a64[rows]).T @ np.abs(c64[rows])) + 1e-30
        assert np.all(np.abs(np.asarray(gw[g], np.float64) - want) <= bound), g
        start += n


def test_output_dtype_follows_preferred_element_type(x):
    w, _ = random_qarray(1, (G, K, N), 'int8', channelwise_axes=(0, 2))
    xb = x.astype(jnp.bfloat16)
    assert qarray.ragged_dot(xb, w, jnp.asarray(GS)).dtype == jnp.float32      # result type of bf16 and f32
    y = qarray.ragged_dot(x, w, jnp.asarray(GS), preferred_element_type=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    # one more rounding, to bfloat16: u_bf16 = 2**-8 relative
    ref = ragged64(x, w, GS)
    assert np.all(np.abs(np.asarray(y, np.float64) - ref) <= 2.0 ** -8 * np.abs(ref)
                  + op_rtol(K) * ragged64(np.abs(deq64(x)), np.abs(deq64(w)), GS) * 1.01 + 1e-30)


def test_plain_arrays_pass_through_to_jax(x):
    w = rand(3, (G, K, N))
    gs = jnp.asarray(GS)
    np.testing.assert_array_equal(qarray.ragged_dot(x, w, gs), jax.lax.ragged_dot(x, w, gs))
    dn = RAGGED_DOT_DIMENSION_NUMBERS
    np.testing.assert_array_equal(qarray.ops.ragged_dot_general(x, w, gs, dn), jax.lax.ragged_dot(x, w, gs))


def test_ragged_dot_general_any_axis_order(x):
    w, _ = random_qarray(1, (G, K, N), 'int8', channelwise_axes=(0, 2))
    dn = jax.lax.RaggedDotDimensionNumbers((((0,), (2,)), ((), ())), (1,), (0,))   # lhs[K, M], rhs[G, N, K]
    y = qarray.ops.ragged_dot_general(x.T, w.transpose(0, 2, 1), jnp.asarray(GS), dn)
    assert_ragged_close(y, x, w, GS)
    a = qarray.quantize(x, 'int8', channelwise_axes=(0,))
    dn2 = jax.lax.RaggedDotDimensionNumbers((((1,), (1,)), ((), ())), (0,), (0,))
    assert_ragged_close(qarray.ops.ragged_dot_general(a, w, jnp.asarray(GS), dn2), a, w, GS)


def test_unsupported_ragged_dot_general_forms_raise(x):
    w, _ = random_qarray(1, (G, K, N), 'int8', channelwise_axes=(0, 2))
    ragged_contracting = jax.lax.RaggedDotDimensionNumbers((((1,), (1,)), ((), ())), (1,), ())
    with pytest.raises(ValueError, match='form of jax.lax.ragged_dot'):
        qarray.ops.ragged_dot_general(x, w, jnp.asarray(GS), ragged_contracting)
    with pytest.raises(TypeError, match='RaggedDotDimensionNumbers'):
        qarray.ops.ragged_dot_general(x, w, jnp.asarray(GS), ((1,), (1,)))


def test_bad_arguments_raise(x):
    w, _ = random_qarray(1, (G, K, N), 'int8', channelwise_axes=(0, 2))
    gs = jnp.asarray(GS)
    with pytest.raises(ValueError, match='rank 2'):
        qarray.ragged_dot(x[None], w, gs)
    with pytest.raises(ValueError, match='contracting sizes differ'):
        qarray.ragged_dot(x[:, :32], w, gs)
    with pytest.raises(TypeError, match='group_sizes must be an integer array'):
        qarray.ragged_dot(x, w, gs.astype(jnp.float32))
    with pytest.raises(ValueError, match=r'group_sizes must have shape \(G,\) = \(4,\)'):
        qarray.ragged_dot(x, w, gs[:3])
    with pytest.raises(TypeError, match='preferred_element_type must be a floating dtype'):
        qarray.ragged_dot(x, w, gs, preferred_element_type=jnp.int32)
    with pytest.raises(NotImplementedError, match='group_offset'):
        qarray.ragged_dot(x, w, gs, group_offset=jnp.array([0]))
    with pytest.raises(NotImplementedError, match='out_sharding'):
        qarray.ragged_dot(x, w, gs, out_sharding=jax.sharding.PartitionSpec())
    with pytest.raises(TypeError):
        qarray.ragged_dot(x, 'w', gs)


def test_vmap_follows_jax_and_lax_map_batches(x):
    # jax.lax.ragged_dot has no batching rule for these forms in JAX 0.10 ("vmap over any dim but 0 - NYI");
    # qarray.ragged_dot is built on it, so vmap raises the same error, never a wrong answer. If JAX gains the
    # rule, the quantized op must give the reference values. A batch runs with lax.map (or a Python loop).
    w, _ = random_qarray(1, (G, K, N), 'int8', channelwise_axes=(0, 2))
    xs = jnp.stack([x, 2 * x[::-1]])
    gss = jnp.asarray([GS, [0, 5, 0, 5]], jnp.int32)
    a = qarray.quantize(xs, 'int8', channelwise_axes=(0, 1))
    for lhs in (xs, a):
        try:
            jax.vmap(jax.lax.ragged_dot, in_axes=(0, None, 0))(xs, qarray.dequantize(w), gss)
        except NotImplementedError:
            with pytest.raises(NotImplementedError):
                jax.vmap(qarray.ragged_dot, in_axes=(0, None, 0))(lhs, w, gss)
        else:  # pragma: no cover - a JAX with the batching rule
            ys = jax.vmap(qarray.ragged_dot, in_axes=(0, None, 0))(lhs, w, gss)
            for b in range(2):
                assert_ragged_close(ys[b], lhs[b], w, np.asarray(gss[b]))
        ys = jax.lax.map(lambda args: qarray.ragged_dot(args[0], w, args[1]), (lhs, gss))
        for b in range(2):
            assert_ragged_close(ys[b], lhs[b], w, np.asarray(gss[b]))
    # batch dimensions in ragged_dot_general: refused with the supported form named
    batched = jax.lax.RaggedDotDimensionNumbers((((2,), (2,)), ((0,), (0,))), (1,), (1,))
    w2, _ = random_qarray(2, (2, G, K, N), 'int8', channelwise_axes=(0, 1, 3))
    with pytest.raises(ValueError, match='no batch axes'):
        qarray.ops.ragged_dot_general(xs, w2, gss, batched)
