"""examples/language_model/lora.py: LoRA adapters on a tiny transformer, fine-tuned with
AdamW and IVON.

The adapted model with B = 0 is the pretrained one bitwise; fine-tuning changes the adapters
and leaves every other parameter bitwise as it was; IVON's state (momentum, Hessian, noise)
exists for the adapters only; bad flags exit with code 2 and a message naming the flag; and
the program runs end to end (slow).
"""

from __future__ import annotations

import contextlib
import io
import json

import jax
import numpy as np
import pytest
from bdl_examples import language
from flax import nnx
from programs import load_script

import ivon

lora = load_script("examples/language_model/lora.py", "language_model_lora")

TINY = [
    *("--words", "20", "--pretrain-bytes", "3000", "--finetune-bytes", "2000"),
    *("--validation-bytes", "300", "--test-bytes", "400", "--context", "8", "--width", "16"),
    *("--depth", "2", "--heads", "2", "--rank", "2", "--batch-size", "4", "--steps", "3"),
    *("--pretrain-steps", "3", "--eval-every", "2", "--bma-samples", "2", "--eval-batch", "16"),
]


def tiny_args(*extra: str):
    args = lora.build_parser().parse_args([*TINY, *extra])
    lora.check_ranges(args)
    return args


def pretrained_params(args) -> dict:
    """Random parameters of the tiny transformer (the biases and norms too: all nonzero)."""
    _, shapes = lora.transformer_structure(args)
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda x: 0.1 * rng.standard_normal(x.shape, np.float32), shapes)


def tokens(args, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, args.context), dtype=np.int32)


def test_adapters_with_b_zero_give_the_pretrained_model_bitwise():
    args = tiny_args()
    params = pretrained_params(args)
    graphdef, _ = lora.transformer_structure(args)
    base = nnx.merge(graphdef, params)(tokens(args))
    model = lora.adapted_model(args, params, seed=3)
    np.testing.assert_array_equal(model(tokens(args)), base)

    adapted, adapters, frozen = lora.split_adapters(model)
    flat = {
        jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(adapters)[0]
    }
    for i in range(args.depth):  # query/key/value (three adapters) and output, every block
        assert flat[f"['block_{i}']['attention']['qkv']['lora_a']"].shape == (3, 16, 2)
        assert flat[f"['block_{i}']['attention']['qkv']['lora_b']"].shape == (3, 2, 16)
        assert flat[f"['block_{i}']['attention']['out']['lora_a']"].shape == (1, 16, 2)
        assert flat[f"['block_{i}']['attention']['out']['lora_b']"].shape == (1, 2, 16)
    assert all(np.all(x == 0) for k, x in flat.items() if k.endswith("['lora_b']"))
    assert all(np.std(x) > 0.1 for k, x in flat.items() if k.endswith("['lora_a']"))
    # the frozen part is the pretrained parameters, the linear layers one level deeper
    assert language.count_parameters(frozen) == language.count_parameters(params)

    # a nonzero B changes the output (a random one: a constant B adds the same value to every
    # feature, which the next layer norm removes)
    out = adapters["block_0"]["attention"]["out"]
    out["lora_b"] = 0.1 * jax.random.normal(jax.random.key(4), out["lora_b"].shape)
    assert not np.allclose(nnx.merge(adapted, adapters, frozen)(tokens(args)), base)


