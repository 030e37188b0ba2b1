"""The networks of the examples and benchmarks, in Flax (linen): one definition each.

``MLP``: Dense layers with an activation on the flattened input (every tabular and digits
example). ``LeNet``: LeNet-5 (the implicit-VI paper's convolutional network). For 32x32 images,
with BatchNorm: ``ResNet18``, the CIFAR variant of ResNet-18 (He et al., 2016): a 3x3 stride-1
stem with no max-pool, four stages of two basic blocks (64, 128, 256, 512 channels), global
average pooling and a dense layer, 11.2M parameters; ``SmallCNN``, three strided 3x3 conv layers
with BatchNorm (94k parameters), for trying the CIFAR programs on a CPU in minutes.

The BatchNorm models are called as ``model.apply(variables, x, train=...)``: with
``train=True`` they normalise with the batch's statistics and return the updated running
averages (the ``batch_stats`` collection, made mutable by the caller); with ``train=False``
they use them.

Example:
  >>> import jax, jax.numpy as jnp
  >>> model = MLP(widths=(16, 16), num_outputs=3)
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 2, 4)))["params"]
  >>> sorted(params), params["Dense_0"]["kernel"].shape
  (['Dense_0', 'Dense_1', 'Dense_2'], (8, 16))
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    """``widths`` hidden Dense layers with ``activation``, then ``num_outputs`` linear outputs.

    The input is flattened to ``(batch, features)`` first, so images go in as they are.
    """

    widths: Sequence[int] = (128, 128)
    num_outputs: int = 10
    activation: Callable[[jax.Array], jax.Array] = nn.relu

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for width in self.widths:
            x = self.activation(nn.Dense(width)(x))
        return nn.Dense(self.num_outputs)(x)


class LeNet(nn.Module):
    """LeNet-5 with ReLU and max pooling; "SAME" convolutions on images under 28 pixels."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = "VALID" if min(x.shape[1:3]) >= 28 else "SAME"
        for channels in (6, 16):
            x = nn.relu(nn.Conv(channels, (5, 5), padding=padding)(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120)(x))
        x = nn.relu(nn.Dense(84)(x))
        return nn.Dense(self.num_classes)(x)


# PyTorch's BatchNorm defaults (running average updated with weight 0.1)
_BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (1x1 convolution when the shape
    changes)."""

    filters: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = functools.partial(_BatchNorm, use_running_average=not train)
        y = nn.Conv(self.filters, (3, 3), self.strides, padding=1, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.filters, (3, 3), padding=1, use_bias=False)(y)
        y = norm()(y)
        if x.shape != y.shape:
            x = nn.Conv(self.filters, (1, 1), self.strides, use_bias=False)(x)
            x = norm()(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stem, no max-pool."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Conv(64, (3, 3), padding=1, use_bias=False)(x)
        x = nn.relu(_BatchNorm(use_running_average=not train)(x))
        for stage, filters in enumerate((64, 128, 256, 512)):
            x = BasicBlock(filters, 1 if stage == 0 else 2)(x, train)
            x = BasicBlock(filters)(x, train)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class SmallCNN(nn.Module):
    """Three 3x3 stride-2 convolutions (32, 64, 128 channels) with BatchNorm and ReLU, global
    average pooling and a dense layer.

    Strided convolutions rather than max-pooling: on XLA's CPU backend the backward pass of a
    max-pool costs more than the convolutions of this network.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for filters in (32, 64, 128):
            x = nn.Conv(filters, (3, 3), 2, padding=1, use_bias=False)(x)
            x = nn.relu(_BatchNorm(use_running_average=not train)(x))
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


CIFAR_MODELS = {"resnet18": ResNet18, "cnn": SmallCNN}


def make_cifar_model(name: str, num_classes: int) -> nn.Module:
    """The CIFAR network called ``name`` (a key of ``CIFAR_MODELS``) with ``num_classes``
    outputs."""
    if name not in CIFAR_MODELS:
        raise ValueError(f"unknown model {name!r}; accepted: {sorted(CIFAR_MODELS)}")
    return CIFAR_MODELS[name](num_classes=num_classes)
