"""Quantized decode caches for Flax attention: a rule's ``kv_cache_qtype`` keeps Flax's KV cache in codes + scales.

A rule whose ``module_path`` fully matches an attention module's path and sets
``kv_cache_qtype`` (``'int8'``, ``'fp8'``, ``'int4'``) stores that module's
``cached_key`` / ``cached_value`` (the ``'cache'`` collection in Linen,
``nnx.Cache`` attributes in NNX) as :class:`QuantizedCacheTensor` s -- int8 /
fp8 codes (int4: two per byte) and one scale per token per head, the layout of
:mod:`qarray.kv_cache` -- in place of the float arrays. Flax's float cache is
not kept besides them: the collection's bytes shrink (int8: ``(D + 4) / 4D``
of float32 for head size ``D``). The first rule matching the module's path
decides (as for ops; ``op_names`` is not consulted).

How it hooks in (nothing in Flax's code changes): while the model runs, the
engine routes ``jax.lax.dynamic_update_slice`` (:data:`INTERCEPT`) to the
provider. When the array being updated is the running attention module's
``cached_key`` or ``cached_value``, the new token is quantized on its own
(:func:`qarray.quantize`, per head; exactly what :func:`qarray.kv_cache.update`
writes) and its codes and scale are written at ``cache_index``; for that call
only, the module's ``attention_fn`` reads the two quantized tensors with
:func:`qarray.kv_cache.attention` (block by block, dequantizing one block at a
time inside the compiled program; the cache is never dequantized whole).

Covered (exactly):

* Linen ``nn.MultiHeadDotProductAttention(decode=True)`` (and its subclasses
  ``nn.MultiHeadAttention``, ``nn.SelfAttention``): ``init`` creates the
  quantized cache (empty: codes and scales zero) when the attention runs
  through ``jnp.einsum`` (Flax's default ``attention_fn``); decoding with
  ``apply(..., mutable=['cache'])`` writes it.
* NNX ``nnx.MultiHeadAttention(decode=True)`` after ``init_cache`` (also after
  ``set_view``), grouped-query heads (``num_kv_heads``) included: ``init_cache``
  makes Flax's float zeros; the first decode call of the quantized model
  replaces them with the quantized cache (a :class:`QuantizedCache` variable,
  a subclass of ``nnx.Cache``), under ``nnx.jit`` too.
* Flax's own decode contract: one scalar ``cache_index`` shared by the batch,
  one token per call (Flax itself refuses more: "Autoregressive cache shape
  error"), the whole cached key and value passed to ``attention_fn``, causal
  mask ``arange(max_len) <= cache_index``. Keys are ``[batch, max_len, heads,
  head_dim]`` with exactly one batch axis.
* Any provider that routes through :class:`~flax_integration.providers.Provider`
  (PTQ with or without quantized weights, QAT, ...), once the provider declares
  :data:`INTERCEPT` (see :func:`with_kv_cache`).

Refused with a ``ValueError`` naming the module and the reason: a custom
``attention_fn`` (its semantics would be replaced); attention dropout while not
deterministic; ``sow_weights`` (the weights are never materialised); a mask
that differs per head; a ``bias``; ``is_causal=True``; more than one batch
axis; a quantized cache met by a model whose rules give that module no
``kv_cache_qtype``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import linen as nn
  >>> import flax_integration as fi
  >>> from flax_integration._kv_cache import with_kv_cache
  >>> attn = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, decode=True)
  >>> q = fi.quantize_model(attn, with_kv_cache(fi.PtqProvider([fi.QuantizationRule(kv_cache_qtype='int8')])))
  >>> v = q.init(jax.random.key(0), jnp.ones((1, 32, 16)))        # a cache of 32 tokens
  >>> type(v['cache']['cached_key']).__name__, v['cache']['cached_key'].data.dtype.name
  ('QuantizedCacheTensor', 'int8')
  >>> y, upd = q.apply(v, jnp.ones((1, 1, 16)), mutable=['cache'])  # decode one token
  >>> y.shape, int(upd['cache']['cache_index'])
  ((1, 1, 16), 1)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from qarray import kv_cache, qtypes
from qarray.kv_cache._cache import _quantize_tokens, _write

from flax_integration import _interception
from flax_integration._interception import ExtraOp, Intercept, Target

__all__ = ['QuantizedCacheTensor', 'QuantizedCache', 'INTERCEPT', 'with_kv_cache', 'wants_kv_cache',
           'process_cache_write', 'prepare_cache']

#: What a provider declares (``Provider.intercepts``) to see Flax's cache writes.
INTERCEPT = Intercept('kv_cache_write', (Target(jax.lax, 'dynamic_update_slice'),))
_NAMES = ('cached_key', 'cached_value')
_DEFAULT_ATTENTION = (nn.dot_product_attention, nnx.dot_product_attention)


@dataclasses.dataclass(frozen=True)
class QuantizedCacheTensor:
    """One of Flax's cached keys or values ``[batch, max_len, heads, head_dim]``, kept quantized.

    A registered pytree (leaves ``data`` and ``scale``), stored where Flax
    stores its float ``cached_key`` / ``cached_value``. ``shape`` is the
    logical shape (Flax reads it), ``x[...]`` is ``x`` (NNX reads variables so).

    Attributes:
      data: codes as :class:`qarray.kv_cache.KVCache` stores them (int8; fp8 bit
        patterns as uint8; int4 packed two per byte along ``head_dim``).
      scale: ``[batch, max_len, heads, 1]`` scales, one per token per head.
      qtype: the format (static); dtype: the float dtype it stands for (static);
      head_dim: logical ``head_dim`` (static).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax_integration._kv_cache import QuantizedCacheTensor
      >>> t = QuantizedCacheTensor.quantize(jnp.ones((1, 4, 2, 8)), 'int8')
      >>> t.shape, t.data.dtype.name, t.scale.shape, t.nbytes   # 64 B of codes + 8 float32 scales
      ((1, 4, 2, 8), 'int8', (1, 4, 2, 1), 96)
    """

    data: jax.Array
    scale: jax.Array
    qtype: qtypes.QType
    dtype: np.dtype
    head_dim: int

    @classmethod
    def quantize(cls, x: jax.Array, qtype: Any) -> QuantizedCacheTensor:
        """``x`` ``[B, T, H, D]`` quantized per token per head (as :func:`qarray.kv_cache.update` writes tokens).

        Example:
          >>> import jax.numpy as jnp
          >>> from flax_integration._kv_cache import QuantizedCacheTensor
          >>> QuantizedCacheTensor.quantize(jnp.zeros((1, 2, 1, 4)), 'fp8').data.dtype.name  # fp8 bits as uint8
          'uint8'
        """
        x = jnp.asarray(x)
        empty = kv_cache.init(1, 1, 1, x.shape[-1], qtype, x.dtype)
        data, scale = _quantize_tokens(x, empty)
        return cls(data, scale, empty.qtype, empty.dtype, x.shape[-1])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Logical ``(batch, max_len, heads, head_dim)``.

        Example:
          >>> import jax.numpy as jnp
          >>> from flax_integration._kv_cache import QuantizedCacheTensor
          >>> QuantizedCacheTensor.quantize(jnp.zeros((1, 2, 1, 5)), 'int4').shape   # int4 stores 3 bytes per head
          (1, 2, 1, 5)
        """
        return (*self.data.shape[:-1], self.head_dim)

    @property
    def ndim(self) -> int:
        """4.

        Example:
          >>> import jax.numpy as jnp
          >>> from flax_integration._kv_cache import QuantizedCacheTensor
          >>> QuantizedCacheTensor.quantize(jnp.zeros((1, 2, 1, 4)), 'int8').ndim
          4
        """
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Stored bytes: codes + scales.

        Example:
          >>> import jax.numpy as jnp
          >>> from flax_integration._kv_cache import QuantizedCacheTensor
          >>> QuantizedCacheTensor.quantize(jnp.zeros((1, 8, 2, 64)), 'int4').nbytes   # 512 B codes + 64 B scales
          576
        """
        return int(self.data.nbytes + self.scale.nbytes)

    def __getitem__(self, index: Any) -> QuantizedCacheTensor:
        """``x[...]`` is ``x`` (how NNX reads a variable); other indexing is refused.

        Example:
          >>> import jax.numpy as jnp
          >>> from flax_integration._kv_cache import QuantizedCacheTensor
          >>> t = QuantizedCacheTensor.quantize(jnp.zeros((1, 2, 1, 4)), 'int8')
          >>> t[...] is t
          True
        """
        if index is not Ellipsis:
            raise TypeError(f"a QuantizedCacheTensor is read whole (x[...]); got index {index!r}. Dequantize "
                            "with .as_kv_cache / qarray.kv_cache to read tokens.")
        return self

    def write(self, token: jax.Array, position: Any) -> QuantizedCacheTensor:
        """The tensor with ``token`` ``[B, S, H, D]`` quantized and written at token ``position`` (a scalar).

        Example:
          >>> import jax.numpy as jnp
          >>> from flax_integration._kv_cache import QuantizedCacheTensor
          >>> t = QuantizedCacheTensor.quantize(jnp.zeros((1, 4, 1, 2)), 'int8')
          >>> t.write(jnp.array([[[[1.0, -0.5]]]]), 2).data[0, :, 0].tolist()
          [[0, 0], [0, 0], [127, -64], [0, 0]]
        """
        view = self._view()
        data, scale = _quantize_tokens(jnp.asarray(token), view)
        pos = jnp.asarray(position, jnp.int32)
        return dataclasses.replace(self, data=_write(self.data, data, pos), scale=_write(self.scale, scale, pos))

    def _view(self, other: QuantizedCacheTensor | None = None) -> kv_cache.KVCache:
        v = self if other is None else other
        return kv_cache.KVCache(self.data, v.data, self.scale, v.scale, qtype=self.qtype, dtype=self.dtype,
                                head_dim=self.head_dim)

    def as_kv_cache(self, value: QuantizedCacheTensor) -> kv_cache.KVCache:
        """A :class:`qarray.kv_cache.KVCache` with these keys and ``value`` 's values (no copy).

        Example:
          >>> import jax.numpy as jnp
          >>> from flax_integration._kv_cache import QuantizedCacheTensor
          >>> k = QuantizedCacheTensor.quantize(jnp.ones((1, 4, 2, 8)), 'int8')
          >>> c = k.as_kv_cache(k)
          >>> c.shape, c.qtype.name, c.nbytes
          ((1, 4, 2, 8), 'int8', 192)
        """
        if not isinstance(value, QuantizedCacheTensor) or (value.qtype, value.shape) != (self.qtype, self.shape):
            raise ValueError(f"value must be a QuantizedCacheTensor of the keys' format and shape "
                             f"({self.qtype.name}, {self.shape}); got {value!r:.80}.")
        return self._view(value)


jax.tree_util.register_dataclass(QuantizedCacheTensor, data_fields=['data', 'scale'],
                                 meta_fields=['qtype', 'dtype', 'head_dim'])


class QuantizedCache(nnx.Cache):
    """An ``nnx.Cache`` holding a :class:`QuantizedCacheTensor`; ``var[...] = tensor`` replaces it whole.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from flax_integration._kv_cache import QuantizedCache, QuantizedCacheTensor
      >>> var = QuantizedCache(QuantizedCacheTensor.quantize(jnp.zeros((1, 2, 1, 4)), 'int8'))
      >>> var[...] = QuantizedCacheTensor.quantize(jnp.ones((1, 2, 1, 4)), 'int8')
      >>> isinstance(var, nnx.Cache), var[...].data[0, 0, 0].tolist()
      (True, [127, 127, 127, 127])
    """

    def set_value(self, value: Any, **kwargs: Any) -> None:
        """Store ``value``; an index of ``...`` with a :class:`QuantizedCacheTensor` replaces the whole value.

        Example:
          >>> import jax.numpy as jnp
          >>> from flax_integration._kv_cache import QuantizedCache, QuantizedCacheTensor
          >>> var = QuantizedCache(QuantizedCacheTensor.quantize(jnp.zeros((1, 2, 1, 4)), 'int8'))
          >>> var.set_value(QuantizedCacheTensor.quantize(jnp.zeros((1, 3, 1, 4)), 'int8'), index=...)
          >>> var[...].shape
          (1, 3, 1, 4)
        """
        if kwargs.get('index', None) is Ellipsis and isinstance(value, QuantizedCacheTensor):
            kwargs = {}
        return super().set_value(value, **kwargs)


# --------------------------------------------------------------------------- where the cache lives
def _is_linen(frame: Any) -> bool:
    return isinstance(frame.module, nn.Module)


def _get(frame: Any, name: str) -> Any:
    """The stored value of cache variable ``name`` of the running module (None if absent)."""
    module = frame.module
    if _is_linen(frame):
        scope = module.scope
        return scope.get_variable('cache', name) if scope is not None and scope.has_variable('cache', name) else None
    var = vars(module).get(name)
    return var.get_value() if isinstance(var, nnx.Variable) else None


def _put(frame: Any, name: str, value: QuantizedCacheTensor) -> None:
    """Store a quantized cache tensor as variable ``name`` (Linen: the 'cache' collection; NNX: a QuantizedCache)."""
    if _is_linen(frame):
        frame.module.scope.put_variable('cache', name, value)
    else:
        setattr(frame.module, name, QuantizedCache(value))


def _same(a: Any, b: Any) -> bool:
    """Whether ``a`` is the stored value ``b`` (same leaves: NNX reads rebuild the container)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return bool(la) and len(la) == len(lb) and all(x is y for x, y in zip(la, lb))


