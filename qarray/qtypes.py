"""Number formats: what codes a format has and how real values map onto them.

Integer ranges (documented choice)
----------------------------------
* Signed ``intB`` for B >= 2 uses the full two's-complement codes ``[-2**(B-1),
  2**(B-1)-1]`` (int8: [-128, 127], int4: [-8, 7]) with symmetric scales: the
  calibrated absmax maps to ``qmax + 1/2`` (:attr:`QType.calibration_bound`),
  the outer edge of the top code's rounding cell, not to ``qmax`` itself, so
  every value rounds to within half a step and the step is
  ``qmax / (qmax + 1/2)`` times smaller (7 % for int4, 14 % for int3) than
  mapping absmax to ``qmax``. The extra negative code is reached only by a
  group's negative extreme (at exactly ``-(qmax + 1/2)`` steps), which then
  lands half a step outward instead of being clipped half a step inward: the
  same error size, but the group's largest values are not all pulled towards
  zero (on MiniLM-L6 that is worth 4e-4..6e-4 of embedding cosine at 3-4
  bits). This is also Qwix's, AQT's and PyTorch's convention.
  :func:`narrow_range` gives the restricted ``[-(2**(B-1)-1), 2**(B-1)-1]``
  variant (int8: [-127, 127]) that LiteRT/XNNPACK require for weights; the
  ODML export uses it.
* ``int1`` is a binary format: codes are {-1, +1} (one sign bit), so a value
  is ``±scale``. Its step between levels is ``2 * scale``; absmax maps to 2,
  so ``scale = absmax / 2`` and every value is within ``scale`` of a level.
* ``uintB`` has codes ``[0, 2**B - 1]`` and always carries a zero point.
* ``float8_e4m3fn`` (alias ``fp8``) and ``float8_e5m2`` are stored natively and
  saturate at their finite maximum (448 and 57344); they never produce inf/NaN
  from finite input.
* ``nf4`` is the 16-value NormalFloat code book from QLoRA (exact float32
  values); a value is ``codebook[code] * scale`` with ``scale = absmax``.
* ``dynamic8`` / ``dynamic8u``: non-linear 8-bit code books (signed in
  [-1, 1], unsigned in [0, 1]) that stay relatively precise over 7-8 decades,
  for optimizer states (as bitsandbytes' 8-bit Adam); ``scale = absmax``.
* ``float4_e2m1fn`` (alias ``fp4``): OCP FP4 E2M1, 16 codes (±{0, 0.5, 1,
  1.5, 2, 3, 4, 6}), packed two per byte; rounds half to even, saturates at 6.
* Microscaling formats store their scales in their own one-byte dtypes:
  ``mxfp8`` / ``mxfp4`` (OCP MX v1.0): e4m3 / e2m1 elements, one power-of-two
  E8M0 scale (``float8_e8m0fnu``) per 32 consecutive values; ``nvfp4``
  (NVIDIA): e2m1 elements, one E4M3 scale per 16 values, itself a QArray under
  one float32 scale per tensor (the two-level recipe). Bits per value: mxfp8
  8.25, mxfp4 4.25, nvfp4 4.5 (+ 4 bytes per tensor).

Example:
  >>> from qarray import qtypes
  >>> qtypes.get('int4').qmax
  7
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax
import ml_dtypes
import numpy as np

# The 16 NF4 levels (quantiles of N(0, 1) normalised to [-1, 1]), as float32.
NF4_CODEBOOK = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)


def _dynamic_map(signed: bool) -> np.ndarray:
    """A non-linear 8-bit code in [-1, 1] ([0, 1] unsigned): decade 10**(i - 6), i = 0..6, holds the midpoints of
    ``linspace(0.1, 1, n + 1)`` with n = 2**i values of each sign (signed) or n = 2**(i + 1) (unsigned), plus 0
    and 1. Dense near 0 and relative-precise across 7 decades: the 8-bit code bitsandbytes' 8-bit optimizers use
    for their states. Both codes hold 1.0, so a block's absmax (its scale) is stored exactly and a moment that is
    re-quantized every step does not shrink."""
    vals = [0.0, 1.0]
    for i in range(7):
        n = 2**i if signed else 2 ** (i + 1)
        edges = np.linspace(0.1, 1.0, n + 1)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)
        vals += list(mids) + (list(-mids) if signed else [])
    out = np.sort(np.asarray(vals, np.float64)).astype(np.float32)
    assert out.shape == (256,)
    return out


DYNAMIC8_CODEBOOK = _dynamic_map(signed=True)
DYNAMIC8U_CODEBOOK = _dynamic_map(signed=False)


@dataclasses.dataclass(frozen=True)
class QType:
    """A number format.

    Attributes:
      name: canonical name, e.g. ``'int4'``.
      kind: ``'int'``, ``'uint'``, ``'float'`` or ``'codebook'``.
      bits: bits per value.
      narrow: signed integers only: codes ``[-qmax, qmax]`` instead of the
        full ``[-qmax - 1, qmax]`` (see :func:`narrow_range`).

    Example:
      >>> from qarray import qtypes
      >>> qtypes.QType('int4', 'int', 4).packed
      True
      >>> t = qtypes.get('int4')
      >>> t.qmin, t.qmax, t.asym_range, t.code_dtype
      (-8, 7, (-8, 7), dtype('int8'))
    """

    name: str
    kind: str
    bits: int
    narrow: bool = False  # signed ints only: drop the code -2**(B-1) (see narrow_range)
    element: str | None = None  # microscaling formats: the element format (the codes' own format)
    block: int | None = None  # microscaling formats: values sharing one scale along the tiled axis
    scale_format: str | None = None  # microscaling formats: 'e8m0' (a power of two) or 'e4m3' (under a tensor scale)

    @property
    def microscaling(self) -> bool:
        """Whether this is a block format with its own scale format (mxfp8, mxfp4, nvfp4).

        Example:
          >>> from qarray import qtypes
          >>> qtypes.get('mxfp4').microscaling, qtypes.get('mxfp4').block, qtypes.get('nvfp4').scale_format
          (True, 32, 'e4m3')
        """
        return self.block is not None

    @property
    def element_type(self) -> 'QType':
        """The format of the codes themselves (itself, except for microscaling formats).

        Example:
          >>> from qarray import qtypes
          >>> qtypes.get('mxfp8').element_type.name
          'float8_e4m3fn'
        """
        return get(self.element) if self.element else self

    @property
    def scale_dtype(self) -> np.dtype | None:
        """The dtype scales are stored in for microscaling formats (else None: chosen by the caller).

        Example:
          >>> from qarray import qtypes
          >>> qtypes.get('mxfp4').scale_dtype.name
          'float8_e8m0fnu'
        """
        if self.scale_format == 'e8m0':
            return np.dtype(ml_dtypes.float8_e8m0fnu)
        if self.scale_format == 'e4m3':
            return np.dtype(ml_dtypes.float8_e4m3fn)
        return None

    # ---- integer code ranges -------------------------------------------------
    @property
    def qmax(self) -> int | float:
        """Largest code (symmetric range for signed ints; finite max for fp8)."""
        if self.kind == 'int':
            return 1 if self.bits == 1 else 2 ** (self.bits - 1) - 1
        if self.kind == 'uint':
            return 2**self.bits - 1
        if self.kind == 'float':
            return float(ml_dtypes.finfo(self.native_dtype).max)
        return 1.0  # codebook levels are normalised to [-1, 1]

    @property
    def qmin(self) -> int | float:
        """Smallest code under symmetric calibration (the full two's-complement range for signed ints
        of 2+ bits unless ``narrow``)."""
        if self.kind == 'uint':
            return 0
        if self.kind == 'int' and self.bits > 1 and not self.narrow:
            return -self.qmax - 1
        return -self.qmax

    @property
    def asym_range(self) -> tuple[int, int]:
        """(qmin, qmax) used with a zero point: the full B-bit range."""
        if self.kind == 'int':
            if self.bits == 1:
                raise ValueError(
                    "qtype 'int1' has no zero level, so it cannot take an asymmetric "
                    "calibration; use a symmetric one ('absmax', 'rms', 'mse', ...) or 'uint1'.")
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        if self.kind == 'uint':
            return 0, 2**self.bits - 1
        raise ValueError(
            f"qtype {self.name!r} has no zero point; asymmetric calibration needs an "
            "integer format (intB or uintB).")

    @property
    def calibration_bound(self) -> float:
        """Where a symmetric range's absmax lands in code units: ``scale = absmax / bound``.

        Integers: ``qmax`` plus half a step (the edge of the top code's rounding
        cell, so nothing rounds more than half a step away). fp8 and nf4: their
        largest level (``qmax``), beyond which values saturate.

        Example:
          >>> from qarray import qtypes
          >>> qtypes.get('int4').calibration_bound, qtypes.get('int1').calibration_bound
          (7.5, 2.0)
        """
        if self.kind == 'int':
            return self.qmax + self.step_in_scales / 2
        return float(self.qmax)

    @property
    def step_in_scales(self) -> int:
        """Distance between adjacent levels in units of ``scale`` (2 for int1)."""
        return 2 if (self.kind == 'int' and self.bits == 1) else 1

    # ---- storage -------------------------------------------------------------
    @property
    def packed(self) -> bool:
        """Whether values are bit-packed into uint8 (every format below 8 bits)."""
        return self.bits < 8

    @property
    def native_dtype(self) -> np.dtype:
        """dtype of a stored value when not packed (int8, uint8, fp8)."""
        if self.element:
            return self.element_type.native_dtype
        if self.kind == 'float':
            return np.dtype(_FLOAT_DTYPES[self.name])
        if self.kind == 'uint':
            return np.dtype(np.uint8)
        if self.kind == 'codebook':
            return np.dtype(np.uint8)  # code index
        return np.dtype(np.int8)

    @property
    def code_dtype(self) -> np.dtype:
        """dtype of unpacked codes as ops see them (int8 / uint8 / fp8)."""
        return self.native_dtype

    @property
    def is_integer(self) -> bool:
        """True for intB/uintB: codes can enter an integer matmul."""
        return self.kind in ('int', 'uint')

    @property
    def codebook(self) -> np.ndarray | None:
        """Code book values for code-book formats (nf4, dynamic8, dynamic8u), else None."""
        if self.kind != 'codebook':
            return None
        return {'nf4': NF4_CODEBOOK, 'dynamic8': DYNAMIC8_CODEBOOK, 'dynamic8u': DYNAMIC8U_CODEBOOK}[self.name]

    # ---- codes <-> unsigned bit fields for packing ----------------------------
    def to_field(self, codes: jnp.ndarray) -> jnp.ndarray:
        """Map codes to unsigned B-bit fields (uint8) for packing.

        Example:
          >>> import jax.numpy as jnp
          >>> from qarray import qtypes
          >>> t = qtypes.get('int4')
          >>> f = t.to_field(jnp.array([-8, -1, 7], jnp.int8))
          >>> f.tolist(), t.from_field(f).tolist()
          ([8, 15, 7], [-8, -1, 7])
        """
        if self.kind == 'int':
            if self.bits == 1:
                return (codes > 0).astype(jnp.uint8)
            return (codes.astype(jnp.int8).view(jnp.uint8)
                    & jnp.uint8(2**self.bits - 1))
        if self.kind == 'float' and self.bits == 4:  # e2m1: its 4 bits, via a 4-bit integer view
            return lax.bitcast_convert_type(codes.astype(self.native_dtype), jnp.uint4).astype(jnp.uint8)
        return codes.astype(jnp.uint8)

    def from_field(self, field: jnp.ndarray) -> jnp.ndarray:
        """Inverse of :meth:`to_field`; returns codes in :attr:`code_dtype`.

        Example:
          >>> import jax.numpy as jnp
          >>> from qarray import qtypes
          >>> qtypes.get('int2').from_field(jnp.array([0, 1, 2, 3], jnp.uint8)).tolist()
          [0, 1, -2, -1]
        """
        if self.kind == 'int':
            if self.bits == 1:
                return field.astype(jnp.int8) * 2 - 1
            sign = 1 << (self.bits - 1)
            f = field.astype(jnp.int8)
            return (f ^ sign) - sign  # sign-extend the B-bit two's complement
        if self.kind == 'float' and self.bits == 4:
            return lax.bitcast_convert_type(field.astype(jnp.uint4), self.native_dtype)
        return field.astype(jnp.uint8)

    def __repr__(self) -> str:
        return f"QType({self.name})"


def narrow_range(qtype: Any) -> QType:
    """The restricted-range variant of a signed integer format: codes ``[-qmax, qmax]`` (int8: [-127, 127]),
    as LiteRT/XNNPACK expect for int8/int4 weights. Other formats are returned unchanged.

    Example:
      >>> from qarray import qtypes
      >>> qtypes.narrow_range('int8').qmin, qtypes.get('int8').qmin
      (-127, -128)
    """
    qt = get(qtype)
    if qt.kind != 'int' or qt.bits == 1 or qt.narrow:
        return qt
    return QType(f'{qt.name}_narrow', 'int', qt.bits, narrow=True)


def _build_registry() -> dict[str, QType]:
    reg = {}
    for b in range(1, 9):
        reg[f'int{b}'] = QType(f'int{b}', 'int', b)
        reg[f'uint{b}'] = QType(f'uint{b}', 'uint', b)
    reg['float8_e4m3fn'] = QType('float8_e4m3fn', 'float', 8)
    reg['float8_e5m2'] = QType('float8_e5m2', 'float', 8)
    reg['nf4'] = QType('nf4', 'codebook', 4)
    reg['dynamic8'] = QType('dynamic8', 'codebook', 8)
    reg['dynamic8u'] = QType('dynamic8u', 'codebook', 8)
    reg['float4_e2m1fn'] = QType('float4_e2m1fn', 'float', 4)
    # Microscaling (OCP MX v1.0): blocks of 32 share a power-of-two E8M0 scale; NVIDIA's nvfp4: blocks of 16
    # share an E4M3 scale, itself scaled by one float32 per tensor.
    reg['mxfp8'] = QType('mxfp8', 'float', 8, element='float8_e4m3fn', block=32, scale_format='e8m0')
    reg['mxfp4'] = QType('mxfp4', 'float', 4, element='float4_e2m1fn', block=32, scale_format='e8m0')
    reg['nvfp4'] = QType('nvfp4', 'float', 4, element='float4_e2m1fn', block=16, scale_format='e4m3')
    return reg


_FLOAT_DTYPES = {'float8_e4m3fn': ml_dtypes.float8_e4m3fn, 'float8_e5m2': ml_dtypes.float8_e5m2,
                 'float4_e2m1fn': ml_dtypes.float4_e2m1fn}


_REGISTRY = _build_registry()
_ALIASES = {'fp8': 'float8_e4m3fn', 'e4m3': 'float8_e4m3fn', 'fp8_e4m3': 'float8_e4m3fn',
            'e5m2': 'float8_e5m2', 'fp8_e5m2': 'float8_e5m2', 'fp4': 'float4_e2m1fn', 'e2m1': 'float4_e2m1fn'}


def names() -> list[str]:
    """All canonical format names.

    Example:
      >>> from qarray import qtypes
      >>> 'nf4' in qtypes.names()
      True
    """
    return list(_REGISTRY)


def get(qtype: Any) -> QType:
    """Resolve a name, alias, dtype or QType to a :class:`QType`.

    Raises ``ValueError`` listing the valid names when the format is unknown.

    Example:
      >>> from qarray import qtypes
      >>> qtypes.get('fp8').name
      'float8_e4m3fn'
    """
    if isinstance(qtype, QType):
        return qtype
    if isinstance(qtype, str):
        key = qtype.strip().lower()
        key = _ALIASES.get(key, key)
        if key in _REGISTRY:
            return _REGISTRY[key]
        base = key[:-len('_narrow')]
        if key.endswith('_narrow') and base in _REGISTRY and _REGISTRY[base].kind == 'int':
            return narrow_range(base)
    else:
        try:
            dt = np.dtype(qtype)
        except TypeError:
            dt = None
        if dt is not None:
            name = dt.name
            if name in _REGISTRY:
                return _REGISTRY[name]
    valid = ', '.join(names() + sorted(_ALIASES))
    raise ValueError(f"Unknown qtype {qtype!r}; valid qtypes are: {valid}.")
