"""Evaluate a run of train.py: accuracy, NLL, Brier score, ECE and out-of-distribution AUROC.

    python test.py --resultsfolder results/cifar10_resnet18/sgd/run_0/
    python test.py --resultsfolder results/cifar10_resnet18/ivon/run_0/ --testmc 64
    python test.py --resultsfolder results/cifar10_resnet18/ivon/run_0/ --ood svhn

For IVON it evaluates the network at the posterior mean ("mean") and the Bayesian model
average of ``--testmc`` posterior samples ("bma64"); for SGD and AdamW the network
("network"). All use the BatchNorm running statistics. ECE uses 15 equal-width confidence
bins; with ``--ood`` it adds the AUROC of telling the in-distribution test images from the
other set by max probability and by predictive entropy. Writes ``test_results.json``,
``reliability.png`` and ``entropy.png`` into the run folder and prints a table. Bad input
exits with code 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import cifar_training as ct
import jax
import numpy as np
from bdl_examples import metrics
from bdl_examples.checkpoints import CheckpointError, load_checkpoint, write_json
from bdl_examples.data import (
    CIFAR_DATASETS,
    OOD_DATASETS,
    DataError,
    load_cifar_ood_images,
    load_cifar_split,
)
from bdl_examples.models import make_cifar_model
from bdl_examples.plots import plot_reliability, pyplot, save_figure
from train import ARGS, UsageError, initialize_distributed

RESULTS = "test_results.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--resultsfolder", required=True, help="a run folder written by train.py")
    add("--testmc", type=int, default=64, help="IVON posterior samples of the model average")
    add("--testbatchsize", type=int, default=None, help="default: the run's")
    add("--datasetfolder", default=None, help="default: the run's")
    add(
        "--ood",
        default=None,
        choices=OOD_DATASETS,
        help="out-of-distribution test set (svhn: <datasetfolder>/svhn/test_32x32.mat)",
    )
    add(
        "--randomseed",
        type=int,
        default=None,
        help="seed of the posterior samples (default: the run's; with --testmc equal to the "
        "run's --test-samples, the networks of its per-epoch evaluation)",
    )
    add("--distributed", action="store_true", help="call jax.distributed.initialize()")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return evaluate(args)
    except (UsageError, DataError, CheckpointError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


def read_run(folder: str) -> tuple[dict, dict]:
    """The saved arguments and environment of a run folder."""
    args_path, checkpoint = os.path.join(folder, ARGS), os.path.join(folder, ct.CHECKPOINT)
    if not os.path.isfile(args_path) or not os.path.isfile(checkpoint):
        raise UsageError(
            f"argument --resultsfolder: {folder!r} holds no {ARGS} and {ct.CHECKPOINT}; pass "
            "the folder of a run of train.py that finished at least one epoch "
            "(results/<dataset>_<model>/<optim>/run_<k>/)"
        )
    with open(args_path) as f:
        saved = json.load(f)
    return saved["args"], saved["environment"]


def evaluate(args) -> int:
    if args.testmc < 1:
        raise UsageError(f"argument --testmc: must be >= 1; got {args.testmc}")
    if args.testbatchsize is not None and args.testbatchsize < 1:
        raise UsageError(f"argument --testbatchsize: must be >= 1; got {args.testbatchsize}")
    run, environment = read_run(args.resultsfolder)
    batch_size = args.testbatchsize or run["testbatchsize"]
    data_folder = args.datasetfolder or run["datasetfolder"]
    dataset = run["dataset"]
    if args.ood == dataset:
        raise UsageError(f"argument --ood: {args.ood} is the run's own dataset")
    if args.distributed:
        initialize_distributed()
    if batch_size % jax.device_count():
        raise UsageError(
            f"argument --testbatchsize: {batch_size} is not divisible by the "
            f"{jax.device_count()} devices"
        )
    test_set = load_cifar_split(data_folder, dataset=dataset, split="test")
    ood_images = load_cifar_ood_images(data_folder, name=args.ood) if args.ood else None

    model = make_cifar_model(run["model"], num_classes=CIFAR_DATASETS[dataset].num_classes)
    optimizer = ct.make_optimizer(  # for the state's structure; its values come from the file
        run["optim"],
        ct.learning_rate_schedule(1.0, 0, 1),
        num_train=environment["num_train"],
        priorprec=run["priorprec"],
        beta1=run["beta1"],
        beta2=run["beta2"],
        hess_init=run["hess_init"],
        dafactor=run["dafactor"],
        mcsamples=run["mcsamples"],
    )
    mesh = ct.make_mesh()
    shapes = jax.eval_shape(
        lambda key: ct.init_state(model, optimizer, key, mesh), jax.random.key(0)
    )
    host_state, meta = load_checkpoint(
        os.path.join(args.resultsfolder, ct.CHECKPOINT), template=shapes
    )
    state = ct.replicate(host_state, mesh)
    is_ivon = run["optim"] == "ivon"
    methods = {"mean": 0, f"bma{args.testmc}": args.testmc} if is_ivon else {"network": 0}
    key = ct.evaluation_key(run["randomseed"] if args.randomseed is None else args.randomseed)

    image_sets = {"test": test_set.images}
    if ood_images is not None:
        image_sets[args.ood] = ood_images
    device_sets = {
        name: ct.replicate(ct.pad_to_multiple(images, batch_size), mesh)
        for name, images in image_sets.items()
    }
    probs = {}  # probs[method][set]
    for method, samples in methods.items():
        predict = ct.make_predict(
            model, dataset=dataset, batch_size=batch_size, mesh=mesh, bma_samples=samples
        )
        probs[method] = {
            name: ct.predict_dataset(
                predict, state, device_sets[name], len(image_sets[name]), batch_size, key
            )
            for name in image_sets
        }

    results = {
        "run": os.path.abspath(args.resultsfolder),
        "dataset": dataset,
        "model": run["model"],
        "optim": run["optim"],
        "epoch": meta["epoch"],
        "epochs": run["epochs"],
        "testmc": args.testmc if is_ivon else None,
        "num_test": len(test_set.labels),
        "ood": args.ood,
        "ece_bins": metrics.DEFAULT_BINS,
        "methods": {},
    }
    for method, by_set in probs.items():
        entry = metrics.classification_metrics(by_set["test"], test_set.labels)
        entry["mean_entropy"] = float(np.mean(metrics.predictive_entropy(by_set["test"])))
        if args.ood:
            entry["ood"] = metrics.ood_metrics(by_set["test"], by_set[args.ood])
            entry["ood"]["mean_entropy"] = float(
                np.mean(metrics.predictive_entropy(by_set[args.ood]))
            )
        results["methods"][method] = entry

    if jax.process_index() == 0:
        write_json(os.path.join(args.resultsfolder, RESULTS), results)
        plot(probs, test_set.labels, folder=args.resultsfolder, results=results)
        print_table(results)
    return 0


def print_table(results: dict) -> None:
    ood = results["ood"]
    print(
        f"{results['dataset']} test set ({results['num_test']} images), {results['model']} "
        f"trained with {results['optim']} for {results['epoch']}/{results['epochs']} epochs"
    )
    header = f"{'method':<10} {'accuracy':>9} {'NLL':>8} {'Brier':>8} {'ECE':>8}"
    if ood:
        header += f" {'AUROC maxp':>11} {'AUROC ent':>10}"
    print(header)
    for method, m in results["methods"].items():
        row = (
            f"{method:<10} {m['accuracy']:>9.4f} {m['nll']:>8.4f} {m['brier']:>8.4f} "
            f"{m['ece']:>8.4f}"
        )
        if ood:
            row += f" {m['ood']['auroc_max_prob']:>11.4f} {m['ood']['auroc_entropy']:>10.4f}"
        print(row)
    if ood:
        print(f"(AUROC: {results['dataset']} test images against {ood} as out-of-distribution)")
    print(f"wrote {os.path.join(results['run'], RESULTS)}, reliability.png, entropy.png")


def plot(probs, labels, *, folder: str, results: dict) -> None:
    """reliability.png (one curve per method) and entropy.png (histograms per method)."""
    plt = pyplot()
    title = f"{results['dataset']} {results['model']} {results['optim']}"
    fig, ax = plt.subplots(figsize=(5, 5))
    for method, by_set in probs.items():
        plot_reliability(ax, by_set["test"], labels, label=method)
    ax.set_title(f"Reliability, {title}")
    save_figure(fig, os.path.join(folder, "reliability.png"))

    num_classes = next(iter(probs.values()))["test"].shape[1]
    bins = np.linspace(0, np.log(num_classes), 31)
    fig, axes = plt.subplots(1, len(probs), figsize=(5 * len(probs), 3.8), squeeze=False)
    for ax, (method, by_set) in zip(axes[0], probs.items()):
        for name, p in by_set.items():
            entropy = metrics.predictive_entropy(p)
            ax.hist(
                entropy,
                bins=bins,
                density=True,
                alpha=0.55,
                label=f"{name} (mean {entropy.mean():.2f})",
            )
        ax.set(xlabel="predictive entropy (nats)", ylabel="density", title=f"{method}: {title}")
        ax.legend(fontsize="small")
    save_figure(fig, os.path.join(folder, "entropy.png"))


if __name__ == "__main__":
    sys.exit(main())
