"""``quantize_params``: float params -> quantized params, without running the model.

Three forms:

* **Linen**: ``quantize_params(fp_params, abstract_quantized_params, quant_stats=None)``.
  ``abstract_quantized_params`` is ``jax.eval_shape(ptq_model.init, ...)['params']``;
  each :class:`QuantizedParam` in it says how its float weight is quantized
  (format, channel/tile layout from the scale shape, calibration, packing,
  sharding boxes); each :class:`ActivationScale` is filled from
  ``quant_stats`` (from :func:`flax_integration._calibrate`); other leaves are
  copied from ``fp_params``.
* **NNX**: the same call with the (abstract) quantized model as the second
  argument -- ``nnx.eval_shape(lambda: quantize_model(Model(...), provider, x))``;
  ``fp_params`` is a float model, its ``nnx.State`` or a pure dict. Returns an
  ``nnx.State``: ``nnx.update(abstract_model, state)`` makes the model concrete.
* **Model-free**: ``quantize_params(params, rules)``: each leaf's '/'-joined
  path (``'Dense_0/kernel'``) is matched against the rules' regexes; a matched
  leaf becomes a :class:`qarray.QArray` with one scale per index of its last
  axis, tiled along axis -2 when the rule has ``tile_size`` (the ``(..., in,
  out)`` layout of Dense/Conv kernels). A matched leaf that cannot be
  quantized that way raises ``ValueError`` naming its path. A rule's
  ``weight_tiles`` replaces that layout (the last axis stays per index unless
  tiled): ``{0: 1, -2: 128}`` quantizes an expert stack ``[experts, in, out]``
  per expert, per output column and per 128 inputs, as the model-based forms
  do for ``ragged_dot``; ``{-2: 128, -1: 128}`` stores 128 x 128 blocks. The
  model-based forms take every layout from the op that uses the param
  (embedding tables: one scale per row).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax_integration import QuantizationRule, quantize_params
  >>> q = quantize_params({'Dense_0': {'kernel': jnp.ones((16, 8)), 'bias': jnp.ones(8)}},
  ...                     [QuantizationRule(module_path='.*/kernel', weight_qtype='int4', tile_size=8)])
  >>> q['Dense_0']['kernel'].scale.shape, q['Dense_0']['bias'].shape
  ((2, 8), (8,))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from qarray import _quantize, gptq, qtypes
from qarray import rotation as rotation_lib
from qarray._array import QArray
from qarray.paths import path_name

from flax_integration.providers.base import range_to_scale
from flax_integration.rules import QuantizationRule, RuleSet
from flax_integration.wrappers import ActivationScale, QuantizedParam, QuantStat, unbox_leaves

__all__ = ['quantize_params', 'quantize_like']


def quantize_like(value: jax.Array, abstract: QuantizedParam, path: str = '', hessian: Any = None
                  ) -> QuantizedParam:
    """Quantize ``value`` exactly as the (abstract) quantized param ``abstract`` was.

    The layout (format, channel and tile axes, packing) comes from ``abstract``'s
    QArray; a rotation recorded in ``abstract`` is applied first; a param
    marked for GPTQ is rounded by :func:`qarray.gptq.gptq_quantize` with
    ``hessian`` (the calibration statistic, required then).

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from flax_integration import QuantizedParam
      >>> from flax_integration._quantize_params import quantize_like
      >>> ref = QuantizedParam(qarray.quantize(jnp.ones((8, 4)), 'int4', tiles={0: 4}, channelwise_axes=(1,)))
      >>> quantize_like(jnp.ones((8, 4)), ref).array.scale.shape
      (2, 4)
    """
    a = unbox_leaves(abstract.array)
    shape = tuple(a.shape)
    if tuple(value.shape) != shape:
        raise ValueError(f"param {path!r}: float shape {tuple(value.shape)} does not match the quantized "
                         f"model's {shape}.")
    cw, tiles = a.channelwise_axes, a.tiles
    pack_axis = a.packed_axis if a.packed_axis is not None else -1
    if abstract.rotation is not None:
        axis, block = abstract.rotation
        value = rotation_lib.rotate(value, axis, block=block)
    # The scale format follows the abstract QArray: a format's own (microscaling), a quantized scale's
    # format (double quantization), or the plain scale's dtype.
    nested = isinstance(a.scale, QArray)
    scale_dtype = None if a.qtype.microscaling or nested else a.scale.dtype
    scale_qtype = a.scale.qtype if nested and not a.qtype.microscaling else None
    if abstract.gptq is None:
        q = _quantize.quantize(value, a.qtype, channelwise_axes=cw, tiles=tiles or None,
                               calibration=abstract.calibration, scale_dtype=scale_dtype, pack_axis=pack_axis,
                               scale_qtype=scale_qtype)
    else:
        q = _gptq_like(value, a, abstract, tiles, pack_axis, hessian, path)
    q = q.astype(a.dtype)
    return dataclasses.replace(abstract, array=_rebox(abstract.array, q))


def _gptq_like(value, a: QArray, abstract: QuantizedParam, tiles, pack_axis, hessian, path: str) -> QArray:
    if hessian is None:
        raise ValueError(f"param {path!r} is quantized with weight_algorithm='gptq', which needs its Hessian "
                         f"statistic {abstract.gptq[0]!r}: run calibrate(model, params, batches, rules=rules) "
                         "and pass the result as quantize_params(..., quant_stats).")
    hessian = _calibrated(hessian, f"{abstract.gptq[0]} (GPTQ statistic of {path})")
    h = jnp.asarray(hessian['hessian'], jnp.float32)
    _, axis, damping, *flags = abstract.gptq
    if abstract.rotation is not None:  # the weight is rotated: so are the activations it sees
        h = rotation_lib.rotate_hessian(h, block=abstract.rotation[1])
    return gptq.gptq_quantize(value, h, a.qtype, axis=axis, tile_size=tiles.get(axis),
                              calibration=abstract.calibration, damping=damping,
                              scale_dtype=a.scale.dtype, pack_axis=pack_axis, act_order='act_order' in flags)


def _rebox(abstract_tree: Any, concrete: Any) -> Any:
    """Put ``concrete``'s leaves into the boxes (nn.Partitioned, nnx.Variable) of ``abstract_tree``."""
    def box(abs_leaf, leaf):
        if isinstance(abs_leaf, nn.meta.AxisMetadata):
            return abs_leaf.replace_boxed(leaf)
        if isinstance(abs_leaf, nnx.Variable):
            return abs_leaf.replace(leaf)
        return leaf
    is_box = lambda x: isinstance(x, (nn.meta.AxisMetadata, nnx.Variable))
    return jax.tree.map(box, abstract_tree, concrete, is_leaf=is_box)


