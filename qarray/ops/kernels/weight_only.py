"""Fused weight-only matmul in JAX Pallas (Triton backend): ``x[M, K] @ dequant(W)``.

Each program owns ``block_n`` output columns (and one of ``split_k`` K
chunks). It walks K in steps of ``block_k`` (= the scale tile when scales are
tiled), loads that step's packed weight bytes once, unpacks and converts them
in registers, runs a bf16 (or f16/f32) dot against x with f32 accumulation,
and multiplies the [M, block_n] partial by the tile's scales — applying the
scale after the dot costs M*block_n multiplies instead of K*block_n and keeps
int codes exact in bf16. Rows of x past M are masked (Triton's dot needs at
least 16 rows), never padded in memory.

This module imports Pallas at import time; import it lazily (the package's
``__init__`` does) so that ``import qarray`` works without a GPU jaxlib.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from qarray.ops.kernels import layout, config, weight_only
  >>> q = layout.prepare_weight(jax.random.normal(jax.random.key(0), (128, 64)), 'int4', tile=64)
  >>> lay = layout.describe(q, 1)
  >>> x = jnp.ones((2, 128), jnp.float32)
  >>> weight_only.matmul(x, q, lay, config.KernelConfig(block_n=32, block_k=64), interpret=True).shape
  (2, 64)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qarray import _array
from qarray.ops.kernels.config import KernelConfig
from qarray.ops.kernels.layout import WeightLayout, kernel_operands

__all__ = ['matmul']

_CONTRACT_LAST = (((1,), (1,)), ((), ()))   # a[m, k] . b[n, k]
_CONTRACT_KN = (((1,), (0,)), ((), ()))     # a[m, k] . b[k, n]


def _dot(a: jax.Array, b: jax.Array, orient: str) -> jax.Array:
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dn = _CONTRACT_LAST if orient == 'nk' else _CONTRACT_KN
    return jax.lax.dot_general(a, b, dn, precision=precision, preferred_element_type=jnp.float32)


def _nibble_values(nib: jax.Array, fmt: str, offset: bool, cb_ref: Any, dtype: Any) -> jax.Array:
    """4-bit fields (int32 0..15) -> values in the compute dtype (before scaling)."""
    if fmt == 'nf4':
        return cb_ref[nib]  # 16-entry code book gathered from L1
    if offset:
        return (nib ^ 8).astype(dtype)  # code + 8, in 0..15; the caller subtracts 8*sum(x)
    return ((nib ^ 8) - 8).astype(dtype)  # sign-extend the two's complement nibble


def _kernel(x_ref, w_ref, s_ref, cb_ref, o_ref, *, m: int, lay: WeightLayout, cfg: KernelConfig,
            dtype: Any):
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    kc = lay.k // cfg.split_k            # K values per split
    n0 = pl.multiple_of(pl.program_id(0) * bn, bn)
    pid_s = pl.program_id(1)
    m0 = pl.multiple_of(pl.program_id(2) * bm, bm)
    row_ok = (m0 + jnp.arange(bm))[:, None] < m
    four_bit = lay.fmt in ('int4', 'nf4')
    offset = lay.fmt == 'int4' and cfg.int4_offset
    nk = lay.orient == 'nk'

    def weights(k0):
        if not four_bit:
            if nk:
                return w_ref[pl.ds(n0, bn), pl.ds(k0, bk)].astype(dtype)
            return w_ref[pl.ds(k0, bk), pl.ds(n0, bn)].astype(dtype)
        kb = pl.multiple_of(k0 // 2, bk // 2)
        if nk:
            b = w_ref[pl.ds(n0, bn), pl.ds(kb, bk // 2)].astype(jnp.int32)
        else:
            b = w_ref[pl.ds(kb, bk // 2), pl.ds(n0, bn)].astype(jnp.int32)
        lo = _nibble_values(b & 15, lay.fmt, offset, cb_ref, dtype)   # even k
        hi = _nibble_values(b >> 4, lay.fmt, offset, cb_ref, dtype)   # odd k
        return lo, hi

    def tile_product(k0):
        x = plgpu.load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)], mask=row_ok, other=0).astype(dtype)
        w = weights(k0)
        if not four_bit:
            part = _dot(x, w, lay.orient)
        elif nk and cfg.unpack == 'join':
            lo, hi = w
            part = _dot(x, jnp.stack([lo, hi], axis=-1).reshape(bn, bk), 'nk')
        else:
            lo, hi = w
            xe, xo = jnp.unstack(x.reshape(bm, bk // 2, 2), axis=-1)
            part = _dot(xe, lo, lay.orient) + _dot(xo, hi, lay.orient)
        if offset:
            part = part - 8.0 * jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True)
        return part

    def body(i, acc):
        k0 = pl.multiple_of(pid_s * kc + i * bk, bk)
        part = tile_product(k0)
        if lay.tile is not None:
            kt = k0 // bk
            s = s_ref[pl.ds(n0, bn), kt] if nk else s_ref[kt, pl.ds(n0, bn)]
            part = part * s.astype(jnp.float32)[None, :]
        return acc + part

    acc = jax.lax.fori_loop(0, kc // bk, body, jnp.zeros((bm, bn), jnp.float32))
    if lay.tile is None:
        s = s_ref[pl.ds(n0, bn), 0] if nk else s_ref[0, pl.ds(n0, bn)]
        acc = acc * s.astype(jnp.float32)[None, :]
    if cfg.split_k == 1:
        plgpu.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype), mask=row_ok)
    else:
        plgpu.store(o_ref.at[pid_s, pl.ds(m0, bm), pl.ds(n0, bn)], acc, mask=row_ok)


@functools.partial(jax.jit, static_argnames=('lay', 'cfg', 'out_dtype', 'interpret'))
def _launch(x2, w, s, cb, *, lay: WeightLayout, cfg: KernelConfig, out_dtype: Any, interpret: bool):
    m = x2.shape[0]
    dtype = x2.dtype if x2.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    grid = (lay.n // cfg.block_n, cfg.split_k, -(-m // cfg.block_m))
    if cfg.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((m, lay.n), out_dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((cfg.split_k, m, lay.n), jnp.float32)
    kernel = functools.partial(_kernel, m=m, lay=lay, cfg=cfg, dtype=dtype)
    out = pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, interpret=interpret, name=f'qarray_wo_{lay.fmt}_{lay.orient}',
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )(x2, w, s, cb.astype(dtype))
    if cfg.split_k > 1:
        out = out.sum(axis=0).astype(out_dtype)
    return out


def matmul(x: jax.Array, q: _array.QArray, lay: WeightLayout, cfg: KernelConfig, *,
           out_dtype: Any = None, interpret: bool = False) -> jax.Array:
    """``x[..., K] @ W`` with W read in layout ``lay`` and tiled by ``cfg`` (no checks: see ``describe``/``fits``).

    ``out_dtype`` defaults to the dtype of ``x @ dequantize(q)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from qarray.ops.kernels import layout, config, weight_only
      >>> q = layout.prepare_weight(jnp.ones((64, 32)), 'int8', tile=None)
      >>> cfg = config.KernelConfig(block_n=32, block_k=64)
      >>> weight_only.matmul(jnp.ones((1, 64)), q, layout.describe(q, 1), cfg, interpret=True).shape
      (1, 32)
    """
    out_dtype = jnp.dtype(out_dtype or jnp.result_type(x.dtype, q.dtype))
    w, s = kernel_operands(q, lay)
    cb = jnp.asarray(q.qtype.codebook if lay.fmt == 'nf4' else jnp.zeros(16), jnp.float32)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    out = _launch(x2, w, s, cb, lay=lay, cfg=cfg, out_dtype=out_dtype, interpret=bool(interpret))
    return out.reshape(*lead, lay.n)
