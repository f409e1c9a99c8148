"""QAT (QtProvider): PTQ-exact forward, straight-through gradients, quant_stats updates, Linen and NNX training."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import given, settings, strategies as st

import budget
import qarray
from flax_integration import (PtqProvider, QatProvider, QtProvider, QuantStat, QuantizationRule,
                              quantize_model, quantize_params)
from tiny_models import CNN, NnxCNN
from flax_integration.providers.calibration import update_moving_average
from qarray._fake_quant import fake_quant_with_scale
from examples.digits import train
from tolerances import (U32, assert_within, gamma, near_tie, propagate, propagate_conv, requantized_bound,
                        running_mean_bound)


X = jax.random.uniform(jax.random.key(1), (8, 8, 8, 1))
Y = jnp.arange(8) % 5

W4_STATIC = [QuantizationRule(weight_qtype='int4', act_qtype='int8', act_static_scale=True, tile_size=16,
                              op_names=('dot_general',)),
             QuantizationRule(weight_qtype='int4', act_qtype='int4', act_static_scale=True,
                              act_calibration_method='minmax')]
W8_DYNAMIC = [QuantizationRule(weight_qtype='int8', act_qtype='int8')]
NF4_WEIGHT_ONLY = [QuantizationRule(weight_qtype='nf4', tile_size=16, op_names=('dot_general',)),
                   QuantizationRule(weight_qtype='uint4', weight_calibration_method='minmax')]


def _cnn_forward_bound(x, conv_kernel, conv_bias, conv_act, dense_kernel, dense_bias, dense_act, act_qtype='int8'):
    """Bound on |QAT forward - PTQ forward| for tiny_models.CNN: float32 evaluations of one quantized net.

    Both quantize the same input (codes can differ only at near-ties of the float32 division), run the conv
    (9 terms) and the dense (64 terms) on the same quantized weights (fake-quantized floats vs QArrays), and
    requantize the hidden activation, whose codes can move by one step only where it sits within the conv's
    accumulation bound of a tie (tolerances.requantized_bound). Each side is bounded against the evaluation
    by hand here (two float32 evaluations: evals=2), the two sides against each other by twice that.
    ``*_act``: an ActivationScale (static), 'dynamic', or None (weight-only).
    """
    kw = dict(window_strides=(2, 2), padding='SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    kc, kd = conv_kernel.array, dense_kernel.array

    def act(v, a, **layout):
        if a is None:
            return v, lambda h, dh: dh
        if a == 'dynamic':
            q = qarray.quantize(v, act_qtype, **layout)
        else:
            q = qarray.quantize_with_scale(v, a.qtype, a.scale, a.zero_point)
        return q, lambda h, dh: requantized_bound(h, dh, q, dynamic=a == 'dynamic')

    xq, moved = act(jnp.asarray(x), conv_act)
    dx = moved(x, np.zeros(np.shape(x)))
    xd = qarray.dequantize(xq) if isinstance(xq, qarray.QArray) else xq
    conv = jax.lax.conv_general_dilated(xd, qarray.dequantize(kc), **kw) + conv_bias
    dconv = propagate_conv(xq, dx, kc, **kw) + 2 * U32 * np.abs(np.asarray(conv, np.float64))  # + the bias add
    h = jax.nn.relu(conv).reshape(x.shape[0], -1)   # relu is 1-Lipschitz
    hq, moved = act(h, dense_act, channelwise_axes=(0,))
    dh = moved(h, dconv.reshape(h.shape))
    y = qarray.dot_general(hq, kd, (((1,), (0,)), ((), ()))) + dense_bias
    return 2 * (propagate(hq, dh, kd) + 2 * U32 * np.abs(np.asarray(y, np.float64)))


def _cnn_bound(params, rules, x):
    """_cnn_forward_bound for the Linen CNN's PTQ params under one of the rule sets above."""
    conv, dense = params['Conv_0'], params['Dense_0']
    kind = {id(W4_STATIC): 'static', id(W8_DYNAMIC): 'dynamic', id(NF4_WEIGHT_ONLY): None}[id(rules)]
    acts = {'static': (conv.get('conv_general_dilated0_lhs_scale'), dense.get('dot_general0_lhs_scale')),
            'dynamic': ('dynamic', 'dynamic'), None: (None, None)}[kind]
    return _cnn_forward_bound(x, conv['kernel'], conv['bias'], acts[0], dense['kernel'], dense['bias'], acts[1])


