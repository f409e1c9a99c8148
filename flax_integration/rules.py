"""Regex rules: which modules (or param paths) get quantized, and how.

A :class:`QuantizationRule` names modules by a regex that must *fully* match
the module path (``'Dense_0'``, ``'encoder/layers_1/attn/query'``; ``''`` is
the root module). Given a list of rules, the first one that matches wins, so
put specific rules before catch-alls. :class:`RuleSet` does the matching and
remembers which rules were ever used, so a provider can report rules that
matched nothing (usually a typo in a regex).

Example:
  >>> from flax_integration import QuantizationRule
  >>> from flax_integration.rules import RuleSet
  >>> rules = RuleSet([QuantizationRule(module_path='.*attn.*', weight_qtype='int4'),
  ...                  QuantizationRule(module_path='.*', weight_qtype='int8')])
  >>> rules.match('block/attn/query', 'dot_general').weight_qtype
  'int4'
  >>> rules.match('block/mlp', 'dot_general').weight_qtype
  'int8'
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from typing import Iterable, Mapping, Sequence

from qarray import calibration as _calibration
from qarray import gptq as _gptq
from qarray import qtypes

from flax_integration._op_table import OP_NAMES

__all__ = ['QuantizationRule', 'QtRule', 'RuleSet', 'UnusedRuleWarning', 'OP_NAMES', 'WEIGHT_ALGORITHMS',
           'ROTATIONS', 'BWD_STOCHASTIC_ROUNDING']

WEIGHT_ALGORITHMS = ('rtn', 'gptq')
ROTATIONS = (None, 'hadamard')
BWD_STOCHASTIC_ROUNDING = (None, 'uniform')


@dataclasses.dataclass(frozen=True)
class QuantizationRule:
    """How to quantize the ops of the modules whose path fully matches ``module_path``.

    Attributes:
      module_path: regex that must fully match the module path ('/'-joined;
        the root module's path is ``''``). In the model-free
        ``quantize_params(params, rules)`` it matches the leaf path
        (``'Dense_0/kernel'``).
      weight_qtype: format of weights (``'int8'``, ``'int4'``, ``'nf4'``,
        ``'fp8'``, ``'mxfp4'``, ``'nvfp4'``, ...), or None to leave weights in
        float. Microscaling formats put their blocks on the contraction axis.
      weight_scale_qtype: quantize the weights' scales too (double
        quantization, e.g. ``'int8'`` for QLoRA-style nf4 with ``tile_size=64``):
        see ``qarray.quantize(..., scale_qtype=...)``.
      act_qtype: format of activations, or None for weight-only quantization.
      tile_size: sub-channel tiles along the contracting axis (weights and
        activations tile the same axis so the matmul can scale per tile).
        dot_general/einsum ops that have a weight only (activation x activation
        einsums such as attention stay untiled); conv weights are per output channel.
      weight_calibration_method: calibration spec for weights (``'absmax'``,
        ``'minmax'``, ``'rms,3'``, ``'mse'``, ``'percentile,99.9'``, ...).
      act_calibration_method: calibration spec for activations.
      act_static_scale: use scales fixed ahead of time (from a calibration run,
        see :func:`flax_integration._calibrate`) instead of per-token scales
        computed at run time.
      act_batch_axes: for static scales, the activation axes averaged away
        (besides the contracting axes, which are shared or tiled). None (the
        default) reduces every non-contracting axis, so a static scale is
        per tensor (per tile) and does not depend on batch or sequence length.
        Give e.g. ``(0, 1)`` to keep one scale per index of the other
        non-contracting axes (say, per attention head).
      op_names: the op kinds this rule applies to (subset of
        ``('dot_general', 'einsum', 'conv_general_dilated')``).
      weight_algorithm: how weights are rounded: ``'rtn'`` (round to nearest,
        the default) or ``'gptq'`` -- column by column along the contracting
        axis, each column's rounding error spread over the columns not yet
        rounded so the layer's output on calibration activations moves least
        (:func:`qarray.gptq.gptq_quantize`). GPTQ needs activation statistics:
        run :func:`flax_integration._calibrate` with these rules and pass its
        ``quant_stats`` to ``quantize_params``. PTQ only.
      rotation: None, or ``'hadamard'``: the weight is stored rotated along its
        contracting axis by a block Hadamard matrix with fixed random signs
        (:mod:`qarray.rotation`) and the activation is rotated the same way at
        run time, so the product is unchanged but outliers are spread over
        each block -- fewer large values for the scales to cover, for the
        weight and the activation alike. PTQ (and its calibration) only.
      gptq_damping: GPTQ's damping, a fraction of the mean Hessian diagonal
        added to the diagonal (larger is more stable, less exact).
      gptq_token_clip: None (the plain Hessian), or a number >= 1: while
        calibrating, a token whose activation norm exceeds this multiple of the
        batch's median token norm counts as if it had that norm
        (:func:`qarray.gptq.hessian`). For LLMs with "massive activations"
        (a few tokens hundreds of times larger), whose Hessian they dominate;
        4.0 is a good start.
      gptq_act_order: GPTQ rounds the input channels in decreasing order of
        their activation energy (the Hessian's diagonal) instead of in order,
        with every tile's scale taken from the weight beforehand
        (:func:`qarray.gptq.gptq_quantize` ``act_order``); the stored layout is
        the same. Helps most without ``rotation`` (a few channels with large
        activations are rounded first, while the most others remain to absorb
        their error); the Hadamard rotation already evens the channels out.
      kv_cache_qtype: keep the attention decode cache of the matched attention
        modules quantized in this format (``'int8'``, ``'fp8'``, ``'int4'``;
        see :mod:`qarray.kv_cache`), or None for Flax's float cache.
      bwd_qtype: quantized training (:class:`~flax_integration.providers.qat.QtProvider` only): the
        two backward contractions of every matched op (gradient w.r.t. the activation and w.r.t. the
        weight) run quantized, the incoming gradient in this format (``'int8'``, ``'float8_e5m2'``,
        ...), through a ``jax.custom_vjp`` (:mod:`qarray.ops.qt_dot`). Each backward contraction
        quantizes its own two operands along its own non-contracting axes (the gradient per token for
        the activation gradient, per output channel for the weight gradient; the weight or activation
        re-quantized in that layout, not reused with its forward scales). None: float backward with
        straight-through gradients (plain QAT).
      bwd_residual_qtype: the format the forward operands (activation, weight) are re-quantized to in
        the backward contractions. None: the operand's forward format where the forward quantized it
        (``act_qtype`` / ``weight_qtype``), else ``bwd_qtype`` -- so ``weight_qtype='float8_e4m3fn',
        act_qtype='float8_e4m3fn', bwd_qtype='float8_e5m2'`` computes the backward in e5m2 x e4m3.
      bwd_calibration_method: calibration spec of the backward operands (default ``'absmax'``).
      bwd_tile_size: tiles along the contracting axis of both backward ``dot_general``/``einsum``
        contractions (None: one scale per non-contracting index).
      bwd_weight_grad_tile_size: (Qwix's name) tiles along the contracting (token) axis of the weight
        gradient only; overrides ``bwd_tile_size`` there.
      bwd_stochastic_rounding: None (round to nearest) or ``'uniform'``: round the gradient operands of
        the backward contractions stochastically (unbiased). The random bits come from the ``'quant'``
        rng stream (Linen: ``apply(..., rngs={'quant': key})``; NNX: an ``nnx.Rngs(quant=...)`` held
        by the model, e.g. ``model.rngs = nnx.Rngs(quant=0)``) folded with the op's path, so a run is
        reproducible; asking for it without the stream raises ``ValueError``.
      bwd_use_original_residuals: re-quantize the original float operands in the backward (True), or
        the forward's quantized values (False, default: the gradient of the quantized forward).
      fwd_quantized: with ``bwd_qtype`` (or alone): run the forward as the real quantized op of PTQ
        (int8 x int8 -> int32, fp8 dots; scales after) instead of fake quantization in float. Same
        values up to accumulation order; gradients still pass the quantizers straight-through.
      disable_channelwise_axes, channelwise_noise_axes, additional_qt_config: Qwix ``QtRule`` fields
        accepted so Qwix configs carry over; only their defaults (False, None, None) are implemented,
        anything else raises ``ValueError``.
      weight_tiles: 2-D (or any) block scales for weights, in the weight's own axes (negative counts
        from the end): ``{-2: 128, -1: 128}`` gives a Dense kernel ``[in, out]`` one scale per 128 x 128
        block, as DeepSeek-V3-style fp8 checkpoints store; ``{0: 1}`` on an expert stack
        ``[experts, in, out]`` in the model-free ``quantize_params`` gives one scale set per expert.
        Replaces ``tile_size`` for the weight (activations keep ``tile_size``); the weight's other
        output axes stay per index. Not with microscaling formats (their blocks are fixed), GPTQ
        (it rounds against tiles along the contraction only) or LiteRT export.
      warn_if_unused: warn (:class:`UnusedRuleWarning`) when the rule matches
        nothing -- after a quantized model's first run, and in the model-free
        ``quantize_params(params, rules)``. Set False for a rule that only
        matches in some modes (e.g. an op that runs only while training).

    Example:
      >>> from flax_integration import QuantizationRule
      >>> QuantizationRule(module_path='.*', weight_qtype='int4', tile_size=32).tile_size
      32
    """

    module_path: str = '.*'
    weight_qtype: str | None = None
    act_qtype: str | None = None
    weight_scale_qtype: str | None = None
    tile_size: int | None = None
    weight_calibration_method: str = 'absmax'
    act_calibration_method: str = 'absmax'
    act_static_scale: bool = False
    act_batch_axes: tuple[int, ...] | None = None
    op_names: tuple[str, ...] = OP_NAMES
    weight_algorithm: str = 'rtn'
    rotation: str | None = None
    gptq_damping: float = 0.01
    kv_cache_qtype: str | None = None
    bwd_qtype: str | None = None
    bwd_residual_qtype: str | None = None
    bwd_calibration_method: str = 'absmax'
    bwd_tile_size: int | None = None
    bwd_weight_grad_tile_size: int | None = None
    bwd_stochastic_rounding: str | None = None
    bwd_use_original_residuals: bool = False
    fwd_quantized: bool = False
    disable_channelwise_axes: bool = False
    channelwise_noise_axes: tuple[int, ...] | None = None
    additional_qt_config: dict | None = None
    warn_if_unused: bool = True
    weight_tiles: Mapping[int, int] | None = None
    gptq_token_clip: float | None = None
    gptq_act_order: bool = False

    def __post_init__(self):
        if not isinstance(self.module_path, str):
            raise TypeError(f"module_path must be a regex string; got {self.module_path!r}.")
        try:
            re.compile(self.module_path)
        except re.error as e:
            raise ValueError(f"module_path {self.module_path!r} is not a valid regex: {e}.") from None
        for field in ('weight_qtype', 'act_qtype'):
            value = getattr(self, field)
            if value is not None:
                try:
                    qtypes.get(value)
                except ValueError as e:
                    raise ValueError(f"{field}: {e}") from None
        t = self.tile_size
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t <= 0):
            raise ValueError(f"tile_size must be None or a positive int; got {t!r}.")
        self._check_weight_tiles()
        for field in ('weight_calibration_method', 'act_calibration_method'):
            try:
                _calibration.parse(getattr(self, field))
            except (ValueError, TypeError) as e:
                e.add_note(f"In QuantizationRule({field}=...).")
                raise
        ops = (self.op_names,) if isinstance(self.op_names, str) else tuple(self.op_names)
        bad = [o for o in ops if o not in OP_NAMES]
        if bad or not ops:
            raise ValueError(f"op_names must be a non-empty subset of {OP_NAMES}; got {self.op_names!r}.")
        object.__setattr__(self, 'op_names', ops)
        if self.act_batch_axes is not None:
            axes = (self.act_batch_axes,) if isinstance(self.act_batch_axes, int) else self.act_batch_axes
            if not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
                raise TypeError(f"act_batch_axes must be None or a tuple of ints; got {self.act_batch_axes!r}.")
            object.__setattr__(self, 'act_batch_axes', tuple(axes))
        if self.weight_algorithm not in WEIGHT_ALGORITHMS:
            raise ValueError(f"weight_algorithm must be one of {WEIGHT_ALGORITHMS}; got {self.weight_algorithm!r}.")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}; got {self.rotation!r}.")
        if (self.weight_algorithm != 'rtn' or self.rotation is not None) and self.weight_qtype is None:
            raise ValueError(f"weight_algorithm={self.weight_algorithm!r}, rotation={self.rotation!r} act on "
                             "quantized weights; set weight_qtype (e.g. 'int4').")
        if not isinstance(self.gptq_damping, (int, float)) or isinstance(self.gptq_damping, bool) or not (
                self.gptq_damping >= 0):
            raise ValueError(f"gptq_damping must be a number >= 0; got {self.gptq_damping!r}.")
        tc = _gptq.check_token_clip(self.gptq_token_clip, 'gptq_token_clip')
        if tc is not None and self.weight_algorithm != 'gptq':
            raise ValueError(f"gptq_token_clip={tc!r} shapes GPTQ's Hessian; set weight_algorithm='gptq' too.")
        if not isinstance(self.gptq_act_order, bool):
            raise TypeError(f"gptq_act_order must be a bool; got {self.gptq_act_order!r}.")
        if self.gptq_act_order and self.weight_algorithm != 'gptq':
            raise ValueError("gptq_act_order=True orders GPTQ's rounding; set weight_algorithm='gptq' too.")
        if self.weight_scale_qtype is not None:
            if self.weight_qtype is None:
                raise ValueError("weight_scale_qtype quantizes the weights' scales; set weight_qtype too.")
            sq = qtypes.get(self.weight_scale_qtype)
            if qtypes.get(self.weight_qtype).microscaling or sq.microscaling or sq.kind == 'uint':
                raise ValueError(f"weight_scale_qtype={self.weight_scale_qtype!r}: double quantization takes a signed "
                                 f"int, fp8 or nf4 scale format, and not with the microscaling weight format "
                                 f"{self.weight_qtype!r} (its scales are already one byte).")
        if self.weight_algorithm == 'gptq' and self.weight_qtype is not None and (
                qtypes.get(self.weight_qtype).microscaling or self.weight_scale_qtype is not None):
            raise ValueError(f"weight_algorithm='gptq' rounds against plain per-tile scales; it does not take "
                             f"weight_qtype={self.weight_qtype!r} with weight_scale_qtype={self.weight_scale_qtype!r}.")
        for field in ('weight_qtype', 'act_qtype'):
            qt = qtypes.get(getattr(self, field)) if getattr(self, field) is not None else None
            if qt is not None and qt.microscaling and self.tile_size not in (None, qt.block):
                raise ValueError(f"tile_size={self.tile_size}: {field}={qt.name!r} has blocks of {qt.block} on the "
                                 f"contraction axis; drop tile_size (or give {qt.block}).")
        if self.act_static_scale and self.act_qtype is not None and qtypes.get(self.act_qtype).microscaling:
            raise ValueError(f"act_static_scale=True: {self.act_qtype!r} computes its block scales from the data; "
                             "use it with dynamic activations (act_static_scale=False).")
        if self.kv_cache_qtype is not None:
            from qarray import kv_cache as _kv  # noqa: PLC0415 (kv_cache imports ops; keep rules light)
            try:
                name = qtypes.get(self.kv_cache_qtype).name
            except ValueError as e:
                raise ValueError(f"kv_cache_qtype: {e}") from None
            if name not in _kv.SUPPORTED_QTYPES:
                raise ValueError(f"kv_cache_qtype must be one of {_kv.SUPPORTED_QTYPES[1:]} (or an alias such as "
                                 f"'fp8'); got {self.kv_cache_qtype!r}.")
        if self.act_static_scale and self.act_qtype is None:
            raise ValueError("act_static_scale=True needs act_qtype (the format of the activations); "
                             "got act_qtype=None.")
        self._check_backward()

    def _check_weight_tiles(self) -> None:
        wt = self.weight_tiles
        if wt is None:
            return
        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
        if not isinstance(wt, Mapping) or not all(is_int(a) and is_int(t) and t > 0 for a, t in wt.items()):
            raise TypeError(f"weight_tiles must be None or a mapping {{weight axis: tile size}} of ints with "
                            f"positive tiles, e.g. {{-2: 128, -1: 128}}; got {wt!r}.")
        if not wt:
            raise ValueError("weight_tiles={} tiles nothing; give None for the default layout.")
        if self.weight_qtype is None:
            raise ValueError("weight_tiles lays out the weights' scales; set weight_qtype too.")
        if qtypes.get(self.weight_qtype).microscaling:
            raise ValueError(f"weight_tiles: weight_qtype={self.weight_qtype!r} has fixed blocks of "
                             f"{qtypes.get(self.weight_qtype).block} on the contraction axis; drop weight_tiles.")
        if self.weight_algorithm == 'gptq':
            raise ValueError("weight_tiles: weight_algorithm='gptq' rounds against tiles along the contraction "
                             "axis only; use tile_size instead of weight_tiles.")
        object.__setattr__(self, 'weight_tiles', dict(wt))

    def weight_tiles_for(self, ndim: int, where: str) -> dict[int, int]:
        """``weight_tiles`` with non-negative axes for a weight of rank ``ndim``; ``ValueError`` naming
        ``where`` (the param or op) if an axis is out of range or given twice.

        Example:
          >>> from flax_integration import QuantizationRule
          >>> QuantizationRule(weight_qtype='float8_e4m3fn', weight_tiles={-2: 128, -1: 128}).weight_tiles_for(2, 'w')
          {0: 128, 1: 128}
        """
        out: dict[int, int] = {}
        for a, t in (self.weight_tiles or {}).items():
            if not -ndim <= a < ndim:
                raise ValueError(f"{where}: weight_tiles axis {a} is out of range for a weight of rank {ndim} "
                                 f"(rule module_path={self.module_path!r}, weight_tiles={self.weight_tiles}).")
            if a % ndim in out:
                raise ValueError(f"{where}: weight_tiles names axis {a % ndim} twice for a weight of rank {ndim} "
                                 f"(rule module_path={self.module_path!r}, weight_tiles={self.weight_tiles}).")
            out[a % ndim] = t
        return out

    def _check_backward(self) -> None:
        """Validate the quantized-training (backward) fields."""
        for field in ('bwd_qtype', 'bwd_residual_qtype'):
            value = getattr(self, field)
            if value is None:
                continue
            try:
                qt = qtypes.get(value)
            except ValueError as e:
                raise ValueError(f"{field}: {e}") from None
            if qt.microscaling:
                raise ValueError(f"{field}={value!r}: microscaling formats are not backward formats (their blocks lie "
                                 "along one fixed axis); use the element format ('fp8', 'fp4') with bwd_tile_size.")
        for field in ('bwd_tile_size', 'bwd_weight_grad_tile_size'):
            t = getattr(self, field)
            if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t <= 0):
                raise ValueError(f"{field} must be None or a positive int (a tile of that many values; fractional "
                                 f"tiles are not supported); got {t!r}.")
        try:
            _calibration.parse(self.bwd_calibration_method)
        except (ValueError, TypeError) as e:
            e.add_note("In QuantizationRule(bwd_calibration_method=...).")
            raise
        if self.bwd_stochastic_rounding not in BWD_STOCHASTIC_ROUNDING:
            raise ValueError(f"bwd_stochastic_rounding must be one of {BWD_STOCHASTIC_ROUNDING}; got "
                             f"{self.bwd_stochastic_rounding!r} (Qwix's 'low_bit_uniform' is not implemented).")
        for field in ('bwd_use_original_residuals', 'fwd_quantized', 'disable_channelwise_axes'):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"{field} must be True or False; got {getattr(self, field)!r}.")
        needs_bwd = [f for f in ('bwd_residual_qtype', 'bwd_tile_size', 'bwd_weight_grad_tile_size',
                                 'bwd_stochastic_rounding') if getattr(self, f) is not None]
        needs_bwd += ['bwd_use_original_residuals'] * self.bwd_use_original_residuals
        if needs_bwd and self.bwd_qtype is None:
            raise ValueError(f"{', '.join(needs_bwd)} configure the quantized backward; set bwd_qtype too "
                             "(e.g. bwd_qtype='int8').")
        if self.fwd_quantized and self.weight_qtype is None and self.act_qtype is None:
            raise ValueError("fwd_quantized=True runs the forward as the real quantized op; set weight_qtype "
                             "and/or act_qtype.")
        if self.disable_channelwise_axes:
            raise ValueError("disable_channelwise_axes=True (Qwix: per-tensor scales everywhere) is not "
                             "implemented; forward scales follow the op's layout and backward scales are per "
                             "channel of each backward contraction. Leave it False.")
        if self.channelwise_noise_axes is not None:
            raise ValueError(f"channelwise_noise_axes={self.channelwise_noise_axes!r}: stochastic rounding draws "
                             "one random number per element here; shared noise along axes is not implemented. "
                             "Leave it None.")
        if self.additional_qt_config is not None:
            raise ValueError(f"additional_qt_config={self.additional_qt_config!r}: Qwix's raw DotGeneralQtConfig "
                             "overrides are not supported; use the bwd_* fields of the rule.")

    @property
    def quantized_backward(self) -> bool:
        """True when the rule's ops train through the quantized-training custom VJP (``bwd_qtype`` or
        ``fwd_quantized`` set).

        Example:
          >>> from flax_integration import QuantizationRule
          >>> QuantizationRule(weight_qtype='int8', bwd_qtype='int8').quantized_backward
          True
        """
        return self.bwd_qtype is not None or self.fwd_quantized

    @property
    def transforms_weights(self) -> bool:
        """True when the rule asks for GPTQ or a rotation (supported by PTQ and its calibration only).

        Example:
          >>> from flax_integration import QuantizationRule
          >>> QuantizationRule(weight_qtype='int4', rotation='hadamard').transforms_weights
          True
        """
        return self.weight_algorithm != 'rtn' or self.rotation is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class QtRule(QuantizationRule):
    """Qwix's name for a quantized-training rule: a :class:`QuantizationRule` given by keyword, with the
    backward fields (``bwd_qtype``, ``bwd_calibration_method``, ``bwd_weight_grad_tile_size``,
    ``bwd_stochastic_rounding``, ...) that Qwix's ``QtRule`` has, so a Qwix QAT config carries over.
    Every field is :class:`QuantizationRule`'s; Qwix fields this library does not implement raise
    ``ValueError`` when set to anything but their default.

    Example:
      >>> from flax_integration import QtRule, QuantizationRule
      >>> r = QtRule(module_path='.*', weight_qtype='int8', act_qtype='int8', bwd_qtype='int8',
      ...            bwd_calibration_method='absmax', bwd_stochastic_rounding='uniform')
      >>> isinstance(r, QuantizationRule), r.bwd_qtype, r.quantized_backward
      (True, 'int8', True)
    """


class UnusedRuleWarning(UserWarning):
    """A rule matched nothing: the model (or param tree) stays float where the rule meant to quantize it.

    Example:
      >>> from flax_integration import UnusedRuleWarning
      >>> issubclass(UnusedRuleWarning, UserWarning)
      True
    """


class RuleSet:
    """An ordered list of rules; the first full regex match wins. Tracks used rules.

    Example:
      >>> from flax_integration import QuantizationRule
      >>> from flax_integration.rules import RuleSet
      >>> rs = RuleSet([QuantizationRule(module_path='enc.*', weight_qtype='int8')])
      >>> rs.match('dec/0', 'dot_general') is None, rs.unused()[0].module_path
      (True, 'enc.*')
    """

    def __init__(self, rules: Sequence[QuantizationRule]):
        if isinstance(rules, QuantizationRule):
            rules = [rules]
        if rules is None or isinstance(rules, (str, bytes)) or not hasattr(rules, '__iter__'):
            raise TypeError(f"rules must be a list of QuantizationRule (e.g. [QuantizationRule(weight_qtype='int8')]); "
                            f"got {rules!r}.")
        rules = list(rules)
        for r in rules:
            if not isinstance(r, QuantizationRule):
                raise TypeError(f"rules must be a sequence of QuantizationRule; got an item {r!r}.")
        self.rules = rules
        self._compiled = [re.compile(r.module_path) for r in rules]
        self._used: set[int] = set()
        self.seen: dict[str, None] = {}  # paths asked about, in first-seen order
        self._warned = False

    def match(self, path: str, op_name: str | None = None) -> QuantizationRule | None:
        """The first rule whose regex fully matches ``path`` and that covers ``op_name`` (remembers ``path``).

        Example:
          >>> from flax_integration import QuantizationRule
          >>> from flax_integration.rules import RuleSet
          >>> rs = RuleSet([QuantizationRule(module_path='conv.*', op_names=('conv_general_dilated',)),
          ...               QuantizationRule(module_path='.*', weight_qtype='int8')])
          >>> rs.match('conv1', 'conv_general_dilated').module_path, rs.match('conv1', 'einsum').module_path
          ('conv.*', '.*')
        """
        self.seen.setdefault(path if op_name is None else f'{path or "<root>"} ({op_name})', None)
        for i, (rule, rx) in enumerate(zip(self.rules, self._compiled)):
            if rx.fullmatch(path) and (op_name is None or op_name in rule.op_names):
                self._used.add(i)
                return rule
        return None

    def unused(self) -> list[QuantizationRule]:
        """Rules that have not matched anything so far.

        Example:
          >>> from flax_integration import QuantizationRule
          >>> from flax_integration.rules import RuleSet
          >>> rs = RuleSet([QuantizationRule(module_path='enc.*'), QuantizationRule(module_path='dec.*')])
          >>> _ = rs.match('enc/0')
          >>> [r.module_path for r in rs.unused()]
          ['dec.*']
        """
        return [r for i, r in enumerate(self.rules) if i not in self._used]

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def warn_unused(self, where: str, paths: Iterable[str] | None = None, *, stacklevel: int = 2) -> list[QuantizationRule]:
        """Warn once (:class:`UnusedRuleWarning`) about rules that matched nothing and ask to be warned
        (``warn_if_unused``), listing the paths that exist, nearest to each rule's regex first.

        Example:
          >>> import warnings
          >>> from flax_integration.rules import QuantizationRule, RuleSet
          >>> rs = RuleSet([QuantizationRule(module_path='Dense_0/kernl', weight_qtype='int8')])
          >>> _ = rs.match('Dense_0/kernel'), rs.match('Dense_0/bias')
          >>> with warnings.catch_warnings(record=True) as caught:
          ...     warnings.simplefilter('always')
          ...     _ = rs.warn_unused('quantize_params')
          >>> print(caught[0].message)  # doctest: +ELLIPSIS
          quantize_params: rule module_path='Dense_0/kernl' matched nothing, so nothing it names is quantized. Paths that exist (nearest first): 'Dense_0/kernel', 'Dense_0/bias'...
        """
        if self._warned:
            return []
        self._warned = True
        unused = [r for r in self.unused() if r.warn_if_unused]
        known = list(self.seen if paths is None else paths)
        for rule in unused:
            near = sorted(known, key=lambda p: -difflib.SequenceMatcher(None, rule.module_path, p).ratio())
            listed = ', '.join(repr(p) for p in near[:8]) + (', ...' if len(near) > 8 else '')
            warnings.warn(
                f"{where}: rule module_path={rule.module_path!r} matched nothing, so nothing it names is quantized. "
                f"Paths that exist (nearest first): {listed or '(none)'}. The regex must fully match a path; "
                f"pass warn_if_unused=False for a rule that only matches in some modes.",
                UnusedRuleWarning, stacklevel=stacklevel + 1)
        return unused
