"""Speed and accuracy of implicit_vi.py's training step and entropy estimators.

Parts:
  mnist    the paper's MNIST configuration: the MM generator of
           examples/implicit_vi_paper/configs/mnist_mlp.yaml (noise 40x40, hidden 420x420,
           n_hidden 2, output 957x500; 3,130,380 parameters) for an MLP 784-400-400-10
           (478,410 weights), the paper's model (weight noise 1e-3, prior N(0, 1); the
           generator's output calibrated, the library's and the training program's default)
           and weights (kl_weight N / B, prior_scale 8.5e-4), batch 256,
           S = 10 samples, one Adam step. Candidates, taking turns within every repeat, each
           carrying its state (and the solver's warm start) through consecutive steps:
           the paper's solver (5 iterations from a fresh start on all 10 samples), the
           library's default SmallestSingularValue() (warm start, tolerance 0.1, cap 20, on 1
           sample), the same converged solver on all 10 samples, and the paper's 5 iterations
           warm-started on 1 sample; and, for a breakdown by difference against the paper's
           step, a step whose loss only uses the generated weights (generator) and one
           without the entropy term (generator + likelihood + prior; not an ELBO). Also the
           weight noise of the 10 samples as implicit_vi draws it against jax.random.normal.
  variance the spread over 8 keys, at initialisation, of the entropy estimate and of the loss
           gradient for the entropy on K = 1, 2, 10 of the 10 samples (same model, the solver
           run to its tolerance), with the paper's weights and with the ELBO's (kl_weight 1).
  spectrum (not in the default set) the solvers' error on the same generator at
           initialisation: J^T J formed explicitly at --spectrum-latents latents and
           diagonalised in float64; for the paper's solver, its 5 iterations warm-started and
           the library's default, how many nats the entropy bound d/2 log(s_min^2 + 1) of
           the whitened generator g / s (as the library computes it) lies above its value at
           the exact smallest eigenvalue (warm starts carried from latent to latent; the
           second half of the latents reported), and that value's distance below the exact
           log-determinant term.
  solver   (not in the default set) where a solver iteration's time goes, on the MNIST
           generator MMGenerator((40, 40), (420, 420), 2, (957, 500)) at one latent:
           smallest_singular_value with 5 and 20 iterations (no tolerance), the linearisation
           with 1 and 20 products v -> J^T J v and no solver, smallest_eigenpair on a dense
           1600 x 1600 operator (its own overhead), 20 eigendecompositions of a 21 x 21 matrix
           (the solver's Ritz step) and an empty 20-iteration while loop.
  torch    (with --torch PYTHON) the paper's step written in PyTorch from the mathematics, run
           in a separate interpreter (e.g. /tmp/torchvenv/bin/python with torch installed)
           before and after the mnist part, for ratios measured on the same machine in the
           same run. Skipped when torch is missing.
  scaling  one training step (Adam) for an MLP 784-w-10 whose width w sets the number of
           generated weights D from 1e4 to 3e7, with the library's defaults (automatic
           generator, learned weight noise), SmallestSingularValue(5, None) on both of S = 2
           samples, batch 32: time, and peak resident memory (ru_maxrss) of a fresh
           subprocess per point.
  entropy  ExactEntropy against SmallestSingularValue (5 iterations) on all S = 4 samples as
           the latent size d grows (D = 25,450: an MLP 784-32-10, the library's defaults with
           the automatic generator's noise k x k): time per training step, taking turns, and
           the gap between the two entropies at initialisation (and with the solver run to
           convergence, which separates the bound's looseness from the solver's error).
  bound    (not in the default set) the entropy estimate against the exact entropy over a
           whole training run (digits, MLP 64-128-128-10 with the library's defaults and an
           MM generator with d = 256, S = 4, 400 Adam steps), with the paper's solver (5
           iterations from a fresh start on all 4 samples) and the library's default (warm
           start, tolerance, cap, 1 sample), with the bound's converged value; writes
           implicit_vi_bound.png next to the JSON (bench/results/).
  cifar    (not in the default set) the training program's step
           (examples/implicit_vi_paper/train.py: LeNet-5, batch 256, S = 10, amsgrad, the
           paper's weights) on CIFAR-10-shaped inputs, with the multi-head generator of
           examples/implicit_vi_paper/configs/cifar_lenet.yaml (the published layout) and the
           library's solver, against the same with the paper's solver (5 iterations from a
           fresh start on all 10 samples), with the automatic generator, and without the
           entropy term; the candidates take turns.

Where candidates are compared they take turns within every repeat, in an order that reverses
between repeats (bench/timing.py), after compilation and warm-up steps; each figure is given as
the minimum and the median over repeats and as a ratio to a reference timed in the same run.

Usage:
  python bench/bench_implicit_vi.py                         # mnist, variance, scaling, entropy
  python bench/bench_implicit_vi.py --parts mnist --torch /tmp/torchvenv/bin/python
  python bench/bench_implicit_vi.py --parts spectrum --spectrum-latents 16
  python bench/bench_implicit_vi.py --parts scaling --max-weights 3e7
  python bench/bench_implicit_vi.py --parts cifar --out bench/results/implicit_vi_cifar.json
Prints a table per part and merges the results into bench/results/implicit_vi.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import timing
from bdl_examples.models import MLP
from bdl_examples.plots import pyplot, save_figure

import implicit_vi as ivi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "examples", "implicit_vi_paper", "configs")
RESULTS = os.path.join(ROOT, "bench", "results")
SSV = ivi.SmallestSingularValue


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def generator_from_file(name: str, trunk_shapes=None):
    """The generator of a configuration file in the paper's published layout."""
    import yaml
    from bdl_examples.paper_config import generator_from_config

    with open(os.path.join(CONFIGS, name)) as f:
        return generator_from_config(yaml.safe_load(f), trunk_shapes=trunk_shapes)


def unit_rows(key, shape) -> jax.Array:
    rows = jax.random.normal(key, shape)
    return rows / jnp.linalg.norm(rows, axis=-1, keepdims=True)


