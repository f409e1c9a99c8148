"""SmolLM2-135M: every quantization scheme side by side with Qwix 0.1.8 -> benchmarks/results_smollm.md.

Rows: the model as shipped (the GGUF file's Q4_1/Q8_0 codes as QArrays), the
same weights dequantized to float32 (the reference: the shipped matrices are
already 4-bit, so "float" means those weights dequantized), re-quantized schemes
(:data:`examples.smollm.schemes.SCHEMES`) and the float model with int8 / fp8
KV caches. Columns: stored bytes, perplexity on Wikipedia windows, ratio to
float, greedy-decode tokens/s interleaved with the float model's (CPU).

Usage: ``python benchmarks/smollm_bench.py [--windows 16] [--window 256] [--calib 16] [--no-qwix]
[--no-timing] [--schemes NAME ...] [--out PATH]``
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import pairbench  # noqa: E402
from examples.smollm import corpus, weights  # noqa: E402
from examples.smollm.build import Built  # noqa: E402
from examples.smollm import report, schemes  # noqa: E402

CALIB_START = 16  # calibration windows: articles 16.. (the evaluation windows are articles 0..windows-1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--windows', type=int, default=16)
    p.add_argument('--window', type=int, default=256)
    p.add_argument('--calib', type=int, default=64, help='GPTQ calibration windows (other articles)')
    p.add_argument('--decode-tokens', type=int, default=24)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--no-qwix', action='store_true')
    p.add_argument('--no-timing', action='store_true')
    p.add_argument('--no-ppl', action='store_true', help='decode timing only')
    p.add_argument('--schemes', nargs='*', default=None)
    p.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results_smollm.md'))
    args = p.parse_args(argv)
    if args.calib and CALIB_START < args.windows:
        raise SystemExit(f"--windows {args.windows} would overlap the calibration articles (from {CALIB_START})")
    t_start = time.perf_counter()
    model, params, tok = weights.load()
    float_built = Built(model, params)
    windows = corpus.token_windows(tok, args.window, args.windows)
    calib = corpus.token_windows(tok, args.window, args.calib, start=CALIB_START) if args.calib else None
    rows_in = [schemes.by_name(n) for n in args.schemes] if args.schemes else schemes.SCHEMES
    log = lambda s: print(s, flush=True)
    float_ppl = None if args.no_ppl else report.ppl_of(float_built, windows)
    rows = []
    for scheme in rows_in:  # one row at a time, the file rewritten after each (a long run keeps what it has)
        rows += report.run_table([scheme], float_built, windows, calib_windows=calib,
                                 prompt=tok.encode(report.DEFAULT_PROMPT), with_qwix=not args.no_qwix,
                                 timing=not args.no_timing, decode_tokens=args.decode_tokens, repeats=args.repeats,
                                 float_ppl=float_ppl, with_ppl=not args.no_ppl, log=log)
        _write(args, rows, t_start)


def _write(args, rows, t_start) -> None:
    import jax
    import qwix
    header = [
        '## SmolLM2-135M-Instruct: every scheme side by side (`python benchmarks/smollm_bench.py`)',
        '',
        f'Machine: {pairbench.cpu_name()}, {os.cpu_count()} cores visible (shared with other jobs), JAX {jax.__version__} CPU, '
        f'Qwix {getattr(qwix, "__version__", "0.1.8")}. Perplexity: {args.windows} Wikipedia windows x '
        f'{args.window} tokens (gensim test data, one article each, articles 0..{args.windows - 1}); GPTQ calibrated '
        f'on {args.calib} other articles ({CALIB_START}..{CALIB_START + args.calib - 1}) x {args.window} tokens. '
        + ('Decode: not measured in this run (--no-timing). ' if args.no_timing else
         f'Decode: greedy, {args.decode_tokens} tokens after "{report.DEFAULT_PROMPT}", median of {args.repeats} '
         'runs, each row interleaved with the float model (ratios are the numbers to read). ')
        + f'Run time so far: {(time.perf_counter() - t_start) / 60:.0f} min.',
        '',
        '"float32" is the shipped GGUF weights (Q4_1 matrices, Q8_0 embedding) **dequantized** to float32: the '
        'shipped matrices are already 4-bit, so every ratio is relative to that reference, not to the bf16 '
        'checkpoint. Re-quantized rows start from it and quantize the 210 linear layers as named, plus the '
        'embedding table (also the tied head) to int8 with one scale per row (weight-only); Qwix 0.1.8 keeps the '
        'embedding float32 (it intercepts no gather), so its stored MiB include a 108 MiB float table. '
        'Qwix stores int4 as `jnp.int4`, one byte per value on CPU (packed size in brackets). '
        'KV-cache rows: stored MiB of the weights + KV bytes per token (all 30 layers).',
        '',
    ]
    text = '\n'.join(header) + '\n' + report.markdown_table(rows) + '\n'
    pathlib.Path(args.out).write_text(text)


if __name__ == '__main__':
    main()
