"""Tests of implicit_vi.py: the linearised entropy, the MM generators, and the Bayesian model.

The training tests are kept small (a few seconds each on two CPU cores); they assert properties
that fail for a wrong implementation (a broken entropy collapses the posterior, a mean-field
family cannot show correlation), not timings. Most of the time is XLA compilation, so tests share
models where they can, put the computations they compare in one jitted function rather than
running them eagerly (which compiles every operation) or jitting each separately, train in one
`lax.scan` (`run_steps`), and draw test data, template networks (`lecun_params`) and generator
parameters (`random_params`) with numpy rather than compiling random number generators and
initialisers.
"""

from __future__ import annotations

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import nnx

import implicit_vi as ivi

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def linear_mean_fn(params, z):
    """g(z) = A z + b, row by row."""
    a, b = params
    return z @ a.T + b


def gaussian_entropy(cov: np.ndarray) -> float:
    dim = cov.shape[0]
    return 0.5 * dim * math.log(2 * math.pi * math.e) + 0.5 * np.linalg.slogdet(cov)[1]


def tanh_mean_fn(params, z):
    """A small nonlinear generator: g(z) = W2 tanh(W1 z + b1) + b2, row by row."""
    w1, b1, w2, b2 = params
    return jnp.tanh(z @ w1.T + b1) @ w2.T + b2


def normal(seed, *shape, dtype=jnp.float32):
    """Standard normal test data drawn with numpy: jax.random.normal would compile once per
    shape (its Threefry hash and inverse error function take about a second each)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def random_tanh_params(seed, latent_dim, hidden, output_dim, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(scale * rng.normal(size=shape), dtype)
        for shape, scale in (
            ((hidden, latent_dim), 1 / math.sqrt(latent_dim)),
            ((hidden,), 0.1),
            ((output_dim, hidden), 1 / math.sqrt(hidden)),
            ((output_dim,), 0.1),
        )
    )


def random_params(module, *inputs, scale=0.3, seed=0):
    """Parameters of the shapes ``module.init`` would give, drawn with numpy: no compilation."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes
    )


def lecun_params(module, *inputs, seed=0):
    """Parameters as a normally initialised network has them (kernels N(0, 1 / fan_in), zero
    biases), drawn with numpy: no compilation of the initialisers."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if path[-1].key == "bias":
            return jnp.zeros(s.shape, s.dtype)
        return jnp.asarray(rng.normal(size=s.shape) / math.sqrt(s.shape[0]), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def run_steps(step, vi_params, opt_state, keys, batch, eigvecs, carry_eigvecs=False):
    """``for key in keys: vi_params, opt_state, aux = step(vi_params, opt_state, key, batch,
    eigvecs)`` as one jitted ``lax.scan``: the train step compiles once, inside the scan, and
    no step is dispatched from Python. With ``carry_eigvecs`` each step's ``aux["eigvecs"]``
    warm-starts the next; otherwise every step gets ``eigvecs`` (zeros: fresh starts, what
    ``step(..., eigvecs=None)`` passes). Returns the final state and every step's aux."""

    @jax.jit
    def run(vi_params, opt_state, keys, batch, eigvecs):
        def body(carry, key):
            vi_params, opt_state, previous = carry
            vi_params, opt_state, aux = step(vi_params, opt_state, key, batch, previous)
            return (vi_params, opt_state, aux["eigvecs"] if carry_eigvecs else previous), aux

        (vi_params, opt_state, _), auxes = jax.lax.scan(body, (vi_params, opt_state, eigvecs), keys)
        return vi_params, opt_state, auxes

    return run(vi_params, opt_state, keys, batch, eigvecs)


def step_keys(num_steps):
    """``jax.random.key(i)`` for i < num_steps, stacked."""
    return jax.vmap(jax.random.key)(jnp.arange(num_steps))


class MLP(nn.Module):
    widths: tuple[int, ...]
    activation: callable = nn.tanh

    @nn.compact
    def __call__(self, x):
        for width in self.widths[:-1]:
            x = self.activation(nn.Dense(width)(x))
        return nn.Dense(self.widths[-1])(x)


# ---------------------------------------------------------------------------------------------
# 1. Entropy of the linearised sampler
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_params,latent_dim", [(7, 3), (5, 5), (3, 6)])
def test_exact_entropy_of_linear_generator_matches_closed_form(num_params, latent_dim):
    # g(z) = A z + b with z ~ N(0, I) and output noise sigma: theta ~ N(b, A A^T + sigma^2 I).
    rng = np.random.default_rng(num_params)
    sigma = 0.05
    # Jitted: one compilation per dtype rather than one per operation.
    exact = jax.jit(
        lambda a, b, z: ivi.linearised_entropy(linear_mean_fn, (a, b), z, sigma, method="exact")
    )
    a = rng.normal(size=(num_params, latent_dim))
    b = rng.normal(size=num_params)
    z = rng.normal(size=(4, latent_dim))
    expected = gaussian_entropy(a @ a.T + sigma**2 * np.eye(num_params))
    with jax.enable_x64(True):
        mean, entropy = exact(jnp.asarray(a), jnp.asarray(b), jnp.asarray(z))
        assert entropy.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(entropy), expected, atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(mean), z @ a.T + b, atol=1e-12)
    # float32, relative accuracy
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    _, entropy32 = exact(a32, b32, jnp.zeros((1, latent_dim), jnp.float32))
    np.testing.assert_allclose(float(entropy32[0]), expected, rtol=1e-5)


def test_smallest_sv_bound_is_a_lower_bound_and_tight_for_equal_singular_values():
    rng = np.random.default_rng(0)
    sigma, num_params, latent_dim = 0.1, 9, 4
    z = jnp.asarray(rng.normal(size=(3, latent_dim)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), z.shape[0])

    @jax.jit  # both methods at both parameter sets, in one compilation
    def entropies(spread, equal):
        def entropy(p, method):
            return ivi.linearised_entropy(
                linear_mean_fn, p, z, sigma, method=method, key=keys, num_iterations=latent_dim
            )[1]

        return [entropy(p, method) for p in (spread, equal) for method in ("exact", "smallest_sv")]

    spread = (
        jnp.asarray(rng.normal(size=(num_params, latent_dim)), jnp.float32),
        jnp.zeros(num_params),
    )
    # A = 2.5 Q with orthonormal columns: all singular values equal 2.5, the bound is exact.
    q, _ = np.linalg.qr(rng.normal(size=(num_params, latent_dim)))
    equal = (jnp.asarray(2.5 * q, jnp.float32), jnp.zeros(num_params))
    exact, bound, equal_exact, equal_bound = entropies(spread, equal)
    assert np.all(np.asarray(bound) < np.asarray(exact) - 0.1)
    np.testing.assert_allclose(equal_bound, equal_exact, rtol=1e-5)


@pytest.mark.parametrize("seed,latent_dim,hidden,output_dim", [(0, 6, 16, 40), (2, 20, 40, 80)])
def test_iterative_smallest_singular_value_matches_numpy_svd(seed, latent_dim, hidden, output_dim):
    params = random_tanh_params(seed, latent_dim, hidden, output_dim)
    z = normal(100 + seed, 3, latent_dim)

    @jax.jit  # one compilation for the solver and the Jacobians
    def solve_and_jacobians(p, z):
        s_min_squared, pair, _ = ivi.smallest_singular_value(
            tanh_mean_fn,
            p,
            z,
            jax.random.split(jax.random.key(seed), 3),
            num_iterations=latent_dim + 2,
        )
        return s_min_squared, pair, jax.vmap(jax.jacfwd(lambda u: tanh_mean_fn(p, u)))(z)

    s_min_squared, pair, jacobians = solve_and_jacobians(params, z)
    for i in range(z.shape[0]):
        jac = np.asarray(jacobians[i], np.float64)
        s = np.linalg.svd(jac, compute_uv=False)
        assert s[0] / s[-1] < 100  # well-conditioned enough for float32
        np.testing.assert_allclose(math.sqrt(float(s_min_squared[i])), s[-1], rtol=1e-3)
        np.testing.assert_allclose(float(jnp.linalg.norm(pair.vector[i])), 1.0, rtol=1e-5)


def test_smallest_singular_value_of_an_mm_generator_matches_numpy_svd():
    gen = ivi.MMGenerator((3, 4), (6, 6), 1, (9, 8))
    gen_params = random_params(gen, jnp.zeros((3, 4)), scale=0.5)

    def mean_fn(p, z):
        return gen.apply({"params": p}, z.reshape(*z.shape[:-1], 3, 4))

    @jax.jit
    def s_min_and_jacobian(z, keys):
        s2, _, _ = ivi.smallest_singular_value(mean_fn, gen_params, z, keys, num_iterations=14)
        return s2, jax.jacfwd(lambda u: mean_fn(gen_params, u[None])[0])(z[0])

    z = normal(4, 1, 12)
    s2, jac = s_min_and_jacobian(z, jax.random.split(jax.random.key(5), 1))
    s = np.linalg.svd(np.asarray(jac), compute_uv=False)
    assert s[0] / s[-1] < 100  # well-conditioned enough for float32
    np.testing.assert_allclose(math.sqrt(float(s2[0])), s[-1], rtol=1e-3)


def test_smallest_eigenpair_beats_few_iterations_and_handles_rank_deficiency():
    rng = np.random.default_rng(1)
    # Rank-deficient PSD operator: a 6-dimensional null space in 20 dimensions.
    factor = rng.normal(size=(14, 20))
    a = jnp.asarray(factor.T @ factor, jnp.float32)

    def matvec(x):  # rows are independent problems; a is symmetric
        return x @ a

    iterations = (1, 5, 20)

    @jax.jit  # one compilation for all the solves
    def solves():
        x0 = jnp.ones((1, 20))
        runs = [ivi.smallest_eigenpair(matvec, x0, k) for k in iterations]
        return runs, ivi.smallest_eigenpair(lambda x: 0.0 * x, jnp.ones((2, 5)), num_iterations=5)

    runs, (zero_rho, zero_v, *_) = solves()
    rho, v, *_ = runs[-1]
    assert abs(float(rho[0])) < 1e-3 * float(jnp.linalg.norm(a, 2))
    assert float(jnp.linalg.norm(a @ v[0])) < 1e-2
    # More iterations never give a larger Ritz value (nested Krylov subspaces).
    values = [float(run.value[0]) for run in runs]
    assert all(later <= earlier + 1e-4 for earlier, later in itertools.pairwise(values))
    # The zero operator: finite, unit vector.
    rho, v = zero_rho, zero_v
    assert np.all(np.asarray(rho) == 0) and np.allclose(jnp.linalg.norm(v, axis=-1), 1.0)


