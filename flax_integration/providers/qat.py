"""Quantization-aware training: the float model computes what its PTQ version will compute.

:class:`QtProvider` (alias :class:`QatProvider`) takes the same rules as
:class:`~flax_integration.providers.ptq.PtqProvider`. Params stay float (they
are what trains); every matched op fake-quantizes its operands with the PTQ
layouts, rounding and ranges, then runs the float op:

* **weights**: ``qarray.fake_quant`` with the weight layout of the op (one
  scale per output channel, tiled along the contracting axis with
  ``tile_size``) and ``weight_calibration_method`` -- the forward value is
  ``dequantize(quantize(w))`` bit for bit, exactly what
  ``quantize_params`` will store;
* **dynamic activations**: the same, with the per-token layout;
* **static activations** (``act_static_scale=True``): the range comes from
  the ``quant_stats`` collection -- ``{'lo', 'hi', 'count'}`` under
  ``<op_id>_lhs`` / ``<op_id>_rhs``, the same names and shapes as
  :class:`~flax_integration.providers.calibration.CalibrationProvider`, so
  a QAT model can start from calibrated statistics and its statistics feed
  ``quantize_params(qat_params, abstract_ptq_params, quant_stats)`` directly.
  While training the statistics are updated first (the batch range is folded
  into a running average: the plain mean of the batches seen for the first
  ``1 / (1 - momentum)`` steps, an exponential moving average after that) and
  the updated range quantizes the batch; at eval they are frozen.

  Training vs eval: Linen updates when ``quant_stats`` is mutable
  (``apply(..., mutable=['quant_stats'])``), and freezes otherwise. NNX
  follows the BatchNorm convention: the modules get a
  ``use_running_average`` attribute (False), so ``model.eval()`` freezes the
  statistics and ``model.train()`` resumes updating them. A model whose
  statistics were never updated (count 0) quantizes with the batch's own
  range.

Gradients are straight-through: the gradient of ``fake_quant(x)`` is 1 where
``x`` lies inside the representable range of its scale (the calibrated range
plus half a quantization step) and 0 outside (``ste='clipped'``, default), or 1
everywhere (``ste='plain'``). Scales and statistics get no gradient.

**Quantized backward** (rules with ``bwd_qtype``, e.g.
``QtRule(weight_qtype='int8', act_qtype='int8', bwd_qtype='int8', fwd_quantized=True)``): the op
runs through :func:`qarray.ops.qt_dot.quantized_training_op`, a ``jax.custom_vjp`` whose forward is
the fake-quantized op above (or, with ``fwd_quantized=True``, the real quantized op PTQ runs: int8 x
int8 -> int32, fp8 dots) and whose two backward contractions (gradient w.r.t. the activation and
w.r.t. the weight) run quantized too, each quantizing its own operands along its own non-contracting
axes with ``bwd_qtype`` (the activation or weight re-quantized in that layout, in its forward format
unless ``bwd_residual_qtype`` says otherwise). Covers ``dot_general``/``einsum``/``conv`` and
``ragged_dot`` (its plain form); ops on already-quantized operands (a frozen QArray base) keep the
float backward. With ``bwd_stochastic_rounding='uniform'`` the gradient operands round stochastically
with a key from the ``'quant'`` rng stream (Linen: ``apply(..., rngs={'quant': key})``; NNX: an
``nnx.Rngs`` with a ``quant`` stream held by the model or the running module, e.g.
``model.rngs = nnx.Rngs(quant=0)``; Qwix's stream name ``'stochastic_rounding'`` is accepted too),
folded with a hash of the op's path and id: the same key gives the same gradients. Asking for it
without the stream raises ``ValueError`` (at init no gradient is taken and no key is needed).

After training, ``quantize_params(qat_params, abstract_ptq_params,
quant_stats)`` gives the PTQ params; the PTQ model's output equals the QAT
model's eval output up to float rounding (the PTQ matmul may accumulate in
integers where QAT sums dequantized floats).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import linen as nn
  >>> import flax_integration as fi
  >>> rules = [fi.QuantizationRule(weight_qtype='int4', act_qtype='int8', act_static_scale=True)]
  >>> qat = fi.quantize_model(nn.Dense(4), fi.QtProvider(rules))
  >>> v = qat.init(jax.random.key(0), jnp.ones((2, 8)))
  >>> y, upd = qat.apply(v, jnp.ones((2, 8)), mutable=['quant_stats'])
  >>> int(upd['quant_stats']['dot_general0_lhs']['count'])
  1
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

import qarray
from qarray import _fake_quant
from qarray._array import QArray
from qarray._fake_quant import fake_quant_with_scale
from qarray.ops.qt_dot import BackwardQuant, ForwardQuant, quantized_training_op


from flax_integration.providers.calibration import update_moving_average
from flax_integration.wrappers import as_operand
from flax_integration.providers.base import (Op, Provider, quantizes_activations, range_to_scale, static_act_range,
                                             static_scale_rows)
from flax_integration.rules import QuantizationRule

__all__ = ['QtProvider', 'QatProvider', 'QUANT_RNG_STREAMS']

#: rng streams the stochastic rounding of quantized backward passes draws from, first found wins
#: (``'stochastic_rounding'`` is Qwix's name).
QUANT_RNG_STREAMS = ('quant', 'stochastic_rounding')
_TRAINED_OPS = ('dot_general', 'einsum', 'conv_general_dilated', 'ragged_dot')

# --------------------------------------------------------------------------- provider
class QtProvider(Provider):
    """QAT provider: fake quantization with the PTQ numerics and straight-through gradients.

    Args:
      rules: the same :class:`QuantizationRule` list as for PTQ.
      ste: ``'clipped'`` (gradient 0 outside the quantization range) or ``'plain'``.
      momentum: moving-average momentum of static-range statistics (see module docstring).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from flax_integration import QatProvider, QuantizationRule, quantize_model
      >>> qat = quantize_model(nnx.Linear(8, 4, rngs=nnx.Rngs(0)),
      ...                      QatProvider([QuantizationRule(weight_qtype='int4')], ste='plain'), jnp.ones((1, 8)))
      >>> type(qat.kernel).__name__, qat.qarray_provider.ste  # weights stay float; the forward fake-quantizes
      ('Param', 'plain')
    """

    def __init__(self, rules: Sequence[QuantizationRule], *, ste: str = 'clipped', momentum: float = 0.99):
        super().__init__(rules)
        if ste not in ('clipped', 'plain'):
            raise ValueError(f"ste must be 'clipped' or 'plain'; got {ste!r}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {momentum!r}.")
        self.ste = ste
        self.momentum = float(momentum)

    def process_op(self, op: Op) -> jax.Array:
        """Compute the op on fake-quantized operands: what the PTQ model will compute, in float.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> from flax_integration import PtqProvider, QtProvider, QuantizationRule, quantize_model, quantize_params
          >>> rules = [QuantizationRule(weight_qtype='int4', act_qtype='int8')]
          >>> x, key = jax.random.normal(jax.random.key(1), (2, 16)), jax.random.key(0)
          >>> qat, ptq = quantize_model(nn.Dense(4), QtProvider(rules)), quantize_model(nn.Dense(4), PtqProvider(rules))
          >>> fp = qat.init(key, x)['params']
          >>> q = quantize_params(fp, jax.eval_shape(ptq.init, key, x)['params'])
          >>> bool(jnp.allclose(qat.apply({'params': fp}, x), ptq.apply({'params': q}, x), atol=1e-5))
          True
        """
        rule = op.rule
        operands = [as_operand(x) for x in op.call.operands]
        if rule is None:
            return op.call.run(*operands)
        if rule.quantized_backward and self._trains_quantized(op, operands):
            return self.quantized_training(op, operands)
        w = op.weight
        if w is not None and rule.weight_qtype is not None and not w.quantized:
            operands[w.index] = self.fake_quant_weight(op, operands[w.index])
        if rule.act_qtype is not None and quantizes_activations(op.call):
            for i in op.act_indices():
                operands[i] = self.fake_quant_activation(op, i, operands[i])
        return op.call.run(*operands)

    # --- quantized backward ----------------------------------------------------------------
    @staticmethod
    def _trains_quantized(op: Op, operands: list) -> bool:
        """Whether the op goes through the quantized-training custom VJP: a contraction of two float arrays."""
        if op.call.name not in _TRAINED_OPS:
            return False
        return all(not isinstance(x, QArray) and jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in operands)

    def quantized_training(self, op: Op, operands: list) -> jax.Array:
        """Run ``op`` through :func:`qarray.ops.qt_dot.quantized_training_op`: forward quantized as QAT
        (fake, or real with ``fwd_quantized``), both backward contractions quantized with ``bwd_qtype``.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> import flax_integration as fi
          >>> rule = fi.QtRule(weight_qtype='int8', act_qtype='int8', bwd_qtype='int8', fwd_quantized=True)
          >>> m = fi.quantize_model(nn.Dense(3), fi.QtProvider([rule]))
          >>> v = m.init(jax.random.key(0), jnp.ones((2, 4)))
          >>> step = lambda p, x: jax.grad(lambda p: m.apply({'params': p}, x).sum())(p)
          >>> hlo = jax.jit(step).lower(v['params'], jnp.ones((2, 4))).as_text(dialect='hlo')
          >>> sum('= s32[' in line and ' dot(' in line for line in hlo.splitlines())  # the kernel's gradient
          1
        """
        rule, call = op.rule, op.call
        fwd = [self._forward_quant(op, i, operands[i]) for i in (0, 1)]
        bwd = None
        if rule.bwd_qtype is not None:
            residual = [rule.bwd_residual_qtype or (f.qtype if f is not None else rule.bwd_qtype) for f in fwd]
            tiles = [rule.bwd_tile_size, rule.bwd_tile_size]
            if op.weight is not None and rule.bwd_weight_grad_tile_size is not None:
                tiles[op.weight.index] = rule.bwd_weight_grad_tile_size
            bwd = BackwardQuant(rule.bwd_qtype, rule.bwd_calibration_method, tuple(residual), tiles[0], tiles[1],
                                rule.bwd_stochastic_rounding is not None, rule.bwd_use_original_residuals)
        key = self._rounding_key(op) if bwd is not None and bwd.stochastic_rounding else None
        fn, extra = self._bilinear(op)
        try:
            return quantized_training_op(fn, operands[0], operands[1], *extra, lhs_fwd=fwd[0], rhs_fwd=fwd[1],
                                         bwd=bwd, fwd_quantized=rule.fwd_quantized, key=key)
        except (ValueError, TypeError) as e:
            e.add_note(f"While running {op.describe()} with a quantized backward (bwd_qtype={rule.bwd_qtype!r}).")
            raise

    def _forward_quant(self, op: Op, i: int, x: jax.Array) -> ForwardQuant | None:
        """How the forward quantizes operand ``i`` (the layouts of :meth:`fake_quant_weight` /
        :meth:`fake_quant_activation`), or None to keep it float."""
        rule = op.rule
        if op.weight is not None and i == op.weight.index:
            if rule.weight_qtype is None:
                return None
            cw, tiles = self.weight_layout(op)
            return ForwardQuant(rule.weight_qtype, tuple(cw), tiles, rule.weight_calibration_method, self.ste,
                                rule.weight_scale_qtype)
        if rule.act_qtype is None or not quantizes_activations(op.call):
            return None
        if not rule.act_static_scale:
            cw, tiles = op.call.layout(i, 'act', op.tile_size, qtype=rule.act_qtype)
            return ForwardQuant(rule.act_qtype, tuple(cw), tiles, rule.act_calibration_method, self.ste)
        lo, hi = self._static_range(op, i, x)
        scale, zp = range_to_scale(lo, hi, rule.act_qtype, rule.act_calibration_method, x.dtype)
        scale, zp = static_scale_rows(op, i, scale.astype(jnp.float32), zp)
        return ForwardQuant(rule.act_qtype, ste=self.ste, scale=scale, zero_point=zp)

    @staticmethod
    def _bilinear(op: Op) -> tuple[Callable[..., jax.Array], tuple]:
        """The op as ``fn(lhs, rhs, *extra)`` closing over static arguments only, and its traced ``extra``."""
        call = op.call
        if call.name != 'ragged_dot':
            return (lambda a, b: call.run(a, b)), ()
        if (call.kept, call.contract) != (((0,), (0, 2)), ((1,), (1,))):
            raise ValueError(f"{op.describe()}: bwd_qtype covers ragged_dot in its plain form (lhs[M, K], "
                             f"rhs[G, K, N]); this ragged_dot_general keeps {call.kept} and contracts "
                             f"{call.contract}. Use jax.lax.ragged_dot, or a rule without bwd_qtype here.")
        return (lambda a, b, group_sizes: qarray.ops.ragged_dot(a, b, group_sizes)), (call.group_sizes,)

    @staticmethod
    def _rounding_key(op: Op) -> jax.Array:
        """The stochastic-rounding key of ``op``: from the ``'quant'`` stream, folded with the op's path and id."""
        key = quant_rng(op.frame)
        if key is None:
            if op.frame is not None and op.frame.initializing:
                return jax.random.key(0)  # init takes no gradient; the key is never used
            raise ValueError(
                f"{op.describe()}: rule module_path={op.rule.module_path!r} sets "
                f"bwd_stochastic_rounding={op.rule.bwd_stochastic_rounding!r}, which needs the 'quant' rng stream: "
                "Linen: model.apply(variables, ..., rngs={'quant': jax.random.key(0)}); NNX: give the model an "
                "nnx.Rngs with a quant stream (model.rngs = nnx.Rngs(quant=0)). Or set "
                "bwd_stochastic_rounding=None.")
        return jax.random.fold_in(key, zlib.crc32(f"{op.path}/{op.op_id}".encode()) & 0x7FFFFFFF)

    # --- weights ---------------------------------------------------------------------------
    def fake_quant_weight(self, op: Op, value: jax.Array) -> jax.Array:
        """The weight as PTQ will store it (dequantized), with the straight-through gradient.

        Example:
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax_integration import PtqProvider, QtProvider, QuantizationRule
          >>> from flax_integration._op_table import dot_general_call
          >>> from flax_integration.providers import Op, Weight
          >>> w = jax.random.normal(jax.random.key(0), (16, 4))
          >>> call = dot_general_call(qarray.dot_general, jax.lax.dot_general, jnp.ones((2, 16)), w,
          ...                         (((1,), (0,)), ((), ())))
          >>> op = Op(call, None, QuantizationRule(weight_qtype='int4'), Weight(1, 'kernel', w), 'dot_general0')
          >>> fq = QtProvider([]).fake_quant_weight(op, w)
          >>> bool((fq == qarray.dequantize(PtqProvider([]).quantize_weight_value(op, w).array)).all())
          True
          >>> jax.grad(lambda w: QtProvider([], ste='plain').fake_quant_weight(op, w).sum())(w)[0, :2].tolist()
          [1.0, 1.0]
        """
        rule = op.rule
        cw, tiles = self.weight_layout(op)
        try:
            return _fake_quant.fake_quant(value, rule.weight_qtype, channelwise_axes=cw, tiles=tiles,
                                          calibration=rule.weight_calibration_method, ste=self.ste,
                                          scale_qtype=rule.weight_scale_qtype)
        except (ValueError, TypeError) as e:
            e.add_note(f"While fake-quantizing {op.describe()}, weight {op.weight.name!r} of shape {value.shape}.")
            raise

    # --- activations -----------------------------------------------------------------------
    def fake_quant_activation(self, op: Op, i: int, x: Any) -> Any:
        """Activation operand ``i`` as PTQ will quantize it: per token, or with the static range.

        Example:
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax_integration import PtqProvider, QtProvider, QuantizationRule
          >>> from flax_integration._op_table import dot_general_call
          >>> from flax_integration.providers import Op, Weight
          >>> x = jax.random.normal(jax.random.key(0), (2, 16))
          >>> call = dot_general_call(qarray.dot_general, jax.lax.dot_general, x, jnp.ones((16, 4)),
          ...                         (((1,), (0,)), ((), ())))
          >>> op = Op(call, None, QuantizationRule(act_qtype='int8'), Weight(1, 'kernel', None), 'dot_general0')
          >>> fq = QtProvider([]).fake_quant_activation(op, 0, x)
          >>> bool((fq == qarray.dequantize(PtqProvider([]).activation(op, 0, x))).all())
          True
        """
        rule = op.rule
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x
        try:
            if not rule.act_static_scale:
                cw, tiles = op.call.layout(i, 'act', op.tile_size, qtype=rule.act_qtype)
                return _fake_quant.fake_quant(x, rule.act_qtype, channelwise_axes=cw, tiles=tiles,
                                       calibration=rule.act_calibration_method, ste=self.ste)
            lo, hi = self._static_range(op, i, x)
            scale, zp = range_to_scale(lo, hi, rule.act_qtype, rule.act_calibration_method, x.dtype)
            scale, zp = static_scale_rows(op, i, scale.astype(jnp.float32), zp)
            return fake_quant_with_scale(x, rule.act_qtype, scale, zp, ste=self.ste)
        except (ValueError, TypeError) as e:
            e.add_note(f"While fake-quantizing {op.describe()}, activation of shape {tuple(x.shape)}.")
            raise

    def _static_range(self, op: Op, i: int, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Range for a static-scale operand; updates ``quant_stats`` when training."""
        rule, frame = op.rule, op.frame
        lo, hi = static_act_range(op, i, jax.lax.stop_gradient(x))
        name = op.act_name(i)
        stat = frame.get_stat(name)
        if stat is None:  # first sight (Linen init / NNX quantize_model): zeros, count 0, as calibration does
            stat = {'lo': jnp.zeros_like(lo), 'hi': jnp.zeros_like(hi), 'count': jnp.zeros((), jnp.int32)}
            frame.put_stat(name, stat)
        if frame.initializing:
            return lo, hi
        if frame.can_update_stats():
            stat = jax.tree.map(jax.lax.stop_gradient, update_moving_average(stat, lo, hi, self.momentum))
            frame.put_stat(name, stat)
            return stat['lo'], stat['hi']
        never = stat['count'] == 0  # eval before any training step: the batch's own range
        return jnp.where(never, lo, stat['lo']), jnp.where(never, hi, stat['hi'])



def quant_rng(frame: Any) -> jax.Array | None:
    """A fresh key from the first of :data:`QUANT_RNG_STREAMS` the running module has, or None.

    Asks the frame (Linen: the rngs given to ``apply``; NNX: an ``nnx.Rngs`` with such a stream held as an
    attribute of the running module or of the model, since NNX threads no rngs through calls).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> import flax_integration as fi
      >>> from flax_integration.providers.qat import quant_rng
      >>> class Probe(fi.Provider):
      ...     def process_op(self, op):
      ...         print(quant_rng(op.frame) is not None)
      ...         return op.call.run_original()
      >>> m = fi.quantize_model(nn.Dense(2), Probe([]))
      >>> v = m.init(jax.random.key(0), jnp.ones((1, 3)))
      False
      >>> _ = m.apply(v, jnp.ones((1, 3)), rngs={'quant': jax.random.key(1)})
      True
    """
    if frame is None:
        return None
    for stream in QUANT_RNG_STREAMS:
        key = frame.rng(stream)
        if key is not None:
            return key
    return None


QatProvider = QtProvider
