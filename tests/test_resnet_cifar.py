"""examples/resnet_cifar end to end: train.py and test.py on tiny CIFAR-format files.

The module writes 32 random images per file in the standard python-pickle layout, runs the
programs' ``main`` in this process (on the conftest's four host devices) with the small
``cnn``, and checks the files they write, the logged numbers against closed forms, bitwise
resume, ``test.py`` reproducing the last evaluation, and the error paths. The runs share
the suite's compilation cache, so that the runs of one configuration compile once. As
``python train.py`` from its folder, in processes of their own that run while this one works:
IVON on one device and over two processes (``--distributed``), both compared with the
in-process run on four devices, and AdamW.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import pickle
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bdl_examples.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from bdl_examples.data import DataError, load_cifar_ood_images, load_cifar_split
from bdl_examples.models import make_cifar_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "resnet_cifar"


def import_programs():
    """The example's modules as they see each other when run as scripts (their folder first
    on the path), without leaving that folder on ``sys.path`` or their names in
    ``sys.modules``: other examples have a ``train.py`` too. ``test.py`` gets a name that
    cannot clash with the standard library's ``test``."""
    names = ("cifar_data", "cifar_training", "train")
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    sys.path.insert(0, str(EXAMPLE))
    try:
        modules = [importlib.import_module(name) for name in names]
        spec = importlib.util.spec_from_file_location("resnet_cifar_test", EXAMPLE / "test.py")
        test_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(test_module)
    finally:
        sys.path.remove(str(EXAMPLE))
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    return (*modules, test_module)


cifar_data, ct, train_script, test_script = import_programs()

# CIFAR-10: 5 x 32 = 160 training and 32 test images. Compiling costs far more than these
# steps; with fewer images per device (5 of 20), 1 and 4 devices drifted apart by 1e-3 in
# two steps (summation order, amplified by BatchNorm), beyond the tolerance below.
IMAGES_PER_FILE = 32
NUM_TRAIN = 5 * IMAGES_PER_FILE
BATCH = 80  # 2 steps per epoch; 20 images per device on 4 devices (in process)
TEST_BATCH = 32
ALPHA = 0.5
PRIORPREC = 25.0
HESS_INIT = 0.5


def run_args(data: Path, results: Path, *extra: str) -> list[str]:
    return [
        *("--model", "cnn", "--optim", "ivon", "--alpha", str(ALPHA)),
        *("--epochs", "2", "--warmup", "1", "--batchsize", str(BATCH)),
        *("--testbatchsize", str(TEST_BATCH), "--test-samples", "2"),
        *("--hess-init", str(HESS_INIT), "--priorprec", str(PRIORPREC)),
        *("--datasetfolder", str(data), "--resultsfolder", str(results)),
        *extra,
    ]


# --------------------------------------------------------------------------------------------
# Fixtures: data files, runners, shared runs
# --------------------------------------------------------------------------------------------


def write_cifar(folder: Path, rng) -> None:
    """CIFAR-10 and CIFAR-100 python pickles with random images whose brightness depends on
    the class (so that a few steps learn something)."""

    def write(path, labels, label_key):
        offset = (labels[:, None] % 10) * 8.0 - 36
        data = np.clip(rng.normal(128, 40, (len(labels), 3072)) + offset, 0, 255)
        with open(path, "wb") as f:
            pickle.dump({b"data": data.astype(np.uint8), label_key: labels.tolist()}, f)

    cifar10 = folder / "cifar-10-batches-py"
    cifar10.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write(cifar10 / name, rng.integers(0, 10, IMAGES_PER_FILE), b"labels")
    cifar100 = folder / "cifar-100-python"
    cifar100.mkdir()
    for name in ("train", "test"):
        write(cifar100 / name, rng.integers(0, 100, IMAGES_PER_FILE), b"fine_labels")


# The example programs, end to end: slow as a whole (skipped by `-m "not slow"`).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("datasets")
    write_cifar(folder, np.random.default_rng(0))
    return folder


