"""Implicit variational inference for Bayesian neural networks, in JAX and Flax.

Any Flax model becomes a Bayesian neural network whose approximate posterior is an implicit
distribution, as in Uppal, Stensbo-Smidt, Boomsma and Frellsen, "Implicit Variational
Inference for High-Dimensional Posteriors", NeurIPS 2023 (https://arxiv.org/abs/2310.06643).
A generator g maps low-dimensional noise to the network's D stochastic weights, and each
weight gets Gaussian noise of its own std s_i (the *weight noise*):

    z ~ N(0, I_d),   theta = g(z) + s * eps,   eps ~ N(0, I_D),   d << D.

Training maximises the tempered evidence lower bound, per data point,

    ELBO = mean_i E_q[log p(y_i | x_i, theta)] + beta / N (E_q[log p(theta)] + H[q]),

with p(theta) = N(0, diag(prior_std^2)) and beta the KL weight (1: the ELBO itself).
Linearising g at each z (Jacobian J_z, D x d) makes q locally Gaussian, and the matrix
determinant lemma reduces its entropy to a d x d determinant of the whitened Jacobian:

    H[q] ~ D/2 log(2 pi e) + sum_i log s_i + E_z[ 1/2 log det(J_z^T S^-2 J_z + I_d) ].

``ExactEntropy`` computes the log-determinant, ``SmallestSingularValue`` bounds it by
``d/2 log(s_min^2 + 1)`` (s_min from warm-started Lanczos). The generators stack
matrix-multiplication layers. By default s is learned, each layer's prior std is its initial
std, and ``select_kl_weight`` chooses beta on held-out data; docs/implicit_vi.md derives it
all. Pure functions take an ``ImplicitModel`` (fixed) and ``VIParams`` (trained).

Example:

    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, implicit_vi as ivi
    >>> net = nn.Dense(2)
    >>> params = net.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
    >>> bnn = ivi.ImplicitBNN.from_linen(net, params)
    >>> trainer = bnn.trainer(optax.adam(1e-3), num_data=100)
    >>> state = trainer.init(jax.random.key(1))
    >>> x, y = jnp.ones((8, 3)), jnp.zeros(8, int)
    >>> state, info = trainer.step(jax.random.key(2), state, (x, y))
    >>> bnn.predict_proba(state.vi_params, jax.random.key(3), x).shape
    (8, 2)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.extend.random as jax_random_ext
import jax.numpy as jnp
import numpy as np
import optax
from flax import errors as flax_errors

__all__ = [
    "ImplicitBNN",
    "make_model",
    "ExactEntropy",
    "SmallestSingularValue",
    "Categorical",
    "Gaussian",
    "MMGenerator",
    "MultiHeadMMGenerator",
    "auto_generator",
    "ImplicitModel",
    "VIParams",
    "TrainState",
    "StepInfo",
    "Trainer",
    "Selection",
    "init_vi_params",
    "elbo_loss",
    "train_step",
    "fit",
    "select_kl_weight",
    "sample_params",
    "sample_outputs",
    "predict_proba",
    "predict_mean_var",
    "predictive_log_likelihood",
]

# The learned weight noise starts at this fraction of each layer's initial std: small enough
# that the first steps fit the data, large enough that the ELBO sets it within a few hundred.
INITIAL_NOISE_FRACTION = 0.1
# VIParams stores log(s) / NOISE_RATE: Adam then moves log(s) NOISE_RATE times faster than the
# generator, so that the noise reaches the ELBO's optimum within the training budget.
NOISE_RATE = 10.0
# Defaults, one per purpose: networks sampled per training step, per prediction.
TRAIN_SAMPLES = 4
PREDICT_SAMPLES = 100
# The candidate KL weights of ``select_kl_weight``. Without 1: in the evaluation suite it kept
# the posterior at its prior on every task; the digits chose from the small end.
KL_WEIGHTS = (0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003)

Array = jax.Array
PyTree = Any
MeanFn = Callable[[PyTree, Array], Array]


def _check_positive(name: str, value: Any) -> float:
    number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    if not (number and 0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_count(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_weight(name: str, value: Any) -> None:
    finite = isinstance(value, (int, float, np.floating)) and 0 <= value < math.inf
    if not (finite or isinstance(value, jax.Array)):  # a traced array is a schedule's value
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_key(name: str, key: Any) -> None:
    typed = isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = isinstance(key, jax.Array) and key.shape == (2,) and key.dtype == jnp.uint32
    if not (typed or raw):
        raise ValueError(f"{name} must be a PRNG key, e.g. jax.random.key(0), got {key!r}")


def _normal_rows(keys: Array, size: int, dtype: Any) -> Array:
    """``jax.random.normal(key, (size,), dtype)`` per key, stacked; on CPU for float32 Threefry
    keys, ``_box_muller_normal``: the same distribution 3x faster (D numbers per sample)."""
    typed = jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
    impl = jax.random.key_impl(keys) if typed else jax.config.jax_default_prng_impl
    if (
        jax.default_backend() == "cpu"
        and str(impl) == "threefry2x32"
        and jnp.dtype(dtype) == jnp.float32
        and 0 < size < 2**32
    ):
        words = jax.random.key_data(keys) if typed else keys
        return jax.vmap(lambda key_words: _box_muller_normal(key_words, size))(words)
    return jax.vmap(lambda key: jax.random.normal(key, (size,), dtype))(keys)


def _box_muller_normal(words: Array, size: int) -> Array:
    """``size`` float32 normals from ``ceil(size / 2)`` Threefry-2x32 hashes of a key's words:
    Box-Muller with the angle's sin and cos as float32-exact polynomials on [-pi/4, pi/4) and
    three bits choosing one of the square's 8 symmetries (no erfinv, no general sin/cos)."""
    num_pairs = (size + 1) // 2
    counter = jax.lax.iota(jnp.uint32, num_pairs)
    a, b = jax_random_ext.threefry2x32_p.bind(
        words[0], words[1], jnp.zeros(num_pairs, jnp.uint32), counter
    )
    # The primitive types its output as device-invariant even for a per-device key inside
    # shard_map; a zero computed from the key (removed by XLA) keeps the key's type.
    a, b = a + words[0] * np.uint32(0), b + words[0] * np.uint32(0)
    radius = jnp.sqrt(-2 * jnp.log(((a >> 8).astype(jnp.float32) + 1) * np.float32(2**-24)))
    t = ((b >> 8).astype(jnp.float32) * np.float32(2**-23) - 1) * np.float32(math.pi / 4)
    t2 = t * t
    sin = t * (1 + t2 * (-1 / 6 + t2 * (1 / 120 + t2 * (-1 / 5040 + t2 * (1 / 362880)))))
    cos = 1 + t2 * (-1 / 2 + t2 * (1 / 24 + t2 * (-1 / 720 + t2 * (1 / 40320 - t2 / 3628800))))
    swap = (a & 1) == 1

    def flip_sign_where_bit(x, bit):
        flip = (a << np.uint32(31 - bit)) & np.uint32(0x80000000)
        as_bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        return jax.lax.bitcast_convert_type(as_bits ^ flip, jnp.float32)

    first = flip_sign_where_bit(radius * jnp.where(swap, sin, cos), 1)
    second = flip_sign_where_bit(radius * jnp.where(swap, cos, sin), 2)
    return jnp.stack([first, second], axis=1).reshape(2 * num_pairs)[:size]


# ----- 1. Entropy of the linearised sampler (paper, section 3) ---------------------------------
# The generator enters as `mean_fn(params, z)`, latents (S, d) -> means (S, D) row by row, with
# `params` explicit so that the eigen-solver can run on stop-gradient copies of them.


def exact_log_det(mean_fn: MeanFn, params: PyTree, z: Array, sigma: float) -> tuple[Array, Array]:
    """``(g(z), 1/2 log det(J^T J + sigma^2 I_d))`` for the generator's Jacobian J (D x d) at
    each z (S, d): J from d forward-mode products, the log-determinant ``sum log|R_ii|`` from the
    QR factorisation of [J; sigma I_d], finite and differentiable even for a rank-deficient J."""
    num_samples, d = z.shape
    basis = jnp.broadcast_to(jnp.eye(d, dtype=z.dtype)[:, None, :], (d, num_samples, d))
    # The primal g(z) does not depend on the tangent, so vmap leaves it unbatched (out_axes None).
    mean, jac_columns = jax.vmap(
        lambda tangent: jax.jvp(partial(mean_fn, params), (z,), (tangent,)), out_axes=(None, 0)
    )(basis)
    jac = jnp.moveaxis(jac_columns, 0, -1)  # (S, D, d)
    damping = jnp.broadcast_to(sigma * jnp.eye(d, dtype=jac.dtype), (num_samples, d, d))
    r = jnp.linalg.qr(jnp.concatenate([jac, damping], axis=1), mode="r")
    return mean, jnp.sum(jnp.log(jnp.abs(jnp.diagonal(r, axis1=-2, axis2=-1))), axis=-1)


