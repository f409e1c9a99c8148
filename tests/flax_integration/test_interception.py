"""The interception engine: patches installed only while a quantized model runs, per thread, routed once."""

import contextlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qarray
from flax import linen as nn
from flax import nnx

import flax_integration as fi
from flax_integration import _interception, _op_table
from flax_integration._interception import Target, installed
from tolerances import U32, abs_dot, assert_within, dot_bound, gamma

ORIGINAL = {f'{ep.owner_name}.{ep.attr}': _op_table.original(ep) for _, ep in _op_table.entry_points()}


class _Handler:
    """A bare provider: ``handle`` is all the engine needs."""

    def __init__(self, fn):
        self.fn = fn

    def handle(self, call, frame):
        return self.fn(call, frame)


def _all_original():
    return all(getattr(ep.owner, ep.attr) is ORIGINAL[f'{ep.owner_name}.{ep.attr}']
               for _, ep in _op_table.entry_points())


def test_model_run_restores_originals_and_routes_calls():
    seen = []

    def handler(call, frame):
        seen.append(call.name)
        return call.run_original()

    with _interception.model_run(_Handler(handler)):
        assert jax.lax.dot_general is not ORIGINAL['jax.lax.dot_general']
        jnp.dot(jnp.ones((2, 3)), jnp.ones((3, 2)))
        jnp.matmul(jnp.ones((4, 2, 3)), jnp.ones((4, 3, 2)))
        jax.lax.conv_general_dilated(jnp.ones((1, 1, 4, 4)), jnp.ones((1, 1, 3, 3)), (1, 1), 'SAME')
    assert seen == ['dot_general', 'dot_general', 'conv_general_dilated']
    assert _all_original()


def test_other_threads_are_not_intercepted():
    entered, release = threading.Event(), threading.Event()
    calls = []

    def handler(call, frame):
        calls.append(threading.current_thread().name)
        return call.run_original()

    def inside():
        with _interception.model_run(_Handler(handler)):
            entered.set()
            release.wait(10)
            jnp.einsum('ij,jk->ik', jnp.ones((2, 2)), jnp.ones((2, 2)))

    t = threading.Thread(target=inside, name='scoped')
    t.start()
    entered.wait(10)
    out = jnp.einsum('ij,jk->ik', jnp.ones((2, 2)), jnp.ones((2, 2)))  # main thread: not routed
    release.set()
    t.join()
    assert calls == ['scoped'] and float(out[0, 0]) == 2.0
    assert _all_original()


def test_provider_is_not_reentered():
    depth = []

    def handler(call, frame):
        depth.append(call.name)
        return jnp.einsum('ij,jk->ik', *[fi.wrappers.as_float(o) for o in call.operands])

    with _interception.model_run(_Handler(handler)):
        jnp.einsum('ij,jk->ik', jnp.ones((2, 2)), jnp.ones((2, 2)))
    assert depth == ['einsum']


def test_patches_restored_after_an_exception():
    def handler(call, frame):
        raise RuntimeError('boom')

    with pytest.raises(RuntimeError, match='boom'):
        with _interception.model_run(_Handler(handler)):
            jnp.dot(jnp.ones((2, 2)), jnp.ones((2, 2)))
    assert _all_original() and _interception.running_provider() is None


class _Extra(fi.Provider):
    """Declares jnp.tanh as an extra op and records what it sees."""

    def __init__(self):
        super().__init__([])
        self.seen = []

    def intercepts(self):
        return (fi.providers.Intercept('tanh', (Target(jnp, 'tanh'),)),)

    def process_extra_op(self, op):
        self.seen.append((op.name, op.frame.path))
        return op.original(*op.args, **op.kwargs) * 0 + 7.0

    def process_op(self, op):
        return op.call.run_original()


def test_provider_extra_intercepts_are_installed_for_its_runs_only():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.tanh(nn.Dense(2)(x))

    x = jnp.ones((1, 3))
    p = _Extra()
    m = fi.quantize_model(Net(), p)
    v = m.init(jax.random.key(0), x)
    p.seen.clear()
    y = m.apply(v, x)
    assert p.seen == [('tanh', '')] and float(y[0, 0]) == 7.0
    assert not installed(Target(jnp, 'tanh')) and float(jnp.tanh(0.0)) == 0.0
    # A model quantized with a provider that declares nothing never routes tanh.
    plain = fi.quantize_model(Net(), fi.PtqProvider([]))
    # The original float ops (a K=3 Dense, tanh): two float32 evaluations, tanh 1-Lipschitz and within a few
    # ulps (8 u each), the bias add (u |y| each).
    k, b = np.asarray(v['params']['Dense_0']['kernel']), np.asarray(v['params']['Dense_0']['bias'])
    y = np.asarray(x) @ k + b
    assert_within(plain.apply(v, x), Net().apply(v, x), dot_bound(x, k) + 2 * U32 * (np.abs(y) + 8))


def test_extra_intercepts_cannot_take_op_table_targets():
    class Bad(_Extra):
        def intercepts(self):
            return (fi.providers.Intercept('dot', (Target(jnp, 'dot'),)),)

    with pytest.raises(ValueError, match='op table'):
        with _interception.model_run(Bad()):
            pass


