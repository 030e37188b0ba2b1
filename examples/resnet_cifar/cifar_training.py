"""The pieces of ``train.py`` and ``test.py``: optimizers, learning-rate schedule, the jitted
data-parallel training and prediction steps. Checkpoints are ``bdl_examples.checkpoints``'s
``.npz`` files (``CHECKPOINT`` in the run folder).

Data parallelism uses ``jax.sharding`` with one mesh axis, ``"data"``, over every device of
every process: each batch is split across the devices, the parameters, BatchNorm statistics
and optimizer state are replicated, and one ``jax.jit`` program runs the whole step. XLA adds
the all-reduces (gradients, BatchNorm batch statistics over the whole batch). IVON draws one
posterior sample per step for the whole batch, exactly as on one device, so a run gives the
same numbers on 1, 4 or 64 devices (up to the order of floating-point sums).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import cifar_data
import jax
import jax.numpy as jnp
import numpy as np
import optax
from bdl_examples.data import IMAGE_SHAPE
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ivon

OPTIMIZERS = ("sgd", "adamw", "ivon")
CHECKPOINT = "checkpoint.npz"  # in the run folder, written after every epoch
DEFAULT_ALPHA = {"sgd": 0.03, "adamw": 1e-3, "ivon": 0.5}  # the seed's values
DEFAULT_BETA2 = {"adamw": 0.999, "ivon": 0.99999}


class TrainState(NamedTuple):
    """Everything a run updates: parameters (IVON: the posterior mean), BatchNorm running
    statistics, optimizer state."""

    params: Any
    batch_stats: Any
    opt_state: Any


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------


def learning_rate_schedule(alpha: float, warmup_steps: int, total_steps: int) -> Callable:
    """Linear warm-up to ``alpha`` over ``warmup_steps`` steps, then cosine decay to 0.

    Step ``t`` (counted from 0) gets ``alpha * (t + 1) / warmup_steps`` during the warm-up
    (so the first step already moves), then ``alpha * (1 + cos(pi * u)) / 2`` with
    ``u = (t - warmup_steps) / (total_steps - warmup_steps)``, which reaches 0 after the
    last step.

    Example:
      >>> schedule = learning_rate_schedule(1.0, 2, 6)
      >>> [round(float(schedule(t)), 3) for t in range(6)]
      [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
    """

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm = alpha * (t + 1) / max(warmup_steps, 1)
        progress = jnp.clip((t - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        decay = 0.5 * alpha * (1 + jnp.cos(math.pi * progress))
        return jnp.where(t < warmup_steps, warm, decay)

    return schedule


def make_optimizer(
    name: str,
    schedule: Callable,
    *,
    num_train: int,
    priorprec: float,
    beta1: float,
    beta2: float | None = None,
    hess_init: float = 0.5,
    dafactor: float = 1.0,
    mcsamples: int = 1,
) -> optax.GradientTransformation:
    """The optimizer of a run; the weight decay is ``priorprec / num_train`` for all three.

    - ``sgd``: heavy-ball momentum ``beta1``, weight decay added to the gradient (PyTorch's
      ``SGD(momentum=beta1, weight_decay=wd)``).
    - ``adamw``: Adam (``beta1``, ``beta2``, default 0.999) with **decoupled** weight decay, as
      the name says (Loshchilov & Hutter; Optax's and PyTorch's ``AdamW``): the step subtracts
      ``lr * wd * theta``.
    - ``ivon``: ``ivon.ivon`` with ``ess = num_train * dafactor``, ``weight_decay = wd`` (the
      prior N(0, 1 / (ess * wd))), ``hess_init``, ``beta1``, ``beta2`` (default 0.99999);
      built with ``accumulate=True`` when ``mcsamples > 1``.
    """
    weight_decay = priorprec / num_train
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=beta1)
        )
    if name == "adamw":
        b2 = DEFAULT_BETA2["adamw"] if beta2 is None else beta2
        return optax.adamw(schedule, b1=beta1, b2=b2, weight_decay=weight_decay)
    if name == "ivon":
        return ivon.ivon(
            schedule,
            ess=num_train * dafactor,
            hess_init=hess_init,
            beta1=beta1,
            beta2=DEFAULT_BETA2["ivon"] if beta2 is None else beta2,
            weight_decay=weight_decay,
            accumulate=mcsamples > 1,
        )
    raise ValueError(f"unknown optimizer {name!r}; accepted: {list(OPTIMIZERS)}")


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


def make_mesh() -> Mesh:
    """A 1-D mesh ``"data"`` over every device of every process."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def replicate(tree, mesh: Mesh):
    """Host arrays -> global arrays replicated on every device of ``mesh`` (every process
    passes the same values)."""
    sharding = NamedSharding(mesh, P())

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def to_host(tree):
    """Replicated global arrays -> NumPy, from this process's own copy (no communication).

    Unlike ``bdl_examples.checkpoints.to_host`` this works when the arrays span several
    processes (``--distributed``), where ``jax.device_get`` refuses them."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


# --------------------------------------------------------------------------------------------
# Model state and steps
# --------------------------------------------------------------------------------------------


def init_state(model, optimizer, key: jax.Array, mesh: Mesh) -> TrainState:
    """Initial parameters, BatchNorm statistics and optimizer state, replicated on ``mesh``.

    The network and the optimizer state are initialised by two programs: the first, whose
    random initialisers take most of the compilation, is then the same for every optimizer
    (one entry in a compilation cache)."""
    replicated = NamedSharding(mesh, P())

    def init_model(key):
        return model.init(key, jnp.zeros((1, *IMAGE_SHAPE)), train=False)

    variables = jax.jit(init_model, out_shardings=replicated)(key)
    opt_state = jax.jit(optimizer.init, out_shardings=replicated)(variables["params"])
    return TrainState(variables["params"], variables["batch_stats"], opt_state)


def make_train_step(
    model,
    optimizer,
    *,
    optim: str,
    dataset: str,
    batch_size: int,
    steps_per_epoch: int,
    mcsamples: int,
    augment: bool,
    key: jax.Array,
    mesh: Mesh,
) -> Callable:
    """The jitted training step ``step(state, images, labels, order, t) -> (state, stats)``.

    Args (of the returned function):
      state: a :class:`TrainState` (donated).
      images, labels: the whole training set on the devices (uint8 images, int32 labels).
      order: this epoch's permutation of the training set.
      t: the global step number; batch ``t mod steps_per_epoch`` of the epoch is taken from
        ``order``, and the augmentation and IVON noise keys are ``fold_in(key, t)``, so a
        resumed run draws exactly the numbers of an uninterrupted one.

    Returns:
      The function, whose ``stats`` are the batch's mean loss and accuracy (IVON: averaged over
      the ``mcsamples`` posterior samples, whose forward passes also update the BatchNorm
      statistics, one after the other).
    """
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))

    def loss_fn(params, batch_stats, images, labels):
        logits, updated = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        return loss, (updated["batch_stats"], correct)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, all_images, all_labels, order, t):
        params, batch_stats, opt_state = state
        augment_key, sample_key = jax.random.split(jax.random.fold_in(key, t))
        start = (t % steps_per_epoch) * batch_size
        index = jax.lax.dynamic_slice_in_dim(order, start, batch_size)
        images = jax.lax.with_sharding_constraint(all_images[index], batch_sharding)
        labels = jax.lax.with_sharding_constraint(all_labels[index], batch_sharding)
        if augment:
            images = cifar_data.augment(augment_key, images)
        images = cifar_data.normalize(images, dataset)

        if optim != "ivon":
            (loss, (batch_stats, correct)), grads = grad_fn(params, batch_stats, images, labels)
        else:
            sample_keys = jax.random.split(sample_key, mcsamples)

            def accumulate(carry, sample_key):  # samples 1..S-1: gradient into the sums
                batch_stats, opt_state = carry
                psample, opt_state = ivon.sample_parameters(sample_key, params, opt_state)
                (loss, (batch_stats, correct)), grads = grad_fn(
                    psample, batch_stats, images, labels
                )
                opt_state = ivon.accumulate_gradients(grads, opt_state)
                return (batch_stats, opt_state), (loss, correct)

            losses, corrects = jnp.zeros(0), jnp.zeros(0)
            if mcsamples > 1:
                (batch_stats, opt_state), (losses, corrects) = jax.lax.scan(
                    accumulate, (batch_stats, opt_state), sample_keys[:-1]
                )
            psample, opt_state = ivon.sample_parameters(sample_keys[-1], params, opt_state)
            (loss, (batch_stats, correct)), grads = grad_fn(psample, batch_stats, images, labels)
            loss = (jnp.sum(losses) + loss) / mcsamples
            correct = (jnp.sum(corrects) + correct) / mcsamples

        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        stats = {"loss": loss, "accuracy": correct / batch_size}
        return TrainState(params, batch_stats, opt_state), stats

    return jax.jit(
        step,
        in_shardings=(replicated, replicated, replicated, replicated, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def evaluation_key(randomseed: int) -> jax.Array:
    """The key of the posterior samples of test predictions (train.py's per-epoch evaluation
    and, by default, test.py's), so that both evaluate the same sampled networks."""
    return jax.random.fold_in(jax.random.key(randomseed), 3)


def make_epoch_order(num_train: int, key: jax.Array, mesh: Mesh) -> Callable:
    """``order(epoch)``: the jitted, replicated random permutation of the training set."""
    return jax.jit(
        lambda epoch: jax.random.permutation(jax.random.fold_in(key, epoch), num_train),
        out_shardings=NamedSharding(mesh, P()),
    )


def make_predict(
    model, *, dataset: str, batch_size: int, mesh: Mesh, bma_samples: int = 0
) -> Callable:
    """Jitted class probabilities for one test batch.

    Returns ``predict(state, images, start, key)`` -> probabilities (``batch_size`` x C,
    replicated) of ``images[start : start + batch_size]``: at the parameters (IVON: the
    posterior mean) when ``bma_samples == 0``, else IVON's Bayesian model average over that
    many posterior samples. Both use the BatchNorm running statistics. Pass the same ``key``
    for every batch: the K sampled networks are then one ensemble over the whole test set.
    """
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))

    def probabilities(params, batch_stats, images):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
        return jax.nn.softmax(logits.astype(jnp.float32))

    average = ivon.bayesian_model_average(probabilities, max(bma_samples, 1))

    def batch(all_images, start):
        images = jax.lax.dynamic_slice_in_dim(all_images, start, batch_size)
        images = jax.lax.with_sharding_constraint(images, batch_sharding)
        return cifar_data.normalize(images, dataset)

    @functools.partial(jax.jit, out_shardings=replicated)
    def at_parameters(params, batch_stats, all_images, start):
        return probabilities(params, batch_stats, batch(all_images, start))

    @functools.partial(jax.jit, out_shardings=replicated)
    def model_average(key, params, batch_stats, opt_state, all_images, start):
        return average(key, params, opt_state, batch_stats, batch(all_images, start))

    def predict(state, all_images, start, key):
        if bma_samples:  # the optimizer state holds the posterior's variances
            return model_average(
                key, state.params, state.batch_stats, state.opt_state, all_images, start
            )
        return at_parameters(state.params, state.batch_stats, all_images, start)

    predict.at_parameters, predict.model_average = at_parameters, model_average  # for tests
    return predict


def pad_to_multiple(images: np.ndarray, multiple: int) -> np.ndarray:
    """Zero images appended so that the count is a multiple of ``multiple``."""
    extra = -len(images) % multiple
    return np.concatenate([images, np.zeros((extra, *images.shape[1:]), images.dtype)])


def predict_dataset(predict: Callable, state, device_images, count: int, batch_size: int, key):
    """Probabilities (``count`` x C, NumPy) for the first ``count`` images of a padded set."""
    outputs = [
        predict(state, device_images, start, key)
        for start in range(0, device_images.shape[0], batch_size)
    ]
    return np.concatenate([to_host(o) for o in outputs])[:count]


def posterior_std_quantiles(opt_state, quantiles=(0.05, 0.5, 0.95)) -> dict:
    """Quantiles of IVON's posterior standard deviation over all parameters."""
    # jitted: one compilation, instead of one per operation and parameter shape
    leaves = jax.tree.leaves(to_host(jax.jit(ivon.posterior_std)(opt_state)))
    sigma = np.concatenate([np.ravel(s) for s in leaves])
    return {f"sigma_q{round(100 * q):02d}": float(np.quantile(sigma, q)) for q in quantiles}
