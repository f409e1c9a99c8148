"""``python -m examples.smollm [--windows N] [--window T]``: load time, forward/decode speed, perplexity, a generation.

Example:
  >>> from examples.smollm.__main__ import parse_args
  >>> parse_args(['--windows', '2']).windows
  2
"""

from __future__ import annotations

import argparse
import time
from typing import Sequence

import numpy as np

from examples.smollm import corpus, decoding, evaluate, weights


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--windows``, ``--window``, ``--prompt``, ``--tokens``)."""
    p = argparse.ArgumentParser(prog='python -m examples.smollm', description=__doc__.splitlines()[0])
    p.add_argument('--windows', type=int, default=4, help='number of corpus windows for perplexity')
    p.add_argument('--window', type=int, default=256, help='tokens per window')
    p.add_argument('--prompt', default='The capital of France is')
    p.add_argument('--tokens', type=int, default=32, help='tokens to generate')
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the measurements (compile time is excluded except where the line says it is included).

    Example:
      >>> from examples.smollm.__main__ import main
      >>> main(['--windows', '1', '--tokens', '4'])  # doctest: +SKIP
      load (GGUF read + dequantize + model build): 12.3 s
      ...
    """
    args = parse_args(argv)
    t0 = time.perf_counter()
    model, params, tok = weights.load()
    print(f"load (GGUF read + dequantize + model build): {time.perf_counter() - t0:.1f} s")
    windows = corpus.token_windows(tok, args.window, args.windows)
    t0 = time.perf_counter()
    evaluate.window_nll(model, params, windows[:1])
    print(f"first {args.window}-token window (with compile): {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    nll = evaluate.window_nll(model, params, windows)
    per_window = (time.perf_counter() - t0) / len(windows)
    ppl = float(np.exp(nll.sum() / (len(windows) * (args.window - 1))))
    print(f"forward + NLL per {args.window}-token window: {per_window:.2f} s")
    print(f"perplexity on {len(windows)} Wikipedia windows of {args.window} tokens: {ppl:.3f}")
    prompt = tok.encode(args.prompt)
    decoding.generate(model, params, prompt, 2)  # compile prefill and decode
    t0 = time.perf_counter()
    decoding.generate(model, params, prompt, 1)
    t1 = time.perf_counter()
    out = decoding.generate(model, params, prompt, args.tokens)
    t2 = time.perf_counter()
    step = ((t2 - t1) - (t1 - t0)) / max(args.tokens - 1, 1)
    print(f"prefill ({len(prompt)} tokens): {t1 - t0:.3f} s; decode: {1 / step:.1f} tokens/s")
    print(f"greedy: {args.prompt!r} -> {tok.decode(out)!r}")


if __name__ == '__main__':
    main()
