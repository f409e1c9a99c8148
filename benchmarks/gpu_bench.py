"""GPU benchmark for issue 9: weight-only / w8a8 matmuls, this library vs bf16, raw int8/fp8 and Qwix 0.1.8.

Run on a GPU box (one short run, < 6 minutes on an H100 including compiles):

    PYTHONPATH=. python benchmarks/gpu_bench.py            # table -> stdout and benchmarks/RESULTS.md
    PYTHONPATH=. python benchmarks/gpu_bench.py --quick    # headline shapes only
    PYTHONPATH=. python benchmarks/gpu_bench.py --smoke    # tiny shapes on CPU, kernel interpreted (no write)

Method: every path is its own jitted function, called on rotating input sets
(distinct x and weights, together larger than 2x the L2 cache) so no call
reads a weight from L2; calls are queued back to back and blocked once at
the end of each repetition; the reported time is the median over
repetitions of (repetition time / calls). Separate calls, never several dots
in one jit (XLA would merge dots that share a weight). Speed-ups are over
bf16 ``jnp.dot`` at the same shape in the same run. Each path's result is
checked against float64 on its own dequantized operands (rows x columns
subset), relative Frobenius error, bar 4e-3 for bf16 outputs.

Qwix: imported normally, else from ``benchmarks/wheels/qwix-0.1.8-py3-none-any.whl``
(pure Python; unpacked to a temp folder and put on ``sys.path``); rows are marked when it is missing.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

import qarray
from qarray import ops
from qarray.ops import kernels

HERE = os.path.dirname(os.path.abspath(__file__))
SECTION = '## GPU (issue 9)'
L2_BYTES = 50 * 2**20          # H100: 50 MiB
TOL = 4e-3
T0 = time.perf_counter()

# Targets from the issue: (format key, minimum speed-up over bf16) at decode shapes.
TARGETS = {'int4/t64': 3.0, 'int4/t128': 3.0, 'nf4/t64': 3.0, 'nf4/t128': 3.0, 'int8/ch': 1.8, 'fp8/ch': 1.5}


def log(msg: str) -> None:
    print(f'[{time.perf_counter() - T0:6.1f}s] {msg}', flush=True)


def load_qwix():
    try:
        import qwix
        return qwix, None
    except Exception:
        pass
    for whl in sorted(glob.glob(os.path.join(HERE, 'wheels', 'qwix-*.whl'))):
        # A wheel is a zip, but qwix uses namespace packages, which zipimport cannot load: unpack it.
        target = os.path.join(tempfile.gettempdir(), 'qarray_bench_' + os.path.basename(whl)[:-4])
        try:
            if not os.path.isdir(target):
                with zipfile.ZipFile(whl) as z:
                    z.extractall(target)
            sys.path.insert(0, target)
            import qwix
            return qwix, None
        except Exception as e:  # noqa: BLE001
            return None, f'qwix import failed: {type(e).__name__}: {e}'
    return None, 'qwix not installed (no benchmarks/wheels/qwix-*.whl)'


# ----------------------------------------------------------------------------- timing
def time_fn(fn, sets, *, target_rep_s=0.02, reps=7, max_calls=400) -> float:
    """Median seconds per call over ``reps`` repetitions of back-to-back calls on rotating inputs."""
    out = None
    for args in sets:  # compile + warm every input set once
        out = fn(*args)
    jax.block_until_ready(out)
    t = time.perf_counter()
    jax.block_until_ready(fn(*sets[0]))
    est = max(time.perf_counter() - t, 1e-6)
    calls = int(min(max_calls, max(len(sets), target_rep_s / est)))
    per = []
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(calls):
            out = fn(*sets[i % len(sets)])
        jax.block_until_ready(out)  # in-order stream: the last result done means all are
        per.append((time.perf_counter() - t) / calls)
    return statistics.median(per)


def n_sets(bytes_per_set: int, smoke: bool) -> int:
    if smoke:
        return 2
    return int(min(32, max(2, math.ceil(2 * L2_BYTES / max(bytes_per_set, 1)))))


def nbytes(tree) -> int:
    return sum(int(l.size) * l.dtype.itemsize for l in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------- references
def rel_err(y, ref) -> float:
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-300))


def f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


class Subset:
    """Rows x columns of the output checked against float64 (keeps host work small)."""

    def __init__(self, m, n):
        self.r, self.c = min(m, 8), min(n, 1024)


# ----------------------------------------------------------------------------- formats
FORMATS = {  # key -> (qarray qtype, tile or None)
    'int4/t128': ('int4', 128), 'int4/t64': ('int4', 64), 'nf4/t128': ('nf4', 128), 'nf4/t64': ('nf4', 64),
    'int8/ch': ('int8', None), 'fp8/ch': ('float8_e4m3fn', None),
}
QWIX_QTYPE = {'int4': jnp.int4, 'nf4': 'nf4', 'int8': jnp.int8, 'float8_e4m3fn': jnp.float8_e4m3fn}
DN_NK = (((1,), (1,)), ((), ()))   # x[m,k] . q[n,k]
DN_KN = (((1,), (0,)), ((), ()))   # x[m,k] . w[k,n]


def deq_cols_kn(q, orient: str, c: int) -> np.ndarray:
    """float64 [K, c] of a qarray weight's dequantized first c output columns."""
    if orient == 'nk':
        return f64(qarray.dequantize(q, jnp.float32)[:c]).T
    return f64(qarray.dequantize(q, jnp.float32)[:, :c])


