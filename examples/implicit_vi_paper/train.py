"""Train a Bayesian neural network with implicit variational inference: the paper's program.

The training program of Uppal et al., "Implicit Variational Inference for High-Dimensional
Posteriors" (NeurIPS 2023), on this library: the same flags and defaults, the generator
configuration files in their published layout (``--config``), and the paper's down-weighted
loss,

    loss = -( mean_s mean_i log p(y_i | x_i, theta_s) + w_p mean_s log p(theta_s) + w_H H ),
    w_p = prob_down_weight / B,   w_H = jacobi_down_weight / B   (B: the batch size),

with the entropy H from the smallest-singular-value bound (``--accurate``: exact), Adam with
amsgrad and a cosine-decayed learning rate, S samples per step, and Bayesian model averaging
over fresh samples for every test batch. ``--proper_elbo`` uses the per-data-point ELBO
(w_p = w_H = 1/N) instead. The bound's eigen-solver starts from the previous step's vectors
and stops at the library's residual tolerance; the paper ran exactly 5 iterations from a
fresh start (``--cold_start --solver_tolerance none --solver_iterations 5``).

``--calibrated`` trains the library's calibrated posterior instead (docs/implicit_vi.md,
"Calibrated posteriors"): the per-data-point ELBO with its prior and entropy tempered by a
KL weight beta (``--kl_weight``), learned per-weight output noise starting at a tenth of each
layer's initial std (``--learn_noise --small_noise auto``, its learning rate 10x the
generator's, ``--noise_lr_scale 10``), the prior N(0, initial std^2) per layer (``--prior_std
auto``), and beta chosen from 0.3, 0.1, 0.03, 0.01 and 0.003 on a validation split of 15% of the
training set (``--validation_fraction 0.15``) that the program holds out: one run per beta
in a sub-folder ``kl_weight_BETA`` of the run folder, and the run folder's ``results.json``
names the chosen beta and reports its test metrics. Each of these flags can also be given
alone.

Data (nothing is downloaded; ``--datasetfolder`` defaults to ./data):
  mnist           DIR/mnist/ (or DIR/MNIST/raw/): train-images-idx3-ubyte,
                  train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte
                  (each optionally .gz), as released by the dataset's authors
  fashion_mnist   the same four files in DIR/fashion_mnist/ (or DIR/FashionMNIST/raw/)
  cifar10         DIR/cifar-10-batches-py/: data_batch_1 ... data_batch_5, test_batch (the
                  "python version" release, extracted)
  digits          scikit-learn's bundled 8x8 digits (75% train, 25% test)
Pixels are scaled to [0, 1] and standardised per channel with the training set's statistics.

The defaults are the published program's (``--train_batch_size 256 --epochs 100 --lr 7e-5``)
except on digits, which the paper did not use: there they would give 500 small steps in all,
so digits defaults to ``--train_batch_size 64 --epochs 30 --lr 1e-3`` (about 2 minutes on two
CPU cores).

Networks: ``--model MLP`` (784-400-400-10 on MNIST; ``--mlp_widths``) or ``--model LeNet``
(LeNet-5: conv 5x5 6, max-pool, conv 5x5 16, max-pool, dense 120, 84, 10, ReLU; the
convolutions pad the input ("SAME") on images smaller than 28 pixels, such as digits).

Each run has a folder RESULTSFOLDER/RUN_NAME (by default
examples/output/implicit_vi_train/DATASET_MODEL_CONFIG_seedSEED) holding ``checkpoint.pkl``
(written atomically after every epoch; ``--resume`` continues the run exactly where it
stopped), ``results.json`` (the arguments, the generator's size, a per-epoch log and the
final test metrics) and ``training.png`` (loss per epoch and a reliability diagram). A
progress bar shows each epoch on a terminal.

Usage:
  python examples/implicit_vi_train.py                    # digits, MLP, automatic generator
  python examples/implicit_vi_train.py --dataset mnist --model LeNet \\
      --config examples/configs/mnist_lenet.yaml --trunk none
  python examples/implicit_vi_train.py --dataset cifar10 --model LeNet \\
      --config examples/configs/cifar_lenet.yaml --resume
  python examples/implicit_vi_train.py --calibrated        # digits, beta on validation
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import pickle
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

EXAMPLES = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(EXAMPLES, ".."))
sys.path.insert(0, EXAMPLES)
import metrics  # noqa: E402
from progress import ProgressBar, atomic_open, write_json  # noqa: E402

import implicit_vi as ivi  # noqa: E402

DATASETS = ("mnist", "fashion_mnist", "cifar10", "digits")
MODELS = ("MLP", "LeNet")
# The published program's defaults, made for MNIST-sized data (234 steps per epoch). On the
# 1,347 training digits they would give 500 small steps in all, so digits has its own.
PAPER_DEFAULTS = {"train_batch_size": 256, "epochs": 100, "lr": 7e-5}
DIGITS_DEFAULTS = {"train_batch_size": 64, "epochs": 30, "lr": 1e-3}
CHECKPOINT = "checkpoint.pkl"
RESULTS = "results.json"
# The flags that define a run: a resumed run must use the same ones.
RUN_FLAGS = (
    "dataset",
    "model",
    "mlp_widths",
    "config",
    "trunk",
    "accurate",
    "solver_iterations",
    "solver_tolerance",
    "cold_start",
    "entropy_samples",
    "train_samples",
    "train_batch_size",
    "epochs",
    "lr",
    "randseed",
    "small_noise",
    "learn_noise",
    "noise_lr_scale",
    "prior_std",
    "prob_down_weight",
    "jacobi_down_weight",
    "proper_elbo",
    "kl_weight",
    "validation_fraction",
    "output_scale",
)
# Values of the flags added after a run may have been saved: an older checkpoint's run had them.
OLDER_RUN_SETTINGS = {
    "entropy_samples": None,
    "learn_noise": False,
    "noise_lr_scale": 1.0,
    "kl_weight": [1.0],
    "validation_fraction": 0.0,
}
# --calibrated: the library's calibrated posterior, with beta chosen on validation.
CALIBRATED = {
    "proper_elbo": True,
    "learn_noise": True,
    "small_noise": "auto",
    "prior_std": "auto",
    "noise_lr_scale": 10.0,
    "kl_weight": [0.3, 0.1, 0.03, 0.01, 0.003],
    "validation_fraction": 0.15,
}
PLAIN = {
    "small_noise": 1e-3,
    "prior_std": 1.0,
    "noise_lr_scale": 1.0,
    "kl_weight": [1.0],
    "validation_fraction": 0.0,
}


class DataError(Exception):
    """A data set's files are missing or malformed (the program exits with status 2)."""