def _ptq_params(model, rules, params, stats):
    ptq = quantize_model(model, PtqProvider(rules))
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), X)['params']
    return ptq, quantize_params(params, abstract, stats)


# --------------------------------------------------------------------------- numerics
@settings(max_examples=budget.examples(10))
@given(st.integers(0, 2 ** 31 - 1), st.sampled_from(['int8', 'int4', 'int3']))
def test_fake_quant_with_scale_matches_numpy(seed, qtype):
    x = np.random.default_rng(seed).normal(size=(6, 8)).astype(np.float32)
    s = np.float32(0.7 / {'int8': 127, 'int4': 7, 'int3': 3}[qtype])
    qmax = {'int8': 127, 'int4': 7, 'int3': 3}[qtype]
    y = fake_quant_with_scale(jnp.asarray(x), qtype, jnp.full((1, 1), s))
    ref = np.clip(np.round(x.astype(np.float64) / s), -qmax - 1, qmax) * s  # full two's-complement codes
    # code * s is one float32 product (u |ref|); the float32 division x * (1 / s) may pick the neighbouring code
    # (one step s) only where x / s is within a few ulps of a tie.
    tie = near_tie(x.astype(np.float64) / s, 4 * U32)
    assert_within(y, ref, np.where(tie, s, 0) + U32 * np.abs(ref) + 1e-30)
    g = jax.grad(lambda v: fake_quant_with_scale(v, qtype, jnp.full((1, 1), s)).sum())(jnp.asarray(x))
    x64 = x.astype(np.float64)
    inside = (x64 <= (qmax + 0.5) * s) & (x64 >= -(qmax + 1.5) * s)
    np.testing.assert_array_equal(np.asarray(g), inside.astype(np.float32))


def test_fake_quant_with_scale_plain_ste_and_zero_point():
    x = jnp.array([[-6.0, 0.1, 0.5, 9.0]])
    s, zp = jnp.full((1, 1), 0.05), jnp.full((1, 1), 100, jnp.int32)
    g = jax.grad(lambda v: fake_quant_with_scale(v, 'uint8', s, zp, ste='plain').sum())(x)
    np.testing.assert_array_equal(np.asarray(g), np.ones((1, 4)))
    y = fake_quant_with_scale(x, 'uint8', s, zp)
    codes = np.clip(np.round(np.asarray(x, np.float64) / 0.05) + 100, 0, 255)
    # x / s lands on integers (far from ties); (code - 100) * fl32(0.05) vs * 0.05: relative u < 1e-6.
    np.testing.assert_allclose(np.asarray(y), (codes - 100) * 0.05, rtol=1e-6)
    g = jax.grad(lambda v: fake_quant_with_scale(v, 'uint8', s, zp).sum())(x)
    np.testing.assert_array_equal(np.asarray(g), [[0.0, 1.0, 1.0, 0.0]])  # range (-5.025, 7.775)


def test_moving_average_is_mean_then_ema():
    his = np.array([1.0, 3.0, 2.0, 8.0, 4.0])
    s = {'lo': jnp.zeros(1), 'hi': jnp.zeros(1), 'count': jnp.zeros((), jnp.int32)}
    ref = 0.0
    for n, h in enumerate(his, 1):
        s = update_moving_average(s, jnp.array([-h]), jnp.array([h]), momentum=0.7)
        ref += (h - ref) * max(1.0 / n, 0.3)
    np.testing.assert_allclose(float(s['hi'][0]), ref, rtol=0, atol=running_mean_bound(len(his), his.max()))
    assert int(s['count']) == 5


