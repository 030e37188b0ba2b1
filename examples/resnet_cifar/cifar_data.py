"""CIFAR-10/100 (and SVHN for out-of-distribution tests) from local files, and the on-device
input pipeline: shuffling, batching and augmentation inside the jitted training step.

Nothing is downloaded. The files are the standard releases, unpacked into one folder
(``--datasetfolder``, ``datasets`` by default)::

    datasets/cifar-10-batches-py/{data_batch_1..5, test_batch}   (cifar-10-python.tar.gz)
    datasets/cifar-100-python/{train, test}                      (cifar-100-python.tar.gz)
    datasets/svhn/test_32x32.mat                                 (optional, OOD only; needs scipy)

The CIFAR archives are at https://www.cs.toronto.edu/~kriz/cifar.html, SVHN's
``test_32x32.mat`` at http://ufldl.stanford.edu/housenumbers/. Images stay ``uint8`` (N, 32,
32, 3) on the device (150 MB for CIFAR-10's training set) and are normalised per batch.
"""

from __future__ import annotations

import os
import pickle
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_SHAPE = (32, 32, 3)
CROP_PADDING = 4

# Per-channel mean and standard deviation of each training set (pixels in [0, 1]); the
# out-of-distribution sets are normalised with the statistics of the training set.
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class DatasetSpec(NamedTuple):
    folder: str  # subfolder of --datasetfolder
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    archive: str


DATASETS = {
    "cifar10": DatasetSpec(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        10,
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": DatasetSpec(
        "cifar-100-python",
        ("train",),
        ("test",),
        b"fine_labels",
        100,
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}
OOD_DATASETS = ("cifar10", "cifar100", "svhn")
SVHN_FILE = os.path.join("svhn", "test_32x32.mat")
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/test_32x32.mat"


class DataError(Exception):
    """A data file is missing or unreadable; the message says where to get and put it."""


class Split(NamedTuple):
    images: np.ndarray  # uint8 (N, 32, 32, 3)
    labels: np.ndarray  # int32 (N,)


# --------------------------------------------------------------------------------------------
# Reading the files
# --------------------------------------------------------------------------------------------


def _missing_message(path: str, dataset: str, folder: str) -> str:
    spec = DATASETS[dataset]
    return (
        f"{dataset}: file {path!r} not found. Nothing is downloaded: get {spec.archive} and "
        f"unpack it into --datasetfolder ({folder!r}), so that {spec.folder}/ is directly "
        f"inside it (e.g. `tar xzf {os.path.basename(spec.archive)} -C {folder}`)."
    )


def _read_pickle(path: str, dataset: str, folder: str, label_key: bytes, num_classes: int):
    if not os.path.isfile(path):
        raise DataError(_missing_message(path, dataset, folder))
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[label_key])
    except (EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError, OSError) as e:
        raise DataError(
            f"{dataset}: {path!r} is truncated or not a CIFAR python pickle "
            f"({type(e).__name__}: {e}). Unpack {DATASETS[dataset].archive} again."
        ) from e
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
        or labels.shape != (data.shape[0],)
        or (labels.size and (labels.min() < 0 or labels.max() >= num_classes))
    ):
        raise DataError(
            f"{dataset}: {path!r} does not hold uint8 rows of 3072 pixels with labels in "
            f"[0, {num_classes}) (got data {data.dtype} {data.shape}, labels {labels.shape}). "
            f"Unpack {DATASETS[dataset].archive} again."
        )
    # rows are 1024 red, 1024 green, 1024 blue values of a 32x32 image
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def load_split(folder: str, dataset: str, split: str) -> Split:
    """Read the ``"train"`` or ``"test"`` split of ``"cifar10"`` or ``"cifar100"``.

    Raises:
      DataError: a file is missing, truncated or malformed (the message says what to do).
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; accepted: {sorted(DATASETS)}")
    spec = DATASETS[dataset]
    names = spec.train_files if split == "train" else spec.test_files
    parts = [
        _read_pickle(
            os.path.join(folder, spec.folder, name),
            dataset,
            folder,
            spec.label_key,
            spec.num_classes,
        )
        for name in names
    ]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if len(labels) == 0:
        raise DataError(f"{dataset}: the {split} split in {folder!r} holds no images.")
    return Split(images, labels)


def load_ood_images(folder: str, name: str) -> np.ndarray:
    """Test images (uint8, N x 32 x 32 x 3) of an out-of-distribution set; labels are unused.

    ``svhn`` reads the standard ``svhn/test_32x32.mat`` (MATLAB format, read with scipy,
    which scikit-learn brings along; scipy is needed only for this).
    """
    if name in DATASETS:
        return load_split(folder, name, "test").images
    if name != "svhn":
        raise DataError(f"unknown OOD dataset {name!r}; accepted: {list(OOD_DATASETS)}")
    path = os.path.join(folder, SVHN_FILE)
    if not os.path.isfile(path):
        raise DataError(
            f"svhn: file {path!r} not found. Nothing is downloaded: get {SVHN_URL} and put it "
            f"at {os.path.join('<datasetfolder>', SVHN_FILE)}."
        )
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise DataError("--ood svhn reads a MATLAB file and needs scipy (pip install scipy)") from e
    try:
        images = np.asarray(loadmat(path)["X"])
    except Exception as e:  # scipy raises several types for damaged files
        raise DataError(
            f"svhn: {path!r} is truncated or not SVHN's test_32x32.mat ({type(e).__name__}: {e})."
        ) from e
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != IMAGE_SHAPE:
        raise DataError(f"svhn: 'X' in {path!r} must be uint8 (32, 32, 3, N); got {images.shape}")
    return np.ascontiguousarray(images.transpose(3, 0, 1, 2))


# --------------------------------------------------------------------------------------------
# On the device
# --------------------------------------------------------------------------------------------


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
