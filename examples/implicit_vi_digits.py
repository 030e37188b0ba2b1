"""Digits classification: a Flax MLP made Bayesian with an MM generator, against the same MLP
trained deterministically with Adam.

Data: scikit-learn's bundled 8x8 digits (1,797 images, no download), a stratified 75% train /
25% test split. The MLP 64-128-128-10 (26,122 weights) is trained (1) deterministically with
Adam on the cross-entropy and (2) as an implicit-VI BNN: implicit_vi's automatic multi-head MM
generator (noise 16 x 16, one head per layer), the linearised ELBO with the "smallest_sv"
entropy (the eigen-solver warm-started from the previous step), S samples per step, Adam
(learning rate 3e-3, cosine decay), and Bayesian model averaging over K fresh samples at test
time. Reports accuracy, NLL, Brier score and ECE (15 equal-width bins; all from
bdl_examples.metrics) on the test set, and saves reliability diagrams to
examples/output/implicit_vi_digits.png.

By default the ELBO is the proper per-data-point one (prior and entropy weighted 1/N);
``--paper-weights`` uses the paper's down-weighting (prior 8.5e-4 / B, entropy 1 / B).

Usage:
  python examples/implicit_vi_digits.py [--epochs 60] [--samples 4] [--lr 3e-3] [--paper-weights]

docs/implicit_vi.md ("Choosing the posterior's spread") measures these settings against MAP and
IVON over three seeds; examples/uncertainty_eval.py is the full comparison.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bdl_examples.data import load_digits_split
from bdl_examples.metrics import classification_metrics
from bdl_examples.models import MLP
from bdl_examples.plots import plot_reliability, pyplot, save_figure
from bdl_examples.training import fit, fit_cross_entropy

import implicit_vi as ivi

OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
BATCH = 64
# The training step's values averaged over every epoch (shown by the progress bar).
LOGGED = ("loss", "expected_log_likelihood", "solver_iterations")


def train_implicit_vi(
    bnn, data, *, epochs: int, lr: float, samples: int, paper_weights: bool, seed: int
):
    """Trains the implicit-VI network with Adam (cosine decay), the eigen-solver's vectors
    carried from step to step; returns the variational parameters and the ``FitResult``."""
    x_train, y_train = data
    num_train = len(x_train)
    vi_params = bnn.init(jax.random.key(seed))
    steps = epochs * (num_train // BATCH)
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.1))
    opt_state = optimizer.init(vi_params)
    weights = (
        {"prior_weight": 8.5e-4 / BATCH, "entropy_weight": 1.0 / BATCH} if paper_weights else {}
    )
    train_step = bnn.make_train_step(
        optimizer,
        num_data=num_train,
        num_samples=samples,
        entropy="smallest_sv",
        **weights,
    )
    # Zero rows start the solver afresh (what eigvecs=None does), in a carry of fixed shape.
    batch = (x_train[:BATCH], y_train[:BATCH])
    shape = jax.eval_shape(train_step, vi_params, opt_state, jax.random.key(0), batch)[2]
    eigvecs = jnp.zeros(shape["eigvecs"].shape, shape["eigvecs"].dtype)

    def step(state, key, batch):
        vi_params, opt_state, eigvecs = state
        vi_params, opt_state, aux = train_step(vi_params, opt_state, key, batch, eigvecs)
        return (vi_params, opt_state, aux["eigvecs"]), {name: aux[name] for name in LOGGED}

    result = fit(
        step,
        (vi_params, opt_state, eigvecs),
        x_train,
        y_train,
        epochs=epochs,
        batch_size=BATCH,
        key=jax.random.key(10_000 + seed),
        label="implicit VI",
    )
    return result.state[0], result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-3, help="implicit VI's learning rate")
    parser.add_argument("--samples", type=int, default=4, help="Monte Carlo samples per step (S)")
    parser.add_argument(
        "--test-samples", type=int, default=100, help="samples for model averaging (K)"
    )
    parser.add_argument(
        "--paper-weights", action="store_true", help="the paper's prior/entropy down-weighting"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", default=os.path.join(OUTPUT, "implicit_vi_digits.png"), help="PNG path"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the comparison; returns ``{model: metrics}`` of the test set."""
    args = parse_args(argv)
    data = load_digits_split(args.seed)
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    print(
        f"digits: {len(x_train)} training and {len(x_test)} test images, "
        f"{x_train.shape[1]} features, {data['num_classes']} classes"
    )

    model = MLP(widths=(128, 128), num_outputs=data["num_classes"])
    params = model.init(jax.random.key(args.seed), x_train[:1])["params"]

    deterministic = fit_cross_entropy(
        model,
        params,
        optax.adam(1e-3),
        x_train,
        y_train,
        epochs=args.epochs,
        batch_size=BATCH,
        key=jax.random.key(args.seed),
        label="Adam",
    )
    det_params, _ = deterministic.state
    det_probs = np.asarray(jax.nn.softmax(model.apply({"params": det_params}, x_test)))
    print(f"deterministic MLP (Adam, {args.epochs} epochs): {deterministic.seconds:.0f} s")

    bnn = ivi.ImplicitBNN.from_linen(model, params, likelihood=ivi.Categorical())
    print(bnn.report())
    vi_params, vi_fit = train_implicit_vi(
        bnn,
        (x_train, y_train),
        epochs=args.epochs,
        lr=args.lr,
        samples=args.samples,
        paper_weights=args.paper_weights,
        seed=args.seed,
    )
    print(f"implicit VI ({args.epochs} epochs, S = {args.samples}): {vi_fit.seconds:.0f} s")
    bnn_probs = np.asarray(
        bnn.predict_proba(vi_params, jax.random.key(1), x_test, num_samples=args.test_samples)
    )

    rows = {
        "MLP, Adam (deterministic)": classification_metrics(det_probs, y_test),
        f"implicit VI, BMA K={args.test_samples}": classification_metrics(bnn_probs, y_test),
    }
    weighting = "paper down-weighting" if args.paper_weights else "per-data-point ELBO"
    print(f"\ntest set ({len(y_test)} images); implicit VI with {weighting}, S = {args.samples}")
    print(f"  {'model':<32}{'accuracy':>10}{'NLL':>8}{'Brier':>8}{'ECE-15':>8}")
    for name, m in rows.items():
        print(
            f"  {name:<32}{m['accuracy']:>10.4f}{m['nll']:>8.4f}{m['brier']:>8.4f}{m['ece']:>8.4f}"
        )

    fig, axes = pyplot().subplots(1, 2, figsize=(9, 4))
    plot_reliability(axes[0], det_probs, y_test, "MLP, Adam")
    plot_reliability(axes[1], bnn_probs, y_test, "implicit VI (MM generator)")
    axes[0].set_title("MLP, Adam")
    axes[1].set_title("implicit VI (MM generator)")
    print(f"saved {os.path.relpath(save_figure(fig, args.output))}")
    return rows


if __name__ == "__main__":
    main()
