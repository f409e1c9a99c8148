"""Build a runnable model for one scheme row: with ``flax_integration`` (qarray) or with Qwix 0.1.8.

A built row is a :class:`Built`: the NNX ``model`` (its graph), its ``params``
(``nnx.State``) and the ``cache_cls`` its KV cache uses; pass them to
:func:`~examples.smollm.evaluate.window_nll` and
:func:`~examples.smollm.decoding.generate`.

* ``'native'`` rows load the file's own QArrays (:func:`examples.smollm.native.load_native`);
* ``'float'`` rows are the float reference (optionally with a quantized KV cache);
* ``'quantized'`` rows run ``quantize_model(float_model, PtqProvider(rules), x)`` abstractly
  and fill it with ``quantize_params(float_model, abstract, quant_stats)``; GPTQ rows first
  collect Hessians with ``calibrate`` on calibration windows (other articles than the
  evaluation windows).

Example:
  >>> from examples.smollm.build import Built
  >>> Built(None, None).cache_cls is None
  True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples.smollm import kv_cache, native
from examples.smollm.kv_cache import FloatKVCache
from examples.smollm.schemes import Scheme, qarray_rules, qwix_rules

__all__ = ['Built', 'stored_bytes', 'build_qarray', 'build_qwix']


@dataclasses.dataclass
class Built:
    """A model ready to evaluate: graph (``model``), state (``params``), KV cache class (None: float).

    Example:
      >>> from examples.smollm.build import Built
      >>> Built('m', 'p').params
      'p'
    """

    model: Any
    params: Any
    cache_cls: Any = None

    @property
    def decode_cache_cls(self) -> Any:
        """The ``cache_cls`` for :func:`~examples.smollm.decoding.generate` (the float cache when None).

        Example:
          >>> from examples.smollm.build import Built
          >>> Built(None, None).decode_cache_cls.__name__
          'FloatKVCache'
        """
        return FloatKVCache if self.cache_cls is None else self.cache_cls


def _leaf_bytes(leaf: Any, packed: bool) -> float:
    dt = np.dtype(leaf.dtype)
    bits = {'int4': 4, 'uint4': 4, 'int2': 2, 'uint2': 2}.get(dt.name, 8 * dt.itemsize) if packed else 8 * dt.itemsize
    return math.prod(leaf.shape) * bits / 8


def stored_bytes(params: Any, *, packed: bool = False) -> int:
    """Bytes of every array leaf of ``params`` (QArray codes, scales and zero points count as stored).

    ``packed=True`` counts ``jnp.int4``/``uint4`` leaves (Qwix's int4 storage) at
    4 bits, their size on GPU/TPU; by default the real buffer size on this
    backend (1 byte per value on CPU). qarray packs sub-byte codes into uint8 itself.

    Example:
      >>> import jax.numpy as jnp
      >>> from examples.smollm.build import stored_bytes
      >>> stored_bytes({'w': jnp.zeros((4, 8), jnp.int4)}), stored_bytes({'w': jnp.zeros((4, 8), jnp.int4)}, packed=True)
      (32, 16)
    """
    leaves = [l for l in jax.tree.leaves(params) if hasattr(l, 'shape') and hasattr(l, 'dtype')]
    return int(sum(_leaf_bytes(l, packed) for l in leaves))


def _cache_cls(scheme: Scheme) -> Any:
    return None if scheme.kv_cache is None else kv_cache.quantized(scheme.kv_cache)


def build_qarray(scheme: Scheme, float_built: Built, calib_windows: np.ndarray | None = None) -> Built:
    """The row built with qarray / ``flax_integration`` (see the module docstring).

    ``float_built`` is the float reference (``Built(model, params)`` from
    :func:`examples.smollm.weights.load`); ``calib_windows`` ``(n, T)`` token ids
    feed GPTQ's Hessians (one window per calibration batch).

    Example:
      >>> from examples.smollm.build import Built, build_qarray
      >>> from examples.smollm.schemes import by_name
      >>> build_qarray(by_name('float32 + int8 KV cache'), Built('m', 'p')).cache_cls
      QuantizedCacheClass(qtype='int8', tile=None)
    """
    if scheme.source == 'native':
        model, params, _ = native.load_native()
        return Built(model, params, _cache_cls(scheme))
    if scheme.source == 'float':
        return Built(float_built.model, float_built.params, _cache_cls(scheme))
    import flax_integration as fi
    rules = qarray_rules(scheme)
    float_model = nnx.merge(nnx.graphdef(float_built.model), float_built.params)
    quant_stats = None
    if scheme.weight_algorithm == 'gptq':
        if calib_windows is None or len(calib_windows) == 0:
            raise ValueError(f"scheme {scheme.name!r} uses GPTQ: pass calib_windows (token ids, (n, T))")
        cal = fi.quantize_model(float_model, fi.CalibrationProvider(rules), jnp.asarray(calib_windows[:1]))
        quant_stats = fi.calibrate(cal, None, [jnp.asarray(w[None]) for w in calib_windows], progress=False)
    abstract = native.abstract_ptq_model(float_model.cfg, rules)
    params = fi.quantize_params(float_model, abstract, quant_stats)
    return Built(abstract, params, _cache_cls(scheme))


def build_qwix(scheme: Scheme, float_built: Built) -> Built | None:
    """The row built with Qwix 0.1.8 PTQ on the linear layers (None where Qwix has no such row).

    Example:
      >>> from examples.smollm.build import Built, build_qwix
      >>> from examples.smollm.schemes import by_name
      >>> build_qwix(by_name('int4 t128 gptq weight-only'), Built('m', 'p')) is None
      True
    """
    if scheme.source == 'float' and scheme.kv_cache is None:
        return float_built
    rules = qwix_rules(scheme)
    if rules is None:
        return None
    import qwix
    float_model = nnx.merge(nnx.graphdef(float_built.model), float_built.params)
    qmodel = qwix.quantize_model(float_model, qwix.PtqProvider(rules), jnp.zeros((1, 2), jnp.int32))
    return Built(qmodel, nnx.state(qmodel))