# ----------------------------------------------------------------------------- rows
class Bench:
    def __init__(self, args, qwix, qwix_err):
        self.args, self.qwix, self.qwix_err = args, qwix, qwix_err
        self.rows = []          # dicts: shape, path, ms, speedup, err, ok, note
        self.base = {}          # shape label -> bf16 seconds
        self.interpret = args.smoke
        try:  # let the registry's one-time auto-registration happen now, so 'kernel off' rows stay off
            from qarray.ops import _registry
            _registry.kernels_for_backend()
        except Exception:  # noqa: BLE001
            pass

    def over_budget(self) -> bool:
        return time.perf_counter() - T0 > self.args.budget_s

    def add(self, shape, path, fn, sets, ref_fn, note=''):
        """Time ``fn`` over ``sets``; check ``fn(*sets[0])`` against ``ref_fn()`` (float64 subset)."""
        label = f'{shape[0]}x{shape[1]}x{shape[2]}'
        if self.over_budget():
            self.rows.append(dict(shape=label, path=path, ms=None, speedup=None, err=None, ok=None,
                                  note='skipped: time budget'))
            log(f'{label} {path}: skipped (budget)')
            return None
        try:
            r, c = Subset(shape[0], shape[2]).r, Subset(shape[0], shape[2]).c
            y = fn(*sets[0])
            err = rel_err(np.asarray(jnp.asarray(y, jnp.float32))[:r, :c], ref_fn()) if ref_fn else None
            sec = time_fn(fn, sets, reps=3 if self.args.smoke else 7)
        except Exception as e:  # noqa: BLE001 - one broken path must not stop the run
            msg = f'{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ""}'
            self.rows.append(dict(shape=label, path=path, ms=None, speedup=None, err=None, ok=False,
                                  note=f'error: {msg}'))
            log(f'{label} {path}: ERROR {msg}')
            if self.args.verbose:
                traceback.print_exc()
            return None
        if path == 'bf16 jnp.dot':
            self.base[label] = sec
        base = self.base.get(label)
        sp = base / sec if base else None
        ok = None if err is None else bool(err <= TOL)
        self.rows.append(dict(shape=label, path=path, ms=sec * 1e3, speedup=sp, err=err, ok=ok, note=note))
        log(f'{label} {path}: {sec * 1e3:.4f} ms' + (f'  {sp:.2f}x bf16' if sp else '')
            + (f'  err {err:.2e}' if err is not None else '') + (f'  {note}' if note else ''))
        return sec

    # ------------------------------------------------------------------ data
    def make_sets(self, m, k, n, count, seed=0):
        sets = []
        for i in range(count):
            kx, kw = jax.random.split(jax.random.key(seed * 1000 + i))
            x = jax.random.normal(kx, (m, k), jnp.bfloat16)
            w = (jax.random.normal(kw, (k, n), jnp.bfloat16) * (1.0 / math.sqrt(k))).astype(jnp.bfloat16)
            sets.append((x, w))
        return sets

    def weight_only_shape(self, shape, fmt_keys, *, raw=False, extra_layouts=False, qwix_rows=True):
        m, k, n = shape
        sub = Subset(m, n)
        log(f'--- shape {m}x{k}x{n}: generating inputs')
        count = n_sets(k * n // 2 + m * k * 2, self.args.smoke)  # enough sets for the 4-bit weights too
        sets = self.make_sets(m, k, n, count, seed=m + k + n)
        x0, w0 = sets[0]
        x0r = f64(x0[:sub.r])
        bf16 = jax.jit(lambda x, w: jnp.dot(x, w))
        self.add(shape, 'bf16 jnp.dot', bf16, sets, lambda: x0r @ f64(w0[:, :sub.c]))
        if raw:
            self.raw_rows(shape, sets, sub)
        for key in fmt_keys:
            qt, tile = FORMATS[key]
            q_sets = [(x, kernels.prepare_weight(w, qt, tile)) for x, w in sets]
            q0 = q_sets[0][1]
            ref = lambda q0=q0: x0r @ deq_cols_kn(q0, 'nk', sub.c)  # noqa: E731
            ops.unregister_kernel(kernels.KERNEL_NAME)
            xla = jax.jit(lambda x, q: ops.dot_general(x, q, DN_NK))
            self.add(shape, f'qarray {key} XLA', xla, q_sets, ref, 'kernel off, [N,K] layout')
            plan = kernels.why_not(x0, q0, rhs_contracting_dim=1, interpret=self.interpret)
            note = 'XLA: ' + plan if isinstance(plan, str) else 'kernel ' + _cfg_note(plan[1])
            if self.interpret and not isinstance(plan, str):
                # CPU smoke: dot_general asks kernels on GPU only; run the interpreted kernel itself
                auto = jax.jit(lambda x, q: kernels.weight_only_matmul(x, q, rhs_contracting_dim=1,
                                                                       interpret=True))
                note += ' (interpreted)'
            else:
                kernels.register()
                auto = jax.jit(lambda x, q: ops.dot_general(x, q, DN_NK))
            self.add(shape, f'qarray {key} auto', auto, q_sets, ref, note)
            del q_sets
            if extra_layouts and key in ('int4/t128', 'int8/ch'):
                self.kn_rows(shape, key, sets, sub, x0r)
            if qwix_rows:
                self.qwix_row(shape, key, sets, sub, x0r)
        del sets

    def kn_rows(self, shape, key, sets, sub, x0r):
        """The same format in [K, N] orientation (packed along K for 4-bit): the Flax Dense layout."""
        qt, tile = FORMATS[key]
        kw = dict(tiles={0: tile}, channelwise_axes=(1,)) if tile else dict(channelwise_axes=(1,))
        q_sets = [(x, qarray.quantize(w, qt, pack_axis=0, **kw)) for x, w in sets]
        q0 = q_sets[0][1]
        kern = jax.jit(lambda x, q: kernels.weight_only_matmul(x, q, rhs_contracting_dim=0,
                                                               interpret=self.interpret))
        plan = kernels.why_not(sets[0][0], q0, rhs_contracting_dim=0, interpret=self.interpret)
        if isinstance(plan, str):
            self.rows.append(dict(shape='x'.join(map(str, shape)), path=f'qarray {key} kernel [K,N]', ms=None,
                                  speedup=None, err=None, ok=None, note=f'not served: {plan}'))
            return
        self.add(shape, f'qarray {key} kernel [K,N]', kern, q_sets,
                 lambda: x0r @ deq_cols_kn(q0, 'kn', sub.c), _cfg_note(plan[1]))

    def qwix_row(self, shape, key, sets, sub, x0r):
        label = 'x'.join(map(str, shape))
        if self.qwix is None:
            self.rows.append(dict(shape=label, path=f'qwix {key}', ms=None, speedup=None, err=None, ok=None,
                                  note=self.qwix_err))
            return
        qw = self.qwix
        qt, tile = FORMATS[key]
        kw = dict(tiled_axes={0: tile}, channelwise_axes=(1,)) if tile else dict(channelwise_axes=(1,))
        try:
            q_sets = [(x, qw.quantize(w, QWIX_QTYPE[qt], **kw)) for x, w in sets]
        except Exception as e:  # noqa: BLE001
            self.rows.append(dict(shape=label, path=f'qwix {key}', ms=None, speedup=None, err=None, ok=False,
                                  note=f'qwix quantize failed: {type(e).__name__}: {str(e)[:120]}'))
            return
        q0 = q_sets[0][1]
        fn = jax.jit(lambda x, q: qw.dot_general(x, q, DN_KN))
        self.add(shape, f'qwix {key}', fn, q_sets, lambda: x0r @ f64(qw.dequantize(q0)[:, :sub.c]), 'qwix 0.1.8')

    def raw_rows(self, shape, sets, sub):
        """Raw int8 x int8 -> int32 and fp8 x fp8 -> bf16 dots on pre-cast operands (no scales)."""
        def cast_i8(a):
            return jnp.clip(jnp.round(a.astype(jnp.float32) * 64), -127, 127).astype(jnp.int8)

        i8 = [(cast_i8(x), cast_i8(w)) for x, w in sets]
        f8 = [(x.astype(jnp.float8_e4m3fn), (w * 16).astype(jnp.float8_e4m3fn)) for x, w in sets]
        a, b = i8[0]
        self.add(shape, 'raw int8 dot (int32 out)',
                 jax.jit(lambda a, b: jax.lax.dot_general(a, b, DN_KN, preferred_element_type=jnp.int32)),
                 i8, lambda: f64(a[:sub.r]) @ f64(b[:, :sub.c]), 'no scales')
        a8, b8 = f8[0]
        self.add(shape, 'raw fp8 dot (bf16 out)',
                 jax.jit(lambda a, b: jax.lax.dot_general(a, b, DN_KN, preferred_element_type=jnp.bfloat16)),
                 f8, lambda: f64(a8[:sub.r]) @ f64(b8[:, :sub.c]), 'no scales')

    def w8a8(self, shape):
        """int8 activations (per row, quantized inside the call) x int8 weights (per column)."""
        m, k, n = shape
        sub = Subset(m, n)
        sets = self.make_sets(m, k, n, n_sets(k * n * 2 + m * k * 2, self.args.smoke), seed=7)
        q_sets = [(x, qarray.quantize(w, 'int8', channelwise_axes=(1,))) for x, w in sets]
        x0, q0 = q_sets[0]

        def ours(x, q):
            return ops.dot_general(qarray.quantize(x, 'int8', channelwise_axes=(0,)), q, DN_KN)

        ref = lambda: (f64(qarray.dequantize(qarray.quantize(x0, 'int8', channelwise_axes=(0,)), jnp.float32)[:sub.r])  # noqa: E731
                       @ deq_cols_kn(q0, 'kn', sub.c))
        self.add(shape, 'qarray w8a8 int8', jax.jit(ours), q_sets, ref, 'incl. activation quantization')
        if self.qwix is None:
            return
        qw = self.qwix
        qw_sets = [(x, qw.quantize(w, jnp.int8, channelwise_axes=(1,))) for x, w in sets]
        xq0, wq0 = qw_sets[0]

        def theirs(x, q):
            return qw.dot_general(qw.quantize(x, jnp.int8, channelwise_axes=(0,)), q, DN_KN)

        self.add(shape, 'qwix w8a8 int8', jax.jit(theirs), qw_sets,
                 lambda: (f64(qw.dequantize(qw.quantize(xq0, jnp.int8, channelwise_axes=(0,)))[:sub.r])
                          @ f64(qw.dequantize(wq0)[:, :sub.c])), 'qwix 0.1.8')

    def sweep(self, shape, fmt_keys, configs):
        """Time a few kernel configs per format at one shape; returns {key: (best_ms, cfg)}."""
        m, k, n = shape
        sub = Subset(m, n)
        best = {}
        sets = self.make_sets(m, k, n, n_sets(k * n // 2 + m * k * 2, self.args.smoke), seed=99)
        x0r = f64(sets[0][0][:sub.r])
        for key in fmt_keys:
            qt, tile = FORMATS[key]
            q_sets = [(x, kernels.prepare_weight(w, qt, tile)) for x, w in sets]
            q0 = q_sets[0][1]
            for cfg in configs:
                if tile is not None:
                    cfg = kernels.KernelConfig(**{**cfg.__dict__, 'block_k': tile})
                if cfg.int4_offset and qt != 'int4':
                    continue
                plan = kernels.why_not(sets[0][0], q0, rhs_contracting_dim=1, interpret=self.interpret,
                                       kernel_config=cfg)
                if isinstance(plan, str):
                    continue
                fn = jax.jit(lambda x, q, cfg=cfg: kernels.weight_only_matmul(
                    x, q, rhs_contracting_dim=1, kernel_config=cfg, interpret=self.interpret))
                sec = self.add(shape, f'sweep {key}', fn, q_sets,
                               lambda q0=q0: x0r @ deq_cols_kn(q0, 'nk', sub.c), _cfg_note(cfg))
                if sec is not None and (key not in best or sec < best[key][0]):
                    best[key] = (sec, cfg)
        return best


def _cfg_note(cfg) -> str:
    return (f'bn{cfg.block_n} bk{cfg.block_k} bm{cfg.block_m} sk{cfg.split_k} w{cfg.num_warps} '
            f's{cfg.num_stages} {cfg.unpack}' + (' off8' if cfg.int4_offset else ''))


SWEEP = [
    kernels.KernelConfig(block_n=64, num_warps=4, num_stages=4, unpack='join'),
    kernels.KernelConfig(block_n=64, num_warps=4, num_stages=4, unpack='split'),
    kernels.KernelConfig(block_n=32, num_warps=4, num_stages=4, unpack='join'),
    kernels.KernelConfig(block_n=128, num_warps=8, num_stages=3, unpack='join'),
    kernels.KernelConfig(block_n=64, num_warps=4, num_stages=3, unpack='join', split_k=2),
    kernels.KernelConfig(block_n=64, num_warps=4, num_stages=4, unpack='join', int4_offset=True),
]


# ----------------------------------------------------------------------------- report
def table(rows) -> str:
    out = ['| M x K x N | path | ms (median) | x bf16 | rel. err vs f64 | ok | notes |',
           '|---|---|---|---|---|---|---|']
    for r in rows:
        ms = 'n/a' if r['ms'] is None else f"{r['ms']:.4f}"
        sp = '' if r['speedup'] is None else f"{r['speedup']:.2f}x"
        err = '' if r['err'] is None else f"{r['err']:.1e}"
        ok = '' if r['ok'] is None else ('yes' if r['ok'] else '**NO**')
        out.append(f"| {r['shape']} | {r['path']} | {ms} | {sp} | {err} | {ok} | {r['note']} |")
    return '\n'.join(out)


def target_lines(rows, best) -> list[str]:
    lines = []
    for key, need in TARGETS.items():
        got = [r['speedup'] for r in rows if r['speedup'] and r['path'] == f'qarray {key} auto'
               and int(r['shape'].split('x')[0]) <= 64]  # decode shapes only
        sw = [r['speedup'] for r in rows if r['speedup'] and r['path'] == f'sweep {key}']
        if not got and not sw:
            lines.append(f'- {key}: target >= {need}x at decode shapes: not measured')
            continue
        lo = min(got) if got else None
        lines.append(f'- {key}: target >= {need}x at decode shapes; auto path min over shapes '
                     f'{"n/a" if lo is None else f"{lo:.2f}x"}'
                     + (f', best swept config at the headline shape {max(sw):.2f}x' if sw else '')
                     + (' (met)' if lo is not None and lo >= need else ' (NOT met)'))
    w8 = [r for r in rows if r['path'] == 'qarray w8a8 int8' and r['speedup']]
    lines.append('- w8a8 int8 at 8192^3: target >= 1.2x incl. activation quantization: '
                 + (f'{w8[0]["speedup"]:.2f}x' + (' (met)' if w8[0]['speedup'] >= 1.2 else ' (NOT met)')
                    if w8 else 'not measured'))
    pre = [r for r in rows if r['shape'] == '8192x8192x8192' and r['path'].endswith('auto') and r['speedup']]
    if pre:
        worst = min(pre, key=lambda r: r['speedup'])
        lines.append(f'- prefill weight-only no slower than bf16: slowest {worst["path"]} {worst["speedup"]:.2f}x'
                     + (' (met)' if worst['speedup'] >= 1.0 else ' (NOT met)'))
    bad = [r for r in rows if r['ok'] is False]
    lines.append(f'- correctness: {sum(r["ok"] is True for r in rows)} paths within {TOL:g}, '
                 f'{len(bad)} failed or errored' + (': ' + '; '.join(f"{r['shape']} {r['path']}" for r in bad)
                                                     if bad else ''))
    return lines


def write_section(text: str) -> None:
    path = os.path.join(HERE, 'RESULTS.md')
    old = open(path).read() if os.path.exists(path) else '# Benchmark results\n'
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip('\n') + '\n\n' + text.rstrip('\n') + '\n'
    else:
        nxt = old.find('\n## ', start + len(SECTION))
        new = old[:start] + text.rstrip('\n') + '\n' + ('' if nxt < 0 else old[nxt:])
    with open(path, 'w') as f:
        f.write(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='headline shapes only (16x8192x28672, 8192^3)')
    ap.add_argument('--smoke', action='store_true', help='tiny shapes, kernel interpreted (CPU check of the script)')
    ap.add_argument('--no-sweep', action='store_true', help='skip the kernel config sweep')
    ap.add_argument('--write', dest='write', action='store_true', default=None, help='write RESULTS.md')
    ap.add_argument('--no-write', dest='write', action='store_false')
    ap.add_argument('--budget-s', type=float, default=300.0, help='stop starting new rows after this many seconds')
    ap.add_argument('--verbose', action='store_true')
    args = ap.parse_args(argv)
    write = (not args.smoke) if args.write is None else args.write

    dev = jax.devices()[0]
    card = getattr(dev, 'device_kind', str(dev))
    qwix, qwix_err = load_qwix()
    log(f'device: {card} ({jax.default_backend()}), jax {jax.__version__}, '
        f'qwix: {getattr(qwix, "__version__", None) or qwix_err}')
    if jax.default_backend() != 'gpu' and not args.smoke:
        log('no GPU: running the --smoke configuration instead (numbers are not GPU numbers)')
        args.smoke = True
        write = False if args.write is None else args.write
    b = Bench(args, qwix, qwix_err)

    if args.smoke:
        head, prefill, others = (16, 256, 512), (128, 256, 256), [(1, 256, 256)]
    else:
        head, prefill, others = (16, 8192, 28672), (8192, 8192, 8192), [(1, 4096, 4096), (16, 28672, 8192),
                                                                         (64, 8192, 8192)]
    all_fmts = list(FORMATS)
    main_fmts = ['int4/t128', 'nf4/t128', 'int8/ch', 'fp8/ch']
    b.weight_only_shape(head, all_fmts, raw=True, extra_layouts=True)
    log(f'--- shape {prefill}: prefill + w8a8')
    b.weight_only_shape(prefill, main_fmts, raw=True)
    b.w8a8(prefill)
    best = {}
    if not args.no_sweep:
        log('--- kernel config sweep at the headline shape')
        best = b.sweep(head, ['int4/t128', 'nf4/t128', 'int8/ch'], SWEEP if not args.smoke else SWEEP[:2])
    if not args.quick:
        for shape in others:
            b.weight_only_shape(shape, main_fmts, qwix_rows=not args.smoke)

    rows = b.rows
    tab = table(rows)
    tgt = target_lines(rows, best)
    print('\n' + tab + '\n\n' + '\n'.join(tgt), flush=True)
    if best:
        print('\nbest swept configs (for qarray/ops/kernels/config.py TUNED):')
        for key, (sec, cfg) in best.items():
            print(f'  {key}: {sec * 1e3:.4f} ms  {cfg}')
    if write:
        when = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
        text = (f'{SECTION}\n\nMeasured by `benchmarks/gpu_bench.py` on **{card}**, jax {jax.__version__}, '
                f'qwix {getattr(qwix, "__version__", "n/a")}, {when}. Median per call over 7 repetitions of '
                'back-to-back separate jitted calls on rotating inputs (> 2x L2), one block per repetition; '
                'x bf16 = bf16 `jnp.dot` time at the same shape in the same run / this time. rel. err: '
                f'Frobenius, vs float64 on the dequantized operands (first <= 8 rows x 1024 columns), bar {TOL:g}.'
                f'\n\n{tab}\n\nTargets (issue 9):\n\n' + '\n'.join(tgt) + '\n')
        write_section(text)
        log('wrote benchmarks/RESULTS.md')
    log('done')
    return 0


if __name__ == '__main__':
    sys.exit(main())