class Stepper:
    """Consecutive training steps of ``trainer`` on one batch, the state carried from call to
    call; ``warm=False`` starts the solver from the same random vectors at every step (a
    fresh start, as the paper's solver) instead of the previous step's."""

    def __init__(self, trainer: ivi.Trainer, batch, *, warm: bool = True, seed: int = 1):
        self.trainer, self.batch, self.warm = trainer, batch, warm
        self.state = trainer.init(jax.random.key(seed))
        self.cold_vectors = unit_rows(jax.random.key(seed + 1), self.state.solver_vectors.shape)
        self.count, self.infos = 0, []

    def __call__(self):
        if not self.warm:
            self.state = self.state._replace(solver_vectors=self.cold_vectors)
        key = jax.random.key(100 + self.count)
        self.state, info = self.trainer.step(key, self.state, self.batch)
        self.count += 1
        self.infos.append(info)
        return self.state

    def solver_medians(self) -> tuple[float, float]:
        """Median over the recorded steps of the solver's iterations and residual."""
        iterations = [int(i.solver_iterations) for i in self.infos]
        residuals = [float(i.solver_residual) for i in self.infos]
        return statistics.median(iterations), statistics.median(residuals)


def partial_steps(bnn, optimizer, *, num_data: int, num_samples: int, prior_weight: float):
    """Two steps for a breakdown by difference (not ELBOs): ``generator``, whose loss only
    uses the S generated weight vectors (a fixed linear readout), and ``no entropy``, the
    likelihood and the prior (``prior_weight`` times the mean log-prior) without the entropy
    term; each ``step(vi_params, opt_state, key, batch) -> (vi_params, opt_state)``."""
    model = bnn.model
    readout = jax.random.normal(jax.random.key(5), (bnn.num_stochastic,))

    def generator_loss(vi_params, key, batch):
        theta, _ = ivi._draw(model, vi_params, jax.random.split(key, num_samples))
        return jnp.mean(theta @ readout)

    def no_entropy_loss(vi_params, key, batch):
        theta, _ = ivi._draw(model, vi_params, jax.random.split(key, num_samples))
        inputs, targets = batch

        def log_likelihood(theta_one):
            outputs = model.apply_fn(
                model.layout.assemble(theta_one, vi_params.deterministic), inputs
            )
            return jnp.mean(model.likelihood.log_prob(vi_params.likelihood, outputs, targets))

        prior_std = ivi._per_parameter(model.layout, model.prior_std, theta.dtype)
        log_prior = jnp.mean(ivi.gaussian_log_prior(theta, prior_std))
        return -(jnp.mean(jax.vmap(log_likelihood)(theta)) + prior_weight * log_prior)

    def make_step(loss):
        @jax.jit
        def step(vi_params, opt_state, key, batch):
            grads = jax.grad(loss)(vi_params, key, batch)
            updates, opt_state = optimizer.update(grads, opt_state, vi_params)
            return optax.apply_updates(vi_params, updates), opt_state

        return step

    return {"generator": make_step(generator_loss), "no entropy": make_step(no_entropy_loss)}


def compare(candidates: dict, repeats: int, reference: str, warmup: int = 3) -> dict:
    """Warm-up calls, then ``timing.alternate``; per candidate its min, median and ratios to
    ``reference`` (median of the per-repeat ratios, ratio of the minima)."""
    for run in candidates.values():
        for _ in range(warmup):  # the first call compiles
            jax.block_until_ready(run())
    for run in candidates.values():
        getattr(run, "infos", []).clear()
    times = timing.alternate(candidates, repeats)
    rows = {}
    for name, run in candidates.items():
        summary = timing.summarize(times[name], reference=times[reference])
        rows[name] = {
            "min_seconds": summary["min"],
            "median_seconds": summary["median"],
            "ratio": summary["median_of_ratios"],
            "ratio_of_minima": summary["ratio_of_minima"],
            "seconds_all": summary["all"],
        }
        if isinstance(run, Stepper):
            rows[name]["solver_iterations"], rows[name]["solver_residual"] = run.solver_medians()
    return rows


# --------------------------------------------------------------------------------------------
# (a) the paper's MNIST configuration
# --------------------------------------------------------------------------------------------

BATCH, SAMPLES, ITERATIONS, NUM_DATA = 256, 10, 5, 60_000
# The paper's model (with the calibrated generator output of the library and the training
# program) and weights: w_H = 1 / B, w_p = 8.5e-4 / B.
PAPER_MODEL = dict(weight_noise=1e-3, prior_std=1.0)
PAPER_WEIGHTS = dict(kl_weight=NUM_DATA / BATCH, prior_scale=8.5e-4)
PAPER_SOLVER = SSV(num_iterations=ITERATIONS, tolerance=None, num_samples=SAMPLES)
# name -> (entropy estimator, warm start)
MNIST_SOLVERS = {
    "paper: 5 iterations from a fresh start, all 10 samples": (PAPER_SOLVER, False),
    "library default: warm, tolerance 0.1, cap 20, 1 sample": (SSV(), True),
    # looser tolerances: what a default within 0.15x of PyTorch's paper step would cost in nats
    "warm, tolerance 0.2, cap 20, 1 sample": (SSV(20, 0.2), True),
    "warm, tolerance 0.3, cap 20, 1 sample": (SSV(20, 0.3), True),
    "converged: warm, tolerance 0.1, cap 20, all 10 samples": (SSV(num_samples=SAMPLES), True),
    "paper's 5 iterations, warm, 1 sample": (SSV(ITERATIONS, None, 1), True),
    # the default's estimator run to its tolerance: the cap out of the way
    "converged: warm, tolerance 0.1, cap 200, 1 sample": (SSV(200), True),
    "converged: warm, tolerance 0.03, cap 200, 1 sample": (SSV(200, 0.03), True),
}
PAPER = next(iter(MNIST_SOLVERS))


def mnist_bnn():
    model = MLP(widths=(400, 400), num_outputs=10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 784)))["params"]
    generator = generator_from_file("mnist_mlp.yaml", trunk_shapes=[])
    return ivi.ImplicitBNN.from_linen(model, params, generator=generator, **PAPER_MODEL)


def mnist_batch():
    x = jax.random.normal(jax.random.key(2), (BATCH, 784))
    return x, jax.random.randint(jax.random.key(3), (BATCH,), 0, 10)


