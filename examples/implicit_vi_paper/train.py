"""Train a Bayesian neural network with implicit variational inference: the paper's program.

The training program of Uppal et al., "Implicit Variational Inference for High-Dimensional
Posteriors" (NeurIPS 2023), on this library: the same flags and defaults, the generator
configuration files in their published layout (``--config``, e.g. the files in
``examples/implicit_vi_paper/configs/``), and the paper's down-weighted loss,

    loss = -( mean_s mean_i log p(y_i | x_i, theta_s) + w_p mean_s log p(theta_s) + w_H H ),
    w_p = prob_down_weight / B,   w_H = jacobi_down_weight / B   (B: the batch size),

with the entropy H from the smallest-singular-value bound (``--accurate``: exact), Adam with
amsgrad and a cosine-decayed learning rate, S samples per step, and Bayesian model averaging
over fresh samples for every test batch. In the library's terms (``ivi.elbo_loss``) this is
``kl_weight = jacobi_down_weight * N / B`` and ``prior_scale = prob_down_weight /
jacobi_down_weight`` for N training examples; ``--proper_elbo`` uses the per-data-point ELBO
(``kl_weight = prior_scale = 1``, w_p = w_H = 1/N) instead. Each weight gets Gaussian noise of
std ``--weight_noise`` (the paper's 1e-3, or ``learned``: one std per weight trained with the
ELBO). The bound's eigen-solver (``ivi.SmallestSingularValue``: ``--solver_iterations``,
``--solver_tolerance``, ``--entropy_samples``) starts from the previous step's vectors and
stops at the library's residual tolerance; the paper ran exactly 5 iterations from a fresh
start on all S samples (``--cold_start --solver_tolerance none --solver_iterations 5
--entropy_samples 10``).

``--calibrated`` trains the library's calibrated posterior instead (docs/implicit_vi.md,
"Calibrated posteriors"): the per-data-point ELBO with its prior and entropy tempered by a KL
weight beta (``--kl_weight``), learned per-weight noise (``--weight_noise learned``), the
prior N(0, initial std^2) per layer (``--prior_std auto``), and beta chosen from the library's
candidates (``ivi.KL_WEIGHTS``: 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003) by the library's
rule, the highest validation log-likelihood of the model average
(``ivi.predictive_log_likelihood``), on a validation split of 15% of the training set
(``--validation_fraction 0.15``) that the program holds out: one run per beta in a sub-folder
``kl_weight_BETA`` of the run folder, and the run folder's ``results.json`` names the chosen
beta and reports its test metrics. Each of these flags can also be given alone.

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
so digits defaults to ``--train_batch_size 64 --epochs 30 --lr 1e-3`` (a few minutes on two
CPU cores).

Networks: ``--model MLP`` (784-400-400-10 on MNIST; ``--mlp_widths``) or ``--model LeNet``
(LeNet-5: conv 5x5 6, max-pool, conv 5x5 16, max-pool, dense 120, 84, 10, ReLU; the
convolutions pad the input ("SAME") on images smaller than 28 pixels, such as digits).

Each run has a folder RESULTSFOLDER/RUN_NAME (by default
examples/output/implicit_vi_paper/DATASET_MODEL_CONFIG_seedSEED) holding ``checkpoint.npz``
(written atomically after every epoch; ``--resume`` continues the run exactly where it
stopped, with the same flags), ``results.json`` (the arguments, the generator's size, a
per-epoch log and the final test metrics) and ``training.png`` (loss per epoch and a
reliability diagram). Every epoch is one compiled loop over its steps; a line per epoch
reports its loss, and a progress bar the test batches.

Usage:
  python examples/implicit_vi_paper/train.py              # digits, MLP, automatic generator
  python examples/implicit_vi_paper/train.py --dataset mnist --model LeNet \\
      --config examples/implicit_vi_paper/configs/mnist_lenet.yaml --trunk none
  python examples/implicit_vi_paper/train.py --dataset cifar10 --model LeNet \\
      --config examples/implicit_vi_paper/configs/cifar_lenet.yaml --resume
  python examples/implicit_vi_paper/train.py --calibrated  # digits, beta on validation
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from bdl_examples.checkpoints import (
    CheckpointError,
    load_checkpoint,
    load_meta,
    save_checkpoint,
    write_json,
)
from bdl_examples.data import DataError
from bdl_examples.metrics import classification_metrics
from bdl_examples.paper import (
    PAPER_CHECKPOINT,
    ImageData,
    PaperRun,
    build_paper_training,
    initial_paper_state,
    load_image_data,
    make_paper_generator,
)
from bdl_examples.plots import plot_reliability, pyplot, save_figure
from bdl_examples.progress import ProgressBar
from bdl_examples.training import epoch_runner

import implicit_vi as ivi

EXAMPLES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = ("mnist", "fashion_mnist", "cifar10", "digits")
MODELS = ("MLP", "LeNet")
# The published program's defaults, made for MNIST-sized data (234 steps per epoch). On the
# 1,347 training digits they would give 500 small steps in all, so digits has its own.
PAPER_DEFAULTS = {"train_batch_size": 256, "epochs": 100, "lr": 7e-5}
DIGITS_DEFAULTS = {"train_batch_size": 64, "epochs": 30, "lr": 1e-3}
CHECKPOINT = PAPER_CHECKPOINT
RESULTS = "results.json"
# --calibrated: the library's calibrated posterior, with beta chosen on validation from the
# library's candidates.
CALIBRATED = {
    "proper_elbo": True,
    "weight_noise": "learned",
    "prior_std": "auto",
    "kl_weight": list(ivi.KL_WEIGHTS),
    "validation_fraction": 0.15,
}
PLAIN = {
    "weight_noise": 1e-3,
    "prior_std": 1.0,
    "kl_weight": [1.0],
    "validation_fraction": 0.0,
}
# The bound's solver: the library's defaults for the flags left out.
SOLVER = ivi.SmallestSingularValue()
# The training step's values (ivi.StepInfo) averaged over every epoch into the log.
LOGGED = ivi.StepInfo._fields


class UsageError(Exception):
    """Inconsistent flags or run folder (the program exits with status 2)."""


# ----- the run: its flags, its folder and its checkpoint ------------------------------------------


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


def read_settings(args) -> PaperRun:
    """The flags that define the run, with the ``--config`` file's text (wherever it lies),
    read and checked here so that a bad file stops the program before any work.

    Raises:
      UsageError: the configuration cannot be read or is not a valid one.
    """
    config = None
    if args.config is not None:
        try:
            with open(args.config) as f:
                config = f.read()
        except OSError as error:
            raise UsageError(f"--config {args.config}: cannot read it: {error}") from None
        try:
            make_paper_generator(config, trunk=args.trunk)
        except ValueError as error:
            hint = ""
            if "trunk_shapes" in str(error):
                hint = " (here: --trunk A1xB1,A2xB2, or --trunk none for a single head)"
            raise UsageError(f"--config {args.config}: {error}{hint}") from None
    flags = {field.name: getattr(args, field.name) for field in dataclasses.fields(PaperRun)}
    return PaperRun(**flags | {"config": config})


def saved_run(args, run: PaperRun, run_dir: str) -> dict | None:
    """The ``meta`` of the run folder's checkpoint when the run is to be resumed, else None.

    Raises:
      UsageError: a checkpoint exists without ``--resume`` (it is never overwritten), or it
        was saved with other flags (a run resumes only with the flags it started with).
      CheckpointError: the checkpoint is damaged.
    """
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.exists(path):
        if args.resume:
            print(f"no checkpoint in {run_dir}: starting the run from scratch")
        return None
    if not args.resume:
        raise UsageError(
            f"{run_dir} already holds a checkpoint: pass --resume to continue that run, or "
            "--run_name NAME for a new one"
        )
    meta = load_meta(path)
    saved = meta.get("settings", {})
    current = json.loads(json.dumps(dataclasses.asdict(run)))  # as the JSON file holds it
    changed = [name for name in current if saved.get(name, "missing") != current[name]]
    changed += [name for name in saved if name not in current]
    if changed:
        raise UsageError(
            f"--resume: the run in {run_dir} was started with other values of "
            f"{', '.join('--' + name for name in changed)}; a resumed run must use the same "
            "settings (or pass --run_name NAME for a new run)"
        )
    return meta


# ----- training and evaluation --------------------------------------------------------------------


def generator_sizes(bnn: ivi.ImplicitBNN) -> dict:
    """The generator's size against the network's: its parameters, the stochastic weights D
    it generates, its output (at least D) and its latent dimension d."""
    generator = bnn.model.generator
    noise = jax.ShapeDtypeStruct((1, *generator.noise_shape), jnp.float32)
    variables = jax.eval_shape(generator.init, jax.random.key(0), noise)
    return {
        "generator_params": bnn.num_generator_params(),
        "stochastic_params": bnn.num_stochastic,
        "generator_output": int(jax.eval_shape(generator.apply, variables, noise).shape[-1]),
        "latent_dim": bnn.latent_dim,
    }


def describe_generator(sizes: dict) -> str:
    ratio = sizes["generator_params"] / sizes["stochastic_params"]
    return "\n".join(
        [
            f"latent dimension d            {sizes['latent_dim']:>12,}",
            f"stochastic parameters D       {sizes['stochastic_params']:>12,}",
            f"generator output              {sizes['generator_output']:>12,}",
            f"generator parameters          {sizes['generator_params']:>12,}  ({ratio:.2f} x D)",
        ]
    )


@dataclasses.dataclass
class Run:
    """A run being trained: its flags, folder, data, Bayesian network and the generator's
    sizes, and the ``meta`` of its checkpoint (epochs done, the per-epoch log, the training
    time, the saved flags)."""

    args: argparse.Namespace
    folder: str
    data: ImageData
    bnn: ivi.ImplicitBNN
    sizes: dict
    meta: dict

    def results(self, status: str, test: dict | None = None, validation=None) -> dict:
        """What results.json holds: the arguments, the generator's size, the log, metrics."""
        return {
            "status": status,
            "args": dict(vars(self.args)),
            "run_folder": self.folder,
            "num_train": len(self.data.x_train),
            "num_test": len(self.data.x_test),
            "generator": self.sizes,
            "steps_per_epoch": len(self.data.x_train) // self.args.train_batch_size,
            "train_seconds": self.meta["train_seconds"],
            "log": self.meta["log"],
            "validation": validation,
            "test": test,
        }


