"""Calibration: turn data into per-group ranges. See :func:`calibrate`.

Methods (spec strings): ``absmax``, ``minmax``, ``rms[,k]``, ``fixed,lo,hi``,
``percentile,p``, ``mse[,steps[,min_ratio]]``.

Example:
  >>> from qarray import calibration
  >>> calibration.parse('rms,4')
  ('rms', (4.0,))
"""

from qarray.calibration import basic, mse  # noqa: F401  (register the methods)
from qarray.calibration.registry import Range, calibrate, methods, parse, register

__all__ = ['Range', 'calibrate', 'methods', 'parse', 'register']
