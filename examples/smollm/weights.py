"""GGUF tensor names -> :class:`~examples.smollm.model.SmolLM` params, and :func:`load` (model, params, tokenizer).

GGUF (llama.cpp) names and layouts::

    token_embd.weight        (vocab, hidden)     -> embed.embedding            (as is; also the tied output head)
    blk.N.attn_norm.weight   (hidden,)           -> layers.N.attn_norm.scale
    blk.N.attn_q.weight      (heads*d, hidden)   -> layers.N.attn.q_proj.kernel   (transposed to (in, out))
    blk.N.attn_k.weight      (kv*d, hidden)      -> layers.N.attn.k_proj.kernel   (transposed)
    blk.N.attn_v.weight      (kv*d, hidden)      -> layers.N.attn.v_proj.kernel   (transposed)
    blk.N.attn_output.weight (hidden, heads*d)   -> layers.N.attn.o_proj.kernel   (transposed)
    blk.N.ffn_norm.weight    (hidden,)           -> layers.N.mlp_norm.scale
    blk.N.ffn_gate.weight    (inter, hidden)     -> layers.N.mlp.gate_proj.kernel (transposed)
    blk.N.ffn_up.weight      (inter, hidden)     -> layers.N.mlp.up_proj.kernel   (transposed)
    blk.N.ffn_down.weight    (hidden, inter)     -> layers.N.mlp.down_proj.kernel (transposed)
    output_norm.weight       (hidden,)           -> norm.scale
    output.weight            (absent: the output head is tied to token_embd)

Shapes are numpy order (:mod:`examples.smollm.gguf_file` reverses ggml's
``ne``); every one is checked against the config the metadata gives. q/k rows
are used as stored, i.e. in llama.cpp's permuted order, which is why the model
uses adjacent-pair rotary embeddings (see :mod:`examples.smollm.model`).

``params`` (what :func:`load` returns second) is the model's ``nnx.State``
(``nnx.state(model)``): a pytree of ``nnx.Param`` holding jax arrays, with the
paths above. :func:`~examples.smollm.evaluate.perplexity` and
:func:`~examples.smollm.decoding.generate` run ``nnx.merge(nnx.graphdef(model),
params)``, so any state that fits the model's graph can be passed instead, e.g.
``nnx.state(qmodel)`` of a quantized copy ``qmodel`` (passed together with
``qmodel``).

Example:
  >>> from examples.smollm.weights import gguf_param_paths
  >>> import numpy as np
  >>> from examples.smollm.model import SmolLMConfig
  >>> cfg = SmolLMConfig.tiny(layers=1)
  >>> gguf_param_paths(cfg)['blk.0.attn_k.weight']
  ParamSlot(path=('layers', 0, 'attn', 'k_proj', 'kernel'), transpose=True)
"""

from __future__ import annotations

import pathlib
import time
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples.smollm import gguf_file
from examples.smollm.model import SmolLM, SmolLMConfig
from examples.smollm.tokenizer import Tokenizer, build_tokenizer

__all__ = ['ParamSlot', 'gguf_param_paths', 'expected_shapes', 'gguf_to_params', 'build_model', 'load']

_LAYER_TENSORS = {  # GGUF suffix -> (path inside layers.N, transpose?)
    'attn_norm': (('attn_norm', 'scale'), False),
    'attn_q': (('attn', 'q_proj', 'kernel'), True),
    'attn_k': (('attn', 'k_proj', 'kernel'), True),
    'attn_v': (('attn', 'v_proj', 'kernel'), True),
    'attn_output': (('attn', 'o_proj', 'kernel'), True),
    'ffn_norm': (('mlp_norm', 'scale'), False),
    'ffn_gate': (('mlp', 'gate_proj', 'kernel'), True),
    'ffn_up': (('mlp', 'up_proj', 'kernel'), True),
    'ffn_down': (('mlp', 'down_proj', 'kernel'), True),
}


class ParamSlot(NamedTuple):
    """Where a GGUF tensor goes: the model param ``path`` and whether its ``(out, in)`` matrix is transposed."""
    path: tuple[Any, ...]
    transpose: bool


def gguf_param_paths(cfg: SmolLMConfig) -> dict[str, ParamSlot]:
    """``{GGUF tensor name: ParamSlot(model param path, transpose)}`` for every tensor the model uses.

    Example:
      >>> from examples.smollm.weights import gguf_param_paths
      >>> from examples.smollm.model import SmolLMConfig
      >>> gguf_param_paths(SmolLMConfig.tiny())['output_norm.weight']
      ParamSlot(path=('norm', 'scale'), transpose=False)
    """
    out = {'token_embd.weight': ParamSlot(('embed', 'embedding'), False),
           'output_norm.weight': ParamSlot(('norm', 'scale'), False)}
    for i in range(cfg.layers):
        for suffix, (path, transpose) in _LAYER_TENSORS.items():
            out[f'blk.{i}.{suffix}.weight'] = ParamSlot(('layers', i, *path), transpose)
    return out


