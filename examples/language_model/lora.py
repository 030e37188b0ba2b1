"""LoRA fine-tuning of a byte-level transformer: IVON against AdamW on the same adapters.

A decoder-only transformer (``bdl_examples.language``) is pretrained with AdamW on the
generated language, or read from a run of ``examples/language_model/train.py``
(``--checkpoint RUN_FOLDER``). LoRA adapters (rank r, scale alpha / r; A drawn small and
random, B zero, so the adapted model starts as the pretrained one) are added to the
attention's query, key, value and output projections, and only the adapters are fine-tuned on
a second distribution: by default a *shifted* language, with the same words as the first but
another grammar (other successors of every word, other separator probabilities; its true
next-byte distribution and Bayes limit are known too), or the bytes of ``--text FILE ...``.

The model's state is split into the adapters and the frozen rest
(``nnx.split(model, LoRAParam, ...)``): the gradient, AdamW's moments and IVON's mean,
Hessian and noise exist for the adapters only, and the frozen weights never reach an
optimizer. Both optimizers start from the same adapters and see the same batches for the
same number of steps. On the held-out test text of the second distribution the program
reports next-byte accuracy, bits per byte and ECE (15 bins) of the pretrained model, AdamW,
IVON at its posterior mean and IVON's Bayesian model average (``--bma-samples``), as mean
+- std over ``--seeds``, and the margins IVON - AdamW; ``ivon.posterior_summary`` of every
IVON run, with a warning when the posterior has not moved from its initialisation. It writes
``results.json``, ``reliability.png`` and ``training_curves.png`` to ``--output``
(``examples/output/language_model_lora/``).

    python examples/language_model/lora.py                         # 3 seeds, minutes on 2 CPU cores
    python examples/language_model/lora.py --seeds 0 --steps 200
    python examples/language_model/lora.py --text notes.txt        # fine-tune on your bytes
    python examples/language_model/lora.py --checkpoint examples/output/language_model/run_0

The settings were chosen on the validation text of seed 0 (``examples/README.md``).
AdamW: learning rate 2e-2 (of 1e-3 ... 3e-2), no weight decay. IVON: ``ess`` is the number
of fine-tuning bytes (every byte is one term of the mean loss); ``hess_init`` 1 makes the
initial posterior std ``1 / sqrt(ess (hess_init + wd))`` 0.003, small next to the adapters'
scale; ``clip_radius`` 1e-3 with learning rate 5 bounds every step at ``lr (hess_init + wd)
clip_radius`` = 5e-3, the scale of AdamW's steps (larger steps diverged early); ``beta2``
0.995 (not the pretraining value 0.99999) lets the Hessian estimate move within 300 steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from bdl_examples import cli, language, metrics
from bdl_examples.checkpoints import write_json
from bdl_examples.data import DataError
from bdl_examples.progress import ProgressBar
from bdl_examples.training import report_ivon_posterior
from flax import nnx

import ivon

METHODS = ("adamw", "ivon")
DEFAULT_OUTPUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "output", "language_model_lora"
)
LN2 = math.log(2)
# The model flags a checkpoint of train.py fixes (its args.json), and the language flags it
# fixes when it was trained on the generated language.
MODEL_FLAGS = ("context", "width", "depth", "heads", "untied")
LANGUAGE_FLAGS = ("data_seed", "words")


class UsageError(Exception):
    """Bad input: printed as ``error: ...`` with exit code 2."""


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------


class LoRAParam(nnx.Param):
    """An adapter matrix: the only parameters fine-tuning changes."""


class LoRALinear(nnx.Module):
    """A frozen ``nnx.Linear`` plus a low-rank update: ``base(x) + (alpha / rank) x A B``.

    With ``splits`` > 1 each of ``splits`` equal slices of the output has an adapter of its
    own: the fused query/key/value projection gets three, one per projection, as if they were
    three matrices. ``A`` (``(splits, in, rank)``) is drawn from ``N(0, 1 / in)``, ``B``
    (``(splits, rank, out / splits)``) is zero, so the adapted layer starts as ``base``.
    """

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, splits: int, rngs):
        if base.out_features % splits:
            raise ValueError(f"{base.out_features} outputs do not split into {splits} parts")
        self.base = base
        self.scale = alpha / rank
        shape_a = (splits, base.in_features, rank)
        self.lora_a = LoRAParam(
            jax.random.normal(rngs.params(), shape_a, base.param_dtype)
            / math.sqrt(base.in_features)
        )
        self.lora_b = LoRAParam(
            jnp.zeros((splits, rank, base.out_features // splits), base.param_dtype)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        low = jnp.einsum("...i,sir->...sr", x, self.lora_a[...])
        update = jnp.einsum("...sr,sro->...so", low, self.lora_b[...])
        return self.base(x) + self.scale * update.reshape(x.shape[:-1] + (-1,))


def add_adapters(model: language.Transformer, *, rank: int, alpha: float, seed: int):
    """Wrap every block's query/key/value and output projections in :class:`LoRALinear`
    (in place; returns ``model``). ``seed`` draws the ``A`` matrices."""
    rngs = nnx.Rngs(seed)
    for i in range(model.depth):
        attention = getattr(model, f"block_{i}").attention
        attention.qkv = LoRALinear(attention.qkv, rank=rank, alpha=alpha, splits=3, rngs=rngs)
        attention.out = LoRALinear(attention.out, rank=rank, alpha=alpha, splits=1, rngs=rngs)
    return model


def split_adapters(model) -> tuple[nnx.GraphDef, dict, dict]:
    """``(graphdef, adapters, frozen)``: the structure, the :class:`LoRAParam` values and
    every other parameter, as nested dicts of arrays; ``nnx.merge(graphdef, adapters,
    frozen)`` is the model again."""
    graphdef, adapters, frozen = nnx.split(model, LoRAParam, ...)
    return graphdef, nnx.to_pure_dict(adapters), nnx.to_pure_dict(frozen)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data-seed", type=int, default=0, help="the languages and their text")
    data.add_argument("--words", type=int, default=500, help="vocabulary of both languages")
    data.add_argument("--pretrain-bytes", type=int, default=1_000_000)
    data.add_argument(
        "--shift-successors", type=int, default=8, help="shifted grammar: successors per word"
    )
    data.add_argument(
        "--shift-concentration",
        type=float,
        default=0.5,
        help="shifted grammar: Dirichlet concentration of the successor probabilities",
    )
    data.add_argument(
        "--shift-zipf", type=float, default=0.5, help="shifted grammar: popularity exponent"
    )
    data.add_argument("--finetune-bytes", type=int, default=100_000, help="fine-tuning text")
    data.add_argument("--validation-bytes", type=int, default=10_000)
    data.add_argument("--test-bytes", type=int, default=30_000)
    data.add_argument(
        "--text", nargs="+", metavar="FILE", help="fine-tune on these files' bytes instead"
    )
    data.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.1,
        help="--text: fraction of the bytes for validation, and again for test",
    )

    model = parser.add_argument_group("pretrained model")
    language.add_transformer_arguments(model)
    model.add_argument("--untied", action="store_true", help="an output matrix of its own")
    model.add_argument("--pretrain-steps", type=int, default=600, help="AdamW steps")
    model.add_argument("--pretrain-lr", type=float, default=3e-3)
    model.add_argument(
        "--checkpoint",
        metavar="RUN_FOLDER",
        help="use the parameters of a run of train.py instead of pretraining (its model flags)",
    )
    model.add_argument("--checkpoint-seed", type=int, default=0, help="which run of it")
    model.add_argument(
        "--checkpoint-method", choices=METHODS, default="adamw", help="which run of it"
    )

    lora = parser.add_argument_group("LoRA fine-tuning (both optimizers)")
    lora.add_argument("--rank", type=int, default=8)
    lora.add_argument(
        "--alpha", type=float, default=16.0, help="the update is scaled by alpha/rank"
    )
    lora.add_argument(
        "--seeds", type=cli.seed_list, default=[0, 1, 2], help="adapters, batch order, IVON noise"
    )
    lora.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    lora.add_argument("--batch-size", type=int, default=32, help="windows per step")
    lora.add_argument("--warmup", type=int, default=None, help="default: a tenth of --steps")
    lora.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clip")

    adamw = parser.add_argument_group("AdamW")
    adamw.add_argument("--adamw-lr", type=float, default=2e-2)
    adamw.add_argument("--adamw-weight-decay", type=float, default=0.0)

    language.add_ivon_arguments(
        parser,
        lr=5.0,
        ess=None,
        hess_init=1.0,
        beta2=0.995,
        weight_decay=1e-4,
        ess_help="effective sample size (default: fine-tuning bytes)",
    )
    language.add_evaluation_arguments(parser, eval_every=50, eval_batch=128)
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="results and plots go here")
    return parser


def check_ranges(args) -> None:
    """Raise UsageError naming the first argument outside its accepted range."""
    ranges = {
        "shift_successors": (f"in [1, --words={args.words})", lambda v: 1 <= v < args.words),
        "shift_concentration": cli.POSITIVE,
        "shift_zipf": cli.NON_NEGATIVE,
        **language.shared_ranges(args),
        "pretrain_steps": cli.AT_LEAST_ONE,
        "pretrain_lr": cli.POSITIVE,
        "rank": cli.AT_LEAST_ONE,
        "alpha": cli.POSITIVE,
    }
    cli.check_ranges(args, ranges, UsageError)
    if args.checkpoint is None:
        language.check_stream_lengths(args, ("pretrain_bytes",), UsageError)
    if args.text is None:
        names = ("finetune_bytes", "validation_bytes", "test_bytes")
        language.check_stream_lengths(args, names, UsageError)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class Data(NamedTuple):
    """The pretraining stream (``None`` with ``--checkpoint``), the fine-tuning streams
    (train, validation, test) and the fine-tuning language (``None`` for ``--text``)."""

    pretrain: language.Stream | None
    streams: dict[str, language.Stream]
    language: language.Language | None


def shifted_language(args) -> language.Language:
    """The words of the pretraining language (the same seed draws them first), with the
    grammar the ``--shift-*`` flags draw from the rest of the seed's randomness."""
    return language.make_language(
        args.data_seed,
        num_words=args.words,
        successors=args.shift_successors,
        concentration=args.shift_concentration,
        zipf=args.shift_zipf,
    )


