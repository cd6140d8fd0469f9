import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from ovml_core.metrics import (
    average_precision_per_label,
    base_novel_map,
    expected_calibration_error,
    harmonic_mean,
    mean_average_precision,
    subset_map,
)


def _random_case(seed: int, videos: int = 40, labels: int = 7, ties: bool = False):
    rng = np.random.default_rng(seed)
    scores = rng.random((videos, labels))
    if ties:
        scores = np.round(scores, 1)  # many equal scores per label
    targets = (rng.random((videos, labels)) < 0.3).astype(np.int64)
    targets[0] = 1  # every label has a positive
    return scores, targets


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_map_equals_sklearn_macro(seed, ties):
    scores, targets = _random_case(seed, ties=ties)
    expected = average_precision_score(targets, scores, average="macro")
    result = mean_average_precision(scores, targets)
    assert result.value == pytest.approx(expected, abs=1e-12)
    assert result.num_skipped == 0 and result.num_scored == targets.shape[1]
    per_label = average_precision_score(targets, scores, average=None)
    np.testing.assert_allclose(result.per_label, per_label, atol=1e-12)


def test_map_accepts_torch_tensors():
    scores, targets = _random_case(0)
    from_torch = mean_average_precision(torch.from_numpy(scores), torch.from_numpy(targets))
    assert float(from_torch) == mean_average_precision(scores, targets).value


def test_map_hand_computed():
    # Ranked: pos, neg, pos -> precision 1 at recall 1/2, 2/3 at recall 1: AP = 0.5 + 1/3.
    scores = np.array([[0.9], [0.8], [0.7]])
    targets = np.array([[1], [0], [1]])
    assert mean_average_precision(scores, targets).value == pytest.approx(0.5 + 1 / 3)


def test_map_skips_and_counts_labels_without_positives():
    scores, targets = _random_case(1, labels=5)
    targets[:, [1, 3]] = 0
    result = mean_average_precision(scores, targets)
    assert result.num_skipped == 2 and result.num_scored == 3
    assert np.isnan(result.per_label[[1, 3]]).all()
    kept = [0, 2, 4]
    expected = average_precision_score(targets[:, kept], scores[:, kept], average="macro")
    assert result.value == pytest.approx(expected, abs=1e-12)


def test_map_nan_when_no_label_has_a_positive():
    result = mean_average_precision(np.random.rand(4, 3), np.zeros((4, 3)))
    assert math.isnan(result.value) and result.num_skipped == 3


@pytest.mark.parametrize(
    ("scores", "targets", "message"),
    [
        (np.zeros((3, 2)), np.zeros((3, 3)), "differ in shape"),
        (np.zeros(3), np.zeros(3), "2-D"),
        (np.zeros((2, 2)), np.full((2, 2), 2), "only 0 and 1"),
        (np.full((2, 2), np.nan), np.zeros((2, 2)), "NaN"),
    ],
)
def test_map_rejects_bad_input(scores, targets, message):
    with pytest.raises(ValueError, match=message):
        average_precision_per_label(scores, targets)


def test_base_novel_map_and_harmonic_mean():
    scores, targets = _random_case(2, labels=6)
    labels = ["a", "b", "c", "d", "e", "f"]
    result = base_novel_map(scores, targets, labels, base=["a", "c", "e"], novel=["f", "b"])
    expected_base = average_precision_score(targets[:, [0, 2, 4]], scores[:, [0, 2, 4]])
    expected_novel = average_precision_score(targets[:, [5, 1]], scores[:, [5, 1]])
    assert result["map_base"] == pytest.approx(expected_base, abs=1e-12)
    assert result["map_novel"] == pytest.approx(expected_novel, abs=1e-12)
    hm = 2 * expected_base * expected_novel / (expected_base + expected_novel)
    assert result["harmonic_mean"] == pytest.approx(hm, abs=1e-12)
    assert result["num_base_skipped"] == 0 and result["num_novel_skipped"] == 0


def test_base_novel_map_rejects_unknown_and_overlapping_labels():
    scores, targets = _random_case(3, labels=3)
    with pytest.raises(ValueError, match="zebra"):
        base_novel_map(scores, targets, ["a", "b", "c"], base=["a"], novel=["zebra"])
    with pytest.raises(ValueError, match="overlap"):
        base_novel_map(scores, targets, ["a", "b", "c"], base=["a", "b"], novel=["b"])
    with pytest.raises(ValueError, match="2 names for 3"):
        subset_map(scores, targets, ["a", "b"], ["a"])


