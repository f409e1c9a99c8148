"""qarray.sharding: the layout rule (in process), and every mesh case on a fake 8-device CPU mesh.

The mesh cases live in tests/sharding/mesh_cases.py and run in ONE subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=8, so the 8 devices never
leak into this (1-device) process. Each case is reported here as its own test.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import qarray
from qarray import sharding as qs

ROOT = Path(__file__).resolve().parent.parent
CASES = Path(__file__).resolve().parent / 'sharding' / 'mesh_cases.py'
SIZES = {'data': 2, 'model': 4}


# -------------------------------------------------------------------------------- the rule, no devices needed
def specs(shape, spec, qtype, **kw):
    q = jax.eval_shape(lambda: qarray.quantize(jnp.zeros(shape), qtype, **kw))
    return qs.partition_specs(q, spec, SIZES)


@pytest.mark.parametrize('qtype,kw,vspec,sspec', [
    ('int8', dict(), P('data', 'model'), P(None, None)),                             # shared scale: replicated
    ('int8', dict(channelwise_axes=(1,)), P('data', 'model'), P(None, 'model')),     # per channel: with values
    ('int4', dict(tiles=128), P('data', 'model'), P('data', 'model')),               # 4 tiles / 4 shards
    ('int4', dict(tiles=256), P('data', 'model'), P('data', None)),                  # 2 tiles / 4 shards
    ('nf4', dict(tiles={0: 8}), P('data', 'model'), P('data', None)),
    ('uint4', dict(calibration='minmax', channelwise_axes=(0,)), P('data', 'model'), P('data', None)),
])
def test_rule_for_scales(qtype, kw, vspec, sspec):
    s = specs((16, 512), P('data', 'model'), qtype, **kw)
    assert (s.qvalue, s.scale) == (vspec, sspec)
    assert s.zero_point == (sspec if kw.get('calibration') == 'minmax' else None)


@pytest.mark.parametrize('n,qtype,sharded', [
    (512, 'int4', True),   # 128 values x 4 bits per shard = 64 bytes
    (8, 'int4', True),     # 2 values x 4 bits = 1 byte
    (4, 'int4', False),    # 1 value x 4 bits: half a byte
    (32, 'int3', True),    # 8 x 3 bits = 3 bytes
    (36, 'int3', False),   # 9 x 3 bits = 27 bits
    (16, 'int2', True),    # 4 x 2 bits = 1 byte
    (12, 'int2', False),   # 3 x 2 bits = 6 bits
    (12, 'int8', True),    # not packed
])
def test_rule_for_packed_axis(n, qtype, sharded):
    s = specs((4, n), P(None, 'model'), qtype)
    assert s.qvalue == P(None, 'model' if sharded else None)


def test_packed_axis_elsewhere_keeps_last_axis_sharded():
    s = specs((36, 64), P('data', 'model'), 'int3', pack_axis=0)  # 18 values x 3 bits per data shard: no
    assert s.qvalue == P(None, 'model')


def test_tree_shardings_maps_float_specs_onto_qarrays():
    params = {'w': qarray.quantize(jnp.ones((4, 8)), 'int4', tiles=4), 'b': jnp.ones(8)}
    out = qs.tree_shardings(params, {'w': P('data', 'model'), 'b': P('model')}, SIZES)
    assert out['b'] == P('model')
    # 2 int4 values (1 byte) per model shard: packed axis stays sharded; 2 tiles over 4 shards: replicated
    assert (out['w'].qvalue, out['w'].scale) == (P('data', 'model'), P('data', None))


def test_single_device_mesh_quantize_and_shard():
    m = jax.make_mesh((1, 1), ('data', 'model'))
    x = jax.device_put(jnp.linspace(-1, 1, 64).reshape(8, 8), NamedSharding(m, P('data', 'model')))
    q = qs.quantize(x, 'int4', channelwise_axes=(1,))
    ref = qarray.quantize(jnp.linspace(-1, 1, 64).reshape(8, 8), 'int4', channelwise_axes=(1,))
    assert (q.qvalue == ref.qvalue).all() and (q.scale == ref.scale).all()
    assert q.scale.sharding.spec == P(None, 'model')
    assert qs.quantize(jnp.ones(4), 'int8').scale.shape == (1,)  # unsharded input: plain quantize


def test_errors_name_the_argument():
    q = qarray.quantize(jnp.ones((4, 8)), 'int8')
    with pytest.raises(TypeError, match='q must be a QArray'):
        qs.partition_specs(jnp.ones(3), P(), SIZES)
    with pytest.raises(ValueError, match="mesh axis 'pipe'"):
        qs.partition_specs(q, P('pipe'), SIZES)
    with pytest.raises(ValueError, match='spec .* has 3 entries'):
        qs.partition_specs(q, P(None, None, None), SIZES)
    with pytest.raises(TypeError, match='sharding must be a jax.sharding.NamedSharding'):
        qs.shardings(q, P('data'))
    with pytest.raises(TypeError, match='sharding must be a jax.sharding.NamedSharding or None'):
        qs.quantize(jnp.ones(4), 'int8', sharding='data')
    with pytest.raises(ValueError, match='pass mesh='):
        qs.tree_shardings({'w': q}, {'w': P()})
    with pytest.raises(TypeError, match='leaves must be NamedSharding or PartitionSpec'):
        qs.tree_shardings({'w': q}, {'w': 'data'}, SIZES)


# -------------------------------------------------------------------------------- 8-device cases (subprocess)
def _case_names() -> list[str]:
    tree = ast.parse(CASES.read_text())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith('test_')]


@pytest.fixture(scope='module')
def mesh_results(tmp_path_factory):
    report = tmp_path_factory.mktemp('mesh') / 'report.xml'
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
    cmd = [sys.executable, '-m', 'pytest', '-q', '-n', '0', '-p', 'no:cacheprovider', '-o', 'python_files=*_cases.py',
           f'--junitxml={report}', str(CASES)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if not report.exists():
        pytest.fail(f"mesh subprocess produced no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    results: dict[str, list[tuple[str, str]]] = {}
    for case in ET.parse(report).getroot().iter('testcase'):
        name = case.get('name', '').split('[')[0]
        outcome, message = 'passed', ''
        for tag in ('failure', 'error', 'skipped'):
            el = case.find(tag)
            if el is not None:
                outcome, message = tag, (el.get('message') or '') + '\n' + (el.text or '')
                break
        results.setdefault(name, []).append((outcome, f"{case.get('name')}: {message}"))
    return results


@pytest.mark.parametrize('case', _case_names())
def test_on_8_device_mesh(mesh_results, case):
    runs = mesh_results.get(case)
    if not runs:
        pytest.fail(f"{case} did not run in the mesh subprocess")
    bad = [m for o, m in runs if o in ('failure', 'error')]
    if bad:
        pytest.fail(f"{len(bad)} of {len(runs)} runs failed on the 8-device mesh:\n" + '\n'.join(bad)[-6000:])
    if all(o == 'skipped' for o, _ in runs):
        pytest.skip(runs[0][1].split('\n')[0][-300:])
