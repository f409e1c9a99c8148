"""The interception engine: the one place that patches JAX functions while a quantized model runs.

How a call reaches the provider
-------------------------------
1. **Which model and module are running.** :func:`model_run` opens a run of
   one provider's model on this thread; the Linen and NNX layers push a
   :class:`~flax_integration._frame.Frame` for every module call inside it
   (:func:`push_frame`).
2. **Which functions are patched.** The op table's entry points
   (``jax.lax.dot_general``, ``jnp.einsum``, ...; see
   :mod:`flax_integration._op_table`) and the extra functions the running
   provider declares (:meth:`Provider.intercepts`, e.g. ODML's ``jax.nn.relu``
   and ``+`` on arrays) are swapped for shims while at least one thread runs a
   quantized model that needs them: :class:`Target` s are reference counted
   under a lock, and each is restored when its last user leaves.
3. **Routing.** A shim consults thread-local state: on any other thread,
   outside a quantized model, or re-entrantly from inside the provider
   (``qarray.ops`` itself calls ``lax.dot_general``) it calls the original
   function. Otherwise an op-table shim canonicalizes the call and hands it to
   ``provider.handle(call, frame)``; an extra shim hands the provider an
   :class:`ExtraOp` (``provider.process_extra_op``) if the innermost running
   provider declared it.

Example:
  >>> import jax.numpy as jnp
  >>> from flax_integration import _interception
  >>> class Spy:
  ...     seen = []
  ...     def handle(self, call, frame):
  ...         self.seen.append(call.name)
  ...         return call.run_original()
  >>> with _interception.model_run(Spy()):
  ...     _ = jnp.einsum('ij,jk->ik', jnp.ones((2, 3)), jnp.ones((3, 4)))
  >>> Spy.seen
  ['einsum']
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any, Callable, Iterator, Sequence

from flax_integration import _op_table
from flax_integration.wrappers import as_float

__all__ = ['Target', 'Intercept', 'ExtraOp', 'model_run', 'running', 'push_frame', 'current_frame', 'root_frame',
           'running_provider', 'provider_code', 'installed']


# --------------------------------------------------------------------------- thread-local routing state
class _ThreadState(threading.local):
    def __init__(self):
        self.providers: list = []   # innermost last: the providers whose models run on this thread
        self.runs: list = []        # per provider run: its per-path op counters
        self.depths: list = []      # per run: how many frames were open when it began
        self.frames: list = []      # the running modules, innermost last
        self.busy = False           # inside provider code: shims call the originals


_state = _ThreadState()


def current_frame() -> Any:
    """The innermost running module on this thread, or None.

    Example:
      >>> from flax_integration._interception import current_frame
      >>> current_frame() is None
      True
    """
    return _state.frames[-1] if _state.frames else None


def root_frame() -> Any:
    """The frame of the model whose run is innermost (its first frame), or None.

    Example:
      >>> from flax_integration._interception import root_frame
      >>> root_frame() is None
      True
    """
    start = _state.depths[-1] if _state.depths else 0
    return _state.frames[start] if len(_state.frames) > start else None


def running_provider() -> Any:
    """The provider whose model runs innermost on this thread, or None.

    Example:
      >>> from flax_integration._interception import running_provider
      >>> running_provider() is None
      True
    """
    return _state.providers[-1] if _state.providers else None


def running(provider: Any) -> dict | None:
    """The op counters of ``provider``'s run on this thread (None: its model is not running here).

    A model run starts at the outermost call of a quantized model; calls of the
    same model from inside it (submodules) are part of that run.

    Example:
      >>> from flax_integration._interception import running
      >>> running(object()) is None
      True
    """
    for p, counters in zip(reversed(_state.providers), reversed(_state.runs)):
        if p is provider:
            return counters
    return None


@contextlib.contextmanager
def push_frame(frame: Any) -> Iterator[Any]:
    """Mark ``frame`` as the running module for the duration of the block."""
    _state.frames.append(frame)
    try:
        yield frame
    finally:
        _state.frames.pop()


@contextlib.contextmanager
def provider_code() -> Iterator[None]:
    """Mark this thread as running provider code: shims call the original functions inside.

    Example:
      >>> from flax_integration._interception import provider_code
      >>> with provider_code():
      ...     pass
    """
    prev, _state.busy = _state.busy, True
    try:
        yield
    finally:
        _state.busy = prev


# --------------------------------------------------------------------------- targets and patches
_STORES = {
    'function': (lambda raw: raw, lambda fn: fn),
    'staticmethod': (lambda raw: raw.__func__, staticmethod),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """An attribute to patch: ``owner.attr`` (a module or a class).

    ``store`` says how the function sits in ``owner.__dict__``: ``'function'``
    (plain) or ``'staticmethod'``; ``unwrap`` / ``wrap`` may override that pair
    (raw stored object -> callable, callable -> stored object) for descriptors
    only JAX knows (see :mod:`flax_integration._jax_private`).

    Example:
      >>> import jax
      >>> from flax_integration.providers import Target
      >>> t = Target(jax.nn, 'relu')
      >>> t.attr, t.store, t.key == (id(jax.nn), 'relu')
      ('relu', 'function', True)
    """

    owner: Any
    attr: str
    store: str = 'function'
    unwrap: Callable[[Any], Callable] | None = dataclasses.field(default=None, compare=False)
    wrap: Callable[[Callable], Any] | None = dataclasses.field(default=None, compare=False)

    @property
    def key(self) -> tuple[int, str]:
        """``(id(owner), attr)``: patches of the same attribute share one reference count.

        Example:
          >>> import jax
          >>> from flax_integration.providers import Target
          >>> Target(jax.nn, 'relu').key == Target(jax.nn, 'relu', 'function').key
          True
        """
        return id(self.owner), self.attr

    def converters(self) -> tuple[Callable[[Any], Callable], Callable[[Callable], Any]]:
        """``(unwrap, wrap)``: stored object -> callable, and callable -> object to store.

        Example:
          >>> from flax_integration.providers import Target
          >>> class Ops:
          ...     @staticmethod
          ...     def double(x):
          ...         return 2 * x
          >>> unwrap, wrap = Target(Ops, 'double', 'staticmethod').converters()
          >>> unwrap(vars(Ops)['double'])(3), type(wrap(abs)).__name__
          (6, 'staticmethod')
        """
        unwrap, wrap = _STORES[self.store]
        return self.unwrap or unwrap, self.wrap or wrap


@dataclasses.dataclass(frozen=True)
class Intercept:
    """A non-op function a provider wants to see (e.g. ODML's ``relu``): its name and where it lives.

    Example (a provider that sees every ``jax.nn.gelu`` call of its model):
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from flax_integration import quantize_model
      >>> from flax_integration.providers import Intercept, Provider, Target
      >>> class SeeGelu(Provider):
      ...     calls = []
      ...     def intercepts(self):
      ...         return (Intercept('gelu', (Target(jax.nn, 'gelu'),)),)
      ...     def process_extra_op(self, op):
      ...         self.calls.append((op.name, op.frame.path, op.args[0].shape))
      ...         return op.original(*op.args, **op.kwargs)
      ...     def process_op(self, op):
      ...         return op.call.run_original()
      >>> class M(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return jax.nn.gelu(nn.Dense(2)(x))
      >>> _ = quantize_model(M(), SeeGelu([])).init(jax.random.key(0), jnp.ones((1, 3)))
      >>> SeeGelu.calls
      [('gelu', '', (1, 2))]
    """

    name: str
    targets: tuple[Target, ...]


@dataclasses.dataclass
class ExtraOp:
    """One intercepted call of a provider's :class:`Intercept`, as the provider sees it.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax_integration.providers import ExtraOp
      >>> op = ExtraOp('relu', jax.nn.relu, (jnp.array([-1.0, 2.0]),), {}, None)
      >>> op.original(*op.args, **op.kwargs).tolist()  # what the call computes unintercepted
      [0.0, 2.0]
    """

    name: str
    original: Callable
    args: tuple
    kwargs: dict
    frame: Any


@dataclasses.dataclass
class _Patch:
    target: Target
    original: Any       # the stored object (in owner.__dict__) before any patch
    replacement: Any    # the stored shim


_lock = threading.Lock()
_counts: dict[tuple[int, str], int] = {}
_patches: dict[tuple[int, str], _Patch] = {}
_extra_names: dict[tuple[int, str], str] = {}


def installed(target: Target) -> bool:
    """Whether ``target`` is patched now (some thread runs a model that needs it).

    Example:
      >>> import jax
      >>> from flax_integration._interception import Target, installed
      >>> installed(Target(jax.lax, 'dot_general'))
      False
    """
    return _counts.get(target.key, 0) > 0


def _stored(target: Target) -> Any:
    if target.attr not in vars(target.owner):
        raise AttributeError(f"{target.owner!r} has no attribute {target.attr!r} of its own to patch.")
    return vars(target.owner)[target.attr]


def _patch_for(target: Target, make_shim: Callable[[Callable], Callable]) -> _Patch:
    """The (cached) patch of ``target``: its original is taken the first time, before any shim."""
    with _lock:
        patch = _patches.get(target.key)
        if patch is None:
            unwrap, wrap = target.converters()
            raw = _stored(target)
            patch = _Patch(target, raw, wrap(make_shim(unwrap(raw))))
            _patches[target.key] = patch
        return patch


def _acquire(patches: Sequence[_Patch]) -> None:
    with _lock:
        for p in patches:
            n = _counts.get(p.target.key, 0)
            if n == 0:
                setattr(p.target.owner, p.target.attr, p.replacement)
            _counts[p.target.key] = n + 1


def _release(patches: Sequence[_Patch]) -> None:
    with _lock:
        for p in patches:
            n = _counts[p.target.key] - 1
            _counts[p.target.key] = n
            if n == 0:
                setattr(p.target.owner, p.target.attr, p.original)


# --------------------------------------------------------------------------- shims
def _op_shim(entry: _op_table.OpEntry, ep: _op_table.EntryPoint) -> Callable[[Callable], Callable]:
    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def shim(*args, **kwargs):
            st = _state
            if not st.providers or st.busy:
                return original(*args, **kwargs)
            call = ep.canonicalize(entry.implementation, original, *args, **kwargs)
            if call is None:  # a form the quantized op does not take (e.g. scalar dot): the float op
                return original(*[as_float(a) for a in args], **kwargs)
            call.name = entry.name
            st.busy = True  # ops inside the provider (qarray.ops) must reach the real jax functions
            try:
                return st.providers[-1].handle(call, current_frame())
            finally:
                st.busy = False

        shim.__qarray_shim__ = True
        return shim
    return make


def _extra_shim(name: str) -> Callable[[Callable], Callable]:
    def make(original: Callable) -> Callable:
        def shim(*args, **kwargs):
            st = _state
            provider = st.providers[-1] if st.providers else None
            if provider is None or st.busy or name not in _declared(provider):
                return original(*args, **kwargs)
            frame = current_frame()
            if frame is None:
                return original(*args, **kwargs)
            st.busy = True
            try:
                return provider.process_extra_op(ExtraOp(name, original, args, kwargs, frame))
            finally:
                st.busy = False

        shim.__wrapped__ = original
        shim.__qarray_shim__ = True
        return shim
    return make


def _declared(provider: Any) -> frozenset[str]:
    names = getattr(provider, '_qarray_intercept_names', None)
    if names is None:
        names = frozenset(i.name for i in _intercepts(provider))
        provider._qarray_intercept_names = names
    return names


def _intercepts(provider: Any) -> Sequence[Intercept]:
    method = getattr(provider, 'intercepts', None)
    return tuple(method()) if method is not None else ()


_OP_PATCHES = [_patch_for(Target(ep.owner, ep.attr), _op_shim(entry, ep)) for entry, ep in _op_table.entry_points()]


def _provider_patches(provider: Any) -> list[_Patch]:
    out = []
    for intercept in _intercepts(provider):
        for target in intercept.targets:
            if any(target.key == p.target.key for p in _OP_PATCHES):
                raise ValueError(f"intercept {intercept.name!r}: {target.owner!r}.{target.attr} is an op of the op "
                                 "table; providers see it through handle(), not as an extra op.")
            with _lock:
                other = _extra_names.setdefault(target.key, intercept.name)
            if other != intercept.name:
                raise ValueError(f"intercept {intercept.name!r}: {target.attr!r} is already intercepted as "
                                 f"{other!r}; one target has one name.")
            out.append(_patch_for(target, _extra_shim(intercept.name)))
    return out


@contextlib.contextmanager
def model_run(provider: Any) -> Iterator[dict]:
    """One run of ``provider``'s model on this thread: its patches are installed, calls route to it.

    Enters ``provider.model_run()`` (the provider's own per-run context) first,
    then installs the op table's shims and the provider's :class:`Intercept`
    targets (reference counted across threads) and makes ``provider`` the
    innermost running provider. Yields the run's op counters (per module path).

    Example:
      >>> import jax
      >>> from flax_integration._interception import Target, installed, model_run
      >>> class Float:
      ...     def handle(self, call, frame):
      ...         return call.run_original()
      >>> with model_run(Float()):
      ...     installed(Target(jax.lax, 'dot_general'))
      True
    """
    patches = _OP_PATCHES + _provider_patches(provider)
    enter = getattr(provider, 'model_run', None)
    with (enter() if enter is not None else contextlib.nullcontext()):
        _acquire(patches)
        st = _state
        counters: dict = {}
        st.providers.append(provider)
        st.runs.append(counters)
        st.depths.append(len(st.frames))
        busy, st.busy = st.busy, False
        try:
            yield counters
        finally:
            st.providers.pop()
            st.runs.pop()
            st.depths.pop()
            st.busy = busy
            _release(patches)
        after = getattr(provider, 'after_model_run', None)  # (only after a run that completed)
        if after is not None:
            after()
