"""Quantized backward passes in the Flax layer: rules with bwd_qtype (QtRule), Linen and NNX training,
the lowered HLO of a training step, stochastic rounding from the 'quant' rng stream, and rule errors."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import flax_integration as fi
from hlo_lib import dot_types

X = jax.random.normal(jax.random.key(1), (8, 8))
Y = jax.random.randint(jax.random.key(2), (8,), 0, 4)
INT8 = fi.QtRule(weight_qtype='int8', act_qtype='int8', bwd_qtype='int8', fwd_quantized=True)
FP8 = fi.QtRule(weight_qtype='float8_e4m3fn', act_qtype='float8_e4m3fn', bwd_qtype='float8_e5m2',
                fwd_quantized=True)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.relu(nn.Dense(16)(x)))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1, self.l2 = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


def _linen_trainer(model, rule, x=X):
    m = fi.quantize_model(model, fi.QtProvider([rule]))
    params = m.init(jax.random.key(0), x)['params']
    opt = optax.adam(1e-2)

    def loss(p, key):
        logits = m.apply({'params': p}, x, rngs={'quant': key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()

    @jax.jit
    def step(p, s, key):
        value, g = jax.value_and_grad(loss)(p, key)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    return m, params, opt.init(params), step, loss


@pytest.mark.parametrize('rule,want', [
    # 2 forward dots; the backward: both kernels' gradients and the hidden activation's (the input needs none)
    (INT8, {('s8', 's8', 's32'): 5}),
    # forward e4m3 x e4m3 (fp8 codes upcast exactly: XLA's GPU rewrite makes it an fp8 GEMM); backward: the
    # gradient (e5m2) times the e4m3 residual
    (FP8, {('f8e4m3fn', 'f8e4m3fn', 'f32'): 2, ('f8e5m2', 'f8e4m3fn', 'f32'): 3}),
])
def test_linen_trains_and_the_lowered_step_has_low_precision_backward_dots(rule, want):
    _, p, s, step, _ = _linen_trainer(MLP(), rule)
    losses = []
    for i in range(4):
        p, s, value = step(p, s, jax.random.key(i))
        losses.append(float(value))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    dots = dot_types(step.lower(p, s, jax.random.key(0)).as_text(dialect='hlo'))
    assert {d: dots.count(d) for d in set(dots)} == want, dots


def test_conv_backward_is_quantized():
    x = jax.random.normal(jax.random.key(3), (8, 4, 4, 2))
    _, p, s, step, _ = _linen_trainer(CNN(), INT8, x)
    dots = dot_types(step.lower(p, s, jax.random.key(0)).as_text(dialect='hlo'))
    # forward conv + dense, backward: the conv kernel's gradient, the dense kernel's and the conv output's
    assert dots.count(('s8', 's8', 's32')) == 5, dots


def test_bwd_qtype_gradients_close_to_float_qat_gradients():
    # Same forward (fake quant): the quantized backward only rounds g and the residuals, ~1% at int8.
    plain = fi.QuantizationRule(weight_qtype='int8', act_qtype='int8')
    qt = fi.QuantizationRule(weight_qtype='int8', act_qtype='int8', bwd_qtype='int8')
    grads = []
    for r in (plain, qt):
        _, params, _, _, loss = _linen_trainer(MLP(), r)
        grads.append(jax.jit(jax.grad(loss))(params, jax.random.key(0)))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        # each backward element is a sum of products of two int8-rounded values: relative error per term at
        # most 2 * (1/255) + (1/255)^2 of the largest magnitude in its channel; 4x that bounds the sum here.
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 4 * 2.01 / 255 * np.abs(np.asarray(a)).max() + 1e-7


def test_linen_stochastic_rounding_reproducible_from_the_quant_stream():
    rule = fi.QtRule(weight_qtype='int8', act_qtype='int8', bwd_qtype='int8', bwd_stochastic_rounding='uniform')
    _, p, _, _, loss = _linen_trainer(MLP(), rule)
    grad = jax.jit(jax.grad(loss))
    a, b, c = grad(p, jax.random.key(5)), grad(p, jax.random.key(5)), grad(p, jax.random.key(6))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert any(not np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(c)))
    m = fi.quantize_model(MLP(), fi.QtProvider([rule]))
    with pytest.raises(ValueError, match="needs the 'quant' rng stream"):
        jax.grad(lambda p: m.apply({'params': p}, X).sum())(p)


def _nnx_loss(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(X), Y).mean()


def _nnx_grads(rule, quant_seed):
    model = fi.quantize_model(NnxMLP(nnx.Rngs(0)), fi.QtProvider([rule]), X)
    if quant_seed is not None:
        model.rngs = nnx.Rngs(quant=quant_seed)
    return model, _nnx_loss


def test_nnx_trains_with_stochastic_rounding_from_an_rngs_quant_stream():
    rule = fi.QtRule(weight_qtype='int8', act_qtype='int8', bwd_qtype='int8', bwd_stochastic_rounding='uniform')
    model, loss = _nnx_grads(rule, 0)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(m, o):
        value, g = nnx.value_and_grad(loss)(m)
        o.update(m, g)
        return value

    losses = [float(step(model, opt)) for _ in range(4)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]

    grads = {}
    grad = nnx.jit(nnx.grad(_nnx_loss))
    for name, seed in (('a', 3), ('b', 3), ('c', 4)):
        m, _ = _nnx_grads(rule, seed)
        grads[name] = jax.tree.leaves(nnx.state(grad(m), nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, grads['a'], grads['b'])
    assert any(not np.array_equal(u, v) for u, v in zip(grads['a'], grads['c']))
    m, loss = _nnx_grads(rule, None)
    with pytest.raises(ValueError, match="needs the 'quant' rng stream"):
        nnx.grad(loss)(m)


def test_qtrule_takes_qwix_fields():
    r = fi.QtRule(module_path='.*', weight_qtype='int8', act_qtype='int8', bwd_qtype='int8',
                  bwd_calibration_method='absmax', bwd_weight_grad_tile_size=128, bwd_stochastic_rounding='uniform',
                  disable_channelwise_axes=False, channelwise_noise_axes=None, additional_qt_config=None)
    assert isinstance(r, fi.QuantizationRule) and r.quantized_backward
    assert not fi.QuantizationRule(weight_qtype='int8').quantized_backward


@pytest.mark.parametrize('kw,match', [
    (dict(bwd_qtype='int9'), 'bwd_qtype'),
    (dict(bwd_qtype='mxfp8'), 'microscaling'),
    (dict(bwd_qtype='int8', bwd_residual_qtype='nope'), 'bwd_residual_qtype'),
    (dict(bwd_qtype='int8', bwd_tile_size=0), 'bwd_tile_size must be None or a positive int'),
    (dict(bwd_qtype='int8', bwd_weight_grad_tile_size=0.5), 'fractional'),
    (dict(bwd_qtype='int8', bwd_calibration_method='bogus'), 'bogus'),
    (dict(bwd_qtype='int8', bwd_stochastic_rounding='low_bit_uniform'), 'low_bit_uniform'),
    (dict(bwd_stochastic_rounding='uniform'), 'set bwd_qtype too'),
    (dict(bwd_tile_size=128), 'set bwd_qtype too'),
    (dict(weight_qtype=None, fwd_quantized=True), 'fwd_quantized=True'),
    (dict(bwd_qtype='int8', disable_channelwise_axes=True), 'disable_channelwise_axes'),
    (dict(bwd_qtype='int8', channelwise_noise_axes=(0,)), 'channelwise_noise_axes'),
    (dict(bwd_qtype='int8', additional_qt_config={'x': 1}), 'additional_qt_config'),
])
def test_bad_backward_fields(kw, match):
    with pytest.raises(ValueError, match=match):
        fi.QtRule(**{'weight_qtype': 'int8', **kw})


def test_bad_backward_field_types():
    with pytest.raises(TypeError, match='fwd_quantized must be True or False'):
        fi.QuantizationRule(weight_qtype='int8', bwd_qtype='int8', fwd_quantized='yes')
