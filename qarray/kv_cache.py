"""A quantized key/value cache for attention decoding.

Long-context decoding reads the whole KV cache for every new token, so its
cost is bound by the cache's bytes. :class:`KVCache` stores the codes and
scales of keys and values of shape ``[batch, max_len, kv_heads, head_dim]``
(read them as :class:`~qarray.QArray` views: ``cache.k``, ``cache.v``):

* ``'int8'`` and ``'fp8'`` (``float8_e4m3fn``, saturating at 448): one scale
  per token per head (``scale`` of shape ``[B, T, H, 1]``), i.e. every token's
  head vector is quantized on its own (absmax), so writing a token never
  touches another token's scale;
* ``'int4'``: the same, or with ``tile=32`` / ``64`` one scale per tile of
  ``head_dim`` (``scale`` ``[B, T, H, head_dim // tile]``); codes are
  bit-packed two per byte along ``head_dim``, so a token's write is whole bytes;
* ``qtype=None``: a float cache with the same interface, for reference.

:func:`update` quantizes new tokens and writes codes and scales in place
(``lax.dynamic_update_slice``; jit it with ``donate_argnums=0`` and XLA
updates the buffers in place). :func:`attention` runs grouped-query attention
over the cache block by block (a ``fori_loop`` over ``block``-token slices with
an online-softmax accumulator, as flash attention does), dequantizing only the
current block inside the compiled program: the cache is never materialised in
float. With ``lengths`` it stops after the last filled block.

Example:
  >>> import jax.numpy as jnp
  >>> from qarray import kv_cache
  >>> cache = kv_cache.init(2, 256, kv_heads=2, head_dim=16, qtype='fp8')  # 2 rows of up to 256 tokens
  >>> kv = jnp.sin(jnp.arange(2 * 100 * 2 * 16.)).reshape(2, 100, 2, 16)
  >>> cache = kv_cache.update(cache, kv, kv, 0)        # prefill 100 tokens per row at position 0
  >>> q = jnp.ones((2, 1, 8, 16))                      # one new token; 8 query heads share 2 kv heads
  >>> kv_cache.attention(q, cache, jnp.array([100, 37]), block=64).shape  # row 1 sees 37 tokens only
  (2, 1, 8, 16)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import qarray
from qarray import qtypes

__all__ = ['KVCache', 'init', 'update', 'attention', 'nbytes', 'SUPPORTED_QTYPES']

#: Formats a cache can hold (``None`` = float). Aliases such as ``'fp8'`` resolve to these names.
SUPPORTED_QTYPES = (None, 'int8', 'float8_e4m3fn', 'int4')

_FLOAT_NAMES = ('float', 'none')
Storage = Union[qarray.QArray, jax.Array]


@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values ``[batch, max_len, kv_heads, head_dim]``, quantized or float.

    A registered pytree whose leaves are exactly the stored arrays, so it
    passes through ``jit``, ``donate_argnums``, ``tree_map``, sharding and
    checkpointing like any array tree. Build one with :func:`init`; read it as
    QArrays through :attr:`k` and :attr:`v`.

    Attributes:
      k_data, v_data: stored codes ``[B, T, H, D]``: int8; fp8 bit patterns
        viewed as uint8 (see below); int4 packed two per byte along ``head_dim``,
        uint8 ``[B, T, H, ceil(D / 2)]``. For a float cache: the keys/values.
      k_scale, v_scale: ``[B, T, H, D // tile]`` scales (``None`` for a float cache).
      qtype: the storage format (static), ``None`` for a float cache.
      dtype: the float dtype keys and values dequantize to (static).
      head_dim: logical ``D`` (static; int4 stores ``ceil(D / 2)`` bytes).

    fp8 codes are stored as their uint8 bit patterns: XLA:CPU has no native
    float8 slicing and rewrites a ``dynamic_slice`` / ``dynamic_update_slice``
    of a float8 buffer into a full-buffer f16 conversion (a copy of the whole
    cache per decode step), and a bitcast of the whole buffer is materialised
    as a copy too; on uint8 both are plain in-place byte moves, and each block
    is bitcast back to float8 only after it is sliced.

    Example:
      >>> from qarray import kv_cache
      >>> c = kv_cache.init(2, 64, kv_heads=4, head_dim=32, qtype='int4', tile=16)
      >>> c.shape, c.qtype.name, c.tile, c.k_data.shape, c.k_scale.shape
      ((2, 64, 4, 32), 'int4', 16, (2, 64, 4, 16), (2, 64, 4, 2))
      >>> type(c.k).__name__, c.k.shape, c.k.nbytes   # the keys as a QArray: a view of k_data, k_scale
      ('QArray', (2, 64, 4, 32), 12288)
    """

    k_data: jax.Array
    v_data: jax.Array
    k_scale: jax.Array | None
    v_scale: jax.Array | None
    qtype: qtypes.QType | None
    dtype: np.dtype
    head_dim: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Logical ``(batch, max_len, kv_heads, head_dim)``."""
        return (*self.k_data.shape[:3], self.head_dim)

    @property
    def batch(self) -> int:
        """Batch size."""
        return self.shape[0]

    @property
    def max_len(self) -> int:
        """Tokens the cache can hold per batch row."""
        return self.shape[1]

    @property
    def kv_heads(self) -> int:
        """Key/value heads."""
        return self.shape[2]

    @property
    def quantized(self) -> bool:
        """Whether keys and values are stored quantized."""
        return self.qtype is not None

    @property
    def tile(self) -> int | None:
        """Values of ``head_dim`` per scale (``head_dim``: one scale per token per head); None if float."""
        return self.head_dim // self.k_scale.shape[-1] if self.quantized else None

    @property
    def k(self) -> Storage:
        """Keys: a :class:`~qarray.QArray` view of ``k_data``/``k_scale`` (the float array if unquantized)."""
        return _view(self.k_data, self.k_scale, self)

    @property
    def v(self) -> Storage:
        """Values: a :class:`~qarray.QArray` view of ``v_data``/``v_scale`` (the float array if unquantized)."""
        return _view(self.v_data, self.v_scale, self)

    @property
    def nbytes(self) -> int:
        """Stored bytes of keys and values (codes + scales, or the float arrays); see :func:`nbytes`."""
        return nbytes(self)


jax.tree_util.register_dataclass(KVCache, data_fields=['k_data', 'v_data', 'k_scale', 'v_scale'],
                                 meta_fields=['qtype', 'dtype', 'head_dim'])


def _as_bits(a: jax.Array) -> jax.Array:
    """fp8 arrays viewed as uint8 (the cache's storage for fp8 codes); other arrays unchanged."""
    if jnp.issubdtype(a.dtype, jnp.floating) and jnp.dtype(a.dtype).itemsize == 1:
        return lax.bitcast_convert_type(a, jnp.uint8)
    return a


def _view(data: jax.Array, scale: jax.Array | None, cache: KVCache) -> Storage:
    """Stored codes + scales (any token range) as a QArray; the array itself for a float cache."""
    qt = cache.qtype
    if qt is None:
        return data
    if qt.packed:
        return qarray.QArray(data, scale, qtype=qt, dtype=cache.dtype, packed_axis=-1,
                             packed_length=cache.head_dim)
    if data.dtype != qt.native_dtype:
        data = lax.bitcast_convert_type(data, qt.native_dtype)
    return qarray.QArray(data, scale, qtype=qt, dtype=cache.dtype)


# --------------------------------------------------------------------------- validation helpers
def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}.")
    return int(value)