def _calibrated(stat: Mapping, what: str) -> Mapping:
    """``stat`` unboxed; a ValueError if it saw no batch (checked when its count is concrete)."""
    stat = unbox_leaves(stat)
    if not isinstance(stat['count'], jax.core.Tracer) and int(stat['count']) == 0:
        raise ValueError(f"quant_stats for {what!r} have count 0: run calibrate(...) on at least one batch.")
    return stat


def _stat_scale(stat: Mapping, abstract: ActivationScale, path: str) -> ActivationScale:
    stat = _calibrated(stat, path)
    abs_plain = unbox_leaves(abstract)
    scale_dtype = getattr(abs_plain.scale, 'dtype', jnp.float32)
    scale, zp = range_to_scale(jnp.asarray(stat['lo']), jnp.asarray(stat['hi']), abstract.qtype,
                               abstract.calibration, scale_dtype)
    if tuple(scale.shape) != tuple(abs_plain.scale.shape):
        raise ValueError(f"quant_stats for {path!r} have shape {tuple(scale.shape)} but the model's static "
                         f"scale has {tuple(abs_plain.scale.shape)}: were they collected with the same rules?")
    out = ActivationScale(scale, zp, abstract.qtype, abstract.calibration)
    if isinstance(abstract.scale, (nn.meta.AxisMetadata, nnx.Variable)):
        out = ActivationScale(_rebox(abstract.scale, scale), None if zp is None else _rebox(abstract.scale, zp),
                              abstract.qtype, abstract.calibration)
    return out


def _hessian(quant_stats: Any, path: tuple, abstract: QuantizedParam) -> Any:
    """The GPTQ statistic of a param (it sits next to the param, named ``abstract.gptq[0]``)."""
    if abstract.gptq is None or quant_stats is None:
        return None
    return _lookup(quant_stats, tuple(path[:-1]) + (abstract.gptq[0],))


def _is_special(x: Any) -> bool:
    return isinstance(x, (QuantizedParam, ActivationScale, QArray))


def _walk(tree: Any, prefix: tuple = ()):
    """Yield (path tuple, value) for dict-like nesting; special wrappers and boxes are leaves."""
    if isinstance(tree, Mapping) or hasattr(tree, 'items') and not _is_special(tree):
        for k, v in tree.items():
            yield from _walk(v, prefix + (k,))
    else:
        yield prefix, tree


def _lookup(tree: Any, path: tuple) -> Any:
    for k in path:
        if tree is None or not hasattr(tree, 'items'):
            return None
        tree = tree.get(k) if hasattr(tree, 'get') else dict(tree.items()).get(k)
    return tree


