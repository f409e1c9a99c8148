"""Sharding and sharded-checkpoint cases on a fake 8-device CPU mesh.

Run by tests/test_sharding.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set before
JAX starts, and must not leak into the 1-device test process). By hand:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -o python_files='*_cases.py' \
      tests/sharding/mesh_cases.py
"""

from __future__ import annotations

import importlib
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import qarray
from qarray import io as qio
from qarray import sharding as qs
from tolerances import OP_EXTRA, U32, abs_dot, assert_within, propagate

# -------------------------------------------------------------------------------- HLO reading
_BYTES = {'f64': 8, 'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 's8': 1, 'u8': 1,
          'pred': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's64': 8, 'u64': 8}
_LINE = re.compile(r'=\s*(.*?)\s+(all-gather|all-to-all)(?:-start)?\(')
_ARRAY = re.compile(r'\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]')


def gathers(hlo_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of every array produced by an all-gather / all-to-all."""
    out = []
    for line in hlo_text.splitlines():
        m = _LINE.search(line)
        if not m:
            continue
        for dt, dims in _ARRAY.findall(m.group(1)):
            out.append((dt, tuple(int(d) for d in dims.split(',') if d)))
    return out


def gathered_bytes(hlo_text: str) -> int:
    """Total bytes of all-gather / all-to-all results (per device)."""
    return sum(_BYTES.get(dt, 4) * math.prod(shape) for dt, shape in gathers(hlo_text))


if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8", allow_module_level=True)

AUTO = (AxisType.Auto, AxisType.Auto)
EXPLICIT = (AxisType.Explicit, AxisType.Explicit)


def mesh(shape=(2, 4), names=('data', 'model'), types=AUTO):
    return jax.make_mesh(shape, names, axis_types=types)


def leaves_bytes(tree):
    return [np.asarray(jax.device_get(x)).view(np.uint8).tobytes() for x in jax.tree.leaves(tree)]


def assert_bit_exact(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert qio.describe(a) == qio.describe(b)
    for x, y in zip(leaves_bytes(a), leaves_bytes(b)):
        assert x == y


def shard_shape(arr):
    return arr.addressable_shards[0].data.shape


def assert_dot_close(got, want, x, w, extra=0):
    """Two float32 evaluations of ``x @ w`` (different summation orders) agree within the worst-case
    accumulation error of each: |err| <= 2 * gamma_K * (|x| @ |w|), gamma_K = K eps / (1 - K eps).
    ``extra``: roundings each term goes through besides the sum (tolerances.OP_EXTRA for quantized operands
    whose scales may be applied after partial sums)."""
    x64, w64 = np.abs(np.asarray(x, np.float64)), np.abs(np.asarray(w, np.float64))
    k = x64.shape[-1] + extra
    eps = float(np.finfo(np.float32).eps) / 2
    bound = 2 * (k * eps / (1 - k * eps)) * (x64 @ w64) + np.finfo(np.float32).tiny
    err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    assert np.all(err <= bound), f"max err {err.max():.3g}; bound at worst element {bound.flat[err.argmax()]:.3g}"


# -------------------------------------------------------------------------------- sharded quantize
# (shape, spec of the float array, qtype, quantize kwargs, expected qvalue spec, expected scale spec)
QUANT_CASES = [
    ((256, 512), P('data', 'model'), 'int8', dict(channelwise_axes=(1,)), P('data', 'model'), P(None, 'model')),
    ((256, 512), P('data', 'model'), 'int4', dict(tiles=64), P('data', 'model'), P('data', 'model')),
    ((256, 512), P('data', 'model'), 'nf4', dict(tiles={0: 32}), P('data', 'model'), P('data', None)),
    ((256, 512), P('data', 'model'), 'uint4', dict(calibration='minmax', channelwise_axes=(1,)),
     P('data', 'model'), P(None, 'model')),
    ((256, 512), P(None, ('data', 'model')), 'int2', dict(channelwise_axes=(1,)),
     P(None, ('data', 'model')), P(None, ('data', 'model'))),
    ((256, 512), P('model', 'data'), 'int3', dict(channelwise_axes=(1,), pack_axis=0),
     P('model', 'data'), P(None, 'data')),
    ((256, 512), P('data', 'model'), 'float8_e4m3fn', dict(channelwise_axes=(0, 1)), P('data', 'model'),
     P('data', 'model')),
    ((4, 64, 512), P(None, 'data', 'model'), 'int4', dict(tiles=128), P(None, 'data', 'model'),
     P(None, 'data', 'model')),
]


@pytest.mark.parametrize('types', [AUTO, EXPLICIT], ids=['auto', 'explicit'])
@pytest.mark.parametrize('shape,spec,qtype,kw,vspec,sspec', QUANT_CASES)
def test_quantize_keeps_shards_and_bits(types, shape, spec, qtype, kw, vspec, sspec):
    m = mesh(types=types)
    xs = jax.random.normal(jax.random.key(0), shape)
    x = jax.device_put(xs, NamedSharding(m, spec))
    q = qs.quantize(x, qtype, **kw)
    assert_bit_exact(q, qarray.quantize(xs, qtype, **kw))  # same bits as one device
    assert q.qvalue.sharding.spec == vspec and q.scale.sharding.spec == sspec
    if q.zero_point is not None:
        assert q.zero_point.sharding.spec == sspec
    k = {None: 1, 'data': 2, 'model': 4, ('data', 'model'): 8, ('model', 'data'): 8}
    expect = tuple(n // k[e] for n, e in zip(q.qvalue.shape, list(vspec) + [None] * 3))
    assert shard_shape(q.qvalue) == expect  # every device holds only its slice


@pytest.mark.parametrize('shape,spec,qtype,kw', [(s[0], s[1], s[2], s[3]) for s in QUANT_CASES[:6]])
def test_quantize_compiles_without_gather(shape, spec, qtype, kw):
    """Aligned layouts: no all-gather/all-to-all at all — only small all-reduces of statistics."""
    m = mesh()
    x = jax.device_put(jnp.ones(shape), NamedSharding(m, spec))
    txt = jax.jit(lambda v: qs.quantize(v, qtype, sharding=NamedSharding(m, spec), **kw)).lower(x).compile().as_text()
    assert gathers(txt) == []


def test_misaligned_packed_axis_is_replicated_and_exact():
    """int3 with 9 values per shard: 27 bits, not whole bytes -> qvalue replicated along that axis."""
    m = mesh()
    xs = jax.random.normal(jax.random.key(1), (256, 36))
    x = jax.device_put(xs, NamedSharding(m, P('data', 'model')))
    q = qs.quantize(x, 'int3', channelwise_axes=(0,))
    assert q.qvalue.sharding.spec == P('data', None)
    assert q.scale.sharding.spec == P('data', None)
    assert_bit_exact(q, qarray.quantize(xs, 'int3', channelwise_axes=(0,)))


def test_tiles_spanning_shards_replicate_scales_only():
    m = mesh(types=EXPLICIT)
    xs = jax.random.normal(jax.random.key(2), (256, 512))
    q = qs.quantize(jax.device_put(xs, NamedSharding(m, P('data', 'model'))), 'int4', tiles=256)
    assert q.qvalue.sharding.spec == P('data', 'model')
    assert q.scale.sharding.spec == P('data', None)  # 2 tiles over 4 shards
    assert_bit_exact(q, qarray.quantize(xs, 'int4', tiles=256))


def test_shard_places_existing_qarray():
    m = mesh()
    q = qarray.quantize(jax.random.normal(jax.random.key(3), (64, 128)), 'nf4', tiles=32)
    qsh = qs.shard(q, NamedSharding(m, P('data', 'model')))
    assert qsh.qvalue.sharding.spec == P('data', 'model') and qsh.scale.sharding.spec == P('data', 'model')
    assert_bit_exact(qsh, q)


# -------------------------------------------------------------------------------- quantized ops
def _ops():
    try:
        ops = importlib.import_module('qarray.ops')
    except ImportError:
        ops = None
    if ops is None or not hasattr(ops, 'dot_general'):
        pytest.skip("qarray.ops.dot_general is not built yet")
    return ops


# name: (x spec, weight spec), for x (B, K) @ w (K, N)
LAYOUTS = {
    'data_parallel': (P(('data', 'model'), None), P(None, None)),
    'column_parallel': (P('data', None), P(None, 'model')),
    'row_parallel': (P('data', 'model'), P('model', None)),
    'fsdp': (P(('data', 'model'), None), P(('data', 'model'), None)),
}
WEIGHTS = [('int8', dict(channelwise_axes=(1,))), ('int4', dict(tiles={0: 32}, channelwise_axes=(1,))),
           ('nf4', dict(tiles={0: 32}, channelwise_axes=(1,))),
           ('float8_e4m3fn', dict(channelwise_axes=(1,)))]


@pytest.mark.parametrize('types', [AUTO, EXPLICIT], ids=['auto', 'explicit'])
@pytest.mark.parametrize('layout', list(LAYOUTS))
@pytest.mark.parametrize('qtype,kw', WEIGHTS, ids=[w[0] for w in WEIGHTS])
def test_weight_only_dot_on_mesh(layout, qtype, kw, types):
    ops = _ops()
    if types == EXPLICIT and layout in ('row_parallel', 'fsdp'):
        # JAX itself (jnp.einsum too) refuses a contraction over an explicitly sharded axis without out_sharding.
        pytest.skip('explicit meshes need out_sharding for contractions over sharded axes (not supported by ops)')
    m = mesh(types=types)
    xspec, wspec = LAYOUTS[layout]
    xs = jax.random.normal(jax.random.key(4), (64, 256))
    ws = jax.random.normal(jax.random.key(5), (256, 128))
    q1 = qarray.quantize(ws, qtype, **kw)
    want = jax.jit(lambda a, b: ops.einsum('bk,kn->bn', a, b))(xs, q1)

    xsh, wsh = NamedSharding(m, xspec), NamedSharding(m, wspec)
    x = jax.device_put(xs, xsh)
    q = qs.quantize(jax.device_put(ws, wsh), qtype, **kw)
    fn = jax.jit(lambda a, b: ops.einsum('bk,kn->bn', a, b), out_shardings=NamedSharding(m, P(xspec[0], wspec[1])))
    got = fn(x, q)
    assert_dot_close(got, want, xs, qarray.dequantize(q1))
    np.testing.assert_array_equal(np.asarray(qarray.dequantize(q)), np.asarray(qarray.dequantize(q1)))

    # No gather of the full weight that the float program would not do, and never more bytes.
    ffn = jax.jit(lambda a, b: jnp.einsum('bk,kn->bn', a, b), out_shardings=fn._out_shardings
                  if hasattr(fn, '_out_shardings') else NamedSharding(m, P(xspec[0], wspec[1])))
    ftxt = ffn.lower(x, jax.device_put(ws, wsh)).compile().as_text()
    qtxt = fn.lower(x, q).compile().as_text()
    full = {tuple(ws.shape), tuple(q.qvalue.shape)}
    n_full_q = sum(1 for _, s in gathers(qtxt) if s in full)
    n_full_f = sum(1 for _, s in gathers(ftxt) if s == tuple(ws.shape))
    assert n_full_q <= n_full_f, (gathers(qtxt), gathers(ftxt))
    assert gathered_bytes(qtxt) <= gathered_bytes(ftxt) + q.scale.size * 4 * 2


@pytest.mark.parametrize('qtype,kw,max_fraction', [('int8', dict(channelwise_axes=(1,)), 0.26),
                                                  ('int4', dict(tiles={0: 32}, channelwise_axes=(1,)), 0.16)])
def test_fsdp_gathers_quantized_bytes_when_constrained(qtype, kw, max_fraction):
    """Left alone XLA gathers the dequantized (float) weight; constrain() makes it gather the QArray."""
    ops = _ops()
    m = mesh()
    xspec, wspec = LAYOUTS['fsdp']
    xs = jax.random.normal(jax.random.key(4), (64, 1024))
    ws = jax.random.normal(jax.random.key(5), (1024, 1024))
    x, w = jax.device_put(xs, NamedSharding(m, xspec)), jax.device_put(ws, NamedSharding(m, wspec))
    q = qs.quantize(w, qtype, **kw)
    out = NamedSharding(m, P(xspec[0], None))
    fn = jax.jit(lambda a, b: ops.einsum('bk,kn->bn', a, qs.constrain(b, NamedSharding(m, P()))), out_shardings=out)
    ffn = jax.jit(lambda a, b: jnp.einsum('bk,kn->bn', a, b), out_shardings=out)
    q_bytes = gathered_bytes(fn.lower(x, q).compile().as_text())
    f_bytes = gathered_bytes(ffn.lower(x, w).compile().as_text())
    assert 0 < q_bytes <= max_fraction * f_bytes, (q_bytes, f_bytes)
    q1 = qarray.quantize(ws, qtype, **kw)
    want = jax.jit(lambda a, b: ops.einsum('bk,kn->bn', a, b))(xs, q1)
    assert_dot_close(fn(x, q), want, xs, qarray.dequantize(q1))


def test_int8_x_int8_dot_general_on_mesh():
    ops = _ops()
    m = mesh()
    xs = jax.random.normal(jax.random.key(6), (64, 256))
    ws = jax.random.normal(jax.random.key(7), (256, 128))
    qx1 = qarray.quantize(xs, 'int8', channelwise_axes=(0,))
    qw1 = qarray.quantize(ws, 'int8', channelwise_axes=(1,))
    dn = (((1,), (0,)), ((), ()))
    want = jax.jit(lambda a, b: ops.dot_general(a, b, dn))(qx1, qw1)
    qx = qs.shard(qx1, NamedSharding(m, P('data', 'model')))
    qw = qs.shard(qw1, NamedSharding(m, P('model', None)))
    got = jax.jit(lambda a, b: ops.dot_general(a, b, dn))(qx, qw)
    # Exact int32 partial sums; a K-sharded contraction may scale per shard and sum the partials in float32.
    assert_dot_close(got, want, qarray.dequantize(qx1), qarray.dequantize(qw1), extra=OP_EXTRA)


# -------------------------------------------------------------------------------- checkpoints on meshes
def _params(m, spec):
    keys = jax.random.split(jax.random.key(8), 4)
    sh = NamedSharding(m, spec)
    w = [jax.device_put(jax.random.normal(k, (128, 256)), sh) for k in keys]
    return {
        'a': {'kernel': qs.quantize(w[0], 'int4', tiles=64)},
        'b': {'kernel': qs.quantize(w[1], 'uint4', calibration='minmax', channelwise_axes=(1,))},
        'c': {'kernel': qs.quantize(w[2], 'float8_e4m3fn', channelwise_axes=(1,))},
        'd': {'kernel': qs.quantize(w[3], 'nf4', tiles={0: 32}), 'bias': jax.device_put(jnp.arange(256.), NamedSharding(m, P('model')))},
    }


def _float_shardings(m, spec, bias_spec):
    sh = NamedSharding(m, spec)
    return {'a': {'kernel': sh}, 'b': {'kernel': sh}, 'c': {'kernel': sh},
            'd': {'kernel': sh, 'bias': NamedSharding(m, bias_spec)}}


def test_orbax_restore_onto_other_mesh(tmp_path):
    params = _params(mesh(), P('data', 'model'))
    qio.save(tmp_path / 'ckpt', params)
    other = mesh((4, 2), ('x', 'y'))
    got = qio.restore(tmp_path / 'ckpt', params, shardings=_float_shardings(other, P('y', 'x'), P('x')))
    assert_bit_exact(got, params)
    assert got['a']['kernel'].qvalue.sharding.spec == P('y', 'x')
    assert got['a']['kernel'].qvalue.sharding.mesh.shape == {'x': 4, 'y': 2}
    assert got['b']['kernel'].zero_point.sharding.spec == P(None, 'x')
    assert got['d']['bias'].sharding.spec == P('x')
    # and onto one device (unsharded), from an abstract target
    abstract = jax.eval_shape(lambda t: t, params)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    got1 = qio.restore(tmp_path / 'ckpt', abstract, shardings=jax.tree.map(lambda _: one, abstract))
    assert_bit_exact(got1, params)
    assert len(got1['a']['kernel'].qvalue.sharding.device_set) == 1


def test_orbax_unsharded_save_sharded_restore(tmp_path):
    q = qarray.quantize(jax.random.normal(jax.random.key(9), (128, 256)), 'int2', tiles=32)
    qio.save(tmp_path / 'c', {'w': q})
    m = mesh(types=EXPLICIT)
    got = qio.restore(tmp_path / 'c', shardings={'w': NamedSharding(m, P('model', 'data'))})
    assert_bit_exact(got, {'w': q})
    assert shard_shape(got['w'].qvalue) == (32, 32)


def test_safetensors_sharded_load_reads_slices(tmp_path):
    params = _params(mesh(), P('data', 'model'))
    f = tmp_path / 'm.safetensors'
    qio.save_safetensors(f, params)
    other = mesh((8, 1), ('x', 'y'))
    got = qio.load_safetensors(f, params, shardings=_float_shardings(other, P('x', 'y'), P('x')))
    assert_bit_exact(got, params)
    assert shard_shape(got['c']['kernel'].qvalue) == (16, 256)


# -------------------------------------------------------------------------------- Flax partitioning metadata
def _flax():
    try:
        fi = importlib.import_module('flax_integration')
    except ImportError:
        fi = None
    if fi is None or not hasattr(fi, 'PtqProvider') or not hasattr(fi, 'quantize_model'):
        pytest.skip("flax_integration.PtqProvider / quantize_model are not built yet")
    return fi


def _is_spec(s):
    return isinstance(s, P)


def _named(m, specs):
    return jax.tree.map(lambda s: NamedSharding(m, s), specs, is_leaf=_is_spec)


def _specs_of(tree):
    return jax.tree.map(lambda a: a.sharding.spec, tree)


def test_linen_partitioning_metadata_survives_ptq():
    fi = _flax()
    from flax import linen as nn
    init = nn.initializers.lecun_normal()

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(256, kernel_init=nn.with_partitioning(init, (None, 'model')))(x))
            return nn.Dense(64, kernel_init=nn.with_partitioning(init, ('model', None)))(x)

    m = mesh()
    x = jax.random.normal(jax.random.key(10), (16, 128))
    ptq = fi.quantize_model(MLP(), fi.PtqProvider([fi.QuantizationRule(module_path='.*', weight_qtype='int4',
                                                                        tile_size=32)]))
    fp = MLP().init(jax.random.key(0), x)['params']
    qparams = fi.quantize_params(fp, jax.eval_shape(ptq.init, jax.random.key(0), x)['params'])
    plain = nn.meta.unbox(qparams)
    want = np.asarray(ptq.apply({'params': plain}, x))
    run = jax.jit(lambda p, v: ptq.apply({'params': p}, v))
    xs = jax.device_put(x, NamedSharding(m, P('data')))

    # 1) the boxes flax_integration puts on values and scales (name-based: per-channel axes keep names)
    specs = nn.get_partition_spec(qparams)
    k0, k1 = specs['Dense_0']['kernel'].array, specs['Dense_1']['kernel'].array
    assert k0.scale == P(None, 'model') and k1.qvalue == P('model', None)
    bound = _mlp_bound(x, plain['Dense_0'], plain['Dense_1'])
    assert_within(run(jax.device_put(plain, _named(m, specs)), xs), want, bound)

    # 2) the mesh-aware rule from the float model's annotations: packed and tiled axes stay sharded too
    mesh_specs = qs.tree_shardings(plain, nn.get_partition_spec(fp), m)
    k0, k1 = mesh_specs['Dense_0']['kernel'].array, mesh_specs['Dense_1']['kernel'].array
    # int4 kernels are packed along their contraction axis (axis 0): Dense_1's is the 'model' axis
    assert (k0.qvalue, k0.scale) == (P(None, 'model'), P(None, 'model'))
    assert (k1.qvalue, k1.scale) == (P('model', None), P('model', None))   # packed, and 8 tiles over 4 shards
    placed = jax.device_put(plain, _named(m, mesh_specs))
    assert shard_shape(placed['Dense_0']['kernel'].array.qvalue) == (64, 64)   # 128 values = 64 bytes per column
    assert shard_shape(placed['Dense_1']['kernel'].array.qvalue) == (32, 64)   # 256 / 4 = 64 values = 32 bytes
    assert_within(run(placed, xs), want, bound)


def _mlp_bound(x, d0, d1):
    """|sharded - one-device| for relu(x k0 + b0) k1 + b1 with weight-only QArrays: two float32 evaluations
    of each dot (tolerances.propagate), the bias adds (u each), relu 1-Lipschitz."""
    k0, k1 = d0['kernel'].array, d1['kernel'].array
    h = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(qarray.dequantize(k0), np.float64)) + np.abs(d0['bias'])
    dh = propagate(x, 0, k0) + 2 * U32 * h
    return propagate(h, dh, k1) + 2 * U32 * (abs_dot(h, k1) + np.abs(np.asarray(d1['bias'])))


def test_nnx_sharding_annotations_survive_ptq():
    fi = _flax()
    from flax import nnx
    init = nnx.initializers.lecun_normal()

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(128, 256, kernel_init=nnx.with_partitioning(init, (None, 'model')), rngs=rngs)
            self.l2 = nnx.Linear(256, 64, kernel_init=nnx.with_partitioning(init, ('model', None)), rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.l1(x)))

    m = mesh()
    x = jax.random.normal(jax.random.key(11), (16, 128))
    with jax.set_mesh(m):
        model = MLP(nnx.Rngs(0))
        qm = fi.quantize_model(model, fi.PtqProvider([fi.QuantizationRule(module_path='.*', weight_qtype='nf4',
                                                                          tile_size=32)]), x)
    graphdef, state = nnx.split(qm)
    want = np.asarray(nnx.merge(graphdef, jax.device_get(state))(x))
    specs = nnx.get_partition_spec(state)
    assert specs['l1']['kernel']['array']['scale'].get_value() == P(None, 'model')
    assert specs['l2']['kernel']['array']['qvalue'].get_value() == P('model', None)
    run = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))
    got = run(jax.device_put(state, _named(m, specs)), jax.device_put(x, NamedSharding(m, P('data'))))
    d0 = {'kernel': qm.l1.kernel[...], 'bias': np.asarray(qm.l1.bias[...])}
    d1 = {'kernel': qm.l2.kernel[...], 'bias': np.asarray(qm.l2.bias[...])}
    assert_within(got, want, _mlp_bound(x, d0, d1))
