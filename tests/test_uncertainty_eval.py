"""Tests of examples/uncertainty_eval.py and of the methods it trains (bdl_examples.methods).

The data functions and generated tasks are checked against hand cases and their own
definitions; the choices made on validation (temperature, candidates) against hand cases;
every method's wiring with the trainers replaced by recorders; the Bayesian trainers on a
small spiral; and the program once over every task (rotation, both OOD sets, tables, JSON,
plots). What costs is compiling, so each training is shared by the tests that check it and the
suite's compilation cache compiles a program built twice once.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json

import jax
import numpy as np
import pytest
from bdl_examples import methods
from bdl_examples.data import (
    DataError,
    hold_out,
    load_digits_split,
    read_idx,
    rotate_images,
    spiral_probs,
    spiral_task,
    teacher_task,
    to_digits_format,
)
from bdl_examples.metrics import nll, ood_metrics, predictive_entropy
from programs import load_script

import implicit_vi as ivi

ue = load_script("examples/uncertainty_eval.py")


# The example programs, end to end: slow as a whole (skipped by `-m "not slow"`).
pytestmark = pytest.mark.slow


def write_idx(path, images: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, images.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in images.shape
    )
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + images.astype(np.uint8).tobytes())


def draw_labels(rng, probs):
    """One label per row of ``probs``, drawn from that row."""
    return (rng.random((len(probs), 1)) > np.cumsum(probs, axis=1)).sum(1)


# ----- data --------------------------------------------------------------------------------


def test_rotation_against_hand_cases():
    image = np.arange(64.0).reshape(1, 64)
    square = image.reshape(8, 8)
    # Counter-clockwise by 90 degrees: the last column becomes the first row.
    np.testing.assert_allclose(rotate_images(image, 90).reshape(8, 8), np.rot90(square), 1e-5)
    np.testing.assert_allclose(rotate_images(image, 180).reshape(8, 8), square[::-1, ::-1], 1e-5)
    np.testing.assert_array_equal(rotate_images(image, 0), image)
    # A centred, rotation-symmetric blob keeps its mass under 45 degrees; shapes are preserved.
    yy, xx = np.mgrid[:8, :8] - 3.5
    blob = np.exp(-(xx**2 + yy**2) / 2.0).reshape(1, 64).astype(np.float32)
    rotated = rotate_images(np.repeat(blob, 3, 0), 45)
    assert rotated.shape == (3, 64) and rotated.dtype == np.float32
    np.testing.assert_allclose(rotated.sum(1), blob.sum(), rtol=0.03)


def test_idx_files_are_read_and_reduced_like_the_digits(tmp_path):
    images = np.zeros((2, 28, 28), np.uint8)
    images[0, 2:6, 2:6] = 255  # after padding by 2: exactly the 4 x 4 block (1, 1)
    images[1, :, :] = 100  # below half intensity of the brightest image: all background
    images[1, 0, 0] = 200
    for name in ("a-idx3-ubyte", "b-idx3-ubyte.gz"):
        write_idx(tmp_path / name, images)
        np.testing.assert_array_equal(read_idx(str(tmp_path / name)), images)
    digits = to_digits_format(images).reshape(2, 8, 8)
    expected = np.zeros((8, 8))
    expected[1, 1] = 1.0
    np.testing.assert_array_equal(digits[0], expected)
    assert digits[1].sum() == pytest.approx(1 / 16)  # one pixel of 200 in block (0, 0)
    (tmp_path / "bad").write_bytes(b"\x00\x01\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        to_digits_format(np.zeros((2, 8, 8)))
    assert ue.load_ood_folder(str(tmp_path)) is None  # none of the release file names


def test_class_split_relabels_and_holds_out_the_other_digits():
    data = load_digits_split(0, classes=[7, 2])
    x_train, y_train = data["train"]
    assert data["num_classes"] == 2 and set(np.unique(y_train)) == {0, 1}
    assert len(x_train) + len(data["test"][0]) + len(data["ood"]) == 1797
    assert x_train.dtype == np.float32 and x_train.min() >= 0 and x_train.max() <= 1
    # stratified: both splits hold both classes in the same proportion (within one image)
    share = [np.mean(split[1] == 0) for split in (data["train"], data["test"])]
    assert abs(share[0] - share[1]) < 0.01


def test_validation_split_is_stratified_and_partitions_the_training_set():
    data = load_digits_split(0)
    split = hold_out(data, 0.15, seed=0)
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


@pytest.mark.parametrize("task", [teacher_task, spiral_task])
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
    entropy = predictive_entropy(probs)
    assert abs(-log_p.mean() - entropy.mean()) < 4 * log_p.std() / np.sqrt(len(y_test))
    frequency = np.bincount(y_test, minlength=probs.shape[1]) / len(y_test)
    np.testing.assert_allclose(frequency, probs.mean(0), atol=4 * 0.5 / np.sqrt(len(y_test)))
    # The seed draws the data; the task itself (p(y|x)) is the same for every seed.
    other = task(1)
    assert not np.array_equal(other["train"][0], data["train"][0])
    if task is spiral_task:
        np.testing.assert_allclose(other["true_probs"], spiral_probs(other["test"][0]))


def test_spiral_rotated_by_a_third_turn_permutes_the_classes():
    x = np.random.default_rng(0).normal(size=(50, 2))
    turn = 2 * np.pi / 3
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    probs, rotated = spiral_probs(x), spiral_probs(x @ rotation.T)
    np.testing.assert_allclose(rotated, np.roll(probs, 1, axis=1), atol=1e-12)


# ----- the choices on validation -------------------------------------------------------------


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = 3.0 * rng.normal(size=(20_000, 4))
    scaled = np.exp(logits / 2.5 - (logits / 2.5).max(1, keepdims=True))
    labels = draw_labels(rng, scaled / scaled.sum(1, keepdims=True))
    assert methods.fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)
    # Scaling the logits scales the temperature.
    assert methods.fit_temperature(3 * logits, labels) == pytest.approx(
        3 * methods.fit_temperature(logits, labels), rel=1e-3
    )


def test_temperature_stays_in_its_range_at_the_extremes():
    logits = np.array([[2.0, 0.0], [0.0, 2.0]])
    # Always right: the sharper the better, down to the smallest temperature (where the NLL
    # is flat at 0, so the search stops close to it).
    sharpest = methods.fit_temperature(logits, np.array([0, 1]))
    assert 0.05 <= sharpest < 0.06
    # Always wrong: the flatter the better, up to the largest.
    assert 19 < methods.fit_temperature(logits, np.array([1, 0])) <= 20
    # Equally confident inputs, one right and one wrong: no temperature does better than a
    # uniform prediction, which only the largest temperature approaches.
    assert 19 < methods.fit_temperature(np.array([[2.0, 0.0]] * 2), np.array([0, 1])) <= 20


def test_selection_keeps_the_candidate_with_the_lowest_validation_nll():
    labels = np.array([0, 1, 1])
    data = {"val": (np.zeros((3, 2)), labels)}
    confidence = {0.3: 0.9, 0.1: 0.6, 0.03: 0.99}  # the probability each puts on its guess

    def probs_of(p):
        return np.array([[p, 1 - p], [1 - p, p], [1 - p, p]])

    def train(value):
        return (lambda key, x: probs_of(confidence[value])), {"train_seconds": 2.0, "v": value}

    _, info = methods.select_on_validation(
        train, [0.3, 0.1, 0.03], data, key=None, name="kl_weight", verbose=False
    )
    expected = {str(v): nll(probs_of(p), labels) for v, p in confidence.items()}
    assert info["validation_nll"] == expected
    best = min(expected, key=expected.get)
    assert info["selected"] == {"kl_weight": float(best)} and info["v"] == float(best)
    assert info["train_seconds"] == 6.0
    for value, predict in info["candidates"].items():  # every candidate, for its test metrics
        np.testing.assert_array_equal(predict(None, None), probs_of(confidence[float(value)]))
    # On a tie the first candidate stays.
    _, info = methods.select_on_validation(
        lambda v: train(0.3), ["a", "b"], data, key=None, name="x", verbose=False
    )
    assert info["selected"] == {"x": "a"}
    with pytest.raises(ValueError, match="validation split"):
        methods.select_on_validation(train, [0.3], {"train": None}, key=None, name="kl_weight")


# ----- the methods' options and wiring ---------------------------------------------------------

TINY = {"train": (np.zeros((8, 2), np.float32), np.zeros(8, np.int32)), "num_classes": 2}


@pytest.mark.parametrize(
    "call",
    [
        lambda: methods.train_method("map", TINY, hidden=[2], seed=0, epochs=1, batch_size=4, s=2),
        lambda: methods.train_map(None, None, TINY, epochs=1, batch_size=4, seed=0, samples=2),
        lambda: methods.train_ivon(None, None, TINY, epochs=1, batch_size=4, seed=0, hidden=2),
        lambda: methods.train_implicit(None, None, TINY, epochs=1, batch_size=4, seed=0, mc=2),
        lambda: methods.select_on_validation(None, [], TINY, key=None, name="x", seed=1),
    ],
)
def test_an_unknown_option_is_an_error_not_ignored(call):
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        call()


def test_train_method_refuses_unknown_methods_and_options_that_do_not_apply():
    common = {"hidden": [2], "seed": 0, "epochs": 1, "batch_size": 4}
    with pytest.raises(ValueError, match="method must be one of map, map-ts"):
        methods.train_method("laplace", TINY, **common)
    with pytest.raises(ValueError, match="method 'map' takes no kl_weight"):
        methods.train_method("map", TINY, kl_weight=0.1, **common)
    implicit = {"model_kwargs": {"weight_noise": 1.0}, "trainer_kwargs": {"entropy": None}}
    with pytest.raises(ValueError, match="method 'ivon-val' takes no model_kwargs, trainer_kwargs"):
        methods.train_method("ivon-val", TINY, **implicit, **common)
    # The quick start chooses its KL weight on validation: a fixed one is refused.
    with pytest.raises(ValueError, match="method 'ivi' takes no kl_weight"):
        methods.train_method("ivi", TINY, kl_weight=0.1, **common)


def test_every_method_reaches_its_trainer_with_its_settings(monkeypatch):
    calls = []

    def recorder(name):
        def trainer(model, params, data, **options):
            calls.append((name, options))
            probs = np.full((len(data["val"][0]), 2), 0.5)  # every candidate ties
            return (lambda key, x: probs), {"train_seconds": 1.0}

        return trainer

    for name in ("train_map", "train_ivon", "train_implicit"):
        monkeypatch.setattr(methods, name, recorder(name))
    data = {**TINY, "val": (np.zeros((4, 2), np.float32), np.array([0, 1, 0, 1]))}
    common = {"epochs": 3, "batch_size": 4, "seed": 7, "verbose": False}

    def train(method):
        calls.clear()
        _, info = methods.train_method(
            method,
            data,
            hidden=[5],
            test_samples=16,
            samples=3,
            kl_weights=(0.3, 0.01),
            ess_scales=(0.5, 2.0),
            **common,
        )
        return list(calls), info

    assert train("map")[0] == [("train_map", common | {"temperature_scaling": False})]
    assert train("map-ts")[0] == [("train_map", common | {"temperature_scaling": True})]
    expected = common | {"test_samples": 16}
    assert train("ivon")[0] == [("train_ivon", expected)]
    candidates, info = train("ivon-val")
    assert candidates == [("train_ivon", expected | {"ess_scale": s}) for s in (0.5, 2.0)]
    assert info["selected"] == {"ess_scale": 0.5}  # a tie: the first
    expected |= {"samples": 3, "trainer_kwargs": None}
    # ivi: the library's defaults (no model options) at each candidate KL weight.
    library = expected | {"model_kwargs": None, "stochastic": None}
    candidates, info = train("ivi")
    assert candidates == [("train_implicit", library | {"kl_weight": b}) for b in (0.3, 0.01)]
    assert set(info["validation_nll"]) == {"0.3", "0.01"}
    assert info["selected"] == {"kl_weight": 0.3}  # a tie: the first
    paper = expected | {"stochastic": None, "kl_weight": 1.0}
    paper["model_kwargs"] = {"weight_noise": 1e-3, "prior_std": 1.0}
    assert train("ivi-paper")[0] == [("train_implicit", paper)]
    ((_, options),) = train("ll-ivi")[0]
    select = options.pop("stochastic")  # the last of the network's two Dense layers
    assert select("Dense_1/kernel", None) and not select("Dense_0/kernel", None)
    assert options == expected | {"model_kwargs": None, "kl_weight": 1.0}
    # Without kl_weights, ivi's candidates are the library's (those of ivi.select_kl_weight).
    calls.clear()
    methods.train_method("ivi", data, hidden=[5], **common)
    assert [options["kl_weight"] for _, options in calls] == list(ivi.KL_WEIGHTS)
    # The implicit-VI options reach the trainer; for ivi-paper they override the paper's.
    implicit = {"model_kwargs": {"prior_std": 0.5}, "kl_weight": 0.1}
    implicit["trainer_kwargs"] = {"entropy": ivi.ExactEntropy()}
    calls.clear()
    methods.train_method("ivi-paper", data, hidden=[5], **implicit, **common)
    ((_, options),) = calls
    assert options["model_kwargs"] == {"weight_noise": 1e-3, "prior_std": 0.5}
    assert options["trainer_kwargs"] == implicit["trainer_kwargs"] and options["kl_weight"] == 0.1


def test_last_layer_predicate_selects_the_last_dense_layer_only():
    params = {f"Dense_{i}": {"kernel": np.zeros((2, 2)), "bias": np.zeros(2)} for i in range(11)}
    select = methods.last_layer(params)  # Dense_10, not Dense_9 (numeric, not alphabetical)
    assert select("Dense_10/kernel", None) and select("Dense_10/bias", None)
    assert not select("Dense_1/kernel", None) and not select("Dense_9/bias", None)


def test_mean_std_of_nested_records():
    records = [
        {"a": {"x": 1.0}, "b": 2.0, "c": "beta=1"},
        {"a": {"x": 3.0}, "b": 2.0, "c": "beta=2"},
    ]
    assert methods.mean_std(records) == {
        "a": {"x": {"mean": 2.0, "std": 1.0}},
        "b": {"mean": 2.0, "std": 0.0},
        "c": ["beta=1", "beta=2"],  # not numbers: every seed's value
    }


# ----- the Bayesian trainers on a small spiral --------------------------------------------------


@pytest.fixture(scope="module")
def spiral():
    """A spiral of 500 training points (100 held out for validation) and 300 test points, and
    methods trained on it once: ``ivi-paper`` (12 epochs, enough to learn), ``ivi`` with one KL
    weight (the candidates' choice is ``select_on_validation``'s, tested above; one implicit-VI
    program fewer to compile) and ``ivon-val`` with two effective sample sizes."""
    data = hold_out(spiral_task(0, num_train=500, num_test=300), 0.2, seed=0)
    common = {"hidden": [16], "seed": 0, "batch_size": 32, "verbose": False}
    common |= {"samples": 2, "test_samples": 8}
    trained = {"data": data}
    # Twelve epochs learn the spiral at 3x the library's learning rate.
    trained["ivi-paper"] = methods.train_method("ivi-paper", data, epochs=12, lr=3e-3, **common)
    # The eigen-solver at a fixed count of iterations: a cheaper program to compile.
    cheap_solver = {"entropy": ivi.SmallestSingularValue(num_iterations=2, tolerance=None)}
    trained["ivi"] = methods.train_method(
        "ivi", data, epochs=4, kl_weights=(0.1,), trainer_kwargs=cheap_solver, **common
    )
    trained["ivon-val"] = methods.train_method(
        "ivon-val", data, epochs=4, ess_scales=(0.3, 3.0), **common
    )
    return trained


def test_implicit_vi_learns_and_predicts_probabilities(spiral):
    predict, info = spiral["ivi-paper"]
    x_test, y_test = spiral["data"]["test"]
    probs = predict(jax.random.key(0), x_test)
    assert probs.shape == (300, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.mean(probs.argmax(1) == y_test) > 0.45  # chance: 1/3, Bayes-optimal: 0.86
    assert [set(row) for row in info["history"]] == [
        {"loss", "elbo", "expected_log_likelihood", "solver_iterations"}
    ] * 12
    assert info["history"][-1]["loss"] < info["history"][0]["loss"]
    # The posterior is a distribution: two keys, two different averages.
    assert not np.allclose(probs, predict(jax.random.key(1), x_test))
    # The paper's posterior: one fixed weight noise std and the N(0, 1) prior.
    model = info["bnn"].model
    assert not model.learn_weight_noise and info["vi_params"].weight_noise == {}
    assert set(model.weight_noise) == {1e-3} and set(model.prior_std) == {1.0}


def test_the_quick_start_trains_the_library_defaults_and_chooses_on_validation(spiral):
    predict, info = spiral["ivi"]
    assert info["selected"] == {"kl_weight": 0.1} and set(info["validation_nll"]) == {"0.1"}
    x_val, y_val = spiral["data"]["val"]
    key = jax.random.key(2000)  # train_method scores the candidates with key 2000 + seed
    assert nll(predict(key, x_val), y_val) == pytest.approx(info["validation_nll"]["0.1"])
    # The library's defaults: learned noise from a tenth of each leaf's std, the per-leaf prior.
    model, vi_params = info["bnn"].model, info["vi_params"]
    assert model.learn_weight_noise and len(set(model.prior_std)) > 1
    np.testing.assert_allclose(np.array(model.weight_noise), 0.1 * np.array(model.prior_std))
    # ... and the noise is trained: it has moved from its initial value.
    initial = ivi.weight_noise_std(model, info["bnn"].init(jax.random.key(0)))
    assert not np.allclose(info["bnn"].weight_noise_std(vi_params), initial)
    assert all(row["solver_iterations"] == 2 for row in info["history"])  # the cheap solver
    probs = predict(jax.random.key(0), spiral["data"]["test"][0])
    assert probs.shape == (300, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_ivon_chooses_its_effective_sample_size_on_validation(spiral):
    predict, info = spiral["ivon-val"]
    assert set(info["validation_nll"]) == {"0.3", "3.0"}
    ((name, value),) = info["selected"].items()
    assert name == "ess_scale" and info["validation_nll"][str(value)] == min(
        info["validation_nll"].values()
    )
    x_val, y_val = spiral["data"]["val"]
    key = jax.random.key(2000)  # train_method scores the candidates with key 2000 + seed
    assert nll(predict(key, x_val), y_val) == pytest.approx(info["validation_nll"][str(value)])


# ----- the program ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """One run of the program over every task with MAP and MAP + temperature scaling (the
    cheapest methods to compile; the others are trained above, and a sampled predictor's
    evaluation is checked below), both OOD sets and two angles; ``(report, saved JSON, printed
    output, output folder)``."""
    folder = tmp_path_factory.mktemp("uncertainty_eval")
    ood = folder / "fashion"
    ood.mkdir()
    rng = np.random.default_rng(0)
    write_idx(ood / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)))
    out = folder / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report = ue.main(
            [
                "--seeds", "1", "--epochs", "4", "--hidden", "32", "--samples", "2",
                "--test-samples", "8", "--angles", "0,90", "--ood-folder", str(ood),
                "--methods", "map,map-ts", "--output", str(out),
            ]
        )  # fmt: skip
    saved = json.loads((out / "uncertainty_eval.json").read_text())
    return report, saved, printed.getvalue(), out


def test_the_suite_runs_every_task_and_saves_its_metrics(suite):
    report, saved, _, _ = suite
    assert saved["summary"] == json.loads(json.dumps(report["summary"]))
    assert set(saved["summary"]) == set(ue.TASKS)
    for task, results in saved["summary"].items():
        expected = {"map", "map-ts"} | ({"bayes"} if "digits" not in task else set())
        assert set(results) == expected, task
        for method, s in results.items():
            test = s["test"]
            assert set(test) == {"accuracy", "nll", "brier", "ece"}
            assert 0.3 < test["accuracy"]["mean"] <= 1, (task, method)  # four epochs learn
            assert test["nll"]["mean"] > 0 and 0 <= test["brier"]["mean"] <= 2
            assert 0 <= test["ece"]["mean"] <= 1 and test["accuracy"]["std"] == 0.0
            if method != "bayes":
                floor = s["test_calibrated_ece"]
                assert 0 < floor["mean"]["mean"] <= floor["q95"]["mean"] < 0.2
                assert s["train_seconds"]["mean"] > 0
    assert saved["summary"]["digits"]["map-ts"]["selected"][0].startswith("temperature=")
    # the Bayes-optimal predictor is the best any method can do on the generated tasks
    for task in ("teacher", "spiral"):
        s = saved["summary"][task]
        bayes = s["bayes"]["test"]["nll"]["mean"]
        assert all(bayes < s[m]["test"]["nll"]["mean"] for m in s if m != "bayes")
    assert saved["trained_run"] is None and len(saved["per_seed"]) == 1


def test_the_suite_rotates_the_digits_and_tells_both_ood_sets_apart(suite):
    _, saved, _, _ = suite
    for s in saved["summary"]["digits"].values():
        assert set(s["rotation"]) == {"0", "90"}
        # the unrotated entry is the test set itself (same images, same sampling keys)
        for k in ("accuracy", "nll"):
            assert s["rotation"]["0"][k]["mean"] == pytest.approx(s["test"][k]["mean"], abs=1e-6)
        assert s["rotation"]["90"]["accuracy"]["mean"] < s["test"]["accuracy"]["mean"]
    for method, s in saved["summary"]["digits-ood"].items():
        assert set(s["ood"]) == {"digits 5-9", "fashion"}
        for name, ood_result in s["ood"].items():
            for k in ("auroc_max_prob", "auroc_entropy"):
                assert 0 <= ood_result[k]["mean"] <= 1, (method, name)


def test_the_suite_prints_its_tables_and_draws_its_plots(suite):
    _, saved, printed, out = suite
    for title in ("ECE floor (95%)", "rotated test digits", "out of distribution, AUROC"):
        assert title in printed
    for label in ("MAP (AdamW)", "MAP + temperature scaling", "Bayes-optimal"):
        assert label in printed
    assert "temperature=" in printed and "fashion (maxp / entropy)" in printed
    assert saved["plots"] == [
        f"uncertainty_eval_{name}.png" for name in ("reliability", "rotation", "entropy", "spiral")
    ]
    for name in saved["plots"]:
        assert (out / name).stat().st_size > 5_000


def test_a_sampled_predictor_sees_every_shift_with_the_same_samples():
    def predict(key, x):  # a "posterior sample" per key: random logits added to the inputs'
        noise = np.asarray(jax.random.normal(key, (3,)))
        logits = np.asarray(x)[:, :3] + noise
        probs = np.exp(logits - logits.max(1, keepdims=True))
        return probs / probs.sum(1, keepdims=True)

    x = np.random.default_rng(0).random((20, 64)).astype(np.float32)
    y = np.arange(20) % 3
    data = {"test": (x, y), "ood": x[::-1].copy()}
    args = ue.parse_args(["--angles", "0,90"])
    key = jax.random.key(3)
    record, arrays = ue.evaluate("digits", predict, data, key, args)
    # Every angle with the key of the test set: the unrotated entry is the test set itself,
    # which another key (other samples) would not give.
    assert record["rotation"]["0"] == record["test"] and set(record["rotation"]) == {"0", "90"}
    assert ue.evaluate_shift(predict, x, y, [0], jax.random.key(4))["0"] != record["test"]
    record, arrays = ue.evaluate("digits-ood", predict, data, key, args)
    # The OOD inputs get their own samples (another key), not the test set's.
    expected = ood_metrics(arrays["probs"], predict(jax.random.fold_in(key, 8), data["ood"]))
    assert record["ood"] == {"digits 5-9": expected}
    np.testing.assert_allclose(arrays["entropy_in"], predictive_entropy(arrays["probs"]))


def test_the_tables_show_what_was_chosen_per_seed():
    record = {"test": {k: 0.5 for k in ("accuracy", "nll", "brier", "ece")}}
    record |= {"test_calibrated_ece": {"mean": 0.01, "q95": 0.02}, "train_seconds": 3.0}
    candidates = {"0.3": record["test"], "0.01": record["test"] | {"nll": 0.25}}
    runs = [
        record | {"selected": f"kl_weight={b}", "candidates_test": candidates} for b in (0.3, 0.01)
    ]
    table = ue.format_task_table({"ivi": methods.mean_std(runs)}, ["ivi"])
    (row,) = [line for line in table.splitlines() if line.startswith(methods.METHODS["ivi"])]
    assert "0.5000 ± 0.0000" in row and "0.0200 ± 0.0000" in row
    assert row.endswith("kl_weight=0.3, kl_weight=0.01  3")
    (row,) = [line for line in table.splitlines() if "kl_weight=0.01 on every seed" in line]
    assert "0.2500 ± 0.0000" in row


def test_the_suite_records_every_candidates_test_metrics(monkeypatch):
    """What the validation choice cost: each candidate of a choosing method on the test set."""
    data = ue.load_task("teacher", 0, 0.15)
    y_test, num_classes = data["test"][1], data["num_classes"]
    confidences = {"0.3": 0.9, "0.01": 0.6}

    def predictor(confidence):
        others = (1 - confidence) / (num_classes - 1)
        return lambda key, x: np.where(np.eye(num_classes)[y_test] == 1, confidence, others)

    def fake_train(method, data, **options):
        candidates = {value: predictor(p) for value, p in confidences.items()}
        info = {"train_seconds": 1.0, "selected": {"kl_weight": 0.3}, "candidates": candidates}
        return candidates["0.3"], info

    monkeypatch.setattr(ue, "train_method", fake_train)
    args = argparse.Namespace(
        ood_folder=None, epochs=1, batch_size=8, test_samples=2, samples=1, kl_weights=(0.3, 0.01),
        tasks=["teacher"], methods=["ivi"], validation_fraction=0.15, hidden=[4], angles=[0],
    )  # fmt: skip
    record = ue.run_seed(args, 0)["results"]["teacher"]["ivi"]
    for value, confidence in confidences.items():
        metrics = record["candidates_test"][value]
        assert metrics["accuracy"] == 1.0 and metrics["nll"] == pytest.approx(-np.log(confidence))
    assert record["test"] == record["candidates_test"]["0.3"]


def test_kl_weights_accept_zero_as_the_library_does():
    from bdl_examples.cli import kl_weight_list

    assert kl_weight_list("0,0.1") == (0.0, 0.1)  # the library's Trainer takes 0 too


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "map,laplace"], "unknown ['laplace']"),
        (["--tasks", "digits,mnist"], "unknown ['mnist']"),
        (["--validation-fraction", "1"], "--validation-fraction must be in (0, 1)"),
        (["--hidden", "16,x"], "--hidden"),
        (["--kl-weights", "0.1,-1"], "--kl-weights: must be numbers >= 0 separated by commas"),
        (["--kl-weights", "0.1,inf"], "--kl-weights: must be numbers >= 0 separated by commas"),
        (["--seeds", "0"], "--seeds"),
        (["--ood-folder", "/no/such/folder"], "not a folder"),
        (["--run", "/no/such/run", "--seeds", "0"], "no checkpoint.npz"),
    ],
)
def test_bad_arguments_exit_with_code_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ue.parse_args(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
