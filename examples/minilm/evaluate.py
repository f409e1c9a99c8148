"""Quantize MiniLM per scheme with ``flax_integration`` and with Qwix; measure bytes, fidelity, latency.

Fidelity is measured against the float32 model on the 91 sentences of the 48
hand-written pairs (:mod:`examples.minilm.sentences`): mean cosine between
quantized and float embeddings, and the Spearman correlation of the 48 pair
similarities with the float model's. Static activation ranges are calibrated on
the held-out :data:`~examples.minilm.sentences.CALIBRATION` sentences only (GPTQ Hessians too).
Latency: a jitted forward pass on 32 sentences x 64 tokens, params passed as
arguments (so XLA cannot constant-fold the dequantization away); the two
libraries' runs are interleaved so machine noise hits both alike.

Example:
  >>> from examples.minilm import evaluate
  >>> evaluate.tree_bytes({'a': __import__('numpy').zeros((2, 3), 'float32')})
  24
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from qarray.paths import path_name

from examples.minilm import metrics, sentences, weights
from examples.minilm.model import LINEAR_PATHS, MiniLM
from examples.minilm.schemes import Scheme, qarray_rules, qwix_rules

__all__ = ['EvalData', 'Built', 'eval_data', 'calibration_batches', 'tree_bytes', 'linear_bytes', 'build_float', 'build_qarray',
           'build_qwix', 'fidelity', 'fidelity_noise', 'time_interleaved', 'run_table']


@dataclasses.dataclass
class EvalData:
    """Tokenised inputs: pair sentences, calibration sentences, the latency batch."""

    ids: np.ndarray
    mask: np.ndarray
    pairs: list[tuple[int, int]]
    gold: list[int]
    calib_ids: np.ndarray
    calib_mask: np.ndarray
    lat_ids: np.ndarray
    lat_mask: np.ndarray


def eval_data(length: int = 24, latency_batch: int = 32, latency_length: int = 64,
              n_pairs: int | None = None) -> EvalData:
    """Tokenise the evaluation sets (``n_pairs`` keeps only the first pairs of each grade, for speed).

    Example:
      >>> eval_data(n_pairs=2).ids.shape  # doctest: +SKIP
      (24, 24)
    """
    pairs = sentences.PAIRS
    if n_pairs is not None:
        pairs = [p for g in range(6) for p in [q for q in sentences.PAIRS if q[2] == g][:n_pairs]]
    sents: list[str] = []
    idx = []
    for a, b, _ in pairs:
        for s in (a, b):
            if s not in sents:
                sents.append(s)
        idx.append((sents.index(a), sents.index(b)))
    tok = weights.load_tokenizer()
    ids, mask = tok(sents, length)
    cids, cmask = tok(sentences.CALIBRATION, length)
    lids, lmask = tok(sentences.latency_batch(latency_batch), latency_length)
    return EvalData(ids, mask, idx, [g for _, _, g in pairs], cids, cmask, lids, lmask)


def calibration_batches(length: int = 24) -> list[tuple[np.ndarray, np.ndarray]]:
    """The held-out calibration sentences as unpadded batches: one batch per token count.

    GPTQ's Hessian counts every position, so padding positions would weigh in
    as if they were text; grouping the sentences by length avoids padding.

    Example:
      >>> sum(ids.shape[0] for ids, _ in calibration_batches()) == len(sentences.CALIBRATION)  # doctest: +SKIP
      True
    """
    tok = weights.load_tokenizer()
    ids, mask = tok(sentences.CALIBRATION, length)
    lengths = mask.sum(axis=1)
    return [(ids[lengths == n][:, :n], mask[lengths == n][:, :n]) for n in sorted(set(lengths.tolist()))]


@dataclasses.dataclass
class Built:
    """A ready-to-run model: ``apply(variables, ids, mask) -> embeddings`` (jitted) and its variables."""

    apply: Callable[..., jax.Array]
    variables: Any


def _leaf_bytes(leaf: Any) -> int:
    return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def _leaf_bits(leaf: Any) -> float:
    """Bytes a leaf needs when sub-byte dtypes (jnp.int4/uint4, float4) are packed, as XLA does on GPU/TPU."""
    bits = {'int4': 4, 'uint4': 4, 'int2': 2, 'uint2': 2, 'float4_e2m1fn': 4}.get(
        np.dtype(leaf.dtype).name, 8 * np.dtype(leaf.dtype).itemsize)
    return math.prod(leaf.shape) * bits / 8


def tree_bytes(tree: Any, *, packed: bool = False) -> int:
    """Stored bytes of every array leaf (QArrays count values + scales + zero points).

    ``packed=True`` counts ``jnp.int4``/``uint4`` leaves at 4 bits (their size on
    GPU/TPU); by default it is their real buffer size here (1 byte per value on CPU).

    Example:
      >>> import jax.numpy as jnp
      >>> tree_bytes({'w': jnp.zeros((4, 8), jnp.int4)}), tree_bytes({'w': jnp.zeros((4, 8), jnp.int4)}, packed=True)
      (32, 16)
    """
    leaves = [l for l in jax.tree.leaves(tree) if hasattr(l, 'shape') and hasattr(l, 'dtype')]
    return int(sum(_leaf_bits(l) if packed else _leaf_bytes(l) for l in leaves))


def linear_bytes(params: Any, *, packed: bool = False) -> int:
    """Bytes of the 36 linear layers' kernels (with their scales), excluding biases and embeddings.

    Example:
      >>> import numpy as np
      >>> linear_bytes({'layer_0': {'query': {'kernel': np.zeros((2, 2), 'float32'), 'bias': np.zeros(2, 'float32')}}})
      16
    """
    rx = re.compile(r'(.*/)?' + LINEAR_PATHS + r'/kernel(/.*)?')
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return int(sum((_leaf_bits(l) if packed else _leaf_bytes(l)) for p, l in flat
                   if hasattr(l, 'shape') and rx.fullmatch(path_name(p))))


def build_float(params: Any) -> Built:
    """The float32 model.

    Example:
      >>> build_float(weights.load_params()).variables['params']['layer_0']['query']['kernel'].shape  # doctest: +SKIP
      (384, 384)
    """
    return Built(jax.jit(MiniLM().apply), params)


def _fi() -> Any:
    """``flax_integration`` (imported lazily: the float model and the metrics do not need it)."""
    import flax_integration
    return flax_integration


def build_qarray(scheme: Scheme, params: Any, data: EvalData) -> Built:
    """Quantize with ``flax_integration``: ``quantize_model`` + ``PtqProvider``, then ``quantize_params``.

    Static and GPTQ schemes first run ``flax_integration._calibrate`` (the float model under the same rules) on
    the held-out sentences to collect the ``quant_stats`` (ranges, Hessians) that ``quantize_params`` uses.

    Example:
      >>> build_qarray(SCHEMES[0], weights.load_params(), eval_data())  # doctest: +SKIP
    """
    fi = _fi()
    rules = qarray_rules(scheme, fi)
    model = MiniLM()
    qmodel = fi.quantize_model(model, fi.PtqProvider(rules))
    abstract = jax.eval_shape(qmodel.init, jax.random.key(0), data.ids[:2], data.mask[:2])
    quant_stats = None
    if scheme.act_static or scheme.weight_algorithm == 'gptq':
        # Static ranges: one padded batch, as Qwix gets. GPTQ: unpadded batches (its Hessian counts every
        # position). A scheme needing both gets its ranges from the unpadded batches too.
        batches = (calibration_batches() if scheme.weight_algorithm == 'gptq'
                   else [(data.calib_ids, data.calib_mask)])
        quant_stats = fi.calibrate(model, params['params'], batches, rules=rules, progress=False)
    qparams = fi.quantize_params(params['params'], abstract['params'], quant_stats)
    return Built(jax.jit(qmodel.apply), {'params': qparams})


def build_qwix(scheme: Scheme, params: Any, data: EvalData) -> Built | None:
    """The Qwix 0.1.8 side of a row (None where the row has no Qwix counterpart).

    ``scheme.qwix_method == 'ptq'``: the same scheme in plain Qwix PTQ; static
    schemes collect ``quant_stats`` with Qwix's ``QtProvider`` on the held-out
    sentences, then ``qwix.quantize_params`` turns them into scales. ``'gptq'``,
    ``'awq'``, ``'smoothquant'``: Qwix's ``contrib`` method with the scheme's
    formats (:mod:`examples.minilm.qwix_contrib`), calibrated on the same
    unpadded held-out batches as qarray's GPTQ.

    Example:
      >>> build_qwix(SCHEMES[0], weights.load_params(), eval_data())  # doctest: +SKIP
    """
    if scheme.qwix_method in ('gptq', 'awq', 'smoothquant'):
        from examples.minilm import qwix_contrib
        batches = calibration_batches()
        if scheme.qwix_method == 'gptq':
            return qwix_contrib.build_qwix_gptq(scheme, params, data, batches, damping=scheme.gptq_damping)
        if scheme.qwix_method == 'awq':
            return qwix_contrib.build_qwix_awq(scheme, params, data, batches)
        return qwix_contrib.build_qwix_smoothquant(scheme, params, data, batches)
    rules = qwix_rules(scheme) if scheme.qwix_method == 'ptq' else None
    if rules is None:
        return None
    import qwix
    model = MiniLM()
    quant_stats = {}
    if scheme.act_static:
        qt = qwix.quantize_model(model, qwix.QtProvider(rules))
        init = jax.eval_shape(qt.init, jax.random.key(0), data.calib_ids, data.calib_mask)
        stats0 = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init['quant_stats'])
        _, upd = qt.apply({'params': params['params'], 'quant_stats': stats0}, data.calib_ids,
                          data.calib_mask, mutable=['quant_stats'])
        quant_stats = upd['quant_stats']
    qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
    abstract = jax.eval_shape(qmodel.init, jax.random.key(0), data.ids[:2], data.mask[:2])
    qparams = qwix.quantize_params(params['params'], abstract['params'], quant_stats)
    return Built(jax.jit(qmodel.apply), {'params': qparams})


def fidelity(built: Built, data: EvalData, float_emb: np.ndarray) -> dict[str, float]:
    """Mean cosine vs the float embeddings and Spearman of pair similarities vs float.

    Example:
      >>> f = build_float(weights.load_params()); d = eval_data(n_pairs=1)  # doctest: +SKIP
      >>> fidelity(f, d, np.asarray(f.apply(f.variables, d.ids, d.mask)))['cos']  # doctest: +SKIP
      1.0
    """
    emb = np.asarray(built.apply(built.variables, data.ids, data.mask))
    cos = metrics.rowwise_cosine(emb, float_emb)
    rho = metrics.spearman(metrics.pair_similarities(emb, data.pairs),
                           metrics.pair_similarities(float_emb, data.pairs))
    return {'cos': float(cos.mean()), 'cos_min': float(cos.min()), 'spearman': rho}


def _one_ulp_perturbed(params: Any, seed: int) -> Any:
    """``params`` with every float multiplied by ``1 +- 2**-23`` (about one float32 ulp), signs at random."""
    rng = np.random.default_rng(seed)

    def nudge(leaf):
        a = np.asarray(leaf)
        if not np.issubdtype(a.dtype, np.floating):
            return leaf
        return (a * (1 + rng.choice([-1.0, 1.0], a.shape) * 2.0**-23)).astype(a.dtype)
    return jax.tree.map(nudge, params)


def fidelity_noise(scheme: Scheme, params: Any, data: EvalData, float_emb: np.ndarray, n: int = 4) -> float:
    """Standard deviation of the scheme's mean cosine when the float weights move by one float32 ulp.

    The noise floor of a comparison: rounding-boundary flips (weights, activations) make the mean cosine of
    two implementations that store the same codes differ by about this much.

    Example:
      >>> fidelity_noise(SCHEMES[0], weights.load_params(), eval_data(n_pairs=1), emb)  # doctest: +SKIP
      1.2e-05
    """
    cos = [fidelity(build_qarray(scheme, _one_ulp_perturbed(params, seed), data), data, float_emb)['cos']
           for seed in range(n)]
    return float(np.std(cos, ddof=1))


def time_interleaved(builts: Sequence[Built | None], ids: np.ndarray, mask: np.ndarray,
                     repeats: int = 5) -> list[float | None]:
    """Median milliseconds per call of each model, runs interleaved round-robin (after one warm-up).

    Example:
      >>> time_interleaved([None], np.zeros((1, 2), 'int32'), np.ones((1, 2), 'int32'))
      [None]
    """
    live = [b for b in builts if b is not None]
    for b in live:
        jax.block_until_ready(b.apply(b.variables, ids, mask))  # compile + warm up
    times: dict[int, list[float]] = {id(b): [] for b in live}
    for _ in range(repeats):
        for b in live:
            t0 = time.perf_counter()
            jax.block_until_ready(b.apply(b.variables, ids, mask))
            times[id(b)].append(1e3 * (time.perf_counter() - t0))
    return [None if b is None else statistics.median(times[id(b)]) for b in builts]


def run_table(schemes: Sequence[Scheme], *, with_qwix: bool = True, data: EvalData | None = None,
              repeats: int = 5, timing: bool = True, log: Callable[[str], None] | None = None
              ) -> list[dict[str, Any]]:
    """One row per scheme (plus a float32 row first) with bytes, fidelity and latency of both libraries.

    Example:
      >>> rows = run_table([], with_qwix=False, repeats=1)  # doctest: +SKIP
      >>> rows[0]['scheme']  # doctest: +SKIP
      'float32'
    """
    params = weights.load_params()
    data = data or eval_data()
    ref = build_float(params)
    float_emb = np.asarray(ref.apply(ref.variables, data.ids, data.mask))
    if with_qwix:
        try:
            import qwix  # noqa: F401
        except ImportError:
            with_qwix = False
    f_lat = time_interleaved([ref], data.lat_ids, data.lat_mask, repeats)[0] if timing else None
    rows = [dict(scheme='float32', bytes=tree_bytes(params), linear_bytes=linear_bytes(params), cos=1.0,
                 cos_min=1.0, spearman=1.0, ms=f_lat, float_ms=f_lat)]
    for scheme in schemes:
        t0 = time.perf_counter()
        ours = build_qarray(scheme, params, data)
        theirs = None
        if with_qwix:
            try:
                theirs = build_qwix(scheme, params, data)
            except NotImplementedError as e:  # a Qwix method that cannot produce this format: say so in the row
                if log:
                    log(f"{scheme.name}: no Qwix row: {e}")
        row: dict[str, Any] = dict(scheme=scheme.name, bytes=tree_bytes(ours.variables),
                                   linear_bytes=linear_bytes(ours.variables), **fidelity(ours, data, float_emb))
        if theirs is not None:
            qf = fidelity(theirs, data, float_emb)
            row.update(qwix_method=scheme.qwix_method, qwix_bytes=tree_bytes(theirs.variables),
                       qwix_linear_bytes=linear_bytes(theirs.variables),
                       qwix_linear_bytes_packed=linear_bytes(theirs.variables, packed=True),
                       qwix_cos=qf['cos'], qwix_spearman=qf['spearman'])
        if theirs is not None and 0 < row['qwix_cos'] - row['cos'] < 1e-3:
            # Below Qwix by a hair: measure this row's own noise floor so the report can tell a tie.
            row['cos_noise'] = fidelity_noise(scheme, params, data, float_emb)
        if timing:
            # The float model runs in the same round-robin so each row carries its own baseline.
            fms, ms, qms = time_interleaved([ref, ours, theirs], data.lat_ids, data.lat_mask, repeats)
            row.update(ms=ms, qwix_ms=qms, float_ms=fms)
        rows.append(row)
        if log:
            log(f"{scheme.name}: done in {time.perf_counter() - t0:.1f} s")
    return rows
