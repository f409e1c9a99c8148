"""A small CNN for 8x8 digits, written twice: Flax Linen and Flax NNX.

conv3x3(16) -> relu -> conv3x3(32, stride 2) -> relu -> flatten -> dense(64) -> relu -> dense(10).
Plain Flax modules only, so the quantization layer meets them unchanged.

Example:
  >>> import jax, jax.numpy as jnp
  >>> m = LinenCNN()
  >>> p = m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  >>> m.apply(p, jnp.zeros((2, 8, 8, 1))).shape
  (2, 10)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx


class LinenCNN(nn.Module):
    """The digits CNN in Linen."""

    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(self.classes)(x)


class NnxCNN(nnx.Module):
    """The digits CNN in NNX.

    Example:
      >>> import jax.numpy as jnp
      >>> NnxCNN(rngs=nnx.Rngs(0))(jnp.zeros((2, 8, 8, 1))).shape
      (2, 10)
    """

    def __init__(self, classes: int = 10, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), rngs=rngs)
        self.fc1 = nnx.Linear(4 * 4 * 32, 64, rngs=rngs)
        self.fc2 = nnx.Linear(64, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.fc1(x))
        return self.fc2(x)


def accuracy(logits: jax.Array, labels: jax.Array) -> float:
    """Fraction of correct argmax predictions, in percent.

    Example:
      >>> import jax.numpy as jnp
      >>> accuracy(jnp.array([[0., 1.], [1., 0.]]), jnp.array([1, 1]))
      50.0
    """
    return float(jnp.mean(jnp.argmax(logits, -1) == labels) * 100)
