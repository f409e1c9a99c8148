"""``conv_general_dilated`` for arrays and QArrays.

Integer path (both operands integer QArrays): one int8 convolution with int32
accumulation on the codes, then ``out * lhs_scale[n] * rhs_scale[o]``. It
takes per-tensor or per-batch activation scales and per-tensor or
per-output-channel weight scales — the scales a convolution can factor out
(a scale varying over input features or space mixes inside every output).
Zero points enter as correction convolutions that are cheap and exact at the
borders: ``conv(ones[1 image], w)`` for the activation zero point and
``conv(x, ones[one filter per group])`` for the weight zero point.

fp8 path (both fp8 QArrays, same scale rule): the convolution runs on the
exactly upcast fp8 values, scales after. Everything else (weight-only, other
scale layouts, zero points with ``batch_group_count > 1``) dequantizes inside
the same jitted program. Any dimension_numbers, strides, padding, dilation
and feature/batch groups.

Example:
  >>> import jax, jax.numpy as jnp, qarray
  >>> x = qarray.quantize(jnp.ones((2, 8, 8, 4)), 'int8', channelwise_axes=(0,))
  >>> w = qarray.quantize(jnp.ones((3, 3, 4, 6)), 'int8', channelwise_axes=(3,))
  >>> qarray.ops.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')).shape
  (2, 8, 8, 6)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from qarray import _quantize
from qarray._array import QArray
from qarray.ops._operands import (check_operand, describe, float_dtype, int_codes, plain_scales, result_dtype,
                                  values)

__all__ = ['conv_general_dilated', 'conv_path']


def _scale_only_on(q: QArray, axis: int) -> bool:
    return all(n == 1 for a, n in enumerate(q.scale.shape) if a != axis)


def conv_path(lhs: Any, rhs: Any, dn: lax.ConvDimensionNumbers, batch_group_count: int = 1) -> str:
    """``'int'``, ``'fp8'`` or ``'float'`` for a convolution of these operands.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from jax import lax
      >>> from qarray.ops.conv import conv_path
      >>> x = qarray.quantize(jnp.ones((1, 4, 4, 2)), 'int8')
      >>> w = qarray.quantize(jnp.ones((3, 3, 2, 5)), 'int8', channelwise_axes=(3,))
      >>> conv_path(x, w, lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC')))
      'int'
    """
    if not (isinstance(lhs, QArray) and isinstance(rhs, QArray)) or not (plain_scales(lhs) and plain_scales(rhs)):
        return 'float'
    kinds = {lhs.qtype.kind, rhs.qtype.kind}
    fp8 = kinds == {'float'} and {lhs.qtype.bits, rhs.qtype.bits} == {8} and not (
        lhs.qtype.microscaling or rhs.qtype.microscaling)
    path = 'int' if kinds <= {'int', 'uint'} else 'fp8' if fp8 else None
    if path is None:
        return 'float'
    if not (_scale_only_on(lhs, dn.lhs_spec[0]) and _scale_only_on(rhs, dn.rhs_spec[0])):
        return 'float'
    lhs_varies = lhs.scale.shape[dn.lhs_spec[0]] > 1 or lhs.zero_point is not None
    if batch_group_count > 1 and (lhs_varies or rhs.zero_point is not None):
        return 'float'
    return path


def _static_padding(padding: Any) -> Any:
    if isinstance(padding, str):
        return padding
    return tuple(tuple(int(v) for v in p) for p in padding)


def _opt_tuple(v: Any) -> Any:
    return None if v is None else tuple(int(a) for a in v)


def conv_general_dilated(lhs: Any, rhs: Any, window_strides: Any, padding: Any, lhs_dilation: Any = None,
                         rhs_dilation: Any = None, dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
    """Drop-in ``jax.lax.conv_general_dilated`` where either operand may be a QArray.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> w = qarray.quantize(jnp.ones((4, 2, 3, 3)), 'int4', channelwise_axes=(0,))
      >>> qarray.ops.conv_general_dilated(jnp.ones((1, 2, 5, 5)), w, (1, 1), 'VALID').shape
      (1, 4, 3, 3)
    """
    lhs, rhs = check_operand(lhs, 'lhs'), check_operand(rhs, 'rhs')
    args = dict(window_strides=tuple(int(s) for s in window_strides), padding=_static_padding(padding),
                lhs_dilation=_opt_tuple(lhs_dilation), rhs_dilation=_opt_tuple(rhs_dilation),
                feature_group_count=int(feature_group_count), batch_group_count=int(batch_group_count))
    if not isinstance(lhs, QArray) and not isinstance(rhs, QArray):
        return lax.conv_general_dilated(lhs, rhs, dimension_numbers=dimension_numbers, precision=precision,
                                        preferred_element_type=preferred_element_type, **args)
    try:
        dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        jax.eval_shape(lambda a, b: lax.conv_general_dilated(a, b, dimension_numbers=dn, **args),
                       jax.ShapeDtypeStruct(lhs.shape, jnp.float32), jax.ShapeDtypeStruct(rhs.shape, jnp.float32))
    except (TypeError, ValueError) as e:
        raise ValueError(f"conv_general_dilated: the operands do not fit ({e}). lhs: {describe(lhs)}; "
                         f"rhs: {describe(rhs)}.") from None
    out_dtype = result_dtype(lhs, rhs, preferred_element_type)
    pet = None if preferred_element_type is None else jnp.dtype(preferred_element_type)
    path = conv_path(lhs, rhs, dn, args['batch_group_count'])
    prec = tuple(precision) if isinstance(precision, list) else precision
    return _conv_jit(lhs, rhs, dn=dn, precision=prec, out_dtype=out_dtype, pet=pet, path=path,
                     args=tuple(sorted(args.items())))


@functools.partial(jax.jit, static_argnames=('dn', 'precision', 'out_dtype', 'pet', 'path', 'args'))
def _conv_jit(lhs, rhs, *, dn, precision, out_dtype, pet, path, args):
    kw = dict(args)

    def conv(a, b, p=None, **over):
        return lax.conv_general_dilated(a, b, dimension_numbers=dn, precision=precision,
                                        preferred_element_type=p, **{**kw, **over})

    if path == 'float':
        ct = jnp.result_type(float_dtype(lhs), float_dtype(rhs))
        a = values(lhs, ct) if isinstance(lhs, QArray) else lhs.astype(ct)
        b = values(rhs, ct) if isinstance(rhs, QArray) else rhs.astype(ct)
        return conv(a, b, pet).astype(out_dtype)
    out_ndim = lhs.ndim
    ob, of = dn.out_spec[0], dn.out_spec[1]

    def along(v: jax.Array, axis: int) -> jax.Array:  # a per-batch / per-channel vector on an output axis
        v = v.reshape(-1)
        return v.reshape([v.shape[0] if i == axis else 1 for i in range(out_ndim)])

    sa = along(lhs.scale.astype(jnp.float32), ob)
    sb = along(rhs.scale.astype(jnp.float32), of)
    if path == 'fp8':
        acc = conv(_quantize.codes(lhs).astype(jnp.float32), _quantize.codes(rhs).astype(jnp.float32), jnp.float32)
        return (acc * sa * sb).astype(out_dtype)
    a, za = int_codes(lhs)
    b, zb = int_codes(rhs)
    acc = conv(a, b, jnp.int32)
    groups = kw['feature_group_count']
    ones_img = ones_filt = None
    if za is not None:
        shape = list(lhs.shape)
        shape[dn.lhs_spec[0]] = 1
        ones_img = jnp.ones(shape, jnp.int8)  # one all-ones image: the zero point's footprint incl. borders
        acc = acc - along(za, ob) * conv(ones_img, b, jnp.int32)
    if zb is not None:
        shape = list(rhs.shape)
        shape[dn.rhs_spec[0]] = groups
        ones_filt = jnp.ones(shape, jnp.int8)  # one all-ones filter per feature group: window sums of x
        per_group = rhs.shape[dn.rhs_spec[0]] // groups
        acc = acc - along(zb, of) * jnp.repeat(conv(a, ones_filt, jnp.int32), per_group, axis=of)
        if za is not None:
            both = jnp.repeat(conv(ones_img, ones_filt, jnp.int32), per_group, axis=of)
            acc = acc + along(za, ob) * along(zb, of) * both
    return (acc.astype(jnp.float32) * sa * sb).astype(out_dtype)
