"""qarray.io: Orbax checkpoints and safetensors files keep every QArray bit-exact and checked.

(Sharded saves and restores onto other meshes are in tests/sharding/mesh_cases.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
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
        if qtypes.get(name).microscaling:  # blocks of 32 (16) along the last axis, scales of their own dtype
            tree[name] = {'kernel': qarray.quantize(jax.random.normal(k, (24, 64)), name)}
            continue
        kw = {a: b for a, b in _layout(name, i).items() if b is not None}
        tree[name] = {'kernel': qarray.quantize(jax.random.normal(k, (24, 48)), name, **kw)}
    tree['nf4_double'] = {'kernel': qarray.quantize(jax.random.normal(keys[1], (24, 64)), 'nf4', tiles=16,
                                                    scale_qtype='int8')}
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
@given(name=st.sampled_from([n for n in qtypes.names() if not qtypes.get(n).microscaling]),
       rows=st.sampled_from([4, 8]), cols=st.sampled_from([8, 24]),
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
    (lambda: _params('int4', tiles=32, pack_axis=0), r"param 'dense/kernel'.*packed_axis.*qarray.repack\(q, axis\)"),
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


def test_checkpoint_packed_along_another_axis_is_moved_with_repack(saved):
    # What the packed_axis error tells the user to do: restore without a target, repack (lossless).
    load, path = saved
    target = _params('int4', tiles=32, pack_axis=0)
    raw = load(path)
    moved = jax.tree.map(lambda l: qarray.repack(l, 0) if isinstance(l, qarray.QArray) else l, raw,
                         is_leaf=lambda l: isinstance(l, qarray.QArray))
    assert_bit_exact(moved, target)


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
    with pytest.raises(qio.CheckpointError,
                       match=r"param 'dense/(bias|kernel)'.*could not read the arrays.*truncated or corrupt"):
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


# -------------------------------------------------------------------------------- integrity (checksums)
def sha256(b) -> str:
    return hashlib.sha256(b if isinstance(b, bytes) else raw_bytes(b)).hexdigest()


def read_st(path):
    """(header length n, header dict, file bytes) of a safetensors file."""
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], 'little')
    return n, json.loads(data[8:8 + n]), data


def write_st(path, header: dict, body: bytes) -> None:
    """A safetensors file of ``header`` and ``body`` (offsets count from the end of the header)."""
    h = json.dumps(header).encode()
    h += b' ' * (-len(h) % 8)
    Path(path).write_bytes(len(h).to_bytes(8, 'little') + h + body)


def tensor_range(path, tname) -> tuple[int, int]:
    n, header, _ = read_st(path)
    a, b = header[tname]['data_offsets']
    return 8 + n + a, 8 + n + b


def flip(path, pos: int, bit: int = 0x10) -> None:
    data = bytearray(Path(path).read_bytes())
    data[pos] ^= bit
    Path(path).write_bytes(bytes(data))


def _asym_params():
    """int4 kernel (tiled), uint4 kernel (zero points), float bias."""
    w = jax.random.normal(jax.random.key(1), (32, 64))
    return {'dense': {'kernel': qarray.quantize(w, 'int4', tiles=32), 'bias': jnp.arange(64, dtype=jnp.float32)},
            'head': {'kernel': qarray.quantize(w.T, 'uint4', calibration='minmax', channelwise_axes=(1,))}}


def test_checksums_are_sha256_of_each_part_and_of_the_metadata(tmp_path):
    params = _asym_params()
    f = tmp_path / 'm.safetensors'
    qio.save_safetensors(f, params)
    qio.save(tmp_path / 'c', params)
    k, h = params['dense']['kernel'], params['head']['kernel']
    want = {'dense/kernel': {'qvalue': sha256(k.qvalue), 'scale': sha256(k.scale)},
            'dense/bias': {'array': sha256(params['dense']['bias'])},
            'head/kernel': {'qvalue': sha256(h.qvalue), 'scale': sha256(h.scale), 'zero_point': sha256(h.zero_point)}}
    for meta in (qio.read_safetensors_metadata(f), qio.read_metadata(tmp_path / 'c')):
        assert meta['format_version'] == 2 and meta['checksums']['algorithm'] == 'sha256'
        got = {n: {p: r['digest'] for p, r in parts.items()} for n, parts in meta['checksums']['params'].items()}
        assert got == want
        assert all('shards' not in r for parts in meta['checksums']['params'].values() for r in parts.values())
        rest = {key: v for key, v in meta.items() if key != 'metadata_checksum'}
        canon = json.dumps(rest, sort_keys=True, separators=(',', ':'), ensure_ascii=True).encode()
        assert meta['metadata_checksum'] == {'algorithm': 'sha256', 'digest': sha256(canon)}
    # the safetensors digest is the SHA-256 of the tensor's bytes in the file (checkable by any tool)
    data = f.read_bytes()
    a, b = tensor_range(f, 'head/kernel.zero_point')
    assert sha256(data[a:b]) == want['head/kernel']['zero_point']


@pytest.mark.parametrize('tname,param,part', [
    ('dense/kernel.qvalue', 'dense/kernel', 'qvalue'), ('dense/kernel.scale', 'dense/kernel', 'scale'),
    ('head/kernel.zero_point', 'head/kernel', 'zero_point'), ('dense/bias', 'dense/bias', 'values')])
def test_safetensors_flipped_byte_names_param_and_part(tmp_path, tname, param, part):
    params = _asym_params()
    f = tmp_path / 'm.safetensors'
    qio.save_safetensors(f, params)
    a, b = tensor_range(f, tname)
    flip(f, (a + b) // 2)
    with pytest.raises(qio.CheckpointError, match=rf"param '{param}': its {part} does not match its sha256 checksum"):
        qio.load_safetensors(f, params)
    with pytest.raises(qio.CheckpointError, match=rf"param '{param}': its {part} does not match"):
        qio.load_safetensors(f)  # without a target too
    # verify=False skips the check: the damaged bytes load as they are, exactly one byte off
    got = qio.load_safetensors(f, params, verify=False)
    diff = [sum(x != y for x, y in zip(raw_bytes(u), raw_bytes(v)))
            for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(params))]
    assert sorted(diff) == [0] * (len(diff) - 1) + [1]


@settings(max_examples=25)
@given(frac=st.floats(0, 1, exclude_max=True), bit=st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128]))
def test_safetensors_any_flipped_data_byte_names_its_param(tmp_path_factory, frac, bit):
    f = tmp_path_factory.mktemp('flip') / 'm.safetensors'
    qio.save_safetensors(f, _asym_params())
    n, header, data = read_st(f)
    pos = 8 + n + int(frac * (len(data) - 8 - n))
    owner = next(t for t, v in header.items() if t != '__metadata__'
                 and 8 + n + v['data_offsets'][0] <= pos < 8 + n + v['data_offsets'][1])
    flip(f, pos, bit)
    param = owner.rsplit('.', 1)[0] if owner.rsplit('.', 1)[-1] in ('qvalue', 'scale', 'zero_point') else owner
    with pytest.raises(qio.CheckpointError, match=rf"param '{param}': its .* does not match its sha256"):
        qio.load_safetensors(f)


def _tamper_qarray_meta(f, edit) -> None:
    n, header, data = read_st(f)
    meta = json.loads(header['__metadata__']['qarray'])
    edit(meta)
    header['__metadata__']['qarray'] = json.dumps(meta)
    write_st(f, header, data[8 + n:])


def test_safetensors_tampered_metadata_names_the_file(tmp_path):
    params = _params('int4', tiles=32)
    f = tmp_path / 'm.safetensors'
    qio.save_safetensors(f, params)
    n, header, data = read_st(f)
    text = data[8:8 + n].replace(b'\\"qtype\\": \\"int4\\"', b'\\"qtype\\":  \\"nf4\\"')  # same length
    assert text != data[8:8 + n]
    f.write_bytes(data[:8] + text + data[8 + n:])
    with pytest.raises(qio.CheckpointError, match=rf"file '{f}': the qarray metadata does not match its sha256"):
        qio.load_safetensors(f, params)
    with pytest.raises(qio.CheckpointError, match='does not match its sha256'):
        qio.read_safetensors_metadata(f)
    # verify=False skips it: the edited format is believed (and caught only by the target comparison)
    assert qio.load_safetensors(f, verify=False)['dense']['kernel'].qtype.name == 'nf4'
    with pytest.raises(qio.CheckpointError, match=r"param 'dense/kernel'.*qtype: stored 'nf4' != expected 'int4'"):
        qio.load_safetensors(f, params, verify=False)


def test_safetensors_tampered_checksum_entry_is_caught(tmp_path):
    f = tmp_path / 'm.safetensors'
    qio.save_safetensors(f, _params())

    def edit(meta):
        meta['checksums']['params']['dense/bias']['array']['digest'] = '0' * 64
    _tamper_qarray_meta(f, edit)
    with pytest.raises(qio.CheckpointError, match='metadata does not match its sha256'):
        qio.load_safetensors(f)


@pytest.mark.parametrize('edit,match', [
    (lambda h: h['dense/kernel.scale'].pop('data_offsets'), r"corrupt safetensors header: the entry of tensor "
                                                            r"'dense/kernel.scale' \(param 'dense/kernel'\)"),
    (lambda h: h['dense/bias'].__setitem__('data_offsets', [8, 4]), r"entry of tensor 'dense/bias'"),
    (lambda h: h['dense/bias'].__setitem__('shape', ['64']), r"entry of tensor 'dense/bias'"),
    (lambda h: h.__setitem__('dense/bias', 'x'), r"entry of tensor 'dense/bias'"),
    (lambda h: h.__setitem__('__metadata__', ['x']), r"'__metadata__' is not a dict of strings"),
    (lambda h: h['__metadata__'].__setitem__('qarray', '{"format_version": 2,'), r"'qarray' header entry is corrupt"),
    (lambda h: h['__metadata__'].__setitem__('qarray', '{"format_version": 4}'), r"unsupported .*format_version 4"),
])
def test_corrupt_safetensors_header_raises_checkpoint_error(tmp_path, edit, match):
    f = tmp_path / 'm.safetensors'
    qio.save_safetensors(f, _params())
    n, header, data = read_st(f)
    edit(header)
    write_st(f, header, data[8 + n:])
    with pytest.raises(qio.CheckpointError, match=match) as info:
        qio.load_safetensors(f)
    assert str(f) in str(info.value)


@pytest.mark.parametrize('header', [b'[1, 2]', b'{"a": 1', b'\xff\xfe{}'])
def test_unparsable_safetensors_header_names_the_file(tmp_path, header):
    f = tmp_path / 'm.safetensors'
    f.write_bytes(len(header).to_bytes(8, 'little') + header)
    with pytest.raises(qio.CheckpointError, match=rf"'{f}' has a corrupt safetensors header"):
        qio.load_safetensors(f)


def _strip_checksums(meta: dict) -> None:
    meta.pop('checksums')
    meta.pop('metadata_checksum')
    meta['format_version'] = 1


def test_old_checkpoints_load_with_a_warning(tmp_path):
    params = _asym_params()
    f = tmp_path / 'old.safetensors'
    qio.save_safetensors(f, params)
    _tamper_qarray_meta(f, _strip_checksums)
    qio.save(tmp_path / 'c', params)
    mf = tmp_path / 'c' / 'qarray_metadata' / 'metadata'
    meta = json.loads(mf.read_text())
    _strip_checksums(meta)
    mf.write_text(json.dumps(meta))
    for load, path in [(qio.load_safetensors, f), (qio.restore, tmp_path / 'c')]:
        with pytest.warns(UserWarning, match=r"written without checksums .*format_version 1.*unverified"):
            assert_bit_exact(load(path, params), params)
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            assert_bit_exact(load(path, params, verify=False), params)


def test_checksums_missing_from_a_new_checkpoint_are_refused(tmp_path):
    f = tmp_path / 'm.safetensors'
    qio.save_safetensors(f, _params())
    _tamper_qarray_meta(f, lambda m: m.pop('checksums'))
    with pytest.raises(qio.CheckpointError, match=r"no 'metadata_checksum' or 'checksums' entry"):
        qio.load_safetensors(f)
    qio.save_safetensors(f, _params())
    _tamper_qarray_meta(f, lambda m: m['checksums'].__setitem__('algorithm', 'md5'))
    with pytest.raises(qio.CheckpointError, match=r"checksums use 'sha256'/'md5'; this qarray checks 'sha256' only"):
        qio.load_safetensors(f)


def test_checksum_record_missing_for_a_tensor_names_the_param(tmp_path):
    """Re-sealed metadata without one tensor's digest (not a plain accident, but still refused)."""
    from qarray.io._checksum import seal
    f = tmp_path / 'm.safetensors'
    qio.save_safetensors(f, _params())

    def edit(meta):
        del meta['checksums']['params']['dense/kernel']['scale']
        meta.update(seal(meta))
    _tamper_qarray_meta(f, edit)
    with pytest.raises(qio.CheckpointError, match=r"param 'dense/kernel': .* has no sha256 checksum for its scale"):
        qio.load_safetensors(f)


