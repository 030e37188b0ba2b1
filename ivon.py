"""IVON, the Improved Variational Online Newton optimizer, for Optax.

IVON (Shen et al., ICML 2024) learns a diagonal Gaussian posterior over all parameters,
``q(theta) = N(m, diag(sigma^2))`` with ``sigma^2 = 1 / (ess * (h + wd))``, at the cost of an
Adam-like optimizer: ``m`` are the parameters you hold (the posterior mean), ``h`` a
per-parameter Hessian estimate, ``ess`` (lambda) the effective sample size (normally the
number of training examples) and ``wd`` (delta) the weight decay, i.e. a prior
``N(0, 1 / (ess * wd))``. One step with S >= 1 Monte Carlo samples and ``loss`` the mean
minibatch loss (Algorithm 1):

    1. n_s = sigma * eps_s,  eps_s ~ N(0, I);   grad_s = d loss(m + n_s) / d theta
    2. ghat = mean_s grad_s
       hhat = ess * (h + wd) * mean_s(grad_s * n_s)     hess_approx="price" (reparameterisation)
       hhat = ess * mean_s(grad_s ** 2)                  hess_approx="gradsq"
    3. g <- beta1 * g + (1 - beta1) * ghat
    4. h <- beta2 * h + (1 - beta2) * hhat + 0.5 * (1 - beta2)^2 * (h - hhat)^2 / (h + wd)
    5. t <- t + 1;   gbar = g / (1 - beta1^t)                         (debias=True)
    6. m <- m - lr * (h0 + wd) * clip((gbar + wd * m) / (h + wd), -clip_radius, clip_radius)

:func:`sample_parameters` (or :func:`sample_model` for ``nnx.Optimizer``) is step 1,
:func:`scale_by_ivon` steps 2-5 and :func:`ivon` the optimizer (its example is a training
step, as is README.md's); :func:`accumulate_gradients` or :func:`sampled_value_and_grad` give
S > 1. Every ``update`` must follow exactly one sample: outside ``jit`` anything else is a
ValueError, under ``jit`` a step whose updates are all NaN. Why each step is so, data
parallelism, the noise generator and the choice of settings: ``docs/ivon.md``.

References:
  Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024,
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
    "SampleSums",
    "scale_by_ivon",
    "ivon",
    "sample_parameters",
    "accumulate_gradients",
    "sampled_value_and_grad",
    "sample_model",
    "posterior_std",
    "posterior_summary",
    "bayesian_model_average",
]

HESS_APPROXIMATIONS = ("price", "gradsq")


class SampleSums(NamedTuple):
    """Running sums of :func:`accumulate_gradients` since the last update."""

    count: jax.Array  # int32 scalar: samples summed
    grads: optax.Updates  # sum of grad_s
    curvatures: optax.Updates  # sum of grad_s * n_s ("price") or grad_s ** 2 ("gradsq")


class IVONState(NamedTuple):
    """State of :func:`scale_by_ivon`: arrays only (buffers in ``state_dtype``), one structure.

    Attributes:
      count: int32 scalar, the number of updates so far (``t``).
      momentum, hessian: ``g`` and ``h``, pytrees like the parameters.
      noise: ``n = sigma * eps`` of the last sample, which the Price estimate pairs with the
        gradient; ``optax.EmptyState()`` with ``hess_approx="gradsq"``.
      ess, weight_decay: the values in use, written at every update so that injected or
        scheduled values reach :func:`sample_parameters`.
      sample_sums: a :class:`SampleSums` with ``accumulate=True``, else ``optax.EmptyState()``.
      samples_drawn: int32 scalar, samples drawn since the last ``update`` or
        :func:`accumulate_gradients`, each of which needs exactly one.
    """

    count: jax.Array
    momentum: optax.Updates
    hessian: optax.Updates
    noise: optax.Updates | optax.EmptyState
    ess: jax.Array
    weight_decay: jax.Array
    sample_sums: SampleSums | optax.EmptyState
    samples_drawn: jax.Array


# --- Private helpers: the equations, the noise, pytree plumbing, argument checks ---
def _posterior_std(hessian, ess, weight_decay):
    """sigma = 1 / sqrt(ess * (h + wd))."""
    return jax.tree.map(lambda h: jax.lax.rsqrt(ess * (h + weight_decay)), hessian)


def _curvature_products(grads, noise, uses_price: bool):
    """One sample's term of step 2's curvature average: grad * n, or grad^2."""
    if uses_price:
        return jax.tree.map(jnp.multiply, grads, noise)
    return jax.tree.map(jnp.square, grads)


def _hessian_estimate(curvature_mean, hessian, ess, weight_decay, uses_price: bool):
    """hhat = ess * (h + wd) * mean(grad * n),   or   ess * mean(grad^2)."""
    if uses_price:
        return jax.tree.map(lambda c, h: ess * (h + weight_decay) * c, curvature_mean, hessian)
    return jax.tree.map(lambda c: ess * c, curvature_mean)


def _update_momentum(momentum, grad_mean, beta1):
    """g <- beta1 * g + (1 - beta1) * ghat."""
    return jax.tree.map(lambda g, d: beta1 * g + (1 - beta1) * d, momentum, grad_mean)


def _update_hessian(hessian, hessian_estimate, beta2, weight_decay, ess):
    """Step 4, as ``h + x + x^2 / (2 (h + wd))`` with ``x = (1 - beta2) (hhat - h)``, capped
    at ``max_float / (2 ess)`` (both explained in docs/ivon.md)."""

    def update(h, h_hat):
        x = (1 - beta2) * (h_hat - h)
        new = h + x + 0.5 * x * x / (h + weight_decay)
        cap = jnp.finfo(h.dtype).max / (2 * ess)
        return jnp.where(new < cap, new, cap)  # not jnp.minimum: XLA:CPU fuses this better

    return jax.tree.map(update, hessian, hessian_estimate)


def _preconditioned_direction(momentum, params, hessian, wd):
    """(gbar + wd * m) / (h + wd), with the new h."""
    return jax.tree.map(lambda g, m, h: (g + wd * m) / (h + wd), momentum, params, hessian)


def _standard_normal(key, stream: int, shape, dtype):
    """N(0, 1) noise for leaf ``stream``: :func:`_box_muller_normal` where it is faster."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    threefry = jax.random.key_impl(key) if typed else jax.config.jax_default_prng_impl
    if (
        jax.default_backend() == "cpu"
        and str(threefry) == "threefry2x32"
        and jnp.dtype(dtype) == jnp.float32
        and 0 < math.prod(shape) < 2**32
    ):
        return _box_muller_normal(key, stream, shape)
    return jax.random.normal(jax.random.fold_in(key, stream), shape, dtype)


