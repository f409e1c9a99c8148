"""Saving and shipping quantized params: Orbax checkpoints and safetensors files.

Both keep every QArray bit-exact (values, scales, zero points) and store its
static data (format, tiles, packing, logical shape) next to the arrays; a load
checks that data against the target and raises :class:`CheckpointError`
naming the param on any mismatch — nothing is dequantized or reinterpreted.
Both also store a SHA-256 digest of every tensor (values, scales, zero points;
each shard of a sharded Orbax save too) and of the metadata, and a load checks
them unless ``verify=False``: a corrupt or edited checkpoint raises
:class:`CheckpointError` naming the param and part (or the file, for its
header). Checkpoints written before the digests load with a ``UserWarning``.
Needs the ``[checkpoint]`` extra.

:func:`load_gguf` reads llama.cpp's GGUF files: quantized tensors become QArrays
holding the file's own codes and scales (Q8_0, Q4_0/1, Q5_0/1, Q2_K..Q6_K,
MXFP4), with the metadata (hyperparameters, tokenizer) as Python values. It
needs no extra package.

Example:
  >>> import tempfile, os, jax.numpy as jnp, qarray
  >>> from qarray import io
  >>> params = {'dense': {'kernel': qarray.quantize(jnp.ones((4, 8)), 'int4'), 'bias': jnp.zeros(8)}}
  >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
  >>> io.save(path, params)
  >>> io.restore(path, params)['dense']['kernel'].shape
  (4, 8)
"""

from qarray.io._gguf import GGUFContents, load_gguf, read_gguf_metadata
from qarray.io._metadata import CheckpointError, describe
from qarray.io._orbax import read_metadata, restore, save
from qarray.io._safetensors import load_safetensors, read_safetensors_metadata, save_safetensors, tensor_names

__all__ = ['CheckpointError', 'describe', 'save', 'restore', 'read_metadata', 'save_safetensors',
           'load_safetensors', 'read_safetensors_metadata', 'tensor_names', 'load_gguf', 'read_gguf_metadata',
           'GGUFContents']