def run_mnist(repeats: int) -> dict:
    bnn = mnist_bnn()
    batch = mnist_batch()
    optimizer = optax.adam(7e-5)
    candidates = {}
    for name, (entropy, warm) in MNIST_SOLVERS.items():
        trainer = bnn.trainer(
            optimizer, num_data=NUM_DATA, num_samples=SAMPLES, entropy=entropy, **PAPER_WEIGHTS
        )
        candidates[name] = Stepper(trainer, batch, warm=warm)
    vi_params = bnn.init(jax.random.key(1))
    opt_state = optimizer.init(vi_params)
    prior_weight = PAPER_WEIGHTS["kl_weight"] * PAPER_WEIGHTS["prior_scale"] / NUM_DATA
    steps = partial_steps(
        bnn, optimizer, num_data=NUM_DATA, num_samples=SAMPLES, prior_weight=prior_weight
    )
    for name, step in steps.items():
        candidates[f"({name})"] = partial(step, vi_params, opt_state, jax.random.key(4), batch)
    rows = compare(candidates, repeats, reference=PAPER)
    return {
        "config": {
            "generator": "examples/implicit_vi_paper/configs/mnist_mlp.yaml, trunk_shapes=[]",
            "generator_params": bnn.num_generator_params(),
            "network": "MLP 784-400-400-10",
            "network_params": bnn.num_stochastic,
            "model": PAPER_MODEL,
            "weights": PAPER_WEIGHTS,
            "batch": BATCH,
            "samples": SAMPLES,
            "optimizer": "adam",
        },
        "candidates": rows,
        "output_noise_seconds": time_output_noise(bnn.num_stochastic, repeats),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def time_output_noise(size: int, repeats: int) -> dict:
    """The S weight-noise vectors of a step (S x D normals), as implicit_vi draws them and
    with jax.random.normal, taking turns; min and median seconds and the ratio."""
    keys = jax.random.split(jax.random.key(6), SAMPLES)
    draws = {
        "implicit_vi": jax.jit(lambda k: ivi._normal_rows(k, size, jnp.float32)),
        "jax.random.normal": jax.jit(
            jax.vmap(lambda k: jax.random.normal(k, (size,), jnp.float32))
        ),
    }
    candidates = {name: partial(draw, keys) for name, draw in draws.items()}
    return compare(candidates, 3 * repeats, reference="jax.random.normal", warmup=2)


def print_mnist(result: dict) -> None:
    config = result["config"]
    print(
        f"\n(a) the paper's MNIST step: MLP 784-400-400-10, MM generator "
        f"{config['generator_params']:,} params, batch {BATCH}, S = {SAMPLES}, one Adam step;"
    )
    print(f"    ratio = median of the per-repeat ratios to '{PAPER}'")
    print(f"  {'candidate':<58}{'min s':>8}{'median s':>9}{'ratio':>7}{'iters':>6}{'resid.':>8}")
    for name, r in result["candidates"].items():
        its = r.get("solver_iterations")
        solver = f"{its:>6.0f}{r['solver_residual']:>8.3f}" if its is not None else ""
        print(
            f"  {name:<58}{r['min_seconds']:>8.3f}{r['median_seconds']:>9.3f}"
            f"{r['ratio']:>7.2f}{solver}"
        )
    rows = result["candidates"]
    generator = rows["(generator)"]["ratio"]
    no_entropy = rows["(no entropy)"]["ratio"]
    print(
        f"  shares of the paper's step: generator {generator:.2f}, likelihood + prior "
        f"{no_entropy - generator:.2f}, entropy {1 - no_entropy:.2f}"
    )
    noise = result.get("output_noise_seconds")
    if noise:
        mine, jax_normal = noise["implicit_vi"], noise["jax.random.normal"]
        print(
            f"  weight noise of the {SAMPLES} samples, min / median s: implicit_vi "
            f"{mine['min_seconds']:.3f} / {mine['median_seconds']:.3f}, jax.random.normal "
            f"{jax_normal['min_seconds']:.3f} / {jax_normal['median_seconds']:.3f} "
            f"(ratio {mine['ratio']:.2f})"
        )


# --------------------------------------------------------------------------------------------
# (a') the entropy on K of the S samples: spread over keys
# --------------------------------------------------------------------------------------------

VARIANCE_WEIGHTS = {
    "the paper's weights (kl_weight N / B, prior_scale 8.5e-4)": (
        PAPER_WEIGHTS["kl_weight"],
        PAPER_WEIGHTS["prior_scale"],
    ),
    "the ELBO (kl_weight 1)": (1.0, 1.0),
}


def run_variance(num_keys: int = 8) -> dict:
    """Spread over keys of the entropy estimate and of the loss gradient, for the entropy on
    K of the S = 10 samples (the solver run to its tolerance, 40 iterations at most, from a
    fresh start)."""
    bnn = mnist_bnn()
    model, batch = bnn.model, mnist_batch()
    vi_params = bnn.init(jax.random.key(1))
    result = {name: {} for name in VARIANCE_WEIGHTS}
    for k in (1, 2, SAMPLES):
        entropy = SSV(num_iterations=40, num_samples=k)

        @jax.jit
        def gradient(vi_params, key, vectors, kl_weight, prior_scale, entropy=entropy):
            loss = partial(
                ivi.elbo_loss, model, key=key, batch=batch, solver_vectors=vectors,
                num_data=NUM_DATA, num_samples=SAMPLES, entropy=entropy, kl_weight=kl_weight,
                prior_scale=prior_scale,
            )  # fmt: skip
            grads, (info, _) = jax.grad(loss, has_aux=True)(vi_params)
            return grads, info.entropy

        for name, (kl_weight, prior_scale) in VARIANCE_WEIGHTS.items():
            grads, entropies = [], []
            for i in range(num_keys):
                vectors = unit_rows(jax.random.key(2000 + i), (k, bnn.latent_dim))
                grad, value = gradient(
                    vi_params, jax.random.key(1000 + i), vectors, kl_weight, prior_scale
                )
                grads.append(np.concatenate([np.ravel(g) for g in jax.tree.leaves(grad)]))
                entropies.append(float(value))
            grads = np.stack(grads)
            mean = grads.mean(0)
            result[name][str(k)] = {
                "entropy_std_nats": float(np.std(entropies, ddof=1)),
                "gradient_relative_variance": float(
                    np.mean(np.sum((grads - mean) ** 2, axis=1)) / np.sum(mean**2)
                ),
            }
        print(f"  K = {k}: done", flush=True)
    return result


def print_variance(result: dict) -> None:
    print(
        f"\n(a') the entropy on K of the {SAMPLES} samples of the paper's MNIST step: spread "
        "over 8 keys at initialisation"
    )
    print(f"  {'K':>4}{'entropy std (nats)':>20}{'loss-gradient relative variance':>34}")
    for label, rows in result.items():
        print(f"  {label}")
        for k, r in rows.items():
            print(f"  {k:>4}{r['entropy_std_nats']:>20.2f}{r['gradient_relative_variance']:>34.4f}")


# --------------------------------------------------------------------------------------------
# (a'') the solvers' error on the paper's MNIST generator, against the explicit spectrum
# --------------------------------------------------------------------------------------------

# name -> (estimator, warm start)
SPECTRUM_SOLVERS = {
    "paper: 5 iterations from a fresh start": (SSV(ITERATIONS, None), False),
    "paper's 5 iterations, warm start": (SSV(ITERATIONS, None), True),
    "library default: warm, tolerance 0.1, cap 20": (SSV(), True),
    "warm, tolerance 0.2, cap 20": (SSV(20, 0.2), True),
    "warm, tolerance 0.3, cap 20": (SSV(20, 0.3), True),
    "converged: warm, tolerance 0.1, cap 200": (SSV(200), True),
    "converged: warm, tolerance 0.03, cap 200": (SSV(200, 0.03), True),
}


def explicit_jtj(bnn, gen_params, z, chunk: int = 100) -> np.ndarray:
    """J^T J (d x d, float64) of the generated means g(z) at one latent z (1, d), column by
    column through the linearisation and its transpose, the product the solver uses."""
    mean_fn = partial(ivi.generator_mean, bnn.model, gen_params)
    _, forward = jax.linearize(mean_fn, z)
    backward = jax.linear_transpose(forward, z)
    columns = jax.jit(jax.vmap(lambda u: backward(forward(u[None]))[0][0]))
    d = z.shape[1]
    eye = np.eye(d, dtype=np.float32)
    a = np.concatenate([np.asarray(columns(eye[i : i + chunk])) for i in range(0, d, chunk)])
    return 0.5 * (a + a.T).astype(np.float64)


def run_spectrum(num_latents: int = 16) -> dict:
    """How far each solver setting's bound d/2 log(s_min^2 + 1) of the whitened generator
    g / s lies above its value at the exact smallest eigenvalue, and that value below the
    exact log-determinant term 1/2 log det(J^T J / s^2 + I), on the paper's MNIST generator at
    initialisation: J^T J formed explicitly at ``num_latents`` latents and diagonalised in
    float64; the solvers run through the library's estimator on the generator itself, the
    warm-started ones carrying their vector from one latent to the next (as consecutive
    training steps do), reported from the second half of the latents on (their steady
    state)."""
    bnn = mnist_bnn()
    vi_params = bnn.init(jax.random.key(1))
    s2 = float(bnn.model.weight_noise[0]) ** 2  # one fixed noise std for every weight
    d = bnn.latent_dim

    def whitened(gen_params, z):
        return ivi.generator_mean(bnn.model, gen_params, z) / np.sqrt(s2)

    estimators = {
        name: jax.jit(partial(solver.estimate, whitened, vi_params.generator, sigma=1.0))
        for name, (solver, _) in SPECTRUM_SOLVERS.items()
    }
    vectors = {name: None for name in SPECTRUM_SOLVERS}
    rows = []
    for i in range(num_latents):
        z = jax.random.normal(jax.random.key(200 + i), (1, d))
        eigenvalues = np.linalg.eigvalsh(explicit_jtj(bnn, vi_params.generator, z)) / s2
        converged = 0.5 * d * np.log(eigenvalues[0] + 1.0)
        row = {
            "latent": i,
            "smallest_eigenvalues_whitened": eigenvalues[:4].tolist(),
            "largest_eigenvalue_whitened": float(eigenvalues[-1]),
            "exact_log_det_term": float(0.5 * np.sum(np.log(eigenvalues + 1.0))),
            "converged_bound": float(converged),
            "settings": {},
        }
        for name, (_, warm) in SPECTRUM_SOLVERS.items():
            start = vectors[name] if warm else None
            if start is None:  # a fresh start, or the first latent of a warm chain
                start = unit_rows(jax.random.key(300 + i), (1, d))
            estimate = estimators[name](z=z, x0=start)
            vectors[name] = estimate.vectors
            value = float(estimate.half_log_det[0])
            row["settings"][name] = {
                "estimate": value,
                "nats_above_converged": value - float(converged),
                "iterations": int(estimate.iterations[0]),
                "residual": float(estimate.residual[0]),
            }
        rows.append(row)
        print(f"  latent {i}: done", flush=True)
    steady = rows[num_latents // 2 :]
    summary = {}
    for name in SPECTRUM_SOLVERS:
        later = [r["settings"][name] for r in steady]
        above = [s["nats_above_converged"] for s in later]
        summary[name] = {
            "mean_nats_above_converged": float(np.mean(above)),
            "max_nats_above_converged": float(np.max(above)),
            "median_iterations": float(np.median([s["iterations"] for s in later])),
            "median_residual": float(np.median([s["residual"] for s in later])),
            "max_estimate_minus_exact": float(
                max(r["settings"][name]["estimate"] - r["exact_log_det_term"] for r in steady)
            ),
        }
    return {
        "latent_dim": d,
        "weight_noise": float(np.sqrt(s2)),
        "reported_latents": [r["latent"] for r in steady],
        "rows": rows,
        "summary": summary,
        "mean_exact_minus_converged": float(
            np.mean([r["exact_log_det_term"] - r["converged_bound"] for r in rows])
        ),
    }


def print_spectrum(result: dict) -> None:
    first = result["rows"][0]
    print(
        f"\n(a'') solver error on the paper's MNIST generator at initialisation (d = "
        f"{result['latent_dim']}, whitened by s = {result['weight_noise']:g}), J^T J explicit "
        f"at {len(result['rows'])} latents, latents {result['reported_latents'][0]}-"
        f"{result['reported_latents'][-1]} reported"
    )
    print(
        "  whitened smallest eigenvalues "
        f"{np.round(first['smallest_eigenvalues_whitened'], 1).tolist()}, largest "
        f"{first['largest_eigenvalue_whitened']:.4g}; the bound at the exact smallest eigenvalue "
        f"lies {result['mean_exact_minus_converged']:.0f} nats below the exact log-det term"
    )
    print(f"  {'setting':<48}{'nats above converged':>22}{'iters':>7}{'resid.':>8}{'<= exact':>10}")
    for name, s in result["summary"].items():
        above = f"{s['mean_nats_above_converged']:.1f} (max {s['max_nats_above_converged']:.1f})"
        ok = "yes" if s["max_estimate_minus_exact"] <= 0 else "NO"
        print(
            f"  {name:<48}{above:>22}{s['median_iterations']:>7.0f}"
            f"{s['median_residual']:>8.3f}{ok:>10}"
        )


# --------------------------------------------------------------------------------------------
# (a''') the same step in PyTorch, written from the mathematics, in another interpreter
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


def run_solver(repeats: int, iterations: int = 20) -> dict:
    """Each item's min and median seconds over ``repeats`` calls after two warm-up calls."""
    gen = ivi.MMGenerator((40, 40), (420, 420), 2, (957, 500))
    params = gen.init(jax.random.key(0), jnp.zeros((1, 40, 40)))["params"]

    def mean_fn(p, z):
        return gen.apply({"params": p}, z.reshape(-1, 40, 40))[:, :478410]

    z, x0 = jax.random.normal(jax.random.key(1), (1, 1600)), unit_rows(jax.random.key(2), (1, 1600))

    def products(count):
        def run(p, z, v):
            _, forward = jax.linearize(partial(mean_fn, p), z)
            backward = jax.linear_transpose(forward, z)
            step = lambda i, u: backward(forward(u))[0] / jnp.linalg.norm(u)  # noqa: E731
            return jax.lax.fori_loop(0, count, step, v)

        return jax.jit(run)

    def eighs(m):
        return jax.lax.fori_loop(0, iterations, lambda i, m: jnp.linalg.eigh(m)[1] + m, m)

    def empty_loop(x):
        body = lambda s: (s[0] + 1, s[1] * 1.0001)  # noqa: E731
        return jax.lax.while_loop(lambda s: s[0] < iterations, body, (0, x))[1]

    a = jax.random.normal(jax.random.key(3), (1600, 1600))
    a = a @ a.T / 1600
    h = jax.random.normal(jax.random.key(4), (1, iterations + 1, iterations + 1))
    h = h + jnp.swapaxes(h, 1, 2)
    items = {}
    for k in (5, iterations):
        solve = partial(ivi.smallest_singular_value, mean_fn, num_iterations=k)
        s_min_squared = jax.jit(lambda *args, solve=solve: solve(*args)[0])
        items[f"solver, {k} iterations"] = (s_min_squared, params, z, x0)
    for k in (1, iterations):
        items[f"linearisation, {k} product(s)"] = (products(k), params, z, x0)
    for k in (5, iterations):
        eig = jax.jit(lambda v, k=k: ivi.smallest_eigenpair(lambda u: u @ a, v, k).value)
        items[f"smallest_eigenpair, dense operator, {k} iterations"] = (eig, x0)
    items[f"{iterations} eigh of {iterations + 1} x {iterations + 1}"] = (jax.jit(eighs), h)
    items[f"empty while loop, {iterations} iterations"] = (jax.jit(empty_loop), x0)
    result = {}
    for name, (fn, *args) in items.items():
        median, times = timing.median_time(fn, *args, repeats=repeats)
        result[name] = {"min_seconds": min(times), "median_seconds": median}
    return result


def print_solver(result: dict) -> None:
    print("\n(a4) where a solver iteration's time goes (MNIST generator, one latent)")
    for name, r in result.items():
        low, median = r["min_seconds"] * 1e3, r["median_seconds"] * 1e3
        print(f"  {name:<52}{low:>10.3f} ms min{median:>10.3f} ms median")


def jax_gemm_gflops(repeats: int = 20) -> float:
    """JAX's BLAS rate on the product the PyTorch script also times: (S, 957, 420) x
    (420, 420), the MNIST generator's largest."""
    a = jax.random.normal(jax.random.key(0), (SAMPLES, 957, 420))
    b = jax.random.normal(jax.random.key(1), (420, 420))
    _, times = timing.median_time(jax.jit(jnp.matmul), a, b, repeats=repeats)
    return 2 * a.size * b.shape[1] / min(times) / 1e9


def run_torch(python: str, repeats: int, device: str = "cpu") -> dict | None:
    if not python or not os.path.exists(python):
        print(f"\n(a''') PyTorch comparison skipped: no interpreter at {python!r}")
        return None
    check = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    if check.returncode != 0:
        print(f"\n(a''') PyTorch comparison skipped: torch is not importable by {python}")
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
        print("\n(a''') PyTorch comparison failed:\n" + done.stderr[-2000:])
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_with_torch(torch_runs: list, mnist: dict | None) -> dict:
    """PyTorch's step times (its runs pooled) and each JAX candidate's median over PyTorch's
    median and minimum over minimum."""
    runs = [r for r in torch_runs if r is not None]
    result = dict(runs[-1])
    times = [t for r in runs for t in r["step_seconds_all"]]
    result.update(
        step_seconds_all=times,
        step_seconds=statistics.median(times),
        min_step_seconds=min(times),
        gemm_gflops=max(r["gemm_gflops"] for r in runs),
        runs=len(runs),
        jax_gemm_gflops=jax_gemm_gflops(),
    )
    if mnist:
        result["jax_over_torch"] = {
            name: {
                "median": r["median_seconds"] / result["step_seconds"],
                "min": r["min_seconds"] / result["min_step_seconds"],
            }
            for name, r in mnist["candidates"].items()
            if not name.startswith("(")
        }
    return result


def print_torch(result: dict) -> None:
    print(
        f"\n(a''') the paper's step in PyTorch {result['torch']} on {result.get('device', 'cpu')} "
        f"({result['threads']} threads), written from the mathematics (5 Krylov iterations "
        f"from a fresh start on all 10 samples), {result['runs']} run(s) around the JAX part"
    )
    print(
        f"  PyTorch step, min / median s: {result['min_step_seconds']:.3f} / "
        f"{result['step_seconds']:.3f}"
    )
    if result.get("gemm_gflops") and result.get("jax_gemm_gflops"):
        print(
            "  BLAS on the (10, 957, 420) x (420, 420) product, GFLOP/s: PyTorch "
            f"{result['gemm_gflops']:.0f}, JAX {result['jax_gemm_gflops']:.0f}"
        )
    if result.get("jax_over_torch"):
        print(
            f"  {'implicit_vi.py candidate (table (a))':<58}{'median / median':>16}"
            f"{'min / min':>11}"
        )
        for name, ratio in result["jax_over_torch"].items():
            print(f"  {name:<58}{ratio['median']:>16.3f}{ratio['min']:>11.3f}")


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
    del params
    trainer = bnn.trainer(
        optax.adam(1e-4),
        num_data=60_000,
        num_samples=SCALING_SAMPLES,
        entropy=SSV(5, None, SCALING_SAMPLES),  # exactly 5 iterations, as the table states
    )
    x = jax.random.normal(jax.random.key(2), (SCALING_BATCH, 784))
    y = jax.random.randint(jax.random.key(3), (SCALING_BATCH,), 0, 10)
    seconds, times = timing.median_time(
        trainer.step, jax.random.key(4), trainer.init(jax.random.key(1)), (x, y), repeats=repeats
    )
    return {
        "weights": bnn.num_stochastic,
        "generator_params": bnn.num_generator_params(),
        "latent_dim": bnn.latent_dim,
        "step_seconds": seconds,
        "min_step_seconds": min(times),
        "step_seconds_all": times,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_import_bytes": baseline,
    }


def run_scaling(repeats: int, max_weights: float) -> list[dict]:
    results = []
    for target in [t for t in SCALING_TARGETS if t <= max_weights]:
        command = [sys.executable, os.path.abspath(__file__), "--scaling-point", str(target)]
        done = subprocess.run(command + ["--repeats", str(repeats)], capture_output=True, text=True)
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
        "\n(b) one training step (Adam) vs generated weights D: MLP 784-w-10, the library's "
        "defaults (automatic generator, learned weight noise),"
    )
    print(
        f"    SmallestSingularValue(5, None) on all S = {SCALING_SAMPLES} samples, batch "
        f"{SCALING_BATCH}; fresh process per point"
    )
    print(
        f"  {'D':>12}{'generator':>13}{'min s':>9}{'median s':>10}{'s per 1e6 D':>13}"
        f"{'peak RSS GiB':>14}"
    )
    for r in results:
        if "error" in r:
            print(f"  {r['target']:>12.0e}  failed")
            continue
        print(
            f"  {r['weights']:>12,}{r['generator_params']:>13,}"
            f"{r.get('min_step_seconds', float('nan')):>9.3f}{r['step_seconds']:>10.3f}"
            f"{r['step_seconds'] / r['weights'] * 1e6:>13.4f}{r['peak_rss_bytes'] / 2**30:>14.2f}"
        )


# --------------------------------------------------------------------------------------------
# (c) ExactEntropy against SmallestSingularValue as the latent dimension grows
# --------------------------------------------------------------------------------------------

ENTROPY_SIDES = (2, 4, 6, 8, 12, 16)
ENTROPY_SAMPLES, ENTROPY_BATCH, ENTROPY_VALUE_SAMPLES = 4, 64, 16


def run_entropy(repeats: int) -> list[dict]:
    model = MLP(widths=(32,), num_outputs=10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 784)))["params"]
    batch = (
        jax.random.normal(jax.random.key(2), (ENTROPY_BATCH, 784)),
        jax.random.randint(jax.random.key(3), (ENTROPY_BATCH,), 0, 10),
    )
    optimizer = optax.adam(1e-4)
    results = []
    for side in ENTROPY_SIDES:
        generator = ivi.auto_generator(params, noise_shape=(side, side))
        bnn = ivi.ImplicitBNN.from_linen(model, params, generator=generator)
        d = bnn.latent_dim
        estimators = {
            "exact": ivi.ExactEntropy(ENTROPY_SAMPLES),
            "smallest_sv": SSV(ITERATIONS, None, ENTROPY_SAMPLES),  # the paper's solver
        }
        candidates = {
            name: Stepper(
                bnn.trainer(
                    optimizer, num_data=60_000, num_samples=ENTROPY_SAMPLES, entropy=entropy
                ),
                batch,
            )
            for name, entropy in estimators.items()
        }
        times = compare(candidates, repeats, reference="exact")
        row = {"latent_dim": d, "weights": bnn.num_stochastic}
        for name, r in times.items():
            row[f"{name}_min_step_seconds"] = r["min_seconds"]
            row[f"{name}_step_seconds"] = r["median_seconds"]
        row["smallest_sv_over_exact"] = times["smallest_sv"]["ratio"]
        # Entropies on the same latent samples (the same key), at initialisation.
        vi_params = bnn.init(jax.random.key(1))
        vectors = unit_rows(jax.random.key(5), (ENTROPY_VALUE_SAMPLES, d))

        def entropy_of(entropy, bnn=bnn, vi_params=vi_params, vectors=vectors):
            options = dict(num_data=60_000, num_samples=ENTROPY_VALUE_SAMPLES, entropy=entropy)
            loss = jax.jit(partial(ivi.elbo_loss, bnn.model, **options))
            return float(loss(vi_params, jax.random.key(4), batch, vectors)[1][0].entropy)

        row["exact_entropy"] = entropy_of(ivi.ExactEntropy(ENTROPY_VALUE_SAMPLES))
        row["smallest_sv_entropy"] = entropy_of(SSV(ITERATIONS, None, ENTROPY_VALUE_SAMPLES))
        row["smallest_sv_converged_entropy"] = entropy_of(SSV(d, None, ENTROPY_VALUE_SAMPLES))
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
        f"\n(c) ExactEntropy vs SmallestSingularValue(5, None), both on all S = "
        f"{ENTROPY_SAMPLES} samples: MLP 784-32-10 (D = {results[0]['weights']:,}), the "
        f"library's defaults with noise k x k, batch {ENTROPY_BATCH}; median step seconds, "
        f"ratio = median of per-repeat ratios; entropies at initialisation on "
        f"{ENTROPY_VALUE_SAMPLES} latents (nats)"
    )
    print(
        f"  {'d':>5}{'exact s':>10}{'ssv s':>10}{'ratio':>8}{'H exact':>14}{'H ssv(5)':>14}"
        f"{'gap':>10}{'H ssv(conv)':>14}{'gap':>10}"
    )
    for r in results:
        print(
            f"  {r['latent_dim']:>5}{r['exact_step_seconds']:>10.4f}"
            f"{r['smallest_sv_step_seconds']:>10.4f}{r['smallest_sv_over_exact']:>8.3g}"
            f"{r['exact_entropy']:>14.1f}{r['smallest_sv_entropy']:>14.1f}{r['gap_nats']:>10.1f}"
            f"{r['smallest_sv_converged_entropy']:>14.1f}{r['gap_converged_nats']:>10.1f}"
        )


