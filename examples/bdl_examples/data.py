"""The examples' data: scikit-learn's digits, generated tasks with known class probabilities,
the standard release files of MNIST, Fashion-MNIST and CIFAR, splits and minibatches.

Nothing is downloaded: the digits ship with scikit-learn, the generated tasks are drawn here,
and the file readers take the files of the official releases from a folder the user names,
with an error that says what to put where when they are missing or malformed (``DataError``).

Example:
  >>> data = load_digits_split(seed=0)
  >>> data["train"][0].shape, data["test"][0].shape, data["num_classes"]
  ((1347, 64), (450, 64), 10)
  >>> x, y = epoch_batches(jax.random.key(0), *data["train"], batch_size=64)
  >>> x.shape, y.shape
  ((21, 64, 64), (21, 64))
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np


class DataError(Exception):
    """A data set's files are missing or malformed; the message says what to put where."""


# ----- minibatches and splits ---------------------------------------------------------------


def epoch_batches(key, x, y, batch_size: int):
    """One epoch of shuffled minibatches stacked for ``lax.scan`` (the remainder is dropped).

    Returns ``(x, y)`` of shapes ``(steps, batch_size, *x.shape[1:])`` and ``(steps,
    batch_size, *y.shape[1:])``, ``steps = len(x) // batch_size``.
    """
    steps = len(x) // batch_size
    if steps == 0:
        raise ValueError(f"batch_size must be <= the number of examples {len(x)}, got {batch_size}")
    order = jax.random.permutation(key, len(x))[: steps * batch_size]
    return (
        x[order].reshape(steps, batch_size, *x.shape[1:]),
        y[order].reshape(steps, batch_size, *y.shape[1:]),
    )


