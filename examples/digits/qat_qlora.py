"""QAT and QLoRA on scikit-learn's digits: the runnable proof of issue 5.

``python -m examples.digits.qat_qlora`` (add ``--fast`` for the tour setting) prints:

1. **QAT table** (Linen CNN, then the same for NNX): float accuracy, PTQ int8,
   PTQ int4 (int4 weights, tiles of 16 on the dense layers, int4 static
   activations), and QAT int4 -- the float model fine-tuned with
   ``QtProvider`` under the int4 rules, then converted with
   ``quantize_params`` and run as the PTQ model -- with the stored model bytes.
2. **QLoRA**: a CNN trained on digits 0-4 is frozen as an nf4 base (tiles of
   64 on the dense layers, per channel on the convolutions); rank-4 adapters
   are trained on digits 5-9. It reports the adapter count, stored base bytes
   vs float, and accuracy before/after; the optimizer state holds adapters
   only, and the merged export is checked against the QLoRA forward.

Example:
  >>> rows = qat_rows(steps=5, qat_steps=5)
  >>> [r['model'] for r in rows]
  ['float', 'PTQ int8', 'PTQ int4', 'QAT int4']
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from examples.digits import data, models, train
from flax_integration import (LoraProvider, LoraRule, PtqProvider, QtProvider, QuantStat, QuantizationRule,
                              QuantizedParam, calibrate, lora_param_count, lora_trainable, merge_lora,
                              quantize_model, quantize_params, with_base_weights)

__all__ = ['INT8_RULES', 'INT4_RULES', 'QLORA_RULES', 'param_bytes', 'qat_rows', 'qat_rows_nnx', 'qlora_run',
           'qlora_run_nnx', 'digits_section', 'main']

# PTQ int8: int8 weights (per channel), int8 static activations.
INT8_RULES = [QuantizationRule(weight_qtype='int8', act_qtype='int8', act_static_scale=True)]
# PTQ int4: int4 weights (dense: tiles of 16 along the contraction; conv: per channel), int4 static
# symmetric (absmax) activations.
INT4_RULES = [QuantizationRule(weight_qtype='int4', act_qtype='int4', act_static_scale=True, tile_size=16,
                               op_names=('dot_general',)),
              QuantizationRule(weight_qtype='int4', act_qtype='int4', act_static_scale=True)]
# QLoRA: nf4 frozen base (dense: tiles of 64; conv: per channel), rank-4 adapters everywhere (alpha / rank = 8).
QLORA_RULES = [LoraRule(rank=4, alpha=32.0, weight_qtype='nf4', tile_size=64, op_names=('dot_general',)),
               LoraRule(rank=4, alpha=32.0, weight_qtype='nf4')]


def param_bytes(tree: Any) -> int:
    """Stored bytes of a param tree or NNX model (quantized leaves: packed values + scales).

    Example:
      >>> param_bytes({'w': jnp.ones((2, 3))})
      24
    """
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    leaves = jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, QuantizedParam))
    return sum(v.array.nbytes if isinstance(v, QuantizedParam) else int(v.nbytes) for v in leaves)


# Every evaluation runs in fixed chunks of EVAL_BATCH rows (the last one zero-padded): one compiled
# forward per model whatever the split size. The quantized forwards are per-example (static activation
# scales, weight-only LoRA), so padding rows never change the real rows' outputs.
EVAL_BATCH = 256


def _logits(apply, x) -> np.ndarray:
    """``apply`` over ``x`` in (EVAL_BATCH, 8, 8, 1) chunks, the last one zero-padded; logits of the real rows."""
    x = np.asarray(x)
    xp = np.concatenate([x, np.zeros((-len(x) % EVAL_BATCH,) + x.shape[1:], x.dtype)])
    out = [np.asarray(apply(jnp.asarray(xp[i:i + EVAL_BATCH]))) for i in range(0, len(xp), EVAL_BATCH)]
    return np.concatenate(out)[:len(x)]


def _accuracy(apply, x, y) -> float:
    """Test accuracy in percent (argmax on the host)."""
    return float(np.mean(_logits(apply, x).argmax(-1) == np.asarray(y)) * 100)


@functools.lru_cache(maxsize=32)
def _forward(model):
    """One compiled forward per Linen model (variables are an argument, so new params reuse it)."""
    return jax.jit(lambda variables, x: model.apply(variables, x))


@functools.lru_cache(maxsize=32)
def _init(model):
    """One compiled ``init`` per Linen model (eager init would compile every initializer op)."""
    return jax.jit(model.init)


_nnx_forward = nnx.jit(lambda m, x: m(x))  # cached per model structure by nnx.jit


def _calibration_batches(x: np.ndarray) -> list:
    return [jnp.asarray(x[i:i + 128]) for i in range(0, len(x) - 127, 128)]  # full batches of 128


# --------------------------------------------------------------------------- QAT recipe
# QAT fine-tunes the trained float weights (Adam, cosine decay from QAT_LR to 0: the weights settle
# instead of ending on a noisy constant-rate step) with the activation ranges frozen at the int4
# calibration statistics, i.e. the ranges PTQ deploys. Letting the ranges keep updating during QAT
# makes them drift low (they average activations of the fake-quantized net, which upstream clipping
# shrinks: fc2's input range fell 7-9 %), and with a learning rate near 0 that drift alone cost up to
# 0.9 points after conversion (NNX, seed 1).
QAT_LR = 1e-3
QAT_SCHEDULE = 'cosine'
FAST = dict(steps=250, qat_steps=300)
FULL = dict(steps=250, qat_steps=600)


# --------------------------------------------------------------------------- QAT, Linen
@functools.lru_cache(maxsize=16)
def _ptq_tools(model, rules: tuple):
    """Calibration model, jitted ``quantize_params`` and jitted PTQ forward for ``rules`` (built once)."""
    calib = quantize_model(model, _calibration_provider(list(rules)))
    ptq = quantize_model(model, PtqProvider(list(rules)))
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']
    return calib, jax.jit(lambda f, s: quantize_params(f, abstract, s)), _forward(ptq)


@functools.lru_cache(maxsize=16)
def _qat_model(model, rules: tuple):
    """The QAT model for ``rules`` (one per float model, so its compiled train step is reused)."""
    return quantize_model(model, QtProvider(list(rules)))


def _zero_stats(calib) -> dict:
    shapes = jax.eval_shape(calib.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['quant_stats']
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _ptq_linen(model, fp_params, rules, calib_x, stats=None):
    """PTQ params (calibration + quantize_params), a forward function and the statistics used."""
    calib, to_ptq, fwd = _ptq_tools(model, tuple(rules))
    if stats is None:  # starting from zero statistics, the calibration step compiles once (not twice)
        stats = calibrate(calib, fp_params, _calibration_batches(calib_x), quant_stats=_zero_stats(calib),
                          progress=False)
    params = to_ptq(fp_params, stats)
    return params, (lambda x: fwd({'params': params}, x)), stats


def qat_rows(steps: int = FULL['steps'], qat_steps: int = FULL['qat_steps'], seed: int = 0,
             d: data.Digits | None = None, check_qat_forward: bool = True, int8: bool = True,
             qat_lr: float = QAT_LR, qat_schedule: str = QAT_SCHEDULE, qat_batch: int = 64,
             freeze_stats: bool = True) -> list[dict]:
    """Linen: float, PTQ int8, PTQ int4 and QAT int4 test accuracy and bytes; one dict per row.

    QAT starts from the trained float weights and the int4 calibration
    statistics and fine-tunes with Adam (``qat_lr``, ``qat_schedule``), the
    statistics frozen unless ``freeze_stats=False`` (see the QAT recipe
    note); its row is the converted PTQ model (``quantize_params``). With
    ``check_qat_forward`` the QAT forward itself is also evaluated.

    Example:
      >>> [r['model'] for r in qat_rows(steps=5, qat_steps=5)]
      ['float', 'PTQ int8', 'PTQ int4', 'QAT int4']
    """
    d = d or data.load()
    model = models.LinenCNN()
    variables = _init(model)(jax.random.key(seed), d.x_train[:1])
    fp = train.train_linen(model, variables, d.x_train, d.y_train, steps=steps, seed=seed)['params']
    rows = [dict(model='float', acc=_accuracy(lambda x: _forward(model)({'params': fp}, x), d.x_test, d.y_test),
                 bytes=param_bytes(fp))]
    stats = None
    for name, rules in (('PTQ int8', INT8_RULES),) * int8 + (('PTQ int4', INT4_RULES),):
        params, fwd, stats = _ptq_linen(model, fp, rules, d.x_train)
        rows.append(dict(model=name, acc=_accuracy(fwd, d.x_test, d.y_test), bytes=param_bytes(params)))
    qat = _qat_model(model, tuple(INT4_RULES))
    v = train.train_linen(qat, {'params': fp, 'quant_stats': stats}, d.x_train, d.y_train, steps=qat_steps,
                          batch=qat_batch, lr=qat_lr, schedule=qat_schedule, seed=seed + 1,
                          mutable=() if freeze_stats else ('quant_stats',))  # not mutable: frozen
    params, fwd, _ = _ptq_linen(model, v['params'], INT4_RULES, None, stats=v['quant_stats'])
    row = dict(model='QAT int4', acc=_accuracy(fwd, d.x_test, d.y_test), bytes=param_bytes(params))
    if check_qat_forward:
        qat_fwd = lambda x: _forward(qat)(v, x)
        qat_out = _logits(qat_fwd, d.x_test)
        row.update(qat_forward_acc=float(np.mean(qat_out.argmax(-1) == d.y_test) * 100),
                   max_diff=float(np.max(np.abs(qat_out - _logits(fwd, d.x_test)))))
    rows.append(row)
    return rows


# --------------------------------------------------------------------------- QAT, NNX
def qat_rows_nnx(steps: int = FULL['steps'], qat_steps: int = FULL['qat_steps'], seed: int = 0,
                 d: data.Digits | None = None, qat_lr: float = QAT_LR, qat_schedule: str = QAT_SCHEDULE, qat_batch: int = 64,
                 freeze_stats: bool = True) -> list[dict]:
    """NNX: the same table (float, PTQ int4 from calibration, QAT int4 converted to PTQ).

    Calibration uses the same batches as the Linen path; QAT trains a copy of
    the float model (``quantize_model`` copies) with the same recipe, the
    statistics frozen through ``use_running_average`` unless
    ``freeze_stats=False``; ``qat.eval()`` freezes them for conversion.

    Example:
      >>> qat_rows_nnx(steps=5, qat_steps=5)[-1]['model']
      'QAT int4'
    """
    d = d or data.load()
    x0 = jnp.asarray(d.x_train[:1])
    fp = train.train_nnx(models.NnxCNN(rngs=nnx.Rngs(seed)), d.x_train, d.y_train, steps=steps, seed=seed)
    run = lambda m: (lambda x: _nnx_forward(m, x))
    rows = [dict(model='float', acc=_accuracy(run(fp), d.x_test, d.y_test), bytes=param_bytes(fp))]

    def ptq_from(float_model, stats):
        abstract = nnx.eval_shape(lambda: quantize_model(models.NnxCNN(rngs=nnx.Rngs(0)),
                                                         PtqProvider(INT4_RULES), x0))
        nnx.update(abstract, quantize_params(float_model, abstract, stats))
        return abstract

    calib = quantize_model(fp, _calibration_provider(INT4_RULES), x0)
    stats = calibrate(calib, None, _calibration_batches(d.x_train), progress=False)
    ptq = ptq_from(fp, stats)
    rows.append(dict(model='PTQ int4', acc=_accuracy(run(ptq), d.x_test, d.y_test), bytes=param_bytes(ptq)))
    qat = quantize_model(fp, QtProvider(INT4_RULES), x0)  # a copy holding fp's trained weights
    _load_stats(qat, stats)  # start from the calibrated statistics
    qat.set_attributes(use_running_average=freeze_stats)  # True: the calibrated ranges stay (BatchNorm flag)
    train.train_nnx(qat, d.x_train, d.y_train, steps=qat_steps, batch=qat_batch, lr=qat_lr, schedule=qat_schedule,
                    seed=seed + 1)
    qat.eval()  # freezes the statistics
    ptq = ptq_from(qat, nnx.state(qat, QuantStat))
    rows.append(dict(model='QAT int4', acc=_accuracy(run(ptq), d.x_test, d.y_test), bytes=param_bytes(ptq),
                     qat_forward_acc=_accuracy(run(qat), d.x_test, d.y_test)))
    return rows


def _load_stats(model: nnx.Module, stats: dict) -> None:
    """Set an NNX model's QuantStat variables from a pure dict (as returned by ``calibrate``)."""
    for path, module in nnx.iter_modules(model):
        for name, var in vars(module).items():
            if isinstance(var, QuantStat):
                node = stats
                for k in tuple(path) + (name,):
                    node = node[k]
                var.set_value(node)


