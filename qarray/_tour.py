"""The format table of ``python -m qarray``: every format on a random 1024x1024 weight.

Example:
  >>> from qarray import _tour
  >>> rows = _tour.format_rows(size=64, labels=['int1', 'mxfp4'])
  >>> [r['format'] for r in rows], rows[1]['bits']
  (['int1', 'mxfp4'], 4.25)
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from qarray import _quantize, qtypes

# (label, format, tiles, extra quantize arguments) rows of the format table: every format, with the
# tiling a user would pick. Microscaling formats bring their own blocks (32, nvfp4 16) along the last axis.
FORMAT_ROWS = [(f'int{b}', f'int{b}', 128, {}) for b in range(1, 8)] + [('int8', 'int8', None, {})] + \
    [(f'uint{b}', f'uint{b}', 128, {}) for b in range(1, 8)] + [('uint8', 'uint8', None, {})] + \
    [('float8_e4m3fn', 'float8_e4m3fn', None, {}), ('float8_e5m2', 'float8_e5m2', None, {}),
     ('fp4 (e2m1)', 'fp4', 32, {}), ('mxfp8', 'mxfp8', None, {}), ('mxfp8 mse', 'mxfp8', None, {'calibration': 'mse'}),
     ('mxfp4', 'mxfp4', None, {}), ('mxfp4 mse', 'mxfp4', None, {'calibration': 'mse'}),
     ('nvfp4', 'nvfp4', None, {}), ('nvfp4 mse', 'nvfp4', None, {'calibration': 'mse'}), ('nf4', 'nf4', 64, {}),
     ('nf4 + int8 scales', 'nf4', 64, {'scale_qtype': 'int8'})]


def format_rows(size: int = 1024, seed: int = 0, labels: list[str] | None = None) -> list[dict]:
    """Quantize a ``size x size`` N(0, 1) weight to every format (or the rows named in ``labels``); one dict
    per row.

    Per-channel (axis 1) scales when untiled; ``tiles`` along the last axis otherwise.

    Example:
      >>> from qarray._tour import format_rows
      >>> format_rows(size=64, labels=['nf4 + int8 scales'])[0]['tiles']
      64
    """
    w = jax.random.normal(jax.random.key(seed), (size, size), jnp.float32)
    w64 = np.asarray(w, np.float64)
    rows = []
    for label, name, tiles, extra in FORMAT_ROWS:
        if labels is not None and label not in labels:
            continue
        tiles = min(tiles, size) if tiles else None
        microscaling = qtypes.get(name).microscaling
        kwargs = dict(calibration='minmax' if name.startswith('uint') else 'absmax')
        if not microscaling:
            kwargs.update(tiles=tiles, channelwise_axes=() if tiles else (1,))
        q = _quantize.quantize(w, name, **{**kwargs, **extra})
        err = np.asarray(_quantize.dequantize(q), np.float64) - w64
        layout = f'blocks of {qtypes.get(name).block}' if microscaling else tiles or 'per-channel'
        rows.append(dict(format=label, tiles=layout, bytes=q.nbytes,
                         bits=8 * q.nbytes / w.size, max_abs=float(np.abs(err).max()),
                         rel=float(np.linalg.norm(err) / np.linalg.norm(w64))))
    return rows


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print rows as an aligned text table; columns are (key, header, format spec).

    Example:
      >>> from qarray._tour import print_table
      >>> print_table([{'a': 1}], [('a', 'A', 'd')])
      A
      -
      1
    """
    cells = [[format(r[k], f) if f else str(r[k]) for k, _, f in columns] for r in rows]
    heads = [h for _, h, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    print('  '.join(h.ljust(w) for h, w in zip(heads, widths)).rstrip())
    print('  '.join('-' * w for w in widths).rstrip())
    for c in cells:
        print('  '.join(v.ljust(w) for v, w in zip(c, widths)).rstrip())


def formats_section() -> None:
    """Print the format table (the tour's first section).

    Example:
      >>> from qarray._tour import formats_section
      >>> callable(formats_section)
      True
    """
    print("Every format on a random 1024x1024 float32 weight (4 MiB in float32)")
    rows = format_rows()
    print_table(rows, [('format', 'format', ''), ('tiles', 'tiles', ''), ('bytes', 'stored bytes', 'd'),
                       ('bits', 'bits/value', '.3f'), ('max_abs', 'max abs err', '.4f'),
                       ('rel', 'rel err', '.4f')])
