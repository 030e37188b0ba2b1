"""Train a ResNet-18 (or a small CNN) on CIFAR-10/100 with SGD, AdamW or IVON.

The seed's two commands, run from this folder with the data in ``datasets/``::

    python train.py --alpha 0.03 --beta1 0.9 --priorprec 25 --optim sgd --dataset cifar10
    python train.py --alpha 0.5 --beta1 0.9 --beta2 0.99999 --priorprec 25 --optim ivon \\
        --hess-init 0.5 --dataset cifar10

A run writes ``{resultsfolder}/{dataset}_{model}/{optim}/run_{k}/`` (k: the first free index):
``args.json`` (the arguments and the machine), ``log.jsonl`` (one JSON line per epoch: train
loss and accuracy, learning rate, images/s, test metrics, IVON's posterior std quantiles),
``checkpoint.npz`` (written atomically after every epoch) and, at the end, ``results.json``.
``--resume RUN_FOLDER`` continues an interrupted run with its saved arguments, with bitwise
the parameters of an uninterrupted run on CPU. Every local device is used, data-parallel;
``--distributed`` spans several processes (see README.md). Bad input exits with code 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import cifar_training as ct
import jax
import numpy as np
from bdl_examples import metrics
from bdl_examples.checkpoints import (
    CheckpointError,
    load_checkpoint,
    new_run_folder,
    save_checkpoint,
    write_json,
)
from bdl_examples.cli import merge_saved_arguments
from bdl_examples.data import CIFAR_DATASETS, DataError, load_cifar_split
from bdl_examples.models import CIFAR_MODELS, make_cifar_model
from bdl_examples.progress import ProgressBar

LOG = "log.jsonl"
ARGS = "args.json"
RESULTS = "results.json"
# Flags that may differ when resuming: where the data are, how the job is launched.
RESUME_MAY_CHANGE = ("resume", "datasetfolder", "distributed", "stop_after", "resultsfolder")


class UsageError(Exception):
    """Bad input: printed as ``error: ...`` with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--randomseed", type=int, default=0, help="seed of initialisation, shuffling, noise")
    add(
        "--alpha",
        type=float,
        default=None,
        help="peak learning rate (default: sgd 0.03, adamw 0.001, ivon 0.5)",
    )
    add("--optim", default="ivon", choices=ct.OPTIMIZERS, help="optimizer")
    add("--beta1", type=float, default=0.9, help="SGD momentum / Adam and IVON beta1")
    add(
        "--beta2",
        type=float,
        default=None,
        help="IVON's Hessian decay (default 0.99999) / Adam's beta2 (default 0.999)",
    )
    add(
        "--priorprec",
        type=float,
        default=25.0,
        help="prior precision; weight decay = priorprec / N for every optimizer",
    )
    add("--dafactor", type=float, default=1.0, help="IVON: ess = N x dafactor")
    add("--hess-init", type=float, default=0.5, help="IVON: initial Hessian h0")
    add("--batchsize", type=int, default=200, help="global batch (all devices)")
    add("--testbatchsize", type=int, default=200, help="batch for test predictions")
    add("--epochs", type=int, default=180)
    add("--warmup", type=int, default=5, help="epochs of linear warm-up before cosine decay")
    add("--dataset", default="cifar10", choices=sorted(CIFAR_DATASETS))
    add("--noaugment", action="store_true", help="no random crop (pad 4) and flip")
    add(
        "--model",
        default="resnet18",
        choices=sorted(CIFAR_MODELS),
        help="resnet18: CIFAR ResNet-18 (3x3 stem, no max-pool); cnn: small, for CPUs",
    )
    add("--datasetfolder", default="datasets", help="holds cifar-10-batches-py/ etc.")
    add("--resultsfolder", default="results")
    add(
        "--test-samples",
        type=int,
        default=16,
        help="IVON posterior samples of the per-epoch test evaluation (0: mean only)",
    )
    add("--mcsamples", type=int, default=1, help="IVON posterior samples per training step")
    add(
        "--resume",
        metavar="RUN_FOLDER",
        default=None,
        help="continue the run in RUN_FOLDER from its last checkpoint, with its arguments",
    )
    add(
        "--stop-after",
        type=int,
        default=None,
        metavar="EPOCHS",
        help="stop after this many epochs of this invocation (e.g. a job's time limit); "
        "continue with --resume",
    )
    add(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() (several processes; see README.md)",
    )
    return parser


