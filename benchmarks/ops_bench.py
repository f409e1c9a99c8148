"""Quantized ops vs Qwix 0.1.8 vs the float op, side by side in one run.

Rows (x 512x4096 @ w 4096x4096 unless noted; operands quantized beforehand,
so each timing is the op alone):

* w8a8 int8: int8 per-token activations x int8 per-channel weights
* int8 weight-only, int4 tiles-128 weight-only, nf4 tiles-64 weight-only
* int4 (tiles 128) weights x int8 per-token activations
* conv 3x3, N=32, 56x56x128 -> 128, int8 per-batch activations x int8 per-channel weights

Each function is jitted; the table reports the best time over all rounds
(rounds interleave all rows and libraries so machine load affects them
alike; on a shared machine the minimum is the least noisy estimate). Writes the "## Ops (issue 3)" section of benchmarks/RESULTS.md.

Usage:  python benchmarks/ops_bench.py [--rounds 10] [--no-write]

Example:
  $ python benchmarks/ops_bench.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qarray  # noqa: E402

M, K, N = 512, 4096, 4096
MK = (((1,), (0,)), ((), ()))
CONV = dict(window_strides=(1, 1), padding='SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
SECTION = '## Ops (issue 3)'
NOTES = '''Paths taken (qarray): w8a8 -> one int8 dot with int32 accumulation, scales on the output; conv -> one
int8 conv with int32 accumulation, per-batch x per-output-channel scales after. For these two rows the
compiled HLO is identical to Qwix's, so their qarray/qwix ratio shows this machine's noise floor (a few
percent either way between runs). Weight-only rows -> unpack + convert (+ tile scale) in one XLA fusion
next to a float32 dot (per-channel scales go on the output when it is the smaller array); on this CPU
that is float32 matmul + dequantizing 16M weights (XLA CPU cannot fuse a convert into its dot), the same
work Qwix does (Qwix reads int4 as one byte per value; qarray unpacks nibbles), so these rows are within a
few percent of Qwix's either way. int4 x int8 tiles -> a loop over the 32 K-tiles, each an int8 x int8
-> int32 dot (int4 bytes unpacked per tile) whose scaled result is added into one [512, 4096] float32
accumulator, never the [32, 512, 4096] intermediate that Qwix materialises (hence its much slower row).'''


def _qwix():
    try:
        import qwix
        return qwix
    except ImportError:
        return None


def build_rows():
    """(name, {impl: (fn, args)}) for every row."""
    qw = _qwix()
    k0, k1 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k0, (M, K))
    w = jax.random.normal(k1, (K, N))
    ours = jax.jit(lambda a, b: qarray.dot_general(a, b, MK))
    theirs = jax.jit(lambda a, b: qw.dot_general(a, b, MK)) if qw else None
    flt = jax.jit(lambda a, b: jax.lax.dot_general(a, b, MK))
    rows = []

    def row(name, our_x, our_w, their_x=None, their_w=None, float_args=(x, w), fns=(ours, theirs, flt)):
        impls = {'qarray': (fns[0], (our_x, our_w)), 'float32': (fns[2], float_args)}
        if qw is not None and their_w is not None:
            impls['qwix'] = (fns[1], (their_x, their_w))
        rows.append((name, impls))

    qx8 = qarray.quantize(x, 'int8', channelwise_axes=(0,))
    qw8 = qarray.quantize(w, 'int8', channelwise_axes=(1,))
    qw4 = qarray.quantize(w, 'int4', tiles={0: 128}, channelwise_axes=(1,))
    qnf4 = qarray.quantize(w, 'nf4', tiles={0: 64}, channelwise_axes=(1,))
    if qw:
        wx8 = qw.quantize(x, jnp.int8, channelwise_axes=(0,))
        ww8 = qw.quantize(w, jnp.int8, channelwise_axes=(1,))
        ww4 = qw.quantize(w, jnp.int4, channelwise_axes=(1,), tiled_axes={0: 128})
        wnf4 = qw.quantize(w, 'nf4', channelwise_axes=(1,), tiled_axes={0: 64})
    else:
        wx8 = ww8 = ww4 = wnf4 = None
    row('w8a8 int8', qx8, qw8, wx8, ww8)
    row('int8 weight-only', x, qw8, x, ww8)
    row('int4 tiles-128 weight-only', x, qw4, x, ww4)
    row('int4 tiles-128 x int8 act', qx8, qw4, wx8, ww4)
    row('nf4 tiles-64 weight-only', x, qnf4, x, wnf4)

    c0, c1 = jax.random.split(jax.random.key(1))
    cx = jax.random.normal(c0, (32, 56, 56, 128))
    cw = jax.random.normal(c1, (3, 3, 128, 128))
    qcx = qarray.quantize(cx, 'int8', channelwise_axes=(0,))
    qcw = qarray.quantize(cw, 'int8', channelwise_axes=(3,))
    conv_ours = jax.jit(lambda a, b: qarray.conv_general_dilated(a, b, **CONV))
    conv_theirs = jax.jit(lambda a, b: qw.conv_general_dilated(a, b, **CONV)) if qw else None
    conv_float = jax.jit(lambda a, b: jax.lax.conv_general_dilated(a, b, **CONV))
    wcx = qw.quantize(cx, jnp.int8, channelwise_axes=(0,)) if qw else None
    wcw = qw.quantize(cw, jnp.int8, channelwise_axes=(3,)) if qw else None
    row('conv 3x3 int8 (N=32, 56x56x128->128)', qcx, qcw, wcx, wcw, float_args=(cx, cw),
        fns=(conv_ours, conv_theirs, conv_float))
    return rows


def _time(fn, args) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def run(rounds: int = 5, reps: int = 2):
    rows = build_rows()
    for _, impls in rows:  # compile + warm up
        for fn, args in impls.values():
            jax.block_until_ready(fn(*args))
    samples = {(name, impl): [] for name, impls in rows for impl in impls}
    for _ in range(rounds):
        for name, impls in rows:
            for impl, (fn, args) in impls.items():
                samples[(name, impl)].append(min(_time(fn, args) for _ in range(reps)))
    return rows, {k: min(v) * 1e3 for k, v in samples.items()}


def table(rows, ms) -> str:
    lines = ['| row | float32 ms | qwix 0.1.8 ms | qarray ms | qarray / float32 | qarray / qwix |',
             '|---|---:|---:|---:|---:|---:|']
    for name, impls in rows:
        f, o = ms[(name, 'float32')], ms[(name, 'qarray')]
        q = ms.get((name, 'qwix'))
        lines.append(f"| {name} | {f:.1f} | {q:.1f} | {o:.1f} | {o / f:.2f} | {o / q:.2f} |" if q else
                     f"| {name} | {f:.1f} | n/a | {o:.1f} | {o / f:.2f} | n/a |")
    return '\n'.join(lines)


def write_section(text: str, path: Path) -> None:
    """Replace (or append) only this benchmark's section of RESULTS.md."""
    old = path.read_text() if path.exists() else '# Benchmark results\n'
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip('\n') + '\n\n' + text + '\n'
    else:
        nxt = old.find('\n## ', start + len(SECTION))
        new = old[:start] + text + ('\n' + old[nxt + 1:] if nxt >= 0 else '\n')
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--rounds', type=int, default=10)
    ap.add_argument('--no-write', action='store_true')
    a = ap.parse_args()
    rows, ms = run(a.rounds)
    tbl = table(rows, ms)
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    cpu = platform.processor() or platform.machine()
    text = (f"{SECTION}\n\n`python benchmarks/ops_bench.py --rounds {a.rounds}` — {os.cpu_count()}-core {cpu} CPU, jax {jax.__version__} "
            f"(backend {jax.default_backend()}), load average at start {load:.1f} (machine shared with other jobs; "
            f"ratios come from the same interleaved run). Best of {a.rounds} rounds x 2 calls; "
            "operands quantized beforehand, so each time is the op alone.\n\n" + tbl + '\n\n' + NOTES + '\n')
    print(text)
    if not a.no_write:
        write_section(text, Path(__file__).resolve().parent / 'RESULTS.md')


if __name__ == '__main__':
    main()
