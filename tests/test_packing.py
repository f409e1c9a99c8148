"""Bit packing: exact sizes, bit layout against a numpy reference, round trips, errors."""

import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import budget
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


# --------------------------------------------------------------------------- native sub-byte path (issue 19)
@pytest.fixture(params=['cpu', 'other'])
def backend(request, monkeypatch):
    """'cpu': the native int4/uint4/int2/uint2 bitcasts (on a CPU host); 'other': the shift formulation the
    library uses on any other backend (forced by pretending the default backend is not CPU)."""
    if request.param == 'other' or jax.default_backend() != 'cpu':
        monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu' if request.param == 'other' else 'cpu')
    jax.clear_caches()  # the choice is made at trace time: no trace of the other path may be reused
    yield request.param
    jax.clear_caches()


def np_split(packed: np.ndarray, bits: int, length: int, signed: bool) -> np.ndarray:
    """Reference split_bytes along the last axis: field i of a byte at bits [i*bits, (i+1)*bits)."""
    per = 8 // bits
    f = (packed[..., :, None] >> (np.arange(per) * bits).astype(np.uint8)) & np.uint8(2**bits - 1)
    f = f.reshape(*packed.shape[:-1], -1)[..., :length]
    if signed:
        return ((f.astype(np.int16) ^ (1 << bits - 1)) - (1 << bits - 1)).astype(np.int8)
    return f


@pytest.mark.parametrize('bits', [1, 2, 4])
def test_split_bytes_is_the_reference_layout_on_both_paths(backend, bits):
    rng = np.random.default_rng(bits)
    for n in budget.pick((1, 9), (1, 2, 3, 5, 7, 9, 33)):  # odd lengths: the last byte is part padding
        fields = rng.integers(0, 2**bits, size=(3, n)).astype(np.uint8)
        packed = packing.pack(jnp.asarray(fields), bits)
        for signed in (False, True):
            ref = np_split(np.asarray(packed), bits, n, signed)
            got = packing.split_bytes(packed, bits, n, -1, signed=signed)  # itself jitted, as pack / unpack
            assert got.dtype == (jnp.int8 if signed else jnp.uint8) and got.shape == (3, n)
            np.testing.assert_array_equal(np.asarray(got), ref)
            # and along a leading axis (always the shift formulation)
            got0 = packing.split_bytes(packing.pack(jnp.asarray(fields.T), bits, axis=0), bits, n, 0, signed=signed)
            np.testing.assert_array_equal(np.asarray(got0), ref.T)
        np.testing.assert_array_equal(np.asarray(packing.split_bytes(packed, bits, n)),
                                      np.asarray(packing.unpack(packed, bits, n)))


@pytest.mark.parametrize('bits', [2, 4])
def test_pack_native_gives_the_bytes_of_pack_on_both_paths(backend, bits):
    rng = np.random.default_rng(10 + bits)
    for shape in budget.pick(((7,), (2, 3, 9)), ((1,), (7,), (3, 5), (2, 3, 9), (4, 6))):
        fields = rng.integers(0, 2**bits, size=shape).astype(np.uint8)
        codes = np.asarray(qarray.qtypes.get(f'int{bits}').from_field(jnp.asarray(fields)))  # two's complement
        for axis in range(-len(shape), len(shape)):
            ref = np.asarray(packing.pack(jnp.asarray(fields), bits, axis=axis))
            for signed, vals in ((False, fields), (True, codes)):
                got = packing.pack_native(jnp.asarray(vals), bits, axis, signed=signed)
                assert got.dtype == jnp.uint8
                np.testing.assert_array_equal(np.asarray(got), ref)  # pack_native is jitted: one program
                back = packing.split_bytes(got, bits, shape[axis], axis, signed=signed)
                np.testing.assert_array_equal(np.asarray(back), vals)


