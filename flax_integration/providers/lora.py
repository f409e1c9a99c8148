"""LoRA and QLoRA: low-rank adapters on the matched ops; a frozen (optionally quantized) base.

:class:`LoraRule` is a :class:`~flax_integration.rules.QuantizationRule` with
``rank``, ``alpha`` and ``dropout``. For every ``dot_general`` / ``einsum`` /
``conv_general_dilated`` whose module path it matches, and that has a weight
operand ``W``, :class:`LoraProvider` adds two params next to ``W``:

* ``<W>_lora_a``: shape ``(*contracting sizes of W, rank)`` -- "A (in x
  rank)"; random (variance ``1 / fan_in``);
* ``<W>_lora_b``: shape ``(rank, *output sizes of W)`` -- "B (rank x
  out)"; zeros, so an untrained adapter changes nothing;

and computes ``op(x, W) + op(dropout(x), A B) * alpha / rank``. For
``dot_general`` and ``einsum`` the adapter term is evaluated factored, ``(x
A) B`` (never the full ``in x out`` matrix); for convolutions (small kernels)
and weights with batch axes the low-rank kernel ``A B`` is formed and run
through the same op.

**QLoRA**: when the rule also sets ``weight_qtype`` (e.g. ``'nf4'`` with
``tile_size=64``, or ``'int4'``) the provider is a
:class:`~flax_integration.providers.ptq.PtqProvider` for the base: ``W`` is
stored as a packed :class:`~flax_integration.wrappers.QuantizedParam` and
computed through ``qarray.ops``; it is never a float array in the params.
Rules that are plain ``QuantizationRule`` act exactly as in PTQ.

**Training only the adapters.** The adapters are ``nnx.LoRAParam`` variables
(NNX) or params named ``*_lora_a`` / ``*_lora_b`` (Linen):

* NNX: ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and
  ``nnx.value_and_grad(..., argnums=nnx.DiffState(0, nnx.LoRAParam))``;
* Linen: split the params with :func:`flax_integration._lora_export.lora_trainable`
  (``examples/digits/train.py``'s ``train_linen(..., trainable=lora_trainable)``
  does it), differentiate and optimise the adapter half only, so frozen
  leaves never enter the optimizer state (``optax.multi_transform`` with
  ``optax.set_to_zero()`` for the frozen label works too, but it still
  computes their gradients: integer codes have none, so split instead).

Adapters go on dense ops only (:meth:`LoraProvider.adapts`): a ``ragged_dot`` (experts), a lookup
(``jnp.take``, ``nn.Embed``) or a tied output head (``Embed.attend``) that a ``LoraRule`` matches gets no
adapter; its base weight is handled as in PTQ (quantized with ``weight_qtype``, float without).

Dropout (``dropout > 0``) is applied to the adapter's input only. Linen: when
an rng named ``'dropout'`` is passed to ``apply`` (none: no dropout). NNX: an
``nnx.Dropout`` submodule ``<W>_lora_dropout``; ``model.eval()`` turns it off.

Export: :func:`flax_integration._lora_export.merge_lora` folds ``A B alpha / rank``
into the (dequantized) base weights.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import linen as nn
  >>> from flax_integration import LoraProvider, LoraRule, quantize_model
  >>> rules = [LoraRule(module_path='.*', rank=2, alpha=4.0, weight_qtype='nf4', tile_size=8)]
  >>> m = quantize_model(nn.Dense(4), LoraProvider(rules))
  >>> p = m.init(jax.random.key(0), jnp.ones((1, 16)))['params']
  >>> p['kernel_lora_a'].shape, p['kernel_lora_b'].shape, p['kernel'].array.qtype.name
  ((16, 2), (2, 4), 'nf4')
"""

from __future__ import annotations

import dataclasses
import math
import string
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from flax_integration._op_table import call_kind
from flax_integration.providers.base import Op
from flax_integration.providers.ptq import PtqProvider
from flax_integration.rules import QuantizationRule
from flax_integration.wrappers import as_operand

__all__ = ['LoraRule', 'LoraProvider', 'LORA_SUFFIXES', 'adapter_names', 'weight_name', 'low_rank_kernel']

LORA_SUFFIXES = ('_lora_a', '_lora_b')


