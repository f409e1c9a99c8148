"""The non-matmul ops an ODML provider annotates, intercepted while a model runs.

LiteRT runs an op in int8 only when *every* tensor around it carries
quantization parameters. ``flax_integration.interception`` routes matmuls and
convolutions to the provider; this module routes the other ops a small model
uses, so their outputs can be annotated too (see :data:`OPS`):

* ``'act'`` -- relu, relu6, leaky_relu: the output is annotated; the input is
  not (LiteRT fuses the activation into the preceding conv / fully-connected
  op, and an annotation before it would round twice).
* ``'fixed'`` -- softmax, sigmoid, tanh, log_softmax: LiteRT's int8 kernels
  need fixed output parameters (softmax: scale 1/256, zero point -128).
* ``'same'`` -- max_pool, avg_pool: the output reuses the input's parameters
  (LiteRT requires it for average pooling; otherwise it adds a requantize).
* ``'reshape'`` -- ``x.reshape``, ``jnp.reshape``: no annotation of its own;
  the output inherits the input's (an int8 RESHAPE keeps its input's params).
* ``'nary'`` -- ``jnp.concatenate``, ``jnp.mean``: inputs and output annotated.
* ``'binary'`` -- ``a + b``, ``a * b`` (the operators): inputs
  and output annotated, but only when at least one operand is already an
  annotated activation and the others are full-size activations (so a bias add
  inside Dense, or a scale by a constant, stays as it is).

Scope and threads: the names in :data:`OPS` are swapped for shims only while
a model quantized with an ODML provider runs: the provider's ``model_run``
hook (entered by ``quantize_model``'s wrapper at model entry, before any
module code looks ``nn.relu`` up) is :func:`model_run`, which installs them
reference counted under a lock across threads (like
``interception.scope``) and restores the originals when the last run on any
thread ends. A shim forwards to the provider only on a thread that runs an
ODML model, while that provider's model is the innermost running quantized
model, and never re-entrantly (the provider's own arithmetic reaches the
original functions); everywhere else it calls the original unchanged.

Example:
  >>> import jax.numpy as jnp
  >>> sorted({kind for _, kind in OPS.values()})
  ['act', 'binary', 'fixed', 'nary', 'reshape', 'same']
  >>> with model_run(None):
  ...     jax.nn.relu is not ORIGINAL['relu']
  True
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import threading
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from jax._src import core as _jax_core
from jax._src.array import ArrayImpl

from flax_integration import interception

__all__ = ['OPS', 'ORIGINAL', 'FIXED_QPARAMS', 'ExtraOp', 'Annotation', 'Run', 'current_run', 'model_run',
           'provider_code', 'seed', 'acquire', 'release', 'is_installed', 'lookup', 'register']

# name -> (original function, kind)
ORIGINAL: dict[str, Callable] = {
    'relu': jax.nn.relu, 'relu6': jax.nn.relu6, 'leaky_relu': jax.nn.leaky_relu,
    'softmax': jax.nn.softmax, 'sigmoid': jax.nn.sigmoid, 'tanh': jnp.tanh, 'log_softmax': jax.nn.log_softmax,
    'max_pool': importlib.import_module('flax.linen.pooling').max_pool,
    'avg_pool': importlib.import_module('flax.linen.pooling').avg_pool,
    'concatenate': jnp.concatenate, 'mean': jnp.mean, 'reshape': jnp.reshape,
    # operators and methods on arrays (traced: ShapedArray; concrete: ArrayImpl)
    'tracer_add': _jax_core.ShapedArray.__dict__['_add'].__func__,
    'tracer_radd': _jax_core.ShapedArray.__dict__['_radd'].__func__,
    'tracer_mul': _jax_core.ShapedArray.__dict__['_mul'].__func__,
    'tracer_rmul': _jax_core.ShapedArray.__dict__['_rmul'].__func__,
    'tracer_reshape': _jax_core.ShapedArray.__dict__['reshape'].fun,
    'array_add': ArrayImpl.__add__, 'array_radd': ArrayImpl.__radd__,
    'array_mul': ArrayImpl.__mul__, 'array_rmul': ArrayImpl.__rmul__,
    'array_reshape': ArrayImpl.reshape,
}

# name -> (op name the provider sees, kind)
OPS: dict[str, tuple[str, str]] = {
    'relu': ('relu', 'act'), 'relu6': ('relu6', 'act'), 'leaky_relu': ('leaky_relu', 'act'),
    'softmax': ('softmax', 'fixed'), 'sigmoid': ('sigmoid', 'fixed'), 'tanh': ('tanh', 'fixed'),
    'log_softmax': ('log_softmax', 'fixed'),
    'max_pool': ('max_pool', 'same'), 'avg_pool': ('avg_pool', 'same'),
    'concatenate': ('concatenate', 'nary'), 'mean': ('mean', 'nary'),
    'reshape': ('reshape', 'reshape'), 'tracer_reshape': ('reshape', 'reshape'),
    'array_reshape': ('reshape', 'reshape'),
    'tracer_add': ('add', 'binary'), 'tracer_radd': ('add', 'binary'),
    'array_add': ('add', 'binary'), 'array_radd': ('add', 'binary'),
    'tracer_mul': ('mul', 'binary'), 'tracer_rmul': ('mul', 'binary'),
    'array_mul': ('mul', 'binary'), 'array_rmul': ('mul', 'binary'),
}

# LiteRT's int8 kernels accept only these output parameters: (scale, zero point).
FIXED_QPARAMS: dict[str, tuple[float, int]] = {
    'softmax': (1.0 / 256.0, -128), 'sigmoid': (1.0 / 256.0, -128), 'tanh': (1.0 / 128.0, 0),
    'log_softmax': (16.0 / 256.0, 127),
}

_NAMESPACES = ('jax.nn', 'jax.numpy', 'flax.linen', 'flax.linen.activation', 'flax.linen.pooling', 'flax.nnx',
               'flax.nnx.nn.activations')
_FUNCTION_NAMES = {'relu': 'relu', 'relu6': 'relu6', 'leaky_relu': 'leaky_relu', 'softmax': 'softmax',
                   'sigmoid': 'sigmoid', 'tanh': 'tanh', 'log_softmax': 'log_softmax', 'max_pool': 'max_pool',
                   'avg_pool': 'avg_pool', 'concatenate': 'concatenate', 'mean': 'mean', 'reshape': 'reshape'}
_CLASS_SLOTS = {  # name -> (class, attribute, how the shim is stored)
    'tracer_add': (_jax_core.ShapedArray, '_add', 'static'),
    'tracer_radd': (_jax_core.ShapedArray, '_radd', 'static'),
    'tracer_mul': (_jax_core.ShapedArray, '_mul', 'static'),
    'tracer_rmul': (_jax_core.ShapedArray, '_rmul', 'static'),
    'tracer_reshape': (_jax_core.ShapedArray, 'reshape', 'aval_method'),
    'array_add': (ArrayImpl, '__add__', 'plain'), 'array_radd': (ArrayImpl, '__radd__', 'plain'),
    'array_mul': (ArrayImpl, '__mul__', 'plain'), 'array_rmul': (ArrayImpl, '__rmul__', 'plain'),
    'array_reshape': (ArrayImpl, 'reshape', 'plain'),
}


@dataclasses.dataclass
class Annotation:
    """An activation tensor as annotated: its (fake-quantized) value and its parameters.

    ``scale``/``zero_point`` are scalars-in-arrays (traced during QAT, numpy
    during conversion); ``source`` keeps the pre-annotation array alive so its
    ``id`` stays unique while the run lasts.
    """

    value: Any
    scale: Any
    zero_point: Any
    source: Any = None


@dataclasses.dataclass
class ExtraOp:
    """One intercepted non-matmul call, as the provider sees it."""

    name: str
    kind: str
    original: Callable
    args: tuple
    kwargs: dict
    frame: Any


@dataclasses.dataclass(eq=False)
class Run:
    """One run of an ODML model on one thread: the tensors annotated so far and the model's boundary.

    ``keep`` holds every array whose ``id`` is a key of ``registry`` or
    ``marked``, so no id is reused while the run lasts.
    """

    provider: Any
    registry: dict = dataclasses.field(default_factory=dict)   # id(array) -> Annotation
    keep: list = dataclasses.field(default_factory=list)
    marked: dict = dataclasses.field(default_factory=dict)     # id(model input) -> input position
    root_frame: Any = None                                     # the model's own frame (stats of outputs)
    io: dict = dataclasses.field(default_factory=lambda: {'inputs': {}, 'outputs': []})


class _ThreadState(threading.local):
    def __init__(self):
        self.runs: list[Run] = []    # innermost last (an ODML model may call another one)
        self.busy = False            # inside the provider: shims call the originals
        self.pending: list = []      # (provider, array, Annotation) seeded before the next run


_thread = _ThreadState()
_lock = threading.Lock()
_installed = 0


def current_run() -> Run | None:
    """This thread's innermost ODML run, or None outside one."""
    return _thread.runs[-1] if _thread.runs else None


