"""Static-range calibration: collect activation statistics while the float model runs.

For every op whose rule has ``act_static_scale=True``, each activation
operand's calibrated range ``(lo, hi)`` (the rule's ``act_calibration_method``
on the static layout: shared over batch/sequence, tiled like the weight) is
folded into a running average over batches, stored in the ``quant_stats``
collection (Linen) or as :class:`QuantStat` variables (NNX) under
``<op_id>_lhs`` / ``<op_id>_rhs``::

    quant_stats = {'Dense_0': {'dot_general0_lhs': {'lo': ..., 'hi': ..., 'count': ...}}}

For every op with a weight whose rule has ``weight_algorithm='gptq'``, the
token-weighted mean of ``x x^T`` over the activation's contracting axis (tokens
above ``gptq_token_clip`` times the batch's median token norm scaled down to it)
is kept under ``<op_id>_hessian`` as ``{'hessian': [K, K], 'tokens', 'count'}``
(padding tokens count like any other: feed unpadded batches where that
matters). With ``rotation`` the ranges are those of the rotated activation,
as PTQ will quantize it; the Hessian is kept unrotated.

Shapes depend only on the contracting axis (and tiles), never on batch size
or sequence length (a ``ragged_dot`` whose rule keeps the ragged axis, ``act_batch_axes=()``, keeps one
range per expert: ``[G, 1]``). The model computes in float. Give the statistics to
``quantize_params(fp_params, abstract_ptq_params, quant_stats)``; the
:func:`~flax_integration._calibrate` helper runs the loop.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import linen as nn
  >>> import flax_integration as fi
  >>> rules = [fi.QuantizationRule(weight_qtype='int8', act_qtype='int8', act_static_scale=True)]
  >>> m = fi.quantize_model(nn.Dense(4), fi.CalibrationProvider(rules))
  >>> v = m.init(jax.random.key(0), jnp.ones((2, 8)))
  >>> v['quant_stats']['dot_general0_lhs']['hi'].shape
  (1, 1)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qarray import gptq
from qarray import rotation as rotation_lib

from flax_integration.providers.base import Op, Provider, hessian_name, quantizes_activations, static_act_range

__all__ = ['CalibrationProvider', 'update_moving_average']


def update_moving_average(stat: dict, lo: jax.Array, hi: jax.Array, momentum: float = 1.0) -> dict:
    """Fold one batch's range into ``{'lo', 'hi', 'count'}``: mean of the first batches, then an EMA.

    The new batch weighs ``max(1 / count, 1 - momentum)``. ``momentum=1.0`` (the
    calibration default) is the plain running mean; QAT's ``0.99`` averages the
    first 100 batches equally (no bias towards the zero initial value) and then
    decays with a 100-step window, since activations drift while weights train.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax_integration.providers.calibration import update_moving_average
      >>> s = {'lo': jnp.zeros(1), 'hi': jnp.zeros(1), 'count': jnp.zeros((), jnp.int32)}
      >>> s = update_moving_average(s, jnp.array([-1.]), jnp.array([1.]))
      >>> s = update_moving_average(s, jnp.array([-3.]), jnp.array([3.]))
      >>> s['hi'].tolist(), int(s['count'])
      ([2.0], 2)
      >>> s = update_moving_average(s, jnp.array([-8.]), jnp.array([8.]), momentum=0.5)
      >>> s['hi'].tolist()
      [5.0]
    """
    count = stat['count'] + 1
    w = jnp.maximum(1.0 / count.astype(jnp.float32), 1.0 - momentum)
    return {'lo': stat['lo'] + (lo - stat['lo']) * w, 'hi': stat['hi'] + (hi - stat['hi']) * w,
            'count': count}


class CalibrationProvider(Provider):
    """Runs the model in float and records activation ranges for static-scale rules.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from flax_integration import CalibrationProvider, QuantizationRule, quantize_model
      >>> p = CalibrationProvider([QuantizationRule(act_qtype='int8', act_static_scale=True)])
      >>> m = quantize_model(nn.Dense(4), p)
      >>> v = m.init(jax.random.key(0), jnp.ones((2, 8)))
      >>> _, upd = m.apply(v, jnp.full((2, 8), -3.0), mutable=['quant_stats'])
      >>> upd['quant_stats']['dot_general0_lhs']['hi'].tolist()  # absmax: symmetric range
      [[3.0]]
    """

    supports_weight_transforms = True

    def process_op(self, op: Op) -> jax.Array:
        """Record the op's activation range (and GPTQ statistic) where its rule asks; compute in float.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> from flax_integration import CalibrationProvider, QuantizationRule, quantize_model
          >>> rules = [QuantizationRule(weight_qtype='int4', weight_algorithm='gptq')]
          >>> m = quantize_model(nn.Dense(4), CalibrationProvider(rules))
          >>> x = jnp.ones((2, 8))
          >>> v = m.init(jax.random.key(0), x)
          >>> y, upd = m.apply(v, x, mutable=['quant_stats'])
          >>> bool((y == nn.Dense(4).apply(v, x)).all()), upd['quant_stats']['dot_general0_hessian']['hessian'].shape
          (True, (8, 8))
        """
        rule = op.rule
        if rule is not None and rule.act_static_scale and quantizes_activations(op.call):
            for i in op.act_indices():
                self._observe(op, i)
        if rule is not None and rule.weight_algorithm == 'gptq' and op.weight is not None:
            self._observe_hessian(op)
        return op.call.run_original()

    def _observe(self, op: Op, i: int) -> None:
        x = op.call.operands[i]
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return
        rule = op.rule
        if rule.rotation is not None and op.weight is not None:  # PTQ quantizes the rotated activation
            axis = self.transform_axes(op)[1]
            x = rotation_lib.rotate(x, axis, block=rotation_lib.block_size(x.shape[axis]))
        try:
            lo, hi = static_act_range(op, i, jax.lax.stop_gradient(x))
        except ValueError as e:
            e.add_note(f"While calibrating {op.describe()}, activation of shape {tuple(x.shape)}.")
            raise
        name = op.act_name(i)
        stat = op.frame.get_stat(name)
        if stat is None:  # first sight (Linen init / NNX quantize_model): zeros, count 0
            stat = {'lo': jnp.zeros_like(lo), 'hi': jnp.zeros_like(hi),
                    'count': jnp.zeros((), jnp.int32)}
            op.frame.put_stat(name, stat)
            if op.frame.initializing:
                return
        if op.frame.can_update_stats():
            op.frame.put_stat(name, update_moving_average(stat, lo, hi))

    def _observe_hessian(self, op: Op) -> None:
        """Fold this batch into the token-weighted mean of ``x x^T`` over the contracting axis (for GPTQ)."""
        _, axis = self.transform_axes(op)
        x = jax.lax.stop_gradient(op.call.operands[1 - op.weight.index])
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return
        tokens = jnp.float32(x.size // x.shape[axis])
        h = gptq.hessian(x, axis, token_clip=op.rule.gptq_token_clip) / tokens
        name = hessian_name(op)
        stat = op.frame.get_stat(name)
        if stat is None:
            stat = {'hessian': jnp.zeros_like(h), 'tokens': jnp.zeros((), jnp.float32),
                    'count': jnp.zeros((), jnp.int32)}
            op.frame.put_stat(name, stat)
            if op.frame.initializing:
                return
        if op.frame.can_update_stats():
            total = stat['tokens'] + tokens
            op.frame.put_stat(name, {'hessian': stat['hessian'] + (h - stat['hessian']) * (tokens / total),
                                     'tokens': total, 'count': stat['count'] + 1})
