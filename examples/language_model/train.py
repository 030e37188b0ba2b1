"""A byte-level transformer language model trained with IVON and with AdamW.

Both optimizers train the same decoder-only transformer (Flax NNX) on the same batches for
the same number of steps, on bytes (no tokenizer; nothing is downloaded). By default the text
is generated (``bdl_examples.language``): a random word-bigram language whose true next-byte
distribution is known, so the report shows the gap to the Bayes limit, the entropy rate in
bits per byte. ``--text FILE [FILE ...]`` trains on any files instead (split into training,
validation and test parts).

On the test stream it reports bits per byte, next-byte accuracy and calibration (ECE, 15
bins) of AdamW, of IVON at the posterior mean and of IVON's Bayesian model average
(``--bma-samples``), for every seed, and their mean +- std with the margin IVON - AdamW. A run
folder ``{output}/run_{k}`` gets ``args.json``, per seed and optimizer an Orbax checkpoint
folder (parameters, optimizer state, data position, key, step, log; every
``--checkpoint-every`` steps), ``results.json``, ``reliability.png`` and
``training_curves.png``. ``--resume RUN_FOLDER`` continues a stopped run (``--stop-after``)
with bitwise the numbers of an uninterrupted one.

Devices: the batch is split over every local device (``--devices`` to use fewer); with
``--fsdp`` the parameters and optimizer state are sharded too (the largest axis of each matrix
that the device count divides). ``--distributed`` spans several processes
(``jax.distributed``). One ``jax.jit`` program with shardings holds the whole step, so IVON
samples the global parameters: with ``--fsdp`` every device draws the noise of its own shard
only. The numbers do not depend on the device count beyond the order of floating-point sums.

    python examples/language_model/train.py          # 3 seeds: about 8 min on a CPU core
    python examples/language_model/train.py --seeds 0 --steps 300
    python examples/language_model/train.py --text notes.txt book.txt --steps 2000
    python examples/language_model/train.py --accumulate 4 --fsdp --bf16

IVON's settings (measured in ``examples/README.md``) are the paper's GPT-2 recipe:
``hess_init`` 1e-3, ``clip_radius`` 1e-3, ``beta2`` 0.99999, weight decay 1e-6, gradient
clipping 1.0 before IVON, and ``ess`` 1e10. With ``h0`` and the clip that small the clip
binds for every weight, so each moves by ``lr * (h0 + wd) * clip_radius`` per step (like
Signum); ``--ivon-lr`` is ``ivon.ivon``'s ``learning_rate`` (the paper passes 300 for
GPT-2, whose rescaled value ``lr * (h0 + wd)`` is 0.3), here 1000: a largest move of 1e-3,
a third of AdamW's peak learning rate. ``ess`` sets the posterior std
``1 / sqrt(ess (h0 + wd))``, which stays at its initial value in runs this short; it is
chosen for the noise the model tolerates, not from the number of training bytes.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from bdl_examples import cli, language, metrics
from bdl_examples.checkpoints import new_run_folder, write_json
from bdl_examples.cli import merge_saved_arguments
from bdl_examples.data import DataError
from bdl_examples.progress import ProgressBar
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ivon

METHODS = ("adamw", "ivon")
DEFAULT_OUTPUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "output", "language_model"
)
ARGS_FILE = "args.json"
RESULTS_FILE = "results.json"
# Flags that may differ when resuming: where the run is, how the job is launched.
RESUME_MAY_CHANGE = ("resume", "output", "stop_after", "distributed", "devices", "fsdp")
LN2 = math.log(2)


class UsageError(Exception):
    """Bad input: printed as ``error: ...`` with exit code 2."""


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def method_list(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; accepted: {METHODS}")
    return [m for m in METHODS if m in methods]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--text", nargs="+", metavar="FILE", help="train on these files' bytes")
    data.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.05,
        help="--text: fraction of the bytes for validation, and again for test",
    )
    data.add_argument("--data-seed", type=int, default=0, help="the generated language and text")
    data.add_argument("--words", type=int, default=500, help="generated vocabulary size")
    data.add_argument("--train-bytes", type=int, default=1_000_000)
    data.add_argument("--validation-bytes", type=int, default=20_000)
    data.add_argument("--test-bytes", type=int, default=20_000)

    model = parser.add_argument_group("model")
    language.add_transformer_arguments(model)
    model.add_argument("--untied", action="store_true", help="an output matrix of its own")
    model.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 parameters and activations (IVON's state stays float32)",
    )

    train = parser.add_argument_group("training (both optimizers)")
    train.add_argument(
        "--seeds",
        type=cli.seed_list,
        default=[0, 1, 2],
        help="initialisation, batch order and IVON noise; e.g. 0,1,2",
    )
    train.add_argument(
        "--methods", type=method_list, default=list(METHODS), help="comma-separated: adamw,ivon"
    )
    train.add_argument("--steps", type=int, default=500, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=32, help="windows per micro-batch")
    train.add_argument(
        "--accumulate",
        type=int,
        default=1,
        metavar="K",
        help="micro-batches per step (IVON: one posterior sample each)",
    )
    train.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="steps of linear warm-up (default: a tenth of --steps)",
    )
    train.add_argument(
        "--final-lr-fraction",
        type=float,
        default=0.1,
        help="the cosine decays to this fraction of the peak learning rate",
    )
    train.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clip")

    adamw = parser.add_argument_group("AdamW")
    adamw.add_argument("--adamw-lr", type=float, default=3e-3)
    adamw.add_argument("--adamw-beta2", type=float, default=0.95)
    adamw.add_argument(
        "--adamw-weight-decay", type=float, default=0.1, help="decoupled, on matrices only"
    )

    language.add_ivon_arguments(
        parser, lr=1000.0, ess=1e10, hess_init=1e-3, beta2=0.99999, weight_decay=1e-6
    )
    language.add_evaluation_arguments(parser, eval_every=100, eval_batch=256)

    run = parser.add_argument_group("run")
    run.add_argument("--output", default=DEFAULT_OUTPUT, help="run folders go here")
    run.add_argument("--checkpoint-every", type=int, default=200, help="steps")
    run.add_argument("--resume", metavar="RUN_FOLDER", help="continue a stopped run")
    run.add_argument(
        "--stop-after",
        type=int,
        metavar="STEPS",
        help="stop every run after this many steps of this invocation",
    )
    run.add_argument("--devices", type=int, help="use the first N devices of every process")
    run.add_argument(
        "--fsdp",
        action="store_true",
        help="shard parameters and optimizer state over the devices too",
    )
    run.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() (several processes)",
    )
    return parser


def check_ranges(args) -> None:
    """Raise UsageError naming the first argument outside its accepted range."""
    ranges = {
        **language.shared_ranges(args),
        "accumulate": cli.AT_LEAST_ONE,
        "final_lr_fraction": ("in [0, 1]", lambda v: 0 <= v <= 1),
        "adamw_beta2": cli.UNIT_INTERVAL_OPEN,
        "checkpoint_every": cli.AT_LEAST_ONE,
        "stop_after": cli.AT_LEAST_ONE,
        "devices": cli.AT_LEAST_ONE,
    }
    cli.check_ranges(args, ranges, UsageError)
    if args.text is None:
        names = ("train_bytes", "validation_bytes", "test_bytes")
        language.check_stream_lengths(args, names, UsageError)


def resume_arguments(parser, args, argv):
    """The saved arguments of ``args.resume``, with the flags that may change taken from the
    command line; a different value of any other flag is an error."""
    path = os.path.join(args.resume, ARGS_FILE)
    if not os.path.isfile(path):
        raise UsageError(
            f"argument --resume: {args.resume!r} holds no {ARGS_FILE}; pass a run folder "
            f"written by this program ({DEFAULT_OUTPUT}/run_<k>)"
        )
    with open(path) as f:
        saved = json.load(f)["args"]
    merged = merge_saved_arguments(parser, args, argv, saved, RESUME_MAY_CHANGE, error=UsageError)
    return merged


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class Data(NamedTuple):
    """The three streams, and the generated language (``None`` for ``--text``)."""

    streams: dict[str, language.Stream]
    language: language.Language | None


def load_data(args) -> Data:
    if args.text:
        tokens = language.read_text_files(args.text)
        streams = language.split_stream(
            tokens,
            validation_fraction=args.holdout_fraction,
            test_fraction=args.holdout_fraction,
            min_length=4 * (args.context + 1),
        )
        return Data(streams, None)
    generated = language.make_language(args.data_seed, num_words=args.words)
    streams = language.generated_streams(
        generated,
        train=args.train_bytes,
        validation=args.validation_bytes,
        test=args.test_bytes,
        seed=args.data_seed,
    )
    return Data(streams, generated)


class TrainingWindows:
    """The training batches: windows of ``context + 1`` bytes at multiples of ``context``,
    visited in a new random order every epoch.

    ``batch(position, count)`` returns the ``count`` windows after the first ``position``
    windows of the run, so the position alone (saved in checkpoints) fixes every later batch.
    """

    def __init__(self, tokens: np.ndarray, context: int, seed: int):
        self.tokens, self.context, self.seed = tokens, context, seed
        self.num_windows = (len(tokens) - 1) // context
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:  # keep one epoch's order: batches move forward
            self._orders = {
                epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            }
        return self._orders[epoch]

    def batch(self, position: int, count: int) -> np.ndarray:
        index = position + np.arange(count)
        epochs, slots = np.divmod(index, self.num_windows)
        starts = np.concatenate(
            [self._order(int(e))[slots[epochs == e]] for e in np.unique(epochs)]
        )
        return language.gather_windows(self.tokens, starts * self.context, self.context + 1)


# --------------------------------------------------------------------------------------------
# Devices and shardings
# --------------------------------------------------------------------------------------------


def make_mesh(devices_per_process: int | None) -> Mesh:
    """A 1-D mesh ``"data"`` over the first ``devices_per_process`` local devices of every
    process (all by default)."""
    local = jax.local_device_count()
    count = local if devices_per_process is None else devices_per_process
    if count > local:
        raise UsageError(f"argument --devices: {count} > the {local} local devices")
    devices = [
        d for p in range(jax.process_count()) for d in jax.local_devices(process_index=p)[:count]
    ]
    return Mesh(np.array(devices), ("data",))


def partition_spec(shape: tuple[int, ...], num_devices: int, fsdp: bool) -> P:
    """FSDP: the largest axis of a matrix that ``num_devices`` divides is sharded; vectors,
    scalars and matrices with no such axis are replicated (as is everything without FSDP)."""
    if not fsdp or num_devices == 1 or len(shape) < 2:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % num_devices == 0:
            return P(*[("data" if a == axis else None) for a in range(len(shape))])
    return P()


def shardings_like(tree, mesh: Mesh, fsdp: bool):
    """A ``NamedSharding`` per leaf, from its shape alone: the parameters and the optimizer
    buffers of the same shape are sharded alike."""
    return jax.tree.map(
        lambda x: NamedSharding(mesh, partition_spec(x.shape, mesh.size, fsdp)), tree
    )


def put_global(tree, shardings):
    """Host arrays (the same on every process) -> global arrays with ``shardings``; each
    process fills its own devices' shards, so nothing is gathered anywhere."""

    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