def is_installed() -> bool:
    """Whether the shims are in place (some thread is running an ODML model)."""
    return _installed > 0


def _shim(name: str) -> Callable:
    original = ORIGINAL[name]
    op_name, kind = OPS[name]

    def shim(*args, **kwargs):
        run = current_run()
        if run is None or _thread.busy or interception.running_provider() is not run.provider:
            return original(*args, **kwargs)
        frame = interception.current_frame()
        if frame is None:
            return original(*args, **kwargs)
        with provider_code():
            return run.provider.process_extra_op(ExtraOp(op_name, kind, original, args, kwargs, frame))

    shim.__wrapped__ = original
    shim.__qarray_odml_shim__ = True
    return shim


_SHIMS = {name: _shim(name) for name in ORIGINAL}


def _targets() -> list[tuple[Any, str, Any, Any]]:
    """(owner, attribute, original stored value, shim stored value) for every swapped name."""
    out = []
    for ns_name in _NAMESPACES:
        ns = importlib.import_module(ns_name)
        for key, attr in _FUNCTION_NAMES.items():
            if getattr(ns, attr, None) is ORIGINAL[key]:
                out.append((ns, attr, ORIGINAL[key], _SHIMS[key]))
    for key, (cls, attr, how) in _CLASS_SLOTS.items():
        stored = cls.__dict__[attr]
        if how == 'static':
            out.append((cls, attr, stored, staticmethod(_SHIMS[key])))
        elif how == 'aval_method':
            out.append((cls, attr, stored, _jax_core.aval_method(_SHIMS[key])))
        else:
            out.append((cls, attr, stored, _SHIMS[key]))
    return out


