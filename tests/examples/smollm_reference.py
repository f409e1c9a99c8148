"""An independent float64 numpy forward of a llama.cpp-style (GGUF) Llama model, written from the math.

It reads tensors by their GGUF names in numpy order (``W`` is ``(out, in)``, so
a projection is ``x @ W.T``) and metadata by its ``llama.*`` keys, and shares no
code with :mod:`examples.smollm`. Rotary embeddings follow llama.cpp's NORM rope
on GGUF's permuted q/k rows: each adjacent pair ``(x[2i], x[2i+1])`` is taken
as the complex number ``x[2i] + 1j * x[2i+1]`` and multiplied by
``exp(1j * pos * base**(-2i/d))``.

Example:
  >>> import numpy as np
  >>> rope(np.array([[[1.0, 0.0]]]), base=1.0)[1].round(4).tolist()  # position 1: turned by 1 rad
  [[0.5403, 0.8415]]
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x**2) + eps) * w`` over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, base: float) -> np.ndarray:
    """``x`` ``(T, heads, d)`` at positions ``0..T-1``, adjacent pairs rotated as complex numbers."""
    t, _, d = x.shape
    z = x[..., 0::2] + 1j * x[..., 1::2]
    theta = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    z = z * np.exp(1j * np.arange(t, dtype=np.float64)[:, None, None] * theta)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def forward(arrays: Mapping[str, Any], meta: Mapping[str, Any], tokens: Sequence[int]) -> np.ndarray:
    """Logits ``(T, vocab)`` in float64 for ``tokens`` at positions ``0..T-1`` (causal)."""
    w = lambda name: np.asarray(arrays[name], np.float64)
    layers = int(meta['llama.block_count'])
    heads = int(meta['llama.attention.head_count'])
    kv_heads = int(meta['llama.attention.head_count_kv'])
    eps = float(meta['llama.attention.layer_norm_rms_epsilon'])
    base = float(meta['llama.rope.freq_base'])
    emb = np.asarray(arrays['token_embd.weight'])
    x = emb[np.asarray(tokens)].astype(np.float64)  # (T, hidden)
    t, hidden = x.shape
    d = hidden // heads
    causal = np.tril(np.ones((t, t), bool))
    for i in range(layers):
        p = f'blk.{i}.'
        h = rms_norm(x, w(p + 'attn_norm.weight'), eps)
        q = rope((h @ w(p + 'attn_q.weight').T).reshape(t, heads, d), base)
        k = rope((h @ w(p + 'attn_k.weight').T).reshape(t, kv_heads, d), base)
        v = (h @ w(p + 'attn_v.weight').T).reshape(t, kv_heads, d)
        att = np.empty((t, heads, d))
        for head in range(heads):
            kv = head * kv_heads // heads  # query heads share a kv head in consecutive groups
            s = q[:, head] @ k[:, kv].T / np.sqrt(d)
            s = np.where(causal, s, -np.inf)
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            att[:, head] = (s / s.sum(axis=-1, keepdims=True)) @ v[:, kv]
        x = x + att.reshape(t, heads * d) @ w(p + 'attn_output.weight').T
        h = rms_norm(x, w(p + 'ffn_norm.weight'), eps)
        g = h @ w(p + 'ffn_gate.weight').T
        x = x + ((g / (1.0 + np.exp(-g))) * (h @ w(p + 'ffn_up.weight').T)) @ w(p + 'ffn_down.weight').T
    x = rms_norm(x, w('output_norm.weight'), eps)
    head_w = arrays['output.weight'] if 'output.weight' in arrays else emb
    return x @ np.asarray(head_w, np.float64).T
