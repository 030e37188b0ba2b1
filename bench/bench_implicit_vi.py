"""Speed and memory of implicit_vi.py.

Parts:
  mnist    the paper's MNIST configuration: MM generator (noise 40x40, hidden 420x420,
           n_hidden 2, output 957x500; 3,130,380 parameters) for an MLP 784-400-400-10
           (478,410 weights), batch 256, S = 10 samples, "smallest_sv" with 5 iterations on
           every sample, one Adam step. Time per training step with a breakdown (generator,
           likelihood, entropy) measured by difference: generator = a step whose loss only
           uses the generated parameters; likelihood = (step without entropy) - generator;
           entropy = (full step) - (step without entropy). Also the full step without the
           readout-Gram factorisation (an ablation). Then the levers, one row each, the
           candidates taking turns in every repeat (warm-started ones carry their
           eigenvectors through consecutive steps): the paper's solver with two generator
           passes, one shared linearisation, a warm start, the default tolerance and cap, and
           the entropy on 2 or 1 of the 10 samples; and the spread over keys of the entropy
           estimate and of the loss gradient for the entropy on K = 1, 2, 10 samples.
           Compare with another implementation only in the same run (``--torch``): speed on
           a shared machine varies by day.
  spectrum (not in the default set) the solver's error on the same generator at
           initialisation: J^T J formed explicitly at 16 latents and diagonalised in float64;
           for the paper's solver, the warm start with 5 iterations and the defaults, how
           many nats the estimate of d/2 log(s_min^2 + sigma^2) lies above its converged
           value (warm starts carried from latent to latent; latents 8-15), and the
           converged bound's distance below the exact log-determinant term.
  torch    (with --torch PYTHON) the same step written in PyTorch from the mathematics, run in
           a separate interpreter (e.g. /tmp/torchvenv/bin/python with torch installed), in the
           same run, for a ratio measured on the same machine. Skipped when torch is missing.
  scaling  one ELBO gradient step (Adam) for an MLP 784-w-10 whose width w sets the number of
           generated weights D from 1e4 to 3e7, with the automatic multi-head generator,
           "smallest_sv" (5 iterations), S = 2, batch 32: time, and peak resident memory
           (ru_maxrss) of a fresh subprocess per point.
  entropy  "exact" against "smallest_sv" as the latent size d grows (D = 25,450: an MLP
           784-32-10, automatic generator with noise k x k): time per training step and the
           gap between the two entropy values at initialisation (and with the eigen-solver
           run to convergence, which separates the bound's looseness from the solver's).
  bound    (not in the default set) the entropy estimate against the exact entropy over a
           whole training run (digits, MLP 64-128-128-10, MM generator with d = 256, S = 4,
           400 Adam steps), before (the paper's solver: 5 iterations from a fresh start) and
           after (warm start, tolerance, cap: the defaults), with the bound's converged value;
           writes bench/results/implicit_vi_bound.png.
  cifar    (not in the default set) the training program's step
           (examples/implicit_vi_paper/train.py: LeNet-5, batch 256, S = 10, amsgrad, the
           paper's weights) on CIFAR-10-shaped inputs, with the multi-head generator of
           examples/implicit_vi_paper/configs/cifar_lenet.yaml (the published layout) and the
           library's solver (warm start, tolerance), against the same with the paper's solver
           (5 iterations from a fresh start) and the automatic generator; the candidates take
           turns within every repeat.

Every time is the median of --repeats jitted calls (after compilation and one warm-up call),
each followed by block_until_ready; where candidates are compared they take turns within every
repeat, in an order that reverses between repeats (bench/timing.py).

Usage:
  python bench/bench_implicit_vi.py                         # mnist, scaling, entropy
  python bench/bench_implicit_vi.py --parts mnist --torch /tmp/torchvenv/bin/python
  python bench/bench_implicit_vi.py --parts scaling --max-weights 3e7
  python bench/bench_implicit_vi.py --parts cifar --out bench/results/implicit_vi_cifar.json
Prints a table per part and merges the results into bench/results/implicit_vi.json (or --out).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import timing
from bdl_examples.models import MLP
from bdl_examples.plots import pyplot, save_figure

import implicit_vi as ivi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Opaque(nn.Module):
    """Hides a generator's readout_gram method, so that implicit_vi uses the generic J^T J
    product."""

    inner: nn.Module

    @property
    def noise_shape(self):
        return self.inner.noise_shape

    @nn.compact
    def __call__(self, z):
        return self.inner(z)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# --------------------------------------------------------------------------------------------
# (a) the paper's MNIST configuration
# --------------------------------------------------------------------------------------------

# In the published configuration layout: one head that reads the noise itself (no trunk).
MNIST_GENERATOR = [
    {"noise_input": [40, 40], "gen1": [40, 40]},
    {"gen1": [957, 500]},
    {"gen1": [420, 420]},
    {"gen1": 2},
]
BATCH, SAMPLES, ITERATIONS, NUM_DATA = 256, 10, 5, 60_000


def mnist_bnn(opaque: bool = False, hide_readout: bool = False):
    model = MLP(widths=(400, 400), num_outputs=10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 784)))["params"]
    generator = ivi.generator_from_config(MNIST_GENERATOR, trunk_shapes=[])
    if opaque:
        generator = Opaque(generator)
    if hide_readout:
        generator = HiddenReadout(generator)
    return ivi.ImplicitBNN.from_linen(model, params, generator=generator)


def run_mnist(repeats: int) -> dict:
    bnn = mnist_bnn()
    vi_params = bnn.init(jax.random.key(1))
    optimizer = optax.adam(7e-5)
    opt_state = optimizer.init(vi_params)
    x = jax.random.normal(jax.random.key(2), (BATCH, 784))
    y = jax.random.randint(jax.random.key(3), (BATCH,), 0, 10)
    key = jax.random.key(4)
    # The paper's weighting (it does not change the cost).
    weights = dict(prior_weight=8.5e-4 / BATCH, entropy_weight=1.0 / BATCH)
    common = dict(num_data=NUM_DATA, num_samples=SAMPLES, **weights)
    paper_solver = dict(tolerance=None, num_iterations=ITERATIONS)

    full = bnn.make_train_step(optimizer, entropy="smallest_sv", **paper_solver, **common)
    no_entropy = bnn.make_train_step(optimizer, entropy=None, **common)
    readout = jax.random.normal(jax.random.key(5), (bnn.num_stochastic,))

    @jax.jit
    def generator_only(vi_params, opt_state, key, batch):
        def loss(p):
            theta = ivi.sample_flat(bnn.model, p, key, SAMPLES)
            return jnp.mean(theta @ readout)

        grads = jax.grad(loss)(vi_params)
        updates, opt_state = optimizer.update(grads, opt_state, vi_params)
        return optax.apply_updates(vi_params, updates), opt_state

    args = (vi_params, opt_state, key, (x, y))
    t_full, times_full = timing.median_time(full, *args, repeats=repeats)
    t_no_entropy, _ = timing.median_time(no_entropy, *args, repeats=repeats)
    t_generator, _ = timing.median_time(generator_only, *args, repeats=repeats)

    opaque = mnist_bnn(opaque=True)
    opaque_params = opaque.init(jax.random.key(1))
    opaque_step = opaque.make_train_step(optimizer, entropy="smallest_sv", **paper_solver, **common)
    t_generic, _ = timing.median_time(
        opaque_step, opaque_params, optimizer.init(opaque_params), key, (x, y), repeats=repeats
    )

    report = bnn.report()
    return {
        "config": {
            "generator": MNIST_GENERATOR,
            "generator_params": report.generator_params,
            "network": "MLP 784-400-400-10",
            "network_params": report.network_params,
            "batch": BATCH,
            "samples": SAMPLES,
            "entropy": "smallest_sv",
            "iterations": ITERATIONS,
            "solver": "the paper's: 5 iterations from a fresh random start, every sample",
            "optimizer": "adam",
        },
        "step_seconds": t_full,
        "step_seconds_all": times_full,
        "breakdown_seconds": {
            "generator": t_generator,
            "likelihood_and_prior": t_no_entropy - t_generator,
            "entropy": t_full - t_no_entropy,
        },
        "step_without_entropy_seconds": t_no_entropy,
        "step_generic_jtj_seconds": t_generic,
        "output_noise_seconds": time_output_noise(bnn.num_stochastic, repeats),
        "levers": run_mnist_levers(repeats),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def time_output_noise(size: int, repeats: int) -> dict:
    """The S output-noise vectors of a step (S x D normals), as implicit_vi draws them and with
    jax.random.normal, taking turns; min and median seconds."""
    keys = jax.random.split(jax.random.key(6), SAMPLES)
    draws = {
        "implicit_vi": jax.jit(lambda k: ivi._normal_rows(k, size, jnp.float32)),
        "jax.random.normal": jax.jit(
            jax.vmap(lambda k: jax.random.normal(k, (size,), jnp.float32))
        ),
    }
    for draw in draws.values():
        jax.block_until_ready(draw(keys))
    times = timing.alternate(
        {name: (lambda draw=draw: draw(keys)) for name, draw in draws.items()}, 3 * repeats
    )
    summaries = {name: timing.summarize(t) for name, t in times.items()}
    return {name: {"min": s["min"], "median": s["median"]} for name, s in summaries.items()}


class HiddenReadout(nn.Module):
    """Hides a generator's ``readout`` method (not its ``readout_gram``): implicit_vi then
    computes g(z) and J v in a second pass through the generator, as before the shared
    linearisation (an ablation)."""

    inner: nn.Module

    @property
    def noise_shape(self):
        return self.inner.noise_shape

    def features(self, z):
        return self.inner.features(z)

    def readout_gram(self, params, segments):
        return self.inner.readout_gram(params["inner"], segments)

    def __call__(self, z):
        return self.inner(z)


# name -> (hide the readout, loss options beyond the common ones, carry the eigenvectors)
MNIST_LEVERS = {
    "paper: 5 cold iterations on all 10 samples, two generator passes": (
        True,
        dict(tolerance=None, num_iterations=ITERATIONS),
        False,
    ),
    "+ one shared linearisation (one generator pass)": (
        False,
        dict(tolerance=None, num_iterations=ITERATIONS),
        False,
    ),
    "+ warm start (still 5 iterations)": (
        False,
        dict(tolerance=None, num_iterations=ITERATIONS),
        True,
    ),
    "+ tolerance 0.1, cap 20 (the defaults)": (False, {}, True),
    "+ entropy on 2 of the 10 samples": (False, dict(entropy_samples=2), True),
    "+ entropy on 1 of the 10 samples": (False, dict(entropy_samples=1), True),
    # The paper's iteration budget with the three levers: warm start, shared linearisation,
    # the entropy on fewer samples.
    "warm start, 5 iterations, entropy on 2 of the 10 samples": (
        False,
        dict(tolerance=None, num_iterations=ITERATIONS, entropy_samples=2),
        True,
    ),
    "warm start, 5 iterations, entropy on 1 of the 10 samples": (
        False,
        dict(tolerance=None, num_iterations=ITERATIONS, entropy_samples=1),
        True,
    ),
}


def run_mnist_levers(repeats: int) -> dict:
    """Each lever's step time, the candidates taking turns within every repeat; warm-started
    candidates run consecutive training steps carrying their eigenvectors."""
    x = jax.random.normal(jax.random.key(2), (BATCH, 784))
    y = jax.random.randint(jax.random.key(3), (BATCH,), 0, 10)
    optimizer = optax.adam(7e-5)
    weights = dict(prior_weight=8.5e-4 / BATCH, entropy_weight=1.0 / BATCH)
    plain, hidden = mnist_bnn(), mnist_bnn(hide_readout=True)
    runs = {}
    for name, (hide, options, warm) in MNIST_LEVERS.items():
        bnn = hidden if hide else plain
        step = bnn.make_train_step(
            optimizer, num_data=NUM_DATA, num_samples=SAMPLES, **weights, **options
        )
        vi_params = bnn.init(jax.random.key(1))
        runs[name] = {"step": step, "warm": warm, "state": [vi_params, optimizer.init(vi_params)]}
        runs[name].update(eigvecs=None, solver=[], count=0)

    def advance(run):
        key = jax.random.key(100 + run["count"])
        vi_params, opt_state, aux = run["step"](*run["state"], key, (x, y), run["eigvecs"])
        run["count"] += 1
        run["state"] = [vi_params, opt_state]
        run["eigvecs"] = aux["eigvecs"] if run["warm"] else None
        run["solver"].append((aux["solver_iterations"], aux["solver_residual"]))
        return vi_params, aux

    for run in runs.values():  # compile, then warm up (and warm-start) with three steps
        for _ in range(3):
            jax.block_until_ready(advance(run))
        run["solver"].clear()
    times = timing.alternate(
        {name: (lambda run=run: advance(run)) for name, run in runs.items()}, repeats
    )
    baseline = times[next(iter(runs))]
    result = {}
    for name, run in runs.items():
        summary = timing.summarize(times[name], reference=baseline)
        result[name] = {
            "options": {k: v for k, v in MNIST_LEVERS[name][1].items()},
            "warm_start": run["warm"],
            "min_seconds": summary["min"],
            "median_seconds": summary["median"],
            "seconds_all": summary["all"],
            "ratio_to_paper": summary["median_of_ratios"],
            "solver_iterations": [int(i) for i, _ in run["solver"]],
            "solver_residual": [float(r) for _, r in run["solver"]],
        }
    result["entropy_samples_variance"] = entropy_sample_variance(plain, x, y, weights)
    # The library's default weights: w_p = w_H = 1/N.
    result["entropy_samples_variance_per_data_point"] = entropy_sample_variance(plain, x, y, {})
    return result


def entropy_sample_variance(bnn, x, y, weights, num_keys: int = 8) -> dict:
    """Spread over keys of the entropy estimate and of the loss gradient, for the entropy on
    K of the S = 10 samples (the solver run to its tolerance from a fresh start)."""
    vi_params = bnn.init(jax.random.key(1))
    out = {}
    for k in (1, 2, SAMPLES):
        loss = partial_loss(bnn, entropy_samples=k, num_iterations=40, **weights)
        grads, entropies = [], []
        for i in range(num_keys):
            grad, aux = loss(vi_params, jax.random.key(1000 + i), (x, y))
            grads.append(np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grad)]))
            entropies.append(float(aux["entropy"]))
        grads = np.stack(grads)
        mean = grads.mean(0)
        out[str(k)] = {
            "entropy_std_nats": float(np.std(entropies, ddof=1)),
            "gradient_relative_variance": float(
                np.mean(np.sum((grads - mean) ** 2, axis=1)) / np.sum(mean**2)
            ),
        }
    return out


def partial_loss(bnn, **options):
    return jax.jit(
        jax.grad(
            lambda p, key, batch: bnn.loss(
                p, key, batch, num_data=NUM_DATA, num_samples=SAMPLES, **options
            ),
            has_aux=True,
        )
    )


def print_mnist(result: dict) -> None:
    b = result["breakdown_seconds"]
    print("\n(a) paper's MNIST configuration: MLP 784-400-400-10, MM generator 3,130,380 params,")
    print(f"    batch {BATCH}, S = {SAMPLES}, smallest_sv {ITERATIONS} iterations, one Adam step")
    print(f"  {'quantity':<46}{'seconds':>10}")
    rows = [
        ("training step (median)", result["step_seconds"]),
        ("  generator (forward + backward)", b["generator"]),
        ("  likelihood + prior", b["likelihood_and_prior"]),
        ("  entropy (eigen-solver + J v term)", b["entropy"]),
        ("step without the readout-Gram factorisation", result["step_generic_jtj_seconds"]),
    ]
    for name, value in rows:
        print(f"  {name:<46}{value:>10.3f}")
    noise = result.get("output_noise_seconds")
    if noise:
        print(
            f"  output noise of the {SAMPLES} samples (min / median): implicit_vi "
            f"{noise['implicit_vi']['min']:.3f} / {noise['implicit_vi']['median']:.3f}, "
            f"jax.random.normal {noise['jax.random.normal']['min']:.3f} / "
            f"{noise['jax.random.normal']['median']:.3f}"
        )
    levers = result["levers"]
    print("\n  levers (candidates take turns in every repeat; ratio = median per-repeat ratio)")
    print(f"  {'candidate':<66}{'min s':>7}{'median s':>9}{'ratio':>7}{'iters':>6}{'resid.':>8}")
    for name in MNIST_LEVERS:
        r = levers[name]
        its = statistics.median(r["solver_iterations"])
        residual = statistics.median(r["solver_residual"])
        print(
            f"  {name:<66}{r['min_seconds']:>7.3f}{r['median_seconds']:>9.3f}"
            f"{r['ratio_to_paper']:>7.2f}{its:>6.0f}{residual:>8.3f}"
        )
    print("\n  entropy on K of the 10 samples: spread over 8 keys at initialisation")
    print(f"  {'K':>4}{'entropy std (nats)':>20}{'loss-gradient relative variance':>34}")
    for label, field in (
        ("the paper's weights (entropy 1/B)", "entropy_samples_variance"),
        ("the per-data-point ELBO (entropy 1/N)", "entropy_samples_variance_per_data_point"),
    ):
        print(f"  {label}")
        for k, r in levers.get(field, {}).items():
            print(f"  {k:>4}{r['entropy_std_nats']:>20.2f}{r['gradient_relative_variance']:>34.4f}")


SPECTRUM_LATENTS = 16
SPECTRUM_REPORTED_FROM = 8  # the warm starts' steady state


def explicit_jtj(bnn, gen_params, z, chunk: int = 100) -> np.ndarray:
    """J^T J (d x d, float64) of a factorised generator's means at one latent z (1, d),
    column by column through the same matrix-free product the solver uses."""
    features_fn, readout_gram, _ = ivi._readout_factorisation(bnn.model)
    gram = readout_gram(gen_params)
    _, forward = jax.linearize(partial(features_fn, gen_params), z)
    backward = jax.linear_transpose(forward, z)
    columns = jax.jit(jax.vmap(lambda u: backward(gram(forward(u[None])))[0][0]))
    d = z.shape[1]
    eye = np.eye(d, dtype=np.float32)
    a = np.concatenate([np.asarray(columns(eye[i : i + chunk])) for i in range(0, d, chunk)])
    return 0.5 * (a + a.T).astype(np.float64)


def run_spectrum() -> dict:
    """How far each solver setting's estimate of d/2 log(s_min^2 + sigma^2) lies above its
    converged value, and the converged bound below the exact log-determinant term, on the
    paper's MNIST generator at initialisation: J^T J is formed explicitly at SPECTRUM_LATENTS
    latents and diagonalised in float64; the library's solver runs on the same matrices, the
    warm-started settings carrying their vector from one latent to the next (as consecutive
    training steps do), reported from latent SPECTRUM_REPORTED_FROM on, once the warm starts
    have reached their steady state."""
    bnn = mnist_bnn()
    vi_params = bnn.init(jax.random.key(1))
    sigma2 = float(bnn.model.sigma) ** 2
    d = bnn.latent_dim
    settings = {  # name -> (iterations, tolerance, warm start)
        "paper: 5 iterations from a fresh start": (ITERATIONS, None, False),
        "warm start, 5 iterations": (ITERATIONS, None, True),
        "warm start, tolerance 0.1, cap 20 (the defaults)": (
            ivi.SOLVER_MAX_ITERATIONS,
            ivi.SOLVER_TOLERANCE,
            True,
        ),
    }
    vectors = {name: None for name in settings}
    rows = []
    for i in range(SPECTRUM_LATENTS):
        z = jax.random.normal(jax.random.key(200 + i), (1, d))
        a = explicit_jtj(bnn, vi_params.generator, z)
        eigenvalues = np.linalg.eigvalsh(a)
        converged = 0.5 * d * np.log(eigenvalues[0] + sigma2)
        row = {
            "latent": i,
            "smallest_eigenvalues": eigenvalues[:4].tolist(),
            "largest_eigenvalue": float(eigenvalues[-1]),
            "exact_log_det_term": float(0.5 * np.sum(np.log(eigenvalues + sigma2))),
            "converged_bound": float(converged),
            "settings": {},
        }
        matrix = jnp.asarray(a, jnp.float32)
        for name, (iterations, tolerance, warm) in settings.items():
            start = vectors[name] if warm else None
            if start is None:  # a fresh start, or the first latent of a warm chain
                start = jax.random.normal(jax.random.key(300 + i), (1, d))
            pair = ivi.smallest_eigenpair(
                lambda u, m=matrix: u @ m, start, iterations, tolerance=tolerance, shift=sigma2
            )
            vectors[name] = pair.vector
            estimate = 0.5 * d * np.log(float(pair.value[0]) + sigma2)
            row["settings"][name] = {
                "estimate": float(estimate),
                "nats_above_converged": float(estimate - converged),
                "iterations": int(pair.iterations[0]),
                "residual": float(pair.residual[0]),
            }
        rows.append(row)
        print(f"  latent {i}: done", flush=True)
    summary = {}
    steady = rows[SPECTRUM_REPORTED_FROM:]
    for name in settings:
        later = [r["settings"][name] for r in steady]
        summary[name] = {
            "mean_nats_above_converged": float(np.mean([s["nats_above_converged"] for s in later])),
            "max_nats_above_converged": float(np.max([s["nats_above_converged"] for s in later])),
            "median_iterations": float(np.median([s["iterations"] for s in later])),
            "median_residual": float(np.median([s["residual"] for s in later])),
            "max_estimate_minus_exact": float(
                max(r["settings"][name]["estimate"] - r["exact_log_det_term"] for r in steady)
            ),
        }
    looseness = [r["exact_log_det_term"] - r["converged_bound"] for r in rows]
    return {
        "latent_dim": d,
        "sigma": float(bnn.model.sigma),
        "rows": rows,
        "summary": summary,
        "mean_exact_minus_converged": float(np.mean(looseness)),
    }


def print_spectrum(result: dict) -> None:
    first = result["rows"][0]
    print(
        f"\n(a'') solver error on the paper's MNIST generator at initialisation (d = "
        f"{result['latent_dim']}), J^T J explicit at {len(result['rows'])} latents"
    )
    print(
        f"  smallest eigenvalues {np.round(first['smallest_eigenvalues'], 4).tolist()}, largest "
        f"{first['largest_eigenvalue']:.3f}; the converged bound lies "
        f"{result['mean_exact_minus_converged']:.0f} nats below the exact log-det term"
    )
    print(f"  {'setting':<52}{'nats above converged':>22}{'iters':>7}{'resid.':>8}{'<= exact':>10}")
    for name, s in result["summary"].items():
        above = f"{s['mean_nats_above_converged']:.1f} (max {s['max_nats_above_converged']:.1f})"
        ok = "yes" if s["max_estimate_minus_exact"] <= 0 else "NO"
        print(
            f"  {name:<52}{above:>22}{s['median_iterations']:>7.0f}"
            f"{s['median_residual']:>8.3f}{ok:>10}"
        )


# --------------------------------------------------------------------------------------------
# (a') the same step in PyTorch, written from the mathematics, in another interpreter
# --------------------------------------------------------------------------------------------

TORCH_STEP = r'''
import json, math, statistics, sys, time
import torch
import torch.autograd.forward_ad as fwAD

repeats = int(sys.argv[1])
torch.set_default_device(sys.argv[2])
torch.manual_seed(0)
S, B, ITER, N = 10, 256, 5, 60000
GEMM_REPEATS = 20
NOISE, HIDDEN, OUT = (40, 40), (420, 420), (957, 500)
D = 784 * 400 + 400 + 400 * 400 + 400 + 400 * 10 + 10
SIGMA, PRIOR_STD = 1e-3, 1.0


class MMLayer(torch.nn.Module):
    """Y = (W_l X + B_l) W_r + B_r on a batch (S, a, b)."""
    def __init__(self, a, b, a2, b2):
        super().__init__()
        self.wl = torch.nn.Parameter(torch.randn(a2, a) / math.sqrt(a))
        self.bl = torch.nn.Parameter(torch.zeros(a2, b))
        self.wr = torch.nn.Parameter(torch.randn(b, b2) / math.sqrt(b))
        self.br = torch.nn.Parameter(torch.zeros(a2, b2))

    def forward(self, x):  # the cheaper order, as implicit_vi.py does
        (a2, a), (b, b2) = self.wl.shape, self.wr.shape
        if a2 * a * b + a2 * b * b2 <= a * b * b2 + a2 * a * b2:
            return (self.wl @ x + self.bl) @ self.wr + self.br
        return self.wl @ (x @ self.wr) + (self.bl @ self.wr + self.br)


class Generator(torch.nn.Module):
    def __init__(self):
        super().__init__()
        shapes = [NOISE, HIDDEN, HIDDEN, HIDDEN, OUT]
        self.layers = torch.nn.ModuleList(MMLayer(*i, *o) for i, o in zip(shapes, shapes[1:]))

    def forward(self, z):
        h = z.view(-1, *NOISE)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = torch.nn.functional.elu(h)
        return h.reshape(h.shape[0], -1)[:, :D]


def mlp_log_lik(theta, x, y):
    shapes = [(400,), (784, 400), (400,), (400, 400), (10,), (400, 10)]
    parts, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        parts.append(theta[start:start + size].view(shape))
        start += size
    b0, w0, b1, w1, b2, w2 = parts
    h = torch.relu(x @ w0 + b0)
    h = torch.relu(h @ w1 + b1)
    return torch.log_softmax(h @ w2 + b2, -1).gather(1, y[:, None]).mean()


gen = Generator()
params = dict(gen.named_parameters())
optimizer = torch.optim.Adam(gen.parameters(), lr=7e-5)
x, y = torch.randn(B, 784), torch.randint(0, 10, (B,))


def smallest_eigvec(z):
    """Krylov Rayleigh-Ritz (k = ITER) on J^T J, no gradient: one vjp graph, a jvp per product."""
    frozen = {k: v.detach() for k, v in params.items()}
    g = lambda u: torch.func.functional_call(gen, frozen, (u,))
    _, vjp_fn = torch.func.vjp(g, z)
    matvec = lambda v: vjp_fn(torch.func.jvp(g, (z,), (v,))[1])[0]
    with torch.no_grad():
        k = ITER + 1
        basis = torch.zeros(S, k, z.shape[1]); images = torch.zeros_like(basis)
        keep = torch.zeros(S, k, dtype=torch.bool)
        cand = torch.randn_like(z)
        for j in range(k):
            before = cand.norm(dim=-1)
            for _ in range(2):
                cand = cand - torch.einsum("skn,sk->sn", basis, torch.einsum("skn,sn->sk", basis, cand))
            norm = cand.norm(dim=-1)
            ok = norm > 1.2e-7 * before
            v = cand * torch.where(ok, 1 / torch.where(ok, norm, torch.ones_like(norm)), torch.zeros_like(norm))[:, None]
            image = matvec(v)
            basis[:, j], images[:, j], keep[:, j] = v, image, ok
            cand = image
        h = torch.einsum("skn,sln->skl", basis, images)
        h = 0.5 * (h + h.transpose(1, 2))
        both = keep[:, :, None] & keep[:, None, :]
        penalty = 2 * h.abs().sum((1, 2), keepdim=True) + 1
        h = torch.where(both, h, torch.zeros_like(h)) + torch.where(torch.eye(k, dtype=torch.bool) & ~keep[:, None, :], penalty, torch.zeros_like(h))
        _, vecs = torch.linalg.eigh(h)
        c = torch.where(keep, vecs[:, :, 0], torch.zeros_like(keep, dtype=h.dtype))
        v = torch.einsum("sk,skn->sn", c, basis)
        return v / v.norm(dim=-1, keepdim=True)


def step():
    z = torch.randn(S, NOISE[0] * NOISE[1])
    v = smallest_eigvec(z)
    with fwAD.dual_level():
        out = gen(fwAD.make_dual(z, v))
        mean, jv = fwAD.unpack_dual(out)
    theta = mean + SIGMA * torch.randn_like(mean)
    log_lik = torch.stack([mlp_log_lik(theta[s], x, y) for s in range(S)]).mean()
    log_prior = (-0.5 * (theta ** 2).sum(-1) / PRIOR_STD ** 2 - 0.5 * D * math.log(2 * math.pi * PRIOR_STD ** 2)).mean()
    d = z.shape[1]
    entropy = (0.5 * d * torch.log((jv ** 2).sum(-1) + SIGMA ** 2)).mean()
    entropy = entropy + 0.5 * D * math.log(2 * math.pi * math.e) + (D - d) * math.log(SIGMA)
    loss = -(log_lik + 8.5e-4 / B * log_prior + entropy / B)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


step(); step()
times = []
for _ in range(repeats):
    start = time.perf_counter(); step(); times.append(time.perf_counter() - start)
# The BLAS rate on the generator's largest product, to tell the algorithm from the library.
a, b = torch.randn(S, OUT[0], HIDDEN[0]), torch.randn(HIDDEN[0], HIDDEN[1])
product = []
for _ in range(GEMM_REPEATS):
    start = time.perf_counter(); a @ b; product.append(time.perf_counter() - start)
if sys.argv[2] == "cuda":
    product = [float("nan")]  # not synchronised: no rate
print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                  "device": str(torch.get_default_device()),
                  "step_seconds": statistics.median(times), "step_seconds_all": times,
                  "gemm_gflops": 2 * a.numel() * HIDDEN[1] / min(product) / 1e9}))
'''  # noqa: E501 (the PyTorch script keeps its own line lengths)


def jax_gemm_gflops(repeats: int = 20) -> float:
    """JAX's BLAS rate on the product the PyTorch script also times: (S, 957, 420) x
    (420, 420), the MNIST generator's largest."""
    a = jax.random.normal(jax.random.key(0), (SAMPLES, 957, 420))
    b = jax.random.normal(jax.random.key(1), (420, 420))
    _, times = timing.median_time(jax.jit(jnp.matmul), a, b, repeats=repeats)
    return 2 * a.size * b.shape[1] / min(times) / 1e9


