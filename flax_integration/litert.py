"""From a Flax model to a full-integer LiteRT (.tflite) file, and reading the result back.

:func:`export_litert` takes a model trained with
:class:`~flax_integration.providers.odml.OdmlQatProvider` (or a float model
with rules and ``quant_stats``), rebuilds it with
:class:`~flax_integration.providers.odml_conversion.OdmlConversionProvider`, lowers it
to StableHLO with the params closed over (so weights are constants the
converter can quantize), and converts it in process with
``litert-converter`` (no TensorFlow). :func:`litert_function` gives the
JAX function that is lowered (the "conversion-mode model"), to compare with
the interpreter. :func:`op_table` / :func:`format_op_table` describe a
converted model; :func:`run_tflite` runs it with ``ai-edge-litert``.

Shapes are static: the batch of ``sample_inputs`` is baked into the model.
``dynamic_batch=True`` rewrites the leading dimension of RESHAPE targets and
of the signature to -1 after conversion, so the interpreter can be resized to
any batch (valid when axis 0 is the batch everywhere, as in a classifier).

The converter and the interpreter are the optional extra ``[litert]``
(``pip install 'qarray[litert]'``); they are imported only when used.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import linen as nn
  >>> from flax_integration import OdmlQatProvider, QuantizationRule, export_litert, quantize_model
  >>> from flax_integration.litert import op_table
  >>> qat = quantize_model(nn.Dense(4), OdmlQatProvider([QuantizationRule(weight_qtype='int8', act_qtype='int8')]))
  >>> x = jnp.linspace(-1, 1, 16).reshape(2, 8)
  >>> v = qat.init(jax.random.key(0), x)
  >>> _, upd = qat.apply(v, x, mutable=['quant_stats'])
  >>> fb = export_litert(qat, {'params': v['params'], **upd}, (x,))
  >>> [r['op'] for r in op_table(fb)]
  ['QUANTIZE', 'FULLY_CONNECTED', 'DEQUANTIZE']
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from flax_integration._model import quantize_model
from flax_integration.providers.odml import OdmlQatProvider
from flax_integration.providers.odml_conversion import OdmlConversionProvider
from flax_integration.rules import QuantizationRule

__all__ = ['export_litert', 'litert_function', 'LitertFunction', 'to_tflite', 'op_table', 'format_op_table',
           'run_tflite', 'interpreter', 'require_litert', 'dynamic_batch_patch']

_EXTRA_HINT = ("LiteRT export needs the optional extra [litert]: pip install 'qarray[litert]' "
               "(litert-converter==0.5.0 and ai-edge-litert)")


def require_litert(what: str = 'converter') -> Any:
    """Import ``litert_converter`` (``what='converter'``) or ``ai_edge_litert`` (``'interpreter'``).

    Raises ImportError naming the ``[litert]`` extra when it is missing.

    Example:
      >>> from flax_integration.litert import require_litert
      >>> require_litert('interpreter').__name__
      'ai_edge_litert.interpreter'
      >>> require_litert('nothing')
      Traceback (most recent call last):
      ...
      ValueError: what must be 'converter' or 'interpreter'; got 'nothing'.
    """
    if what not in ('converter', 'interpreter'):
        raise ValueError(f"what must be 'converter' or 'interpreter'; got {what!r}.")
    try:
        if what == 'converter':
            import litert_converter
            from litert_converter.mlir import ir, passmanager  # noqa: F401
            return litert_converter
        from ai_edge_litert import interpreter as interp
        return interp
    except ImportError as e:
        raise ImportError(f"{_EXTRA_HINT}; importing the {what} failed: {e}") from None


# ------------------------------------------------------------------ StableHLO -> .tflite
def to_tflite(fn: Callable, args: Sequence[Any], *, input_names: Sequence[str] | None = None,
              output_names: Sequence[str] | None = None, signature: str = 'serving_default') -> bytes:
    """Lower ``jax.jit(fn)(*args)`` and convert it to .tflite bytes (``quant.*`` composites become int8).

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> from flax_integration.litert import run_tflite, to_tflite
      >>> fb = to_tflite(lambda x: x * 2.0, (jnp.ones(3),))
      >>> run_tflite(fb, np.arange(3, dtype=np.float32))
      [array([0., 2., 4.], dtype=float32)]
    """
    require_litert('converter')
    from litert_converter.mlir import ir, passmanager
    from litert_converter.mlir._mlir_libs import converter_api_ext as cx

    text = jax.jit(fn).lower(*args).as_text()
    n_out = len(jax.tree.leaves(jax.eval_shape(fn, *args)))
    ins = list(input_names or [f'input_{i}' for i in range(len(args))])
    outs = list(output_names or [f'output_{i}' for i in range(n_out)])
    ctx = ir.Context()
    cx.prepare_mlir_context(ctx)  # registers the StableHLO / TFL / quant dialects and passes
    with ctx, ir.Location.unknown():
        module = ir.Module.parse(text)
        cx.set_signature(module.operation, signature, ins, outs)
        cfg = cx.ConvertToTFLConfig()
        cfg.strict_qdq_mode = True  # the bool; qdq_conversion_mode='STRICT' is rejected by the converter
        cx.run_convert_to_tfl_passes(module, passmanager.PassManager(), cfg)
        return bytes(cx.export_flatbuffer_to_bytes(module.operation))


def _boundary_composite(name: str, x: jax.Array, scale: np.ndarray, zero_point: np.ndarray | None,
                        out_dtype: Any) -> jax.Array:
    """``quant.quantize`` (float -> int8 codes) or ``quant.dequantize`` (codes -> float) composite."""
    s = np.asarray(scale, np.float32).reshape(-1)
    z = np.zeros(1, np.int64) if zero_point is None else np.asarray(zero_point, np.int64).reshape(-1)
    attrs = dict(dtype='i8', narrow_range=False, scale=s, zero_point=z)
    # Python scalars only: an array constant in the body would become an extra operand of the composite,
    # which the converter then leaves unconverted.
    inv, scale0, zp0 = float(np.float32(1.0) / s[0]), float(s[0]), float(z[0])

    def quantize(v, **_):  # qarray's rounding: x * (1/s), half to even, + zero point, clip
        q = jnp.round(v.astype(jnp.float32) * inv) + zp0
        return jnp.clip(q, -128, 127).astype(jnp.int8)

    def dequantize(q, **_):
        return ((q.astype(jnp.float32) - zp0) * scale0).astype(out_dtype)

    body = quantize if name == 'quant.quantize' else dequantize
    return jax.lax.composite(body, name=name)(x, **attrs)


# ------------------------------------------------------------------ the conversion-mode model
@dataclasses.dataclass
class LitertFunction:
    """The JAX function that :func:`export_litert` lowers, with its boundary parameters.

    Attributes:
      fn: ``fn(*inputs)``: float inputs (or int8 codes when ``int8_io``) ->
        outputs (float, or int8 codes).
      sample_inputs: inputs of the lowering's shapes and dtypes.
      input_qparams: per input, ``(scale, zero_point)`` of its annotation.
      output_qparams: per output leaf, ``(scale, zero_point)``.
      int8_io: whether inputs and outputs are int8 codes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from flax_integration import QuantizationRule
      >>> from flax_integration.litert import litert_function
      >>> x = jnp.linspace(-1, 1, 16).reshape(2, 8)
      >>> params = nn.Dense(4).init(jax.random.key(0), x)['params']
      >>> lf = litert_function(nn.Dense(4), params, (x,), int8_io=True,
      ...                      rules=[QuantizationRule(weight_qtype='int8', act_qtype='int8')])
      >>> type(lf).__name__, lf.sample_inputs[0].dtype, lf.fn(*lf.sample_inputs).dtype
      ('LitertFunction', dtype('int8'), dtype('int8'))
    """

    fn: Callable
    sample_inputs: tuple
    input_qparams: list
    output_qparams: list
    int8_io: bool


def _variables(params: Any, quant_stats: Any) -> tuple[Any, Any]:
    """Split Linen ``params`` given as variables ({'params', 'quant_stats'}) or as the params alone."""
    if hasattr(params, 'get') and 'params' in params:
        return params['params'], quant_stats if quant_stats is not None else params.get('quant_stats')
    return params, quant_stats


def _provider_of(model: Any) -> Any:
    if isinstance(model, nnx.Module):
        return getattr(model, 'qarray_provider', None)
    return getattr(type(model), '_qarray_provider', None)


def _linen_stats_from_sample(model: nn.Module, params: Any, rules, sample_inputs, kwargs) -> Any:
    qat = quantize_model(model, OdmlQatProvider(rules, **kwargs))
    stats = qat.init(jax.random.key(0), *sample_inputs).get('quant_stats', {})
    _, upd = qat.apply({'params': params, 'quant_stats': stats}, *sample_inputs, mutable=['quant_stats'])
    return upd.get('quant_stats', {})


def litert_function(model: Any, params: Any, sample_inputs: Sequence[Any], *,
                    rules: Sequence[QuantizationRule] | None = None, quant_stats: Any = None,
                    int8_io: bool = False) -> LitertFunction:
    """The conversion-mode model as a JAX function (what :func:`export_litert` converts).

    Args: as :func:`export_litert`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from flax_integration import QuantizationRule
      >>> from flax_integration.litert import litert_function
      >>> rules = [QuantizationRule(weight_qtype='int8', act_qtype='int8')]
      >>> x = jnp.linspace(-1, 1, 16).reshape(2, 8)
      >>> params = nn.Dense(4).init(jax.random.key(0), x)['params']
      >>> lf = litert_function(nn.Dense(4), params, (x,), rules=rules)  # statistics from x
      >>> lf.fn(x).shape, len(lf.input_qparams)
      ((2, 4), 1)
    """
    sample_inputs = tuple(jnp.asarray(x) for x in sample_inputs)
    if not sample_inputs:
        raise ValueError("sample_inputs: give at least one input (a tuple of arrays) to fix the shapes.")
    if not isinstance(int8_io, bool):
        raise TypeError(f"int8_io must be True or False; got {int8_io!r}.")
    qat = _provider_of(model)
    if qat is not None and not isinstance(qat, OdmlQatProvider):
        raise ValueError(f"model: it is quantized with {type(qat).__name__}; export needs a float model or one "
                         "made with quantize_model(model, OdmlQatProvider(rules)).")
    if rules is None:
        if qat is None:
            raise ValueError("rules: a float model needs rules=[QuantizationRule(weight_qtype='int8', "
                             "act_qtype='int8')] (or pass a model quantized with OdmlQatProvider).")
        rules = qat.rules.rules
    kwargs = {} if qat is None else dict(act_calibration_method=qat.act_calibration_method,
                                         per_channel_weights=qat.per_channel_weights)

    if isinstance(model, nnx.Module):
        if quant_stats is None and qat is None:
            calib = quantize_model(model, OdmlQatProvider(rules, **kwargs), *sample_inputs)
            calib(*sample_inputs)  # one pass on the sample inputs collects the statistics
            model = calib
        provider = OdmlConversionProvider(rules, params, quant_stats, **kwargs)
        conv = quantize_model(model, provider, *sample_inputs)
        call = lambda *xs: conv(*xs)
    elif isinstance(model, nn.Module):
        fp_params, stats = _variables(params, quant_stats)
        if fp_params is None:
            raise ValueError("params: a Linen model needs its params (the 'params' dict or the variables).")
        if stats is None:
            stats = _linen_stats_from_sample(model, fp_params, rules, sample_inputs, kwargs)
        provider = OdmlConversionProvider(rules, fp_params, stats, **kwargs)
        conv = quantize_model(model, provider)
        call = lambda *xs: conv.apply({'params': fp_params}, *xs)
    else:
        raise TypeError(f"model must be a flax.linen.Module or flax.nnx.Module; got {type(model).__name__}.")

    jax.eval_shape(call, *sample_inputs)  # learn the boundary parameters (the model annotates its inputs)
    in_q = [provider.last_io['inputs'].get(i) for i in range(len(sample_inputs))]
    out_q = list(provider.last_io['outputs'])

    def fn(*xs):
        if int8_io:  # int8 codes in: dequantize at the boundary and tell the model the input is annotated
            xs = list(xs)
            for i, qp in enumerate(in_q):
                if qp is not None:
                    xs[i] = _boundary_composite('quant.dequantize', xs[i], *qp, sample_inputs[i].dtype)
                    provider.seed(xs[i], *qp)
        out = call(*xs)
        if not int8_io:
            return out
        leaves, tree = jax.tree.flatten(out)
        leaves = [_boundary_composite('quant.quantize', v, *qp, jnp.int8) if qp is not None else v
                  for v, qp in zip(leaves, out_q + [None] * (len(leaves) - len(out_q)))]
        return jax.tree.unflatten(tree, leaves)

    samples = sample_inputs
    if int8_io:
        samples = tuple(jnp.zeros(x.shape, jnp.int8) if qp is not None else x for x, qp in zip(sample_inputs, in_q))
    return LitertFunction(fn, samples, in_q, out_q, int8_io)


def export_litert(model: Any, params: Any, sample_inputs: Sequence[Any], path: str | os.PathLike | None = None, *,
                  rules: Sequence[QuantizationRule] | None = None, quant_stats: Any = None, int8_io: bool = False,
                  dynamic_batch: bool = False) -> bytes:
    """Convert a Flax model to a full-integer .tflite in one call; returns the bytes (written to ``path``).

    Args:
      model: a Linen or NNX model quantized with ``OdmlQatProvider`` (its rules
        and settings are reused), or a float model with ``rules``.
      params: Linen: the variables ``{'params': ..., 'quant_stats': ...}`` or
        the params alone (then pass ``quant_stats``); NNX: None (the model
        holds its weights and statistics).
      sample_inputs: a tuple of inputs; their shapes (batch included) are
        the model's.
      path: where to write the file (optional).
      rules: for a float model: which modules to quantize.
      quant_stats: activation statistics (from QAT); for a float model
        without them, one pass over ``sample_inputs`` calibrates.
      int8_io: int8 model inputs and outputs (no QUANTIZE / DEQUANTIZE ops);
        read their parameters from the interpreter's input/output details.
      dynamic_batch: make the batch dimension resizable (see module docstring).

    Example:
      A float Linen model calibrated on its sample input, with int8 inputs
      and outputs:

      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from flax_integration import QuantizationRule, export_litert
      >>> from flax_integration.litert import op_table
      >>> x = jnp.linspace(-1, 1, 16).reshape(2, 8)
      >>> params = nn.Dense(4).init(jax.random.key(0), x)['params']
      >>> fb = export_litert(nn.Dense(4), params, (x,), int8_io=True,
      ...                    rules=[QuantizationRule(weight_qtype='int8', act_qtype='int8')])
      >>> fb[4:8], [r['op'] for r in op_table(fb)]
      (b'TFL3', ['FULLY_CONNECTED'])
    """
    require_litert('converter')
    lf = litert_function(model, params, sample_inputs, rules=rules, quant_stats=quant_stats, int8_io=int8_io)
    fb = to_tflite(lf.fn, lf.sample_inputs)
    if dynamic_batch:
        fb = dynamic_batch_patch(fb, int(lf.sample_inputs[0].shape[0]))
    if path is not None:
        with open(path, 'wb') as f:
            f.write(fb)
    return fb


def dynamic_batch_patch(fb: bytes, batch: int) -> bytes:
    """Replace a leading ``batch`` by -1 in RESHAPE targets and tensor signatures of a .tflite.

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> from flax_integration.litert import dynamic_batch_patch, run_tflite, to_tflite
      >>> fb = to_tflite(lambda x: x.reshape(x.shape[0], -1), (jnp.ones((2, 3, 4)),))
      >>> run_tflite(dynamic_batch_patch(fb, 2), np.ones((5, 3, 4), np.float32))[0].shape
      (5, 12)
    """
    require_litert('converter')
    import flatbuffers
    from litert_converter import schema_py_generated as S

    m = S.ModelT.InitFromPackedBuf(fb, 0)
    reshape = {i for i, oc in enumerate(m.operatorCodes)
               if max(oc.builtinCode, oc.deprecatedBuiltinCode) == S.BuiltinOperator.RESHAPE}
    for sg in m.subgraphs:
        for op in sg.operators:
            if op.opcodeIndex not in reshape:
                continue
            if len(op.inputs) > 1 and op.inputs[1] >= 0:
                buf = m.buffers[sg.tensors[op.inputs[1]].buffer]
                if buf.data is not None and len(buf.data):
                    shape = np.frombuffer(bytes(bytearray(buf.data)), np.int32).copy()
                    if shape[0] == batch:
                        shape[0] = -1
                        buf.data = np.frombuffer(shape.tobytes(), np.uint8)
            opts = op.builtinOptions
            if opts is not None and getattr(opts, 'newShape', None) is not None and len(opts.newShape) \
                    and opts.newShape[0] == batch:
                opts.newShape[0] = -1
        for t in sg.tensors:
            if t.shape is not None and len(t.shape) and t.shape[0] == batch:
                t.shapeSignature = np.array([-1] + list(t.shape[1:]), np.int32)
    b = flatbuffers.Builder(len(fb) + 1024)
    b.Finish(m.Pack(b), file_identifier=b'TFL3')
    return bytes(b.Output())


# ------------------------------------------------------------------ reading and running
def interpreter(fb: bytes, *, xnnpack: bool = True, num_threads: int = 1) -> Any:
    """An allocated ``ai_edge_litert`` Interpreter (``xnnpack=False``: the builtin reference kernels,
    whose op list is the real graph, without a DELEGATE node).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax_integration.litert import interpreter, to_tflite
      >>> it = interpreter(to_tflite(lambda x: x + 1.0, (jnp.ones((2, 3)),)))
      >>> [(d['shape'].tolist(), d['dtype'].__name__) for d in it.get_input_details()]
      [([2, 3], 'float32')]
    """
    interp = require_litert('interpreter')
    kind = interp.OpResolverType.AUTO if xnnpack else interp.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = interp.Interpreter(model_content=fb, experimental_op_resolver_type=kind, num_threads=num_threads)
    it.allocate_tensors()
    return it


def run_tflite(fb: bytes, *inputs: Any, xnnpack: bool = True) -> list[np.ndarray]:
    """Run a .tflite on numpy inputs (resizing the batch when it differs); returns the outputs.

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> from flax_integration.litert import run_tflite, to_tflite
      >>> fb = to_tflite(lambda x: x * 2.0, (jnp.ones((2, 3)),))
      >>> run_tflite(fb, np.ones((4, 3), np.float32))[0].shape  # batch 4: the input is resized
      (4, 3)
    """
    it = interpreter(fb, xnnpack=xnnpack)
    details = it.get_input_details()
    if len(details) != len(inputs):
        raise ValueError(f"inputs: the model has {len(details)} inputs; got {len(inputs)}.")
    resized = False
    for d, x in zip(details, inputs):
        if tuple(d['shape']) != tuple(np.shape(x)):
            it.resize_tensor_input(d['index'], list(np.shape(x)))
            resized = True
    if resized:
        it.allocate_tensors()
    for d, x in zip(it.get_input_details(), inputs):
        it.set_tensor(d['index'], np.asarray(x, d['dtype']))
    it.invoke()
    return [it.get_tensor(d['index']) for d in it.get_output_details()]


_WEIGHTED = {'CONV_2D': (1, 2), 'DEPTHWISE_CONV_2D': (1, 2), 'FULLY_CONNECTED': (1, 2), 'BATCH_MATMUL': (None, None)}


def op_table(fb: bytes) -> list[dict]:
    """One row per op of the graph: ``op``, ``fused`` activation, and dtypes of the input, weight, bias
    and output tensors, with the weight's scale count and quantized dimension.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from flax_integration import QuantizationRule, export_litert
      >>> from flax_integration.litert import op_table
      >>> x = jnp.linspace(-1, 1, 16).reshape(2, 8)
      >>> params = nn.Dense(4).init(jax.random.key(0), x)['params']
      >>> fb = export_litert(nn.Dense(4), params, (x,), rules=[QuantizationRule(weight_qtype='int8', act_qtype='int8')])
      >>> [(r['op'], r['weight'], r['weight_scales']) for r in op_table(fb)]
      [('QUANTIZE', '-', 0), ('FULLY_CONNECTED', 'int8', 4), ('DEQUANTIZE', '-', 0)]
    """
    it = interpreter(fb, xnnpack=False)
    from litert_converter import schema_py_generated as S
    model = S.ModelT.InitFromPackedBuf(fb, 0)
    act_names = {v: k for k, v in vars(S.ActivationFunctionType).items() if not k.startswith('_')}
    tensors = {t['index']: t for t in it.get_tensor_details()}
    flat = model.subgraphs[0]

    def dtype(i):
        if i < 0:
            return '-'
        name = np.dtype(tensors[i]['dtype']).name
        if flat.tensors[i].type == S.TensorType.INT4:
            name = 'int4'
        return name

    rows = []
    for k, op in enumerate(it._get_ops_details()):  # private but stable: op names and tensor indices
        name = op['op_name']
        ins = list(op['inputs'])
        w_i, b_i = _WEIGHTED.get(name, (None, None))
        row = dict(op=name, inputs=[dtype(i) for i in ins if i >= 0], output=[dtype(i) for i in op['outputs']],
                   weight='-', weight_scales=0, weight_qdim=None, bias='-', fused='-')
        if w_i is not None and len(ins) > w_i:
            qp = tensors[ins[w_i]]['quantization_parameters']
            row.update(input=dtype(ins[0]), weight=dtype(ins[w_i]), weight_scales=len(qp['scales']),
                       weight_qdim=int(qp['quantized_dimension']),
                       weight_zero_points=int(np.abs(qp['zero_points']).max(initial=0)))
            if b_i is not None and len(ins) > b_i:
                row['bias'] = dtype(ins[b_i])
        elif name == 'BATCH_MATMUL':
            row.update(input=dtype(ins[0]), weight=dtype(ins[1]))
        opts = flat.operators[k].builtinOptions
        act = getattr(opts, 'fusedActivationFunction', None)
        if act:
            row['fused'] = act_names.get(act, str(act))
        rows.append(row)
    return rows


def format_op_table(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`op_table` rows (op x input / weight / bias / output dtypes).

    Example:
      >>> from flax_integration.litert import format_op_table
      >>> print(format_op_table([dict(op='QUANTIZE', inputs=['float32'], output=['int8'], weight='-',
      ...                             weight_scales=0, weight_qdim=None, bias='-', fused='-')]))
      | op | input | weight (scales, axis) | bias | output | fused |
      |---|---|---|---|---|---|
      | QUANTIZE | float32 | - | - | int8 | - |
    """
    lines = ['| op | input | weight (scales, axis) | bias | output | fused |', '|---|---|---|---|---|---|']
    for r in rows:
        w = r['weight'] if not r['weight_scales'] else f"{r['weight']} ({r['weight_scales']}, {r['weight_qdim']})"
        inp = r.get('input') or ', '.join(r['inputs'])
        lines.append(f"| {r['op']} | {inp} | {w} | {r['bias']} | {', '.join(r['output'])} | {r['fused']} |")
    return '\n'.join(lines)
