"""Sharding QArrays on a device mesh (JAX SPMD: ``Mesh``, ``NamedSharding``, ``jit``).

A QArray's leaves (``qvalue``, ``scale``, ``zero_point``) get their layout
from the layout of the float array they stand for, axis by axis:

* **values** shard exactly like the float array, except on the **packed
  axis** of a sub-byte format: that axis keeps its mesh axes only when every
  shard holds a whole number of bytes, i.e. ``(size / shards) * bits % 8 == 0``
  (int4 needs an even shard length, int3 a multiple of 8). Otherwise ``qvalue``
  is replicated along those mesh axes. Pack along an axis that is not sharded
  (``pack_axis=``), or pick shard sizes that satisfy the rule, to avoid that.
* **scales and zero points**: a scale axis of size 1 (shared) is replicated;
  a per-channel axis shards with its values; a tiled axis shards with its
  values when every shard holds whole tiles (the tile divides the shard),
  and is replicated otherwise (scales are small; values still stay sharded).

Example:
  >>> import jax, jax.numpy as jnp, qarray
  >>> from jax.sharding import PartitionSpec as P
  >>> q = qarray.quantize(jnp.ones((8, 16)), 'int4', channelwise_axes=(1,))
  >>> specs = qarray.sharding.partition_specs(q, P(None, 'model'), {'model': 4})
  >>> tuple(specs.qvalue), tuple(specs.scale)
  ((None, 'model'), (None, 'model'))
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
from jax.sharding import NamedSharding, PartitionSpec

from qarray import _quantize
from qarray._array import QArray

__all__ = ['partition_specs', 'shardings', 'tree_shardings', 'quantize', 'shard', 'constrain']


def _mesh_sizes(mesh: Any) -> Mapping[str, int]:
    if isinstance(mesh, Mapping):
        return mesh
    return dict(mesh.shape)


def _entry_size(entry: Any, sizes: Mapping[str, int]) -> int:
    """Number of shards one PartitionSpec entry cuts its axis into."""
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    try:
        return math.prod(sizes[n] for n in names)
    except KeyError as e:
        raise ValueError(f"spec names mesh axis {e.args[0]!r}, which the mesh lacks; mesh axes are "
                         f"{tuple(sizes)}.") from None


def _padded_spec(spec: PartitionSpec | None, ndim: int) -> list[Any]:
    entries = list(spec) if spec is not None else []
    if len(entries) > ndim:
        raise ValueError(f"spec {spec} has {len(entries)} entries but the array has only {ndim} axes.")
    return entries + [None] * (ndim - len(entries))


def partition_specs(q: QArray, spec: PartitionSpec | None, mesh: Any) -> QArray:
    """PartitionSpecs for ``q``'s leaves, given the spec of the float array it stands for.

    Args:
      q: a QArray (concrete or abstract, e.g. from ``jax.eval_shape``).
      spec: the float array's ``PartitionSpec`` (logical axes).
      mesh: a ``Mesh``/``AbstractMesh`` or a mapping ``{axis name: size}``.

    Returns:
      A QArray-shaped pytree whose leaves are ``PartitionSpec``s (``zero_point``
      stays None when ``q`` has none); see the module docstring for the rule.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from jax.sharding import PartitionSpec as P
      >>> q = qarray.quantize(jnp.ones((8, 256)), 'int8', tiles=128)
      >>> tuple(qarray.sharding.partition_specs(q, P('data', 'model'), {'data': 2, 'model': 4}).scale)
      ('data', None)
    """
    if not isinstance(q, QArray):
        raise TypeError(f"q must be a QArray; got {type(q).__name__}.")
    sizes = _mesh_sizes(mesh)
    shape, scale_shape = q.shape, q.scale.shape
    entries = _padded_spec(spec, len(shape))
    packed = None if q.packed_axis is None else q.packed_axis % len(shape)
    value_spec, scale_spec = [], []
    for axis, (n, s, entry) in enumerate(zip(shape, scale_shape, entries)):
        k = _entry_size(entry, sizes)
        even = n % k == 0
        whole_bytes = axis != packed or (even and (n // k) * q.qtype.bits % 8 == 0)
        value_spec.append(entry if even and whole_bytes else None)
        scale_spec.append(entry if s > 1 and s % k == 0 and even else None)
    vs, ss = PartitionSpec(*value_spec), PartitionSpec(*scale_spec)

    def part(x: Any) -> Any:  # a quantized scale / zero point follows the same rule, from the scale's spec
        if x is None:
            return None
        return partition_specs(x, ss, mesh) if isinstance(x, QArray) else ss

    return q.replace(qvalue=vs, scale=part(q.scale), zero_point=part(q.zero_point))


def shardings(q: QArray, sharding: NamedSharding) -> QArray:
    """``NamedSharding``s for ``q``'s leaves, from the float array's ``sharding``.

    Use the result as ``jax.device_put``'s target, a ``jit`` in/out sharding,
    or an Orbax restore target.

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ('model',))
      >>> q = qarray.quantize(jnp.ones((4, 8)), 'int4')
      >>> tuple(qarray.sharding.shardings(q, NamedSharding(mesh, P(None, 'model'))).qvalue.spec)
      (None, 'model')
    """
    if not isinstance(sharding, NamedSharding):
        raise TypeError(f"sharding must be a jax.sharding.NamedSharding; got {type(sharding).__name__}.")
    specs = partition_specs(q, sharding.spec, sharding.mesh)
    return jax.tree.map(lambda s: NamedSharding(sharding.mesh, s, memory_kind=sharding.memory_kind), specs,
                        is_leaf=lambda s: isinstance(s, PartitionSpec))


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, (PartitionSpec, NamedSharding))


def tree_shardings(tree: Any, float_shardings: Any, mesh: Any = None) -> Any:
    """Map a tree of float-param shardings onto a tree that holds QArrays.

    ``float_shardings`` has the structure of the float params (leaves:
    ``NamedSharding`` or ``PartitionSpec``; specs need ``mesh``). Where
    ``tree`` holds a QArray (or a wrapper around one, such as a Flax
    ``QuantizedParam``), the result holds its per-leaf shardings (see
    :func:`shardings`); elsewhere the float sharding is kept. Use it with
    ``nn.get_partition_spec`` / ``nnx.get_partition_spec`` of the float model.

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> from jax.sharding import PartitionSpec as P
      >>> params = {'w': qarray.quantize(jnp.ones((4, 8)), 'int8', channelwise_axes=(1,)), 'b': jnp.ones(8)}
      >>> out = qarray.sharding.tree_shardings(params, {'w': P(None, 'm'), 'b': P('m')}, {'m': 2})
      >>> tuple(out['w'].scale), tuple(out['b'])
      ((None, 'm'), ('m',))
    """

    def for_leaf(fs, leaf):
        if not isinstance(leaf, QArray):
            return fs
        if isinstance(fs, NamedSharding):
            return shardings(leaf, fs)
        if fs is None or isinstance(fs, PartitionSpec):
            if mesh is None:
                raise ValueError("float_shardings holds PartitionSpecs; pass mesh= to size them.")
            return partition_specs(leaf, fs, mesh)
        raise TypeError(f"float_shardings leaves must be NamedSharding or PartitionSpec; got {fs!r}.")

    def one(fs, sub):
        return jax.tree.map(lambda leaf: for_leaf(fs, leaf), sub, is_leaf=lambda x: isinstance(x, QArray))

    return jax.tree.map(one, float_shardings, tree, is_leaf=_is_spec_leaf)


def _has_explicit_axes(mesh: Any) -> bool:
    types = getattr(mesh, 'axis_types', ())
    return any(getattr(t, 'name', str(t)) == 'Explicit' for t in types)


def _input_sharding(x: Any) -> NamedSharding | None:
    if isinstance(x, jax.core.Tracer):
        sh = getattr(jax.typeof(x), 'sharding', None)
        if isinstance(sh, NamedSharding) and _has_explicit_axes(sh.mesh):
            return sh
        return None
    sh = getattr(x, 'sharding', None)
    return sh if isinstance(sh, NamedSharding) else None


def quantize(x: Any, qtype: Any, *, sharding: NamedSharding | None = None, **kwargs: Any) -> QArray:
    """:func:`qarray.quantize` that places values and scales by the sharding rule.

    The quantization runs as one SPMD program on the devices that hold ``x``:
    no device receives the whole array (calibration reductions over a sharded
    axis become an all-reduce of per-shard statistics). ``sharding`` is the
    float array's ``NamedSharding``; by default ``x``'s own. Works eagerly and
    inside ``jit``, on meshes with ``Auto`` or ``Explicit`` axes.

    Args:
      x: float array, typically already sharded.
      qtype: format, as for :func:`qarray.quantize`.
      sharding: layout of ``x`` (needed inside ``jit`` on ``Auto`` meshes).
      **kwargs: any other :func:`qarray.quantize` argument (tiles, pack_axis, ...).

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ('model',))
      >>> x = jax.device_put(jnp.ones((4, 8)), NamedSharding(mesh, P(None, 'model')))
      >>> tuple(qarray.sharding.quantize(x, 'int4', channelwise_axes=(1,)).scale.sharding.spec)
      (None, 'model')
    """
    if sharding is None:
        sharding = _input_sharding(x)
    elif not isinstance(sharding, NamedSharding):
        raise TypeError(f"sharding must be a jax.sharding.NamedSharding or None; got {type(sharding).__name__}.")

    def quant(v):
        return _quantize.quantize(v, qtype, **kwargs)

    if sharding is None:
        return quant(x)
    abstract = jax.eval_shape(quant, jax.ShapeDtypeStruct(x.shape, x.dtype))
    target = shardings(abstract, sharding)
    if _has_explicit_axes(sharding.mesh):
        # Explicit axes reject reshapes whose output sharding is ambiguous (tiles spanning
        # shards, packing); let the partitioner choose inside, and fix only the outputs.
        return jax.sharding.auto_axes(quant, out_sharding=target)(x)
    if isinstance(x, jax.core.Tracer):
        return jax.lax.with_sharding_constraint(quant(x), target)
    return jax.jit(quant, out_shardings=target)(x)


def shard(q: QArray, sharding: NamedSharding) -> QArray:
    """Place an existing QArray on a mesh by the float array's ``sharding``.

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ('data',))
      >>> q = qarray.sharding.shard(qarray.quantize(jnp.ones((4, 8)), 'nf4', tiles=4), NamedSharding(mesh, P('data')))
      >>> tuple(q.qvalue.sharding.spec)
      ('data', None)
    """
    return jax.device_put(q, shardings(q, sharding))


def constrain(q: QArray, sharding: NamedSharding) -> QArray:
    """``with_sharding_constraint`` for a QArray, laid out by the float array's ``sharding``.

    Inside ``jit`` this decides where the quantized form moves. E.g. an FSDP
    weight constrained to be replicated right before its matmul is all-gathered
    as packed values + scales (int4: ~1/6 of the float bytes) instead of XLA
    dequantizing each shard and gathering floats.

    Example:
      >>> import jax, jax.numpy as jnp, qarray
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ('data',))
      >>> q = qarray.quantize(jnp.ones((4, 8)), 'int4')
      >>> jax.jit(lambda q: qarray.sharding.constrain(q, NamedSharding(mesh, P())))(q).qvalue.shape
      (4, 4)
    """
    return jax.lax.with_sharding_constraint(q, shardings(q, sharding))
