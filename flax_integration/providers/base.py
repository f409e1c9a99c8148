"""The provider interface: what happens to one intercepted op. See ``providers/__init__``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import linen as nn
  >>> from flax_integration import QuantizationRule, quantize_model
  >>> from flax_integration.providers import Provider
  >>> class Float(Provider):  # runs every op in float, as the model would
  ...     def process_op(self, op):
  ...         return op.call.run_original()
  >>> m = quantize_model(nn.Dense(2), Float([QuantizationRule(weight_qtype='int8')]))
  >>> m.init(jax.random.key(0), jnp.ones((1, 3)))['params']['kernel'].dtype
  dtype('float32')
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import Any, ContextManager, Sequence

import jax
import jax.numpy as jnp

from qarray import _layout, _numerics, _quantize, qtypes
from qarray import calibration as _calibration
from qarray import rotation as rotation_lib
from qarray._array import QArray

from flax_integration import _kv_cache
from flax_integration._frame import Frame
from flax_integration._interception import ExtraOp, Intercept
from flax_integration._op_calls import OpCall
from flax_integration._op_table import call_kind
from flax_integration.rules import QuantizationRule, RuleSet, UnusedRuleWarning
from flax_integration.wrappers import QuantizedParam, unbox_leaves

__all__ = ['Provider', 'Op', 'Weight', 'Frame', 'FloatParamError', 'find_weight', 'tied_head', 'act_range',
           'range_to_scale', 'is_symmetric', 'hessian_name', 'quantizes_activations', 'static_act_range',
           'static_scale_rows']


class FloatParamError(ValueError):
    """A quantized model was given float weights where it expects quantized ones.

    Example:
      >>> from flax_integration import FloatParamError
      >>> issubclass(FloatParamError, ValueError)
      True
    """


@dataclasses.dataclass
class Weight:
    """The weight operand of an op: its index, its param name, and what was passed.

    ``value`` is a QuantizedParam or QArray (already quantized) or a float array
    that is (or was cast from) the module's param ``name``. ``perm`` is None, or the
    transposition that makes the operand from the stored param (``value = transpose(param, perm)``):
    a tied output head, ``Embed.attend``'s ``jnp.dot(query, embedding.T)``, computes with the
    lookup table transposed (:func:`find_weight`).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax_integration.providers import Weight
      >>> w = Weight(1, 'kernel', jnp.ones((8, 4)))
      >>> w.index, w.name, w.quantized, w.perm
      (1, 'kernel', False, None)
    """

    index: int
    name: str | None  # None only for a quantized operand that is not a stored param (e.g. reshaped in user code)
    value: Any
    perm: tuple[int, ...] | None = None

    @property
    def quantized(self) -> bool:
        """Whether ``value`` is already quantized (a ``QuantizedParam`` or a QArray).

        Example:
          >>> import jax.numpy as jnp, qarray
          >>> from flax_integration.providers import Weight
          >>> Weight(1, 'kernel', qarray.quantize(jnp.ones((8, 4)), 'int8')).quantized
          True
        """
        return isinstance(self.value, (QuantizedParam, QArray))


def find_weight(call: OpCall, frame: Frame | None) -> Weight | None:
    """The operand that is a param of the running module (rhs preferred; for a table lookup only the
    table, ``call.weight_candidates``), or None.

    Decided from the module's params, never from shapes: an operand is the
    weight when it is a quantized value (a stored ``QuantizedParam`` or QArray,
    named if it is one of the module's), or when it *is* one of the module's
    float params -- the same object, or a recorded alias such as its dtype cast
    (:meth:`Frame.param_name`). A weight reshaped or cast by other means in
    user code is not recognised; it is then treated as an activation. One
    transposition is recognised: Flax's tied output head (:func:`tied_head`).

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> from flax_integration._op_table import dot_general_call
      >>> from flax_integration.providers.base import find_weight
      >>> q = qarray.quantize(jnp.ones((4, 2)), 'int8')
      >>> call = dot_general_call(qarray.dot_general, jax.lax.dot_general, jnp.ones((1, 4)), q,
      ...                         (((1,), (0,)), ((), ())))
      >>> find_weight(call, None).index
      1
    """
    head = tied_head(call, frame)
    if head is not None:
        return head
    for i in getattr(call, 'weight_candidates', (1, 0)):
        x = call.operands[i]
        name = frame.param_name(x) if frame is not None else None
        if isinstance(x, (QuantizedParam, QArray)) or name is not None:
            return Weight(i, name, x)
    return None


def _embed_classes() -> tuple[type, ...]:
    from flax import linen as nn, nnx  # noqa: PLC0415 (Flax is imported by the frames anyway)
    return nn.Embed, nnx.Embed


def tied_head(call: OpCall, frame: Frame | None) -> Weight | None:
    """The table of a tied output head, or None.

    Flax's ``Embed.attend`` (Linen and NNX) computes ``jnp.dot(query, embedding.T)``: its
    right operand is a new array (the transpose), so identity does not name it. In an
    ``Embed`` module, a dense op whose right operand is a float ``[features, num_embeddings]``
    array contracted along its first axis is that transpose (``attend`` is the module's only
    matmul): it is the weight ``'embedding'`` with ``perm=(1, 0)``, quantized like the
    lookup's table (one scale per token id, tiles along the features), so one stored table
    serves both. A stored quantized table arrives transposed (``QuantizedParam.T``), already
    in the operand's layout; it is named and marked the same way, so every run of the model
    sees the same weights.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from flax_integration import quantize_model
      >>> from flax_integration.providers import Provider
      >>> from flax_integration.providers.base import tied_head
      >>> class Spy(Provider):
      ...     seen = []
      ...     def process_op(self, op):
      ...         self.seen.append((op.call.name, op.weight.name, op.weight.perm))
      ...         return op.call.run_original()
      >>> class Head(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, ids):
      ...         emb = nn.Embed(10, 4)
      ...         return emb.attend(emb(ids))
      >>> _ = quantize_model(Head(), Spy([])).init(jax.random.key(0), jnp.array([1, 2]))
      >>> Spy.seen
      [('take', 'embedding', None), ('dot_general', 'embedding', (1, 0))]
    """
    if frame is None or call_kind(call) != 'dense' or not isinstance(getattr(frame, 'module', None),
                                                                     _embed_classes()):
        return None
    table = frame.params().get('embedding')
    rhs = call.operands[1]
    if table is None or len(getattr(table, 'shape', ())) != 2 or len(getattr(rhs, 'shape', ())) != 2:
        return None
    if tuple(rhs.shape) != tuple(table.shape)[::-1] or tuple(call.contract[1]) != (0,):
        return None
    return Weight(1, 'embedding', rhs, perm=(1, 0))


@dataclasses.dataclass
class Op:
    """Everything a provider needs to decide about one op call.

    Attributes:
      call: the canonical op (operands, axes, ``run``/``run_original``).
      frame: the running module (path, storage); None outside any module.
      rule: the first rule matching ``frame.path`` and ``call.name`` (or None).
      weight: the operand that is a param of the module (or None: both are activations).
      op_id: ``'dot_general0'``... -- names this op's variables (``<op_id>_lhs`` ...).

    Example (a provider that keeps the ops it sees):
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from flax_integration import QuantizationRule, quantize_model
      >>> from flax_integration.providers import Provider
      >>> class Spy(Provider):
      ...     ops = []
      ...     def process_op(self, op):
      ...         self.ops.append(op)
      ...         return op.call.run_original()
      >>> m = quantize_model(nn.Sequential([nn.Dense(4), nn.Dense(2)]), Spy([QuantizationRule(weight_qtype='int8')]))
      >>> _ = m.init(jax.random.key(0), jnp.ones((1, 8)))
      >>> [(op.path, op.op_id, op.weight.name, op.rule.weight_qtype) for op in Spy.ops]
      [('layers_0', 'dot_general0', 'kernel', 'int8'), ('layers_1', 'dot_general0', 'kernel', 'int8')]
    """

    call: OpCall
    frame: Frame | None
    rule: QuantizationRule | None
    weight: Weight | None
    op_id: str

    @property
    def path(self) -> str:
        """The running module's path (``''`` for the root module, and without a frame).

        Example:
          >>> from flax_integration.providers import Op
          >>> Op(None, None, None, None, 'dot_general0').path
          ''
        """
        return self.frame.path if self.frame is not None else ''

    def act_indices(self) -> list[int]:
        """Operand indices that are activations.

        Example:
          >>> from flax_integration.providers import Op, Weight
          >>> Op(None, None, None, Weight(1, 'kernel', None), 'dot_general0').act_indices()
          [0]
          >>> Op(None, None, None, None, 'einsum0').act_indices()  # no weight: attention's q x k
          [0, 1]
        """
        return [i for i in (0, 1) if self.weight is None or i != self.weight.index]

    def act_name(self, i: int) -> str:
        """Variable name of activation operand ``i`` (``'dot_general0_lhs'``).

        Example:
          >>> from flax_integration.providers import Op
          >>> op = Op(None, None, None, None, 'einsum1')
          >>> op.act_name(0), op.act_name(1)
          ('einsum1_lhs', 'einsum1_rhs')
        """
        return f"{self.op_id}_{'lhs' if i == 0 else 'rhs'}"

    @property
    def tile_size(self) -> int | None:
        """The rule's tile size for this op: only ops with a weight are tiled (an activation x
        activation einsum, e.g. attention, may contract over the sequence axis).

        Example:
          >>> from flax_integration import QuantizationRule
          >>> from flax_integration.providers import Op, Weight
          >>> rule = QuantizationRule(weight_qtype='int4', act_qtype='int8', tile_size=32)
          >>> Op(None, None, rule, Weight(1, 'kernel', None), 'dot_general0').tile_size
          32
          >>> Op(None, None, rule, None, 'einsum0').tile_size is None
          True
        """
        return self.rule.tile_size if self.rule is not None and self.weight is not None else None

    def describe(self) -> str:
        """Where the op is, for error messages.

        Example:
          >>> from flax_integration.providers import Op
          >>> Op(None, None, None, None, 'einsum1').describe()
          "module '<root>', op einsum1"
        """
        return f"module {self.path or '<root>'!r}, op {self.op_id}"


class Provider:
    """Base class: holds the rules and turns an intercepted call into an :class:`Op`.

    Subclasses implement :meth:`process_op`. Three optional hooks see a whole
    run of the quantized model (the outermost call of ``__call__`` or another
    quantized method, Linen and NNX alike, ``init`` included), in this order:

    * :meth:`model_run` -- a context manager entered before the model starts
      and left after its output is processed (also on an exception): set up
      and tear down per-run state here, e.g. install patches for this run only;
    * :meth:`process_model_inputs` -- at model entry, inside the interception
      scope with the model's own frame pushed (see
      :func:`~flax_integration._interception.root_frame`): may return new inputs;
    * :meth:`process_model_output` -- on the model's return value.

    Example:
      >>> from flax_integration import QuantizationRule
      >>> from flax_integration.providers import Provider
      >>> p = Provider([QuantizationRule(module_path='enc.*', weight_qtype='int8')])
      >>> [r.module_path for r in p.unused_rules()]
      ['enc.*']
    """

    # Whether rules with weight_algorithm='gptq' or a rotation are understood (PTQ and its calibration).
    supports_weight_transforms: bool = False

    def __init__(self, rules: Sequence[QuantizationRule]):
        self.rules = RuleSet(rules)

    # --- called by the interception layer -------------------------------------------------
    def handle(self, call: OpCall, frame: Any) -> jax.Array:
        """Entry point for one intercepted call (do not override; see :meth:`process_op`).

        Outside any module (``frame`` None) the op runs unchanged.

        Example:
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax_integration._op_table import dot_general_call
          >>> from flax_integration.providers import Provider
          >>> call = dot_general_call(qarray.dot_general, jax.lax.dot_general, jnp.ones((1, 3)), jnp.ones((3, 2)),
          ...                         (((1,), (0,)), ((), ())))
          >>> Provider([]).handle(call, None).tolist()
          [[3.0, 3.0]]
        """
        if frame is None:
            return call.run_original()
        _kv_cache.prepare_cache(self, frame)
        op_id = frame.next_op_id(call.name)
        rule = self.rules.match(frame.path, call.name)
        if rule is not None and rule.transforms_weights and not self.supports_weight_transforms:
            raise ValueError(
                f"{type(self).__name__}: the rule module_path={rule.module_path!r} sets "
                f"weight_algorithm={rule.weight_algorithm!r}, rotation={rule.rotation!r}; only PtqProvider and "
                "CalibrationProvider support those. Use weight_algorithm='rtn', rotation=None here.")
        op = Op(call, frame, rule, find_weight(call, frame), op_id)
        try:
            return self.process_op(op)
        except (ValueError, TypeError) as e:
            if not any(op.describe() in n for n in getattr(e, '__notes__', ())):  # say where, once
                e.add_note(f"While {type(self).__name__} ran {op.describe()}.")
            raise

    def process_op(self, op: Op) -> jax.Array:
        """Compute ``op``; the one method a provider must implement.

        Example (run every weight rounded to int8, activations in float):
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax import linen as nn
          >>> from flax_integration import quantize_model
          >>> from flax_integration.providers import Provider
          >>> class RoundWeights(Provider):
          ...     def process_op(self, op):
          ...         if op.weight is None:
          ...             return op.call.run_original()
          ...         operands = list(op.call.operands)
          ...         operands[op.weight.index] = qarray.quantize(operands[op.weight.index], 'int8')
          ...         return op.call.run(*operands)
          >>> m = quantize_model(nn.Dense(2), RoundWeights([]))
          >>> v = m.init(jax.random.key(0), jnp.ones((1, 3)))
          >>> m.apply(v, jnp.ones((1, 3))).shape
          (1, 2)
        """
        raise NotImplementedError

    def intercepts(self) -> Sequence[Intercept]:
        """Functions besides the op table's that this provider wants to see while its model runs
        (none by default). The interception engine installs them and routes their calls to
        :meth:`process_extra_op` (see ODML's activations and residual adds).

        Example:
          >>> from flax_integration import Provider
          >>> Provider([]).intercepts()
          ()
        """
        return (_kv_cache.INTERCEPT,) if _kv_cache.wants_kv_cache(self.rules) else ()

    def process_extra_op(self, op: ExtraOp) -> Any:
        """Compute one call of a function from :meth:`intercepts` (``op.original`` is the JAX function).

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from flax_integration.providers import ExtraOp, Provider
          >>> op = ExtraOp('relu', jax.nn.relu, (jnp.array([-1.0, 2.0]),), {}, None)
          >>> Provider([]).process_extra_op(op).tolist()
          [0.0, 2.0]
        """
        if op.name == _kv_cache.INTERCEPT.name:
            return _kv_cache.process_cache_write(self, op)
        return op.original(*op.args, **op.kwargs)

    def model_run(self) -> ContextManager[None]:
        """Context around one run of the quantized model (a no-op by default).

        Example:
          >>> from flax_integration.providers import Provider
          >>> with Provider([]).model_run():
          ...     pass
        """
        return contextlib.nullcontext()

    def process_model_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Hook on the quantized model's inputs at entry; returns ``(args, kwargs)`` to run with (unchanged
        by default).

        Example:
          >>> from flax_integration.providers import Provider
          >>> Provider([]).process_model_inputs((1,), {'train': True})
          ((1,), {'train': True})
        """
        return args, kwargs

    def after_model_run(self) -> None:
        """Called after each complete run of the quantized model: after the first, warns
        (:class:`~flax_integration.rules.UnusedRuleWarning`) about rules that matched no op, listing the
        module paths that ran, nearest first (rules with ``warn_if_unused=False`` are exempt).

        Example:
          >>> import warnings, jax, jax.numpy as jnp
          >>> from flax import linen as nn
          >>> import flax_integration as fi
          >>> rules = [fi.QuantizationRule(module_path='Encoder.*', weight_qtype='int8')]
          >>> with warnings.catch_warnings(record=True) as caught:
          ...     warnings.simplefilter('always')
          ...     _ = fi.quantize_model(nn.Dense(2), fi.PtqProvider(rules)).init(jax.random.key(0), jnp.ones((1, 3)))
          >>> 'Encoder.*' in str(caught[0].message)
          True
        """
        self.rules.warn_unused(f"{type(self).__name__} (after the model's first run)", stacklevel=4)

    def process_model_output(self, output: Any) -> Any:
        """Hook on the quantized model's output (identity by default).

        Example:
          >>> from flax_integration.providers import Provider
          >>> Provider([]).process_model_output({'logits': 1.0})
          {'logits': 1.0}
        """
        return output

    # --- reporting -------------------------------------------------------------------------
    def unused_rules(self) -> list[QuantizationRule]:
        """Rules that have matched no op so far (run the model first).

        Example:
          >>> from flax_integration import QuantizationRule
          >>> from flax_integration.providers import Provider
          >>> Provider([QuantizationRule(module_path='x')]).unused_rules()[0].module_path
          'x'
        """
        return self.rules.unused()

    def report_unused_rules(self) -> list[QuantizationRule]:
        """Warn (``UserWarning``) about rules that matched nothing; returns them.

        Example:
          >>> import warnings
          >>> from flax_integration import QuantizationRule
          >>> from flax_integration.providers import Provider
          >>> with warnings.catch_warnings(record=True) as caught:
          ...     warnings.simplefilter('always')
          ...     unused = Provider([QuantizationRule(module_path='decoder/.*')]).report_unused_rules()
          >>> [r.module_path for r in unused], 'matched no op' in str(caught[0].message)
          (['decoder/.*'], True)
        """
        unused = self.unused_rules()
        if unused:
            paths = ', '.join(repr(r.module_path) for r in unused)
            warnings.warn(f"{type(self).__name__}: these rules matched no op: {paths}. Check the regexes "
                          f"against the module paths that ran: {', '.join(map(repr, self.rules.seen)) or '(none yet)'}.",
                          UnusedRuleWarning, stacklevel=2)
        return unused

    # --- helpers shared by providers ------------------------------------------------------
    @staticmethod
    def weight_layout(op: Op) -> tuple[tuple[int, ...], dict[int, int] | None]:
        """``(channelwise_axes, tiles)`` of ``op``'s weight: per output channel, tiles on the contraction.

        Example:
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax_integration import QuantizationRule
          >>> from flax_integration._op_table import dot_general_call
          >>> from flax_integration.providers import Op, Provider, Weight
          >>> call = dot_general_call(qarray.dot_general, jax.lax.dot_general, jnp.ones((2, 16)), jnp.ones((16, 4)),
          ...                         (((1,), (0,)), ((), ())))
          >>> op = Op(call, None, QuantizationRule(weight_qtype='int4', tile_size=8), Weight(1, 'kernel', None), 'd0')
          >>> Provider.weight_layout(op)  # a scale per output column and per 8 rows
          ((1,), {0: 8})
        """
        rule = op.rule
        if rule.weight_tiles is not None:  # block scales in the weight's axes; its other output axes per index
            i = op.weight.index
            tiles = rule.weight_tiles_for(len(op.call.operands[i].shape), op.describe())
            return tuple(a for a in op.call.kept[i] if a not in tiles), tiles
        microscaling = qtypes.get(rule.weight_qtype).microscaling
        if op.call.per_channel_only and rule.tile_size is not None and not microscaling:
            raise ValueError(f"{op.describe()}: tile_size={rule.tile_size} is not supported for "
                             f"{op.call.name} (weights are per output channel); limit the rule with "
                             "op_names=('dot_general', 'einsum') or drop tile_size.")
        return op.call.layout(op.weight.index, 'weight', op.tile_size, qtype=rule.weight_qtype)

    @staticmethod
    def weight_pack_axis(op: Op) -> int:
        """The axis along which ``op``'s sub-byte weight codes are packed: its contraction axis.

        Dense, einsum and conv weights are packed along their (last) contracting
        axis: then the dequantize's innermost loop runs along an output axis
        with one nibble position per byte row (measured on XLA:CPU, int4 t128
        2048 x 2048: dequantize 2.7x and a decode matvec 2x faster than packed
        along the output axis), and it is the layout the GPU kernels read. Table
        lookups, the tied head (its table is shared with the lookup),
        per-expert weights, microscaling formats and contraction axes whose
        codes do not fill whole bytes (they would pad every row) keep the last
        axis.

        Example:
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax_integration import QuantizationRule
          >>> from flax_integration._op_table import dot_general_call
          >>> from flax_integration.providers import Op, Provider, Weight
          >>> call = dot_general_call(qarray.dot_general, jax.lax.dot_general, jnp.ones((2, 8)), jnp.ones((8, 4)),
          ...                         (((1,), (0,)), ((), ())))
          >>> Provider.weight_pack_axis(Op(call, None, QuantizationRule(weight_qtype='int4'),
          ...                                 Weight(1, 'kernel', None), 'dot_general0'))
          0
        """
        qt = qtypes.get(op.rule.weight_qtype)
        wi = op.weight.index
        if (not qt.packed or qt.microscaling or call_kind(op.call) != 'dense' or op.weight.perm is not None
                or not op.call.contract[wi]):
            return -1
        axis = max(op.call.contract[wi])
        # only where the axis fills whole bytes: a short axis (a conv's 1 input channel) would pad every row
        return axis if op.call.operands[wi].shape[axis] * qt.bits % 8 == 0 else -1

    @staticmethod
    def transform_axes(op: Op) -> tuple[int, int]:
        """``(weight axis, activation axis)`` of the one contraction GPTQ and rotations act on.

        Example:
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax_integration._op_table import dot_general_call
          >>> from flax_integration.providers import Op, Provider, Weight
          >>> call = dot_general_call(qarray.dot_general, jax.lax.dot_general, jnp.ones((2, 8)), jnp.ones((8, 4)),
          ...                         (((1,), (0,)), ((), ())))
          >>> Provider.transform_axes(Op(call, None, None, Weight(1, 'kernel', None), 'dot_general0'))
          (0, 1)
        """
        wi = op.weight.index
        wc, ac = op.call.contract[wi], op.call.contract[1 - wi]
        kind = call_kind(op.call)
        if op.weight.perm is not None:
            raise ValueError(
                f"{op.describe()}: weight_algorithm='gptq' and rotation act on dot_general/einsum projections; this "
                f"is a tied output head (Embed.attend), whose table is shared with the lookup, which can be neither "
                "rotated nor rounded against this op's activations. Narrow the rule with module_path or "
                "op_names=('dot_general', 'einsum') on the other modules.")
        if kind != 'dense':
            what = ('a table lookup: no activation is contracted with the table' if kind == 'gather' else
                    'per-expert weights: per-expert statistics and rotations are not implemented')
            raise ValueError(
                f"{op.describe()}: weight_algorithm='gptq' and rotation act on dot_general/einsum projections; this "
                f"{op.call.name} is {what}. Narrow the rule with module_path or op_names=('dot_general', 'einsum').")
        if op.call.per_channel_only or len(wc) != 1:
            raise ValueError(
                f"{op.describe()}: weight_algorithm='gptq' and rotation need a weight with exactly one contracting "
                f"axis (a dot_general/einsum projection); this {op.call.name} contracts weight axes {wc}. Narrow "
                "the rule with module_path or op_names=('dot_general', 'einsum').")
        return wc[0], ac[0]

    @classmethod
    def rotated_weight(cls, op: Op) -> tuple[Any, int] | None:
        """``(rotated QArray, block)`` when the op's weight is stored rotated along the axis this op contracts
        (then the activation must be rotated to match), else None.

        Example:
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax_integration import QuantizedParam
          >>> from flax_integration._op_table import dot_general_call
          >>> from flax_integration.providers import Op, Provider, Weight
          >>> w = QuantizedParam(qarray.quantize(jnp.ones((8, 4)), 'int8'), rotation=(0, 8))
          >>> call = dot_general_call(qarray.dot_general, jax.lax.dot_general, jnp.ones((2, 8)), w,
          ...                         (((1,), (0,)), ((), ())))
          >>> array, block = Provider.rotated_weight(Op(call, None, None, Weight(1, 'kernel', w), 'dot_general0'))
          >>> array.shape, block
          ((8, 4), 8)
        """
        value = op.weight.value
        if not isinstance(value, QuantizedParam) and op.weight.name is not None:
            value = unbox_leaves(op.frame.get_param(op.weight.name))
        if not isinstance(value, QuantizedParam) or value.rotation is None:
            return None
        wc = op.call.contract[op.weight.index]
        if op.call.per_channel_only or tuple(wc) != (value.rotation[0],):
            return None  # used along another axis (e.g. a tied kernel's .T): as_operand unrotates it
        return unbox_leaves(value.array), value.rotation[1]

    def quantize_weight_value(self, op: Op, value: jax.Array) -> QuantizedParam:
        """Quantize a float weight the way ``op.rule`` says (layout from the op), rotated first if the rule
        says so. GPTQ rules are rounded to nearest here (no statistics yet); ``quantize_params`` with
        ``quant_stats`` applies GPTQ. For a weight with ``perm`` (a tied head) ``value`` is the operand and
        the result is the stored param: transposed back, with the op's layout carried along.

        Example:
          >>> import jax, jax.numpy as jnp, qarray
          >>> from flax_integration import QuantizationRule
          >>> from flax_integration._op_table import dot_general_call
          >>> from flax_integration.providers import Op, Provider, Weight
          >>> w = jnp.ones((16, 4))
          >>> call = dot_general_call(qarray.dot_general, jax.lax.dot_general, jnp.ones((2, 16)), w,
          ...                         (((1,), (0,)), ((), ())))
          >>> op = Op(call, None, QuantizationRule(weight_qtype='int4', tile_size=8), Weight(1, 'kernel', w), 'd0')
          >>> q = Provider([]).quantize_weight_value(op, w)
          >>> type(q).__name__, q.array.qtype.name, q.array.scale.shape
          ('QuantizedParam', 'int4', (2, 4))
        """
        rule = op.rule
        cw, tiles = self.weight_layout(op)
        perm = op.weight.perm if op.weight is not None else None
        if perm is not None:  # the stored param's layout: operand axis a is param axis perm[a]
            value = jnp.transpose(value, tuple(perm.index(b) for b in range(len(perm))))
            cw = tuple(sorted(perm[a] for a in cw))
            tiles = None if not tiles else {perm[a]: t for a, t in tiles.items()}
        rotation, gptq = None, None
        try:
            if rule.transforms_weights:
                axis, _ = self.transform_axes(op)
                if rule.weight_algorithm == 'gptq':
                    # act order only as a 4th entry: checkpoints of the 3-entry form still match
                    gptq = (hessian_name(op), axis, rule.gptq_damping) + (('act_order',) if rule.gptq_act_order
                                                                          else ())
                if rule.rotation is not None:
                    rotation = (axis, rotation_lib.block_size(value.shape[axis]))
                    value = rotation_lib.rotate(value, axis, block=rotation[1])
            q = _quantize.quantize(value, rule.weight_qtype, channelwise_axes=cw, tiles=tiles,
                                   calibration=rule.weight_calibration_method, scale_qtype=rule.weight_scale_qtype,
                                   pack_axis=self.weight_pack_axis(op))
        except (ValueError, TypeError) as e:
            e.add_note(f"While quantizing {op.describe()}, weight {op.weight.name!r} of shape {value.shape}.")
            raise
        return QuantizedParam(q, rule.weight_calibration_method, rotation, gptq)


def hessian_name(op: Op) -> str:
    """Name of the GPTQ Hessian statistic of ``op``'s activation operand (``'dot_general0_hessian'``).

    Example:
      >>> from flax_integration.providers import Op
      >>> from flax_integration.providers.base import hessian_name
      >>> hessian_name(Op(None, None, None, None, 'einsum1'))
      'einsum1_hessian'
    """
    return f"{op.op_id}_hessian"


def quantizes_activations(call: OpCall) -> bool:
    """Whether a rule's ``act_qtype`` applies to the call's activation operands (not for a table lookup:
    its indices are integers and a lookup in an activation stays as it is).

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> from flax_integration._op_table import take_call
      >>> from flax_integration.providers.base import quantizes_activations
      >>> quantizes_activations(take_call(qarray.ops.take, jnp.take, jnp.ones((4, 2)), jnp.array([1]), axis=0))
      False
    """
    return getattr(call, 'quantize_activations', True)


# --- activation ranges (shared by PTQ static init and calibration) -----------------------------
def act_range(x: jax.Array, qtype: str, cw, tiles, calibration: str) -> tuple[jax.Array, jax.Array]:
    """Calibrated ``(lo, hi)`` of ``x`` in scale shape (rank of ``x``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax_integration.providers.base import act_range
      >>> lo, hi = act_range(jnp.array([[1., -3.], [2., 0.5]]), 'int8', (), None, 'absmax')
      >>> hi.tolist()
      [[3.0]]
    """
    view, reduce_axes, scale_shape = _layout.group_view(x.shape, cw, tiles)
    r = _calibration.calibrate(calibration, x.reshape(view).astype(jnp.float32), reduce_axes,
                               qtypes.get(qtype))
    lo = jnp.broadcast_to(r.lo, [1 if i in reduce_axes else d for i, d in enumerate(view)])
    hi = jnp.broadcast_to(r.hi, lo.shape)
    return lo.reshape(scale_shape), hi.reshape(scale_shape)


@functools.lru_cache(maxsize=None)  # depends only on the spec; called on every traced op
def is_symmetric(calibration: str) -> bool:
    """Whether a calibration spec gives symmetric ranges (no zero point).

    Example:
      >>> from flax_integration.providers.base import is_symmetric
      >>> is_symmetric('absmax'), is_symmetric('minmax')
      (True, False)
    """
    return bool(_calibration.calibrate(calibration, jnp.array([-1.0, 1.0]), (0,), qtypes.get('int8')).symmetric)


def range_to_scale(lo, hi, qtype: str, calibration: str, dtype=jnp.float32):
    """Scale and zero point (or None) for a static range.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax_integration.providers.base import range_to_scale
      >>> s, zp = range_to_scale(jnp.array([-2.]), jnp.array([2.]), 'int8', 'absmax')
      >>> s.shape, zp
      ((1,), None)
    """
    return _numerics.scale_and_zero_point(lo, hi, is_symmetric(calibration), qtypes.get(qtype), dtype)


_GROUP_CALIBRATIONS = ('absmax', 'minmax', 'fixed')  # ranges of a group of rows = min / max of the rows' ranges


def _per_group(op: Op, i: int) -> bool:
    per_group = getattr(op.call, 'per_group', None)
    return per_group is not None and per_group(i, op.rule.act_batch_axes)


def static_act_range(op: Op, i: int, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Calibrated ``(lo, hi)`` of static-scale activation operand ``i`` in its stored shape: the rule's
    static layout (:meth:`OpCall.layout`), or per group for a ragged_dot whose rule keeps the ragged axis
    (``act_batch_axes=()``: one range per expert, over the rows routed to it).

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> from flax_integration import QuantizationRule
      >>> from flax_integration._op_table import ragged_dot_call
      >>> from flax_integration.providers import Op, Weight
      >>> from flax_integration.providers.base import static_act_range
      >>> x = jnp.array([[1.], [-4.], [2.]])
      >>> call = ragged_dot_call(qarray.ragged_dot, jax.lax.ragged_dot, x, jnp.ones((2, 1, 3)), jnp.array([2, 1]))
      >>> rule = QuantizationRule(act_qtype='int8', act_static_scale=True, act_batch_axes=())
      >>> static_act_range(Op(call, None, rule, Weight(1, 'w', None), 'ragged_dot0'), 0, x)[1].tolist()
      [[4.0], [2.0]]
    """
    rule = op.rule
    cw, tiles = op.call.layout(i, 'static_act', op.tile_size, rule.act_batch_axes)
    lo, hi = act_range(x, rule.act_qtype, cw, tiles, rule.act_calibration_method)
    if _per_group(op, i):
        method = _calibration.parse(rule.act_calibration_method)[0]
        if method not in _GROUP_CALIBRATIONS:
            raise ValueError(
                f"{op.describe()}: a static scale per group (act_batch_axes keeps the ragged axis) takes "
                f"act_calibration_method in {_GROUP_CALIBRATIONS} (a group's range is the min/max of its rows'); "
                f"got {rule.act_calibration_method!r}. Use one of those, or a per-tensor scale (act_batch_axes=None).")
        lo, hi = op.call.group_range(lo, hi)
    return lo, hi


def static_scale_rows(op: Op, i: int, scale: Any, zero_point: Any) -> tuple[Any, Any]:
    """A stored static scale and zero point laid out to quantize operand ``i``: as stored, or, for a per-group
    scale, each row's group's (:meth:`RaggedCall.group_rows`).

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> from flax_integration import QuantizationRule
      >>> from flax_integration._op_table import ragged_dot_call
      >>> from flax_integration.providers import Op, Weight
      >>> from flax_integration.providers.base import static_scale_rows
      >>> x = jnp.ones((3, 4))
      >>> call = ragged_dot_call(qarray.ragged_dot, jax.lax.ragged_dot, x, jnp.ones((2, 4, 3)), jnp.array([2, 1]))
      >>> rule = QuantizationRule(act_qtype='int8', act_static_scale=True, act_batch_axes=())
      >>> s, _ = static_scale_rows(Op(call, None, rule, Weight(1, 'w', None), 'ragged_dot0'), 0,
      ...                          jnp.array([[0.5], [2.0]]), None)
      >>> s.tolist()
      [[0.5], [0.5], [2.0]]
    """
    if _per_group(op, i):
        return op.call.group_rows(scale), op.call.group_rows(zero_point)
    return scale, zero_point