def _box_muller_normal(key, stream: int, shape):
    """Two float32 normals per Threefry-2x32 hash, by Box-Muller (the method: docs/ivon.md)."""
    rows, rest = (shape[0], tuple(shape[1:])) if shape else (1, ())
    pair_shape = ((rows + 1) // 2, *rest)
    counter = jnp.zeros(pair_shape, jnp.uint32)  # row-major index, from iotas: shards stay local
    stride = 1
    for axis in reversed(range(len(pair_shape))):
        counter += jax.lax.broadcasted_iota(jnp.uint32, pair_shape, axis) * np.uint32(stride)
        stride *= pair_shape[axis]
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    words = jax.random.key_data(key) if typed else key
    a, b = jax_random_ext.threefry2x32_p.bind(
        words[0], words[1], jnp.full(pair_shape, stream, jnp.uint32), counter
    )
    # threefry2x32_p types its output as device-invariant even for a per-device key inside
    # shard_map; a zero computed from the key (folded away by XLA) keeps the key's type.
    a, b = a + words[0] * np.uint32(0), b + words[0] * np.uint32(0)

    radius = jnp.sqrt(-2 * jnp.log(((a >> 8).astype(jnp.float32) + 1) * np.float32(2**-24)))
    t = ((b >> 8).astype(jnp.float32) * np.float32(2**-23) - 1) * np.float32(math.pi / 4)
    t2 = t * t
    sin = t * (1 + t2 * (-1 / 6 + t2 * (1 / 120 + t2 * (-1 / 5040 + t2 * (1 / 362880)))))
    cos = 1 + t2 * (
        -1 / 2 + t2 * (1 / 24 + t2 * (-1 / 720 + t2 * (1 / 40320 + t2 * (-1 / 3628800))))
    )
    swap = (a & 1) == 1

    def with_sign_bit(x, bit):  # flip the sign where bit ``bit`` of ``a`` is set
        flip = (a << np.uint32(31 - bit)) & np.uint32(0x80000000)
        return jax.lax.bitcast_convert_type(
            jax.lax.bitcast_convert_type(x, jnp.uint32) ^ flip, jnp.float32
        )

    even = with_sign_bit(radius * jnp.where(swap, sin, cos), 1)
    odd = with_sign_bit(radius * jnp.where(swap, cos, sin), 2)
    pairs = jnp.stack([even, odd], axis=1).reshape((2 * pair_shape[0], *rest))
    return pairs[:rows].reshape(shape)


def _draw(key, params, state: IVONState):
    """``(m + n, n)``, ``n = sigma * eps``, where ``state`` acts (``(m, MaskedNode)`` elsewhere);
    flattened separately, ``params`` and the state may use different containers (NNX)."""
    dtype = state.ess.dtype
    sigma = _posterior_std(state.hessian, state.ess, state.weight_decay)
    sigma_leaves, sigma_def = jax.tree.flatten(sigma, is_leaf=_is_masked)
    param_leaves, param_def = jax.tree.flatten(params)
    if len(param_leaves) != len(sigma_leaves):
        raise ValueError(
            f"`params` do not match the optimizer state: {len(param_leaves)} leaves where the "
            f"state has {len(sigma_leaves)}."
        )
    samples, noises = [], []
    for stream, (param, std) in enumerate(zip(param_leaves, sigma_leaves)):
        if _is_masked(std):
            samples.append(param)
            noises.append(std)
            continue
        if param.shape != std.shape:
            raise ValueError(
                f"`params` do not match the optimizer state: a leaf of shape {param.shape} "
                f"where the state has shape {std.shape}."
            )
        noise = std * _standard_normal(key, stream, std.shape, dtype)
        samples.append((param.astype(dtype) + noise).astype(param.dtype))
        noises.append(noise)
    return param_def.unflatten(samples), sigma_def.unflatten(noises)


def _is_ivon_state(x) -> bool:
    return isinstance(x, IVONState)


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def _is_empty(x) -> bool:
    return isinstance(x, optax.EmptyState)


def _find_ivon_states(opt_state) -> list[IVONState]:
    """Every IVONState inside ``opt_state`` (an Optax wrapper, a TrainState, any pytree)."""
    states = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_ivon_state) if _is_ivon_state(x)]
    if not states:
        raise ValueError(
            "No IVON state found in `opt_state`: pass the state returned by the `init` of an "
            "optimizer that contains `ivon.ivon` or `ivon.scale_by_ivon` (or a pytree holding "
            "it, such as a Flax TrainState)."
        )
    return states


