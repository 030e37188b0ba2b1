"""IVON, the Improved Variational Online Newton optimizer, for Optax.

IVON (Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024)
learns a diagonal Gaussian posterior over all parameters at the cost of an Adam-like
optimizer,

    q(theta) = N(m, diag(sigma^2)),      sigma^2 = 1 / (ess * (h + wd)),

where ``m`` are the parameters you hold (the posterior mean), ``h`` a per-parameter Hessian
estimate, ``ess`` (lambda) the effective sample size (normally the number of training
examples) and ``wd`` (delta) the weight decay, i.e. a prior ``N(0, 1 / (ess * wd))``.

One step with S >= 1 Monte Carlo samples (Algorithm 1 of the paper):

    1. n_s = sigma * eps_s,  eps_s ~ N(0, I);   grad_s = d loss(m + n_s) / d theta
    2. ghat = mean_s grad_s
       hhat = ess * (h + wd) * mean_s(grad_s * n_s)     hess_approx="price" (reparameterisation)
       hhat = ess * mean_s(grad_s ** 2)                  hess_approx="gradsq"
    3. g <- beta1 * g + (1 - beta1) * ghat
    4. h <- beta2 * h + (1 - beta2) * hhat + 0.5 * (1 - beta2)^2 * (h - hhat)^2 / (h + wd)
    5. t <- t + 1;   gbar = g / (1 - beta1^t)                         (debias=True)
    6. m <- m - lr' * clip((gbar + wd * m) / (h + wd), -clip_radius, clip_radius),
       lr' = lr * (hess_init + wd)                                    (rescale_lr=True)

``loss`` is the mean loss over the minibatch. The last term of step 4 is a Riemannian
correction: it keeps ``h + wd`` positive whatever the estimate ``hhat``. Under data
parallelism every device draws its own noise and the two averages of step 2 are averaged
across devices, which equals S = (samples per device) x (devices).

Behaviour worth knowing: S > 1 samples through :func:`accumulate_gradients` needs the
optimizer built with ``accumulate=True`` (two more buffers the size of the parameters);
:func:`sampled_value_and_grad` needs none. An ``update`` with no sample drawn since the last
one takes the gradients to be at the mean and leaves ``h`` unchanged. The noise comes from
JAX's Threefry hash through a Box-Muller transform (see :func:`_standard_normal`), about
twice as fast as ``jax.random.normal`` on CPU.

Usage, with the calling pattern of the original JAX implementation::

    import ivon
    optimizer = ivon.ivon(learning_rate=0.1, ess=num_train_examples)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(key, params, opt_state, batch):
        psample, opt_state = ivon.sample_parameters(key, params, opt_state)
        grads = jax.grad(loss_fn)(psample, batch)          # gradient AT THE SAMPLE
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # Bayesian model average of the predictive distribution over 64 posterior samples
    predict = ivon.bayesian_model_average(predict_probs_fn, num_samples=64)
    probs = predict(key, params, opt_state, inputs)

The public API, top to bottom: :class:`IVONState`, :func:`scale_by_ivon` (the algorithm),
:func:`ivon` (the alias with a learning rate), :func:`sample_parameters`,
:func:`accumulate_gradients`, :func:`sampled_value_and_grad` (S samples in one call),
:func:`posterior_std` and :func:`bayesian_model_average`.

This file depends only on ``jax`` and ``optax``; copy it into a project or ``pip install``
the package. It is original work written from the paper's equations (MIT licence).

References:
  Shen, Daheim, Cong, Nickl, Marconi, Bazan, Yokota, Gurevych, Cremers, Khan, Moellenhoff,
  "Variational Learning is Effective for Large Deep Networks", ICML 2024,
  https://arxiv.org/abs/2402.17641
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend.random as jax_random_ext
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "IVONState",
    "scale_by_ivon",
    "ivon",
    "sample_parameters",
    "accumulate_gradients",
    "sampled_value_and_grad",
    "posterior_std",
    "bayesian_model_average",
]

HESS_APPROXIMATIONS = ("price", "gradsq")

# Values of ``IVONState.sample_status``.
NO_SAMPLE = 0  # nothing drawn since the last accumulate/update
NOISE_PENDING = 1  # `noise` holds n of a drawn sample whose gradient has not been seen yet
CURVATURE_READY = 2  # `noise` holds mean_s(grad_s * n_s) (or grad_s^2) of averaged samples


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


class IVONState(NamedTuple):
    """State of :func:`scale_by_ivon`: arrays only, one fixed structure for the whole run.

    The structure, shapes and dtypes never change between :func:`sample_parameters`,
    :func:`accumulate_gradients` and ``update``, so a training step jits once and the state
    can be a ``jax.lax.scan`` carry, be vmapped, sharded and checkpointed.

    Attributes:
      count: int32 scalar, the number of updates so far (``t``).
      momentum: the gradient momentum ``g``, a pytree like the parameters.
      hessian: the Hessian estimate ``h``, a pytree like the parameters.
      noise: ``n = sigma * eps`` of the last drawn sample, read by ``update`` for the Price
        estimator; after :func:`sampled_value_and_grad` with S > 1 it holds the averaged
        curvature products instead (see ``sample_status``).
      grad_sum: sum of accumulated gradients; an empty ``optax.EmptyState()`` unless the
        optimizer was built with ``accumulate=True``.
      curvature_sum: sum of accumulated ``grad * n`` (``"price"``) or ``grad ** 2``
        (``"gradsq"``); empty unless ``accumulate=True``.
      num_grads: int32 scalar, gradients in ``grad_sum`` since the last update.
      num_curvatures: int32 scalar, curvature products in ``curvature_sum``.
      sample_status: int32 scalar: 0 no sample since the last accumulate/update, 1 ``noise``
        holds a drawn sample's noise, 2 ``noise`` holds averaged curvature products.
      ess: the effective sample size in use (written at every update, so injected or
        scheduled values reach :func:`sample_parameters`).
      weight_decay: the weight decay in use, likewise.
      uses_price: bool scalar, ``hess_approx == "price"``.
    """

    count: jax.Array
    momentum: optax.Updates
    hessian: optax.Updates
    noise: optax.Updates
    grad_sum: optax.Updates
    curvature_sum: optax.Updates
    num_grads: jax.Array
    num_curvatures: jax.Array
    sample_status: jax.Array
    ess: jax.Array
    weight_decay: jax.Array
    uses_price: jax.Array


# --------------------------------------------------------------------------------------------
# The equations, one small function each
# --------------------------------------------------------------------------------------------


def _posterior_std(hessian, ess, weight_decay):
    """sigma = 1 / sqrt(ess * (h + wd))."""
    return jax.lax.rsqrt(ess * (hessian + weight_decay))


def _curvature_product(grad, noise, uses_price):
    """One sample's contribution to the Hessian estimate: grad * n (Price) or grad^2."""
    return jnp.where(uses_price, grad * noise, grad * grad)