@pytest.mark.parametrize("method", ["exact", "smallest_sv"])
def test_entropy_gradients_match_finite_differences_float64(method):
    with jax.enable_x64(True):
        latent_dim = 3
        params = random_tanh_params(7, latent_dim, 5, 6, jnp.float64)
        z = normal(8, 2, latent_dim, dtype=jnp.float64)
        sigma = 0.3

        def entropy(p):
            _, value = ivi.linearised_entropy(
                tanh_mean_fn,
                p,
                z,
                sigma,
                method=method,
                key=jax.random.split(jax.random.key(0), 2),
                num_iterations=latent_dim + 2,
            )
            return jnp.sum(value)

        direction = jax.tree_util.tree_map(
            lambda p: normal(p.size, *p.shape, dtype=jnp.float64), params
        )
        eps = 1e-5

        @jax.jit  # one compilation for the gradient and the two shifted values
        def analytic_and_numeric(params):
            def shifted(sign):
                return jax.tree_util.tree_map(lambda p, d: p + sign * eps * d, params, direction)

            grads = jax.grad(entropy)(params)
            analytic = sum(
                jnp.vdot(g, d)
                for g, d in zip(
                    jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction)
                )
            )
            return analytic, (entropy(shifted(1.0)) - entropy(shifted(-1.0))) / (2 * eps)

        analytic, numeric = analytic_and_numeric(params)
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-6)


@pytest.mark.parametrize("method", ["exact", "smallest_sv"])
def test_degenerate_jacobians_give_finite_values_and_gradients(method):
    num_params, latent_dim, sigma = 6, 4, 1e-3
    rank_one = jnp.outer(jnp.arange(1.0, 7.0), jnp.array([1.0, -1.0, 0.5, 0.0]))

    @jax.jit
    def values_and_grads(params, z):
        def entropy(p):
            return ivi.linearised_entropy(
                linear_mean_fn,
                p,
                z,
                sigma,
                method=method,
                key=jax.random.split(jax.random.key(0), 3),
                num_iterations=3,
            )[1]

        return entropy(params), jax.grad(lambda p: jnp.sum(entropy(p)))(params)

    for a in (jnp.zeros((num_params, latent_dim)), rank_one):
        params = (a, jnp.ones(num_params))
        values, grads = values_and_grads(params, jnp.ones((3, latent_dim)))
        assert np.all(np.isfinite(np.asarray(values)))
        assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
        if not np.any(np.asarray(a)):
            # J = 0: 1/2 log det(sigma^2 I_d) = d log sigma, so H = D/2 log(2 pi e) + D log sigma.
            expected = 0.5 * num_params * math.log(2 * math.pi * math.e) + num_params * math.log(
                sigma
            )
            np.testing.assert_allclose(np.asarray(values), expected, rtol=1e-5)


@pytest.mark.parametrize("method", ["exact", "smallest_sv"])
def test_entropy_works_under_vmap_and_jit_and_matches_the_batched_call(method):
    params = random_tanh_params(11, 4, 8, 10)
    z = normal(12, 5, 4)
    keys = jax.random.split(jax.random.key(13), 5)

    def entropy(z, keys):
        return ivi.linearised_entropy(
            tanh_mean_fn, params, z, 0.01, method=method, key=keys, num_iterations=6
        )[1]

    @jax.jit
    def per_sample_and_batched(z, keys):
        one_row = jax.vmap(lambda z_one, key: entropy(z_one[None], key[None])[0])
        return one_row(z, keys), entropy(z, keys)

    # One row at a time under vmap: each row's value depends only on its latent and key.
    per_sample, batched = per_sample_and_batched(z, keys)
    np.testing.assert_allclose(np.asarray(per_sample), np.asarray(batched), rtol=1e-5)


def test_entropy_constant_can_be_skipped():
    a = (jnp.eye(4)[:, :2], jnp.zeros(4))
    z = jnp.zeros((1, 2))
    with_constant = ivi.linearised_entropy(linear_mean_fn, a, z, 0.1, method="exact")[1]
    without = ivi.linearised_entropy(
        linear_mean_fn, a, z, 0.1, method="exact", include_constant=False
    )[1]
    np.testing.assert_allclose(
        float(with_constant[0] - without[0]), ivi.entropy_constant(4, 2, 0.1), rtol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# 2. Generators
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_shape,out_shape",
    [((3, 5), (4, 2)), ((40, 40), (420, 420)), ((420, 420), (957, 500)), ((6, 1), (2, 7))],
)
def test_mm_layer_equals_its_formula_with_batch_dimensions(in_shape, out_shape):
    layer = ivi.MMLayer(out_shape)
    x = normal(0, 2, 3, *in_shape)
    # Random weights and non-zero biases, so that every term is checked.
    params = random_params(layer, x, scale=1 / math.sqrt(max(in_shape)))
    # The same layer in the generators' internal (a, batch, b) layout.
    middle = ivi.MMLayer(out_shape, batch_in_middle=True)

    @jax.jit  # one compilation for both layouts and the formula
    def outputs(params, x):
        y = layer.apply({"params": params}, x)
        expected = (params["left_kernel"] @ x + params["left_bias"]) @ params[
            "right_kernel"
        ] + params["right_bias"]
        y_middle = middle.apply({"params": params}, jnp.swapaxes(x.reshape(6, *in_shape), 0, 1))
        return y, expected, y_middle

    y, expected, y_middle = outputs(params, x)
    assert y.shape == (2, 3, *out_shape)
    np.testing.assert_allclose(
        np.asarray(y),
        np.asarray(expected),
        rtol=2e-5,
        atol=2e-5 * float(jnp.max(jnp.abs(expected))),
    )
    np.testing.assert_allclose(
        np.asarray(jnp.swapaxes(y_middle, 0, 1)),
        np.asarray(y.reshape(6, *out_shape)),
        rtol=1e-6,
        atol=1e-6,
    )
    # Parameter count a'a + a'b + bb' + a'b'.
    (a, b), (a2, b2) = in_shape, out_shape
    assert ivi.count_params(params) == a2 * a + a2 * b + b * b2 + a2 * b2


def test_mm_layer_initialisation_has_fan_in_variance_and_zero_biases():
    # a != b, so that swapping the fan-in axes of W_l or W_r would fail.
    (a, b), (a2, b2) = (200, 50), (300, 120)
    variables = jax.jit(ivi.MMLayer((a2, b2)).init)(jax.random.key(1), jnp.zeros((a, b)))["params"]
    np.testing.assert_allclose(
        float(jnp.std(variables["left_kernel"])), 1 / math.sqrt(a), rtol=0.05
    )
    np.testing.assert_allclose(
        float(jnp.std(variables["right_kernel"])), 1 / math.sqrt(b), rtol=0.05
    )
    assert not jnp.any(variables["left_bias"]) and not jnp.any(variables["right_bias"])


def test_mm_generator_parameter_counts_and_the_papers_mnist_configuration():
    rng = np.random.default_rng(0)
    for _ in range(3):
        noise, hidden, output = [
            tuple(int(n) for n in rng.integers(1, 12, size=2)) for _ in range(3)
        ]
        n_hidden = int(rng.integers(0, 3))
        gen = ivi.MMGenerator(noise, hidden, n_hidden, output)
        variables = jax.eval_shape(gen.init, jax.random.key(0), jnp.zeros(noise))
        assert ivi.count_params(variables) == gen.num_params
        shapes = [noise] + [hidden] * (n_hidden + 1) + [output]
        expected = sum(
            a2 * a + a2 * b + b * b2 + a2 * b2 for (a, b), (a2, b2) in itertools.pairwise(shapes)
        )
        assert gen.num_params == expected

    # The paper's MNIST generator: noise 40x40, hidden 420x420, n_hidden 2, output 957x500,
    # from a file in the published layout (one head that reads the noise itself).
    gen = ivi.generator_from_config(yaml.safe_load(MNIST_MLP_YAML), trunk_shapes=[])
    assert isinstance(gen, ivi.MMGenerator)
    variables = jax.eval_shape(gen.init, jax.random.key(0), jnp.zeros((40, 40)))
    assert ivi.count_params(variables) == gen.num_params == 3_130_380
    model = MLP((400, 400, 10), nn.relu)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 784)))["params"]
    assert ivi.count_params(params) == 478_410
    assert gen.output_size == 478_500 >= 478_410
    bnn = ivi.ImplicitBNN.from_linen(model, params, generator=gen, output_scale=None)
    report = bnn.report()
    assert (report.generator_params, report.stochastic_params, report.generator_output) == (
        3_130_380,
        478_410,
        478_500,
    )
    assert "3,130,380" in str(report)


