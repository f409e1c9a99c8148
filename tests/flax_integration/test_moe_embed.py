"""Mixture of experts (models calling jax.lax.ragged_dot) and embedding tables with tied output heads, in
Linen and NNX: PTQ (weight-only, dynamic w8a8, static per tensor and per expert), calibration, QAT,
quantize_params, LoRA; Embed lookups and Embed.attend from one stored table.

References are float64 numpy on the dequantized operands. Bounds (tests/tolerances.py): one float32
evaluation of a length-K dot product is within ``gamma_{K+EXTRA} * (|a| . |b|)`` of the exact value; two
evaluations of the same quantized op (the model vs the same qarray call by hand) within twice that. Lookups
are exact: the same codes and scales dequantized by the same formula.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import flax_integration as fi
import qarray
from qarray.ops.ragged_dot import ragged_path
from tolerances import OP_EXTRA, U64, gamma

G, K, H = 4, 32, 16
GS = np.array([4, 0, 5, 2])            # an empty expert; rows 11.. belong to no expert
M = 12
V, D = 50, 128


def deq64(x):
    return np.asarray(qarray.dequantize(x) if isinstance(x, qarray.QArray) else x, np.float64)


def ragged64(x, w, gs):
    x, w = deq64(x), deq64(w)
    out, start = np.zeros((x.shape[0], w.shape[2])), 0
    for g, n in enumerate(gs):
        out[start:start + n] = x[start:start + n] @ w[g]
        start += n
    return out


def assert_ragged(y, x, w, gs=GS, evals=1):
    """``y`` is ``evals`` float32 evaluations away from ``ragged_dot(x, w, gs)`` (float64, dequantized)."""
    k = deq64(x).shape[1]
    bound = evals * (gamma(k + OP_EXTRA) + gamma(k, U64)) * ragged64(np.abs(deq64(x)), np.abs(deq64(w)), gs)
    err = np.abs(np.asarray(y, np.float64) - ragged64(x, w, gs))
    assert np.all(err <= bound + 1e-30), f"max excess {np.max(err - bound):.3g}"
    assert np.all(np.asarray(y)[int(GS.sum()):] == 0)


def assert_head(y, q, table, evals=1):
    """``y`` vs the float64 ``q @ table.T`` (the tied head's matmul), length-D sums."""
    q64, t64 = deq64(q), deq64(table)
    bound = evals * (gamma(D + OP_EXTRA) + gamma(D, U64)) * (np.abs(q64) @ np.abs(t64).T)
    err = np.abs(np.asarray(y, np.float64) - q64 @ t64.T)
    assert np.all(err <= bound + 1e-30), f"max excess {np.max(err - bound):.3g}"


class MoE(nn.Module):
    """One expert layer: tokens arrive sorted by expert with their group sizes (a router's output)."""

    @nn.compact
    def __call__(self, x, gs):
        w = self.param('experts', nn.initializers.normal(0.5), (G, K, H))
        return jax.lax.ragged_dot(x, w, gs)


class NnxMoE(nnx.Module):
    def __init__(self, rngs):
        self.experts = nnx.Param(0.5 * jax.random.normal(rngs.params(), (G, K, H)))

    def __call__(self, x, gs):
        return jax.lax.ragged_dot(x, self.experts[...], gs)


@pytest.fixture(scope='module')
def data():
    x = jax.random.normal(jax.random.key(1), (M, K))
    x = x * jnp.array([1.0, 3.0, 0.5, 2.0, 1.0, 1.0, 4.0, 1.0, 1.0, 0.25, 1.0, 9.0])[:, None]  # experts differ
    return x, jnp.asarray(GS, jnp.int32)


def linen_ptq(rules, x, gs, stats=None):
    ptq = fi.quantize_model(MoE(), fi.PtqProvider(rules))
    fp = MoE().init(jax.random.key(0), x, gs)['params']
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), x, gs)['params']
    return ptq, fp, fi.quantize_params(fp, abstract, stats)