def _one_ivon_state(opt_state) -> list[IVONState]:
    states = _find_ivon_states(opt_state)
    if len(states) != 1:
        raise ValueError(
            f"`opt_state` holds {len(states)} IVON states; pass the part that holds one."
        )
    return states


def _replace_ivon_states(opt_state, new_states):
    leaves, tree_def = jax.tree.flatten(opt_state, is_leaf=_is_ivon_state)
    replacements = iter(new_states)
    return tree_def.unflatten([next(replacements) if _is_ivon_state(x) else x for x in leaves])


def _forget_rejected_draws(opt_state):
    """Zero the draw count that ``optax.apply_if_finite`` restores when it rejects a step."""

    def forget(node):
        if not isinstance(node, optax.ApplyIfFiniteState):
            return node
        leaves = jax.tree.leaves(node.inner_state, is_leaf=_is_ivon_state)
        kept = lambda count: jnp.where(node.last_finite, count, 0)  # noqa: E731
        states = [
            s._replace(samples_drawn=jax.tree.map(kept, s.samples_drawn))
            for s in leaves
            if _is_ivon_state(s)
        ]
        return node._replace(inner_state=_replace_ivon_states(node.inner_state, states))

    is_node = lambda x: isinstance(x, optax.ApplyIfFiniteState)  # noqa: E731
    return jax.tree.map(forget, opt_state, is_leaf=is_node)


def _state_key(key, index: int, num_states: int):
    return key if num_states == 1 else jax.random.fold_in(key, index)


def _fold_axis_index(key, axis_name):
    return key if axis_name is None else jax.random.fold_in(key, jax.lax.axis_index(axis_name))


def _restrict(tree, reference):
    """``tree`` (like the parameters) with ``MaskedNode`` where ``reference`` has one."""
    masks, tree_def = jax.tree.flatten(reference, is_leaf=_is_masked)
    leaves = tree_def.flatten_up_to(tree)
    return tree_def.unflatten([m if _is_masked(m) else x for m, x in zip(masks, leaves)])


def _merge(trees, params):
    """One pytree like ``params`` from trees that each cover some of its leaves."""
    if len(trees) == 1:
        return trees[0]
    tree_def = jax.tree.structure(params)
    merged = [optax.MaskedNode()] * tree_def.num_leaves
    for tree in trees:
        for i, leaf in enumerate(tree_def.flatten_up_to(tree)):
            if not _is_masked(leaf):
                merged[i] = leaf
    return tree_def.unflatten(merged)


def _zeros_like(tree):
    """Zeros of the same shapes and dtypes, not varying over any ``shard_map`` axis."""
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)


def _plus(counter, increment):
    """``counter + increment``, keeping a wrapper such as an NNX ``OptArray`` around it."""
    return jax.tree.map(lambda c: c + increment, counter)


def _nan_unless(ok, tree):
    return jax.tree.map(lambda x: jnp.where(ok, x, jnp.nan), tree)


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def _at_least_float32(tree):
    """Sums over samples in float32 or wider, whatever the parameters' dtype."""
    return jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree)


def _state_dtype(params, state_dtype):
    dtypes = [jnp.dtype(p.dtype) for p in jax.tree.leaves(params)]
    for dtype in dtypes:
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"IVON needs floating-point parameters; got a leaf of dtype {dtype}. Keep "
                "integer or boolean leaves out of the optimized pytree (e.g. with optax.masked)."
            )
    if state_dtype is not None:
        return jnp.dtype(state_dtype)
    return jnp.result_type(jnp.float32, *dtypes)


def _check_range(name: str, value, accepted: str, ok: Callable[[float], bool]) -> None:
    """A ValueError unless ``ok(value)``; traced values (``inject_hyperparams``) pass."""
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


