"""Flax rules with the microscaling formats and double-quantized scales: PTQ, QAT, quantize_params, QLoRA, NNX.

Each quantized model must compute exactly what the same qarray calls compute by hand (the float op on the
dequantized weights within float32 accumulation), and QAT must match PTQ bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import flax_integration as fi
import qarray

X = jax.random.normal(jax.random.key(0), (4, 64))
RULESETS = {
    'mxfp4_w_mxfp8_a': [fi.QuantizationRule(weight_qtype='mxfp4', act_qtype='mxfp8')],
    'nvfp4_w': [fi.QuantizationRule(weight_qtype='nvfp4')],
    'mxfp8_w_mse': [fi.QuantizationRule(weight_qtype='mxfp8', weight_calibration_method='mse')],
    'nf4_double': [fi.QuantizationRule(weight_qtype='nf4', tile_size=16, weight_scale_qtype='int8')],
}


def _bound(x, w):
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    k = x64.shape[-1]
    return (k + 2) * 2.0 ** -24 * (np.abs(x64) @ np.abs(w64)) * 1.01 + 1e-30


@pytest.mark.parametrize('name', list(RULESETS))
def test_linen_ptq_equals_the_ops_by_hand_and_qat_equals_ptq(name):
    rules = RULESETS[name]
    model = nn.Dense(32, use_bias=False)
    fp = model.init(jax.random.key(1), X)['params']
    ptq = fi.quantize_model(model, fi.PtqProvider(rules))
    params = fi.quantize_params(fp, jax.eval_shape(ptq.init, jax.random.key(0), X)['params'])
    w = params['kernel'].array
    rule = rules[0]
    assert w.qtype.name == qarray.qtypes.get(rule.weight_qtype).name
    if w.qtype.microscaling:
        assert w.tiles == {0: w.qtype.block}  # blocks on the contraction (input) axis
    y = np.asarray(ptq.apply({'params': params}, X), np.float64)
    xa = X if rule.act_qtype is None else qarray.dequantize(qarray.quantize(X, rule.act_qtype, tiles={1: 32}))
    want = np.asarray(xa, np.float64) @ np.asarray(qarray.dequantize(w), np.float64)
    assert np.all(np.abs(y - want) <= _bound(xa, qarray.dequantize(w)))
    qat = fi.quantize_model(model, fi.QtProvider(rules))
    y_qat = qat.apply({'params': fp}, X)
    np.testing.assert_allclose(np.asarray(y_qat), y, rtol=0, atol=float(_bound(xa, qarray.dequantize(w)).max()))


def test_static_microscaling_activations_are_refused():
    with pytest.raises(ValueError, match='computes its block scales from the data'):
        fi.QuantizationRule(weight_qtype='int8', act_qtype='mxfp8', act_static_scale=True)


def test_double_quantization_rule_errors():
    with pytest.raises(ValueError, match='set weight_qtype too'):
        fi.QuantizationRule(weight_scale_qtype='int8')
    with pytest.raises(ValueError, match='already one byte'):
        fi.QuantizationRule(weight_qtype='mxfp4', weight_scale_qtype='int8')
    with pytest.raises(ValueError, match='uint4'):
        fi.QuantizationRule(weight_qtype='nf4', tile_size=64, weight_scale_qtype='uint4')


def test_mx_conv_weights_block_the_input_features():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(8, (3, 3), use_bias=False)(x)

    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 32))
    rules = [fi.QuantizationRule(weight_qtype='mxfp4')]
    ptq = fi.quantize_model(Net(), fi.PtqProvider(rules))
    fp = Net().init(jax.random.key(3), x)['params']
    params = fi.quantize_params(fp, jax.eval_shape(ptq.init, jax.random.key(0), x)['params'])
    k = params['Conv_0']['kernel'].array
    assert k.tiles == {2: 32}  # HWIO: blocks along I
    y = ptq.apply({'params': params}, x)
    ref = jax.lax.conv_general_dilated(x, qarray.dequantize(k), (1, 1), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=0,
                               atol=float(3 * 3 * 32 * 2.0 ** -23 * jnp.abs(x).max() * jnp.abs(qarray.dequantize(k)).max() * 9))


def test_nnx_and_qlora_with_double_quantized_nf4():
    lin = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    q = fi.quantize_model(lin, fi.PtqProvider(RULESETS['nf4_double']), X)
    assert isinstance(q.kernel.array.scale, qarray.QArray)
    k = qarray.dequantize(jax.tree.map(lambda v: v[...] if isinstance(v, nnx.Variable) else v, q.kernel.array,
                                       is_leaf=lambda v: isinstance(v, nnx.Variable)))
    y = np.asarray(q(X), np.float64)
    want = np.asarray(X, np.float64) @ np.asarray(k, np.float64) + np.asarray(lin.bias[...], np.float64)
    assert np.all(np.abs(y - want) <= _bound(X, k) + 1e-6)
    rules = [fi.LoraRule(rank=2, weight_qtype='nf4', tile_size=16, weight_scale_qtype='int8')]
    m = fi.quantize_model(nn.Dense(32), fi.LoraProvider(rules))
    v = m.init(jax.random.key(0), X)['params']
    base = v['kernel'].array
    assert isinstance(base.scale, qarray.QArray) and base.scale.qtype.name == 'int8'
    assert 8 * base.nbytes / base.size < 4 + 8 / 16 + 0.05  # int8 scales: vs plain nf4 t16 (4 + 32/16 = 6 bits)


@pytest.mark.parametrize('weight_qtype,scale_qtype,tile', [('nvfp4', None, None), ('int4', 'int8', 16)])
def test_nnx_quantize_params_with_quantized_scales(weight_qtype, scale_qtype, tile):
    """Two-level scales (nvfp4's E4M3 under a float32 tensor scale, double quantization) nest in NNX state."""
    from flax import nnx
    x = jax.random.normal(jax.random.key(1), (2, 32))
    fp = nnx.Linear(32, 8, rngs=nnx.Rngs(0))
    rule = fi.QuantizationRule(weight_qtype=weight_qtype, weight_scale_qtype=scale_qtype, tile_size=tile)
    ptq = fi.quantize_model(fp, fi.PtqProvider([rule]), x)
    nnx.update(ptq, fi.quantize_params(fp, ptq))
    kw = {'tiles': {0: 16}} if weight_qtype == 'nvfp4' else dict(channelwise_axes=(1,), tiles={0: tile}, scale_qtype=scale_qtype)
    w = qarray.dequantize(qarray.quantize(fp.kernel[...], weight_qtype, **kw))
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(fp.bias[...], np.float64)
    got = np.asarray(ptq(x), np.float64)
    bound = 32 * 2 ** -23 * (np.abs(np.asarray(x)) @ np.abs(np.asarray(w)) + 1)  # float32 accumulation of 32 terms
    assert np.all(np.abs(got - want) <= bound)
