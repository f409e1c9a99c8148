"""Pytrees stored in a quantized model's params: weights and static activation scales.

* :class:`QuantizedParam` — a quantized weight: ``.array`` is the
  :class:`qarray.QArray`; the calibration method used is kept as static
  metadata so :func:`~flax_integration._quantize_params` can re-quantize float
  weights exactly as the model did, from the abstract params alone.
* :class:`ActivationScale` — a static activation scale (and zero point) for
  one operand of one op, with its format.

Both are registered as JAX pytrees and as NNX data, and their leaves may be
boxed (``nn.Partitioned``, ``nnx.Param``) to carry sharding annotations:
:func:`box_like` copies a float param's annotation onto each leaf by the
layout rule of :mod:`qarray.sharding` (values, the packed axis included, keep
the float param's mesh axes; scales keep them on per-channel and tiled axes).
Without known mesh sizes the names are kept as they are: choose shard sizes
that hold whole bytes and whole tiles, or use
:func:`qarray.sharding.tree_shardings` with the mesh.

Example:
  >>> import jax.numpy as jnp, qarray
  >>> from flax_integration import QuantizedParam
  >>> p = QuantizedParam(qarray.quantize(jnp.ones((4, 8)), 'int8', channelwise_axes=(1,)))
  >>> p.shape, p.array.scale.shape
  ((4, 8), (1, 8))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec

from qarray import rotation as rotation_lib
from qarray import sharding
from qarray._array import QArray

__all__ = ['QuantizedParam', 'ActivationScale', 'QuantStat', 'box_like', 'unbox_leaves', 'as_float', 'as_operand']


def _unwrap_variables(tree: Any, key: Any) -> Any:
    if key is not Ellipsis and key != ():
        raise TypeError(f"a quantized param can only be read whole (param[...]); got index {key!r}.")
    return jax.tree.map(lambda v: v[...] if isinstance(v, nnx.Variable) else v, tree,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))


def unbox_leaves(tree: Any) -> Any:
    """Strip ``nn.meta.AxisMetadata`` boxes and ``nnx.Variable`` wrappers from every leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from flax_integration.wrappers import unbox_leaves
      >>> unbox_leaves({'a': nn.Partitioned(jnp.ones(2), names=('x',))})['a'].shape
      (2,)
    """
    def unbox(v):
        if isinstance(v, nn.meta.AxisMetadata):
            return v.unbox()
        if isinstance(v, nnx.Variable):
            return v.get_value()
        return v
    return jax.tree.map(unbox, tree,
                        is_leaf=lambda v: isinstance(v, (nn.meta.AxisMetadata, nnx.Variable)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedParam:
    """A quantized weight in a model's params; ``.array`` is the QArray.

    Array-like enough for module code: ``shape``, ``ndim``, ``dtype``,
    ``param[...]`` (NNX reads), ``astype``/``reshape``/``T`` (stay quantized),
    and ``__jax_array__`` (dequantizes, and undoes a rotation) for non-matmul uses.

    Static metadata (so ``quantize_params`` can redo it from abstract params):

    * ``calibration``: the weight calibration spec;
    * ``rotation``: None, or ``(axis, block)``: ``array`` holds the weight
      rotated along ``axis`` by :func:`qarray.rotation.rotate` with that block
      (the model rotates the activation to match);
    * ``gptq``: None, or ``(statistic, axis, damping)``: round with GPTQ from
      the Hessian statistic of that name (next to this param in
      ``quant_stats``), along contracting ``axis``, with that damping; a 4th
      entry ``'act_order'`` rounds in act order (rule ``gptq_act_order``).

    ``qarray.io`` records and checks these fields (``checkpoint_fields``), so a
    checkpoint restores only into params quantized the same way.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from flax_integration import QuantizedParam
      >>> p = QuantizedParam(qarray.quantize(jnp.ones((4, 8)), 'int4', channelwise_axes=(1,)))
      >>> p.astype(jnp.bfloat16).dtype
      dtype(bfloat16)
    """

    array: QArray
    calibration: str = dataclasses.field(default='absmax', metadata=dict(static=True))
    rotation: tuple[int, int] | None = dataclasses.field(default=None, metadata=dict(static=True))
    gptq: tuple | None = dataclasses.field(default=None, metadata=dict(static=True))

    checkpoint_fields = ('calibration', 'rotation', 'gptq')  # static fields qarray.io saves and checks

    def __getitem__(self, key: Any) -> 'QuantizedParam':
        return _unwrap_variables(self, key)

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape (of the float weight it stands for).

        Example:
          >>> import jax.numpy as jnp, qarray
          >>> from flax_integration import QuantizedParam
          >>> QuantizedParam(qarray.quantize(jnp.ones((4, 8)), 'int4')).shape
          (4, 8)
        """
        return unbox_leaves(self.array).shape

    @property
    def ndim(self) -> int:
        """Number of axes of the weight.

        Example:
          >>> import jax.numpy as jnp, qarray
          >>> from flax_integration import QuantizedParam
          >>> QuantizedParam(qarray.quantize(jnp.ones((4, 8)), 'int8')).ndim
          2
        """
        return len(self.shape)

    @property
    def dtype(self):
        """The float dtype the weight dequantizes to (not the dtype of its codes).

        Example:
          >>> import jax.numpy as jnp, qarray
          >>> from flax_integration import QuantizedParam
          >>> p = QuantizedParam(qarray.quantize(jnp.ones((4, 8), jnp.bfloat16), 'int8'))
          >>> p.dtype, p.array.qvalue.dtype
          (dtype(bfloat16), dtype('int8'))
        """
        return self.array.dtype

    def astype(self, dtype: Any) -> 'QuantizedParam':
        """Still quantized, with a new output dtype (as :meth:`qarray.QArray.astype`).

        Example:
          >>> import jax.numpy as jnp, qarray
          >>> from flax_integration import QuantizedParam
          >>> w = QuantizedParam(qarray.quantize(jnp.ones((4, 8)), 'int8')).astype(jnp.bfloat16)
          >>> type(w).__name__, w.dtype, w.array.qvalue.dtype
          ('QuantizedParam', dtype(bfloat16), dtype('int8'))
        """
        return dataclasses.replace(self, array=unbox_leaves(self.array).astype(dtype))

    def reshape(self, *shape: Any) -> 'QuantizedParam':
        """Still quantized, reshaped as :meth:`qarray.QArray.reshape` allows (scales follow; a weight stored
        rotated cannot be reshaped).

        Example:
          >>> import jax.numpy as jnp, qarray
          >>> from flax_integration import QuantizedParam
          >>> p = QuantizedParam(qarray.quantize(jnp.ones((2, 3, 8)), 'int8', channelwise_axes=(2,)))
          >>> p.reshape(6, 8).shape, p.reshape(6, 8).array.scale.shape
          ((6, 8), (1, 8))
        """
        if self.rotation is not None:
            raise ValueError(f"a weight stored rotated along axis {self.rotation[0]} cannot be reshaped (the "
                             "rotation follows that axis); use it as stored or quantize without rotation.")
        return dataclasses.replace(self, array=unbox_leaves(self.array).reshape(*shape))

    def transpose(self, *axes: int) -> 'QuantizedParam':
        """Still quantized, with axes permuted (all reversed when none are given); the recorded rotation
        and GPTQ axes move with them.

        Example:
          >>> import jax.numpy as jnp, qarray
          >>> from flax_integration import QuantizedParam
          >>> p = QuantizedParam(qarray.quantize(jnp.ones((8, 4)), 'int8'), rotation=(0, 8))
          >>> t = p.transpose(1, 0)
          >>> t.shape, t.rotation
          ((4, 8), (1, 8))
        """
        array = unbox_leaves(self.array).transpose(*axes)
        order = list(axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes)
        order = [a % self.ndim for a in order] or list(range(self.ndim))[::-1]
        # Axes recorded for rotation and GPTQ move with the transpose.
        rotation = None if self.rotation is None else (order.index(self.rotation[0]), self.rotation[1])
        gptq = None if self.gptq is None else (self.gptq[0], order.index(self.gptq[1])) + tuple(self.gptq[2:])
        return dataclasses.replace(self, array=array, rotation=rotation, gptq=gptq)

    @property
    def T(self) -> 'QuantizedParam':
        """``transpose()``: all axes reversed, still quantized.

        Example:
          >>> import jax.numpy as jnp, qarray
          >>> from flax_integration import QuantizedParam
          >>> w = QuantizedParam(qarray.quantize(jnp.ones((4, 8)), 'int8', channelwise_axes=(1,))).T
          >>> w.shape, w.array.scale.shape
          ((8, 4), (8, 1))
        """
        return self.transpose()

    def __jax_array__(self) -> jax.Array:
        value = unbox_leaves(self.array).__jax_array__()
        if self.rotation is not None:
            value = rotation_lib.unrotate(value, self.rotation[0], block=self.rotation[1])
        return value


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ActivationScale:
    """A static activation scale (and zero point or None) with its format.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax_integration import ActivationScale
      >>> ActivationScale(jnp.ones((1, 1)), None, 'int8').qtype
      'int8'
    """

    scale: Any
    zero_point: Any = None
    qtype: str = dataclasses.field(default='int8', metadata=dict(static=True))
    calibration: str = dataclasses.field(default='absmax', metadata=dict(static=True))

    def __getitem__(self, key: Any) -> 'ActivationScale':
        return _unwrap_variables(self, key)