def to_host(x) -> np.ndarray:
    """A replicated global array -> NumPy, from this process's own copy."""
    return np.asarray(x.addressable_data(0))


# --------------------------------------------------------------------------------------------
# Model, optimizers, state
# --------------------------------------------------------------------------------------------


def model_config(args) -> tuple:
    """The transformer's keyword arguments from the flags, as a hashable tuple."""
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    return tuple(
        dict(
            context=args.context,
            width=args.width,
            depth=args.depth,
            heads=args.heads,
            tied=not args.untied,
            dtype=dtype,
            param_dtype=dtype,
        ).items()
    )


def make_model(args, seed: int):
    """``(graphdef, params)``: the transformer's structure and its initial parameters (a
    nested dict of host arrays, the same on every process)."""
    model = language.Transformer(**dict(model_config(args)), rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    return graphdef, jax.tree.map(np.asarray, nnx.to_pure_dict(state))


def learning_rate_schedule(peak: float, args) -> optax.Schedule:
    """Linear warm-up from 0 over ``--warmup`` steps, then cosine decay to
    ``--final-lr-fraction`` of the peak at the last step."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=args.steps // 10 if args.warmup is None else args.warmup,
        decay_steps=args.steps,
        end_value=peak * args.final_lr_fraction,
    )


def make_optimizer(method: str, args) -> optax.GradientTransformation:
    """AdamW: global-norm clip, then AdamW with decoupled weight decay on matrices only.
    IVON: global-norm clip, then ``ivon.ivon`` (with running sums when accumulating)."""
    clip = optax.clip_by_global_norm(args.grad_clip)
    if method == "adamw":
        return optax.chain(
            clip,
            optax.adamw(
                learning_rate_schedule(args.adamw_lr, args),
                b1=0.9,
                b2=args.adamw_beta2,
                weight_decay=args.adamw_weight_decay,
                mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
            ),
        )
    return optax.chain(
        clip,
        ivon.ivon(
            learning_rate_schedule(args.ivon_lr, args),
            ess=args.ess,
            hess_init=args.hess_init,
            beta1=0.9,
            beta2=args.ivon_beta2,
            weight_decay=args.ivon_weight_decay,
            clip_radius=args.clip_radius,
            accumulate=args.accumulate > 1,
        ),
    )


def initial_state(params, optimizer, seed: int) -> dict:
    """Everything a run updates and a checkpoint holds."""
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": np.int32(0),
        "data_position": np.int32(0),  # training windows consumed
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


def find_ivon_state(opt_state) -> ivon.IVONState:
    def is_state(x):
        return isinstance(x, ivon.IVONState)

    return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x))


def posterior_summary(opt_state, *, mesh: Mesh, hess_init: float, beta2: float) -> dict:
    """``ivon.posterior_summary`` of the IVON state, gathered on every host first (the state
    may be sharded over devices and processes)."""
    state = jax.jit(find_ivon_state, out_shardings=NamedSharding(mesh, P()))(opt_state)
    state = jax.tree.map(to_host, state)
    return ivon.posterior_summary(state, hess_init=hess_init, beta2=beta2)


# --------------------------------------------------------------------------------------------
# The jitted steps
# --------------------------------------------------------------------------------------------


def make_loss(graphdef) -> Callable:
    """Mean next-byte cross-entropy (nats) of windows ``(batch, context + 1)``."""

    def loss_fn(params, windows):
        logits = nnx.merge(graphdef, params)(windows[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), windows[:, 1:]
        ).mean()

    return loss_fn


def make_train_step(graphdef, optimizer, method: str, args, state_shardings, mesh) -> Callable:
    """``step(state, batch) -> (state, stats)``, jitted with the state's shardings (donated).

    ``batch`` is ``(accumulate, batch_size, context + 1)``, split over the devices along its
    second axis. AdamW averages the micro-batches' gradients. IVON draws a posterior sample
    per micro-batch (key ``fold_in(rng, step)``, split): the first K-1 gradients go to
    ``ivon.accumulate_gradients``, each clipped like the last one, which the optimizer's own
    clip sees in ``update``. ``stats``: the mean loss and, for IVON, the samples averaged.
    """
    grad_fn = jax.value_and_grad(make_loss(graphdef))
    clip = optax.clip_by_global_norm(args.grad_clip)
    num_micro = args.accumulate

    def add(total, tree):
        return jax.tree.map(lambda t, x: t + x.astype(t.dtype), total, tree)

    def step(state, batch):
        params, opt_state = state["params"], state["opt_state"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        stats = {}
        if method == "adamw":

            def micro_step(total, windows):
                return add(total, grad_fn(params, windows)), None

            zero = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            (loss, grads), _ = jax.lax.scan(micro_step, (jnp.zeros([]), zero), batch)
            loss = loss / num_micro
            grads = jax.tree.map(lambda g, p: (g / num_micro).astype(p.dtype), grads, params)
        else:
            keys = jax.random.split(key, num_micro)
            losses = jnp.zeros([0])
            if num_micro > 1:

                def micro_step(opt_state, key_and_windows):
                    sample_key, windows = key_and_windows
                    sample, opt_state = ivon.sample_parameters(sample_key, params, opt_state)
                    loss, grads = grad_fn(sample, windows)
                    grads, _ = clip.update(grads, clip.init(params))
                    return ivon.accumulate_gradients(grads, opt_state), loss

                opt_state, losses = jax.lax.scan(micro_step, opt_state, (keys[:-1], batch[:-1]))
            sample, opt_state = ivon.sample_parameters(keys[-1], params, opt_state)
            loss, grads = grad_fn(sample, batch[-1])
            loss = (jnp.sum(losses) + loss) / num_micro
            sums = find_ivon_state(opt_state).sample_sums
            stats["samples"] = (sums.count + 1) if num_micro > 1 else jnp.int32(1)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        new_state = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "data_position": state["data_position"] + num_micro * args.batch_size,
            "rng": state["rng"],
        }
        return new_state, dict(stats, loss=loss)

    replicated = NamedSharding(mesh, P())
    return jax.jit(
        step,
        in_shardings=(state_shardings, NamedSharding(mesh, P(None, "data"))),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )


class Evaluator:
    """Next-byte probabilities of a stream's scored positions
    (``bdl_examples.language.evaluation_windows``: each scored byte sees at least a quarter
    of the context before it), at the parameters or as IVON's Bayesian model average over
    ``--bma-samples`` posterior samples, ``--eval-batch`` windows per jitted call."""

    def __init__(self, graphdef, args, mesh: Mesh, param_shardings, opt_shardings):
        self.context = args.context
        self.min_context = args.context // 4
        self.batch = -(-args.eval_batch // mesh.size) * mesh.size  # a multiple of the devices
        replicated = NamedSharding(mesh, P())
        self.window_sharding = NamedSharding(mesh, P("data"))
        min_context = self.min_context

        def probabilities(params, windows):
            logits = nnx.merge(graphdef, params)(windows[:, :-1])[:, min_context:]
            return jax.nn.softmax(logits.astype(jnp.float32))

        average = ivon.bayesian_model_average(probabilities, args.bma_samples)
        self._at_params = jax.jit(
            probabilities,
            in_shardings=(param_shardings, self.window_sharding),
            out_shardings=replicated,
        )
        self._average = jax.jit(
            average,
            in_shardings=(replicated, param_shardings, opt_shardings, self.window_sharding),
            out_shardings=replicated,
        )

    def positions(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """The windows' starts and the stream positions of their scored targets."""
        return language.evaluation_windows(length, self.context, self.min_context)

    def probs(self, tokens: np.ndarray, params, opt_state=None, key=None) -> tuple:
        """``(probs (num_scored, 256), labels)``; the model average when ``key`` is given."""
        starts, positions = self.positions(len(tokens))
        windows = language.gather_windows(tokens, starts, self.context + 1)
        padding = -len(windows) % self.batch  # whole calls: one compilation
        windows = np.concatenate([windows, np.zeros((padding, self.context + 1), np.int32)])
        outputs = []
        for start in range(0, len(windows), self.batch):
            chunk = put_global(windows[start : start + self.batch], self.window_sharding)
            if key is None:
                out = self._at_params(params, chunk)
            else:
                out = self._average(key, params, opt_state, chunk)
            outputs.append(to_host(out))
        labels = tokens[positions.reshape(-1)].astype(np.int64)
        probs = np.concatenate(outputs).reshape(-1, language.VOCAB_SIZE)[: len(labels)]
        return probs, labels


def bits_per_byte(probs: np.ndarray, labels: np.ndarray) -> float:
    return metrics.nll(probs, labels) / LN2


def test_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    return {
        "bits_per_byte": bits_per_byte(probs, labels),
        "accuracy": metrics.accuracy(probs, labels),
        "ece": metrics.ece(probs, labels),
    }


# --------------------------------------------------------------------------------------------
# One training run (one seed, one optimizer)
# --------------------------------------------------------------------------------------------


class Method(NamedTuple):
    """An optimizer and its compiled programs, shared by the runs of every seed."""

    name: str
    optimizer: optax.GradientTransformation
    init: Callable  # init(params, seed) -> the initial training state
    shardings: Any  # of the training state
    train_step: Callable
    evaluator: Evaluator


def build_method(name: str, args, mesh: Mesh, graphdef, params) -> Method:
    optimizer = make_optimizer(name, args)
    abstract = jax.eval_shape(lambda: initial_state(params, optimizer, seed=0))
    shardings = shardings_like(abstract, mesh, args.fsdp)
    return Method(
        name=name,
        optimizer=optimizer,
        init=jax.jit(lambda params, seed: initial_state(params, optimizer, seed)),
        shardings=shardings,
        train_step=make_train_step(graphdef, optimizer, name, args, shardings, mesh),
        evaluator=Evaluator(graphdef, args, mesh, shardings["params"], shardings["opt_state"]),
    )


class RunResult(NamedTuple):
    state: dict | None  # None: stopped by --stop-after before the last step
    log: dict


def checkpoint_manager(folder: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(folder), options=options)


def save_checkpoint(manager, state: dict, log: dict) -> None:
    """Save the (sharded) state as it is, each process writing its own shards, and the log."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), log=ocp.args.JsonSave(log))
    manager.save(int(to_host(state["step"])), args=args, force=True)
    manager.wait_until_finished()


def restore_checkpoint(manager, shardings, like) -> tuple[dict, dict]:
    """The latest checkpoint, each array read straight into its sharding (no gathering)."""
    abstract = jax.tree.map(
        lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        like,
        shardings,
    )
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), log=ocp.args.JsonRestore())
    restored = manager.restore(manager.latest_step(), args=args)
    return restored["state"], restored["log"]


def train_run(args, method: Method, seed: int, data: Data, mesh: Mesh, folder: str, say):
    """Train one optimizer from one seed, resuming from ``folder``'s checkpoints if any.
    Returns a :class:`RunResult`."""
    _, params = make_model(args, seed)
    host_state = jax.tree.map(np.asarray, method.init(params, seed))
    manager = checkpoint_manager(os.path.join(folder, "checkpoints"))
    if manager.latest_step() is None:
        state = put_global(host_state, method.shardings)
        log = {"train_loss": [], "validation": [], "samples_per_step": None}
    else:
        state, log = restore_checkpoint(manager, method.shardings, host_state)
        say(f"  {method.name} seed {seed}: resuming at step {manager.latest_step()}")
    windows = TrainingWindows(data.streams["train"].tokens, args.context, seed)
    batch_sharding = NamedSharding(mesh, P(None, "data"))
    validation = data.streams["validation"].tokens

    first = int(to_host(state["step"]))
    last = args.steps if args.stop_after is None else min(args.steps, first + args.stop_after)
    stream = sys.stdout if jax.process_index() == 0 else io.StringIO()  # one printer
    bar = ProgressBar(args.steps, f"  {method.name:<5} seed {seed}", stream=stream)
    losses = []
    for step in range(first, last):
        position = int(to_host(state["data_position"]))
        batch = windows.batch(position, args.accumulate * args.batch_size)
        batch = batch.reshape(args.accumulate, args.batch_size, args.context + 1)
        state, stats = method.train_step(state, put_global(batch, batch_sharding))
        losses.append(stats["loss"])
        if "samples" in stats and log["samples_per_step"] is None:
            log["samples_per_step"] = int(to_host(stats["samples"]))
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            log["train_loss"].extend(float(to_host(x)) / LN2 for x in losses)
            losses = []
            probs, labels = method.evaluator.probs(validation, state["params"])
            log["validation"].append([done, bits_per_byte(probs, labels)])
        bar.update(done, lambda s=stats: f"loss {float(to_host(s['loss'])) / LN2:.3f} bits/byte")
        if done % args.checkpoint_every == 0 or done == last:
            log["train_loss"].extend(float(to_host(x)) / LN2 for x in losses)
            losses = []
            save_checkpoint(manager, state, log)
    bar.close()
    finished = int(to_host(state["step"])) == args.steps
    return RunResult(state if finished else None, log)


def evaluate_run(args, method: Method, seed: int, state: dict, test: np.ndarray) -> dict:
    """``{name: (test metrics, probs)}`` of one finished run, and the labels."""
    probs, labels = method.evaluator.probs(test, state["params"])
    if method.name == "adamw":
        return {"AdamW": (test_metrics(probs, labels), probs)}, labels
    key = jax.random.fold_in(jax.random.key(seed), 7)  # the same networks for every window
    bma, _ = method.evaluator.probs(test, state["params"], state["opt_state"], key=key)
    return {
        "IVON mean": (test_metrics(probs, labels), probs),
        f"IVON BMA-{args.bma_samples}": (test_metrics(bma, labels), bma),
    }, labels


def bayes_reference(args, data: Data) -> tuple[dict, np.ndarray] | None:
    """Metrics of the true next-byte distribution on the scored test positions, the entropy
    rate, and the true probabilities (None for ``--text``)."""
    if data.language is None:
        return None
    test = data.streams["test"]
    _, positions = language.evaluation_windows(len(test.tokens), args.context, args.context // 4)
    positions = positions.reshape(-1)
    probs = data.language.next_byte_probs(test.states[positions])
    result = test_metrics(probs, test.tokens[positions].astype(np.int64))
    result["entropy_rate"] = data.language.entropy_rate()
    return result, probs


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def initialize_distributed() -> None:
    """``jax.distributed.initialize()``: clusters are found by JAX; elsewhere set
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID for every process."""

    def env_int(name):
        return int(os.environ[name]) if name in os.environ else None

    jax.distributed.initialize(
        num_processes=env_int("JAX_NUM_PROCESSES"), process_id=env_int("JAX_PROCESS_ID")
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)  # unknown flags and malformed values: exit code 2
    try:
        if args.resume is not None:
            args = resume_arguments(parser, args, argv)
        check_ranges(args)
        return run(args, argv)
    except (UsageError, DataError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


def run(args, argv) -> int:
    if args.distributed:
        initialize_distributed()
    mesh = make_mesh(args.devices)
    if args.batch_size % mesh.size:
        raise UsageError(
            f"argument --batch-size: {args.batch_size} is not divisible by the {mesh.size} "
            "devices (every device gets an equal share of each micro-batch)"
        )
    data = load_data(args)
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)
    folder = args.resume if args.resume is not None else new_run_folder(args.output)
    if is_main and args.resume is None:
        # how the job is launched is not part of the run: --resume takes it from its own flags
        record = {k: v for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE}
        environment = {
            "command": [sys.argv[0], *argv],
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "devices": mesh.size,
            "fsdp": args.fsdp,
            "processes": jax.process_count(),
            "platform": jax.default_backend(),
            "jax": jax.__version__,
            "python": platform.python_version(),
        }
        write_json(os.path.join(folder, ARGS_FILE), {"args": record, "environment": environment})

    sizes = {k: len(s.tokens) for k, s in data.streams.items()}
    graphdef, params = make_model(args, args.seeds[0])
    tokens_per_step = args.accumulate * args.batch_size * args.context
    say(
        f"{'text files' if args.text else 'generated language'}: "
        + ", ".join(f"{k} {v:,} bytes" for k, v in sizes.items())
        + f"; transformer with {language.count_parameters(params):,} parameters; "
        f"{args.steps} steps of {tokens_per_step:,} bytes "
        f"({args.steps * tokens_per_step / sizes['train']:.1f} epochs); "
        f"{mesh.size} {jax.default_backend()} device(s) in {jax.process_count()} process(es)"
        f"{', FSDP' if args.fsdp else ''}"
    )
    if "ivon" in args.methods:
        effective = args.ivon_lr * (args.hess_init + args.ivon_weight_decay)
        sigma0 = 1 / math.sqrt(args.ess * (args.hess_init + args.ivon_weight_decay))
        say(
            f"IVON: lr * (h0 + wd) = {effective:.3g}, largest step per weight "
            f"{effective * args.clip_radius:.3g}; initial posterior std {sigma0:.3g}"
        )
    say(f"run folder: {folder}")

    methods = {name: build_method(name, args, mesh, graphdef, params) for name in args.methods}
    start = time.perf_counter()
    finished, logs = {}, {}
    for seed in args.seeds:
        for name, method in methods.items():
            run_folder = os.path.join(folder, f"seed_{seed}", name)
            result = train_run(args, method, seed, data, mesh, run_folder, say)
            logs[(name, seed)] = result.log
            finished[(name, seed)] = result.state
    if any(state is None for state in finished.values()):
        say(f"stopped (--stop-after {args.stop_after}); continue with --resume {folder}")
        return 0
    train_seconds = time.perf_counter() - start

    bayes = bayes_reference(args, data)
    test = data.streams["test"].tokens
    per_seed, diagnostics, first_probs = {}, {}, {}
    for seed in args.seeds:
        per_seed[seed] = {}
        for name, method in methods.items():
            state = finished[(name, seed)]
            evaluated, labels = evaluate_run(args, method, seed, state, test)
            per_seed[seed].update({k: m for k, (m, _) in evaluated.items()})
            if seed == args.seeds[0]:
                first_probs.update({k: p for k, (_, p) in evaluated.items()})
                first_labels = labels
            if name == "ivon":
                diagnostics[seed] = posterior_summary(
                    state["opt_state"], mesh=mesh, hess_init=args.hess_init, beta2=args.ivon_beta2
                )
    summary = language.summarize_seeds(per_seed)
    title = f"test stream, mean +- std over {len(args.seeds)} seed(s):"
    say("\n" + language.format_summary(summary, bayes[0] if bayes else None, title=title))
    for seed, d in diagnostics.items():
        say(
            f"IVON seed {seed}: posterior std median {d['std_median']:.3g} "
            f"(5%-95% {d['std_q05']:.3g}-{d['std_q95']:.3g}; initial {d['std_initial']:.3g}); "
            f"h / (hess_init * beta2^t) median {d['hessian_ratio_median']:.3g}, "
            f"{d['moved']:.0%} of the weights moved"
        )
    if diagnostics and all(d["moved"] < 0.5 for d in diagnostics.values()):
        say(
            "warning: IVON's posterior has hardly moved from its initial value (for most "
            "weights h is within 2x of hess_init * beta2^t, where it would be without data): "
            "its spread is what --ess and --hess-init set, "
            f"not what the data say; with --ivon-beta2 {args.ivon_beta2} and {args.steps} steps "
            "the Hessian estimate changes slowly (lower --ivon-beta2 or train longer)"
        )

    results = {
        "per_seed": {str(s): m for s, m in per_seed.items()},
        "summary": summary,
        "bayes": bayes[0] if bayes else None,
        "ivon_posterior": {str(s): d for s, d in diagnostics.items()},
        "samples_per_step": {
            f"{m}_seed_{s}": log.get("samples_per_step") for (m, s), log in logs.items()
        },
        "train_minutes": train_seconds / 60,
        "total_minutes": (time.perf_counter() - start) / 60,
    }
    if is_main:
        write_json(os.path.join(folder, RESULTS_FILE), results)
        reference = {"true distribution": bayes[1]} if bayes else {}
        language.plot_reliability_diagram(
            {**first_probs, **reference},
            first_labels,
            os.path.join(folder, "reliability.png"),
            f"next-byte reliability, test stream, seed {args.seeds[0]}",
        )
        language.plot_curves(
            logs, bayes[0] if bayes else None, os.path.join(folder, "training_curves.png")
        )
    say(f"\nresults, plots and checkpoints in {folder} ({results['total_minutes']:.1f} min)")
    return 0


def load_state(run_folder: str, seed: int, method: str) -> tuple[dict, dict]:
    """The latest checkpoint of one run on this process's first device, as NumPy arrays, and
    its log (for tests and notebooks; the run may have used any number of devices)."""
    with open(os.path.join(run_folder, ARGS_FILE)) as f:
        args = argparse.Namespace(**json.load(f)["args"])
    _, params = make_model(args, seed)
    like = jax.tree.map(np.asarray, initial_state(params, make_optimizer(method, args), seed))
    one_device = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), like)
    manager = checkpoint_manager(os.path.join(run_folder, f"seed_{seed}", method, "checkpoints"))
    if manager.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint of {method} seed {seed} in {run_folder!r}")
    state, log = restore_checkpoint(manager, one_device, like)
    return jax.tree.map(np.asarray, state), log


if __name__ == "__main__":
    sys.exit(main())
