"""Tests of ivon.py, through its public API.

The reference below is an independent NumPy statement of the paper's Algorithm 1 (Shen et
al., ICML 2024), written from the equations with the paper's own form of the Hessian update;
the implementation is compared with it step by step, driven by the documented noise
(``jax.random.normal(fold_in(key, leaf_index))`` for float64 state).

Most of the time is XLA compilation: the computations a test compares are jitted together
(eagerly, every operation would compile on its own), and fixtures or module-level functions
let tests share what they can of their compilations.
"""

from __future__ import annotations

import functools
import math

import flax
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ivon

# --------------------------------------------------------------------------------------------
# Independent NumPy statement of the algorithm
# --------------------------------------------------------------------------------------------


class ReferenceIVON:
    """Algorithm 1 of the paper, on dicts of float64 NumPy arrays."""

    def __init__(
        self,
        params,
        *,
        ess,
        hess_init=1.0,
        beta1=0.9,
        beta2=0.99999,
        weight_decay=1e-4,
        clip_radius=np.inf,
        rescale_lr=True,
        debias=True,
        hess_approx="price",
    ):
        self.m = {k: np.array(v, np.float64) for k, v in params.items()}
        self.g = {k: np.zeros_like(v) for k, v in self.m.items()}
        self.h = {k: np.full_like(v, hess_init) for k, v in self.m.items()}
        self.t = 0
        self.ess, self.h0, self.b1, self.b2 = ess, hess_init, beta1, beta2
        self.wd, self.clip, self.rescale, self.debias = (
            weight_decay,
            clip_radius,
            rescale_lr,
            debias,
        )
        self.approx = hess_approx

    def sigma(self):
        return {k: 1.0 / np.sqrt(self.ess * (h + self.wd)) for k, h in self.h.items()}

    def sample(self, eps):
        """theta = m + sigma * eps; returns (theta, n)."""
        sigma = self.sigma()
        noise = {k: sigma[k] * eps[k] for k in self.m}
        return {k: self.m[k] + noise[k] for k in self.m}, noise

    def step(self, grads_per_sample, noise_per_sample, lr):
        for k in self.m:
            gs = np.stack([g[k] for g in grads_per_sample])
            ns = np.stack([n[k] for n in noise_per_sample])
            ghat = gs.mean(0)
            if self.approx == "price":
                hhat = self.ess * (self.h[k] + self.wd) * (gs * ns).mean(0)
            else:
                hhat = self.ess * (gs**2).mean(0)
            h = self.h[k]
            self.g[k] = self.b1 * self.g[k] + (1 - self.b1) * ghat
            self.h[k] = (
                self.b2 * h
                + (1 - self.b2) * hhat
                + 0.5 * (1 - self.b2) ** 2 * (h - hhat) ** 2 / (h + self.wd)
            )
        self.t += 1
        for k in self.m:
            gbar = self.g[k] / (1 - self.b1**self.t) if self.debias else self.g[k]
            lr_prime = lr * (self.h0 + self.wd) if self.rescale else lr
            direction = (gbar + self.wd * self.m[k]) / (self.h[k] + self.wd)
            self.m[k] = self.m[k] - lr_prime * np.clip(direction, -self.clip, self.clip)


# Softmax regression: the loss in JAX (differentiated by jax.grad) and its gradient written
# out by hand in NumPy for the reference.
def jax_loss(params, x, y):
    logits = x @ params["w"] + params["b"]
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, axis=-1))


