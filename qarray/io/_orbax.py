"""Save and restore param trees holding QArrays with Orbax (sharded or not).

Orbax stores array leaves; the QArray static data (format, packing, scale
layout) goes into a JSON item of the same checkpoint, and :func:`restore`
checks it against the target before reading any array, so a checkpoint made
with other rules fails with an error naming the param instead of being
reinterpreted. Restoring onto another mesh is a matter of passing shardings.

Integrity: the metadata item also holds SHA-256 digests (see
:mod:`qarray.io._checksum`) of every tensor's logical bytes — the whole array,
and for an array sharded over several devices each distinct shard as written
(its index and digest) — plus a digest of the metadata itself. :func:`restore`
checks the metadata digest before anything else and, after reading, hashes the
restored arrays: each saved shard region this process holds (whatever the
restore layout) and the whole array when this process holds all of it. Orbax's
own files carry no checksums, so without this a flipped bit in a data file
loads silently.

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
import warnings
from typing import Any

import jax

from qarray import sharding as qsharding
from qarray._array import QArray
from qarray.io import _checksum as cs
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
    """What Orbax stores for a leaf: the array, or a dict of a QArray's parts (nested dicts for quantized
    scales / zero points)."""
    if isinstance(leaf, QArray):
        return {p: _parts(x) for p in md.PARTS if (x := getattr(leaf, p)) is not None}
    return leaf


def _checksums(names: list[str], leaves: list[Any]) -> dict[str, Any]:
    """The checksum table of a tree: every process hashes what it holds; the tables are merged."""
    local = {}
    for name, leaf in zip(names, leaves):
        local[name] = {p: cs.array_entry(x) for p, x in md.array_parts(leaf)}
    return {'algorithm': cs.ALGORITHM, 'params': cs.merge(cs.gather_entries(local))}


def save(path: str | os.PathLike, tree: Any, *, force: bool = False) -> None:
    """Save ``tree`` (arrays and QArrays, any pytree) as an Orbax checkpoint at ``path``.

    Every process of a multi-host job calls it with its shards; each writes its
    own. The metadata records a SHA-256 digest of every tensor (and of each
    distinct shard of a sharded one) for :func:`restore` to check.

    Args:
      path: checkpoint directory (must not exist unless ``force``).
      tree: the params. Every leaf must be an array (jax or numpy, bool or
        numeric dtype), a Python bool/int/float, or a QArray.
      force: overwrite an existing checkpoint (e.g. when re-running a script).

    Raises:
      ValueError: ``path`` exists and ``force`` is False.
      TypeError: a leaf is not an array or number (the message names the param).

    Example:
      >>> import tempfile, os, jax.numpy as jnp, qarray
      >>> qarray.io.save(os.path.join(tempfile.mkdtemp(), 'c'), {'w': qarray.quantize(jnp.ones(8), 'nf4')})
    """
    ocp = _ocp()
    names, leaves, _ = md.flatten(tree)
    md.check_leaves(names, leaves)
    params = md.describe(tree)
    meta = cs.seal({'format_version': md.format_version(params), 'names': names, 'params': params,
                    cs.CHECKSUM_KEY: _checksums(names, leaves)})
    arrays = {_key(i): _parts(leaf) for i, leaf in enumerate(leaves)}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(os.path.abspath(path), ocp.args.Composite(
            **{_ARRAYS: ocp.args.StandardSave(arrays), _META: ocp.args.JsonSave(meta)}), force=force)


def read_metadata(path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """The stored metadata: ``{'names': [...], 'params': {name: leaf metadata}, 'checksums': ...}``.

    ``verify`` (default): check the metadata's own SHA-256 digest (a mismatch
    raises :class:`CheckpointError`); checkpoints written before checksums give
    a ``UserWarning``.

    Example:
      >>> import tempfile, os, jax.numpy as jnp, qarray
      >>> p = os.path.join(tempfile.mkdtemp(), 'c')
      >>> qarray.io.save(p, {'w': qarray.quantize(jnp.ones((2, 8)), 'int3')})
      >>> qarray.io.read_metadata(p)['params']['w']['qtype']
      'int3'
    """
    return _read_meta(os.path.abspath(path), verify)[0]


def _read_meta(path: str, verify: bool) -> tuple[dict[str, Any], bool]:
    """(metadata, whether its tensor checksums are to be checked)."""
    ocp = _ocp()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path!r}.")
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            meta = ckptr.restore(path, ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
    except Exception as e:
        raise md.CheckpointError(f"{path!r} has no readable qarray metadata item ({type(e).__name__}: {e}); "
                                 "was it written by qarray.io.save?") from e
    if not isinstance(meta, dict) or meta.get('format_version') not in md.READABLE_VERSIONS:
        raise md.CheckpointError(f"{path!r}: unsupported qarray metadata format_version "
                                 f"{meta.get('format_version') if isinstance(meta, dict) else None!r}; "
                                 f"this qarray reads versions {md.READABLE_VERSIONS}.")
    return meta, cs.open_seal(meta, f"checkpoint {path!r}", verify)


def _shardings_of(leaf: Any) -> Any:
    """The shardings of a leaf's arrays (a QArray of them for a QArray, nested ones included), or None when
    some array has none."""
    if isinstance(leaf, QArray):
        parts = [None if (p := getattr(leaf, name)) is None else _shardings_of(p) for name in md.PARTS]
        if parts[0] is None or parts[1] is None or (leaf.zero_point is not None and parts[2] is None):
            return None
        return leaf.replace(qvalue=parts[0], scale=parts[1], zero_point=parts[2])
    return getattr(leaf, 'sharding', None)


def _default_sharding(target_leaf: Any) -> Any:
    """The sharding a target leaf asks for (its own), else device 0."""
    own = _shardings_of(target_leaf)
    return own if own is not None else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _nested_shardings(abstract: QArray, sh: QArray) -> QArray:
    """``sh`` (a QArray of shardings from :func:`qarray.sharding.shardings`) with each quantized part laid out by
    the same rule, taking the sharding of the scale it stands for as its float array's sharding."""
    def part(name: str) -> Any:
        a, s = getattr(abstract, name), getattr(sh, name)
        if isinstance(a, QArray) and isinstance(s, jax.sharding.NamedSharding):
            return _nested_shardings(a, qsharding.shardings(a, s))
        return s
    return sh.replace(qvalue=part('qvalue'), scale=part('scale'), zero_point=part('zero_point'))


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
        return _nested_shardings(abstract, qsharding.shardings(abstract, sharding))
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


