"""Implicit variational inference for Bayesian neural networks, in JAX and Flax.

This module turns any Flax model into a Bayesian neural network whose posterior is an
*implicit* distribution: the network's parameters are the output of a neural sampler
(a generator, or hypernetwork) driven by low-dimensional Gaussian noise, as in

    Uppal, Stensbo-Smidt, Boomsma and Frellsen, "Implicit Variational Inference for
    High-Dimensional Posteriors", NeurIPS 2023.  https://arxiv.org/abs/2310.06643

The variational family over the D (stochastic) parameters theta, from a latent z of
dimension d << D, is

    z ~ N(0, I_d),   theta = g_gamma(z) + sigma * eps,   eps ~ N(0, I_D),

with trainable generator parameters gamma and a small fixed output noise sigma (1e-3). The
objective is the evidence lower bound

    ELBO(gamma) = E_q[log p(data | theta)] + E_q[log p(theta)] + H[q_gamma],

with the prior p(theta) = N(0, prior_std^2 I). The entropy is intractable; linearising the
generator around each z, g(z') ~ g(z) + J_z (z' - z) with the D x d Jacobian J_z, makes q
locally Gaussian with covariance J_z J_z^T + sigma^2 I_D, and the matrix determinant lemma
turns its D x D log-determinant into a d x d one:

    H[q] ~ D/2 log(2 pi e) + (D - d) log sigma + E_z[ 1/2 log det(J_z^T J_z + sigma^2 I_d) ].

Two estimators of the last term are provided:

* ``"exact"``: d Jacobian-vector products give J_z; the log-determinant is read off the
  triangular factor R of the QR decomposition of the stacked matrix [J_z; sigma I_d]
  (R^T R = J_z^T J_z + sigma^2 I_d, so R is the Cholesky factor, obtained without forming
  the Gram matrix and therefore without squaring its condition number).
* ``"smallest_sv"``: the lower bound 1/2 sum_i log(s_i^2 + sigma^2) >= d/2 log(s_min^2 +
  sigma^2), where s_min, the smallest singular value of J_z, comes from a few iterations of
  a Krylov (Lanczos) Rayleigh-Ritz eigen-solver on J_z^T J_z that only needs v -> J_z v
  (forward mode) and u -> J_z^T u (reverse mode); its search space contains that of the
  LOBPCG-like iteration of the paper. The eigenvector v is held constant and
  s_min^2 = ||J_z v||^2 is differentiated, which by the envelope theorem is the derivative
  of the eigenvalue. Cost: a few passes through the generator, whatever d and D are.

The generators are Flax linen modules: the matrix-multiplication layer ``MMLayer``,
``Y = (W_l X + B_l) W_r + B_r``, the ``MMGenerator`` built from it, the correlated
``MultiHeadMMGenerator`` (a shared trunk feeding one MM generator per parameter group) and a
plain ``MLPGenerator`` for toy problems. ``ImplicitBNN`` wires a generator to a model: it maps
the flat generator output onto the model's parameter pytree (a linen ``params`` dict or an
``nnx.State``), optionally keeps some leaves deterministic, and provides the minibatch ELBO, a
jitted training step for any Optax optimizer and Bayesian model averaging.

Example:

    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> import implicit_vi as ivi
    >>> model = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(1)])
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
    >>> bnn = ivi.ImplicitBNN.from_linen(model, params,
    ...                                  likelihood=ivi.Gaussian(noise_std=0.1))
    >>> vi_params = bnn.init(jax.random.key(1))
    >>> optimizer = optax.adam(1e-3)
    >>> opt_state = optimizer.init(vi_params)
    >>> train_step = bnn.make_train_step(optimizer, num_data=64, num_samples=4,
    ...                                  entropy="exact")
    >>> x = jnp.linspace(-1, 1, 64)[:, None]; y = jnp.sin(3 * x)
    >>> vi_params, opt_state, aux = train_step(vi_params, opt_state, jax.random.key(2), (x, y))
    >>> mean, variance = bnn.predict_mean_var(vi_params, jax.random.key(3), x, num_samples=32)
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    # entropy of the linearised sampler
    "entropy_constant",
    "exact_log_det",
    "smallest_eigenpair",
    "smallest_singular_value",
    "smallest_sv_log_det",
    "linearised_entropy",
    "gaussian_log_prior",
    # generators
    "MMLayer",
    "MMGenerator",
    "MultiHeadMMGenerator",
    "MLPGenerator",
    "generator_from_config",
    "auto_generator",
    "count_params",
    # likelihoods
    "Categorical",
    "Gaussian",
    "CustomLikelihood",
    # any model becomes Bayesian
    "ParameterLayout",
    "ImplicitBNN",
    "GeneratorReport",
]

ENTROPY_METHODS = ("exact", "smallest_sv")

Array = jax.Array
PyTree = Any
MeanFn = Callable[[PyTree, Array], Array]


# ---------------------------------------------------------------------------------------------
# Argument checks shared by the public functions.
# ---------------------------------------------------------------------------------------------


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


def _check_entropy_method(method: Any, allow_none: bool = False) -> str | None:
    if method is None and allow_none:
        return None
    if method not in ENTROPY_METHODS:
        accepted = ", ".join(repr(m) for m in ENTROPY_METHODS) + (" or None" if allow_none else "")
        raise ValueError(f"entropy must be one of {accepted}, got {method!r}")
    return method


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


# ---------------------------------------------------------------------------------------------
# 1. Entropy of the linearised sampler.
#
# Every function below takes the generator as `mean_fn(params, z) -> theta_mean`, mapping a
# batch of flat latents z (S, d) to parameter means (S, D) row by row (a single z of shape (d,)
# works too), with the trainable `params` explicit so that the eigen-solver can run on
# stop-gradient copies of them. Treating the S samples as one batch, rather than vmapping a
# per-sample function, lets the generator run its matrix products on all samples at once.
# ---------------------------------------------------------------------------------------------


def entropy_constant(num_params: int, latent_dim: int, sigma: float) -> float:
    """The gamma-independent part of the linearised entropy.

    ``D/2 log(2 pi e) + (D - d) log(sigma)``, computed in float64 on the host.

    Args:
      num_params: D, the number of stochastic parameters.
      latent_dim: d, the dimension of the latent z.
      sigma: the output noise standard deviation (> 0).

    Returns:
      The constant as a Python float.

    Example:
      >>> round(entropy_constant(2, 2, 1.0), 4)  # entropy of N(0, I_2) is log(2 pi e)
      2.8379
    """
    sigma = _check_positive("sigma", sigma)
    return 0.5 * num_params * math.log(2 * math.pi * math.e) + (num_params - latent_dim) * math.log(
        sigma
    )


def _as_batch(z: Array) -> tuple[Array, bool]:
    if z.ndim not in (1, 2):
        raise ValueError(f"z must have shape (d,) or (num_samples, d), got shape {z.shape}")
    return (z[None], True) if z.ndim == 1 else (z, False)


def exact_log_det(mean_fn: MeanFn, params: PyTree, z: Array, sigma: float) -> tuple[Array, Array]:
    """``1/2 log det(J^T J + sigma^2 I_d)`` for the Jacobian J of the generator at each z.

    J (D x d) comes from d forward-mode products. The triangular factor R of the QR
    decomposition of the (D + d) x d matrix [J; sigma I_d] satisfies
    R^T R = J^T J + sigma^2 I_d, so the log-determinant is ``sum log|R_ii|``: R is the Cholesky
    factor of the d x d matrix, computed without forming J^T J, hence without squaring its
    condition number, without failure when J is rank deficient or zero, and with finite
    gradients (R is invertible because sigma > 0). Memory: S x D x d.

    Args:
      mean_fn: ``mean_fn(params, z) -> theta_mean``, row by row, see the section comment.
      params: the generator's trainable parameters (differentiated through).
      z: latent samples, shape (S, d) or (d,).
      sigma: the output noise standard deviation (> 0).

    Returns:
      ``(g(z), half_log_det)``: the generated means (S, D) and the log-determinant terms (S,)
      (shapes (D,) and () for a single z).

    Example:
      >>> A = jnp.array([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
      >>> _, value = exact_log_det(lambda p, z: z @ p.T, A, jnp.zeros(2), 1e-3)
      >>> bool(jnp.allclose(value, 0.5 * jnp.log((4 + 1e-6) * (9 + 1e-6))))
      True
    """
    z, single = _as_batch(z)
    num_samples, d = z.shape
    generate = partial(mean_fn, params)
    basis = jnp.broadcast_to(jnp.eye(d, dtype=z.dtype)[:, None, :], (d, num_samples, d))
    # The primal g(z) does not depend on the tangent, so vmap leaves it unbatched (out_axes None).
    mean, jac_columns = jax.vmap(
        lambda tangent: jax.jvp(generate, (z,), (tangent,)), out_axes=(None, 0)
    )(basis)
    jac = jnp.moveaxis(jac_columns, 0, -1)  # (S, D, d)
    damping = jnp.broadcast_to(sigma * jnp.eye(d, dtype=jac.dtype), (num_samples, d, d))
    r = jnp.linalg.qr(jnp.concatenate([jac, damping], axis=1), mode="r")
    half_log_det = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(r, axis1=-2, axis2=-1))), axis=-1)
    return (mean[0], half_log_det[0]) if single else (mean, half_log_det)


def smallest_eigenpair(
    matvec: Callable[[Array], Array], x0: Array, num_iterations: int
) -> tuple[Array, Array]:
    """Smallest eigenpair of a symmetric positive semi-definite operator, matrix-free.

    Rayleigh-Ritz on the Krylov subspace span{x0, A x0, ..., A^k x0}, k = num_iterations:
    Lanczos with full re-orthogonalisation. Every new basis vector is orthogonalised twice
    against the previous ones ("twice is enough") and its image A v is a fresh operator
    application, so the projected (k+1) x (k+1) matrix is exact up to rounding however many
    iterations run; no image is extrapolated, so nothing drifts. Directions that vanish (a
    zero operator, a rank-deficient one, an invariant subspace reached early) are dropped from
    the Rayleigh-Ritz step instead of being normalised into NaNs.

    Why not the three-term LOBPCG iteration of the paper: started from the same x0, every
    iterate of single-vector LOBPCG (``x_{j+1} in span{x_j, r_j, p_j}``) lies in this Krylov
    subspace, so the Ritz value here is never larger than LOBPCG's after the same number of
    operator applications (one per iteration, plus one for x0), and the basis stays
    orthonormal where LOBPCG's [x, r, p] becomes ill-conditioned near convergence.

    Args:
      matvec: ``v -> A v`` for a symmetric PSD A of size n x n. With x0 of shape (S, n) it
        applies S independent operators, one per row (a block-diagonal A).
      x0: non-zero starting vector(s), shape (n,) or (S, n).
      num_iterations: the number of iterations k (>= 1); the cost is k + 1 operator
        applications and O(k^2 n) for the orthogonalisation. With k >= n - 1 the subspace is
        the whole space and the result is exact up to rounding.

    Returns:
      ``(rho, v)``: the smallest Ritz value (an upper bound of the smallest eigenvalue, equal
      to it at convergence) and its unit Ritz vector, shapes () and (n,) (or (S,) and (S, n)),
      both stop-gradient.

    Example:
      >>> A = jnp.diag(jnp.arange(1.0, 6.0))
      >>> rho, v = smallest_eigenpair(lambda v: A @ v, jnp.ones(5), 4)
      >>> bool(jnp.allclose(rho, 1.0, atol=1e-4))
      True

    References:
      Lanczos, J. Res. Natl. Bur. Stand. 45, 1950. Parlett, "The Symmetric Eigenvalue
      Problem", SIAM 1998, ch. 11-13. Knyazev, "Toward the optimal preconditioned
      eigensolver: LOBPCG", SIAM J. Sci. Comput. 23(2), 2001.
    """
    num_iterations = _check_count("num_iterations", num_iterations)
    x0, single = _as_batch(jax.lax.stop_gradient(x0))
    apply = (lambda v: matvec(v[0])[None]) if single else matvec
    apply_frozen = lambda v: jax.lax.stop_gradient(apply(v))
    num_problems, size = x0.shape
    num_vectors = num_iterations + 1
    eps = jnp.finfo(x0.dtype).eps

    def extend(j, state):
        basis, images, kept, candidate = state  # (S, k, n), (S, k, n), (S, k), (S, n)
        norm_before = jnp.linalg.norm(candidate, axis=-1)
        for _ in range(2):  # classical Gram-Schmidt, twice
            overlaps = jnp.einsum("skn,sn->sk", basis, candidate)
            candidate = candidate - jnp.einsum("skn,sk->sn", basis, overlaps)
        norm = jnp.linalg.norm(candidate, axis=-1)
        # Below the rounding level of the original the direction is numerically zero: drop it.
        keep = norm > eps * norm_before
        v = candidate * jnp.where(keep, 1.0 / jnp.where(keep, norm, 1.0), 0.0)[:, None]
        image = apply_frozen(v)
        basis, images = basis.at[:, j].set(v), images.at[:, j].set(image)
        return basis, images, kept.at[:, j].set(keep), image

    empty = jnp.zeros((num_problems, num_vectors, size), x0.dtype)
    no_vectors = jnp.zeros((num_problems, num_vectors), bool)
    basis, images, kept, _ = jax.lax.fori_loop(
        0, num_vectors, extend, (empty, empty, no_vectors, x0)
    )
    projected = jnp.einsum("skn,sln->skl", basis, images)
    projected = 0.5 * (projected + jnp.swapaxes(projected, -1, -2))
    # Dropped directions get a Ritz value above every other one, so never the smallest.
    penalty = 2.0 * jnp.sum(jnp.abs(projected), axis=(-2, -1), keepdims=True) + 1.0
    both = kept[:, :, None] & kept[:, None, :]
    diagonal = jnp.eye(num_vectors, dtype=bool)
    projected = jnp.where(both, projected, 0.0) + jnp.where(diagonal & ~kept[:, None, :], penalty, 0.0)
    ritz_values, ritz_vectors = jnp.linalg.eigh(projected)
    coefficients = jnp.where(kept, ritz_vectors[:, :, 0], 0.0)
    v = jnp.einsum("sk,skn->sn", coefficients, basis)
    v_norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
    v = v / jnp.where(v_norm > 0, v_norm, 1.0)
    rho, v = jax.lax.stop_gradient(ritz_values[:, 0]), jax.lax.stop_gradient(v)
    return (rho[0], v[0]) if single else (rho, v)


def smallest_singular_value(
    mean_fn: MeanFn,
    params: PyTree,
    z: Array,
    key: Array | None,
    num_iterations: int = 5,
    *,
    x0: Array | None = None,
    gram_factorisation: tuple[Callable, Callable] | None = None,
) -> tuple[Array, Array, Array]:
    """Smallest singular value of the generator's Jacobian J at each z, matrix-free.

    ``smallest_eigenpair`` runs on J^T J with ``v -> J^T (J v)``: the generator is linearised
    once at z (``jax.linearize``) and its transpose gives the reverse-mode product, both on
    stop-gradient parameters. The returned value is then recomputed as ``||J v||^2`` with the
    live parameters and the eigenvector v held constant: by the envelope theorem its gradient
    is the gradient of the eigenvalue.

    Args:
      mean_fn: ``mean_fn(params, z) -> theta_mean``, row by row.
      params: the generator's trainable parameters.
      z: latent samples, shape (S, d) or (d,).
      key: PRNG key for the solver's random starting vectors (unused when x0 is given).
      num_iterations: eigen-solver iterations (>= 1), one J^T J product each; the paper
        uses 5.
      x0: starting vectors, the shape of z (default: standard normal from key).
      gram_factorisation: optional ``(features_fn, readout_gram)`` for a generator that ends
        in a z-independent linear readout L: ``mean_fn(p, z) = L_p(features_fn(p, z)) + c``.
        Then ``J^T J = K^T (L^T L) K`` with K the Jacobian of ``features_fn``, and
        ``readout_gram(p)`` returns the operator ``h -> L^T L h``, cheaper than the two
        passes through L (``ImplicitBNN`` builds it for the generators of this module).

    Returns:
      ``(s_min_squared, v, g(z))``: ``||J v||^2`` (differentiable) of shape (S,), the unit
      vectors v (S, d) and the generated means (S, D) (no leading axis for a single z).

    Example:
      >>> A = jnp.array([[3.0, 0.0], [0.0, 0.5], [0.0, 0.0]])
      >>> s2, v, _ = smallest_singular_value(lambda p, z: z @ p.T, A, jnp.zeros(2),
      ...                                    jax.random.key(0), num_iterations=5)
      >>> bool(jnp.allclose(s2, 0.25, rtol=1e-4))
      True
    """
    z, single = _as_batch(z)
    frozen = jax.lax.stop_gradient(params)
    z_frozen = jax.lax.stop_gradient(z)
    if gram_factorisation is None:
        _, forward = jax.linearize(partial(mean_fn, frozen), z_frozen)
        readout_gram = lambda u: u
    else:
        features_fn, make_readout_gram = gram_factorisation
        _, forward = jax.linearize(partial(features_fn, frozen), z_frozen)
        readout_gram = make_readout_gram(frozen)
    backward = jax.linear_transpose(forward, z_frozen)
    matvec = lambda v: backward(readout_gram(forward(v)))[0]
    if x0 is None:
        if key is None:
            raise ValueError("key must be a PRNG key when no starting vector x0 is given")
        x0 = jax.random.normal(key, z.shape, z.dtype)
    _, v = smallest_eigenpair(matvec, x0.reshape(z.shape), num_iterations)
    mean, jv = jax.jvp(partial(mean_fn, params), (z,), (v,))
    s_min_squared = jnp.sum(jnp.square(jv), axis=-1)
    return (s_min_squared[0], v[0], mean[0]) if single else (s_min_squared, v, mean)


def smallest_sv_log_det(
    mean_fn: MeanFn,
    params: PyTree,
    z: Array,
    sigma: float,
    key: Array | None,
    num_iterations: int = 5,
    *,
    x0: Array | None = None,
    gram_factorisation: tuple[Callable, Callable] | None = None,
) -> tuple[Array, Array]:
    """The lower bound ``d/2 log(s_min^2 + sigma^2) <= 1/2 log det(J^T J + sigma^2 I_d)``.

    Args:
      mean_fn: ``mean_fn(params, z) -> theta_mean``, row by row.
      params: the generator's trainable parameters.
      z: latent samples, shape (S, d) or (d,).
      sigma: the output noise standard deviation (> 0).
      key: PRNG key for the eigen-solver's starting vectors (unused when x0 is given).
      num_iterations: eigen-solver iterations (>= 1).
      x0, gram_factorisation: see ``smallest_singular_value``.

    Returns:
      ``(g(z), bound)``: the generated means (S, D) and the bounds (S,). The bound is exact
      when all singular values of J are equal; it is computed from ``||J v||^2`` so it stays
      finite (``d log sigma``) with a zero Jacobian. With too few iterations ``||J v||``
      overestimates s_min and the value may exceed the exact term.

    Example:
      >>> A = 2.0 * jnp.eye(3)[:, :2]
      >>> _, bound = smallest_sv_log_det(lambda p, z: z @ p.T, A, jnp.zeros(2), 1e-3,
      ...                                jax.random.key(0))
      >>> bool(jnp.allclose(bound, jnp.log(4 + 1e-6)))
      True
    """
    s_min_squared, _, mean = smallest_singular_value(
        mean_fn, params, z, key, num_iterations, x0=x0, gram_factorisation=gram_factorisation
    )
    d = z.shape[-1]
    return mean, 0.5 * d * jnp.log(s_min_squared + sigma**2)


def linearised_entropy(
    mean_fn: MeanFn,
    params: PyTree,
    z: Array,
    sigma: float,
    *,
    method: str = "smallest_sv",
    key: Array | None = None,
    num_iterations: int = 5,
    include_constant: bool = True,
    gram_factorisation: tuple[Callable, Callable] | None = None,
) -> tuple[Array, Array]:
    """Entropy of the sampler linearised at each latent sample z.

    ``D/2 log(2 pi e) + (D - d) log sigma + 1/2 log det(J_z^T J_z + sigma^2 I_d)``, the
    log-determinant either exact or bounded from below (see the module docstring). Averaging
    over z ~ N(0, I_d) gives the entropy estimate used in the ELBO. Works under ``jit``, on a
    batch of latents (S, d), and under ``vmap`` over single latents.

    Args:
      mean_fn: ``mean_fn(params, z) -> theta_mean``, row by row.
      params: the generator's trainable parameters.
      z: latent samples, shape (S, d) or (d,).
      sigma: the output noise standard deviation (> 0).
      method: ``"exact"`` or ``"smallest_sv"``.
      key: PRNG key, required by ``"smallest_sv"``.
      num_iterations: eigen-solver iterations for ``"smallest_sv"`` (>= 1).
      include_constant: add ``D/2 log(2 pi e) + (D - d) log sigma``; skipping it changes
        neither gradients nor the optimum.
      gram_factorisation: see ``smallest_singular_value`` (``"smallest_sv"`` only).

    Returns:
      ``(g(z), entropy)``: the generated means (S, D) and the entropies (S,).

    Example:
      >>> A = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
      >>> _, h = linearised_entropy(lambda p, z: z @ p.T, A, jnp.zeros(2), 1e-3,
      ...                           method="exact")

    References:
      Uppal et al., "Implicit Variational Inference for High-Dimensional Posteriors",
      NeurIPS 2023, section 3.
    """
    sigma = _check_positive("sigma", sigma)
    method = _check_entropy_method(method)
    _as_batch(z)
    if method == "exact":
        mean, log_det = exact_log_det(mean_fn, params, z, sigma)
    else:
        if key is None:
            raise ValueError("key must be a PRNG key for method='smallest_sv', got None")
        mean, log_det = smallest_sv_log_det(
            mean_fn, params, z, sigma, key, num_iterations, gram_factorisation=gram_factorisation
        )
    if include_constant:
        log_det = log_det + entropy_constant(mean.shape[-1], z.shape[-1], sigma)
    return mean, log_det


def gaussian_log_prior(theta: Array, prior_std: float) -> Array:
    """``log N(theta | 0, prior_std^2 I)`` summed over the last axis of theta.

    Example:
      >>> bool(jnp.isclose(gaussian_log_prior(jnp.zeros(1), 1.0), -0.5 * math.log(2 * math.pi)))
      True
    """
    theta = theta.astype(jnp.promote_types(theta.dtype, jnp.float32))
    return -0.5 * jnp.sum(jnp.square(theta), axis=-1) / prior_std**2 - 0.5 * theta.shape[
        -1
    ] * math.log(2 * math.pi * prior_std**2)


# ---------------------------------------------------------------------------------------------
# 2. Generators (Flax linen modules). Each takes noise of shape `noise_shape` (plus any leading
# batch dimensions) and returns a flat vector of `output_size` entries per sample. Each also
# has a `features` method, the activations that enter its last (linear) layer, which the
# eigen-solver uses to apply J^T J without two passes through that largest layer.
# ---------------------------------------------------------------------------------------------


def _fan_in_init(in_axis: int, out_axis: int) -> Callable:
    # Variance 1/fan_in on each side of X keeps the entries of W_l X W_r at the scale of X.
    return nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=in_axis, out_axis=out_axis)


def _mm_layer_param_count(in_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    (a, b), (a_out, b_out) = in_shape, out_shape
    return a_out * a + a_out * b + b * b_out + a_out * b_out


def _mm_product(x: Array, w_left: Array, b_left: Array, w_right: Array, b_right: Array) -> Array:
    """``(W_l X + B_l) W_r + B_r`` for a batch of matrices stored as (a, batch, b).

    With the batch between the matrix axes both products are single matrix multiplications,
    ``W_l @ X.reshape(a, batch * b)`` and ``X.reshape(a * batch, b) @ W_r``, with no transpose.
    The order, ``(W_l X) W_r`` or ``W_l (X W_r)``, is the one with fewer multiplications; in
    the second the input-independent ``B_l W_r`` is computed once.
    """
    a, batch, b = x.shape
    a_out, b_out = b_right.shape
    if a_out * a * b + a_out * b * b_out <= a * b * b_out + a_out * a * b_out:
        y = (w_left @ x.reshape(a, batch * b)).reshape(a_out, batch, b) + b_left[:, None, :]
        return (y.reshape(a_out * batch, b) @ w_right).reshape(a_out, batch, b_out) + b_right[:, None, :]
    y = (x.reshape(a * batch, b) @ w_right).reshape(a, batch, b_out)
    bias = b_left @ w_right + b_right
    return (w_left @ y.reshape(a, batch * b_out)).reshape(a_out, batch, b_out) + bias[:, None, :]


def _to_middle(x: Array) -> tuple[Array, tuple[int, ...]]:
    """(..., a, b) -> (a, batch, b) and the batch shape."""
    batch = x.shape[:-2]
    a, b = x.shape[-2:]
    return jnp.swapaxes(x.reshape(-1, a, b), 0, 1), batch


def _from_middle(y: Array, batch: tuple[int, ...]) -> Array:
    """(a, batch, b) -> (..., a, b)."""
    return jnp.swapaxes(y, 0, 1).reshape(*batch, *y.shape[::2])


class MMLayer(nn.Module):
    """Matrix-multiplication layer ``Y = (W_l X + B_l) W_r + B_r``.

    Maps an a x b matrix X to an a' x b' matrix Y with W_l (a' x a), B_l (a' x b),
    W_r (b x b') and B_r (a' x b'): ``a'a + a'b + bb' + a'b'`` parameters instead of the
    ``(ab)(a'b')`` of a dense layer on the flattened matrix. The weights are initialised with
    variance 1/a (W_l) and 1/b (W_r), the biases at zero, so that entries of Y have the scale
    of the entries of X. Leading batch dimensions of X are kept.

    Attributes:
      output_shape: (a', b').
      batch_in_middle: the input is (a, batch, b) and so is the output (a', batch, b'); the
        generators use this layout internally so that no layer transposes its input.

    Example:
      >>> layer = MMLayer((4, 5))
      >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3)))
      >>> layer.apply(variables, jnp.ones((7, 2, 3))).shape
      (7, 4, 5)

    References:
      Uppal et al., NeurIPS 2023, section 4 (matrix-multiplication generators).
    """

    output_shape: tuple[int, int]
    batch_in_middle: bool = False

    def __post_init__(self):
        object.__setattr__(self, "output_shape", _check_shape("output_shape", self.output_shape))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        expected = 3 if self.batch_in_middle else 2
        if x.ndim < expected or (self.batch_in_middle and x.ndim != 3):
            layout = "(a, batch, b)" if self.batch_in_middle else "(..., a, b)"
            raise ValueError(f"MMLayer expects an input of shape {layout}, got shape {x.shape}")
        x_middle, batch = (x, None) if self.batch_in_middle else _to_middle(x)
        a, b = x_middle.shape[0], x_middle.shape[2]
        a_out, b_out = self.output_shape
        w_left = self.param("left_kernel", _fan_in_init(-1, -2), (a_out, a))
        b_left = self.param("left_bias", nn.initializers.zeros, (a_out, b))
        w_right = self.param("right_kernel", _fan_in_init(-2, -1), (b, b_out))
        b_right = self.param("right_bias", nn.initializers.zeros, (a_out, b_out))
        y = _mm_product(x_middle, w_left, b_left, w_right, b_right)
        return y if self.batch_in_middle else _from_middle(y, batch)


class MMGenerator(nn.Module):
    """Matrix-multiplication generator: noise matrix -> flat parameter vector.

    ``noise_shape -> hidden_shape`` (MMLayer), ``n_hidden`` layers ``hidden -> hidden``, then
    ``hidden -> output_shape``, with ``activation`` between layers (not after the last); the
    output matrix is flattened row-major. Its length ``prod(output_shape)`` must be at least
    the number of parameters it generates; the first D entries are used.

    Attributes:
      noise_shape: shape of the latent noise matrix, e.g. (40, 40).
      hidden_shape: shape of the hidden matrices, e.g. (420, 420).
      n_hidden: number of hidden -> hidden layers (>= 0).
      output_shape: shape of the output matrix, e.g. (957, 500).
      activation: elementwise nonlinearity (default ELU).

    Example (the paper's generator for an MLP 784-400-400-10 on MNIST, 3,130,380 parameters):

      >>> gen = MMGenerator((40, 40), (420, 420), 2, (957, 500))
      >>> gen.output_size, gen.num_params
      (478500, 3130380)
    """

    noise_shape: tuple[int, int]
    hidden_shape: tuple[int, int]
    n_hidden: int
    output_shape: tuple[int, int]
    activation: Callable[[Array], Array] = nn.elu

    def __post_init__(self):
        object.__setattr__(self, "noise_shape", _check_shape("noise_shape", self.noise_shape))
        object.__setattr__(self, "hidden_shape", _check_shape("hidden_shape", self.hidden_shape))
        object.__setattr__(self, "output_shape", _check_shape("output_shape", self.output_shape))
        object.__setattr__(self, "n_hidden", _check_count("n_hidden", self.n_hidden, 0))
        super().__post_init__()

    @property
    def output_size(self) -> int:
        return math.prod(self.output_shape)

    @property
    def num_params(self) -> int:
        shapes = [self.noise_shape] + [self.hidden_shape] * (self.n_hidden + 1) + [self.output_shape]
        return sum(_mm_layer_param_count(i, o) for i, o in zip(shapes[:-1], shapes[1:]))

    def setup(self):
        shapes = (self.hidden_shape,) * (self.n_hidden + 1) + (self.output_shape,)
        self.layers = [MMLayer(shape, batch_in_middle=True) for shape in shapes]

    def features(self, z: Array) -> Array:
        """The input of the last layer, in the (a, batch, b) layout."""
        if tuple(z.shape[-2:]) != self.noise_shape:
            raise ValueError(f"noise must end with shape {self.noise_shape}, got {z.shape}")
        h, _ = _to_middle(z)
        for layer in self.layers[:-1]:
            h = self.activation(layer(h))
        return h

    def readout(self, h: Array) -> Array:
        """Last layer and flattening: (a, batch, b) features -> (batch, output_size)."""
        y = self.layers[-1](h)
        return jnp.swapaxes(y, 0, 1).reshape(y.shape[1], -1)

    def __call__(self, z: Array) -> Array:
        batch = z.shape[:-2]
        return self.readout(self.features(z)).reshape(*batch, self.output_size)


class MultiHeadMMGenerator(nn.Module):
    """The correlated multi-head MM generator.

    A shared trunk of two MM layers maps the noise matrix to ``trunk_shapes[1]``; its output is
    flattened and cut into consecutive chunks, chunk i reshaped to ``head_input_shapes[i]`` and
    fed to its own ``MMGenerator`` head (``head_hidden_shapes[i]``, ``head_n_hidden[i]``,
    ``head_output_shapes[i]``); the heads' flattened outputs, each optionally cut to its first
    ``head_output_sizes[i]`` entries, are concatenated. The shared trunk correlates the
    parameters generated by different heads (layers), the heads keep each MM layer small.

    Build one from a configuration dict with ``generator_from_config`` or for a given parameter
    pytree with ``auto_generator``.

    Attributes:
      noise_shape: latent noise matrix shape.
      trunk_shapes: the two trunk layers' output shapes.
      head_input_shapes: per head, the shape of its chunk of the trunk output.
      head_hidden_shapes: per head, its hidden shape.
      head_output_shapes: per head, its output matrix shape.
      head_n_hidden: per head, its number of hidden -> hidden layers.
      head_output_sizes: per head, how many of its outputs to keep (None: all).
      activation: nonlinearity (default ELU), also applied to the trunk output.

    Example:
      >>> gen = MultiHeadMMGenerator((8, 8), ((16, 16), (8, 8)), ((4, 4), (4, 4)),
      ...                            ((16, 16), (8, 8)), ((20, 10), (5, 10)), (1, 1))
      >>> gen.output_size
      250
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
        spec = _validate_multi_head(
            noise_shape=self.noise_shape,
            trunk_shapes=self.trunk_shapes,
            head_input_shapes=self.head_input_shapes,
            head_hidden_shapes=self.head_hidden_shapes,
            head_output_shapes=self.head_output_shapes,
            head_n_hidden=self.head_n_hidden,
            head_output_sizes=self.head_output_sizes,
        )
        for name, value in spec.items():
            object.__setattr__(self, name, value)
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
        return trunk + sum(_head(self, i, parent=None).num_params for i in range(self.num_heads))

    def setup(self):
        self.trunk = [MMLayer(shape, batch_in_middle=True) for shape in self.trunk_shapes]
        self.heads = [_head(self, i) for i in range(self.num_heads)]

    def features(self, z: Array) -> tuple[Array, ...]:
        """Each head's last-layer input, in the (a, batch, b) layout."""
        if tuple(z.shape[-2:]) != self.noise_shape:
            raise ValueError(f"noise must end with shape {self.noise_shape}, got {z.shape}")
        h, _ = _to_middle(z)
        for layer in self.trunk:
            h = self.activation(layer(h))
        flat = jnp.swapaxes(h, 0, 1).reshape(h.shape[1], -1)
        features, start = [], 0
        for head, in_shape in zip(self.heads, self.head_input_shapes):
            size = math.prod(in_shape)
            chunk = flat[:, start : start + size].reshape(-1, *in_shape)
            features.append(head.features(chunk))
            start += size
        return tuple(features)

    def readout(self, features: Sequence[Array]) -> Array:
        outputs = [
            head.readout(h)[:, :keep] for head, h, keep in zip(self.heads, features, self.head_sizes)
        ]
        return jnp.concatenate(outputs, axis=-1)

    def __call__(self, z: Array) -> Array:
        batch = z.shape[:-2]
        return self.readout(self.features(z)).reshape(*batch, self.output_size)


def _head(generator: MultiHeadMMGenerator, i: int, **kwargs) -> MMGenerator:
    """Head i of a multi-head generator (its parameters are ``params[f"heads_{i}"]``)."""
    return MMGenerator(
        generator.head_input_shapes[i],
        generator.head_hidden_shapes[i],
        generator.head_n_hidden[i],
        generator.head_output_shapes[i],
        generator.activation,
        **kwargs,
    )


class MLPGenerator(nn.Module):
    """A dense generator ``z (d,) -> (output_size,)`` for toy problems and small networks.

    Attributes:
      latent_dim: d.
      output_size: the number of generated parameters.
      hidden_sizes: widths of the hidden layers.
      activation: nonlinearity between layers (default ELU).

    Example:
      >>> gen = MLPGenerator(latent_dim=2, output_size=3, hidden_sizes=(8,))
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
        return sum((i + 1) * o for i, o in zip(widths[:-1], widths[1:]))

    def setup(self):
        self.hidden = [nn.Dense(width) for width in self.hidden_sizes]
        self.out = nn.Dense(self.output_size)

    def features(self, z: Array) -> Array:
        """The input of the last (dense) layer."""
        if z.shape[-1] != self.latent_dim:
            raise ValueError(f"noise must end with dimension {self.latent_dim}, got {z.shape}")
        h = z
        for layer in self.hidden:
            h = self.activation(layer(h))
        return h

    def readout(self, h: Array) -> Array:
        return self.out(h)

    def __call__(self, z: Array) -> Array:
        return self.readout(self.features(z))


def count_params(tree: PyTree) -> int:
    """Number of scalar entries in a pytree of arrays (e.g. a ``params`` dict)."""
    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


# ----- the readout Gram operator L^T M L of each generator's last layer ----------------------
#
# `segments` lists (start, stop, weight) over the generator's flat output: M is diagonal with
# `weight` on [start, stop) and zero elsewhere (outputs the model does not use). For an MM
# readout Y = W_l H W_r + C, M applied to Y is a row scaling except on the few rows that a
# segment boundary cuts, so L^T M L H = (W_l^T diag(mu) W_l) H (W_r W_r^T) + (cut rows): two
# products with small Gram matrices instead of four with the large W_l and W_r.


def _row_weights(segments, num_rows: int, num_cols: int):
    """Splits segment weights over a (num_rows, num_cols) matrix into whole rows and cut rows."""
    row_weight = np.zeros(num_rows)
    cut_rows: dict[int, np.ndarray] = {}

    def cut(row, lo, hi, weight):
        cut_rows.setdefault(row, np.zeros(num_cols))[lo:hi] = weight

    for start, stop, weight in segments:
        if stop <= start:
            continue
        first_row, first_col = divmod(start, num_cols)
        last_row, last_col = divmod(stop, num_cols)  # stop is exclusive
        if first_row == last_row:
            cut(first_row, first_col, last_col, weight)
            continue
        if first_col:
            cut(first_row, first_col, num_cols, weight)
            first_row += 1
        row_weight[first_row:last_row] = weight
        if last_col:
            cut(last_row, 0, last_col, weight)
    rows = sorted(cut_rows)
    return row_weight, rows, np.array([cut_rows[r] for r in rows]).reshape(len(rows), num_cols)


def _mm_readout_gram(w_left: Array, w_right: Array, segments) -> Callable[[Array], Array]:
    num_rows, num_cols = w_left.shape[0], w_right.shape[1]
    row_weight, cut_rows, cut_weights = _row_weights(segments, num_rows, num_cols)
    dtype = w_left.dtype
    gram_left = w_left.T @ (jnp.asarray(row_weight, dtype)[:, None] * w_left)
    gram_right = w_right @ w_right.T
    w_cut = w_left[np.asarray(cut_rows, dtype=int)]
    cut_weights = jnp.asarray(cut_weights, dtype)

    def apply(h: Array) -> Array:  # (a, batch, b) -> (a, batch, b)
        a, batch, b = h.shape
        out = (gram_left @ h.reshape(a, batch * b)).reshape(a * batch, b) @ gram_right
        out = out.reshape(a, batch, b)
        if cut_rows:
            y_cut = jnp.einsum("ra,asb->rsb", w_cut, h) @ w_right * cut_weights[:, None, :]
            out = out + jnp.einsum("ra,rsb->asb", w_cut, y_cut @ w_right.T)
        return out

    return apply


def _clip_segments(segments, start: int, stop: int):
    return [(max(s, start) - start, min(e, stop) - start, w) for s, e, w in segments if s < stop and e > start]


def _readout_gram(generator: nn.Module, params: PyTree, segments) -> Callable | None:
    """``h -> L^T M L h`` for the last layer L of one of this module's generators, else None."""
    if isinstance(generator, MMGenerator):
        last = params[f"layers_{generator.n_hidden + 1}"]
        return _mm_readout_gram(last["left_kernel"], last["right_kernel"], segments)
    if isinstance(generator, MultiHeadMMGenerator):
        grams, offset = [], 0
        for i, size in enumerate(generator.head_sizes):
            local = _clip_segments(segments, offset, offset + size)
            grams.append(_readout_gram(_head(generator, i, parent=None), params[f"heads_{i}"], local))
            offset += size
        return lambda features: tuple(gram(h) for gram, h in zip(grams, features))
    if isinstance(generator, MLPGenerator):
        kernel = params["out"]["kernel"]  # (hidden, output)
        weights = np.zeros(kernel.shape[1])
        for start, stop, weight in segments:
            weights[start:stop] = weight
        gram = (kernel * jnp.asarray(weights, kernel.dtype)) @ kernel.T
        return lambda h: h @ gram
    return None


# ---------------------------------------------------------------------------------------------
# Configurations: the four-part description of the published generators, as a plain dict.
# ---------------------------------------------------------------------------------------------

_SINGLE_KEYS = ("noise_shape", "hidden_shape", "n_hidden", "output_shape")
_MULTI_KEYS = (
    "noise_shape",
    "trunk_shapes",
    "head_input_shapes",
    "head_hidden_shapes",
    "head_output_shapes",
    "head_n_hidden",
)


def _validate_multi_head(
    *,
    noise_shape,
    trunk_shapes,
    head_input_shapes,
    head_hidden_shapes,
    head_output_shapes,
    head_n_hidden,
    head_output_sizes=None,
) -> dict[str, Any]:
    noise_shape = _check_shape("noise_shape", noise_shape)
    try:
        trunk_shapes = tuple(trunk_shapes)
    except TypeError:
        raise ValueError(f"trunk_shapes must be two matrix shapes, got {trunk_shapes!r}") from None
    if len(trunk_shapes) != 2:
        raise ValueError(f"trunk_shapes must be two matrix shapes, got {trunk_shapes!r}")
    trunk_shapes = tuple(_check_shape(f"trunk_shapes[{i}]", s) for i, s in enumerate(trunk_shapes))

    def shape_list(name, value):
        try:
            value = tuple(value)
        except TypeError:
            raise ValueError(f"{name} must be a list of matrix shapes, got {value!r}") from None
        if not value:
            raise ValueError(f"{name} must list at least one head, got {value!r}")
        return tuple(_check_shape(f"{name}[{i}]", s) for i, s in enumerate(value))

    head_input_shapes = shape_list("head_input_shapes", head_input_shapes)
    head_hidden_shapes = shape_list("head_hidden_shapes", head_hidden_shapes)
    head_output_shapes = shape_list("head_output_shapes", head_output_shapes)
    num_heads = len(head_output_shapes)
    if isinstance(head_n_hidden, (int, np.integer)) and not isinstance(head_n_hidden, bool):
        head_n_hidden = (head_n_hidden,) * num_heads
    try:
        head_n_hidden = tuple(head_n_hidden)
    except TypeError:
        raise ValueError(f"head_n_hidden must be an integer or one per head, got {head_n_hidden!r}") from None
    head_n_hidden = tuple(_check_count(f"head_n_hidden[{i}]", n, 0) for i, n in enumerate(head_n_hidden))
    for name, value in (
        ("head_input_shapes", head_input_shapes),
        ("head_hidden_shapes", head_hidden_shapes),
        ("head_n_hidden", head_n_hidden),
    ):
        if len(value) != num_heads:
            raise ValueError(
                f"{name} has {len(value)} entries but head_output_shapes has {num_heads}: "
                "every head needs an input shape, a hidden shape, an output shape and n_hidden"
            )
    trunk_size = math.prod(trunk_shapes[1])
    needed = sum(math.prod(s) for s in head_input_shapes)
    if needed > trunk_size:
        raise ValueError(
            f"head_input_shapes need {needed} trunk outputs in total but trunk_shapes[1] = "
            f"{trunk_shapes[1]} provides only {trunk_size}"
        )
    if head_output_sizes is not None:
        head_output_sizes = tuple(
            _check_count(f"head_output_sizes[{i}]", n) for i, n in enumerate(head_output_sizes)
        )
        if len(head_output_sizes) != num_heads:
            raise ValueError(f"head_output_sizes must have one entry per head ({num_heads})")
        for i, (n, shape) in enumerate(zip(head_output_sizes, head_output_shapes)):
            if n > math.prod(shape):
                raise ValueError(
                    f"head_output_sizes[{i}] = {n} exceeds the head's output {shape} "
                    f"({math.prod(shape)} entries)"
                )
    return dict(
        noise_shape=noise_shape,
        trunk_shapes=trunk_shapes,
        head_input_shapes=head_input_shapes,
        head_hidden_shapes=head_hidden_shapes,
        head_output_shapes=head_output_shapes,
        head_n_hidden=head_n_hidden,
        head_output_sizes=head_output_sizes,
    )


def generator_from_config(config: Mapping[str, Any] | Sequence[Any], activation=nn.elu) -> nn.Module:
    """Builds an MM generator from a plain configuration (e.g. loaded from YAML or JSON).

    Three forms are accepted:

    * single generator, named: ``{"noise_shape": [40, 40], "hidden_shape": [420, 420],
      "n_hidden": 2, "output_shape": [957, 500]}`` -> ``MMGenerator``;
    * multi-head, named: ``{"noise_shape", "trunk_shapes" (two shapes), "head_input_shapes",
      "head_hidden_shapes", "head_output_shapes", "head_n_hidden" (int or one per head)}``
      -> ``MultiHeadMMGenerator``;
    * the four-part positional list of the original configurations,
      ``[input_size, output_size, hidden_units, num_hidden_layers]``: with a single noise
      shape in ``input_size`` it is a single generator ``[noise, output, hidden, n_hidden]``;
      for a multi-head generator ``input_size = [noise, head_input_1, ..., head_input_H]``,
      ``output_size = [head_output_1, ...]``, ``hidden_units = [head_hidden_1, ...,
      head_hidden_H, trunk_1, trunk_2]`` (the heads' hidden shapes, then the trunk's two) and
      ``num_hidden_layers = [n_1, ..., n_H]`` (or one integer).

    Args:
      config: the configuration.
      activation: nonlinearity between layers (default ELU).

    Returns:
      An ``MMGenerator`` or ``MultiHeadMMGenerator``.

    Raises:
      ValueError: naming the malformed entry (missing or unknown keys, non-positive or
        non-integer shapes, inconsistent numbers of heads, a trunk too small for the heads).

    Example:
      >>> gen = generator_from_config({"noise_shape": [40, 40], "hidden_shape": [420, 420],
      ...                              "n_hidden": 2, "output_shape": [957, 500]})
      >>> gen.num_params
      3130380
    """
    if isinstance(config, Mapping):
        keys = set(config)
        if "trunk_shapes" in keys:
            expected, optional = set(_MULTI_KEYS), {"head_output_sizes"}
        else:
            expected, optional = set(_SINGLE_KEYS), set()
        missing = sorted(expected - keys)
        unknown = sorted(keys - expected - optional)
        if missing or unknown:
            raise ValueError(
                f"config: missing keys {missing}, unknown keys {unknown}; a single generator needs "
                f"{list(_SINGLE_KEYS)}, a multi-head one {list(_MULTI_KEYS)}"
            )
        if "trunk_shapes" in keys:
            return MultiHeadMMGenerator(**_validate_multi_head(**config), activation=activation)
        return MMGenerator(**{k: config[k] for k in _SINGLE_KEYS}, activation=activation)
    if isinstance(config, (str, bytes)) or not isinstance(config, Sequence) or len(config) != 4:
        raise ValueError(
            "config must be a dict or the four-part list [input_size, output_size, hidden_units, "
            f"num_hidden_layers], got {config!r}"
        )
    input_size, output_size, hidden_units, n_hidden = config
    if _is_shape(input_size):  # a single generator
        return MMGenerator(input_size, hidden_units, n_hidden, output_size, activation=activation)
    if not isinstance(input_size, Sequence) or len(input_size) < 2:
        raise ValueError(
            "config[0] (input_size) must be the noise shape, or the noise shape followed by one "
            f"input shape per head, got {input_size!r}"
        )
    if not isinstance(hidden_units, Sequence) or len(hidden_units) < 3:
        raise ValueError(
            "config[2] (hidden_units) must list each head's hidden shape followed by the trunk's "
            f"two shapes, got {hidden_units!r}"
        )
    spec = _validate_multi_head(
        noise_shape=input_size[0],
        trunk_shapes=hidden_units[-2:],
        head_input_shapes=input_size[1:],
        head_hidden_shapes=hidden_units[:-2],
        head_output_shapes=output_size,
        head_n_hidden=n_hidden,
    )
    return MultiHeadMMGenerator(**spec, activation=activation)


def _is_shape(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes))
        and len(value) == 2
        and all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in value)
    )


