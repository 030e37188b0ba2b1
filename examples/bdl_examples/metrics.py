"""Uncertainty metrics shared by the examples: one definition of each, in NumPy.

Every function takes class probabilities ``probs`` of shape ``(N, K)`` (rows sum to one) and
integer ``labels`` of shape ``(N,)``, as NumPy or JAX arrays, and returns Python floats or NumPy
arrays. ECE and the reliability diagram use equal-width confidence bins; the number of bins is
15 everywhere unless a caller says otherwise, so that the examples' figures compare.

Example:
  >>> import numpy as np
  >>> probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
  >>> labels = np.array([0, 1, 1])
  >>> {k: round(v, 4) for k, v in classification_metrics(probs, labels).items()}
  {'accuracy': 0.6667, 'nll': 0.4149, 'brier': 0.2733, 'ece': 0.3}
  >>> round(auroc(np.array([0.9, 0.8, 0.7]), np.array([0.1, 0.75, 0.2])), 4)
  0.8889
"""

from __future__ import annotations

import numpy as np

DEFAULT_BINS = 15
_TINY = 1e-12  # keeps log(0) finite for a probability that underflowed


def _as_numpy(probs, labels):
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(
            f"probs must be (N, K) and labels (N,); got {probs.shape} and {labels.shape}"
        )
    return probs, labels


def accuracy(probs, labels) -> float:
    """Fraction of inputs whose most probable class is the label."""
    probs, labels = _as_numpy(probs, labels)
    return float(np.mean(probs.argmax(-1) == labels))


def nll(probs, labels) -> float:
    """Mean negative log-probability of the label (nats)."""
    probs, labels = _as_numpy(probs, labels)
    return float(-np.mean(np.log(probs[np.arange(len(labels)), labels] + _TINY)))


def brier(probs, labels) -> float:
    """Mean squared distance between the probabilities and the one-hot label (sum over classes)."""
    probs, labels = _as_numpy(probs, labels)
    onehot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=-1)))


def reliability_bins(probs, labels, bins: int = DEFAULT_BINS):
    """Per-bin statistics of the confidence (max probability) in ``bins`` equal-width bins.

    Returns:
      ``(centers, accuracy, confidence, counts)``, each of shape ``(bins,)``; accuracy and
      confidence are NaN in empty bins.
    """
    probs, labels = _as_numpy(probs, labels)
    confidence = probs.max(-1)
    correct = probs.argmax(-1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds confidences in (edges[i], edges[i+1]]; a confidence of exactly 0 joins bin 0.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_accuracy = np.bincount(index, weights=correct, minlength=bins) / counts
        bin_confidence = np.bincount(index, weights=confidence, minlength=bins) / counts
    centers = (edges[:-1] + edges[1:]) / 2
    return centers, bin_accuracy, bin_confidence, counts


def ece(probs, labels, bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error: count-weighted mean |accuracy - confidence| over the bins."""
    _, bin_accuracy, bin_confidence, counts = reliability_bins(probs, labels, bins)
    filled = counts > 0
    gaps = np.abs(bin_accuracy[filled] - bin_confidence[filled])
    return float(np.sum(counts[filled] * gaps) / np.sum(counts))


def calibrated_ece(probs, bins: int = DEFAULT_BINS, draws: int = 200, seed: int = 0) -> dict:
    """The ECE a perfectly calibrated model with these predictions would show on a test set of
    this size: labels drawn from the predictions themselves, ``draws`` times.

    ECE is biased upwards on a finite test set, so an ECE near ``"mean"`` is as calibrated as
    the test set can show, and two models whose ECEs both lie below ``"q95"`` cannot be told
    apart by it.

    Returns:
      ``{"mean": ..., "q95": ...}``: the mean and the 95% quantile over the draws.

    Example:
      >>> import numpy as np
      >>> calibrated_ece(np.eye(3)[[0, 1, 2, 0]])  # certain predictions: no sampling error
      {'mean': 0.0, 'q95': 0.0}
    """
    probs = np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1)
    values = []
    for _ in range(draws):
        uniform = rng.random(len(probs))[:, None]
        labels = np.minimum((uniform >= cumulative).sum(-1), probs.shape[-1] - 1)
        values.append(ece(probs, labels, bins))
    return {"mean": float(np.mean(values)), "q95": float(np.quantile(values, 0.95))}


def predictive_entropy(probs) -> np.ndarray:
    """Entropy (nats) of each row of ``probs``."""
    probs = np.asarray(probs, dtype=np.float64)
    return -np.sum(probs * np.log(probs + _TINY), axis=-1)


def classification_metrics(probs, labels, bins: int = DEFAULT_BINS) -> dict:
    """Accuracy, NLL, Brier score and ECE as a dict of floats."""
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
        "ece": ece(probs, labels, bins),
    }


def auroc(scores_positive, scores_negative) -> float:
    """Area under the ROC curve for telling positives (higher score) from negatives.

    Equal to the probability that a random positive scores above a random negative, ties
    counting one half (the Mann-Whitney statistic), computed from average ranks.
    """
    positive = np.asarray(scores_positive, dtype=np.float64).ravel()
    negative = np.asarray(scores_negative, dtype=np.float64).ravel()
    if positive.size == 0 or negative.size == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    scores = np.concatenate([positive, negative])
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty_like(scores)
    # Average rank (1-based) over each run of tied scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2
    rank_sum = ranks[: positive.size].sum()
    return float(
        (rank_sum - positive.size * (positive.size + 1) / 2) / (positive.size * negative.size)
    )


def ood_metrics(probs_in, probs_out) -> dict:
    """AUROC of in- vs out-of-distribution by max probability and by predictive entropy.

    In-distribution inputs are the positives: they should have higher max probability and lower
    entropy.
    """
    probs_in = np.asarray(probs_in, dtype=np.float64)
    probs_out = np.asarray(probs_out, dtype=np.float64)
    return {
        "auroc_max_prob": auroc(probs_in.max(-1), probs_out.max(-1)),
        "auroc_entropy": auroc(-predictive_entropy(probs_in), -predictive_entropy(probs_out)),
    }