def run_torch(python: str, repeats: int, device: str = "cpu") -> dict | None:
    if not python or not os.path.exists(python):
        print(f"\n(a') PyTorch comparison skipped: no interpreter at {python!r}")
        return None
    check = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    if check.returncode != 0:
        print(f"\n(a') PyTorch comparison skipped: torch is not importable by {python}")
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(TORCH_STEP)
        script = f.name
    try:
        done = subprocess.run(
            [python, script, str(repeats), device], capture_output=True, text=True, timeout=3000
        )
    finally:
        os.unlink(script)
    if done.returncode != 0:
        print("\n(a') PyTorch comparison failed:\n" + done.stderr[-2000:])
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_torch(result: dict, jax_step: float | None) -> None:
    print(
        f"\n(a') the same step in PyTorch {result['torch']} on {result.get('device', 'cpu')} "
        f"({result['threads']} threads), "
        "written from "
        "the mathematics (same Krylov solver, no readout-Gram factorisation)"
    )
    print(f"  PyTorch step (median)                         {result['step_seconds']:>10.3f}")
    if jax_step:
        print(
            f"  implicit_vi.py step / PyTorch step: {jax_step / result['step_seconds']:.3f} "
            f"(speed-up {result['step_seconds'] / jax_step:.1f}x)"
        )
    if result.get("gemm_gflops") and result.get("jax_gemm_gflops"):
        print(
            "  BLAS on the (10, 957, 420) x (420, 420) product, GFLOP/s: PyTorch "
            f"{result['gemm_gflops']:.0f}, JAX {result['jax_gemm_gflops']:.0f}"
        )
    if result.get("jax_generic_over_torch"):
        print(
            "  implicit_vi.py without the factorisation / PyTorch step: "
            f"{result['jax_generic_over_torch']:.3f}"
        )
    if result.get("levers_over_torch"):
        print("  PyTorch: the paper's solver (5 iterations from a fresh start, all 10 samples);")
        print("  implicit_vi.py with each lever (table (a)), median step / PyTorch median step:")
        for name, ratio in result["levers_over_torch"].items():
            print(f"    {name:<74}{ratio:>7.3f}")


