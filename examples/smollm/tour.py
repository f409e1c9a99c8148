"""The SmolLM2 section of ``python -m qarray --full``: a few schemes live, then greedy text, float vs int4.

Runs :data:`~examples.smollm.schemes.TOUR_SCHEMES` (qarray only, no timing) on
a few short Wikipedia windows, then greedy continuations of a few prompts from
the float reference and from the int4 row. It takes a few minutes on 2 CPU cores
(each row quantizes 135M weights and compiles its forward), hence ``--full``.
The full table with Qwix and decode speed: ``python benchmarks/smollm_bench.py``.

Example:
  >>> from examples.smollm.tour import smollm_section
  >>> smollm_section()  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

__all__ = ['PROMPTS', 'INT4_ROW', 'smollm_section']

PROMPTS = ('The capital of France is', 'The largest planet in the solar system is', 'Water boils at a temperature of')
INT4_ROW = 'int4 t128 gptq hadamard weight-only'


def smollm_section(title: str = "SmolLM2-135M (GGUF, Q4_1): quantized rows vs the float reference",
                   windows: int = 2, window: int = 128, tokens: int = 10,
                   prompts: Sequence[str] = PROMPTS) -> None:
    """Print a short perplexity table and float-vs-int4 generations, or one line saying why it is skipped.

    Example:
      >>> from examples.smollm.tour import smollm_section
      >>> smollm_section(windows=1)  # doctest: +SKIP
    """
    from examples.smollm import corpus, gguf_file
    reason = gguf_file.missing_reason() or corpus.missing_reason()
    if reason:
        print(f"{title}: skipped ({reason}).")
        return
    from examples.smollm import decoding, report, schemes, weights
    from examples.smollm.build import Built, build_qarray
    from qarray._tour import print_table
    print(title)
    model, params, tok = weights.load()
    float_built = Built(model, params)
    eval_windows = corpus.token_windows(tok, window, windows)
    calib = corpus.token_windows(tok, window, 4, start=64)
    names = list(schemes.TOUR_SCHEMES)
    rows = report.run_table([schemes.by_name(n) for n in names], float_built, eval_windows, calib_windows=calib,
                            with_qwix=False, timing=False)
    print_table(report.text_rows(rows), report.TEXT_COLUMNS)
    print(f"(perplexity on {windows} Wikipedia windows x {window} tokens; \"float32\" = the shipped Q4_1/Q8_0 "
          "weights dequantized, the reference; re-quantized rows add int8 embeddings. Full table with Qwix: "
          "benchmarks/RESULTS.md.)")
    int4 = build_qarray(schemes.by_name(INT4_ROW), float_built, calib)
    print(f"greedy, {tokens} tokens: float32 vs {INT4_ROW}")
    for prompt in prompts:
        ids = tok.encode(prompt)
        a = tok.decode(decoding.generate(float_built.model, float_built.params, ids, tokens))
        b = tok.decode(decoding.generate(int4.model, int4.params, ids, tokens))
        print(f"  {prompt!r}\n    float32: {a!r}\n    int4:    {b!r}")