def numpy_grad(params, x, y):
    logits = x @ params["w"] + params["b"]
    logits = logits - logits.max(-1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    residual = (probs - y) / x.shape[0]
    return {"w": x.T @ residual, "b": residual.sum(0)}


def make_problem(seed=0, n=32, d=5, c=3, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(dtype)
    y = np.eye(c)[rng.integers(0, c, n)].astype(dtype)
    params = {
        "w": (0.3 * rng.normal(size=(d, c))).astype(dtype),
        "b": (0.1 * rng.normal(size=(c,))).astype(dtype),
    }
    return x, y, params


def ivon_states(opt_state) -> list[ivon.IVONState]:
    is_state = lambda x: isinstance(x, ivon.IVONState)  # noqa: E731
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]


def ivon_state(opt_state) -> ivon.IVONState:
    (state,) = ivon_states(opt_state)
    return state


def eps_of(key, params):
    """The documented noise of a float64 state: leaf i draws jax.random.normal(fold_in(key, i))."""
    leaves, tree_def = jax.tree.flatten(params)
    return tree_def.unflatten(
        [
            np.asarray(jax.random.normal(jax.random.fold_in(key, i), p.shape, jnp.float64))
            for i, p in enumerate(leaves)
        ]
    )


def noise_of(key, *shapes):
    """The noise sample_parameters draws for float32 leaves of these shapes (posterior std
    1, mean 0: the sample is the noise)."""
    return [np.asarray(x, np.float64) for x in _jitted_noise(key, shapes)]


@functools.partial(jax.jit, static_argnums=1)  # one compilation per key type and shapes
def _jitted_noise(key, shapes):
    params = [jnp.zeros(shape, jnp.float32) for shape in shapes]
    opt_state = ivon.ivon(0.1, ess=1.0, hess_init=1.0, weight_decay=0.0).init(params)
    return ivon.sample_parameters(key, params, opt_state)[0]


@pytest.fixture
def make_step():
    """A jitted IVON step for `optimizer` and `loss_fn(params, *args)`: one sample, its
    gradient, the update; returns (params, opt_state, loss, sample)."""

    def make(optimizer, loss_fn):
        @jax.jit
        def step(key, params, opt_state, *args):
            psample, opt_state = ivon.sample_parameters(key, params, opt_state)
            loss, grads = jax.value_and_grad(loss_fn)(psample, *args)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss, psample

        return step

    return make


REFERENCE_CASES = {
    "price-S1": dict(hess_approx="price", samples=1),
    "gradsq-S1": dict(hess_approx="gradsq", samples=1),
    "price-S3": dict(hess_approx="price", samples=3),
    "gradsq-S3": dict(hess_approx="gradsq", samples=3),
    "clipped": dict(hess_approx="price", samples=2, clip_radius=0.05),
    "no-rescale-no-debias": dict(hess_approx="price", samples=1, rescale_lr=False, debias=False),
    "schedule": dict(hess_approx="gradsq", samples=2, schedule=True),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_steps_match_numpy_reference_float64(case):
    config = dict(REFERENCE_CASES[case])
    samples = config.pop("samples")
    use_schedule = config.pop("schedule", False)
    hyper = dict(ess=50.0, hess_init=0.3, beta1=0.8, beta2=0.9, weight_decay=1e-2) | config
    # Values exact in float32 and float64: optax evaluates schedules in float32 eagerly but
    # in float64 under jit with x64, and this test is about IVON, not that.
    lr = optax.piecewise_constant_schedule(0.25, {2: 0.5, 5: 0.25}) if use_schedule else 0.2
    with jax.enable_x64(True):
        x, y, params = make_problem()
        reference = ReferenceIVON(params, **hyper)
        optimizer = ivon.ivon(lr, accumulate=samples > 1, **hyper)
        jparams = jax.tree.map(jnp.asarray, params)
        opt_state = optimizer.init(jparams)
        assert ivon_state(opt_state).momentum["w"].dtype == jnp.float64

        @jax.jit  # a whole step (samples, gradients, accumulation, update): one compilation
        def step_fn(keys, params, opt_state):
            psamples, all_grads = [], []
            for s, key in enumerate(keys):
                psample, opt_state = ivon.sample_parameters(key, params, opt_state)
                grads = jax.grad(jax_loss)(psample, x, y)
                if s < len(keys) - 1:
                    opt_state = ivon.accumulate_gradients(grads, opt_state)
                psamples.append(psample)
                all_grads.append(grads)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, psamples, all_grads

        for step in range(8):
            keys = [jax.random.key(100 * step + s) for s in range(samples)]
            jparams_before = jparams
            jparams, opt_state, psamples, all_grads = step_fn(keys, jparams, opt_state)
            grads_ref, noises_ref = [], []
            for key, psample, grads in zip(keys, psamples, all_grads):
                theta_ref, noise_ref = reference.sample(eps_of(key, jparams_before))
                for k in params:
                    np.testing.assert_allclose(psample[k], theta_ref[k], rtol=1e-9, atol=1e-12)
                grads_ref.append(numpy_grad(theta_ref, x, y))
                noises_ref.append(noise_ref)
                for k in params:
                    np.testing.assert_allclose(grads[k], grads_ref[-1][k], rtol=1e-9, atol=1e-12)
            reference.step(grads_ref, noises_ref, float(lr(step)) if callable(lr) else lr)
            state = ivon_state(opt_state)
            for k in params:
                np.testing.assert_allclose(jparams[k], reference.m[k], rtol=1e-6, atol=1e-9)
                np.testing.assert_allclose(state.hessian[k], reference.h[k], rtol=1e-6, atol=1e-9)
                np.testing.assert_allclose(state.momentum[k], reference.g[k], rtol=1e-6, atol=1e-9)
        assert int(state.count) == 8
        # "gradsq" needs no noise and keeps none
        assert isinstance(state.noise, optax.EmptyState) == (hyper["hess_approx"] == "gradsq")
        if hyper.get("clip_radius", np.inf) < np.inf:  # the case must actually clip
            direction = (reference.g["w"] / (1 - 0.8**8) + 1e-2 * reference.m["w"]) / (
                reference.h["w"] + 1e-2
            )
            assert np.any(np.abs(direction) > hyper["clip_radius"])


@pytest.mark.parametrize("method", ["scan", "vmap"])
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_sampled_value_and_grad_equals_accumulating_the_same_samples(method, hess_approx):
    with jax.enable_x64(True):
        x, y, params = make_problem(seed=1)
        params = jax.tree.map(jnp.asarray, params)
        lean = ivon.ivon(0.1, ess=40.0, beta2=0.9, hess_approx=hess_approx)
        accumulating = ivon.ivon(0.1, ess=40.0, beta2=0.9, hess_approx=hess_approx, accumulate=True)
        state_a, state_b = lean.init(params), accumulating.init(params)
        value_and_grad = jax.jit(ivon.sampled_value_and_grad(jax_loss, 3, method=method))
        params_a = params_b = params
        for step in range(3):
            key = jax.random.key(step)
            loss, grads, hessian = value_and_grad(key, params_a, state_a, x, y)
            updates, state_a = lean.update(grads, state_a, params_a, hessian_estimate=hessian)
            params_a = optax.apply_updates(params_a, updates)
            losses = []
            for s, sample_key in enumerate(jax.random.split(key, 3)):
                psample, state_b = ivon.sample_parameters(sample_key, params_b, state_b)
                loss_b, grads_b = jax.value_and_grad(jax_loss)(psample, x, y)
                losses.append(loss_b)
                if s < 2:
                    state_b = ivon.accumulate_gradients(grads_b, state_b)
            updates, state_b = accumulating.update(grads_b, state_b, params_b)
            params_b = optax.apply_updates(params_b, updates)
            np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-12)
            for k in params:
                np.testing.assert_allclose(params_a[k], params_b[k], rtol=1e-10, atol=1e-13)
                np.testing.assert_allclose(
                    ivon_state(state_a).hessian[k], ivon_state(state_b).hessian[k], rtol=1e-10
                )
        # The lean optimizer keeps no running sums.
        assert isinstance(ivon_state(state_a).sample_sums, optax.EmptyState)


def test_sampled_value_and_grad_has_aux_and_single_sample():
    x, y, params = make_problem(dtype=np.float32)
    optimizer = ivon.ivon(0.1, ess=32.0)
    opt_state = optimizer.init(params)

    def loss_with_aux(p, x, y):
        loss = jax_loss(p, x, y)
        return loss, {"double": 2 * loss}

    @jax.jit  # one compilation for every call below
    def outputs(key, params, opt_state):
        with_aux = [
            ivon.sampled_value_and_grad(loss_with_aux, samples, has_aux=True)(
                key, params, opt_state, x, y
            )
            for samples in (1, 4)
        ]
        without_aux = ivon.sampled_value_and_grad(jax_loss, 1)(key, params, opt_state, x, y)
        psample, drawn = ivon.sample_parameters(jax.random.split(key, 1)[0], params, opt_state)
        return with_aux, without_aux, jax.grad(jax_loss)(psample, x, y), drawn

    with_aux, (_, grads, hessian), expected_grads, drawn = outputs(
        jax.random.key(0), params, opt_state
    )
    for samples, ((loss, aux), aux_grads, aux_hessian) in zip((1, 4), with_aux):
        assert aux["double"].shape == (samples,)
        np.testing.assert_allclose(jnp.mean(aux["double"]), 2 * loss, rtol=1e-6)
        assert jax.tree.structure(aux_grads) == jax.tree.structure(params)
        assert jax.tree.structure(aux_hessian) == jax.tree.structure(params)
    # one sample: the same loss, gradient and Price estimate as sample_parameters + grad
    for k in params:
        np.testing.assert_allclose(grads[k], expected_grads[k], rtol=1e-6)
        np.testing.assert_allclose(
            hessian[k],
            32.0 * (1.0 + 1e-4) * expected_grads[k] * ivon_state(drawn).noise[k],
            rtol=1e-5,
            atol=1e-7,
        )


# --------------------------------------------------------------------------------------------
# Closed-form cases
# --------------------------------------------------------------------------------------------


def quadratic_problem(d=6, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(d, d))
    hessian = q @ q.T / d + np.diag(rng.uniform(0.5, 3.0, d))
    b = rng.normal(size=d)

    def loss(params):
        theta = params["theta"]
        return (
            0.5 * theta @ jnp.asarray(hessian, theta.dtype) @ theta
            - jnp.asarray(b, theta.dtype) @ theta
        )

    return hessian, b, loss


def test_price_estimator_averages_to_the_true_diagonal_hessian():
    hessian, _, loss = quadratic_problem()
    params = {"theta": jnp.asarray(np.random.default_rng(1).normal(size=6), jnp.float32)}
    ess, weight_decay = 10.0, 1e-3
    optimizer = ivon.ivon(0.1, ess=ess, hess_init=2.0, weight_decay=weight_decay)
    opt_state = optimizer.init(params)
    # 4 x 50,000 draws: the estimate's relative standard error is at most 1.2% here, so the
    # 5% tolerance is over 4 standard errors (a bias of a few % would fail).
    value_and_grad = jax.jit(ivon.sampled_value_and_grad(loss, 50_000, method="vmap"))
    # hhat of the paper, step 2: ess * (h + wd) * mean(grad * n)
    estimates = [
        value_and_grad(jax.random.key(seed), params, opt_state)[2]["theta"] for seed in range(4)
    ]
    np.testing.assert_allclose(np.mean(estimates, axis=0), np.diag(hessian), rtol=0.05)
    # The off-diagonal terms average out: a single draw is far from the diagonal.
    _, _, single = jax.jit(ivon.sampled_value_and_grad(loss, 1))(
        jax.random.key(1), params, opt_state
    )
    single = np.asarray(single["theta"])
    assert np.max(np.abs(single - np.diag(hessian)) / np.diag(hessian)) > 0.05


@pytest.mark.slow
def test_hessian_tracks_quadratic_diagonal_over_training():
    hessian, _, loss = quadratic_problem(seed=2)
    params = {"theta": jnp.zeros(6)}
    optimizer = ivon.ivon(0.05, ess=100.0, hess_init=0.1, beta2=0.99, weight_decay=1e-4)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(key, params, opt_state):
        _, grads, hessian = ivon.sampled_value_and_grad(loss, 8, method="vmap")(
            key, params, opt_state
        )
        updates, opt_state = optimizer.update(grads, opt_state, params, hessian_estimate=hessian)
        return optax.apply_updates(params, updates), opt_state

    for i in range(1500):
        params, opt_state = step(jax.random.key(i), params, opt_state)
    np.testing.assert_allclose(ivon_state(opt_state).hessian["theta"], np.diag(hessian), rtol=0.1)


@pytest.mark.slow
def test_bayesian_linear_regression_posterior():
    """On a conjugate model IVON's mean and ess*(h+wd) approach the exact posterior mean and
    the diagonal of the exact posterior precision."""
    rng = np.random.default_rng(0)
    n, d, noise_std = 200, 4, 0.5
    x = rng.normal(size=(n, d)) * np.array([1.0, 2.0, 0.5, 1.5])
    w_true = rng.normal(size=d)
    y = x @ w_true + noise_std * rng.normal(size=n)
    weight_decay = 0.05  # prior N(0, 1 / (n * wd))
    precision = x.T @ x / noise_std**2 + n * weight_decay * np.eye(d)
    posterior_mean = np.linalg.solve(precision, x.T @ y / noise_std**2)

    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

    def loss(params):  # mean negative log-likelihood per example
        return 0.5 * jnp.mean((xj @ params["w"] - yj) ** 2) / noise_std**2

    # beta2 = 0.999 with 8 samples per step averages the Hessian over ~8000 draws; 5000
    # steps leave a start-up bias of under 1%.
    steps = 5000
    schedule = optax.cosine_decay_schedule(0.5, steps, alpha=0.02)
    optimizer = ivon.ivon(
        schedule, ess=float(n), hess_init=1.0, beta2=0.999, weight_decay=weight_decay
    )
    params = {"w": jnp.zeros(d)}
    opt_state = optimizer.init(params)

    @jax.jit
    def run(params, opt_state):
        def step(carry, key):
            params, opt_state = carry
            _, grads, hessian = ivon.sampled_value_and_grad(loss, 8, method="vmap")(
                key, params, opt_state
            )
            updates, opt_state = optimizer.update(
                grads, opt_state, params, hessian_estimate=hessian
            )
            return (optax.apply_updates(params, updates), opt_state), None

        (params, opt_state), _ = jax.lax.scan(
            step, (params, opt_state), jax.random.split(jax.random.key(0), steps)
        )
        return params, opt_state

    params, opt_state = run(params, opt_state)
    state = ivon_state(opt_state)
    np.testing.assert_allclose(params["w"], posterior_mean, atol=0.02)
    # over 6 seeds the largest relative error of the precision was 3.9%
    np.testing.assert_allclose(
        n * (state.hessian["w"] + weight_decay), np.diag(precision), rtol=0.07
    )
    sigma = ivon.posterior_std(opt_state)["w"]
    np.testing.assert_allclose(sigma, 1 / np.sqrt(np.diag(precision)), rtol=0.04)


# --------------------------------------------------------------------------------------------
# The noise: standard normal, independent across elements, leaves and steps
# --------------------------------------------------------------------------------------------


def _ks_statistic_times_sqrt_n(draws):
    """sqrt(n) * sup |F_n - Phi|: Kolmogorov distributed (mean 0.8687, P(> 1.63) = 1%,
    P(> 1.95) = 0.1%) when the draws are standard normal."""
    draws = np.sort(np.asarray(draws).ravel())
    n = draws.size
    cdf = np.asarray(jax.scipy.stats.norm.cdf(draws), np.float64)
    return math.sqrt(n) * max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))


