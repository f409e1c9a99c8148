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
        np.testing.assert_allclose(np.asarray(k.scale[t]), np.asarray(alone[0]), rtol=1e-6)
    assert isinstance(q['blocks'][0]['w'], qarray.QArray)
    assert q['Dense_0']['bias'] is params['Dense_0']['bias']


def test_model_free_errors_name_the_path():
    with pytest.raises(ValueError, match='Dense_0/bias'):
        fi.quantize_params({'Dense_0': {'bias': jnp.ones(8)}}, [fi.QuantizationRule(weight_qtype='int8')])
    with pytest.raises(ValueError, match='Dense_0/kernel'):
        fi.quantize_params({'Dense_0': {'kernel': jnp.ones((6, 8))}},
                           [fi.QuantizationRule(weight_qtype='int4', tile_size=4)])
    with pytest.raises(ValueError, match='quant_stats'):
        fi.quantize_params({'k': jnp.ones((4, 4))}, [fi.QuantizationRule(weight_qtype='int8')], {})
