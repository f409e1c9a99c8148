"""Fidelity metrics for sentence embeddings: cosine agreement and Spearman rank correlation.

Example:
  >>> import numpy as np
  >>> spearman(np.array([1., 2., 3.]), np.array([10., 20., 15.]))
  0.5
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ['rowwise_cosine', 'pair_similarities', 'rankdata', 'spearman']


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (float64).

    Example:
      >>> import numpy as np
      >>> rowwise_cosine(np.array([[1., 0.]]), np.array([[1., 1.]])).round(4).tolist()
      [0.7071]
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape; got {a.shape} and {b.shape}.")
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def pair_similarities(emb: np.ndarray, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """Cosine similarity of each ``(i, j)`` pair of rows of ``emb``.

    Example:
      >>> import numpy as np
      >>> pair_similarities(np.eye(2), [(0, 0), (0, 1)]).tolist()
      [1.0, 0.0]
    """
    idx = np.asarray(pairs, np.int64).reshape(-1, 2)
    return rowwise_cosine(np.asarray(emb)[idx[:, 0]], np.asarray(emb)[idx[:, 1]])


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get the mean of their ranks (as ``scipy.stats.rankdata``).

    Example:
      >>> rankdata(np.array([3., 1., 3.])).tolist()
      [2.5, 1.0, 2.5]
    """
    x = np.asarray(x, np.float64).ravel()
    order = np.argsort(x, kind='stable')
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    # Average over each run of equal values.
    uniq, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks.

    Example:
      >>> spearman(np.array([1., 2., 3.]), np.array([3., 2., 1.]))
      -1.0
    """
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"a and b must be 1-D of the same length >= 2; got {a.shape} and {b.shape}.")
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))
