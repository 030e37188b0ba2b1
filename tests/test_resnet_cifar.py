"""examples/resnet_cifar end to end: train.py and test.py on tiny CIFAR-format files.

The module writes a few hundred random images in the standard python-pickle layout (plus a
small SVHN ``test_32x32.mat``), runs the scripts in subprocesses with the small ``cnn`` model,
and checks the files they write, the logged numbers against closed forms, bitwise resume,
equality across 1, 4 devices and 2 processes, and the error paths. Subprocesses share a JAX
compilation cache, so that runs of the same program compile once.
"""

from __future__ import annotations

import importlib.util
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

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "resnet_cifar"
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(EXAMPLE))

import cifar_data  # noqa: E402
import cifar_models  # noqa: E402
import cifar_training as ct  # noqa: E402
import train as train_script  # noqa: E402

IMAGES_PER_FILE = 64  # CIFAR-10: 5 x 64 = 320 training and 64 test images
BATCH = 160  # 2 steps per epoch: few enough that 1, 4 devices, 2 processes agree to 1e-6
ALPHA = 0.5
PRIORPREC = 25.0
HESS_INIT = 0.5


def run_args(data: Path, results: Path, *extra: str) -> list[str]:
    return [
        "--model",
        "cnn",
        "--optim",
        "ivon",
        "--alpha",
        str(ALPHA),
        "--epochs",
        "2",
        "--warmup",
        "1",
        "--batchsize",
        str(BATCH),
        "--testbatchsize",
        "64",
        "--test-samples",
        "2",
        "--hess-init",
        str(HESS_INIT),
        "--priorprec",
        str(PRIORPREC),
        "--datasetfolder",
        str(data),
        "--resultsfolder",
        str(results),
        *extra,
    ]


# --------------------------------------------------------------------------------------------
# Fixtures: data files, subprocess runner, shared runs
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


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("datasets")
    write_cifar(folder, np.random.default_rng(0))
    return folder


@pytest.fixture(scope="module")
def script_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")

    def env(devices: int = 1, **extra) -> dict:
        environment = dict(os.environ)
        environment.update(
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
            JAX_PLATFORMS="cpu",
            JAX_COMPILATION_CACHE_DIR=str(cache),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
            **extra,
        )
        return environment

    return env


