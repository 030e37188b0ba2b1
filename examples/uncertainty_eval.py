"""Uncertainty evaluation suite: MAP, IVON and implicit VI trained in one harness, compared on
held-out data, under dataset shift and out of distribution.

In the style of Laplace Redux (Daxberger et al., NeurIPS 2021), every method gets the same
network (an MLP), the same data, the same batch size and the same number of epochs:

  - MAP: AdamW on the cross-entropy (weight decay as the prior),
  - IVON: ``ivon.py``, Bayesian model average over K posterior samples,
  - last-layer implicit VI: ``implicit_vi.py`` with only the last Dense layer stochastic
    (the rest trained as point estimates in the same optimisation),
  - implicit VI: every weight stochastic, the automatic multi-head MM generator;
  - implicit VI, learned noise: the same with one learned output-noise std per weight
    (``make_model(learn_sigma=True)``).

Data: scikit-learn's 8x8 digits (1,797 images, shipped with the package; nothing is
downloaded). Reported, as mean ± std over ``--seeds`` seeds (different splits, initialisations
and sampling keys), with the metrics of ``examples/metrics.py`` (ECE with 15 bins):

  1. held-out test set of the 10-class task: accuracy, NLL, Brier score, ECE, and the 95%
     quantile of the ECE a perfectly calibrated model with the same predictions would show on
     this test set ("calibrated ECE 95%", ``metrics.calibrated_ece``): an ECE below it is as
     calibrated as 450 test images can show;
  2. dataset shift: the same test images rotated by each of ``--angles`` degrees: accuracy,
     NLL and ECE per angle;
  3. out of distribution: a network trained on digits 0-4 only tells its test images from
     the digits 5-9 (AUROC by max probability and by predictive entropy); with
     ``--ood-folder`` also from MNIST / Fashion-MNIST test images (idx files, reduced to 8x8
     the way the digits were made) when those files are there.

The table is printed, everything goes to ``examples/output/uncertainty_eval.json`` and the
plots (reliability diagrams, metrics against rotation angle, predictive-entropy histograms in
and out of distribution) to ``examples/output/uncertainty_eval_*.png``.

  python examples/uncertainty_eval.py                  # a few minutes on a laptop CPU
  python examples/uncertainty_eval.py --seeds 1 --epochs 20 --methods map,ivi
  python examples/uncertainty_eval.py --ood-folder ~/data/fashion_mnist

``--run FOLDER`` also evaluates a trained run of ``examples/implicit_vi_train.py`` (its own
network, generator and test set, rebuilt from the checkpoint's flags): test metrics and, for
one-channel square images (digits, MNIST, Fashion-MNIST), the same rotations. The baselines are
trained in this harness either way; ``--seeds 0`` evaluates only the run.

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
    ood_metrics,
    plot_reliability,
    predictive_entropy,
)

import implicit_vi as ivi  # noqa: E402
import ivon  # noqa: E402

OUTPUT = os.path.join(HERE, "output")
METHODS = {
    "map": "MAP (AdamW)",
    "ivon": "IVON (BMA)",
    "ll-ivi": "last-layer implicit VI",
    "ivi": "implicit VI",
    "ivi-ls": "implicit VI, learned noise",
}
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


def train_map(model, params, data, *, epochs, batch_size, seed, lr=1e-3, weight_decay=1e-4, **_):
    """AdamW with a cosine schedule; returns ``(predict, info)``."""
    steps = epochs * (len(data["train"][0]) // batch_size)
    optimizer = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)
    params, _, history, seconds = _fit_cross_entropy(
        model, params, data, optimizer, epochs=epochs, batch_size=batch_size, seed=seed, label="MAP"
    )
    apply = jax.jit(lambda x: jax.nn.softmax(model.apply({"params": params}, x)))
    return (lambda key, x: np.asarray(apply(x))), {"history": history, "train_seconds": seconds}


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
    **_,
):
    """IVON (one sample per step, warm-up then cosine); predicts by the BMA over K samples."""
    x = data["train"][0]
    steps_per_epoch = len(x) // batch_size
    optimizer = ivon.ivon(
        optax.warmup_cosine_decay_schedule(0.0, lr, steps_per_epoch, epochs * steps_per_epoch),
        ess=float(len(x)),
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
    **_,
):
    """Implicit VI (``implicit_vi.py``) with Adam and a cosine schedule; predicts by the BMA.

    The library's defaults otherwise: the automatic generator, the per-data-point ELBO and the
    eigen-solver warm-started from the previous step. ``model_kwargs`` go to ``make_model``
    (e.g. ``sigma``, ``noise_shape``), ``loss_kwargs`` to ``elbo_loss`` (e.g.
    ``prior_weight``); ``stochastic`` selects the Bayesian leaves.
    """
    x, y = data["train"]
    steps = epochs * (len(x) // batch_size)
    bnn = ivi.ImplicitBNN.from_linen(
        model, params, stochastic=stochastic, key=jax.random.key(seed), **(model_kwargs or {})
    )
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.1))
    loss_kwargs = dict(loss_kwargs or {})
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


TRAINERS = {
    "map": train_map,
    "ivon": train_ivon,
    "ll-ivi": train_implicit,
    "ivi": train_implicit,
    "ivi-ls": train_implicit,
}


def train_method(method: str, data: dict, hidden, seed: int, **options):
    """Trains ``method`` on ``data["train"]`` with the harness's network; ``(predict, info)``."""
    model = MLP(tuple(hidden), data["num_classes"])
    params = model.init(jax.random.key(seed), jnp.zeros((1, data["train"][0].shape[1])))["params"]
    if method == "ll-ivi":
        options = dict(options, stochastic=last_layer(params))
    if method == "ivi-ls":
        options = dict(options, model_kwargs={"learn_sigma": True})
    return TRAINERS[method](model, params, data, seed=seed, **options)


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
    data = ivt.load_data(args.dataset, args.datasetfolder)
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