def check_ranges(args) -> None:
    """Raise UsageError naming the first argument outside its accepted range."""
    checks = [
        ("--alpha", args.alpha, "> 0", args.alpha is None or args.alpha > 0),
        ("--beta1", args.beta1, "in [0, 1)", 0 <= args.beta1 < 1),
        ("--beta2", args.beta2, "in [0, 1)", args.beta2 is None or 0 <= args.beta2 < 1),
        ("--priorprec", args.priorprec, ">= 0", args.priorprec >= 0),
        ("--dafactor", args.dafactor, "> 0", args.dafactor > 0),
        ("--hess-init", args.hess_init, "> 0", args.hess_init > 0),
        ("--batchsize", args.batchsize, ">= 1", args.batchsize >= 1),
        ("--testbatchsize", args.testbatchsize, ">= 1", args.testbatchsize >= 1),
        ("--epochs", args.epochs, ">= 1", args.epochs >= 1),
        (
            "--warmup",
            args.warmup,
            f"in [0, --epochs={args.epochs})",
            0 <= args.warmup < args.epochs,
        ),
        ("--test-samples", args.test_samples, ">= 0", args.test_samples >= 0),
        ("--mcsamples", args.mcsamples, ">= 1", args.mcsamples >= 1),
        ("--stop-after", args.stop_after, ">= 1", args.stop_after is None or args.stop_after >= 1),
    ]
    for name, value, accepted, ok in checks:
        if not ok:
            raise UsageError(f"argument {name}: must be {accepted}; got {value}")
    if args.mcsamples > 1 and args.optim != "ivon":
        raise UsageError("argument --mcsamples: more than 1 sample needs --optim ivon")


def resume_arguments(parser, args, argv):
    """The saved arguments of ``args.resume``, with the flags that may change taken from
    the command line; a different value of any other flag is an error."""
    saved_path = os.path.join(args.resume, ARGS)
    checkpoint = os.path.join(args.resume, ct.CHECKPOINT)
    if not os.path.isfile(saved_path) or not os.path.isfile(checkpoint):
        raise UsageError(
            f"argument --resume: {args.resume!r} holds no {ARGS} and {ct.CHECKPOINT}; "
            "pass the folder of a run started by train.py (results/<dataset>_<model>/<optim>/"
            "run_<k>/)"
        )
    with open(saved_path) as f:
        saved = json.load(f)["args"]
    merged = merge_saved_arguments(parser, args, argv, saved, RESUME_MAY_CHANGE, error=UsageError)
    merged.resume = args.resume
    return merged


def initialize_distributed() -> None:
    """``jax.distributed.initialize()``: on clusters JAX finds the processes itself (SLURM,
    Open MPI, TPU pods, ...); elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process 0),
    JAX_NUM_PROCESSES and JAX_PROCESS_ID for every process."""

    def env_int(name):
        return int(os.environ[name]) if name in os.environ else None

    jax.distributed.initialize(
        num_processes=env_int("JAX_NUM_PROCESSES"), process_id=env_int("JAX_PROCESS_ID")
    )


def read_log(folder: str, up_to_epoch: int) -> list[dict]:
    """The log's entries for epochs 1..up_to_epoch (a crash may have left a later line)."""
    path = os.path.join(folder, LOG)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        entries = [json.loads(line) for line in f if line.strip()]
    return [e for e in entries if e["epoch"] <= up_to_epoch]


