"""Names for pytree leaves: the '/'-joined key path (``Dense_0/kernel``).

Rules, checkpoints and reports all address parameters this way, so there is
one function for it.

Example:
  >>> import jax
  >>> from qarray.paths import path_name
  >>> [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path({'a': [0, 1]})[0]]
  ['a/0', 'a/1']
"""

from __future__ import annotations

from typing import Any

__all__ = ['path_name']


def _key_name(key: Any) -> str:
    for attr in ('key', 'name', 'idx'):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path: tuple) -> str:
    """'/'-joined name of a pytree key path, e.g. ``Dense_0/kernel``.

    Example:
      >>> import jax
      >>> from qarray.paths import path_name
      >>> path_name(jax.tree_util.tree_flatten_with_path({'a': [0, 1]})[0][1][0])
      'a/1'
    """
    return '/'.join(_key_name(k) for k in path)
