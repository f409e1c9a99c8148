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

Flax section (``--flax-tokens``): a Linen ``nn.MultiHeadDotProductAttention(decode=True)`` (8 heads x 64,
features 512, batch 1) decoding with Flax's float cache vs the same model quantized with
``QuantizationRule(kv_cache_qtype='int8' / 'fp8')`` (flax_integration/_kv_cache.py; weights stay float):
'cache' collection bytes, the relative error of the attention layer's output over ``--flax-steps`` decode
steps (max over steps of ||y - y_float|| / ||y_float||), and time per jitted decode step (cache donated),
interleaved as above. Flax's float attention and the quantized read both attend over the whole cache
(Flax masks, it does not skip), so the timing is at any fill.

Writes the tables to ``--out`` (default benchmarks/results_kv.md) with the machine (lscpu) and core count.

Usage:  python benchmarks/kv_cache_bench.py [--tokens 4096] [--rounds 15] [--round-ms 150] [--block 512]
                                            [--flax-tokens 2048] [--flax-steps 16] [--out benchmarks/results_kv.md]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qarray  # noqa: E402
from benchmarks import pairbench  # noqa: E402
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


def machine() -> str:
    """CPU model (lscpu) and core count."""
    return (f"{pairbench.cpu_name()}, {os.cpu_count()} cores visible, "
            f"jax {jax.__version__} on {jax.devices()[0].platform}")


def interleave(rows, args, call):
    """Median seconds per call for each row, timed round-robin (order rotated per round)."""
    for r in rows:
        call(r)
        t0 = time.perf_counter()
        call(r)
        r['iters'] = max(2, int(args.round_ms / 1e3 / (time.perf_counter() - t0)))
        r['times'] = []
    for rnd in range(args.rounds):
        for r in rows[rnd % len(rows):] + rows[:rnd % len(rows)]:
            call(r)
            t0 = time.perf_counter()
            for _ in range(r['iters']):
                call(r)
            r['times'].append((time.perf_counter() - t0) / r['iters'])


def flax_rows(args) -> list[str]:
    """The Flax decoding table (see the module docstring)."""
    from flax import linen as nn
    import flax_integration as fi
    from flax_integration._kv_cache import with_kv_cache
    T, steps, F = args.flax_tokens, args.flax_steps, 512
    model = nn.MultiHeadDotProductAttention(num_heads=8, qkv_features=F, decode=True)
    x = jax.random.normal(jax.random.key(1), (1, T, F))
    rows = [dict(name='float32 (Flax)', model=model)]
    for qtype in ('int8', 'fp8'):
        rules = [fi.QuantizationRule(kv_cache_qtype=qtype)]
        rows.append(dict(name=f'{qtype} (kv_cache_qtype)', model=fi.quantize_model(model, with_kv_cache(fi.PtqProvider(rules)))))
    params = model.init(jax.random.key(0), x[:, :8])['params']
    for r in rows:
        m = r['model']
        r['step'] = jax.jit(lambda p, c, xt, m=m: m.apply({'params': p, 'cache': c}, xt, mutable=['cache']),
                            donate_argnums=1)
        cache = m.init(jax.random.key(0), x)['cache']
        r['bytes'] = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
        outs = []
        for t in range(steps):
            y, upd = r['step'](params, cache, x[:, t:t + 1])
            cache = upd['cache']
            outs.append(np.asarray(y, np.float64))
        r['outs'], r['cache'] = outs, cache
    ref = rows[0]['outs']
    for r in rows:
        r['err'] = max(np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(r['outs'], ref))
    xt = x[:, steps:steps + 1]

    def call(r):
        y, upd = r['step'](params, r['cache'], xt)
        r['cache'] = upd['cache']
        y.block_until_ready()
    interleave(rows, args, call)
    base = np.array(rows[0]['times'])
    lines = [f"Flax decode step: nn.MultiHeadDotProductAttention(decode=True), batch 1, 8 heads x 64, cache of {T} "
             f"tokens; error over {steps} steps; {args.rounds} interleaved rounds of ~{args.round_ms:.0f} ms per row",
             '', '| Flax cache | cache collection bytes | vs float32 | max rel err of output | ms/step (median) '
             '| vs float32 |', '|---|---:|---:|---:|---:|---:|']
    for r in rows:
        t = np.array(r['times'])
        lines.append(f"| {r['name']} | {r['bytes'] / 2**20:.2f} MiB | {r['bytes'] / rows[0]['bytes']:.3f} | "
                     f"{r['err']:.2e} | {np.median(t) * 1e3:.3f} | {np.median(t / base):.2f}x |")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--tokens', type=int, default=4096)
    ap.add_argument('--rounds', type=int, default=15)
    ap.add_argument('--round-ms', type=float, default=150.0,
                    help='time per row per round: steps per round = this / one step (at least 2)')
    ap.add_argument('--block', type=int, default=512)
    ap.add_argument('--flax-tokens', type=int, default=2048)
    ap.add_argument('--flax-steps', type=int, default=16)
    ap.add_argument('--out', default=str(Path(__file__).resolve().parent / 'results_kv.md'))
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
    def call(r):
        r['cache'], out = r['step'](r['cache'], q, new_k, new_v, pos)
        out.block_until_ready()
    interleave(rows, args, call)
    base = np.array(rows[0]['times'])

    fb = rows[0]['bytes']
    lines = [f"KV cache decode step (qarray.kv_cache): batch {B}, {H} kv heads x {D}, {HQ} q heads, {T} tokens, "
             f"block {args.block}; {args.rounds} interleaved rounds of ~{args.round_ms:.0f} ms per row", '',
             '| cache | bytes (K+V) | vs float32 | step temp | rel err, gaussian | rel err, outlier channels '
             '| ms/step (median) | vs float32 |', '|---|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        t = np.array(r['times'])
        lines.append(f"| {r['name']} | {r['bytes'] / 2**20:.2f} MiB | {r['bytes'] / fb:.3f} | "
                     f"{r['temp'] / 2**20:.2f} MiB | {r['gaussian']:.2e} | {r['outlier channels']:.2e} | "
                     f"{np.median(t) * 1e3:.3f} | {np.median(t / base):.2f}x |")
    lines += [''] + flax_rows(args)
    text = '\n'.join(["# KV cache measurements", '', f"machine: {machine()}", ''] + lines) + '\n'
    print(text)
    Path(args.out).write_text(text)


if __name__ == '__main__':
    main()
