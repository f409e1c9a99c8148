"""SmolLM2's byte-level BPE tokenizer, rebuilt from the GGUF metadata with the ``tokenizers`` package.

The GGUF file carries the whole vocabulary (``tokenizer.ggml.tokens``, 49152
byte-level strings), the merge list (``tokenizer.ggml.merges``, ``"a b"``
strings in priority order), the token types (``tokenizer.ggml.token_type``:
1 normal, 3 control) and the special ids (bos/eos/unk/pad). ``tokenizer.ggml.pre``
is ``'smollm'``, which names llama.cpp's pre-tokenizer for this vocabulary.

Pre-tokenization: llama.cpp, ``src/llama-vocab.cpp`` (ggml-org/llama.cpp), in
the BPE tokenizer's constructor, ``case LLAMA_VOCAB_PRE_TYPE_SMOLLM:`` (shared
with STARCODER, REFACT, COMMAND_R, CODESHELL, EXAONE, ...) applies two regexes
in turn, each splitting the pieces the previous one left:

1. ``\\p{N}`` -- every digit becomes its own piece;
2. the GPT-2 regex ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)``.

Both are written out below (:data:`PRE_TOKENIZER_REGEXES`) as ``tokenizers``
``Split(..., behavior='isolated')`` steps (matches and the text between them
both become pieces, as in llama.cpp's ``unicode_regex_split``), followed by the
byte-to-unicode mapping (``ByteLevel`` without its own regex). Control tokens
(type 3: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ...) are added as
special tokens, so they are matched whole before pre-tokenization. No BOS is
added (``tokenizer.ggml.add_bos_token`` is false).

Example:
  >>> from examples.smollm.tokenizer import PRE_TOKENIZER_REGEXES
  >>> PRE_TOKENIZER_REGEXES[0]
  '\\\\p{N}'
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

__all__ = ['PRE_TOKENIZER_REGEXES', 'TOKEN_TYPE_NORMAL', 'TOKEN_TYPE_CONTROL', 'Tokenizer', 'build_tokenizer']

# From llama.cpp src/llama-vocab.cpp, `case LLAMA_VOCAB_PRE_TYPE_SMOLLM:` (see the module docstring).
PRE_TOKENIZER_REGEXES: tuple[str, ...] = (
    r"\p{N}",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
)
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the special ids the GGUF file names.

    Example:
      >>> from examples.smollm.tokenizer import build_tokenizer
      >>> tok = build_tokenizer({'tokenizer.ggml.tokens': ['<s>', 'a', 'b', 'ab', 'Ġ'],
      ...                        'tokenizer.ggml.merges': ['a b'],
      ...                        'tokenizer.ggml.token_type': [3, 1, 1, 1, 1],
      ...                        'tokenizer.ggml.bos_token_id': 0, 'tokenizer.ggml.eos_token_id': 0})
      >>> tok.encode('ab a<s>')
      [3, 4, 1, 0]
      >>> tok.decode([3, 4, 1])
      'ab a'
    """

    hf: Any  # tokenizers.Tokenizer
    bos_id: int
    eos_id: int
    unk_id: int | None = None
    pad_id: int | None = None

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added; control-token strings map to their ids)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self.hf.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (byte-level, so ``decode(encode(s)) == s`` for any string)."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def tokens(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary strings of ``ids`` (byte-level form: a leading space shows as ``'Ġ'``)."""
        return [self.hf.id_to_token(int(i)) for i in ids]


def build_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    """A :class:`Tokenizer` from GGUF metadata (``tokenizer.ggml.*`` keys, as :func:`gguf_file.read_metadata` gives).

    Example:
      >>> from examples.smollm.tokenizer import build_tokenizer
      >>> tok = build_tokenizer({'tokenizer.ggml.tokens': ['0', '1', 'Ġ', 'Ġ1'], 'tokenizer.ggml.merges': ['Ġ 1'],
      ...                        'tokenizer.ggml.token_type': [1, 1, 1, 1], 'tokenizer.ggml.bos_token_id': 0,
      ...                        'tokenizer.ggml.eos_token_id': 0})
      >>> tok.encode(' 101')  # each digit is its own piece, so ' 1' is never merged, as in llama.cpp
      [2, 1, 0, 1]
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    model = metadata.get('tokenizer.ggml.model')
    if model not in (None, 'gpt2'):
        raise ValueError(f"only byte-level BPE ('gpt2') GGUF vocabularies are supported, got {model!r}")
    pre = metadata.get('tokenizer.ggml.pre')
    if pre not in (None, 'smollm'):
        raise ValueError(f"only the 'smollm' pre-tokenizer is implemented, got {pre!r}")
    tokens = list(metadata['tokenizer.ggml.tokens'])
    types = list(metadata.get('tokenizer.ggml.token_type', [TOKEN_TYPE_NORMAL] * len(tokens)))
    if len(types) != len(tokens):
        raise ValueError(f"token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("tokenizer.ggml.tokens has duplicate entries")
    merges = [tuple(m.split(' ', 1)) for m in metadata['tokenizer.ggml.merges']]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(rx), behavior='isolated') for rx in PRE_TOKENIZER_REGEXES]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
               if ty == TOKEN_TYPE_CONTROL]
    if special:
        hf.add_special_tokens(special)

    def opt(key: str) -> int | None:
        v = metadata.get(key)
        return None if v is None else int(v)

    return Tokenizer(hf=hf, bos_id=int(metadata['tokenizer.ggml.bos_token_id']),
                     eos_id=int(metadata['tokenizer.ggml.eos_token_id']),
                     unk_id=opt('tokenizer.ggml.unknown_token_id'), pad_id=opt('tokenizer.ggml.padding_token_id'))
