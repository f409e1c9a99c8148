"""Flax attention decoding with a quantized KV cache (rule field ``kv_cache_qtype``; flax_integration/_kv_cache.py).

Every comparison is against the same model with Flax's float cache, decoding the same tokens with the same
weights. The error bound of one step is derived from the format (numpy float64):

* a token's key/value for one head is quantized on its own (absmax): int8 step ``s = absmax / 127.5``, error
  ``<= s / 2 = absmax / 255`` per element (the clipped code 127 included: 127.5 - 127 = 1/2 step); int4 step
  ``absmax / 7.5``, error ``<= absmax / 15`` (the same argument with 7.5 levels); fp8 e4m3
  (3 mantissa bits, scale ``absmax / 448``) error ``<= 2**-4 |x|`` for normal codes and ``<= 2**-10 s`` below,
  so ``<= 2**-4 absmax``;
* logits ``z_t = c q . k_t`` move by ``eps_t <= c ||q||_1 dk_t``; with ``eps = max_t eps_t`` every softmax
  weight moves by a factor in ``[e^-2eps, e^2eps]``, so ``sum_t |dp_t| <= e^(2 eps) - 1``;
* the attention output ``o = sum_t p_t v_t`` moves by ``<= (e^(2 eps) - 1) max_t |v_t| + max_t dv_t``, and
  the output projection by ``sum_i |do_i| |W_out[i, j]|``;
* plus float32 rounding of the two evaluations (``tolerances.dot_bound``-style ``K u`` terms, K = the longest
  sum), orders of magnitude below the quantization terms.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import flax_integration as fi
from flax_integration._kv_cache import QuantizedCache, QuantizedCacheTensor, with_kv_cache

B, T, F, HEADS, STEPS = 2, 16, 16, 2, 4
U32 = 2.0 ** -24


def _step_error(qtype: str, x: np.ndarray) -> np.ndarray:
    """Bound on |dequantize(quantize(x)) - x| per token per head (x: [..., D]) for the cache formats."""
    absmax = np.abs(x).max(-1)
    per = {'int8': 1 / 255, 'int4': 1 / 15, 'fp8': 2.0 ** -4}[qtype]
    return absmax * per * (1 + 1e-6)


def _np(a):
    return np.asarray(jax.device_get(a), np.float64)


def _output_bound(qtype, q, k, v, w_out, t):
    """Bound on |y_quantized - y_float| after decoding token t. q [B, Hq, D], k/v [B, T, Hkv, D], w_out [Hq, D, F]."""
    Hq, D = q.shape[1], q.shape[2]
    G = Hq // k.shape[2]
    c = 1 / math.sqrt(D)
    k, v = k[:, :t + 1], v[:, :t + 1]
    dk, dv = _step_error(qtype, k), _step_error(qtype, v)           # [B, t+1, Hkv]
    kv_head = np.arange(Hq) // G
    eps = c * np.abs(q).sum(-1)[:, None, :] * dk[:, :, kv_head]       # [B, t+1, Hq]
    eps = eps.max(1)                                                  # [B, Hq]
    vmax = np.abs(v).max(1)[:, kv_head]                               # [B, Hq, D]
    fl = 2 * (t + 1 + D + 8) * U32 * 2 * vmax   # float32 softmax + weighted sum (K = t+1+D, + exp/div), 2 runs
    do = np.expm1(2 * eps)[..., None] * vmax + dv.max(1)[:, kv_head][..., None] + fl
    dy = np.einsum('bhd,hdf->bf', do, np.abs(w_out))
    return dy + (Hq * D + 2) * U32 * 2 * np.einsum('bhd,hdf->bf', np.abs(vmax), np.abs(w_out))


# --------------------------------------------------------------------------- Linen
def _linen_setup(qtype, weight_qtype=None):
    model = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=F, decode=True)
    rules = [fi.QuantizationRule(weight_qtype=weight_qtype, kv_cache_qtype=qtype)]
    float_rules = [fi.QuantizationRule(weight_qtype=weight_qtype)]
    quant = fi.quantize_model(model, with_kv_cache(fi.PtqProvider(rules)))
    ref = fi.quantize_model(model, fi.PtqProvider(float_rules))
    x = jax.random.normal(jax.random.key(1), (B, T, F))
    return quant, ref, x


def _dense(p, x):
    """A DenseGeneral's float64 output for x [B, F] (kernel may be a quantized param)."""
    kernel = p['kernel']
    kernel = _np(kernel.array.__jax_array__()) if hasattr(kernel, 'array') else _np(kernel)
    return np.einsum('bf,fhd->bhd', _np(x), kernel) + _np(p['bias'])


def _out_kernel(p):
    kernel = p['kernel']
    return _np(kernel.array.__jax_array__()) if hasattr(kernel, 'array') else _np(kernel)