# ---------------------------------------------------------------------------------------------
# 3. Any model becomes Bayesian: which leaves are stochastic, and how a flat vector maps onto
# the model's parameter pytree.
# ---------------------------------------------------------------------------------------------


def _path_name(key_path) -> str:
    name = jax.tree_util.keystr(key_path, simple=True, separator="/")
    # nnx.State leaves are the `value` of a Variable: drop it so names read like linen paths.
    if name.endswith("/value"):
        name = name[: -len("/value")]
    return name


@dataclasses.dataclass(frozen=True, eq=False)
class ParameterLayout:
    """How a flat vector of stochastic parameters maps onto a model's parameter pytree.

    The stochastic leaves, in the pytree's flattening order, are consecutive slices of the
    flat vector (each raveled row-major); the other leaves are deterministic.

    Attributes:
      treedef: the pytree structure (a linen ``params`` dict, an ``nnx.State``, ...).
      paths: one "/"-joined name per leaf, e.g. ``"Dense_0/kernel"``.
      shapes, dtypes: per leaf.
      stochastic: per leaf, whether the generator produces it.
    """

    treedef: Any
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    stochastic: tuple[bool, ...]

    @classmethod
    def from_params(cls, params: PyTree, stochastic: Any = None) -> "ParameterLayout":
        """Builds the layout of ``params``.

        Args:
          params: the model's parameter pytree (values are only read for shapes and dtypes).
          stochastic: which leaves the generator produces. ``None``: all. A callable
            ``(path: str, leaf) -> bool``, e.g. ``lambda path, _: path.startswith("Dense_2")``
            for the last layer. Or a pytree of booleans with the structure of ``params``.
        """
        with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
        if not with_path:
            raise ValueError("params has no array leaves")
        paths = tuple(_path_name(p) for p, _ in with_path)
        leaves = [leaf for _, leaf in with_path]
        for path, leaf in zip(paths, leaves):
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                raise ValueError(f"params leaf {path!r} has dtype {jnp.result_type(leaf)}; only floating leaves are supported")
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
            raise ValueError("stochastic selects no parameter; at least one leaf must be stochastic")
        return cls(
            treedef=treedef,
            paths=paths,
            shapes=tuple(tuple(np.shape(leaf)) for leaf in leaves),
            dtypes=tuple(jnp.result_type(leaf) for leaf in leaves),
            stochastic=tuple(mask),
        )

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def num_params(self) -> int:
        """All parameters of the model."""
        return sum(self.sizes)

    @property
    def num_stochastic(self) -> int:
        """D: the parameters produced by the generator."""
        return sum(n for n, s in zip(self.sizes, self.stochastic) if s)

    @property
    def stochastic_paths(self) -> tuple[str, ...]:
        return tuple(p for p, s in zip(self.paths, self.stochastic) if s)

    @property
    def stochastic_sizes(self) -> tuple[int, ...]:
        return tuple(n for n, s in zip(self.sizes, self.stochastic) if s)

    def deterministic_values(self, params: PyTree) -> dict[str, Array]:
        """The deterministic leaves of ``params``, keyed by path."""
        leaves = self.treedef.flatten_up_to(params)
        return {p: jnp.asarray(v) for p, v, s in zip(self.paths, leaves, self.stochastic) if not s}

    def stochastic_leaves(self, params: PyTree) -> list[Array]:
        leaves = self.treedef.flatten_up_to(params)
        return [v for v, s in zip(leaves, self.stochastic) if s]

    def assemble(self, theta: Array, deterministic: Mapping[str, Array]) -> PyTree:
        """Builds the parameter pytree from the flat stochastic vector and the other leaves.

        Args:
          theta: the stochastic parameters, shape (D,) (or longer: extra entries are ignored).
          deterministic: the deterministic leaves keyed by path.

        Returns:
          A pytree with the structure, shapes and dtypes of the template.
        """
        leaves, offset = [], 0
        for path, shape, dtype, size, is_stochastic in zip(
            self.paths, self.shapes, self.dtypes, self.sizes, self.stochastic
        ):
            if is_stochastic:
                leaves.append(theta[offset : offset + size].reshape(shape).astype(dtype))
                offset += size
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


