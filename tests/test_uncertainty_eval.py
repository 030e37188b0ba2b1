"""Tests of examples/uncertainty_eval.py: the harness's data functions and generated tasks against
hand cases and their own definitions, the validation-based choices (temperature, KL weight), and
one tiny end-to-end run of the whole suite (every task, rotation, both OOD sets, JSON, plots)."""

from __future__ import annotations

import gzip
import json
import os
import sys

import jax
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
    records = [
        {"a": {"x": 1.0}, "b": 2.0, "c": "beta=1"},
        {"a": {"x": 3.0}, "b": 2.0, "c": "beta=2"},
    ]
    assert ue.mean_std(records) == {
        "a": {"x": {"mean": 2.0, "std": 1.0}},
        "b": {"mean": 2.0, "std": 0.0},
        "c": ["beta=1", "beta=2"],  # not numbers: every seed's value
    }


def test_validation_split_is_stratified_and_partitions_the_training_set():
    data = ue.load_digits_split(0)
    split = ue.hold_out(data, 0.15, seed=0)
    (x_fit, y_fit), (x_val, y_val) = split["train"], split["val"]
    assert len(x_val) == 203 and len(x_fit) + len(x_val) == len(data["train"][0])

    def sorted_rows(x, y):
        rows = np.column_stack([x, y])
        return rows[np.lexsort(rows.T[::-1])]

    np.testing.assert_array_equal(
        sorted_rows(np.concatenate([x_fit, x_val]), np.concatenate([y_fit, y_val])),
        sorted_rows(*data["train"]),
    )
    frequencies = [np.bincount(y, minlength=10) / len(y) for y in (y_fit, y_val)]
    np.testing.assert_allclose(*frequencies, atol=0.01)
    assert split["test"] is data["test"]


@pytest.mark.parametrize("task", [ue.teacher_task, ue.spiral_task])
def test_generated_tasks_draw_labels_from_their_true_probabilities(task):
    data = task(0)
    x_test, y_test = data["test"]
    probs = data["true_probs"]
    assert x_test.dtype == np.float32 and y_test.dtype == np.int32
    assert len(x_test) == 20_000 and probs.shape == (20_000, data["num_classes"])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-12)
    # Labels drawn from p(y|x): the expected NLL of the truth is its mean entropy, and each
    # class's frequency is its mean probability (both within 4 standard errors).
    log_p = np.log(probs[np.arange(len(y_test)), y_test])
    entropy = ue.predictive_entropy(probs)
    assert abs(-log_p.mean() - entropy.mean()) < 4 * log_p.std() / np.sqrt(len(y_test))
    frequency = np.bincount(y_test, minlength=probs.shape[1]) / len(y_test)
    np.testing.assert_allclose(frequency, probs.mean(0), atol=4 * 0.5 / np.sqrt(len(y_test)))
    # The seed draws the data; the task itself (p(y|x)) is the same for every seed.
    other = task(1)
    assert not np.array_equal(other["train"][0], data["train"][0])
    if task is ue.spiral_task:
        np.testing.assert_allclose(other["true_probs"], ue.spiral_probs(other["test"][0]))


def test_spiral_rotated_by_a_third_turn_permutes_the_classes():
    x = np.random.default_rng(0).normal(size=(50, 2))
    turn = 2 * np.pi / 3
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    probs, rotated = ue.spiral_probs(x), ue.spiral_probs(x @ rotation.T)
    np.testing.assert_allclose(rotated, np.roll(probs, 1, axis=1), atol=1e-12)


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = 3.0 * rng.normal(size=(20_000, 4))
    true_probs = ue._softmax(logits / 2.5)
    labels = ue._draw_labels(rng, true_probs)
    assert ue.fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)
    # Scaling the logits scales the temperature.
    assert ue.fit_temperature(3 * logits, labels) == pytest.approx(
        3 * ue.fit_temperature(logits, labels), rel=1e-3
    )