def _follows_one_sample(samples_drawn, caller: str):
    """True after exactly one sample; else a ValueError, or if traced a boolean to act on."""
    (samples_drawn,) = jax.tree.leaves(samples_drawn)  # unwrapped from an NNX OptArray
    if isinstance(samples_drawn, jax.core.Tracer):
        return samples_drawn == 1
    drawn = int(samples_drawn)
    if drawn == 0:
        raise ValueError(
            f"{caller} without a new sample: call `ivon.sample_parameters` (or "
            "`ivon.sample_model`) before it and take the gradient at the sample it returns. "
            "IVON's Hessian estimate pairs the gradient with that sample's noise."
        )
    if drawn > 1:
        raise ValueError(
            f"{caller} after {drawn} samples: it pairs the gradient with the last sample's "
            "noise only, so a gradient averaged over several samples (e.g. one sample per "
            "micro-batch under `optax.MultiSteps`) gives a wrong Hessian estimate. Either "
            "draw one sample per update and take every micro-batch's gradient at it, or build "
            "the optimizer with `accumulate=True` and pass each micro-batch's gradient but "
            "the last to `ivon.accumulate_gradients`."
        )
    return True


def _check_gradients(grads, params) -> None:
    """Same structure as the parameters, and per leaf the same shape and a float dtype."""
    _check_same_structure(grads, params, "`params`")
    leaves_with_paths = jax.tree_util.tree_flatten_with_path(grads)[0]
    for (path, grad), param in zip(leaves_with_paths, jax.tree.leaves(params)):
        if grad.shape != param.shape or not jnp.issubdtype(grad.dtype, jnp.floating):
            raise ValueError(
                f"`grads{jax.tree_util.keystr(path)}` has shape {grad.shape} and dtype "
                f"{grad.dtype}, where the parameter has shape {param.shape} and dtype "
                f"{param.dtype}: gradients need the parameters' shapes and a float dtype."
            )


def _check_same_structure(grads, reference, reference_name: str) -> None:
    grads_def, reference_def = jax.tree.structure(grads), jax.tree.structure(reference)
    if grads_def != reference_def:
        raise ValueError(
            f"`grads` must have the same pytree structure as {reference_name}.\n"
            f"  grads: {str(grads_def)[:400]}\n  {reference_name}: {str(reference_def)[:400]}"
        )