@dataclasses.dataclass(frozen=True)
class LoraRule(QuantizationRule):
    """A rule that adds LoRA adapters (and, with ``weight_qtype``, quantizes the frozen base).

    Attributes:
      rank: adapter rank (positive int).
      alpha: scaling numerator; the adapter output is multiplied by ``alpha / rank``
        (default: ``rank``, i.e. a scale of 1).
      dropout: dropout rate on the adapter input, in ``[0, 1)``.

    Example:
      >>> from flax_integration import LoraRule
      >>> r = LoraRule(module_path='Dense_.*', rank=4, alpha=8.0)
      >>> r.scaling
      2.0
    """

    rank: int = 0
    alpha: float | None = None
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"rank must be a positive int (e.g. LoraRule(rank=4)); got {self.rank!r}.")
        alpha = float(self.rank) if self.alpha is None else self.alpha
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number or None (= rank); got {self.alpha!r}.")
        object.__setattr__(self, 'alpha', float(alpha))
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1); got {self.dropout!r}.")

    @property
    def scaling(self) -> float:
        """``alpha / rank``.

        Example:
          >>> from flax_integration import LoraRule
          >>> LoraRule(rank=8, alpha=16.0).scaling, LoraRule(rank=8).scaling  # alpha defaults to rank
          (2.0, 1.0)
        """
        return self.alpha / self.rank


def adapter_names(weight_name: str) -> tuple[str, str]:
    """Param names of the adapters of weight ``weight_name``.

    Example:
      >>> from flax_integration.providers.lora import adapter_names
      >>> adapter_names('kernel')
      ('kernel_lora_a', 'kernel_lora_b')
    """
    return weight_name + LORA_SUFFIXES[0], weight_name + LORA_SUFFIXES[1]