def _near_square(size: int) -> tuple[int, int]:
    cols = max(1, math.ceil(math.sqrt(size)))
    return math.ceil(size / cols), cols


def auto_generator(
    layout: ParameterLayout | PyTree,
    *,
    noise_shape: Sequence[int] | None = None,
    trunk_shape: Sequence[int] | None = None,
    head_input_shape: Sequence[int] = (8, 8),
    head_hidden: int = 64,
    head_n_hidden: int = 1,
    activation: Callable[[Array], Array] = nn.elu,
) -> MultiHeadMMGenerator:
    """A multi-head MM generator sized for a parameter pytree: one head per module.

    The stochastic leaves are grouped by module (the path without its last component: a
    Dense layer's kernel and bias form one group). A group whose leaves share their last
    dimension n >= 4 gets an output matrix of exactly (group size / n) x n (a Dense kernel
    in x out plus its bias is (in + 1) x out: one row per input unit, one for the bias);
    other groups get the smallest near-square matrix covering them, and the surplus is cut
    (a width-1 output matrix would hang the whole head on a single random scalar W_r).
    Each head has hidden shape (clip(rows, 8, head_hidden), clip(cols, 8, head_hidden)) and
    ``head_n_hidden`` hidden layers; the shared trunk maps the noise to ``trunk_shape`` and
    then to one ``head_input_shape`` chunk per head. The output has exactly D entries, in the
    layout's order. ``ImplicitBNN.report`` shows the generator's size against the network's.

    Args:
      layout: a ``ParameterLayout`` or a parameter pytree (all leaves stochastic).
      noise_shape: latent noise matrix (d = its product); default (k, k) with
        k = clip(round(sqrt(D) / 2), 2, 16), so d = 256 from D = 1,000 parameters upwards.
      trunk_shape: output shape of the trunk's first layer; default (2k, 2k).
      head_input_shape: shape of each head's input chunk.
      head_hidden: cap on each side of the heads' hidden matrices.
      head_n_hidden: hidden -> hidden layers per head.
      activation: nonlinearity.

    Returns:
      A ``MultiHeadMMGenerator``.

    Example:
      >>> params = {"Dense_0": {"kernel": jnp.zeros((784, 400)), "bias": jnp.zeros(400)},
      ...           "Dense_1": {"kernel": jnp.zeros((400, 10)), "bias": jnp.zeros(10)}}
      >>> auto_generator(params).head_output_shapes
      ((785, 400), (401, 10))
    """
    if not isinstance(layout, ParameterLayout):
        layout = ParameterLayout.from_params(layout)
    side = min(16, max(2, round(math.sqrt(layout.num_stochastic) / 2)))
    noise_shape = _check_shape("noise_shape", (side, side) if noise_shape is None else noise_shape)
    trunk_shape = _check_shape("trunk_shape", (2 * side, 2 * side) if trunk_shape is None else trunk_shape)
    head_input_shape = _check_shape("head_input_shape", head_input_shape)
    head_hidden = _check_count("head_hidden", head_hidden)
    head_n_hidden = _check_count("head_n_hidden", head_n_hidden, 0)
    groups: list[tuple[str, list[tuple[int, ...]]]] = []
    for path, shape, is_stochastic in zip(layout.paths, layout.shapes, layout.stochastic):
        if not is_stochastic:
            continue
        module = path.rsplit("/", 1)[0] if "/" in path else path
        if groups and groups[-1][0] == module:
            groups[-1][1].append(shape)
        else:
            groups.append((module, [shape]))
    output_shapes, output_sizes = [], []
    for _, shapes in groups:
        size = sum(math.prod(s) for s in shapes)
        last_dims = {s[-1] if s else 0 for s in shapes}
        width = last_dims.pop() if len(last_dims) == 1 else 0
        output_shapes.append((size // width, width) if width >= 4 else _near_square(size))
        output_sizes.append(size)
    clip = lambda n: max(min(8, head_hidden), min(n, head_hidden))
    hidden_shapes = [(clip(rows), clip(cols)) for rows, cols in output_shapes]
    num_heads = len(groups)
    return MultiHeadMMGenerator(
        noise_shape=noise_shape,
        trunk_shapes=(trunk_shape, (num_heads * head_input_shape[0], head_input_shape[1])),
        head_input_shapes=(head_input_shape,) * num_heads,
        head_hidden_shapes=tuple(hidden_shapes),
        head_output_shapes=tuple(output_shapes),
        head_n_hidden=(head_n_hidden,) * num_heads,
        head_output_sizes=tuple(output_sizes),
        activation=activation,
    )


# ---------------------------------------------------------------------------------------------
# 4. Likelihoods: per-example log-likelihoods of model outputs, with optional trainable
# (deterministic) parameters of their own.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Categorical:
    """Classification: ``log softmax(logits)[label]`` per example; predictions are class
    probabilities. Targets are integer labels of shape (B,)."""

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
      learn_noise: train ``log(noise_std)`` as a deterministic parameter alongside the
        generator (``vi_params["likelihood"]["log_noise_std"]``).
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
        if targets.shape != outputs.shape:
            if outputs.shape == targets.shape + (1,):
                targets = targets[..., None]
            else:
                raise ValueError(
                    f"targets of shape {targets.shape} do not match model outputs of shape {outputs.shape}"
                )
        variance = self.noise_variance(params)
        log_density = -0.5 * (jnp.square(targets - outputs) / variance + jnp.log(2 * math.pi * variance))
        return log_density.reshape(log_density.shape[0], -1).sum(-1) if log_density.ndim > 1 else log_density


@dataclasses.dataclass(frozen=True)
class CustomLikelihood:
    """A user-supplied log-likelihood ``fn(outputs, targets) -> log-likelihoods``.

    The ELBO averages the returned values (per-example log-likelihoods of the minibatch, shape
    (B,), or a single value for the whole batch) and multiplies by nothing else: ``num_data``
    scales the prior and entropy instead (per-datapoint ELBO).
    """

    fn: Callable[[Array, Array], Array]

    def init(self) -> dict:
        return {}

    def log_prob(self, params: dict, outputs: Array, targets: Array) -> Array:
        return self.fn(outputs, targets)


def _as_likelihood(likelihood: Any):
    if isinstance(likelihood, (Categorical, Gaussian, CustomLikelihood)):
        return likelihood
    if hasattr(likelihood, "log_prob") and hasattr(likelihood, "init"):
        return likelihood
    if callable(likelihood):
        return CustomLikelihood(likelihood)
    raise ValueError(
        "likelihood must be Categorical(), Gaussian(...), a CustomLikelihood or a callable "
        f"(outputs, targets) -> log-likelihoods, got {likelihood!r}"
    )


# ---------------------------------------------------------------------------------------------
# 5. The Bayesian model: generator + layout + likelihood -> ELBO, training step, predictions.
# ---------------------------------------------------------------------------------------------


class _Terms(NamedTuple):
    log_likelihood: Array  # (S,) mean over the minibatch
    log_prior: Array  # (S,)
    log_det: Array  # (S,) the log-determinant term of the entropy


@dataclasses.dataclass(frozen=True, eq=False)
class ImplicitBNN:
    """A Flax model with an implicit posterior over (some of) its parameters.

    Create it with ``ImplicitBNN.from_linen``, ``ImplicitBNN.from_nnx`` or
    ``ImplicitBNN.create``. The variational parameters are a dict::

        vi_params = {"generator": ...,        # trained generator parameters gamma
                     "deterministic": {...},  # trained point estimates of the other leaves
                     "likelihood": {...}}     # e.g. a learned log noise std

    Output scale. Stochastic leaf l is ``theta_l = shift_l + scale_l * g_l(z) + sigma eps``,
    with fixed (untrained) scalars per leaf chosen at creation so that the first sampled
    networks look like normally initialised ones: scale_l = target_std_l / raw_std_l and
    shift_l = target_mean_l - scale_l * raw_mean_l, where raw_mean_l and raw_std_l are the
    mean and standard deviation of the generator's raw output for the leaf at initialisation
    (16 latent samples, pooled over the leaf's entries) and target_mean_l, target_std_l those
    of the template leaf. A constant template leaf (zero biases, LayerNorm scales) takes the
    largest std of the other leaves of its module (a Dense bias gets its kernel's std, much
    like PyTorch's bias initialisation), or the median std of all leaves when its module has
    no random leaf. The entropy and the prior are those of theta (the scale is part of g).

    Attributes:
      apply_fn: ``apply_fn(params, x) -> outputs`` for the model.
      generator: a Flax generator with ``noise_shape`` (latent z reshaped to it) returning a
        flat vector of at least D entries (leading batch dimensions kept).
      layout: which leaves are stochastic, see ``ParameterLayout``.
      likelihood: ``Categorical()``, ``Gaussian(...)`` or ``CustomLikelihood(fn)``.
      sigma: output noise std (> 0), used in training and prediction.
      prior_std: std of the Gaussian prior N(0, prior_std^2 I) on the stochastic leaves.
      noise_shape: the generator's input shape.
      output_scales, output_shifts: the fixed per-leaf affine map described above.
      deterministic_init: initial values of the deterministic leaves.
      latent_dtype: dtype of z (that of the generator's parameters).
    """

    apply_fn: Callable[[PyTree, Any], Array]
    generator: nn.Module
    layout: ParameterLayout
    likelihood: Any
    sigma: float
    prior_std: float
    noise_shape: tuple[int, ...]
    output_scales: tuple[float, ...]
    output_shifts: tuple[float, ...]
    deterministic_init: Mapping[str, Array]
    latent_dtype: Any = jnp.float32

    # ----- construction -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        apply_fn: Callable[[PyTree, Any], Array],
        params: PyTree,
        *,
        likelihood: Any = None,
        generator: nn.Module | None = None,
        stochastic: Any = None,
        sigma: float = 1e-3,
        prior_std: float = 1.0,
        output_scale: str | float | None = "auto",
        noise_shape: Sequence[int] | None = None,
        key: Array | None = None,
        **auto_generator_kwargs,
    ) -> "ImplicitBNN":
        """Makes the model ``apply_fn(params, x)`` Bayesian.

        Args:
          apply_fn: ``apply_fn(params, x) -> outputs``; params has the structure of ``params``.
          params: a template parameter pytree (linen ``params`` dict, ``nnx.State``, ...):
            shapes and dtypes of all leaves, initial values of the deterministic leaves, and
            the initial scale of the stochastic ones.
          likelihood: ``Categorical()`` (default), ``Gaussian(noise_std, learn_noise)``, a
            ``CustomLikelihood`` or a callable ``(outputs, targets) -> log-likelihoods``.
          generator: a Flax generator module (``MMGenerator``, ``MultiHeadMMGenerator``,
            ``MLPGenerator``, ``generator_from_config(...)`` or your own with a
            ``noise_shape``); None builds one with ``auto_generator``.
          stochastic: which leaves are stochastic (see ``ParameterLayout.from_params``);
            None: all. The others are trained as ordinary parameters in the same optimisation.
          sigma: output noise std (> 0), default 1e-3 as in the paper.
          prior_std: std of the Gaussian prior (> 0).
          output_scale: ``"auto"`` (see the class docstring), a float (scale for every leaf,
            no shift) or None (the raw generator output, as in the paper's code).
          noise_shape: the generator's input shape, when the module has no ``noise_shape``
            attribute; with ``generator=None``, the automatic generator's noise shape.
          key: PRNG key for calibrating the output scale (default ``jax.random.key(0)``);
            ``init`` with the same key gives exactly the calibrated generator.
          **auto_generator_kwargs: passed to ``auto_generator`` when ``generator`` is None.

        Returns:
          The ``ImplicitBNN``.

        Raises:
          ValueError: for a non-positive sigma or prior_std, a generator whose output is
            shorter than the number of stochastic parameters, or a bad ``stochastic``.
        """
        sigma = _check_positive("sigma", sigma)
        prior_std = _check_positive("prior_std", prior_std)
        likelihood = _as_likelihood(Categorical() if likelihood is None else likelihood)
        layout = ParameterLayout.from_params(params, stochastic)
        if generator is None:
            generator = auto_generator(layout, noise_shape=noise_shape, **auto_generator_kwargs)
            noise_shape = None
        elif auto_generator_kwargs:
            raise ValueError(
                f"{sorted(auto_generator_kwargs)} configure the automatic generator and cannot be "
                "combined with an explicit generator"
            )
        if noise_shape is None:
            noise_shape = getattr(generator, "noise_shape", None)
            if noise_shape is None:
                raise ValueError("noise_shape must be given for a generator without a noise_shape attribute")
        noise_shape = _check_shape("noise_shape", noise_shape, None)
        key = jax.random.key(0) if key is None else key

        gen_variables = jax.eval_shape(generator.init, key, jnp.zeros(noise_shape))
        param_leaves = jax.tree_util.tree_leaves(gen_variables)
        latent_dtype = param_leaves[0].dtype if param_leaves else jnp.float32
        output = jax.eval_shape(generator.apply, gen_variables, jnp.zeros((1, *noise_shape), latent_dtype))
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

        num_stochastic_leaves = sum(layout.stochastic)
        scales, shifts = (1.0,) * num_stochastic_leaves, (0.0,) * num_stochastic_leaves
        if isinstance(output_scale, str):
            if output_scale != "auto":
                raise ValueError(f"output_scale must be 'auto', a positive float or None, got {output_scale!r}")
            scales, shifts = _calibrate_output(generator, noise_shape, latent_dtype, layout, params, key)
        elif output_scale is not None:
            scales = (_check_positive("output_scale", output_scale),) * num_stochastic_leaves
        return cls(
            apply_fn=apply_fn,
            generator=generator,
            layout=layout,
            likelihood=likelihood,
            sigma=sigma,
            prior_std=prior_std,
            noise_shape=noise_shape,
            output_scales=scales,
            output_shifts=shifts,
            deterministic_init=layout.deterministic_values(params),
            latent_dtype=latent_dtype,
        )

    @classmethod
    def from_linen(cls, module: nn.Module, params: PyTree, **kwargs) -> "ImplicitBNN":
        """``create`` for a linen module whose only collection is ``params``.

        Example:
          >>> model = nn.Dense(3)
          >>> params = model.init(jax.random.key(0), jnp.zeros((1, 2)))["params"]
          >>> bnn = ImplicitBNN.from_linen(model, params)
        """
        if isinstance(params, Mapping) and set(params) == {"params"}:
            params = params["params"]
        return cls.create(lambda p, x: module.apply({"params": p}, x), params, **kwargs)

    @classmethod
    def from_nnx(cls, model: Any, **kwargs) -> "ImplicitBNN":
        """``create`` for an ``nnx.Module``: its ``nnx.Param`` state becomes Bayesian (or the
        subset selected by ``stochastic``); other state (e.g. batch statistics) is held fixed.

        Example:
          >>> from flax import nnx
          >>> bnn = ImplicitBNN.from_nnx(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
        """
        from flax import nnx

        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return cls.create(lambda p, x: nnx.merge(graphdef, p, rest)(x), params, **kwargs)

    @property
    def latent_dim(self) -> int:
        return math.prod(self.noise_shape)

    @property
    def num_stochastic(self) -> int:
        return self.layout.num_stochastic

    def init(self, key: Array) -> dict:
        """Initial variational parameters ``{"generator", "deterministic", "likelihood"}``."""
        gen_params = jax.jit(self.generator.init)(key, jnp.zeros(self.noise_shape, self.latent_dtype))["params"]
        return {
            "generator": gen_params,
            "deterministic": dict(self.deterministic_init),
            "likelihood": self.likelihood.init(),
        }

    def report(self, vi_params: dict | None = None) -> GeneratorReport:
        """Generator size against network size (``print(bnn.report())`` for a table)."""
        noise = jnp.zeros(self.noise_shape, self.latent_dtype)
        if vi_params is None:
            gen_params = jax.eval_shape(self.generator.init, jax.random.key(0), noise)["params"]
        else:
            gen_params = vi_params["generator"]
        output = jax.eval_shape(lambda p: self.generator.apply({"params": p}, noise[None]), gen_params)
        heads = ()
        if isinstance(self.generator, MultiHeadMMGenerator):
            heads = tuple(
                (str(i), shape, size)
                for i, (shape, size) in enumerate(
                    zip(self.generator.head_output_shapes, self.generator.head_sizes)
                )
            )
        return GeneratorReport(
            generator_params=count_params(gen_params),
            network_params=self.layout.num_params,
            stochastic_params=self.layout.num_stochastic,
            generator_output=int(output.shape[-1]),
            latent_dim=self.latent_dim,
            heads=heads,
        )

    # ----- the generator as a map from flat latents to flat parameter means --------------------

    def _output_affine(self, raw: Array) -> Array:
        """The fixed per-leaf ``shift + scale * raw`` on the first D generator outputs."""
        pieces, offset = [], 0
        for size, scale, shift in zip(self.layout.stochastic_sizes, self.output_scales, self.output_shifts):
            piece = raw[..., offset : offset + size]
            if scale != 1.0:
                piece = piece * scale
            if shift != 0.0:
                piece = piece + shift
            pieces.append(piece)
            offset += size
        return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)

    def mean_fn(self, gen_params: PyTree, z: Array) -> Array:
        """g(z): the means (..., D) of the stochastic parameters for flat latents z (..., d)."""
        batch = z.shape[:-1]
        raw = self.generator.apply({"params": gen_params}, z.reshape(*batch, *self.noise_shape))
        return self._output_affine(raw)

    @property
    def gram_factorisation(self) -> tuple[Callable, Callable] | None:
        """``(features_fn, readout_gram)`` for ``smallest_singular_value``, or None for a
        generator without a ``features`` method and a known last layer."""
        if not isinstance(self.generator, (MMGenerator, MultiHeadMMGenerator, MLPGenerator)):
            return None
        segments, offset = [], 0
        for size, scale in zip(self.layout.stochastic_sizes, self.output_scales):
            segments.append((offset, offset + size, scale**2))
            offset += size

        def features_fn(gen_params, z):
            batch = z.shape[:-1]
            return self.generator.apply(
                {"params": gen_params}, z.reshape(*batch, *self.noise_shape), method="features"
            )

        return features_fn, lambda gen_params: _readout_gram(self.generator, gen_params, segments)

    def _draw(self, keys: Array, size: int) -> Array:
        """One standard normal vector of ``size`` per key: (len(keys), size)."""
        return jax.vmap(lambda k: jax.random.normal(k, (size,), self.latent_dtype))(keys)

    def _sample_from_keys(self, vi_params: dict, keys: Array) -> Array:
        keys = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
        mean = self.mean_fn(vi_params["generator"], self._draw(keys[:, 0], self.latent_dim))
        return mean + self.sigma * self._draw(keys[:, 1], mean.shape[-1]).astype(mean.dtype)

    @partial(jax.jit, static_argnames=("self", "num_samples"))
    def sample_flat(self, vi_params: dict, key: Array, num_samples: int = 1) -> Array:
        """Draws of the stochastic parameters, ``g(z) + sigma eps``, shape (num_samples, D)."""
        keys = jax.random.split(key, _check_count("num_samples", num_samples))
        return self._sample_from_keys(vi_params, keys)

    @partial(jax.jit, static_argnames=("self", "num_samples"))
    def sample_params(self, vi_params: dict, key: Array, num_samples: int) -> PyTree:
        """``num_samples`` draws of the full parameter pytree, stacked along a leading axis."""
        theta = self.sample_flat(vi_params, key, num_samples)
        return jax.vmap(lambda t: self.layout.assemble(t, vi_params["deterministic"]))(theta)

    # ----- ELBO -------------------------------------------------------------------------------

    def _chunk_terms(self, vi_params, keys, batch, method, num_iterations) -> _Terms:
        """The ELBO terms of the samples drawn from ``keys``, one key per sample."""
        keys = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
        z = self._draw(keys[:, 0], self.latent_dim)
        gen_params = vi_params["generator"]
        if method == "exact":
            mean, log_det = exact_log_det(self.mean_fn, gen_params, z, self.sigma)
        elif method == "smallest_sv":
            mean, log_det = smallest_sv_log_det(
                self.mean_fn,
                gen_params,
                z,
                self.sigma,
                None,
                num_iterations,
                x0=self._draw(keys[:, 2], self.latent_dim),
                gram_factorisation=self.gram_factorisation,
            )
        else:  # entropy=None: no entropy term
            mean = self.mean_fn(gen_params, z)
            log_det = jnp.zeros(z.shape[0], jnp.float32)
        theta = mean + self.sigma * self._draw(keys[:, 1], mean.shape[-1]).astype(mean.dtype)
        inputs, targets = batch

        def log_likelihood(theta_one):
            outputs = self.apply_fn(self.layout.assemble(theta_one, vi_params["deterministic"]), inputs)
            return jnp.mean(self.likelihood.log_prob(vi_params["likelihood"], outputs, targets))

        log_lik = jax.vmap(log_likelihood)(theta)
        return _Terms(log_lik, gaussian_log_prior(theta, self.prior_std), log_det)

    def loss(
        self,
        vi_params: dict,
        key: Array,
        batch: tuple[Any, Any],
        *,
        num_data: int,
        num_samples: int = 1,
        entropy: str | None = "smallest_sv",
        num_iterations: int = 5,
        prior_weight: float | None = None,
        entropy_weight: float | None = None,
        include_constant: bool = True,
        chunk_size: int | None = None,
    ) -> tuple[Array, dict]:
        """Negative ELBO per data point on a minibatch, and its terms.

        ``loss = -( mean_s mean_i log p(y_i | x_i, theta_s) + w_p mean_s log p(theta_s) + w_H H )``

        with theta_s = g(z_s) + sigma eps_s, H the linearised entropy averaged over the S latent
        samples, and by default w_p = w_H = 1 / num_data (the ELBO divided by N, unbiased on
        minibatches). The paper's training down-weights the prior: ``prior_weight=8.5e-4 / B``
        and ``entropy_weight=1 / B`` for batch size B.

        Args:
          vi_params: from ``init``.
          key: PRNG key (latent samples, output noise and solver starts).
          batch: ``(inputs, targets)``.
          num_data: N, the training-set size (>= 1).
          num_samples: S, Monte Carlo samples (>= 1).
          entropy: ``"exact"``, ``"smallest_sv"`` or None (no entropy term: an ablation that
            trains the generator without the entropy, not an ELBO).
          num_iterations: eigen-solver iterations for ``"smallest_sv"``.
          prior_weight, entropy_weight: override w_p and w_H (>= 0; a traced array, e.g. an
            annealing schedule, is accepted as is).
          include_constant: include the entropy's constant terms (no effect on gradients).
          chunk_size: evaluate the S samples in chunks of this many (a batch inside a chunk,
            ``lax.map`` across chunks) to bound memory; None: all S at once. Each sample has
            its own key, so the chunking changes memory use, not the result.

        Returns:
          ``(loss, aux)`` with aux keys ``"loss"``, ``"expected_log_likelihood"`` (per data
          point), ``"log_prior"`` and ``"entropy"`` (totals over the D parameters) and
          ``"elbo"`` (the unweighted per-data-point ELBO estimate).
        """
        num_data = _check_count("num_data", num_data)
        num_samples = _check_count("num_samples", num_samples)
        num_iterations = _check_count("num_iterations", num_iterations)
        method = _check_entropy_method(entropy, allow_none=True)
        prior_weight = 1.0 / num_data if prior_weight is None else prior_weight
        entropy_weight = 1.0 / num_data if entropy_weight is None else entropy_weight
        for name, value in (("prior_weight", prior_weight), ("entropy_weight", entropy_weight)):
            if isinstance(value, jax.Array):
                continue
            try:
                valid = float(value) >= 0 and math.isfinite(float(value))
            except (TypeError, ValueError):
                valid = False
            if not valid:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        chunk_size = num_samples if chunk_size is None else _check_count("chunk_size", chunk_size)

        terms_of = lambda keys: self._chunk_terms(vi_params, keys, batch, method, num_iterations)
        terms = _map_chunks(terms_of, jax.random.split(key, num_samples), chunk_size)
        expected_log_lik = jnp.mean(terms.log_likelihood)
        log_prior = jnp.mean(terms.log_prior)
        entropy_value = jnp.mean(terms.log_det)
        if method is not None and include_constant:
            entropy_value = entropy_value + entropy_constant(self.num_stochastic, self.latent_dim, self.sigma)
        loss = -(expected_log_lik + prior_weight * log_prior + entropy_weight * entropy_value)
        aux = {
            "loss": loss,
            "expected_log_likelihood": expected_log_lik,
            "log_prior": log_prior,
            "entropy": entropy_value,
            "elbo": expected_log_lik + (log_prior + entropy_value) / num_data,
        }
        return loss, aux

    def make_train_step(self, optimizer: Any, **loss_kwargs) -> Callable:
        """A jitted training step for any Optax optimizer.

        Returns ``train_step(vi_params, opt_state, key, batch) -> (vi_params, opt_state, aux)``;
        ``loss_kwargs`` go to ``loss`` (``num_data`` is required).

        Example:
          >>> model = nn.Dense(2)
          >>> params = model.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
          >>> bnn = ImplicitBNN.from_linen(model, params, noise_shape=(2, 2))
          >>> vi_params = bnn.init(jax.random.key(1))
          >>> optimizer = optax.adam(1e-3)
          >>> opt_state = optimizer.init(vi_params)
          >>> step = bnn.make_train_step(optimizer, num_data=100, num_samples=4)
          >>> x, y = jnp.ones((8, 3)), jnp.zeros(8, int)
          >>> vi_params, opt_state, aux = step(vi_params, opt_state, jax.random.key(2), (x, y))
          >>> sorted(aux)
          ['elbo', 'entropy', 'expected_log_likelihood', 'log_prior', 'loss']
        """
        if "num_data" not in loss_kwargs:
            raise ValueError("num_data (the training-set size) is required")
        # Validate eagerly, so that a bad argument fails here rather than at the first call.
        _check_count("num_data", loss_kwargs["num_data"])
        _check_count("num_samples", loss_kwargs.get("num_samples", 1))
        _check_count("num_iterations", loss_kwargs.get("num_iterations", 5))
        _check_entropy_method(loss_kwargs.get("entropy", "smallest_sv"), allow_none=True)
        grad_fn = jax.grad(lambda p, k, b: self.loss(p, k, b, **loss_kwargs), has_aux=True)

        @jax.jit
        def train_step(vi_params, opt_state, key, batch):
            grads, aux = grad_fn(vi_params, key, batch)
            updates, opt_state = optimizer.update(grads, opt_state, vi_params)
            return optax.apply_updates(vi_params, updates), opt_state, aux

        return train_step

    # ----- prediction: Bayesian model averaging -------------------------------------------------

    def _outputs(self, vi_params, keys, x):
        """Model outputs under one parameter draw per key, stacked: (len(keys), ...)."""
        theta = self._sample_from_keys(vi_params, keys)
        assemble = lambda t: self.layout.assemble(t, vi_params["deterministic"])
        outputs = jax.vmap(lambda t: self.apply_fn(assemble(t), x))(theta)
        return outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32))

    def _sum_over_samples(self, vi_params, key, x, num_samples, chunk_size, statistic):
        """sum_k statistic(f(x; theta_k)) over K draws, at most chunk_size networks at once."""
        keys = jax.random.split(key, _check_count("num_samples", num_samples))
        chunk_sum = lambda ks: jax.tree_util.tree_map(
            lambda s: jnp.sum(s, axis=0), statistic(self._outputs(vi_params, ks, x))
        )
        return _map_chunks(chunk_sum, keys, _check_count("chunk_size", chunk_size), reduce="sum")

    @partial(jax.jit, static_argnames=("self", "num_samples", "chunk_size"))
    def predict_proba(
        self, vi_params: dict, key: Array, x: Any, num_samples: int = 100, chunk_size: int = 20
    ) -> Array:
        """Bayesian model average of class probabilities, ``(1/K) sum_k softmax(f(x; theta_k))``.

        Draws K fresh parameter samples (pass a fresh key for every call, e.g. per test
        batch); at most ``chunk_size`` networks are evaluated at once, so memory does not grow
        with K.

        Returns:
          Probabilities with the shape of the model's outputs.
        """
        return self._sum_over_samples(vi_params, key, x, num_samples, chunk_size, jax.nn.softmax) / num_samples

    @partial(jax.jit, static_argnames=("self", "num_samples", "chunk_size", "include_noise"))
    def predict_mean_var(
        self,
        vi_params: dict,
        key: Array,
        x: Any,
        num_samples: int = 100,
        chunk_size: int = 20,
        include_noise: bool = True,
    ) -> tuple[Array, Array]:
        """Bayesian model average for regression: predictive mean and variance.

        ``mean = (1/K) sum_k f_k(x)``, ``variance = (1/K) sum_k (f_k(x) - mean)^2`` (epistemic)
        plus the Gaussian likelihood's noise variance when ``include_noise``. Memory as in
        ``predict_proba``.

        Returns:
          ``(mean, variance)``, each with the shape of the model's outputs.
        """
        if include_noise and not isinstance(self.likelihood, Gaussian):
            raise ValueError("include_noise=True needs a Gaussian likelihood; pass include_noise=False")
        # Sums of squares around one extra draw rather than around 0 avoid cancellation.
        reference = self._outputs(vi_params, jax.random.fold_in(key, 1)[None], x)[0]
        moments = lambda f: (f - reference, jnp.square(f - reference))
        total, total_sq = self._sum_over_samples(vi_params, key, x, num_samples, chunk_size, moments)
        shifted_mean = total / num_samples
        variance = jnp.maximum(total_sq / num_samples - jnp.square(shifted_mean), 0.0)
        if include_noise:
            variance = variance + self.likelihood.noise_variance(vi_params["likelihood"])
        return reference + shifted_mean, variance

    @partial(jax.jit, static_argnames=("self", "num_samples"))
    def sample_outputs(self, vi_params: dict, key: Array, x: Any, num_samples: int = 10) -> Array:
        """Model outputs under ``num_samples`` parameter draws, stacked on a leading axis."""
        return self._outputs(vi_params, jax.random.split(key, _check_count("num_samples", num_samples)), x)


