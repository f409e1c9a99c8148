"""The Flax section of ``python -m qarray``: PTQ of small Linen models in one call each.

Example:
  >>> from flax_integration import _tour
  >>> [name for name, _ in _tour._SCHEMES][:2]   # each row: one Linen model quantized in one call (flax_rows)
  ['w8a8 dynamic', 'w8a8 static']
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import linen as nn

from flax_integration._calibrate import calibrate
from flax_integration._model import quantize_model
from flax_integration.providers.ptq import PtqProvider
from flax_integration._quantize_params import quantize_params
from flax_integration.rules import QuantizationRule
from flax_integration.wrappers import QuantizedParam

__all__ = ['flax_rows', 'flax_section']


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16, use_bias=False)(nn.relu(nn.Dense(64, use_bias=False)(x)))


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


_SCHEMES = [
    ('w8a8 dynamic', [QuantizationRule(weight_qtype='int8', act_qtype='int8')]),
    ('w8a8 static', [QuantizationRule(weight_qtype='int8', act_qtype='int8', act_static_scale=True)]),
    ('int4 t16 weight-only', [QuantizationRule(weight_qtype='int4', tile_size=16)]),
    ('nf4 weight-only', [QuantizationRule(weight_qtype='nf4')]),
]


def _nbytes(tree) -> int:
    leaves = jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, QuantizedParam))
    return sum(v.array.nbytes if isinstance(v, QuantizedParam) else v.nbytes for v in leaves)


def flax_rows(seed: int = 0) -> list[dict]:
    """Quantize an MLP and a CNN under each scheme; one dict per row.

    Example:
      >>> from flax_integration._tour import flax_rows
      >>> [r['scheme'] for r in flax_rows()][:2]
      ['w8a8 dynamic', 'w8a8 static']
    """
    k = jax.random.key(seed)
    models = [('MLP 16-64-16', _MLP(), jax.random.uniform(k, (8, 16))),
              ('CNN conv3x3-16 + dense', _CNN(), jax.random.normal(k, (4, 8, 8, 3)))]
    rows = []
    for model_index, (name, model, x) in enumerate(models):
        fp = jax.jit(model.init)(k, x)["params"]
        ref = model.apply({'params': fp}, x)
        for scheme, rules in (_SCHEMES if model_index == 0 else _SCHEMES[1:2]):
            ptq = quantize_model(model, PtqProvider(rules))
            abstract = jax.eval_shape(ptq.init, k, x)['params']
            stats = calibrate(model, fp, [x], rules=rules, progress=False) if rules[0].act_static_scale else None
            # One compiled program each (many tiny eager ops would each compile separately).
            params = jax.jit(lambda f, s: quantize_params(f, abstract, s))(fp, stats)
            out = jax.jit(ptq.apply)({'params': params}, x)
            rows.append(dict(model=name, scheme=scheme, fp_bytes=_nbytes(fp), q_bytes=_nbytes(params),
                             max_err=float(jnp.max(jnp.abs(out - ref))),
                             ref_max=float(jnp.max(jnp.abs(ref)))))
    return rows


def flax_section(print_table=None) -> None:
    """Print the Flax PTQ table (model, scheme, param bytes, max |out - float out|).

    Example:
      >>> flax_section()  # doctest: +SKIP
      Flax PTQ: quantize_model(model, PtqProvider(rules)) + quantize_params, unchanged model code
      ...
    """
    if print_table is None:
        from qarray._tour import print_table
    print("Flax PTQ: quantize_model(model, PtqProvider(rules)) + quantize_params, unchanged model code")
    rows = flax_rows()
    print_table(rows, [('model', 'model', ''), ('scheme', 'scheme', ''), ('fp_bytes', 'float param B', 'd'),
                       ('q_bytes', 'quantized B', 'd'), ('max_err', 'max |out - float out|', '.4f'),
                       ('ref_max', 'max |float out|', '.3f')])