def test_mlp_generator_and_batch_dimensions():
    gen = ivi.MLPGenerator(latent_dim=3, output_size=7, hidden_sizes=(5,))

    @jax.jit  # one compilation for the initialiser and both batch shapes
    def init_and_apply(key, z):
        variables = gen.init(key, jnp.zeros(3))
        return variables, gen.apply(variables, z), gen.apply(variables, z[1, 2])

    z = normal(1, 2, 4, 3)
    variables, out, one = init_and_apply(jax.random.key(0), z)
    assert ivi.count_params(variables) == gen.num_params == (3 + 1) * 5 + (5 + 1) * 7
    assert out.shape == (2, 4, 7) and one.shape == (7,)
    np.testing.assert_allclose(np.asarray(out[1, 2]), np.asarray(one), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Generator configuration files in the paper's published layout (generator_from_config)
# ---------------------------------------------------------------------------------------------

# Four mappings: input shapes, output shapes, hidden shapes (with the trunk), hidden-layer counts.
# The heads are listed out of order on purpose: they run in the order of their keys.
MULTI_HEAD_YAML = """\
# input shapes
- noise_input: [6, 6]
  gen2: [4, 4]
  gen1: [4, 4]
  gen3: [2, 8]
# output shapes
- gen1: [20, 10]
  gen2: [11, 10]
  gen3: [3, 7]
# hidden shapes
- gen1: [8, 8]
  gen2: [6, 6]
  gen3: [5, 5]
  second_layer: [[10, 10], [12, 4]]
# numbers of hidden layers
- gen1: 1
  gen2: 2
  gen3: 0
"""

# The paper's MNIST generator (a single head reading the noise itself, no trunk).
MNIST_MLP_YAML = """\
- noise_input: [40, 40]
  gen1: [40, 40]
- gen1: [957, 500]
- gen1: [420, 420]
- gen1: 2
"""


def multi_head_config(**changes):
    """The parsed MULTI_HEAD_YAML with ``changes[f"part{i}"]`` merged into mapping i."""
    config = yaml.safe_load(MULTI_HEAD_YAML)
    for i in range(4):
        config[i].update(changes.get(f"part{i}", {}))
    return config


def test_published_config_file_gives_the_published_generator(tmp_path):
    path = tmp_path / "generator.yaml"
    path.write_text(MULTI_HEAD_YAML)
    with open(path) as f:
        gen = ivi.generator_from_config(yaml.safe_load(f))
    assert isinstance(gen, ivi.MultiHeadMMGenerator)
    assert gen.head_input_shapes == ((4, 4), (4, 4), (2, 8))
    assert gen.head_output_shapes == ((20, 10), (11, 10), (3, 7))
    # By hand, a'a + a'b + bb' + a'b' per MM layer:
    trunk = (60 + 60 + 60 + 100) + (120 + 120 + 40 + 48)  # 6x6 -> 10x10 -> 12x4
    head1 = (32 + 32 + 32 + 64) + 4 * 64 + (160 + 160 + 80 + 200)  # 4x4 -> 8x8 -> 8x8 -> 20x10
    head2 = (24 + 24 + 24 + 36) + 2 * 4 * 36 + (66 + 66 + 60 + 110)  # 4x4 -> 6x6 (x3) -> 11x10
    head3 = (10 + 40 + 40 + 25) + (15 + 15 + 35 + 21)  # 2x8 -> 5x5 -> 3x7
    assert trunk + head1 + head2 + head3 == 2523
    params = random_params(gen, jnp.zeros((6, 6)))
    assert ivi.count_params(params) == gen.num_params == 2523
    assert gen.output_size == 200 + 110 + 21

    # Against an independent computation: the trunk in numpy, flattened row-major and cut into
    # consecutive chunks in key order, each chunk through its head, the outputs concatenated.
    z = np.random.default_rng(1).standard_normal((2, 6, 6)).astype(np.float32)
    h = z
    for name in ("trunk_0", "trunk_1"):
        p = {k: np.asarray(v) for k, v in params[name].items()}
        y = (p["left_kernel"] @ h + p["left_bias"]) @ p["right_kernel"] + p["right_bias"]
        h = np.where(y > 0, y, np.expm1(y))  # ELU
    flat = h.reshape(2, -1)
    chunks = [
        flat[:, start:stop].reshape(2, *gen.head_input_shapes[i])
        for i, (start, stop) in enumerate(((0, 16), (16, 32), (32, 48)))
    ]

    @jax.jit  # one compilation for the generator and its three heads
    def generated_and_heads(params, z, chunks):
        heads = [
            gen.head(i, parent=None).apply({"params": params[f"heads_{i}"]}, chunk)
            for i, chunk in enumerate(chunks)
        ]
        return gen.apply({"params": params}, z), heads

    out, expected = generated_and_heads(params, z, chunks)
    np.testing.assert_allclose(
        np.asarray(out), np.concatenate(expected, axis=-1), rtol=2e-5, atol=2e-5
    )


def test_multi_head_generator_batches_and_its_trunk_correlates_the_heads():
    gen = ivi.generator_from_config(multi_head_config())
    variables = {"params": random_params(gen, jnp.zeros((6, 6)))}
    z = normal(1, 5, 6, 6)

    @jax.jit  # one compilation for both batch shapes and the Jacobian
    def outputs(variables, z):
        jac = jax.jacfwd(lambda u: gen.apply(variables, u.reshape(6, 6)))(z[0].ravel())
        return gen.apply(variables, z), gen.apply(variables, z[3]), jac

    out, out3, jac = outputs(variables, z)
    assert out.shape == (5, 331) and out3.shape == (331,)
    np.testing.assert_allclose(np.asarray(out[3]), np.asarray(out3), rtol=1e-5, atol=1e-6)
    # The shared trunk correlates the heads: every head's output depends on every noise entry.
    for start, stop in ((0, 200), (200, 310), (310, 331)):
        assert float(jnp.min(jnp.max(jnp.abs(jac[start:stop]), axis=0))) > 0


def test_config_heads_run_in_numeric_key_order(tmp_path):
    order = sorted(range(1, 12), key=str)  # gen1, gen10, gen11, gen2, ...: as a file may list them
    lines = ["- noise_input: [3, 3]"] + [f"  gen{k}: [1, 4]" for k in order]
    lines += ["- " + "\n  ".join(f"gen{k}: [{k}, 3]" for k in order)]
    lines += ["- " + "\n  ".join(f"gen{k}: [2, 2]" for k in order)]
    lines[-1] += "\n  second_layer: [[4, 4], [11, 4]]"
    lines += ["- " + "\n  ".join(f"gen{k}: 0" for k in order)]
    path = tmp_path / "eleven_heads.yaml"
    path.write_text("\n".join(lines) + "\n")
    gen = ivi.generator_from_config(yaml.safe_load(path.read_text()))
    assert gen.head_output_shapes == tuple((k, 3) for k in range(1, 12))
    assert gen.output_size == 3 * sum(range(1, 12))


def test_config_without_second_layer_takes_the_trunk_as_an_argument():
    without = multi_head_config()
    trunk = without[2].pop("second_layer")
    with pytest.raises(ValueError, match=r"has no second_layer.*trunk_shapes=\[\[a1, b1\]"):
        ivi.generator_from_config(without)
    gen = ivi.generator_from_config(without, trunk_shapes=trunk)
    assert gen == ivi.generator_from_config(multi_head_config())
    assert gen.num_params == 2523
    with pytest.raises(ValueError, match="trunk_shapes is for files without it"):
        ivi.generator_from_config(multi_head_config(), trunk_shapes=trunk)
    with pytest.raises(ValueError, match=r"trunk_shapes must be two matrix shapes"):
        ivi.generator_from_config(without, trunk_shapes=[[10, 10]])
    with pytest.raises(ValueError, match=r"trunk_shapes=\[\] \(no trunk\) needs a single head"):
        ivi.generator_from_config(without, trunk_shapes=[])


@pytest.mark.parametrize(
    "config,message",
    [
        ({"noise_input": [6, 6]}, "config must be the published layout, a list of four mappings"),
        (yaml.safe_load(MULTI_HEAD_YAML)[:3], "config must be the published layout"),
        ("- noise_input: [6, 6]", "config must be the published layout"),
        (
            multi_head_config(part0={"noise_input": None}),
            r"config\[0\] \(input shapes\)\['noise_input'\] must be a sequence",
        ),
        (
            multi_head_config(part0={"noise": [6, 6]}),
            r"config\[0\] \(input shapes\): unknown key 'noise'; the accepted keys are "
            r"noise_input, gen1, gen2, \.\.\.",
        ),
        (multi_head_config(part0={"gen01": [1, 1]}), r"unknown key 'gen01'"),
        (
            multi_head_config(part1={"second_layer": [[1, 1], [1, 1]]}),
            r"config\[1\] \(output shapes\): unknown key 'second_layer'; the accepted keys "
            r"are gen1",
        ),
        (
            multi_head_config(part3={"gen4": 1}),
            r"config\[3\] \(numbers of hidden layers\) has 'gen4' but config\[0\]",
        ),
        (
            multi_head_config(part2={"second_layer": [[10, 10], [12, 4]], "gen3": [5, 5, 1]}),
            r"config\[2\] \(hidden shapes\)\['gen3'\] must have 2 entries",
        ),
        (
            multi_head_config(part1={"gen2": [11, 2.5]}),
            r"config\[1\] \(output shapes\)\['gen2'\] must contain positive integers",
        ),
        (
            multi_head_config(part3={"gen2": -1}),
            r"config\[3\] \(numbers of hidden layers\)\['gen2'\] must be an integer >= 0",
        ),
        (
            multi_head_config(part2={"second_layer": [[10, 10]]}),
            r"config\[2\] \(hidden shapes\)\['second_layer'\] must be two matrix shapes",
        ),
        (
            multi_head_config(part0={"gen3": [4, 8]}),
            r"the heads' input shapes take 64 trunk outputs but the trunk's output \[12, 4\] "
            "has only 48",
        ),
    ],
)
def test_malformed_configs_name_the_key_and_the_accepted_form(config, message):
    with pytest.raises(ValueError, match=message):
        ivi.generator_from_config(config)


def test_config_missing_a_head_entry_names_the_mapping_and_the_head():
    config = multi_head_config()
    del config[1]["gen2"]
    with pytest.raises(ValueError, match=r"config\[1\] \(output shapes\) has no entry for"):
        ivi.generator_from_config(config)
    config = multi_head_config()
    config[0] = {"noise_input": [6, 6]}
    with pytest.raises(ValueError, match=r"config\[0\] \(input shapes\) names no head"):
        ivi.generator_from_config(config)


def test_auto_generator_covers_each_module_and_reports_sizes():
    model = MLP((400, 400, 10), nn.relu)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 784)))["params"]
    gen = ivi.auto_generator(params)
    # the 10-wide readout (narrower than the 16 columns of a head's input) is stored near-square
    assert gen.head_output_shapes == ((785, 400), (401, 400), (63, 64))
    assert gen.output_size == 478_410
    bnn = ivi.ImplicitBNN.from_linen(model, params, output_scale=None)
    report = bnn.report()
    assert report.stochastic_params == report.generator_output == 478_410
    assert report.generator_params == ivi.count_params(
        jax.eval_shape(gen.init, jax.random.key(0), jnp.zeros(gen.noise_shape))
    )
    text = str(report)
    assert "478,410" in text and "x D" in text and "785 x 400" in text


