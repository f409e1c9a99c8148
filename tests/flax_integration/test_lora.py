"""LoRA / QLoRA: adapter math vs numpy, packed frozen base, adapter-only optimizer state, merge, Linen and NNX."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import qarray
from examples.digits import train
from flax_integration import (LoraProvider, LoraRule, PtqProvider, QuantizedParam, lora_param_count,
                              lora_trainable, merge_lora, quantize_model, quantize_params, with_base_weights)
from tiny_models import CNN, NnxCNN
from tolerances import U32, abs_dot, assert_within, einsum_bound, gamma, propagate, propagate_conv


class Raw(nn.Module):
    """einsums whose weight output axes land in permuted output positions, and a Dense."""

    @nn.compact
    def __call__(self, x):  # x: (b, t, 16)
        w = self.param('w', nn.initializers.normal(1.0), (5, 16, 3))
        v = self.param('v', nn.initializers.normal(1.0), (3, 16))
        y = jnp.einsum('btd,ndh->bnth', x, w)
        z = jnp.einsum('btd,hd->bht', x, v)
        return y, z, nn.Dense(4, name='dense')(x)


X3 = jax.random.normal(jax.random.key(1), (2, 4, 16))
XI = np.asarray(jax.random.uniform(jax.random.key(3), (64, 8, 8, 1)))
YI = np.arange(64) % 5
QLORA = [LoraRule(rank=2, alpha=4.0, weight_qtype='nf4', tile_size=16, op_names=('dot_general',)),
         LoraRule(rank=2, alpha=4.0, weight_qtype='int4')]


def _f64(a):
    return np.asarray(qarray.dequantize(a.array) if isinstance(a, QuantizedParam) else a, np.float64)


def _nonzero_adapters(params, seed=0):
    """Give every adapter (B included) random values so the adapter term is not zero."""
    rng = np.random.default_rng(seed)

    def f(path, leaf):
        name = str(getattr(path[-1], 'key', ''))
        return jnp.asarray(rng.normal(size=leaf.shape) * 0.3, leaf.dtype) if lora_trainable(name) else leaf
    return jax.tree_util.tree_map_with_path(f, params)


# --------------------------------------------------------------------------- rules
def test_rule_validation_and_provider_forms():
    assert LoraRule(rank=4, alpha=8.0).scaling == 2.0
    assert LoraRule(rank=4).alpha == 4.0
    with pytest.raises(ValueError, match='rank'):
        LoraRule(rank=0)
    with pytest.raises(ValueError, match='alpha'):
        LoraRule(rank=2, alpha=float('nan'))
    with pytest.raises(ValueError, match='dropout'):
        LoraRule(rank=2, dropout=1.0)
    assert LoraProvider(module_path='.*', rank=3).rules.rules[0].rank == 3
    with pytest.raises(ValueError, match='rules'):
        LoraProvider([LoraRule(rank=2)], rank=3)


# --------------------------------------------------------------------------- adapter math
@pytest.mark.parametrize('weight_qtype', [None, 'nf4'])
def test_linen_adapter_output_matches_numpy(weight_qtype):
    rules = [LoraRule(rank=2, alpha=3.0, weight_qtype=weight_qtype, tile_size=8 if weight_qtype else None)]
    lora = quantize_model(Raw(), LoraProvider(rules))
    p = _nonzero_adapters(lora.init(jax.random.key(0), X3)['params'])
    assert p['w_lora_a'].shape == (16, 2) and p['w_lora_b'].shape == (2, 5, 3)
    assert p['v_lora_a'].shape == (16, 2) and p['v_lora_b'].shape == (2, 3)
    assert p['dense']['kernel_lora_a'].shape == (16, 2) and p['dense']['kernel_lora_b'].shape == (2, 4)
    y, z, d = lora.apply({'params': p}, X3)
    x = np.asarray(X3, np.float64)
    s = 3.0 / 2
    w, v, k = _f64(p['w']), _f64(p['v']), _f64(p['dense']['kernel'])
    y_ref = np.einsum('btd,ndh->bnth', x, w) + np.einsum('btd,dr,rnh->bnth', x, p['w_lora_a'], p['w_lora_b']) * s
    z_ref = np.einsum('btd,hd->bht', x, v) + np.einsum('btd,dr,rh->bht', x, p['v_lora_a'], p['v_lora_b']) * s
    d_ref = x @ k + _f64(p['dense']['bias']) + x @ p['dense']['kernel_lora_a'] @ p['dense']['kernel_lora_b'] * s
    # One float32 evaluation vs float64: the base einsum (16 terms), the adapter x . A . B (16 + 2 terms) times
    # s, their sum (u), the Dense bias (u).
    a = {n: p[n] for n in ('w_lora_a', 'w_lora_b', 'v_lora_a', 'v_lora_b')}
    bounds = (einsum_bound('btd,ndh->bnth', x, w, k=16) + s * einsum_bound('btd,dr,rnh->bnth', x, a['w_lora_a'],
                                                                           a['w_lora_b'], k=18),
              einsum_bound('btd,hd->bht', x, v, k=16) + s * einsum_bound('btd,dr,rh->bht', x, a['v_lora_a'],
                                                                         a['v_lora_b'], k=18),
              einsum_bound('btd,de->bte', x, k, k=16) + s * einsum_bound(
                  'btd,dr,re->bte', x, p['dense']['kernel_lora_a'], p['dense']['kernel_lora_b'], k=18))
    for got, ref, bound in zip((y, z, d), (y_ref, z_ref, d_ref), bounds):
        assert_within(got, ref, bound + 2 * U32 * np.abs(ref))


def test_conv_adapter_and_zero_b_changes_nothing():
    lora = quantize_model(CNN(), LoraProvider(QLORA))
    x = jnp.asarray(XI[:4])
    p = lora.init(jax.random.key(0), x)['params']
    assert p['Conv_0']['kernel_lora_a'].shape == (3, 3, 1, 2) and p['Conv_0']['kernel_lora_b'].shape == (2, 4)
    # B starts at zero: the model computes exactly its PTQ base
    ptq = quantize_model(CNN(), PtqProvider(QLORA))
    base = {m: {k: v for k, v in d.items() if not lora_trainable(k)} for m, d in p.items()}
    np.testing.assert_array_equal(np.asarray(lora.apply({'params': p}, x)),
                                  np.asarray(ptq.apply({'params': base}, x)))
    # conv adapter = conv with the low-rank kernel A B (float64 reference via the merged float model)
    p = _nonzero_adapters(p)
    a, b = np.asarray(p['Conv_0']['kernel_lora_a'], np.float64), np.asarray(p['Conv_0']['kernel_lora_b'])
    dw = np.einsum('hwir,ro->hwio', a, b) * 2.0
    merged = merge_lora(lora, p, x)
    # W + A B * 2 in float32: the rank-2 sum and the add (gamma_3), and the dequantize (u).
    dw_abs = np.einsum('hwir,ro->hwio', np.abs(a), np.abs(b)) * 2.0
    assert_within(merged['Conv_0']['kernel'], _f64(p['Conv_0']['kernel']) + dw, gamma(4) * (
        np.abs(_f64(p['Conv_0']['kernel'])) + dw_abs))
    assert_within(CNN().apply({'params': merged}, x), lora.apply({'params': p}, x), _merged_cnn_bound(p, x))
    assert set(merged['Dense_0']) == {'kernel', 'bias'} and merged['Dense_0']['kernel'].dtype == jnp.float32


def _merged_cnn_bound(p, x):
    """|float CNN on merged weights - QLoRA CNN| (tiny_models.CNN, weight-only: no activation codes): two float32
    evaluations of the conv (9 terms + the rank-2 adapter) and the dense (64 + 2), each with its weight
    |W| + |A||B| s (the merged weight rounds once more: + u), the bias adds (u each), relu 1-Lipschitz."""
    kw = dict(window_strides=(2, 2), padding='SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    c, d = p['Conv_0'], p['Dense_0']
    wc = np.abs(_f64(c['kernel'])) + 2.0 * np.einsum('hwir,ro->hwio', np.abs(np.asarray(c['kernel_lora_a'])),
                                                     np.abs(np.asarray(c['kernel_lora_b'])))
    wd = np.abs(_f64(d['kernel'])) + 2.0 * np.abs(np.asarray(d['kernel_lora_a'])) @ np.abs(np.asarray(d['kernel_lora_b']))
    conv = np.asarray(jax.lax.conv_general_dilated(jnp.asarray(x), jnp.asarray(wc, jnp.float32), **kw), np.float64)
    dh = propagate_conv(x, 0, wc, extra=2 + 4, **kw) + 2 * U32 * (conv + np.abs(np.asarray(c['bias'])))
    h = np.maximum(conv, 0).reshape(x.shape[0], -1) + np.abs(np.asarray(c['bias'])).max()  # |h| upper bound
    return propagate(h, dh.reshape(h.shape), wd, extra=2 + 4) + 2 * U32 * (abs_dot(h, wd) + np.abs(np.asarray(d['bias'])))


# --------------------------------------------------------------------------- QLoRA training, Linen
def test_linen_qlora_trains_adapters_only_and_base_stays_packed():
    model = CNN()
    fp = model.init(jax.random.key(0), XI[:1])['params']
    lora = quantize_model(model, LoraProvider(QLORA))
    params = with_base_weights(lora.init(jax.random.key(1), XI[:1])['params'], fp)
    # the base is quantized exactly as PTQ would quantize the float weights
    ptq = quantize_model(model, PtqProvider(QLORA))
    ref = quantize_params(fp, jax.eval_shape(ptq.init, jax.random.key(0), XI[:1])['params'])
    np.testing.assert_array_equal(np.asarray(params['Dense_0']['kernel'].array.qvalue),
                                  np.asarray(ref['Dense_0']['kernel'].array.qvalue))
    adapters, frozen = train.split_params(params, lora_trainable)
    opt_state = optax.adam(1e-2).init(adapters)
    adapter_shapes = sorted(l.shape for l in jax.tree.leaves(adapters))
    assert sorted(l.shape for l in jax.tree.leaves(opt_state) if l.ndim) == sorted(adapter_shapes * 2)
    assert lora_param_count(params) == sum(int(np.prod(s)) for s in adapter_shapes) == 3 * 3 * 2 + 2 * 4 + 64 * 2 + 2 * 5
    losses: list = []
    trained = train.train_linen(lora, {'params': params}, XI, YI, steps=30, batch=32, lr=3e-2,
                                trainable=lora_trainable, losses=losses)['params']
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    for path, before in jax.tree_util.tree_leaves_with_path(params):
        after = trained
        for k in path:
            after = after[k.key] if hasattr(k, 'key') else getattr(after, k.name)
        name = '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)
        if lora_trainable(name):
            if name.endswith('_lora_b'):
                assert not np.array_equal(np.asarray(before), np.asarray(after)), name
        else:  # base weights, scales and biases: bit-identical
            np.testing.assert_array_equal(np.asarray(before), np.asarray(after), err_msg=name)
    for m in ('Conv_0', 'Dense_0'):
        k = trained[m]['kernel']
        assert isinstance(k, QuantizedParam) and k.array.qvalue.dtype == jnp.uint8
        packed = list(k.shape)
        a = k.array.packed_axis % len(packed)
        packed[a] = -(-packed[a] * 4 // 8)  # 4 bits per value, packed along one axis
        assert k.array.qvalue.shape == tuple(packed)
    # Dense_0 [64, 5] is packed along its contraction axis; the conv's 1 input channel would pad, so not that one
    axes = [trained[m]['kernel'].array.packed_axis % trained[m]['kernel'].ndim for m in ('Dense_0', 'Conv_0')]
    assert axes == [0, 3]
    assert not any(isinstance(l, jax.Array) and l.dtype == jnp.float32 and l.shape == (64, 5)
                   for l in jax.tree.leaves(trained))  # no float copy of the base kernel anywhere


def test_linen_dropout_only_with_rng():
    rules = [LoraRule(rank=2, dropout=0.5)]
    lora = quantize_model(nn.Dense(3), LoraProvider(rules))
    x = jnp.ones((2, 8))
    p = _nonzero_adapters(lora.init(jax.random.key(0), x)['params'])
    y0 = lora.apply({'params': p}, x)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(lora.apply({'params': p}, x)))
    y1 = lora.apply({'params': p}, x, rngs={'dropout': jax.random.key(1)})
    assert not np.allclose(np.asarray(y0), np.asarray(y1))  # dropout of half the inputs: an O(1) change


# --------------------------------------------------------------------------- NNX
def test_nnx_qlora_lora_params_optimizer_and_merge():
    fp = NnxCNN(nnx.Rngs(0))
    x = jnp.asarray(XI[:4])
    lora = quantize_model(fp, LoraProvider(QLORA), x)
    assert isinstance(lora.fc.kernel, QuantizedParam) and lora.fc.kernel.array.qvalue[...].dtype == jnp.uint8
    assert isinstance(lora.fc.kernel_lora_a, nnx.LoRAParam) and lora.fc.kernel_lora_b[...].shape == (2, 5)
    np.testing.assert_array_equal(np.asarray(lora.fc.kernel_lora_b[...]), 0)
    optimizer = nnx.Optimizer(lora, optax.adam(1e-2), wrt=nnx.LoRAParam)
    opt_shapes = sorted(l.shape for l in jax.tree.leaves(nnx.state(optimizer, nnx.OptState)) if l.ndim)
    adapter_shapes = sorted(l.shape for l in jax.tree.leaves(nnx.state(lora, nnx.LoRAParam)))
    assert opt_shapes == sorted(adapter_shapes * 2)
    base_before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(lora, nnx.Not(nnx.LoRAParam))))
    losses: list = []
    train.train_nnx(lora, XI, YI, steps=30, batch=32, lr=3e-2, wrt=nnx.LoRAParam, losses=losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    base_after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(lora, nnx.Not(nnx.LoRAParam))))
    jax.tree.map(np.testing.assert_array_equal, base_before, base_after)
    assert lora_param_count(lora) == sum(int(np.prod(s)) for s in adapter_shapes)
    merged = merge_lora(lora, None, x)
    s = nnx.state(fp, nnx.Param)
    nnx.replace_by_pure_dict(s, merged)
    nnx.update(fp, s)
    params = {'Conv_0': {'kernel': lora.conv.kernel[...], 'bias': lora.conv.bias[...],
                         'kernel_lora_a': lora.conv.kernel_lora_a[...], 'kernel_lora_b': lora.conv.kernel_lora_b[...]},
              'Dense_0': {'kernel': lora.fc.kernel[...], 'bias': lora.fc.bias[...],
                          'kernel_lora_a': lora.fc.kernel_lora_a[...], 'kernel_lora_b': lora.fc.kernel_lora_b[...]}}
    assert_within(fp(x), lora(x), _merged_cnn_bound(params, x))  # the same network as the Linen CNN


def test_nnx_dropout_follows_train_eval():
    lora = quantize_model(nnx.Linear(8, 3, rngs=nnx.Rngs(0)), LoraProvider([LoraRule(rank=2, dropout=0.5)]),
                          jnp.ones((1, 8)))
    lora.kernel_lora_b[...] = jnp.ones((2, 3))
    x = jnp.ones((4, 8))
    assert not np.allclose(np.asarray(lora(x)), np.asarray(lora(x)))  # fresh dropout masks: an O(1) change
    lora.eval()
    np.testing.assert_array_equal(np.asarray(lora(x)), np.asarray(lora(x)))


# --------------------------------------------------------------------------- errors
def test_helper_errors_name_the_argument():
    with pytest.raises(TypeError, match='LoraProvider'):
        merge_lora(quantize_model(nn.Dense(2), PtqProvider([])), {}, jnp.ones((1, 2)))
    lora = quantize_model(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), LoraProvider([LoraRule(rank=1)]), jnp.ones((1, 2)))
    with pytest.raises(ValueError, match='params'):
        merge_lora(lora, {}, jnp.ones((1, 2)))
    with pytest.raises(ValueError, match='fp_params'):
        with_base_weights({'kernel': jnp.ones(2), 'kernel_lora_a': jnp.ones(2)}, {})
    with pytest.raises(ValueError, match='output axis'):
        m = quantize_model(_VecWeight(), LoraProvider([LoraRule(rank=1)]))
        m.init(jax.random.key(0), jnp.ones((2, 3)))


class _VecWeight(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.dot(x, self.param('w', nn.initializers.ones, (3,)))