# --------------------------------------------------------------------------- Linen
@pytest.mark.parametrize('rules,jit', [(W4_STATIC, True), (W8_DYNAMIC, True), (W8_DYNAMIC, False),
                                       (NF4_WEIGHT_ONLY, True)],
                         ids=['w4a8-static-jit', 'w8a8-jit', 'w8a8-eager', 'nf4-jit'])
def test_linen_qat_forward_equals_ptq_forward(rules, jit):
    model = CNN()
    qat = quantize_model(model, QtProvider(rules))
    v = qat.init(jax.random.key(0), X)
    if 'quant_stats' in v:  # one training-mode pass so the statistics are real
        _, upd = qat.apply(v, X * 1.3, mutable=['quant_stats'])
        v = {**v, **upd}
    y_qat = (jax.jit(qat.apply) if jit else qat.apply)(v, X)
    ptq, params = _ptq_params(model, rules, v['params'], v.get('quant_stats'))
    y_ptq = ptq.apply({'params': params}, X)
    assert_within(y_qat, y_ptq, _cnn_bound(params, rules, X))


def test_linen_stats_update_when_mutable_and_freeze_otherwise():
    rules = [QuantizationRule(weight_qtype='int8', act_qtype='int8', act_static_scale=True)]
    qat = quantize_model(nn.Dense(3), QtProvider(rules, momentum=0.5))
    x = jax.random.normal(jax.random.key(4), (4, 6))
    v = qat.init(jax.random.key(0), x)
    assert int(v['quant_stats']['dot_general0_lhs']['count']) == 0
    his = []
    for k in (1.0, 3.0, 2.0):
        _, upd = qat.apply(v, k * x, mutable=['quant_stats'])
        v = {**v, **upd}
        his.append(k * float(jnp.abs(x).max()))
    ref = 0.0
    for n, h in enumerate(his, 1):
        ref += (h - ref) * max(1.0 / n, 0.5)
    s = v['quant_stats']['dot_general0_lhs']
    assert int(s['count']) == 3
    np.testing.assert_allclose(float(s['hi'][0, 0]), ref, rtol=0, atol=running_mean_bound(3, max(his)))
    # eval (quant_stats not mutable): the stored range quantizes the input, whatever the batch holds
    scale = ref / 127.5  # symmetric int8: the calibrated absmax sits at the edge of the top code's cell
    y = qat.apply(v, 10 * x)
    xq = np.clip(np.round(10 * np.asarray(x, np.float64) / scale), -128, 127) * scale
    wq = np.asarray(jax.jit(lambda w: __import__('qarray').fake_quant(w, 'int8', channelwise_axes=(1,)))(
        v['params']['kernel']), np.float64)
    # The library's scale is hi * fl(1/127.5) from the float32 statistic: relative to ref / 127.5 within
    # running_mean_bound / hi + 2u. Codes can move by one step only where 10x / scale is that close to a tie
    # (+2u: the float32 division); then a K=6 float32 dot (vs float64) and the bias add.
    rel = running_mean_bound(3, max(his)) / ref + 4 * U32
    x10 = 10 * np.asarray(x, np.float64)
    dxq = np.where(near_tie(x10 / scale, rel), scale, 0) + np.abs(xq) * rel
    b = np.asarray(v['params']['bias'], np.float64)
    assert_within(y, xq @ wq + b, propagate(xq, dxq, wq, evals=1, extra=2) + U32 * np.abs(xq @ wq + b))


