"""examples/language_model/train.py and bdl_examples.language, with a tiny transformer.

The generated language's true distribution and entropy rate, text files read as bytes, the
program end to end (results, plots, the IVON warning), bitwise resume, 1 device against 4
(data-parallel and FSDP, on the conftest's host devices) and against two processes
(``jax.distributed``, run as ``python train.py --distributed`` while this process works),
bfloat16 parameters with float32 IVON state, K micro-batches drawing K posterior samples,
and the error paths. The runs share the suite's compilation cache.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bdl_examples import language
from bdl_examples.data import DataError
from programs import load_script

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = ROOT / "examples" / "language_model" / "train.py"


lm = load_script("examples/language_model/train.py", "language_model_train")
# The program end to end: slow as a whole (skipped by `-m "not slow"`).
pytestmark = pytest.mark.slow


TINY = [
    *("--words", "20", "--train-bytes", "3000", "--validation-bytes", "200"),
    *("--test-bytes", "300", "--context", "8", "--width", "16", "--depth", "1"),
    *("--heads", "2", "--batch-size", "8", "--steps", "6", "--eval-every", "3"),
    *("--checkpoint-every", "3", "--bma-samples", "2", "--eval-batch", "16", "--seeds", "0"),
]
IVON_ONLY = ["--methods", "ivon"]
# what conftest.py sets for this process
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def run_main(argv) -> str:
    """``main(argv)`` in this process; it must return 0. Returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = lm.main(argv)
    assert code == 0, out.getvalue()[-3000:]
    return out.getvalue()


def only_run(base: Path) -> Path:
    runs = sorted(base.iterdir())
    assert [r.name for r in runs] == ["run_0"]
    return runs[0]


def final_params(run: Path, method: str = "ivon") -> dict:
    state, _ = lm.load_state(str(run), seed=0, method=method)
    assert state["step"] == 6
    return state["params"]


def assert_trees_close(a, b, **tolerance) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, **tolerance)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# The data
# --------------------------------------------------------------------------------------------


def test_generated_language_is_a_distribution_with_its_entropy_rate():
    generated = language.make_language(seed=3, num_words=60)
    probs, next_state = generated.probs, generated.next_state
    assert np.all(probs >= 0) and np.allclose(probs.sum(1), 1, atol=1e-12)
    assert np.all((next_state >= 0) == (probs > 0))  # every possible byte leads somewhere
    stream = generated.generate(60_000, seed=4)
    assert np.array_equal(stream.tokens, generated.generate(60_000, seed=4).tokens)
    full = generated.next_byte_probs(stream.states)
    assert full.shape == (60_000, 256) and np.allclose(full.sum(1), 1)
    assert np.all(full[np.arange(60_000), stream.tokens] > 0)  # the byte drawn was possible
    # the mean surprise of the text under the truth estimates the exact entropy rate
    surprise = -generated.log2_probs(stream)
    standard_error = surprise.std() / np.sqrt(len(surprise)) * 10  # correlated: generous
    assert abs(surprise.mean() - generated.entropy_rate()) < max(standard_error, 0.02)
    # the text is words and separators, and the words come from the vocabulary
    text = stream.tokens.tobytes().decode("ascii")
    words = set(text.replace(",", " ").replace(".", " ").split()[:-1])  # the last: cut off
    assert words <= set(generated.words) and len(words) > 20


def test_streams_are_consecutive_parts_of_one_text():
    generated = language.make_language(seed=0, num_words=30)
    streams = language.generated_streams(generated, train=500, validation=100, test=200, seed=1)
    whole = generated.generate(800, seed=1)
    joined = np.concatenate([streams[k].tokens for k in ("train", "validation", "test")])
    assert np.array_equal(joined, whole.tokens)
    assert np.array_equal(streams["test"].states, whole.states[600:])


def test_evaluation_windows_score_every_byte_once():
    starts, positions = language.evaluation_windows(length=100, context=8, min_context=2)
    flat = positions.ravel()
    assert np.array_equal(flat, np.arange(3, 3 + len(flat)))  # consecutive, none twice
    assert starts[-1] + 8 + 1 <= 100 and flat[-1] + 6 > 100 - 9  # no whole window left
    windows = language.gather_windows(np.arange(100), starts, 9)
    # the scored targets are the last 6 of each window: positions start + 3 .. start + 8
    assert np.array_equal(windows[:, 3:], positions)