# --- Public API ---
def scale_by_ivon(
    ess: float | jax.Array,
    hess_init: float | jax.Array = 1.0,
    beta1: float | jax.Array = 0.9,
    beta2: float | jax.Array = 0.99999,
    weight_decay: float | jax.Array = 1e-4,
    hess_approx: str = "price",
    debias: bool = True,
    accumulate: bool = False,
    axis_name: str | None = None,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """IVON's preconditioned direction ``(gbar + wd * m) / (h + wd)`` (steps 2-5).

    Args:
      ess: effective sample size lambda > 0, normally the number of training examples.
      hess_init: initial Hessian h0 > 0 (initial posterior std ``1 / sqrt(ess (h0 + wd))``).
      beta1: momentum decay in [0, 1).
      beta2: Hessian decay in [0, 1); keep it very close to 1 (0.99999).
      weight_decay: delta >= 0, the prior precision per example (prior ``N(0, 1/(ess*wd))``).
      hess_approx: ``"price"`` (reparameterisation, default) or ``"gradsq"`` (squared gradients).
      debias: divide the momentum by ``1 - beta1^t``.
      accumulate: keep two parameter-sized running sums for :func:`accumulate_gradients`.
      axis_name: the ``pmap``/``shard_map`` axis to average over (as in sample_parameters).
      state_dtype: dtype of the state; by default the parameters' promoted to >= float32.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with an :class:`IVONState`, whose
      ``update(grads, state, params)`` takes gradients at a :func:`sample_parameters` sample,
      the posterior mean, and after :func:`sampled_value_and_grad` ``hessian_estimate=...``.

    Example:
      >>> import jax.numpy as jnp, optax, ivon
      >>> tx = optax.chain(ivon.scale_by_ivon(ess=100.0), optax.scale_by_learning_rate(0.1))
      >>> tx.init({"w": jnp.ones(2)})[0].hessian  # h0 = hess_init
      {'w': Array([1., 1.], dtype=float32)}

    References:
      Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024.
    """
    _check_range("ess", ess, "> 0", lambda v: v > 0)
    _check_range("hess_init", hess_init, "> 0", lambda v: v > 0)
    _check_range("beta1", beta1, "in [0, 1)", lambda v: 0 <= v < 1)
    _check_range("beta2", beta2, "in [0, 1)", lambda v: 0 <= v < 1)
    _check_range("weight_decay", weight_decay, ">= 0", lambda v: v >= 0)
    if hess_approx not in HESS_APPROXIMATIONS:
        raise ValueError(
            f"`hess_approx` must be one of {HESS_APPROXIMATIONS}; got {hess_approx!r}."
        )
    _check_bool("debias", debias)
    _check_bool("accumulate", accumulate)
    uses_price = hess_approx == "price"

    def init_fn(params):
        dtype = _state_dtype(params, state_dtype)

        def zeros():
            return jax.tree.map(lambda p: jnp.zeros(p.shape, dtype), params)

        return IVONState(
            count=jnp.zeros([], jnp.int32),
            momentum=zeros(),
            hessian=jax.tree.map(lambda p: jnp.full(p.shape, hess_init, dtype), params),
            noise=zeros() if uses_price else optax.EmptyState(),
            ess=jnp.asarray(ess, dtype),
            weight_decay=jnp.asarray(weight_decay, dtype),
            sample_sums=(
                SampleSums(jnp.zeros([], jnp.int32), zeros(), zeros())
                if accumulate
                else optax.EmptyState()
            ),
            samples_drawn=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, *, hessian_estimate=None, **extra_args):
        del extra_args  # meant for other transformations of a chain
        if params is None:
            raise ValueError(
                "IVON's update needs `params`, the posterior mean: call "
                "`optimizer.update(grads, opt_state, params)`."
            )
        _check_gradients(updates, params)
        _check_same_structure(updates, state.momentum, "the optimizer state")
        dtype = state.ess.dtype
        ess_, wd, b1, b2 = (jnp.asarray(v, dtype) for v in (ess, weight_decay, beta1, beta2))
        grads = _cast(updates, dtype)

        fresh = True
        if hessian_estimate is None:  # step 2 from the last sample (and the accumulated ones)
            fresh = _follows_one_sample(state.samples_drawn, "`update`")
            curvatures = _curvature_products(grads, state.noise, uses_price)
            if accumulate:
                sums, num = state.sample_sums, (state.sample_sums.count + 1).astype(dtype)
                grads = jax.tree.map(lambda s, g: (s + g) / num, sums.grads, grads)
                curvatures = jax.tree.map(lambda s, c: (s + c) / num, sums.curvatures, curvatures)
            hessian_estimate = _hessian_estimate(curvatures, state.hessian, ess_, wd, uses_price)
        else:  # the averages came from sampled_value_and_grad
            hessian_estimate = _cast(_restrict(hessian_estimate, state.hessian), dtype)
        if axis_name is not None:
            grads, hessian_estimate = jax.lax.pmean((grads, hessian_estimate), axis_name)

        count = optax.safe_increment(state.count)
        momentum = _update_momentum(state.momentum, grads, b1)
        hessian = _update_hessian(state.hessian, hessian_estimate, b2, wd, ess_)
        debiased = momentum
        if debias:
            debiased = jax.tree.map(lambda g: g / (1 - b1 ** count.astype(dtype)), momentum)
        direction = _preconditioned_direction(debiased, _cast(params, dtype), hessian, wd)
        direction = jax.tree.map(lambda d, p: d.astype(p.dtype), direction, params)

        # the noise is the only per-device part: reset it, so that the devices' states agree
        noise = state.noise if axis_name is None else _zeros_like(state.noise)
        sample_sums = _zeros_like(state.sample_sums)
        no_draws = jnp.zeros([], jnp.int32)
        new_state = IVONState(count, momentum, hessian, noise, ess_, wd, sample_sums, no_draws)
        if fresh is not True:  # traced: a NaN step, which the user cannot miss
            direction = _nan_unless(fresh, direction)
        return direction, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
    accumulate: bool = False,
    axis_name: str | None = None,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """The IVON optimizer: ``m <- m - lr * (h0 + wd) * clip((gbar + wd m) / (h + wd), r)``.

    :func:`scale_by_ivon`, ``optax.clip(clip_radius)``, ``optax.scale(hess_init +
    weight_decay)`` (when ``rescale_lr``) and the learning rate, chained.

    Args:
      learning_rate: a float >= 0 or an Optax schedule (a function of the step count).
      ess: effective sample size lambda > 0, normally the number of training examples.
      hess_init, beta1, beta2, weight_decay, debias, hess_approx, accumulate, axis_name,
        state_dtype: see :func:`scale_by_ivon`.
      clip_radius: elementwise clip > 0 of the preconditioned direction; ``inf`` for none.
      rescale_lr: scale the step by ``hess_init + weight_decay`` (lr on SGD's scale).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``. Use
      ``optax.inject_hyperparams(ivon.ivon)`` to change or schedule numeric arguments.

    Example:
      >>> import jax, jax.numpy as jnp, optax, ivon
      >>> optimizer = ivon.ivon(learning_rate=0.1, ess=1000.0)
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
      >>> opt_state = optimizer.init(params)
      >>> loss_fn = lambda p: jnp.mean((jnp.ones(3) @ p["w"] + p["b"] - 1.0) ** 2)
      >>> psample, opt_state = ivon.sample_parameters(jax.random.key(0), params, opt_state)
      >>> grads = jax.grad(loss_fn)(psample)  # at the sample, not at params
      >>> updates, opt_state = optimizer.update(grads, opt_state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024.
    """
    if not callable(learning_rate):
        _check_range("learning_rate", learning_rate, ">= 0", lambda v: v >= 0)
    _check_range("clip_radius", clip_radius, "> 0 (inf for no clipping)", lambda v: v > 0)
    _check_bool("rescale_lr", rescale_lr)
    return optax.chain(
        scale_by_ivon(
            ess=ess,
            hess_init=hess_init,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            hess_approx=hess_approx,
            debias=debias,
            accumulate=accumulate,
            axis_name=axis_name,
            state_dtype=state_dtype,
        ),
        optax.clip(clip_radius),
        optax.scale(hess_init + weight_decay) if rescale_lr else optax.identity(),
        optax.scale_by_learning_rate(learning_rate),
    )


def sample_parameters(
    key: jax.Array, params: optax.Params, opt_state: optax.OptState, *, axis_name: str | None = None
) -> tuple[optax.Params, optax.OptState]:
    """Draw weights ``theta = m + sigma * eps`` from IVON's posterior.

    Args:
      key: a JAX PRNG key (of any implementation), a fresh one for every sample.
      params: the posterior mean ``m`` (the parameters being trained).
      opt_state: the optimizer state, or any pytree holding it (a chain, ``inject_hyperparams``,
        ``MultiSteps``, ``apply_if_finite``, ``masked``, a Flax ``TrainState``, ...).
      axis_name: the data-parallel ``pmap``/``shard_map`` axis: each device draws its own noise.

    Returns:
      ``(sample, opt_state)``: the sample in the parameters' dtypes (unchanged where IVON
      does not act), and the state holding its noise for the next ``update``.

    Example:
      >>> import jax, jax.numpy as jnp, ivon
      >>> params = {"w": jnp.zeros(4)}
      >>> opt_state = ivon.ivon(0.1, ess=100.0).init(params)
      >>> psample, opt_state = ivon.sample_parameters(jax.random.key(0), params, opt_state)
    """
    key = _fold_axis_index(key, axis_name)
    opt_state = _forget_rejected_draws(opt_state)
    states = _find_ivon_states(opt_state)
    sample, new_states = params, []
    for index, state in enumerate(states):
        sample, noise = _draw(_state_key(key, index, len(states)), sample, state)
        if not _is_empty(state.noise):
            state = state._replace(noise=noise)
        new_states.append(state._replace(samples_drawn=_plus(state.samples_drawn, 1)))
    return sample, _replace_ivon_states(opt_state, new_states)


def sample_model(key: jax.Array, model: Any, optimizer: Any, *, axis_name: str | None = None):
    """:func:`sample_parameters` for a Flax NNX model trained by ``nnx.Optimizer``.

    Args:
      key: a JAX PRNG key, a fresh one for every sample.
      model: the ``nnx.Module`` being trained; it keeps the posterior mean.
      optimizer: its ``nnx.Optimizer(model, ivon.ivon(...), wrt=nnx.Param)`` (or a chain).
      axis_name: see :func:`sample_parameters`.

    Returns:
      A copy of ``model`` in which the parameters ``optimizer`` trains (its ``wrt``) are a
      sample; the sample's noise is written into ``optimizer.opt_state``. Take the gradient
      at the copy, then call ``optimizer.update(model, grads)``.

    Example::

      sampled = ivon.sample_model(key, model, optimizer)  # inside an nnx.jit training step
      loss, grads = nnx.value_and_grad(loss_fn)(sampled, x, y)
      optimizer.update(model, grads)
    """
    from flax import nnx  # only NNX users call this; the rest of the module needs no Flax

    params = nnx.as_pure(nnx.state(model, optimizer.wrt))
    opt_state = nnx.as_pure(optimizer.opt_state)
    sample, opt_state = sample_parameters(key, params, opt_state, axis_name=axis_name)
    nnx.update(optimizer.opt_state, nnx.state(opt_state))
    sampled = nnx.clone(model)
    nnx.update(sampled, sample)
    return sampled


def accumulate_gradients(grads: optax.Updates, opt_state: optax.OptState) -> optax.OptState:
    """Add the gradient at the last sample to the running sums (needs ``accumulate=True``).

    For S samples per step, pass the first S - 1 gradients here, each after its own
    :func:`sample_parameters`, and the last to ``update``, which averages all S.
    Transformations chained before IVON see only the gradient given to ``update``.

    Args:
      grads: gradients at the sample last drawn by :func:`sample_parameters`.
      opt_state: the optimizer state, or any pytree holding it.

    Returns:
      The optimizer state with the gradient (and its curvature product) added.

    Example:
      >>> import jax, jax.numpy as jnp, ivon
      >>> params, optimizer = {"w": jnp.ones(3)}, ivon.ivon(0.1, ess=100.0, accumulate=True)
      >>> opt_state = optimizer.init(params)
      >>> for i, key in enumerate(jax.random.split(jax.random.key(0), 4)):
      ...     psample, opt_state = ivon.sample_parameters(key, params, opt_state)
      ...     grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(psample)
      ...     if i < 3:  # the first S - 1 = 3 samples
      ...         opt_state = ivon.accumulate_gradients(grads, opt_state)
      >>> updates, opt_state = optimizer.update(grads, opt_state, params)
    """
    new_states = []
    for state in _find_ivon_states(opt_state):
        if _is_empty(state.sample_sums):
            raise ValueError(
                "accumulate_gradients needs an IVON optimizer built with `accumulate=True` "
                "(e.g. `ivon.ivon(lr, ess, accumulate=True)`); or use "
                "`ivon.sampled_value_and_grad(loss_fn, num_samples=S)`, which averages S "
                "samples in one call without the running sums."
            )
        fresh = _follows_one_sample(state.samples_drawn, "`accumulate_gradients`")
        own_grads = _cast(_restrict(grads, state.hessian), state.ess.dtype)
        curvatures = _curvature_products(own_grads, state.noise, not _is_empty(state.noise))
        sums = state.sample_sums
        grad_sums = jax.tree.map(jnp.add, sums.grads, own_grads)
        if fresh is not True:  # traced: NaN sums make the next update NaN
            grad_sums = _nan_unless(fresh, grad_sums)
        curvature_sums = jax.tree.map(jnp.add, sums.curvatures, curvatures)
        sums = SampleSums(_plus(sums.count, 1), grad_sums, curvature_sums)
        no_draws = jax.tree.map(jnp.zeros_like, state.samples_drawn)
        new_states.append(state._replace(sample_sums=sums, samples_drawn=no_draws))
    return _replace_ivon_states(opt_state, new_states)


def sampled_value_and_grad(
    loss_fn: Callable[..., Any],
    num_samples: int = 1,
    *,
    method: str = "scan",
    has_aux: bool = False,
    axis_name: str | None = None,
) -> Callable[..., tuple[Any, optax.Updates, optax.Updates]]:
    """Loss, gradient and Hessian estimate averaged over ``num_samples`` posterior samples.

    Args:
      loss_fn: ``loss_fn(params, *args, **kwargs)`` -> scalar mean loss over the minibatch
        (or ``(loss, aux)`` with ``has_aux=True``; ``aux`` comes back stacked over samples).
      num_samples: S >= 1 Monte Carlo samples.
      method: ``"scan"`` (one sample at a time: the memory of one forward/backward pass) or
        ``"vmap"`` (all S at once: faster on accelerators, S times the activation memory).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      axis_name: see :func:`sample_parameters`; build the optimizer with the same one.

    Returns:
      ``f(key, params, opt_state, *args, **kwargs)`` -> ``(loss, grads, hessian_estimate)``:
      the mean loss, ``ghat`` and ``hhat`` (``MaskedNode`` where no IVON acts), for
      ``optimizer.update(grads, opt_state, params, hessian_estimate=...)``; no running sums.

    Example:
      >>> import jax, jax.numpy as jnp, ivon
      >>> params, optimizer = {"w": jnp.ones(3)}, ivon.ivon(0.1, ess=100.0)
      >>> opt_state = optimizer.init(params)
      >>> value_and_grad = ivon.sampled_value_and_grad(lambda p: jnp.sum(p["w"] ** 2), 4)
      >>> loss, grads, hessian = value_and_grad(jax.random.key(0), params, opt_state)
      >>> updates, opt_state = optimizer.update(grads, opt_state, params, hessian_estimate=hessian)
    """
    _check_positive_int("num_samples", num_samples)
    if method not in ("scan", "vmap"):
        raise ValueError(f"`method` must be 'scan' or 'vmap'; got {method!r}.")
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def sampled(key, params, opt_state, *args, **kwargs):
        states = _find_ivon_states(opt_state)

        def one_sample(sample_key):
            sample, noises = params, []
            for index, state in enumerate(states):
                sample, noise = _draw(_state_key(sample_key, index, len(states)), sample, state)
                noises.append(noise)
            value, grads = value_and_grad(sample, *args, **kwargs)
            curvatures = [
                _curvature_products(
                    _cast(_restrict(grads, s.hessian), s.ess.dtype), n, not _is_empty(s.noise)
                )
                for s, n in zip(states, noises)
            ]
            return value, (_at_least_float32(grads), curvatures)

        keys = jax.random.split(_fold_axis_index(key, axis_name), num_samples)
        if method == "vmap":
            values, stacked = jax.vmap(one_sample)(keys)
            grad_sum, curvature_sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), stacked)
        else:

            def body(total, sample_key):
                value, sums = one_sample(sample_key)
                return jax.tree.map(jnp.add, total, sums), value

            zero = _zeros_like(jax.eval_shape(one_sample, keys[0])[1])
            (grad_sum, curvature_sums), values = jax.lax.scan(body, zero, keys)

        grads = jax.tree.map(lambda s, p: (s / num_samples).astype(p.dtype), grad_sum, params)
        curvature_means = jax.tree.map(lambda c: c / num_samples, curvature_sums)
        estimates = [
            _hessian_estimate(c, s.hessian, s.ess, s.weight_decay, not _is_empty(s.noise))
            for s, c in zip(states, curvature_means)
        ]
        value = (jnp.mean(values[0]), values[1]) if has_aux else jnp.mean(values)
        return value, grads, _merge(estimates, params)

    return sampled