def _calibration_provider(rules):
    from flax_integration.providers.calibration import CalibrationProvider
    return CalibrationProvider(rules)


# --------------------------------------------------------------------------- QLoRA
def _split(d: data.Digits) -> tuple[data.Digits, data.Digits]:
    return data.subset(d, (0, 1, 2, 3, 4)), data.subset(d, (5, 6, 7, 8, 9))


def qlora_run(steps: int = 300, lora_steps: int = 200, seed: int = 0, d: data.Digits | None = None,
              check_merge: bool = True) -> dict:
    """Linen QLoRA: nf4 base trained on digits 0-4, rank-4 adapters trained on 5-9.

    Example:
      >>> r = qlora_run(steps=5, lora_steps=5)
      >>> r['optimizer_leaves_are_adapters'], r['base_packed']
      (True, True)
    """
    d = d or data.load()
    old, new = _split(d)
    model = models.LinenCNN()
    v = _init(model)(jax.random.key(seed), d.x_train[:1])
    fp = train.train_linen(model, v, old.x_train, old.y_train, steps=steps, seed=seed)['params']
    lora = quantize_model(model, LoraProvider(QLORA_RULES, seed=seed))
    # init + quantizing the pretrained base: one compiled program
    params = jax.jit(lambda key, f: with_base_weights(lora.init(key, d.x_train[:1])['params'], f))(
        jax.random.key(seed + 1), fp)
    fwd = lambda p, x: _forward(lora)({'params': p}, x)
    before = _accuracy(lambda x: fwd(params, x), new.x_test, new.y_test)
    old_before = _accuracy(lambda x: fwd(params, x), old.x_test, old.y_test)
    losses: list = []
    trained = train.train_linen(lora, {'params': params}, new.x_train, new.y_train, steps=lora_steps, lr=1e-2,
                                seed=seed + 2, trainable=lora_trainable, losses=losses)['params']
    adapters, frozen = train.split_params(trained, lora_trainable)
    opt_leaves = jax.tree.leaves(train._ADAM.init(adapters))  # the state train_linen optimised
    after_fwd = _logits(lambda x: fwd(trained, x), new.x_test)
    merged_diff = float('nan')
    if check_merge:  # traced once: the merge runs the model, so jit compiles it as one program
        merged = jax.jit(lambda p: merge_lora(lora, p, d.x_test[:2]))(trained)
        merged_out = _logits(lambda x: _forward(model)({'params': merged}, x), new.x_test)
        merged_diff = float(np.max(np.abs(merged_out - after_fwd)))
    kernels = [v for v in jax.tree.leaves(trained, is_leaf=lambda v: isinstance(v, QuantizedParam))
               if isinstance(v, QuantizedParam)]
    return dict(
        adapter_params=lora_param_count(trained), base_params=sum(int(np.prod(k.shape)) for k in kernels),
        base_float_bytes=sum(4 * int(np.prod(k.shape)) for k in kernels),
        base_stored_bytes=sum(k.array.nbytes for k in kernels), float_model_bytes=param_bytes(fp),
        qlora_model_bytes=param_bytes(trained),
        acc_new_before=before, acc_new_after=float(np.mean(after_fwd.argmax(-1) == new.y_test) * 100),
        acc_old_before=old_before,
        acc_old_after=_accuracy(lambda x: fwd(trained, x), old.x_test, old.y_test),
        merged_max_diff=merged_diff,
        loss_first=float(np.mean(losses[:10])), loss_last=float(np.mean(losses[-10:])),
        optimizer_leaves_are_adapters=all(l.size in {a.size for a in jax.tree.leaves(adapters)} or l.ndim == 0
                                          for l in opt_leaves),
        base_packed=all(k.array.qvalue.dtype == jnp.uint8 for k in kernels))


