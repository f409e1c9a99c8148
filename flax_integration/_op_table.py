"""The op table: every op a rule can quantize, in one place.

One :class:`OpEntry` per quantizable op: its rule name, the ``qarray.ops``
function that computes it on QArrays, the JAX functions it intercepts (each an
:class:`EntryPoint`: owner, attribute, and a canonicalizer to the
:class:`~flax_integration._op_calls.OpCall` form) and the attributes NNX
layers bind to those functions at definition time (so they are re-bound to a
late lookup). Everything else is derived from :data:`OP_TABLE`: the rule op
names (:data:`OP_NAMES`), the functions the interception engine patches, the
NNX late bindings.

Adding an op: write its ``qarray.ops`` module, add one entry here (with its
canonicalizer in ``_op_calls``), and tests.

Example:
  >>> from flax_integration._op_table import OP_NAMES, entry_points
  >>> OP_NAMES
  ('dot_general', 'einsum', 'conv_general_dilated')
  >>> sorted(f'{ep.owner_name}.{ep.attr}' for _, ep in entry_points())[:2]
  ['jax.lax.conv_general_dilated', 'jax.lax.dot_general']
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Iterator

import qarray.ops

from flax_integration import _op_calls

__all__ = ['EntryPoint', 'OpEntry', 'OP_TABLE', 'OP_NAMES', 'entry_points', 'nnx_late_bindings']


@dataclasses.dataclass(frozen=True)
class EntryPoint:
    """A JAX function an op is reached through: ``owner_name.attr``, and how to canonicalize its arguments.

    ``canonicalize(impl, original, *args, **kwargs)`` returns an ``OpCall``, or
    None for a form the quantized op does not handle (the float op then runs).
    """

    owner_name: str
    attr: str
    canonicalize: Callable[..., Any]

    @property
    def owner(self) -> Any:
        """The module that holds the function."""
        return importlib.import_module(self.owner_name)


@dataclasses.dataclass(frozen=True)
class OpEntry:
    """One quantizable op.

    Attributes:
      name: the op name rules use (``QuantizationRule(op_names=...)``) and that names per-op
        variables (``'dot_general0_lhs'``).
      implementation: the ``qarray.ops`` function computing it (either operand may be a QArray).
      entry_points: the JAX functions routed to it while a quantized model runs.
      nnx_attrs: attribute names under which NNX layers keep one of those functions (bound at
        definition time, e.g. ``nnx.Linear.dot_general``); they are re-bound to a late lookup.
    """

    name: str
    implementation: Callable[..., Any]
    entry_points: tuple[EntryPoint, ...]
    nnx_attrs: tuple[str, ...] = ()


OP_TABLE: tuple[OpEntry, ...] = (
    OpEntry('dot_general', qarray.ops.dot_general,
            (EntryPoint('jax.lax', 'dot_general', _op_calls.dot_general_call),
             EntryPoint('jax.numpy', 'dot', _op_calls.dot_call),  # user jnp.dot / jnp.matmul count as dot_general
             EntryPoint('jax.numpy', 'matmul', _op_calls.matmul_call)),
            nnx_attrs=('dot_general',)),
    OpEntry('einsum', qarray.ops.einsum,
            (EntryPoint('jax.numpy', 'einsum', _op_calls.einsum_call),),
            nnx_attrs=('einsum_op',)),
    OpEntry('conv_general_dilated', qarray.ops.conv_general_dilated,
            (EntryPoint('jax.lax', 'conv_general_dilated', _op_calls.conv_call),),
            nnx_attrs=('conv_general_dilated',)),
)

OP_NAMES: tuple[str, ...] = tuple(e.name for e in OP_TABLE)


def entry_points() -> Iterator[tuple[OpEntry, EntryPoint]]:
    """Every (op, entry point) pair of the table.

    Example:
      >>> from flax_integration._op_table import entry_points
      >>> len(list(entry_points()))
      5
    """
    for entry in OP_TABLE:
        for ep in entry.entry_points:
            yield entry, ep


@functools.lru_cache(maxsize=None)
def _original(owner_name: str, attr: str) -> Callable[..., Any]:
    """The JAX function as it was when first asked for (before any patch; the engine asks at import)."""
    return getattr(importlib.import_module(owner_name), attr)


def original(ep: EntryPoint) -> Callable[..., Any]:
    """The unpatched JAX function of an entry point.

    Example:
      >>> import jax
      >>> from flax_integration._op_table import OP_TABLE, original
      >>> original(OP_TABLE[0].entry_points[0]) is jax.lax.dot_general
      True
    """
    return _original(ep.owner_name, ep.attr)


def nnx_late_bindings() -> dict[str, list[tuple[Callable[..., Any], Callable[..., Any]]]]:
    """``{nnx attribute: [(original function, late-bound replacement), ...]}`` from the table.

    An NNX layer attribute that *is* one of the originals is replaced by a
    function that looks the JAX name up at call time, so the interception
    engine can route it while a quantized model runs.

    Example:
      >>> from flax_integration._op_table import nnx_late_bindings
      >>> sorted(nnx_late_bindings())
      ['conv_general_dilated', 'dot_general', 'einsum_op']
    """
    out: dict[str, list] = {}
    for entry in OP_TABLE:
        for attr in entry.nnx_attrs:
            for ep in entry.entry_points:
                out.setdefault(attr, []).append((original(ep), _late(ep.owner_name, ep.attr)))
    return out


@functools.lru_cache(maxsize=None)
def _late(owner_name: str, attr: str) -> Callable[..., Any]:
    owner = importlib.import_module(owner_name)

    def late(*args, **kwargs):
        return getattr(owner, attr)(*args, **kwargs)

    late.__name__ = late.__qualname__ = f'late_{attr}'
    late.__doc__ = f"``{owner_name}.{attr}`` looked up at call time (so a quantized model's patch can route it)."
    return late


# Capture every original now, at import, before anything is patched.
for _entry, _ep in entry_points():
    original(_ep)
