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
    chosen on the validation split from ``methods.IVON_ESS_SCALES`` x N;
  - implicit VI (``ivi``), the library's quick start (``implicit_vi.select_kl_weight``):
    every weight stochastic with the library's defaults (learned weight noise starting at a
    tenth of each layer's initial weight std, the prior N(0, initial std^2) per layer), the
    KL weight beta of the tempered ELBO chosen on the validation split from
    ``implicit_vi.KL_WEIGHTS`` (``--kl-weights``), Adam with a cosine decay from 3e-3 to 3e-4;
  - implicit VI, paper's fixed noise (``ivi-paper``): the paper's posterior, one fixed weight
    noise std of 1e-3 and the N(0, 1) prior, with the ELBO itself (beta = 1);
  - last-layer implicit VI (``ll-ivi``): the library's defaults with only the last Dense layer
    stochastic, beta = 1.

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

The methods are those of ``bdl_examples.methods``, the metrics those of
``bdl_examples.metrics`` (ECE with 15 bins), reported as mean ± std over ``--seeds`` seeds
(different splits, training draws, initialisations and sampling keys). The tables are printed,
everything goes to ``examples/output/uncertainty_eval.json`` and the plots (reliability
diagrams, metrics against rotation angle, predictive-entropy histograms in and out of
distribution, the spiral's predictive maps) to ``examples/output/uncertainty_eval_*.png``.

  python examples/uncertainty_eval.py                    # every task, 1 seed
  python examples/uncertainty_eval.py --seeds 3          # the README's tables
  python examples/uncertainty_eval.py --tasks spiral --methods map,ivi --epochs 20
  python examples/uncertainty_eval.py --tasks spiral --methods ivi --kl-weights 1,0.1,0.01
  python examples/uncertainty_eval.py --tasks digits-ood --ood-folder ~/data/fashion_mnist

``--run FOLDER`` also evaluates a trained run of ``examples/implicit_vi_paper/train.py`` (its
own network, generator and test set, rebuilt from the flags saved in its checkpoint): test
metrics and, for one-channel square images (digits, MNIST, Fashion-MNIST), the same rotations.
``--seeds 0`` evaluates only the run.

  python examples/implicit_vi_paper/train.py --run_name digits_run
  python examples/uncertainty_eval.py --run examples/output/implicit_vi_paper/digits_run --seeds 0
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from bdl_examples.checkpoints import CheckpointError, load_checkpoint, load_meta, write_json
from bdl_examples.cli import kl_weight_list
from bdl_examples.data import (
    DataError,
    hold_out,
    load_digits_split,
    read_idx,
    rotate_images,
    spiral_probs,
    spiral_task,
    teacher_task,
    to_digits_format,
)
from bdl_examples.methods import METHODS, mean_std, train_method
from bdl_examples.metrics import (
    calibrated_ece,
    classification_metrics,
    ood_metrics,
    predictive_entropy,
)
from bdl_examples.paper import (
    PAPER_CHECKPOINT,
    PaperRun,
    build_paper_training,
    initial_paper_state,
    load_image_data,
)
from bdl_examples.plots import plot_reliability, pyplot, save_figure

import implicit_vi as ivi

OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
DEFAULT_METHODS = ("map", "map-ts", "ivon", "ivon-val", "ivi-paper", "ivi")
TASKS = {
    "digits": "held-out digits (10 classes) and their rotations",
    "digits-ood": "digits 0-4, with the digits 5-9 out of distribution",
    "teacher": "teacher network (16-D, 5 classes)",
    "spiral": "three-armed spiral (2-D, 3 classes)",
}
IDX_NAMES = ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte", "train-images-idx3-ubyte")

Predict = Callable[[jax.Array, np.ndarray], np.ndarray]
# The tables' first column: wide enough for every method's name.
NAME_WIDTH = max(28, *(len(label) + 2 for label in METHODS.values()))


# ----- data ----------------------------------------------------------------------------------


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


# ----- a run of the implicit-VI paper's program ------------------------------------------------


def load_trained_run(run_dir: str, data_folder: str | None = None):
    """A run folder of ``examples/implicit_vi_paper/train.py``: its network, generator and data.

    Rebuilds the run's Bayesian network from the flags saved in its checkpoint (the generator
    configuration's text included), reads the trained variational parameters and the run's
    data set (its test split, standardised as in training).

    Args:
      run_dir: the folder holding ``checkpoint.npz``.
      data_folder: where the data set's files are (default: the run's ``--datasetfolder``);
        not needed for digits.

    Returns:
      ``(predict, data, settings)``: ``predict(key, x) -> probs`` (BMA over 64 samples),
      the run's ``ImageData`` and its flags (a dict).

    Raises:
      CheckpointError: no readable checkpoint of the program's current format.
      DataError: the data set's files are missing or malformed.
    """
    path = os.path.join(run_dir, PAPER_CHECKPOINT)
    meta = load_meta(path)
    try:
        run = PaperRun(**meta["settings"])
    except (KeyError, TypeError) as error:
        raise CheckpointError(
            f"{path} was not written by this version of implicit_vi_paper/train.py ({error})"
        ) from None
    data = load_image_data(
        run.dataset,
        data_folder or meta.get("datasetfolder") or "data",
        validation_fraction=run.validation_fraction,
        seed=run.randseed,
    )
    bnn, optimizer, _ = build_paper_training(
        run, x_example=data.x_train[:1], num_classes=data.num_classes, num_train=len(data.x_train)
    )
    state, _ = load_checkpoint(path, initial_paper_state(run, bnn, optimizer))
    vi_params = state.vi_params

    def predict(key, x):
        x = np.asarray(x, np.float32).reshape(-1, *data.x_test.shape[1:])
        return np.asarray(bnn.predict_proba(vi_params, key, x, num_samples=64))

    return predict, data, meta["settings"]


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
        kl_weights=args.kl_weights,
    )
    results, arrays = {}, {}
    for task in args.tasks:
        print(f"  task {task}: {TASKS[task]}", flush=True)
        data = load_task(task, seed, args.validation_fraction)
        results[task], arrays[task] = {}, {}
        for method in args.methods:
            print(f"  {METHODS[method]}", flush=True)
            predict, info = train_method(method, data, hidden=args.hidden, seed=seed, **options)
            key = jax.random.key(1000 + seed)
            record, arrays[task][method] = evaluate(task, predict, data, key, args, extra_ood)
            record["train_seconds"] = info["train_seconds"]
            if "selected" in info:  # e.g. "kl_weight=0.1", kept per seed by mean_std
                ((name, value),) = info["selected"].items()
                record["selected"] = f"{name}={value:g}"
            if "validation_nll" in info:
                record["validation_nll"] = info["validation_nll"]
            if "candidates" in info:  # every candidate's test metrics: what the choice cost
                x_test, y_test = data["test"]
                record["candidates_test"] = {
                    value: classification_metrics(predict(key, x_test), y_test)
                    for value, predict in info["candidates"].items()
                }
            results[task][method] = record
        if "true_probs" in data:  # the generated tasks: the Bayes-optimal predictor
            results[task]["bayes"] = {
                "test": classification_metrics(data["true_probs"], data["test"][1])
            }
    return {"results": results, "arrays": arrays}


