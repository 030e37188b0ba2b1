"""1-D regression with a gap in the inputs, with an implicit posterior over a Flax MLP.

Data: y = sin(3x) + 0.1 noise, with x drawn from [-1, -0.4] and [0.4, 1] only. A Bayesian
network should be confident where there are data and uncertain in the gap (and beyond the
data). The MLP 1-16-16-1 becomes Bayesian with implicit_vi's automatic multi-head generator
(noise 6 x 6, so d = 36 latent dimensions for D = 321 weights), trained on the per-data-point
ELBO with the exact linearised entropy. Prints the fit and the predictive uncertainty on the
data and in the gap, and saves examples/output/implicit_vi_regression.png.

Usage:
  python examples/implicit_vi_regression.py [--steps 3000] [--samples 8] [--seed 0]
                                            [--width 16] [--noise-side 6]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import implicit_vi as ivi

NOISE_STD = 0.1
OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")


class MLP(nn.Module):
    width: int = 32

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(self.width)(x))
        x = nn.tanh(nn.Dense(self.width)(x))
        return nn.Dense(1)(x)


def make_data(rng: np.random.Generator, n: int):
    x = np.concatenate([rng.uniform(-1, -0.4, n // 2), rng.uniform(0.4, 1, n - n // 2)])[:, None]
    y = np.sin(3 * x) + NOISE_STD * rng.normal(size=x.shape)
    return x.astype(np.float32), y.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--samples", type=int, default=8, help="Monte Carlo samples per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=16, help="hidden width of the MLP")
    parser.add_argument("--noise-side", type=int, default=6, help="latent noise k x k (d = k^2)")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    x, y = make_data(rng, 40)
    x_test, y_test = make_data(rng, 200)  # held out, same input region

    model = MLP(args.width)
    params = model.init(jax.random.key(args.seed), x[:1])["params"]
    bnn = ivi.ImplicitBNN.from_linen(
        model,
        params,
        likelihood=ivi.Gaussian(noise_std=NOISE_STD),
        noise_shape=(args.noise_side, args.noise_side),
        head_hidden=16,
    )
    print(bnn.report())
    vi_params = bnn.init(jax.random.key(args.seed))
    optimizer = optax.adam(optax.cosine_decay_schedule(1e-2, args.steps, alpha=0.1))
    opt_state = optimizer.init(vi_params)
    train_step = bnn.make_train_step(
        optimizer, num_data=len(x), num_samples=args.samples, entropy="exact"
    )

    start = time.perf_counter()
    for step in range(args.steps):
        vi_params, opt_state, aux = train_step(
            vi_params, opt_state, jax.random.key(10_000 + step), (x, y)
        )
        if step % 500 == 0 or step == args.steps - 1:
            print(
                f"step {step:>5}/{args.steps}  loss {float(aux['loss']):8.3f}  "
                f"E[log lik] {float(aux['expected_log_likelihood']):7.3f}  "
                f"entropy {float(aux['entropy']):10.1f}  ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )

    mean, variance = bnn.predict_mean_var(vi_params, jax.random.key(1), x_test, num_samples=200)
    rmse = float(jnp.sqrt(jnp.mean((mean - y_test) ** 2)))
    test_ll = float(
        jnp.mean(-0.5 * (y_test - mean) ** 2 / variance - 0.5 * jnp.log(2 * math.pi * variance))
    )
    grid = np.linspace(-1.5, 1.5, 301, dtype=np.float32)[:, None]
    grid_mean, grid_var = bnn.predict_mean_var(vi_params, jax.random.key(2), grid, num_samples=300)
    _, epistemic = bnn.predict_mean_var(
        vi_params, jax.random.key(2), grid, num_samples=300, include_noise=False
    )
    epistemic_std = np.sqrt(np.asarray(epistemic)).ravel()
    where = np.abs(grid.ravel())
    on_data = epistemic_std[(where >= 0.45) & (where <= 0.95)].mean()
    in_gap = epistemic_std[where <= 0.2].mean()
    print(
        f"\ntest RMSE {rmse:.3f} (noise std {NOISE_STD}), "
        f"test Gaussian log-likelihood {test_ll:.3f}"
    )
    print(
        f"epistemic std: on the data {on_data:.3f}, in the gap {in_gap:.3f} "
        f"({in_gap / on_data:.1f}x)"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(OUTPUT, exist_ok=True)
    g, m = grid.ravel(), np.asarray(grid_mean).ravel()
    total_std = np.sqrt(np.asarray(grid_var)).ravel()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.axvspan(-0.4, 0.4, color="0.93", label="gap (no data)")
    ax.fill_between(
        g,
        m - 2 * total_std,
        m + 2 * total_std,
        color="C0",
        alpha=0.15,
        label="mean ± 2 std (total)",
    )
    ax.fill_between(
        g,
        m - 2 * epistemic_std,
        m + 2 * epistemic_std,
        color="C0",
        alpha=0.35,
        label="mean ± 2 std (epistemic)",
    )
    ax.plot(g, m, color="C0", label="predictive mean")
    ax.plot(g, np.sin(3 * g), "k--", lw=1, label="sin(3x)")
    ax.scatter(x.ravel(), y.ravel(), s=12, color="C3", zorder=3, label="training data")
    ax.set_ylim(-2.5, 2.5)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(
        f"Implicit VI (MM generator, exact linearised entropy), MLP 1-{args.width}-{args.width}-1"
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = os.path.join(OUTPUT, "implicit_vi_regression.png")
    fig.savefig(path, dpi=120)
    print(f"saved {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
