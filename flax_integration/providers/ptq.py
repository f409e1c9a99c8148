"""Post-training quantization: quantized weights in the params, quantized activations at run time.

* **Weights** are quantized once and stored as
  :class:`~flax_integration.wrappers.QuantizedParam` in the params (Linen) or
  module state (NNX): at ``init`` (Linen) or in ``quantize_model`` (NNX), or
  from float weights by :func:`~flax_integration._quantize_params`. One scale
  per output channel (every kept axis), shared or tiled (``tile_size``) along
  the contracting axis.
* **Activations**: dynamic (default) -- one scale per token (every kept axis)
  computed at run time; static (``act_static_scale=True``) -- a fixed
  :class:`~flax_integration.wrappers.ActivationScale` param named
  ``<op_id>_lhs_scale`` / ``<op_id>_rhs_scale``, set from calibration
  statistics by ``quantize_params(..., quant_stats)`` (at ``init`` it is taken
  from the init batch so the model runs before calibration). For a ``ragged_dot`` (mixture of experts) whose
  rule keeps the ragged axis (``act_batch_axes=()``) the static scale is one per expert, applied to the
  rows routed to it.
* **Lookups** (``jnp.take``, e.g. ``nn.Embed``): the table is stored quantized with one scale per row
  (tiled along the features with ``tile_size``); a lookup dequantizes only the rows it gathers, and a
  tied head (``Embed.attend``: ``jnp.dot(query, table.T)``) computes with the same stored table through
  the quantized matmul.
* **GPTQ and rotations** (rules with ``weight_algorithm='gptq'`` or
  ``rotation='hadamard'``): a rotated weight is stored rotated along its
  contracting axis and the activation is rotated to match before it is
  quantized; GPTQ rounding happens in ``quantize_params`` from the Hessian
  statistics ``calibrate`` collects (``init`` rounds to nearest).
* Float weights fed to a PTQ model where a rule says they are quantized raise
  :class:`~flax_integration.providers.base.FloatParamError` instead of
  silently running in float.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import linen as nn
  >>> import flax_integration as fi
  >>> ptq = fi.quantize_model(nn.Dense(4, use_bias=False), fi.PtqProvider([fi.QuantizationRule(weight_qtype='int8')]))
  >>> params = ptq.init(jax.random.key(0), jnp.ones((2, 8)))['params']
  >>> params['kernel'].array.qvalue.dtype
  dtype('int8')
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from qarray import _quantize
from qarray import rotation as rotation_lib

from flax_integration.providers.base import (FloatParamError, Op, Provider, quantizes_activations, range_to_scale,
                                             static_act_range, static_scale_rows)
from flax_integration.wrappers import ActivationScale, QuantizedParam, as_operand, unbox_leaves

__all__ = ['PtqProvider']


class PtqProvider(Provider):
    """Post-training quantization provider (see module docstring).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from flax_integration import PtqProvider, QuantizationRule, quantize_model
      >>> rules = [QuantizationRule(weight_qtype='int4', act_qtype='int8', tile_size=32)]
      >>> q = quantize_model(nnx.Linear(64, 8, rngs=nnx.Rngs(0)), PtqProvider(rules), jnp.ones((1, 64)))
      >>> q.kernel.array.qtype.name, q.kernel.array.scale.shape  # per output channel and per 32 rows
      ('int4', (2, 8))
    """

    supports_weight_transforms = True

    def process_op(self, op: Op) -> jax.Array:
        """Compute the op with its weight and (per its rule) activations quantized; ops no rule matches
        run on the operands as given.

        Example:
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax import linen as nn
          >>> from flax_integration import PtqProvider, QuantizationRule, quantize_model
          >>> x = jax.random.normal(jax.random.key(1), (2, 16))
          >>> ptq = quantize_model(nn.Dense(4), PtqProvider([QuantizationRule(weight_qtype='int8', act_qtype='int8')]))
          >>> v = ptq.init(jax.random.key(0), x)  # init quantizes the weight it creates
          >>> w = qarray.dequantize(v['params']['kernel'].array)
          >>> bool(jnp.allclose(ptq.apply(v, x), x @ w, atol=0.05))  # close to float on the same weight
          True
        """
        rule = op.rule
        operands = [as_operand(x) for x in op.call.operands]
        if rule is None:
            return op.call.run(*operands)
        if op.weight is not None:
            # A weight stored rotated along this contraction is used as stored, with the activation rotated to
            # match; anything else goes through self.weight (which also quantizes and stores it at init).
            rotated = self.rotated_weight(op) if op.weight.quantized else None
            if rotated is None:
                operands[op.weight.index] = self.weight(op)
                rotated = self.rotated_weight(op)  # at init: the param stored just now
            if rotated is not None:
                a = 1 - op.weight.index
                operands[op.weight.index] = rotated[0]
                operands[a] = rotation_lib.rotate(operands[a], self.transform_axes(op)[1], block=rotated[1])
        if rule.act_qtype is not None and quantizes_activations(op.call):
            for i in op.act_indices():
                operands[i] = self.activation(op, i, operands[i])
        return op.call.run(*operands)

    # --- weights ---------------------------------------------------------------------------
    def weight(self, op: Op) -> Any:
        """The weight operand to compute with: a QArray, the float weight if not quantized, or a rotated weight's
        unrotated value (:meth:`process_op` swaps in the rotated QArray where the activation is rotated).

        A float weight where the rule asks for a quantized one is an error after init:

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> from flax_integration import PtqProvider, QuantizationRule, quantize_model
          >>> ptq = quantize_model(nn.Dense(2), PtqProvider([QuantizationRule(weight_qtype='int8')]))
          >>> float_vars = nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 4)))
          >>> ptq.apply(float_vars, jnp.ones((1, 4)))
          Traceback (most recent call last):
          ...
          flax_integration.providers.base.FloatParamError: module '<root>', op dot_general0: param 'kernel' ...
        """
        w, rule = op.weight, op.rule
        if w.quantized:
            return as_operand(w.value)
        if rule.weight_qtype is None:
            return w.value
        if not op.frame.initializing:
            raise FloatParamError(
                f"{op.describe()}: param {w.name!r} is a float array, but rule "
                f"module_path={rule.module_path!r} quantizes it to {rule.weight_qtype}. A PTQ model needs "
                "quantized params: build them with quantize_params(fp_params, abstract_quantized_params) "
                "(Linen) or quantize_model(nnx_model, provider, *inputs) (NNX).")
        stored = unbox_leaves(op.frame.get_param(w.name))
        if isinstance(stored, QuantizedParam):  # a second op on the same weight in this init run
            return self._as_used(w, as_operand(stored))
        qp = self.quantize_weight_value(op, w.value)
        op.frame.put_param(w.name, qp)
        if w.perm is None:
            op.frame.record_alias(w.value, w.name)  # later ops may still see the float object
        return self._as_used(w, as_operand(qp))

    @staticmethod
    def _as_used(w: Any, q: Any) -> Any:
        """The stored param as the op uses it: transposed for a tied head (``w.perm``)."""
        return q if w.perm is None else q.transpose(w.perm)

    # --- activations -----------------------------------------------------------------------
    def activation(self, op: Op, i: int, x: Any) -> Any:
        """Quantize activation operand ``i``: dynamic per-token, or with its static scale.

        Example:
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax_integration import PtqProvider, QuantizationRule
          >>> from flax_integration._op_table import dot_general_call
          >>> from flax_integration.providers import Op, Weight
          >>> x = jnp.array([[1.0, -2.0, 0.5], [4.0, 0.0, 1.0]])
          >>> call = dot_general_call(qarray.dot_general, jax.lax.dot_general, x, jnp.ones((3, 2)),
          ...                         (((1,), (0,)), ((), ())))
          >>> op = Op(call, None, QuantizationRule(act_qtype='int8'), Weight(1, 'kernel', None), 'dot_general0')
          >>> a = PtqProvider([]).activation(op, 0, x)  # dynamic: one scale per row (token)
          >>> a.qtype.name, a.scale.shape
          ('int8', (2, 1))
        """
        rule = op.rule
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x
        if not rule.act_static_scale:
            cw, tiles = op.call.layout(i, 'act', op.tile_size, qtype=rule.act_qtype)
            return self._quantize(op, x, lambda: _quantize.quantize(
                x, rule.act_qtype, channelwise_axes=cw, tiles=tiles, calibration=rule.act_calibration_method))
        name = op.act_name(i) + '_scale'
        stored = op.frame.get_param(name)
        if stored is None:
            if not op.frame.initializing:
                raise ValueError(
                    f"{op.describe()}: the static activation scale {name!r} is missing from the params. Build "
                    "the params with quantize_params(fp_params, abstract_params, quant_stats).")
            lo, hi = self._quantize(op, x, lambda: static_act_range(op, i, x))
            scale, zp = range_to_scale(lo, hi, rule.act_qtype, rule.act_calibration_method, x.dtype)
            stored = ActivationScale(scale, zp, rule.act_qtype, rule.act_calibration_method)
            op.frame.put_param(name, stored)
        stored = unbox_leaves(stored)
        scale, zp = static_scale_rows(op, i, stored.scale.astype(jnp.float32), stored.zero_point)
        return self._quantize(op, x, lambda: _quantize.quantize_with_scale(x, stored.qtype, scale, zp))

    @staticmethod
    def _quantize(op: Op, x, fn):
        try:
            return fn()
        except (ValueError, TypeError) as e:
            e.add_note(f"While quantizing {op.describe()}, activation of shape {tuple(x.shape)}.")
            raise
