"""ODML providers without the LiteRT tools: where annotations go, their numerics, composites, errors."""

import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from examples.digits import models
from flax_integration import OdmlConversionProvider, OdmlQatProvider, QuantizationRule, quantize_model
from flax_integration._interception import installed
from flax_integration.providers import _odml_ops as odml_ops
from flax_integration.providers.odml_conversion import fake_quant_composite

RULES = [QuantizationRule(weight_qtype='int8', act_qtype='int8')]


def np_act_qparams(lo, hi):
    """LiteRT/TFLite asymmetric int8: range widened to hold 0, scale = (hi - lo) / 255, integer zero point."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    s = np.float32((hi - lo) / 255.0)
    z = int(np.clip(np.round(-128 - lo / s), -128, 127))
    return s, z


def np_fq(x, s, z, lo=-128, hi=127):
    return (np.clip(np.round(x / s) + z, lo, hi) - z) * s


def np_weight_fq(w):
    """Symmetric per-output-channel (axis -1) int8, codes in [-127, 127], scale absmax / 127.5."""
    s = np.abs(w).max(axis=0, keepdims=True) / 127.5
    return np.clip(np.round(w / s), -127, 127) * s


class DenseNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x)


def test_qat_dense_matches_numpy_reference():
    x = np.random.default_rng(0).normal(0.3, 1.0, (16, 5)).astype(np.float32)
    qat = quantize_model(DenseNet(), OdmlQatProvider(RULES))
    v = qat.init(jax.random.key(0), x)
    _, upd = qat.apply(v, x, mutable=['quant_stats'])  # one batch: the running mean is that batch's range
    y = qat.apply({'params': v['params'], **upd}, x)
    p = jax.tree.map(np.asarray, v['params']['Dense_0'])
    s_x, z_x = np_act_qparams(x.min(), x.max())
    pre = np_fq(x.astype(np.float64), s_x, z_x) @ np_weight_fq(p['kernel'].astype(np.float64)) + p['bias']
    s_y, z_y = np_act_qparams(pre.min(), pre.max())
    ref = np_fq(pre, s_y, z_y)
    # at most one code apart (float32 vs float64 near a rounding boundary), almost everywhere exact: 1e-4 of a
    # step is the float32 rounding of the value (u |y| / s_y <= u * 255); the 5 % is a statistical allowance for
    # near-tie flips (each needs a value within ~1e-6 of a step boundary)
    diff = np.abs(np.asarray(y, np.float64) - ref) / s_y
    assert diff.max() <= 1.0 + 1e-4 and (diff > 1e-3).mean() < 0.05
    assert sorted(upd['quant_stats']) == ['Dense_0', 'output0']


def test_annotations_are_placed_per_tensor_linen_cnn():
    qat = quantize_model(models.LinenCNN(), OdmlQatProvider(RULES))
    v = qat.init(jax.random.key(0), jnp.ones((2, 8, 8, 1)))
    names = sorted('/'.join(str(k.key) for k in p[:-1]) for p, _ in jax.tree_util.tree_leaves_with_path(
        v['quant_stats']) if p[-1].key == 'count')
    # model input (first conv's lhs), after each relu, model output: no second annotation on an annotated tensor
    assert names == ['Conv_0/conv_general_dilated0_lhs', 'output0', 'relu0_out', 'relu1_out', 'relu2_out']


def test_annotations_nnx_cnn_and_training_updates_stats():
    qat = quantize_model(models.NnxCNN(rngs=nnx.Rngs(0)), OdmlQatProvider(RULES), jnp.ones((2, 8, 8, 1)))
    stats = nnx.to_pure_dict(nnx.state(qat, nnx.Variable))
    assert 'conv_general_dilated0_lhs' in stats['conv1'] and 'relu2_out' in stats and 'output0' in stats
    assert int(stats['relu0_out']['count']) == 0
    qat(jnp.full((2, 8, 8, 1), 0.5))
    assert int(nnx.to_pure_dict(nnx.state(qat, nnx.Variable))['relu0_out']['count']) == 1


def test_fake_quant_act_gradient_is_clipped_straight_through():
    p = OdmlQatProvider(RULES)
    s, z = jnp.array([0.01], jnp.float32), jnp.array([-128], jnp.int8)  # representable: [-0.005, 2.555]
    x = jnp.array([-1.0, 0.0, 1.0, 2.5, 3.0])
    g = jax.grad(lambda v: p.fake_quant_act(v, s, z).sum())(x)
    np.testing.assert_array_equal(np.asarray(g), [0.0, 1.0, 1.0, 1.0, 0.0])


class Heads(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(8)(x))
        r = x + h                      # residual: both activations -> annotated add
        c = jnp.concatenate([r, h], -1)
        return nn.softmax(nn.Dense(4)(c))


def test_extra_ops_fixed_softmax_range_and_residual_add():
    x = np.random.default_rng(1).normal(size=(6, 8)).astype(np.float32)
    qat = quantize_model(Heads(), OdmlQatProvider(RULES))
    v = qat.init(jax.random.key(0), x)
    assert {'add0_out', 'concatenate0_out', 'softmax0_in', 'relu0_out'} <= set(v['quant_stats'])
    assert not any(k.startswith('add') for k in v['quant_stats'].get('Dense_0', {}))  # bias add left alone
    y = np.asarray(qat.apply(v, x), np.float64)
    codes = y * 256 - 128  # softmax output on LiteRT's fixed grid: scale 1/256, zero point -128
    # (code + 128) / 256 is exact in float32 (a power-of-two scale): the codes are integers exactly
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)


def _lowered(conv, params, x):
    return jax.jit(lambda x: conv.apply({'params': params}, x)).lower(x).as_text()


def test_conversion_emits_composites_with_static_attributes_and_same_numerics():
    x = np.random.default_rng(2).uniform(0, 1, (4, 8, 8, 1)).astype(np.float32)
    qat = quantize_model(models.LinenCNN(), OdmlQatProvider(RULES))
    v = qat.init(jax.random.key(0), x)
    _, upd = qat.apply(v, x, mutable=['quant_stats'])
    conv = quantize_model(models.LinenCNN(), OdmlConversionProvider(RULES, v['params'], upd['quant_stats']))
    text = _lowered(conv, v['params'], x)
    assert text.count('stablehlo.composite "quant.fake_quant"') == 9  # input, 4 weights, 3 relus, output
    dims = sorted(int(d) for d in re.findall(r'quantization_dimension = (\d+)', text))
    assert dims == [1, 1, 3, 3]  # Dense (in, out) kernels: axis 1; HWIO conv kernels: axis 3
    y_conv = jax.jit(lambda x: conv.apply({'params': v['params']}, x))(x)
    y_qat = qat.apply({'params': v['params'], **upd}, x)
    # Every tensor is fake-quantized on a fixed (static) grid, so two float32 evaluations (one program vs op by
    # op) give the same output codes except where some value sits within rounding of a tie; there one
    # output step (scale s_y) at most, and only at a few elements.
    o = upd['quant_stats']['output0']
    s_y = np_act_qparams(float(np.min(o['lo'])), float(np.max(o['hi'])))[0]
    diff = np.abs(np.asarray(y_conv, np.float64) - np.asarray(y_qat, np.float64)) / s_y
    assert diff.max() <= 1.0 + 1e-4 and (diff > 1e-3).mean() < 0.05, diff.max()


def test_fake_quant_composite_numerics_match_numpy():
    x = jnp.linspace(-2, 3, 11)
    y = fake_quant_composite(x, 'int8', np.array([0.02], np.float32), np.array([-30]), narrow_range=False)
    # x / s lands on integers here (no tie); (code - z) * s is one float32 product: u |y| <= 2e-7 < 1e-6
    np.testing.assert_allclose(np.asarray(y), np_fq(np.asarray(x, np.float64), np.float32(0.02), -30), atol=1e-6)


_TARGETS = [t for i in odml_ops.intercepts() for t in i.targets]
_ORIGINALS = {t.key: vars(t.owner)[t.attr] for t in _TARGETS}
_RELU = jax.nn.relu


def _all_original():
    return all(vars(t.owner).get(t.attr) is _ORIGINALS[t.key] for t in _TARGETS)


def _installed():
    return any(installed(t) for t in _TARGETS)


class Probe(nn.Module):
    """Dense + relu; calls ``hook`` in the middle of the run (to look at the shims from inside)."""
    hook: object = None

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(4)(x))
        self.hook()
        return h


def test_shims_are_installed_only_while_an_odml_model_runs():
    p = OdmlQatProvider(RULES)
    assert not _installed() and _all_original()  # a provider alone patches nothing
    x = jnp.array([[-1.0, 2.0]])
    seen = {}

    def hook():
        seen['inside'] = _installed() and jax.nn.relu is not _RELU
        t = threading.Thread(target=lambda: seen.setdefault('thread', jax.nn.relu(x) + x * 2.0))
        t.start()
        t.join()

    qat = quantize_model(Probe(hook), p)
    v = qat.init(jax.random.key(0), x)
    assert seen['inside'] and _all_original() and not _installed()
    np.testing.assert_array_equal(np.asarray(seen['thread']), [[-2.0, 6.0]])  # other thread: originals
    assert sorted(v['quant_stats']) == ['Dense_0', 'relu0_out']  # nothing from the other thread's relu
    np.testing.assert_array_equal(np.asarray(jax.nn.relu(x).reshape(2, 1)), [[0.0], [2.0]])

    def boom():
        raise RuntimeError('boom')

    with pytest.raises(RuntimeError, match='boom'):
        quantize_model(Probe(boom), p).apply(v, x)
    assert _all_original() and odml_ops.current_run() is None  # restored after an exception too


def test_shims_are_reference_counted_across_threads():
    entered, release = threading.Event(), threading.Event()
    states = []

    def waiting_hook():
        entered.set()
        release.wait(30)

    x = jnp.ones((1, 2))
    slow = quantize_model(Probe(waiting_hook), OdmlQatProvider(RULES))
    t = threading.Thread(target=lambda: states.append(slow.init(jax.random.key(0), x)))
    t.start()
    entered.wait(30)
    fast = quantize_model(Probe(lambda: None), OdmlQatProvider(RULES))
    fast.init(jax.random.key(0), x)  # a second run starts and ends on this thread while the first is inside
    still = _installed() and not _all_original()
    release.set()
    t.join()
    assert still and states and not _installed() and _all_original()


@pytest.mark.parametrize('kwargs, field', [
    (dict(weight_qtype='fp8'), 'weight_qtype'), (dict(act_qtype='int4'), 'act_qtype'),
    (dict(weight_qtype='int8', tile_size=32), 'tile_size'),
    (dict(weight_qtype='int8', weight_calibration_method='minmax'), 'weight_calibration_method')])
def test_rule_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        OdmlQatProvider([QuantizationRule(**kwargs)])


def test_bad_act_calibration_method():
    with pytest.raises(ValueError, match='act_calibration_method'):
        OdmlQatProvider(RULES, act_calibration_method='nope')


def test_conversion_without_stats_or_with_empty_stats_raises():
    x = jnp.ones((2, 5))
    params = DenseNet().init(jax.random.key(0), x)['params']
    conv = quantize_model(DenseNet(), OdmlConversionProvider(RULES, params, {}))
    with pytest.raises(ValueError, match='quant_stats'):
        _lowered(conv, params, x)
    stats = quantize_model(DenseNet(), OdmlQatProvider(RULES)).init(jax.random.key(0), x)['quant_stats']
    conv = quantize_model(DenseNet(), OdmlConversionProvider(RULES, params, stats))
    with pytest.raises(ValueError, match='count 0'):
        _lowered(conv, params, x)


def test_quantized_params_are_rejected():
    import qarray
    from flax_integration.wrappers import QuantizedParam
    x = jnp.ones((2, 5))
    v = quantize_model(DenseNet(), OdmlQatProvider(RULES)).init(jax.random.key(0), x)
    k = v['params']['Dense_0']['kernel']
    v['params']['Dense_0']['kernel'] = QuantizedParam(qarray.quantize(k, 'int8', channelwise_axes=(1,)))
    with pytest.raises(TypeError, match='float params'):
        quantize_model(DenseNet(), OdmlQatProvider(RULES)).apply(v, x)


class FlatDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_model_input_is_annotated_before_a_leading_reshape():
    x = jnp.asarray(np.random.default_rng(3).uniform(-1, 2, (4, 2, 3)), jnp.float32)
    qat = quantize_model(FlatDense(), OdmlQatProvider(RULES))
    v = qat.init(jax.random.key(0), x)
    # the input is annotated at the reshape (input0); the Dense reads the reshaped, already annotated tensor
    assert sorted(v['quant_stats']) == ['input0', 'output0']
    _, upd = qat.apply(v, x, mutable=['quant_stats'])
    provider = OdmlConversionProvider(RULES, v['params'], upd['quant_stats'])
    text = _lowered(quantize_model(FlatDense(), provider), v['params'], x)
    first = next(line for line in text.splitlines() if 'stablehlo.composite "quant.fake_quant"' in line)
    assert 'tensor<4x2x3xf32>' in first  # the first fake quant is on the model input, before the reshape
    s, z = provider.last_io['inputs'][0]
    np.testing.assert_allclose(s, np_act_qparams(x.min(), x.max())[0], rtol=1e-6)  # (hi - lo) / 255: <= 3 u
    assert int(np.asarray(z).reshape(())) == np_act_qparams(x.min(), x.max())[1]


def test_rule_act_calibration_method_is_ignored_provider_setting_applies():
    x = jnp.asarray(np.random.default_rng(4).uniform(0.1, 1.0, (4, 5)), jnp.float32)
    rules = [QuantizationRule(weight_qtype='int8', act_qtype='int8', act_calibration_method='absmax')]
    p = OdmlQatProvider(rules)  # provider default 'minmax': asymmetric, whatever the rule says
    quantize_model(DenseNet(), p).init(jax.random.key(0), x)
    s, z = p.last_io['inputs'][0]
    ref_s, ref_z = np_act_qparams(x.min(), x.max())
    np.testing.assert_allclose(np.asarray(s).reshape(()), ref_s, rtol=1e-6)  # (hi - lo) / 255: <= 3 u
    assert int(np.asarray(z).reshape(())) == ref_z == -128
    p = OdmlQatProvider(rules, act_calibration_method='absmax')
    quantize_model(DenseNet(), p).init(jax.random.key(0), x)
    assert p.last_io['inputs'][0][1] is None  # symmetric: no zero point
