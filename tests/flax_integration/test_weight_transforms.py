"""GPTQ and Hadamard rotations through flax_integration (rules -> calibrate -> quantize_params -> PTQ run).

References are NumPy float64: the dense rotation matrix built from scipy's Hadamard matrix, Gram matrices
summed by hand, and layer outputs computed from dequantized weights.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import linen as nn
from flax import nnx

import flax_integration as fi
import qarray
from flax_integration import CalibrationProvider, QuantizedParam
from qarray import rotation
from tolerances import U32, abs_dot, assert_within, gamma, propagate, running_mean_bound

K, N = 64, 32


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(N)(x)
        return nn.Dense(8)(jax.nn.gelu(x))


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(K, N, rngs=rngs)
        self.b = nnx.Linear(N, 8, rngs=rngs)

    def __call__(self, x):
        return self.b(jax.nn.gelu(self.a(x)))


def _inputs(seed, n=256, outliers=True):
    """Correlated activations with a few large channels (the pattern that hurts per-token scales)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, K)) @ (np.eye(K) + 0.5 * rng.standard_normal((K, K)) / np.sqrt(K))
    if outliers:
        x[:, [3, 17, 40]] *= 25.0
    return jnp.asarray(x, jnp.float32)


def _dense_rotation(k):
    """R with rotate(x, -1) == x @ R, built independently: diag(signs) @ blockdiag(H_block / sqrt(block))."""
    block = rotation.block_size(k)
    h = scipy.linalg.hadamard(block) / np.sqrt(block)
    return np.diag(np.asarray(rotation.signs(k), np.float64)) @ np.kron(np.eye(k // block), h)


def _float_setup(seed=0):
    model = MLP()
    params = model.init(jax.random.key(seed), _inputs(0)[:2])['params']
    return model, params


def _ptq(rules, params, quant_stats=None, x=None):
    qm = fi.quantize_model(MLP(), fi.PtqProvider(rules))
    abstract = jax.eval_shape(qm.init, jax.random.key(0), _inputs(0)[:2])['params']
    qp = fi.quantize_params(params, abstract, quant_stats)
    return qm, qp


def _first_layer_error(qm, qp, params, x):
    """Mean squared error of the whole model output vs float, on x."""
    ref = MLP().apply({'params': params}, x)
    out = qm.apply({'params': qp}, x)
    return float(jnp.mean((out - ref) ** 2))


def test_rotated_weight_is_stored_rotated_and_output_matches_float64_reference():
    model, params = _float_setup()
    rules = [fi.QuantizationRule(module_path='Dense_0', weight_qtype='int4', tile_size=16, rotation='hadamard')]
    qm, qp = _ptq(rules, params)
    kernel = qp['Dense_0']['kernel']
    assert isinstance(kernel, QuantizedParam) and kernel.rotation == (0, 64)
    w = np.asarray(params['Dense_0']['kernel'], np.float64)
    r = _dense_rotation(K)
    # Stored codes are those of R^T W (the rotated weight), quantized as usual. (Codes compared on the library's
    # float32 rotation: a float64 R^T W can flip the tie of a tile's negative extreme between -7 and -8.)
    rotated = rotation.rotate(params['Dense_0']['kernel'], 0)
    # A K=64 rotation in float32 vs float64: gamma_{64+2} |R|^T |w| (+2: the 1/sqrt(64) scaling, the signs).
    ra = np.abs(r)
    assert_within(rotated, r.T @ w, gamma(66) * ra.T @ np.abs(w))
    expect = qarray.quantize(rotated, 'int4', channelwise_axes=(1,), tiles={0: 16})
    np.testing.assert_array_equal(np.asarray(qarray.codes(kernel.array)), np.asarray(qarray.codes(expect)))
    # __jax_array__ undoes the rotation: R @ deq, close to W within the int4 step.
    deq_rot = np.asarray(qarray.dequantize(kernel.array), np.float64)
    assert_within(jnp.asarray(kernel), r @ deq_rot, gamma(67) * ra @ np.abs(deq_rot))  # unrotate (+1: dequantize)
    # The model output is x @ (R deq) + b: the activation is rotated at run time.
    x = _inputs(1)[:16]
    h = np.asarray(x, np.float64) @ (r @ deq_rot) + np.asarray(params['Dense_0']['bias'])
    h_pre = h
    h = np.asarray(jax.nn.gelu(jnp.asarray(h, jnp.float32)), np.float64)
    ref = h @ np.asarray(params['Dense_1']['kernel'], np.float64) + np.asarray(params['Dense_1']['bias'])
    # One float32 evaluation vs float64: the run-time rotation of x (gamma_66 |x| |R|), layer 1's dot on it
    # (64 terms), the bias (u); gelu is 1.13-Lipschitz and within a few ulps (8 u |h| + 8 u); the reference's
    # gelu ran in float32 on h rounded once (u |h|); then layer 2 (32 terms) and its bias.
    xa = np.abs(np.asarray(x, np.float64)) @ ra
    dh = gamma(66) * xa @ np.abs(deq_rot) + propagate(xa, 0, deq_rot, evals=1) + U32 * np.abs(h_pre)
    dg = 1.13 * (dh + U32 * np.abs(h_pre)) + 16 * U32 * (np.abs(h) + 1)
    w1 = np.asarray(params['Dense_1']['kernel'], np.float64)
    assert_within(qm.apply({'params': qp}, x), ref, propagate(h, dg, w1, evals=1) + U32 * np.abs(ref))


def test_rotation_lowers_w8a8_error_on_outlier_channels():
    model, params = _float_setup()
    x = _inputs(2)
    errs = {}
    for rot in (None, 'hadamard'):
        rules = [fi.QuantizationRule(weight_qtype='int8', act_qtype='int8', rotation=rot)]
        qm, qp = _ptq(rules, params)
        errs[rot] = _first_layer_error(qm, qp, params, x)
    assert errs['hadamard'] < 0.5 * errs[None], errs


def test_static_ranges_are_collected_on_the_rotated_activation():
    model, params = _float_setup()
    rules = [fi.QuantizationRule(module_path='Dense_0', weight_qtype='int8', act_qtype='int8',
                                 act_static_scale=True, rotation='hadamard')]
    x = _inputs(3)[:32]
    stats = fi.calibrate(model, params, [x], rules=rules, progress=False)
    hi = float(np.asarray(stats['Dense_0']['dot_general0_lhs']['hi']).max())
    expect = np.abs(np.asarray(x, np.float64) @ _dense_rotation(K)).max()
    # The float32 rotation moves each value by <= gamma_66 |x| |R|, so the max by at most the largest of those;
    # one batch's running mean is that value (+ running_mean_bound's roundings).
    slack = gamma(66) * (np.abs(np.asarray(x, np.float64)) @ np.abs(_dense_rotation(K))).max()
    np.testing.assert_allclose(hi, expect, rtol=0, atol=slack + running_mean_bound(1, expect))
    assert hi < 0.5 * float(jnp.abs(x).max())  # the outlier channels are spread out
    qm, qp = _ptq(rules, params, stats)
    assert _first_layer_error(qm, qp, params, x) < 1e-2  # w8a8 quantization error (statistical), not rounding


def _gptq_rules(rotation_=None, tile=16, qtype='int4', path='Dense_.*', act_order=False):
    return [fi.QuantizationRule(module_path=path, weight_qtype=qtype, tile_size=tile,
                                weight_algorithm='gptq', rotation=rotation_, gptq_act_order=act_order)]


def test_hessian_statistic_is_the_token_weighted_mean_gram_matrix():
    model, params = _float_setup()
    a, b = _inputs(4)[:40], _inputs(5)[:24].reshape(2, 12, K)  # batches of different sizes and ranks
    stats = fi.calibrate(model, params, [a, b], rules=_gptq_rules(), progress=False)
    s = stats['Dense_0']['dot_general0_hessian']
    flat = np.concatenate([np.asarray(a, np.float64), np.asarray(b, np.float64).reshape(-1, K)])
    # A float32 Gram matrix over 64 tokens (two batches: each a dot of 40 or 24 terms, then a token-weighted
    # mean: a few more roundings per term): gamma_{64+6} |x|^T |x| / n vs float64.
    n = len(flat)
    assert_within(s['hessian'], flat.T @ flat / n, gamma(n + 6) * np.abs(flat).T @ np.abs(flat) / n)
    assert float(s['tokens']) == 64 and int(s['count']) == 2
    assert stats['Dense_1']['dot_general0_hessian']['hessian'].shape == (N, N)
    # with gptq_token_clip each batch's tokens are clipped at 2x that batch's median norm, then averaged
    rules = [dataclasses.replace(_gptq_rules()[0], gptq_token_clip=2.0)]
    clipped = fi.calibrate(model, params, [a, b], rules=rules, progress=False)['Dense_0']['dot_general0_hessian']
    want = sum(np.asarray(qarray.gptq.hessian(x, token_clip=2.0), np.float64) for x in (a, b)) / n
    # the same two float32 sums, folded into the mean in float32: a few roundings of |want| (>= 0 diagonal)
    assert_within(clipped['hessian'], want, gamma(8) * np.abs(want) + gamma(n + 6) * np.abs(flat).T @ np.abs(flat) / n)
    assert float(np.trace(np.asarray(clipped['hessian']))) < float(np.trace(np.asarray(s['hessian'])))


# 24: partial last tiles (in act order: the rows of every tile are spread over the loop; the uneven in-order path
# is covered by tests/test_gptq.py against the float64 reference)
@pytest.mark.parametrize('rot,tile,act_order', [(None, 16, False), ('hadamard', 16, False), (None, 24, True)])
def test_gptq_params_match_core_gptq_and_beat_round_to_nearest(rot, tile, act_order):
    model, params = _float_setup()
    x = _inputs(6, n=512, outliers=False)
    rules = _gptq_rules(rot, tile, act_order=act_order)
    stats = fi.calibrate(model, params, [x], rules=rules, progress=False)
    qm, qp = _ptq(rules, params, stats)
    assert qp['Dense_0']['kernel'].gptq[3:] == (('act_order',) if act_order else ())
    assert qp['Dense_0']['kernel'].array.scale.shape == (-(-K // tile), N)       # 64 = 24 + 24 + 16
    h = stats['Dense_0']['dot_general0_hessian']['hessian']
    w = params['Dense_0']['kernel']
    if rot is not None:
        w, h = rotation.rotate(w, 0, block=K), rotation.rotate_hessian(h, block=K)
    core = qarray.gptq.gptq_quantize(w, h, 'int4', axis=0, tile_size=tile, act_order=act_order)
    np.testing.assert_array_equal(np.asarray(qarray.codes(qp['Dense_0']['kernel'].array)),
                                  np.asarray(qarray.codes(core)))
    rules_rtn = [fi.QuantizationRule(module_path='Dense_.*', weight_qtype='int4', tile_size=tile, rotation=rot)]
    qm_rtn, qp_rtn = _ptq(rules_rtn, params)
    # Output error of the first layer on the calibration activations: GPTQ's objective.
    xf = np.asarray(x, np.float64)
    def layer_err(p):
        return np.mean((xf @ np.asarray(jnp.asarray(p['Dense_0']['kernel']), np.float64)
                        - xf @ np.asarray(params['Dense_0']['kernel'], np.float64)) ** 2)
    assert layer_err(qp) < 0.8 * layer_err(qp_rtn)
    assert _first_layer_error(qm, qp, params, x) < _first_layer_error(qm_rtn, qp_rtn, params, x)


def test_gptq_without_statistics_raises():
    model, params = _float_setup()
    with pytest.raises(ValueError, match="weight_algorithm='gptq'.*calibrate"):
        _ptq(_gptq_rules(), params)


def test_nnx_gptq_with_rotation_end_to_end():
    x = _inputs(7, n=256, outliers=False)
    rules = _gptq_rules('hadamard', path='.*')
    float_model = NnxMLP(nnx.Rngs(0))
    calib = fi.quantize_model(NnxMLP(nnx.Rngs(0)), CalibrationProvider(rules), x[:2])
    stats = fi.calibrate(calib, None, [x], progress=False)
    assert stats['a']['dot_general0_hessian']['hessian'].shape == (K, K)
    abstract = nnx.eval_shape(lambda: fi.quantize_model(NnxMLP(nnx.Rngs(0)), fi.PtqProvider(rules), x[:2]))
    state = fi.quantize_params(float_model, abstract, stats)
    nnx.update(abstract, state)
    assert abstract.a.kernel.rotation == (0, 64)
    rtn = fi.quantize_model(NnxMLP(nnx.Rngs(0)), fi.PtqProvider(
        [fi.QuantizationRule(module_path='.*', weight_qtype='int4', tile_size=16)]), x[:2])
    ref = float_model(x)
    err_gptq = float(jnp.mean((abstract(x) - ref) ** 2))
    err_rtn = float(jnp.mean((rtn(x) - ref) ** 2))
    assert err_gptq < err_rtn, (err_gptq, err_rtn)


def test_rotated_param_transpose_follows_the_axis_and_reshape_raises():
    q = QuantizedParam(qarray.quantize(jnp.ones((8, 4, 2)), 'int8', channelwise_axes=(1, 2)), rotation=(0, 8))
    assert q.transpose(2, 0, 1).rotation == (1, 8)
    assert q.T.rotation == (2, 8)
    assert q.astype(jnp.bfloat16).rotation == (0, 8)
    with pytest.raises(ValueError, match='cannot be reshaped'):
        q.reshape(8, 8)


def test_unsupported_providers_and_layouts_raise():
    model, params = _float_setup()
    rules = [fi.QuantizationRule(weight_qtype='int8', rotation='hadamard')]
    qat = fi.quantize_model(MLP(), fi.QtProvider(rules))
    with pytest.raises(ValueError, match='only PtqProvider and CalibrationProvider'):
        qat.init(jax.random.key(0), _inputs(0)[:2])

    class Conv(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3, 3))(x)
    conv = fi.quantize_model(Conv(), fi.PtqProvider(rules))
    with pytest.raises(ValueError, match='exactly one contracting axis'):
        conv.init(jax.random.key(0), jnp.ones((1, 6, 6, 2)))
    with pytest.raises(ValueError, match='need the model'):
        fi.quantize_params(params, [fi.QuantizationRule(module_path='.*/kernel', weight_qtype='int4',
                                                        weight_algorithm='gptq')])


@pytest.mark.parametrize('kwargs, match', [
    (dict(weight_qtype='int4', weight_algorithm='awq'), 'weight_algorithm must be one of'),
    (dict(weight_qtype='int4', rotation='random'), 'rotation must be one of'),
    (dict(weight_algorithm='gptq'), 'set weight_qtype'),
    (dict(rotation='hadamard', act_qtype='int8'), 'set weight_qtype'),
    (dict(weight_qtype='int4', gptq_damping=-0.1), 'gptq_damping must be a number >= 0'),
    (dict(weight_qtype='int4', weight_algorithm='gptq', gptq_token_clip=0.5), 'gptq_token_clip must be None or'),
    (dict(weight_qtype='int4', weight_algorithm='gptq', gptq_token_clip='4'), 'gptq_token_clip must be None or'),
    (dict(weight_qtype='int4', gptq_token_clip=4.0), "set weight_algorithm='gptq'"),
    (dict(weight_qtype='int4', gptq_act_order=True), "gptq_act_order=True orders GPTQ's rounding; set weight_algo"),
])
def test_rule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fi.QuantizationRule(**kwargs)


def test_act_order_must_be_a_bool():
    with pytest.raises(TypeError, match='gptq_act_order must be a bool'):
        fi.QuantizationRule(weight_qtype='int4', weight_algorithm='gptq', gptq_act_order='yes')


def test_float_fallback_of_a_rotated_param_unrotates_it():
    from flax_integration._op_table import dot_general_call
    w = jax.random.normal(jax.random.key(1), (K, N))
    q = QuantizedParam(qarray.quantize(rotation.rotate(w, 0), 'int8', channelwise_axes=(1,)), rotation=(0, 64))
    x = _inputs(8)[:4]
    out = dot_general_call(qarray.dot_general, jax.lax.dot_general, x, q, (((1,), (0,)), ((), ()))).run_original()
    deq = np.asarray(qarray.dequantize(q.array), np.float64)
    ref = np.asarray(x, np.float64) @ (_dense_rotation(K) @ deq)
    # The float fallback unrotates the dequantized weight (K=64 rotation: gamma_67 |R| |deq|) and runs a
    # float32 dot on it (64 terms), vs float64.
    dw = gamma(67) * np.abs(_dense_rotation(K)) @ np.abs(deq)
    assert_within(out, ref, abs_dot(x, dw) + propagate(x, 0, np.abs(_dense_rotation(K)) @ np.abs(deq) + dw, evals=1))
    # and it is the float layer up to int8's quantization error (statistical: |out| ~ 80), not rounding
    np.testing.assert_allclose(np.asarray(out), np.asarray(x @ w), rtol=0.05, atol=0.5)


class _TwoUses(nn.Module):
    """One kernel used by a rule-matched dot, an einsum no rule matches, and (transposed) a tied second dot."""
    tied: bool = False

    @nn.compact
    def __call__(self, x):
        k = self.param('k', nn.initializers.normal(1.0), (K, K))
        h = jnp.dot(x, k)
        if self.tied:
            return jnp.dot(h, k.T)
        return h + jnp.einsum('bk,kn->bn', x, k)


@pytest.mark.parametrize('tied', [False, True])
def test_rotated_kernel_in_an_unmatched_op_or_transposed_is_unrotated(tied):
    # A rotated weight is only multiplied in its rotated form where the activation is rotated to match;
    # an op with no rule, or a use along the other axis (tied weights), gets the dequantized, unrotated value.
    model = _TwoUses(tied)
    x = _inputs(9)[:16]
    params = model.init(jax.random.key(0), x)['params']
    ref = model.apply({'params': params}, x)
    ops = fi.rules.OP_NAMES if tied else ('dot_general',)  # untied: the einsum has no rule
    rules = [fi.QuantizationRule(weight_qtype='int8', rotation='hadamard', op_names=ops)]
    qm = fi.quantize_model(model, fi.PtqProvider(rules))
    abstract = jax.eval_shape(qm.init, jax.random.key(0), x)['params']
    qp = fi.quantize_params(params, abstract)
    assert qp['k'].rotation == (0, 64)
    out = qm.apply({'params': qp}, x)
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 0.02, rel  # using the rotated codes unrotated gives ~0.7 (unmatched op) / ~1.2 (tied)


def test_gptq_on_a_single_output_dense_and_count_zero_statistics():
    class Head(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(x)
    x = _inputs(10, n=128, outliers=False)
    params = Head().init(jax.random.key(0), x)['params']
    rules = [fi.QuantizationRule(weight_qtype='int4', tile_size=16, weight_algorithm='gptq', rotation='hadamard')]
    stats = fi.calibrate(Head(), params, [x], rules=rules, progress=False)
    qm = fi.quantize_model(Head(), fi.PtqProvider(rules))
    abstract = jax.eval_shape(qm.init, jax.random.key(0), x[:2])['params']
    qp = fi.quantize_params(params, abstract, stats)
    assert qp['Dense_0']['kernel'].gptq == ('dot_general0_hessian', 0, 0.01)
    rel = float(jnp.linalg.norm(qm.apply({'params': qp}, x) - Head().apply({'params': params}, x))
                / jnp.linalg.norm(Head().apply({'params': params}, x)))
    assert rel < 0.1, rel
    empty = jax.tree.map(jnp.zeros_like, stats)
    with pytest.raises(ValueError, match='count 0'):
        fi.quantize_params(params, abstract, empty)


def test_transpose_with_negative_axes_moves_rotation_and_gptq_axes():
    q = QuantizedParam(qarray.quantize(jnp.ones((8, 4, 2)), 'int8', channelwise_axes=(1, 2)), rotation=(0, 8),
                       gptq=('s', 0, 0.1))
    t = q.transpose(-1, 0, -2)
    assert t.rotation == (1, 8) and t.gptq == ('s', 1, 0.1)
    ordered = dataclasses.replace(q, gptq=('s', 0, 0.1, 'act_order'))
    assert ordered.transpose(-1, 0, -2).gptq == ('s', 1, 0.1, 'act_order')  # the act-order flag stays


@pytest.mark.parametrize('fmt', ['orbax', 'safetensors'])
def test_checkpoints_record_rotation_and_refuse_other_rules(fmt, tmp_path):
    pytest.importorskip('orbax.checkpoint' if fmt == 'orbax' else 'safetensors')
    model, params = _float_setup()
    rot_rules = [fi.QuantizationRule(weight_qtype='int4', tile_size=16, rotation='hadamard')]
    plain_rules = [fi.QuantizationRule(weight_qtype='int4', tile_size=16)]
    qm, qp = _ptq(rot_rules, params)
    abstract_rot = jax.eval_shape(lambda: _ptq(rot_rules, params)[1])
    abstract_plain = jax.eval_shape(lambda: _ptq(plain_rules, params)[1])
    path = str(tmp_path / ('ckpt' if fmt == 'orbax' else 'ckpt.safetensors'))
    save, restore = ((qarray.io.save, qarray.io.restore) if fmt == 'orbax'
                     else (qarray.io.save_safetensors, qarray.io.load_safetensors))
    save(path, qp)
    back = restore(path, abstract_rot)
    assert back['Dense_0']['kernel'].rotation == (0, 64)
    x = _inputs(11)[:8]
    np.testing.assert_array_equal(np.asarray(qm.apply({'params': back}, x)), np.asarray(qm.apply({'params': qp}, x)))
    with pytest.raises(qarray.io.CheckpointError, match=r"Dense_0/kernel.*rotation"):
        restore(path, abstract_plain)
