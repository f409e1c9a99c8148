"""flax_integration: quantize Flax Linen and NNX models with regex rules, without changing their code.

Seed-compatible: ``import flax_integration as qwix`` runs Qwix-style code.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import linen as nn
  >>> import flax_integration as qwix
  >>> model = nn.Dense(16, use_bias=False)
  >>> x = jnp.ones((2, 8))
  >>> rules = [qwix.QuantizationRule(module_path='.*', weight_qtype='int8', act_qtype='int8')]
  >>> ptq = qwix.quantize_model(model, qwix.PtqProvider(rules))
  >>> abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)['params']
  >>> params = qwix.quantize_params(model.init(jax.random.key(0), x)['params'], abstract)
  >>> ptq.apply({'params': params}, x).shape
  (2, 16)
"""

from flax_integration._calibrate import calibrate
from flax_integration._model import quantize_model
from flax_integration.litert import export_litert
from flax_integration._lora_export import lora_param_count, lora_trainable, merge_lora, with_base_weights
from flax_integration.providers import (CalibrationProvider, FloatParamError, LoraProvider, LoraRule,
                                        OdmlConversionProvider, OdmlQatProvider, Op, Provider, PtqProvider,
                                        QatProvider, QtProvider)
from flax_integration._quantize_params import quantize_params
from flax_integration.rules import QtRule, QuantizationRule, UnusedRuleWarning
from flax_integration.wrappers import ActivationScale, QuantizedParam, QuantStat

__all__ = ['QuantizationRule', 'QtRule', 'UnusedRuleWarning', 'quantize_model', 'quantize_params', 'calibrate', 'Provider', 'Op',
           'PtqProvider', 'CalibrationProvider', 'QuantStat', 'FloatParamError', 'QuantizedParam',
           'ActivationScale', 'QtProvider', 'QatProvider', 'LoraProvider', 'LoraRule', 'merge_lora',
           'lora_trainable', 'with_base_weights', 'lora_param_count', 'OdmlQatProvider',
           'OdmlConversionProvider', 'export_litert']
