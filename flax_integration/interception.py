"""Routing a module's matmuls and convolutions to a provider while it runs.

How a call reaches the provider
-------------------------------
1. **Which module is running.** Linen: :func:`flax.linen.intercept_methods`
   (Flax's own hook) pushes a :class:`ModuleFrame` for every module method
   call. NNX: :func:`flax_integration.nnx_model.quantize_nnx` gives each
   submodule a path and a ``__call__`` that pushes its frame.
2. **Which function is called.** Modules reach ops in two ways. Flax layers
   hold them as attributes (``nnx.Linear.dot_general``, ``nnx.Einsum.einsum_op``,
   ``nnx.Conv.conv_general_dilated``, and ``promote_dtype`` on every layer):
   those attributes are redirected (NNX: once, at quantize time; Linen: for
   the duration of the module's call). Everything else -- Linen layers with
   ``dot_general=None``, ``nn.Einsum``, attention, user code calling
   ``jnp.einsum`` / ``jnp.dot`` / ``jnp.matmul`` / ``lax.dot_general`` /
   ``lax.conv_general_dilated`` -- looks those names up on ``jax.lax`` /
   ``jax.numpy`` at call time, so :func:`scope` swaps exactly these five
   attributes (table :data:`PATCHED`) for shims.
3. **Scope and threads.** The shims are installed while at least one thread
   is inside a :func:`scope` (reference-counted under a lock) and consult a
   thread-local stack: on any other thread, or outside a quantized model, or
   re-entrantly from inside a provider (``qarray.ops`` itself calls
   ``lax.dot_general``), they call the original function unchanged.
4. **Which operand is the weight.** Decided from the running module's params,
   never from shapes: an operand is the weight when it is a stored quantized
   param (:class:`~flax_integration.wrappers.QuantizedParam` or QArray), or
   when it *is* one of the module's float params -- the same object, or the
   output of the module's ``promote_dtype`` applied to one (the cast is
   recorded). A weight reshaped or cast by other means in user code is not
   recognised; it is then treated as an activation.

Example:
  >>> import jax, jax.numpy as jnp
  >>> seen = []
  >>> def handler(call, frame):
  ...     seen.append(call.name)
  ...     return call.run_original()
  >>> with scope(handler):
  ...     _ = jnp.einsum('ij,jk->ik', jnp.ones((2, 3)), jnp.ones((3, 4)))
  >>> seen
  ['einsum']
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from qarray._array import QArray

from flax_integration import op_calls
from flax_integration.ops_bridge import ORIGINAL
from flax_integration.wrappers import QuantizedParam, unbox_leaves

__all__ = ['PATCHED', 'scope', 'ModuleFrame', 'current_frame', 'root_frame', 'running_provider', 'push_frame',
           'late_dot_general', 'late_einsum', 'late_conv_general_dilated', 'Weight', 'find_weight']

# (module, attribute, op canonicalizer) -- the only global names swapped, and only inside a scope.
PATCHED: dict[str, tuple[Any, str, Callable]] = {
    'dot_general': (jax.lax, 'dot_general', op_calls.dot_general_call),
    'conv_general_dilated': (jax.lax, 'conv_general_dilated', op_calls.conv_call),
    'einsum': (jax.numpy, 'einsum', op_calls.einsum_call),
    'dot': (jax.numpy, 'dot', op_calls.dot_call),
    'matmul': (jax.numpy, 'matmul', op_calls.matmul_call),
}

_local = threading.local()
_lock = threading.Lock()
_installed = 0


def _state():
    if not hasattr(_local, 'handlers'):
        _local.handlers, _local.frames, _local.busy = [], [], False
        _local.depths = []  # per scope: how many frames were open when it began
    return _local


@dataclasses.dataclass
class ModuleFrame:
    """A running module, as the provider sees it.

    ``kind`` is ``'linen'`` or ``'nnx'``; ``path`` is '/'-joined (root: ``''``);
    ``derived`` maps ``id(array)`` to the name of the param it was cast from
    (the array is kept alive in the value so the id stays unique).
    """

    module: Any
    path: str
    kind: str
    counters: dict = dataclasses.field(default_factory=dict)
    derived: dict = dataclasses.field(default_factory=dict)

    def next_op_id(self, op_name: str) -> str:
        """``'dot_general0'``, ``'dot_general1'``, ... in call order within this module."""
        n = self.counters.get(op_name, 0)
        self.counters[op_name] = n + 1
        return f'{op_name}{n}'


def current_frame() -> ModuleFrame | None:
    """The innermost running module on this thread, or None."""
    frames = _state().frames
    return frames[-1] if frames else None


def root_frame() -> ModuleFrame | None:
    """The frame of the model that the innermost :func:`scope` runs (its first frame), or None.

    A quantized model opens its scope, then pushes its own frame: this is that
    frame, even when the model is called from inside another quantized model.

    Example:
      >>> with scope(lambda call, frame: call.run_original()), push_frame(ModuleFrame(None, '', 'linen')) as f:
      ...     with push_frame(ModuleFrame(None, 'Dense_0', 'linen')):
      ...         root_frame() is f
      True
    """
    st = _state()
    start = st.depths[-1] if st.depths else 0
    return st.frames[start] if len(st.frames) > start else None


def running_provider() -> Any:
    """The provider whose model runs innermost on this thread (the owner of the innermost
    scope's handler, ``provider.handle``), or None outside a quantized model.

    Example:
      >>> running_provider() is None
      True
    """
    handlers = _state().handlers
    return getattr(handlers[-1], '__self__', None) if handlers else None


@contextlib.contextmanager
def push_frame(frame: ModuleFrame) -> Iterator[ModuleFrame]:
    """Mark ``frame`` as the running module for the duration of the block."""
    st = _state()
    st.frames.append(frame)
    try:
        yield frame
    finally:
        st.frames.pop()


def _shim(name: str) -> Callable:
    original = ORIGINAL[name]
    canonicalize = PATCHED[name][2]

    @functools.wraps(original)
    def shim(*args, **kwargs):
        st = _state()
        if not st.handlers or st.busy:
            return original(*args, **kwargs)
        call = canonicalize(*args, original=original, **kwargs)
        if call is None:  # a form the provider does not handle (e.g. scalar dot): float op
            return original(*[_dequantized(a) for a in args], **kwargs)
        st.busy = True  # ops inside the provider (qarray.ops) must reach the real jax functions
        try:
            return st.handlers[-1](call, current_frame())
        finally:
            st.busy = False

    shim.__qarray_shim__ = True
    return shim


def _dequantized(x: Any) -> Any:
    x = getattr(x, 'array', x) if isinstance(x, QuantizedParam) else x
    return x.__jax_array__() if isinstance(x, QArray) else x


_SHIMS = {name: _shim(name) for name in PATCHED}


def _install(on: bool) -> None:
    global _installed
    with _lock:
        _installed += 1 if on else -1
        if (on and _installed == 1) or (not on and _installed == 0):
            for name, (mod, attr, _) in PATCHED.items():
                setattr(mod, attr, _SHIMS[name] if on else ORIGINAL[name])


@contextlib.contextmanager
def scope(handler: Callable[[op_calls.OpCall, ModuleFrame | None], Any]) -> Iterator[None]:
    """Route this thread's intercepted op calls to ``handler(call, frame)`` inside the block.

    Example:
      >>> with scope(lambda call, frame: call.run_original()):
      ...     jax.lax.dot_general(jnp.ones((1, 2)), jnp.ones((2, 1)), (((1,), (0,)), ((), ()))).shape
      (1, 1)
    """
    st = _state()
    _install(True)
    st.handlers.append(handler)
    st.depths.append(len(st.frames))
    busy, st.busy = st.busy, False
    try:
        yield
    finally:
        st.handlers.pop()
        st.depths.pop()
        st.busy = busy
        _install(False)


# Late-bound op attributes for NNX layers, which capture jax functions at definition time.
def late_dot_general(*args, **kwargs):
    """``jax.lax.dot_general`` looked up at call time (so a scope can route it)."""
    return jax.lax.dot_general(*args, **kwargs)


def late_einsum(*args, **kwargs):
    """``jax.numpy.einsum`` looked up at call time."""
    return jax.numpy.einsum(*args, **kwargs)


def late_conv_general_dilated(*args, **kwargs):
    """``jax.lax.conv_general_dilated`` looked up at call time."""
    return jax.lax.conv_general_dilated(*args, **kwargs)


@dataclasses.dataclass
class Weight:
    """The weight operand of an op: its index, its param name, and what was passed.

    ``value`` is a QuantizedParam or QArray (already quantized) or a float array
    that is (or was cast from) the module's param ``name``.
    """

    index: int
    name: str | None  # None only for a quantized operand that is not a stored param (e.g. reshaped in user code)
    value: Any

    @property
    def quantized(self) -> bool:
        return isinstance(self.value, (QuantizedParam, QArray))


def _leaf_ids(x: Any) -> tuple[int, ...]:
    """Identity of a quantized value: the ids of its array leaves (boxes and wrappers stripped)."""
    return tuple(id(leaf) for leaf in jax.tree.leaves(unbox_leaves(x)))


def find_weight(call: op_calls.OpCall, params: dict[str, Any], frame: ModuleFrame | None) -> Weight | None:
    """The operand that is a param of the running module (rhs preferred), or None.

    ``params`` maps the module's param names to their values. A float param is
    recognised by object identity (or as the recorded cast of one). A stored
    quantized param is recognised by its *leaves*: reading it rebuilds its
    container (Linen's ``self.param`` unboxes ``nn.Partitioned`` leaves into a
    new ``QuantizedParam``; NNX's ``param[...]`` unwraps ``nnx.Param`` leaves),
    and ``astype`` from ``promote_dtype`` makes a new QArray, but the
    ``qvalue`` / ``scale`` / ``zero_point`` arrays are the stored ones.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> q = QuantizedParam(qarray.quantize(jnp.ones((4, 2)), 'int8'))
      >>> call = op_calls.dot_general_call(jnp.ones((1, 4)), q.astype(jnp.bfloat16), (((1,), (0,)), ((), ())))
      >>> w = find_weight(call, {'kernel': q}, None)
      >>> w.index, w.name
      (1, 'kernel')
    """
    by_id = {id(v): n for n, v in params.items()}
    known = list(params.items()) + (list(frame.derived.values()) if frame is not None else [])
    by_leaves = {_leaf_ids(v): n for n, v in known if isinstance(v, (QuantizedParam, QArray))}
    if frame is not None:
        by_id.update({i: n for i, (n, _) in frame.derived.items()})
    for i in (1, 0):
        x = call.operands[i]
        if isinstance(x, (QuantizedParam, QArray)):
            return Weight(i, by_id.get(id(x), by_leaves.get(_leaf_ids(x))), x)
        if id(x) in by_id:
            return Weight(i, by_id[id(x)], x)
    return None
