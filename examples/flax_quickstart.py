"""IVON against AdamW on a small real dataset, with a Flax linen MLP.

scikit-learn's handwritten digits (1,797 8x8 images, shipped with the package: nothing is
downloaded), with only a few hundred training images (a stratified split; the others are the
test set). Both optimizers get the same network, data, batch size and number of steps.
Printed for the test images, and for the same test images with Gaussian pixel noise (a
distribution shift the network never saw): accuracy, negative log-likelihood (NLL), Brier
score and expected calibration error (ECE, 15 equal-width bins, from bdl_examples.metrics) of

  - AdamW,
  - IVON at the posterior mean ("IVON@mean"),
  - IVON's Bayesian model average over 64 posterior samples ("IVON BMA-64"),

averaged over --seeds runs (different splits and initialisations). Plots (reliability
diagrams on both test sets, and predictive entropies on the noisy images) go to
examples/output/flax_quickstart.png.

  python examples/flax_quickstart.py                 # well under a minute on a laptop CPU
  python examples/flax_quickstart.py --train-size 1000 --noise 0.3
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
import optax
from bdl_examples.data import load_digits_split
from bdl_examples.metrics import classification_metrics, predictive_entropy
from bdl_examples.models import MLP
from bdl_examples.plots import plot_reliability, pyplot, save_figure
from bdl_examples.training import fit_cross_entropy, report_ivon_posterior

import ivon

OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output", "flax_quickstart.png")


def load_data(seed: int, *, train_size: int, noise: float) -> dict:
    """The harness's stratified digits split with ``train_size`` training images, and
    ``"noisy test"``: the test images with Gaussian pixel noise of standard deviation
    ``noise`` (clipped to [0, 1])."""
    data = load_digits_split(seed, train_size=train_size)
    x_test = data["test"][0]
    rng = np.random.default_rng(seed)
    noisy = np.clip(x_test + noise * rng.normal(size=x_test.shape), 0, 1).astype(np.float32)
    return dict(data, noisy_test=noisy)


def run(args, seed: int) -> dict:
    """Trains both optimizers on one split; returns the metrics and probabilities of every
    method on both test sets."""
    data = load_data(seed, train_size=args.train_size, noise=args.noise)
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    model = MLP(widths=(args.hidden, args.hidden), num_outputs=data["num_classes"])
    params = model.init(jax.random.key(seed), x_train[:1])["params"]
    steps_per_epoch = len(x_train) // args.batch_size
    total_steps = args.epochs * steps_per_epoch

    adamw = optax.adamw(
        optax.cosine_decay_schedule(args.adamw_lr, total_steps),
        weight_decay=args.adamw_weight_decay,
    )
    ivon_optimizer = ivon.ivon(
        optax.warmup_cosine_decay_schedule(0.0, args.ivon_lr, steps_per_epoch, total_steps),
        ess=float(args.train_size),
        hess_init=args.hess_init,
        beta2=args.beta2,
        weight_decay=args.ivon_weight_decay,
    )

    print(
        f"seed {seed}: {len(x_train)} training and {len(x_test)} test images, "
        f"{total_steps} steps of batch {args.batch_size} for each optimizer"
    )
    adamw_fit = fit_cross_entropy(
        model,
        params,
        adamw,
        x_train,
        y_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        key=jax.random.key(seed),
        label="AdamW",
    )
    # IVON takes every step's gradient at a fresh posterior sample
    ivon_fit = fit_cross_entropy(
        model,
        params,
        ivon_optimizer,
        x_train,
        y_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        key=jax.random.key(seed),
        sample=ivon.sample_parameters,
        label="IVON",
    )
    adamw_params, _ = adamw_fit.state
    ivon_params, ivon_state = ivon_fit.state

    def predict(p, x):
        return jax.nn.softmax(model.apply({"params": p}, x))

    bma = jax.jit(ivon.bayesian_model_average(predict, args.samples, batch_size=8))
    bma_name = f"IVON BMA-{args.samples}"
    probs = {}
    for test_set, x in (("test", x_test), ("noisy test", data["noisy_test"])):
        probs[test_set] = {
            "AdamW": predict(adamw_params, x),
            "IVON@mean": predict(ivon_params, x),
            bma_name: bma(jax.random.key(seed + 1), ivon_params, ivon_state, x),
        }
    report_ivon_posterior(ivon_state, hess_init=args.hess_init, beta2=args.beta2)
    return {
        "metrics": {
            test_set: {name: classification_metrics(p, y_test) for name, p in by_method.items()}
            for test_set, by_method in probs.items()
        },
        "probs": probs,
        "labels": y_test,
    }


def plot(result: dict, path: str) -> str:
    """Reliability diagrams on both test sets and the predictive entropies on the noisy
    images (one seed's run), saved as a PNG."""
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4.2))
    for ax, (test_set, by_method) in zip(axes, result["probs"].items()):
        for name, probs in by_method.items():
            plot_reliability(ax, probs, result["labels"], label=name)
        ax.set_title(f"Reliability, {test_set} images")
    ax = axes[2]
    noisy = result["probs"]["noisy test"]
    bins = np.linspace(0, np.log(10), 30)
    for name, color in (("AdamW", "tab:blue"), (list(noisy)[2], "tab:green")):
        entropy = predictive_entropy(noisy[name])
        ax.hist(
            entropy, bins=bins, alpha=0.6, color=color, label=f"{name} (mean {entropy.mean():.2f})"
        )
    ax.set(
        xlabel="predictive entropy (nats)",
        ylabel="noisy test images",
        title="Uncertainty on the noisy test images",
    )
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-size", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument(
        "--noise",
        type=float,
        default=0.4,
        help="std of the pixel noise of the shifted test set (pixels in [0, 1])",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--samples", type=int, default=64, help="posterior samples for the BMA")
    parser.add_argument("--seeds", type=int, default=3, help="average over this many seeds")
    parser.add_argument("--adamw-lr", type=float, default=1e-3)
    parser.add_argument("--adamw-weight-decay", type=float, default=1e-4)
    parser.add_argument("--ivon-lr", type=float, default=0.3)
    parser.add_argument("--hess-init", type=float, default=1.0)
    parser.add_argument("--beta2", type=float, default=0.999)
    parser.add_argument("--ivon-weight-decay", type=float, default=1e-4)
    parser.add_argument("--output", default=OUTPUT, help="PNG path of the plots")
    args = parser.parse_args(argv)
    if args.samples % 8:
        parser.error("--samples must be a multiple of 8")
    return args


