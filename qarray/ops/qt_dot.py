"""Quantized training: a bilinear op whose forward *and* both backward contractions run quantized.

For ``y = op(lhs, rhs)`` (``dot_general``, ``einsum``, ``conv_general_dilated``, ``ragged_dot``) the
backward needs two more contractions of the same size: ``dlhs = T_lhs(g, rhs)`` and
``drhs = T_rhs(g, lhs)``, where ``g`` is the incoming gradient. :func:`quantized_training_op` wraps the
op in a ``jax.custom_vjp`` that

* **forward**: fake-quantizes the operands (``fwd_quantized=False``: the float op on
  ``dequantize(quantize(x))`` values, as QAT does) or runs the real quantized op on QArrays
  (``fwd_quantized=True``: int8 x int8 -> int32 or the fp8 dot, scales after). Either way the gradient
  reaching each float operand passes its forward quantizer straight-through (:func:`qarray.fake_quant`,
  ``ste='clipped'`` or ``'plain'``);
* **backward**: gets ``T_lhs`` and ``T_rhs`` from JAX's own transpose rule of the float op
  (``jax.linear_transpose``, traced once per shape) and evaluates them with every contraction in it
  (``dot_general``, ``conv_general_dilated``, ``ragged_dot_general``) quantized: *each backward
  contraction quantizes its own two operands along its own non-contracting axes* (per channel; the
  gradient per token for ``dlhs``, per output channel for ``drhs``; tiles optional along the
  contracting axis), and runs through :mod:`qarray.ops` -- so an int8 rule gives ``s8 x s8 -> s32``
  dots in the backward and an fp8 rule fp8 dots. The residual operand is *re-quantized* in the
  backward layout, never reused with its forward scales (the activation gradient contracts over the
  weight's output channels, which the forward scaled per channel).

  Convolutions: JAX's transposes of a convolution are convolutions (the lhs gradient a convolution of
  ``g`` with the reversed kernel, the kernel gradient a convolution of the input with ``g``); each is run
  by :func:`qarray.ops.conv_general_dilated` on operands quantized per channel where a convolution can
  factor the scale out (the lhs-side operand's batch axis, the rhs-side operand's output-feature axis),
  per tensor otherwise. ``ragged_dot``'s lhs gradient is a ``ragged_dot`` (via
  :func:`qarray.ops.ragged_dot_general`); its weight gradient is a ``ragged_dot_general`` with a ragged
  contracting axis, computed on the integer codes (int32 accumulation; fp8 codes in float32) with the
  per-channel scales applied to the ``[G, K, N]`` output.

* **stochastic rounding** (``BackwardQuant(stochastic_rounding=True)`` and a ``key``): every operand
  derived from ``g`` is rounded stochastically (unbiased); the residual operands round to nearest.

Operands that are not floating point (or QArrays) are passed through unquantized.

Example:
  >>> import jax, jax.numpy as jnp, qarray
  >>> from qarray.ops.qt_dot import BackwardQuant, qt_dot_general
  >>> x, w = jnp.ones((4, 8)), jnp.full((8, 3), 0.5)
  >>> dn = (((1,), (0,)), ((), ()))
  >>> dx = jax.grad(lambda x: qt_dot_general(x, w, dn, lhs_qtype='int8', rhs_qtype='int8', bwd_qtype='int8').sum())(x)
  >>> jnp.round(dx[0, :3], 1).tolist()  # 3 x 0.5, within int8 rounding
  [1.5, 1.5, 1.5]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from qarray import _fake_quant, _quantize, qtypes
from qarray._array import QArray
from qarray.ops import _dims

__all__ = ['ForwardQuant', 'BackwardQuant', 'quantized_training_op', 'qt_dot_general']

_CONTRACTIONS = ('dot_general', 'conv_general_dilated', 'ragged_dot_general')
_SUBJAXPR = ('pjit', 'jit', 'closed_call', 'core_call')


@dataclasses.dataclass(frozen=True)
class ForwardQuant:
    """How the forward quantizes one operand (the same arguments as :func:`qarray.quantize`).

    ``scale`` (and ``zero_point``) given: a fixed (static-range) scale, as
    :func:`qarray.quantize_with_scale` takes it; else the scale is calibrated from the data.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.ops.qt_dot import ForwardQuant
      >>> fq = ForwardQuant('int8', channelwise_axes=(0,))
      >>> fq.quantize(jnp.ones((2, 4))).scale.shape, fq.fake(jnp.ones((2, 4))).dtype
      ((2, 1), dtype('float32'))
    """

    qtype: Any
    channelwise_axes: tuple[int, ...] = ()
    tiles: Mapping[int, int] | None = None
    calibration: str = 'absmax'
    ste: str = 'clipped'
    scale_qtype: Any = None
    scale: Any = None
    zero_point: Any = None

    def fake(self, x: jax.Array) -> jax.Array:
        """``dequantize(quantize(x))`` with the straight-through gradient (:func:`qarray.fake_quant`).

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from qarray.ops.qt_dot import ForwardQuant
          >>> jax.grad(lambda x: ForwardQuant('int8', ste='plain').fake(x).sum())(jnp.ones(3)).tolist()
          [1.0, 1.0, 1.0]
        """
        if self.scale is not None:
            return _fake_quant.fake_quant_with_scale(x, self.qtype, self.scale, self.zero_point, ste=self.ste)
        return _fake_quant.fake_quant(x, self.qtype, channelwise_axes=self.channelwise_axes, tiles=self.tiles,
                                      calibration=self.calibration, ste=self.ste, scale_qtype=self.scale_qtype)

    def quantize(self, x: jax.Array) -> QArray:
        """The QArray the real quantized forward computes with (same codes as :meth:`fake`).

        Example:
          >>> import jax.numpy as jnp
          >>> from qarray.ops.qt_dot import ForwardQuant
          >>> ForwardQuant('int8').quantize(jnp.ones((2, 4))).qvalue.dtype
          dtype('int8')
        """
        if self.scale is not None:
            return _quantize.quantize_with_scale(x, self.qtype, self.scale, self.zero_point)
        return _quantize.quantize(x, self.qtype, channelwise_axes=self.channelwise_axes, tiles=self.tiles,
                                  calibration=self.calibration, scale_qtype=self.scale_qtype)


@dataclasses.dataclass(frozen=True)
class BackwardQuant:
    """How the two backward contractions quantize their operands.

    Attributes:
      qtype: format of the incoming gradient ``g`` (``'int8'``, ``'float8_e5m2'``, ...).
      calibration: calibration spec of the backward operands (``'absmax'``, ``'minmax'``, ...).
      residual_qtypes: per forward operand ``(lhs, rhs)``, the format it is re-quantized to when it is the
        other operand of a backward contraction (None: ``qtype``). E.g. ``('float8_e4m3fn',
        'float8_e4m3fn')`` with ``qtype='float8_e5m2'``: gradients in e5m2, activations and weights e4m3.
      dlhs_tile_size, drhs_tile_size: tiles along the last contracting axis of the ``dlhs`` / ``drhs``
        contractions (``dot_general`` only; None: one scale per non-contracting index).
      stochastic_rounding: round the operands derived from ``g`` stochastically (needs a ``key``).
      use_original_residuals: re-quantize the original float operands in the backward (True) or the
        forward's quantized values (False, default: the gradient of the quantized forward).

    Example:
      >>> from qarray.ops.qt_dot import BackwardQuant
      >>> BackwardQuant('float8_e5m2', residual_qtypes=('float8_e4m3fn', 'float8_e4m3fn')).residual_qtype(1)
      'float8_e4m3fn'
    """

    qtype: Any
    calibration: str = 'absmax'
    residual_qtypes: tuple[Any, Any] = (None, None)
    dlhs_tile_size: int | None = None
    drhs_tile_size: int | None = None
    stochastic_rounding: bool = False
    use_original_residuals: bool = False

    def __post_init__(self):
        qt = qtypes.get(self.qtype)  # raises ValueError naming the allowed formats
        for q in (qt, *(qtypes.get(r) for r in self.residual_qtypes if r is not None)):
            if q.microscaling:
                raise ValueError(f"BackwardQuant: microscaling format {q.name!r} is not a backward format (its blocks "
                                 "lie along one fixed axis); use its element format ('fp8', 'fp4') with tiles.")
        for name in ('dlhs_tile_size', 'drhs_tile_size'):
            t = getattr(self, name)
            if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t <= 0):
                raise ValueError(f"{name} must be None or a positive int; got {t!r}.")

    def residual_qtype(self, i: int) -> Any:
        """The format forward operand ``i`` (0: lhs, 1: rhs) is re-quantized to in the backward.

        Example:
          >>> from qarray.ops.qt_dot import BackwardQuant
          >>> BackwardQuant('int8').residual_qtype(0)
          'int8'
        """
        r = self.residual_qtypes[i]
        return self.qtype if r is None else r


def quantized_training_op(fn: Callable[..., jax.Array], lhs: jax.Array, rhs: jax.Array, *extra: Any,
                          lhs_fwd: ForwardQuant | None = None, rhs_fwd: ForwardQuant | None = None,
                          bwd: BackwardQuant | None = None, fwd_quantized: bool = False,
                          key: jax.Array | None = None) -> jax.Array:
    """``fn(lhs, rhs, *extra)`` with a quantized forward and quantized backward contractions (module docstring).

    Args:
      fn: the op, bilinear in ``(lhs, rhs)``, taking plain arrays *or* QArrays as :mod:`qarray.ops` functions
        do (e.g. ``functools.partial(qarray.ops.einsum, 'bd,df->bf')`` with the operands swapped in). It must
        close over no traced values: pass those (``group_sizes``) through ``extra`` (not differentiated).
      lhs, rhs: float operands.
      lhs_fwd, rhs_fwd: forward quantization of each operand, or None to keep it float.
      bwd: backward quantization, or None for float backward contractions (straight-through only).
      fwd_quantized: run the forward on QArrays (the PTQ path) instead of fake-quantized floats.
      key: random key for ``bwd.stochastic_rounding``.

    Example:
      >>> import functools, jax, jax.numpy as jnp, qarray
      >>> from qarray.ops.qt_dot import BackwardQuant, ForwardQuant, quantized_training_op
      >>> fn = functools.partial(qarray.ops.einsum, 'bd,df->bf')
      >>> x, w = jnp.ones((2, 4)), jnp.ones((4, 3))
      >>> loss = lambda w: quantized_training_op(fn, x, w, rhs_fwd=ForwardQuant('int8', (1,)),
      ...                                         bwd=BackwardQuant('int8')).sum()
      >>> jnp.round(jax.grad(loss)(w), 1).tolist()[0]  # 2 rows of ones, within int8 rounding
      [2.0, 2.0, 2.0]
    """
    if not callable(fn):
        raise TypeError(f"fn must be the op to run, fn(lhs, rhs, *extra); got {fn!r}.")
    for name, v in (('lhs_fwd', lhs_fwd), ('rhs_fwd', rhs_fwd)):
        if v is not None and not isinstance(v, ForwardQuant):
            raise TypeError(f"{name} must be a ForwardQuant or None; got {v!r}.")
    if bwd is not None and not isinstance(bwd, BackwardQuant):
        raise TypeError(f"bwd must be a BackwardQuant or None; got {bwd!r}.")
    if bwd is not None and bwd.stochastic_rounding and key is None:
        raise ValueError("BackwardQuant(stochastic_rounding=True) needs key=jax.random.key(...) (the random bits "
                         "of the rounding).")
    for name, x in (('lhs', lhs), ('rhs', rhs)):
        if isinstance(x, QArray) or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise TypeError(f"{name} must be a float array (the value being trained); got "
                            f"{type(x).__name__} of dtype {jnp.result_type(x)}.")
    values = [q.fake(x) if q is not None else x for q, x in ((lhs_fwd, lhs), (rhs_fwd, rhs))]
    fwd_ops = list(values)
    if fwd_quantized:
        fwd_ops = [q.quantize(lax.stop_gradient(x)) if q is not None else v
                   for q, x, v in ((lhs_fwd, lhs, values[0]), (rhs_fwd, rhs, values[1]))]
    residuals = [lhs, rhs] if bwd is not None and bwd.use_original_residuals else values
    return _qt_call(fn, bwd)(values[0], values[1], residuals[0], residuals[1], fwd_ops[0], fwd_ops[1],
                             key, tuple(extra))


def _qt_call(fn, bwd):
    """The custom_vjp for one (op, backward config): closes over static things only."""

    @jax.custom_vjp
    def qt(lhs, rhs, res_l, res_r, fwd_l, fwd_r, key, extra):
        return fn(fwd_l, fwd_r, *extra)

    def qt_fwd(lhs, rhs, res_l, res_r, fwd_l, fwd_r, key, extra):
        return fn(fwd_l, fwd_r, *extra), (res_l, res_r, key, extra)

    def qt_bwd(saved, g):
        res_l, res_r, key, extra = saved
        keys = (None, None) if key is None or bwd is None or not bwd.stochastic_rounding else (
            jax.random.fold_in(key, 0), jax.random.fold_in(key, 1))
        dl = _transpose(fn, 0, g, res_l, res_r, extra, bwd, keys[0])
        dr = _transpose(fn, 1, g, res_r, res_l, extra, bwd, keys[1])
        return dl, dr, None, None, None, None, None, None

    qt.defvjp(qt_fwd, qt_bwd)
    return qt


def _transpose(fn, wrt: int, g, primal, other, extra, bwd, key):
    """``d primal`` = the transpose of ``fn`` w.r.t. operand ``wrt``, applied to ``g``, contractions quantized."""
    aval = jax.ShapeDtypeStruct(primal.shape, primal.dtype)

    def t(g, other, *extra):
        f = (lambda a: fn(a, other, *extra)) if wrt == 0 else (lambda b: fn(other, b, *extra))
        return jax.linear_transpose(f, aval)(g)[0]

    closed = jax.make_jaxpr(t)(g, other, *extra)
    if bwd is None:
        from jax.extend import core as jex_core  # noqa: PLC0415 (jax.extend imports Pallas: only when tracing)
        return jex_core.jaxpr_as_fun(closed)(g, other, *extra)[0]
    ctx = _Ctx(bwd, key, bwd.dlhs_tile_size if wrt == 0 else bwd.drhs_tile_size, bwd.residual_qtype(1 - wrt))
    out, = _eval(closed.jaxpr, closed.consts, [g, other, *extra], [True, False] + [False] * len(extra), ctx)
    return out.astype(primal.dtype)


@dataclasses.dataclass
class _Ctx:
    bwd: BackwardQuant
    key: Any
    tile: int | None
    residual_qtype: Any
    count: int = 0

    def quantize(self, x, from_grad: bool, cw, tiles=None):
        if isinstance(x, QArray) or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        qtype = self.bwd.qtype if from_grad else self.residual_qtype
        key = None
        if from_grad and self.key is not None:
            key = jax.random.fold_in(self.key, self.count)
            self.count += 1
        return _quantize.quantize(x, qtype, channelwise_axes=tuple(cw), tiles=tiles,
                                  calibration=self.bwd.calibration,
                                  rounding='nearest' if key is None else 'stochastic', key=key)


def _eval(jaxpr, consts, args, grad_flags, ctx: _Ctx):
    """Evaluate ``jaxpr`` with its contractions quantized; ``grad_flags`` marks inputs derived from ``g``."""
    from jax.extend import core as jex_core  # noqa: PLC0415 (jax.extend imports Pallas: only when tracing)
    env, tainted = {}, set()

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x, flag in zip(jaxpr.invars, args, grad_flags):
        env[v] = x
        if flag:
            tainted.add(v)
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        flags = [not isinstance(v, jex_core.Literal) and v in tainted for v in eqn.invars]
        name = eqn.primitive.name
        if name in _CONTRACTIONS:
            outs = [_contract(eqn, ins, flags, ctx)]
        elif name in _SUBJAXPR and 'jaxpr' in eqn.params:
            sub = eqn.params['jaxpr']
            outs = _eval(sub.jaxpr, sub.consts, ins, flags, ctx)
        else:
            outs = eqn.primitive.bind(*ins, **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
            if any(flags):
                tainted.add(v)
    return [read(v) for v in jaxpr.outvars]


def _contract(eqn, ins, flags, ctx: _Ctx):
    from qarray.ops.conv import conv_general_dilated  # noqa: PLC0415 (ops modules import each other lazily)
    from qarray.ops.dot_general import dot_general  # noqa: PLC0415
    from qarray.ops.ragged_dot import ragged_dot_general  # noqa: PLC0415
    p, out_dtype = eqn.params, eqn.outvars[0].aval.dtype
    a, b = ins[0], ins[1]
    if eqn.primitive.name == 'dot_general':
        (lc, rc), _ = p['dimension_numbers']
        qa = ctx.quantize(a, flags[0], _dims.free_axes(a.ndim, lc), _tile(ctx.tile, lc, a.shape))
        qb = ctx.quantize(b, flags[1], _dims.free_axes(b.ndim, rc), _tile(ctx.tile, rc, b.shape))
        return dot_general(qa, qb, p['dimension_numbers'], precision=p['precision'], preferred_element_type=out_dtype)
    if eqn.primitive.name == 'conv_general_dilated':
        dn = p['dimension_numbers']
        qa = ctx.quantize(a, flags[0], (dn.lhs_spec[0],) if p['batch_group_count'] == 1 else ())
        qb = ctx.quantize(b, flags[1], (dn.rhs_spec[0],))
        return conv_general_dilated(qa, qb, p['window_strides'], p['padding'], lhs_dilation=p['lhs_dilation'],
                                    rhs_dilation=p['rhs_dilation'], dimension_numbers=dn,
                                    feature_group_count=p['feature_group_count'],
                                    batch_group_count=p['batch_group_count'], precision=p['precision'],
                                    preferred_element_type=out_dtype)
    rdn = p['ragged_dot_dimension_numbers']
    (lc, rc), (lb, rb) = rdn.dot_dimension_numbers
    qa = ctx.quantize(a, flags[0], _dims.free_axes(a.ndim, lc))
    qb = ctx.quantize(b, flags[1], _dims.free_axes(b.ndim, rc))
    if not set(rdn.lhs_ragged_dimensions) & set(lc):  # ragged rows (the lhs gradient): a ragged_dot
        return ragged_dot_general(qa, qb, ins[2], rdn, precision=p['precision'], preferred_element_type=out_dtype)
    return _ragged_contracting(qa, qb, ins[2], rdn, p, out_dtype)


def _tile(tile, contract, shape):
    if tile is None or not contract:
        return None
    return {contract[-1]: min(tile, shape[contract[-1]])} if shape[contract[-1]] else None


def _ragged_contracting(qa, qb, group_sizes, rdn, p, out_dtype):
    """The weight gradient of a ragged_dot: ``out[g] = sum over group g's rows of a[m]^T b[m]``.

    Both operands are quantized per column (their scales are shared along the contracted rows), so the
    scales factor out of every ``out[g, k, n]``: the contraction runs on the codes."""
    plain = (isinstance(qa, QArray) and isinstance(qb, QArray) and qa.zero_point is None
             and qb.zero_point is None and not isinstance(qa.scale, QArray) and not isinstance(qb.scale, QArray)
             and qa.ndim == 2 and qb.ndim == 2 and rdn.dot_dimension_numbers == (((0,), (0,)), ((), ())))
    kinds = {getattr(q, 'qtype', None) and q.qtype.kind for q in (qa, qb)}
    if not plain or not (kinds <= {'int'} or kinds == {'float'}):
        fa = qa.__jax_array__() if isinstance(qa, QArray) else qa
        fb = qb.__jax_array__() if isinstance(qb, QArray) else qb
        return lax.ragged_dot_general(fa, fb, group_sizes, rdn, precision=p['precision'],
                                      preferred_element_type=out_dtype)
    integer = kinds <= {'int'}
    ca, cb = _quantize.codes(qa), _quantize.codes(qb)
    if integer:
        ca, cb, acc = ca.astype(jnp.int8), cb.astype(jnp.int8), jnp.int32
    else:
        ca, cb, acc = ca.astype(jnp.float32), cb.astype(jnp.float32), jnp.float32
    out = lax.ragged_dot_general(ca, cb, group_sizes, rdn, preferred_element_type=acc)
    scale = qa.scale.reshape(-1)[None, :, None].astype(jnp.float32) * qb.scale.reshape(-1)[None, None, :]
    return (out.astype(jnp.float32) * scale).astype(out_dtype)


def qt_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, *, lhs_qtype: Any = None,
                   rhs_qtype: Any = None, bwd_qtype: Any = None, fwd_quantized: bool = False,
                   calibration: str = 'absmax', bwd_calibration: str = 'absmax', tile_size: int | None = None,
                   bwd_tile_size: int | None = None, ste: str = 'clipped', stochastic_rounding: bool = False,
                   key: jax.Array | None = None, use_original_residuals: bool = False,
                   precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    """``lax.dot_general`` for training: quantized forward, and both backward dots quantized with ``bwd_qtype``.

    Forward layouts: each operand with a qtype gets one scale per index of its non-contracting (batch and
    free) axes, tiled along its last contracting axis with ``tile_size``; the backward dots quantize the
    same way along *their* axes (``bwd_tile_size``): the gradient in ``bwd_qtype``, the other operand
    in its forward format (``bwd_qtype`` where the forward left it float). See
    :func:`quantized_training_op`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from qarray.ops.qt_dot import qt_dot_general
      >>> x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
      >>> f = lambda x, w: qt_dot_general(x, w, (((1,), (0,)), ((), ())), lhs_qtype='int8', rhs_qtype='int8',
      ...                                 bwd_qtype='int8', fwd_quantized=True).sum()
      >>> hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).as_text(dialect='hlo')
      >>> sum('= s32[' in line and ' dot(' in line for line in hlo.splitlines())  # the two backward dots
      2
    """
    from qarray.ops.dot_general import dot_general  # noqa: PLC0415

    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    dn = _dims.normalize_dimension_numbers(dimension_numbers, lhs.shape, rhs.shape,
                                           f"lhs shape {lhs.shape}; rhs shape {rhs.shape}.")
    (lc, rc), _ = dn

    def fwd(x, qtype, contract):
        if qtype is None:
            return None
        return ForwardQuant(qtype, _dims.free_axes(x.ndim, contract), _tile(tile_size, contract, x.shape),
                            calibration, ste)

    bwd = None if bwd_qtype is None else BackwardQuant(bwd_qtype, bwd_calibration, (lhs_qtype, rhs_qtype),
                                                       bwd_tile_size, bwd_tile_size, stochastic_rounding,
                                                       use_original_residuals)
    pet = preferred_element_type

    def fn(a, b):
        return dot_general(a, b, dn, precision=precision, preferred_element_type=pet)

    return quantized_training_op(fn, lhs, rhs, lhs_fwd=fwd(lhs, lhs_qtype, lc), rhs_fwd=fwd(rhs, rhs_qtype, rc),
                                 bwd=bwd, fwd_quantized=fwd_quantized, key=key)

