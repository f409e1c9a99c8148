"""Reference model for tests/test_properties.py: what the public API is documented to do, written from the
README and the docstrings, independently of the library's own helpers (layout, groups, bounds, nbytes).

Everything here runs in float64 numpy. The library's arithmetic is reproduced only where an *error* depends
on it bit for bit (a scale that overflows ``scale_dtype``); there the prediction keeps a small "maybe" zone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import qarray
from qarray import qtypes

# Every registered format this model covers (intB, uintB, fpX, code books) and the narrow int8. Microscaling
# formats (block formats with their own power-of-two / two-level scale dtypes, if registered) follow other
# scale rules and are left to their own tests.
FORMATS = tuple(n for n in qtypes.names() if not getattr(qtypes.get(n), 'microscaling', False)) + ('int8_narrow',)
FLOAT_DTYPES = ('float32', 'bfloat16', 'float16', 'float64')
ASYMMETRIC = ('minmax',)  # plus 'fixed,lo,hi' with lo != -hi


def np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == 'bfloat16' else np.dtype(name)


def finfo(name) -> Any:
    return ml_dtypes.finfo(np_dtype(name) if isinstance(name, str) else name)


def needs_x64(dtype: str, scale_dtype: Any) -> bool:
    return dtype == 'float64' or scale_dtype == 'float64'


@contextlib.contextmanager
def x64_if(flag: bool):
    if flag:
        with jax.enable_x64(True):
            yield
    else:
        yield


# ------------------------------------------------------------------------------------------ one quantize call
@dataclasses.dataclass(frozen=True)
class Case:
    """The static arguments of one ``qarray.quantize`` call (values are drawn separately)."""

    shape: tuple
    dtype: str = 'float32'
    qtype: str = 'int8'
    channelwise_axes: Any = ()
    tiles: Any = None
    calibration: str = 'absmax'
    scale_dtype: Any = None
    pack_axis: int = -1

    def kwargs(self) -> dict:
        kw = dict(channelwise_axes=self.channelwise_axes, tiles=self.tiles, calibration=self.calibration,
                  pack_axis=self.pack_axis)
        if self.scale_dtype is not None:
            kw['scale_dtype'] = np_dtype(self.scale_dtype) if self.scale_dtype in FLOAT_DTYPES else self.scale_dtype
        return kw

    @property
    def x64(self) -> bool:
        return needs_x64(self.dtype, self.scale_dtype)

    def __repr__(self) -> str:  # what a failing example prints: paste-able
        kw = ', '.join(f'{k}={v!r}' for k, v in self.kwargs().items())
        return f"Case(shape={self.shape}, dtype={self.dtype!r}, qtype={self.qtype!r}; quantize(x, {self.qtype!r}, {kw}))"


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def parse_calibration(spec: str):
    name, *args = [p.strip() for p in spec.split(',')]
    return name, tuple(float(a) for a in args)


def is_asymmetric(spec: str) -> bool:
    name, args = parse_calibration(spec)
    return name == 'minmax' or (name == 'fixed' and len(args) == 2 and args[0] != -args[1])


def uses_zero_point(qt: qtypes.QType, spec: str) -> bool:
    return qt.kind == 'uint' or is_asymmetric(spec)


E = tuple  # (exception type, regex on the message)


def static_errors(c: Case) -> list:
    """Every documented error the static arguments of ``c`` call for (empty: the call must not raise one).

    Several invalid arguments: the library reports the first it checks; any of them is accepted.
    """
    errs = []
    if c.dtype not in FLOAT_DTYPES:
        errs.append((TypeError, r"x must be a floating-point array; got dtype"))
    nd = len(c.shape)
    try:
        qt = qtypes.get(c.qtype)
    except ValueError:
        qt = None
        errs.append((ValueError, r"Unknown qtype .*; valid qtypes are"))
    cw = c.channelwise_axes
    cw_ok = False
    cw_norm: tuple = ()
    cw_list = [cw] if _is_int(cw) else cw
    if isinstance(cw, (str, bytes)) or not hasattr(cw_list, '__iter__'):
        errs.append((TypeError, r"channelwise_axes must be an int or a sequence of ints"))
    elif any(not _is_int(a) for a in cw_list):
        errs.append((TypeError, r"channelwise_axes must hold ints"))
    elif any(not -nd <= a < nd for a in cw_list):
        errs.append((ValueError, r"channelwise_axes axis -?\d+ is out of range for an array with \d+ dims"))
    elif len({a % nd for a in cw_list}) != len(cw_list):
        errs.append((ValueError, r"channelwise_axes names an axis twice"))
    else:
        cw_ok, cw_norm = True, tuple(sorted(a % nd for a in cw_list))
    t = c.tiles
    tile_map: dict = {}
    if t is None:
        pass
    elif _is_int(t):
        if nd == 0:
            errs.append((ValueError, r"tiles needs an array with at least one axis"))
        else:
            tile_map = {nd - 1: t}
            if cw_ok and nd - 1 not in cw_norm:
                cw_norm = tuple(range(nd - 1))
    elif isinstance(t, dict):
        for a, v in t.items():
            if not _is_int(a):
                errs.append((TypeError, r"tiles keys must be int axes"))
            elif not -nd <= a < nd:
                errs.append((ValueError, r"tiles axis -?\d+ is out of range for an array with \d+ dims"))
            elif a % nd in tile_map:
                errs.append((ValueError, r"tiles names axis \d+ twice"))
            else:
                tile_map[a % nd] = v
    else:
        errs.append((TypeError, r"tiles must be None, an int"))
    for a, v in tile_map.items():
        if not _is_int(v) or v <= 0:
            errs.append((ValueError, rf"tiles\[{a}\] must be a positive int"))
        elif c.shape[a] % v:
            errs.append((ValueError, rf"tiles\[{a}\]={v} does not divide axis {a} of size {c.shape[a]}"))
        elif cw_ok and a in cw_norm:
            errs.append((ValueError, rf"axis {a} is both in channelwise_axes and tiles"))
    try:
        name, args = parse_calibration(c.calibration)
    except ValueError:
        name, args = None, ()
    if name is None or name not in ('absmax', 'minmax', 'rms', 'fixed', 'percentile', 'mse'):
        errs.append((ValueError, r"(Unknown calibration|arguments must be numbers)"))
    else:
        nargs = {'absmax': (0, 0), 'minmax': (0, 0), 'rms': (0, 1), 'fixed': (2, 2), 'percentile': (1, 1),
                 'mse': (0, 2)}[name]
        if not nargs[0] <= len(args) <= nargs[1]:
            errs.append((ValueError, r"calibration .* takes \d\.\.\d arguments"))
        elif name == 'rms' and args and args[0] <= 0:
            errs.append((ValueError, r"calibration 'rms,k' needs k > 0"))
        elif name == 'percentile' and not 0 < args[0] <= 100:
            errs.append((ValueError, r"calibration 'percentile,p' needs 0 < p <= 100"))
        elif name == 'fixed' and not args[0] < args[1]:
            errs.append((ValueError, r"calibration 'fixed,lo,hi' needs lo < hi"))
        elif name == 'mse' and (int(args[0] if args else 64) < 2 or not 0 < (args[1] if len(args) > 1 else 0.3) < 1):
            errs.append((ValueError, r"calibration 'mse,steps,min_ratio' needs steps >= 2"))
        elif qt is not None and is_asymmetric(c.calibration):
            if qt.kind == 'int' and qt.bits == 1:
                errs.append((ValueError, r"qtype 'int1' has no zero level, so it cannot take an asymmetric"))
            elif qt.kind in ('float', 'codebook'):
                errs.append((ValueError, rf"qtype '{qt.name}' has no zero point; asymmetric calibration needs"))
    if c.scale_dtype is not None:
        try:
            sd = np_dtype(c.scale_dtype) if isinstance(c.scale_dtype, str) else np.dtype(c.scale_dtype)
            floating = jnp.issubdtype(sd, jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            errs.append((TypeError, r"scale_dtype must be a floating dtype"))
    if qt is not None and qt.packed:
        if nd == 0:
            errs.append((ValueError, rf"qtype '{qt.name}' is bit-packed and needs an array with at least one axis"))
        elif not (_is_int(c.pack_axis) and -nd <= c.pack_axis < nd):
            errs.append((ValueError, rf"pack_axis={c.pack_axis!r} is out of range for an array with {nd} dims"))
    return errs


def layout(c: Case) -> tuple[tuple, dict]:
    """(channelwise axes, {axis: tile}) of a valid case, as the README documents them."""
    nd = len(c.shape)
    cw = c.channelwise_axes
    cw = tuple(sorted(a % nd for a in ([cw] if _is_int(cw) else cw)))
    if c.tiles is None:
        return cw, {}
    if _is_int(c.tiles):
        return (cw if nd - 1 in cw else tuple(range(nd - 1))), {nd - 1: c.tiles}
    return cw, {a % nd: v for a, v in c.tiles.items()}


def scale_shape(c: Case) -> tuple:
    """'The scale has the rank of x': per axis the full size (channelwise), size / tile (tiled) or 1."""
    cw, tm = layout(c)
    return tuple(n // tm[a] if a in tm else (n if a in cw else 1) for a, n in enumerate(c.shape))


def expected_nbytes(c: Case) -> int:
    """README: values + scales + zero points; packed values take rows * ceil(bits * n / 8) bytes."""
    qt = qtypes.get(c.qtype)
    size = math.prod(c.shape)
    if qt.packed:
        pa = c.pack_axis % len(c.shape)
        n = c.shape[pa]
        rows = size // n if n else math.prod(d for i, d in enumerate(c.shape) if i != pa)
        values = rows * math.ceil(qt.bits * n / 8)
    else:
        values = size * 1  # int8 / uint8 / fp8 codes: one byte each
    ns = math.prod(scale_shape(c))
    sd = np_dtype(c.scale_dtype) if c.scale_dtype is not None else np_dtype(c.dtype)
    zp = ns if uses_zero_point(qt, c.calibration) else 0  # int8 / uint8 zero points
    return values + ns * sd.itemsize + zp


# ------------------------------------------------------------------------------------------ groups
def expand(a: np.ndarray, shape: tuple) -> np.ndarray:
    """A per-group array (scale layout) broadcast to one entry per element."""
    a = np.asarray(a)
    if math.prod(shape) == 0:
        return np.zeros(shape, a.dtype)
    for ax, (n, s) in enumerate(zip(shape, a.shape)):
        if s != n:
            assert s >= 1 and n % s == 0, (shape, a.shape)
            a = np.repeat(a, n // s, axis=ax)
    return a


def per_group(a: np.ndarray, sshape: tuple, fn) -> np.ndarray:
    """``fn(values of the group, axis=...)`` for every scale group: an array of the scale's shape."""
    view, red = [], []
    for n, s in zip(a.shape, sshape):
        if s == n:
            view.append(n)
        elif s == 1:
            view.append(n)
            red.append(len(view) - 1)
        else:
            view += [s, n // s]
            red.append(len(view) - 1)
    return fn(a.reshape(view), axis=tuple(red)).reshape(sshape)


# ------------------------------------------------------------------------------------------ values
@dataclasses.dataclass(frozen=True)
class Values:
    """How to build x: a distribution, a power of ten, a seed and optionally one NaN/Inf."""

    kind: str
    exp: float
    seed: int
    special: str | None = None
    special_at: int = 0

    def make(self, shape: tuple, dtype: str) -> np.ndarray:
        with np.errstate(over='ignore', invalid='ignore'):
            return self._make(shape, dtype)

    def _make(self, shape: tuple, dtype: str) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        fi = finfo(dtype)
        fmax = float(fi.max)
        lo_e = math.log10(float(fi.smallest_subnormal)) + 0.5
        hi_e = math.log10(fmax) - 0.01
        m = 10.0 ** self.exp
        if self.kind == 'normal':
            v = rng.standard_normal(shape) * m
        elif self.kind == 'positive':
            v = (rng.random(shape) + 0.1) * m
        elif self.kind == 'constant':
            v = np.full(shape, (-1.0 if self.seed % 2 else 1.0) * m)
        elif self.kind == 'zeros':
            v = np.zeros(shape)
        elif self.kind == 'wide':  # every element its own magnitude, subnormal to near the max
            v = np.sign(rng.standard_normal(shape)) * 10.0 ** rng.uniform(lo_e, hi_e, shape)
        elif self.kind == 'outlier':
            v = rng.standard_normal(shape) * m
            if v.size:
                v.flat[self.special_at % v.size] = 1e4 * m
        elif self.kind == 'extreme':  # at the dtype's largest finite values, both signs, exactly the max too
            v = rng.choice([-1.0, 1.0], size=shape) * fmax * rng.uniform(0.5, 1.0, shape)
            if v.size:
                v.flat[self.seed % v.size] = -fmax if self.seed % 3 else fmax
        else:
            raise ValueError(self.kind)
        v = np.clip(np.nan_to_num(v, posinf=fmax, neginf=-fmax), -fmax, fmax)
        if self.special and v.size:
            v.flat[self.special_at % v.size] = {'nan': np.nan, 'inf': np.inf, '-inf': -np.inf}[self.special]
        return np.asarray(v).astype(np_dtype(dtype))


EXPONENTS = {
    'float32': (-44, -40, -38, -30, -19, -10, -3, 0, 3, 10, 19, 30, 36, 38),
    'bfloat16': (-40, -38, -30, -19, -3, 0, 3, 19, 30, 38),
    'float16': (-7, -5, -3, 0, 2, 4),
    'float64': (-320, -308, -300, -100, -40, 0, 40, 100, 300, 307),
}


# ------------------------------------------------------------------------------------------ bounds
U = {'float32': 2.0 ** -24, 'float64': 2.0 ** -53}


def compute_dtype(c: Case) -> str:
    return 'float64' if c.x64 else 'float32'


def format_error_bound(qt: qtypes.QType, x: np.ndarray, s: np.ndarray, has_zp: bool) -> np.ndarray:
    """The format's per-element error bound, for values inside the representable range (stored scale s).

    * symmetric intB: half a step, s / 2 (int1: levels +-s, every value within s of one);
    * with a zero point (uintB, minmax, asymmetric fixed): s / 2 as well: the levels (k - zp) * s cover
      [lo - s/2, hi + s/2] (zp is rounded, so the grid may start half a step past lo, but then it also ends
      at most half a step short of hi), so a value rounds to a level at most s/2 away or clips to an end
      level at most s/2 away;
    * fp8: round to nearest of x / s: half an ulp, 2**-(mantissa+1) * |x| for normals, plus half the
      subnormal spacing times s (e4m3: 2**-4 |x| + 2**-10 s; e5m2: 2**-3 |x| + 2**-17 s);
    * nf4: the distance to the nearest code-book level, at most half the largest gap (0.152) times s.
    """
    if qt.kind == 'int' and not has_zp:
        return s * qt.step_in_scales / 2
    if qt.is_integer:
        return s / 2
    if qt.kind == 'float':
        fi = ml_dtypes.finfo(qt.native_dtype)
        return 2.0 ** -(fi.nmant + 1) * np.abs(x) + float(fi.smallest_subnormal) / 2 * s
    # nf4 (any code book): the nearest level (at most half the largest gap, 0.152 for nf4, times s).
    cb = qt.codebook.astype(np.float64)
    with np.errstate(invalid='ignore', divide='ignore', over='ignore'):
        d = np.min(np.abs(np.clip(x / s, cb.min(), cb.max())[..., None] - cb), axis=-1) * s
    assert np.all(~np.isfinite(d) | (d <= np.max(np.diff(cb)) / 2 * s * (1 + 1e-12)))
    return d


def representable(qt: qtypes.QType, s: np.ndarray, zp: np.ndarray | None):
    """(lowest, highest) value that quantizes without clipping, and the end levels it saturates to."""
    if qt.is_integer:
        qa, qb = qt.asym_range if zp is not None else (qt.qmin, qt.qmax)
        z = 0.0 if zp is None else zp
        h = qt.step_in_scales / 2
        return (qa - z - h) * s, (qb - z + h) * s, (qa - z) * s, (qb - z) * s
    if qt.kind == 'codebook':
        lo, hi = float(qt.codebook.min()), float(qt.codebook.max())
        return lo * s, hi * s, lo * s, hi * s
    m = float(qt.qmax)
    return -m * s, m * s, -m * s, m * s


def unscaled(qt: qtypes.QType, codes: np.ndarray, zp: np.ndarray | None) -> np.ndarray:
    if qt.kind == 'codebook':
        return qt.codebook.astype(np.float64)[codes.astype(np.int64)]
    v = codes.astype(np.float64)
    return v if zp is None else v - zp


def max_unscaled(qt: qtypes.QType) -> float:
    if qt.kind == 'float':
        return float(qt.qmax)
    if qt.kind == 'codebook':
        return float(np.abs(qt.codebook).max())
    return float(2 ** qt.bits)


# ------------------------------------------------------------------------------------------ calibrated ranges
def reference_range(c: Case, xg: np.ndarray, axis) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) per group in float64 as documented for the calibration (rms / percentile / mse: see callers)."""
    name, args = parse_calibration(c.calibration)
    a = np.abs(xg)
    absmax = a.max(axis=axis)
    if name == 'minmax':
        return xg.min(axis=axis), xg.max(axis=axis)
    if name == 'fixed':
        return np.full(absmax.shape, args[0]), np.full(absmax.shape, args[1])
    if name == 'rms':
        k = args[0] if args else 3.0
        hi = np.minimum(k * np.sqrt(np.mean(np.square(xg), axis=axis)), absmax)
        return -hi, hi
    if name == 'percentile':
        hi = np.percentile(a.astype(np.float32).astype(np.float64), args[0], axis=axis)
        return -hi, hi
    return -absmax, absmax


def raw_scale_f(c: Case, qt, lo, hi, ct: str):
    """The library's raw scale, reproduced in the compute dtype (documented formula in _numerics)."""
    t = np.float64 if ct == 'float64' else np.float32
    lo = np.asarray(lo).astype(t)
    hi = np.asarray(hi).astype(t)
    with np.errstate(over='ignore', invalid='ignore'):
        if uses_zero_point(qt, c.calibration):
            if not is_asymmetric(c.calibration):
                lo, hi = -np.abs(hi), np.abs(hi)
            qa, qb = qt.asym_range
            lo0, hi0 = np.minimum(lo, t(0)), np.maximum(hi, t(0))
            inv = t(1.0 / (qb - qa))
            return hi0 * inv - lo0 * inv
        return np.abs(hi) * t(1.0 / qt.calibration_bound)