# --------------------------------------------------------------------------------------------
# (d) cifar: the training program's step on a CIFAR-10 LeNet, multi-head generator from a
#     configuration file in the published layout
# --------------------------------------------------------------------------------------------

CIFAR_STEPS = 2  # steps per timed repeat; the solver's warm start is carried between them
CIFAR_NUM_TRAIN = 50_000
PAPER_PROGRAM = os.path.join(ROOT, "examples", "implicit_vi_paper", "train.py")
CIFAR_CONFIG = os.path.join(CONFIGS, "cifar_lenet.yaml")
CIFAR_CANDIDATES = {
    # name: the training program's flags (its defaults otherwise: batch 256, S = 10, ...)
    "config, library solver": ["--config", CIFAR_CONFIG],
    "config, paper solver": [
        *("--config", CIFAR_CONFIG, "--cold_start", "--solver_tolerance", "none"),
        *("--solver_iterations", "5", "--entropy_samples", "10"),
    ],
    "automatic generator, library solver": [],
    # For the breakdown: the same step without the entropy term (not an ELBO).
    "config, no entropy term": ["--config", CIFAR_CONFIG],
}


def paper_program():
    """examples/implicit_vi_paper/train.py as a module (a script, not an installed package;
    registered in ``sys.modules`` because Flax modules need their module there)."""
    import importlib.util

    name = "implicit_vi_paper_train"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PAPER_PROGRAM)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def cifar_run(name: str, flags: list[str]):
    """The training program's bnn and a function running CIFAR_STEPS of its steps (its
    ``build_paper_training``, ``initial_paper_state`` and ``make_step``) for ``flags``, that
    returns the solver's iterations per step."""
    from bdl_examples.paper import build_paper_training, initial_paper_state, paper_elbo_weights

    program = paper_program()
    settings = program.read_settings(
        program.parse_args(["--dataset", "cifar10", "--model", "LeNet", *flags])
    )
    x = jax.random.normal(jax.random.key(2), (settings.train_batch_size, 32, 32, 3))
    y = jax.random.randint(jax.random.key(3), (settings.train_batch_size,), 0, 10)
    bnn, optimizer, trainer = build_paper_training(
        settings, x_example=x[:1], num_classes=10, num_train=CIFAR_NUM_TRAIN
    )
    state = {"train": initial_paper_state(settings, bnn, optimizer), "step": 0}
    if name.endswith("no entropy term"):
        kl_weight, prior_scale = paper_elbo_weights(settings, CIFAR_NUM_TRAIN)
        no_entropy = partial_steps(
            bnn,
            optimizer,
            num_data=CIFAR_NUM_TRAIN,
            num_samples=settings.train_samples,
            prior_weight=kl_weight * prior_scale / CIFAR_NUM_TRAIN,
        )["no entropy"]

        def step(train_state, key, batch):
            vi_params, opt_state = no_entropy(
                train_state.vi_params, train_state.opt_state, key, batch
            )
            new_state = train_state._replace(vi_params=vi_params, opt_state=opt_state)
            return new_state, {"solver_iterations": 0}
    else:
        step = program.make_step(trainer, settings.cold_start)

    def run():
        iterations = []
        for _ in range(CIFAR_STEPS):
            key = jax.random.fold_in(jax.random.key(4), state["step"])
            state["train"], info = step(state["train"], key, (x, y))
            state["step"] += 1
            iterations.append(info["solver_iterations"])
        jax.block_until_ready(state["train"])  # the timer waits for every step
        return [int(i) for i in iterations]

    return bnn, run


