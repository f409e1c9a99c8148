"""Bit packing: unsigned B-bit fields <-> dense ``uint8`` bytes.

Layout: along the packed axis, value ``i`` occupies stream bits
``[i*B, (i+1)*B)``, little-endian (bit 0 of byte 0 first). Every group of 8
values fills exactly ``B`` bytes, so one layout serves every width; the
last group is zero padded and the byte stream is cut to ``ceil(N*B/8)``.
All loops below run over the 8-value bit pattern, never over elements, so
XLA sees a handful of shifts and ORs it can fuse into the consumer.

Widths that divide 8 (1, 2, 4 bits) have a third, cheaper reader,
:func:`split_bytes`: one broadcast shift splits every byte into its
``8 // bits`` fields (and can sign-extend them), which XLA fuses into the consumer.
For 2 and 4 bits there is also a fusible writer, :func:`pack_native`, its inverse.

*Native sub-byte path* (2 and 4 bits, the last axis, CPU only): XLA's own
``int4``/``uint4``/``int2``/``uint2`` types hold exactly this layout (field
``i`` of a byte at bits ``[i*B, (i+1)*B)``), so ``lax.bitcast_convert_type``
between them and ``uint8`` packs or splits bytes as one vectorised convert
(an int4 dequantize of 2048x2048 ran 1.4-1.7x faster than with the broadcast
shift on XLA:CPU), and XLA cancels a
pack followed by a split inside one program. It is selected at trace time by
``jax.default_backend() == 'cpu'``; on other backends the sub-byte bitcasts
are not verified yet, so the shift formulations (same bytes) are used there.

Two formulations of the same layout, picked per width by speed on XLA:CPU
(both are exercised by the tests for every width):

* *byte-wise*: byte ``j`` of a group ORs the shifted values that touch it
  (and the inverse). Cheap to pack.
* *word-wise*: a group's ``B`` bytes are read as one or two little-endian
  uint32 words and all 8 values come out of one broadcast shift by the lane
  offsets ``[0, B, 2B, ...]``, which vectorises without per-lane slicing.
  About 1.5-3x faster to unpack for B <= 5; packing is fast for B = 4 only
  (whole words, no byte slicing). Shift amounts >= 32 give 0 in XLA, which
  is what makes one formula serve lanes in either word.

Example:
  >>> import jax.numpy as jnp
  >>> from qarray import packing
  >>> b = packing.pack(jnp.array([1, 2, 3], jnp.uint8), bits=3)
  >>> b.shape, packing.unpack(b, bits=3, length=3).tolist()
  ((2,), [1, 2, 3])
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ['packed_length', 'pack', 'unpack', 'split_bytes', 'pack_native']


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 7:
        raise ValueError(f"bits must be an int in 1..7 (8-bit formats are stored natively); got {bits!r}.")


def packed_length(length: int, bits: int) -> int:
    """Bytes needed for ``length`` fields of ``bits`` bits: ``ceil(length*bits/8)``.

    Example:
      >>> from qarray import packing
      >>> packing.packed_length(10, 3)
      4
    """
    _check_bits(bits)
    return -(-length * bits // 8)


def _pad_last(x: jnp.ndarray, size: int) -> jnp.ndarray:
    extra = size - x.shape[-1]
    if extra == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


_WORDWISE_PACK_BITS = (4,)
_WORDWISE_UNPACK_MAX_BITS = 5


def _word_shifts(bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-lane shift amounts (uint32) for the word-wise formulation; 32 means "contributes 0".

    Lane ``i`` starts at bit ``o = i*bits``: its low part is ``lo >> a``; a lane
    straddling into the second word adds ``hi << b``; a lane inside it is ``hi >> c``.
    """
    o = np.arange(8) * bits
    a = np.where(o < 32, o, 32)
    b = np.where((o > 0) & (o < 32), 32 - o, 32)
    c = np.where(o >= 32, o - 32, 32)
    return tuple(v.astype(np.uint32) for v in (a, b, c))


def _pack_words(v: jnp.ndarray, bits: int) -> jnp.ndarray:
    """(..., groups, 8) fields -> (..., groups, bits) bytes via uint32 words."""
    a, b, c = (jnp.asarray(s) for s in _word_shifts(bits))
    v = v.astype(jnp.uint32)
    words = [jnp.sum(jnp.left_shift(v, a), axis=-1, dtype=jnp.uint32)]  # disjoint bits: sum == or
    if bits > 4:
        words.append(jnp.sum(jnp.right_shift(v, b) | jnp.left_shift(v, c), axis=-1, dtype=jnp.uint32))
    by = jnp.concatenate([lax.bitcast_convert_type(w, jnp.uint8) for w in words], axis=-1)
    return by[..., :bits]


