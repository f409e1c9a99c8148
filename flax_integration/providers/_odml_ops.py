"""The non-matmul ops an ODML provider annotates, and the per-run registry of annotated tensors.

LiteRT runs an op in int8 only when *every* tensor around it carries
quantization parameters. The interception engine routes matmuls and
convolutions to the provider; the ODML providers also declare these ops
(:func:`intercepts`), so the engine routes them too while an ODML model runs,
and their outputs can be annotated (see :data:`KINDS`):

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

The operators on arrays have no public hook; their private JAX targets come
from :mod:`flax_integration._jax_private`. Each ODML model run on a thread has
a :class:`Run`: the tensors annotated so far (by ``id``, kept alive) and the
model's inputs and outputs.

Example:
  >>> from flax_integration.providers import _odml_ops
  >>> sorted(set(_odml_ops.KINDS.values()))
  ['act', 'binary', 'fixed', 'nary', 'reshape', 'same']
  >>> sorted(i.name for i in _odml_ops.intercepts())[:3]
  ['add', 'avg_pool', 'concatenate']
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import threading
from typing import Any, Iterator

from flax_integration import _jax_private
from flax_integration._interception import Intercept, Target

__all__ = ['KINDS', 'FIXED_QPARAMS', 'intercepts', 'Annotation', 'Run', 'current_run', 'model_run', 'seed',
           'lookup', 'register']

# op name the provider sees -> how it is annotated
KINDS: dict[str, str] = {
    'relu': 'act', 'relu6': 'act', 'leaky_relu': 'act',
    'softmax': 'fixed', 'sigmoid': 'fixed', 'tanh': 'fixed', 'log_softmax': 'fixed',
    'max_pool': 'same', 'avg_pool': 'same',
    'concatenate': 'nary', 'mean': 'nary',
    'reshape': 'reshape',
    'add': 'binary', 'mul': 'binary',
}

# LiteRT's int8 kernels accept only these output parameters: (scale, zero point).
FIXED_QPARAMS: dict[str, tuple[float, int]] = {
    'softmax': (1.0 / 256.0, -128), 'sigmoid': (1.0 / 256.0, -128), 'tanh': (1.0 / 128.0, 0),
    'log_softmax': (16.0 / 256.0, 127),
}

# Where users reach the functions: every namespace that re-exports the same function object.
_FUNCTIONS = {  # op name -> (defining module, attribute)
    'relu': ('jax.nn', 'relu'), 'relu6': ('jax.nn', 'relu6'), 'leaky_relu': ('jax.nn', 'leaky_relu'),
    'softmax': ('jax.nn', 'softmax'), 'sigmoid': ('jax.nn', 'sigmoid'), 'tanh': ('jax.numpy', 'tanh'),
    'log_softmax': ('jax.nn', 'log_softmax'), 'max_pool': ('flax.linen.pooling', 'max_pool'),
    'avg_pool': ('flax.linen.pooling', 'avg_pool'), 'concatenate': ('jax.numpy', 'concatenate'),
    'mean': ('jax.numpy', 'mean'), 'reshape': ('jax.numpy', 'reshape'),
}
_NAMESPACES = ('jax.nn', 'jax.numpy', 'flax.linen', 'flax.linen.activation', 'flax.linen.pooling', 'flax.nnx',
               'flax.nnx.nn.activations')


@functools.lru_cache(maxsize=None)
def intercepts() -> tuple[Intercept, ...]:
    """What an ODML provider intercepts besides the op table: the functions of :data:`KINDS` in every
    namespace that exports them, and ``+``, ``*``, ``.reshape`` on arrays.

    Example:
      >>> from flax_integration.providers._odml_ops import intercepts
      >>> len({i.name for i in intercepts()})
      14
    """
    targets: dict[str, list[Target]] = {name: [] for name in KINDS}
    for name, (module, attr) in _FUNCTIONS.items():
        fn = getattr(importlib.import_module(module), attr)
        for ns_name in _NAMESPACES:
            ns = importlib.import_module(ns_name)
            if vars(ns).get(attr) is fn:
                targets[name].append(Target(ns, attr))
    for name, ts in _jax_private.operator_targets().items():
        targets[name].extend(ts)
    return tuple(Intercept(name, tuple(ts)) for name, ts in targets.items())


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
        self.pending: list = []      # (provider, array, Annotation) seeded before the next run


_thread = _ThreadState()


def current_run() -> Run | None:
    """This thread's innermost ODML run, or None outside one."""
    return _thread.runs[-1] if _thread.runs else None


@contextlib.contextmanager
def model_run(provider: Any) -> Iterator[Run]:
    """One run of ``provider``'s model on this thread: a fresh registry of annotated tensors, which
    starts with the tensors seeded for ``provider`` (:func:`seed`) and is dropped at the end.

    Example:
      >>> from flax_integration.providers._odml_ops import current_run, model_run
      >>> with model_run(None) as run:
      ...     current_run() is run
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
    _thread.runs.append(run)
    try:
        yield run
    finally:
        _thread.runs.remove(run)


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