def run_cifar(repeats: int) -> dict:
    runs, sizes = {}, {}
    for name, flags in CIFAR_CANDIDATES.items():
        bnn, runs[name] = cifar_run(name, flags)
        sizes[name] = {
            "generator_params": bnn.num_generator_params(),
            "stochastic_params": bnn.num_stochastic,
            "latent_dim": bnn.latent_dim,
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
                "ratio_of_minima": summary["ratio_of_minima"],
                "mean_solver_iterations": statistics.mean(iterations[name]),
                "step_seconds": summary["all"],
            }
        )
    return {
        "network": "LeNet-5 on 32x32x3 (CIFAR-10)",
        "config": os.path.relpath(CIFAR_CONFIG, ROOT),
        "batch": BATCH,
        "samples": SAMPLES,
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
# name -> (estimator, warm start)
BOUND_RUNS = {
    "paper: 5 iterations from a fresh start, all 4 samples": (
        SSV(ITERATIONS, None, BOUND_SAMPLES),
        False,
    ),
    "library default: warm, tolerance 0.1, cap 20, 1 sample": (SSV(), True),
}


def run_bound(steps: int = BOUND_STEPS, plot_folder: str = RESULTS) -> dict:
    """Digits (scikit-learn's 8x8 images) with an MLP 64-128-128-10 (D = 26,122), the
    library's defaults and an MM generator with d = 256; the ELBO (kl_weight 1), Adam 1e-3.
    Every BOUND_EVERY steps the exact entropy and the bound with the solver run to
    convergence are evaluated on the training step's own latent samples (the same key, the
    same K samples)."""
    from sklearn.datasets import load_digits

    # All 1,797 images are the pool the batches are drawn from (as for the table in
    # bench/README.md): no test split is needed, so not the harness's load_digits_split.
    images, labels = load_digits(return_X_y=True)
    images = jnp.asarray(images / 16.0, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    model = MLP(widths=(128, 128), num_outputs=10)
    params = model.init(jax.random.key(0), images[:1])["params"]
    bnn = ivi.ImplicitBNN.from_linen(model, params, generator=BOUND_GENERATOR)
    d = bnn.latent_dim
    optimizer = optax.adam(1e-3)
    common = dict(num_data=len(labels), num_samples=BOUND_SAMPLES)

    @partial(jax.jit, static_argnums=(3,))
    def reference(vi_params, key, batch, entropy):
        vectors = unit_rows(jax.random.key(7), (entropy.num_samples, d))
        loss = ivi.elbo_loss(bnn.model, vi_params, key, batch, vectors, entropy=entropy, **common)
        return loss[1][0].entropy

    rng = np.random.default_rng(0)
    batches = [rng.integers(0, len(labels), BOUND_BATCH) for _ in range(steps)]
    result = {"latent_dim": d, "weights": bnn.num_stochastic, "runs": {}}
    for name, (entropy, warm) in BOUND_RUNS.items():
        stepper = Stepper(bnn.trainer(optimizer, entropy=entropy, **common), None, warm=warm)
        k = entropy.num_samples
        rows = []
        for i, idx in enumerate(batches):
            stepper.batch = (images[idx], labels[idx])
            vi_params, key = stepper.state.vi_params, jax.random.key(100 + stepper.count)
            stepper()
            info = stepper.infos[-1]
            row = {
                "step": i,
                "estimate": float(info.entropy),
                "iterations": int(info.solver_iterations),
                "residual": float(info.solver_residual),
            }
            if i % BOUND_EVERY == 0 or i == steps - 1:
                row["exact"] = float(reference(vi_params, key, stepper.batch, ivi.ExactEntropy(k)))
                row["converged_bound"] = float(
                    reference(vi_params, key, stepper.batch, SSV(d, None, k))
                )
            rows.append(row)
        evaluated = [r for r in rows if "exact" in r]
        result["runs"][name] = {
            "entropy": repr(entropy),
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
    plot_bound(result, os.path.join(plot_folder, "implicit_vi_bound.png"))
    return result


def plot_bound(result: dict, path: str) -> None:
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
    axes[1].set(xlabel="training step", ylabel="solver iterations", yscale="log")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(
        f"SmallestSingularValue entropy, digits MLP (D = {result['weights']:,}), "
        f"d = {result['latent_dim']}"
    )
    result["plot"] = os.path.relpath(save_figure(fig, path))


def print_bound(result: dict) -> None:
    steps = len(next(iter(result["runs"].values()))["rows"])
    print(
        f"\n(e) the bound over a training run: digits MLP 64-128-128-10 (D = "
        f"{result['weights']:,}), MM generator d = {result['latent_dim']}, S = {BOUND_SAMPLES}, "
        f"{steps} steps; entropies (nats) on the step's own latents"
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
        default="mnist,variance,scaling,entropy",
        help="comma-separated: mnist,variance,torch,solver,spectrum,scaling,entropy,cifar,bound",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--torch", default="", help="python interpreter with torch, for the PyTorch comparison"
    )
    parser.add_argument(
        "--torch-device", default="cpu", help="torch device for the PyTorch step: cpu or cuda"
    )
    parser.add_argument("--max-weights", type=float, default=3e7)
    parser.add_argument("--spectrum-latents", type=int, default=16)
    parser.add_argument("--bound-steps", type=int, default=BOUND_STEPS)
    parser.add_argument("--out", default=os.path.join(RESULTS, "implicit_vi.json"))
    parser.add_argument("--scaling-point", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scaling_point is not None:
        print(json.dumps(scaling_point(args.scaling_point, args.repeats)))
        return
    if args.repeats < 3:
        parser.error("--repeats must be >= 3")
    if args.spectrum_latents < 2:
        parser.error("--spectrum-latents must be >= 2")

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if args.torch and "torch" not in parts:
        parts.append("torch")
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    results["machine"] = timing.machine()
    # PyTorch runs before and after the JAX part, so that a drift in the shared machine's
    # load affects both sides alike.
    torch_runs = []
    if "torch" in parts:
        torch_runs.append(run_torch(args.torch, args.repeats, args.torch_device))
    if "mnist" in parts:
        results["mnist"] = run_mnist(args.repeats)
        print_mnist(results["mnist"])
    if "torch" in parts:
        if "mnist" in parts:
            torch_runs.append(run_torch(args.torch, args.repeats, args.torch_device))
        if any(r is not None for r in torch_runs):
            results["torch"] = compare_with_torch(torch_runs, results.get("mnist"))
            print_torch(results["torch"])
    if "variance" in parts:
        print("\n(a') the entropy on K of the samples")
        results["variance"] = run_variance()
        print_variance(results["variance"])
    if "solver" in parts:
        results["solver"] = run_solver(args.repeats)
        print_solver(results["solver"])
    if "spectrum" in parts:
        results["spectrum"] = run_spectrum(args.spectrum_latents)
        print_spectrum(results["spectrum"])
    if "scaling" in parts:
        print("\n(b) scaling (each point in a fresh process)")
        results["scaling"] = run_scaling(args.repeats, args.max_weights)
        print_scaling(results["scaling"])
    if "entropy" in parts:
        print("\n(c) ExactEntropy vs SmallestSingularValue")
        results["entropy"] = run_entropy(args.repeats)
        print_entropy(results["entropy"])
    if "bound" in parts:
        results["bound"] = run_bound(args.bound_steps, os.path.dirname(os.path.abspath(args.out)))
        print_bound(results["bound"])
    if "cifar" in parts:
        results["cifar"] = run_cifar(args.repeats)
        print_cifar(results["cifar"])
    print(f"\nwrote {os.path.relpath(timing.write_json(args.out, results))}")


if __name__ == "__main__":
    main()