def test_selection_keeps_the_candidate_with_the_lowest_validation_nll():
    labels = np.array([0, 1, 1])
    data = {"val": (np.zeros((3, 2)), labels)}
    confidence = {0.3: 0.9, 0.1: 0.6, 0.03: 0.99}  # the probability each puts on its guess

    def train(value):
        p = confidence[value]
        probs = np.array([[p, 1 - p], [1 - p, p], [1 - p, p]])
        return (lambda key, x: probs), {"train_seconds": 2.0, "value": value}

    _, info = ue.select_on_validation(train, [0.3, 0.1, 0.03], data, None, "kl_weight")
    expected = {
        str(v): ue.nll(np.array([[p, 1 - p], [1 - p, p], [1 - p, p]]), labels)
        for v, p in confidence.items()
    }
    assert info["validation_nll"] == expected
    best = min(expected, key=expected.get)
    assert info["selected"] == {"kl_weight": float(best)} and info["value"] == float(best)
    assert info["train_seconds"] == 6.0
    with pytest.raises(ValueError, match="validation split"):
        ue.select_on_validation(train, [0.3], {"train": None}, None, "kl_weight")


def test_calibrated_implicit_vi_chooses_its_kl_weight_on_validation(monkeypatch):
    monkeypatch.setattr(ue, "KL_WEIGHTS", (0.3, 0.01))
    data = ue.hold_out(ue.spiral_task(0, num_train=200, num_test=100), 0.2, seed=0)
    predict, info = ue.train_method(
        "ivi-val", data, [8], 0, epochs=2, batch_size=32, samples=2, test_samples=4
    )
    assert set(info["validation_nll"]) == {"0.3", "0.01"}
    ((name, value),) = info["selected"].items()
    assert name == "kl_weight" and value in (0.3, 0.01)
    assert info["validation_nll"][str(value)] == min(info["validation_nll"].values())
    # The calibrated model: learned noise from a tenth of each leaf's std, the per-leaf prior.
    model = info["bnn"].model
    assert model.learn_sigma and isinstance(model.prior_std, tuple)
    np.testing.assert_allclose(np.array(model.sigma), 0.1 * np.array(model.prior_std))
    probs = predict(jax.random.key(0), data["test"][0])
    assert probs.shape == (100, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)


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
            "--methods", "map,map-ts,ivon,ivi",
            "--output", str(out),
        ]
    )  # fmt: skip
    with open(out / "uncertainty_eval.json") as f:
        saved = json.load(f)
    assert saved["summary"] == json.loads(json.dumps(report["summary"]))
    assert set(saved["summary"]) == set(ue.TASKS)
    for task, methods in saved["summary"].items():
        expected = {"map", "map-ts", "ivon", "ivi"} | ({"bayes"} if "digits" not in task else set())
        assert set(methods) == expected, task
        for method, s in methods.items():
            test = s["test"]
            assert set(test) == {"accuracy", "nll", "brier", "ece"}
            assert 0.3 < test["accuracy"]["mean"] <= 1, (task, method)  # four epochs learn
            assert test["nll"]["mean"] > 0 and 0 <= test["brier"]["mean"] <= 2
            assert 0 <= test["ece"]["mean"] <= 1 and test["accuracy"]["std"] == 0.0
    assert saved["summary"]["digits"]["map-ts"]["selected"][0].startswith("temperature=")
    # the Bayes-optimal predictor is the best any method can do on the generated tasks
    for task in ("teacher", "spiral"):
        s = saved["summary"][task]
        assert all(
            s["bayes"]["test"]["nll"]["mean"] < s[m]["test"]["nll"]["mean"]
            for m in s
            if m != "bayes"
        )
    digits = saved["summary"]["digits"]
    for s in digits.values():
        assert set(s["rotation"]) == {"0", "90"}
        # the unrotated entry is the test set itself (same images, same sampling keys)
        for k in ("accuracy", "nll"):
            assert s["rotation"]["0"][k]["mean"] == pytest.approx(s["test"][k]["mean"], abs=1e-6)
    for method, s in saved["summary"]["digits-ood"].items():
        assert set(s["ood"]) == {"digits 5-9", "fashion"}
        for name, ood_result in s["ood"].items():
            for k in ("auroc_max_prob", "auroc_entropy"):
                assert 0 <= ood_result[k]["mean"] <= 1, (method, name)
    assert len(saved["plots"]) == 4
    for name in saved["plots"]:
        assert (out / name).stat().st_size > 5_000


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "map,laplace"], "unknown ['laplace']"),
        (["--tasks", "digits,mnist"], "unknown ['mnist']"),
        (["--validation-fraction", "1"], "--validation-fraction must be in (0, 1)"),
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
