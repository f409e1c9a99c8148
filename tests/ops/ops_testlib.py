"""Shared helpers for the ops tests: float64 references and the error bound."""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp
import numpy as np

import qarray
from tolerances import OP_EXTRA as EXTRA, U64, gamma

# The reference is float64 on the dequantized operands; the op is one float32 evaluation of the same sum, in
# whatever order XLA picks on this machine. Bound (tests/tolerances.py): gamma_{K + EXTRA} * (|lhs| . |rhs|)
# elementwise, K the contraction length. EXTRA (4) counts the roundings a term goes through besides the sum:
# each operand's dequantize inside the op (2), and on the integer path the product of the two scales and its
# product with the exact int32 tile sum (2). Integer paths (exact int32 sums, a float32 sum over tiles only)
# stay far inside it; float paths may reach it. A wrong scale, tile or zero point is an O(1) relative error.


def op_rtol(k: int) -> float:
    """Relative (to |lhs| . |rhs|) bound for a contraction of length ``k`` vs the float64 reference."""
    return gamma(k + EXTRA) + gamma(k, U64)


def einsum_k(sub: str, shapes) -> int:
    """Number of terms summed per output element of ``einsum(sub)``: the product of the summed letters."""
    ins, _, out = sub.replace('...', '').partition('->')
    ins = ins.split(',')
    if not _:
        letters = ''.join(ins)
        out = ''.join(sorted(c for c in set(letters) if letters.count(c) == 1))
    size = {}
    for term, shape in zip(ins, shapes):
        for c, n in zip(term[::-1], shape[::-1]):  # from the right: '...' covers the leading axes
            size[c] = n
    return int(np.prod([n for c, n in size.items() if c not in out]))


def deq64(x) -> np.ndarray:
    """An operand as float64 numpy (QArrays dequantized)."""
    if isinstance(x, qarray.QArray):
        x = jax.jit(qarray.dequantize, static_argnums=1)(x, jnp.float32)
    return np.asarray(x, np.float64)


def np_dot_general(a: np.ndarray, b: np.ndarray, dn) -> np.ndarray:
    """lax.dot_general semantics in numpy (float64) via einsum letters."""
    (lc, rc), (lb, rb) = dn
    letters = iter(string.ascii_letters)
    la = [None] * a.ndim
    rb_ = [None] * b.ndim
    for x, y in zip(lb, rb):
        la[x] = rb_[y] = next(letters)
    for x, y in zip(lc, rc):
        la[x] = rb_[y] = next(letters)
    for i in range(a.ndim):
        la[i] = la[i] or next(letters)
    for i in range(b.ndim):
        rb_[i] = rb_[i] or next(letters)
    out = [la[i] for i in lb] + [la[i] for i in range(a.ndim) if i not in lb and i not in lc] + \
          [rb_[i] for i in range(b.ndim) if i not in rb and i not in rc]
    return np.einsum(f"{''.join(la)},{''.join(rb_)}->{''.join(out)}", a, b)


def assert_dot_close(out, lhs, rhs, dn, rtol=None):
    """|out - ref| <= rtol * (|lhs| . |rhs|) elementwise, ref in float64 on dequantized operands.

    ``rtol`` defaults to :func:`op_rtol` of the contraction length."""
    a, b = deq64(lhs), deq64(rhs)
    if rtol is None:
        rtol = op_rtol(int(np.prod([a.shape[i] for i in dn[0][0]])))
    ref = np_dot_general(a, b, dn)
    bound = np_dot_general(np.abs(a), np.abs(b), dn)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = np.abs(np.asarray(out, np.float64) - ref)
    worst = np.max(err - rtol * bound - 1e-30) if err.size else -1
    assert worst <= 0, f"max excess {worst}; max err {err.max()}, max ref {np.abs(ref).max()}"


def conv64(a, b, **kw):
    with jax.enable_x64(True):
        return np.asarray(jax.lax.conv_general_dilated(jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64),
                                                       **kw))


