"""Property sweep of the public API: every draw raises a documented error or obeys the documented bounds.

What is swept (hypothesis; the reference model is ``properties_lib``):

* ``quantize`` / ``dequantize`` / ``fake_quant`` / ``codes`` / ``quantize_with_scale`` over every format
  (``qtypes.names()`` and ``'int8_narrow'``), every calibration, shapes of rank 0..3 with sizes 0, 1 and odd,
  channelwise axes (negative, out of range, repeated), tiles (dividing, not dividing, zero, on a channelwise
  axis), pack axes, scale dtypes (float32 / bfloat16 / float16 / float64 / an int), data dtypes float32,
  bfloat16, float16 and float64 (under ``jax.enable_x64``), magnitudes from float32 subnormals (1e-44) through
  the normal range to the dtype's max (both signs, the max itself), constants, zeros, one NaN/+-Inf;
* ``QArray.nbytes / shape / transpose / reshape``;
* ``qarray.matmul`` / ``qarray.dot_general`` on QArrays (and float arrays) of every kind.

For every draw: either the call raises an exception whose type and message are in the documented list
(``properties_lib.static_errors``: TypeError/ValueError naming the argument; the scale-overflow ValueError of
``quantize``'s "Limits"), or all of the following hold, checked in float64 numpy.

Layout and storage
  ``q.shape == x.shape``, ``q.dtype == x.dtype``; the scale has the rank of x with per axis the full size
  (channelwise), size / tile (tiled) or 1 (``tiles=t`` tiles the last axis and makes every other axis
  channelwise); a zero point exactly for unsigned formats and asymmetric calibrations (``minmax``,
  ``fixed,lo,hi`` with lo != -hi); ``q.nbytes == qvalue + scale + zero_point`` bytes with
  ``qvalue = rows * ceil(bits * n / 8)`` for packed formats (n along the pack axis, rows the product of the
  other axes) and one byte per value otherwise, computed from the case alone, not from q's arrays.
  A size-0 array gets unit scales.

Error bounds (s the stored scale of the value's group, so a scale that a narrow ``scale_dtype`` rounded up is
accounted for; for values inside the representable range
``[(qmin - zp - h) s, (qmax - zp + h) s]``, h half a step, fp8/nf4 ``[-qmax s, qmax s]``):

* symmetric intB: ``|x - x^| <= s / 2`` (absmax lands on qmax + 1/2, the edge of the top code's cell;
  int1: levels +-s, ``<= s``);
* with a zero point (uintB, minmax, asymmetric fixed): ``<= s / 2`` too, tighter than the ``<= s`` one might
  expect: the rounded zero point can shift the grid by up to half a step, but a grid that starts up to s/2
  past lo ends at most s/2 short of hi, and a value beyond an end level is at most s/2 from it;
* fp8: ``2**-(m+1) |x| + (subnormal spacing / 2) s`` (e4m3: ``2**-4 |x| + 2**-10 s``;
  e5m2: ``2**-3 |x| + 2**-17 s``), with absmax mapped to the format's max (448 / 57344);
* nf4: half the largest gap between adjacent code-book levels (0.152) times s;
* values outside the representable range (clipping calibrations: rms, percentile, mse, fixed) saturate to
  the end level (``qmax s``, ``(qb - zp) s``, ``448 s``...).

Every bound carries float slack for the arithmetic: ``8 u_c (|x| + |v s| + s L)`` (u_c the unit roundoff of
the compute dtype, 2**-24 / 2**-53; L the largest unscaled level), ``u_out |x^|`` plus half the output
dtype's smallest subnormal for the final cast to x.dtype (bfloat16 output: 2**-8 relative, the size of
int8's half step itself), and ``2 tiny_c`` for flush-to-zero: XLA:CPU treats subnormal operands and results
as zero (float32 data below 1.2e-38 quantizes as 0).

Calibrated ranges (per group, from the stored scale: ``s * calibration_bound`` or ``s * (qb - qa)``):
absmax / minmax / fixed exactly the documented range (within 8 u_c, the scale floored at the scale
dtype's smallest normal and rounded up by at most one ulp of a narrow ``scale_dtype``); ``rms,k``
``min(k * RMS, absmax)`` within 1e-3 (float32 sum of squares; where the squares overflow, absmax); ``percentile,p``
the p-th percentile of |x| within 1e-5; ``mse,steps,r`` within ``[r * absmax, absmax]``.

NaN / Inf: a group holding one dequantizes to all NaN, the other groups to exactly what they give with
that value replaced by 0, and ``check_finite=True`` raises the documented ValueError. Finite input gives
finite output and positive, finite, normal scales (except the documented overflow ValueError).

Identities (bit for bit): ``fake_quant(x) == dequantize(quantize(x))``; ``dequantize(q.transpose(p)) ==
dequantize(q).transpose(p)``; ``dequantize(q.reshape(s)) == dequantize(q).reshape(s)`` where the reshape is
allowed (else the documented ValueError; a per-tensor, unpacked QArray always reshapes);
``codes(quantize_with_scale(dequantize(q, ct), q.scale, q.zero_point)) == codes(q)`` with ct the compute
dtype: exact because ``x^ = fl(v s)`` and ``fl(x^ fl(1/s)) = v (1 + d)``, ``|d| <= 3 u``, and
``|v| <= 256`` moves v by far less than half a step (ints), half an fp8 ulp, or the 0.04 from a code-book
level to the nearest midpoint (nf4). Skipped where it is not exact: elements whose level overflowed the
dtype (dequantize clips them) or is subnormal (flushed to zero).

Ops: ``matmul`` / ``dot_general`` equal the float64 product of the dequantized operands within
``gamma_{K+4} * |x| . |w|`` (tolerances.dot_bound, evals=1): the integer path sums int8 codes exactly in
int32, then each tile's sum goes through at most 3 roundings (int32 -> float32, x s_a, x s_b) and the float32
sum of S <= K tiles, while the reference's operands are each rounded once (dequantize): at most
``S + 3 + 2 <= K + 4`` roundings per term. The fp8 and float paths are one float32 dot of (dequantized or
unscaled) operands plus at most one output scaling: the same bound.

Bugs this sweep found (rms underflow, float64 percentile / fixed / mse, size-0 checks, float64 scales
without x64, empty contractions) are fixed; each has a regression test at the end of this module.

Budget: ~300 examples in the default profile (about a minute on 2 busy cores, nearly all of it XLA
compiling one program per new (format, layout, shape)); ``QARRAY_TEST_PROFILE=long`` runs 25x as many,
randomized, and draws the quantize structure freely instead of from the catalogue below.
"""

