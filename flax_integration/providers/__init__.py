"""Providers: what happens to each quantizable op of a quantized model; the base class for writing one.

While a quantized model runs, the interception engine calls
``provider.handle(call, frame)`` for every op of the op table (``dot_general``,
``einsum``, ``conv_general_dilated``; user ``jnp.dot``/``jnp.matmul`` count
as ``dot_general``). ``handle`` matches the rules against the module path and
op name, finds the weight operand from the module's params, and calls the one
method a provider implements::

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
* ``op.frame`` -- the running module through the :class:`Frame` interface
  (the same for Linen and NNX): ``path``, ``initializing``, ``params()``,
  ``get_param``/``put_param`` (put boxes the value like the float param it
  replaces, so sharding annotations carry over), ``adapter_param``,
  ``get_stat``/``put_stat``/``can_update_stats`` (the ``quant_stats``
  collection), ``rng``, ``dropout``, ``record_alias``/``param_name``.
* ``op.op_id`` / ``op.act_name(i)`` -- stable names for per-op variables.

A provider may also watch whole model runs: ``model_run()`` (a context
manager around the run), ``process_model_inputs(args, kwargs)`` and
``process_model_output(output)``; and declare other functions it wants to see
(``intercepts()``, routed to ``process_extra_op``; the ODML providers use it
for activations and residual adds).

Providers here: :class:`PtqProvider` (quantized weights, dynamic or static
activations), :class:`CalibrationProvider` (float compute, collects activation
ranges and GPTQ statistics), :class:`QtProvider` (QAT with fake quantization),
:class:`LoraProvider` (LoRA/QLoRA), :class:`OdmlQatProvider` /
:class:`OdmlConversionProvider` (LiteRT).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import linen as nn
  >>> from flax_integration import quantize_model
  >>> from flax_integration.providers import Provider
  >>> class CountingProvider(Provider):
  ...     def __init__(self, rules):
  ...         super().__init__(rules)
  ...         self.seen = []
  ...     def process_op(self, op):
  ...         self.seen.append((op.path, op.call.name, op.weight is not None))
  ...         return op.call.run_original()
  >>> p = CountingProvider([])
  >>> _ = quantize_model(nn.Dense(2), p).init(jax.random.key(0), jnp.ones((1, 3)))
  >>> p.seen
  [('', 'dot_general', True)]
"""

from flax_integration._frame import Frame
from flax_integration._interception import ExtraOp, Intercept, Target
from flax_integration.providers.base import FloatParamError, Op, Provider, Weight
from flax_integration.providers.calibration import CalibrationProvider
from flax_integration.providers.lora import LoraProvider, LoraRule
from flax_integration.providers.odml import OdmlQatProvider
from flax_integration.providers.odml_conversion import OdmlConversionProvider
from flax_integration.providers.ptq import PtqProvider
from flax_integration.providers.qat import QatProvider, QtProvider

__all__ = ['Provider', 'Op', 'Weight', 'Frame', 'Intercept', 'Target', 'ExtraOp', 'FloatParamError',
           'PtqProvider', 'CalibrationProvider',
           'QtProvider', 'QatProvider', 'LoraProvider', 'LoraRule', 'OdmlQatProvider',
           'OdmlConversionProvider']