def test_native_path_is_cpu_only(backend):
    """On CPU the last-axis split / pack go through XLA's sub-byte types; elsewhere no sub-byte type appears."""
    b = jnp.zeros((4, 6), jnp.uint8)
    for bits, t in ((4, 'i4'), (2, 'i2')):
        split = jax.jit(lambda v: packing.split_bytes(v, bits, 11, signed=True)).lower(b).as_text()
        pack = jax.jit(lambda v: packing.pack_native(v, bits, signed=True)).lower(jnp.zeros((4, 11), jnp.int8)).as_text()
        assert (f'x{t}>' in split and f'x{t}>' in pack) == (backend == 'cpu' and jax.default_backend() == 'cpu')


@pytest.mark.parametrize('name', ['int4', 'uint4', 'nf4', 'int2', 'uint2', 'float4_e2m1fn'])
def test_sub_byte_formats_round_trip_on_both_paths(backend, name):
    """Codes of every 2/4-bit format (fp4 included: its fields are a uint4 view) survive quantize -> codes,
    with bytes equal to the generic packer's, eagerly and inside one jit."""
    x = jax.random.normal(jax.random.key(3), (3, 11)) * 2
    qt = qarray.qtypes.get(name)
    cal = 'minmax' if name.startswith('uint') else 'absmax'
    q = qarray.quantize(x, name, calibration=cal)
    c = qarray.codes(q)
    np.testing.assert_array_equal(np.asarray(q.qvalue), np.asarray(packing.pack(qt.to_field(c), qt.bits)))
    np.testing.assert_array_equal(np.asarray(packing.unpack(q.qvalue, qt.bits, 11)), np.asarray(qt.to_field(c)))
    jq = jax.jit(lambda v: qarray.dequantize(qarray.quantize(v, name, calibration=cal)))(x)
    np.testing.assert_array_equal(np.asarray(jq), np.asarray(qarray.dequantize(q)))


def test_pack_native_errors():
    for bits in (1, 3, 8):
        with pytest.raises(ValueError, match='pack_native: bits must be 2 or 4'):
            packing.pack_native(jnp.zeros(4, jnp.uint8), bits)
    with pytest.raises(ValueError, match='at least one axis'):
        packing.pack_native(jnp.zeros((), jnp.uint8), 4)


PACKED = [n for n in qarray.qtypes.names() if qarray.qtypes.get(n).packed]


@pytest.mark.parametrize('name', PACKED)
def test_repack_equals_quantizing_with_that_pack_axis(name):
    """repack(quantize(x), a) == quantize(x, pack_axis=a) bit for bit (same codes, scales, bytes), for every
    bit-packed format, odd lengths (a partial last byte) included."""
    qt = qarray.qtypes.get(name)
    x = jax.random.normal(jax.random.key(7), (3, 5, 64))
    kw = dict(calibration='minmax') if qt.kind == 'uint' else {}
    if not qt.microscaling:
        kw['tiles'] = {2: 32}
    src = qarray.quantize(x, name, pack_axis=-1, **kw)
    for axis in (0, 1):
        want = qarray.quantize(x, name, pack_axis=axis, **kw)
        got = qarray.repack(src, axis)
        assert got.packed_axis == want.packed_axis and got.qvalue.shape == want.qvalue.shape
        np.testing.assert_array_equal(np.asarray(got.qvalue), np.asarray(want.qvalue))
        assert got.nbytes == want.nbytes
        np.testing.assert_array_equal(np.asarray(qarray.dequantize(got)), np.asarray(qarray.dequantize(src)))
        back = qarray.repack(got, -1)
        np.testing.assert_array_equal(np.asarray(back.qvalue), np.asarray(src.qvalue))
    assert qarray.repack(src, 2) is src  # already packed along that axis


def test_repack_errors():
    with pytest.raises(TypeError, match='repack expects a QArray'):
        qarray.repack(jnp.ones((2, 2)), 0)
    with pytest.raises(ValueError, match="'int8' codes are stored one per element"):
        qarray.repack(qarray.quantize(jnp.ones((2, 2)), 'int8'), 0)
    with pytest.raises(ValueError, match='pack_axis=2 is out of range'):
        qarray.repack(qarray.quantize(jnp.ones((2, 2)), 'int4'), 2)