class LoraProvider(PtqProvider):
    """(Q)LoRA provider; see the module docstring.

    Args:
      rules: a list of :class:`LoraRule` (plain :class:`QuantizationRule` items act as PTQ).
        Or leave it out and pass one rule's fields: ``LoraProvider(module_path='.*', rank=4)``.
      seed: seeds the NNX adapter initialisation and dropout (Linen uses the ``'params'``
        and ``'dropout'`` rngs given to ``init``/``apply``).

    Example:
      >>> from flax_integration import LoraProvider
      >>> LoraProvider(module_path='.*', rank=4, alpha=4.0).rules.rules[0].scaling
      1.0
    """

    supports_weight_transforms = False  # GPTQ/rotations with adapters are not implemented or tested

    def __init__(self, rules: Sequence[QuantizationRule] | None = None, *, seed: int = 0, **rule_fields: Any):
        if rules is None:
            rules = [LoraRule(**rule_fields)]
        elif rule_fields:
            raise ValueError(f"pass either rules or one rule's fields, not both; got rules and "
                             f"{sorted(rule_fields)}.")
        super().__init__(rules)
        self.seed = int(seed)

    def process_op(self, op: Op) -> jax.Array:
        """The PTQ result of the op plus, for a :class:`LoraRule` op with a weight, the adapter term
        (:meth:`lora_delta`).

        Example (B starts at zero, so an untrained adapter changes nothing):
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> from flax_integration import LoraProvider, quantize_model
          >>> m = quantize_model(nn.Dense(3), LoraProvider(module_path='.*', rank=2))
          >>> x = jnp.ones((2, 4))
          >>> v = m.init(jax.random.key(0), x)
          >>> bool(jnp.allclose(m.apply(v, x), nn.Dense(3).apply(v, x)))
          True
        """
        out = super().process_op(op)
        if not self.adapts(op):
            return out
        return out + self.lora_delta(op).astype(out.dtype)

    @staticmethod
    def adapts(op: Op) -> bool:
        """Whether ``op`` gets an adapter: a :class:`LoraRule` matched it and it is a dense op with a weight of
        its own (not a ``ragged_dot``, a lookup, or a tied output head, whose table the lookup shares).

        Example:
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax_integration import LoraProvider, LoraRule
          >>> from flax_integration._op_table import dot_general_call, take_call
          >>> from flax_integration.providers import Op, Weight
          >>> w = jnp.ones((4, 2))
          >>> dense = dot_general_call(qarray.dot_general, jax.lax.dot_general, jnp.ones((1, 4)), w,
          ...                          (((1,), (0,)), ((), ())))
          >>> lookup = take_call(qarray.ops.take, jnp.take, w, jnp.array([1]), axis=0)
          >>> rule = LoraRule(module_path='.*', rank=2)
          >>> [LoraProvider.adapts(Op(c, None, rule, Weight(i, 'w', w), 'x0')) for c, i in ((dense, 1), (lookup, 0))]
          [True, False]
        """
        return (isinstance(op.rule, LoraRule) and op.weight is not None and call_kind(op.call) == 'dense'
                and op.weight.perm is None)

    # --- the adapter term ------------------------------------------------------------------
    def lora_delta(self, op: Op) -> jax.Array:
        """``op(dropout(x), A B) * alpha / rank`` for the op's weight.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> from flax_integration import LoraProvider, quantize_model
          >>> m = quantize_model(nn.Dense(3, use_bias=False), LoraProvider(module_path='.*', rank=2, alpha=4.0))
          >>> x = jnp.ones((1, 4))
          >>> p = m.init(jax.random.key(0), x)['params']
          >>> p = {**p, 'kernel_lora_b': jnp.ones((2, 3))}  # as if trained
          >>> delta = m.apply({'params': p}, x) - x @ p['kernel']
          >>> bool(jnp.allclose(delta, x @ p['kernel_lora_a'] @ p['kernel_lora_b'] * 4.0 / 2, atol=1e-5))
          True
        """
        rule, wi = op.rule, op.weight.index
        x = as_operand(op.call.operands[1 - wi])
        shape = tuple(op.weight.value.shape)
        kept, contract = op.call.kept[wi], op.call.contract[wi]
        if not kept:
            raise ValueError(f"{op.describe()}: LoRA needs a weight with at least one output axis; weight "
                             f"{op.weight.name!r} of shape {shape} is fully contracted. Narrow the rule's "
                             "module_path or op_names.")
        a, b = self.adapters(op, shape, kept, contract, x.dtype)
        x = self._dropout(op, x)
        run = (lambda xx, w: op.call.run(xx, w)) if wi == 1 else (lambda xx, w: op.call.run(w, xx))
        if op.call.per_channel_only or self._has_batch_axes(op, x, shape, run):
            delta = run(x, low_rank_kernel(a, b, shape, kept, contract).astype(x.dtype))
        else:
            delta = self._factored(x, a, b, shape, kept, contract, run)
        return delta * rule.scaling

    @staticmethod
    def _has_batch_axes(op, x, shape, run) -> bool:
        """Whether an output axis of the weight is shared with ``x`` (a dot_general batch axis)."""
        w = jax.ShapeDtypeStruct(shape, x.dtype)
        out = jax.eval_shape(lambda xx, ww: run(xx, ww), jax.ShapeDtypeStruct(x.shape, x.dtype), w)
        return len(op.call.kept[0]) + len(op.call.kept[1]) > len(out.shape)

    @staticmethod
    def _factored(x, a, b, shape, kept, contract, run) -> jax.Array:
        """``(x A) B`` through the op itself: A is laid out as a weight whose output axes are (rank, 1, ...)."""
        rank = a.shape[-1]
        # A in the weight's axis order: contracting axes in place, rank on the first output axis, 1 on the others.
        order = [contract.index(j) if j in contract else len(contract) for j in range(len(shape))
                 if j in contract or j == kept[0]]
        probe = tuple(rank if j == kept[0] else (1 if j in kept else n) for j, n in enumerate(shape))
        a_w = jnp.transpose(a, order).reshape(probe).astype(x.dtype)
        # Where each output axis of the weight lands in the op's output (einsum may permute them).
        marks = {k: 1_000_003 + 2 * n for n, k in enumerate(kept)}
        mshape = tuple(marks.get(j, n) for j, n in enumerate(shape))
        out_shape = jax.eval_shape(lambda xx, ww: run(xx, ww), jax.ShapeDtypeStruct(x.shape, x.dtype),
                                   jax.ShapeDtypeStruct(mshape, x.dtype)).shape
        pos = {k: out_shape.index(m) for k, m in marks.items()}
        t = run(x, a_w)
        t = jnp.squeeze(t, axis=tuple(pos[k] for k in kept[1:]))
        letters = string.ascii_letters[:len(out_shape)]
        r = 'Z' if 'Z' not in letters else '0'
        t_sub = ''.join(r if j == pos[kept[0]] else c for j, c in enumerate(letters)
                        if j not in {pos[k] for k in kept[1:]})
        b_sub = r + ''.join(letters[pos[k]] for k in kept)
        return jnp.einsum(f'{t_sub},{b_sub}->{letters}', t, b.astype(t.dtype))

    # --- adapter storage -------------------------------------------------------------------
    def adapters(self, op: Op, shape, kept, contract, dtype) -> tuple[jax.Array, jax.Array]:
        """Get (or, at init, create) ``A`` and ``B`` for the op's weight.

        ``A`` spans the weight's contracting axes, ``B`` its output axes:

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> from flax_integration import LoraProvider, quantize_model
          >>> m = quantize_model(nn.Conv(8, (3, 3)), LoraProvider(module_path='.*', rank=2))
          >>> p = m.init(jax.random.key(0), jnp.ones((1, 6, 6, 4)))['params']
          >>> p['kernel'].shape, p['kernel_lora_a'].shape, p['kernel_lora_b'].shape
          ((3, 3, 4, 8), (3, 3, 4, 2), (2, 8))
        """
        rank = op.rule.rank
        a_shape = tuple(shape[j] for j in contract) + (rank,)
        b_shape = (rank,) + tuple(shape[j] for j in kept)
        name_a, name_b = adapter_names(weight_name(op))
        pdtype = op.weight.value.dtype if jnp.issubdtype(op.weight.value.dtype, jnp.floating) else jnp.float32
        fan_in = max(1, math.prod(a_shape[:-1]))
        init_a = lambda key, s: jax.random.normal(key, s, pdtype) / math.sqrt(fan_in)
        init_b = lambda key, s: jnp.zeros(s, pdtype)
        a = op.frame.adapter_param(name_a, init_a, a_shape, self._key(op, name_a))
        b = op.frame.adapter_param(name_b, init_b, b_shape, self._key(op, name_b))
        for name, v, s in ((name_a, a, a_shape), (name_b, b, b_shape)):
            if tuple(v.shape) != s:
                raise ValueError(f"{op.describe()}: adapter {name!r} has shape {tuple(v.shape)} but rank "
                                 f"{rank} on weight of shape {tuple(shape)} needs {s}.")
        return a, b

    def _key(self, op: Op, name: str) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.seed), zlib.crc32(f'{op.path}/{name}'.encode()))

    def _dropout(self, op: Op, x: jax.Array) -> jax.Array:
        name = weight_name(op) + '_lora_dropout'
        return op.frame.dropout(x, op.rule.dropout, name, self._key(op, name))