def format_metrics(m: dict) -> str:
    return f"acc {m['accuracy']:.4f}  nll {m['nll']:.4f}  ece {m['ece']:.4f}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)  # unknown optimizer/dataset/model: exit code 2
    try:
        if args.resume is not None:
            args = resume_arguments(parser, args, argv)
        check_ranges(args)
        return train(args, argv)
    except (UsageError, DataError, CheckpointError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


def train(args, argv) -> int:
    if args.distributed:
        initialize_distributed()
    devices = jax.device_count()
    for name in ("batchsize", "testbatchsize"):
        if getattr(args, name) % devices:
            raise UsageError(
                f"argument --{name}: {getattr(args, name)} is not divisible by the "
                f"{devices} devices (every device gets an equal share of the batch)"
            )
    train_set = load_cifar_split(args.datasetfolder, dataset=args.dataset, split="train")
    test_set = load_cifar_split(args.datasetfolder, dataset=args.dataset, split="test")
    num_train = len(train_set.labels)
    if args.batchsize > num_train:
        raise UsageError(
            f"argument --batchsize: {args.batchsize} is larger than the {num_train} training images"
        )
    alpha = args.alpha if args.alpha is not None else ct.DEFAULT_ALPHA[args.optim]
    steps_per_epoch = num_train // args.batchsize  # the remainder is dropped every epoch
    total_steps = args.epochs * steps_per_epoch
    schedule = ct.learning_rate_schedule(alpha, args.warmup * steps_per_epoch, total_steps)
    optimizer = ct.make_optimizer(
        args.optim,
        schedule,
        num_train=num_train,
        priorprec=args.priorprec,
        beta1=args.beta1,
        beta2=args.beta2,
        hess_init=args.hess_init,
        dafactor=args.dafactor,
        mcsamples=args.mcsamples,
    )
    model = make_cifar_model(args.model, num_classes=CIFAR_DATASETS[args.dataset].num_classes)
    mesh = ct.make_mesh()
    base_key = jax.random.key(args.randomseed)
    init_key, shuffle_key, step_key = (jax.random.fold_in(base_key, i) for i in range(3))
    eval_key = ct.evaluation_key(args.randomseed)
    state = ct.init_state(model, optimizer, init_key, mesh)
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)

    start_epoch, log = 0, []
    if args.resume is not None:
        folder = args.resume
        host_state, meta = load_checkpoint(os.path.join(folder, ct.CHECKPOINT), template=state)
        state = ct.replicate(host_state, mesh)
        start_epoch = meta["epoch"]
        log = read_log(folder, start_epoch)
        say(f"resuming {folder} after epoch {start_epoch}/{args.epochs}")
        if start_epoch >= args.epochs:
            say("the run is already complete")
            return 0
    train_images, train_labels = ct.replicate((train_set.images, train_set.labels), mesh)
    padded = ct.pad_to_multiple(test_set.images, args.testbatchsize)
    test_images = ct.replicate(padded, mesh)
    train_step = ct.make_train_step(
        model,
        optimizer,
        optim=args.optim,
        dataset=args.dataset,
        batch_size=args.batchsize,
        steps_per_epoch=steps_per_epoch,
        mcsamples=args.mcsamples,
        augment=not args.noaugment,
        key=step_key,
        mesh=mesh,
    )
    epoch_order = ct.make_epoch_order(num_train, shuffle_key, mesh)
    evaluations = {"mean" if args.optim == "ivon" else "network": 0}
    if args.optim == "ivon" and args.test_samples:
        evaluations[f"bma{args.test_samples}"] = args.test_samples
    predictors = {
        name: ct.make_predict(
            model, dataset=args.dataset, batch_size=args.testbatchsize, mesh=mesh, bma_samples=k
        )
        for name, k in evaluations.items()
    }

    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    say(
        f"{args.model} ({num_params / 1e6:.2f}M parameters) on {args.dataset}: {num_train} "
        f"training / {len(test_set.labels)} test images; {args.optim}, peak lr {alpha}, "
        f"weight decay {args.priorprec / num_train:.3g}, batch {args.batchsize} on {devices} "
        f"{jax.default_backend()} device(s) in {jax.process_count()} process(es)"
    )
    compile_start = time.perf_counter()
    order = epoch_order(start_epoch)
    train_step = train_step.lower(
        state, train_images, train_labels, order, start_epoch * steps_per_epoch
    ).compile()
    say(f"compiled the training step in {time.perf_counter() - compile_start:.1f} s")

    if args.resume is None:  # only now: a failure above leaves no empty run folder
        folder = new_run_folder(
            os.path.join(args.resultsfolder, f"{args.dataset}_{args.model}", args.optim)
        )
    if is_main:
        record = {k: v for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE}
        record.update(datasetfolder=args.datasetfolder)
        environment = {
            "command": [sys.argv[0], *argv],
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "alpha_used": alpha,
            "num_train": num_train,
            "num_test": len(test_set.labels),
            "steps_per_epoch": steps_per_epoch,
            "devices": devices,
            "processes": jax.process_count(),
            "platform": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "python": platform.python_version(),
        }
        if args.resume is None:
            write_json(os.path.join(folder, ARGS), {"args": record, "environment": environment})
        with open(os.path.join(folder, LOG), "w") as f:  # drop lines after the checkpoint
            f.writelines(json.dumps(entry) + "\n" for entry in log)
    say(f"results: {folder}")

    run_start = time.perf_counter()
    for epochs_this_run, epoch in enumerate(range(start_epoch, args.epochs), start=1):
        order = epoch_order(epoch)
        bar = ProgressBar(steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}")
        epoch_start = time.perf_counter()
        stats = []
        for i in range(steps_per_epoch):
            state, step_stats = train_step(
                state, train_images, train_labels, order, epoch * steps_per_epoch + i
            )
            stats.append(step_stats)
            if is_main:

                def describe(done=i + 1, last=step_stats, since=epoch_start):
                    loss = float(ct.to_host(last["loss"]))
                    rate = done * args.batchsize / (time.perf_counter() - since)
                    return f"loss {loss:.4f}  {rate:,.0f} img/s"

                bar.update(i + 1, describe)
        stats = ct.to_host(stats)
        seconds = time.perf_counter() - epoch_start
        bar.close()

        entry = {
            "epoch": epoch + 1,
            "step": (epoch + 1) * steps_per_epoch,
            "learning_rate": float(schedule((epoch + 1) * steps_per_epoch - 1)),
            "train_loss": float(np.mean([s["loss"] for s in stats])),
            "train_accuracy": float(np.mean([s["accuracy"] for s in stats])),
            "images_per_second": steps_per_epoch * args.batchsize / seconds,
            "epoch_seconds": seconds,
            "test": {},
        }
        for name, predict in predictors.items():
            probs = ct.predict_dataset(
                predict, state, test_images, len(test_set.labels), args.testbatchsize, eval_key
            )
            entry["test"][name] = metrics.classification_metrics(probs, test_set.labels)
        if args.optim == "ivon":
            entry.update(ct.posterior_std_quantiles(state.opt_state))
        log.append(entry)
        tests = "; ".join(f"{n}: {format_metrics(m)}" for n, m in entry["test"].items())
        say(
            f"epoch {epoch + 1}/{args.epochs}  loss {entry['train_loss']:.4f}  "
            f"train acc {entry['train_accuracy']:.4f}  lr {entry['learning_rate']:.4g}  "
            f"{entry['images_per_second']:,.0f} img/s  | test {tests}"
            + (f"  | sigma median {entry['sigma_q50']:.3g}" if "sigma_q50" in entry else "")
        )
        host_state = ct.to_host(state)
        if is_main:
            with open(os.path.join(folder, LOG), "a") as f:
                f.write(json.dumps(entry) + "\n")
            save_checkpoint(
                os.path.join(folder, ct.CHECKPOINT),
                state=host_state,
                meta={"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch},
            )
        stop = args.stop_after is not None and epochs_this_run >= args.stop_after
        if stop and epoch + 1 < args.epochs:
            say(
                f"stopped after {epochs_this_run} epoch(s) (--stop-after); continue with "
                f"python train.py --resume {folder}"
            )
            return 0

    final = log[-1]
    if is_main:
        results = {
            "epochs": args.epochs,
            "test": final["test"],
            "train_loss": final["train_loss"],
            "train_accuracy": final["train_accuracy"],
            "mean_images_per_second": float(np.mean([e["images_per_second"] for e in log])),
            "train_hours": sum(e["epoch_seconds"] for e in log) / 3600,
        }
        results.update({k: v for k, v in final.items() if k.startswith("sigma_")})
        write_json(os.path.join(folder, RESULTS), results)
    say(f"\nfinished {args.epochs} epochs ({(time.perf_counter() - run_start) / 60:.1f} min)")
    for name, m in final["test"].items():
        say(
            f"  test {name:<8} accuracy {m['accuracy']:.4f}  NLL {m['nll']:.4f}  "
            f"Brier {m['brier']:.4f}  ECE {m['ece']:.4f}"
        )
    say(f"  results in {folder}; evaluate with: python test.py --resultsfolder {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
