"""SmolLM2 (the Llama architecture) in Flax NNX: RMSNorm, rotary attention with grouped KV heads, SwiGLU.

Layers (module paths as the quantization rules see them)::

    embed                      nnx.Embed (vocab, hidden); also the output head, through embed.attend (tied)
    layers.N.attn_norm         nnx.RMSNorm
    layers.N.attn.q_proj       nnx.Linear(hidden, heads * head_dim, use_bias=False)
    layers.N.attn.k_proj       nnx.Linear(hidden, kv_heads * head_dim, use_bias=False)
    layers.N.attn.v_proj       nnx.Linear(hidden, kv_heads * head_dim, use_bias=False)
    layers.N.attn.o_proj       nnx.Linear(heads * head_dim, hidden, use_bias=False)
    layers.N.mlp_norm          nnx.RMSNorm
    layers.N.mlp.gate_proj     nnx.Linear(hidden, intermediate, use_bias=False)
    layers.N.mlp.up_proj       nnx.Linear(hidden, intermediate, use_bias=False)
    layers.N.mlp.down_proj     nnx.Linear(intermediate, hidden, use_bias=False)
    norm                       nnx.RMSNorm

Rotary embeddings, as GGUF stores q/k: llama.cpp's HF->GGUF converter permutes
the rows of ``q_proj``/``k_proj`` inside each head (``reshape(heads, 2, d/2,
...).swapaxes(1, 2)``) so that llama.cpp can run LLAMA with rope type NORM,
which rotates **adjacent** pairs ``(x[2i], x[2i+1])`` by ``pos * base**(-2i/d)``.
The HF checkpoint instead rotates the halves ``(x[i], x[i + d/2])`` ("NEOX").
Both give the same attention scores on their own weights; on GGUF weights only
the adjacent-pair rotation is right (``rope_style='adjacent'``, the default). With
``rope_style='half'`` the same GGUF weights give a far higher perplexity, which
the tests check.

Two entry points share one body: ``model(tokens)`` is the causal full-sequence
forward (positions ``0..T-1``, no cache) returning logits; ``model.step(tokens,
positions, caches)`` runs the same layers writing each layer's rotated keys and
values into its cache (:mod:`examples.smollm.kv_cache`) and attending over the
cache, returning ``(logits, caches)``: prefill and decode both use it.

Example:
  >>> from examples.smollm.model import SmolLM, SmolLMConfig
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> cfg = SmolLMConfig.tiny()
  >>> model = SmolLM(cfg, rngs=nnx.Rngs(0))
  >>> model(jnp.array([[1, 2, 3]])).shape
  (1, 3, 64)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.initializers import Initializer

from examples.smollm.kv_cache import FloatKVCache, KVCache, init_caches

__all__ = ['SmolLMConfig', 'rope_frequencies', 'apply_rope', 'attend', 'Attention', 'MLP', 'Block', 'SmolLM']

RopeStyle = Literal['adjacent', 'half']


def _shape_only(key: Any, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


@dataclasses.dataclass(frozen=True)
class SmolLMConfig:
    """Hyper-parameters; the defaults are SmolLM2-135M's (as its GGUF metadata states them).

    Example:
      >>> from examples.smollm.model import SmolLMConfig
      >>> SmolLMConfig().head_dim, SmolLMConfig().kv_groups
      (64, 3)
    """

    vocab_size: int = 49152
    hidden: int = 576
    intermediate: int = 1536
    layers: int = 30
    heads: int = 9
    kv_heads: int = 3
    rope_base: float = 100000.0
    rms_eps: float = 1e-5
    context_length: int = 8192
    rope_style: RopeStyle = 'adjacent'

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.rope_style not in ('adjacent', 'half'):
            raise ValueError(f"rope_style must be 'adjacent' or 'half', got {self.rope_style!r}")

    @property
    def head_dim(self) -> int:
        """``hidden // heads``."""
        return self.hidden // self.heads

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head (``heads // kv_heads``)."""
        return self.heads // self.kv_heads

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> 'SmolLMConfig':
        """The config a GGUF file's ``llama.*`` metadata describes.

        Example:
          >>> from examples.smollm.model import SmolLMConfig
          >>> SmolLMConfig.from_metadata({'llama.block_count': 2, 'llama.embedding_length': 64,
          ...     'llama.feed_forward_length': 128, 'llama.attention.head_count': 4,
          ...     'llama.attention.head_count_kv': 2, 'llama.vocab_size': 100}).layers
          2
        """
        arch = meta.get('general.architecture', 'llama')
        if arch != 'llama':
            raise ValueError(f"only the 'llama' architecture is supported, got {arch!r}")
        p = 'llama.'
        cfg = cls(vocab_size=int(meta.get(p + 'vocab_size', len(meta.get('tokenizer.ggml.tokens', [])) or 0)),
                  hidden=int(meta[p + 'embedding_length']), intermediate=int(meta[p + 'feed_forward_length']),
                  layers=int(meta[p + 'block_count']), heads=int(meta[p + 'attention.head_count']),
                  kv_heads=int(meta[p + 'attention.head_count_kv']),
                  rope_base=float(meta.get(p + 'rope.freq_base', 10000.0)),
                  rms_eps=float(meta.get(p + 'attention.layer_norm_rms_epsilon', 1e-5)),
                  context_length=int(meta.get(p + 'context_length', 2048)))
        rope_dims = int(meta.get(p + 'rope.dimension_count', cfg.head_dim))
        if rope_dims != cfg.head_dim:
            raise ValueError(f"partial rotary embeddings ({rope_dims} of {cfg.head_dim} dims) are not supported")
        return cfg

    @classmethod
    def tiny(cls, **overrides: Any) -> 'SmolLMConfig':
        """A small config of the same shape family, for tests and examples.

        Example:
          >>> from examples.smollm.model import SmolLMConfig
          >>> SmolLMConfig.tiny().hidden
          32
        """
        kw = dict(vocab_size=64, hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, rope_base=10000.0,
                  context_length=128)
        kw.update(overrides)
        return cls(**kw)


def rope_frequencies(head_dim: int, base: float) -> jax.Array:
    """``base ** (-2i / head_dim)`` for ``i < head_dim / 2``: the angle per position of pair ``i``.

    Example:
      >>> from examples.smollm.model import rope_frequencies
      >>> rope_frequencies(4, 10000.0).tolist()
      [1.0, 0.009999999776482582]
    """
    return base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x: jax.Array, positions: jax.Array, base: float, style: RopeStyle = 'adjacent') -> jax.Array:
    """Rotate ``x`` ``(batch, steps, heads, head_dim)`` by ``positions`` ``(batch, steps)``.

    ``'adjacent'`` (GGUF / llama.cpp NORM): pair ``i`` is ``(x[2i], x[2i+1])``;
    ``'half'`` (HF / NEOX): pair ``i`` is ``(x[i], x[i + head_dim/2])``. Pair
    ``i`` turns by ``position * base**(-2i/head_dim)`` radians.

    Example:
      >>> import jax.numpy as jnp
      >>> from examples.smollm.model import apply_rope
      >>> x = jnp.array([[[[1.0, 0.0, 1.0, 0.0]]]])
      >>> [round(float(v), 4) for v in apply_rope(x, jnp.array([[1]]), base=1.0).ravel()]  # both pairs: 1 rad
      [0.5403, 0.8415, 0.5403, 0.8415]
    """
    d = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(d, base)  # (B, T, d/2)
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    if style == 'adjacent':
        pairs = xf.reshape(*x.shape[:-1], d // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)
    elif style == 'half':
        a, b = xf[..., :d // 2], xf[..., d // 2:]
        out = jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    else:
        raise ValueError(f"style must be 'adjacent' or 'half', got {style!r}")
    return out.astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """Causal grouped-query attention.

    ``q`` ``(B, T, heads, d)``, ``k``/``v`` ``(B, S, kv_heads, d)``; query head
    ``h`` uses key/value head ``h // (heads // kv_heads)``. Query ``t`` sees key
    ``s`` iff ``k_positions[b, s] <= q_positions[b, t]``. Returns ``(B, T, heads * d)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from examples.smollm.model import attend
      >>> q = jnp.ones((1, 2, 2, 4)); k = jnp.ones((1, 2, 1, 4)); v = jnp.arange(8.0).reshape(1, 2, 1, 4)
      >>> attend(q, k, v, jnp.array([[0, 1]]), jnp.array([[0, 1]]))[0, 0].tolist()  # position 0 sees only v[0]
      [0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 3.0]
    """
    b, t, heads, d = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, heads // kv_heads, d)
    scores = jnp.einsum('btkrd,bskd->bkrts', qg, k) * (1.0 / jnp.sqrt(jnp.float32(d)))
    mask = k_positions[:, None, :] <= q_positions[:, :, None]  # (B, T, S)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum('bkrts,bskd->btkrd', probs, v)
    return out.reshape(b, t, heads * d)


def _linear(n_in: int, n_out: int, rngs: nnx.Rngs, init: Initializer | None) -> nnx.Linear:
    kw = {} if init is None else {'kernel_init': init}
    return nnx.Linear(n_in, n_out, use_bias=False, rngs=rngs, **kw)


def _rms_norm(cfg: SmolLMConfig, rngs: nnx.Rngs, init: Initializer | None) -> nnx.RMSNorm:
    kw = {} if init is None else {'scale_init': init}
    return nnx.RMSNorm(cfg.hidden, epsilon=cfg.rms_eps, rngs=rngs, **kw)


class Attention(nnx.Module):
    """Rotary grouped-query self-attention; with a cache, keys/values go through ``cache.update``/``cache.read``.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> from examples.smollm.model import Attention, SmolLMConfig
      >>> attn = Attention(SmolLMConfig.tiny(), rngs=nnx.Rngs(0))
      >>> out, cache = attn(jnp.ones((1, 3, 32)), jnp.array([[0, 1, 2]]))
      >>> out.shape, cache is None
      ((1, 3, 32), True)
    """

    def __init__(self, cfg: SmolLMConfig, *, rngs: nnx.Rngs, param_init: Initializer | None = None):
        self.cfg = cfg
        d = cfg.head_dim
        self.q_proj = _linear(cfg.hidden, cfg.heads * d, rngs, param_init)
        self.k_proj = _linear(cfg.hidden, cfg.kv_heads * d, rngs, param_init)
        self.v_proj = _linear(cfg.hidden, cfg.kv_heads * d, rngs, param_init)
        self.o_proj = _linear(cfg.heads * d, cfg.hidden, rngs, param_init)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        """``(output, new cache)``; without a cache, attends over ``x``'s own steps (causally)."""
        cfg = self.cfg
        b, t, _ = x.shape
        d = cfg.head_dim
        q = self.q_proj(x).reshape(b, t, cfg.heads, d)
        k = self.k_proj(x).reshape(b, t, cfg.kv_heads, d)
        v = self.v_proj(x).reshape(b, t, cfg.kv_heads, d)
        q = apply_rope(q, positions, cfg.rope_base, cfg.rope_style)
        k = apply_rope(k, positions, cfg.rope_base, cfg.rope_style)
        if cache is None:
            keys, values, key_positions = k, v, positions
        else:
            cache = cache.update(k, v, positions)  # rotary embeddings are applied before the write
            if hasattr(cache, 'attend'):  # a cache with its own attention (e.g. block-wise over quantized slots)
                return self.o_proj(cache.attend(q, positions).astype(q.dtype)), cache
            keys, values = cache.read()
            key_positions = jnp.broadcast_to(jnp.arange(keys.shape[1], dtype=positions.dtype),
                                             (b, keys.shape[1]))
        return self.o_proj(attend(q, keys.astype(q.dtype), values.astype(q.dtype), positions, key_positions)), cache


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from examples.smollm.model import MLP, SmolLMConfig
      >>> MLP(SmolLMConfig.tiny(), rngs=nnx.Rngs(0))(jnp.ones((2, 32))).shape
      (2, 32)
    """

    def __init__(self, cfg: SmolLMConfig, *, rngs: nnx.Rngs, param_init: Initializer | None = None):
        self.gate_proj = _linear(cfg.hidden, cfg.intermediate, rngs, param_init)
        self.up_proj = _linear(cfg.hidden, cfg.intermediate, rngs, param_init)
        self.down_proj = _linear(cfg.intermediate, cfg.hidden, rngs, param_init)

    def __call__(self, x: jax.Array) -> jax.Array:
        """The MLP output, same shape as ``x``."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """Pre-norm decoder layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> from examples.smollm.model import Block, SmolLMConfig
      >>> block = Block(SmolLMConfig.tiny(), rngs=nnx.Rngs(0))
      >>> block(jnp.ones((1, 2, 32)), jnp.array([[0, 1]]))[0].shape
      (1, 2, 32)
    """

    def __init__(self, cfg: SmolLMConfig, *, rngs: nnx.Rngs, param_init: Initializer | None = None):
        self.attn_norm = _rms_norm(cfg, rngs, param_init)
        self.attn = Attention(cfg, rngs=rngs, param_init=param_init)
        self.mlp_norm = _rms_norm(cfg, rngs, param_init)
        self.mlp = MLP(cfg, rngs=rngs, param_init=param_init)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        """``(output, new cache)``."""
        h, cache = self.attn(self.attn_norm(x), positions, cache)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache


class SmolLM(nnx.Module):
    """The decoder: embedding, ``cfg.layers`` blocks, final RMSNorm, tied output head (``embed.attend``).

    ``param_init``, if given, initializes every param (kernels, embedding
    table, norm scales); by default each layer uses Flax's own initializer.

    Example:
      >>> from flax import nnx
      >>> from examples.smollm.model import SmolLM, SmolLMConfig
      >>> import jax.numpy as jnp
      >>> cfg = SmolLMConfig.tiny()
      >>> m = SmolLM(cfg, rngs=nnx.Rngs(0))
      >>> caches = m.init_caches(batch=1, max_len=8)
      >>> logits, caches = m.step(jnp.array([[5, 6]]), jnp.array([[0, 1]]), caches)
      >>> bool(jnp.allclose(logits, m(jnp.array([[5, 6]])), atol=1e-5))
      True
    """

    def __init__(self, cfg: SmolLMConfig, *, rngs: nnx.Rngs, param_init: Initializer | None = None):
        self.cfg = cfg
        kw = {} if param_init is None else {'embedding_init': param_init}
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden, rngs=rngs, **kw)
        self.layers = nnx.List([Block(cfg, rngs=rngs, param_init=param_init) for _ in range(cfg.layers)])
        self.norm = _rms_norm(cfg, rngs, param_init)

    def _run(self, tokens: jax.Array, positions: jax.Array, caches: Sequence[KVCache] | None
             ) -> tuple[jax.Array, list[KVCache] | None]:
        x = self.embed(tokens)
        new_caches = None if caches is None else []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, positions, None if caches is None else caches[i])
            if new_caches is not None:
                new_caches.append(c)
        return self.embed.attend(self.norm(x)), new_caches

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 caches: Sequence[KVCache] | None = None) -> Any:
        """Without ``caches``: the causal full-sequence forward, logits ``(B, T, vocab)`` for tokens ``(B, T)``
        at positions ``0..T-1``. With ``caches``: :meth:`step` (``(logits, caches)``).

        Both entry points go through ``__call__`` so that a quantized copy of the
        model (``flax_integration.quantize_model`` and Qwix wrap ``__call__``)
        runs quantized in prefill and decode too.
        """
        tokens = jnp.asarray(tokens)
        if caches is None:
            if positions is not None:
                raise ValueError("positions are only used with caches (the full forward runs at 0..T-1)")
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
            return self._run(tokens, positions, None)[0]
        if positions is None:
            raise ValueError("positions (B, T) are needed with caches")
        if len(caches) != self.cfg.layers:
            raise ValueError(f"need one cache per layer ({self.cfg.layers}), got {len(caches)}")
        return self._run(tokens, jnp.asarray(positions, jnp.int32), caches)

    def step(self, tokens: jax.Array, positions: jax.Array, caches: Sequence[KVCache]
             ) -> tuple[jax.Array, list[KVCache]]:
        """``(logits, caches)`` for ``tokens`` ``(B, T)`` at ``positions`` ``(B, T)``, reading and writing ``caches``.

        Used for prefill (``T`` = prompt length) and decode (``T = 1``). Each
        query sees every cache slot at or before its own position, so slots
        written by padding after the last real token are harmless: they are
        overwritten before any later query can see them. Same as
        ``model(tokens, positions, caches)``.
        """
        return self(tokens, positions, caches)

    @classmethod
    def abstract(cls, cfg: SmolLMConfig) -> 'SmolLM':
        """The model with ``jax.ShapeDtypeStruct`` params (no memory, no random init): a graph to merge params into.

        Same result as ``nnx.eval_shape(lambda: SmolLM(cfg, rngs=...))``, in a
        third of the time (nothing is traced).

        Example:
          >>> from examples.smollm.model import SmolLM, SmolLMConfig
          >>> SmolLM.abstract(SmolLMConfig.tiny()).norm.scale.get_value()
          ShapeDtypeStruct(shape=(32,), dtype=float32)
        """
        return cls(cfg, rngs=nnx.Rngs(0), param_init=_shape_only)

    def init_caches(self, batch: int, max_len: int, cache_cls: Any = FloatKVCache) -> list[KVCache]:
        """Empty per-layer caches with ``max_len`` slots (``cache_cls`` defaults to :class:`FloatKVCache`)."""
        return init_caches(self.cfg.layers, batch, max_len, self.cfg.kv_heads, self.cfg.head_dim, cache_cls)
