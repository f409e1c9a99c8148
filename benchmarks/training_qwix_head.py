"""Qwix HEAD's quantized training (``QtRule`` with ``bwd_qtype``) on the digits CNN: the Qwix side of
``benchmarks/training_bench.py`` (issue 17).

Runs under Qwix HEAD's own venv (``/tmp/qwixhead-venv/bin/python``, with scikit-learn and optax), never
the project's: ``training_bench.py`` starts it as a subprocess with the repository root on
``PYTHONPATH``. It imports only the plain-JAX helpers of ``training_bench`` (data split, batches, init,
the jitted Adam step, the interleaved block timing, evaluation) -- no qarray -- so the data, initial
params, batch order and optimizer are the same as qarray's, and trains three settings per seed:
``float`` (no Qwix; must reproduce qarray's float run exactly), ``int8`` (``QtRule(weight_qtype='int8',
act_qtype='int8', bwd_qtype='int8')``) and ``fp8`` (weights and activations e4m3, ``bwd_qtype`` e5m2); a
setting Qwix cannot trace is reported under ``errors`` (for ``fp8`` the fallback ``fp8_conv_bwd_e4m3``,
e4m3 gradients in the convolutions, runs instead).
Qwix's QT forward runs on its quantized arrays (the real quantized dot), like qarray's
``fwd_quantized=True``. Prints one line ``RESULT {json}``.

Usage (from the repository root):
  PYTHONPATH=. /tmp/qwixhead-venv/bin/python benchmarks/training_qwix_head.py --seeds 0 1 --steps 600

Example:
  >>> import benchmarks.training_qwix_head  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import training_bench as tb  # noqa: E402  (plain JAX / Flax / optax only)

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
# name -> the rules, first match wins (module paths of the Linen CNN: Conv_0, Conv_1, Dense_0, Dense_1)
RULES = {
    'int8': [dict(module_path='.*', weight_qtype='int8', act_qtype='int8', bwd_qtype='int8')],
    'fp8': [dict(module_path='.*', weight_qtype=E4M3, act_qtype=E4M3, bwd_qtype=E5M2)],
    # Fallback when Qwix cannot run the e5m2-gradient x e4m3-residual convolutions of 'fp8' (its conv
    # backward feeds the two fp8 formats to lax.conv_general_dilated, which needs equal dtypes): e4m3
    # gradients in the two convolutions, e5m2 in the dense layers.
    'fp8_conv_bwd_e4m3': [dict(module_path='Conv_.*', weight_qtype=E4M3, act_qtype=E4M3, bwd_qtype=E4M3),
                          dict(module_path='.*', weight_qtype=E4M3, act_qtype=E4M3, bwd_qtype=E5M2)],
}


def rule_text(rules: list[dict]) -> str:
    """The rules as they would be written in code.

    Example:
      >>> rule_text([{'bwd_qtype': 'int8'}])
      "QtRule(bwd_qtype='int8')"
    """
    def v(x):
        return repr(x) if isinstance(x, str) else f"jnp.{getattr(x, '__name__', str(x))}"
    return ', '.join('QtRule(' + ', '.join(f"{k}={v(x)}" for k, x in kw.items()) + ')' for kw in rules)


def applies() -> dict:
    """``name -> apply(params, x)``: the float CNN and its Qwix QT versions.

    Example:
      >>> sorted(applies())  # doctest: +SKIP
      ['float', 'fp8', 'int8']
    """
    import qwix
    from examples.digits import models

    out = {'float': (lambda m: lambda p, x: m.apply({'params': p}, x))(models.LinenCNN())}
    for name, rules in RULES.items():
        m = qwix.quantize_model(models.LinenCNN(), qwix.QtProvider([qwix.QtRule(**kw) for kw in rules]))
        out[name] = (lambda m: lambda p, x: m.apply({'params': p}, x))(m)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line entry point (see the module docstring).

    Example:
      >>> from benchmarks.training_qwix_head import main  # doctest: +SKIP
    """
    import qwix
    ap = argparse.ArgumentParser()
    ap.add_argument('--seeds', type=int, nargs='+', default=[0])
    ap.add_argument('--steps', type=int, default=600)
    ap.add_argument('--block', type=int, default=50)
    ap.add_argument('--lr', type=float, default=tb.LR)
    args = ap.parse_args(argv)
    fns = applies()
    opt = optax.adam(args.lr)
    trainers = {n: tb.train_step(tb.classifier_loss(f), opt) for n, f in fns.items()}
    errors = {}
    p0 = tb.init_params(args.seeds[0])
    xs, ys = tb.batches(args.seeds[0], 1)
    for n in list(fns):  # trace each training step once: a setting Qwix cannot run is reported, not fatal
        try:
            jax.eval_shape(trainers[n], p0, opt.init(p0), xs[0], ys[0])
        except Exception as e:  # noqa: BLE001  (any failure of the peer library is a finding to report)
            errors[n] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"qwix {n}: {errors[n]}", file=sys.stderr, flush=True)
            del fns[n], trainers[n]
    if 'fp8' in fns:
        del fns['fp8_conv_bwd_e4m3'], trainers['fp8_conv_bwd_e4m3']  # the fallback is only needed without fp8
    per_seed: dict[str, list[dict]] = {n: [] for n in fns}
    for seed in args.seeds:
        p0 = tb.init_params(seed)
        xs, ys = tb.batches(seed, args.steps)
        t0 = time.perf_counter()
        out = tb.train_interleaved({n: (trainers[n], p0, opt.init(p0)) for n in fns}, list(zip(xs, ys)),
                                   args.block)
        for n, o in out.items():
            acc, loss = tb.evaluate(fns[n], o['params'])
            per_seed[n].append(dict(seed=seed, losses=o['losses'], wall=o['wall'], cpu=o['cpu'], test_acc=acc,
                                    test_loss=loss))
        print(f"qwix seed {seed}: " + ', '.join(f"{n} {r[-1]['test_acc']:.2f}%" for n, r in per_seed.items())
              + f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    version = getattr(qwix, '__version__', None)
    if version is None:
        from qwix import version as qv
        version = getattr(qv, '__version__', str(qv))
    print('RESULT ' + json.dumps({'qwix_version': version, 'per_seed': per_seed,
                                  'rules': {n: rule_text(r) for n, r in RULES.items()}, 'errors': errors}))


if __name__ == '__main__':
    main()
