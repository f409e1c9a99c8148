"""Bit packing: unsigned B-bit fields <-> dense ``uint8`` bytes.

Layout: along the packed axis, value ``i`` occupies stream bits
``[i*B, (i+1)*B)``, little-endian (bit 0 of byte 0 first). Every group of 8
values fills exactly ``B`` bytes, so one code path serves every width; the
last group is zero padded and the byte stream is cut to ``ceil(N*B/8)``.
All loops below run over the 8-value bit pattern, never over elements, so
XLA sees a handful of shifts and ORs it can fuse into the consumer.

Example:
  >>> import jax.numpy as jnp
  >>> b = pack(jnp.array([1, 2, 3], jnp.uint8), bits=3)
  >>> b.shape, unpack(b, bits=3, length=3).tolist()
  ((2,), [1, 2, 3])
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

__all__ = ['packed_length', 'pack', 'unpack']


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 7:
        raise ValueError(f"bits must be an int in 1..7 (8-bit formats are stored natively); got {bits!r}.")


def packed_length(length: int, bits: int) -> int:
    """Bytes needed for ``length`` fields of ``bits`` bits: ``ceil(length*bits/8)``.

    Example:
      >>> packed_length(10, 3)
      4
    """
    _check_bits(bits)
    return -(-length * bits // 8)


def _pad_last(x: jnp.ndarray, size: int) -> jnp.ndarray:
    extra = size - x.shape[-1]
    if extra == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def pack(fields: jnp.ndarray, bits: int, axis: int = -1) -> jnp.ndarray:
    """Pack unsigned ``bits``-wide fields (values < 2**bits) along ``axis`` into uint8.

    Example:
      >>> import jax.numpy as jnp
      >>> pack(jnp.array([[1, 0, 1, 1]], jnp.uint8), bits=1).tolist()
      [[13]]
    """
    _check_bits(bits)
    fields = jnp.moveaxis(jnp.asarray(fields).astype(jnp.uint8), axis, -1)
    n = fields.shape[-1]
    groups = -(-n // 8)
    v = _pad_last(fields, groups * 8).reshape(*fields.shape[:-1], groups, 8)
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


def unpack(packed: jnp.ndarray, bits: int, length: int, axis: int = -1) -> jnp.ndarray:
    """Inverse of :func:`pack`: ``length`` uint8 fields along ``axis``.

    Example:
      >>> import jax.numpy as jnp
      >>> unpack(jnp.array([13], jnp.uint8), bits=1, length=4).tolist()
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