def start_run(args) -> tuple[Run, ivi.TrainState, ivi.Trainer]:
    """Reads the data, builds the network and restores the checkpoint when resuming.

    Returns:
      ``(run, state, trainer)``: the run, its ``ivi.TrainState`` (fresh or restored) and the
      library's ``ivi.Trainer``.

    Raises:
      DataError, UsageError, CheckpointError: see ``main``.
    """
    settings = read_settings(args)
    data = load_image_data(
        args.dataset,
        args.datasetfolder,
        validation_fraction=args.validation_fraction,
        seed=args.randseed,
    )
    num_train = len(data.x_train)
    if args.train_batch_size > num_train:
        raise UsageError(
            f"--train_batch_size {args.train_batch_size} exceeds the {num_train} training examples"
        )
    folder = run_folder(args)
    meta = saved_run(args, settings, folder)
    bnn, optimizer, trainer = build_paper_training(
        settings, x_example=data.x_train[:1], num_classes=data.num_classes, num_train=num_train
    )
    print(
        f"{args.dataset}: {num_train} training and {len(data.x_test)} test images of shape "
        f"{data.x_train.shape[1:]}; {args.model}, "
        f"{'generator ' + args.config if args.config else 'automatic generator'}"
    )
    sizes = generator_sizes(bnn)
    print(describe_generator(sizes))
    state = initial_paper_state(settings, bnn, optimizer)
    if meta is None:
        meta = {"epoch": 0, "log": [], "train_seconds": 0.0}
    else:
        state, meta = load_checkpoint(os.path.join(folder, CHECKPOINT), state)
        print(f"resumed {folder} after epoch {meta['epoch']}")
    # Saved with every checkpoint: the flags to check a resumed run against and to rebuild
    # the run (examples/uncertainty_eval.py --run), and where its data set lies.
    meta |= {"settings": dataclasses.asdict(settings), "datasetfolder": args.datasetfolder}
    os.makedirs(folder, exist_ok=True)
    return Run(args, folder, data, bnn, sizes, meta), state, trainer


