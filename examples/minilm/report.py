"""Render scheme rows (from :func:`examples.minilm.evaluate.run_table`) as markdown or text.

Example:
  >>> rows = [dict(scheme='float32', bytes=2**20, linear_bytes=2**20, cos=1.0, spearman=1.0, ms=None)]
  >>> print(markdown_table(rows).splitlines()[2])
  | float32 | 1.00 | 1.00 | 1.000000 | 1.0000 | - |
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ['markdown_table', 'text_rows', 'TEXT_COLUMNS']

MIB = 2**20


def _mib(v: Any) -> str:
    return '-' if v is None else f"{v / MIB:.2f}"


def _f(v: Any, spec: str) -> str:
    return '-' if v is None else format(v, spec)


def _ms(r: dict, key: str) -> str:
    v, f = r.get(key), r.get('float_ms')
    if v is None:
        return '-'
    return f"{v:.0f} ({v / f:.2f}x)" if f else f"{v:.0f}"


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
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join('---' for _ in head) + '|']
    for r in rows:
        if qwix:
            has = 'qwix_cos' in r
            qlin = (f"{_mib(r['qwix_linear_bytes'])} / {_mib(r['qwix_linear_bytes_packed'])}" if has else '-')
            method = {'ptq': 'same scheme'}.get(r.get('qwix_method'), r.get('qwix_method')) if has else '-'
            cells = [r['scheme'], method or '-', _mib(r['linear_bytes']), qlin, _mib(r['bytes']), _mib(r.get('qwix_bytes')),
                     _f(r['cos'], '.6f'), _f(r.get('qwix_cos'), '.6f'), _f(r['spearman'], '.4f'),
                     _f(r.get('qwix_spearman'), '.4f'), _ms(r, 'ms'), _ms(r, 'qwix_ms')]
        else:
            cells = [r['scheme'], _mib(r['linear_bytes']), _mib(r['bytes']), _f(r['cos'], '.6f'),
                     _f(r['spearman'], '.4f'), _f(r.get('ms'), '.0f')]
        lines.append('| ' + ' | '.join(cells) + ' |')
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
                 ms_s=_f(r.get('ms'), '.0f')) for r in rows]
