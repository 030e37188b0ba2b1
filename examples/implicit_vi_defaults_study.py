"""What makes the implicit posterior spread where the data do not constrain it: a measured sweep.

Every variant trains the same MLP on scikit-learn's digits with ``implicit_vi.py`` through
``bdl_examples.methods``, the trainers of ``uncertainty_eval.py`` (same split, epochs, batch
size and optimiser as its MAP and IVON baselines, which are trained alongside), and reports, as
mean ± std over the seeds:

  - held-out test accuracy, NLL and ECE (task 1: the digits' own test split),
  - the same under rotation, averaged over 15, 30, 45 and 60 degrees (task 2: shifted digits),
  - OOD AUROC by predictive entropy for a network of the digits 0-4 against digits 5-9
    (``--ood``, off by default: it doubles the cost),
  - the training ELBO and expected log-likelihood (last epoch's mean) per data point,
  - the posterior's spread: per Dense kernel, the mean over its weights of their std across
    32 posterior draws divided by the kernel's initial std, averaged over the kernels.

The variants (``--variants``, comma-separated names; ``--list`` shows them) change one thing at a
time from the library's defaults: the output noise sigma (absolute, or relative to each
layer's initial weight std), the prior std, the ELBO's weights (the paper's down-weighting
against the per-data-point ELBO), the latent size, the generator's output scale and the
samples per step. The group ``calibrated`` is the calibrated posterior of ``uncertainty_eval.py``
(``methods.CALIBRATED``: learned noise, per-layer prior, tempered ELBO) at fixed KL weights
beta, and with the N(0, 1) prior or the noise's plain learning rate instead; ``--task teacher``
or ``spiral`` trains on that generated task instead of the digits (no rotations), and
``--validation-fraction 0.15`` holds out the split the suite holds out. Results go to
``examples/output/implicit_vi_defaults_study.json``; the tables in docs/implicit_vi.md
("Choosing the posterior's spread", "Calibrated posteriors") come from this script.

  python examples/implicit_vi_defaults_study.py --variants sigma,defaults --seeds 3
  python examples/implicit_vi_defaults_study.py --variants calibrated --task spiral \\
      --validation-fraction 0.15 --epochs 60 --test-samples 64 --seeds 1
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from bdl_examples.checkpoints import write_json
from bdl_examples.data import (
    hold_out,
    load_digits_split,
    rotate_images,
    spiral_task,
    teacher_task,
)
from bdl_examples.methods import CALIBRATED, mean_std, train_method
from bdl_examples.metrics import classification_metrics, ood_metrics

OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
ANGLES = (15, 30, 45, 60)
TASKS = {"digits": load_digits_split, "teacher": teacher_task, "spiral": spiral_task}


def _paper_weights(batch_size):
    return {"prior_weight": 8.5e-4 / batch_size, "entropy_weight": 1.0 / batch_size}


# name -> (method, options for the trainer). Options may hold a callable of the batch size.
VARIANTS = {
    "map": ("map", {}),
    "ivon": ("ivon", {}),
    "defaults": ("ivi", {}),
    "sigma=1e-3": ("ivi", {"model_kwargs": {"sigma": 1e-3}}),
    "sigma=1e-2": ("ivi", {"model_kwargs": {"sigma": 1e-2}}),
    "sigma=3e-2": ("ivi", {"model_kwargs": {"sigma": 3e-2}}),
    "sigma=1e-1": ("ivi", {"model_kwargs": {"sigma": 1e-1}}),
    "paper-weights": ("ivi", {"loss_kwargs": _paper_weights}),
    "paper-weights+sigma=1e-3": (
        "ivi",
        {"loss_kwargs": _paper_weights, "model_kwargs": {"sigma": 1e-3}},
    ),
    "prior=0.1": ("ivi", {"model_kwargs": {"prior_std": 0.1}}),
    "prior=0.1+sigma=1e-3": ("ivi", {"model_kwargs": {"prior_std": 0.1, "sigma": 1e-3}}),
    "noise=4x4": ("ivi", {"model_kwargs": {"noise_shape": (4, 4)}}),
    "noise=8x8": ("ivi", {"model_kwargs": {"noise_shape": (8, 8)}}),
    "lr=1e-3": ("ivi", {"lr": 1e-3}),
    "S=1": ("ivi", {"samples": 1}),
    "S=10": ("ivi", {"samples": 10}),
    "ll-defaults": ("ll-ivi", {}),
    "ll-sigma=1e-3": ("ll-ivi", {"model_kwargs": {"sigma": 1e-3}}),
    # The calibrated posterior (CALIBRATED) at fixed KL weights, and one change at a time.
    **{
        f"cal:beta={beta:g}": ("ivi", {**CALIBRATED, "kl_weight": beta})
        for beta in (1.0, 0.3, 0.1, 0.03, 0.01, 0.003)
    },
    "cal:beta=0.1,prior=1": (
        "ivi",
        {**CALIBRATED, "model_kwargs": {"learn_sigma": True, "sigma": "auto"}, "kl_weight": 0.1},
    ),
    "cal:beta=0.1,noise-lr=1": ("ivi", {**CALIBRATED, "noise_lr_scale": 1.0, "kl_weight": 0.1}),
}
GROUPS = {
    "sigma": ["sigma=1e-3", "sigma=1e-2", "sigma=3e-2", "sigma=1e-1"],
    "baselines": ["map", "ivon"],
    "calibrated": [n for n in VARIANTS if n.startswith("cal:")],
}


def relative_spread(info) -> float:
    """Mean over the Dense kernels of (std across 32 posterior draws) / (initial weight std)."""
    bnn, vi_params = info["bnn"], info["vi_params"]
    samples = bnn.sample_params(vi_params, jax.random.key(5), 32)
    flat_samples = jax.tree_util.tree_leaves_with_path(samples)
    templates = jax.tree_util.tree_leaves(info["params"])
    ratios = [
        float(jnp.std(s, axis=0).mean() / jnp.std(t))
        for (path, s), t in zip(flat_samples, templates)
        if "kernel" in jax.tree_util.keystr(path)
    ]
    return float(np.mean(ratios))


def run_variant(name, data, data5, args, seed):
    method, options = VARIANTS[name]
    options = {k: (v(args.batch_size) if callable(v) else v) for k, v in options.items()}
    options = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "test_samples": args.test_samples,
        "samples": args.samples,
        **options,
    }
    predict, info = train_method(method, data, hidden=args.hidden, seed=seed, **options)
    key = jax.random.key(1000 + seed)
    x_test, y_test = data["test"]
    row = {"test": classification_metrics(predict(key, x_test), y_test)}
    if args.task == "digits":
        shifted = [
            classification_metrics(
                predict(jax.random.fold_in(key, a), rotate_images(x_test, a)), y_test
            )
            for a in ANGLES
        ]
        row["rotated"] = {k: float(np.mean([s[k] for s in shifted])) for k in shifted[0]}
    last = info["history"][-1]
    row["train"] = {k: last[k] for k in ("elbo", "expected_log_likelihood") if k in last}
    if "bnn" in info:
        row["train"]["relative_spread"] = relative_spread(info)
    if args.ood:
        predict5, _ = train_method(method, data5, hidden=args.hidden, seed=seed, **options)
        row["ood_auroc_entropy"] = ood_metrics(
            predict5(key, data5["test"][0]), predict5(key, data5["ood"])
        )["auroc_entropy"]
    row["train_seconds"] = info["train_seconds"]
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default="baselines,defaults")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", default="128,128")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--test-samples", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=None, help="subsample the training set")
    parser.add_argument("--ood", action="store_true", help="also the digits 0-4 / 5-9 AUROC")
    parser.add_argument("--task", choices=tuple(TASKS), default="digits")
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.0,
        help="hold out this share of the training set, as uncertainty_eval.py does (0.15)",
    )
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    parser.add_argument("--output", default=os.path.join(OUTPUT, "implicit_vi_defaults_study.json"))
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(list(VARIANTS) + [f"{g}: {', '.join(v)}" for g, v in GROUPS.items()]))
        return None
    args.hidden = [int(h) for h in args.hidden.split(",")]
    names = []
    for item in args.variants.split(","):
        names += GROUPS.get(item, [item])
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; --list shows them")

    results = {n: [] for n in names}
    start = time.perf_counter()
    for seed in range(args.seeds):
        data = TASKS[args.task](seed)
        if args.validation_fraction:
            data = hold_out(data, args.validation_fraction, seed)
        if args.train_size:
            x, y = data["train"]
            data["train"] = (x[: args.train_size], y[: args.train_size])
        data5 = load_digits_split(seed, classes=range(5)) if args.ood else None
        for name in names:
            print(f"seed {seed} {name}", flush=True)
            results[name].append(run_variant(name, data, data5, args, seed))
    summary = {n: mean_std(r) for n, r in results.items()}
    print(
        f"\n{args.task}: {args.seeds} seeds, {args.epochs} epochs, hidden {args.hidden}, "
        f"train size {args.train_size or 'all'}; mean (std)"
    )
    header = (
        f"{'variant':<26}{'acc':>14}{'NLL':>15}{'ECE':>15}{'rot acc':>9}{'rot NLL':>9}"
        f"{'rot ECE':>9}{'ELBO':>10}{'E[loglik]':>10}{'spread':>8}"
    )
    if args.ood:
        header += f"{'AUROC':>8}"
    print(header)
    for name, s in summary.items():
        t, r, tr = s["test"], s.get("rotated"), s["train"]
        line = f"{name:<26}" + "".join(
            f"{t[k]['mean']:.4f} ({t[k]['std']:.4f})".rjust(w)
            for k, w in (("accuracy", 14), ("nll", 15), ("ece", 15))
        )
        line += "".join(
            f"{r[k]['mean']:>9.4f}" if r else f"{'':>9}" for k in ("accuracy", "nll", "ece")
        )
        for k in ("elbo", "expected_log_likelihood"):
            line += f"{tr[k]['mean']:>10.3f}" if k in tr else f"{'':>10}"
        w = tr.get("relative_spread")
        line += f"{w['mean']:>8.4f}" if w else f"{'':>8}"
        if args.ood:
            line += f"{s['ood_auroc_entropy']['mean']:>8.4f}"
        print(line)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_json(
        args.output,
        {
            "args": vars(args),
            "summary": summary,
            "per_seed": results,
            "seconds": time.perf_counter() - start,
        },
    )
    print(f"saved {args.output} ({time.perf_counter() - start:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