def _resolve_qtype(qtype: Any) -> qtypes.QType | None:
    if qtype is None or (isinstance(qtype, str) and qtype.strip().lower() in _FLOAT_NAMES):
        return None
    try:
        qt = qtypes.get(qtype)
    except ValueError:
        qt = None
    if qt is None or qt.name not in SUPPORTED_QTYPES:
        raise ValueError(f"qtype={qtype!r} is not a KV cache format; use one of 'int8', 'fp8' "
                         "(float8_e4m3fn), 'int4', or None for a float cache.")
    return qt


def _float_dtype(dtype: Any, name: str) -> np.dtype:
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be a floating dtype; got {dtype!r}.") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{name} must be a floating dtype (float32, bfloat16, float16); got {dt}.")
    return dt


def _quantize_tokens(x: jax.Array, cache: KVCache) -> tuple[jax.Array, jax.Array | None]:
    """New tokens ``[B, S, H, D]`` as stored data and scales (one scale per token per head [tile])."""
    x = x.astype(cache.dtype)
    if not cache.quantized:
        return x, None
    q = qarray.quantize(x, cache.qtype, tiles=cache.tile, scale_dtype=cache.k_scale.dtype)
    return _as_bits(q.qvalue), q.scale


# --------------------------------------------------------------------------- init / update / nbytes
def init(batch: int, max_len: int, kv_heads: int, head_dim: int, qtype: Any = 'int8',
         dtype: Any = jnp.float32, *, tile: int | None = None, scale_dtype: Any = None) -> KVCache:
    """An empty (zero) cache for ``batch`` rows of up to ``max_len`` tokens.

    Args:
      batch, max_len, kv_heads, head_dim: the cache's logical shape.
      qtype: ``'int8'``, ``'fp8'`` (``'float8_e4m3fn'``), ``'int4'``, or ``None``
        (also ``'float'``) for an unquantized cache of ``dtype``.
      dtype: the float dtype keys and values are written in and dequantize to.
      tile: values of ``head_dim`` per scale (must divide it); ``None`` gives one
        scale per token per head. Typical for int4: 32 or 64.
      scale_dtype: dtype of the scales (default ``dtype``).

    Raises:
      ValueError: unknown ``qtype``; a size < 1; ``tile`` not dividing ``head_dim``.
      TypeError: non-int sizes; non-float ``dtype``/``scale_dtype``; ``tile`` with a float cache.

    Example:
      >>> from qarray import kv_cache
      >>> c = kv_cache.init(1, 1024, kv_heads=8, head_dim=64, qtype='int8')
      >>> c.k_data.dtype.name, c.k_scale.shape, c.nbytes   # 2 x (1024*8*64 B codes + 1024*8*4 B scales)
      ('int8', (1, 1024, 8, 1), 1114112)
    """
    batch, max_len = _positive_int(batch, 'batch'), _positive_int(max_len, 'max_len')
    kv_heads, head_dim = _positive_int(kv_heads, 'kv_heads'), _positive_int(head_dim, 'head_dim')
    qt = _resolve_qtype(qtype)
    dtype = _float_dtype(dtype, 'dtype')
    shape = (batch, max_len, kv_heads, head_dim)
    if qt is None:
        if tile is not None or scale_dtype is not None:
            raise TypeError("tile and scale_dtype apply to quantized caches only (qtype=None is float).")
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), None, None, qtype=None,
                       dtype=dtype, head_dim=head_dim)
    tile = head_dim if tile is None else _positive_int(tile, 'tile')
    if head_dim % tile:
        raise ValueError(f"tile={tile} must divide head_dim={head_dim} (one scale per {tile} values "
                         "of each token's head vector).")
    scale_dtype = _float_dtype(scale_dtype or dtype, 'scale_dtype')
    # The storage layout (codes dtype, packed shape) is whatever quantize produces for these shapes;
    # eval_shape gets it without computing anything, then every leaf starts at zero.
    abstract = jax.eval_shape(lambda: qarray.quantize(jnp.zeros(shape, dtype), qt, tiles=tile,
                                                      scale_dtype=scale_dtype))
    data = lambda: _as_bits(jnp.zeros(abstract.qvalue.shape, abstract.qvalue.dtype))
    scale = lambda: jnp.zeros(abstract.scale.shape, abstract.scale.dtype)
    return KVCache(data(), data(), scale(), scale(), qtype=qt, dtype=dtype, head_dim=head_dim)