# --------------------------------------------------------------------------------------------
# (b) scaling with the number of generated weights
# --------------------------------------------------------------------------------------------

SCALING_TARGETS = (1e4, 1e5, 1e6, 3e6, 1e7, 3e7)
SCALING_BATCH, SCALING_SAMPLES = 32, 2


def scaling_point(target: float, repeats: int) -> dict:
    """One point, in this (fresh) process: prints a JSON line."""
    baseline = peak_rss_bytes()
    width = max(1, round((target - 10) / 795))  # D = 784 w + w + 10 w + 10
    model = MLP(widths=(width,), num_outputs=10)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 784)))["params"]
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    params["Dense_0"]["kernel"] = jax.random.normal(jax.random.key(0), (784, width)) / 28.0
    params["Dense_1"]["kernel"] = jax.random.normal(jax.random.key(1), (width, 10)) / np.sqrt(width)
    bnn = ivi.ImplicitBNN.from_linen(model, params)
    vi_params = bnn.init(jax.random.key(1))
    del params
    optimizer = optax.adam(1e-4)
    opt_state = optimizer.init(vi_params)
    step = bnn.make_train_step(
        optimizer,
        num_data=60_000,
        num_samples=SCALING_SAMPLES,
        entropy="smallest_sv",
        num_iterations=5,
        tolerance=None,  # exactly 5 iterations, as the table states
    )
    x = jax.random.normal(jax.random.key(2), (SCALING_BATCH, 784))
    y = jax.random.randint(jax.random.key(3), (SCALING_BATCH,), 0, 10)
    seconds, times = timing.median_time(
        step, vi_params, opt_state, jax.random.key(4), (x, y), repeats=repeats
    )
    report = bnn.report()
    return {
        "weights": report.stochastic_params,
        "generator_params": report.generator_params,
        "latent_dim": report.latent_dim,
        "step_seconds": seconds,
        "step_seconds_all": times,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_import_bytes": baseline,
    }