def _describe(frame: Any) -> str:
    return f"module {frame.path or '<root>'!r} ({type(frame.module).__name__})"


# --------------------------------------------------------------------------- the provider hooks
def wants_kv_cache(rules: Any) -> bool:
    """Whether any rule sets ``kv_cache_qtype`` (then a provider declares :data:`INTERCEPT`).

    Example:
      >>> from flax_integration import QuantizationRule
      >>> from flax_integration._kv_cache import wants_kv_cache
      >>> wants_kv_cache([QuantizationRule(weight_qtype='int8')]), wants_kv_cache([QuantizationRule(kv_cache_qtype='fp8')])
      (False, True)
    """
    return any(getattr(r, 'kv_cache_qtype', None) is not None for r in rules)


def _qtype_for(provider: Any, frame: Any) -> str | None:
    rule = provider.rules.match(frame.path)
    return None if rule is None else rule.kv_cache_qtype


def prepare_cache(provider: Any, frame: Any) -> None:
    """Before an op of a Linen decoding attention module at ``init``: replace its float cache by empty quantized
    tensors (Flax creates ``cached_key`` / ``cached_value`` with ``jnp.zeros`` just before ``attention_fn``).

    Called by the provider for every op (cheap: returns at once unless ``frame`` is such a module, initializing).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> import flax_integration as fi
      >>> from flax_integration._kv_cache import with_kv_cache
      >>> rules = [fi.QuantizationRule(kv_cache_qtype='fp8')]
      >>> m = fi.quantize_model(nn.MultiHeadDotProductAttention(num_heads=1, decode=True), with_kv_cache(fi.PtqProvider(rules)))
      >>> m.init(jax.random.key(0), jnp.ones((2, 8, 4)))['cache']['cached_value'].qtype.name
      'float8_e4m3fn'
    """
    if frame is None or not isinstance(frame.module, nn.MultiHeadDotProductAttention):
        return
    if not frame.module.decode or not frame.initializing:
        return
    qtype = _qtype_for(provider, frame)
    if qtype is None:
        return
    for name in _NAMES:
        stored = _get(frame, name)
        if isinstance(stored, jax.Array) and stored.ndim == 4 and frame.module.scope.is_mutable_collection('cache'):
            _put(frame, name, QuantizedCacheTensor.quantize(stored, qtype))