def _at(parts: dict[str, Any], path: str) -> Any:
    """The restored array of one dotted part path in Orbax's nested dicts."""
    for key in path.split('.'):
        parts = parts[key]
    return parts


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


def _unreadable(ocp: Any, path: str, abstract_arrays: dict[str, Any], names_by_key: dict[str, str]) -> list[str]:
    """Params whose arrays Orbax cannot read, found by restoring each on its own (only after a failure).

    Single-process only: in a multi-process job the per-param restores are collective, and a process whose
    own read succeeded would not join them, so the error there names no param.
    """
    bad: list[str] = []
    if jax.process_count() > 1:
        return bad
    for key, item in abstract_arrays.items():
        sub = {key: item}
        try:
            with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
                ckptr.restore(path, ocp.args.Composite(**{_ARRAYS: ocp.args.PyTreeRestore(
                    sub, restore_args=ocp.checkpoint_utils.construct_restore_args(sub), partial_restore=True)}))
        except Exception:  # noqa: BLE001 - any failure marks this param unreadable
            bad.append(names_by_key[key])
    return bad


def _verify(meta: dict[str, Any], names: list[str], leaves: list[Any], source: str) -> None:
    """Compare every restored tensor with its stored digests.

    Each process checks what it holds. In a multi-process restore the outcomes
    are all-gathered: every process raises when any found damage, and a tensor
    counts as verified when its whole digest or every saved shard was checked
    by some process; a ``UserWarning`` lists any that were not.
    """
    error: md.CheckpointError | None = None
    coverage: dict[str, list[Any]] = {}
    try:
        for name, leaf in zip(names, leaves):
            pm = meta['params'][name]
            for part in cs.parts_of(pm):
                x = md.get_part(leaf, part)
                stored_dtype = md.part_meta(pm, part)['dtype']
                shards, whole = cs.verify_array(name, part, x, cs.record_for(meta, name, part, source),
                                                stored_dtype, source)
                coverage[name if part == cs.ARRAY else f'{name}.{part}'] = [''.join('01'[s] for s in shards), whole]
    except md.CheckpointError as e:
        error = e
    if jax.process_count() > 1:
        reports = cs.gather_entries({'error': None if error is None else str(error), 'coverage': coverage})
        found = [(i, r['error']) for i, r in enumerate(reports) if r['error']]
        if found and error is None:
            error = md.CheckpointError(f"{found[0][1]} (found by process {found[0][0]})")
        for r in reports:
            for key, (mask, whole) in r['coverage'].items():
                mine = coverage.setdefault(key, [mask, whole])
                mine[0] = ''.join(max(a, b) for a, b in zip(mine[0], mask))
                mine[1] = mine[1] or whole
    if error is not None:
        raise error
    unchecked = [key for key, (mask, whole) in coverage.items() if not whole and not (mask and '0' not in mask)]
    if unchecked:
        warnings.warn(f"{len(unchecked)} tensors of {source} could not be verified completely: no process holds "
                      f"all of some saved shards ({unchecked[:4]}...). Restore onto the layout they were saved "
                      "with to verify every byte.", UserWarning, stacklevel=3)


