"""conv_general_dilated: integer, fp8 and weight-only paths vs a float64 convolution."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import budget
from qarray import ops
from ops_testlib import assert_conv_close, rand, random_qarray

LAYOUTS = [('NHWC', 'HWIO', 'NHWC'), ('NCHW', 'OIHW', 'NCHW'), ('NHWC', 'OIHW', 'NCHW')]


@st.composite
def convs(draw):
    lhs_spec, rhs_spec, out_spec = draw(st.sampled_from(LAYOUTS))
    groups = draw(st.sampled_from([1, 2]))
    bgroups = 1 if groups > 1 else draw(st.sampled_from([1, 2]))
    n = 2 * bgroups
    cin = 4
    cout = 4
    h = draw(st.sampled_from([5, 6]))
    kh = draw(st.sampled_from([1, 3]))
    dims = dict(N=n, C=cin, H=h, W=h)
    lshape = tuple(dims[c] for c in lhs_spec)
    rdims = dict(O=cout, I=cin // groups, H=kh, W=2)
    rshape = tuple(rdims[c] for c in rhs_spec)
    kw = dict(window_strides=draw(st.sampled_from([(1, 1), (2, 1)])),
              padding=draw(st.sampled_from(['SAME', 'VALID', ((1, 0), (2, 1))])),
              lhs_dilation=draw(st.sampled_from([None, (1, 2)])),
              rhs_dilation=draw(st.sampled_from([None, (2, 1)])),
              dimension_numbers=(lhs_spec, rhs_spec, out_spec),
              feature_group_count=groups, batch_group_count=bgroups)
    if kw['lhs_dilation'] and isinstance(kw['padding'], str):  # lax: string padding is not for lhs dilation
        kw['padding'] = ((1, 1), (0, 1))
    lfmt = draw(st.sampled_from(['int8', 'int4', 'uint8', 'fp8', None]))
    rfmt = draw(st.sampled_from(['int8', 'int4', 'fp8', 'nf4']))
    lcw = (lhs_spec.index('N'),) if draw(st.booleans()) else ()
    rcw = (rhs_spec.index('O'),) if draw(st.booleans()) else ()
    if draw(st.booleans()):  # a layout the integer conv cannot factor -> float path
        lcw = lcw + (lhs_spec.index('C'),)
    lzp = lfmt in ('int8', 'int4') and draw(st.booleans())
    rzp = rfmt in ('int8', 'int4') and draw(st.booleans())
    return lshape, rshape, kw, (lfmt, lcw, lzp), (rfmt, rcw, rzp), draw(st.integers(0, 999))


@settings(max_examples=budget.examples(10))
@given(convs())
def test_hypothesis_conv(case):
    lshape, rshape, kw, (lfmt, lcw, lzp), (rfmt, rcw, rzp), seed = case
    if lfmt is None:
        lhs = jnp.asarray(np.random.default_rng(seed).normal(size=lshape).astype(np.float32))
    else:
        lhs, _ = random_qarray(seed, lshape, lfmt, channelwise_axes=lcw, zero_point=lzp)
    rhs, _ = random_qarray(seed + 1, rshape, rfmt, channelwise_axes=rcw, zero_point=rzp)
    out = ops.conv_general_dilated(lhs, rhs, **kw)
    assert_conv_close(out, lhs, rhs, **kw)  # bound: op_rtol(terms per output), whichever path ran


@pytest.mark.parametrize('lzp,rzp', [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize('groups', [1, 2])
def test_int_conv_zero_points_at_borders(lzp, rzp, groups):
    lhs, _ = random_qarray(1, (2, 7, 7, 4), 'int8', channelwise_axes=(0,), zero_point=lzp)
    rhs, _ = random_qarray(2, (3, 3, 4 // groups, 6), 'int4', channelwise_axes=(3,), zero_point=rzp)
    kw = dict(window_strides=(2, 1), padding='SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
              feature_group_count=groups)
    assert ops.conv.conv_path(lhs, rhs, jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                                                       kw['dimension_numbers'])) == 'int'
    assert_conv_close(ops.conv_general_dilated(lhs, rhs, **kw), lhs, rhs, **kw)


def test_weight_only_conv_bf16():
    x = rand(0, (2, 6, 6, 4), jnp.bfloat16)
    rhs, _ = random_qarray(3, (3, 3, 4, 8), 'int4', channelwise_axes=(3,), dtype=jnp.bfloat16)
    out = ops.conv_general_dilated(x, rhs, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 6, 6, 8)
