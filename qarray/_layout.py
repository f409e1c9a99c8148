"""Scale layouts: which axes are channelwise, tiled or shared, and the views that make scales broadcast.

A scale has the rank of the array; along each axis it is 1 (shared), the full
size (one scale per index: channelwise) or ``size / tile`` (sub-channel
tiles). :func:`group_view` splits an array into its scale groups for
calibration; :func:`tiled_view` makes a stored scale broadcast against values.

Example:
  >>> from qarray._layout import normalize_layout
  >>> normalize_layout((4, 256), (), 128)
  ((0,), {1: 128})
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ['normalize_layout', 'normalize_axis', 'group_view', 'tiled_view', 'split_axes', 'merge_axes']


def normalize_layout(shape: tuple[int, ...], channelwise_axes: Any,
                      tiles: int | Mapping[int, int] | None) -> tuple[tuple[int, ...], dict[int, int]]:
    """``(channelwise axes, {axis: tile})`` with axes made non-negative, or a clear error.

    Example:
      >>> from qarray._layout import normalize_layout
      >>> normalize_layout((4, 6), -1, {0: 2})
      ((1,), {0: 2})
    """
    ndim = len(shape)
    if _is_int(channelwise_axes):
        channelwise_axes = (channelwise_axes,)
    if isinstance(channelwise_axes, (str, bytes)) or not hasattr(channelwise_axes, '__iter__'):
        raise TypeError(f"channelwise_axes must be an int or a sequence of ints; got {channelwise_axes!r}.")
    axes = list(channelwise_axes)
    for a in axes:
        if not _is_int(a):
            raise TypeError(f"channelwise_axes must hold ints; got {a!r} in {channelwise_axes!r}.")
        if not -ndim <= int(a) < ndim:
            bad_axis(a, ndim)
    cw = tuple(sorted(int(a) % ndim for a in axes))
    if len(set(cw)) != len(cw):
        raise ValueError(f"channelwise_axes names an axis twice: {channelwise_axes!r} (shape {tuple(shape)}).")
    if tiles is None:
        tile_map = {}
    elif isinstance(tiles, (int, np.integer)) and not isinstance(tiles, bool):
        if ndim == 0:
            raise ValueError("tiles needs an array with at least one axis.")
        tile_map = {ndim - 1: int(tiles)}
        if ndim - 1 not in cw:  # (a tiled last axis in channelwise_axes is reported below)
            cw = tuple(range(ndim - 1))  # block-wise: every run of `tiles` values has its own scale
    elif isinstance(tiles, Mapping):
        tile_map = {}
        for a, t in tiles.items():
            if not _is_int(a):
                raise TypeError(f"tiles keys must be int axes; got {a!r} in {tiles!r}.")
            if not -ndim <= int(a) < ndim:
                bad_axis(a, ndim, 'tiles')
            if int(a) % ndim in tile_map:
                raise ValueError(f"tiles names axis {int(a) % ndim} twice: {tiles!r} (shape {tuple(shape)}).")
            tile_map[int(a) % ndim] = t
    else:
        raise TypeError(f"tiles must be None, an int (tile of the last axis) or a dict {{axis: tile}}; "
                        f"got {tiles!r}.")
    for a, t in tile_map.items():
        if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or t <= 0:
            raise ValueError(f"tiles[{a}] must be a positive int; got {t!r}.")
        if a in cw:
            raise ValueError(f"axis {a} is both in channelwise_axes and tiles; choose one.")
    # A tile that does not divide its axis leaves a partial last tile; one at least as long as the axis is one tile.
    return cw, {a: min(int(t), shape[a]) if shape[a] else int(t) for a, t in tile_map.items()}


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def normalize_axis(axis: Any, ndim: int, name: str = 'axis', what: str = 'an array') -> int:
    """``axis`` as a non-negative int, or a ValueError naming ``name`` and the allowed range.

    Example:
      >>> from qarray._layout import normalize_axis
      >>> normalize_axis(-1, 3)
      2
    """
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool) or not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis!r} is out of range for {what} with {ndim} dims; "
                         f"use an int in [{-ndim}, {ndim - 1}].")
    return int(axis) % ndim


def bad_axis(a, ndim, name='channelwise_axes'):
    raise ValueError(f"{name} axis {a} is out of range for an array with {ndim} dims.")


def tiled_view(shape: Sequence[int], scale_shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes that make ``scale`` broadcast against values: each tiled axis splits in (tiles, tile).

    Returns ``(value_view_shape, scale_view_shape)``.

    Example:
      >>> from qarray._layout import tiled_view
      >>> tiled_view((4, 256), (1, 2))
      ((4, 2, 128), (1, 2, 1))
    """
    vshape, sshape = [], []
    for n, s in zip(shape, scale_shape):
        if 1 < s < n:
            vshape += [s, n // s]
            sshape += [s, 1]
        else:
            vshape.append(n)
            sshape.append(s)
    return tuple(vshape), tuple(sshape)


def split_axes(a: Any, shape: Sequence[int]) -> Any:
    """``a.reshape(shape)`` for a ``shape`` that splits some axes of ``a`` in two (a :func:`tiled_view`), one axis
    per reshape: JAX's reshape under explicit sharding splits at most one sharded axis at a time, so a 2-D
    tiled array sharded on both axes (``(32@data, 48@model) -> (4, 8, 4, 12)``) needs two steps.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray._layout import split_axes
      >>> split_axes(jnp.zeros((32, 48)), (4, 8, 4, 12)).shape
      (4, 8, 4, 12)
    """
    shape = tuple(shape)
    cur, i = list(a.shape), 0
    while tuple(cur) != shape:
        if cur[i] != shape[i]:
            cur[i:i + 1] = [shape[i], cur[i] // shape[i]]
            a = a.reshape(cur)
        i += 1
    return a


def merge_axes(a: Any, shape: Sequence[int]) -> Any:
    """``a.reshape(shape)`` for a ``shape`` that merges pairs of adjacent axes of ``a`` (undoes
    :func:`split_axes`), one pair per reshape (see there).

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray._layout import merge_axes
      >>> merge_axes(jnp.zeros((4, 8, 4, 12)), (32, 48)).shape
      (32, 48)
    """
    shape = tuple(shape)
    cur, i = list(a.shape), 0
    while tuple(cur) != shape:
        if cur[i] != shape[i]:
            cur[i:i + 2] = [cur[i] * cur[i + 1]]
            a = a.reshape(cur)
        i += 1
    return a


def group_view(shape: Sequence[int], channelwise_axes: Sequence[int], tiles: Mapping[int, int] | None
               ) -> tuple[list[int], tuple[int, ...], tuple[int, ...]]:
    """How ``shape`` splits into scale groups: ``(view, reduce_axes, scale_shape)``.

    Each tiled axis becomes ``(tiles, tile)`` in ``view``; calibration reduces
    ``view`` over ``reduce_axes`` (tile axes and axes neither channelwise nor
    tiled), and the result reshapes to ``scale_shape`` (the rank of ``shape``).

    Example:
      >>> from qarray._layout import group_view
      >>> group_view((4, 256), channelwise_axes=(0,), tiles={1: 128})
      ([4, 2, 128], (2,), (4, 2))
    """
    view, reduce_axes, scale_shape = [], [], []
    tiles = tiles or {}
    for a, n in enumerate(shape):
        if a in tiles:
            t = tiles[a]
            if n % t:
                raise ValueError(f"tile {t} does not divide axis {a} of size {n} (shape {tuple(shape)}); "
                                 "an uneven tile is split off first (see qarray._quantize).")
            view += [n // t, t]
            reduce_axes.append(len(view) - 1)
            scale_shape.append(n // t)
        else:
            view.append(n)
            if a not in channelwise_axes:
                reduce_axes.append(len(view) - 1)
            scale_shape.append(n if a in channelwise_axes else 1)
    return view, tuple(reduce_axes), tuple(scale_shape)


def broadcast_scale(scale: Any, shape: Sequence[int], uneven: Mapping[int, int]) -> Any:
    """``scale`` repeated over its tiles to the full ``shape`` (for layouts with a partial last tile, where
    :func:`tiled_view`'s reshape cannot express the groups).

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray._layout import broadcast_scale
      >>> broadcast_scale(jnp.array([[1., 2., 3.]]), (1, 7), {1: 3}).tolist()
      [[1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0]]
    """
    import jax
    import jax.numpy as jnp
    for a, (n, s) in enumerate(zip(shape, scale.shape)):
        if 1 < s < n or a in uneven:
            t = uneven.get(a, n // s)
            scale = jnp.repeat(scale, t, axis=a, total_repeat_length=s * t)
            if s * t != n:
                scale = jax.lax.slice_in_dim(scale, 0, n, axis=a)
    return jnp.broadcast_to(scale, tuple(shape))