def process_cache_write(provider: Any, op: ExtraOp) -> Any:
    """One ``lax.dynamic_update_slice`` call while ``provider``'s model runs (see the module docstring).

    A write into the running attention module's ``cached_key`` / ``cached_value`` whose rule sets
    ``kv_cache_qtype`` is quantized into the stored :class:`QuantizedCacheTensor` (a float cache is
    quantized first); any other call runs as JAX's.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax_integration._interception import ExtraOp
      >>> from flax_integration._kv_cache import process_cache_write
      >>> op = ExtraOp('kv_cache_write', jax.lax.dynamic_update_slice, (jnp.zeros(3), jnp.ones(1), (1,)), {}, None)
      >>> process_cache_write(None, op).tolist()     # not a cache write: JAX's own result
      [0.0, 1.0, 0.0]
    """
    frame = op.frame
    operand = op.args[0] if op.args else op.kwargs.get('operand')
    name = None
    if frame is not None and isinstance(frame.module, (nn.MultiHeadDotProductAttention, nnx.MultiHeadAttention)):
        name = next((n for n in _NAMES if _same(operand, _get(frame, n))), None)
    if name is None:
        if isinstance(operand, QuantizedCacheTensor):
            raise ValueError("lax.dynamic_update_slice on a QuantizedCacheTensor outside Flax's decode-cache write of "
                             "an attention module; only MultiHeadDotProductAttention / nnx.MultiHeadAttention caches "
                             "are kept quantized.")
        return op.original(*op.args, **op.kwargs)
    qtype = _qtype_for(provider, frame)
    if qtype is None:
        if isinstance(operand, QuantizedCacheTensor):
            raise ValueError(f"{_describe(frame)}: its {name} is quantized ({operand.qtype.name}) but no rule of this "
                             "model gives the module a kv_cache_qtype; quantize it with the rules that made the cache.")
        return op.original(*op.args, **op.kwargs)
    update, indices = _write_args(op, frame)
    _check_supported(frame, operand, update)
    if not isinstance(operand, QuantizedCacheTensor):  # Flax's float zeros (NNX init_cache), or a float cache
        operand = QuantizedCacheTensor.quantize(operand, qtype)
        if not _is_linen(frame):
            _put(frame, name, operand)  # so Flax's `self.cached_key[...] = new` replaces it whole
    elif operand.qtype != qtypes.get(qtype):
        raise ValueError(f"{_describe(frame)}: {name} is stored as {operand.qtype.name} but the rule says "
                         f"kv_cache_qtype={qtype!r}; re-create the cache (init / init_cache).")
    new = operand.write(update, indices[1])
    _arm_attention(frame, name, new)
    return new