def run_scaling(repeats: int, max_weights: float) -> list[dict]:
    results = []
    for target in [t for t in SCALING_TARGETS if t <= max_weights]:
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--scaling-point",
            str(target),
            "--repeats",
            str(repeats),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"  scaling point {target:.0e} failed:\n{done.stderr[-3000:]}")
            results.append({"target": target, "error": done.stderr[-500:]})
            continue
        point = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"  D = {point['weights']:>11,}  step {point['step_seconds']:.3f} s  "
            f"peak RSS {point['peak_rss_bytes'] / 2**30:.2f} GiB",
            flush=True,
        )
        results.append(point)
    return results


def print_scaling(results: list[dict]) -> None:
    print(
        "\n(b) one ELBO gradient step (Adam) vs generated weights D: MLP 784-w-10, "
        "automatic generator,"
    )
    print(
        f"    smallest_sv 5 iterations, S = {SCALING_SAMPLES}, batch {SCALING_BATCH}; "
        "fresh process per point"
    )
    print(f"  {'D':>12}{'generator':>13}{'step s':>10}{'s per 1e6 D':>13}{'peak RSS GiB':>14}")
    for r in results:
        if "error" in r:
            print(f"  {r['target']:>12.0e}  failed")
            continue
        print(
            f"  {r['weights']:>12,}{r['generator_params']:>13,}{r['step_seconds']:>10.3f}"
            f"{r['step_seconds'] / r['weights'] * 1e6:>13.4f}{r['peak_rss_bytes'] / 2**30:>14.2f}"
        )


