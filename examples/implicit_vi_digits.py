"""Digits classification: a Flax MLP made Bayesian with implicit_vi's defaults, against the
same MLP trained with Adam (MAP).

This is implicit_vi's quick start:

    bnn = ivi.ImplicitBNN.from_linen(model, params)          # the calibrated defaults
    chosen = ivi.select_kl_weight(bnn, x, y, key=key, epochs=60, batch_size=64)
    probs = bnn.predict_proba(chosen.state.vi_params, key, x_test)

``from_linen`` builds the automatic multi-head MM generator (one head per layer), learns one
noise std per weight (from a tenth of its layer's initial std) and puts the prior N(0, initial
std^2) on each layer. ``select_kl_weight`` trains one posterior per KL weight beta in
``ivi.KL_WEIGHTS`` on the training set less a 15% validation split and keeps the one whose
model average has the best validation log-likelihood; ``predict_proba`` averages the class
probabilities of 100 sampled networks.

Data: scikit-learn's bundled 8x8 digits (1,797 images, no download), a stratified 75% train /
25% test split. The MLP 64-128-128-10 (26,122 weights) is trained with Adam on the
cross-entropy (MAP, on the whole training set) and as the implicit-VI network above (Adam,
cosine decay from 3e-3, S = 4 samples per step, the entropy's solver warm-started from step to
step). Reports accuracy, NLL, Brier score and ECE (15 equal-width bins; bdl_examples.metrics)
on the test set, and saves reliability diagrams to examples/output/implicit_vi_digits.png.
With the defaults it trains seven posteriors (one compiled step shared by all): about 8
minutes on a busy 2-core machine; ``--kl-weight`` trains one.

Usage:
  python examples/implicit_vi_digits.py [--epochs 60] [--kl-weights 0.3,0.1,0.03,0.01,0.003]
  python examples/implicit_vi_digits.py --kl-weight 0.03   # one beta: no selection, 1 training

docs/implicit_vi.md ("Choosing the posterior's spread") explains the defaults;
examples/uncertainty_eval.py is the full comparison (MAP, IVON, implicit VI, several tasks).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import jax
import numpy as np
import optax
from bdl_examples.cli import kl_weight_list
from bdl_examples.data import load_digits_split
from bdl_examples.metrics import classification_metrics
from bdl_examples.models import MLP
from bdl_examples.plots import plot_reliability, pyplot, save_figure
from bdl_examples.training import fit_cross_entropy

import implicit_vi as ivi

OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
BATCH = 64


def train_implicit_vi(bnn, x, y, *, epochs: int, kl_weights, seed: int):
    """The posterior of ``select_kl_weight`` (several KL weights) or, for a single one, of
    one training with the same optimizer on all of (x, y); returns ``(vi_params, kl_weight,
    table)``, table ``((beta, validation log-likelihood per example), ...)`` (empty for one
    beta)."""
    key = jax.random.key(10_000 + seed)
    if len(kl_weights) > 1:
        chosen = ivi.select_kl_weight(
            bnn, x, y, key=key, epochs=epochs, batch_size=BATCH, kl_weights=kl_weights,
            verbose=True,
        )  # fmt: skip
        return chosen.state.vi_params, chosen.kl_weight, chosen.table
    # select_kl_weight's optimizer, on the whole training set.
    steps = epochs * (len(x) // BATCH)
    optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, steps, alpha=0.1))
    trainer = bnn.trainer(optimizer, num_data=len(x), kl_weight=kl_weights[0])
    state = trainer.init(jax.random.fold_in(key, 1))
    state = ivi.fit(
        trainer, state, x, y, key=jax.random.fold_in(key, 2), epochs=epochs, batch_size=BATCH
    )
    return state.vi_params, kl_weights[0], ()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=60, help="epochs of every training")
    beta = parser.add_mutually_exclusive_group()
    beta.add_argument(
        "--kl-weights",
        type=kl_weight_list,
        default=ivi.KL_WEIGHTS,
        help="candidate KL weights for select_kl_weight (default: ivi.KL_WEIGHTS)",
    )
    beta.add_argument(
        "--kl-weight", type=kl_weight_list, help="one KL weight: no selection, one training"
    )
    parser.add_argument(
        "--test-samples", type=int, default=100, help="networks averaged at test time (K)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", default=os.path.join(OUTPUT, "implicit_vi_digits.png"), help="PNG path"
    )
    args = parser.parse_args(argv)
    if args.kl_weight is not None:
        if len(args.kl_weight) != 1:
            parser.error(f"--kl-weight takes one number, got {len(args.kl_weight)}")
        args.kl_weights = args.kl_weight
    if args.epochs < 1 or args.test_samples < 1:
        parser.error("--epochs and --test-samples must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the comparison; returns ``{model: metrics}`` of the test set and, under
    ``"kl_weight"`` and ``"table"``, the KL weight used and the validation table."""
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
    print(f"MLP with Adam (MAP, {args.epochs} epochs): {deterministic.seconds:.0f} s")

    bnn = ivi.ImplicitBNN.from_linen(model, params)
    print(
        f"implicit VI: {bnn.num_stochastic:,} weights from a generator of "
        f"{bnn.num_generator_params():,} parameters, latent dimension {bnn.latent_dim}"
    )
    start = time.perf_counter()
    vi_params, kl_weight, table = train_implicit_vi(
        bnn, x_train, y_train, epochs=args.epochs, kl_weights=args.kl_weights, seed=args.seed
    )
    how = f"{len(table)} trainings, beta chosen on validation" if table else "one training"
    print(
        f"implicit VI ({args.epochs} epochs, {how}): {time.perf_counter() - start:.0f} s, "
        f"KL weight {kl_weight:g}"
    )
    bnn_probs = np.asarray(
        bnn.predict_proba(vi_params, jax.random.key(1), x_test, num_samples=args.test_samples)
    )

    rows = {
        "MLP, Adam (MAP)": classification_metrics(det_probs, y_test),
        f"implicit VI, BMA K={args.test_samples}": classification_metrics(bnn_probs, y_test),
    }
    print(f"\ntest set ({len(y_test)} images); implicit VI with KL weight {kl_weight:g}")
    print(f"  {'model':<32}{'accuracy':>10}{'NLL':>8}{'Brier':>8}{'ECE-15':>8}")
    for name, m in rows.items():
        print(
            f"  {name:<32}{m['accuracy']:>10.4f}{m['nll']:>8.4f}{m['brier']:>8.4f}{m['ece']:>8.4f}"
        )

    fig, axes = pyplot().subplots(1, 2, figsize=(9, 4))
    plot_reliability(axes[0], det_probs, y_test, "MLP, Adam (MAP)")
    plot_reliability(axes[1], bnn_probs, y_test, f"implicit VI (KL weight {kl_weight:g})")
    axes[0].set_title("MLP, Adam (MAP)")
    axes[1].set_title(f"implicit VI (KL weight {kl_weight:g})")
    print(f"saved {os.path.relpath(save_figure(fig, args.output))}")
    return {**rows, "kl_weight": kl_weight, "table": table}


if __name__ == "__main__":
    main()
