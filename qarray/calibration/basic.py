"""Closed-form calibrations: absmax, minmax, rms, fixed, percentile.

Example:
  >>> import jax.numpy as jnp
  >>> from qarray import qtypes
  >>> from qarray.calibration.basic import minmax
  >>> r = minmax(jnp.array([-1., 3.]), (0,), qtypes.get('uint8'))
  >>> (float(r.lo[0]), float(r.hi[0]), r.symmetric)
  (-1.0, 3.0, False)
"""

from __future__ import annotations

import jax.numpy as jnp

from qarray.calibration._reduce import group_max, group_min
from qarray.calibration.registry import Range, register
from qarray.qtypes import QType


def _compute_dtype(x: jnp.ndarray):
    """float32, or x's dtype where it is wider (float64 under x64)."""
    return jnp.promote_types(x.dtype, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32


@register('absmax', usage='absmax', nan_safe=True)
def absmax(x: jnp.ndarray, axes: tuple[int, ...], qtype: QType) -> Range:
    """Symmetric range ``[-max|x|, max|x|]``; NaN for a group holding NaN or ±Inf.

    One pass over the data (:func:`~qarray.calibration._reduce.group_max`), NaN-safe on its own.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.calibration.basic import absmax
      >>> float(absmax(jnp.array([-3., 2.]), (0,), None).hi[0])
      3.0
    """
    hi = group_max(x, axes, leaf=jnp.abs)
    hi = jnp.where(hi < jnp.inf, hi, jnp.nan)  # +inf: the group held NaN or ±Inf
    return Range(-hi, hi, True)


@register('minmax', usage='minmax', nan_safe=True)
def minmax(x: jnp.ndarray, axes: tuple[int, ...], qtype: QType) -> Range:
    """Asymmetric range ``[min x, max x]`` (the quantizer adds a zero point); NaN for a group holding NaN or ±Inf.

    Two passes over the data (:func:`~qarray.calibration._reduce.group_min` / ``group_max``), NaN-safe on their own.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.calibration.basic import minmax
      >>> float(minmax(jnp.array([-1., 3.]), (0,), None).lo[0])
      -1.0
    """
    lo, hi = group_min(x, axes), group_max(x, axes)
    finite = (lo > -jnp.inf) & (hi < jnp.inf)  # -inf / +inf: the group held NaN or ±Inf
    return Range(jnp.where(finite, lo, jnp.nan), jnp.where(finite, hi, jnp.nan), False)


@register('rms', max_args=1, usage='rms[,k] (k*RMS, capped at absmax; k defaults to 3)')
def rms(x: jnp.ndarray, axes: tuple[int, ...], qtype: QType, k: float = 3.0) -> Range:
    """Symmetric range ``k * sqrt(mean(x**2))``, never wider than absmax.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.calibration.basic import rms
      >>> float(rms(jnp.array([-1., 1.]), (0,), None, 0.5).hi[0])
      0.5
    """
    if k <= 0:
        raise ValueError(f"calibration 'rms,k' needs k > 0; got k={k}.")
    # Square x / absmax, not x: squares of |x| below ~1e-19 underflow in float32 (and above ~1e19 overflow),
    # which would make the RMS 0 (or inf) for data that is perfectly representable.
    # Divide by sqrt(m) twice: 1 / m itself is subnormal (flushed to 0 on CPU) for m above 2**126.
    m = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    root = jnp.sqrt(jnp.where(m > 0, m, 1))
    unit = jnp.where(m > 0, x / root / root, 0)
    r = m * jnp.sqrt(jnp.mean(jnp.square(unit), axis=axes, keepdims=True)) * k
    hi = jnp.minimum(r, m)
    return Range(-hi, hi, True)


@register('fixed', min_args=2, max_args=2, usage='fixed,lo,hi')
def fixed(x: jnp.ndarray, axes: tuple[int, ...], qtype: QType, lo: float, hi: float) -> Range:
    """A constant range; symmetric (no zero point) exactly when ``lo == -hi``.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.calibration.basic import fixed
      >>> fixed(jnp.zeros(3), (0,), None, -1., 1.).symmetric
      True
    """
    if not lo < hi:
        raise ValueError(f"calibration 'fixed,lo,hi' needs lo < hi; got lo={lo}, hi={hi}.")
    shape = [1 if a in axes else d for a, d in enumerate(x.shape)]
    dt = _compute_dtype(x)  # float64 data keeps a range beyond float32's
    return Range(jnp.full(shape, lo, dt), jnp.full(shape, hi, dt), lo == -hi)


@register('percentile', min_args=1, max_args=1, usage='percentile,p (0 < p <= 100, of |x|)')
def percentile(x: jnp.ndarray, axes: tuple[int, ...], qtype: QType, p: float) -> Range:
    """Symmetric range at the ``p``-th percentile of ``|x|`` per group (clips outliers).

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.calibration.basic import percentile
      >>> float(percentile(jnp.arange(101.), (0,), None, 50).hi[0])
      50.0
    """
    if not 0 < p <= 100:
        raise ValueError(f"calibration 'percentile,p' needs 0 < p <= 100; got p={p}.")
    keep = [a for a in range(x.ndim) if a not in axes]
    flat = jnp.transpose(jnp.abs(x), keep + list(axes)).reshape(*[x.shape[a] for a in keep], -1)
    hi = jnp.percentile(flat.astype(_compute_dtype(x)), p, axis=-1)  # float64 data: in float64
    hi = hi.reshape([1 if a in axes else d for a, d in enumerate(x.shape)])
    return Range(-hi, hi, True)