BASIS_SIZE, RESTART_SIZE = 24, 8  # smallest_eigenpair's largest basis, and what a restart keeps


class Eigenpair(NamedTuple):
    """Per row: the smallest Ritz value (an upper bound of the smallest eigenvalue), its unit
    vector, the relative residual ``||A v - rho v|| / (rho + shift + eps sqrt(n) ||A||)`` (an
    eigenvalue lies within residual x denominator of rho) and the iterations used."""

    value: Array
    vector: Array
    residual: Array
    iterations: Array


def smallest_eigenpair(
    matvec: Callable[[Array], Array],
    x0: Array,
    num_iterations: int,
    *,
    tolerance: float | None = None,
    shift: float = 0.0,
) -> Eigenpair:
    """Smallest eigenpairs of S symmetric positive semi-definite operators, matrix-free:
    Rayleigh-Ritz on the Krylov subspace span{x0, A x0, ..., A^k x0} (Lanczos, re-orthogonalised
    twice), ``matvec`` applying the S operators to the rows of (S, n), x0 (S, n) the starts (a
    warm start: the previous solution). Each row stops at the first k whose relative residual
    is at most ``tolerance`` (None: never), or at k = num_iterations. Vanishing directions (a
    rank-deficient operator) are dropped rather than normalised into NaNs. The basis holds at
    most ``BASIS_SIZE`` vectors; when it is full it restarts from its ``RESTART_SIZE`` smallest
    Ritz vectors and the next Lanczos direction (a thick restart), so that an iteration costs
    the same for any ``num_iterations``.

    References:
      Parlett, "The Symmetric Eigenvalue Problem", SIAM 1998, ch. 11-13.
      Wu and Simon, "Thick-Restart Lanczos Method", SIAM J. Matrix Anal. Appl. 22(2), 2000.
    """
    x0 = jax.lax.stop_gradient(x0)
    num_problems, size = x0.shape
    num_vectors = min(num_iterations + 1, BASIS_SIZE)
    eps = jnp.finfo(x0.dtype).eps
    tiny = jnp.finfo(x0.dtype).tiny

    def extend(j, basis, images, kept, candidate, active):
        norm_before = jnp.linalg.norm(candidate, axis=-1)
        for _ in range(2):  # classical Gram-Schmidt, twice
            overlaps = jnp.einsum("skn,sn->sk", basis, candidate)
            candidate = candidate - jnp.einsum("skn,sk->sn", basis, overlaps)
        norm = jnp.linalg.norm(candidate, axis=-1)
        # Below the rounding level of the original the direction is numerically zero: drop it.
        # Rows that have stopped add nothing, so a row's result does not depend on the others.
        keep = (norm > eps * norm_before) & active
        v = candidate * jnp.where(keep, 1.0 / jnp.where(keep, norm, 1.0), 0.0)[:, None]
        if num_vectors <= num_iterations:  # the basis can fill up: then restart it
            full = j == num_vectors
            basis, images, kept = jax.lax.cond(full, restart, lambda *x: x, basis, images, kept)
            j = jnp.where(full, RESTART_SIZE, j)
        image = jax.lax.stop_gradient(matvec(v))
        basis, images = basis.at[:, j].set(v), images.at[:, j].set(image)
        return j, basis, images, kept.at[:, j].set(keep), image

    def ritz(basis, images, kept):
        projected = jnp.einsum("skn,sln->skl", basis, images)
        projected = 0.5 * (projected + jnp.swapaxes(projected, -1, -2))
        # Dropped or unused directions get a Ritz value above every other one: never the smallest.
        penalty = 2.0 * jnp.sum(jnp.abs(projected), axis=(-2, -1), keepdims=True) + 1.0
        both = kept[:, :, None] & kept[:, None, :]
        dropped = jnp.eye(num_vectors, dtype=bool) & ~kept[:, None, :]
        projected = jnp.where(both, projected, 0.0) + jnp.where(dropped, penalty, 0.0)
        ritz_values, coefficients = jnp.linalg.eigh(projected)
        coefficients = jnp.where(kept[:, :, None], coefficients, 0.0)
        v = jnp.einsum("sk,skn->sn", coefficients[:, :, 0], basis)
        image = jnp.einsum("sk,skn->sn", coefficients[:, :, 0], images)
        v_norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
        scale = 1.0 / jnp.where(v_norm > 0, v_norm, 1.0)
        v, image = v * scale, image * scale
        rho = jnp.where(jnp.any(kept, axis=-1), ritz_values[:, 0], 0.0)
        # Rounding limits the residual to about eps ||A||: below that it measures rounding.
        norm_estimate = jnp.max(jnp.linalg.norm(images, axis=-1), axis=-1)
        denominator = jnp.maximum(rho + shift + eps * math.sqrt(size) * norm_estimate, tiny)
        residual = jnp.linalg.norm(image - rho[:, None] * v, axis=-1) / denominator
        return rho, v, residual, coefficients

    def restart(basis, images, kept):
        # Every Ritz residual of a Lanczos basis lies along its next vector v: the smallest Ritz
        # vectors and v continue the same Krylov process.
        coefficients = ritz(basis, images, kept)[3]
        coefficients = jnp.where(jnp.arange(num_vectors) < RESTART_SIZE, coefficients, 0.0)
        basis = jnp.einsum("skr,skn->srn", coefficients, basis)
        images = jnp.einsum("skr,skn->srn", coefficients, images)
        return basis, images, jnp.linalg.norm(basis, axis=-1) > 0.5

    empty = jnp.zeros((num_problems, num_vectors, size), x0.dtype)
    no_vectors = jnp.zeros((num_problems, num_vectors), bool)
    stop_at = -1.0 if tolerance is None else tolerance  # -1: never, run every iteration

    def not_done(state):
        k, _, *_, active, _ = state
        return (k <= num_iterations) & jnp.any(active)

    def step(state):
        k, j, basis, images, kept, candidate, active, iterations = state
        j, basis, images, kept, candidate = extend(j, basis, images, kept, candidate, active)
        iterations = iterations + active.astype(jnp.int32)
        active = active & (ritz(basis, images, kept)[2] > stop_at)
        return k + 1, j + 1, basis, images, kept, candidate, active, iterations

    first = extend(0, empty, empty, no_vectors, x0, jnp.ones(num_problems, bool))[1:]
    start = (1, 1, *first, ritz(*first[:3])[2] > stop_at, jnp.zeros(num_problems, jnp.int32))
    _, _, basis, images, kept, _, _, iterations = jax.lax.while_loop(not_done, step, start)
    rho, v, residual, _ = ritz(basis, images, kept)
    return Eigenpair(*jax.lax.stop_gradient((rho, v, residual)), iterations)


def smallest_singular_value(
    mean_fn: MeanFn,
    params: PyTree,
    z: Array,
    x0: Array,
    num_iterations: int,
    *,
    tolerance: float | None = None,
    shift: float = 0.0,
) -> tuple[Array, Eigenpair, Array]:
    """``(||J v||^2, eigenpair, g(z))``: the smallest singular value squared of the Jacobian J of
    ``mean_fn(params, .)`` at each z (S, d), ``smallest_eigenpair`` (from x0) on ``v -> J^T J v``
    with one linearisation held constant; ``||J v||^2`` with the live parameters has the
    eigenvalue's gradient (envelope theorem)."""
    # One linearisation at the live parameters: its primal output carries their gradient, its
    # stop-gradient copy drives the solver, and the live copy gives J v for the gradient.
    mean, forward = jax.linearize(partial(mean_fn, params), z)
    frozen_forward = jax.tree_util.tree_map(jax.lax.stop_gradient, forward)
    backward = jax.linear_transpose(frozen_forward, z)
    matvec, x0 = (lambda u: backward(frozen_forward(u))[0]), jnp.asarray(x0, z.dtype)
    pair = smallest_eigenpair(matvec, x0, num_iterations, tolerance=tolerance, shift=shift)
    return jnp.sum(jnp.square(forward(pair.vector)), axis=-1), pair, mean


class Estimate(NamedTuple):
    """An entropy estimator's result for z (S, d): g(z) (S, D), ``1/2 log det(J^T J + sigma^2 I)``
    or its bound (S,), the solver's final vectors (S, d), residuals and iterations (S,)."""

    mean: Array
    half_log_det: Array
    vectors: Array
    residual: Array
    iterations: Array