@pytest.mark.parametrize('qtype, tile', [('int8', None), ('int4', 16)])
def test_moe_weight_only_per_expert_and_channel(data, qtype, tile):
    x, gs = data
    rules = [fi.QuantizationRule(weight_qtype=qtype, tile_size=tile)]
    ptq, fp, params = linen_ptq(rules, x, gs)
    w = params['experts'].array
    assert w.qtype.name == qtype and w.scale.shape == (G, K // (tile or K), H)   # per expert and output channel
    assert w.qvalue.nbytes == G * K * H * qarray.qtypes.get(qtype).bits // 8         # bytes honest (packed int4)
    chex.assert_trees_all_equal(params, ptq.init(jax.random.key(0), x, gs)['params'])  # = init-time quantization
    y = ptq.apply({'params': params}, x, gs)
    assert_ragged(y, x, w)
    assert_ragged(jax.jit(ptq.apply)({'params': params}, x, gs), x, w)


def test_moe_dynamic_w8a8_runs_the_integer_path(data):
    x, gs = data
    ptq, fp, params = linen_ptq([fi.QuantizationRule(weight_qtype='int8', act_qtype='int8')], x, gs)
    w = params['experts'].array
    xa = qarray.quantize(x, 'int8', channelwise_axes=(0,))      # per token
    assert ragged_path(xa, w) == 'int'
    assert_ragged(ptq.apply({'params': params}, x, gs), xa, w, evals=2)


@pytest.mark.parametrize('per_expert', [False, True])
def test_moe_static_scales_per_tensor_and_per_expert(data, per_expert):
    x, gs = data
    rules = [fi.QuantizationRule(weight_qtype='int8', act_qtype='int8', act_static_scale=True,
                                 act_batch_axes=() if per_expert else None)]
    fp = MoE().init(jax.random.key(0), x, gs)['params']
    stats = fi.calibrate(MoE(), fp, [(x, gs)], rules=rules, progress=False)
    hi = np.asarray(stats['ragged_dot0_lhs']['hi'])
    rows = np.abs(np.asarray(x))[:GS.sum()].max(axis=1)          # per-row absmax over the routed rows
    gid = np.repeat(np.arange(G), GS)
    if per_expert:
        want = np.array([rows[gid == g].max() if (gid == g).any() else rows.max() for g in range(G)])[:, None]
    else:
        want = np.array([[np.abs(np.asarray(x)).max()]])
    assert hi.shape == want.shape
    np.testing.assert_array_equal(hi, want.astype(np.float32))     # a max of float32 values: exact
    ptq, _, params = linen_ptq(rules, x, gs, stats)
    scale = params['ragged_dot0_lhs_scale'].scale
    assert scale.shape == ((G, 1) if per_expert else (1, 1))
    # each row quantized with its expert's scale (rows past the experts: any scale, their output is zero)
    row_scale = scale[np.r_[gid, np.full(M - GS.sum(), G - 1)]] if per_expert else scale
    xq = qarray.quantize_with_scale(x, 'int8', row_scale)
    assert_ragged(ptq.apply({'params': params}, x, gs), xq, params['experts'].array, evals=2)


def test_moe_qat_forward_and_gradients(data):
    x, gs = data
    rule = fi.QuantizationRule(weight_qtype='int4', act_qtype='int8', tile_size=16)
    qat = fi.quantize_model(MoE(), fi.QtProvider([rule]))
    v = qat.init(jax.random.key(0), x, gs)
    w = v['params']['experts']

    def by_hand(w):
        wq = qarray.fake_quant(w, 'int4', channelwise_axes=(0, 2), tiles={1: 16})
        xq = qarray.fake_quant(x, 'int8', channelwise_axes=(0,), tiles={1: 16})
        return jax.lax.ragged_dot(xq, wq, gs)

    y = qat.apply(v, x, gs)
    wq = qarray.fake_quant(w, 'int4', channelwise_axes=(0, 2), tiles={1: 16})
    xq = qarray.fake_quant(x, 'int8', channelwise_axes=(0,), tiles={1: 16})
    assert_ragged(y, xq, wq, evals=2)
    # PTQ stores exactly what QAT trains against
    ptq, _, params = linen_ptq([rule], x, gs)
    np.testing.assert_array_equal(qarray.dequantize(params['experts'].array), wq)
    c = jax.random.normal(jax.random.key(3), (M, H))
    g = jax.grad(lambda w: jnp.sum(c * qat.apply({'params': {'experts': w}}, x, gs)))(w)
    g_ref = jax.grad(lambda w: jnp.sum(c * by_hand(w)))(w)
    assert float(jnp.abs(g).sum()) > 0 and bool(jnp.all(g[1] == 0))     # the empty expert gets no gradient
    # d/dw[g] = xq_g^T c_g (times the STE mask): two float32 sums of the expert's rows, n_g <= 5 terms each
    xq64, c64, start, bound = np.abs(deq64(xq)), np.abs(np.asarray(c, np.float64)), 0, np.zeros((G, K, H))
    for e, n in enumerate(GS):
        bound[e] = 2 * gamma(max(n, 1) + OP_EXTRA) * (xq64[start:start + n].T @ c64[start:start + n])
        start += n
    assert np.all(np.abs(np.asarray(g, np.float64) - np.asarray(g_ref, np.float64)) <= bound + 1e-30)


def test_moe_qat_per_expert_static_stats(data):
    x, gs = data
    rule = fi.QuantizationRule(weight_qtype='int8', act_qtype='int8', act_static_scale=True, act_batch_axes=())
    qat = fi.quantize_model(MoE(), fi.QtProvider([rule]))
    v = qat.init(jax.random.key(0), x, gs)
    assert v['quant_stats']['ragged_dot0_lhs']['hi'].shape == (G, 1)
    _, updated = qat.apply(v, x, gs, mutable=['quant_stats'])
    assert int(updated['quant_stats']['ragged_dot0_lhs']['count']) == int(v['quant_stats']['ragged_dot0_lhs']['count']) + 1


def test_moe_nnx_ptq_and_quantize_params(data):
    x, gs = data
    rules = [fi.QuantizationRule(weight_qtype='int8', act_qtype='int8')]
    model = NnxMoE(nnx.Rngs(0))
    q = fi.quantize_model(model, fi.PtqProvider(rules), x, gs)
    w = q.experts.array
    assert w.scale.shape == (G, 1, H)
    xa = qarray.quantize(x, 'int8', channelwise_axes=(0,))
    assert_ragged(q(x, gs), xa, w, evals=2)
    abstract = nnx.eval_shape(lambda: fi.quantize_model(NnxMoE(nnx.Rngs(0)), fi.PtqProvider(rules), x, gs))
    nnx.update(abstract, fi.quantize_params(model, abstract))
    np.testing.assert_array_equal(abstract.experts.array.qvalue, w.qvalue)
    np.testing.assert_array_equal(abstract(x, gs), q(x, gs))


def test_moe_lora_and_gptq_leave_experts_alone(data):
    x, gs = data
    lora = fi.quantize_model(MoE(), fi.LoraProvider(module_path='.*', rank=2, weight_qtype='int8'))
    params = lora.init(jax.random.key(0), x, gs)['params']
    assert sorted(params) == ['experts']                              # no adapter on a ragged_dot
    gptq = fi.quantize_model(MoE(), fi.PtqProvider([fi.QuantizationRule(weight_qtype='int4',
                                                                        weight_algorithm='gptq')]))
    with pytest.raises(ValueError, match='per-expert weights'):
        gptq.init(jax.random.key(0), x, gs)


# --------------------------------------------------------------------------- embeddings, tied heads
class TiedLM(nn.Module):
    @nn.compact
    def __call__(self, ids, query):
        emb = nn.Embed(V, D)
        return emb(ids), emb.attend(query)


class NnxTiedLM(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(V, D, rngs=rngs)

    def __call__(self, ids, query):
        return self.emb(ids), self.emb.attend(query)


IDS = jnp.array([[0, 7, 49, 7], [3, 1, 2, 48]])
TABLE_RULES = {'int8 per row': dict(weight_qtype='int8'), 'int4 t64': dict(weight_qtype='int4', tile_size=64)}


@pytest.fixture(scope='module')
def query():
    return jax.random.normal(jax.random.key(2), (3, D))


def _check_table(t, kind):
    if kind == 'int8 per row':
        assert t.qtype.name == 'int8' and t.scale.shape == (V, 1) and t.qvalue.nbytes == V * D
    else:
        assert t.qtype.name == 'int4' and t.scale.shape == (V, D // 64) and t.packed_axis in (-1, 1)
        assert t.qvalue.nbytes == V * D // 2                          # two codes a byte, on CPU too
    assert t.nbytes == t.qvalue.nbytes + t.scale.nbytes               # nothing else stored


@pytest.mark.parametrize('kind', list(TABLE_RULES))
def test_linen_embed_lookup_and_tied_head(kind, query):
    rules = [fi.QuantizationRule(module_path='Embed_0', **TABLE_RULES[kind])]
    ptq = fi.quantize_model(TiedLM(), fi.PtqProvider(rules))
    fp = TiedLM().init(jax.random.key(0), IDS, query)['params']
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), IDS, query)['params']
    params = fi.quantize_params(fp, abstract)
    assert sorted(params['Embed_0']) == ['embedding']                 # one table serves lookup and head
    t = params['Embed_0']['embedding'].array
    _check_table(t, kind)
    rows, logits = ptq.apply({'params': params}, IDS, query)
    np.testing.assert_array_equal(rows, qarray.dequantize(t)[IDS])    # lookups: rows of the table, exactly
    assert_head(logits, query, t)
    rows_j, logits_j = jax.jit(ptq.apply)({'params': params}, IDS, query)
    np.testing.assert_array_equal(rows_j, rows)
    assert_head(logits_j, query, t)


def test_linen_tied_head_w8a8_and_static_scales(query):
    fp = TiedLM().init(jax.random.key(0), IDS, query)['params']
    dyn = [fi.QuantizationRule(weight_qtype='int8', act_qtype='int8')]
    ptq = fi.quantize_model(TiedLM(), fi.PtqProvider(dyn))
    params = fi.quantize_params(fp, jax.eval_shape(ptq.init, jax.random.key(0), IDS, query)['params'])
    t = params['Embed_0']['embedding'].array
    qa = qarray.quantize(query, 'int8', channelwise_axes=(0,))
    assert_head(ptq.apply({'params': params}, IDS, query)[1], qa, t, evals=2)
    static = [fi.QuantizationRule(weight_qtype='int8', act_qtype='int8', act_static_scale=True)]
    stats = fi.calibrate(TiedLM(), fp, [(IDS, query)], rules=static, progress=False)
    assert sorted(stats['Embed_0']) == ['dot_general0_lhs']           # the table is a weight, not an activation
    ptq = fi.quantize_model(TiedLM(), fi.PtqProvider(static))
    params = fi.quantize_params(fp, jax.eval_shape(ptq.init, jax.random.key(0), IDS, query)['params'], stats)
    assert sorted(params['Embed_0']) == ['dot_general0_lhs_scale', 'embedding']
    qs = qarray.quantize_with_scale(query, 'int8', params['Embed_0']['dot_general0_lhs_scale'].scale)
    assert_head(ptq.apply({'params': params}, IDS, query)[1], qs, t, evals=2)


def test_linen_embed_qat_trains_against_the_stored_table(query):
    rules = [fi.QuantizationRule(weight_qtype='int4', tile_size=64)]
    qat = fi.quantize_model(TiedLM(), fi.QtProvider(rules))
    v = qat.init(jax.random.key(0), IDS, query)
    ptq = fi.quantize_model(TiedLM(), fi.PtqProvider(rules))
    t = fi.quantize_params(v['params'], jax.eval_shape(ptq.init, jax.random.key(0), IDS, query)['params'])
    t = t['Embed_0']['embedding'].array
    rows, logits = qat.apply(v, IDS, query)
    np.testing.assert_array_equal(rows, qarray.dequantize(t)[IDS])     # same groups, same formula
    assert_head(logits, query, t)                                       # the head fake-quantizes the same table
    g = jax.grad(lambda p: jnp.sum(qat.apply({'params': p}, IDS, query)[1]))(v['params'])
    assert float(jnp.abs(g['Embed_0']['embedding']).sum()) > 0


def test_linen_embed_lora_and_gptq():
    query = jnp.ones((1, D))
    lora = fi.quantize_model(TiedLM(), fi.LoraProvider(module_path='.*', rank=2, weight_qtype='int8'))
    params = lora.init(jax.random.key(0), IDS, query)['params']
    assert sorted(params['Embed_0']) == ['embedding']                  # no adapter on lookups or the tied head
    gptq = fi.quantize_model(TiedLM(), fi.PtqProvider([fi.QuantizationRule(weight_qtype='int4',
                                                                           weight_algorithm='gptq')]))
    with pytest.raises(ValueError, match='table lookup'):
        gptq.init(jax.random.key(0), IDS, query)


@pytest.mark.parametrize('kind', list(TABLE_RULES))
def test_nnx_embed_lookup_and_tied_head(kind, query):
    rules = [fi.QuantizationRule(module_path='emb', **TABLE_RULES[kind])]
    model = NnxTiedLM(nnx.Rngs(0))
    q = fi.quantize_model(model, fi.PtqProvider(rules), IDS, query)
    t = q.emb.embedding.array
    _check_table(t, kind)
    rows, logits = q(IDS, query)
    np.testing.assert_array_equal(rows, qarray.dequantize(t)[IDS])
    assert_head(logits, query, t)
    abstract = nnx.eval_shape(lambda: fi.quantize_model(NnxTiedLM(nnx.Rngs(0)), fi.PtqProvider(rules), IDS, query))
    nnx.update(abstract, fi.quantize_params(model, abstract))
    np.testing.assert_array_equal(abstract.emb.embedding.array.qvalue, t.qvalue)
    np.testing.assert_array_equal(abstract(IDS, query)[0], rows)
