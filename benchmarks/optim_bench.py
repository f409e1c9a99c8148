"""8-bit Adam (qarray.optim.adamw_8bit) against optax.adamw: quality, state bytes and step time.

Trains one MLP on the digits data (examples/digits: 64 -> 512 -> 256 -> 10, ReLU; its two large kernels,
32768 and 131072 values, get 8-bit moments, the 2560-value head and the biases keep float32 ones, as
min_size=4096 says) with the same data order and initial params, for each optimizer: optax.adamw, and
adamw_8bit with nearest and with stochastic rounding. Reports the final train loss and test accuracy (mean and
spread over seeds), the optimizer state's bytes, and the step time of each 8-bit variant against float AdamW,
timed interleaved in one loop (benchmarks/pairbench.py: median of per-round ratios, wall and process CPU), for
the optimizer update alone and for the whole jitted train step.

Usage:  python benchmarks/optim_bench.py [--steps 600] [--seeds 3] [--rounds 40] [--out benchmarks/results_optim.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pairbench  # noqa: E402
import qarray.optim as qo  # noqa: E402
from examples.digits import data as digits_data  # noqa: E402

SIZES = (64, 512, 256, 10)


def init_mlp(key: jax.Array) -> dict:
    params = {}
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        key, k = jax.random.split(key)
        params[f'dense{i}'] = {'kernel': jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a), 'bias': jnp.zeros(b)}
    return params


def apply_mlp(params: dict, x: jax.Array) -> jax.Array:
    h = x.reshape(x.shape[0], -1)
    for i in range(len(SIZES) - 1):
        p = params[f'dense{i}']
        h = h @ p['kernel'] + p['bias']
        if i < len(SIZES) - 2:
            h = jax.nn.relu(h)
    return h


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(apply_mlp(params, x), y).mean()


def make_step(opt):
    @jax.jit
    def step(params, state, x, y):
        loss, g = jax.value_and_grad(loss_fn)(params, x, y)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state, loss
    return step


def optimizers(lr: float, steps: int) -> dict:
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, steps // 20, steps, lr / 100)
    return {'optax.adamw': optax.adamw(sched, weight_decay=1e-4),
            'adamw_8bit nearest': qo.adamw_8bit(sched, weight_decay=1e-4),
            'adamw_8bit stochastic': qo.adamw_8bit(sched, weight_decay=1e-4, rounding='stochastic')}


def train(opt, d, seed: int, steps: int, batch: int) -> tuple[float, float]:
    """Final mean train loss over the last 5 % of steps and test accuracy."""
    params = init_mlp(jax.random.key(seed))
    state = opt.init(params)
    step = make_step(opt)
    rng = np.random.default_rng(seed)
    xtr, ytr = jnp.asarray(d.x_train), jnp.asarray(d.y_train)
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, len(d.y_train), batch)
        params, state, loss = step(params, state, xtr[idx], ytr[idx])
        losses.append(loss)
    tail = float(np.mean(np.asarray(losses[-max(1, steps // 20):])))
    acc = float(jnp.mean(jnp.argmax(apply_mlp(params, jnp.asarray(d.x_test)), -1) == jnp.asarray(d.y_test)))
    return tail, acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--steps', type=int, default=600)
    ap.add_argument('--seeds', type=int, default=3)
    ap.add_argument('--batch', type=int, default=128)
    ap.add_argument('--lr', type=float, default=3e-3)
    ap.add_argument('--rounds', type=int, default=40)
    ap.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results_optim.md'))
    args = ap.parse_args()

    d = digits_data.load()
    opts = optimizers(args.lr, args.steps)
    params = init_mlp(jax.random.key(0))
    n_params = sum(p.size for p in jax.tree.leaves(params))

    quality = {}
    for name, opt in opts.items():
        runs = [train(opt, d, seed, args.steps, args.batch) for seed in range(args.seeds)]
        quality[name] = runs
        print(name, runs, flush=True)

    # Step time: the optimizer update alone and the whole train step, each 8-bit variant vs float AdamW in one
    # interleaved loop.
    x, y = jnp.asarray(d.x_train[:args.batch]), jnp.asarray(d.y_train[:args.batch])
    grads = jax.grad(loss_fn)(params, x, y)
    timing = {}
    ref = opts['optax.adamw']
    ref_update, ref_step = jax.jit(ref.update), make_step(ref)
    for name in ('adamw_8bit nearest', 'adamw_8bit stochastic'):
        opt = opts[name]
        upd = pairbench.time_pair(ref_update, (grads, ref.init(params), params), jax.jit(opt.update),
                                  (grads, opt.init(params), params), rounds=args.rounds)
        stp = pairbench.time_pair(ref_step, (params, ref.init(params), x, y), make_step(opt),
                                  (params, opt.init(params), x, y), rounds=args.rounds)
        timing[name] = (upd, stp)
        print(name, 'update', upd, 'step', stp, flush=True)

    def fmt(vals, digits):
        return f"{statistics.mean(vals):.{digits}f} ± {statistics.pstdev(vals):.{digits}f}"

    lines = [
        '# 8-bit AdamW (qarray.optim) vs optax.adamw',
        '',
        f"Machine: {pairbench.cpu_name()}, {os.cpu_count()} cores; {pairbench.machine()}. Load average at the end: "
        f"{os.getloadavg()[0]:.1f} (the machine is shared: ratios come from interleaved rounds).",
        '',
        f"MLP {' -> '.join(map(str, SIZES))} on the digits data ({n_params} params; the kernels of 32768 and 131072 "
        f"values get 8-bit moments, the 2560-value head and the biases float32 ones: min_size=4096), "
        f"{args.steps} steps of batch {args.batch}, warmup-cosine lr {args.lr}, weight decay 1e-4, "
        f"{args.seeds} seeds (same init and data order for every optimizer). Loss: mean train loss over the last "
        f"5 % of steps; accuracy on the 449 held-out images.",
        '',
        '| optimizer | final train loss | test accuracy | state bytes | vs float32 |',
        '|---|---|---|---|---|',
    ]
    f32_bytes = qo.state_nbytes(opts['optax.adamw'].init(params))
    for name, runs in quality.items():
        b = qo.state_nbytes(opts[name].init(params))
        lines.append(f"| {name} | {fmt([r[0] for r in runs], 4)} | {fmt([r[1] for r in runs], 4)} | {b} | "
                     f"{b / f32_bytes:.3f} |")
    lines += [
        '',
        'Step time, each 8-bit variant against optax.adamw in one interleaved loop (median ms; ratio = median of '
        'per-round 8-bit / float, wall and process CPU; IQR of the wall ratio):',
        '',
        '| 8-bit variant | what | float ms | 8-bit ms | ratio wall | IQR | ratio CPU |',
        '|---|---|---|---|---|---|---|',
    ]
    for name, (upd, stp) in timing.items():
        for what, r in (('optimizer update', upd), ('train step (fwd+bwd+update)', stp)):
            lines.append(f"| {name} | {what} | {r['a_wall_ms']:.3f} | {r['b_wall_ms']:.3f} | {r['ratio_wall']:.2f}x | "
                         f"{r['ratio_wall_q1']:.2f}-{r['ratio_wall_q3']:.2f} | {r['ratio_cpu']:.2f}x |")
    text = '\n'.join(lines) + '\n'
    print(text)
    with open(args.out, 'w') as f:
        f.write(text)


if __name__ == '__main__':
    main()