def make_step(trainer: ivi.Trainer, cold_start: bool):
    """The harness's ``step(state, key, batch) -> (state, aux)`` around ``trainer.step``.

    The eigen-solver starts from the previous step's vectors (the state's
    ``solver_vectors``), or with ``cold_start`` from random unit vectors drawn at every step.
    """

    def step(state: ivi.TrainState, key, batch):
        if cold_start:
            key, start_key = jax.random.split(key)
            shape, dtype = state.solver_vectors.shape, state.solver_vectors.dtype
            start = jax.random.normal(start_key, shape, dtype)
            start = start / jnp.linalg.norm(start, axis=-1, keepdims=True)
            state = state._replace(solver_vectors=start)
        state, info = trainer.step(key, state, batch)
        return state, info._asdict()

    return step


def train_epochs(run: Run, trainer: ivi.Trainer, state: ivi.TrainState) -> ivi.TrainState:
    """Epochs ``meta["epoch"] + 1`` to ``--epochs`` (or ``--stop_after`` of them), each one
    compiled loop over its minibatches, with a checkpoint and results.json after each;
    returns the state and updates ``run.meta``."""
    args, meta = run.args, run.meta
    run_epoch = epoch_runner(
        make_step(trainer, args.cold_start),
        run.data.x_train,
        run.data.y_train,
        batch_size=args.train_batch_size,
    )
    step_key = jax.random.fold_in(jax.random.key(args.randseed), 1)
    last_epoch = args.epochs
    if args.stop_after is not None:
        last_epoch = min(args.epochs, meta["epoch"] + args.stop_after)
    for epoch in range(meta["epoch"], last_epoch):
        start = time.perf_counter()
        # Each epoch's key depends only on the seed and the epoch: a resumed run draws the
        # same minibatches and samples as the uninterrupted one.
        state, _, means = run_epoch(state, jax.random.fold_in(step_key, epoch))
        row = {"epoch": epoch + 1, **{name: float(value) for name, value in means.items()}}
        row["seconds"] = time.perf_counter() - start  # float() above waited for the epoch
        meta["log"].append(row)
        meta["epoch"] = epoch + 1
        meta["train_seconds"] += row["seconds"]
        save_checkpoint(os.path.join(run.folder, CHECKPOINT), state, meta)
        write_json(os.path.join(run.folder, RESULTS), run.results("running"))
        print(
            f"epoch {epoch + 1:>4}/{args.epochs}  loss {row['loss']:.4f}  "
            f"E[log lik] {row['expected_log_likelihood']:.4f}  entropy {row['entropy']:.4g}  "
            f"({row['seconds']:.1f} s)",
            flush=True,
        )
    return state


