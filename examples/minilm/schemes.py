"""The quantization schemes compared on MiniLM, as rules for ``flax_integration`` and for Qwix.

Every scheme quantizes the 36 linear layers (:data:`~examples.minilm.model.LINEAR_PATHS`);
embeddings, LayerNorms, biases and the attention core stay in float32 in both
libraries, so the rows compare like with like.

Example:
  >>> [s.name for s in SCHEMES][:2]
  ['w8a8 int8 dynamic', 'w8a8 int8 dynamic t128']
"""

from __future__ import annotations

import dataclasses
from typing import Any

from examples.minilm.model import LINEAR_PATHS

__all__ = ['Scheme', 'SCHEMES', 'FORMAT_SCHEMES', 'TOUR_SCHEMES', 'by_name', 'qarray_rules', 'qwix_rules',
           'qwix_head_rule_kwargs']


@dataclasses.dataclass(frozen=True)
class Scheme:
    """One row of the table: weight/activation formats, tiling and calibration.

    Attributes:
      name: row label.
      weight_qtype: qarray format name of the weights.
      act_qtype: format of the activations (None: weight-only).
      tile_size: sub-channel tile along the contracting axis (weights and activations).
      act_static: activation scales calibrated ahead of time on held-out sentences.
      weight_calibration: qarray calibration spec for weights (Qwix always uses absmax here).
      weight_algorithm: ``'rtn'`` (round to nearest) or ``'gptq'`` (Hessian-aware rounding from
        calibration activations; Qwix: ``qwix.contrib.gptq``).
      rotation: None or ``'hadamard'`` (block Hadamard rotation of weights and activations; Qwix has no
        rule-level equivalent).
      gptq_damping: GPTQ damping (a fraction of the mean Hessian diagonal), the same in both libraries.
      qwix_method: what fills the Qwix columns: ``'ptq'`` (the same scheme in plain Qwix PTQ), or the Qwix
        ``contrib`` method closest to this row -- ``'gptq'``, ``'awq'``, ``'smoothquant'`` -- where plain
        Qwix has no equivalent; ``'head'``: plain PTQ in Qwix HEAD (newer than 0.1.8: MX formats), which
        runs in its own environment (:func:`qwix_head_rule_kwargs`; ``benchmarks/formats_bench.py``), so
        the in-process Qwix 0.1.8 columns stay empty; None: no Qwix column.
      weight_scale_qtype: quantize the weights' scales too (double quantization, e.g. ``'int8'``), or None.
      act_calibration: qarray calibration spec for dynamic activations (``'mse'``: MX formats' better exponent).

    Example:
      >>> Scheme('x', 'int4', tile_size=128).weight_only
      True
    """

    name: str
    weight_qtype: str
    act_qtype: str | None = None
    tile_size: int | None = None
    act_static: bool = False
    weight_calibration: str = 'absmax'
    weight_algorithm: str = 'rtn'
    rotation: str | None = None
    gptq_damping: float = 0.01
    qwix_method: str | None = 'ptq'
    weight_scale_qtype: str | None = None
    act_calibration: str = 'absmax'

    @property
    def weight_only(self) -> bool:
        """True when activations stay in float."""
        return self.act_qtype is None


# GPTQ damping of the gptq rows (both libraries). The calibration set is small (a few thousand tokens
# against K up to 1536), where 0.1 generalises better than the paper's 0.01 (see RESULTS.md).
GPTQ_DAMPING = 0.1

SCHEMES: list[Scheme] = [
    Scheme('w8a8 int8 dynamic', 'int8', 'int8'),
    Scheme('w8a8 int8 dynamic t128', 'int8', 'int8', tile_size=128),
    Scheme('w8a8 int8 static', 'int8', 'int8', act_static=True),
    Scheme('w8a8 int8 static t128', 'int8', 'int8', tile_size=128, act_static=True),
    Scheme('w8a8 int8 dynamic hadamard', 'int8', 'int8', rotation='hadamard', qwix_method='smoothquant'),
    Scheme('w8a8 int8 static hadamard', 'int8', 'int8', act_static=True, rotation='hadamard', qwix_method=None),
    Scheme('w8a8 fp8 dynamic', 'float8_e4m3fn', 'float8_e4m3fn'),
    Scheme('int8 weight-only', 'int8'),
    Scheme('fp8 weight-only', 'float8_e4m3fn'),
    Scheme('int4 t128 weight-only', 'int4', tile_size=128),
    Scheme('int4 t128 mse weight-only', 'int4', tile_size=128, weight_calibration='mse', qwix_method=None),
    Scheme('int4 t128 gptq weight-only', 'int4', tile_size=128, weight_algorithm='gptq', gptq_damping=GPTQ_DAMPING,
           qwix_method='gptq'),
    Scheme('int4 t128 gptq hadamard weight-only', 'int4', tile_size=128, weight_algorithm='gptq',
           rotation='hadamard', gptq_damping=GPTQ_DAMPING, qwix_method='awq'),
    Scheme('int4 t128 gptq hadamard mse weight-only', 'int4', tile_size=128, weight_algorithm='gptq',
           rotation='hadamard', gptq_damping=GPTQ_DAMPING, weight_calibration='mse', qwix_method=None),
    # Asymmetric 4-bit: codes 0..15 and a uint8 zero point per tile (16 levels instead of 15).
    Scheme('uint4 t128 weight-only', 'uint4', tile_size=128, weight_calibration='minmax'),
    Scheme('uint4 t128 gptq hadamard weight-only', 'uint4', tile_size=128, weight_calibration='minmax',
           weight_algorithm='gptq', rotation='hadamard', gptq_damping=GPTQ_DAMPING, qwix_method=None),
    Scheme('int4 t64 weight-only', 'int4', tile_size=64),
    Scheme('nf4 t64 weight-only', 'nf4', tile_size=64),
    Scheme('nf4 t64 gptq hadamard weight-only', 'nf4', tile_size=64, weight_algorithm='gptq', rotation='hadamard',
           gptq_damping=GPTQ_DAMPING, qwix_method='awq'),
    Scheme('int3 t64 weight-only', 'int3', tile_size=64),
    Scheme('int3 t64 mse weight-only', 'int3', tile_size=64, weight_calibration='mse', qwix_method=None),
    Scheme('int3 t64 gptq hadamard weight-only', 'int3', tile_size=64, weight_algorithm='gptq',
           rotation='hadamard', gptq_damping=GPTQ_DAMPING, qwix_method='awq'),
]

