"""ODML providers: quantization-aware training for LiteRT numerics, and the conversion annotations.

LiteRT's int8 kernels fix the numerics: weights symmetric int8 (narrow range
[-127, 127], zero point 0), one scale per output channel for conv,
fully-connected and matmul; activations one (scale, zero point) per tensor,
asymmetric by default; fixed parameters on softmax / sigmoid / tanh outputs.
Quantization parameters belong to *tensors*, so both providers decide per
tensor, not per op:

* every dot_general / einsum / conv (and ``jnp.dot``/``jnp.matmul``) weight
  is fake-quantized per output channel; a ``ragged_dot`` or a lookup (``jnp.take``) runs in float (LiteRT
  has no int8 ragged dot, and its int8 gather is not annotated here), and a tied output head
  (``Embed.attend``) treats the transposed table as an activation (the lookup, in float, shares it);
* an activation tensor is annotated once, where it is first consumed by an
  annotated op (a conv's input, a residual add's operand) or where an op in
  :mod:`~flax_integration.providers._odml_ops` produces it (relu's output,
  concat's output, ...), and the model's outputs are annotated last; a conv /
  dense output is therefore annotated *after* its bias add and activation,
  which lets LiteRT fuse them;
* a tensor that is already annotated is never annotated again (a reshape
  passes its input's annotation on); a model input whose first use is a
  reshape (an MLP flattening an image) is annotated before it, as
  ``input<i>`` in the model's own module, so the reshape stays int8.

:class:`OdmlQatProvider` fake-quantizes with a straight-through gradient and
keeps a running average of each activation's (min, max) in ``quant_stats``
(names ``<op_id>_lhs`` for an op input, ``relu0_out``, ``output0`` for the
model output, in the module that runs the op). :class:`OdmlConversionProvider`
computes the same numbers ahead of time from the trained params and
``quant_stats`` and emits each fake quant as a ``quant.fake_quant`` composite
that the LiteRT converter turns into int8 tensors; its JAX numerics equal the
QAT model's forward pass. :func:`flax_integration.litert.export_litert` runs
the whole path.

What converts fully to int8: chains of conv / dense / matmul with bias, the
activations in ``odml_ops`` (relu, relu6, leaky_relu; softmax, sigmoid, tanh
with fixed ranges), reshape, max/avg pooling (``flax`` pooling functions),
``jnp.concatenate``, ``jnp.mean``, and ``+``/``*`` between activations.
Anything else between annotated tensors (e.g. ``jnp.maximum(x, 0)`` as relu,
``x.mean()`` as a method, gelu) still converts, but runs in float between a
DEQUANTIZE and a QUANTIZE.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import linen as nn
  >>> from flax_integration import OdmlQatProvider, QuantizationRule, quantize_model
  >>> qat = quantize_model(nn.Dense(4), OdmlQatProvider([QuantizationRule(weight_qtype='int8', act_qtype='int8')]))
  >>> v = qat.init(jax.random.key(0), jnp.ones((2, 8)))
  >>> sorted(v['quant_stats'])
  ['dot_general0_lhs', 'output0']
"""

from __future__ import annotations

import dataclasses
from typing import Any, ContextManager, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qarray import _fake_quant, qtypes
from qarray._array import QArray

from flax_integration import _interception
from flax_integration._op_table import call_kind
from flax_integration._interception import ExtraOp, Intercept
from flax_integration.providers import _odml_ops as odml_ops
from flax_integration.providers._odml_ops import Annotation, lookup, register
from flax_integration.providers.base import Op, Provider, act_range, is_symmetric, range_to_scale
from flax_integration.providers.calibration import update_moving_average
from flax_integration.rules import QuantizationRule
from flax_integration.wrappers import QuantizedParam, unbox_leaves

__all__ = ['OdmlQatProvider', 'WEIGHT_QTYPES', 'ACT_QTYPES']

WEIGHT_QTYPES = ('int8', 'int4')   # LiteRT: int8 weights; int4 weights become INT4 tensors in int8 ops
ACT_QTYPES = ('int8',)
_COMPOSITE_DTYPE = {'int8': 'i8', 'int4': 'i4'}


def _full_rank(v: Any, ndim: int) -> jax.Array:
    return jnp.asarray(v).reshape((1,) * ndim)


