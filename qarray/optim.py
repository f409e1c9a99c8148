"""8-bit Adam: Optax transformations that keep Adam's moments as blockwise-quantized QArrays.

:func:`adamw_8bit` (and :func:`adam_8bit`, no weight decay) is ``optax.adamw``
with its two moment estimates stored in 8 bits, as bitsandbytes' 8-bit Adam
does: each parameter is flattened and cut into blocks of ``block_size`` (256)
values; the first moment ``m`` is stored as ``'dynamic8'`` codes (a signed,
non-linear code book in [-1, 1]) and the second moment ``v`` as
``'dynamic8u'`` codes (unsigned, [0, 1]), each block with one float32 absmax
scale. A step dequantizes both moments, updates them and computes the step in
float32 (float64 for float64 params) exactly as ``optax.scale_by_adam`` does
(same expressions, same bias correction), then re-quantizes them for storage;
the update itself comes from the fresh float32 moments. Everything is pure and
jit-friendly; the state is a pytree of arrays and QArrays that
:func:`qarray.io.save` / :func:`qarray.io.restore` checkpoint bit for bit.

One safeguard keeps the quantized moments consistent: exact Adam always has
``|m| <= C * sqrt(v)`` with ``C = (1-b1) / sqrt((1-b2) (1 - b1**2/b2))`` (7.27
for the defaults; Cauchy-Schwarz over the two moving averages), but after
quantization a small ``v`` can round to 0 while its ``m`` does not (``v`` spans
twice the decades of ``m`` within a block), and the step ``m / (sqrt(v) + eps)``
then explodes. So each step clips the updated ``m`` to ``±1.01 C sqrt(v)`` before
using and storing it: a no-op for exact moments, and it turns the divergence of
a noise-free quadratic (tests/test_optim.py) into convergence.

Memory: a quantized moment takes 1 byte per value plus 4 bytes per block, so
the state is ``2 * (1 + 4 / block_size)`` bytes per value: 2.03 bytes, 25.4 %
of float32 Adam's 8 (:func:`state_nbytes` counts it). Parameters with fewer
than ``min_size`` (4096) values -- biases, norm scales -- keep float32 moments,
as bitsandbytes does: they cost little and are the most sensitive. With
``min_size`` larger than every parameter nothing is quantized and the updates
equal ``optax.adamw``'s bit for bit (float32 params).

Dtypes: moments are float32 whatever the param dtype (bfloat16 params get
float32 moment arithmetic, and float32 small-param moments, unlike
``optax.adamw`` whose moments follow the param dtype); the updates come back
in each gradient's dtype. Complex params are never quantized.

Non-finite gradients: a NaN or Inf gradient value makes that value's update
NaN (as in ``optax.adamw``) and, through its block's scale, the stored moments
of its whole block (256 values) NaN from then on; other blocks and params are
untouched. To skip such steps instead, wrap the optimizer:
``optax.apply_if_finite(qarray.optim.adamw_8bit(...), max_consecutive_errors)``.

Rounding: ``'nearest'`` (default, as bitsandbytes) or ``'stochastic'``
(unbiased; the random bits come from ``seed`` and the step count, so the state
holds no key and a restored run continues identically).

Optax is imported when an optimizer is built, not when ``qarray`` is imported.

Example:
  >>> import jax, jax.numpy as jnp, optax, qarray.optim
  >>> params = {'w': jnp.ones((64, 128)), 'b': jnp.zeros(128)}
  >>> opt = qarray.optim.adamw_8bit(1e-3)
  >>> state = opt.init(params)
  >>> grads = jax.tree.map(jnp.ones_like, params)
  >>> updates, state = jax.jit(opt.update)(grads, state, params)
  >>> params = optax.apply_updates(params, updates)
  >>> type(state[0].mu['w']).__name__, state[0].mu['b'].dtype
  ('QArray', dtype('float32'))
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qarray._array import QArray
from qarray._quantize import dequantize, quantize

__all__ = ['ScaleByAdam8bitState', 'scale_by_adam_8bit', 'adamw_8bit', 'adam_8bit', 'state_nbytes']

MU_QTYPE, NU_QTYPE = 'dynamic8', 'dynamic8u'
ROUNDINGS = ('nearest', 'stochastic')


class ScaleByAdam8bitState(NamedTuple):
    """State of :func:`scale_by_adam_8bit`: the step count and the two moment trees.

    ``mu`` / ``nu`` have the params' tree structure; a leaf is a 1-D QArray
    (the flattened param's moment, ``'dynamic8'`` / ``'dynamic8u'`` codes, one
    float32 scale per block) for params of at least ``min_size`` values, else
    a float32 array of the param's shape.

    Example:
      >>> import jax.numpy as jnp, qarray.optim
      >>> s = qarray.optim.scale_by_adam_8bit(min_size=8).init({'w': jnp.ones((4, 300))})
      >>> int(s.count), s.mu['w'].shape, s.mu['w'].scale.shape, s.nu['w'].qtype.name
      (0, (1200,), (5,), 'dynamic8u')
    """

    count: jax.Array
    mu: Any
    nu: Any


def _optax():
    try:
        import optax
    except ImportError as e:  # pragma: no cover - optax ships with flax, a runtime dependency
        raise ImportError("qarray.optim needs optax (it comes with flax): pip install optax.") from e
    return optax


def _concrete_number(x: Any) -> float | None:
    """``float(x)`` for a concrete real scalar (NaN for anything else: a string, an array of several values), None
    for a tracer (checked only when known, e.g. under ``optax.inject_hyperparams``)."""
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, (np.ndarray, np.generic, jax.Array)) and np.size(x) == 1 and x.dtype.kind in 'fiu':
        return float(np.asarray(x).reshape(()))
    return math.nan


def _check_range(name: str, value: Any, lo: float, hi: float | None = None, hi_open: bool = False) -> None:
    v = _concrete_number(value)
    if v is None:
        return
    ok = v >= lo and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        want = f">= {lo}" if hi is None else f"in [{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be a real number {want}; got {value!r}.")


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}; got {value!r}.")


def _check_learning_rate(learning_rate: Any) -> None:
    if not callable(learning_rate):
        _check_range('learning_rate', learning_rate, 0.0)


def _moment_dtype(dtype: Any) -> np.dtype:
    """float32 for bf16/f16/f32 params, float64 for float64, complex stays complex."""
    return np.dtype(jnp.promote_types(dtype, jnp.float32))


def _quantized(p: Any, min_size: int) -> bool:
    return jnp.issubdtype(p.dtype, jnp.floating) and math.prod(p.shape) >= min_size


def _moment_ratio_bound(b1: Any, b2: Any, slack: float = 1.01) -> float | None:
    """``C`` with ``|m| <= C * sqrt(v)`` for every gradient sequence (Adam from zero moments): by Cauchy-Schwarz,
    ``m_t**2 <= (1-b1)**2 * sum_k (b1**2/b2)**k * sum_k b2**k g_{t-k}**2``, so ``C = (1-b1) / sqrt((1-b2) *
    (1 - b1**2/b2))`` (7.27 for 0.9, 0.999), times a 1 % slack so float rounding never binds. None when
    ``b1**2 >= b2`` (no bound) or the rates are traced."""
    b1, b2 = _concrete_number(b1), _concrete_number(b2)
    if b1 is None or b2 is None or b1 * b1 >= b2:
        return None
    return slack * (1 - b1) / math.sqrt((1 - b2) * (1 - b1 * b1 / b2))


def scale_by_adam_8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0, *,
                       block_size: int = 256, min_size: int = 4096, rounding: str = 'nearest',
                       seed: int = 0) -> Any:
    """``optax.scale_by_adam`` with its moments stored as blockwise 8-bit QArrays (see the module doc).

    Args:
      b1, b2: moment decay rates, in [0, 1).
      eps, eps_root: added outside / inside the square root of the second
        moment (>= 0), as in ``optax.scale_by_adam``.
      block_size: values per scale along each flattened param (the last block
        may be partial).
      min_size: params with fewer values keep float32 moments.
      rounding: ``'nearest'`` or ``'stochastic'`` re-quantization.
      seed: the random bits of stochastic rounding (with the step count).

    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`ScaleByAdam8bitState`.

    Example:
      >>> import jax.numpy as jnp, qarray.optim
      >>> tx = qarray.optim.scale_by_adam_8bit(min_size=0)
      >>> g = {'w': jnp.full((512,), 0.5)}
      >>> u, s = tx.update(g, tx.init(g))
      >>> round(float(u['w'][0]), 4), s.mu['w'].qvalue.dtype   # Adam's first step is about sign(g)
      (1.0, dtype('uint8'))
    """
    optax = _optax()
    _check_range('b1', b1, 0.0, 1.0, hi_open=True)
    _check_range('b2', b2, 0.0, 1.0, hi_open=True)
    _check_range('eps', eps, 0.0)
    _check_range('eps_root', eps_root, 0.0)
    _check_int('block_size', block_size, 1)
    _check_int('min_size', min_size, 0)
    _check_int('seed', seed, 0)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}; got {rounding!r}.")

    ratio_bound = _moment_ratio_bound(b1, b2)

    def store(x: jax.Array, qtype: str, key: jax.Array | None) -> QArray:
        """The flattened moment as 8-bit codes: nearest rounding without a key, stochastic with one."""
        return quantize(x.reshape(-1), qtype, tiles=block_size, scale_dtype=jnp.float32,
                        rounding='nearest' if key is None else 'stochastic', key=key)

    def zeros(p: Any, qtype: str) -> Any:
        z = jnp.zeros(p.shape, _moment_dtype(p.dtype))
        return store(z, qtype, None) if _quantized(p, min_size) else z

    def init_fn(params: Any) -> ScaleByAdam8bitState:
        return ScaleByAdam8bitState(count=jnp.zeros([], jnp.int32),
                                    mu=jax.tree.map(lambda p: zeros(p, MU_QTYPE), params),
                                    nu=jax.tree.map(lambda p: zeros(p, NU_QTYPE), params))

    def update_fn(updates: Any, state: ScaleByAdam8bitState, params: Any = None) -> tuple[Any, ScaleByAdam8bitState]:
        del params
        grads, treedef = jax.tree.flatten(updates)
        mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        count_inc = optax.safe_increment(state.count)
        step_key = jax.random.fold_in(jax.random.key(seed), count_inc) if rounding == 'stochastic' else None
        ms, vs = [], []
        for g, mu, nu in zip(grads, mus, nus):
            g32 = g.astype(_moment_dtype(g.dtype))
            m = dequantize(mu).reshape(g.shape) if isinstance(mu, QArray) else mu
            v = dequantize(nu).reshape(g.shape) if isinstance(nu, QArray) else nu
            # optax.scale_by_adam's own functions (bias correction below on the whole tree, as it does), so
            # unquantized moments match it bit for bit.
            m = optax.tree.update_moment(g32, m, b1, 1)
            v = optax.tree.update_moment_per_elem_norm(g32, v, b2, 2)
            if isinstance(mu, QArray) and ratio_bound is not None:
                bound = ratio_bound * jnp.sqrt(v)  # exact Adam never leaves it; quantized moments may
                m = jnp.clip(m, -bound, bound)
            ms.append(m)
            vs.append(v)
        m_hat = treedef.flatten_up_to(optax.tree.bias_correction(treedef.unflatten(ms), b1, count_inc))
        v_hat = treedef.flatten_up_to(optax.tree.bias_correction(treedef.unflatten(vs), b2, count_inc))
        out = [(mh / (jnp.sqrt(vh + eps_root) + eps)).astype(g.dtype) for mh, vh, g in zip(m_hat, v_hat, grads)]
        new_mu, new_nu = [], []
        for i, (m, v, mu, nu) in enumerate(zip(ms, vs, mus, nus)):
            keys = (None, None) if step_key is None else (jax.random.fold_in(step_key, 2 * i),
                                                          jax.random.fold_in(step_key, 2 * i + 1))
            new_mu.append(store(m, MU_QTYPE, keys[0]) if isinstance(mu, QArray) else m)
            new_nu.append(store(v, NU_QTYPE, keys[1]) if isinstance(nu, QArray) else v)
        new_state = ScaleByAdam8bitState(count=count_inc, mu=treedef.unflatten(new_mu), nu=treedef.unflatten(new_nu))
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def adamw_8bit(learning_rate: float | Callable[[jax.Array], jax.Array], b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8, weight_decay: float = 1e-4, *, eps_root: float = 0.0, block_size: int = 256,
               min_size: int = 4096, mask: Any = None, rounding: str = 'nearest', seed: int = 0) -> Any:
    """AdamW with 8-bit moments: ``optax.adamw`` with :func:`scale_by_adam_8bit` in place of ``scale_by_adam``.

    The chain is ``scale_by_adam_8bit``, ``optax.add_decayed_weights(weight_decay,
    mask)``, ``optax.scale_by_learning_rate(learning_rate)``, as ``optax.adamw``
    builds it, so its state is a 3-tuple whose first entry is the
    :class:`ScaleByAdam8bitState`.

    Args:
      learning_rate: a number >= 0 or an Optax schedule (a callable of the step).
      b1, b2, eps, eps_root, block_size, min_size, rounding, seed: see
        :func:`scale_by_adam_8bit`.
      weight_decay: decoupled weight decay (>= 0), applied where ``mask`` is
        True (a pytree of bools or a callable of the params; None: everywhere).

    Example:
      >>> import jax.numpy as jnp, optax, qarray.optim
      >>> params = {'w': jnp.linspace(-1., 1., 8192)}
      >>> opt = qarray.optim.adamw_8bit(0.1, weight_decay=0.0)
      >>> state = opt.init(params)
      >>> for _ in range(3):
      ...     grads = {'w': 2 * params['w']}           # d/dw of sum(w**2)
      ...     updates, state = opt.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(jnp.abs(params['w']).max() < 0.8)
      True
    """
    optax = _optax()
    _check_learning_rate(learning_rate)
    _check_range('weight_decay', weight_decay, 0.0)
    return optax.chain(
        scale_by_adam_8bit(b1, b2, eps, eps_root, block_size=block_size, min_size=min_size, rounding=rounding,
                           seed=seed),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate))


def adam_8bit(learning_rate: float | Callable[[jax.Array], jax.Array], b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, *, eps_root: float = 0.0, block_size: int = 256, min_size: int = 4096,
              rounding: str = 'nearest', seed: int = 0) -> Any:
    """Adam with 8-bit moments (no weight decay): ``optax.adam`` with :func:`scale_by_adam_8bit`.

    Its state is a 2-tuple: the :class:`ScaleByAdam8bitState` and the learning
    rate's state. Arguments as :func:`adamw_8bit`.

    Example:
      >>> import jax.numpy as jnp, qarray.optim
      >>> opt = qarray.optim.adam_8bit(1e-2)
      >>> state = opt.init({'w': jnp.ones((128, 64))})
      >>> updates, state = opt.update({'w': jnp.ones((128, 64))}, state)
      >>> round(float(updates['w'][0, 0]), 6)
      -0.01
    """
    optax = _optax()
    _check_learning_rate(learning_rate)
    return optax.chain(
        scale_by_adam_8bit(b1, b2, eps, eps_root, block_size=block_size, min_size=min_size, rounding=rounding,
                           seed=seed),
        optax.scale_by_learning_rate(learning_rate))


def state_nbytes(tree: Any) -> int:
    """Bytes held by the arrays of a pytree (an optimizer state, params, ...): each QArray's real buffers
    (codes, scales, zero points), every other array leaf's ``nbytes``; Python numbers count as 8 bytes. Also
    takes ``jax.eval_shape`` output, to size a state without building it.

    Example:
      >>> import jax, jax.numpy as jnp, optax, qarray.optim
      >>> params = {'w': jnp.zeros((1024, 1024))}
      >>> q8 = qarray.optim.state_nbytes(qarray.optim.adamw_8bit(1e-3).init(params))
      >>> f32 = qarray.optim.state_nbytes(optax.adamw(1e-3).init(params))
      >>> q8, f32, round(q8 / f32, 4)   # 2 x (1 MiB of codes + 4 B per 256 values) + the step count
      (2129924, 8388612, 0.2539)
      >>> qarray.optim.state_nbytes(jax.eval_shape(qarray.optim.adamw_8bit(1e-3).init, params))
      2129924
    """
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QArray)):
        if isinstance(leaf, QArray):
            total += leaf.nbytes
        elif hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'):  # arrays, and jax.eval_shape's ShapeDtypeStructs
            total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        elif isinstance(leaf, numbers.Number):
            total += 8
    return int(total)