def run_main(main, argv) -> str:
    """``main(argv)`` in this process; it must return 0. Returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(argv)
    assert code == 0, out.getvalue()[-3000:]
    return out.getvalue()


# LLVM without optimisation, for the subprocesses and the sharding test's own compilations:
# compiling takes a third of the time, and what they check (the command line, devices,
# processes, the partitioned program) does not depend on it.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def script_env(devices: int, **extra) -> dict:
    """The environment of a program run in a subprocess: CPU only, ``devices`` host devices."""
    flags = [f"--xla_force_host_platform_device_count={devices}"]
    flags += [f"--{name}={value}" for name, value in FAST_COMPILE.items()]
    return dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", **extra)


def script_command(script: str, *args: str) -> list[str]:
    """``python train.py ...`` as the README has it: run from the example's folder."""
    return [sys.executable, script, *args]


def only_run(results: Path, optim: str = "ivon") -> Path:
    runs = sorted((results / "cifar10_cnn" / optim).iterdir())
    assert [r.name for r in runs] == ["run_0"]
    return runs[0]


def checkpoint_arrays(folder: Path) -> dict:
    with np.load(folder / ct.CHECKPOINT) as saved:
        return {k: saved[k] for k in saved.files if k.startswith("leaf_")}


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def non_ivon_args(data: Path, results: Path, optim: str) -> list[str]:
    """One epoch of SGD or AdamW."""
    args = run_args(data, results, "--epochs", "1", "--warmup", "0", "--alpha", "0.01")
    args[args.index("--optim") + 1] = optim
    return args


