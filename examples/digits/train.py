"""Training loops for the digits CNNs (Linen and NNX), with Optax.

The Linen loop trains only the parameter leaves that ``trainable(path, leaf)``
accepts: the rest (e.g. frozen, packed QLoRA base weights) never enter the
optimizer state. Extra mutable collections (``quant_stats`` during QAT) are
threaded through and returned.

Example:
  >>> from examples.digits import data, models
  >>> import jax, jax.numpy as jnp
  >>> d = data.load()
  >>> m = models.LinenCNN()
  >>> v = m.init(jax.random.key(0), d.x_train[:1])
  >>> v = train_linen(m, v, d.x_train, d.y_train, steps=2)
  >>> sorted(v)
  ['params']
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def _batches(n: int, batch: int, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        yield rng.integers(0, n, batch)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross entropy against integer labels.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(cross_entropy(jnp.zeros((1, 2)), jnp.array([0]))), 4)
      0.6931
    """
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def split_params(params: Any, trainable: Callable[[str, Any], bool]) -> tuple[Any, Any]:
    """Split a param tree into (trainable, frozen) trees with None holes.

    ``trainable`` sees each leaf's '/'-joined path; QArray leaves count as one leaf.

    Example:
      >>> t, f = split_params({'a': 1., 'b': 2.}, lambda p, l: p == 'a')
      >>> t, f
      ({'a': 1.0, 'b': None}, {'a': None, 'b': 2.0})
    """
    from qarray import QArray
    from qarray.paths import path_name

    is_leaf = lambda x: isinstance(x, QArray)
    flags = jax.tree_util.tree_map_with_path(lambda p, l: trainable(path_name(p), l), params, is_leaf=is_leaf)
    train = jax.tree_util.tree_map(lambda f, l: l if f else None, flags, params, is_leaf=is_leaf)
    frozen = jax.tree_util.tree_map(lambda f, l: None if f else l, flags, params, is_leaf=is_leaf)
    return train, frozen


def merge_params(train: Any, frozen: Any) -> Any:
    """Inverse of :func:`split_params`.

    Example:
      >>> merge_params({'a': 1., 'b': None}, {'a': None, 'b': 2.})
      {'a': 1.0, 'b': 2.0}
    """
    return jax.tree_util.tree_map(lambda t, f: f if t is None else t, train, frozen,
                                  is_leaf=lambda x: x is None)


def lr_schedule(lr: float, steps: int, schedule: str = 'constant') -> np.ndarray:
    """Per-step learning rates: ``'constant'``, or ``'cosine'`` decay from ``lr`` to 0 over ``steps``.

    The rates are fed to the compiled step as an argument, so every rate and
    schedule shares one compiled program.

    Example:
      >>> [round(float(r), 3) for r in lr_schedule(1.0, 4, 'cosine')]
      [1.0, 0.854, 0.5, 0.146]
    """
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {_SCHEDULES}; got {schedule!r}.")
    if schedule == 'constant':
        return np.full(steps, lr, np.float32)
    return (lr * 0.5 * (1.0 + np.cos(np.pi * np.arange(steps) / max(steps, 1)))).astype(np.float32)


_SCHEDULES = ('constant', 'cosine')
# Adam without its learning-rate scaling: the step applies ``-lr * update`` with lr a traced scalar.
_ADAM = optax.scale_by_adam()


def _descend(params: Any, updates: Any, lr: jax.Array) -> Any:
    return jax.tree.map(lambda p, u: p - lr.astype(p.dtype) * u, params, updates)


