"""Evaluation metrics for multi-label scores: macro mAP, base/novel mAP, calibration error.

Inputs are `[N, L]` arrays (numpy or torch): N videos, L labels. Targets are 0/1.
Average precision follows scikit-learn's definition (step-wise, ties grouped by score), so the
numbers are comparable with published results; sklearn itself is only used in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class MAPResult:
    """Macro mAP over the labels that have at least one positive.

    `value` is NaN when no label has a positive. `per_label` holds each label's AP, NaN for the
    skipped ones. `float(result)` gives `value`.
    """

    value: float
    num_scored: int
    num_skipped: int
    per_label: np.ndarray

    def __float__(self) -> float:
        return self.value


def _as_matrix(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D [videos, labels] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return x


def _scores_and_targets(scores: ArrayLike, targets: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    scores = _as_matrix(scores, "scores")
    targets = _as_matrix(targets, "targets")
    if scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} differ in shape")
    if not np.isin(targets, (0.0, 1.0)).all():
        raise ValueError("targets: must contain only 0 and 1")
    return scores, targets


def precision_recall_curve(
    scores: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) of one label at each distinct score threshold, highest first.

    `scores` and `targets` are 1-D; the label needs at least one positive.
    """
    order = np.argsort(-scores, kind="stable")
    scores, targets = scores[order], targets[order]
    # The last position of each run of equal scores is one threshold: ties count together.
    threshold_ends = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    true_pos = np.cumsum(targets)[threshold_ends]
    return true_pos / (threshold_ends + 1), true_pos / true_pos[-1]


