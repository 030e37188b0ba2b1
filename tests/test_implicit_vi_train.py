"""Tests of examples/implicit_vi_train.py, the training program, on tiny files the tests write.

Data loading reads the standard release formats (IDX files, optionally gzipped; CIFAR-10
python pickles) and is compared with the arrays that were written; errors exit with status 2
and say where the files go; a short run end to end writes its run folder; a run stopped and
resumed from its checkpoint ends bit-for-bit where the uninterrupted run ends.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import implicit_vi_train as train  # noqa: E402

import implicit_vi as ivi  # noqa: E402

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


def make_idx_dataset(folder, num_train=64, num_test=20, side=6, seed=0, gz=("train_images",)):
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
        loaded = train.read_idx(str(tmp_path / name))
        assert loaded.dtype == np.uint8 and np.array_equal(loaded, images)
    values = np.array([[-300, 2], [7, 1000]])
    write_idx(tmp_path / "b", values, type_code=0x0B)  # big-endian int16
    assert np.array_equal(train.read_idx(str(tmp_path / "b")), values)


def test_mnist_files_load_with_their_labels_and_are_standardised(tmp_path):
    arrays = make_idx_dataset(tmp_path / "mnist", gz=("train_images", "test_labels"))
    data = train.load_data("mnist", str(tmp_path))
    assert data.x_train.shape == (64, 6, 6, 1) and data.x_test.shape == (20, 6, 6, 1)
    assert np.array_equal(data.y_train, arrays["train_labels"])
    assert np.array_equal(data.y_test, arrays["test_labels"])
    raw = arrays["train_images"] / 255.0
    mean, std = raw.mean(), raw.std()
    np.testing.assert_allclose(data.x_train[..., 0], (raw - mean) / std, rtol=1e-5, atol=1e-5)
    expected_test = (arrays["test_images"] / 255.0 - mean) / std
    np.testing.assert_allclose(data.x_test[..., 0], expected_test, rtol=1e-5, atol=1e-5)
    assert data.num_classes == 4
    # The torchvision folder layout is found too.
    make_idx_dataset(tmp_path / "other" / "FashionMNIST" / "raw", gz=())
    assert train.load_data("fashion_mnist", str(tmp_path / "other")).x_train.shape[0] == 64


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
    x_train, y_train, x_test, y_test = train.load_cifar10(str(tmp_path))
    assert x_train.shape == (15, 32, 32, 3) and x_test.shape == (3, 32, 32, 3)
    # Row n of the file holds the red, green, blue 32 x 32 planes, each row-major.
    data, labels = written["data_batch_2"]
    for channel, row, col in ((0, 0, 0), (1, 5, 7), (2, 31, 30)):
        assert x_train[3 + 1, row, col, channel] == data[1, channel * 1024 + row * 32 + col]
    assert list(y_train[3:6]) == labels
    assert list(y_test) == written["test_batch"][1]


def test_missing_or_malformed_data_exit_2_and_say_where_the_files_go(tmp_path, capsys):
    assert run_main(["--dataset", "mnist", "--datasetfolder", str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert str(tmp_path / "mnist") in message and "train-images-idx3-ubyte" in message
    assert "downloads nothing" in message and "--datasetfolder" in message

    assert run_main(["--dataset", "cifar10", "--datasetfolder", str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert str(tmp_path / "cifar-10-batches-py") in message and "data_batch_1" in message

    make_idx_dataset(tmp_path / "mnist", gz=())
    (tmp_path / "mnist" / IDX_NAMES["test_labels"]).write_bytes(b"\x08\x03\x00\x00 not idx")
    assert run_main(["--dataset", "mnist", "--datasetfolder", str(tmp_path)]) == 2
    assert "t10k-labels-idx1-ubyte is not an IDX file" in capsys.readouterr().err

    write_idx(tmp_path / "mnist" / IDX_NAMES["test_labels"], np.zeros(5, np.uint8))
    assert run_main(["--dataset", "mnist", "--datasetfolder", str(tmp_path)]) == 2
    assert "test images of shape (20, 6, 6) do not match" in capsys.readouterr().err


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

    assert size(train.MLP((400, 400), 10), (1, 28, 28, 1)) == 478_410
    assert size(train.LeNet(10), (1, 28, 28, 1)) == 44_426  # the paper's MNIST LeNet
    assert size(train.LeNet(10), (1, 32, 32, 3)) == 62_006  # examples/configs/cifar_lenet.yaml
    config_dir = os.path.join(ROOT, "examples", "configs")
    for name, trunk, network_size in (
        ("mnist_mlp.yaml", [], 478_410),
        ("mnist_lenet.yaml", [], 44_426),
        ("cifar_lenet.yaml", None, 62_006),
    ):
        import yaml

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


def test_a_short_run_end_to_end_writes_its_run_folder(tmp_path):
    make_idx_dataset(tmp_path / "data" / "fashion_mnist")
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    argv = [sys.executable, os.path.join(ROOT, "examples", "implicit_vi_train.py"), *TINY_RUN]
    argv += ["--dataset", "fashion_mnist", "--config", str(config), "--epochs", "2"]
    argv += ["--datasetfolder", str(tmp_path / "data"), "--resultsfolder", str(tmp_path / "res")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "res" / "fashion_mnist_MLP_tiny_seed5"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished"
    assert [row["epoch"] for row in results["log"]] == [1, 2]
    assert results["generator"]["stochastic_params"] == 36 * 8 + 8 + 8 * 4 + 4
    # The published count of the tiny file: trunk 4x4 -> 6x6 -> 4x8, heads 2x8 -> 6x6 -> 37x8
    # and 2x8 -> 4x4 -> 4x4 -> 9x4, with a'a + a'b + bb' + a'b' per MM layer.
    trunk = (24 + 24 + 24 + 36) + (24 + 24 + 48 + 32)
    head1 = (12 + 48 + 48 + 36) + (222 + 222 + 48 + 296)
    head2 = (8 + 32 + 32 + 16) + 4 * 16 + (36 + 36 + 16 + 36)
    assert results["generator"]["generator_params"] == trunk + head1 + head2
    test = results["test"]
    assert 0 <= test["accuracy"] <= 1 and test["nll"] > 0 and 0 <= test["ece"] <= 1
    assert results["args"]["lr"] == 3e-3 and results["args"]["epochs"] == 2
    assert (run_dir / "training.png").stat().st_size > 5_000
    assert (run_dir / "checkpoint.pkl").exists()
    assert not [p for p in os.listdir(run_dir) if p.endswith(".tmp")]
    assert "epoch    2/2" in result.stdout and "accuracy" in result.stdout


def test_a_stopped_and_resumed_run_ends_exactly_where_the_uninterrupted_run_ends(tmp_path, capsys):
    make_idx_dataset(tmp_path / "mnist", num_train=48, num_test=16)
    common = [*TINY_RUN, "--dataset", "mnist", "--datasetfolder", str(tmp_path)]
    common += ["--epochs", "3", "--resultsfolder", str(tmp_path / "res")]
    full = train.main([*common, "--run_name", "full"])
    assert run_main([*common, "--run_name", "split", "--stop_after", "1"]) == 0
    assert "stopped after epoch 1" in capsys.readouterr().out
    # Without --resume an existing run is not overwritten; with other settings it is refused.
    assert run_main([*common, "--run_name", "split"]) == 2
    assert "pass --resume to continue" in capsys.readouterr().err
    assert run_main([*common, "--run_name", "split", "--resume", "--lr", "1e-3"]) == 2
    assert "was started with other values of --lr" in capsys.readouterr().err
    resumed = train.main([*common, "--run_name", "split", "--resume"])
    assert "resumed" in capsys.readouterr().out

    def state(name):
        with open(tmp_path / "res" / name / "checkpoint.pkl", "rb") as f:
            return pickle.load(f)

    full_state, split_state = state("full"), state("split")
    assert full_state["epoch"] == split_state["epoch"] == 3
    # The eigen-solver's warm start is part of the state.
    assert full_state["eigvecs"].shape == (2, 81)  # (S, d) for the automatic 9 x 9 noise
    assert np.array_equal(full_state["eigvecs"], split_state["eigvecs"])
    assert len(full_state["state"]) == len(split_state["state"]) > 0
    for a, b in zip(full_state["state"], split_state["state"]):
        assert a.dtype == b.dtype and np.array_equal(a, b)  # bit for bit
    for a, b in zip(full["log"], resumed["log"]):
        assert {k: v for k, v in a.items() if k != "seconds"} == {
            k: v for k, v in b.items() if k != "seconds"
        }
    assert {k: v for k, v in full["test"].items() if k != "seconds"} == {
        k: v for k, v in resumed["test"].items() if k != "seconds"
    }


def test_entropy_samples_flag_reaches_the_loss_options():
    flags = ["--dataset", "digits", "--train_samples", "4", "--entropy_samples", "1"]
    flags += ["--solver_tolerance", "none", "--solver_iterations", "5"]
    args = train.parse_args(flags)
    assert train.solver_options(args) == dict(num_iterations=5, tolerance=None, entropy_samples=1)
    assert train.solver_options(train.parse_args(["--dataset", "digits"])) == {}
    assert "entropy_samples" in train.RUN_FLAGS  # a resumed run keeps its K


def test_learn_noise_flag_gives_a_learned_per_weight_noise():
    args = train.parse_args(["--dataset", "digits", "--mlp_widths", "5", "--learn_noise"])
    x_example = jnp.zeros((1, 64))
    bnn, _, _ = train.build_training(args, None, x_example, 10, 100)
    vi_params = bnn.init(jax.random.key(0))
    assert bnn.model.learn_sigma
    assert vi_params.output_noise["log_std"].shape == (64 * 5 + 5 + 5 * 10 + 10,)
    np.testing.assert_allclose(
        np.exp(np.asarray(vi_params.output_noise["log_std"])), 1e-3, rtol=1e-5
    )
    plain = train.parse_args(["--dataset", "digits"])
    assert plain.learn_noise is False


def test_calibrated_flag_sets_the_calibrated_posterior_and_keeps_explicit_flags():
    args = train.parse_args(["--calibrated"])
    assert args.proper_elbo and args.learn_noise and args.noise_lr_scale == 10.0
    assert (args.small_noise, args.prior_std) == ("auto", "auto")
    assert args.kl_weight == [0.3, 0.1, 0.03, 0.01, 0.003] and args.validation_fraction == 0.15
    args = train.parse_args(["--calibrated", "--kl_weight", "0.5,0.05", "--prior_std", "0.2"])
    assert args.kl_weight == [0.5, 0.05] and args.prior_std == 0.2 and args.learn_noise
    plain = train.parse_args([])
    assert (plain.kl_weight, plain.validation_fraction, plain.prior_std) == ([1.0], 0.0, 1.0)
    # The calibrated model: per-leaf prior and noise, tempered weights, the noise's 10x rate.
    args = train.parse_args(["--calibrated", "--mlp_widths", "5", "--kl_weight", "0.1"])
    bnn, optimizer, _ = train.build_training(args, None, jnp.zeros((1, 8, 8, 1)), 10, 200)
    model = bnn.model
    assert model.learn_sigma and len(model.prior_std) == 4
    np.testing.assert_allclose(np.array(model.sigma), 0.1 * np.array(model.prior_std))
    vi_params = bnn.init(jax.random.key(0))
    grads = jax.tree_util.tree_map(jnp.ones_like, vi_params)
    updates, _ = optimizer.update(grads, optimizer.init(vi_params), vi_params)
    generator_step = np.abs(np.asarray(jax.tree_util.tree_leaves(updates.generator)[0])).max()
    noise_step = np.abs(np.asarray(updates.output_noise["log_std"])).max()
    assert noise_step == pytest.approx(10 * generator_step, rel=1e-4)


def test_validation_split_is_held_out_stratified_before_standardising():
    full = train.load_data("digits", "unused")
    data = train.load_data("digits", "unused", validation_fraction=0.2, seed=3)
    assert len(data.x_train) + len(data.x_val) == len(full.x_train)
    assert np.array_equal(data.x_test.shape, full.x_test.shape)
    shares = [np.bincount(y, minlength=10) / len(y) for y in (data.y_train, data.y_val)]
    np.testing.assert_allclose(*shares, atol=0.01)
    # the statistics are the kept training images': their mean is 0 after standardising
    assert abs(float(data.x_train.mean())) < 1e-5 and abs(float(data.x_val.mean())) > 1e-4
    again = train.load_data("digits", "unused", validation_fraction=0.2, seed=3)
    assert np.array_equal(again.y_val, data.y_val)


def test_several_kl_weights_train_one_run_each_and_keep_the_best_on_validation(tmp_path, capsys):
    labels = make_idx_dataset(tmp_path / "mnist", num_train=60, num_test=16)["train_labels"]
    num_kept = 60 - len(train.validation_indices(labels, 0.25, seed=5))  # --randseed 5
    argv = [*TINY_RUN, "--dataset", "mnist", "--datasetfolder", str(tmp_path), "--epochs", "2"]
    argv += ["--resultsfolder", str(tmp_path / "res"), "--run_name", "cal", "--calibrated"]
    argv += ["--kl_weight", "0.3,0.01", "--validation_fraction", "0.25"]
    summary = train.main(argv)
    run_dir = tmp_path / "res" / "cal"
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["selected"] == summary["selected"] and set(saved["candidates"]) == {"0.3", "0.01"}
    nlls = {b: c["validation"]["nll"] for b, c in saved["candidates"].items()}
    chosen = min(nlls, key=nlls.get)
    assert saved["selected"]["kl_weight"] == float(chosen)
    assert saved["test"] == saved["candidates"][chosen]["test"]
    for beta in ("0.3", "0.01"):
        one = json.loads((run_dir / f"kl_weight_{beta}" / "results.json").read_text())
        assert one["args"]["kl_weight"] == [float(beta)] and one["num_train"] == num_kept
        assert one["validation"] is not None
    assert "<- chosen" in capsys.readouterr().out
    # Resuming finished candidates trains nothing more and chooses the same.
    again = train.main([*argv, "--resume"])
    assert again["selected"] == summary["selected"]


def test_a_run_saved_before_the_newer_flags_existed_resumes(tmp_path, capsys):
    make_idx_dataset(tmp_path / "mnist", num_train=32, num_test=8)
    argv = [*TINY_RUN, "--dataset", "mnist", "--datasetfolder", str(tmp_path), "--epochs", "2"]
    argv += ["--resultsfolder", str(tmp_path / "res"), "--run_name", "old"]
    assert run_main([*argv, "--stop_after", "1"]) == 0
    path = tmp_path / "res" / "old" / "checkpoint.pkl"
    with open(path, "rb") as f:
        checkpoint = pickle.load(f)
    for name in train.OLDER_RUN_SETTINGS:  # what a checkpoint of 0.3.0 lacks
        del checkpoint["settings"][name]
    with open(path, "wb") as f:
        pickle.dump(checkpoint, f)
    assert train.main([*argv, "--resume"])["status"] == "finished"
    assert "resumed" in capsys.readouterr().out
    # A changed value of one of those flags is still refused.
    assert run_main([*argv, "--resume", "--learn_noise"]) == 2
    assert "other values of --learn_noise" in capsys.readouterr().err
