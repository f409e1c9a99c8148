"""``calibrate``: run a calibration model over batches and return averaged ``quant_stats``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import linen as nn
  >>> import flax_integration as fi
  >>> rules = [fi.QuantizationRule(weight_qtype='int8', act_qtype='int8', act_static_scale=True)]
  >>> fp = nn.Dense(4).init(jax.random.key(0), jnp.ones((2, 8)))['params']
  >>> stats = fi.calibrate(nn.Dense(4), fp, [jnp.ones((2, 8)), 2 * jnp.ones((2, 8))], rules=rules, progress=False)
  >>> float(stats['dot_general0_lhs']['hi'][0, 0]), int(stats['dot_general0_lhs']['count'])
  (1.5, 2)
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Sequence

import jax
from flax import linen as nn
from flax import nnx

from flax_integration._model import quantize_model
from flax_integration.providers.calibration import CalibrationProvider
from flax_integration.wrappers import QuantStat
from flax_integration.rules import QuantizationRule

__all__ = ['calibrate']


def _progress(batches: Iterable, enabled: bool | None, total: int | None):
    if enabled is False:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and (enabled or sys.stderr.isatty()):
        return tqdm(batches, total=total, desc='calibrate', unit='batch')
    if enabled:  # asked for progress without tqdm: one line per batch on stderr
        def lines():
            for i, b in enumerate(batches, 1):
                print(f"calibrate: batch {i}{f'/{total}' if total else ''}", file=sys.stderr)
                yield b
        return lines()
    return batches


def _args(batch: Any) -> tuple:
    return tuple(batch) if isinstance(batch, tuple) else (batch,)


def calibrate(model: Any, params: Any, batches: Iterable[Any], *, rules: Sequence[QuantizationRule] | None = None,
              quant_stats: Any = None, progress: bool | None = None, jit: bool = True) -> Any:
    """Run ``model`` over ``batches`` and return the running-average ``quant_stats``.

    Args:
      model: Linen: a float model (then pass ``rules``) or one made by
        ``quantize_model(model, CalibrationProvider(rules))``. NNX: a model made
        by ``quantize_model(model, CalibrationProvider(rules), x)`` (it holds its
        own weights; pass ``params=None``).
      params: Linen float params (the ``'params'`` dict).
      batches: an iterable of inputs; a tuple is passed as positional arguments.
      rules: the rules (Linen float model only); use the same ones as for PTQ.
      quant_stats: statistics to continue from (Linen).
      progress: None: a tqdm bar when tqdm is installed and stderr is a
        terminal; True: always report; False: never.
      jit: compile the calibration step (Linen: ``jax.jit``; NNX: ``nnx.jit``).

    Returns:
      Linen: the ``quant_stats`` collection; NNX: a pure dict of the
      :class:`QuantStat` state. Pass it to ``quantize_params``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from flax_integration import CalibrationProvider, QuantizationRule, calibrate, quantize_model
      >>> rules = [QuantizationRule(act_qtype='int8', act_static_scale=True)]
      >>> m = quantize_model(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), CalibrationProvider(rules), jnp.ones((1, 8)))
      >>> s = calibrate(m, None, [jnp.ones((2, 8))], progress=False)
      >>> int(s['dot_general0_lhs']['count'])
      1
    """
    total = len(batches) if hasattr(batches, '__len__') else None
    if isinstance(model, nnx.Module):
        if getattr(model, 'qarray_provider', None) is None or not isinstance(model.qarray_provider,
                                                                              CalibrationProvider):
            raise ValueError("model: an NNX model must come from quantize_model(model, CalibrationProvider(rules), "
                             "x) before calibrate(...).")
        step = nnx.jit(lambda m, *a: m(*a)) if jit else (lambda m, *a: m(*a))
        for batch in _progress(batches, progress, total):
            step(model, *_args(batch))
        return nnx.to_pure_dict(nnx.state(model, QuantStat))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen.Module or flax.nnx.Module; got {type(model).__name__}.")
    provider = getattr(type(model), '_qarray_provider', None)
    if rules is not None:
        model = quantize_model(model, CalibrationProvider(rules))
    elif not isinstance(provider, CalibrationProvider):
        raise ValueError("rules: pass rules=... for a float Linen model, or a model made by "
                         "quantize_model(model, CalibrationProvider(rules)).")

    def step(stats, *args):
        variables = {'params': params}
        if stats is not None:
            variables['quant_stats'] = stats
        _, updates = model.apply(variables, *args, mutable=['quant_stats'])
        return updates.get('quant_stats', {})

    run = jax.jit(step) if jit else step
    stats = quant_stats
    for batch in _progress(batches, progress, total):
        stats = run(stats, *_args(batch))
    if stats is None:
        raise ValueError("batches: no batch was given; calibrate needs at least one.")
    return stats
