"""qarray: quantization for JAX.

Example:
  >>> import jax, qarray
  >>> w = jax.random.normal(jax.random.key(0), (128, 256))
  >>> q = qarray.quantize(w, 'nf4', tiles=64)
  >>> qarray.dequantize(q).shape
  (128, 256)
"""

from qarray import calibration, gptq, io, ops, packing, paths, qtypes, rotation, sharding
from qarray._array import QArray
from qarray._fake_quant import fake_quant, fake_quant_with_scale
from qarray._quantize import codes, dequantize, quantize, quantize_with_scale, repack
from qarray.ops import conv_general_dilated, dot, dot_general, einsum, matmul, ragged_dot, take
from qarray.qtypes import QType
from qarray import kv_cache, optim  # after the names above: both use them (optim imports optax only when used)

__all__ = ['QArray', 'QType', 'quantize', 'quantize_with_scale', 'dequantize', 'fake_quant', 'fake_quant_with_scale', 'codes', 'repack',
           'calibration', 'packing', 'qtypes', 'io', 'sharding', 'paths',
           'rotation', 'gptq', 'kv_cache', 'optim',
           'ops', 'dot_general', 'einsum', 'dot', 'matmul', 'conv_general_dilated', 'ragged_dot', 'take']
__version__ = '0.1.0'
