"""Speed and memory of IVON against optax.adamw, measured in the same run.

Cases:
  mlp       full training step (sample, forward/backward, update) of an MLP 784-1024-1024-10,
            batch 128
  cnn       the same for a small CNN (two 3x3 conv layers with pooling, two dense) on
            28x28x1 images, batch 128
  optimizer optimizer work alone (IVON: sample and update; AdamW: update) on 10M parameters
  resnet18  the training step of a ResNet-18 on 32x32x3 images, batch 128 (meant for GPUs;
            slow on a CPU, so not in the default set)
  memory    optimizer-state bytes per parameter byte, S = 1 and S > 1 (AdamW: 2)

Every timing is over --repeats repeats of --steps jitted steps with donated buffers (min and
median; bench/timing.py); the candidates take turns within every repeat, in an order that
reverses between repeats, so that drift of the machine hits all of them, and each ratio is
the median of the per-repeat ratios to AdamW. "ivon (jax.random.normal)" is IVON with its
noise drawn by ``jax.random.normal`` instead of ivon.py's generator (an ablation).
``--baseline PATH`` adds "ivon (baseline)": the same step with another copy of ivon.py (e.g.
the previous release, ``git show HEAD~1:ivon.py > /tmp/ivon_old.py``), to check that a change
does not slow the step down.

Usage:
  python bench/bench_ivon.py                       # mlp, cnn, optimizer, memory
  python bench/bench_ivon.py --cases mlp --repeats 9
  python bench/bench_ivon.py --cases resnet18      # on a GPU machine
  python bench/bench_ivon.py --cases mlp cnn --baseline /tmp/ivon_old.py
Writes bench/results/ivon_<platform>.json (or --out).
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import timing
from bdl_examples.models import MLP

import ivon

BATCH = 128


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


# The MLP is the harness's. The CNN and the ResNet-18 stay this benchmark's own, not the
# harness's SmallCNN and ResNet18 (BatchNorm, 32x32 inputs), for two reasons: bench/README.md
# reports times of exactly these networks (the CPU table, the H100 figures), which later runs
# must be comparable with; and without BatchNorm's running statistics the parameters are the
# only state, so that the two optimizers' steps differ in the optimizer alone. The harness's
# BatchNorm ResNet-18 is timed by bench_cifar.py, in the CIFAR training program's own step.


class MaxPoolCNN(nn.Module):
    """Two 3x3 conv layers (32, 64 channels) with ReLU and 2x2 max-pooling, a dense layer of
    128 and the 10 outputs: the CNN case, on 28x28x1 images."""

    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(64, (3, 3))(x)), (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(10)(x)


class GroupNormBlock(nn.Module):
    """The basic block of GroupNormResNet18: two 3x3 convolutions with GroupNorm (groups of 16
    channels) and a shortcut (1x1 convolution when the shape changes)."""

    filters: int
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        residual = x
        y = nn.Conv(self.filters, (3, 3), (self.strides, self.strides), use_bias=False)(x)
        y = nn.relu(nn.GroupNorm(num_groups=None, group_size=16)(y))
        y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
        y = nn.GroupNorm(num_groups=None, group_size=16)(y)
        if residual.shape != y.shape:
            residual = nn.Conv(self.filters, (1, 1), (self.strides, self.strides), use_bias=False)(
                residual
            )
            residual = nn.GroupNorm(num_groups=None, group_size=16)(residual)
        return nn.relu(residual + y)


class GroupNormResNet18(nn.Module):
    """ResNet-18 for 32x32 images (3x3 stem, no max-pool) with GroupNorm instead of
    BatchNorm."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(64, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.GroupNorm(num_groups=None, group_size=16)(x))
        for i, filters in enumerate((64, 128, 256, 512)):
            x = GroupNormBlock(filters, 1 if i == 0 else 2)(x)
            x = GroupNormBlock(filters)(x)
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


