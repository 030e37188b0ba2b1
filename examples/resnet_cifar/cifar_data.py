"""The on-device input pipeline of ``train.py`` and ``test.py``: normalisation and augmentation
inside the jitted steps.

The CIFAR-10/100 and SVHN files are read on the host by ``bdl_examples.data``
(``load_cifar_split``, ``load_cifar_ood_images``); the images stay ``uint8`` (N, 32, 32, 3) on
the device (150 MB for CIFAR-10's training set) and are normalised per batch here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CROP_PADDING = 4

# Per-channel mean and standard deviation of each training set (pixels in [0, 1]); the
# out-of-distribution sets are normalised with the statistics of the training set.
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def normalize(images: jax.Array, dataset: str) -> jax.Array:
    """uint8 images -> float32, standardised per channel with the training set's statistics."""
    mean, std = (np.asarray(v, np.float32) for v in _STATS[dataset])
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def augment(key: jax.Array, images: jax.Array) -> jax.Array:
    """Random 32x32 crop of the image zero-padded by 4 pixels, and a random horizontal flip.

    Args:
      key: a PRNG key.
      images: a batch (B, 32, 32, C), any dtype.

    Returns:
      The augmented batch, same shape and dtype; each image gets its own crop and flip.
    """
    batch, height, width = images.shape[:3]
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * CROP_PADDING + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
    pad = ((0, 0), (CROP_PADDING, CROP_PADDING), (CROP_PADDING, CROP_PADDING), (0, 0))
    padded = jnp.pad(images, pad)

    def crop(image, offset):
        return jax.lax.dynamic_slice(
            image, (offset[0], offset[1], 0), (height, width, image.shape[-1])
        )

    cropped = jax.vmap(crop)(padded, offsets)
    return jnp.where(flips[:, None, None, None], cropped[:, :, ::-1], cropped)
