"""Tests of examples/implicit_vi_paper/train.py, the paper's training program, on tiny files the
tests write, and of examples/uncertainty_eval.py --run on one of its runs.

Data loading reads the standard release formats (IDX files, optionally gzipped; CIFAR-10
python pickles) and is compared with the arrays that were written; errors exit with status 2
and say where the files go. The runs are trained once for the module (``runs``): a short run
end to end writes its run folder, a run stopped and resumed from its checkpoint ends
bit-for-bit where the uninterrupted run ends, and the calibrated program trains one run per KL
weight and keeps the best on validation. Every run is a tiny MLP on 6 x 6 images with a few
steps per epoch: what costs is compiling, so the runs share one generator and the module
shares a compilation cache (each program is compiled once however many runs build it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from bdl_examples import paper
from bdl_examples.checkpoints import load_meta
from bdl_examples.data import load_cifar_split, read_idx
from programs import load_script

import implicit_vi as ivi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = os.path.join(ROOT, "examples", "implicit_vi_paper", "train.py")


train = load_script("examples/implicit_vi_paper/train.py", "implicit_vi_paper_train")

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def write_idx(path, array: np.ndarray, type_code: int = 0x08) -> None:
    """Writes ``array`` in the IDX format: magic 0 0 type ndim, big-endian sizes, the data."""
    dtype = {0x08: ">u1", 0x0B: ">i2"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(dtype).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


def make_idx_dataset(folder, num_train=48, num_test=16, side=6, seed=0, gz=("train_images",)):
    """Tiny MNIST-format files whose label is learnable (a bright quadrant per class)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for split, n in (("train", num_train), ("test", num_test)):
        labels = rng.integers(0, 4, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, side, side)).astype(np.uint8)
        half = side // 2
        for i, label in enumerate(labels):
            r, c = divmod(int(label), 2)
            images[i, r * half : (r + 1) * half, c * half : (c + 1) * half] += 150
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    for key, name in IDX_NAMES.items():
        write_idx(os.path.join(folder, name + (".gz" if key in gz else "")), arrays[key])
    return arrays


# The example programs, end to end: slow as a whole (skipped by `-m "not slow"`).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("module_compilation_cache")]


def rewrite_settings(path, edit) -> None:
    """Applies ``edit`` to the flags saved in a checkpoint (as another version would have
    saved them), leaving its arrays."""
    with np.load(path) as saved:
        arrays = {name: saved[name] for name in saved.files}
    meta = json.loads(str(arrays.pop("meta")))
    edit(meta["settings"])
    with open(path, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)


def without_seconds(record: dict) -> dict:
    """A log row or metrics without their timing (which no two runs share)."""
    return {k: v for k, v in record.items() if k != "seconds"}


def run_main(argv):
    """``main(argv)``; the exit status (0 when it returns normally)."""
    try:
        train.main(argv)
    except SystemExit as exit_:
        return exit_.code
    return 0


# ----- data loading --------------------------------------------------------------------------