@pytest.mark.parametrize("size", [1_000_001, 7])
def test_sample_noise_is_standard_normal_and_each_row_depends_on_its_key_only(size):
    keys = jax.random.split(jax.random.key(3), 4)

    @jax.jit  # one compilation for the three draws
    def draw(keys):
        return (
            ivi._normal_rows(keys, size, jnp.float32),
            ivi._normal_rows(keys[2:3], size, jnp.float32),
            ivi._normal_rows(keys[:1], size + 1, jnp.float32),
        )

    draws, row_2, longer_0 = map(np.asarray, draw(keys))
    assert draws.shape == (4, size) and draws.dtype == np.float32
    # a row is a function of its own key (chunk_size and entropy_samples rely on it), and a
    # shorter vector is the start of a longer one
    np.testing.assert_array_equal(row_2[0], draws[2])
    np.testing.assert_array_equal(longer_0[0, :size], draws[0])
    if size < 1000:
        assert np.all(np.isfinite(draws)) and len(np.unique(draws)) == draws.size
        return
    x = draws.astype(np.float64)
    n = x.size
    assert abs(x.mean()) < 5 / math.sqrt(n)
    assert abs(x.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(np.mean(x**3)) < 5 * math.sqrt(15 / n)
    assert abs(np.mean(x**4) - 3) < 5 * math.sqrt(96 / n)
    tail = np.mean(np.abs(x) > 3)  # 0.0027 for a standard normal
    assert abs(tail - 0.0026998) < 5 * math.sqrt(0.0027 / n)
    sorted_draws = np.sort(x[0])
    cdf = np.asarray(jax.scipy.stats.norm.cdf(sorted_draws), np.float64)
    ks = math.sqrt(size) * np.max(np.abs(np.arange(1, size + 1) / size - cdf))
    assert ks < 1.95  # Kolmogorov-Smirnov at the 0.1% level
    # neighbours (the two outputs of one hash) and rows (keys) are uncorrelated
    assert abs(np.corrcoef(x[0, 0:-1:2], x[0, 1::2])[0, 1]) < 5 / math.sqrt(size / 2)
    assert abs(np.corrcoef(x[0], x[1])[0, 1]) < 5 / math.sqrt(size)


@pytest.mark.slow
def test_first_sampled_network_looks_like_a_normally_initialised_one():
    model = MLP((64, 64, 3))
    params = lecun_params(model, jnp.zeros((1, 5)))
    bnn = ivi.ImplicitBNN.from_linen(model, params, key=jax.random.key(1))
    vi_params = bnn.init(jax.random.key(1))
    samples = bnn.sample_params(vi_params, jax.random.key(2), 32)
    # (statistics in numpy: jnp.std would compile once per leaf shape)
    for path, sample, template in zip(
        bnn.layout.paths, jax.tree_util.tree_leaves(samples), jax.tree_util.tree_leaves(params)
    ):
        sample, std = np.asarray(sample, np.float64), float(np.std(np.asarray(template)))
        if path.endswith("kernel"):
            np.testing.assert_allclose(np.std(sample), std, rtol=0.2, err_msg=path)
            assert abs(np.mean(sample)) < 0.2 * std, path
        else:  # zero-initialised biases take their kernel's scale
            assert std == 0 and 0 < np.std(sample) < 1.5, path
    # Outputs of sampled networks have the scale of the template network's outputs.
    x = normal(3, 256, 5)
    template_out = np.std(np.asarray(model.apply({"params": params}, x)))
    sampled_out = np.std(
        np.asarray(bnn.sample_outputs(vi_params, jax.random.key(4), x, num_samples=16))
    )
    assert 0.3 * template_out < sampled_out < 3 * template_out


@pytest.mark.parametrize("kind", ["mm", "multi_head", "multi_head_cut", "mlp"])
def test_readout_gram_equals_the_generic_jacobian_product(kind):
    # Leaves of very different scales, output matrices whose rows the leaves cut, and outputs
    # beyond the D used ones (weight 0).
    net = MLP((7, 5, 3))
    params = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 4)))["params"]
    num_params = ivi.count_params(params)
    generator = {
        "mm": ivi.MMGenerator((3, 4), (6, 5), 1, (13, 9)),
        "multi_head": ivi.auto_generator(params),
        "multi_head_cut": ivi.generator_from_config(
            multi_head_config(part1={"gen1": [5, 9], "gen2": [4, 11], "gen3": [3, 7]})
        ),
        "mlp": ivi.MLPGenerator(6, num_params + 5, (16,)),
    }[kind]
    # A different scale per leaf, set directly rather than calibrated (no compilation).
    model = ivi.make_model(
        lambda p, x: net.apply({"params": p}, x), params, generator=generator, output_scale=None
    )
    offsets = model.layout.offsets
    scales = tuple(0.3 * 1.7**i for i in range(len(offsets) - 1))
    model = model._replace(output_scales=scales, output_shifts=(0.1,) * len(scales))
    segments = [(a, b, s**2) for a, b, s in zip(offsets[:-1], offsets[1:], scales)]
    gen_params = random_params(generator, jnp.zeros(generator.noise_shape))
    z = normal(2, 3, model.latent_dim)
    v = normal(3, *z.shape)

    def features(gen_params, z):
        noise = z.reshape(z.shape[0], *generator.noise_shape)
        return generator.apply({"params": gen_params}, noise, method="features")

    @jax.jit
    def both(gen_params, z, v):
        _, forward = jax.linearize(lambda u: ivi.generator_mean(model, gen_params, u), z)
        expected = jax.linear_transpose(forward, z)(forward(v))[0]
        _, features_forward = jax.linearize(lambda u: features(gen_params, u), z)
        gram = generator.readout_gram(gen_params, segments)
        got = jax.linear_transpose(features_forward, z)(gram(features_forward(v)))[0]
        return expected, got

    expected, got = both(gen_params, z, v)
    np.testing.assert_allclose(
        np.asarray(got),
        np.asarray(expected),
        rtol=1e-4,
        atol=1e-5 * float(jnp.max(jnp.abs(expected))),
    )


# ---------------------------------------------------------------------------------------------
# 3. Any model becomes Bayesian; ELBO; prediction
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_correlated_gaussian_target_is_recovered_where_mean_field_cannot():
    mean = jnp.array([1.0, -1.0, 0.5])
    std = jnp.array([1.0, 0.5, 2.0])
    corr = jnp.array([[1.0, 0.9, 0.81], [0.9, 1.0, 0.9], [0.81, 0.9, 1.0]])
    cov = corr * std[:, None] * std[None, :]
    precision = jnp.linalg.inv(cov)
    log_det_cov = jnp.linalg.slogdet(cov)[1]

    def log_target(theta, _):
        diff = theta - mean
        return -0.5 * diff @ precision @ diff - 0.5 * log_det_cov - 1.5 * math.log(2 * math.pi)

    class TargetDensity:
        """The "likelihood" of the "network" theta -> theta is the target density."""

        def init(self):
            return {}

        def log_prob(self, params, theta, targets):
            return log_target(theta, targets)

    # Implicit posterior: the "model" is its parameter vector, the "likelihood" the target.
    bnn = ivi.ImplicitBNN.create(
        lambda p, _: p["theta"],
        {"theta": jnp.zeros(3)},
        likelihood=TargetDensity(),
        generator=ivi.MLPGenerator(3, 3, (32, 32)),
        output_scale=None,
    )
    vi_params = bnn.init(jax.random.key(0))
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(vi_params)
    step = bnn.make_train_step(
        optimizer, num_data=1, num_samples=16, entropy="exact", prior_weight=0.0, entropy_weight=1.0
    )
    batch = (jnp.zeros(1), jnp.zeros(1))
    fresh = jnp.zeros((16, bnn.latent_dim))  # what step(..., eigvecs=None) passes
    vi_params, opt_state, _ = run_steps(step, vi_params, opt_state, step_keys(1500), batch, fresh)
    # KL(q || target) ~ 0 up to the linearised entropy's error (a few tenths of a nat here),
    # from 64 keys: one step's 16-sample estimate has a spread of about 0.5.
    options = dict(num_data=1, num_samples=16, entropy="exact")
    options.update(prior_weight=0.0, entropy_weight=1.0)
    keys = jax.random.split(jax.random.key(20_000), 64)
    losses = jax.jit(jax.vmap(lambda k: bnn.loss(vi_params, k, batch, **options)[0]))(keys)
    assert abs(float(jnp.mean(losses))) < 0.5, float(jnp.mean(losses))
    samples = np.asarray(bnn.sample_flat(vi_params, jax.random.key(10_000), 4000))
    np.testing.assert_allclose(samples.mean(0), np.asarray(mean), atol=0.15)
    np.testing.assert_allclose(samples.std(0), np.asarray(std), rtol=0.12)
    implicit_corr = np.corrcoef(samples.T)
    np.testing.assert_allclose(
        implicit_corr[np.triu_indices(3, 1)], np.asarray(corr)[np.triu_indices(3, 1)], atol=0.06
    )

    # Mean-field Gaussian VI on the same target, same objective and optimiser.
    def mean_field_loss(q, key):
        eps = jax.random.normal(key, (16, 3))
        theta = q["mean"] + jnp.exp(q["log_std"]) * eps
        return -(jnp.mean(jax.vmap(lambda t: log_target(t, None))(theta)) + jnp.sum(q["log_std"]))

    q = {"mean": jnp.zeros(3), "log_std": jnp.zeros(3)}
    mf_optimizer = optax.adam(1e-2)
    mf_state = mf_optimizer.init(q)

    @jax.jit  # the 3000 steps in one scan
    def mf_train(q, state, keys):
        def mf_step(carry, key):
            q, state = carry
            grads = jax.grad(mean_field_loss)(q, key)
            updates, state = mf_optimizer.update(grads, state)
            return (optax.apply_updates(q, updates), state), None

        return jax.lax.scan(mf_step, (q, state), keys)[0]

    q, mf_state = mf_train(q, mf_state, step_keys(3000))
    mf_samples = np.asarray(q["mean"] + jnp.exp(q["log_std"]) * normal(1, 4000, 3))
    np.testing.assert_allclose(
        mf_samples.mean(0), np.asarray(mean), atol=0.15
    )  # the mean is fine...
    mf_corr = np.corrcoef(mf_samples.T)[np.triu_indices(3, 1)]
    assert np.all(np.abs(mf_corr) < 0.1)  # ... but no correlation
    assert np.all(mf_samples.std(0) < 0.6 * np.asarray(std))  # and marginals far too narrow