# ----- tables and plots -------------------------------------------------------------------------


def _cell(stat: dict, digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def format_task_table(summary: dict, methods: Sequence[str]) -> str:
    """One task: accuracy, NLL, Brier, ECE (mean ± std), the calibrated-ECE floor, what was
    chosen on validation (per seed) and the training time; under a method that chooses, each
    candidate's test metrics had it been chosen on every seed."""
    header = ["accuracy", "NLL", "Brier", "ECE", "ECE floor (95%)"]
    lines = [f"{'method':<{NAME_WIDTH}}" + "".join(f"{h:>18}" for h in header)]
    lines[0] += "  chosen / train (s)"
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
        lines.append(f"{name:<{NAME_WIDTH}}" + "".join(f"{c:>18}" for c in cells) + f"  {notes}")
        for value, metrics in s.get("candidates_test", {}).items():
            label = f"  {s['selected'][0].split('=')[0]}={value} on every seed"
            cells = [_cell(metrics[k]) for k in ("accuracy", "nll", "brier", "ece")]
            lines.append(f"{label:<{NAME_WIDTH}}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def format_shift_table(summary: dict, methods: Sequence[str], angles) -> str:
    lines = [f"{'method':<{NAME_WIDTH}}" + "".join(f"{str(a) + ' deg':>22}" for a in angles)]
    lines.append(f"{'':<{NAME_WIDTH}}" + "".join(f"{'acc / NLL / ECE':>22}" for _ in angles))
    for method in methods:
        rows = summary[method]["rotation"]
        cells = [
            f"{rows[str(a)]['accuracy']['mean']:.3f}/{rows[str(a)]['nll']['mean']:.3f}/"
            f"{rows[str(a)]['ece']['mean']:.3f}"
            for a in angles
        ]
        lines.append(f"{METHODS[method]:<{NAME_WIDTH}}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def format_ood_table(summary: dict, methods: Sequence[str]) -> str:
    names = list(summary[methods[0]]["ood"])
    lines = [f"{'method':<{NAME_WIDTH}}" + "".join(f"{n + ' (maxp / entropy)':>32}" for n in names)]
    for method in methods:
        ood = summary[method]["ood"]
        cells = [
            f"{ood[n]['auroc_max_prob']['mean']:.3f} / {ood[n]['auroc_entropy']['mean']:.3f}"
            for n in names
        ]
        lines.append(f"{METHODS[method]:<{NAME_WIDTH}}" + "".join(f"{c:>32}" for c in cells))
    return "\n".join(lines)


# The spiral's predictive maps are drawn on this grid of the plane (60 x 60 points).
_AXIS = np.linspace(-4.5, 4.5, 60, dtype=np.float32)
SPIRAL_GRID = np.stack(np.meshgrid(_AXIS, _AXIS), -1).reshape(-1, 2)


def plot_all(summary, arrays, methods, angles, prefix) -> list[str]:
    """Reliability diagrams per task, metrics against angle, entropy histograms and the
    spiral's predictive maps (first seed); returns the paths."""
    plt = pyplot()
    paths = []

    def save(fig, name):
        paths.append(save_figure(fig, f"{prefix}_{name}.png", dpi=110))

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
        # Saved as it is: save_figure's tight layout would undo the constrained one that
        # places the shared colour bar.
        fig.savefig(f"{prefix}_spiral.png", dpi=110)
        paths.append(f"{prefix}_spiral.png")
        plt.close(fig)
    return paths


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds of the harness (0: only --run)")
    parser.add_argument("--epochs", type=_positive_int, default=60)
    parser.add_argument("--batch-size", type=_positive_int, default=64)
    parser.add_argument("--hidden", default="128,128", help="hidden widths, comma-separated")
    parser.add_argument(
        "--samples",
        type=_positive_int,
        default=ivi.TRAIN_SAMPLES,
        help="implicit VI: networks sampled per training step (the trainer's num_samples)",
    )
    parser.add_argument(
        "--kl-weights",
        type=kl_weight_list,
        default=ivi.KL_WEIGHTS,
        help="ivi: the candidate KL weights beta, chosen on validation (the library's default)",
    )
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
        help="a run folder of examples/implicit_vi_paper/train.py: evaluated on its own test set",
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
    if args.run and not os.path.isfile(os.path.join(args.run, PAPER_CHECKPOINT)):
        parser.error(
            f"--run {args.run}: no {PAPER_CHECKPOINT} (a run folder of implicit_vi_paper/train.py)"
        )
    if args.ood_folder and not os.path.isdir(args.ood_folder):
        parser.error(f"--ood-folder {args.ood_folder} is not a folder")
    if args.ood_folder:
        try:  # read once here, so that a malformed file stops the program before training
            load_ood_folder(args.ood_folder, limit=1)
        except DataError as error:
            parser.error(f"--ood-folder: {error}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
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
        try:
            trained_run = evaluate_trained_run(args.run, args.angles, args.run_data_folder)
        except (CheckpointError, DataError) as error:
            print(f"{os.path.basename(sys.argv[0])}: error: --run: {error}", file=sys.stderr)
            sys.exit(2)
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
    write_json(prefix + ".json", report)
    print(f"\nsaved {prefix}.json and {len(paths)} plots ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