def evaluate(bnn, vi_params, inputs, key, *, num_samples: int, batch_size: int, label: str):
    """Bayesian model average of the class probabilities on ``inputs``, with fresh samples
    for every batch."""
    batches = range(0, len(inputs), batch_size)
    bar = ProgressBar(len(batches), f"  {label}")
    probs = []
    for i, start in enumerate(batches):
        batch_probs = bnn.predict_proba(
            vi_params,
            jax.random.fold_in(key, i),
            inputs[start : start + batch_size],
            num_samples=num_samples,
        )
        probs.append(np.asarray(batch_probs))
        bar.update(i + 1)
    bar.close()
    return np.concatenate(probs)


def validation_log_likelihood(bnn, vi_params, x, y, key, *, num_samples: int, batch_size: int):
    """The model average's mean log-likelihood per example on (x, y), by the library's
    ``ivi.predictive_log_likelihood`` (the score of ``ivi.select_kl_weight``), with fresh
    samples for every batch."""
    score = jax.jit(partial(ivi.predictive_log_likelihood, bnn.model), static_argnums=4)
    total = 0.0
    for i, start in enumerate(range(0, len(x), batch_size)):
        rows = slice(start, start + batch_size)
        values = score(vi_params, jax.random.fold_in(key, i), x[rows], y[rows], num_samples)
        total += float(jnp.sum(values))
    return total / len(x)


def save_plot(path: str, log: list[dict], probs: np.ndarray, labels: np.ndarray) -> None:
    """The loss per epoch and the test set's reliability diagram."""
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.8))
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
    plot_reliability(axes[1], probs, labels, label="implicit VI")
    axes[1].set_title("test reliability")
    save_figure(fig, path, dpi=110)


def finish(run: Run, vi_params) -> dict:
    """Test (and validation) metrics of the trained run, results.json and training.png."""
    args, data = run.args, run.data
    eval_key = jax.random.fold_in(jax.random.key(args.randseed), 2)
    evaluation = {"num_samples": args.test_samples, "batch_size": args.test_batch_size}
    start = time.perf_counter()
    probs = evaluate(run.bnn, vi_params, data.x_test, eval_key, label="test", **evaluation)
    test = classification_metrics(probs, data.y_test)
    test |= {"num_samples": args.test_samples, "seconds": time.perf_counter() - start}
    validation = None
    if data.x_val is not None:
        val_key = jax.random.fold_in(eval_key, 1)
        log_likelihood = validation_log_likelihood(
            run.bnn, vi_params, data.x_val, data.y_val, val_key, **evaluation
        )
        validation = {"log_likelihood": log_likelihood, "num_samples": args.test_samples}
        print(
            f"validation ({len(data.y_val)} images): log-likelihood {log_likelihood:.4f} per "
            "example"
        )
    final = run.results("finished", test, validation)
    write_json(os.path.join(run.folder, RESULTS), final)
    save_plot(os.path.join(run.folder, "training.png"), run.meta["log"], probs, data.y_test)
    print(
        f"test ({len(data.y_test)} images, {args.test_samples} sampled networks per batch): "
        + "  ".join(f"{k} {test[k]:.4f}" for k in ("accuracy", "nll", "brier", "ece"))
    )
    print(f"results in {run.folder}/ ({RESULTS}, training.png, {CHECKPOINT})")
    return final


