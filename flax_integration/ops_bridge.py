"""Where intercepted ops are computed, and the unpatched jax functions.

Quantized operands go to ``qarray.ops`` (re-exported here as ``dot_general``,
``einsum``, ``conv_general_dilated``). ``ORIGINAL`` keeps the jax functions as
they were when this module was first imported, so the interception layer can
always reach them while the public names are swapped.

Example:
  >>> import jax.numpy as jnp, qarray
  >>> w = qarray.quantize(jnp.eye(2), 'int8', channelwise_axes=(1,))
  >>> dot_general(jnp.ones((1, 2)), w, (((1,), (0,)), ((), ()))).shape
  (1, 2)
"""

from __future__ import annotations

import jax

from qarray.ops import conv_general_dilated, dot_general, einsum

__all__ = ['ORIGINAL', 'dot_general', 'einsum', 'conv_general_dilated']

ORIGINAL = {
    'dot_general': jax.lax.dot_general,
    'conv_general_dilated': jax.lax.conv_general_dilated,
    'einsum': jax.numpy.einsum,
    'dot': jax.numpy.dot,
    'matmul': jax.numpy.matmul,
}
