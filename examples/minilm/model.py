"""The all-MiniLM-L6-v2 sentence encoder (a 6-layer BERT) as a Flax Linen module.

Every matrix multiply with a weight is a standard ``nn.Dense``, so a
quantization layer that intercepts ``dot_general`` (``flax_integration``, Qwix)
quantizes the model without any change to this code. Module paths are
``layer_<i>/{query,key,value,attention_out,intermediate,output}`` for the 36
linear layers; the attention core (``q·k``, ``p·v``) runs in ``layer_<i>`` itself
so rules that name the Dense paths leave it in float.

Sentence embedding (model card): mean of the last hidden states over real
(non-padding) tokens, then L2 normalisation.

Example:
  >>> import jax, jax.numpy as jnp
  >>> cfg = MiniLMConfig(vocab_size=50, hidden=8, heads=2, intermediate=16, layers=1, max_positions=8)
  >>> model = MiniLM(cfg)
  >>> ids = jnp.ones((1, 4), jnp.int32)
  >>> params = model.init(jax.random.key(0), ids, jnp.ones_like(ids))
  >>> model.apply(params, ids, jnp.ones_like(ids)).shape
  (1, 8)
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ['MiniLMConfig', 'MiniLM', 'EncoderLayer', 'Embeddings', 'mean_pool_normalize', 'LINEAR_PATHS']

# Regex (full match) of the 36 weight matmuls; what quantization rules should name.
LINEAR_PATHS = r'layer_\d+/(query|key|value|attention_out|intermediate|output)'


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    """Architecture sizes; the defaults are all-MiniLM-L6-v2's ``config.json``.

    Example:
      >>> MiniLMConfig().hidden // MiniLMConfig().heads
      32
    """

    vocab_size: int = 30522
    hidden: int = 384
    heads: int = 12
    intermediate: int = 1536
    layers: int = 6
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    cfg: MiniLMConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.cfg
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        x = nn.Embed(c.vocab_size, c.hidden, name='word')(input_ids)
        x = x + nn.Embed(c.max_positions, c.hidden, name='position')(positions)
        # all-MiniLM encodes single sentences: every token has type 0.
        x = x + nn.Embed(c.type_vocab_size, c.hidden, name='token_type')(jnp.zeros_like(input_ids))
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name='norm')(x)


class EncoderLayer(nn.Module):
    """One post-LayerNorm BERT block: self-attention, then a GELU feed-forward."""

    cfg: MiniLMConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.cfg
        b, t, _ = x.shape
        head_dim = c.hidden // c.heads

        def heads(name):  # (b, t, hidden) -> (b, t, heads, head_dim)
            return nn.Dense(c.hidden, name=name)(x).reshape(b, t, c.heads, head_dim)

        q, k, v = heads('query'), heads('key'), heads('value')
        scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(jnp.float32(head_dim)).astype(x.dtype)
        # Padding keys get -inf-like scores; a finite value keeps rows of all-padding queries finite.
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        ctx = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, t, c.hidden)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name='attention_norm')(
            x + nn.Dense(c.hidden, name='attention_out')(ctx))
        # HF "gelu" is the exact (erf) GELU, not the tanh approximation.
        h = jax.nn.gelu(nn.Dense(c.intermediate, name='intermediate')(x), approximate=False)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name='output_norm')(
            x + nn.Dense(c.hidden, name='output')(h))


def mean_pool_normalize(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over real tokens, then L2-normalise (sentence-transformers' Pooling + Normalize).

    Example:
      >>> import jax.numpy as jnp
      >>> h = jnp.array([[[3., 0.], [0., 4.], [9., 9.]]])
      >>> [round(float(v), 2) for v in mean_pool_normalize(h, jnp.array([[1, 1, 0]]))[0]]
      [0.6, 0.8]
    """
    m = mask.astype(hidden.dtype)[..., None]
    pooled = (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


class MiniLM(nn.Module):
    """The encoder plus pooling: ``(input_ids, attention_mask) -> (batch, hidden)`` unit vectors."""

    cfg: MiniLMConfig = MiniLMConfig()

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        mask = attention_mask.astype(bool)
        x = Embeddings(self.cfg, name='embeddings')(input_ids)
        for i in range(self.cfg.layers):
            x = EncoderLayer(self.cfg, name=f'layer_{i}')(x, mask)
        return mean_pool_normalize(x, attention_mask)