@dataclasses.dataclass(frozen=True)
class ExactEntropy:
    """The exact log-determinant (``exact_log_det``) on ``num_samples`` of a step's latent
    samples: d Jacobian-vector products and a QR factorisation each, memory S x D x d. For
    networks up to about 10^5 weights and latent dimensions up to a few hundred."""

    num_samples: int = 1

    def __post_init__(self):
        _check_count("ExactEntropy.num_samples", self.num_samples)

    def estimate(self, mean_fn: MeanFn, params: PyTree, z: Array, sigma: float, x0: Array):
        mean, half_log_det = exact_log_det(mean_fn, params, z, sigma)
        zeros = jnp.zeros(z.shape[0], z.dtype)
        return Estimate(mean, half_log_det, x0, zeros, zeros.astype(jnp.int32))


@dataclasses.dataclass(frozen=True)
class SmallestSingularValue:
    """The bound ``d/2 log(s_min^2 + sigma^2)`` of the log-determinant on ``num_samples`` of a
    step's latent samples, s_min from the warm-started Lanczos solver: a few Jacobian-vector
    products, for networks of any size. The solver stops at the relative residual ``tolerance``
    (the bound is then within about d/2 * tolerance nats) or after ``num_iterations``;
    ``tolerance=None``: exactly ``num_iterations`` (the paper's solver: 5)."""

    num_iterations: int = 20
    tolerance: float | None = 0.1
    num_samples: int = 1

    def __post_init__(self):
        _check_count("SmallestSingularValue.num_iterations", self.num_iterations)
        _check_count("SmallestSingularValue.num_samples", self.num_samples)
        if self.tolerance is not None and not (
            isinstance(self.tolerance, (int, float)) and 0 < self.tolerance < 1
        ):
            raise ValueError(
                "SmallestSingularValue.tolerance must be None or a number in (0, 1) (the "
                f"solver's relative residual), got {self.tolerance!r}"
            )

    def estimate(self, mean_fn: MeanFn, params: PyTree, z: Array, sigma: float, x0: Array):
        s_min_squared, pair, mean = smallest_singular_value(
            mean_fn, params, z, x0, self.num_iterations, tolerance=self.tolerance, shift=sigma**2
        )
        half_log_det = 0.5 * z.shape[-1] * jnp.log(s_min_squared + sigma**2)
        return Estimate(mean, half_log_det, pair.vector, pair.residual, pair.iterations)


Entropy = ExactEntropy | SmallestSingularValue


def gaussian_log_prior(theta: Array, prior_std: float | Array) -> Array:
    """``log N(theta | 0, diag(prior_std^2))`` summed over the last axis of theta."""
    theta = theta.astype(jnp.promote_types(theta.dtype, jnp.float32))
    variance = jnp.broadcast_to(jnp.square(prior_std), theta.shape[-1:])
    log_density = -0.5 * (jnp.square(theta) / variance + jnp.log(2 * math.pi * variance))
    return jnp.sum(log_density, axis=-1)


# ----- 2. Generators: noise (..., *noise_shape) -> (..., output_size) (paper, section 4) -------


_fan_in_init = partial(nn.initializers.variance_scaling, 1.0, "fan_in", "normal")


def _mm_product(x: Array, w_left: Array, b_left: Array, w_right: Array, b_right: Array) -> Array:
    """``(W_l X + B_l) W_r + B_r`` for matrices stored (a, batch, b): each product one matrix
    multiplication without transposes, in the cheaper association."""
    a, batch, b = x.shape
    a_out, b_out = b_right.shape
    if a_out * a * b + a_out * b * b_out <= a * b * b_out + a_out * a * b_out:
        y = (w_left @ x.reshape(a, batch * b)).reshape(a_out, batch, b) + b_left[:, None, :]
        y = (y.reshape(a_out * batch, b) @ w_right).reshape(a_out, batch, b_out)
        return y + b_right[:, None, :]
    y = (x.reshape(a * batch, b) @ w_right).reshape(a, batch, b_out)
    bias = b_left @ w_right + b_right
    return (w_left @ y.reshape(a, batch * b_out)).reshape(a_out, batch, b_out) + bias[:, None, :]


def _to_middle(x: Array) -> Array:
    """(..., a, b) -> (a, batch, b)."""
    a, b = x.shape[-2:]
    return jnp.swapaxes(x.reshape(-1, a, b), 0, 1)


def _flatten_middle(y: Array) -> Array:
    """(a, batch, b) -> (batch, a * b), each matrix flattened row-major."""
    return jnp.swapaxes(y, 0, 1).reshape(y.shape[1], -1)


class MMLayer(nn.Module):
    """Matrix-multiplication layer ``Y = (W_l X + B_l) W_r + B_r`` (a x b -> ``output_shape``):
    ``a'a + a'b + bb' + a'b'`` parameters instead of a dense layer's ``(ab)(a'b')``. W_l, W_r
    start with variance 1/a, 1/b and the biases at zero, so Y has the scale of X. Inputs and
    outputs are stored (a, batch, b), the generators' layout."""

    output_shape: tuple[int, int]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        a, _, b = x.shape
        a_out, b_out = self.output_shape
        w_left = self.param("left_kernel", _fan_in_init(in_axis=-1, out_axis=-2), (a_out, a))
        b_left = self.param("left_bias", nn.initializers.zeros, (a_out, b))
        w_right = self.param("right_kernel", _fan_in_init(in_axis=-2, out_axis=-1), (b, b_out))
        b_right = self.param("right_bias", nn.initializers.zeros, (a_out, b_out))
        return _mm_product(x, w_left, b_left, w_right, b_right)


class MMGenerator(nn.Module):
    """Matrix-multiplication generator: MM layers ``noise_shape -> hidden_shape``, ``n_hidden``
    x ``hidden -> hidden`` and ``hidden -> output_shape``, ``activation`` between them, the
    output flattened row-major; the paper's for an MLP 784-400-400-10 is
    ``MMGenerator((40, 40), (420, 420), 2, (957, 500))`` (Uppal et al., NeurIPS 2023, sec. 4)."""

    noise_shape: tuple[int, int]
    hidden_shape: tuple[int, int]
    n_hidden: int
    output_shape: tuple[int, int]
    activation: Callable[[Array], Array] = nn.elu

    @property
    def output_size(self) -> int:
        return math.prod(self.output_shape)

    @nn.compact
    def __call__(self, z: Array) -> Array:
        h = _to_middle(z)
        shapes = (self.hidden_shape,) * (self.n_hidden + 1) + (self.output_shape,)
        for i, shape in enumerate(shapes):
            h = MMLayer(tuple(shape), name=f"layers_{i}")(h)
            h = self.activation(h) if i < len(shapes) - 1 else h
        return _flatten_middle(h).reshape(*z.shape[:-2], self.output_size)


class MultiHeadMMGenerator(nn.Module):
    """The correlated multi-head MM generator: two trunk MM layers map the noise to
    ``trunk_shapes[1]``, cut into consecutive chunks; chunk i, reshaped to
    ``head_input_shapes[i]``, feeds head i, an ``MMGenerator`` cut to its first
    ``head_output_sizes[i]`` outputs; the outputs are concatenated. The trunk correlates the
    layers, the heads keep each MM layer small. References: Uppal et al., NeurIPS 2023, sec. 4."""

    noise_shape: tuple[int, int]
    trunk_shapes: tuple[tuple[int, int], tuple[int, int]]
    head_input_shapes: tuple[tuple[int, int], ...]
    head_hidden_shapes: tuple[tuple[int, int], ...]
    head_output_shapes: tuple[tuple[int, int], ...]
    head_n_hidden: tuple[int, ...]
    head_output_sizes: tuple[int, ...] | None = None
    activation: Callable[[Array], Array] = nn.elu

    @property
    def head_sizes(self) -> tuple[int, ...]:
        """Entries each head contributes to the output."""
        sizes = self.head_output_sizes or [math.prod(s) for s in self.head_output_shapes]
        return tuple(sizes)

    @property
    def output_size(self) -> int:
        return sum(self.head_sizes)

    @nn.compact
    def __call__(self, z: Array) -> Array:
        h = _to_middle(z)
        for i, shape in enumerate(self.trunk_shapes):
            h = self.activation(MMLayer(tuple(shape), name=f"trunk_{i}")(h))
        flat = _flatten_middle(h)
        starts = np.cumsum([0] + [math.prod(s) for s in self.head_input_shapes])
        outputs = []
        for i, (shape, keep) in enumerate(zip(self.head_input_shapes, self.head_sizes)):
            chunk = flat[:, starts[i] : starts[i + 1]].reshape(-1, *shape)
            hidden, n_hidden = tuple(self.head_hidden_shapes[i]), self.head_n_hidden[i]
            output_shape = tuple(self.head_output_shapes[i])
            head = MMGenerator(
                tuple(shape), hidden, n_hidden, output_shape, self.activation, name=f"heads_{i}"
            )
            outputs.append(head(chunk)[:, :keep])
        return jnp.concatenate(outputs, axis=-1).reshape(*z.shape[:-2], self.output_size)


