"""The GPU kernel registry: consulted on GPU only, falls back when a kernel declines."""

import jax
import jax.numpy as jnp
import pytest

import qarray
from qarray import ops
from qarray.ops import _registry
from ops_testlib import quant, rand
from tolerances import assert_dot_close

MK = (((1,), (0,)), ((), ()))


def test_register_kernel_needs_a_callable():
    with pytest.raises(TypeError, match='fn must be callable'):
        ops.register_kernel(42)


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    monkeypatch.setattr(_registry, '_AUTO_TRIED', [True])
    monkeypatch.setattr(_registry, '_KERNELS', {})
    yield
    jax.clear_caches()


def test_kernel_hook_is_used_on_gpu(fake_gpu):
    seen = []

    def weight_only(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        seen.append((lhs.shape, rhs.shape, dimension_numbers))
        return jnp.full(lhs.shape[:-1] + rhs.shape[1:], 7.0, jnp.float16)

    ops.register_kernel(weight_only)
    q = quant(rand(1, (64, 8)), 'int4', channelwise_axes=(1,))
    out = ops.matmul(rand(0, (3, 64)), q)
    assert seen and seen[0][2] == MK
    assert out.dtype == jnp.float32 and float(out[0, 0]) == 7.0
    ops.unregister_kernel('weight_only')
    out = ops.matmul(rand(0, (3, 64)), q)   # unregistering retraces: the XLA path again
    assert float(out[0, 0]) != 7.0


def test_kernel_returning_none_falls_back(fake_gpu):
    ops.register_kernel(lambda *a, **k: None, name='declines')
    q = quant(rand(1, (64, 8)), 'int8', channelwise_axes=(1,))
    x = rand(0, (3, 64))
    # Two float32 evaluations of a K=64 dot (+1: the op may scale after the sum).
    assert_dot_close(ops.matmul(x, q), x @ qarray.dequantize(q), x, qarray.dequantize(q), extra=1)


def test_registry_not_consulted_off_gpu(monkeypatch):
    monkeypatch.setattr(_registry, '_KERNELS', {'boom': lambda *a, **k: 1 / 0})
    q = quant(rand(1, (64, 8)), 'int8', channelwise_axes=(1,))
    if jax.default_backend() != 'gpu':
        assert ops.matmul(rand(0, (3, 64)), q).shape == (3, 8)
