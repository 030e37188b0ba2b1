"""Tests of examples/implicit_vi_paper/train.py, the paper's training program, on tiny files the
tests write, of the generator configuration files it reads (bdl_examples.paper_config), and of
examples/uncertainty_eval.py --run on one of its runs.

Data loading reads the standard release formats (IDX files, optionally gzipped; CIFAR-10
python pickles) and is compared with the arrays that were written; errors exit with status 2
and say where the files go. The runs are trained once for the module (``runs``): a short run
end to end writes its run folder, a run stopped and resumed from its checkpoint ends
bit-for-bit where the uninterrupted run ends, and the calibrated program trains one run per KL
weight and keeps the best on validation. Every run is a tiny MLP on 6 x 6 images with a few
steps per epoch: what costs is compiling, so the runs share one generator and the suite's
compilation cache (each program is compiled once however many runs build it).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import itertools
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
from bdl_examples.paper_config import generator_from_config
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
pytestmark = pytest.mark.slow


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
        (["--weight_noise", "auto"], "argument --weight_noise: must be a number > 0, got 'auto'"),
        (["--prior_std", "wide"], "argument --prior_std: must be a number > 0, got 'wide'"),
        (["--jacobi_down_weight", "0"], "argument --jacobi_down_weight: must be a number > 0"),
        (
            ["--accurate", "--solver_iterations", "5", "--cold_start"],
            "--solver_iterations, --cold_start set the bound's solver: not with --accurate",
        ),
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


def test_the_config_files_give_the_papers_generators_and_their_published_sizes():
    # The published parameter counts (the paper's appendix; the CIFAR file's own comment).
    config_dir = os.path.join(ROOT, "examples", "implicit_vi_paper", "configs")
    for name, trunk, kind, num_params, network_size in (
        ("mnist_mlp.yaml", [], ivi.MMGenerator, 3_130_380, 478_410),
        ("mnist_lenet.yaml", [], ivi.MMGenerator, 612_450, 44_426),
        ("cifar_lenet.yaml", None, ivi.MultiHeadMMGenerator, 1_085_774, 62_006),
    ):
        with open(os.path.join(config_dir, name)) as f:
            generator = generator_from_config(yaml.safe_load(f), trunk_shapes=trunk)
        assert isinstance(generator, kind), name
        assert generator_params(generator) == num_params, name
        assert generator.output_size >= network_size, name
    assert generator.output_size == 62_006  # one head per layer, exactly D
    # The paper's MNIST MLP generator: noise 40x40, hidden 420x420, 2 hidden layers, 957x500.
    with open(os.path.join(config_dir, "mnist_mlp.yaml")) as f:
        mlp = generator_from_config(yaml.safe_load(f), trunk_shapes=[])
    assert mlp == ivi.MMGenerator((40, 40), (420, 420), 2, (957, 500))


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


# ----- generator configurations in the paper's published layout ---------------------------------

# Four mappings: input shapes, output shapes, hidden shapes (with the trunk), hidden-layer counts.
# The heads are listed out of order on purpose: they run in the order of their keys.
MULTI_HEAD_YAML = """\
# input shapes
- noise_input: [6, 6]
  gen2: [4, 4]
  gen1: [4, 4]
  gen3: [2, 8]
# output shapes
- gen1: [20, 10]
  gen2: [11, 10]
  gen3: [3, 7]
# hidden shapes
- gen1: [8, 8]
  gen2: [6, 6]
  gen3: [5, 5]
  second_layer: [[10, 10], [12, 4]]
# numbers of hidden layers
- gen1: 1
  gen2: 2
  gen3: 0
"""


def multi_head_config(**changes):
    """The parsed MULTI_HEAD_YAML with ``changes[f"part{i}"]`` merged into mapping i."""
    config = yaml.safe_load(MULTI_HEAD_YAML)
    for i in range(4):
        config[i].update(changes.get(f"part{i}", {}))
    return config


def generator_params(gen) -> int:
    """A generator's number of parameters, from shapes only."""
    noise = jnp.zeros((1, *gen.noise_shape))
    return ivi.count_params(jax.eval_shape(gen.init, jax.random.key(0), noise))


