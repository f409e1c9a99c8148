"""NNX: quantize a module graph in place of a copy, with one run on sample inputs.

:func:`quantize_nnx` clones the model, then walks its graph once:

* every submodule gets its path (``qarray_path``) and the provider
  (``qarray_provider``) as static attributes, and a ``__call__`` that marks it
  as the running module (its class becomes a cached subclass of the same name);
  the outermost such call is a model run: it enters the provider's
  ``model_run`` context and calls its ``process_model_inputs`` /
  ``process_model_output`` hooks;
* op attributes that NNX layers bind at definition time (``dot_general``,
  ``einsum_op``, ``conv_general_dilated``) are replaced by late-bound
  equivalents, and the default ``promote_dtype`` by one that lets quantized
  params through.

It then runs the model once on the sample inputs so the provider can create
its state (PTQ: quantized weights replace ``nnx.Param`` kernels; calibration:
``QuantStat`` variables).

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from flax_integration.providers.ptq import PtqProvider
  >>> from flax_integration.rules import QuantizationRule
  >>> m = quantize_nnx(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), PtqProvider([QuantizationRule(weight_qtype='int8')]),
  ...                  jnp.ones((1, 8)))
  >>> m.kernel.array.qvalue.shape
  (8, 4)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from qarray._array import QArray

from flax_integration import interception
from flax_integration.interception import ModuleFrame
from flax_integration.linen_model import promote_dtype_keep_quantized
from flax_integration.ops_bridge import ORIGINAL
from flax_integration.providers.calibration import QuantStat
from flax_integration.wrappers import QuantizedParam, box_like

__all__ = ['quantize_nnx', 'NnxFrame']

_local = threading.local()


def _state():
    if not hasattr(_local, 'runs'):
        _local.runs, _local.initializing = {}, False
    return _local


class NnxFrame(ModuleFrame):
    """A running NNX module: params are its ``nnx.Param`` and stored quantized (``QuantizedParam``) attributes."""

    def params(self) -> dict[str, Any]:
        return {k: v[...] for k, v in vars(self.module).items() if isinstance(v, (nnx.Param, QuantizedParam))}

    @property
    def initializing(self) -> bool:
        return _state().initializing

    def get_param(self, name: str) -> Any:
        v = vars(self.module).get(name)
        return v[...] if v is not None and hasattr(v, '__getitem__') else v

    def put_param(self, name: str, value: Any) -> None:
        original = vars(self.module).get(name)
        if isinstance(value, QuantizedParam):
            if isinstance(original, nnx.Variable):
                value = dataclasses.replace(value, array=box_like(original, value.array, value.array.shape))
            else:
                value = dataclasses.replace(value, array=jax.tree.map(nnx.Param, value.array))
        else:
            value = jax.tree.map(nnx.Param, value)
        setattr(self.module, name, value)

    def get_stat(self, name: str) -> Any:
        v = vars(self.module).get(name)
        return v.get_value() if isinstance(v, QuantStat) else None

    def put_stat(self, name: str, value: Any) -> None:
        v = vars(self.module).get(name)
        if isinstance(v, QuantStat):
            v.set_value(value)
        else:
            setattr(self.module, name, QuantStat(value))

    def can_update_stats(self) -> bool:
        return not self.initializing


def _nnx_promote(args, /, *, dtype=None, inexact=True):
    def variadic(*a, dtype=None, inexact=True):
        return list(nnx_dtypes.promote_dtype(tuple(a), dtype=dtype, inexact=inexact))
    return tuple(promote_dtype_keep_quantized(variadic, args, dtype, inexact))


_LATE_BOUND = {
    'dot_general': (ORIGINAL['dot_general'], interception.late_dot_general),
    'einsum_op': (ORIGINAL['einsum'], interception.late_einsum),
    'conv_general_dilated': (ORIGINAL['conv_general_dilated'], interception.late_conv_general_dilated),
    'promote_dtype': (nnx_dtypes.promote_dtype, _nnx_promote),
}


@functools.lru_cache(maxsize=None)
def _tracked_class(cls: type) -> type:
    if getattr(cls, '_qarray_base', None) is not None:
        return cls
    original_call = cls.__call__

    @functools.wraps(original_call)
    def __call__(self, *args, **kwargs):
        provider = vars(self).get('qarray_provider')
        if provider is None:
            return original_call(self, *args, **kwargs)
        st = _state()
        path = vars(self).get('qarray_path', '')
        if id(provider) in st.runs:
            counters = st.runs[id(provider)]
            with interception.push_frame(NnxFrame(self, path, 'nnx', counters=counters.setdefault(path, {}))):
                return original_call(self, *args, **kwargs)
        counters: dict = {}
        st.runs[id(provider)] = counters
        try:
            frame = NnxFrame(self, path, 'nnx', counters=counters.setdefault(path, {}))
            with provider.model_run():
                with interception.scope(provider.handle), interception.push_frame(frame):
                    args, kwargs = provider.process_model_inputs(args, kwargs)
                    out = original_call(self, *args, **kwargs)
                return provider.process_model_output(out)
        finally:
            del st.runs[id(provider)]

    return type(cls.__name__, (cls,), {'__call__': __call__, '_qarray_base': cls,
                                       '__module__': cls.__module__, '__qualname__': cls.__qualname__})


@contextlib.contextmanager
def _initializing():
    st = _state()
    prev, st.initializing = st.initializing, True
    try:
        yield
    finally:
        st.initializing = prev


def quantize_nnx(model: nnx.Module, provider: Any, *sample_inputs: Any, **sample_kwargs: Any) -> nnx.Module:
    """A quantized copy of an NNX model (see module docstring); runs ``model(*sample_inputs)`` once.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax_integration.providers.ptq import PtqProvider
      >>> quantize_nnx(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), PtqProvider([]), jnp.ones((1, 2))).in_features
      2
    """
    model = nnx.clone(model)
    for path, module in nnx.iter_modules(model):
        if getattr(type(module), '_qarray_base', None) is not None:
            module.__class__ = type(module)._qarray_base  # re-quantizing: start from the plain class
        attrs = vars(module)
        for name, (default, late) in _LATE_BOUND.items():
            if attrs.get(name) is default:
                setattr(module, name, late)
        module.qarray_path = '/'.join(str(p) for p in path)
        module.qarray_provider = provider
        module.__class__ = _tracked_class(type(module))
    with _initializing():
        model(*sample_inputs, **sample_kwargs)
    return model
