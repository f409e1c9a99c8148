"""Run the SmolLM2 rows (bytes, perplexity, ratio to float, decode tokens/s) for qarray and Qwix; render them.

"float32" is the shipped GGUF weights dequantized: the shipped matrices are
already 4-bit (Q4_1), so every ratio here is relative to that reference, not to
the original bf16 checkpoint.

Perplexity: :func:`~examples.smollm.evaluate.window_nll` over the same
evaluation windows for every row (KV-cache rows prefill each window through
the quantized cache). Decode speed: greedy generation of ``decode_tokens``
tokens after a short prompt, tokens/s = ``(n - 1) / (t(n) - t(1))`` (prefill
cancels); each row's runs are interleaved round-robin with the float model's
(and Qwix's), so every row carries its own float baseline and the ratio is
what to read on a noisy machine.

Example:
  >>> from examples.smollm.report import markdown_table
  >>> print(markdown_table([dict(scheme='float32', bytes=2**20, ppl=20.0, ppl_ratio=1.0)]).splitlines()[2])
  | float32 | 1.0 | 20.000 | 1.0000 | - | - | - | - | - |
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Sequence

import numpy as np

from examples._table import cell, header, row, with_ratio
from examples.smollm import decoding, evaluate
from examples.smollm.build import Built, build_qarray, build_qwix, stored_bytes
from examples.smollm.schemes import Scheme, qwix_missing_reason

__all__ = ['DEFAULT_PROMPT', 'ppl_of', 'decode_rates', 'run_table', 'markdown_table', 'TEXT_COLUMNS', 'text_rows']

DEFAULT_PROMPT = 'The capital of France is'
MIB = 2**20


def ppl_of(built: Built, windows: np.ndarray) -> float:
    """Perplexity of ``built`` on ``windows`` ``(n, T)`` (through its KV cache class, if any).

    Example:
      >>> from flax import nnx
      >>> import numpy as np
      >>> from examples.smollm.build import Built
      >>> from examples.smollm.model import SmolLM, SmolLMConfig
      >>> from examples.smollm.report import ppl_of
      >>> m = SmolLM(SmolLMConfig.tiny(layers=1), rngs=nnx.Rngs(0), param_init=nnx.initializers.zeros_init())
      >>> round(ppl_of(Built(m, nnx.state(m)), np.zeros((1, 8), np.int32)), 3)
      64.0
    """
    nll = evaluate.window_nll(built.model, built.params, windows, built.cache_cls)
    return float(math.exp(nll.sum() / (windows.shape[0] * (windows.shape[1] - 1))))


def decode_rates(builts: Sequence[Built | None], prompt: Sequence[int], n: int = 24, repeats: int = 3
                 ) -> list[float | None]:
    """Greedy-decode tokens/s of each model, ``(n - 1) / (median t(n) - median t(1))``, runs interleaved
    round-robin. (The medians are taken before the difference: one slow ``t(1)`` run -- a pause of the
    machine -- would otherwise make a single run's difference near zero or negative and its rate absurd.)
    None where the difference is not positive (too few tokens to measure).

    Example:
      >>> from examples.smollm.report import decode_rates
      >>> decode_rates([None], [1, 2])
      [None]
    """
    live = [b for b in builts if b is not None]
    for b in live:  # compile prefill and decode
        decoding.generate(b.model, b.params, prompt, 2, cache_cls=b.decode_cache_cls)
    first: dict[int, list[float]] = {id(b): [] for b in live}
    full: dict[int, list[float]] = {id(b): [] for b in live}
    for _ in range(repeats):
        for b in live:
            t0 = time.perf_counter()
            decoding.generate(b.model, b.params, prompt, 1, cache_cls=b.decode_cache_cls)
            t1 = time.perf_counter()
            decoding.generate(b.model, b.params, prompt, n, cache_cls=b.decode_cache_cls)
            t2 = time.perf_counter()
            first[id(b)].append(t1 - t0)
            full[id(b)].append(t2 - t1)

    def rate(b: Built | None) -> float | None:
        if b is None:
            return None
        dt = statistics.median(full[id(b)]) - statistics.median(first[id(b)])
        return (n - 1) / dt if dt > 0 else None

    return [rate(b) for b in builts]


def run_table(schemes: Sequence[Scheme], float_built: Built, windows: np.ndarray, *,
              calib_windows: np.ndarray | None = None, prompt: Sequence[int] = (), with_qwix: bool = True,
              timing: bool = True, decode_tokens: int = 24, repeats: int = 3, float_ppl: float | None = None,
              with_ppl: bool = True,
              log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One row per scheme: bytes, perplexity and its ratio to the float row, decode tokens/s (and Qwix's).

    ``float_built`` is the float reference; its perplexity is computed once (or passed as ``float_ppl``).
    ``prompt`` (token ids) is used for the decode timing (``timing=True``);
    ``with_ppl=False`` skips the perplexities (a timing-only run).

    Example:
      >>> from examples.smollm.report import run_table
      >>> run_table([], None, None, with_qwix=False, timing=False)  # doctest: +SKIP
      []
    """
    if with_qwix:
        try:
            import qwix  # noqa: F401
        except ImportError:
            with_qwix = False
    if with_ppl:
        float_ppl = ppl_of(float_built, windows) if float_ppl is None else float_ppl
    measure = lambda b: None if not with_ppl else float_ppl if b is float_built else ppl_of(b, windows)
    ratio = lambda v: None if v is None else v / float_ppl
    rows = []
    for scheme in schemes:
        t0 = time.perf_counter()
        try:
            ours = build_qarray(scheme, float_built, calib_windows)
            ppl = measure(ours)
        except Exception as e:  # one failing row is reported as such; the others still run
            rows.append(dict(scheme=scheme.name, error=f'{type(e).__name__}: {str(e)[:200]}'))
            if log:
                log(f"{scheme.name}: FAILED {rows[-1]['error']}")
            continue
        row: dict[str, Any] = dict(scheme=scheme.name, bytes=stored_bytes(ours.params), ppl=ppl,
                                   ppl_ratio=ratio(ppl))
        if ours.cache_cls is not None:
            row['kv_bytes_per_token'] = _kv_bytes_per_token(ours)
        theirs = None
        if with_qwix:
            row['qwix_reason'] = qwix_missing_reason(scheme)
            if row['qwix_reason'] is None:
                try:
                    theirs = build_qwix(scheme, float_built)
                except Exception as e:  # a Qwix failure is a table entry, with its reason
                    row['qwix_reason'] = f'Qwix 0.1.8 failed: {type(e).__name__}: {str(e)[:120]}'
            if theirs is not None:
                qppl = measure(theirs)
                row.update(qwix_bytes=stored_bytes(theirs.params), qwix_bytes_packed=stored_bytes(theirs.params,
                                                                                                 packed=True),
                           qwix_ppl=qppl, qwix_ppl_ratio=ratio(qppl))
        if timing:
            same = [theirs if theirs is not ours and theirs is not float_built else None]
            f_rate, rate, q_rate = decode_rates([float_built, ours if ours is not float_built else None] + same,
                                                prompt, decode_tokens, repeats)
            row.update(float_tok_s=f_rate, tok_s=f_rate if ours is float_built else rate)
            if theirs is not None:
                row['qwix_tok_s'] = q_rate if same[0] is not None else (f_rate if theirs is float_built else rate)
        rows.append(row)
        if log:
            log(f"{scheme.name}: ppl {ppl} (x{row['ppl_ratio']})"
                + (f", Qwix {row['qwix_ppl']}" if 'qwix_ppl' in row else '')
                + (f", tok/s {row.get('tok_s')} vs float {row.get('float_tok_s')}, Qwix {row.get('qwix_tok_s')}"
                   if timing else '')
                + f"; {time.perf_counter() - t0:.0f} s")
    return rows


def _kv_bytes_per_token(built: Built) -> int:
    cfg = built.model.cfg
    cache = built.cache_cls.init(1, 1, cfg.kv_heads, cfg.head_dim)
    return cache.nbytes * cfg.layers


def _rate(r: dict, key: str) -> str:
    return with_ratio(r.get(key), r.get('float_tok_s'), '.1f')


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table (Qwix columns: its numbers, or why it has none).

    Example:
      >>> from examples.smollm.report import markdown_table
      >>> markdown_table([]).startswith('| scheme |')
      True
    """
    head = ['scheme', 'stored MiB', 'perplexity', 'x float', 'decode tok/s (x float)', 'Qwix 0.1.8 MiB (int4 packed)',
            'Qwix perplexity', 'Qwix x float', 'Qwix decode tok/s (x float)']
    lines = header(head)
    for r in rows:
        if 'error' in r:
            lines.append(row([r['scheme'], f"failed: {r['error']}"] + ['-'] * (len(head) - 2)))
            continue
        qb = (f"{r['qwix_bytes'] / MIB:.1f} ({r['qwix_bytes_packed'] / MIB:.1f})" if 'qwix_bytes' in r else '-')
        mib = f"{r['bytes'] / MIB:.1f}"
        if 'kv_bytes_per_token' in r:
            mib += f" + KV {r['kv_bytes_per_token']} B/token"
        cells = [r['scheme'], mib, cell(r.get('ppl'), '.3f'), cell(r.get('ppl_ratio'), '.4f'), _rate(r, 'tok_s')]
        if 'qwix_ppl' in r:
            cells += [qb, cell(r['qwix_ppl'], '.3f'), cell(r['qwix_ppl_ratio'], '.4f'), _rate(r, 'qwix_tok_s')]
        elif r.get('qwix_reason'):
            cells += [f"n/a: {r['qwix_reason']}", '-', '-', '-']
        else:
            cells += ['-', '-', '-', '-']
        lines.append(row(cells))
    return '\n'.join(lines)


# (key, header, format) for qarray._tour.print_table.
TEXT_COLUMNS = [('scheme', 'scheme', ''), ('mib', 'stored MiB', '.1f'), ('ppl', 'perplexity', '.3f'),
                ('ppl_ratio', 'x float', '.4f')]


def text_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the derived fields :data:`TEXT_COLUMNS` needs.

    Example:
      >>> from examples.smollm.report import text_rows
      >>> text_rows([dict(scheme='a', bytes=2**20, ppl=2.0, ppl_ratio=1.0)])[0]['mib']
      1.0
    """
    nan = float('nan')
    return [dict(r, mib=nan, ppl=nan, ppl_ratio=nan) if 'error' in r else dict(r, mib=r['bytes'] / MIB)
            for r in rows]
