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
