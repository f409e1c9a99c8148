"""MSE search: per group, the clip ratio of the absmax range with the least
reconstruction error (sum of squared errors over the group).

The grid always contains ratio 1.0, so the result is never worse than
absmax on the same data. Candidates are evaluated in a ``fori_loop`` so the
compiled program stays small whatever the number of steps.

Example:
  >>> import jax.numpy as jnp
  >>> from qarray import qtypes
  >>> from qarray.calibration.mse import mse
  >>> r = mse(jnp.array([[0.1, -0.2, 0.05, 9.0]]), (1,), qtypes.get('int4'))
  >>> float(r.hi[0, 0]) <= 9.0
  True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qarray import _numerics
from qarray.calibration.registry import Range, register
from qarray.qtypes import QType


def _group_sse(x, axes, hi, qtype):
    scale, zp = _numerics.scale_and_zero_point(-hi, hi, True, qtype)
    xr = _numerics.from_codes(_numerics.to_codes(x, scale, zp, qtype, calibrated=True), scale, zp, qtype)
    dt = jnp.promote_types(x.dtype, jnp.float32)
    return jnp.sum(jnp.square(x.astype(dt) - xr.astype(dt)), axis=axes, keepdims=True)


@register('mse', max_args=2,
          usage='mse[,steps[,min_ratio]] (clip ratios in [min_ratio, 1]; defaults 64, 0.3)')
def mse(x: jnp.ndarray, axes: tuple[int, ...], qtype: QType, steps: float = 64,
        min_ratio: float = 0.3) -> Range:
    """Symmetric range ``ratio * absmax`` with the ratio minimising squared error per group.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import qtypes
      >>> from qarray.calibration.mse import mse
      >>> mse(jnp.ones((2, 8)), (1,), qtypes.get('int8')).symmetric
      True
    """
    steps = int(steps)
    if steps < 2 or not 0 < min_ratio < 1:
        raise ValueError(f"calibration 'mse,steps,min_ratio' needs steps >= 2 and 0 < min_ratio < 1; "
                         f"got steps={steps}, min_ratio={min_ratio}.")
    dt = jnp.promote_types(x.dtype, jnp.float32)  # one dtype for the loop carry (float64 data under x64)
    absmax = jnp.max(jnp.abs(x), axis=axes, keepdims=True).astype(dt)
    ratios = jnp.linspace(min_ratio, 1.0, steps, dtype=dt).at[-1].set(1.0)

    def body(i, carry):
        best_err, best_hi = carry
        hi = absmax * ratios[i]
        err = _group_sse(x, axes, hi, qtype)
        better = err < best_err
        return jnp.where(better, err, best_err), jnp.where(better, hi, best_hi)

    # Start from ratio 1.0 (absmax) so ties keep absmax.
    init = (_group_sse(x, axes, absmax, qtype), absmax)
    _, hi = jax.lax.fori_loop(0, steps - 1, body, init)
    return Range(-hi, hi, True)
