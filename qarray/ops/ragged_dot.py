"""``ragged_dot`` for arrays and QArrays: mixture-of-experts matmuls with quantized experts or activations.

``ragged_dot(lhs[M, K], rhs[G, K, N], group_sizes[G])`` is ``jax.lax.ragged_dot``: the rows of ``lhs``
belong to the groups in order (the first ``group_sizes[0]`` rows to group 0, the next ``group_sizes[1]``
to group 1, ...), each row is multiplied by its group's ``rhs[g]``, and rows past ``sum(group_sizes)``
give zeros. Either operand may be a QArray of any format and layout; the result is a plain array.

Scales. A scale that is one value along K factors out of each output element ``out[m, n]``: the
activation's per row (per token) ``sa[m]``, the weight's per expert and output channel
``sb[g(m), n]``, where ``g(m)`` is the group of row ``m`` (a gather of ``[M, N]`` scales by the row's
group, from ``searchsorted(cumsum(group_sizes), m)``, never a product with ``G`` times the work).

Paths (chosen from static shapes and formats, as :func:`qarray.ops.dot_general` chooses):

* ``'int'``: both operands integer QArrays (w8a8, or int8 x int4 ...). One ``lax.ragged_dot`` on the
  int8 codes with int32 accumulation, then ``acc * sa[m] * sb[g(m), n]``; zero points by correction
  terms (``sum_k (a - za)(b - zb) = ab - za sum_k b - zb sum_k a + K za zb``, the sums per group of the
  row). Tiles along K: each tile is contracted exactly in int32 and scaled by its own
  ``sa[m, t] * sb[g(m), t, n]`` inside a ``fori_loop`` over tiles (never an ``[S, M, N]`` intermediate).
* ``'fp8'``: both operands fp8 QArrays: the same on the fp8 codes, upcast exactly to float32.
* ``'float'``: everything else -- weight-only (float x QArray), activation-only, nf4, fp4,
  microscaling, quantized scales, and integer tiles finer than :data:`qarray.ops.dot_general.MIN_TILE`.
  A QArray whose scale is one value along K enters as its unscaled values (``code - zero_point``) with
  the scale applied to the output rows as above when the output has no more elements than the operand;
  otherwise (tiles along K, quantized scales, code books) it is **dequantized** inside the same jitted
  program: per-tile accumulation would run one ragged dot per tile on float operands, which on XLA's
  dense ``ragged_dot`` lowering (CPU: ``G`` masked copies of ``lhs``) costs more than the dequantize.

Not supported (refused with an error): ``group_offset`` (``jax.lax.ragged_dot`` 0.10.2 implements it on no
backend either) and ``out_sharding`` with a QArray operand (plain arrays pass both through to JAX).
:func:`ragged_dot_general` takes the dimension numbers of that same form in any axis order
(``lhs`` ragged on a non-contracting axis, ``rhs`` with one group axis, no batch axes); other forms with
a QArray operand raise ``ValueError``. ``jax.vmap`` of ``ragged_dot`` raises JAX's own
``NotImplementedError`` (``jax.lax.ragged_dot`` has no batching rule for it in JAX 0.10, float operands
included); run a batch with ``jax.lax.map``.

Example:
  >>> import jax, jax.numpy as jnp, qarray
  >>> x = jax.random.normal(jax.random.key(0), (6, 64))
  >>> w = qarray.quantize(jax.random.normal(jax.random.key(1), (3, 64, 8)), 'int8', channelwise_axes=(0, 2))
  >>> y = qarray.ragged_dot(x, w, jnp.array([2, 0, 3]))   # rows 0-1: expert 0, rows 2-4: expert 2, row 5: none
  >>> y.shape, bool((y[5] == 0).all())
  ((6, 8), True)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from qarray import _quantize
from qarray._array import QArray
from qarray.ops import _dims
from qarray.ops._operands import (check_operand, describe, float_dtype, int_codes, is_exact_in, plain_scales,
                                  result_dtype, scale_is_shared, values)
from qarray.ops.dot_general import choose_path

__all__ = ['ragged_dot', 'ragged_dot_general', 'ragged_path', 'row_groups', 'canonical_axes',
           'RAGGED_DOT_DIMENSION_NUMBERS']

#: The dimension numbers of ``jax.lax.ragged_dot``: ``lhs[M, K]`` ragged along M, ``rhs[G, K, N]``.
RAGGED_DOT_DIMENSION_NUMBERS = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (1,)), ((), ())), lhs_ragged_dimensions=(0,), rhs_group_dimensions=(0,))

_MK_GKN = (((1,), (1,)), ((), ()))  # the contraction of the canonical form, for choose_path


def row_groups(group_sizes: Any, rows: int) -> jax.Array:
    """The group of each of ``rows`` rows (int32): ``0..G-1``, or ``G`` for a row past ``sum(group_sizes)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.ops.ragged_dot import row_groups
      >>> row_groups(jnp.array([2, 0, 3]), 6).tolist()
      [0, 0, 2, 2, 2, 3]
    """
    ends = jnp.cumsum(jnp.asarray(group_sizes).astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(rows, dtype=jnp.int32), side='right').astype(jnp.int32)


def ragged_path(lhs: Any, rhs: Any) -> str:
    """``'int'``, ``'fp8'`` or ``'float'`` for ``ragged_dot(lhs[M, K], rhs[G, K, N])`` (see the module
    docstring); raises ``ValueError`` when tiles along K do not nest.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from qarray.ops.ragged_dot import ragged_path
      >>> a = qarray.quantize(jnp.ones((4, 128)), 'int8', channelwise_axes=(0,))
      >>> b = qarray.quantize(jnp.ones((2, 128, 8)), 'int4', channelwise_axes=(0, 2))
      >>> ragged_path(a, b), ragged_path(jnp.ones((4, 128)), b)
      ('int', 'float')
    """
    path = choose_path(lhs, rhs, _MK_GKN)
    return 'float' if path == 'block_scaled' else path  # (no block-scaled ragged dot in JAX)


def _check(lhs: Any, rhs: Any, group_sizes: Any) -> jax.Array:
    pair = f"lhs: {describe(lhs)}; rhs: {describe(rhs)}."
    if len(lhs.shape) != 2 or len(rhs.shape) != 3:
        raise ValueError(f"ragged_dot takes lhs[M, K] (rank 2) and rhs[G, K, N] (rank 3); got ranks "
                         f"{len(lhs.shape)} and {len(rhs.shape)}. {pair}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"ragged_dot: contracting sizes differ: lhs[M, K] has K={lhs.shape[1]}, rhs[G, K, N] has "
                         f"K={rhs.shape[1]}. {pair}")
    try:
        gs = jnp.asarray(group_sizes)
    except TypeError:
        raise TypeError(f"group_sizes must be an integer array of shape (G,); got "
                        f"{type(group_sizes).__name__}.") from None
    if not jnp.issubdtype(gs.dtype, jnp.integer):
        raise TypeError(f"group_sizes must be an integer array (rows per group); got dtype {gs.dtype}.")
    if gs.shape != (rhs.shape[0],):
        raise ValueError(f"group_sizes must have shape (G,) = ({rhs.shape[0]},), one size per group of rhs; got "
                         f"shape {tuple(gs.shape)}. {pair}")
    return gs


def _hashable(p: Any) -> Any:
    return tuple(p) if isinstance(p, list) else p


def ragged_dot(lhs: Any, rhs: Any, group_sizes: Any, precision: Any = None, preferred_element_type: Any = None,
               group_offset: Any = None, out_sharding: Any = None) -> jax.Array:
    """Drop-in ``jax.lax.ragged_dot`` where either operand may be a QArray; returns a plain array.

    Args:
      lhs: ``[M, K]`` array or QArray (activations: per-row scales factor out).
      rhs: ``[G, K, N]`` array or QArray (experts: per expert and output channel scales factor out; tiles
        along K go through the integer tile loop or dequantize, see the module docstring).
      group_sizes: ``[G]`` integers: rows of ``lhs`` per group, in order. Rows past their sum give zeros.
      precision: as for ``lax.ragged_dot``.
      preferred_element_type: output dtype (a float dtype when a QArray is involved); default: the result
        type of both operands' float dtypes.
      group_offset, out_sharding: passed to JAX for plain arrays; refused (``NotImplementedError``) with a
        QArray operand.

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> x = qarray.quantize(jax.random.normal(jax.random.key(0), (5, 128)), 'int8', channelwise_axes=(0,))
      >>> w = qarray.quantize(jax.random.normal(jax.random.key(1), (2, 128, 4)), 'int8', channelwise_axes=(0, 2))
      >>> qarray.ragged_dot(x, w, jnp.array([3, 2])).shape   # w8a8: int8 x int8 -> int32, then the scales
      (5, 4)
    """
    lhs, rhs = check_operand(lhs, 'lhs'), check_operand(rhs, 'rhs')
    if not isinstance(lhs, QArray) and not isinstance(rhs, QArray):
        return lax.ragged_dot(lhs, rhs, group_sizes, precision=precision,
                              preferred_element_type=preferred_element_type, group_offset=group_offset,
                              out_sharding=out_sharding)
    gs = _check(lhs, rhs, group_sizes)
    if group_offset is not None:
        raise NotImplementedError(
            "ragged_dot: group_offset is not supported with QArray operands (jax.lax.ragged_dot 0.10.2 implements "
            "it on no backend either). Slice rhs to the local experts and pass their group_sizes instead.")
    if out_sharding is not None:
        raise NotImplementedError(
            "ragged_dot: out_sharding is not supported with QArray operands; drop it (the output follows the "
            "operands' shardings) or constrain the result with jax.lax.with_sharding_constraint.")
    out_dtype = result_dtype(lhs, rhs, preferred_element_type)
    path = ragged_path(lhs, rhs)
    pet = None if preferred_element_type is None else jnp.dtype(preferred_element_type)
    return _ragged_jit(lhs, rhs, gs, precision=_hashable(precision), out_dtype=out_dtype, pet=pet, path=path)


def canonical_axes(dimension_numbers: Any, lhs_ndim: int, rhs_ndim: int
                   ) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """``((ragged, contracting), (group, contracting, free))``: the axes of ``lhs`` and ``rhs`` that
    :func:`ragged_dot_general`'s dimension numbers make ``lhs[M, K]`` and ``rhs[G, K, N]``.

    Only the form of ``jax.lax.ragged_dot`` (in any axis order) is supported: a rank-2 ``lhs`` ragged
    along its non-contracting axis, a rank-3 ``rhs`` with one group axis, one contracting axis each, no
    batch axes. Anything else raises ``ValueError``.

    Example:
      >>> import jax
      >>> from qarray.ops.ragged_dot import canonical_axes
      >>> dn = jax.lax.RaggedDotDimensionNumbers((((0,), (2,)), ((), ())), (1,), (0,))  # lhs[K, M], rhs[G, N, K]
      >>> canonical_axes(dn, 2, 3)
      ((1, 0), (0, 2, 1))
    """
    try:
        (lc, rc), (lb, rb) = dimension_numbers.dot_dimension_numbers
        ragged = tuple(int(a) for a in dimension_numbers.lhs_ragged_dimensions)
        group = tuple(int(a) for a in dimension_numbers.rhs_group_dimensions)
        lc, rc, lb, rb = (tuple(int(a) for a in t) for t in (lc, rc, lb, rb))
    except (AttributeError, TypeError, ValueError):
        raise TypeError("ragged_dot_dimension_numbers must be a jax.lax.RaggedDotDimensionNumbers; got "
                        f"{dimension_numbers!r}.") from None
    supported = (lhs_ndim == 2 and rhs_ndim == 3 and not lb and not rb and len(lc) == len(rc) == 1
                 and len(ragged) == 1 and len(group) == 1 and ragged[0] in (0, 1) and lc[0] in (0, 1)
                 and ragged[0] != lc[0] and group[0] in (0, 1, 2) and rc[0] in (0, 1, 2) and group[0] != rc[0])
    if not supported:
        raise ValueError(
            "ragged_dot_general with QArray operands supports the form of jax.lax.ragged_dot only: lhs[M, K] "
            "(rank 2) ragged along its non-contracting axis, rhs[G, K, N] (rank 3) with one group axis, one "
            f"contracting axis each and no batch axes, in any axis order. Got lhs rank {lhs_ndim}, rhs rank "
            f"{rhs_ndim}, dot_dimension_numbers {((lc, rc), (lb, rb))}, lhs_ragged_dimensions {ragged}, "
            f"rhs_group_dimensions {group}. Dequantize the operands (qarray.dequantize) for other forms.")
    free = ({0, 1, 2} - {group[0], rc[0]}).pop()
    return (ragged[0], lc[0]), (group[0], rc[0], free)


def ragged_dot_general(lhs: Any, rhs: Any, group_sizes: Any, ragged_dot_dimension_numbers: Any,
                       precision: Any = None, preferred_element_type: Any = None, group_offset: Any = None,
                       out_sharding: Any = None) -> jax.Array:
    """Drop-in ``jax.lax.ragged_dot_general``; with a QArray operand only the form of ``ragged_dot`` (any axis
    order, see :func:`canonical_axes`) is supported. Plain arrays pass through to JAX unchanged.

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> x = jax.random.normal(jax.random.key(0), (64, 5))            # lhs[K, M]
      >>> w = qarray.quantize(jax.random.normal(jax.random.key(1), (2, 8, 64)), 'int4', channelwise_axes=(0, 1))
      >>> dn = jax.lax.RaggedDotDimensionNumbers((((0,), (2,)), ((), ())), (1,), (0,))
      >>> y = qarray.ops.ragged_dot_general(x, w, jnp.array([2, 3]), dn)
      >>> bool(jnp.allclose(y, qarray.ragged_dot(x.T, w.transpose(0, 2, 1), jnp.array([2, 3]))))
      True
    """
    lhs, rhs = check_operand(lhs, 'lhs'), check_operand(rhs, 'rhs')
    if not isinstance(lhs, QArray) and not isinstance(rhs, QArray):
        return lax.ragged_dot_general(lhs, rhs, group_sizes, ragged_dot_dimension_numbers, precision=precision,
                                      preferred_element_type=preferred_element_type, group_offset=group_offset,
                                      out_sharding=out_sharding)
    lperm, rperm = canonical_axes(ragged_dot_dimension_numbers, lhs.ndim, rhs.ndim)
    if lperm != (0, 1):
        lhs = lhs.transpose(lperm) if isinstance(lhs, QArray) else jnp.transpose(lhs, lperm)
    if rperm != (0, 1, 2):
        rhs = rhs.transpose(rperm) if isinstance(rhs, QArray) else jnp.transpose(rhs, rperm)
    return ragged_dot(lhs, rhs, group_sizes, precision, preferred_element_type, group_offset, out_sharding)


@functools.partial(jax.jit, static_argnames=('precision', 'out_dtype', 'pet', 'path'))
def _ragged_jit(lhs, rhs, group_sizes, *, precision, out_dtype, pet, path):
    if path in ('int', 'fp8'):
        return _scaled(lhs, rhs, group_sizes, precision, out_dtype, path)
    return _float(lhs, rhs, group_sizes, precision, out_dtype, pet)


def _rows_of(x: jax.Array, gid: jax.Array) -> jax.Array:
    """Per-group values ``[G|1, ...]`` laid out per row ``[M|1, ...]`` (rows past the end take group G-1: the
    caller masks them)."""
    if x.shape[0] == 1:
        return x
    return jnp.take(x, jnp.minimum(gid, x.shape[0] - 1), axis=0)


def _lhs_scale(s: jax.Array, m: int) -> jax.Array:
    """An lhs scale / zero point ``[M|tiles|1, S]`` as ``[M|1, S]``."""
    return s if s.shape[0] in (1, m) else _dims.expand_tiles(s, 0, m)


def _rhs_scale(s: jax.Array, g: int, n: int) -> jax.Array:
    """An rhs scale / zero point ``[G|tiles|1, S, N|tiles|1]`` as ``[G|1, S, N|1]``."""
    if s.shape[0] not in (1, g):
        s = _dims.expand_tiles(s, 0, g)
    if s.shape[2] not in (1, n):
        s = _dims.expand_tiles(s, 2, n)
    return s


def _scaled(lhs, rhs, group_sizes, precision, out_dtype, path):
    m, k = lhs.shape
    g, _, n = rhs.shape
    if path == 'int':
        a, za = int_codes(lhs)
        b, zb = int_codes(rhs)
        acc_dtype = jnp.int32
    else:  # fp8 codes are exact in float32
        a, b = _quantize.codes(lhs).astype(jnp.float32), _quantize.codes(rhs).astype(jnp.float32)
        za = zb = None
        acc_dtype = jnp.float32
    s = _dims.match_tiles(k, lhs.scale.shape[1], rhs.scale.shape[1]) if k else 1
    sa = _dims.expand_tiles(_lhs_scale(lhs.scale.astype(jnp.float32), m), 1, s)
    sb = _dims.expand_tiles(_rhs_scale(rhs.scale.astype(jnp.float32), g, n), 1, s)
    za = None if za is None else _dims.expand_tiles(_lhs_scale(za, m), 1, s)
    zb = None if zb is None else _dims.expand_tiles(_rhs_scale(zb, g, n), 1, s)
    gid = row_groups(group_sizes, m)
    t = k // s if s else 0

    def tile(i, a_t, b_t):
        """Exact sum over one K tile, zero points corrected, times the tile's scales: ``[M, N]`` float32."""
        acc = lax.ragged_dot(a_t, b_t, group_sizes, precision=precision, preferred_element_type=acc_dtype)
        za_i = None if za is None else lax.dynamic_slice_in_dim(za, i, 1, axis=1)            # [M|1, 1]
        zb_i = None if zb is None else _rows_of(lax.dynamic_slice_in_dim(zb, i, 1, axis=1), gid)[:, 0]  # [M|1, N|1]
        if za_i is not None:
            acc = acc - za_i * _rows_of(jnp.sum(b_t, axis=1, dtype=jnp.int32), gid)
        if zb_i is not None:
            acc = acc - zb_i * jnp.sum(a_t, axis=1, dtype=jnp.int32)[:, None]
        if za_i is not None and zb_i is not None:
            acc = acc + t * za_i * zb_i
        sa_i = lax.dynamic_slice_in_dim(sa, i, 1, axis=1)                                       # [M|1, 1]
        sb_i = _rows_of(lax.dynamic_slice_in_dim(sb, i, 1, axis=1), gid)[:, 0]                  # [M|1, N|1]
        return acc.astype(jnp.float32) * sa_i * sb_i

    if s <= 1:
        out = tile(0, a, b)
    else:
        def body(i, out):
            a_t = lax.dynamic_slice_in_dim(a, i * t, t, axis=1)
            b_t = lax.dynamic_slice_in_dim(b, i * t, t, axis=1)
            return out + tile(i, a_t, b_t)
        out = lax.fori_loop(0, s, body, jnp.zeros((m, n), jnp.float32))
    out = jnp.where((gid < g)[:, None], out, 0.0)  # rows past the groups: zeros (corrections made them nonzero)
    return out.astype(out_dtype)