nnx.register_data_type(QuantizedParam)
nnx.register_data_type(ActivationScale)


class QuantStat(nnx.Variable):
    """NNX variable type for calibration statistics (the ``quant_stats`` collection).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax_integration import QuantStat
      >>> QuantStat({'count': jnp.zeros((), jnp.int32)}).get_value()['count'].dtype
      dtype('int32')
    """


try:  # another library may have named the collection first; NNX then keeps its type
    nnx.variablelib.variable_type_from_name('quant_stats', allow_register=False)
except ValueError:
    nnx.register_variable_name('quant_stats', QuantStat)


def as_float(x: Any) -> Any:
    """``x`` as a plain float array: a QArray dequantized, a ``QuantizedParam`` dequantized *and
    unrotated* (see ``QuantizedParam.rotation``), boxes removed; anything else unchanged.

    The one "use it as float" conversion: the float fallback of an op nobody
    quantizes, LoRA export, and every other place that needs the real values.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from flax_integration.wrappers import QuantizedParam, as_float
      >>> w = QuantizedParam(qarray.quantize(jnp.array([[0.5, -1.0]]), 'int8'))
      >>> as_float(w).round(2).tolist()  # dequantized: within one int8 step of the input
      [[0.5, -1.0]]
    """
    x = unbox_leaves(x) if isinstance(x, (nn.meta.AxisMetadata, nnx.Variable)) else x
    if isinstance(x, (QuantizedParam, QArray)):
        return x.__jax_array__()
    return x


