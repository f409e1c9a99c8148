"""Dimension numbers and the canonical [batch, rows, cols] view of an operand and its scales.

The quantized dot works on ``lhs[B, M, K] . rhs[B, K, N]``: batch axes,
then free axes, then contracting axes (rhs: batch, contracting, free),
each group merged into one axis. Scales follow: along batch and free groups
a scale is either shared (size 1) or expanded to one per index; along the
contracting group it becomes ``S`` tiles of ``K / S`` (``S == 1``: shared).

Example:
  >>> import jax.numpy as jnp
  >>> from qarray.ops._dims import canonical
  >>> v, s, n = canonical(jnp.ones((2, 6)), jnp.ones((1, 3)), ((), (0,), (1,)), contract=2)
  >>> v.shape, s.shape, n
  ((1, 2, 6), (1, 1, 3), 3)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

__all__ = ['normalize_dimension_numbers', 'free_axes', 'canonical', 'expand_tiles', 'match_tiles']

Axes = tuple[int, ...]


def _axes(v: Any, ndim: int, what: str) -> Axes:
    try:
        out = tuple(int(a) for a in v)
    except TypeError:
        raise TypeError(f"dimension_numbers: {what} must be a sequence of ints; got {v!r}.") from None
    for a in out:
        if not 0 <= a < ndim:
            raise ValueError(f"dimension_numbers: {what} axis {a} is out of range for an operand with "
                             f"{ndim} dims (allowed 0..{ndim - 1}).")
    if len(set(out)) != len(out):
        raise ValueError(f"dimension_numbers: {what} repeats an axis: {out}.")
    return out


def normalize_dimension_numbers(dimension_numbers: Any, lhs_shape: Sequence[int],
                                rhs_shape: Sequence[int], describe_pair: str
                                ) -> tuple[tuple[Axes, Axes], tuple[Axes, Axes]]:
    """Check ``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))`` and return it as int tuples.

    ``describe_pair`` names both operands' layouts in every error.

    Example:
      >>> from qarray.ops._dims import normalize_dimension_numbers
      >>> normalize_dimension_numbers((([1], [0]), ([], [])), (2, 3), (3, 4), '')
      (((1,), (0,)), ((), ()))
    """
    try:
        (lc, rc), (lb, rb) = dimension_numbers
    except (TypeError, ValueError):
        raise TypeError("dimension_numbers must be ((lhs_contracting, rhs_contracting), "
                        f"(lhs_batch, rhs_batch)); got {dimension_numbers!r}.") from None
    lc, lb = _axes(lc, len(lhs_shape), 'lhs contracting'), _axes(lb, len(lhs_shape), 'lhs batch')
    rc, rb = _axes(rc, len(rhs_shape), 'rhs contracting'), _axes(rb, len(rhs_shape), 'rhs batch')
    for kind, l, r in (('contracting', lc, rc), ('batch', lb, rb)):
        if len(l) != len(r):
            raise ValueError(f"dimension_numbers: lhs has {len(l)} {kind} axes {l} but rhs has {len(r)} "
                             f"{r}; they pair up one to one. {describe_pair}")
        ls, rs = tuple(lhs_shape[a] for a in l), tuple(rhs_shape[a] for a in r)
        if ls != rs:
            raise ValueError(f"{kind} sizes differ: lhs axes {l} have sizes {ls}, rhs axes {r} have sizes "
                             f"{rs}. {describe_pair}")
    for side, c, b in (('lhs', lc, lb), ('rhs', rc, rb)):
        if set(c) & set(b):
            raise ValueError(f"dimension_numbers: {side} axes {sorted(set(c) & set(b))} are both contracting "
                             f"and batch. {describe_pair}")
    return (lc, rc), (lb, rb)


def free_axes(ndim: int, *used: Axes) -> Axes:
    """Axes in neither ``used`` group, in order.

    Example:
      >>> from qarray.ops._dims import free_axes
      >>> free_axes(4, (1,), (0,))
      (2, 3)
    """
    taken = set().union(*used)
    return tuple(a for a in range(ndim) if a not in taken)


def expand_tiles(scale: jax.Array, axis: int, count: int) -> jax.Array:
    """Repeat ``scale`` along ``axis`` so it has ``count`` entries there (tiles -> smaller tiles).

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.ops._dims import expand_tiles
      >>> expand_tiles(jnp.array([[1., 2.]]), 1, 4).tolist()
      [[1.0, 1.0, 2.0, 2.0]]
    """
    have = scale.shape[axis]
    if have == count:
        return scale
    if have == 1:
        shape = list(scale.shape)
        shape[axis] = count
        return jnp.broadcast_to(scale, shape)
    return jnp.repeat(scale, count // have, axis=axis)


def canonical(values: jax.Array | None, scale: jax.Array | None, groups: tuple[Axes, Axes, Axes],
              contract: int, shape: Sequence[int] | None = None
              ) -> tuple[jax.Array | None, jax.Array | None, int]:
    """Merge ``values`` to ``[prod(g) for g in groups]`` and ``scale`` to matching (tiled) sizes.

    ``shape`` is the logical shape (default ``values.shape``). ``contract`` is
    the index (0..2) of the contracting group. Along the other
    two groups the scale ends up shared (1) or full. Along the contracting
    group, axes before the last scaled one are expanded to full so the merged
    axis is an honest tiling; returns the merged tile count ``S`` too.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.ops._dims import canonical
      >>> _, s, n = canonical(None, jnp.ones((1, 4, 2)), ((), (0,), (1, 2)), 2, shape=(3, 4, 8))
      >>> s.shape, n
      ((1, 1, 8), 8)
    """
    full = list(values.shape if shape is None else shape)
    perm = tuple(a for g in groups for a in g)
    sizes = [math.prod(full[a] for a in g) for g in groups]
    v = None
    if values is not None:
        v = values if perm == tuple(range(values.ndim)) else jnp.transpose(values, perm)
        v = v.reshape(sizes)
    if scale is None:
        return v, None, 1
    s = scale
    count = 1
    out_sizes = []
    for i, g in enumerate(groups):
        ss = [scale.shape[a] for a in g]
        if i == contract:
            last = max((j for j, n in enumerate(ss) if n > 1), default=None)
            for j, a in enumerate(g):
                if last is not None and j < last:
                    s = expand_tiles(s, a, full[a])
            count = (math.prod(full[a] for a in g[:last]) * ss[last]) if last is not None else 1
            out_sizes.append(count)
        elif all(n == 1 for n in ss):
            out_sizes.append(1)
        else:
            for a in g:
                s = expand_tiles(s, a, full[a])
            out_sizes.append(sizes[i])
    if perm != tuple(range(s.ndim)):
        s = jnp.transpose(s, perm)
    return v, s.reshape(out_sizes), count


def match_tiles(k: int, count_l: int, count_r: int) -> int | None:
    """Common tile count on a contracting axis of size ``k``, or None when the tiles do not nest.

    Tiles nest when one tile size divides the other; the finer tiling wins.

    Example:
      >>> from qarray.ops._dims import match_tiles
      >>> match_tiles(256, 2, 4), match_tiles(96, 2, 3)
      (4, None)
    """
    tl, tr = k // count_l, k // count_r
    if tl % tr and tr % tl:
        return None
    return k // min(tl, tr)