class UsageError(Exception):
    """Inconsistent flags or run folder (the program exits with status 2)."""


# ----- data: the standard release formats --------------------------------------------------------

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
    "cifar10": ("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10"),
}
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


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
    gz = " (each optionally gzipped, .gz)" if dataset != "cifar10" else ""
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


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int32)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, KeyError, ValueError) as e:
        raise DataError(
            f"{path} is not a CIFAR-10 python batch (a pickled dict with 'data' and 'labels'): "
            f"{type(e).__name__}: {e}"
        ) from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise DataError(
            f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape} and "
            f"{labels.shape}"
        )
    # Each row: the red, green and blue 32 x 32 planes, row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar10(root: str) -> tuple[np.ndarray, ...]:
    """CIFAR-10 from the python-version batches: (x_train, y_train, x_test, y_test)."""
    folder = _find_folder(root, "cifar10", _CIFAR_FILES)
    train = [_read_cifar_batch(os.path.join(folder, name)) for name in _CIFAR_FILES[:5]]
    x_test, y_test = _read_cifar_batch(os.path.join(folder, "test_batch"))
    x_train = np.concatenate([x for x, _ in train])
    return x_train, np.concatenate([y for _, y in train]), x_test, y_test


def load_digits_dataset() -> tuple[np.ndarray, ...]:
    """scikit-learn's 8x8 digits, 75% / 25% stratified (a fixed split): pixels in 0..16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images[..., None],
        digits.target,
        test_size=0.25,
        stratify=digits.target,
        random_state=0,
    )
    return x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32)


@dataclass
class Data:
    x_train: np.ndarray  # (N, H, W, C) float32, standardised
    y_train: np.ndarray  # (N,) int32
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    x_val: np.ndarray | None = None  # the held-out validation split, if any
    y_val: np.ndarray | None = None


def validation_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified share ``fraction`` of the indices of ``labels`` (at least one per class
    with two or more examples), drawn with ``seed``.

    Example:
      >>> sorted(validation_indices(np.array([0, 0, 0, 0, 1, 1]), 0.25, seed=0) // 4)
      [0, 1]
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = min(len(members) - 1, max(1, round(fraction * len(members))))
        chosen.append(members[:count])
    return np.sort(np.concatenate(chosen))


def load_data(dataset: str, root: str, validation_fraction: float = 0.0, seed: int = 0) -> Data:
    """Loads a data set, scales pixels to [0, 1] and standardises each channel.

    With ``validation_fraction`` > 0 a stratified share of the training set (drawn with
    ``seed``) is held out as ``x_val, y_val``; the channel statistics are those of the rest.

    Raises:
      DataError: files missing or malformed (the message says where to put them).
    """
    if dataset == "digits":
        (x_train, y_train, x_test, y_test), max_value = load_digits_dataset(), 16.0
    elif dataset == "cifar10":
        (x_train, y_train, x_test, y_test), max_value = load_cifar10(root), 255.0
    else:
        (x_train, y_train, x_test, y_test), max_value = load_idx_dataset(root, dataset), 255.0
    x_train = x_train.astype(np.float32) / max_value
    x_test = x_test.astype(np.float32) / max_value
    labels = np.concatenate([y_train, y_test])
    if labels.min() < 0:
        raise DataError(f"{dataset}: negative labels")
    x_val = y_val = None
    if validation_fraction > 0:
        held_out = validation_indices(y_train, validation_fraction, seed)
        kept = np.setdiff1d(np.arange(len(y_train)), held_out)
        x_val, y_val = x_train[held_out], y_train[held_out]
        x_train, y_train = x_train[kept], y_train[kept]
    mean = x_train.mean(axis=(0, 1, 2))
    std = np.maximum(x_train.std(axis=(0, 1, 2)), 1e-6)
    return Data(
        (x_train - mean) / std,
        y_train,
        (x_test - mean) / std,
        y_test,
        max(int(labels.max()) + 1, 2),
        None if x_val is None else (x_val - mean) / std,
        y_val,
    )


# ----- networks -------------------------------------------------------------------------------


class MLP(nn.Module):
    """ReLU MLP on the flattened image."""

    widths: tuple[int, ...]
    num_classes: int

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for width in self.widths:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class LeNet(nn.Module):
    """LeNet-5 with ReLU and max pooling; "SAME" convolutions on images under 28 pixels."""

    num_classes: int

    @nn.compact
    def __call__(self, x):
        padding = "VALID" if min(x.shape[1:3]) >= 28 else "SAME"
        for channels in (6, 16):
            x = nn.relu(nn.Conv(channels, (5, 5), padding=padding)(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120)(x))
        x = nn.relu(nn.Dense(84)(x))
        return nn.Dense(self.num_classes)(x)


def make_network(args, num_classes: int) -> nn.Module:
    if args.model == "LeNet":
        return LeNet(num_classes)
    return MLP(tuple(args.mlp_widths), num_classes)


def load_generator(args) -> nn.Module | None:
    """The generator of ``--config`` (None: the library's automatic one).

    Raises:
      UsageError: the file cannot be read or is not a valid configuration.
    """
    if args.config is None:
        return None
    import yaml

    try:
        with open(args.config) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"--config {args.config}: cannot read it: {error}") from None
    try:
        return ivi.generator_from_config(config, trunk_shapes=args.trunk)
    except ValueError as error:
        hint = ""
        if "trunk_shapes" in str(error):
            hint = " (here: --trunk A1xB1,A2xB2, or --trunk none for a single head)"
        raise UsageError(f"--config {args.config}: {error}{hint}") from None


# ----- the training state, its checkpoint and the run folder -------------------------------------


def run_settings(args) -> dict:
    """The flags that define the run (saved with it; a resumed run must match them)."""
    settings = {name: getattr(args, name) for name in RUN_FLAGS}
    settings["mlp_widths"] = list(args.mlp_widths)
    settings["trunk"] = None if args.trunk is None else [list(s) for s in args.trunk]
    if args.config is not None:  # the file's content, wherever it lies
        with open(args.config) as f:
            settings["config"] = f.read()
    return settings


def save_checkpoint(path: str, state: dict) -> None:
    """Pickles ``state`` to ``path`` atomically: a reader (or a crash) sees the old checkpoint
    or the new one, never a partial file."""
    with atomic_open(path) as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)


def to_host(tree) -> list[np.ndarray]:
    """The leaves of a pytree as NumPy arrays (bit-exact copies)."""
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(jax.device_get(tree))]


def from_host(leaves: list[np.ndarray], like) -> object:
    """Rebuilds a pytree with the structure, shapes and dtypes of ``like`` from saved leaves."""
    reference = jax.tree_util.tree_leaves(like)
    if len(leaves) != len(reference) or any(
        np.shape(a) != np.shape(b) or np.asarray(a).dtype != b.dtype
        for a, b in zip(leaves, reference)
    ):
        raise UsageError("the checkpoint does not match this network and generator")
    return jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(like), [jnp.asarray(leaf) for leaf in leaves]
    )


# ----- training and evaluation --------------------------------------------------------------------

_LOGGED = ("loss", "expected_log_likelihood", "log_prior", "entropy", "elbo")


def evaluate(bnn, vi_params, inputs, key, num_samples: int, batch_size: int) -> np.ndarray:
    """Bayesian model average of the class probabilities on ``inputs``, with fresh samples
    for every batch."""
    probs = []
    for i, start in enumerate(range(0, len(inputs), batch_size)):
        x = inputs[start : start + batch_size]
        probs.append(
            np.asarray(
                bnn.predict_proba(
                    vi_params,
                    jax.random.fold_in(key, i),
                    x,
                    num_samples=num_samples,
                    chunk_size=min(num_samples, 10),
                )
            )
        )
    return np.concatenate(probs)


def save_plot(path: str, log: list[dict], probs: np.ndarray, labels: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    epochs = [row["epoch"] for row in log]
    # The loss holds the entropy's large constant; its change is what training moves.
    axes[0].plot(
        epochs,
        [row["loss"] - log[0]["loss"] for row in log],
        "o-",
        ms=3,
        label="loss - loss of epoch 1",
    )
    axes[0].plot(
        epochs,
        [-row["expected_log_likelihood"] for row in log],
        "s--",
        ms=3,
        label="-E[log lik] per data point",
    )
    axes[0].set_xlabel("epoch")
    axes[0].set_title("training")
    axes[0].legend()
    metrics.plot_reliability(axes[1], probs, labels, label="implicit VI")
    axes[1].set_title("test reliability")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_training(args, generator, x_example, num_classes: int, num_train: int):
    """The Bayesian network, the optimizer and the jitted training step of a run.

    Args:
      args: the parsed flags.
      generator: ``load_generator(args)``.
      x_example: one input batch (its shape sets the network's).
      num_classes: outputs of the network.
      num_train: N, the training-set size.

    Returns:
      ``(bnn, optimizer, train_step)``; ``train_step(vi_params, opt_state, key, batch,
      eigvecs)`` is ``ImplicitBNN.make_train_step``'s. The generator is initialised with
      ``jax.random.fold_in(jax.random.key(args.randseed), 0)``.
    """
    base_key = jax.random.key(args.randseed)
    network = make_network(args, num_classes)
    params = network.init(jax.random.fold_in(base_key, 3), x_example)["params"]
    bnn = ivi.ImplicitBNN.from_linen(
        network,
        params,
        generator=generator,
        sigma=args.small_noise,
        learn_sigma=args.learn_noise,
        prior_std=args.prior_std,
        output_scale=None if args.output_scale == "none" else "auto",
        key=jax.random.fold_in(base_key, 0),
    )
    batch_size = args.train_batch_size
    total_steps = args.epochs * (num_train // batch_size)
    optimizer = optax.amsgrad(optax.cosine_decay_schedule(args.lr, total_steps))
    if args.noise_lr_scale != 1.0:
        optimizer = optax.chain(optimizer, ivi.scale_noise_updates(args.noise_lr_scale))
    if args.proper_elbo:  # the per-data-point ELBO (1/N each), tempered by beta
        (beta,) = args.kl_weight
        weights = {"prior_weight": beta / num_train, "entropy_weight": beta / num_train}
    else:
        weights = {
            "prior_weight": args.prob_down_weight / batch_size,
            "entropy_weight": args.jacobi_down_weight / batch_size,
        }
    train_step = bnn.make_train_step(
        optimizer,
        num_data=num_train,
        num_samples=args.train_samples,
        entropy="exact" if args.accurate else "smallest_sv",
        **solver_options(args),
        **weights,
    )
    return bnn, optimizer, train_step


def train(args) -> dict:
    """Runs (or resumes) one training run; returns the results written to results.json."""
    data = load_data(args.dataset, args.datasetfolder, args.validation_fraction, args.randseed)
    num_train, batch_size = len(data.x_train), args.train_batch_size
    if batch_size > num_train:
        raise UsageError(
            f"--train_batch_size {batch_size} exceeds the {num_train} training examples"
        )
    generator = load_generator(args)
    settings = run_settings(args)
    run_dir = run_folder(args)
    checkpoint_path = os.path.join(run_dir, CHECKPOINT)
    checkpoint = None
    if os.path.exists(checkpoint_path):
        if not args.resume:
            raise UsageError(
                f"{run_dir} already holds a checkpoint: pass --resume to continue that run, or "
                "--run_name NAME for a new one"
            )
        with open(checkpoint_path, "rb") as f:
            checkpoint = pickle.load(f)
        saved = OLDER_RUN_SETTINGS | checkpoint["settings"]
        changed = [f"--{name}" for name in RUN_FLAGS if saved.get(name) != settings[name]]
        if changed:
            raise UsageError(
                f"--resume: the run in {run_dir} was started with other values of "
                f"{', '.join(changed)}; a resumed run must use the same settings (or pass "
                "--run_name NAME for a new run)"
            )
    elif args.resume:
        print(f"no checkpoint in {run_dir}: starting the run from scratch")
    os.makedirs(run_dir, exist_ok=True)

    base_key = jax.random.key(args.randseed)
    init_key, step_key, eval_key = (jax.random.fold_in(base_key, i) for i in range(3))
    bnn, optimizer, train_step = build_training(
        args, generator, data.x_train[:1], data.num_classes, num_train
    )
    report = bnn.report()
    print(
        f"{args.dataset}: {num_train} training and {len(data.x_test)} test images of shape "
        f"{data.x_train.shape[1:]}; {args.model}, "
        f"{'generator ' + args.config if args.config else 'automatic generator'}"
    )
    print(report)
    steps_per_epoch = num_train // batch_size

    vi_params = bnn.init(init_key)
    opt_state = optimizer.init(vi_params)
    eigvecs = None  # the eigen-solver's start: fresh at the first step, then the last vectors
    log, first_epoch, train_seconds = [], 0, 0.0
    if checkpoint is not None:
        vi_params, opt_state = from_host(checkpoint["state"], (vi_params, opt_state))
        if checkpoint.get("eigvecs") is not None:
            eigvecs = jnp.asarray(checkpoint["eigvecs"])
        log, first_epoch = checkpoint["log"], checkpoint["epoch"]
        train_seconds = checkpoint["train_seconds"]
        print(f"resumed {run_dir} after epoch {first_epoch}")

    def results(status: str, test_metrics: dict | None = None, validation=None) -> dict:
        return {
            "status": status,
            "args": dict(vars(args)),
            "run_folder": run_dir,
            "num_train": num_train,
            "num_test": len(data.x_test),
            "generator": {
                "generator_params": report.generator_params,
                "stochastic_params": report.stochastic_params,
                "generator_output": report.generator_output,
                "latent_dim": report.latent_dim,
            },
            "steps_per_epoch": steps_per_epoch,
            "train_seconds": train_seconds,
            "log": log,
            "validation": validation,
            "test": test_metrics,
        }

    last_epoch = args.epochs
    if args.stop_after is not None:
        last_epoch = min(args.epochs, first_epoch + args.stop_after)
    for epoch in range(first_epoch, last_epoch):
        order = np.random.default_rng([args.randseed, epoch]).permutation(num_train)
        sums, solver_iterations = dict.fromkeys(_LOGGED, 0.0), 0
        bar = ProgressBar(steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}")
        start = time.perf_counter()
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            step = epoch * steps_per_epoch + i
            vi_params, opt_state, aux = train_step(
                vi_params,
                opt_state,
                jax.random.fold_in(step_key, step),
                (data.x_train[idx], data.y_train[idx]),
                None if args.cold_start else eigvecs,
            )
            eigvecs = aux["eigvecs"]
            for name in _LOGGED:
                sums[name] += float(aux[name])
            solver_iterations += int(aux["solver_iterations"])
            bar.update(i + 1, f"loss {sums['loss'] / (i + 1):.4f}")
        bar.close()
        seconds = time.perf_counter() - start
        train_seconds += seconds
        row = {"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()}}
        row["solver_iterations"] = solver_iterations / steps_per_epoch  # mean of the per-step max
        row["seconds"] = seconds
        log.append(row)
        save_checkpoint(
            checkpoint_path,
            {
                "epoch": epoch + 1,
                "settings": settings,
                "state": to_host((vi_params, opt_state)),
                "eigvecs": None if eigvecs is None else np.asarray(eigvecs),
                "log": log,
                "train_seconds": train_seconds,
            },
        )
        write_json(os.path.join(run_dir, RESULTS), results("running"))
        print(
            f"epoch {epoch + 1:>4}/{args.epochs}  loss {row['loss']:.4f}  "
            f"E[log lik] {row['expected_log_likelihood']:.4f}  entropy {row['entropy']:.4g}  "
            f"({seconds:.1f} s)",
            flush=True,
        )
    if last_epoch < args.epochs:
        print(f"stopped after epoch {last_epoch} (--stop_after); continue with --resume")
        return results("stopped")

    start = time.perf_counter()
    probs = evaluate(bnn, vi_params, data.x_test, eval_key, args.test_samples, args.test_batch_size)
    test_metrics = metrics.classification_metrics(probs, data.y_test)
    test_metrics["num_samples"] = args.test_samples
    test_metrics["seconds"] = time.perf_counter() - start
    validation = None
    if data.x_val is not None:
        val_key = jax.random.fold_in(eval_key, 1)
        val_probs = evaluate(
            bnn, vi_params, data.x_val, val_key, args.test_samples, args.test_batch_size
        )
        validation = metrics.classification_metrics(val_probs, data.y_val)
        print(f"validation ({len(data.y_val)} images): NLL {validation['nll']:.4f}")
    final = results("finished", test_metrics, validation)
    write_json(os.path.join(run_dir, RESULTS), final)
    save_plot(os.path.join(run_dir, "training.png"), log, probs, data.y_test)
    print(
        f"test ({len(data.y_test)} images, {args.test_samples} sampled networks per batch): "
        + "  ".join(f"{k} {test_metrics[k]:.4f}" for k in ("accuracy", "nll", "brier", "ece"))
    )
    print(f"results in {run_dir}/ ({RESULTS}, training.png, {CHECKPOINT})")
    return final


def run_folder(args) -> str:
    """RESULTSFOLDER/RUN_NAME, the name by default from the data set, model, config and seed."""
    run_name = args.run_name or "_".join(
        [
            args.dataset,
            args.model,
            "auto" if args.config is None else os.path.splitext(os.path.basename(args.config))[0],
            f"seed{args.randseed}",
        ]
    )
    return os.path.join(args.resultsfolder, run_name)


def select_kl_weight(args) -> dict:
    """One run per ``--kl_weight`` value, each in a sub-folder ``kl_weight_BETA`` of the run
    folder (resumable on its own), and the choice of the lowest validation NLL.

    Returns (and writes to the run folder's results.json) the chosen beta, every candidate's
    validation and test metrics, and the chosen run's test metrics and folder.
    """
    run_dir = run_folder(args)
    candidates = {}
    for beta in args.kl_weight:
        print(f"--- kl_weight {beta:g} ({len(candidates) + 1} of {len(args.kl_weight)})")
        one = argparse.Namespace(**vars(args))
        one.kl_weight, one.resultsfolder, one.run_name = [beta], run_dir, f"kl_weight_{beta:g}"
        result = train(one)
        if result["status"] != "finished":
            return {"status": result["status"], "run_folder": run_dir}
        candidates[f"{beta:g}"] = result
    chosen = min(candidates, key=lambda b: candidates[b]["validation"]["nll"])
    summary = {
        "status": "finished",
        "args": dict(vars(args)),
        "run_folder": run_dir,
        "selected": {"kl_weight": float(chosen), "run_folder": candidates[chosen]["run_folder"]},
        "candidates": {
            b: {"validation": r["validation"], "test": r["test"]} for b, r in candidates.items()
        },
        "test": candidates[chosen]["test"],
    }
    write_json(os.path.join(run_dir, RESULTS), summary)
    for b, r in candidates.items():
        print(
            f"kl_weight {b:>6}: validation NLL {r['validation']['nll']:.4f}  "
            f"test NLL {r['test']['nll']:.4f}  ECE {r['test']['ece']:.4f}"
            + ("   <- chosen" if b == chosen else "")
        )
    return summary


# ----- command line ------------------------------------------------------------------------------


def _number(kind: str, minimum: float, strict: bool, cast=float):
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        ok = value is not None and math.isfinite(value)
        ok = ok and (value > minimum if strict else value >= minimum)
        if not ok:
            relation = ">" if strict else ">="
            raise argparse.ArgumentTypeError(f"must be {kind} {relation} {minimum:g}, got {text!r}")
        return value

    return parse


def _or_auto(parse):
    def parse_or_auto(text: str):
        return "auto" if text.lower() == "auto" else parse(text)

    return parse_or_auto


def _flag_text(value) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, list) else str(value)


def _kl_weights(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"must be comma-separated numbers > 0, e.g. 0.3,0.1,0.03, got {text!r}"
        )
    return values


def _tolerance(text: str) -> float | str:
    if text.lower() == "none":
        return "none"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1) or none, got {text!r}")
    return value


def solver_options(args) -> dict:
    """The eigen-solver's options for ``elbo_loss``; flags left out keep the library's defaults."""
    options = {}
    if args.solver_iterations is not None:
        options["num_iterations"] = args.solver_iterations
    if args.solver_tolerance is not None:
        options["tolerance"] = None if args.solver_tolerance == "none" else args.solver_tolerance
    if args.entropy_samples is not None:
        options["entropy_samples"] = args.entropy_samples
    return options


def _shape_pair(text: str) -> list[int]:
    rows, _, cols = text.lower().partition("x")
    if not (rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0):
        raise ValueError(text)
    return [int(rows), int(cols)]


def _trunk(text: str) -> list[list[int]]:
    if text.lower() == "none":
        return []
    try:
        shapes = [_shape_pair(part) for part in text.split(",")]
    except ValueError:
        shapes = []
    if len(shapes) != 2:
        raise argparse.ArgumentTypeError(
            f"must be two matrix shapes A1xB1,A2xB2 (e.g. 128x128,160x128) or none, got {text!r}"
        )
    return shapes


def _widths(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        widths = [0]
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated positive integers, e.g. 400,400, got {text!r}"
        )
    return widths


def build_parser() -> argparse.ArgumentParser:
    positive_int = _number("an integer", 1, False, int)
    positive = _number("a number", 0, True)
    non_negative = _number("a number", 0, False)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--model", choices=MODELS, default="MLP")
    p.add_argument(
        "--mlp_widths", type=_widths, default=[400, 400], help="hidden widths of the MLP"
    )
    p.add_argument(
        "--config",
        help="generator configuration, a YAML file in the published layout (default: the "
        "library's automatic multi-head generator)",
    )
    p.add_argument(
        "--trunk",
        type=_trunk,
        help="for --config files without second_layer: the shared trunk's shapes A1xB1,A2xB2, "
        "or none (a single head that reads the noise)",
    )
    p.add_argument(
        "--accurate", action="store_true", help="exact entropy (default: the scalable bound)"
    )
    p.add_argument(
        "--solver_iterations",
        type=positive_int,
        metavar="N",
        help="the eigen-solver's iterations for the scalable bound: the cap with a tolerance, "
        f"the exact count without (default: the library's, {ivi.SOLVER_MAX_ITERATIONS})",
    )
    p.add_argument(
        "--solver_tolerance",
        type=_tolerance,
        metavar="TOL",
        help="the eigen-solver's relative residual at which it stops, or none for exactly "
        f"--solver_iterations iterations (default: the library's, {ivi.SOLVER_TOLERANCE:g})",
    )
    p.add_argument(
        "--cold_start",
        action="store_true",
        help="start the eigen-solver afresh every step (default: from the previous step's "
        "vectors); the paper's setting is --cold_start --solver_tolerance none "
        "--solver_iterations 5",
    )
    p.add_argument(
        "--entropy_samples",
        type=positive_int,
        metavar="K",
        help="estimate the entropy on K of the S samples per step (unbiased, more variance; "
        "default: all S). With --solver_tolerance none --solver_iterations 5 and K = 1 the "
        "paper's MNIST step is the cheapest (bench/README.md)",
    )
    p.add_argument("--train_samples", type=positive_int, default=10, help="S per step")
    p.add_argument("--train_batch_size", type=positive_int, help="B (default 256; digits: 64)")
    p.add_argument("--epochs", type=positive_int, help="default 100 (digits: 30)")
    p.add_argument(
        "--lr",
        type=positive,
        help="initial learning rate, cosine-decayed (default 7e-5; digits: 1e-3)",
    )
    p.add_argument("--randseed", type=int, default=123)
    positive_or_auto = _or_auto(positive)
    p.add_argument(
        "--calibrated",
        action="store_true",
        help="the calibrated posterior, beta chosen on validation: "
        + " ".join(f"--{k} {_flag_text(v)}" for k, v in CALIBRATED.items()).replace(" True", ""),
    )
    p.add_argument(
        "--small_noise",
        type=positive_or_auto,
        help="output noise sigma (default 1e-3); with --learn_noise its initial value, auto: a "
        "tenth of each layer's initial std",
    )
    p.add_argument(
        "--learn_noise",
        action="store_true",
        help="learn one output-noise std per weight, starting at --small_noise "
        "(make_model(learn_sigma=True))",
    )
    p.add_argument(
        "--noise_lr_scale",
        type=positive,
        help="learning rate of a learned noise, times --lr (default 1)",
    )
    p.add_argument(
        "--prior_std",
        type=positive_or_auto,
        help="std of the Gaussian prior (default 1); auto: each layer's initial std",
    )
    p.add_argument(
        "--prob_down_weight",
        type=non_negative,
        default=8.5e-4,
        help="weight of the log prior, times 1/batch size (the paper's down-weighting)",
    )
    p.add_argument(
        "--jacobi_down_weight",
        type=non_negative,
        default=1.0,
        help="weight of the entropy, times 1/batch size",
    )
    p.add_argument(
        "--proper_elbo",
        action="store_true",
        help="weight prior and entropy 1/N (the per-data-point ELBO) instead of the two above",
    )
    p.add_argument(
        "--kl_weight",
        type=_kl_weights,
        metavar="BETA[,BETA...]",
        help="with --proper_elbo: weight prior and entropy beta/N, a tempered ELBO (default 1); "
        "several values: one run each, the lowest validation NLL chosen",
    )
    p.add_argument(
        "--validation_fraction",
        type=_number("a number", 0, False),
        help="share of the training set held out for validation (default 0: none)",
    )
    p.add_argument(
        "--output_scale",
        choices=("auto", "none"),
        default="auto",
        help="auto: calibrate the generator output per layer (the library's default); "
        "none: the raw generator output, as in the paper",
    )
    p.add_argument(
        "--test_samples",
        type=positive_int,
        default=100,
        help="sampled networks averaged for every test batch",
    )
    p.add_argument("--test_batch_size", type=positive_int, default=1000)
    p.add_argument("--datasetfolder", default="data")
    p.add_argument(
        "--resultsfolder",
        default=os.path.join(EXAMPLES, "output", "implicit_vi_train"),
        help="where run folders go (default: examples/output/implicit_vi_train)",
    )
    p.add_argument("--run_name", help="the run folder's name (default from the flags)")
    p.add_argument("--resume", action="store_true", help="continue the run from its checkpoint")
    p.add_argument(
        "--stop_after",
        type=positive_int,
        metavar="EPOCHS",
        help="stop after this many epochs in this call (checkpointed; continue with --resume)",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags, with the defaults that depend on the data set filled in (exit 2 on bad ones)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = DIGITS_DEFAULTS if args.dataset == "digits" else PAPER_DEFAULTS
    defaults = defaults | (CALIBRATED if args.calibrated else PLAIN)
    for name, value in defaults.items():
        if getattr(args, name) is None or getattr(args, name) is False:
            setattr(args, name, value)
    if args.trunk is not None and args.config is None:
        parser.error("--trunk only applies with --config")
    if args.small_noise == "auto" and not args.learn_noise:
        parser.error("--small_noise auto (a tenth of each layer's std) needs --learn_noise")
    if args.kl_weight != [1.0] and not args.proper_elbo:
        parser.error("--kl_weight tempers the per-data-point ELBO: it needs --proper_elbo")
    if args.entropy_samples is not None and args.entropy_samples > args.train_samples:
        parser.error(
            f"--entropy_samples must be in [1, --train_samples={args.train_samples}], got "
            f"{args.entropy_samples}"
        )
    if not 0 <= args.validation_fraction < 1:
        parser.error(f"--validation_fraction must be in [0, 1), got {args.validation_fraction}")
    if len(args.kl_weight) > 1 and args.validation_fraction == 0:
        parser.error(
            "several --kl_weight values are chosen on validation: set --validation_fraction"
        )
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Parses the flags and trains; exits with status 2 on bad flags, data or run folder."""
    args = parse_args(argv)
    try:
        return select_kl_weight(args) if len(args.kl_weight) > 1 else train(args)
    except (DataError, UsageError) as error:
        print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