def _write_args(op: ExtraOp, frame: Any) -> tuple[jax.Array, tuple]:
    args = list(op.args) + [op.kwargs[k] for k in ('update', 'start_indices') if k in op.kwargs]
    update, indices = jnp.asarray(args[1]), tuple(args[2])
    if len(indices) != 4:
        raise ValueError(f"{_describe(frame)}: a quantized KV cache has one batch axis ([batch, max_len, heads, "
                         f"head_dim]); the cache write used {len(indices)} start indices.")
    for i in (0, 2, 3):
        try:
            nonzero = int(indices[i]) != 0
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
            nonzero = False  # traced under jit: Flax's decode path passes zeros here by construction
        if nonzero:
            raise ValueError(f"{_describe(frame)}: the cache write must start at batch 0, head 0, feature 0 (one "
                             f"token for the whole batch at cache_index); got start indices {indices}.")
    return update, indices


def _check_supported(frame: Any, operand: Any, update: jax.Array) -> None:
    shape = tuple(operand.shape)
    if len(shape) != 4:
        raise ValueError(f"{_describe(frame)}: a quantized KV cache has exactly one batch axis: keys [batch, max_len, "
                         f"heads, head_dim]; this cache has shape {shape}. Flatten extra batch axes before attention.")
    if tuple(update.shape) != (shape[0], 1, *shape[2:]):
        raise ValueError(f"{_describe(frame)}: the quantized KV cache takes one token per call, "
                         f"[batch, 1, heads, head_dim] = {(shape[0], 1, *shape[2:])}; got {tuple(update.shape)}.")
    fn = vars(frame.module).get('attention_fn', getattr(frame.module, 'attention_fn', None))
    if not any(fn is f for f in _DEFAULT_ATTENTION) and not getattr(fn, '_qarray_kv_attention', False):
        raise ValueError(f"{_describe(frame)}: kv_cache_qtype replaces Flax's default attention_fn "
                         f"(dot_product_attention) with one that reads the quantized cache; this module uses "
                         f"attention_fn={getattr(fn, '__name__', fn)!r}, whose semantics would be lost. Drop "
                         "kv_cache_qtype for this module or use the default attention_fn.")


