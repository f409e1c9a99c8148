"""qarray.io: Orbax checkpoints and safetensors files keep every QArray bit-exact and checked.

(Sharded saves and restores onto other meshes are in tests/sharding/mesh_cases.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import qarray
from qarray import io as qio
from qarray import qtypes

pytest.importorskip('orbax.checkpoint')
pytest.importorskip('safetensors')

ROOT = Path(__file__).resolve().parent.parent


def _layout(name: str, i: int) -> dict:
    """A different layout per format: per-channel, tiled, asymmetric, bf16 scales, packed along axis 0."""
    qt = qtypes.get(name)
    if qt.kind == 'uint':
        return dict(calibration='minmax', channelwise_axes=(1,), tiles=None) if i % 2 else dict(
            calibration='minmax', tiles={1: 16})
    return [dict(channelwise_axes=(1,)), dict(tiles=16), dict(tiles={0: 8}, scale_dtype=jnp.bfloat16),
            dict(channelwise_axes=(0,), pack_axis=0)][(i // 2) % 4]


def every_format_tree() -> dict:
    keys = jax.random.split(jax.random.key(0), len(qtypes.names()))
    tree = {}
    for i, (name, k) in enumerate(zip(qtypes.names(), keys)):
        kw = {a: b for a, b in _layout(name, i).items() if b is not None}
        tree[name] = {'kernel': qarray.quantize(jax.random.normal(k, (24, 48)), name, **kw)}
    tree['int4']['bias'] = jnp.arange(48, dtype=jnp.bfloat16)
    tree['nf4_3d'] = qarray.quantize(jax.random.normal(keys[0], (2, 16, 32)), 'nf4', tiles=8)
    return tree


@pytest.fixture(scope='module')
def tree():
    return every_format_tree()


def raw_bytes(x) -> bytes:
    return np.asarray(x).view(np.uint8).tobytes()


def assert_bit_exact(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert qio.describe(got) == qio.describe(want)  # format, tiles, packing, logical shape, dtypes
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert raw_bytes(a) == raw_bytes(b)


def test_tree_covers_every_format_and_zero_points(tree):
    leaves = [l for l in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, qarray.QArray))
              if isinstance(l, qarray.QArray)]
    assert {q.qtype.name for q in leaves} == set(qtypes.names())
    assert any(q.zero_point is not None for q in leaves) and any(q.packed_axis == -2 for q in leaves)
    assert any(q.scale.dtype == jnp.bfloat16 for q in leaves)


# -------------------------------------------------------------------------------- Orbax
def test_orbax_round_trip_every_format(tree, tmp_path):
    qio.save(tmp_path / 'ckpt', tree)
    assert_bit_exact(qio.restore(tmp_path / 'ckpt', tree), tree)                          # concrete target
    assert_bit_exact(qio.restore(tmp_path / 'ckpt', jax.eval_shape(lambda t: t, tree)), tree)  # abstract
    assert_bit_exact(qio.restore(tmp_path / 'ckpt'), tree)                                # from metadata
    meta = qio.read_metadata(tmp_path / 'ckpt')['params']
    assert meta['int2/kernel']['tiles'] == {'1': 16} and meta['int2/kernel']['packed_axis'] == -1
    assert meta['int4/kernel']['packed_axis'] == -2 and meta['int4/kernel']['shape'] == [24, 48]
    assert meta['uint3/kernel']['zero_point'] == {'shape': [1, 48], 'dtype': 'uint8'}


def test_orbax_save_refuses_to_overwrite_unless_forced(tmp_path):
    t = {'w': qarray.quantize(jnp.ones((2, 8)), 'int4')}
    qio.save(tmp_path / 'c', t)
    with pytest.raises(ValueError, match='already exists'):
        qio.save(tmp_path / 'c', t)
    t2 = {'w': qarray.quantize(2 * jnp.ones((2, 8)), 'int4')}
    qio.save(tmp_path / 'c', t2, force=True)
    assert_bit_exact(qio.restore(tmp_path / 'c', t2), t2)


# -------------------------------------------------------------------------------- safetensors
def test_safetensors_round_trip_every_format(tree, tmp_path):
    f = tmp_path / 'model.safetensors'
    qio.save_safetensors(f, tree, metadata={'model': 'test'})
    assert_bit_exact(qio.load_safetensors(f, tree), tree)
    assert_bit_exact(qio.load_safetensors(f), tree)
    names = set(qio.tensor_names(f))
    assert {'int4/kernel.qvalue', 'int4/kernel.scale', 'int4/bias', 'uint4/kernel.zero_point'} <= names
    meta = qio.read_safetensors_metadata(f)['params']['nf4/kernel']
    assert meta['qtype'] == 'nf4' and meta['qvalue']['dtype'] == 'uint8'


def test_safetensors_file_is_plain_safetensors(tree, tmp_path):
    """Readable by the stock loader: packed bytes as uint8, fp8 as raw bytes, header metadata as JSON."""
    import safetensors.numpy
    from safetensors import safe_open
    f = tmp_path / 'model.safetensors'
    qio.save_safetensors(f, tree, metadata={'model': 'test'})
    plain = safetensors.numpy.load_file(f)
    assert plain['int2/kernel.qvalue'].dtype == np.uint8 and plain['int2/kernel.qvalue'].shape == (24, 12)
    assert raw_bytes(plain['float8_e4m3fn/kernel.qvalue']) == raw_bytes(tree['float8_e4m3fn']['kernel'].qvalue)
    with safe_open(f, 'np') as h:
        header = h.metadata()
    assert header['model'] == 'test' and json.loads(header['qarray'])['params']['int4/kernel']['qtype'] == 'int4'


LAYOUTS = st.sampled_from([dict(), dict(channelwise_axes=(0,)), dict(tiles=8), dict(tiles={0: 4}),
                           dict(calibration='minmax', channelwise_axes=(1,))])


@settings(max_examples=12)
@given(name=st.sampled_from(qtypes.names()), rows=st.sampled_from([4, 8]), cols=st.sampled_from([8, 24]),
       layout=LAYOUTS, seed=st.integers(0, 2**16))
def test_safetensors_round_trip_property(tmp_path_factory, name, rows, cols, layout, seed):
    qt = qtypes.get(name)
    if qt.kind == 'uint':
        layout = dict(layout, calibration='minmax')
    elif layout.get('calibration') == 'minmax' and not (qt.kind == 'int' and qt.bits > 1):
        layout = dict(channelwise_axes=(1,))
    q = qarray.quantize(jax.random.normal(jax.random.key(seed), (rows, cols)) * 3, name, **layout)
    f = tmp_path_factory.mktemp('st') / 'q.safetensors'
    qio.save_safetensors(f, {'layer': {'kernel': q}})
    assert_bit_exact(qio.load_safetensors(f, {'layer': {'kernel': q}}), {'layer': {'kernel': q}})


# -------------------------------------------------------------------------------- mismatches and damage
def _params(qtype='int4', **kw):
    w = jax.random.normal(jax.random.key(1), (32, 64))
    return {'dense': {'kernel': qarray.quantize(w, qtype, **kw), 'bias': jnp.zeros(64)}}


@pytest.fixture(scope='module', params=['orbax', 'safetensors'])
def saved(request, tmp_path_factory):
    """(load function, path) of _params('int4', tiles=32) saved each way."""
    d = tmp_path_factory.mktemp(request.param)
    if request.param == 'orbax':
        qio.save(d / 'ckpt', _params('int4', tiles=32))
        return qio.restore, d / 'ckpt'
    qio.save_safetensors(d / 'm.safetensors', _params('int4', tiles=32))
    return qio.load_safetensors, d / 'm.safetensors'


@pytest.mark.parametrize('target,match', [
    (lambda: _params('int8', tiles=32), r"param 'dense/kernel'.*qtype: stored 'int4' != expected 'int8'.*different quantization rules"),
    (lambda: _params('int4', tiles=16), r"param 'dense/kernel'.*tiles.*tile size"),
    (lambda: _params('int4', channelwise_axes=(1,)), r"param 'dense/kernel'.*channelwise_axes"),
    (lambda: _params('int4', tiles=32, pack_axis=0), r"param 'dense/kernel'.*packed_axis"),
    (lambda: _params('int4', tiles=32, calibration='minmax'), r"param 'dense/kernel'.*zero_point"),
    (lambda: _params('int4', tiles=32, scale_dtype=jnp.bfloat16), r"param 'dense/kernel'.*scale"),
    (lambda: {'dense': {'kernel': jnp.zeros((32, 64)), 'bias': jnp.zeros(64)}},
     r"param 'dense/kernel'.*holds a int4 QArray.*expects a float32 array.*nothing is dequantized"),
    (lambda: {'dense': {'kernel': _params()['dense']['kernel'], 'bias': jnp.zeros(64, jnp.bfloat16)}},
     r"param 'dense/bias'.*dtype"),
    (lambda: {'dense': {'kernel': _params()['dense']['kernel']}}, r"param 'dense/bias' is in .* not in the target"),
    (lambda: {**_params('int4', tiles=32), 'head': jnp.zeros(3)}, r"param 'head' is expected but"),
])
def test_mismatch_raises_naming_the_param(saved, target, match):
    load, path = saved
    with pytest.raises(qio.CheckpointError, match=match):
        load(path, target())


def test_float_checkpoint_is_not_quantized_on_load(tmp_path):
    qio.save_safetensors(tmp_path / 'f.safetensors', {'dense': {'kernel': jnp.ones((32, 64)), 'bias': jnp.zeros(64)}})
    with pytest.raises(qio.CheckpointError, match=r"param 'dense/kernel'.*holds a float32 array.*expects a int4"):
        qio.load_safetensors(tmp_path / 'f.safetensors', _params())


def test_truncated_safetensors_names_the_param(tmp_path):
    f = tmp_path / 'm.safetensors'
    qio.save_safetensors(f, {'a': _params()['dense']['kernel'], 'z': {'kernel': _params()['dense']['kernel']}})
    data = f.read_bytes()
    last = max((v['data_offsets'][1], k) for k, v in json.loads(data[8:8 + int.from_bytes(data[:8], 'little')]).items()
               if k != '__metadata__')[1]
    f.write_bytes(data[:-7])
    with pytest.raises(qio.CheckpointError, match=rf"param '{last.rsplit('.', 1)[0]}'.*truncated"):
        qio.load_safetensors(f)
    f.write_bytes(data[:100])
    with pytest.raises(qio.CheckpointError, match='truncated inside its header'):
        qio.load_safetensors(f)
    f.write_bytes(data[:5])
    with pytest.raises(qio.CheckpointError, match='not even a safetensors header'):
        qio.load_safetensors(f)


def test_foreign_safetensors_file_is_refused(tmp_path):
    import safetensors.numpy
    safetensors.numpy.save_file({'w.qvalue': np.zeros((2, 2), np.uint8)}, tmp_path / 'x.safetensors')
    with pytest.raises(qio.CheckpointError, match="no 'qarray' metadata entry"):
        qio.load_safetensors(tmp_path / 'x.safetensors')
    with pytest.raises(FileNotFoundError, match='no safetensors file'):
        qio.load_safetensors(tmp_path / 'missing.safetensors')


def test_safetensors_missing_tensor_names_the_param(tmp_path):
    import safetensors.numpy
    from safetensors import safe_open
    f = tmp_path / 'm.safetensors'
    qio.save_safetensors(f, _params())
    with safe_open(f, 'np') as h:
        header = h.metadata()
    tensors = safetensors.numpy.load_file(f)
    del tensors['dense/kernel.scale']
    safetensors.numpy.save_file(tensors, f, metadata=header)
    with pytest.raises(qio.CheckpointError, match=r"param 'dense/kernel': tensor 'dense/kernel.scale' is missing"):
        qio.load_safetensors(f)


def test_damaged_orbax_checkpoint_raises(tmp_path):
    qio.save(tmp_path / 'c', _params())
    for p in (tmp_path / 'c' / 'arrays').rglob('*'):
        if p.is_file() and p.parent.name == 'd':
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(qio.CheckpointError, match='could not read the arrays.*truncated or corrupt'):
        qio.restore(tmp_path / 'c', _params())
    with pytest.raises(FileNotFoundError, match='no checkpoint directory'):
        qio.restore(tmp_path / 'nothing')


def test_other_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="metadata key 'qarray' is reserved"):
        qio.save_safetensors(tmp_path / 'm.safetensors', {'w': jnp.ones(2)}, metadata={'qarray': 'x'})
    with pytest.raises(qio.CheckpointError, match='same .*-joined name'):
        qio.save_safetensors(tmp_path / 'm.safetensors', {'a/b': jnp.ones(2), 'a': {'b': jnp.ones(2)}})


# -------------------------------------------------------------------------------- fresh process
FORWARD = textwrap.dedent('''
    import jax, jax.numpy as jnp, qarray

    @jax.jit
    def forward(params, x):
        h = jax.nn.relu(x @ qarray.dequantize(params['l1']['kernel']) + params['l1']['bias'])
        h = jax.nn.relu(h @ qarray.dequantize(params['l2']['kernel']))
        return h @ qarray.dequantize(params['l3']['kernel'])
''')


def test_4bit_model_restored_in_fresh_process_gives_identical_outputs(tmp_path):
    ns: dict = {}
    exec(FORWARD, ns)
    k = jax.random.split(jax.random.key(2), 4)
    params = {'l1': {'kernel': qarray.quantize(jax.random.normal(k[0], (64, 128)), 'int4', tiles=32),
                     'bias': jax.random.normal(k[1], (128,))},
              'l2': {'kernel': qarray.quantize(jax.random.normal(k[2], (128, 64)), 'nf4', tiles={0: 64},
                                               channelwise_axes=(1,))},
              'l3': {'kernel': qarray.quantize(jax.random.normal(k[3], (64, 16)), 'uint4', calibration='minmax',
                                               channelwise_axes=(1,), pack_axis=0)}}
    x = jax.random.normal(jax.random.key(3), (8, 64))
    qio.save(tmp_path / 'ckpt', params)
    qio.save_safetensors(tmp_path / 'model.safetensors', params)
    np.save(tmp_path / 'x.npy', np.asarray(x))
    want = np.asarray(ns['forward'](params, x))
    child = FORWARD + textwrap.dedent(f'''
        import numpy as np
        from qarray import io as qio
        x = jnp.asarray(np.load({str(tmp_path / 'x.npy')!r}))
        for name, p in [('orbax', qio.restore({str(tmp_path / 'ckpt')!r})),
                        ('safetensors', qio.load_safetensors({str(tmp_path / 'model.safetensors')!r}))]:
            assert p['l1']['kernel'].qtype.name == 'int4' and p['l3']['kernel'].packed_axis == -2
            np.save({str(tmp_path)!r} + f'/out_{{name}}.npy', np.asarray(forward(p, x)))
    ''')
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run([sys.executable, '-c', child], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ('orbax', 'safetensors'):
        got = np.load(tmp_path / f'out_{name}.npy')
        assert got.dtype == want.dtype and raw_bytes(got) == raw_bytes(want), name
