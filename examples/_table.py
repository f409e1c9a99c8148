"""Markdown-table cells shared by the example reports (``examples/minilm/report.py``, ``examples/smollm/report.py``).

Example:
  >>> from examples._table import cell, header, with_ratio
  >>> header(['a', 'b']), cell(None, '.2f'), with_ratio(3.0, 2.0, '.1f')
  (['| a | b |', '|---|---|'], '-', '3.0 (1.50x)')
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ['cell', 'with_ratio', 'header', 'row']


def cell(v: Any, spec: str) -> str:
    """``v`` formatted with ``spec``, or ``'-'`` for None."""
    return '-' if v is None else format(v, spec)


def with_ratio(v: float | None, base: float | None, spec: str) -> str:
    """``v`` and its ratio to ``base`` (``'12 (0.50x)'``); just ``v`` without a base; ``'-'`` for None."""
    if v is None:
        return '-'
    return f"{v:{spec}} ({v / base:.2f}x)" if base else format(v, spec)


def header(names: Sequence[str]) -> list[str]:
    """The two header lines of a markdown table."""
    return [row(names), '|' + '|'.join('---' for _ in names) + '|']


def row(cells: Sequence[str]) -> str:
    """One markdown table row."""
    return '| ' + ' | '.join(cells) + ' |'
