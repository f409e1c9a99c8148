"""Static metadata of a param tree, so a checkpoint can be checked before it is trusted.

Array formats (Orbax, safetensors) store leaves only. A QArray's meaning also
lives in its static data: the format, the packing and the scale layout. This
module describes each leaf of a tree as a JSON-able dict keyed by its
'/'-joined path (``Dense_0/kernel``), and compares two descriptions, raising
:class:`CheckpointError` that names the first param that differs.

Example:
  >>> import jax.numpy as jnp, qarray
  >>> meta = qarray.io.describe({'w': qarray.quantize(jnp.ones((4, 8)), 'int4', tiles=4)})
  >>> meta['w']['qtype'], meta['w']['tiles'], meta['w']['qvalue']['shape']
  ('int4', {'1': 4}, [4, 4])

A quantized scale or zero point (itself a QArray: double quantization, nvfp4's
E4M3 block scales, GGUF K-quants) is described the same way, nested under
``scale`` / ``zero_point`` with ``'kind': 'qarray'``; its arrays are the parts
``scale.qvalue``, ``scale.scale``, ... (:func:`array_parts`), and a load checks
every level (a mismatch names the param and the part, e.g. ``scale.qtype``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qarray._array import QArray
from qarray.paths import path_name  # re-exported

__all__ = ['CheckpointError', 'FORMAT_VERSION', 'NESTED_FORMAT_VERSION', 'READABLE_VERSIONS', 'path_name',
           'flatten', 'describe', 'containers', 'leaf_meta', 'check', 'check_leaves', 'abstract_leaf', 'nest',
           'array_parts', 'part_paths', 'part_meta', 'get_part', 'rebuild', 'format_version']

# 3: some QArray has a quantized scale or zero point (nested QArray metadata and parts); written only then, so
#    older qarray versions keep reading every other checkpoint and refuse these with a clear message.
# 2: per-tensor and metadata checksums (qarray.io._checksum); 1: no checksums (still read, unverified).
FORMAT_VERSION = 2
NESTED_FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
PARTS = ('qvalue', 'scale', 'zero_point')


class CheckpointError(ValueError):
    """A checkpoint does not match what the caller expects (names the param).

    Example:
      >>> import tempfile, os, jax.numpy as jnp, qarray
      >>> f = os.path.join(tempfile.mkdtemp(), 'm.safetensors')
      >>> qarray.io.save_safetensors(f, {'w': qarray.quantize(jnp.ones((4, 8)), 'int4')})
      >>> try:
      ...     qarray.io.load_safetensors(f, {'w': qarray.quantize(jnp.ones((4, 8)), 'int8')})
      ... except qarray.io.CheckpointError as e:
      ...     print(str(e).split(':')[0])
      param 'w'
    """


def _is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


def flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Names, leaves (QArrays kept whole) and treedef of ``tree``.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.io._metadata import flatten
      >>> flatten({'b': jnp.ones(2), 'a': {'k': jnp.ones(3)}})[0]
      ['a/k', 'b']
    """
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_qarray)
    names = [path_name(p) for p, _ in with_path]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointError(f"params {dup} have the same '/'-joined name; rename them to save the tree.")
    return names, [leaf for _, leaf in with_path], treedef


_ALLOWED = ("a jax.Array, a numpy array or numpy scalar of a bool or numeric dtype (including bfloat16 and "
            "fp8), a Python bool/int/float, or a QArray of such arrays")


def _savable_dtype(dtype: Any) -> bool:
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        return False
    return bool(jnp.issubdtype(dtype, np.number) or jnp.issubdtype(dtype, np.bool_))


_ABSTRACT = tuple(t for t in (jax.ShapeDtypeStruct, getattr(jax.core, 'ShapedArray', None)) if t is not None)


def _check_array(name: str, x: Any, what: str) -> None:
    if isinstance(x, _ABSTRACT):
        raise TypeError(f"param {name!r}: {what} is an abstract {type(x).__name__} (shape {tuple(x.shape)}), "
                        "which has no values to save; save concrete arrays (abstract trees are for restore).")
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        if not _savable_dtype(x.dtype):
            raise TypeError(f"param {name!r}: {what} is an array of dtype {np.dtype(x.dtype)}, which cannot be "
                            f"saved; every leaf must be {_ALLOWED}.")
        return
    if isinstance(x, (bool, int, float)) and _savable_dtype(np.asarray(x).dtype):
        return
    raise TypeError(f"param {name!r}: {what} is a {type(x).__module__}.{type(x).__qualname__} ({x!r:.60}), "
                    f"which cannot be saved; every leaf must be {_ALLOWED}. Drop it from the tree (strings "
                    "can go in the safetensors metadata= argument).")


