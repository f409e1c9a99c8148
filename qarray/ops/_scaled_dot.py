"""The low-precision dot on canonical operands: ``lhs[B, M, K] . rhs[B, K, N]`` with scales.

Codes enter one ``lax.dot_general`` (int8 -> int32 accumulation, or fp8 ->
float32); scales multiply the result, never the operands, except scalar fp8
scales, which stay next to the fp8 operands (the form XLA's GPU fp8 GEMM
rewrite matches). Scales are ``lhs_scale[B|1, M|1, S]`` and
``rhs_scale[B|1, S, N|1]``: ``S`` tiles along K (``S == 1``: shared).

With ``S > 1`` each tile is contracted exactly in int32, scaled, and summed.
Two orders, chosen by size:

* ``batched``: one dot with the tiles as a batch axis -> ``[B, S, M, N]``, then a
  fused scale-and-sum. Cheap only when ``S*M*N`` is small (decode shapes).
* ``loop``: a ``fori_loop`` over tiles, each a ``[B, M, T] . [B, T, N]`` int32 dot
  whose scaled result is added into one ``[B, M, N]`` float32 accumulator. It
  never holds the ``[S, M, N]`` intermediate; on CPU it runs as fast as the
  float32 matmul, where the batched order is 6-7x slower.

Zero points enter as correction terms on the int32 sums, per tile:
``sum (a - za)(b - zb) = sum ab - za * sum b - zb * sum a + T * za * zb``.

Example:
  >>> import jax.numpy as jnp
  >>> from qarray.ops._scaled_dot import scaled_dot
  >>> a = jnp.ones((1, 2, 4), jnp.int8); b = jnp.ones((1, 4, 3), jnp.int8)
  >>> s = jnp.ones((1, 1, 1))
  >>> scaled_dot(a, s, None, b, s, None, jnp.float32).tolist()
  [[[4.0, 4.0, 4.0], [4.0, 4.0, 4.0]]]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ['scaled_dot', 'tile_order', 'LazyRows']


class LazyRows:
    """``rhs`` codes ``[B, K, N]`` made on demand per K range (e.g. unpacked from packed bytes per tile).

    The tile loop then unpacks one tile at a time into cache instead of
    writing and re-reading the whole unpacked weight.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.ops._scaled_dot import LazyRows
      >>> r = LazyRows((1, 4, 2), lambda start, size: jnp.ones((1, size, 2), jnp.int8))
      >>> r.rows(0, 2).shape, r.full().shape
      ((1, 2, 2), (1, 4, 2))
    """

    def __init__(self, shape, rows_fn):
        self.shape = tuple(shape)
        self.rows = rows_fn

    def full(self) -> jax.Array:
        return self.rows(0, self.shape[1])

_BMK_BKN = (((2,), (1,)), ((0,), (0,)))


def tile_order(b: int, m: int, k: int, n: int, s: int) -> str:
    """``'single'`` (S == 1), ``'batched'`` when ``[B, S, M, N]`` is no bigger than the larger operand, else ``'loop'``.

    Example:
      >>> from qarray.ops._scaled_dot import tile_order
      >>> tile_order(1, 1, 4096, 4096, 32), tile_order(1, 512, 4096, 4096, 32)
      ('batched', 'loop')
    """
    if s == 1:
        return 'single'
    return 'batched' if b * s * m * n <= max(b * m * k, b * k * n) else 'loop'


def _dot(a, b, dn, precision):
    if jnp.issubdtype(a.dtype, jnp.integer):
        return lax.dot_general(a, b, dn, precision=precision, preferred_element_type=jnp.int32)
    # fp8: upcast exactly; XLA's GPU rewrite turns convert(fp8) . convert(fp8) into an fp8 GEMM.
    return lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dn, precision=precision,
                           preferred_element_type=jnp.float32)


def _zp_correct(acc, za, b_sum, zb, a_sum, t):
    """Zero-point terms on an int32 tile sum; ``*_sum`` are thunks so unused sums are never built."""
    if za is not None:
        acc = acc - za * b_sum()
    if zb is not None:
        acc = acc - zb * a_sum()
    if za is not None and zb is not None:
        acc = acc + t * za * zb
    return acc


def scaled_dot(a: jax.Array, sa: jax.Array, za: jax.Array | None, b: jax.Array, sb: jax.Array,
               zb: jax.Array | None, out_dtype: Any, precision: Any = None,
               order: str | None = None) -> jax.Array:
    """``sum_k (a - za) * sa * (b - zb) * sb`` over tiles, for canonical operands; returns ``[B, M, N]``.

    Args:
      a: ``[B, M, K]`` int8 or fp8 codes; ``sa``/``za``: ``[B|1, M|1, S]`` scale / int32 zero point.
      b: ``[B, K, N]`` codes (or :class:`LazyRows`); ``sb``/``zb``: ``[B|1, S, N|1]``.
      out_dtype: result dtype. precision: passed to every ``lax.dot_general``.
      order: force ``'batched'`` or ``'loop'`` for S > 1 (default: :func:`tile_order`).

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.ops._scaled_dot import scaled_dot
      >>> a = jnp.full((1, 1, 4), 2, jnp.int8); b = jnp.ones((1, 4, 1), jnp.int8)
      >>> sa = jnp.array([[[1., 10.]]]); sb = jnp.ones((1, 2, 1))
      >>> float(scaled_dot(a, sa, None, b, sb, None, jnp.float32)[0, 0, 0])
      44.0
    """
    bsz, m, k = a.shape
    n = b.shape[2]
    s = sa.shape[2]
    t = k // s
    sa, sb = sa.astype(jnp.float32), sb.astype(jnp.float32)
    order = order or tile_order(bsz, m, k, n, s)
    if isinstance(b, LazyRows) and (s == 1 or order == 'batched'):
        b = b.full()
    if s == 1:
        return _single(a, sa, za, b, sb, zb, precision).astype(out_dtype)
    if order == 'batched':
        out = _batched(a, sa, za, b, sb, zb, s, t, precision)
    else:
        out = _loop(a, sa, za, b, sb, zb, s, t, precision)
    return out.astype(out_dtype)


def _single(a, sa, za, b, sb, zb, precision):
    scalar = sa.size == 1 and sb.size == 1
    if scalar and not jnp.issubdtype(a.dtype, jnp.integer):
        # fp8 with per-tensor scales: scales inside the dot, as the GPU fp8 GEMM pattern wants.
        return lax.dot_general(a.astype(jnp.float32) * sa.reshape(()), b.astype(jnp.float32) * sb.reshape(()),
                               _BMK_BKN, precision=precision, preferred_element_type=jnp.float32)
    acc = _dot(a, b, _BMK_BKN, precision)
    k = a.shape[2]
    acc = _zp_correct(acc, za, lambda: jnp.sum(b, axis=1, dtype=jnp.int32)[:, None, :],
                      zb, lambda: jnp.sum(a, axis=2, dtype=jnp.int32)[..., None], k)
    return acc.astype(jnp.float32) * sa * sb


def _batched(a, sa, za, b, sb, zb, s, t, precision):
    bsz, m, _ = a.shape
    n = b.shape[2]
    a4 = a.reshape(bsz, m, s, t)
    b4 = b.reshape(bsz, s, t, n)
    acc = _dot(a4, b4, (((3,), (2,)), ((0, 2), (0, 1))), precision)  # [B, S, M, N]
    za_t = None if za is None else jnp.transpose(za, (0, 2, 1))[..., None]  # [B|1, S, M|1, 1]
    zb_t = None if zb is None else zb[:, :, None, :]  # [B|1, S, 1, N|1]
    acc = _zp_correct(acc, za_t, lambda: jnp.sum(b4, axis=2, dtype=jnp.int32)[:, :, None, :], zb_t,
                      lambda: jnp.transpose(jnp.sum(a4, axis=3, dtype=jnp.int32), (0, 2, 1))[..., None], t)
    sa_t = jnp.transpose(sa, (0, 2, 1))[..., None]
    sb_t = sb[:, :, None, :]
    return jnp.sum(acc.astype(jnp.float32) * sa_t * sb_t, axis=1)


def _loop(a, sa, za, b, sb, zb, s, t, precision):
    bsz, m, _ = a.shape
    n = b.shape[2]

    def body(i, out):
        at = lax.dynamic_slice_in_dim(a, i * t, t, axis=2)
        bt = b.rows(i * t, t) if isinstance(b, LazyRows) else lax.dynamic_slice_in_dim(b, i * t, t, axis=1)
        acc = _dot(at, bt, _BMK_BKN, precision)
        zai = None if za is None else lax.dynamic_slice_in_dim(za, i, 1, axis=2)
        zbi = None if zb is None else lax.dynamic_slice_in_dim(zb, i, 1, axis=1)
        acc = _zp_correct(acc, zai, lambda: jnp.sum(bt, axis=1, dtype=jnp.int32)[:, None, :], zbi,
                          lambda: jnp.sum(at, axis=2, dtype=jnp.int32)[..., None], t)
        sai = lax.dynamic_slice_in_dim(sa, i, 1, axis=2)
        sbi = lax.dynamic_slice_in_dim(sb, i, 1, axis=1)
        return out + acc.astype(jnp.float32) * sai * sbi

    return lax.fori_loop(0, s, body, jnp.zeros((bsz, m, n), jnp.float32))
