"""GPTQ: weight quantization that minimises the layer's output error on calibration data.

Round-to-nearest minimises the weight error ``|W - Q|``; what matters is the
output error on real activations ``x``, ``trace((W - Q)^T H (W - Q))`` with
``H = x^T x``. GPTQ (Frantar et al., 2022) quantizes the contracting axis one
input channel ``k`` at a time and spreads that channel's rounding error over
the channels not yet quantized, weighted by the inverse Hessian, so later
channels compensate for it. With ``U`` the upper Cholesky factor of
``H^-1`` (``H^-1 = U^T U``), the update after channel ``k`` is::

    e = (w_k - q_k) / U[k, k];   w_j -= e * U[k, j]   for j > k

"Lazy batch" blocking applies the updates to the channels of the current
block one by one and to all later channels with one matmul per block.

With sub-channel tiles along the contracting axis, each tile's scale is
calibrated from the error-updated weights when the loop reaches it (GPTQ
group quantization); without tiles the per-channel scales come from the
original weight. The result has exactly the layout of :func:`qarray.quantize`
with every other axis channelwise, so it is a drop-in replacement.

Example:
  >>> import jax, qarray
  >>> from qarray import gptq
  >>> x = jax.random.normal(jax.random.key(0), (512, 64))
  >>> w = jax.random.normal(jax.random.key(1), (64, 32))
  >>> q = gptq.gptq_quantize(w, gptq.hessian(x), 'int4', tile_size=32)
  >>> q.scale.shape == qarray.quantize(w, 'int4', channelwise_axes=1, tiles={0: 32}).scale.shape
  True
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qarray import calibration as _calibration
from qarray import _layout, _numerics, qtypes, _quantize
from qarray._array import QArray

__all__ = ['hessian', 'gptq_quantize']

_HIGHEST = jax.lax.Precision.HIGHEST


def hessian(x: Any, axis: int = -1, *, token_clip: float | None = None) -> jax.Array:
    """Gram matrix ``[K, K]`` (float32) of activations ``x`` over every axis but ``axis``.

    ``sum_n x_n x_n^T`` over all positions ``n``; GPTQ is invariant to its
    scale, so sums over several batches can simply be added.

    ``token_clip``: scale each token (position) whose norm exceeds ``token_clip``
    times the median token norm of ``x`` down to that norm. LLMs route a few
    tokens (the first, delimiters) through "massive activations" hundreds of
    times larger than the rest; unclipped, those few dominate the Hessian and
    GPTQ trades every ordinary token's error for theirs (measured on SmolLM2's
    last MLP: 89% of ``sum x^2`` in 4 tokens, the median token's output error
    2.3x round-to-nearest's). None: the plain Gram matrix.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import gptq
      >>> x = jnp.array([[[1., 2.]], [[3., 0.]]])   # [batch, seq, K=2]
      >>> gptq.hessian(x).tolist()
      [[10.0, 2.0], [2.0, 4.0]]
      >>> gptq.hessian(jnp.array([[1., 0.], [0., 1.], [0., 100.]]), token_clip=2.0).tolist()   # 100 -> 2
      [[1.0, 0.0], [0.0, 5.0]]
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array of activations; got dtype {x.dtype}.")
    clip = check_token_clip(token_clip, 'token_clip')
    return _hessian_jit(x, _layout.normalize_axis(axis, x.ndim, what='activations'), clip)


