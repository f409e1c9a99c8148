"""Model-free quantize_params(params, rules); scoped, thread-local interception."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_integration as fi
import qarray
from flax_integration import interception
from flax_integration.ops_bridge import ORIGINAL


def test_model_free_quantizes_matching_leaves():
    params = {'Dense_0': {'kernel': jax.random.normal(jax.random.key(0), (16, 8)), 'bias': jnp.ones(8)},
              'blocks': [{'w': jnp.ones((8, 4))}]}
    rules = [fi.QuantizationRule(module_path='Dense_0/kernel', weight_qtype='int4', tile_size=8),
             fi.QuantizationRule(module_path='blocks/0/w', weight_qtype='int8')]
    q = fi.quantize_params(params, rules)
    k = q['Dense_0']['kernel']
    assert isinstance(k, qarray.QArray) and k.tiles == {0: 8} and k.channelwise_axes == (1,)
    W = params['Dense_0']['kernel']
    for t in range(2):  # each 8-row tile has its own per-column scale, as quantizing that tile alone gives
        alone = qarray.quantize(W[8 * t:8 * (t + 1)], 'int4', channelwise_axes=(1,)).scale
        np.testing.assert_allclose(np.asarray(k.scale[t]), np.asarray(alone[0]), rtol=1e-6)
    assert isinstance(q['blocks'][0]['w'], qarray.QArray)
    assert q['Dense_0']['bias'] is params['Dense_0']['bias']


def test_model_free_errors_name_the_path():
    with pytest.raises(ValueError, match='Dense_0/bias'):
        fi.quantize_params({'Dense_0': {'bias': jnp.ones(8)}}, [fi.QuantizationRule(weight_qtype='int8')])
    with pytest.raises(ValueError, match='Dense_0/kernel'):
        fi.quantize_params({'Dense_0': {'kernel': jnp.ones((6, 8))}},
                           [fi.QuantizationRule(weight_qtype='int4', tile_size=4)])
    with pytest.raises(ValueError, match='quant_stats'):
        fi.quantize_params({'k': jnp.ones((4, 4))}, [fi.QuantizationRule(weight_qtype='int8')], {})


def test_scope_restores_originals_and_routes_calls():
    seen = []

    def handler(call, frame):
        seen.append(call.name)
        return call.run_original()

    with interception.scope(handler):
        assert jax.lax.dot_general is not ORIGINAL['dot_general']
        jnp.dot(jnp.ones((2, 3)), jnp.ones((3, 2)))
        jnp.matmul(jnp.ones((4, 2, 3)), jnp.ones((4, 3, 2)))
        jax.lax.conv_general_dilated(jnp.ones((1, 1, 4, 4)), jnp.ones((1, 1, 3, 3)), (1, 1), 'SAME')
    assert seen == ['dot_general', 'dot_general', 'conv_general_dilated']
    for name, (mod, attr, _) in interception.PATCHED.items():
        assert getattr(mod, attr) is ORIGINAL[name]


def test_other_threads_are_not_intercepted():
    entered, release = threading.Event(), threading.Event()
    calls = []

    def handler(call, frame):
        calls.append(threading.current_thread().name)
        return call.run_original()

    def inside():
        with interception.scope(handler):
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


def test_provider_is_not_reentered():
    depth = []

    def handler(call, frame):
        depth.append(call.name)
        return jnp.einsum('ij,jk->ik', *[interception._dequantized(o) for o in call.operands])

    with interception.scope(handler):
        jnp.einsum('ij,jk->ik', jnp.ones((2, 2)), jnp.ones((2, 2)))
    assert depth == ['einsum']


class _NameRecorder(fi.PtqProvider):
    """PTQ that records, per op, the weight operand's param name and whether it was quantized."""

    def __init__(self, rules):
        super().__init__(rules)
        self.seen = []

    def process_op(self, op):
        self.seen.append((op.path, op.weight.name if op.weight else None, bool(op.weight and op.weight.quantized)))
        return super().process_op(op)


def test_stored_quantized_params_are_named_at_apply_linen():
    from flax import linen as nn

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
    from flax import nnx
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
        import contextlib

        @contextlib.contextmanager
        def run():
            self.events.append('enter')
            try:
                yield
            finally:
                self.events.append('exit')
        return run()

    def process_model_inputs(self, args, kwargs):
        frame = interception.root_frame()
        self.events.append(('inputs', frame.path, interception.running_provider() is self))
        return (args[0] * 2.0,) + tuple(args[1:]), kwargs

    def process_op(self, op):
        self.events.append(('op', op.path, interception.root_frame().path))
        return op.call.run_original()

    def process_model_output(self, output):
        self.events.append('output')
        return output


def test_model_entry_hooks_linen_and_nnx():
    from flax import linen as nn
    from flax import nnx

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
    np.testing.assert_allclose(np.asarray(y), 2.0 * np.asarray(Net().apply(v, x)), rtol=1e-6)  # inputs replaced
    assert p.events == ['enter', ('inputs', '', True), ('op', 'Dense_0', ''), 'output', 'exit']
    assert interception.root_frame() is None and interception.running_provider() is None

    p = _HookRecorder()
    lin = nnx.Linear(3, 2, use_bias=False, rngs=nnx.Rngs(0))
    q = fi.quantize_model(lin, p, x)
    p.events.clear()
    np.testing.assert_allclose(np.asarray(q(x)), 2.0 * np.asarray(lin(x)), rtol=1e-6)
    assert p.events == ['enter', ('inputs', '', True), ('op', '', ''), 'output', 'exit']
