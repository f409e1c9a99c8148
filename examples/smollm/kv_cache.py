"""The attention key/value cache: one small pytree per layer, replaceable by another implementation.

The model only touches a cache through two calls, so a different storage (a
quantized cache, say) is a drop-in class with the same two methods:

* ``update(cache, k, v, positions) -> cache``: write this step's keys and
  values, ``(batch, steps, kv_heads, head_dim)`` each, **after** rotary
  embedding, at ``positions`` ``(batch, steps)`` int32 (consecutive within a
  row, all below ``max_len``); returns the new cache (functional, so it works
  under ``jax.jit``);
* ``read(cache) -> (k, v)``: every slot as float arrays ``(batch, max_len,
  kv_heads, head_dim)``. The attention masks slots after each query's position
  itself, so slots never written are never used.

A cache may also have ``attend(q, positions) -> (batch, steps, heads * head_dim)``:
the attention over its slots, computed its own way; the model then calls it
instead of ``read``.

:class:`FloatKVCache` (the default) keeps float32 arrays. :class:`QuantizedKVCache`
stores keys and values as int8 / fp8 / int4 codes with a scale per token and
head (:mod:`qarray.kv_cache`) and attends block by block, dequantizing one block
at a time inside the compiled program (:func:`qarray.kv_cache.attention`);
:func:`quantized` gives the ``cache_cls`` for one format. ``init_caches``
builds one cache per layer with whichever ``cache_cls`` is passed (anything with
``init(batch, max_len, kv_heads, head_dim)``).

Example:
  >>> from examples.smollm.kv_cache import FloatKVCache, read, update
  >>> import jax.numpy as jnp
  >>> c = FloatKVCache.init(batch=1, max_len=4, kv_heads=1, head_dim=2)
  >>> c = update(c, jnp.ones((1, 1, 1, 2)), 2 * jnp.ones((1, 1, 1, 2)), jnp.array([[1]]))
  >>> k, v = read(c)
  >>> k[0, :, 0, 0].tolist(), v[0, :, 0, 0].tolist()
  ([0.0, 1.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0])
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

__all__ = ['KVCache', 'FloatKVCache', 'QuantizedKVCache', 'QuantizedCacheClass', 'quantized', 'update',
           'read', 'init_caches']


class KVCache(Protocol):
    """What the attention needs from a cache (see the module docstring)."""

    def update(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> 'KVCache': ...

    def read(self) -> tuple[jax.Array, jax.Array]: ...


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FloatKVCache:
    """Keys and values in float arrays of shape ``(batch, max_len, kv_heads, head_dim)``.

    Example:
      >>> from examples.smollm.kv_cache import FloatKVCache
      >>> c = FloatKVCache.init(batch=2, max_len=8, kv_heads=3, head_dim=64)
      >>> c.k.shape, c.max_len
      ((2, 8, 3, 64), 8)
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def init(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype: Any = jnp.float32
             ) -> 'FloatKVCache':
        """An all-zero cache with ``max_len`` slots."""
        shape = (batch, max_len, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))  # two buffers: both may be donated

    @property
    def max_len(self) -> int:
        """Number of slots (positions) the cache holds."""
        return self.k.shape[1]

    def update(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> 'FloatKVCache':
        """A cache with ``k``/``v`` ``(batch, steps, kv_heads, head_dim)`` written at ``positions`` ``(batch, steps)``.

        Each row's steps must be consecutive positions (as prefill and decode
        produce): row ``b`` is written as one slice starting at ``positions[b, 0]``
        (XLA clamps a slice that would run past ``max_len``, so keep positions below it).
        """
        if k.shape != v.shape or k.shape[:2] != positions.shape:
            raise ValueError(f"k {k.shape}, v {v.shape} and positions {positions.shape} disagree")
        start = positions[:, 0]  # steps are consecutive positions: one slice write per row

        def write(buf, new, s):
            return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (s, 0, 0))

        return FloatKVCache(jax.vmap(write)(self.k, k, start), jax.vmap(write)(self.v, v, start))

    def read(self) -> tuple[jax.Array, jax.Array]:
        """``(k, v)``, every slot."""
        return self.k, self.v


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKVCache:
    """A :class:`qarray.kv_cache.KVCache` behind this module's cache interface (``update``, ``read``, ``attend``).

    ``inner`` holds the codes and scales (one scale per token per kv head, or per
    ``tile`` values of ``head_dim`` for int4). :meth:`attend` is
    :func:`qarray.kv_cache.attention` with ``lengths = last position + 1``: each
    query at position ``p`` sees slots ``0..p`` (the steps written by this call
    are the last ones, as ``attention`` expects).

    Example:
      >>> import jax.numpy as jnp
      >>> from examples.smollm.kv_cache import quantized
      >>> c = quantized('int8').init(batch=1, max_len=8, kv_heads=1, head_dim=4)
      >>> c = c.update(jnp.ones((1, 2, 1, 4)), 2 * jnp.ones((1, 2, 1, 4)), jnp.array([[0, 1]]))
      >>> c.attend(jnp.ones((1, 2, 3, 4)), jnp.array([[0, 1]])).shape  # 3 query heads share the kv head
      (1, 2, 12)
    """

    inner: Any

    @classmethod
    def init(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, qtype: str = 'int8',
             tile: int | None = None) -> 'QuantizedKVCache':
        """An empty cache of ``qtype`` (``'int8'``, ``'fp8'``, ``'int4'``; ``tile`` for int4 sub-vectors)."""
        from qarray import kv_cache as qkv
        return cls(qkv.init(batch, max_len, kv_heads, head_dim, qtype, tile=tile))

    @property
    def max_len(self) -> int:
        """Number of slots (positions) the cache holds."""
        return self.inner.max_len

    def update(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> 'QuantizedKVCache':
        """Quantize and write ``k``/``v`` ``(batch, steps, kv_heads, head_dim)`` at ``positions`` ``(batch, steps)``."""
        from qarray import kv_cache as qkv
        if k.shape != v.shape or k.shape[:2] != positions.shape:
            raise ValueError(f"k {k.shape}, v {v.shape} and positions {positions.shape} disagree")
        return QuantizedKVCache(qkv.update(self.inner, k, v, positions[:, 0]))

    def read(self) -> tuple[jax.Array, jax.Array]:
        """``(k, v)``, every slot dequantized to float (the model uses :meth:`attend` instead)."""
        import qarray
        return qarray.dequantize(self.inner.k), qarray.dequantize(self.inner.v)

    def attend(self, q: jax.Array, positions: jax.Array) -> jax.Array:
        """Causal attention of ``q`` ``(B, T, heads, d)`` at ``positions`` over the cache: ``(B, T, heads * d)``."""
        from qarray import kv_cache as qkv
        b, t, heads, d = q.shape
        out = qkv.attention(q, self.inner, positions[:, -1] + 1)
        return out.reshape(b, t, heads * d)

    @property
    def nbytes(self) -> int:
        """Stored bytes (codes + scales)."""
        return self.inner.nbytes


@dataclasses.dataclass(frozen=True)
class QuantizedCacheClass:
    """A ``cache_cls`` for one quantized format: ``init(batch, max_len, kv_heads, head_dim)`` builds the cache.

    Example:
      >>> from examples.smollm.kv_cache import QuantizedCacheClass
      >>> QuantizedCacheClass('fp8').init(1, 4, 1, 8).inner.qtype.name
      'float8_e4m3fn'
    """

    qtype: str
    tile: int | None = None

    def init(self, batch: int, max_len: int, kv_heads: int, head_dim: int) -> QuantizedKVCache:
        """An empty :class:`QuantizedKVCache` of this format."""
        return QuantizedKVCache.init(batch, max_len, kv_heads, head_dim, self.qtype, self.tile)


def quantized(qtype: str, tile: int | None = None) -> QuantizedCacheClass:
    """The ``cache_cls`` for a quantized cache: ``'int8'``, ``'fp8'`` or ``'int4'`` (``tile``: values per scale).

    Example:
      >>> from examples.smollm.kv_cache import quantized
      >>> quantized('int8')
      QuantizedCacheClass(qtype='int8', tile=None)
      >>> quantized('int2')
      Traceback (most recent call last):
      ...
      ValueError: qtype must be one of ('int8', 'fp8', 'float8_e4m3fn', 'int4'); got 'int2'
    """
    allowed = ('int8', 'fp8', 'float8_e4m3fn', 'int4')
    if qtype not in allowed:
        raise ValueError(f"qtype must be one of {allowed}; got {qtype!r}")
    return QuantizedCacheClass(qtype, tile)


def update(cache: KVCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> KVCache:
    """``cache.update(k, v, positions)``: the new cache with this step's (rotated) keys and values written.

    Example:
      >>> import jax.numpy as jnp
      >>> from examples.smollm.kv_cache import FloatKVCache, update
      >>> c = update(FloatKVCache.init(1, 2, 1, 1), jnp.ones((1, 1, 1, 1)), jnp.ones((1, 1, 1, 1)), jnp.array([[0]]))
      >>> c.k.ravel().tolist()
      [1.0, 0.0]
    """
    return cache.update(k, v, positions)


def read(cache: KVCache) -> tuple[jax.Array, jax.Array]:
    """``cache.read()``: keys and values for every slot, as float arrays.

    Example:
      >>> from examples.smollm.kv_cache import FloatKVCache, read
      >>> [a.shape for a in read(FloatKVCache.init(1, 2, 1, 4))]
      [(1, 2, 1, 4), (1, 2, 1, 4)]
    """
    return cache.read()


def init_caches(layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                cache_cls: Any = FloatKVCache) -> list[KVCache]:
    """One empty cache per layer, built with ``cache_cls.init(batch, max_len, kv_heads, head_dim)``.

    Example:
      >>> from examples.smollm.kv_cache import init_caches
      >>> len(init_caches(layers=3, batch=1, max_len=16, kv_heads=3, head_dim=64))
      3
    """
    return [cache_cls.init(batch, max_len, kv_heads, head_dim) for _ in range(layers)]
