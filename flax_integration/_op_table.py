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

Two ops take a call form of their own, a subclass of ``OpCall`` with ``kind`` saying what it is:

* ``'ragged_dot'`` (:class:`RaggedCall`, ``kind='ragged'``): ``jax.lax.ragged_dot(lhs[M, K], rhs[G, K, N],
  group_sizes)`` (and ``ragged_dot_general`` in that form), a mixture of experts. The weight ``rhs`` keeps
  its expert and output-channel axes (one scale per expert and output channel, tiles along K); the
  activation ``lhs`` keeps its rows (one scale per token). A static activation scale is per tensor, or
  per expert when the rule keeps the ragged axis (``act_batch_axes=()``): the scale of row ``m`` is its
  group's, gathered through ``group_sizes`` (:meth:`RaggedCall.group_rows`).
* ``'take'`` (:class:`GatherCall`, ``kind='gather'``): ``jnp.take(table, indices, axis)``, an embedding
  lookup (``nn.Embed`` / ``nnx.Embed``). Only the table can be the weight; it keeps the gathered axis
  (one scale per row, i.e. per token id) and tiles along its feature axis, the layout the tied head
  ``jnp.dot(query, table.T)`` contracts, so one stored table serves both. Nothing else is quantized:
  the indices are integers, and a lookup in an activation runs as it is.

Example:
  >>> from flax_integration._op_table import OP_NAMES, entry_points
  >>> OP_NAMES
  ('dot_general', 'einsum', 'conv_general_dilated', 'ragged_dot', 'take')
  >>> sorted(f'{ep.owner_name}.{ep.attr}' for _, ep in entry_points())[:4]
  ['jax.lax.conv_general_dilated', 'jax.lax.dot_general', 'jax.lax.ragged_dot', 'jax.lax.ragged_dot_general']
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, ClassVar, Iterator

import jax
import jax.numpy as jnp

import qarray.ops
from qarray.ops.ragged_dot import canonical_axes as _canonical_axes, row_groups as _row_groups
from qarray.ops.einsum import parse_subscripts

from flax_integration._op_calls import Impl, OpCall
from flax_integration.wrappers import as_float

__all__ = ['EntryPoint', 'OpEntry', 'OP_TABLE', 'OP_NAMES', 'entry_points', 'nnx_late_bindings', 'original',
           'dot_general_call', 'dot_call', 'matmul_call', 'einsum_call', 'conv_call', 'ragged_dot_call',
           'ragged_dot_general_call', 'take_call', 'RaggedCall', 'GatherCall', 'call_kind']


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


# --------------------------------------------------------------------------- call forms of their own
def call_kind(call: Any) -> str:
    """``'dense'`` (dot_general, einsum, conv), ``'ragged'`` (:class:`RaggedCall`) or ``'gather'``
    (:class:`GatherCall`): what providers ask where an op's nature matters (GPTQ and rotations need a
    dense contraction, LoRA adapts dense ops, LiteRT exports dense ops).

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> from flax_integration._op_table import call_kind, take_call
      >>> call_kind(take_call(qarray.ops.take, jnp.take, jnp.ones((4, 2)), jnp.array([1]), axis=0))
      'gather'
    """
    return getattr(call, 'kind', 'dense')


