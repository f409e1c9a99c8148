"""Quantize / dequantize speed, storage and error: qarray vs Qwix 0.1.8, side by side.

Each row quantizes the same 4096x4096 float32 N(0, 1) matrix with both
libraries under ``jax.jit``; timings are medians over interleaved runs (qarray,
Qwix, qarray, ...) after a warm-up, so machine noise hits both equally.
Stored bytes are the real device buffer sizes (values + scales + zero
points); errors are against the float64 input.

Run: ``python benchmarks/quantize_bench.py [--size 4096] [--runs 7] [--write]``
(``--write`` replaces the "## Quantize (issue 2)" section of benchmarks/RESULTS.md).

Layout suite (issue 19): ``python benchmarks/quantize_bench.py --layouts [--quick] [--write]``
times quantize, dequantize and one jitted quantize->dequantize for every format on the
layouts models use -- Dense kernels ``[in, out]`` (one scale per output channel, tiles
along ``in``), conv kernels HWIO (per output channel, tiles along ``I``), einsum weights
``[heads, d_model, head_dim]`` (per head and head_dim, tiles along ``d_model``) and
activations ``[tokens, d]`` (per token, per tensor) -- at 512..4096 per side, each row a
qwix/qarray ratio from one interleaved run (see ``pairbench.py``). ``--quick`` is a smoke
run (< 1 min: small shapes, few rounds); ``--write`` replaces the
"## Quantize layouts vs Qwix (issue 19)" section of RESULTS.md.

Example:
  >>> rows = run(size=256, runs=1)
  >>> rows[0]['row']
  'int8 per-channel'
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import sys

if '--qarray' in sys.argv:  # benchmark another checkout (e.g. a `git archive` of a commit)
    sys.path.insert(0, os.path.abspath(sys.argv[sys.argv.index('--qarray') + 1]))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qarray  # noqa: E402
import pairbench  # noqa: E402

SECTION = '## Quantize (issue 2)'
LAYOUT_SECTION = '## Quantize layouts vs Qwix (issue 19)'

# (row label, qarray kwargs, qwix qtype, qwix kwargs). The weight is (in, out) = (K, N):
# per-channel means one scale per output column; "tiles t" means runs of t values
# along the last axis, every row channelwise (qarray's tiles=t, Qwix's tiled_axes={1: t}).
ROWS = [
    ('int8 per-channel', dict(qtype='int8', channelwise_axes=(1,)),
     jnp.int8, dict(channelwise_axes=(1,))),
    ('int4 tiles 128', dict(qtype='int4', tiles=128), jnp.int4, dict(channelwise_axes=(0,), tiled_axes={1: 128})),
    ('nf4 tiles 64', dict(qtype='nf4', tiles=64), 'nf4', dict(channelwise_axes=(0,), tiled_axes={1: 64})),
    ('int3 tiles 128', dict(qtype='int3', tiles=128), 'int3', dict(channelwise_axes=(0,), tiled_axes={1: 128})),
]


def device_bytes(tree) -> int:
    """Bytes the leaves of ``tree`` occupy on the device (what the buffers really take).

    Example:
      >>> device_bytes(jnp.zeros((4,), jnp.float32))
      16
    """
    total = 0
    for leaf in jax.tree.leaves(tree):
        try:
            total += leaf.addressable_data(0).on_device_size_in_bytes()
        except Exception:  # backends without the query: fall back to the logical size
            total += leaf.nbytes
    return total


def _median_ms(fns, arg, runs: int) -> list[tuple[float, float]]:
    """(wall, CPU) median ms of each fn(arg), runs interleaved across fns after a warm-up.

    CPU time (all threads of this process) is the steadier number on a shared
    machine: other processes' load stretches wall time but not our CPU time.
    """
    wall = [[] for _ in fns]
    cpu = [[] for _ in fns]
    for f in fns:
        jax.block_until_ready(f(arg))
        jax.block_until_ready(f(arg))
    for _ in range(runs):
        for i, f in enumerate(fns):
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(f(arg))
            wall[i].append((time.perf_counter() - t0) * 1e3)
            cpu[i].append((time.process_time() - c0) * 1e3)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(wall, cpu)]


def _errors(recon, ref64: np.ndarray) -> tuple[float, float]:
    err = np.asarray(recon, np.float64) - ref64
    return float(np.linalg.norm(err) / np.linalg.norm(ref64)), float(np.abs(err).max())


def run(size: int = 4096, runs: int = 7, seed: int = 0) -> list[dict]:
    """Benchmark every row; returns one dict per row with both libraries' numbers.

    Example:
      >>> run(size=128, runs=1)[-1]['row']
      'int3 tiles 128'
    """
    import qwix  # the [bench] extra

    w = jax.random.normal(jax.random.key(seed), (size, size), jnp.float32)
    w64 = np.asarray(w, np.float64)
    out = []
    for label, qa_kw, qw_qtype, qw_kw in ROWS:
        qa_kw = dict(qa_kw)
        if 'tiles' in qa_kw:
            qa_kw['tiles'] = min(qa_kw['tiles'], size)
        qw_kw = dict(qw_kw)
        if 'tiled_axes' in qw_kw:
            qw_kw['tiled_axes'] = {a: min(t, size) for a, t in qw_kw['tiled_axes'].items()}
        qa_q = jax.jit(lambda x, kw=qa_kw: qarray.quantize(x, **kw))
        qw_q = jax.jit(lambda x, kw=qw_kw, t=qw_qtype: qwix.quantize(x, t, **kw))
        qa_d = jax.jit(qarray.dequantize)
        qw_d = jax.jit(qwix.dequantize)
        qa_rt = jax.jit(lambda x, kw=qa_kw: qarray.dequantize(qarray.quantize(x, **kw)))
        qw_rt = jax.jit(lambda x, kw=qw_kw, t=qw_qtype: qwix.dequantize(qwix.quantize(x, t, **kw)))
        qa_stored, qw_stored = qa_q(w), qw_q(w)
        (qa_q_w, qa_q_c), (qw_q_w, qw_q_c) = _median_ms([qa_q, qw_q], w, runs)
        (qa_d_w, qa_d_c), = _median_ms([qa_d], qa_stored, runs)
        (qw_d_w, qw_d_c), = _median_ms([qw_d], qw_stored, runs)
        (qa_rt_w, qa_rt_c), (qw_rt_w, qw_rt_c) = _median_ms([qa_rt, qw_rt], w, runs)
        qa_err = _errors(qa_rt(w), w64)
        qw_err = _errors(qw_rt(w), w64)
        out.append(dict(row=label, qa_q=qa_q_c, qw_q=qw_q_c, qa_d=qa_d_c, qw_d=qw_d_c, qa_rt=qa_rt_c,
                        qw_rt=qw_rt_c, qa_rt_wall=qa_rt_w, qw_rt_wall=qw_rt_w,
                        qa_bytes=device_bytes(qa_stored), qw_bytes=device_bytes(qw_stored),
                        qa_rel=qa_err[0], qw_rel=qw_err[0], qa_max=qa_err[1], qw_max=qw_err[1]))
    return out


def to_markdown(rows: list[dict], size: int, runs: int) -> str:
    """The RESULTS.md section for ``rows``.

    Example:
      >>> to_markdown([], 8, 1).splitlines()[0]
      '## Quantize (issue 2)'
    """
    import qwix  # noqa: F401
    from importlib.metadata import version
    lines = [
        SECTION, '',
        f'quantize / dequantize of a {size}x{size} float32 N(0,1) matrix under `jax.jit`, qarray vs '
        f'Qwix {version("qwix")}, same data, same run (median of {runs} interleaved runs after warm-up). '
        f'Machine: {os.cpu_count()}-core {platform.machine()} CPU (shared), jax {jax.__version__} '
        f'({jax.default_backend()}). Produced by `python benchmarks/quantize_bench.py --write`.',
        '',
        '"q+dq" is one jitted quantize-then-dequantize program; "quantize" and "dequantize" are '
        'separate jitted programs (dequantize reads the stored QArray). Times are CPU ms (all threads '
        'of the process, median), steadier than wall time on this shared machine; q+dq wall ms is '
        'given too. "stored" is the real device buffer size of values + scales (+ zero points); '
        'rel err = ||dq - x|| / ||x|| against float64.',
        '',
        '| row | q+dq CPU ms qarray / Qwix | speed-up | quantize CPU ms qarray / Qwix '
        '| dequantize CPU ms qarray / Qwix | q+dq wall ms qarray / Qwix | stored MiB qarray / Qwix '
        '| rel err qarray / Qwix | max abs err qarray / Qwix |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    mib = 2.0**20
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['qa_rt']:.1f} / {r['qw_rt']:.1f} | {r['qw_rt'] / r['qa_rt']:.2f}x "
            f"| {r['qa_q']:.1f} / {r['qw_q']:.1f} | {r['qa_d']:.1f} / {r['qw_d']:.1f} "
            f"| {r['qa_rt_wall']:.1f} / {r['qw_rt_wall']:.1f} "
            f"| {r['qa_bytes'] / mib:.2f} / {r['qw_bytes'] / mib:.2f} | {r['qa_rel']:.5f} / {r['qw_rel']:.5f} "
            f"| {r['qa_max']:.4f} / {r['qw_max']:.4f} |")
    lines += [
        '',
        'Notes: both libraries put absmax on the edge of the top code\'s rounding cell (scale = absmax / '
        '(qmax + 1/2)), hence the identical errors. Qwix stores int4/int3 as `jnp.int4` (one byte per '
        'value on CPU) and nf4 as uint4 indices (also one byte on CPU); qarray bit-packs every sub-byte '
        'format. int8 has no packing and the same arithmetic in both, so that row is a tie within the '
        'run-to-run noise (about ±3 % here).',
    ]
    return '\n'.join(lines) + '\n'


# --------------------------------------------------------------------------- layout suite (issue 19)
# A layout: (name, shape, channelwise axes, tiled axis or None). A format: (label, qarray qtype,
# extra qarray kwargs, Qwix qtype, extra Qwix kwargs, tile or None). qarray's ``tiles={axis: t}`` is
# Qwix's ``tiled_axes={axis: t}``; ``channelwise_axes`` means the same in both; axes in neither
# share one scale in both. Qwix has no asymmetric uint4: qarray's 'uint4' + minmax (codes 0..15
# and a zero point) is set against Qwix's int4 + minmax (codes -8..7 and a zero point), the same
# 16 levels per group.
def _formats(kind: str) -> list[tuple]:
    fp8 = ('fp8 e4m3', 'float8_e4m3fn', {}, jnp.float8_e4m3fn, {}, None)
    int8 = ('int8', 'int8', {}, jnp.int8, {}, None)
    if kind == 'act':
        return [int8, fp8]
    return [int8, fp8,
            ('int4 t128', 'int4', {}, jnp.int4, {}, 128),
            ('nf4 t64', 'nf4', {}, 'nf4', {}, 64),
            ('uint4 minmax t128', 'uint4', dict(calibration='minmax'), jnp.int4,
             dict(calibration_method='minmax'), 128),
            ('int4 per-channel', 'int4', {}, jnp.int4, {}, None)]


def layout_cases(quick: bool) -> list[tuple]:
    """(layout, shape, channelwise axes, tiled axis, kind) for the quick or the full suite."""
    if quick:
        return [('dense [in,out]', (1024, 1024), (1,), 0, 'w'),
                ('conv HWIO', (3, 3, 128, 256), (3,), 2, 'w'),
                ('einsum [heads,d_model,head_dim]', (8, 512, 64), (0, 2), 1, 'w'),
                ('act per-token [tokens,d]', (512, 1024), (0,), None, 'act'),
                ('act per-tensor [tokens,d]', (512, 1024), (), None, 'act')]
    return [('dense [in,out]', (2048, 2048), (1,), 0, 'w'),
            ('dense [in,out]', (4096, 4096), (1,), 0, 'w'),
            ('dense [in,out]', (1024, 4096), (1,), 0, 'w'),
            ('dense [in,out]', (4096, 1024), (1,), 0, 'w'),
            ('dense [in,out]', (512, 512), (1,), 0, 'w'),
            ('conv HWIO', (3, 3, 256, 256), (3,), 2, 'w'),
            ('conv HWIO', (3, 3, 512, 512), (3,), 2, 'w'),
            ('einsum [heads,d_model,head_dim]', (16, 2048, 128), (0, 2), 1, 'w'),
            ('einsum [heads,d_model,head_dim]', (32, 4096, 128), (0, 2), 1, 'w'),
            ('act per-token [tokens,d]', (2048, 2048), (0,), None, 'act'),
            ('act per-token [tokens,d]', (512, 4096), (0,), None, 'act'),
            ('act per-tensor [tokens,d]', (2048, 2048), (), None, 'act'),
            ('act per-tensor [tokens,d]', (512, 4096), (), None, 'act')]


def layout_kwargs(shape, cw, tile_axis, fmt):
    """(qarray qtype, qarray kwargs, Qwix qtype, Qwix kwargs) of one format on one layout."""
    _, qa_t, qa_extra, qw_t, qw_extra, tile = fmt
    qa_kw = dict(channelwise_axes=cw, **qa_extra)
    qw_kw = dict(channelwise_axes=cw, **qw_extra)
    if tile is not None and tile_axis is not None:
        t = min(tile, shape[tile_axis])
        qa_kw['tiles'] = {tile_axis: t}
        qw_kw['tiled_axes'] = {tile_axis: t}
    return qa_t, qa_kw, qw_t, qw_kw


OPS = ('quantize', 'dequantize', 'quantize->dequantize')


def run_layouts(quick: bool = False, rounds: int | None = None, max_seconds: float | None = None,
                only: str | None = None, log=print, select=None) -> list[dict]:
    """Every (layout, format, op) row: qarray vs Qwix in one interleaved run each.

    ``select((case, fmt, op)) -> bool`` keeps only some rows (e.g. to rerun the slow ones).

    Example:
      >>> rows = run_layouts(quick=True, rounds=1, only='per-tensor', log=lambda *a: None)
      >>> rows[0]['op'], 'ratio_wall' in rows[0]
      ('quantize', True)
    """
    import qwix  # the [bench] extra
    rounds = rounds or (8 if quick else 40)
    max_seconds = max_seconds if max_seconds is not None else (0.4 if quick else 5.0)
    rows = []
    for li, (layout, shape, cw, tile_axis, kind) in enumerate(layout_cases(quick)):
        if only and only not in layout:
            continue
        x = jax.random.normal(jax.random.key(li), shape, jnp.float32)
        for fmt in _formats(kind):
            if quick and fmt[0] == 'int4 per-channel':  # keep the smoke run well under a minute
                continue
            qa_t, qa_kw, qw_t, qw_kw = layout_kwargs(shape, cw, tile_axis, fmt)
            base = dict(case=f'{layout} {"x".join(map(str, shape))}', fmt=fmt[0])
            ops = [op for op in OPS if select is None or select((base['case'], fmt[0], op))]
            if not ops:
                continue
            qa_q = jax.jit(lambda v, t=qa_t, kw=qa_kw: qarray.quantize(v, t, **kw))
            qw_q = jax.jit(lambda v, t=qw_t, kw=qw_kw: qwix.quantize(v, t, **kw))
            try:
                qa_stored, qw_stored = qa_q(x), qw_q(x)
                if tuple(qa_stored.scale.shape) != tuple(qw_stored.scale.shape):
                    raise ValueError(f'scale shapes differ: {qa_stored.scale.shape} vs {qw_stored.scale.shape}')
            except Exception as e:  # a format one library lacks on this layout
                rows.append(dict(base, op='all', error=f'{type(e).__name__}: {str(e)[:80]}'))
                continue
            progs = {
                'quantize': (qa_q, (x,), qw_q, (x,)),
                'dequantize': (jax.jit(qarray.dequantize), (qa_stored,), jax.jit(qwix.dequantize), (qw_stored,)),
                'quantize->dequantize': (
                    jax.jit(lambda v, t=qa_t, kw=qa_kw: qarray.dequantize(qarray.quantize(v, t, **kw))), (x,),
                    jax.jit(lambda v, t=qw_t, kw=qw_kw: qwix.dequantize(qwix.quantize(v, t, **kw))), (x,)),
            }
            for op in ops:
                fa, aa, fb, ab = progs[op]
                r = pairbench.time_pair(fa, aa, fb, ab, rounds=rounds, max_seconds=max_seconds)
                rows.append(dict(base, op=op, **r))
                log(f"  {base['case']:44s} {fmt[0]:18s} {op:22s} qwix/qarray wall {r['ratio_wall']:.2f}x "
                    f"CPU {r['ratio_cpu']:.2f}x ({r['a_wall_ms']:.2f} / {r['b_wall_ms']:.2f} ms)")
    return rows


def layouts_markdown(rows: list[dict], quick: bool) -> str:
    """The RESULTS.md section for the layout suite.

    Example:
      >>> layouts_markdown([], True).splitlines()[0]
      '## Quantize layouts vs Qwix (issue 19)'
    """
    mode = '--quick' if quick else 'full'
    return '\n'.join([
        LAYOUT_SECTION, '',
        f'`python benchmarks/quantize_bench.py --layouts{" --quick" if quick else ""}` ({mode} suite). '
        f'{pairbench.machine()}. float32 N(0,1) inputs, every program under `jax.jit`. Each row is ONE '
        'interleaved run: qarray and Qwix alternate call by call (the order flips every round); the '
        'ratio columns are medians of the per-round ratios t_Qwix / t_qarray (> 1: qarray faster; '
        'bold: below 0.9x), for wall time and for process CPU time (all threads). "dequantize" reads '
        'the stored array of each library; "quantize->dequantize" is one jitted program. Formats: '
        'qarray `uint4` + minmax is set against Qwix `int4` + minmax (same 16 levels and a zero point; '
        'Qwix has no asymmetric uint4); "t128" = tiles of 128 along the contracting axis (`in`, `I`, '
        '`d_model`) with one scale per output channel; activations: int8 / fp8 per token or per tensor.',
        '',
        pairbench.ratio_table(rows, ['case', 'fmt', 'op']),
        '',
        pairbench.summary(rows),
    ]) + '\n'


def write_section(text: str, path: str, section: str = SECTION) -> None:
    """Replace (or append) this benchmark's section in ``path``, leaving other sections alone.

    Example:
      >>> import tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), 'R.md')
      >>> write_section('## Quantize (issue 2)\\nx\\n', p); open(p).read()
      '## Quantize (issue 2)\\nx\\n'
    """
    old = open(path).read() if os.path.exists(path) else ''
    lines = old.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip() == section), None)
    if start is None:
        sep = '' if not old or old.endswith('\n\n') else ('\n' if old.endswith('\n') else '\n\n')
        new = old + sep + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith('## ')), len(lines))
        tail = ''.join(lines[end:])
        new = ''.join(lines[:start]) + text + ('\n' + tail if tail else '')
    with open(path, 'w') as f:
        f.write(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--size', type=int, default=4096)
    p.add_argument('--runs', type=int, default=7)
    p.add_argument('--write', action='store_true', help='write the table into benchmarks/RESULTS.md')
    p.add_argument('--layouts', action='store_true', help='the layout suite (issue 19) instead of the issue-2 table')
    p.add_argument('--quick', action='store_true', help='layout suite smoke run (< 1 min); implies --layouts')
    p.add_argument('--rounds', type=int, default=None, help='layout suite: rounds per row')
    p.add_argument('--only', default=None, help='layout suite: only layouts whose name contains this')
    p.add_argument('--qarray', default=None, help='path of another qarray checkout to benchmark')
    p.add_argument('--rerun-below', type=float, default=None,
                   help='layout suite: rerun the rows whose wall ratio is below this (a "rerun" column)')
    p.add_argument('--json', default=None, help='layout suite: also write the rows to this JSON file')
    a = p.parse_args()
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'RESULTS.md')
    if a.layouts or a.quick:
        rows = run_layouts(a.quick, a.rounds, only=a.only)
        if a.rerun_below is not None:
            pairbench.rerun_slow(rows, a.rerun_below, ('case', 'fmt', 'op'),
                                 lambda sel: run_layouts(a.quick, a.rounds, only=a.only, select=sel))
        if a.json:
            pairbench.dump_rows(rows, a.json)
        text = layouts_markdown(rows, a.quick)
        print(text)
        if a.write:
            write_section(text, results, LAYOUT_SECTION)
        return
    rows = run(a.size, a.runs)
    text = to_markdown(rows, a.size, a.runs)
    print(text)
    if a.write:
        write_section(text, results)


if __name__ == '__main__':
    main()