def _float(lhs, rhs, group_sizes, precision, out_dtype, pet):
    m, k = lhs.shape
    g, _, n = rhs.shape
    ct = jnp.result_type(float_dtype(lhs), float_dtype(rhs))
    gid = row_groups(group_sizes, m)
    post = []
    ops = []
    for side, x in (('lhs', lhs), ('rhs', rhs)):
        if not isinstance(x, QArray):
            ops.append(x if x.dtype == ct else x.astype(ct))
            continue
        # A scale shared along K goes on the output rows when the output is no bigger than this operand.
        if plain_scales(x) and scale_is_shared(x, (1,)) and is_exact_in(x, ct) and m * n <= x.size:
            ops.append(values(x, ct, scaled=False))
            sc = x.scale.astype(jnp.float32)
            post.append(_lhs_scale(sc[:, 0:1], m) if side == 'lhs' else _rows_of(_rhs_scale(sc, g, n), gid)[:, 0])
        else:
            ops.append(values(x, ct, scaled=True))
    # Accumulate at least at the operands' precision; a narrower preferred_element_type is the output's only.
    acc = ct if pet is None else jnp.promote_types(ct, pet)
    y = lax.ragged_dot(ops[0], ops[1], group_sizes, precision=precision, preferred_element_type=acc)
    if post:
        y = y.astype(jnp.float32)
        for s in post:
            y = y * s
        y = jnp.where((gid < g)[:, None], y, 0.0)  # (a NaN scale of the last group must not reach the padding)
    return y.astype(out_dtype)
