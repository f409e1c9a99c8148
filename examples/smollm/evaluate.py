"""Perplexity over fixed, non-overlapping token windows, with one jitted forward per window shape.

Each window of ``window`` tokens is run from scratch (no context carried over
from the previous window); tokens ``1..window-1`` are predicted from their
prefixes, so a window contributes ``window - 1`` negative log-likelihoods.
Perplexity is ``exp`` of their mean over all windows. A trailing piece shorter
than ``window`` is dropped, so the number is a function of the token ids and
``window`` alone.

Example:
  >>> from examples.smollm.evaluate import split_windows
  >>> import numpy as np
  >>> split_windows(np.arange(10), 4).tolist()
  [[0, 1, 2, 3], [4, 5, 6, 7]]
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ['split_windows', 'window_nll', 'perplexity']


def split_windows(token_ids: Sequence[int] | np.ndarray, window: int) -> np.ndarray:
    """``(n_windows, window)`` int32: consecutive non-overlapping windows; a short remainder is dropped.

    Example:
      >>> from examples.smollm.evaluate import split_windows
      >>> split_windows([5, 6, 7], 2).tolist()
      [[5, 6]]
    """
    if not isinstance(window, (int, np.integer)) or window < 2:
        raise ValueError(f"window must be an int >= 2 (one context token and one to predict), got {window!r}")
    ids = np.asarray(token_ids, np.int64).reshape(-1)
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"{len(ids)} tokens do not fill one window of {window}")
    return ids[:n * window].reshape(n, window).astype(np.int32)


@functools.lru_cache(maxsize=16)
def _nll_sum_fn(graphdef: Any, cache_cls: Any = None) -> Any:
    @jax.jit
    def nll_sum(state: Any, tokens: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state)
        if cache_cls is None:
            logits = model(tokens)
        else:  # every query attends over the keys and values as the cache stores them
            b, t = tokens.shape
            caches = model.init_caches(batch=b, max_len=t, cache_cls=cache_cls)
            logits, _ = model(tokens, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), caches)
        logits = logits[:, :-1].astype(jnp.float32)
        target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
        return (jax.nn.logsumexp(logits, axis=-1) - target).sum()  # -log softmax(logits)[target]
    return nll_sum


def window_nll(model: nnx.Module, params: Any, windows: np.ndarray, cache_cls: Any = None) -> np.ndarray:
    """Summed negative log-likelihood (nats) of each window's tokens ``1..window-1``, shape ``(n_windows,)``.

    ``model`` gives the graph (``nnx.graphdef(model)``) and ``params`` its state
    (``nnx.state(model)`` or a replacement of the same structure). With
    ``cache_cls`` (e.g. :func:`examples.smollm.kv_cache.quantized`), each window
    is one prefill into fresh caches of that class, so every query attends over
    keys and values as the cache stores them (a quantized cache's error is in
    every score, as when decoding).

    Example:
      >>> from flax import nnx
      >>> import numpy as np
      >>> from examples.smollm.evaluate import window_nll
      >>> from examples.smollm.model import SmolLM, SmolLMConfig
      >>> m = SmolLM(SmolLMConfig.tiny(), rngs=nnx.Rngs(0))
      >>> window_nll(m, nnx.state(m), np.zeros((2, 8), np.int32)).shape
      (2,)
    """
    fn = _nll_sum_fn(nnx.graphdef(model), cache_cls)
    windows = np.asarray(windows, np.int32)
    return np.array([float(fn(params, jnp.asarray(w[None]))) for w in windows], np.float64)


def perplexity(model: nnx.Module, params: Any, token_ids: Sequence[int] | np.ndarray, window: int,
               cache_cls: Any = None) -> float:
    """``exp(mean NLL)`` over the predicted tokens of ``token_ids`` cut into non-overlapping ``window``-token windows.

    Example:
      >>> from flax import nnx
      >>> import numpy as np
      >>> from examples.smollm.evaluate import perplexity
      >>> from examples.smollm.model import SmolLM, SmolLMConfig
      >>> m = SmolLM(SmolLMConfig.tiny(), rngs=nnx.Rngs(0), param_init=nnx.initializers.zeros_init())
      >>> round(perplexity(m, nnx.state(m), np.arange(32) % 64, window=16), 3)  # all logits 0: the vocab size
      64.0

    ``cache_cls``: run each window through caches of that class (see :func:`window_nll`).
    """
    windows = split_windows(token_ids, window)
    nll = window_nll(model, params, windows, cache_cls)
    return float(math.exp(nll.sum() / (windows.shape[0] * (window - 1))))
