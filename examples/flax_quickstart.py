"""IVON against AdamW on a small real dataset, with a Flax linen MLP.

scikit-learn's handwritten digits (1,797 8x8 images, shipped with the package: nothing is
downloaded), with only a few hundred training images. Both optimizers get the same network,
data, batch size and number of steps. Printed for the test images, and for the same test
images with Gaussian pixel noise (a distribution shift the network never saw): accuracy,
negative log-likelihood (NLL), Brier score and expected calibration error (ECE, 15
equal-width bins, from examples/metrics.py) of

  - AdamW,
  - IVON at the posterior mean ("IVON@mean"),
  - IVON's Bayesian model average over 64 posterior samples ("IVON BMA-64"),

averaged over --seeds runs (different splits and initialisations). Plots (reliability
diagrams on both test sets, and predictive entropies on the noisy images) go to
examples/output/flax_quickstart.png.

  python examples/flax_quickstart.py                 # well under a minute on a laptop CPU
  python examples/flax_quickstart.py --train-size 1000 --noise 0.3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from metrics import classification_metrics, plot_reliability, predictive_entropy

import ivon


class MLP(nn.Module):
    hidden: int = 256

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(10)(x)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_data(train_size: int, seed: int, noise: float):
    """Train and test splits with pixels in [0, 1], and the test images with Gaussian noise of
    standard deviation `noise` added (clipped to [0, 1])."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    train, test = order[:train_size], order[train_size:]
    noisy = np.clip(x[test] + noise * rng.normal(size=x[test].shape), 0, 1).astype(np.float32)
    return (x[train], y[train]), (x[test], y[test]), noisy


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def cross_entropy(model, params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def epoch_batches(key, x, y, batch_size):
    """One epoch of shuffled minibatches, stacked for jax.lax.scan (drops the remainder)."""
    steps = len(x) // batch_size
    order = jax.random.permutation(key, len(x))[: steps * batch_size]
    return x[order].reshape(steps, batch_size, -1), y[order].reshape(steps, batch_size)


def train(model, params, optimizer, x, y, *, epochs, batch_size, seed, use_ivon, label):
    """Train for `epochs` epochs; every epoch is one jitted scan over its minibatches."""
    opt_state = optimizer.init(params)

    def step(carry, batch):
        params, opt_state, key = carry
        key, sample_key = jax.random.split(key)
        bx, by = batch
        if use_ivon:  # the gradient is taken at a posterior sample
            psample, opt_state = ivon.sample_parameters(sample_key, params, opt_state)
            loss, grads = jax.value_and_grad(lambda p: cross_entropy(model, p, bx, by))(psample)
        else:
            loss, grads = jax.value_and_grad(lambda p: cross_entropy(model, p, bx, by))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), loss

    @jax.jit
    def run_epoch(params, opt_state, key):
        key, shuffle_key = jax.random.split(key)
        batches = epoch_batches(shuffle_key, x, y, batch_size)
        (params, opt_state, key), losses = jax.lax.scan(step, (params, opt_state, key), batches)
        return params, opt_state, key, losses.mean()

    key = jax.random.key(seed)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        params, opt_state, key, loss = run_epoch(params, opt_state, key)
        if epoch % max(1, epochs // 5) == 0 or epoch == epochs:
            print(
                f"  {label:<6} epoch {epoch:4d}/{epochs}  train loss {float(loss):.4f}  "
                f"({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    return params, opt_state


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def run(args, seed: int) -> dict:
    (x_train, y_train), (x_test, y_test), x_noisy = load_data(args.train_size, seed, args.noise)
    x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
    model = MLP(args.hidden)
    params = model.init(jax.random.key(seed), x_train[:1])["params"]
    steps_per_epoch = len(x_train) // args.batch_size
    total_steps = args.epochs * steps_per_epoch

    adamw = optax.adamw(
        optax.cosine_decay_schedule(args.adamw_lr, total_steps),
        weight_decay=args.adamw_weight_decay,
    )
    ivon_optimizer = ivon.ivon(
        optax.warmup_cosine_decay_schedule(0.0, args.ivon_lr, steps_per_epoch, total_steps),
        ess=float(args.train_size),
        hess_init=args.hess_init,
        beta2=args.beta2,
        weight_decay=args.ivon_weight_decay,
    )

    print(
        f"seed {seed}: {len(x_train)} training and {len(x_test)} test images, "
        f"{total_steps} steps of batch {args.batch_size} for each optimizer"
    )
    adamw_params, _ = train(
        model,
        params,
        adamw,
        x_train,
        y_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=seed,
        use_ivon=False,
        label="AdamW",
    )
    ivon_params, ivon_state = train(
        model,
        params,
        ivon_optimizer,
        x_train,
        y_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=seed,
        use_ivon=True,
        label="IVON",
    )

    def predict(p, x):
        return jax.nn.softmax(model.apply({"params": p}, x))

    bma = jax.jit(ivon.bayesian_model_average(predict, args.samples, batch_size=8))
    bma_name = f"IVON BMA-{args.samples}"
    probs = {}
    for test_set, x in (("test", x_test), ("noisy test", x_noisy)):
        probs[test_set] = {
            "AdamW": predict(adamw_params, x),
            "IVON@mean": predict(ivon_params, x),
            bma_name: bma(jax.random.key(seed + 1), ivon_params, ivon_state, x),
        }
    sigma = np.concatenate([np.ravel(s) for s in jax.tree.leaves(ivon.posterior_std(ivon_state))])
    print(
        f"  IVON posterior std: median {np.median(sigma):.4f}, "
        f"5%-95% {np.quantile(sigma, 0.05):.4f}-{np.quantile(sigma, 0.95):.4f}"
    )
    return {
        "metrics": {
            test_set: {name: classification_metrics(p, y_test) for name, p in by_method.items()}
            for test_set, by_method in probs.items()
        },
        "probs": probs,
        "labels": y_test,
    }


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (test_set, by_method) in zip(axes, result["probs"].items()):
        for name, probs in by_method.items():
            plot_reliability(ax, probs, result["labels"], label=name)
        ax.set_title(f"Reliability, {test_set} images")
    ax = axes[2]
    noisy = result["probs"]["noisy test"]
    bins = np.linspace(0, np.log(10), 30)
    for name, color in (("AdamW", "tab:blue"), (list(noisy)[2], "tab:green")):
        entropy = predictive_entropy(noisy[name])
        ax.hist(
            entropy, bins=bins, alpha=0.6, color=color, label=f"{name} (mean {entropy.mean():.2f})"
        )
    ax.set(
        xlabel="predictive entropy (nats)",
        ylabel="noisy test images",
        title="Uncertainty on the noisy test images",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-size", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument(
        "--noise",
        type=float,
        default=0.4,
        help="std of the pixel noise of the shifted test set (pixels in [0, 1])",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--samples", type=int, default=64, help="posterior samples for the BMA")
    parser.add_argument("--seeds", type=int, default=3, help="average over this many seeds")
    parser.add_argument("--adamw-lr", type=float, default=1e-3)
    parser.add_argument("--adamw-weight-decay", type=float, default=1e-4)
    parser.add_argument("--ivon-lr", type=float, default=0.3)
    parser.add_argument("--hess-init", type=float, default=1.0)
    parser.add_argument("--beta2", type=float, default=0.999)
    parser.add_argument("--ivon-weight-decay", type=float, default=1e-4)
    parser.add_argument(
        "--output",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "output", "flax_quickstart.png"
        ),
    )
    args = parser.parse_args(argv)
    if args.samples % 8:
        parser.error("--samples must be a multiple of 8")

    start = time.perf_counter()
    results = [run(args, seed) for seed in range(args.seeds)]
    for test_set in results[0]["metrics"]:
        extra = f", pixel noise std {args.noise}" if test_set == "noisy test" else ""
        print(
            f"\n{test_set} images ({args.train_size} training images{extra}; "
            f"mean over {args.seeds} seed(s)):"
        )
        print(f"{'method':<14} {'accuracy':>9} {'NLL':>8} {'Brier':>8} {'ECE':>8}")
        for name, first in results[0]["metrics"][test_set].items():
            row = {k: np.mean([r["metrics"][test_set][name][k] for r in results]) for k in first}
            print(
                f"{name:<14} {row['accuracy']:>9.4f} {row['nll']:>8.4f} {row['brier']:>8.4f} "
                f"{row['ece']:>8.4f}"
            )
    plot(results[0], args.output)
    print(f"\nsaved {args.output}  (total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