@pytest.mark.parametrize('qtype,weight_qtype', [('int8', None), ('fp8', None), ('int4', None), ('int8', 'int8')])
def test_linen_decode_within_format_bound(qtype, weight_qtype):
    quant, ref, x = _linen_setup(qtype, weight_qtype)
    vq = quant.init(jax.random.key(0), x)
    vf = ref.init(jax.random.key(0), x)
    params = vq['params']
    assert isinstance(vq['cache']['cached_key'], QuantizedCacheTensor)
    cq, cf = vq['cache'], vf['cache']
    step_q = jax.jit(lambda c, xt: quant.apply({'params': params, 'cache': c}, xt, mutable=['cache']))
    step_f = jax.jit(lambda c, xt: ref.apply({'params': params, 'cache': c}, xt, mutable=['cache']))
    for t in range(STEPS):
        yq, cq = step_q(cq, x[:, t:t + 1])
        yf, cf = step_f(cf, x[:, t:t + 1])
        cq, cf = cq['cache'], cf['cache']
        q = _dense(params['query'], x[:, t])
        bound = _output_bound(qtype, q, _np(cf['cached_key']), _np(cf['cached_value']), _out_kernel(params['out']), t)
        err = np.abs(_np(yq[:, 0]) - _np(yf[:, 0]))
        assert (err <= bound).all(), (t, (err / bound).max())
        # the quantized keys are the float keys within one step (the same token, quantized on its own)
        kq = cq['cached_key'].as_kv_cache(cq['cached_value']).k.__jax_array__()
        dk = np.abs(_np(kq)[:, :t + 1] - _np(cf['cached_key'])[:, :t + 1])
        assert (dk <= _step_error(qtype, _np(cf['cached_key'])[:, :t + 1])[..., None] + 1e-6).all()
    assert int(cq['cache_index']) == STEPS


def _tree_bytes(tree):
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


CODE_BYTES = {'int8': lambda d: d, 'fp8': lambda d: d, 'int4': lambda d: (d + 1) // 2}   # per token per head


@pytest.mark.parametrize('qtype', ['int8', 'fp8', 'int4'])
def test_linen_cache_bytes_shrink_and_no_float_copy(qtype):
    quant, ref, x = _linen_setup(qtype)
    vq = quant.init(jax.random.key(0), x)
    vf = ref.init(jax.random.key(0), x)
    _, upd = quant.apply(vq, x[:, :1], mutable=['cache'])
    D = F // HEADS
    for cache in (vq['cache'], upd['cache']):
        leaves = jax.tree.leaves(cache)
        assert not any(jnp.issubdtype(a.dtype, jnp.floating) and a.shape == (B, T, HEADS, D) for a in leaves)
        codes = B * T * HEADS * CODE_BYTES[qtype](D)
        assert _tree_bytes(cache) == 2 * (codes + B * T * HEADS * 4) + 4   # codes + f32 scales + index
    assert _tree_bytes(vf['cache']) == 2 * B * T * HEADS * D * 4 + 4
    assert cache['cached_key'].nbytes == B * T * HEADS * (CODE_BYTES[qtype](D) + 4)


def test_linen_positions_past_the_fill_are_ignored():
    quant, _, x = _linen_setup('int8')
    v = quant.init(jax.random.key(0), x)
    cache = v['cache']
    for t in range(3):
        _, upd = quant.apply({'params': v['params'], 'cache': cache}, x[:, t:t + 1], mutable=['cache'])
        cache = upd['cache']
    # garbage in every slot not yet written (3 .. T-1), NaN scales included; the next step writes slot 3
    def spoil(tensor):
        data = tensor.data.at[:, 3:].set(77)
        scale = tensor.scale.at[:, 3:].set(jnp.nan)
        return QuantizedCacheTensor(data, scale, tensor.qtype, tensor.dtype, tensor.head_dim)
    spoiled = dict(cache, cached_key=spoil(cache['cached_key']), cached_value=spoil(cache['cached_value']))
    y_clean, _ = quant.apply({'params': v['params'], 'cache': cache}, x[:, 3:4], mutable=['cache'])
    y_spoiled, _ = quant.apply({'params': v['params'], 'cache': spoiled}, x[:, 3:4], mutable=['cache'])
    np.testing.assert_array_equal(np.asarray(y_clean), np.asarray(y_spoiled))


# --------------------------------------------------------------------------- NNX
def _nnx_model():
    return nnx.MultiHeadAttention(num_heads=4, num_kv_heads=2, in_features=F, qkv_features=F, decode=True,
                                  rngs=nnx.Rngs(0))


@pytest.mark.parametrize('qtype', ['int8', 'fp8', 'int4'])
def test_nnx_decode_after_init_cache_within_format_bound(qtype):
    x = jax.random.normal(jax.random.key(1), (B, T, F))
    ref = _nnx_model()
    ref.init_cache((B, T, F))
    model = _nnx_model()
    model.init_cache((B, T, F))      # quantize_model's sample run decodes one token
    quant = fi.quantize_model(model, with_kv_cache(fi.PtqProvider([fi.QuantizationRule(kv_cache_qtype=qtype)])),
                              x[:, :1])
    quant.init_cache((B, T, F))      # Flax's float zeros; the first decode step replaces them
    step = nnx.jit(lambda m, xt: m(xt))
    w_out = _np(ref.out.kernel[...])
    for t in range(STEPS):
        yq, yf = step(quant, x[:, t:t + 1]), ref(x[:, t:t + 1])
        q = np.einsum('bf,fhd->bhd', _np(x[:, t]), _np(ref.query.kernel[...])) + _np(ref.query.bias[...])
        bound = _output_bound(qtype, q, _np(ref.cached_key[...]), _np(ref.cached_value[...]), w_out, t)
        err = np.abs(_np(yq[:, 0]) - _np(yf[:, 0]))
        assert (err <= bound).all(), (t, (err / bound).max())
    assert isinstance(quant.cached_key, QuantizedCache) and isinstance(quant.cached_key, nnx.Cache)
    state = nnx.state(quant, nnx.Cache)
    D = F // 4
    assert _tree_bytes(state) == 2 * B * T * 2 * (CODE_BYTES[qtype](D) + 4) + 4 < _tree_bytes(nnx.state(ref, nnx.Cache))


# --------------------------------------------------------------------------- what is refused
def _linen_rules(qtype='int8'):
    return with_kv_cache(fi.PtqProvider([fi.QuantizationRule(kv_cache_qtype=qtype)]))


def test_custom_attention_fn_is_refused():
    def my_attention(query, key, value, mask=None, **kw):
        return nn.dot_product_attention(query, key, value, mask=mask)
    m = fi.quantize_model(nn.SelfAttention(num_heads=2, decode=True, attention_fn=my_attention), _linen_rules())
    x = jnp.ones((1, 4, 8))
    v = m.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="attention_fn='my_attention'"):
        m.apply(v, x[:, :1], mutable=['cache'])


