"""Bit packing: exact sizes, bit layout against a numpy reference, round trips, errors."""

import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import qarray
from qarray import packing


def np_pack(fields: np.ndarray, bits: int) -> np.ndarray:
    """Reference packer along the last axis: little-endian bit stream, zero padded to whole bytes."""
    n = fields.shape[-1]
    shifts = np.arange(bits)
    stream = ((fields[..., :, None].astype(np.uint16) >> shifts) & 1).astype(np.uint8)  # (..., n, bits)
    stream = stream.reshape(*fields.shape[:-1], n * bits)
    return np.packbits(stream, axis=-1, bitorder='little')


@pytest.mark.parametrize('bits', range(1, 8))
@pytest.mark.parametrize('n', [1, 7, 9, 16, 65])
def test_sizes_and_layout_match_reference(bits, n):
    rng = np.random.default_rng(bits * 100 + n)
    fields = rng.integers(0, 2**bits, size=(3, n)).astype(np.uint8)
    packed = packing.pack(jnp.asarray(fields), bits)
    assert packed.dtype == jnp.uint8
    assert packed.shape == (3, math.ceil(bits * n / 8)) == (3, packing.packed_length(n, bits))
    np.testing.assert_array_equal(np.asarray(packed), np_pack(fields, bits))
    np.testing.assert_array_equal(np.asarray(packing.unpack(packed, bits, n)), fields)


@given(bits=st.integers(1, 7), data=st.data(),
       shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=19))
def test_round_trip_any_rank_axis_and_size(bits, data, shape):
    fields = data.draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, 2**bits - 1)))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    packed = packing.pack(jnp.asarray(fields), bits, axis=axis)
    expected_shape = list(shape)
    expected_shape[axis] = math.ceil(bits * shape[axis] / 8)
    assert packed.shape == tuple(expected_shape)
    np.testing.assert_array_equal(np.asarray(packed),
                                  np.moveaxis(np_pack(np.moveaxis(fields, axis, -1), bits), -1, axis))
    back = packing.unpack(packed, bits, shape[axis], axis=axis)
    np.testing.assert_array_equal(np.asarray(back), fields)


def test_pack_works_inside_jit():
    fields = jnp.asarray(np.random.default_rng(0).integers(0, 8, size=(5, 21)), jnp.uint8)
    for bits in (3, 5):
        f = fields & (2**bits - 1)
        packed = jax.jit(lambda v, b=bits: packing.pack(v, b))(f)
        np.testing.assert_array_equal(np.asarray(packed), np_pack(np.asarray(f), bits))
        back = jax.jit(lambda v, b=bits: packing.unpack(v, b, 21))(packed)
        chex.assert_trees_all_equal(back, f)


@pytest.mark.parametrize('name, bits, n', [(f'int{b}', b, 37) for b in range(1, 8)] +
                         [(f'uint{b}', b, 37) for b in range(1, 8)] + [('nf4', 4, 37), ('int3', 3, 1), ('nf4', 4, 1)])
def test_quantized_storage_is_bit_packed_on_cpu(name, bits, n):
    x = jax.random.normal(jax.random.key(n), (4, n))
    q = qarray.quantize(x, name, calibration='minmax' if name.startswith('uint') else 'absmax')
    assert q.qvalue.dtype == jnp.uint8
    assert q.qvalue.shape == (4, math.ceil(n * bits / 8))
    assert q.qvalue.nbytes == 4 * math.ceil(n * bits / 8)
    # The device buffer really is that small (not one byte per value as jnp.int4 is on CPU).
    assert q.qvalue.addressable_data(0).on_device_size_in_bytes() == q.qvalue.nbytes
    assert q.shape == (4, n)


@pytest.mark.parametrize('name', ['int8', 'uint8', 'fp8', 'float8_e5m2'])
def test_eight_bit_formats_are_stored_natively(name):
    q = qarray.quantize(jnp.ones((2, 5)), name, calibration='minmax' if name == 'uint8' else 'absmax')
    assert q.packed_axis is None and q.qvalue.shape == (2, 5)
    assert q.qvalue.dtype == qarray.qtypes.get(name).code_dtype


@pytest.mark.parametrize('bits', [0, 8, 2.0, '3'])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=r'bits must be an int in 1\.\.7'):
        packing.packed_length(4, bits)
    with pytest.raises(ValueError, match=r'bits must be an int in 1\.\.7'):
        packing.pack(jnp.zeros(4, jnp.uint8), bits)


def test_unpack_errors():
    with pytest.raises(TypeError, match='packed must be uint8; got int8'):
        packing.unpack(jnp.zeros(2, jnp.int8), 3, 5)
    with pytest.raises(ValueError, match=r'packed axis has 3 bytes but length=5 fields of 3 bits need 2'):
        packing.unpack(jnp.zeros(3, jnp.uint8), 3, 5)