from __future__ import annotations

import functools
import math

import hypothesis
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import event, given, settings, strategies as st

import budget
import qarray
from properties_lib import (FLOAT_DTYPES, FORMATS, OVERFLOW_ERROR, U, Case, EXPONENTS, Values, compute_dtype,
                            expand, expected_nbytes, finfo, format_error_bound, matches, max_unscaled,
                            np_dtype, overflow_state, parse_calibration, per_group, raw_scale_f, representable,
                            scale_shape, static_errors, unscaled, uses_zero_point, x64_if)
from qarray import qtypes
from tolerances import OP_EXTRA, dot_bound


# ------------------------------------------------------------------------------------------ strategies
# Default profile: a fixed catalogue of structures (XLA compiles one program per format, layout and shape,
# so the examples reuse a few dozen programs and vary the values). Together they cover every format,
# every calibration, ranks 0..3, sizes 0 / 1 / odd, tiles on the last and a leading axis, negative and
# multiple channel axes, pack axes 0 / 1 / -1, every data dtype and every scale dtype.
CATALOGUE = (
    Case((5, 7), 'float32', 'int1', channelwise_axes=0),
    Case((3, 8), 'bfloat16', 'int2', tiles=4, calibration='rms'),
    Case((2, 3, 5), 'float32', 'int3', channelwise_axes=(0, -1), pack_axis=1),
    Case((4, 6), 'float32', 'int4', tiles={0: 2}, calibration='mse', scale_dtype='bfloat16'),
    Case((7,), 'float16', 'int5'),
    Case((0, 4), 'float32', 'int6', channelwise_axes=1, calibration='minmax'),
    Case((3, 1, 4), 'float32', 'int7', tiles=2, calibration='percentile,90'),
    Case((), 'float32', 'int8'),
    Case((6, 5), 'float64', 'int8_narrow', channelwise_axes=-1),
    Case((4, 3), 'float32', 'uint1', calibration='minmax', pack_axis=0),
    Case((2, 9), 'float32', 'uint2'),
    Case((1, 1), 'float32', 'uint3', calibration='minmax'),
    Case((4, 8), 'bfloat16', 'uint4', calibration='minmax', tiles=4, scale_dtype='float32'),
    Case((3, 4), 'float32', 'uint5', calibration='fixed,-1,3'),
    Case((5,), 'float64', 'uint6', calibration='minmax'),
    Case((2, 2, 3), 'float32', 'uint7', calibration='rms,2', channelwise_axes=2),
    Case((6, 4), 'float16', 'uint8', calibration='minmax', channelwise_axes=0, scale_dtype='float32'),
    Case((4, 16), 'float32', 'float8_e4m3fn', tiles=8),
    Case((3, 5), 'bfloat16', 'float8_e5m2', channelwise_axes=(0,), scale_dtype='bfloat16'),
    Case((4, 16), 'float32', 'nf4', tiles=8, calibration='fixed,-2,2'),
    Case((2, 0, 3), 'float32', 'nf4', channelwise_axes=0),
    Case((33,), 'float32', 'int8', calibration='mse,8,0.5', scale_dtype='float16'),
    Case((8, 1), 'float64', 'float8_e4m3fn', calibration='percentile,99', channelwise_axes=(1,)),
    Case((3, 5), 'float32', 'int4', calibration='minmax', tiles={1: 5}, scale_dtype='float16'),
    # One group of 4096 values: XLA:CPU runs reductions that large through another kernel (YNNPACK), whose
    # max drops NaN; the NaN/Inf policy must hold there too.
    Case((4096,), 'float32', 'uint8', calibration='minmax'),
)
# Formats registered later (e.g. a new float format) get a default structure until they are placed above.
CATALOGUE += tuple(Case((3, 10), 'float32', name, tiles=5) for name in FORMATS
                   if name not in {c.qtype for c in CATALOGUE})
if budget.LONG:  # bigger groups for the long run
    CATALOGUE += (Case((2, 4096), 'float32', 'int8', channelwise_axes=0, calibration='rms'),
                  Case((8192,), 'bfloat16', 'nf4', calibration='absmax'))

CALIBRATIONS = ('absmax', 'absmax', 'minmax', 'rms', 'rms,1.5', 'percentile,95', 'percentile,100', 'mse',
                'mse,4,0.5', 'fixed,-2,2', 'fixed,-1,3', 'fixed,0.5,4')
BAD_CALIBRATIONS = ('rms,0', 'rms,-1', 'percentile,0', 'percentile,101', 'fixed,2,1', 'fixed,1', 'mse,1',
                    'mse,8,1.5', 'absmax,3', 'bogus', 'rms,x')
SIZES = (0, 1, 2, 3, 4, 5, 6, 8, 12)


