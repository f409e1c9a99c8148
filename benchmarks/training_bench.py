"""Quantized training on real data (issue 17): the digits CNN trained from scratch in four settings.

The settings, all from the same initial params, on the same batches, for the same steps, per seed:

* ``float``     -- the plain Linen CNN, ``optax.adam``;
* ``int8``      -- ``QtRule(weight_qtype='int8', act_qtype='int8', bwd_qtype='int8', fwd_quantized=True)``:
  every conv / dense runs int8 x int8 -> int32 forward and both backward contractions (the activation
  gradient and the weight gradient) run int8 x int8 -> int32 too (:mod:`qarray.ops.qt_dot`);
* ``fp8``       -- weights and activations e4m3 forward, gradients e5m2 backward (residuals e4m3),
  ``fwd_quantized=True``;
* ``adam8bit``  -- the float model with :func:`qarray.optim.adam_8bit` (8-bit blockwise Adam moments; params
  of at least 4096 values -- conv2 and fc1 here -- get quantized moments, the rest float32).

Training runs in blocks of ``--block`` steps (one jitted call per step); the settings take
turns block by block (the starting setting rotates), so machine load that comes and goes hits all of them
alike, and each block's time is reported as a ratio to the float block next to it. Metrics: the train loss
(mean of the last 10 % of steps), the test loss and test accuracy of each setting's own forward pass
(int8 / fp8 for the quantized runs) on the 449 held-out digits, mean and spread over seeds, and the
accuracy difference to float paired by seed. Optimizer-state bytes come from
:func:`qarray.optim.state_nbytes`.

Qwix HEAD (``/tmp/qwixhead-venv``, a separate venv) trains the same CNN with its own ``QtRule`` and
``bwd_qtype`` in a subprocess (``benchmarks/training_qwix_head.py``, which imports this module's plain-JAX
helpers: same data, init, batches and loop); its float run must reproduce ours exactly, which checks that
the two sides saw the same data.

Writes ``benchmarks/results_training.md`` and ``benchmarks/training.png`` (needs matplotlib, a
benchmark-only dependency: ``pip install matplotlib``).

Usage (from the repository root):
  python benchmarks/training_bench.py [--seeds 0 1 2 3 4] [--steps 600] [--block 50] [--no-qwix] [--no-write]
      [--minilm [--minilm-steps 40] [--minilm-lr 1e-4]]

``--minilm`` also fine-tunes the pretrained MiniLM-L6 encoder (``examples/minilm``; needs its weights
package) on a sentence-pair task built from the project's own sentences (:func:`run_minilm`), in the same
four settings, and adds a section and a loss panel.

Example:
  >>> import benchmarks.training_bench  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import pairbench  # noqa: E402

QWIX_HEAD_PYTHON = pairbench.QWIX_HEAD_PYTHON
RESULTS_MD = ROOT / 'benchmarks' / 'results_training.md'
PLOT = ROOT / 'benchmarks' / 'training.png'
LR = 3e-3
BATCH = 64


# --------------------------------------------------------------------------- plain-JAX helpers (Qwix side too)
@functools.lru_cache(maxsize=1)
def digits() -> Any:
    """scikit-learn's digits, the fixed train/test split of :mod:`examples.digits.data` (cached).

    Example:
      >>> from benchmarks.training_bench import digits
      >>> digits().x_test.shape
      (449, 8, 8, 1)
    """
    from examples.digits import data
    return data.load()


def batches(seed: int, steps: int, batch: int = BATCH) -> tuple[np.ndarray, np.ndarray]:
    """The ``steps`` training batches of a seed: ``(x [steps, batch, 8, 8, 1], y [steps, batch])``, drawn
    with replacement by ``np.random.default_rng(seed)``.

    Example:
      >>> from benchmarks.training_bench import batches
      >>> x, y = batches(0, 3, 4)
      >>> x.shape, y.shape
      ((3, 4, 8, 8, 1), (3, 4))
    """
    d = digits()
    idx = np.random.default_rng(seed).integers(0, len(d.y_train), (steps, batch))
    return d.x_train[idx], d.y_train[idx]


def init_params(seed: int) -> Any:
    """The float CNN's initial params for a seed (``LinenCNN().init(jax.random.key(seed), ...)``).

    Example:
      >>> from benchmarks.training_bench import init_params
      >>> init_params(0)['Dense_1']['kernel'].shape
      (64, 10)
    """
    from examples.digits import models
    return models.LinenCNN().init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))['params']


def train_step(loss_fn: Callable, opt: Any) -> Callable:
    """A jitted ``step(params, opt_state, *batch) -> (params, opt_state, loss)``: one optimizer step on
    ``loss_fn(params, *batch)``. (One dispatch per step, as a user's loop runs: on XLA:CPU a ``lax.scan``
    over steps runs the float CNN 2-3x slower than this loop, which would hide the quantization overhead.)

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from benchmarks.training_bench import train_step
      >>> step = train_step(lambda p, x: ((x @ p) ** 2).sum(), optax.sgd(0.1))
      >>> p, s, loss = step(jnp.ones(2), optax.sgd(0.1).init(jnp.ones(2)), jnp.ones((1, 2)))
      >>> float(loss), p.tolist()   # d/dp (p0 + p1)^2 = 2 (p0 + p1) = 4 per coordinate
      (4.0, [0.6000000238418579, 0.6000000238418579])
    """

    @jax.jit
    def step(p, s, *batch):
        loss, g = jax.value_and_grad(loss_fn)(p, *batch)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    return step


def classifier_loss(apply_fn: Callable) -> Callable:
    """``loss(params, x, y)``: mean softmax cross entropy of ``apply_fn(params, x)`` against labels ``y``.

    Example:
      >>> import jax.numpy as jnp
      >>> from benchmarks.training_bench import classifier_loss
      >>> round(float(classifier_loss(lambda p, x: x * p)(0.0, jnp.ones((1, 2)), jnp.array([0]))), 4)
      0.6931
    """
    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()
    return loss


def evaluate(apply_fn: Callable, params: Any) -> tuple[float, float]:
    """``(test accuracy in %, test cross entropy)`` of ``apply_fn(params, x)`` on the digits test split.

    Example:
      >>> import jax.numpy as jnp
      >>> from benchmarks.training_bench import evaluate
      >>> acc, loss = evaluate(lambda p, x: jnp.zeros((x.shape[0], 10)), None)
      >>> round(loss, 4)   # uniform logits: log(10)
      2.3026
    """
    d = digits()
    logits = jax.jit(apply_fn)(params, jnp.asarray(d.x_test))
    acc = float(jnp.mean(jnp.argmax(logits, -1) == d.y_test) * 100)
    loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(d.y_test)).mean())
    return acc, loss


def train_interleaved(runs: dict[str, tuple[Callable, Any, Any]], batches: list[tuple], block: int) -> dict[str, dict]:
    """Train every entry of ``runs`` (``name -> (train_step, params, opt_state)``) on the same batches (one
    tuple of step arguments per step), ``block`` steps at a time, the settings taking turns block by block
    (the first one rotates).

    Returns ``name -> {'params', 'state', 'losses' (list, one per step), 'wall', 'cpu' (seconds per step,
    one per block)}``. Each step function is compiled (and run once, discarded) before timing.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from benchmarks.training_bench import train_step, train_interleaved
      >>> opt = optax.sgd(0.1)
      >>> step = train_step(lambda p, x: ((x @ p) ** 2).sum(), opt)
      >>> out = train_interleaved({'a': (step, jnp.ones(2), opt.init(jnp.ones(2)))}, [(jnp.ones((1, 2)),)] * 4, 2)
      >>> len(out['a']['losses']), len(out['a']['wall']), bool(out['a']['losses'][-1] < out['a']['losses'][0])
      (4, 2, True)
    """
    steps = len(batches)
    if steps % block:
        raise ValueError(f"block must divide the number of steps ({steps}); got block={block}.")
    batches = jax.block_until_ready([jax.tree.map(jnp.asarray, tuple(b)) for b in batches])  # on device first
    names = list(runs)
    out = {n: {'params': runs[n][1], 'state': runs[n][2], 'losses': [], 'wall': [], 'cpu': []} for n in names}
    for n in names:  # compile + warm up outside the timed loop
        jax.block_until_ready(runs[n][0](out[n]['params'], out[n]['state'], *batches[0]))
    for b in range(steps // block):
        for k in range(len(names)):
            n = names[(b + k) % len(names)]
            o, step = out[n], runs[n][0]
            p, s = o['params'], o['state']
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(b * block, (b + 1) * block):
                p, s, loss = step(p, s, *batches[i])
                o['losses'].append(loss)
            jax.block_until_ready((p, s))
            o['wall'].append((time.perf_counter() - t0) / block)
            o['cpu'].append((time.process_time() - c0) / block)
            o['params'], o['state'] = p, s
    for o in out.values():
        o['losses'] = [float(v) for v in jax.device_get(o['losses'])]
    return out


def tail_mean(losses: list[float], fraction: float = 0.1) -> float:
    """Mean of the last ``fraction`` of a loss curve (the 'final train loss', less noisy than one batch).

    Example:
      >>> from benchmarks.training_bench import tail_mean
      >>> tail_mean([9.0] * 9 + [1.0], 0.1)
      1.0
    """
    k = max(1, int(round(len(losses) * fraction)))
    return float(np.mean(losses[-k:]))


def summarize(per_seed: dict[str, list[dict]], baseline: str = 'float') -> dict[str, dict]:
    """Per setting: mean and sample std over seeds of train loss, test loss and accuracy, the accuracy
    difference to ``baseline`` paired by seed, and medians of ms/step and of the per-block step-time ratio
    to ``baseline`` (wall and CPU).

    Example:
      >>> from benchmarks.training_bench import summarize
      >>> r = dict(losses=[1.0], test_acc=90.0, test_loss=0.3, wall=[0.01], cpu=[0.02])
      >>> s = summarize({'float': [r, r], 'x': [dict(r, test_acc=89.0), dict(r, test_acc=89.0)]})
      >>> s['x']['dacc_mean'], s['x']['ratio_wall']
      (-1.0, 1.0)
    """
    out = {}
    base = per_seed[baseline]
    for name, runs in per_seed.items():
        def ms(key, runs=runs):
            v = [r[key] for r in runs]
            return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
        for r in runs:
            r['train_loss'] = tail_mean(r['losses'])
        dacc = [r['test_acc'] - b['test_acc'] for r, b in zip(runs, base)]
        dloss = [(r['test_loss'] - b['test_loss']) / b['test_loss'] * 100 for r, b in zip(runs, base)]
        rw = [w / bw for r, b in zip(runs, base) for w, bw in zip(r['wall'], b['wall'])]
        rc = [c / bc for r, b in zip(runs, base) for c, bc in zip(r['cpu'], b['cpu'])]
        out[name] = dict(
            seeds=len(runs), train_loss=ms('train_loss'), test_loss=ms('test_loss'), test_acc=ms('test_acc'),
            dacc_mean=float(np.mean(dacc)), dacc_std=float(np.std(dacc, ddof=1)) if len(dacc) > 1 else 0.0,
            dloss_rel_mean=float(np.mean(dloss)),
            ms_step=float(statistics.median(w for r in runs for w in r['wall'])) * 1e3,
            ratio_wall=float(statistics.median(rw)), ratio_cpu=float(statistics.median(rc)),
            state_bytes=runs[0].get('state_bytes'))
    return out


# --------------------------------------------------------------------------- the qarray settings
@dataclasses.dataclass(frozen=True)
class Setting:
    """One training setting: a name, the quantized-training rules (``QtRule`` keyword dicts, first match
    wins; None: float) and the optimizer.

    Example:
      >>> from benchmarks.training_bench import SETTINGS
      >>> [s.name for s in SETTINGS]
      ['float', 'int8', 'fp8', 'adam8bit', 'fp8_conv_bwd_e4m3']
    """

    name: str
    label: str
    rules: tuple[dict, ...] | None = None
    optimizer: str = 'adam'
    plotted: bool = True

    def model_apply(self) -> Callable:
        """``apply(params, x) -> logits`` of the setting's model (the float CNN, or its QtProvider version).

        Example:
          >>> import jax.numpy as jnp
          >>> from benchmarks.training_bench import SETTINGS, init_params
          >>> SETTINGS[1].model_apply()(init_params(0), jnp.zeros((2, 8, 8, 1))).shape
          (2, 10)
        """
        from examples.digits import models
        import flax_integration as fi
        model = models.LinenCNN()
        if self.rules is not None:
            model = fi.quantize_model(model, fi.QtProvider([fi.QtRule(**r) for r in self.rules]))
        return lambda p, x: model.apply({'params': p}, x)

    def make_optimizer(self, lr: float = LR) -> Any:
        """``optax.adam(lr)``, or :func:`qarray.optim.adam_8bit` ``(lr)`` for the 8-bit Adam setting.

        Example:
          >>> from benchmarks.training_bench import SETTINGS
          >>> type(SETTINGS[3].make_optimizer()).__name__
          'GradientTransformationExtraArgs'
        """
        if self.optimizer == 'adam_8bit':
            import qarray.optim
            return qarray.optim.adam_8bit(lr)
        return optax.adam(lr)


E4M3, E5M2 = 'float8_e4m3fn', 'float8_e5m2'
SETTINGS = (
    Setting('float', 'float32 (Adam)'),
    Setting('int8', 'int8 fwd + int8 bwd', (dict(weight_qtype='int8', act_qtype='int8', bwd_qtype='int8',
                                                 fwd_quantized=True),)),
    Setting('fp8', 'fp8: e4m3 fwd, e5m2 bwd', (dict(weight_qtype=E4M3, act_qtype=E4M3, bwd_qtype=E5M2,
                                                    fwd_quantized=True),)),
    Setting('adam8bit', 'float32 + 8-bit Adam', optimizer='adam_8bit'),
    # The fp8 configuration Qwix HEAD can run (its conv backward cannot mix e5m2 and e4m3): e4m3 gradients in
    # the two convolutions, e5m2 in the dense layers. Run here too so the Qwix comparison is like for like.
    Setting('fp8_conv_bwd_e4m3', 'fp8, e4m3 bwd in the convs', (
        dict(module_path='Conv_.*', weight_qtype=E4M3, act_qtype=E4M3, bwd_qtype=E4M3, fwd_quantized=True),
        dict(module_path='.*', weight_qtype=E4M3, act_qtype=E4M3, bwd_qtype=E5M2, fwd_quantized=True)),
        plotted=False),
)


def run_qarray(seeds: list[int], steps: int, block: int, lr: float = LR) -> dict[str, list[dict]]:
    """Train every :data:`SETTINGS` entry for each seed (interleaved); ``name -> [per-seed result]``.

    Example:
      >>> from benchmarks.training_bench import run_qarray  # doctest: +SKIP
      >>> run_qarray([0], 20, 10)['int8'][0]['test_acc'] > 50  # doctest: +SKIP
      True
    """
    import qarray.optim
    applies = {s.name: s.model_apply() for s in SETTINGS}
    opts = {s.name: s.make_optimizer(lr) for s in SETTINGS}
    trainers = {n: train_step(classifier_loss(applies[n]), opts[n]) for n in applies}
    results: dict[str, list[dict]] = {n: [] for n in applies}
    for seed in seeds:
        p0 = init_params(seed)
        xs, ys = batches(seed, steps)
        runs = {n: (trainers[n], p0, opts[n].init(p0)) for n in applies}
        t0 = time.perf_counter()
        out = train_interleaved(runs, list(zip(xs, ys)), block)
        for n, o in out.items():
            acc, loss = evaluate(applies[n], o['params'])
            results[n].append(dict(seed=seed, losses=o['losses'], wall=o['wall'], cpu=o['cpu'], test_acc=acc,
                                   test_loss=loss, state_bytes=qarray.optim.state_nbytes(o['state'])))
        print(f"seed {seed}: " + ', '.join(f"{n} {r[-1]['test_acc']:.2f}%" for n, r in results.items())
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    return results


# --------------------------------------------------------------------------- MiniLM fine-tune (optional)
def split_views(ids: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Two neighbouring halves of each tokenized sentence: the word-pieces between ``[CLS]`` and ``[SEP]`` cut at
    a random point in the middle fifth (each half gets at least one), each half re-wrapped in ``[CLS]`` ...
    ``[SEP]`` and padded: ``(ids_a, mask_a, ids_b, mask_b)``. A pair is a sentence's start and its
    continuation -- a harder positive than the sentence itself, which the pretrained encoder already matches
    perfectly.

    Example:
      >>> import numpy as np
      >>> from benchmarks.training_bench import split_views
      >>> ids, mask = np.array([[101, 5, 6, 7, 8, 102, 0]]), np.array([[1, 1, 1, 1, 1, 1, 0]])
      >>> ia, ma, ib, mb = split_views(ids, mask, np.random.default_rng(0))
      >>> a, b = ia[0, :ma[0].sum()].tolist(), ib[0, :mb[0].sum()].tolist()
      >>> a[0], a[-1], b[0], b[-1], a[1:-1] + b[1:-1]   # each half wrapped; together the whole sentence
      (101, 102, 101, 102, [5, 6, 7, 8])
    """
    outs = [np.zeros_like(ids), np.zeros_like(mask), np.zeros_like(ids), np.zeros_like(mask)]
    for r in range(len(ids)):
        n = int(mask[r].sum())
        body = ids[r, 1:n - 1]
        lo, hi = max(1, int(np.floor(0.4 * len(body)))), min(len(body) - 1, int(np.ceil(0.6 * len(body))))
        k = int(rng.integers(lo, hi + 1)) if hi >= lo else max(1, len(body) // 2)
        for j, part in enumerate((body[:k], body[k:])):
            row = np.concatenate([ids[r, :1], part, ids[r, n - 1:n]])
            outs[2 * j][r, :len(row)], outs[2 * j + 1][r, :len(row)] = row, 1
    return tuple(outs)


def info_nce(a: jax.Array, b: jax.Array, temperature: float = 0.05) -> tuple[jax.Array, jax.Array]:
    """Symmetric in-batch contrastive loss of unit embeddings ``a[i] <-> b[i]`` (the other rows of the batch are
    the negatives), and the top-1 retrieval accuracy (%, both directions).

    Example:
      >>> import jax.numpy as jnp
      >>> from benchmarks.training_bench import info_nce
      >>> loss, acc = info_nce(jnp.eye(3), jnp.eye(3))
      >>> float(acc), bool(loss < 1e-6)
      (100.0, True)
    """
    logits = a @ b.T / temperature
    labels = jnp.arange(a.shape[0])
    loss = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
    acc = 50.0 * (jnp.mean(jnp.argmax(logits, 1) == labels) + jnp.mean(jnp.argmax(logits, 0) == labels))
    return loss, acc


def minilm_setup(seed: int, steps: int, batch: int, length: int = 24, n_heldout: int = 64) -> dict:
    """The sentence-pair task from the project's own sentences (:mod:`examples.minilm.sentences`): the 512
    ``CALIBRATION`` sentences split into train and ``n_heldout`` held-out ones; a pair is a sentence's two
    halves (:func:`split_views`, a fresh cut per step); ``steps`` batches of ``batch`` distinct train
    sentences; the held-out pairs (fixed cuts) and the graded ``PAIRS`` for evaluation.

    Example:
      >>> from benchmarks.training_bench import minilm_setup  # doctest: +SKIP
      >>> minilm_setup(0, 2, 4)['batches'][0][0].shape  # doctest: +SKIP
      (4, 24)
    """
    from examples.minilm import sentences, weights
    tok = weights.load_tokenizer()
    ids, mask = tok(sentences.CALIBRATION, length)
    perm = np.random.default_rng(1234).permutation(len(ids))  # the split does not depend on the seed
    held, train = perm[:n_heldout], perm[n_heldout:]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        idx = rng.choice(train, batch, replace=False)
        out.append(split_views(ids[idx], mask[idx], rng))
    hv = split_views(ids[held], mask[held], np.random.default_rng(99))
    sents, pairs, gold = sentences.pair_sentences()
    pids, pmask = tok(sents, length)
    return dict(batches=out, heldout=hv, pairs=(pids, pmask, pairs, gold))


def minilm_loss(apply_fn: Callable) -> Callable:
    """``loss(trainable, frozen, ids_a, mask_a, ids_b, mask_b)``: :func:`info_nce` of the two views' embeddings
    (one forward pass over both), the params being ``{**trainable, **frozen}``.

    Example:
      >>> from benchmarks.training_bench import minilm_loss  # doctest: +SKIP
    """
    def loss(train, frozen, ia, ma, ib, mb):
        n = ia.shape[0]
        e = apply_fn({**train, **frozen}, jnp.concatenate([ia, ib]), jnp.concatenate([ma, mb]))
        return info_nce(e[:n], e[n:])[0]
    return loss


def minilm_evaluate(apply_fn: Callable, params: Any, setup: dict) -> dict:
    """Held-out contrastive loss and retrieval accuracy, and the Spearman correlation (x 100) of the cosine
    similarities of the graded ``PAIRS`` with their grades.

    Example:
      >>> from benchmarks.training_bench import minilm_evaluate  # doctest: +SKIP
    """
    from examples.minilm import metrics
    f = jax.jit(apply_fn)
    ia, ma, ib, mb = setup['heldout']
    loss, acc = info_nce(f(params, ia, ma), f(params, ib, mb))
    pids, pmask, pairs, gold = setup['pairs']
    emb = np.asarray(f(params, pids, pmask))
    sims = metrics.pair_similarities(emb, pairs)
    return dict(test_loss=float(loss), test_acc=float(acc), spearman=100 * metrics.spearman(sims, np.asarray(gold)))


def run_minilm(seeds: list[int], steps: int, block: int, batch: int = 16, lr: float = 5e-5) -> dict[str, list[dict]]:
    """Fine-tune the pretrained MiniLM-L6 encoder layers (embeddings frozen) on the :func:`minilm_setup` task in
    the four settings of :data:`SETTINGS` (rules on the 36 Dense layers, ``LINEAR_PATHS``); interleaved as
    the digits runs are. ``name -> [per-seed result]``.

    Example:
      >>> from benchmarks.training_bench import run_minilm  # doctest: +SKIP
    """
    import flax_integration as fi
    import qarray.optim
    from examples.minilm import model as mm, weights
    params = weights.load_params()['params']
    frozen = {'embeddings': params['embeddings']}
    train0 = {k: v for k, v in params.items() if k != 'embeddings'}
    settings = [s for s in SETTINGS if s.plotted]
    applies, opts = {}, {}
    for st in settings:
        m = mm.MiniLM()
        if st.rules is not None:
            m = fi.quantize_model(m, fi.QtProvider([fi.QtRule(**{**r, 'module_path': mm.LINEAR_PATHS})
                                                    for r in st.rules]))
        applies[st.name] = (lambda m: lambda p, ids, mask: m.apply({'params': p}, ids, mask))(m)
        opts[st.name] = st.make_optimizer(lr)
    trainers = {n: train_step(minilm_loss(applies[n]), opts[n]) for n in applies}
    results: dict[str, list[dict]] = {n: [] for n in applies}
    for seed in seeds:
        setup = minilm_setup(seed, steps, batch)
        before = minilm_evaluate(applies['float'], params, setup)
        runs = {n: (trainers[n], train0, opts[n].init(train0)) for n in applies}
        t0 = time.perf_counter()
        out = train_interleaved(runs, [(frozen, *b) for b in setup['batches']], block)
        for n, o in out.items():
            ev = minilm_evaluate(applies[n], {**o['params'], **frozen}, setup)
            results[n].append(dict(seed=seed, losses=o['losses'], wall=o['wall'], cpu=o['cpu'], before=before,
                                   state_bytes=qarray.optim.state_nbytes(o['state']), **ev))
        print(f"minilm seed {seed}: before {before}; " + ', '.join(
            f"{n} loss {r[-1]['test_loss']:.4f} spearman {r[-1]['spearman']:.2f}" for n, r in results.items())
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    return results


# --------------------------------------------------------------------------- Qwix HEAD
def run_qwix_head(seeds: list[int], steps: int, block: int, lr: float = LR,
                  python: str = QWIX_HEAD_PYTHON, timeout: float = 1800) -> dict | None:
    """Run ``benchmarks/training_qwix_head.py`` under Qwix HEAD's venv; its parsed JSON, or None (with the
    reason printed) when the venv is missing or the run fails.

    Example:
      >>> from benchmarks.training_bench import run_qwix_head
      >>> run_qwix_head([0], 10, 5, python='/nonexistent/python') is None
      qwix head: /nonexistent/python not found; skipped
      True
    """
    if not os.path.exists(python):
        print(f"qwix head: {python} not found; skipped")
        return None
    cmd = [python, str(ROOT / 'benchmarks' / 'training_qwix_head.py'), '--seeds', *map(str, seeds),
           '--steps', str(steps), '--block', str(block), '--lr', str(lr)]
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
    if proc.returncode or not line:
        print(f"qwix head failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        return None
    return json.loads(line[-1][len('RESULT '):])


# --------------------------------------------------------------------------- report
def machine() -> str:
    """CPU model, core count, load average, jax / Python versions.

    Example:
      >>> from benchmarks.training_bench import machine
      >>> 'cores' in machine()
      True
    """
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
        cpu = next((l.split(':', 1)[1].strip() for l in out.splitlines() if l.startswith('Model name')), cpu)
    except OSError:
        pass
    load = ', '.join(f'{v:.1f}' for v in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores visible, load average {load} (1/5/15 min), "
            f"jax {jax.__version__} ({jax.default_backend()}), Python {sys.version.split()[0]}")


def _pm(m_s: tuple[float, float], digits_: int = 2) -> str:
    return f"{m_s[0]:.{digits_}f} ± {m_s[1]:.{digits_}f}"


def markdown(summary: dict, qwix: dict | None, args: Any, started: str, finished: str,
             minilm: dict | None = None) -> str:
    """The results page: settings table, Qwix HEAD table, notes.

    Example:
      >>> from benchmarks.training_bench import markdown  # doctest: +SKIP
    """
    labels = {s.name: s.label for s in SETTINGS}
    n = summary['float']['seeds']
    lines = [
        '# Quantized training on real data (issue 17)', '',
        f"The digits CNN (`examples/digits/models.py`: conv3x3(16) - conv3x3(32, stride 2) - dense(64) - dense(10)) "
        f"trained from scratch on scikit-learn's bundled digits (1348 train / 449 test images), {args.steps} Adam "
        f"steps of batch {BATCH}, lr {args.lr:g}, {n} seeds ({', '.join(map(str, args.seeds))}; the seed sets the "
        f"init and the batch order; every setting of a seed sees the same init and batches). "
        f"Produced by `python benchmarks/training_bench.py "
        f"--seeds {' '.join(map(str, args.seeds))} --steps {args.steps} --block {args.block}"
        f"{' --minilm' if args.minilm else ''}`.", '',
        f"Machine: {started} (at start); {finished} (at end).", '',
        '| setting | final train loss | test loss | test accuracy (%) | Δ acc vs float (paired) | '
        'optimizer state (bytes) | ms/step (wall, median) | step time / float (wall) | (CPU) |',
        '|---|---|---|---|---|---|---|---|---|']
    fl = summary['float']
    for name, s in summary.items():
        d = '—' if name == 'float' else f"{s['dacc_mean']:+.2f} ± {s['dacc_std']:.2f}"
        rel = '' if name == 'float' else f" ({s['dloss_rel_mean']:+.1f} %)"
        state = f"{s['state_bytes']:,}" + ('' if name == 'float' else f" ({s['state_bytes'] / fl['state_bytes']:.2f}x)")
        lines.append(f"| {labels[name]} | {_pm(s['train_loss'], 4)} | {_pm(s['test_loss'], 4)}{rel} | "
                     f"{_pm(s['test_acc'])} | {d} | {state} | {s['ms_step']:.2f} | {s['ratio_wall']:.2f}x | "
                     f"{s['ratio_cpu']:.2f}x |")
    lines += ['', 'Mean ± sample standard deviation over seeds. "Final train loss": the mean of the last 10 % of '
              'the steps\' batch losses. Test metrics use each setting\'s own forward pass (int8 x int8 -> int32 '
              'for int8, e4m3 dots for fp8). Δ acc: each seed\'s accuracy minus the float run\'s of the same seed '
              '(percentage points), so the seed-to-seed noise of the init cancels; the test-loss column\'s '
              'bracket is the mean relative test-loss change against float.', '']
    if qwix is not None:
        qs = qwix['summary']
        same = qwix.get('float_matches_qarray')
        lines += ['## Qwix HEAD, same model, data, init and batches', '',
                  f"Qwix {qwix['qwix_version']} (`{QWIX_HEAD_PYTHON}`), `qwix.QtProvider([qwix.QtRule(...)])` "
                  f"on the same Linen CNN, the same loop (`train_step`, `train_interleaved` of this file) in a "
                  f"subprocess. Its float run {'reproduces' if same else 'does NOT reproduce'} qarray's float run "
                  f"(test accuracy and every step's loss{' equal' if same else ' differ'}), so both sides trained on "
                  "the same data. Qwix's step-time ratios are to its own float run, interleaved the same way in "
                  "its process.", '',
                  '| setting | Qwix QtRule | Qwix test accuracy (%) | qarray test accuracy (%) | qarray − Qwix '
                  '(paired) | Qwix test loss | qarray test loss | Qwix step time / float (wall) |',
                  '|---|---|---|---|---|---|---|---|']
        for name in ('float', 'int8', 'fp8', 'fp8_conv_bwd_e4m3'):
            if name not in qs:
                continue
            q, s = qs[name], summary[name]
            diff = [a['test_acc'] - b['test_acc'] for a, b in zip(args.per_seed[name], qwix['per_seed'][name])]
            lines.append(f"| {labels[name]} | `{qwix['rules'].get(name, '—')}` | {_pm(q['test_acc'])} | "
                         f"{_pm(s['test_acc'])} | {np.mean(diff):+.2f} ± "
                         f"{np.std(diff, ddof=1) if len(diff) > 1 else 0.0:.2f} | {_pm(q['test_loss'], 4)} | "
                         f"{_pm(s['test_loss'], 4)} | {q['ratio_wall']:.2f}x |")
        lines += ['']
        for name, err in qwix.get('errors', {}).items():
            lines += [f"**Qwix HEAD cannot train `{name}`** (`{qwix['rules'].get(name, '')}`): tracing the training "
                      f"step raises `{err}` -- its convolution backward hands the e5m2 gradient and the e4m3 "
                      "residual to `lax.conv_general_dilated`, which needs equal dtypes (its dense backward "
                      "upcasts and runs). The `fp8, e4m3 bwd in the convs` row is the nearest configuration it "
                      "runs; qarray trains both.", '']
        lines += ['Qwix has no 8-bit optimizer (the `adam8bit` row has no Qwix counterpart).', '']
    if minilm is not None:
        lines += minilm_markdown(minilm, args)
    lines += ['## Notes', '', NOTES]
    return '\n'.join(lines) + '\n'


def minilm_markdown(per_seed: dict[str, list[dict]], args: Any) -> list[str]:
    """The MiniLM fine-tune section of the results page.

    Example:
      >>> from benchmarks.training_bench import minilm_markdown  # doctest: +SKIP
    """
    labels = {s.name: s.label for s in SETTINGS}
    summ = summarize(per_seed)
    before = per_seed['float'][0]['before']
    fl = summ['float']
    n = fl['seeds']
    lines = ['## MiniLM-L6 fine-tune (sentence pairs from the project\'s own sentences)', '',
             f"all-MiniLM-L6-v2 (`examples/minilm`), the six encoder layers trained (10.6 M params; embeddings "
             f"frozen), {args.minilm_steps} Adam steps of {args.minilm_batch} pairs, lr {args.minilm_lr:g}, "
             f"{n} seed{'s' if n > 1 else ''}. Task: in-batch contrastive loss (InfoNCE, temperature 0.05, "
             "symmetric) between the two halves of a sentence (`split_views`: cut at a random point in the middle "
             "fifth), on 448 of the 512 `CALIBRATION` sentences of `examples/minilm/sentences.py`; evaluated on "
             "the other 64 (64-way retrieval, fixed cuts) and on the 48 graded `PAIRS` (Spearman x 100 of the "
             "cosine similarities against the grades, the example's usual metric). The quantized settings put the "
             "rule on the 36 Dense layers (`LINEAR_PATHS`); the attention products stay float. "
             f"Before training: held-out loss {before['test_loss']:.4f}, retrieval {before['test_acc']:.2f} %, "
             f"Spearman {before['spearman']:.2f}.", '',
             '| setting | final train loss | held-out loss | held-out retrieval (%) | Spearman x 100 (PAIRS) | '
             'optimizer state (bytes) | s/step (wall, median) | step time / float (wall) |',
             '|---|---|---|---|---|---|---|---|']
    for name, sm in summ.items():
        rs = per_seed[name]
        sp = (float(np.mean([r['spearman'] for r in rs])),
              float(np.std([r['spearman'] for r in rs], ddof=1)) if len(rs) > 1 else 0.0)
        rel = '' if name == 'float' else f" ({sm['dloss_rel_mean']:+.1f} %)"
        state = f"{sm['state_bytes']:,}" + ('' if name == 'float' else f" ({sm['state_bytes'] / fl['state_bytes']:.2f}x)")
        lines.append(f"| {labels[name]} | {_pm(sm['train_loss'], 4)} | {_pm(sm['test_loss'], 4)}{rel} | "
                     f"{_pm(sm['test_acc'])} | {_pm(sp)} | {state} | {sm['ms_step'] / 1e3:.2f} | "
                     f"{sm['ratio_wall']:.2f}x |")
    lines += ['', f"Final train loss: mean of the last 10 % of the steps. With {n} seed{'s' if n > 1 else ''} the "
              "spread is not measured here; the held-out set has 64 pairs (one pair = 1.56 points of retrieval "
              "accuracy, both directions averaged). Qwix HEAD was not run on this task (time).", '']
    return lines


NOTES = """* **CPU shows no int8 / fp8 speedup, and cannot.** XLA:CPU runs the int8 dots as integer loops no faster
  than its float GEMMs, and has no fp8 arithmetic at all: the e4m3 / e5m2 dots run as float32 on
  upcast codes. On top of that each quantized op adds the quantize work (absmax, scale, round, clip) of
  its operands, forward and backward (the backward re-quantizes the gradient and the residual in its own
  per-channel layout), which on a model this small costs more than the dots themselves. So the ratios
  above measure the overhead of the quantization arithmetic, not what an int8 / fp8 GPU would give. No
  GPU was lent to this task, so there are no GPU step times here.
* **Optimizer state.** Float Adam keeps two float32 moments (8 bytes per param) plus a step count; 8-bit
  Adam (`qarray.optim.adam_8bit`, block 256) stores the moments of params with at least 4096 values
  (conv2: 4,608, fc1: 32,768 of the 38,282 params) in 1 byte each plus one float32 scale per 256 values;
  the small tensors (conv1, fc2, biases) keep float32 moments, as bitsandbytes does.
* **What runs quantized.** The int8 and fp8 settings quantize all four layers (both convolutions and both
  dense layers): forward operands per channel (weights per output channel, activations per example),
  backward operands per channel of each backward contraction (`qarray.ops.qt_dot`); the lowered training
  step has `s8 x s8 -> s32` dots / convolutions in forward and backward
  (tests/flax_integration/test_bwd_qtype.py). The 8-bit Adam setting trains the float model.
* **ragged_dot** is not exercised: the digits CNN has no grouped (MoE) matmul; its quantized backward is
  covered by the unit tests of `qarray.ops.qt_dot`, not by this real-data run."""


def plot(per_seed: dict[str, list[dict]], qwix: dict | None, path: pathlib.Path, smooth: int = 20,
         minilm: dict | None = None) -> None:
    """Loss curves (mean over seeds of each step's batch loss, moving average over ``smooth`` steps), log
    scale; Qwix HEAD's runs dashed.

    Example:
      >>> from benchmarks.training_bench import plot  # doctest: +SKIP
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    def curve(runs):
        m = np.mean([r['losses'] for r in runs], axis=0)
        k = np.ones(smooth) / smooth
        return np.arange(smooth, len(m) + 1), np.convolve(m, k, mode='valid')

    labels = {s.name: s.label for s in SETTINGS}
    qwix_runs = {} if qwix is None else {n: r for n, r in qwix['per_seed'].items() if n != 'float'}
    shown = [s.name for s in SETTINGS if s.name in per_seed and (s.plotted or s.name in qwix_runs)]
    colors = {'float': 'black', 'int8': 'tab:blue', 'fp8': 'tab:red', 'adam8bit': 'tab:green',
              'fp8_conv_bwd_e4m3': 'tab:purple'}
    fig, axes = plt.subplots(1, 3 if minilm else 2, figsize=(18 if minilm else 12, 4.5))
    if minilm:
        ax = axes[2]
        for name, runs in minilm.items():
            m = np.mean([r['losses'] for r in runs], axis=0)
            k = min(5, len(m))
            ax.plot(np.arange(k, len(m) + 1), np.convolve(m, np.ones(k) / k, mode='valid'), color=colors[name],
                    label=f"qarray {labels[name]}", lw=1.4)
        ax.set_title('MiniLM-L6 fine-tune, contrastive train loss')
        ax.set_xlabel('step')
        ax.set_ylabel('InfoNCE loss (5-step average)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax, start in zip(axes, (0, None)):
        for name in shown:
            x, y = curve(per_seed[name])
            ax.plot(x, y, color=colors[name], label=f"qarray {labels[name]}", lw=1.4)
        if qwix is not None:
            for name in qwix_runs:
                if name in colors:
                    x, y = curve(qwix_runs[name])
                    ax.plot(x, y, color=colors[name], ls='--', lw=1.2, label=f"Qwix HEAD {labels[name]}")
        ax.set_yscale('log')
        ax.set_xlabel('step')
        ax.grid(alpha=0.3, which='both')
        if start is None:
            n = len(per_seed['float'][0]['losses'])
            ax.set_xlim(n // 2, n)
            lo = min(curve(per_seed[k])[1][n // 2:].min() for k in shown)
            hi = max(curve(per_seed[k])[1][n // 2 - smooth:].max() for k in shown)
            ax.set_ylim(lo * 0.8, hi * 1.25)
            ax.set_title('second half (zoom)')
        else:
            ax.set_title('digits CNN, train loss')
            ax.set_ylabel(f'batch cross entropy (mean of {len(per_seed["float"])} seeds, {smooth}-step average)')
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point (see the module docstring).

    Example:
      >>> from benchmarks.training_bench import main  # doctest: +SKIP
    """
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4])
    ap.add_argument('--steps', type=int, default=600)
    ap.add_argument('--block', type=int, default=50)
    ap.add_argument('--lr', type=float, default=LR)
    ap.add_argument('--no-qwix', action='store_true')
    ap.add_argument('--no-write', action='store_true')
    ap.add_argument('--dump', default=None, help='also write the raw per-seed results as JSON here')
    ap.add_argument('--minilm', action='store_true', help='also fine-tune MiniLM-L6 (needs its weights package)')
    ap.add_argument('--minilm-seeds', type=int, nargs='+', default=[0])
    ap.add_argument('--minilm-steps', type=int, default=40)
    ap.add_argument('--minilm-batch', type=int, default=16)
    ap.add_argument('--minilm-lr', type=float, default=1e-4)
    ap.add_argument('--minilm-block', type=int, default=10)
    ap.add_argument('--render', default=None, help='only re-render the page and plot from a --dump file')
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            dump = json.load(f)
        for k, v in dump['args'].items():
            if k not in ('no_write', 'dump', 'render'):  # this invocation's output choices, not the run's
                setattr(args, k, v)
        per_seed, qwix, minilm, started, finished = (dump['qarray'], dump['qwix'], dump['minilm'], dump['started'],
                                                     dump['finished'])
    else:
        started = machine()
        print(started, flush=True)
        per_seed = run_qarray(args.seeds, args.steps, args.block, args.lr)
        qwix = None if args.no_qwix else run_qwix_head(args.seeds, args.steps, args.block, args.lr)
        minilm = None
        if args.minilm:
            minilm = run_minilm(args.minilm_seeds, args.minilm_steps, args.minilm_block, args.minilm_batch,
                                args.minilm_lr)
        finished = machine()
        if args.dump:
            with open(args.dump, 'w') as f:
                json.dump({'qarray': per_seed, 'qwix': qwix, 'minilm': minilm, 'started': started,
                           'finished': finished, 'args': {k: v for k, v in vars(args).items()
                                                          if k not in ('no_write', 'dump', 'render')}}, f)
    summary = summarize(per_seed)
    if qwix is not None:
        qwix['float_matches_qarray'] = all(
            a['losses'] == b['losses'] and a['test_acc'] == b['test_acc']
            for a, b in zip(per_seed['float'], qwix['per_seed']['float']))
        qwix['summary'] = summarize(qwix['per_seed'])
    args.per_seed = per_seed
    text = markdown(summary, qwix, args, started, finished, minilm)
    print(text)
    if not args.no_write:
        RESULTS_MD.write_text(text)
        plot(per_seed, qwix, PLOT, minilm=minilm)
        print(f"wrote {RESULTS_MD} and {PLOT}")


if __name__ == '__main__':
    main()
