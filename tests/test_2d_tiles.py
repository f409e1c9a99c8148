"""2-D block scales (``tiles={0: a, 1: b}``: one scale per a x b block, as DeepSeek-V3-style fp8 checkpoints store
``[out/128, in/128]`` scales) through every path: quantize/dequantize, the ops, a Flax layer, checkpoints, sharding.

Small shapes stand for the 128 x 128 case: tiles {0: 8, 1: 16} on 32 x 48 (4 x 3 blocks), and uneven
{0: 8, 1: 16} on 30 x 44 (partial last tiles on both axes).

Tolerances: a quantization error is within half a step of its block (int8: ``absmax / 255`` with the
``absmax / 127.5`` scale; fp8 e4m3: ``2**-4 |x|`` for normal codes, ``2**-10 s`` below, ``s = absmax / 448``;
int4: ``absmax / 15``); an op equals the float op on the dequantized operands within the float32
accumulation bound (tests/tolerances.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import qarray
from tolerances import OP_EXTRA, assert_within, dot_bound, abs_conv, gamma

TILES = {0: 8, 1: 16}
QTYPES = ('int8', 'fp8', 'int4')
ROOT = Path(__file__).resolve().parents[1]


def _w(shape=(32, 48), seed=0):
    # rows of very different magnitude, so blocks get different scales
    w = jax.random.normal(jax.random.key(seed), shape)
    return w * jnp.exp2(jnp.arange(shape[0]) % 7 - 3.0)[:, None]


def _blocks(a: np.ndarray, tiles=TILES):
    """Yield (rows, cols) slices of every block (partial last tiles included)."""
    for r in range(0, a.shape[0], tiles[0]):
        for c in range(0, a.shape[1], tiles[1]):
            yield slice(r, r + tiles[0]), slice(c, c + tiles[1])


def _half_step(qtype: str, block: np.ndarray) -> np.ndarray:
    absmax = np.abs(block).max()
    if qtype == 'int8':
        return np.full(block.shape, absmax / 255)
    if qtype == 'int4':
        return np.full(block.shape, absmax / 15)
    return np.maximum(2.0 ** -4 * np.abs(block), 2.0 ** -10 * absmax / 448)


@pytest.mark.parametrize('shape', [(32, 48), (30, 44)])
@pytest.mark.parametrize('qtype', QTYPES)
def test_quantize_one_scale_per_block_and_half_step_error(qtype, shape):
    w = _w(shape)
    q = qarray.quantize(w, qtype, tiles=TILES)
    n_blocks = (-(-shape[0] // 8), -(-shape[1] // 16))
    assert q.scale.shape == n_blocks and q.tiles == TILES
    w64, d64 = np.asarray(w, np.float64), np.asarray(qarray.dequantize(q), np.float64)
    for (rs, cs), s in zip(_blocks(w64), np.asarray(q.scale).ravel()):
        block = w64[rs, cs]
        want_scale = np.abs(block).max() / {'int8': 127.5, 'int4': 7.5, 'fp8': 448.0}[qtype]
        np.testing.assert_allclose(s, want_scale, rtol=2 * 2.0 ** -24)   # one f32 division
        slack = 4 * 2.0 ** -24 * np.abs(block)                          # f32 x / s, code * s
        assert (np.abs(d64[rs, cs] - block) <= _half_step(qtype, block) + slack).all()


# --------------------------------------------------------------------------- ops
def _deq(q):
    return np.asarray(qarray.dequantize(q), np.float64)


@pytest.mark.parametrize('qtype', QTYPES)
def test_weight_only_ops_equal_float_op_on_dequantized_weight(qtype):
    w = _w()
    q = qarray.quantize(w, qtype, tiles=TILES)
    x = jax.random.normal(jax.random.key(1), (4, 32))
    want = np.asarray(x, np.float64) @ _deq(q)
    bound = dot_bound(x, _deq(q), evals=1, extra=OP_EXTRA)
    dn = (((1,), (0,)), ((), ()))
    for name, got in [('dot_general', qarray.dot_general(x, q, dn)),
                      ('einsum', qarray.einsum('bk,kn->bn', x, q)),
                      ('matmul', qarray.matmul(x, q)),
                      ('@', x @ q),
                      ('jit', jax.jit(lambda a, b: qarray.einsum('bk,kn->bn', a, b))(x, q)),
                      ('transposed', qarray.einsum('bk,nk->bn', x, q.T))]:
        assert_within(got, want, bound, name)


@pytest.mark.parametrize('qtype', ['int8', 'fp8'])
def test_both_operands_quantized_w8a8(qtype):
    q = qarray.quantize(_w(), qtype, tiles=TILES)
    x = jax.random.normal(jax.random.key(1), (4, 32))
    xq = qarray.quantize(x, qtype, channelwise_axes=(0,), tiles={1: 8})   # per token, tiles along K like the weight
    got = qarray.dot_general(xq, q, (((1,), (0,)), ((), ())))
    assert_within(got, _deq(xq) @ _deq(q), dot_bound(_deq(xq), _deq(q), evals=1, extra=OP_EXTRA), 'w8a8')


@pytest.mark.parametrize('qtype', ['int8', 'fp8'])
def test_conv_with_2d_tiled_hwio_weight(qtype):
    w = jax.random.normal(jax.random.key(2), (3, 3, 8, 16))
    q = qarray.quantize(w, qtype, tiles={2: 4, 3: 8})      # blocks of 4 input x 8 output features
    assert q.scale.shape == (1, 1, 2, 2)
    x = jax.random.normal(jax.random.key(3), (2, 6, 6, 8))
    kw = dict(window_strides=(1, 1), padding='SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    got = qarray.conv_general_dilated(x, q, **kw)
    with jax.enable_x64(True):
        want = np.asarray(jax.lax.conv_general_dilated(jnp.asarray(np.asarray(x, np.float64)),
                                                       jnp.asarray(_deq(q)), **kw))
    k = 3 * 3 * 8
    assert_within(got, want, gamma(k + OP_EXTRA) * abs_conv(x, _deq(q), **kw) + 1e-30, 'conv')


# --------------------------------------------------------------------------- Flax
@pytest.mark.parametrize('act_qtype', [None, 'int8'])
def test_flax_ptq_dense_runs_a_2d_tiled_weight(act_qtype):
    """Rules cannot ask for 2-D tiles (tile_size is one int along the contraction), but a 2-D-tiled weight (e.g.
    from a DeepSeek-style fp8 checkpoint) stored in a PTQ model's params computes through the quantized op."""
    import flax_integration as fi
    x = jax.random.normal(jax.random.key(1), (4, 32))
    m = fi.quantize_model(nn.Dense(48), fi.PtqProvider([fi.QuantizationRule(weight_qtype='fp8', act_qtype=act_qtype)]))
    v = m.init(jax.random.key(0), x)
    q = qarray.quantize(_w(), 'fp8', tiles=TILES)
    params = dict(v['params'], kernel=dataclasses.replace(v['params']['kernel'], array=q))
    got = m.apply({'params': params}, x)
    xs = x if act_qtype is None else qarray.dequantize(qarray.quantize(x, act_qtype, channelwise_axes=(0,)))
    want = np.asarray(xs, np.float64) @ _deq(q) + np.asarray(params['bias'], np.float64)
    # activation: the PTQ per-token quantization (same formula) -- its result may differ from ours by one code
    # where x / s lands within f32 rounding of a tie; the bound covers that (one step of x per term).
    step = 0 if act_qtype is None else np.abs(np.asarray(x)).max(1, keepdims=True) / 127.5
    bound = dot_bound(np.abs(np.asarray(xs, np.float64)) + step, _deq(q), evals=1, extra=OP_EXTRA + 1) + \
        (step * np.abs(_deq(q)).sum(0) if act_qtype else 0)
    assert_within(got, want, bound, 'flax')


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize('qtype', QTYPES)
def test_checkpoint_round_trip_bit_for_bit(qtype, tmp_path):
    pytest.importorskip('orbax.checkpoint')
    from qarray import io as qio
    params = {'w': qarray.quantize(_w(), qtype, tiles=TILES), 'u': qarray.quantize(_w((30, 44)), qtype, tiles=TILES)}
    qio.save(str(tmp_path / 'ckpt'), params)
    back = qio.restore(str(tmp_path / 'ckpt'), params)
    qio.save_safetensors(str(tmp_path / 'w.safetensors'), params)
    back_st = qio.load_safetensors(str(tmp_path / 'w.safetensors'), params)
    for restored in (back, back_st):
        for name in params:
            a, b = params[name], restored[name]
            assert (a.tiles, a.tile_sizes, a.shape, a.qtype) == (b.tiles, b.tile_sizes, b.shape, b.qtype)
            for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
                assert la.dtype == lb.dtype
                np.testing.assert_array_equal(np.asarray(la).view(np.uint8), np.asarray(lb).view(np.uint8))