def check_token_clip(value: Any, name: str) -> float | None:
    """``value`` as a float if it is None or a number >= 1, else ``ValueError`` naming ``name``.

    Example:
      >>> from qarray import gptq
      >>> gptq.check_token_clip(4, 'token_clip')
      4.0
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
        raise ValueError(f"{name} must be None or a number >= 1 (a multiple of the median token norm); "
                         f"got {value!r}.")
    return float(value)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _hessian_jit(x, axis, token_clip):
    x2 = jnp.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(jnp.float32)
    if token_clip is not None and x2.shape[0]:
        norm = jnp.sqrt(jnp.sum(x2 * x2, axis=1))
        tau = token_clip * jnp.median(norm)
        # tau == 0 (mostly all-zero tokens, e.g. padding): nothing to clip against, keep the plain sum
        x2 = x2 * jnp.where((tau > 0) & (norm > tau), tau / norm, 1.0)[:, None]
    return jnp.dot(x2.T, x2, precision=_HIGHEST)


def gptq_quantize(w: Any, h: Any, qtype: Any, *, axis: int = 0, tile_size: int | None = None,
                  calibration: str = 'absmax', damping: float = 0.01, block_size: int = 128,
                  scale_dtype: Any = None, pack_axis: int = -1, act_order: bool = False) -> QArray:
    """Quantize weight ``w`` with GPTQ error compensation along its contracting ``axis``.

    Args:
      w: floating weight of rank >= 2 (e.g. a Dense kernel ``[K, N]`` or an
        einsum weight ``[K, heads, dim]``); every axis but ``axis`` is an
        output channel with its own scale.
      h: ``[K, K]`` Hessian (Gram matrix) of the activations on that axis, see
        :func:`hessian`.
      qtype: any format :func:`qarray.quantize` takes.
      axis: the contracting axis of ``w`` (length ``K``).
      tile_size: sub-channel tile along ``axis``; each tile's scale is
        calibrated when GPTQ reaches it (a last tile shorter than
        ``tile_size`` -- 576 = 4 x 128 + 64 -- on its own rows only, as
        :func:`qarray.quantize` does). None: per channel.
      calibration: calibration spec, as for :func:`qarray.quantize`.
      damping: ``damping * mean(diag(h))`` is added to the diagonal of ``h``
        (stabilises the inverse); must be >= 0.
      block_size: channels per lazy-batch block (rounded to a multiple of
        ``tile_size``); affects speed (and float32 rounding) only.
      scale_dtype: dtype of scales (default ``w.dtype``).
      pack_axis: axis along which sub-byte formats are bit-packed.
      act_order: quantize the input channels in decreasing order of ``h``'s
        diagonal (the most excited first, "act-order"), so the channels that
        matter most are rounded while the most others remain to absorb
        their error. Every tile's scale is then calibrated from the original
        weight before the loop ("static groups"), so the stored layout is
        the same as without it.

    Returns:
      A :class:`QArray` with the layout of ``qarray.quantize(w, qtype,
      channelwise_axes=<other axes>, tiles={axis: tile_size} or None, ...)``.

    Input channels never excited (``h[k, k] == 0``) keep their weights: they
    are rounded to nearest and pass no error on. A ``ValueError`` is raised
    when ``h`` is not positive definite even after damping (eagerly; under
    ``jit`` at run time).

    Example:
      >>> import jax
      >>> from qarray import gptq
      >>> x = jax.random.normal(jax.random.key(0), (256, 64))
      >>> w = jax.random.normal(jax.random.key(1), (64, 16))
      >>> q = gptq.gptq_quantize(w, gptq.hessian(x), 'int8')
      >>> q.scale.shape, q.qvalue.dtype
      ((1, 16), dtype('int8'))
    """
    if isinstance(w, QArray):
        raise TypeError("w is already a QArray; pass the float weight.")
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"w must be a floating-point weight; got dtype {w.dtype}.")
    if w.ndim < 2:
        raise ValueError(f"w must have rank >= 2 (a contracting axis and output channels); got shape {w.shape}.")
    axis = _layout.normalize_axis(axis, w.ndim, what='w')
    k = w.shape[axis]
    h = jnp.asarray(h)
    if h.shape != (k, k):
        raise ValueError(f"h must be the [K, K] Hessian of the contracting axis {axis} of w (shape {w.shape}), "
                         f"i.e. shape {(k, k)}; got h of shape {h.shape}.")
    if tile_size is not None and (not isinstance(tile_size, (int, np.integer)) or isinstance(tile_size, bool)
                                  or tile_size <= 0):
        raise ValueError(f"tile_size={tile_size!r} must be None or a positive int (tiles along axis {axis} of w, "
                         f"length {k}; the last may be partial).")
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int (e.g. 128); got {block_size!r}.")
    if not isinstance(act_order, (bool, np.bool_)):
        raise TypeError(f"act_order must be a bool (True: largest diag(h) first); got {act_order!r}.")
    if not isinstance(damping, (int, float, np.floating, np.integer)) or not damping >= 0:
        raise ValueError(f"damping must be a float >= 0 (e.g. 0.01); got {damping!r}.")
    qt = qtypes.get(qtype)
    if qt.microscaling:
        raise ValueError(f"qtype {qt.name!r} is a microscaling format (its block scales are fixed by the format); "
                         "GPTQ rounds against plain per-channel or per-tile scales: use its element format with "
                         "tile_size (e.g. 'float4_e2m1fn', tile_size=32) or qarray.quantize.")
    _calibration.parse(calibration)
    scale_dtype = jnp.dtype(scale_dtype or w.dtype)
    if not jnp.issubdtype(scale_dtype, jnp.floating):
        raise TypeError(f"scale_dtype must be a floating dtype (float32, bfloat16, float16); got {scale_dtype}.")
    if qt.packed:
        _layout.normalize_axis(pack_axis, w.ndim, 'pack_axis', 'w')

    tile = int(tile_size) if tile_size is not None and tile_size < k else None
    block = _block(k, tile, int(block_size))
    q, factor_ok = _gptq_jit(w, h, jnp.float32(damping), axis, qt, calibration, tile, block, scale_dtype,
                             int(pack_axis), bool(act_order))
    _quantize.check_when_known(factor_ok, _raise_not_pd)
    return q


def _block(k: int, tile: int | None, block_size: int) -> int:
    """Lazy-batch block: at most ``k``, and a whole number of tiles."""
    if tile is None:
        return min(block_size, k)
    return tile * max(1, min(block_size, k) // tile)


def _raise_not_pd(all_finite) -> None:
    if not bool(all_finite):
        raise ValueError("h is not positive definite after damping (its Cholesky factor is not finite); "
                         "pass a larger damping (e.g. 0.01 or 0.1) or collect more calibration data.")


def _inverse_cholesky(h: jax.Array, damping: jax.Array) -> jax.Array:
    """Upper-triangular ``U`` with ``U^T U = inv(H_damped)`` (NaN if ``H_damped`` is not positive definite).

    With ``J`` the reversal permutation, ``J H J = M M^T`` (lower ``M``) gives
    ``H = V V^T`` with upper ``V = J M J``, so ``inv(H) = V^-T V^-1`` and
    ``U = V^-1``: one Cholesky and one triangular inverse, no explicit inverse.
    """
    h = h.astype(jnp.float32)
    diag = jnp.diagonal(h)
    h = h + jnp.diag(jnp.where(diag == 0, 1.0, 0.0))  # dead channels: unit curvature, no coupling
    h = h + jnp.eye(h.shape[0], dtype=h.dtype) * (damping * jnp.mean(jnp.diagonal(h)))
    m = jnp.linalg.cholesky(h[::-1, ::-1])
    v = m[::-1, ::-1]
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    u = jax.scipy.linalg.solve_triangular(v, eye, lower=False)
    return jnp.triu(u)


def _group_scale(cols: jax.Array, qt, calibration: str, scale_dtype):
    """Scale (and zero point or None) of each output channel over ``cols`` [rows, N] (reduced over rows)."""
    rng = _calibration.calibrate(calibration, cols, (0,), qt)
    return _numerics.scale_and_zero_point(rng.lo, rng.hi, rng.symmetric, qt, scale_dtype)


def _round(v: jax.Array, scale: jax.Array, zp: jax.Array | None, qt) -> jax.Array:
    """Nearest representable value of one input channel ``v`` [N] (float32), via the core's codes."""
    c = _numerics.to_codes(v, scale, zp, qt, calibrated=True)
    return _numerics.from_codes(c, scale, zp, qt, jnp.float32)


