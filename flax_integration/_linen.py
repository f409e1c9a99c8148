"""Linen: quantize a module class-wide without touching its code.

:func:`quantize_linen` returns a copy of the model whose class is a thin
subclass: its ``__call__`` (and any other listed method) runs the original
inside :func:`flax_integration._interception.model_run` (the provider's
patches and routing) and :func:`flax.linen.intercept_methods`, with the provider's model-entry hooks
(``process_model_inputs`` / ``process_model_output``) around it. The method interceptor pushes a
:class:`LinenFrame` for every submodule call and, for that call only,

* routes the module's default ``promote_dtype`` to a version that lets
  quantized params through (Flax's would dequantize them with ``jnp.asarray``),
  and records float params it casts (so the cast weight is still known);
* routes ``self.param`` so a stored quantized param is returned as is: its
  *logical* shape is checked against the module's declared shape (Flax's own
  check compares raw leaves, and a bit-packed ``qvalue`` is narrower).

Example:
  >>> from flax import linen as nn
  >>> from flax_integration import PtqProvider, QuantizationRule
  >>> from flax_integration._linen import quantize_linen
  >>> m = quantize_linen(nn.Dense(3), PtqProvider([QuantizationRule(weight_qtype='int4')]))
  >>> type(m).__name__, isinstance(m, nn.Dense)
  ('Dense', True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen.dtypes
from flax import linen as nn

from qarray._array import QArray

from flax_integration import _interception
from flax_integration._frame import Frame
from flax_integration.wrappers import QuantizedParam, box_like, unbox_leaves

__all__ = ['quantize_linen', 'LinenFrame', 'promote_dtype_keep_quantized']


class LinenFrame(Frame):
    """A running Linen module: params, statistics and rngs through its ``scope``."""

    def params(self) -> dict[str, Any]:
        scope = self.module.scope
        own = scope.variables().get('params', {}) if scope is not None else {}
        return {k: _unbox_plain(v) for k, v in own.items()
                if not isinstance(v, dict) and not hasattr(v, 'items')}

    @property
    def initializing(self) -> bool:
        return self.module.is_initializing()

    def get_param(self, name: str) -> Any:
        scope = self.module.scope
        return scope.get_variable('params', name) if scope.has_variable('params', name) else None

    def put_param(self, name: str, value: Any) -> None:
        scope = self.module.scope
        original = self.get_param(name)
        if original is not None and isinstance(value, QuantizedParam):
            value = dataclasses.replace(value, array=box_like(original, value.array, value.array.shape))
        scope.put_variable('params', name, value)

    def adapter_param(self, name: str, init, shape: tuple, key: jax.Array) -> jax.Array:
        scope = self.module.scope
        if scope.has_variable('params', name):  # read, not re-declare: one weight may feed several ops
            return nn.meta.unbox(scope.get_variable('params', name))
        return scope.param(name, init, shape)

    def get_stat(self, name: str) -> Any:
        scope = self.module.scope
        return scope.get_variable('quant_stats', name) if scope.has_variable('quant_stats', name) else None

    def put_stat(self, name: str, value: Any) -> None:
        if self.module.scope.is_mutable_collection('quant_stats'):
            self.module.scope.put_variable('quant_stats', name, value)

    def can_update_stats(self) -> bool:
        return (not self.initializing) and self.module.scope.is_mutable_collection('quant_stats')

    def rng(self, stream: str) -> jax.Array | None:
        return self.module.make_rng(stream) if self.module.has_rng(stream) else None

    def dropout(self, x: jax.Array, rate: float, name: str, key: jax.Array) -> jax.Array:
        if rate <= 0 or self.initializing:
            return x
        rng = self.rng('dropout')
        if rng is None:  # no 'dropout' rng given to apply: deterministic
            return x
        keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _is_quantized(x: Any) -> bool:
    return isinstance(x, (QuantizedParam, QArray))


def _with_dtype(x: Any, dtype: Any) -> Any:
    if dtype is None or jnp.dtype(x.dtype) == jnp.dtype(dtype):
        return x
    return x.astype(dtype)  # stays quantized (QArray and QuantizedParam alike)


def promote_dtype_keep_quantized(original, args: Sequence[Any], dtype=None, inexact=True) -> list:
    """Flax's ``promote_dtype`` for arguments that may include quantized params.

    Quantized params keep their codes (only their output dtype follows the
    promotion); float params cast by the promotion are recorded in the
    running frame, so the op still knows they are weights.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from flax.linen.dtypes import promote_dtype
      >>> from flax_integration._linen import promote_dtype_keep_quantized
      >>> q = qarray.quantize(jnp.ones((2, 2)), 'int8')
      >>> x, w = promote_dtype_keep_quantized(promote_dtype, [jnp.ones(2), q],
      ...                                     dtype=jnp.bfloat16)
      >>> x.dtype, type(w).__name__, w.dtype
      (dtype(bfloat16), 'QArray', dtype(bfloat16))
    """
    args = list(args)
    if dtype is None and any(_is_quantized(a) for a in args):
        dtypes = [a.dtype for a in args if a is not None]
        dtype = jnp.result_type(*dtypes)
        if inexact and not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    plain = [None if _is_quantized(a) else a for a in args]
    out = list(original(*plain, dtype=dtype, inexact=inexact))
    frame = _interception.current_frame()
    if frame is not None:
        for a, o in zip(args, out):
            name = frame.param_name(a) if a is not None and o is not None and o is not a else None
            if name is not None:
                frame.record_alias(o, name)
    return [_with_dtype(a, dtype) if _is_quantized(a) else o for a, o in zip(args, out)]


def _linen_promote(*args, dtype=None, inexact=True):
    return promote_dtype_keep_quantized(flax.linen.dtypes.promote_dtype, args, dtype, inexact)


def _record(module: nn.Module, name: str, value: Any) -> Any:
    """Remember that ``value`` (what ``self.param`` returned) is param ``name``: unboxing a box with a
    mesh (``nn.with_partitioning(..., mesh=...)``, or any box under a global mesh) applies a sharding
    constraint, so the module computes with a new array, not the stored one."""
    frame = _interception.current_frame()
    if frame is not None and frame.module is module:
        frame.record_alias(value, name)
    return value


def _unbox_plain(v: Any) -> Any:
    """Unbox without applying sharding constraints (only the values are needed, not new arrays)."""
    def one(b):
        if not isinstance(b, nn.meta.AxisMetadata):
            return b
        try:
            return b.unbox(apply_constraint=False)
        except TypeError:  # an AxisMetadata without that option
            return b.unbox()
    return jax.tree.map(one, v, is_leaf=lambda b: isinstance(b, nn.meta.AxisMetadata))


def _param_shim(module: nn.Module):
    original = nn.Module.param.__get__(module)

    def param(name, init_fn, *init_args, unbox=True, **init_kwargs):
        scope = module.scope
        if scope is not None and scope.has_variable('params', name):
            stored = scope.get_variable('params', name)
            plain = unbox_leaves(stored)
            if _is_quantized(plain):
                expected = jax.eval_shape(lambda: init_fn(jax.random.key(0), *init_args, **init_kwargs))
                expected_shape = tuple(unbox_leaves(expected).shape)
                if tuple(plain.shape) != expected_shape:
                    raise ValueError(f"module {'/'.join(scope.path) or '<root>'!r}: quantized param {name!r} "
                                     f"has shape {tuple(plain.shape)} but the module declares {expected_shape}.")
                leaves_like = lambda *_a, **_k: jax.tree.map(lambda l: jnp.zeros(l.shape, l.dtype), stored)
                return _record(module, name, original(name, leaves_like, unbox=unbox))
        return _record(module, name, original(name, init_fn, *init_args, unbox=unbox, **init_kwargs))

    return param


@contextlib.contextmanager
def _module_call(module: nn.Module, counters: dict):
    """Frame + attribute routing for one module method call."""
    path = '/'.join(str(p) for p in module.scope.path)
    frame = LinenFrame(module, path, counters.setdefault(path, {}))
    saved = {k: module.__dict__[k] for k in ('param', 'promote_dtype') if k in module.__dict__}
    object.__setattr__(module, 'param', _param_shim(module))
    if saved.get('promote_dtype') is flax.linen.dtypes.promote_dtype:
        object.__setattr__(module, 'promote_dtype', _linen_promote)
    try:
        with _interception.push_frame(frame):
            yield frame
    finally:
        for k in ('param', 'promote_dtype'):
            if k in saved:
                object.__setattr__(module, k, saved[k])
            elif k in module.__dict__:
                object.__delattr__(module, k)


def _wrap_method(method, provider):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.scope is None or _interception.running(provider) is not None:
            return method(self, *args, **kwargs)

        with _interception.model_run(provider) as counters:
            def hook(next_fun, h_args, h_kwargs, context):
                module = context.module
                if module.scope is None or module is self:
                    return next_fun(*h_args, **h_kwargs)
                with _module_call(module, counters):
                    return next_fun(*h_args, **h_kwargs)

            with nn.intercept_methods(hook), _module_call(self, counters):
                args, kwargs = provider.process_model_inputs(args, kwargs)
                out = method(self, *args, **kwargs)
                with _interception.provider_code():
                    return provider.process_model_output(out)

    return wrapper


def quantize_linen(model: nn.Module, provider: Any, methods: Sequence[str] = ('__call__',)) -> nn.Module:
    """A copy of ``model`` whose listed methods run under ``provider``.

    Example:
      >>> from flax import linen as nn
      >>> from flax_integration import PtqProvider
      >>> from flax_integration._linen import quantize_linen
      >>> quantize_linen(nn.Dense(3), PtqProvider([])).features
      3
    """
    base = getattr(type(model), '_qarray_base', type(model))
    fields = {'_qarray_base': base, '_qarray_provider': provider}
    for name in methods:
        method = getattr(base, name, None)
        if method is None or not callable(method):
            raise ValueError(f"methods: {type(model).__name__} has no method {name!r}; got methods={methods!r}.")
        while hasattr(method, 'method_handler_wrapped'):  # Flax re-wraps the subclass method itself
            method = method.__wrapped__
        fields[name] = _wrap_method(method, provider)
    cls = type(base.__name__, (base,), fields)
    out = model.clone()
    object.__setattr__(out, '__class__', cls)
    return out