def check_leaves(names: list[str], leaves: list[Any]) -> None:
    """Raise TypeError naming the first leaf that is not an array, a number or a QArray of arrays.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.io._metadata import check_leaves
      >>> try:
      ...     check_leaves(['w', 'name'], [jnp.ones(2), 'gpt'])
      ... except TypeError as e:
      ...     print(str(e).split(',')[0])
      param 'name': leaf is a builtins.str ('gpt')
    """
    for name, leaf in zip(names, leaves):
        if isinstance(leaf, QArray):
            for path, x in array_parts(leaf):
                _check_array(name, x, f"the QArray's {path}")
        else:
            _check_array(name, leaf, 'leaf')


def array_parts(leaf: Any, prefix: str = '') -> list[tuple[str, Any]]:
    """``(part, array)`` for every stored array of a leaf: ``[('array', x)]`` for a plain one; for a QArray
    ``qvalue``, ``scale`` (, ``zero_point``), a quantized scale or zero point expanded into its own parts
    (``scale.qvalue``, ``scale.scale``, ...), recursively.

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> from qarray.io._metadata import array_parts
      >>> q = qarray.quantize(jax.random.normal(jax.random.key(0), (4, 64)), 'nvfp4')
      >>> [p for p, _ in array_parts(q)]
      ['qvalue', 'scale.qvalue', 'scale.scale']
    """
    if not isinstance(leaf, QArray):
        return [(prefix.rstrip('.') or 'array', leaf)]
    out: list[tuple[str, Any]] = []
    for part in PARTS:
        x = getattr(leaf, part)
        if isinstance(x, QArray):
            out.extend(array_parts(x, f'{prefix}{part}.'))
        elif x is not None:
            out.append((f'{prefix}{part}', x))
    return out


def _is_nested(meta: Any) -> bool:
    return isinstance(meta, dict) and meta.get('kind') == 'qarray'


def part_paths(meta: dict[str, Any]) -> list[str]:
    """The parts :func:`array_parts` gives for a leaf described by ``meta`` (same order).

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from qarray.io._metadata import leaf_meta, part_paths
      >>> part_paths(leaf_meta(qarray.quantize(jnp.ones((4, 8)), 'uint4', calibration='minmax')))
      ['qvalue', 'scale', 'zero_point']
    """
    if meta['kind'] != 'qarray':
        return ['array']
    out: list[str] = []
    for part in PARTS:
        sub = meta.get(part)
        if _is_nested(sub):
            out.extend(f'{part}.{p}' for p in part_paths(sub))
        elif sub is not None:
            out.append(part)
    return out


def part_meta(meta: dict[str, Any], path: str) -> dict[str, Any]:
    """The ``{'shape', 'dtype'}`` entry of one part (a :func:`part_paths` name) in a leaf's metadata.

    Example:
      >>> from qarray.io._metadata import part_meta
      >>> part_meta({'kind': 'array', 'shape': [2], 'dtype': 'float32'}, 'array')['dtype']
      'float32'
    """
    if path == 'array':
        return meta
    node = meta
    for key in path.split('.'):
        node = node[key]
    return node


def get_part(leaf: Any, path: str) -> Any:
    """The array of one part of a leaf (``'array'``: the leaf itself; ``'scale.qvalue'``: ``leaf.scale.qvalue``).

    Example:
      >>> import jax, qarray
      >>> from qarray.io._metadata import get_part
      >>> q = qarray.quantize(jax.random.normal(jax.random.key(0), (4, 64)), 'nvfp4')
      >>> get_part(q, 'scale.qvalue').dtype
      dtype(float8_e4m3fn)
    """
    if path == 'array':
        return leaf
    for key in path.split('.'):
        leaf = getattr(leaf, key)
    return leaf