@pytest.fixture(scope="module")
def other_processes(data, tmp_path_factory, request):
    """The runs of ``python train.py`` in processes of their own, one device each, started
    before this process compiles its runs so that they use the other core meanwhile (each
    only when the test that checks it is selected):

    - ``one_device``: IVON stopped after epoch 1, like ``interrupted_run`` (its reference);
    - ``adamw``: one epoch of AdamW (SGD runs in this process);
    - ``two_processes``: as ``one_device``, with ``--distributed`` over two processes.

    The IVON runs evaluate the mean only. Returns ``{name: (processes, results folder)}``;
    ``finish`` waits for a run.
    """
    selected = {getattr(item, "originalname", item.name) for item in request.session.items}
    runs = {}

    def start(name: str, test: str, args_for, count: int = 1, env_for=lambda rank: {}):
        if test not in selected:
            return
        results = tmp_path_factory.mktemp(f"results_{name}")
        processes = []
        for rank in range(count):
            with open(results / f"output_{rank}.txt", "w") as output:
                process = subprocess.Popen(
                    script_command("train.py", *args_for(results)),
                    cwd=EXAMPLE,
                    env=script_env(devices=1, **env_for(rank)),
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            # a lower priority: this process's work, which the tests wait for first, goes ahead
            os.setpriority(os.PRIO_PROCESS, process.pid, 5)
            processes.append(process)
        runs[name] = (processes, results)

    def stopped(results, *extra):
        return run_args(data, results, "--stop-after", "1", "--test-samples", "0", *extra)

    start("one_device", "test_command_line_on_one_device_equals_four_devices", stopped)
    start(
        "adamw",
        "test_adamw_from_the_command_line",
        lambda results: non_ivon_args(data, results, "adamw"),
    )
    address = f"localhost:{free_port()}"
    start(
        "two_processes",
        "test_two_processes_equal_one_process",
        lambda results: stopped(results, "--distributed"),
        count=2,
        env_for=lambda rank: {
            "JAX_COORDINATOR_ADDRESS": address,
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(rank),
        },
    )
    yield runs
    for processes, _ in runs.values():
        for process in processes:
            if process.poll() is None:  # a test failed before waiting for it
                process.kill()
                process.wait()


def finish(run, optim: str = "ivon") -> tuple[list[str], Path]:
    """Wait for the processes of a run of ``other_processes``: their outputs and the run."""
    processes, results = run
    for process in processes:
        process.wait(timeout=600)
    outputs = [(results / f"output_{rank}.txt").read_text() for rank in range(len(processes))]
    codes = [process.returncode for process in processes]
    assert codes == [0] * len(processes), "\n".join(out[-3000:] for out in outputs)
    return outputs, only_run(results, optim)


@pytest.fixture(scope="module")
def ivon_run(other_processes, data, tmp_path_factory) -> Path:
    """Two epochs of IVON on four devices, uninterrupted."""
    results = tmp_path_factory.mktemp("results_ivon")
    out = run_main(train_script.main, run_args(data, results))
    assert "finished 2 epochs" in out and "on 4 cpu device(s) in 1 process(es)" in out
    return only_run(results)


@pytest.fixture(scope="module")
def interrupted_run(other_processes, data, tmp_path_factory):
    """The same run stopped after epoch 1; returns its folder and a copy of that checkpoint
    (the reference of the one-device and two-process runs)."""
    results = tmp_path_factory.mktemp("results_interrupted")
    out = run_main(train_script.main, run_args(data, results, "--stop-after", "1"))
    assert "--resume" in out
    folder = only_run(results)
    return folder, checkpoint_arrays(folder)


# --------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------


def check_metrics(m: dict) -> None:
    assert set(m) == {"accuracy", "nll", "brier", "ece"}
    assert 0 <= m["accuracy"] <= 1 and 0 <= m["ece"] <= 1 and 0 <= m["brier"] <= 2
    assert 0 < m["nll"] < 20


def test_ivon_run_writes_log_checkpoint_and_results(ivon_run):
    assert {"args.json", "log.jsonl", "checkpoint.npz", "results.json"} <= set(os.listdir(ivon_run))
    assert not [name for name in os.listdir(ivon_run) if name.endswith(".tmp")]
    saved = json.loads((ivon_run / "args.json").read_text())
    assert saved["args"]["optim"] == "ivon" and saved["environment"]["num_train"] == NUM_TRAIN
    assert saved["environment"]["devices"] == 4
    log = read_log(ivon_run)
    assert [e["epoch"] for e in log] == [1, 2]
    steps, warmup = 2, 2
    # warm-up ends at alpha after step 1; the cosine at step 3 of 4 is alpha (1 + cos pi/2) / 2
    np.testing.assert_allclose(log[0]["learning_rate"], ALPHA, rtol=1e-6)
    np.testing.assert_allclose(
        log[1]["learning_rate"],
        ALPHA * 0.5 * (1 + np.cos(np.pi * (2 * steps - 1 - warmup) / (2 * steps - warmup))),
        rtol=1e-5,
    )
    for entry in log:
        assert set(entry["test"]) == {"mean", "bma2"}
        for m in entry["test"].values():
            check_metrics(m)
        assert entry["images_per_second"] > 0 and np.isfinite(entry["train_loss"])
        # beta2 = 0.99999 leaves h at h0 within 0.1% after 4 steps, so sigma is still
        # 1 / sqrt(ess (h0 + wd)) with ess = N and wd = priorprec / N
        sigma0 = 1 / np.sqrt(NUM_TRAIN * (HESS_INIT + PRIORPREC / NUM_TRAIN))
        np.testing.assert_allclose(entry["sigma_q50"], sigma0, rtol=2e-3)
        assert entry["sigma_q05"] <= entry["sigma_q50"] <= entry["sigma_q95"]
    results = json.loads((ivon_run / "results.json").read_text())
    assert results["test"] == log[-1]["test"] and results["epochs"] == 2


def check_non_ivon_run(folder: Path, output: str) -> list[dict]:
    log = read_log(folder)
    assert len(log) == 1 and set(log[0]["test"]) == {"network"}
    check_metrics(log[0]["test"]["network"])
    assert "sigma_q50" not in log[0]
    assert "finished 1 epochs" in output
    return log


def test_sgd_run_and_test_script(data, tmp_path):
    out = run_main(train_script.main, non_ivon_args(data, tmp_path, "sgd"))
    folder = only_run(tmp_path, "sgd")
    log = check_non_ivon_run(folder, out)
    # test.py evaluates the network alone, and finds the same numbers
    run_main(test_script.main, ["--resultsfolder", str(folder)])
    results = json.loads((folder / "test_results.json").read_text())
    assert set(results["methods"]) == {"network"} and results["testmc"] is None
    for k, v in log[0]["test"]["network"].items():
        np.testing.assert_allclose(results["methods"]["network"][k], v, rtol=1e-6)
    assert (folder / "reliability.png").exists() and (folder / "entropy.png").exists()


def test_the_seed_commands_parse_to_the_seed_settings():
    parser = train_script.build_parser()
    sgd = parser.parse_args(
        shlex.split("--alpha 0.03 --beta1 0.9 --priorprec 25 --optim sgd --dataset cifar10")
    )
    ivon_args = parser.parse_args(
        shlex.split(
            "--alpha 0.5 --beta1 0.9 --beta2 0.99999 --priorprec 25 --optim ivon "
            "--hess-init 0.5 --dataset cifar10"
        )
    )
    for args in (sgd, ivon_args):
        train_script.check_ranges(args)
        assert (args.model, args.batchsize, args.epochs, args.warmup) == ("resnet18", 200, 180, 5)
        assert (args.datasetfolder, args.resultsfolder, args.test_samples) == (
            "datasets",
            "results",
            16,
        )
        assert not args.noaugment and args.mcsamples == 1 and args.dafactor == 1.0
    assert (sgd.optim, sgd.alpha, sgd.beta1) == ("sgd", 0.03, 0.9)
    assert (ivon_args.optim, ivon_args.alpha, ivon_args.beta2, ivon_args.hess_init) == (
        "ivon",
        0.5,
        0.99999,
        0.5,
    )
    test_args = test_script.build_parser().parse_args(
        shlex.split("--resultsfolder results/cifar10_resnet18/ivon/run_0/ --testmc 64")
    )
    assert (test_args.testmc, test_args.ood, test_args.randomseed) == (64, None, None)


def test_resume_gives_bitwise_the_uninterrupted_parameters(
    ivon_run, interrupted_run, data, tmp_path
):
    folder, after_one_epoch = interrupted_run
    assert not (folder / "results.json").exists() and len(read_log(folder)) == 1
    moved = tmp_path / "moved_datasets"  # the data may move between the two halves of a run
    shutil.copytree(data, moved)
    out = run_main(train_script.main, ["--resume", str(folder), "--datasetfolder", str(moved)])
    assert "resuming" in out
    resumed, uninterrupted = checkpoint_arrays(folder), checkpoint_arrays(ivon_run)
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:
        np.testing.assert_array_equal(resumed[k], uninterrupted[k])
    assert any(not np.array_equal(after_one_epoch[k], resumed[k]) for k in resumed)

    def without_timing(log):
        return [{k: v for k, v in e.items() if "second" not in k} for e in log]

    assert without_timing(read_log(folder)) == without_timing(read_log(ivon_run))
    out = run_main(train_script.main, ["--resume", str(folder)])
    assert "already complete" in out


def assert_close_to(arrays: dict, expected: dict) -> None:
    assert arrays.keys() == expected.keys()
    for k in arrays:
        np.testing.assert_allclose(arrays[k], expected[k], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# test.py
# --------------------------------------------------------------------------------------------


def test_test_script_metrics_json_and_plots(ivon_run):
    before = {name: (ivon_run / name).read_bytes() for name in ("checkpoint.npz", "log.jsonl")}
    out = run_main(
        test_script.main,
        ["--resultsfolder", str(ivon_run), "--testmc", "2", "--ood", "cifar100"],
    )
    results = json.loads((ivon_run / "test_results.json").read_text())
    assert results["epoch"] == 2 and results["testmc"] == 2 and results["ood"] == "cifar100"
    assert set(results["methods"]) == {"mean", "bma2"}
    final = read_log(ivon_run)[-1]["test"]
    for method, m in results["methods"].items():
        # the same network(s), BatchNorm statistics and samples as train.py's last evaluation
        for k, v in final[method].items():
            np.testing.assert_allclose(m[k], v, rtol=1e-6)
        check_metrics({k: m[k] for k in ("accuracy", "nll", "brier", "ece")})
        assert 0 <= m["ood"]["auroc_max_prob"] <= 1 and 0 <= m["ood"]["auroc_entropy"] <= 1
        assert 0 <= m["mean_entropy"] <= np.log(10)
    for name in ("reliability.png", "entropy.png"):
        assert (ivon_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bma2" in out and "AUROC" in out
    for name, content in before.items():
        assert (ivon_run / name).read_bytes() == content


# --------------------------------------------------------------------------------------------
# Bad input: exit code 2, a message naming the problem, nothing written
# --------------------------------------------------------------------------------------------


def call(script_main, argv, capsys) -> tuple[int, str]:
    try:
        code = script_main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--optim", "adam"), ("--dataset", "mnist"), ("--model", "resnet50")],
)
def test_unknown_choices_exit_2(flag, value, data, tmp_path, capsys):
    code, err = call(train_script.main, [*run_args(data, tmp_path), flag, value], capsys)
    assert code == 2 and "invalid choice" in err and value in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--warmup", "2"], "--warmup: must be in [0, --epochs=2)"),
        (["--beta1", "1.0"], "--beta1: must be in [0, 1)"),
        (["--mcsamples", "0"], "--mcsamples: must be >= 1"),
        (["--batchsize", "30"], "30 is not divisible by the 4 devices"),
        (["--batchsize", str(2 * NUM_TRAIN)], f"larger than the {NUM_TRAIN} training images"),
    ],
)
def test_bad_arguments_exit_2(extra, message, data, tmp_path, capsys):
    assert jax.device_count() == 4  # the conftest's host devices
    code, err = call(train_script.main, run_args(data, tmp_path, *extra), capsys)
    assert code == 2 and message in err, err
    assert not any(tmp_path.iterdir())