def load_data(args) -> Data:
    pretrain = None
    if args.checkpoint is None:
        base = language.make_language(args.data_seed, num_words=args.words)
        pretrain = base.generate(args.pretrain_bytes, seed=args.data_seed)
    if args.text:
        tokens = language.read_text_files(args.text)
        streams = language.split_stream(
            tokens,
            validation_fraction=args.holdout_fraction,
            test_fraction=args.holdout_fraction,
            min_length=4 * (args.context + 1),
        )
        return Data(pretrain, streams, None)
    shifted = shifted_language(args)
    streams = language.generated_streams(
        shifted,
        train=args.finetune_bytes,
        validation=args.validation_bytes,
        test=args.test_bytes,
        seed=args.data_seed + 1,  # another text than the pretraining one
    )
    return Data(pretrain, streams, shifted)


def batch_windows(tokens: np.ndarray, *, context: int, steps: int, batch_size: int, seed: int):
    """``(steps, batch_size, context + 1)`` training windows (int32): the windows starting at
    multiples of ``context``, visited in a new random order every epoch."""
    num_windows = (len(tokens) - 1) // context
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch_size // num_windows)
    order = np.concatenate([rng.permutation(num_windows) for _ in range(epochs)])
    starts = order[: steps * batch_size] * context
    windows = language.gather_windows(tokens, starts, context + 1)
    return windows.reshape(steps, batch_size, context + 1)


