"""Qwix 0.1.8's calibrated methods (``qwix.contrib``: GPTQ, AWQ, SmoothQuant) on MiniLM.

Each builder mirrors :func:`examples.minilm.evaluate.build_qwix`: the same 36
linear layers (:data:`~examples.minilm.model.LINEAR_PATHS`), the scheme's formats
and tile size, Qwix's default hyperparameters. The calibration pass runs the
float model under the method's calibration provider on ``batches`` (use
:func:`~examples.minilm.evaluate.calibration_batches`: the held-out sentences
grouped by length, so no padding token enters the statistics), then the
method's ``quantize_params`` turns the statistics into quantized weights.

Call sequence (from the Qwix sources and tests):

1. ``quantize_model(model, <Method>CalibrationProvider([<Method>Rule(...)]))``,
   then ``apply(..., mutable='quant_stats')`` once per batch (statistics are a
   ``SimpleMovingAverage`` over batches: each batch weighs the same).
2. ``quantize_model(model, PtqProvider(rules))`` + ``jax.eval_shape(init)`` for
   the abstract quantized tree.
3. ``<method>.quantize_params(params, abstract, quant_stats)``.
4. Inference: GPTQ uses ``PtqProvider``; AWQ ``AwqInferenceProvider``;
   SmoothQuant ``SqInferenceProvider``.

Known gap (Qwix 0.1.8): ``SqInferenceProvider.dot_general`` multiplies the
activations by the inverse smoothing scales and then calls Qwix's core
``dot_general`` directly, skipping the activation quantization that
``PtqProvider`` does; so the shipped provider runs a *weight-only* int8 model
with smoothed weights. And it averages the smoothing scales s and their
inverses separately over calibration batches, so mean(s) * mean(1/s) != 1.
:func:`build_qwix_smoothquant` recomputes the inverses, and defaults to a
minimal subclass that smooths and then hands over to ``PtqProvider.dot_general``
(which quantizes the activations per the rule); ``shipped_provider=True`` runs
Qwix's provider unchanged.

Example:
  >>> from examples.minilm import evaluate, schemes, weights
  >>> built = build_qwix_gptq(schemes.by_name('int4 t128 weight-only'), weights.load_params(),
  ...                         evaluate.eval_data(), evaluate.calibration_batches())  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from examples.minilm.evaluate import Built, EvalData
from examples.minilm.model import LINEAR_PATHS, MiniLM
from examples.minilm.schemes import Scheme, _qwix_qtype

__all__ = ['build_qwix_gptq', 'build_qwix_awq', 'build_qwix_smoothquant']

Batches = Sequence[tuple[np.ndarray, np.ndarray]]

# Formats Qwix's GPTQ can emit: gptq_core allocates its result with
# ``jnp.zeros_like(W, dtype=how.qtype)`` ("TODO: support synthetic qtype"),
# so only formats that are real jnp dtypes work (not nf4 / int3).
_GPTQ_DTYPES = ('int8', 'int4', 'float8_e4m3fn')


def _calibrate(model: Any, provider: Any, params: Any, batches: Batches) -> Any:
    """Run the float model under a Qwix calibration ``provider``; return the accumulated ``quant_stats``."""
    import qwix
    cal = qwix.quantize_model(model, provider)
    variables = {'params': params['params']}
    for ids, mask in batches:
        _, upd = cal.apply(variables, ids, mask, mutable=['quant_stats'])
        variables = {**variables, 'quant_stats': upd['quant_stats']}
    if 'quant_stats' not in variables:
        raise ValueError('batches must hold at least one (ids, mask) batch; got none.')
    return variables['quant_stats']


def _abstract(model: Any, rules: list[Any], data: EvalData) -> Any:
    """The abstract ``PtqProvider`` param tree (``WithAux`` leaves carry how each weight is quantized)."""
    import qwix
    qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
    return jax.eval_shape(qmodel.init, jax.random.key(0), data.ids[:2], data.mask[:2])['params']


def _weight_only_kwargs(scheme: Scheme, module_path: str) -> dict[str, Any]:
    return dict(module_path=module_path, weight_qtype=_qwix_qtype(scheme.weight_qtype),
                tile_size=scheme.tile_size)


def build_qwix_gptq(scheme: Scheme, params: Any, data: EvalData, batches: Batches, *,
                    module_path: str = LINEAR_PATHS, block_size: int = 128, damping: float = 0.01) -> Built | None:
    """Qwix GPTQ (``qwix.contrib.gptq``, block 128, damping 0.01 by default) on a weight-only scheme.

    Returns None for schemes that quantize activations or use a non-absmax
    weight calibration (GPTQ picks its own scales per group with absmax).
    ``module_path`` (a Qwix rule regex) narrows the quantized layers, e.g. for
    a quick test: Qwix's GPTQ runs column by column in eager mode, about 4 min
    for all 36 layers on a 2-core CPU, much of it compiling one eager op per
    distinct column-slice width, so a smaller ``block_size`` (Qwix's
    ``gptq_block_size``, default 128) mainly cuts that compile time.

    Raises:
      NotImplementedError: for formats Qwix's GPTQ cannot produce (nf4, int3:
        its core stores codes in an array of dtype ``qtype``, which must be a jnp dtype).

    Example:
      >>> from examples.minilm import evaluate, schemes, weights
      >>> b = build_qwix_gptq(schemes.by_name('int4 t128 weight-only'), weights.load_params(),
      ...                     evaluate.eval_data(n_pairs=1), evaluate.calibration_batches())  # doctest: +SKIP
      >>> b.apply(b.variables, ids, mask).shape  # doctest: +SKIP
      (n, 384)
    """
    if not scheme.weight_only or scheme.weight_calibration != 'absmax':
        return None
    if scheme.weight_qtype not in _GPTQ_DTYPES:
        raise NotImplementedError(
            f"Qwix 0.1.8 GPTQ cannot quantize to {scheme.weight_qtype!r}: gptq_core.quantize_weight builds its codes "
            f"with jnp.zeros_like(W, dtype=qtype) ('TODO: support synthetic qtype'; it fails with TypeError: data type "
            f"{scheme.weight_qtype!r} not understood), so only {_GPTQ_DTYPES} work.")
    import qwix
    from qwix.contrib import gptq
    rules = [gptq.GptqRule(**_weight_only_kwargs(scheme, module_path))]
    model = MiniLM()
    stats = _calibrate(model, gptq.GptqCalibrationProvider(rules), params, batches)
    qparams = gptq.quantize_params(params['params'], _abstract(model, rules, data), stats,
                                   gptq_block_size=block_size, gptq_damping_factor=damping)
    qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
    return Built(jax.jit(qmodel.apply), {'params': qparams})


def build_qwix_awq(scheme: Scheme, params: Any, data: EvalData, batches: Batches, *,
                   module_path: str = LINEAR_PATHS) -> Built | None:
    """Qwix AWQ (``qwix.contrib.awq``, ``n_grid=20``) on a weight-only scheme, run with ``AwqInferenceProvider``.

    Returns None for schemes that quantize activations or use a non-absmax weight calibration.
    ``module_path`` narrows the quantized layers (default: the 36 linear layers).

    Example:
      >>> from examples.minilm import evaluate, schemes, weights
      >>> b = build_qwix_awq(schemes.by_name('int4 t128 weight-only'), weights.load_params(),
      ...                    evaluate.eval_data(n_pairs=1), evaluate.calibration_batches())  # doctest: +SKIP
    """
    if not scheme.weight_only or scheme.weight_calibration != 'absmax':
        return None
    import qwix
    from qwix.contrib import awq
    rules = [awq.AwqRule(**_weight_only_kwargs(scheme, module_path))]
    model = MiniLM()
    stats = _calibrate(model, awq.AwqCalibrationProvider(rules), params, batches)
    qparams = awq.quantize_params(params['params'], _abstract(model, rules, data), stats)
    qmodel = qwix.quantize_model(model, awq.AwqInferenceProvider(rules))
    return Built(jax.jit(qmodel.apply), {'params': qparams})


def _act_quantizing_sq_provider(rules: list[Any]) -> Any:
    """``SqInferenceProvider`` that also quantizes activations: smooth, then ``PtqProvider.dot_general``."""
    import qwix
    from qwix._src.providers import ptq  # WithAux is not re-exported by qwix 0.1.8
    from qwix.contrib import smooth_quant as sq

    class _Provider(sq.SqInferenceProvider):
        def dot_general(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                        out_sharding=None):
            if isinstance(rhs, sq.WithSqScale):
                # Smoothing folds inv_sq_scale into the activations; the weight is then an ordinary
                # PTQ weight, so PtqProvider quantizes lhs per the rule (act_qtype, tile_size).
                lhs = self._apply_sq_scale(lhs, rhs.inv_sq_scale)
                rhs = ptq.WithAux(array=rhs.array, how=rhs.how)
            return qwix.PtqProvider.dot_general(self, lhs, rhs, dimension_numbers, precision=precision,
                                                preferred_element_type=preferred_element_type,
                                                out_sharding=out_sharding)

    return _Provider(rules)


def _consistent_inverse(stats: Any) -> Any:
    """Make the averaged ``inv_sq_scale`` the inverse of the averaged ``sq_scale``.

    Qwix averages ``sq_scale`` and ``inv_sq_scale`` separately over batches, and
    mean(s) * mean(1/s) != 1 once batches differ (up to 1.13 on MiniLM's 6
    calibration batches): the weights are scaled by mean(s) but the activations
    by mean(1/s), an error before any rounding. Setting the sum of inverses to
    count**2 / sum(s) restores the exact identity.
    """
    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            if 'sum_of_sq_scale' in node and 'sum_of_inv_sq_scale' in node:
                return {**node, 'sum_of_inv_sq_scale': node['count'] ** 2 / node['sum_of_sq_scale']}
            return {k: fix(v) for k, v in node.items()}
        return node
    return fix(dict(stats))


def build_qwix_smoothquant(scheme: Scheme, params: Any, data: EvalData, batches: Batches, *,
                           shipped_provider: bool = False, module_path: str = LINEAR_PATHS) -> Built | None:
    """Qwix SmoothQuant (``qwix.contrib.smooth_quant``, ``alpha=0.5``) on a w8a8 int8 dynamic scheme.

    Returns None for weight-only, static-activation or non-int8 schemes.
    ``shipped_provider=False`` (default) runs inference with a minimal subclass
    of ``SqInferenceProvider`` that also quantizes the (smoothed) activations,
    since Qwix 0.1.8's provider leaves them in float (see the module docstring);
    ``shipped_provider=True`` uses Qwix's provider as is (weight-only in effect).
    ``module_path`` narrows the quantized layers (default: the 36 linear layers).
    The calibrated inverse scales are recomputed from the averaged scales
    (Qwix averages both separately, which breaks s * (1/s) = 1 across batches).

    Example:
      >>> from examples.minilm import evaluate, schemes, weights
      >>> b = build_qwix_smoothquant(schemes.by_name('w8a8 int8 dynamic'), weights.load_params(),
      ...                            evaluate.eval_data(n_pairs=1), evaluate.calibration_batches())  # doctest: +SKIP
    """
    if scheme.weight_only or scheme.act_static or (scheme.weight_qtype, scheme.act_qtype) != ('int8', 'int8'):
        return None
    from qwix.contrib import smooth_quant as sq
    rules = [sq.SqRule(**_weight_only_kwargs(scheme, module_path), act_qtype=_qwix_qtype(scheme.act_qtype))]
    model = MiniLM()
    stats = _consistent_inverse(_calibrate(model, sq.SqCalibrationProvider(rules), params, batches))
    qparams = sq.quantize_params(params['params'], _abstract(model, rules, data), stats)
    provider = sq.SqInferenceProvider(rules) if shipped_provider else _act_quantizing_sq_provider(rules)
    import qwix
    qmodel = qwix.quantize_model(model, provider)
    return Built(jax.jit(qmodel.apply), {'params': qparams})