@pytest.mark.slow
def test_regression_with_a_gap_is_more_uncertain_in_the_gap():
    rng = np.random.default_rng(0)
    num_data = 40
    x = np.concatenate([rng.uniform(-1, -0.4, num_data // 2), rng.uniform(0.4, 1, num_data // 2)])
    x = x[:, None].astype(np.float32)
    y = (np.sin(3 * x) + 0.1 * rng.normal(size=x.shape)).astype(np.float32)
    model = MLP((16, 16, 1))
    params = model.init(jax.random.key(0), x[:1])["params"]
    bnn = ivi.ImplicitBNN.from_linen(
        model, params, likelihood=ivi.Gaussian(noise_std=0.1), noise_shape=(6, 6), head_hidden=16
    )
    vi_params = bnn.init(jax.random.key(0))
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(vi_params)
    step = bnn.make_train_step(optimizer, num_data=num_data, num_samples=8, entropy="exact")
    # 400 steps: over seeds 0-3 the gap/data std ratio was 3.5-4.2 (asserted > 2) and the RMSE
    # 0.09-0.135 (asserted < 0.15); 300 steps or S = 4 missed the RMSE bound for some seeds.
    fresh = jnp.zeros((8, bnn.latent_dim))  # what step(..., eigvecs=None) passes
    vi_params, opt_state, aux = run_steps(step, vi_params, opt_state, step_keys(400), (x, y), fresh)
    assert np.isfinite(float(aux["loss"][-1]))
    grid = np.linspace(-1, 1, 41, dtype=np.float32)[:, None]
    mean, variance = bnn.predict_mean_var(
        vi_params,
        jax.random.key(1),
        np.concatenate([grid, x]),
        num_samples=200,
        include_noise=False,
    )  # one compilation for the grid and the data
    std = np.sqrt(np.asarray(variance[: len(grid)]).ravel())
    where = np.abs(grid.ravel())
    on_data, in_gap = (where >= 0.45) & (where <= 0.95), where <= 0.2
    assert std[in_gap].mean() > 2.0 * std[on_data].mean()
    fit = mean[len(grid) :]
    assert float(jnp.sqrt(jnp.mean((fit - y) ** 2))) < 0.15  # fits the data to the noise level


@pytest.mark.slow
def test_subset_stochastic_last_layer_trains_the_rest_as_point_estimates():
    model = MLP((8, 8, 3))
    params = lecun_params(model, jnp.zeros((1, 4)))
    by_predicate = ivi.ImplicitBNN.from_linen(
        model, params, stochastic=lambda path, _: path.startswith("Dense_2"), noise_shape=(3, 3)
    )
    mask = jax.tree_util.tree_map_with_path(lambda path, _: path[0].key == "Dense_2", params)
    by_mask = ivi.ImplicitBNN.from_linen(model, params, stochastic=mask, noise_shape=(3, 3))
    assert by_predicate.layout.stochastic == by_mask.layout.stochastic
    assert by_predicate.num_stochastic == 8 * 3 + 3
    assert by_predicate.report().network_params == ivi.count_params(params)

    bnn = by_predicate
    vi_params = bnn.init(jax.random.key(1))
    assert set(vi_params.deterministic) == {
        "Dense_0/bias",
        "Dense_0/kernel",
        "Dense_1/bias",
        "Dense_1/kernel",
    }
    x = normal(2, 32, 4)
    y = jnp.asarray(np.random.default_rng(3).integers(0, 3, 32))
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(vi_params)
    step = bnn.make_train_step(optimizer, num_data=32, num_samples=4, entropy="exact")
    start = vi_params
    # The first step's terms are those of the initial parameters.
    fresh = jnp.zeros((4, bnn.latent_dim))  # what step(..., eigvecs=None) passes
    vi_params, opt_state, aux = run_steps(step, vi_params, opt_state, step_keys(30), (x, y), fresh)
    likelihoods = aux["expected_log_likelihood"]
    assert float(likelihoods[-1]) > float(likelihoods[0])
    moved = jnp.max(
        jnp.abs(vi_params.deterministic["Dense_0/kernel"] - start.deterministic["Dense_0/kernel"])
    )
    assert float(moved) > 1e-3  # the deterministic layers are trained
    samples = bnn.sample_params(vi_params, jax.random.key(4), 3)
    assert (
        float(jnp.std(samples["Dense_2"]["kernel"], axis=0).mean()) > 1e-3
    )  # stochastic last layer
    np.testing.assert_array_equal(
        np.asarray(samples["Dense_0"]["kernel"][0]), np.asarray(samples["Dense_0"]["kernel"][2])
    )


@pytest.mark.slow
def test_nnx_model_and_other_float_dtypes():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(3, 8, rngs=rngs)
            self.out = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.hidden(x)))

    bnn = ivi.ImplicitBNN.from_nnx(Net(nnx.Rngs(0)), noise_shape=(3, 3))
    assert bnn.layout.paths == ("hidden/bias", "hidden/kernel", "out/bias", "out/kernel")
    assert bnn.num_stochastic == 3 * 8 + 8 + 8 * 2 + 2
    vi_params = bnn.init(jax.random.key(0))
    x = normal(1, 16, 3)
    y = jnp.asarray(np.random.default_rng(2).integers(0, 2, 16))
    optimizer = optax.sgd(1e-2)
    step = bnn.make_train_step(optimizer, num_data=16, num_samples=2)
    vi_params, _, aux = step(vi_params, optimizer.init(vi_params), jax.random.key(3), (x, y))
    assert np.isfinite(float(aux["loss"]))
    probs = bnn.predict_proba(vi_params, jax.random.key(4), x, num_samples=6, chunk_size=4)
    np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, rtol=1e-5)

    # bfloat16 model parameters: generated in float32, cast per leaf. (The classifier's network
    # and generator below: the generator's initialiser is compiled once for both.)
    model = MLP((4, 2))
    params = jax.tree_util.tree_map(
        lambda p: p.astype(jnp.bfloat16), lecun_params(model, jnp.zeros((1, 3)))
    )
    bnn16 = ivi.ImplicitBNN.from_linen(model, params, generator=ivi.MLPGenerator(4, 26, (8,)))
    vi16 = bnn16.init(jax.random.key(0))

    @jax.jit  # one compilation for the samples (what bnn16.sample_params jits) and the loss
    def sample_and_loss(vi16):
        batch = (x.astype(jnp.bfloat16), y)
        return (
            ivi.sample_params(bnn16.model, vi16, jax.random.key(1), 2),
            bnn16.loss(vi16, jax.random.key(2), batch, num_data=16, num_samples=2),
        )

    sample, (loss, _) = sample_and_loss(vi16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(sample))
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))


@pytest.fixture(scope="module")
def classifier():
    """A small classifier 3-4-2 (26 parameters), its Bayesian version and initial VIParams.

    An explicit MLPGenerator compiles faster than the automatic multi-head one, which other
    tests cover."""
    model = MLP((4, 2))
    params = lecun_params(model, jnp.zeros((1, 3)))
    bnn = ivi.ImplicitBNN.from_linen(
        model, params, generator=ivi.MLPGenerator(4, 26, (8,)), prior_std=0.5
    )
    return model, params, bnn, bnn.init(jax.random.key(1))


@pytest.mark.slow
def test_loss_weights_and_terms(classifier):
    _, _, bnn, vi_params = classifier
    batch = (normal(2, 8, 3), jnp.arange(8) % 2)
    key = jax.random.key(3)

    def loss_fn(vi_params, **kwargs):
        return bnn.loss(vi_params, key, batch, num_data=100, num_samples=5, **kwargs)

    @jax.jit  # one compilation for the three losses and the samples
    def losses(vi_params):
        value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
        theta = ivi.sample_flat(bnn.model, vi_params, key, 5)  # what bnn.sample_flat jits
        return (
            value_and_grad(vi_params),
            value_and_grad(vi_params, chunk_size=2),
            loss_fn(vi_params, prior_weight=8.5e-4 / 8, entropy_weight=1 / 8),
            (theta, ivi.gaussian_log_prior(theta, 0.5)),
        )

    ((loss, aux), grads), ((chunked, _), chunked_grads), (paper, aux_p), (theta, log_prior) = (
        losses(vi_params)
    )
    # Default weights w_p = w_H = 1 / N: the loss is minus the ELBO per data point.
    expected = -(aux["expected_log_likelihood"] + (aux["log_prior"] + aux["entropy"]) / 100)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
    np.testing.assert_allclose(float(aux["elbo"]), -float(loss), rtol=1e-6)
    # Chunking the samples (lax.map, here with a remainder chunk) changes memory use, neither
    # the value nor the gradients: every sample has its own key, solver start included.
    np.testing.assert_allclose(float(chunked), float(loss), rtol=1e-5)
    for g_all, g_chunked in zip(
        jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(chunked_grads)
    ):
        np.testing.assert_allclose(np.asarray(g_chunked), np.asarray(g_all), rtol=1e-4, atol=1e-6)
    # The paper's down-weighting, w_p = 8.5e-4 / B and w_H = 1 / B, of the same terms.
    for name in ("expected_log_likelihood", "log_prior", "entropy"):
        np.testing.assert_allclose(float(aux_p[name]), float(aux[name]), rtol=1e-6)
    expected = -(
        aux_p["expected_log_likelihood"] + 8.5e-4 / 8 * aux_p["log_prior"] + aux_p["entropy"] / 8
    )
    np.testing.assert_allclose(float(paper), float(expected), rtol=1e-6)
    # The log prior is that of N(0, 0.5^2 I) on the sampled parameters, which are those of
    # sample_flat with the same key.
    np.testing.assert_allclose(
        np.asarray(log_prior),
        -0.5 * np.sum(np.asarray(theta) ** 2, -1) / 0.25
        - 0.5 * theta.shape[-1] * math.log(2 * math.pi * 0.25),
        rtol=1e-5,
    )
    np.testing.assert_allclose(float(aux["log_prior"]), float(jnp.mean(log_prior)), rtol=1e-5)