def test_missing_and_truncated_data_exit_2(data, tmp_path, capsys):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    results = tmp_path / "results"
    code, err = call(train_script.main, run_args(empty, results), capsys)
    assert code == 2
    assert "cifar-10-python.tar.gz" in err and "cifar-10-batches-py" in err and str(empty) in err
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    path = broken / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:5000])
    code, err = call(train_script.main, run_args(broken, results), capsys)
    assert code == 2 and "data_batch_3" in err and "truncated" in err
    assert not results.exists()


def test_folder_without_checkpoint_exit_2(ivon_run, data, tmp_path, capsys):
    code, err = call(test_script.main, ["--resultsfolder", str(tmp_path)], capsys)
    assert code == 2 and "checkpoint.npz" in err
    code, err = call(train_script.main, ["--resume", str(tmp_path)], capsys)
    assert code == 2 and "checkpoint.npz" in err
    assert not any(tmp_path.iterdir())
    # resuming with a different training flag is refused, and the run is left as it was
    before = {p.name: p.read_bytes() for p in ivon_run.iterdir()}
    code, err = call(train_script.main, ["--resume", str(ivon_run), "--alpha", "0.1"], capsys)
    assert code == 2 and "--alpha (saved 0.5, given 0.1)" in err
    code, err = call(
        test_script.main, ["--resultsfolder", str(ivon_run), "--ood", "cifar10"], capsys
    )
    assert code == 2 and "--ood" in err
    code, err = call(
        test_script.main, ["--resultsfolder", str(ivon_run), "--testbatchsize", "30"], capsys
    )
    assert code == 2 and "not divisible by the 4 devices" in err
    assert {p.name: p.read_bytes() for p in ivon_run.iterdir()} == before