def test_linen_input_gradient_is_zero_outside_static_range():
    rules = [QuantizationRule(act_qtype='int8', act_static_scale=True)]
    model = nn.Dense(3, use_bias=False)
    qat = quantize_model(model, QtProvider(rules))
    x = jnp.array([[0.2, -0.5, 1.5, -3.0]])
    v = qat.init(jax.random.key(0), x)
    stats = {'dot_general0_lhs': {'lo': jnp.full((1, 1), -1.0), 'hi': jnp.full((1, 1), 1.0),
                                  'count': jnp.ones((), jnp.int32)}}
    g = jax.grad(lambda xx: qat.apply({'params': v['params'], 'quant_stats': stats}, xx).sum())(x)
    w = np.asarray(v['params']['kernel'], np.float64)
    inside = np.abs(np.asarray(x, np.float64)) <= 1.0  # range [-1, 1]: scale 1 / 127.5, cells included
    # g = 1 @ w^T masked: a float32 sum of 3 terms vs float64 (relative to sum |w|, not |sum w|).
    assert_within(g, inside * w.sum(1)[None, :], gamma(4) * np.abs(w).sum(1)[None, :])
    plain = quantize_model(model, QtProvider(rules, ste='plain'))
    gp = jax.grad(lambda xx: plain.apply({'params': v['params'], 'quant_stats': stats}, xx).sum())(x)
    assert_within(gp, np.broadcast_to(w.sum(1), (1, 4)), gamma(4) * np.abs(w).sum(1)[None, :])


def test_linen_weight_gradient_is_straight_through():
    rules = [QuantizationRule(weight_qtype='int4')]
    model = nn.Dense(3, use_bias=False)
    qat = quantize_model(model, QtProvider(rules))
    x = jax.random.normal(jax.random.key(2), (5, 4))
    p = qat.init(jax.random.key(0), x)['params']
    g = jax.grad(lambda pp: qat.apply({'params': pp}, x).sum())(p)['kernel']
    # every weight lies inside its absmax range: the gradient is the float one, x^T 1
    # x^T 1: a float32 sum of 5 terms vs float64 (relative to sum |x|).
    assert_within(g, np.asarray(x, np.float64).sum(0)[:, None] * np.ones((1, 3)),
                  gamma(6) * np.abs(np.asarray(x, np.float64)).sum(0)[:, None])