# --------------------------------------------------------------------------- the read
def _arm_attention(frame: Any, name: str, new: QuantizedCacheTensor) -> None:
    """After both writes of a call: this module's next ``attention_fn`` call (this call's) reads the quantized cache."""
    module = frame.module
    armed = vars(module).get('attention_fn')
    if getattr(armed, '_qarray_kv_attention', False):
        original, had_own = armed.original, armed.had_own
    else:
        original, had_own = module.attention_fn, 'attention_fn' in vars(module)
    written = dict(getattr(armed, 'written', {})) if getattr(armed, '_qarray_kv_attention', False) else {}
    written[name] = new
    fn = _make_attention(module, original, had_own, written, frame)
    object.__setattr__(module, 'attention_fn', fn)


def _restore(module: Any, original: Callable, had_own: bool) -> None:
    if had_own:
        object.__setattr__(module, 'attention_fn', original)
    elif 'attention_fn' in vars(module):
        object.__delattr__(module, 'attention_fn')


def _make_attention(module: Any, original: Callable, had_own: bool, written: dict, frame: Any) -> Callable:
    where = _describe(frame)

    def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
                     dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
                     force_fp32_for_softmax=False, qk_attn_weights_einsum=None, attn_weights_value_einsum=None,
                     is_causal=False):
        _restore(owner, original, had_own)  # one call only: this module call's attention
        if not (_same(key, written.get('cached_key')) and _same(value, written.get('cached_value'))):
            raise ValueError(f"{where}: attention_fn was called with keys/values other than the quantized cache "
                             "just written; only Flax's decode path (write, then attend) is supported.")
        return _quantized_attention(where, query, key, value, bias, mask, dropout_rate, deterministic, dtype,
                                    precision, module, qk_attn_weights_einsum, attn_weights_value_einsum, is_causal)

    owner = module
    attention_fn._qarray_kv_attention = True
    attention_fn.original, attention_fn.had_own, attention_fn.written = original, had_own, written
    return attention_fn


