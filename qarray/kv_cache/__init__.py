"""A quantized key/value cache for attention decoding.

Long-context decoding reads the whole KV cache for every new token, so its
cost is bound by the cache's bytes. :class:`KVCache` stores the codes and
scales of keys and values of shape ``[batch, max_len, kv_heads, head_dim]``
(read them as :class:`~qarray.QArray` views: ``cache.k``, ``cache.v``):

* ``'int8'`` and ``'fp8'`` (``float8_e4m3fn``, saturating at 448): one scale
  per token per head (``scale`` of shape ``[B, T, H, 1]``), i.e. every token's
  head vector is quantized on its own (absmax), so writing a token never
  touches another token's scale;
* ``'int4'``: the same, or with ``tile=32`` / ``64`` one scale per tile of
  ``head_dim`` (``scale`` ``[B, T, H, head_dim // tile]``); codes are
  bit-packed two per byte along ``head_dim``, so a token's write is whole bytes;
* ``qtype=None``: a float cache with the same interface, for reference.

:func:`update` quantizes new tokens and writes codes and scales in place
(``lax.dynamic_update_slice``; jit it with ``donate_argnums=0`` and XLA
updates the buffers in place). :func:`attention` runs grouped-query attention
over the cache block by block (a ``fori_loop`` over ``block``-token slices with
an online-softmax accumulator, as flash attention does), dequantizing only the
current block inside the compiled program: the cache is never materialised in
float. With ``lengths`` it stops after the last filled block.

Example:
  >>> import jax.numpy as jnp
  >>> from qarray import kv_cache
  >>> cache = kv_cache.init(2, 256, kv_heads=2, head_dim=16, qtype='fp8')  # 2 rows of up to 256 tokens
  >>> kv = jnp.sin(jnp.arange(2 * 100 * 2 * 16.)).reshape(2, 100, 2, 16)
  >>> cache = kv_cache.update(cache, kv, kv, 0)        # prefill 100 tokens per row at position 0
  >>> q = jnp.ones((2, 1, 8, 16))                      # one new token; 8 query heads share 2 kv heads
  >>> kv_cache.attention(q, cache, jnp.array([100, 37]), block=64).shape  # row 1 sees 37 tokens only
  (2, 1, 8, 16)
"""

from __future__ import annotations

from qarray.kv_cache._attention import attention
from qarray.kv_cache._cache import SUPPORTED_QTYPES, KVCache, init, nbytes, update

__all__ = ['KVCache', 'init', 'update', 'attention', 'nbytes', 'SUPPORTED_QTYPES']
