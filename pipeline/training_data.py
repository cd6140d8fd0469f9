"""Training data as Ray Data plans: manifest rows -> decoded clips with 0/1 label targets.

    manifest (driver, pyarrow) -> multi_hot (targets over a fixed vocabulary; other labels,
    e.g. novel ones, are dropped) -> decode_video (CPU tasks) -> decoded_examples (frames and
    targets of the videos that decoded)

Kept apart from `pipeline.training` so that Ray Data tasks import numpy/pyarrow and the decode
step only, not the model stack.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from ovml_core.config import Config, ConfigError
from pipeline.decode import decode_video
from pipeline.manifest import read_manifest
from pipeline.resources import task_blocks, training_decode_cpus

logger = logging.getLogger(__name__)


@dataclass
class TrainingPlan:
    """What the driver works out before any worker starts."""

    datasets: dict[str, ray.data.Dataset]
    base_labels: list[str]
    novel_labels: list[str]
    steps_per_epoch: int  # optimizer steps per epoch, from the manifest row count


def plan_training(cfg: Config, image_size: int) -> TrainingPlan:
    """Read the manifests, fix the vocabularies and build the lazy train/val datasets of clips
    decoded at `image_size`."""
    train = cfg.train
    if not train.train_manifest:
        raise ConfigError("train.train_manifest: required to train")
    train_rows = _split_rows(_read_labeled(train.train_manifest, cfg, "train_manifest"), "train")
    if train.val_manifest:
        val_rows = _split_rows(_read_labeled(train.val_manifest, cfg, "val_manifest"), "val")
    elif "split" in train_rows.column_names:
        val_rows = _split_rows(_read_labeled(train.train_manifest, cfg, "train_manifest"), "val")
    else:
        val_rows = None
    novel = list(train.novel_labels or [])
    base = _base_labels(train_rows, train.base_labels, novel)
    rows_per_worker = train_rows.num_rows // train.num_workers  # the split is equal
    if rows_per_worker == 0:
        raise ConfigError(
            f"train.num_workers: {train.num_workers} workers but only "
            f"{train_rows.num_rows} training videos"
        )
    batches = math.ceil(rows_per_worker / train.batch_size)
    datasets = {
        "train": labeled_examples(train_rows, base, cfg, image_size, shuffle_seed=train.seed)
    }
    if val_rows is not None and val_rows.num_rows:
        datasets["val"] = labeled_examples(val_rows, base + novel, cfg, image_size)
    else:
        logger.warning("no validation videos (train.val_manifest, or split=val rows): no mAP")
    return TrainingPlan(datasets, base, novel, math.ceil(batches / train.grad_accum))


def _read_labeled(source: str, cfg: Config, field: str) -> pa.Table:
    table = read_manifest(source, allowed_schemes=cfg.tag.allowed_schemes)
    if "labels" not in table.column_names:
        raise ConfigError(f"train.{field}: {source} has no 'labels' column")
    return table


def _split_rows(table: pa.Table, split: str) -> pa.Table:
    """Rows of `split` when the manifest has a `split` column; all rows otherwise."""
    if "split" not in table.column_names:
        return table
    return table.filter(pc.equal(table["split"], split))


def _base_labels(rows: pa.Table, configured: list[str] | None, novel: list[str]) -> list[str]:
    """`train.base_labels`, or every training label that is not novel (sorted)."""
    if configured is not None:
        base = list(configured)
    else:
        seen = pc.unique(pc.list_flatten(rows["labels"])).drop_null().to_pylist()
        base = sorted(set(seen) - set(novel))
    overlap = sorted(set(base) & set(novel))
    if overlap:
        raise ConfigError(f"train.novel_labels: {overlap[:5]} are also base labels")
    if not base:
        raise ConfigError("train.base_labels: no base labels to train on")
    return base


def labeled_examples(
    rows: pa.Table,
    vocabulary: list[str],
    cfg: Config,
    image_size: int,
    shuffle_seed: int | None = None,
) -> ray.data.Dataset:
    """Rows with `frames` uint8 [T, S, S, 3] and `targets` float32 [len(vocabulary)]."""
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(rows.num_rows)
        rows = rows.take(pa.array(order))
    # About one decode task per training batch keeps the decode CPUs busy.
    ds = task_blocks(rows.select(["video_id", "uri", "labels"]), cfg.train.batch_size)
    if shuffle_seed is not None:
        ds = ds.randomize_block_order()  # a new block order every epoch
    return (
        ds.map_batches(multi_hot, fn_kwargs={"vocabulary": vocabulary}, batch_format="pyarrow")
        .map(
            decode_video,
            fn_kwargs={
                "num_frames": cfg.model.num_frames,
                "size": image_size,
                "limits": cfg.video,
                "allowed_schemes": cfg.tag.allowed_schemes,
            },
            num_cpus=training_decode_cpus(cfg),
        )
        .map_batches(decoded_examples, batch_format="numpy")
    )


def multi_hot(batch: pa.Table, vocabulary: list[str]) -> dict[str, np.ndarray]:
    """`labels` -> `targets` 0/1 over `vocabulary`; labels outside it are dropped here, so
    novel labels never reach the training loss."""
    column = {label: j for j, label in enumerate(vocabulary)}
    targets = np.zeros((batch.num_rows, len(vocabulary)), np.float32)
    for i, labels in enumerate(batch["labels"].to_pylist()):
        for label in labels or []:
            if label in column:
                targets[i, column[label]] = 1.0
    return {
        "video_id": batch["video_id"].to_numpy(zero_copy_only=False),
        "uri": batch["uri"].to_numpy(zero_copy_only=False),
        "targets": targets,
    }


def decoded_examples(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep what training reads (frames, targets) of the videos that decoded."""
    # An error is a message; a column of only nulls reaches numpy as NaN, not None.
    ok = np.array([not isinstance(error, str) for error in batch["error"]], dtype=bool)
    for video_id, error in zip(batch["video_id"][~ok], batch["error"][~ok], strict=True):
        logger.warning("training video %s skipped: %s", video_id, error)
    return {"frames": batch["frames"][ok], "targets": batch["targets"][ok]}