NOISE_SHAPES = [(2000, 2000), (999, 401), (7, 11, 13), (5,), ()]


@pytest.fixture(scope="module")
def noise_draws():
    """The noise of one tree with a leaf of each shape: one compilation for all of them."""
    return dict(zip(NOISE_SHAPES, noise_of(jax.random.key(0), *NOISE_SHAPES)))


@pytest.mark.parametrize("shape", NOISE_SHAPES)
def test_noise_is_standard_normal(shape, noise_draws):
    draws = noise_draws[shape]
    assert draws.shape == shape
    if draws.size < 1000:  # small shapes: finite, all distinct
        assert np.all(np.isfinite(draws)) and len(np.unique(draws)) == draws.size
        return
    n = draws.size
    x = draws.astype(np.float64).ravel()
    assert abs(x.mean()) < 5 / math.sqrt(n)
    assert abs(x.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(np.mean(x**3)) < 5 * math.sqrt(15 / n)
    assert abs(np.mean(x**4) - 3) < 5 * math.sqrt(96 / n)
    tail = np.mean(np.abs(x) > 3)  # 0.0027 for a standard normal
    assert abs(tail - 0.0026998) < 5 * math.sqrt(0.0027 / n)
    assert _ks_statistic_times_sqrt_n(draws) < 1.95  # KS test at the 0.1% level


def test_noise_ks_statistics_over_many_keys_follow_kolmogorov():
    statistics = np.array(
        [_ks_statistic_times_sqrt_n(noise_of(jax.random.key(k), (100, 200))[0]) for k in range(20)]
    )
    # mean of 20 Kolmogorov variables: 0.869 +- 0.058 (one standard deviation)
    assert 0.69 < statistics.mean() < 1.05
    assert np.mean(statistics > 1.36) <= 0.25  # 5% each


def test_noise_is_independent_across_pairs_leaves_and_steps():
    def corr(a, b):
        return abs(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    bound = 5 / math.sqrt(100_000)
    a, a_next_leaf = noise_of(jax.random.key(1), (400, 500), (400, 500))
    # the two normals of every Box-Muller pair (rows 2i and 2i + 1), also their squares and
    # absolute values, which share the radius r^2 = z0^2 + z1^2
    assert corr(a[0::2], a[1::2]) < bound
    assert corr(a[0::2] ** 2, a[1::2] ** 2) < bound
    assert corr(np.abs(a[0::2]), np.abs(a[1::2])) < bound
    # neighbours in memory, and rows of different pairs
    assert corr(a[:, :-1], a[:, 1:]) < bound
    assert corr(a[1:-1:2], a[2::2]) < bound
    # two leaves under the same key, and the same leaf at the next step
    assert corr(a, a_next_leaf) < bound
    # (leaf 0 of a tree of the same shapes: its noise is that of a single leaf, and the
    # function is compiled once)
    assert corr(a, noise_of(jax.random.key(2), (400, 500), (400, 500))[0]) < bound
    # the Box-Muller angle is uniform: the signs of a pair fall in the 4 quadrants equally
    quadrant = 2 * (a[0::2] > 0) + (a[1::2] > 0)
    counts = np.bincount(quadrant.ravel(), minlength=4)
    assert np.all(np.abs(counts - counts.mean()) < 5 * math.sqrt(counts.mean()))


def test_noise_of_other_key_kinds_and_float64_is_documented_jax_random_normal():
    shapes = [(5,), (64, 64), (3,)]
    legacy = noise_of(jax.random.PRNGKey(3), *shapes)
    typed = noise_of(jax.random.key(3), *shapes)
    for a, b in zip(legacy, typed):
        np.testing.assert_array_equal(a, b)
    rbg_key = jax.random.key(3, impl="rbg")
    for i, noise in enumerate(noise_of(rbg_key, *shapes)):
        np.testing.assert_array_equal(
            noise, jax.random.normal(jax.random.fold_in(rbg_key, i), shapes[i])
        )
    with jax.enable_x64(True):
        params = {"a": jnp.zeros(3), "b": jnp.zeros(10)}
        opt_state = ivon.ivon(0.1, ess=1.0, weight_decay=0.0).init(params)
        double, _ = ivon.sample_parameters(jax.random.key(3), params, opt_state)
        assert double["b"].dtype == jnp.float64
        np.testing.assert_array_equal(
            double["b"],
            jax.random.normal(jax.random.fold_in(jax.random.key(3), 1), (10,), jnp.float64),
        )


def test_samples_have_the_posterior_std_and_differ_per_key():
    params = {"w": jnp.zeros((300, 200)), "b": jnp.ones(200)}
    optimizer = ivon.ivon(0.1, ess=250.0, hess_init=0.7, weight_decay=0.3)
    opt_state = optimizer.init(params)
    sample = jax.jit(ivon.sample_parameters)  # compiled once, for both keys
    sample_a, _ = sample(jax.random.key(0), params, opt_state)
    sample_b, _ = sample(jax.random.key(1), params, opt_state)
    sigma = 1 / math.sqrt(250.0 * (0.7 + 0.3))
    np.testing.assert_allclose(np.std(sample_a["w"]), sigma, rtol=0.01)
    np.testing.assert_allclose(np.mean(sample_a["b"]), 1.0, atol=5 * sigma / math.sqrt(200))
    assert not np.allclose(sample_a["w"], sample_b["w"])
    np.testing.assert_allclose(ivon.posterior_std(opt_state)["w"], sigma, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# h stays positive
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_hessian_stays_positive_over_seeds_and_gradient_scales(hess_approx):
    params = {"w": jnp.zeros((64,))}
    weight_decays = (0.0, 1e-4)
    seeds, scales = jnp.arange(5), jnp.asarray([1e-6, 1e-2, 1.0, 1e3, 1e6])

    def run(optimizer, seed, scale):
        def step(opt_state, key):
            key_sample, key_grad = jax.random.split(key)
            psample, opt_state = ivon.sample_parameters(key_sample, params, opt_state)
            # adversarial gradients: large, and anti-correlated with the noise
            noise = psample["w"] - params["w"]
            grads = {"w": scale * (jax.random.normal(key_grad, (64,)) - 1e3 * noise)}
            _, opt_state = optimizer.update(grads, opt_state, params)
            return opt_state, ivon_state(opt_state).hessian["w"]

        keys = jax.random.split(jax.random.key(seed), 200)
        return jax.lax.scan(step, optimizer.init(params), keys)[1]

    @jax.jit  # every weight decay, seed and gradient scale in one compilation and one call
    def all_runs():
        hessians = []
        for weight_decay in weight_decays:
            optimizer = ivon.ivon(
                0.1,
                ess=1e3,
                hess_init=1e-3,
                beta2=0.9,
                weight_decay=weight_decay,
                hess_approx=hess_approx,
            )
            over_scales = jax.vmap(functools.partial(run, optimizer), (None, 0))
            hessians.append(jax.vmap(over_scales, (0, None))(seeds, scales))
        return hessians

    for weight_decay, hessians in zip(weight_decays, all_runs()):
        assert hessians.shape == (5, 5, 200, 64)  # seeds x scales x steps x parameters
        assert np.all(np.isfinite(hessians))
        assert np.all(hessians + weight_decay > 0)
        if weight_decay == 0.0:
            assert np.all(hessians > 0)


def test_hessian_update_is_positive_for_any_estimate():
    """h_new + wd >= (h + wd) / 2 for every hhat, the Riemannian correction's guarantee."""
    hessian = jnp.broadcast_to(jnp.asarray([1e-6, 1e-3, 0.5, 1.0, 10.0])[:, None], (5, 7))
    estimates = jnp.broadcast_to(
        jnp.asarray([-1e12, -1e6, -1.0, 0.0, 1.0, 1e6, 1e12])[None, :], (5, 7)
    )
    params = {"w": jnp.zeros((5, 7))}
    for beta2, weight_decay in [(0.0, 0.0), (0.5, 1e-4), (0.99999, 1e-2)]:
        optimizer = ivon.ivon(0.1, ess=10.0, beta2=beta2, weight_decay=weight_decay)
        opt_state = optimizer.init(params)
        opt_state = (ivon_state(opt_state)._replace(hessian={"w": hessian}), *opt_state[1:])
        _, opt_state = optimizer.update(
            params, opt_state, params, hessian_estimate={"w": estimates}
        )
        new = ivon_state(opt_state).hessian["w"]
        assert np.all(new + weight_decay >= (hessian + weight_decay) / 2 * (1 - 1e-6))
        beta2 = float(np.float32(beta2))  # as the float32 state holds it
        expected = (
            beta2 * hessian
            + (1 - beta2) * estimates
            + 0.5 * (1 - beta2) ** 2 * (hessian - estimates) ** 2 / (hessian + weight_decay)
        )
        moderate = np.abs(estimates) <= 1e6
        np.testing.assert_allclose(new[moderate], expected[moderate], rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Transformations: jit once, scan and vmap over samples, fixed state structure
# --------------------------------------------------------------------------------------------


def _structure_and_types(tree):
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


def test_state_structure_shapes_and_dtypes_never_change():
    x, y, params = make_problem(dtype=np.float32)
    optimizer = ivon.ivon(0.1, ess=32.0, accumulate=True)
    opt_state = optimizer.init(params)
    reference = _structure_and_types(opt_state)

    @jax.jit  # one compilation; the state after every operation is returned
    def states(opt_state):
        psample, sampled = ivon.sample_parameters(jax.random.key(0), params, opt_state)
        accumulated = ivon.accumulate_gradients(jax.grad(jax_loss)(psample, x, y), sampled)
        _, updated = optimizer.update(jax.grad(jax_loss)(psample, x, y), accumulated, params)
        _, grads, hessian = ivon.sampled_value_and_grad(jax_loss, 3)(
            jax.random.key(1), params, updated, x, y
        )
        _, estimated = optimizer.update(grads, updated, params, hessian_estimate=hessian)
        return sampled, accumulated, updated, estimated

    for state in states(opt_state):
        assert _structure_and_types(state) == reference


def test_training_step_jits_once():
    x, y, params = make_problem(dtype=np.float32)
    optimizer = ivon.ivon(0.1, ess=32.0)
    opt_state = optimizer.init(params)
    traces = []

    @jax.jit
    def step(key, params, opt_state):
        traces.append(1)
        psample, opt_state = ivon.sample_parameters(key, params, opt_state)
        updates, opt_state = optimizer.update(jax.grad(jax_loss)(psample, x, y), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for i in range(5):
        params, opt_state = step(jax.random.key(i), params, opt_state)
    assert len(traces) == 1


def test_scan_over_monte_carlo_samples_equals_python_loop():
    x, y, params = make_problem(dtype=np.float32)
    optimizer = ivon.ivon(0.1, ess=32.0, accumulate=True, beta2=0.9)
    keys = jax.random.split(jax.random.key(0), 4)

    @jax.jit  # the loop is unrolled into one program (eagerly it would compile every op)
    def python_loop(opt_state, keys):
        for i in range(len(keys)):
            psample, opt_state = ivon.sample_parameters(keys[i], params, opt_state)
            grads = jax.grad(jax_loss)(psample, x, y)
            if i < len(keys) - 1:
                opt_state = ivon.accumulate_gradients(grads, opt_state)
        return optimizer.update(grads, opt_state, params)

    @jax.jit
    def scanned(opt_state):
        def body(opt_state, key):
            psample, opt_state = ivon.sample_parameters(key, params, opt_state)
            return ivon.accumulate_gradients(jax.grad(jax_loss)(psample, x, y), opt_state), None

        opt_state, _ = jax.lax.scan(body, opt_state, keys[:-1])
        psample, opt_state = ivon.sample_parameters(keys[-1], params, opt_state)
        return optimizer.update(jax.grad(jax_loss)(psample, x, y), opt_state, params)

    expected = python_loop(optimizer.init(params), keys)
    got = scanned(optimizer.init(params))
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_vmap_over_samples_and_over_independent_runs():
    x, y, params = make_problem(dtype=np.float32)
    optimizer = ivon.ivon(0.1, ess=32.0)
    opt_state = optimizer.init(params)
    keys = jax.random.split(jax.random.key(0), 5)

    @jax.jit  # one compilation: the vmapped draws and two single ones
    def draws(keys):
        batched = jax.vmap(lambda k: ivon.sample_parameters(k, params, opt_state))(keys)
        return batched, [ivon.sample_parameters(keys[i], params, opt_state)[0] for i in (0, 3)]

    (samples, states), singles = draws(keys)
    for i, one in zip((0, 3), singles):
        np.testing.assert_allclose(samples["w"][i], one["w"], rtol=1e-6)
    assert ivon_state(states).noise["w"].shape == (5,) + params["w"].shape

    # vmap a whole training step over 5 independent runs (e.g. seeds)
    def step(key, opt_state):
        psample, opt_state = ivon.sample_parameters(key, params, opt_state)
        return optimizer.update(jax.grad(jax_loss)(psample, x, y), opt_state, params)

    batched_states = jax.vmap(lambda _: optimizer.init(params))(keys)
    updates, batched_states = jax.jit(jax.vmap(step))(keys, batched_states)
    assert updates["w"].shape == (5,) + params["w"].shape
    assert not np.allclose(updates["w"][0], updates["w"][1])


def test_bayesian_model_average_equals_explicit_average():
    x, _, params = make_problem(dtype=np.float32)
    optimizer = ivon.ivon(0.1, ess=3.0, hess_init=0.2)
    opt_state = optimizer.init(params)

    def probs(p, x):
        return jax.nn.softmax(x @ p["w"] + p["b"])

    @jax.jit  # one compilation for the explicit average and every batch size
    def averages(key, params, opt_state, x):
        explicit = [
            probs(ivon.sample_parameters(k, params, opt_state)[0], x)
            for k in jax.random.split(key, 8)
        ]
        batched = [
            ivon.bayesian_model_average(probs, 8, batch_size=batch_size)(key, params, opt_state, x)
            for batch_size in (1, 4, 8)
        ]
        # pytree outputs
        both = ivon.bayesian_model_average(lambda p, x: {"p": probs(p, x), "w": p["w"]}, 8)(
            key, params, opt_state, x
        )
        return explicit, batched, both, probs(params, x)

    explicit, batched, both, at_mean = averages(jax.random.key(7), params, opt_state, x)
    explicit = np.mean(explicit, axis=0)
    for average in batched:
        np.testing.assert_allclose(average, explicit, rtol=1e-5, atol=1e-7)
    # the average is not the prediction at the mean (the posterior is wide here)
    assert np.max(np.abs(explicit - at_mean)) > 1e-2
    np.testing.assert_allclose(both["p"], explicit, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Multi-device: pmap / shard_map with an axis name, NamedSharding without one
# --------------------------------------------------------------------------------------------


def _data_parallel_problem():
    x, y, params = make_problem(seed=3, n=64, dtype=np.float32)
    return jnp.asarray(x), jnp.asarray(y), jax.tree.map(jnp.asarray, params)


@functools.partial(jax.jit, static_argnums=(4, 5))  # one compilation per hess_approx
def _single_device_equivalent(key, params, x, y, hess_approx, steps):
    """4 devices x 1 sample = 1 device x 4 samples, sample d on shard d with key fold_in(key, d).

    Loops over the steps and the first three samples are scans: a small program to compile."""
    optimizer = ivon.ivon(0.2, ess=64.0, beta2=0.9, hess_approx=hess_approx, accumulate=True)
    shards = x.reshape(4, 16, -1), y.reshape(4, 16, -1)

    def step(carry, step_index):
        params, opt_state = carry
        step_key = jax.random.fold_in(key, step_index)

        def sample_grads(opt_state, d):
            psample, opt_state = ivon.sample_parameters(
                jax.random.fold_in(step_key, d), params, opt_state
            )
            return jax.grad(jax_loss)(psample, shards[0][d], shards[1][d]), opt_state

        def accumulate(opt_state, d):
            grads, opt_state = sample_grads(opt_state, d)
            return ivon.accumulate_gradients(grads, opt_state), None

        opt_state, _ = jax.lax.scan(accumulate, opt_state, jnp.arange(3))
        grads, opt_state = sample_grads(opt_state, 3)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    initial = (params, optimizer.init(params))
    return jax.lax.scan(step, initial, jnp.arange(steps))[0]


@pytest.fixture
def four_devices():
    """Four devices of one platform, made the default: the accelerator's if it has four, else
    the host CPU's (conftest.py asks for four), so that a one-GPU machine runs these tests too."""
    devices = jax.devices() if jax.device_count() >= 4 else jax.devices("cpu")
    assert len(devices) >= 4, "conftest.py asks for four host CPU devices"
    with jax.default_device(devices[0]):
        yield devices[:4]


@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_pmap_averages_samples_across_devices(hess_approx, four_devices):
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    x, y, params = _data_parallel_problem()
    optimizer = ivon.ivon(0.2, ess=64.0, beta2=0.9, hess_approx=hess_approx, axis_name="data")
    key = jax.random.key(5)

    def step(step_key, params, opt_state, x, y):
        psample, opt_state = ivon.sample_parameters(step_key, params, opt_state, axis_name="data")
        grads = jax.grad(jax_loss)(psample, x, y)  # per-device gradients, not averaged
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    p_step = jax.pmap(step, axis_name="data", in_axes=(None, 0, 0, 0, 0), devices=four_devices)
    # Stacked copies, placed as pmap places its outputs, so that it compiles once, not again
    # at the second step for inputs laid out differently.
    sharding = NamedSharding(Mesh(np.array(four_devices), ("data",)), P("data"))

    def replicate(tree):
        return jax.device_put(jax.tree.map(lambda a: jnp.stack([a] * 4), tree), sharding)

    p_params, p_state = replicate(params), replicate(optimizer.init(params))
    for i in range(3):
        p_params, p_state = p_step(
            jax.random.fold_in(key, i),
            p_params,
            p_state,
            x.reshape(4, 16, -1),
            y.reshape(4, 16, -1),
        )
    expected_params, expected_state = _single_device_equivalent(key, params, x, y, hess_approx, 3)
    for k in params:
        for d in range(4):  # every device holds the same mean and Hessian
            np.testing.assert_allclose(p_params[k][d], expected_params[k], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(
                ivon_state(p_state).hessian[k][d], ivon_state(expected_state).hessian[k], rtol=1e-5
            )


def test_shard_map_averages_samples_and_returns_a_replicated_state(four_devices):
    from jax.sharding import PartitionSpec as P

    x, y, params = _data_parallel_problem()
    mesh = jax.make_mesh((4,), ("data",), devices=four_devices)
    optimizer = ivon.ivon(0.2, ess=64.0, beta2=0.9, axis_name="data")
    key = jax.random.key(5)

    @jax.jit
    def step(step_key, params, opt_state, x, y):
        def per_device(step_key, params, opt_state, x, y):
            psample, opt_state = ivon.sample_parameters(
                step_key, params, opt_state, axis_name="data"
            )
            updates, opt_state = optimizer.update(
                jax.grad(jax_loss)(psample, x, y), opt_state, params
            )
            return optax.apply_updates(params, updates), opt_state

        return jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P(), P(), P("data"), P("data")),
            out_specs=(P(), P()),
        )(step_key, params, opt_state, x, y)

    from jax.sharding import NamedSharding

    x_sharded, y_sharded = jax.device_put((x, y), NamedSharding(mesh, P("data")))
    # replicated as the step returns them: one compilation, not a second one at step 2
    s_params, s_state = jax.device_put((params, optimizer.init(params)), NamedSharding(mesh, P()))
    for i in range(3):
        s_params, s_state = step(
            jax.random.fold_in(key, i), s_params, s_state, x_sharded, y_sharded
        )
    expected_params, expected_state = _single_device_equivalent(key, params, x, y, "price", 3)
    for k in params:
        np.testing.assert_allclose(s_params[k], expected_params[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            ivon_state(s_state).hessian[k], ivon_state(expected_state).hessian[k], rtol=1e-5
        )


_SHARDING_OPTIMIZER = ivon.ivon(0.1, ess=10.0, beta2=0.9)


@jax.jit  # module level: the unsharded run of both tests below shares one compilation
def _sharding_step(key, params, opt_state, x):
    def loss(p):
        return jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2) + jnp.sum(p["v"] ** 2)

    psample, opt_state = ivon.sample_parameters(key, params, opt_state)
    updates, opt_state = _SHARDING_OPTIMIZER.update(jax.grad(loss)(psample), opt_state, params)
    return optax.apply_updates(params, updates), opt_state, updates, psample


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_named_sharding_keeps_parameter_sharding(axis_type, four_devices):
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh(
        (4,), ("model",), axis_types=(getattr(AxisType, axis_type),), devices=four_devices
    )
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(16, 12)), jnp.float32),
        "v": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(12,)), jnp.float32),
    }
    shardings = {
        "w": NamedSharding(mesh, P("model", None)),
        "v": NamedSharding(mesh, P(None, "model")),
        "b": NamedSharding(mesh, P()),
    }
    sharded = jax.device_put(params, shardings)
    x = jnp.asarray(rng.normal(size=(5, 16)), jnp.float32)
    init = _SHARDING_OPTIMIZER.init
    outputs_sharded = _sharding_step(jax.random.key(0), sharded, init(sharded), x)
    # the same for both axis types: compiled once
    outputs_plain = _sharding_step(jax.random.key(0), params, init(params), x)
    new_params, opt_state, updates, psample = outputs_sharded
    state = ivon_state(opt_state)
    for k in params:
        spec = shardings[k].spec
        for tree in (new_params, updates, psample, state.momentum, state.hessian, state.noise):
            assert tree[k].sharding.spec == spec or (
                tree[k].sharding.is_equivalent_to(shardings[k], tree[k].ndim)
            ), (k, tree[k].sharding)
    # the noise does not depend on the layout (bit for bit); the rest up to the reduction
    # order of the sharded matrix products
    for k in params:
        np.testing.assert_array_equal(state.noise[k], ivon_state(outputs_plain[1]).noise[k])
    for a, b in zip(jax.tree.leaves(outputs_sharded), jax.tree.leaves(outputs_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# IVON's state inside other optimizers and containers
# --------------------------------------------------------------------------------------------


def test_inside_chain_after_gradient_clipping(make_step):
    x, y, params = make_problem(dtype=np.float32)
    clipped = optax.chain(optax.clip_by_global_norm(1e-3), ivon.ivon(0.1, ess=32.0))
    plain = ivon.ivon(0.1, ess=32.0)
    new_clipped, _, _, psample = make_step(clipped, jax_loss)(
        jax.random.key(0), params, clipped.init(params), x, y
    )

    # the same step by hand: clip the gradient at the same sample, then plain IVON
    @jax.jit  # one compilation rather than one per operation
    def by_hand(psample, params):
        grads = jax.grad(jax_loss)(psample, x, y)
        grads, _ = optax.clip_by_global_norm(1e-3).update(grads, optax.EmptyState())
        opt_state = plain.init(params)
        _, opt_state = ivon.sample_parameters(jax.random.key(0), params, opt_state)
        return plain.update(grads, opt_state, params)[0]

    updates = by_hand(psample, params)
    for k in params:
        np.testing.assert_allclose(new_clipped[k], params[k] + updates[k], rtol=1e-6)


def test_inject_hyperparams_changes_take_effect(make_step):
    x, y, params = make_problem(dtype=np.float32)
    optimizer = optax.inject_hyperparams(ivon.ivon)(
        learning_rate=0.1, ess=100.0, weight_decay=0.0, hess_approx="price"
    )
    opt_state = optimizer.init(params)
    sigma_before = ivon.posterior_std(opt_state)["w"]
    np.testing.assert_allclose(sigma_before, 1 / math.sqrt(100.0 * 1.0), rtol=1e-6)
    opt_state.hyperparams["ess"] = jnp.asarray(400.0)
    opt_state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    new_params, opt_state, _, _ = make_step(optimizer, jax_loss)(
        jax.random.key(0), params, opt_state, x, y
    )
    for k in params:  # learning rate 0: the mean does not move
        np.testing.assert_allclose(new_params[k], params[k])
    hessian = ivon_state(opt_state).hessian["w"]
    np.testing.assert_allclose(
        ivon.posterior_std(opt_state)["w"], 1 / np.sqrt(400.0 * hessian), rtol=1e-6
    )
    # scheduled weight decay reaches the update
    scheduled = optax.inject_hyperparams(ivon.ivon)(
        learning_rate=0.1, ess=100.0, weight_decay=lambda count: 0.5 * (count >= 1)
    )
    state = scheduled.init(params)
    step = make_step(scheduled, jax_loss)
    for i in range(2):
        _, state, _, _ = step(jax.random.key(i), params, state, x, y)
    assert float(ivon_state(state).weight_decay) == 0.5


def test_multisteps_with_one_sample_per_big_step_equals_a_big_batch_step(make_step):
    x, y, params = make_problem(n=32, dtype=np.float32)
    big = ivon.ivon(0.1, ess=32.0, beta2=0.9)
    multi = optax.MultiSteps(ivon.ivon(0.1, ess=32.0, beta2=0.9), every_k_schedule=2)
    expected, expected_state, _, _ = make_step(big, jax_loss)(
        jax.random.key(0), params, big.init(params), x, y
    )

    def two_half_steps(params, samples_per_half):  # both half steps in one compilation
        opt_state = multi.init(params)
        psample, opt_state = ivon.sample_parameters(jax.random.key(0), params, opt_state)
        for half in (slice(0, 16), slice(16, 32)):
            if samples_per_half:  # one sample per micro-batch: what MultiSteps cannot average
                psample, opt_state = ivon.sample_parameters(jax.random.key(1), params, opt_state)
            grads = jax.grad(jax_loss)(psample, x[half], y[half])
            updates, opt_state = multi.update(grads, opt_state, params)
            params_after = optax.apply_updates(params, updates)
        return params_after, opt_state

    params_after, opt_state = jax.jit(two_half_steps, static_argnums=1)(params, False)
    for k in params:
        np.testing.assert_allclose(params_after[k], expected[k], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(
            ivon_state(opt_state).hessian[k], ivon_state(expected_state).hessian[k], rtol=1e-5
        )
    # A sample per micro-batch: the update comes back NaN.
    params_after, _ = jax.jit(two_half_steps, static_argnums=1)(params, True)
    assert all(np.all(np.isnan(v)) for v in jax.tree.leaves(params_after))


def test_update_must_follow_exactly_one_sample():
    x, y, params = make_problem(dtype=np.float32)
    optimizer = ivon.ivon(0.1, ess=32.0, accumulate=True)
    opt_state = optimizer.init(params)
    grads = jax.grad(jax_loss)(params, x, y)
    # Outside jit: an error that says what to do.
    with pytest.raises(ValueError, match="`update` without a new sample: call"):
        optimizer.update(grads, opt_state, params)
    with pytest.raises(ValueError, match="`accumulate_gradients` without a new sample"):
        ivon.accumulate_gradients(grads, opt_state)
    _, twice = ivon.sample_parameters(jax.random.key(0), params, opt_state)
    _, twice = ivon.sample_parameters(jax.random.key(1), params, twice)
    with pytest.raises(ValueError, match=r"after 2 samples.*optax.MultiSteps.*accumulate=True"):
        optimizer.update(grads, twice, params)

    # Under jit: NaN updates; a stale accumulation poisons the update.
    def update(grads, opt_state, accumulate_first):
        if accumulate_first:
            opt_state = ivon.accumulate_gradients(grads, opt_state)
            _, opt_state = ivon.sample_parameters(jax.random.key(2), params, opt_state)
        return optimizer.update(grads, opt_state, params)[0]

    for state, accumulate_first in ((opt_state, False), (twice, False), (opt_state, True)):
        updates = jax.jit(update, static_argnums=2)(grads, state, accumulate_first)
        assert all(np.all(np.isnan(v)) for v in jax.tree.leaves(updates))
    _, once = ivon.sample_parameters(jax.random.key(0), params, opt_state)
    updates = jax.jit(update, static_argnums=2)(grads, once, False)
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(updates))


def test_gradient_leaves_are_checked_against_the_parameters():
    x, y, params = make_problem(dtype=np.float32)
    optimizer = ivon.ivon(0.1, ess=32.0)
    psample, opt_state = ivon.sample_parameters(jax.random.key(0), params, optimizer.init(params))
    grads = jax.grad(jax_loss)(psample, x, y)
    for bad, shape in (
        ({"w": grads["w"], "b": grads["b"][None]}, r"`grads\['b'\]` has shape \(1, 3\)"),
        ({"w": grads["w"].T, "b": grads["b"]}, r"`grads\['w'\]` has shape \(3, 5\)"),
        ({"w": grads["w"], "b": jnp.zeros(3, jnp.int32)}, r"`grads\['b'\]` .* dtype int32"),
    ):
        with pytest.raises(ValueError, match=shape + ".*the parameter has shape"):
            optimizer.update(bad, opt_state, params)


def test_apply_if_finite_skips_non_finite_gradients_without_touching_the_state(make_step):
    x, y, params = make_problem(dtype=np.float32)
    optimizer = optax.apply_if_finite(ivon.ivon(0.1, ess=32.0), max_consecutive_errors=3)
    opt_state = optimizer.init(params)
    step = make_step(optimizer, jax_loss)
    params, opt_state, _, _ = step(jax.random.key(0), params, opt_state, x, y)
    before = ivon_state(opt_state)
    _, opt_state = ivon.sample_parameters(jax.random.key(1), params, opt_state)
    bad = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
    updates, opt_state = optimizer.update(bad, opt_state, params)
    for k in params:
        np.testing.assert_array_equal(updates[k], 0.0)
        np.testing.assert_array_equal(ivon_state(opt_state).hessian[k], before.hessian[k])
        np.testing.assert_array_equal(ivon_state(opt_state).momentum[k], before.momentum[k])
    params, opt_state, _, _ = step(jax.random.key(2), params, opt_state, x, y)
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(ivon_state(opt_state)))


def test_masked_and_multi_transform_sample_only_ivon_leaves():
    x, y, params = make_problem(dtype=np.float32)
    optimizer = optax.multi_transform(
        {"ivon": ivon.ivon(0.1, ess=32.0), "sgd": optax.sgd(0.1)}, {"w": "ivon", "b": "sgd"}
    )
    opt_state = optimizer.init(params)
    psample, opt_state = ivon.sample_parameters(jax.random.key(0), params, opt_state)
    np.testing.assert_array_equal(psample["b"], params["b"])
    assert not np.allclose(psample["w"], params["w"])
    grads = jax.grad(jax_loss)(psample, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    np.testing.assert_allclose(updates["b"], -0.1 * grads["b"], rtol=1e-6)
    sigma = ivon.posterior_std(opt_state)
    assert isinstance(sigma["b"], optax.MaskedNode) and sigma["w"].shape == params["w"].shape
    _, grads, hessian = ivon.sampled_value_and_grad(jax_loss, 3)(
        jax.random.key(1), params, opt_state, x, y
    )
    assert isinstance(hessian["b"], optax.MaskedNode)
    updates, opt_state = optimizer.update(grads, opt_state, params, hessian_estimate=hessian)
    np.testing.assert_allclose(updates["b"], -0.1 * grads["b"], rtol=1e-6)
    assert np.all(np.isfinite(updates["w"]))


def _mlp_setup(dtype=jnp.float32):
    import flax.linen as nn
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = jnp.asarray(digits.data[:256] / 16.0, dtype)
    y = jnp.asarray(digits.target[:256])

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(64, dtype=dtype, param_dtype=dtype)(x))
            return nn.Dense(10, dtype=dtype, param_dtype=dtype)(x)

    model = MLP()
    # A normal initialisation (kernels N(0, 1 / fan_in), zero biases) drawn with numpy: the
    # eager initialisers would compile once per shape.
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(
            rng.normal(size=s.shape) / math.sqrt(s.shape[0]) if s.ndim == 2 else np.zeros(s.shape),
            s.dtype,
        ),
        shapes,
    )
    return model, params, x, y


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


