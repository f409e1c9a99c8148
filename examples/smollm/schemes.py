"""The rows of the SmolLM2 table: the model as shipped, its float reference, re-quantized schemes, KV caches.

"float32" here is the shipped GGUF weights (Q4_1 matrices, Q8_0 embedding)
dequantized to float32: the reference every other row is compared with. The
re-quantized rows start from that reference, quantize the 210 linear layers
(:data:`~examples.smollm.native.LINEAR_PATHS`) per the scheme and the embedding
table (also the tied head) to int8 with one scale per row, weight-only. Norms
and the attention core stay float32.

Example:
  >>> from examples.smollm.schemes import SCHEMES
  >>> [s.name for s in SCHEMES][:2]
  ['GGUF as shipped (Q4_1 + Q8_0 codes)', 'float32 (GGUF dequantized)']
"""

from __future__ import annotations

import dataclasses
from typing import Any

from examples.smollm.native import EMBED_PATH, LINEAR_PATHS

__all__ = ['Scheme', 'SCHEMES', 'TOUR_SCHEMES', 'GPTQ_DAMPING', 'by_name', 'qarray_rules', 'qwix_rules',
           'qwix_missing_reason']

SOURCES = ('native', 'float', 'quantized')


@dataclasses.dataclass(frozen=True)
class Scheme:
    """One row: where the weights come from, their formats, and the KV cache.

    Attributes:
      name: row label.
      source: ``'native'`` (the file's own codes, :mod:`examples.smollm.native`), ``'float'`` (the float
        reference, optionally with a quantized KV cache) or ``'quantized'`` (re-quantized from the reference).
      weight_qtype, act_qtype, tile_size, weight_calibration, weight_algorithm, rotation, gptq_damping,
      gptq_token_clip, gptq_act_order:
        the linear layers' rule (``flax_integration.QuantizationRule`` fields).
      embed_qtype: the embedding table's format (weight-only, one scale per row); None keeps it float.
      kv_cache: None (float cache) or a :func:`examples.smollm.kv_cache.quantized` format.

    Example:
      >>> from examples.smollm.schemes import Scheme
      >>> Scheme('x', 'quantized', 'int4', tile_size=128).weight_only
      True
    """

    name: str
    source: str = 'quantized'
    weight_qtype: str | None = None
    act_qtype: str | None = None
    tile_size: int | None = None
    weight_calibration: str = 'absmax'
    weight_algorithm: str = 'rtn'
    rotation: str | None = None
    gptq_damping: float = 0.01
    gptq_token_clip: float | None = None
    gptq_act_order: bool = False
    embed_qtype: str | None = 'int8'
    kv_cache: str | None = None

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}; got {self.source!r}")
        if self.source == 'quantized' and self.weight_qtype is None:
            raise ValueError(f"scheme {self.name!r}: a 'quantized' row needs weight_qtype")

    @property
    def weight_only(self) -> bool:
        """True when activations stay float.

        Example:
          >>> from examples.smollm.schemes import by_name
          >>> by_name('w8a8 int8 dynamic').weight_only
          False
        """
        return self.act_qtype is None


# GPTQ: damping as a fraction of the mean Hessian diagonal, and token clipping (a token's activation counts
# at most 4x the batch's median norm: SmolLM2's few "massive activation" tokens otherwise dominate the
# Hessian and plain GPTQ ends up worse than round to nearest; see benchmarks/RESULTS.md). The calibration set
# is 64 x 256 tokens of articles disjoint from the evaluation windows (benchmarks/smollm_bench.py), against K up
# to 1536 (with 8 windows GPTQ overfits the 1536-input down_proj: worse than round to nearest on held-out text).
GPTQ_DAMPING = 0.1
GPTQ_TOKEN_CLIP = 4.0
_GPTQ = dict(weight_algorithm='gptq', gptq_damping=GPTQ_DAMPING, gptq_token_clip=GPTQ_TOKEN_CLIP)

SCHEMES: list[Scheme] = [
    Scheme('GGUF as shipped (Q4_1 + Q8_0 codes)', 'native', embed_qtype=None),
    Scheme('float32 (GGUF dequantized)', 'float', embed_qtype=None),
    Scheme('w8a8 int8 dynamic', weight_qtype='int8', act_qtype='int8'),
    Scheme('w8a8 int8 dynamic hadamard', weight_qtype='int8', act_qtype='int8', rotation='hadamard'),
    Scheme('int8 weight-only', weight_qtype='int8'),
    # Qwix 0.1.8 cannot quantize the embedding table: this row matches its scope exactly.
    Scheme('int8 weight-only, float embedding', weight_qtype='int8', embed_qtype=None),
    # t128 on K = 576: four whole tiles and a partial one of 64 (qarray.quantize and qarray.gptq both take it)
    Scheme('int4 t128 weight-only', weight_qtype='int4', tile_size=128),
    # act order: without the rotation a few input channels carry most of the activation energy; rounding them
    # first took plain GPTQ from 1.54x float perplexity (worse than round to nearest) to 1.33x
    Scheme('int4 t128 gptq weight-only', weight_qtype='int4', tile_size=128, gptq_act_order=True, **_GPTQ),
    Scheme('int4 t128 gptq hadamard weight-only', weight_qtype='int4', tile_size=128, rotation='hadamard', **_GPTQ),
    Scheme('int4 t128 mse gptq hadamard weight-only', weight_qtype='int4', tile_size=128, weight_calibration='mse',
           rotation='hadamard', **_GPTQ),
    Scheme('uint4 t128 minmax gptq hadamard weight-only', weight_qtype='uint4', tile_size=128,
           weight_calibration='minmax', rotation='hadamard', **_GPTQ),
    # Qwix's tiles must divide the axis (128 does not divide 576): the t64 rows are the like-for-like comparison.
    Scheme('int4 t64 weight-only', weight_qtype='int4', tile_size=64),
    Scheme('nf4 t64 weight-only', weight_qtype='nf4', tile_size=64),
    Scheme('mxfp4 weight-only', weight_qtype='mxfp4'),
    # the OCP spec's shared exponent clips a block's largest values; 'mse' picks the better of two exponents
    Scheme('mxfp4 mse weight-only', weight_qtype='mxfp4', weight_calibration='mse'),
    Scheme('nvfp4 weight-only', weight_qtype='nvfp4'),
    Scheme('float32 + int8 KV cache', 'float', embed_qtype=None, kv_cache='int8'),
    Scheme('float32 + fp8 KV cache', 'float', embed_qtype=None, kv_cache='fp8'),
]