@st.composite
def random_cases(draw, valid_only: bool = False) -> Case:
    """Any structure, valid or not (invalid arguments are cheap: they raise before anything compiles)."""
    nd = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.sampled_from(SIZES), min_size=nd, max_size=nd)))
    if math.prod(shape) > 2048:
        shape = tuple(min(d, 8) for d in shape)
    dtype = draw(st.sampled_from(FLOAT_DTYPES + (('float32',) * 3)))
    qtype = draw(st.sampled_from(FORMATS))
    bad = not valid_only and draw(st.sampled_from([False, False, False, True]))
    what = draw(st.sampled_from(['cw', 'tiles', 'pack', 'cal', 'scale', 'qtype', 'dtype'])) if bad else None
    # channelwise axes
    if nd and draw(st.booleans()):
        k = draw(st.integers(1, nd))
        cw = tuple(draw(st.permutations(range(nd)))[:k])
        cw = tuple(a - nd if draw(st.booleans()) else a for a in cw)
        cw = cw[0] if len(cw) == 1 and draw(st.booleans()) else cw
    else:
        cw = ()
    if what == 'cw':
        cw = draw(st.sampled_from([(nd,), (-nd - 1,), (0, 0) if nd else (1,), 'ab', (1.5,), (True,)]))
    # tiles
    tiles = None
    tiled = draw(st.sampled_from(['none', 'none', 'int', 'dict']))
    if nd and tiled != 'none':
        ax = draw(st.integers(0, nd - 1)) if tiled == 'dict' else nd - 1
        n = shape[ax]
        divs = [t for t in range(1, max(n, 1) + 1) if n % t == 0] or [1]
        t = draw(st.sampled_from(divs))
        cw_set = {a % nd for a in ((cw,) if isinstance(cw, int) else cw) if isinstance(a, int) and not isinstance(a, bool) and -nd <= a < nd} if not isinstance(cw, str) else set()
        if tiled == 'dict':
            tiles = {ax - nd if draw(st.booleans()) else ax: t}
            if ax in cw_set and what != 'tiles':
                cw = tuple(a for a in ((cw,) if isinstance(cw, int) else cw) if a % nd != ax)
        else:
            tiles = t
            if ax in cw_set and what != 'tiles':
                cw = tuple(a for a in ((cw,) if isinstance(cw, int) else cw) if a % nd != ax)
    if what == 'tiles':
        tiles = draw(st.sampled_from(['zero', 'nondiv', 'axis', 'cw', 'str', 'twice']))
        if tiles == 'zero':
            tiles = 0
        elif tiles == 'nondiv':
            tiles = {nd - 1: shape[-1] + 1} if nd else 3
        elif tiles == 'axis':
            tiles = {nd: 1}
        elif tiles == 'cw' and nd:
            cw, tiles = (nd - 1,), {nd - 1: 1}
        elif tiles == 'twice' and nd:
            tiles = {nd - 1: 1, -1: 1}
        else:
            tiles = {'0': 1}
    # calibration: asymmetric ones on int1 / fp8 / nf4 are documented errors, drawn only as "bad"
    cal = draw(st.sampled_from(CALIBRATIONS))
    qt = qtypes.get(qtype)
    from properties_lib import is_asymmetric
    if is_asymmetric(cal) and not qt.is_integer or (is_asymmetric(cal) and qt.bits == 1 and qt.kind == 'int'):
        if what != 'cal':
            cal = 'absmax'
    if what == 'cal':
        cal = draw(st.sampled_from(BAD_CALIBRATIONS + ('minmax',)))
        if cal == 'minmax':
            qtype = draw(st.sampled_from(['int1', 'float8_e4m3fn', 'float8_e5m2', 'nf4']))
    pack_axis = draw(st.integers(-nd, nd - 1)) if nd else -1
    if what == 'pack':
        qtype = draw(st.sampled_from(['int4', 'uint3', 'nf4', 'int1']))
        pack_axis = draw(st.sampled_from([nd, -nd - 1, 7]))
    scale_dtype = draw(st.sampled_from([None, None, 'float32', 'bfloat16', 'float16', 'float64']))
    if scale_dtype == 'float64' and dtype != 'float64':  # float64 scales drawn under x64 (else float32: tested below)
        scale_dtype = 'float64' if draw(st.booleans()) else None  # (x64 is then enabled for the call)
    if what == 'scale':
        scale_dtype = 'int32'
    if what == 'qtype':
        qtype = draw(st.sampled_from(['int9', 'uint0', 'int16', 'int1_narrow', 'fp16']))
    if what == 'dtype':
        dtype = 'int32'
    c = Case(shape, dtype, qtype, cw, tiles, cal, scale_dtype, pack_axis)
    return c


@st.composite
def values(draw, dtype: str) -> Values:
    kind = draw(st.sampled_from(['normal', 'normal', 'positive', 'constant', 'zeros', 'wide', 'outlier',
                                 'extreme']))
    exp = draw(st.sampled_from(EXPONENTS.get(dtype, EXPONENTS['float32'])))
    special = draw(st.sampled_from([None] * 5 + ['nan', 'inf', '-inf']))
    return Values(kind, exp, draw(st.integers(0, 2 ** 16)), special, draw(st.integers(0, 2 ** 16)))


# ------------------------------------------------------------------------------------------ quantize
@functools.partial(jax.jit, static_argnames=('qtype', 'pack_axis'))
def _requantized_codes(x, scale, zero_point, *, qtype, pack_axis):
    return qarray.codes(qarray.quantize_with_scale(x, qtype, scale, zero_point, pack_axis=pack_axis))


def run_quantize(case: Case, vals: Values, data) -> None:
    errs = static_errors(case)
    with x64_if(case.x64):
        x = vals.make(case.shape, case.dtype) if case.dtype in FLOAT_DTYPES else np.arange(
            math.prod(case.shape), dtype=np.int32).reshape(case.shape)
        over = 'no' if errs else overflow_state(case, x)
        allowed = errs + ([OVERFLOW_ERROR] if over != 'no' else [])
        try:
            q = qarray.quantize(jnp.asarray(x), case.qtype, **case.kwargs())
        except (TypeError, ValueError) as e:
            assert allowed, f"a valid call raised {type(e).__name__}: {e}"
            assert matches(e, allowed), f"{type(e).__name__}: {e}\nis not one of the documented errors {allowed}"
            event(f'error: {type(e).__name__}' + (' (scale overflow)' if matches(e, [OVERFLOW_ERROR]) else ''))
            return
        assert not errs, f"expected one of the documented errors {errs}; got {q!r}"
        assert over != 'yes', f"a range needing a scale beyond scale_dtype must raise ValueError; got {q!r}"
        if over == 'maybe':
            event('scale overflow possible, not raised')
        event('quantized')
        check_qarray(case, x, q, data)