@pytest.mark.slow
def test_flax_linen_train_state_loop():
    from flax.training import train_state

    model, params, x, y = _mlp_setup()
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=params, tx=ivon.ivon(0.2, ess=256.0, hess_init=0.3)
    )

    @jax.jit
    def train_step(state, key):
        # the whole TrainState can be passed: IVON's state is found inside it
        psample, state = ivon.sample_parameters(key, state.params, state)
        loss, grads = jax.value_and_grad(lambda p: _xent(state.apply_fn({"params": p}, x), y))(
            psample
        )
        return state.apply_gradients(grads=grads), loss

    losses = []
    for i in range(60):
        state, loss = train_step(state, jax.random.key(i))
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    probs = ivon.bayesian_model_average(
        lambda p, x: jax.nn.softmax(model.apply({"params": p}, x)), 8
    )(jax.random.key(0), state.params, state.opt_state, x)
    assert np.mean(np.argmax(probs, -1) == y) > 0.8


@pytest.mark.slow
def test_flax_nnx_loops():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(64, 64, rngs=rngs)
            self.out = nnx.Linear(64, 10, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.hidden(x)))

    _, _, x, y = _mlp_setup()

    # 1. functional: split the module, train the parameter State with IVON, merge back
    model = MLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = ivon.ivon(0.2, ess=256.0, hess_init=0.3)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(key, params, opt_state):
        psample, opt_state = ivon.sample_parameters(key, params, opt_state)
        loss, grads = jax.value_and_grad(lambda p: _xent(nnx.merge(graphdef, p)(x), y))(psample)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for i in range(60):
        params, opt_state, loss = train_step(jax.random.key(i), params, opt_state)
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])

    # 2. nnx.Optimizer, the loop of the README
    model = MLP(nnx.Rngs(0))
    nnx_optimizer = nnx.Optimizer(model, ivon.ivon(0.2, ess=256.0, hess_init=0.3), wrt=nnx.Param)

    def loss_fn(model, x, y):
        return _xent(model(x), y)

    @nnx.jit
    def nnx_step(model, optimizer, key, x, y):
        sampled = ivon.sample_model(key, model, optimizer)
        loss, grads = nnx.value_and_grad(loss_fn)(sampled, x, y)  # gradient at the sample
        optimizer.update(model, grads)
        return loss

    losses = [float(nnx_step(model, nnx_optimizer, jax.random.key(i), x, y)) for i in range(60)]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    state = ivon_state(nnx.as_pure(nnx_optimizer.opt_state))
    assert int(state.count) == 60
    assert np.all(state.hessian["hidden"]["kernel"] != 0.3)  # the sample's noise reached update
    # the same first step as the functional loop: same draws, same update
    model_a, model_b = MLP(nnx.Rngs(0)), MLP(nnx.Rngs(0))
    optimizer_b = nnx.Optimizer(model_b, ivon.ivon(0.2, ess=256.0, hess_init=0.3), wrt=nnx.Param)
    nnx_step(model_b, optimizer_b, jax.random.key(7), x, y)
    graphdef, params = nnx.split(model_a, nnx.Param)
    params, _, _ = train_step(jax.random.key(7), params, optimizer.init(params))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(nnx.state(model_b, nnx.Param))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    # 3. sample_parameters straight on the Param State and nnx.Optimizer's state
    psample, opt_state = ivon.sample_parameters(
        jax.random.key(0), nnx.state(model, nnx.Param), nnx_optimizer.opt_state
    )
    assert jax.tree.structure(psample) == jax.tree.structure(nnx.state(model, nnx.Param))
    assert jax.tree.structure(opt_state) == jax.tree.structure(nnx_optimizer.opt_state)
    assert int(ivon_state(nnx.as_pure(opt_state)).samples_drawn) == 1


