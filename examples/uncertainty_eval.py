"""Uncertainty evaluation suite: MAP, IVON and implicit VI trained in one harness, compared on
held-out data, under dataset shift and out of distribution.

In the style of Laplace Redux (Daxberger et al., NeurIPS 2021), every method gets the same
network (an MLP), the same training data, the same batch size and the same number of epochs.
Each task's training set is split once into the data every method trains on and a validation
split (``--validation-fraction``, 15%) that only the methods which choose something use:

  - MAP: AdamW on the cross-entropy (weight decay as the prior);
  - MAP + temperature scaling: the same network, its logits divided by the temperature that
    minimises the validation NLL (Guo et al., 2017), the standard post-hoc calibration;
  - IVON: ``ivon.py``, Bayesian model average over K posterior samples;
  - IVON, ess on validation: the same with the effective sample size (its temperature)
    chosen on the validation split from ``IVON_ESS_SCALES`` x N, as many trainings as the
    calibrated implicit VI;
  - last-layer implicit VI: ``implicit_vi.py`` with only the last Dense layer stochastic;
  - implicit VI: every weight stochastic, the library's defaults (the paper's fixed sigma);
  - implicit VI, learned noise: one learned output-noise std per weight;
  - implicit VI, calibrated: learned noise starting at a tenth of each layer's initial weight
    std, the prior N(0, initial std^2) per layer, and the KL weight beta of the tempered ELBO
    chosen on the validation split from ``KL_WEIGHTS`` (docs/implicit_vi.md, "Calibrated
    posteriors").

Tasks (``--tasks``; nothing is downloaded):

  digits      scikit-learn's 8x8 digits (1,797 images, 25% test): the held-out test set, and
              the same images rotated by each of ``--angles`` degrees (dataset shift);
  digits-ood  a network trained on the digits 0-4 tells its test images from the digits 5-9
              (AUROC by max probability and by predictive entropy); with ``--ood-folder`` also
              from MNIST / Fashion-MNIST test images (idx files, reduced to 8x8 the way the
              digits were made) when those files are there;
  teacher     16-D Gaussian inputs, 5 classes, each label drawn from the class probabilities
              of a fixed random tanh network (2,000 training, 20,000 test points);
  spiral      2-D Gaussian inputs, 3 classes, labels drawn from a three-armed spiral's class
              probabilities (1,000 training, 20,000 test points).

The two generated tasks know the true class probabilities p(y | x), so the suite also prints
the Bayes-optimal predictor's metrics (the best any method can do), and their large test sets
measure ECE to about 0.01; the digits' 450 test images cannot separate ECEs below about 0.025
("calibrated ECE 95%", ``metrics.calibrated_ece``: the 95% quantile of the ECE a perfectly
calibrated model with the same predictions shows on that test set).

Reported as mean ± std over ``--seeds`` seeds (different splits, training draws,
initialisations and sampling keys), with the metrics of ``examples/metrics.py`` (ECE with 15
bins). The tables are printed, everything goes to ``examples/output/uncertainty_eval.json``
and the plots (reliability diagrams, metrics against rotation angle, predictive-entropy
histograms in and out of distribution, the spiral's predictive maps) to
``examples/output/uncertainty_eval_*.png``.

  python examples/uncertainty_eval.py                    # every task, 1 seed: ~20 min on 2 cores
  python examples/uncertainty_eval.py --seeds 3          # the README's tables
  python examples/uncertainty_eval.py --tasks spiral --methods map,ivi-val --epochs 20
  python examples/uncertainty_eval.py --tasks digits-ood --ood-folder ~/data/fashion_mnist

``--run FOLDER`` also evaluates a trained run of ``examples/implicit_vi_train.py`` (its own
network, generator and test set, rebuilt from the checkpoint's flags): test metrics and, for
one-channel square images (digits, MNIST, Fashion-MNIST), the same rotations. ``--seeds 0``
evaluates only the run.

  python examples/implicit_vi_train.py --run_name digits_run
  python examples/uncertainty_eval.py --run examples/output/implicit_vi_train/digits_run --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from implicit_vi_train import DataError, read_idx  # noqa: E402
from metrics import (  # noqa: E402
    calibrated_ece,
    classification_metrics,
    nll,
    ood_metrics,
    plot_reliability,
    predictive_entropy,
)

import implicit_vi as ivi  # noqa: E402
import ivon  # noqa: E402

OUTPUT = os.path.join(HERE, "output")
METHODS = {
    "map": "MAP (AdamW)",
    "map-ts": "MAP + temperature scaling",
    "ivon": "IVON (BMA)",
    "ivon-val": "IVON, ess on validation",
    "ll-ivi": "last-layer implicit VI",
    "ivi": "implicit VI",
    "ivi-ls": "implicit VI, learned noise",
    "ivi-val": "implicit VI, calibrated",
}
DEFAULT_METHODS = ("map", "map-ts", "ivon", "ivon-val", "ivi", "ivi-val")
TASKS = {
    "digits": "held-out digits (10 classes) and their rotations",
    "digits-ood": "digits 0-4, with the digits 5-9 out of distribution",
    "teacher": "teacher network (16-D, 5 classes)",
    "spiral": "three-armed spiral (2-D, 3 classes)",
}
# The calibrated implicit VI's candidate KL weights (the tempered ELBO's beta) and IVON's
# candidate effective sample sizes (x N): five trainings each, chosen by validation NLL.
KL_WEIGHTS = (0.3, 0.1, 0.03, 0.01, 0.003)
IVON_ESS_SCALES = (0.1, 0.3, 1.0, 3.0, 10.0)
SIDE = 8  # the digits are 8 x 8 images
IDX_NAMES = ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte", "train-images-idx3-ubyte")

Predict = Callable[[jax.Array, np.ndarray], np.ndarray]


# ----- data ----------------------------------------------------------------------------------


def load_digits_split(seed: int, classes: Sequence[int] | None = None, test_fraction=0.25):
    """A stratified train/test split of scikit-learn's digits, pixels in [0, 1].

    Args:
      seed: the split's random seed.
      classes: keep only these digits (relabelled 0..len-1 in the given order); the images of
        the other digits are returned as ``"ood"``. None: all ten.
      test_fraction: share of each class held out for testing.

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
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
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
      >>> len(split["train"][0]), sorted(split["val"][1])
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


