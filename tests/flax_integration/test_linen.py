"""Linen PTQ: MLP, CNN, attention block; weight-only, dynamic, static; int8, int4 tiles, nf4, fp8 acts."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import flax_integration as fi
import qarray
from tolerances import U32, abs_dot, assert_within, gamma, hidden_bound, propagate, propagate_conv, requantized_bound



def deq64(q):
    """Dequantized operand in float64 numpy (independent of the op path)."""
    return np.asarray(qarray.dequantize(q), np.float64) if isinstance(q, qarray.QArray) else np.asarray(q, np.float64)


@pytest.fixture
def x16():
    return jax.random.uniform(jax.random.key(0), (8, 16))

DN = (((1,), (0,)), ((), ()))


class MLP(nn.Module):
    dhidden: int = 64
    dout: int = 16

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.dhidden, use_bias=False)(x)
        x = nn.relu(x)
        return nn.Dense(self.dout, use_bias=False)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)(h)
        return x + nn.Dense(16)(nn.gelu(nn.Dense(32)(nn.LayerNorm()(x))))


class RawOps(nn.Module):
    """A user module calling jnp/lax directly on its own params."""

    @nn.compact
    def __call__(self, x):
        w = self.param('w', nn.initializers.normal(1.0), (16, 8))
        v = self.param('v', nn.initializers.normal(1.0), (16, 8))
        return jnp.einsum('bd,df->bf', x, w) + jnp.dot(x, v) + jax.lax.dot_general(x, w, DN)


def ptq_params(model, rules, x, stats=None):
    ptq = fi.quantize_model(model, fi.PtqProvider(rules))
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)['params']
    fp = model.init(jax.random.key(0), x)['params']
    return ptq, fp, fi.quantize_params(fp, abstract, stats)


def test_seed_program(x16):
    rules = [fi.QuantizationRule(module_path='.*', weight_qtype='int8', act_qtype='int8')]
    ptq, fp, params = ptq_params(MLP(), rules, x16)
    k0, k1 = params['Dense_0']['kernel'].array, params['Dense_1']['kernel'].array
    assert k0.qvalue.dtype == jnp.int8 and k0.qvalue.shape == (16, 64) and k0.scale.shape == (1, 64)
    assert k1.qvalue.shape == (64, 16) and k1.scale.shape == (1, 16)
    out = ptq.apply({'params': params}, x16)
    ref = MLP().apply({'params': fp}, x16)
    # Quantization error (w8a8: ~1% of the output scale), not rounding (~1e-6 of it): a statistical margin.
    assert float(jnp.max(jnp.abs(out - ref))) < 0.03 * float(jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize('wq, aq, tile', [('int8', 'int8', None), ('int4', 'int8', 8), ('nf4', None, 8),
                                          ('int8', 'float8_e4m3fn', None), ('int4', None, None)])
def test_mlp_equals_ops_on_same_quantized_operands(x16, wq, aq, tile):
    rules = [fi.QuantizationRule(weight_qtype=wq, act_qtype=aq, tile_size=tile)]
    ptq, fp, params = ptq_params(MLP(), rules, x16)
    k0, k1 = params['Dense_0']['kernel'].array, params['Dense_1']['kernel'].array
    if tile:
        assert k0.tiles == {0: tile} and k0.channelwise_axes == (1,)

    def act(h):
        if aq is None:
            return h
        return qarray.quantize(h, aq, channelwise_axes=(0,), tiles={1: tile} if tile else None)

    xa = act(x16)
    h = jax.nn.relu(qarray.dot_general(xa, k0, DN))
    ha = act(h)
    by_hand = qarray.dot_general(ha, k1, DN)
    out = ptq.apply({'params': params}, x16)
    # Two float32 evaluations of the same quantized network (see hidden_bound), then layer 2's dot.
    da = hidden_bound(x16, xa, k0, h, ha)
    assert_within(out, by_hand, propagate(ha, da, k1))
    # independent float64 reference on the same dequantized operands: one float32 evaluation
    ref = deq64(ha) @ deq64(k1)
    assert_within(out, ref, propagate(ha, da, k1, evals=1))


def test_quantize_params_equals_init_time_quantization(x16):
    rules = [fi.QuantizationRule(weight_qtype='int4', tile_size=8, act_qtype='int8')]
    ptq, fp, params = ptq_params(MLP(), rules, x16)
    init_params = ptq.init(jax.random.key(0), x16)['params']
    chex.assert_trees_all_equal(params, init_params)


def test_jit_apply_matches_eager(x16):
    rules = [fi.QuantizationRule(weight_qtype='int8', act_qtype='int8')]
    ptq, fp, params = ptq_params(MLP(), rules, x16)
    # One program vs op by op: two float32 evaluations of the w8a8 MLP (bound as in the test above).
    k0, k1 = params['Dense_0']['kernel'].array, params['Dense_1']['kernel'].array
    xa = qarray.quantize(x16, 'int8', channelwise_axes=(0,))
    h = jax.nn.relu(qarray.dot_general(xa, k0, DN))
    ha = qarray.quantize(h, 'int8', channelwise_axes=(0,))
    assert_within(jax.jit(ptq.apply)({'params': params}, x16), ptq.apply({'params': params}, x16),
                  propagate(ha, hidden_bound(x16, xa, k0, h, ha), k1))


def test_cnn_conv_per_output_channel_and_acts_per_tensor():
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
    rules = [fi.QuantizationRule(weight_qtype='int8', act_qtype='int8')]
    ptq, fp, params = ptq_params(CNN(), rules, x)
    kc = params['Conv_0']['kernel'].array
    assert kc.scale.shape == (1, 1, 1, 8)
    xq = qarray.quantize(x, 'int8')
    conv = qarray.conv_general_dilated(
        xq, kc, (1, 1), 'SAME', dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, kc.shape,
                                                                                 ('NHWC', 'HWIO', 'NHWC')))
    h = jax.nn.relu(conv + params['Conv_0']['bias']).reshape(2, -1)
    ha = qarray.quantize(h, 'int8', channelwise_axes=(0,))
    by_hand = qarray.dot_general(ha, params['Dense_0']['kernel'].array, DN) + params['Dense_0']['bias']
    # Two float32 evaluations: the conv (27 terms, + the bias add: u |h| each) feeds the requantized dense.
    b0 = np.asarray(params['Conv_0']['bias'], np.float64)
    dconv = propagate_conv(xq, requantized_bound(x, 0, xq), kc, window_strides=(1, 1), padding='SAME',
                           dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    dh = (dconv + 2 * U32 * (np.abs(np.asarray(conv, np.float64)) + np.abs(b0))).reshape(2, -1)
    dout = propagate(ha, requantized_bound(h, dh, ha), params['Dense_0']['kernel'].array)
    dout += 2 * U32 * np.abs(np.asarray(by_hand, np.float64))  # the bias add
    assert_within(ptq.apply({'params': params}, x), by_hand, dout)


def test_attention_block_quantizes_every_projection():
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    rules = [fi.QuantizationRule(weight_qtype='int8', act_qtype='int8')]
    ptq, fp, params = ptq_params(Block(), rules, x)
    attn = params['MultiHeadDotProductAttention_0']
    for name in ('query', 'key', 'value', 'out'):
        assert isinstance(attn[name]['kernel'], fi.QuantizedParam)
    out = ptq.apply({'params': params}, x)
    ref = Block().apply({'params': fp}, x)
    assert float(jnp.max(jnp.abs(out - ref))) < 0.1  # w8a8 quantization error (|ref| ~ 3): not rounding


def test_weight_only_attention_leaves_act_act_einsums_float():
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    seen = []

    class Spy(fi.PtqProvider):
        def process_op(self, op):
            seen.append((op.path, op.call.name, op.weight is not None))
            return super().process_op(op)

    rules = [fi.QuantizationRule(weight_qtype='int8')]
    ptq = fi.quantize_model(Block(), Spy(rules))
    ptq.init(jax.random.key(0), x)
    einsums = [s for s in seen if s[1] == 'einsum']
    assert len(einsums) == 2 and not any(w for _, _, w in einsums)
    assert ('MultiHeadDotProductAttention_0/query', 'dot_general', True) in seen


def test_user_module_raw_ops_find_weights_by_param():
    x = jax.random.normal(jax.random.key(1), (3, 16))
    rules = [fi.QuantizationRule(weight_qtype='int8', act_qtype='int8')]
    ptq, fp, params = ptq_params(RawOps(), rules, x)
    assert isinstance(params['w'], fi.QuantizedParam) and isinstance(params['v'], fi.QuantizedParam)
    xq = qarray.quantize(x, 'int8', channelwise_axes=(0,))
    w, v = params['w'].array, params['v'].array
    by_hand = (qarray.einsum('bd,df->bf', xq, w) + qarray.dot_general(xq, v, DN)
               + qarray.dot_general(xq, w, DN))
    # Two float32 evaluations of three K=16 ops on the same input codes (near-ties only), then two adds.
    dxq = requantized_bound(x, 0, xq)
    sums = 2 * abs_dot(xq, w) + abs_dot(xq, v)
    bound = 2 * propagate(xq, dxq, w) + propagate(xq, dxq, v) + 2 * gamma(2) * sums
    assert_within(ptq.apply({'params': params}, x), by_hand, bound)


def test_static_range_calibration_and_ptq(x16):
    rules = [fi.QuantizationRule(weight_qtype='int8', act_qtype='int8', act_static_scale=True)]
    x2 = 3.0 * x16[:4]
    fp = MLP().init(jax.random.key(0), x16)['params']
    stats = fi.calibrate(MLP(), fp, [x16, x2], rules=rules, progress=False)
    s0 = stats['Dense_0']['dot_general0_lhs']
    assert int(s0['count']) == 2 and s0['hi'].shape == (1, 1)
    expected = np.mean([np.abs(np.asarray(x16)).max(), np.abs(np.asarray(x2)).max()])
    # A float32 running mean of two exact maxima: a few roundings (gamma_4 = 2.4e-7) below 1e-6.
    np.testing.assert_allclose(float(s0['hi'][0, 0]), expected, rtol=1e-6)
    ptq, _, params = ptq_params(MLP(), rules, x16, stats)
    scale = params['Dense_0']['dot_general0_lhs_scale']
    core_scale = qarray.quantize(jnp.array([[expected, -expected]], jnp.float32), 'int8').scale  # core's absmax rule
    np.testing.assert_allclose(float(scale.scale[0, 0]), float(core_scale[0, 0]), rtol=1e-6)  # as above, x 1/bound
    xq = qarray.quantize_with_scale(x16, 'int8', scale.scale)
    h = jax.nn.relu(qarray.dot_general(xq, params['Dense_0']['kernel'].array, DN))
    hq = qarray.quantize_with_scale(h, 'int8', params['Dense_1']['dot_general0_lhs_scale'].scale)
    by_hand = qarray.dot_general(hq, params['Dense_1']['kernel'].array, DN)
    # Static scales: only codes at near-ties can move (hidden_bound with fixed scales).
    da = hidden_bound(x16, xq, params['Dense_0']['kernel'].array, h, hq, dynamic=False)
    assert_within(ptq.apply({'params': params}, x16), by_hand, propagate(hq, da, params['Dense_1']['kernel'].array))


def test_static_stats_shape_does_not_depend_on_sequence_length():
    rules = [fi.QuantizationRule(weight_qtype='int8', act_qtype='int8', act_static_scale=True, tile_size=8)]
    fp = Block().init(jax.random.key(0), jnp.ones((2, 5, 16)))['params']
    s5 = fi.calibrate(Block(), fp, [jnp.ones((2, 5, 16))], rules=rules, progress=False, jit=False)
    s9 = fi.calibrate(Block(), fp, [jnp.ones((1, 9, 16))], rules=rules, progress=False, jit=False)
    assert jax.tree.map(jnp.shape, s5) == jax.tree.map(jnp.shape, s9)


def test_minmax_static_scale_has_zero_point(x16):
    rules = [fi.QuantizationRule(weight_qtype='int8', act_qtype='int8', act_static_scale=True,
                                 act_calibration_method='minmax')]
    fp = MLP().init(jax.random.key(0), x16)['params']
    stats = fi.calibrate(MLP(), fp, [x16], rules=rules, progress=False)
    _, _, params = ptq_params(MLP(), rules, x16, stats)
    assert params['Dense_0']['dot_general0_lhs_scale'].zero_point is not None


def test_partitioned_metadata_carries_to_values_and_scales(x16):
    class Sharded(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(64, use_bias=False, kernel_init=nn.with_partitioning(
                nn.initializers.lecun_normal(), ('embed', 'mlp')))(x)

    ptq = fi.quantize_model(Sharded(), fi.PtqProvider([fi.QuantizationRule(weight_qtype='int8')]))
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), x16)['params']
    arr = abstract['Dense_0']['kernel'].array
    assert arr.qvalue.names == ('embed', 'mlp') and arr.scale.names == (None, 'mlp')
    specs = nn.get_partition_spec(abstract)
    assert tuple(specs['Dense_0']['kernel'].array.scale) == (None, 'mlp')
    fp = Sharded().init(jax.random.key(0), x16)['params']
    q = fi.quantize_params(fp, abstract)
    assert q['Dense_0']['kernel'].array.scale.names == (None, 'mlp')
    out = ptq.apply({'params': q}, x16)
    assert out.shape == (8, 64)


class ShardedPair(nn.Module):
    """A column-parallel then a row-parallel Dense, annotated with mesh axis names (optionally a mesh)."""
    mesh: object = None

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        x = nn.Dense(12, use_bias=False, kernel_init=nn.with_partitioning(init, (None, 'model'), mesh=self.mesh))(x)
        return nn.Dense(8, use_bias=False, kernel_init=nn.with_partitioning(init, ('model', None), mesh=self.mesh))(x)


def _names(abstract):
    return {k: (abstract[k]['kernel'].array.qvalue.names, abstract[k]['kernel'].array.scale.names)
            for k in ('Dense_0', 'Dense_1')}


def test_packed_and_tiled_axes_keep_mesh_names_without_a_mesh(x16):
    # int4 packs along the output axis: a column-parallel kernel keeps its 'model' axis on the packed bytes
    # (the user picks a mesh whose shards hold whole bytes); the tiled input axis of the scale keeps 'model'.
    ptq = fi.quantize_model(ShardedPair(), fi.PtqProvider([fi.QuantizationRule(weight_qtype='int4', tile_size=4)]))
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), x16)['params']
    assert _names(abstract) == {'Dense_0': ((None, 'model'), (None, 'model')),
                                'Dense_1': (('model', None), ('model', None))}


@pytest.mark.parametrize('model_axis, expected', [
    (2, {'Dense_0': ((None, 'model'), (None, 'model')), 'Dense_1': (('model', None), (None, None))}),
    (4, {'Dense_0': ((None, 'model'), (None, 'model')), 'Dense_1': ((None, None), (None, None))})])
def test_mesh_in_the_box_applies_the_qarray_sharding_rule(x16, model_axis, expected):
    # int4 kernels are packed along their contraction axis (axis 0). Dense_0 (16, 12), sharded along 12: not
    # the packed axis, kept at any split. Dense_1 (12, 8) sharded along its packed axis 12: shards of 12 / 2 = 6
    # values are 3 bytes (kept); of 3 values, 1.5 bytes (replicated); tiled by 4 along 12: 3 scale rows, which
    # no 2- or 4-way split holds.
    mesh = jax.sharding.AbstractMesh((2, model_axis), ('data', 'model'))
    ptq = fi.quantize_model(ShardedPair(mesh), fi.PtqProvider([fi.QuantizationRule(weight_qtype='int4',
                                                                                   tile_size=4)]))
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), x16)['params']
    assert all(isinstance(abstract[k]['kernel'], fi.QuantizedParam) for k in ('Dense_0', 'Dense_1'))
    assert _names(abstract) == expected
    float_specs = {'Dense_0': (None, 'model'), 'Dense_1': ('model', None)}
    for k, spec in float_specs.items():  # the same layout qarray.sharding.partition_specs gives for that mesh
        plain = jax.tree.map(lambda b: b.value, abstract[k]['kernel'].array,
                             is_leaf=lambda b: isinstance(b, nn.Partitioned))
        specs = qarray.sharding.partition_specs(plain, jax.sharding.PartitionSpec(*spec), mesh)
        assert (tuple(specs.qvalue), tuple(specs.scale)) == expected[k]


def test_boxes_with_a_concrete_mesh_are_still_quantized_and_run(x16):
    # unboxing a box with a mesh applies a sharding constraint (a new array): the weight is still found
    mesh = jax.make_mesh((1,), ('model',), axis_types=(jax.sharding.AxisType.Auto,))
    fp = ShardedPair(mesh).init(jax.random.key(0), x16)
    ptq = fi.quantize_model(ShardedPair(mesh), fi.PtqProvider([fi.QuantizationRule(weight_qtype='int8')]))
    v = ptq.init(jax.random.key(0), x16)
    assert isinstance(v['params']['Dense_0']['kernel'], fi.QuantizedParam)
    out = jax.jit(ptq.apply)(v, x16)
    ref = ShardedPair(mesh).apply(fp, x16)
    assert float(jnp.max(jnp.abs(out - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))  # int8 error, not rounding


def test_unused_rules_are_reported(x16):
    p = fi.PtqProvider([fi.QuantizationRule(module_path='Dense_0', weight_qtype='int8'),
                        fi.QuantizationRule(module_path='Densse_1', weight_qtype='int8')])
    fi.quantize_model(MLP(), p).init(jax.random.key(0), x16)
    with pytest.warns(UserWarning, match='Densse_1'):
        unused = p.report_unused_rules()
    assert [r.module_path for r in unused] == ['Densse_1']


def test_unmatched_modules_stay_float(x16):
    rules = [fi.QuantizationRule(module_path='Dense_0', weight_qtype='int8')]
    ptq, fp, params = ptq_params(MLP(), rules, x16)
    assert isinstance(params['Dense_0']['kernel'], fi.QuantizedParam)
    assert isinstance(params['Dense_1']['kernel'], jax.Array)


# ----------------------------------------------------------------------------- errors
def test_float_params_fed_to_ptq_model_raise(x16):
    ptq = fi.quantize_model(MLP(), fi.PtqProvider([fi.QuantizationRule(weight_qtype='int8')]))
    fp = MLP().init(jax.random.key(0), x16)['params']
    with pytest.raises(fi.FloatParamError, match='quantize_params'):
        ptq.apply({'params': fp}, x16)


def test_missing_static_scale_raises(x16):
    rules = [fi.QuantizationRule(weight_qtype='int8', act_qtype='int8', act_static_scale=True)]
    ptq = fi.quantize_model(MLP(), fi.PtqProvider(rules))
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), x16)['params']
    fp = MLP().init(jax.random.key(0), x16)['params']
    with pytest.raises(ValueError, match='quant_stats'):
        fi.quantize_params(fp, abstract)
    stats = fi.calibrate(MLP(), fp, [x16], rules=rules, progress=False)
    params = fi.quantize_params(fp, abstract, stats)
    weights_only = {k: {'kernel': v['kernel']} for k, v in params.items()}  # static scales dropped
    with pytest.raises(ValueError, match='static activation scale'):
        ptq.apply({'params': weights_only}, x16)


def test_conv_with_tile_size_raises():
    x = jnp.ones((1, 6, 6, 3))
    ptq = fi.quantize_model(CNN(), fi.PtqProvider([fi.QuantizationRule(weight_qtype='int8', tile_size=3)]))
    with pytest.raises(ValueError, match='tile_size'):
        ptq.init(jax.random.key(0), x)


def test_tile_that_does_not_divide_leaves_a_partial_tile(x16):
    ptq = fi.quantize_model(MLP(), fi.PtqProvider([fi.QuantizationRule(weight_qtype='int4', tile_size=5)]))
    params = ptq.init(jax.random.key(0), x16)['params']
    for layer in params.values():
        q = layer['kernel'].array
        n_in = q.shape[0]  # [in, out]: tiles of 5 along in, the last one partial
        assert q.scale.shape[0] == -(-n_in // 5) and q.tile_sizes == ((-2, 5),), (q.scale.shape, q.tile_sizes)


def test_errors_inside_an_op_name_the_module():
    # nvfp4's tensor scale needs whole blocks of 16: 20 input features cannot be quantized, and the error says where
    ptq = fi.quantize_model(nn.Dense(3), fi.PtqProvider([fi.QuantizationRule(weight_qtype='nvfp4')]))
    with pytest.raises(ValueError, match=r"multiple of 16") as e:
        ptq.init(jax.random.key(0), jnp.ones((2, 20)))
    assert any("module '<root>', op dot_general0" in n for n in e.value.__notes__)


def test_quantized_param_shape_mismatch_raises(x16):
    ptq, fp, params = ptq_params(MLP(), [fi.QuantizationRule(weight_qtype='int8')], x16)
    with pytest.raises(ValueError, match='declares'):
        fi.quantize_model(MLP(dhidden=32), ptq._qarray_provider).apply({'params': params}, x16)


def test_quantize_model_argument_errors(x16):
    p = fi.PtqProvider([])
    with pytest.raises(ValueError, match='sample_inputs'):
        fi.quantize_model(MLP(), p, x16)
    with pytest.raises(TypeError, match='model'):
        fi.quantize_model(object(), p)
    with pytest.raises(TypeError, match='provider'):
        fi.quantize_model(MLP(), [fi.QuantizationRule()])
    with pytest.raises(ValueError, match='methods'):
        fi.quantize_model(MLP(), p, methods=('encode',))


def test_quantize_params_errors(x16):
    ptq = fi.quantize_model(MLP(), fi.PtqProvider([fi.QuantizationRule(weight_qtype='int8')]))
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), x16)['params']
    fp = MLP().init(jax.random.key(0), x16)['params']
    with pytest.raises(ValueError, match='missing'):
        fi.quantize_params({'Dense_0': fp['Dense_0']}, abstract)
    with pytest.raises(ValueError, match='allow_extra_params'):
        fi.quantize_params({**fp, 'Extra': {'w': jnp.ones(2)}}, abstract)
    assert 'Extra' not in fi.quantize_params({**fp, 'Extra': {'w': jnp.ones(2)}}, abstract, allow_extra_params=True)
    with pytest.raises(ValueError, match='shape'):
        fi.quantize_params({'Dense_0': {'kernel': jnp.ones((4, 4))}, 'Dense_1': fp['Dense_1']}, abstract)
    with pytest.raises(TypeError, match='abstract_quantized_params'):
        fi.quantize_params(fp, 3)


def test_stats_with_zero_count_raise(x16):
    rules = [fi.QuantizationRule(weight_qtype='int8', act_qtype='int8', act_static_scale=True)]
    calib = fi.quantize_model(MLP(), fi.CalibrationProvider(rules))
    stats = calib.init(jax.random.key(0), x16)['quant_stats']  # count 0
    ptq = fi.quantize_model(MLP(), fi.PtqProvider(rules))
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), x16)['params']
    with pytest.raises(ValueError, match='count 0'):
        fi.quantize_params(MLP().init(jax.random.key(0), x16)['params'], abstract, stats)


def test_calibrate_errors(x16):
    fp = MLP().init(jax.random.key(0), x16)['params']
    with pytest.raises(ValueError, match='rules'):
        fi.calibrate(MLP(), fp, [x16])
    with pytest.raises(ValueError, match='batches'):
        fi.calibrate(MLP(), fp, [], rules=[fi.QuantizationRule(act_qtype='int8', act_static_scale=True)])
    with pytest.raises(TypeError, match='model'):
        fi.calibrate(object(), fp, [x16])
