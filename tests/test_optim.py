"""qarray.optim: 8-bit Adam against optax's float32 Adam, its state, checkpoints and errors."""

from __future__ import annotations

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import budget
import qarray
import qarray.optim as qo
from qarray import qtypes

B1, B2 = 0.9, 0.999
C_RATIO = (1 - B1) / math.sqrt((1 - B2) * (1 - B1 * B1 / B2))  # |m| <= C sqrt(v) in exact Adam: 7.27


def _run(opt, loss, w0, steps, noise=0.0, key=jax.random.key(0)):
    """``steps`` jitted steps of ``opt`` on ``loss`` from ``w0`` (gradient + ``noise`` * N(0, 1)); final params."""
    def step(carry, t):
        w, s = carry
        g = jax.grad(loss)(w)
        g = jax.tree.map(lambda a: a + noise * jax.random.normal(jax.random.fold_in(key, t), a.shape), g)
        u, s = opt.update(g, s, w)
        return (optax.apply_updates(w, u), s), None
    (w, s), _ = jax.jit(lambda w, s: jax.lax.scan(step, (w, s), jnp.arange(steps)))(w0, opt.init(w0))
    return w, s


def _leaves_equal(a, b):
    la = jax.tree.leaves(a)
    lb = jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- unquantized: exactly optax ---------------------------------------------------------------------------------
def test_unquantized_equals_optax_adamw_bit_for_bit():
    # min_size above every param: float32 moments and the same expressions as optax.scale_by_adam. Eagerly (one
    # op at a time) they give the same bits. Under jit XLA may fuse the two programs differently (an FMA for
    # (1-b1) g + b1 m in one and not the other), which moves m by a few ulps of its terms: the update, m_hat /
    # (sqrt(v_hat) + eps), then differs by at most lr * 8u * (0.1|g| + 0.9|m|) / sqrt(v) / (1 - b1^t), with
    # |g| / sqrt(v) <= 1 / sqrt(1 - b2) and |m| / sqrt(v) <= C_RATIO: below lr * 8u * 10 * (3.2 + 6.6) < lr * 800u.
    k = jax.random.split(jax.random.key(1), 3)
    params = {'w': jax.random.normal(k[0], (16, 32)), 'b': jnp.zeros(32), 's': jnp.ones(())}
    mask = {'w': True, 'b': False, 's': False}
    sched = optax.cosine_decay_schedule(1e-2, 20)
    pairs = [(qo.adamw_8bit(sched, weight_decay=0.1, mask=mask, min_size=10**9),
              optax.adamw(sched, weight_decay=0.1, mask=mask)),
             (qo.adam_8bit(3e-3, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-9, min_size=10**9),
              optax.adam(3e-3, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-9))]
    for i, (ours, ref) in enumerate(pairs):
        for jitted in (False, True)[:2 - i]:
            f1, f2 = (jax.jit(ours.update), jax.jit(ref.update)) if jitted else (ours.update, ref.update)
            p1, p2, s1, s2 = params, params, ours.init(params), ref.init(params)
            for t in range(3):
                g = jax.tree.map(lambda a: jax.random.normal(jax.random.fold_in(k[1], t), a.shape), params)
                u1, s1 = f1(g, s1, p1)
                u2, s2 = f2(g, s2, p2)
                if jitted:
                    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
                        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-2 * 800 * 2.0**-24)
                    p1 = p2 = optax.apply_updates(p2, u2)  # compare each step from the same point
                else:
                    _leaves_equal(u1, u2)
                    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
            if not jitted:
                _leaves_equal(p1, p2)
                _leaves_equal((s1[0].count, s1[0].mu, s1[0].nu), (s2[0].count, s2[0].mu, s2[0].nu))


# ---- convergence ----------------------------------------------------------------------------------------------------
LR0, LR_END, STEPS = 0.1, 1e-4, 300


def _sched():
    return optax.cosine_decay_schedule(LR0, STEPS, alpha=LR_END / LR0)


def _near_optimum_tol():
    # Adam's step on a coordinate is lr_t * m_hat / (sqrt(v_hat) + eps), at most lr_t * C_RATIO * (bias factor
    # sqrt(1 - b2^t) / (1 - b1^t) <= 1 once t >= 22): near the optimum an iterate oscillates by about the last
    # steps' sizes. Allow ten final steps of the largest size: 10 * C_RATIO * LR_END (7.3e-3).
    return 10 * C_RATIO * LR_END