def run_seed(args, seed: int) -> dict:
    """Every method on the 10-class task (test set and rotations) and the 0-4 task (OOD)."""
    full = load_digits_split(seed)
    split = load_digits_split(seed, classes=range(5))
    extra_ood = load_ood_folder(args.ood_folder) if args.ood_folder else None
    options = dict(
        epochs=args.epochs,
        batch_size=args.batch_size,
        test_samples=args.test_samples,
        samples=args.samples,
    )
    results, arrays = {}, {}
    for method in args.methods:
        print(f"  {METHODS[method]}", flush=True)
        key = jax.random.key(1000 + seed)
        predict, info = train_method(method, full, args.hidden, seed, **options)
        x_test, y_test = full["test"]
        probs = predict(key, x_test)
        record = {
            "test": classification_metrics(probs, y_test),
            "test_calibrated_ece": calibrated_ece(probs),
            "rotation": evaluate_shift(predict, x_test, y_test, args.angles, key),
            "train_seconds": info["train_seconds"],
        }
        arrays[method] = {"probs": probs, "labels": y_test}

        predict5, _ = train_method(method, split, args.hidden, seed, **options)
        x_in, y_in = split["test"]
        probs_in = predict5(jax.random.fold_in(key, 7), x_in)
        probs_out = predict5(jax.random.fold_in(key, 8), split["ood"])
        record["test_0_4"] = classification_metrics(probs_in, y_in)
        record["ood"] = {"digits 5-9": ood_metrics(probs_in, probs_out)}
        arrays[method]["entropy_in"] = predictive_entropy(probs_in)
        arrays[method]["entropy_out"] = predictive_entropy(probs_out)
        if extra_ood is not None:
            probs_extra = predict5(jax.random.fold_in(key, 9), extra_ood)
            record["ood"][os.path.basename(os.path.normpath(args.ood_folder))] = ood_metrics(
                probs_in, probs_extra
            )
        results[method] = record
    return {"results": results, "arrays": arrays}


def mean_std(records: list[dict]) -> dict:
    """Nested dicts of floats (one per seed) -> the same nesting with ``{"mean", "std"}``."""
    first = records[0]
    if isinstance(first, dict):
        return {k: mean_std([r[k] for r in records]) for k in first}
    values = np.asarray(records, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std())}


def format_table(summary: dict, methods: Sequence[str]) -> str:
    """The results table: test metrics, worst-angle metrics and OOD AUROC, mean ± std."""
    lines = [
        f"{'method':<27}{'accuracy':>17}{'NLL':>17}{'Brier':>17}{'ECE':>17}"
        f"{'AUROC 5-9 (maxp)':>19}{'AUROC (entropy)':>18}{'calibrated ECE 95%':>20}"
    ]
    for method in methods:
        s = summary[method]
        cells = [s["test"][k] for k in ("accuracy", "nll", "brier", "ece")]
        ood = s["ood"]["digits 5-9"]
        cells += [ood["auroc_max_prob"], ood["auroc_entropy"], s["test_calibrated_ece"]["q95"]]
        widths = (17, 17, 17, 17, 19, 18, 20)
        text = "".join(f"{c['mean']:.4f} ± {c['std']:.4f}".rjust(w) for c, w in zip(cells, widths))
        lines.append(f"{METHODS[method]:<27}{text}")
    return "\n".join(lines)