def rebuild(abstract: QArray, read: Any, prefix: str = '') -> QArray:
    """A QArray shaped like ``abstract`` (nested QArrays included) whose arrays are ``read(part, abstract_array)``.

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> from qarray.io._metadata import rebuild
      >>> q = qarray.quantize(jnp.ones((2, 64)), 'nvfp4')
      >>> r = rebuild(jax.eval_shape(lambda: q), lambda part, a: jnp.zeros(a.shape, a.dtype))
      >>> r.scale.qvalue.shape, r.scale.scale.shape
      ((2, 4), (1, 1))
    """
    def sub(part: str) -> Any:
        x = getattr(abstract, part)
        if x is None:
            return None
        if isinstance(x, QArray):
            return rebuild(x, read, f'{prefix}{part}.')
        return read(f'{prefix}{part}', x)
    return abstract.replace(qvalue=sub('qvalue'), scale=sub('scale'), zero_point=sub('zero_point'))


def format_version(params: dict[str, dict[str, Any]]) -> int:
    """The metadata ``format_version`` to write: 3 when some QArray has a quantized scale or zero point, else 2.

    Example:
      >>> import jax, qarray
      >>> from qarray.io._metadata import describe, format_version
      >>> w = jax.random.normal(jax.random.key(0), (4, 64))
      >>> [format_version(describe({'w': qarray.quantize(w, f)})) for f in ('int8', 'nvfp4')]
      [2, 3]
    """
    nested = any(_is_nested(m.get(p)) for m in params.values() if m['kind'] == 'qarray'
                 for p in ('scale', 'zero_point'))
    return NESTED_FORMAT_VERSION if nested else FORMAT_VERSION


def _array_meta(x: Any) -> dict[str, Any]:
    shape = x.shape if hasattr(x, 'shape') else np.shape(x)
    return {'shape': [int(d) for d in shape], 'dtype': jnp.dtype(x.dtype).name}


def leaf_meta(leaf: Any) -> dict[str, Any]:
    """JSON-able description of one leaf (array, QArray, or their abstract forms).

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.io._metadata import leaf_meta
      >>> leaf_meta(jnp.zeros((2, 3), jnp.bfloat16))
      {'kind': 'array', 'shape': [2, 3], 'dtype': 'bfloat16'}
    """
    if isinstance(leaf, QArray):
        return {
            'kind': 'qarray',
            'qtype': leaf.qtype.name,
            'dtype': jnp.dtype(leaf.dtype).name,
            'shape': [int(d) for d in leaf.shape],
            'channelwise_axes': [int(a) for a in leaf.channelwise_axes],
            'tiles': {str(a): int(t) for a, t in sorted(leaf.tiles.items())},
            'packed_axis': leaf.packed_axis,
            'packed_length': leaf.packed_length,
            **({'tile_sizes': [[int(a), int(t)] for a, t in leaf.tile_sizes]} if leaf.tile_sizes else {}),
            'qvalue': _array_meta(leaf.qvalue),
            'scale': _part(leaf.scale),
            'zero_point': None if leaf.zero_point is None else _part(leaf.zero_point),
        }
    if not hasattr(leaf, 'dtype'):
        leaf = np.asarray(leaf)
    return {'kind': 'array', **_array_meta(leaf)}


def _part(x: Any) -> dict[str, Any]:
    """A scale / zero point: ``{'shape', 'dtype'}`` of an array, or the full description of a quantized one."""
    return leaf_meta(x) if isinstance(x, QArray) else _array_meta(x)


def _child(node: Any, key: Any) -> Any:
    """The child of ``node`` at one key-path entry (None when the entry kind is not a name or an index)."""
    if isinstance(key, jax.tree_util.DictKey):
        return node[key.key]
    if isinstance(key, jax.tree_util.GetAttrKey):
        return getattr(node, key.name)
    if isinstance(key, jax.tree_util.SequenceKey):
        return node[key.idx]
    return None


