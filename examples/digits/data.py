"""The digits data set as float32 NHWC images in [0, 1], with a fixed train/test split.

Example:
  >>> d = load()
  >>> d.x_train.shape[1:], d.x_train.dtype
  ((8, 8, 1), dtype('float32'))
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Digits(NamedTuple):
    """Train/test arrays: images (N, 8, 8, 1) float32, labels (N,) int32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load(test_fraction: float = 0.25, seed: int = 0) -> Digits:
    """Load scikit-learn's bundled digits and split them with a seeded permutation.

    Example:
      >>> len(load().y_test)
      449
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    y = y.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


def subset(d: Digits, classes: tuple[int, ...]) -> Digits:
    """Only the examples whose label is in ``classes`` (labels keep their values).

    Example:
      >>> set(subset(load(), (0, 1)).y_train.tolist())
      {0, 1}
    """
    cls = np.asarray(classes)
    tr, te = np.isin(d.y_train, cls), np.isin(d.y_test, cls)
    return Digits(d.x_train[tr], d.y_train[tr], d.x_test[te], d.y_test[te])
