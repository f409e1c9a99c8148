"""Quantized ops: ``dot_general``, ``einsum``, ``dot``, ``matmul``, ``conv_general_dilated``, ``ragged_dot``
(mixture of experts) and ``take`` (embedding lookups).

Drop-in for ``jax.lax`` / ``jnp``: either operand may be a plain array or a
QArray of any format; results are plain arrays. The path (integer, fp8 or
float/weight-only) is chosen automatically from the formats and layouts; see
:mod:`qarray.ops.dot_general` for the rules. GPU kernels plug in through
:func:`register_kernel`.

Example:
  >>> import jax, jax.numpy as jnp, qarray
  >>> x = qarray.quantize(jnp.ones((2, 8)), 'int8', channelwise_axes=(0,))
  >>> w = qarray.quantize(jnp.ones((8, 4)), 'int4', channelwise_axes=(1,))
  >>> qarray.ops.matmul(x, w).shape
  (2, 4)
"""

from qarray.ops.conv import conv_general_dilated
from qarray.ops.dot_general import choose_path, dot_general
from qarray.ops.einsum import einsum
from qarray.ops.matmul import dot, matmul
from qarray.ops.ragged_dot import ragged_dot, ragged_dot_general
from qarray.ops.take import take
from qarray.ops.qt_dot import BackwardQuant, ForwardQuant, qt_dot_general, quantized_training_op
from qarray.ops._registry import register_kernel, registered_kernels, unregister_kernel

__all__ = ['dot_general', 'einsum', 'dot', 'matmul', 'conv_general_dilated', 'ragged_dot', 'ragged_dot_general',
           'take', 'choose_path', 'qt_dot_general', 'quantized_training_op', 'ForwardQuant', 'BackwardQuant',
           'register_kernel', 'unregister_kernel', 'registered_kernels']
