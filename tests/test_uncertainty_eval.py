"""Tests of examples/uncertainty_eval.py: the harness's data functions against hand cases, and
one tiny end-to-end run of the whole suite (every method, rotation, both OOD sets, JSON, plots)."""

from __future__ import annotations

import gzip
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import uncertainty_eval as ue  # noqa: E402


def write_idx(path, images: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, images.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in images.shape
    )
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + images.astype(np.uint8).tobytes())


def test_rotation_against_hand_cases():
    image = np.arange(64.0).reshape(1, 64)
    square = image.reshape(8, 8)
    # Counter-clockwise by 90 degrees: the last column becomes the first row.
    np.testing.assert_allclose(ue.rotate_images(image, 90).reshape(8, 8), np.rot90(square), 1e-5)
    np.testing.assert_allclose(ue.rotate_images(image, 180).reshape(8, 8), square[::-1, ::-1], 1e-5)
    np.testing.assert_array_equal(ue.rotate_images(image, 0), image)
    # A centred, rotation-symmetric blob keeps its mass under 45 degrees; shapes are preserved.
    yy, xx = np.mgrid[:8, :8] - 3.5
    blob = np.exp(-(xx**2 + yy**2) / 2.0).reshape(1, 64).astype(np.float32)
    rotated = ue.rotate_images(np.repeat(blob, 3, 0), 45)
    assert rotated.shape == (3, 64) and rotated.dtype == np.float32
    np.testing.assert_allclose(rotated.sum(1), blob.sum(), rtol=0.03)


def test_idx_files_are_read_and_reduced_like_the_digits(tmp_path):
    images = np.zeros((2, 28, 28), np.uint8)
    images[0, 2:6, 2:6] = 255  # after padding by 2: exactly the 4 x 4 block (1, 1)
    images[1, :, :] = 100  # below half intensity of the brightest image: all background
    images[1, 0, 0] = 200
    for name in ("a-idx3-ubyte", "b-idx3-ubyte.gz"):
        write_idx(tmp_path / name, images)
        np.testing.assert_array_equal(ue.read_idx(str(tmp_path / name)), images)
    digits = ue.to_digits_format(images).reshape(2, 8, 8)
    expected = np.zeros((8, 8))
    expected[1, 1] = 1.0
    np.testing.assert_array_equal(digits[0], expected)
    assert digits[1].sum() == pytest.approx(1 / 16)  # one pixel of 200 in block (0, 0)
    (tmp_path / "bad").write_bytes(b"\x00\x01\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ue.DataError, match="not an IDX file"):
        ue.read_idx(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        ue.to_digits_format(np.zeros((2, 8, 8)))
    assert ue.load_ood_folder(str(tmp_path)) is None  # none of the release file names


def test_class_split_relabels_and_holds_out_the_other_digits():
    data = ue.load_digits_split(0, classes=[7, 2])
    x_train, y_train = data["train"]
    assert data["num_classes"] == 2 and set(np.unique(y_train)) == {0, 1}
    assert len(x_train) + len(data["test"][0]) + len(data["ood"]) == 1797
    assert x_train.dtype == np.float32 and x_train.min() >= 0 and x_train.max() <= 1
    # stratified: both splits hold both classes in the same proportion (within one image)
    share = [np.mean(split[1] == 0) for split in (data["train"], data["test"])]
    assert abs(share[0] - share[1]) < 0.01


def test_last_layer_predicate_selects_the_last_dense_layer_only():
    params = {f"Dense_{i}": {"kernel": np.zeros((2, 2)), "bias": np.zeros(2)} for i in range(11)}
    select = ue.last_layer(params)  # Dense_10, not Dense_9 (numeric, not alphabetical order)
    assert select("Dense_10/kernel", None) and select("Dense_10/bias", None)
    assert not select("Dense_1/kernel", None) and not select("Dense_9/bias", None)


def test_mean_std_of_nested_records():
    records = [{"a": {"x": 1.0}, "b": 2.0}, {"a": {"x": 3.0}, "b": 2.0}]
    assert ue.mean_std(records) == {
        "a": {"x": {"mean": 2.0, "std": 1.0}},
        "b": {"mean": 2.0, "std": 0.0},
    }


def test_tiny_run_of_the_whole_suite(tmp_path):
    ood = tmp_path / "fashion"
    ood.mkdir()
    rng = np.random.default_rng(0)
    write_idx(ood / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)))
    out = tmp_path / "out"
    report = ue.main(
        [
            "--seeds", "1", "--epochs", "4", "--hidden", "32", "--samples", "2",
            "--test-samples", "8", "--angles", "0,90", "--ood-folder", str(ood),
            "--methods", "map,ivon,ivi",
            "--output", str(out),
        ]
    )  # fmt: skip
    with open(out / "uncertainty_eval.json") as f:
        saved = json.load(f)
    assert saved["summary"] == json.loads(json.dumps(report["summary"]))
    assert set(saved["summary"]) == {"map", "ivon", "ivi"}
    for method, s in saved["summary"].items():
        test = s["test"]
        assert set(test) == {"accuracy", "nll", "brier", "ece"}
        assert 0.3 < test["accuracy"]["mean"] <= 1, method  # four epochs learn something
        assert test["nll"]["mean"] > 0 and 0 <= test["brier"]["mean"] <= 2
        assert 0 <= test["ece"]["mean"] <= 1 and test["accuracy"]["std"] == 0.0
        assert set(s["rotation"]) == {"0", "90"}
        # the unrotated entry is the test set itself (same images, same sampling keys)
        for k in ("accuracy", "nll"):
            assert s["rotation"]["0"][k]["mean"] == pytest.approx(test[k]["mean"], abs=1e-6)
        assert set(s["ood"]) == {"digits 5-9", "fashion"}
        for name, ood_result in s["ood"].items():
            for k in ("auroc_max_prob", "auroc_entropy"):
                assert 0 <= ood_result[k]["mean"] <= 1, (method, name)
    for name in saved["plots"]:
        assert (out / name).stat().st_size > 5_000


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "map,laplace"], "unknown ['laplace']"),
        (["--hidden", "16,x"], "--hidden"),
        (["--seeds", "0"], "--seeds"),
        (["--ood-folder", "/no/such/folder"], "not a folder"),
        (["--run", "/no/such/run", "--seeds", "0"], "no checkpoint.pkl"),
    ],
)
def test_bad_arguments_exit_with_code_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ue.parse_args(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