def _set(tree: dict, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _quantize_tree(fp: Any, abstract: Any, quant_stats: Any, allow_extra: bool) -> dict:
    out: dict = {}
    seen = set()
    for path, abs_leaf in _walk(abstract):
        name = '/'.join(str(p) for p in path)
        plain = unbox_leaves(abs_leaf) if not _is_special(abs_leaf) else abs_leaf
        if isinstance(abs_leaf, ActivationScale):
            stat_path = path[:-1] + (str(path[-1])[:-len('_scale')],)
            stat = _lookup(quant_stats, stat_path) if quant_stats is not None else None
            if stat is not None:
                _set(out, path, _stat_scale(stat, abs_leaf, '/'.join(map(str, stat_path))))
            elif _lookup(fp, path) is not None:
                _set(out, path, _lookup(fp, path))
            else:
                raise ValueError(f"param {name!r} is a static activation scale; pass quant_stats (from "
                                 "calibrate(...)) to quantize_params to set it.")
            seen.add(path)
            continue
        value = _lookup(fp, path)
        if value is None:
            raise ValueError(f"param {name!r} of the quantized model is missing from fp_params.")
        seen.add(path)
        value = unbox_leaves(value)
        if isinstance(abs_leaf, QuantizedParam):
            if isinstance(value, QuantizedParam):  # already quantized
                _set(out, path, value)
            else:
                _set(out, path, quantize_like(jnp.asarray(value), abs_leaf, name,
                                              _hessian(quant_stats, path, abs_leaf)))
        else:
            _check_float_shape(name, value, plain)
            _set(out, path, _rebox(abs_leaf, value) if isinstance(abs_leaf, nn.meta.AxisMetadata) else value)
    if not allow_extra:
        extra = ['/'.join(map(str, p)) for p, _ in _walk(fp) if p not in seen]
        if extra:
            raise ValueError(f"fp_params has params the quantized model does not: {extra[:5]}; pass "
                             "allow_extra_params=True to drop them.")
    return out


def _nnx_pure(x: Any) -> Any:
    if isinstance(x, nnx.Module):
        x = nnx.state(x)
    if isinstance(x, nnx.State):
        x = nnx.to_pure_dict(x)
    return x


def _nnx_quantize(fp: Any, abs_model: nnx.Module, quant_stats: Any, allow_extra: bool) -> nnx.State:
    fp = _nnx_pure(fp)
    quant_stats = _nnx_pure(quant_stats) if quant_stats is not None else None
    state = nnx.state(abs_model)
    filled: dict = {}
    covered = set()
    for path, node in nnx.iter_graph(abs_model):
        name = '/'.join(map(str, path))
        if isinstance(node, QuantizedParam):
            value = _lookup(fp, path)
            if value is None:
                raise ValueError(f"param {name!r} of the quantized model is missing from fp_params.")
            q = quantize_like(jnp.asarray(value), node, name, _hessian(quant_stats, path, node))
            _set(filled, path, {'array': _array_dict(unbox_leaves(q.array))})
            covered.add(path)
        elif isinstance(node, ActivationScale):
            stat_path = path[:-1] + (str(path[-1])[:-len('_scale')],)
            stat = _lookup(quant_stats, stat_path) if quant_stats is not None else None
            if stat is None:
                raise ValueError(f"param {name!r} is a static activation scale; pass quant_stats.")
            s = unbox_leaves(_stat_scale(stat, unbox_leaves(node), name))
            _set(filled, path, {k: v for k, v in (('scale', s.scale), ('zero_point', s.zero_point))
                                if v is not None})
            covered.add(path)
    stats: dict = {}  # QuantStat variables hold a dict each: set whole, from quant_stats or as the model has them
    for path, node in nnx.iter_graph(abs_model):
        if isinstance(node, QuantStat):
            given = _lookup(quant_stats, path) if quant_stats is not None else None
            stats[path] = node.get_value() if given is None else given
            covered.add(path)
    for path, leaf in _walk(nnx.to_pure_dict(state)):
        if any(path[:len(c)] == c for c in covered):
            continue
        value = _lookup(fp, path)
        if value is None:
            raise ValueError(f"state {'/'.join(map(str, path))!r} of the quantized model is missing from fp_params.")
        _check_float_shape('/'.join(map(str, path)), value, leaf)
        _set(filled, path, value)
    nnx.replace_by_pure_dict(state, filled)
    for path, value in stats.items():
        node = state
        for k in path:
            node = node[k]
        node.set_value(jax.tree.map(jnp.asarray, dict(value)))
    return state


def _check_float_shape(name: str, value: Any, abstract: Any) -> None:
    """A float param must have the shape the quantized model declares (else Flax fails later, unnamed)."""
    want, got = getattr(abstract, 'shape', None), getattr(unbox_leaves(value), 'shape', None)
    if want is not None and got is not None and tuple(want) != tuple(got):
        raise ValueError(f"param {name!r}: fp_params has shape {tuple(got)} but the quantized model's is "
                         f"{tuple(want)}; were the float params made for the same model?")


def _array_dict(q: QArray) -> dict:
    # a quantized scale or zero point (double quantization, nvfp4's two-level scale) nests as its own dict
    part = lambda a: _array_dict(a) if isinstance(a, QArray) else a
    d = {'qvalue': q.qvalue, 'scale': part(q.scale)}
    if q.zero_point is not None:
        d['zero_point'] = part(q.zero_point)
    return d


def _model_free(params: Any, rules: Sequence[QuantizationRule]) -> Any:
    rs = RuleSet(rules)

    def quantize_leaf(path, leaf):
        name = path_name(path)
        rule = rs.match(name)
        if rule is None or rule.weight_qtype is None:
            return leaf
        if rule.transforms_weights:
            raise ValueError(f"param {name!r}: rule module_path={rule.module_path!r} sets "
                             f"weight_algorithm={rule.weight_algorithm!r}, rotation={rule.rotation!r}; those need the "
                             "model (activations are rotated at run time, GPTQ needs calibration statistics): use "
                             "quantize_params(fp_params, abstract_quantized_params, quant_stats).")
        x = jnp.asarray(leaf)
        if x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"param {name!r} (shape {x.shape}, dtype {x.dtype}) matches rule "
                             f"module_path={rule.module_path!r} but only floating arrays with 2+ dims can be "
                             "quantized; narrow the regex (e.g. '.*/kernel').")
        tiles = {x.ndim - 2: rule.tile_size} if rule.tile_size else None
        if qtypes.get(rule.weight_qtype).microscaling:  # blocks on the contraction axis of a [..., in, out] kernel
            tiles = {x.ndim - 2: qtypes.get(rule.weight_qtype).block}
        channelwise = (x.ndim - 1,)
        if rule.weight_tiles is not None:  # the rule's own blocks (e.g. {0: 1}: one scale set per expert)
            tiles = rule.weight_tiles_for(x.ndim, f"param {name!r} (shape {x.shape})")
            channelwise = tuple(a for a in channelwise if a not in tiles)
        try:
            return _quantize.quantize(x, rule.weight_qtype, channelwise_axes=channelwise, tiles=tiles,
                                      calibration=rule.weight_calibration_method, scale_qtype=rule.weight_scale_qtype)
        except (ValueError, TypeError) as e:
            e.add_note(f"While quantizing param {name!r} (shape {x.shape}) by rule module_path={rule.module_path!r}.")
            raise

    out = jax.tree_util.tree_map_with_path(quantize_leaf, params)
    rs.warn_unused('quantize_params(params, rules)', stacklevel=3)
    return out


