"""``einsum`` for arrays and QArrays, mapped onto :func:`dot_general`.

Any subscripts ``jnp.einsum`` takes: explicit or implicit output, ``...``,
batch letters (in both operands and the output), several contracting letters.
Operands are contracted left to right, two at a time; each pair becomes one
``dot_general`` (batch = shared letters that are still needed, contracting =
shared letters that are not) followed by a transpose to the requested order.
Letters that only one operand has and nobody needs are summed out first
(a QArray is dequantized for that). Cases ``dot_general`` cannot express
(a letter repeated within one operand, i.e. a diagonal, or ``...`` axes that
broadcast 1 against n) run ``jnp.einsum`` on dequantized operands.

Example:
  >>> import jax.numpy as jnp, qarray
  >>> w = qarray.quantize(jnp.ones((4, 8, 3)), 'int8', channelwise_axes=(2,))
  >>> qarray.ops.einsum('bsd,dnh->bsnh', jnp.ones((2, 5, 4)), w).shape
  (2, 5, 8, 3)
"""

from __future__ import annotations

import string
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from qarray import _quantize
from qarray._array import QArray
from qarray.ops.dot_general import dot_general
from qarray.ops._operands import check_operand, describe

__all__ = ['einsum', 'parse_subscripts']


def parse_subscripts(subscripts: str, shapes: Sequence[Sequence[int]]) -> tuple[list[str], str, bool]:
    """Explicit single-letter terms for each operand and the output; ``...`` becomes spare letters.

    Returns ``(input_terms, output_term, ellipsis_broadcasts)``; the flag says the
    ``...`` axes need 1-vs-n broadcasting.

    Example:
      >>> from qarray.ops.einsum import parse_subscripts
      >>> parse_subscripts('...ij,jk', [(2, 3, 4), (4, 5)])
      (['Aij', 'jk'], 'Aik', False)
    """
    if not isinstance(subscripts, str):
        raise TypeError(f"subscripts must be a str like 'ij,jk->ik'; got {type(subscripts).__name__}.")
    sub = subscripts.replace(' ', '')
    if '->' in sub:
        lhs, out = sub.split('->')
    else:
        lhs, out = sub, None
    terms = lhs.split(',')
    if len(terms) != len(shapes):
        raise ValueError(f"subscripts {subscripts!r} name {len(terms)} operands but {len(shapes)} were given.")
    used = set(sub) - {'.', ',', '-', '>'}
    for c in used:
        if c not in string.ascii_letters:
            raise ValueError(f"subscripts {subscripts!r}: {c!r} is not a letter; use a-z, A-Z and '...'.")
    spare = [c for c in string.ascii_uppercase + string.ascii_lowercase if c not in used]
    n_ell = max((len(s) - (len(t) - 3) for t, s in zip(terms, shapes) if '...' in t), default=0)
    ell = ''.join(spare[:n_ell])
    expanded, ell_sizes = [], {}
    for t, s in zip(terms, shapes):
        if '...' in t:
            k = len(s) - (len(t) - 3)
            if k < 0:
                raise ValueError(f"subscripts {subscripts!r}: term {t!r} has more letters than the operand's "
                                 f"{len(s)} axes.")
            t = t.replace('...', ell[n_ell - k:])
        if len(t) != len(s):
            raise ValueError(f"subscripts {subscripts!r}: term {t!r} has {len(t)} letters but its operand has "
                             f"{len(s)} axes (shape {tuple(s)}).")
        for c, n in zip(t, s):
            if c in ell:
                ell_sizes.setdefault(c, set()).add(n)
        expanded.append(t)
    broadcasts = any(len(v) > 1 for v in ell_sizes.values())
    if out is None:
        counts = {}
        for t in expanded:
            for c in t:
                counts[c] = counts.get(c, 0) + 1
        out = ell + ''.join(sorted(c for c, k in counts.items() if k == 1 and c not in ell))
    else:
        out = out.replace('...', ell)
        missing = set(out) - set(''.join(expanded))
        if missing:
            raise ValueError(f"subscripts {subscripts!r}: output letters {sorted(missing)} appear in no operand.")
    return expanded, out, broadcasts


def _dequant(x: Any) -> Any:
    return _quantize.dequantize(x) if isinstance(x, QArray) else x


def einsum(subscripts: str, *operands: Any, out: None = None, optimize: Any = 'auto', precision: Any = None,
           preferred_element_type: Any = None) -> jax.Array:
    """``jnp.einsum`` where operands may be QArrays; every pairwise contraction is a quantized ``dot_general``.

    ``optimize`` is accepted for signature compatibility; contraction runs left to right.

    Example:
      >>> import jax.numpy as jnp, qarray
      >>> q = qarray.quantize(jnp.ones((3, 4)), 'int8')
      >>> qarray.ops.einsum('ij,kj->ik', jnp.ones((2, 4)), q).shape
      (2, 3)
    """
    del optimize
    if out is not None:
        raise ValueError("einsum: the 'out' argument is not supported (JAX arrays are immutable); pass out=None.")
    ops = [check_operand(o, f'operands[{i}]') for i, o in enumerate(operands)]
    if not ops:
        raise ValueError("einsum needs at least one operand.")
    terms, out_term, broadcasts = parse_subscripts(subscripts, [o.shape for o in ops])
    if broadcasts or len(ops) == 1 or any(len(set(t)) != len(t) for t in terms):
        return jnp.einsum(subscripts, *[_dequant(o) for o in ops], precision=precision,
                          preferred_element_type=preferred_element_type)
    for i, t in enumerate(terms):
        for c, n in zip(t, ops[i].shape):
            for j, u in enumerate(terms[:i]):
                if c in u and ops[j].shape[u.index(c)] != n:
                    raise ValueError(f"einsum {subscripts!r}: letter {c!r} has size {ops[j].shape[u.index(c)]} in "
                                     f"operand {j} ({describe(ops[j])}) but {n} in operand {i} ({describe(ops[i])}).")
    cur, cur_t = ops[0], terms[0]
    for i in range(1, len(ops)):
        keep = set(out_term).union(*terms[i + 1:])
        cur, cur_t = _pair(cur, cur_t, ops[i], terms[i], keep, precision, preferred_element_type)
    if cur_t != out_term:
        cur = jnp.transpose(cur, [cur_t.index(c) for c in out_term])
    return cur


def _sum_unneeded(x: Any, t: str, other: str, keep: set[str]) -> tuple[Any, str]:
    """Sum out letters only ``x`` has and nobody needs."""
    drop = [c for c in t if c not in other and c not in keep]
    if not drop:
        return x, t
    x = jnp.sum(_dequant(x), axis=tuple(t.index(c) for c in drop))
    return x, ''.join(c for c in t if c not in drop)


def _pair(x: Any, xt: str, y: Any, yt: str, keep: set[str], precision: Any, pet: Any) -> tuple[jax.Array, str]:
    x, xt = _sum_unneeded(x, xt, yt, keep)
    y, yt = _sum_unneeded(y, yt, xt, keep)
    shared = [c for c in xt if c in yt]
    batch = [c for c in shared if c in keep]
    contract = [c for c in shared if c not in keep]
    dn = ((tuple(xt.index(c) for c in contract), tuple(yt.index(c) for c in contract)),
          (tuple(xt.index(c) for c in batch), tuple(yt.index(c) for c in batch)))
    result = dot_general(x, y, dn, precision=precision, preferred_element_type=pet)
    out_t = ''.join(batch) + ''.join(c for c in xt if c not in shared) + ''.join(c for c in yt if c not in shared)
    return result, out_t