def containers(tree: Any) -> dict[str, list[dict[str, str]]]:
    """Static fields of the wrapper nodes above each leaf, for wrapper classes that list them in a
    ``checkpoint_fields`` class attribute (e.g. ``flax_integration``'s ``QuantizedParam``: its rotation and
    GPTQ settings live in the pytree structure, not in any array, yet change what the arrays mean).

    Example:
      >>> import dataclasses, jax, jax.numpy as jnp
      >>> from qarray.io._metadata import containers
      >>> @jax.tree_util.register_dataclass
      ... @dataclasses.dataclass
      ... class Wrap:
      ...     x: jax.Array
      ...     tag: str = dataclasses.field(default='a', metadata=dict(static=True))
      ...     checkpoint_fields = ('tag',)
      >>> containers({'w': Wrap(jnp.ones(2), 'b')})
      {'w/x': [{'type': 'Wrap', 'tag': "'b'"}]}
    """
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_qarray)
    out = {}
    for path, _ in with_path:
        node, found = tree, []
        for key in path:
            fields = getattr(type(node), 'checkpoint_fields', None)
            if fields:
                found.append({'type': type(node).__name__, **{f: repr(getattr(node, f)) for f in fields}})
            node = _child(node, key)
            if node is None:
                break
        out[path_name(path)] = found
    return out


def describe(tree: Any) -> dict[str, dict[str, Any]]:
    """``{name: leaf_meta + containers}`` for every leaf of ``tree`` (in flatten order).

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> qarray.io.describe({'b': jnp.ones(2)})
      {'b': {'kind': 'array', 'shape': [2], 'dtype': 'float32', 'containers': []}}
    """
    names, leaves, _ = flatten(tree)
    wrappers = containers(tree)
    return {n: {**leaf_meta(leaf), 'containers': wrappers.get(n, [])} for n, leaf in zip(names, leaves)}


def _fmt(meta: dict[str, Any]) -> str:
    if meta['kind'] == 'array':
        return f"a {meta['dtype']} array of shape {tuple(meta['shape'])}"
    layout = []
    if meta['channelwise_axes']:
        layout.append(f"channelwise_axes={tuple(meta['channelwise_axes'])}")
    if meta['tiles']:
        layout.append(f"tiles={ {int(a): t for a, t in meta['tiles'].items()} }")
    for part in ('scale', 'zero_point'):
        if _is_nested(meta.get(part)):
            layout.append(f"{part}: {meta[part]['qtype']} codes")
    return (f"a {meta['qtype']} QArray of shape {tuple(meta['shape'])}"
            + (f" ({', '.join(layout)})" if layout else ''))


_REPACK_HINT = ('the checkpoint packs sub-byte values along a different axis (flax_integration packs dense, '
                'einsum and conv weights along their contraction axis, older versions along the last axis): '
                'restore it without a target and move each weight with qarray.repack(q, axis), which is lossless')

# Fields compared in order; the first mismatch is reported, with a hint for the usual causes.
_FIELDS = [
    ('kind', 'a quantized param cannot be read as a float one (or back); nothing is dequantized '
             'or quantized on load — use the same quantization rules as the checkpoint'),
    ('qtype', 'the checkpoint was made with different quantization rules'),
    ('shape', 'the model architecture differs'),
    ('channelwise_axes', 'the checkpoint was made with different quantization rules (scale layout)'),
    ('tiles', 'the checkpoint was made with different quantization rules (tile size)'),
    ('packed_axis', _REPACK_HINT),
    ('packed_length', _REPACK_HINT),
    ('dtype', 'the dequantized dtype differs'),
    ('qvalue', 'the stored values have another shape/dtype'),
    ('scale', 'the scales have another shape/dtype (scale_dtype differs?)'),
    ('zero_point', 'one side has zero points (asymmetric calibration) and the other has not'),
]


_NESTED_HINT = ('one side stores quantized scales or offsets (a QArray: double quantization, nvfp4, GGUF '
                'K-quants) and the other plain ones; the checkpoint was made with different quantization rules')


def _value(v: Any) -> str:
    return _fmt(v) if _is_nested(v) else repr(v)


def _first_diff(have: dict[str, Any], want: dict[str, Any], prefix: str = '') -> tuple[str, Any, Any, str] | None:
    """(field, stored value, expected value, hint) of the first difference, nested QArrays field by field."""
    for field, hint in _FIELDS:
        if not (field == 'kind' or have['kind'] == 'qarray' or field in ('shape', 'dtype')):
            continue
        a, b = have.get(field), want.get(field)
        if field in ('scale', 'zero_point') and (_is_nested(a) or _is_nested(b)):
            if not (_is_nested(a) and _is_nested(b)):
                return f'{prefix}{field}', a, b, _NESTED_HINT
            inner = _first_diff(a, b, f'{prefix}{field}.')
            if inner is not None:
                return inner
        elif a != b:
            return f'{prefix}{field}', a, b, hint + (f' (in the quantized {prefix[:-1]})' if prefix else '')
    return None


