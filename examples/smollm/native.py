"""The model as shipped: its params are the GGUF file's own codes and scales, computed through qarray's ops.

:func:`load_native` reads the file with :func:`qarray.io.load_gguf` (``Q8_0``
embedding table: int8 codes with a float16 scale per 32 values; ``Q4_1``
matrices: uint4 codes with a float16 scale and a float16 value-space min per 32
values; float32 norms) and puts those QArrays, untouched except for the
transpose to ``(in, out)`` kernels, into a ``flax_integration`` PTQ model:

1. the abstract PTQ model (``nnx.eval_shape`` of ``quantize_model(SmolLM(cfg),
   PtqProvider(native_rules()), x)``): nothing is computed, every matrix and the
   embedding table is a :class:`~flax_integration.QuantizedParam` slot;
2. each slot gets the file's QArray (``QuantizedParam(array=...)``, leaves boxed
   in ``nnx.Param`` as the PTQ provider stores them), each norm its float32 scale.

The model then runs weight-only: each linear layer is ``qarray.dot_general`` of
float activations with the uint4 QArray (dequantized inside the jitted
program, tile by tile), the lookup is ``qarray.take`` of the int8 table (only
the gathered rows are dequantized), and the tied head (``Embed.attend``) is the
quantized matmul with the same int8 table. ``qarray.dequantize`` of every
loaded tensor equals ``gguf``'s float32 dequantization exactly, so the only
difference from the float reference (:func:`examples.smollm.weights.load`) is
where float32 rounding happens inside each dot.

Example:
  >>> from examples.smollm.native import native_rules
  >>> [r.module_path for r in native_rules()]
  ['layers/\\\\d+/(attn|mlp)/\\\\w+_proj', 'embed']
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples.smollm import gguf_file, weights
from examples.smollm.model import SmolLM, SmolLMConfig
from examples.smollm.tokenizer import Tokenizer, build_tokenizer

__all__ = ['LINEAR_PATHS', 'EMBED_PATH', 'native_rules', 'abstract_ptq_model', 'load_native']

#: The 210 linear layers (module paths as rules see them: '/'-joined).
LINEAR_PATHS = r'layers/\d+/(attn|mlp)/\w+_proj'
#: The embedding table (also the tied output head).
EMBED_PATH = 'embed'


def native_rules() -> list[Any]:
    """The ``flax_integration`` rules whose slots the file's tensors fill: Q4_1 linear, Q8_0 embedding, weight-only.

    (The formats named here only shape the abstract slots; :func:`load_native`
    replaces each slot with the file's own QArray.)

    Example:
      >>> from examples.smollm.native import native_rules
      >>> [(r.weight_qtype, r.tile_size, r.act_qtype) for r in native_rules()]
      [('uint4', 32, None), ('int8', 32, None)]
    """
    import flax_integration as fi
    return [fi.QuantizationRule(module_path=LINEAR_PATHS, weight_qtype='uint4', tile_size=32,
                                weight_calibration_method='minmax'),
            fi.QuantizationRule(module_path=EMBED_PATH, weight_qtype='int8', tile_size=32)]


def abstract_ptq_model(cfg: SmolLMConfig, rules: list[Any], provider: Any = None) -> nnx.Module:
    """``quantize_model(SmolLM(cfg), provider or PtqProvider(rules), tokens)`` under ``nnx.eval_shape``.

    Every param is a ``jax.ShapeDtypeStruct`` (nothing allocated or computed);
    fill it with ``flax_integration.quantize_params(float_model, abstract)`` or,
    as :func:`load_native` does, with ready QArrays.

    Example:
      >>> from examples.smollm.model import SmolLMConfig
      >>> from examples.smollm.native import abstract_ptq_model, native_rules
      >>> m = abstract_ptq_model(SmolLMConfig.tiny(layers=1), native_rules())
      >>> type(m.layers[0].mlp.up_proj.kernel).__name__, m.layers[0].mlp.up_proj.kernel.array.qvalue.shape
      ('QuantizedParam', (32, 24))
    """
    import flax_integration as fi
    provider = provider if provider is not None else fi.PtqProvider(rules)
    sample = jnp.zeros((1, 2), jnp.int32)
    return nnx.eval_shape(lambda: fi.quantize_model(SmolLM(cfg, rngs=nnx.Rngs(0)), provider, sample))


def _transpose(a: Any) -> Any:
    return a.T if hasattr(a, 'qvalue') else np.ascontiguousarray(np.asarray(a).T)


def load_native(path: str | pathlib.Path | None = None) -> tuple[nnx.Module, nnx.State, Tokenizer]:
    """``(model, params, tokenizer)`` with the file's QArrays as params (see the module docstring).

    ``model`` is the (abstract-initialised) PTQ model holding the params;
    ``params`` is ``nnx.state(model)``, to pass with ``model`` to
    :func:`~examples.smollm.evaluate.perplexity` or
    :func:`~examples.smollm.decoding.generate`.

    Example:
      >>> from examples.smollm.native import load_native
      >>> model, params, tok = load_native()  # doctest: +SKIP
      >>> model.layers[0].attn.q_proj.kernel.array.qtype.name  # doctest: +SKIP
      'uint4'
    """
    import flax_integration as fi
    from qarray.io import load_gguf
    contents = load_gguf(str(path or gguf_file.gguf_path()))
    cfg = SmolLMConfig.from_metadata(contents.metadata)
    tokenizer = build_tokenizer(contents.metadata)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, llama.vocab_size is {cfg.vocab_size}")
    by_path = weights.gguf_to_params(contents.tensors, cfg, transpose=_transpose)
    model = abstract_ptq_model(cfg, native_rules())
    for mpath, module in nnx.iter_modules(model):
        for name, value in list(vars(module).items()):
            key = tuple(mpath) + (name,)
            if isinstance(value, fi.QuantizedParam):
                q = jax.tree.map(jnp.asarray, by_path.pop(key))
                if tuple(q.shape) != tuple(value.shape):
                    raise ValueError(f"{'/'.join(map(str, key))}: file shape {q.shape}, model slot {value.shape}")
                setattr(module, name, fi.QuantizedParam(jax.tree.map(nnx.Param, q), calibration='gguf'))
            elif isinstance(value, nnx.Param):
                a = np.asarray(by_path.pop(key), np.float32)
                if a.shape != tuple(value.shape):
                    raise ValueError(f"{'/'.join(map(str, key))}: file shape {a.shape}, model {value.shape}")
                value.set_value(jnp.asarray(a))
    if by_path:
        raise ValueError(f"tensors with no slot in the model: {sorted(by_path)[:5]}")
    return model, nnx.state(model), tokenizer
