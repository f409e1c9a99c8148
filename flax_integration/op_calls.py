"""One intercepted op call, in a canonical form a provider can reason about.

An :class:`OpCall` holds the two operands of a ``dot_general``, ``einsum``
or ``conv_general_dilated`` call (user calls to ``jnp.dot``/``jnp.matmul``
become ``dot_general``) and, per operand, which axes are *kept* (they appear
in the output: batch and free axes), which are *contracted*, and the one
contracting axis that sub-channel tiles go on. From that a provider picks
scale layouts without knowing the op:

* weight: one scale per kept index (per output channel), shared or tiled along
  the contracting axes;
* dynamic activation: one scale per kept index (per token), same tiling;
* static activation: shared along every kept axis except those the rule keeps.

:meth:`OpCall.run` runs the op on (possibly quantized) operands through
``qarray.ops``; :meth:`OpCall.run_original` runs the untouched jax function.

Example:
  >>> import jax.numpy as jnp
  >>> call = dot_general_call(jnp.ones((8, 16)), jnp.ones((16, 4)), (((1,), (0,)), ((), ())))
  >>> call.kept[1], call.contract[1], call.tile_axis[1]
  ((1,), (0,), 0)
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from qarray._array import QArray

from flax_integration import ops_bridge
from flax_integration.wrappers import QuantizedParam

__all__ = ['OpCall', 'dot_general_call', 'einsum_call', 'conv_call', 'dot_call', 'matmul_call']


@dataclasses.dataclass
class OpCall:
    """A canonical two-operand op call.

    Attributes:
      name: ``'dot_general'``, ``'einsum'`` or ``'conv_general_dilated'``.
      operands: ``[lhs, rhs]`` as the module passed them (arrays, QArrays, or
        quantized-param wrappers).
      kept: per operand, axes that appear in the output.
      contract: per operand, axes summed away.
      tile_axis: per operand, the contracting axis tiles go on (None: no tiling possible).
      per_channel_only: True for convolutions (weights per output channel,
        activations per tensor: a conv window mixes positions, so per-token
        scales cannot be factored out).
      runner: ``runner(lhs, rhs)`` computes the op via ``qarray.ops``.
      original: ``original()`` runs the unmodified jax call.
    """

    name: str
    operands: list
    kept: tuple[tuple[int, ...], tuple[int, ...]]
    contract: tuple[tuple[int, ...], tuple[int, ...]]
    tile_axis: tuple[int | None, int | None]
    runner: Callable[[Any, Any], jax.Array]
    original: Callable[[], jax.Array]
    per_channel_only: bool = False

    def run(self, lhs: Any, rhs: Any) -> jax.Array:
        """Compute the op on (possibly quantized) operands."""
        return self.runner(lhs, rhs)

    def run_original(self) -> jax.Array:
        """The unmodified jax call (quantized operands are dequantized)."""
        return self.original()

    def layout(self, i: int, role: str, tile_size: int | None,
               batch_axes: tuple[int, ...] | None = None) -> tuple[tuple[int, ...], dict[int, int] | None]:
        """``(channelwise_axes, tiles)`` for operand ``i``.

        ``role`` is ``'weight'``, ``'act'`` (dynamic, per token) or
        ``'static_act'`` (per tensor, or per index of the kept axes not in
        ``batch_axes``).
        """
        ndim = len(self.operands[i].shape)
        tiles = None
        if tile_size is not None and not self.per_channel_only and self.tile_axis[i] is not None:
            tiles = {self.tile_axis[i]: tile_size}
        if self.per_channel_only:
            return (self.kept[i] if role == 'weight' else ()), None
        if role in ('weight', 'act'):
            return self.kept[i], tiles
        if role != 'static_act':
            raise ValueError(f"role must be 'weight', 'act' or 'static_act'; got {role!r}.")
        if batch_axes is None:
            return (), tiles
        batch = {a % ndim for a in batch_axes}
        return tuple(a for a in self.kept[i] if a not in batch), tiles


def _plain(x: Any) -> Any:
    """Dequantize quantized operands (for the original, float op); a rotated param is also unrotated."""
    return x.__jax_array__() if isinstance(x, (QArray, QuantizedParam)) else x


def dot_general_call(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                     original: Callable | None = None, **extra) -> OpCall:
    """Canonicalize ``lax.dot_general`` arguments.

    Example:
      >>> import jax.numpy as jnp
      >>> dot_general_call(jnp.ones((2, 3, 4)), jnp.ones((4, 5)), (((2,), (0,)), ((), ()))).kept[0]
      (0, 1)
    """
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(a) for a in t) for t in (lc, rc, lb, rb))
    nl, nr = len(lhs.shape), len(rhs.shape)
    kept = (tuple(a for a in range(nl) if a not in lc), tuple(a for a in range(nr) if a not in rc))
    tile_axis = (lc[-1], rc[-1]) if lc else (None, None)
    dn = ((lc, rc), (lb, rb))

    def runner(a, b):
        return ops_bridge.dot_general(a, b, dn, precision=precision,
                                      preferred_element_type=preferred_element_type)

    def orig():
        fn = original or ops_bridge.ORIGINAL['dot_general']
        return fn(_plain(lhs), _plain(rhs), dimension_numbers, precision=precision,
                  preferred_element_type=preferred_element_type, **extra)

    return OpCall('dot_general', [lhs, rhs], kept, (lc, rc), tile_axis, runner, orig)


def dot_call(a, b, precision=None, preferred_element_type=None, original=None, **extra) -> OpCall | None:
    """``jnp.dot`` as a dot_general (None for the scalar case, which stays float).

    Example:
      >>> import jax.numpy as jnp
      >>> dot_call(jnp.ones((2, 3)), jnp.ones((3, 4))).contract
      ((1,), (0,))
    """
    na, nb = len(a.shape), len(b.shape)
    if na == 0 or nb == 0:
        return None
    dn = (((na - 1,), (max(nb - 2, 0),)), ((), ()))
    call = dot_general_call(a, b, dn, precision, preferred_element_type)
    fn = original or ops_bridge.ORIGINAL['dot']
    call.original = lambda: fn(_plain(a), _plain(b), precision=precision,
                               preferred_element_type=preferred_element_type, **extra)
    return call


def matmul_call(a, b, precision=None, preferred_element_type=None, original=None, **extra) -> OpCall | None:
    """``jnp.matmul`` as a dot_general when no broadcasting is needed (else None).

    Example:
      >>> import jax.numpy as jnp
      >>> matmul_call(jnp.ones((5, 2, 3)), jnp.ones((5, 3, 4))).kept
      ((0, 1), (0, 2))
    """
    na, nb = len(a.shape), len(b.shape)
    if na == 0 or nb == 0:
        return None
    if nb <= 2:
        dn = (((na - 1,), (0 if nb == 1 else nb - 2,)), ((), ()))
    elif na == nb and a.shape[:-2] == b.shape[:-2]:
        batch = tuple(range(na - 2))
        dn = (((na - 1,), (nb - 2,)), (batch, batch))
    else:
        return None
    call = dot_general_call(a, b, dn, precision, preferred_element_type)
    fn = original or ops_bridge.ORIGINAL['matmul']
    call.original = lambda: fn(_plain(a), _plain(b), precision=precision,
                               preferred_element_type=preferred_element_type, **extra)
    return call


def parse_einsum(subscripts: str, shapes: list[tuple[int, ...]]) -> tuple[list[str], str]:
    """Expand an einsum spec to one letter per axis (ellipses included); returns (inputs, output).

    Example:
      >>> parse_einsum('...d,df->...f', [(2, 3, 4), (4, 5)])
      (['ABd', 'df'], 'ABf')
    """
    spec = subscripts.replace(' ', '')
    ins, arrow, out = spec.partition('->')
    ins = ins.split(',')
    if len(ins) != len(shapes):
        raise ValueError(f"einsum {subscripts!r} names {len(ins)} operands but got {len(shapes)}.")
    free = [c for c in string.ascii_uppercase if c not in spec]
    ell_n = max([len(s) - (len(t) - 3) for t, s in zip(ins, shapes) if '...' in t] or [0])
    ell = ''.join(free[:ell_n])
    expanded = []
    for t, s in zip(ins, shapes):
        if '...' in t:
            n = len(s) - (len(t) - 3)
            t = t.replace('...', ell[ell_n - n:] if n else '')
        expanded.append(t)
    if arrow:
        out = out.replace('...', ell)
    else:  # implicit output: ellipsis axes, then letters used once, sorted
        letters = ''.join(expanded)
        out = ell + ''.join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in ell))
    return expanded, out


def einsum_call(subscripts, *operands, precision=None, preferred_element_type=None,
                original: Callable | None = None, **extra) -> OpCall | None:
    """Canonicalize a two-operand ``jnp.einsum`` with a string spec (else None).

    Example:
      >>> import jax.numpy as jnp
      >>> einsum_call('btd,dnh->btnh', jnp.ones((2, 3, 4)), jnp.ones((4, 2, 5))).tile_axis
      (2, 0)
    """
    if not isinstance(subscripts, str) or len(operands) != 2:
        return None
    lhs, rhs = operands
    (ls, rs), out = parse_einsum(subscripts, [lhs.shape, rhs.shape])
    kept = tuple(tuple(i for i, c in enumerate(s) if c in out) for s in (ls, rs))
    contract = tuple(tuple(i for i, c in enumerate(s) if c not in out) for s in (ls, rs))
    shared = [c for c in rs if c in ls and c not in out]
    tile_axis = (ls.index(shared[-1]), rs.index(shared[-1])) if shared else (None, None)
    extra.pop('_dot_general', None)  # flax passes lax.dot_general here; qarray.ops picks its own path

    def runner(a, b):
        return ops_bridge.einsum(subscripts, a, b, precision=precision,
                                 preferred_element_type=preferred_element_type)

    def orig():
        fn = original or ops_bridge.ORIGINAL['einsum']
        return fn(subscripts, _plain(lhs), _plain(rhs), precision=precision,
                  preferred_element_type=preferred_element_type, **extra)

    return OpCall('einsum', [lhs, rhs], kept, contract, tile_axis, runner, orig)


def conv_call(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
              preferred_element_type=None, original: Callable | None = None, **extra) -> OpCall:
    """Canonicalize ``lax.conv_general_dilated`` arguments.

    Example:
      >>> import jax.numpy as jnp
      >>> c = conv_call(jnp.ones((1, 8, 8, 3)), jnp.ones((3, 3, 3, 4)), (1, 1), 'SAME',
      ...               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      >>> c.kept[1]
      (3,)
    """
    dn = jax.lax.conv_dimension_numbers(tuple(lhs.shape), tuple(rhs.shape), dimension_numbers)
    out_feature = int(dn.rhs_spec[0])
    nl, nr = len(lhs.shape), len(rhs.shape)
    kept = (tuple(range(nl)), (out_feature,))
    contract = ((), tuple(a for a in range(nr) if a != out_feature))
    kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dn,
                  feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                  precision=precision, preferred_element_type=preferred_element_type)

    def runner(a, b):
        return ops_bridge.conv_general_dilated(a, b, window_strides, padding, **kwargs)

    def orig():
        fn = original or ops_bridge.ORIGINAL['conv_general_dilated']
        return fn(_plain(lhs), _plain(rhs), window_strides, padding, **kwargs, **extra)

    return OpCall('conv_general_dilated', [lhs, rhs], kept, contract, (None, None), runner, orig,
                  per_channel_only=True)
