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
    r = jnp.sqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True)) * k
    hi = jnp.minimum(r, jnp.max(jnp.abs(x), axis=axes, keepdims=True))
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
    return Range(jnp.full(shape, lo, jnp.float32), jnp.full(shape, hi, jnp.float32), lo == -hi)


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
    hi = jnp.percentile(flat.astype(jnp.float32), p, axis=-1)
    hi = hi.reshape([1 if a in axes else d for a, d in enumerate(x.shape)])
    return Range(-hi, hi, True)
