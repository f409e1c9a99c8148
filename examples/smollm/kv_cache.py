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

:class:`FloatKVCache` (the default) keeps float32 arrays. ``init_caches`` builds
one cache per layer with whichever class is passed.

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

__all__ = ['KVCache', 'FloatKVCache', 'update', 'read', 'init_caches']


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
