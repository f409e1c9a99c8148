"""qarray.take / getitem: gather rows of a QArray (embedding lookups), dequantizing only those rows.

Exactness: a gathered row is dequantized by the same elementwise formula from the same codes, scales and
zero points as the whole table, so ``take(q, i)`` equals ``jnp.take(dequantize(q), i)`` bit for bit
(``assert_array_equal``), for every format and layout, including bit-packed tables gathered along the
packed axis and quantized (double-quantized) scales.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import budget
import qarray
from ops_testlib import rand
from qarray.ops.take import gather, getitem

V, D = 40, 64


def _table(fmt, **kw):
    return qarray.quantize(rand(0, (V, D)), fmt, **kw)


LAYOUTS = {
    'int8 per row': dict(fmt='int8', channelwise_axes=(0,)),
    'int4 tiles 32 along features': dict(fmt='int4', channelwise_axes=(0,), tiles={1: 32}),
    'int4 packed along rows': dict(fmt='int4', channelwise_axes=(1,), pack_axis=0),
    'int3 packed along rows, row tiles': dict(fmt='int3', tiles={0: 8}, channelwise_axes=(1,), pack_axis=0),
    'uint4 zero points, tiles': dict(fmt='uint4', channelwise_axes=(0,), tiles={1: 16}),
    'nf4 tiles': dict(fmt='nf4', channelwise_axes=(0,), tiles={1: 32}),
    'fp8 per row': dict(fmt='float8_e4m3fn', channelwise_axes=(0,)),
    'int4 double-quantized scales': dict(fmt='int4', channelwise_axes=(0,), tiles={1: 16}, scale_qtype='int8'),
    'nvfp4': dict(fmt='nvfp4', channelwise_axes=(0,), tiles={1: 16}),
    'shared scale': dict(fmt='int8'),
    'uneven row tiles': dict(fmt='int8', tiles={0: 16}, channelwise_axes=(1,)),
}


@pytest.fixture(scope='module')
def tables():
    return {name: _table(**kw) for name, kw in LAYOUTS.items()}


IDX = jnp.array([[3, 0, 39], [17, 17, 8]])


@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_lookup_equals_rows_of_the_dequantized_table_exactly(tables, layout):
    q = tables[layout]
    full = qarray.dequantize(q)
    np.testing.assert_array_equal(qarray.take(q, IDX), jnp.take(full, IDX, axis=0))
    np.testing.assert_array_equal(jax.jit(qarray.take)(q, IDX), jnp.take(full, IDX, axis=0))
    g = gather(q, jnp.array([5, 1, 5]), 0)   # still quantized: rows' codes and scales
    np.testing.assert_array_equal(qarray.dequantize(g), full[jnp.array([5, 1, 5])])


def test_gather_along_other_axes(tables):
    for name in ('int4 tiles 32 along features', 'int4 packed along rows'):
        q = tables[name]
        full = qarray.dequantize(q)
        idx = jnp.array([63, 0, 31, 32])
        np.testing.assert_array_equal(qarray.take(q, idx, axis=1), jnp.take(full, idx, axis=1))
        np.testing.assert_array_equal(qarray.take(q, idx, axis=-1), jnp.take(full, idx, axis=1))
    q = tables['int8 per row']
    np.testing.assert_array_equal(qarray.take(q, jnp.array([0, 65, V * D - 1]), axis=None),
                                  jnp.take(qarray.dequantize(q).reshape(-1), jnp.array([0, 65, V * D - 1])))


def test_index_modes_follow_jnp_take(tables):
    q = tables['int4 tiles 32 along features']
    full = qarray.dequantize(q)
    idx = jnp.array([-1, -V, V, V + 3, 2])
    for mode in ('clip', 'wrap'):
        np.testing.assert_array_equal(qarray.take(q, idx, mode=mode), jnp.take(full, idx, axis=0, mode=mode))
    for kw in ({}, {'mode': 'fill'}, {'mode': 'fill', 'fill_value': -7.0}):
        np.testing.assert_array_equal(qarray.take(q, idx, **kw), jnp.take(full, idx, axis=0, **kw))
    assert bool(jnp.isnan(qarray.take(q, idx)[2]).all())   # out of range: NaN by default, as jnp.take


@settings(max_examples=budget.examples(10))
@given(rows=st.lists(st.integers(-V, V - 1), min_size=8, max_size=8))
def test_any_indices(tables, rows):
    """Any in-range indices, repeated or negative (a fixed count: one compile per table)."""
    for name in ('int4 packed along rows', 'uint4 zero points, tiles'):
        q = tables[name]
        idx = jnp.array(rows, jnp.int32)
        np.testing.assert_array_equal(qarray.take(q, idx), jnp.take(qarray.dequantize(q), idx, axis=0))


def _float_buffers(jaxpr, min_size):
    """Float arrays of at least ``min_size`` elements that any equation (recursively) produces."""
    out = []
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            aval = v.aval
            if jnp.issubdtype(aval.dtype, jnp.floating) and np.prod(aval.shape) >= min_size:
                out.append((eqn.primitive.name, aval.shape))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else [p]):
                inner = getattr(sub, 'jaxpr', sub)
                if hasattr(inner, 'eqns'):
                    out += _float_buffers(inner, min_size)
    return out


def test_lookup_never_materialises_the_table_in_float():
    """32k x 512 int4 (tiles of 64) and int8 per row: the program has no float array the size of the
    table (nor of a quarter of it), and XLA's compiled memory is the stored bytes plus the gathered rows."""
    v, d = 32768, 512
    t = jax.ShapeDtypeStruct((v, d), jnp.float32)
    idx = jax.ShapeDtypeStruct((4, 16), jnp.int32)
    for fmt, kw in (('int8', dict(channelwise_axes=(0,))), ('int4', dict(channelwise_axes=(0,), tiles={1: 64}))):
        q = jax.eval_shape(lambda x: qarray.quantize(x, fmt, **kw), t)
        jaxpr = jax.make_jaxpr(qarray.take)(q, idx).jaxpr
        assert _float_buffers(jaxpr, v * d // 4) == []
        mem = jax.jit(qarray.take).lower(q, idx).compile().memory_analysis()
        if mem is not None:   # backends without the analysis return None
            rows_bytes = 4 * 16 * d * 4
            assert mem.output_size_in_bytes == rows_bytes
            assert mem.temp_size_in_bytes < v * d * 4 // 64   # far below the float table (64 MiB)


def test_getitem_keys(tables):
    q = tables['int4 tiles 32 along features']
    full = qarray.dequantize(q)
    for key in (3, -1, slice(2, 30, 7), jnp.array([4, -2, 4]), jnp.arange(V) % 3 == 0, (5, slice(None, 10)),
                (jnp.array([[1, 2]]), 7), (slice(None, 4), Ellipsis)):
        np.testing.assert_array_equal(getitem(q, key), full[key])
    np.testing.assert_array_equal(getitem(q, [1, 2]), full[jnp.array([1, 2])])
    assert getitem(q, ...) is q and getitem(q, ()) is q
    assert jax.jit(lambda q, i: getitem(q, i))(q, jnp.int32(7)).shape == (D,)


def test_getitem_bad_keys_raise(tables):
    q = tables['int8 per row']
    with pytest.raises(IndexError, match='out of bounds'):
        getitem(q, V)
    with pytest.raises(IndexError, match='too many indices'):
        getitem(q, (1, 2, 3))
    with pytest.raises(TypeError, match='for axis 0 first'):
        getitem(q, (Ellipsis, 1))
    with pytest.raises(TypeError, match='only ints, slices'):
        getitem(q, (1, jnp.array([0, 1])))
    with pytest.raises(IndexError, match='rank-0'):
        getitem(qarray.quantize(jnp.float32(1.0), 'int8'), 0)


@pytest.mark.skipif(not hasattr(qarray.QArray, '__getitem__'),
                    reason="QArray.__getitem__ -> qarray.ops.take.getitem is not wired in qarray/_array.py yet")
def test_subscript_and_iteration_use_getitem(tables):
    q = tables['int8 per row']
    full = qarray.dequantize(q)
    np.testing.assert_array_equal(q[jnp.array([2, 0])], full[jnp.array([2, 0])])
    assert q[...] is q
    assert len(list(q)) == V   # iteration stops at the end (a static int past it raises IndexError)


def test_bad_arguments_raise(tables):
    q = tables['int8 per row']
    with pytest.raises(ValueError, match='mode must be one of'):
        qarray.take(q, jnp.array([0]), mode='promise_in_bounds_or_else')
    with pytest.raises(TypeError, match='indices must be integers'):
        qarray.take(q, jnp.array([0.0]))
    with pytest.raises(ValueError, match='axis'):
        qarray.take(q, jnp.array([0]), axis=2)
    with pytest.raises(ValueError):   # uneven tiles cannot be flattened
        qarray.take(qarray.quantize(rand(0, (V, 70)), 'int4', tiles={1: 32}), jnp.array([0]), axis=None)


def test_plain_arrays_pass_through():
    t = rand(1, (V, D))
    np.testing.assert_array_equal(qarray.take(t, IDX), jnp.take(t, IDX, axis=0))
