"""Images per second of examples/resnet_cifar's training step: SGD against IVON, same run.

The step is the one ``train.py`` runs (``cifar_training.make_train_step``): batch taken from
the training set on the device, random crop and flip, forward and backward pass with
BatchNorm, optimizer update; IVON adds drawing the posterior sample. The data are random
uint8 images (no files needed). The optimizers take turns within every repeat (the order
alternating between repeats), so that drift of a shared machine hits both; reported are the
minimum and the median over repeats, and the IVON/SGD ratio (median of the per-repeat ratios,
and ratio of the minima). Also timed: the forward pass of the test-time prediction at the
parameters (images per second), which with ``--test-samples K`` runs K times per test image.

Usage:
  python bench/bench_cifar.py                              # ResNet-18, batch 200
  python bench/bench_cifar.py --repeats 3 --steps 1        # a slow CPU
  python bench/bench_cifar.py --model cnn --repeats 9 --steps 10
Writes bench/results/cifar_<platform>.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
import timing
from bdl_examples.models import CIFAR_MODELS, make_cifar_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The one path addition: the step timed here is the training program's own
# (examples/resnet_cifar/cifar_training.py, which imports its neighbour cifar_data.py); the
# programs in that folder are scripts, not an installed package.
sys.path.insert(0, os.path.join(ROOT, "examples", "resnet_cifar"))
import cifar_training as ct  # noqa: E402


def build(optim: str, model, batch: int, steps: int, mesh, optimizer=None):
    """The compiled step of ``optim``, its state and inputs, after one warm-up step.

    ``optimizer`` replaces the program's optimizer for ``optim`` (for variants of it)."""
    num_train = batch * steps
    if optimizer is None:
        optimizer = make_optimizer(optim, num_train)
    state = ct.init_state(model, optimizer, jax.random.key(0), mesh)
    rng = np.random.default_rng(0)
    images, labels = ct.replicate(
        (
            rng.integers(0, 256, (num_train, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, num_train).astype(np.int32),
        ),
        mesh,
    )
    order = ct.make_epoch_order(num_train, jax.random.key(1), mesh)(0)
    step = ct.make_train_step(
        model,
        optimizer,
        optim=optim,
        dataset="cifar10",
        batch_size=batch,
        steps_per_epoch=steps,
        mcsamples=1,
        augment=True,
        key=jax.random.key(2),
        mesh=mesh,
    )
    start = time.perf_counter()
    compiled = step.lower(state, images, labels, order, 0).compile()
    compile_seconds = time.perf_counter() - start
    state, _ = compiled(state, images, labels, order, 0)  # warm-up
    jax.block_until_ready(state)
    return {
        "step": compiled,
        "state": state,
        "inputs": (images, labels, order),
        "compile_seconds": compile_seconds,
    }


def make_optimizer(optim: str, num_train: int):
    """The training program's optimizer ``optim`` with the benchmark's settings."""
    schedule = ct.learning_rate_schedule(0.1, 1, 1000)
    return ct.make_optimizer(
        optim, schedule, num_train=num_train, priorprec=25.0, beta1=0.9, hess_init=0.5
    )


def run_steps(case: dict, steps: int):
    """Runs ``steps`` training steps; returns the new state (the caller waits for it)."""
    state = case["state"]
    for t in range(steps):
        state, stats = case["step"](state, *case["inputs"], t)
    case["state"] = state
    return state, stats


def time_prediction(model, batch: int, repeats: int, mesh) -> list[float]:
    """Seconds per forward pass of the test-time prediction (BatchNorm running statistics)."""
    optimizer = ct.make_optimizer("sgd", lambda t: 0.1, num_train=batch, priorprec=25.0, beta1=0.9)
    state = ct.init_state(model, optimizer, jax.random.key(0), mesh)
    images = ct.replicate(np.zeros((batch, 32, 32, 3), np.uint8), mesh)
    predict = ct.make_predict(model, dataset="cifar10", batch_size=batch, mesh=mesh)
    return timing.median_time(predict, state, images, 0, None, repeats=repeats, warmup=1)[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", choices=sorted(CIFAR_MODELS))
    parser.add_argument("--batchsize", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1, help="training steps per repeat")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.batchsize < 1:
        parser.error("--repeats, --steps and --batchsize must be >= 1")
    if args.batchsize % jax.device_count():
        parser.error(f"--batchsize must be divisible by the {jax.device_count()} devices")

    mesh = ct.make_mesh()
    model = make_cifar_model(args.model, num_classes=10)
    optims = ("sgd", "ivon")
    cases = {}
    for optim in optims:
        print(f"compiling {optim} ...", flush=True)
        cases[optim] = build(optim, model, args.batchsize, args.steps, mesh)
        print(f"  {cases[optim]['compile_seconds']:.1f} s", flush=True)

    def show(repeat, seconds):
        times = ", ".join(f"{o} {seconds[o][-1] * 1e3:.0f} ms/step" for o in optims)
        print(f"repeat {repeat + 1}/{args.repeats}: {times}", flush=True)

    seconds = timing.alternate(
        {o: (lambda case=cases[o]: run_steps(case, args.steps)) for o in optims},
        args.repeats,
        steps=args.steps,
        on_repeat=show,
    )
    predict_seconds = time_prediction(model, args.batchsize, args.repeats, mesh)

    results = {}
    for optim in optims:
        summary = timing.summarize(seconds[optim], reference=seconds["sgd"])
        results[optim] = {
            "seconds_per_step": summary["all"],
            "min_ms_per_step": summary["min"] * 1e3,
            "median_ms_per_step": summary["median"] * 1e3,
            "images_per_second_at_min": args.batchsize / summary["min"],
            "images_per_second_at_median": args.batchsize / summary["median"],
            "compile_seconds": cases[optim]["compile_seconds"],
        }
    ivon = timing.summarize(seconds["ivon"], reference=seconds["sgd"])
    report = {
        **timing.machine(),
        "model": args.model,
        "batch": args.batchsize,
        "steps_per_repeat": args.steps,
        "repeats": args.repeats,
        "train_step": results,
        "ivon_over_sgd": {
            "median_of_ratios": ivon["median_of_ratios"],
            "ratio_of_minima": ivon["ratio_of_minima"],
        },
        "prediction_forward": {
            "seconds_per_batch": predict_seconds,
            "images_per_second_at_min": args.batchsize / min(predict_seconds),
        },
    }
    out = timing.write_json(
        args.out or os.path.join(ROOT, "bench", "results", f"cifar_{jax.default_backend()}.json"),
        report,
    )

    print(
        f"\n{args.model}, batch {args.batchsize}, {jax.device_count()} "
        f"{report['device_kind']} device(s); {args.repeats} repeats of {args.steps} step(s)"
    )
    print(f"{'optimizer':<10} {'min ms':>9} {'median ms':>10} {'img/s (min)':>12} {'ratio':>7}")
    for optim in optims:
        r = results[optim]
        ratio = 1.0 if optim == "sgd" else report["ivon_over_sgd"]["median_of_ratios"]
        print(
            f"{optim:<10} {r['min_ms_per_step']:>9.1f} {r['median_ms_per_step']:>10.1f} "
            f"{r['images_per_second_at_min']:>12.1f} {ratio:>6.3f}x"
        )
    print(
        f"test-time forward pass: {report['prediction_forward']['images_per_second_at_min']:.1f} "
        f"img/s\nwrote {out}"
    )


if __name__ == "__main__":
    main()