@dataclasses.dataclass
class RaggedCall(OpCall):
    """A ``ragged_dot`` call: :class:`OpCall` plus the ``group_sizes`` that assign rows to experts.

    ``operands`` are ``[lhs[M, K], rhs[G, K, N]]`` in the canonical order (a ``ragged_dot_general`` call is
    transposed to it). Static activation scales of ``lhs`` may be per group (:meth:`per_group`): computed
    per row, reduced over each group's rows (:meth:`group_range`), and gathered back per row
    (:meth:`group_rows`) to quantize.

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> from flax_integration._op_table import ragged_dot_call
      >>> c = ragged_dot_call(qarray.ragged_dot, jax.lax.ragged_dot, jnp.ones((5, 8)), jnp.ones((3, 8, 4)),
      ...                     jnp.array([2, 0, 3]))
      >>> c.kept, c.contract, c.tile_axis, c.row_groups().tolist()
      (((0,), (0, 2)), ((1,), (1,)), (1, 1), [0, 0, 2, 2, 2])
    """

    group_sizes: Any = None
    ragged_axis: int = 0  # lhs's ragged (row) axis
    group_axis: int = 0   # rhs's group (expert) axis
    kind: ClassVar[str] = 'ragged'

    @property
    def num_groups(self) -> int:
        """``G``, the number of groups (experts).

        Example:
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax_integration._op_table import ragged_dot_call
          >>> ragged_dot_call(qarray.ragged_dot, jax.lax.ragged_dot, jnp.ones((5, 8)), jnp.ones((3, 8, 4)),
          ...                 jnp.array([2, 0, 3])).num_groups
          3
        """
        return int(self.operands[1].shape[self.group_axis])

    def row_groups(self) -> jax.Array:
        """The group of each row of ``lhs`` (``G`` for rows past ``sum(group_sizes)``).

        Example:
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax_integration._op_table import ragged_dot_call
          >>> ragged_dot_call(qarray.ragged_dot, jax.lax.ragged_dot, jnp.ones((4, 8)), jnp.ones((2, 8, 4)),
          ...                 jnp.array([1, 2])).row_groups().tolist()
          [0, 1, 1, 2]
        """
        return _row_groups(self.group_sizes, self.operands[0].shape[self.ragged_axis])

    def per_group(self, i: int, batch_axes: tuple[int, ...] | None) -> bool:
        """Whether operand ``i``'s static scale is per group: it is ``lhs`` and the rule keeps its ragged axis
        (``act_batch_axes`` given without axis 0, e.g. ``()``).

        Example:
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax_integration._op_table import ragged_dot_call
          >>> c = ragged_dot_call(qarray.ragged_dot, jax.lax.ragged_dot, jnp.ones((4, 8)), jnp.ones((2, 8, 4)),
          ...                     jnp.array([1, 2]))
          >>> c.per_group(0, None), c.per_group(0, ()), c.per_group(0, (0,))
          (False, True, False)
        """
        return i == 0 and batch_axes is not None and self.ragged_axis not in {a % 2 for a in batch_axes}

    def group_range(self, lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per-row ranges ``[M, S]`` -> per-group ranges ``[G, S]`` (min of lo, max of hi over the group's rows),
        in the axis order of ``lhs`` (the ragged axis in place of M). A group without rows gets the range of
        all rows, so its scale stays usable.

        Example:
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax_integration._op_table import ragged_dot_call
          >>> c = ragged_dot_call(qarray.ragged_dot, jax.lax.ragged_dot, jnp.ones((3, 8)), jnp.ones((3, 8, 4)),
          ...                     jnp.array([2, 0, 1]))
          >>> hi = jnp.array([[1.], [3.], [2.]])
          >>> c.group_range(-hi, hi)[1].tolist()   # group 1 has no rows: the range of all rows
          [[3.0], [3.0], [2.0]]
        """
        flip = self.ragged_axis != 0  # lhs[K, M]: ranges are [S, M]
        if flip:
            lo, hi = lo.T, hi.T
        g = self.num_groups
        gid = self.row_groups()
        hi_g = jax.ops.segment_max(hi, gid, num_segments=g + 1)[:g]
        lo_g = jax.ops.segment_min(lo, gid, num_segments=g + 1)[:g]
        count = jax.ops.segment_sum(jnp.ones_like(gid), gid, num_segments=g + 1)[:g]
        valid = (gid < g)[:, None]
        hi_t = jnp.max(jnp.where(valid, hi, -jnp.inf), axis=0, keepdims=True)
        lo_t = jnp.min(jnp.where(valid, lo, jnp.inf), axis=0, keepdims=True)
        hi_t, lo_t = jnp.where(jnp.isfinite(hi_t), hi_t, 0), jnp.where(jnp.isfinite(lo_t), lo_t, 0)
        empty = (count == 0)[:, None]
        lo_g, hi_g = jnp.where(empty, lo_t, lo_g).astype(lo.dtype), jnp.where(empty, hi_t, hi_g).astype(hi.dtype)
        return (lo_g.T, hi_g.T) if flip else (lo_g, hi_g)

    def group_rows(self, x: Any) -> Any:
        """A per-group scale or zero point ``[G, S]`` laid out per row ``[M, S]`` (None stays None).

        Example:
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax_integration._op_table import ragged_dot_call
          >>> c = ragged_dot_call(qarray.ragged_dot, jax.lax.ragged_dot, jnp.ones((3, 8)), jnp.ones((2, 8, 4)),
          ...                     jnp.array([1, 2]))
          >>> c.group_rows(jnp.array([[0.5], [2.0]])).tolist()
          [[0.5], [2.0], [2.0]]
        """
        if x is None:
            return None
        return jnp.take(x, jnp.minimum(self.row_groups(), self.num_groups - 1), axis=self.ragged_axis)


@dataclasses.dataclass
class GatherCall(OpCall):
    """A ``jnp.take`` call (an embedding lookup): operands ``[table, indices]``; only the table can be the
    weight (``weight_candidates``), and activations are never quantized (``quantize_activations``).

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from flax_integration._op_table import take_call
      >>> c = take_call(qarray.ops.take, jnp.take, jnp.ones((10, 64)), jnp.array([[1, 2]]), axis=0)
      >>> c.kept, c.contract, c.layout(0, 'weight', 32)   # one scale per row, tiles of 32 along the features
      (((0,), (0, 1)), ((1,), ()), ((0,), {1: 32}))
    """

    kind: ClassVar[str] = 'gather'
    weight_candidates: ClassVar[tuple[int, ...]] = (0,)
    quantize_activations: ClassVar[bool] = False


def ragged_dot_call(impl: Impl, original: Callable, lhs, rhs, group_sizes, precision=None,
                    preferred_element_type=None, group_offset=None, **extra) -> RaggedCall | None:
    """Canonicalize ``jax.lax.ragged_dot`` arguments (None for shapes it does not take: the float op runs).

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> from flax_integration._op_table import ragged_dot_call
      >>> c = ragged_dot_call(qarray.ragged_dot, jax.lax.ragged_dot, jnp.ones((5, 8)), jnp.ones((3, 8, 4)),
      ...                     jnp.array([2, 0, 3]))
      >>> c.run(*c.operands).shape
      (5, 4)
    """
    if len(lhs.shape) != 2 or len(rhs.shape) != 3:
        return None
    kwargs = dict(precision=precision, preferred_element_type=preferred_element_type, group_offset=group_offset,
                  **extra)

    def runner(a, b):
        return impl(a, b, group_sizes, **kwargs)

    def orig():
        return original(as_float(lhs), as_float(rhs), group_sizes, **kwargs)

    return RaggedCall('ragged_dot', [lhs, rhs], ((0,), (0, 2)), ((1,), (1,)), (1, 1), runner, orig,
                      group_sizes=group_sizes)


def ragged_dot_general_call(impl: Impl, original: Callable, lhs, rhs, group_sizes, ragged_dot_dimension_numbers,
                            precision=None, preferred_element_type=None, group_offset=None,
                            **extra) -> RaggedCall | None:
    """``jax.lax.ragged_dot_general`` in the form of ``ragged_dot`` (any axis order, see
    :func:`qarray.ops.ragged_dot.canonical_axes`) as a :class:`RaggedCall` on the operands as given (so a
    weight is still recognised as the module's param); None for other forms (the float op runs).

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> from flax_integration._op_table import ragged_dot_general_call
      >>> dn = jax.lax.RaggedDotDimensionNumbers((((0,), (2,)), ((), ())), (1,), (0,))  # lhs[K, M], rhs[G, N, K]
      >>> c = ragged_dot_general_call(qarray.ragged_dot, jax.lax.ragged_dot_general, jnp.ones((8, 5)),
      ...                             jnp.ones((3, 4, 8)), jnp.array([2, 0, 3]), dn)
      >>> c.kept, c.contract, c.run(*c.operands).shape
      (((1,), (0, 1)), ((0,), (2,)), (5, 4))
    """
    try:
        (ragged, lc), (group, rc, free) = _canonical_axes(ragged_dot_dimension_numbers, len(lhs.shape),
                                                                 len(rhs.shape))
    except (TypeError, ValueError):
        return None
    kwargs = dict(precision=precision, preferred_element_type=preferred_element_type, group_offset=group_offset,
                  **extra)

    def runner(a, b):
        return qarray.ops.ragged_dot_general(a, b, group_sizes, ragged_dot_dimension_numbers, **kwargs)

    def orig():
        return original(as_float(lhs), as_float(rhs), group_sizes, ragged_dot_dimension_numbers, **kwargs)

    return RaggedCall('ragged_dot', [lhs, rhs], ((ragged,), tuple(sorted((group, free)))), ((lc,), (rc,)),
                      (lc, rc), runner, orig, group_sizes=group_sizes, ragged_axis=ragged, group_axis=group)


def take_call(impl: Impl, original: Callable, a, indices, axis=None, out=None, mode=None, unique_indices=False,
              indices_are_sorted=False, fill_value=None) -> GatherCall | None:
    """Canonicalize ``jnp.take(a, indices, axis)`` with an axis and a floating (or quantized) ``a``; None
    otherwise (the float op runs).

    The table keeps the gathered axis (one scale per row); its other axes are where a row's scale group
    lies, tiles on the last of them.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from flax_integration._op_table import take_call
      >>> c = take_call(qarray.ops.take, jnp.take, jnp.ones((10, 64)), jnp.array([3, 4]), axis=0)
      >>> c.run(*c.operands).shape, c.tile_axis
      ((2, 64), (1, None))
    """
    if axis is None or out is not None or len(a.shape) == 0:
        return None
    dtype = getattr(a, 'dtype', None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        return None
    nd = len(a.shape)
    ax = int(axis) % nd
    features = tuple(d for d in range(nd) if d != ax)
    ni = len(getattr(indices, 'shape', ()))
    kwargs = dict(mode=mode, fill_value=fill_value, unique_indices=unique_indices,
                  indices_are_sorted=indices_are_sorted)

    def runner(t, i):
        return impl(t, i, ax, **kwargs)

    def orig():
        return original(as_float(a), indices, axis, **kwargs)

    return GatherCall('take', [a, indices], ((ax,), tuple(range(ni))), (features, ()),
                      (features[-1] if features else None, None), runner, orig)


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
    OpEntry('ragged_dot', qarray.ops.ragged_dot,
            (EntryPoint('jax.lax', 'ragged_dot', ragged_dot_call),
             EntryPoint('jax.lax', 'ragged_dot_general', ragged_dot_general_call))),
    OpEntry('take', qarray.ops.take,
            (EntryPoint('jax.numpy', 'take', take_call),)),
)

OP_NAMES: tuple[str, ...] = tuple(e.name for e in OP_TABLE)


def entry_points() -> Iterator[tuple[OpEntry, EntryPoint]]:
    """Every (op, entry point) pair of the table.

    Example:
      >>> from flax_integration._op_table import entry_points
      >>> len(list(entry_points()))
      8
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