def _is_float_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating)


def _check_rules(rules: Sequence[QuantizationRule]) -> None:
    for r in rules:
        if r.weight_qtype is not None and r.weight_qtype not in WEIGHT_QTYPES:
            raise ValueError(f"weight_qtype: ODML (LiteRT) weights must be one of {WEIGHT_QTYPES}; got "
                             f"{r.weight_qtype!r} in rule module_path={r.module_path!r}.")
        if r.act_qtype is not None and r.act_qtype not in ACT_QTYPES:
            raise ValueError(f"act_qtype: ODML (LiteRT) activations must be one of {ACT_QTYPES}; got "
                             f"{r.act_qtype!r} in rule module_path={r.module_path!r}.")
        if r.tile_size is not None:
            raise ValueError(f"tile_size: LiteRT has no sub-channel scales; use tile_size=None (got "
                             f"{r.tile_size!r} in rule module_path={r.module_path!r}).")
        if r.weight_tiles is not None:
            raise ValueError(f"weight_tiles: LiteRT has per-channel scales only; use weight_tiles=None (got "
                             f"{r.weight_tiles!r} in rule module_path={r.module_path!r}).")
        if r.kv_cache_qtype is not None:
            raise ValueError(f"kv_cache_qtype: the ODML (LiteRT) providers export a float decode cache; use "
                             f"kv_cache_qtype=None (got {r.kv_cache_qtype!r} in rule module_path={r.module_path!r}).")
        if r.quantized_backward:
            raise ValueError(f"bwd_qtype / fwd_quantized: the ODML (LiteRT) providers train with float backward passes "
                             f"(rule module_path={r.module_path!r}); use QtProvider for quantized backward passes.")
        if r.weight_qtype is not None and not is_symmetric(r.weight_calibration_method):
            raise ValueError(f"weight_calibration_method: LiteRT weights are symmetric; use a symmetric method "
                             f"such as 'absmax' (got {r.weight_calibration_method!r}).")


