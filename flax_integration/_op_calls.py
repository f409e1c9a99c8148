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
  >>> import jax, jax.numpy as jnp, qarray
  >>> from flax_integration._op_table import dot_general_call
  >>> call = dot_general_call(qarray.dot_general, jax.lax.dot_general, jnp.ones((8, 16)), jnp.ones((16, 4)),
  ...                         (((1,), (0,)), ((), ())))
  >>> call.kept[1], call.contract[1], call.tile_axis[1]
  ((1,), (0,), 0)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from qarray import qtypes


__all__ = ['OpCall', 'Impl']

Impl = Callable[..., jax.Array]  # the qarray.ops function an op table entry names


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
    block_axis: tuple[int | None, int | None] | None = None  # microscaling blocks (default: tile_axis)

    def run(self, lhs: Any, rhs: Any) -> jax.Array:
        """Compute the op on (possibly quantized) operands."""
        return self.runner(lhs, rhs)

    def run_original(self) -> jax.Array:
        """The unmodified jax call (quantized operands are dequantized)."""
        return self.original()

    def layout(self, i: int, role: str, tile_size: int | None,
               batch_axes: tuple[int, ...] | None = None, qtype: Any = None
               ) -> tuple[tuple[int, ...], dict[int, int] | None]:
        """``(channelwise_axes, tiles)`` for operand ``i``.

        ``role`` is ``'weight'``, ``'act'`` (dynamic, per token) or
        ``'static_act'`` (per tensor, or per index of the kept axes not in
        ``batch_axes``). A microscaling ``qtype`` (mxfp8, mxfp4, nvfp4) puts its
        blocks on the contraction axis (a conv weight's input features), every
        other axis per index.
        """
        ndim = len(self.operands[i].shape)
        qt = qtypes.get(qtype) if qtype is not None else None
        if qt is not None and qt.microscaling:
            axis = (self.block_axis or self.tile_axis)[i]
            if role == 'static_act' or axis is None:
                raise ValueError(f"qtype {qt.name!r} quantizes blocks of {qt.block} along the contraction axis; "
                                 f"this {self.name} operand has none{' (or its scale is static)' * (role == 'static_act')}"
                                 ". Use it for weights and dynamic activations of dot_general/einsum/conv.")
            if tile_size is not None and tile_size != qt.block:
                raise ValueError(f"tile_size={tile_size}: {qt.name} has blocks of {qt.block}; drop tile_size.")
            return tuple(a for a in range(ndim) if a != axis), {axis: qt.block}
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
