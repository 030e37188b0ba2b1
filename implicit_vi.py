"""Implicit variational inference for Bayesian neural networks, in JAX and Flax.

Any Flax model becomes a Bayesian neural network whose approximate posterior is an implicit
distribution, as in Uppal, Stensbo-Smidt, Boomsma and Frellsen, "Implicit Variational
Inference for High-Dimensional Posteriors", NeurIPS 2023 (https://arxiv.org/abs/2310.06643).
A generator g_gamma maps low-dimensional noise to the network's D stochastic parameters:

    z ~ N(0, I_d),   theta = g_gamma(z) + sigma * eps,   eps ~ N(0, I_D),   d << D.

Training maximises ELBO(gamma) = E_q[log p(data | theta)] + E_q[log p(theta)] + H[q_gamma]
with p(theta) = N(0, prior_std^2 I). Linearising g at each z (Jacobian J_z, D x d) makes q
locally Gaussian, and the matrix determinant lemma reduces its entropy to a d x d determinant:

    H[q] ~ D/2 log(2 pi e) + (D - d) log sigma + E_z[ 1/2 log det(J_z^T J_z + sigma^2 I_d) ].

The last term is either ``"exact"`` (J_z from d Jacobian-vector products, the log-determinant
from a QR factorisation) or the lower bound ``"smallest_sv"``, ``d/2 log(s_min^2 + sigma^2)``
with s_min the smallest singular value of J_z from a matrix-free eigen-solver that stops at a
residual tolerance (warm-started from the previous training step's vectors, ``aux["eigvecs"]``).
With ``make_model(learn_sigma=True)`` the output noise is learned, one std s_i per parameter:
theta = g(z) + s * eps, and the entropy's last two terms become
sum_i log s_i + 1/2 log det(J_z^T S^-2 J_z + I_d), the same computation on g / s with sigma = 1.
The generators are stacks of matrix-multiplication (MM) layers, Y = (W_l X + B_l) W_r + B_r.
The loss is the negative ELBO per data point,

    loss = -( mean_s mean_i log p(y_i | x_i, theta_s) + w_p mean_s log p(theta_s) + w_H H ),

with w_p = w_H = 1/N by default. docs/implicit_vi.md derives all of this and explains the
design choices.

The functions take an ``ImplicitModel`` (everything fixed, from ``make_model``) and
``VIParams`` (everything trained); ``ImplicitBNN`` binds and jits them for one model.

Example:

    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, implicit_vi as ivi
    >>> net = nn.Dense(2, use_bias=False)
    >>> params = net.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
    >>> bnn = ivi.ImplicitBNN.from_linen(net, params, generator=ivi.MLPGenerator(2, 6, (4,)))
    >>> vi_params = bnn.init(jax.random.key(1))
    >>> optimizer = optax.adam(1e-3)
    >>> opt_state = optimizer.init(vi_params)
    >>> step = bnn.make_train_step(optimizer, num_data=100, num_samples=4, entropy="exact")
    >>> x, y = jnp.ones((8, 3)), jnp.zeros(8, int)
    >>> vi_params, opt_state, aux = step(vi_params, opt_state, jax.random.key(2), (x, y))
"""

from __future__ import annotations

import dataclasses
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

__all__ = [
    # entropy of the linearised sampler
    "entropy_constant",
    "exact_log_det",
    "smallest_eigenpair",
    "Eigenpair",
    "SOLVER_TOLERANCE",
    "SOLVER_MAX_ITERATIONS",
    "smallest_singular_value",
    "linearised_entropy",
    "gaussian_log_prior",
    "AUTO_NOISE_FRACTION",
    # generators
    "MMLayer",
    "MMGenerator",
    "MultiHeadMMGenerator",
    "MLPGenerator",
    "generator_from_config",
    "auto_generator",
    "count_params",
    # the model's parameters as a flat vector
    "ParameterLayout",
    "GeneratorReport",
    # likelihoods
    "Categorical",
    "Gaussian",
    # the Bayesian network: pure functions
    "ImplicitModel",
    "VIParams",
    "make_model",
    "init_vi_params",
    "generator_report",
    "generator_mean",
    "elbo_loss",
    "scale_noise_updates",
    "sample_flat",
    "sample_params",
    "sample_outputs",
    "predict_proba",
    "predict_mean_var",
    # ... and their convenience wrapper
    "ImplicitBNN",
]

ENTROPY_METHODS = ("exact", "smallest_sv")
# make_model(sigma="auto", learn_sigma=True) starts each leaf's learned noise at this fraction
# of the leaf's initial std: small enough that the first steps fit the data, large enough that
# the noise reaches the ELBO's optimum within a few hundred steps.
AUTO_NOISE_FRACTION = 0.1
# The eigen-solver's defaults for "smallest_sv": stop at this relative residual (about
# d/2 * SOLVER_TOLERANCE nats of the entropy) or after this many iterations.
SOLVER_TOLERANCE = 0.1
SOLVER_MAX_ITERATIONS = 20

Array = jax.Array
PyTree = Any
MeanFn = Callable[[PyTree, Array], Array]
Segments = Sequence[tuple[int, int, float]]


# ----- argument checks ------------------------------------------------------------------------


