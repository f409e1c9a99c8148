"""The path taken, checked in the jaxpr, not only the numbers."""

import jax
import jax.numpy as jnp
import numpy as np

from qarray import ops
from ops_testlib import primitive_names, quant, rand

MK = (((1,), (0,)), ((), ()))


def _dots(jaxpr):
    return [e for n, e in primitive_names(jaxpr) if n == 'dot_general']


def test_int8_x_int8_is_an_int32_accumulating_integer_dot():
    qx = quant(rand(0, (8, 128)), 'int8', channelwise_axes=(0,))
    qw = quant(rand(1, (128, 16)), 'int8', channelwise_axes=(1,))
    jaxpr = jax.make_jaxpr(lambda a, b: ops.dot_general(a, b, MK))(qx, qw).jaxpr
    dots = _dots(jaxpr)
    assert len(dots) == 1
    (dot,) = dots
    assert [v.aval.dtype for v in dot.invars] == [jnp.int8, jnp.int8]
    assert dot.params['preferred_element_type'] == jnp.int32
    assert dot.outvars[0].aval.dtype == jnp.int32


def test_int4_weights_are_unpacked_to_int8_for_the_integer_dot():
    qx = quant(rand(2, (8, 128)), 'int8', channelwise_axes=(0,))
    qw = quant(rand(3, (128, 16)), 'int4', channelwise_axes=(1,))
    (dot,) = _dots(jax.make_jaxpr(lambda a, b: ops.matmul(a, b))(qx, qw).jaxpr)
    assert [v.aval.dtype for v in dot.invars] == [jnp.int8, jnp.int8]


def test_tiled_prefill_never_materialises_tiles_x_m_x_n():
    m, k, n, t = 256, 512, 256, 128
    qx = quant(rand(4, (m, k)), 'int8', channelwise_axes=(0,))
    qw = quant(rand(5, (k, n)), 'int4', tiles={0: t}, channelwise_axes=(1,))
    jaxpr = jax.make_jaxpr(lambda a, b: ops.dot_general(a, b, MK))(qx, qw).jaxpr
    eqns = primitive_names(jaxpr)
    assert any(name in ('while', 'scan') for name, _ in eqns)  # the loop over tiles
    for _, e in eqns:
        for v in e.outvars:
            shape = getattr(v.aval, 'shape', ())
            assert np.prod(shape) < (k // t) * m * n, f"{e.primitive} makes {shape}"
    dots = _dots(jaxpr)
    assert dots and all(d.params['preferred_element_type'] == jnp.int32 for d in dots)


def test_weight_only_keeps_the_dequantized_weight_inside_one_program():
    x = rand(6, (4, 256))
    qw = quant(rand(7, (256, 64)), 'int4', tiles={0: 128}, channelwise_axes=(1,))
    closed = jax.make_jaxpr(lambda a, b: ops.dot_general(a, b, MK))(x, qw)
    top = closed.jaxpr
    # An eager call is one jitted program whose only output is the result.
    assert [e.primitive.name for e in top.eqns] == ['jit']
    assert len(top.outvars) == 1 and top.outvars[0].aval.shape == (4, 64)
    inner = top.eqns[0].params['jaxpr'].jaxpr
    assert len(inner.outvars) == 1
    (dot,) = _dots(inner)
    assert all(jnp.issubdtype(v.aval.dtype, jnp.floating) for v in dot.invars)


def test_weight_only_decode_scales_the_output_not_the_weight():
    x = rand(8, (1, 256))
    qw = quant(rand(9, (256, 64)), 'int8', channelwise_axes=(1,))
    inner = jax.make_jaxpr(lambda a, b: ops.dot_general(a, b, MK))(x, qw).jaxpr.eqns[0].params['jaxpr'].jaxpr
    muls = [e for n, e in primitive_names(inner) if n == 'mul']
    assert muls and all(np.prod(e.outvars[0].aval.shape) <= 64 for e in muls)


def test_fp8_per_tensor_scales_sit_inside_the_dot():
    qx = quant(rand(10, (8, 128)), 'fp8')
    qw = quant(rand(11, (128, 16)), 'fp8')
    jaxpr = jax.make_jaxpr(lambda a, b: ops.dot_general(a, b, MK))(qx, qw).jaxpr
    eqns = primitive_names(jaxpr)
    (dot,) = _dots(jaxpr)
    producers = {v: e for _, e in eqns for v in e.outvars}
    for v in dot.invars:  # each operand is convert(fp8) * scalar scale
        e = producers[v]
        assert e.primitive.name == 'mul'
        conv = producers[e.invars[0]]
        assert conv.primitive.name == 'convert_element_type'
        assert 'float8' in str(conv.invars[0].aval.dtype)
    # nothing multiplies the dot's output by a per-channel scale
    assert not [e for n, e in eqns if n == 'mul' and dot.outvars[0] in e.invars]


def test_fp8_per_channel_scales_apply_after_the_dot():
    qx = quant(rand(12, (8, 128)), 'fp8', channelwise_axes=(0,))
    qw = quant(rand(13, (128, 16)), 'fp8', channelwise_axes=(1,))
    jaxpr = jax.make_jaxpr(lambda a, b: ops.dot_general(a, b, MK))(qx, qw).jaxpr
    eqns = primitive_names(jaxpr)
    (dot,) = _dots(jaxpr)
    producers = {v: e for _, e in eqns for v in e.outvars}
    assert all(producers[v].primitive.name == 'convert_element_type' for v in dot.invars)
    assert [e for n, e in eqns if n == 'mul']


def test_int8_conv_is_an_int32_accumulating_integer_conv():
    qx = quant(rand(14, (2, 8, 8, 4)), 'int8', channelwise_axes=(0,))
    qw = quant(rand(15, (3, 3, 4, 8)), 'int8', channelwise_axes=(3,))
    jaxpr = jax.make_jaxpr(lambda a, b: ops.conv_general_dilated(
        a, b, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(qx, qw).jaxpr
    convs = [e for n, e in primitive_names(jaxpr) if n == 'conv_general_dilated']
    assert len(convs) == 1
    assert [v.aval.dtype for v in convs[0].invars] == [jnp.int8, jnp.int8]
    assert convs[0].outvars[0].aval.dtype == jnp.int32