# --------------------------------------------------------------------------------------------
# The pieces, in process
# --------------------------------------------------------------------------------------------


def test_learning_rate_schedule_closed_form():
    schedule = ct.learning_rate_schedule(0.2, 4, 12)
    steps = np.arange(12)
    expected = np.where(
        steps < 4, 0.2 * (steps + 1) / 4, 0.1 * (1 + np.cos(np.pi * (steps - 4) / 8))
    )
    np.testing.assert_allclose([float(schedule(t)) for t in steps], expected, rtol=1e-5)
    assert float(schedule(12)) == pytest.approx(0.0, abs=1e-7)
    # no warm-up: cosine from the first step
    np.testing.assert_allclose(float(ct.learning_rate_schedule(0.2, 0, 10)(0)), 0.2)


def test_augment_is_a_padded_crop_and_flip():
    # distinct positive pixels (the padding is 0), one compiled call for all the checks
    images = jnp.arange(400 * 32 * 32, dtype=jnp.int32).reshape(400, 32, 32, 1) + 1
    out = np.asarray(jax.jit(cifar_data.augment)(jax.random.key(0), images))
    padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)))
    for image, result in zip(padded[:3], out[:3]):
        windows = [
            w
            for dy in range(9)
            for dx in range(9)
            for w in (image[dy : dy + 32, dx : dx + 32], image[dy : dy + 32, dx : dx + 32][:, ::-1])
        ]
        assert any(np.array_equal(result, w) for w in windows)
    # over many images every vertical offset occurs (0 to 4 rows of padding) ...
    zero_rows = (out[..., 0].sum(axis=2) == 0).sum(axis=1)
    assert set(zero_rows.tolist()) == set(range(5))
    # ... and both orientations: row 16 always lies inside the image; its pixels increase
    # from left to right unless the crop was flipped
    row = out[:, 16, :, 0]
    steps = [np.diff(r[r > 0]) for r in row]
    flipped = np.array([bool(np.all(d < 0)) for d in steps])
    assert all(np.all(d > 0) or np.all(d < 0) for d in steps)
    assert 0.3 < flipped.mean() < 0.7