def _check_tokens(x: Any, cache: KVCache, name: str) -> jax.Array:
    if isinstance(x, qarray.QArray):
        raise TypeError(f"{name} must be a float array (update quantizes it); got a QArray.")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array; got dtype {x.dtype}.")
    B, T, H, D = cache.shape
    if x.ndim != 4 or x.shape[0] != B or x.shape[2:] != (H, D) or not 1 <= x.shape[1] <= T:
        raise ValueError(f"{name} must have shape [batch={B}, new_tokens (1..{T}), kv_heads={H}, "
                         f"head_dim={D}]; got {tuple(x.shape)}.")
    return x


def _check_positions(positions: Any, batch: int, new: int, max_len: int) -> jax.Array:
    positions = jnp.asarray(positions)
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"positions must be integers; got dtype {positions.dtype}.")
    if positions.shape not in ((), (batch,)):
        raise ValueError(f"positions must be a scalar start or one start per batch row, shape ({batch},); "
                         f"got shape {positions.shape}.")
    try:
        concrete = np.asarray(positions)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        concrete = None  # traced: dynamic_update_slice clamps; see update's docstring
    if concrete is not None and (concrete.min() < 0 or concrete.max() + new > max_len):
        raise ValueError(f"positions {concrete.tolist()} + {new} new tokens must lie within [0, {max_len}] "
                         f"(max_len={max_len}).")
    return positions.astype(jnp.int32)