# --------------------------------------------------------------------------------------------
# (c) exact against smallest_sv as the latent dimension grows
# --------------------------------------------------------------------------------------------

ENTROPY_SIDES = (2, 4, 6, 8, 12, 16)
ENTROPY_SAMPLES, ENTROPY_BATCH = 4, 64


def run_entropy(repeats: int) -> list[dict]:
    model = MLP(widths=(32,), num_outputs=10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 784)))["params"]
    x = jax.random.normal(jax.random.key(2), (ENTROPY_BATCH, 784))
    y = jax.random.randint(jax.random.key(3), (ENTROPY_BATCH,), 0, 10)
    optimizer = optax.adam(1e-4)
    results = []
    for side in ENTROPY_SIDES:
        bnn = ivi.ImplicitBNN.from_linen(model, params, noise_shape=(side, side))
        vi_params = bnn.init(jax.random.key(1))
        opt_state = optimizer.init(vi_params)
        d = bnn.latent_dim
        row = {"latent_dim": d, "weights": bnn.num_stochastic}
        key = jax.random.key(4)
        for method in ("exact", "smallest_sv"):
            step = bnn.make_train_step(
                optimizer,
                num_data=60_000,
                num_samples=ENTROPY_SAMPLES,
                entropy=method,
                tolerance=None,  # the paper's solver: 5 iterations
            )
            row[f"{method}_step_seconds"], _ = timing.median_time(
                step, vi_params, opt_state, key, (x, y), repeats=repeats
            )
        # Entropy values on the same latent samples (the same key), at initialisation.
        entropy_of = jax.jit(
            lambda p, method, iterations, bnn=bnn, key=key: bnn.loss(
                p,
                key,
                (x, y),
                num_data=60_000,
                num_samples=16,
                entropy=method,
                num_iterations=iterations,
                tolerance=None,
            )[1]["entropy"],
            static_argnums=(1, 2),
        )
        row["exact_entropy"] = float(entropy_of(vi_params, "exact", 5))
        row["smallest_sv_entropy"] = float(entropy_of(vi_params, "smallest_sv", 5))
        row["smallest_sv_converged_entropy"] = float(entropy_of(vi_params, "smallest_sv", d + 1))
        row["gap_nats"] = row["exact_entropy"] - row["smallest_sv_entropy"]
        row["gap_converged_nats"] = row["exact_entropy"] - row["smallest_sv_converged_entropy"]
        print(
            f"  d = {d:>4}: exact {row['exact_step_seconds']:.4f} s, "
            f"smallest_sv {row['smallest_sv_step_seconds']:.4f} s, "
            f"gap {row['gap_nats']:.1f} nats",
            flush=True,
        )
        results.append(row)
    return results