def _hessian_estimate(curvature_mean, hessian, ess, weight_decay, uses_price):
    """hhat = ess * (h + wd) * mean(grad * n)   or   ess * mean(grad^2)."""
    scale = jnp.where(uses_price, ess * (hessian + weight_decay), ess)
    return scale * curvature_mean


def _update_hessian(hessian, hessian_estimate, beta2, weight_decay):
    """h + (1-b2)(hhat-h) + 0.5 (1-b2)^2 (h-hhat)^2 / (h+wd), the paper's step 4.

    Written as ``h + x + x^2 / (2 (h + wd))`` with ``x = (1 - beta2) (hhat - h)``, which is
    the same number; then ``h_new + wd = ((a + x)^2 + a^2) / (2a) >= a / 2 > 0`` with
    ``a = h + wd``, so the posterior variance stays positive.
    """
    step = (1.0 - beta2) * (hessian_estimate - hessian)
    return hessian + step + 0.5 * step * step / (hessian + weight_decay)


def _saturate_hessian(hessian, ess):
    """Keep the posterior precision ess * (h + wd) finite: h <= max_float / (2 ess).

    Only extreme gradients (say 1e9 with ``"gradsq"`` in float32) reach this bound; without
    it h overflows, sigma becomes 0 and the next Price estimate is inf * 0 = NaN.
    """
    return jnp.minimum(hessian, jnp.finfo(hessian.dtype).max / (2 * ess))


def _update_momentum(momentum, grad_mean, beta1):
    """g <- beta1 * g + (1 - beta1) * ghat."""
    return beta1 * momentum + (1.0 - beta1) * grad_mean


def _mean_direction(momentum, params, hessian, weight_decay, clip_radius):
    """clip((gbar + wd * m) / (h + wd), -clip_radius, clip_radius), with the new h."""
    direction = (momentum + weight_decay * params) / (hessian + weight_decay)
    return jnp.clip(direction, -clip_radius, clip_radius)


# --------------------------------------------------------------------------------------------
# Gaussian noise
# --------------------------------------------------------------------------------------------


def _is_threefry_key(key) -> bool:
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return str(jax.random.key_impl(key)) == "threefry2x32"
    return jax.config.jax_default_prng_impl == "threefry2x32"


_SIGN_BIT = np.uint32(0x80000000)
_QUARTER_PI = np.float32(math.pi / 4)


def _with_random_sign(x, bits, bit: int):
    """x with its sign flipped when bit ``bit`` of ``bits`` is set (an xor on the sign bit)."""
    flip = (bits << np.uint32(31 - bit)) & _SIGN_BIT
    return jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(x, jnp.uint32) ^ flip, jnp.float32)


def _box_muller(bits_a, bits_b):
    """Two independent N(0, 1) float32 arrays from two arrays of 32 random bits.

    Box-Muller: ``r = sqrt(-2 log u)`` with u uniform in (0, 1] (24 bits of ``bits_a``) and
    a uniform angle, giving ``(r cos phi, r sin phi)``. The angle is drawn in [-pi/4, pi/4)
    (24 bits of ``bits_b``), where the Taylor polynomials below are exact to float32
    (truncation < 2e-9), and three more bits of ``bits_a`` pick one of the 8 symmetries of
    the square (swap the two outputs, flip either sign), which makes phi uniform on the
    whole circle. This avoids erfinv and the range reduction of a general sin/cos, the
    costly parts of ``jax.random.normal`` on CPU; |z| reaches 5.77 (jax.random.normal:
    about 5.4).
    """
    u = ((bits_a >> 8).astype(jnp.float32) + 1.0) * np.float32(2.0**-24)
    radius = jnp.sqrt(-2.0 * jnp.log(u))
    t = ((bits_b >> 8).astype(jnp.float32) * np.float32(2.0**-23) - 1.0) * _QUARTER_PI
    t2 = t * t
    sin = t * (1 + t2 * (-1 / 6 + t2 * (1 / 120 + t2 * (-1 / 5040 + t2 * (1 / 362880)))))
    cos = 1 + t2 * (-1 / 2 + t2 * (1 / 24 + t2 * (-1 / 720 + t2 * (1 / 40320
                                                                   + t2 * (-1 / 3628800)))))
    swap = (bits_a & np.uint32(1)) == 1
    first = radius * jnp.where(swap, sin, cos)
    second = radius * jnp.where(swap, cos, sin)
    return _with_random_sign(first, bits_a, 1), _with_random_sign(second, bits_a, 2)