def count_params(tree: PyTree) -> int:
    """Number of scalar entries in a pytree of arrays (e.g. a ``params`` dict)."""
    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


# ----- 3. Any model becomes Bayesian: the flat vector theta and the model's pytree ------------


def _path_name(key_path) -> str:
    name = jax.tree_util.keystr(key_path, simple=True, separator="/")
    # nnx.State leaves are the `value` of a Variable: drop it so names read like linen paths.
    return name.removesuffix("/value")


def _module_of(path: str) -> str:
    return path.rsplit("/", 1)[0]


@dataclasses.dataclass(frozen=True, eq=False)
class ParameterLayout:
    """How a flat vector theta of the D stochastic parameters maps onto a model's pytree: the
    stochastic leaves, in flattening order, are consecutive row-major slices of theta
    (``offsets``: where each starts, then D); the other leaves are deterministic."""

    treedef: Any
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    stochastic: tuple[bool, ...]
    offsets: tuple[int, ...]

    @classmethod
    def from_params(cls, params: PyTree, stochastic: Any = None) -> ParameterLayout:
        """The layout of ``params``; ``stochastic(path: str, leaf) -> bool`` selects the leaves
        the generator produces (None: all)."""
        with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
        if not with_path:
            raise ValueError("params has no array leaves")
        paths = tuple(_path_name(p) for p, _ in with_path)
        leaves = [leaf for _, leaf in with_path]
        dtypes = tuple(jnp.result_type(leaf) for leaf in leaves)
        for path, dtype in zip(paths, dtypes):
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"params leaf {path!r} has dtype {dtype}; only floats can be")
        if stochastic is not None and not callable(stochastic):
            raise ValueError(
                f"stochastic must be None or a callable (path, leaf) -> bool, got {stochastic!r}"
            )
        mask = [stochastic is None or bool(stochastic(p, leaf)) for p, leaf in zip(paths, leaves)]
        if not any(mask):
            raise ValueError("stochastic selects no parameter; at least one leaf must be")
        shapes = tuple(tuple(np.shape(leaf)) for leaf in leaves)
        sizes = [math.prod(s) for s, is_stochastic in zip(shapes, mask) if is_stochastic]
        offsets = tuple(int(n) for n in np.cumsum([0, *sizes]))
        return cls(treedef, paths, shapes, dtypes, tuple(mask), offsets)

    @property
    def num_stochastic(self) -> int:
        """D: the parameters produced by the generator."""
        return self.offsets[-1]

    def split(self, params: PyTree) -> tuple[list[Array], dict[str, Array]]:
        """The stochastic leaves (a list) and the deterministic ones (keyed by path)."""
        leaves = self.treedef.flatten_up_to(params)
        stochastic = [v for v, s in zip(leaves, self.stochastic) if s]
        fixed = {p: jnp.asarray(v) for p, v, s in zip(self.paths, leaves, self.stochastic) if not s}
        return stochastic, fixed

    def assemble(self, theta: Array, deterministic: Mapping[str, Array]) -> PyTree:
        """The parameter pytree from theta (D,) and the deterministic leaves by path."""
        leaves, starts = [], iter(self.offsets)
        for path, shape, dtype, is_stochastic in zip(
            self.paths, self.shapes, self.dtypes, self.stochastic
        ):
            if is_stochastic:
                start = next(starts)
                piece = theta[start : start + math.prod(shape)]
                leaves.append(piece.reshape(shape).astype(dtype))
            else:
                leaves.append(deterministic[path])
        return self.treedef.unflatten(leaves)


def _per_parameter(layout: ParameterLayout, per_leaf: Sequence[float], dtype: Any) -> Array:
    """One value per stochastic leaf -> one per stochastic parameter (D,), built from
    broadcasts rather than a D-entry constant in the compiled program."""
    sizes = np.diff(layout.offsets)
    return jnp.concatenate([jnp.full(int(n), v, dtype) for n, v in zip(sizes, per_leaf)])


def auto_generator(
    params: PyTree,
    *,
    stochastic: Any = None,
    noise_shape: tuple[int, int] | None = None,
    head_hidden: int = 64,
    head_n_hidden: int = 1,
) -> MultiHeadMMGenerator:
    """A multi-head MM generator for a parameter pytree, one head per module (a Dense kernel
    and its bias form one): a module whose leaves share a last dimension n >= 4 gets an output
    matrix of (size / n) x n, one row per input unit and one for the bias; others the smallest
    near-square matrix covering them. The noise is (k, k), k = clip(round(sqrt(D) / 2), 2, 16),
    unless given; each head reads twice the noise's rows, and no later matrix is smaller on
    either side (hidden sides capped at ``head_hidden``), so that dg/dz can reach full rank d:
    at a rank-deficient Jacobian the entropy bound gives no gradient."""
    layout = params
    if not isinstance(params, ParameterLayout):
        layout = ParameterLayout.from_params(params, stochastic)
    side = min(16, max(2, round(math.sqrt(layout.num_stochastic) / 2)))
    noise_shape = tuple(noise_shape or (side, side))
    if len(noise_shape) != 2 or min(noise_shape) < 1:
        raise ValueError(
            f"noise_shape must be a matrix shape (a, b) of positive integers, got {noise_shape!r}"
        )
    head_hidden = _check_count("head_hidden", head_hidden)
    head_input_shape = (2 * noise_shape[0], noise_shape[1])
    groups: dict[str, list[tuple[int, ...]]] = {}
    for path, shape, is_stochastic in zip(layout.paths, layout.shapes, layout.stochastic):
        if is_stochastic:
            groups.setdefault(_module_of(path), []).append(shape)
    output_shapes, output_sizes = [], []
    for shapes in groups.values():
        size = sum(math.prod(s) for s in shapes)
        last_dims = {s[-1] if s else 0 for s in shapes}
        width = last_dims.pop() if len(last_dims) == 1 else 0
        # A width-1 output matrix would hang the whole head on a single random scalar W_r, and
        # one narrower than the head's input caps the rank of the head's linear part.
        if width < max(4, head_input_shape[1]):
            width = max(1, math.ceil(math.sqrt(size)))
        output_shapes.append((math.ceil(size / width), width))
        output_sizes.append(size)
    hidden_shapes = tuple(
        tuple(
            max(n_in, min(8, head_hidden), min(n, head_hidden))
            for n, n_in in zip(s, head_input_shape)
        )
        for s in output_shapes
    )
    num_heads = len(groups)
    return MultiHeadMMGenerator(
        noise_shape=noise_shape,
        trunk_shapes=(
            (2 * noise_shape[0], 2 * noise_shape[1]),
            (num_heads * head_input_shape[0], head_input_shape[1]),
        ),
        head_input_shapes=(head_input_shape,) * num_heads,
        head_hidden_shapes=hidden_shapes,
        head_output_shapes=tuple(output_shapes),
        head_n_hidden=(_check_count("head_n_hidden", head_n_hidden, 0),) * num_heads,
        head_output_sizes=tuple(output_sizes),
    )


# ----- 4. Likelihoods: `init() -> params` (a possibly empty dict of trained parameters),
# `log_prob(params, outputs, targets) -> (B,)` and `check_targets(outputs_shape, targets)`.


@dataclasses.dataclass(frozen=True)
class Categorical:
    """Classification: ``log softmax(logits)[label]`` per example, for integer labels (B,)."""

    def init(self) -> dict:
        return {}

    def check_targets(self, outputs_shape: tuple[int, ...], labels: Any) -> None:
        shape, dtype = np.shape(labels), jnp.result_type(labels)
        if shape != tuple(outputs_shape[:-1]) or not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(
                f"Categorical labels must be integers of shape {tuple(outputs_shape[:-1])} (one "
                f"class index per example, not one-hot), got {dtype} of shape {shape}"
            )
        if not isinstance(labels, jax.core.Tracer) and np.size(labels):
            low, high = int(np.min(labels)), int(np.max(labels))
            if low < 0 or high >= outputs_shape[-1]:
                raise ValueError(
                    f"Categorical labels must lie in [0, {outputs_shape[-1] - 1}] (the network "
                    f"has {outputs_shape[-1]} outputs), got labels from {low} to {high}"
                )

    def log_prob(self, params: dict, logits: Array, labels: Array) -> Array:
        log_probs = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
        return jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