def _check_positive(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _check_count(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_method(method: Any, allow_none: bool = False) -> str | None:
    if method not in ENTROPY_METHODS and not (method is None and allow_none):
        accepted = ", ".join(repr(m) for m in ENTROPY_METHODS) + (" or None" if allow_none else "")
        raise ValueError(f"entropy must be one of {accepted}, got {method!r}")
    return method


def _check_weight(name: str, value: Any) -> None:
    if isinstance(value, jax.Array):  # a traced schedule is accepted as is
        return
    try:
        valid = float(value) >= 0 and math.isfinite(float(value))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_shape(name: str, shape: Any, ndim: int | None = 2) -> tuple[int, ...]:
    try:
        shape = tuple(shape)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive integers, got {shape!r}") from None
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{name} must have {ndim} entries (a matrix shape), got {shape!r}")
    if not shape or any(
        isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in shape
    ):
        raise ValueError(f"{name} must contain positive integers, got {shape!r}")
    return tuple(int(n) for n in shape)


def _check_latents(z: Array) -> tuple[int, int]:
    if z.ndim != 2:
        raise ValueError(f"z must have shape (num_samples, d), got shape {z.shape}")
    return z.shape


def _normal_rows(keys: Array, size: int, dtype: Any) -> Array:
    """One standard normal vector of ``size`` per key: (len(keys), size).

    ``jax.random.normal(key, (size,), dtype)``, except for float32 and Threefry keys (JAX's
    default) on CPU, where ``_box_muller_normal`` draws the same distribution about 3x faster:
    the output noise of every sample is D numbers, a visible part of a training step.
    """
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
    """``size`` float32 standard normals from ``ceil(size / 2)`` Threefry-2x32 hashes of one
    key's two uint32 words.

    Counter j hashes to two 32-bit words a, b. Box-Muller turns them into a radius
    ``sqrt(-2 log u)`` (u from 24 bits of a, in (0, 1]) and an angle: 24 bits of b give t in
    [-pi/4, pi/4), where the Taylor polynomials of sin and cos below are exact in float32, and
    three low bits of a choose one of the 8 symmetries of the square (swap cos and sin, flip
    either sign), which spreads the angle uniformly over the circle. Entries 2j and 2j + 1 are
    the pair ``radius * (cos, sin)``: no erfinv and no general sin/cos, the costly parts of
    ``jax.random.normal`` on CPU.
    """
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


def entropy_constant(num_params: int, latent_dim: int, sigma: float) -> float:
    """``D/2 log(2 pi e) + (D - d) log(sigma)``, the gamma-independent part of the entropy.

    Args:
      num_params: D, the number of stochastic parameters.
      latent_dim: d, the dimension of the latent z.
      sigma: the output noise standard deviation (> 0).

    Returns:
      The constant as a Python float (computed in float64).

    Example:
      >>> import implicit_vi as ivi
      >>> round(ivi.entropy_constant(2, 2, 1.0), 4)  # entropy of N(0, I_2) is log(2 pi e)
      2.8379
    """
    sigma = _check_positive("sigma", sigma)
    return 0.5 * num_params * math.log(2 * math.pi * math.e) + (num_params - latent_dim) * math.log(
        sigma
    )


def exact_log_det(mean_fn: MeanFn, params: PyTree, z: Array, sigma: float) -> tuple[Array, Array]:
    """``1/2 log det(J^T J + sigma^2 I_d)`` for the generator's Jacobian J (D x d) at each z.

    J comes from d forward-mode products; the log-determinant is ``sum log|R_ii|`` for the
    triangular factor R of the QR decomposition of [J; sigma I_d], which is finite and
    differentiable even for a rank-deficient or zero J (docs/implicit_vi.md, section 3.1).
    Memory: S x D x d.

    Args:
      mean_fn: ``mean_fn(params, z) -> theta_mean``, row by row.
      params: the generator's trainable parameters (differentiated through).
      z: latent samples, shape (S, d).
      sigma: the output noise standard deviation (> 0).

    Returns:
      ``(g(z), half_log_det)``: the generated means (S, D) and the log-determinant terms (S,).

    Example:
      >>> import jax.numpy as jnp, implicit_vi as ivi
      >>> A = jnp.array([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
      >>> _, value = ivi.exact_log_det(lambda p, z: z @ p.T, A, jnp.zeros((1, 2)), 1e-3)
      >>> bool(jnp.allclose(value, 0.5 * jnp.log((4 + 1e-6) * (9 + 1e-6))))
      True
    """
    num_samples, d = _check_latents(z)
    basis = jnp.broadcast_to(jnp.eye(d, dtype=z.dtype)[:, None, :], (d, num_samples, d))
    # The primal g(z) does not depend on the tangent, so vmap leaves it unbatched (out_axes None).
    mean, jac_columns = jax.vmap(
        lambda tangent: jax.jvp(partial(mean_fn, params), (z,), (tangent,)), out_axes=(None, 0)
    )(basis)
    jac = jnp.moveaxis(jac_columns, 0, -1)  # (S, D, d)
    damping = jnp.broadcast_to(sigma * jnp.eye(d, dtype=jac.dtype), (num_samples, d, d))
    r = jnp.linalg.qr(jnp.concatenate([jac, damping], axis=1), mode="r")
    return mean, jnp.sum(jnp.log(jnp.abs(jnp.diagonal(r, axis1=-2, axis2=-1))), axis=-1)


class Eigenpair(NamedTuple):
    """Result of ``smallest_eigenpair``, one entry per problem (row).

    Attributes:
      value: the smallest Ritz values rho (S,), upper bounds of the smallest eigenvalues.
      vector: their unit Ritz vectors v (S, n).
      residual: the relative residual ``||A v - rho v|| / (rho + shift + eps sqrt(n) a)`` (S,),
        a = the largest ``||A b||`` over the basis vectors b (about ||A||): some eigenvalue
        lambda of A is within ``residual * (rho + shift + eps sqrt(n) a)`` of rho. The last
        term is the rounding level of the residual in the working precision eps.
      iterations: the iterations each row used (S,), int32: ``iterations + 1`` products.
    """

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
    """Smallest eigenpairs of S symmetric positive semi-definite operators, matrix-free.

    Rayleigh-Ritz on the Krylov subspace span{x0, A x0, ..., A^k x0} (Lanczos with full
    re-orthogonalisation, each direction orthogonalised twice). With ``tolerance=None``,
    k = num_iterations; otherwise each row stops at the first k whose relative residual
    (``Eigenpair.residual``, about ``||A v - rho v|| / (rho + shift)``) is at most
    ``tolerance`` (k = 0 when x0 already qualifies, e.g. a warm start), or at
    k = num_iterations (a ``lax.while_loop``). Directions that vanish (a zero or
    rank-deficient operator) are dropped rather than normalised into NaNs
    (docs/implicit_vi.md, section 3.2).

    Args:
      matvec: applies S independent symmetric PSD n x n operators, one per row:
        ``(S, n) -> (S, n)``.
      x0: starting vectors, shape (S, n): random, or the previous solution (a warm start).
        Need not be normalised; a zero row gives a zero result.
      num_iterations: k (>= 1), or its cap with a tolerance: at most k + 1 operator
        applications; exact (up to rounding) for k >= n - 1.
      tolerance: the relative residual (> 0) at which a row stops, or None.
      shift: a constant (>= 0) added to rho in the residual's denominator: for the entropy,
        sigma^2, so that the residual bounds the relative error of rho + sigma^2.

    Returns:
      An ``Eigenpair`` ``(value, vector, residual, iterations)``, all stop-gradient.

    Example:
      >>> import jax.numpy as jnp, implicit_vi as ivi
      >>> A = jnp.diag(jnp.arange(1.0, 6.0))
      >>> rho, v, residual, iterations = ivi.smallest_eigenpair(lambda u: u @ A, jnp.ones((1, 5)),
      ...                                                      4)
      >>> bool(jnp.allclose(rho, 1.0, atol=1e-4))
      True
      >>> pair = ivi.smallest_eigenpair(lambda v: v @ A, jnp.ones((1, 5)), 10, tolerance=1e-3)
      >>> bool(pair.residual[0] <= 1e-3), int(pair.iterations[0])
      (True, 4)

    References:
      Lanczos, J. Res. Natl. Bur. Stand. 45, 1950. Parlett, "The Symmetric Eigenvalue
      Problem", SIAM 1998, ch. 11-13.
    """
    num_iterations = _check_count("num_iterations", num_iterations)
    if tolerance is not None:
        tolerance = _check_positive("tolerance", tolerance)
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift >= 0):
        raise ValueError(f"shift must be a finite number >= 0, got {shift!r}")
    if x0.ndim != 2:
        raise ValueError(f"x0 must have shape (num_problems, n), got shape {x0.shape}")
    x0 = jax.lax.stop_gradient(x0)
    num_problems, size = x0.shape
    num_vectors = num_iterations + 1
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
        image = jax.lax.stop_gradient(matvec(v))
        basis, images = basis.at[:, j].set(v), images.at[:, j].set(image)
        return basis, images, kept.at[:, j].set(keep), image

    def ritz(basis, images, kept):
        projected = jnp.einsum("skn,sln->skl", basis, images)
        projected = 0.5 * (projected + jnp.swapaxes(projected, -1, -2))
        # Dropped or unused directions get a Ritz value above every other one: never the smallest.
        penalty = 2.0 * jnp.sum(jnp.abs(projected), axis=(-2, -1), keepdims=True) + 1.0
        both = kept[:, :, None] & kept[:, None, :]
        dropped = jnp.eye(num_vectors, dtype=bool) & ~kept[:, None, :]
        projected = jnp.where(both, projected, 0.0) + jnp.where(dropped, penalty, 0.0)
        ritz_values, ritz_vectors = jnp.linalg.eigh(projected)
        coefficients = jnp.where(kept, ritz_vectors[:, :, 0], 0.0)
        v = jnp.einsum("sk,skn->sn", coefficients, basis)
        image = jnp.einsum("sk,skn->sn", coefficients, images)
        v_norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
        scale = 1.0 / jnp.where(v_norm > 0, v_norm, 1.0)
        v, image = v * scale, image * scale
        rho = jnp.where(jnp.any(kept, axis=-1), ritz_values[:, 0], 0.0)
        # Rounding limits the residual to about eps ||A||: below that it measures rounding.
        norm_estimate = jnp.max(jnp.linalg.norm(images, axis=-1), axis=-1)
        denominator = jnp.maximum(rho + shift + eps * math.sqrt(size) * norm_estimate, tiny)
        residual = jnp.linalg.norm(image - rho[:, None] * v, axis=-1) / denominator
        return rho, v, residual

    empty = jnp.zeros((num_problems, num_vectors, size), x0.dtype)
    no_vectors = jnp.zeros((num_problems, num_vectors), bool)
    everyone = jnp.ones(num_problems, bool)
    if tolerance is None:
        basis, images, kept, _ = jax.lax.fori_loop(
            0,
            num_vectors,
            lambda j, state: extend(j, *state, everyone),
            (empty, empty, no_vectors, x0),
        )
        rho, v, residual = ritz(basis, images, kept)
        iterations = jnp.full(num_problems, num_iterations, jnp.int32)
    else:

        def not_done(state):
            j, *_, active, _ = state
            return (j < num_vectors) & jnp.any(active)

        def step(state):
            j, basis, images, kept, candidate, active, iterations = state
            basis, images, kept, candidate = extend(j, basis, images, kept, candidate, active)
            iterations = iterations + active.astype(jnp.int32)
            _, _, residual = ritz(basis, images, kept)
            active = active & (residual > tolerance)
            return j + 1, basis, images, kept, candidate, active, iterations

        first = extend(0, empty, empty, no_vectors, x0, everyone)
        _, _, residual = ritz(*first[:3])
        start = (1, *first, residual > tolerance, jnp.zeros(num_problems, jnp.int32))
        _, basis, images, kept, _, _, iterations = jax.lax.while_loop(not_done, step, start)
        rho, v, residual = ritz(basis, images, kept)
    return Eigenpair(*jax.lax.stop_gradient((rho, v, residual)), iterations)


def smallest_singular_value(
    mean_fn: MeanFn,
    params: PyTree,
    z: Array,
    key: Array | None = None,
    num_iterations: int = 5,
    *,
    x0: Array | None = None,
    tolerance: float | None = None,
    shift: float = 0.0,
    gram_factorisation: tuple[Callable, ...] | None = None,
) -> tuple[Array, Eigenpair, Array]:
    """Smallest singular value of the generator's Jacobian J at each z, matrix-free.

    ``smallest_eigenpair`` runs on ``v -> J^T (J v)`` (the linearisation of the generator at z
    and its transpose, held constant); the value returned is ``||J v||^2`` with the live
    parameters and v held constant, whose gradient is the eigenvalue's (envelope theorem).
    One linearisation serves the generated means, the solver and ``||J v||^2``.

    Args:
      mean_fn: ``mean_fn(params, z) -> theta_mean``, row by row.
      params: the generator's trainable parameters.
      z: latent samples, shape (S, d).
      key: PRNG keys for random starts, one per row of z (shape (S,), e.g.
        ``jax.random.split(key, S)``), so that a row's value does not depend on other rows.
        Required unless ``x0`` is given.
      num_iterations: eigen-solver iterations (>= 1), the cap when ``tolerance`` is set; the
        paper uses 5 without a tolerance.
      x0: starting vectors (S, d), e.g. the previous training step's ``v`` (a warm start);
        rows of zeros start from the random vectors of ``key``. None: random starts.
      tolerance: stop each row once ``||A v - rho v|| / (rho + shift) <= tolerance``
        (``smallest_eigenpair``); None: exactly ``num_iterations`` iterations.
      shift: added to rho in the residual's denominator (the entropy uses sigma^2).
      gram_factorisation: optional ``(features_fn, readout_gram)`` or
        ``(features_fn, readout_gram, readout_fn)`` for a generator ending in a z-independent
        linear readout L, ``mean_fn(p, z) = readout_fn(p, features_fn(p, z))`` with
        ``readout_fn(p, h) = L_p h + c``: ``readout_gram(p)`` returns ``h -> L^T L h`` and
        replaces the two passes through L in every product; with ``readout_fn`` the means
        come from the same features pass (docs/implicit_vi.md, section 3.3).

    Returns:
      ``(s_min_squared, eigenpair, g(z))``: ``||J v||^2`` (differentiable) (S,), the
      solver's ``Eigenpair`` (unit vectors v (S, d), residuals, iterations) and the generated
      means (S, D).

    Example:
      >>> import jax, jax.numpy as jnp, implicit_vi as ivi
      >>> A = jnp.array([[3.0, 0.0], [0.0, 0.5], [0.0, 0.0]])
      >>> keys = jax.random.split(jax.random.key(0), 1)
      >>> s2, pair, _ = ivi.smallest_singular_value(lambda p, z: z @ p.T, A, jnp.zeros((1, 2)),
      ...                                           keys)
      >>> bool(jnp.allclose(s2, 0.25, rtol=1e-4)), pair.vector.shape
      (True, (1, 2))
    """
    _check_latents(z)
    num_samples, latent_dim = z.shape
    if x0 is not None and jnp.shape(x0) != (num_samples, latent_dim):
        raise ValueError(
            f"x0 (the solver's starting vectors) must have shape ({num_samples}, {latent_dim}) "
            f"like z, got shape {jnp.shape(x0)}"
        )
    if (key is None and x0 is None) or (
        key is not None and (jnp.ndim(key) < 1 or key.shape[0] != num_samples)
    ):
        got = None if key is None else f"shape {jnp.shape(key)}"
        raise ValueError(
            f"key must be a PRNG key array with one key per row of z ({num_samples}), e.g. "
            f"jax.random.split(key, {num_samples}), unless x0 is given; got {got}"
        )
    start = None if key is None else _normal_rows(key, latent_dim, z.dtype)
    if x0 is not None:
        x0 = jax.lax.stop_gradient(jnp.asarray(x0, z.dtype))
        if start is not None:
            start = jnp.where(jnp.any(x0 != 0, axis=-1, keepdims=True), x0, start)
        else:
            start = x0
    factorised = gram_factorisation is not None
    features_fn, readout_gram, *readout = gram_factorisation or (mean_fn, None)
    # One linearisation at the live parameters: its primal output carries their gradient, its
    # stop-gradient copy drives the solver, and the live copy gives J v for the gradient.
    features, forward = jax.linearize(partial(features_fn, params), z)
    frozen_forward = jax.tree_util.tree_map(jax.lax.stop_gradient, forward)
    backward = jax.linear_transpose(frozen_forward, z)
    gram = readout_gram(jax.lax.stop_gradient(params)) if factorised else (lambda u: u)
    pair = smallest_eigenpair(
        lambda u: backward(gram(frozen_forward(u)))[0],
        start,
        num_iterations,
        tolerance=tolerance,
        shift=shift,
    )
    if readout:  # the means and J v from one pass through the readout
        mean, jv = jax.jvp(partial(readout[0], params), (features,), (forward(pair.vector),))
    elif factorised:
        mean, jv = jax.jvp(partial(mean_fn, params), (z,), (pair.vector,))
    else:
        mean, jv = features, forward(pair.vector)
    return jnp.sum(jnp.square(jv), axis=-1), pair, mean


def linearised_entropy(
    mean_fn: MeanFn,
    params: PyTree,
    z: Array,
    sigma: float,
    *,
    method: str = "smallest_sv",
    key: Array | None = None,
    num_iterations: int = 5,
    tolerance: float | None = None,
    x0: Array | None = None,
    include_constant: bool = True,
    gram_factorisation: tuple[Callable, ...] | None = None,
) -> tuple[Array, Array]:
    """Entropy of the sampler linearised at each latent sample z.

    ``D/2 log(2 pi e) + (D - d) log sigma + 1/2 log det(J_z^T J_z + sigma^2 I_d)``, with the
    log-determinant exact (``"exact"``) or replaced by the lower bound
    ``d/2 log(s_min^2 + sigma^2)`` (``"smallest_sv"``), tight when all singular values of J
    are equal. With too few iterations s_min is overestimated and the bound may exceed the
    exact value; a ``tolerance`` bounds that error (``smallest_eigenpair``). Averaged over
    z ~ N(0, I_d) it is the ELBO's entropy estimate.

    Args:
      mean_fn: ``mean_fn(params, z) -> theta_mean``, row by row.
      params: the generator's trainable parameters.
      z: latent samples, shape (S, d).
      sigma: the output noise standard deviation (> 0).
      method: ``"exact"`` or ``"smallest_sv"``.
      key: for ``"smallest_sv"``, PRNG keys, one per row of z (see
        ``smallest_singular_value``).
      num_iterations: eigen-solver iterations for ``"smallest_sv"`` (>= 1); with a
        tolerance, the cap.
      tolerance: for ``"smallest_sv"``, the solver's relative residual tolerance (> 0), with
        ``sigma^2`` as the shift: the solver's eigenvalue is then within a factor
        ``1 +- tolerance`` of s^2 + sigma^2 for some singular value s. None: exactly
        ``num_iterations`` iterations.
      x0: for ``"smallest_sv"``, the solver's starting vectors (S, d) (a warm start).
      include_constant: add ``D/2 log(2 pi e) + (D - d) log sigma`` (no effect on gradients).
      gram_factorisation: see ``smallest_singular_value`` (``"smallest_sv"`` only).

    Returns:
      ``(g(z), entropy)``: the generated means (S, D) and the entropies (S,).

    Example:
      >>> import jax, jax.numpy as jnp, implicit_vi as ivi
      >>> A = jnp.eye(3)[:, :2]  # theta = A z + sigma eps
      >>> _, h = ivi.linearised_entropy(lambda p, z: z @ p.T, A, jnp.zeros((1, 2)), 0.1,
      ...                               method="exact")
      >>> cov = A @ A.T + 0.01 * jnp.eye(3)
      >>> bool(jnp.allclose(h, 0.5 * jnp.linalg.slogdet(2 * jnp.pi * jnp.e * cov)[1]))
      True

    References:
      Uppal et al., NeurIPS 2023, section 3.
    """
    sigma = _check_positive("sigma", sigma)
    if _check_method(method) == "exact":
        mean, log_det = exact_log_det(mean_fn, params, z, sigma)
    else:
        s_min_squared, _, mean = smallest_singular_value(
            mean_fn,
            params,
            z,
            key,
            num_iterations,
            x0=x0,
            tolerance=tolerance,
            shift=sigma**2,
            gram_factorisation=gram_factorisation,
        )
        log_det = 0.5 * z.shape[-1] * jnp.log(s_min_squared + sigma**2)
    if include_constant:
        log_det = log_det + entropy_constant(mean.shape[-1], z.shape[-1], sigma)
    return mean, log_det


def gaussian_log_prior(theta: Array, prior_std: float) -> Array:
    """``log N(theta | 0, prior_std^2 I)`` summed over the last axis of theta.

    Example:
      >>> import math, jax.numpy as jnp, implicit_vi as ivi
      >>> value = ivi.gaussian_log_prior(jnp.zeros(1), 1.0)
      >>> bool(jnp.isclose(value, -0.5 * math.log(2 * math.pi)))
      True
    """
    theta = theta.astype(jnp.promote_types(theta.dtype, jnp.float32))
    num_params = theta.shape[-1]
    return -0.5 * jnp.sum(jnp.square(theta), axis=-1) / prior_std**2 - 0.5 * num_params * math.log(
        2 * math.pi * prior_std**2
    )


# ----- 2. Generators (Flax linen modules, paper section 4) ------------------------------------
# Each maps noise of shape `noise_shape` (after any batch dimensions) to a flat vector of
# `output_size` entries. Each also has `features`, the input of its last (linear) layer L, and
# `readout_gram(params, segments)`, the operator h -> L^T M L h for the diagonal output
# weighting M that is `weight` on each (start, stop, weight) segment and zero elsewhere: the
# eigen-solver then skips two passes through the largest layer.


def _fan_in_init(in_axis: int, out_axis: int) -> Callable:
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "normal", in_axis=in_axis, out_axis=out_axis
    )


