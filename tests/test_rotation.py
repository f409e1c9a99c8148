"""Block-Hadamard rotation: against scipy's Hadamard and a float64 dense-matrix reference, the matmul
invariance, round trips, dtypes, jit, and every error message."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from absl.testing import parameterized
from hypothesis import given, strategies as st

from qarray import rotation
from tolerances import U32, assert_within, gamma, unit_roundoff

RNG = np.random.default_rng(0)


def ref_rotation_matrix(k: int, block: int, seed: int) -> np.ndarray:
    """Dense float64 R = diag(signs) @ blockdiag(H) built from scipy's Hadamard; rotate(x) = x @ R."""
    h = scipy.linalg.hadamard(block).astype(np.float64) / np.sqrt(block)
    b = scipy.linalg.block_diag(*([h] * (k // block)))
    return np.diag(rotation.signs(k, seed).astype(np.float64)) @ b


def ref_rotate(x: np.ndarray, axis: int, block: int, seed: int, absolute: bool = False) -> np.ndarray:
    r = ref_rotation_matrix(x.shape[axis], block, seed)
    if absolute:  # |x| |R|: what each output's rounding error is relative to
        x, r = np.abs(x), np.abs(r)
    return np.moveaxis(np.moveaxis(x.astype(np.float64), axis, -1) @ r, -1, axis)


def rotate_bound(x: np.ndarray, axis: int, block: int) -> np.ndarray:
    """A float32 rotation vs float64: each output sums ``block`` terms (a fast transform rounds each through
    fewer, log2(block), additions), scaled by fl(1/sqrt(block)) (+2 roundings): gamma_{block+2} |x| |R|."""
    return gamma(block + 2) * ref_rotate(x, axis, block, 0, absolute=True) + 1e-30


@pytest.mark.parametrize('n', [2**i for i in range(9)])
def test_hadamard_matches_scipy_and_is_orthonormal(n):
    h = np.asarray(rotation.hadamard(n))
    assert h.dtype == np.float32 and h.shape == (n, n)
    np.testing.assert_allclose(h, scipy.linalg.hadamard(n) / np.sqrt(n), rtol=1e-6, atol=0)  # +-fl(1/sqrt n): u
    # each entry within u relative: (h h^T)_ij within n * (1/n) * 2u = 2u of I (a float64 sum of exact products)
    np.testing.assert_allclose(h.astype(np.float64) @ h.T, np.eye(n), atol=1e-6)
    np.testing.assert_array_equal(h, h.T)
    assert rotation.hadamard(n, jnp.bfloat16).dtype == jnp.bfloat16


def test_block_size_and_signs():
    assert [rotation.block_size(k) for k in (2, 6, 96, 384, 768, 1536, 4096)] == [2, 2, 32, 128, 128, 128, 128]
    assert rotation.block_size(1536, max_block=512) == 512
    assert rotation.block_size(12, max_block=2) == 2
    s = rotation.signs(1000, seed=3)
    assert s.dtype == np.float32 and set(np.unique(s)) == {-1.0, 1.0}
    np.testing.assert_array_equal(s, rotation.signs(1000, seed=3))
    assert not np.array_equal(s, rotation.signs(1000, seed=4))
    assert 400 < (s > 0).sum() < 600


@given(shape=st.lists(st.sampled_from([2, 3, 4, 8, 12, 24, 64]), min_size=1, max_size=3),
       axis_pick=st.integers(0, 2), seed=st.integers(0, 3), small_block=st.booleans())
def test_rotate_matches_dense_float64_reference_and_round_trips(shape, axis_pick, seed, small_block):
    axis = axis_pick % len(shape) - len(shape) * (axis_pick % 2)  # positive and negative axes
    if shape[axis] % 2:
        shape[axis] *= 2
    x = RNG.standard_normal(shape).astype(np.float32)
    k = shape[axis]
    block = 2 if small_block else rotation.block_size(k)
    y = rotation.rotate(x, axis, block=block, seed=seed)
    assert y.shape == x.shape and y.dtype == jnp.float32
    bound = rotate_bound(x, axis, block)
    assert_within(y, ref_rotate(x, axis, block, seed), bound)
    # orthogonal: norms along the axis are kept (| ||y|| - ||x R|| | <= ||y - x R||), and unrotate undoes it
    assert_within(np.linalg.norm(np.asarray(y, np.float64), axis=axis), np.linalg.norm(x.astype(np.float64), axis=axis),
                  np.linalg.norm(bound, axis=axis) * (1 + 1e-6))
    back = rotation.unrotate(y, axis, block=block, seed=seed)
    # the inverse rotation of y (each |y| + bound) plus y's own error carried through |R| (|R| is symmetric)
    y_abs = ref_rotate(x, axis, block, 0, absolute=True) + bound
    assert_within(back, x, rotate_bound(y_abs, axis, block) + ref_rotate(bound, axis, block, 0, absolute=True))


def test_unrotate_matches_inverse_of_dense_reference():
    x = RNG.standard_normal((5, 96)).astype(np.float32)
    r = ref_rotation_matrix(96, 32, 1)
    assert_within(rotation.unrotate(x, 1, seed=1), x.astype(np.float64) @ r.T, rotate_bound(x, 1, 32))


@pytest.mark.parametrize('k,block', [(256, None), (384, None), (96, 32), (512, 8)])
def test_matmul_invariance_against_float64(k, block):
    x = RNG.standard_normal((3, 7, k)).astype(np.float32)
    w = RNG.standard_normal((k, 10)).astype(np.float32)
    y = jnp.matmul(rotation.rotate(x, -1, block=block, seed=5), rotation.rotate(w, 0, block=block, seed=5),
                   precision=jax.lax.Precision.HIGHEST)
    # vs float64: both rotations (gamma_{b+2} |x| |R| and |R|^T |w|) and the K=k float32 matmul of the rotated
    # operands, all relative to (|x| |R|) . (|R|^T |w|).
    b = block or rotation.block_size(k)
    ax = ref_rotate(x, -1, b, 0, absolute=True)
    aw = ref_rotate(w, 0, b, 0, absolute=True)
    assert_within(y, x.astype(np.float64) @ w.astype(np.float64), (2 * gamma(b + 2) + gamma(k + 2)) * ax @ aw)
    # an einsum weight [K, heads, dim] rotated along its contracting axis works the same way: the same operands,
    # two float32 evaluations of the K=k sum
    w3 = w.reshape(k, 2, 5)
    y3 = jnp.einsum('btk,khd->bthd', rotation.rotate(x, -1, block=block, seed=5),
                    rotation.rotate(w3, 0, block=block, seed=5), precision=jax.lax.Precision.HIGHEST)
    assert_within(np.asarray(y3).reshape(3, 7, 10), y, 2 * gamma(k) * (1 + 4 * gamma(b + 2)) * ax @ aw)


def test_rotation_spreads_an_outlier():
    x = np.zeros((1, 256), np.float32)
    x[0, 3] = 100.0
    y = np.asarray(rotation.rotate(x, -1))
    np.testing.assert_allclose(np.abs(y[0, :128]), 100 / np.sqrt(128), rtol=1e-6)  # 100 * fl(1/sqrt 128): 2 u
    np.testing.assert_array_equal(y[0, 128:], 0)


@pytest.mark.parametrize('block', [None, 16])
def test_rotate_hessian_is_gram_of_rotated_activations(block):
    x = RNG.standard_normal((200, 64)) @ RNG.standard_normal((64, 64))
    x = x.astype(np.float32)
    h = x.T.astype(np.float64) @ x
    got = np.asarray(rotation.rotate_hessian(jnp.asarray(h, jnp.float32), block=block, seed=2), np.float64)
    b = block or 64
    xr = ref_rotate(x, -1, b, 2)
    ref = xr.T @ xr
    # R^T H R in float32 from H rounded to float32 (u |H|): two rotations, each gamma_{b+2} relative to
    # |R|^T |H| |R|, vs float64.
    ra = np.abs(ref_rotation_matrix(64, b, 2))
    bound = (2 * gamma(b + 2) + U32) * ra.T @ np.abs(h) @ ra * (1 + gamma(b + 2))
    assert_within(got, ref, bound)
    # vs the Gram matrix of the float32-rotated activations: those differ from x R by dx <= gamma_{b+2} |x| |R|
    xr32 = np.asarray(rotation.rotate(x, -1, block=block, seed=2), np.float64)
    dx = gamma(b + 2) * np.abs(x.astype(np.float64)) @ ra
    assert_within(got, xr32.T @ xr32, bound + 2 * np.abs(xr32).T @ dx + dx.T @ dx)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_narrow_dtypes_are_kept_and_computed_in_float32(dtype):
    x = jnp.asarray(RNG.standard_normal((4, 128)), dtype)
    y = rotation.rotate(x, 1)
    assert y.dtype == dtype
    ref = ref_rotate(np.asarray(x, np.float64), 1, 128, 0)
    # computed in float32 (rotate_bound), then rounded once to the narrow dtype (u_dtype relative)
    ud, b32 = unit_roundoff(dtype), rotate_bound(np.asarray(x, np.float64), 1, 128)
    assert_within(y, ref, ud * (np.abs(ref) + b32) + b32)
    assert rotation.unrotate(y, 1).dtype == dtype


class JitTest(parameterized.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_rotate_unrotate_jit_and_eager_agree(self):
        x = RNG.standard_normal((6, 3, 48)).astype(np.float32)
        rot = self.variant(lambda a: rotation.rotate(a, 2, seed=7))
        unrot = self.variant(lambda a: rotation.unrotate(a, 2, seed=7))
        y = rot(x)
        bound = rotate_bound(x, 2, 16)
        assert_within(y, ref_rotate(x, 2, 16, 7), bound)
        y_abs = ref_rotate(x, 2, 16, 0, absolute=True) + bound
        assert_within(unrot(y), x, rotate_bound(y_abs, 2, 16) + ref_rotate(bound, 2, 16, 0, absolute=True))
        hess = self.variant(lambda h: rotation.rotate_hessian(h, seed=7))
        h = x.reshape(-1, 48).T @ x.reshape(-1, 48)   # float32, 18 terms: gamma_18 |x|^T |x|
        xr = ref_rotate(x.reshape(-1, 48), 1, 16, 7)
        ra = np.abs(ref_rotation_matrix(48, 16, 7))
        gram = np.abs(x.reshape(-1, 48).astype(np.float64)).T @ np.abs(x.reshape(-1, 48).astype(np.float64))
        assert_within(hess(h), xr.T @ xr, (gamma(18) + 2 * gamma(18) * (1 + gamma(18))) * ra.T @ gram @ ra)


def test_errors():
    for n in (0, 3, 12, -4, 2.0, True):
        with pytest.raises(ValueError, match=r'power of two.*n='):
            rotation.hadamard(n)
    with pytest.raises(ValueError, match=r'odd length 7.*even'):
        rotation.block_size(7)
    with pytest.raises(ValueError, match=r'k must be a positive int'):
        rotation.block_size(0)
    for mb in (1, 3, 100, 0):
        with pytest.raises(ValueError, match=r'max_block must be a power of two >= 2'):
            rotation.block_size(128, max_block=mb)
    with pytest.raises(ValueError, match=r'signs: n must be'):
        rotation.signs(-1)
    x = jnp.ones((4, 6))
    for fn in (rotation.rotate, rotation.unrotate):
        with pytest.raises(ValueError, match=r'axis=2 is out of range'):
            fn(x, 2)
        with pytest.raises(ValueError, match=r'axis=-3 is out of range'):
            fn(x, -3)
        with pytest.raises(ValueError, match=r'odd length 3'):
            fn(jnp.ones((3, 4)), 0)
        with pytest.raises(ValueError, match=r'block=4 must be a power of two that divides the length 6'):
            fn(x, 1, block=4)
        with pytest.raises(ValueError, match=r'block=3 must be a power of two'):
            fn(x, 1, block=3)
        with pytest.raises(TypeError, match=r'x must be a floating-point array'):
            fn(jnp.ones((4, 6), jnp.int32), 1)
    with pytest.raises(ValueError, match=r'h must be a square'):
        rotation.rotate_hessian(jnp.ones((4, 6)))
    with pytest.raises(ValueError, match=r'block=8 must'):
        rotation.rotate_hessian(jnp.ones((6, 6)), block=8)