def test_text_files_are_read_as_bytes(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.md"
    first.write_text("Grüße, world!\n" * 40, encoding="utf-8")
    second.write_bytes(bytes(range(256)))
    tokens = language.read_text_files([str(first), str(second)])
    assert tokens.dtype == np.uint8
    assert tokens.tobytes() == first.read_bytes() + second.read_bytes()
    streams = language.split_stream(
        tokens, validation_fraction=0.1, test_fraction=0.2, min_length=10
    )
    sizes = [len(streams[k].tokens) for k in ("train", "validation", "test")]
    assert sum(sizes) == len(tokens) and sizes[1] == round(0.1 * len(tokens))
    assert np.concatenate([streams[k].tokens for k in streams]).tobytes() == tokens.tobytes()
    assert streams["test"].states is None

    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.txt.* is empty"):
        language.read_text_files([str(first), str(empty)])
    with pytest.raises(DataError, match=r"missing\.txt.*does not exist"):
        language.read_text_files([str(tmp_path / "missing.txt")])
    with pytest.raises(DataError, match="too short"):
        language.split_stream(
            tokens[:50], validation_fraction=0.1, test_fraction=0.1, min_length=10
        )


def test_program_reads_text_files_and_refuses_bad_ones(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("the cat sat on the mat. " * 100)
    args = lm.build_parser().parse_args([*TINY, "--text", str(text), "--holdout-fraction", "0.1"])
    data = lm.load_data(args)
    assert data.language is None
    assert b"".join(data.streams[k].tokens.tobytes() for k in ("train", "validation", "test")) == (
        text.read_bytes()
    )
    assert len(data.streams["test"].tokens) == 240

    missing = tmp_path / "missing.txt"
    assert lm.main([*TINY, "--text", str(missing), "--output", str(tmp_path / "x")]) == 2
    assert "missing.txt" in capsys.readouterr().err and not (tmp_path / "x").exists()
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert lm.main([*TINY, "--text", str(text), str(empty), "--output", str(tmp_path / "x")]) == 2
    assert "is empty" in capsys.readouterr().err and not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------
# The program
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, request):
    """``python train.py --distributed`` in two processes of one device each, started first
    so that they run while this process compiles (only when their test is selected)."""
    selected = {getattr(item, "originalname", item.name) for item in request.session.items}
    if "test_two_processes_equal_one_process" not in selected:
        yield None
        return
    output = tmp_path_factory.mktemp("two_processes")
    address = f"localhost:{free_port()}"
    processes = []
    for rank in range(2):
        env = dict(
            os.environ,
            XLA_FLAGS="--xla_force_host_platform_device_count=1 "
            + " ".join(f"--{name}={value}" for name, value in FAST_COMPILE.items()),
            JAX_PLATFORMS="cpu",
            JAX_COORDINATOR_ADDRESS=address,
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(rank),
        )
        with open(output / f"output_{rank}.txt", "w") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    str(PROGRAM),
                    *TINY,
                    *IVON_ONLY,
                    "--distributed",
                    "--output",
                    str(output / "runs"),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        os.setpriority(os.PRIO_PROCESS, process.pid, 5)  # this process's work goes first
        processes.append(process)
    yield processes, output
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def four_devices(two_processes, tmp_path_factory) -> tuple[Path, str]:
    """The uninterrupted run on the conftest's four host devices (data-parallel)."""
    base = tmp_path_factory.mktemp("four_devices")
    out = run_main([*TINY, *IVON_ONLY, "--output", str(base)])
    return only_run(base), out


def test_run_writes_results_plots_and_the_posterior_warning(four_devices):
    run, out = four_devices
    assert "4 cpu device(s) in 1 process(es)" in out
    assert "IVON BMA-2" in out and "Bayes limit (entropy rate)" in out
    assert "warning: IVON's posterior has hardly moved" in out  # beta2 0.99999, 6 steps
    results = json.loads((run / "results.json").read_text())
    summary = results["summary"]["methods"]
    assert set(summary) == {"IVON mean", "IVON BMA-2"}
    for row in summary.values():
        assert 0 < row["bits_per_byte"][0] < 9 and 0 <= row["ece"][0] <= 1
    assert 0 < results["bayes"]["entropy_rate"] < results["bayes"]["bits_per_byte"] + 0.5
    assert results["samples_per_step"] == {"ivon_seed_0": 1}
    sigma = results["ivon_posterior"]["0"]
    expected = 1 / np.sqrt(1e10 * (1e-3 + 1e-6))
    np.testing.assert_allclose(sigma["std_initial"], expected, rtol=1e-6)
    assert sigma["step"] == 6 and sigma["moved"] < 0.5
    for name in ("reliability.png", "training_curves.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, log = lm.load_state(str(run), seed=0, method="ivon")
    assert len(log["train_loss"]) == 6 and [s for s, _ in log["validation"]] == [3, 6]


def test_resume_gives_bitwise_the_uninterrupted_run(four_devices, tmp_path):
    run, _ = four_devices
    out = run_main([*TINY, *IVON_ONLY, "--stop-after", "2", "--output", str(tmp_path)])
    stopped = only_run(tmp_path)
    assert "--resume" in out and not (stopped / "results.json").exists()
    out = run_main(["--resume", str(stopped)])  # --stop-after was for the first job only
    assert "resuming at step 2" in out
    resumed, log = lm.load_state(str(stopped), seed=0, method="ivon")
    uninterrupted, full_log = lm.load_state(str(run), seed=0, method="ivon")
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
        np.testing.assert_array_equal(a, b)  # parameters, optimizer state, position, key
    assert log == full_log
    assert (
        json.loads((stopped / "results.json").read_text())["summary"]
        == json.loads((run / "results.json").read_text())["summary"]
    )


def train_directly(argv, devices: int | None = None):
    """The program's six steps of IVON without its evaluations and checkpoints: its model,
    optimizer, shardings, step and batches, on a mesh of ``devices``. Returns the parameters
    (NumPy)."""
    args = lm.build_parser().parse_args([*TINY, *IVON_ONLY, *argv])
    mesh = lm.make_mesh(devices)
    data = lm.load_data(args)
    graphdef, params = lm.make_model(args, seed=0)
    method = lm.build_method("ivon", args, mesh, graphdef, params)
    state = lm.put_global(jax.tree.map(np.asarray, method.init(params, 0)), method.shardings)
    windows = lm.TrainingWindows(data.streams["train"].tokens, args.context, seed=0)
    batch_sharding = lm.NamedSharding(mesh, lm.P(None, "data"))

    def batch(position):
        windows_ = windows.batch(position, args.batch_size).reshape(1, args.batch_size, -1)
        return lm.put_global(windows_, batch_sharding)

    for _ in range(args.steps):
        state, _ = method.train_step(state, batch(int(lm.to_host(state["data_position"]))))
    if args.fsdp:  # the matrices, their IVON buffers and the sample are sharded
        kernel = state["params"]["block_0"]["mlp_in"]["kernel"]  # (16, 64)
        assert kernel.sharding.spec == lm.P(None, "data")
        hessian = lm.find_ivon_state(state["opt_state"]).hessian["block_0"]["mlp_in"]["kernel"]
        assert hessian.sharding.spec == lm.P(None, "data")
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state["params"])


def test_one_device_and_fsdp_equal_four_data_parallel_devices(four_devices):
    run, _ = four_devices
    reference = final_params(run)
    assert jax.device_count() == 4
    for argv, devices in (([], 1), (["--fsdp"], None)):
        assert_trees_close(train_directly(argv, devices), reference, rtol=1e-4, atol=1e-6)


def test_fsdp_shards_the_largest_divisible_axis_of_matrices():
    assert lm.partition_spec((16, 48), 4, fsdp=True) == lm.P(None, "data")
    assert lm.partition_spec((256, 16), 4, fsdp=True) == lm.P("data", None)
    assert lm.partition_spec((6, 10), 4, fsdp=True) == lm.P()  # no axis divisible by 4
    assert lm.partition_spec((48,), 4, fsdp=True) == lm.P()  # vectors are replicated
    assert lm.partition_spec((16, 48), 4, fsdp=False) == lm.P()


@pytest.mark.slow
def test_two_processes_equal_one_process(two_processes, four_devices):
    processes, output = two_processes
    for process in processes:
        process.wait(timeout=300)
    logs = [(output / f"output_{rank}.txt").read_text() for rank in range(2)]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "2 cpu device(s) in 2 process(es)" in logs[0] and "seed 0" not in logs[1]
    run, _ = four_devices
    assert_trees_close(
        final_params(only_run(output / "runs")), final_params(run), rtol=1e-4, atol=1e-6
    )


# --------------------------------------------------------------------------------------------
# Pieces of the step
# --------------------------------------------------------------------------------------------


def one_step(argv, method: str = "ivon"):
    """One training step of a fresh run with ``argv``: the new state and the step's stats."""
    args = lm.build_parser().parse_args([*TINY, *argv])
    mesh = lm.make_mesh(1)  # one device compiles fastest; the sharded runs are above
    graphdef, params = lm.make_model(args, seed=0)
    built = lm.build_method(method, args, mesh, graphdef, params)
    state = lm.put_global(jax.tree.map(np.asarray, built.init(params, 0)), built.shardings)
    batch = np.random.default_rng(0).integers(
        0, 256, (args.accumulate, args.batch_size, args.context + 1), dtype=np.int32
    )
    batch = lm.put_global(batch, lm.NamedSharding(mesh, lm.P(None, "data")))
    return built.train_step(state, batch)


def test_accumulation_draws_one_sample_per_micro_batch_and_bf16_keeps_float32_state():
    after, stats = one_step(["--accumulate", "3", "--bf16"])
    assert int(stats["samples"]) == 3
    assert int(lm.to_host(after["data_position"])) == 3 * 8 and int(lm.to_host(after["step"])) == 1
    state = lm.find_ivon_state(after["opt_state"])
    assert int(lm.to_host(state.count)) == 1  # one update ...
    assert int(lm.to_host(state.sample_sums.count)) == 0  # ... which emptied the running sums
    assert np.isfinite(float(lm.to_host(stats["loss"])))
    # bfloat16 parameters, float32 IVON buffers (ivon's default state dtype)
    assert {x.dtype for x in jax.tree.leaves(after["params"])} == {jnp.dtype(jnp.bfloat16)}
    for tree in (state.hessian, state.momentum, state.noise, state.sample_sums.grads):
        assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype(jnp.float32)}