def _mm_layer_param_count(in_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    (a, b), (a_out, b_out) = in_shape, out_shape
    return a_out * a + a_out * b + b * b_out + a_out * b_out


def _mm_product(x: Array, w_left: Array, b_left: Array, w_right: Array, b_right: Array) -> Array:
    """``(W_l X + B_l) W_r + B_r`` for a batch of matrices stored as (a, batch, b).

    With the batch between the matrix axes both products are single matrix multiplications
    without transposes; the association, ``(W_l X) W_r`` or ``W_l (X W_r)``, is the cheaper one.
    """
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


def _check_noise(z: Array, noise_shape: tuple[int, ...]) -> None:
    if tuple(z.shape[-len(noise_shape) :]) != noise_shape:
        raise ValueError(f"noise must end with shape {noise_shape}, got {z.shape}")


def _set_shapes(module: nn.Module, *names: str) -> None:
    for name in names:
        object.__setattr__(module, name, _check_shape(name, getattr(module, name)))


class MMLayer(nn.Module):
    """Matrix-multiplication layer ``Y = (W_l X + B_l) W_r + B_r``.

    Maps an a x b matrix X to an a' x b' matrix Y with ``a'a + a'b + bb' + a'b'`` parameters
    instead of the ``(ab)(a'b')`` of a dense layer on the flattened matrix. W_l and W_r are
    initialised with variance 1/a and 1/b, the biases at zero, so that Y has the scale of X.

    Attributes:
      output_shape: (a', b').
      batch_in_middle: input and output are (a, batch, b), the generators' internal layout;
        otherwise (..., a, b) with any leading batch dimensions.

    Example:
      >>> import jax, jax.numpy as jnp, implicit_vi as ivi
      >>> layer = ivi.MMLayer((4, 5))
      >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3)))
      >>> layer.apply(variables, jnp.ones((7, 2, 3))).shape
      (7, 4, 5)

    References:
      Uppal et al., NeurIPS 2023, section 4.
    """

    output_shape: tuple[int, int]
    batch_in_middle: bool = False

    def __post_init__(self):
        _set_shapes(self, "output_shape")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if x.ndim < 2 or (self.batch_in_middle and x.ndim != 3):
            layout = "(a, batch, b)" if self.batch_in_middle else "(..., a, b)"
            raise ValueError(f"MMLayer expects an input of shape {layout}, got shape {x.shape}")
        x_middle = x if self.batch_in_middle else _to_middle(x)
        a, b = x_middle.shape[0], x_middle.shape[2]
        a_out, b_out = self.output_shape
        w_left = self.param("left_kernel", _fan_in_init(-1, -2), (a_out, a))
        b_left = self.param("left_bias", nn.initializers.zeros, (a_out, b))
        w_right = self.param("right_kernel", _fan_in_init(-2, -1), (b, b_out))
        b_right = self.param("right_bias", nn.initializers.zeros, (a_out, b_out))
        y = _mm_product(x_middle, w_left, b_left, w_right, b_right)
        if self.batch_in_middle:
            return y
        return jnp.swapaxes(y, 0, 1).reshape(*x.shape[:-2], a_out, b_out)


class MMGenerator(nn.Module):
    """Matrix-multiplication generator: noise matrix -> flat parameter vector.

    MM layers ``noise_shape -> hidden_shape``, ``n_hidden`` x ``hidden -> hidden``, then
    ``hidden -> output_shape``, with ``activation`` between them; the output matrix is
    flattened row-major and its first D entries are used.

    Attributes:
      noise_shape: latent noise matrix, e.g. (40, 40).
      hidden_shape: hidden matrices, e.g. (420, 420).
      n_hidden: number of hidden -> hidden layers (>= 0).
      output_shape: output matrix, e.g. (957, 500).
      activation: nonlinearity (default ELU).

    Example (the paper's generator for an MLP 784-400-400-10 on MNIST):

      >>> import implicit_vi as ivi
      >>> gen = ivi.MMGenerator((40, 40), (420, 420), 2, (957, 500))
      >>> gen.output_size, gen.num_params
      (478500, 3130380)

    References:
      Uppal et al., NeurIPS 2023, section 4 and appendix.
    """

    noise_shape: tuple[int, int]
    hidden_shape: tuple[int, int]
    n_hidden: int
    output_shape: tuple[int, int]
    activation: Callable[[Array], Array] = nn.elu

    def __post_init__(self):
        _set_shapes(self, "noise_shape", "hidden_shape", "output_shape")
        object.__setattr__(self, "n_hidden", _check_count("n_hidden", self.n_hidden, 0))
        super().__post_init__()

    @property
    def output_size(self) -> int:
        return math.prod(self.output_shape)

    @property
    def num_params(self) -> int:
        shapes = [self.noise_shape, *[self.hidden_shape] * (self.n_hidden + 1), self.output_shape]
        return sum(_mm_layer_param_count(i, o) for i, o in itertools.pairwise(shapes))

    def setup(self):
        shapes = (self.hidden_shape,) * (self.n_hidden + 1) + (self.output_shape,)
        self.layers = [MMLayer(shape, batch_in_middle=True) for shape in shapes]

    def features(self, z: Array) -> Array:
        """The input of the last layer, in the (a, batch, b) layout."""
        _check_noise(z, self.noise_shape)
        h = _to_middle(z)
        for layer in self.layers[:-1]:
            h = self.activation(layer(h))
        return h

    def readout(self, h: Array) -> Array:
        """Last layer and flattening: (a, batch, b) features -> (batch, output_size)."""
        return _flatten_middle(self.layers[-1](h))

    def readout_gram(self, params: PyTree, segments: Segments) -> Callable[[Array], Array]:
        """``h -> L^T M L h`` for the last layer L and the output weighting ``segments``."""
        last = params[f"layers_{self.n_hidden + 1}"]
        return _mm_readout_gram(last["left_kernel"], last["right_kernel"], segments)

    def __call__(self, z: Array) -> Array:
        return self.readout(self.features(z)).reshape(*z.shape[:-2], self.output_size)


class MultiHeadMMGenerator(nn.Module):
    """The correlated multi-head MM generator.

    A shared trunk of two MM layers maps the noise to ``trunk_shapes[1]``; its flattened
    output is cut into consecutive chunks, chunk i reshaped to ``head_input_shapes[i]`` and fed
    to head i, an ``MMGenerator`` (``head_hidden_shapes[i]``, ``head_n_hidden[i]``,
    ``head_output_shapes[i]``) whose output is cut to its first ``head_output_sizes[i]``
    entries; the heads' outputs are concatenated. The trunk correlates the heads (layers), the
    heads keep each MM layer small. See also ``generator_from_config`` and ``auto_generator``.

    Attributes:
      noise_shape: latent noise matrix shape.
      trunk_shapes: the two trunk layers' output shapes.
      head_input_shapes, head_hidden_shapes, head_output_shapes: per head, matrix shapes.
      head_n_hidden: per head, its number of hidden -> hidden layers (or one integer for all).
      head_output_sizes: per head, how many of its outputs to keep (None: all).
      activation: nonlinearity (default ELU), also applied to the trunk output.

    Example:
      >>> import implicit_vi as ivi
      >>> gen = ivi.MultiHeadMMGenerator((8, 8), ((16, 16), (8, 8)), ((4, 4), (4, 4)),
      ...                                ((16, 16), (8, 8)), ((20, 10), (5, 10)), (1, 1))
      >>> gen.output_size
      250

    References:
      Uppal et al., NeurIPS 2023, section 4.
    """

    noise_shape: tuple[int, int]
    trunk_shapes: tuple[tuple[int, int], tuple[int, int]]
    head_input_shapes: tuple[tuple[int, int], ...]
    head_hidden_shapes: tuple[tuple[int, int], ...]
    head_output_shapes: tuple[tuple[int, int], ...]
    head_n_hidden: tuple[int, ...]
    head_output_sizes: tuple[int, ...] | None = None
    activation: Callable[[Array], Array] = nn.elu

    def __post_init__(self):
        _normalise_multi_head(self)
        super().__post_init__()

    @property
    def num_heads(self) -> int:
        return len(self.head_output_shapes)

    @property
    def head_sizes(self) -> tuple[int, ...]:
        """Entries each head contributes to the output."""
        if self.head_output_sizes is not None:
            return self.head_output_sizes
        return tuple(math.prod(s) for s in self.head_output_shapes)

    @property
    def output_size(self) -> int:
        return sum(self.head_sizes)

    @property
    def num_params(self) -> int:
        trunk = _mm_layer_param_count(self.noise_shape, self.trunk_shapes[0])
        trunk += _mm_layer_param_count(*self.trunk_shapes)
        return trunk + sum(self.head(i, parent=None).num_params for i in range(self.num_heads))

    def head(self, i: int, **kwargs) -> MMGenerator:
        """Head i as an ``MMGenerator`` (its parameters are ``params[f"heads_{i}"]``)."""
        return MMGenerator(
            self.head_input_shapes[i],
            self.head_hidden_shapes[i],
            self.head_n_hidden[i],
            self.head_output_shapes[i],
            self.activation,
            **kwargs,
        )

    def setup(self):
        self.trunk = [MMLayer(shape, batch_in_middle=True) for shape in self.trunk_shapes]
        self.heads = [self.head(i) for i in range(self.num_heads)]

    def features(self, z: Array) -> tuple[Array, ...]:
        """Each head's last-layer input, in the (a, batch, b) layout."""
        _check_noise(z, self.noise_shape)
        h = _to_middle(z)
        for layer in self.trunk:
            h = self.activation(layer(h))
        flat = _flatten_middle(h)
        starts = np.cumsum([0] + [math.prod(s) for s in self.head_input_shapes])
        return tuple(
            head.features(flat[:, start:stop].reshape(-1, *shape))
            for head, shape, start, stop in zip(
                self.heads, self.head_input_shapes, starts[:-1], starts[1:]
            )
        )

    def readout(self, features: Sequence[Array]) -> Array:
        outputs = [
            head.readout(h)[:, :keep]
            for head, h, keep in zip(self.heads, features, self.head_sizes)
        ]
        return jnp.concatenate(outputs, axis=-1)

    def readout_gram(self, params: PyTree, segments: Segments) -> Callable:
        """``h -> L^T M L h`` for every head's last layer, on the tuple of head features."""
        grams, offset = [], 0
        for i, size in enumerate(self.head_sizes):
            local = [
                (max(start, offset) - offset, min(stop, offset + size) - offset, weight)
                for start, stop, weight in segments
                if start < offset + size and stop > offset
            ]
            grams.append(self.head(i, parent=None).readout_gram(params[f"heads_{i}"], local))
            offset += size
        return lambda features: tuple(gram(h) for gram, h in zip(grams, features))

    def __call__(self, z: Array) -> Array:
        return self.readout(self.features(z)).reshape(*z.shape[:-2], self.output_size)


class MLPGenerator(nn.Module):
    """A dense generator ``z (d,) -> (output_size,)`` for toy problems and small networks.

    Attributes:
      latent_dim: d.
      output_size: the number of generated parameters.
      hidden_sizes: widths of the hidden layers.
      activation: nonlinearity between layers (default ELU).

    Example:
      >>> import jax, jax.numpy as jnp, implicit_vi as ivi
      >>> gen = ivi.MLPGenerator(latent_dim=2, output_size=3, hidden_sizes=(8,))
      >>> variables = gen.init(jax.random.key(0), jnp.zeros(2))
      >>> gen.apply(variables, jnp.zeros((5, 2))).shape
      (5, 3)
    """

    latent_dim: int
    output_size: int
    hidden_sizes: tuple[int, ...] = (64, 64)
    activation: Callable[[Array], Array] = nn.elu

    def __post_init__(self):
        object.__setattr__(self, "latent_dim", _check_count("latent_dim", self.latent_dim))
        object.__setattr__(self, "output_size", _check_count("output_size", self.output_size))
        hidden = _check_shape("hidden_sizes", self.hidden_sizes, None) if self.hidden_sizes else ()
        object.__setattr__(self, "hidden_sizes", hidden)
        super().__post_init__()

    @property
    def noise_shape(self) -> tuple[int]:
        return (self.latent_dim,)

    @property
    def num_params(self) -> int:
        widths = (self.latent_dim, *self.hidden_sizes, self.output_size)
        return sum((i + 1) * o for i, o in itertools.pairwise(widths))

    def setup(self):
        self.hidden = [nn.Dense(width) for width in self.hidden_sizes]
        self.out = nn.Dense(self.output_size)

    def features(self, z: Array) -> Array:
        """The input of the last (dense) layer."""
        _check_noise(z, self.noise_shape)
        h = z
        for layer in self.hidden:
            h = self.activation(layer(h))
        return h

    def readout_gram(self, params: PyTree, segments: Segments) -> Callable[[Array], Array]:
        """``h -> L^T M L h`` for the last layer L and the output weighting ``segments``."""
        kernel = params["out"]["kernel"]  # (hidden, output)
        weights = np.zeros(kernel.shape[1])
        for start, stop, weight in segments:
            weights[start:stop] = weight
        gram = (kernel * jnp.asarray(weights, kernel.dtype)) @ kernel.T
        return lambda h: h @ gram

    def __call__(self, z: Array) -> Array:
        return self.out(self.features(z))


def _mm_readout_gram(w_left: Array, w_right: Array, segments: Segments) -> Callable:
    """``h -> L^T M L h`` for an MM readout ``Y = W_l H W_r + C`` and a diagonal M.

    M scales whole rows of Y except the few rows a segment boundary cuts, so
    ``L^T M L H = (W_l^T diag(mu) W_l) H (W_r W_r^T)`` plus a correction for the cut rows.
    """
    num_rows, num_cols = w_left.shape[0], w_right.shape[1]
    row_weight = np.zeros(num_rows)
    cut_rows: dict[int, np.ndarray] = {}
    for start, stop, weight in segments:
        for row in range(start // num_cols, -(-stop // num_cols)):
            lo, hi = max(start - row * num_cols, 0), min(stop - row * num_cols, num_cols)
            if lo == 0 and hi == num_cols:
                row_weight[row] = weight
            else:
                cut_rows.setdefault(row, np.zeros(num_cols))[lo:hi] = weight
    rows = sorted(cut_rows)
    dtype = w_left.dtype
    gram_left = w_left.T @ (jnp.asarray(row_weight, dtype)[:, None] * w_left)
    gram_right = w_right @ w_right.T
    w_cut = w_left[np.asarray(rows, dtype=int)]
    cut_weights = jnp.asarray(np.reshape([cut_rows[r] for r in rows], (len(rows), num_cols)), dtype)

    def apply(h: Array) -> Array:  # (a, batch, b) -> (a, batch, b)
        a, batch, b = h.shape
        out = (gram_left @ h.reshape(a, batch * b)).reshape(a * batch, b) @ gram_right
        out = out.reshape(a, batch, b)
        if rows:
            y_cut = jnp.einsum("ra,asb->rsb", w_cut, h) @ w_right * cut_weights[:, None, :]
            out = out + jnp.einsum("ra,rsb->asb", w_cut, y_cut @ w_right.T)
        return out

    return apply


def count_params(tree: PyTree) -> int:
    """Number of scalar entries in a pytree of arrays (e.g. a ``params`` dict).

    Example:
      >>> import jax.numpy as jnp, implicit_vi as ivi
      >>> ivi.count_params({"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)})
      8
    """
    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


# ----- configurations: the published generator files -------------------------------------------

_CONFIG_MAPPINGS = ("input shapes", "output shapes", "hidden shapes", "numbers of hidden layers")
_CONFIG_FORM = (
    "a list of four mappings: input shapes {noise_input: [a, b], gen1: [a, b], ...}, output "
    "shapes {gen1: [a, b], ...}, hidden shapes {gen1: [a, b], ...} (optionally with "
    "second_layer: [[a1, b1], [a2, b2]]), numbers of hidden layers {gen1: n, ...}"
)


def _shape_list(name: str, value: Any) -> tuple[tuple[int, ...], ...]:
    try:
        value = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a list of matrix shapes, got {value!r}") from None
    if not value:
        raise ValueError(f"{name} must list at least one head, got {value!r}")
    return tuple(_check_shape(f"{name}[{i}]", s) for i, s in enumerate(value))


def _normalise_multi_head(gen: MultiHeadMMGenerator) -> None:
    """Checks a multi-head generator's configuration and stores it as tuples of integers."""

    def store(name, value):
        object.__setattr__(gen, name, value)

    _set_shapes(gen, "noise_shape")
    try:
        trunk_shapes = tuple(gen.trunk_shapes)
    except TypeError:
        trunk_shapes = ()
    if len(trunk_shapes) != 2:
        raise ValueError(f"trunk_shapes must be two matrix shapes, got {trunk_shapes!r}")
    store(
        "trunk_shapes", tuple(_check_shape(f"trunk_shapes[{i}]", trunk_shapes[i]) for i in (0, 1))
    )
    for name in ("head_input_shapes", "head_hidden_shapes", "head_output_shapes"):
        store(name, _shape_list(name, getattr(gen, name)))
    num_heads = len(gen.head_output_shapes)
    n_hidden = gen.head_n_hidden
    if isinstance(n_hidden, (int, np.integer)) and not isinstance(n_hidden, bool):
        n_hidden = (n_hidden,) * num_heads
    try:
        store(
            "head_n_hidden",
            tuple(_check_count(f"head_n_hidden[{i}]", n, 0) for i, n in enumerate(n_hidden)),
        )
    except TypeError:
        raise ValueError(
            f"head_n_hidden must be an integer or one per head, got {n_hidden!r}"
        ) from None
    for name in ("head_input_shapes", "head_hidden_shapes", "head_n_hidden"):
        if len(getattr(gen, name)) != num_heads:
            raise ValueError(
                f"{name} has {len(getattr(gen, name))} entries but head_output_shapes has "
                f"{num_heads}: every head needs an input shape, a hidden shape, an output shape "
                "and n_hidden"
            )
    trunk_size = math.prod(gen.trunk_shapes[1])
    needed = sum(math.prod(s) for s in gen.head_input_shapes)
    if needed > trunk_size:
        raise ValueError(
            f"head_input_shapes need {needed} trunk outputs in total but trunk_shapes[1] = "
            f"{gen.trunk_shapes[1]} provides only {trunk_size}"
        )
    if gen.head_output_sizes is None:
        return
    sizes = tuple(
        _check_count(f"head_output_sizes[{i}]", n) for i, n in enumerate(gen.head_output_sizes)
    )
    if len(sizes) != num_heads:
        raise ValueError(f"head_output_sizes must have one entry per head ({num_heads})")
    for i, (n, shape) in enumerate(zip(sizes, gen.head_output_shapes)):
        if n > math.prod(shape):
            raise ValueError(
                f"head_output_sizes[{i}] = {n} exceeds the head's output {shape} "
                f"({math.prod(shape)} entries)"
            )
    store("head_output_sizes", sizes)


def _short_repr(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _head_number(where: str, key: Any, also_accepted: str = "") -> int:
    """K for a head key ``"genK"`` (K >= 1, no leading zeros); a clear error otherwise."""
    digits = key[3:] if isinstance(key, str) and key.startswith("gen") else ""
    if digits.isdigit() and digits.isascii() and not digits.startswith("0"):
        return int(digits)
    raise ValueError(
        f"{where}: unknown key {key!r}; the accepted keys are {also_accepted}gen1, gen2, ... "
        "(one per head)"
    )


def _trunk_from(name: str, value: Any, allow_empty: bool = False) -> tuple[tuple[int, int], ...]:
    try:
        shapes = tuple(value)
    except TypeError:
        shapes = None
    if shapes is None or (len(shapes) != 2 and not (allow_empty and not shapes)):
        accepted = " (or [] for no trunk)" if allow_empty else ""
        raise ValueError(
            f"{name} must be two matrix shapes [[a1, b1], [a2, b2]]{accepted}, got "
            f"{_short_repr(value)}"
        )
    return tuple(_check_shape(f"{name}[{i}]", s) for i, s in enumerate(shapes))


def generator_from_config(
    config: Sequence[Mapping[str, Any]],
    *,
    trunk_shapes: Sequence[Sequence[int]] | None = None,
    activation: Callable[[Array], Array] = nn.elu,
) -> nn.Module:
    """Builds an MM generator from a configuration file in the paper's published layout.

    The layout (``yaml.safe_load(open(path))`` returns it) is a list of four mappings:

    1. input shapes: ``noise_input: [a, b]`` (the noise matrix) and one ``genK: [a, b]`` per
       head, the shape of the head's input;
    2. output shapes: ``genK: [a, b]``, each head's output matrix;
    3. hidden shapes: ``genK: [a, b]``, each head's hidden matrices, and optionally
       ``second_layer: [[a1, b1], [a2, b2]]``, the shared trunk: an MM layer noise -> (a1, b1)
       and one (a1, b1) -> (a2, b2), each followed by the activation;
    4. numbers of hidden layers: ``genK: n``, each head's hidden -> hidden layers.

    Heads run in the order of K (gen2 before gen10). The trunk's output is flattened row-major
    and cut into consecutive chunks, head K's chunk reshaped to its input shape; the heads'
    flattened outputs are concatenated. Files without ``second_layer`` were written for code
    whose trunk was fixed in the source: pass that trunk as ``trunk_shapes``, or
    ``trunk_shapes=[]`` for a single head ``gen1`` that reads the noise itself (input shape =
    ``noise_input``), which is a plain ``MMGenerator``.

    Args:
      config: the four mappings.
      trunk_shapes: the trunk's two output shapes, for files without ``second_layer`` only;
        ``[]``: no trunk (a single head).
      activation: nonlinearity between layers (default ELU).

    Returns:
      A ``MultiHeadMMGenerator`` (or an ``MMGenerator`` without trunk) whose ``num_params``
      is the published generator's parameter count.

    Raises:
      ValueError: naming the malformed entry (a missing or unknown key, a bad shape or count,
        a head without an entry in every mapping, a missing trunk, a trunk too small for the
        heads' inputs) and the accepted form.

    Example (two heads; in a file this is four YAML mappings, ``- noise_input: [8, 8] ...``):
      >>> import implicit_vi as ivi
      >>> config = [
      ...     {"noise_input": [8, 8], "gen1": [4, 8], "gen2": [4, 8]},
      ...     {"gen1": [20, 10], "gen2": [5, 10]},
      ...     {"gen1": [16, 16], "gen2": [8, 8], "second_layer": [[16, 16], [8, 8]]},
      ...     {"gen1": 1, "gen2": 1},
      ... ]
      >>> gen = ivi.generator_from_config(config)
      >>> gen.output_size, gen.num_params
      (250, 4378)

    References:
      Uppal et al., NeurIPS 2023, section 4 and appendix (generator configurations).
    """
    if (
        isinstance(config, (str, bytes, Mapping))
        or not isinstance(config, Sequence)
        or len(config) != 4
        or not all(isinstance(part, Mapping) for part in config)
    ):
        raise ValueError(
            f"config must be the published layout, {_CONFIG_FORM} (as yaml.safe_load reads "
            f"the file), got {_short_repr(config)}"
        )
    where = [f"config[{i}] ({name})" for i, name in enumerate(_CONFIG_MAPPINGS)]
    inputs, _, hidden, n_hidden = config
    if "noise_input" not in inputs:
        raise ValueError(f"{where[0]} has no noise_input: [a, b], the noise matrix's shape")
    heads = [key for key in inputs if key != "noise_input"]
    heads.sort(key=lambda key: _head_number(where[0], key, "noise_input, "))
    if not heads:
        raise ValueError(f"{where[0]} names no head: add gen1: [a, b], the first head's input")
    for i, mapping in enumerate(config[1:], start=1):
        extra = "second_layer" if i == 2 else None
        for key in mapping:
            if key != extra and key not in heads:
                _head_number(where[i], key, "second_layer, " if extra else "")
                raise ValueError(
                    f"{where[i]} has {key!r} but {where[0]} has no input shape for it: every "
                    "head genK needs an entry in each of the four mappings"
                )
        missing = [key for key in heads if key not in mapping]
        if missing:
            raise ValueError(
                f"{where[i]} has no entry for {missing}: every head genK needs an entry in "
                "each of the four mappings"
            )

    def shapes(i: int) -> tuple[tuple[int, ...], ...]:
        return tuple(_check_shape(f"{where[i]}[{key!r}]", config[i][key]) for key in heads)

    noise_shape = _check_shape(f"{where[0]}['noise_input']", inputs["noise_input"])
    input_shapes, output_shapes, hidden_shapes = shapes(0), shapes(1), shapes(2)
    counts = tuple(_check_count(f"{where[3]}[{key!r}]", n_hidden[key], 0) for key in heads)

    if "second_layer" in hidden:
        if trunk_shapes is not None:
            raise ValueError(
                f"{where[2]} defines the trunk (second_layer); trunk_shapes is for files "
                "without it and must be left out"
            )
        trunk = _trunk_from(f"{where[2]}['second_layer']", hidden["second_layer"])
    elif trunk_shapes is None:
        raise ValueError(
            f"{where[2]} has no second_layer: the file was written for code whose shared trunk "
            "was fixed in the source. Pass the trunk as generator_from_config(config, "
            "trunk_shapes=[[a1, b1], [a2, b2]]) (MM layers noise -> [a1, b1] -> [a2, b2]), or "
            "trunk_shapes=[] for a single head gen1 that reads the noise itself"
        )
    else:
        trunk = _trunk_from("trunk_shapes", trunk_shapes, allow_empty=True)

    if not trunk:
        if len(heads) != 1 or input_shapes[0] != noise_shape:
            raise ValueError(
                "trunk_shapes=[] (no trunk) needs a single head gen1 whose input shape equals "
                f"noise_input {list(noise_shape)}; got heads {heads} with input shapes "
                f"{[list(s) for s in input_shapes]}"
            )
        return MMGenerator(noise_shape, hidden_shapes[0], counts[0], output_shapes[0], activation)
    available = math.prod(trunk[1])
    needed = sum(math.prod(s) for s in input_shapes)
    if needed > available:
        raise ValueError(
            f"{where[0]}: the heads' input shapes take {needed} trunk outputs but the trunk's "
            f"output {list(trunk[1])} has only {available}"
        )
    return MultiHeadMMGenerator(
        noise_shape, trunk, input_shapes, hidden_shapes, output_shapes, counts, None, activation
    )


# ----- 3. Any model becomes Bayesian: the flat vector theta and the model's pytree ------------


def _path_name(key_path) -> str:
    name = jax.tree_util.keystr(key_path, simple=True, separator="/")
    # nnx.State leaves are the `value` of a Variable: drop it so names read like linen paths.
    return name.removesuffix("/value")


def _module_of(path: str) -> str:
    return path.rsplit("/", 1)[0]


@dataclasses.dataclass(frozen=True, eq=False)
class ParameterLayout:
    """How a flat vector theta of stochastic parameters maps onto a model's parameter pytree.

    The stochastic leaves, in the pytree's flattening order, are consecutive slices of theta
    (each raveled row-major); the other leaves are deterministic.

    Attributes:
      treedef: the pytree structure (a linen ``params`` dict, an ``nnx.State``, ...).
      paths: one "/"-joined name per leaf, e.g. ``"Dense_0/kernel"``.
      shapes, dtypes: per leaf.
      stochastic: per leaf, whether the generator produces it.
      offsets: where each stochastic leaf starts in theta, followed by D.

    Example:
      >>> import jax.numpy as jnp, implicit_vi as ivi
      >>> params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
      >>> layout = ivi.ParameterLayout.from_params(params, lambda path, _: path.endswith("kernel"))
      >>> layout.paths, layout.offsets
      (('Dense_0/bias', 'Dense_0/kernel'), (0, 6))
      >>> layout.assemble(jnp.arange(6.0), layout.deterministic_values(params))["Dense_0"]["kernel"]
      Array([[0., 1., 2.],
             [3., 4., 5.]], dtype=float32)
    """

    treedef: Any
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    stochastic: tuple[bool, ...]
    offsets: tuple[int, ...]

    @classmethod
    def from_params(cls, params: PyTree, stochastic: Any = None) -> ParameterLayout:
        """Builds the layout of ``params`` (only its shapes and dtypes are read).

        Args:
          params: the model's parameter pytree.
          stochastic: which leaves the generator produces: None (all), a callable
            ``(path: str, leaf) -> bool`` (e.g. ``lambda path, _: path.startswith("Dense_2")``),
            or a pytree of booleans with the structure of ``params``.
        """
        with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
        if not with_path:
            raise ValueError("params has no array leaves")
        paths = tuple(_path_name(p) for p, _ in with_path)
        leaves = [leaf for _, leaf in with_path]
        dtypes = tuple(jnp.result_type(leaf) for leaf in leaves)
        for path, dtype in zip(paths, dtypes):
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(
                    f"params leaf {path!r} has dtype {dtype}; only floating leaves are supported"
                )
        if stochastic is None:
            mask = [True] * len(leaves)
        elif callable(stochastic):
            mask = [bool(stochastic(path, leaf)) for path, leaf in zip(paths, leaves)]
        else:
            try:
                mask = [bool(m) for m in treedef.flatten_up_to(stochastic)]
            except (ValueError, TypeError) as error:
                raise ValueError(
                    "stochastic must be None, a callable (path, leaf) -> bool, or a pytree of "
                    f"booleans with the structure of params: {error}"
                ) from None
        if not any(mask):
            raise ValueError(
                "stochastic selects no parameter; at least one leaf must be stochastic"
            )
        shapes = tuple(tuple(np.shape(leaf)) for leaf in leaves)
        sizes = [math.prod(s) for s, is_stochastic in zip(shapes, mask) if is_stochastic]
        offsets = tuple(int(n) for n in np.cumsum([0, *sizes]))
        return cls(treedef, paths, shapes, dtypes, tuple(mask), offsets)

    @property
    def num_params(self) -> int:
        """All parameters of the model."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def num_stochastic(self) -> int:
        """D: the parameters produced by the generator."""
        return self.offsets[-1]

    @property
    def stochastic_paths(self) -> tuple[str, ...]:
        return tuple(p for p, s in zip(self.paths, self.stochastic) if s)

    def deterministic_values(self, params: PyTree) -> dict[str, Array]:
        """The deterministic leaves of ``params``, keyed by path."""
        leaves = self.treedef.flatten_up_to(params)
        return {p: jnp.asarray(v) for p, v, s in zip(self.paths, leaves, self.stochastic) if not s}

    def stochastic_leaves(self, params: PyTree) -> list[Array]:
        leaves = self.treedef.flatten_up_to(params)
        return [v for v, s in zip(leaves, self.stochastic) if s]

    def assemble(self, theta: Array, deterministic: Mapping[str, Array]) -> PyTree:
        """The parameter pytree (structure, shapes and dtypes of the template) from theta (D,)
        and the deterministic leaves by path."""
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


@dataclasses.dataclass(frozen=True)
class GeneratorReport:
    """Sizes of a generator against the network it generates (``str()`` gives a table)."""

    generator_params: int
    network_params: int
    stochastic_params: int
    generator_output: int
    latent_dim: int
    heads: tuple[tuple[str, tuple[int, int], int], ...] = ()

    @property
    def ratio(self) -> float:
        return self.generator_params / max(self.stochastic_params, 1)

    def __str__(self) -> str:
        lines = [
            f"latent dimension d            {self.latent_dim:>12,}",
            f"network parameters            {self.network_params:>12,}",
            f"stochastic parameters D       {self.stochastic_params:>12,}",
            f"generator output              {self.generator_output:>12,}",
            f"generator parameters          {self.generator_params:>12,}  ({self.ratio:.2f} x D)",
        ]
        for name, shape, size in self.heads:
            lines.append(f"  head {name:<30} output {shape[0]:>6} x {shape[1]:<6} covers {size:,}")
        return "\n".join(lines)


def auto_generator(
    layout: ParameterLayout | PyTree,
    *,
    noise_shape: Sequence[int] | None = None,
    trunk_shape: Sequence[int] | None = None,
    head_input_shape: Sequence[int] | None = None,
    head_hidden: int = 64,
    head_n_hidden: int = 1,
    activation: Callable[[Array], Array] = nn.elu,
) -> MultiHeadMMGenerator:
    """A multi-head MM generator sized for a parameter pytree: one head per module.

    The stochastic leaves are grouped by module (a Dense kernel and its bias form one group).
    A group whose leaves share a last dimension n, at least 4 and at least the head input's
    columns, gets an output matrix of exactly (group size / n) x n (for a Dense layer: one row
    per input unit, one for the bias); others (e.g. a 10-class readout) get the smallest
    near-square matrix covering them. Each head's hidden shape is
    its output shape clipped to [8, head_hidden], and at least its input shape. The output
    has exactly D entries, in the layout's order.

    The defaults keep the Jacobian dg/dz able to reach full rank d (docs/implicit_vi.md,
    "Choosing the posterior's spread"): each head's input chunk has twice the noise's rows
    (a square map from z would have tiny singular values), each hidden matrix is at least as
    large on each side and no output matrix is narrower, so no layer squeezes the d latent
    directions through fewer features. A rank-deficient Jacobian puts the smallest singular
    value at zero, where the ``"smallest_sv"`` entropy bound is flat: no gradient keeps the
    posterior spread.

    Args:
      layout: a ``ParameterLayout`` or a parameter pytree (all leaves stochastic).
      noise_shape: latent noise matrix; default (k, k), k = clip(round(sqrt(D) / 2), 2, 16).
      trunk_shape: output shape of the trunk's first layer; default (2k, 2k).
      head_input_shape: shape of each head's input chunk; default (2a, b) for noise (a, b).
      head_hidden: cap on each side of the heads' hidden matrices (unless the input is larger).
      head_n_hidden: hidden -> hidden layers per head.
      activation: nonlinearity.

    Returns:
      A ``MultiHeadMMGenerator``.

    Example:
      >>> import jax.numpy as jnp, implicit_vi as ivi
      >>> params = {"Dense_0": {"kernel": jnp.zeros((784, 400)), "bias": jnp.zeros(400)},
      ...           "Dense_1": {"kernel": jnp.zeros((400, 10)), "bias": jnp.zeros(10)}}
      >>> ivi.auto_generator(params).head_output_shapes  # 401 x 10 = 4,010 -> 63 x 64
      ((785, 400), (63, 64))
    """
    if not isinstance(layout, ParameterLayout):
        layout = ParameterLayout.from_params(layout)
    side = min(16, max(2, round(math.sqrt(layout.num_stochastic) / 2)))
    noise_shape = _check_shape("noise_shape", noise_shape or (side, side))
    trunk_shape = _check_shape("trunk_shape", trunk_shape or (2 * side, 2 * side))
    # Twice the noise's rows: a square map from z to a head's input has tiny singular values.
    head_input_shape = _check_shape(
        "head_input_shape", head_input_shape or (2 * noise_shape[0], noise_shape[1])
    )
    head_hidden = _check_count("head_hidden", head_hidden)
    head_n_hidden = _check_count("head_n_hidden", head_n_hidden, 0)
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
    num_heads = len(groups)
    return MultiHeadMMGenerator(
        noise_shape=noise_shape,
        trunk_shapes=(trunk_shape, (num_heads * head_input_shape[0], head_input_shape[1])),
        head_input_shapes=(head_input_shape,) * num_heads,
        head_hidden_shapes=tuple(
            tuple(
                max(n_in, min(8, head_hidden), min(n, head_hidden))
                for n, n_in in zip(shape, head_input_shape)
            )
            for shape in output_shapes
        ),
        head_output_shapes=tuple(output_shapes),
        head_n_hidden=(head_n_hidden,) * num_heads,
        head_output_sizes=tuple(output_sizes),
        activation=activation,
    )


# ----- 4. Likelihoods: `init() -> params` (a possibly empty dict of trained parameters) and
# `log_prob(params, outputs, targets)`, the per-example log-likelihoods (B,) of a minibatch.


@dataclasses.dataclass(frozen=True)
class Categorical:
    """Classification: ``log softmax(logits)[label]`` per example, for integer labels (B,).

    Example:
      >>> import jax.numpy as jnp, implicit_vi as ivi
      >>> ivi.Categorical().log_prob({}, jnp.zeros((1, 4)), jnp.array([2]))
      Array([-1.3862944], dtype=float32)
    """

    def init(self) -> dict:
        return {}

    def log_prob(self, params: dict, logits: Array, labels: Array) -> Array:
        log_probs = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
        return jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


@dataclasses.dataclass(frozen=True)
class Gaussian:
    """Regression: ``log N(y | f(x), noise_std^2)`` per example (summed over output dims).

    Attributes:
      noise_std: the observation noise standard deviation (> 0), or its initial value.
      learn_noise: train ``log(noise_std)`` alongside the generator
        (``vi_params.likelihood["log_noise_std"]``).

    Example:
      >>> import jax.numpy as jnp, implicit_vi as ivi
      >>> ivi.Gaussian(noise_std=1.0).log_prob({}, jnp.zeros((1, 1)), jnp.zeros(1))
      Array([-0.9189385], dtype=float32)
    """

    noise_std: float = 1.0
    learn_noise: bool = False

    def __post_init__(self):
        object.__setattr__(self, "noise_std", _check_positive("noise_std", self.noise_std))

    def init(self) -> dict:
        return {"log_noise_std": jnp.asarray(math.log(self.noise_std))} if self.learn_noise else {}

    def noise_variance(self, params: dict) -> Array:
        if self.learn_noise:
            return jnp.exp(2.0 * params["log_noise_std"])
        return jnp.asarray(self.noise_std**2)

    def log_prob(self, params: dict, outputs: Array, targets: Array) -> Array:
        outputs = outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32))
        if targets.shape == outputs.shape[:-1] and outputs.shape[-1] == 1:
            targets = targets[..., None]
        if targets.shape != outputs.shape:
            raise ValueError(
                f"targets of shape {targets.shape} do not match model outputs of shape "
                f"{outputs.shape}"
            )
        variance = self.noise_variance(params)
        log_density = -0.5 * (
            jnp.square(targets - outputs) / variance + jnp.log(2 * math.pi * variance)
        )
        return log_density.reshape(log_density.shape[0], -1).sum(-1)


# ----- 5. The Bayesian network as pure functions: an ImplicitModel (fixed) and VIParams ------


class ImplicitModel(NamedTuple):
    """Everything fixed about an implicit Bayesian network; build it with ``make_model``.

    Stochastic leaf l is ``theta_l = shift_l + scale_l * g_l(z) + sigma eps`` with fixed
    per-leaf scalars; the entropy and prior are those of theta. With ``learn_sigma`` the
    output noise is ``s * eps`` with one learned std per parameter,
    ``s = exp(vi_params.output_noise["log_std"])``. Close over the model
    (``functools.partial``) rather than passing it to ``jax.jit``.

    Attributes:
      apply_fn: ``apply_fn(params, x) -> outputs`` for the network.
      generator: a Flax generator with a ``noise_shape`` attribute.
      layout: the ``ParameterLayout``.
      likelihood: ``Categorical()``, ``Gaussian(...)`` or an object with the same two methods.
      output_scales, output_shifts: the fixed per-leaf affine map of the generator output.
      sigma: output noise std (with ``learn_sigma``: its initial value, a float or one per
        stochastic leaf).
      prior_std: std of the Gaussian prior N(0, prior_std^2 I) on theta: a float, or one per
        stochastic leaf.
      deterministic_init: initial values of the deterministic leaves, keyed by path.
      learn_sigma: whether the output noise std is learned, one per stochastic parameter.
    """

    apply_fn: Callable[[PyTree, Any], Array]
    generator: nn.Module
    layout: ParameterLayout
    likelihood: Any
    output_scales: tuple[float, ...]
    output_shifts: tuple[float, ...]
    sigma: float | tuple[float, ...]
    prior_std: float | tuple[float, ...]
    deterministic_init: Mapping[str, Array]
    learn_sigma: bool = False

    @property
    def latent_dim(self) -> int:
        return math.prod(self.generator.noise_shape)


class VIParams(NamedTuple):
    """The trained quantities (an Optax optimizer trains them all together).

    Attributes:
      generator: the generator's parameters gamma.
      deterministic: point estimates of the non-stochastic leaves, keyed by path.
      likelihood: the likelihood's parameters (e.g. ``{"log_noise_std": ...}``).
      output_noise: ``{"log_std": (D,) array}``, the log of each stochastic parameter's output
        noise std, for a model with ``learn_sigma``; ``{}`` for a fixed sigma.
    """

    generator: PyTree
    deterministic: dict[str, Array]
    likelihood: dict
    output_noise: dict = {}  # noqa: RUF012 (never mutated; a NamedTuple default)


def _abstract_generator(generator: nn.Module) -> tuple[PyTree, Any]:
    """Shapes of the generator's variables and of its output for one noise sample."""
    noise = jnp.zeros((1, *generator.noise_shape))
    variables = jax.eval_shape(generator.init, jax.random.key(0), noise)
    return variables, jax.eval_shape(generator.apply, variables, noise)


def make_model(
    apply_fn: Callable[[PyTree, Any], Array],
    params: PyTree,
    *,
    likelihood: Any = Categorical(),
    generator: nn.Module | None = None,
    stochastic: Any = None,
    sigma: float | str = 1e-3,
    learn_sigma: bool = False,
    prior_std: float | str = 1.0,
    output_scale: str | None = "auto",
    key: Array | None = None,
    **auto_generator_kwargs,
) -> ImplicitModel:
    """Makes the network ``apply_fn(params, x)`` Bayesian.

    With ``output_scale="auto"`` each stochastic leaf is ``shift_l + scale_l * g_l(z)``, the
    scalars chosen so that the initial generator's samples have the mean and std of the
    template leaf (a constant leaf, such as a zero bias, takes the largest std of the other
    leaves of its module); docs/implicit_vi.md, section 6. With None theta is the raw
    generator output, as in the paper.

    Args:
      apply_fn: ``apply_fn(params, x) -> outputs``; params has the structure of ``params``.
      params: a template parameter pytree (linen ``params`` dict, ``nnx.State``, ...): the
        shapes and dtypes, the initial deterministic leaves, the scale of the stochastic ones.
      likelihood: ``Categorical()`` (default), ``Gaussian(noise_std, learn_noise)``, or any
        object with ``init()`` and ``log_prob(params, outputs, targets)``.
      generator: a Flax module with a ``noise_shape`` attribute returning at least D outputs
        per noise sample; with ``features`` and ``readout_gram`` methods it gets the fast J^T J
        product. None: ``auto_generator``.
      stochastic: which leaves are stochastic (see ``ParameterLayout.from_params``); the
        others are trained as point estimates in the same optimisation.
      sigma: output noise std (> 0), 1e-3 as in the paper. Keep it below about a tenth of
        the smallest layer's initial weight std: the ELBO grows with sigma through
        (D - d) log sigma even as the predictions get worse, so it cannot choose sigma
        (docs/implicit_vi.md, "Choosing the posterior's spread").
        With ``learn_sigma`` it is the noise's initial value, and ``"auto"`` starts each
        leaf at ``AUTO_NOISE_FRACTION`` (a tenth) of its initial std.
      learn_sigma: learn one output noise std per stochastic parameter, initialised at
        ``sigma``, as part of the ELBO: q becomes ``g(z) + s * eps`` and the entropy gains
        ``sum_i log s_i`` (docs/implicit_vi.md, "Learned output noise"). The noise then
        spreads the posterior along the directions the data leave free, which a rank-d
        generator with a tiny fixed sigma cannot cover; the ELBO, not the user, chooses s.
      prior_std: std of the Gaussian prior (> 0), or ``"auto"``: per leaf, the template
        leaf's initial std (a zero bias takes its kernel's), i.e. the scale a network of
        any width is initialised at (docs/implicit_vi.md, "Calibrated posteriors").
      output_scale: ``"auto"`` or None.
      key: PRNG key of the calibration (default ``jax.random.key(0)``); ``init_vi_params``
        with the same key gives the calibrated generator.
      **auto_generator_kwargs: for ``auto_generator`` when ``generator`` is None, e.g.
        ``noise_shape=(6, 6)``.

    Returns:
      The ``ImplicitModel``.

    Example:
      >>> import jax, jax.numpy as jnp, implicit_vi as ivi
      >>> model = ivi.make_model(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))},
      ...                        generator=ivi.MLPGenerator(2, 6, (4,)))
      >>> model.layout.num_stochastic, model.latent_dim
      (6, 2)
    """
    if not isinstance(learn_sigma, bool | np.bool_):
        raise ValueError(f"learn_sigma must be True or False, got {learn_sigma!r}")
    if sigma == "auto":
        if not learn_sigma:
            raise ValueError(
                "sigma='auto' (a tenth of each leaf's initial std) needs learn_sigma=True; a "
                "fixed sigma must be a number > 0"
            )
    else:
        sigma = _check_positive("sigma", sigma)
    if prior_std != "auto":
        prior_std = _check_positive("prior_std", prior_std)
    if not (hasattr(likelihood, "init") and hasattr(likelihood, "log_prob")):
        raise ValueError(
            "likelihood must have init() and log_prob(params, outputs, targets) methods, e.g. "
            f"Categorical() or Gaussian(noise_std), got {likelihood!r}"
        )
    if output_scale not in ("auto", None):
        raise ValueError(f"output_scale must be 'auto' or None, got {output_scale!r}")
    layout = ParameterLayout.from_params(params, stochastic)
    if generator is None:
        generator = auto_generator(layout, **auto_generator_kwargs)
    elif auto_generator_kwargs:
        raise ValueError(
            f"{sorted(auto_generator_kwargs)} configure the automatic generator and cannot be "
            "combined with an explicit generator"
        )
    if not hasattr(generator, "noise_shape"):
        raise ValueError("generator must have a noise_shape attribute (its latent input shape)")
    _, output = _abstract_generator(generator)
    if output.ndim != 2:
        raise ValueError(
            "generator must return a flat vector per noise sample (batch, output_size), got "
            f"shape {output.shape} for a batch of one"
        )
    if output.shape[1] < layout.num_stochastic:
        raise ValueError(
            f"generator output has {output.shape[1]:,} entries but the model has "
            f"{layout.num_stochastic:,} stochastic parameters: the generator's output must "
            "cover them (e.g. a larger output_shape)"
        )
    num_leaves = len(layout.offsets) - 1
    scales, shifts = (1.0,) * num_leaves, (0.0,) * num_leaves
    if output_scale == "auto":
        key = jax.random.key(0) if key is None else key
        scales, shifts = _calibrate_output(generator, layout, params, key)
    if "auto" in (sigma, prior_std):
        leaf_stds = _leaf_scales(layout, params)[1]
        if sigma == "auto":
            sigma = tuple(float(AUTO_NOISE_FRACTION * s) for s in leaf_stds)
        if prior_std == "auto":
            prior_std = tuple(float(s) for s in leaf_stds)
    deterministic = layout.deterministic_values(params)
    return ImplicitModel(
        apply_fn,
        generator,
        layout,
        likelihood,
        scales,
        shifts,
        sigma,
        prior_std,
        deterministic,
        bool(learn_sigma),
    )


# Jitted with the (hashable) generator static, so that equal generators share one compilation.
@partial(jax.jit, static_argnums=0)
def _init_generator(generator: nn.Module, key: Array) -> PyTree:
    return generator.init(key, jnp.zeros(generator.noise_shape))["params"]


_apply_generator = jax.jit(lambda generator, *args: generator.apply(*args), static_argnums=0)


def _leaf_scales(layout: ParameterLayout, params: PyTree) -> tuple[np.ndarray, np.ndarray]:
    """Per stochastic leaf of the template: its mean and its initial std, where a constant
    leaf (a zero bias, a LayerNorm scale) takes the largest std of the other leaves of its
    module, or the median std of all leaves when its module has none."""
    templates = [np.asarray(leaf, dtype=np.float64) for leaf in layout.stochastic_leaves(params)]
    target_mean = np.array([t.mean() for t in templates])
    target_std = np.array([t.std() for t in templates])
    modules = [_module_of(p) for p in layout.stochastic_paths]
    random = target_std > 1e-12 * np.maximum(1.0, np.abs(target_mean))
    median_std = float(np.median(target_std[random])) if random.any() else 1.0
    filled = target_std.copy()
    for i in np.flatnonzero(~random):
        siblings = [s for s, m, r in zip(target_std, modules, random) if m == modules[i] and r]
        filled[i] = max(siblings, default=median_std)
    return target_mean, filled


def _calibrate_output(generator, layout, params, key, num_draws: int = 16):
    """Per-leaf (scale, shift) giving the initial generator's samples the template's moments."""
    variables = {"params": _init_generator(generator, key)}
    zs = jax.random.normal(jax.random.fold_in(key, 1), (num_draws, 1, *generator.noise_shape))
    leaves = list(itertools.pairwise(layout.offsets))
    moments = np.empty((num_draws, len(leaves), 2))
    for draw, z in enumerate(zs):  # one at a time: memory for a single generator output
        raw = np.asarray(_apply_generator(generator, variables, z)[0], dtype=np.float64)
        moments[draw] = [(raw[start:stop].mean(), raw[start:stop].var()) for start, stop in leaves]
    # Pooled over draws: total variance = mean within-draw variance + variance of the means.
    raw_mean = moments[:, :, 0].mean(0)
    raw_std = np.sqrt(moments[:, :, 1].mean(0) + moments[:, :, 0].var(0))
    target_mean, target_std = _leaf_scales(layout, params)
    scales = target_std / np.where(raw_std > 1e-12, raw_std, 1.0)
    shifts = target_mean - scales * raw_mean
    return tuple(float(s) for s in scales), tuple(float(s) for s in shifts)


def init_vi_params(model: ImplicitModel, key: Array) -> VIParams:
    """Initial variational parameters: a fresh generator, the template's other leaves.

    Example:
      >>> import jax, jax.numpy as jnp, implicit_vi as ivi
      >>> model = ivi.make_model(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))},
      ...                        generator=ivi.MLPGenerator(2, 6, (4,)))
      >>> vi_params = ivi.init_vi_params(model, jax.random.key(0))
      >>> vi_params.deterministic, vi_params.likelihood
      ({}, {})
    """
    generator = _init_generator(model.generator, key)
    output_noise = {}
    if model.learn_sigma:
        dtype = jax.tree_util.tree_leaves(generator)[0].dtype
        sizes = np.diff(model.layout.offsets)
        log_std = np.repeat(np.log(np.broadcast_to(model.sigma, sizes.shape)), sizes)
        output_noise = {"log_std": jnp.asarray(log_std, dtype)}
    return VIParams(
        generator=generator,
        deterministic=dict(model.deterministic_init),
        likelihood=model.likelihood.init(),
        output_noise=output_noise,
    )


def generator_report(model: ImplicitModel) -> GeneratorReport:
    """The generator's size against the network's (``print(...)`` shows a table).

    Example:
      >>> import jax.numpy as jnp, implicit_vi as ivi
      >>> model = ivi.make_model(lambda p, x: x @ p["w"], {"w": jnp.ones((30, 20))},
      ...                        output_scale=None)
      >>> report = ivi.generator_report(model)
      >>> report.stochastic_params, report.latent_dim
      (600, 144)
    """
    generator = model.generator
    variables, output = _abstract_generator(generator)
    shapes = getattr(generator, "head_output_shapes", ())
    heads = tuple(
        (str(i), shape, size)
        for i, (shape, size) in enumerate(zip(shapes, getattr(generator, "head_sizes", ())))
    )
    return GeneratorReport(
        generator_params=count_params(variables),
        network_params=model.layout.num_params,
        stochastic_params=model.layout.num_stochastic,
        generator_output=int(output.shape[-1]),
        latent_dim=model.latent_dim,
        heads=heads,
    )


def generator_mean(model: ImplicitModel, gen_params: PyTree, z: Array) -> Array:
    """g(z): the means (S, D) of the stochastic parameters for flat latents z (S, d).

    The generator's raw output with the model's per-leaf scale and shift; use
    ``partial(generator_mean, model)`` as the ``mean_fn`` of the entropy functions.

    Example:
      >>> import jax, jax.numpy as jnp, implicit_vi as ivi
      >>> model = ivi.make_model(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))},
      ...                        generator=ivi.MLPGenerator(2, 6, (4,)))
      >>> vi_params = ivi.init_vi_params(model, jax.random.key(0))
      >>> ivi.generator_mean(model, vi_params.generator, jnp.zeros((5, 2))).shape
      (5, 6)
    """
    noise = z.reshape(z.shape[0], *model.generator.noise_shape)
    return _scale_output(model, model.generator.apply({"params": gen_params}, noise))


def _scale_output(model: ImplicitModel, raw: Array) -> Array:
    """The model's per-leaf scale and shift applied to raw generator outputs (S, >= D)."""
    pieces = []
    for (start, stop), scale, shift in zip(
        itertools.pairwise(model.layout.offsets), model.output_scales, model.output_shifts
    ):
        piece = raw[:, start:stop]
        # Skipped, not multiplied by 1: the raw output (output_scale=None) costs nothing.
        piece = piece * scale if scale != 1.0 else piece
        pieces.append(piece + shift if shift != 0.0 else piece)
    return jnp.concatenate(pieces, axis=-1) if len(pieces) > 1 else pieces[0]


def _readout_factorisation(model: ImplicitModel) -> tuple[Callable, ...] | None:
    """``(features_fn, readout_gram[, readout_fn])`` for ``smallest_singular_value``, if the
    generator has ``features`` and ``readout_gram`` (and ``readout``) methods."""
    generator = model.generator
    if not (hasattr(generator, "features") and hasattr(generator, "readout_gram")):
        return None
    segments = [
        (start, stop, scale**2)
        for (start, stop), scale in zip(
            itertools.pairwise(model.layout.offsets), model.output_scales
        )
    ]

    def features_fn(gen_params, z):
        noise = z.reshape(z.shape[0], *generator.noise_shape)
        return generator.apply({"params": gen_params}, noise, method="features")

    def readout_gram(gen_params):
        return generator.readout_gram(gen_params, segments)

    if not hasattr(generator, "readout"):
        return features_fn, readout_gram

    def readout_fn(gen_params, features):
        raw = generator.apply({"params": gen_params}, features, method="readout")
        return _scale_output(model, raw)

    return features_fn, readout_gram, readout_fn


class _Solver(NamedTuple):
    """Per latent sample: the eigen-solver's final vector (to warm-start the next step), its
    relative residual and the iterations it used."""

    vectors: Array
    residual: Array
    iterations: Array


def _whitened_mean(model, params, z):
    """``g(z) / s`` for ``params = (gamma, log_s)``: the generator whose Jacobian S^-1 J turns
    the entropy with per-parameter noise s into the fixed-noise case with sigma = 1."""
    gen_params, log_std = params
    return generator_mean(model, gen_params, z) * jnp.exp(-log_std)


def _draw(model, vi_params, keys, entropy=None, num_iterations=5, tolerance=None, eigvecs=None):
    """theta = g(z) + sigma eps, one draw per key (len(keys), D), the log-determinant term of
    the entropy at each z (zeros for ``entropy=None``) and the solver's ``_Solver`` (for
    ``"exact"`` and None: the starting vectors, zero residuals and iterations).

    With learned noise s the term is ``sum_i log s_i + 1/2 log det(J^T S^-2 J + I_d)``, the
    fixed-sigma formula applied to the whitened generator g / s with sigma = 1."""
    split = jax.vmap(lambda key: jax.random.split(key, 3))(keys)
    z_keys, eps_keys, solver_keys = split[:, 0], split[:, 1], split[:, 2]
    leaves = jax.tree_util.tree_leaves(vi_params.generator)
    z = _normal_rows(z_keys, model.latent_dim, leaves[0].dtype if leaves else jnp.float32)
    zeros = jnp.zeros(z.shape[0], z.dtype)
    if model.learn_sigma:
        log_std, sigma = vi_params.output_noise["log_std"], 1.0
        mean_fn, params = partial(_whitened_mean, model), (vi_params.generator, log_std)
        # The readout's Gram factorisation assumes one weight per leaf, not per parameter.
        factorisation = None
    else:
        sigma = model.sigma
        mean_fn, params = partial(generator_mean, model), vi_params.generator
        factorisation = _readout_factorisation(model)
    if entropy == "smallest_sv":
        s_min_squared, pair, mean = smallest_singular_value(
            mean_fn,
            params,
            z,
            solver_keys,
            num_iterations,
            x0=eigvecs,
            tolerance=tolerance,
            shift=sigma**2,
            gram_factorisation=factorisation,
        )
        # The constant of the entropy is added once to the average, in float64 on the host.
        log_det = 0.5 * model.latent_dim * jnp.log(s_min_squared + sigma**2)
        solver = _Solver(pair.vector, pair.residual, pair.iterations)
    else:
        if entropy == "exact":
            mean, log_det = exact_log_det(mean_fn, params, z, sigma)
        else:
            mean, log_det = mean_fn(params, z), zeros
        start = _normal_rows(solver_keys, z.shape[1], z.dtype) if eigvecs is None else eigvecs
        start = start / jnp.maximum(jnp.linalg.norm(start, axis=-1, keepdims=True), 1e-30)
        solver = _Solver(start, zeros, jnp.zeros(z.shape[0], jnp.int32))
    eps = _normal_rows(eps_keys, mean.shape[-1], mean.dtype)
    if model.learn_sigma:
        theta = jnp.exp(log_std) * (mean + eps)  # mean is g(z) / s
        if entropy is not None:
            log_det = log_det + jnp.sum(log_std)
    else:
        theta = mean + sigma * eps
    return theta, log_det, solver


def _sample_terms(
    model, vi_params, batch, keys, eigvecs, entropy, num_iterations, tolerance, num_entropy
):
    """Per sample (one per key): mean log-likelihood on the batch and log prior; for the first
    ``num_entropy`` samples also the log-det term and the solver's ``_Solver``."""
    if num_entropy == 0:
        theta, log_det, solver = _draw(model, vi_params, keys)
    else:
        theta, log_det, solver = _draw(
            model, vi_params, keys[:num_entropy], entropy, num_iterations, tolerance, eigvecs
        )
    if 0 < num_entropy < keys.shape[0]:  # the other samples only need the generator's output
        theta = jnp.concatenate([theta, _draw(model, vi_params, keys[num_entropy:])[0]])
    inputs, targets = batch

    def log_likelihood(theta_one):
        params = model.layout.assemble(theta_one, vi_params.deterministic)
        outputs = model.apply_fn(params, inputs)
        return jnp.mean(model.likelihood.log_prob(vi_params.likelihood, outputs, targets))

    log_prior = _log_prior(model, theta)
    return jax.vmap(log_likelihood)(theta), log_prior, log_det, solver


def _log_prior(model: ImplicitModel, theta: Array) -> Array:
    """The model's log prior of each row of theta (S, D): one std, or one per leaf."""
    if not isinstance(model.prior_std, tuple):
        return gaussian_log_prior(theta, model.prior_std)
    leaves = itertools.pairwise(model.layout.offsets)
    return sum(
        gaussian_log_prior(theta[:, start:stop], std)
        for (start, stop), std in zip(leaves, model.prior_std)
    )


def _check_loss_options(
    num_data=None,
    num_samples=1,
    entropy="smallest_sv",
    num_iterations=SOLVER_MAX_ITERATIONS,
    tolerance=SOLVER_TOLERANCE,
    entropy_samples=None,
    prior_weight=None,
    entropy_weight=None,
    chunk_size=None,
    include_constant=True,
) -> None:
    if num_data is None:
        raise ValueError("num_data (the training-set size) is required")
    _check_count("num_data", num_data)
    _check_count("num_samples", num_samples)
    _check_method(entropy, allow_none=True)
    _check_count("num_iterations", num_iterations)
    if tolerance is not None:
        try:
            valid = 0 < float(tolerance) < 1
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise ValueError(
                f"tolerance must be None or a number in (0, 1) (the eigen-solver's relative "
                f"residual), got {tolerance!r}"
            )
    if entropy_samples is not None:
        entropy_samples = _check_count("entropy_samples", entropy_samples)
        if entropy_samples > num_samples:
            raise ValueError(
                f"entropy_samples must be None or an integer in [1, num_samples={num_samples}], "
                f"got {entropy_samples}"
            )
    for name, weight in (("prior_weight", prior_weight), ("entropy_weight", entropy_weight)):
        if weight is not None:
            _check_weight(name, weight)
    if chunk_size is not None:
        _check_count("chunk_size", chunk_size)


def elbo_loss(
    model: ImplicitModel,
    vi_params: VIParams,
    key: Array,
    batch: tuple[Any, Any],
    *,
    num_data: int,
    num_samples: int = 1,
    entropy: str | None = "smallest_sv",
    num_iterations: int = SOLVER_MAX_ITERATIONS,
    tolerance: float | None = SOLVER_TOLERANCE,
    eigvecs: Array | None = None,
    entropy_samples: int | None = None,
    prior_weight: float | None = None,
    entropy_weight: float | None = None,
    include_constant: bool = True,
    chunk_size: int | None = None,
) -> tuple[Array, dict]:
    """Negative ELBO per data point on a minibatch, and its terms.

    ``loss = -( mean_s mean_i log p(y_i | x_i, theta_s) + w_p mean_s log p(theta_s) + w_H H )``
    with H the linearised entropy averaged over the first K = ``entropy_samples`` of the S
    samples (an unbiased estimate: the latents are independent) and by default
    w_p = w_H = 1 / num_data. The paper trains with ``prior_weight=8.5e-4 / B`` and
    ``entropy_weight=1 / B`` for batch size B, and ``tolerance=None, num_iterations=5``.

    For ``"smallest_sv"`` the eigen-solver stops at a relative residual ``tolerance`` or after
    ``num_iterations`` iterations; pass the previous step's ``aux["eigvecs"]`` as ``eigvecs``
    (a warm start) so that it usually needs one or two (docs/implicit_vi.md, section 3.2).

    Args:
      model: the ``ImplicitModel``.
      vi_params: the variational parameters (``init_vi_params``).
      key: PRNG key; sample s draws its latent, output noise and solver start from the s-th
        of ``jax.random.split(key, num_samples)``.
      batch: ``(inputs, targets)``.
      num_data: N, the training-set size (>= 1).
      num_samples: S, Monte Carlo samples (>= 1).
      entropy: ``"exact"``, ``"smallest_sv"`` or None (no entropy term: an ablation, not an
        ELBO).
      num_iterations: eigen-solver iterations for ``"smallest_sv"`` (>= 1): the cap with a
        tolerance, the exact count without.
      tolerance: the solver's relative residual ``||A v - rho v|| / (rho + sigma^2)`` in
        (0, 1), A = J^T J, or None. d/2 log(rho + sigma^2) is then within about
        ``d/2 * tolerance`` nats of d/2 log(s^2 + sigma^2) for a singular value s of J.
      eigvecs: the solver's starting vectors, shape (K, d): the previous step's
        ``aux["eigvecs"]``. None, or rows of zeros: fresh random starts.
      entropy_samples: K (1 <= K <= S), the samples the entropy is estimated on; None: S.
      prior_weight, entropy_weight: override w_p and w_H (>= 0, or a traced array such as an
        annealing schedule).
      include_constant: include the entropy's constant terms (no effect on gradients).
      chunk_size: evaluate at most this many samples at a time, to bound memory (the
        result does not change); None: all at once.

    Returns:
      ``(loss, aux)``; aux has ``"loss"``, ``"expected_log_likelihood"`` (per data point),
      ``"log_prior"`` and ``"entropy"`` (totals over the D parameters), ``"elbo"`` (the
      unweighted per-data-point ELBO estimate), ``"eigvecs"`` (K, d) (the solver's vectors,
      for the next step; for ``"exact"`` and None the normalised starting vectors),
      ``"solver_residual"`` (the largest over the K samples) and ``"solver_iterations"``
      (int32, the most any sample used); both are 0 for ``"exact"`` and None. The structure
      is the same for every option.

    Example:
      >>> import functools, jax, jax.numpy as jnp, implicit_vi as ivi
      >>> model = ivi.make_model(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))},
      ...                        generator=ivi.MLPGenerator(2, 6, (4,)))
      >>> vi_params = ivi.init_vi_params(model, jax.random.key(0))
      >>> loss_fn = jax.jit(functools.partial(ivi.elbo_loss, model, num_data=100, num_samples=4))
      >>> batch = (jnp.ones((8, 3)), jnp.zeros(8, int))
      >>> loss, aux = loss_fn(vi_params, jax.random.key(1), batch)
      >>> bool(jnp.isclose(aux["elbo"], -loss)), aux["eigvecs"].shape
      (True, (4, 2))
      >>> loss, aux = loss_fn(vi_params, jax.random.key(2), batch, eigvecs=aux["eigvecs"])

    References:
      Uppal et al., NeurIPS 2023, sections 3 and 5.
    """
    _check_loss_options(
        num_data,
        num_samples,
        entropy,
        num_iterations,
        tolerance,
        entropy_samples,
        prior_weight,
        entropy_weight,
        chunk_size,
    )
    num_entropy = num_samples if entropy_samples is None else entropy_samples
    if eigvecs is not None and jnp.shape(eigvecs) != (num_entropy, model.latent_dim):
        raise ValueError(
            f"eigvecs must have shape (entropy_samples or num_samples, latent_dim) = "
            f"({num_entropy}, {model.latent_dim}) (the previous step's aux['eigvecs']), got "
            f"shape {jnp.shape(eigvecs)}"
        )
    tolerance = None if tolerance is None else float(tolerance)
    prior_weight = 1.0 / num_data if prior_weight is None else prior_weight
    entropy_weight = 1.0 / num_data if entropy_weight is None else entropy_weight
    terms_of = partial(
        _sample_terms,
        model,
        vi_params,
        batch,
        entropy=entropy,
        num_iterations=num_iterations,
        tolerance=tolerance,
    )
    keys = jax.random.split(key, num_samples)
    if chunk_size is None:
        log_lik, log_prior, log_det, solver = terms_of(keys, eigvecs, num_entropy=num_entropy)
    else:  # lax.map vmaps a per-sample function over each chunk

        def one_sample(args, with_entropy):
            key_one, eigvec = args
            eigvec = None if eigvec is None else eigvec[None]
            terms = terms_of(key_one[None], eigvec, num_entropy=int(with_entropy))
            return jax.tree_util.tree_map(lambda t: t[0], terms)

        log_lik, log_prior, log_det, solver = jax.lax.map(
            partial(one_sample, with_entropy=True),
            (keys[:num_entropy], eigvecs),
            batch_size=chunk_size,
        )
        if num_entropy < num_samples:
            rest = jax.lax.map(
                partial(one_sample, with_entropy=False),
                (keys[num_entropy:], None),
                batch_size=chunk_size,
            )
            log_lik = jnp.concatenate([log_lik, rest[0]])
            log_prior = jnp.concatenate([log_prior, rest[1]])
    expected_log_lik, log_prior, entropy_value = map(jnp.mean, (log_lik, log_prior, log_det))
    if entropy is not None and include_constant:
        sigma = 1.0 if model.learn_sigma else model.sigma  # learned: sum log s is in log_det
        constant = entropy_constant(model.layout.num_stochastic, model.latent_dim, sigma)
        entropy_value = entropy_value + constant
    loss = -(expected_log_lik + prior_weight * log_prior + entropy_weight * entropy_value)
    aux = {
        "loss": loss,
        "expected_log_likelihood": expected_log_lik,
        "log_prior": log_prior,
        "entropy": entropy_value,
        "elbo": expected_log_lik + (log_prior + entropy_value) / num_data,
        "eigvecs": solver.vectors,
        "solver_residual": jnp.max(solver.residual),
        "solver_iterations": jnp.max(solver.iterations),
    }
    return loss, aux


def scale_noise_updates(factor: float) -> optax.GradientTransformation:
    """Multiplies the updates of a learned output noise (``VIParams.output_noise``) by
    ``factor``, leaving the others: after Adam, the noise's learning rate times ``factor``.

    Adam moves log s by about its learning rate per step whatever the gradient's size, so a
    noise started far from the ELBO's optimum gets there only after (distance / rate) steps;
    a larger rate (10x in the examples) makes the result a property of the ELBO rather than
    of the training budget (docs/implicit_vi.md, "Calibrated posteriors").

    Example:
      >>> import optax, implicit_vi as ivi
      >>> optimizer = optax.chain(optax.adam(1e-3), ivi.scale_noise_updates(10.0))
    """
    factor = _check_positive("factor", factor)

    def update(updates, state, params=None):
        del params
        noise = jax.tree_util.tree_map(lambda u: factor * u, updates.output_noise)
        return updates._replace(output_noise=noise), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# ----- sampling and prediction: Bayesian model averaging ---------------------------------------


def sample_flat(model: ImplicitModel, vi_params: VIParams, key: Array, num_samples: int = 1):
    """Draws of the stochastic parameters, ``g(z) + sigma eps``, shape (num_samples, D).

    Example:
      >>> import jax, jax.numpy as jnp, implicit_vi as ivi
      >>> model = ivi.make_model(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))},
      ...                        generator=ivi.MLPGenerator(2, 6, (4,)))
      >>> vi_params = ivi.init_vi_params(model, jax.random.key(0))
      >>> ivi.sample_flat(model, vi_params, jax.random.key(1), 5).shape
      (5, 6)
    """
    keys = jax.random.split(key, _check_count("num_samples", num_samples))
    return _draw(model, vi_params, keys)[0]


def sample_params(model: ImplicitModel, vi_params: VIParams, key: Array, num_samples: int):
    """``num_samples`` draws of the full parameter pytree, stacked along a leading axis.

    Example:
      >>> import jax, jax.numpy as jnp, implicit_vi as ivi
      >>> model = ivi.make_model(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))},
      ...                        generator=ivi.MLPGenerator(2, 6, (4,)))
      >>> vi_params = ivi.init_vi_params(model, jax.random.key(0))
      >>> ivi.sample_params(model, vi_params, jax.random.key(1), 5)["w"].shape
      (5, 3, 2)
    """
    theta = sample_flat(model, vi_params, key, num_samples)
    return jax.vmap(lambda t: model.layout.assemble(t, vi_params.deterministic))(theta)


def _network_outputs(model: ImplicitModel, vi_params: VIParams, keys: Array, x: Any) -> Array:
    """Network outputs under one parameter draw per key, stacked: (len(keys), ...)."""
    theta = _draw(model, vi_params, keys)[0]
    outputs = jax.vmap(
        lambda t: model.apply_fn(model.layout.assemble(t, vi_params.deterministic), x)
    )(theta)
    return outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32))


def sample_outputs(model: ImplicitModel, vi_params: VIParams, key: Array, x: Any, num_samples=10):
    """Network outputs under ``num_samples`` parameter draws, stacked on a leading axis.

    Example:
      >>> import jax, jax.numpy as jnp, implicit_vi as ivi
      >>> model = ivi.make_model(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))},
      ...                        generator=ivi.MLPGenerator(2, 6, (4,)))
      >>> vi_params = ivi.init_vi_params(model, jax.random.key(0))
      >>> ivi.sample_outputs(model, vi_params, jax.random.key(1), jnp.ones((4, 3)), 5).shape
      (5, 4, 2)
    """
    keys = jax.random.split(key, _check_count("num_samples", num_samples))
    return _network_outputs(model, vi_params, keys, x)


def _sum_over_networks(model, vi_params, key, x, num_samples, chunk_size, statistic):
    """``sum_k statistic(f(x; theta_k))`` over K = num_samples draws.

    A scan over chunks of ``chunk_size`` networks keeps running sums, so memory does not grow
    with K. The last chunk is topped up with repeated draws whose statistics are masked out.
    """
    num_samples = _check_count("num_samples", num_samples)
    chunk_size = min(_check_count("chunk_size", chunk_size), num_samples)
    num_chunks = -(-num_samples // chunk_size)
    keys = jax.random.split(key, num_samples)
    keys = jnp.concatenate([keys, keys[: num_chunks * chunk_size - num_samples]])
    real = jnp.arange(num_chunks * chunk_size) < num_samples
    chunks = (keys.reshape(num_chunks, chunk_size, *keys.shape[1:]), real.reshape(num_chunks, -1))

    def chunk_sum(chunk):
        chunk_keys, chunk_real = chunk
        values = statistic(_network_outputs(model, vi_params, chunk_keys, x))
        return jax.tree_util.tree_map(
            lambda v: jnp.tensordot(chunk_real.astype(v.dtype), v, 1), values
        )

    def add_chunk(total, chunk):
        return jax.tree_util.tree_map(jnp.add, total, chunk_sum(chunk)), None

    first = chunk_sum(jax.tree_util.tree_map(lambda c: c[0], chunks))
    return jax.lax.scan(add_chunk, first, jax.tree_util.tree_map(lambda c: c[1:], chunks))[0]


def predict_proba(model, vi_params, key, x, num_samples=100, chunk_size=20) -> Array:
    """Bayesian model average of class probabilities, ``(1/K) sum_k softmax(f(x; theta_k))``.

    Args:
      model: the ``ImplicitModel``.
      vi_params: the ``VIParams``.
      key: PRNG key; pass a fresh key for every call (e.g. per test batch).
      x: the network's inputs.
      num_samples: K, the number of sampled networks.
      chunk_size: at most this many networks are evaluated at once (running sums), so
        memory does not grow with K.

    Returns:
      Probabilities with the shape of the network's outputs.

    Example:
      >>> import functools, jax, jax.numpy as jnp, implicit_vi as ivi
      >>> model = ivi.make_model(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))},
      ...                        generator=ivi.MLPGenerator(2, 6, (4,)))
      >>> vi_params = ivi.init_vi_params(model, jax.random.key(0))
      >>> predict = jax.jit(functools.partial(ivi.predict_proba, model))
      >>> probs = predict(vi_params, jax.random.key(1), jnp.ones((4, 3)))
      >>> bool(jnp.allclose(probs.sum(-1), 1.0))
      True
    """
    total = _sum_over_networks(model, vi_params, key, x, num_samples, chunk_size, jax.nn.softmax)
    return total / num_samples


def predict_mean_var(
    model: ImplicitModel,
    vi_params: VIParams,
    key: Array,
    x: Any,
    num_samples: int = 100,
    chunk_size: int = 20,
    include_noise: bool = True,
) -> tuple[Array, Array]:
    """Bayesian model average for regression: predictive mean and variance.

    ``mean = (1/K) sum_k f_k(x)``, ``variance = (1/K) sum_k (f_k(x) - mean)^2`` (epistemic)
    plus the likelihood's noise variance when ``include_noise`` (a ``Gaussian`` likelihood).
    Arguments as in ``predict_proba``.

    Returns:
      ``(mean, variance)``, each with the shape of the network's outputs.

    Example:
      >>> import functools, jax, jax.numpy as jnp, implicit_vi as ivi
      >>> model = ivi.make_model(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))},
      ...                        generator=ivi.MLPGenerator(2, 6, (4,)),
      ...                        likelihood=ivi.Gaussian(0.1))
      >>> vi_params = ivi.init_vi_params(model, jax.random.key(0))
      >>> predict = jax.jit(functools.partial(ivi.predict_mean_var, model))
      >>> mean, var = predict(vi_params, jax.random.key(1), jnp.ones((4, 3)))
      >>> mean.shape, bool(jnp.all(var >= 0.01))
      ((4, 2), True)
    """
    if include_noise and not hasattr(model.likelihood, "noise_variance"):
        raise ValueError(
            "include_noise=True needs a Gaussian likelihood (one with noise_variance); "
            "pass include_noise=False"
        )
    # Sums of squares around one extra draw rather than around 0 avoid cancellation.
    reference = _network_outputs(model, vi_params, jax.random.fold_in(key, 1)[None], x)[0]
    total, total_sq = _sum_over_networks(
        model,
        vi_params,
        key,
        x,
        num_samples,
        chunk_size,
        lambda f: (f - reference, (f - reference) ** 2),
    )
    shifted_mean = total / num_samples
    variance = jnp.maximum(total_sq / num_samples - jnp.square(shifted_mean), 0.0)
    if include_noise:
        variance = variance + model.likelihood.noise_variance(vi_params.likelihood)
    return reference + shifted_mean, variance


# ----- 6. The convenience wrapper --------------------------------------------------------------


class ImplicitBNN:
    """An ``ImplicitModel`` with the functions of this module bound to it, jitted.

    ``bnn.sample_flat``, ``sample_params``, ``sample_outputs``, ``predict_proba`` and
    ``predict_mean_var`` are the module functions with the model bound, jitted
    (``num_samples``, ``chunk_size`` and ``include_noise`` static); ``bnn.loss`` is
    ``elbo_loss`` (not jitted, for your own step) and ``bnn.make_train_step`` builds a jitted
    Optax step.

    Attributes:
      model: the ``ImplicitModel``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, implicit_vi as ivi
      >>> net = nn.Dense(2, use_bias=False)
      >>> params = net.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
      >>> bnn = ivi.ImplicitBNN.from_linen(net, params, generator=ivi.MLPGenerator(2, 6, (4,)))
      >>> vi_params = bnn.init(jax.random.key(1))
      >>> bnn.sample_outputs(vi_params, jax.random.key(3), jnp.ones((8, 3)), num_samples=5).shape
      (5, 8, 2)

    References:
      Uppal et al., "Implicit Variational Inference for High-Dimensional Posteriors",
      NeurIPS 2023.
    """

    def __init__(self, model: ImplicitModel):
        self.model = model
        for fn, static in (
            (sample_flat, ("num_samples",)),
            (sample_params, ("num_samples",)),
            (sample_outputs, ("num_samples",)),
            (predict_proba, ("num_samples", "chunk_size")),
            (predict_mean_var, ("num_samples", "chunk_size", "include_noise")),
        ):
            setattr(self, fn.__name__, jax.jit(partial(fn, model), static_argnames=static))

    @classmethod
    def create(cls, apply_fn: Callable[[PyTree, Any], Array], params: PyTree, **kwargs):
        """``ImplicitBNN(make_model(apply_fn, params, **kwargs))``."""
        return cls(make_model(apply_fn, params, **kwargs))

    @classmethod
    def from_linen(cls, module: nn.Module, params: PyTree, **kwargs) -> ImplicitBNN:
        """For a linen module whose only collection is ``params``; kwargs go to ``make_model``."""
        return cls.create(lambda p, x: module.apply({"params": p}, x), params, **kwargs)

    @classmethod
    def from_nnx(cls, model: Any, **kwargs) -> ImplicitBNN:
        """For an ``nnx.Module``: its ``nnx.Param`` state becomes Bayesian (or the subset
        selected by ``stochastic``); other state (e.g. batch statistics) is held fixed."""
        from flax import nnx

        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return cls.create(lambda p, x: nnx.merge(graphdef, p, rest)(x), params, **kwargs)

    @property
    def layout(self) -> ParameterLayout:
        return self.model.layout

    @property
    def num_stochastic(self) -> int:
        return self.model.layout.num_stochastic

    @property
    def latent_dim(self) -> int:
        return self.model.latent_dim

    def init(self, key: Array) -> VIParams:
        return init_vi_params(self.model, key)

    def report(self) -> GeneratorReport:
        return generator_report(self.model)

    def loss(self, vi_params: VIParams, key: Array, batch: tuple[Any, Any], **loss_kwargs):
        return elbo_loss(self.model, vi_params, key, batch, **loss_kwargs)

    def make_train_step(self, optimizer: optax.GradientTransformation, **loss_kwargs) -> Callable:
        """A jitted Optax training step; ``loss_kwargs`` go to ``elbo_loss`` (``num_data`` is
        required) and are checked here.

        Returns ``train_step(vi_params, opt_state, key, batch, eigvecs=None) ->
        (vi_params, opt_state, aux)``. Pass the previous step's ``aux["eigvecs"]`` as
        ``eigvecs`` to warm-start the eigen-solver; None (the first step) starts it afresh,
        without a second compilation.

        Example:
          >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, implicit_vi as ivi
          >>> net = nn.Dense(2, use_bias=False)
          >>> params = net.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
          >>> bnn = ivi.ImplicitBNN.from_linen(net, params, generator=ivi.MLPGenerator(2, 6, (4,)))
          >>> vi_params = bnn.init(jax.random.key(1))
          >>> optimizer = optax.adam(1e-3)
          >>> opt_state = optimizer.init(vi_params)
          >>> train_step = bnn.make_train_step(optimizer, num_data=100, num_samples=4)
          >>> batch, eigvecs = (jnp.ones((8, 3)), jnp.zeros(8, int)), None
          >>> for key in jax.random.split(jax.random.key(2), 3):
          ...     vi_params, opt_state, aux = train_step(vi_params, opt_state, key, batch, eigvecs)
          ...     eigvecs = aux["eigvecs"]  # carried to the next step
        """
        if "eigvecs" in loss_kwargs:
            raise ValueError("pass eigvecs to the train step, not to make_train_step")
        _check_loss_options(**loss_kwargs)
        num_vectors = loss_kwargs.get("entropy_samples") or loss_kwargs.get("num_samples", 1)
        grad_fn = jax.grad(partial(elbo_loss, self.model, **loss_kwargs), has_aux=True)

        @jax.jit
        def jitted_step(vi_params, opt_state, key, batch, eigvecs):
            grads, aux = grad_fn(vi_params, key, batch, eigvecs=eigvecs)
            updates, opt_state = optimizer.update(grads, opt_state, vi_params)
            return optax.apply_updates(vi_params, updates), opt_state, aux

        def train_step(vi_params, opt_state, key, batch, eigvecs=None):
            if eigvecs is None:  # zero rows: fresh random starts, in the same compilation
                leaves = jax.tree_util.tree_leaves(vi_params.generator)
                dtype = leaves[0].dtype if leaves else jnp.float32
                eigvecs = jnp.zeros((num_vectors, self.model.latent_dim), dtype)
            return jitted_step(vi_params, opt_state, key, batch, eigvecs)

        return train_step