def posterior_std(opt_state: optax.OptState) -> optax.Params:
    """The posterior standard deviation ``sigma = 1 / sqrt(ess * (h + wd))`` per parameter.

    Args:
      opt_state: the optimizer state, or any pytree holding exactly one IVON state.

    Returns:
      A pytree like the parameters (``MaskedNode`` where IVON does not act), in state dtype.

    Example:
      >>> import jax.numpy as jnp, ivon
      >>> ivon.posterior_std(ivon.ivon(0.1, ess=100.0, weight_decay=0.0).init(jnp.zeros(2)))
      Array([0.1, 0.1], dtype=float32)
    """
    (state,) = _one_ivon_state(opt_state)
    return _posterior_std(state.hessian, state.ess, state.weight_decay)


def posterior_summary(
    opt_state: optax.OptState, *, hess_init: float = 1.0, beta2: float = 0.99999
) -> dict[str, Any]:
    """How far the posterior has moved from where it started, to log during training.

    Args:
      opt_state: the optimizer state, or any pytree holding exactly one IVON state.
      hess_init: the ``hess_init`` the optimizer was built with.
      beta2: the ``beta2`` the optimizer was built with.

    Returns:
      A dict of Python numbers: ``step``; ``std_initial``; ``std_q05``, ``std_median``,
      ``std_q95`` (quantiles of the posterior std); ``hessian_ratio_q05``, ``_median``,
      ``_q95`` (of ``h / (hess_init * beta2^t)``, ``h`` had the data taught it nothing);
      ``moved`` (the fraction of ratios outside [0.5, 2]). How to read it: docs/ivon.md.

    Example:
      >>> import jax.numpy as jnp, ivon
      >>> summary = ivon.posterior_summary(ivon.ivon(0.1, ess=100.0).init(jnp.zeros(3)))
      >>> summary["hessian_ratio_median"], summary["moved"]
      (1.0, 0.0)
    """
    (state,) = _one_ivon_state(opt_state)
    step = int(state.count)
    hessian = jnp.concatenate([jnp.ravel(h) for h in jax.tree.leaves(state.hessian)])
    std = jax.lax.rsqrt(state.ess * (hessian + state.weight_decay))
    ratio = hessian / (hess_init * beta2**step)
    quantiles = jnp.asarray([0.05, 0.5, 0.95])
    std_q, ratio_q = jnp.quantile(std, quantiles), jnp.quantile(ratio, quantiles)
    std_initial = 1 / math.sqrt(float(state.ess) * (hess_init + float(state.weight_decay)))
    summary = {"step": step, "std_initial": std_initial}
    for name, values in (("std", std_q), ("hessian_ratio", ratio_q)):
        summary |= dict(zip((f"{name}_q05", f"{name}_median", f"{name}_q95"), values.tolist()))
    summary["moved"] = float(jnp.mean((ratio < 0.5) | (ratio > 2)))
    return summary