_TARGETS = _targets()


def _install(on: bool) -> None:
    global _installed
    with _lock:
        _installed += 1 if on else -1
        if (on and _installed == 1) or (not on and _installed == 0):
            for owner, attr, original, shim in _TARGETS:
                setattr(owner, attr, shim if on else original)


def acquire() -> None:
    """One more user of the shims (installed on the first)."""
    _install(True)


def release() -> None:
    """One user fewer (originals restored after the last)."""
    _install(False)


@contextlib.contextmanager
def model_run(provider: Any) -> Iterator[Run]:
    """One run of ``provider``'s model on this thread: the shims are installed for its duration
    (reference counted across threads) and it gets a fresh registry of annotated tensors, which
    starts with the tensors seeded for ``provider`` (:func:`seed`) and is dropped at the end.

    Example:
      >>> with model_run(None) as run:
      ...     is_installed() and current_run() is run
      True
    """
    run = Run(provider)
    keep = []
    for p, x, ann in _thread.pending:
        if p is provider:
            _record(run, x, ann)
        else:
            keep.append((p, x, ann))
    _thread.pending = keep
    acquire()
    _thread.runs.append(run)
    try:
        yield run
    finally:
        _thread.runs.remove(run)
        release()


@contextlib.contextmanager
def provider_code() -> Iterator[None]:
    """Mark this thread as running provider code: shims call the original functions inside."""
    prev, _thread.busy = _thread.busy, True
    try:
        yield
    finally:
        _thread.busy = prev


def seed(provider: Any, x: Any, ann: Annotation) -> None:
    """Declare ``x`` annotated by ``ann`` in ``provider``'s next run on this thread (or its current one)."""
    run = current_run()
    if run is not None and run.provider is provider:
        _record(run, x, ann)
    else:
        _thread.pending.append((provider, x, ann))


def lookup(x: Any) -> Annotation | None:
    """The annotation of ``x`` (or of the array it was annotated from) in this run, or None."""
    run = current_run()
    return None if run is None else run.registry.get(id(x))


def _record(run: Run, x: Any, ann: Annotation) -> None:
    run.registry[id(x)] = ann
    run.registry[id(ann.value)] = ann
    run.keep += [x, ann.value]


def register(x: Any, ann: Annotation) -> Annotation:
    """Record that ``x`` (and ``ann.value``) are annotated by ``ann`` (in this thread's run)."""
    run = current_run()
    if run is not None:
        _record(run, x, ann)
    return ann