def _write(buf: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Write ``new`` ``[B, S, ...]`` into ``buf`` ``[B, T, ...]`` at token ``positions`` (scalar or per row)."""
    zeros = (0,) * (buf.ndim - 2)
    new = new.astype(buf.dtype)
    if positions.ndim == 0:
        return lax.dynamic_update_slice(buf, new, (0, positions, *zeros))
    row = lambda b, n, p: lax.dynamic_update_slice(b, n, (p, *zeros))
    return jax.vmap(row)(buf, new, positions)


def update(cache: KVCache, k: Any, v: Any, positions: Any) -> KVCache:
    """Quantize ``S`` new tokens per row and write them into the cache at ``positions``.

    Each new token's head vector is quantized on its own (its absmax, per tile),
    exactly as ``qarray.quantize(k, qtype, tiles=cache.tile)`` does, and its codes
    and scales are written with ``lax.dynamic_update_slice`` (int4: whole packed
    bytes along ``head_dim``). Nothing else in the cache changes. Jittable; with
    ``jax.jit(update, donate_argnums=0)`` XLA writes into the donated buffers.

    Args:
      cache: the cache.
      k, v: new keys and values, ``[batch, S, kv_heads, head_dim]``, float.
      positions: where the first new token goes: a scalar (all rows) or one int
        per batch row, shape ``[batch]`` (rows of different lengths).

    Returns:
      The updated cache (same structure, shapes and dtypes).

    Raises:
      ValueError: shapes that do not match the cache (naming ``k``/``v``/``positions``);
        concrete ``positions`` with ``position + S > max_len`` or < 0. Under ``jit``
        positions are traced and XLA clamps an out-of-range start so that the
        write fits (it then lands earlier than asked): keep ``position + S <= max_len``.
      TypeError: non-float ``k``/``v``, non-integer ``positions``.

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> from qarray import kv_cache
      >>> cache = kv_cache.init(2, 8, kv_heads=1, head_dim=4, qtype='int8')
      >>> k = jnp.array([[[[1., -2., 3., 4.]]], [[[0.5, 0., 0., -1.]]]])   # [2, 1, 1, 4]
      >>> step = jax.jit(kv_cache.update, donate_argnums=0)
      >>> cache = step(cache, k, k, jnp.array([0, 5]))       # row 0 at token 0, row 1 at token 5
      >>> cache.k.qvalue[0, 0, 0].tolist(), cache.k.qvalue[1, 5, 0].tolist()
      ([32, -64, 96, 127], [64, 0, 0, -127])
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache (see kv_cache.init); got {type(cache).__name__}.")
    k = _check_tokens(k, cache, 'k')
    v = _check_tokens(v, cache, 'v')
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {tuple(k.shape)} and v {tuple(v.shape)}.")
    positions = _check_positions(positions, cache.batch, k.shape[1], cache.max_len)
    (kd, ks), (vd, vs) = _quantize_tokens(k, cache), _quantize_tokens(v, cache)
    write = lambda buf, new: None if buf is None else _write(buf, new, positions)
    return dataclasses.replace(cache, k_data=write(cache.k_data, kd), v_data=write(cache.v_data, vd),
                               k_scale=write(cache.k_scale, ks), v_scale=write(cache.v_scale, vs))


def nbytes(cache: KVCache) -> int:
    """Stored bytes of the cache: codes (int4 packed two per byte) + scales, or the float arrays.

    Example:
      >>> from qarray import kv_cache
      >>> [kv_cache.nbytes(kv_cache.init(1, 4096, 8, 64, q)) for q in (None, 'int8', 'int4')]
      [16777216, 4456448, 2359296]
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache; got {type(cache).__name__}.")
    leaves = jax.tree_util.tree_leaves(cache)
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in leaves)


# --------------------------------------------------------------------------- attention
def attention(q: Any, cache: KVCache, lengths_or_mask: Any, *, block: int = 512,
              softmax_scale: float | None = None, precision: Any = None) -> jax.Array:
    """Grouped-query attention of ``q`` over the cache, read block by block.

    A ``fori_loop`` over ``block``-token slices of the cache: each step slices
    the codes and scales of one block, dequantizes just that block, and folds
    it into an online-softmax accumulator (running max, running sum, running
    weighted values), as flash attention does. The full cache is never
    dequantized; temporaries are O(block). Softmax and accumulation run in
    float32. Masked keys get exactly zero weight, and masked value rows are
    zeroed before use, so whatever is stored there (stale tokens, garbage, even
    NaN) cannot reach the output.

    Query head ``j`` reads kv head ``j // (Hq // kv_heads)`` (consecutive query
    heads share a kv head, as ``jnp.repeat(k, Hq // kv_heads, axis=2)``).

    Args:
      q: queries ``[batch, S, Hq, head_dim]``, ``Hq`` a multiple of ``kv_heads``.
      cache: the cache, already holding the S new tokens (call :func:`update` first).
      lengths_or_mask: either

        * integer ``lengths`` ``[batch]`` (or a scalar for all rows): row ``b``
          holds ``lengths[b]`` tokens, the last ``S`` of which are the queries'
          own, so query ``i`` sits at position ``lengths[b] - S + i`` and attends
          causally to tokens ``0 .. lengths[b] - S + i``. The loop stops after
          the last block any row needs. A row (or query) with nothing to attend
          to (``lengths[b] == 0``) outputs zeros; or
        * a boolean mask of the keys each query may see, ``[batch, max_len]``
          (the same for all queries) or ``[batch, S, max_len]``; every block is read.
      block: tokens per block (clamped to ``max_len``; need not divide it: the
        last block is aligned to the end and skips tokens already read).
      softmax_scale: multiplies the logits; default ``1 / sqrt(head_dim)``.
      precision: ``lax.Precision`` for the two dots (backend default if None;
        ``HIGHEST`` for full float32 on TPU/GPU).

    Returns:
      ``[batch, S, Hq, head_dim]`` in ``q``'s dtype.

    With ``lengths`` the loop's trip count is data-dependent (a ``while`` loop),
    which is what skips unfilled blocks; such a loop has no reverse-mode
    gradient, so this function is for inference (a mask runs a fixed count).

    Raises:
      ValueError / TypeError naming ``q``, ``lengths_or_mask``, ``block`` or ``softmax_scale``.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray import kv_cache
      >>> kv = jnp.sin(jnp.arange(2 * 100 * 2 * 16.)).reshape(2, 100, 2, 16)
      >>> q = jnp.cos(jnp.arange(2 * 1 * 8 * 16.)).reshape(2, 1, 8, 16)
      >>> lengths = jnp.array([100, 37])                  # row 1 holds 37 tokens
      >>> out = {}
      >>> for qtype in ('fp8', None):                     # fp8 cache vs float cache
      ...     cache = kv_cache.update(kv_cache.init(2, 256, 2, 16, qtype), kv, kv, 0)
      ...     out[qtype] = kv_cache.attention(q, cache, lengths, block=64)
      >>> out['fp8'].shape, bool(jnp.abs(out['fp8'] - out[None]).max() < 0.05 * jnp.abs(out[None]).max())
      ((2, 1, 8, 16), True)
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache (see kv_cache.init); got {type(cache).__name__}.")
    B, T, H, D = cache.shape
    q = jnp.asarray(q)
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q must be a floating-point array; got dtype {q.dtype}.")
    if q.ndim != 4 or q.shape[0] != B or q.shape[3] != D or q.shape[2] % H or q.shape[2] == 0:
        raise ValueError(f"q must have shape [batch={B}, S, Hq, head_dim={D}] with Hq a multiple of "
                         f"kv_heads={H}; got {tuple(q.shape)}.")
    S = q.shape[1]
    if S > T:
        raise ValueError(f"q has {S} query tokens but the cache holds at most max_len={T}.")
    block = min(_positive_int(block, 'block'), T)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float, np.floating)):
        raise TypeError(f"softmax_scale must be a Python float; got {softmax_scale!r}.")
    elif not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be finite and > 0; got {softmax_scale}.")
    lm = jnp.asarray(lengths_or_mask)
    if lm.dtype == jnp.bool_:
        if lm.shape not in ((B, T), (B, S, T)):
            raise ValueError(f"a boolean lengths_or_mask must have shape [batch, max_len] = ({B}, {T}) or "
                             f"[batch, S, max_len] = ({B}, {S}, {T}); got {lm.shape}.")
        lm = jnp.broadcast_to(lm[:, None, :] if lm.ndim == 2 else lm, (B, S, T))
        use_lengths = False
    elif jnp.issubdtype(lm.dtype, jnp.integer):
        if lm.shape not in ((), (B,)):
            raise ValueError(f"integer lengths_or_mask (lengths) must be a scalar or shape ({B},); got {lm.shape}.")
        try:
            concrete = np.asarray(lm)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            concrete = None
        if concrete is not None and (concrete.min() < 0 or concrete.max() > T):
            raise ValueError(f"lengths must lie in [0, max_len={T}]; got {concrete.tolist()}.")
        lm = jnp.broadcast_to(lm.astype(jnp.int32), (B,))
        use_lengths = True
    else:
        raise TypeError("lengths_or_mask must be integer lengths [batch] or a boolean mask "
                        f"[batch, (S,) max_len]; got dtype {lm.dtype}.")
    return _attention(q, cache, lm, jnp.float32(softmax_scale), use_lengths=use_lengths, block=block,
                      precision=precision)


