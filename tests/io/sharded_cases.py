"""Checksums of sharded checkpoints on a fake 8-device CPU mesh.

Run by tests/test_checkpoint.py (test_sharded_checksums_on_8_device_mesh) in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8. By hand:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -o python_files='*_cases.py' \
      tests/io/sharded_cases.py
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import qarray
from qarray import io as qio
from qarray import sharding as qs

if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8", allow_module_level=True)


def sha256(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(a)).view(np.uint8).tobytes()).hexdigest()


def region(index, shape) -> tuple:
    return tuple(tuple(s.indices(n)[:2]) for s, n in zip(index, shape))


def shard_table(x) -> dict:
    """{region: sha256} of each distinct shard of ``x``, computed here from the device data."""
    return {region(s.index, x.shape): sha256(s.data) for s in x.addressable_shards}


def stored(rec) -> dict:
    return {tuple(tuple(ab) for ab in s['index']): s['digest'] for s in rec.get('shards', [])}


def leaves_bytes(tree):
    return [np.asarray(jax.device_get(x)).view(np.uint8).tobytes() for x in jax.tree.leaves(tree)]


def params():
    """int8 codes of uniform values (incompressible: stored verbatim), tiled scales, a bias replicated over 'data'."""
    m = jax.make_mesh((2, 4), ('data', 'model'))
    w = np.random.default_rng(0).uniform(-1, 1, (128, 256)).astype(np.float32)
    k = qs.shard(_quantized(w), NamedSharding(m, P('data', 'model')))  # values and tiled scales both sharded
    return {'k': k, 'bias': jax.device_put(np.arange(256, dtype=np.float32), NamedSharding(m, P('model'))),
            'rep': jax.device_put(np.ones(8, np.float32), NamedSharding(m, P()))}


_CACHE: dict = {}


def _quantized(w):
    if 'q' not in _CACHE:  # quantize once, on one device (compiling for the mesh is the slow part here)
        _CACHE['q'] = jax.device_get(qarray.quantize(jax.device_put(w, jax.devices()[0]), 'int8', tiles=32))
    return _CACHE['q']


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    p = params()
    path = tmp_path_factory.mktemp('sharded') / 'ckpt'
    qio.save(path, p)
    return p, path


def test_each_shard_as_written_and_the_whole_are_recorded(saved):
    p, path = saved
    sums = qio.read_metadata(path)['checksums']['params']
    k = p['k']
    assert k.qvalue.sharding.spec == P('data', 'model') and k.scale.sharding.spec == P('data', 'model')
    for part in ('qvalue', 'scale'):
        x = getattr(k, part)
        rec = sums['k'][part]
        assert rec['digest'] == sha256(x)                  # the whole logical array
        assert stored(rec) == shard_table(x)              # every distinct shard, by index
        assert len(rec['shards']) == 8
        assert sum(np.prod([b - a for a, b in r]) for r in stored(rec)) == x.size  # they tile the array
    assert stored(sums['bias']['array']) == shard_table(p['bias']) and len(sums['bias']['array']['shards']) == 4
    assert sums['rep']['array'] == {'digest': sha256(p['rep'])}  # replicated: one region, the whole


@pytest.mark.parametrize('layout', ['same', 'other_mesh', 'one_device', 'flat'])
def test_restore_onto_any_layout_verifies_quietly(saved, layout):
    p, path = saved
    if layout == 'same':
        sh = None
    elif layout == 'one_device':
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        sh = {'k': one, 'bias': one, 'rep': one}
    else:
        m = jax.make_mesh((4, 2), ('x', 'y')) if layout == 'other_mesh' else jax.make_mesh((8,), ('z',))
        spec = P('y', 'x') if layout == 'other_mesh' else P(None, 'z')
        sh = {'k': NamedSharding(m, spec), 'bias': NamedSharding(m, P(spec[1])), 'rep': NamedSharding(m, P())}
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        got = qio.restore(path, p, shardings=sh)
    assert leaves_bytes(got) == leaves_bytes(p)


def _data_files(path: Path):
    return [f for f in (path / 'arrays').rglob('*') if f.is_file() and f.parent.name == 'd']


@pytest.mark.parametrize('layout', ['same', 'other_mesh'])
def test_flipped_byte_names_param_part_and_shard(tmp_path, layout):
    p = params()
    qio.save(tmp_path / 'c', p)
    shard = next(s for s in p['k'].qvalue.addressable_shards if region(s.index, (128, 256)) == ((64, 128), (128, 192)))
    needle = np.asarray(shard.data).tobytes()
    hits = [(f, f.read_bytes().find(needle)) for f in _data_files(tmp_path / 'c')]
    hits = [(f, i) for f, i in hits if i >= 0]
    assert len(hits) == 1, hits
    f, i = hits[0]
    data = bytearray(f.read_bytes())
    data[i + 1000] ^= 0x04
    f.write_bytes(bytes(data))
    sh = None
    if layout == 'other_mesh':  # the saved region is rebuilt from several restored shards
        m = jax.make_mesh((4, 2), ('x', 'y'))
        sh = {'k': NamedSharding(m, P('y', 'x')), 'bias': NamedSharding(m, P('x')), 'rep': NamedSharding(m, P())}
    with pytest.raises(qio.CheckpointError, match=r"param 'k': its qvalue \(shard \[64:128, 128:192\] as saved\) "
                                                  r"does not match its sha256 checksum"):
        qio.restore(tmp_path / 'c', p, shardings=sh)
    got = qio.restore(tmp_path / 'c', p, shardings=sh, verify=False)
    diff = np.asarray(got['k'].qvalue) != np.asarray(p['k'].qvalue)
    assert diff.sum() == 1 and np.argwhere(diff)[0][0] in range(64, 128)


def test_sharded_safetensors_load_checks_the_file(tmp_path):
    p = params()
    f = tmp_path / 'm.safetensors'
    qio.save_safetensors(f, p)
    m = jax.make_mesh((8,), ('z',))
    sh = {'k': NamedSharding(m, P('z', None)), 'bias': NamedSharding(m, P('z')), 'rep': NamedSharding(m, P())}
    assert leaves_bytes(qio.load_safetensors(f, p, shardings=sh)) == leaves_bytes(p)
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], 'little')
    a, b = json.loads(data[8:8 + n])['k.scale']['data_offsets']
    data[8 + n + b - 1] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(qio.CheckpointError, match=r"param 'k': its scale does not match its sha256 checksum"):
        qio.load_safetensors(f, p, shardings=sh)
