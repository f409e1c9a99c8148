"""Mixture of experts (``ragged_dot``) and embedding tables (``take``): error, bytes and CPU time.

* MoE layer: 8 experts, top-2 routing, hidden 512 (FFN 1024), 512 tokens. Expert weights quantized per
  expert and output channel (int8; int4 with tiles of 64 along K; w8a8 = int8 weights and dynamic per-token
  int8 activations), the two expert matmuls run by ``qarray.ragged_dot`` and, on the same data, by Qwix HEAD's
  ``qwix.ragged_dot`` (its source wheel, in a subprocess of ``/tmp/qwixhead-venv/bin/python``: Qwix's PTQ
  provider does not intercept ``ragged_dot``, so both sides are compared at the op level, on the same
  routed tokens and float weights). Error: relative RMS error of the layer output (after the weighted top-2
  combine) against a float64 numpy reference of the float layer. Time: the jitted expert computation,
  qarray and Qwix interleaved round by round; the ratio is the median of per-round ratios.
* Embedding table 32768 x 512: int8 per row and int4 with tiles of 64 along the features. Stored bytes,
  lookup error (relative RMS and the largest error in units of the row's half quantization step), and the
  time of ``qarray.take`` on 1024 ids vs ``jnp.take`` on the float table, interleaved.

Usage: ``python benchmarks/moe_embed_bench.py [--rounds 7] [--out benchmarks/results_moe_embed.md]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import qarray  # noqa: E402
from benchmarks import pairbench  # noqa: E402

E, TOPK, DM, FF, T = 8, 2, 512, 1024, 512
V, DE, NIDS = 32768, 512, 1024
QWIX_PY = pairbench.QWIX_HEAD_PYTHON
CONFIGS = ('int8', 'int4_t64', 'w8a8')

# --------------------------------------------------------------------------- the Qwix side (subprocess)
QWIX_WORKER = textwrap.dedent('''
    import sys, time, json
    import numpy as np, jax, jax.numpy as jnp, qwix
    d = np.load(sys.argv[1])
    x, gs, w1, w2 = (jnp.asarray(d[k]) for k in ('x', 'gs', 'w1', 'w2'))

    def weights(cfg):
        if cfg == 'int4_t64':
            q = lambda w: qwix.quantize(w, jnp.int4, channelwise_axes=(0, 2), tiled_axes={1: 64})
        else:
            q = lambda w: qwix.quantize(w, jnp.int8, channelwise_axes=(0, 2))
        return q(w1), q(w2)

    def make(cfg):
        qw1, qw2 = weights(cfg)
        act = (lambda a: qwix.quantize(a, jnp.int8, channelwise_axes=(0,))) if cfg == 'w8a8' else (lambda a: a)
        @jax.jit
        def f(x, gs, qw1, qw2):
            h = jax.nn.gelu(qwix.ragged_dot(act(x), qw1, gs))
            return qwix.ragged_dot(act(h), qw2, gs)
        return lambda: f(x, gs, qw1, qw2)

    fns = {}
    import importlib.metadata
    print('ready', importlib.metadata.version('qwix'), flush=True)
    for line in sys.stdin:
        cmd, cfg, arg = line.split()
        if cfg not in fns:
            fns[cfg] = make(cfg)
        if cmd == 'run':
            np.save(arg, np.asarray(fns[cfg]()))
            print('ok', flush=True)
        elif cmd == 'time':
            fns[cfg]().block_until_ready()
            t0 = time.perf_counter()
            for _ in range(int(arg)):
                fns[cfg]().block_until_ready()
            print((time.perf_counter() - t0) / int(arg), flush=True)
''')


class Qwix:
    """A persistent Qwix HEAD worker: ``run(cfg)`` -> expert outputs, ``time(cfg, n)`` -> seconds per call."""

    def __init__(self, data_path: str):
        self.dir = os.path.dirname(data_path)
        script = os.path.join(self.dir, 'qwix_worker.py')
        with open(script, 'w') as f:
            f.write(QWIX_WORKER)
        env = dict(os.environ, PYTHONPATH='')
        self.p = subprocess.Popen([QWIX_PY, script, data_path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=env, cwd=self.dir)
        line = self.p.stdout.readline().split()
        if not line or line[0] != 'ready':
            raise RuntimeError(f"Qwix HEAD worker did not start ({QWIX_PY}); got {line!r}")
        self.version = line[1] if len(line) > 1 else '?'

    def _ask(self, cmd: str) -> str:
        self.p.stdin.write(cmd + '\n')
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def run(self, cfg: str) -> np.ndarray:
        out = os.path.join(self.dir, f'qwix_{cfg}.npy')
        assert self._ask(f'run {cfg} {out}') == 'ok'
        return np.load(out)

    def time(self, cfg: str, n: int) -> float:
        return float(self._ask(f'time {cfg} {n}'))

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=60)


# --------------------------------------------------------------------------- data and references
def moe_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(T, DM)).astype(np.float32)
    router = (rng.normal(size=(DM, E)) / np.sqrt(DM)).astype(np.float32)
    w1 = (rng.normal(size=(E, DM, FF)) / np.sqrt(DM)).astype(np.float32)
    w2 = (rng.normal(size=(E, FF, DM)) / np.sqrt(FF)).astype(np.float32)
    logits = tokens.astype(np.float64) @ router
    top = np.argsort(-logits, axis=1)[:, :TOPK]                           # top-2 experts per token
    p = np.take_along_axis(logits, top, 1)
    p = np.exp(p - p.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expert = top.reshape(-1)                                                # token t's k-th choice: row t*K+k
    order = np.argsort(expert, kind='stable')                               # rows sorted by expert
    gs = np.bincount(expert, minlength=E).astype(np.int32)
    x = np.repeat(tokens, TOPK, axis=0)[order]
    return dict(x=x, gs=gs, w1=w1, w2=w2, order=order, p=p.astype(np.float32))


def combine(y_sorted: np.ndarray, d: dict) -> np.ndarray:
    """Expert outputs (rows sorted by expert) -> each token's weighted top-2 sum, in float64."""
    y = np.empty_like(y_sorted, dtype=np.float64)
    y[d['order']] = y_sorted
    return (y.reshape(T, TOPK, -1) * d['p'][..., None]).sum(1)


