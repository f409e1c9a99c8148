"""Render scheme rows (from :func:`examples.minilm.evaluate.run_table`) as markdown or text.

Example:
  >>> rows = [dict(scheme='float32', bytes=2**20, linear_bytes=2**20, cos=1.0, spearman=1.0, ms=None)]
  >>> print(markdown_table(rows).splitlines()[2])
  | float32 | 1.00 | 1.00 | 1.000000 | 1.0000 | - |
"""

from __future__ import annotations

from typing import Any, Sequence

from examples._table import cell, header, row, with_ratio

__all__ = ['markdown_table', 'formats_markdown_table', 'text_rows', 'TEXT_COLUMNS']

MIB = 2**20


def _mib(v: Any) -> str:
    return '-' if v is None else f"{v / MIB:.2f}"


def _ms(r: dict, key: str) -> str:
    return with_ratio(r.get(key), r.get('float_ms'), '.0f')


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table; Qwix columns appear when any row has Qwix numbers.

    Example:
      >>> markdown_table([]).startswith('| scheme |')
      True
    """
    qwix = any('qwix_cos' in r for r in rows)
    head = ['scheme', 'linear MiB', 'total MiB', 'mean cos', 'Spearman', 'ms / batch']
    if qwix:
        head = ['scheme', 'Qwix method', 'linear MiB', 'Qwix linear MiB (CPU buffer / packed)', 'total MiB', 'Qwix total MiB',
                'mean cos', 'Qwix mean cos', 'Spearman', 'Qwix Spearman', 'ms / batch (x float)', 'Qwix ms / batch (x float)']
    lines = header(head)
    for r in rows:
        if qwix:
            has = 'qwix_cos' in r
            qlin = (f"{_mib(r['qwix_linear_bytes'])} / {_mib(r['qwix_linear_bytes_packed'])}" if has else '-')
            method = {'ptq': 'same scheme'}.get(r.get('qwix_method'), r.get('qwix_method')) if has else '-'
            cells = [r['scheme'], method or '-', _mib(r['linear_bytes']), qlin, _mib(r['bytes']), _mib(r.get('qwix_bytes')),
                     cell(r['cos'], '.6f'), cell(r.get('qwix_cos'), '.6f'), cell(r['spearman'], '.4f'),
                     cell(r.get('qwix_spearman'), '.4f'), _ms(r, 'ms'), _ms(r, 'qwix_ms')]
        else:
            cells = [r['scheme'], _mib(r['linear_bytes']), _mib(r['bytes']), cell(r['cos'], '.6f'),
                     cell(r['spearman'], '.4f'), cell(r.get('ms'), '.0f')]
        lines.append(row(cells))
    return '\n'.join(lines)


# (key, header, format) for qarray._tour.print_table.
TEXT_COLUMNS = [('scheme', 'scheme', ''), ('linear_mib', 'linear MiB', '.2f'), ('total_mib', 'total MiB', '.2f'),
                ('cos', 'mean cos vs float', '.5f'), ('spearman', 'Spearman vs float', '.4f'),
                ('ms_s', 'ms / 32x64 batch', '')]


def text_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the derived fields :data:`TEXT_COLUMNS` needs.

    Example:
      >>> text_rows([dict(scheme='a', bytes=MIB, linear_bytes=MIB, cos=1., spearman=1., ms=None)])[0]['ms_s']
      '-'
    """
    return [dict(r, linear_mib=r['linear_bytes'] / MIB, total_mib=r['bytes'] / MIB,
                 ms_s=cell(r.get('ms'), '.0f')) for r in rows]


def formats_markdown_table(rows: Sequence[dict[str, Any]], n_values: int) -> str:
    """The new-format rows beside Qwix HEAD (``head_*`` keys, from ``benchmarks/formats_bench.py``).

    ``n_values``: how many weights the linear kernels hold (bits/value = 8 x linear bytes / ``n_values``).
    A row without Qwix HEAD numbers shows ``-`` there; the float32 row is left out.

    Example:
      >>> r = dict(scheme='x', linear_bytes=9, cos=0.99, spearman=0.98, head_cos=0.98, head_spearman=0.97,
      ...          head_linear_bytes=16, head_linear_bytes_packed=10, head_what='same scheme')
      >>> print(formats_markdown_table([r], 16).splitlines()[2])
      | x | 4.500 | 0.990000 | 0.9800 | same scheme | 8.000 / 5.000 | 0.980000 | 0.9700 | +1.0e-02 |
    """
    head = ['scheme', 'bits/value', 'mean cos', 'Spearman', 'Qwix HEAD counterpart',
            'Qwix HEAD bits/value (CPU buffer / packed)', 'Qwix HEAD mean cos', 'Qwix HEAD Spearman',
            'mean cos qarray - HEAD']
    lines = header(head)
    for r in rows:
        if r['scheme'] == 'float32':
            continue
        has = 'head_cos' in r
        hb = (f"{8 * r['head_linear_bytes'] / n_values:.3f} / {8 * r['head_linear_bytes_packed'] / n_values:.3f}"
              if has else '-')
        what = r.get('head_what', '-') + (f" ({r['head_fallback']})" if 'head_fallback' in r else '')
        cells = [r['scheme'], f"{8 * r['linear_bytes'] / n_values:.3f}", cell(r['cos'], '.6f'),
                 cell(r['spearman'], '.4f'), what, hb, cell(r.get('head_cos'), '.6f'),
                 cell(r.get('head_spearman'), '.4f'), cell(r['cos'] - r['head_cos'] if has else None, '+.1e')]
        lines.append(row(cells))
    return '\n'.join(lines)
