"""Rules with 2-D (any) weight block scales: ``QuantizationRule(weight_tiles=...)``.

References are independent of qarray's quantizer: numpy absmax int8 per block, and the float64 product
of the dequantized operands within the float32 accumulation bound (tests/tolerances.py).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import flax_integration as fi
import qarray
from tolerances import assert_dot_close

IN, OUT, T = 64, 48, 16
BLOCKS = {-2: T, -1: T}


def int8_block_np(b) -> np.ndarray:
    """absmax int8 of one block, as documented (qarray._numerics): a float32 scale ``absmax * fl(1/127.5)``,
    codes ``rint(x * fl(1/s))`` in float32 over the full two's-complement range; dequantized ``code * s`` (one
    correctly rounded float32 product: the same bits on every IEEE machine)."""
    b = np.asarray(b, np.float32)
    s = np.float32(np.abs(b).max()) * np.float32(1 / 127.5)
    codes = np.clip(np.rint(b * (np.float32(1) / s)), -128, 127)
    return codes.astype(np.float32) * s


def int8_blocks_np(w, tin: int, tout: int) -> np.ndarray:
    """:func:`int8_block_np` per (tin x tout) block (the last ones may be partial)."""
    w = np.asarray(w, np.float32)
    out = np.empty(w.shape, np.float32)
    for i in range(0, w.shape[0], tin):
        for j in range(0, w.shape[1], tout):
            out[i:i + tin, j:j + tout] = int8_block_np(w[i:i + tin, j:j + tout])
    return out


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(IN)(x)                 # Dense_0 [IN, IN], then Dense_1 [IN, OUT]
        return nn.Dense(OUT)(nn.relu(h))


class NnxMlp(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(IN, IN, rngs=rngs)
        self.b = nnx.Linear(IN, OUT, rngs=rngs)

    def __call__(self, x):
        return self.b(nn.relu(self.a(x)))


@pytest.fixture(scope='module')
def x():
    return jax.random.normal(jax.random.key(3), (5, IN))


def _linen(rules, x):
    fp = Mlp().init(jax.random.key(0), x)['params']
    ptq = fi.quantize_model(Mlp(), fi.PtqProvider(rules))
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)['params']
    return ptq, fp, fi.quantize_params(fp, abstract)


def test_linen_ptq_block_scales_match_a_numpy_reference(x):
    ptq, fp, params = _linen([fi.QuantizationRule(weight_qtype='int8', weight_tiles=BLOCKS)], x)
    w = params['Dense_1']['kernel'].array
    assert w.scale.shape == (IN // T, OUT // T) and w.qvalue.nbytes == IN * OUT
    assert w.nbytes == IN * OUT + (IN // T) * (OUT // T) * 4            # one float32 scale per block
    want = int8_blocks_np(fp['Dense_1']['kernel'], T, T)
    np.testing.assert_array_equal(np.asarray(qarray.dequantize(w)), want)
    h = nn.relu(x @ qarray.dequantize(params['Dense_0']['kernel'].array) + fp['Dense_0']['bias'])
    y = ptq.apply({'params': params}, x)
    assert_dot_close(y - fp['Dense_1']['bias'], np.asarray(h, np.float64) @ want, h, want, evals=2, extra=1)
    np.testing.assert_array_equal(jax.jit(ptq.apply)({'params': params}, x), y)


def test_fp8_blocks_with_per_token_activations_ptq_and_qat(x):
    # DeepSeek-V3 style: fp8 weights with one scale per block, dynamic fp8 activations tiled along the features
    rules = [fi.QuantizationRule(weight_qtype='float8_e4m3fn', act_qtype='float8_e4m3fn', tile_size=T,
                                 weight_tiles=BLOCKS)]
    layer = nn.Dense(IN, use_bias=False)
    fp = layer.init(jax.random.key(0), x)['params']
    ptq = fi.quantize_model(layer, fi.PtqProvider(rules))
    params = fi.quantize_params(fp, jax.eval_shape(ptq.init, jax.random.key(0), x)['params'])
    w = params['kernel'].array
    assert w.qvalue.dtype == jnp.float8_e4m3fn and w.scale.shape == (IN // T, IN // T)
    xq = qarray.quantize(x, 'float8_e4m3fn', channelwise_axes=(0,), tiles={1: T})
    want = np.asarray(qarray.dequantize(xq), np.float64) @ np.asarray(qarray.dequantize(w), np.float64)
    y = ptq.apply({'params': params}, x)
    assert_dot_close(y, want, xq, w, evals=1, extra=2)       # the two scales enter each term: two roundings
    assert_dot_close(jax.jit(ptq.apply)({'params': params}, x), want, xq, w, evals=1, extra=2)
    # QAT (fake quantization, the same codes) computes the same product in float32
    qat = fi.quantize_model(layer, fi.QatProvider(rules))
    assert_dot_close(qat.apply({'params': fp}, x), want, xq, w, evals=1, extra=2)


def test_nnx_ptq_and_quantize_params_agree(x):
    rules = [fi.QuantizationRule(weight_qtype='int8', weight_tiles={0: T, 1: T})]
    model = NnxMlp(nnx.Rngs(0))
    q = fi.quantize_model(model, fi.PtqProvider(rules), x)
    assert q.b.kernel.array.scale.shape == (IN // T, OUT // T)
    np.testing.assert_array_equal(np.asarray(qarray.dequantize(q.b.kernel.array)),
                                  int8_blocks_np(model.b.kernel[...], T, T))
    abstract = nnx.eval_shape(lambda: fi.quantize_model(NnxMlp(nnx.Rngs(0)), fi.PtqProvider(rules), x))
    nnx.update(abstract, fi.quantize_params(model, abstract))
    np.testing.assert_array_equal(abstract.b.kernel.array.qvalue, q.b.kernel.array.qvalue)
    np.testing.assert_array_equal(abstract(x), q(x))


def test_model_free_blocks_and_per_expert_stacks_match_the_model_based_form():
    w = jax.random.normal(jax.random.key(1), (IN, OUT))
    q = fi.quantize_params({'d': {'kernel': w}}, [fi.QuantizationRule(weight_qtype='int8', weight_tiles=BLOCKS)])
    np.testing.assert_array_equal(np.asarray(qarray.dequantize(q['d']['kernel'])),
                                  int8_blocks_np(w, T, T))
    # an expert stack [experts, in, out]: {0: 1} keeps one scale set per expert, as ragged_dot's PTQ does
    experts = jax.random.normal(jax.random.key(2), (3, IN, OUT)) * jnp.array([1.0, 10.0, 0.1])[:, None, None]
    rule = fi.QuantizationRule(weight_qtype='int4', weight_tiles={0: 1, -2: T})
    got = fi.quantize_params({'moe': {'experts': experts}}, [rule])['moe']['experts']
    assert got.scale.shape == (3, IN // T, OUT)

    class MoE(nn.Module):
        @nn.compact
        def __call__(self, x, gs):
            return jax.lax.ragged_dot(x, self.param('experts', lambda *_: experts), gs)

    xs, gs = jnp.ones((4, IN)), jnp.array([2, 1, 1], jnp.int32)
    ptq = fi.quantize_model(MoE(), fi.PtqProvider([fi.QuantizationRule(weight_qtype='int4', tile_size=T)]))
    want = ptq.init(jax.random.key(0), xs, gs)['params']['experts'].array
    np.testing.assert_array_equal(got.qvalue, want.qvalue)
    np.testing.assert_array_equal(got.scale, want.scale)
    # without it the experts share per-column scales: the small expert loses most of its precision
    shared = fi.quantize_params({'moe': {'experts': experts}}, [fi.QuantizationRule(weight_qtype='int4',
                                                                                     tile_size=T)])['moe']['experts']
    err = lambda a: float(jnp.abs(qarray.dequantize(a)[2] - experts[2]).max())
    assert err(got) < err(shared) / 10


def test_embedding_blocks_along_the_looked_up_rows():
    class Lm(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Embed(40, IN)(ids)

    ids = jnp.array([[0, 7, 39, 8], [15, 16, 1, 31]])
    rules = [fi.QuantizationRule(weight_qtype='int8', weight_tiles={0: 8, 1: T})]
    ptq = fi.quantize_model(Lm(), fi.PtqProvider(rules))
    params = ptq.init(jax.random.key(0), ids)['params']
    t = params['Embed_0']['embedding'].array
    assert t.scale.shape == (40 // 8, IN // T)
    fp = Lm().init(jax.random.key(0), ids)['params']['Embed_0']['embedding']
    deq = int8_blocks_np(fp, 8, T)
    np.testing.assert_array_equal(np.asarray(qarray.dequantize(t)), deq)
    np.testing.assert_array_equal(ptq.apply({'params': params}, ids), deq[np.asarray(ids)])
    np.testing.assert_array_equal(jax.jit(ptq.apply)({'params': params}, ids), deq[np.asarray(ids)])


def test_uneven_blocks_and_checkpoint_round_trip(x, tmp_path):
    from qarray import io as qio
    rules = [fi.QuantizationRule(weight_qtype='int8', weight_tiles={0: 24, 1: 32})]   # 64 = 24+24+16, 48 = 32+16
    ptq, fp, params = _linen(rules, x)
    w = params['Dense_1']['kernel'].array
    assert w.scale.shape == (3, 2)
    dq = np.asarray(qarray.dequantize(w))
    np.testing.assert_array_equal(dq, int8_blocks_np(fp['Dense_1']['kernel'], 24, 32))  # partial blocks on their own
    qio.save_safetensors(tmp_path / 'w.safetensors', params)
    back = qio.load_safetensors(tmp_path / 'w.safetensors', params)   # checked against the model's own layout
    np.testing.assert_array_equal(ptq.apply({'params': back}, x), ptq.apply({'params': params}, x))


def test_errors_name_the_field():
    with pytest.raises(TypeError, match='weight_tiles must be None or a mapping'):
        fi.QuantizationRule(weight_qtype='int8', weight_tiles=128)
    with pytest.raises(TypeError, match='weight_tiles must be None or a mapping'):
        fi.QuantizationRule(weight_qtype='int8', weight_tiles={0: 0})
    with pytest.raises(TypeError, match='weight_tiles must be None or a mapping'):
        fi.QuantizationRule(weight_qtype='int8', weight_tiles={0.5: 8})
    with pytest.raises(ValueError, match='tiles nothing'):
        fi.QuantizationRule(weight_qtype='int8', weight_tiles={})
    with pytest.raises(ValueError, match='set weight_qtype'):
        fi.QuantizationRule(act_qtype='int8', weight_tiles={0: 8})
    with pytest.raises(ValueError, match='fixed blocks'):
        fi.QuantizationRule(weight_qtype='mxfp4', weight_tiles={0: 8})
    with pytest.raises(ValueError, match="weight_algorithm='gptq'"):
        fi.QuantizationRule(weight_qtype='int4', weight_algorithm='gptq', weight_tiles={0: 8})
    with pytest.raises(ValueError, match='weight_tiles: LiteRT'):
        fi.OdmlQatProvider([fi.QuantizationRule(weight_qtype='int8', act_qtype='int8', weight_tiles={0: 8})])
    x = jnp.ones((2, IN))
    for wt, what in (({2: 8}, 'out of range for a weight of rank 2'), ({1: 8, -1: 8}, 'names axis 1 twice')):
        ptq = fi.quantize_model(Mlp(), fi.PtqProvider([fi.QuantizationRule(weight_qtype='int8', weight_tiles=wt)]))
        with pytest.raises(ValueError, match=what):
            ptq.init(jax.random.key(0), x)
        with pytest.raises(ValueError, match=f"param 'd/kernel'.*{what}"):
            fi.quantize_params({'d': {'kernel': jnp.ones((IN, OUT))}},
                               [fi.QuantizationRule(weight_qtype='int8', weight_tiles=wt)])
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a valid rule raises nothing and warns nothing
        fi.QuantizationRule(weight_qtype='int8', weight_tiles={-2: 128, -1: 128})
