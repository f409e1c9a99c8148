"""Small Linen and NNX CNNs shared by the QAT and LoRA tests (8x8x1 input, 5 classes)."""

from flax import linen as nn
from flax import nnx


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2))(x))
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), strides=(2, 2), rngs=rngs)
        self.fc = nnx.Linear(64, 5, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv(x))
        return self.fc(x.reshape(x.shape[0], -1))