def test_read_idx_plain_gzipped_and_wider_types(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", images)
    write_idx(tmp_path / "a.gz", images)
    for name in ("a", "a.gz"):
        loaded = read_idx(str(tmp_path / name))
        assert loaded.dtype == np.uint8 and np.array_equal(loaded, images)
    values = np.array([[-300, 2], [7, 1000]])
    write_idx(tmp_path / "b", values, type_code=0x0B)  # big-endian int16
    assert np.array_equal(read_idx(str(tmp_path / "b")), values)


def test_mnist_files_load_with_their_labels_and_are_standardised(tmp_path):
    arrays = make_idx_dataset(tmp_path / "mnist", num_train=64, gz=("train_images", "test_labels"))
    data = paper.load_image_data("mnist", str(tmp_path))
    assert data.x_train.shape == (64, 6, 6, 1) and data.x_test.shape == (16, 6, 6, 1)
    assert np.array_equal(data.y_train, arrays["train_labels"])
    assert np.array_equal(data.y_test, arrays["test_labels"])
    raw = arrays["train_images"] / 255.0
    mean, std = raw.mean(), raw.std()
    np.testing.assert_allclose(data.x_train[..., 0], (raw - mean) / std, rtol=1e-5, atol=1e-5)
    expected_test = (arrays["test_images"] / 255.0 - mean) / std
    np.testing.assert_allclose(data.x_test[..., 0], expected_test, rtol=1e-5, atol=1e-5)
    assert data.num_classes == 4 and data.x_val is None
    # The torchvision folder layout is found too.
    make_idx_dataset(tmp_path / "other" / "FashionMNIST" / "raw", gz=())
    assert paper.load_image_data("fashion_mnist", str(tmp_path / "other")).x_train.shape[0] == 48


def test_cifar10_python_batches_load_in_the_release_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (3, 3072)).astype(np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, 3)]
        written[name] = (data, labels)
        with open(folder / name, "wb") as f:  # the release: byte-string keys, labels a list
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f)
    x_train, y_train = load_cifar_split(str(tmp_path), "cifar10", "train")
    assert x_train.shape == (15, 32, 32, 3)
    # Row n of the file holds the red, green, blue 32 x 32 planes, each row-major.
    data, labels = written["data_batch_2"]
    for channel, row, col in ((0, 0, 0), (1, 5, 7), (2, 31, 30)):
        assert x_train[3 + 1, row, col, channel] == data[1, channel * 1024 + row * 32 + col]
    assert list(y_train[3:6]) == labels
    # The program's loader: the same images, scaled and standardised per channel.
    loaded = paper.load_image_data("cifar10", str(tmp_path))
    assert loaded.x_train.shape == (15, 32, 32, 3) and loaded.x_test.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(loaded.x_train.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    assert list(loaded.y_test) == written["test_batch"][1] and loaded.num_classes == 10
    expected = (x_train / 255.0 - (x_train / 255.0).mean((0, 1, 2))) / (x_train / 255.0).std(
        (0, 1, 2)
    )
    np.testing.assert_allclose(loaded.x_train, expected, rtol=1e-4, atol=1e-4)


def test_missing_or_malformed_data_exit_2_and_say_where_the_files_go(tmp_path, capsys):
    assert run_main(["--dataset", "mnist", "--datasetfolder", str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert str(tmp_path / "mnist") in message and "train-images-idx3-ubyte" in message
    assert "downloads nothing" in message and "--datasetfolder" in message

    assert run_main(["--dataset", "cifar10", "--datasetfolder", str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert str(tmp_path / "cifar-10-batches-py") in message and "data_batch_1" in message

    make_idx_dataset(tmp_path / "mnist", num_test=20, gz=())
    (tmp_path / "mnist" / IDX_NAMES["test_labels"]).write_bytes(b"\x08\x03\x00\x00 not idx")
    assert run_main(["--dataset", "mnist", "--datasetfolder", str(tmp_path)]) == 2
    assert "t10k-labels-idx1-ubyte is not an IDX file" in capsys.readouterr().err

    write_idx(tmp_path / "mnist" / IDX_NAMES["test_labels"], np.zeros(5, np.uint8))
    assert run_main(["--dataset", "mnist", "--datasetfolder", str(tmp_path)]) == 2
    assert "test images of shape (20, 6, 6) do not match" in capsys.readouterr().err


def test_the_command_line_exits_2_with_the_message_on_bad_data(tmp_path):
    # The one subprocess: the script itself, its exit status and where its message goes.
    argv = [sys.executable, PROGRAM, "--dataset", "fashion_mnist", "--datasetfolder", str(tmp_path)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "train.py: error: fashion_mnist: no data found" in result.stderr


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lr", "-1"], "argument --lr: must be a number > 0, got '-1'"),
        (["--train_samples", "0"], "argument --train_samples: must be an integer >= 1"),
        (["--dataset", "svhn"], "argument --dataset: invalid choice"),
        (["--trunk", "4x4,8x8"], "--trunk only applies with --config"),
        (["--config", "x.yaml", "--trunk", "4x4"], "argument --trunk: must be two matrix shapes"),
        (["--mlp_widths", "16,0"], "argument --mlp_widths: must be comma-separated positive"),
        (["--train_batch_size", "5000"], "--train_batch_size 5000 exceeds the 1347 training"),
        (["--config", "/nonexistent.yaml"], "--config /nonexistent.yaml: cannot read it"),
        (["--small_noise", "auto"], "--small_noise auto (a tenth of each layer's std) needs"),
        (["--prior_std", "wide"], "argument --prior_std: must be a number > 0, got 'wide'"),
        (["--kl_weight", "0.1"], "--kl_weight tempers the per-data-point ELBO: it needs"),
        (["--kl_weight", "0.1,-1", "--proper_elbo"], "argument --kl_weight: must be comma"),
        (["--proper_elbo", "--kl_weight", "0.1,0.01"], "set --validation_fraction"),
        (["--validation_fraction", "1"], "--validation_fraction must be in [0, 1), got 1.0"),
        (["--entropy_samples", "11"], "--entropy_samples must be in [1, --train_samples=10], got"),
    ],
)
def test_bad_flags_exit_2_with_a_message(argv, message, capsys, tmp_path):
    assert run_main([*argv, "--resultsfolder", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # nothing written


def test_a_config_without_trunk_asks_for_the_trunk_flag(tmp_path, capsys):
    config = tmp_path / "no_trunk.yaml"
    config.write_text("- {noise_input: [4, 4], gen1: [4, 4]}\n- {gen1: [8, 8]}\n")
    config.write_text(config.read_text() + "- {gen1: [6, 6]}\n- {gen1: 1}\n")
    assert run_main(["--config", str(config), "--resultsfolder", str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert "has no second_layer" in message and "--trunk A1xB1,A2xB2, or --trunk none" in message


def test_the_papers_networks_have_the_papers_sizes():
    def size(module, shape):
        variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape))
        return ivi.count_params(variables)

    def network(model):
        return paper.make_paper_network(model, mlp_widths=(400, 400), num_classes=10)

    assert size(network("MLP"), (1, 28, 28, 1)) == 478_410
    assert size(network("LeNet"), (1, 28, 28, 1)) == 44_426  # the paper's MNIST LeNet
    assert size(network("LeNet"), (1, 32, 32, 3)) == 62_006  # configs/cifar_lenet.yaml
    config_dir = os.path.join(ROOT, "examples", "implicit_vi_paper", "configs")
    for name, trunk, network_size in (
        ("mnist_mlp.yaml", [], 478_410),
        ("mnist_lenet.yaml", [], 44_426),
        ("cifar_lenet.yaml", None, 62_006),
    ):
        with open(os.path.join(config_dir, name)) as f:
            generator = ivi.generator_from_config(yaml.safe_load(f), trunk_shapes=trunk)
        assert generator.output_size >= network_size, name
    assert generator.output_size == 62_006  # one head per layer, exactly D


def test_progress_bar_redraws_on_a_terminal_and_prints_tenths_in_a_log():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = train.ProgressBar(3, "epoch 1/2", stream=stream, width=6)
    for i in range(1, 4):
        bar.update(i, "loss 1.0")
    bar.close()
    assert "epoch 1/2 [######] 3/3 loss 1.0" in stream.getvalue()
    log = io.StringIO()  # not a terminal: one line per tenth of the way, none redrawn
    bar = train.ProgressBar(20, "x", stream=log, width=4)
    for i in range(1, 21):
        bar.update(i, lambda: "loss 1.0")
    assert log.getvalue().splitlines() == [
        f"x [{'#' * (i // 5)}{'.' * (4 - i // 5)}] {i:2d}/20 loss 1.0" for i in range(2, 21, 2)
    ]


# ----- flags --------------------------------------------------------------------------------


def test_entropy_samples_flag_reaches_the_loss_options():
    flags = ["--dataset", "digits", "--train_samples", "4", "--entropy_samples", "1"]
    flags += ["--solver_tolerance", "none", "--solver_iterations", "5"]
    run = train.read_settings(train.parse_args(flags))
    assert paper.paper_solver_options(run) == dict(
        num_iterations=5, tolerance=None, entropy_samples=1
    )
    plain = train.read_settings(train.parse_args(["--dataset", "digits"]))
    assert paper.paper_solver_options(plain) == {}
    # A resumed run keeps its K: the flag is one of those saved with the run.
    assert "entropy_samples" in {field.name for field in dataclasses.fields(paper.PaperRun)}


def test_calibrated_flag_sets_the_calibrated_posterior_and_keeps_explicit_flags():
    args = train.parse_args(["--calibrated"])
    assert args.proper_elbo and args.learn_noise and args.noise_lr_scale == 10.0
    assert (args.small_noise, args.prior_std) == ("auto", "auto")
    assert args.kl_weight == [0.3, 0.1, 0.03, 0.01, 0.003] and args.validation_fraction == 0.15
    args = train.parse_args(["--calibrated", "--kl_weight", "0.5,0.05", "--prior_std", "0.2"])
    assert args.kl_weight == [0.5, 0.05] and args.prior_std == 0.2 and args.learn_noise
    plain = train.parse_args([])
    assert (plain.kl_weight, plain.validation_fraction, plain.prior_std) == ([1.0], 0.0, 1.0)
    assert (plain.learn_noise, plain.small_noise) == (False, 1e-3)
    learned = train.parse_args(["--learn_noise"])
    assert (learned.learn_noise, learned.small_noise, learned.proper_elbo) == (True, 1e-3, False)


def test_the_built_model_learns_a_noise_per_weight_at_its_flagged_rates(tmp_path):
    # The calibrated model (the runs' network and generator, so that nothing new compiles):
    # per-leaf prior and noise, tempered weights, the noise's 10x rate.
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    args = train.parse_args(
        [*TINY_RUN, "--calibrated", "--kl_weight", "0.1", "--config", str(config)]
    )
    run = train.read_settings(args)
    bnn, optimizer, _ = paper.build_paper_training(
        run, x_example=jnp.zeros((1, 6, 6, 1)), num_classes=4, num_train=36
    )
    model = bnn.model
    assert model.learn_sigma and len(model.prior_std) == 4
    np.testing.assert_allclose(np.array(model.sigma), 0.1 * np.array(model.prior_std))
    state = paper.initial_paper_state(run, bnn, optimizer)
    vi_params = state["vi_params"]
    log_std = np.asarray(vi_params.output_noise["log_std"])
    sizes = {"Dense_0": (8, 36 * 8), "Dense_1": (4, 8 * 4)}  # bias, kernel of each layer
    assert log_std.shape == (sum(b + k for b, k in sizes.values()),)  # one std per weight
    # The leaves in order (Dense_0 bias, kernel, Dense_1 bias, kernel), each its own sigma.
    np.testing.assert_allclose(
        np.exp(log_std), np.repeat(np.array(model.sigma), [8, 36 * 8, 4, 8 * 4]), rtol=1e-5
    )
    assert state["eigvecs"].shape == (run.train_samples, bnn.latent_dim) == (2, 16)
    grads = jax.tree.map(jnp.ones_like, vi_params)
    # One compiled update rather than an eager one: the generator's many leaves, each of its
    # own shape, would compile each operation anew.
    updates, _ = jax.jit(optimizer.update)(grads, state["opt_state"], vi_params)
    generator_step = np.abs(np.asarray(jax.tree.leaves(updates.generator)[0])).max()
    noise_step = np.abs(np.asarray(updates.output_noise["log_std"])).max()
    assert noise_step == pytest.approx(10 * generator_step, rel=1e-4)


def test_validation_split_is_held_out_stratified_before_standardising():
    full = paper.load_image_data("digits", "unused")
    data = paper.load_image_data("digits", "unused", validation_fraction=0.2, seed=3)
    assert len(data.x_train) + len(data.x_val) == len(full.x_train) == 1347
    assert data.x_test.shape == full.x_test.shape == (450, 8, 8, 1)
    shares = [np.bincount(y, minlength=10) / len(y) for y in (data.y_train, data.y_val)]
    np.testing.assert_allclose(*shares, atol=0.01)
    # the statistics are the kept training images': their mean is 0 after standardising
    assert abs(float(data.x_train.mean())) < 1e-5 and abs(float(data.x_val.mean())) > 1e-4
    again = paper.load_image_data("digits", "unused", validation_fraction=0.2, seed=3)
    assert np.array_equal(again.y_val, data.y_val)


# ----- runs ------------------------------------------------------------------------------------

TINY_CONFIG = """\
# a two-head generator for the MLP 36-8-4 (36*8 + 8 + 8*4 + 4 = 332 weights)
- noise_input: [4, 4]
  gen1: [2, 8]
  gen2: [2, 8]
- gen1: [37, 8]
  gen2: [9, 4]
- gen1: [6, 6]
  gen2: [4, 4]
  second_layer: [[6, 6], [4, 8]]
- gen1: 0
  gen2: 1
"""

TINY_RUN = ["--mlp_widths", "8", "--train_batch_size", "16", "--train_samples", "2"]
TINY_RUN += ["--test_samples", "3", "--lr", "3e-3", "--randseed", "5"]
# The eigen-solver at a fixed count of iterations and on one of the two samples: a program
# that compiles in less time than the library's default, with every flag it takes.
CHEAP_SOLVER = ["--solver_tolerance", "none", "--solver_iterations", "2", "--entropy_samples", "1"]


class Runs:
    """The module's trained runs: their folders, returned results and printed output."""

    def __init__(self, root):
        self.root = root
        self.data = root / "data"
        self.results = root / "res"
        self.output = {}

    def main(self, name, argv):
        """``main(argv)`` with its printed output kept under ``name``; the returned dict."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            result = train.main(argv)
        self.output[name] = out.getvalue()
        return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Trains, once for the module: on tiny Fashion-MNIST files with the two-head ``TINY_CONFIG``
    generator, a 2-epoch run under the default name and the same run stopped after epoch 1 and
    resumed; on tiny MNIST files, the calibrated program with two KL weights (one epoch; the
    exact entropy, the cheapest program to compile)."""
    runs = Runs(tmp_path_factory.mktemp("implicit_vi_paper"))
    make_idx_dataset(runs.data / "fashion_mnist")
    # 9 test images, as many as the validation split holds: one evaluation program for both.
    make_idx_dataset(runs.data / "mnist", num_train=40, num_test=9, seed=1)
    runs.config = runs.root / "tiny.yaml"
    runs.config.write_text(TINY_CONFIG)
    runs.common = [*TINY_RUN, "--dataset", "fashion_mnist", "--config", str(runs.config)]
    runs.common += ["--datasetfolder", str(runs.data), "--resultsfolder", str(runs.results)]
    runs.common += ["--epochs", "2", *CHEAP_SOLVER]
    runs.full = runs.main("full", runs.common)
    runs.stopped = runs.main("stopped", [*runs.common, "--run_name", "split", "--stop_after", "1"])
    runs.stopped_meta = load_meta(str(runs.results / "split" / train.CHECKPOINT))
    runs.resumed = runs.main("resumed", [*runs.common, "--run_name", "split", "--resume"])

    runs.calibrated_argv = [*TINY_RUN, "--dataset", "mnist", "--datasetfolder", str(runs.data)]
    runs.calibrated_argv += ["--config", str(runs.config), "--accurate"]
    runs.calibrated_argv += ["--resultsfolder", str(runs.results), "--run_name", "cal"]
    runs.calibrated_argv += ["--calibrated", "--kl_weight", "0.3,0.01", "--epochs", "1"]
    runs.calibrated_argv += ["--validation_fraction", "0.25"]
    runs.calibrated = runs.main("calibrated", runs.calibrated_argv)
    return runs


def test_a_short_run_end_to_end_writes_its_run_folder(runs):
    run_dir = runs.results / "fashion_mnist_MLP_tiny_seed5"
    results = json.loads((run_dir / "results.json").read_text())
    assert results == json.loads(json.dumps(runs.full))
    assert results["status"] == "finished"
    assert [row["epoch"] for row in results["log"]] == [1, 2]
    assert results["num_train"] == 48 and results["steps_per_epoch"] == 3
    assert results["generator"]["stochastic_params"] == 36 * 8 + 8 + 8 * 4 + 4
    # The published count of the tiny file: trunk 4x4 -> 6x6 -> 4x8, heads 2x8 -> 6x6 -> 37x8
    # and 2x8 -> 4x4 -> 4x4 -> 9x4, with a'a + a'b + bb' + a'b' per MM layer.
    trunk = (24 + 24 + 24 + 36) + (24 + 24 + 48 + 32)
    head1 = (12 + 48 + 48 + 36) + (222 + 222 + 48 + 296)
    head2 = (8 + 32 + 32 + 16) + 4 * 16 + (36 + 36 + 16 + 36)
    assert results["generator"]["generator_params"] == trunk + head1 + head2
    test = results["test"]
    assert 0 <= test["accuracy"] <= 1 and test["nll"] > 0 and 0 <= test["ece"] <= 1
    assert test["num_samples"] == 3 and results["validation"] is None
    assert results["args"]["lr"] == 3e-3 and results["args"]["epochs"] == 2
    for row in results["log"]:
        assert np.isfinite([row[k] for k in train.LOGGED]).all() and row["solver_iterations"] >= 1
    assert (run_dir / "training.png").stat().st_size > 5_000
    assert sorted(os.listdir(run_dir)) == ["checkpoint.npz", "results.json", "training.png"]
    output = runs.output["full"]
    assert "epoch    2/2" in output and "accuracy" in output and "test [" in output
    # The checkpoint is an .npz file with its meta in JSON: nothing to unpickle.
    meta = load_meta(str(run_dir / "checkpoint.npz"))
    assert meta["epoch"] == 2 and meta["settings"]["config"] == TINY_CONFIG
    assert meta["log"] == results["log"]
    with np.load(run_dir / "checkpoint.npz", allow_pickle=False) as saved:
        assert all(saved[name].dtype != object for name in saved.files)


def test_a_stopped_and_resumed_run_ends_exactly_where_the_uninterrupted_run_ends(runs):
    assert runs.stopped["status"] == "stopped" and runs.stopped_meta["epoch"] == 1
    assert "stopped after epoch 1" in runs.output["stopped"]
    assert "resumed" in runs.output["resumed"] and "epoch    1/2" not in runs.output["resumed"]
    with (
        np.load(runs.results / "fashion_mnist_MLP_tiny_seed5" / train.CHECKPOINT) as full,
        np.load(runs.results / "split" / train.CHECKPOINT) as split,
    ):
        assert full.files == split.files and len(full.files) > 3
        for name in full.files:
            if name != "meta":
                assert full[name].dtype == split[name].dtype, name
                assert np.array_equal(full[name], split[name]), name  # bit for bit
        # The eigen-solver's warm start is part of the state: (K, d), K = 1 entropy sample
        # of the 4 x 4 noise.
        assert (1, 16) in {split[name].shape for name in split.files}
    assert runs.stopped_meta["settings"]["entropy_samples"] == 1
    assert list(map(without_seconds, runs.full["log"])) == list(
        map(without_seconds, runs.resumed["log"])
    )
    assert without_seconds(runs.full["test"]) == without_seconds(runs.resumed["test"])


def test_a_run_folder_is_never_overwritten_and_resumes_only_with_its_flags(runs, capsys):
    split = [*runs.common, "--run_name", "split"]
    assert run_main(split) == 2
    assert "pass --resume to continue" in capsys.readouterr().err
    assert run_main([*split, "--resume", "--lr", "1e-3"]) == 2
    assert "was started with other values of --lr;" in capsys.readouterr().err
    # A checkpoint of an earlier version, without a flag of today's program, is refused too.
    old = runs.results / "old"
    shutil.copytree(runs.results / "split", old)
    rewrite_settings(old / train.CHECKPOINT, lambda settings: settings.pop("entropy_samples"))
    assert run_main([*runs.common, "--run_name", "old", "--resume"]) == 2
    assert "other values of --entropy_samples;" in capsys.readouterr().err
    # A damaged checkpoint is refused with a message, not a traceback.
    (old / train.CHECKPOINT).write_bytes(b"PK\x03\x04 damaged")
    assert run_main([*runs.common, "--run_name", "old", "--resume"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_several_kl_weights_train_one_run_each_and_keep_the_best_on_validation(runs):
    held_out = paper.validation_indices(
        paper.load_image_data("mnist", str(runs.data)).y_train, 0.25, seed=5
    )
    num_kept = 40 - len(held_out)  # --randseed 5
    run_dir = runs.results / "cal"
    saved = json.loads((run_dir / "results.json").read_text())
    summary = runs.calibrated
    assert saved["selected"] == summary["selected"] and set(saved["candidates"]) == {"0.3", "0.01"}
    nlls = {b: c["validation"]["nll"] for b, c in saved["candidates"].items()}
    chosen = min(nlls, key=nlls.get)
    assert saved["selected"]["kl_weight"] == float(chosen)
    assert saved["selected"]["run_folder"] == str(run_dir / f"kl_weight_{chosen}")
    assert saved["test"] == saved["candidates"][chosen]["test"]
    for beta in ("0.3", "0.01"):
        one = json.loads((run_dir / f"kl_weight_{beta}" / "results.json").read_text())
        assert one["args"]["kl_weight"] == [float(beta)] and one["num_train"] == num_kept
        assert one["validation"] is not None and one["args"]["learn_noise"]
    assert "<- chosen" in runs.output["calibrated"]
    meta = load_meta(str(run_dir / "kl_weight_0.3" / train.CHECKPOINT))
    assert meta["settings"]["kl_weight"] == [0.3] and meta["settings"]["accurate"]
    # Resuming finished candidates trains nothing more and chooses the same.
    again = runs.main("again", [*runs.calibrated_argv, "--resume"])
    assert again["selected"] == summary["selected"] and "epoch    1/1" not in runs.output["again"]
    for beta, candidate in summary["candidates"].items():
        for split in ("validation", "test"):
            assert without_seconds(again["candidates"][beta][split]) == without_seconds(
                candidate[split]
            )


def test_uncertainty_eval_evaluates_a_run_of_the_program(runs, tmp_path, capsys):
    ue = load_script("examples/uncertainty_eval.py")
    run_dir = runs.results / "fashion_mnist_MLP_tiny_seed5"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report = ue.main(
            ["--run", str(run_dir), "--seeds", "0", "--angles", "0,90", "--output", str(tmp_path)]
        )
    trained = report["trained_run"]
    # The run rebuilt from its checkpoint: its flags, generator text and data folder.
    assert trained["settings"]["config"] == TINY_CONFIG
    assert trained["settings"]["dataset"] == "fashion_mnist"
    assert set(trained["test"]) == {"accuracy", "nll", "brier", "ece"}
    assert 0 <= trained["test"]["accuracy"] <= 1 and trained["test"]["nll"] > 0
    # 6 x 6 one-channel images: rotated too; 0 degrees is the test set itself (same key).
    assert set(trained["rotation"]) == {"0", "90"}
    assert trained["rotation"]["0"]["nll"] == pytest.approx(trained["test"]["nll"], rel=1e-6)
    assert "trained run" in out.getvalue() and "rotated   90 deg" in out.getvalue()
    saved = json.loads((tmp_path / "uncertainty_eval.json").read_text())
    assert saved["trained_run"]["test"] == trained["test"] and saved["summary"] is None
    # A checkpoint of another version of the program (a flag this one lacks) is refused.
    other = tmp_path / "other_version"
    shutil.copytree(run_dir, other)
    rewrite_settings(other / train.CHECKPOINT, lambda settings: settings.update(dropout=0.1))
    with pytest.raises(SystemExit) as exit_info:
        ue.main(["--run", str(other), "--seeds", "0", "--output", str(tmp_path)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "was not written by this version of implicit_vi_paper/train.py" in message
