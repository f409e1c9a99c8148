"""Where intercepted ops are computed: ``qarray.ops`` (the quantized ops).

``ORIGINAL`` keeps the unpatched jax functions, captured when this module is
first imported, so the interception layer can always reach them.

Until ``qarray.ops`` exists (it is built in parallel), a private fallback
dequantizes QArray operands and calls the float op; it is numerically the
weight-only path and is only used when ``qarray.ops`` cannot be imported.

Example:
  >>> import jax.numpy as jnp, qarray
  >>> w = qarray.quantize(jnp.eye(2), 'int8', channelwise_axes=(1,))
  >>> dot_general(jnp.ones((1, 2)), w, (((1,), (0,)), ((), ()))).shape
  (1, 2)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from qarray.core import QArray

__all__ = ['ORIGINAL', 'dot_general', 'einsum', 'conv_general_dilated', 'using_fallback']

ORIGINAL = {
    'dot_general': jax.lax.dot_general,
    'conv_general_dilated': jax.lax.conv_general_dilated,
    'einsum': jax.numpy.einsum,
    'dot': jax.numpy.dot,
    'matmul': jax.numpy.matmul,
}


def _ops():
    try:
        from qarray import ops
    except ImportError:
        return None
    return ops if hasattr(ops, 'dot_general') else None


def using_fallback() -> bool:
    """True while ``qarray.ops`` is unavailable and the dequantizing fallback is used."""
    return _ops() is None


def _deq(x: Any) -> Any:
    return x.__jax_array__() if isinstance(x, QArray) else x


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None) -> jax.Array:
    """``qarray.ops.dot_general`` (arrays or QArrays on either side)."""
    ops = _ops()
    if ops is not None:
        return ops.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
    return ORIGINAL['dot_general'](_deq(lhs), _deq(rhs), dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)


def einsum(subscripts, lhs, rhs, precision=None, preferred_element_type=None) -> jax.Array:
    """``qarray.ops.einsum`` with two operands."""
    ops = _ops()
    if ops is not None:
        return ops.einsum(subscripts, lhs, rhs, precision=precision,
                          preferred_element_type=preferred_element_type)
    return ORIGINAL['einsum'](subscripts, _deq(lhs), _deq(rhs), precision=precision,
                              preferred_element_type=preferred_element_type)


def conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs) -> jax.Array:
    """``qarray.ops.conv_general_dilated``."""
    ops = _ops()
    if ops is not None:
        return ops.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    return ORIGINAL['conv_general_dilated'](_deq(lhs), _deq(rhs), window_strides, padding, **kwargs)