def rotate_images(x: np.ndarray, angle: float, side: int = SIDE) -> np.ndarray:
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


def load_ood_folder(folder: str, limit: int = 2000) -> np.ndarray | None:
    """The first ``limit`` images of the first idx image file found in ``folder``, as digits.

    Returns None (after printing why) when the folder holds none of the expected files.
    """
    for name in IDX_NAMES:
        for candidate in (name, name + ".gz"):
            path = os.path.join(folder, candidate)
            if os.path.exists(path):
                return to_digits_format(read_idx(path)[:limit])
    print(f"no idx image file ({', '.join(IDX_NAMES)}[.gz]) in {folder}: second OOD set skipped")
    return None


# ----- the network and the methods -----------------------------------------------------------


class MLP(nn.Module):
    """The network every method trains: Dense-ReLU layers of ``hidden`` units, then logits."""

    hidden: tuple[int, ...] = (128, 128)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


def epoch_batches(key, x, y, batch_size):
    """One epoch of shuffled minibatches stacked for ``lax.scan`` (the remainder is dropped)."""
    steps = len(x) // batch_size
    order = jax.random.permutation(key, len(x))[: steps * batch_size]
    return x[order].reshape(steps, batch_size, -1), y[order].reshape(steps, batch_size)


def _fit(step, state, x, y, *, epochs, batch_size, key, label, verbose=True):
    """Runs ``step(state, key, batch) -> (state, aux)`` for ``epochs`` epochs (jitted scans)."""
    x, y = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def run_epoch(state, key):
        key, shuffle = jax.random.split(key)

        def body(carry, batch):
            state, key = carry
            key, sub = jax.random.split(key)
            state, aux = step(state, sub, batch)
            return (state, key), aux

        (state, key), aux = jax.lax.scan(
            body, (state, key), epoch_batches(shuffle, x, y, batch_size)
        )
        return state, key, jax.tree_util.tree_map(jnp.mean, aux)

    start = time.perf_counter()
    history = []
    for epoch in range(1, epochs + 1):
        state, key, aux = run_epoch(state, key)
        history.append({k: float(v) for k, v in aux.items()})
        if verbose and (epoch % max(1, epochs // 4) == 0 or epoch == epochs):
            shown = "  ".join(f"{k} {v:.4f}" for k, v in history[-1].items())
            print(
                f"    {label:<8} epoch {epoch:4d}/{epochs}  {shown}  "
                f"({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    return state, history, time.perf_counter() - start


def _cross_entropy(model, params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _fit_cross_entropy(
    model, params, data, optimizer, *, epochs, batch_size, seed, label, sample=None
):
    """Optax training on the cross-entropy of ``data["train"]``; the gradient is taken at
    ``sample(key, params, opt_state) -> (at, opt_state)`` (None: at ``params``). Returns
    ``(params, opt_state, history, seconds)``."""

    def step(state, key, batch):
        params, opt_state = state
        at, opt_state = (params, opt_state) if sample is None else sample(key, params, opt_state)
        loss, grads = jax.value_and_grad(_cross_entropy, argnums=1)(model, at, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

    x, y = data["train"]
    (params, opt_state), history, seconds = _fit(
        step,
        (params, optimizer.init(params)),
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        key=jax.random.key(seed),
        label=label,
    )
    return params, opt_state, history, seconds


def train_map(
    model,
    params,
    data,
    *,
    epochs,
    batch_size,
    seed,
    lr=1e-3,
    weight_decay=1e-4,
    temperature_scaling=False,
    **_,
):
    """AdamW with a cosine schedule; returns ``(predict, info)``. With ``temperature_scaling``
    the logits are divided by the temperature with the lowest NLL on ``data["val"]``."""
    steps = epochs * (len(data["train"][0]) // batch_size)
    optimizer = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)
    params, _, history, seconds = _fit_cross_entropy(
        model, params, data, optimizer, epochs=epochs, batch_size=batch_size, seed=seed, label="MAP"
    )
    logits = jax.jit(lambda x: model.apply({"params": params}, x))
    info = {"history": history, "train_seconds": seconds}
    temperature = 1.0
    if temperature_scaling:
        x_val, y_val = _validation(data)
        temperature = fit_temperature(np.asarray(logits(x_val)), y_val)
        info["selected"] = {"temperature": temperature}
    return (lambda key, x: np.asarray(jax.nn.softmax(logits(x) / temperature))), info


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T in [0.05, 20] minimising the NLL of ``softmax(logits / T)``.

    A grid of 200 log-spaced values refined by golden-section search; the NLL is convex in
    1/T, so the result is the global minimiser within the range.

    Example:
      >>> logits = np.array([[4.0, 0.0], [4.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
      >>> round(fit_temperature(logits, np.array([0, 0, 1, 1])), 2)  # 3 of 4 right: p = 0.75
      3.64
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)

    def nll(log_t):
        scaled = logits / np.exp(log_t)
        scaled -= scaled.max(1, keepdims=True)
        log_norm = np.log(np.exp(scaled).sum(1))
        return float(np.mean(log_norm - scaled[np.arange(len(labels)), labels]))

    grid = np.linspace(np.log(0.05), np.log(20.0), 200)
    best = grid[int(np.argmin([nll(t) for t in grid]))]
    step = grid[1] - grid[0]
    bounds = (max(grid[0], best - step), min(grid[-1], best + step))
    return float(np.exp(minimize_scalar(nll, bounds=bounds, method="bounded").x))


def _validation(data: dict) -> tuple[np.ndarray, np.ndarray]:
    if data.get("val") is None:
        raise ValueError(
            "this method chooses on a validation split: pass data with a 'val' entry "
            "(hold_out(data, fraction, seed))"
        )
    return data["val"]


def select_on_validation(train: Callable, candidates: Sequence, data: dict, key, name: str):
    """Trains ``train(value) -> (predict, info)`` for each candidate value and keeps the one
    whose Bayesian model average has the lowest NLL on ``data["val"]``.

    Returns:
      ``(predict, info)`` of the chosen candidate; ``info["selected"]`` holds ``{name:
      value}`` and ``info["validation_nll"]`` every candidate's validation NLL;
      ``info["train_seconds"]`` is the total over the candidates.
    """
    x_val, y_val = _validation(data)
    best, scores, seconds = None, {}, 0.0
    for value in candidates:
        predict, info = train(value)
        scores[str(value)] = nll(predict(key, x_val), y_val)
        seconds += info["train_seconds"]
        if best is None or scores[str(value)] < best[0]:
            best = (scores[str(value)], value, predict, info)
    _, value, predict, info = best
    print(f"    chosen on validation: {name} = {value} (NLL {scores[str(value)]:.4f})", flush=True)
    info = dict(info, selected={name: value}, validation_nll=scores, train_seconds=seconds)
    return predict, info


def train_ivon(
    model,
    params,
    data,
    *,
    epochs,
    batch_size,
    seed,
    test_samples=64,
    lr=0.3,
    hess_init=1.0,
    beta2=0.999,
    weight_decay=1e-4,
    ess_scale=1.0,
    **_,
):
    """IVON (one sample per step, warm-up then cosine), ``ess = ess_scale * N``; predicts by
    the BMA over K samples."""
    x = data["train"][0]
    steps_per_epoch = len(x) // batch_size
    optimizer = ivon.ivon(
        optax.warmup_cosine_decay_schedule(0.0, lr, steps_per_epoch, epochs * steps_per_epoch),
        ess=ess_scale * len(x),
        hess_init=hess_init,
        beta2=beta2,
        weight_decay=weight_decay,
    )

    params, opt_state, history, seconds = _fit_cross_entropy(
        model,
        params,
        data,
        optimizer,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        label="IVON",
        sample=ivon.sample_parameters,
    )
    batch = 8 if test_samples % 8 == 0 else 1
    bma = jax.jit(
        ivon.bayesian_model_average(
            lambda p, x: jax.nn.softmax(model.apply({"params": p}, x)),
            test_samples,
            batch_size=batch,
        )
    )
    return (lambda key, x: np.asarray(bma(key, params, opt_state, x))), {
        "history": history,
        "train_seconds": seconds,
    }


def last_layer(params) -> Callable[[str, object], bool]:
    """``stochastic=`` predicate selecting the last Dense layer of a linen MLP."""
    last = sorted(params, key=lambda name: int(name.rsplit("_", 1)[-1]))[-1]
    return lambda path, _: path.split("/")[0] == last


def train_implicit(
    model,
    params,
    data,
    *,
    epochs,
    batch_size,
    seed,
    test_samples=64,
    lr=3e-3,
    samples=4,
    entropy="smallest_sv",
    stochastic=None,
    model_kwargs=None,
    loss_kwargs=None,
    kl_weight=None,
    noise_lr_scale=1.0,
    **_,
):
    """Implicit VI (``implicit_vi.py``) with Adam and a cosine schedule; predicts by the BMA.

    The library's defaults otherwise: the automatic generator, the per-data-point ELBO and the
    eigen-solver warm-started from the previous step. ``model_kwargs`` go to ``make_model``
    (e.g. ``sigma``, ``noise_shape``), ``loss_kwargs`` to ``elbo_loss`` (e.g.
    ``prior_weight``); ``stochastic`` selects the Bayesian leaves. ``kl_weight`` beta
    tempers the ELBO (prior and entropy weighted beta / N) and ``noise_lr_scale`` multiplies
    the learning rate of a learned output noise.
    """
    x, y = data["train"]
    steps = epochs * (len(x) // batch_size)
    bnn = ivi.ImplicitBNN.from_linen(
        model, params, stochastic=stochastic, key=jax.random.key(seed), **(model_kwargs or {})
    )
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.1))
    if noise_lr_scale != 1.0:
        optimizer = optax.chain(optimizer, ivi.scale_noise_updates(noise_lr_scale))
    loss_kwargs = dict(loss_kwargs or {})
    if kl_weight is not None:
        loss_kwargs.update(prior_weight=kl_weight / len(x), entropy_weight=kl_weight / len(x))
    train_step = bnn.make_train_step(
        optimizer, num_data=len(x), num_samples=samples, entropy=entropy, **loss_kwargs
    )
    num_vectors = loss_kwargs.get("entropy_samples") or samples

    def step(state, key, batch):
        vi_params, opt_state, eigvecs = state
        vi_params, opt_state, aux = train_step(vi_params, opt_state, key, batch, eigvecs)
        shown = ("loss", "elbo", "expected_log_likelihood", "solver_iterations")
        return (vi_params, opt_state, aux["eigvecs"]), {k: aux[k] for k in shown}

    vi_params = bnn.init(jax.random.key(seed))
    # Zero rows: the solver's fresh random start at the first step, then the carried vectors.
    eigvecs = jnp.zeros((num_vectors, bnn.latent_dim), jnp.float32)
    state = (vi_params, optimizer.init(vi_params), eigvecs)
    label = "LL-IVI" if stochastic is not None else "IVI"
    if (model_kwargs or {}).get("learn_sigma"):
        label += "-LS"
    if kl_weight is not None:
        label += f" beta={kl_weight}"
    (vi_params, _, _), history, seconds = _fit(
        step,
        state,
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        key=jax.random.key(seed + 1),
        label=label,
    )

    def predict(key, x):
        return np.asarray(bnn.predict_proba(vi_params, key, x, num_samples=test_samples))

    info = {
        "history": history,
        "train_seconds": seconds,
        "bnn": bnn,
        "vi_params": vi_params,
        "params": params,
    }
    return predict, info


# The calibrated posterior: learned noise from a tenth of each leaf's initial std, the prior
# N(0, initial std^2) per leaf, the noise's learning rate 10x the generator's.
CALIBRATED = {
    "model_kwargs": {"learn_sigma": True, "sigma": "auto", "prior_std": "auto"},
    "noise_lr_scale": 10.0,
}


def train_method(method: str, data: dict, hidden, seed: int, **options):
    """Trains ``method`` on ``data["train"]`` with the harness's network; ``(predict, info)``.

    ``map-ts``, ``ivon-val`` and ``ivi-val`` also use ``data["val"]``.
    """
    model = MLP(tuple(hidden), data["num_classes"])
    params = model.init(jax.random.key(seed), jnp.zeros((1, data["train"][0].shape[1])))["params"]
    key = jax.random.key(2000 + seed)
    if method in ("map", "map-ts"):
        return train_map(
            model, params, data, seed=seed, temperature_scaling=method == "map-ts", **options
        )
    if method == "ivon":
        return train_ivon(model, params, data, seed=seed, **options)
    if method == "ivon-val":
        options = {k: v for k, v in options.items() if k != "ess_scale"}
        return select_on_validation(
            lambda scale: train_ivon(model, params, data, seed=seed, ess_scale=scale, **options),
            IVON_ESS_SCALES,
            data,
            key,
            "ess_scale",
        )
    if method == "ll-ivi":
        options = dict(options, stochastic=last_layer(params))
    if method == "ivi-ls":
        options = dict(options, model_kwargs={"learn_sigma": True})
    if method == "ivi-val":
        options = {k: v for k, v in options.items() if k != "kl_weight"} | CALIBRATED
        return select_on_validation(
            lambda beta: train_implicit(model, params, data, seed=seed, kl_weight=beta, **options),
            KL_WEIGHTS,
            data,
            key,
            "kl_weight",
        )
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return train_implicit(model, params, data, seed=seed, **options)


def load_trained_run(run_dir: str, data_folder: str | None = None):
    """A run folder of ``examples/implicit_vi_train.py``: its network, generator and data.

    Rebuilds the run's Bayesian network from the flags saved in its checkpoint (the generator
    configuration's text included), loads the trained variational parameters and the run's
    data set (its test split, standardised as in training).

    Args:
      run_dir: the folder holding ``checkpoint.pkl`` (and ``results.json``).
      data_folder: where the data set's files are (default: the run's ``--datasetfolder``,
        else ./data); not needed for digits.

    Returns:
      ``(predict, data, settings)``: ``predict(key, x) -> probs`` (BMA over 64 samples),
      the program's ``Data`` and the saved flags.
    """
    import pickle
    import tempfile

    import implicit_vi_train as ivt

    path = os.path.join(run_dir, ivt.CHECKPOINT)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} holds no {ivt.CHECKPOINT} (a run of implicit_vi_train)")
    with open(path, "rb") as f:
        checkpoint = pickle.load(f)
    settings = dict(checkpoint["settings"])
    results_path = os.path.join(run_dir, ivt.RESULTS)
    saved_args = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            saved_args = json.load(f).get("args", {}) or {}
    args = ivt.parse_args(["--dataset", settings["dataset"]])
    config_text = settings.pop("config", None)
    for name, value in settings.items():
        setattr(args, name, value)
    args.datasetfolder = data_folder or saved_args.get("datasetfolder") or args.datasetfolder
    with tempfile.TemporaryDirectory() as folder:
        if config_text is not None:
            args.config = os.path.join(folder, "config.yaml")
            with open(args.config, "w") as f:
                f.write(config_text)
        generator = ivt.load_generator(args)
    data = ivt.load_data(args.dataset, args.datasetfolder, args.validation_fraction, args.randseed)
    bnn, optimizer, _ = ivt.build_training(
        args, generator, data.x_train[:1], data.num_classes, len(data.x_train)
    )
    vi_params = bnn.init(jax.random.fold_in(jax.random.key(args.randseed), 0))
    vi_params, _ = ivt.from_host(checkpoint["state"], (vi_params, optimizer.init(vi_params)))

    def predict(key, x):
        x = np.asarray(x, np.float32).reshape(-1, *data.x_test.shape[1:])
        return np.asarray(bnn.predict_proba(vi_params, key, x, num_samples=64))

    return predict, data, settings


def evaluate_trained_run(run_dir: str, angles, data_folder: str | None = None) -> dict:
    """Test metrics of a trained run and, for one-channel square images, under rotation.

    The rotation acts on the images as the network sees them (standardised), with the
    background value (the smallest pixel) outside the rotated image.
    """
    predict, data, settings = load_trained_run(run_dir, data_folder)
    key = jax.random.key(2024)
    record = {
        "settings": settings,
        "test": classification_metrics(predict(key, data.x_test), data.y_test),
    }
    shape = data.x_test.shape[1:]
    if len(shape) == 3 and shape[0] == shape[1] and shape[2] == 1:
        background = float(data.x_test.min())
        flat = data.x_test.reshape(len(data.x_test), -1) - background
        record["rotation"] = {
            str(a): classification_metrics(
                predict(key, rotate_images(flat, a, side=shape[0]) + background), data.y_test
            )
            for a in angles
        }
    else:
        print(f"{run_dir}: images of shape {shape}: rotation skipped (one-channel square only)")
    return record


# ----- evaluation ----------------------------------------------------------------------------


def evaluate_shift(predict: Predict, x, y, angles, key) -> dict:
    """Accuracy, NLL, Brier and ECE of ``predict`` on ``x`` rotated by each angle.

    Every angle uses the same sampling key (common random numbers), so that the differences
    between angles are the rotation's, not the posterior samples'.
    """
    out = {}
    for angle in angles:
        probs = predict(key, rotate_images(x, angle))
        out[str(angle)] = classification_metrics(probs, y)
    return out


def load_task(task: str, seed: int, validation_fraction: float) -> dict:
    """The data of ``task`` for ``seed``, with the validation split held out of training."""
    if task == "digits":
        data = load_digits_split(seed)
    elif task == "digits-ood":
        data = load_digits_split(seed, classes=range(5))
    elif task == "teacher":
        data = teacher_task(seed)
    elif task == "spiral":
        data = spiral_task(seed)
    else:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return hold_out(data, validation_fraction, seed)


def evaluate(task: str, predict: Predict, data: dict, key, args, extra_ood=None) -> dict:
    """The task's metrics of one trained method."""
    x_test, y_test = data["test"]
    probs = predict(key, x_test)
    record = {
        "test": classification_metrics(probs, y_test),
        "test_calibrated_ece": calibrated_ece(probs),
    }
    arrays = {"probs": probs, "labels": y_test}
    if task == "digits":
        record["rotation"] = evaluate_shift(predict, x_test, y_test, args.angles, key)
    if task == "digits-ood":
        probs_out = predict(jax.random.fold_in(key, 8), data["ood"])
        record["ood"] = {"digits 5-9": ood_metrics(probs, probs_out)}
        arrays["entropy_in"] = predictive_entropy(probs)
        arrays["entropy_out"] = predictive_entropy(probs_out)
        if extra_ood is not None:
            name = os.path.basename(os.path.normpath(args.ood_folder))
            record["ood"][name] = ood_metrics(probs, predict(jax.random.fold_in(key, 9), extra_ood))
    if task == "spiral":
        arrays["map"] = predict(key, SPIRAL_GRID)
    return record, arrays


def run_seed(args, seed: int) -> dict:
    """Every method on every task of ``args.tasks`` for one seed."""
    extra_ood = load_ood_folder(args.ood_folder) if args.ood_folder else None
    options = dict(
        epochs=args.epochs,
        batch_size=args.batch_size,
        test_samples=args.test_samples,
        samples=args.samples,
    )
    results, arrays = {}, {}
    for task in args.tasks:
        print(f"  task {task}: {TASKS[task]}", flush=True)
        data = load_task(task, seed, args.validation_fraction)
        results[task], arrays[task] = {}, {}
        for method in args.methods:
            print(f"  {METHODS[method]}", flush=True)
            predict, info = train_method(method, data, args.hidden, seed, **options)
            key = jax.random.key(1000 + seed)
            record, arrays[task][method] = evaluate(task, predict, data, key, args, extra_ood)
            record["train_seconds"] = info["train_seconds"]
            if "selected" in info:  # e.g. "kl_weight=0.1", kept per seed by mean_std
                ((name, value),) = info["selected"].items()
                record["selected"] = f"{name}={value:g}"
            if "validation_nll" in info:
                record["validation_nll"] = info["validation_nll"]
            results[task][method] = record
        if "true_probs" in data:  # the generated tasks: the Bayes-optimal predictor
            results[task]["bayes"] = {
                "test": classification_metrics(data["true_probs"], data["test"][1])
            }
    return {"results": results, "arrays": arrays}


def mean_std(records: list[dict]) -> dict:
    """Nested dicts of floats (one per seed) -> the same nesting with ``{"mean", "std"}``.

    Entries that are not numbers (such as ``"kl_weight=0.1"``, what a method chose) keep
    every seed's value, as a list.
    """
    first = records[0]
    if isinstance(first, dict):
        return {k: mean_std([r[k] for r in records]) for k in first}
    if not isinstance(first, int | float) or isinstance(first, bool):
        return list(records)
    values = np.asarray(records, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std())}


def _cell(stat: dict, digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def format_task_table(summary: dict, methods: Sequence[str]) -> str:
    """One task: accuracy, NLL, Brier, ECE (mean ± std), the calibrated-ECE floor, what was
    chosen on validation (per seed) and the training time."""
    header = ["accuracy", "NLL", "Brier", "ECE", "ECE floor (95%)"]
    lines = [f"{'method':<28}" + "".join(f"{h:>18}" for h in header) + "  chosen / train (s)"]
    rows = [m for m in methods if m in summary] + (["bayes"] if "bayes" in summary else [])
    for method in rows:
        s = summary[method]
        cells = [_cell(s["test"][k]) for k in ("accuracy", "nll", "brier", "ece")]
        floor = s.get("test_calibrated_ece")
        cells.append(_cell(floor["q95"]) if floor else "")
        notes = ""
        if "selected" in s:
            notes = ", ".join(s["selected"]) + "  "
        if "train_seconds" in s:
            notes += f"{s['train_seconds']['mean']:.0f}"
        name = "Bayes-optimal (true p(y|x))" if method == "bayes" else METHODS[method]
        lines.append(f"{name:<28}" + "".join(f"{c:>18}" for c in cells) + f"  {notes}")
    return "\n".join(lines)


def format_shift_table(summary: dict, methods: Sequence[str], angles) -> str:
    lines = [f"{'method':<28}" + "".join(f"{str(a) + ' deg':>22}" for a in angles)]
    lines.append(f"{'':<28}" + "".join(f"{'acc / NLL / ECE':>22}" for _ in angles))
    for method in methods:
        rows = summary[method]["rotation"]
        cells = [
            f"{rows[str(a)]['accuracy']['mean']:.3f}/{rows[str(a)]['nll']['mean']:.3f}/"
            f"{rows[str(a)]['ece']['mean']:.3f}"
            for a in angles
        ]
        lines.append(f"{METHODS[method]:<28}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def format_ood_table(summary: dict, methods: Sequence[str]) -> str:
    names = list(summary[methods[0]]["ood"])
    lines = [f"{'method':<28}" + "".join(f"{n + ' (maxp / entropy)':>32}" for n in names)]
    for method in methods:
        ood = summary[method]["ood"]
        cells = [
            f"{ood[n]['auroc_max_prob']['mean']:.3f} / {ood[n]['auroc_entropy']['mean']:.3f}"
            for n in names
        ]
        lines.append(f"{METHODS[method]:<28}" + "".join(f"{c:>32}" for c in cells))
    return "\n".join(lines)


# The spiral's predictive maps are drawn on this grid of the plane (60 x 60 points).
_AXIS = np.linspace(-4.5, 4.5, 60, dtype=np.float32)
SPIRAL_GRID = np.stack(np.meshgrid(_AXIS, _AXIS), -1).reshape(-1, 2)


def plot_all(summary, arrays, methods, angles, prefix) -> list[str]:
    """Reliability diagrams per task, metrics against angle, entropy histograms and the
    spiral's predictive maps (first seed); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, name):
        fig.tight_layout()
        paths.append(f"{prefix}_{name}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    tasks = list(arrays)
    fig, axes = plt.subplots(
        len(tasks), len(methods), figsize=(3.4 * len(methods), 3.3 * len(tasks)), squeeze=False
    )
    for row, task in zip(axes, tasks):
        for ax, method in zip(row, methods):
            plot_reliability(ax, arrays[task][method]["probs"], arrays[task][method]["labels"])
            ax.set_title(f"{task}: {METHODS[method]}", fontsize="small")
    save(fig, "reliability")

    if "digits" in summary:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, metric in zip(axes, ("accuracy", "nll", "ece")):
            for method in methods:
                rows = summary["digits"][method]["rotation"]
                mean = np.array([rows[str(a)][metric]["mean"] for a in angles])
                std = np.array([rows[str(a)][metric]["std"] for a in angles])
                ax.errorbar(angles, mean, yerr=std, marker="o", capsize=3, label=METHODS[method])
            ax.set(xlabel="rotation (degrees)", ylabel=metric, title=f"{metric} under rotation")
        axes[0].legend(fontsize="small")
        save(fig, "rotation")

    if "digits-ood" in arrays:
        fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.4), squeeze=False)
        edges = np.linspace(0, np.log(5), 30)
        for ax, method in zip(axes[0], methods):
            a = arrays["digits-ood"][method]
            ax.hist(a["entropy_in"], bins=edges, alpha=0.6, density=True, label="digits 0-4 (in)")
            ax.hist(a["entropy_out"], bins=edges, alpha=0.6, density=True, label="5-9 (OOD)")
            ax.set(xlabel="predictive entropy (nats)", title=METHODS[method])
        axes[0][0].legend(fontsize="small")
        save(fig, "entropy")

    if "spiral" in arrays:
        maps = {"true p(y|x)": spiral_probs(SPIRAL_GRID)}
        maps.update({METHODS[m]: arrays["spiral"][m]["map"] for m in methods})
        fig, axes = plt.subplots(
            1, len(maps), figsize=(2.4 * len(maps) + 1, 2.8), squeeze=False, layout="constrained"
        )
        extent = (_AXIS[0], _AXIS[-1], _AXIS[0], _AXIS[-1])
        for ax, (name, probs) in zip(axes[0], maps.items()):
            entropy = predictive_entropy(probs).reshape(len(_AXIS), len(_AXIS))
            image = ax.imshow(
                entropy, origin="lower", extent=extent, vmin=0, vmax=np.log(3), cmap="viridis"
            )
            ax.set_title(name, fontsize="small")
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="predictive entropy (nats)")
        fig.savefig(f"{prefix}_spiral.png", dpi=110)
        paths.append(f"{prefix}_spiral.png")
        plt.close(fig)
    return paths


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds of the harness (0: only --run)")
    parser.add_argument("--epochs", type=_positive_int, default=60)
    parser.add_argument("--batch-size", type=_positive_int, default=64)
    parser.add_argument("--hidden", default="128,128", help="hidden widths, comma-separated")
    parser.add_argument("--samples", type=_positive_int, default=4, help="implicit VI: S per step")
    parser.add_argument("--test-samples", type=_positive_int, default=64, help="K for the BMAs")
    parser.add_argument("--angles", default="0,15,30,45,60,90", help="rotations, degrees")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=", ".join(METHODS))
    parser.add_argument("--tasks", default=",".join(TASKS), help=", ".join(TASKS))
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.15,
        help="share of each training set held out for the methods that choose (0 < f < 1)",
    )
    parser.add_argument("--ood-folder", default=None, help="folder with MNIST-format idx files")
    parser.add_argument("--output", default=OUTPUT, help="folder for the JSON and the plots")
    parser.add_argument(
        "--run",
        default=None,
        help="a run folder of examples/implicit_vi_train.py: evaluated on its own test set",
    )
    parser.add_argument("--run-data-folder", default=None, help="the run's data (not digits)")
    args = parser.parse_args(argv)
    try:
        args.hidden = [int(h) for h in args.hidden.split(",")]
        args.angles = [float(a) if "." in a else int(a) for a in args.angles.split(",")]
        if not args.hidden or min(args.hidden) < 1:
            raise ValueError
    except ValueError:
        parser.error("--hidden and --angles must be comma-separated numbers (widths >= 1)")
    for name, known in (("methods", METHODS), ("tasks", TASKS)):
        chosen = [m.strip() for m in getattr(args, name).split(",")]
        unknown = [m for m in chosen if m not in known]
        if unknown:
            parser.error(f"--{name}: unknown {unknown}; choose from {', '.join(known)}")
        setattr(args, name, chosen)
    if not 0 < args.validation_fraction < 1:
        parser.error(f"--validation-fraction must be in (0, 1), got {args.validation_fraction}")
    if args.seeds < 0 or (args.seeds == 0 and not args.run):
        parser.error(f"--seeds must be >= 1 (or 0 with --run), got {args.seeds}")
    if args.run and not os.path.isfile(os.path.join(args.run, "checkpoint.pkl")):
        parser.error(f"--run {args.run}: no checkpoint.pkl (a run folder of implicit_vi_train.py)")
    if args.ood_folder and not os.path.isdir(args.ood_folder):
        parser.error(f"--ood-folder {args.ood_folder} is not a folder")
    if args.ood_folder:
        try:  # read once here, so that a malformed file stops the program before training
            load_ood_folder(args.ood_folder, limit=1)
        except DataError as error:
            parser.error(f"--ood-folder: {error}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    runs = []
    for seed in range(args.seeds):
        print(f"seed {seed}", flush=True)
        runs.append(run_seed(args, seed))
    summary, paths = None, []
    os.makedirs(args.output, exist_ok=True)
    prefix = os.path.join(args.output, "uncertainty_eval")
    if runs:
        summary = mean_std([r["results"] for r in runs])
        for task in args.tasks:
            print(
                f"\n{TASKS[task]}: test set, mean ± std over {args.seeds} seed(s), "
                f"{args.epochs} epochs each:"
            )
            print(format_task_table(summary[task], args.methods))
            if task == "digits":
                print("\nrotated test digits (means):")
                print(format_shift_table(summary[task], args.methods, args.angles))
            if task == "digits-ood":
                print("\nout of distribution, AUROC (means):")
                print(format_ood_table(summary[task], args.methods))
        paths = plot_all(summary, runs[0]["arrays"], args.methods, args.angles, prefix)
    trained_run = None
    if args.run:
        trained_run = evaluate_trained_run(args.run, args.angles, args.run_data_folder)
        t = trained_run["test"]
        print(
            f"\ntrained run {args.run} ({trained_run['settings']['dataset']}, its own test set): "
            + "  ".join(f"{k} {t[k]:.4f}" for k in ("accuracy", "nll", "brier", "ece"))
        )
        for angle, m in trained_run.get("rotation", {}).items():
            print(
                f"  rotated {angle:>4} deg: accuracy {m['accuracy']:.4f}  NLL {m['nll']:.4f}  "
                f"ECE {m['ece']:.4f}"
            )
    report = {
        "args": dict(vars(args)),
        "summary": summary,
        "per_seed": [r["results"] for r in runs],
        "trained_run": trained_run,
        "plots": [os.path.basename(p) for p in paths],
        "seconds": time.perf_counter() - start,
    }
    with open(prefix + ".json", "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nsaved {prefix}.json and {len(paths)} plots ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