def check_qarray(case: Case, x: np.ndarray, q: qarray.QArray, data) -> None:
    qt = qtypes.get(case.qtype)
    nd = len(case.shape)
    out_dt = np_dtype(case.dtype)
    sd = np_dtype(case.scale_dtype) if case.scale_dtype is not None else out_dt
    has_zp = uses_zero_point(qt, case.calibration)
    sshape = scale_shape(case)
    # ---- layout and storage
    assert isinstance(q, qarray.QArray) and q.qtype == qt, q
    assert q.shape == case.shape and q.ndim == nd and q.size == x.size, (q.shape, case.shape)
    assert q.dtype == out_dt, (q.dtype, out_dt)
    assert tuple(q.scale.shape) == sshape, f"scale shape {q.scale.shape}, documented {sshape}"
    assert q.scale.dtype == sd, (q.scale.dtype, sd)
    assert (q.zero_point is not None) == has_zp, f"zero point present: {q.zero_point is not None}"
    if has_zp:
        assert tuple(q.zero_point.shape) == sshape and q.zero_point.dtype == qt.code_dtype
    if qt.packed:
        assert q.packed_axis == case.pack_axis % nd - nd and q.qvalue.dtype == np.uint8
    else:
        assert q.packed_axis is None and q.qvalue.dtype == qt.native_dtype
    want_nbytes = expected_nbytes(case)
    assert q.nbytes == want_nbytes, f"nbytes {q.nbytes}, documented {want_nbytes}"
    assert q.nbytes == sum(a.nbytes for a in (q.qvalue, q.scale, q.zero_point) if a is not None)
    y = qarray.dequantize(q)
    assert y.shape == case.shape and y.dtype == out_dt, (y.shape, y.dtype)
    with pytest.raises(TypeError, match='dtype: a QArray dequantizes to a floating dtype'):
        qarray.dequantize(q, jnp.int32)
    if nd == 0:
        with pytest.raises(TypeError, match='rank-0 QArray'):
            len(q)
    else:
        assert len(q) == case.shape[0]
    y = np.asarray(y, np.float64)
    fq = qarray.fake_quant(jnp.asarray(x), case.qtype, **{k: v for k, v in case.kwargs().items() if k != 'pack_axis'})
    np.testing.assert_array_equal(np.asarray(fq, np.float64), y, err_msg='fake_quant != dequantize(quantize)')
    if x.size == 0:
        assert np.all(np.asarray(q.scale) == 1), 'a size-0 array gets unit scales'
        return
    # ---- values
    ct = compute_dtype(case)  # the scale arithmetic (float64 under x64)
    cx = 'float64' if case.dtype == 'float64' else 'float32'  # the data's arithmetic: its u and flush-to-zero
    u_c, tiny_c = U[cx], float(finfo(cx).tiny)
    max_c, tiny_ct = float(finfo(ct).max), float(finfo(ct).tiny)
    fo = finfo(out_dt)
    u_out, sub_out, max_out = float(fo.eps) / 2, float(fo.smallest_subnormal), float(fo.max)
    xs = x.astype(np.float64)
    sg = np.asarray(q.scale).astype(np.float64)
    zg = None if q.zero_point is None else np.asarray(q.zero_point).astype(np.float64)
    finite_g = per_group(np.isfinite(xs), sshape, np.all)
    s = expand(sg, case.shape)
    zp = None if zg is None else expand(zg, case.shape)
    fin = expand(finite_g, case.shape)
    codes = np.asarray(qarray.codes(q))
    assert codes.shape == case.shape
    v = unscaled(qt, codes, zp)
    # NaN / Inf: the group is all NaN; check_finite=True refuses it.
    if not np.all(fin):
        event('has NaN/Inf')
        assert np.all(np.isnan(y[~fin])), f"a group holding NaN/Inf must dequantize to NaN; got {y[~fin]}"
        with pytest.raises(ValueError, match='contains NaN or Inf and check_finite=True'):
            qarray.quantize(jnp.asarray(x), case.qtype, check_finite=True, **case.kwargs())
        if np.any(fin):  # the other groups: exactly as if the bad groups were all 0
            clean = np.where(fin, x, np.zeros_like(x))
            y2 = np.asarray(qarray.dequantize(qarray.quantize(jnp.asarray(clean), case.qtype, **case.kwargs())),
                            np.float64)
            np.testing.assert_array_equal(y[fin], y2[fin], err_msg='NaN/Inf leaked into other groups')
    good = fin
    # Scales of finite groups: finite, positive and normal in scale_dtype; zero points integer codes.
    sgood = finite_g
    assert np.all(np.isfinite(sg[sgood]) & (sg[sgood] >= float(finfo(sd).tiny))), \
        f"finite groups need finite positive normal scales; got {sg[sgood]}"
    if zg is not None:
        qa, qb = qt.asym_range
        assert np.all((zg == np.round(zg)) & (zg >= qa) & (zg <= qb)), zg
    assert np.all(np.isfinite(y[good])), f"finite input must dequantize finite; got {y[good][~np.isfinite(y[good])]}"
    # dequantize = level * scale, rounded once into x.dtype (clipped to its finite range).
    vs = v * s
    with np.errstate(invalid='ignore'):
        want = np.clip(vs, -max_out, max_out)
    tol = (u_c + u_out) * np.abs(vs) + sub_out + 2 * tiny_c
    assert_le(np.abs(y - want)[good], tol[good], 'dequantize vs codes * scale', xs[good], y[good])
    # The format's error bound inside the representable range; saturation outside it.
    lo_r, hi_r, lo_lev, hi_lev = representable(qt, s, zp)
    # (each term scaled before the sum, so float64 data near its max does not overflow the slack to inf)
    slack = 8 * u_c * np.abs(xs) + 8 * u_c * np.abs(vs) + 8 * u_c * max_unscaled(qt) * s + u_out * np.abs(y) + \
        sub_out + 2 * tiny_c
    with np.errstate(invalid='ignore'):
        inside = good & (xs >= lo_r) & (xs <= hi_r)
        bound = format_error_bound(qt, xs, s, has_zp) + slack
    assert_le(np.abs(y - xs)[inside], bound[inside], f'{qt.name} error bound', xs[inside], y[inside])
    for side, lev in (((xs > hi_r) & good, hi_lev), ((xs < lo_r) & good, lo_lev)):
        if np.any(side):
            event('saturated')
            assert_le(np.abs(y - np.clip(lev, -max_out, max_out))[side], slack[side], 'saturation to the end level',
                      xs[side], y[side])
    if qt.name != 'int1':
        zero = good & (xs == 0)
        assert np.all(y[zero] == 0), '0 must be exact'
    check_calibrated_range(case, qt, xs, sg, sgood, sd, ct, cx)
    # ---- identities
    if nd >= 2 and data.draw(st.booleans(), label='check transpose'):
        perm = tuple(data.draw(st.permutations(range(nd)), label='perm'))
        qt_ = q.transpose(perm)
        assert qt_.shape == tuple(case.shape[i] for i in perm) and qt_.nbytes == q.nbytes
        np.testing.assert_array_equal(np.asarray(qarray.dequantize(qt_), np.float64), np.transpose(y, perm),
                                      err_msg='dequantize(q.transpose(p)) != dequantize(q).transpose(p)')
    if nd >= 1 and data.draw(st.booleans(), label='check reshape'):
        check_reshape(q, y, data)
    if np.all(fin) and data.draw(st.booleans(), label='check requantize'):
        exact = (np.abs(vs) <= max_c) & ((v == 0) | (np.abs(vs) >= tiny_ct))
        xr = qarray.dequantize(q, jnp.dtype(ct))
        c2 = np.asarray(_requantized_codes(xr, q.scale, q.zero_point, qtype=qt, pack_axis=case.pack_axis))
        np.testing.assert_array_equal(c2[exact], codes[exact], err_msg='quantize_with_scale(dequantize(q)) changed codes')