def qlora_run_nnx(steps: int = 300, lora_steps: int = 200, seed: int = 0, d: data.Digits | None = None) -> dict:
    """NNX QLoRA: the same experiment; only ``nnx.LoRAParam`` variables are optimised.

    Example:
      >>> qlora_run_nnx(steps=5, lora_steps=5)['adapter_params'] > 0
      True
    """
    d = d or data.load()
    old, new = _split(d)
    x0 = jnp.asarray(d.x_train[:1])
    fp = train.train_nnx(models.NnxCNN(rngs=nnx.Rngs(seed)), old.x_train, old.y_train, steps=steps, seed=seed)
    lora = quantize_model(fp, LoraProvider(QLORA_RULES, seed=seed), x0)
    run = lambda x: _nnx_forward(lora, x)
    before = _accuracy(run, new.x_test, new.y_test)
    losses: list = []
    train.train_nnx(lora, new.x_train, new.y_train, steps=lora_steps, lr=1e-2, seed=seed + 2,
                    wrt=nnx.LoRAParam, losses=losses)
    return dict(adapter_params=lora_param_count(lora), acc_new_before=before,
                acc_new_after=_accuracy(run, new.x_test, new.y_test),
                acc_old_after=_accuracy(run, old.x_test, old.y_test), qlora_model_bytes=param_bytes(lora),
                float_model_bytes=param_bytes(fp), loss_first=float(np.mean(losses[:10])),
                loss_last=float(np.mean(losses[-10:])))


