"""``dot`` and ``matmul`` with ``jnp`` semantics, on top of :func:`dot_general`.

``matmul``: a 1-D operand contracts directly (jnp's promote-then-squeeze); for
N-D operands the leading (batch) axes broadcast. A QArray is never broadcast
in memory: if its batch axes would need broadcasting it is dequantized first
(a rare case; equal batch shapes and 2-D weights stay quantized). ``dot``: contracts the last axis of
``a`` with the second-to-last of ``b`` (the only axis when ``b`` is 1-D), no
batch axes, exactly ``jnp.dot``.

Example:
  >>> import jax.numpy as jnp, qarray
  >>> w = qarray.quantize(jnp.ones((8, 3)), 'int8')
  >>> qarray.ops.matmul(jnp.ones((5, 2, 8)), w).shape, qarray.ops.dot(jnp.ones(8), w).shape
  ((5, 2, 3), (3,))
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from qarray import _quantize
from qarray._array import QArray
from qarray.ops.dot_general import dot_general
from qarray.ops._operands import check_operand, describe

__all__ = ['dot', 'matmul']


def matmul(a: Any, b: Any, *, precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    """``jnp.matmul`` where either operand may be a QArray.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> qarray.ops.matmul(qarray.quantize(jnp.eye(2), 'int8'), jnp.ones((2, 1))).shape
      (2, 1)
    """
    a, b = check_operand(a, 'a'), check_operand(b, 'b')
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: operands must be at least 1-D (use * for scalars); a: {describe(a)}, "
                         f"b: {describe(b)}.")
    k_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if a.shape[-1] != k_b:
        raise ValueError(f"matmul: contracting sizes differ: a's last axis has {a.shape[-1]}, b's second-to-last "
                         f"has {k_b}. a: {describe(a)}, b: {describe(b)}.")
    if a.ndim == 1 or b.ndim == 1:  # a vector side adds no batch axes: a plain contraction has jnp's shape
        return dot_general(a, b, (((a.ndim - 1,), (max(b.ndim - 2, 0),)), ((), ())), precision,
                           preferred_element_type)
    if b.ndim == 2:  # the common x[..., K] @ w[K, N]: no batch axes at all
        out = dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), precision, preferred_element_type)
    elif a.ndim == 2:  # a[M, K] @ b[..., K, N] -> [M, ..., N] -> move M into place
        out = dot_general(a, b, (((1,), (b.ndim - 2,)), ((), ())), precision, preferred_element_type)
        out = jnp.moveaxis(out, 0, -2)
    else:
        batch = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a, b = _broadcast(a, batch), _broadcast(b, batch)
        nb = len(batch)
        out = dot_general(a, b, (((nb + 1,), (nb,)), (tuple(range(nb)), tuple(range(nb)))), precision,
                          preferred_element_type)
    return out


def _broadcast(x: Any, batch: tuple[int, ...]) -> Any:
    """Give ``x`` the leading shape ``batch``; a QArray that would need copies is dequantized instead."""
    target = tuple(batch) + tuple(x.shape[-2:])
    if tuple(x.shape) == target:
        return x
    if isinstance(x, QArray):
        x = _quantize.dequantize(x)
    return jnp.broadcast_to(x, target)


def dot(a: Any, b: Any, *, precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    """``jnp.dot`` where either operand may be a QArray.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> qarray.ops.dot(jnp.ones((2, 4)), qarray.quantize(jnp.ones((3, 4, 5)), 'int8')).shape
      (2, 3, 5)
    """
    a, b = check_operand(a, 'a'), check_operand(b, 'b')
    if a.ndim == 0 or b.ndim == 0:
        da = _quantize.dequantize(a) if isinstance(a, QArray) else a
        db = _quantize.dequantize(b) if isinstance(b, QArray) else b
        out = jnp.multiply(da, db)
        return out if preferred_element_type is None else out.astype(preferred_element_type)
    rc = 0 if b.ndim == 1 else b.ndim - 2
    if a.shape[-1] != b.shape[rc]:
        raise ValueError(f"dot: contracting sizes differ: a's last axis has {a.shape[-1]}, b's axis {rc} has "
                         f"{b.shape[rc]}. a: {describe(a)}, b: {describe(b)}.")
    return dot_general(a, b, (((a.ndim - 1,), (rc,)), ((), ())), precision, preferred_element_type)
