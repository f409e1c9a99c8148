"""Quantized training on real data (issue 17): the digits CNN learns with an int8 forward and an int8
backward (``QtRule(..., bwd_qtype='int8', fwd_quantized=True)``), from the same start as float.

The full comparison (four settings, several seeds, Qwix HEAD) is ``benchmarks/training_bench.py``; this
checks the short end of it: a few Adam steps through the quantized custom VJP reduce the held-out loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_integration as fi
from examples.digits import data, models

pytest.importorskip('sklearn')

INT8 = fi.QtRule(weight_qtype='int8', act_qtype='int8', bwd_qtype='int8', fwd_quantized=True)


def _train(model, params, d, steps=40, batch=32, lr=3e-3):
    opt = optax.adam(lr)

    @jax.jit
    def step(p, s, x, y):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({'params': p}, x), y).mean()
        value, g = jax.value_and_grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    s = opt.init(params)
    idx = np.random.default_rng(0).integers(0, len(d.y_train), (steps, batch))
    for i in idx:
        params, s, _ = step(params, s, d.x_train[i], d.y_train[i])
    return params


def _test_loss(model, params, d):
    @jax.jit
    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({'params': p}, x), y).mean()
    return float(loss(params, d.x_test, d.y_test))


@pytest.mark.slow
def test_int8_forward_and_backward_training_reduces_the_test_loss_like_float():
    d = data.load()
    float_model = models.LinenCNN()
    qt_model = fi.quantize_model(float_model, fi.QtProvider([INT8]))
    p0 = float_model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']
    assert jax.tree.structure(qt_model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']) == (
        jax.tree.structure(p0))
    start = _test_loss(float_model, p0, d)
    # a freshly initialised 10-way classifier: about log(10) (small random logits)
    assert abs(start - np.log(10)) < 0.2
    q_end = _test_loss(qt_model, _train(qt_model, p0, d), d)  # the int8 model's own (int8) forward
    f_end = _test_loss(float_model, _train(float_model, p0, d), d)
    # 40 steps take float well below half its starting loss; the int8-trained model must learn too, and end
    # within a factor 1.5 of float (int8 rounding of every forward and backward operand is ~0.4 % per value;
    # what is compared is the outcome of two noisy 40-step runs, not the rounding itself).
    assert f_end < 0.5 * start
    assert q_end < 0.5 * start
    assert q_end < 1.5 * f_end, (q_end, f_end)
