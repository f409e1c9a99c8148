"""Incoherence processing: block-Hadamard rotations that spread outliers before quantizing.

The rotation of a vector along one axis is ``x -> (x * signs) @ blockdiag(H)``
with ``H`` the normalised Sylvester Hadamard matrix (symmetric and
orthonormal) and ``signs`` a fixed ±1 vector. Writing ``R = D B`` (``D`` the
sign diagonal, ``B`` the block-diagonal Hadamard), ``R`` is orthogonal, so a
matmul is unchanged when the activation is rotated along its last axis and the
weight along its contracting axis::

    x @ W == rotate(x, -1) @ rotate(W, 0)      # (x D B)(B D W) = x W

A rotated tensor has no single large entries left (each output mixes a whole
block), which makes it far friendlier to low-bit formats. ``signs`` is a
numpy constant derived from the seed, so a jitted program folds it in and
nothing extra needs storing.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from qarray import rotation
  >>> x = jax.random.normal(jax.random.key(0), (4, 256))
  >>> w = jax.random.normal(jax.random.key(1), (256, 8))
  >>> y = rotation.rotate(x, -1) @ rotation.rotate(w, 0)
  >>> bool(jnp.allclose(y, x @ w, atol=1e-3))
  True
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qarray import _layout

__all__ = ['hadamard', 'block_size', 'signs', 'rotate', 'unrotate', 'rotate_hessian']


def _is_power_of_two(n: Any) -> bool:
    return isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1 and (n & (n - 1)) == 0


@functools.lru_cache(maxsize=None)
def _hadamard_np(n: int) -> np.ndarray:
    """float64 normalised Sylvester Hadamard matrix (read-only, cached)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    h = h / np.sqrt(n)
    h.setflags(write=False)
    return h


def hadamard(n: int, dtype: Any = jnp.float32) -> jax.Array:
    """The ``n x n`` normalised Sylvester Hadamard matrix: symmetric, ``H @ H.T = I``.

    Args:
      n: size, a power of two >= 1.
      dtype: dtype of the result.

    Example:
      >>> from qarray import rotation
      >>> rotation.hadamard(2).tolist()
      [[0.7071067690849304, 0.7071067690849304], [0.7071067690849304, -0.7071067690849304]]
    """
    if not _is_power_of_two(n):
        raise ValueError(f"hadamard: n must be a power of two >= 1 (1, 2, 4, ...); got n={n!r}.")
    return jnp.asarray(_hadamard_np(int(n)), dtype)


def block_size(k: int, max_block: int = 128) -> int:
    """The Hadamard block for an axis of length ``k``: the largest power of two dividing ``k``, <= ``max_block``.

    Example:
      >>> from qarray import rotation
      >>> rotation.block_size(384), rotation.block_size(96), rotation.block_size(1536, max_block=256)
      (128, 32, 256)
    """
    if not _is_power_of_two(max_block) or max_block < 2:
        raise ValueError(f"max_block must be a power of two >= 2 (2, 4, ..., 128, ...); got max_block={max_block!r}.")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"the axis length k must be a positive int; got k={k!r}.")
    b = min(int(k) & -int(k), int(max_block))  # k & -k: the largest power of two dividing k
    if b < 2:
        raise ValueError(f"cannot rotate an axis of odd length {k}: the Hadamard rotation needs an even "
                         "axis length (pad the axis to a multiple of 2, ideally of 128).")
    return b


def signs(n: int, seed: int = 0) -> np.ndarray:
    """A fixed ±1 float32 vector of length ``n``, a pure function of ``seed`` (numpy ``default_rng``).

    Example:
      >>> from qarray import rotation
      >>> s = rotation.signs(8)
      >>> s.dtype, sorted(set(s.tolist())) == [-1.0, 1.0], bool((s == rotation.signs(8)).all())
      (dtype('float32'), True, True)
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ValueError(f"signs: n must be a non-negative int; got n={n!r}.")
    bits = np.random.default_rng(seed).integers(0, 2, size=int(n))
    return (2.0 * bits - 1.0).astype(np.float32)


def _check(x: Any, axis: int, block: int | None, name: str = 'x') -> tuple[jax.Array, int, int]:
    """Validated (x, non-negative axis, block)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array to rotate; got dtype {x.dtype}.")
    axis = _layout.normalize_axis(axis, x.ndim)
    k = x.shape[axis]
    if block is None:
        block = block_size(k)
    elif not _is_power_of_two(block) or k % block:
        raise ValueError(f"block={block!r} must be a power of two that divides the length {k} of axis {axis}.")
    return x, axis, int(block)