def as_operand(x: Any) -> Any:
    """What an op computes with: a ``QuantizedParam`` becomes its QArray -- or, if stored rotated, its
    float, unrotated value (the rotated QArray is only right where the activation is rotated to match);
    anything else is returned unchanged.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from flax_integration.wrappers import QuantizedParam, as_operand
      >>> type(as_operand(QuantizedParam(qarray.quantize(jnp.ones((2, 2)), 'int8')))).__name__
      'QArray'
    """
    if isinstance(x, QuantizedParam):
        return as_float(x) if x.rotation is not None else unbox_leaves(x.array)
    return x

_NNX_SHARDING_KEYS = ('sharding', 'sharding_names', 'out_sharding')


def _leaf_names(names: Any, leaf_shape: tuple[int, ...], full_shape: tuple[int, ...]) -> Any:
    """Mesh-axis names for a scale/zero-point leaf: only full-size (per-channel) axes keep theirs."""
    if names is None:
        return None
    names = tuple(names)
    if len(names) != len(leaf_shape):
        return names
    return tuple(n if s == f and s > 1 else None for n, s, f in zip(names, leaf_shape, full_shape))


class _AnySize(dict):
    """Mesh sizes when none is known: every named axis counts as one shard."""

    def __missing__(self, key: Any) -> int:
        return 1