@functools.lru_cache(maxsize=64)
def _linen_step(model: Any, mutable: tuple[str, ...], use_rngs: bool):
    """One jitted Adam step per (model, mutable, rngs): repeated trainings reuse the compiled program."""

    @jax.jit
    def step(train, frozen, others, opt_state, xb, yb, key, i, lr):
        def loss_fn(train):
            params = merge_params(train, frozen)
            kw = {'rngs': {'dropout': jax.random.fold_in(key, i)}} if use_rngs else {}
            if mutable:
                logits, upd = model.apply({'params': params, **others}, xb, mutable=list(mutable), **kw)
            else:
                logits, upd = model.apply({'params': params, **others}, xb, **kw), {}
            return cross_entropy(logits, yb), upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(train)
        updates, opt_state = _ADAM.update(grads, opt_state, train)
        return _descend(train, updates, lr), {**others, **upd}, opt_state, loss

    return step


def train_linen(model: Any, variables: dict, x: np.ndarray, y: np.ndarray, *, steps: int = 300,
                batch: int = 64, lr: float = 3e-3, schedule: str = 'constant', seed: int = 0,
                mutable: tuple[str, ...] = (), trainable: Callable[[str, Any], bool] | None = None,
                rngs: dict | None = None, losses: list | None = None) -> dict:
    """Adam on softmax cross entropy; returns updated variables.

    Only the leaves ``trainable(path, leaf)`` accepts are differentiated and
    enter the optimizer state; the others (e.g. packed QLoRA base weights) are
    passed through unchanged. ``mutable`` collections (``'quant_stats'`` for
    QAT) are updated by the forward pass; ``rngs`` (any dict) turns on a fresh
    ``'dropout'`` rng per step. ``schedule`` is ``'constant'`` or ``'cosine'``
    (see :func:`lr_schedule`).

    Example:
      >>> train_linen.__name__
      'train_linen'
    """
    trainable = trainable or (lambda path, leaf: True)
    rates = lr_schedule(lr, steps, schedule)
    train, frozen = split_params(variables['params'], trainable)
    others = {k: v for k, v in variables.items() if k != 'params'}
    step = _linen_step(model, tuple(mutable), rngs is not None)
    opt_state = _ADAM.init(train)
    key = jax.random.key(seed)
    for i, idx in enumerate(_batches(len(y), batch, steps, seed)):
        train, others, opt_state, loss = step(train, frozen, others, opt_state, x[idx], y[idx], key, i, rates[i])
        if losses is not None:
            losses.append(loss)
    if losses is not None:
        losses[:] = [float(l) for l in losses]  # one device sync at the end, not one per step
    return {'params': merge_params(train, frozen), **others}


@functools.lru_cache(maxsize=16)
def _nnx_step(wrt: Any):
    @nnx.jit
    def step(model, opt_state, xb, yb, lr):
        diff = nnx.DiffState(0, wrt)
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(xb), yb), argnums=diff)(model)
        params = nnx.to_pure_dict(nnx.state(model, wrt))
        updates, opt_state = _ADAM.update(nnx.to_pure_dict(grads), opt_state, params)
        nnx.update(model, _descend(params, updates, lr))
        return loss, opt_state

    return step


def train_nnx(model: nnx.Module, x: np.ndarray, y: np.ndarray, *, steps: int = 300, batch: int = 64,
              lr: float = 3e-3, schedule: str = 'constant', seed: int = 0, wrt: Any = nnx.Param,
              losses: list | None = None) -> nnx.Module:
    """Adam on an NNX module in place; only variables matching ``wrt`` are optimised.

    ``wrt=nnx.LoRAParam`` trains LoRA adapters only: the optimizer state holds
    nothing else, and frozen (packed) weights get no gradient. Other state the
    forward pass updates (QAT ``QuantStat`` statistics) is kept.

    Example:
      >>> train_nnx.__name__
      'train_nnx'
    """
    rates = lr_schedule(lr, steps, schedule)
    opt_state = _ADAM.init(nnx.to_pure_dict(nnx.state(model, wrt)))
    step = _nnx_step(wrt)
    for i, idx in enumerate(_batches(len(y), batch, steps, seed)):
        loss, opt_state = step(model, opt_state, x[idx], y[idx], rates[i])
        if losses is not None:
            losses.append(loss)
    if losses is not None:
        losses[:] = [float(l) for l in losses]
    return model