def _signs_along(n: int, seed: int, axis: int, ndim: int) -> np.ndarray:
    return signs(n, seed).reshape([n if a == axis else 1 for a in range(ndim)])


def _apply_blocks(x: jax.Array, axis: int, block: int) -> jax.Array:
    """``x @ blockdiag(H)`` along ``axis``: split it into (k / block, block) and contract the block with H."""
    k = x.shape[axis]
    xr = x.reshape(x.shape[:axis] + (k // block, block) + x.shape[axis + 1:])
    # HIGHEST: GPU would otherwise run the product in TF32 and lose ~3 digits.
    y = jnp.tensordot(xr, _hadamard_np(block).astype(x.dtype), axes=([axis + 1], [0]),
                      precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(y, -1, axis + 1).reshape(x.shape)


def _compute_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)  # bf16/f16 -> f32; f32/f64 unchanged


def rotate(x: Any, axis: int, *, block: int | None = None, seed: int = 0) -> jax.Array:
    """Rotate ``x`` along ``axis``: ``(x * signs) @ blockdiag(H)``; keeps ``x``'s dtype.

    Args:
      x: floating-point array of any rank.
      axis: the axis to rotate (negative counts from the end).
      block: Hadamard block size, a power of two dividing ``x.shape[axis]``;
        default :func:`block_size` of that length (at most 128).
      seed: seed of the ±1 signs; use the same seed (and block) on both
        operands of a matmul.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import rotation
      >>> x = jnp.array([[3., 0., 0., 0.]])
      >>> jnp.abs(rotation.rotate(x, -1)).tolist()   # one spike spreads over its whole block
      [[1.5, 1.5, 1.5, 1.5]]
    """
    x, axis, block = _check(x, axis, block)
    xc = x.astype(_compute_dtype(x.dtype))
    y = _apply_blocks(xc * _signs_along(x.shape[axis], seed, axis, x.ndim).astype(xc.dtype), axis, block)
    return y.astype(x.dtype)


def unrotate(x: Any, axis: int, *, block: int | None = None, seed: int = 0) -> jax.Array:
    """Inverse of :func:`rotate` (same ``axis``, ``block``, ``seed``): ``(x @ blockdiag(H)) * signs``.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import rotation
      >>> x = jnp.arange(8.).reshape(2, 4)
      >>> bool(jnp.allclose(rotation.unrotate(rotation.rotate(x, 1), 1), x, atol=1e-6))
      True
    """
    x, axis, block = _check(x, axis, block)
    xc = x.astype(_compute_dtype(x.dtype))
    y = _apply_blocks(xc, axis, block) * _signs_along(x.shape[axis], seed, axis, x.ndim).astype(xc.dtype)
    return y.astype(x.dtype)


def rotate_hessian(h: Any, *, block: int | None = None, seed: int = 0) -> jax.Array:
    """The Gram matrix of rotated activations: ``R.T @ h @ R`` for ``h = x.T @ x`` and ``x -> x @ R``.

    Lets GPTQ run on a rotated weight without re-collecting activations:
    ``rotate_hessian(x.T @ x) == rotate(x, -1).T @ rotate(x, -1)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from qarray import rotation
      >>> x = jax.random.normal(jax.random.key(0), (32, 16))
      >>> xr = rotation.rotate(x, -1)
      >>> bool(jnp.allclose(rotation.rotate_hessian(x.T @ x), xr.T @ xr, atol=1e-3))
      True
    """
    h = jnp.asarray(h)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"h must be a square [K, K] Gram matrix; got shape {h.shape}.")
    _check(h, 0, block, 'h')
    # R.T h R: columns of h get R.T = B D (rotate along axis 0), then rows get R (rotate along axis 1).
    return rotate(rotate(h, 0, block=block, seed=seed), 1, block=block, seed=seed)