def test_lora_linear_adds_a_scaled_low_rank_update_per_split():
    base = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
    layer = lora.LoRALinear(base, rank=2, alpha=8.0, splits=3, rngs=nnx.Rngs(1))
    layer.lora_b[...] = jax.random.normal(jax.random.key(2), (3, 2, 2))
    x = jax.random.normal(jax.random.key(3), (5, 4))
    a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
    update = np.concatenate([np.asarray(x) @ a[s] @ b[s] for s in range(3)], axis=-1)
    np.testing.assert_allclose(layer(x), base(x) + 4.0 * update, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not split into 4 parts"):
        lora.LoRALinear(base, rank=2, alpha=8.0, splits=4, rngs=nnx.Rngs(1))


def test_shifted_language_has_the_same_words_and_another_grammar():
    args = tiny_args()
    base = language.make_language(args.data_seed, num_words=args.words)
    shifted = lora.shifted_language(args)
    assert shifted.words == base.words
    assert shifted.successors != base.successors
    assert 0 < shifted.entropy_rate() < 2


@pytest.fixture(scope="module")
def finetuned():
    """Both optimizers' runs of ``--steps`` steps from the same adapters on the same batches,
    with the settings of the end-to-end run (its programs then come from the cache)."""
    args = tiny_args()
    params = pretrained_params(args)
    data = lora.load_data(args)
    graphdef, adapters, frozen = lora.split_adapters(lora.adapted_model(args, params, seed=0))
    batches = lora.batch_windows(
        data.streams["train"].tokens,
        context=args.context,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=0,
    )
    evaluator = lora.Evaluator(graphdef, args)
    before = {
        "adapters": jax.tree.map(np.array, adapters),
        "frozen": jax.tree.map(np.array, frozen),
    }
    runs = {}
    for name in lora.METHODS:
        optimizer = lora.make_optimizer(name, args, ess=2000.0)
        method = lora.Method(name, optimizer, lora.make_train_step(graphdef, optimizer, name))
        with contextlib.redirect_stdout(io.StringIO()):
            runs[name] = lora.finetune(
                args,
                method,
                0,
                adapters,
                frozen,
                batches,
                evaluator,
                data.streams["validation"].tokens,
            )
    return args, params, graphdef, frozen, before, runs


@pytest.mark.parametrize("method", lora.METHODS)
def test_finetuning_changes_the_adapters_only(finetuned, method):
    args, params, graphdef, frozen, before, runs = finetuned
    run = runs[method]
    # the fine-tuned model's every non-adapter parameter is the pretrained one, bitwise
    _, _, frozen_after = lora.split_adapters(nnx.merge(graphdef, run.adapters, frozen))
    assert jax.tree.structure(frozen_after) == jax.tree.structure(before["frozen"])
    # (the same leaves as the pretrained parameters, the adapted projections one level deeper)
    assert len(jax.tree.leaves(frozen_after)) == len(jax.tree.leaves(params))
    for after, first, pretrained in zip(
        jax.tree.leaves(frozen_after), jax.tree.leaves(before["frozen"]), jax.tree.leaves(params)
    ):
        np.testing.assert_array_equal(after, pretrained)
        np.testing.assert_array_equal(first, pretrained)
    # every adapter matrix B moved away from zero
    for i in range(args.depth):
        for projection in ("qkv", "out"):
            b = run.adapters[f"block_{i}"]["attention"][projection]["lora_b"]
            assert np.any(np.asarray(b) != 0)
    assert len(run.log["train_loss"]) == args.steps and np.all(np.isfinite(run.log["train_loss"]))
    assert [step for step, _ in run.log["validation"]] == [2, 3]


def test_ivon_state_covers_the_adapters_only(finetuned):
    args, _, _, frozen, before, runs = finetuned
    adapters = before["adapters"]

    def is_state(x):
        return isinstance(x, ivon.IVONState)

    (state,) = [x for x in jax.tree.leaves(runs["ivon"].opt_state, is_leaf=is_state) if is_state(x)]
    for buffer in (state.momentum, state.hessian, state.noise):
        assert jax.tree.structure(buffer) == jax.tree.structure(adapters)
        assert language.count_parameters(buffer) == language.count_parameters(adapters)
    per_block = 3 * (16 * 2 + 2 * 16) + (16 * 2 + 2 * 16)  # query, key, value; output
    assert language.count_parameters(adapters) == args.depth * per_block
    assert language.count_parameters(adapters) < language.count_parameters(frozen) / 20
    std = ivon.posterior_std(runs["ivon"].opt_state)
    assert jax.tree.structure(std) == jax.tree.structure(adapters)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rank", "0"], "argument --rank: must be >= 1; got 0"),
        (["--heads", "3"], "argument --heads: must be a divisor of --width=16"),
        (["--ivon-beta2", "1"], "argument --ivon-beta2: must be in [0, 1)"),
        (["--finetune-bytes", "20"], "argument --finetune-bytes: must be >= 4 windows"),
        (["--checkpoint", "/nonexistent/run_0"], "holds no args.json"),
        (["--text", "/nonexistent/notes.txt"], "does not exist"),
    ],
)
def test_bad_values_exit_2_naming_the_flag(argv, message, tmp_path, capsys):
    assert lora.main([*TINY, *argv, "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "0,0"], "expected distinct seeds"),
        (["--checkpoint-method", "sgd"], "invalid choice: 'sgd'"),
        (["--rank", "two"], "invalid int value"),
        (["--lora-rank", "2"], "unrecognized arguments: --lora-rank"),
    ],
)
def test_malformed_flags_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        lora.main([*TINY, *argv])
    assert raised.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_program_runs_end_to_end(tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = lora.main([*TINY, "--seeds", "0,1", "--output", str(tmp_path)])
    printed = out.getvalue()
    assert code == 0, printed[-3000:]
    for name in ("pretrained", "AdamW", "IVON mean", "IVON BMA-2", "Bayes limit"):
        assert name in printed
    assert "margin IVON BMA-2 - AdamW" in printed
    assert "warning: IVON seed 0's posterior has hardly moved" in printed  # 3 steps
    results = json.loads((tmp_path / "results.json").read_text())
    summary = results["summary"]["methods"]
    assert set(summary) == {"pretrained", "AdamW", "IVON mean", "IVON BMA-2"}
    for row in summary.values():
        assert 0 <= row["accuracy"][0] <= 1 and 0 < row["bits_per_byte"][0] < 9
        assert 0 <= row["ece"][0] <= 1
    assert set(results["per_seed"]) == {"0", "1"} and results["ess"] == 2000
    assert 0 < results["bayes"]["entropy_rate"] < results["bayes"]["bits_per_byte"] + 0.5
    for name in ("reliability.png", "training_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
