"""Hook for fused GPU kernels: a registry that ``dot_general`` consults on GPU only.

A kernel is a callable shaped like ``lax.dot_general``:
``fn(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None)``
that returns the result, or ``None`` when it does not serve the case (then the
pure-XLA path runs). ``dot_general`` asks the registered kernels, in order,
only when ``jax.default_backend() == 'gpu'`` and an operand is a QArray; on any
other backend the registry is never read. On the first GPU call the optional
``qarray.ops.kernels`` package is asked to register itself.

Example:
  >>> import qarray
  >>> def never(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  ...     return None
  >>> qarray.ops.register_kernel(never)
  >>> 'never' in qarray.ops.registered_kernels()
  True
  >>> qarray.ops.unregister_kernel('never')
"""

from __future__ import annotations

from typing import Any, Callable

import warnings

import jax

__all__ = ['register_kernel', 'unregister_kernel', 'registered_kernels', 'kernels_for_backend']

_KERNELS: dict[str, Callable[..., Any]] = {}
_AUTO_TRIED = [False]


def register_kernel(fn: Callable[..., Any], name: str | None = None) -> None:
    """Register ``fn`` (dot_general-shaped, may return None) under ``name`` (default ``fn.__name__``).

    Registering the same name again replaces the earlier kernel.

    Example:
      >>> import qarray
      >>> qarray.ops.register_kernel(lambda *a, **k: None, name='noop')
      >>> 'noop' in qarray.ops.registered_kernels()
      True
      >>> qarray.ops.unregister_kernel('noop')
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable (a dot_general-shaped kernel); got {type(fn).__name__}.")
    _KERNELS[name or getattr(fn, '__name__', repr(fn))] = fn


def unregister_kernel(name: str) -> None:
    """Remove the kernel registered under ``name`` (no error when absent).

    Example:
      >>> import qarray
      >>> qarray.ops.unregister_kernel('not-there')   # absent: no error
    """
    _KERNELS.pop(name, None)


def registered_kernels() -> tuple[str, ...]:
    """Names of the registered kernels, in the order they are consulted.

    Example:
      >>> import qarray
      >>> isinstance(qarray.ops.registered_kernels(), tuple)
      True
    """
    return tuple(_KERNELS)


def kernels_for_backend() -> tuple[Callable[..., Any], ...]:
    """Kernels to try now: the registered ones on GPU, none on any other backend.

    Example:
      >>> import jax
      >>> from qarray.ops._registry import kernels_for_backend
      >>> kernels_for_backend() == () or jax.default_backend() == 'gpu'
      True
    """
    if jax.default_backend() != 'gpu':
        return ()
    if not _AUTO_TRIED[0]:
        _AUTO_TRIED[0] = True
        try:  # the optional Pallas kernels plug themselves in; failure means the XLA path only
            from qarray.ops import kernels
            kernels.register()
        except ImportError as e:  # Pallas missing or broken in this jaxlib: say so once, keep going
            warnings.warn(f"qarray: the GPU kernels are unavailable ({e}); quantized matmuls use the XLA path.",
                          RuntimeWarning, stacklevel=2)
    return tuple(_KERNELS.values())