def print_entropy(results: list[dict]) -> None:
    print(
        f"\n(c) exact vs smallest_sv: MLP 784-32-10 (D = {results[0]['weights']:,}), "
        "automatic generator "
        f"with noise k x k, S = {ENTROPY_SAMPLES}, batch {ENTROPY_BATCH}; "
        "entropies at initialisation (nats)"
    )
    print(
        f"  {'d':>5}{'exact s':>10}{'ssv s':>10}{'H exact':>14}{'H ssv(5)':>14}{'gap':>10}"
        f"{'H ssv(conv)':>14}{'gap':>10}"
    )
    for r in results:
        print(
            f"  {r['latent_dim']:>5}{r['exact_step_seconds']:>10.4f}"
            f"{r['smallest_sv_step_seconds']:>10.4f}"
            f"{r['exact_entropy']:>14.1f}{r['smallest_sv_entropy']:>14.1f}{r['gap_nats']:>10.1f}"
            f"{r['smallest_sv_converged_entropy']:>14.1f}{r['gap_converged_nats']:>10.1f}"
        )


# --------------------------------------------------------------------------------------------
# (d) cifar: the training program's step on a CIFAR-10 LeNet, multi-head generator from a
#     configuration file in the published layout
# --------------------------------------------------------------------------------------------

PAPER_PROGRAM = os.path.join(ROOT, "examples", "implicit_vi_paper", "train.py")
CIFAR_CONFIG = os.path.join(ROOT, "examples", "implicit_vi_paper", "configs", "cifar_lenet.yaml")
CIFAR_STEPS = 2  # steps per timed repeat; the solver's warm start is carried between them
CIFAR_CANDIDATES = {
    # name: the training program's flags (its defaults otherwise: batch 256, S = 10, ...)
    "config, library solver": ["--config", CIFAR_CONFIG],
    "config, paper solver": [
        *("--config", CIFAR_CONFIG, "--cold_start", "--solver_tolerance", "none"),
        *("--solver_iterations", "5"),
    ],
    "automatic generator, library solver": [],
    # For the breakdown: the same step without the entropy term (not an ELBO).
    "config, no entropy term": ["--config", CIFAR_CONFIG],
}