def validation_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified share ``fraction`` of the indices of ``labels`` (at least one per class
    with two or more examples), drawn with ``seed``.

    Example:
      >>> (validation_indices(np.array([0, 0, 0, 0, 1, 1]), 0.25, seed=0) // 4).tolist()
      [0, 1]
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = min(len(members) - 1, max(1, round(fraction * len(members))))
        chosen.append(members[:count])
    return np.sort(np.concatenate(chosen))


# ----- scikit-learn's digits and generated tasks --------------------------------------------


def load_digits_split(
    seed: int,
    *,
    classes: Sequence[int] | None = None,
    test_fraction: float = 0.25,
    train_size: int | None = None,
) -> dict:
    """A stratified train/test split of scikit-learn's 8x8 digits, pixels in [0, 1].

    Args:
      seed: the split's random seed.
      classes: keep only these digits (relabelled 0..len-1 in the given order); the images of
        the other digits are returned as ``"ood"``. None: all ten.
      test_fraction: share of each class held out for testing (ignored with ``train_size``).
      train_size: train on this many images (stratified) and test on all the others.

    Returns:
      A dict with ``"train"`` and ``"test"`` (images (N, 64) float32, labels (N,) int32),
      ``"ood"`` (images of the other classes, or None) and ``"num_classes"``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    ood = None
    if classes is not None:
        classes = list(classes)
        keep = np.isin(y, classes)
        ood = x[~keep]
        relabel = np.full(10, -1, np.int32)
        relabel[classes] = np.arange(len(classes))
        x, y = x[keep], relabel[y[keep]]
    sizes = {"test_size": test_fraction} if train_size is None else {"train_size": train_size}
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, stratify=y, random_state=seed, **sizes
    )
    return {
        "train": (x_train, y_train),
        "test": (x_test, y_test),
        "ood": ood,
        "num_classes": int(y.max()) + 1,
    }


def hold_out(data: dict, fraction: float, seed: int) -> dict:
    """``data`` with a stratified share ``fraction`` of its training set moved to ``"val"``.

    Example:
      >>> data = {"train": (np.arange(20.0).reshape(10, 2), np.array([0, 1] * 5))}
      >>> split = hold_out(data, 0.2, seed=0)
      >>> len(split["train"][0]), sorted(split["val"][1].tolist())
      (8, [0, 1])
    """
    from sklearn.model_selection import train_test_split

    x, y = data["train"]
    x_fit, x_val, y_fit, y_val = train_test_split(
        x, y, test_size=fraction, stratify=y, random_state=seed
    )
    return dict(data, train=(x_fit, y_fit), val=(x_val, y_val))


def _draw_labels(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One label per row of ``probs`` (N, K), drawn from that row."""
    cumulative = np.cumsum(probs, axis=1)
    return np.minimum((rng.random((len(probs), 1)) > cumulative).sum(1), probs.shape[1] - 1)


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(1, keepdims=True)


def _generated_task(seed, class_probs, sample_inputs, num_train, num_test) -> dict:
    """Inputs from ``sample_inputs(rng, n)``, labels drawn from ``class_probs(x)``."""
    rng = np.random.default_rng(seed)
    x_train, x_test = sample_inputs(rng, num_train), sample_inputs(rng, num_test)
    probs_train, probs_test = class_probs(x_train), class_probs(x_test)
    return {
        "train": (x_train, _draw_labels(rng, probs_train).astype(np.int32)),
        "test": (x_test, _draw_labels(rng, probs_test).astype(np.int32)),
        "true_probs": probs_test,
        "ood": None,
        "num_classes": probs_test.shape[1],
    }


def teacher_task(seed: int, num_train=2000, num_test=20000, dim=16, num_classes=5) -> dict:
    """Labels drawn from a fixed random network's class probabilities, inputs N(0, I_dim).

    The teacher, ``softmax(3 tanh(2 x W1) W2)`` with W1 (dim x 32) and W2 (32 x classes)
    standard normal over the fan-in, is the same for every seed (drawn from seed 12345); the
    seed draws the inputs and labels. Its class probabilities are known, so
    ``"true_probs"`` (for the test inputs) gives the Bayes-optimal predictor: with the
    defaults about 71% accuracy and NLL 0.74.

    Returns:
      The harness's data dict (``"train"``, ``"test"``, ``"num_classes"``) plus
      ``"true_probs"``.
    """
    teacher = np.random.default_rng(12345)
    w1 = teacher.normal(size=(dim, 32)) / np.sqrt(dim)
    w2 = teacher.normal(size=(32, num_classes)) / np.sqrt(32)

    def sample_inputs(rng, n):
        return rng.normal(size=(n, dim)).astype(np.float32)

    def class_probs(x):
        return _softmax(3.0 * np.tanh(2.0 * x @ w1) @ w2)

    return _generated_task(seed, class_probs, sample_inputs, num_train, num_test)


def spiral_probs(x: np.ndarray, sharpness: float = 3.0, turns: float = 1.5) -> np.ndarray:
    """Class probabilities of the three-armed spiral at 2-D points ``x`` (N, 2): class k's
    logit is ``sharpness * cos(angle - turns * radius - 2 pi k / 3)``."""
    radius = np.linalg.norm(x, axis=1, keepdims=True)
    angle = np.arctan2(x[:, 1], x[:, 0])[:, None]
    offsets = 2 * np.pi * np.arange(3) / 3
    return _softmax(sharpness * np.cos(angle - turns * radius - offsets))


def spiral_task(seed: int, num_train=1000, num_test=20000) -> dict:
    """Three spiral arms in the plane: inputs N(0, 1.5^2 I_2), labels drawn from
    ``spiral_probs`` (Bayes-optimal: about 86% accuracy, NLL 0.35); same dict as
    ``teacher_task``."""

    def sample_inputs(rng, n):
        return (1.5 * rng.normal(size=(n, 2))).astype(np.float32)

    return _generated_task(seed, spiral_probs, sample_inputs, num_train, num_test)


def rotate_images(x: np.ndarray, angle: float, side: int = 8) -> np.ndarray:
    """Rotates flattened square images counter-clockwise by ``angle`` degrees about their centre.

    Bilinear interpolation, zero (background) outside the image, same shape as ``x``.

    Example:
      >>> img = np.arange(4.0).reshape(1, 4)  # [[0, 1], [2, 3]]
      >>> rotate_images(img, 90, side=2).reshape(2, 2)
      array([[1., 3.],
             [0., 2.]])
    """
    from scipy.ndimage import rotate

    images = np.asarray(x).reshape(-1, side, side)
    if angle % 360 == 0:
        return np.array(x, copy=True)
    rotated = rotate(images, angle, axes=(2, 1), reshape=False, order=1, mode="constant", cval=0)
    return np.clip(rotated, 0, None).reshape(np.shape(x)).astype(np.asarray(x).dtype)


def to_digits_format(images: np.ndarray) -> np.ndarray:
    """28 x 28 grey images -> 8 x 8 in [0, 1], the way scikit-learn's digits were made.

    The digits are 32 x 32 bitmaps counted in non-overlapping 4 x 4 blocks (0-16): pad to
    32 x 32, threshold at half intensity, count each block, divide by 16.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"expected images of shape (N, 28, 28), got {images.shape}")
    bitmaps = np.pad(images / images.max(initial=1.0) >= 0.5, ((0, 0), (2, 2), (2, 2)))
    blocks = bitmaps.reshape(-1, 8, 4, 8, 4).sum(axis=(2, 4))
    return (blocks / 16.0).reshape(-1, 64).astype(np.float32)


# ----- MNIST and Fashion-MNIST: IDX files ------------------------------------------------------

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_FOLDERS = {
    "mnist": ("mnist", "MNIST/raw", "MNIST"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw", "FashionMNIST"),
}


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (the MNIST format; gzipped if the name ends in .gz).

    Args:
      path: the file.

    Returns:
      The array, with the file's shape and element type (uint8 for images and labels).

    Raises:
      DataError: the file is not a well-formed IDX file.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error}") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{path}: the header announces shape {shape} ({expected} bytes of data) but the file "
            f"holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_folder(root: str, dataset: str, names: Sequence[str]) -> str:
    """The first candidate folder holding every file in ``names`` (each optionally .gz)."""
    candidates = [os.path.join(root, sub) for sub in _FOLDERS[dataset]]
    for folder in candidates:
        if all(_existing(folder, name) for name in names):
            return folder
    present = next((f for f in candidates if os.path.isdir(f)), None)
    found = (
        ""
        if present is None
        else (
            f" ({present} exists but lacks "
            f"{', '.join(n for n in names if not _existing(present, n))})"
        )
    )
    gz = " (each optionally gzipped, .gz)"
    raise DataError(
        f"{dataset}: no data found{found}. Put the files of the official release, "
        f"{', '.join(names)}{gz}, into {candidates[0]}/ or pass --datasetfolder DIR with "
        f"{os.path.relpath(candidates[0], root)}/ inside; this program downloads nothing."
    )


def _existing(folder: str, name: str) -> str | None:
    for candidate in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
        if os.path.isfile(candidate):
            return candidate
    return None


def load_idx_dataset(root: str, dataset: str) -> tuple[np.ndarray, ...]:
    """MNIST or Fashion-MNIST from their IDX files: (x_train, y_train, x_test, y_test)."""
    folder = _find_folder(root, dataset, tuple(_IDX_FILES.values()))
    arrays = {key: read_idx(_existing(folder, name)) for key, name in _IDX_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{dataset} in {folder}: {split} images of shape {images.shape} do not match "
                f"{split} labels of shape {labels.shape} (expected (N, rows, cols) and (N,))"
            )
    return tuple(
        arrays[key][..., None] if key.endswith("images") else arrays[key].astype(np.int32)
        for key in ("train_images", "train_labels", "test_images", "test_labels")
    )


# ----- CIFAR-10/100 and SVHN: the python-pickle releases ---------------------------------------

IMAGE_SHAPE = (32, 32, 3)


class DatasetSpec(NamedTuple):
    folder: str  # subfolder of --datasetfolder
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    archive: str


CIFAR_DATASETS = {
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


class Split(NamedTuple):
    images: np.ndarray  # uint8 (N, 32, 32, 3)
    labels: np.ndarray  # int32 (N,)


# --------------------------------------------------------------------------------------------
# Reading the files
# --------------------------------------------------------------------------------------------


def _missing_message(path: str, dataset: str, folder: str) -> str:
    spec = CIFAR_DATASETS[dataset]
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
            f"({type(e).__name__}: {e}). Unpack {CIFAR_DATASETS[dataset].archive} again."
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
            f"Unpack {CIFAR_DATASETS[dataset].archive} again."
        )
    # rows are 1024 red, 1024 green, 1024 blue values of a 32x32 image
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def load_cifar_split(folder: str, dataset: str, split: str) -> Split:
    """Read the ``"train"`` or ``"test"`` split of ``"cifar10"`` or ``"cifar100"``.

    Raises:
      DataError: a file is missing, truncated or malformed (the message says what to do).
    """
    if dataset not in CIFAR_DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; accepted: {sorted(CIFAR_DATASETS)}")
    spec = CIFAR_DATASETS[dataset]
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


def load_cifar_ood_images(folder: str, name: str) -> np.ndarray:
    """Test images (uint8, N x 32 x 32 x 3) of an out-of-distribution set; labels are unused.

    ``svhn`` reads the standard ``svhn/test_32x32.mat`` (MATLAB format, read with scipy,
    which scikit-learn brings along; scipy is needed only for this).
    """
    if name in CIFAR_DATASETS:
        return load_cifar_split(folder, name, "test").images
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