def restore(path: str | os.PathLike, target: Any = None, shardings: Any = None, *, verify: bool = True) -> Any:
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
        :mod:`qarray.sharding` rule; a quantized scale's own arrays follow the
        same rule from the scale's sharding) or a QArray of shardings.
      verify: check the SHA-256 digest of the metadata before reading, and of
        every restored tensor after (the whole array when this process holds
        it, and each shard region as saved). This copies each array to host
        memory once to hash it; ``False`` skips all of it, and the warning for
        checkpoints written without checksums.

    Raises:
      CheckpointError: a param is missing/extra or differs in format, tiles,
        packing, shape or dtype (the message names the param), its arrays
        cannot be read (truncated/corrupt files; names the params), or
        (``verify``) a tensor does not match its digest (names the param, the
        part — qvalue, scale, zero_point — and the shard), or the metadata does
        not match its digest (names the checkpoint).

    Warns:
      UserWarning: (``verify``) the checkpoint was written before checksums
        existed, or (multi-process restores onto another layout) some saved
        shard of a tensor is split over processes so no process could check it.

    Example:
      >>> import tempfile, os, jax, jax.numpy as jnp, qarray
      >>> p = os.path.join(tempfile.mkdtemp(), 'c')
      >>> qarray.io.save(p, {'w': qarray.quantize(jnp.ones((4, 8)), 'uint4', calibration='minmax')})
      >>> qarray.io.restore(p)['w'].zero_point.shape
      (1, 1)
    """
    ocp = _ocp()
    path = os.path.abspath(path)
    source = f"checkpoint {path!r}"
    meta, checked = _read_meta(path, verify)
    names, abstract, treedef, _ = resolve(meta, target, shardings, source)
    index = {n: i for i, n in enumerate(meta['names'])}
    abstract_arrays = {_key(index[n]): _parts(a) for n, a in zip(names, abstract)}
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            got = ckptr.restore(path, ocp.args.Composite(
                **{_ARRAYS: ocp.args.StandardRestore(abstract_arrays)}))[_ARRAYS]
    except Exception as e:
        if isinstance(e, MemoryError):
            raise
        bad = _unreadable(ocp, path, abstract_arrays, {_key(index[n]): n for n in names})
        which = (f"param {bad[0]!r}" + (f" (and {len(bad) - 1} more: {bad[1:4]})" if len(bad) > 1 else '')
                 if bad else 'the arrays')
        raise md.CheckpointError(f"{which}: could not read the arrays of {source} (truncated or corrupt "
                                 f"files?): {type(e).__name__}: {str(e)[:500]}") from e
    leaves = []
    for n, a in zip(names, abstract):
        g = got[_key(index[n])]
        leaves.append(md.rebuild(a, lambda part, _, g=g: _at(g, part)) if isinstance(a, QArray) else g)
    if checked:
        _verify(meta, names, leaves, source)
    return md.nest(names, leaves) if treedef is None else jax.tree_util.tree_unflatten(treedef, leaves)