class OdmlQatProvider(Provider):
    """QAT with LiteRT numerics (see module docstring).

    Args:
      rules: which modules to quantize; ``weight_qtype`` in ``('int8',
        'int4')``, ``act_qtype`` ``'int8'`` or None (weight-only).
      act_calibration_method: the per-batch range of each activation tensor
        (``'minmax'``: asymmetric, LiteRT's default; ``'absmax'``: symmetric,
        zero point 0). Applies to all activations (a rule's own
        ``act_calibration_method`` is not used: its default is symmetric).
      per_channel_weights: one scale per output channel (False: per tensor).

    Which rule fields apply. Used: ``module_path``, ``op_names``,
    ``weight_qtype``, ``act_qtype`` and ``weight_calibration_method`` (must be
    symmetric). **Ignored: the rule's ``act_calibration_method``** -- every
    activation is calibrated with this provider's ``act_calibration_method``
    (default ``'minmax'``, asymmetric with a zero point, as LiteRT's int8
    kernels expect), so a rule's default ``'absmax'`` does not silently make
    ODML activations symmetric; pass ``act_calibration_method='absmax'`` here
    for symmetric activations. Also ignored: ``act_static_scale`` and
    ``act_batch_axes`` (ODML activations are always one static scale per
    tensor, from the running average in ``quant_stats``). ``tile_size`` is
    rejected (LiteRT has no sub-channel scales).

    Runs: the ``odml_ops`` shims (relu, pooling, ``+`` ...) are installed only
    while a model quantized with this provider runs (:meth:`model_run`), and
    the model's float inputs are marked at entry (:meth:`process_model_inputs`).

    Example:
      >>> from flax_integration import OdmlQatProvider, QuantizationRule
      >>> p = OdmlQatProvider([QuantizationRule(weight_qtype='int8', act_qtype='int8')])
      >>> p.act_calibration_method, p.per_channel_weights
      ('minmax', True)
    """

    def __init__(self, rules: Sequence[QuantizationRule], *, act_calibration_method: str = 'minmax',
                 per_channel_weights: bool = True):
        super().__init__(rules)
        _check_rules(self.rules.rules)
        try:
            is_symmetric(act_calibration_method)
        except (ValueError, TypeError) as e:
            e.add_note("In OdmlQatProvider(act_calibration_method=...).")
            raise
        self.act_calibration_method = act_calibration_method
        self.per_channel_weights = bool(per_channel_weights)
        self.last_io: dict = {'inputs': {}, 'outputs': []}

    # --- run bookkeeping -------------------------------------------------------------------
    def model_run(self) -> ContextManager[odml_ops.Run]:
        """One model run: a fresh registry of annotated tensors (see :mod:`~flax_integration.providers._odml_ops`).

        Example:
          >>> from flax_integration import OdmlQatProvider
          >>> from flax_integration.providers._odml_ops import current_run
          >>> p = OdmlQatProvider([])
          >>> with p.model_run() as run:
          ...     print(current_run() is run, run.provider is p)
          True True
          >>> current_run() is None
          True
        """
        return odml_ops.model_run(self)

    def intercepts(self) -> Sequence[Intercept]:
        """relu, softmax, pooling, concatenate, mean, reshape, ``+`` and ``*`` (see ``_odml_ops``).

        Example:
          >>> from flax_integration import OdmlQatProvider
          >>> sorted({i.name for i in OdmlQatProvider([]).intercepts()})
          ['add', 'avg_pool', 'concatenate', 'leaky_relu', 'log_softmax', 'max_pool', 'mean', 'mul', 'relu',
           'relu6', 'reshape', 'sigmoid', 'softmax', 'tanh']
        """
        return odml_ops.intercepts()

    def process_model_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Mark the model's float inputs (leaf ``i`` of ``(args, kwargs)`` is input ``i``).

        An input is annotated where it is first consumed (named after that
        op), or, when that is a reshape (an MLP flattening an image), before
        the reshape as ``input<i>`` in the model's own module, so the reshape
        runs in int8. The parameters of each annotated input are reported in
        :attr:`last_io`.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> from flax_integration import OdmlQatProvider, QuantizationRule, quantize_model
          >>> p = OdmlQatProvider([QuantizationRule(weight_qtype='int8', act_qtype='int8')])
          >>> x = jnp.linspace(-1, 1, 16).reshape(2, 8)
          >>> _ = quantize_model(nn.Dense(4), p).init(jax.random.key(0), x)
          >>> scale, zero_point = p.last_io['inputs'][0]  # input 0: minmax range [-1, 1]
          >>> scale.tolist(), zero_point.tolist()
          ([0.007843137718737125], [-1])
        """
        run = odml_ops.current_run()
        if run is not None and run.provider is self:
            run.root_frame = _interception.root_frame()
            for i, x in enumerate(jax.tree.leaves((args, kwargs))):
                if not _is_float_array(x):
                    continue
                run.marked[id(x)] = i
                run.keep.append(x)
                ann = lookup(x)
                if ann is not None:  # seeded: annotated outside the model
                    run.io['inputs'][i] = (ann.scale, ann.zero_point)
        return args, kwargs

    def seed(self, x: jax.Array, scale: Any, zero_point: Any) -> None:
        """Declare ``x`` as already annotated with ``(scale, zero_point)`` in this provider's next (or
        current) model run on this thread, e.g. a model input quantized outside the model.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> from flax_integration import OdmlQatProvider, QuantizationRule, quantize_model
          >>> p = OdmlQatProvider([QuantizationRule(weight_qtype='int8', act_qtype='int8')])
          >>> qat = quantize_model(nn.Dense(4), p)
          >>> x = jnp.linspace(-1, 1, 16).reshape(2, 8)
          >>> v = qat.init(jax.random.key(0), x)
          >>> p.seed(x, jnp.array([0.5]), jnp.array([0], jnp.int8))
          >>> _ = qat.apply(v, x, mutable=['quant_stats'])
          >>> p.last_io['inputs'][0][0].tolist()  # the seeded scale, not one from statistics
          [0.5]
        """
        odml_ops.seed(self, x, Annotation(x, scale, zero_point, None))

    # --- matmuls and convolutions ----------------------------------------------------------
    def process_op(self, op: Op) -> jax.Array:
        """Compute the op with its weight fake-quantized per output channel and its activation inputs
        annotated (float params only: a quantized operand is an error).

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> from flax_integration import OdmlQatProvider, QuantizationRule, quantize_model
          >>> rules = [QuantizationRule(weight_qtype='int8', act_qtype='int8')]
          >>> qat = quantize_model(nn.Dense(4), OdmlQatProvider(rules))
          >>> x = jnp.linspace(-1, 1, 16).reshape(2, 8)
          >>> v = qat.init(jax.random.key(0), x)
          >>> y, _ = qat.apply(v, x, mutable=['quant_stats'])
          >>> bool(jnp.abs(y - nn.Dense(4).apply(v, x)).max() < 0.02)  # int8 numerics, close to float
          True
        """
        if call_kind(op.call) != 'dense':  # ragged_dot, lookups: float (see the module docstring)
            return op.call.run_original()
        if op.weight is not None and op.weight.perm is not None:  # a tied head: its table is the lookup's
            op = dataclasses.replace(op, weight=None)
        operands = list(op.call.operands)
        for x in operands:
            if isinstance(x, (QuantizedParam, QArray)):
                raise TypeError(f"{op.describe()}: ODML providers need float params (they fake-quantize); got "
                                f"a quantized {type(x).__name__}. Use the float (or QAT-trained) params.")
        rule = op.rule
        if rule is None:
            return op.call.run(*operands)
        if op.weight is not None and rule.weight_qtype is not None:
            operands[op.weight.index] = self.weight(op, operands[op.weight.index])
        if rule.act_qtype is not None:
            for i in op.act_indices():
                operands[i] = self.annotate_input(op.frame, op.act_name(i), operands[i])
        return op.call.run(*operands)

    def weight_axis(self, op: Op) -> int | None:
        """The output-channel axis of the weight (None: per tensor).

        Example:
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax_integration import OdmlQatProvider, QuantizationRule
          >>> from flax_integration._op_table import dot_general_call
          >>> from flax_integration.providers import Op, Weight
          >>> call = dot_general_call(qarray.dot_general, jax.lax.dot_general, jnp.ones((2, 8)), jnp.ones((8, 4)),
          ...                         (((1,), (0,)), ((), ())))
          >>> op = Op(call, None, QuantizationRule(weight_qtype='int8'), Weight(1, 'kernel', None), 'dot_general0')
          >>> OdmlQatProvider([]).weight_axis(op), OdmlQatProvider([], per_channel_weights=False).weight_axis(op)
          (1, None)
        """
        w = op.weight.index
        shape = op.call.operands[w].shape
        kept = [a for a in op.call.kept[w] if shape[a] > 1]
        if not self.per_channel_weights or len(kept) != 1:
            return None  # LiteRT has one quantized dimension; several output axes share one scale
        return kept[0]

    def weight(self, op: Op, w: jax.Array) -> jax.Array:
        """Fake-quantized weight (straight-through gradient).

        LiteRT's narrow range: int4 codes -7..7 (never -8) times one scale per output column, here
        ``absmax / 7.5`` (qarray's symmetric bound, see :func:`qarray._numerics.scale_and_zero_point`).

        Example:
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax_integration import OdmlQatProvider, QuantizationRule
          >>> from flax_integration._op_table import dot_general_call
          >>> from flax_integration.providers import Op, Weight
          >>> w = jnp.array([[1.0, 0.1], [-0.5, -0.2], [0.3, 0.0]])
          >>> call = dot_general_call(qarray.dot_general, jax.lax.dot_general, jnp.ones((2, 3)), w,
          ...                         (((1,), (0,)), ((), ())))
          >>> op = Op(call, None, QuantizationRule(weight_qtype='int4'), Weight(1, 'kernel', w), 'dot_general0')
          >>> (OdmlQatProvider([]).weight(op, w) / jnp.abs(w).max(0) * 7.5).round().astype(int).tolist()
          [[7, 4], [-4, -7], [2, 0]]
        """
        axis = self.weight_axis(op)
        # LiteRT weights use the narrow range ([-127, 127] for int8), so the QAT model trains with it too.
        return _fake_quant.fake_quant(w, qtypes.narrow_range(op.rule.weight_qtype),
                               channelwise_axes=() if axis is None else (axis,),
                               calibration=op.rule.weight_calibration_method)

    # --- activations -----------------------------------------------------------------------
    def annotate_input(self, frame: Any, name: str, x: Any) -> Any:
        """``x`` as annotated: its existing annotation, or a new one named ``name`` in ``frame``.

        Example (the second Dense's input is the relu output, annotated already, so it gets no
        statistic of its own):
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> from flax_integration import OdmlQatProvider, QuantizationRule, quantize_model
          >>> class MLP(nn.Module):
          ...     @nn.compact
          ...     def __call__(self, x):
          ...         h = nn.relu(nn.Dense(4)(x))
          ...         return nn.Dense(2)(h)
          >>> class Logged(OdmlQatProvider):
          ...     calls = []
          ...     def annotate_input(self, frame, name, x):
          ...         self.calls.append((frame.path, name))
          ...         return super().annotate_input(frame, name, x)
          >>> qat = quantize_model(MLP(), Logged([QuantizationRule(weight_qtype='int8', act_qtype='int8')]))
          >>> v = qat.init(jax.random.key(0), jnp.ones((2, 8)))
          >>> Logged.calls, sorted(v['quant_stats'])
          ([('Dense_0', 'dot_general0_lhs'), ('Dense_1', 'dot_general0_lhs')], ['Dense_0', 'output0', 'relu0_out'])
        """
        if not _is_float_array(x):
            return x
        ann = lookup(x)
        if ann is not None:
            return ann.value
        return self.annotate(frame, name, x).value

    def annotate(self, frame: Any, name: str, x: jax.Array, qparams: tuple | None = None) -> Annotation:
        """Annotate ``x`` with the parameters of statistic ``name`` (or the given ``(scale, zp)``).

        Example (the tensors a small MLP annotates, by module path and statistic name):
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> from flax_integration import OdmlQatProvider, QuantizationRule, quantize_model
          >>> class MLP(nn.Module):
          ...     @nn.compact
          ...     def __call__(self, x):
          ...         h = nn.relu(nn.Dense(4)(x))
          ...         return nn.Dense(2)(h)
          >>> class Logged(OdmlQatProvider):
          ...     calls = []
          ...     def annotate(self, frame, name, x, qparams=None):
          ...         self.calls.append((frame.path, name))
          ...         return super().annotate(frame, name, x, qparams)
          >>> qat = quantize_model(MLP(), Logged([QuantizationRule(weight_qtype='int8', act_qtype='int8')]))
          >>> _ = qat.init(jax.random.key(0), jnp.ones((2, 8)))
          >>> Logged.calls
          [('Dense_0', 'dot_general0_lhs'), ('', 'relu0_out'), ('', 'output0')]
        """
        scale, zp = self.act_qparams(frame, name, x) if qparams is None else qparams
        ann = register(x, Annotation(self.fake_quant_act(x, scale, zp), scale, zp, x))
        run = odml_ops.current_run()
        if run is not None and id(x) in run.marked:
            run.io['inputs'][run.marked[id(x)]] = (scale, zp)
        return ann

    def batch_range(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per-tensor (lo, hi) of one batch, shape (1,).

        Example:
          >>> import jax.numpy as jnp
          >>> from flax_integration import OdmlQatProvider
          >>> lo, hi = OdmlQatProvider([]).batch_range(jnp.array([[-1.0, 3.0], [0.5, 2.0]]))
          >>> lo.tolist(), hi.tolist()
          ([-1.0], [3.0])
        """
        lo, hi = act_range(jax.lax.stop_gradient(x), 'int8', (), None, self.act_calibration_method)
        return lo.reshape(1), hi.reshape(1)

    def act_qparams(self, frame: Any, name: str, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """(scale, zero point) from the running average in ``quant_stats`` (updated when mutable).

        Example (at init, before any statistics, a tensor's own batch range; minmax is asymmetric):
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> from flax_integration import OdmlQatProvider, QuantizationRule, quantize_model
          >>> class Logged(OdmlQatProvider):
          ...     calls = []
          ...     def act_qparams(self, frame, name, x):
          ...         scale, zp = super().act_qparams(frame, name, x)
          ...         self.calls.append((name, round(float(scale[0]) * 255, 3), int(zp[0])))
          ...         return scale, zp
          >>> qat = quantize_model(nn.Dense(4), Logged([QuantizationRule(weight_qtype='int8', act_qtype='int8')]))
          >>> _ = qat.init(jax.random.key(0), jnp.linspace(-1, 1, 16).reshape(2, 8))
          >>> Logged.calls[0]  # the input: range [-1, 1] is 255 steps of 2 / 255
          ('dot_general0_lhs', 2.0, -1)
        """
        lo, hi = self.batch_range(x)
        stat = frame.get_stat(name)
        if stat is None:
            stat = {'lo': jnp.zeros_like(lo), 'hi': jnp.zeros_like(hi), 'count': jnp.zeros((), jnp.int32)}
            frame.put_stat(name, stat)
        stat = unbox_leaves(stat)
        if frame.can_update_stats():
            stat = update_moving_average(stat, lo, hi)
            frame.put_stat(name, stat)
        seen = stat['count'] > 0  # before any statistics (init): this batch's range
        lo, hi = jnp.where(seen, stat['lo'], lo), jnp.where(seen, stat['hi'], hi)
        return range_to_scale(lo, hi, 'int8', self.act_calibration_method)

    def fake_quant_act(self, x: jax.Array, scale: Any, zero_point: Any) -> jax.Array:
        """Per-tensor int8 fake quant with a clipped straight-through gradient.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax_integration import OdmlQatProvider
          >>> fq = lambda x: OdmlQatProvider([]).fake_quant_act(x, jnp.array([0.5]), None)
          >>> fq(jnp.array([0.26, -1.0, 100.0])).tolist()  # steps of 0.5, clipped at 127 * 0.5
          [0.5, -1.0, 63.5]
          >>> jax.grad(lambda x: fq(x).sum())(jnp.array([0.26, -1.0, 100.0])).tolist()
          [1.0, 1.0, 0.0]
        """
        s = _full_rank(scale, x.ndim).astype(jnp.float32)
        z = None if zero_point is None else _full_rank(zero_point, x.ndim)
        return _fake_quant.fake_quant_with_scale(x, 'int8', s, z)

    def fixed_qparams(self, name: str) -> tuple[Any, Any]:
        """The output (scale, zero point) LiteRT's int8 kernel of ``name`` requires (softmax, sigmoid, tanh...).

        Example:
          >>> from flax_integration import OdmlQatProvider
          >>> scale, zp = OdmlQatProvider([]).fixed_qparams('softmax')
          >>> scale.tolist(), zp.tolist()
          ([0.00390625], [-128])
        """
        s, z = odml_ops.FIXED_QPARAMS[name]
        return jnp.full((1,), s, jnp.float32), jnp.full((1,), z, jnp.int8)

    # --- other ops (relu, softmax, pooling, concat, add, ...) ------------------------------
    def process_extra_op(self, e: ExtraOp) -> Any:
        """Annotate around one intercepted non-matmul op (see ``odml_ops``).

        Example (``nn.relu`` looked up while the model runs is intercepted; its output gets a statistic):
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> from flax_integration import OdmlQatProvider, QuantizationRule, quantize_model
          >>> class MLP(nn.Module):
          ...     @nn.compact
          ...     def __call__(self, x):
          ...         h = nn.relu(nn.Dense(4)(x))
          ...         return nn.Dense(2)(h)
          >>> qat = quantize_model(MLP(), OdmlQatProvider([QuantizationRule(weight_qtype='int8', act_qtype='int8')]))
          >>> sorted(qat.init(jax.random.key(0), jnp.ones((2, 8)))['quant_stats'])
          ['Dense_0', 'output0', 'relu0_out']
        """
        rule = self.rules.match(e.frame.path, None)
        if rule is None or rule.act_qtype is None:
            return e.original(*e.args, **e.kwargs)
        return getattr(self, f'_extra_{odml_ops.KINDS[e.name]}')(e)

    def _extra_reshape(self, e: ExtraOp) -> Any:
        x, run = e.args[0], odml_ops.current_run()
        ann = lookup(x)
        if ann is None and _is_float_array(x) and id(x) in run.marked:
            # a model input reshaped before any op annotated it: annotate it first, so the reshape is int8
            ann = self.annotate(run.root_frame or e.frame, f'input{run.marked[id(x)]}', x)
            x = ann.value
        y = e.original(x, *e.args[1:], **e.kwargs)
        if ann is not None and ann.value is x:  # an annotated tensor stays annotated
            register(y, Annotation(y, ann.scale, ann.zero_point, None))
        return y

    def _extra_act(self, e: ExtraOp) -> Any:
        y = e.original(*e.args, **e.kwargs)
        op_id = e.frame.next_op_id(e.name)
        return self.annotate(e.frame, f'{op_id}_out', y).value

    def _extra_fixed(self, e: ExtraOp) -> Any:
        op_id = e.frame.next_op_id(e.name)
        x = self.annotate_input(e.frame, f'{op_id}_in', e.args[0])
        y = e.original(x, *e.args[1:], **e.kwargs)
        return self.annotate(e.frame, f'{op_id}_out', y, self.fixed_qparams(e.name)).value

    def _extra_same(self, e: ExtraOp) -> Any:
        op_id = e.frame.next_op_id(e.name)
        x = self.annotate_input(e.frame, f'{op_id}_in', e.args[0])
        y = e.original(x, *e.args[1:], **e.kwargs)
        ann = lookup(x)
        if ann is None:
            return y
        return self.annotate(e.frame, f'{op_id}_out', y, (ann.scale, ann.zero_point)).value

    def _extra_nary(self, e: ExtraOp) -> Any:
        op_id = e.frame.next_op_id(e.name)
        first = e.args[0]
        if isinstance(first, (list, tuple)):
            first = type(first)(self.annotate_input(e.frame, f'{op_id}_in{i}', a) for i, a in enumerate(first))
        else:
            first = self.annotate_input(e.frame, f'{op_id}_in0', first)
        y = e.original(first, *e.args[1:], **e.kwargs)
        if not _is_float_array(y):
            return y
        return self.annotate(e.frame, f'{op_id}_out', y).value

    def _extra_binary(self, e: ExtraOp) -> Any:
        args = list(e.args[:2])
        if len(e.args) != 2 or e.kwargs or not all(_is_float_array(a) for a in args):
            return e.original(*e.args, **e.kwargs)  # a constant operand (bias, scalar): not an activation op
        shape = jnp.broadcast_shapes(args[0].shape, args[1].shape)
        known = [lookup(a) is not None for a in args]
        if not any(known) or any(not k and a.shape != shape for a, k in zip(args, known)):
            return e.original(*args)
        op_id = e.frame.next_op_id(e.name)
        args = [self.annotate_input(e.frame, f'{op_id}_in{i}', a) for i, a in enumerate(args)]
        y = e.original(*args)
        return self.annotate(e.frame, f'{op_id}_out', y).value

    # --- model output ----------------------------------------------------------------------
    def _output_rule(self) -> QuantizationRule | None:
        return next((r for r in self.rules.rules if r.act_qtype is not None), None)

    def process_model_output(self, output: Any) -> Any:
        """Annotate each float output (``output0``, ``output1``, ... in the root module).

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> from flax_integration import OdmlQatProvider, QuantizationRule, quantize_model
          >>> p = OdmlQatProvider([QuantizationRule(weight_qtype='int8', act_qtype='int8')])
          >>> v = quantize_model(nn.Dense(4), p).init(jax.random.key(0), jnp.ones((2, 8)))
          >>> 'output0' in v['quant_stats'], len(p.last_io['outputs'])
          (True, 1)
        """
        run = odml_ops.current_run()
        if run is None or run.provider is not self:
            return output
        with _interception.provider_code():
            leaves, tree = jax.tree.flatten(output)
            if self._output_rule() is not None and run.root_frame is not None:
                outs = []
                for i, leaf in enumerate(leaves):
                    if not _is_float_array(leaf):
                        outs.append(leaf)
                        continue
                    ann = lookup(leaf)
                    if ann is None or ann.value is not leaf:
                        ann = self.annotate(run.root_frame, f'output{i}', leaf)
                    run.io['outputs'].append((ann.scale, ann.zero_point))
                    outs.append(ann.value)
                leaves = outs
            self.last_io = {'inputs': dict(run.io['inputs']), 'outputs': list(run.io['outputs'])}
            return jax.tree.unflatten(tree, leaves)