@dataclasses.dataclass(frozen=True)
class Gaussian:
    """Regression: ``log N(y | f(x), observation_noise^2)`` per example, summed over outputs;
    with ``learn_observation_noise`` its log is trained (``likelihood["log_observation_noise"]``
    of the ``VIParams``) from ``observation_noise``."""

    observation_noise: float = 1.0
    learn_observation_noise: bool = False

    def __post_init__(self):
        _check_positive("observation_noise", self.observation_noise)

    def init(self) -> dict:
        if not self.learn_observation_noise:
            return {}
        return {"log_observation_noise": jnp.asarray(math.log(self.observation_noise), jnp.float32)}

    def noise_variance(self, params: dict) -> Array:
        if self.learn_observation_noise:
            return jnp.exp(2.0 * params["log_observation_noise"])
        return jnp.asarray(self.observation_noise**2)

    def check_targets(self, outputs_shape: tuple[int, ...], targets: Any) -> None:
        shape, expected = np.shape(targets), tuple(outputs_shape)
        if shape != expected and not (expected[-1] == 1 and shape == expected[:-1]):
            raise ValueError(
                f"Gaussian targets must have the network's output shape {expected}, got {shape}"
            )

    def log_prob(self, params: dict, outputs: Array, targets: Array) -> Array:
        outputs = outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32))
        variance = self.noise_variance(params)
        squares = jnp.square(targets.reshape(outputs.shape) - outputs) / variance
        log_density = -0.5 * (squares + jnp.log(2 * math.pi * variance))
        return log_density.reshape(log_density.shape[0], -1).sum(-1)


# ----- 5. The Bayesian network as pure functions: an ImplicitModel (fixed) and VIParams ------


class ImplicitModel(NamedTuple):
    """Everything fixed about an implicit Bayesian network (from ``make_model``): leaf l is
    ``output_shifts[l] + output_scales[l] * g_l(z) + s * eps``, its weight noise std (initial
    value if learned) ``weight_noise[l]`` and its prior std ``prior_std[l]``. Close over it
    (``functools.partial``) rather than passing it to ``jax.jit``."""

    apply_fn: Callable[[PyTree, Any], Array]
    generator: nn.Module
    layout: ParameterLayout
    likelihood: Any
    output_scales: tuple[float, ...]
    output_shifts: tuple[float, ...]
    weight_noise: tuple[float, ...]
    learn_weight_noise: bool
    prior_std: tuple[float, ...]
    deterministic_init: Mapping[str, Array]

    @property
    def latent_dim(self) -> int:
        return math.prod(self.generator.noise_shape)


class VIParams(NamedTuple):
    """The trained quantities: ``generator`` parameters, ``deterministic`` leaves by path,
    ``likelihood`` parameters and ``weight_noise``, ``{"log_std": log(s) / NOISE_RATE}`` (D,)
    if learned (Adam then moves log s ten times faster than the generator), else ``{}``."""

    generator: PyTree
    deterministic: dict[str, Array]
    likelihood: dict
    weight_noise: dict


def _leaf_scales(layout: ParameterLayout, params: PyTree) -> tuple[np.ndarray, np.ndarray]:
    """Per stochastic leaf of the template: its mean and its initial std, where a constant
    leaf (a zero bias, a LayerNorm scale) takes the largest std of the other leaves of its
    module, or the median std of all leaves when its module has none."""
    templates = [np.asarray(leaf, dtype=np.float64) for leaf in layout.split(params)[0]]
    target_mean = np.array([t.mean() for t in templates])
    target_std = np.array([t.std() for t in templates])
    paths = [p for p, s in zip(layout.paths, layout.stochastic) if s]
    modules = [_module_of(p) for p in paths]
    random = target_std > 1e-12 * np.maximum(1.0, np.abs(target_mean))
    median_std = float(np.median(target_std[random])) if random.any() else 1.0
    filled = target_std.copy()
    for i in np.flatnonzero(~random):
        siblings = [s for s, m, r in zip(target_std, modules, random) if m == modules[i] and r]
        filled[i] = max(siblings, default=median_std)
    return target_mean, filled


def _per_generator(fn: Callable) -> Callable:
    """Caches ``fn(generator)`` per (hashable) generator, so that models sharing a generator
    share its compilations; an unhashable one (e.g. built with lists) is not cached."""
    cached = functools.lru_cache(maxsize=64)(fn)

    def call(generator):
        try:
            return cached(generator)
        except TypeError:
            return fn(generator)

    return call


@_per_generator
def _generator_init(generator: nn.Module) -> Callable[[Array], PyTree]:
    """The generator's jitted initialisation, ``key -> params``."""
    return jax.jit(lambda key: generator.init(key, jnp.zeros(generator.noise_shape))["params"])


@_per_generator
def _initial_outputs(generator: nn.Module) -> np.ndarray:
    """Raw outputs (16, output size) of 4 fresh initialisations at 4 latent draws each."""
    init = _generator_init(generator)  # the compilation ``init`` then reuses
    apply = jax.jit(lambda params, key: generator.apply(
        {"params": params}, jax.random.normal(key, (4, *generator.noise_shape))
    ))  # fmt: skip
    keys = jax.random.split(jax.random.key(0), 4)  # one at a time: memory for one generator
    raw = [np.asarray(apply(init(key), jax.random.fold_in(key, 1)), np.float64) for key in keys]
    return np.concatenate(raw).reshape(16, -1)


def _calibrate_output(generator, layout, params):
    """Per-leaf (scale, shift) giving a freshly initialised generator's samples the
    template's moments, pooled over several initialisations so that any key fits."""
    leaves = list(itertools.pairwise(layout.offsets))
    raw = _initial_outputs(generator)
    moments = np.array([[(r[a:b].mean(), r[a:b].var()) for a, b in leaves] for r in raw])
    # Pooled: total variance = mean within-draw variance + variance of the means.
    raw_mean = moments[:, :, 0].mean(0)
    raw_std = np.sqrt(moments[:, :, 1].mean(0) + moments[:, :, 0].var(0))
    target_mean, target_std = _leaf_scales(layout, params)
    scales = target_std / np.where(raw_std > 1e-12, raw_std, 1.0)
    return tuple(scales.tolist()), tuple((target_mean - scales * raw_mean).tolist())


