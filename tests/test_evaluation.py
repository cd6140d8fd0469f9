"""Evaluation: metrics from full score vectors, the join with the manifest, the HTML report."""

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from ovml_core.config import Config
from ovml_core.evaluation import (
    EvaluationInput,
    SampleVideo,
    compute_metrics,
    html_report,
    png_bytes,
    reliability_bins,
)
from pipeline.evaluation import EvaluationError, join_scores, split_labels

LABELS = ["cat", "dog", "<script>alert(1)</script>", "run & jump"]


def toy_input() -> EvaluationInput:
    rng = np.random.default_rng(0)
    targets = (rng.random((40, 4)) < 0.4).astype(float)
    targets[0] = 1.0  # every label has a positive
    scores = np.clip(0.7 * targets + 0.3 * rng.random((40, 4)), 0, 1)
    scores[:, 3] = rng.random(40)  # one label at chance
    return EvaluationInput(
        scores,
        targets,
        LABELS,
        base=LABELS[:2],
        novel=LABELS[2:],
        types={"cat": "animal", "dog": "animal", LABELS[2]: "action", LABELS[3]: "action"},
    )


def test_metrics_split_base_novel_and_types():
    data = toy_input()
    metrics = compute_metrics(data)
    assert metrics["map_base"] == pytest.approx(1.0)  # scores separate the base labels
    assert metrics["map_novel"] < 1.0
    hm = (
        2
        * metrics["map_base"]
        * metrics["map_novel"]
        / (metrics["map_base"] + metrics["map_novel"])
    )
    assert metrics["harmonic_mean"] == pytest.approx(hm)
    assert set(metrics["by_type"]) == {"animal", "action"}
    assert metrics["by_type"]["animal"]["map_base"] == pytest.approx(1.0)
    assert math.isnan(metrics["by_type"]["animal"]["map_novel"])
    per_label = {p["label"]: p for p in metrics["per_label"]}
    assert per_label["run & jump"]["chance_ap"] == pytest.approx(data.targets[:, 3].mean())
    assert per_label["cat"]["split"] == "base" and per_label["run & jump"]["split"] == "novel"
    assert 0.0 <= metrics["ece"] <= 1.0


def test_reliability_bins_count_every_pair():
    data = toy_input()
    bins = reliability_bins(data.scores, data.targets)
    assert sum(n for _, _, n in bins) == data.scores.size
    assert all(0 <= p <= 1 and 0 <= f <= 1 for p, f, _ in bins)


def test_report_escapes_every_label_and_inlines_everything():
    data = toy_input()
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    sample = SampleVideo("<b>video</b>", frames, ["<script>alert(1)</script>"], [(LABELS[2], 0.9)])
    page = html_report("<title> & more", data, compute_metrics(data), [sample])
    assert "<script>" not in page and "<b>video</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "run &amp; jump" in page
    assert "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_png_bytes_is_a_png():
    image = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    data = png_bytes(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 10 and int.from_bytes(data[20:24], "big") == 6


def tags_table(top_k_size: int, error_video: str | None = None) -> pa.Table:
    scores = {"a": [0.9, 0.2, 0.1], "b": [0.3, 0.8, 0.4], "c": [0.1, 0.1, 0.7]}
    rows = []
    for video_id, values in scores.items():
        ranked = sorted(zip(["x", "y", "z"], values, strict=True), key=lambda t: -t[1])
        error = "broken" if video_id == error_video else None
        top = [{"label": label, "score": score} for label, score in ranked[:top_k_size]]
        rows.append({"video_id": video_id, "top_k": None if error else top, "error": error})
    return pa.Table.from_pylist(rows)


MANIFEST = pa.table(
    {
        "video_id": ["a", "b", "c", "d"],
        "uri": ["a.mp4", "b.mp4", "c.mp4", "d.mp4"],
        "labels": [["x"], ["y", "z"], ["z", "unknown"], ["x"]],
    }
)


def test_join_scores_fills_the_matrix_from_top_k():
    data, rows, counts = join_scores(tags_table(3, error_video="c"), MANIFEST, None)
    assert data.labels == ["x", "y", "z"]
    assert data.scores.tolist() == [[0.9, 0.2, 0.1], [0.3, 0.8, 0.4]]
    assert data.targets.tolist() == [[1, 0, 0], [0, 1, 1]]
    assert counts == {"missing": 1, "errored": 1}  # d was never tagged, c errored
    assert [r["video_id"] for r in rows] == ["a", "b"]


def test_short_top_k_is_refused_with_the_fix():
    with pytest.raises(EvaluationError, match="tag.top_k=3"):
        join_scores(tags_table(2), MANIFEST, ["x", "y", "z"])


def test_base_and_novel_come_from_the_config():
    cfg = Config.from_dict({"train": {"novel_labels": ["z", "not-in-vocabulary"]}})
    assert split_labels(cfg, ["x", "y", "z"]) == (["x", "y"], ["z"])


def test_metrics_json_has_no_nan(tmp_path):
    from ovml_core.finetune import json_safe

    metrics = compute_metrics(toy_input())
    text = json.dumps(json_safe(metrics), allow_nan=False)
    assert json.loads(text)["by_type"]["animal"]["map_novel"] is None


def test_calibration_is_fit_on_base_labels_only_and_applied_elsewhere():
    """The fit reads the base columns alone: changing novel scores or targets changes nothing;
    applied to another split, it changes ECE and thresholded numbers, never mAP."""
    from ovml_core.evaluation import fit_calibration

    val = toy_input()
    fitted = fit_calibration(val)
    val.scores[:, 2:] = 1 - val.scores[:, 2:]
    val.targets[:, 2:] = 1 - val.targets[:, 2:]
    assert fit_calibration(val) == fitted
    test = toy_input()
    test.scores = 0.5 * test.scores  # another split, scored lower
    plain, calibrated = compute_metrics(test), compute_metrics(test, fitted, threshold=0.5)
    assert "calibrated" not in plain
    assert calibrated["map"] == plain["map"] and calibrated["ece"] == plain["ece"]
    assert calibrated["calibrated"]["scale"] == fitted.scale
    assert calibrated["calibrated"]["ece"] != plain["ece"]
    assert set(calibrated["calibrated"]) >= {"all", "base", "novel", "threshold"}


def test_other_wording_is_scored_against_the_labels_it_means(tmp_path):
    """A vocabulary's `means` column maps its words to the manifest's labels: targets and the
    base / novel split follow the meant label."""
    from pipeline.evaluation import read_label_meanings

    vocabulary = tmp_path / "words.csv"
    vocabulary.write_text("label,type,means\nkitty,animal,cat\npup,animal,dog\n")
    means = read_label_meanings(str(vocabulary))
    assert means == {"kitty": "cat", "pup": "dog"}
    tags = pa.table(
        {
            "video_id": ["v1", "v2"],
            "top_k": [
                [{"label": "kitty", "score": 0.9}, {"label": "pup", "score": 0.2}],
                [{"label": "kitty", "score": 0.1}, {"label": "pup", "score": 0.8}],
            ],
            "error": [None, None],
        }
    )
    manifest = pa.table({"video_id": ["v1", "v2"], "labels": [["cat"], ["dog", "cat"]]})
    data, _, _ = join_scores(tags, manifest, ["kitty", "pup"], means)
    assert data.targets.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    cfg = Config.from_dict({"train": {"novel_labels": ["dog"]}})
    assert split_labels(cfg, ["kitty", "pup"], means) == (["kitty"], ["pup"])