# Orbax stores each array with zarr (zstd) in OCDBT data files; tensorstore checks the b-tree nodes with
# CRC-32C but not the chunk data. int8 codes of uniform values do not compress, so zstd stores them verbatim.
def _incompressible():
    w = jax.random.uniform(jax.random.key(5), (128, 256), minval=-1, maxval=1)
    return {'dense': {'kernel': qarray.quantize(w, 'int8', tiles=32), 'bias': jnp.arange(256, dtype=jnp.float32)}}


def _flip_in_data_files(ckpt: Path, needle: bytes) -> Path:
    """Flip one bit inside ``needle``'s bytes where a data file stores them; the file changed."""
    hits = [(p, p.read_bytes().find(needle)) for p in (ckpt / 'arrays').rglob('*') if p.is_file()]
    hits = [(p, i) for p, i in hits if i >= 0]
    assert len(hits) == 1 and hits[0][0].parent.name == 'd', hits
    flip(hits[0][0], hits[0][1] + len(needle) // 2)
    return hits[0][0]


def test_orbax_flipped_data_byte_names_param_and_part(tmp_path):
    params = _incompressible()
    qio.save(tmp_path / 'c', params)
    q = np.asarray(params['dense']['kernel'].qvalue)
    _flip_in_data_files(tmp_path / 'c', raw_bytes(q)[:4096])
    with pytest.raises(qio.CheckpointError, match=r"param 'dense/kernel': its qvalue does not match its sha256 "
                                                  r"checksum in checkpoint"):
        qio.restore(tmp_path / 'c', params)
    got = qio.restore(tmp_path / 'c', params, verify=False)  # Orbax alone: loads silently, one byte off
    assert sum(a != b for a, b in zip(raw_bytes(got['dense']['kernel'].qvalue), raw_bytes(q))) == 1


def test_orbax_damaged_data_files_never_load_silently_wrong(tmp_path):
    """A flipped bit at several places of every data file: an error naming params, or the exact saved bytes.

    (Some bytes are never read, e.g. the per-process b-tree nodes once the root b-tree is written.)
    """
    params = _params()
    qio.save(tmp_path / 'c', params)
    files = sorted(p for p in (tmp_path / 'c' / 'arrays').rglob('*') if p.is_file() and p.parent.name == 'd')
    assert len(files) >= 2
    errors = 0
    for p in files:
        data = p.read_bytes()
        for pos in (len(data) // 4, len(data) // 2, 3 * len(data) // 4):
            flip(p, pos)
            try:
                got = qio.restore(tmp_path / 'c', params)
            except qio.CheckpointError as e:
                assert re.search(r"param 'dense/(kernel|bias)'", str(e)), str(e)
                errors += 1
            else:
                assert_bit_exact(got, params)
            p.write_bytes(data)
    assert errors > 0
    assert_bit_exact(qio.restore(tmp_path / 'c', params), params)


def test_orbax_tampered_metadata_names_the_checkpoint(tmp_path):
    params = _params('int4', tiles=32)
    qio.save(tmp_path / 'c', params)
    mf = tmp_path / 'c' / 'qarray_metadata' / 'metadata'
    meta = json.loads(mf.read_text())
    meta['params']['dense/kernel']['qtype'] = 'nf4'
    mf.write_text(json.dumps(meta))
    with pytest.raises(qio.CheckpointError, match=r"checkpoint '.*c': the qarray metadata does not match its sha256"):
        qio.restore(tmp_path / 'c', params)
    assert qio.restore(tmp_path / 'c', verify=False)['dense']['kernel'].qtype.name == 'nf4'


def test_orbax_truncated_data_file_names_the_param(tmp_path):
    params = _incompressible()
    qio.save(tmp_path / 'c', params)
    needle = raw_bytes(params['dense']['kernel'].qvalue)[:4096]
    p = next(p for p in (tmp_path / 'c' / 'arrays').rglob('*') if p.is_file() and needle in p.read_bytes())
    data = p.read_bytes()
    p.write_bytes(data[:data.find(needle) + 2000])  # cut inside the kernel's values
    with pytest.raises(qio.CheckpointError, match=r"^param '.*: could not read the arrays of checkpoint") as info:
        qio.restore(tmp_path / 'c', params)
    assert 'dense/kernel' in str(info.value).split(': could not read')[0]  # named, maybe with others in that file


def test_orbax_float64_leaf_is_checked_as_jax_restores_it(tmp_path):
    """Without jax_enable_x64 JAX restores float64/int64 as 32-bit: the 32-bit form has its own digest."""
    from qarray.io._checksum import seal
    lossy, big = np.linspace(0, 1, 7), np.arange(5, dtype=np.int64) * 3  # 1/6 etc. are not float32 values
    qio.save(tmp_path / 'c', {'lossy': lossy, 'big': big, 'lr': 0.1})
    sums = qio.read_metadata(tmp_path / 'c')['checksums']['params']
    assert sums['lossy']['array'] == {'digest': sha256(lossy), 'x32': {'dtype': 'float32',
                                                                        'digest': sha256(lossy.astype(np.float32))}}
    assert sums['big']['array']['x32'] == {'dtype': 'int32', 'digest': sha256(big.astype(np.int32))}
    got = qio.restore(tmp_path / 'c')
    assert raw_bytes(got['lossy']) == raw_bytes(lossy.astype(np.float32)) and got['lossy'].dtype == jnp.float32
    assert float(got['lr']) == np.float32(0.1)
    # without that digest (re-sealed metadata), the 32-bit values cannot be checked: say why
    mf = tmp_path / 'c' / 'qarray_metadata' / 'metadata'
    meta = json.loads(mf.read_text())
    del meta['checksums']['params']['lossy']['array']['x32']
    mf.write_text(json.dumps(seal(meta)))
    with pytest.raises(qio.CheckpointError, match=r"param 'lossy': its values were saved as float64 and restored "
                                                  r"as float32 .*no sha256 checksum of that form.*jax_enable_x64"):
        qio.restore(tmp_path / 'c')
    assert raw_bytes(qio.restore(tmp_path / 'c', verify=False)['lossy']) == raw_bytes(lossy.astype(np.float32))


@pytest.mark.parametrize('leaf,match', [
    ('gpt-2', r"param 'name': leaf is a builtins.str \('gpt-2'\), which cannot be saved; every leaf must be a "
              r"jax.Array, a numpy array or numpy scalar of a bool or numeric dtype"),
    (np.array(['a', 'b']), r"param 'name': leaf is an array of dtype <U1, which cannot be saved"),
    (object(), r"param 'name': leaf is a builtins.object"),
    (2 ** 80, r"param 'name': leaf is a builtins.int"),
    (jax.ShapeDtypeStruct((2,), jnp.float32), r"param 'name': leaf is an abstract ShapeDtypeStruct"),
])
@pytest.mark.parametrize('save', ['safetensors', 'orbax'])
def test_non_array_leaf_is_refused_naming_it(tmp_path, leaf, match, save):
    tree = {'w': jnp.ones(2), 'name': leaf}
    with pytest.raises(TypeError, match=match):
        if save == 'safetensors':
            qio.save_safetensors(tmp_path / 'm.safetensors', tree)
        else:
            qio.save(tmp_path / 'c', tree)
    assert not (tmp_path / 'm.safetensors').exists() and not (tmp_path / 'c').exists()


def test_abstract_qarray_and_bad_metadata_are_refused(tmp_path):
    abstract = jax.eval_shape(lambda: qarray.quantize(jnp.ones((4, 8)), 'int4'))
    with pytest.raises(TypeError, match=r"param 'w': the QArray's qvalue is an abstract ShapeDtypeStruct"):
        qio.save_safetensors(tmp_path / 'm.safetensors', {'w': abstract})
    with pytest.raises(TypeError, match=r"metadata must map str to str.*\('step', 3\)"):
        qio.save_safetensors(tmp_path / 'm.safetensors', {'w': jnp.ones(2)}, metadata={'step': 3})


def test_scalar_and_empty_leaves_round_trip(tmp_path):
    tree = {'step': np.int32(7), 'scale': jnp.float32(0.5), 'flag': np.bool_(True), 'empty': jnp.zeros((0, 3)),
            'lr': 0.25, 'fp8': jnp.asarray(1.5, jnp.float8_e4m3fn)}
    qio.save_safetensors(tmp_path / 'm.safetensors', tree)
    got = qio.load_safetensors(tmp_path / 'm.safetensors')
    assert got['step'].shape == () and int(got['step']) == 7 and got['empty'].shape == (0, 3)
    assert got['fp8'].dtype == jnp.float8_e4m3fn and float(got['fp8']) == 1.5
    assert float(got['lr']) == 0.25 and bool(got['flag'])


# -------------------------------------------------------------------------------- docs/scaling.md example
def test_docs_checkpoint_example_runs_as_written_twice(tmp_path, monkeypatch):
    text = (ROOT / 'docs' / 'scaling.md').read_text()
    section = text[text.index('## Checkpoints'):]
    code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
    assert 'force=True' in code and 'shardings=...' not in code
    monkeypatch.chdir(tmp_path)
    results = []
    for _ in range(2):  # the second run meets the existing checkpoint
        ns: dict = {}
        exec(compile(code, 'docs/scaling.md', 'exec'), ns)
        results.append(ns['qparams'])
    assert_bit_exact(results[1], results[0])
    assert results[0]['dense']['kernel'].qvalue.sharding.spec == jax.sharding.PartitionSpec(None, 'model')
    assert (tmp_path / 'checkpoints' / 'step_100').is_dir() and (tmp_path / 'model.safetensors').is_file()


# -------------------------------------------------------------------------------- sharded saves (8 devices)
@pytest.mark.slow
def test_sharded_checksums_on_8_device_mesh(tmp_path):
    """tests/io/sharded_cases.py in a subprocess with 8 fake CPU devices (the flag must not leak here)."""
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-o', 'python_files=*_cases.py',
           '-o', 'addopts=', '--basetemp', str(tmp_path / 'cases'), str(ROOT / 'tests' / 'io' / 'sharded_cases.py')]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert ' passed' in proc.stdout and 'skipped' not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_multiprocess_sharded_checksums(tmp_path):
    """2 processes x 2 CPU devices (tests/io/multiprocess_worker.py): each hashes the shards it writes, the
    metadata holds all of them; damage in one process's shard fails the restore on both processes."""
    import socket
    with socket.socket() as s:
        s.bind(('localhost', 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu')
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
    worker = str(ROOT / 'tests' / 'io' / 'multiprocess_worker.py')
    procs = [subprocess.Popen([sys.executable, worker, str(i), str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), '\n'.join(o[-3000:] for o in outs)
    results = [json.loads((tmp_path / f'result_{i}.json').read_text()) for i in range(2)]
    for r in results:
        assert (r['devices'], r['local_devices'], r['fully_addressable']) == (4, 2, False)
        assert r['stored_shards'] == r['expected_shards']       # all 4 shards, hashed by the 2 writers
        assert not r['has_whole_digest']                        # no process holds the whole array
        assert r['same_layout_warnings'] == [] and r['same_layout_exact'] and r['other_layout_exact']
        assert len(r['other_layout_warnings']) == 1
        assert "could not be verified completely" in r['other_layout_warnings'][0]
        assert re.match(r"param 'k': its qvalue \(shard \[32:64, 64:128\] as saved\) does not match its sha256",
                        r['damaged']), r['damaged']
    assert [r['victim_is_mine'] for r in results] == [False, True]
    assert results[0]['damaged'].endswith('(found by process 1)')


# -------------------------------------------------------------------------------- quantized scales and offsets
def _kquant_like(rows: int = 8, cols: int = 8192, seed: int = 0) -> qarray.QArray:
    """A QArray shaped like a GGUF Q4_K tensor: uint4 codes, a uint6 QArray scale and a uint6 QArray zero point
    (an offset in value space) under float16 super-scales; random codes (incompressible, so Orbax stores them
    verbatim)."""
    rng = np.random.default_rng(seed)
    sub = cols // 32

    def inner(lo):
        return qarray.QArray(rng.integers(0, 256, (rows, sub * 6 // 8), dtype=np.uint8),
                             rng.uniform(lo, 2 * lo, (rows, cols // 256)).astype(np.float16), qtype='uint6',
                             packed_axis=-1, packed_length=sub)
    return qarray.QArray(rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8), inner(1e-3), inner(1e-2),
                         qtype='uint4', packed_axis=-1, packed_length=cols)


@pytest.fixture(scope='module')
def nested_tree():
    w = jax.random.normal(jax.random.key(4), (8, 64))
    rng = np.random.default_rng(1)
    q41 = qarray.QArray(rng.integers(0, 256, (8, 32), dtype=np.uint8), np.full((8, 2), 0.25, np.float16),
                        np.full((8, 2), 1.5, np.float16), qtype='uint4', packed_axis=-1, packed_length=64)
    return {'mxfp4': qarray.quantize(w, 'mxfp4'), 'mxfp8': qarray.quantize(w, 'mxfp8'),
            'nvfp4': qarray.quantize(w, 'nvfp4'), 'nf4_dq': qarray.quantize(w, 'nf4', tiles=16, scale_qtype='int8'),
            'kq': _kquant_like(), 'q41': q41, 'b': jnp.arange(3.)}


def _by_path(q) -> dict:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(q)[0]}


@pytest.mark.parametrize('how', ['orbax', 'safetensors'])
def test_nested_qarrays_round_trip_bit_exact(nested_tree, tmp_path, how):
    if how == 'orbax':
        qio.save(tmp_path / 'c', nested_tree)
        meta = qio.read_metadata(tmp_path / 'c')
        loads = [qio.restore(tmp_path / 'c', nested_tree), qio.restore(tmp_path / 'c'),
                 qio.restore(tmp_path / 'c', jax.eval_shape(lambda t: t, nested_tree))]
    else:
        qio.save_safetensors(tmp_path / 'm.safetensors', nested_tree)
        meta = qio.read_safetensors_metadata(tmp_path / 'm.safetensors')
        loads = [qio.load_safetensors(tmp_path / 'm.safetensors', nested_tree),
                 qio.load_safetensors(tmp_path / 'm.safetensors')]
        names = set(qio.tensor_names(tmp_path / 'm.safetensors'))
        assert {'kq.zero_point.qvalue', 'kq.zero_point.scale', 'nvfp4.scale.scale', 'nf4_dq.scale.zero_point'} <= names
        assert {'mxfp4.scale', 'mxfp8.scale', 'nvfp4.scale.qvalue'} <= set(meta['raw_tensors'])  # e8m0 / e4m3 bytes
    for got in loads:
        assert_bit_exact(got, nested_tree)
        for key in ('kq', 'nvfp4', 'nf4_dq', 'q41'):
            for part in ('scale', 'zero_point'):
                assert isinstance(getattr(got[key], part), qarray.QArray) == isinstance(
                    getattr(nested_tree[key], part), qarray.QArray)
            assert np.array_equal(np.asarray(qarray.dequantize(got[key])),
                                  np.asarray(qarray.dequantize(nested_tree[key])))
    assert meta['format_version'] == 3  # nested parts: older qarray refuses the file instead of misreading it
    p = meta['params']
    # every level records its format, packing and dtype
    assert p['kq']['zero_point']['kind'] == 'qarray' and p['kq']['zero_point']['qtype'] == 'uint6'
    assert p['kq']['zero_point']['packed_axis'] == -1 and p['kq']['zero_point']['packed_length'] == 256
    assert p['kq']['zero_point']['scale'] == {'shape': [8, 32], 'dtype': 'float16'}
    assert p['nvfp4']['scale']['qtype'] == 'float8_e4m3fn' and p['nvfp4']['scale']['qvalue']['dtype'] == 'float8_e4m3fn'
    assert p['mxfp4']['scale'] == {'shape': [8, 2], 'dtype': 'float8_e8m0fnu'}
    assert p['q41']['zero_point'] == {'shape': [8, 2], 'dtype': 'float16'}
    # one digest per stored array of every level: the SHA-256 of its bytes
    sums = meta['checksums']['params']
    for key in ('kq', 'nvfp4', 'nf4_dq'):
        want = {k.lstrip('.'): sha256(v) for k, v in _by_path(nested_tree[key]).items()}
        assert {part: r['digest'] for part, r in sums[key].items()} == want


def _flip_tensor(f, tname):
    a, b = tensor_range(f, tname)
    flip(f, (a + b) // 2)


@pytest.mark.parametrize('tname,part', [('kq.zero_point.qvalue', 'zero_point.qvalue'),
                                        ('kq.scale.scale', 'scale.scale'), ('nvfp4.scale.scale', 'scale.scale'),
                                        ('mxfp4.scale', 'scale')])
def test_damaged_nested_part_is_named_safetensors(nested_tree, tmp_path, tname, part):
    f = tmp_path / 'm.safetensors'
    qio.save_safetensors(f, nested_tree)
    _flip_tensor(f, tname)
    param = tname.split('.')[0]
    with pytest.raises(qio.CheckpointError, match=rf"param '{param}': its {re.escape(part)} does not match its sha256"):
        qio.load_safetensors(f, nested_tree)


def test_damaged_nested_part_is_named_orbax(tmp_path):
    tree = {'kq': _kquant_like(seed=3)}
    qio.save(tmp_path / 'c', tree)
    _flip_in_data_files(tmp_path / 'c', raw_bytes(tree['kq'].zero_point.qvalue)[:1024])
    with pytest.raises(qio.CheckpointError, match=r"param 'kq': its zero_point.qvalue does not match its sha256"):
        qio.restore(tmp_path / 'c', tree)


def test_nested_metadata_mismatch_names_param_and_level(tmp_path):
    w = jax.random.normal(jax.random.key(4), (8, 64))
    qio.save_safetensors(tmp_path / 'm.safetensors', {'w': qarray.quantize(w, 'nf4', tiles=16, scale_qtype='int8')})
    for target, match in [
            (qarray.quantize(w, 'nf4', tiles=16, scale_qtype='int4'),
             r"param 'w': .*scale: int8 codes.*\(scale.qtype: stored 'int8' != expected 'int4'\); the checkpoint was "
             r"made with different quantization rules \(in the quantized scale\)"),
            (qarray.quantize(w, 'nf4', tiles=16),
             r"param 'w': .*\(scale: stored a int8 QArray of shape \(8, 4\) != expected \{'shape': \[8, 4\], 'dtype': "
             r"'float32'\}\); one side stores quantized scales")]:
        with pytest.raises(qio.CheckpointError, match=match):
            qio.load_safetensors(tmp_path / 'm.safetensors', {'w': target})
    # a hand-edited nested field (re-sealed, so only the comparison with the target can catch it)
    from qarray.io._checksum import seal

    def edit(meta):
        meta['params']['w']['scale']['dtype'] = 'bfloat16'
        meta.update(seal(meta))
    _tamper_qarray_meta(tmp_path / 'm.safetensors', edit)
    with pytest.raises(qio.CheckpointError, match=r"param 'w': .*scale.dtype: stored 'bfloat16' != expected 'float32'"):
        qio.load_safetensors(tmp_path / 'm.safetensors', {'w': qarray.quantize(w, 'nf4', tiles=16, scale_qtype='int8')})


def test_nested_restore_onto_a_mesh_follows_the_scale_sharding(nested_tree, tmp_path):
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((1,), ('model',))
    tree = {'nvfp4': nested_tree['nvfp4'], 'kq': nested_tree['kq']}
    qio.save(tmp_path / 'c', tree)
    sh = {k: NamedSharding(mesh, P('model', None)) for k in tree}
    got = qio.restore(tmp_path / 'c', tree, shardings=sh)
    assert_bit_exact(got, tree)
    assert got['kq'].zero_point.scale.sharding.spec == P('model', None)   # rows follow the float array's rows
    assert got['nvfp4'].scale.scale.sharding.spec == P(None, None)       # the per-tensor scale: replicated
