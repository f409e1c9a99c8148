"""What the ops need to know about one operand: its values, codes and scales.

An operand is a plain array or a :class:`~qarray._array.QArray`. This module
gives the ops layer a QArray's integer codes ready for an int8 dot, its values
with or without the scale applied, a one-line description of its layout for error messages, and the
output dtype rule shared by every op.

Example:
  >>> import jax.numpy as jnp, qarray
  >>> from qarray.ops._operands import int_codes
  >>> q = qarray.quantize(jnp.arange(8.).reshape(2, 4), 'int4')
  >>> int_codes(q)[0].dtype
  dtype('int8')
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qarray import _layout, _numerics, _quantize
from qarray._array import QArray

__all__ = ['describe', 'check_operand', 'plain_scales', 'float_dtype', 'result_dtype', 'int_codes',
           'values', 'scale_is_shared', 'is_exact_in']


def describe(x: Any) -> str:
    """One-line layout of an operand, for error messages.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from qarray.ops._operands import describe
      >>> describe(qarray.quantize(jnp.ones((4, 8)), 'int8', channelwise_axes=(1,)))
      'QArray(int8, shape=(4, 8), scale=(1, 8), channelwise_axes=(1,))'
    """
    if isinstance(x, QArray):
        parts = [x.qtype.name, f"shape={tuple(x.shape)}", f"scale={tuple(x.scale.shape)}"]
        if x.channelwise_axes:
            parts.append(f"channelwise_axes={x.channelwise_axes}")
        if x.tiles:
            parts.append(f"tiles={x.tiles}")
        if x.zero_point is not None:
            parts.append("zero_point")
        return f"QArray({', '.join(parts)})"
    return f"array({jnp.dtype(x.dtype).name}, shape={tuple(x.shape)})"


def check_operand(x: Any, name: str) -> Any:
    """Return ``x`` as a QArray or a jax array; ``TypeError`` for anything else.

    Example:
      >>> from qarray.ops._operands import check_operand
      >>> check_operand([1., 2.], 'lhs').shape
      (2,)
    """
    if isinstance(x, QArray):
        return x
    try:
        arr = jnp.asarray(x)
    except TypeError:
        raise TypeError(f"{name} must be an array or a QArray; got {type(x).__name__}.") from None
    if jnp.issubdtype(arr.dtype, jnp.complexfloating):
        raise TypeError(f"{name} has complex dtype {arr.dtype}; quantized ops take real arrays "
                        "(floating, integer or bool) and QArrays.")
    return arr


def float_dtype(x: Any) -> np.dtype:
    """The float dtype an operand contributes (``QArray.dtype``; ints and bools count as float32).

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.ops._operands import float_dtype
      >>> float_dtype(jnp.ones(2, jnp.int8))
      dtype('float32')
    """
    dt = jnp.dtype(x.dtype)
    return dt if jnp.issubdtype(dt, jnp.floating) else jnp.dtype(jnp.float32)


def result_dtype(lhs: Any, rhs: Any, preferred_element_type: Any) -> np.dtype:
    """Output dtype: ``preferred_element_type``, else the result type of both float dtypes.

    Raises ``TypeError`` when a QArray operand meets a non-float preferred type.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.ops._operands import result_dtype
      >>> result_dtype(jnp.ones(2, jnp.bfloat16), jnp.ones(2), None)
      dtype('float32')
    """
    if preferred_element_type is not None:
        pet = jnp.dtype(preferred_element_type)
        if not jnp.issubdtype(pet, jnp.floating):
            raise TypeError(
                f"preferred_element_type must be a floating dtype (float32, bfloat16, float16, float64) "
                f"when an operand is a QArray; got {pet}. lhs: {describe(lhs)}, rhs: {describe(rhs)}.")
        return pet
    return jnp.dtype(jnp.result_type(float_dtype(lhs), float_dtype(rhs)))


def int_codes(q: QArray) -> tuple[jax.Array, jax.Array | None]:
    """int8 codes and int32 zero point of an integer QArray, ready for an int8 dot.

    uint8 codes (0..255) do not fit int8, so both codes and zero point move
    down by 128; ``codes - zero_point`` is unchanged.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from qarray.ops._operands import int_codes
      >>> q = qarray.quantize(jnp.array([0., 255.]), 'uint8', calibration='minmax')
      >>> c, z = int_codes(q)
      >>> c.dtype, (c.astype(int) - z).tolist() == (q.qvalue.astype(int) - q.zero_point).tolist()
      (dtype('int8'), True)
    """
    c = _quantize.codes(q)
    zp = None if q.zero_point is None else q.zero_point.astype(jnp.int32)
    if q.qtype.kind == 'uint' and q.qtype.bits == 8:
        c = (c.astype(jnp.int32) - 128).astype(jnp.int8)
        zp = zp - 128
    return c.astype(jnp.int8), zp


def plain_scales(q: QArray) -> bool:
    """Whether ``q``'s scales are a plain array tiling its axes evenly and its zero point (if any) integer
    codes -- what the integer / fp8 dots and the GPU kernels take; quantized scales (double quantization,
    nvfp4, GGUF K-quants), value-space offsets and partial last tiles go through the dequantizing path.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from qarray.ops._operands import plain_scales
      >>> plain_scales(qarray.quantize(jnp.ones((4, 64)), 'int8')), plain_scales(qarray.quantize(jnp.ones((4, 64)), 'nvfp4'))
      (True, False)
    """
    zp = q.zero_point
    return not q.tile_sizes and not isinstance(q.scale, QArray) and (
        zp is None or (not isinstance(zp, QArray) and jnp.issubdtype(zp.dtype, jnp.integer)))


def scale_is_shared(q: QArray, axes: Any) -> bool:
    """True when ``q``'s scale (and zero point) is one value along every axis in ``axes``.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from qarray.ops._operands import scale_is_shared
      >>> scale_is_shared(qarray.quantize(jnp.ones((4, 8)), 'int8', channelwise_axes=(1,)), (0,))
      True
    """
    return all(q.scale.shape[a] == 1 for a in axes)


def is_exact_in(q: QArray, dtype: Any) -> bool:
    """Whether every unscaled value (``code - zero_point`` or a code-book level) is exact in ``dtype``.

    Integer values are at most 255 in magnitude and fp8 values fit any float
    of 16 bits or more; nf4 levels need float32.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from qarray.ops._operands import is_exact_in
      >>> is_exact_in(qarray.quantize(jnp.ones(4), 'nf4'), jnp.bfloat16)
      False
    """
    dt = jnp.dtype(dtype)
    if q.qtype.kind == 'codebook':
        return dt.itemsize >= 4
    return dt.itemsize >= 2


def values(q: QArray, dtype: Any, *, scaled: bool = True) -> jax.Array:
    """``q``'s values in ``dtype``: dequantized (``scaled=True``) or ``code - zero_point`` / level.

    With ``scaled=True`` this is :func:`qarray.dequantize`.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from qarray.ops._operands import values
      >>> q = qarray.quantize(jnp.array([1., -2.]), 'int8')
      >>> values(q, jnp.float32, scaled=False).tolist()
      [64.0, -127.0]
    """
    dtype = jnp.dtype(dtype)
    if scaled:  # the one dequantization (incl. the clip to a narrow dtype's finite range)
        return _quantize.dequantize(q, dtype)
    vshape, sshape = _layout.tiled_view(q.shape, q.scale.shape)
    zp = None if q.zero_point is None else q.zero_point.reshape(sshape)
    v = _numerics.unscaled_values(_quantize.codes(q).reshape(vshape), zp, q.qtype)
    return v.astype(dtype).reshape(q.shape)
