"""The real-model section of ``python -m qarray``: MiniLM-L6 quantized, fidelity and memory.

Runs a few schemes live (:data:`~examples.minilm.schemes.TOUR_SCHEMES`, qarray
only, ~20 s on 2 CPU cores); the full side-by-side table with Qwix is in
``benchmarks/RESULTS.md`` (``python benchmarks/minilm_bench.py``).

Example:
  >>> from examples.minilm.tour import minilm_section
  >>> minilm_section()  # doctest: +SKIP
"""

from __future__ import annotations


__all__ = ['minilm_section']


def minilm_section(title: str = "MiniLM-L6 (all-MiniLM-L6-v2, 22.7M params): quantized vs float32") -> None:
    """Print a compact fidelity/memory table for a few schemes, or a one-line note when the model is missing.

    Example:
      >>> minilm_section()  # doctest: +SKIP
    """
    from examples.minilm import weights
    reason = weights.missing_reason()
    if reason:
        print(f"{title}: skipped ({reason}).")
        return
    try:
        from examples.minilm.evaluate import _fi
        _fi()
    except ImportError as e:
        print(f"{title}: skipped (flax_integration is not importable: {e}).")
        return
    from examples.minilm import evaluate, report, schemes
    from qarray._tour import print_table
    print(title)
    rows = evaluate.run_table([schemes.by_name(n) for n in schemes.TOUR_SCHEMES], with_qwix=False, timing=False)
    print_table(report.text_rows(rows), report.TEXT_COLUMNS[:-1])  # no latency: keeps the tour fast
    print("(48 hand-written sentence pairs; linear = the 36 quantized matmul weights with scales; total adds the "
          "float embeddings. Full table with Qwix: benchmarks/RESULTS.md.)")