def main(argv=None) -> dict:
    """Runs the comparison; returns the metrics averaged over the seeds,
    ``{test set: {method: {metric: value}}}``."""
    args = parse_args(argv)
    start = time.perf_counter()
    results = [run(args, seed) for seed in range(args.seeds)]
    means = {}
    for test_set, by_method in results[0]["metrics"].items():
        extra = f", pixel noise std {args.noise}" if test_set == "noisy test" else ""
        print(
            f"\n{test_set} images ({args.train_size} training images{extra}; "
            f"mean over {args.seeds} seed(s)):"
        )
        print(f"{'method':<14} {'accuracy':>9} {'NLL':>8} {'Brier':>8} {'ECE':>8}")
        means[test_set] = {}
        for name, first in by_method.items():
            row = {k: np.mean([r["metrics"][test_set][name][k] for r in results]) for k in first}
            means[test_set][name] = {k: float(v) for k, v in row.items()}
            print(
                f"{name:<14} {row['accuracy']:>9.4f} {row['nll']:>8.4f} {row['brier']:>8.4f} "
                f"{row['ece']:>8.4f}"
            )
    path = plot(results[0], args.output)
    print(f"\nsaved {path}  (total {time.perf_counter() - start:.0f} s)")
    return means


if __name__ == "__main__":
    main()