# name -> (the network, the input shape)
MODELS = {
    "mlp": (MLP(widths=(1024, 1024), num_outputs=10), (BATCH, 784)),
    "cnn": (MaxPoolCNN(), (BATCH, 28, 28, 1)),
    "resnet18": (GroupNormResNet18(), (BATCH, 32, 32, 3)),
}


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def _train_steps(model, params, ivon=ivon):
    def loss_fn(p, x, y):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    adamw = optax.adamw(1e-3)
    ivon_opt = ivon.ivon(0.1, ess=50_000.0)

    def adamw_step(params, opt_state, key, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = adamw.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def ivon_step(params, opt_state, key, x, y):
        psample, opt_state = ivon.sample_parameters(key, params, opt_state)
        grads = jax.grad(loss_fn)(psample, x, y)
        updates, opt_state = ivon_opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return {"adamw": (adamw, adamw_step), "ivon": (ivon_opt, ivon_step)}


def _optimizer_only_steps(ivon=ivon):
    adamw = optax.adamw(1e-3)
    ivon_opt = ivon.ivon(0.1, ess=50_000.0)

    def adamw_step(params, opt_state, key, grads):
        updates, opt_state = adamw.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def ivon_step(params, opt_state, key, grads):
        # the sample is an output, as it is consumed by the forward pass in training
        psample, opt_state = ivon.sample_parameters(key, params, opt_state)
        updates, opt_state = ivon_opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, psample

    return {"adamw": (adamw, adamw_step), "ivon": (ivon_opt, ivon_step)}


@contextmanager
def jax_random_normal_noise():
    """Ablation: IVON with noise from jax.random.normal (one Threefry hash per number)."""
    original = ivon._standard_normal
    ivon._standard_normal = lambda key, stream, shape, dtype: jax.random.normal(
        jax.random.fold_in(key, stream), shape, dtype
    )
    try:
        yield
    finally:
        ivon._standard_normal = original


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


class Runner:
    """Holds one jitted step and its (donated) buffers; ``run(n)`` runs n steps."""

    def __init__(self, step, params, opt_state, *data):
        self.step = jax.jit(step, donate_argnums=(0, 1))
        self.params = jax.tree.map(jnp.copy, params)
        self.opt_state = opt_state
        self.data = data
        self.key = jax.random.key(0)
        self.count = 0
        jax.block_until_ready(self.run(2))  # compile and warm up

    def run(self, steps):
        """Runs ``steps`` steps; returns the new buffers (not yet computed: the caller
        waits)."""
        for _ in range(steps):
            self.count += 1
            out = self.step(
                self.params, self.opt_state, jax.random.fold_in(self.key, self.count), *self.data
            )
            self.params, self.opt_state = out[0], out[1]
        return self.params, self.opt_state


def compare(runners: dict[str, Runner], steps: int, repeats: int) -> dict:
    """Milliseconds per step of each runner (min, median, max over the repeats) and its
    per-repeat ratio to AdamW (median); the runners take turns within every repeat."""
    seconds = timing.alternate(
        {name: (lambda runner=runner: runner.run(steps)) for name, runner in runners.items()},
        repeats,
        steps=steps,
    )
    result = {}
    for name, times in seconds.items():
        summary = timing.summarize(times, reference=seconds["adamw"])
        result[name] = {
            "median_ms": 1e3 * summary["median"],
            "min_ms": 1e3 * summary["min"],
            "max_ms": 1e3 * summary["max"],
            "ratio_to_adamw": summary["median_of_ratios"],
            "ratio_of_minima_to_adamw": summary["ratio_of_minima"],
            "repeats": repeats,
            "steps_per_repeat": steps,
        }
    return result


def _compiled_bytes(runner: Runner) -> int | None:
    try:
        args = (runner.params, runner.opt_state, jax.random.key(0), *runner.data)
        analysis = runner.step.lower(*args).compile().memory_analysis()
        return int(
            analysis.temp_size_in_bytes
            + analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes
        )
    except Exception:  # not every backend reports it
        return None


def _load_baseline(path):
    """Another copy of ivon.py, imported under its own name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ivon_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_model(name: str, steps: int, repeats: int, baseline=None) -> dict:
    model, input_shape = MODELS[name]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=input_shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, input_shape[0]))
    params = model.init(jax.random.key(0), x)["params"]
    steps_fns = _train_steps(model, params)
    runners = {
        opt_name: Runner(step, params, opt.init(params), x, y)
        for opt_name, (opt, step) in steps_fns.items()
    }
    with jax_random_normal_noise():
        opt, step = _train_steps(model, params)["ivon"]
        runners["ivon (jax.random.normal)"] = Runner(
            lambda *a: step(*a), params, opt.init(params), x, y
        )
    if baseline is not None:
        opt, step = _train_steps(model, params, baseline)["ivon"]
        runners["ivon (baseline)"] = Runner(step, params, opt.init(params), x, y)
    result = compare(runners, steps, repeats)
    num_params = sum(p.size for p in jax.tree.leaves(params))
    for opt_name, runner in runners.items():
        result[opt_name]["step_bytes"] = _compiled_bytes(runner)
    return {"num_params": int(num_params), "batch": input_shape[0], "results": result}


def bench_optimizer_only(
    steps: int, repeats: int, num_params: int = 10_000_000, baseline=None
) -> dict:
    rows = num_params // (4 * 1000)
    params = {f"w{i}": jnp.zeros((rows, 1000), jnp.float32) for i in range(4)}
    rng = np.random.default_rng(0)
    grads = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
    runners = {
        name: Runner(step, params, opt.init(params), grads)
        for name, (opt, step) in _optimizer_only_steps().items()
    }
    with jax_random_normal_noise():
        opt, step = _optimizer_only_steps()["ivon"]
        runners["ivon (jax.random.normal)"] = Runner(
            lambda *a: step(*a), params, opt.init(params), grads
        )
    if baseline is not None:
        opt, step = _optimizer_only_steps(baseline)["ivon"]
        runners["ivon (baseline)"] = Runner(step, params, opt.init(params), grads)
    result = compare(runners, steps, repeats)
    for value in result.values():
        value["ns_per_param"] = 1e6 * value["median_ms"] / (4 * rows * 1000)
    return {"num_params": 4 * rows * 1000, "results": result}


def bench_memory() -> dict:
    params = {"w": jnp.zeros((1000, 1000), jnp.float32), "b": jnp.zeros((1000,), jnp.float32)}
    param_bytes = sum(p.nbytes for p in jax.tree.leaves(params))

    def state_ratio(opt_state):
        return sum(x.nbytes for x in jax.tree.leaves(opt_state)) / param_bytes

    rows = {
        "adamw": state_ratio(optax.adamw(1e-3).init(params)),
        "ivon, S = 1": state_ratio(ivon.ivon(0.1, 1.0).init(params)),
        "ivon, hess_approx='gradsq'": state_ratio(
            ivon.ivon(0.1, 1.0, hess_approx="gradsq").init(params)
        ),
        "ivon, S > 1 with sampled_value_and_grad": state_ratio(ivon.ivon(0.1, 1.0).init(params)),
        "ivon, S > 1 with accumulate_gradients (accumulate=True)": state_ratio(
            ivon.ivon(0.1, 1.0, accumulate=True).init(params)
        ),
    }
    bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    bf16_bytes = sum(p.nbytes for p in jax.tree.leaves(bf16))
    rows["ivon, S = 1, bf16 parameters (float32 state)"] = (
        sum(x.nbytes for x in jax.tree.leaves(ivon.ivon(0.1, 1.0).init(bf16))) / bf16_bytes
    )
    rows["adamw, bf16 parameters"] = (
        sum(x.nbytes for x in jax.tree.leaves(optax.adamw(1e-3).init(bf16))) / bf16_bytes
    )
    return {"state_bytes_per_parameter_byte": rows}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["mlp", "cnn", "optimizer", "memory"],
        choices=["mlp", "cnn", "optimizer", "resnet18", "memory"],
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--baseline",
        default=None,
        help="another ivon.py to time in the same run, e.g. the previous version",
    )
    args = parser.parse_args(argv)
    if args.repeats < 5:
        print("note: fewer than 5 repeats make the medians unreliable")
    baseline = _load_baseline(args.baseline) if args.baseline else None

    report = {**timing.machine(), "optax": optax.__version__, "cases": {}}
    for case in args.cases:
        print(f"running {case} ...", flush=True)
        if case == "memory":
            report["cases"][case] = bench_memory()
        elif case == "optimizer":
            report["cases"][case] = bench_optimizer_only(
                args.steps, args.repeats, baseline=baseline
            )
        else:
            report["cases"][case] = bench_model(case, args.steps, args.repeats, baseline)

    print(
        f"\n{report['backend']}: {report['device_kind']}, {report['cpu_count']} CPUs, "
        f"jax {report['jax']}"
    )
    print(f"{'case':<11} {'optimizer':<27} {'min ms':>8} {'median ms':>10} {'ratio':>7}   range ms")
    for case, data in report["cases"].items():
        if case == "memory":
            continue
        for name, row in data["results"].items():
            print(
                f"{case:<11} {name:<27} {row['min_ms']:>8.2f} {row['median_ms']:>10.2f} "
                f"{row['ratio_to_adamw']:>6.2f}x"
                f"   {row['min_ms']:.2f}-{row['max_ms']:.2f}"
            )
    if "memory" in report["cases"]:
        print("\noptimizer-state bytes per parameter byte")
        for name, ratio in report["cases"]["memory"]["state_bytes_per_parameter_byte"].items():
            print(f"  {name:<58} {ratio:.2f}")

    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"ivon_{report['backend']}.json"
    )
    print(f"\nwrote {timing.write_json(out, report)}")


if __name__ == "__main__":
    main()