# One compiled program (factor, loop, packing) per layout: compiling dominates small calls on CPU.
@functools.partial(jax.jit, static_argnums=tuple(range(3, 11)))
def _gptq_jit(w, h, damping, axis, qt, calibration, tile, block, scale_dtype, pack_axis, act_order
              ) -> tuple[QArray, jax.Array]:
    """GPTQ on ``w`` along ``axis``: the QArray in quantize's layout, and whether ``h``'s factor is finite."""
    k = w.shape[axis]
    wk = jnp.moveaxis(w, axis, 0)  # [K, *others]
    others = wk.shape[1:]
    w2 = wk.reshape(k, -1).astype(jnp.float32)  # [K, N]: an input channel is a contiguous row
    if act_order:
        # Static groups: the tiles' scales from the original weight, then the rows in decreasing diag(h)
        # (a stable sort: ties and dead channels keep their order), each with its own tile's scale.
        perm = jnp.argsort(-jnp.diagonal(h).astype(jnp.float32), stable=True)
        scale, zp = _tile_scales(w2, tile, qt, calibration, scale_dtype)
        group = perm // tile if tile is not None else jnp.zeros((k,), jnp.int32)
        u = _inverse_cholesky(h[perm][:, perm], damping)
        q2p, _, _ = _gptq_2d(w2[perm], u, qt, calibration, tile, block, scale_dtype, static=(scale, zp, group))
        q2 = jnp.zeros_like(q2p).at[perm].set(q2p)
    else:
        u = _inverse_cholesky(h, damping)
        q2, scale, zp = _gptq_2d(w2, u, qt, calibration, tile, block, scale_dtype)
    factor_ok = jnp.all(jnp.isfinite(u))

    def restore(a):  # [K or ceil(K/tile) or 1, N] -> w's layout
        return jnp.moveaxis(a.reshape((a.shape[0],) + others), 0, axis)

    # The codes come from the GPTQ values (exactly code * scale, so they re-quantize to the same codes).
    if tile is None or k % tile == 0:
        q = _quantize.quantize_with_scale(restore(q2), qt, restore(scale), None if zp is None else restore(zp),
                                          pack_axis=pack_axis)
    else:  # a partial last tile: the tile size is static metadata (it cannot be read off the shapes)
        rows = lambda a: _layout.broadcast_scale(a, q2.shape, {0: tile})
        c = _numerics.to_codes(q2, rows(scale).astype(jnp.float32), None if zp is None else rows(zp), qt,
                               calibrated=True)
        q = _quantize._pack(restore(c), restore(scale), None if zp is None else restore(zp), qt, restore(q2),
                            pack_axis, tile_sizes=((axis - w.ndim, tile),))
    # The values were float32; the result dequantizes to w's dtype, as quantize's does.
    return q.replace(dtype=w.dtype), factor_ok