def gelu64(h):
    from math import sqrt
    return 0.5 * h * (1 + np.tanh(sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))   # jax.nn.gelu's default form


def float_reference(d: dict) -> np.ndarray:
    x, gs, w1, w2 = (d[k].astype(np.float64) for k in ('x', 'gs', 'w1', 'w2'))
    out, start = np.zeros((x.shape[0], DM)), 0
    for e, n in enumerate(d['gs']):
        out[start:start + n] = gelu64(x[start:start + n] @ w1[e]) @ w2[e]
        start += n
    return combine(out, d)


def rel_rms(y, ref) -> float:
    return float(np.sqrt(np.mean((y - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


# --------------------------------------------------------------------------- the qarray side
def qarray_moe(cfg: str, d: dict):
    x, gs = jnp.asarray(d['x']), jnp.asarray(d['gs'])
    if cfg == 'float':
        w1, w2 = jnp.asarray(d['w1']), jnp.asarray(d['w2'])
    elif cfg == 'int4_t64':
        w1, w2 = (qarray.quantize(jnp.asarray(d[k]), 'int4', channelwise_axes=(0, 2), tiles={1: 64})
                  for k in ('w1', 'w2'))
    else:
        w1, w2 = (qarray.quantize(jnp.asarray(d[k]), 'int8', channelwise_axes=(0, 2)) for k in ('w1', 'w2'))
    act = (lambda a: qarray.quantize(a, 'int8', channelwise_axes=(0,))) if cfg == 'w8a8' else (lambda a: a)

    @jax.jit
    def f(x, gs, w1, w2):
        h = jax.nn.gelu(qarray.ragged_dot(act(x), w1, gs))
        return qarray.ragged_dot(act(h), w2, gs)

    nbytes = sum(w.nbytes for w in (w1, w2))
    return (lambda: f(x, gs, w1, w2)), nbytes


def time_call(fn, n: int) -> float:
    fn().block_until_ready()
    t0 = time.perf_counter()
    for _ in range(n):
        fn().block_until_ready()
    return (time.perf_counter() - t0) / n


# --------------------------------------------------------------------------- embeddings
def embedding_rows(rounds: int, n: int) -> list[list[str]]:
    rng = np.random.default_rng(1)
    table = jnp.asarray(rng.normal(size=(V, DE)).astype(np.float32) * rng.uniform(0.2, 2.0, (V, 1)).astype(np.float32))
    ids = jnp.asarray(rng.integers(0, V, (8, NIDS // 8)).astype(np.int32))
    ref = np.asarray(table, np.float64)[np.asarray(ids)]
    float_take = jax.jit(lambda t, i: jnp.take(t, i, axis=0))
    q_take = jax.jit(qarray.take)
    rows = [['float32', f'{table.nbytes / 2**20:.2f}', '1.00', '0', '-', '-', '-']]
    for name, fmt, kw in (('int8 per row', 'int8', dict(channelwise_axes=(0,))),
                          ('int4, tiles of 64', 'int4', dict(channelwise_axes=(0,), tiles={1: 64}))):
        q = qarray.quantize(table, fmt, **kw)
        got = np.asarray(q_take(q, ids), np.float64)
        assert np.array_equal(got, np.asarray(jnp.take(qarray.dequantize(q), ids, axis=0), np.float64))
        # a row's half step: scale / 2 of the group each value lies in
        half = np.asarray(jnp.take(_scale_view(q), ids, axis=0), np.float64) / 2
        worst = float(np.max(np.abs(got - ref) / half))
        ratios, tq, tf = [], [], []
        for _ in range(rounds):
            a = time_call(lambda: q_take(q, ids), n)
            b = time_call(lambda: float_take(table, ids), n)
            tq.append(a), tf.append(b), ratios.append(a / b)
        rows.append([name, f'{q.nbytes / 2**20:.2f}', f'{table.nbytes / q.nbytes:.2f}', f'{rel_rms(got, ref):.2e}',
                     f'{worst:.3f}', f'{np.median(tq) * 1e6:.0f} / {np.median(tf) * 1e6:.0f}',
                     f'{np.median(ratios):.2f}'])
    return rows


def _scale_view(q: qarray.QArray) -> jax.Array:
    """Each value's scale, broadcast to the table's shape (for the half-step unit)."""
    s = q.scale
    for ax, n in enumerate(q.shape):
        if s.shape[ax] not in (1, n):
            s = jnp.repeat(s, n // s.shape[ax], axis=ax)
    return jnp.broadcast_to(s, q.shape).astype(jnp.float32)


# --------------------------------------------------------------------------- report
def table_md(header, rows) -> str:
    out = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    out += ['| ' + ' | '.join(r) + ' |' for r in rows]
    return '\n'.join(out)


def machine() -> str:
    return f"{pairbench.cpu_name()}, {os.cpu_count()} cores visible, jax {jax.__version__} ({jax.default_backend()})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--rounds', type=int, default=7)
    ap.add_argument('--calls', type=int, default=3, help='calls per timing sample')
    ap.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results_moe_embed.md'))
    args = ap.parse_args()

    d = moe_data()
    ref = float_reference(d)
    tmp = tempfile.mkdtemp(prefix='moe_bench_')
    path = os.path.join(tmp, 'moe.npz')
    np.savez(path, **{k: d[k] for k in ('x', 'gs', 'w1', 'w2')})
    qw = Qwix(path) if os.path.exists(QWIX_PY) else None

    fp_fn, fp_bytes = qarray_moe('float', d)
    moe_rows = [['float32', f'{fp_bytes / 2**20:.2f}', f'{rel_rms(combine(np.asarray(fp_fn()), d), ref):.2e}',
                 '-', '-', '-', '-']]
    for cfg in CONFIGS:
        fn, nbytes = qarray_moe(cfg, d)
        err = rel_rms(combine(np.asarray(fn(), np.float64), d), ref)
        qerr = rel_rms(combine(qw.run(cfg).astype(np.float64), d), ref) if qw else float('nan')
        ours, theirs, vs_float, vs_qwix = [], [], [], []
        for _ in range(args.rounds):   # interleaved: qarray, float, Qwix in each round
            a = time_call(fn, args.calls)
            f = time_call(fp_fn, args.calls)
            b = qw.time(cfg, args.calls) if qw else float('nan')
            ours.append(a), theirs.append(b), vs_float.append(a / f), vs_qwix.append(a / b)
        moe_rows.append([cfg, f'{nbytes / 2**20:.2f}', f'{err:.4e}', f'{qerr:.4e}', f'{qerr / err:.4f}',
                         f'{np.median(ours) * 1e3:.1f} / {np.median(theirs) * 1e3:.1f}',
                         f'{np.median(vs_float):.2f} / {np.median(vs_qwix):.2f}'])
    if qw:
        qw.close()
    emb_rows = embedding_rows(args.rounds, 20)

    text = f"""# MoE (ragged_dot) and embedding tables (take)

Written by `python benchmarks/moe_embed_bench.py --rounds {args.rounds} --calls {args.calls}` on {machine()};
Qwix HEAD {qw.version if qw else '(not found)'} in a subprocess (`{QWIX_PY}`), same data. The machine is
shared and noisy: compare the ratios (medians of per-round ratios, qarray and the peer timed back to back in
each round), not the absolute times.

## MoE layer: {E} experts, top-{TOPK} routing, hidden {DM}, FFN {FF}, {T} tokens

Error: relative RMS error of the layer output (after the weighted top-2 combine) vs the float64 reference of
the float layer. Weights per expert and output channel (int4: also tiles of 64 along K); w8a8: int8 weights
and dynamic per-token int8 activations (qarray: int8 x int8 -> int32 `ragged_dot`). Bytes: both expert
weight tensors as stored.

{table_md(['config', 'MiB', 'qarray error', 'Qwix error', 'Qwix / qarray error', 'ms: qarray / Qwix',
           'time ratio: vs float / vs Qwix'], moe_rows)}

## Embedding table {V} x {DE}: {NIDS} lookups

Error: relative RMS error of the looked-up rows vs the float rows, and the largest error in units of the
value's half quantization step (at most 1 for round-to-nearest). Lookups equal the rows of the dequantized
table bit for bit (asserted). Time: `jax.jit(qarray.take)` vs `jax.jit(jnp.take)` on the float table.

{table_md(['table', 'MiB', 'x smaller', 'lookup error', 'max err / half step', 'us: take / float gather',
           'time ratio'], emb_rows)}
"""
    with open(args.out, 'w') as f:
        f.write(text)
    print(text)


if __name__ == '__main__':
    main()
