"""Evaluation of tags against ground truth: metrics (JSON-ready) and a self-contained HTML report.

Input is a score for EVERY (video, label) pair, [N, L], and 0/1 targets. Metrics: mAP over all
labels, base / novel / harmonic mean, the same per label type (e.g. garment / motion), ECE, and
each label's AP next to its chance level (its share of positive videos, what a random ranking
scores on average). Given a `PlattScaling` (`fit_calibration`, fit on the BASE labels of a
validation split), also the ECE and the thresholded numbers (micro precision / recall / F1) of
the calibrated scores: every model, zero-shot included, is calibrated the same way before any
number that depends on the scores' scale. mAP never depends on it. The report draws them as inline SVG, plus a few sample frames (PNG made by
PyAV, base64-inlined) with their top tags. Every label text in the HTML goes through
`html.escape`: labels come from user vocabularies.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import av
import numpy as np

from ovml_core.metrics import (
    PlattScaling,
    average_precision_per_label,
    base_novel_map,
    expected_calibration_error,
    f1_at_threshold,
    fit_platt_scaling,
    harmonic_mean,
    precision_recall_curve,
    subset_map,
)

ECE_BINS = 10


@dataclass
class EvaluationInput:
    scores: np.ndarray  # float [N, L] probabilities
    targets: np.ndarray  # 0/1 [N, L]
    labels: list[str]
    base: list[str]
    novel: list[str]
    types: dict[str, str] = field(default_factory=dict)  # label -> type; untyped labels absent


def fit_calibration(data: EvaluationInput) -> PlattScaling:
    """Platt scaling fit on the base labels' columns only: novel labels stay unseen by every
    choice. Fit it on a validation split and pass it to `compute_metrics` of the test split."""
    if not data.base:
        raise ValueError("fit_calibration: no base labels to fit on")
    columns = [data.labels.index(label) for label in data.base]
    return fit_platt_scaling(data.scores[:, columns], data.targets[:, columns])


def calibrated_metrics(
    data: EvaluationInput, calibration: PlattScaling, threshold: float
) -> dict[str, float | dict]:
    """ECE and micro precision / recall / F1 at `threshold` of the calibrated scores, over all
    labels and over the base and the novel ones."""
    probs = calibration.apply(data.scores)
    result: dict[str, float | dict] = {
        "scale": calibration.scale,
        "bias": calibration.bias,
        "threshold": threshold,
        "ece": expected_calibration_error(probs, data.targets, num_bins=ECE_BINS),
        "all": f1_at_threshold(probs, data.targets, threshold),
    }
    for name, subset in (("base", data.base), ("novel", data.novel)):
        if subset:
            columns = [data.labels.index(label) for label in subset]
            result[name] = f1_at_threshold(probs[:, columns], data.targets[:, columns], threshold)
    return result


def compute_metrics(
    data: EvaluationInput, calibration: PlattScaling | None = None, threshold: float = 0.5
) -> dict:
    """Everything the JSON and the report show; NaN where a subset has no positive. With a
    `calibration`, also "calibrated": `calibrated_metrics` at `threshold`."""
    scores, targets, labels = data.scores, data.targets, data.labels
    ap = average_precision_per_label(scores, targets)
    split = {label: "base" for label in data.base} | {label: "novel" for label in data.novel}
    per_label = [
        {
            "label": label,
            "type": data.types.get(label),
            "split": split.get(label),
            "ap": float(ap[j]),
            "chance_ap": float(targets[:, j].mean()),
            "positives": int(targets[:, j].sum()),
        }
        for j, label in enumerate(labels)
    ]
    metrics = {
        "videos": int(scores.shape[0]),
        "labels": len(labels),
        "map": float(np.nanmean(ap)) if np.isfinite(ap).any() else math.nan,
        **_base_novel(scores, targets, labels, data.base, data.novel),
        "ece": expected_calibration_error(scores, targets, num_bins=ECE_BINS),
        "by_type": {},
        "per_label": per_label,
    }
    for kind in sorted(set(data.types.values())):
        members = {label for label, t in data.types.items() if t == kind}
        base = [label for label in data.base if label in members]
        novel = [label for label in data.novel if label in members]
        metrics["by_type"][kind] = _base_novel(scores, targets, labels, base, novel)
    if calibration is not None:
        metrics["calibrated"] = calibrated_metrics(data, calibration, threshold)
    return metrics


def _base_novel(
    scores: np.ndarray, targets: np.ndarray, labels: list[str], base: list[str], novel: list[str]
) -> dict[str, float]:
    if base and novel:
        result = base_novel_map(scores, targets, labels, base, novel)
        return {k: float(result[k]) for k in ("map_base", "map_novel", "harmonic_mean")}
    base_map = subset_map(scores, targets, labels, base).value if base else math.nan
    novel_map = subset_map(scores, targets, labels, novel).value if novel else math.nan
    return {
        "map_base": base_map,
        "map_novel": novel_map,
        "harmonic_mean": harmonic_mean(base_map, novel_map),
    }


def reliability_bins(probs: np.ndarray, targets: np.ndarray, num_bins: int = ECE_BINS) -> list:
    """Per equal-width probability bin: (mean probability, fraction positive, pairs)."""
    probs, targets = probs.ravel(), targets.ravel()
    bins = np.minimum((probs * num_bins).astype(np.int64), num_bins - 1)
    rows = []
    for b in range(num_bins):
        inside = bins == b
        if inside.any():
            rows.append(
                (float(probs[inside].mean()), float(targets[inside].mean()), int(inside.sum()))
            )
    return rows


# ---------------------------------------------------------------- HTML


@dataclass
class SampleVideo:
    video_id: str
    frames: np.ndarray  # uint8 [T, H, W, 3]
    true_labels: list[str]
    top_tags: list[tuple[str, float]]


def png_bytes(image: np.ndarray) -> bytes:
    """An RGB uint8 image [H, W, 3] as PNG, encoded by PyAV (no imaging library needed)."""
    codec = av.CodecContext.create("png", "w")
    codec.height, codec.width = image.shape[:2]
    codec.pix_fmt = "rgb24"
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    return b"".join(bytes(p) for p in codec.encode(frame) + codec.encode(None))


def _fmt(value: float | None) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.3f}"
    )


def _summary_table(metrics: dict) -> str:
    rows = [("all labels", metrics)] + sorted(metrics["by_type"].items())
    body = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{_fmt(m.get('map_base'))}</td>"
        f"<td>{_fmt(m.get('map_novel'))}</td><td>{_fmt(m.get('harmonic_mean'))}</td></tr>"
        for name, m in rows
    )
    return (
        "<table><tr><th>labels</th><th>mAP base</th><th>mAP novel</th><th>harmonic mean</th></tr>"
        f"{body}</table><p>mAP over every label: {_fmt(metrics['map'])}; ECE "
        f"({ECE_BINS} bins, every video-label pair): {_fmt(metrics['ece'])}; "
        f"{metrics['videos']} videos, {metrics['labels']} labels.</p>{_calibrated_line(metrics)}"
    )


def _calibrated_line(metrics: dict) -> str:
    calibrated = metrics.get("calibrated")
    if calibrated is None:
        return ""
    return (
        f"<p>After Platt scaling fit on validation base labels (scale "
        f"{calibrated['scale']:.3f}, bias {calibrated['bias']:.3f}): ECE "
        f"{_fmt(calibrated['ece'])}; at threshold {calibrated['threshold']:.3f}, micro "
        f"precision {_fmt(calibrated['all']['precision'])}, recall "
        f"{_fmt(calibrated['all']['recall'])}, F1 {_fmt(calibrated['all']['f1'])}.</p>"
    )


def _ap_bars(per_label: list[dict]) -> str:
    """Horizontal bars: AP per label (blue base, orange novel), a tick at chance level."""
    row, left, width = 16, 190, 300
    height = row * len(per_label) + 30
    parts = [f'<svg width="{left + width + 60}" height="{height}" role="img">']
    for i, item in enumerate(per_label):
        y = 20 + i * row
        ap = 0.0 if math.isnan(item["ap"]) else item["ap"]
        color = "#e08a2c" if item["split"] == "novel" else "#3572b0"
        label = html.escape(f"{item['label']} ({item['split'] or '-'})")
        parts.append(
            f'<text x="{left - 6}" y="{y + 11}" text-anchor="end" font-size="11">{label}</text>'
            f'<rect x="{left}" y="{y}" width="{ap * width:.1f}" height="{row - 4}" '
            f'fill="{color}"/><line x1="{left + item["chance_ap"] * width:.1f}" y1="{y - 1}" '
            f'x2="{left + item["chance_ap"] * width:.1f}" y2="{y + row - 3}" stroke="#000"/>'
            f'<text x="{left + width + 4}" y="{y + 11}" font-size="11">{_fmt(item["ap"])}</text>'
        )
    parts.append(
        f'<text x="{left}" y="12" font-size="11">AP (bar) and chance (black tick); '
        "blue: base, orange: novel</text></svg>"
    )
    return "".join(parts)


def _pr_curves(data: EvaluationInput, size: int = 260) -> str:
    """Precision-recall curves of every label with a positive, one panel per type."""
    groups: dict[str, list[int]] = {}
    for j, label in enumerate(data.labels):
        if data.targets[:, j].any():
            groups.setdefault(data.types.get(label, "labels"), []).append(j)
    panels = []
    for kind, columns in sorted(groups.items()):
        lines = []
        for n, j in enumerate(columns):
            precision, recall = precision_recall_curve(data.scores[:, j], data.targets[:, j])
            points = " ".join(
                f"{20 + r * (size - 30):.1f},{size - 20 - p * (size - 30):.1f}"
                for r, p in zip(np.r_[0.0, recall], np.r_[precision[0], precision], strict=True)
            )
            hue = 360 * n / len(columns)
            dash = ' stroke-dasharray="4 2"' if data.labels[j] in data.novel else ""
            lines.append(
                f'<polyline points="{points}" fill="none" stroke="hsl({hue:.0f},70%,45%)"{dash}>'
                f"<title>{html.escape(data.labels[j])}</title></polyline>"
            )
        panels.append(
            f'<figure><svg width="{size}" height="{size}" role="img">'
            f'<rect x="20" y="10" width="{size - 30}" height="{size - 30}" fill="none" '
            f'stroke="#999"/>{"".join(lines)}<text x="20" y="{size - 4}" font-size="10">'
            "recall &#8594;</text></svg><figcaption>"
            f"{html.escape(kind)}: precision vs recall (dashed: novel; hover for the label)"
            "</figcaption></figure>"
        )
    return "".join(panels)


def _reliability_diagram(data: EvaluationInput, size: int = 260) -> str:
    scale = size - 30
    parts = [
        f'<svg width="{size}" height="{size}" role="img"><rect x="20" y="10" width="{scale}" '
        f'height="{scale}" fill="none" stroke="#999"/><line x1="20" y1="{10 + scale}" '
        f'x2="{20 + scale}" y2="10" stroke="#bbb" stroke-dasharray="3 3"/>'
    ]
    bins = reliability_bins(data.scores, data.targets)
    total = sum(n for _, _, n in bins)
    for mean_p, positive, count in bins:
        radius = 2 + 10 * math.sqrt(count / total)
        parts.append(
            f'<circle cx="{20 + mean_p * scale:.1f}" cy="{10 + (1 - positive) * scale:.1f}" '
            f'r="{radius:.1f}" fill="#3572b0" fill-opacity="0.6"><title>{count} pairs, mean p '
            f"{mean_p:.3f}, positive {positive:.3f}</title></circle>"
        )
    parts.append(
        f'<text x="20" y="{size - 4}" font-size="10">predicted probability &#8594;</text></svg>'
    )
    return (
        f"<figure>{''.join(parts)}<figcaption>reliability: fraction positive vs predicted "
        "probability (area: pairs in the bin; diagonal: calibrated)</figcaption></figure>"
    )


def _samples(samples: Sequence[SampleVideo]) -> str:
    cards = []
    for sample in samples:
        strip = np.concatenate(list(sample.frames), axis=1)
        data = base64.b64encode(png_bytes(strip)).decode()
        truth = set(sample.true_labels)
        tags = ", ".join(
            f"<b>{html.escape(label)}</b> {score:.2f}"
            if label in truth
            else f"{html.escape(label)} {score:.2f}"
            for label, score in sample.top_tags
        )
        cards.append(
            f'<div class="sample"><img alt="frames" src="data:image/png;base64,{data}" '
            f'style="image-rendering: pixelated; height: {2 * strip.shape[0]}px">'
            f"<p>{html.escape(sample.video_id)}: truth "
            f"{html.escape(', '.join(sample.true_labels))}<br>top tags (bold: true): {tags}</p>"
            "</div>"
        )
    return "".join(cards)


def html_report(
    title: str, data: EvaluationInput, metrics: dict, samples: Sequence[SampleVideo] = ()
) -> str:
    """A self-contained page: no scripts, no external resources."""
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
        "figure{display:inline-block;margin:0 1em 1em 0}.sample{margin-bottom:1em}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>{_summary_table(metrics)}"
        f"<h2>Average precision per label</h2>{_ap_bars(metrics['per_label'])}"
        f"<h2>Precision-recall and calibration</h2>{_pr_curves(data)}"
        f"{_reliability_diagram(data)}"
        f"<h2>Sample videos</h2>{_samples(samples)}</body></html>"
    )