def test_posterior_summary_tells_whether_the_posterior_moved(make_step):
    x, y, params = make_problem(dtype=np.float32)
    summaries = {}
    for hess_init in (1e-3, 100.0):  # far below and far above the loss's curvature (~0.1)
        optimizer = ivon.ivon(0.1, ess=32.0, hess_init=hess_init, beta2=0.99, weight_decay=0.0)
        opt_state = optimizer.init(params)
        summary = ivon.posterior_summary(opt_state, hess_init=hess_init, beta2=0.99)
        assert summary["step"] == 0 and summary["moved"] == 0.0
        assert summary["hessian_ratio_median"] == pytest.approx(1.0)
        for name in ("std_initial", "std_median", "std_q05"):
            assert summary[name] == pytest.approx(1 / math.sqrt(32 * hess_init), rel=1e-6)
        step = make_step(optimizer, jax_loss)
        for i in range(50):
            _, opt_state, _, _ = step(jax.random.key(i), params, opt_state, x, y)
        summaries[hess_init] = summary = ivon.posterior_summary(
            opt_state, hess_init=hess_init, beta2=0.99
        )
        leaves = jax.tree.leaves(ivon_state(opt_state).hessian)
        hessian = np.concatenate([np.ravel(h) for h in leaves])
        ratio = hessian / (hess_init * 0.99**50)
        assert summary["step"] == 50
        assert summary["moved"] == pytest.approx(np.mean((ratio < 0.5) | (ratio > 2)))
        assert summary["hessian_ratio_median"] == pytest.approx(np.median(ratio), rel=1e-5)
        assert summary["std_median"] == pytest.approx(
            np.median(1 / np.sqrt(32 * hessian)), rel=1e-5
        )
    # from 1e-3 the data's curvature dominates within 50 steps; from 100 h has only decayed
    assert summaries[1e-3]["moved"] == 1.0 and summaries[1e-3]["hessian_ratio_q05"] > 10
    assert summaries[100.0]["moved"] == 0.0
    assert summaries[100.0]["hessian_ratio_median"] == pytest.approx(1.0, abs=0.01)


