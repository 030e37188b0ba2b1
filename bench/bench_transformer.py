"""The training step of the byte-level transformer: IVON against optax.adamw, same run.

The model is ``bdl_examples.language.Transformer`` (the one examples/language_model trains:
GPT-2-style, pre-LayerNorm, tied byte embedding). AdamW's step is gradient and update; IVON's
is drawing the posterior sample, the gradient at it and the update. Both steps are jitted with
donated parameters and optimizer state, see the same batch of random bytes and warm up for two
steps; then they take turns within every repeat (``bench/timing.py``: the order reverses
between repeats, so that drift of a shared machine hits both), ``--steps`` steps per repeat.
Reported: min and median ms per step, and IVON's ratio to AdamW as the median of the
per-repeat ratios and as the ratio of the minima.

Sizes (``--sizes``):
  small       width 128, 2 blocks, 4 heads, context 128, batch 16      (0.45M parameters)
  medium      width 256, 6 blocks, 8 heads, context 128, batch 8       (4.8M parameters)
  gpt2-small  width 768, 12 blocks, 12 heads, context 1024, batch 8    (GPT-2 small's shape;
              86M parameters with the 256 bytes as vocabulary, where GPT-2's 50,257 tokens
              make 124M; for a GPU, not in the default set)

Usage:
  python bench/bench_transformer.py                       # small and medium, on the CPU
  python bench/bench_transformer.py --sizes small --repeats 9 --steps 5
  python bench/bench_transformer.py --sizes gpt2-small --steps 10   # on a GPU machine
Writes bench/results/transformer_<platform>.json (or --out).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import timing
from bdl_examples import language
from flax import nnx

import ivon


class Size(NamedTuple):
    width: int
    depth: int
    heads: int
    context: int
    batch: int


SIZES = {
    "small": Size(width=128, depth=2, heads=4, context=128, batch=16),
    "medium": Size(width=256, depth=6, heads=8, context=128, batch=8),
    "gpt2-small": Size(width=768, depth=12, heads=12, context=1024, batch=8),
}
OPTIMIZERS = ("adamw", "ivon")


# --------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------


def make_model(size: Size, seed: int = 0) -> tuple[nnx.GraphDef, dict]:
    """``(graphdef, params)``: the transformer's structure and parameters (a nested dict)."""
    model = language.Transformer(
        context=size.context,
        width=size.width,
        depth=size.depth,
        heads=size.heads,
        rngs=nnx.Rngs(seed),
    )
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def make_optimizers() -> dict[str, optax.GradientTransformation]:
    """AdamW, and IVON with examples/language_model/train.py's settings (the timing does not
    depend on them)."""
    return {
        "adamw": optax.adamw(3e-3, b2=0.95, weight_decay=0.1),
        "ivon": ivon.ivon(1000.0, ess=1e10, hess_init=1e-3, weight_decay=1e-6, clip_radius=1e-3),
    }


def make_steps(graphdef, optimizers: dict) -> dict[str, Callable]:
    """``step(params, opt_state, key, windows) -> (params, opt_state, loss)`` of every
    optimizer, not yet jitted. IVON's gradient is taken at a posterior sample."""

    def loss_fn(params, windows):
        logits = nnx.merge(graphdef, params)(windows[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), windows[:, 1:]
        ).mean()

    grad_fn = jax.value_and_grad(loss_fn)

    def adamw_step(params, opt_state, key, windows):
        del key  # AdamW draws nothing
        loss, grads = grad_fn(params, windows)
        updates, opt_state = optimizers["adamw"].update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def ivon_step(params, opt_state, key, windows):
        sample, opt_state = ivon.sample_parameters(key, params, opt_state)
        loss, grads = grad_fn(sample, windows)
        updates, opt_state = optimizers["ivon"].update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return {"adamw": adamw_step, "ivon": ivon_step}