def _flat_index(shape, dtype):
    """The row-major flat index of every element of ``shape``, built from broadcast iotas so
    that sharded leaves compute only their own slice."""
    index = jnp.zeros(shape, dtype)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(dtype, shape, axis) * np.asarray(stride, dtype)
        stride *= shape[axis]
    return index


def _standard_normal(key, stream: int, shape, dtype):
    """Standard normal noise of ``shape``; ``stream`` makes leaves independent.

    Threefry-2x32, the hash behind ``jax.random``, maps a key and a 64-bit counter to 64
    random bits. ``jax.random.normal`` hashes one counter per number, keeps 32 of the bits and
    maps them through erfinv. Here each counter ``(stream, j)`` gives both 32-bit words, and
    :func:`_box_muller` turns the pair into two normals, replacing erfinv by a log, a square
    root and two short polynomials. With the same 20-round hash this draws the noise about 2x
    faster than ``jax.random.normal`` on CPU (``bench/bench_ivon.py`` measures it). The two
    normals go to rows ``2i`` and ``2i + 1`` of the leaf (contiguous writes; an even shard of
    the first axis needs only its own counters). Writing the hash out as array code instead
    of JAX's primitive was measured slower on CPU for leaves up to 10 MiB, where JAX's
    rolled loop over the rounds stays in cache.
    Counters never repeat within a leaf (j) or across leaves (stream). Other key types,
    dtypes other than float32 and leaves of 2^33 or more elements use ``jax.random.normal``
    on ``fold_in(key, stream)``.
    """
    shape = tuple(shape)
    rows, rest = (shape[0], shape[1:]) if shape else (1, ())
    pair_shape = ((rows + 1) // 2,) + rest
    if (
        jnp.dtype(dtype) != jnp.float32
        or not _is_threefry_key(key)
        or math.prod(pair_shape) >= 2**32
        or math.prod(shape) == 0
    ):
        return jax.random.normal(jax.random.fold_in(key, stream), shape, dtype)
    key_words = jax.random.key_data(key) if jax.dtypes.issubdtype(
        key.dtype, jax.dtypes.prng_key) else key
    counter_hi = jnp.full(pair_shape, stream, jnp.uint32)
    counter_lo = _flat_index(pair_shape, jnp.uint32)
    bits_a, bits_b = jax_random_ext.threefry2x32_p.bind(
        key_words[0], key_words[1], counter_hi, counter_lo)
    # threefry2x32_p types its output as device-invariant even when the key varies across a
    # shard_map axis (per-device keys); jax.grad would then psum the gradients taken at the
    # sample. Adding a zero computed from the key (folded away by XLA) restores the type.
    zero_like_key = key_words[0] * np.uint32(0)
    even_rows, odd_rows = _box_muller(bits_a + zero_like_key, bits_b + zero_like_key)
    interleaved = jnp.stack([even_rows, odd_rows], axis=1).reshape((2 * pair_shape[0],) + rest)
    return interleaved[:rows].reshape(shape)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_range(name: str, value, accepted: str, ok: Callable[[float], bool]) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is concrete and acceptable.

    Traced values (``optax.inject_hyperparams`` passes hyperparameters as arrays inside jit)
    cannot be checked and are let through.
    """
    if isinstance(value, jax.core.Tracer):
        return
    try:
        number = float(np.asarray(value))
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a real number {accepted}; got {value!r}.") from None
    if math.isnan(number) or not ok(number):
        raise ValueError(f"`{name}` must be {accepted}; got {value!r}.")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False; got {value!r}.")


def _is_positive_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def _check_positive_int(name: str, value) -> None:
    if not _is_positive_int(value):
        raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")


def _check_hyperparameters(ess, hess_init, beta1, beta2, weight_decay, clip_radius,
                           hess_approx, rescale_lr, debias, accumulate):
    _check_range("ess", ess, "> 0", lambda v: v > 0)
    _check_range("hess_init", hess_init, "> 0", lambda v: v > 0)
    _check_range("beta1", beta1, "in [0, 1)", lambda v: 0 <= v < 1)
    _check_range("beta2", beta2, "in [0, 1)", lambda v: 0 <= v < 1)
    _check_range("weight_decay", weight_decay, ">= 0", lambda v: v >= 0)
    _check_range("clip_radius", clip_radius, "> 0 (inf for no clipping)", lambda v: v > 0)
    if hess_approx not in HESS_APPROXIMATIONS:
        raise ValueError(
            f"`hess_approx` must be one of {HESS_APPROXIMATIONS}; got {hess_approx!r}.")
    _check_bool("rescale_lr", rescale_lr)
    _check_bool("debias", debias)
    _check_bool("accumulate", accumulate)


def _check_same_structure(grads, reference, reference_name: str) -> None:
    grads_def, reference_def = jax.tree.structure(grads), jax.tree.structure(reference)
    if grads_def != reference_def:
        raise ValueError(
            f"`grads` must have the same pytree structure as {reference_name}.\n"
            f"  grads: {_short(grads_def)}\n  {reference_name}: {_short(reference_def)}")


def _short(tree_def, limit: int = 400) -> str:
    text = str(tree_def)
    return text if len(text) <= limit else text[:limit] + " ..."


# --------------------------------------------------------------------------------------------
# The transformation
# --------------------------------------------------------------------------------------------


def _state_dtype(param, state_dtype):
    if not jnp.issubdtype(param.dtype, jnp.floating):
        raise ValueError(
            f"IVON needs floating-point parameters; got a leaf of dtype {param.dtype}. Keep "
            "integer or boolean leaves out of the optimized pytree (e.g. with optax.masked).")
    if state_dtype is not None:
        return jnp.dtype(state_dtype)
    return jnp.promote_types(param.dtype, jnp.float32)


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def scale_by_ivon(
    ess: float | jax.Array,
    hess_init: float | jax.Array = 1.0,
    beta1: float | jax.Array = 0.9,
    beta2: float | jax.Array = 0.99999,
    weight_decay: float | jax.Array = 1e-4,
    clip_radius: float | jax.Array = float("inf"),
    rescale_lr: bool = True,
    debias: bool = True,
    hess_approx: str = "price",
    axis_name: str | None = None,
    accumulate: bool = False,
    state_dtype: Any = None,
) -> optax.GradientTransformation:
    """The IVON update direction, before the learning rate (steps 2-6 of the algorithm).

    Returns ``(hess_init + wd) * clip((gbar + wd * m) / (h + wd), -r, r)`` (without the
    ``hess_init + wd`` factor when ``rescale_lr=False``); :func:`ivon` chains it with
    ``optax.scale_by_learning_rate``. The gradients given to ``update`` must be taken at a
    posterior sample from :func:`sample_parameters` (or come from
    :func:`sampled_value_and_grad`), and ``update`` needs ``params``, the posterior mean.

    Args:
      ess: effective sample size lambda > 0, normally the number of training examples.
      hess_init: initial Hessian h0 > 0; the initial posterior std is
        ``1 / sqrt(ess * (hess_init + weight_decay))``.
      beta1: momentum decay in [0, 1).
      beta2: Hessian decay in [0, 1); keep it very close to 1 (0.99999).
      weight_decay: delta >= 0, the prior precision per example (prior ``N(0, 1/(ess*wd))``).
      clip_radius: elementwise clip > 0 of the preconditioned step; ``inf`` for none.
      rescale_lr: multiply the step by ``hess_init + weight_decay`` so that the learning rate
        is on the scale of SGD's.
      debias: divide the momentum by ``1 - beta1^t``.
      hess_approx: ``"price"`` (reparameterisation estimator, default) or ``"gradsq"``.
      axis_name: a ``pmap``/``shard_map`` axis; the sample averages of gradients and
        curvature products are averaged over it (pass per-device gradients; do not average
        them yourself). Draw samples with ``sample_parameters(..., axis_name=...)`` so that
        every device draws its own noise.
      accumulate: keep two more buffers the size of the parameters so that
        :func:`accumulate_gradients` can average several samples (state 5x the parameters
        instead of 3x). Not needed for :func:`sampled_value_and_grad`.
      state_dtype: dtype of momentum, Hessian and noise; by default the parameter dtype
        promoted to at least float32 (bf16/fp16 parameters get float32 state).

    Returns:
      An ``optax.GradientTransformation`` whose state is an :class:`IVONState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, ivon
      >>> tx = optax.chain(ivon.scale_by_ivon(ess=100.0), optax.scale_by_learning_rate(0.1))
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> sample, state = ivon.sample_parameters(jax.random.key(0), params, state)
      >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(sample)
      >>> updates, state = tx.update(grads, state, params)

    References:
      Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024,
      Algorithm 1.
    """
    _check_hyperparameters(ess, hess_init, beta1, beta2, weight_decay, clip_radius,
                           hess_approx, rescale_lr, debias, accumulate)
    uses_price = hess_approx == "price"

    def init_fn(params):
        state_dtypes = [_state_dtype(p, state_dtype) for p in jax.tree.leaves(params)]
        scalar_dtype = jnp.result_type(jnp.float32, *state_dtypes)

        def zeros(p):
            return jnp.zeros_like(p, dtype=_state_dtype(p, state_dtype))

        def full_of_hess_init(p):
            return jnp.full_like(p, hess_init, dtype=_state_dtype(p, state_dtype))

        def buffer():
            return jax.tree.map(zeros, params) if accumulate else optax.EmptyState()

        return IVONState(
            count=jnp.zeros([], jnp.int32),
            momentum=jax.tree.map(zeros, params),
            hessian=jax.tree.map(full_of_hess_init, params),
            noise=jax.tree.map(zeros, params),
            grad_sum=buffer(),
            curvature_sum=buffer(),
            num_grads=jnp.zeros([], jnp.int32),
            num_curvatures=jnp.zeros([], jnp.int32),
            sample_status=jnp.asarray(NO_SAMPLE, jnp.int32),
            ess=jnp.asarray(ess, scalar_dtype),
            weight_decay=jnp.asarray(weight_decay, scalar_dtype),
            uses_price=jnp.asarray(uses_price),
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "IVON's update needs `params`, the posterior mean: call "
                "`optimizer.update(grads, opt_state, params)`.")
        _check_same_structure(updates, params, "`params`")
        _check_same_structure(updates, state.momentum, "the optimizer state")

        count = optax.safe_increment(state.count)
        status = state.sample_status
        precomputed = status == CURVATURE_READY
        has_new_noise = status == NOISE_PENDING
        num_curvatures = state.num_curvatures + has_new_noise.astype(jnp.int32)
        has_curvature = precomputed | (num_curvatures > 0)

        def sample_means(grad, noise, *sums):
            """Step 2's two averages, over the accumulated samples and this gradient."""
            grad = grad.astype(noise.dtype)
            grad_total = grad
            curvature_total = jnp.where(
                has_new_noise, _curvature_product(grad, noise, uses_price), 0)
            if sums:  # accumulate=True; the sums are stale (not zeroed) when their count is 0
                grad_sum, curvature_sum = sums
                grad_total = grad_total + jnp.where(state.num_grads > 0, grad_sum, 0)
                curvature_total = curvature_total + jnp.where(
                    state.num_curvatures > 0, curvature_sum, 0)
            # After sampled_value_and_grad (S > 1), `grad` is already the mean and `noise`
            # holds the mean curvature product.
            grad_mean = jnp.where(
                precomputed, grad, grad_total / (state.num_grads + 1).astype(noise.dtype))
            curvature_mean = jnp.where(
                precomputed, noise,
                curvature_total / jnp.maximum(num_curvatures, 1).astype(noise.dtype))
            return grad_mean, curvature_mean

        sums = (state.grad_sum, state.curvature_sum) if accumulate else ()
        means = jax.tree.map(sample_means, updates, state.noise, *sums)
        grad_means = jax.tree.map(lambda _, pair: pair[0], updates, means)
        curvature_means = jax.tree.map(lambda _, pair: pair[1], updates, means)
        if axis_name is not None:
            grad_means, curvature_means = jax.lax.pmean((grad_means, curvature_means), axis_name)

        step_scale = (hess_init + weight_decay) if rescale_lr else 1.0

        def leaf_update(grad_mean, curvature_mean, param, momentum, hessian):
            dtype = momentum.dtype
            hessian_estimate = _hessian_estimate(
                curvature_mean, hessian, jnp.asarray(ess, dtype), jnp.asarray(weight_decay, dtype),
                uses_price)
            new_hessian = _update_hessian(hessian, hessian_estimate, jnp.asarray(beta2, dtype),
                                          jnp.asarray(weight_decay, dtype))
            new_hessian = jnp.where(
                has_curvature, _saturate_hessian(new_hessian, jnp.asarray(ess, dtype)), hessian)
            new_momentum = _update_momentum(momentum, grad_mean, jnp.asarray(beta1, dtype))
            debiased = new_momentum
            if debias:
                debiased = new_momentum / (1 - jnp.asarray(beta1, dtype) ** count.astype(dtype))
            direction = _mean_direction(
                debiased, param.astype(dtype),
                new_hessian, jnp.asarray(weight_decay, dtype), jnp.asarray(clip_radius, dtype))
            direction = direction * jnp.asarray(step_scale, dtype)
            return direction.astype(param.dtype), new_momentum, new_hessian

        results = jax.tree.map(leaf_update, grad_means, curvature_means, params, state.momentum,
                               state.hessian)
        pick = lambda i: jax.tree.map(lambda _, r: r[i], updates, results)  # noqa: E731
        noise = state.noise
        if axis_name is not None:
            # The consumed noise is the only per-device part of the state: reset it so that
            # all devices hold the same state (e.g. shard_map with a replicated out_spec).
            noise = jax.tree.map(lambda n: jnp.zeros(n.shape, n.dtype), noise)
        new_state = state._replace(
            count=count,
            momentum=pick(1),
            hessian=pick(2),
            noise=noise,
            num_grads=jnp.zeros_like(state.num_grads),
            num_curvatures=jnp.zeros_like(state.num_curvatures),
            sample_status=jnp.asarray(NO_SAMPLE, jnp.int32),
            ess=jnp.asarray(ess, state.ess.dtype),
            weight_decay=jnp.asarray(weight_decay, state.weight_decay.dtype),
        )
        return pick(0), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def ivon(
    learning_rate: optax.ScalarOrSchedule,
    ess: float | jax.Array,
    hess_init: float | jax.Array = 1.0,
    beta1: float | jax.Array = 0.9,
    beta2: float | jax.Array = 0.99999,
    weight_decay: float | jax.Array = 1e-4,
    clip_radius: float | jax.Array = float("inf"),
    rescale_lr: bool = True,
    debias: bool = True,
    hess_approx: str = "price",
    axis_name: str | None = None,
    accumulate: bool = False,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """The IVON optimizer: :func:`scale_by_ivon` followed by the learning rate.

    ``m <- m - lr * (hess_init + wd) * clip((gbar + wd * m) / (h + wd), -r, r)``. Draw the
    weights for every gradient with :func:`sample_parameters`; ``update`` needs ``params``.

    ``update`` with no sample drawn since the previous update is allowed and well defined:
    the gradients are taken to be at the mean, ``m`` and the momentum are updated as usual,
    and ``h`` is left unchanged (there is no noise to estimate curvature from).

    Args:
      learning_rate: a float >= 0 or an Optax schedule (a function of the step count).
      ess: effective sample size lambda > 0, normally the number of training examples.
      hess_init, beta1, beta2, weight_decay, clip_radius, rescale_lr, debias, hess_approx,
      axis_name, accumulate, state_dtype: see :func:`scale_by_ivon`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. Every argument lives in the closure, so
      ``optax.inject_hyperparams(ivon.ivon)(learning_rate=..., ess=..., ...)`` can change or
      schedule the numeric ones during training.

    Example:
      >>> import jax, jax.numpy as jnp, optax, ivon
      >>> optimizer = ivon.ivon(learning_rate=0.1, ess=1000.0)
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
      >>> opt_state = optimizer.init(params)
      >>> def loss_fn(p):
      ...     return jnp.mean((jnp.ones(3) @ p["w"] + p["b"] - 1.0) ** 2)
      >>> psample, opt_state = ivon.sample_parameters(jax.random.key(0), params, opt_state)
      >>> grads = jax.grad(loss_fn)(psample)
      >>> updates, opt_state = optimizer.update(grads, opt_state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024.
    """
    if not callable(learning_rate):
        _check_range("learning_rate", learning_rate, ">= 0", lambda v: v >= 0)
    return optax.chain(
        scale_by_ivon(ess=ess, hess_init=hess_init, beta1=beta1, beta2=beta2,
                      weight_decay=weight_decay, clip_radius=clip_radius, rescale_lr=rescale_lr,
                      debias=debias, hess_approx=hess_approx, axis_name=axis_name,
                      accumulate=accumulate, state_dtype=state_dtype),
        optax.scale_by_learning_rate(learning_rate),
    )


# --------------------------------------------------------------------------------------------
# Finding IVON's state inside any optimizer state
# --------------------------------------------------------------------------------------------


def _is_ivon_state(x) -> bool:
    return isinstance(x, IVONState)


def _find_ivon_states(opt_state) -> list[IVONState]:
    """Every IVONState inside ``opt_state``: chains, inject_hyperparams, MultiSteps,
    apply_if_finite, masked/multi_transform, a Flax TrainState, or any other pytree."""
    states = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_ivon_state) if _is_ivon_state(x)]
    if not states:
        raise ValueError(
            "No IVON state found in `opt_state`: pass the state returned by the `init` of an "
            "optimizer that contains `ivon.ivon` or `ivon.scale_by_ivon` (or a pytree holding "
            "it, such as a Flax TrainState).")
    return states


def _replace_ivon_states(opt_state, new_states):
    leaves, tree_def = jax.tree.flatten(opt_state, is_leaf=_is_ivon_state)
    replacements = iter(new_states)
    leaves = [next(replacements) if _is_ivon_state(x) else x for x in leaves]
    return jax.tree.unflatten(tree_def, leaves)


def _map_unmasked(fn, reference, *trees):
    """``fn(leaf, *matching leaves of trees)`` for every leaf of ``reference`` that is not an
    ``optax.MaskedNode``; masked leaves are kept. ``trees`` may hold arrays where
    ``reference`` is masked (e.g. the full gradients of a ``masked`` optimizer)."""
    leaves, tree_def = jax.tree.flatten(reference, is_leaf=_is_masked)
    matching = [tree_def.flatten_up_to(tree) for tree in trees]
    return tree_def.unflatten([
        leaf if _is_masked(leaf) else fn(leaf, *others)
        for leaf, *others in zip(leaves, *matching)])


def _state_key(key, index: int, num_states: int):
    return key if num_states == 1 else jax.random.fold_in(key, index)


def _draw(key, params, state: IVONState):
    """A posterior sample of the leaves ``state`` covers, and its noise ``n = sigma * eps``.

    Leaves outside the state (masked by ``optax.masked``/``multi_transform``) come back
    unchanged with a ``MaskedNode`` noise.
    """
    hessian_leaves, hessian_def = jax.tree.flatten(state.hessian, is_leaf=_is_masked)
    param_leaves = hessian_def.flatten_up_to(params)
    samples, noises = [], []
    for stream, (param, hessian) in enumerate(zip(param_leaves, hessian_leaves)):
        if _is_masked(hessian):
            samples.append(param)
            noises.append(hessian)
            continue
        if param.shape != hessian.shape:
            raise ValueError(
                f"`params` do not match the optimizer state: a leaf of shape {param.shape} where "
                f"the state has shape {hessian.shape}.")
        dtype = hessian.dtype
        sigma = _posterior_std(hessian, state.ess.astype(dtype), state.weight_decay.astype(dtype))
        noise = sigma * _standard_normal(key, stream, hessian.shape, dtype)
        samples.append((param.astype(dtype) + noise).astype(param.dtype))
        noises.append(noise)
    return hessian_def.unflatten(samples), hessian_def.unflatten(noises)


def _fold_axis_index(key, axis_name):
    if axis_name is None:
        return key
    return jax.random.fold_in(key, jax.lax.axis_index(axis_name))


# --------------------------------------------------------------------------------------------
# Public API around the transformation
# --------------------------------------------------------------------------------------------


def sample_parameters(key: jax.Array, params: optax.Params, opt_state: optax.OptState, *,
                      axis_name: str | None = None) -> tuple[optax.Params, optax.OptState]:
    """Draw weights ``theta = m + sigma * eps`` from IVON's posterior.

    Args:
      key: a JAX PRNG key, a fresh one for every sample.
      params: the posterior mean ``m`` (the parameters being trained).
      opt_state: the optimizer state, or any pytree holding it (a chain, ``inject_hyperparams``,
        ``MultiSteps``, ``apply_if_finite``, ``masked``, a Flax ``TrainState``, ...).
      axis_name: inside ``pmap``/``shard_map``, the data-parallel axis: every device then
        draws its own noise from the same ``key``.

    Returns:
      ``(sampled_params, opt_state)``: the sample in the parameters' dtypes, and the state
      with the sample's noise recorded for the next ``update`` or
      :func:`accumulate_gradients`. Parameters outside IVON's part of a ``masked`` or
      ``multi_transform`` optimizer come back unchanged.

    Example:
      >>> psample, opt_state = ivon.sample_parameters(key, params, opt_state)
      >>> grads = jax.grad(loss_fn)(psample, batch)
      >>> updates, opt_state = optimizer.update(grads, opt_state, params)
    """
    key = _fold_axis_index(key, axis_name)
    states = _find_ivon_states(opt_state)
    sample, new_states = params, []
    for index, state in enumerate(states):
        sample, noise = _draw(_state_key(key, index, len(states)), sample, state)
        new_states.append(state._replace(
            noise=noise, sample_status=jnp.asarray(NOISE_PENDING, jnp.int32)))
    return sample, _replace_ivon_states(opt_state, new_states)


def accumulate_gradients(grads: optax.Updates, opt_state: optax.OptState) -> optax.OptState:
    """Add the gradient at the last drawn sample to the running sample averages.

    For S > 1 samples per step: draw, take the gradient and accumulate for the first S - 1
    samples, then pass the last sample's gradient to ``update``, which averages all S. The
    optimizer must be built with ``accumulate=True`` (two more buffers the size of the
    parameters); :func:`sampled_value_and_grad` does the same without them.

    Transformations chained before IVON (e.g. gradient clipping) see only the gradients
    passed to ``update``; accumulated gradients go to IVON directly. Accumulating without a
    sample drawn counts the gradient but adds no curvature information.

    Args:
      grads: gradients at the sample last drawn by :func:`sample_parameters`.
      opt_state: the optimizer state, or any pytree holding it.

    Returns:
      The optimizer state with the gradient (and its curvature product) accumulated.

    Example:
      >>> for i, key in enumerate(jax.random.split(key, num_samples)):
      ...     psample, opt_state = ivon.sample_parameters(key, params, opt_state)
      ...     grads = jax.grad(loss_fn)(psample, batch)
      ...     if i < num_samples - 1:
      ...         opt_state = ivon.accumulate_gradients(grads, opt_state)
      >>> updates, opt_state = optimizer.update(grads, opt_state, params)
    """
    states = _find_ivon_states(opt_state)
    new_states = []
    for state in states:
        if isinstance(state.grad_sum, optax.EmptyState):
            raise ValueError(
                "accumulate_gradients needs an IVON optimizer built with `accumulate=True` "
                "(e.g. `ivon.ivon(lr, ess, accumulate=True)`), which keeps the running sums; or "
                "use `ivon.sampled_value_and_grad(loss_fn, num_samples=S)`, which averages S "
                "samples in one call without them.")
        has_new_noise = state.sample_status == NOISE_PENDING

        def add_grad(noise, grad_sum, grad):
            return jnp.where(state.num_grads > 0, grad_sum, 0) + grad.astype(noise.dtype)

        def add_curvature(noise, curvature_sum, grad):
            curvature = _curvature_product(grad.astype(noise.dtype), noise, state.uses_price)
            return (jnp.where(state.num_curvatures > 0, curvature_sum, 0)
                    + jnp.where(has_new_noise, curvature, 0))

        new_states.append(state._replace(
            grad_sum=_map_unmasked(add_grad, state.noise, state.grad_sum, grads),
            curvature_sum=_map_unmasked(add_curvature, state.noise, state.curvature_sum, grads),
            num_grads=state.num_grads + 1,
            num_curvatures=state.num_curvatures + has_new_noise.astype(jnp.int32),
            sample_status=jnp.asarray(NO_SAMPLE, jnp.int32),
        ))
    return _replace_ivon_states(opt_state, new_states)


def sampled_value_and_grad(
    loss_fn: Callable[..., Any],
    num_samples: int = 1,
    *,
    method: str = "scan",
    has_aux: bool = False,
    axis_name: str | None = None,
) -> Callable[..., tuple[Any, optax.Updates, optax.OptState]]:
    """Loss and gradients averaged over ``num_samples`` posterior samples, in one call.

    The returned function ``f(key, params, opt_state, *args, **kwargs)`` draws S samples,
    evaluates ``jax.value_and_grad(loss_fn)(sample, *args, **kwargs)`` at each, and returns
    ``(loss, grads, opt_state)``: the mean loss, the mean gradient, and the optimizer state
    holding the averaged curvature products. Pass both to ``optimizer.update(grads,
    opt_state, params)``. No accumulation buffers are kept in the optimizer state.

    Args:
      loss_fn: ``loss_fn(params, *args, **kwargs)`` -> scalar mean loss over the minibatch
        (or ``(loss, aux)`` with ``has_aux=True``).
      num_samples: S >= 1 Monte Carlo samples.
      method: ``"scan"`` (one sample at a time: the memory of one forward/backward pass) or
        ``"vmap"`` (all S at once: faster on accelerators, S times the activation memory).
      has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` comes back stacked over samples
        (leading axis S).
      axis_name: inside ``pmap``/``shard_map``, the data-parallel axis (each device draws
        its own noise); build the optimizer with the same ``axis_name``.

    Returns:
      The function described above; jit it, or call it inside a jitted training step.

    Example:
      >>> value_and_grad = ivon.sampled_value_and_grad(loss_fn, num_samples=4)
      >>> loss, grads, opt_state = value_and_grad(key, params, opt_state, batch)
      >>> updates, opt_state = optimizer.update(grads, opt_state, params)
    """
    _check_positive_int("num_samples", num_samples)
    if method not in ("scan", "vmap"):
        raise ValueError(f"`method` must be 'scan' or 'vmap'; got {method!r}.")
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def sampled(key, params, opt_state, *args, **kwargs):
        key = _fold_axis_index(key, axis_name)
        if num_samples == 1:
            sample, opt_state = sample_parameters(key, params, opt_state)
            value, grads = value_and_grad(sample, *args, **kwargs)
            if has_aux:
                value = (value[0], jax.tree.map(lambda x: x[None], value[1]))
            return value, grads, opt_state

        states = _find_ivon_states(opt_state)

        def one_sample(sample_key):
            sample, noises = params, []
            for index, state in enumerate(states):
                sample, noise = _draw(_state_key(sample_key, index, len(states)), sample, state)
                noises.append(noise)
            value, grads = value_and_grad(sample, *args, **kwargs)
            curvatures = [_curvatures(grads, noise, state) for noise, state in zip(noises, states)]
            return value, grads, curvatures

        keys = jax.random.split(key, num_samples)
        if method == "vmap":
            values, grads, curvatures = jax.vmap(one_sample)(keys)
            grad_sum = jax.tree.map(lambda x: jnp.sum(_widen(x), axis=0), grads)
            curvature_sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), curvatures)
        else:
            def body(carry, sample_key):
                value, grads, curvatures = one_sample(sample_key)
                grad_sum, curvature_sums = carry
                grad_sum = jax.tree.map(lambda s, g: s + _widen(g), grad_sum, grads)
                curvature_sums = jax.tree.map(jnp.add, curvature_sums, curvatures)
                return (grad_sum, curvature_sums), value

            zero = jax.tree.map(lambda p: jnp.zeros_like(_widen(p)), params)
            zero_curvatures = [jax.tree.map(jnp.zeros_like, s.noise) for s in states]
            (grad_sum, curvature_sums), values = jax.lax.scan(
                body, (zero, zero_curvatures), keys)

        grads = jax.tree.map(lambda s, p: (s / num_samples).astype(p.dtype), grad_sum, params)
        new_states = [
            state._replace(noise=jax.tree.map(lambda c: c / num_samples, curvature_sum),
                           sample_status=jnp.asarray(CURVATURE_READY, jnp.int32))
            for state, curvature_sum in zip(states, curvature_sums)
        ]
        if has_aux:
            value = (jnp.mean(values[0]), values[1])
        else:
            value = jnp.mean(values)
        return value, grads, _replace_ivon_states(opt_state, new_states)

    return sampled


def _widen(x):
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _curvatures(grads, noise, state: IVONState):
    """grad * n (or grad^2) for the leaves ``state`` covers; MaskedNode elsewhere."""
    return _map_unmasked(
        lambda n, g: _curvature_product(g.astype(n.dtype), n, state.uses_price), noise, grads)


def posterior_std(opt_state: optax.OptState) -> optax.Params:
    """The posterior standard deviation ``sigma = 1 / sqrt(ess * (h + wd))`` per parameter.

    Args:
      opt_state: the optimizer state (or any pytree holding exactly one IVON state).

    Returns:
      A pytree like the parameters (``MaskedNode`` where IVON does not act), in the state
      dtype.

    Example:
      >>> sigma = ivon.posterior_std(opt_state)
      >>> jax.tree.map(jnp.mean, sigma)
    """
    states = _find_ivon_states(opt_state)
    if len(states) != 1:
        raise ValueError(
            f"`opt_state` holds {len(states)} IVON states; pass the part that holds one.")
    state = states[0]
    return jax.tree.map(
        lambda h: _posterior_std(h, state.ess.astype(h.dtype), state.weight_decay.astype(h.dtype)),
        state.hessian)


def bayesian_model_average(
    fn: Callable[..., Any],
    num_samples: int = 64,
    *,
    batch_size: int = 1,
) -> Callable[..., Any]:
    """Average ``fn`` over posterior samples: ``(1/K) sum_k fn(theta_k, ...)``, theta_k ~ q.

    With ``fn`` returning predictive probabilities (e.g. a softmax), this is the Bayesian
    model average ``p(y|x) ~ (1/K) sum_k p(y|x, theta_k)`` (the paper reports K = 64).
    Samples are drawn inside a ``jax.lax.scan``, ``batch_size`` at a time (vmapped), with a
    running sum, so memory holds ``batch_size`` copies of the parameters, never K.

    Args:
      fn: ``fn(params, *args, **kwargs)`` -> a pytree of arrays to average (probabilities,
        not logits).
      num_samples: K >= 1 posterior samples.
      batch_size: samples evaluated at once; must divide ``num_samples``.

    Returns:
      ``average(key, params, opt_state, *args, **kwargs)`` -> the average of ``fn``'s output,
      in at least float32.

    Example:
      >>> predict = ivon.bayesian_model_average(
      ...     lambda p, x: jax.nn.softmax(model.apply({"params": p}, x)), num_samples=64)
      >>> probs = jax.jit(predict)(key, params, opt_state, images)
    """
    _check_positive_int("num_samples", num_samples)
    if not _is_positive_int(batch_size) or num_samples % batch_size:
        raise ValueError(
            f"`batch_size` must be an integer >= 1 that divides num_samples={num_samples}; "
            f"got {batch_size!r}.")

    def average(key, params, opt_state, *args, **kwargs):
        def evaluate(sample_key):
            sample, _ = sample_parameters(sample_key, params, opt_state)
            return jax.tree.map(_widen, fn(sample, *args, **kwargs))

        def body(total, group_keys):
            outputs = jax.vmap(evaluate)(group_keys)
            return jax.tree.map(lambda t, o: t + jnp.sum(o, axis=0), total, outputs), None

        keys = jax.random.split(key, num_samples).reshape(
            (num_samples // batch_size, batch_size) + key.shape)
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype),
                            jax.eval_shape(jax.vmap(evaluate), keys[0]))
        total, _ = jax.lax.scan(body, zero, keys)
        return jax.tree.map(lambda t: t / num_samples, total)

    return average