@pytest.mark.slow
def test_learned_gaussian_noise_and_prediction_memory_bound():
    model = MLP((8, 1))
    params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
    bnn = ivi.ImplicitBNN.from_linen(
        model,
        params,
        likelihood=ivi.Gaussian(noise_std=1.0, learn_noise=True),
        # D = 25; the classifier's generator (26 outputs, the last unused): compiled once
        generator=ivi.MLPGenerator(4, 26, (8,)),
    )
    vi_params = bnn.init(jax.random.key(0))
    assert set(vi_params.likelihood) == {"log_noise_std"}
    # Gaussian.init gives a weakly typed scalar, which the first two updates make strong:
    # the step would compile three times. Starting strong, it compiles once.
    vi_params = vi_params._replace(
        likelihood=jax.tree_util.tree_map(lambda a: jnp.asarray(a, a.dtype), vi_params.likelihood)
    )
    x = jnp.linspace(-1, 1, 32)[:, None]
    y = 0.5 * x[:, 0]
    optimizer = optax.adam(3e-2)
    opt_state = optimizer.init(vi_params)
    step = bnn.make_train_step(optimizer, num_data=32, num_samples=4, entropy="exact")
    # After 40 steps log(noise_std) was -1.17 to -1.21 over seeds 0-3 (asserted < -0.5).
    fresh = jnp.zeros((4, bnn.latent_dim))  # what step(..., eigvecs=None) passes
    vi_params, opt_state, _ = run_steps(step, vi_params, opt_state, step_keys(40), (x, y), fresh)
    assert float(vi_params.likelihood["log_noise_std"]) < -0.5  # learned: the data are noiseless
    # K-sample averages: chunking does not change the draws, keys do; include_noise adds the
    # (here learned) noise variance to the epistemic one.
    key = jax.random.key(5)
    full = bnn.predict_mean_var(vi_params, key, x, num_samples=13, chunk_size=13)
    # Compiled ahead of time: the program runs below and its memory is measured at the end.
    chunked_program = bnn.predict_mean_var.lower(
        vi_params, key, x, num_samples=13, chunk_size=4, include_noise=False
    ).compile()
    chunked = chunked_program(vi_params, key, x)
    noise_variance = math.exp(2 * float(vi_params.likelihood["log_noise_std"]))
    np.testing.assert_allclose(np.asarray(full[0]), np.asarray(chunked[0]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(full[1]), np.asarray(chunked[1]) + noise_variance, rtol=1e-4, atol=1e-6
    )
    assert float(ivi.Gaussian(noise_std=0.1).noise_variance({})) == pytest.approx(0.01)
    outputs = bnn.sample_outputs(vi_params, key, x, num_samples=13)
    np.testing.assert_allclose(
        np.asarray(full[0]), np.asarray(outputs.mean(0)), rtol=1e-4, atol=1e-6
    )
    other = bnn.predict_mean_var(vi_params, jax.random.key(6), x, num_samples=13, chunk_size=13)
    assert not np.allclose(np.asarray(other[0]), np.asarray(full[0]))  # fresh samples per key
    # Memory is bounded by chunk_size, not K: the compiled program's temporaries do not grow.
    many = bnn.predict_mean_var.lower(
        vi_params, key, x, num_samples=1024, chunk_size=4, include_noise=False
    ).compile()
    sizes = [program.memory_analysis().temp_size_in_bytes for program in (chunked_program, many)]
    assert sizes[1] <= sizes[0] + 64 * 1024


def test_errors_name_the_argument(classifier):
    model, params, bnn, vi_params = classifier
    with pytest.raises(
        ValueError,
        match=r"generator output has 20 entries but the model has 26 stochastic parameters",
    ):
        ivi.ImplicitBNN.from_linen(
            model, params, generator=ivi.MMGenerator((2, 2), (3, 3), 0, (4, 5))
        )
    with pytest.raises(ValueError, match="sigma must be a finite number > 0, got 0"):
        ivi.ImplicitBNN.from_linen(model, params, sigma=0.0)
    with pytest.raises(ValueError, match="prior_std must be a finite number > 0, got -1"):
        ivi.ImplicitBNN.from_linen(model, params, prior_std=-1.0)
    with pytest.raises(ValueError, match="noise_std must be a finite number > 0"):
        ivi.Gaussian(noise_std=0.0)
    with pytest.raises(ValueError, match="stochastic selects no parameter"):
        ivi.ImplicitBNN.from_linen(model, params, stochastic=lambda path, _: False)
    with pytest.raises(ValueError, match="output_scale must be"):
        ivi.ImplicitBNN.from_linen(model, params, output_scale="big")
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        ivi.linearised_entropy(
            linear_mean_fn, (jnp.eye(2), jnp.zeros(2)), jnp.zeros((1, 2)), -1.0, method="exact"
        )

    batch = (jnp.zeros((4, 3)), jnp.zeros(4, int))
    key = jax.random.key(1)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got 0"):
        bnn.loss(vi_params, key, batch, num_data=4, num_samples=0)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got 0"):
        bnn.make_train_step(optax.adam(1e-3), num_data=4, num_samples=0)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got 0"):
        bnn.predict_proba(vi_params, key, batch[0], num_samples=0)
    with pytest.raises(
        ValueError, match="entropy must be one of 'exact', 'smallest_sv' or None, got 'svd'"
    ):
        bnn.loss(vi_params, key, batch, num_data=4, entropy="svd")
    with pytest.raises(ValueError, match="entropy must be one of 'exact', 'smallest_sv'"):
        bnn.make_train_step(optax.adam(1e-3), num_data=4, entropy="Exact")
    with pytest.raises(
        ValueError, match="entropy must be one of 'exact', 'smallest_sv', got 'svd'"
    ):
        ivi.linearised_entropy(
            linear_mean_fn, (jnp.eye(2), jnp.zeros(2)), jnp.zeros((1, 2)), 0.1, method="svd"
        )
    with pytest.raises(ValueError, match="num_iterations must be an integer >= 1, got 0"):
        bnn.loss(vi_params, key, batch, num_data=4, num_iterations=0)
    with pytest.raises(ValueError, match="num_data must be an integer >= 1"):
        bnn.loss(vi_params, key, batch, num_data=0)
    with pytest.raises(ValueError, match="num_data"):
        bnn.make_train_step(optax.adam(1e-3))
    with pytest.raises(ValueError, match="prior_weight must be a finite number >= 0"):
        bnn.loss(vi_params, key, batch, num_data=4, prior_weight=-1.0)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        bnn.loss(vi_params, key, batch, num_data=4, chunk_size=0)
    with pytest.raises(ValueError, match="include_noise=True needs a Gaussian likelihood"):
        bnn.predict_mean_var(vi_params, key, batch[0])
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        ivi.linearised_entropy(
            linear_mean_fn, (jnp.eye(2), jnp.zeros(2)), jnp.zeros((1, 2)), 0.1, method="smallest_sv"
        )
    with pytest.raises(ValueError, match="one key per row of z"):
        ivi.linearised_entropy(
            linear_mean_fn,
            (jnp.eye(2), jnp.zeros(2)),
            jnp.zeros((3, 2)),
            0.1,
            key=jax.random.key(0),
        )
    with pytest.raises(ValueError, match="likelihood must have init"):
        ivi.ImplicitBNN.from_linen(model, params, likelihood=lambda outputs, targets: outputs)
    with pytest.raises(ValueError, match="z must have shape"):
        ivi.exact_log_det(linear_mean_fn, (jnp.eye(2), jnp.zeros(2)), jnp.zeros((1, 1, 2)), 0.1)
    with pytest.raises(ValueError, match="targets of shape"):
        ivi.Gaussian().log_prob({}, jnp.zeros((4, 2)), jnp.zeros((4, 3)))


# ---------------------------------------------------------------------------------------------
# Warm-started eigen-solver with a residual tolerance (the bound at the defaults)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tolerance_stops_at_the_first_qualifying_iteration_and_reports_the_true_residual():
    latent_dim, sigma, tolerance = 10, 0.05, 1e-3
    params = random_tanh_params(21, latent_dim, 24, 40)
    z = normal(22, 2, latent_dim)
    keys = jax.random.split(jax.random.key(23), 2)

    def solve(k, tol):
        return ivi.smallest_singular_value(
            tanh_mean_fn, params, z, keys, k, tolerance=tol, shift=sigma**2
        )

    @jax.jit  # one compilation for the solve with the tolerance and the Jacobians
    def with_tolerance():
        s2, pair, _ = solve(latent_dim, tolerance)
        return s2, pair, jax.vmap(jax.jacfwd(lambda u: tanh_mean_fn(params, u)))(z)

    s2, pair, jac = with_tolerance()
    jac = np.asarray(jac, np.float64)
    used = [int(n) for n in pair.iterations]
    counts = sorted(k for k in {n - 1 for n in used} | set(used) if k >= 1)
    # the fixed-iteration solves that the checks need, all in one second compilation
    fixed = dict(zip(counts, jax.jit(lambda: [solve(k, None)[1] for k in counts])()))
    for i in range(z.shape[0]):
        a = jac[i].T @ jac[i]
        v, rho = np.asarray(pair.vector[i], np.float64), float(pair.value[i])
        # The relative residual, up to the rounding allowance eps sqrt(n) ||A|| of float32.
        floor = np.finfo(np.float32).eps * math.sqrt(latent_dim) * np.linalg.norm(a, 2)
        true_residual = np.linalg.norm(a @ v - rho * v) / (rho + sigma**2)
        np.testing.assert_allclose(
            float(pair.residual[i]), true_residual, rtol=0.05, atol=10 * floor / rho
        )
        assert float(pair.residual[i]) <= tolerance and 1 <= used[i] < latent_dim
        # One iteration fewer does not reach the tolerance; the same number gives the same pair.
        if used[i] > 1:
            assert float(fixed[used[i] - 1].residual[i]) > tolerance
        np.testing.assert_allclose(float(fixed[used[i]].value[i]), rho, rtol=1e-5)
        s_min = np.linalg.svd(jac[i], compute_uv=False)[-1]
        np.testing.assert_allclose(float(s2[i]), s_min**2, rtol=2e-3)


@pytest.mark.slow
def test_warm_start_reaches_the_many_cold_iterations_value_with_fewer_iterations():
    latent_dim, sigma = 20, 0.05
    w1, b1, w2, b2 = random_tanh_params(31, latent_dim, 40, 80)
    params = (0.3 * w1, b1, w2, b2)  # nearly linear: J changes little from one z to the next
    keys = jax.random.split(jax.random.key(32), 2)
    z_before, z_after = normal(33, 2, 2, latent_dim)

    @jax.jit
    def run():
        def solve(z, k, tol, x0=None):
            return ivi.smallest_singular_value(
                tanh_mean_fn, params, z, keys, k, x0=x0, tolerance=tol, shift=sigma**2
            )

        reference = solve(z_after, latent_dim + 2, None)[0]  # the whole space: exact
        cold = solve(z_after, 40, 1e-3)
        previous = solve(z_before, 40, 1e-3)[1].vector
        warm = solve(z_after, 40, 1e-3, previous)
        # started from the answer, without a key (in the same compilation)
        again = ivi.smallest_singular_value(
            tanh_mean_fn,
            params,
            z_after,
            None,
            40,
            x0=warm[1].vector,
            tolerance=1e-3,
            shift=sigma**2,
        )[1]
        return reference, cold, warm, again

    reference, (cold_s2, cold, _), (warm_s2, warm, _), again = run()
    np.testing.assert_allclose(np.asarray(warm_s2), np.asarray(reference), rtol=1e-3)
    np.testing.assert_allclose(np.asarray(cold_s2), np.asarray(reference), rtol=1e-3)
    assert np.all(np.asarray(warm.iterations) < np.asarray(cold.iterations))
    # Starting from the answer: no iteration needed, one operator application.
    assert np.all(np.asarray(again.iterations) == 0)


@pytest.fixture(scope="module")
def small_linear_bnn():
    """Dense 3 -> 2 with a linear generator (latent 4): J is the same at every z."""
    net = nn.Dense(2, use_bias=False)
    params = net.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
    bnn = ivi.ImplicitBNN.from_linen(net, params, generator=ivi.MLPGenerator(4, 6, ()))
    batch = (
        jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32),
        jnp.zeros(8, int),
    )
    return bnn, bnn.init(jax.random.key(1)), batch


def test_aux_has_one_structure_for_every_entropy_option(small_linear_bnn):
    bnn, vi_params, batch = small_linear_bnn
    key = jax.random.key(2)
    structures = set()
    for options in (
        dict(entropy="smallest_sv"),
        dict(entropy="smallest_sv", tolerance=None, num_iterations=5),
        dict(entropy="smallest_sv", eigvecs=jnp.ones((3, 4))),
        dict(entropy="exact"),
        dict(entropy=None),
        dict(entropy="smallest_sv", chunk_size=2),
    ):
        aux = jax.eval_shape(
            lambda p, options=options: bnn.loss(
                p, key, batch, num_data=8, num_samples=3, **options
            )[1],
            vi_params,
        )
        structures.add(str(jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), aux)))
    assert len(structures) == 1, structures


