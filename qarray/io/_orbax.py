"""Save and restore param trees holding QArrays with Orbax (sharded or not).

Orbax stores array leaves; the QArray static data (format, packing, scale
layout) goes into a JSON item of the same checkpoint, and :func:`restore`
checks it against the target before reading any array, so a checkpoint made
with other rules fails with an error naming the param instead of being
reinterpreted. Restoring onto another mesh is a matter of passing shardings.

Needs the ``[checkpoint]`` extra (``orbax-checkpoint``).

Example:
  >>> import tempfile, os, jax.numpy as jnp, qarray
  >>> tree = {'w': qarray.quantize(jnp.ones((4, 8)), 'int4', tiles=4)}
  >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
  >>> qarray.io.save(path, tree)
  >>> qarray.io.restore(path, tree)['w'].qtype.name
  'int4'
"""

from __future__ import annotations

import os
from typing import Any

import jax

from qarray import sharding as qsharding
from qarray._array import QArray
from qarray.io import _metadata as md

__all__ = ['save', 'restore', 'read_metadata']

_ARRAYS, _META = 'arrays', 'qarray_metadata'


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("qarray.io.save/restore need orbax-checkpoint: pip install 'qarray[checkpoint]'.") from e
    return ocp


def _key(i: int) -> str:
    return f'p{i}'


def _parts(leaf: Any) -> Any:
    if isinstance(leaf, QArray):
        parts = {'qvalue': leaf.qvalue, 'scale': leaf.scale}
        if leaf.zero_point is not None:
            parts['zero_point'] = leaf.zero_point
        return parts
    return leaf


