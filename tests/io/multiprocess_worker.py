"""One process of a 2-process CPU job (2 devices each) that saves and restores a sharded checkpoint.

Started twice by tests/test_checkpoint.py (test_multiprocess_sharded_checksums):

  python tests/io/multiprocess_worker.py PROCESS_ID PORT WORKDIR

with XLA_FLAGS=--xla_force_host_platform_device_count=2. Each process writes
WORKDIR/result_<id>.json: what it observed, for the parent test to check.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import jax

pid, port, workdir = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=pid, initialization_timeout=60)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import qarray  # noqa: E402
from qarray import io as qio  # noqa: E402


def sha256(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).tobytes()).hexdigest()


def region(index, shape):
    return [list(s.indices(n)[:2]) for s, n in zip(index, shape)]


result: dict = {'process': pid, 'devices': jax.device_count(), 'local_devices': jax.local_device_count()}
devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 2), ('data', 'model'))  # 'data' = the process
w = np.asarray(jax.random.uniform(jax.random.key(0), (64, 128), minval=-1, maxval=1))  # same on both processes
ref = qarray.quantize(w, 'int8', channelwise_axes=(0,))                                  # host reference
spec = NamedSharding(mesh, P('data', 'model'))
qv = jax.make_array_from_callback(ref.qvalue.shape, spec, lambda i: np.asarray(ref.qvalue)[i])
sc = jax.make_array_from_callback(ref.scale.shape, NamedSharding(mesh, P('data', None)),
                                  lambda i: np.asarray(ref.scale)[i])
params = {'k': qarray.QArray(qv, sc, qtype='int8', dtype=ref.dtype)}
result['fully_addressable'] = qv.is_fully_addressable

qio.save(workdir / 'c', params)
multihost_utils.sync_global_devices('saved')
rec = qio.read_metadata(workdir / 'c')['checksums']['params']['k']['qvalue']
result['has_whole_digest'] = 'digest' in rec
result['stored_shards'] = {json.dumps(s['index']): s['digest'] for s in rec['shards']}
result['expected_shards'] = {json.dumps([[a, b], [c, d]]): sha256(np.asarray(ref.qvalue)[a:b, c:d])
                             for a, b in ((0, 32), (32, 64)) for c, d in ((0, 64), (64, 128))}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    got = qio.restore(workdir / 'c', params)
result['same_layout_warnings'] = [str(c.message) for c in caught]
result['same_layout_exact'] = all(
    np.array_equal(np.asarray(s.data), np.asarray(ref.qvalue)[s.index]) for s in got['k'].qvalue.addressable_shards)
result['my_regions'] = [json.dumps(region(s.index, qv.shape)) for s in qv.addressable_shards]

# Another layout: rows over ('model', 'data'), so each process holds rows 0:16 + 32:48 (or 16:32 + 48:64), and
# no process holds all of any saved shard (32 rows each): nothing can be checked, which every process says.
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    got = qio.restore(workdir / 'c', params, shardings={'k': NamedSharding(mesh, P(('model', 'data'), None))})
result['other_layout_warnings'] = [str(c.message) for c in caught]
result['other_layout_exact'] = all(
    np.array_equal(np.asarray(s.data), np.asarray(ref.qvalue)[s.index]) for s in got['k'].qvalue.addressable_shards)

# Damage one shard written by process 1 (each process writes into its own ocdbt.process_<id>/d files).
victim = [[32, 64], [64, 128]]
if pid == 1:
    needle = np.asarray(ref.qvalue)[32:64, 64:128].tobytes()
    hits = [(f, f.read_bytes().find(needle)) for f in (workdir / 'c' / 'arrays').rglob('*') if f.is_file()]
    hits = [(f, i) for f, i in hits if i >= 0]
    result['victim_files'] = [str(f.relative_to(workdir / 'c')) for f, _ in hits]
    f, i = hits[0]
    data = bytearray(f.read_bytes())
    data[i + 100] ^= 0x01
    f.write_bytes(bytes(data))
multihost_utils.sync_global_devices('damaged')
try:
    qio.restore(workdir / 'c', params)
    result['damaged'] = 'loaded'
except qio.CheckpointError as e:
    result['damaged'] = str(e)
result['victim_is_mine'] = json.dumps(victim) in result['my_regions']
(workdir / f'result_{pid}.json').write_text(json.dumps(result))
multihost_utils.sync_global_devices('done')
