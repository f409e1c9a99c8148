"""Attention over a :class:`~qarray.kv_cache.KVCache`, read block by block with an online softmax.

Example:
  >>> import jax.numpy as jnp
  >>> from qarray import kv_cache
  >>> from qarray.kv_cache._attention import attention
  >>> cache = kv_cache.update(kv_cache.init(1, 8, 1, 4, 'int8'), jnp.ones((1, 3, 1, 4)), jnp.ones((1, 3, 1, 4)), 0)
  >>> attention(jnp.ones((1, 1, 2, 4)), cache, 3).shape
  (1, 1, 2, 4)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import qarray
from qarray.kv_cache._cache import KVCache, _positive_int, _view

__all__ = ['attention']


def attention(q: Any, cache: KVCache, lengths_or_mask: Any, *, block: int = 512,
              softmax_scale: float | None = None, precision: Any = None) -> jax.Array:
    """Grouped-query attention of ``q`` over the cache, read block by block.

    A ``fori_loop`` over ``block``-token slices of the cache: each step slices
    the codes and scales of one block, dequantizes just that block, and folds
    it into an online-softmax accumulator (running max, running sum, running
    weighted values), as flash attention does. The full cache is never
    dequantized; temporaries are O(block). Softmax and accumulation run in
    float32. Masked keys get exactly zero weight, and masked value rows are
    zeroed before use, so whatever is stored there (stale tokens, garbage, even
    NaN) cannot reach the output.

    Query head ``j`` reads kv head ``j // (Hq // kv_heads)`` (consecutive query
    heads share a kv head, as ``jnp.repeat(k, Hq // kv_heads, axis=2)``).

    Args:
      q: queries ``[batch, S, Hq, head_dim]``, ``Hq`` a multiple of ``kv_heads``.
      cache: the cache, already holding the S new tokens (call :func:`update` first).
      lengths_or_mask: either

        * integer ``lengths`` ``[batch]`` (or a scalar for all rows): row ``b``
          holds ``lengths[b]`` tokens, the last ``S`` of which are the queries'
          own, so query ``i`` sits at position ``lengths[b] - S + i`` and attends
          causally to tokens ``0 .. lengths[b] - S + i``. The loop stops after
          the last block any row needs. A row (or query) with nothing to attend
          to (``lengths[b] == 0``) outputs zeros; or
        * a boolean mask of the keys each query may see, ``[batch, max_len]``
          (the same for all queries) or ``[batch, S, max_len]``; every block is read.
      block: tokens per block (clamped to ``max_len``; need not divide it: the
        last block is aligned to the end and skips tokens already read).
      softmax_scale: multiplies the logits; default ``1 / sqrt(head_dim)``.
      precision: ``lax.Precision`` for the two dots (backend default if None;
        ``HIGHEST`` for full float32 on TPU/GPU).

    Returns:
      ``[batch, S, Hq, head_dim]`` in ``q``'s dtype.

    With ``lengths`` the loop's trip count is data-dependent (a ``while`` loop),
    which is what skips unfilled blocks; such a loop has no reverse-mode
    gradient, so this function is for inference (a mask runs a fixed count).

    Raises:
      ValueError / TypeError naming ``q``, ``lengths_or_mask``, ``block`` or ``softmax_scale``.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import kv_cache
      >>> kv = jnp.sin(jnp.arange(2 * 100 * 2 * 16.)).reshape(2, 100, 2, 16)
      >>> q = jnp.cos(jnp.arange(2 * 1 * 8 * 16.)).reshape(2, 1, 8, 16)
      >>> lengths = jnp.array([100, 37])                  # row 1 holds 37 tokens
      >>> out = {}
      >>> for qtype in ('fp8', None):                     # fp8 cache vs float cache
      ...     cache = kv_cache.update(kv_cache.init(2, 256, 2, 16, qtype), kv, kv, 0)
      ...     out[qtype] = kv_cache.attention(q, cache, lengths, block=64)
      >>> out['fp8'].shape, bool(jnp.abs(out['fp8'] - out[None]).max() < 0.05 * jnp.abs(out[None]).max())
      ((2, 1, 8, 16), True)
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache (see kv_cache.init); got {type(cache).__name__}.")
    B, T, H, D = cache.shape
    q = jnp.asarray(q)
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q must be a floating-point array; got dtype {q.dtype}.")
    if q.ndim != 4 or q.shape[0] != B or q.shape[3] != D or q.shape[2] % H or q.shape[2] == 0:
        raise ValueError(f"q must have shape [batch={B}, S, Hq, head_dim={D}] with Hq a multiple of "
                         f"kv_heads={H}; got {tuple(q.shape)}.")
    S = q.shape[1]
    if S > T:
        raise ValueError(f"q has {S} query tokens but the cache holds at most max_len={T}.")
    block = min(_positive_int(block, 'block'), T)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float, np.floating)):
        raise TypeError(f"softmax_scale must be a Python float; got {softmax_scale!r}.")
    elif not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be finite and > 0; got {softmax_scale}.")
    lm = jnp.asarray(lengths_or_mask)
    if lm.dtype == jnp.bool_:
        if lm.shape not in ((B, T), (B, S, T)):
            raise ValueError(f"a boolean lengths_or_mask must have shape [batch, max_len] = ({B}, {T}) or "
                             f"[batch, S, max_len] = ({B}, {S}, {T}); got {lm.shape}.")
        lm = jnp.broadcast_to(lm[:, None, :] if lm.ndim == 2 else lm, (B, S, T))
        use_lengths = False
    elif jnp.issubdtype(lm.dtype, jnp.integer):
        if lm.shape not in ((), (B,)):
            raise ValueError(f"integer lengths_or_mask (lengths) must be a scalar or shape ({B},); got {lm.shape}.")
        try:
            concrete = np.asarray(lm)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            concrete = None
        if concrete is not None and (concrete.min() < 0 or concrete.max() > T):
            raise ValueError(f"lengths must lie in [0, max_len={T}]; got {concrete.tolist()}.")
        lm = jnp.broadcast_to(lm.astype(jnp.int32), (B,))
        use_lengths = True
    else:
        raise TypeError("lengths_or_mask must be integer lengths [batch] or a boolean mask "
                        f"[batch, (S,) max_len]; got dtype {lm.dtype}.")
    return _attention(q, cache, lm, jnp.float32(softmax_scale), use_lengths=use_lengths, block=block,
                      precision=precision)


