"""Export and import quantized params as a single ``.safetensors`` file (no pickles).

Layout: a QArray param ``Dense_0/kernel`` is stored as tensors
``Dense_0/kernel.qvalue``, ``Dense_0/kernel.scale`` and (asymmetric formats)
``Dense_0/kernel.zero_point``; a float param keeps its plain name. The header's
``__metadata__`` holds one JSON entry, ``qarray``, with every param's format,
tiles, channelwise axes, packing and shapes, so the file is self-describing and
a mismatch on load raises an error naming the param. Packed sub-byte values are
stored as their uint8 bytes; dtypes safetensors' numpy API cannot write
(fp8) are stored as raw bytes with the real dtype in the metadata — every
format round-trips bit-exactly.

Needs the ``[checkpoint]`` extra (``safetensors``).

Example:
  >>> import tempfile, os, jax.numpy as jnp, qarray
  >>> f = os.path.join(tempfile.mkdtemp(), 'model.safetensors')
  >>> qarray.io.save_safetensors(f, {'dense': {'kernel': qarray.quantize(jnp.ones((4, 8)), 'int4', tiles=4)}})
  >>> sorted(qarray.io.tensor_names(f))
  ['dense/kernel.qvalue', 'dense/kernel.scale']
  >>> qarray.io.load_safetensors(f)['dense']['kernel'].tiles
  {1: 4}
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qarray._array import QArray
from qarray.io import _metadata as md
from qarray.io import _orbax as orbax_ckpt

__all__ = ['save_safetensors', 'load_safetensors', 'read_safetensors_metadata', 'tensor_names']

_META_KEY = 'qarray'
# dtypes safetensors.numpy writes and reads natively; anything else goes in as raw bytes.
_NATIVE = {np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                                 np.uint8, np.uint16, np.uint32, np.uint64, np.bool_)} | {jnp.dtype('bfloat16')}


def _st():
    try:
        import safetensors
        import safetensors.numpy as stnp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("qarray.io safetensors export needs safetensors: pip install 'qarray[checkpoint]'."
                          ) from e
    return safetensors, stnp


def _tensors_of(name: str, leaf: Any) -> dict[str, Any]:
    if isinstance(leaf, QArray):
        out = {f'{name}.qvalue': leaf.qvalue, f'{name}.scale': leaf.scale}
        if leaf.zero_point is not None:
            out[f'{name}.zero_point'] = leaf.zero_point
        return out
    return {name: leaf}


def _to_storable(x: Any) -> tuple[np.ndarray, bool]:
    """numpy array safetensors can write, and whether it is a raw byte view."""
    a = np.ascontiguousarray(np.asarray(jax.device_get(x)))
    if a.dtype in _NATIVE:
        return a, False
    raw = a.view(np.uint8)
    return (raw if a.dtype.itemsize == 1 else raw.reshape(a.shape + (a.dtype.itemsize,))), True


def save_safetensors(path: str | os.PathLike, tree: Any, *, metadata: dict[str, str] | None = None) -> None:
    """Write ``tree`` (arrays and QArrays) to one safetensors file.

    Sharded arrays are gathered to the host that writes (use Orbax for
    checkpoints of models larger than one host).

    Args:
      path: output file.
      tree: params; leaf names are the '/'-joined tree paths.
      metadata: extra string entries for the header (e.g. a model name).

    Example:
      >>> import tempfile, os, jax.numpy as jnp, qarray
      >>> qarray.io.save_safetensors(os.path.join(tempfile.mkdtemp(), 'm.safetensors'),
      ...                           {'w': qarray.quantize(jnp.ones((2, 4)), 'fp8')})
    """
    _, stnp = _st()
    names, leaves, _ = md.flatten(tree)
    tensors, raw = {}, []
    for name, leaf in zip(names, leaves):
        for tname, x in _tensors_of(name, leaf).items():
            if tname in tensors:
                raise md.CheckpointError(f"param {name!r}: tensor name {tname!r} is used twice; rename the param.")
            tensors[tname], is_raw = _to_storable(x)
            if is_raw:
                raw.append(tname)
    meta = {'format_version': md.FORMAT_VERSION, 'names': names,
            'params': md.describe(tree), 'raw_tensors': raw}
    header = dict(metadata or {})
    if _META_KEY in header:
        raise ValueError(f"metadata key {_META_KEY!r} is reserved for qarray; pick another key.")
    header[_META_KEY] = json.dumps(meta)
    stnp.save_file(tensors, os.fspath(path), metadata=header)


def _read_header(path: str) -> dict[str, Any]:
    """Parse the safetensors header and check that every tensor's bytes are in the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {path!r}.")
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(8)
        if len(head) < 8:
            raise md.CheckpointError(f"{path!r} is truncated: {size} bytes, not even a safetensors header.")
        (n,) = struct.unpack('<Q', head)
        if 8 + n > size:
            raise md.CheckpointError(f"{path!r} is truncated inside its header ({size} of {8 + n} bytes).")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise md.CheckpointError(f"{path!r} has a corrupt safetensors header: {e}.") from e
    for tname, info in header.items():
        if tname == '__metadata__':
            continue
        end = 8 + n + int(info['data_offsets'][1])
        if end > size:
            param = tname.rsplit('.', 1)[0] if tname.rsplit('.', 1)[-1] in md.PARTS else tname
            raise md.CheckpointError(f"param {param!r}: tensor {tname!r} ends at byte {end} but {path!r} has only "
                                     f"{size} bytes; the file is truncated.")
    return header


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The qarray metadata stored in a file's header (``{'names', 'params', ...}``).

    Example:
      >>> import tempfile, os, jax.numpy as jnp, qarray
      >>> f = os.path.join(tempfile.mkdtemp(), 'm.safetensors')
      >>> qarray.io.save_safetensors(f, {'w': qarray.quantize(jnp.ones((2, 16)), 'int2', tiles=8)})
      >>> qarray.io.read_safetensors_metadata(f)['params']['w']['tiles']
      {'1': 8}
    """
    path = os.fspath(path)
    header = _read_header(path)
    raw = (header.get('__metadata__') or {}).get(_META_KEY)
    if raw is None:
        raise md.CheckpointError(f"{path!r} has no {_META_KEY!r} metadata entry; it was not written by "
                                 "qarray.io.save_safetensors, so its tensors cannot be read as QArrays.")
    meta = json.loads(raw)
    if meta.get('format_version') != md.FORMAT_VERSION:
        raise md.CheckpointError(f"{path!r}: unsupported qarray metadata format_version "
                                 f"{meta.get('format_version')!r}; this qarray reads version {md.FORMAT_VERSION}.")
    names = set(_header_tensors(header))
    for name, pm in meta['params'].items():
        leaf = md.abstract_leaf(pm)
        for tname in _tensors_of(name, leaf):
            if tname not in names:
                raise md.CheckpointError(f"param {name!r}: tensor {tname!r} is missing from {path!r}.")
    return meta


def _header_tensors(header: dict[str, Any]) -> list[str]:
    return [k for k in header if k != '__metadata__']


def tensor_names(path: str | os.PathLike) -> list[str]:
    """Names of the tensors in a safetensors file.

    Example:
      >>> import tempfile, os, jax.numpy as jnp, qarray
      >>> f = os.path.join(tempfile.mkdtemp(), 'm.safetensors')
      >>> qarray.io.save_safetensors(f, {'b': jnp.ones(3)})
      >>> qarray.io.tensor_names(f)
      ['b']
    """
    return _header_tensors(_read_header(os.fspath(path)))


def _read_part(handle: Any, tname: str, want: jax.ShapeDtypeStruct, is_raw: bool, name: str) -> jax.Array:
    """One tensor as a jax.Array with ``want.sharding``; each device reads only its own slice."""
    sl = handle.get_slice(tname)
    stored_shape = tuple(sl.get_shape())
    dtype = jnp.dtype(want.dtype)
    expect = want.shape + ((dtype.itemsize,) if is_raw and dtype.itemsize > 1 else ())
    if stored_shape != expect:
        raise md.CheckpointError(f"param {name!r}: tensor {tname!r} has shape {stored_shape}, metadata says "
                                 f"{expect}; the file is inconsistent.")

    def read(index: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(stored_shape) - len(index))
        block = np.asarray(sl[index])
        if is_raw:
            block = np.ascontiguousarray(block).view(dtype).reshape(block.shape[:len(want.shape)])
        elif block.dtype != dtype:
            raise md.CheckpointError(f"param {name!r}: tensor {tname!r} is stored as {block.dtype}, "
                                     f"metadata says {dtype}.")
        return block

    return jax.make_array_from_callback(want.shape, want.sharding, read)


def load_safetensors(path: str | os.PathLike, target: Any = None, shardings: Any = None) -> Any:
    """Load a file written by :func:`save_safetensors`, checking it against ``target``.

    Args:
      path: the ``.safetensors`` file.
      target: optional tree like the saved one (concrete or abstract); every
        param's format, tiles, packing, shape and dtype must match. ``None``:
        return nested dicts built from the stored names.
      shardings: as for :func:`qarray.io.restore`; each device reads only the
        slices it holds.

    Raises:
      CheckpointError: naming the param, on a mismatch, a missing tensor or a
        truncated file.

    Example:
      >>> import tempfile, os, jax.numpy as jnp, qarray
      >>> f = os.path.join(tempfile.mkdtemp(), 'm.safetensors')
      >>> qarray.io.save_safetensors(f, {'w': qarray.quantize(jnp.ones((2, 4)), 'int8')})
      >>> qarray.io.load_safetensors(f)['w'].qvalue.dtype
      dtype('int8')
    """
    safetensors, _ = _st()
    path = os.fspath(path)
    meta = read_safetensors_metadata(path)
    names, abstract, treedef, _ = orbax_ckpt.resolve(meta, target, shardings, f"file {path!r}")
    raw = set(meta.get('raw_tensors', []))
    leaves = []
    with safetensors.safe_open(path, framework='np') as handle:
        for name, a in zip(names, abstract):
            if isinstance(a, QArray):
                parts = {p: getattr(a, p) for p in md.PARTS if getattr(a, p) is not None}
                got = {p: _read_part(handle, f'{name}.{p}', w, f'{name}.{p}' in raw, name)
                       for p, w in parts.items()}
                leaves.append(QArray(got['qvalue'], got['scale'], got.get('zero_point'), qtype=a.qtype,
                                     dtype=a.dtype, packed_axis=a.packed_axis, packed_length=a.packed_length))
            else:
                leaves.append(_read_part(handle, name, a, name in raw, name))
    return md.nest(names, leaves) if treedef is None else jax.tree_util.tree_unflatten(treedef, leaves)
