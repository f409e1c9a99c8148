"""``python -m examples.minilm``: the full scheme table (qarray and Qwix side by side), printed as markdown.

Example:
  >>> import runpy  # doctest: +SKIP
"""

from examples.minilm import evaluate, report, schemes, weights

if __name__ == '__main__':
    reason = weights.missing_reason()
    if reason:
        raise SystemExit(f"MiniLM example: {reason}")
    print(report.markdown_table(evaluate.run_table(schemes.SCHEMES, log=print)))