# --------------------------------------------------------------------------- sharding (4 host devices)
_MESH_SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np, qarray
    from jax.sharding import NamedSharding, PartitionSpec as P
    from qarray import sharding as qs
    assert jax.device_count() == 4
    from jax.sharding import AxisType
    mesh = jax.make_mesh((2, 2), ('data', 'model'), axis_types=(getattr(AxisType, AXIS_TYPE),) * 2)
    w = jax.random.normal(jax.random.key(0), (32, 48))
    x = jax.random.normal(jax.random.key(1), (4, 32))
    for qtype in ('int8', 'fp8', 'int4'):
        q = qarray.quantize(w, qtype, tiles={0: 8, 1: 12})   # tiles aligned with the shards (16 x 24 each)
        specs = qs.partition_specs(q, P('data', 'model'), mesh)
        assert tuple(specs.qvalue) == ('data', 'model') and tuple(specs.scale) == ('data', 'model'), (qtype, specs)
        sq = qs.shard(q, NamedSharding(mesh, P('data', 'model')))
        assert sq.qvalue.sharding.spec == P('data', 'model'), sq.qvalue.sharding
        np.testing.assert_array_equal(np.asarray(qarray.dequantize(sq)), np.asarray(qarray.dequantize(q)))
        got = jax.jit(lambda a, b: qarray.einsum('bk,kn->bn', a, b))(x, sq)
        want = np.asarray(x, np.float64) @ np.asarray(qarray.dequantize(q), np.float64)
        k = 32 + 4
        bound = 2 * (k * 2.0 ** -24) / (1 - k * 2.0 ** -24) * (np.abs(np.asarray(x, np.float64)) @
                                                             np.abs(np.asarray(qarray.dequantize(q), np.float64)))
        assert (np.abs(np.asarray(got, np.float64) - want) <= bound + 1e-30).all(), qtype
        sqs = qs.quantize(jax.device_put(w, NamedSharding(mesh, P('data', 'model'))), qtype, tiles={0: 8, 1: 12})
        np.testing.assert_array_equal(np.asarray(sqs.qvalue), np.asarray(q.qvalue))
        assert sqs.scale.shape == (4, 4) and sqs.scale.sharding.spec == P('data', 'model'), sqs.scale.sharding
    print('MESH-OK')
''')


@pytest.mark.parametrize('axis_type', ['Auto', 'Explicit'])
def test_sharding_on_a_2x2_cpu_mesh(axis_type):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
    script = f'AXIS_TYPE = {axis_type!r}\n' + _MESH_SCRIPT
    proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert 'MESH-OK' in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
