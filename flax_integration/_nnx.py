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
  >>> from flax_integration import PtqProvider, QuantizationRule
  >>> from flax_integration._nnx import quantize_nnx
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
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from flax_integration import _interception, _op_table
from flax_integration._frame import Frame
from flax_integration._linen import promote_dtype_keep_quantized
from flax_integration.wrappers import QuantizedParam, QuantStat, box_like

__all__ = ['quantize_nnx', 'NnxFrame']

_local = threading.local()


def _initializing_now() -> bool:
    return getattr(_local, 'initializing', False)


class NnxFrame(Frame):
    """A running NNX module: params are its ``nnx.Param`` and stored quantized (``QuantizedParam``) attributes."""

    def params(self) -> dict[str, Any]:
        return {k: v[...] for k, v in vars(self.module).items() if isinstance(v, (nnx.Param, QuantizedParam))}

    @property
    def initializing(self) -> bool:
        return _initializing_now()

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

    def adapter_param(self, name: str, init, shape: tuple, key: jax.Array) -> jax.Array:
        v = vars(self.module).get(name)
        if isinstance(v, nnx.Variable):
            return v[...]
        if not self.initializing:
            raise ValueError(f"module {self.path or '<root>'!r}: adapter {name!r} is missing; build the model "
                             "with quantize_model(model, provider, *sample_inputs).")
        value = init(key, shape)
        setattr(self.module, name, nnx.LoRAParam(value))
        return value

    def get_stat(self, name: str) -> Any:
        v = vars(self.module).get(name)
        return v.get_value() if isinstance(v, QuantStat) else None

    def put_stat(self, name: str, value: Any) -> None:
        v = vars(self.module).get(name)
        if isinstance(v, QuantStat):
            v.set_value(value)
            return
        setattr(self.module, name, QuantStat(value))
        if not hasattr(self.module, 'use_running_average'):
            self.module.use_running_average = False  # so model.eval() freezes the statistics (as BatchNorm)

    def can_update_stats(self) -> bool:
        return not self.initializing and not getattr(self.module, 'use_running_average', False)

    def rng(self, stream: str) -> jax.Array | None:
        # NNX threads no rngs through calls: modules hold them. Use an ``nnx.Rngs`` with that stream held as an
        # attribute of the running module, else of the model (e.g. ``model.rngs = nnx.Rngs(quant=0)``).
        root = _interception.root_frame()
        for module in (self.module, getattr(root, 'module', None)):
            for value in (vars(module).values() if module is not None and hasattr(module, '__dict__') else ()):
                if isinstance(value, nnx.Rngs) and stream in value:
                    return value[stream]()
        return None

    def dropout(self, x: jax.Array, rate: float, name: str, key: jax.Array) -> jax.Array:
        if rate <= 0:
            return x
        drop = vars(self.module).get(name)
        if drop is None:
            drop = nnx.Dropout(rate, rngs=nnx.Rngs(dropout=key))
            setattr(self.module, name, drop)
        return drop(x)


def _nnx_promote(args, /, *, dtype=None, inexact=True):
    def variadic(*a, dtype=None, inexact=True):
        return list(nnx_dtypes.promote_dtype(tuple(a), dtype=dtype, inexact=inexact))
    return tuple(promote_dtype_keep_quantized(variadic, args, dtype, inexact))


def _late_bindings() -> dict[str, list[tuple[Any, Any]]]:
    """NNX attributes to re-bind: the op table's (jax functions bound at definition time) and promote_dtype."""
    bindings = _op_table.nnx_late_bindings()
    bindings['promote_dtype'] = [(nnx_dtypes.promote_dtype, _nnx_promote)]
    return bindings


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
        path = vars(self).get('qarray_path', '')
        counters = _interception.running(provider)
        if counters is not None:  # a submodule call inside the model's run
            with _interception.push_frame(NnxFrame(self, path, counters.setdefault(path, {}))):
                return original_call(self, *args, **kwargs)
        with _interception.model_run(provider) as counters:
            with _interception.push_frame(NnxFrame(self, path, counters.setdefault(path, {}))):
                args, kwargs = provider.process_model_inputs(args, kwargs)
                out = original_call(self, *args, **kwargs)
                with _interception.provider_code():
                    return provider.process_model_output(out)

    return type(cls.__name__, (cls,), {'__call__': __call__, '_qarray_base': cls,
                                       '__module__': cls.__module__, '__qualname__': cls.__qualname__})


@contextlib.contextmanager
def _initializing():
    prev, _local.initializing = _initializing_now(), True
    try:
        yield
    finally:
        _local.initializing = prev


def quantize_nnx(model: nnx.Module, provider: Any, *sample_inputs: Any, **sample_kwargs: Any) -> nnx.Module:
    """A quantized copy of an NNX model (see module docstring); runs ``model(*sample_inputs)`` once.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from flax_integration import PtqProvider
      >>> from flax_integration._nnx import quantize_nnx
      >>> quantize_nnx(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), PtqProvider([]), jnp.ones((1, 2))).in_features
      2
    """
    model = nnx.clone(model)
    bindings = _late_bindings()
    for path, module in nnx.iter_modules(model):
        if getattr(type(module), '_qarray_base', None) is not None:
            module.__class__ = type(module)._qarray_base  # re-quantizing: start from the plain class
        attrs = vars(module)
        for name, pairs in bindings.items():
            for default, late in pairs:
                if attrs.get(name) is default:
                    setattr(module, name, late)
        module.qarray_path = '/'.join(str(p) for p in path)
        module.qarray_provider = provider
        module.__class__ = _tracked_class(type(module))
    with _initializing():
        model(*sample_inputs, **sample_kwargs)
    return model
