"""Bad input gives clear errors; gradients; the GPU kernel hook."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qarray
from qarray import ops
from qarray.ops import _registry
from ops_testlib import quant, rand

MK = (((1,), (0,)), ((), ()))


# ---------------------------------------------------------------------------------------- errors
def test_mismatched_contracting_sizes_names_both_layouts():
    qx = quant(rand(0, (4, 128)), 'int8')
    qw = quant(rand(1, (64, 8)), 'int4', channelwise_axes=(1,))
    with pytest.raises(ValueError, match=r"contracting sizes differ.*lhs: QArray\(int8.*rhs: QArray\(int4"):
        ops.dot_general(qx, qw, MK)


def test_mismatched_batch_sizes():
    with pytest.raises(ValueError, match=r"batch sizes differ.*lhs: array.*rhs: QArray"):
        ops.dot_general(rand(0, (2, 4, 8)), quant(rand(1, (3, 8, 2)), 'int8'), (((2,), (1,)), ((0,), (0,))))


def test_tiles_that_do_not_line_up():
    qx = quant(rand(0, (4, 192)), 'int8', tiles={1: 64})
    qw = quant(rand(1, (192, 8)), 'int8', tiles={0: 96})
    with pytest.raises(ValueError, match=r"tiles on the contracting axes do not line up.*tiles=\{1: 64\}.*"
                                         r"tiles=\{0: 96\}"):
        ops.dot_general(qx, qw, MK)


@pytest.mark.parametrize('dn,match', [
    ((((2,), (0,)), ((), ())), 'out of range'),
    ((((1, 1), (0, 0)), ((), ())), 'repeats an axis'),
    ((((1,), (0, 1)), ((), ())), 'pair up one to one'),
    ((((1,), (0,)), ((1,), (0,))), 'both contracting and batch'),
])
def test_bad_dimension_numbers(dn, match):
    with pytest.raises(ValueError, match=match):
        ops.dot_general(rand(0, (4, 8)), quant(rand(1, (8, 8)), 'int8'), dn)


def test_malformed_dimension_numbers():
    with pytest.raises(TypeError, match='dimension_numbers must be'):
        ops.dot_general(rand(0, (4, 8)), quant(rand(1, (8, 8)), 'int8'), (1, 0))
    with pytest.raises(TypeError, match='sequence of ints'):
        ops.dot_general(rand(0, (4, 8)), quant(rand(1, (8, 8)), 'int8'), ((1, 0), ((), ())))


def test_integer_preferred_element_type_is_refused():
    with pytest.raises(TypeError, match=r"preferred_element_type must be a floating dtype.*int32"):
        ops.dot_general(quant(rand(0, (4, 8)), 'int8'), quant(rand(1, (8, 2)), 'int8'), MK,
                        preferred_element_type=jnp.int32)


def test_bad_operand_types():
    with pytest.raises(TypeError, match='lhs must be an array or a QArray'):
        ops.dot_general(object(), quant(rand(1, (8, 2)), 'int8'), MK)
    with pytest.raises(TypeError, match='complex dtype'):
        ops.dot_general(jnp.ones((4, 8), jnp.complex64), quant(rand(1, (8, 2)), 'int8'), MK)


def test_einsum_errors():
    q = quant(rand(0, (8, 2)), 'int8')
    with pytest.raises(ValueError, match='name 1 operands but 2'):
        ops.einsum('ij->i', rand(1, (4, 8)), q)
    with pytest.raises(ValueError, match="letter 'j' has size 6"):
        ops.einsum('ij,jk->ik', rand(1, (4, 6)), q)
    with pytest.raises(ValueError, match='not a letter'):
        ops.einsum('i1,jk->ik', rand(1, (4, 8)), q)
    with pytest.raises(ValueError, match='has 3 letters but its operand has 2'):
        ops.einsum('ijl,jk->ik', rand(1, (4, 8)), q)
    with pytest.raises(ValueError, match='appear in no operand'):
        ops.einsum('ij,jk->iz', rand(1, (4, 8)), q)
    with pytest.raises(ValueError, match="'out' argument"):
        ops.einsum('ij,jk->ik', rand(1, (4, 8)), q, out=jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match='at least one operand'):
        ops.einsum('ij')
    with pytest.raises(TypeError, match='subscripts must be a str'):
        ops.einsum(3, q)


def test_matmul_and_dot_errors():
    q = quant(rand(0, (8, 2)), 'int8')
    with pytest.raises(ValueError, match=r"matmul: contracting sizes differ.*a: array.*b: QArray"):
        ops.matmul(rand(1, (4, 6)), q)
    with pytest.raises(ValueError, match='at least 1-D'):
        ops.matmul(jnp.float32(2.0), q)
    with pytest.raises(ValueError, match=r"dot: contracting sizes differ"):
        ops.dot(rand(1, (4, 6)), q)


def test_conv_errors_name_both_layouts():
    x = quant(rand(0, (1, 6, 6, 4)), 'int8')
    w = quant(rand(1, (3, 3, 5, 8)), 'int8', channelwise_axes=(3,))
    with pytest.raises(ValueError, match=r"do not fit.*lhs: QArray\(int8, shape=\(1, 6, 6, 4\).*rhs: QArray"):
        ops.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def test_register_kernel_needs_a_callable():
    with pytest.raises(TypeError, match='fn must be callable'):
        ops.register_kernel(42)


# ---------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize('fmt,kw', [('int8', dict(channelwise_axes=(1,))),
                                    ('int4', dict(tiles={0: 64}, channelwise_axes=(1,))),
                                    ('nf4', dict(tiles={0: 64}, channelwise_axes=(1,)))])
def test_grad_wrt_float_operand_matches_float_op(fmt, kw):
    x = rand(0, (4, 128))
    q = quant(rand(1, (128, 16)), fmt, **kw)
    w = qarray.dequantize(q)
    c = rand(2, (4, 16))
    g = jax.grad(lambda v: jnp.sum(jnp.sin(ops.dot_general(v, q, MK)) * c))(x)
    g_ref = jax.grad(lambda v: jnp.sum(jnp.sin(v @ w) * c))(x)
    # Both sides carry float32 rounding of y (|y| ~ 30) amplified by cos: ~3e-5 each vs float64.
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_grad_through_weight_only_conv():
    x = rand(0, (1, 6, 6, 4))
    q = quant(rand(1, (3, 3, 4, 8)), 'int8', channelwise_axes=(3,))
    kw = dict(window_strides=(1, 1), padding='SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    g = jax.grad(lambda v: jnp.sum(ops.conv_general_dilated(v, q, **kw) ** 2))(x)
    g_ref = jax.grad(lambda v: jnp.sum(jax.lax.conv_general_dilated(v, qarray.dequantize(q), **kw) ** 2))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_qat_straight_through_gradients_vs_float_op():
    """fake_quant + the float op: STE gradients. Linear loss: identical; quadratic: within 2% (int8)."""
    x, w, c = rand(0, (8, 128)), rand(1, (128, 16)) * 0.1, rand(2, (8, 16))

    def loss(wv, quantized, quad):
        wq = qarray.fake_quant(wv, 'int8', channelwise_axes=(1,)) if quantized else wv
        y = ops.matmul(x, wq)
        return jnp.sum((y - c) ** 2) if quad else jnp.sum(y * c)

    for quad, tol in ((False, 1e-6), (True, 2e-2)):
        g = jax.grad(loss)(w, True, quad)
        g_ref = jax.grad(loss)(w, False, quad)
        rel = float(jnp.linalg.norm(g - g_ref) / jnp.linalg.norm(g_ref))
        assert rel <= tol, (quad, rel)


# ---------------------------------------------------------------------------------------- registry
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
    np.testing.assert_allclose(ops.matmul(x, q), x @ qarray.dequantize(q), rtol=1e-5, atol=1e-5)


def test_registry_not_consulted_off_gpu(monkeypatch):
    monkeypatch.setattr(_registry, '_KERNELS', {'boom': lambda *a, **k: 1 / 0})
    q = quant(rand(1, (64, 8)), 'int8', channelwise_axes=(1,))
    if jax.default_backend() != 'gpu':
        assert ops.matmul(rand(0, (3, 64)), q).shape == (3, 8)