# The rows the tour computes live (it must stay short on 2 cores).
TOUR_SCHEMES = ['GGUF as shipped (Q4_1 + Q8_0 codes)', 'float32 (GGUF dequantized)', 'w8a8 int8 dynamic hadamard',
                'int4 t128 gptq hadamard weight-only', 'float32 + int8 KV cache']


def by_name(name: str) -> Scheme:
    """The scheme called ``name``.

    Example:
      >>> from examples.smollm.schemes import by_name
      >>> by_name('nf4 t64 weight-only').tile_size
      64
    """
    for s in SCHEMES:
        if s.name == name:
            return s
    raise ValueError(f"scheme must be one of {[s.name for s in SCHEMES]}; got {name!r}.")


def qarray_rules(scheme: Scheme) -> list[Any]:
    """``flax_integration`` rules for a ``'quantized'`` row: the linear layers, then the embedding table.

    Example:
      >>> from examples.smollm.schemes import by_name, qarray_rules
      >>> [(r.module_path, r.weight_qtype) for r in qarray_rules(by_name('int8 weight-only'))][1]
      ('embed', 'int8')
    """
    if scheme.source != 'quantized':
        raise ValueError(f"scheme {scheme.name!r} ({scheme.source}) has no quantization rules")
    import flax_integration as fi
    rules = [fi.QuantizationRule(module_path=LINEAR_PATHS, weight_qtype=scheme.weight_qtype,
                                 act_qtype=scheme.act_qtype, tile_size=scheme.tile_size,
                                 weight_calibration_method=scheme.weight_calibration,
                                 weight_algorithm=scheme.weight_algorithm, rotation=scheme.rotation,
                                 gptq_damping=scheme.gptq_damping, gptq_token_clip=scheme.gptq_token_clip,
                                 gptq_act_order=scheme.gptq_act_order)]
    if scheme.embed_qtype is not None:
        rules.append(fi.QuantizationRule(module_path=EMBED_PATH, weight_qtype=scheme.embed_qtype))
    return rules


def qwix_missing_reason(scheme: Scheme, hidden: int = 576, intermediate: int = 1536) -> str | None:
    """Why Qwix 0.1.8 cannot run this row (None when it can, as plain PTQ on the linear layers).

    Example:
      >>> from examples.smollm.schemes import by_name, qwix_missing_reason
      >>> qwix_missing_reason(by_name('int8 weight-only')) is None
      True
      >>> qwix_missing_reason(by_name('int4 t128 weight-only'))
      'Qwix tiles must divide the axis: 128 does not divide 576 (q/k/v/gate/up/o inputs)'
    """
    if scheme.source == 'native':
        return 'Qwix has no GGUF loader (the file\'s Q4_1/Q8_0 codes cannot be used as they are)'
    if scheme.kv_cache is not None:
        return 'Qwix has no quantized KV cache'
    if scheme.source == 'float':
        return None
    if scheme.rotation is not None:
        return 'Qwix PTQ rules have no rotation option (Hadamard)'
    if scheme.weight_algorithm == 'gptq':
        return 'Qwix GPTQ (qwix.contrib.gptq) is Linen-only in 0.1.8'
    if scheme.tile_size and (hidden % scheme.tile_size or intermediate % scheme.tile_size):
        return (f'Qwix tiles must divide the axis: {scheme.tile_size} does not divide {hidden} '
                f'(q/k/v/gate/up/o inputs)')
    return None


def _qwix_qtype(name: str) -> Any:
    import jax.numpy as jnp
    return {'int8': jnp.int8, 'int4': jnp.int4, 'float8_e4m3fn': jnp.float8_e4m3fn}.get(name, name)


def qwix_rules(scheme: Scheme) -> list[Any] | None:
    """Qwix 0.1.8 PTQ rules for the row's linear layers (Qwix keeps the embedding float), or None.

    Qwix 0.1.8 does not quantize ``nnx.Embed`` (it intercepts no gather), so
    its rows have a float32 embedding table: compare their bytes with that in mind.

    Example:
      >>> from examples.smollm.schemes import by_name, qwix_rules
      >>> qwix_rules(by_name('w8a8 int8 dynamic hadamard')) is None
      True
    """
    if qwix_missing_reason(scheme) is not None or scheme.source != 'quantized':
        return None
    import qwix
    tile = scheme.tile_size or {'mxfp4': 32, 'nvfp4': 16}.get(scheme.weight_qtype)  # Qwix wants MX blocks as tiles
    kw = dict(module_path=LINEAR_PATHS, weight_qtype=_qwix_qtype(scheme.weight_qtype), tile_size=tile,
              weight_calibration_method=scheme.weight_calibration)
    if scheme.act_qtype is not None:
        kw.update(act_qtype=_qwix_qtype(scheme.act_qtype))
    return [qwix.QuantizationRule(**kw)]
