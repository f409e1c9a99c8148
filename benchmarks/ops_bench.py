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

Layout suite (issue 19): ``python benchmarks/ops_bench.py --layouts [--quick] [--write]``
times qarray against Qwix 0.1.8 on the layouts models use -- Dense ``x[tokens, in] @ W[in, out]``,
conv NHWC x HWIO, einsum ``'btd,ndh->btnh'`` with ``W[heads, d_model, head_dim]`` -- as
weight-only matmuls for every weight format (int8 / fp8 per output channel; int4, uint4 minmax
and nf4 with tiles along the contracting axis; int4 per channel) and as w8a8 / w4a8 / fp8 matmuls
whose activations are quantized inside the timed call (per token or per tensor, dynamic range, as
PTQ inference runs them). Each row is a qwix/qarray ratio from ONE interleaved run (the two
libraries alternate call by call; medians of per-round ratios, wall and process CPU time; see
``pairbench.py``). ``--quick`` is a smoke run (< 1 min); ``--write`` replaces the
"## Ops layouts vs Qwix (issue 19)" section of RESULTS.md (the layout suite never writes otherwise).

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
if '--qarray' in sys.argv:  # benchmark another checkout (e.g. a `git archive` of a commit)
    sys.path.insert(0, os.path.abspath(sys.argv[sys.argv.index('--qarray') + 1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import qarray  # noqa: E402
import pairbench  # noqa: E402

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


# --------------------------------------------------------------------------- layout suite (issue 19)
LAYOUT_SECTION = '## Ops layouts vs Qwix (issue 19)'

# Weight formats: (label, qarray qtype, qarray extra kwargs, Qwix qtype, Qwix extra kwargs, tile or None).
# Tiles run along the contracting axis; every non-contracting axis of the weight is channelwise.
# qarray 'uint4' + minmax is set against Qwix int4 + minmax (Qwix has no asymmetric uint4).
WEIGHT_FORMATS = [
    ('int8', 'int8', {}, jnp.int8, {}, None),
    ('fp8 e4m3', 'float8_e4m3fn', {}, jnp.float8_e4m3fn, {}, None),
    ('int4 t128', 'int4', {}, jnp.int4, {}, 128),
    ('nf4 t64', 'nf4', {}, 'nf4', {}, 64),
    ('uint4 minmax t128', 'uint4', dict(calibration='minmax'), jnp.int4, dict(calibration_method='minmax'), 128),
    ('int4 per-channel', 'int4', {}, jnp.int4, {}, None),
]
# Quantized-activation rows: (label, weight format label, activation qtype (qarray, Qwix), act granularity).
ACT_ROWS = [
    ('w8a8 act per-token', 'int8', ('int8', jnp.int8), 'token'),
    ('w8a8 act per-tensor', 'int8', ('int8', jnp.int8), 'tensor'),
    ('w4a8 (int4 t128) act per-token', 'int4 t128', ('int8', jnp.int8), 'token'),
    ('fp8 x fp8 act per-token', 'fp8 e4m3', ('float8_e4m3fn', jnp.float8_e4m3fn), 'token'),
]


def layout_op_cases(quick: bool) -> list[dict]:
    """The op layouts: Dense, conv (NHWC x HWIO) and head-einsum, quick or full sizes."""
    def dense(t, k, n):
        return dict(kind='dense', name=f'dense x[{t},{k}] @ W[{k},{n}]', x=(t, k), w=(k, n), contract=0,
                    chan=(1,), token_axes=(0,))

    def conv(b, hw, c, o):
        return dict(kind='conv', name=f'conv x[{b},{hw},{hw},{c}] * W[3,3,{c},{o}]', x=(b, hw, hw, c),
                    w=(3, 3, c, o), contract=2, chan=(3,), token_axes=(0,))

    def heads(t, d, n, h):
        return dict(kind='einsum', name=f"einsum btd,ndh x[1,{t},{d}] W[{n},{d},{h}]", x=(1, t, d),
                    w=(n, d, h), contract=1, chan=(0, 2), token_axes=(0, 1))
    if quick:
        return [dense(64, 1024, 1024), conv(2, 14, 128, 128), heads(64, 512, 8, 64)]
    return [dense(256, 2048, 2048), dense(256, 4096, 4096), dense(256, 1024, 4096), dense(256, 4096, 1024),
            dense(1, 4096, 4096), conv(8, 28, 256, 256), conv(8, 14, 512, 512), heads(256, 2048, 16, 128),
            heads(256, 4096, 32, 128)]


def _op_fns(case):
    """(qarray op, Qwix op) taking (activation, weight) for a case."""
    qw = _qwix()
    if case['kind'] == 'dense':
        return (lambda a, b: qarray.dot_general(a, b, MK)), (lambda a, b: qw.dot_general(a, b, MK))
    if case['kind'] == 'conv':
        return (lambda a, b: qarray.conv_general_dilated(a, b, **CONV)), (lambda a, b: qw.conv_general_dilated(a, b, **CONV))
    return (lambda a, b: qarray.einsum('btd,ndh->btnh', a, b)), (lambda a, b: qw.einsum('btd,ndh->btnh', a, b))


def _weight_kwargs(case, fmt):
    _, qa_t, qa_extra, qw_t, qw_extra, tile = fmt
    qa_kw = dict(channelwise_axes=case['chan'], **qa_extra)
    if qarray.qtypes.get(qa_t).packed:  # as flax_integration stores these weights: packed along the contraction
        qa_kw['pack_axis'] = case['contract']
    qw_kw = dict(channelwise_axes=case['chan'], **qw_extra)
    if tile is not None:
        t = min(tile, case['w'][case['contract']])
        qa_kw['tiles'] = {case['contract']: t}
        qw_kw['tiled_axes'] = {case['contract']: t}
    return qa_t, qa_kw, qw_t, qw_kw


def run_layouts(quick: bool = False, rounds: int | None = None, max_seconds: float | None = None,
                only: str | None = None, log=print, select=None) -> list[dict]:
    """Weight-only and quantized-activation rows for every op layout; qarray vs Qwix interleaved.
    ``select((case, op)) -> bool`` keeps only some rows (e.g. to rerun the slow ones)."""
    qw = _qwix()
    if qw is None:
        raise SystemExit('the layout suite needs Qwix (pip install qwix==0.1.8, the [bench] extra)')
    rounds = rounds or (6 if quick else 30)
    max_seconds = max_seconds if max_seconds is not None else (0.5 if quick else 5.0)
    rows = []
    fmts = {f[0]: f for f in WEIGHT_FORMATS}
    for ci, case in enumerate(layout_op_cases(quick)):
        if only and only not in case['name']:
            continue
        kx, kw_ = jax.random.split(jax.random.key(100 + ci))
        x = jax.random.normal(kx, case['x'], jnp.float32)
        w = jax.random.normal(kw_, case['w'], jnp.float32)
        qa_op, qw_op = _op_fns(case)
        work = []
        for fmt in (WEIGHT_FORMATS if not quick else [fmts['int8'], fmts['int4 t128'], fmts['nf4 t64']]):
            work.append((f'weight-only {fmt[0]}', fmt, None))
        for label, wf, act, gran in (ACT_ROWS if not quick else ACT_ROWS[:1]):
            work.append((label, fmts[wf], (act, gran)))
        for label, fmt, act in work:
            if select is not None and not select((case['name'], label)):
                continue
            qa_t, qa_kw, qw_t, qw_kw = _weight_kwargs(case, fmt)
            base = dict(case=case['name'], op=label)
            try:
                wa, wb = qarray.quantize(w, qa_t, **qa_kw), qw.quantize(w, qw_t, **qw_kw)
                if act is None:
                    fa = jax.jit(qa_op)
                    fb = jax.jit(qw_op)
                else:
                    (at_a, at_b), gran = act
                    axes = case['token_axes'] if gran == 'token' else ()
                    fa = jax.jit(lambda v, q, t=at_a, ax=axes: qa_op(qarray.quantize(v, t, channelwise_axes=ax), q))
                    fb = jax.jit(lambda v, q, t=at_b, ax=axes: qw_op(qw.quantize(v, t, channelwise_axes=ax), q))
                ya, yb = fa(x, wa), fb(x, wb)
                if ya.shape != yb.shape:
                    raise ValueError(f'output shapes differ: {ya.shape} vs {yb.shape}')
            except Exception as e:  # a combination one library does not support
                rows.append(dict(base, error=f'{type(e).__name__}: {str(e)[:80]}'))
                log(f"  {case['name']:40s} {label:34s} skipped: {type(e).__name__}: {str(e)[:80]}")
                continue
            r = pairbench.time_pair(fa, (x, wa), fb, (x, wb), rounds=rounds, max_seconds=max_seconds)
            rows.append(dict(base, **r))
            log(f"  {case['name']:40s} {label:34s} qwix/qarray wall {r['ratio_wall']:.2f}x CPU {r['ratio_cpu']:.2f}x "
                f"({r['a_wall_ms']:.2f} / {r['b_wall_ms']:.2f} ms)")
    return rows


def layouts_markdown(rows: list[dict], quick: bool) -> str:
    """The RESULTS.md section for the op layout suite."""
    return '\n'.join([
        LAYOUT_SECTION, '',
        f'`python benchmarks/ops_bench.py --layouts{" --quick" if quick else ""}`. {pairbench.machine()}. '
        'Weights are quantized beforehand (as stored; sub-byte codes packed along the contraction axis, '
        'as flax_integration stores them); "weight-only" multiplies float32 activations; '
        'w8a8 / w4a8 / fp8 rows quantize the activations inside the timed call (dynamic range, per '
        'token or per tensor) as PTQ inference does. Each row is ONE interleaved run: qarray and Qwix '
        'alternate call by call; ratios are medians of per-round t_Qwix / t_qarray (> 1: qarray faster; '
        'bold: below 0.9x), wall and process CPU time. Weight layouts: Dense `[in, out]`, conv HWIO and '
        'einsum `[heads, d_model, head_dim]` with one scale per output channel (per head and head_dim), '
        '"t128"/"t64" tiles along the contracting axis; qarray uint4 + minmax vs Qwix int4 + minmax.',
        '',
        pairbench.ratio_table(rows, ['case', 'op']),
        '',
        pairbench.summary(rows),
    ]) + '\n'


def write_section(text: str, path: Path, section: str = SECTION) -> None:
    """Replace (or append) only this benchmark's section of RESULTS.md."""
    old = path.read_text() if path.exists() else '# Benchmark results\n'
    start = old.find(section)
    if start < 0:
        new = old.rstrip('\n') + '\n\n' + text + '\n'
    else:
        nxt = old.find('\n## ', start + len(section))
        new = old[:start] + text + ('\n' + old[nxt + 1:] if nxt >= 0 else '\n')
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--rounds', type=int, default=10)
    ap.add_argument('--no-write', action='store_true')
    ap.add_argument('--layouts', action='store_true', help='the layout suite (issue 19)')
    ap.add_argument('--quick', action='store_true', help='layout suite smoke run (< 1 min); implies --layouts')
    ap.add_argument('--write', action='store_true', help='layout suite: write its section of RESULTS.md')
    ap.add_argument('--only', default=None, help='layout suite: only cases whose name contains this')
    ap.add_argument('--qarray', default=None, help='path of another qarray checkout to benchmark')
    ap.add_argument('--rerun-below', type=float, default=None,
                    help='layout suite: rerun the rows whose wall ratio is below this (a "rerun" column)')
    ap.add_argument('--json', default=None, help='layout suite: also write the rows to this JSON file')
    a = ap.parse_args()
    if a.layouts or a.quick:
        rounds = None if a.rounds == ap.get_default('rounds') else a.rounds
        rows = run_layouts(a.quick, rounds, only=a.only)
        if a.rerun_below is not None:
            pairbench.rerun_slow(rows, a.rerun_below, ('case', 'op'),
                                 lambda sel: run_layouts(a.quick, rounds, only=a.only, select=sel))
        if a.json:
            pairbench.dump_rows(rows, a.json)
        text = layouts_markdown(rows, a.quick)
        print(text)
        if a.write and not a.quick:
            write_section(text, Path(__file__).resolve().parent / 'RESULTS.md', LAYOUT_SECTION)
        return
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
