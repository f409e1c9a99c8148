"""Microscaling formats: the shared block scales of mxfp8 / mxfp4 (OCP MX v1.0) and nvfp4 (NVIDIA).

**MX (spec mode, the default, ``calibration='absmax'``).** Per block of 32,
the shared exponent is ``X = floor(log2(max|block|)) - emax`` where ``emax``
is the element format's largest exponent (e2m1: 2, e4m3: 8), clamped to
E8M0's range [-127, 127]; elements are ``x / 2**X`` rounded half to even and
saturated at the element format's max (6 / 448). An all-zero block gets
``X = -127``; a block holding NaN or Inf gets the NaN scale (E8M0 0xFF), so
it dequantizes to NaN. The scale is stored as E8M0 (one byte:
``float8_e8m0fnu``).

**MX, better exponent (``calibration='mse'``).** The spec's exponent can leave
the top of the element range unused; per block, of the two candidates ``X``
and ``X + 1`` the one with the smaller squared error is kept (same storage,
same decoder: any E8M0 exponent is a valid MX block).

**nvfp4.** One float32 scale per tensor ``g = amax · fl(1 / (6 * 448))`` (within one ulp of the
recipe's ``amax / (6 * 448)``) over the
finite values (1 for an all-zero tensor), one E4M3 scale per block of 16:
``e4m3(amax_block / 6 / g)`` rounded half to even (saturating at 448), and
e2m1 elements ``x / (e4m3 · g)``. With ``calibration='mse'`` each block keeps
whichever of the two E4M3 values either side of ``amax_block / 6 / g`` gives
the smaller squared error (same storage, same decoder). The block scales are a QArray (E4M3 codes
under the float32 tensor scale) -- the same representation as double
quantization. A block whose E4M3 scale rounds to 0 holds zeros; a block with
NaN/Inf gets a NaN scale.

Example:
  >>> import jax, jax.numpy as jnp, qarray
  >>> q = qarray.quantize(jax.random.normal(jax.random.key(0), (4, 64)), 'mxfp4')
  >>> q.scale.dtype, q.scale.shape, 8 * q.nbytes / q.size
  (dtype(float8_e8m0fnu), (4, 2), 4.25)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qarray.qtypes import QType

__all__ = ['CALIBRATIONS', 'mx_groups', 'nvfp4_groups', 'element_emax']

CALIBRATIONS = ('absmax', 'mse')  # spec exponent; the better of two exponents per block


def element_emax(elem: QType) -> int:
    """The largest exponent of an element format: floor(log2(its max)) (e2m1: 2, e4m3: 8).

    Example:
      >>> from qarray import qtypes
      >>> from qarray._microscaling import element_emax
      >>> element_emax(qtypes.get('fp4')), element_emax(qtypes.get('fp8'))
      (2, 8)
    """
    return int(math.floor(math.log2(float(elem.qmax))))


def _amax(xv: jax.Array, reduce_axes: tuple[int, ...]) -> jax.Array:
    """max |x| per block; NaN for a block holding NaN or Inf (XLA's vectorised max may drop NaN)."""
    finite = jnp.all(jnp.isfinite(xv), axis=reduce_axes, keepdims=True)
    amax = jnp.max(jnp.abs(jnp.where(jnp.isfinite(xv), xv, 0)), axis=reduce_axes, keepdims=True)
    return jnp.where(finite, amax, jnp.nan)


def _elements(y: jax.Array, elem: QType) -> jax.Array:
    """Round half to even and saturate at the element format's max (its astype does not saturate)."""
    m = float(elem.qmax)
    return jnp.clip(y, -m, m).astype(elem.native_dtype)


def _pow2(e: jax.Array) -> jax.Array:
    """2**e (float32) for integer e in [-126, 127], exact."""
    return jax.lax.bitcast_convert_type(((e + 127) << 23).astype(jnp.int32), jnp.float32)


def mx_groups(xv: jax.Array, reduce_axes: tuple[int, ...], qt: QType, calibration: str
              ) -> tuple[jax.Array, jax.Array]:
    """``(element codes, E8M0 scale)`` of ``xv`` (blocks: its ``reduce_axes``), scale broadcastable to ``xv``.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import qtypes
      >>> from qarray._microscaling import mx_groups
      >>> c, s = mx_groups(jnp.array([[1.0, -3.0, 0.25, 6.0]]), (1,), qtypes.get('mxfp4'), 'absmax')
      >>> c.astype(jnp.float32).tolist(), s.astype(jnp.float32).tolist()   # floor(log2 6) - 2 = 0; 0.25: tie -> 0
      ([[1.0, -3.0, 0.0, 6.0]], [[1.0]])
    """
    elem = qt.element_type
    amax = _amax(xv, reduce_axes)
    _, e = jnp.frexp(jnp.where(amax > 0, amax, 1.0))  # amax = m * 2**e, m in [0.5, 1): floor(log2) = e - 1
    x_exp = jnp.clip(e - 1 - element_emax(elem), -127, 127)
    x_exp = jnp.where(amax > 0, x_exp, -127)
    xs = jnp.where(jnp.isfinite(xv), xv, 0.0)

    def codes_for(k):
        # x / 2**k as two exact power-of-two multiplies (2**-k alone can be subnormal for k near 127).
        half = k // 2
        return _elements(xs * _pow2(-half) * _pow2(-(k - half)), elem)

    codes = codes_for(x_exp)
    if calibration == 'mse':
        up = jnp.minimum(x_exp + 1, 127)
        codes_up = codes_for(up)

        def err(c, k):
            d = c.astype(jnp.float32) * _pow2(k // 2) * _pow2(k - k // 2) - xs
            return jnp.sum(d * d, axis=reduce_axes, keepdims=True)

        better = err(codes_up, up) < err(codes, x_exp)
        x_exp = jnp.where(better, up, x_exp)
        codes = jnp.where(better, codes_up, codes)
    bits = jnp.where(jnp.isfinite(amax), x_exp + 127, 255).astype(jnp.uint8)
    return codes, jax.lax.bitcast_convert_type(bits, jnp.float8_e8m0fnu)


def nvfp4_groups(xv: jax.Array, reduce_axes: tuple[int, ...], qt: QType, calibration: str = 'absmax'
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(e2m1 codes, E4M3 block-scale codes, float32 tensor scale)``; the block scales broadcast to ``xv``,
    the tensor scale is one value (shape of all ones). ``calibration='mse'``: per block, of the two E4M3
    values either side of ``amax_block / 6 / g`` the one with the smaller squared error.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import qtypes
      >>> from qarray._microscaling import nvfp4_groups
      >>> c, s, g = nvfp4_groups(jnp.array([[6.0, -3.0, 1.0, 0.0]]), (1,), qtypes.get('nvfp4'))
      >>> c.astype(jnp.float32).tolist(), float(s.astype(jnp.float32)[0, 0] * g[0, 0])
      ([[6.0, -3.0, 1.0, 0.0]], 1.0)
    """
    elem = qt.element_type
    amax = _amax(xv, reduce_axes)
    finite = jnp.isfinite(amax)
    tensor_amax = jnp.max(jnp.where(finite, amax, 0.0), keepdims=True)
    # amax * fl(1 / 2688): XLA rewrites a division by a constant into this multiply anyway (within 1 ulp)
    g = jnp.where(tensor_amax > 0, tensor_amax * np.float32(1.0 / (6.0 * 448.0)), np.float32(1.0))
    g = g.reshape((1,) * xv.ndim).astype(jnp.float32)
    block = jnp.clip(jnp.where(finite, amax, 0.0) * np.float32(1.0 / 6.0) / g, 0.0, 448.0)
    s8 = jnp.where(finite, block, jnp.nan).astype(jnp.float8_e4m3fn)
    xs = jnp.where(jnp.isfinite(xv), xv, 0.0)

    def codes_for(s8):
        s = s8.astype(jnp.float32) * g
        return _elements(jnp.where(s > 0, xs / jnp.where(s > 0, s, 1.0), 0.0), elem), s

    codes, s = codes_for(s8)
    if calibration == 'mse':
        # The E4M3 neighbour on the other side of the exact block scale (positive E4M3 bit patterns are
        # ordered like their values; 0x7E is 448, the largest finite).
        bits = jax.lax.bitcast_convert_type(s8, jnp.uint8).astype(jnp.int32)
        step = jnp.where(s8.astype(jnp.float32) < block, 1, -1)
        other = jax.lax.bitcast_convert_type(jnp.clip(bits + step, 0, 0x7E).astype(jnp.uint8), jnp.float8_e4m3fn)
        other = jnp.where(finite, other, s8)
        codes_o, s_o = codes_for(other)

        def err(c, s):
            d = c.astype(jnp.float32) * s - xs
            return jnp.sum(d * d, axis=reduce_axes, keepdims=True)

        better = err(codes_o, s_o) < err(codes, s)
        s8, codes = jnp.where(better, other, s8), jnp.where(better, codes_o, codes)
    return codes, s8, g
