"""Export and import quantized params as a single ``.safetensors`` file (no pickles).

Layout: a QArray param ``Dense_0/kernel`` is stored as tensors
``Dense_0/kernel.qvalue``, ``Dense_0/kernel.scale`` and (asymmetric formats)
``Dense_0/kernel.zero_point``; a float param keeps its plain name. A quantized
scale or zero point (a QArray itself: double quantization, nvfp4, GGUF
K-quants) is stored as its own parts, ``Dense_0/kernel.scale.qvalue``,
``Dense_0/kernel.scale.scale``, ... (any depth). The header's
``__metadata__`` holds one JSON entry, ``qarray``, with every param's format,
tiles, channelwise axes, packing and shapes, so the file is self-describing and
a mismatch on load raises an error naming the param. Packed sub-byte values are
stored as their uint8 bytes; dtypes safetensors' numpy API cannot write
(fp8, and microscaling's ``float8_e8m0fnu`` scales, which safetensors has no
dtype for) are stored as raw ``U8`` bytes (one extra trailing axis of the item
size when it is over one byte) with the real dtype in the metadata
(``raw_tensors``) — every format round-trips bit-exactly.

Integrity: the metadata also holds a SHA-256 digest of every tensor's bytes
(``checksums``; see :mod:`qarray.io._checksum` for the choice) and a digest of
the metadata itself (``metadata_checksum``). :func:`load_safetensors` checks
both by default, hashing each tensor's bytes straight from the file before any
array is built, so a flipped bit, a truncated copy or an edited header raises
:class:`CheckpointError` naming the param and the part (``qvalue``, ``scale``,
``zero_point``). The digest of a tensor equals the SHA-256 of its data bytes
in the file, so other tools can check it too.

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

import concurrent.futures
import json
import os
import struct
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qarray._array import QArray
from qarray.io import _checksum as cs
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


def _tensors_of(name: str, leaf: Any) -> dict[str, tuple[str, Any]]:
    """``{tensor name: (part, array)}`` of one param (part: qvalue/scale/zero_point, the dotted parts of a
    quantized scale or zero point such as ``scale.qvalue``, or 'array')."""
    if isinstance(leaf, QArray):
        return {f'{name}.{p}': (p, x) for p, x in md.array_parts(leaf)}
    return {name: (cs.ARRAY, leaf)}


def _param_of(tname: str) -> str:
    """The param a tensor belongs to: its name without the trailing part names (``w.scale.qvalue`` -> ``w``)."""
    while '.' in tname and tname.rsplit('.', 1)[-1] in md.PARTS:
        tname = tname.rsplit('.', 1)[0]
    return tname


def _to_storable(x: Any) -> tuple[np.ndarray, bool]:
    """numpy array safetensors can write (same bytes, C order), and whether it is a raw byte view."""
    a = np.asarray(jax.device_get(x))
    if not a.flags.c_contiguous:
        a = a.copy(order='C')
    if a.dtype.byteorder == '>':
        a = a.astype(a.dtype.newbyteorder('<'))
    if a.dtype in _NATIVE:
        return a, False
    raw = a.reshape(-1).view(np.uint8)
    return raw.reshape(a.shape + ((a.dtype.itemsize,) if a.dtype.itemsize > 1 else ())), True


def save_safetensors(path: str | os.PathLike, tree: Any, *, metadata: dict[str, str] | None = None) -> None:
    """Write ``tree`` (arrays and QArrays) to one safetensors file.

    Sharded arrays are gathered to the host that writes (use Orbax for
    checkpoints of models larger than one host). The header records a SHA-256
    digest of every tensor and of the qarray metadata, checked on load.

    Args:
      path: output file.
      tree: params; leaf names are the '/'-joined tree paths. Every leaf must be
        an array (jax or numpy, bool or numeric dtype), a Python bool/int/float,
        or a QArray.
      metadata: extra string entries for the header (e.g. a model name; not
        covered by the checksums).

    Raises:
      TypeError: a leaf is not an array or number (the message names the param
        and its type), or ``metadata`` is not a dict of strings.
      ValueError: ``metadata`` uses the reserved key ``'qarray'``.

    Example:
      >>> import tempfile, os, jax.numpy as jnp, qarray
      >>> qarray.io.save_safetensors(os.path.join(tempfile.mkdtemp(), 'm.safetensors'),
      ...                           {'w': qarray.quantize(jnp.ones((2, 4)), 'fp8')})
    """
    _, stnp = _st()
    header = dict(metadata or {})
    if _META_KEY in header:
        raise ValueError(f"metadata key {_META_KEY!r} is reserved for qarray; pick another key.")
    bad = [(k, v) for k, v in header.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"metadata must map str to str (safetensors stores strings only); entry {bad[0]!r:.80} "
                        "is not; json.dumps the value first.")
    names, leaves, _ = md.flatten(tree)
    md.check_leaves(names, leaves)
    tensors, raw, sums = {}, [], {}
    for name, leaf in zip(names, leaves):
        for tname, (part, x) in _tensors_of(name, leaf).items():
            if tname in tensors:
                raise md.CheckpointError(f"param {name!r}: tensor name {tname!r} is used twice; rename the param.")
            tensors[tname], is_raw = _to_storable(x)
            sums.setdefault(name, {})[part] = cs.entry(cs.digest(tensors[tname]))
            if is_raw:
                raw.append(tname)
    params = md.describe(tree)
    meta = {'format_version': md.format_version(params), 'names': names, 'params': params, 'raw_tensors': raw,
            cs.CHECKSUM_KEY: {'algorithm': cs.ALGORITHM, 'params': sums}}
    header[_META_KEY] = json.dumps(cs.seal(meta))
    stnp.save_file(tensors, os.fspath(path), metadata=header)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_entry(path: str, tname: str, info: Any) -> None:
    """Raise CheckpointError unless ``info`` is a well-formed safetensors tensor entry."""
    ok = (isinstance(info, dict) and isinstance(info.get('dtype'), str)
          and isinstance(info.get('shape'), list) and all(_is_int(d) for d in info['shape'])
          and isinstance(info.get('data_offsets'), list) and len(info['data_offsets']) == 2
          and all(_is_int(o) for o in info['data_offsets']) and info['data_offsets'][0] <= info['data_offsets'][1])
    if not ok:
        raise md.CheckpointError(f"{path!r} has a corrupt safetensors header: the entry of tensor {tname!r} "
                                 f"(param {_param_of(tname)!r}) is {info!r:.200}, not "
                                 "{'dtype': str, 'shape': [int, ...], 'data_offsets': [begin, end]}.")


def _read_header(path: str) -> tuple[dict[str, Any], int]:
    """Parse and check the safetensors header; (header, offset of the data section in the file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {path!r}.")
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(8)
        if len(head) < 8:
            raise md.CheckpointError(f"{path!r} is truncated: {size} bytes, not even a safetensors header.")
        (n,) = struct.unpack('<Q', head)
        if 8 + n > size:
            raise md.CheckpointError(f"{path!r} is truncated inside its header ({size} of {8 + n} bytes), or "
                                     "its header length is corrupt.")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:  # includes UnicodeDecodeError
            raise md.CheckpointError(f"{path!r} has a corrupt safetensors header (not valid JSON): {e}.") from e
    if not isinstance(header, dict):
        raise md.CheckpointError(f"{path!r} has a corrupt safetensors header: a JSON {type(header).__name__}, "
                                 "not an object.")
    extra = header.get('__metadata__', {})
    if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
        raise md.CheckpointError(f"{path!r} has a corrupt safetensors header: '__metadata__' is not a "
                                 "dict of strings.")
    for tname, info in header.items():
        if tname == '__metadata__':
            continue
        _check_entry(path, tname, info)
        end = 8 + n + info['data_offsets'][1]
        if end > size:
            raise md.CheckpointError(f"param {_param_of(tname)!r}: tensor {tname!r} ends at byte {end} but "
                                     f"{path!r} has only {size} bytes; the file is truncated.")
    return header, 8 + n


def _read_meta(path: str, verify: bool) -> tuple[dict[str, Any], dict[str, Any], int, bool]:
    """(qarray metadata, header, data offset, whether tensor checksums are to be checked)."""
    header, start = _read_header(path)
    raw = header.get('__metadata__', {}).get(_META_KEY)
    if raw is None:
        raise md.CheckpointError(f"{path!r} has no {_META_KEY!r} metadata entry; it was not written by "
                                 "qarray.io.save_safetensors, so its tensors cannot be read as QArrays.")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise md.CheckpointError(f"{path!r}: the {_META_KEY!r} header entry is corrupt (not valid JSON: {e}).") from e
    if not isinstance(meta, dict) or meta.get('format_version') not in md.READABLE_VERSIONS:
        raise md.CheckpointError(f"{path!r}: unsupported qarray metadata format_version "
                                 f"{meta.get('format_version') if isinstance(meta, dict) else None!r}; this qarray "
                                 f"reads versions {md.READABLE_VERSIONS}.")
    checked = cs.open_seal(meta, f"file {path!r}", verify)
    names = set(_header_tensors(header))
    try:
        for name, pm in meta['params'].items():
            for tname in _tensors_of(name, md.abstract_leaf(pm)):
                if tname not in names:
                    raise md.CheckpointError(f"param {name!r}: tensor {tname!r} is missing from {path!r}.")
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        if isinstance(e, md.CheckpointError):
            raise
        raise md.CheckpointError(f"{path!r}: the {_META_KEY!r} metadata is malformed ({type(e).__name__}: {e}).") from e
    return meta, header, start, checked


def read_safetensors_metadata(path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """The qarray metadata stored in a file's header (``{'names', 'params', 'checksums', ...}``).

    ``verify`` (default): check the metadata's own SHA-256 digest first (a
    mismatch raises :class:`CheckpointError`); files written before checksums
    give a ``UserWarning``.

    Example:
      >>> import tempfile, os, jax.numpy as jnp, qarray
      >>> f = os.path.join(tempfile.mkdtemp(), 'm.safetensors')
      >>> qarray.io.save_safetensors(f, {'w': qarray.quantize(jnp.ones((2, 16)), 'int2', tiles=8)})
      >>> qarray.io.read_safetensors_metadata(f)['params']['w']['tiles']
      {'1': 8}
    """
    return _read_meta(os.fspath(path), verify)[0]


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
    return _header_tensors(_read_header(os.fspath(path))[0])


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
        if 0 in stored_shape:  # safetensors cannot slice an empty tensor
            return np.zeros(tuple(len(range(*i.indices(n))) for i, n in zip(index, stored_shape))[:len(want.shape)],
                            dtype)
        block = np.asarray(sl[index])
        if is_raw:
            block = np.ascontiguousarray(block).view(dtype).reshape(block.shape[:len(want.shape)])
        elif block.dtype != dtype:
            raise md.CheckpointError(f"param {name!r}: tensor {tname!r} is stored as {block.dtype}, "
                                     f"metadata says {dtype}.")
        return block

    return jax.make_array_from_callback(want.shape, want.sharding, read)


def _file_digest(path: str, begin: int, end: int, chunk: int = 1 << 24) -> str:
    h = cs.hasher()
    with open(path, 'rb') as f:
        f.seek(begin)
        left = end - begin
        while left > 0:
            buf = f.read(min(chunk, left))
            if not buf:
                break
            h.update(buf)
            left -= len(buf)
    return h.hexdigest()


def _verify_tensors(path: str, meta: dict[str, Any], header: dict[str, Any], start: int, names: list[str]) -> None:
    """Hash each tensor of ``names`` from the file and compare with its stored digest (first mismatch raises).

    Tensors are hashed on a few threads (file reads and hashlib release the GIL), 16 MiB at a time.
    """
    jobs = []
    for name in names:
        for tname, (part, _) in _tensors_of(name, md.abstract_leaf(meta['params'][name])).items():
            begin, end = header[tname]['data_offsets']
            jobs.append((name, part, cs.record_for(meta, name, part, f"file {path!r}"), start + begin, start + end))
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        digests = pool.map(lambda job: _file_digest(path, job[3], job[4]), jobs)
        for (name, part, rec, _, _), got in zip(jobs, digests):
            if got != rec.get('digest'):
                raise cs.mismatch(name, part, str(rec.get('digest', '(none)')), got, f"file {path!r}")


def load_safetensors(path: str | os.PathLike, target: Any = None, shardings: Any = None, *,
                     verify: bool = True) -> Any:
    """Load a file written by :func:`save_safetensors`, checking it against ``target``.

    Args:
      path: the ``.safetensors`` file.
      target: optional tree like the saved one (concrete or abstract); every
        param's format, tiles, packing, shape and dtype must match. ``None``:
        return nested dicts built from the stored names.
      shardings: as for :func:`qarray.io.restore`; each device reads only the
        slices it holds.
      verify: check the SHA-256 digests of the metadata and of every tensor
        loaded (each tensor is hashed whole from the file, before any array is
        built; about as fast as reading the file once more). ``False`` skips
        the checks, and the warning for files written without checksums.

    Raises:
      CheckpointError: naming the param, on a mismatch, a missing tensor, a
        truncated file, or (``verify``) a tensor whose bytes do not match their
        digest (names the part: qvalue, scale, zero_point) — or naming the file,
        for a corrupt header or metadata that does not match its digest.

    Warns:
      UserWarning: (``verify``) the file was written before checksums existed.

    Example:
      >>> import tempfile, os, jax.numpy as jnp, qarray
      >>> f = os.path.join(tempfile.mkdtemp(), 'm.safetensors')
      >>> qarray.io.save_safetensors(f, {'w': qarray.quantize(jnp.ones((2, 4)), 'int8')})
      >>> qarray.io.load_safetensors(f)['w'].qvalue.dtype
      dtype('int8')
    """
    safetensors, _ = _st()
    path = os.fspath(path)
    meta, header, start, checked = _read_meta(path, verify)
    names, abstract, treedef, _ = orbax_ckpt.resolve(meta, target, shardings, f"file {path!r}")
    if checked:
        _verify_tensors(path, meta, header, start, names)
    raw = set(meta.get('raw_tensors', []))
    leaves = []
    try:
        handle_cm = safetensors.safe_open(path, framework='np')
    except Exception as e:  # the Rust reader's own consistency checks (offsets, dtypes)
        raise md.CheckpointError(f"{path!r} cannot be opened as safetensors: {type(e).__name__}: {e}") from e
    with handle_cm as handle:
        for name, a in zip(names, abstract):
            if isinstance(a, QArray):
                leaves.append(md.rebuild(a, lambda part, w, name=name: _read_part(
                    handle, f'{name}.{part}', w, f'{name}.{part}' in raw, name)))
            else:
                leaves.append(_read_part(handle, name, a, name in raw, name))
    return md.nest(names, leaves) if treedef is None else jax.tree_util.tree_unflatten(treedef, leaves)
