"""The private JAX attributes the library patches, in one place, checked against the installed JAX.

JAX has no public hook for Python operators on arrays, and the ODML provider
must see ``a + b``, ``a * b`` and ``x.reshape(...)`` between activations (LiteRT
needs quantization parameters on their outputs). Traced arrays dispatch these
through ``ShapedArray._add`` / ``_radd`` / ``_mul`` / ``_rmul`` (static
methods) and ``ShapedArray.reshape`` (an ``aval_method``); concrete arrays
through ``ArrayImpl.__add__`` and friends. Nothing else in the library touches
JAX internals.

:func:`check` verifies that each of these still exists in the installed JAX
with the expected kind (static method, ``aval_method``, plain function) and
raises a ``RuntimeError`` naming what moved; ``tests/flax_integration/
test_jax_private.py`` also checks that patching them really intercepts the
operators, so a JAX upgrade that moves them fails loudly there, not silently in
a converted model. Checked with JAX 0.6 through 0.10.

Example:
  >>> from flax_integration import _jax_private
  >>> sorted(_jax_private.operator_targets())
  ['add', 'mul', 'reshape']
"""

from __future__ import annotations

import functools

import jax
from jax._src import core as _jax_core
from jax._src.array import ArrayImpl

from flax_integration._interception import Target

__all__ = ['TESTED_JAX', 'check', 'operator_targets']

TESTED_JAX = ('0.6', '0.10')  # oldest and newest minor versions the checks below were run against

_STATIC = (('_add', 'add'), ('_radd', 'add'), ('_mul', 'mul'), ('_rmul', 'mul'))
_ARRAY = (('__add__', 'add'), ('__radd__', 'add'), ('__mul__', 'mul'), ('__rmul__', 'mul'), ('reshape', 'reshape'))


def _problems() -> list[str]:
    out = []
    shaped = vars(_jax_core.ShapedArray)
    for attr, _ in _STATIC:
        if not isinstance(shaped.get(attr), staticmethod):
            out.append(f"jax._src.core.ShapedArray.{attr} is no longer a staticmethod")
    if not hasattr(shaped.get('reshape'), 'fun') or not hasattr(_jax_core, 'aval_method'):
        out.append("jax._src.core.ShapedArray.reshape is no longer an aval_method")
    for attr, _ in _ARRAY:
        if not callable(vars(ArrayImpl).get(attr)):
            out.append(f"jax._src.array.ArrayImpl.{attr} is not a function defined on ArrayImpl")
    return out


@functools.lru_cache(maxsize=None)
def check() -> None:
    """Raise ``RuntimeError`` if the private attributes moved in the installed JAX.

    Example:
      >>> from flax_integration._jax_private import check
      >>> check()
    """
    problems = _problems()
    if problems:
        raise RuntimeError(
            f"flax_integration's ODML providers intercept array operators through private JAX attributes that "
            f"moved in jax {jax.__version__} (checked with {TESTED_JAX[0]}..{TESTED_JAX[1]}): "
            f"{'; '.join(problems)}. Update flax_integration/_jax_private.py for this JAX, or use a JAX "
            f"version in that range.")


def operator_targets() -> dict[str, tuple[Target, ...]]:
    """``{'add' | 'mul' | 'reshape': targets}``: where ``+``, ``*`` and ``.reshape`` on arrays live.

    Example:
      >>> from flax_integration._jax_private import operator_targets
      >>> len(operator_targets()['add'])
      4
    """
    check()
    shaped = _jax_core.ShapedArray
    out: dict[str, list[Target]] = {'add': [], 'mul': [], 'reshape': []}
    for attr, name in _STATIC:
        out[name].append(Target(shaped, attr, 'staticmethod'))
    out['reshape'].append(Target(shaped, 'reshape', unwrap=lambda raw: raw.fun, wrap=_jax_core.aval_method))
    for attr, name in _ARRAY:
        out[name].append(Target(ArrayImpl, attr))
    return {k: tuple(v) for k, v in out.items()}
