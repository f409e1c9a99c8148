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

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from qarray import _fake_quant
from qarray._fake_quant import fake_quant_with_scale

from flax_integration.providers.calibration import update_moving_average
from flax_integration.wrappers import as_operand
from flax_integration.providers.base import (Op, Provider, quantizes_activations, range_to_scale, static_act_range,
                                             static_scale_rows)
from flax_integration.rules import QuantizationRule

__all__ = ['QtProvider', 'QatProvider']

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
        w = op.weight
        if w is not None and rule.weight_qtype is not None and not w.quantized:
            operands[w.index] = self.fake_quant_weight(op, operands[w.index])
        if rule.act_qtype is not None and quantizes_activations(op.call):
            for i in op.act_indices():
                operands[i] = self.fake_quant_activation(op, i, operands[i])
        return op.call.run(*operands)

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


QatProvider = QtProvider