def test_quadratic_converges_to_the_same_optimum_as_optax_adam():
    # f(w) = 1/2 sum h (w - w*)^2 with curvatures over three decades; 1024 values = 4 blocks of 256, all
    # quantized. Without the |m| <= C sqrt(v) projection, a coordinate whose v rounds to 0 while m does not
    # takes steps of m / eps and this run diverges (max |w - w*| ~ 11).
    d = 1024
    k = jax.random.split(jax.random.key(2), 2)
    h = jnp.exp(jax.random.uniform(k[0], (d,), minval=math.log(1e-2), maxval=math.log(10.0)))
    w_star = jax.random.normal(k[1], (d,))
    loss = lambda w: 0.5 * jnp.sum(h * (w - w_star) ** 2)
    w8, s8 = _run(qo.adam_8bit(_sched(), min_size=0), loss, jnp.zeros(d), STEPS)
    wf, _ = _run(optax.adam(_sched()), loss, jnp.zeros(d), STEPS)
    assert isinstance(s8[0].mu, qarray.QArray)
    tol = _near_optimum_tol()
    assert float(jnp.max(jnp.abs(wf - w_star))) < tol  # the reference itself gets there
    assert float(jnp.max(jnp.abs(w8 - w_star))) < tol


def test_least_squares_matches_the_float64_solution():
    # min ||X W - Y||^2 over a (32, 64) W (2048 values, 8 blocks; min_size=0 quantizes it); the reference is
    # numpy's float64 lstsq. X is well conditioned (Gaussian 128 x 32), so the optimum is unique.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((128, 32))
    y = x @ rng.standard_normal((32, 64)) + 0.1 * rng.standard_normal((128, 64))
    w_ref = np.linalg.lstsq(x, y, rcond=None)[0]
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    loss = lambda w: 0.5 * jnp.mean(jnp.sum((xj @ w['w'] - yj) ** 2, axis=1))
    w8, s8 = _run(qo.adamw_8bit(_sched(), weight_decay=0.0, min_size=0), loss, {'w': jnp.zeros((32, 64))}, STEPS)
    assert isinstance(s8[0].nu['w'], qarray.QArray) and s8[0].nu['w'].scale.shape == (8,)
    assert float(np.max(np.abs(np.asarray(w8['w'], np.float64) - w_ref))) < _near_optimum_tol()


def test_noisy_quadratic_reaches_float_adams_noise_floor_with_stochastic_rounding():
    # Noisy gradients (sigma = 1): the loss settles at a noise floor set by the step sizes. Stochastic rounding
    # keeps the moments unbiased, so it lands on float Adam's floor; the assertion allows 10 % (the two runs
    # differ only in the moments' rounding noise, which averages over 1024 coordinates).
    d = 1024
    k = jax.random.split(jax.random.key(4), 2)
    h = jnp.exp(jax.random.uniform(k[0], (d,), minval=math.log(1e-2), maxval=math.log(10.0)))
    w_star = jax.random.normal(k[1], (d,))
    loss = lambda w: 0.5 * jnp.sum(h * (w - w_star) ** 2)
    sched = optax.cosine_decay_schedule(LR0, STEPS)
    w8, _ = _run(qo.adam_8bit(sched, rounding='stochastic', min_size=0), loss, jnp.zeros(d), STEPS, noise=1.0)
    wf, _ = _run(optax.adam(sched), loss, jnp.zeros(d), STEPS, noise=1.0)
    assert float(loss(w8)) < 1.1 * float(loss(wf))


_NO_TOP_LEVEL = float(qtypes.get('dynamic8u').codebook[-1]) < 1.0


@pytest.mark.xfail(_NO_TOP_LEVEL, strict=True, reason=(
    "qtypes' dynamic8u has no level 1.0 (its top is 0.99648): a block's largest v re-quantizes below itself every "
    "step, the scale shrinks 0.35 % per step and drags the block's values with it, so v decays several times "
    "faster than b2 says and steady-state steps grow to 1.3-2x Adam's. Fix: the unsigned map laid out as "
    "bitsandbytes' (decades 1e-6..1 with 2, 4, ..., 128 levels, plus 0 and 1)."))
