"""quantize_params: the model-free form quantize_params(params, rules)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_integration as fi
import qarray


def test_model_free_quantizes_matching_leaves():
    params = {'Dense_0': {'kernel': jax.random.normal(jax.random.key(0), (16, 8)), 'bias': jnp.ones(8)},
              'blocks': [{'w': jnp.ones((8, 4))}]}
    rules = [fi.QuantizationRule(module_path='Dense_0/kernel', weight_qtype='int4', tile_size=8),
             fi.QuantizationRule(module_path='blocks/0/w', weight_qtype='int8')]
    q = fi.quantize_params(params, rules)
    k = q['Dense_0']['kernel']
    assert isinstance(k, qarray.QArray) and k.tiles == {0: 8} and k.channelwise_axes == (1,)
    W = params['Dense_0']['kernel']
    for t in range(2):  # each 8-row tile has its own per-column scale, as quantizing that tile alone gives
        alone = qarray.quantize(W[8 * t:8 * (t + 1)], 'int4', channelwise_axes=(1,)).scale
        # absmax (exact) * fl(1 / bound): one correctly rounded product, so equal bits (rtol only names it)
        np.testing.assert_allclose(np.asarray(k.scale[t]), np.asarray(alone[0]), rtol=1e-6)
    assert isinstance(q['blocks'][0]['w'], qarray.QArray)
    assert q['Dense_0']['bias'] is params['Dense_0']['bias']


def test_model_free_errors_name_the_path():
    with pytest.raises(ValueError, match='Dense_0/bias'):
        fi.quantize_params({'Dense_0': {'bias': jnp.ones(8)}}, [fi.QuantizationRule(weight_qtype='int8')])
    with pytest.raises(ValueError, match='Dense_0/kernel'):  # a kernel of rank 1 has no contraction axis to tile
        fi.quantize_params({'Dense_0': {'kernel': jnp.ones((6,))}},
                           [fi.QuantizationRule(weight_qtype='int4', tile_size=4)])
    with pytest.raises(ValueError, match='mxfp4.*blocks of 32'):  # refused by the rule itself
        fi.QuantizationRule(weight_qtype='mxfp4', tile_size=16)
    with pytest.raises(ValueError, match='quant_stats'):
        fi.quantize_params({'k': jnp.ones((4, 4))}, [fi.QuantizationRule(weight_qtype='int8')], {})


def test_nnx_model_with_statistics_takes_them_from_quant_stats():
    """An abstract NNX model that holds QuantStat variables (e.g. a QAT model with static ranges) gets them
    from quant_stats (or keeps its own) instead of asking fp_params for them."""
    from flax import nnx
    rules = [fi.QuantizationRule(weight_qtype='int8', act_qtype='int8', act_static_scale=True)]
    x = jnp.ones((2, 8))
    fp_model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    qat = fi.quantize_model(fp_model, fi.QtProvider(rules), x)
    stats = nnx.to_pure_dict(nnx.state(qat, fi.QuantStat))
    stats['dot_general0_lhs']['hi'] = stats['dot_general0_lhs']['hi'] + 3.0
    state = fi.quantize_params(fp_model, qat, stats)
    got = nnx.to_pure_dict(state)
    np.testing.assert_array_equal(np.asarray(got['dot_general0_lhs']['hi']), np.asarray(stats['dot_general0_lhs']['hi']))
    np.testing.assert_array_equal(np.asarray(got['kernel']), np.asarray(fp_model.kernel[...]))


def test_float_param_of_the_wrong_shape_is_named():
    from flax import linen as nn
    x = jnp.ones((2, 8))
    ptq = fi.quantize_model(nn.Dense(4), fi.PtqProvider([fi.QuantizationRule(weight_qtype='int8')]))
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)['params']
    fp = nn.Dense(4).init(jax.random.key(0), x)['params']
    fp = {'kernel': fp['kernel'], 'bias': jnp.zeros(5)}
    with pytest.raises(ValueError, match=r"param 'bias': fp_params has shape \(5,\) but the quantized model's is \(4,\)"):
        fi.quantize_params(fp, abstract)


def test_provider_without_rules_is_refused_clearly():
    with pytest.raises(TypeError, match='rules must be a list of QuantizationRule'):
        fi.PtqProvider(None)