def _map_chunks(fn, keys: Array, chunk_size: int, reduce: str = "concatenate"):
    """``fn`` over consecutive chunks of at most ``chunk_size`` keys: ``lax.map`` over the full
    chunks, one more call for the remainder. ``fn(keys)`` returns arrays with a leading axis
    of len(keys) (``reduce="concatenate"``) or sums over its keys (``reduce="sum"``)."""
    num_keys = keys.shape[0]
    chunk_size = min(chunk_size, num_keys)
    num_full, remainder = divmod(num_keys, chunk_size)
    full = keys[: num_full * chunk_size].reshape(num_full, chunk_size, *keys.shape[1:])
    if num_full == 1:
        results = jax.tree_util.tree_map(lambda r: r[None], fn(full[0]))
    else:
        results = jax.lax.map(fn, full)
    if reduce == "sum":
        results = jax.tree_util.tree_map(lambda r: jnp.sum(r, axis=0), results)
        if remainder:
            results = jax.tree_util.tree_map(jnp.add, results, fn(keys[num_full * chunk_size :]))
        return results
    results = jax.tree_util.tree_map(lambda r: r.reshape(-1, *r.shape[2:]), results)
    if remainder:
        extra = fn(keys[num_full * chunk_size :])
        results = jax.tree_util.tree_map(lambda r, e: jnp.concatenate([r, e]), results, extra)
    return results