# --------------------------------------------------------------------------------------------
# The pretrained model
# --------------------------------------------------------------------------------------------


def make_transformer(args, seed: int) -> language.Transformer:
    return language.Transformer(
        context=args.context,
        width=args.width,
        depth=args.depth,
        heads=args.heads,
        tied=not args.untied,
        rngs=nnx.Rngs(seed),
    )


def cross_entropy(model, windows: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy (nats) of windows ``(batch, context + 1)``."""
    logits = model(windows[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), windows[:, 1:]
    ).mean()


def warmup_cosine(peak: float, steps: int, warmup: int | None) -> optax.Schedule:
    """Linear warm-up over ``warmup`` steps (a tenth by default), cosine decay to a tenth."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=steps // 10 if warmup is None else warmup,
        decay_steps=steps,
        end_value=peak / 10,
    )


def pretrain(args, stream: language.Stream) -> dict:
    """The transformer's parameters after ``--pretrain-steps`` of AdamW on ``stream`` (every
    parameter trained; the seed is fixed: one pretrained model for every fine-tuning seed)."""
    graphdef, params = nnx.split(make_transformer(args, seed=0))
    params = nnx.to_pure_dict(params)
    optimizer = optax.chain(
        optax.clip_by_global_norm(args.grad_clip),
        optax.adamw(
            warmup_cosine(args.pretrain_lr, args.pretrain_steps, None),
            b2=0.95,
            weight_decay=0.1,
            mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
        ),
    )

    @jax.jit
    def step(params, opt_state, windows):
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(nnx.merge(graphdef, p), windows))(
            params
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batches = batch_windows(
        stream.tokens,
        context=args.context,
        steps=args.pretrain_steps,
        batch_size=args.batch_size,
        seed=10_000,
    )
    opt_state = optimizer.init(params)
    bar = ProgressBar(args.pretrain_steps, "  pretrain AdamW")
    for i, windows in enumerate(batches):
        params, opt_state, loss = step(params, opt_state, windows)
        bar.update(i + 1, lambda loss=loss: f"loss {float(loss) / LN2:.3f} bits/byte")
    bar.close()
    return jax.tree.map(np.asarray, params)


def checkpoint_arguments(args) -> argparse.Namespace:
    """``args`` with the model flags (and, for a run on the generated language, the language
    flags) of the ``--checkpoint`` run's ``args.json``."""
    path = os.path.join(args.checkpoint, "args.json")
    if not os.path.isfile(path):
        raise UsageError(
            f"argument --checkpoint: {args.checkpoint!r} holds no args.json; pass a run folder "
            "written by examples/language_model/train.py"
        )
    with open(path) as f:
        saved = json.load(f)["args"]
    merged = argparse.Namespace(**vars(args))
    flags = MODEL_FLAGS + (LANGUAGE_FLAGS if not saved.get("text") else ())
    for name in flags:
        setattr(merged, name, saved[name])
    return merged


def load_checkpoint_params(args) -> dict:
    """The parameters of the latest checkpoint of train.py's run ``--checkpoint``
    (``seed_{S}/{method}/checkpoints``, Orbax), as float32 NumPy arrays."""
    folder = os.path.join(
        os.path.abspath(args.checkpoint),
        f"seed_{args.checkpoint_seed}",
        args.checkpoint_method,
        "checkpoints",
    )
    manager = ocp.CheckpointManager(folder)
    step = manager.latest_step() if os.path.isdir(folder) else None
    if step is None:
        raise UsageError(
            f"argument --checkpoint: no checkpoint of {args.checkpoint_method} seed "
            f"{args.checkpoint_seed} in {args.checkpoint!r}"
        )
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    params = restored["state"]["params"]
    _, like = transformer_structure(args)
    shapes = jax.tree.map(lambda x: x.shape, params)
    if jax.tree.structure(like) != jax.tree.structure(params) or shapes != jax.tree.map(
        lambda x: x.shape, like
    ):
        raise UsageError(f"argument --checkpoint: {folder!r} holds another model")
    return jax.tree.map(lambda p: np.asarray(p, np.float32), params)


def transformer_structure(args) -> tuple[nnx.GraphDef, dict]:
    """The transformer's graphdef and its parameters' shapes (``jax.ShapeDtypeStruct``),
    without computing any parameter."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make_transformer(args, seed=0)))
    return graphdef, nnx.to_pure_dict(state)


def adapted_model(args, params: dict, seed: int):
    """The pretrained transformer with fresh adapters (``A`` from ``seed``, ``B`` zero)."""
    graphdef, _ = transformer_structure(args)
    model = nnx.merge(graphdef, params)
    return add_adapters(model, rank=args.rank, alpha=args.alpha, seed=seed)


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------


def make_optimizer(method: str, args, ess: float) -> optax.GradientTransformation:
    """Global-norm clip, then AdamW or ``ivon.ivon``, with warm-up and cosine decay."""
    clip = optax.clip_by_global_norm(args.grad_clip)
    if method == "adamw":
        return optax.chain(
            clip,
            optax.adamw(
                warmup_cosine(args.adamw_lr, args.steps, args.warmup),
                weight_decay=args.adamw_weight_decay,
            ),
        )
    return optax.chain(
        clip,
        ivon.ivon(
            warmup_cosine(args.ivon_lr, args.steps, args.warmup),
            ess=ess,
            hess_init=args.hess_init,
            beta2=args.ivon_beta2,
            weight_decay=args.ivon_weight_decay,
            clip_radius=args.clip_radius,
        ),
    )


def make_train_step(graphdef, optimizer, method: str) -> Callable:
    """``step(adapters, opt_state, frozen, key, windows) -> (adapters, opt_state, loss)``,
    jitted (adapters and optimizer state donated). IVON takes the gradient at a posterior
    sample of the adapters; the frozen parameters are an input, never differentiated."""

    def loss_fn(adapters, frozen, windows):
        return cross_entropy(nnx.merge(graphdef, adapters, frozen), windows)

    grad_fn = jax.value_and_grad(loss_fn)

    def step(adapters, opt_state, frozen, key, windows):
        at = adapters
        if method == "ivon":
            at, opt_state = ivon.sample_parameters(key, adapters, opt_state)
        loss, grads = grad_fn(at, frozen, windows)
        updates, opt_state = optimizer.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


class Evaluator:
    """Next-byte probabilities of a stream's scored positions
    (``language.evaluation_windows``: every scored byte sees at least a quarter of the context
    before it), at the adapters or as IVON's model average, ``--eval-batch`` windows a call."""

    def __init__(self, graphdef, args):
        self.context, self.batch = args.context, args.eval_batch
        self.min_context = min_context = args.context // 4

        def probabilities(adapters, frozen, windows):
            logits = nnx.merge(graphdef, adapters, frozen)(windows[:, :-1])[:, min_context:]
            return jax.nn.softmax(logits.astype(jnp.float32))

        self._at_adapters = jax.jit(probabilities)
        self._average = jax.jit(ivon.bayesian_model_average(probabilities, args.bma_samples))

    def probs(self, tokens, adapters, frozen, opt_state=None, key=None):
        """``(probs (num_scored, 256), labels)``; the model average when ``key`` is given."""
        starts, positions = language.evaluation_windows(len(tokens), self.context, self.min_context)
        windows = language.gather_windows(tokens, starts, self.context + 1)
        padding = -len(windows) % self.batch  # whole calls: one compilation
        windows = np.concatenate([windows, np.zeros((padding, self.context + 1), np.int32)])
        outputs = []
        for start in range(0, len(windows), self.batch):
            chunk = windows[start : start + self.batch]
            if key is None:
                outputs.append(self._at_adapters(adapters, frozen, chunk))
            else:
                outputs.append(self._average(key, adapters, opt_state, frozen, chunk))
        labels = tokens[positions.reshape(-1)].astype(np.int64)
        probs = np.concatenate([np.asarray(o) for o in outputs])
        return probs.reshape(-1, language.VOCAB_SIZE)[: len(labels)], labels


def scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    return {
        "accuracy": metrics.accuracy(probs, labels),
        "bits_per_byte": metrics.nll(probs, labels) / LN2,
        "ece": metrics.ece(probs, labels),
    }


class Method(NamedTuple):
    """An optimizer and its jitted step, shared by the runs of every seed."""

    name: str
    optimizer: optax.GradientTransformation
    step: Callable


class Run(NamedTuple):
    """One fine-tuning run's final adapters, optimizer state and log."""

    adapters: dict
    opt_state: optax.OptState
    log: dict


def finetune(args, method: Method, seed: int, adapters, frozen, batches, evaluator, validation):
    """Fine-tune ``adapters`` (``frozen`` stays as it is) on ``batches``, the validation bits
    per byte every ``--eval-every`` steps."""
    adapters = jax.tree.map(jnp.array, adapters)  # a copy: the step donates its buffers
    opt_state = method.optimizer.init(adapters)
    key = jax.random.key(seed)
    log, losses = {"train_loss": [], "validation": []}, []
    bar = ProgressBar(args.steps, f"  {method.name:<5} seed {seed}")
    for i, windows in enumerate(batches):
        adapters, opt_state, loss = method.step(
            adapters, opt_state, frozen, jax.random.fold_in(key, i), windows
        )
        losses.append(loss)
        done = i + 1
        if done % args.eval_every == 0 or done == args.steps:
            probs, labels = evaluator.probs(validation, adapters, frozen)
            log["validation"].append([done, metrics.nll(probs, labels) / LN2])
        bar.update(done, lambda loss=loss: f"loss {float(loss) / LN2:.3f} bits/byte")
    bar.close()
    log["train_loss"] = [float(x) / LN2 for x in losses]
    return Run(adapters, opt_state, log)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)  # bad flags: exit 2
    try:
        if args.checkpoint is not None:
            args = checkpoint_arguments(args)
        check_ranges(args)
        return run(args)
    except (UsageError, DataError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    start = time.perf_counter()
    data = load_data(args)
    if args.checkpoint is None:
        print(f"pretraining on the generated language ({args.pretrain_bytes:,} bytes)")
        params = pretrain(args, data.pretrain)
    else:
        params = load_checkpoint_params(args)
        print(
            f"pretrained parameters from {args.checkpoint} ({args.checkpoint_method} seed "
            f"{args.checkpoint_seed}), with its flags "
            + ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in MODEL_FLAGS)
        )
    train = data.streams["train"].tokens
    ess = float(len(train)) if args.ess is None else args.ess
    graphdef, adapters, frozen = split_adapters(adapted_model(args, params, seed=0))
    print(
        f"{'text files' if args.text else 'shifted language'}: "
        + ", ".join(f"{k} {len(s.tokens):,} bytes" for k, s in data.streams.items())
        + f"; {language.count_parameters(frozen):,} frozen parameters, "
        f"{language.count_parameters(adapters):,} in the adapters (rank {args.rank}); "
        f"{args.steps} steps of {args.batch_size * args.context:,} bytes "
        f"({args.steps * args.batch_size * args.context / len(train):.1f} epochs)"
    )
    sigma0 = 1 / math.sqrt(ess * (args.hess_init + args.ivon_weight_decay))
    print(f"IVON: ess {ess:.3g}, initial posterior std {sigma0:.3g}")

    test, validation = data.streams["test"].tokens, data.streams["validation"].tokens
    evaluator = Evaluator(graphdef, args)
    methods = []
    for name in METHODS:
        optimizer = make_optimizer(name, args, ess)
        methods.append(Method(name, optimizer, make_train_step(graphdef, optimizer, name)))
    base_probs, labels = evaluator.probs(test, adapters, frozen)  # B = 0: the pretrained model
    per_seed, logs, diagnostics, first_probs = {}, {}, {}, {"pretrained": base_probs}
    for seed in args.seeds:
        _, adapters, frozen = split_adapters(adapted_model(args, params, seed=seed))
        batches = batch_windows(
            train, context=args.context, steps=args.steps, batch_size=args.batch_size, seed=seed
        )
        per_seed[seed] = {"pretrained": scores(base_probs, labels)}
        for method in methods:
            result = finetune(args, method, seed, adapters, frozen, batches, evaluator, validation)
            logs[(method.name, seed)] = result.log
            probs, _ = evaluator.probs(test, result.adapters, frozen)
            evaluated = {"AdamW" if method.name == "adamw" else "IVON mean": probs}
            if method.name == "ivon":
                key = jax.random.fold_in(jax.random.key(seed), 7)  # one set of networks
                evaluated[f"IVON BMA-{args.bma_samples}"], _ = evaluator.probs(
                    test, result.adapters, frozen, result.opt_state, key
                )
                diagnostics[seed] = report_ivon_posterior(
                    result.opt_state,
                    hess_init=args.hess_init,
                    beta2=args.ivon_beta2,
                    label=f"IVON seed {seed}",
                )
            per_seed[seed] |= {name: scores(p, labels) for name, p in evaluated.items()}
            if seed == args.seeds[0]:
                first_probs |= evaluated

    bayes = None
    if data.language is not None:
        stream = data.streams["test"]
        _, positions = language.evaluation_windows(len(test), args.context, args.context // 4)
        true_probs = data.language.next_byte_probs(stream.states[positions.reshape(-1)])
        bayes = scores(true_probs, labels) | {"entropy_rate": data.language.entropy_rate()}
        first_probs["true distribution"] = true_probs
    summary = language.summarize_seeds(per_seed)
    title = f"fine-tuning test text, mean +- std over {len(args.seeds)} seed(s):"
    print("\n" + language.format_summary(summary, bayes, title=title))

    os.makedirs(args.output, exist_ok=True)
    results = {
        "args": vars(args),
        "ess": ess,
        "per_seed": {str(s): m for s, m in per_seed.items()},
        "summary": summary,
        "bayes": bayes,
        "ivon_posterior": {str(s): d for s, d in diagnostics.items()},
        "logs": {f"{m}_seed_{s}": log for (m, s), log in logs.items()},
        "minutes": (time.perf_counter() - start) / 60,
    }
    write_json(os.path.join(args.output, "results.json"), results)
    language.plot_reliability_diagram(
        first_probs,
        labels,
        os.path.join(args.output, "reliability.png"),
        f"next-byte reliability after LoRA fine-tuning, seed {args.seeds[0]}",
    )
    language.plot_curves(
        logs, bayes, os.path.join(args.output, "training_curves.png"), "fine-tuning step"
    )
    print(f"\nresults and plots in {args.output} ({results['minutes']:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