def overflow_state(c: Case, x: np.ndarray) -> str:
    """'yes' / 'no' / 'maybe': does some finite group need a scale beyond scale_dtype's max (documented
    ValueError)? 'maybe' within a few ulps of the limit, and for data-dependent clipping calibrations
    (rms / percentile / mse) whose range is only known to be at most absmax."""
    qt = qtypes.get(c.qtype)
    if x.size == 0:
        return 'no'
    sd = np_dtype(c.scale_dtype) if c.scale_dtype is not None else np_dtype(c.dtype)
    smax = float(finfo(sd).max)
    ct = compute_dtype(c)
    xs = x.astype(np.float64)
    sshape = scale_shape(c)
    finite = per_group(np.isfinite(xs), sshape, np.all)
    name, _ = parse_calibration(c.calibration)
    xv = np.where(np.isfinite(xs), xs, 0.0)
    if ct == 'float32':
        xv = xv.astype(np.float32)
    if name == 'minmax':
        lo, hi = per_group(xv, sshape, np.min), per_group(xv, sshape, np.max)
    elif name == 'fixed':
        _, args = parse_calibration(c.calibration)
        lo = np.full(sshape, np.float32(args[0]))
        hi = np.full(sshape, np.float32(args[1]))
    else:
        hi = per_group(np.abs(xv), sshape, np.max)
        lo = -hi
    raw = raw_scale_f(c, qt, lo, hi, ct).astype(np.float64)
    raw = np.where(finite, raw, 0.0)
    over = ~(raw <= smax)
    near = np.abs(raw - smax) <= 2.0 ** -18 * smax
    if np.any(over & ~near):
        return 'maybe' if name in ('rms', 'percentile', 'mse') else 'yes'
    if np.any(near) or (np.any(over) and name in ('rms', 'percentile', 'mse')):
        return 'maybe'
    return 'no'


OVERFLOW_ERROR = (ValueError, r"x's range needs a scale larger than \w+ can hold")


def matches(exc: BaseException, allowed) -> bool:
    return any(isinstance(exc, t) and re.search(rx, str(exc)) for t, rx in allowed)