def random_windows(size: Size, seed: int = 0) -> jax.Array:
    """A batch ``(batch, context + 1)`` of random bytes (int32)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, language.VOCAB_SIZE, (size.batch, size.context + 1)))


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


class Runner:
    """One jitted step and its (donated) buffers; ``run(n)`` runs n steps."""

    def __init__(self, step, params, opt_state, windows, *, warmup: int = 2):
        self.step = jax.jit(step, donate_argnums=(0, 1))
        self.params = jax.tree.map(jnp.copy, params)  # a copy per runner: they are donated
        self.opt_state = opt_state
        self.windows = windows
        self.key = jax.random.key(0)
        self.count = 0
        self.loss = None
        if warmup:
            jax.block_until_ready(self.run(warmup))  # compile and warm up

    def run(self, steps: int):
        """Runs ``steps`` steps; returns the new buffers (not yet computed: the caller
        waits)."""
        for _ in range(steps):
            self.count += 1
            key = jax.random.fold_in(self.key, self.count)
            self.params, self.opt_state, self.loss = self.step(
                self.params, self.opt_state, key, self.windows
            )
        return self.params, self.opt_state


def build_runners(size: Size, *, warmup: int = 2) -> tuple[dict[str, Runner], int]:
    """A compiled, warmed-up runner per optimizer (same model, same batch), and the number of
    parameters."""
    graphdef, params = make_model(size)
    optimizers = make_optimizers()
    steps = make_steps(graphdef, optimizers)
    windows = random_windows(size)
    runners = {
        name: Runner(steps[name], params, optimizers[name].init(params), windows, warmup=warmup)
        for name in OPTIMIZERS
    }
    return runners, language.count_parameters(params)


def bench_size(name: str, steps: int, repeats: int) -> dict:
    size = SIZES[name]
    print(f"compiling {name} ...", flush=True)
    runners, num_params = build_runners(size)

    def show(repeat, seconds):
        times = ", ".join(f"{o} {1e3 * seconds[o][-1]:.1f} ms/step" for o in OPTIMIZERS)
        print(f"  repeat {repeat + 1}/{repeats}: {times}", flush=True)

    seconds = timing.alternate(
        {o: (lambda runner=runners[o]: runner.run(steps)) for o in OPTIMIZERS},
        repeats,
        steps=steps,
        on_repeat=show,
    )
    results = {}
    for optimizer in OPTIMIZERS:
        summary = timing.summarize(seconds[optimizer], reference=seconds["adamw"])
        results[optimizer] = {
            "min_ms": 1e3 * summary["min"],
            "median_ms": 1e3 * summary["median"],
            "max_ms": 1e3 * summary["max"],
            "ratio_to_adamw": summary["median_of_ratios"],
            "ratio_of_minima_to_adamw": summary["ratio_of_minima"],
            "seconds_per_step": summary["all"],
            "tokens_per_second_at_min": size.batch * size.context / summary["min"],
        }
    return {
        **size._asdict(),
        "num_params": num_params,
        "steps_per_repeat": steps,
        "repeats": repeats,
        "results": results,
    }


def format_table(cases: dict) -> str:
    lines = [
        f"{'size':<11} {'parameters':>11} {'optimizer':<9} {'min ms':>9} {'median ms':>10} "
        f"{'ratio (median)':>15} {'ratio (minima)':>15}"
    ]
    for name, case in cases.items():
        for optimizer, row in case["results"].items():
            lines.append(
                f"{name:<11} {case['num_params']:>11,} {optimizer:<9} {row['min_ms']:>9.1f} "
                f"{row['median_ms']:>10.1f} {row['ratio_to_adamw']:>14.2f}x "
                f"{row['ratio_of_minima_to_adamw']:>14.2f}x"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "medium"], choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be >= 1")
    if args.repeats < 5:
        print("note: fewer than 5 repeats make the medians unreliable")

    report = {**timing.machine(), "optax": optax.__version__, "cases": {}}
    for name in args.sizes:
        report["cases"][name] = bench_size(name, args.steps, args.repeats)
    print(
        f"\n{report['backend']}: {report['device_kind']}, {report['cpu_count']} CPUs, "
        f"jax {report['jax']}; {args.repeats} repeats of {args.steps} steps"
    )
    print(format_table(report["cases"]))
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"transformer_{report['backend']}.json",
    )
    print(f"\nwrote {timing.write_json(out, report)}")


if __name__ == "__main__":
    main()