@pytest.mark.slow
def test_fewer_entropy_samples_keep_the_likelihood_and_the_linear_entropy(small_linear_bnn):
    bnn, vi_params, batch = small_linear_bnn

    @jax.jit
    def losses(key):
        def aux(**options):
            return bnn.loss(vi_params, key, batch, num_data=8, num_samples=4, **options)[1]

        return (
            aux(entropy="exact"),
            aux(entropy="exact", entropy_samples=1),
            aux(entropy="exact", entropy_samples=3, chunk_size=2),
        )

    full, one, chunked = losses(jax.random.key(3))
    assert one["eigvecs"].shape == (1, 4) and chunked["eigvecs"].shape == (3, 4)
    for aux in (one, chunked):  # same draws; J does not depend on z: the same entropy
        for name in ("expected_log_likelihood", "log_prior", "entropy"):
            np.testing.assert_allclose(float(aux[name]), float(full[name]), rtol=1e-5)


@pytest.mark.slow
def test_train_step_carries_the_eigenvectors(small_linear_bnn):
    bnn, vi_params, batch = small_linear_bnn
    optimizer = optax.sgd(1e-6)  # J barely moves: the warm start is already converged
    step = bnn.make_train_step(
        optimizer, num_data=8, num_samples=2, entropy_samples=1, tolerance=1e-3, num_iterations=3
    )
    opt_state, eigvecs, used = optimizer.init(vi_params), None, []
    for key in jax.random.split(jax.random.key(4), 3):
        vi_params, opt_state, aux = step(vi_params, opt_state, key, batch, eigvecs)
        eigvecs = aux["eigvecs"]
        used.append(int(aux["solver_iterations"]))
        assert float(aux["solver_residual"]) <= 1e-3
    assert eigvecs.shape == (1, 4) and used[0] >= 1 and used[1:] == [0, 0]
    step_exact = bnn.make_train_step(optimizer, num_data=8, num_samples=2, entropy="exact")
    aux = step_exact(vi_params, opt_state, jax.random.key(5), batch)[2]
    assert float(aux["solver_residual"]) == 0 and int(aux["solver_iterations"]) == 0


def test_solver_options_are_checked(small_linear_bnn):
    bnn, vi_params, batch = small_linear_bnn
    key = jax.random.key(6)
    for bad in (0, 1.5, -1e-3, "tight", float("nan")):
        with pytest.raises(ValueError, match=r"tolerance must be None or a number in \(0, 1\)"):
            bnn.loss(vi_params, key, batch, num_data=8, tolerance=bad)
    with pytest.raises(ValueError, match="num_iterations must be an integer >= 1, got 0"):
        bnn.make_train_step(optax.adam(1e-3), num_data=8, num_iterations=0)
    with pytest.raises(ValueError, match=r"entropy_samples must be None or an integer in \[1, "):
        bnn.loss(vi_params, key, batch, num_data=8, num_samples=2, entropy_samples=3)
    with pytest.raises(ValueError, match="entropy_samples must be an integer >= 1, got 0"):
        bnn.loss(vi_params, key, batch, num_data=8, entropy_samples=0)
    with pytest.raises(ValueError, match=r"eigvecs must have shape .* = \(2, 4\)"):
        bnn.loss(vi_params, key, batch, num_data=8, num_samples=2, eigvecs=jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="pass eigvecs to the train step"):
        bnn.make_train_step(optax.adam(1e-3), num_data=8, eigvecs=jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="tolerance must be a finite number > 0"):
        ivi.smallest_eigenpair(lambda u: u, jnp.ones((1, 3)), 2, tolerance=0.0)
    with pytest.raises(ValueError, match=r"x0 .* must have shape \(1, 2\)"):
        ivi.smallest_singular_value(
            linear_mean_fn, (jnp.eye(2), jnp.zeros(2)), jnp.zeros((1, 2)), None, x0=jnp.ones((2, 2))
        )


# ---------------------------------------------------------------------------------------------
# Defaults that keep the posterior spread (docs/implicit_vi.md, "Choosing the posterior's
# spread")
# ---------------------------------------------------------------------------------------------


def mm_initial_params(generator, seed=0):
    """A draw from the MM generators' initialisation (MMLayer: W_l ~ N(0, 1/a), W_r ~ N(0, 1/b),
    zero biases; test_mm_layer_initialisation_has_fan_in_variance_and_zero_biases checks the
    initialiser against it), made with numpy: compiling the initialiser costs more than the
    rest of a Jacobian test."""
    shapes = jax.eval_shape(generator.init, jax.random.key(0), jnp.zeros(generator.noise_shape))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = path[-1].key
        if name in ("left_bias", "right_bias"):
            return jnp.zeros(s.shape, s.dtype)
        fan_in = {"left_kernel": s.shape[-1], "right_kernel": s.shape[-2]}[name]
        return jnp.asarray(rng.normal(size=s.shape) / math.sqrt(fan_in), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _generator_jacobian_singular_values(layout, seed=0, **kwargs):
    """Singular values of d g(z) / d z for the automatic generator of ``layout`` at initial
    parameters (the per-leaf output scale of make_model multiplies rows by non-zero constants:
    the rank is the same)."""
    generator = ivi.auto_generator(layout, **kwargs)
    variables = mm_initial_params(generator, seed + 1)
    jac = jax.jit(jax.jacfwd(lambda z: generator.apply(variables, z)))(
        normal(seed, *generator.noise_shape)
    )
    return np.linalg.svd(np.asarray(jac.reshape(jac.shape[0], -1), np.float64), compute_uv=False)


@pytest.mark.parametrize(
    "widths,num_inputs,last_layer_only",
    [((24, 4), 20, False), ((24, 10), 20, True), ((8, 3), 5, False)],
)
@pytest.mark.slow
def test_auto_generator_jacobian_has_full_rank(widths, num_inputs, last_layer_only):
    # The d latent directions must all reach theta: a zero singular value of dg/dz puts the
    # "smallest_sv" bound at its floor d/2 log(sigma^2), with no gradient for the spread.
    model = MLP(widths, nn.relu)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, num_inputs)))["params"]
    last = f"Dense_{len(widths) - 1}"
    stochastic = (lambda path, _: path.startswith(last)) if last_layer_only else None
    layout = ivi.ParameterLayout.from_params(params, stochastic)
    singular_values = _generator_jacobian_singular_values(layout)
    assert singular_values.min() > 1e-4 * singular_values.max()
    if widths == (24, 4):
        # The former default, 8 x 8 head inputs, passes d = 144 latent directions through the
        # 2 x 64 features of the two heads' inputs: at least 16 singular values are zero.
        assert singular_values.size == 144
        narrow = _generator_jacobian_singular_values(layout, head_input_shape=(8, 8))
        assert np.sum(narrow < 1e-6 * narrow.max()) >= 144 - 128


@pytest.mark.slow
def test_trained_posterior_is_more_uncertain_off_the_data():
    # Three classes of 2-D points near the origin; far from them nothing constrains the
    # network, so the sampled networks should disagree (mutual information of the BMA).
    rng = np.random.default_rng(0)
    centres = np.array([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]])
    labels = np.repeat(np.arange(3), 40)
    x = (centres[labels] + 0.3 * rng.normal(size=(120, 2))).astype(np.float32)
    angles = np.linspace(0, 2 * np.pi, 60, endpoint=False)
    far = (6.0 * np.stack([np.cos(angles), np.sin(angles)], 1)).astype(np.float32)
    model = MLP((16, 16, 3), nn.relu)
    params = model.init(jax.random.key(0), x[:1])["params"]
    bnn = ivi.ImplicitBNN.from_linen(model, params)
    vi_params = bnn.init(jax.random.key(1))
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(vi_params)
    step = bnn.make_train_step(optimizer, num_data=len(x), num_samples=4)
    batch, fresh = (jnp.asarray(x), jnp.asarray(labels)), jnp.zeros((4, bnn.latent_dim))
    keys = jax.random.split(jax.random.key(2), 200)
    # each step's eigenvectors warm-start the next step's solver
    vi_params, opt_state, _ = run_steps(
        step, vi_params, opt_state, keys, batch, fresh, carry_eigvecs=True
    )

    # 64 sampled networks on the data and the far points together: one compilation.
    logits = bnn.sample_outputs(vi_params, jax.random.key(3), jnp.concatenate([x, far]), 64)
    probs = np.asarray(jax.nn.softmax(logits), np.float64)

    def entropy(p):
        return -np.sum(p * np.log(p + 1e-12), axis=-1)

    # mutual information of the Bayesian model average, per input
    information = entropy(probs.mean(0)) - entropy(probs).mean(0)
    on_data, off_data = float(information[: len(x)].mean()), float(information[len(x) :].mean())
    accuracy = np.mean(probs[:, : len(x)].mean(0).argmax(-1) == labels)  # of the average
    assert accuracy > 0.9
    assert off_data > 3 * on_data and off_data > 0.05, (on_data, off_data)


