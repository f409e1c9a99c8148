"""Fake quantization for QAT: quantize then dequantize in one step, with a straight-through gradient.

Example:
  >>> import jax, jax.numpy as jnp, qarray
  >>> y = qarray.fake_quant(jnp.array([0.1, 0.52, -1.0]), 'int4')
  >>> bool(jnp.all(jnp.abs(y - jnp.array([0.1, 0.52, -1.0])) <= 1.0 / 7.5 / 2))
  True
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from qarray import _layout, _numerics, qtypes
from qarray._array import QArray
from qarray._quantize import (check_input, check_scale, codes_with_scale, quantize_codes, resolve_args,
                              values_from_codes)

__all__ = ['fake_quant', 'fake_quant_with_scale', 'straight_through', 'representable_range']


@jax.custom_jvp
def straight_through(x: jax.Array, y: jax.Array, inside: jax.Array) -> jax.Array:
    """Returns ``y``; its gradient w.r.t. ``x`` is 1 where ``inside`` and 0 elsewhere.

    The straight-through estimator every fake-quant path shares (``y`` and
    ``inside`` carry no gradient).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from qarray._fake_quant import straight_through
      >>> g = jax.grad(lambda v: straight_through(v, jnp.round(v), v < 1).sum())
      >>> g(jnp.array([0.4, 1.6])).tolist()
      [1.0, 0.0]
    """
    return y


@straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    x, y, inside = primals
    tx = tangents[0]
    return y, jnp.where(inside, tx, jnp.zeros_like(tx))


def representable_range(scale: jax.Array, zero_point: jax.Array | None, qtype: Any
                        ) -> tuple[jax.Array, jax.Array]:
    """The range of values that quantize without clipping (the STE's pass-through range).

    For integer formats it reaches half a step beyond the extreme levels
    (their rounding cells), so a value at the calibrated absmax — which lands
    on ``qmax + 1/2`` — still gets a gradient; signed ints go one code further
    down (``-qmax - 1``). fp8 and nf4: their largest level times ``scale``.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray._fake_quant import representable_range
      >>> lo, hi = representable_range(jnp.array(0.5), None, 'int8')
      >>> float(lo), float(hi)
      (-64.25, 63.75)
    """
    qt = qtypes.get(qtype)
    s = scale.astype(jnp.float32)
    code_zp = zero_point is not None and jnp.issubdtype(zero_point.dtype, jnp.integer)
    qa, qb = _numerics.code_range(qt, code_zp)
    half = qt.step_in_scales / 2 if qt.is_integer else 0.0
    qa, qb = qa - half, qb + half
    if code_zp:
        zpf = zero_point.astype(jnp.float32)
        return (qa - zpf) * s, (qb - zpf) * s
    if zero_point is not None:  # a float offset in value space: x = code * scale - zero_point
        off = zero_point.astype(jnp.float32)
        return qa * s - off, qb * s - off
    return qa * s, qb * s


def fake_quant(x: Any, qtype: Any, *, channelwise_axes: int | Sequence[int] = (),
               tiles: int | Mapping[int, int] | None = None, calibration: str = 'absmax',
               scale_dtype: Any = None, ste: str = 'clipped', scale_qtype: Any = None,
               rounding: str = 'nearest', key: jax.Array | None = None) -> jax.Array:
    """Quantize then dequantize, with a straight-through gradient (arguments as :func:`qarray.quantize`).

    The forward value equals ``dequantize(quantize(x, ...))`` bit for bit.
    Gradient: ``ste='clipped'`` (default) passes it through where ``x`` lies
    inside the representable range and gives zero outside; ``ste='plain'``
    passes it everywhere. Scales get no gradient.

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> g = jax.grad(lambda v: qarray.fake_quant(v, 'int8', calibration='fixed,-1,1').sum())
      >>> g(jnp.array([0.5, 2.0])).tolist()
      [1.0, 0.0]
    """
    _check_ste(ste)
    x = check_input(x, False)
    spec = resolve_args(x, qtype, channelwise_axes, tiles, calibration, scale_dtype, scale_qtype, rounding, key)
    return _fake_quant_jit(x, spec, ste, key)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _fake_quant_jit(x, spec, ste, key) -> jax.Array:
    xs = jax.lax.stop_gradient(x)
    c, scale, zp = quantize_codes(xs, spec, key=key)
    if isinstance(scale, QArray):  # a quantized scale: the codes were computed with its dequantized value
        scale = scale.__jax_array__()
    qt = spec.qtype
    uneven = {a: t for a, t in spec.tiles if x.shape[a] % t}
    values = values_from_codes(c, scale, zp, qt, x.dtype, uneven)
    if uneven:  # the pass mask works on full-size scales
        scale = _layout.broadcast_scale(scale, x.shape, uneven)
        zp = None if zp is None else _layout.broadcast_scale(zp, x.shape, uneven)
    return straight_through(x, values, _pass_mask(xs, scale, zp, qt, ste))


def _check_ste(ste: str) -> None:
    if ste not in ('clipped', 'plain'):
        raise ValueError(f"ste must be 'clipped' or 'plain'; got {ste!r}.")


def _pass_mask(xs, scale, zero_point, qt, ste) -> jax.Array:
    """Where the gradient passes: everywhere ('plain') or inside the representable range ('clipped')."""
    if ste == 'plain':
        return jnp.ones(xs.shape, bool)
    vshape, sshape = _layout.tiled_view(xs.shape, scale.shape)
    zp = None if zero_point is None else jnp.broadcast_to(zero_point, scale.shape).reshape(sshape)
    lo, hi = representable_range(scale.reshape(sshape), zp, qt)
    xv = xs.reshape(vshape).astype(jnp.float32)
    return ((xv >= lo) & (xv <= hi)).reshape(xs.shape)


def fake_quant_with_scale(x: Any, qtype: Any, scale: Any, zero_point: Any = None, *,
                          ste: str = 'clipped') -> jax.Array:
    """``dequantize(quantize_with_scale(x, ...))`` with a straight-through gradient (static scales).

    The static-range counterpart of :func:`fake_quant`: the forward value is
    bit-identical to quantizing with the stored scale; the gradient is as in
    :func:`fake_quant`, and ``scale``/``zero_point`` get none.

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> g = jax.grad(lambda v: qarray.fake_quant_with_scale(v, 'int8', jnp.full((1,), 0.01)).sum())
      >>> g(jnp.array([0.5, 2.0])).tolist()
      [1.0, 0.0]
    """
    _check_ste(ste)
    x = check_input(x, False)
    qt = qtypes.get(qtype)
    scale, zero_point = check_scale(x, qt, scale, zero_point)  # here: eager values are checked too
    return _fake_quant_with_scale_jit(x, scale, zero_point, qt, ste)


# One program per layout: eager callers (a Flax init, QAT without jit) compile once, not once per op.
@functools.partial(jax.jit, static_argnums=(3, 4))
def _fake_quant_with_scale_jit(x, scale, zero_point, qt, ste) -> jax.Array:
    xs = jax.lax.stop_gradient(x)
    scale = jax.lax.stop_gradient(scale)
    zero_point = None if zero_point is None else jax.lax.stop_gradient(zero_point)
    c, scale, zero_point = codes_with_scale(xs, qt, scale, zero_point)  # no pack/unpack round trip
    return straight_through(x, values_from_codes(c, scale, zero_point, qt, x.dtype), _pass_mask(xs, scale, zero_point, qt, ste))