def test_dropout_and_sow_weights_are_refused():
    x = jnp.ones((1, 4, 8))
    m = fi.quantize_model(nn.SelfAttention(num_heads=2, decode=True, dropout_rate=0.5, deterministic=False),
                          _linen_rules())
    v = m.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x)
    with pytest.raises(ValueError, match='dropout'):
        m.apply(v, x[:, :1], mutable=['cache'], rngs={'dropout': jax.random.key(2)})
    m = fi.quantize_model(nn.SelfAttention(num_heads=2, decode=True), _linen_rules())
    v = m.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match='sow_weights'):
        m.apply(v, x[:, :1], sow_weights=True, mutable=['cache', 'intermediates'])


def test_per_head_mask_and_prefill_are_refused():
    x = jnp.ones((1, 4, 8))
    m = fi.quantize_model(nn.SelfAttention(num_heads=2, decode=True), _linen_rules())
    v = m.init(jax.random.key(0), x)
    mask = jnp.ones((1, 2, 1, 4)).at[0, 1, 0, 0].set(0)
    with pytest.raises(ValueError, match=r'mask shared by all heads'):
        m.apply(v, x[:, :1], mask=mask, mutable=['cache'])
    with pytest.raises(ValueError, match='Autoregressive cache shape error'):   # Flax's own: one token per call
        m.apply(v, x[:, :2], mutable=['cache'])


def test_quantized_cache_without_a_matching_rule_or_with_another_format_is_refused():
    x = jnp.ones((1, 4, 8))
    m = fi.quantize_model(nn.SelfAttention(num_heads=2, decode=True), _linen_rules('int8'))
    v = m.init(jax.random.key(0), x)
    other = fi.quantize_model(nn.SelfAttention(num_heads=2, decode=True), with_kv_cache(fi.PtqProvider([
        fi.QuantizationRule(module_path='elsewhere', kv_cache_qtype='int8', warn_if_unused=False),
        fi.QuantizationRule()])))
    with pytest.raises(ValueError, match='no rule of this model gives the module a kv_cache_qtype'):
        other.apply(v, x[:, :1], mutable=['cache'])
    fp8 = fi.quantize_model(nn.SelfAttention(num_heads=2, decode=True), _linen_rules('fp8'))
    with pytest.raises(ValueError, match="stored as int8 but the rule says kv_cache_qtype='fp8'"):
        fp8.apply(v, x[:, :1], mutable=['cache'])


def test_plain_dynamic_update_slice_in_a_model_is_untouched():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jax.lax.dynamic_update_slice(x, jnp.zeros((1, 1)), (0, 1)) + nn.Dense(2)(x).sum()
    m = fi.quantize_model(M(), _linen_rules())
    x = jnp.ones((1, 3))
    v = m.init(jax.random.key(0), x)
    y = m.apply(v, x)
    assert y[0, 1] == y[0, 0] - 1
