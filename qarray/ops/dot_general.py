"""``dot_general`` for arrays and QArrays: picks the integer, fp8 or float path.

Paths (chosen from static shapes and formats, tested each):

* ``'int'``: both operands integer QArrays (intB / uintB; sub-byte codes are
  unpacked to int8). One int8 ``lax.dot_general`` with int32 accumulation on
  the codes; scales multiply the result; tiles on the contracting axes are
  contracted per tile (see :mod:`qarray.ops._scaled_dot`); zero points by
  correction terms.
* ``'fp8'``: both operands fp8 QArrays. The fp8 dot with scalar scales inside,
  per-channel / tile scales after.
* ``'float'``: everything else (float x QArray = weight-only, int x fp8,
  nf4 x anything, and scales the integer dot cannot factor). QArrays are
  dequantized inside the same jitted program as the matmul, so XLA fuses the
  unpack/convert; a scale that is shared along the contracting axes is
  applied to the output instead of the operand when the output has no more
  elements than that operand (``M <= K`` for ``x[M, K] @ w[K, N]``, so always
  for decode shapes), else folded into the operand. Tile scales on a
  contracting axis are folded into the operand.

Choices the integer dot cannot factor fall back to ``'float'`` (documented):
a scale that varies along a contracting axis with tiles smaller than
:data:`MIN_TILE` (including per-channel scales on a contracting axis, tile 1)
dequantizes that operand. Tiles on paired contracting axes must nest (one
tile size divides the other) or a ``ValueError`` names both layouts.

Every call runs as one jitted program (shapes and formats are static), so
even an eager call never stores a dequantized operand. On GPU, registered
kernels (:mod:`qarray.ops._registry`) are tried first for the float path.

Example:
  >>> import jax, jax.numpy as jnp, qarray
  >>> x = jax.random.normal(jax.random.key(0), (4, 64))
  >>> w = qarray.quantize(jax.random.normal(jax.random.key(1), (64, 8)), 'int8', channelwise_axes=(1,))
  >>> qarray.ops.dot_general(x, w, (((1,), (0,)), ((), ()))).shape
  (4, 8)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from qarray import _quantize
from qarray._array import QArray
from qarray.ops import _block_scaled, _dims, _registry
from qarray.ops._operands import (check_operand, describe, float_dtype, int_codes, is_exact_in, plain_scales,
                                  result_dtype, scale_is_shared, values)
from qarray.ops._scaled_dot import LazyRows, scaled_dot

__all__ = ['dot_general', 'choose_path', 'MIN_TILE']

#: Smallest contracting-axis tile the integer / fp8 paths take; finer tiles dequantize instead.
#: Measured on CPU (512x4096 @ 4096x4096, int4 x int8): the per-tile int32 loop beats the
#: dequantize-then-float32 order at tile 128 (0.74x vs 1.04x of float32) but not at 64 (1.18x vs 1.02x).
MIN_TILE = 128


def _contract_count(shape, scale_shape, axes) -> int:
    """Tile count of the merged contracting axis (same rule as :func:`_dims.canonical`)."""
    ss = [scale_shape[a] for a in axes]
    last = max((j for j, n in enumerate(ss) if n > 1), default=None)
    if last is None:
        return 1
    return math.prod(shape[a] for a in axes[:last]) * ss[last]


def choose_path(lhs: Any, rhs: Any, dimension_numbers: Any) -> str:
    """``'int'``, ``'fp8'``, ``'block_scaled'`` (two microscaling operands, where the backend has
    ``jax.nn.scaled_matmul``) or ``'float'`` for these operands (raises when tiles do not nest).

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> a = qarray.quantize(jnp.ones((4, 8)), 'int8', channelwise_axes=(0,))
      >>> b = qarray.quantize(jnp.ones((8, 2)), 'int4', channelwise_axes=(1,))
      >>> dn = (((1,), (0,)), ((), ()))
      >>> qarray.ops.choose_path(a, b, dn), qarray.ops.choose_path(jnp.ones((4, 8)), b, dn)
      ('int', 'float')
    """
    if not (isinstance(lhs, QArray) and isinstance(rhs, QArray)):
        return 'float'
    if _block_scaled.applies(lhs, rhs, dimension_numbers):
        return 'block_scaled'
    if not (plain_scales(lhs) and plain_scales(rhs)):
        return 'float'
    kinds = {lhs.qtype.kind, rhs.qtype.kind}
    if kinds <= {'int', 'uint'}:
        path = 'int'
    elif kinds == {'float'} and {lhs.qtype.bits, rhs.qtype.bits} == {8} and not (
            lhs.qtype.microscaling or rhs.qtype.microscaling):
        path = 'fp8'
    else:
        return 'float'
    (lc, rc), _ = dimension_numbers
    k = math.prod(lhs.shape[a] for a in lc)
    if k == 0:  # an empty contraction is all zeros: the float path gives them without reshaping empty tiles
        return 'float'
    cl = _contract_count(lhs.shape, lhs.scale.shape, lc)
    cr = _contract_count(rhs.shape, rhs.scale.shape, rc)
    s = _dims.match_tiles(k, cl, cr) if k else 1
    if s is None:
        raise ValueError(
            f"tiles on the contracting axes do not line up: lhs contracting axes {lc} carry {cl} scale tiles "
            f"(tile {k // cl}), rhs axes {rc} carry {cr} (tile {k // cr}); one tile size must divide the "
            f"other. lhs: {describe(lhs)}; rhs: {describe(rhs)}.")
    if s > 1 and k // s < MIN_TILE:
        return 'float'
    return path


def dot_general(lhs: Any, rhs: Any, dimension_numbers: Any, precision: Any = None,
                preferred_element_type: Any = None) -> jax.Array:
    """Drop-in ``jax.lax.dot_general`` where either operand may be a QArray; returns a plain array.

    Args:
      lhs, rhs: arrays or QArrays of any format.
      dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``.
      precision: as for ``lax.dot_general`` (used by the float path).
      preferred_element_type: output dtype (a float dtype when a QArray is involved);
        default: the result type of both operands' float dtypes (``QArray.dtype``).

    Output layout is ``lax.dot_general``'s: batch axes, lhs free axes, rhs free axes.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> a = qarray.quantize(jnp.ones((2, 16)), 'int8', channelwise_axes=(0,))
      >>> b = qarray.quantize(jnp.ones((16, 3)), 'int8', channelwise_axes=(1,))
      >>> qarray.ops.dot_general(a, b, (((1,), (0,)), ((), ()))).shape
      (2, 3)
    """
    lhs, rhs = check_operand(lhs, 'lhs'), check_operand(rhs, 'rhs')
    pair = f"lhs: {describe(lhs)}; rhs: {describe(rhs)}."
    dn = _dims.normalize_dimension_numbers(dimension_numbers, lhs.shape, rhs.shape, pair)
    if not isinstance(lhs, QArray) and not isinstance(rhs, QArray):
        return lax.dot_general(lhs, rhs, dn, precision=precision, preferred_element_type=preferred_element_type)
    out_dtype = result_dtype(lhs, rhs, preferred_element_type)
    path = choose_path(lhs, rhs, dn)
    pet = None if preferred_element_type is None else jnp.dtype(preferred_element_type)
    kernels = _registry.registered_kernels() if jax.default_backend() == 'gpu' else ()
    return _dot_general_jit(lhs, rhs, dn=dn, precision=_hashable(precision), out_dtype=out_dtype, pet=pet,
                            path=path, kernels=kernels)


def _hashable(p: Any) -> Any:
    if isinstance(p, list):
        return tuple(p)
    return p


@functools.partial(jax.jit, static_argnames=('dn', 'precision', 'out_dtype', 'pet', 'path', 'kernels'))
def _dot_general_jit(lhs, rhs, *, dn, precision, out_dtype, pet, path, kernels):
    del kernels  # only part of the cache key: a newly registered kernel retraces
    if path in ('int', 'fp8'):
        return _scaled(lhs, rhs, dn, precision, out_dtype, path)
    if path == 'block_scaled':
        return _block_scaled.block_scaled_dot(lhs, rhs, dn, out_dtype)
    if not isinstance(lhs, QArray) and isinstance(rhs, QArray):
        for kernel in _registry.kernels_for_backend():
            out = kernel(lhs, rhs, dn, precision, out_dtype)
            if out is not None:
                return out.astype(out_dtype)
    return _float(lhs, rhs, dn, precision, out_dtype, pet)


def _scaled(lhs, rhs, dn, precision, out_dtype, path):
    (lc, rc), (lb, rb) = dn
    lf = _dims.free_axes(lhs.ndim, lc, lb)
    rf = _dims.free_axes(rhs.ndim, rc, rb)
    if path == 'int':
        lcodes, lz = int_codes(lhs)
        rcodes, rz = int_codes(rhs)
    else:
        lcodes, lz, rcodes, rz = _quantize.codes(lhs), None, _quantize.codes(rhs), None
    lgroups, rgroups = (lb, lf, lc), (rb, rc, rf)
    a, sa, cl = _dims.canonical(lcodes, lhs.scale, lgroups, 2)
    b, sb, cr = _dims.canonical(rcodes, rhs.scale, rgroups, 1)
    if path == 'int' and _rows_of_packed(rhs, rc, rb, rf):
        b = LazyRows(b.shape, functools.partial(_packed_rows, rhs, rc[0]))
    k = a.shape[2]
    s = _dims.match_tiles(k, cl, cr) if k else 1
    sa, sb = _dims.expand_tiles(sa, 2, s), _dims.expand_tiles(sb, 1, s)
    za = zb = None
    if lz is not None:
        za = _dims.expand_tiles(_dims.canonical(None, lz, lgroups, 2, shape=lhs.shape)[1], 2, s)
    if rz is not None:
        zb = _dims.expand_tiles(_dims.canonical(None, rz, rgroups, 1, shape=rhs.shape)[1], 1, s)
    out = scaled_dot(a, sa, za, b, sb, zb, out_dtype, precision)
    shape = [lhs.shape[i] for i in lb] + [lhs.shape[i] for i in lf] + [rhs.shape[i] for i in rf]
    return out.reshape(shape)


def _rows_of_packed(q: QArray, rc, rb, rf) -> bool:
    """Packed sub-byte rhs laid out [K, free...] with the bytes packed along a free axis: unpack per K tile."""
    return (q.packed_axis is not None and not rb and len(rc) == 1 and rc + rf == tuple(range(q.ndim))
            and q.packed_axis % q.ndim != rc[0] and q.qtype.is_integer)


def _packed_rows(q: QArray, axis: int, start, size: int) -> jax.Array:
    """int8 codes of rows ``[start, start + size)`` along ``axis``, unpacked from just those bytes."""
    rows = lax.dynamic_slice_in_dim(q.qvalue, start, size, axis=axis)
    return _quantize.unpacked_codes(rows, q.qtype, q.packed_axis, q.packed_length).astype(jnp.int8).reshape(1, size, -1)


def _float(lhs, rhs, dn, precision, out_dtype, pet):
    (lc, rc), (lb, rb) = dn
    ct = jnp.result_type(float_dtype(lhs), float_dtype(rhs))
    lf = _dims.free_axes(lhs.ndim, lc, lb)
    rf = _dims.free_axes(rhs.ndim, rc, rb)
    out_size = math.prod([lhs.shape[i] for i in lb + lf] + [rhs.shape[i] for i in rf])
    post = []
    operands = []
    for side, x, c, b, f in (('lhs', lhs, lc, lb, lf), ('rhs', rhs, rc, rb, rf)):
        if not isinstance(x, QArray):
            operands.append(x if x.dtype == ct else x.astype(ct))
            continue
        # A scale shared along the contracting axes can go on the output: do so when that is smaller.
        if plain_scales(x) and scale_is_shared(x, c) and is_exact_in(x, ct) and out_size <= x.size:
            operands.append(values(x, ct, scaled=False))
            post.append(_output_scale(x, side, b, f, len(lf), len(rf)))
        else:
            operands.append(values(x, ct, scaled=True))
    y = lax.dot_general(operands[0], operands[1], dn, precision=precision, preferred_element_type=pet)
    if post:
        y = y.astype(jnp.float32)
        for s in post:
            y = y * s
    return y.astype(out_dtype)


def _output_scale(q: QArray, side: str, batch, free, n_lfree: int, n_rfree: int) -> jax.Array:
    """``q``'s scale (shared on contracting axes) laid out to broadcast against the dot output."""
    s = q.scale.astype(jnp.float32)
    for a in batch + free:
        if 1 < s.shape[a] < q.shape[a]:
            s = _dims.expand_tiles(s, a, q.shape[a])
    s = jnp.transpose(s, batch + free + tuple(a for a in range(q.ndim) if a not in batch + free))
    s = s.reshape(s.shape[:len(batch) + len(free)])
    nb = len(batch)
    if side == 'lhs':
        return s.reshape(s.shape + (1,) * n_rfree)
    return s.reshape(s.shape[:nb] + (1,) * n_lfree + s.shape[nb:])