def make_model(
    apply_fn: Callable[[PyTree, Any], Array],
    params: PyTree,
    *,
    likelihood: Any = Categorical(),
    generator: nn.Module | None = None,
    stochastic: Any = None,
    weight_noise: float | str = "learned",
    prior_std: float | str = "auto",
    calibrate_output: bool = True,
) -> ImplicitModel:
    """Makes the network ``apply_fn(params, x)`` Bayesian; returns the ``ImplicitModel``.

    Args:
      apply_fn: ``apply_fn(params, x) -> outputs``, params with the structure of ``params``.
      params: a template pytree (linen ``params``, ``nnx.State``, ...): the shapes, the initial
        deterministic leaves and the scale of the stochastic ones.
      likelihood: ``Categorical()`` (default), ``Gaussian(...)`` or an object with their methods.
      generator: a Flax module with a ``noise_shape`` attribute and at least D outputs per noise
        sample. None: ``auto_generator(params)``.
      stochastic: the stochastic leaves (``ParameterLayout.from_params``); the others are
        trained as point estimates in the same optimisation.
      weight_noise: ``"learned"`` (default): each weight's noise std is trained with the ELBO
        from a tenth of its layer's initial std, spreading the posterior along directions the
        rank-d generator cannot cover; a number: one fixed std (the paper's is 1e-3).
      prior_std: a number, or ``"auto"`` (default): per layer its initial std (a zero bias takes
        its kernel's), the scale a network of any width starts at.
      calibrate_output: scale and shift each output leaf so that a fresh generator (any key)
        has the template's mean and std; False: the raw output, as in the paper.
    """
    if not all(hasattr(likelihood, m) for m in ("init", "log_prob")):
        raise ValueError(
            "likelihood must have init() and log_prob(params, outputs, targets) methods, e.g. "
            f"Categorical() or Gaussian(observation_noise), got {likelihood!r}"
        )
    if weight_noise != "learned":
        weight_noise = _check_positive("weight_noise ('learned' or a std)", weight_noise)
    if prior_std != "auto":
        prior_std = _check_positive("prior_std ('auto' or a std)", prior_std)
    layout = ParameterLayout.from_params(params, stochastic)
    generator = auto_generator(layout) if generator is None else generator
    if not hasattr(generator, "noise_shape"):
        raise ValueError("generator must have a noise_shape attribute (its latent input shape)")
    noise = jnp.zeros((1, *generator.noise_shape))
    variables = jax.eval_shape(generator.init, jax.random.key(0), noise)
    output = jax.eval_shape(generator.apply, variables, noise)
    if output.ndim != 2 or output.shape[1] < layout.num_stochastic:
        raise ValueError(
            f"generator must return a flat vector of at least D = {layout.num_stochastic:,} "
            f"entries per noise sample, got shape {output.shape} for a batch of one"
        )
    num_leaves = len(layout.offsets) - 1
    scales, shifts = (1.0,) * num_leaves, (0.0,) * num_leaves
    if calibrate_output:
        scales, shifts = _calibrate_output(generator, layout, params)
    leaf_stds = tuple(_leaf_scales(layout, params)[1].tolist())
    learned = weight_noise == "learned"
    noise = tuple(INITIAL_NOISE_FRACTION * s for s in leaf_stds) if learned else (weight_noise,)
    prior = leaf_stds if prior_std == "auto" else (prior_std,)
    fixed = (noise * (num_leaves // len(noise)), learned, prior * (num_leaves // len(prior)))
    model = (apply_fn, generator, layout, likelihood, scales, shifts, *fixed)
    return ImplicitModel(*model, layout.split(params)[1])


def init_vi_params(model: ImplicitModel, key: Array) -> VIParams:
    """Initial ``VIParams``: the generator initialised from ``key`` (any key), the template's
    deterministic leaves, the likelihood's parameters and the initial weight noise."""
    _check_key("key", key)
    generator = _generator_init(model.generator)(key)
    weight_noise = {}
    if model.learn_weight_noise:
        dtype = jax.tree_util.tree_leaves(generator)[0].dtype
        log_std = np.log(model.weight_noise) / NOISE_RATE
        weight_noise = {"log_std": _per_parameter(model.layout, log_std, dtype)}
    deterministic = dict(model.deterministic_init)
    return VIParams(generator, deterministic, model.likelihood.init(), weight_noise)


def generator_mean(model: ImplicitModel, gen_params: PyTree, z: Array) -> Array:
    """g(z): the means (S, D) of the stochastic parameters for flat latents z (S, d), the
    generator's output with the model's per-leaf scale and shift."""
    noise = z.reshape(z.shape[0], *model.generator.noise_shape)
    raw = model.generator.apply({"params": gen_params}, noise)[:, : model.layout.num_stochastic]
    if set(model.output_scales) == {1.0} and set(model.output_shifts) == {0.0}:
        return raw  # not calibrated: no pass over the output
    scale = _per_parameter(model.layout, model.output_scales, raw.dtype)
    return raw * scale + _per_parameter(model.layout, model.output_shifts, raw.dtype)


def weight_noise_std(model: ImplicitModel, vi_params: VIParams) -> Array:
    """Each stochastic weight's noise std s (D,)."""
    if model.learn_weight_noise:
        return jnp.exp(NOISE_RATE * vi_params.weight_noise["log_std"])
    dtype = jax.tree_util.tree_leaves(vi_params.generator)[0].dtype
    return _per_parameter(model.layout, model.weight_noise, dtype)


def _draw(model: ImplicitModel, vi_params: VIParams, keys: Array, entropy=None, x0=None):
    """theta = g(z) + s * eps, one draw per key (len(keys), D); with an ``entropy`` estimator
    also its ``Estimate`` for the whitened generator g / s (sigma = 1), whose log-determinant
    plus ``sum_i log s_i`` is the entropy's z-dependent part."""
    split = jax.vmap(lambda key: jax.random.split(key, 2))(keys)
    dtype = jax.tree_util.tree_leaves(vi_params.generator)[0].dtype
    z = _normal_rows(split[:, 0], model.latent_dim, dtype)
    noise_std = weight_noise_std(model, vi_params)
    if entropy is None:
        mean, estimate = generator_mean(model, vi_params.generator, z), None
    else:  # the entropy of the whitened generator g / s, sigma = 1
        whitened = lambda p, z: generator_mean(model, p[0], z) / p[1]  # noqa: E731
        estimate = entropy.estimate(whitened, (vi_params.generator, noise_std), z, 1.0, x0)
        mean = estimate.mean * noise_std
        log_det = estimate.half_log_det + jnp.sum(jnp.log(noise_std))
        estimate = estimate._replace(half_log_det=log_det)
    eps = _normal_rows(split[:, 1], mean.shape[-1], mean.dtype)
    return mean + noise_std * eps, estimate


# ----- 6. The ELBO and the training step -------------------------------------------------------


class StepInfo(NamedTuple):
    """One ELBO evaluation: ``loss``, the untempered ``elbo`` and ``expected_log_likelihood``
    per data point, ``log_prior`` and ``entropy`` over the D weights, and the solver's
    largest residual and iterations over the entropy's samples (0 for ``ExactEntropy``)."""

    loss: Array
    elbo: Array
    expected_log_likelihood: Array
    log_prior: Array
    entropy: Array
    solver_residual: Array
    solver_iterations: Array


def elbo_loss(
    model: ImplicitModel,
    vi_params: VIParams,
    key: Array,
    batch: tuple[Any, Any],
    solver_vectors: Array,
    *,
    num_data: int,
    num_samples: int = TRAIN_SAMPLES,
    entropy: Entropy = SmallestSingularValue(),
    kl_weight: float | Array = 1.0,
    prior_scale: float = 1.0,
) -> tuple[Array, tuple[StepInfo, Array]]:
    """Negative tempered ELBO per data point on a minibatch ``(inputs, targets)``.

    ``loss = -( mean_s mean_i log p(y_i | x_i, theta_s) + beta / N (prior_scale mean_s log
    p(theta_s) + H) )`` over S = ``num_samples`` draws, sample s from the s-th key of
    ``jax.random.split(key, S)``; H is the linearised entropy averaged over the first
    K = ``entropy.num_samples`` of them (unbiased: the latents are independent), its solver
    started from ``solver_vectors`` (K, d), nonzero rows. beta = ``kl_weight`` (may be traced);
    N = ``num_data``. The paper's weights are beta = N / B and ``prior_scale=8.5e-4``.

    Returns:
      ``(loss, (info, solver_vectors))``: a ``StepInfo`` and the solver's final vectors.

    References:
      Uppal et al., NeurIPS 2023, sections 3 and 5.
    """
    keys = jax.random.split(key, num_samples)
    num_entropy = entropy.num_samples
    theta, estimate = _draw(model, vi_params, keys[:num_entropy], entropy, solver_vectors)
    if num_entropy < num_samples:  # the other samples only need the generator's output
        theta = jnp.concatenate([theta, _draw(model, vi_params, keys[num_entropy:])[0]])
    inputs, targets = batch

    def log_likelihood(theta_one):
        params = model.layout.assemble(theta_one, vi_params.deterministic)
        outputs = model.apply_fn(params, inputs)
        return jnp.mean(model.likelihood.log_prob(vi_params.likelihood, outputs, targets))

    expected_log_lik = jnp.mean(jax.vmap(log_likelihood)(theta))
    prior_std = _per_parameter(model.layout, model.prior_std, theta.dtype)
    log_prior = jnp.mean(gaussian_log_prior(theta, prior_std))
    constant = 0.5 * model.layout.num_stochastic * math.log(2 * math.pi * math.e)
    entropy_value = jnp.mean(estimate.half_log_det) + constant
    weight = kl_weight / num_data
    loss = -(expected_log_lik + weight * (prior_scale * log_prior + entropy_value))
    elbo = expected_log_lik + (log_prior + entropy_value) / num_data
    solver = jnp.max(estimate.residual), jnp.max(estimate.iterations)
    info = StepInfo(loss, elbo, expected_log_lik, log_prior, entropy_value, *solver)
    return loss, (info, estimate.vectors)


class TrainState(NamedTuple):
    """What a step carries to the next: ``vi_params``, ``opt_state`` and the entropy solver's
    last vectors (K, d), its warm start."""

    vi_params: VIParams
    opt_state: optax.OptState
    solver_vectors: Array


def train_step(model, optimizer, key, state: TrainState, batch, **elbo_options):
    """One optimizer step on ``elbo_loss`` (with ``elbo_options``; ``num_data`` required):
    ``(state, StepInfo)``. Pure: jit it with the model and optimizer closed over."""
    grad_fn = jax.grad(partial(elbo_loss, model, **elbo_options), has_aux=True)
    grads, (info, vectors) = grad_fn(state.vi_params, key, batch, state.solver_vectors)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.vi_params)
    return TrainState(optax.apply_updates(state.vi_params, updates), opt_state, vectors), info


class Trainer:
    """A model, an optimizer and ``elbo_loss``'s settings: ``init(key)`` and a jitted
    ``step(key, state, batch) -> (state, info)`` (build it with ``ImplicitBNN.trainer``)."""

    def __init__(
        self,
        model: ImplicitModel,
        optimizer: optax.GradientTransformation,
        *,
        num_data: int,
        num_samples: int = TRAIN_SAMPLES,
        entropy: Entropy = SmallestSingularValue(),
        kl_weight: float | Array = 1.0,
        prior_scale: float = 1.0,
    ):
        _check_count("num_data (the training-set size)", num_data)
        _check_count("num_samples", num_samples)
        if not isinstance(entropy, ExactEntropy | SmallestSingularValue):
            raise ValueError(
                f"entropy must be ExactEntropy(...) or SmallestSingularValue(...), got {entropy!r}"
            )
        if entropy.num_samples > num_samples:
            raise ValueError(
                f"entropy.num_samples ({entropy.num_samples}) must be at most num_samples "
                f"({num_samples}): the entropy is averaged over some of the step's samples"
            )
        _check_weight("kl_weight", kl_weight)
        _check_weight("prior_scale", prior_scale)
        self.model, self.optimizer, self.entropy = model, optimizer, entropy
        self.kl_weight = kl_weight  # an argument of the compiled step, not a constant in it
        options = dict(num_data=num_data, num_samples=num_samples, entropy=entropy)
        self._step = jax.jit(
            partial(train_step, model, optimizer, prior_scale=prior_scale, **options)
        )
        self._output_shapes: dict[str, tuple[int, ...]] = {}

    def with_kl_weight(self, kl_weight: float) -> Trainer:
        """The same trainer, sharing its compiled step, with another KL weight."""
        _check_weight("kl_weight", kl_weight)
        other = copy.copy(self)
        other.kl_weight = kl_weight
        return other

    def init(self, key: Array) -> TrainState:
        """The initial state: ``init_vi_params(model, key)``, the optimizer's state and random
        unit solver vectors."""
        vi_params = init_vi_params(self.model, key)
        shape = (self.entropy.num_samples, self.model.latent_dim)
        vectors = jax.random.normal(jax.random.fold_in(key, 1), shape)
        vectors = vectors / jnp.linalg.norm(vectors, axis=-1, keepdims=True)
        return TrainState(vi_params, self.optimizer.init(vi_params), vectors)

    def step(self, key: Array, state: TrainState, batch: tuple[Any, Any]):
        """One jitted step, ``(state, StepInfo)``, after checking the key and the targets."""
        _check_key("key", key)
        inputs, targets = batch
        shapes = str(jax.tree_util.tree_map(lambda a: (np.shape(a), jnp.result_type(a)), inputs))
        if shapes not in self._output_shapes:  # the network's output shape, once per input shape
            draw = partial(sample_outputs, self.model, num_samples=1)
            outputs = jax.eval_shape(draw, state.vi_params, key, inputs)
            self._output_shapes[shapes] = outputs.shape[1:]
        if hasattr(self.model.likelihood, "check_targets"):
            self.model.likelihood.check_targets(self._output_shapes[shapes], targets)
        kl_weight = jnp.asarray(self.kl_weight, jnp.float32)
        return self._step(key, state, batch, kl_weight=kl_weight)


def fit(trainer: Trainer, state: TrainState, x, y, *, key: Array, epochs: int, batch_size: int):
    """``epochs`` passes of ``trainer.step`` over (x, y) in shuffled minibatches (an incomplete
    last one dropped: every step has the same shapes); returns the final ``TrainState``."""
    num_batches = len(x) // _check_count("batch_size", batch_size)
    if num_batches == 0:
        raise ValueError(f"batch_size ({batch_size}) must be at most the data's size ({len(x)})")
    for epoch in range(_check_count("epochs", epochs)):
        epoch_key = jax.random.fold_in(key, epoch)
        order = np.asarray(jax.random.permutation(epoch_key, len(x)))
        for i in range(num_batches):
            rows = order[i * batch_size : (i + 1) * batch_size]
            state, _ = trainer.step(jax.random.fold_in(epoch_key, i + 1), state, (x[rows], y[rows]))
    return state


# ----- 7. Sampling and prediction: Bayesian model averaging -------------------------------------


def sample_params(model: ImplicitModel, vi_params: VIParams, key: Array, num_samples: int):
    """``num_samples`` draws of the full parameter pytree, stacked along a leading axis."""
    _check_count("num_samples", num_samples)
    theta = _draw(model, vi_params, jax.random.split(key, num_samples))[0]
    return jax.vmap(lambda t: model.layout.assemble(t, vi_params.deterministic))(theta)


def _network_outputs(model: ImplicitModel, vi_params: VIParams, keys: Array, x: Any) -> Array:
    """Network outputs (float32 or wider) under one draw per key, stacked."""
    theta = _draw(model, vi_params, keys)[0]
    outputs = jax.vmap(
        lambda t: model.apply_fn(model.layout.assemble(t, vi_params.deterministic), x)
    )(theta)
    return outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32))