def test_bfloat16_parameters_keep_float32_state():
    model, params, x, y = _mlp_setup(jnp.bfloat16)
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    optimizer = ivon.ivon(0.2, ess=256.0, hess_init=0.3)
    opt_state = optimizer.init(params)
    state = ivon_state(opt_state)
    for tree in (state.momentum, state.hessian, state.noise):
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(tree))

    @jax.jit
    def train_step(key, params, opt_state):
        psample, opt_state = ivon.sample_parameters(key, params, opt_state)
        loss, grads = jax.value_and_grad(lambda p: _xent(model.apply({"params": p}, x), y))(psample)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, psample, updates

    losses = []
    for i in range(60):
        params, opt_state, loss, psample, updates = train_step(jax.random.key(i), params, opt_state)
        losses.append(float(loss))
    for tree in (params, psample, updates):
        assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(tree))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(ivon_state(opt_state).hessian))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    # a user-chosen state dtype
    state16 = ivon_state(ivon.ivon(0.1, ess=1.0, state_dtype=jnp.bfloat16).init(params))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(state16.momentum))


# --------------------------------------------------------------------------------------------
# Checkpointing
# --------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_bitwise_identical_resume():
    x, y, params = make_problem(dtype=np.float32)
    optimizer = optax.inject_hyperparams(ivon.ivon)(learning_rate=0.1, ess=32.0, accumulate=True)

    @jax.jit
    def step(i, params, opt_state):
        keys = jax.random.split(jax.random.key(i), 2)
        psample, opt_state = ivon.sample_parameters(keys[0], params, opt_state)
        opt_state = ivon.accumulate_gradients(jax.grad(jax_loss)(psample, x, y), opt_state)
        psample, opt_state = ivon.sample_parameters(keys[1], params, opt_state)
        updates, opt_state = optimizer.update(jax.grad(jax_loss)(psample, x, y), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    uninterrupted = (params, optimizer.init(params))
    for i in range(6):
        uninterrupted = step(i, *uninterrupted)

    resumed = (params, optimizer.init(params))
    for i in range(3):
        resumed = step(i, *resumed)
    blob = flax.serialization.to_bytes(resumed)
    target = (params, optimizer.init(params))
    restored = flax.serialization.from_bytes(target, blob)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert jax.tree.structure(restored) == jax.tree.structure(resumed)
    state_dict = flax.serialization.to_state_dict(resumed[1])
    assert flax.serialization.from_state_dict(target[1], state_dict) is not None
    resumed = restored
    for i in range(3, 6):
        resumed = step(i, *resumed)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(learning_rate=-0.1), "`learning_rate` must be >= 0"),
        (dict(ess=0.0), "`ess` must be > 0"),
        (dict(ess=-5), "`ess` must be > 0"),
        (dict(ess=float("nan")), "`ess` must be > 0"),
        (dict(hess_init=0.0), "`hess_init` must be > 0"),
        (dict(weight_decay=-1e-4), "`weight_decay` must be >= 0"),
        (dict(beta1=1.0), "`beta1` must be in [0, 1)"),
        (dict(beta1=-0.1), "`beta1` must be in [0, 1)"),
        (dict(beta2=1.0), "`beta2` must be in [0, 1)"),
        (dict(clip_radius=0.0), "`clip_radius` must be > 0"),
        (dict(hess_approx="hutchinson"), "`hess_approx` must be one of ('price', 'gradsq')"),
        (dict(rescale_lr="yes"), "`rescale_lr` must be True or False"),
        (dict(debias=1), "`debias` must be True or False"),
        (dict(ess="many"), "`ess` must be a real number"),
    ],
)
def test_bad_hyperparameters_raise_clear_errors(kwargs, message):
    arguments = dict(learning_rate=0.1, ess=10.0) | kwargs
    with pytest.raises(ValueError, match=re_escape(message)):
        ivon.ivon(**arguments)