def test_data_files_are_read_as_images_and_labels(data, tmp_path):
    train = load_cifar_split(str(data), "cifar10", "train")
    assert train.images.shape == (NUM_TRAIN, 32, 32, 3) and train.images.dtype == np.uint8
    with open(data / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    # row layout: 1024 red, 1024 green, 1024 blue values, row-major 32 x 32
    np.testing.assert_array_equal(
        train.images[IMAGES_PER_FILE + 5, 3, 7],
        raw[b"data"][5][[3 * 32 + 7 + c * 1024 for c in range(3)]],
    )
    np.testing.assert_array_equal(
        train.labels[IMAGES_PER_FILE : 2 * IMAGES_PER_FILE], raw[b"labels"]
    )
    with open(data / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    cifar100 = load_cifar_split(str(data), "cifar100", "train")
    np.testing.assert_array_equal(cifar100.labels, raw[b"fine_labels"])
    np.testing.assert_array_equal(cifar100.images[2, 0, 1], raw[b"data"][2][[1, 1025, 2049]])
    scipy_io = pytest.importorskip("scipy.io")
    svhn = tmp_path / "svhn"
    svhn.mkdir()
    x = np.random.default_rng(1).integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    scipy_io.savemat(svhn / "test_32x32.mat", {"X": x, "y": np.ones((5, 1))})
    images = load_cifar_ood_images(str(tmp_path), "svhn")
    np.testing.assert_array_equal(images[2], x[..., 2])
    with pytest.raises(DataError, match=r"test_32x32\.mat"):
        load_cifar_ood_images(str(data), "svhn")


def test_sgd_and_adamw_weight_decay_is_priorprec_over_n():
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, 0.25])}
    wd = 25.0 / 100

    def first_update(name, **kw):
        tx = ct.make_optimizer(name, lambda t: 0.1, num_train=100, priorprec=25.0, beta1=0.9, **kw)
        updates, _ = tx.update(grads, tx.init(params), params)
        return np.asarray(updates["w"])

    # SGD: the decay is added to the gradient
    np.testing.assert_allclose(first_update("sgd"), -0.1 * (grads["w"] + wd * params["w"]))
    # AdamW: decoupled; Adam's first step is lr * sign(g) (up to eps)
    np.testing.assert_allclose(
        first_update("adamw"), -0.1 * (np.sign(grads["w"]) + wd * params["w"]), atol=1e-6
    )
    ivon_state = ct.make_optimizer(
        "ivon", lambda t: 0.1, num_train=100, priorprec=25.0, beta1=0.9, dafactor=2.0
    ).init(params)[0]
    assert float(ivon_state.ess) == 200.0 and float(ivon_state.weight_decay) == wd


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.npz")
    first = {"a": np.arange(3.0), "b": {"c": np.ones((2, 2), np.float32)}}
    save_checkpoint(path, state=first, meta={"epoch": 1})
    second = jax.tree.map(lambda x: x + 1, first)

    def crash(*args):
        raise OSError("disk died during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, state=second, meta={"epoch": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint.npz"]  # no temporary file left
    loaded, meta = load_checkpoint(path, template=first)
    assert meta == {"epoch": 1}
    jax.tree.map(np.testing.assert_array_equal, loaded, first)
    with pytest.raises(CheckpointError, match="another model or optimizer"):
        load_checkpoint(path, template={"a": first["a"]})
    with pytest.raises(CheckpointError, match=r"float32\[3\]"):
        load_checkpoint(path, template={"a": np.zeros(3, np.float32), "b": first["b"]})


class TinyBatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(8)(x.reshape((x.shape[0], -1))[:, :48])
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        return nn.Dense(10)(x)


