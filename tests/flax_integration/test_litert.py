"""Digits models trained with OdmlQatProvider, converted to .tflite and checked with the real LiteRT tools.

Needs the ``[litert]`` extra (litert-converter, ai-edge-litert); skipped with a reason without it.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('litert_converter', reason="needs the [litert] extra: pip install 'qarray[litert]'")
pytest.importorskip('ai_edge_litert', reason="needs the [litert] extra: pip install 'qarray[litert]'")

from ai_edge_litert.interpreter import Interpreter, OpResolverType  # noqa: E402
from flax import linen as nn  # noqa: E402

from examples.digits import data, litert_export, models  # noqa: E402
from flax_integration import litert  # noqa: E402
from flax_integration import QuantizationRule  # noqa: E402

STEPS = 60
CASES = [('linen', 'cnn'), ('linen', 'mlp'), ('nnx', 'cnn'), ('nnx', 'mlp')]
WEIGHTED = {'CONV_2D': 0, 'DEPTHWISE_CONV_2D': 3, 'FULLY_CONNECTED': 0, 'BATCH_MATMUL': None}  # out-channel axis


@pytest.fixture(scope='module')
def digits():
    return data.load()


@pytest.fixture(scope='module')
def trained(digits):
    """Each model trained once (seeded), exported with a resizable batch, and run on the test set."""
    return {c: litert_export.run_one(*c, steps=STEPS, d=digits) for c in CASES}


def builtin_interpreter(fb):
    # without the XNNPACK delegate the op list is the real graph (no DELEGATE node)
    it = Interpreter(model_content=fb, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    return it


def check_full_integer(fb, int8_io):
    it = builtin_interpreter(fb)
    tensors = {t['index']: t for t in it.get_tensor_details()}
    ops = it._get_ops_details()
    model_in = {d['index'] for d in it.get_input_details()}
    model_out = {d['index'] for d in it.get_output_details()}
    names = [op['op_name'] for op in ops]
    weighted = 0
    for op in ops:
        ins = [i for i in op['inputs'] if i >= 0]
        dt = lambda i: np.dtype(tensors[i]['dtype'])
        if op['op_name'] == 'QUANTIZE':
            assert not int8_io and ins == [i for i in ins if i in model_in], 'QUANTIZE only at the model input'
            continue
        if op['op_name'] == 'DEQUANTIZE':
            assert not int8_io and all(o in model_out for o in op['outputs']), 'DEQUANTIZE only at the output'
            continue
        for i in ins + list(op['outputs']):
            assert dt(i) in (np.int8, np.int32), f"{op['op_name']} touches {dt(i)}"
        if op['op_name'] in WEIGHTED:
            weighted += 1
            x, w, b = ins[:3]
            assert dt(x) == np.int8 and dt(w) == np.int8 and dt(b) == np.int32
            assert all(dt(o) == np.int8 for o in op['outputs'])
            qp = tensors[w]['quantization_parameters']
            n_out = tensors[w]['shape'][WEIGHTED[op['op_name']]]
            assert len(qp['scales']) == n_out and qp['quantized_dimension'] == WEIGHTED[op['op_name']]
            assert np.all(qp['zero_points'] == 0)
            # int32 bias at scale s_x * s_w (per channel)
            s_x = tensors[x]['quantization_parameters']['scales'][0]
            # float32 products on both sides (<= 2 u apart)
            np.testing.assert_allclose(tensors[b]['quantization_parameters']['scales'], s_x * qp['scales'], rtol=1e-5)
    assert weighted >= 2
    if int8_io:
        assert 'QUANTIZE' not in names and 'DEQUANTIZE' not in names
        assert all(np.dtype(d['dtype']) == np.int8 for d in it.get_input_details() + it.get_output_details())
    else:
        assert names[0] == 'QUANTIZE' and names[-1] == 'DEQUANTIZE'
        assert names.count('QUANTIZE') == 1 and names.count('DEQUANTIZE') == 1
    return names


@pytest.mark.parametrize('case', CASES, ids=[' '.join(c) for c in CASES])
def test_graph_is_full_integer(trained, case):
    names = check_full_integer(trained[case].tflite, int8_io=False)
    expected = {'cnn': ['QUANTIZE', 'DEPTHWISE_CONV_2D', 'CONV_2D', 'RESHAPE', 'FULLY_CONNECTED', 'FULLY_CONNECTED',
                        'DEQUANTIZE'],
                'mlp': ['QUANTIZE', 'RESHAPE', 'FULLY_CONNECTED', 'FULLY_CONNECTED', 'DEQUANTIZE']}[case[1]]
    assert names == expected


@pytest.mark.parametrize('case', CASES, ids=[' '.join(c) for c in CASES])
def test_interpreter_matches_jax(trained, digits, case):
    r = trained[case]
    assert r.acc_qat > 85.0  # the model learned something
    # Integer kernels vs the float32 fake-quant model: codes agree except at near-ties (one output step, u-level
    # slack), so a prediction flips only for an example with two near-equal top logits (statistical: 1 point).
    assert abs(r.acc_tflite - r.acc_qat) <= 1.0
    assert r.max_lsb <= 1.0 + 1e-3  # per example, within one output step of the JAX conversion-mode model
    assert len(r.tflite) < r.float_size / 2


@pytest.mark.parametrize('case', [('linen', 'cnn'), ('nnx', 'mlp')], ids=['linen cnn', 'nnx mlp'])
def test_int8_io(trained, digits, case):
    r = trained[case]
    x = digits.x_test[:32]
    lf = litert.litert_function(r.model, r.variables, (x,), int8_io=True)
    fb = litert.export_litert(r.model, r.variables, (x,), int8_io=True)
    check_full_integer(fb, int8_io=True)
    it = builtin_interpreter(fb)
    (s, z), = [d['quantization'] for d in it.get_input_details()]
    np.testing.assert_allclose(s, np.asarray(lf.input_qparams[0][0]).reshape(-1)[0], rtol=1e-6)  # one float32 value
    xq = np.clip(np.round(x / s) + z, -128, 127).astype(np.int8)
    out = litert.run_tflite(fb, xq)[0]
    ref = np.asarray(jax.jit(lf.fn)(jnp.asarray(xq)))
    assert out.dtype == np.int8 and ref.dtype == np.int8
    assert np.abs(out.astype(np.int32) - ref.astype(np.int32)).max() <= 1  # one code at near-ties, as above


def test_float_model_with_rules_calibrates_on_the_sample(trained, digits):
    r = trained['linen', 'mlp']
    x = digits.x_test[:16]
    fb = litert.export_litert(litert_export.LinenMLP(), {'params': r.variables['params']}, (x,),
                              rules=[QuantizationRule(weight_qtype='int8', act_qtype='int8')])
    check_full_integer(fb, int8_io=False)


def test_export_writes_the_file(trained, digits, tmp_path):
    r = trained['nnx', 'cnn']
    path = tmp_path / 'cnn.tflite'
    fb = litert.export_litert(r.model, None, (digits.x_test[:4],), path)
    assert path.read_bytes() == fb


def test_export_errors(digits):
    x = digits.x_test[:2]
    params = nn.Dense(3).init(jax.random.key(0), x.reshape(2, -1))['params']
    with pytest.raises(ValueError, match='rules'):
        litert.export_litert(nn.Dense(3), params, (x.reshape(2, -1),))
    with pytest.raises(ValueError, match='sample_inputs'):
        litert.litert_function(nn.Dense(3), params, (), rules=litert_export.RULES)
    with pytest.raises(TypeError, match='int8_io'):
        litert.litert_function(nn.Dense(3), params, (x.reshape(2, -1),), rules=litert_export.RULES, int8_io='yes')
    with pytest.raises(TypeError, match='model'):
        litert.litert_function(object(), params, (x,), rules=litert_export.RULES)


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, 'litert_converter', None)
    with pytest.raises(ImportError, match=r'\[litert\]'):
        litert.require_litert('converter')
    monkeypatch.setitem(sys.modules, 'ai_edge_litert', None)
    with pytest.raises(ImportError, match=r'\[litert\]'):
        litert.require_litert('interpreter')
    with pytest.raises(ValueError, match='what'):
        litert.require_litert('both')
