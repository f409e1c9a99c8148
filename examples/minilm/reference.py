"""An independent float64 NumPy BERT forward pass, straight from the HuggingFace state dict.

It shares no code with the Flax model (different names, PyTorch ``(out, in)``
layouts, its own LayerNorm/GELU/softmax), so agreement between the two checks
the Flax port and the weight mapping.

Example:
  >>> import numpy as np
  >>> _layer_norm(np.array([[1., 3.]]), np.ones(2), np.zeros(2), 1e-12).round(6).tolist()
  [[-1.0, 1.0]]
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ['embed_reference']


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x: np.ndarray) -> np.ndarray:
    try:  # scipy ships with scikit-learn (dev extra); math.erf per element is the slow fallback
        from scipy.special import erf
    except ImportError:
        erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _linear(x: np.ndarray, st: dict, name: str) -> np.ndarray:
    return x @ st[name + '.weight'].astype(np.float64).T + st[name + '.bias'].astype(np.float64)


def embed_reference(state: dict[str, np.ndarray], input_ids: np.ndarray, attention_mask: np.ndarray,
                    *, layers: int = 6, heads: int = 12, eps: float = 1e-12) -> np.ndarray:
    """Sentence embeddings in float64: BERT encoder, masked mean pooling, L2 normalisation.

    Example:
      >>> from examples.minilm import weights
      >>> ids, mask = weights.load_tokenizer()(['hi'], length=4)  # doctest: +SKIP
      >>> embed_reference(weights.load_torch_state(), ids, mask).shape  # doctest: +SKIP
      (1, 384)
    """
    st = state
    g = lambda k: st[k].astype(np.float64)
    b, t = input_ids.shape
    x = (g('embeddings.word_embeddings.weight')[input_ids] + g('embeddings.position_embeddings.weight')[:t][None]
         + g('embeddings.token_type_embeddings.weight')[0])
    x = _layer_norm(x, g('embeddings.LayerNorm.weight'), g('embeddings.LayerNorm.bias'), eps)
    keep = attention_mask.astype(bool)[:, None, None, :]
    for i in range(layers):
        p = f'encoder.layer.{i}.'
        d = x.shape[-1] // heads
        split = lambda y: y.reshape(b, t, heads, d).transpose(0, 2, 1, 3)  # (b, h, t, d)
        q, k, v = (split(_linear(x, st, p + f'attention.self.{n}')) for n in ('query', 'key', 'value'))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
        s = np.where(keep, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = s / s.sum(-1, keepdims=True)
        ctx = (a @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
        x = _layer_norm(x + _linear(ctx, st, p + 'attention.output.dense'),
                        g(p + 'attention.output.LayerNorm.weight'), g(p + 'attention.output.LayerNorm.bias'), eps)
        h = _gelu(_linear(x, st, p + 'intermediate.dense'))
        x = _layer_norm(x + _linear(h, st, p + 'output.dense'),
                        g(p + 'output.LayerNorm.weight'), g(p + 'output.LayerNorm.bias'), eps)
    m = attention_mask.astype(np.float64)[..., None]
    pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