def save(path: str | os.PathLike, tree: Any, *, force: bool = False) -> None:
    """Save ``tree`` (arrays and QArrays, any pytree) as an Orbax checkpoint at ``path``.

    Every process of a multi-host job calls it with its shards; each writes its own.

    Args:
      path: checkpoint directory (must not exist unless ``force``).
      tree: the params.
      force: overwrite an existing checkpoint.

    Example:
      >>> import tempfile, os, jax.numpy as jnp, qarray
      >>> qarray.io.save(os.path.join(tempfile.mkdtemp(), 'c'), {'w': qarray.quantize(jnp.ones(8), 'nf4')})
    """
    ocp = _ocp()
    names, leaves, _ = md.flatten(tree)
    meta = {'format_version': md.FORMAT_VERSION, 'names': names, 'params': md.describe(tree)}
    arrays = {_key(i): _parts(leaf) for i, leaf in enumerate(leaves)}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(os.path.abspath(path), ocp.args.Composite(
            **{_ARRAYS: ocp.args.StandardSave(arrays), _META: ocp.args.JsonSave(meta)}), force=force)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The stored static metadata: ``{'names': [...], 'params': {name: leaf metadata}}``.

    Example:
      >>> import tempfile, os, jax.numpy as jnp, qarray
      >>> p = os.path.join(tempfile.mkdtemp(), 'c')
      >>> qarray.io.save(p, {'w': qarray.quantize(jnp.ones((2, 8)), 'int3')})
      >>> qarray.io.read_metadata(p)['params']['w']['qtype']
      'int3'
    """
    ocp = _ocp()
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path!r}.")
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            meta = ckptr.restore(path, ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
    except Exception as e:
        raise md.CheckpointError(f"{path!r} has no readable qarray metadata item ({type(e).__name__}: {e}); "
                                 "was it written by qarray.io.save?") from e
    if not isinstance(meta, dict) or meta.get('format_version') != md.FORMAT_VERSION:
        raise md.CheckpointError(f"{path!r}: unsupported qarray metadata format_version "
                                 f"{meta.get('format_version') if isinstance(meta, dict) else None!r}; "
                                 f"this qarray reads version {md.FORMAT_VERSION}.")
    return meta


def _default_sharding(target_leaf: Any) -> Any:
    """The sharding a target leaf asks for (its own), else device 0."""
    if isinstance(target_leaf, QArray):
        parts = [target_leaf.qvalue, target_leaf.scale, target_leaf.zero_point]
        shs = [getattr(p, 'sharding', None) for p in parts if p is not None]
        if shs and all(s is not None for s in shs):
            return QArray(*[None if p is None else p.sharding for p in parts], qtype=target_leaf.qtype,
                          dtype=target_leaf.dtype, packed_axis=target_leaf.packed_axis,
                          packed_length=target_leaf.packed_length)
    elif getattr(target_leaf, 'sharding', None) is not None:
        return target_leaf.sharding
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def leaf_sharding(meta: dict[str, Any], target_leaf: Any, sharding: Any) -> Any:
    """Per-part sharding of one restored leaf.

    ``sharding`` may be None (use the target's, else device 0), a QArray of
    shardings, a ``NamedSharding`` of the float array (placed by the
    :mod:`qarray.sharding` rule), or any other ``Sharding`` (used for every part).
    """
    if sharding is None:
        sharding = _default_sharding(target_leaf)
    if meta['kind'] == 'array' or isinstance(sharding, QArray):
        return sharding
    abstract = md.abstract_leaf(meta)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return qsharding.shardings(abstract, sharding)
    return jax.tree.map(lambda _: sharding, abstract)


def resolve(path_meta: dict[str, Any], target: Any, shardings: Any, source: str
            ) -> tuple[list[str], list[Any], Any, list[Any]]:
    """Check ``target`` against stored metadata; return names, abstract leaves, treedef, target leaves."""
    names = path_meta['names']
    stored = path_meta['params']
    if target is None:
        leaves_t = [None] * len(names)
        treedef = None
        t_names = names
    else:
        t_names, leaves_t, treedef = md.flatten(target)
        md.check(stored, md.describe(target), source)
    if shardings is None:
        sh_leaves = [None] * len(t_names)
    elif target is None:
        sh_leaves = [_lookup(shardings, n) for n in t_names]
    else:
        sh_leaves = jax.tree_util.tree_structure(target, is_leaf=md._is_qarray).flatten_up_to(shardings)
    abstract = [md.abstract_leaf(stored[n], leaf_sharding(stored[n], t, s))
                for n, t, s in zip(t_names, leaves_t, sh_leaves)]
    return t_names, abstract, treedef, leaves_t


def _lookup(tree: Any, name: str) -> Any:
    """Sharding for ``name`` in a nested-dict (or single) shardings argument."""
    if not isinstance(tree, dict):
        return tree
    node = tree
    for part in name.split('/'):
        if not isinstance(node, dict):
            return node
        if part not in node:
            raise md.CheckpointError(f"param {name!r}: shardings has no entry {part!r}.")
        node = node[part]
    return node


def restore(path: str | os.PathLike, target: Any = None, shardings: Any = None) -> Any:
    """Restore a tree saved by :func:`save`, checking formats, layouts and shapes first.

    Args:
      path: checkpoint directory.
      target: a tree like the saved one — concrete (arrays/QArrays) or abstract
        (``jax.eval_shape`` output, ``ShapeDtypeStruct`` leaves). Its leaves'
        shardings are used unless ``shardings`` is given. ``None``: rebuild the
        tree as nested dicts from the stored names.
      shardings: optional tree with the target's structure (or, without a target,
        nested dicts by name, or one sharding for everything). At a QArray leaf
        give the float array's ``NamedSharding`` (values and scales follow the
        :mod:`qarray.sharding` rule) or a QArray of shardings.

    Raises:
      CheckpointError: a param is missing/extra or differs in format, tiles,
        packing, shape or dtype (the message names the param), or the arrays
        cannot be read (truncated/corrupt files).

    Example:
      >>> import tempfile, os, jax, jax.numpy as jnp, qarray
      >>> p = os.path.join(tempfile.mkdtemp(), 'c')
      >>> qarray.io.save(p, {'w': qarray.quantize(jnp.ones((4, 8)), 'uint4', calibration='minmax')})
      >>> qarray.io.restore(p)['w'].zero_point.shape
      (1, 1)
    """
    ocp = _ocp()
    path = os.path.abspath(path)
    meta = read_metadata(path)
    names, abstract, treedef, _ = resolve(meta, target, shardings, f"checkpoint {path!r}")
    index = {n: i for i, n in enumerate(meta['names'])}
    abstract_arrays = {_key(index[n]): _parts(a) for n, a in zip(names, abstract)}
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            got = ckptr.restore(path, ocp.args.Composite(
                **{_ARRAYS: ocp.args.StandardRestore(abstract_arrays)}))[_ARRAYS]
    except Exception as e:
        raise md.CheckpointError(f"could not read the arrays of checkpoint {path!r} (truncated or corrupt "
                                 f"files?): {type(e).__name__}: {e}") from e
    leaves = []
    for n, a in zip(names, abstract):
        g = got[_key(index[n])]
        if isinstance(a, QArray):
            leaves.append(QArray(g['qvalue'], g['scale'], g.get('zero_point'), qtype=a.qtype, dtype=a.dtype,
                                 packed_axis=a.packed_axis, packed_length=a.packed_length))
        else:
            leaves.append(g)
    return md.nest(names, leaves) if treedef is None else jax.tree_util.tree_unflatten(treedef, leaves)