# The formats added in issue 16 (fp4, MX, nvfp4, double quantization): weight-only rows with the format's own
# blocks on the contracting axis (mxfp8/mxfp4: 32 values per E8M0 scale; nvfp4: 16 per E4M3 scale under a
# float32 tensor scale), plus one dynamic w8a8 MX row. Their Qwix numbers come from Qwix HEAD (0.1.8 has none
# of these formats), run in its own environment by benchmarks/formats_bench.py. Not in SCHEMES: the main
# MiniLM table (benchmarks/minilm_bench.py) keeps its rows.
FORMAT_SCHEMES: list[Scheme] = [
    Scheme('fp4 t32 weight-only', 'fp4', tile_size=32, qwix_method='head'),
    Scheme('mxfp8 weight-only', 'mxfp8', qwix_method='head'),
    Scheme('mxfp8 mse weight-only', 'mxfp8', weight_calibration='mse', qwix_method='head'),
    Scheme('mxfp4 weight-only', 'mxfp4', qwix_method='head'),
    Scheme('mxfp4 mse weight-only', 'mxfp4', weight_calibration='mse', qwix_method='head'),
    Scheme('nvfp4 weight-only', 'nvfp4', qwix_method='head'),
    Scheme('nvfp4 mse weight-only', 'nvfp4', weight_calibration='mse', qwix_method='head'),  # HEAD row: its nvfp4
    Scheme('nf4 t64 int8-scales weight-only', 'nf4', tile_size=64, weight_scale_qtype='int8', qwix_method='head'),
    Scheme('w mxfp8 / a mxfp8 dynamic', 'mxfp8', 'mxfp8', qwix_method='head'),
    Scheme('w mxfp8 / a mxfp8 mse dynamic', 'mxfp8', 'mxfp8', weight_calibration='mse', act_calibration='mse',
           qwix_method='head'),
]

# The few rows `python -m qarray` computes live (it must stay fast on 2 cores).
TOUR_SCHEMES = ['w8a8 int8 dynamic t128', 'w8a8 int8 dynamic hadamard', 'int8 weight-only', 'int4 t128 weight-only',
                'nf4 t64 weight-only']


def by_name(name: str) -> Scheme:
    """The scheme called ``name``.

    Example:
      >>> by_name('nf4 t64 weight-only').tile_size
      64
    """
    for s in SCHEMES + FORMAT_SCHEMES:
        if s.name == name:
            return s
    raise ValueError(f"scheme must be one of {[s.name for s in SCHEMES + FORMAT_SCHEMES]}; got {name!r}.")


def qarray_rules(scheme: Scheme, fi: Any = None) -> list[Any]:
    """``flax_integration`` rules for ``scheme`` (one rule on the 36 linear layers).

    Example:
      >>> qarray_rules(SCHEMES[0])[0].act_qtype  # doctest: +SKIP
      'int8'
    """
    if fi is None:
        import flax_integration as fi
    return [fi.QuantizationRule(module_path=LINEAR_PATHS, weight_qtype=scheme.weight_qtype,
                                act_qtype=scheme.act_qtype, tile_size=scheme.tile_size,
                                act_static_scale=scheme.act_static,
                                weight_calibration_method=scheme.weight_calibration,
                                act_calibration_method=scheme.act_calibration,
                                weight_algorithm=scheme.weight_algorithm, rotation=scheme.rotation,
                                gptq_damping=scheme.gptq_damping, weight_scale_qtype=scheme.weight_scale_qtype)]


