"""The cache itself: :class:`KVCache` (codes + scales, a pytree), :func:`init`, :func:`update`, :func:`nbytes`.

See :mod:`qarray.kv_cache` for the formats; the block-by-block read is in
:mod:`qarray.kv_cache._attention`.

Example:
  >>> from qarray.kv_cache._cache import init
  >>> init(1, 16, kv_heads=2, head_dim=8, qtype='int8').k_scale.shape   # one scale per token per head
  (1, 16, 2, 1)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import qarray
from qarray import qtypes

__all__ = ['KVCache', 'init', 'update', 'nbytes', 'SUPPORTED_QTYPES']

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