# --------------------------------------------------------------------------------------------
# Bad input: exit code 2, a message naming the problem
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--methods", "sgd"], "unknown method(s) ['sgd']"),
        (["--seeds", "0,x"], "expected integers separated by commas"),
        (["--steps", "ten"], "invalid int value: 'ten'"),
    ],
)
def test_malformed_flags_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        lm.main(argv)
    assert raised.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--heads", "5"], "--heads: must be a divisor of --width=16"),
        (["--warmup", "6"], "--warmup: must be in [0, --steps=6)"),
        (["--ivon-beta2", "1"], "--ivon-beta2: must be in [0, 1)"),
        (["--batch-size", "6"], "6 is not divisible by the 4 devices"),
        (["--test-bytes", "20"], "--test-bytes: must be >= 4 windows"),
    ],
)
def test_bad_values_exit_2_and_write_nothing(argv, message, tmp_path, capsys):
    assert lm.main([*TINY, *argv, "--output", str(tmp_path / "runs")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_a_folder_without_a_run_and_changed_flags(four_devices, tmp_path, capsys):
    assert lm.main(["--resume", str(tmp_path)]) == 2
    assert "holds no args.json" in capsys.readouterr().err
    run, _ = four_devices
    assert lm.main(["--resume", str(run), "--ess", "1e8"]) == 2
    assert "--ess (saved 10000000000.0, given 100000000.0)" in capsys.readouterr().err
