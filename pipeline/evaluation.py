"""Evaluate a tagging run against a labeled manifest: metrics JSON + HTML report.

    python jobs/evaluate.py --config C --tags DIR --manifest M --out DIR [--labels VOCAB]
        [--fit-calibration | --calibration VAL_METRICS_JSON]

mAP needs a score for every (video, label) pair, and the tags output keeps the `top_k`
highest-scoring labels of each video: tag with `--set tag.top_k=<vocabulary size>` (or more)
so that `top_k` holds the whole vocabulary. That keeps evaluation on the tagging job's own
output, with no second model load; a run whose `top_k` is shorter is refused with that hint.
Base / novel labels come from `train.base_labels` / `train.novel_labels` of the config (base
defaults to every other label); `--labels` (a vocabulary with a `type` column) adds per-type
metrics.

Other wording: a CSV/TSV vocabulary may have a `means` column naming, per label, the manifest's
label it stands for (e.g. `pants,garment,trouser`). Such a label is scored against the clips
of the label it means, and is base or novel as that label is: a run tagged with your own words
is evaluated against the manifest's labels (configs/moving_fashion/unseen_labels.csv).

Calibration: `--fit-calibration` fits Platt scaling (one scale and bias over all labels) on
the BASE labels of these clips, e.g. the validation split, and records it in metrics.json;
`--calibration <that metrics.json>` applies it to another split (test). With either,
metrics.json also holds the calibrated ECE and precision / recall / F1 at `tag.threshold`
(`calibrated`); mAP is the same with or without. The metric and report code is
`ovml_core.evaluation`; this module reads and joins.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from ovml_core.config import Config
from ovml_core.evaluation import (
    EvaluationInput,
    SampleVideo,
    compute_metrics,
    fit_calibration,
    html_report,
)
from ovml_core.finetune import json_safe
from ovml_core.metrics import PlattScaling
from ovml_core.vocabulary import normalise_label, read_vocabulary
from pipeline.cli import EXIT_OK, job_parser, run_job
from pipeline.decode import decode_video
from pipeline.manifest import read_manifest
from pipeline.parquet_io import read_tags, write_text_atomic

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
SAMPLE_FRAME_SIZE = 64


class EvaluationError(ValueError):
    """The tags and the manifest cannot be evaluated together; the message says why."""


def join_scores(
    tags: pa.Table,
    manifest: pa.Table,
    labels: list[str] | None,
    means: dict[str, str] | None = None,
) -> tuple[EvaluationInput, list[dict], dict[str, int]]:
    """Scores and targets of the manifest's videos that were tagged without error. A label
    named in `means` takes the targets of the manifest label it means.

    Returns (input with empty base/novel, the matching tag rows, counts of skipped videos).
    """
    means = means or {}
    if "labels" not in manifest.column_names:
        raise EvaluationError("the manifest has no 'labels' column: nothing to evaluate against")
    rows = {r["video_id"]: r for r in tags.select(["video_id", "top_k", "error"]).to_pylist()}
    truth = dict(zip(manifest["video_id"].to_pylist(), manifest["labels"].to_pylist(), strict=True))
    missing = [v for v in truth if v not in rows]
    errored = [v for v in truth if v in rows and rows[v]["error"] is not None]
    kept = [v for v in truth if v in rows and rows[v]["error"] is None]
    if not kept:
        raise EvaluationError("no video of the manifest was tagged without error")
    if labels is None:
        labels = sorted({t["label"] for v in kept for t in rows[v]["top_k"]})
    column = {label: j for j, label in enumerate(labels)}
    scores = np.full((len(kept), len(labels)), np.nan)
    targets = np.zeros((len(kept), len(labels)))
    for i, video_id in enumerate(kept):
        for tag in rows[video_id]["top_k"]:
            if tag["label"] in column:
                scores[i, column[tag["label"]]] = tag["score"]
        true_labels = set(truth[video_id] or [])
        for label, j in column.items():
            if means.get(label, label) in true_labels:
                targets[i, j] = 1.0
    unscored = np.isnan(scores).any(axis=1)
    if unscored.any():
        first = kept[int(np.flatnonzero(unscored)[0])]
        raise EvaluationError(
            f"{int(unscored.sum())} videos (e.g. {first}) have no score for some of the "
            f"{len(labels)} labels: mAP needs every label's score. Tag with "
            f"--set tag.top_k={len(labels)} (or larger) so top_k holds the whole vocabulary."
        )
    counts = {"missing": len(missing), "errored": len(errored)}
    data = EvaluationInput(scores, targets, list(labels), [], [])
    return data, [rows[v] | {"labels": truth[v]} for v in kept], counts


def split_labels(
    cfg: Config, labels: list[str], means: dict[str, str] | None = None
) -> tuple[list[str], list[str]]:
    """(base, novel) among `labels`, from train.base_labels / train.novel_labels; a label in
    `means` is base or novel as the label it means is."""
    means = means or {}
    meaning = {label: means.get(label, label) for label in labels}
    novel_set = set(cfg.train.novel_labels or [])
    novel = [label for label in labels if meaning[label] in novel_set]
    if cfg.train.base_labels is not None:
        base_set = set(cfg.train.base_labels)
        base = [label for label in labels if meaning[label] in base_set]
    else:
        base = [label for label in labels if label not in novel]
    return base, novel


def read_label_meanings(path: str) -> dict[str, str]:
    """label -> the manifest label it means, from a CSV/TSV vocabulary's `means` column ({}
    without one). Both sides normalised as vocabulary labels are."""
    if Path(path).suffix.lower() not in (".csv", ".tsv"):
        return {}
    delimiter = "\t" if Path(path).suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter=delimiter))
    if not rows or "means" not in rows[0]:
        return {}
    meanings = {}
    for row in rows:
        label, meant = normalise_label(row["label"] or ""), normalise_label(row["means"] or "")
        if label and meant:
            meanings[label] = meant
    return meanings


def read_calibration(metrics_path: str) -> PlattScaling:
    """The Platt scaling an earlier evaluation fit and recorded (`--fit-calibration`)."""
    try:
        fitted = json.loads(Path(metrics_path).read_text())["calibrated"]
        return PlattScaling(float(fitted["scale"]), float(fitted["bias"]))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise EvaluationError(
            f"--calibration {metrics_path}: no recorded calibration there ({err!r}); evaluate "
            "the validation split with --fit-calibration first"
        ) from err


def sample_videos(
    cfg: Config, manifest: pa.Table, rows: list[dict], count: int
) -> list[SampleVideo]:
    uris = dict(zip(manifest["video_id"].to_pylist(), manifest["uri"].to_pylist(), strict=True))
    samples = []
    for row in rows[:count]:
        decoded = decode_video(
            {"uri": uris[row["video_id"]]},
            num_frames=cfg.model.num_frames,
            size=SAMPLE_FRAME_SIZE,
            limits=cfg.video,
            allowed_schemes=cfg.tag.allowed_schemes,
        )
        if decoded["error"] is None:
            top = [(t["label"], t["score"]) for t in row["top_k"][:5]]
            samples.append(SampleVideo(row["video_id"], decoded["frames"], row["labels"], top))
    return samples


def run_evaluation(
    cfg: Config,
    tags_dir: str,
    manifest_path: str,
    out: str,
    vocabulary: str | None = None,
    num_samples: int = 6,
    title: str = "ovml evaluation",
    calibration: PlattScaling | None = None,
    fit: bool = False,
) -> dict:
    """metrics.json and report.html of a tagging run. `fit`: fit the calibration on these
    clips' base labels (a validation split); else apply `calibration` when given."""
    if fit and calibration is not None:
        raise EvaluationError("fit a calibration or apply one, not both")
    tags = read_tags(tags_dir)
    if tags is None:
        raise EvaluationError(f"--tags {tags_dir}: no tag part files there")
    manifest = read_manifest(manifest_path, allowed_schemes=cfg.tag.allowed_schemes)
    types: dict[str, str] = {}
    labels, means = None, {}
    if vocabulary is not None:
        entries = read_vocabulary(vocabulary).entries
        labels = [e.label for e in entries]
        types = {e.label: e.type for e in entries if e.type}
        means = read_label_meanings(vocabulary)
    data, rows, counts = join_scores(tags, manifest, labels, means)
    data.base, data.novel = split_labels(cfg, data.labels, means)
    data.types = types
    if fit:
        try:
            calibration = fit_calibration(data)
        except ValueError as err:
            raise EvaluationError(f"--fit-calibration: {err}") from err
    metrics = {**compute_metrics(data, calibration, cfg.tag.threshold), **counts}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(str(out_dir / METRICS_FILE), json.dumps(json_safe(metrics), indent=1) + "\n")
    samples = sample_videos(cfg, manifest, rows, num_samples)
    write_text_atomic(str(out_dir / REPORT_FILE), html_report(title, data, metrics, samples))
    logger.info("wrote %s and %s", out_dir / METRICS_FILE, out_dir / REPORT_FILE)
    return metrics


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(
        "ovml eval",
        "mAP (base / novel / harmonic mean, per label type), ECE and an HTML report for a "
        "tagging run. Tag with --set tag.top_k=<vocabulary size> first.",
        "train.novel_labels=[a,b]",
    )
    parser.add_argument("--tags", required=True, help="output directory of the tagging job")
    parser.add_argument("--manifest", required=True, help="manifest with a 'labels' column")
    parser.add_argument("--out", required=True, help="folder for metrics.json and report.html")
    parser.add_argument("--labels", help="the tagging vocabulary; its 'type' column groups labels")
    calibration = parser.add_mutually_exclusive_group()
    calibration.add_argument(
        "--fit-calibration",
        action="store_true",
        help="fit Platt scaling on these clips' base labels (use on the validation split)",
    )
    calibration.add_argument(
        "--calibration",
        metavar="METRICS_JSON",
        help="apply the calibration recorded in this metrics.json (val's, when evaluating test)",
    )
    parser.add_argument("--samples", type=int, default=6, help="sample videos in the report")
    parser.add_argument("--title", default="ovml evaluation")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        cfg = Config.from_yaml(args.config, args.overrides)
        calibration = read_calibration(args.calibration) if args.calibration else None
        metrics = run_evaluation(
            cfg,
            args.tags,
            args.manifest,
            args.out,
            args.labels,
            args.samples,
            args.title,
            calibration=calibration,
            fit=args.fit_calibration,
        )
        keys = ("map", "map_base", "map_novel", "harmonic_mean", "ece")
        summary = {k: metrics[k] for k in keys}
        if "calibrated" in metrics:
            summary["calibrated"] = metrics["calibrated"]
        print(json.dumps(json_safe({**summary, "by_type": metrics["by_type"]})))
        print(f"report: {Path(args.out) / REPORT_FILE}")
        return EXIT_OK

    return run_job(body, usage_errors=(EvaluationError,))