def test_shared_linearisation_gives_the_generic_values_and_gradients():
    # The readout path (one linearisation of the features, g and J v from one readout pass)
    # against the generic path (the whole generator linearised), the solver run to the end.
    net = MLP((7, 5, 3))
    params = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 4)))["params"]
    generator = ivi.MMGenerator((3, 4), (6, 5), 1, (13, 9))
    model = ivi.make_model(
        lambda p, x: net.apply({"params": p}, x), params, generator=generator, output_scale=None
    )
    model = model._replace(output_scales=(0.5, 2.0, 0.7, 1.3, 0.9, 1.1), output_shifts=(0.1,) * 6)
    gen_params = random_params(generator, jnp.zeros(generator.noise_shape), scale=0.5)
    z = normal(2, 2, model.latent_dim)
    keys = jax.random.split(jax.random.key(3), 2)
    readout = normal(4, model.layout.num_stochastic)
    mean_fn = functools.partial(ivi.generator_mean, model)
    factorisation = ivi._readout_factorisation(model)
    assert len(factorisation) == 3  # MM generators have a readout

    @jax.jit
    def value_and_grad(p):
        def objective(p, factorisation):
            s2, _, mean = ivi.smallest_singular_value(
                mean_fn, p, z, keys, model.latent_dim + 1, gram_factorisation=factorisation
            )
            return jnp.sum(jnp.log(s2 + 1e-2)) + jnp.sum(mean @ readout)

        return [jax.value_and_grad(objective)(p, f) for f in (factorisation, None)]

    (shared, shared_grad), (generic, generic_grad) = value_and_grad(gen_params)
    np.testing.assert_allclose(float(shared), float(generic), rtol=1e-4)
    for a, b in zip(
        jax.tree_util.tree_leaves(shared_grad), jax.tree_util.tree_leaves(generic_grad)
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Learned output noise: theta = g(z) + s * eps with one learned std per parameter
# ---------------------------------------------------------------------------------------------


def _learned_noise_bnn(log_std_seed=0):
    """Dense 3 -> 2 (D = 6) with a linear generator (d = 4) and per-weight noise s: theta is
    exactly N(g(0), J J^T + S^2)."""
    net = nn.Dense(2, use_bias=False)
    params = net.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
    bnn = ivi.ImplicitBNN.from_linen(
        net, params, generator=ivi.MLPGenerator(4, 6, ()), learn_sigma=True, sigma=0.05
    )
    vi_params = bnn.init(jax.random.key(1))
    rng = np.random.default_rng(log_std_seed)
    log_std = jnp.asarray(
        math.log(0.05) + 0.7 * rng.normal(size=6), vi_params.generator["out"]["bias"].dtype
    )
    return bnn, vi_params._replace(output_noise={"log_std": log_std})


@pytest.mark.slow
def test_learned_output_noise_matches_the_gaussian_closed_form():
    with jax.enable_x64(True):
        bnn, vi_params = _learned_noise_bnn()
        vi_params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), vi_params)
        model, log_std = bnn.model, vi_params.output_noise["log_std"]
        batch = (jnp.ones((8, 3)), jnp.zeros(8, int))

        @jax.jit  # one float64 compilation for every quantity checked below
        def quantities(vi_params):
            def entropy(vi_params, **options):
                aux = bnn.loss(
                    vi_params, jax.random.key(2), batch, num_data=8, num_samples=3, **options
                )[1]
                return aux["entropy"]

            zeros = jnp.zeros((1, 4))
            jac = jax.jacfwd(lambda z: ivi.generator_mean(model, vi_params.generator, z[None])[0])(
                zeros[0]
            )
            exact, grads = jax.value_and_grad(functools.partial(entropy, entropy="exact"))(
                vi_params
            )
            bound = entropy(vi_params, entropy="smallest_sv", tolerance=None, num_iterations=4)
            theta = ivi.sample_flat(model, vi_params, jax.random.key(3), 40_000)
            return (
                jac,
                exact,
                bound,
                grads,
                theta,
                ivi.generator_mean(model, vi_params.generator, zeros)[0],
            )

        jac, exact, value, grads, theta, mean = jax.tree_util.tree_map(
            np.asarray, quantities(vi_params)
        )
        assert exact.dtype == theta.dtype == np.float64
        noise_var = np.exp(2 * np.asarray(log_std))
        cov = jac @ jac.T + np.diag(noise_var)
        np.testing.assert_allclose(float(exact), gaussian_entropy(cov), rtol=1e-10)
        # The bound: d/2 log(1 + lambda_min(J^T S^-2 J)) in place of the whitened log-det.
        whitened = jac / np.sqrt(noise_var)[:, None]
        smallest = np.linalg.eigvalsh(whitened.T @ whitened)[0]
        bound = (
            3 * math.log(2 * math.pi * math.e)
            + np.sum(np.asarray(log_std))
            + 2 * math.log1p(smallest)
        )
        np.testing.assert_allclose(float(value), bound, rtol=1e-8)
        assert float(value) <= gaussian_entropy(cov)
        # d H / d log s_i = s_i^2 (Sigma^-1)_ii for H = 1/2 log det(J J^T + S^2) + const.
        expected = noise_var * np.diag(np.linalg.inv(cov))
        np.testing.assert_allclose(grads.output_noise["log_std"], expected, rtol=1e-8)
        # The samples have the mean g(0) and the covariance J J^T + S^2.
        scale = np.sqrt(np.diag(cov))
        np.testing.assert_allclose(theta.mean(0), mean, atol=0.03 * scale.max())
        np.testing.assert_allclose(
            np.cov(theta.T) / np.outer(scale, scale), cov / np.outer(scale, scale), atol=0.03
        )


@pytest.mark.slow
def test_learned_output_noise_trains_and_keeps_a_fixed_structure():
    bnn, vi_params = _learned_noise_bnn()
    fixed = ivi.ImplicitBNN.from_linen(
        nn.Dense(2, use_bias=False),
        {"kernel": jnp.ones((3, 2))},
        generator=ivi.MLPGenerator(4, 6, ()),
    )
    assert fixed.init(jax.random.key(0)).output_noise == {}
    start = bnn.init(jax.random.key(1)).output_noise["log_std"]
    np.testing.assert_allclose(np.asarray(start), math.log(0.05), rtol=1e-6)
    assert start.shape == (bnn.layout.num_stochastic,)
    optimizer = optax.adam(1e-2)
    step = bnn.make_train_step(optimizer, num_data=8, num_samples=3, chunk_size=2)
    batch = (jnp.ones((8, 3)), jnp.zeros(8, int))
    opt_state, eigvecs = optimizer.init(vi_params), None
    for key in jax.random.split(jax.random.key(4), 3):
        new, opt_state, aux = step(vi_params, opt_state, key, batch, eigvecs)
        assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(vi_params)
        assert np.isfinite(float(aux["loss"]))
        vi_params, eigvecs = new, aux["eigvecs"]
    assert not np.allclose(np.asarray(vi_params.output_noise["log_std"]), np.asarray(start))


def test_learn_sigma_must_be_a_bool():
    with pytest.raises(ValueError, match="learn_sigma must be True or False"):
        ivi.make_model(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))}, learn_sigma="yes")


# ---------------------------------------------------------------------------------------------
# Calibrated posteriors: prior_std="auto" (per leaf) and sigma="auto" (relative learned noise)
# ---------------------------------------------------------------------------------------------


def _two_layer_params():
    """Known leaf stds: kernels of std 0.5 and 0.1 (exactly, after standardising), zero
    biases, so that "auto" must give each bias its own layer's kernel std."""
    rng = np.random.default_rng(0)

    def kernel(shape, std):
        w = rng.normal(size=shape)
        return jnp.asarray(std * (w - w.mean()) / w.std(), jnp.float32)

    return {
        "Dense_0": {"bias": jnp.zeros(4), "kernel": kernel((3, 4), 0.5)},
        "Dense_1": {"bias": jnp.zeros(2), "kernel": kernel((4, 2), 0.1)},
    }


def _apply_two_layer(p, x):
    h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def test_auto_prior_and_noise_follow_each_layers_initial_std():
    params = _two_layer_params()
    model = ivi.make_model(
        _apply_two_layer,
        params,
        generator=ivi.MLPGenerator(4, 26, (8,)),  # the classifier's: compiled once
        learn_sigma=True,
        sigma="auto",
        prior_std="auto",
    )
    # leaves in flattening order: Dense_0/bias, Dense_0/kernel, Dense_1/bias, Dense_1/kernel
    np.testing.assert_allclose(model.prior_std, [0.5, 0.5, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(model.sigma, [0.05, 0.05, 0.01, 0.01], rtol=1e-6)
    vi_params = ivi.init_vi_params(model, jax.random.key(1))
    sizes = [4, 12, 2, 8]
    expected = np.repeat(np.log(np.array(model.sigma)), sizes)
    np.testing.assert_allclose(np.asarray(vi_params.output_noise["log_std"]), expected, rtol=1e-6)
    # The ELBO's log prior is the sum of the per-leaf Gaussian log densities of the very
    # samples sample_flat draws with the same key.
    key, batch = jax.random.key(2), (jnp.ones((5, 3)), jnp.zeros(5, int))
    aux, theta = jax.jit(  # one compilation for the loss and the samples
        lambda vi_params: (
            ivi.elbo_loss(model, vi_params, key, batch, num_data=5, num_samples=3, entropy=None)[1],
            ivi.sample_flat(model, vi_params, key, 3),
        )
    )(vi_params)
    theta = np.asarray(theta, np.float64)
    stds = np.repeat(np.array(model.prior_std), sizes)
    log_density = -0.5 * (theta / stds) ** 2 - np.log(stds) - 0.5 * math.log(2 * math.pi)
    np.testing.assert_allclose(float(aux["log_prior"]), log_density.sum(1).mean(), rtol=1e-5)
    # A float prior_std is unchanged: one std for every parameter.
    flat = ivi.make_model(_apply_two_layer, params, generator=ivi.MLPGenerator(4, 26, (8,)))
    assert flat.prior_std == 1.0 and flat.sigma == 1e-3


def test_auto_prior_gradient_is_the_per_leaf_weight_decay():
    """d log p / d theta_i = -theta_i / prior_i^2 with each leaf's own prior."""
    params = _two_layer_params()
    model = ivi.make_model(
        _apply_two_layer, params, generator=ivi.MLPGenerator(4, 26, (8,)), prior_std="auto"
    )
    theta = jnp.asarray(np.random.default_rng(1).normal(size=(2, 26)), jnp.float32)
    grad = jax.jit(jax.grad(lambda t: jnp.sum(ivi._log_prior(model, t))))(theta)
    stds = np.repeat(np.array(model.prior_std), [4, 12, 2, 8])
    np.testing.assert_allclose(np.asarray(grad), -np.asarray(theta) / stds**2, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"sigma": "auto"}, "sigma='auto' .* needs learn_sigma=True"),
        ({"sigma": "big", "learn_sigma": True}, "sigma must be a positive number"),
        ({"prior_std": "wide"}, "prior_std must be a positive number"),
        ({"prior_std": -1.0}, "prior_std must be a finite number > 0"),
    ],
)
def test_auto_options_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ivi.make_model(
            lambda p, x: x @ p["w"],
            {"w": jnp.ones((3, 2))},
            generator=ivi.MLPGenerator(2, 6, (4,)),
            **kwargs,
        )


def test_scale_noise_updates_multiplies_only_the_noise_steps():
    bnn, vi_params = _learned_noise_bnn()
    grads = jax.tree_util.tree_map(jnp.ones_like, vi_params)
    plain, scaled = optax.adam(1e-2), optax.chain(optax.adam(1e-2), ivi.scale_noise_updates(10.0))
    u_plain, _ = plain.update(grads, plain.init(vi_params), vi_params)
    u_scaled, _ = scaled.update(grads, scaled.init(vi_params), vi_params)
    np.testing.assert_allclose(
        np.asarray(u_scaled.output_noise["log_std"]),
        10 * np.asarray(u_plain.output_noise["log_std"]),
        rtol=1e-6,
    )
    for a, b in zip(
        jax.tree_util.tree_leaves(u_scaled.generator), jax.tree_util.tree_leaves(u_plain.generator)
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a fixed-sigma model has no noise to scale: the updates pass through unchanged
    fixed = bnn.init(jax.random.key(0))._replace(output_noise={})
    u, _ = ivi.scale_noise_updates(3.0).update(fixed, optax.EmptyState())
    assert u.output_noise == {}
    with pytest.raises(ValueError, match="factor must be a finite number > 0"):
        ivi.scale_noise_updates(0.0)
