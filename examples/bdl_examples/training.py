"""The examples' fit loop: one jitted ``lax.scan`` per epoch over shuffled minibatches.

``fit`` runs any step function ``step(state, key, batch) -> (state, aux)``; every example
trains through it (MAP, IVON, implicit VI). ``fit_cross_entropy`` is the Optax loop on a
classifier's mean cross-entropy, with a ``sample`` hook that chooses where the gradient is
taken: at the parameters (AdamW) or at a posterior sample (``ivon.sample_parameters``).
``epoch_runner`` is ``fit``'s compiled epoch, for loops that act between epochs (checkpoints).

Example:
  >>> import numpy as np, optax
  >>> from bdl_examples.models import MLP
  >>> x = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
  >>> y = (x[:, 0] > 0).astype(np.int32)
  >>> model = MLP(widths=(8,), num_outputs=2)
  >>> params = model.init(jax.random.key(0), x[:1])["params"]
  >>> result = fit_cross_entropy(model, params, optax.adam(3e-2), x, y, epochs=30,
  ...                            batch_size=16, key=jax.random.key(1), verbose=False)
  >>> result.history[-1]["loss"] < 0.2 < result.history[0]["loss"]
  True
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bdl_examples.data import epoch_batches
from bdl_examples.progress import ProgressBar

Step = Callable[[Any, jax.Array, tuple], tuple[Any, dict]]
Sample = Callable[[jax.Array, Any, Any], tuple[Any, Any]]


class FitResult(NamedTuple):
    state: Any  # the final state of the step function
    history: list[dict]  # per epoch: the mean of every aux value over the epoch's steps
    seconds: float  # wall time of the loop, compilation included


def fit(
    step: Step,
    state,
    x,
    y,
    *,
    epochs: int,
    batch_size: int,
    key: jax.Array,
    label: str = "fit",
    verbose: bool = True,
) -> FitResult:
    """Runs ``step(state, key, (x_batch, y_batch)) -> (state, aux)`` for ``epochs`` epochs.

    Each epoch is one jitted ``lax.scan`` over shuffled minibatches (the remainder is
    dropped); every step gets its own key. ``aux`` is a dict of scalars, averaged over the
    epoch into ``history``. With ``verbose`` a progress bar shows the epochs and the last
    epoch's values.

    Returns:
      ``FitResult(state, history, seconds)``.
    """
    run_epoch = epoch_runner(step, x, y, batch_size=batch_size)
    bar = ProgressBar(epochs, f"  {label}") if verbose else None
    start = time.perf_counter()
    history = []
    for epoch in range(1, epochs + 1):
        state, key, aux = run_epoch(state, key)
        history.append({k: float(v) for k, v in aux.items()})
        if bar is not None:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in history[-1].items())
            bar.update(epoch, f"{shown}  ({time.perf_counter() - start:.1f} s)")
    if bar is not None:
        bar.close()
    return FitResult(state, history, time.perf_counter() - start)


def epoch_runner(step: Step, x, y, *, batch_size: int):
    """The jitted epoch of ``fit``: ``run_epoch(state, key) -> (state, key, means)``.

    One ``lax.scan`` of ``step`` over shuffled minibatches of ``(x, y)`` (the remainder is
    dropped), every step with its own key; ``means`` holds the epoch's mean of every ``aux``
    value and ``key`` is the one to pass to the next epoch. For loops that do something
    between epochs, such as writing a checkpoint: the function is compiled once and reused.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def run_epoch(state, key):
        key, shuffle = jax.random.split(key)

        def body(carry, batch):
            state, key = carry
            key, sub = jax.random.split(key)
            state, aux = step(state, sub, batch)
            return (state, key), aux

        batches = epoch_batches(shuffle, x, y, batch_size)
        (state, key), aux = jax.lax.scan(body, (state, key), batches)
        return state, key, jax.tree.map(jnp.mean, aux)

    return run_epoch


def cross_entropy(model, params, x, y) -> jax.Array:
    """The mean softmax cross-entropy of a linen classifier on integer labels."""
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def fit_cross_entropy(
    model,
    params,
    optimizer: optax.GradientTransformation,
    x,
    y,
    *,
    epochs: int,
    batch_size: int,
    key: jax.Array,
    sample: Sample | None = None,
    label: str = "fit",
    verbose: bool = True,
) -> FitResult:
    """Optax training of a linen classifier on its mean cross-entropy.

    Args:
      sample: ``sample(key, params, opt_state) -> (at, opt_state)`` gives the point where the
        gradient is taken, e.g. ``ivon.sample_parameters`` (None: at ``params``). The update
        is always applied to ``params``.
      The others: as for ``fit``.

    Returns:
      ``FitResult`` whose ``state`` is ``(params, opt_state)``; ``history`` holds ``loss``.
    """

    def step(state, key, batch):
        params, opt_state = state
        at, opt_state = (params, opt_state) if sample is None else sample(key, params, opt_state)
        loss, grads = jax.value_and_grad(cross_entropy, argnums=1)(model, at, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

    return fit(
        step,
        (params, optimizer.init(params)),
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        key=key,
        label=label,
        verbose=verbose,
    )


def report_ivon_posterior(opt_state, *, hess_init: float, beta2: float, label: str = "IVON"):
    """Prints how far IVON's posterior has moved from its initial value, with a warning when
    it has not (the Hessian only decayed from ``hess_init``); returns
    ``ivon.posterior_summary``'s dict."""
    import ivon

    summary = ivon.posterior_summary(opt_state, hess_init=hess_init, beta2=beta2)
    print(
        f"  {label} posterior std: median {summary['std_median']:.4g} "
        f"(5%-95% {summary['std_q05']:.4g}-{summary['std_q95']:.4g}, initial "
        f"{summary['std_initial']:.4g}); h / (hess_init * beta2^t): median "
        f"{summary['hessian_ratio_median']:.3g}, {summary['moved']:.0%} of the weights moved"
    )
    if summary["moved"] < 0.5:
        print(
            f"  warning: {label}'s posterior has hardly moved from its initial value: for most "
            "weights h is within 2x of hess_init * beta2^t, where it would be without data, "
            "so the posterior std reflects hess_init and beta2 more than the data. Train "
            "longer, or lower beta2, or hess_init towards the loss's curvature."
        )
    return summary