@pytest.mark.parametrize('rounding', ['nearest', 'stochastic'])
def test_steady_state_step_matches_float_adam(rounding):
    # A constant gradient with |g| in [0.5, 1]: every m sits in the top decade of dynamic8 (half-gap 0.0070 of
    # the block absmax, <= 1.4 % of m) and every v in that of dynamic8u (half-gap 0.0035, <= 1.4 % of v, 0.7 % of
    # sqrt(v)). Float Adam's step is sign(g) (up to eps); the 8-bit step must stay within 1.4 + 0.7 < 3 % of it
    # (median), also after 1000 re-quantizations.
    n = 1024
    k = jax.random.split(jax.random.key(5), 2)
    g = jnp.where(jax.random.bernoulli(k[0], 0.5, (n,)), 1.0, -1.0) * jax.random.uniform(k[1], (n,), minval=0.5)
    tx = qo.scale_by_adam_8bit(min_size=0, rounding=rounding)

    def step(s, _):
        u, s = tx.update(g, s)
        return s, None
    s, _ = jax.jit(lambda s: jax.lax.scan(step, s, None, length=1000))(tx.init(g))
    u, _ = tx.update(g, s)
    assert abs(float(jnp.median(jnp.abs(u))) - 1.0) < 0.03


@settings(max_examples=budget.examples(10))
@given(st.lists(st.floats(-1e3, 1e3).filter(lambda x: x == 0 or abs(x) > 1e-100), min_size=1, max_size=40))
def test_moment_ratio_bound_holds_for_exact_adam(gs):
    # The projection |m| <= C sqrt(v) that 8-bit Adam applies is a no-op for exact Adam: float64 moments of any
    # gradient sequence stay inside (Cauchy-Schwarz), and the extremal sequence g_{t-k} ~ (b1/b2)^k comes close.
    c = qo._moment_ratio_bound(B1, B2, slack=1.0)
    assert c == pytest.approx(C_RATIO)
    m = v = 0.0
    for x in gs:
        m, v = B1 * m + (1 - B1) * x, B2 * v + (1 - B2) * x * x
        assert abs(m) <= c * math.sqrt(v) * (1 + 1e-12)  # (|x| > 1e-100: x * x does not underflow)
    m = v = 0.0
    for k in range(400, -1, -1):
        x = (B1 / B2) ** k
        m, v = B1 * m + (1 - B1) * x, B2 * v + (1 - B2) * x * x
    assert 0.99 * c < m / math.sqrt(v) <= c