def format_task_table(summary: dict, methods: Sequence[str], part: str) -> str:
    """Accuracy, NLL, Brier and ECE of ``summary[method][part]``, mean ± std."""
    lines = [f"{'method':<27}{'accuracy':>17}{'NLL':>17}{'Brier':>17}{'ECE':>17}"]
    for method in methods:
        cells = [summary[method][part][k] for k in ("accuracy", "nll", "brier", "ece")]
        text = "".join(f"{c['mean']:.4f} ± {c['std']:.4f}".rjust(17) for c in cells)
        lines.append(f"{METHODS[method]:<27}{text}")
    return "\n".join(lines)


def format_shift_table(summary: dict, methods: Sequence[str], angles) -> str:
    lines = [f"{'method':<27}" + "".join(f"{str(a) + ' deg':>22}" for a in angles)]
    lines.append(f"{'':<27}" + "".join(f"{'acc / NLL / ECE':>22}" for _ in angles))
    for method in methods:
        rows = summary[method]["rotation"]
        cells = [
            f"{rows[str(a)]['accuracy']['mean']:.3f}/{rows[str(a)]['nll']['mean']:.3f}/"
            f"{rows[str(a)]['ece']['mean']:.3f}"
            for a in angles
        ]
        lines.append(f"{METHODS[method]:<27}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def plot_all(summary, arrays, methods, angles, prefix) -> list[str]:
    """Reliability diagrams, metrics against angle, entropy histograms; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        plot_reliability(ax, arrays[method]["probs"], arrays[method]["labels"], METHODS[method])
        ax.set_title(METHODS[method])
    fig.tight_layout()
    paths.append(f"{prefix}_reliability.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric in zip(axes, ("accuracy", "nll", "ece")):
        for method in methods:
            rows = summary[method]["rotation"]
            mean = np.array([rows[str(a)][metric]["mean"] for a in angles])
            std = np.array([rows[str(a)][metric]["std"] for a in angles])
            ax.errorbar(angles, mean, yerr=std, marker="o", capsize=3, label=METHODS[method])
        ax.set(xlabel="rotation (degrees)", ylabel=metric, title=f"{metric} under rotation")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    paths.append(f"{prefix}_rotation.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.4), squeeze=False)
    edges = np.linspace(0, np.log(5), 30)
    for ax, method in zip(axes[0], methods):
        a = arrays[method]
        ax.hist(a["entropy_in"], bins=edges, alpha=0.6, density=True, label="digits 0-4 (in)")
        ax.hist(a["entropy_out"], bins=edges, alpha=0.6, density=True, label="digits 5-9 (OOD)")
        ax.set(xlabel="predictive entropy (nats)", title=METHODS[method])
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    paths.append(f"{prefix}_entropy.png")
    fig.savefig(paths[-1], dpi=110)
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
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the harness (0: only --run)")
    parser.add_argument("--epochs", type=_positive_int, default=60)
    parser.add_argument("--batch-size", type=_positive_int, default=64)
    parser.add_argument("--hidden", default="128,128", help="hidden widths, comma-separated")
    parser.add_argument("--samples", type=_positive_int, default=4, help="implicit VI: S per step")
    parser.add_argument("--test-samples", type=_positive_int, default=64, help="K for the BMAs")
    parser.add_argument("--angles", default="0,15,30,45,60,90", help="rotations, degrees")
    parser.add_argument("--methods", default=",".join(METHODS), help=", ".join(METHODS))
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
    args.methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
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
        print(
            f"\nheld-out digits, mean ± std over {args.seeds} seed(s), {args.epochs} epochs each:"
        )
        print(format_table(summary, args.methods))
        print("\nheld-out digits 0-4 (the networks of the OOD task, trained on 0-4 only):")
        print(format_task_table(summary, args.methods, "test_0_4"))
        print("\nrotated test images (means):")
        print(format_shift_table(summary, args.methods, args.angles))
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