def _unpack_words(b: jnp.ndarray, bits: int) -> jnp.ndarray:
    """(..., groups, bits) bytes -> (..., groups, 8) uint8 fields via uint32 words."""
    nwords = 1 if bits <= 4 else 2
    b = _pad_last(b, 4 * nwords)
    w = lax.bitcast_convert_type(b.reshape(*b.shape[:-1], nwords, 4), jnp.uint32)  # (..., groups, nwords)
    a, sb, c = (jnp.asarray(s) for s in _word_shifts(bits))
    val = jnp.right_shift(w[..., 0:1], a)
    if nwords == 2:
        hi = w[..., 1:2]
        val = val | jnp.left_shift(hi, sb) | jnp.right_shift(hi, c)
    return (val & jnp.uint32(2**bits - 1)).astype(jnp.uint8)


# Jitted with static widths: an eager call compiles one small program per shape instead of
# dispatching ~40 ops; inside an outer jit it is simply inlined.
@functools.partial(jax.jit, static_argnames=('bits', 'axis'))
def pack(fields: jnp.ndarray, bits: int, axis: int = -1) -> jnp.ndarray:
    """Pack unsigned ``bits``-wide fields (values < 2**bits) along ``axis`` into uint8.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import packing
      >>> packing.pack(jnp.array([[1, 0, 1, 1]], jnp.uint8), bits=1).tolist()
      [[13]]
    """
    _check_bits(bits)
    fields = jnp.moveaxis(jnp.asarray(fields).astype(jnp.uint8), axis, -1)
    n = fields.shape[-1]
    groups = -(-n // 8)
    v = _pad_last(fields, groups * 8).reshape(*fields.shape[:-1], groups, 8)
    if bits in _WORDWISE_PACK_BITS:
        packed = _pack_words(v, bits).reshape(*fields.shape[:-1], groups * bits)
        return jnp.moveaxis(packed[..., : packed_length(n, bits)], -1, axis)
    out_bytes = []
    for j in range(bits):  # byte j of each group covers stream bits [8j, 8j+8)
        acc = None
        for i in range(8):
            start = i * bits - 8 * j
            if start >= 8 or start + bits <= 0:
                continue  # value i does not touch byte j
            vi = v[..., i]
            term = lax.shift_left(vi, jnp.uint8(start)) if start >= 0 else lax.shift_right_logical(vi, jnp.uint8(-start))
            acc = term if acc is None else acc | term
        out_bytes.append(acc)
    packed = jnp.stack(out_bytes, axis=-1).reshape(*fields.shape[:-1], groups * bits)
    packed = packed[..., : packed_length(n, bits)]
    return jnp.moveaxis(packed, -1, axis)


@functools.partial(jax.jit, static_argnames=('bits', 'length', 'axis'))
def unpack(packed: jnp.ndarray, bits: int, length: int, axis: int = -1) -> jnp.ndarray:
    """Inverse of :func:`pack`: ``length`` uint8 fields along ``axis``.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import packing
      >>> packing.unpack(jnp.array([13], jnp.uint8), bits=1, length=4).tolist()
      [1, 0, 1, 1]
    """
    _check_bits(bits)
    packed = jnp.moveaxis(jnp.asarray(packed), axis, -1)
    if packed.dtype != jnp.uint8:
        raise TypeError(f"packed must be uint8; got {packed.dtype}.")
    if packed.shape[-1] != packed_length(length, bits):
        raise ValueError(
            f"packed axis has {packed.shape[-1]} bytes but length={length} fields of "
            f"{bits} bits need {packed_length(length, bits)}.")
    groups = -(-length // 8)
    b = _pad_last(packed, groups * bits).reshape(*packed.shape[:-1], groups, bits)
    if bits <= _WORDWISE_UNPACK_MAX_BITS:
        fields = _unpack_words(b, bits).reshape(*packed.shape[:-1], groups * 8)
        return jnp.moveaxis(fields[..., :length], -1, axis)
    mask = jnp.uint8(2**bits - 1)
    values = []
    for i in range(8):  # value i starts at stream bit i*bits
        lo, shift = divmod(i * bits, 8)
        val = lax.shift_right_logical(b[..., lo], jnp.uint8(shift))
        if shift + bits > 8:  # straddles into the next byte
            val = val | lax.shift_left(b[..., lo + 1], jnp.uint8(8 - shift))
        values.append(val & mask)
    fields = jnp.stack(values, axis=-1).reshape(*packed.shape[:-1], groups * 8)
    return jnp.moveaxis(fields[..., :length], -1, axis)


@functools.partial(jax.jit, static_argnames=('bits', 'length', 'axis', 'signed'))
def split_bytes(packed: jnp.ndarray, bits: int, length: int, axis: int = -1, *, signed: bool = False
                ) -> jnp.ndarray:
    """:func:`unpack` for widths that divide 8, as one broadcast shift; optionally sign-extended.

    Same layout as :func:`unpack` (field ``i`` of a byte at bits ``[i*bits,
    (i+1)*bits)``). ``signed=False`` gives the uint8 fields; ``signed=True``
    gives them as ``bits``-wide two's-complement int8 values, sign-extended by
    moving each field to the top of the byte and shifting back arithmetically.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import packing
      >>> b = packing.pack(jnp.array([1, 15, 8], jnp.uint8), bits=4)
      >>> packing.split_bytes(b, 4, 3).tolist(), packing.split_bytes(b, 4, 3, signed=True).tolist()
      ([1, 15, 8], [1, -1, -8])
    """
    if bits not in (1, 2, 4):
        raise ValueError(f"split_bytes: bits must divide 8 (1, 2 or 4); got {bits!r}. Use unpack for other widths.")
    packed = jnp.asarray(packed)
    ndim = packed.ndim
    axis = axis % ndim
    per = 8 // bits
    if _native(bits, axis, ndim):  # see the module doc: XLA's sub-byte types, CPU only
        v = lax.bitcast_convert_type(packed, _SUBBYTE[bits, signed])  # (..., bytes, per): field i of each byte
        v = v.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :length]
        return v.astype(jnp.int8 if signed else jnp.uint8)
    b = jnp.expand_dims(packed, axis + 1)
    shifts = (np.arange(per) * bits).reshape([per if i == axis + 1 else 1 for i in range(ndim + 1)])
    if signed:
        up = lax.shift_left(b, jnp.asarray(8 - bits - shifts, jnp.uint8))
        v = lax.shift_right_arithmetic(lax.bitcast_convert_type(up, jnp.int8), jnp.int8(8 - bits))
    else:
        v = lax.shift_right_logical(b, jnp.asarray(shifts, jnp.uint8)) & jnp.uint8(2**bits - 1)
    shape = list(packed.shape)
    shape[axis] *= per
    return lax.slice_in_dim(v.reshape(shape), 0, length, axis=axis)


_SUBBYTE = {(4, True): jnp.int4, (4, False): jnp.uint4, (2, True): jnp.int2, (2, False): jnp.uint2}


def _native(bits: int, axis: int, ndim: int) -> bool:
    """Whether the native sub-byte path (module doc) serves ``bits``-wide fields packed along ``axis``."""
    return bits in (2, 4) and axis == ndim - 1 and jax.default_backend() == 'cpu'


@functools.partial(jax.jit, static_argnames=('bits', 'axis', 'signed'))
def pack_native(codes: jnp.ndarray, bits: int, axis: int = -1, *, signed: bool = False) -> jnp.ndarray:
    """Pack 2- or 4-bit values along ``axis``: the same bytes as :func:`pack`, the inverse of :func:`split_bytes`.

    ``codes``: unsigned fields in ``[0, 2**bits)`` (``signed=False``), or ``bits``-wide
    two's-complement values in ``[-2**(bits-1), 2**(bits-1))`` (``signed=True``, e.g. int4
    codes as int8), exactly what :func:`split_bytes` returns. Unlike :func:`pack` (whose
    4-bit words are a reduce, which ends a fusion), it is elementwise ops and bitcasts only,
    so under ``jit`` XLA fuses it into the producer of ``codes`` and cancels it against a
    :func:`split_bytes` of the result. Along the last axis on CPU: XLA's sub-byte types (module
    doc); elsewhere one shift and OR per field position over whole slices.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import packing
      >>> b = packing.pack_native(jnp.array([-8, -1, 7], jnp.int8), 4, signed=True)
      >>> b.tolist() == packing.pack(jnp.array([8, 15, 7], jnp.uint8), 4).tolist(), b.tolist()
      (True, [248, 7])
      >>> packing.split_bytes(b, 4, 3, signed=True).tolist()
      [-8, -1, 7]
    """
    if bits not in (2, 4):
        raise ValueError(f"pack_native: bits must be 2 or 4; got {bits!r}. Use pack for other widths.")
    codes = jnp.asarray(codes)
    if codes.ndim == 0:
        raise ValueError("pack_native needs an array with at least one axis; got a scalar.")
    axis = axis % codes.ndim
    per = 8 // bits
    n = codes.shape[axis]
    pad = [(0, (-n) % per if a == axis else 0) for a in range(codes.ndim)]
    if _native(bits, axis, codes.ndim):
        c = jnp.pad(codes.astype(_SUBBYTE[bits, signed]), pad)
        return lax.bitcast_convert_type(c.reshape(*c.shape[:-1], c.shape[-1] // per, per), jnp.uint8)
    f = lax.bitcast_convert_type(codes.astype(jnp.int8), jnp.uint8) if signed else codes.astype(jnp.uint8)
    f = jnp.pad(f & jnp.uint8(2**bits - 1), pad)
    shape = list(f.shape)
    f = f.reshape(shape[:axis] + [shape[axis] // per, per] + shape[axis + 1:])
    out = lax.index_in_dim(f, 0, axis + 1, keepdims=False)
    for i in range(1, per):
        out = out | lax.shift_left(lax.index_in_dim(f, i, axis + 1, keepdims=False), jnp.uint8(i * bits))
    return out