def test_ivon_under_data_parallel_sharding_gathers_no_parameters():
    """On 4 devices the training step only all-reduces (gradients, BatchNorm statistics); the
    parameters, IVON's state and the sample stay replicated. The Bayesian model average
    gathers nothing but its output."""
    mesh = ct.make_mesh()
    assert mesh.size == 4
    model = TinyBatchNormNet()  # the property does not depend on the network; compiles fast
    optimizer = ct.make_optimizer(
        "ivon", lambda t: 0.1, num_train=64, priorprec=25.0, beta1=0.9, mcsamples=2
    )
    state = ct.init_state(model, optimizer, jax.random.key(0), mesh)
    rng = np.random.default_rng(0)
    images, labels = ct.replicate(
        (rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 64)), mesh
    )
    step = ct.make_train_step(
        model,
        optimizer,
        optim="ivon",
        dataset="cifar10",
        batch_size=32,
        steps_per_epoch=2,
        mcsamples=2,
        augment=True,
        key=jax.random.key(1),
        mesh=mesh,
    )
    order = ct.make_epoch_order(64, jax.random.key(2), mesh)(0)
    compiled = step.lower(state, images, labels, order, 0).compile(FAST_COMPILE)
    hlo = compiled.as_text()
    assert "all-reduce" in hlo and "all-gather" not in hlo and "all-to-all" not in hlo
    new_state, stats = compiled(state, images, labels, order, 0)
    for leaf in jax.tree.leaves(new_state):
        assert leaf.sharding.is_fully_replicated
    assert np.isfinite(float(stats["loss"]))

    predict = ct.make_predict(model, dataset="cifar10", batch_size=32, mesh=mesh, bma_samples=4)
    lowered = predict.model_average.lower(
        jax.random.key(3), new_state.params, new_state.batch_stats, new_state.opt_state, images, 0
    )
    hlo = lowered.compile(FAST_COMPILE).as_text()
    gathers = [line for line in hlo.splitlines() if "all-gather(" in line]
    assert gathers and all("f32[32,10]" in line for line in gathers)


def test_resnet18_is_the_cifar_variant():
    model = make_cifar_model("resnet18", num_classes=100)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False)
    )
    params = variables["params"]
    # 3x3 stride-1 stem: the well-known 11,173,962 parameters of CIFAR ResNet-18 with 10
    # classes, plus 512 x 90 + 90 for the larger head
    assert sum(x.size for x in jax.tree.leaves(params)) == 11_173_962 + 512 * 90 + 90
    assert params["Conv_0"]["kernel"].shape == (3, 3, 3, 64)
    assert "batch_stats" in variables
    # no max-pool: the first stage keeps 32x32 maps, the last one sees 4x4 (32 / 2^3)
    _, state = jax.eval_shape(
        lambda v: model.apply(
            v, jnp.zeros((2, 32, 32, 3)), train=False, capture_intermediates=True, mutable=True
        ),
        variables,
    )
    outputs = state["intermediates"]
    assert outputs["BasicBlock_0"]["__call__"][0].shape == (2, 32, 32, 64)
    assert outputs["BasicBlock_7"]["__call__"][0].shape == (2, 4, 4, 512)
    with pytest.raises(ValueError, match="accepted"):
        make_cifar_model("resnet50", num_classes=10)


# --------------------------------------------------------------------------------------------
# Other processes (last, so that they have run while this process worked)
# --------------------------------------------------------------------------------------------


def test_command_line_on_one_device_equals_four_devices(interrupted_run, other_processes):
    """``python train.py`` from its folder, on one device: the four-device parameters."""
    _, four_devices = interrupted_run
    (output,), folder = finish(other_processes["one_device"])
    assert "continue with python train.py --resume" in output
    assert json.loads((folder / "args.json").read_text())["environment"]["devices"] == 1
    assert_close_to(checkpoint_arrays(folder), four_devices)


def test_adamw_from_the_command_line(other_processes):
    (output,), folder = finish(other_processes["adamw"], optim="adamw")
    check_non_ivon_run(folder, output)


@pytest.mark.slow
def test_two_processes_equal_one_process(interrupted_run, other_processes):
    _, one_process = interrupted_run
    outputs, folder = finish(other_processes["two_processes"])
    assert "in 2 process(es)" in outputs[0] and "epoch 1/2" not in outputs[1]  # one printer
    environment = json.loads((folder / "args.json").read_text())["environment"]
    assert environment["processes"] == 2 and environment["devices"] == 2
    assert_close_to(checkpoint_arrays(folder), one_process)