def re_escape(text):
    import re

    return re.escape(text)


def test_bad_calls_raise_clear_errors():
    x, y, params = make_problem(dtype=np.float32)
    optimizer = ivon.ivon(0.1, ess=32.0)
    opt_state = optimizer.init(params)
    psample, opt_state = ivon.sample_parameters(jax.random.key(0), params, opt_state)
    grads = jax.grad(jax_loss)(psample, x, y)
    with pytest.raises(ValueError, match="needs `params`"):
        optimizer.update(grads, opt_state)
    with pytest.raises(ValueError, match="`grads` must have the same pytree structure as `params`"):
        optimizer.update({"w": grads["w"]}, opt_state, params)
    with pytest.raises(ValueError, match="`grads` must have the same pytree structure as the"):
        optimizer.update(
            {"w": grads["w"], "c": grads["b"]}, opt_state, {"w": params["w"], "c": params["b"]}
        )
    with pytest.raises(ValueError, match="accumulate=True"):
        ivon.accumulate_gradients(grads, opt_state)
    with pytest.raises(ValueError, match="No IVON state found"):
        ivon.sample_parameters(jax.random.key(0), params, optax.adam(0.1).init(params))
    with pytest.raises(ValueError, match="do not match the optimizer state"):
        ivon.sample_parameters(
            jax.random.key(0), {"w": jnp.zeros((2, 2)), "b": params["b"]}, opt_state
        )
    with pytest.raises(ValueError, match="floating-point parameters"):
        optimizer.init({"w": jnp.zeros(3, jnp.int32)})
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="`num_samples` must be an integer >= 1"):
            ivon.sampled_value_and_grad(jax_loss, bad)
        with pytest.raises(ValueError, match="`num_samples` must be an integer >= 1"):
            ivon.bayesian_model_average(jax_loss, bad)
    with pytest.raises(ValueError, match="`method` must be 'scan' or 'vmap'"):
        ivon.sampled_value_and_grad(jax_loss, 2, method="pmap")
    with pytest.raises(ValueError, match="`batch_size` must be an integer >= 1 that divides"):
        ivon.bayesian_model_average(jax_loss, 10, batch_size=3)
    with pytest.raises(ValueError, match="holds 2 IVON states"):
        ivon.posterior_std((opt_state, opt_state))


