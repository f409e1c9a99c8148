"""Decoding with a quantized KV cache (qarray.kv_cache): bytes, error and time per step.

One decoding step = write the new token's k/v into the cache (``kv_cache.update``) and attend
over every filled token (``kv_cache.attention``, block by block), jitted with the cache donated.
Shapes: batch 1, 8 kv heads x 64 dims, 32 query heads (GQA groups of 4), cache of 4096 tokens,
filled to the end (the step writes token 4095 and reads all 4096).

Rows: float32 cache (same block loop), int8 / fp8 (e4m3) with one scale per token per head,
int4 with one scale per 32 or 64 values of head_dim; plus two naive rows that dequantize the
whole cache and run ordinary softmax attention (what the block loop avoids).

Columns:
* cache bytes: stored codes + scales of K and V (``kv_cache.nbytes``) and the ratio to float32;
* step temp: compiled temporaries of the jitted step (``memory_analysis().temp_size_in_bytes``);
* rel err: ||out - out_float|| / ||out_float|| of the step's attention output (32 heads x 64)
  against the float32 cache holding the same tokens, for two kinds of data (below);
* ms/step: median over rounds; each round times every row back to back (interleaved, order
  rotated per round) so machine load hits all rows alike; "vs float" is the median of the
  per-round ratios to the float32 row of the same round.

Data: "gaussian": keys, values and queries standard normal (logits of std ~1 after the 1/sqrt(64)
scale: a broad softmax). "outlier channels": keys' channels scaled by log-normal factors
(sigma 0.75, so a few channels are ~5-10x larger, as in LLM keys) and the queries by the same
pattern (logit std ~3, a peaked softmax); values standard normal. Per-token scales put every
channel of a token on the step of its largest channel, so outlier channels cost the small ones
precision, most visibly at 4 bits. Timings use the gaussian data.

Usage:  python benchmarks/kv_cache_bench.py [--tokens 4096] [--rounds 15] [--round-ms 150] [--block 512]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qarray  # noqa: E402
from qarray import kv_cache  # noqa: E402

B, H, D, HQ = 1, 8, 64, 32
ROWS = [('float32', None, None), ('int8', 'int8', None), ('fp8 e4m3', 'fp8', None),
        ('int4 tile 64', 'int4', 64), ('int4 tile 32', 'int4', 32)]
DATA = ('gaussian', 'outlier channels')
NAIVE_ROWS = [('float32, naive', None, None), ('int8, naive (dequantize all)', 'int8', None)]


def make_data(tokens: int, kind: str = 'gaussian', seed: int = 0):
    rng = np.random.default_rng(seed)
    sigma = {'gaussian': 0.0, 'outlier channels': 0.75}[kind]
    channel = np.exp(rng.normal(0.0, sigma, (1, 1, H, D))).astype(np.float32)
    k = (rng.standard_normal((B, tokens, H, D)) * channel).astype(np.float32)
    v = rng.standard_normal((B, tokens, H, D)).astype(np.float32)
    q = (rng.standard_normal((B, 1, HQ, D)) * np.repeat(channel, HQ // H, axis=2)).astype(np.float32)
    return k, v, q


def naive_attention(q, cache, lengths):
    """Dequantize the whole cache, then ordinary masked softmax attention."""
    k = qarray.dequantize(cache.k) if cache.quantized else cache.k
    v = qarray.dequantize(cache.v) if cache.quantized else cache.v
    g = q.shape[2] // cache.kv_heads
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum('bshd,bthd->bhst', q, k) / math.sqrt(cache.head_dim)
    mask = jnp.arange(cache.max_len)[None, :] < lengths[:, None]
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    return jnp.einsum('bhst,bthd->bshd', jax.nn.softmax(s, axis=-1), v)


def make_step(attend):
    @functools.partial(jax.jit, donate_argnums=0)
    def step(cache, q, k, v, pos):
        cache = kv_cache.update(cache, k, v, pos)
        return cache, attend(q, cache, pos + 1)
    return step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--tokens', type=int, default=4096)
    ap.add_argument('--rounds', type=int, default=15)
    ap.add_argument('--round-ms', type=float, default=150.0,
                    help='time per row per round: steps per round = this / one step (at least 2)')
    ap.add_argument('--block', type=int, default=512)
    args = ap.parse_args(argv)
    T = args.tokens
    k, v, q = make_data(T)
    pos = jnp.full((B,), T - 1, jnp.int32)  # the step writes the last token and reads all T
    new_k, new_v = jnp.asarray(k[:, -1:]), jnp.asarray(v[:, -1:])
    blocked = lambda q, c, l: kv_cache.attention(q, c, l, block=args.block)

    rows = []
    for name, qtype, tile in ROWS + NAIVE_ROWS:
        cache = kv_cache.init(B, T, H, D, qtype, tile=tile)
        cache = kv_cache.update(cache, k[:, :-1], v[:, :-1], 0)  # tokens 0..T-2; the step adds T-1
        step = make_step(naive_attention if 'naive' in name else blocked)
        mem = step.lower(cache, q, new_k, new_v, pos).compile().memory_analysis()
        rows.append(dict(name=name, cache=cache, step=step, bytes=kv_cache.nbytes(cache),
                         temp=mem.temp_size_in_bytes, times=[]))

    # Output error vs the float32 cache (every row sees the same tokens), for both kinds of data.
    for kind in DATA:
        kk, vv, qq = make_data(T, kind)
        outs = {}
        for r in rows:
            cache = kv_cache.update(r['cache'], kk[:, :-1], vv[:, :-1], 0)
            cache, out = r['step'](cache, qq, jnp.asarray(kk[:, -1:]), jnp.asarray(vv[:, -1:]), pos)
            outs[r['name']] = np.asarray(out, np.float64)
            r['cache'] = kv_cache.update(cache, k[:, :-1], v[:, :-1], 0)  # back to the timing data
        ref = outs['float32']
        for r in rows:
            r[kind] = float(np.linalg.norm(outs[r['name']] - ref) / np.linalg.norm(ref))

    # Interleaved timing.
    for r in rows:
        r['cache'], out = r['step'](r['cache'], q, new_k, new_v, pos)
        t0 = time.perf_counter()
        r['cache'], out = r['step'](r['cache'], q, new_k, new_v, pos)
        out.block_until_ready()
        r['iters'] = max(2, int(args.round_ms / 1e3 / (time.perf_counter() - t0)))
    for rnd in range(args.rounds):
        order = rows[rnd % len(rows):] + rows[:rnd % len(rows)]
        for r in order:
            c = r['cache']
            c, out = r['step'](c, q, new_k, new_v, pos)  # warm this row after the others ran
            out.block_until_ready()
            t0 = time.perf_counter()
            for _ in range(r['iters']):
                c, out = r['step'](c, q, new_k, new_v, pos)
            out.block_until_ready()
            r['times'].append((time.perf_counter() - t0) / r['iters'])
            r['cache'] = c
    base = np.array(rows[0]['times'])

    fb = rows[0]['bytes']
    print(f"KV cache decode step: batch {B}, {H} kv heads x {D}, {HQ} q heads, {T} tokens, block {args.block}; "
          f"{args.rounds} interleaved rounds of ~{args.round_ms:.0f} ms per row")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print()
    print('| cache | bytes (K+V) | vs float32 | step temp | rel err, gaussian | rel err, outlier channels '
          '| ms/step (median) | vs float32 |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|')
    for r in rows:
        t = np.array(r['times'])
        print(f"| {r['name']} | {r['bytes'] / 2**20:.2f} MiB | {r['bytes'] / fb:.3f} | "
              f"{r['temp'] / 2**20:.2f} MiB | {r['gaussian']:.2e} | {r['outlier channels']:.2e} | "
              f"{np.median(t) * 1e3:.3f} | {np.median(t / base):.2f}x |")


if __name__ == '__main__':
    main()