def weight_name(op: Op) -> str:
    """The param name of the op's weight (adapters are named after it).

    The interception layer names every stored param, float or quantized; a
    quantized operand that is not a stored param (e.g. a weight reshaped in
    user code) has no name, and its adapters are named after the op instead.

    Example:
      >>> from flax_integration.providers import Op, Weight
      >>> from flax_integration.providers.lora import weight_name
      >>> weight_name(Op(None, None, None, Weight(1, 'kernel', None), 'dot_general0'))
      'kernel'
    """
    return op.weight.name if op.weight.name is not None else op.op_id


def low_rank_kernel(a: jax.Array, b: jax.Array, shape: Sequence[int], kept: Sequence[int],
                    contract: Sequence[int]) -> jax.Array:
    """``A B`` laid out like the weight of shape ``shape`` (``kept``/``contract``: its axes).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax_integration.providers.lora import low_rank_kernel
      >>> a, b = jnp.ones((3, 2)), jnp.ones((2, 4))  # A: (in, rank), B: (rank, out)
      >>> low_rank_kernel(a, b, (3, 4), (1,), (0,)).shape  # an (in, out) weight
      (3, 4)
      >>> low_rank_kernel(a, b, (4, 3), (0,), (1,)).shape  # an (out, in) weight
      (4, 3)
    """
    nat = jnp.tensordot(a, b, axes=1)  # axes: contract..., kept...
    order = list(contract) + list(kept)
    inverse = [order.index(j) for j in range(len(shape))]
    return jnp.transpose(nat, inverse).reshape(tuple(shape))
