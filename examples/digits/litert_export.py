"""Digits -> QAT with LiteRT numerics -> full-integer .tflite, checked with the LiteRT interpreter.

For each of the CNN (conv + dense) and an MLP, in Linen and NNX: train with
``OdmlQatProvider`` (no change to the model code), export with
``export_litert``, then run the .tflite on the held-out digits and compare
with the QAT model (accuracy) and with the JAX conversion-mode model
(per-example outputs, in LSBs of the output scale). Prints each model's op
table and its size against the float conversion.

Run: ``python -m examples.digits.litert_export [steps]`` (needs the
``[litert]`` extra: ``pip install 'qarray[litert]'``).

Example:
  >>> r = run_one('linen', 'mlp', steps=2)  # doctest: +SKIP
  >>> r.ops[0]['op']  # doctest: +SKIP
  'QUANTIZE'
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from examples.digits import data, models, train
from flax_integration import litert
from flax_integration import quantize_model
from flax_integration import OdmlQatProvider, QuantizationRule

RULES = [QuantizationRule(module_path='.*', weight_qtype='int8', act_qtype='int8')]


class LinenMLP(nn.Module):
    """64 -> 64 -> 10 MLP on flattened 8x8 digits (Linen)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


class NnxMLP(nnx.Module):
    """64 -> 64 -> 10 MLP on flattened 8x8 digits (NNX)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(64, 64, rngs=rngs)
        self.fc2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        return self.fc2(nnx.relu(self.fc1(x)))


ARCHS = {('linen', 'cnn'): models.LinenCNN, ('linen', 'mlp'): LinenMLP,
         ('nnx', 'cnn'): models.NnxCNN, ('nnx', 'mlp'): NnxMLP}


@dataclasses.dataclass
class Result:
    """One trained, exported and checked model."""

    name: str
    tflite: bytes
    float_size: int
    ops: list
    acc_qat: float
    acc_tflite: float
    max_lsb: float
    lf: Any
    model: Any
    variables: Any


def train_qat(framework: str, arch: str, d: data.Digits, *, steps: int, seed: int = 0) -> tuple[Any, Any]:
    """A QAT model (OdmlQatProvider) trained on the digits; returns (model, variables or None for NNX)."""
    if (framework, arch) not in ARCHS:
        raise ValueError(f"framework/arch must be one of {sorted(ARCHS)}; got {(framework, arch)!r}.")
    cls = ARCHS[framework, arch]
    if framework == 'linen':
        qat = quantize_model(cls(), OdmlQatProvider(RULES))
        v = qat.init(jax.random.key(seed), d.x_train[:1])
        v = train.train_linen(qat, v, d.x_train, d.y_train, steps=steps, seed=seed, mutable=('quant_stats',))
        return qat, v
    qat = quantize_model(cls(rngs=nnx.Rngs(seed)), OdmlQatProvider(RULES), d.x_train[:1])
    train.train_nnx(qat, d.x_train, d.y_train, steps=steps, seed=seed)
    return qat, None


def predict(model: Any, variables: Any, x: np.ndarray) -> np.ndarray:
    """The QAT model's logits in JAX (eval: statistics frozen)."""
    if variables is None:
        return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables, x))


def float_tflite_size(framework: str, arch: str, model: Any, variables: Any, x: np.ndarray) -> int:
    """Size of the same trained weights converted without quantization."""
    cls = ARCHS[framework, arch]
    if framework == 'linen':
        params = variables['params']
        return len(litert.to_tflite(lambda x: cls().apply({'params': params}, x), (x,)))
    plain = cls(rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(model, nnx.Param))
    return len(litert.to_tflite(lambda x: plain(x), (x,)))


def run_one(framework: str, arch: str, *, steps: int = 150, d: data.Digits | None = None) -> Result:
    """Train, export (batch resizable), run on the test set, and compare."""
    d = d or data.load()
    model, v = train_qat(framework, arch, d, steps=steps)
    acc_qat = models.accuracy(predict(model, v, d.x_test), d.y_test)
    x1 = d.x_test[:1]
    fb = litert.export_litert(model, v, (x1,), dynamic_batch=True)
    lf = litert.litert_function(model, v, (x1,))
    out = litert.run_tflite(fb, d.x_test)[0]
    ref = np.asarray(jax.jit(lf.fn)(jnp.asarray(d.x_test)))
    s_out = float(np.asarray(lf.output_qparams[0][0]).reshape(-1)[0])
    return Result(f'{framework} {arch}', fb, float_tflite_size(framework, arch, model, v, x1), litert.op_table(fb),
                  acc_qat, models.accuracy(out, d.y_test), float(np.abs(out - ref).max() / s_out), lf, model, v)


def main(steps: int = 150) -> list[Result]:
    """Run all four models and print their op tables and sizes."""
    d = data.load()
    results = []
    for framework, arch in [('linen', 'cnn'), ('linen', 'mlp'), ('nnx', 'cnn'), ('nnx', 'mlp')]:
        t0 = time.perf_counter()
        r = run_one(framework, arch, steps=steps, d=d)
        results.append(r)
        print(f"\n### {r.name} ({time.perf_counter() - t0:.1f} s)\n")
        print(litert.format_op_table(r.ops))
        print(f"\nint8 .tflite {len(r.tflite)} B vs float {r.float_size} B ({r.float_size / len(r.tflite):.2f}x smaller); "
              f"accuracy QAT (JAX) {r.acc_qat:.2f}% vs interpreter {r.acc_tflite:.2f}%; "
              f"max |tflite - JAX conversion model| {r.max_lsb:.3f} LSB")
    return results


if __name__ == '__main__':
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 150)