def check_calibrated_range(case, qt, xs, sg, sgood, sd, ct, cx) -> None:
    """The stored scale is the documented function of the documented calibrated range."""
    name, args = parse_calibration(case.calibration)
    sshape = sg.shape
    xf = np.where(np.isfinite(xs), xs, 0.0)
    u_c, tiny_c = U[cx], float(finfo(cx).tiny)
    absmax = per_group(np.abs(xf), sshape, np.max)
    lo, hi, tol = -absmax, absmax, 8 * u_c
    lo_alt, hi_alt = lo, hi  # a second acceptable range (the bound below accepts anything between)
    skip = ~sgood
    if name == 'minmax':
        lo, hi = per_group(xf, sshape, np.min), per_group(xf, sshape, np.max)
        lo_alt, hi_alt = lo, hi
    elif name == 'fixed':
        as_ct = (lambda v: float(v)) if case.dtype == 'float64' else (lambda v: float(np.float32(v)))
        lo = lo_alt = np.full(sshape, as_ct(args[0]))   # float64 data keeps a range beyond float32's
        hi = hi_alt = np.full(sshape, as_ct(args[1]))
    elif name == 'rms':
        k = args[0] if args else 3.0
        # RMS of x / absmax, times absmax: no square underflows or overflows, whatever the magnitude.
        m = expand(absmax, xf.shape)
        unit = np.divide(xf, m, out=np.zeros_like(xf), where=m > 0)
        hi = np.minimum(k * absmax * np.sqrt(per_group(np.square(unit), sshape, np.mean)), absmax)
        lo, tol = -hi, 1e-3
        lo_alt, hi_alt = lo, hi
    elif name == 'percentile':
        with np.errstate(over='ignore'):  # percentiles run in the compute dtype (float64 data: float64)
            a32 = np.abs(xf) if case.dtype == 'float64' else np.abs(xf).astype(np.float32).astype(np.float64)
        with np.errstate(invalid='ignore'):
            hi = per_group(a32, sshape, lambda v, axis: np.percentile(v, args[0], axis=axis))
        lo, tol = -hi, 1e-5
        lo_alt, hi_alt = lo, hi
    elif name == 'mse':
        r = args[1] if len(args) > 1 else 0.3
        lo, hi, tol = -r * absmax, r * absmax, 1e-5
    want = raw_scale_f(case, qt, lo, hi, 'float64')
    want_alt = raw_scale_f(case, qt, lo_alt, hi_alt, 'float64')
    w_lo, w_hi = np.minimum(want, want_alt), np.maximum(want, want_alt)
    s_tiny = float(finfo(sd).tiny)
    narrow = 0.0 if np.dtype(sd) == np.dtype(ct) else float(finfo(sd).eps)
    lower = w_lo * (1 - tol) - 2 * tiny_c
    upper = np.maximum(w_hi * (1 + tol), s_tiny) * (1 + narrow) + 2 * tiny_c
    ok = skip | ((sg >= lower) & (sg <= upper))
    if not np.all(ok):
        i = np.argmin(ok)
        raise AssertionError(
            f"calibration {case.calibration!r}: scale {sg.flat[i]:.9g} outside the documented "
            f"[{lower.flat[i]:.9g}, {upper.flat[i]:.9g}] (group {np.unravel_index(i, sshape)}; "
            f"absmax {absmax.flat[i]:.9g})")


