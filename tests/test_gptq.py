"""GPTQ: against an unblocked float64 numpy reference, equality with quantize when h is diagonal,
lower output error than round-to-nearest, layout, dead channels, jit, and every error message."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings, strategies as st

import budget
import qarray
from qarray import gptq
from tolerances import assert_within, gamma

RNG = np.random.default_rng(0)


def correlated_activations(rows: int, k: int, seed: int = 0) -> np.ndarray:
    """x = z @ A with a random mixing A: strongly correlated input channels, as in real layers."""
    r = np.random.default_rng(seed)
    a = r.standard_normal((k, k)) / np.sqrt(k) + 0.5 * np.eye(k)
    scales = np.exp(r.standard_normal(k))  # uneven channel energies
    return ((r.standard_normal((rows, k)) @ a) * scales).astype(np.float32)


def ref_gptq(w: np.ndarray, h: np.ndarray, qmax: int, tile: int | None, damping: float = 0.01,
             act_order: bool = False):
    """Unblocked float64 GPTQ for symmetric intB absmax (scale = absmax / (qmax + 1/2)); w [K, N].

    ``act_order``: rows in decreasing diag(h) (stable), every tile's scale from the original w first.
    Returns (codes [K, N], scales [K/tile or 1, N]).
    """
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    k = w.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    bound = qmax + 0.5
    tile = tile or k

    def scale_of(rows):
        # The scale and the division in float32 as numerics documents them: a tile's negative extreme
        # sits on the tie -(qmax + 1/2) and only the same float32 rounding sends it to the same code.
        s32 = np.float32(np.abs(rows).max(0)) * np.float32(1 / bound)
        return np.where(s32 == 0, np.float32(1), s32)

    perm = np.argsort(-np.diag(h).astype(np.float32) * ~dead, kind='stable') if act_order else np.arange(k)
    static = [scale_of(w[i:i + tile]) for i in range(0, k, tile)] if act_order else None
    w, h = w[perm], h[perm][:, perm]
    h += damping * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, u.T @ u = inv(h)
    codes, scales = np.zeros(w.shape), []
    for r in range(k):
        if static is not None:
            s32 = static[perm[r] // tile]
        elif r % tile == 0:
            s32 = scale_of(w[r:r + tile])
            scales.append(s32.astype(np.float64))
        y = np.float32(w[r]) * (np.float32(1) / s32)
        c = np.clip(np.rint(y), -qmax - 1, qmax).astype(np.float64)  # full two's-complement codes
        codes[perm[r]] = c
        err = (w[r] - c * s32.astype(np.float64)) / u[r, r]
        w[r + 1:] -= np.outer(u[r, r + 1:], err)
    return codes, np.stack(static if static is not None else scales).astype(np.float64)


def expand(scales: np.ndarray, k: int, tile: int | None) -> np.ndarray:
    """Per-tile scales [ceil(K/tile), N] as per-row [K, N] (the last tile may be partial)."""
    return np.repeat(scales, tile or k, axis=0)[:k]


def output_error(w, deq, h):
    d = np.asarray(deq, np.float64) - np.asarray(w, np.float64)
    return float(np.trace(d.T @ np.asarray(h, np.float64) @ d))


@pytest.mark.parametrize('qtype,qmax,tile,k,block,act_order', [
    ('int4', 7, 32, 224, 80, False), ('int8', 127, None, 200, 64, False),
    ('int4', 7, 48, 200, 96, False),   # 200 = 4 x 48 + 8
    ('int4', 7, 48, 200, 96, True), ('int8', 127, None, 200, 64, True)])
def test_matches_float64_reference(qtype, qmax, tile, k, block, act_order):
    # k not a multiple of the block: the last block is padded; 200 with tiles of 48: a partial last tile whose
    # scale comes from its own 8 rows
    n = 48
    x = correlated_activations(4 * k, k)
    h = np.asarray(gptq.hessian(x), np.float64)
    w = (RNG.standard_normal((k, n)) * 0.1).astype(np.float32)
    q = gptq.gptq_quantize(w, h, qtype, tile_size=tile, block_size=block, act_order=act_order)
    ref_codes, ref_scales = ref_gptq(w, h, qmax, tile, act_order=act_order)
    codes = np.asarray(qarray.codes(q)).astype(np.float64)
    same = codes == ref_codes
    # float32 vs float64 updates can flip a tie: a tile's negative extreme sits exactly on -(qmax + 1/2), and
    # one ulp decides between -qmax and -qmax - 1; GPTQ then carries the different error onward.
    assert same.mean() >= 0.98, same.mean()
    assert q.scale.shape == ref_scales.shape
    ref_err = output_error(w, ref_codes * expand(ref_scales, k, tile), h)
    # The first tile's scale (with act_order every tile's) comes from the unmodified w by the same float32
    # formula: equal bits (rtol names it).
    n_static = len(ref_scales) if act_order else 1
    np.testing.assert_allclose(np.asarray(q.scale, np.float64)[:n_static], ref_scales[:n_static], rtol=1e-6)
    deq = np.asarray(qarray.dequantize(q), np.float64)
    # statistical: tie flips re-route GPTQ's error feedback, the objective stays within a few percent
    assert abs(output_error(w, deq, h) / ref_err - 1) < 0.05  # the objective GPTQ minimises, as the reference
    ref_deq = ref_codes * expand(ref_scales, k, tile)
    # The first 200 equal codes lie in the first rows (first tile): code * the same scale, one float32 product
    # (u relative) vs float64; 1e-4 is far above it and far below a wrong code (a whole step).
    np.testing.assert_allclose(deq[same][:200], ref_deq[same][:200], rtol=1e-4, atol=1e-7)
    # and it pays off: lower output error than round-to-nearest
    rtn = qarray.quantize(w, qtype, channelwise_axes=1, tiles={0: tile} if tile else None)
    assert output_error(w, deq, h) < 0.8 * output_error(w, qarray.dequantize(rtn), h)


@settings(max_examples=budget.examples(5))
@given(qtype=st.sampled_from(['int4', 'uint4', 'nf4', 'float8_e4m3fn', 'int8']),
       shape_tile=st.sampled_from([((64, 8), None), ((64, 8), 16), ((4, 48, 3), 16),
                                   ((60, 8), 16), ((4, 44, 3), 16)]),   # partial last tiles (12 rows)
       calibration=st.sampled_from(['absmax', 'minmax']), seed=st.integers(0, 100), act_order=st.booleans())
def test_diagonal_hessian_equals_quantize(qtype, shape_tile, calibration, seed, act_order):
    """A diagonal h couples no channels, so GPTQ must reduce to round-to-nearest exactly (in any order)."""
    shape, tile = shape_tile
    axis = 1 if len(shape) == 3 else 0
    if calibration == 'minmax' and qtype in ('nf4', 'float8_e4m3fn'):
        calibration = 'absmax'  # no zero point for these formats
    r = np.random.default_rng(seed)
    w = r.standard_normal(shape).astype(np.float32)
    k = shape[axis]
    h = np.diag(r.uniform(0.0, 3.0, k) * (r.uniform(size=k) > 0.1)).astype(np.float32)  # some dead channels
    q = gptq.gptq_quantize(w, h, qtype, axis=axis, tile_size=tile, calibration=calibration, block_size=32,
                           act_order=act_order)
    others = tuple(a for a in range(len(shape)) if a != axis)
    ref = qarray.quantize(w, qtype, channelwise_axes=others, tiles={axis: tile} if tile else None,
                          calibration=calibration)
    np.testing.assert_array_equal(np.asarray(qarray.codes(q)).astype(np.float32),
                                  np.asarray(qarray.codes(ref)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(ref.scale))
    assert (q.zero_point is None) == (ref.zero_point is None)
    if ref.zero_point is not None:
        np.testing.assert_array_equal(np.asarray(q.zero_point), np.asarray(ref.zero_point))


@pytest.mark.parametrize('qtype,tile', [('int4', 32), ('int3', None)])
def test_beats_round_to_nearest_on_correlated_activations(qtype, tile):
    k, n = 128, 64
    x = correlated_activations(512, k, seed=1)
    h = gptq.hessian(x)
    w = (RNG.standard_normal((k, n)) * 0.05).astype(np.float32)
    cal = 'minmax' if qtype.startswith('uint') else 'absmax'
    q = gptq.gptq_quantize(w, h, qtype, tile_size=tile, calibration=cal)
    rtn = qarray.quantize(w, qtype, channelwise_axes=1, tiles={0: tile} if tile else None, calibration=cal)
    e_gptq, e_rtn = output_error(w, qarray.dequantize(q), h), output_error(w, qarray.dequantize(rtn), h)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize('qtype,cal,pack_axis,dtype', [('int4', 'absmax', -1, jnp.float32),
                                                       ('uint4', 'minmax', 1, jnp.bfloat16)])
def test_layout_equals_quantize_for_3d_weight(qtype, cal, pack_axis, dtype):
    w = jnp.asarray(RNG.standard_normal((3, 64, 6)), dtype)  # [heads, K, dim], contracting axis 1
    h = gptq.hessian(correlated_activations(256, 64))
    q = gptq.gptq_quantize(w, h, qtype, axis=1, tile_size=16, calibration=cal, pack_axis=pack_axis)
    ref = qarray.quantize(w, qtype, channelwise_axes=(0, 2), tiles={1: 16}, calibration=cal, pack_axis=pack_axis)
    assert q.shape == ref.shape and q.dtype == ref.dtype == dtype
    assert q.qvalue.shape == ref.qvalue.shape and q.qvalue.dtype == ref.qvalue.dtype
    assert q.scale.shape == ref.scale.shape == (3, 4, 6) and q.scale.dtype == ref.scale.dtype
    assert (q.packed_axis, q.packed_length) == (ref.packed_axis, ref.packed_length)
    assert q.tiles == ref.tiles == {1: 16} and q.channelwise_axes == ref.channelwise_axes
    assert (q.zero_point is None) == (ref.zero_point is None)
    if q.zero_point is not None:
        assert q.zero_point.shape == ref.zero_point.shape and q.zero_point.dtype == ref.zero_point.dtype
    assert qarray.dequantize(q).dtype == dtype
    if qtype != 'int4':
        return
    # per channel (no tiles) on axis -1 of a 3-D weight
    q2 = gptq.gptq_quantize(w, gptq.hessian(correlated_activations(64, 6)), qtype, axis=-1, calibration=cal)
    ref2 = qarray.quantize(w, qtype, channelwise_axes=(0, 1), calibration=cal)
    assert q2.scale.shape == ref2.scale.shape == (3, 64, 1) and q2.qvalue.shape == ref2.qvalue.shape


def test_hessian_matches_numpy():
    x = RNG.standard_normal((2, 5, 3, 8)).astype(np.float32)
    ref = np.einsum('abcd,abce->de', x.astype(np.float64), x.astype(np.float64))
    got = gptq.hessian(x)
    assert got.dtype == jnp.float32 and got.shape == (8, 8)
    # A float32 sum of 30 products per entry (+1: the product) vs float64: gamma_31 |x|^T |x|.
    xa = np.abs(x.astype(np.float64))
    assert_within(got, ref, gamma(31) * np.einsum('abcd,abce->de', xa, xa))
    xb = jnp.asarray(x, jnp.bfloat16)  # bf16 activations are summed in float32
    x64 = np.asarray(xb, np.float64)
    ref1 = np.einsum('abcd,aecd->be', x64, x64)
    assert_within(gptq.hessian(xb, axis=1), ref1, gamma(49) * np.einsum('abcd,aecd->be', np.abs(x64), np.abs(x64)))


def test_dead_channel_keeps_its_weights():
    k, n, dead = 64, 16, 21
    x = correlated_activations(256, k)
    x[:, dead] = 0  # never excited
    h = gptq.hessian(x)
    w = RNG.standard_normal((k, n)).astype(np.float32)
    q = gptq.gptq_quantize(w, h, 'int4')
    deq = np.asarray(qarray.dequantize(q))
    rtn = np.asarray(qarray.dequantize(qarray.quantize(w, 'int4', channelwise_axes=1)))
    # no error reaches it and it passes none on: round-to-nearest, not zeroed
    np.testing.assert_array_equal(deq[dead], rtn[dead])
    assert np.count_nonzero(deq[dead]) >= n // 2  # (the reference prototype zeroed it)
    assert np.all(np.isfinite(deq))


def test_not_positive_definite_raises_and_damping_fixes_it():
    h = np.eye(8, dtype=np.float32)
    h[0, 1] = h[1, 0] = 2.0  # indefinite
    w = RNG.standard_normal((8, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r'h is not positive definite.*larger damping'):
        gptq.gptq_quantize(w, h, 'int8', damping=0.0)
    jitted = jax.jit(lambda w, h: gptq.gptq_quantize(w, h, 'int8', damping=0.0))
    with pytest.raises(Exception, match=r'h is not positive definite'):  # under jit: at run time
        jax.block_until_ready(jitted(w, h))
    q = gptq.gptq_quantize(w, h, 'int8', damping=2.0)  # 2 * mean(diag) = 2 on the diagonal: PD
    assert np.all(np.isfinite(np.asarray(qarray.dequantize(q))))


class JitTest(parameterized.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        x = correlated_activations(256, 64)
        # its own generator: the shared RNG's state depends on which tests ran before (test order, xdist)
        w = np.random.default_rng(12).standard_normal((64, 12)).astype(np.float32)
        h = gptq.hessian(x)
        fn = self.variant(lambda w, h: gptq.gptq_quantize(w, h, 'int4', tile_size=16, block_size=32))
        q = fn(w, h)
        ref = gptq.gptq_quantize(w, h, 'int4', tile_size=16, block_size=32)
        chex.assert_trees_all_equal(q, ref)
        ref_codes, _ = ref_gptq(w, np.asarray(h), 7, 16)
        # float32 vs the float64 reference: a near-tie rounds the other way and its error, fed to the later
        # columns of the block, can move a few more codes by one step (see above); nothing moves further
        codes = np.asarray(qarray.codes(q)).astype(np.int64)
        assert np.abs(codes - ref_codes).max() <= 1 and (codes == ref_codes).mean() >= 0.95


def test_errors():
    w = jnp.ones((8, 4))
    h = jnp.eye(8)
    with pytest.raises(ValueError, match=r'h must be the \[K, K\] Hessian.*\(8, 8\).*\(4, 4\)'):
        gptq.gptq_quantize(w, jnp.eye(4), 'int4')
    with pytest.raises(ValueError, match=r'axis=2 is out of range'):
        gptq.gptq_quantize(w, h, 'int4', axis=2)
    with pytest.raises(ValueError, match=r'damping must be a float >= 0'):
        gptq.gptq_quantize(w, h, 'int4', damping=-0.1)
    with pytest.raises(ValueError, match=r'tile_size=2.5 must be None or a positive int'):
        gptq.gptq_quantize(w, h, 'int4', tile_size=2.5)
    with pytest.raises(ValueError, match=r'tile_size=0'):
        gptq.gptq_quantize(w, h, 'int4', tile_size=0)
    with pytest.raises(ValueError, match=r'block_size must be a positive int'):
        gptq.gptq_quantize(w, h, 'int4', block_size=0)
    with pytest.raises(ValueError, match=r"'mxfp4' is a microscaling format"):
        gptq.gptq_quantize(jnp.ones((64, 4)), jnp.eye(64), 'mxfp4')
    with pytest.raises(TypeError, match=r'act_order must be a bool'):
        gptq.gptq_quantize(w, h, 'int4', act_order='yes')
    with pytest.raises(ValueError, match=r'w must have rank >= 2'):
        gptq.gptq_quantize(jnp.ones(8), h, 'int4')
    with pytest.raises(ValueError, match=r'pack_axis=5 is out of range'):
        gptq.gptq_quantize(w, h, 'int4', pack_axis=5)
    with pytest.raises(TypeError, match=r'w must be a floating-point weight'):
        gptq.gptq_quantize(jnp.ones((8, 4), jnp.int32), h, 'int4')
    with pytest.raises(TypeError, match=r'w is already a QArray'):
        gptq.gptq_quantize(qarray.quantize(w, 'int8'), h, 'int4')
    with pytest.raises(TypeError, match=r'scale_dtype must be a floating dtype'):
        gptq.gptq_quantize(w, h, 'int4', scale_dtype=jnp.int32)
    with pytest.raises(ValueError, match=r'Unknown calibration'):
        gptq.gptq_quantize(w, h, 'int4', calibration='nope')
    with pytest.raises(ValueError, match=r'axis=3 is out of range for activations'):
        gptq.hessian(jnp.ones((2, 3)), axis=3)
    with pytest.raises(TypeError, match=r'x must be a floating-point array of activations'):
        gptq.hessian(jnp.ones((2, 3), jnp.int32))


def test_hessian_token_clip_matches_numpy_and_leaves_ordinary_tokens():
    r = np.random.default_rng(3)
    x = r.standard_normal((2, 50, 16)).astype(np.float32)
    x[0, 0] *= 300.0      # two "massive activation" tokens
    x[1, 7] *= 40.0
    x2 = x.reshape(-1, 16).astype(np.float64)
    norm = np.linalg.norm(x2, axis=1)
    tau = 4.0 * np.median(norm)
    ref_x = x2 * np.minimum(1.0, tau / norm)[:, None]
    want = ref_x.T @ ref_x
    got = np.asarray(gptq.hessian(x, token_clip=4.0), np.float64)
    # float32: each token's factor tau / ||x|| is a few roundings off (the norm's K-term sum, the median's
    # product with 4, the division), squared in x x^T, then the 100-term sum: gamma_(100 + 16 + 8) |x|^T |x|
    assert_within(got, want, gamma(100 + 16 + 8) * np.abs(ref_x).T @ np.abs(ref_x))
    # nothing above the clip: exactly the plain Gram matrix; an all-zero batch (padding): zeros, not NaN
    np.testing.assert_array_equal(gptq.hessian(x, token_clip=1e30), gptq.hessian(x))
    np.testing.assert_array_equal(gptq.hessian(np.zeros((5, 3), np.float32), token_clip=4.0), np.zeros((3, 3)))
    for bad in (0.5, 0, True, '4'):
        with pytest.raises(ValueError, match='token_clip must be None or a number >= 1'):
            gptq.hessian(x, token_clip=bad)