def expected_shapes(cfg: SmolLMConfig) -> dict[str, tuple[int, ...]]:
    """The numpy-order shape each GGUF tensor must have for ``cfg``.

    Example:
      >>> from examples.smollm.weights import expected_shapes
      >>> from examples.smollm.model import SmolLMConfig
      >>> expected_shapes(SmolLMConfig())['blk.0.attn_k.weight']
      (192, 576)
    """
    d, h = cfg.head_dim, cfg.hidden
    per_layer = {'attn_norm': (h,), 'attn_q': (cfg.heads * d, h), 'attn_k': (cfg.kv_heads * d, h),
                 'attn_v': (cfg.kv_heads * d, h), 'attn_output': (h, cfg.heads * d), 'ffn_norm': (h,),
                 'ffn_gate': (cfg.intermediate, h), 'ffn_up': (cfg.intermediate, h),
                 'ffn_down': (h, cfg.intermediate)}
    out = {'token_embd.weight': (cfg.vocab_size, h), 'output_norm.weight': (h,)}
    for i in range(cfg.layers):
        out.update({f'blk.{i}.{k}.weight': v for k, v in per_layer.items()})
    return out


def gguf_to_params(arrays: dict[str, Any], cfg: SmolLMConfig,
                   transpose: Callable[[Any], Any] = lambda a: np.ascontiguousarray(np.asarray(a).T)
                   ) -> dict[tuple[Any, ...], Any]:
    """``{model param path: array}`` from ``{GGUF name: array}``, shapes checked, matrices transposed to ``(in, out)``.

    ``transpose`` turns an ``(out, in)`` GGUF matrix into the ``(in, out)``
    kernel; replace it when the arrays are not numpy (a quantized array's own
    transpose). A tensor called ``output.weight`` (an untied head) is refused.

    Example:
      >>> import numpy as np
      >>> from examples.smollm.weights import expected_shapes, gguf_to_params
      >>> from examples.smollm.model import SmolLMConfig
      >>> cfg = SmolLMConfig.tiny(layers=1)
      >>> arrays = {k: np.zeros(s, np.float32) for k, s in expected_shapes(cfg).items()}
      >>> gguf_to_params(arrays, cfg)[('layers', 0, 'attn', 'q_proj', 'kernel')].shape
      (32, 32)
    """
    if 'output.weight' in arrays:
        raise ValueError("the file has an untied output head (output.weight); this model ties it to token_embd")
    slots, shapes = gguf_param_paths(cfg), expected_shapes(cfg)
    missing = sorted(set(slots) - set(arrays))
    extra = sorted(set(arrays) - set(slots))
    if missing or extra:
        raise ValueError(f"GGUF tensors do not match the config: missing {missing[:5]}, unexpected {extra[:5]}")
    out = {}
    for name, slot in slots.items():
        a = arrays[name]
        if tuple(a.shape) != shapes[name]:
            raise ValueError(f"{name}: shape {tuple(a.shape)}, but the metadata implies {shapes[name]}")
        out[slot.path] = transpose(a) if slot.transpose else a
    return out


def build_model(params: dict[tuple[Any, ...], Any], cfg: SmolLMConfig) -> SmolLM:
    """A :class:`SmolLM` holding ``params`` (``{path: array}``, as :func:`gguf_to_params` gives); no random init.

    Example:
      >>> import numpy as np
      >>> from examples.smollm.weights import build_model, expected_shapes, gguf_to_params
      >>> from examples.smollm.model import SmolLMConfig
      >>> cfg = SmolLMConfig.tiny(layers=1)
      >>> p = gguf_to_params({k: np.ones(s, np.float32) for k, s in expected_shapes(cfg).items()}, cfg)
      >>> float(build_model(p, cfg).norm.scale[...].sum())
      32.0
    """
    abstract = SmolLM.abstract(cfg)
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    paths = {tuple(p) for p, _ in flat}
    if paths != set(params):
        raise ValueError(f"param paths differ from the model's: missing {sorted(paths - set(params))[:5]}, "
                         f"unexpected {sorted(set(params) - paths)[:5]}")
    leaves = []
    for path, var in flat:
        value = params[tuple(path)]
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"{'.'.join(map(str, path))}: shape {tuple(value.shape)}, model expects {var.shape}")
        leaves.append((path, var.replace(jnp.asarray(value, var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def load(path: str | pathlib.Path | None = None, *, arrays_fn: Callable[..., dict[str, Any]] = gguf_file.load_arrays,
         verbose: bool = False) -> tuple[SmolLM, nnx.State, Tokenizer]:
    """``(model, params, tokenizer)`` from the GGUF file (float32 weights from :func:`gguf_file.load_arrays`).

    ``params`` is ``nnx.state(model)`` (see the module docstring).
    ``arrays_fn(path)`` supplies ``{GGUF name: array}``; replace it to load the
    tensors another way (the default dequantizes every tensor to float32).

    Example:
      >>> from examples.smollm.weights import load
      >>> model, params, tok = load()  # doctest: +SKIP
      >>> model.cfg.layers, tok.decode(tok.encode('Hi there'))  # doctest: +SKIP
      (30, 'Hi there')
    """
    t0 = time.perf_counter()
    meta = gguf_file.read_metadata(path)
    cfg = SmolLMConfig.from_metadata(meta)
    tokenizer = build_tokenizer(meta)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, llama.vocab_size is {cfg.vocab_size}")
    model = build_model(gguf_to_params(arrays_fn(path), cfg), cfg)
    if verbose:
        print(f"loaded SmolLM2 ({cfg.layers} layers, hidden {cfg.hidden}) in {time.perf_counter() - t0:.1f} s")
    return model, nnx.state(model), tokenizer
