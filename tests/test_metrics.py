"""The examples' shared metrics module against direct statements of each metric."""

import numpy as np
import pytest
from bdl_examples import metrics


def random_probs(rng, n, k):
    logits = rng.normal(size=(n, k)) * 3
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


def test_classification_metrics_match_direct_loops():
    rng = np.random.default_rng(0)
    probs, labels = random_probs(rng, 500, 7), rng.integers(0, 7, 500)
    got = metrics.classification_metrics(probs, labels, bins=10)
    conf, pred = probs.max(1), probs.argmax(1)
    ece = 0.0
    for lo in np.arange(10) / 10:
        inside = (conf > lo) & (conf <= lo + 0.1)
        if inside.any():
            ece += inside.mean() * abs(
                (pred[inside] == labels[inside]).mean() - conf[inside].mean()
            )
    brier = np.mean([np.sum((p - np.eye(7)[y]) ** 2) for p, y in zip(probs, labels)])
    nll = -np.mean([np.log(p[y]) for p, y in zip(probs, labels)])
    np.testing.assert_allclose(got["ece"], ece, rtol=1e-12)
    np.testing.assert_allclose(got["brier"], brier, rtol=1e-12)
    np.testing.assert_allclose(got["nll"], nll, rtol=1e-8)
    assert got["accuracy"] == np.mean(pred == labels)


def test_perfectly_calibrated_bins_have_zero_ece():
    # Two bins' worth of predictions whose accuracy equals their confidence exactly.
    probs = np.array([[0.75, 0.25]] * 4 + [[0.5, 0.5]] * 2)
    labels = np.array([0, 0, 0, 1, 0, 1])
    assert metrics.ece(probs, labels, bins=4) == pytest.approx(0.0, abs=1e-15)


def test_auroc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(1)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    pairwise = np.mean((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None]))
    assert metrics.auroc(pos, neg) == pytest.approx(pairwise, rel=1e-12)
    assert metrics.auroc(pos + 10, neg) == 1.0


def test_ood_metrics_rank_confident_inputs_as_in_distribution():
    confident = np.array([[0.98, 0.01, 0.01], [0.9, 0.05, 0.05]])
    uncertain = np.array([[0.4, 0.3, 0.3], [1 / 3, 1 / 3, 1 / 3]])
    assert metrics.ood_metrics(confident, uncertain) == {
        "auroc_max_prob": 1.0,
        "auroc_entropy": 1.0,
    }


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="probs must be"):
        metrics.nll(np.ones((3, 2)) / 2, np.zeros(4, int))
    with pytest.raises(ValueError, match="at least one positive"):
        metrics.auroc([], [1.0])


def _random_probs(rng, num, classes=10, sharpness=3.0):
    logits = sharpness * rng.normal(size=(num, classes))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


def test_calibrated_ece_is_the_sampling_floor_of_a_calibrated_model():
    rng = np.random.default_rng(0)
    probs = _random_probs(rng, 450)
    floor = metrics.calibrated_ece(probs, draws=100)
    assert 0 < floor["mean"] < floor["q95"] < 0.2
    # A model that is calibrated by construction: its ECE mostly lies below the 95% quantile.
    below = 0
    for _ in range(40):
        labels = np.array([rng.choice(10, p=row) for row in probs])
        below += metrics.ece(probs, labels) <= floor["q95"]
    assert below >= 34
    # One that is right more often than it says (every label its argmax) is not.
    assert metrics.ece(probs, probs.argmax(-1)) > 2 * floor["q95"]
    # The floor falls like 1/sqrt(n) with the test set's size.
    large = metrics.calibrated_ece(_random_probs(rng, 45_000), draws=20)
    assert 4 < floor["mean"] / large["mean"] < 25
