"""The methods the examples compare, each trained through ``bdl_examples.training``.

The uncertainty suite (``examples/uncertainty_eval.py``) and the implicit-VI sweep
(``examples/implicit_vi_defaults_study.py``) train the same MLP in the same loop with:

- ``train_map``: AdamW with a cosine schedule, optionally temperature-scaled on validation;
- ``train_ivon``: IVON, predicting by the Bayesian model average (BMA) over posterior samples;
- ``train_implicit``: implicit VI (``implicit_vi.py``) with the library's defaults, or any of
  its options: ``ImplicitBNN.from_linen``, ``bnn.trainer``, and ``trainer.init`` /
  ``trainer.step`` in the harness's loop;
- ``select_on_validation``: one training per candidate value, the lowest validation NLL kept.

``train_method`` builds the network and calls them under the suite's names (``METHODS``). Each
returns ``(predict, info)``: ``predict(key, x) -> probs`` (NumPy, rows summing to one) and a
dict with the training ``history`` and ``train_seconds``. ``mean_std`` summarises results over
seeds. The suite's ``ivi`` is the library's quick start, ``implicit_vi.select_kl_weight``: the
library's defaults at each KL weight of ``implicit_vi.KL_WEIGHTS``, the one with the best
validation likelihood kept. (The implicit-VI paper's runs are rebuilt by ``bdl_examples.paper``.)

Example:
  >>> from bdl_examples.data import hold_out, spiral_task
  >>> data = hold_out(spiral_task(0, num_train=100, num_test=50), 0.2, seed=0)
  >>> predict, info = train_method("map-ts", data, hidden=(8,), seed=0, epochs=1,
  ...                              batch_size=16, verbose=False)
  >>> predict(jax.random.key(0), data["test"][0]).shape, list(info["selected"])
  ((50, 3), ['temperature'])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import implicit_vi as ivi
import ivon
from bdl_examples.metrics import nll
from bdl_examples.models import MLP
from bdl_examples.training import fit, fit_cross_entropy, report_ivon_posterior

Predict = Callable[[jax.Array, np.ndarray], np.ndarray]

METHODS = {
    "map": "MAP (AdamW)",
    "map-ts": "MAP + temperature scaling",
    "ivon": "IVON (BMA)",
    "ivon-val": "IVON, ess on validation",
    "ll-ivi": "last-layer implicit VI",
    "ivi-paper": "implicit VI, paper's fixed noise",
    "ivi": "implicit VI (library defaults, β on validation)",
}
# IVON's candidate effective sample sizes (x N), chosen by validation NLL; implicit VI's
# candidate KL weights are the library's, ``implicit_vi.KL_WEIGHTS``.
IVON_ESS_SCALES = (0.1, 0.3, 1.0, 3.0, 10.0)
# The paper's posterior (``ivi-paper``): one fixed weight noise std and the N(0, 1) prior, with
# the untempered ELBO (kl_weight 1), where the library's defaults learn the noise per weight and
# take each layer's initial std as its prior's.
PAPER_POSTERIOR = {"weight_noise": 1e-3, "prior_std": 1.0}


# ----- the methods -----------------------------------------------------------------------------


def train_map(
    model,
    params,
    data: dict,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    temperature_scaling: bool = False,
    verbose: bool = True,
) -> tuple[Predict, dict]:
    """AdamW with a cosine schedule on ``data["train"]``; returns ``(predict, info)``.

    With ``temperature_scaling`` the logits are divided by the temperature with the lowest NLL
    on ``data["val"]`` (``info["selected"]``).
    """
    x, y = data["train"]
    steps = epochs * (len(x) // batch_size)
    optimizer = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)
    loop = dict(epochs=epochs, batch_size=batch_size, key=jax.random.key(seed), verbose=verbose)
    result = fit_cross_entropy(model, params, optimizer, x, y, label="MAP", **loop)
    params, _ = result.state
    logits = jax.jit(lambda x: model.apply({"params": params}, x))
    info = {"history": result.history, "train_seconds": result.seconds}
    temperature = 1.0
    if temperature_scaling:
        x_val, y_val = _validation(data)
        temperature = fit_temperature(np.asarray(logits(x_val)), y_val)
        info["selected"] = {"temperature": temperature}
    return (lambda key, x: np.asarray(jax.nn.softmax(logits(x) / temperature))), info


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T in [0.05, 20] minimising the NLL of ``softmax(logits / T)``.

    A grid of 200 log-spaced values refined by golden-section search; the NLL is convex in
    1/T, so the result is the global minimiser within the range.

    Example:
      >>> logits = np.array([[4.0, 0.0], [4.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
      >>> round(fit_temperature(logits, np.array([0, 0, 1, 1])), 2)  # 3 of 4 right: p = 0.75
      3.64
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)

    def nll_at(log_t):
        scaled = logits / np.exp(log_t)
        scaled -= scaled.max(1, keepdims=True)
        log_norm = np.log(np.exp(scaled).sum(1))
        return float(np.mean(log_norm - scaled[np.arange(len(labels)), labels]))

    grid = np.linspace(np.log(0.05), np.log(20.0), 200)
    best = grid[int(np.argmin([nll_at(t) for t in grid]))]
    step = grid[1] - grid[0]
    bounds = (max(grid[0], best - step), min(grid[-1], best + step))
    return float(np.exp(minimize_scalar(nll_at, bounds=bounds, method="bounded").x))


def _validation(data: dict) -> tuple[np.ndarray, np.ndarray]:
    if data.get("val") is None:
        raise ValueError(
            "this method chooses on a validation split: pass data with a 'val' entry "
            "(hold_out(data, fraction, seed))"
        )
    return data["val"]


def select_on_validation(
    train: Callable[[object], tuple[Predict, dict]],
    candidates: Sequence,
    data: dict,
    *,
    key: jax.Array,
    name: str,
    verbose: bool = True,
) -> tuple[Predict, dict]:
    """Trains ``train(value) -> (predict, info)`` for each candidate value and keeps the one
    whose predictions have the lowest NLL on ``data["val"]`` (the first one on a tie).

    Every candidate is scored with the same ``key`` (common random numbers), so that the
    choice reflects the value, not the posterior samples.

    Returns:
      ``(predict, info)`` of the chosen candidate; ``info["selected"]`` holds ``{name:
      value}``, ``info["validation_nll"]`` every candidate's validation NLL and
      ``info["candidates"]`` every candidate's ``predict`` (both keyed by ``str(value)``);
      ``info["train_seconds"]`` is the total over the candidates.

    Example:
      >>> data = {"val": (np.zeros((2, 1)), np.array([0, 1]))}
      >>> def train(p):  # a "method" predicting the label with probability p
      ...     return (lambda key, x: np.array([[p, 1 - p], [1 - p, p]])), {"train_seconds": 1.0}
      >>> _, info = select_on_validation(train, [0.6, 0.9], data, key=None, name="p",
      ...                                verbose=False)
      >>> info["selected"], info["train_seconds"]
      ({'p': 0.9}, 2.0)
    """
    x_val, y_val = _validation(data)
    best, scores, predictors, seconds = None, {}, {}, 0.0
    for value in candidates:
        predict, info = train(value)
        scores[str(value)], predictors[str(value)] = nll(predict(key, x_val), y_val), predict
        seconds += info["train_seconds"]
        if best is None or scores[str(value)] < best[0]:
            best = (scores[str(value)], value, predict, info)
    _, value, predict, info = best
    if verbose:
        print(f"    chosen on validation: {name} = {value} (NLL {scores[str(value)]:.4f})")
    info = dict(info, selected={name: value}, validation_nll=scores, train_seconds=seconds)
    info["candidates"] = predictors
    return predict, info


def train_ivon(
    model,
    params,
    data: dict,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    test_samples: int = 64,
    lr: float = 0.3,
    hess_init: float = 1.0,
    beta2: float = 0.999,
    weight_decay: float = 1e-4,
    ess_scale: float = 1.0,
    verbose: bool = True,
) -> tuple[Predict, dict]:
    """IVON (one sample per step, one epoch of warm-up then cosine), ``ess = ess_scale * N``;
    predicts by the BMA over ``test_samples`` posterior samples."""
    x, y = data["train"]
    steps_per_epoch = len(x) // batch_size
    optimizer = ivon.ivon(
        optax.warmup_cosine_decay_schedule(0.0, lr, steps_per_epoch, epochs * steps_per_epoch),
        ess=ess_scale * len(x),
        hess_init=hess_init,
        beta2=beta2,
        weight_decay=weight_decay,
    )
    loop = dict(epochs=epochs, batch_size=batch_size, key=jax.random.key(seed), verbose=verbose)
    sample = ivon.sample_parameters
    result = fit_cross_entropy(model, params, optimizer, x, y, sample=sample, label="IVON", **loop)
    params, opt_state = result.state
    if verbose:
        report_ivon_posterior(opt_state, hess_init=hess_init, beta2=beta2)
    # Eight networks at a time when K allows: faster than one, far less memory than all K.
    bma = jax.jit(
        ivon.bayesian_model_average(
            lambda p, x: jax.nn.softmax(model.apply({"params": p}, x)),
            test_samples,
            batch_size=8 if test_samples % 8 == 0 else 1,
        )
    )
    info = {"history": result.history, "train_seconds": result.seconds}
    return (lambda key, x: np.asarray(bma(key, params, opt_state, x))), info


def last_layer(params) -> Callable[[str, object], bool]:
    """The ``stochastic=`` predicate selecting the last Dense layer of a linen MLP (by the
    number in its name: ``Dense_10`` comes after ``Dense_9``)."""
    last = sorted(params, key=lambda name: int(name.rsplit("_", 1)[-1]))[-1]
    return lambda path, _: path.split("/")[0] == last


def train_implicit(
    model,
    params,
    data: dict,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    test_samples: int = 64,
    lr: float = 3e-3,
    samples: int = ivi.TRAIN_SAMPLES,
    stochastic: Callable[[str, object], bool] | None = None,
    model_kwargs: dict | None = None,
    trainer_kwargs: dict | None = None,
    kl_weight: float = 1.0,
    verbose: bool = True,
) -> tuple[Predict, dict]:
    """Implicit VI (``implicit_vi.py``) on ``data["train"]``; predicts by the BMA over
    ``test_samples`` sampled networks.

    ``ivi.ImplicitBNN.from_linen(model, params, **model_kwargs)`` and its
    ``bnn.trainer(optimizer, num_data=N, ...)``, with the optimizer of
    ``ivi.select_kl_weight``: Adam with a cosine decay from ``lr`` to ``lr / 10``. The
    trainer's ``init`` and ``step`` run in the harness's loop (``training.fit``), the
    ``TrainState`` carrying the entropy solver's warm start from step to step. Without
    options, the library's defaults: the automatic generator, learned weight noise, each
    layer's initial std as its prior's, the ELBO (``kl_weight=1``).

    Args:
      lr: the initial learning rate (3e-3: the library's).
      samples: the networks sampled per step (the trainer's ``num_samples``).
      stochastic: selects the Bayesian leaves (None: all), e.g. ``last_layer(params)``.
      model_kwargs: go to ``ImplicitBNN.from_linen``, e.g. ``weight_noise``, ``prior_std``,
        ``calibrate_output``, ``generator``.
      trainer_kwargs: go to ``bnn.trainer``, e.g. ``entropy=ivi.ExactEntropy()`` or
        ``ivi.SmallestSingularValue(...)``, ``prior_scale``.
      kl_weight: beta of the tempered ELBO: prior and entropy weighted beta / N.

    Returns:
      ``(predict, info)``; ``info`` also holds the ``bnn``, its trained ``vi_params`` and the
      network's initial ``params``.
    """
    x, y = data["train"]
    steps = epochs * (len(x) // batch_size)
    model_kwargs = dict(model_kwargs or {})
    bnn = ivi.ImplicitBNN.from_linen(model, params, stochastic=stochastic, **model_kwargs)
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.1))
    trainer = bnn.trainer(
        optimizer,
        num_data=len(x),
        num_samples=samples,
        kl_weight=kl_weight,
        **(trainer_kwargs or {}),
    )
    shown = ("loss", "elbo", "expected_log_likelihood", "solver_iterations")

    def step(state, key, batch):
        state, info = trainer.step(key, state, batch)
        return state, {name: getattr(info, name) for name in shown}

    label = "LL-IVI" if stochastic is not None else "IVI"
    if model_kwargs.get("weight_noise", "learned") != "learned":
        label += f" s={model_kwargs['weight_noise']:g}"
    result = fit(
        step,
        trainer.init(jax.random.key(seed)),
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        key=jax.random.key(seed + 1),
        label=f"{label} β={kl_weight:g}",
        verbose=verbose,
    )
    vi_params = result.state.vi_params

    def predict(key, x):
        return np.asarray(bnn.predict_proba(vi_params, key, x, num_samples=test_samples))

    info = {
        "history": result.history,
        "train_seconds": result.seconds,
        "bnn": bnn,
        "vi_params": vi_params,
        "params": params,
    }
    return predict, info


def suite_network(data: dict, *, hidden: Sequence[int], seed: int):
    """The suite's network for ``data``: ``(MLP(hidden), its params initialised from seed)``."""
    model = MLP(widths=tuple(hidden), num_outputs=data["num_classes"])
    # Compiled once, rather than each of the initialisers' operations on its own shapes.
    init = jax.jit(model.init)
    params = init(jax.random.key(seed), jnp.zeros((1, data["train"][0].shape[1])))["params"]
    return model, params


def train_method(
    method: str,
    data: dict,
    *,
    hidden: Sequence[int],
    seed: int,
    epochs: int,
    batch_size: int,
    test_samples: int = 64,
    samples: int = ivi.TRAIN_SAMPLES,
    lr: float | None = None,
    model_kwargs: dict | None = None,
    trainer_kwargs: dict | None = None,
    kl_weight: float | None = None,
    kl_weights: Sequence[float] = ivi.KL_WEIGHTS,
    ess_scales: Sequence[float] = IVON_ESS_SCALES,
    verbose: bool = True,
) -> tuple[Predict, dict]:
    """Trains ``method`` (a key of ``METHODS``) on ``data["train"]`` with the suite's network,
    ``MLP(hidden)`` initialised from ``seed``; returns ``(predict, info)``.

    The implicit-VI methods (``train_implicit``):

    - ``ivi``: the library's quick start, ``ivi.select_kl_weight`` on the suite's split: the
      library's defaults trained at each KL weight of ``kl_weights`` (``ivi.KL_WEIGHTS``), the
      one whose predictions have the lowest NLL on ``data["val"]`` kept;
    - ``ivi-paper``: the paper's posterior, ``PAPER_POSTERIOR`` (fixed weight noise 1e-3, the
      N(0, 1) prior) with ``kl_weight`` 1;
    - ``ll-ivi``: the library's defaults on the last Dense layer only, ``kl_weight`` 1.

    ``map-ts`` and ``ivon-val`` also use ``data["val"]``: the temperature and the effective
    sample size (``ess_scales`` x N) are chosen on it.

    Args:
      test_samples: K of the BMAs (IVON, implicit VI).
      samples: implicit VI's networks sampled per step (unused by MAP and IVON).
      lr: the learning rate (None: each trainer's default).
      model_kwargs, trainer_kwargs: implicit VI's options (see ``train_implicit``); for
        ``ivi-paper``, ``model_kwargs`` override ``PAPER_POSTERIOR``'s entries.
      kl_weight: implicit VI's beta, for ``ivi-paper`` and ``ll-ivi`` (``ivi`` chooses it
        from ``kl_weights``).

    Raises:
      ValueError: an unknown method, or an implicit-VI option given to a method it does not
        apply to.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    implicit_options = {
        "model_kwargs": model_kwargs,
        "trainer_kwargs": trainer_kwargs,
        "kl_weight": kl_weight,
    }
    # ivi chooses its kl_weight (from kl_weights); MAP and IVON have none of these options.
    settable = {"ivi-paper": set(implicit_options), "ll-ivi": set(implicit_options)}
    settable["ivi"] = {"model_kwargs", "trainer_kwargs"}
    given = [name for name, value in implicit_options.items() if value is not None]
    refused = [name for name in given if name not in settable.get(method, set())]
    if refused:
        raise ValueError(f"method {method!r} takes no {', '.join(refused)}")

    model, params = suite_network(data, hidden=hidden, seed=seed)
    common = {"epochs": epochs, "batch_size": batch_size, "seed": seed, "verbose": verbose}
    if lr is not None:
        common["lr"] = lr
    key = jax.random.key(2000 + seed)  # scores the candidates of the methods that choose
    if method in ("map", "map-ts"):
        return train_map(model, params, data, temperature_scaling=method == "map-ts", **common)
    common["test_samples"] = test_samples
    if method == "ivon":
        return train_ivon(model, params, data, **common)
    if method == "ivon-val":
        return select_on_validation(
            lambda scale: train_ivon(model, params, data, ess_scale=scale, **common),
            ess_scales,
            data,
            key=key,
            name="ess_scale",
            verbose=verbose,
        )
    common |= {"samples": samples, "trainer_kwargs": trainer_kwargs}
    if method == "ivi":
        return select_on_validation(
            lambda beta: train_implicit(
                model,
                params,
                data,
                kl_weight=beta,
                model_kwargs=model_kwargs,
                stochastic=None,
                **common,
            ),
            kl_weights,
            data,
            key=key,
            name="kl_weight",
            verbose=verbose,
        )
    if method == "ivi-paper":
        model_kwargs = PAPER_POSTERIOR | (model_kwargs or {})
    return train_implicit(
        model,
        params,
        data,
        stochastic=last_layer(params) if method == "ll-ivi" else None,
        model_kwargs=model_kwargs,
        kl_weight=1.0 if kl_weight is None else kl_weight,
        **common,
    )


def mean_std(records: list):
    """Nested dicts of floats (one per seed) -> the same nesting with ``{"mean", "std"}``.

    Entries that are not numbers (such as ``"kl_weight=0.1"``, what a method chose) keep
    every seed's value, as a list.

    Example:
      >>> mean_std([{"nll": 1.0, "chose": "a"}, {"nll": 3.0, "chose": "b"}])
      {'nll': {'mean': 2.0, 'std': 1.0}, 'chose': ['a', 'b']}
    """
    first = records[0]
    if isinstance(first, dict):
        return {k: mean_std([r[k] for r in records]) for k in first}
    if not isinstance(first, int | float) or isinstance(first, bool):
        return list(records)
    values = np.asarray(records, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std())}
