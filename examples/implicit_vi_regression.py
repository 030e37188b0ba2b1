"""In-between uncertainty: 1-D regression with a gap, three posteriors over one network.

Data: y = sin(3x) + 0.1 noise, 100 training points with x drawn from [-1, -0.4] and [0.4, 1]
only; nothing in the gap (-0.4, 0.4). A Bayesian network should be confident on the data and
uncertain in the gap. The same tanh MLP 1-16-16-1 (321 weights), the same Gaussian prior on
its weights (implicit VI's) and the same known noise std 0.1 give one posterior, approximated
three ways:

* implicit VI (``implicit_vi.py``): by default the library's defaults (automatic generator,
  calibrated output, one learned noise std per weight, prior std per layer = its initial std)
  with KL weight 1, the ELBO itself; ``--weight-noise 1e-3``: one fixed noise std for every
  weight, the paper's, with the prior N(0, 1) (the library's former defaults);
  trained on the per-data-point ELBO with Adam, full batch;
* IVON (``ivon.py``): a mean-field Gaussian, trained with the same prior (ess = N; each
  layer's weights written as prior_std * u with u under weight decay 1 / N, i.e. the prior
  N(0, prior_std^2) per layer), predictions by Bayesian model averaging;
* NUTS (``blackjax``, window adaptation, several chains): the reference posterior. It is an
  optional extra for this example only: ``pip install -e .[nuts]``; without it the example
  runs the two variational methods and says so.

Every method is summarised the same way, from K sampled networks f_k evaluated on a grid:
the *epistemic* std of the function, std_k f_k(x), without the observation noise (the noise is
the same fixed 0.1 for all three, so adding it would only compress the differences; the
predictive std is sqrt(epistemic^2 + 0.1^2)). "gap std" is its mean over the grid points with
|x| <= 0.3, "data std" over 0.5 <= |x| <= 0.9, and the ratio is a method's gap std over NUTS's.
RMSE and the Gaussian negative log-likelihood (noise included) are on held-out points from the
data's input region. IVON and implicit VI run for several seeds (mean ± std over seeds). Saves
examples/output/implicit_vi_regression.png: the three bands, and the std against x.

Usage:
  python examples/implicit_vi_regression.py [--steps 3000] [--ivon-steps 5000] [--seeds 3]
      [--samples 8] [--entropy exact] [--weight-noise learned|1e-3] [--nuts-chains 4]
      [--nuts-warmup 500] [--nuts-samples 500]

``--weight-noise`` is implicit VI's weight noise: ``learned`` (default, the library's) or one
fixed std for every weight with the prior N(0, 1). The fixed 1e-3 leaves the generator alone to
spread the posterior, which its rank-d Jacobian cannot do along every direction the data leave
free: its gap std is 0.08 ± 0.03 times NUTS's (on the prior N(0, 1)), against 1.23 ± 0.04 with
the defaults (NUTS on their per-layer prior; 3 seeds each, the default settings otherwise;
docs/implicit_vi.md, "Learned weight noise"). A default run takes about 3.5 minutes of CPU
time, NUTS most of it.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from bdl_examples.models import MLP
from bdl_examples.plots import pyplot, save_figure
from bdl_examples.progress import ProgressBar

import implicit_vi as ivi
import ivon

NOISE_STD = 0.1
GAP = 0.4  # no training inputs in (-GAP, GAP)
GAP_REGION = (0.0, 0.3)  # |x| range averaged for the "gap std"
DATA_REGION = (0.5, 0.9)  # |x| range averaged for the "data std"
GRID = np.linspace(-1.5, 1.5, 301, dtype=np.float32)[:, None]
OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
INSTALL_HINT = "pip install -e .[nuts]  (or: pip install blackjax)"


def make_network(width: int) -> nn.Module:
    """The MLP 1-width-width-1 with tanh that all three methods share."""
    return MLP(widths=(width, width), num_outputs=1, activation=nn.tanh)


def make_data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n points, half on each side of the gap: x (n, 1), y = sin(3x) + noise (n, 1)."""
    x = np.concatenate([rng.uniform(-1, -GAP, n // 2), rng.uniform(GAP, 1, n - n // 2)])[:, None]
    y = np.sin(3 * x) + NOISE_STD * rng.normal(size=x.shape)
    return x.astype(np.float32), y.astype(np.float32)


# ----- summaries: the same for every method --------------------------------------------------


def _in_region(grid: np.ndarray, region: tuple[float, float]) -> np.ndarray:
    where = np.abs(np.ravel(grid))
    return (where >= region[0] - 1e-6) & (where <= region[1] + 1e-6)


def region_mean(grid: np.ndarray, values: np.ndarray, region: tuple[float, float]) -> float:
    """Mean of ``values`` over the grid points with ``region[0] <= |x| <= region[1]``.

    The bounds are included up to 1e-6, so that a grid point on a bound counts whatever the
    grid's rounding.

    Example:
      >>> region_mean(np.array([-1.0, 0.0, 0.5]), np.array([1.0, 2.0, 4.0]), (0.0, 0.6))
      3.0
    """
    inside = _in_region(grid, region)
    if not inside.any():
        raise ValueError(f"no grid point has |x| in {region}")
    return float(np.mean(np.ravel(values)[inside]))


def band_summary(grid: np.ndarray, function_samples: np.ndarray) -> dict:
    """Mean and epistemic std of sampled functions, and the std on the data and in the gap.

    Args:
      grid: inputs (G, 1).
      function_samples: f_k(grid) for K sampled networks, (K, G) or (K, G, 1).

    Returns:
      ``{"mean", "std"}`` (G,) arrays and ``{"data_std", "gap_std"}`` floats.
    """
    samples = np.asarray(function_samples, dtype=np.float64).reshape(len(function_samples), -1)
    std = samples.std(0)
    return {
        "mean": samples.mean(0),
        "std": std,
        "data_std": region_mean(grid, std, DATA_REGION),
        "gap_std": region_mean(grid, std, GAP_REGION),
    }


def gap_ratio(gap_std: float, reference_gap_std: float) -> float:
    """A method's gap std over the reference posterior's: 1 is right, < 1 overconfident.

    Example:
      >>> gap_ratio(0.2, 0.4)
      0.5
    """
    if not reference_gap_std > 0:
        raise ValueError(f"reference_gap_std must be > 0, got {reference_gap_std}")
    return gap_std / reference_gap_std


def regression_metrics(function_samples: np.ndarray, targets: np.ndarray) -> dict:
    """RMSE of the predictive mean, and the Gaussian NLL with variance epistemic + noise^2.

    Example:
      >>> m = regression_metrics(np.zeros((2, 3, 1)), np.zeros((3, 1)))
      >>> round(m["rmse"], 6), round(m["nll"], 4)  # -log N(0 | 0, 0.1^2)
      (0.0, -1.3836)
    """
    samples = np.asarray(function_samples, dtype=np.float64).reshape(len(function_samples), -1)
    targets = np.ravel(np.asarray(targets, dtype=np.float64))
    mean, variance = samples.mean(0), samples.var(0) + NOISE_STD**2
    nll = 0.5 * (np.log(2 * math.pi * variance) + (targets - mean) ** 2 / variance)
    return {"rmse": float(np.sqrt(np.mean((mean - targets) ** 2))), "nll": float(np.mean(nll))}


# ----- the three posteriors ------------------------------------------------------------------


def gaussian_log_likelihood(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """log N(y | f(x), NOISE_STD^2) summed over the data: the likelihood of all three methods."""
    return ivi.Gaussian(observation_noise=NOISE_STD).log_prob({}, predictions, targets).sum()


def make_implicit_bnn(module: nn.Module, x: np.ndarray, weight_noise: float | str = "learned"):
    """The implicit-VI network: the library's defaults for ``weight_noise="learned"``, or one
    fixed noise std for every weight and the prior N(0, 1) for a number. The template
    parameters (the prior's and the calibration's scale) come from one fixed initialisation,
    so that every seed, IVON and NUTS share the prior."""
    params = module.init(jax.random.key(0), x[:1])["params"]
    fixed = {} if weight_noise == "learned" else {"weight_noise": weight_noise, "prior_std": 1.0}
    likelihood = ivi.Gaussian(observation_noise=NOISE_STD)
    return ivi.ImplicitBNN.from_linen(module, params, likelihood=likelihood, **fixed)


def prior_std_tree(bnn: ivi.ImplicitBNN):
    """The implicit-VI prior's std per parameter leaf, a pytree with the network's structure
    (every leaf is stochastic here)."""
    layout = bnn.model.layout
    return jax.tree_util.tree_unflatten(layout.treedef, list(bnn.model.prior_std))


def make_trainer(bnn: ivi.ImplicitBNN, num_data: int, steps: int, samples: int, entropy=None):
    """The ELBO (KL weight 1) with ``samples`` networks per step and Adam (cosine decay from
    1e-2 over ``steps``); ``entropy`` overrides the library's default entropy estimator (e.g.
    ``ivi.ExactEntropy()``). One trainer serves every seed (one compilation)."""
    optimizer = optax.adam(optax.cosine_decay_schedule(1e-2, steps, alpha=0.1))
    options = {} if entropy is None else {"entropy": entropy}
    return bnn.trainer(optimizer, num_data=num_data, num_samples=samples, **options)


def run_implicit_vi(
    bnn: ivi.ImplicitBNN,
    trainer: ivi.Trainer,
    data,
    inputs: np.ndarray,
    seed: int,
    steps: int,
    log,
) -> np.ndarray:
    """Implicit VI: ``steps`` full-batch steps of ``trainer`` from the generator initialised
    with ``seed``; returns f_k(inputs) (K, M, 1)."""
    key = jax.random.key(seed)
    state = trainer.init(key)
    # Full batch, one key per step (fold_in): a step loop, not the harness's minibatch epochs.
    # The entropy solver's warm start travels in the state.
    bar = ProgressBar(steps, f"  implicit VI seed {seed}")
    start = time.perf_counter()
    for step in range(steps):
        state, info = trainer.step(jax.random.fold_in(key, step), state, data)
        bar.update(step + 1, lambda info=info: f"ELBO/N {float(info.elbo):8.3f}")
    bar.close()
    log(
        f"  implicit VI seed {seed}: {steps} steps, ELBO/N {float(info.elbo):.3f} "
        f"({time.perf_counter() - start:.0f} s)"
    )
    key = jax.random.key(10_000 + seed)
    return np.asarray(bnn.sample_outputs(state.vi_params, key, inputs, num_samples=500))


def _per_leaf(params, prior_std):
    """``prior_std`` (a number or a pytree of numbers) as a pytree with params' structure."""
    if isinstance(prior_std, (int, float)):
        return jax.tree_util.tree_map(lambda _: float(prior_std), params)
    return prior_std


def run_ivon(
    module: nn.Module,
    data,
    inputs: np.ndarray,
    seed: int,
    steps: int,
    samples: int,
    prior_std,
    log,
) -> np.ndarray:
    """IVON with the Gaussian prior N(0, prior_std^2); returns f_k(inputs) (K, M, 1).

    ``prior_std``: a number, or one per parameter leaf (a pytree with the network's
    structure). IVON's prior is N(0, 1 / (ess * weight_decay)), one weight decay for all the
    weights, so each leaf w is trained as w = prior_std * u: with ess = N and weight_decay =
    1 / N, u has the prior N(0, 1) and w the prior N(0, prior_std^2), and a mean-field Gaussian
    over u is one over w (u = w for prior_std = 1). Two settings differ from the optimizer's
    defaults, for reasons of scale rather than by tuning on the gap: hess_init = 1 / NOISE_STD^2,
    the curvature of one data point's loss in the network output (with 1 the first steps are
    100x too long and the run diverges); beta2 = 0.99 rather than 0.99999, which is made for
    10^5+ steps: in a few thousand the Hessian estimate of weights the data leave free must
    decay from hess_init to the prior's precision, and with 0.99999 it would not.
    """
    x, y = data
    num_data = len(x)
    params = module.init(jax.random.key(seed), x[:1])["params"]
    scales = _per_leaf(params, prior_std)
    optimizer = ivon.ivon(
        optax.cosine_decay_schedule(3e-3, steps, alpha=0.01),
        ess=num_data,
        hess_init=1.0 / NOISE_STD**2,
        beta2=0.99,
        weight_decay=1.0 / num_data,
    )
    unscaled = jax.tree_util.tree_map(lambda w, s: w / s, params, scales)
    opt_state = optimizer.init(unscaled)

    def weights(u):
        return jax.tree_util.tree_map(lambda v, s: v * s, u, scales)

    def loss_fn(u):  # mean negative log-likelihood per data point, as IVON expects
        return -gaussian_log_likelihood(module.apply({"params": weights(u)}, x), y) / num_data

    value_and_grad = ivon.sampled_value_and_grad(loss_fn, samples, method="vmap")

    @jax.jit
    def train_step(u, opt_state, key):
        loss, grads, hessian = value_and_grad(key, u, opt_state)
        updates, opt_state = optimizer.update(grads, opt_state, u, hessian_estimate=hessian)
        return optax.apply_updates(u, updates), opt_state, loss

    # Full batch, one key per step (fold_in): a step loop, not the harness's minibatch epochs.
    key = jax.random.key(seed)
    bar = ProgressBar(steps, f"  IVON seed {seed}")
    start = time.perf_counter()
    for step in range(steps):
        unscaled, opt_state, loss = train_step(unscaled, opt_state, jax.random.fold_in(key, step))
        bar.update(step + 1, lambda loss=loss: f"E[NLL]/N {float(loss):8.3f}")
    bar.close()
    log(
        f"  IVON seed {seed}: {steps} steps, E[NLL]/N {float(loss):.3f} "
        f"({time.perf_counter() - start:.0f} s)"
    )

    @jax.jit
    def draw(sample_key):
        sample, _ = ivon.sample_parameters(sample_key, unscaled, opt_state)
        return module.apply({"params": weights(sample)}, inputs)

    return np.asarray(jax.vmap(draw)(jax.random.split(jax.random.key(10_000 + seed), 500)))


def import_blackjax():
    """blackjax, or None when it is not installed."""
    try:
        import blackjax
    except ImportError:
        return None
    return blackjax


def run_nuts(
    blackjax,
    module: nn.Module,
    data,
    inputs: np.ndarray,
    prior_std,
    chains: int,
    warmup: int,
    samples: int,
    seed: int,
    log,
) -> tuple[np.ndarray, dict]:
    """NUTS on the network's weights; returns f(inputs) per draw (chains, samples, M, 1).

    Log density: the Gaussian likelihood of all the data plus the N(0, prior_std^2) prior on
    every weight (``prior_std`` a number, or one per parameter leaf), the posterior the two
    variational methods approximate. Each chain starts
    from its own network initialisation and adapts its step size and diagonal mass matrix
    with Stan's window adaptation (vmapped over chains).
    """
    x, y = data

    def log_density(params):
        stds = _per_leaf(params, prior_std)
        prior = sum(
            jnp.sum(-0.5 * (w / s) ** 2 - math.log(s * math.sqrt(2 * math.pi)))
            for w, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(stds))
        )
        return gaussian_log_likelihood(module.apply({"params": params}, x), y) + prior

    keys = jax.random.split(jax.random.key(seed), chains)
    initial = jax.vmap(lambda k: module.init(k, x[:1])["params"])(keys)
    adaptation = blackjax.window_adaptation(blackjax.nuts, log_density)

    @jax.jit
    def adapt(keys, positions):
        def one_chain(key, position):
            (state, parameters), _ = adaptation.run(key, position, num_steps=warmup)
            return state, parameters["step_size"], parameters["inverse_mass_matrix"]

        return jax.vmap(one_chain)(keys, positions)

    start = time.perf_counter()
    log(f"  NUTS: warm-up, {chains} chains x {warmup} steps ...")
    states, step_sizes, inverse_mass = adapt(
        jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys), initial
    )
    log(
        f"  NUTS: warm-up done ({time.perf_counter() - start:.0f} s), step sizes "
        + " ".join(f"{s:.2g}" for s in np.asarray(step_sizes))
    )

    @jax.jit
    def sample_block(keys, states, step_sizes, inverse_mass, block_index):
        def one_chain(key, state, step_size, inverse_mass_matrix):
            kernel = blackjax.nuts(log_density, step_size, inverse_mass_matrix).step

            def one_step(state, step_key):
                state, info = kernel(step_key, state)
                outputs = module.apply({"params": state.position}, inputs)
                return state, (outputs, info.num_integration_steps, info.is_divergent)

            step_keys = jax.random.split(jax.random.fold_in(key, block_index), block)
            return jax.lax.scan(one_step, state, step_keys)

        return jax.vmap(one_chain)(keys, states, step_sizes, inverse_mass)

    block = max(1, min(samples, 100))
    outputs, leapfrogs, divergent = [], [], []
    for block_index in range(math.ceil(samples / block)):
        states, (out, steps, div) = sample_block(
            keys, states, step_sizes, inverse_mass, block_index
        )
        outputs.append(np.asarray(out))
        leapfrogs.append(np.asarray(steps))
        divergent.append(np.asarray(div))
        log(
            f"  NUTS: {min((block_index + 1) * block, samples):>5}/{samples} samples per chain "
            f"({time.perf_counter() - start:.0f} s)"
        )
    outputs = np.concatenate(outputs, 1)[:, :samples]
    leapfrogs = np.concatenate(leapfrogs, 1)[:, :samples]
    divergent = np.concatenate(divergent, 1)[:, :samples]
    info = {
        "seconds": time.perf_counter() - start,
        "mean_leapfrog_steps": float(leapfrogs.mean()),
        "divergent": int(divergent.sum()),
    }
    return outputs, info


def chain_diagnostics(blackjax, chain_outputs: np.ndarray, grid: np.ndarray) -> dict:
    """R-hat and effective sample size of f(x) at the gap's grid points, and the gap std that
    each chain alone gives (their spread shows how well the chains agree)."""
    gap_values = chain_outputs.reshape(*chain_outputs.shape[:2], -1)[
        ..., _in_region(grid, GAP_REGION)
    ]
    per_chain = [region_mean(grid, c.reshape(len(c), -1).std(0), GAP_REGION) for c in chain_outputs]
    result = {"per_chain_gap_std": per_chain}
    diagnostics = blackjax.diagnostics
    # jitted: one compilation instead of one per operation (seconds on a CPU)
    if len(chain_outputs) > 1:
        max_rhat = jax.jit(lambda v: jnp.max(diagnostics.potential_scale_reduction(v, 0, 1)))
        result["max_rhat"] = float(max_rhat(gap_values))
    min_ess = jax.jit(lambda v: jnp.min(diagnostics.effective_sample_size(v, 0, 1)))
    result["min_ess"] = float(min_ess(gap_values))
    return result


# ----- command line --------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _weight_noise(text: str) -> float | str:
    if text == "learned":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 'learned' or a std > 0, got {text!r}")
    return value


ENTROPIES = {"exact": ivi.ExactEntropy(), "smallest_sv": ivi.SmallestSingularValue()}


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=_positive_int, default=3000, help="implicit VI training steps"
    )
    parser.add_argument("--ivon-steps", type=_positive_int, default=5000)
    parser.add_argument(
        "--entropy",
        choices=tuple(ENTROPIES),
        default=None,
        help="implicit VI's entropy estimator: ExactEntropy() or SmallestSingularValue() "
        "(default: the library's)",
    )
    parser.add_argument(
        "--weight-noise",
        type=_weight_noise,
        default="learned",
        help="implicit VI's weight noise: 'learned' (default: the library's defaults) or one "
        "fixed std for every weight, with the prior N(0, 1) (the paper's: 1e-3)",
    )
    parser.add_argument(
        "--samples", type=_positive_int, default=8, help="Monte Carlo samples per VI step"
    )
    parser.add_argument("--seeds", type=_positive_int, default=3, help="seeds for IVON and IVI")
    parser.add_argument("--train-size", type=_positive_int, default=100)
    parser.add_argument("--width", type=_positive_int, default=16, help="hidden width")
    parser.add_argument("--nuts-chains", type=_positive_int, default=4)
    parser.add_argument("--nuts-warmup", type=_positive_int, default=500)
    parser.add_argument(
        "--nuts-samples",
        type=_non_negative_int,
        default=500,
        help="NUTS draws per chain after warm-up (0: no NUTS reference)",
    )
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument(
        "--output", default=os.path.join(OUTPUT, "implicit_vi_regression.png"), help="PNG path"
    )
    args = parser.parse_args(argv)
    if args.train_size < 2:
        parser.error(
            f"--train-size must be >= 2 (one point each side of the gap), got {args.train_size}"
        )
    return args


def _format(values: Sequence[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def main(argv: Sequence[str] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Runs the comparison; returns the per-method summaries (for tests)."""
    args = parse_args(argv)
    log = log or (lambda text: print(text, flush=True))
    rng = np.random.default_rng(args.data_seed)
    data = make_data(rng, args.train_size)
    x_test, y_test = make_data(rng, 200)  # held out, same input region
    module = make_network(args.width)
    inputs = np.concatenate([GRID, x_test])
    num_grid = len(GRID)
    num_weights = sum(
        w.size for w in jax.tree_util.tree_leaves(module.init(jax.random.key(0), data[0][:1]))
    )
    log(
        f"MLP 1-{args.width}-{args.width}-1 ({num_weights} weights), {args.train_size} training "
        f"points, noise std {NOISE_STD}, gap (-{GAP}, {GAP})"
    )

    results: dict[str, dict] = {}

    def record(name: str, draws: list[np.ndarray]) -> None:
        summaries = [band_summary(GRID, d[:, :num_grid]) for d in draws]
        scores = [regression_metrics(d[:, num_grid:], y_test) for d in draws]
        results[name] = {
            "summaries": summaries,
            "data_std": [s["data_std"] for s in summaries],
            "gap_std": [s["gap_std"] for s in summaries],
            "rmse": [s["rmse"] for s in scores],
            "nll": [s["nll"] for s in scores],
        }

    bnn = make_implicit_bnn(module, data[0], args.weight_noise)
    trainer = make_trainer(bnn, len(data[0]), args.steps, args.samples, ENTROPIES.get(args.entropy))
    noise = "learned" if args.weight_noise == "learned" else f"fixed {args.weight_noise:g}"
    log(f"implicit VI: weight noise {noise}, {bnn.latent_dim}-dimensional latent")
    draws = [
        run_implicit_vi(bnn, trainer, data, inputs, seed=seed, steps=args.steps, log=log)
        for seed in range(args.seeds)
    ]
    record("implicit VI", draws)
    prior_std = prior_std_tree(bnn)
    stds = " ".join(
        f"{path} {std:.3g}" for path, std in zip(bnn.model.layout.paths, bnn.model.prior_std)
    )
    log(f"prior std per leaf (implicit VI's, used by all three): {stds}")

    draws = [
        run_ivon(
            module,
            data,
            inputs,
            seed=seed,
            steps=args.ivon_steps,
            samples=args.samples,
            prior_std=prior_std,
            log=log,
        )
        for seed in range(args.seeds)
    ]
    record("IVON", draws)

    blackjax = import_blackjax() if args.nuts_samples > 0 else None
    nuts_info = None
    if args.nuts_samples > 0 and blackjax is None:
        log(f"NUTS reference skipped: blackjax is not installed. Install it with {INSTALL_HINT}")
    elif blackjax is not None:
        chain_outputs, nuts_info = run_nuts(
            blackjax,
            module,
            data,
            inputs,
            prior_std=prior_std,
            chains=args.nuts_chains,
            warmup=args.nuts_warmup,
            samples=args.nuts_samples,
            seed=args.data_seed,
            log=log,
        )
        nuts_info.update(chain_diagnostics(blackjax, chain_outputs[:, :, :num_grid], GRID))
        record("NUTS", [chain_outputs.reshape(-1, *chain_outputs.shape[2:])])
        log(
            f"NUTS: {nuts_info['seconds']:.0f} s, mean {nuts_info['mean_leapfrog_steps']:.0f} "
            f"leapfrog steps per draw, {nuts_info['divergent']} divergent transitions, "
            f"f in the gap: max R-hat {nuts_info.get('max_rhat', float('nan')):.3f}, "
            f"min ESS {nuts_info['min_ess']:.0f}; gap std per chain "
            + " ".join(f"{s:.3f}" for s in nuts_info["per_chain_gap_std"])
        )

    reference = results["NUTS"]["gap_std"][0] if "NUTS" in results else None
    log(
        f"\nepistemic std of f (no noise): data = mean over {DATA_REGION[0]} <= |x| <= "
        f"{DATA_REGION[1]}, gap = mean over |x| <= {GAP_REGION[1]}; "
        f"{args.seeds} seed(s) for the VI methods (mean ± std)"
    )
    header = f"{'method':<12} {'data std':>15} {'gap std':>15} {'gap / NUTS':>15} "
    header += f"{'test RMSE':>15} {'test NLL':>15}"
    log(header)
    for name, row in results.items():
        ratio = (
            _format([gap_ratio(g, reference) for g in row["gap_std"]], 2) if reference else "n/a"
        )
        row["gap_ratio"] = [gap_ratio(g, reference) for g in row["gap_std"]] if reference else None
        log(
            f"{name:<12} {_format(row['data_std']):>15} {_format(row['gap_std']):>15} "
            f"{ratio:>15} {_format(row['rmse']):>15} {_format(row['nll']):>15}"
        )

    plot(args, data, results)
    return {"results": results, "nuts": nuts_info}


def plot(args: argparse.Namespace, data, results: dict) -> None:
    """The three bands (seed 0) and the epistemic std against x (every seed), as a PNG."""
    x, y = data
    grid = GRID.ravel()
    colors = {"NUTS": "k", "implicit VI": "C0", "IVON": "C1"}
    fig, (bands, stds) = pyplot().subplots(1, 2, figsize=(13, 4.5), width_ratios=(1.4, 1))
    for ax in (bands, stds):
        ax.axvspan(-GAP, GAP, color="0.93")
    for name in ("NUTS", "implicit VI", "IVON"):
        if name not in results:
            continue
        summary = results[name]["summaries"][0]  # seed 0 for the variational methods
        mean, std, color = summary["mean"], summary["std"], colors[name]
        if name == "NUTS":
            bands.plot(grid, mean - 2 * std, color=color, lw=1.2, ls="--")
            bands.plot(grid, mean + 2 * std, color=color, lw=1.2, ls="--", label="NUTS ± 2 std")
        else:
            bands.fill_between(
                grid,
                mean - 2 * std,
                mean + 2 * std,
                color=color,
                alpha=0.25,
                label=f"{name} ± 2 std",
            )
        bands.plot(grid, mean, color=color, lw=1)
        for summary in results[name]["summaries"]:
            stds.plot(grid, summary["std"], color=color, lw=1, alpha=0.8)
        stds.plot([], [], color=color, label=name)
    bands.plot(grid, np.sin(3 * grid), ":", color="0.4", lw=1, label="sin(3x)")
    bands.scatter(x.ravel(), y.ravel(), s=6, color="C3", zorder=3, label="training data")
    bands.set_ylim(-3, 3)
    bands.set_xlabel("x")
    bands.set_ylabel("f(x)")
    bands.set_title(f"Epistemic bands, MLP 1-{args.width}-{args.width}-1 (gap shaded)")
    bands.legend(loc="lower right", fontsize=8)
    stds.set_yscale("log")
    stds.set_xlabel("x")
    stds.set_ylabel("std of f(x) (no noise)")
    stds.set_title("Epistemic std (every seed)")
    stds.legend(loc="upper right", fontsize=8)
    print(f"saved {os.path.relpath(save_figure(fig, args.output))}", flush=True)


if __name__ == "__main__":
    main()
