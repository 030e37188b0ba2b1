"""Runs of the implicit-VI paper's program (``examples/implicit_vi_paper/train.py``).

The program saves the flags that define a run as a ``PaperRun``; ``load_image_data``,
``build_paper_training`` and ``initial_paper_state`` rebuild its data, network, generator,
optimizer, ``ivi.Trainer`` and checkpointed ``ivi.TrainState`` from them, both in the
program and in the uncertainty suite's evaluation of a run (``examples/uncertainty_eval.py
--run``). The generator configuration files are read by ``bdl_examples.paper_config``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
import optax

import implicit_vi as ivi
from bdl_examples.data import (
    load_cifar_split,
    load_digits_split,
    load_idx_dataset,
    validation_indices,
)
from bdl_examples.models import MLP, LeNet
from bdl_examples.paper_config import generator_from_config

# ----- runs of the implicit-VI paper's program ---------------------------------------------------

PAPER_CHECKPOINT = "checkpoint.npz"  # in a run folder, with results.json and training.png


@dataclasses.dataclass
class PaperRun:
    """The flags that define a run of ``examples/implicit_vi_paper/train.py`` (see its
    ``--help``), as JSON-able values: saved with every checkpoint, so that the run can be
    resumed (only with the same values) and rebuilt for evaluation."""

    dataset: str
    model: str  # "MLP" or "LeNet"
    mlp_widths: list[int]
    config: str | None  # the generator configuration's YAML text; None: the automatic one
    trunk: list[list[int]] | None
    accurate: bool  # ExactEntropy; otherwise SmallestSingularValue
    solver_iterations: int
    solver_tolerance: float | str  # "none": exactly solver_iterations iterations
    cold_start: bool
    entropy_samples: int  # K, the estimator's num_samples
    train_samples: int
    train_batch_size: int
    epochs: int
    lr: float
    randseed: int
    weight_noise: float | str  # "learned" or a fixed std
    prior_std: float | str  # "auto": each layer's initial std
    calibrate_output: bool
    prob_down_weight: float
    jacobi_down_weight: float
    proper_elbo: bool
    kl_weight: list[float]  # one value per run; the program trains one run per value
    validation_fraction: float


class ImageData(NamedTuple):
    x_train: np.ndarray  # (N, H, W, C) float32, standardised
    y_train: np.ndarray  # (N,) int32
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    x_val: np.ndarray | None  # the held-out validation split, if any
    y_val: np.ndarray | None


def load_image_data(
    dataset: str, root: str, *, validation_fraction: float = 0.0, seed: int = 0
) -> ImageData:
    """``"mnist"``, ``"fashion_mnist"`` (IDX files), ``"cifar10"`` (python batches) from the
    folder ``root``, or scikit-learn's ``"digits"`` (75% / 25%, a fixed split), as images with
    pixels scaled to [0, 1] and each channel standardised.

    With ``validation_fraction`` > 0 a stratified share of the training set (drawn with
    ``seed``) is held out as ``x_val, y_val``; the channel statistics are those of the rest.

    Raises:
      DataError: files missing or malformed (the message says where to put them).
    """
    if dataset == "digits":
        digits = load_digits_split(0)
        (x_train, y_train), (x_test, y_test) = digits["train"], digits["test"]
        x_train, x_test = x_train.reshape(-1, 8, 8, 1), x_test.reshape(-1, 8, 8, 1)
        num_classes = 10
    elif dataset == "cifar10":
        train, test = (load_cifar_split(root, "cifar10", split) for split in ("train", "test"))
        (x_train, y_train), (x_test, y_test) = train, test
        x_train, x_test = x_train / np.float32(255), x_test / np.float32(255)
        num_classes = 10
    else:  # the IDX files do not say how many classes there are: the labels do
        x_train, y_train, x_test, y_test = load_idx_dataset(root, dataset)
        x_train, x_test = x_train / np.float32(255), x_test / np.float32(255)
        num_classes = max(int(max(y_train.max(), y_test.max())) + 1, 2)
    x_val = y_val = None
    if validation_fraction > 0:
        held_out = validation_indices(y_train, validation_fraction, seed)
        kept = np.setdiff1d(np.arange(len(y_train)), held_out)
        x_val, y_val = x_train[held_out], y_train[held_out]
        x_train, y_train = x_train[kept], y_train[kept]
    mean = x_train.mean(axis=(0, 1, 2))
    std = np.maximum(x_train.std(axis=(0, 1, 2)), 1e-6)

    def standardise(x):
        return None if x is None else ((x - mean) / std).astype(np.float32)

    return ImageData(
        standardise(x_train),
        y_train.astype(np.int32),
        standardise(x_test),
        y_test.astype(np.int32),
        num_classes,
        standardise(x_val),
        y_val,
    )


def make_paper_network(model: str, *, mlp_widths: Sequence[int], num_classes: int):
    """The paper's networks: ``"MLP"`` (ReLU, ``mlp_widths``) or ``"LeNet"`` (LeNet-5)."""
    if model == "LeNet":
        return LeNet(num_classes=num_classes)
    if model == "MLP":
        return MLP(widths=tuple(mlp_widths), num_outputs=num_classes)
    raise ValueError(f"model must be 'MLP' or 'LeNet', got {model!r}")