def test_linen_qat_training_with_optax_under_jit():
    qat = quantize_model(CNN(), QtProvider(W4_STATIC))
    v = qat.init(jax.random.key(0), X)
    x = np.asarray(jax.random.uniform(jax.random.key(3), (64, 8, 8, 1)))
    y = np.arange(64) % 5
    losses: list = []
    v = train.train_linen(qat, v, x, y, steps=40, batch=32, lr=1e-2, mutable=('quant_stats',), losses=losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert int(v['quant_stats']['Dense_0']['dot_general0_lhs']['count']) == 40
    ptq, params = _ptq_params(CNN(), W4_STATIC, v['params'], v['quant_stats'])
    assert_within(qat.apply(v, x[:8]), ptq.apply({'params': params}, x[:8]), _cnn_bound(params, W4_STATIC, x[:8]))


# --------------------------------------------------------------------------- NNX
def test_nnx_qat_train_eval_and_ptq_equivalence():
    model = NnxCNN(nnx.Rngs(0))
    qat = quantize_model(model, QtProvider(W4_STATIC), X)
    assert isinstance(qat.fc.kernel, nnx.Param)  # QAT keeps float weights: they train
    x = np.asarray(jax.random.uniform(jax.random.key(3), (64, 8, 8, 1)))
    y = np.arange(64) % 5
    losses: list = []
    train.train_nnx(qat, x, y, steps=30, batch=32, lr=1e-2, losses=losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert int(qat.fc.dot_general0_lhs.get_value()['count']) == 30
    qat.eval()
    before = nnx.to_pure_dict(nnx.state(qat, QuantStat))
    y_qat = qat(X)
    after = nnx.to_pure_dict(nnx.state(qat, QuantStat))
    chex.assert_trees_all_equal(before, after)  # frozen at eval
    abstract = nnx.eval_shape(lambda: quantize_model(NnxCNN(nnx.Rngs(0)), PtqProvider(W4_STATIC), X))
    nnx.update(abstract, quantize_params(qat, abstract, nnx.state(qat, QuantStat)))
    c, f = abstract.conv, abstract.fc
    bound = _cnn_forward_bound(X, c.kernel[...], c.bias[...], c.conv_general_dilated0_lhs_scale[...],
                               f.kernel[...], f.bias[...], f.dot_general0_lhs_scale[...])
    assert_within(y_qat, abstract(X), bound)
    qat.train()
    qat(X)
    assert int(qat.fc.dot_general0_lhs.get_value()['count']) == 31


# --------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    with pytest.raises(ValueError, match='ste'):
        QtProvider(W8_DYNAMIC, ste='round')
    with pytest.raises(ValueError, match='momentum'):
        QtProvider(W8_DYNAMIC, momentum=1.0)
    with pytest.raises(ValueError, match='ste'):
        fake_quant_with_scale(jnp.ones((1, 2)), 'int8', jnp.ones((1, 1)), ste='none')
    with pytest.raises(ValueError, match='tile_size'):
        quantize_model(CNN(), QtProvider([QuantizationRule(weight_qtype='int4', tile_size=4)])).init(
            jax.random.key(0), X)
    assert QatProvider is QtProvider


# --------------------------------------------------------------------------- training helpers (examples.digits.train)
def test_lr_schedule_cosine_matches_formula_and_rejects_unknown():
    ref = 0.01 * 0.5 * (1 + np.cos(np.pi * np.arange(7, dtype=np.float64) / 7))
    # computed in float64 and cast to float32: relative u = 6e-8 < 1e-6
    np.testing.assert_allclose(train.lr_schedule(0.01, 7, 'cosine'), ref, rtol=1e-6)
    np.testing.assert_array_equal(train.lr_schedule(0.5, 3), np.full(3, 0.5, np.float32))
    with pytest.raises(ValueError, match='schedule'):
        train.lr_schedule(0.1, 3, 'linear')


def test_train_linen_constant_rate_equals_optax_adam():
    model = nn.Dense(5)
    x = np.asarray(jax.random.normal(jax.random.key(5), (32, 6)))
    y = np.arange(32) % 5
    v = model.init(jax.random.key(0), x[:1])
    got = train.train_linen(model, v, x, y, steps=3, batch=8, lr=1e-2, seed=3)['params']
    opt, p = optax.adam(1e-2), v['params']
    state = opt.init(p)
    for idx in np.random.default_rng(3).integers(0, 32, (3, 8)):
        g = jax.grad(lambda pp: train.cross_entropy(model.apply({'params': pp}, x[idx]), y[idx]))(p)
        upd, state = opt.update(g, state, p)
        p = optax.apply_updates(p, upd)
    # Adam moves each weight by about lr = 1e-2 per step whatever the gradient's size (m / sqrt(v)), so a
    # different update rule or rate is off by ~lr; float32 rounding enters through the gradients (relative
    # ~gamma_32 ~ 2e-6 here; the update depends on them to first order), i.e. ~lr * 1e-6 per step. 1e-3 * lr
    # per step sits three orders from both.
    chex.assert_trees_all_close(got, p, rtol=0, atol=3 * 1e-2 * 1e-3)


def test_nnx_use_running_average_freezes_stats_while_training():
    qat = quantize_model(NnxCNN(nnx.Rngs(0)), QtProvider(W4_STATIC), X)
    qat(X)  # one training-mode pass: count 1
    qat.set_attributes(use_running_average=True)  # frozen, as the digits QAT recipe trains
    before = nnx.to_pure_dict(nnx.state(qat, QuantStat))
    kernel = np.asarray(qat.fc.kernel[...])
    train.train_nnx(qat, np.asarray(X), np.asarray(Y), steps=3, batch=8, lr=1e-2)
    chex.assert_trees_all_equal(before, nnx.to_pure_dict(nnx.state(qat, QuantStat)))
    assert np.abs(np.asarray(qat.fc.kernel[...]) - kernel).max() > 0  # the weights did train