# ---- state: layout, bytes, dtypes ----------------------------------------------------------------------------------
def test_state_bytes_are_a_quarter_of_float32_adams():
    for shape in [(512, 1024), (5000,), (3, 7, 300)]:
        n = math.prod(shape)
        params = {'w': jax.ShapeDtypeStruct(shape, jnp.float32)}
        q8 = qo.state_nbytes(jax.eval_shape(qo.adamw_8bit(1e-3, min_size=0).init, params))
        f32 = qo.state_nbytes(jax.eval_shape(optax.adamw(1e-3).init, params))
        blocks = -(-n // 256)
        assert q8 == 2 * (n + 4 * blocks) + 4  # codes + one float32 scale per block, per moment, + the count
        assert f32 == 8 * n + 4
        if n >= 4096:
            assert 0.25 <= q8 / f32 <= 0.27
    state = qo.adamw_8bit(1e-3).init({'w': jnp.zeros(4096)})  # concrete states count the same
    assert qo.state_nbytes(state) == 2 * (4096 + 4 * 16) + 4


def test_mixed_pytree_large_small_bf16_scalar():
    k = jax.random.split(jax.random.key(6), 4)
    params = {'big': jax.random.normal(k[0], (64, 80)),                       # 5120: quantized, 20 blocks
              'big16': jax.random.normal(k[1], (3, 2000)).astype(jnp.bfloat16),  # 6000: quantized, last block 112
              'small': jnp.ones(100), 'small16': jnp.ones(50, jnp.bfloat16), 'scalar': jnp.float32(2.0)}
    opt = qo.adamw_8bit(1e-2)
    state = opt.init(params)
    mu, nu = state[0].mu, state[0].nu
    for name, blocks in [('big', 20), ('big16', 24)]:
        assert isinstance(mu[name], qarray.QArray) and mu[name].qtype.name == 'dynamic8'
        assert nu[name].qtype.name == 'dynamic8u' and mu[name].scale.shape == (blocks,)
        assert mu[name].dtype == jnp.float32 and mu[name].scale.dtype == jnp.float32
    for name in ('small', 'small16', 'scalar'):
        assert not isinstance(mu[name], qarray.QArray) and mu[name].dtype == jnp.float32
    grads = jax.tree.map(lambda p: (jnp.cos(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape)).astype(p.dtype),
                         params)
    upd = jax.jit(opt.update)
    for _ in range(3):
        u, state = upd(grads, state, params)
        params = optax.apply_updates(params, u)
    for name in params:
        assert u[name].dtype == grads[name].dtype and u[name].shape == grads[name].shape
        assert bool(jnp.all(jnp.isfinite(u[name].astype(jnp.float32))))
    assert params['big16'].dtype == jnp.bfloat16


def test_uneven_last_block_stores_moments_within_half_a_gap():
    # 300 values, blocks of 256: a whole block and a partial one of 44, each with its own absmax scale. After
    # one step m = 0.1 g and v = 0.001 g^2 exactly (float32); stored, each is within half the code book's
    # largest gap (or of the clipped outermost level) times its block's absmax.
    g = jnp.concatenate([jnp.linspace(-1.0, 1.0, 256), 1e-3 * jnp.linspace(-1.0, 1.0, 44)])
    tx = qo.scale_by_adam_8bit(min_size=0)
    _, s = tx.update(g, tx.init(g))
    assert s.mu.shape == (300,) and s.mu.scale.shape == (2,) and s.mu.uneven_tiles == {0: 256}
    for q, exact, name in [(s.mu, (1 - B1) * g, 'dynamic8'), (s.nu, (1 - B2) * g * g, 'dynamic8u')]:
        cb = qtypes.get(name).codebook.astype(np.float64)
        half_gap = max(np.max(np.diff(cb)) / 2, 1 - cb[-1], 1 + cb[0])
        err = np.abs(np.asarray(qarray.dequantize(q), np.float64) - np.asarray(exact, np.float64))
        for sl in (slice(0, 256), slice(256, 300)):
            absmax = float(np.max(np.abs(np.asarray(exact)[sl])))
            assert err[sl].max() <= half_gap * absmax * (1 + 1e-6)


def test_jit_and_eager_agree():
    # One step from the same state, eagerly and jitted. XLA may fuse the jitted float32 expressions differently
    # (FMA), moving m by a few ulps of its terms: the updates agree within lr * 800u (the bound of
    # test_unquantized_equals_optax_adamw_bit_for_bit), the scales (block absmax) within 4 ulps, and a code can
    # move at most to the next level (a value within ulps of a rounding threshold).
    k = jax.random.split(jax.random.key(7), 3)
    params = {'w': jax.random.normal(k[0], (20, 30))}
    opt = qo.adamw_8bit(1e-2, min_size=0, rounding='stochastic', seed=3)
    _, s0 = jax.jit(opt.update)({'w': jax.random.normal(k[1], (20, 30))}, opt.init(params), params)
    g = {'w': jax.random.normal(k[2], (20, 30))}
    u_e, s_e = opt.update(g, s0, params)
    u_j, s_j = jax.jit(opt.update)(g, s0, params)
    np.testing.assert_allclose(np.asarray(u_e['w']), np.asarray(u_j['w']), rtol=0, atol=1e-2 * 800 * 2.0**-24)
    for a, b in [(s_e[0].mu['w'], s_j[0].mu['w']), (s_e[0].nu['w'], s_j[0].nu['w'])]:
        np.testing.assert_allclose(np.asarray(a.scale), np.asarray(b.scale), rtol=4 * 2.0**-24)
        ca, cb = np.asarray(qarray.codes(a), np.int32), np.asarray(qarray.codes(b), np.int32)
        assert np.abs(ca - cb).max() <= 1


def test_stochastic_rounding_is_reproducible_from_seed_and_count():
    g = {'w': jax.random.normal(jax.random.key(8), (1024,))}
    runs = []
    for seed in (0, 0, 1):
        tx = qo.scale_by_adam_8bit(min_size=0, rounding='stochastic', seed=seed)
        s = tx.init(g)
        for _ in range(2):
            _, s = tx.update(g, s)
        runs.append(np.asarray(qarray.codes(s.nu['w'])))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.any(runs[0] != runs[2])


# ---- checkpoints ---------------------------------------------------------------------------------------------------
def test_state_round_trips_through_checkpoints_bit_for_bit(tmp_path):
    pytest.importorskip('orbax.checkpoint')
    k = jax.random.split(jax.random.key(9), 2)
    params = {'dense': {'kernel': jax.random.normal(k[0], (64, 90)), 'bias': jnp.zeros(90)}}
    opt = qo.adamw_8bit(optax.cosine_decay_schedule(1e-2, 10), rounding='stochastic')
    state = opt.init(params)
    upd = jax.jit(opt.update)
    grads = lambda t: jax.tree.map(lambda p: jax.random.normal(jax.random.fold_in(k[1], t), p.shape), params)
    for t in range(2):
        _, state = upd(grads(t), state, params)
    qarray.io.save(tmp_path / 'opt', state)
    restored = qarray.io.restore(tmp_path / 'opt', state)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    kern = restored[0].mu['dense']['kernel']
    assert isinstance(kern, qarray.QArray) and kern.qtype.name == 'dynamic8'
    _leaves_equal(restored, state)  # codes, scales, float moments and counts
    u1, _ = upd(grads(2), state, params)
    u2, _ = upd(grads(2), restored, params)
    _leaves_equal(u1, u2)  # the run continues identically (stochastic rounding included)


# ---- non-finite gradients -------------------------------------------------------------------------------------------
def test_nan_gradient_poisons_its_value_now_and_its_block_after():
    g = jnp.ones(1024).at[300].set(jnp.nan)  # block 1 of 4
    tx = qo.scale_by_adam_8bit(min_size=0)
    u, s = tx.update(g, tx.init(g))
    assert bool(jnp.isnan(u[300])) and int(jnp.isnan(u).sum()) == 1  # only that value's update, as optax
    m = qarray.dequantize(s.mu)
    assert bool(jnp.all(jnp.isnan(m[256:512]))) and bool(jnp.all(jnp.isfinite(m[:256])))
    assert bool(jnp.all(jnp.isfinite(m[512:])))
    u, _ = tx.update(jnp.ones(1024), s)
    assert bool(jnp.all(jnp.isnan(u[256:512]))) and int(jnp.isnan(u).sum()) == 256
    # The documented way to skip such steps: optax.apply_if_finite leaves the state untouched.
    safe = optax.apply_if_finite(qo.adam_8bit(1e-2, min_size=0), max_consecutive_errors=3)
    s0 = safe.init(jnp.ones(1024))
    u, s1 = jax.jit(safe.update)(g, s0)
    assert bool(jnp.all(u == 0)) and int(s1.notfinite_count) == 1
    _leaves_equal(s1.inner_state, s0.inner_state)


# ---- arguments ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kwargs, name', [
    (dict(learning_rate=-1e-3), 'learning_rate'),
    (dict(learning_rate=float('nan')), 'learning_rate'),
    (dict(learning_rate='0.1'), 'learning_rate'),
    (dict(b1=1.0), 'b1'),
    (dict(b2=-0.1), 'b2'),
    (dict(eps=-1e-8), 'eps'),
    (dict(eps_root=-1.0), 'eps_root'),
    (dict(weight_decay=-0.1), 'weight_decay'),
    (dict(block_size=0), 'block_size'),
    (dict(block_size=2.5), 'block_size'),
    (dict(block_size=True), 'block_size'),
    (dict(min_size=-1), 'min_size'),
    (dict(rounding='up'), 'rounding'),
    (dict(seed=1.5), 'seed'),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    kwargs = {'learning_rate': 1e-3, **kwargs}
    with pytest.raises(ValueError, match=name):
        qo.adamw_8bit(**kwargs)
    if name != 'weight_decay':
        with pytest.raises(ValueError, match=name):
            qo.adam_8bit(**kwargs)


def test_schedules_and_zero_sized_params_are_accepted():
    opt = qo.adamw_8bit(optax.linear_schedule(1e-2, 0.0, 10), min_size=0)
    params = {'w': jnp.ones((0, 4)), 'v': jnp.ones(10)}
    u, _ = opt.update(jax.tree.map(jnp.ones_like, params), opt.init(params), params)
    assert u['w'].shape == (0, 4) and u['v'].shape == (10,)


def test_import_qarray_does_not_import_optax():
    code = ("import sys, qarray, qarray.optim; assert 'optax' not in sys.modules; "
            "qarray.optim.adam_8bit(1e-3); assert 'optax' in sys.modules")
    subprocess.run([sys.executable, '-c', code], check=True)
