"""Providers: what happens to each matmul/conv of a quantized model.

The interception layer (``flax_integration.interception``) calls
``provider.handle(call, frame)`` for every ``dot_general`` / ``einsum`` /
``conv_general_dilated`` a module runs (also ``jnp.dot``/``jnp.matmul``).
``handle`` matches the rules against the module path and op kind, finds the
weight operand from the module's params, and calls the one method a provider
implements::

    class MyProvider(Provider):
        def process_op(self, op: Op) -> jax.Array:
            ...

``op`` (:class:`~flax_integration.providers.base.Op`) carries:

* ``op.call`` -- the canonical call: ``operands`` (lhs, rhs), per operand the
  ``kept`` / ``contract`` axes and ``tile_axis``; ``call.layout(i, role,
  tile_size)`` gives ``(channelwise_axes, tiles)`` for a weight, a dynamic or
  a static activation; ``call.run(lhs, rhs)`` computes through ``qarray.ops``
  (either side may be a QArray); ``call.run_original()`` is the float op.
* ``op.rule`` -- the matching :class:`QuantizationRule` or None.
* ``op.weight`` -- ``Weight(index, name, value)`` or None (activation-only op);
  ``value`` is a float param or an already quantized ``QuantizedParam``/QArray.
* ``op.frame`` -- the running module: ``path``, ``initializing``,
  ``params()``, ``get_param``/``put_param`` (put boxes the value like the
  float param it replaces, so sharding annotations carry over),
  ``get_stat``/``put_stat``/``can_update_stats`` (the ``quant_stats``
  collection), for Linen and NNX alike.
* ``op.op_id`` / ``op.act_name(i)`` -- stable names for per-op variables.

A provider may also watch whole model runs (outermost call of the quantized
model, Linen or NNX): ``model_run()`` (a context manager around the run, e.g.
to install patches for this run only), ``process_model_inputs(args, kwargs)``
(at entry; ``interception.root_frame()`` is the model's frame there) and
``process_model_output(output)``.

Providers here:

* :class:`PtqProvider` -- weights stored quantized, activations dynamic or static.
* :class:`CalibrationProvider` -- float compute, collects activation ranges
  (running mean) for static scales.

The other providers plug in the same way: QAT (``QtProvider``: ``process_op``
fake-quantizes weight and activations with ``qarray.fake_quant`` and runs
``call.run(...)`` on the float results), LoRA (``LoraProvider``: adds
``op.frame.put_param('<name>_lora_a', ...)`` adapters and returns
``call.run(...) + x @ a @ b``), ODML (annotate operands, run float).

Example:
  >>> class CountingProvider(Provider):
  ...     def __init__(self, rules):
  ...         super().__init__(rules)
  ...         self.seen = []
  ...     def process_op(self, op):
  ...         self.seen.append((op.path, op.call.name, op.weight is not None))
  ...         return op.call.run_original()
  >>> import jax, jax.numpy as jnp
  >>> from flax import linen as nn
  >>> from flax_integration.model import quantize_model
  >>> p = CountingProvider([])
  >>> _ = quantize_model(nn.Dense(2), p).init(jax.random.key(0), jnp.ones((1, 3)))
  >>> p.seen
  [('', 'dot_general', True)]
"""

from flax_integration.providers.base import FloatParamError, Op, Provider
from flax_integration.providers.calibration import CalibrationProvider, QuantStat
from flax_integration.providers.lora import LoraProvider, LoraRule
from flax_integration.providers.odml import OdmlConversionProvider, OdmlQatProvider
from flax_integration.providers.ptq import PtqProvider
from flax_integration.providers.qat import QatProvider, QtProvider

__all__ = ['Provider', 'Op', 'FloatParamError', 'PtqProvider', 'CalibrationProvider', 'QuantStat',
           'QtProvider', 'QatProvider', 'LoraProvider', 'LoraRule', 'OdmlQatProvider',
           'OdmlConversionProvider']
