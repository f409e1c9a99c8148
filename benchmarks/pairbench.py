"""Paired, interleaved timing of qarray against Qwix: the harness behind the layout tables.

Each row times two jitted callables (qarray's and Qwix's) call by call in ONE loop:
round ``r`` calls ``a`` then ``b`` (odd rounds ``b`` then ``a``), so machine load that
comes and goes hits both alike. Every call records wall time (what a user waits for)
and process CPU time (all threads of this process, less sensitive to other jobs on a
shared machine). A row reports the median of each library's times and the median of
the per-round ratios ``t_qwix / t_qarray`` (> 1: qarray is faster), for wall and CPU.

Example:
  >>> import jax.numpy as jnp
  >>> f = lambda x: x + 1
  >>> r = time_pair(f, (jnp.ones(4),), f, (jnp.ones(4),), rounds=3, warmup=1)
  >>> sorted(r)[:3], r['rounds']
  (['a_cpu_ms', 'a_wall_ms', 'b_cpu_ms'], 3)
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax


def _call(f: Callable, args: tuple) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t0, time.process_time() - c0


def time_pair(a: Callable, a_args: tuple, b: Callable, b_args: tuple, *, rounds: int = 30,
              warmup: int = 2, max_seconds: float | None = None) -> dict[str, Any]:
    """Interleaved timing of ``a(*a_args)`` vs ``b(*b_args)``; see the module doc.

    Stops early (after at least 5 rounds) once ``max_seconds`` of timing has passed.
    Returns medians in ms (``a_wall_ms``, ``a_cpu_ms``, ``b_wall_ms``, ``b_cpu_ms``), the medians
    of per-round ratios ``b / a`` (``ratio_wall``, ``ratio_cpu``), the interquartile range of the
    per-round wall ratios (``ratio_wall_q1``, ``ratio_wall_q3``), the number of rounds and the
    1-minute load average when the row finished (``load``).
    """
    for _ in range(warmup):
        jax.block_until_ready(a(*a_args))
        jax.block_until_ready(b(*b_args))
    aw, ac, bw, bc = [], [], [], []
    start = time.perf_counter()
    for r in range(rounds):
        if r % 2 == 0:
            ta, tb = _call(a, a_args), _call(b, b_args)
        else:
            tb, ta = _call(b, b_args), _call(a, a_args)
        aw.append(ta[0]); ac.append(ta[1]); bw.append(tb[0]); bc.append(tb[1])
        if max_seconds is not None and r >= 4 and time.perf_counter() - start > max_seconds:
            break
    med = statistics.median
    rw = sorted(y / x for x, y in zip(aw, bw))
    return dict(
        a_wall_ms=med(aw) * 1e3, a_cpu_ms=med(ac) * 1e3, b_wall_ms=med(bw) * 1e3, b_cpu_ms=med(bc) * 1e3,
        ratio_wall=med(rw), ratio_wall_q1=_quantile(rw, 0.25), ratio_wall_q3=_quantile(rw, 0.75),
        ratio_cpu=med(y / max(x, 1e-9) for x, y in zip(ac, bc)),
        rounds=len(aw), load=os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan'))


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted, non-empty list."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


#: Python of the separate venv holding Qwix HEAD (the wheel in ../shared/wheels); override with QWIX_HEAD_PYTHON.
QWIX_HEAD_PYTHON = os.environ.get('QWIX_HEAD_PYTHON', '/tmp/qwixhead-venv/bin/python')


def cpu_name() -> str:
    """The CPU model as ``lscpu`` names it (``platform`` as a fallback where lscpu is missing)."""
    import subprocess
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10).stdout
        name = next((l.split(':', 1)[1].strip() for l in out.splitlines() if l.startswith('Model name')), None)
    except (OSError, subprocess.SubprocessError):
        name = None
    return name or platform.processor() or platform.machine()


def machine() -> str:
    """One line naming the machine and software the numbers came from."""
    from importlib.metadata import version
    try:
        qv = version('qwix')
    except Exception:  # not installed
        qv = 'n/a'
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    return (f'{os.cpu_count()}-core {platform.machine()} CPU, jax {jax.__version__} ({jax.default_backend()}), '
            f'Qwix {qv}, Python {sys.version.split()[0]}, load average at start {load:.1f}')


def ratio_table(rows: list[dict], first_cols: list[str]) -> str:
    """Markdown table: ``first_cols`` of each row, then qarray / Qwix medians, the ratios (bold: wall below
    1.0x), the wall ratio's interquartile range, rounds, load average, and a rerun's ratios where rows have one.

    Example:
      >>> print(ratio_table([dict(case='c', op='q', a_wall_ms=2., a_cpu_ms=2., b_wall_ms=1., b_cpu_ms=1.,
      ...                         ratio_wall=.5, ratio_wall_q1=.4, ratio_wall_q3=.6, ratio_cpu=.5, rounds=3,
      ...                         load=1.5)], ['case', 'op']).splitlines()[2])
      | c | q | 2.00 / 1.00 | 2.00 / 1.00 | **0.50x** | 0.40-0.60 | 0.50x | 3 | 1.5 |
    """
    head = first_cols + ['wall ms qarray / Qwix', 'CPU ms qarray / Qwix', 'qwix/qarray wall',
                         'wall IQR', 'qwix/qarray CPU', 'rounds', 'load']
    rerun = any('rerun' in r for r in rows)
    if rerun:
        head.append('rerun wall (CPU)')
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(first_cols) + '---:|' * (len(head) - len(first_cols))]
    for r in rows:
        if r.get('error'):
            lines.append('| ' + ' | '.join(str(r[c]) for c in first_cols) + f" | {r['error']} |"
                         + ' |' * (len(head) - len(first_cols) - 1))
            continue
        w = f"{r['ratio_wall']:.2f}x"
        iqr = f"{r['ratio_wall_q1']:.2f}-{r['ratio_wall_q3']:.2f}" if 'ratio_wall_q1' in r else ''
        load = f"{r['load']:.1f}" if 'load' in r else ''
        line = ('| ' + ' | '.join(str(r[c]) for c in first_cols)
                + f" | {r['a_wall_ms']:.2f} / {r['b_wall_ms']:.2f} | {r['a_cpu_ms']:.2f} / {r['b_cpu_ms']:.2f}"
                f" | {'**' + w + '**' if r['ratio_wall'] < 1.0 else w} | {iqr} | {r['ratio_cpu']:.2f}x"
                f" | {r['rounds']} | {load} |")
        if rerun:
            again = r.get('rerun')
            line += f" {again['ratio_wall']:.2f}x ({again['ratio_cpu']:.2f}x) |" if again else ' |'
        lines.append(line)
    return '\n'.join(lines)


def summary(rows: list[dict]) -> str:
    """Geometric mean and minimum of the wall ratios, and how many rows are below 1.0x and 0.9x."""
    ok = [r for r in rows if not r.get('error')]
    if not ok:
        return 'no rows'
    import math
    g = math.exp(sum(math.log(r['ratio_wall']) for r in ok) / len(ok))
    worst = min(ok, key=lambda r: r['ratio_wall'])
    slow = sum(r['ratio_wall'] < 0.9 for r in ok)
    below = sum(r['ratio_wall'] < 1.0 for r in ok)
    return (f'{len(ok)} rows; geometric mean qwix/qarray wall ratio {g:.2f}x; {below} rows below 1.0x, '
            f'{slow} below 0.9x; '
            f"slowest: {worst.get('case', '')} {worst.get('fmt', '')} {worst.get('op', '')} "
            f"{worst['ratio_wall']:.2f}x")


def rerun_slow(rows: list[dict], below: float, key: tuple[str, ...], run: Callable) -> None:
    """Time again every row whose wall ratio is below ``below``: ``run(select)`` must return the rows that
    ``select(tuple of the row's key fields)`` keeps; each slow row gets the new measurement as ``rerun``.

    Example:
      >>> rows = [dict(case='a', ratio_wall=0.8), dict(case='b', ratio_wall=1.2)]
      >>> rerun_slow(rows, 1.0, ('case',), lambda sel: [dict(case=c, ratio_wall=1.1) for c in 'ab' if sel((c,))])
      >>> rows[0]['rerun']['ratio_wall'], 'rerun' in rows[1]
      (1.1, False)
    """
    slow = {tuple(r[k] for k in key) for r in rows if not r.get('error') and r['ratio_wall'] < below}
    if not slow:
        return
    again = {tuple(r[k] for k in key): r for r in run(lambda k: tuple(k) in slow) if not r.get('error')}
    for r in rows:
        k = tuple(r.get(f) for f in key)
        if k in slow and k in again:
            r['rerun'] = {f: v for f, v in again[k].items() if f not in key}


def dump_rows(rows: list[dict], path: str) -> None:
    """Write benchmark rows (plus the machine line) to a JSON file.

    Example:
      >>> import json, os, tempfile
      >>> p = os.path.join(tempfile.mkdtemp(), 'rows.json')
      >>> dump_rows([dict(case='a', ratio_wall=1.0)], p); json.load(open(p))['rows'][0]['case']
      'a'
    """
    import json
    with open(path, 'w') as f:
        json.dump(dict(machine=machine(), rows=rows), f, indent=1, default=float)