def assert_conv_close(out, lhs, rhs, rtol=None, **kw):
    """As assert_dot_close; ``rtol`` defaults to op_rtol of the terms per output (the kernel's size per
    output feature: input features per group x window; padding and dilation only drop terms)."""
    a, b = deq64(lhs), deq64(rhs)
    if rtol is None:
        dnums = jax.lax.conv_dimension_numbers(a.shape, b.shape, kw['dimension_numbers'])
        rtol = op_rtol(b.size // b.shape[dnums.rhs_spec[0]])
    ref = conv64(a, b, **kw)
    bound = conv64(np.abs(a), np.abs(b), **kw)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = np.abs(np.asarray(out, np.float64) - ref)
    assert np.all(err <= rtol * bound + 1e-30), f"max err {err.max()}, max ref {np.abs(ref).max()}"


def rand(seed, shape, dtype=jnp.float32):
    """Standard normal test data from numpy (jax.random would compile a kernel per shape)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32), dtype)


def primitive_names(jaxpr) -> list:
    """All equations (recursively through sub-jaxprs) as (primitive name, eqn)."""
    out = []
    for eqn in jaxpr.eqns:
        out.append((eqn.primitive.name, eqn))
        for v in eqn.params.values():
            subs = v if isinstance(v, (tuple, list)) else [v]
            for s in subs:
                if hasattr(s, 'jaxpr') and hasattr(s.jaxpr, 'eqns'):
                    out.extend(primitive_names(s.jaxpr))
                elif hasattr(s, 'eqns'):
                    out.extend(primitive_names(s))
    return out


def quant(x, qtype, channelwise_axes=(), tiles=None, calibration='absmax', pack_axis=-1):
    """An independent numpy quantizer (absmax / minmax) building a QArray directly.

    Same layout rules as qarray.quantize (``tiles=int`` is block-wise on the last
    axis); no JAX compile per shape, which keeps the ops tests fast.
    """
    from qarray import qtypes
    dtype = jnp.asarray(x).dtype
    x = np.asarray(x, np.float32)
    qt = qtypes.get(qtype)
    ndim = x.ndim
    cw = tuple(a % ndim for a in ((channelwise_axes,) if isinstance(channelwise_axes, int) else channelwise_axes))
    if isinstance(tiles, int):
        tiles, cw = {ndim - 1: tiles}, tuple(range(ndim - 1))
    tiles = {a % ndim: t for a, t in (tiles or {}).items()}
    view, red, sshape = [], [], []
    for a, n in enumerate(x.shape):
        if a in tiles:
            view += [n // tiles[a], tiles[a]]
            red.append(len(view) - 1)
            sshape.append(n // tiles[a])
        else:
            view.append(n)
            if a not in cw:
                red.append(len(view) - 1)
            sshape.append(n if a in cw else 1)
    xv = x.reshape(view)
    zp = None
    asym = qt.kind == 'uint' or calibration == 'minmax'
    if asym:
        qa, qb = qt.asym_range
        lo = np.minimum(xv.min(axis=tuple(red), keepdims=True), 0)
        hi = np.maximum(xv.max(axis=tuple(red), keepdims=True), 0)
        scale = np.where(hi > lo, (hi - lo) / (qb - qa), 1.0).astype(np.float32)
        zpv = np.clip(np.round(qa - lo / scale), qa, qb)
        codes = np.clip(np.round(xv / scale) + zpv, qa, qb).astype(qt.code_dtype)
        zp = zpv.astype(qt.code_dtype).reshape(sshape)
    else:
        absmax = np.abs(xv).max(axis=tuple(red), keepdims=True)
        scale = np.where(absmax > 0, absmax / np.float32(qt.qmax), 1.0).astype(np.float32)
        y = xv / scale
        if qt.kind == 'float':
            codes = np.clip(y, -qt.qmax, qt.qmax).astype(qt.native_dtype)
        elif qt.kind == 'codebook':
            codes = np.abs(y[..., None] - qt.codebook).argmin(-1).astype(np.uint8)
        elif qt.bits == 1:
            codes = np.where(y >= 0, 1, -1).astype(np.int8)
        else:
            codes = np.clip(np.round(y), -qt.qmax, qt.qmax).astype(np.int8)
    codes = codes.reshape(x.shape)
    scale = jnp.asarray(scale.reshape(sshape), dtype)
    zp = None if zp is None else jnp.asarray(zp)
    if qt.packed:
        field = _np_field(codes, qt)
        qvalue = _np_pack(field, qt.bits, pack_axis % ndim)
        return qarray.QArray(jnp.asarray(qvalue), scale, zp, qtype=qt, dtype=dtype,
                             packed_axis=pack_axis % ndim - ndim, packed_length=x.shape[pack_axis])
    return qarray.QArray(jnp.asarray(codes), scale, zp, qtype=qt, dtype=dtype)


def _np_pack(fields: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Independent little-endian bit packing (value i -> stream bits [i*bits, (i+1)*bits))."""
    f = np.moveaxis(fields.astype(np.uint8), axis, -1)
    n = f.shape[-1]
    bitplanes = ((f[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(*f.shape[:-1], n * bits)
    packed = np.packbits(bitplanes, axis=-1, bitorder='little')
    return np.moveaxis(packed, -1, axis)


def random_qarray(seed: int, shape, fmt: str, channelwise_axes=(), tiles=None, zero_point=False,
                  pack_axis=-1, dtype=jnp.float32):
    """A QArray with random codes/scales built in numpy, and its float64 value computed independently."""
    from qarray import qtypes
    rng = np.random.default_rng(seed)
    qt = qtypes.get(fmt)
    ndim = len(shape)
    tiles = tiles or {}
    scale_shape = tuple(shape[a] // tiles[a] if a in tiles else shape[a] if a in channelwise_axes else 1
                        for a in range(ndim))
    scale = rng.uniform(0.5, 2.0, scale_shape).astype(np.float32) * np.float32(0.01)
    zp = None
    if qt.kind == 'float':
        codes = rng.normal(0, 30, shape).astype(qt.native_dtype)
        values = codes.astype(np.float64)
    elif qt.kind == 'codebook':
        codes = rng.integers(0, 16, shape).astype(np.uint8)
        values = qt.codebook.astype(np.float64)[codes]
    else:
        zero_point = zero_point or qt.kind == 'uint'
        lo, hi = qt.asym_range if zero_point else (qt.qmin, qt.qmax)
        codes = rng.integers(lo, hi + 1, shape).astype(qt.code_dtype)
        if qt.kind == 'int' and qt.bits == 1:
            codes = np.where(codes > 0, 1, -1).astype(np.int8)
        values = codes.astype(np.float64)
        if zero_point:
            zp = rng.integers(lo, hi + 1, scale_shape).astype(qt.code_dtype)
    full = lambda a: np.broadcast_to(  # noqa: E731
        _repeat_tiles(a, shape), shape)
    if zp is not None:
        values = values - full(zp.astype(np.float64))
    values = values * full(scale.astype(np.float64))
    if qt.packed:
        field = _np_field(codes, qt)
        qvalue = _np_pack(np.asarray(field), qt.bits, pack_axis % ndim)
        q = qarray.QArray(jnp.asarray(qvalue), jnp.asarray(scale), None if zp is None else jnp.asarray(zp),
                          qtype=qt, dtype=dtype, packed_axis=pack_axis % ndim - ndim, packed_length=shape[pack_axis])
    else:
        q = qarray.QArray(jnp.asarray(codes), jnp.asarray(scale), None if zp is None else jnp.asarray(zp),
                          qtype=qt, dtype=dtype)
    return q, values


def _repeat_tiles(a: np.ndarray, shape) -> np.ndarray:
    for ax, (n, s) in enumerate(zip(shape, a.shape)):
        if 1 < s < n:
            a = np.repeat(a, n // s, axis=ax)
    return a


def assert_close_to(out, ref, bound, rtol):
    out = np.asarray(out, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = np.abs(out - ref)
    worst = np.max(err - rtol * bound) if err.size else -1
    assert worst <= 1e-30, f"max excess {worst}; max err {err.max()}, max ref {np.abs(ref).max()}"


def _np_field(codes: np.ndarray, qt) -> np.ndarray:
    """Codes -> unsigned bit fields (two's complement for signed ints, bit = code > 0 for int1)."""
    if qt.kind != 'int':
        return codes.astype(np.uint8)
    if qt.bits == 1:
        return (codes > 0).astype(np.uint8)
    return (codes.astype(np.int8).view(np.uint8) & np.uint8(2**qt.bits - 1)).astype(np.uint8)
