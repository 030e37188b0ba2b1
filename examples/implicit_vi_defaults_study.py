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

The variants (``--variants``, comma-separated names or groups; ``--list`` shows them) change
one thing at a time from the library's defaults (``defaults``: learned weight noise from a
tenth of each layer's initial std, each layer's initial std as its prior's, calibrated
generator output, the ``SmallestSingularValue`` entropy bound, the ELBO with ``kl_weight`` 1):
the KL weight beta of the tempered ELBO (group ``kl_weight``), a fixed ``weight_noise``
(group ``weight_noise``), the N(0, 1) prior (``prior_std=1``), the raw generator output
(``calibrate_output=False``), the entropy estimator (group ``entropy``) and the last layer
alone (``ll-``). ``paper`` is the paper's fixed posterior (``methods.PAPER_POSTERIOR``, the
suite's ``ivi-paper``), ``paper-weights`` the same with the paper's down-weighted ELBO, and
``quick-start`` the suite's ``ivi`` (beta chosen on a validation split: it needs
``--validation-fraction``). ``--task teacher`` or ``spiral`` trains on that generated task
instead of the digits (no rotations), and ``--validation-fraction 0.15`` holds out the split
the suite holds out. Results go to ``examples/output/implicit_vi_defaults_study.json``.

  python examples/implicit_vi_defaults_study.py --variants baselines,defaults,weight_noise --seeds 3
  python examples/implicit_vi_defaults_study.py --variants kl_weight --task spiral \\
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
from bdl_examples.methods import (
    METHODS,
    PAPER_POSTERIOR,
    last_layer,
    mean_std,
    suite_network,
    train_implicit,
    train_method,
)
from bdl_examples.metrics import classification_metrics, ood_metrics

import implicit_vi as ivi

OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
ANGLES = (15, 30, 45, 60)
TASKS = {"digits": load_digits_split, "teacher": teacher_task, "spiral": spiral_task}


def _paper_weights(args, num_train):
    """The paper's ELBO weights for batch size B: 1 / B on the entropy, 8.5e-4 / B on the
    prior (kl_weight N / B, prior_scale 8.5e-4)."""
    return {"kl_weight": num_train / args.batch_size, "trainer_kwargs": {"prior_scale": 8.5e-4}}


def _paper_solver(args, num_train):
    """The paper's eigen-solver: 5 iterations, no tolerance, on every sample of the step."""
    entropy = ivi.SmallestSingularValue(num_iterations=5, tolerance=None, num_samples=args.samples)
    return {"trainer_kwargs": {"entropy": entropy}}


# name -> (kind, options). kind: a method of the suite (``train_method``), or "implicit" /
# "last-layer": ``train_implicit`` on every weight / on the last Dense layer, with the options
# (its keywords; a callable of (args, training-set size) for those that depend on the run).
VARIANTS = {
    "map": ("map", {}),
    "ivon": ("ivon", {}),
    "defaults": ("implicit", {}),
    "quick-start": ("ivi", {}),
    **{f"kl_weight={beta:g}": ("implicit", {"kl_weight": beta}) for beta in ivi.KL_WEIGHTS},
    **{
        f"weight_noise={text}": ("implicit", {"model_kwargs": {"weight_noise": float(text)}})
        for text in ("1e-3", "1e-2", "3e-2", "1e-1")
    },
    "prior_std=1": ("implicit", {"model_kwargs": {"prior_std": 1.0}}),
    "calibrate_output=False": ("implicit", {"model_kwargs": {"calibrate_output": False}}),
    "entropy=exact": ("implicit", {"trainer_kwargs": {"entropy": ivi.ExactEntropy()}}),
    "entropy=paper-solver": ("implicit", _paper_solver),
    "paper": ("implicit", {"model_kwargs": PAPER_POSTERIOR}),
    "paper-weights": (
        "implicit",
        lambda args, n: {"model_kwargs": PAPER_POSTERIOR, **_paper_weights(args, n)},
    ),
    "ll-defaults": ("last-layer", {}),
    "ll-weight_noise=1e-3": ("last-layer", {"model_kwargs": {"weight_noise": 1e-3}}),
}
GROUPS = {
    "baselines": ["map", "ivon"],
    "kl_weight": ["defaults"] + [n for n in VARIANTS if n.startswith("kl_weight=")],
    "weight_noise": [n for n in VARIANTS if n.startswith("weight_noise=")],
    "entropy": ["defaults", "entropy=exact", "entropy=paper-solver"],
    "paper": ["paper", "paper-weights"],
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


def train_variant(name, data, args, seed):
    """Trains variant ``name`` on ``data``: ``(predict, info)``."""
    kind, options = VARIANTS[name]
    if callable(options):
        options = options(args, len(data["train"][0]))
    common = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": seed}
    common |= {"test_samples": args.test_samples}
    if kind in METHODS:
        return train_method(kind, data, hidden=args.hidden, samples=args.samples, **common)
    model, params = suite_network(data, hidden=args.hidden, seed=seed)
    stochastic = last_layer(params) if kind == "last-layer" else None
    return train_implicit(
        model, params, data, samples=args.samples, stochastic=stochastic, **options, **common
    )


def run_variant(name, data, data5, args, seed):
    predict, info = train_variant(name, data, args, seed)
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
        predict5, _ = train_variant(name, data5, args, seed)
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
    parser.add_argument("--samples", type=int, default=ivi.TRAIN_SAMPLES, help="per step")
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
    choosing = [n for n in names if VARIANTS[n][0] in ("ivi", "ivon-val", "map-ts")]
    if choosing and not 0 < args.validation_fraction < 1:
        chosen = ", ".join(choosing)
        parser.error(f"{chosen} need a validation split: pass --validation-fraction")

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
        if data5 is not None and args.validation_fraction:
            data5 = hold_out(data5, args.validation_fraction, seed)
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