def make_paper_generator(config: str | None, *, trunk: Sequence[Sequence[int]] | None):
    """The generator of a configuration in the published layout (YAML text), with the shared
    trunk's shapes ``trunk`` for a file without ``second_layer``; None: the library's
    automatic generator.

    Raises:
      ValueError: the text is not YAML or not a valid configuration.
    """
    if config is None:
        return None
    import yaml

    try:
        layers = yaml.safe_load(config)
    except yaml.YAMLError as error:
        raise ValueError(f"not a YAML file: {error}") from None
    return generator_from_config(layers, trunk_shapes=trunk)


def paper_entropy(run: PaperRun) -> ivi.ExactEntropy | ivi.SmallestSingularValue:
    """The entropy estimator of a run: ``ExactEntropy`` with ``--accurate``, else the
    smallest-singular-value bound with the run's solver; both on K = ``entropy_samples`` of
    the step's samples."""
    if run.accurate:
        return ivi.ExactEntropy(num_samples=run.entropy_samples)
    tolerance = None if run.solver_tolerance == "none" else run.solver_tolerance
    return ivi.SmallestSingularValue(
        run.solver_iterations, tolerance, num_samples=run.entropy_samples
    )


def paper_elbo_weights(run: PaperRun, num_train: int) -> tuple[float, float]:
    """``(kl_weight, prior_scale)`` of the library's tempered ELBO for a run.

    The paper weights the log prior by ``prob_down_weight / B`` and the entropy by
    ``jacobi_down_weight / B`` (B: the batch size), where the library weights them by
    ``prior_scale * kl_weight / N`` and ``kl_weight / N``: ``kl_weight = jacobi_down_weight
    * N / B`` and ``prior_scale = prob_down_weight / jacobi_down_weight``. With
    ``proper_elbo``: ``kl_weight`` = the run's beta and ``prior_scale = 1``.
    """
    if run.proper_elbo:
        (beta,) = run.kl_weight
        return float(beta), 1.0
    kl_weight = run.jacobi_down_weight * num_train / run.train_batch_size
    return kl_weight, run.prob_down_weight / run.jacobi_down_weight


def build_paper_training(run: PaperRun, *, x_example, num_classes: int, num_train: int):
    """The Bayesian network, the optimizer and the ``ivi.Trainer`` of a run.

    Args:
      run: the run's flags.
      x_example: one input batch (its shape sets the network's).
      num_classes: outputs of the network.
      num_train: N, the training-set size.

    Returns:
      ``(bnn, optimizer, trainer)``: Adam with amsgrad and a cosine-decayed learning rate,
      and ``bnn.trainer(optimizer, ...)`` with the run's samples, entropy estimator and
      ELBO weights (``paper_elbo_weights``). The network is initialised with
      ``fold_in(key(randseed), 3)``; ``initial_paper_state`` initialises the rest.

    Raises:
      ValueError: ``run.config`` is not a valid configuration.
    """
    base_key = jax.random.key(run.randseed)
    network = make_paper_network(run.model, mlp_widths=run.mlp_widths, num_classes=num_classes)
    params = network.init(jax.random.fold_in(base_key, 3), x_example)["params"]
    bnn = ivi.ImplicitBNN.from_linen(
        network,
        params,
        generator=make_paper_generator(run.config, trunk=run.trunk),
        weight_noise=run.weight_noise,
        prior_std=run.prior_std,
        calibrate_output=run.calibrate_output,
    )
    total_steps = run.epochs * (num_train // run.train_batch_size)
    optimizer = optax.amsgrad(optax.cosine_decay_schedule(run.lr, total_steps))
    kl_weight, prior_scale = paper_elbo_weights(run, num_train)
    trainer = bnn.trainer(
        optimizer,
        num_data=num_train,
        num_samples=run.train_samples,
        entropy=paper_entropy(run),
        kl_weight=kl_weight,
        prior_scale=prior_scale,
    )
    return bnn, optimizer, trainer


def initial_paper_state(run: PaperRun, bnn: ivi.ImplicitBNN, optimizer) -> ivi.TrainState:
    """A run's ``ivi.TrainState`` before its first step, the template of its checkpoints:
    the variational parameters from ``fold_in(key(randseed), 0)``, the optimizer's state and
    the entropy solver's random starting vectors (K, d), then its warm start.

    This is ``Trainer.init``, which depends only on the network, the optimizer and the
    entropy estimator (not on the ELBO's weights)."""
    trainer = bnn.trainer(
        optimizer, num_data=1, num_samples=run.train_samples, entropy=paper_entropy(run)
    )
    return trainer.init(jax.random.fold_in(jax.random.key(run.randseed), 0))