def test_float_fallback_unrotates_a_rotated_param():
    """jnp.matmul with broadcasting (no dot_general form) runs the float op; a rotated weight must be unrotated."""
    w = jax.random.normal(jax.random.key(0), (2, 16, 8))
    q = fi.QuantizedParam(qarray.quantize(qarray.rotation.rotate(w, 1, block=16), 'int8', channelwise_axes=(0, 2)),
                          rotation=(1, 16))
    x = jax.random.normal(jax.random.key(1), (3, 1, 4, 16))  # batch (3, 1) broadcasts against (2,)

    def handler(call, frame):
        raise AssertionError('a broadcasting matmul has no canonical form; it must not reach the provider')

    with _interception.model_run(_Handler(handler)):
        y = jnp.matmul(x, q)
    wf = fi.wrappers.as_float(q)
    ref = jnp.matmul(x, wf)
    # Two float32 evaluations of as_float (dequantize, then a 16-term unrotation: |R| = 1/4 on the block) and
    # of the 16-term matmul on it.
    dw = 2 * gamma(18) * np.abs(np.asarray(qarray.dequantize(q.array), np.float64)).sum(1, keepdims=True) / 4
    assert_within(y, ref, abs_dot(x, np.broadcast_to(dw, wf.shape)) + dot_bound(x, np.abs(np.asarray(wf)) + dw))
    # and as_float really undoes the rotation: within int8's half step of the float weight
    err = np.abs(np.asarray(fi.wrappers.as_float(q)) - np.asarray(w)).max()
    assert err < 2 * float(np.abs(np.asarray(w)).max()) / 127.5  # quantization error (statistical), not rounding


class _NameRecorder(fi.PtqProvider):
    """PTQ that records, per op, the weight operand's param name and whether it was quantized."""

    def __init__(self, rules):
        super().__init__(rules)
        self.seen = []

    def process_op(self, op):
        self.seen.append((op.path, op.weight.name if op.weight else None, bool(op.weight and op.weight.quantized)))
        return super().process_op(op)


def test_stored_quantized_params_are_named_at_apply_linen():

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):  # a boxed (nn.Partitioned) kernel and a plain one; bf16 promotion casts both
            x = nn.Dense(8, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, 'model')),
                         dtype=jnp.bfloat16)(x)
            return nn.Dense(4, use_bias=False)(x)

    rules = [fi.QuantizationRule(weight_qtype='int4')]
    x = jnp.ones((2, 16))
    p = _NameRecorder(rules)
    m = fi.quantize_model(Net(), p)
    v = m.init(jax.random.key(0), x)
    p.seen.clear()
    m.apply(v, x)
    assert p.seen == [('Dense_0', 'kernel', True), ('Dense_1', 'kernel', True)]


def test_stored_quantized_params_are_named_at_apply_nnx():
    rules = [fi.QuantizationRule(weight_qtype='int8')]
    p = _NameRecorder(rules)
    m = fi.quantize_model(nnx.Linear(16, 4, rngs=nnx.Rngs(0)), p, jnp.ones((2, 16)))
    assert p.seen == [('', 'kernel', False)]  # quantize time: the float kernel becomes the stored param
    p.seen.clear()
    m(jnp.ones((2, 16)))
    nnx.jit(lambda mod, x: mod(x))(m, jnp.ones((2, 16)))
    assert p.seen == [('', 'kernel', True)] * 2


class _HookRecorder(fi.Provider):
    """Float provider that records the model-run hooks and doubles the (first) model input."""

    def __init__(self):
        super().__init__([])
        self.events = []

    def model_run(self):
        @contextlib.contextmanager
        def run():
            self.events.append('enter')
            try:
                yield
            finally:
                self.events.append('exit')
        return run()

    def process_model_inputs(self, args, kwargs):
        frame = _interception.root_frame()
        self.events.append(('inputs', frame.path, _interception.running_provider() is self))
        return (args[0] * 2.0,) + tuple(args[1:]), kwargs

    def process_op(self, op):
        self.events.append(('op', op.path, _interception.root_frame().path))
        return op.call.run_original()

    def process_model_output(self, output):
        self.events.append('output')
        return output


def test_model_entry_hooks_linen_and_nnx():

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, use_bias=False)(x)

    x = jnp.ones((1, 3))
    p = _HookRecorder()
    m = fi.quantize_model(Net(), p)
    v = m.init(jax.random.key(0), x)
    p.events.clear()
    y = m.apply(v, x)
    # inputs replaced: x 2 is exact in binary floating point and commutes with every rounding of a bias-free
    # Dense, so this is equality (rtol only names the comparison)
    np.testing.assert_allclose(np.asarray(y), 2.0 * np.asarray(Net().apply(v, x)), rtol=1e-6)
    assert p.events == ['enter', ('inputs', '', True), ('op', 'Dense_0', ''), 'output', 'exit']
    assert _interception.root_frame() is None and _interception.running_provider() is None

    p = _HookRecorder()
    lin = nnx.Linear(3, 2, use_bias=False, rngs=nnx.Rngs(0))
    q = fi.quantize_model(lin, p, x)
    p.events.clear()
    np.testing.assert_allclose(np.asarray(q(x)), 2.0 * np.asarray(lin(x)), rtol=1e-6)  # exact, as above
    assert p.events == ['enter', ('inputs', '', True), ('op', '', ''), 'output', 'exit']