def test_harmonic_mean_edge_cases():
    assert harmonic_mean(0.5, 0.25) == pytest.approx(1 / 3)
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert math.isnan(harmonic_mean(math.nan, 0.5))


def test_ece_hand_computed():
    # 5 bins of width 0.2. Pairs by bin:
    #   [0.0, 0.2): p = 0.1, 0.1 (y = 0, 1)     -> |0.1 - 0.5|  * 2/6 = 0.4/3
    #   [0.6, 0.8): p = 0.7 (y = 1)             -> |0.7 - 1.0|  * 1/6 = 0.05
    #   [0.8, 1.0]: p = 0.9, 0.9, 1.0 (y=1,1,0) -> |0.9333 - 2/3| * 3/6 = 0.4/3
    probs = np.array([[0.1, 0.7, 0.9], [0.1, 0.9, 1.0]])
    targets = np.array([[0, 1, 1], [1, 1, 0]])
    expected = 0.4 / 3 + 0.05 + 0.4 / 3
    assert expected_calibration_error(probs, targets, num_bins=5) == pytest.approx(expected)


def test_ece_extremes():
    targets = np.array([[0, 1], [1, 0]])
    assert expected_calibration_error(targets.astype(float), targets) == 0.0
    assert expected_calibration_error(1.0 - targets, targets) == pytest.approx(1.0)
    # One bin: ECE is |mean probability - base rate|.
    probs = np.array([[0.2, 0.6], [0.9, 0.5]])
    assert expected_calibration_error(probs, targets, num_bins=1) == pytest.approx(0.55 - 0.5)


def test_ece_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(np.array([[1.5]]), np.array([[1]]))
    with pytest.raises(ValueError, match="num_bins"):
        expected_calibration_error(np.array([[0.5]]), np.array([[1]]), num_bins=0)


def test_twin_hits_count_only_videos_with_exactly_one_twin():
    from ovml_core.metrics import twin_hits

    # columns: left, right, other
    scores = np.array([[0.9, 0.1, 0], [0.2, 0.8, 0], [0.7, 0.3, 0], [0.5, 0.6, 0], [0.9, 0.1, 0]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    hits = twin_hits(scores, targets, 0, 1)
    # video 3 holds both and video 4 neither: left out; videos 0-2 right, right, wrong.
    assert sorted(hits.tolist()) == [False, True, True]


def test_platt_fit_recovers_a_known_scale_and_bias():
    from ovml_core.metrics import PlattScaling, fit_platt_scaling

    rng = np.random.default_rng(0)
    raw = 1 / (1 + np.exp(-rng.normal(-1.0, 2.0, size=(4000, 6))))
    truth = PlattScaling(scale=1.7, bias=-0.8)
    targets = (rng.random(raw.shape) < truth.apply(raw)).astype(float)
    fitted = fit_platt_scaling(raw, targets)
    assert fitted.scale == pytest.approx(1.7, abs=0.08)
    assert fitted.bias == pytest.approx(-0.8, abs=0.08)


def test_calibration_leaves_map_as_it_is_and_lowers_ece():
    from ovml_core.metrics import PlattScaling, fit_platt_scaling

    noise, targets = _random_case(3, videos=200)
    # Informative (positives score higher) but every score far too low: badly calibrated.
    scores = 0.05 + 0.4 * (0.5 * targets + 0.5 * noise)
    calibrated = fit_platt_scaling(scores, targets).apply(scores)
    assert mean_average_precision(calibrated, targets).value == pytest.approx(
        mean_average_precision(scores, targets).value
    )
    assert mean_average_precision(PlattScaling(3.0, 2.0).apply(scores), targets).value == (
        pytest.approx(mean_average_precision(scores, targets).value)
    )
    assert expected_calibration_error(calibrated, targets) < expected_calibration_error(
        scores, targets
    )


def test_f1_at_threshold_and_the_best_threshold():
    from ovml_core.metrics import best_f1_threshold, f1_at_threshold

    probs = np.array([[0.9, 0.8], [0.7, 0.2], [0.6, 0.1]])
    targets = np.array([[1, 1], [0, 0], [1, 0]])
    assert f1_at_threshold(probs, targets, 0.75) == {"precision": 1.0, "recall": 2 / 3, "f1": 0.8}
    # Cuts: 0.9 -> F1 0.5, 0.8 -> 0.8, 0.7 -> 2/3... 0.6 -> 6/7; the best keeps four pairs.
    assert best_f1_threshold(probs, targets) == 0.6
    assert f1_at_threshold(probs, targets, 0.6)["f1"] == pytest.approx(6 / 7)