def train(args) -> dict:
    """Runs (or resumes) one training run; returns the results written to results.json."""
    run, state, trainer = start_run(args)
    state = train_epochs(run, trainer, state)
    if run.meta["epoch"] < args.epochs:
        print(f"stopped after epoch {run.meta['epoch']} (--stop_after); continue with --resume")
        return run.results("stopped")
    return finish(run, state.vi_params)


def select_kl_weight(args) -> dict:
    """One run per ``--kl_weight`` value, each in a sub-folder ``kl_weight_BETA`` of the run
    folder (resumable on its own), and the choice by the library's rule
    (``ivi.select_kl_weight``): the highest validation log-likelihood, the first on a tie.

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
    chosen = max(candidates, key=lambda b: candidates[b]["validation"]["log_likelihood"])
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
            f"kl_weight {b:>6}: validation log-lik {r['validation']['log_likelihood']:.4f}  "
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


def _or_word(word: str, parse):
    def parse_or_word(text: str):
        return word if text.lower() == word else parse(text)

    return parse_or_word


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
        "--accurate",
        action="store_true",
        help="exact entropy, ivi.ExactEntropy (default: the scalable bound, "
        "ivi.SmallestSingularValue)",
    )
    p.add_argument(
        "--solver_iterations",
        type=positive_int,
        metavar="N",
        help="the bound's eigen-solver iterations: the cap with a tolerance, the exact count "
        f"without (default: the library's, {SOLVER.num_iterations})",
    )
    p.add_argument(
        "--solver_tolerance",
        type=_tolerance,
        metavar="TOL",
        help="the eigen-solver's relative residual at which it stops, or none for exactly "
        f"--solver_iterations iterations (default: the library's, {SOLVER.tolerance:g})",
    )
    p.add_argument(
        "--cold_start",
        action="store_true",
        help="start the eigen-solver from random vectors every step (default: from the "
        "previous step's); the paper's setting is --cold_start --solver_tolerance none "
        "--solver_iterations 5 --entropy_samples 10",
    )
    p.add_argument(
        "--entropy_samples",
        type=positive_int,
        metavar="K",
        help="estimate the entropy on K of the S samples per step (unbiased; the estimator's "
        f"num_samples; default: the library's, {SOLVER.num_samples}; the paper: all S)",
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
    p.add_argument(
        "--calibrated",
        action="store_true",
        help="the calibrated posterior, beta chosen on validation: "
        + " ".join(f"--{k} {_flag_text(v)}" for k, v in CALIBRATED.items()).replace(" True", ""),
    )
    p.add_argument(
        "--weight_noise",
        type=_or_word("learned", positive),
        metavar="STD|learned",
        help="std of the Gaussian noise on every generated weight (default: the paper's 1e-3); "
        "learned: one std per weight trained with the ELBO, from a tenth of its layer's "
        "initial std",
    )
    p.add_argument(
        "--prior_std",
        type=_or_word("auto", positive),
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
        type=positive,
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
        "several values: one run each, the highest validation log-likelihood chosen",
    )
    p.add_argument(
        "--validation_fraction",
        type=_number("a number", 0, False),
        help="share of the training set held out for validation (default 0: none)",
    )
    p.add_argument(
        "--calibrate_output",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="scale and shift the generator's output per layer to the network's "
        "initialisation (the library's default); --no-calibrate_output: the raw generator "
        "output, as in the paper",
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
        default=os.path.join(EXAMPLES, "output", "implicit_vi_paper"),
        help="where run folders go (default: examples/output/implicit_vi_paper)",
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
    if args.accurate:
        solver = {"--solver_iterations": args.solver_iterations}
        solver |= {"--solver_tolerance": args.solver_tolerance, "--cold_start": args.cold_start}
        given = [name for name, value in solver.items() if value not in (None, False)]
        if given:
            parser.error(f"{', '.join(given)} set the bound's solver: not with --accurate")
    # The library's defaults, saved with the run: a resumed run keeps them.
    for flag, value in (
        ("solver_iterations", SOLVER.num_iterations),
        ("solver_tolerance", "none" if SOLVER.tolerance is None else SOLVER.tolerance),
        ("entropy_samples", SOLVER.num_samples),
    ):
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.kl_weight != [1.0] and not args.proper_elbo:
        parser.error("--kl_weight tempers the per-data-point ELBO: it needs --proper_elbo")
    if args.entropy_samples > args.train_samples:
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
    except (DataError, UsageError, CheckpointError) as error:
        print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
