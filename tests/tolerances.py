"""Tolerances from the arithmetic, not from what one machine printed.

A float comparison in this suite is one of:

* **exact**: codes, packed bytes, scales computed by the same float32 formula, and the dequantize of the same
  codes (one correctly rounded product per value: the same bits on every IEEE machine) are compared with
  ``assert_array_equal`` or ``rtol=0``;
* **two float32 evaluations of one sum** (eager vs jit, sharded vs one device, a fused quantized op vs the
  float op on the dequantized operands): XLA's summation order depends on the machine (vector width,
  blocking, FMA contraction, thread split), so they agree only within the worst-case accumulation error of
  each: :func:`dot_bound` with ``evals=2``;
* **a float32 evaluation vs a float64 reference** of the same operands: :func:`dot_bound` with ``evals=1``;
* **a quantization or fidelity property** (error within half a step, fidelity above a threshold), whose
  margin is orders of magnitude above float32 rounding; the test says so where it compares.

The bound (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Lemma 3.1 and eq. 3.5): a dot
product of length K computed in floating point, in ANY order (pairwise, blocked, SIMD lanes, with or without
FMA), satisfies ``|fl(x . w) - x . w| <= gamma_K * (|x| . |w|)``, ``gamma_K = K u / (1 - K u)``, with u the
unit roundoff (float32: 2**-24). Every extra rounding a term goes through before it is summed (a dequantize
``q * s``, a scale product, a cast) adds one to K (``extra=``); a rounding of the result adds ``u * |result|``.
A QArray operand enters as its dequantized value: the quantized op equals the float op on the dequantized
operands within that accumulation error, so quantization error never enters these bounds.
"""

from __future__ import annotations

import math
import string

import numpy as np

U32 = 2.0 ** -24            # float32 unit roundoff (half of finfo.eps)
U64 = 2.0 ** -53            # float64: the references' own rounding
TINY = float(np.finfo(np.float32).tiny)   # absorbs underflow / flushed subnormals


def unit_roundoff(dtype) -> float:
    """Half the machine epsilon of a float dtype (bfloat16: 2**-8, float16: 2**-11, float32: 2**-24)."""
    import jax.numpy as jnp
    return float(jnp.finfo(dtype).eps) / 2


def gamma(n: int, u: float = U32) -> float:
    """gamma_n = n u / (1 - n u): relative error bound of n successive roundings."""
    n = int(n)
    assert n * u < 0.5, f"gamma({n}) is meaningless at u={u}"
    return n * u / (1 - n * u)


def _f64(a) -> np.ndarray:
    try:
        import qarray
        if isinstance(a, qarray.QArray):
            a = qarray.dequantize(a)
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(a, np.float64)


def dot_general_np(a, b, dn) -> np.ndarray:
    """``lax.dot_general`` semantics in float64 numpy."""
    (lc, rc), (lb, rb) = dn
    letters = iter(string.ascii_letters)
    la, ra = [None] * a.ndim, [None] * b.ndim
    for x, y in list(zip(lb, rb)) + list(zip(lc, rc)):
        la[x] = ra[y] = next(letters)
    la = [c or next(letters) for c in la]
    ra = [c or next(letters) for c in ra]
    out = [la[i] for i in lb] + [la[i] for i in range(a.ndim) if i not in lb and i not in lc] + \
          [ra[i] for i in range(b.ndim) if i not in rb and i not in rc]
    return np.einsum(f"{''.join(la)},{''.join(ra)}->{''.join(out)}", a, b)


def abs_dot(x, w, dn=None) -> np.ndarray:
    """``|x| . |w|`` in float64 (``x @ w``, or ``dot_general`` with dimension numbers ``dn``)."""
    x, w = np.abs(_f64(x)), np.abs(_f64(w))
    return x @ w if dn is None else dot_general_np(x, w, dn)


def contraction_length(x, dn=None) -> int:
    x = np.shape(x)
    if dn is None:
        return x[-1] if x else 1
    return math.prod(x[i] for i in dn[0][0])


# Roundings a term of a quantized op goes through besides the sum: each operand's dequantize (2) and, on the
# integer path, the product of the two scales and its product with the exact int32 sum (2).
OP_EXTRA = 4


def dot_bound(x, w, *, dn=None, k=None, evals=2, extra=0, u=U32) -> np.ndarray:
    """Elementwise bound on the difference of evaluations of ``x @ w`` (or ``dot_general(x, w, dn)``).

    ``evals=2``: two float32 evaluations (any orders); ``evals=1``: one float32 evaluation vs the exact
    (float64) value. ``extra``: roundings each term goes through before the sum (dequantize: 1; a product
    of two scales: 1 more). ``k`` defaults to the contraction length.
    """
    k = contraction_length(x, dn) if k is None else k
    # + gamma_K at float64: a float64 reference is itself rounded (negligible, but a bound is a bound).
    return (evals * gamma(k + extra, u) + gamma(k, U64)) * abs_dot(x, w, dn) + TINY