def _quantized_attention(where, query, key, value, bias, mask, dropout_rate, deterministic, dtype, precision,
                         module, qk_einsum, wv_einsum, is_causal) -> jax.Array:
    if dropout_rate > 0.0 and not deterministic:
        raise ValueError(f"{where}: attention dropout (dropout_rate={dropout_rate}, not deterministic) is not "
                         "supported with a quantized KV cache; decode with deterministic=True.")
    if module is not None:
        raise ValueError(f"{where}: sow_weights=True needs the attention weights, which the quantized KV cache "
                         "read never materialises; call without sow_weights.")
    if bias is not None or is_causal or qk_einsum is not None or wv_einsum is not None:
        raise ValueError(f"{where}: the quantized KV cache read takes a boolean/0-1 mask only (no bias, is_causal, "
                         "or custom einsums).")
    B, T, H, D = key.shape
    query = jnp.asarray(query)
    out_dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(query.dtype, key.dtype)
    if mask is None:
        raise ValueError(f"{where}: expected Flax's decode mask (arange(max_len) <= cache_index); got none.")
    mask = jnp.asarray(mask)
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, B) or mask.shape[2:] not in ((1, T), (1, 1)):
        raise ValueError(f"{where}: the quantized KV cache read takes a mask shared by all heads, shape "
                         f"[batch, 1, 1, max_len] = ({B}, 1, 1, {T}); got {tuple(mask.shape)}.")
    keep = jnp.broadcast_to(mask[:, 0, 0, :] != 0, (B, T))
    with _interception.provider_code():  # kv_cache's own einsums are not ops of the model
        out = kv_cache.attention(query.astype(out_dtype), key.as_kv_cache(value), keep, precision=precision)
    return out


# --------------------------------------------------------------------------- a provider with the hooks
class _KVCacheHooks:
    """Mixin: the three hooks :class:`~flax_integration.providers.Provider` needs for ``kv_cache_qtype``."""

    def intercepts(self):
        base = tuple(super().intercepts())
        if not wants_kv_cache(self.rules) or any(i.name == INTERCEPT.name for i in base):
            return base
        return (*base, INTERCEPT)

    def process_extra_op(self, op):
        if op.name == INTERCEPT.name:
            return process_cache_write(self, op)
        return super().process_extra_op(op)

    def handle(self, call, frame):
        prepare_cache(self, frame)
        return super().handle(call, frame)


def with_kv_cache(provider: Any) -> Any:
    """``provider`` with the hooks that honour ``kv_cache_qtype`` (a copy of a subclass of its class).

    The hooks: declare :data:`INTERCEPT` when a rule sets ``kv_cache_qtype``, route it to
    :func:`process_cache_write`, and call :func:`prepare_cache` before each op. Once ``Provider`` itself
    has them, this returns an equivalent provider (the mixin defers to the base where both exist).

    Example:
      >>> import flax_integration as fi
      >>> from flax_integration._kv_cache import with_kv_cache
      >>> p = with_kv_cache(fi.PtqProvider([fi.QuantizationRule(kv_cache_qtype='int8')]))
      >>> isinstance(p, fi.PtqProvider), [i.name for i in p.intercepts()]
      (True, ['kv_cache_write'])
    """
    cls = type(provider)
    if not isinstance(provider, _KVCacheHooks):
        cls = type(cls.__name__, (_KVCacheHooks, cls), {'__module__': cls.__module__, '__qualname__': cls.__qualname__})
    out = object.__new__(cls)
    out.__dict__.update(provider.__dict__)
    out.__dict__.pop('_qarray_intercept_names', None)
    return out
