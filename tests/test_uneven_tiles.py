"""Tiles that do not divide their axis: the last tile is partial. Each part calibrates on its own values,
nothing extra is stored, and every op, transform and Flax rule handles the layout (or says it cannot)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import flax_integration as fi
import qarray

X = jax.random.normal(jax.random.key(0), (6, 300))
CASES = [('int8', dict(tiles=128)), ('int4', dict(tiles={1: 128}, channelwise_axes=(0,))),
         ('uint4', dict(tiles=128, calibration='minmax')), ('nf4', dict(tiles=64)),
         ('float8_e4m3fn', dict(tiles=128)), ('mxfp4', {}), ('int8', dict(tiles={1: 128}, calibration='rms'))]


@pytest.mark.parametrize('qtype,kw', CASES, ids=[c[0] + '-' + str(i) for i, c in enumerate(CASES)])
def test_partial_last_tile_equals_quantizing_the_parts_alone(qtype, kw):
    q = qarray.quantize(X, qtype, **kw)
    tile = q.uneven_tiles[1]
    whole = (300 // tile) * tile
    assert q.scale.shape[1] == -(-300 // tile)
    kw_tail = dict(kw, tiles={1: 300 - whole} if isinstance(kw.get('tiles'), dict) else 300 - whole)
    if qtype == 'mxfp4':
        kw_tail = dict(tiles={1: 300 - whole})
        head = qarray.quantize(X[:, :whole], qtype)
        tail = qarray.dequantize(qarray.quantize(jnp.pad(X[:, whole:], ((0, 0), (0, 32 - (300 - whole)))), qtype))
        tail = tail[:, :300 - whole]  # a zero-padded block has the same max: the same exponent and codes
    else:
        head = qarray.quantize(X[:, :whole], qtype, **kw)
        tail = qarray.dequantize(qarray.quantize(X[:, whole:], qtype, **kw_tail))
    want = jnp.concatenate([qarray.dequantize(head), tail], axis=1)
    np.testing.assert_array_equal(np.asarray(qarray.dequantize(q)), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(qarray.fake_quant(X, qtype, **kw)), np.asarray(want))
    # nothing padded is stored: values take ceil(bits * 300 / 8) per row, one scale per (partial) tile
    bits = q.qtype.bits
    leaves = [q.scale, q.zero_point]
    assert q.nbytes == 6 * -(-bits * 300 // 8) + sum(a.nbytes for a in leaves if a is not None)


def test_transpose_vmap_and_reshape():
    q = qarray.quantize(X, 'int4', tiles={1: 128}, channelwise_axes=(0,))
    np.testing.assert_array_equal(np.asarray(qarray.dequantize(q.T)), np.asarray(qarray.dequantize(q)).T)
    assert q.T.uneven_tiles == {0: 128}
    with pytest.raises(ValueError, match='uneven tiles'):
        q.reshape(3, 2, 300)
    stacked = jax.vmap(lambda v: qarray.quantize(v, 'int8', tiles=128))(jnp.stack([X, 2 * X]))
    assert stacked.uneven_tiles == {2: 128} and stacked.scale.shape == (2, 6, 3)
    np.testing.assert_array_equal(np.asarray(qarray.dequantize(stacked)[1]),
                                  np.asarray(qarray.dequantize(qarray.quantize(2 * X, 'int8', tiles=128))))


@pytest.mark.parametrize('lhs_q', [False, True])
def test_ops_take_the_dequantizing_path(lhs_q):
    w = jax.random.normal(jax.random.key(1), (300, 16))
    qw = qarray.quantize(w, 'int8', tiles={0: 128}, channelwise_axes=(1,))
    x = qarray.quantize(X, 'int8', tiles=128) if lhs_q else X
    assert qarray.ops.choose_path(x, qw, (((1,), (0,)), ((), ()))) == 'float'
    xd = qarray.dequantize(x) if lhs_q else X
    got = np.asarray(qarray.matmul(x, qw), np.float64)
    x64, w64 = np.asarray(xd, np.float64), np.asarray(qarray.dequantize(qw), np.float64)
    bound = 301 * 2.0 ** -24 * (np.abs(x64) @ np.abs(w64)) * 1.01
    assert np.all(np.abs(got - x64 @ w64) <= bound)


def test_flax_rule_with_a_tile_that_does_not_divide_the_input():
    model = nn.Dense(8, use_bias=False)
    ptq = fi.quantize_model(model, fi.PtqProvider([fi.QuantizationRule(weight_qtype='int4', tile_size=128)]))
    fp = model.init(jax.random.key(2), X)['params']
    params = fi.quantize_params(fp, jax.eval_shape(ptq.init, jax.random.key(0), X)['params'])
    k = params['kernel'].array
    assert k.uneven_tiles == {0: 128} and k.scale.shape == (3, 8)
    y = ptq.apply({'params': params}, X)
    ref = np.asarray(X, np.float64) @ np.asarray(qarray.dequantize(k), np.float64)
    assert np.abs(np.asarray(y, np.float64) - ref).max() <= 301 * 2.0 ** -24 * (np.abs(np.asarray(X)) @ np.abs(np.asarray(qarray.dequantize(k)))).max()


def test_refused_where_a_partial_tile_cannot_work():
    with pytest.raises(ValueError, match='double quantization needs tiles that divide'):
        qarray.quantize(X, 'nf4', tiles=64, scale_qtype='int8')
    with pytest.raises(ValueError, match='multiple of 16'):
        qarray.quantize(X[:, :40], 'nvfp4')


def test_checkpoints_keep_the_partial_tile(tmp_path):
    from qarray import io as qio
    pytest.importorskip('orbax.checkpoint')
    q = {'w': qarray.quantize(X, 'int4', tiles=128)}
    for save, load, name in ((qio.save, qio.restore, 'ckpt'), (qio.save_safetensors, qio.load_safetensors, 'q.st')):
        save(tmp_path / name, q)
        for got in (load(tmp_path / name, q), load(tmp_path / name)):
            assert got['w'].uneven_tiles == {1: 128}
            np.testing.assert_array_equal(np.asarray(qarray.dequantize(got['w'])), np.asarray(qarray.dequantize(q['w'])))