def paper_program():
    """examples/implicit_vi_paper/train.py as a module (a script, not an installed package;
    registered in ``sys.modules`` because Flax modules need their module there)."""
    name = "implicit_vi_paper_train"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PAPER_PROGRAM)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def cifar_steps(name: str, flags: list[str]):
    """The training program's step for ``flags``, and a function running CIFAR_STEPS steps
    that returns the solver's iterations per step (max over the samples)."""
    from bdl_examples.paper import build_paper_training

    program = paper_program()
    settings = program.read_settings(
        program.parse_args(["--dataset", "cifar10", "--model", "LeNet", *flags])
    )
    x = jax.random.normal(jax.random.key(2), (settings.train_batch_size, 32, 32, 3))
    y = jax.random.randint(jax.random.key(3), (settings.train_batch_size,), 0, 10)
    bnn, optimizer, train_step = build_paper_training(
        settings, x_example=x[:1], num_classes=10, num_train=50_000
    )
    if name.endswith("no entropy term"):
        train_step = bnn.make_train_step(
            optimizer,
            num_data=50_000,
            num_samples=settings.train_samples,
            entropy=None,
            prior_weight=settings.prob_down_weight / settings.train_batch_size,
        )
    vi_params = bnn.init(jax.random.key(1))
    state = {"params": vi_params, "opt": optimizer.init(vi_params), "eigvecs": None, "step": 0}

    def run():
        iterations = []
        for _ in range(CIFAR_STEPS):
            key = jax.random.fold_in(jax.random.key(4), state["step"])
            eigvecs = None if settings.cold_start else state["eigvecs"]
            state["params"], state["opt"], aux = train_step(
                state["params"], state["opt"], key, (x, y), eigvecs
            )
            state["eigvecs"], state["step"] = aux["eigvecs"], state["step"] + 1
            iterations.append(aux["solver_iterations"])
        return [int(i) for i in jax.block_until_ready(iterations)]

    return bnn, run


def run_cifar(repeats: int) -> dict:
    runs, sizes = {}, {}
    for name, flags in CIFAR_CANDIDATES.items():
        bnn, runs[name] = cifar_steps(name, flags)
        report = bnn.report()
        sizes[name] = {
            "generator_params": report.generator_params,
            "stochastic_params": report.stochastic_params,
            "latent_dim": report.latent_dim,
        }
        runs[name]()  # compile
        runs[name]()  # warm up
    iterations = {name: [] for name in runs}
    times = timing.alternate(
        {
            name: (lambda name=name, run=run: iterations[name].extend(run()))
            for name, run in runs.items()
        },
        repeats,
        steps=CIFAR_STEPS,
    )
    reference = next(iter(runs))
    rows = []
    for name in runs:
        summary = timing.summarize(times[name], reference=times[reference])
        rows.append(
            {
                "candidate": name,
                "flags": CIFAR_CANDIDATES[name],
                **sizes[name],
                "min_step_seconds": summary["min"],
                "median_step_seconds": summary["median"],
                "median_ratio": summary["median_of_ratios"],
                "mean_solver_iterations": statistics.mean(iterations[name]),
                "step_seconds": summary["all"],
            }
        )
    return {
        "network": "LeNet-5 on 32x32x3 (CIFAR-10)",
        "config": os.path.relpath(CIFAR_CONFIG, ROOT),
        "batch": 256,
        "samples": 10,
        "steps_per_repeat": CIFAR_STEPS,
        "ratio_reference": reference,
        "rows": rows,
    }


def print_cifar(result: dict) -> None:
    print(
        f"\n(d) cifar: the training program's step, {result['network']}, batch "
        f"{result['batch']}, S = {result['samples']}; ratio = median per-repeat ratio to "
        f"'{result['ratio_reference']}'"
    )
    print(
        f"  {'candidate':<38}{'gen. params':>12}{'d':>6}{'solver it.':>11}{'min s':>9}"
        f"{'median s':>10}{'ratio':>8}"
    )
    for r in result["rows"]:
        print(
            f"  {r['candidate']:<38}{r['generator_params']:>12,}{r['latent_dim']:>6}"
            f"{r['mean_solver_iterations']:>11.1f}{r['min_step_seconds']:>9.3f}"
            f"{r['median_step_seconds']:>10.3f}{r['median_ratio']:>7.2f}x"
        )


# --------------------------------------------------------------------------------------------
# (e) the bound over a training run: the estimate against the exact entropy
# --------------------------------------------------------------------------------------------

BOUND_GENERATOR = ivi.MMGenerator((16, 16), (32, 32), 1, (200, 131))  # d = 256, full rank
BOUND_STEPS, BOUND_EVERY, BOUND_SAMPLES, BOUND_BATCH = 400, 25, 4, 64
BOUND_RUNS = {
    "before: 5 iterations from a fresh start": (dict(tolerance=None, num_iterations=5), False),
    "after: warm start, tolerance 0.1, cap 20 (defaults)": ({}, True),
}


def run_bound() -> dict:
    """Digits (scikit-learn's 8x8 images) with an MLP 64-128-128-10 (D = 26,122) and an MM
    generator with d = 256; the proper per-data-point ELBO, Adam 1e-3. Every BOUND_EVERY steps
    the exact entropy and the bound with the solver run to convergence are evaluated on the
    training step's own latent samples (the same key)."""
    from sklearn.datasets import load_digits

    # All 1,797 images are the pool the batches are drawn from (as for the table in
    # bench/README.md): no test split is needed, so not the harness's load_digits_split.
    images, labels = load_digits(return_X_y=True)
    images = jnp.asarray(images / 16.0, jnp.float32)
    labels = jnp.asarray(labels)
    model = MLP(widths=(128, 128), num_outputs=10)
    params = model.init(jax.random.key(0), images[:1])["params"]
    bnn = ivi.ImplicitBNN.from_linen(model, params, generator=BOUND_GENERATOR)
    d = bnn.latent_dim
    optimizer = optax.adam(1e-3)
    common = dict(num_data=len(labels), num_samples=BOUND_SAMPLES)

    @partial(jax.jit, static_argnums=2)
    def reference(vi_params, key, method):
        options = dict(entropy="exact") if method == "exact" else dict(tolerance=None)
        batch = (images[:BOUND_BATCH], labels[:BOUND_BATCH])
        return bnn.loss(vi_params, key, batch, num_iterations=d - 1, **common, **options)[1][
            "entropy"
        ]

    rng = np.random.default_rng(0)
    batches = [rng.integers(0, len(labels), BOUND_BATCH) for _ in range(BOUND_STEPS)]
    result = {"latent_dim": d, "weights": bnn.num_stochastic, "runs": {}}
    for name, (options, warm) in BOUND_RUNS.items():
        step = bnn.make_train_step(optimizer, **common, **options)
        vi_params = bnn.init(jax.random.key(1))
        opt_state, eigvecs = optimizer.init(vi_params), None
        rows = []
        for i, idx in enumerate(batches):
            key = jax.random.key(10_000 + i)
            new_params, opt_state, aux = step(
                vi_params, opt_state, key, (images[idx], labels[idx]), eigvecs
            )
            eigvecs = aux["eigvecs"] if warm else None
            row = {
                "step": i,
                "estimate": float(aux["entropy"]),
                "iterations": int(aux["solver_iterations"]),
                "residual": float(aux["solver_residual"]),
            }
            if i % BOUND_EVERY == 0 or i == BOUND_STEPS - 1:
                row["exact"] = float(reference(vi_params, key, "exact"))
                row["converged_bound"] = float(reference(vi_params, key, "smallest_sv"))
            rows.append(row)
            vi_params = new_params
        evaluated = [r for r in rows if "exact" in r]
        result["runs"][name] = {
            "options": options,
            "warm_start": warm,
            "rows": rows,
            "max_estimate_minus_exact": max(r["estimate"] - r["exact"] for r in evaluated),
            "mean_abs_estimate_minus_converged": float(
                np.mean([abs(r["estimate"] - r["converged_bound"]) for r in evaluated])
            ),
            "steps_above_exact": sum(r["estimate"] > r["exact"] for r in evaluated),
            "evaluated_steps": len(evaluated),
            "median_iterations": float(np.median([r["iterations"] for r in rows])),
        }
        print(f"  {name}: done", flush=True)
    plot_bound(result)
    return result


