"""qarray.kv_cache: writes bit for bit, block-wise attention against float64 references with derived
error bounds, decoding, masking, memory (compiled temporaries) and every error message.

Shapes are fixed per test and lengths/positions are traced, so hypothesis examples reuse one
compiled program (JAX compiles per shape).

Error bounds used below (u = eps/2 = 2**-24 is float32's unit roundoff, gamma(n) = n*u / (1 - n*u)
bounds the relative error of any n-term float32 sum or dot, whatever the order):

* Block algorithm vs float64 on the *dequantized* cache (the same numbers, so only float32
  arithmetic differs): a logit c*q.k_j carries at most gamma(D + 3) * c * sum_d |q_d k_jd|
  (D-length dot, q*c rounded once, k possibly dequantized with one more rounding): E_s. Each weight
  exp(s_j - m) carries, besides that, the exp (4 ulps budgeted), the rounding of s_j - m
  (u * |s_j - m| <= u * R, R the logit range) and the per-block rescaling by exp(m_old - m_new)
  (one rounded multiply and one exp per block, nb blocks, plus u * R for the running-max steps).
  Weights that are all off by a factor within [1/rho, rho] move sum_j w_j v_j by at most
  (1 - 1/rho) * (max_j v_j - min_j v_j) (sum_j (w_j - pi_j) = 0, so subtract the mid-range).
  The two running sums (l and acc, T + nb + 1 rounded terms) and the final division add
  (2 gamma(T + nb + 1) + u) * max_j |v_j|.
* Quantized vs float cache: per-element key error e_k (int: half a step, scale/2, plus float32
  rounding of x * (1/scale) and code * scale; fp8 e4m3: half an ulp, 2**-4 |x| for normals and
  2**-10 * scale for subnormals, plus the same rounding), so a logit moves by at most
  Delta_j = c * sum_d |q_d| e_k[j, d] (<= c * ||q||_1 * max step / 2), weights by a factor within
  exp(+-2 Delta), the output by (1 - exp(-2 Delta)) * range_j(v) + max_j e_v[j]; plus both
  computations' float32 bounds above.
"""

from __future__ import annotations

import doctest
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import qarray
from qarray import kv_cache

U = 2.0 ** -24  # float32 unit roundoff (eps / 2)
EXP_ULPS = 4  # budget for the float32 exp's error, in ulps
QTYPES = [None, 'int8', 'fp8', 'int4']
TILE = {'int4': 16}  # int4 tiles of 16 along head_dim=32 (2 scales per token per head)

# The shape most tests share: 3 rows, 80 tokens, 2 kv heads x 32 dims, 6 query heads (groups of 3).
# block=32 does not divide 80: the last block is end-aligned and overlaps the previous one.
B, T, H, D, HQ, BLOCK = 3, 80, 2, 32, 6, 32


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def make_cache(qtype, b=B, t=T, h=H, d=D, **kw):
    return kv_cache.init(b, t, h, d, qtype, tile=TILE.get(qtype), **kw)