def sample_outputs(
    model: ImplicitModel, vi_params: VIParams, key: Array, x: Any, num_samples=PREDICT_SAMPLES
) -> Array:
    """Network outputs under ``num_samples`` parameter draws, stacked on a leading axis."""
    _check_count("num_samples", num_samples)
    return _network_outputs(model, vi_params, jax.random.split(key, num_samples), x)


def _mean_over_networks(model, vi_params, key, x, num_samples, statistic, chunk_size=20):
    """``mean_k statistic(f(x; theta_k))`` over K = num_samples draws, in a scan over chunks of
    ``chunk_size`` networks so that memory does not grow with K; the last chunk is topped up
    with draws whose statistics are masked out."""
    chunk_size = min(chunk_size, _check_count("num_samples", num_samples))
    num_chunks = -(-num_samples // chunk_size)
    keys = jax.random.split(key, num_chunks * chunk_size)
    keys = keys.reshape(num_chunks, chunk_size, *keys.shape[1:])
    real = (jnp.arange(num_chunks * chunk_size) < num_samples).reshape(num_chunks, chunk_size)

    def chunk_sum(chunk_keys, chunk_real):
        values = statistic(_network_outputs(model, vi_params, chunk_keys, x))
        return jax.tree_util.tree_map(lambda v: jnp.tensordot(chunk_real * 1.0, v, 1), values)

    def add_chunk(total, chunk):
        return jax.tree_util.tree_map(jnp.add, total, chunk_sum(*chunk)), None

    total = jax.lax.scan(add_chunk, chunk_sum(keys[0], real[0]), (keys[1:], real[1:]))[0]
    return jax.tree_util.tree_map(lambda t: t / num_samples, total)


def predict_proba(
    model: ImplicitModel, vi_params: VIParams, key: Array, x: Any, num_samples=PREDICT_SAMPLES
) -> Array:
    """Bayesian model average of class probabilities, ``(1/K) sum_k softmax(f(x; theta_k))``,
    a few networks at a time (memory does not grow with K = ``num_samples``)."""
    return _mean_over_networks(model, vi_params, key, x, num_samples, jax.nn.softmax)


def predict_mean_var(
    model: ImplicitModel,
    vi_params: VIParams,
    key: Array,
    x: Any,
    num_samples: int = PREDICT_SAMPLES,
    include_noise: bool = True,
) -> tuple[Array, Array]:
    """Bayesian model average for regression: the mean of the K = ``num_samples`` networks'
    outputs and their variance (epistemic), plus the ``Gaussian`` likelihood's observation
    noise variance when ``include_noise``."""
    if include_noise and not hasattr(model.likelihood, "noise_variance"):
        raise ValueError("include_noise=True needs a Gaussian likelihood; pass include_noise=False")
    # Moments around one extra draw rather than around 0 avoid cancellation.
    ref = _network_outputs(model, vi_params, jax.random.fold_in(key, 1)[None], x)[0]
    moments = _mean_over_networks(
        model, vi_params, key, x, num_samples, lambda f: (f - ref, (f - ref) ** 2)
    )
    variance = jnp.maximum(moments[1] - jnp.square(moments[0]), 0.0)
    if include_noise:
        variance = variance + model.likelihood.noise_variance(vi_params.likelihood)
    return ref + moments[0], variance


def predictive_log_likelihood(
    model: ImplicitModel, vi_params: VIParams, key: Array, x, y, num_samples=PREDICT_SAMPLES
) -> Array:
    """``log (1/K) sum_k p(y | x, theta_k)`` per example (B,), the model average's log
    density for any likelihood: the held-out score of ``select_kl_weight``."""
    outputs = sample_outputs(model, vi_params, key, x, num_samples)
    log_probs = jax.vmap(lambda f: model.likelihood.log_prob(vi_params.likelihood, f, y))(outputs)
    return jax.nn.logsumexp(log_probs, axis=0) - math.log(num_samples)


class Selection(NamedTuple):
    """``select_kl_weight``'s result: the chosen candidate's ``TrainState``, its
    ``kl_weight`` and the ``table`` of ``(kl_weight, validation log-likelihood)``."""

    state: TrainState
    kl_weight: float
    table: tuple[tuple[float, float], ...]


def select_kl_weight(
    bnn: ImplicitBNN,
    x: Any,
    y: Any,
    *,
    key: Array,
    epochs: int,
    batch_size: int,
    kl_weights: Sequence[float] = KL_WEIGHTS,
    validation_fraction: float = 0.15,
    optimizer: optax.GradientTransformation | None = None,
    num_samples: int = TRAIN_SAMPLES,
    entropy: Entropy = SmallestSingularValue(),
    verbose: bool = False,
) -> Selection:
    """Trains one posterior per KL weight beta on (x, y) less a validation split and returns
    the one whose model average has the highest log-likelihood on the split (``Selection``):
    networks much larger than their data want beta < 1. The candidates share the split, the
    initialisation, the batch order and one compiled step. ``optimizer`` None: Adam, cosine
    from 3e-3 to 3e-4.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, implicit_vi as ivi
      >>> bnn = ivi.ImplicitBNN.create(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))})
      >>> x = np.random.default_rng(0).normal(size=(60, 3)).astype(np.float32)
      >>> chosen = ivi.select_kl_weight(bnn, x, (x[:, 0] > 0).astype(int), key=jax.random.key(0),
      ...                               epochs=2, batch_size=16, kl_weights=(1.0, 0.1))
      >>> [beta for beta, _ in chosen.table], chosen.kl_weight in (1.0, 0.1)
      ([1.0, 0.1], True)
    """
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction!r}")
    if not kl_weights:
        raise ValueError("kl_weights must name at least one candidate")
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), len(x)))
    num_val = max(1, round(validation_fraction * len(x)))
    val, train = order[:num_val], order[num_val:]
    steps = epochs * (len(train) // batch_size)
    if optimizer is None:
        optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, max(steps, 1), alpha=0.1))
    score = jax.jit(partial(predictive_log_likelihood, bnn.model))
    options = dict(num_data=len(train), num_samples=num_samples, entropy=entropy)
    shared = bnn.trainer(optimizer, **options)  # one compilation for every candidate
    schedule = dict(key=jax.random.fold_in(key, 2), epochs=epochs, batch_size=batch_size)
    table, states = [], []
    for beta in kl_weights:
        trainer = shared.with_kl_weight(beta)
        state = fit(
            trainer, trainer.init(jax.random.fold_in(key, 1)), x[train], y[train], **schedule
        )
        value = float(jnp.mean(score(state.vi_params, jax.random.fold_in(key, 3), x[val], y[val])))
        table.append((float(beta), value))
        states.append(state)
        if verbose:
            print(f"kl_weight {beta:g}: validation log-likelihood {value:.4f} per example")
    best = int(np.nanargmax([value for _, value in table]))
    return Selection(states[best], table[best][0], tuple(table))