def check(stored: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]], source: str) -> None:
    """Raise :class:`CheckpointError` naming the first param where ``stored`` and ``expected`` differ.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from qarray.io._metadata import check
      >>> a = qarray.io.describe({'w': qarray.quantize(jnp.ones((4, 8)), 'int4')})
      >>> b = qarray.io.describe({'w': qarray.quantize(jnp.ones((4, 8)), 'int8')})
      >>> try:
      ...     check(a, b, 'ckpt')
      ... except qarray.io.CheckpointError as e:
      ...     print(str(e).split(':')[0])
      param 'w'
    """
    missing = [n for n in expected if n not in stored]
    if missing:
        raise CheckpointError(f"param {missing[0]!r} is expected but {source} does not have it "
                              f"({len(missing)} missing; {source} has {sorted(stored)[:8]}...).")
    extra = [n for n in stored if n not in expected]
    if extra:
        raise CheckpointError(f"param {extra[0]!r} is in {source} but not in the target tree "
                              f"({len(extra)} extra); restore into a tree with the same params.")
    for name, want in expected.items():
        have = stored[name]
        diff = _first_diff(have, want)
        if diff is not None:
            field, a, b, hint = diff
            raise CheckpointError(
                f"param {name!r}: {source} holds {_fmt(have)}, but the target expects {_fmt(want)} "
                f"({field}: stored {_value(a)} != expected {_value(b)}); {hint}.")
        # Checkpoints written before wrapper fields were recorded have no 'containers': nothing to compare.
        if 'containers' in have and have['containers'] != want.get('containers', []):
            raise CheckpointError(
                f"param {name!r}: {source} was saved inside {have['containers']}, but the target expects "
                f"{want.get('containers', [])}; the checkpoint was made with different quantization rules "
                "(e.g. rotation or GPTQ settings), so its values mean something else in this model.")


def _sds(meta: dict[str, Any], sharding: Any = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(meta['shape']), jnp.dtype(meta['dtype']), sharding=sharding)


def abstract_leaf(meta: dict[str, Any], sharding: Any = None) -> Any:
    """Abstract leaf (``ShapeDtypeStruct`` or QArray of them) rebuilt from its metadata.

    ``sharding``: None, a sharding for an array leaf, or a QArray of shardings (one sharding at a QArray or
    at a quantized part is used for every array under it).

    Example:
      >>> from qarray.io._metadata import abstract_leaf
      >>> abstract_leaf({'kind': 'array', 'shape': [2], 'dtype': 'float32'}).shape
      (2,)
    """
    if meta['kind'] == 'array':
        return _sds(meta, sharding)
    def part(name: str) -> Any:
        pm = meta[name]
        if pm is None:
            return None
        s = getattr(sharding, name) if isinstance(sharding, QArray) else sharding
        return abstract_leaf(pm, s) if _is_nested(pm) else _sds(pm, s)

    return QArray(part('qvalue'), part('scale'), part('zero_point'), qtype=meta['qtype'],
                  dtype=jnp.dtype(meta['dtype']), packed_axis=meta['packed_axis'], packed_length=meta['packed_length'],
                  tile_sizes=tuple(tuple(p) for p in meta.get('tile_sizes', ())))


def nest(names: list[str], leaves: list[Any]) -> dict[str, Any]:
    """Nested dicts from '/'-joined names (the tree a checkpoint restores to without a target).

    Example:
      >>> from qarray.io._metadata import nest
      >>> nest(['a/b', 'a/c', 'd'], [1, 2, 3])
      {'a': {'b': 1, 'c': 2}, 'd': 3}
    """
    out: dict[str, Any] = {}
    for name, leaf in zip(names, leaves):
        node = out
        *parents, last = name.split('/')
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"param {name!r} nests under a leaf; pass a target tree to restore it.")
        node[last] = leaf
    return out
