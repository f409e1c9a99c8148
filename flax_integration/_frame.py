"""The module-frame interface: what a provider may ask of the Flax module that is running an op.

A provider sees Linen and NNX modules through one interface, :class:`Frame`,
so provider code never branches on the Flax API. ``flax_integration._linen``
and ``flax_integration._nnx`` implement it. What a frame offers:

* **identity** -- ``path`` ('/'-joined, root ``''``), :meth:`Frame.next_op_id`
  (``'dot_general0'``, ``'dot_general1'``, ... per op kind, in call order);
* **params** -- :meth:`Frame.params`, :meth:`Frame.get_param`,
  :meth:`Frame.put_param` (store a quantized weight in place of the float one,
  boxed like it), :meth:`Frame.adapter_param` (get or create a trainable
  adapter, e.g. LoRA's A and B), and :meth:`Frame.param_name` / :meth:`Frame.record_alias`
  (which param an operand is: by identity, by the recorded alias of a derived
  array such as a dtype cast, or by the stored leaves of a quantized param);
* **statistics** -- :meth:`Frame.get_stat` / :meth:`Frame.put_stat` (the
  ``quant_stats`` collection) and :meth:`Frame.can_update_stats` (training vs
  frozen: Linen when ``quant_stats`` is mutable, NNX unless ``model.eval()``);
* **randomness and mode** -- ``initializing``, :meth:`Frame.rng` and
  :meth:`Frame.dropout`.

Example:
  >>> from flax_integration._frame import Frame
  >>> sorted(n for n in Frame.__abstractmethods__)[:3]
  ['adapter_param', 'can_update_stats', 'dropout']
"""

from __future__ import annotations

import abc
from typing import Any, Callable

import jax

from flax_integration.wrappers import QuantizedParam, unbox_leaves
from qarray._array import QArray

__all__ = ['Frame']


def _leaf_ids(x: Any) -> tuple[int, ...]:
    """Identity of a quantized value: the ids of its array leaves (boxes and wrappers stripped)."""
    return tuple(id(leaf) for leaf in jax.tree.leaves(unbox_leaves(x)))


class Frame(abc.ABC):
    """A running module, as a provider sees it (see the module docstring).

    Attributes:
      module: the Flax module object (Linen or NNX); providers should not need it.
      path: '/'-joined module path; ``''`` for the root module.
    """

    def __init__(self, module: Any, path: str, counters: dict | None = None):
        self.module = module
        self.path = path
        self._counters = {} if counters is None else counters
        self._aliases: dict[int, tuple[str, Any]] = {}  # id(array) -> (param name, array kept alive)

    # --- identity ----------------------------------------------------------------------------
    def next_op_id(self, op_name: str) -> str:
        """``'dot_general0'``, ``'dot_general1'``, ... in call order within this module."""
        n = self._counters.get(op_name, 0)
        self._counters[op_name] = n + 1
        return f'{op_name}{n}'

    def record_alias(self, value: Any, name: str) -> None:
        """Remember that ``value`` (e.g. a dtype cast, or a param after a sharding constraint) is param
        ``name``; the array is kept alive for the frame's lifetime so its id stays unique."""
        self._aliases[id(value)] = (name, value)

    def param_name(self, value: Any) -> str | None:
        """The name of the param ``value`` is, or None.

        A float param is recognised by object identity or a recorded alias. A
        stored quantized param by its *leaves*: reading it rebuilds its container
        (Linen unboxes ``nn.Partitioned`` leaves into a new ``QuantizedParam``;
        NNX's ``param[...]`` unwraps ``nnx.Param`` leaves; ``astype`` makes a new
        QArray), but the ``qvalue`` / ``scale`` / ``zero_point`` arrays are the stored ones.
        """
        params = self.params()
        for name, v in params.items():
            if v is value:
                return name
        if id(value) in self._aliases:
            return self._aliases[id(value)][0]
        if isinstance(value, (QuantizedParam, QArray)):
            ids = _leaf_ids(value)
            known = list(params.items()) + [(n, v) for n, v in self._aliases.values()]
            for name, v in known:
                if isinstance(v, (QuantizedParam, QArray)) and _leaf_ids(v) == ids:
                    return name
        return None

    def is_param(self, value: Any) -> bool:
        """Whether ``value`` is (an alias of) one of this module's params."""
        return self.param_name(value) is not None

    # --- params ------------------------------------------------------------------------------
    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """The module's own params by name (unboxed values; quantized params as ``QuantizedParam``)."""

    @property
    @abc.abstractmethod
    def initializing(self) -> bool:
        """True while the model's state is being created (Linen ``init``, NNX ``quantize_model``)."""

    @abc.abstractmethod
    def get_param(self, name: str) -> Any:
        """The stored param ``name`` (possibly boxed), or None."""

    @abc.abstractmethod
    def put_param(self, name: str, value: Any) -> None:
        """Store ``value`` as param ``name``; a ``QuantizedParam`` is boxed like the param it replaces."""

    @abc.abstractmethod
    def adapter_param(self, name: str, init: Callable[[jax.Array, tuple], jax.Array], shape: tuple,
                      key: jax.Array) -> jax.Array:
        """Get, or at init create, a trainable adapter param (Linen: a param; NNX: ``nnx.LoRAParam``).

        ``init(key, shape)`` makes its value; Linen draws the key from the ``'params'`` rng, NNX uses ``key``.
        """

    # --- statistics --------------------------------------------------------------------------
    @abc.abstractmethod
    def get_stat(self, name: str) -> Any:
        """The ``quant_stats`` entry ``name`` of this module, or None."""

    @abc.abstractmethod
    def put_stat(self, name: str, value: Any) -> None:
        """Store ``quant_stats`` entry ``name`` (Linen: only when the collection is mutable)."""

    @abc.abstractmethod
    def can_update_stats(self) -> bool:
        """Whether statistics may move this run: Linen when ``quant_stats`` is mutable, NNX unless the
        model is in eval mode (``model.eval()``); never while initializing."""

    # --- randomness --------------------------------------------------------------------------
    @abc.abstractmethod
    def rng(self, stream: str) -> jax.Array | None:
        """A fresh key from the named rng stream, or None where the stream was not given."""

    @abc.abstractmethod
    def dropout(self, x: jax.Array, rate: float, name: str, key: jax.Array) -> jax.Array:
        """``x`` with dropout at ``rate`` while training (Linen: the ``'dropout'`` rng when given; NNX:
        an ``nnx.Dropout`` submodule ``name`` seeded with ``key``, off after ``model.eval()``)."""
