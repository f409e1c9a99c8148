"""Bad arguments to the quantized ops: clear errors naming both layouts."""

import jax.numpy as jnp
import pytest

from qarray import ops
from ops_testlib import quant, rand

MK = (((1,), (0,)), ((), ()))


# ---------------------------------------------------------------------------------------- errors
def test_mismatched_contracting_sizes_names_both_layouts():
    qx = quant(rand(0, (4, 128)), 'int8')
    qw = quant(rand(1, (64, 8)), 'int4', channelwise_axes=(1,))
    with pytest.raises(ValueError, match=r"contracting sizes differ.*lhs: QArray\(int8.*rhs: QArray\(int4"):
        ops.dot_general(qx, qw, MK)


def test_mismatched_batch_sizes():
    with pytest.raises(ValueError, match=r"batch sizes differ.*lhs: array.*rhs: QArray"):
        ops.dot_general(rand(0, (2, 4, 8)), quant(rand(1, (3, 8, 2)), 'int8'), (((2,), (1,)), ((0,), (0,))))


def test_tiles_that_do_not_line_up():
    qx = quant(rand(0, (4, 192)), 'int8', tiles={1: 64})
    qw = quant(rand(1, (192, 8)), 'int8', tiles={0: 96})
    with pytest.raises(ValueError, match=r"tiles on the contracting axes do not line up.*tiles=\{1: 64\}.*"
                                         r"tiles=\{0: 96\}"):
        ops.dot_general(qx, qw, MK)


@pytest.mark.parametrize('dn,match', [
    ((((2,), (0,)), ((), ())), 'out of range'),
    ((((1, 1), (0, 0)), ((), ())), 'repeats an axis'),
    ((((1,), (0, 1)), ((), ())), 'pair up one to one'),
    ((((1,), (0,)), ((1,), (0,))), 'both contracting and batch'),
])
def test_bad_dimension_numbers(dn, match):
    with pytest.raises(ValueError, match=match):
        ops.dot_general(rand(0, (4, 8)), quant(rand(1, (8, 8)), 'int8'), dn)


def test_malformed_dimension_numbers():
    with pytest.raises(TypeError, match='dimension_numbers must be'):
        ops.dot_general(rand(0, (4, 8)), quant(rand(1, (8, 8)), 'int8'), (1, 0))
    with pytest.raises(TypeError, match='sequence of ints'):
        ops.dot_general(rand(0, (4, 8)), quant(rand(1, (8, 8)), 'int8'), ((1, 0), ((), ())))


def test_integer_preferred_element_type_is_refused():
    with pytest.raises(TypeError, match=r"preferred_element_type must be a floating dtype.*int32"):
        ops.dot_general(quant(rand(0, (4, 8)), 'int8'), quant(rand(1, (8, 2)), 'int8'), MK,
                        preferred_element_type=jnp.int32)


def test_bad_operand_types():
    with pytest.raises(TypeError, match='lhs must be an array or a QArray'):
        ops.dot_general(object(), quant(rand(1, (8, 2)), 'int8'), MK)
    with pytest.raises(TypeError, match='complex dtype'):
        ops.dot_general(jnp.ones((4, 8), jnp.complex64), quant(rand(1, (8, 2)), 'int8'), MK)


def test_einsum_errors():
    q = quant(rand(0, (8, 2)), 'int8')
    with pytest.raises(ValueError, match='name 1 operands but 2'):
        ops.einsum('ij->i', rand(1, (4, 8)), q)
    with pytest.raises(ValueError, match="letter 'j' has size 6"):
        ops.einsum('ij,jk->ik', rand(1, (4, 6)), q)
    with pytest.raises(ValueError, match='not a letter'):
        ops.einsum('i1,jk->ik', rand(1, (4, 8)), q)
    with pytest.raises(ValueError, match='has 3 letters but its operand has 2'):
        ops.einsum('ijl,jk->ik', rand(1, (4, 8)), q)
    with pytest.raises(ValueError, match='appear in no operand'):
        ops.einsum('ij,jk->iz', rand(1, (4, 8)), q)
    with pytest.raises(ValueError, match="'out' argument"):
        ops.einsum('ij,jk->ik', rand(1, (4, 8)), q, out=jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match='at least one operand'):
        ops.einsum('ij')
    with pytest.raises(TypeError, match='subscripts must be a str'):
        ops.einsum(3, q)


def test_matmul_and_dot_errors():
    q = quant(rand(0, (8, 2)), 'int8')
    with pytest.raises(ValueError, match=r"matmul: contracting sizes differ.*a: array.*b: QArray"):
        ops.matmul(rand(1, (4, 6)), q)
    with pytest.raises(ValueError, match='at least 1-D'):
        ops.matmul(jnp.float32(2.0), q)
    with pytest.raises(ValueError, match=r"dot: contracting sizes differ"):
        ops.dot(rand(1, (4, 6)), q)


def test_conv_errors_name_both_layouts():
    x = quant(rand(0, (1, 6, 6, 4)), 'int8')
    w = quant(rand(1, (3, 3, 5, 8)), 'int8', channelwise_axes=(3,))
    with pytest.raises(ValueError, match=r"do not fit.*lhs: QArray\(int8, shape=\(1, 6, 6, 4\).*rhs: QArray"):
        ops.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
