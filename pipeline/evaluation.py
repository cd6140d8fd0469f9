"""Evaluate a tagging run against a labeled manifest: metrics JSON + HTML report.

    python jobs/evaluate.py --config C --tags DIR --manifest M --out DIR [--labels VOCAB]

mAP needs a score for every (video, label) pair, and the tags output keeps the `top_k`
highest-scoring labels of each video: tag with `--set tag.top_k=<vocabulary size>` (or more)
so that `top_k` holds the whole vocabulary. That keeps evaluation on the tagging job's own
output, with no second model load; a run whose `top_k` is shorter is refused with that hint.
Base / novel labels come from `train.base_labels` / `train.novel_labels` of the config (base
defaults to every other label); `--labels` (a vocabulary with a `type` column) adds per-type
metrics. The metric and report code is `ovml_core.evaluation`; this module reads and joins.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from ovml_core.config import Config, ConfigError
from ovml_core.evaluation import EvaluationInput, SampleVideo, compute_metrics, html_report
from ovml_core.finetune import json_safe
from ovml_core.vocabulary import VocabularyError, read_vocabulary
from pipeline.cli import job_parser, log_to_console
from pipeline.decode import decode_video
from pipeline.manifest import read_manifest
from pipeline.parquet_io import read_tags, write_text_atomic

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
SAMPLE_FRAME_SIZE = 64
EXIT_OK, EXIT_CONFIG = 0, 2


class EvaluationError(ValueError):
    """The tags and the manifest cannot be evaluated together; the message says why."""


def join_scores(
    tags: pa.Table, manifest: pa.Table, labels: list[str] | None
) -> tuple[EvaluationInput, list[dict], dict[str, int]]:
    """Scores and targets of the manifest's videos that were tagged without error.

    Returns (input with empty base/novel, the matching tag rows, counts of skipped videos).
    """
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
        for label in truth[video_id] or []:
            if label in column:
                targets[i, column[label]] = 1.0
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


def split_labels(cfg: Config, labels: list[str]) -> tuple[list[str], list[str]]:
    """(base, novel) among `labels`, from train.base_labels / train.novel_labels."""
    novel = [label for label in cfg.train.novel_labels or [] if label in labels]
    if cfg.train.base_labels is not None:
        base = [label for label in cfg.train.base_labels if label in labels]
    else:
        base = [label for label in labels if label not in novel]
    return base, novel


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
) -> dict:
    tags = read_tags(tags_dir)
    if tags is None:
        raise EvaluationError(f"--tags {tags_dir}: no tag part files there")
    manifest = read_manifest(manifest_path, allowed_schemes=cfg.tag.allowed_schemes)
    types: dict[str, str] = {}
    labels = None
    if vocabulary is not None:
        entries = read_vocabulary(vocabulary).entries
        labels = [e.label for e in entries]
        types = {e.label: e.type for e in entries if e.type}
    data, rows, counts = join_scores(tags, manifest, labels)
    data.base, data.novel = split_labels(cfg, data.labels)
    data.types = types
    metrics = {**compute_metrics(data), **counts}
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
    parser.add_argument("--samples", type=int, default=6, help="sample videos in the report")
    parser.add_argument("--title", default="ovml evaluation")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_to_console()
    try:
        cfg = Config.from_yaml(args.config, args.overrides)
        metrics = run_evaluation(
            cfg, args.tags, args.manifest, args.out, args.labels, args.samples, args.title
        )
    except (ConfigError, EvaluationError, VocabularyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    summary = {k: metrics[k] for k in ("map", "map_base", "map_novel", "harmonic_mean", "ece")}
    print(json.dumps(json_safe({**summary, "by_type": metrics["by_type"]})))
    print(f"report: {Path(args.out) / REPORT_FILE}")
    return EXIT_OK