def _qwix_qtype(name: str) -> Any:
    import jax.numpy as jnp
    # Qwix names native formats by dtype and its synthetic ones (nf4, int3) by string. Its asymmetric 4-bit
    # format is jnp.int4 with a zero point (minmax); jnp.uint4 rejects asymmetric calibration.
    return {'int8': jnp.int8, 'int4': jnp.int4, 'uint4': jnp.int4, 'float8_e4m3fn': jnp.float8_e4m3fn}.get(name, name)


def qwix_rules(scheme: Scheme) -> list[Any] | None:
    """Qwix 0.1.8 plain-PTQ rules for ``scheme``, or None where plain Qwix PTQ has no equivalent (mse weight
    calibration, rotations; GPTQ rows are built by :mod:`examples.minilm.qwix_contrib`).

    Static scales average over batch and sequence (``act_batch_axes=(0, 1)``) so
    one per-tensor scale serves every sequence length, as in ``flax_integration``.

    Example:
      >>> qwix_rules(by_name('int4 t128 mse weight-only')) is None  # doctest: +SKIP
      True
    """
    if (scheme.weight_calibration not in ('absmax', 'minmax') or scheme.rotation is not None
            or scheme.weight_algorithm != 'rtn' or scheme.act_calibration != 'absmax'):
        return None
    import qwix
    kw = dict(module_path=LINEAR_PATHS, weight_qtype=_qwix_qtype(scheme.weight_qtype),
              tile_size=scheme.tile_size, weight_calibration_method=scheme.weight_calibration)
    if scheme.act_qtype is not None:
        kw.update(act_qtype=_qwix_qtype(scheme.act_qtype), act_static_scale=scheme.act_static)
        if scheme.act_static:
            kw.update(act_batch_axes=(0, 1))
    return [qwix.QuantizationRule(**kw)]


# Qwix HEAD's names for the formats of FORMAT_SCHEMES and the block each needs as its tile_size (HEAD refuses
# an MX format without tiles of exactly its block). fp4 is the dtype ``jnp.float4_e2m1fn`` with float32 scales.
_HEAD_QTYPES = {'fp4': 'float4_e2m1fn', 'mxfp8': 'mxfp8', 'mxfp4': 'mxfp4', 'nvfp4': 'nvfp4', 'nf4': 'nf4',
                'int8': 'int8', 'int4': 'int4', 'float8_e4m3fn': 'float8_e4m3fn'}
_HEAD_BLOCKS = {'mxfp8': 32, 'mxfp4': 32, 'nvfp4': 16}


def qwix_head_rule_kwargs(scheme: Scheme) -> tuple[dict[str, Any], str] | None:
    """Keyword arguments of Qwix HEAD's ``QuantizationRule`` closest to ``scheme`` (JSON-able: dtype formats by
    name), and what they are (``'same scheme'`` or the difference); None where HEAD has no counterpart.

    HEAD's MX formats take tiles of exactly their block on the contracting axis and always compute their
    exponents one way (its own rule, not the spec's and not qarray's ``mse`` search), so the ``absmax`` and
    ``mse`` rows share one Qwix row. HEAD has no double quantization: the ``weight_scale_qtype`` row gets
    plain nf4 with float32 scales. Calibrations other than absmax, rotations and GPTQ have no counterpart.

    Example:
      >>> from examples.minilm.schemes import by_name, qwix_head_rule_kwargs
      >>> kw, what = qwix_head_rule_kwargs(by_name('mxfp4 mse weight-only'))
      >>> kw['weight_qtype'], kw['tile_size'], what
      ('mxfp4', 32, 'same format; HEAD chooses the exponent its own way')
    """
    if scheme.rotation is not None or scheme.weight_algorithm != 'rtn' or scheme.act_static:
        return None
    for calibration, qtype in ((scheme.weight_calibration, scheme.weight_qtype),
                               (scheme.act_calibration, scheme.act_qtype)):
        if calibration not in ('absmax', 'mse') or (calibration == 'mse' and qtype not in ('mxfp8', 'mxfp4', 'nvfp4')):
            return None
    names = [scheme.weight_qtype] + ([scheme.act_qtype] if scheme.act_qtype else [])
    if any(n not in _HEAD_QTYPES for n in names):
        return None
    blocks = {_HEAD_BLOCKS.get(n) for n in names}
    if len(blocks) != 1 or (None not in blocks and scheme.tile_size is not None):
        return None
    kw: dict[str, Any] = dict(module_path=LINEAR_PATHS, weight_qtype=_HEAD_QTYPES[scheme.weight_qtype])
    if scheme.act_qtype:
        kw['act_qtype'] = _HEAD_QTYPES[scheme.act_qtype]
    tile = blocks.pop() or scheme.tile_size
    if tile is not None:
        kw['tile_size'] = tile
    what = 'same scheme'
    if scheme.weight_qtype in ('mxfp8', 'mxfp4'):
        what = 'same format; HEAD chooses the exponent its own way'
    if scheme.weight_qtype == 'nvfp4':
        what = 'same format without the float32 tensor scale (HEAD: E4M3-rounded block scales kept as float32)'
    if scheme.weight_scale_qtype is not None:
        what = 'nf4 with float32 scales (HEAD has no double quantization)'
    return kw, what
