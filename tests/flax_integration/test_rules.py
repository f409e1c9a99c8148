import pytest

from flax_integration.rules import QuantizationRule, RuleSet


def test_first_full_match_wins():
    rs = RuleSet([QuantizationRule(module_path='enc/.*', weight_qtype='int4'),
                  QuantizationRule(module_path='.*', weight_qtype='int8')])
    assert rs.match('enc/Dense_0', 'dot_general').weight_qtype == 'int4'
    assert rs.match('dec/enc/Dense_0', 'dot_general').weight_qtype == 'int8'  # full match, not search


def test_op_names_target_one_op_kind():
    rs = RuleSet([QuantizationRule(weight_qtype='int4', op_names=('einsum',)),
                  QuantizationRule(weight_qtype='int8', op_names=('conv_general_dilated',))])
    assert rs.match('x', 'einsum').weight_qtype == 'int4'
    assert rs.match('x', 'conv_general_dilated').weight_qtype == 'int8'
    assert rs.match('x', 'dot_general') is None


def test_unused_rules_reported():
    rs = RuleSet([QuantizationRule(module_path='a'), QuantizationRule(module_path='b')])
    rs.match('a', 'dot_general')
    assert [r.module_path for r in rs.unused()] == ['b']


@pytest.mark.parametrize('kwargs, err, words', [
    (dict(weight_qtype='int9'), ValueError, 'weight_qtype'),
    (dict(act_qtype='bogus'), ValueError, 'act_qtype'),
    (dict(tile_size=0), ValueError, 'tile_size'),
    (dict(tile_size=True), ValueError, 'tile_size'),
    (dict(weight_calibration_method='nope'), ValueError, 'weight_calibration_method'),
    (dict(act_calibration_method='percentile,200'), None, None),  # arguments checked at use, not parse
    (dict(op_names=('matmul',)), ValueError, 'op_names'),
    (dict(op_names=()), ValueError, 'op_names'),
    (dict(module_path='('), ValueError, 'module_path'),
    (dict(module_path=3), TypeError, 'module_path'),
    (dict(act_batch_axes=('a',)), TypeError, 'act_batch_axes'),
    (dict(act_static_scale=True), ValueError, 'act_qtype'),
])
def test_rule_errors_name_the_argument(kwargs, err, words):
    if err is None:
        QuantizationRule(**kwargs)
        return
    with pytest.raises(err, match=words):
        QuantizationRule(**kwargs)


def test_ruleset_rejects_non_rules():
    with pytest.raises(TypeError, match='QuantizationRule'):
        RuleSet(['.*'])


# ------------------------------------------------------------------------------------------ unused rules warn
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import flax_integration as fi  # noqa: E402


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        fn()
    return [w for w in caught if issubclass(w.category, fi.UnusedRuleWarning)]


class _Two(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name='head')(nn.Dense(4, name='body')(x))


def test_typo_in_module_path_warns_after_the_first_linen_run_naming_nearest_paths():
    rules = [fi.QuantizationRule(module_path='Encoder.*', weight_qtype='int8'),
             fi.QuantizationRule(module_path='bod', weight_qtype='int8')]
    m = fi.quantize_model(_Two(), fi.PtqProvider(rules))
    got = _caught(lambda: m.init(jax.random.key(0), jnp.ones((1, 3))))
    msgs = [str(w.message) for w in got]
    assert len(msgs) == 2 and "module_path='Encoder.*'" in msgs[0] and "module_path='bod'" in msgs[1]
    assert msgs[1].index("'body (dot_general)'") < msgs[1].index("'head (dot_general)'")  # nearest first
    assert _caught(lambda: m.init(jax.random.key(0), jnp.ones((1, 3)))) == []  # once per provider


def test_nnx_quantize_model_warns_and_opt_out_silences():
    x = jnp.ones((1, 3))
    lin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    got = _caught(lambda: fi.quantize_model(lin, fi.PtqProvider([fi.QuantizationRule(module_path='enc', weight_qtype='int8')]), x))
    assert len(got) == 1 and "'<root> (dot_general)'" in str(got[0].message)
    quiet = [fi.QuantizationRule(module_path='enc', weight_qtype='int8', warn_if_unused=False)]
    assert _caught(lambda: fi.quantize_model(lin, fi.PtqProvider(quiet), x)) == []
    ok = [fi.QuantizationRule(module_path='.*', weight_qtype='int8')]
    assert _caught(lambda: fi.quantize_model(lin, fi.PtqProvider(ok), x)) == []


def test_model_free_quantize_params_warns_for_a_typo_nearest_first():
    params = {'Dense_0': {'kernel': jnp.ones((4, 4)), 'bias': jnp.zeros(4)}, 'Dense_1': {'kernel': jnp.ones((4, 4))}}
    got = _caught(lambda: fi.quantize_params(params, [fi.QuantizationRule(module_path='Dense_0/kernl',
                                                                            weight_qtype='int8')]))
    assert len(got) == 1
    msg = str(got[0].message)
    assert msg.index("'Dense_0/kernel'") < msg.index("'Dense_1/kernel'")
    assert _caught(lambda: fi.quantize_params(params, [fi.QuantizationRule(module_path='.*/kernel',
                                                                             weight_qtype='int8')])) == []