def _calibrate_output(generator, noise_shape, latent_dtype, layout, params, key, num_draws: int = 16):
    """Per-leaf (scale, shift) making the first sampled network match the template's statistics."""
    gen_params = jax.jit(generator.init)(key, jnp.zeros(noise_shape, latent_dtype))["params"]
    sizes = layout.stochastic_sizes

    def leaf_moments(z):
        raw = generator.apply({"params": gen_params}, z[None])[0]
        moments, offset = [], 0
        for size in sizes:
            piece = raw[offset : offset + size].astype(jnp.float32)
            moments.append(jnp.stack([jnp.mean(piece), jnp.mean(jnp.square(piece - jnp.mean(piece)))]))
            offset += size
        return jnp.stack(moments)

    zs = jax.random.normal(jax.random.fold_in(key, 1), (num_draws, *noise_shape), latent_dtype)
    moments = np.asarray(jax.jit(lambda zs: jax.lax.map(leaf_moments, zs))(zs), dtype=np.float64)
    # Pool the draws: total variance = mean within-draw variance + variance of the draw means.
    raw_mean = moments[:, :, 0].mean(0)
    raw_std = np.sqrt(moments[:, :, 1].mean(0) + moments[:, :, 0].var(0))

    templates = [np.asarray(jax.device_get(v), dtype=np.float64) for v in layout.stochastic_leaves(params)]
    target_mean = np.array([t.mean() for t in templates])
    target_std = np.array([t.std() for t in templates])
    paths = layout.stochastic_paths
    modules = [p.rsplit("/", 1)[0] if "/" in p else p for p in paths]
    random_leaves = target_std > 1e-12 * np.maximum(1.0, np.abs(target_mean))
    median_std = float(np.median(target_std[random_leaves])) if random_leaves.any() else 1.0
    filled = target_std.copy()
    for i in np.flatnonzero(~random_leaves):
        siblings = [target_std[j] for j in range(len(paths)) if modules[j] == modules[i] and random_leaves[j]]
        filled[i] = max(siblings) if siblings else median_std
    safe_raw_std = np.where(raw_std > 1e-12, raw_std, 1.0)
    scales = filled / safe_raw_std
    shifts = target_mean - scales * raw_mean
    return tuple(float(s) for s in scales), tuple(float(s) for s in shifts)