def _tile_scales(w: jax.Array, tile: int | None, qt, calibration: str, scale_dtype):
    """Scales (and zero points or None) of ``w`` [K, N] per tile of ``tile`` rows along K ([ceil(K/tile), N]; per
    channel [1, N] when ``tile`` is None), exactly as :func:`qarray.quantize` computes them (its codes are unused:
    XLA drops them)."""
    spec = _quantize.resolve_args(w, qt, (1,), None if tile is None else {0: tile}, calibration, scale_dtype)
    _, scale, zp = _quantize.quantize_codes(w, spec)
    return scale, zp


def _gptq_2d(w, u, qt, calibration, tile, block, scale_dtype, static=None):
    """GPTQ on ``w`` [K, N] (rows = input channels) with ``U`` [K, K]; lazy batches of ``block`` rows.

    ``static = (scales [G, N], zero points [G, N] or None, group [K])`` fixes every row's scale beforehand
    (row ``r`` uses ``scales[group[r]]``); the scales are returned unchanged.
    """
    k, n = w.shape
    nblocks = -(-k // block)
    kp = nblocks * block
    if kp > k:  # pad with zero rows whose U block is the identity: they neither get nor pass on error
        w = jnp.pad(w, ((0, kp - k), (0, 0)))
        u = jnp.pad(u, ((0, kp - k), (0, kp - k))) + jnp.diag((jnp.arange(kp) >= k).astype(u.dtype))
    if tile is None and static is None:  # per-channel scales from the original weight
        static = _group_scale(w[:k], qt, calibration, scale_dtype) + (jnp.zeros((k,), jnp.int32),)
    if static is not None:  # no per-tile calibration in the loop: one tile per block
        tile = None
        fixed_scale, fixed_zp, group = static
        group = jnp.pad(group.astype(jnp.int32), (0, kp - k))  # padded rows are zero: any scale rounds them to 0
        scale_like, zp_like = fixed_scale, fixed_zp
    t = tile or block
    tiles_per_block = block // t
    tail = k % t if tile is not None else 0  # rows of a partial last tile (its scale sees only those)
    if tile is not None:
        scale_like, zp_like = jax.eval_shape(
            lambda c: _group_scale(c, qt, calibration, scale_dtype), jax.ShapeDtypeStruct((t, n), jnp.float32))
    rows = jnp.arange(kp)

    def block_step(w, b):
        start = b * block
        w1 = jax.lax.dynamic_slice_in_dim(w, start, block, axis=0)  # [B, N]
        u1 = jax.lax.dynamic_slice(u, (start, start), (block, block))

        def tile_step(j, carry):
            w1, q1, e1, scales, zps = carry
            t0 = j * t
            if tile is None:
                s, z = None, None
            else:  # this tile's scale, from the weights as updated so far
                rows_of = lambda size: lambda w1: _group_scale(jax.lax.dynamic_slice_in_dim(w1, t0, size, axis=0),
                                                               qt, calibration, scale_dtype)
                if tail:  # the partial tile (index k // t) calibrates on its own rows, not the zero padding
                    s, z = jax.lax.cond(b * tiles_per_block + j == k // t, rows_of(tail), rows_of(t), w1)
                else:
                    s, z = rows_of(t)(w1)
                scales = jax.lax.dynamic_update_slice_in_dim(scales, s, j, axis=0)
                if z is not None:
                    zps = jax.lax.dynamic_update_slice_in_dim(zps, z, j, axis=0)

            def column_step(i, carry):
                w1, q1, e1 = carry
                r = t0 + i
                if tile is None and fixed_scale.shape[0] == 1:  # per channel: one scale row for every input row
                    s1, z1 = fixed_scale[0], None if fixed_zp is None else fixed_zp[0]
                elif tile is None:
                    g = group[start + r]
                    s1, z1 = fixed_scale[g], None if fixed_zp is None else fixed_zp[g]
                else:
                    s1, z1 = s[0], None if z is None else z[0]
                v = w1[r]
                qv = _round(v, s1, z1, qt)
                e = (v - qv) / u1[r, r]
                # U is upper triangular, so rows before r are untouched (row r itself becomes qv, unused).
                w1 = w1 - u1[r][:, None] * e[None, :]
                return w1, q1.at[r].set(qv), e1.at[r].set(e)

            w1, q1, e1 = jax.lax.fori_loop(0, t, column_step, (w1, q1, e1))
            return w1, q1, e1, scales, zps

        zeros = jnp.zeros((block, n), jnp.float32)
        scales0 = jnp.zeros((tiles_per_block, n), scale_like.dtype)
        zps0 = None if zp_like is None else jnp.zeros((tiles_per_block, n), zp_like.dtype)
        _, q1, e1, scales, zps = jax.lax.fori_loop(0, tiles_per_block, tile_step,
                                                   (w1, zeros, zeros, scales0, zps0))
        # One matmul carries this block's errors to every later row (earlier/own rows masked out).
        u_rows = jax.lax.dynamic_slice_in_dim(u, start, block, axis=0)  # [B, Kp]
        u_rows = jnp.where(rows[None, :] >= start + block, u_rows, 0.0)
        w = w - jax.lax.dot_general(u_rows, e1, (((0,), (0,)), ((), ())), precision=_HIGHEST)
        return w, (q1, scales, zps)

    _, (q, scales, zps) = jax.lax.scan(block_step, w, jnp.arange(nblocks))
    q = q.reshape(kp, n)[:k]
    if tile is None:
        return q, fixed_scale, fixed_zp
    nt = -(-k // t)
    scales = scales.reshape(kp // t, n)[:nt]
    zps = None if zps is None else zps.reshape(kp // t, n)[:nt]
    return q, scales, zps
