"""Optional fused GPU kernels (JAX Pallas, Triton backend) for weight-only matmuls.

``weight_only_matmul(x, q)`` runs ``x @ q`` with a kernel that reads the
packed weight bytes and scales once and dequantizes in registers — for
decode shapes (M <= 64) with int4/nf4/int8/fp8 weights on a GPU. Whenever
the case is not one the kernel serves (CPU backend, prefill shapes, zero
points, a layout it cannot read, Pallas missing) it returns ``None`` and the
caller runs the pure-XLA path; nothing here is required for correctness.
``register()`` plugs it into ``qarray.ops.dot_general``.

Pallas is imported lazily, only when a kernel is about to be built, so
``import qarray`` never touches the GPU Pallas modules.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from qarray.ops import kernels
  >>> w = jax.random.normal(jax.random.key(0), (256, 128))
  >>> q = kernels.prepare_weight(w, 'int4', tile=128)          # [N, K], packed along K
  >>> y = kernels.weight_only_matmul(jnp.ones((4, 256)), q, rhs_contracting_dim=1, interpret=True)
  >>> y.shape
  (4, 128)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from qarray import _array
from qarray.ops.kernels import config as config
from qarray.ops.kernels import layout as layout
from qarray.ops.kernels.config import KernelConfig
from qarray.ops.kernels.layout import prepare_weight

__all__ = ['weight_only_matmul', 'dot_general_hook', 'register', 'prepare_weight', 'KernelConfig',
           'available', 'why_not']

_FLOATS = (jnp.bfloat16, jnp.float16, jnp.float32)
KERNEL_NAME = 'pallas_weight_only'  # name in qarray.ops.registered_kernels()


def available() -> bool:
    """True when Pallas' Triton backend imports and the default backend is a GPU.

    Example:
      >>> from qarray.ops import kernels
      >>> isinstance(kernels.available(), bool)
      True
    """
    if jax.default_backend() != 'gpu':
        return False
    try:
        from qarray.ops.kernels import weight_only  # noqa: F401
    except ImportError:  # Pallas missing or broken in this jaxlib: XLA path only
        return False
    return True


def why_not(x: Any, q: Any, *, rhs_contracting_dim: int = 0, interpret: bool = False,
            kernel_config: KernelConfig | None = None) -> str | tuple[layout.WeightLayout, KernelConfig]:
    """The reason the kernel will not run ``x @ q``, or the (layout, config) it would use.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from qarray.ops import kernels
      >>> kernels.why_not(jnp.ones((512, 64)), qarray.quantize(jnp.ones((64, 32)), 'int8'), interpret=True)
      'M=512 is not a decode shape (kernel serves M <= 64)'
    """
    if not interpret and not available():
        return 'no GPU backend with Pallas/Triton'
    if isinstance(x, _array.QArray) or not hasattr(x, 'dtype'):
        return 'x must be a plain float array'
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in _FLOATS]:
        return f'x dtype {x.dtype} is not bf16/f16/f32'
    if not interpret and jnp.dtype(x.dtype) == jnp.float32 and kernel_config is None:
        return 'f32 activations: the kernel is tuned for bf16/f16 (XLA path)'
    lay = layout.describe(q, rhs_contracting_dim)
    if isinstance(lay, str):
        return lay
    if x.ndim < 1 or x.shape[-1] != lay.k:
        return f'x of shape {tuple(x.shape)} does not contract with K={lay.k}'
    m = 1
    for d in x.shape[:-1]:
        m *= d
    if kernel_config is None:
        cfg = config.choose(m, lay)
        if cfg is None:
            return f'M={m} is not a decode shape (kernel serves M <= {config.MAX_M})' if m > config.MAX_M \
                else 'no block sizes fit this shape'
        return lay, cfg
    reason = config.fits(kernel_config, m, lay)
    return reason if reason else (lay, kernel_config)


def weight_only_matmul(x: Any, q: Any, *, rhs_contracting_dim: int = 0, out_dtype: Any = None,
                       kernel_config: KernelConfig | None = None,
                       interpret: bool = False) -> jax.Array | None:
    """``x[..., K] @ W`` through the fused kernel, or None when the kernel does not serve this case.

    Args:
      x: activations ``[..., K]`` (bf16/f16; f32 only with ``interpret`` or an explicit config).
      q: 2-D QArray weight: logical ``[K, N]`` (``rhs_contracting_dim=0``) or ``[N, K]``
        (``rhs_contracting_dim=1``, the layout :func:`prepare_weight` makes).
      out_dtype: result dtype (default: that of ``x @ dequantize(q)``).
      kernel_config: explicit block sizes (default: :func:`config.choose`).
      interpret: run the Pallas interpreter (any backend; for tests).

    Returns ``[..., N]`` or None (then use the XLA path).

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from qarray.ops import kernels
      >>> q = qarray.quantize(jnp.ones((64, 32)), 'int8', channelwise_axes=(1,))
      >>> kernels.weight_only_matmul(jnp.ones((1, 64), jnp.bfloat16), q) is None   # CPU, not interpreted
      True
    """
    plan = why_not(x, q, rhs_contracting_dim=rhs_contracting_dim, interpret=interpret,
                   kernel_config=kernel_config)
    if isinstance(plan, str):
        return None
    lay, cfg = plan
    from qarray.ops.kernels import weight_only  # lazy: Pallas only when a kernel is built
    return weight_only.matmul(x, q, lay, cfg, out_dtype=out_dtype, interpret=interpret)


def dot_general_hook(lhs: Any, rhs: Any, dimension_numbers: Any, precision: Any = None,
                     preferred_element_type: Any = None) -> jax.Array | None:
    """``lax.dot_general``-shaped entry point for the ops layer; None means "use XLA".

    Serves a float ``lhs`` contracted on its last axis with a 2-D QArray ``rhs``
    contracted on one axis, no batch dimensions (the output is then
    ``lhs_free + [N]``, exactly ``dot_general``'s order). ``precision`` is
    ignored (the kernel accumulates in f32).

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> from qarray.ops import kernels
      >>> q = qarray.quantize(jnp.ones((64, 32)), 'int8')
      >>> kernels.dot_general_hook(jnp.ones((2, 64)), q, (((1,), (0,)), ((), ()))) is None   # no GPU here
      True
    """
    del precision
    if isinstance(lhs, _array.QArray) or not isinstance(rhs, _array.QArray):
        return None
    (lc, rc), (lb, rb) = dimension_numbers
    if tuple(lb) or tuple(rb) or len(lc) != 1 or len(rc) != 1:
        return None
    lhs_ndim = getattr(lhs, 'ndim', None)
    if lhs_ndim is None or int(lc[0]) % lhs_ndim != lhs_ndim - 1 or rhs.ndim != 2:
        return None
    return weight_only_matmul(lhs, rhs, rhs_contracting_dim=int(rc[0]) % 2, out_dtype=preferred_element_type)


def register() -> bool:
    """Plug :func:`dot_general_hook` into ``qarray.ops`` (idempotent); returns True.

    Uses the ops layer's kernel hook (``qarray.ops.register_kernel``, consulted
    by ``qarray.ops.dot_general`` on GPU only).

    Example:
      >>> import qarray
      >>> from qarray.ops import kernels
      >>> kernels.register()
      True
      >>> kernels.KERNEL_NAME in qarray.ops.registered_kernels()
      True
    """
    from qarray import ops
    ops.register_kernel(dot_general_hook, name=KERNEL_NAME)
    return True