def _mesh_sizes(mesh: Any, names: tuple) -> dict:
    """Sizes of the mesh axes ``names`` refer to: from ``mesh`` (the box's), else the ambient mesh
    (``jax.set_mesh``); ``_AnySize`` when unknown or when the names are logical (not mesh axes)."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    shape = dict(getattr(mesh, 'shape', None) or {})
    used = {n for e in names if e is not None for n in (e if isinstance(e, tuple) else (e,))}
    return shape if shape and used <= set(shape) else _AnySize()


def _tree_names(tree: Any, names: Any, full_shape: tuple[int, ...], mesh: Any) -> Any:
    """Per-leaf mesh-axis names for ``tree`` (a QArray: by :func:`qarray.sharding.partition_specs`)."""
    names = tuple(names)
    if isinstance(tree, QArray) and len(names) == tree.ndim:
        specs = sharding.partition_specs(tree, PartitionSpec(*names), _mesh_sizes(mesh, names))
        return jax.tree.map(tuple, specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
    return jax.tree.map(lambda leaf: _leaf_names(names, leaf.shape, full_shape), tree)


def box_like(original: Any, tree: Any, full_shape: tuple[int, ...]) -> Any:
    """Box each array leaf of ``tree`` the way ``original`` (a float param) was boxed.

    ``original`` is an ``nn.meta.AxisMetadata`` box (Linen), an ``nnx.Variable``
    (NNX), or a plain array (no boxing). For a QArray the mesh-axis names
    follow :func:`qarray.sharding.partition_specs`: values keep the float
    param's names (the bit-packed axis too); scales keep them on per-channel
    axes and on tiled axes, and drop them on shared (size 1) axes.

    Where the mesh sizes are known -- the box's ``mesh``, or the mesh set with
    ``jax.set_mesh`` while the model is quantized -- the packed axis keeps its
    mesh axis only when every shard holds whole bytes, and a tiled scale axis
    only when the tile divides the shard. Where they are not (plain names, or
    logical names such as ``nn.LogicallyPartitioned``'s), the names are kept,
    and the user must pick a mesh on which each shard of a packed axis holds
    whole bytes (e.g. int4: an even shard length) and each shard of a tiled
    axis whole tiles -- or compute the layout for the actual mesh with
    :func:`qarray.sharding.tree_shardings` (float model's partition specs in,
    per-leaf specs out).

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from flax import linen as nn
      >>> from flax_integration.wrappers import box_like
      >>> box = nn.Partitioned(jnp.ones((4, 8)), names=('a', 'b'))
      >>> q = qarray.quantize(jnp.ones((4, 8)), 'int4', channelwise_axes=(1,))
      >>> boxed = box_like(box, q, (4, 8))
      >>> boxed.qvalue.names, boxed.scale.names
      (('a', 'b'), (None, 'b'))
    """
    if isinstance(original, nn.meta.AxisMetadata):
        names = getattr(original, 'names', None)
        if names is None or not dataclasses.is_dataclass(original):
            return jax.tree.map(original.replace_boxed, tree)
        per_leaf = _per_leaf(tree, _tree_names(tree, names, full_shape, getattr(original, 'mesh', None)))
        return _rebuild(tree, lambda i, leaf: dataclasses.replace(original, value=leaf, names=per_leaf[i]))
    if isinstance(original, nnx.Variable):
        meta = dict(original.get_metadata())
        keys = [k for k in _NNX_SHARDING_KEYS if k in meta and meta[k] is not None and not callable(meta[k])]
        per_key = {k: _per_leaf(tree, _tree_names(tree, meta[k], full_shape, meta.get('mesh'))) for k in keys}
        return _rebuild(tree, lambda i, leaf: original.replace(leaf, **{k: per_key[k][i] for k in keys}))
    return tree


def _per_leaf(tree: Any, names_tree: Any) -> list:
    """``names_tree`` (shaped like ``tree``, tuples at its leaves) as a list in ``tree``'s leaf order."""
    return jax.tree.structure(tree).flatten_up_to(names_tree)


def _rebuild(tree: Any, make: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([make(i, leaf) for i, leaf in enumerate(leaves)])