def assert_le(err, bound, what, xs, y) -> None:
    ok = err <= bound
    if not np.all(ok):
        i = np.argmin(ok)
        raise AssertionError(f"{what}: {int((~ok).sum())}/{ok.size} elements outside the bound; first: "
                             f"x={xs.flat[i]!r} -> {y.flat[i]!r}, err {err.flat[i]:.6g} > bound {bound.flat[i]:.6g}")


def check_reshape(q: qarray.QArray, y: np.ndarray, data) -> None:
    shape = list(q.shape)
    nd = len(shape)
    how = data.draw(st.sampled_from(['same', 'unit', 'split', 'merge', 'flat']), label='reshape')
    if how == 'unit':
        i = data.draw(st.integers(0, nd), label='at')
        new = shape[:i] + [1] + shape[i:]
    elif how == 'split':
        i = data.draw(st.integers(0, nd - 1), label='axis')
        n = shape[i]
        a = data.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0] or [1]), label='factor')
        new = shape[:i] + [a, n // a if a else 0] + shape[i + 1:]
    elif how == 'merge' and nd >= 2:
        i = data.draw(st.integers(0, nd - 2), label='axis')
        new = shape[:i] + [shape[i] * shape[i + 1]] + shape[i + 2:]
    elif how == 'flat':
        new = [int(np.prod(shape))]
    else:
        new = list(shape)
    if data.draw(st.booleans(), label='use -1') and math.prod(new) and new:
        new[data.draw(st.integers(0, len(new) - 1), label='-1 at')] = -1
    target = tuple(np.empty(shape, np.int8).reshape(new).shape)
    per_tensor_unpacked = all(d == 1 for d in q.scale.shape) and q.packed_axis is None
    try:
        r = q.reshape(new)
    except ValueError as e:
        assert 'cannot reshape QArray' in str(e), e
        assert not (per_tensor_unpacked or how == 'same'), f"{q!r}.reshape({new}) must work: {e}"
        event('reshape refused')
        return
    assert r.shape == target and r.nbytes == q.nbytes, (r.shape, target)
    np.testing.assert_array_equal(np.asarray(qarray.dequantize(r), np.float64), y.reshape(target),
                                  err_msg=f'dequantize(q.reshape({new})) != dequantize(q).reshape(...)')


@pytest.mark.parametrize('case', CATALOGUE, ids=lambda c: f"{c.qtype}-{c.dtype}-{'x'.join(map(str, c.shape)) or 'scalar'}")
@settings(max_examples=budget.examples(6))
@given(data=st.data())
def test_quantize_sweep(case, data):
    """Each catalogue structure with values of every magnitude (the long profile: 25x the values)."""
    run_quantize(case, data.draw(values(case.dtype), label='values'), data)


@settings(max_examples=budget.examples(50))
@given(case=random_cases(), data=st.data())
def test_arguments_sweep(case, data):
    """Any structure, a quarter of them with an invalid argument: a documented error or a correct QArray."""
    run_quantize(case, data.draw(values(case.dtype if case.dtype in FLOAT_DTYPES else 'float32'), label='values'),
                 data)


# ------------------------------------------------------------------------------------------ quantize_with_scale
QWS_SHAPES = ((4, 6), (3,), (2, 0))


@st.composite
def qws_cases(draw):
    shape = draw(st.sampled_from(QWS_SHAPES))
    qtype = draw(st.sampled_from(['int8', 'int4', 'uint4', 'uint8', 'int1', 'float8_e4m3fn', 'nf4', 'int8_narrow']))
    kind = draw(st.sampled_from(['tensor', 'channel', 'tile', 'badshape', 'badrank']))
    if kind == 'tensor':
        sshape = (1,) * len(shape)
    elif kind == 'channel':
        sshape = shape[:-1] + (1,) if len(shape) > 1 else shape
    elif kind == 'tile':
        sshape = shape[:-1] + ((shape[-1] // 2) if shape[-1] % 2 == 0 and shape[-1] else 1,)
    elif kind == 'badshape':
        sshape = shape[:-1] + (shape[-1] + 1 if shape[-1] else 5,)
    else:
        sshape = (1,) * (len(shape) + 1)
    scale_kind = draw(st.sampled_from(['ok', 'ok', 'ok', 'zero', 'negative', 'nan', 'inf', 'int']))
    zp_kind = draw(st.sampled_from(['none', 'ok', 'fraction', 'range']))
    return shape, qtype, sshape, scale_kind, zp_kind


@settings(max_examples=budget.examples(40))
@given(spec=qws_cases(), vals=values('float32'))
def test_quantize_with_scale_sweep(spec, vals):
    """quantize_with_scale: a documented error for a bad scale / zero point, else codes within the bound."""
    shape, qtype, sshape, scale_kind, zp_kind = spec
    qt = qtypes.get(qtype)
    x = vals.make(shape, 'float32')
    rng = np.random.default_rng(vals.seed)
    scale = (10.0 ** rng.uniform(-3, 3, sshape)).astype(np.float32)
    errs = []
    if len(sshape) != len(shape) or any(s == 0 or n % s for n, s in zip(shape, sshape) if n):
        errs.append((ValueError, r"scale of shape .* does not fit x of shape"))
    if scale_kind == 'int':
        scale = scale.astype(np.int32) + 1
        errs.append((TypeError, r"scale must be a floating-point array"))
    elif scale_kind != 'ok' and scale.size:
        scale.flat[vals.special_at % scale.size] = {'zero': 0.0, 'negative': -1.0, 'nan': np.nan, 'inf': np.inf}[scale_kind]
        errs.append((ValueError, r"scale must be positive and finite everywhere"))
    zp = None
    if zp_kind != 'none':
        if qt.is_integer and not (qt.kind == 'int' and qt.bits == 1):
            qa, qb = qt.asym_range
            zp = rng.integers(qa, qb + 1, sshape).astype(np.float32)
            if zp_kind == 'fraction' and zp.size:
                zp.flat[0] += 0.5
                errs.append((ValueError, rf"zero_point must hold integer codes of '{qt.name}'"))
            if zp_kind == 'range' and zp.size:
                zp.flat[0] = qb + 1
                errs.append((ValueError, rf"zero_point must hold integer codes of '{qt.name}'"))
        else:
            zp = np.zeros(sshape, np.float32)
            if qt.kind == 'int':
                errs.append((ValueError, r"qtype 'int1' has no zero level"))
            else:
                errs.append((ValueError, rf"qtype '{qt.name}' has no zero point"))
    if qt.kind == 'uint' and zp is None:
        errs.append((ValueError, r"is unsigned and needs a zero_point"))
    try:
        q = qarray.quantize_with_scale(jnp.asarray(x), qtype, jnp.asarray(scale),
                                       None if zp is None else jnp.asarray(zp))
    except (TypeError, ValueError) as e:
        assert errs, f"a valid call raised {type(e).__name__}: {e}"
        assert matches(e, errs), f"{type(e).__name__}: {e}\nis not one of the documented errors {errs}"
        event(f'error: {type(e).__name__}')
        return
    assert not errs, f"expected one of {errs}; got {q!r}"
    event('quantized')
    assert q.shape == shape and tuple(q.scale.shape) == sshape
    y = np.asarray(qarray.dequantize(q), np.float64)
    if x.size == 0:
        return
    xs = x.astype(np.float64)
    s = expand(scale.astype(np.float64), shape)
    z = None if zp is None else expand(zp.astype(np.float64), shape)
    lo_r, hi_r, lo_lev, hi_lev = representable(qt, s, z)
    fin = np.isfinite(xs)
    slack = 8 * U['float32'] * (np.abs(xs) + s * max_unscaled(qt)) + 2 * float(np.finfo(np.float32).tiny)
    with np.errstate(invalid='ignore'):
        inside = fin & (xs >= lo_r) & (xs <= hi_r)
    bound = format_error_bound(qt, xs, s, zp is not None) + slack
    assert_le(np.abs(y - xs)[inside], bound[inside], f'{qtype} with a given scale', xs[inside], y[inside])
    for side, lev in (((xs > hi_r) & fin, hi_lev), ((xs < lo_r) & fin, lo_lev)):
        assert_le(np.abs(y - lev)[side], slack[side], 'saturation', xs[side], y[side])


# ------------------------------------------------------------------------------------------ ops
OPERANDS = (None, ('int8', 'absmax'), ('int4', 'absmax'), ('uint4', 'minmax'), ('uint8', 'minmax'),
            ('int2', 'absmax'), ('int8_narrow', 'absmax'), ('float8_e4m3fn', 'absmax'), ('float8_e5m2', 'absmax'),
            ('nf4', 'absmax'))


@st.composite
def op_cases(draw):
    m = draw(st.sampled_from([1, 3]))
    k = draw(st.sampled_from([64, 5, 256, 0]))
    n = draw(st.sampled_from([1, 4]))
    batch = draw(st.sampled_from([(), (), (2,)]))
    form = draw(st.sampled_from(['matmul', 'matmul', 'dot_general_t']))  # t: rhs stored [N, K]
    pair = draw(st.sampled_from(['int', 'fp8', 'int', 'mixed', 'fp8', 'float']))  # which path the pair should take
    ints = [o for o in OPERANDS if o and qtypes.get(o[0]).is_integer]
    fp8s = [o for o in OPERANDS if o and qtypes.get(o[0]).kind == 'float']
    sides = []
    for side in ('lhs', 'rhs'):
        pool = {'int': ints, 'fp8': fp8s, 'mixed': OPERANDS[1:], 'float': OPERANDS}[pair]
        op = draw(st.sampled_from(pool))
        lay = draw(st.sampled_from(['tensor', 'channel', 'tiles', 'contract_channel']))
        tile = draw(st.sampled_from([t for t in (128, 16, 256, 1, 64) if k and k % t == 0] or [1]))
        sides.append((op, lay, tile))
    mismatch = draw(st.sampled_from([False] * 9 + [True]))
    exp = draw(st.sampled_from([-3, 0, 3]))
    seed = draw(st.integers(0, 2 ** 16))
    return m, k, n, batch, form, sides, mismatch, exp, seed


def _operand(x, op, lay, tile, k_axis, free_axis):
    if op is None:
        return jnp.asarray(x)
    qtype, cal = op
    kw = {}
    if lay == 'channel':
        kw['channelwise_axes'] = (free_axis,)
    elif lay == 'tiles' and x.shape[k_axis] and x.shape[k_axis] % tile == 0:
        kw['tiles'] = {k_axis: tile}
        kw['channelwise_axes'] = (free_axis,)
    elif lay == 'contract_channel':
        kw['channelwise_axes'] = (k_axis,)
    return qarray.quantize(jnp.asarray(x), qtype, calibration=cal, **kw)


@settings(max_examples=budget.examples(30))
@given(spec=op_cases())
def test_ops_sweep(spec):
    """matmul / dot_general on QArrays: the float64 product of the dequantized operands within gamma_{K+4}."""
    m, k, n, batch, form, sides, mismatch, exp, seed = spec
    rng = np.random.default_rng(seed)
    kr = k + 1 if mismatch else k
    xa = (rng.standard_normal(batch + (m, k)) * 10.0 ** exp).astype(np.float32)
    rshape = batch + ((n, kr) if form == 'dot_general_t' else (kr, n))
    xb = (rng.standard_normal(rshape) * 10.0 ** exp).astype(np.float32)
    nb = len(batch)
    a = _operand(xa, *sides[0], k_axis=nb + 1, free_axis=nb)
    b = _operand(xb, *sides[1], k_axis=nb + (1 if form == 'dot_general_t' else 0),
                 free_axis=nb + (0 if form == 'dot_general_t' else 1))
    if form == 'dot_general_t':
        dn = (((nb + 1,), (nb + 1,)), (tuple(range(nb)), tuple(range(nb))))
        call = lambda: qarray.dot_general(a, b, dn)
    else:
        dn = (((nb + 1,), (nb,)), (tuple(range(nb)), tuple(range(nb))))
        call = lambda: qarray.matmul(a, b)
    errs = []
    if mismatch:
        errs.append((ValueError, r"contracting sizes differ"))
    both = isinstance(a, qarray.QArray) and isinstance(b, qarray.QArray)
    if both and not mismatch and k:
        kinds = {a.qtype.kind, b.qtype.kind}
        if kinds <= {'int', 'uint'} or kinds == {'float'}:
            cl = a.scale.shape[nb + 1]
            cr = b.scale.shape[nb + (1 if form == 'dot_general_t' else 0)]
            tl, tr = k // cl, k // cr
            if tl % tr and tr % tl:
                errs.append((ValueError, r"tiles on the contracting axes do not line up"))
    try:
        got = call()
    except (TypeError, ValueError) as e:
        assert errs, f"a valid op raised {type(e).__name__}: {e}"
        assert matches(e, errs), f"{type(e).__name__}: {e}\nis not one of the documented errors {errs}"
        event(f'op error: {type(e).__name__}: {str(e)[:40]}')
        return
    assert not errs, f"expected one of {errs}"
    da = np.asarray(qarray.dequantize(a) if isinstance(a, qarray.QArray) else a, np.float64)
    db = np.asarray(qarray.dequantize(b) if isinstance(b, qarray.QArray) else b, np.float64)
    want = np.matmul(da, np.swapaxes(db, -1, -2) if form == 'dot_general_t' else db)
    assert got.shape == want.shape and got.dtype == jnp.float32, (got.shape, want.shape, got.dtype)
    bound = dot_bound(da, db, dn=dn, evals=1, extra=OP_EXTRA)
    err = np.abs(np.asarray(got, np.float64) - want)
    ok = err <= bound
    path = qarray.ops.choose_path(a, b, dn)
    event(f'path {path}')
    assert np.all(ok), (f"{path} path: |got - float64 product of dequantized operands| {err[~ok].max():.3g} > "
                        f"gamma_(K+4) bound {bound[~ok].min():.3g}")


# ------------------------------------------------------------------------------------------ known bugs
def _nan_free(y) -> bool:
    return bool(np.all(np.isfinite(np.asarray(y, np.float64))))


def test_rms_of_tiny_values():  # was known bug B1: the squares underflowed
    x = jnp.array([1e-20, -1e-20, 5e-21], jnp.float32)
    y = np.asarray(qarray.dequantize(qarray.quantize(x, 'int8', calibration='rms')), np.float64)
    # documented range min(3 * RMS, absmax) = 1e-20: every value within half a step (1e-20 / 255)
    assert np.all(np.abs(y - np.asarray(x, np.float64)) <= 1e-20 / 255 * 1.001), y  # got ~1.5e-36


def test_percentile_of_float64_beyond_float32():  # was known bug B2: computed in float32
    with jax.enable_x64(True):
        x = jnp.array([1e300, -2e300, 3.0], jnp.float64)
        y = qarray.dequantize(qarray.quantize(x, 'int8', calibration='percentile,99'))
        assert _nan_free(y), y


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
def test_mse_under_x64(dtype):  # was known bug B3: a fori_loop carry dtype mismatch
    with jax.enable_x64(True):
        x = jnp.array([1.0, -2.0, 3.0], dtype)
        y = np.asarray(qarray.dequantize(qarray.quantize(x, 'int8', calibration='mse')), np.float64)
    # mse never picks a range wider than absmax; with no outlier here absmax is best: within half its step
    assert np.all(np.abs(y - [1.0, -2.0, 3.0]) <= 3.0 / 127 / 2 * (1 + 1e-6)), y


def test_fixed_range_beyond_float32():  # was known bug B4: the range was cast to float32
    with jax.enable_x64(True):
        x = jnp.array([1e200, -2e200, 3.0], jnp.float64)
        y = qarray.dequantize(qarray.quantize(x, 'int8', calibration='fixed,-1e300,1e300'))
        assert _nan_free(y), y


@pytest.mark.parametrize('qtype', ['int1', 'nf4', 'float8_e4m3fn'])
def test_size0_asymmetric_calibration_is_refused_as_for_any_size(qtype):  # was known bug B5
    with pytest.raises(ValueError, match=r'has no zero (level|point)'):
        qarray.quantize(jnp.zeros((0, 4)), qtype, calibration='minmax')


def test_float64_scale_without_x64_is_float32_and_positive():  # was known bug B6
    assert not jax.config.jax_enable_x64
    q = qarray.quantize(jnp.zeros(4), 'int8', scale_dtype=jnp.float64)
    assert q.scale.dtype == jnp.float32 and float(q.scale.min()) >= float(jnp.finfo(jnp.float32).tiny), q.scale


@pytest.mark.parametrize('lhs,rhs', [(('int8', ()), ('int4', ())),           # ZeroDivisionError
                                     (('int8', (1,)), ('int8', ())),         # TypeError: cannot reshape
                                     (('fp8', ()), ('fp8', (0,)))])          # TypeError: cannot reshape
def test_quantized_matmul_with_empty_contraction(lhs, rhs):  # was known bug B7: reshapes of empty tiles
    a = qarray.quantize(jnp.zeros((2, 0)), lhs[0], channelwise_axes=lhs[1])
    b = qarray.quantize(jnp.zeros((0, 3)), rhs[0], channelwise_axes=rhs[1])
    assert qarray.matmul(a, b).tolist() == [[0.0] * 3] * 2  # as int8 x int8 per-tensor and every float path give


def test_scale_on_a_size_0_axis_must_fit():  # was known bug B8
    with pytest.raises(ValueError, match=r'scale of shape \(2, 5\) does not fit x of shape \(2, 0\)'):
        qarray.quantize_with_scale(jnp.zeros((2, 0)), 'int8', jnp.ones((2, 5)))