def _block_values(data: jax.Array, scale: jax.Array | None, cache: KVCache, start: jax.Array,
                  block: int) -> jax.Array:
    """Tokens ``[start, start + block)`` as float ``[B, block, H, D]``: only this block is dequantized."""
    take = lambda a: lax.dynamic_slice_in_dim(a, start, block, axis=1)
    if not cache.quantized:
        return take(data)
    return qarray.dequantize(_view(take(data), take(scale), cache))


@functools.partial(jax.jit, static_argnames=('use_lengths', 'block', 'precision'))
def _attention(q, cache, lm, softmax_scale, *, use_lengths, block, precision):
    B, T, H, D = cache.shape
    _, S, Hq, _ = q.shape
    G = Hq // H
    f32 = jnp.float32
    qs = (q.astype(f32) * softmax_scale).reshape(B, S, H, G, D)
    n_total = -(-T // block)
    if use_lengths:
        qpos = lm[:, None] - S + jnp.arange(S, dtype=jnp.int32)  # [B, S] position of each query
        n_blocks = jnp.minimum((jnp.max(lm) + block - 1) // block, n_total)
    else:
        n_blocks = n_total

    def body(i, carry):
        m, l, acc = carry
        first_new = i * block
        start = jnp.minimum(first_new, T - block)  # the last block is end-aligned
        t = start + jnp.arange(block, dtype=jnp.int32)  # token positions in this block
        fresh = t >= first_new  # an end-aligned last block re-covers tokens already read
        if use_lengths:
            valid = fresh & (t[None, None, :] <= qpos[:, :, None])  # [B, S, block]
            token_used = fresh & (t[None, :] < lm[:, None])  # [B, block]
        else:
            valid = fresh & lax.dynamic_slice_in_dim(lm, start, block, axis=2)
            token_used = jnp.any(valid, axis=1)
        kb = _block_values(cache.k_data, cache.k_scale, cache, start, block).astype(f32)
        vb = _block_values(cache.v_data, cache.v_scale, cache, start, block).astype(f32)
        vb = jnp.where(token_used[:, :, None, None], vb, 0.0)  # 0 * NaN garbage would be NaN
        s = jnp.einsum('bshgd,bthd->bshgt', qs, kb, precision=precision, preferred_element_type=f32)
        s = jnp.where(valid[:, :, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing seen yet: keep exp(-inf) = 0
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        l = l * alpha + jnp.sum(p, axis=-1)
        acc = acc * alpha[..., None] + jnp.einsum('bshgt,bthd->bshgd', p, vb, precision=precision,
                                                  preferred_element_type=f32)
        return m_new, l, acc

    init = (jnp.full((B, S, H, G), -jnp.inf, f32), jnp.zeros((B, S, H, G), f32),
            jnp.zeros((B, S, H, G, D), f32))
    _, l, acc = lax.fori_loop(0, n_blocks, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # rows with nothing to attend to -> 0
    return out.reshape(B, S, Hq, D).astype(q.dtype)
