"""LoRA helpers: which params train, loading a float base into a (Q)LoRA model, merging for export.

* :func:`lora_trainable` -- the ``trainable(path, leaf)`` predicate that keeps
  only adapters (``*_lora_a`` / ``*_lora_b``); NNX uses ``nnx.LoRAParam``.
* :func:`lora_param_count` -- number of adapter values.
* :func:`with_base_weights` -- Linen: put pretrained float weights into a
  freshly initialised (Q)LoRA param tree (quantized exactly as the model
  quantizes them; adapters kept). NNX needs no helper:
  ``quantize_model(trained_float_model, LoraProvider(rules), x)`` quantizes
  the model's own weights.
* :func:`merge_lora` -- fold ``A B alpha / rank`` into the (dequantized) base
  weights; returns float params of the original model (adapters dropped),
  ready for float use or for ``quantize_params`` with any PTQ rules.

Example:
  >>> from flax_integration import lora_trainable
  >>> lora_trainable('Dense_0/kernel_lora_a', None), lora_trainable('Dense_0/kernel/array/qvalue', None)
  (True, False)
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from flax_integration._model import quantize_model
from flax_integration.providers.base import Op
from flax_integration.providers.lora import LORA_SUFFIXES, LoraProvider, LoraRule, low_rank_kernel, weight_name
from flax_integration._quantize_params import quantize_like
from flax_integration.wrappers import ActivationScale, QuantizedParam, as_float, unbox_leaves

__all__ = ['lora_trainable', 'lora_param_count', 'with_base_weights', 'merge_lora']


def _is_adapter_name(name: Any) -> bool:
    return str(name).endswith(LORA_SUFFIXES)


def lora_trainable(path: str, leaf: Any = None) -> bool:
    """True for adapter leaves: the last '/'-separated part of ``path`` ends in ``_lora_a`` or ``_lora_b``.

    Example:
      >>> from flax_integration import lora_trainable
      >>> lora_trainable('Conv_0/kernel_lora_b')
      True
    """
    return _is_adapter_name(str(path).rsplit('/', 1)[-1])


def lora_param_count(tree: Any) -> int:
    """Number of adapter values in a Linen param tree or an NNX model.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax_integration import lora_param_count
      >>> lora_param_count({'Dense_0': {'kernel_lora_a': jnp.ones((8, 2)), 'kernel': jnp.ones((8, 4))}})
      16
    """
    if isinstance(tree, nnx.Module):
        return sum(int(v.size) for v in jax.tree.leaves(nnx.state(tree, nnx.LoRAParam)))
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if any(_is_adapter_name(getattr(k, 'key', getattr(k, 'name', ''))) for k in path):
            total += int(leaf.size)
    return total


def with_base_weights(lora_params: Mapping, fp_params: Mapping, path: tuple = ()) -> dict:
    """Linen: ``lora_params`` with every base param taken from ``fp_params`` (adapters kept).

    A base weight that the (Q)LoRA model stores quantized is quantized from
    its float value exactly as the model's own init did (format, tiles,
    calibration); other params are copied.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax_integration import with_base_weights
      >>> p = with_base_weights({'kernel': jnp.zeros(2), 'kernel_lora_a': jnp.ones(2)}, {'kernel': jnp.ones(2)})
      >>> p['kernel'].tolist(), p['kernel_lora_a'].tolist()
      ([1.0, 1.0], [1.0, 1.0])
    """
    out = {}
    for k, v in lora_params.items():
        name = '/'.join(map(str, path + (k,)))
        if _is_adapter_name(k):
            out[k] = v
            continue
        if k not in fp_params:
            raise ValueError(f"fp_params: param {name!r} of the LoRA model is missing from the float params.")
        fp = fp_params[k]
        if isinstance(v, QuantizedParam):
            out[k] = quantize_like(jnp.asarray(unbox_leaves(fp)), v, name)
        elif isinstance(v, Mapping) or (hasattr(v, 'items') and not isinstance(v, ActivationScale)):
            out[k] = with_base_weights(v, fp, path + (k,))
        else:
            out[k] = fp
    return out


class _Merger(LoraProvider):
    """Runs like the LoRA model and records ``base + A B alpha / rank`` per (module path, weight name)."""

    def __init__(self, rules, seed):
        super().__init__(rules, seed=seed)
        self.merged: dict[tuple[str, str], jax.Array] = {}

    def process_op(self, op: Op) -> jax.Array:
        rule = op.rule
        if self.adapts(op):
            wi = op.weight.index
            shape = tuple(op.weight.value.shape)
            kept, contract = op.call.kept[wi], op.call.contract[wi]
            base = jnp.asarray(as_float(op.weight.value))
            a, b = self.adapters(op, shape, kept, contract, base.dtype)
            delta = low_rank_kernel(a, b, shape, kept, contract) * rule.scaling
            self.merged[(op.path, weight_name(op))] = (base + delta.astype(base.dtype))
        return super().process_op(op)


def _linen_export(params: Mapping, merged: dict, path: tuple = ()) -> dict:
    out = {}
    for k, v in params.items():
        if _is_adapter_name(k) or isinstance(v, ActivationScale):
            continue
        key = ('/'.join(map(str, path)), str(k))
        if key in merged:
            out[k] = merged[key]
        elif isinstance(v, Mapping) or (hasattr(v, 'items') and not isinstance(v, QuantizedParam)):
            out[k] = _linen_export(v, merged, path + (k,))
        else:
            out[k] = as_float(v)
    return out


def _nnx_export(model: nnx.Module, merged: dict) -> dict:
    out: dict = {}
    for path, module in nnx.iter_modules(model):
        mpath = '/'.join(map(str, path))
        for k, v in vars(module).items():
            if isinstance(v, nnx.LoRAParam) or isinstance(v, ActivationScale):
                continue
            if isinstance(v, nnx.Param):
                value = v[...]
            elif isinstance(v, QuantizedParam):
                value = as_float(v)
            else:
                continue
            node = out
            for p in path:
                node = node.setdefault(p, {})
            node[k] = merged.get((mpath, k), value)
    return out


def merge_lora(model: Any, params: Any, *sample_inputs: Any) -> dict:
    """Fold trained adapters into the base weights; returns float params of the original model.

    Runs the (Q)LoRA model once on ``sample_inputs`` (only their shapes
    matter) to learn each adapted weight's layout, then returns
    ``dequantize(W) + A B alpha / rank`` for adapted weights and the
    (dequantized) other params; adapters and static activation scales are
    dropped.

    Args:
      model: the LoRA model from ``quantize_model(model, LoraProvider(rules), ...)``.
      params: Linen: its ``'params'``; NNX: None (the model holds its state).
      *sample_inputs: inputs for one forward pass.

    Returns:
      Linen: a params dict for the float model. NNX: a pure dict of the float
      model's ``nnx.Param`` values; load it with
      ``s = nnx.state(float_model, nnx.Param); nnx.replace_by_pure_dict(s, merged); nnx.update(float_model, s)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from flax_integration import LoraProvider, LoraRule, merge_lora, quantize_model
      >>> rules = [LoraRule(rank=2)]
      >>> m = quantize_model(nn.Dense(3), LoraProvider(rules))
      >>> p = m.init(jax.random.key(0), jnp.ones((1, 4)))['params']
      >>> sorted(merge_lora(m, p, jnp.ones((1, 4))))
      ['bias', 'kernel']
    """
    if isinstance(model, nnx.Module):
        provider = getattr(model, 'qarray_provider', None)
    else:
        provider = getattr(type(model), '_qarray_provider', None)
    if not isinstance(provider, LoraProvider):
        raise TypeError("model must come from quantize_model(model, LoraProvider(rules), ...); got a model "
                        f"with provider {type(provider).__name__}.")
    merger = _Merger(provider.rules.rules, provider.seed)
    if isinstance(model, nnx.Module):
        if params is not None:
            raise ValueError("params: an NNX model holds its own state; pass params=None.")
        merged_model = quantize_model(model, merger, *sample_inputs)
        return _nnx_export(merged_model, merger.merged)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen.Module or flax.nnx.Module; got {type(model).__name__}.")
    quantize_model(model, merger).apply({'params': params}, *sample_inputs)
    return _linen_export(params, merger.merged)
