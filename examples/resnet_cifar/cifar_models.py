"""Networks for 32x32 images, in Flax (linen), with BatchNorm.

``resnet18``: the CIFAR variant of ResNet-18 (He et al., 2016): a 3x3 stride-1 stem with no
max-pool, four stages of two basic blocks (64, 128, 256, 512 channels), global average pooling
and a dense layer; 11.2M parameters. ``cnn``: a small network (three strided 3x3 conv layers with
BatchNorm, 94k parameters) for trying the programs on a CPU in minutes.

Every model is called as ``model.apply(variables, x, train=...)``: with ``train=True`` it
normalises with the batch's statistics and returns the updated running averages (the
``batch_stats`` collection, made mutable by the caller); with ``train=False`` it uses them.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

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


MODELS = {"resnet18": ResNet18, "cnn": SmallCNN}


def make_model(name: str, num_classes: int) -> nn.Module:
    """The model called ``name`` (a key of ``MODELS``) with ``num_classes`` outputs."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; accepted: {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes)