# --------------------------------------------------------------------------- printing
def _print_qat(rows, print_table) -> None:
    cols = [('model', 'model', ''), ('acc', 'test acc %', '.2f'), ('bytes', 'param bytes', 'd')]
    if 'qat_forward_acc' in rows[-1]:
        for r in rows:
            r['qat_fwd'] = f"{r['qat_forward_acc']:.2f}" if 'qat_forward_acc' in r else '-'
        cols.append(('qat_fwd', 'QAT forward acc %', ''))
    print_table(rows, cols)
    if 'max_diff' in rows[-1]:
        print(f"  max |QAT forward - converted PTQ forward| on the test logits: {rows[-1]['max_diff']:.2e}")


def _print_qlora(r: dict) -> None:
    print(f"  adapters: {r['adapter_params']} params (rank 4 on every layer); base kernels: "
          f"{r.get('base_params', '-')} values, stored {r.get('base_stored_bytes', '-')} B nf4 vs "
          f"{r.get('base_float_bytes', '-')} B float32; whole model {r['qlora_model_bytes']} B vs "
          f"{r['float_model_bytes']} B float")
    print(f"  accuracy on digits 5-9: {r['acc_new_before']:.2f}% before -> {r['acc_new_after']:.2f}% after "
          f"(loss {r['loss_first']:.3f} -> {r['loss_last']:.3f})")
    print(f"  digits 0-4 after: {r['acc_old_after']:.2f}% (expected: fine-tuned on 5-9 alone, with no replay of 0-4, "
          "the model stops predicting 0-4 at all)")
    if r.get('merged_max_diff', float('nan')) == r.get('merged_max_diff'):
        print(f"  merge_lora export: max |float merged - QLoRA| = {r['merged_max_diff']:.2e}; optimizer state "
              f"holds adapters only: {r['optimizer_leaves_are_adapters']}; base packed: {r['base_packed']}")


