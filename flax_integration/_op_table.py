"""The op table: every op a rule can quantize, in one place.

One :class:`OpEntry` per quantizable op: its rule name, the ``qarray.ops``
function that computes it on QArrays, the JAX functions it intercepts (each an
:class:`EntryPoint`: owner, attribute, and a canonicalizer to the
:class:`~flax_integration._op_calls.OpCall` form) and the attributes NNX
layers bind to those functions at definition time (so they are re-bound to a
late lookup). Everything else is derived from :data:`OP_TABLE`: the rule op
names (:data:`OP_NAMES`), the functions the interception engine patches, the
NNX late bindings.

Adding an op: write its ``qarray.ops`` module (exported from ``qarray.ops``),
add its canonicalizer and one entry here, and tests.

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

import jax

import qarray.ops
from qarray.ops.einsum import parse_subscripts

from flax_integration._op_calls import Impl, OpCall
from flax_integration.wrappers import as_float

__all__ = ['EntryPoint', 'OpEntry', 'OP_TABLE', 'OP_NAMES', 'entry_points', 'nnx_late_bindings', 'original',
           'dot_general_call', 'dot_call', 'matmul_call', 'einsum_call', 'conv_call']


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


# --------------------------------------------------------------------------- canonicalizers
def dot_general_call(impl: Impl, original: Callable, lhs, rhs, dimension_numbers, precision=None,
                     preferred_element_type=None, **extra) -> OpCall:
    """Canonicalize ``lax.dot_general`` arguments (``impl``: the quantized op; ``original``: the jax one).

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> from flax_integration._op_table import dot_general_call
      >>> call = dot_general_call(qarray.dot_general, jax.lax.dot_general, jnp.ones((2, 3, 4)), jnp.ones((4, 5)),
      ...                         (((2,), (0,)), ((), ())))
      >>> call.kept, call.contract, call.tile_axis
      (((0, 1), (1,)), ((2,), (0,)), (2, 0))
    """
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(a) for a in t) for t in (lc, rc, lb, rb))
    nl, nr = len(lhs.shape), len(rhs.shape)
    kept = (tuple(a for a in range(nl) if a not in lc), tuple(a for a in range(nr) if a not in rc))
    tile_axis = (lc[-1], rc[-1]) if lc else (None, None)
    dn = ((lc, rc), (lb, rb))

    def runner(a, b):
        return impl(a, b, dn, precision=precision, preferred_element_type=preferred_element_type)

    def orig():
        return original(as_float(lhs), as_float(rhs), dimension_numbers, precision=precision,
                        preferred_element_type=preferred_element_type, **extra)

    return OpCall('dot_general', [lhs, rhs], kept, (lc, rc), tile_axis, runner, orig)


def dot_call(impl: Impl, original: Callable, a, b, precision=None, preferred_element_type=None,
             **extra) -> OpCall | None:
    """``jnp.dot`` as a dot_general (None for the scalar case, which stays float).

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from flax_integration._op_table import dot_call
      >>> dot_call(qarray.dot_general, jnp.dot, jnp.ones((2, 3)), jnp.ones((3, 4))).contract
      ((1,), (0,))
    """
    na, nb = len(a.shape), len(b.shape)
    if na == 0 or nb == 0:
        return None
    dn = (((na - 1,), (max(nb - 2, 0),)), ((), ()))
    call = dot_general_call(impl, original, a, b, dn, precision, preferred_element_type)
    call.original = lambda: original(as_float(a), as_float(b), precision=precision,
                                     preferred_element_type=preferred_element_type, **extra)
    return call


def matmul_call(impl: Impl, original: Callable, a, b, precision=None, preferred_element_type=None,
                **extra) -> OpCall | None:
    """``jnp.matmul`` as a dot_general when no broadcasting is needed (else None: the float op runs).

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from flax_integration._op_table import matmul_call
      >>> matmul_call(qarray.dot_general, jnp.matmul, jnp.ones((5, 2, 3)), jnp.ones((5, 3, 4))).kept
      ((0, 1), (0, 2))
    """
    na, nb = len(a.shape), len(b.shape)
    if na == 0 or nb == 0:
        return None
    if nb <= 2:
        dn = (((na - 1,), (0 if nb == 1 else nb - 2,)), ((), ()))
    elif na == nb and a.shape[:-2] == b.shape[:-2]:
        batch = tuple(range(na - 2))
        dn = (((na - 1,), (nb - 2,)), (batch, batch))
    else:
        return None
    call = dot_general_call(impl, original, a, b, dn, precision, preferred_element_type)
    call.original = lambda: original(as_float(a), as_float(b), precision=precision,
                                     preferred_element_type=preferred_element_type, **extra)
    return call


def einsum_call(impl: Impl, original: Callable, subscripts, *operands, precision=None,
                preferred_element_type=None, **extra) -> OpCall | None:
    """Canonicalize a two-operand ``jnp.einsum`` with a string spec (else None: the float op runs).

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from flax_integration._op_table import einsum_call
      >>> einsum_call(qarray.einsum, jnp.einsum, 'btd,dnh->btnh', jnp.ones((2, 3, 4)), jnp.ones((4, 2, 5))).tile_axis
      (2, 0)
    """
    if not isinstance(subscripts, str) or len(operands) != 2:
        return None
    lhs, rhs = operands
    (ls, rs), out, _ = parse_subscripts(subscripts, [lhs.shape, rhs.shape])
    kept = tuple(tuple(i for i, c in enumerate(s) if c in out) for s in (ls, rs))
    contract = tuple(tuple(i for i, c in enumerate(s) if c not in out) for s in (ls, rs))
    shared = [c for c in rs if c in ls and c not in out]
    tile_axis = (ls.index(shared[-1]), rs.index(shared[-1])) if shared else (None, None)
    extra.pop('_dot_general', None)  # flax passes lax.dot_general here; qarray.ops picks its own path

    def runner(a, b):
        return impl(subscripts, a, b, precision=precision, preferred_element_type=preferred_element_type)

    def orig():
        return original(subscripts, as_float(lhs), as_float(rhs), precision=precision,
                        preferred_element_type=preferred_element_type, **extra)

    return OpCall('einsum', [lhs, rhs], kept, contract, tile_axis, runner, orig)


def conv_call(impl: Impl, original: Callable, lhs, rhs, window_strides, padding, lhs_dilation=None,
              rhs_dilation=None, dimension_numbers=None, feature_group_count=1, batch_group_count=1,
              precision=None, preferred_element_type=None, **extra) -> OpCall:
    """Canonicalize ``lax.conv_general_dilated`` arguments.

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> from flax_integration._op_table import conv_call
      >>> c = conv_call(qarray.conv_general_dilated, jax.lax.conv_general_dilated, jnp.ones((1, 8, 8, 3)),
      ...               jnp.ones((3, 3, 3, 4)), (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      >>> c.kept[1]
      (3,)
    """
    dn = jax.lax.conv_dimension_numbers(tuple(lhs.shape), tuple(rhs.shape), dimension_numbers)
    out_feature = int(dn.rhs_spec[0])
    nl, nr = len(lhs.shape), len(rhs.shape)
    kept = (tuple(range(nl)), (out_feature,))
    contract = ((), tuple(a for a in range(nr) if a != out_feature))
    kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dn,
                  feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                  precision=precision, preferred_element_type=preferred_element_type)

    def runner(a, b):
        return impl(a, b, window_strides, padding, **kwargs)

    def orig():
        return original(as_float(lhs), as_float(rhs), window_strides, padding, **kwargs, **extra)

    return OpCall('conv_general_dilated', [lhs, rhs], kept, contract, (None, None), runner, orig,
                  per_channel_only=True, block_axis=(int(dn.lhs_spec[1]), int(dn.rhs_spec[1])))


# --------------------------------------------------------------------------- the table
OP_TABLE: tuple[OpEntry, ...] = (
    OpEntry('dot_general', qarray.ops.dot_general,
            (EntryPoint('jax.lax', 'dot_general', dot_general_call),
             EntryPoint('jax.numpy', 'dot', dot_call),  # user jnp.dot / jnp.matmul count as dot_general
             EntryPoint('jax.numpy', 'matmul', matmul_call)),
            nnx_attrs=('dot_general',)),
    OpEntry('einsum', qarray.ops.einsum,
            (EntryPoint('jax.numpy', 'einsum', einsum_call),),
            nnx_attrs=('einsum_op',)),
    OpEntry('conv_general_dilated', qarray.ops.conv_general_dilated,
            (EntryPoint('jax.lax', 'conv_general_dilated', conv_call),),
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
