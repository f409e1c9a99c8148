"""Read GGUF files (llama.cpp's format) into QArrays that hold the file's own codes and scales.

:func:`load_gguf` maps each quantized ggml block format onto a :class:`~qarray.QArray`
with the same code and scale for every value -- no float round trip, and
``q.nbytes`` equals the tensor's size in the file. Only the byte order of the
codes changes: ggml splits a block's values over low and high nibbles (or bit
planes), qarray packs value ``i`` at stream bits ``[i*B, (i+1)*B)``
(:mod:`qarray.packing`). Shapes are numpy's (ggml's ``ne`` reversed: a matrix
with ``ne = [cols, rows]`` is ``(rows, cols)``), blocks run along the last axis.

=========  =====================================================================================
ggml type  QArray (``x`` = the value ggml's reference dequantization gives)
=========  =====================================================================================
F32, F16,  plain numpy arrays of the file's dtype (also F64, I8, I16, I32, I64)
BF16
Q8_0       ``int8`` codes ``q``, float16 scale ``d`` per 32: ``x = d*q``
Q4_0       ``int4`` codes ``q - 8``, float16 ``d`` per 32 (may be negative): ``x = d*(q - 8)``
Q5_0       ``int5`` codes ``q - 16``, float16 ``d`` per 32
Q4_1/Q5_1  ``uint4``/``uint5`` codes ``q``, float16 ``d`` and float16 zero point ``-m`` per 32, in value
           space: ``x = q*d - (-m)``
Q2_K       ``uint2`` codes; scale = QArray(``uint4`` codes ``sc`` per 16, scale ``d`` per 256), zero
           point = QArray(``uint4`` ``m`` per 16, scale ``dmin``): ``x = d*sc*q - dmin*m``
Q3_K       ``int3`` codes; scale = QArray(``int6`` codes ``sc - 32`` per 16, scale ``d`` per 256)
Q4_K/Q5_K  ``uint4``/``uint5`` codes; scale = QArray(``uint6`` ``sc`` per 32, scale ``d`` per 256),
           zero point = QArray(``uint6`` ``m`` per 32, scale ``dmin``): ``x = d*sc*q - dmin*m``
Q6_K       ``int6`` codes ``q - 32``; scale = QArray(``int8`` ``sc`` per 16, scale ``d`` per 256)
MXFP4      qarray's ``mxfp4``: e2m1 codes, ``float8_e8m0fnu`` scale per 32
=========  =====================================================================================

Other types (Q8_1, Q8_K, the IQ*, TQ* and NVFP4 formats, ...) raise ``NotImplementedError`` naming the
tensor; ``names=`` loads the rest. ``qarray.dequantize`` of every loaded tensor equals
``gguf.quants.dequantize`` of its bytes exactly (float32): every product of a code and its (sub-)scales is
exact in float32, so the single rounding, with or without a fused multiply-add, is the one ggml makes. MXFP4
is exact up to the sign of zero (ggml reads the e2m1 code 0b1000 as +0, ``float4_e2m1fn`` as -0) for scale
bytes 2..252; bytes 0 and 1 give float32 subnormals (XLA's CPU backend flushes them to zero), 253 and 254
overflow float32 (ggml: inf; ``dequantize`` saturates at the largest float32), and 255 is NaN in
``float8_e8m0fnu`` but 2**128 in ggml.

The metadata comes back as Python values (``int``, ``float``, ``bool``, ``str``, lists); the
``general.architecture`` hyperparameters and the ``tokenizer.*`` fields are also offered without their key
prefix (:attr:`GGUFContents.hparams`, :attr:`GGUFContents.tokenizer`). No ``gguf`` package is needed.

Example:
  >>> from qarray.io import _gguf
  >>> 'Q4_K' in _gguf.SUPPORTED_TYPES and 'IQ2_XXS' not in _gguf.SUPPORTED_TYPES
  True
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np

from qarray._array import QArray

__all__ = ['GGUFContents', 'load_gguf', 'read_gguf_metadata', 'SUPPORTED_TYPES']

_MAGIC = b'GGUF'
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# Metadata value types: id -> struct format of a scalar (8: string, 9: array).
_SCALAR_FORMATS = {0: '<B', 1: '<b', 2: '<H', 3: '<h', 4: '<I', 5: '<i', 6: '<f', 7: '<?', 10: '<Q', 11: '<q',
                   12: '<d'}
_STRING, _ARRAY = 8, 9

# ggml tensor types: id -> (name, values per block, bytes per block).
_GGML_TYPES = {
    0: ('F32', 1, 4), 1: ('F16', 1, 2), 2: ('Q4_0', 32, 18), 3: ('Q4_1', 32, 20), 6: ('Q5_0', 32, 22),
    7: ('Q5_1', 32, 24), 8: ('Q8_0', 32, 34), 9: ('Q8_1', 32, 40), 10: ('Q2_K', 256, 84), 11: ('Q3_K', 256, 110),
    12: ('Q4_K', 256, 144), 13: ('Q5_K', 256, 176), 14: ('Q6_K', 256, 210), 15: ('Q8_K', 256, 292),
    16: ('IQ2_XXS', 256, 66), 17: ('IQ2_XS', 256, 74), 18: ('IQ3_XXS', 256, 98), 19: ('IQ1_S', 256, 50),
    20: ('IQ4_NL', 32, 18), 21: ('IQ3_S', 256, 110), 22: ('IQ2_S', 256, 82), 23: ('IQ4_XS', 256, 136),
    24: ('I8', 1, 1), 25: ('I16', 1, 2), 26: ('I32', 1, 4), 27: ('I64', 1, 8), 28: ('F64', 1, 8),
    29: ('IQ1_M', 256, 56), 30: ('BF16', 1, 2), 34: ('TQ1_0', 256, 54), 35: ('TQ2_0', 256, 66),
    39: ('MXFP4', 32, 17), 40: ('NVFP4', 64, 36), 41: ('Q1_0', 128, 18),
}

_PLAIN = {'F32': np.dtype('<f4'), 'F16': np.dtype('<f2'), 'BF16': np.dtype(ml_dtypes.bfloat16),
          'F64': np.dtype('<f8'), 'I8': np.dtype('i1'), 'I16': np.dtype('<i2'), 'I32': np.dtype('<i4'),
          'I64': np.dtype('<i8')}


# ------------------------------------------------------------------------------------------ bit layouts
def _flat(x: np.ndarray) -> np.ndarray:
    """Merge the last two axes (blocks, values per block) into one."""
    return np.ascontiguousarray(x).reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))


def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) little-endian bytes -> (...,) float16."""
    return np.ascontiguousarray(b).view('<f2').reshape(b.shape[:-1]).astype(np.float16, copy=False)