def bayesian_model_average(
    fn: Callable[..., Any], num_samples: int = 64, *, batch_size: int = 1
) -> Callable[..., Any]:
    """The Bayesian model average ``(1/K) sum_k fn(theta_k, ...)``, ``theta_k ~ q``.

    Args:
      fn: ``fn(params, *args, **kwargs)`` -> a pytree of arrays (probabilities, not logits:
        the average is then ``p(y|x) ~ (1/K) sum_k p(y|x, theta_k)``).
      num_samples: K >= 1 posterior samples (the paper reports K = 64).
      batch_size: samples evaluated at once (vmapped, in a ``jax.lax.scan`` with a running
        sum: memory holds ``batch_size`` copies of the parameters, never K); must divide K.

    Returns:
      ``average(key, params, opt_state, *args, **kwargs)`` -> the average of ``fn``'s output,
      in at least float32.

    Example:
      >>> import jax, jax.numpy as jnp, ivon
      >>> params = {"w": jnp.zeros((2, 3))}
      >>> opt_state = ivon.ivon(0.1, ess=10.0).init(params)
      >>> predict = ivon.bayesian_model_average(lambda p, x: jax.nn.softmax(x @ p["w"]), 8)
      >>> predict(jax.random.key(0), params, opt_state, jnp.ones((5, 2))).shape
      (5, 3)
    """
    _check_positive_int("num_samples", num_samples)
    if not _is_positive_int(batch_size) or num_samples % batch_size:
        raise ValueError(
            f"`batch_size` must be an integer >= 1 that divides num_samples={num_samples}; "
            f"got {batch_size!r}."
        )

    def average(key, params, opt_state, *args, **kwargs):
        def evaluate(sample_key):
            sample, _ = sample_parameters(sample_key, params, opt_state)
            return _at_least_float32(fn(sample, *args, **kwargs))

        def body(total, group_keys):
            outputs = jax.vmap(evaluate)(group_keys)
            return jax.tree.map(lambda t, o: t + jnp.sum(o, axis=0), total, outputs), None

        keys = jax.random.split(key, num_samples).reshape(
            (num_samples // batch_size, batch_size) + key.shape
        )
        zero = _zeros_like(jax.eval_shape(evaluate, keys[0, 0]))
        total, _ = jax.lax.scan(body, zero, keys)
        return jax.tree.map(lambda t: t / num_samples, total)

    return average