def plot_bound(result: dict) -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for (name, run), color in zip(result["runs"].items(), ("tab:red", "tab:blue")):
        evaluated = [r for r in run["rows"] if "exact" in r]
        steps = [r["step"] for r in evaluated]
        label = name.split(":")[0]
        axes[0].plot(
            steps,
            [r["estimate"] - r["exact"] for r in evaluated],
            "o-",
            color=color,
            label=f"{label}: estimate",
        )
        axes[0].plot(
            steps,
            [r["converged_bound"] - r["exact"] for r in evaluated],
            ":",
            color=color,
            label=f"{label}: converged bound",
        )
        axes[1].plot([r["iterations"] for r in run["rows"]], color=color, label=label)
    axes[0].axhline(0.0, color="black", lw=0.8)
    axes[0].set(xlabel="training step", ylabel="entropy - exact entropy (nats)")
    axes[0].set_title("a lower bound stays below 0")
    axes[1].set(xlabel="training step", ylabel="eigen-solver iterations", yscale="log")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(
        f"smallest_sv entropy, digits MLP (D = {result['weights']:,}), d = {result['latent_dim']}"
    )
    path = save_figure(fig, os.path.join(ROOT, "bench", "results", "implicit_vi_bound.png"))
    result["plot"] = os.path.relpath(path, ROOT)


def print_bound(result: dict) -> None:
    print(
        f"\n(e) the bound over a training run: digits MLP 64-128-128-10 (D = "
        f"{result['weights']:,}), MM generator d = {result['latent_dim']}, S = {BOUND_SAMPLES}, "
        f"{BOUND_STEPS} steps; entropies (nats) on the step's own latents"
    )
    names = list(result["runs"])
    runs = [result["runs"][n] for n in names]
    print(
        f"  {'step':>5}" + "".join(f"{h:>12}" for h in ("exact", "conv.", "estimate", "iters")) * 2
    )
    for rows in zip(*(r["rows"] for r in runs)):
        if "exact" not in rows[0]:
            continue
        line = f"  {rows[0]['step']:>5}"
        for r in rows:
            line += (
                f"{r['exact']:>12.1f}{r['converged_bound']:>12.1f}{r['estimate']:>12.1f}"
                f"{r['iterations']:>12}"
            )
        print(line)
    print("  (left: " + names[0] + "; right: " + names[1] + ")")
    for name, run in zip(names, runs):
        print(
            f"  {name}: estimate above the exact entropy at {run['steps_above_exact']} of "
            f"{run['evaluated_steps']} evaluations (max {run['max_estimate_minus_exact']:+.1f}"
            f" nats); mean |estimate - converged| {run['mean_abs_estimate_minus_converged']:.1f}"
            f" nats; median iterations {run['median_iterations']:.0f}"
        )
    print(f"  plot: {result.get('plot')}")


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--parts",
        default="mnist,scaling,entropy",
        help="comma-separated: mnist,torch,spectrum,scaling,entropy,cifar,bound",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--torch", default="", help="python interpreter with torch, for the PyTorch comparison"
    )
    parser.add_argument(
        "--torch-device", default="cpu", help="torch device for the PyTorch step: cpu or cuda"
    )
    parser.add_argument("--max-weights", type=float, default=3e7)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "implicit_vi.json"))
    parser.add_argument("--scaling-point", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 5 and args.scaling_point is None:
        parser.error("--repeats must be >= 5")
    if args.scaling_point is not None:
        print(json.dumps(scaling_point(args.scaling_point, args.repeats)))
        return

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if args.torch and "torch" not in parts:
        parts.append("torch")
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    results["machine"] = timing.machine()
    # With both, PyTorch runs before and after the JAX part, so that a drift in the shared
    # machine's load affects both sides alike.
    torch_before = (
        run_torch(args.torch, args.repeats, args.torch_device)
        if {"mnist", "torch"} <= set(parts)
        else None
    )
    if "mnist" in parts:
        results["mnist"] = run_mnist(args.repeats)
        print_mnist(results["mnist"])
    if "torch" in parts:
        torch_result = run_torch(args.torch, args.repeats, args.torch_device)
        if torch_result is not None and torch_before is not None:
            times = torch_before["step_seconds_all"] + torch_result["step_seconds_all"]
            torch_result.update(
                gemm_gflops=max(torch_before["gemm_gflops"], torch_result["gemm_gflops"]),
                step_seconds_all=times,
                step_seconds=statistics.median(times),
                runs="before and after the JAX part",
            )
        if torch_result is not None:
            jax_step = results.get("mnist", {}).get("step_seconds")
            torch_result["jax_over_torch"] = (
                jax_step / torch_result["step_seconds"] if jax_step else None
            )
            generic = results.get("mnist", {}).get("step_generic_jtj_seconds")
            torch_result["jax_generic_over_torch"] = (
                generic / torch_result["step_seconds"] if generic else None
            )
            levers = results.get("mnist", {}).get("levers", {})
            torch_result["levers_over_torch"] = {
                name: lever["median_seconds"] / torch_result["step_seconds"]
                for name, lever in levers.items()
                if "median_seconds" in lever
            }
            torch_result["jax_gemm_gflops"] = jax_gemm_gflops()
            results["torch"] = torch_result
            print_torch(torch_result, jax_step)
    if "scaling" in parts:
        print("\n(b) scaling (each point in a fresh process)")
        results["scaling"] = run_scaling(args.repeats, args.max_weights)
        print_scaling(results["scaling"])
    if "entropy" in parts:
        print("\n(c) exact vs smallest_sv")
        results["entropy"] = run_entropy(args.repeats)
        print_entropy(results["entropy"])
    if "spectrum" in parts:
        results["spectrum"] = run_spectrum()
        print_spectrum(results["spectrum"])
    if "bound" in parts:
        results["bound"] = run_bound()
        print_bound(results["bound"])
    if "cifar" in parts:
        results["cifar"] = run_cifar(args.repeats)
        print_cifar(results["cifar"])
    print(f"\nwrote {os.path.relpath(timing.write_json(args.out, results))}")


if __name__ == "__main__":
    main()