def rand(seed, shape, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


SCALE = 0.3  # a softmax scale other than the default 1/sqrt(D) (which decode_step below uses)


@jax.jit
def attend(q, cache, lengths_or_mask):
    return kv_cache.attention(q, cache, lengths_or_mask, block=BLOCK, softmax_scale=SCALE)


update_jit = jax.jit(kv_cache.update)


def past_fill(cache, lengths, fill):
    """``cache`` with every stored value at token >= lengths[b] replaced by ``fill(array)`` (numpy side)."""
    keep = np.arange(cache.max_len)[None, :] < np.asarray(lengths)[:, None]

    def replace(a):
        a = np.asarray(a)
        return jnp.asarray(np.where(keep.reshape(keep.shape + (1,) * (a.ndim - 2)), a, fill(a)))
    return jax.tree_util.tree_map(replace, cache)


def filled(qtype, k, v, lengths):
    """A cache holding k[b, :lengths[b]], v[b, :lengths[b]] (the rest zero), written per row at 0."""
    cache = make_cache(qtype, b=k.shape[0], t=k.shape[1], h=k.shape[2], d=k.shape[3])
    cache = update_jit(cache, k, v, jnp.zeros(k.shape[0], jnp.int32))  # every token, then zero the rest
    return past_fill(cache, lengths, np.zeros_like)


def dense(cache, which):
    """float64 keys or values of the whole cache, via qarray.dequantize (test-side only)."""
    x = cache.k if which == 'k' else cache.v
    return np.asarray(qarray.dequantize(x) if cache.quantized else x, np.float64)


# --------------------------------------------------------------------------- numpy references
def valid_mask(lengths_or_mask, b, s, t):
    lm = np.asarray(lengths_or_mask)
    if lm.dtype == bool:
        return np.broadcast_to(lm[:, None, :] if lm.ndim == 2 else lm, (b, s, t))
    qpos = np.broadcast_to(lm, (b,))[:, None] - s + np.arange(s)
    return np.arange(t)[None, None, :] <= qpos[:, :, None]


def ref_attention(q, k, v, valid, c):
    """float64 GQA attention; query head j reads kv head j // (Hq // H); rows with nothing valid -> 0."""
    b, s, hq, d = q.shape
    h = k.shape[2]
    q5 = np.asarray(q, np.float64).reshape(b, s, h, hq // h, d)
    logits = np.einsum('bshgd,bthd->bshgt', q5, k) * c
    vm = valid[:, :, None, None, :]
    logits = np.where(vm, logits, -np.inf)
    m = np.max(logits, axis=-1, keepdims=True)
    p = np.exp(logits - np.where(np.isfinite(m), m, 0))
    l = p.sum(-1, keepdims=True)
    out = np.einsum('bshgt,bthd->bshgd', p, np.where(np.isfinite(v), v, 0)) / np.where(l > 0, l, 1)
    return out.reshape(b, s, hq, d)


def _per_query(valid, h, g):
    return np.broadcast_to(valid[:, :, None, None, :], valid.shape[:2] + (h, g, valid.shape[2]))


def _v_stats(v, valid, h, g):
    """Per (b, s, h, g, d): range and max |v| over the valid tokens of that query (0 if none)."""
    vm = _per_query(valid, h, g)[..., None]  # [b, s, h, g, t, 1]
    v6 = np.asarray(v, np.float64).transpose(0, 2, 1, 3)[:, None, :, None]  # [b, 1, h, 1, t, d]
    hi = np.where(vm, v6, -np.inf).max(-2)
    lo = np.where(vm, v6, np.inf).min(-2)
    big = np.where(vm, np.abs(v6), 0).max(-2)
    rng = np.where(np.isfinite(hi), hi - lo, 0)
    return rng, big


def f32_tolerance(q, k, v, valid, c, nb):
    """Per-element bound on |float32 block algorithm - float64| on the same (dequantized) k, v."""
    b, s, hq, d = q.shape
    h = k.shape[2]
    g = hq // h
    q5 = np.abs(np.asarray(q, np.float64)).reshape(b, s, h, g, d)
    a = np.einsum('bshgd,bthd->bshgt', q5, np.abs(k)) * c  # sum_d |q_d k_jd| * c
    logits = np.einsum('bshgd,bthd->bshgt', np.asarray(q, np.float64).reshape(b, s, h, g, d), k) * c
    vm = _per_query(valid, h, g)
    e_s = gamma(d + 3) * np.where(vm, a, 0).max(-1)
    r = np.where(vm, logits, -np.inf).max(-1) - np.where(vm, logits, np.inf).min(-1)
    r = np.where(np.isfinite(r), r, 0)
    eta = (nb + 1) * (EXP_ULPS + 1) * U + 2 * U * r
    rho = np.exp(2 * e_s) * (1 + eta) / (1 - eta)
    vrange, vmax = _v_stats(v, valid, h, g)
    tol = (1 - 1 / rho)[..., None] * vrange + (2 * gamma(k.shape[1] + nb + 1) + U) * vmax
    return tol.reshape(b, s, hq, d)


def element_error_bound(x, cache, which):
    """Per-element bound on |dequantized - x| for the cache's format, from its stored scales."""
    sc = np.asarray(cache.k_scale if which == 'k' else cache.v_scale, np.float64)
    s = np.repeat(sc, x.shape[-1] // sc.shape[-1], axis=-1)
    ax = np.abs(np.asarray(x, np.float64))
    qt = cache.qtype
    if qt.kind == 'int':
        return s * (0.5 + 4 * U * (qt.qmax + 1))
    assert qt.name == 'float8_e4m3fn'
    return np.maximum(2.0 ** -4 * ax, 2.0 ** -10 * s) + 8 * U * (ax + s)


def format_bound(q, kf, vf, ek, ev, valid, c):
    """Per-element bound on |attention(quantized) - attention(float)| in exact arithmetic."""
    b, s, hq, d = q.shape
    h = kf.shape[2]
    g = hq // h
    q5 = np.abs(np.asarray(q, np.float64)).reshape(b, s, h, g, d)
    delta = np.where(_per_query(valid, h, g), np.einsum('bshgd,bthd->bshgt', q5, ek) * c, 0).max(-1)
    vrange, _ = _v_stats(vf, valid, h, g)
    _, evmax = _v_stats(ev, valid, h, g)
    return ((1 - np.exp(-2 * delta))[..., None] * vrange + evmax).reshape(b, s, hq, d)


def n_blocks(lengths_or_mask, t=T, block=BLOCK):
    lm = np.asarray(lengths_or_mask)
    if lm.dtype == bool:
        return -(-t // block)
    return -(-int(np.max(lm)) // block)


# --------------------------------------------------------------------------- update
@pytest.mark.parametrize('qtype', QTYPES)
def test_update_writes_exactly_the_quantized_tokens(qtype):
    cache = make_cache(qtype)
    k1, v1 = rand(0, (B, 3, H, D)), rand(1, (B, 3, H, D), 3.0)
    pos = np.array([0, 40, 77])  # per-row starts; row 2 fills the last 3 slots
    step = jax.jit(kv_cache.update, donate_argnums=0)
    cache = step(cache, k1, v1, jnp.asarray(pos))
    k2 = rand(2, (B, 2, H, D))
    cache = kv_cache.update(cache, k2, k2, 10)  # scalar start, eager
    for x, new, starts in [('k', k1, pos), ('v', v1, pos), ('k', k2, [10] * B), ('v', k2, [10] * B)]:
        if qtype is None:
            view = np.asarray(cache.k if x == 'k' else cache.v)  # a float cache's k/v are the arrays
        else:
            # Quantizing the tokens directly (per token per head [tile]) gives the same codes and scales.
            want = qarray.quantize(new, qtype, tiles=TILE.get(qtype, D))
            view = np.asarray(cache.k.qvalue if x == 'k' else cache.v.qvalue)  # codes via the QArray view
            scale = np.asarray(getattr(cache, f'{x}_scale'))
        for b, p in enumerate(starts):
            got = np.asarray(view[b, p:p + new.shape[1]])
            if qtype is None:
                chex.assert_trees_all_equal(got, new[b])
                continue
            chex.assert_trees_all_equal(got.view(np.uint8), np.asarray(want.qvalue)[b].view(np.uint8))
            chex.assert_trees_all_equal(scale[b, p:p + new.shape[1]], np.asarray(want.scale)[b])
    # Nothing else was touched.
    touched = np.zeros((B, T), bool)
    for b, p in enumerate(pos):
        touched[b, p:p + 3] = True
    touched[:, 10:12] = True
    for leaf in jax.tree_util.tree_leaves(cache):
        assert not np.asarray(leaf, np.float32 if leaf.dtype.itemsize > 1 else np.int32)[~touched].any()


@pytest.mark.parametrize('qtype', ['int8', 'fp8', 'int4'])
def test_storage_layout_and_nbytes(qtype):
    c = kv_cache.init(2, 128, 4, 64, qtype, tile=32 if qtype == 'int4' else None)
    per_token_head = {'int8': 64 + 4, 'fp8': 64 + 4, 'int4': 32 + 2 * 4}[qtype]
    assert kv_cache.nbytes(c) == c.nbytes == 2 * 2 * 128 * 4 * per_token_head
    assert c.k_scale.shape == (2, 128, 4, 1 if qtype != 'int4' else 2)
    assert c.k.shape == c.v.shape == c.shape == (2, 128, 4, 64)
    assert c.k.nbytes + c.v.nbytes == c.nbytes
    assert kv_cache.nbytes(kv_cache.init(2, 128, 4, 64, None, jnp.bfloat16)) == 2 * 2 * 128 * 4 * 64 * 2
    # bfloat16 cache: codes as before, scales in bfloat16.
    cb = kv_cache.init(2, 128, 4, 64, qtype, jnp.bfloat16, tile=32 if qtype == 'int4' else None)
    assert cb.k_scale.dtype == jnp.bfloat16 and cb.k.dtype == jnp.bfloat16


def test_update_is_in_place_when_donated():
    cache = kv_cache.init(1, 4096, 8, 64, 'fp8')
    new = jnp.ones((1, 1, 8, 64))
    for pos in (jnp.array(7), jnp.array([7])):
        mem = jax.jit(kv_cache.update, donate_argnums=0).lower(cache, new, new, pos).compile().memory_analysis()
        assert mem.alias_size_in_bytes == cache.nbytes  # every stored array is updated in its own buffer
        assert mem.temp_size_in_bytes < cache.nbytes // 100  # no copy of the cache


# --------------------------------------------------------------------------- attention numerics
@pytest.mark.parametrize('qtype', QTYPES)
@settings(max_examples=8)
@given(seed=st.integers(0, 2**16), lengths=st.lists(st.integers(0, T), min_size=B, max_size=B))
def test_attention_matches_float64_on_the_dequantized_cache(qtype, seed, lengths):
    # 4 causal queries (prefill); one decoded query (S=1) is checked the same way in the decode test.
    s = 4
    lengths = np.array(lengths)  # a row shorter than 4 has queries with nothing to see: zeros
    lengths[0] = T  # one full row: the loop runs to the (end-aligned, overlapping) last block
    k, v = rand(seed, (B, T, H, D)), rand(seed + 1, (B, T, H, D), 2.0)
    q = rand(seed + 2, (B, s, HQ, D), 1.5)
    cache = filled(qtype, k, v, lengths)
    out = np.asarray(attend(q, cache, jnp.asarray(lengths, jnp.int32)), np.float64)
    valid = valid_mask(lengths, B, s, T)
    c = SCALE
    kd, vd = dense(cache, 'k'), dense(cache, 'v')
    ref = ref_attention(q, kd, vd, valid, c)
    tol = f32_tolerance(q, kd, vd, valid, c, n_blocks(lengths))
    assert np.all(np.abs(out - ref) <= tol), np.max(np.abs(out - ref) / tol)


@pytest.mark.parametrize('qtype', ['int8', 'fp8', 'int4'])
@settings(max_examples=8)
@given(seed=st.integers(0, 2**16), lengths=st.lists(st.integers(4, T), min_size=B, max_size=B))
def test_quantized_vs_float_cache_within_the_format_step(qtype, seed, lengths):
    lengths = np.array(lengths)
    k, v = rand(seed, (B, T, H, D)), rand(seed + 1, (B, T, H, D), 2.0)
    q = rand(seed + 2, (B, 4, HQ, D), 1.5)
    qc, fc = filled(qtype, k, v, lengths), filled(None, k, v, lengths)
    lens = jnp.asarray(lengths, jnp.int32)
    out_q = np.asarray(attend(q, qc, lens), np.float64)
    out_f = np.asarray(attend(q, fc, lens), np.float64)
    valid = valid_mask(lengths, B, 4, T)
    c, nb = SCALE, n_blocks(lengths)
    ek, ev = element_error_bound(k, qc, 'k'), element_error_bound(v, qc, 'v')
    held = np.arange(T)[None, :] < lengths[:, None]
    assert np.all(np.abs(dense(qc, 'k') - k)[held] <= ek[held])
    assert np.all(np.abs(dense(qc, 'v') - v)[held] <= ev[held])
    bound = (format_bound(q, k.astype(np.float64), v.astype(np.float64), ek, ev, valid, c)
             + f32_tolerance(q, dense(qc, 'k'), dense(qc, 'v'), valid, c, nb)
             + f32_tolerance(q, k.astype(np.float64), v.astype(np.float64), valid, c, nb))
    err = np.abs(out_q - out_f)
    assert np.all(err <= bound), np.max(err / bound)
    assert err.max() > 0  # it did quantize


# --------------------------------------------------------------------------- decoding
@functools.partial(jax.jit, donate_argnums=0)
def decode_step(cache, q, k, v, pos):
    """One decoding step: write this token's k/v at pos (per row), attend over tokens 0..pos."""
    cache = kv_cache.update(cache, k, v, pos)
    return cache, kv_cache.attention(q, cache, pos + 1, block=BLOCK)


@pytest.mark.parametrize('qtype', ['int8', 'fp8', 'int4'])
def test_decode_token_by_token_vs_float_cache_with_garbage_past_the_fill(qtype):
    steps, prompt = 12, np.array([20, 5, 0])  # rows of different lengths; row 2 starts empty
    k_all, v_all = rand(10, (B, T, H, D)), rand(11, (B, T, H, D), 2.0)
    q_all = rand(12, (B, steps, HQ, D), 1.5)
    step = decode_step

    def garbage(cache, seed):
        """Every stored byte past the prompt replaced by junk (NaN/Inf scales and floats)."""
        rng = np.random.default_rng(seed)

        def junk(a):
            if np.issubdtype(a.dtype, np.floating):
                return rng.choice(np.array([np.nan, np.inf, -np.inf, 3e38], np.float32), a.shape).astype(a.dtype)
            return rng.integers(0, 256, a.shape).astype(np.uint8).view(a.dtype)
        return past_fill(cache, prompt, junk)

    def run(qt, junk_seed=None):
        cache = filled(qt, k_all, v_all, prompt)
        if junk_seed is not None:
            cache = garbage(cache, junk_seed)
        outs, pos = [], jnp.asarray(prompt, jnp.int32)
        for i in range(steps):
            tok = lambda a: jnp.asarray(a[np.arange(B), np.asarray(pos)][:, None])
            cache, o = step(cache, jnp.asarray(q_all[:, i:i + 1]), tok(k_all), tok(v_all), pos)
            outs.append(np.asarray(o, np.float64))
            pos = pos + 1
        return np.concatenate(outs, axis=1), cache

    out_q, cache_q = run(qtype)
    out_f, _ = run(None)
    out_junk, _ = run(qtype, junk_seed=0)
    chex.assert_trees_all_equal(out_junk, out_q)  # masked tokens contribute exactly nothing
    assert np.isfinite(out_q).all()

    # Per step: the format bound with the valid tokens of that step (query at position prompt + i),
    # and the float32 bound against float64 on the dequantized cache (S = 1: the decode path).
    c = 1 / math.sqrt(D)
    k64, v64 = k_all.astype(np.float64), v_all.astype(np.float64)
    kd, vd = dense(cache_q, 'k'), dense(cache_q, 'v')
    ek, ev = element_error_bound(k_all, cache_q, 'k'), element_error_bound(v_all, cache_q, 'v')
    filled_now = prompt + steps
    ek[np.arange(T)[None, :] >= filled_now[:, None]] = 0  # (never read)
    ev[np.arange(T)[None, :] >= filled_now[:, None]] = 0
    for i in range(steps):
        lens = prompt + i + 1
        valid = valid_mask(lens, B, 1, T)
        nb = n_blocks(lens)
        qi = q_all[:, i:i + 1]
        tol_q = f32_tolerance(qi, kd, vd, valid, c, nb)
        assert np.all(np.abs(out_q[:, i:i + 1] - ref_attention(qi, kd, vd, valid, c)) <= tol_q), i
        bound = format_bound(qi, k64, v64, ek, ev, valid, c) + tol_q + f32_tolerance(qi, k64, v64, valid, c, nb)
        assert np.all(np.abs(out_q[:, i:i + 1] - out_f[:, i:i + 1]) <= bound), i

    # Decoding one token at a time reads back exactly what one prefill of the same tokens would hold.
    want = filled(qtype, k_all, v_all, filled_now)
    chex.assert_trees_all_equal(cache_q, want)


def test_prefill_query_i_equals_decoding_at_its_position():
    lengths = np.array([80, 33, 4])
    k, v = rand(20, (B, T, H, D)), rand(21, (B, T, H, D))
    q = rand(22, (B, 4, HQ, D))
    cache = filled('int8', k, v, lengths)
    out = np.asarray(attend(q, cache, jnp.asarray(lengths)), np.float64)
    kd, vd = dense(cache, 'k'), dense(cache, 'v')
    c = SCALE
    for i in range(4):
        lens = lengths - 4 + i + 1  # the cache as it was when token i was the newest
        one = np.asarray(attend(q[:, i:i + 1], cache, jnp.asarray(lens)), np.float64)
        valid = valid_mask(lens, B, 1, T)
        tol = 2 * f32_tolerance(q[:, i:i + 1], kd, vd, valid, c, n_blocks(lengths))
        assert np.all(np.abs(one - out[:, i:i + 1]) <= tol)


def test_gqa_head_mapping():
    # kv head h's values are all h + 1: query head j must output j // (HQ // H) + 1 exactly.
    cache = kv_cache.init(B, T, H, D, None)
    k = rand(30, (B, T, H, D))
    v = np.broadcast_to(np.arange(1, H + 1, dtype=np.float32)[None, None, :, None], (B, T, H, D))
    cache = kv_cache.update(cache, k, v, 0)
    out = attend(rand(31, (B, 4, HQ, D)), cache, jnp.array([T, 50, 4]))
    want = np.broadcast_to((np.arange(HQ) // (HQ // H) + 1.0)[None, None, :, None], out.shape)
    np.testing.assert_allclose(out, want, rtol=4 * gamma(T))


def test_masks_agree_with_lengths_and_empty_rows_give_zeros():
    lengths = np.array([57, 0, 3])
    k, v = rand(40, (B, T, H, D)), rand(41, (B, T, H, D))
    cache = filled('int8', k, v, lengths)
    q = rand(42, (B, 4, HQ, D))
    by_len = np.asarray(attend(q, cache, jnp.asarray(lengths)))
    causal = valid_mask(lengths, B, 4, T)
    by_mask = np.asarray(attend(q, cache, jnp.asarray(causal)))
    np.testing.assert_allclose(by_mask, by_len, rtol=0, atol=1e-5)
    # Row 1 holds nothing, and row 2's first query (position -1) has nothing to see: zeros, not NaN.
    assert not by_len[1].any() and not by_len[2, 0].any() and not by_mask[1].any()
    # Row 2's second query (position 0) sees exactly one token: its value row.
    vd = dense(cache, 'v')
    np.testing.assert_allclose(by_len[2, 1], np.repeat(vd[2, 0], HQ // H, axis=0), rtol=2e-7)
    # A [B, T] key mask (the same keys for every query, not causal), holes included.
    key_mask = (np.arange(T)[None, :] < lengths[:, None]) & (np.arange(T) % 3 != 1)
    out = np.asarray(attend(q, cache, jnp.asarray(key_mask)), np.float64)
    valid = valid_mask(key_mask, B, 4, T)
    kd = dense(cache, 'k')
    ref = ref_attention(q, kd, vd, valid, SCALE)
    assert np.all(np.abs(out - ref) <= f32_tolerance(q, kd, vd, valid, SCALE, n_blocks(key_mask)))


# --------------------------------------------------------------------------- memory
def naive_attention(q, cache, lengths):
    """Dequantize the whole cache, then ordinary softmax attention (what the block loop avoids)."""
    k = qarray.dequantize(cache.k) if cache.quantized else cache.k
    v = qarray.dequantize(cache.v) if cache.quantized else cache.v
    g = q.shape[2] // cache.kv_heads
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum('bshd,bthd->bhst', q, k) / math.sqrt(cache.head_dim)
    s = jnp.where((jnp.arange(cache.max_len)[None, :] < lengths[:, None])[:, None, None, :], s, -jnp.inf)
    return jnp.einsum('bhst,bthd->bshd', jax.nn.softmax(s, axis=-1), v)


@pytest.mark.parametrize('qtype', ['int8', 'fp8', 'int4'])
def test_attention_never_materialises_the_cache_in_float(qtype):
    """Compiled temporaries of the block loop vs a float copy of an 8k-token cache and the naive way."""
    b, t, h, d, hq = 1, 8192, 8, 64, 32
    cache = kv_cache.init(b, t, h, d, qtype, tile=32 if qtype == 'int4' else None)
    q, lengths = jnp.ones((b, 1, hq, d)), jnp.array([t])
    float_copy = 2 * b * t * h * d * 4  # keys + values in float32
    temp = lambda f: jax.jit(f).lower(q, cache, lengths).compile().memory_analysis().temp_size_in_bytes
    blocked = temp(lambda q, c, l: kv_cache.attention(q, c, l, block=512))
    # One 512-token block of keys and values in float32 is 2 MiB of the 32 MiB float cache.
    assert blocked <= float_copy // 12, (blocked, float_copy)
    assert blocked < cache.nbytes // 2  # not even a copy of the quantized cache
    if qtype == 'int8':  # the naive program (dequantize everything first) holds at least a float copy
        naive = temp(naive_attention)
        assert naive >= float_copy, (naive, float_copy)


# --------------------------------------------------------------------------- jit / pytree
def test_cache_is_a_pytree_and_jit_round_trips():
    cache = make_cache('int4')
    leaves, tree = jax.tree_util.tree_flatten(cache)
    assert len(leaves) == 4
    back = jax.tree_util.tree_unflatten(tree, leaves)
    assert back.qtype.name == 'int4' and back.tile == 16 and back.shape == cache.shape
    out = jax.jit(lambda c: c)(cache)
    chex.assert_trees_all_equal(out, cache)
    fl = make_cache(None)
    assert len(jax.tree_util.tree_leaves(fl)) == 2 and fl.k is fl.k_data


def test_docstring_examples_run():
    from qarray.kv_cache import _attention, _cache  # the package re-exports what these modules define
    results = [doctest.testmod(m, optionflags=doctest.ELLIPSIS) for m in (kv_cache, _cache, _attention)]
    assert sum(r.failed for r in results) == 0 and sum(r.attempted for r in results) > 10


# --------------------------------------------------------------------------- errors
def test_init_errors_name_the_argument():
    with pytest.raises(ValueError, match='tile=24 must divide head_dim=64'):
        kv_cache.init(1, 8, 2, 64, 'int4', tile=24)
    with pytest.raises(ValueError, match="qtype='int5' is not a KV cache format"):
        kv_cache.init(1, 8, 2, 64, 'int5')
    with pytest.raises(ValueError, match="qtype='bogus'"):
        kv_cache.init(1, 8, 2, 64, 'bogus')
    with pytest.raises(ValueError, match='max_len must be >= 1'):
        kv_cache.init(1, 0, 2, 64)
    with pytest.raises(TypeError, match='head_dim must be an int'):
        kv_cache.init(1, 8, 2, 64.0)
    with pytest.raises(TypeError, match='dtype must be a floating dtype'):
        kv_cache.init(1, 8, 2, 64, 'int8', jnp.int32)
    with pytest.raises(TypeError, match='tile and scale_dtype apply to quantized caches only'):
        kv_cache.init(1, 8, 2, 64, None, tile=32)


def test_update_errors_name_the_argument():
    cache = kv_cache.init(2, 8, 2, 16, 'int8')
    ok = jnp.zeros((2, 1, 2, 16))
    with pytest.raises(ValueError, match=r'k must have shape \[batch=2'):
        kv_cache.update(cache, jnp.zeros((2, 1, 3, 16)), ok, 0)
    with pytest.raises(ValueError, match=r'v must have shape .*got \(2, 1, 2, 8\)'):
        kv_cache.update(cache, ok, jnp.zeros((2, 1, 2, 8)), 0)
    with pytest.raises(ValueError, match='k and v must have the same shape'):
        kv_cache.update(cache, ok, jnp.zeros((2, 2, 2, 16)), 0)
    with pytest.raises(ValueError, match=r'k must have shape .*new_tokens \(1..8\)'):
        kv_cache.update(cache, jnp.zeros((2, 9, 2, 16)), jnp.zeros((2, 9, 2, 16)), 0)
    with pytest.raises(TypeError, match='k must be a floating-point array'):
        kv_cache.update(cache, ok.astype(jnp.int32), ok, 0)
    with pytest.raises(ValueError, match=r'positions \[3, 8\] \+ 1 new tokens must lie within'):
        kv_cache.update(cache, ok, ok, jnp.array([3, 8]))
    with pytest.raises(ValueError, match='positions must be a scalar start or one start per batch row'):
        kv_cache.update(cache, ok, ok, jnp.array([1, 2, 3]))
    with pytest.raises(TypeError, match='positions must be integers'):
        kv_cache.update(cache, ok, ok, 1.0)
    with pytest.raises(TypeError, match='cache must be a KVCache'):
        kv_cache.update({'k': 0}, ok, ok, 0)


def test_attention_errors_name_the_argument():
    cache = kv_cache.init(2, 8, 2, 16, 'fp8')
    q = jnp.zeros((2, 1, 4, 16))
    lens = jnp.array([1, 2])
    with pytest.raises(ValueError, match=r'q must have shape .*Hq a multiple of kv_heads=2; got \(2, 1, 3, 16\)'):
        kv_cache.attention(jnp.zeros((2, 1, 3, 16)), cache, lens)
    with pytest.raises(ValueError, match=r'q must have shape .*head_dim=16'):
        kv_cache.attention(jnp.zeros((2, 1, 4, 8)), cache, lens)
    with pytest.raises(ValueError, match=r'boolean lengths_or_mask must have shape'):
        kv_cache.attention(q, cache, jnp.ones((2, 7), bool))
    with pytest.raises(ValueError, match=r'lengths must lie in \[0, max_len=8\]'):
        kv_cache.attention(q, cache, jnp.array([1, 9]))
    with pytest.raises(ValueError, match=r'lengths_or_mask \(lengths\) must be a scalar or shape \(2,\)'):
        kv_cache.attention(q, cache, jnp.array([1, 2, 3]))
    with pytest.raises(TypeError, match='lengths_or_mask must be integer lengths'):
        kv_cache.attention(q, cache, jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match='block must be >= 1'):
        kv_cache.attention(q, cache, lens, block=0)
    with pytest.raises(ValueError, match='softmax_scale must be finite and > 0'):
        kv_cache.attention(q, cache, lens, softmax_scale=-1.0)
    with pytest.raises(TypeError, match='q must be a floating-point array'):
        kv_cache.attention(q.astype(jnp.int32), cache, lens)