def propagate(a, da, w, *, evals=2, extra=OP_EXTRA) -> np.ndarray:
    """Bound on ``|a @ w - a' @ w|`` (each evaluated in float32) for inputs with ``|a - a'| <= da``:
    ``da @ |w| + evals * gamma_{K+extra} * (|a| + da) @ |w|`` (a layer whose input came from another
    evaluation: its error carries forward, and each side adds its own accumulation error)."""
    a_abs = np.abs(_f64(a))
    da = np.broadcast_to(np.asarray(da, np.float64), a_abs.shape)
    return abs_dot(da, w) + dot_bound(a_abs + da, w, evals=evals, extra=extra)


def assert_within(got, want, bound, what: str = '') -> None:
    """``|got - want| <= bound`` elementwise (float64), with the worst element in the message."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bound = np.broadcast_to(np.asarray(bound, np.float64), np.broadcast_shapes(got.shape, want.shape))
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(got - want)
    ok = err <= bound
    if not np.all(ok):
        i = np.argmax(np.where(ok, -np.inf, err - bound))
        raise AssertionError(f"{what} {int((~ok).sum())}/{ok.size} elements outside the bound; worst: err "
                             f"{err.flat[i]:.3g} > bound {bound.flat[i]:.3g} (got {got.flat[i]:.6g}, want "
                             f"{want.flat[i]:.6g}); max err {err.max():.3g}")


def assert_dot_close(got, want, x, w, *, dn=None, evals=2, extra=0, u=U32) -> None:
    """``got`` and ``want`` are evaluations of ``x @ w`` (or ``dot_general``): within :func:`dot_bound`."""
    assert_within(got, want, dot_bound(x, w, dn=dn, evals=evals, extra=extra, u=u), 'dot:')


def rounding_bound(ref, n: int = 1, u: float = U32) -> np.ndarray:
    """``n`` correctly rounded float32 operations on a value: ``gamma_n * |ref|``."""
    return gamma(n, u) * np.abs(np.asarray(ref, np.float64)) + TINY


def near_tie(y, rel: float) -> np.ndarray:
    """Where ``round(y)`` can change when ``y`` moves by ``rel * |y|``: within that of a half-integer.

    A code is ``round(x / s)``; float32 evaluation moves ``x / s`` by a few ulps, so a reference that
    computes it in float64 may pick the neighbouring code there, and only there.
    """
    y = np.asarray(y, np.float64)
    return np.abs(np.abs(y - np.floor(y)) - 0.5) <= rel * np.abs(y) + 1e-300


def requantized_bound(h, dh, q, *, dynamic: bool = True) -> np.ndarray:
    """Elementwise bound on ``|dequantize(quantize(h')) - dequantize(q)|`` over every ``|h' - h| <= dh``.

    ``q`` is ``h`` quantized (an activation between two layers: codes ``round(h / s)``); two evaluations of
    the layer before it give ``h`` and ``h'`` that differ by rounding, so their codes can differ by one step,
    but only where ``h / s`` lies within that distance of a rounding boundary (a half-integer, or the midpoint
    of two fp8 values), and the scale (``dynamic``: ``absmax(group) / bound``) moves by the group's largest
    ``dh``. The bound takes the extreme codes and scales over that box (codes are monotone in ``h / s``), so it
    is ``|code| * (s_hi - s_lo)`` almost everywhere and one step only at the near-ties. Signed ints without zero
    point, fp8 formats, and zero points with static (fixed) scales.
    """
    from qarray import _layout
    qt = q.qtype
    assert qt.kind == 'float' or (qt.kind in ('int', 'uint') and qt.bits > 1), qt
    assert q.zero_point is None or not dynamic, 'zero points: static scales only'
    h = np.asarray(h, np.float64)
    dh = np.broadcast_to(np.asarray(dh, np.float64), h.shape)
    vshape, sshape = _layout.tiled_view(h.shape, q.scale.shape)
    red = tuple(i for i, (a, b) in enumerate(zip(vshape, sshape)) if b == 1 and a > 1)
    hv, dv = h.reshape(vshape), dh.reshape(vshape)
    s = np.asarray(q.scale, np.float64).reshape(sshape)
    z = 0 if q.zero_point is None else np.asarray(q.zero_point, np.float64).reshape(sshape)
    if dynamic:  # s = absmax * fl(1 / bound) in float32: +-2u for its two roundings
        absmax = np.abs(hv).max(red, keepdims=True)
        m = dv.max(red, keepdims=True)
        rel = np.where(absmax > 0, m / np.maximum(absmax, 1e-300), np.inf)
        s_lo = s * np.maximum(1 - rel, 0) * (1 - 2 * U32)
        s_hi = np.where(np.isfinite(rel), s * (1 + rel) * (1 + 2 * U32), m / qt.calibration_bound * (1 + 4 * U32))
        s_lo = np.where(s_lo > 0, s_lo, TINY)
    else:
        s_lo = s_hi = s
    lo, hi = hv - dv, hv + dv
    t = np.stack([lo / s_lo, lo / s_hi, hi / s_lo, hi / s_hi])
    slack = 4 * U32 * np.abs(t).max(0)  # the library divides in float32: h * fl(1 / s)
    t_min, t_max = t.min(0) - slack, t.max(0) + slack

    def grid(v):  # the code's value in steps (code - zero point)
        if qt.kind == 'float':
            return np.clip(v, -qt.qmax, qt.qmax).astype(np.float32).astype(qt.native_dtype).astype(np.float64)
        if q.zero_point is None:
            return np.clip(np.rint(v), qt.qmin, qt.qmax)
        lo_code, hi_code = qt.asym_range
        return np.clip(np.rint(v) + z, lo_code, hi_code) - z

    c_min, c_max = grid(t_min), grid(t_max)
    a_min = np.minimum(c_min * s_lo, c_min * s_hi)
    a_max = np.maximum(c_max * s_lo, c_max * s_hi)
    import qarray
    a = np.asarray(qarray.dequantize(q), np.float64).reshape(vshape)
    out = np.maximum(a - a_min, a_max - a) + U32 * np.maximum(np.abs(a_min), np.abs(a_max))  # + the f32 product
    return np.maximum(out, 0).reshape(h.shape) + TINY


def abs_conv(x, w, **kw) -> np.ndarray:
    """``conv(|x|, |w|)`` in float64 (``lax.conv_general_dilated`` keywords)."""
    import jax
    import jax.numpy as jnp
    with jax.enable_x64(True):
        return np.asarray(jax.lax.conv_general_dilated(jnp.asarray(np.abs(_f64(x))), jnp.asarray(np.abs(_f64(w))),
                                                       **kw))


def propagate_conv(a, da, w, *, evals=2, extra=OP_EXTRA, **kw) -> np.ndarray:
    """:func:`propagate` for a convolution: K = the kernel's size per output feature (rhs layout from
    ``dimension_numbers``)."""
    import jax
    w64 = _f64(w)
    dn = jax.lax.conv_dimension_numbers(np.shape(a), w64.shape, kw['dimension_numbers'])
    k = w64.size // w64.shape[dn.rhs_spec[0]]
    a_abs = np.abs(_f64(a)) + np.asarray(da, np.float64)
    return abs_conv(np.broadcast_to(da, a_abs.shape), w64, **kw) + \
        (evals * gamma(k + extra) + gamma(k, U64)) * abs_conv(a_abs, w64, **kw) + TINY


def hidden_bound(x, xa, k0, h, ha, *, dynamic: bool = True) -> np.ndarray:
    """``|ha - ha'|`` between two float32 evaluations of ``ha = act(relu(act(x) . k0))`` (act: quantize, or
    nothing when ``xa`` / ``ha`` is a plain array); feed it to :func:`propagate` for the next layer.

    The input's codes can differ only at a near-tie of the float32 division; layer 1's dot by its accumulation
    error (relu is 1-Lipschitz); the hidden codes by one step only where h sits that close to a tie.
    """
    import qarray
    is_q = lambda a: isinstance(a, qarray.QArray)  # noqa: E731
    dxa = requantized_bound(x, 0, xa, dynamic=dynamic) if is_q(xa) else 0
    dh = propagate(xa, dxa, k0)
    return requantized_bound(h, dh, ha, dynamic=dynamic) if is_q(ha) else dh


def running_mean_bound(n: int, hmax: float) -> float:
    """Absolute bound on a float32 running mean / EMA of ``n`` values ``|h| <= hmax`` vs float64.

    Each update ``r + (h - r) * w`` rounds ``w``, the difference, the product and the sum: at most 4 u * hmax
    (``r`` stays a convex combination, so ``|r|, |h - r| <= hmax``), plus u * hmax for the value itself when it
    was computed in float32 (a scaled batch's absmax).
    """
    return (4 * n + 1) * U32 * hmax


def einsum_bound(sub: str, *operands, k: int, evals: int = 1, extra: int = OP_EXTRA) -> np.ndarray:
    """:func:`dot_bound` for ``np.einsum(sub, *operands)``: ``k`` terms per output element (with several
    contractions, e.g. ``x @ a @ b``, the sum of their lengths)."""
    return (evals * gamma(k + extra) + gamma(k, U64)) * np.einsum(sub, *[np.abs(_f64(o)) for o in operands]) + TINY
