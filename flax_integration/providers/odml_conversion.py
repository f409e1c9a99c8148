"""ODML conversion: the QAT model's numbers, emitted as ``quant.fake_quant`` composites for LiteRT.

:class:`OdmlConversionProvider` computes, ahead of time and with numpy, the
scales and zero points an :class:`~flax_integration.providers.odml.OdmlQatProvider`
model would use (from the trained params and its ``quant_stats``), and wraps
each fake quant in a ``quant.fake_quant`` composite that the LiteRT converter
turns into int8 tensors. Its JAX numerics equal the QAT model's forward pass.
:func:`flax_integration.litert.export_litert` runs the whole path.

Example:
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from flax_integration.providers.odml_conversion import fake_quant_composite
  >>> y = fake_quant_composite(jnp.array([0.3, -1.0]), 'int8', np.array([0.1]), np.array([0]), narrow_range=False)
  >>> [round(v, 4) for v in y.tolist()]
  [0.3, -1.0]
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qarray import _quantize, qtypes

from flax_integration.providers import _odml_ops as odml_ops
from flax_integration.providers.base import Op, range_to_scale
from flax_integration.providers.odml import _COMPOSITE_DTYPE, OdmlQatProvider
from flax_integration.rules import QuantizationRule
from flax_integration.wrappers import unbox_leaves

__all__ = ['OdmlConversionProvider', 'fake_quant_composite']


def _composite_attrs(qtype: str, scale: np.ndarray, zero_point: np.ndarray | None, narrow_range: bool,
                     axis: int | None) -> dict:
    # The converter needs exactly these types: 1-D float32 scale, 1-D int64 zero point, a Python bool,
    # and the (JAX-layout) axis only when there is more than one scale.
    attrs = dict(dtype=_COMPOSITE_DTYPE[qtype], narrow_range=bool(narrow_range),
                 scale=np.asarray(scale, np.float32).reshape(-1))
    if zero_point is not None:
        attrs['zero_point'] = np.asarray(zero_point, np.int64).reshape(-1)
    if axis is not None and attrs['scale'].size > 1:
        attrs['quantization_dimension'] = int(axis)
    if not np.all(np.isfinite(attrs['scale'])) or np.any(attrs['scale'] <= 0):
        raise ValueError(f"scale: every scale must be finite and positive for LiteRT; got {attrs['scale']}.")
    return attrs


def fake_quant_composite(x: jax.Array, qtype: str, scale: np.ndarray, zero_point: np.ndarray | None, *,
                         narrow_range: bool, axis: int | None = None) -> jax.Array:
    """``quant.fake_quant`` composite: LiteRT reads the attributes; JAX runs the fake quant.

    ``scale``/``zero_point`` are static (numpy): one value, or one per index of ``axis``.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from flax_integration.providers.odml_conversion import fake_quant_composite
      >>> y = fake_quant_composite(jnp.array([0.3, -1.0]), 'int8', np.array([0.1]), np.array([0]),
      ...                          narrow_range=False)
      >>> [round(v, 4) for v in y.tolist()]
      [0.3, -1.0]
      >>> 'quant.fake_quant' in jax.jit(lambda x: fake_quant_composite(x, 'int8', np.array([0.1]), None,
      ...                                                              narrow_range=False)).lower(y).as_text()
      True
    """
    attrs = _composite_attrs(qtype, scale, zero_point, narrow_range, axis)
    shape = [1] * x.ndim
    if axis is not None and attrs['scale'].size > 1:
        shape[axis] = attrs['scale'].size
    s = np.asarray(scale, np.float32).reshape(shape)
    z = None if zero_point is None else np.asarray(zero_point).reshape(shape)

    codes = qtypes.narrow_range(qtype) if narrow_range else qtype  # LiteRT's narrow range: no code -2**(B-1)

    def body(v, **_attrs):
        return _quantize.dequantize(_quantize.quantize_with_scale(v, codes, s, z), v.dtype)

    return jax.lax.composite(body, name='quant.fake_quant')(x, **attrs)


def _nested(tree: Any, parts: Sequence[str]) -> Any:
    for p in parts:
        if tree is None or not hasattr(tree, 'get'):
            return None
        tree = tree.get(p)
    return tree


def _pure(tree: Any) -> Any:
    if tree is None:
        return None
    from flax import nnx
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    return unbox_leaves(tree)


class OdmlConversionProvider(OdmlQatProvider):
    """Emits the QAT model's scales and zero points as ``quant.fake_quant`` composites for LiteRT.

    Args:
      rules: the same rules as for QAT.
      params: the trained float params (Linen ``'params'`` dict; NNX state or
        None to read weights from the model). Used when a weight is not a
        concrete array at trace time.
      quant_stats: the ``quant_stats`` collection from QAT (Linen: the
        ``'quant_stats'`` entry of the variables; NNX: None to read the
        model's own statistics, or a pure dict).
      **kwargs: as :class:`OdmlQatProvider` (use the same values as in QAT).

    Scales are computed at trace time with numpy, so params and statistics
    must be concrete: close over them (``jax.jit(lambda x: model.apply(v, x))``)
    rather than passing them as arguments.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from flax_integration import OdmlConversionProvider, OdmlQatProvider, QuantizationRule, quantize_model
      >>> rules = [QuantizationRule(weight_qtype='int8', act_qtype='int8')]
      >>> v = quantize_model(nn.Dense(4), OdmlQatProvider(rules)).init(jax.random.key(0), jnp.ones((2, 8)))
      >>> v['quant_stats'] = jax.tree.map(lambda a: a + 1, v['quant_stats'])  # pretend QAT ran
      >>> conv = quantize_model(nn.Dense(4), OdmlConversionProvider(rules, v['params'], v['quant_stats']))
      >>> 'quant.fake_quant' in jax.jit(lambda x: conv.apply({'params': v['params']}, x)).lower(
      ...     jnp.ones((2, 8))).as_text()
      True
    """

    def __init__(self, rules: Sequence[QuantizationRule], params: Any = None, quant_stats: Any = None, **kwargs):
        super().__init__(rules, **kwargs)
        self.params = _pure(params)
        self.quant_stats = _pure(quant_stats)

    def _concrete(self, x: Any) -> np.ndarray | None:
        try:
            return np.asarray(x)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            return None

    def _stat(self, frame: Any, name: str) -> dict:
        parts = [p for p in frame.path.split('/') if p]
        stat = _nested(self.quant_stats, parts + [name]) if self.quant_stats is not None else None
        if stat is None:
            stat = frame.get_stat(name)
        where = '/'.join(parts + [name])
        if stat is None:
            raise ValueError(f"quant_stats: no statistics for {where!r}. Pass the quant_stats of a QAT run "
                             "(OdmlQatProvider with the same rules) or of a calibration pass.")
        stat = {k: self._concrete(v) for k, v in unbox_leaves(stat).items()}
        if any(v is None for v in stat.values()):
            raise ValueError(f"quant_stats: {where!r} is traced; close over the statistics (do not pass them "
                             "as jit arguments) when converting.")
        if int(stat['count']) == 0:
            raise ValueError(f"quant_stats: {where!r} has count 0; run QAT or calibration on at least one batch.")
        return stat

    def act_qparams(self, frame: Any, name: str, x: jax.Array) -> tuple[np.ndarray, np.ndarray | None]:
        """(scale, zero point) as numpy constants, from the ``quant_stats`` given (never from the batch).

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> from flax_integration import OdmlConversionProvider, QuantizationRule, quantize_model
          >>> params = nn.Dense(4).init(jax.random.key(0), jnp.ones((2, 8)))['params']
          >>> stat = lambda lo, hi: {'lo': jnp.array([lo]), 'hi': jnp.array([hi]), 'count': jnp.array(1)}
          >>> stats = {'dot_general0_lhs': stat(-1.0, 1.0), 'output0': stat(-2.0, 2.0)}
          >>> conv = OdmlConversionProvider([QuantizationRule(weight_qtype='int8', act_qtype='int8')], params, stats)
          >>> _ = quantize_model(nn.Dense(4), conv).apply({'params': params}, jnp.ones((2, 8)))
          >>> scale, zero_point = conv.last_io['inputs'][0]  # input 0: the statistic's range [-1, 1]
          >>> type(scale).__name__, (scale * 255).round(3).tolist(), zero_point.tolist()
          ('ndarray', [2.0], [-1])
        """
        stat = self._stat(frame, name)
        with jax.ensure_compile_time_eval():
            s, z = range_to_scale(jnp.asarray(stat['lo'], jnp.float32).reshape(1),
                                  jnp.asarray(stat['hi'], jnp.float32).reshape(1), 'int8',
                                  self.act_calibration_method)
            return np.asarray(s), None if z is None else np.asarray(z)

    def fixed_qparams(self, name: str) -> tuple[Any, Any]:
        """As :meth:`OdmlQatProvider.fixed_qparams`, as numpy constants.

        Example:
          >>> from flax_integration import OdmlConversionProvider
          >>> OdmlConversionProvider([]).fixed_qparams('tanh')
          (array([0.0078125], dtype=float32), array([0], dtype=int8))
        """
        s, z = odml_ops.FIXED_QPARAMS[name]
        return np.full((1,), s, np.float32), np.full((1,), z, np.int8)

    def fake_quant_act(self, x: jax.Array, scale: Any, zero_point: Any) -> jax.Array:
        """The QAT fake quant of an activation, as a ``quant.fake_quant`` composite.

        Example:
          >>> import jax, jax.numpy as jnp, numpy as np
          >>> from flax_integration import OdmlConversionProvider
          >>> fq = lambda x: OdmlConversionProvider([]).fake_quant_act(x, np.array([0.5]), None)
          >>> fq(jnp.array([0.26, -1.0])).tolist()
          [0.5, -1.0]
          >>> 'quant.fake_quant' in jax.jit(fq).lower(jnp.ones(2)).as_text()
          True
        """
        return fake_quant_composite(x, 'int8', np.asarray(scale), None if zero_point is None
                                    else np.asarray(zero_point), narrow_range=False)

    def _weight_value(self, op: Op, w: jax.Array) -> np.ndarray:
        value = self._concrete(w)
        if value is None and self.params is not None:
            parts = [p for p in op.frame.path.split('/') if p] + [op.weight.name]
            found = _nested(self.params, parts)
            value = None if found is None else np.asarray(found, np.float32).astype(w.dtype)
        if value is None:
            raise ValueError(f"{op.describe()}: weight {op.weight.name!r} is traced and params has no "
                             f"'{op.frame.path}/{op.weight.name}'. Pass params, or close over them when "
                             "converting.")
        return value

    def weight(self, op: Op, w: jax.Array) -> jax.Array:
        """The QAT fake-quantized weight, as a per-channel ``quant.fake_quant`` composite with numpy scales.

        Example:
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax_integration import OdmlConversionProvider, OdmlQatProvider, QuantizationRule
          >>> from flax_integration._op_table import dot_general_call
          >>> from flax_integration.providers import Op, Weight
          >>> w = jax.random.normal(jax.random.key(0), (8, 4))
          >>> call = dot_general_call(qarray.dot_general, jax.lax.dot_general, jnp.ones((2, 8)), w,
          ...                         (((1,), (0,)), ((), ())))
          >>> op = Op(call, None, QuantizationRule(weight_qtype='int8'), Weight(1, 'kernel', w), 'dot_general0')
          >>> conv = OdmlConversionProvider([])
          >>> bool(jnp.allclose(conv.weight(op, w), OdmlQatProvider([]).weight(op, w)))
          True
          >>> 'quant.fake_quant' in jax.jit(lambda: conv.weight(op, w)).lower().as_text()
          True
        """
        axis = self.weight_axis(op)
        qtype = op.rule.weight_qtype
        value = self._weight_value(op, w)
        with jax.ensure_compile_time_eval():
            q = _quantize.quantize(jnp.asarray(value), qtypes.narrow_range(qtype),
                              channelwise_axes=() if axis is None else (axis,),
                              calibration=op.rule.weight_calibration_method)
            scale = np.asarray(q.scale)
        return fake_quant_composite(w, qtype, scale, None, narrow_range=True, axis=axis)
