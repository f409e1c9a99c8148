"""Qwix 0.1.8 contrib methods (GPTQ, AWQ, SmoothQuant) on MiniLM: the builders run and stay close to float.

Skipped (with the install command as the reason) when the pretrained checkpoint's
packages are missing, and when qwix is not installed. Qwix's GPTQ runs eagerly
column by column (about 4 min for all 36 layers on 2 cores), so the test quantizes
one layer (layer_0/query) with it and the rest stays float; the full-model numbers are in the
module docstring's report.
"""

import functools

import jax
import numpy as np
import pytest

import budget
from examples.minilm import evaluate, schemes, weights

needs_model = pytest.mark.skipif(not weights.available(), reason=str(weights.missing_reason()))
qwix = pytest.importorskip('qwix', reason='qwix is not installed: pip install qwix==0.1.8')
qc = pytest.importorskip('examples.minilm.qwix_contrib')

_ONE_LAYER = 'layer_0/query'


@functools.lru_cache(maxsize=1)
def _setup():
    params = weights.load_params()
    data = evaluate.eval_data(n_pairs=1, latency_batch=2, latency_length=16)
    ref = evaluate.build_float(params)
    return params, data, np.asarray(ref.apply(ref.variables, data.ids, data.mask))


def test_unsupported_schemes_return_none_or_raise():
    # No model needed: these are decided from the scheme alone.
    w8a8 = schemes.by_name('w8a8 int8 dynamic')
    wo = schemes.by_name('int4 t128 weight-only')
    assert qc.build_qwix_gptq(w8a8, None, None, []) is None
    assert qc.build_qwix_awq(w8a8, None, None, []) is None
    assert qc.build_qwix_smoothquant(wo, None, None, []) is None
    assert qc.build_qwix_smoothquant(schemes.by_name('w8a8 int8 static'), None, None, []) is None
    with pytest.raises(NotImplementedError, match='synthetic qtype'):
        qc.build_qwix_gptq(schemes.by_name('nf4 t64 weight-only'), None, None, [])


@needs_model
@pytest.mark.skipif(not budget.LONG, reason="35 s of Qwix's eager GPTQ (a peer's code path, measured in "
                    "benchmarks/minilm_bench.py): QARRAY_TEST_PROFILE=long runs it")
def test_gptq_int4_t128_builds_and_is_close_to_float():
    params, data, float_emb = _setup()
    scheme = schemes.by_name('int4 t128 weight-only')
    # One layer, 3 of the 6 calibration batches and GPTQ block 32 (default 128) keep this near 20 s:
    # Qwix's eager GPTQ compiles one op per column-slice width in a block.
    built = qc.build_qwix_gptq(scheme, params, data, evaluate.calibration_batches()[:3], module_path=_ONE_LAYER,
                               block_size=32)
    assert evaluate.fidelity(built, data, float_emb)['cos'] > 0.9
    q = built.variables['params']['layer_0']['query']['kernel'].array
    assert q.qvalue.dtype == jax.numpy.int4 and q.scale.shape == (3, 384)  # 384 inputs / tile 128
    # GPTQ really ran (not Qwix's silent PTQ fallback): its codes differ from round-to-nearest.
    w = np.asarray(params['params']['layer_0']['query']['kernel'])
    scale = np.repeat(np.asarray(q.scale, np.float64), 128, axis=0)
    rtn = np.clip(np.round(w / scale), -8, 7)
    assert (np.asarray(q.qvalue, np.int8) != rtn).mean() > 0.05
    # Layers outside module_path stay float.
    assert isinstance(built.variables['params']['layer_1']['query']['kernel'], jax.Array)