def digits_section(print_table=None, fast: bool = True) -> None:
    """The digits QAT/QLoRA section of the tour (fast setting: Linen, seed 0, a few hundred steps each).

    Example:
      >>> digits_section.__name__
      'digits_section'
    """
    if print_table is None:
        from qarray._tour import print_table
    steps = FAST if fast else FULL
    print(f"Digits (scikit-learn, 8x8): QAT int4 vs PTQ, Linen CNN (float {steps['steps']} steps, "
          f"QAT {steps['qat_steps']} steps{', fast setting' if fast else ''})")
    d = data.load()
    _print_qat(qat_rows(**steps, d=d, check_qat_forward=not fast), print_table)
    print("QLoRA: nf4 base trained on digits 0-4, rank-4 adapters fine-tuned on digits 5-9 (Linen)")
    _print_qlora(qlora_run(steps=steps['steps'], lora_steps=150, d=d, check_merge=not fast))


def main(argv=None) -> None:
    """Run the full example (Linen and NNX, seeds 0-2)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--fast', action='store_true', help='the short tour setting (Linen only)')
    parser.add_argument('--float-steps', type=int, default=FULL['steps'], help='float training steps')
    args = parser.parse_args(argv)
    from qarray._tour import print_table
    if args.fast:
        digits_section(print_table, fast=True)
        return
    t0 = time.perf_counter()
    d = data.load()
    full = dict(FULL, steps=args.float_steps)
    print(f"digits: {len(d.y_train)} train / {len(d.y_test)} test images (jax {jax.__version__}, "
          f"{jax.default_backend()}); float {full['steps']} steps (Adam 3e-3), QAT {full['qat_steps']} steps "
          f"(Adam {QAT_LR:g}, {QAT_SCHEDULE} decay, calibrated ranges frozen)\n")
    for seed in (0, 1, 2):
        print(f"QAT vs PTQ, Linen CNN, seed {seed}")
        _print_qat(qat_rows(**full, seed=seed, d=d), print_table)
    for seed in (0, 1, 2):
        print(f"\nQAT vs PTQ, NNX CNN, seed {seed}")
        _print_qat(qat_rows_nnx(**full, seed=seed, d=d), print_table)
    print("\nQLoRA, Linen")
    _print_qlora(qlora_run(steps=250, lora_steps=150, d=d))
    print("\nQLoRA, NNX")
    _print_qlora(qlora_run_nnx(steps=250, lora_steps=150, d=d))
    print(f"\n(done in {time.perf_counter() - t0:.1f} s)")


if __name__ == '__main__':
    main()