def _pack(fields: np.ndarray, bits: int) -> np.ndarray:
    """qarray's bit stream of unsigned ``bits``-wide fields along the last axis (a multiple of 8 long): value i
    at stream bits ``[i*bits, (i+1)*bits)``, little-endian -- the layout of :func:`qarray.packing.pack`."""
    n = fields.shape[-1]
    if bits == 4:
        return fields[..., 0::2] | (fields[..., 1::2] << 4)
    v = fields.reshape(fields.shape[:-1] + (n // 8, 8))
    out = []
    for j in range(bits):  # byte j of each group of 8 values holds stream bits [8j, 8j + 8)
        acc = None
        for i in range(8):
            start = i * bits - 8 * j
            if -bits < start < 8:
                term = v[..., i] << start if start >= 0 else v[..., i] >> -start
                acc = term if acc is None else acc | term
        out.append(acc)
    return np.stack(out, axis=-1).reshape(fields.shape[:-1] + (n // 8 * bits,))


def _nibble_stream(qs: np.ndarray, run: int) -> np.ndarray:
    """ggml's nibble order -> qarray's 4-bit stream, byte for byte.

    In each run of ``run`` bytes ggml keeps ``run`` consecutive values in the low nibbles and the next ``run``
    in the high nibbles; qarray keeps values ``2k`` and ``2k + 1`` in byte ``k`` (low nibble first).
    """
    s = qs.reshape(qs.shape[:-1] + (qs.shape[-1] // run, run // 2, 2))
    a, b = s[..., 0], s[..., 1]
    lo = (a & 0x0F) | (b << 4)
    hi = (a >> 4) | (b & 0xF0)
    return np.concatenate([lo, hi], axis=-1).reshape(qs.shape)


def _nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """ggml's nibbles as one uint8 field per value, in value order (see :func:`_nibble_stream`)."""
    s = qs.reshape(qs.shape[:-1] + (qs.shape[-1] // run, 1, run))
    return np.concatenate([s & 0x0F, s >> 4], axis=-2).reshape(qs.shape[:-1] + (2 * qs.shape[-1],))


def _bit_planes(b: np.ndarray, planes: int, width: int) -> np.ndarray:
    """``width``-bit fields of bytes ``b`` (..., n), plane by plane: field ``p*n + i`` is bits
    ``[p*width, (p+1)*width)`` of byte ``i``."""
    shifts = (np.arange(planes, dtype=np.uint8) * width).reshape(planes, 1)
    f = (b[..., None, :] >> shifts) & np.uint8(2**width - 1)
    return f.reshape(b.shape[:-1] + (planes * b.shape[-1],))


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: the 8 six-bit sub-block scales and mins packed in 12 bytes.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for the
    mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and of mins 4-7 (high nibble).
    """
    s = scales.reshape(scales.shape[:-1] + (3, 4))
    a, b, c = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = np.concatenate([a & 63, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 2) & 0x30)], axis=-1)
    return sc, mn


def _codes(fields: np.ndarray, bits: int) -> np.ndarray:
    """(..., blocks, values) uint8 fields -> stored codes along the last axis (bit-packed below 8 bits)."""
    flat = _flat(fields)
    return flat if bits == 8 else _pack(flat, bits)


def _qarray(stored: np.ndarray, bits: int, scale: Any, zero_point: Any, qtype: str) -> QArray:
    """A QArray of stored codes (packed along the last axis below 8 bits) with float32 output."""
    packed = dict(packed_axis=-1, packed_length=stored.shape[-1] * 8 // bits) if bits < 8 else {}
    return QArray(stored, scale, zero_point, qtype=qtype, dtype=np.float32, **packed)


def _sub(fields: np.ndarray, bits: int, qtype: str, super_scale: np.ndarray) -> QArray:
    """A quantized sub-block scale (or min): ``qtype`` codes per sub-block under a float16 scale per block."""
    return _qarray(_codes(fields, bits), bits, super_scale, None, qtype)


def _q8_0(b: np.ndarray) -> QArray:
    return _qarray(_flat(b[..., 2:].view(np.int8)), 8, _f16(b[..., 0:2]), None, 'int8')


def _q4_0(b: np.ndarray) -> QArray:
    return _qarray(_flat(_nibble_stream(b[..., 2:], 16) ^ np.uint8(0x88)), 4, _f16(b[..., 0:2]), None, 'int4')


def _q4_1(b: np.ndarray) -> QArray:
    return _qarray(_flat(_nibble_stream(b[..., 4:], 16)), 4, _f16(b[..., 0:2]), -_f16(b[..., 2:4]), 'uint4')


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: bit j of the block's little-endian uint32 is the fifth bit of value j."""
    return np.unpackbits(qh, axis=-1, bitorder='little')


def _q5_0(b: np.ndarray) -> QArray:
    q = _nibbles(b[..., 6:], 16) | (_high_bits_32(b[..., 2:6]) << 4)
    return _qarray(_codes(q ^ np.uint8(16), 5), 5, _f16(b[..., 0:2]), None, 'int5')


def _q5_1(b: np.ndarray) -> QArray:
    q = _nibbles(b[..., 8:], 16) | (_high_bits_32(b[..., 4:8]) << 4)
    return _qarray(_codes(q, 5), 5, _f16(b[..., 0:2]), -_f16(b[..., 2:4]), 'uint5')


def _q2_k(b: np.ndarray) -> QArray:
    scales, qs, d, dmin = b[..., :16], b[..., 16:80], _f16(b[..., 80:82]), _f16(b[..., 82:84])
    # 2 halves of 128 values; in each, bits 2k..2k+1 of its 32 bytes hold values 32k .. 32k + 31
    q = _bit_planes(qs.reshape(qs.shape[:-1] + (2, 32)), 4, 2).reshape(qs.shape[:-1] + (256,))
    return _qarray(_codes(q, 2), 2, _sub(scales & 0x0F, 4, 'uint4', d), _sub(scales >> 4, 4, 'uint4', dmin), 'uint2')


def _q3_k(b: np.ndarray) -> QArray:
    hmask, qs, scales, d = b[..., :32], b[..., 32:96], b[..., 96:108], _f16(b[..., 108:110])
    low = _bit_planes(qs.reshape(qs.shape[:-1] + (2, 32)), 4, 2).reshape(qs.shape[:-1] + (256,))
    high = _bit_planes(hmask, 8, 1)  # bit j of byte i: value 32j + i
    q = low | ((high ^ np.uint8(1)) << 2)  # ggml: low - 4 where the high bit is clear; as 3-bit two's complement
    lo = np.concatenate([scales[..., :8] & 0x0F, scales[..., :8] >> 4], axis=-1)
    hi = _bit_planes(scales[..., 8:12], 4, 2)
    sc = (lo | (hi << 4)) ^ np.uint8(32)  # 6-bit sc - 32 as 6-bit two's complement
    return _qarray(_codes(q, 3), 3, _sub(sc, 6, 'int6', d), None, 'int3')


def _q4_k(b: np.ndarray) -> QArray:
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _scale_min_k4(b[..., 4:16])
    return _qarray(_flat(_nibble_stream(b[..., 16:], 32)), 4, _sub(sc, 6, 'uint6', d), _sub(mn, 6, 'uint6', dmin),
                   'uint4')


def _q5_k(b: np.ndarray) -> QArray:
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _scale_min_k4(b[..., 4:16])
    q = _nibbles(b[..., 48:], 32) | (_bit_planes(b[..., 16:48], 8, 1) << 4)
    return _qarray(_codes(q, 5), 5, _sub(sc, 6, 'uint6', d), _sub(mn, 6, 'uint6', dmin), 'uint5')


def _q6_k(b: np.ndarray) -> QArray:
    ql, qh, sc, d = b[..., :128], b[..., 128:192], b[..., 192:208].view(np.int8), _f16(b[..., 208:210])
    # 2 halves of 128 values: low nibbles of its 64 ql bytes are values 0..63, high nibbles 64..127;
    # bits 2k..2k+1 of its 32 qh bytes are the top bits of values 32k .. 32k + 31
    low = _nibbles(ql.reshape(ql.shape[:-1] + (2, 64)), 64).reshape(ql.shape[:-1] + (256,))
    high = _bit_planes(qh.reshape(qh.shape[:-1] + (2, 32)), 4, 2).reshape(qh.shape[:-1] + (256,))
    return _qarray(_codes((low | (high << 4)) ^ np.uint8(32), 6), 6, _sub(sc, 8, 'int8', d), None, 'int6')


def _mxfp4(b: np.ndarray) -> QArray:
    scale = np.ascontiguousarray(b[..., 0]).view(ml_dtypes.float8_e8m0fnu)
    return _qarray(_flat(_nibble_stream(b[..., 1:], 16)), 4, scale, None, 'mxfp4')


_DECODERS: dict[str, Callable[[np.ndarray], QArray]] = {
    'Q8_0': _q8_0, 'Q4_0': _q4_0, 'Q4_1': _q4_1, 'Q5_0': _q5_0, 'Q5_1': _q5_1, 'Q2_K': _q2_k, 'Q3_K': _q3_k,
    'Q4_K': _q4_k, 'Q5_K': _q5_k, 'Q6_K': _q6_k, 'MXFP4': _mxfp4}

SUPPORTED_TYPES: tuple[str, ...] = tuple(_PLAIN) + tuple(_DECODERS)


# ------------------------------------------------------------------------------------------ the container
class _Cursor:
    """Little-endian reads from a buffer, with errors that name the file."""

    def __init__(self, buf: Any, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.path!r} is truncated: {what} at byte {self.pos} needs {n} bytes, but the "
                             f"file has {len(self.buf)}.")

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self, what: str) -> str:
        n = self.scalar('<Q', what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode('utf-8')
        except UnicodeDecodeError:  # keep the bytes (a token may be a partial UTF-8 sequence)
            return raw.decode('utf-8', errors='surrogateescape')

    def strings(self, count: int, what: str) -> list[str]:
        """An array of ``count`` strings (token lists run to 100k+: one tight loop)."""
        buf, pos, size, out = self.buf, self.pos, len(self.buf), []
        length = struct.Struct('<Q').unpack_from
        for _ in range(count):
            if pos + 8 > size:
                break
            (n,) = length(buf, pos)
            pos += 8
            if pos + n > size:
                break
            raw = bytes(buf[pos:pos + n])
            pos += n
            try:
                out.append(raw.decode('utf-8'))
            except UnicodeDecodeError:  # keep the bytes (a token may be a partial UTF-8 sequence)
                out.append(raw.decode('utf-8', errors='surrogateescape'))
        self.pos = pos
        if len(out) < count:
            self.need(8 if pos + 8 > size else struct.unpack_from('<Q', buf, pos)[0] + 8, f'{what} (string {len(out)})')
        return out

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype, count = self.scalar('<I', what), self.scalar('<Q', what)
            if etype in _SCALAR_FORMATS:
                dt = np.dtype(_SCALAR_FORMATS[etype].replace('?', 'b1'))
                self.need(count * dt.itemsize, what)
                out = np.frombuffer(self.buf, dt, count, self.pos).tolist()
                self.pos += count * dt.itemsize
                return out
            if etype == _STRING:
                return self.strings(count, what)
            return [self.value(etype, what) for _ in range(count)]
        raise ValueError(f"{self.path!r}: {what} has unknown GGUF value type {vtype}; the file is corrupt or "
                         "newer than this reader.")


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    name: str
    ne: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))

    @property
    def type_name(self) -> str:
        return _GGML_TYPES.get(self.ggml_type, (f'type {self.ggml_type}',))[0]


def _open(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path!r}.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path!r} is empty, not a GGUF file.")
    return np.memmap(path, dtype=np.uint8, mode='r')


def _read_header(buf: np.ndarray, path: str) -> tuple[int, dict[str, Any], list[_TensorInfo], int]:
    """(version, metadata, tensor infos, offset of the tensor data)."""
    view = memoryview(buf)  # slicing a memoryview is much cheaper than slicing the memmap (100k+ tokens)
    try:
        return _parse_header(_Cursor(view, path), path)
    finally:
        view.release()


def _parse_header(cur: _Cursor, path: str) -> tuple[int, dict[str, Any], list[_TensorInfo], int]:
    buf = cur.buf
    cur.need(4, 'the magic number')
    if bytes(buf[:4]) != _MAGIC:
        raise ValueError(f"{path!r} is not a GGUF file (it starts with {bytes(buf[:4])!r}, not {_MAGIC!r}).")
    cur.pos = 4
    version = cur.scalar('<I', 'the version')
    if version not in _VERSIONS:
        swapped = struct.unpack('>I', struct.pack('<I', version))[0]
        hint = ' (a big-endian GGUF file, which this reader does not read)' if swapped in _VERSIONS else ''
        raise ValueError(f"{path!r}: GGUF version {version}{hint}; this reader reads versions {_VERSIONS}.")
    n_tensors, n_kv = cur.scalar('<Q', 'the tensor count'), cur.scalar('<Q', 'the metadata count')
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f'metadata key {i}')
        metadata[key] = cur.value(cur.scalar('<I', f'the type of {key!r}'), f'metadata {key!r}')
    infos = []
    for i in range(n_tensors):
        name = cur.string(f'tensor name {i}')
        n_dims = cur.scalar('<I', f'tensor {name!r}')
        ne = tuple(cur.scalar('<Q', f'tensor {name!r}') for _ in range(n_dims))
        infos.append(_TensorInfo(name, ne, cur.scalar('<I', f'tensor {name!r}'), cur.scalar('<Q', f'tensor {name!r}')))
    alignment = metadata.get('general.alignment', _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise ValueError(f"{path!r}: general.alignment is {alignment!r}, not a positive integer.")
    return version, metadata, infos, -(-cur.pos // alignment) * alignment


def _tensor(buf: np.ndarray, start: int, info: _TensorInfo, path: str) -> QArray | np.ndarray:
    tname = info.type_name
    if tname not in SUPPORTED_TYPES:
        raise NotImplementedError(
            f"GGUF tensor {info.name!r} has ggml type {tname}, which load_gguf cannot keep as codes; supported "
            f"types: {', '.join(SUPPORTED_TYPES)}. Pass names= to load the other tensors.")
    _, block, size = _GGML_TYPES[info.ggml_type]
    shape = info.shape if info.ne else ()
    cols = shape[-1] if shape else 1
    if cols % block:
        raise ValueError(f"{path!r}: GGUF tensor {info.name!r} ({tname}) has rows of {cols} values, not a "
                         f"multiple of its block of {block}; the file is corrupt.")
    nbytes = math.prod(shape) // block * size
    begin = start + info.offset
    if begin + nbytes > len(buf):
        raise ValueError(f"{path!r} is truncated: GGUF tensor {info.name!r} ({tname}, {nbytes} bytes at byte "
                         f"{begin}) ends past the end of the file ({len(buf)} bytes).")
    raw = np.array(buf[begin:begin + nbytes])  # a copy: nothing loaded refers to the file's mapping
    if tname in _PLAIN:
        return raw.view(_PLAIN[tname]).reshape(shape)
    return _DECODERS[tname](raw.reshape(shape[:-1] + (cols // block, size)))


@dataclasses.dataclass(frozen=True)
class GGUFContents:
    """What :func:`load_gguf` read from a GGUF file.

    Attributes:
      tensors: ``{GGUF tensor name: QArray or numpy array}`` in file order (a pytree; numpy leaves in host
        memory: ``jax.device_put(contents.tensors)`` moves them). Shapes are numpy's (ggml's ``ne`` reversed).
      metadata: every key/value pair, as Python values (lists for arrays).
      tensor_types: ``{tensor name: ggml type name}`` (``'Q4_K'``, ``'F32'``, ...).
      version: the GGUF format version (2 or 3).

    Example:
      >>> import os, struct, tempfile
      >>> from qarray.io import load_gguf
      >>> def s(t): return struct.pack('<Q', len(t)) + t.encode()
      >>> kv = [s('general.architecture') + struct.pack('<I', 8) + s('llama'),   # type 8: string
      ...       s('llama.block_count') + struct.pack('<II', 4, 30),              # type 4: uint32
      ...       s('tokenizer.ggml.model') + struct.pack('<I', 8) + s('gpt2')]
      >>> path = os.path.join(tempfile.mkdtemp(), 'meta.gguf')
      >>> with open(path, 'wb') as f:
      ...     _ = f.write(b'GGUF' + struct.pack('<IQQ', 3, 0, len(kv)) + b''.join(kv))
      >>> g = load_gguf(path)
      >>> g.architecture, g.hparams, g.tokenizer, g.tensors
      ('llama', {'block_count': 30}, {'model': 'gpt2'}, {})
    """

    tensors: dict[str, QArray | np.ndarray]
    metadata: dict[str, Any]
    tensor_types: dict[str, str]
    version: int

    @property
    def architecture(self) -> str | None:
        """``general.architecture`` (e.g. ``'llama'``), or None."""
        return self.metadata.get('general.architecture')

    @property
    def hparams(self) -> dict[str, Any]:
        """The architecture's hyperparameters: the ``<architecture>.*`` keys without that prefix
        (``block_count``, ``attention.head_count``, ``rope.freq_base``, ...)."""
        prefix = f'{self.architecture}.'
        return {k[len(prefix):]: v for k, v in self.metadata.items() if k.startswith(prefix)}

    @property
    def tokenizer(self) -> dict[str, Any]:
        """The ``tokenizer.*`` keys without their prefix (``tokenizer.ggml.tokens`` -> ``tokens``,
        ``tokenizer.chat_template`` -> ``chat_template``)."""
        out = {}
        for k, v in self.metadata.items():
            for prefix in ('tokenizer.ggml.', 'tokenizer.'):
                if k.startswith(prefix):
                    out[k[len(prefix):]] = v
                    break
        return out


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The key/value metadata of a GGUF file as Python values, without reading any tensor.

    Example:
      >>> import os, struct, tempfile
      >>> from qarray.io import read_gguf_metadata
      >>> def s(t): return struct.pack('<Q', len(t)) + t.encode()
      >>> kv = s('llama.rope.freq_base') + struct.pack('<If', 6, 1e5)   # type 6: float32
      >>> path = os.path.join(tempfile.mkdtemp(), 'meta.gguf')
      >>> with open(path, 'wb') as f:
      ...     _ = f.write(b'GGUF' + struct.pack('<IQQ', 3, 0, 1) + kv)
      >>> read_gguf_metadata(path)
      {'llama.rope.freq_base': 100000.0}
    """
    path = os.fspath(path)
    return _read_header(_open(path), path)[1]


def load_gguf(path: str | os.PathLike, names: Iterable[str] | None = None) -> GGUFContents:
    """Read a GGUF file: its tensors (quantized ones as QArrays of the file's own codes and scales) and metadata.

    Each quantized tensor becomes a QArray with the same code and scale for every value as the file (see the
    table in :mod:`qarray.io._gguf`), so ``q.nbytes`` is the tensor's size in the file and
    ``qarray.dequantize(q)`` equals ggml's dequantization (``gguf.quants.dequantize``) exactly (MXFP4: up to
    the sign of zero and extreme scale bytes, see :mod:`qarray.io._gguf`). Float and
    integer tensors stay numpy arrays of their own dtype.

    Args:
      path: the ``.gguf`` file (little-endian, GGUF version 2 or 3; one file, not split shards).
      names: only these tensors (default: all).

    Returns:
      A :class:`GGUFContents`: ``tensors``, ``metadata``, ``tensor_types``, ``version``, and the
      ``architecture``, ``hparams`` and ``tokenizer`` views of the metadata.

    Raises:
      NotImplementedError: a tensor's ggml type has no QArray form here (the message names the tensor and the
        type and lists the supported ones); load the rest with ``names=``.
      ValueError: not a GGUF file, an unsupported version, a truncated or corrupt file, or an unknown name.
      FileNotFoundError: no file at ``path``.

    Example:
      >>> import os, struct, tempfile, numpy as np, qarray
      >>> from qarray.io import load_gguf
      >>> def s(t): return struct.pack('<Q', len(t)) + t.encode()
      >>> info = s('w') + struct.pack('<IQIQ', 1, 32, 8, 0)   # 1 axis of 32 values, type 8 (Q8_0), offset 0
      >>> head = b'GGUF' + struct.pack('<IQQ', 3, 1, 0) + info
      >>> block = np.float16(0.5).tobytes() + np.arange(-16, 16, dtype=np.int8).tobytes()
      >>> path = os.path.join(tempfile.mkdtemp(), 'tiny.gguf')
      >>> with open(path, 'wb') as f:
      ...     _ = f.write(head + bytes(-len(head) % 32) + block)   # tensor data starts 32-byte aligned
      >>> g = load_gguf(path)
      >>> q = g.tensors['w']
      >>> g.tensor_types['w'], q.qtype.name, q.nbytes, qarray.dequantize(q)[:3].tolist()
      ('Q8_0', 'int8', 34, [-8.0, -7.5, -7.0])
    """
    path = os.fspath(path)
    buf = _open(path)
    try:
        version, metadata, infos, start = _read_header(buf, path)
        by_name = {i.name: i for i in infos}
        if names is not None:
            names = list(names)
            unknown = [n for n in names if n not in by_name]
            if unknown:
                raise ValueError(f"{path!r} has no tensor {unknown[0]!r} ({len(unknown)} unknown names); it has "
                                 f"{len(infos)} tensors, e.g. {list(by_name)[:5]}.")
            infos = [by_name[n] for n in names]
        tensors = {i.name: _tensor(buf, start, i, path) for i in infos}
    finally:
        del buf  # nothing returned refers to the mapping: it closes here
    return GGUFContents(tensors, metadata, {i.name: i.type_name for i in infos}, version)
