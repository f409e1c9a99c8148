"""Microscaling x microscaling dots through ``jax.nn.scaled_matmul`` where the backend has it.

``jax.nn.scaled_matmul(a[B, M, K], b[B, N, K], a_scales[B, M, K/bs], b_scales[B, N, K/bs])`` multiplies
block-scaled operands natively (cuDNN on recent NVIDIA GPUs: mxfp8 with E8M0 scales per 32, nvfp4 with
E4M3 scales per 16). It has no CPU lowering, and its cuDNN path needs hardware support, so
:func:`supported` asks the backend once per (backend, element dtype, scale dtype) by compiling a tiny
call, and ``dot_general`` falls back to the dequantizing path everywhere else.

nvfp4 operands carry a second scale level (one float32 per tensor): it multiplies the output.

Example:
  >>> import jax
  >>> from qarray.ops._block_scaled import supported
  >>> jax.default_backend() != 'cpu' or not supported('float8_e4m3fn', 'float8_e8m0fnu')  # no CPU lowering
  True
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from qarray import _quantize
from qarray._array import QArray
from qarray.ops import _dims

__all__ = ['supported', 'applies', 'block_scaled_dot']


@functools.lru_cache(maxsize=None)
def _probe(backend: str, elem: str, scale: str, block: int) -> bool:
    a = jax.ShapeDtypeStruct((1, 16, 2 * block), jnp.dtype(elem))
    s = jax.ShapeDtypeStruct((1, 16, 2), jnp.dtype(scale))
    try:
        jax.jit(jax.nn.scaled_matmul).lower(a, a, s, s).compile()
    except Exception:  # no lowering for this backend, or the library refuses these dtypes: use the fallback
        return False
    return True


def supported(elem: Any, scale: Any, block: int = 32) -> bool:
    """Whether this backend compiles ``jax.nn.scaled_matmul`` for these element / scale dtypes (cached).

    Example:
      >>> from qarray.ops._block_scaled import supported
      >>> isinstance(supported('float4_e2m1fn', 'float8_e4m3fn', 16), bool)
      True
    """
    return _probe(jax.default_backend(), jnp.dtype(elem).name, jnp.dtype(scale).name, int(block))


def applies(lhs: QArray, rhs: QArray, dn: Any) -> bool:
    """Both operands are the same microscaling format, blocked along their one contracting axis, and the
    backend has a native block-scaled dot for them.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from qarray.ops._block_scaled import applies
      >>> a = qarray.quantize(jnp.ones((4, 64)), 'mxfp8')
      >>> applies(a, a, (((1,), (1,)), ((), ()))) == __import__('qarray').ops._block_scaled.supported(
      ...     'float8_e4m3fn', 'float8_e8m0fnu')
      True
    """
    (lc, rc), (lb, rb) = dn
    qa, qb = lhs.qtype, rhs.qtype
    if not (qa.microscaling and qa == qb and len(lc) == 1 and len(rc) == 1):
        return False
    if lhs.tiles != {lc[0]: qa.block} or rhs.tiles != {rc[0]: qb.block}:
        return False
    scale_dtype = 'float8_e8m0fnu' if qa.scale_format == 'e8m0' else 'float8_e4m3fn'
    return supported(qa.element_type.native_dtype, scale_dtype, qa.block)


def _canonical(q: QArray, batch, contract, free) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """[B, rows, K] element codes and [B, rows, K/block] block scales (and the nvfp4 tensor scale)."""
    order = tuple(batch) + tuple(free) + tuple(contract)
    codes = jnp.transpose(_quantize.codes(q), order)
    scale, tensor_scale = q.scale, None
    if isinstance(scale, QArray):  # nvfp4: E4M3 block scales under one float32 per tensor
        tensor_scale = scale.scale.astype(jnp.float32).reshape(())
        scale = scale.qvalue
    scale = jnp.transpose(scale, order)
    nb = math.prod(codes.shape[:len(batch)])
    codes = codes.reshape((nb, -1, codes.shape[-1]))
    scale = scale.reshape((nb, codes.shape[1], scale.shape[-1]))
    return codes, scale, tensor_scale


def block_scaled_dot(lhs: QArray, rhs: QArray, dn: Any, out_dtype: Any) -> jax.Array:
    """``dot_general`` of two microscaling QArrays via ``jax.nn.scaled_matmul`` (see :func:`applies`).

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> from qarray.ops._block_scaled import applies, block_scaled_dot
      >>> a = qarray.quantize(jnp.ones((4, 64)), 'mxfp8')
      >>> dn = (((1,), (1,)), ((), ()))
      >>> applies(a, a, dn) or jax.default_backend() != 'gpu'   # (no CPU lowering)
      True
    """
    (lc, rc), (lb, rb) = dn
    lf = _dims.free_axes(lhs.ndim, lc, lb)
    rf = _dims.free_axes(rhs.ndim, rc, rb)
    a, sa, ga = _canonical(lhs, lb, lc, lf)
    b, sb, gb = _canonical(rhs, rb, rc, rf)
    out = jax.nn.scaled_matmul(a, b, sa, sb, preferred_element_type=jnp.float32)
    if ga is not None:
        out = out * (ga * gb)
    shape = [lhs.shape[i] for i in lb] + [lhs.shape[i] for i in lf] + [rhs.shape[i] for i in rf]
    return out.reshape(shape).astype(out_dtype)