def test_two_ivon_states_with_different_priors_in_one_optimizer():
    """Per-layer priors: multi_transform with an IVON instance per group of parameters."""
    x, y, params = make_problem(dtype=np.float32)
    optimizer = optax.multi_transform(
        {
            "strong": ivon.ivon(0.1, ess=32.0, weight_decay=3.0, accumulate=True),
            "weak": ivon.ivon(0.1, ess=32.0, weight_decay=1e-4, accumulate=True),
        },
        {"w": "weak", "b": "strong"},
    )
    opt_state = optimizer.init(params)
    assert len(ivon_states(opt_state)) == 2
    psample, opt_state = ivon.sample_parameters(jax.random.key(0), params, opt_state)
    # each group is perturbed with its own posterior std
    for index, leaf in enumerate(("b", "w")):
        noise = ivon_states(opt_state)[index].noise[leaf]
        np.testing.assert_allclose(psample[leaf] - params[leaf], noise, atol=1e-6)
    # the posterior std of each group follows its own prior: 1 / sqrt(ess * (h0 + wd))
    for index, (leaf, wd) in enumerate((("b", 3.0), ("w", 1e-4))):
        sigma = ivon.posterior_std(ivon_states(opt_state)[index])[leaf]
        np.testing.assert_allclose(sigma, 1 / math.sqrt(32.0 * (1.0 + wd)), rtol=1e-6)
    # the same key draws the same noise (each state gets its own key derived from it)
    _, again = ivon.sample_parameters(jax.random.key(0), params, opt_state)
    for a, b in zip(ivon_states(again), ivon_states(opt_state)):
        for x_leaf, y_leaf in zip(jax.tree.leaves(a.noise), jax.tree.leaves(b.noise)):
            np.testing.assert_array_equal(x_leaf, y_leaf)
    grads = jax.grad(jax_loss)(psample, x, y)
    opt_state = ivon.accumulate_gradients(grads, opt_state)
    psample, opt_state = ivon.sample_parameters(jax.random.key(1), params, opt_state)
    updates, opt_state = optimizer.update(jax.grad(jax_loss)(psample, x, y), opt_state, params)
    for state in ivon_states(opt_state):
        assert int(state.count) == 1
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
    _, grads, hessian = ivon.sampled_value_and_grad(jax_loss, 3)(
        jax.random.key(2), params, opt_state, x, y
    )
    updates, opt_state = optimizer.update(grads, opt_state, params, hessian_estimate=hessian)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
