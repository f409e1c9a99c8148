"""One registry of calibration methods, addressed by ``"name,arg,..."`` specs.

A method maps data and the axes to reduce over to a :class:`Range`. Methods
register themselves with the number of float arguments they accept, so a
bad spec fails at parse time with a message listing what is valid.

NaN/Inf: a group holding NaN or ±Inf gets a NaN range (the quantizer then
gives it a NaN scale). A plain ``jnp.max`` does not guarantee it: XLA:CPU
hands reduces of 4096 or more input elements to YNNPACK, whose max drops NaN.
So :func:`calibrate` enforces the policy with a separate ``all(isfinite(x))``
reduction per group (a second pass over the data, which XLA:CPU does not fuse
with the method's own), except for methods registered ``nan_safe=True``, which
guarantee it themselves in their single pass (``absmax`` and ``minmax``, via
the NaN-safe group reductions of :mod:`qarray.calibration._reduce`).

Example:
  >>> from qarray import calibration
  >>> calibration.parse('percentile,99.9')
  ('percentile', (99.9,))
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax.numpy as jnp

from qarray.qtypes import QType

__all__ = ['Range', 'register', 'parse', 'calibrate', 'methods']


class Range(NamedTuple):
    """A calibrated range per group; ``symmetric`` means ``lo == -hi`` (no zero point).

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import calibration
      >>> calibration.Range(jnp.array(-1.), jnp.array(1.), True).symmetric
      True
    """

    lo: jnp.ndarray
    hi: jnp.ndarray
    symmetric: bool


CalibrationFn = Callable[..., Range]


@dataclasses.dataclass(frozen=True)
class _Method:
    fn: CalibrationFn
    min_args: int
    max_args: int
    usage: str
    nan_safe: bool = False


_METHODS: dict[str, _Method] = {}


def register(name: str, *, min_args: int = 0, max_args: int = 0, usage: str = '', nan_safe: bool = False
             ) -> Callable:
    """Decorator adding a calibration method ``fn(x, axes, qtype, *args) -> Range``.

    ``nan_safe=True`` promises that ``fn`` itself returns a NaN ``lo`` and ``hi``
    for every group holding NaN or ±Inf, at every size and under ``jit``
    (e.g. built on :func:`qarray.calibration._reduce.group_max`); :func:`calibrate`
    then skips its own ``isfinite`` pass. Leave it False unless that holds: a
    plain ``jnp.max`` drops NaN on XLA:CPU from 4096 elements on.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import calibration, qtypes
      >>> @calibration.register('half_absmax', usage='half_absmax')
      ... def _half(x, axes, qtype):
      ...     hi = jnp.max(jnp.abs(x), axis=axes, keepdims=True) / 2
      ...     return calibration.Range(-hi, hi, True)
      >>> float(calibration.calibrate('half_absmax', jnp.array([-3., 2.]), (0,), qtypes.get('int8')).hi[0])
      1.5
    """

    def wrap(fn: CalibrationFn) -> CalibrationFn:
        _METHODS[name] = _Method(fn, min_args, max_args, usage or name, nan_safe)
        return fn

    return wrap


def methods() -> list[str]:
    """Usage strings of every registered method.

    Example:
      >>> from qarray import calibration
      >>> 'absmax' in calibration.methods()
      True
    """
    return [m.usage for m in _METHODS.values()]


def parse(spec: str) -> tuple[str, tuple[float, ...]]:
    """Split and validate ``"name,arg,..."``; raises ``ValueError`` naming the valid methods.

    Example:
      >>> from qarray import calibration
      >>> calibration.parse('fixed,-1,1')
      ('fixed', (-1.0, 1.0))
    """
    if not isinstance(spec, str):
        raise TypeError(f"calibration must be a string like 'absmax' or 'percentile,99.9'; got {spec!r}.")
    name, *raw = [p.strip() for p in spec.split(',')]
    if name not in _METHODS:
        raise ValueError(f"Unknown calibration {spec!r}; valid methods are: {', '.join(methods())}.")
    m = _METHODS[name]
    try:
        args = tuple(float(a) for a in raw)
    except ValueError:
        raise ValueError(f"calibration {spec!r}: arguments must be numbers; usage: {m.usage}.") from None
    if not m.min_args <= len(args) <= m.max_args:
        raise ValueError(f"calibration {spec!r} takes {m.min_args}..{m.max_args} arguments; usage: {m.usage}.")
    return name, args


def calibrate(spec: str, x: jnp.ndarray, axes: tuple[int, ...], qtype: QType) -> Range:
    """Run the method named by ``spec`` over ``axes`` of ``x`` (results keep dims).

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import calibration, qtypes
      >>> float(calibration.calibrate('absmax', jnp.array([-3., 2.]), (0,), qtypes.get('int8')).hi[0])
      3.0
    """
    name, args = parse(spec)
    method = _METHODS[name]
    rng = method.fn(x, tuple(axes), qtype, *args)
    if method.nan_safe:  # the method enforces the NaN/Inf policy itself, in its own pass
        dt = jnp.promote_types(jnp.result_type(rng.lo, rng.hi), jnp.float32)  # as the guarded path returns
        return Range(jnp.asarray(rng.lo, dt), jnp.asarray(rng.hi, dt), rng.symmetric)
    finite = jnp.all(jnp.isfinite(x), axis=tuple(axes), keepdims=True)
    nan = jnp.asarray(jnp.nan, jnp.float32)
    return Range(jnp.where(finite, rng.lo, nan), jnp.where(finite, rng.hi, nan), rng.symmetric)