def run_script(script: str, args, env: dict, expect: int = 0):
    completed = subprocess.run(
        [sys.executable, str(EXAMPLE / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == expect, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


def only_run(results: Path, optim: str = "ivon") -> Path:
    runs = sorted((results / "cifar10_cnn" / optim).iterdir())
    assert [r.name for r in runs] == ["run_0"]
    return runs[0]


def checkpoint_arrays(folder: Path) -> dict:
    with np.load(folder / ct.CHECKPOINT) as saved:
        return {k: saved[k] for k in saved.files if k.startswith("leaf_")}


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ivon_run(data, script_env, tmp_path_factory) -> Path:
    """Two epochs of IVON on one device, uninterrupted."""
    results = tmp_path_factory.mktemp("results_ivon")
    run_script("train.py", run_args(data, results), script_env())
    return only_run(results)


@pytest.fixture(scope="module")
def interrupted_run(data, script_env, tmp_path_factory):
    """The same run stopped after epoch 1; returns its folder and a copy of that checkpoint."""
    results = tmp_path_factory.mktemp("results_interrupted")
    out = run_script("train.py", run_args(data, results, "--stop-after", "1"), script_env())
    assert "--resume" in out.stdout
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
    assert saved["args"]["optim"] == "ivon" and saved["environment"]["num_train"] == 320
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
        sigma0 = 1 / np.sqrt(320 * (HESS_INIT + PRIORPREC / 320))
        np.testing.assert_allclose(entry["sigma_q50"], sigma0, rtol=2e-3)
        assert entry["sigma_q05"] <= entry["sigma_q50"] <= entry["sigma_q95"]
    results = json.loads((ivon_run / "results.json").read_text())
    assert results["test"] == log[-1]["test"] and results["epochs"] == 2


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_sgd_and_adamw_runs(optim, data, script_env, tmp_path):
    args = run_args(data, tmp_path, "--epochs", "1", "--warmup", "0", "--alpha", "0.01")
    args[args.index("--optim") + 1] = optim
    out = run_script("train.py", args, script_env())
    folder = only_run(tmp_path, optim)
    log = read_log(folder)
    assert len(log) == 1 and set(log[0]["test"]) == {"network"}
    check_metrics(log[0]["test"]["network"])
    assert "sigma_q50" not in log[0]
    assert "finished 1 epochs" in out.stdout
    if optim == "sgd":  # test.py evaluates the network alone, and finds the same numbers
        out = run_script("test.py", ["--resultsfolder", str(folder)], script_env())
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


def test_resume_gives_bitwise_the_uninterrupted_parameters(
    ivon_run, interrupted_run, data, script_env, tmp_path
):
    folder, after_one_epoch = interrupted_run
    assert not (folder / "results.json").exists() and len(read_log(folder)) == 1
    moved = tmp_path / "moved_datasets"  # the data may move between the two halves of a run
    shutil.copytree(data, moved)
    out = run_script(
        "train.py", ["--resume", str(folder), "--datasetfolder", str(moved)], script_env()
    )
    assert "resuming" in out.stdout
    resumed, uninterrupted = checkpoint_arrays(folder), checkpoint_arrays(ivon_run)
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:
        np.testing.assert_array_equal(resumed[k], uninterrupted[k])
    assert any(not np.array_equal(after_one_epoch[k], resumed[k]) for k in resumed)

    def without_timing(log):
        return [{k: v for k, v in e.items() if "second" not in k} for e in log]

    assert without_timing(read_log(folder)) == without_timing(read_log(ivon_run))


def assert_close_to(arrays: dict, expected: dict) -> None:
    assert arrays.keys() == expected.keys()
    for k in arrays:
        np.testing.assert_allclose(arrays[k], expected[k], rtol=1e-4, atol=1e-6)


def test_four_devices_equal_one_device(interrupted_run, data, script_env, tmp_path):
    _, one_device = interrupted_run
    run_script("train.py", run_args(data, tmp_path, "--stop-after", "1"), script_env(devices=4))
    folder = only_run(tmp_path)
    assert json.loads((folder / "args.json").read_text())["environment"]["devices"] == 4
    assert_close_to(checkpoint_arrays(folder), one_device)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process(interrupted_run, data, script_env, tmp_path):
    _, one_process = interrupted_run
    address = f"localhost:{free_port()}"
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                str(EXAMPLE / "train.py"),
                *run_args(data, tmp_path, "--stop-after", "1", "--distributed"),
            ],
            env=script_env(
                JAX_COORDINATOR_ADDRESS=address,
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(rank),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "in 2 process(es)" in outputs[0] and "epoch 1/2" not in outputs[1]  # one printer
    folder = only_run(tmp_path)
    environment = json.loads((folder / "args.json").read_text())["environment"]
    assert environment["processes"] == 2 and environment["devices"] == 2
    assert_close_to(checkpoint_arrays(folder), one_process)


# --------------------------------------------------------------------------------------------
# test.py
# --------------------------------------------------------------------------------------------


def test_test_script_metrics_json_and_plots(ivon_run, script_env):
    before = {name: (ivon_run / name).read_bytes() for name in ("checkpoint.npz", "log.jsonl")}
    out = run_script(
        "test.py",
        ["--resultsfolder", str(ivon_run), "--testmc", "2", "--ood", "cifar100"],
        script_env(),
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
    assert "bma2" in out.stdout and "AUROC" in out.stdout
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
        (["--batchsize", "640"], "larger than the 320 training images"),
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


def load_test_script():
    """examples/resnet_cifar/test.py under a name that cannot clash with the stdlib's test."""
    spec = importlib.util.spec_from_file_location("resnet_cifar_test", EXAMPLE / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_folder_without_checkpoint_exit_2(ivon_run, data, tmp_path, capsys):
    test_script = load_test_script()
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
    images = jnp.arange(2 * 32 * 32 * 3, dtype=jnp.int32).reshape(2, 32, 32, 3) + 1
    out = np.asarray(cifar_data.augment(jax.random.key(0), images))
    padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)))
    for image, result in zip(padded, out):
        windows = [
            w
            for dy in range(9)
            for dx in range(9)
            for w in (image[dy : dy + 32, dx : dx + 32], image[dy : dy + 32, dx : dx + 32][:, ::-1])
        ]
        assert any(np.array_equal(result, w) for w in windows)
    # over many images every offset and both flips occur
    many = cifar_data.augment(jax.random.key(1), jnp.ones((400, 32, 32, 1)))
    zero_rows = np.asarray(many[..., 0].sum(axis=2) == 0).sum(axis=1)  # padding rows kept
    assert set(zero_rows.tolist()) == set(range(5))


def test_data_files_are_read_as_images_and_labels(data, tmp_path):
    train = cifar_data.load_split(str(data), "cifar10", "train")
    assert train.images.shape == (320, 32, 32, 3) and train.images.dtype == np.uint8
    with open(data / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    # row layout: 1024 red, 1024 green, 1024 blue values, row-major 32 x 32
    np.testing.assert_array_equal(
        train.images[64 + 5, 3, 7], raw[b"data"][5][[3 * 32 + 7 + c * 1024 for c in range(3)]]
    )
    np.testing.assert_array_equal(train.labels[64:128], raw[b"labels"])
    scipy_io = pytest.importorskip("scipy.io")
    svhn = tmp_path / "svhn"
    svhn.mkdir()
    x = np.random.default_rng(1).integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    scipy_io.savemat(svhn / "test_32x32.mat", {"X": x, "y": np.ones((5, 1))})
    images = cifar_data.load_ood_images(str(tmp_path), "svhn")
    np.testing.assert_array_equal(images[2], x[..., 2])
    with pytest.raises(cifar_data.DataError, match=r"test_32x32\.mat"):
        cifar_data.load_ood_images(str(data), "svhn")


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
    ct.save_checkpoint(path, first, {"epoch": 1})
    second = jax.tree.map(lambda x: x + 1, first)

    def crash(*args):
        raise OSError("disk died during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        ct.save_checkpoint(path, second, {"epoch": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint.npz"]  # no temporary file left
    loaded, meta = ct.load_checkpoint(path, first)
    assert meta == {"epoch": 1}
    jax.tree.map(np.testing.assert_array_equal, loaded, first)
    with pytest.raises(ct.CheckpointError, match="another model or optimizer"):
        ct.load_checkpoint(path, {"a": first["a"]})
    with pytest.raises(ct.CheckpointError, match=r"float32\[3\]"):
        ct.load_checkpoint(path, {"a": np.zeros(3, np.float32), "b": first["b"]})


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
    compiled = step.lower(state, images, labels, order, 0).compile()
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
    gathers = [line for line in lowered.compile().as_text().splitlines() if "all-gather(" in line]
    assert gathers and all("f32[32,10]" in line for line in gathers)


def test_resnet18_is_the_cifar_variant():
    model = cifar_models.make_model("resnet18", 100)
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
        cifar_models.make_model("resnet50", 10)