def _block_values(data: jax.Array, scale: jax.Array | None, cache: KVCache, start: jax.Array,
                  block: int) -> jax.Array:
    """Tokens ``[start, start + block)`` as float ``[B, block, H, D]``: only this block is dequantized."""
    take = lambda a: lax.dynamic_slice_in_dim(a, start, block, axis=1)
    if not cache.quantized:
        return take(data)
    return qarray.dequantize(_view(take(data), take(scale), cache))


@functools.partial(jax.jit, static_argnames=('use_lengths', 'block', 'precision'))
def _attention(q, cache, lm, softmax_scale, *, use_lengths, block, precision):
    B, T, H, D = cache.shape
    _, S, Hq, _ = q.shape
    G = Hq // H
    f32 = jnp.float32
    qs = (q.astype(f32) * softmax_scale).reshape(B, S, H, G, D)
    n_total = -(-T // block)
    if use_lengths:
        qpos = lm[:, None] - S + jnp.arange(S, dtype=jnp.int32)  # [B, S] position of each query
        n_blocks = jnp.minimum((jnp.max(lm) + block - 1) // block, n_total)
    else:
        n_blocks = n_total

    def body(i, carry):
        m, l, acc = carry
        first_new = i * block
        start = jnp.minimum(first_new, T - block)  # the last block is end-aligned
        t = start + jnp.arange(block, dtype=jnp.int32)  # token positions in this block
        fresh = t >= first_new  # an end-aligned last block re-covers tokens already read
        if use_lengths:
            valid = fresh & (t[None, None, :] <= qpos[:, :, None])  # [B, S, block]
            token_used = fresh & (t[None, :] < lm[:, None])  # [B, block]
        else:
            valid = fresh & lax.dynamic_slice_in_dim(lm, start, block, axis=2)
            token_used = jnp.any(valid, axis=1)
        kb = _block_values(cache.k_data, cache.k_scale, cache, start, block).astype(f32)
        vb = _block_values(cache.v_data, cache.v_scale, cache, start, block).astype(f32)
        vb = jnp.where(token_used[:, :, None, None], vb, 0.0)  # 0 * NaN garbage would be NaN
        s = jnp.einsum('bshgd,bthd->bshgt', qs, kb, precision=precision, preferred_element_type=f32)
        s = jnp.where(valid[:, :, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing seen yet: keep exp(-inf) = 0
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        l = l * alpha + jnp.sum(p, axis=-1)
        acc = acc * alpha[..., None] + jnp.einsum('bshgt,bthd->bshgd', p, vb, precision=precision,
                                                  preferred_element_type=f32)
        return m_new, l, acc

    init = (jnp.full((B, S, H, G), -jnp.inf, f32), jnp.zeros((B, S, H, G), f32),
            jnp.zeros((B, S, H, G, D), f32))
    _, l, acc = lax.fori_loop(0, n_blocks, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # rows with nothing to attend to -> 0
    return out.reshape(B, S, Hq, D).astype(q.dtype)