def _average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one label: sum over distinct score thresholds of (recall step) * precision."""
    precision, recall = precision_recall_curve(scores, targets)
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def average_precision_per_label(scores: ArrayLike, targets: ArrayLike) -> np.ndarray:
    """AP of each label column, shape [L]; NaN where the label has no positive."""
    scores, targets = _scores_and_targets(scores, targets)
    return np.array(
        [
            _average_precision(scores[:, j], targets[:, j]) if targets[:, j].any() else math.nan
            for j in range(scores.shape[1])
        ]
    )


def mean_average_precision(scores: ArrayLike, targets: ArrayLike) -> MAPResult:
    """Macro mAP over labels with >= 1 positive; labels without one are skipped and counted."""
    per_label = average_precision_per_label(scores, targets)
    scored = ~np.isnan(per_label)
    value = float(per_label[scored].mean()) if scored.any() else math.nan
    return MAPResult(value, int(scored.sum()), int((~scored).sum()), per_label)


def _label_columns(labels: Sequence[str], subset: Iterable[str], name: str) -> list[int]:
    column = {label: j for j, label in enumerate(labels)}
    subset = list(subset)
    missing = [label for label in subset if label not in column]
    if missing:
        raise ValueError(f"{name}: labels not among the scored labels: {missing[:5]}")
    return [column[label] for label in subset]


def subset_map(
    scores: ArrayLike, targets: ArrayLike, labels: Sequence[str], subset: Iterable[str]
) -> MAPResult:
    """Macro mAP restricted to the columns named in `subset`; `labels` names all L columns."""
    scores, targets = _scores_and_targets(scores, targets)
    if len(labels) != scores.shape[1]:
        raise ValueError(f"labels: {len(labels)} names for {scores.shape[1]} score columns")
    columns = _label_columns(labels, subset, "subset")
    return mean_average_precision(scores[:, columns], targets[:, columns])


def twin_hits(scores: ArrayLike, targets: ArrayLike, first: int, second: int) -> np.ndarray:
    """For labels `first` and `second` (e.g. "moving left" and its time reversal "moving
    right"): over the videos that hold exactly one of them, whether that one scores higher.
    Its mean is 0.5 in expectation for a model that cannot tell the two apart."""
    scores, targets = _scores_and_targets(scores, targets)
    margin = scores[:, first] - scores[:, second]
    has_first, has_second = targets[:, first] == 1, targets[:, second] == 1
    return np.concatenate(
        [margin[has_first & ~has_second] > 0, margin[has_second & ~has_first] < 0]
    )


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b); 0 when both are 0, NaN when either is NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def base_novel_map(
    scores: ArrayLike,
    targets: ArrayLike,
    labels: Sequence[str],
    base: Iterable[str],
    novel: Iterable[str],
) -> dict[str, float | int]:
    """mAP on the base and the novel labels and their harmonic mean (the open-vocabulary score).

    Also reports how many labels of each subset were skipped for having no positive.
    """
    base, novel = list(base), list(novel)
    overlap = sorted(set(base) & set(novel))
    if overlap:
        raise ValueError(f"base and novel labels overlap: {overlap[:5]}")
    base_result = subset_map(scores, targets, labels, base)
    novel_result = subset_map(scores, targets, labels, novel)
    return {
        "map_base": base_result.value,
        "map_novel": novel_result.value,
        "harmonic_mean": harmonic_mean(base_result.value, novel_result.value),
        "num_base_skipped": base_result.num_skipped,
        "num_novel_skipped": novel_result.num_skipped,
    }


def expected_calibration_error(probs: ArrayLike, targets: ArrayLike, num_bins: int = 15) -> float:
    """ECE of multi-label probabilities: every (video, label) pair is one binary prediction.

    Pairs are binned by predicted probability into `num_bins` equal-width bins [k/n, (k+1)/n)
    (1.0 falls in the last); ECE = sum over bins of (pairs in bin / all pairs) *
    |mean probability - fraction of positives|.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins: must be >= 1, got {num_bins}")
    probs, targets = _scores_and_targets(probs, targets)
    if probs.size == 0:
        raise ValueError("probs: no predictions to calibrate")
    if probs.min() < 0.0 or probs.max() > 1.0:
        raise ValueError("probs: must lie in [0, 1]")
    probs, targets = probs.ravel(), targets.ravel()
    bins = np.minimum((probs * num_bins).astype(np.int64), num_bins - 1)
    # Per bin, (count / N) * |mean p - mean y| equals |sum p - sum y| / N.
    gap = np.bincount(bins, weights=probs, minlength=num_bins) - np.bincount(
        bins, weights=targets, minlength=num_bins
    )
    return float(np.abs(gap).sum() / probs.size)


# ---------------------------------------------------------------- calibration and thresholds

# Scores are probabilities stored as float32: keep their logits finite.
_PROBABILITY_EPS = 1e-7


def probability_logits(probs: ArrayLike) -> np.ndarray:
    """log(p / (1 - p)) of probabilities, clipped away from 0 and 1."""
    probs = np.clip(np.asarray(probs, dtype=np.float64), _PROBABILITY_EPS, 1 - _PROBABILITY_EPS)
    return np.log(probs) - np.log1p(-probs)


@dataclass(frozen=True)
class PlattScaling:
    """p' = sigmoid(scale * logit(p) + bias): one (scale, bias) pair shared by every label.

    With scale > 0 it is a monotone map of each label's scores, so it leaves AP and mAP as they
    are and changes only calibration and what a threshold keeps.
    """

    scale: float = 1.0
    bias: float = 0.0

    def apply(self, probs: ArrayLike) -> np.ndarray:
        z = self.scale * probability_logits(probs) + self.bias
        return 1.0 / (1.0 + np.exp(-z))


def fit_platt_scaling(probs: ArrayLike, targets: ArrayLike, max_steps: int = 100) -> PlattScaling:
    """Platt's (1999) fit of `PlattScaling` to every (video, label) pair of `probs`: logistic
    regression of the targets on logit(p) by damped Newton steps, with Platt's smoothed
    targets ((N+ + 1) / (N+ + 2) and 1 / (N- + 2)) so that separable data keeps a finite fit.
    """
    probs, targets = _scores_and_targets(probs, targets)
    z, y = probability_logits(probs).ravel(), targets.ravel()
    positives = y.sum()
    if positives == 0 or positives == y.size:
        raise ValueError("targets: a Platt fit needs both positive and negative pairs")
    t = np.where(y == 1, (positives + 1) / (positives + 2), 1 / (y.size - positives + 2))
    features = np.stack([z, np.ones_like(z)], axis=1)

    def loss(w: np.ndarray) -> float:
        u = features @ w
        # sum of -t log sigmoid(u) - (1 - t) log sigmoid(-u), computed without overflow
        return float(np.sum(np.logaddexp(0.0, u) - t * u))

    w = np.array([1.0, 0.0])
    current = loss(w)
    for _ in range(max_steps):
        p = 1.0 / (1.0 + np.exp(-(features @ w)))
        gradient = features.T @ (p - t)
        hessian = features.T @ (features * (p * (1 - p))[:, None]) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        factor = 1.0
        while factor > 1e-6 and loss(w - factor * step) > current:
            factor /= 2
        w = w - factor * step
        previous, current = current, loss(w)
        if previous - current <= 1e-12 * max(1.0, abs(previous)):
            break
    return PlattScaling(scale=float(w[0]), bias=float(w[1]))


def f1_at_threshold(probs: ArrayLike, targets: ArrayLike, threshold: float) -> dict[str, float]:
    """Micro precision, recall and F1 over every (video, label) pair kept by p >= threshold
    (what the tagging job's `tag.threshold` keeps)."""
    probs, targets = _scores_and_targets(probs, targets)
    kept = probs >= threshold
    true_pos = float((kept & (targets == 1)).sum())
    precision = true_pos / kept.sum() if kept.any() else 0.0
    recall = true_pos / targets.sum() if targets.any() else math.nan
    f1 = 0.0 if true_pos == 0 else 2 * true_pos / (kept.sum() + targets.sum())
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


def best_f1_threshold(probs: ArrayLike, targets: ArrayLike) -> float:
    """The threshold among the scores themselves with the highest micro F1 (ties: the highest
    such threshold, keeping fewer tags)."""
    probs, targets = _scores_and_targets(probs, targets)
    if not targets.any():
        raise ValueError("targets: no positive pair to choose a threshold for")
    scores, truth = probs.ravel(), targets.ravel()
    order = np.argsort(-scores, kind="stable")
    scores, truth = scores[order], truth[order]
    # A threshold keeps a whole run of equal scores: its last position is the cut.
    cuts = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    true_pos = np.cumsum(truth)[cuts]
    f1 = 2 * true_pos / (cuts + 1 + truth.sum())
    return float(scores[cuts[int(np.argmax(f1))]])
