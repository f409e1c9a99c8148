"""Greedy decoding with the per-layer KV cache: one jitted prefill, then one jitted step per token.

The prompt is padded at the end to a multiple of :data:`PROMPT_BUCKET` tokens
and the cache to a multiple of :data:`CACHE_BUCKET` slots, so prompts and
lengths of similar size reuse the compiled programs. Padding after the prompt
is harmless: a query only sees cache slots at or before its own position, and
each slot is rewritten by its real token before any query at or after it runs.

Example:
  >>> from examples.smollm.decoding import generate
  >>> from flax import nnx
  >>> from examples.smollm.model import SmolLM, SmolLMConfig
  >>> m = SmolLM(SmolLMConfig.tiny(), rngs=nnx.Rngs(0))
  >>> out = generate(m, nnx.state(m), [1, 2, 3], 4)
  >>> len(out), all(0 <= t < 64 for t in out)
  (4, True)
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples.smollm.kv_cache import FloatKVCache

__all__ = ['PROMPT_BUCKET', 'CACHE_BUCKET', 'generate']

PROMPT_BUCKET = 16
CACHE_BUCKET = 64


# XLA:CPU compiles a matrix-vector product (one row) into a tiled loop nest of its own, which takes about 50 ms
# per weight matrix to compile (13 s for this model's decode step), against a few ms for a two-row product that
# goes to the library matmul. So each decode step runs the new token twice, at its position and the next one:
# the second row is never read, and the cache slot it writes (position + 1) is rewritten by the next real token
# before any query can see it (a query sees only slots at or before its own position). Costs: one extra row of
# compute per step (the step is bound by reading the weights, so it is nearly free) and one spare cache slot.
_DECODE_ROWS = 2


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@functools.lru_cache(maxsize=16)
def _programs(graphdef: Any, params_def: Any, caches_def: Any) -> tuple[Any, Any]:
    # Params and caches travel as flat leaf lists: flattening an nnx.State on every call costs ~20 ms, a decode
    # step's worth of weight reads, while a list of arrays goes through jit's C++ fast path.
    def run(param_leaves, cache_leaves, tokens, positions):
        model = nnx.merge(graphdef, jax.tree.unflatten(params_def, param_leaves))
        logits, caches = model.step(tokens, positions, jax.tree.unflatten(caches_def, cache_leaves))
        return logits, jax.tree.leaves(caches)

    def prefill(param_leaves, cache_leaves, tokens, last):
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        logits, cache_leaves = run(param_leaves, cache_leaves, tokens, positions)
        return jnp.argmax(logits[0, last]).astype(jnp.int32), cache_leaves

    def decode(param_leaves, cache_leaves, token, position):
        # Two steps, the real one and a copy at position + 1 (see _DECODE_ROWS); only the first is read.
        tokens = jnp.broadcast_to(token, (1, _DECODE_ROWS))
        positions = position + jnp.arange(_DECODE_ROWS, dtype=jnp.int32)[None]
        logits, cache_leaves = run(param_leaves, cache_leaves, tokens, positions)
        return jnp.argmax(logits[0, 0]).astype(jnp.int32), cache_leaves

    return jax.jit(prefill, donate_argnums=1), jax.jit(decode, donate_argnums=1)


def generate(model: nnx.Module, params: Any, prompt_ids: Sequence[int], n: int, *,
             eos_id: int | None = None, cache_cls: Any = FloatKVCache) -> list[int]:
    """The ``n`` greedy continuation ids of ``prompt_ids`` (fewer if ``eos_id`` is produced; it is included).

    ``model`` gives the graph and ``params`` its state (``nnx.state(model)`` or a
    replacement of the same structure); ``cache_cls`` builds each layer's cache
    (``cache_cls.init(batch, max_len, kv_heads, head_dim)``, see
    :mod:`examples.smollm.kv_cache`).

    Example:
      >>> from flax import nnx
      >>> from examples.smollm.decoding import generate
      >>> from examples.smollm.model import SmolLM, SmolLMConfig
      >>> m = SmolLM(SmolLMConfig.tiny(), rngs=nnx.Rngs(1))
      >>> generate(m, nnx.state(m), [7], 3) == generate(m, nnx.state(m), [7], 3)  # greedy: deterministic
      True
    """
    prompt = np.asarray(prompt_ids, np.int32).reshape(-1)
    if prompt.size == 0:
        raise ValueError("prompt_ids is empty; greedy decoding needs at least one token")
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if n == 0:
        return []
    cfg = model.cfg
    p = prompt.size
    max_len = _round_up(p + n + _DECODE_ROWS - 1, CACHE_BUCKET)
    if p + n > cfg.context_length:
        raise ValueError(f"prompt ({p}) + n ({n}) exceeds the context length {cfg.context_length}")
    padded = np.zeros((1, min(_round_up(p, PROMPT_BUCKET), max_len)), np.int32)
    padded[0, :p] = prompt
    param_leaves, params_def = jax.tree.flatten(params)
    cache_leaves, caches_def = jax.tree.flatten(model.init_caches(batch=1, max_len=max_len, cache_cls=cache_cls))
    prefill, decode = _programs(nnx.graphdef(model), params_def, caches_def)
    token, cache_leaves = prefill(param_leaves, cache_leaves, jnp.asarray(padded), jnp.int32(p - 1))
    out = [int(token)]
    for pos in range(p, p + n - 1):
        if eos_id is not None and out[-1] == eos_id:
            break
        token, cache_leaves = decode(param_leaves, cache_leaves, token, jnp.int32(pos))
        out.append(int(token))
    return out