def quantize_params(fp_params: Any, abstract_quantized_params: Any, quant_stats: Any = None, *,
                    allow_extra_params: bool = False) -> Any:
    """Quantize float params for a quantized model, or by rules alone (see module docstring).

    Args:
      fp_params: float params (Linen: the ``'params'`` dict, boxed or not; NNX:
        a float model, its state, or a pure dict; model-free: any pytree).
      abstract_quantized_params: Linen: ``jax.eval_shape(ptq_model.init, ...)['params']``;
        NNX: the (abstract) quantized model; model-free: a list of
        :class:`QuantizationRule`.
      quant_stats: calibration statistics for static activation scales.
      allow_extra_params: drop float params the quantized model does not have
        (otherwise that is an error).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> import flax_integration as fi
      >>> ptq = fi.quantize_model(nn.Dense(4), fi.PtqProvider([fi.QuantizationRule(weight_qtype='int8')]))
      >>> abstract = jax.eval_shape(ptq.init, jax.random.key(0), jnp.ones((1, 8)))['params']
      >>> fp = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 8)))['params']
      >>> fi.quantize_params(fp, abstract)['kernel'].array.qvalue.dtype
      dtype('int8')
    """
    if isinstance(abstract_quantized_params, QuantizationRule) or (
            isinstance(abstract_quantized_params, (list, tuple)) and abstract_quantized_params
            and all(isinstance(r, QuantizationRule) for r in abstract_quantized_params)):
        if quant_stats is not None:
            raise ValueError("quant_stats: the model-free form quantize_params(params, rules) quantizes weights "
                             "only; static activation scales need the model's abstract params.")
        return _model_free(fp_params, abstract_quantized_params)
    if isinstance(abstract_quantized_params, nnx.Module):
        return _nnx_quantize(fp_params, abstract_quantized_params, quant_stats, allow_extra_params)
    if not hasattr(abstract_quantized_params, 'items'):
        raise TypeError("abstract_quantized_params must be the quantized model's (abstract) params dict, an NNX "
                        "quantized model, or a list of QuantizationRule; got "
                        f"{type(abstract_quantized_params).__name__}.")
    return _quantize_tree(fp_params, abstract_quantized_params, quant_stats, allow_extra_params)