def random_params(module, *inputs, scale=0.3, seed=0):
    """Parameters of the shapes ``module.init`` would give, drawn with numpy: no compilation."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes)


def test_mm_generator_parameter_counts_are_the_papers_formula():
    rng = np.random.default_rng(0)
    for _ in range(3):
        noise, hidden, output = [
            tuple(int(n) for n in rng.integers(1, 12, size=2)) for _ in range(3)
        ]
        n_hidden = int(rng.integers(0, 3))
        shapes = [noise] + [hidden] * (n_hidden + 1) + [output]
        expected = sum(
            a2 * a + a2 * b + b * b2 + a2 * b2 for (a, b), (a2, b2) in itertools.pairwise(shapes)
        )
        assert generator_params(ivi.MMGenerator(noise, hidden, n_hidden, output)) == expected


def test_published_config_file_gives_the_published_generator(tmp_path):
    path = tmp_path / "generator.yaml"
    path.write_text(MULTI_HEAD_YAML)
    with open(path) as f:
        gen = generator_from_config(yaml.safe_load(f))
    assert isinstance(gen, ivi.MultiHeadMMGenerator)
    assert gen.head_input_shapes == ((4, 4), (4, 4), (2, 8))
    assert gen.head_output_shapes == ((20, 10), (11, 10), (3, 7))
    # By hand, a'a + a'b + bb' + a'b' per MM layer:
    trunk = (60 + 60 + 60 + 100) + (120 + 120 + 40 + 48)  # 6x6 -> 10x10 -> 12x4
    head1 = (32 + 32 + 32 + 64) + 4 * 64 + (160 + 160 + 80 + 200)  # 4x4 -> 8x8 -> 8x8 -> 20x10
    head2 = (24 + 24 + 24 + 36) + 2 * 4 * 36 + (66 + 66 + 60 + 110)  # 4x4 -> 6x6 (x3) -> 11x10
    head3 = (10 + 40 + 40 + 25) + (15 + 15 + 35 + 21)  # 2x8 -> 5x5 -> 3x7
    assert trunk + head1 + head2 + head3 == 2523
    params = random_params(gen, jnp.zeros((6, 6)))
    assert ivi.count_params(params) == generator_params(gen) == 2523
    assert gen.output_size == 200 + 110 + 21

    # Against an independent computation: the trunk in numpy, flattened row-major and cut into
    # consecutive chunks in key order, each chunk through its head, the outputs concatenated;
    # and the shared trunk correlates the heads: each head's output depends on every noise entry.
    z = np.random.default_rng(1).standard_normal((2, 6, 6)).astype(np.float32)
    h = z
    for name in ("trunk_0", "trunk_1"):
        p = {k: np.asarray(v) for k, v in params[name].items()}
        y = (p["left_kernel"] @ h + p["left_bias"]) @ p["right_kernel"] + p["right_bias"]
        h = np.where(y > 0, y, np.expm1(y))  # ELU
    flat = h.reshape(2, -1)
    chunks = [
        flat[:, start:stop].reshape(2, *gen.head_input_shapes[i])
        for i, (start, stop) in enumerate(((0, 16), (16, 32), (32, 48)))
    ]

    @jax.jit  # one compilation for the generator, its three heads, one sample and the Jacobian
    def generated_and_heads(params, z, chunks):
        heads = [
            ivi.MMGenerator(
                gen.head_input_shapes[i],
                gen.head_hidden_shapes[i],
                gen.head_n_hidden[i],
                gen.head_output_shapes[i],
            ).apply({"params": params[f"heads_{i}"]}, chunk)
            for i, chunk in enumerate(chunks)
        ]
        variables = {"params": params}
        jac = jax.jacfwd(lambda u: gen.apply(variables, u.reshape(6, 6)))(z[0].ravel())
        return gen.apply(variables, z), gen.apply(variables, z[1]), heads, jac

    out, one, expected, jac = generated_and_heads(params, z, chunks)
    assert out.shape == (2, 331) and one.shape == (331,)
    np.testing.assert_allclose(np.asarray(out[1]), np.asarray(one), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(out), np.concatenate(expected, axis=-1), rtol=2e-5, atol=2e-5
    )
    for start, stop in ((0, 200), (200, 310), (310, 331)):
        assert float(jnp.min(jnp.max(jnp.abs(jac[start:stop]), axis=0))) > 0


def test_config_heads_run_in_numeric_key_order(tmp_path):
    order = sorted(range(1, 12), key=str)  # gen1, gen10, gen11, gen2, ...: as a file may list them
    lines = ["- noise_input: [3, 3]"] + [f"  gen{k}: [1, 4]" for k in order]
    lines += ["- " + "\n  ".join(f"gen{k}: [{k}, 3]" for k in order)]
    lines += ["- " + "\n  ".join(f"gen{k}: [2, 2]" for k in order)]
    lines[-1] += "\n  second_layer: [[4, 4], [11, 4]]"
    lines += ["- " + "\n  ".join(f"gen{k}: 0" for k in order)]
    path = tmp_path / "eleven_heads.yaml"
    path.write_text("\n".join(lines) + "\n")
    gen = generator_from_config(yaml.safe_load(path.read_text()))
    assert gen.head_output_shapes == tuple((k, 3) for k in range(1, 12))
    assert gen.output_size == 3 * sum(range(1, 12))


def test_config_without_second_layer_takes_the_trunk_as_an_argument():
    without = multi_head_config()
    trunk = without[2].pop("second_layer")
    with pytest.raises(ValueError, match=r"has no second_layer.*trunk_shapes=\[\[a1, b1\]"):
        generator_from_config(without)
    gen = generator_from_config(without, trunk_shapes=trunk)
    assert gen == generator_from_config(multi_head_config())
    assert generator_params(gen) == 2523
    with pytest.raises(ValueError, match="trunk_shapes is for files without it"):
        generator_from_config(multi_head_config(), trunk_shapes=trunk)
    with pytest.raises(ValueError, match=r"trunk_shapes must be two matrix shapes"):
        generator_from_config(without, trunk_shapes=[[10, 10]])
    with pytest.raises(ValueError, match=r"trunk_shapes\[1\] must be a matrix shape"):
        generator_from_config(without, trunk_shapes=[[10, 10], [12, 0]])
    with pytest.raises(ValueError, match=r"trunk_shapes=\[\] \(no trunk\) needs a single head"):
        generator_from_config(without, trunk_shapes=[])


@pytest.mark.parametrize(
    "config,message",
    [
        ({"noise_input": [6, 6]}, "config must be the published layout, a list of four mappings"),
        (yaml.safe_load(MULTI_HEAD_YAML)[:3], "config must be the published layout"),
        ("- noise_input: [6, 6]", "config must be the published layout"),
        (
            multi_head_config(part0={"noise_input": None}),
            r"config\[0\] \(input shapes\)\['noise_input'\] must be a matrix shape \[a, b\] "
            r"of positive integers, got None",
        ),
        (
            multi_head_config(part0={"noise": [6, 6]}),
            r"config\[0\] \(input shapes\): unknown key 'noise'; the accepted keys are "
            r"noise_input, gen1, gen2, \.\.\.",
        ),
        (multi_head_config(part0={"gen01": [1, 1]}), r"unknown key 'gen01'"),
        (
            multi_head_config(part1={"second_layer": [[1, 1], [1, 1]]}),
            r"config\[1\] \(output shapes\): unknown key 'second_layer'; the accepted keys "
            r"are gen1",
        ),
        (
            multi_head_config(part3={"gen4": 1}),
            r"config\[3\] \(numbers of hidden layers\) has 'gen4' but config\[0\]",
        ),
        (
            multi_head_config(part2={"second_layer": [[10, 10], [12, 4]], "gen3": [5, 5, 1]}),
            r"config\[2\] \(hidden shapes\)\['gen3'\] must be a matrix shape \[a, b\]",
        ),
        (
            multi_head_config(part1={"gen2": [11, 2.5]}),
            r"config\[1\] \(output shapes\)\['gen2'\] must be a matrix shape \[a, b\] of "
            r"positive integers, got \(11, 2.5\)",
        ),
        (
            multi_head_config(part1={"gen2": [True, 4]}),
            r"config\[1\] \(output shapes\)\['gen2'\] must be a matrix shape",
        ),
        (
            multi_head_config(part3={"gen2": -1}),
            r"config\[3\] \(numbers of hidden layers\)\['gen2'\] must be an integer >= 0",
        ),
        (
            multi_head_config(part2={"second_layer": [[10, 10]]}),
            r"config\[2\] \(hidden shapes\)\['second_layer'\] must be two matrix shapes",
        ),
        (
            multi_head_config(part0={"gen3": [4, 8]}),
            r"the heads' input shapes take 64 trunk outputs but the trunk's output \[12, 4\] "
            "has only 48",
        ),
    ],
)
def test_malformed_configs_name_the_key_and_the_accepted_form(config, message):
    # The library's generator modules do not check their arguments: these checks are the only
    # ones between a file and a generator.
    with pytest.raises(ValueError, match=message):
        generator_from_config(config)


def test_config_missing_a_head_entry_names_the_mapping_and_the_head():
    config = multi_head_config()
    del config[1]["gen2"]
    with pytest.raises(ValueError, match=r"config\[1\] \(output shapes\) has no entry for"):
        generator_from_config(config)
    config = multi_head_config()
    config[0] = {"noise_input": [6, 6]}
    with pytest.raises(ValueError, match=r"config\[0\] \(input shapes\) names no head"):
        generator_from_config(config)


# ----- flags --------------------------------------------------------------------------------


def test_solver_flags_make_the_entropy_estimator_and_are_saved_with_the_run():
    flags = ["--dataset", "digits", "--train_samples", "4", "--entropy_samples", "3"]
    flags += ["--solver_tolerance", "none", "--solver_iterations", "5"]
    run = train.read_settings(train.parse_args(flags))
    assert paper.paper_entropy(run) == ivi.SmallestSingularValue(5, None, num_samples=3)
    # Flags left out: the library's defaults, written into the run's settings so that a
    # resumed run keeps them.
    plain = train.read_settings(train.parse_args(["--dataset", "digits"]))
    assert paper.paper_entropy(plain) == ivi.SmallestSingularValue()
    default = ivi.SmallestSingularValue()
    saved = (plain.solver_iterations, plain.solver_tolerance, plain.entropy_samples)
    assert saved == (default.num_iterations, default.tolerance, default.num_samples)
    exact = train.read_settings(train.parse_args(["--accurate", "--entropy_samples", "2"]))
    assert paper.paper_entropy(exact) == ivi.ExactEntropy(num_samples=2)


def test_the_papers_down_weighting_is_the_librarys_kl_weight_and_prior_scale():
    # The paper: w_p = prob_down_weight / B, w_H = jacobi_down_weight / B. The library:
    # w_H = kl_weight / N, w_p = prior_scale * kl_weight / N.
    args = train.parse_args(["--prob_down_weight", "2e-3", "--jacobi_down_weight", "0.5"])
    run, num_train, batch_size = train.read_settings(args), 1347, 64
    kl_weight, prior_scale = paper.paper_elbo_weights(run, num_train)
    assert kl_weight / num_train == pytest.approx(0.5 / batch_size)
    assert prior_scale * kl_weight / num_train == pytest.approx(2e-3 / batch_size)
    proper = train.read_settings(train.parse_args(["--proper_elbo"]))
    assert paper.paper_elbo_weights(proper, num_train) == (1.0, 1.0)
    tempered = train.parse_args(["--proper_elbo", "--kl_weight", "0.1"])
    assert paper.paper_elbo_weights(train.read_settings(tempered), num_train) == (0.1, 1.0)


def test_calibrated_flag_sets_the_calibrated_posterior_and_keeps_explicit_flags():
    args = train.parse_args(["--calibrated"])
    assert args.proper_elbo and (args.weight_noise, args.prior_std) == ("learned", "auto")
    # The library's candidates for beta.
    assert args.kl_weight == list(ivi.KL_WEIGHTS) and args.validation_fraction == 0.15
    args = train.parse_args(["--calibrated", "--kl_weight", "0.5,0.05", "--prior_std", "0.2"])
    assert args.kl_weight == [0.5, 0.05] and args.prior_std == 0.2
    assert args.weight_noise == "learned"
    plain = train.parse_args([])
    assert (plain.kl_weight, plain.validation_fraction, plain.prior_std) == ([1.0], 0.0, 1.0)
    assert (plain.weight_noise, plain.calibrate_output, plain.proper_elbo) == (1e-3, True, False)
    learned = train.parse_args(["--weight_noise", "learned", "--no-calibrate_output"])
    assert (learned.weight_noise, learned.calibrate_output) == ("learned", False)
    assert not learned.proper_elbo
    assert train.parse_args(["--weight_noise", "0.01"]).weight_noise == 0.01


def test_cold_start_gives_the_solver_fresh_unit_vectors_at_every_step():
    seen = []

    class Recorder:  # stands in for the Trainer: records the vectors each step starts from
        def step(self, key, state, batch):
            seen.append(np.asarray(state.solver_vectors))
            return state, ivi.StepInfo(*[jnp.zeros(())] * len(ivi.StepInfo._fields))

    state = ivi.TrainState(None, None, jnp.full((2, 3), 1 / np.sqrt(3), jnp.float32))
    for cold_start in (False, True, True):
        train.make_step(Recorder(), cold_start)(state, jax.random.key(len(seen)), None)
    warm, cold, other = seen
    assert np.array_equal(warm, state.solver_vectors)  # the warm start: the state's vectors
    np.testing.assert_allclose(np.linalg.norm(cold, axis=-1), 1, rtol=1e-5)
    assert not np.allclose(cold, warm) and not np.allclose(cold, other)


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
    # 9 test images, fewer than a batch: one evaluation program for every candidate.
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
    # The library's rule: the highest validation log-likelihood of the model average.
    scores = {b: c["validation"]["log_likelihood"] for b, c in saved["candidates"].items()}
    chosen = max(scores, key=scores.get)
    assert saved["selected"]["kl_weight"] == float(chosen)
    assert saved["selected"]["run_folder"] == str(run_dir / f"kl_weight_{chosen}")
    assert saved["test"] == saved["candidates"][chosen]["test"]
    for beta in ("0.3", "0.01"):
        one = json.loads((run_dir / f"kl_weight_{beta}" / "results.json").read_text())
        assert one["args"]["kl_weight"] == [float(beta)] and one["num_train"] == num_kept
        assert one["validation"]["num_samples"] == 3 and one["args"]["weight_noise"] == "learned"
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


def test_the_built_model_learns_a_noise_per_weight_at_the_librarys_rate(runs):
    # The calibrated run's model (after the runs: its network, generator and calibration are
    # compiled): per-leaf prior and noise, and the noise's log std moving NOISE_RATE times
    # faster than the generator.
    args = train.parse_args(
        [*TINY_RUN, "--calibrated", "--kl_weight", "0.1", "--config", str(runs.config)]
    )
    run = train.read_settings(args)
    bnn, optimizer, trainer = paper.build_paper_training(
        run, x_example=jnp.zeros((1, 6, 6, 1)), num_classes=4, num_train=36
    )
    model = bnn.model
    assert model.learn_weight_noise and len(model.prior_std) == 4
    np.testing.assert_allclose(np.array(model.weight_noise), 0.1 * np.array(model.prior_std))
    state = paper.initial_paper_state(run, bnn, optimizer)
    assert isinstance(state, ivi.TrainState) and trainer.optimizer is optimizer
    vi_params = state.vi_params
    std = np.asarray(bnn.weight_noise_std(vi_params))
    # One std per weight; the leaves in order (Dense_0 bias, kernel, Dense_1 bias, kernel).
    sizes = [8, 36 * 8, 4, 8 * 4]
    np.testing.assert_allclose(std, np.repeat(np.array(model.weight_noise), sizes), rtol=1e-5)
    # K = 1 solver vector (the library's default) of the 4 x 4 noise.
    assert state.solver_vectors.shape == (1, bnn.latent_dim) == (1, 16)
    grads = jax.tree.map(jnp.ones_like, vi_params)
    # One compiled update rather than an eager one: the generator's many leaves, each of its
    # own shape, would compile each operation anew.
    updates, _ = jax.jit(optimizer.update)(grads, state.opt_state, vi_params)
    generator_step = np.abs(np.asarray(jax.tree.leaves(updates.generator)[0])).max()
    log_std = vi_params.weight_noise["log_std"] + updates.weight_noise["log_std"]
    stepped = vi_params._replace(weight_noise={"log_std": log_std})
    log_std_step = np.abs(np.log(np.asarray(bnn.weight_noise_std(stepped))) - np.log(std))
    np.testing.assert_allclose(log_std_step, ivi.NOISE_RATE * generator_step, rtol=1e-3)


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
