"""``quantize_model``: one call for Linen and NNX models.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import linen as nn
  >>> from flax_integration import PtqProvider, QuantizationRule, quantize_model
  >>> m = quantize_model(nn.Dense(4), PtqProvider([QuantizationRule(weight_qtype='int8')]))
  >>> m.init(jax.random.key(0), jnp.ones((1, 8)))['params']['kernel'].array.qtype.name
  'int8'
"""

from __future__ import annotations

from typing import Any, Sequence

from flax import linen as nn
from flax import nnx

from flax_integration._linen import quantize_linen
from flax_integration._nnx import quantize_nnx
from flax_integration.providers.base import Provider

__all__ = ['quantize_model']


def quantize_model(model: Any, provider: Provider, *sample_inputs: Any, methods: Sequence[str] = ('__call__',),
                   **sample_kwargs: Any) -> Any:
    """Quantize a Flax model without changing its code.

    Args:
      model: a Linen ``nn.Module`` (returns a Linen module of the same class
        name; ``init`` creates quantized params) or an NNX ``nnx.Module``
        (returns a quantized copy).
      provider: what to do with each matmul/conv, e.g.
        ``PtqProvider(rules)`` or ``CalibrationProvider(rules)``.
      *sample_inputs: NNX only: inputs for one run that creates the quantized
        state (values do not matter, shapes do).
      methods: Linen only: the methods that run quantized (default ``__call__``).
      **sample_kwargs: NNX only: keyword inputs for that run.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from flax_integration import PtqProvider, QuantizationRule, quantize_model
      >>> q = quantize_model(nnx.Linear(8, 4, rngs=nnx.Rngs(0)),
      ...                    PtqProvider([QuantizationRule(weight_qtype='int4')]), jnp.ones((1, 8)))
      >>> q.kernel.array.qtype.name
      'int4'
    """
    if not isinstance(provider, Provider):
        raise TypeError(f"provider must be a Provider (e.g. PtqProvider(rules)); got {type(provider).__name__}.")
    if isinstance(model, nn.Module):
        if sample_inputs or sample_kwargs:
            raise ValueError("sample_inputs: a Linen model is quantized lazily at init/apply; pass no sample "
                             "inputs (they are for NNX models).")
        return quantize_linen(model, provider, tuple(methods))
    if isinstance(model, nnx.Module):
        if not sample_inputs and not sample_kwargs:
            raise ValueError("sample_inputs: an NNX model needs sample inputs, e.g. "
                             "quantize_model(model, provider, x), to create its quantized state.")
        if tuple(methods) != ('__call__',):
            raise ValueError(f"methods: NNX models are quantized through __call__ only; got {tuple(methods)!r}.")
        return quantize_nnx(model, provider, *sample_inputs, **sample_kwargs)
    raise TypeError(f"model must be a flax.linen.Module or flax.nnx.Module; got {type(model).__name__}.")
