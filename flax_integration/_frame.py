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

    Example (what a provider sees as ``op.frame``, at init and at apply):
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from flax_integration import quantize_model
      >>> from flax_integration.providers import Frame, Provider
      >>> class Frames(Provider):
      ...     seen = []
      ...     def process_op(self, op):
      ...         f = op.frame
      ...         self.seen.append((isinstance(f, Frame), f.path, sorted(f.params()), f.initializing))
      ...         return op.call.run_original()
      >>> m = quantize_model(nn.Sequential([nn.Dense(2)]), Frames([]))
      >>> _ = m.apply(m.init(jax.random.key(0), jnp.ones((1, 3))), jnp.ones((1, 3)))
      >>> Frames.seen
      [(True, 'layers_0', ['bias', 'kernel'], True), (True, 'layers_0', ['bias', 'kernel'], False)]
    """

    def __init__(self, module: Any, path: str, counters: dict | None = None):
        self.module = module
        self.path = path
        self._counters = {} if counters is None else counters
        self._aliases: dict[int, tuple[str, Any]] = {}  # id(array) -> (param name, array kept alive)

    # --- identity ----------------------------------------------------------------------------
    def next_op_id(self, op_name: str) -> str:
        """``'dot_general0'``, ``'dot_general1'``, ... in call order within this module.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> import flax_integration as fi
          >>> class Probe(fi.Provider):
          ...     def process_op(self, op):
          ...         print(op.frame.next_op_id('relu'))
          ...         return op.call.run_original()
          >>> _ = fi.quantize_model(nn.Dense(2, name='d'), Probe([])).init(jax.random.key(0), jnp.ones((1, 3)))
          relu0
        """
        n = self._counters.get(op_name, 0)
        self._counters[op_name] = n + 1
        return f'{op_name}{n}'

    def record_alias(self, value: Any, name: str) -> None:
        """Remember that ``value`` (e.g. a dtype cast, or a param after a sharding constraint) is param
        ``name``; the array is kept alive for the frame's lifetime so its id stays unique.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> import flax_integration as fi
          >>> class Probe(fi.Provider):
          ...     def process_op(self, op):
          ...         print(op.frame.record_alias(op.call.operands[0], 'kernel') or op.frame.param_name(op.call.operands[0]))
          ...         return op.call.run_original()
          >>> _ = fi.quantize_model(nn.Dense(2, name='d'), Probe([])).init(jax.random.key(0), jnp.ones((1, 3)))
          kernel
        """
        self._aliases[id(value)] = (name, value)

    def param_name(self, value: Any) -> str | None:
        """The name of the param ``value`` is, or None.

        A float param is recognised by object identity or a recorded alias. A
        stored quantized param by its *leaves*: reading it rebuilds its container
        (Linen unboxes ``nn.Partitioned`` leaves into a new ``QuantizedParam``;
        NNX's ``param[...]`` unwraps ``nnx.Param`` leaves; ``astype`` makes a new
        QArray), but the ``qvalue`` / ``scale`` / ``zero_point`` arrays are the stored ones.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> import flax_integration as fi
          >>> class Probe(fi.Provider):
          ...     def process_op(self, op):
          ...         print(op.frame.param_name(op.call.operands[1]))
          ...         return op.call.run_original()
          >>> _ = fi.quantize_model(nn.Dense(2, name='d'), Probe([])).init(jax.random.key(0), jnp.ones((1, 3)))
          kernel
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
        """Whether ``value`` is (an alias of) one of this module's params.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> import flax_integration as fi
          >>> class Probe(fi.Provider):
          ...     def process_op(self, op):
          ...         print((op.frame.is_param(op.call.operands[0]), op.frame.is_param(op.call.operands[1])))
          ...         return op.call.run_original()
          >>> _ = fi.quantize_model(nn.Dense(2, name='d'), Probe([])).init(jax.random.key(0), jnp.ones((1, 3)))
          (False, True)
        """
        return self.param_name(value) is not None

    # --- params ------------------------------------------------------------------------------
    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """The module's own params by name (unboxed values; quantized params as ``QuantizedParam``).

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> import flax_integration as fi
          >>> class Probe(fi.Provider):
          ...     def process_op(self, op):
          ...         print(sorted(op.frame.params()))
          ...         return op.call.run_original()
          >>> _ = fi.quantize_model(nn.Dense(2, name='d'), Probe([])).init(jax.random.key(0), jnp.ones((1, 3)))
          ['bias', 'kernel']
        """

    @property
    @abc.abstractmethod
    def initializing(self) -> bool:
        """True while the model's state is being created (Linen ``init``, NNX ``quantize_model``).

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> import flax_integration as fi
          >>> class Probe(fi.Provider):
          ...     def process_op(self, op):
          ...         print(op.frame.initializing)
          ...         return op.call.run_original()
          >>> _ = fi.quantize_model(nn.Dense(2, name='d'), Probe([])).init(jax.random.key(0), jnp.ones((1, 3)))
          True
        """

    @abc.abstractmethod
    def get_param(self, name: str) -> Any:
        """The stored param ``name`` (possibly boxed), or None.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> import flax_integration as fi
          >>> class Probe(fi.Provider):
          ...     def process_op(self, op):
          ...         print(op.frame.get_param('kernel').shape)
          ...         return op.call.run_original()
          >>> _ = fi.quantize_model(nn.Dense(2, name='d'), Probe([])).init(jax.random.key(0), jnp.ones((1, 3)))
          (3, 2)
        """

    @abc.abstractmethod
    def put_param(self, name: str, value: Any) -> None:
        """Store ``value`` as param ``name``; a ``QuantizedParam`` is boxed like the param it replaces.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> import flax_integration as fi
          >>> class Probe(fi.Provider):
          ...     def process_op(self, op):
          ...         print(op.frame.put_param('kernel', op.call.operands[1] * 0) or float(op.frame.get_param('kernel').sum()))
          ...         return op.call.run_original()
          >>> _ = fi.quantize_model(nn.Dense(2, name='d'), Probe([])).init(jax.random.key(0), jnp.ones((1, 3)))
          0.0
        """

    @abc.abstractmethod
    def adapter_param(self, name: str, init: Callable[[jax.Array, tuple], jax.Array], shape: tuple,
                      key: jax.Array) -> jax.Array:
        """Get, or at init create, a trainable adapter param (Linen: a param; NNX: ``nnx.LoRAParam``).

        ``init(key, shape)`` makes its value; Linen draws the key from the ``'params'`` rng, NNX uses ``key``.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> import flax_integration as fi
          >>> class Probe(fi.Provider):
          ...     def process_op(self, op):
          ...         print(op.frame.adapter_param('a', lambda k, s: jnp.ones(s), (3, 1), jax.random.key(0)).shape)
          ...         return op.call.run_original()
          >>> _ = fi.quantize_model(nn.Dense(2, name='d'), Probe([])).init(jax.random.key(0), jnp.ones((1, 3)))
          (3, 1)
        """

    # --- statistics --------------------------------------------------------------------------
    @abc.abstractmethod
    def get_stat(self, name: str) -> Any:
        """The ``quant_stats`` entry ``name`` of this module, or None.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> import flax_integration as fi
          >>> class Probe(fi.Provider):
          ...     def process_op(self, op):
          ...         print(op.frame.get_stat('lhs'))
          ...         return op.call.run_original()
          >>> _ = fi.quantize_model(nn.Dense(2, name='d'), Probe([])).init(jax.random.key(0), jnp.ones((1, 3)))
          None
        """

    @abc.abstractmethod
    def put_stat(self, name: str, value: Any) -> None:
        """Store ``quant_stats`` entry ``name`` (Linen: only when the collection is mutable).

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> import flax_integration as fi
          >>> class Probe(fi.Provider):
          ...     def process_op(self, op):
          ...         print(op.frame.put_stat('lhs', {'n': 1}) or op.frame.get_stat('lhs'))
          ...         return op.call.run_original()
          >>> _ = fi.quantize_model(nn.Dense(2, name='d'), Probe([])).init(jax.random.key(0), jnp.ones((1, 3)))
          {'n': 1}
        """

    @abc.abstractmethod
    def can_update_stats(self) -> bool:
        """Whether statistics may move this run: Linen when ``quant_stats`` is mutable, NNX unless the
        model is in eval mode (``model.eval()``); never while initializing.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> import flax_integration as fi
          >>> class Probe(fi.Provider):
          ...     def process_op(self, op):
          ...         print(op.frame.can_update_stats())
          ...         return op.call.run_original()
          >>> _ = fi.quantize_model(nn.Dense(2, name='d'), Probe([])).init(jax.random.key(0), jnp.ones((1, 3)))
          False
        """

    # --- randomness --------------------------------------------------------------------------
    @abc.abstractmethod
    def rng(self, stream: str) -> jax.Array | None:
        """A fresh key from the named rng stream, or None where the stream was not given.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> import flax_integration as fi
          >>> class Probe(fi.Provider):
          ...     def process_op(self, op):
          ...         print(op.frame.rng('dropout'))
          ...         return op.call.run_original()
          >>> _ = fi.quantize_model(nn.Dense(2, name='d'), Probe([])).init(jax.random.key(0), jnp.ones((1, 3)))
          None
        """

    @abc.abstractmethod
    def dropout(self, x: jax.Array, rate: float, name: str, key: jax.Array) -> jax.Array:
        """``x`` with dropout at ``rate`` while training (Linen: the ``'dropout'`` rng when given; NNX:
        an ``nnx.Dropout`` submodule ``name`` seeded with ``key``, off after ``model.eval()``).

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> import flax_integration as fi
          >>> class Probe(fi.Provider):
          ...     def process_op(self, op):
          ...         print(op.frame.dropout(jnp.ones(2), 0.5, 'drop', jax.random.key(0)).tolist())
          ...         return op.call.run_original()
          >>> _ = fi.quantize_model(nn.Dense(2, name='d'), Probe([])).init(jax.random.key(0), jnp.ones((1, 3)))
          [1.0, 1.0]
        """