# ----- 8. The convenience wrapper --------------------------------------------------------------


class ImplicitBNN:
    """An ``ImplicitModel`` (``self.model``) with the functions of this module bound to it,
    the sampling and prediction ones jitted. See the module's example.

    References:
      Uppal et al., "Implicit Variational Inference for High-Dimensional Posteriors",
      NeurIPS 2023.
    """

    def __init__(self, model: ImplicitModel):
        self.model = model
        self._sample_params = jax.jit(partial(sample_params, model), static_argnums=2)
        self._sample_outputs = jax.jit(partial(sample_outputs, model), static_argnums=3)
        self._predict_proba = jax.jit(partial(predict_proba, model), static_argnums=3)
        self._predict_mean_var = jax.jit(partial(predict_mean_var, model), static_argnums=(3, 4))

    @classmethod
    def create(cls, apply_fn: Callable[[PyTree, Any], Array], params: PyTree, **kwargs):
        """``ImplicitBNN(make_model(apply_fn, params, **kwargs))``."""
        return cls(make_model(apply_fn, params, **kwargs))

    @classmethod
    def from_linen(cls, module: nn.Module, params: PyTree, **kwargs) -> ImplicitBNN:
        """For a linen module whose only collection is ``params``; kwargs go to
        ``make_model``. A module with batch statistics or dropout needs its own pure
        ``apply_fn`` (see the error it raises)."""
        how = (
            "Pass a pure apply_fn that supplies the other collections and runs in inference "
            "mode: ImplicitBNN.create(lambda p, x: module.apply({'params': p, 'batch_stats': "
            "stats}, x, train=False), variables['params'])"
        )
        if isinstance(params, Mapping) and "params" in params:
            raise ValueError(
                "from_linen takes the params collection, variables['params'], got a variables "
                f"dict with collections {sorted(params)}. {how}"
            )

        def apply_fn(p, x):
            try:
                return module.apply({"params": p}, x)
            except (flax_errors.ScopeCollectionNotFound, flax_errors.InvalidRngError) as error:
                name = type(module).__name__
                raise ValueError(f"{name} needs more than its params ({error}). {how}") from None

        return cls.create(apply_fn, params, **kwargs)

    @classmethod
    def from_nnx(cls, model: Any, **kwargs) -> ImplicitBNN:
        """For an ``nnx.Module`` in evaluation mode (``model.eval()``): its ``nnx.Param``
        state becomes Bayesian (or the subset selected by ``stochastic``); other state, such
        as batch statistics, is held fixed. kwargs go to ``make_model``."""
        from flax import nnx

        for path, module in nnx.iter_graph(model):
            if (isinstance(module, nnx.Dropout) and not module.deterministic) or (
                isinstance(module, nnx.BatchNorm) and not module.use_running_average
            ):
                raise ValueError(
                    f"{'/'.join(map(str, path))} ({type(module).__name__}) is in training mode; "
                    "call model.eval() before ImplicitBNN.from_nnx, so that every sampled "
                    "network is a pure function of its weights"
                )
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return cls.create(lambda p, x: nnx.merge(graphdef, p, rest)(x), params, **kwargs)

    @property
    def latent_dim(self) -> int:
        return self.model.latent_dim

    @property
    def num_stochastic(self) -> int:
        return self.model.layout.num_stochastic

    def num_generator_params(self) -> int:
        """The generator's number of parameters (to compare with ``num_stochastic``)."""
        noise = jnp.zeros((1, *self.model.generator.noise_shape))
        return count_params(jax.eval_shape(self.model.generator.init, jax.random.key(0), noise))

    def init(self, key: Array) -> VIParams:
        """``init_vi_params``."""
        return init_vi_params(self.model, key)

    def trainer(self, optimizer: optax.GradientTransformation, **elbo_options) -> Trainer:
        """A ``Trainer``; ``elbo_options``: ``num_data`` (required), ``num_samples``,
        ``entropy``, ``kl_weight``, ``prior_scale`` (see ``elbo_loss``)."""
        return Trainer(self.model, optimizer, **elbo_options)

    def weight_noise_std(self, vi_params: VIParams) -> Array:
        """Each stochastic weight's noise std (D,)."""
        return weight_noise_std(self.model, vi_params)

    def sample_params(self, vi_params: VIParams, key: Array, num_samples: int):
        return self._sample_params(vi_params, key, num_samples)

    def sample_outputs(self, vi_params, key, x, num_samples: int = PREDICT_SAMPLES) -> Array:
        return self._sample_outputs(vi_params, key, x, num_samples)

    def predict_proba(self, vi_params, key, x, num_samples: int = PREDICT_SAMPLES) -> Array:
        return self._predict_proba(vi_params, key, x, num_samples)

    def predict_mean_var(
        self, vi_params, key, x, num_samples: int = PREDICT_SAMPLES, include_noise: bool = True
    ) -> tuple[Array, Array]:
        return self._predict_mean_var(vi_params, key, x, num_samples, include_noise)
