"""The tagging job as Ray Data plans: manifest -> decode -> encode + score -> Parquet tags.

    manifest (driver, pyarrow; one metadata call per video file: size, mtime)
      sorts each video: encode | re-score | skip (`pending_videos`)
    encode:
      -> decode_video   (Ray tasks, tag.decode_num_cpus each)        uint8 [T, S, S, 3]
      -> VideoTagger    (actor pool; the model and label bank load once per actor,
                         GPU + bf16 autocast by tag.device; uint8 clips go
                         to the device from pinned memory and are preprocessed there)
    CPUs per stage: `size_stages` times both stages on two videos on the driver; on a CPU node
    the encode actors then hold the share of the cores encoding takes, decode the rest. On CPU
    on a lone node (tag.encode_in) one VideoTagger runs in the driver instead, on its model.
    re-score:
      stored rows -> rescore_batch (Ray tasks: stored embedding x label bank, no decode)
    With tag.segment_s > 0 each video is S windows (`ovml_core.video.segment_windows`) of one
    clip each: decode gives [S, T, S, S, 3], the encoder sees the batch's windows as clips, and
    rows carry `segments` (their tags and embeddings; the video's tags are the max over them,
    `pipeline.segments`); re-scoring re-scores the stored segment embeddings too.
    both -> PartFileDatasink (atomic part files of this run in the output directory)

Nightly semantics, per video of the manifest, against its current row (`parquet_io.read_tags`):
no row, an error row (retried by default, `tag.retry_errors`), another model's row, or a row for
another file (uri, size or mtime differ) -> decode + encode; the same model and file but another
`vocabulary_fingerprint` (labels, threshold, top_k) -> re-scored from the stored embedding;
otherwise skipped. So after any run every current row is scored against that run's vocabulary.
A row encoded with another tag.segment_s is encoded again (its segments would differ).
Rows without an embedding (tag.emit_embedding off, or written by older versions) are encoded
again instead of re-scored. A new row supersedes the old one because it belongs to a later run.
A run killed half-way leaves only complete part files; the next run does the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from ovml_core.checkpoint import load_checkpoint, model_fingerprint
from ovml_core.config import Config, ConfigError, ModelConfig, TagConfig
from ovml_core.label_embedder import LabelEmbedder, load_vocabulary
from ovml_core.model import OVMLModel, as_stored, create_model
from pipeline.cli import EXIT_FAILED, EXIT_OK, job_parser, run_job
from pipeline.manifest import Filesystems, read_manifest, resolve, source_stats
from pipeline.parquet_io import (
    INDEX_COLUMNS,
    TAG_LIST,
    TAG_STRUCT,
    PartFileDatasink,
    new_run_id,
    read_label_bank,
    read_parts,
    read_tags,
    tags_schema,
)
from pipeline.progress import watch_plan
from pipeline.remote_checkpoint import local_checkpoint
from pipeline.resources import (
    WRITE_NUM_CPUS,
    TagSizing,
    actor_device,
    encode_in_driver,
    gpus_per_actor,
    init_ray,
    max_cluster_resources,
    size_tagging,
    task_blocks,
)
from pipeline.segments import (
    max_per_video,
    mean_embedding,
    segments_array,
    stored_embeddings,
    stored_segments,
)
from pipeline.stage_meter import (
    COST_PROBE_VIDEOS,
    StageCosts,
    StageRecorder,
    StageReport,
    decode_video_timed,
    measure_stage_costs,
    stage_report,
    start_meter,
)

logger = logging.getLogger(__name__)

DECODE_TASKS_PER_WORKER = 200


@dataclass(frozen=True)
class ModelSource:
    """What an actor needs to build the model itself (a model object never travels via Ray)."""

    config: ModelConfig
    checkpoint: str | None = None  # a local directory or s3:// / gs://; None = untrained model
    filesystems: Filesystems | None = None  # for a remote checkpoint (else from the environment)

    def load(self, device: str = "cpu") -> OVMLModel:
        if self.checkpoint is None:
            return create_model(self.config, device)
        return load_checkpoint(local_checkpoint(self.checkpoint, self.filesystems), device)


@dataclass
class LabelBank:
    labels: list[str]
    embeddings: np.ndarray  # float32 [L, D], L2-normalised


def label_bank_from_vocabulary(model: OVMLModel, path: str) -> LabelBank:
    """Embed a vocabulary file in-process, exactly as the label bank job would (hf backend)."""
    vocabulary = load_vocabulary(path, model)
    embeddings, _ = LabelEmbedder(model).embed(vocabulary.labels)
    return LabelBank(vocabulary.labels, embeddings)


def label_bank_from_file(
    path: str, fingerprint: str, filesystems: Filesystems | None = None
) -> LabelBank:
    """A Parquet label bank, refused unless it was built by this very model."""
    try:
        labels, embeddings, fingerprints = read_label_bank(path, filesystems)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise ConfigError(f"--label-bank {path}: unreadable ({err})") from err
    if fingerprints != [fingerprint]:
        raise ConfigError(
            f"--label-bank {path}: built for model fingerprint(s) {', '.join(fingerprints)}, "
            f"but the model has fingerprint {fingerprint}; rebuild the bank with "
            "jobs/build_label_bank.py for this model or pass the matching --checkpoint"
        )
    if not labels:
        raise ConfigError(f"--label-bank {path}: no labels")
    return LabelBank(labels, embeddings)


def vocabulary_fingerprint(labels: list[str], model: str, threshold: float, top_k: int) -> str:
    """What a row's tags mean: the labels in scoring order, the model that embedded them, the
    threshold and top_k. Rows with another value are re-scored (or re-tagged) by the next run."""
    facts = {"labels": labels, "model": model, "threshold": threshold, "top_k": top_k}
    return hashlib.sha256(json.dumps(facts, ensure_ascii=False).encode()).hexdigest()[:16]


def rank_tags(
    probabilities: np.ndarray, labels: list[str] | pa.Array, threshold: float, top_k: int
) -> tuple[pa.ListArray, pa.ListArray]:
    """Per video (row): the labels with probability >= threshold, and the top_k labels, each
    highest first, equal scores in label order; list<struct<label, score>> arrays.

    Vectorised over the whole [B, L] matrix (no Python loop per row or label): the top k by
    a partition, not a full sort, so 10,000 labels cost O(L) per video."""
    probabilities = np.asarray(probabilities, np.float32)
    names = labels if isinstance(labels, pa.Array) else pa.array(labels, pa.string())
    rows, cols = np.nonzero(probabilities >= threshold)  # row-major: label order within a row
    tags = _tag_lists(probabilities, names, rows, cols)
    k = min(top_k, probabilities.shape[1])
    chosen = _top_k_mask(probabilities, k)
    rows, cols = np.nonzero(chosen)
    return tags, _tag_lists(probabilities, names, rows, cols)


def _top_k_mask(probabilities: np.ndarray, k: int) -> np.ndarray:
    """[B, L] bool, exactly k per row: the k highest; of equal scores at the cut, the first."""
    batch, num_labels = probabilities.shape
    if k == 0:
        return np.zeros_like(probabilities, dtype=bool)
    if k >= num_labels:
        return np.ones_like(probabilities, dtype=bool)
    kth = -np.partition(-probabilities, k - 1, axis=1)[:, k - 1 : k]  # k-th highest per row
    above = probabilities > kth
    at_cut = probabilities == kth
    room = k - above.sum(axis=1, keepdims=True)
    return above | (at_cut & (np.cumsum(at_cut, axis=1) <= room))


def _tag_lists(
    probabilities: np.ndarray, names: pa.Array, rows: np.ndarray, cols: np.ndarray
) -> pa.ListArray:
    """list<struct<label, score>> per row from the chosen (row, col) pairs, given row-major."""
    scores = probabilities[rows, cols]
    order = np.lexsort((-scores, rows))  # stable: equal scores keep label order
    rows, cols, scores = rows[order], cols[order], scores[order]
    counts = np.bincount(rows, minlength=probabilities.shape[0])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    values = pa.StructArray.from_arrays(
        [names.take(pa.array(cols, pa.int64())), pa.array(scores, pa.float32())],
        fields=list(TAG_STRUCT),
    )
    return pa.ListArray.from_arrays(pa.array(offsets), values, type=TAG_LIST)


@dataclass(frozen=True)
class ScoreHead:
    """The model's scoring head as two numbers: what re-scoring needs besides the embeddings."""

    logit_scale: float  # exp(model.logit_scale)
    logit_bias: float

    @classmethod
    def of(cls, model: OVMLModel) -> ScoreHead:
        return cls(float(model.logit_scale.detach().exp()), float(model.logit_bias.detach()))

    def score(self, video: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`OVMLModel.score`, float32, from embeddings alone."""
        scale = torch.tensor(self.logit_scale, dtype=torch.float32)
        return torch.sigmoid(scale * video @ labels.T + self.logit_bias)


class VideoTagger:
    """Encode + score for `map_batches`: one instance per actor, model and labels loaded once;
    or one in the driver (tag.encode_in), given the driver's `model`."""

    def __init__(
        self,
        source: ModelSource,
        bank: LabelBank,
        fingerprint: str,
        vocabulary_fingerprint: str,
        run_id: str,
        tag: TagConfig,
        num_gpus: float = 0.0,
        meter: ray.actor.ActorHandle | StageRecorder | None = None,
        torch_threads: int = 1,
        model: OVMLModel | None = None,
    ):
        started = time.perf_counter()
        # Ray sets OMP_NUM_THREADS per worker; torch's own pool is sized here, explicitly.
        torch.set_num_threads(torch_threads)
        self.device = actor_device(num_gpus)
        self.model = source.load(self.device) if model is None else model
        actual = model_fingerprint(self.model)
        if actual != fingerprint:
            raise RuntimeError(
                f"actor built model {actual}, the driver planned for {fingerprint}: "
                "workers must see the same checkpoint and library versions"
            )
        self.labels = bank.labels
        self.label_embeddings = torch.tensor(bank.embeddings, device=self.device)
        self.fingerprint, self.run_id, self.tag = fingerprint, run_id, tag
        self.vocabulary_fingerprint = vocabulary_fingerprint
        dim = bank.embeddings.shape[1] if tag.emit_embedding else None
        self.schema = tags_schema(dim)
        self.meter = meter
        if tag.compile:
            # In place: parameter names, and so the fingerprint, stay the eager model's.
            self.model.visual.compile(dynamic=False)
        self._record("loaded", time.perf_counter() - started)

    def _record(self, what: str, *args) -> None:
        """Report to the meter: a call in the driver, a waited-for actor call in an actor (~1 ms
        a batch: the driver reads the totals once the last batch has returned, and a call still
        in flight when the pool is torn down would be lost)."""
        if isinstance(self.meter, StageRecorder):
            getattr(self.meter, what)(*args)
        elif self.meter is not None:
            ray.get(getattr(self.meter, what).remote(*args))

    def _autocast(self):
        if self.device == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _host_batch(self, clips: list[np.ndarray]) -> torch.Tensor:
        """`clips` (uint8 [T, H, W, 3] each), gathered straight into pinned memory on CUDA so
        the copy to the device runs async; padded to tag.batch_size when compiled (one graph,
        no recompiles for short batches)."""
        n = len(clips)
        rows = max(n, self.tag.batch_size) if self.tag.compile else n
        pinned = self.device == "cuda"
        host = torch.empty((rows, *clips[0].shape), dtype=torch.uint8, pin_memory=pinned)
        np.stack(clips, out=host.numpy()[:n])
        host[n:] = 0
        return host

    def _encode(self, frames: np.ndarray, counts: np.ndarray) -> torch.Tensor:
        """float32 [N, D], as stored: the embeddings of the first counts[i] clips of each row i,
        in row order, tag.batch_size clips per forward pass (long videos bring many)."""
        clips = [c for row, n in zip(frames, counts, strict=True) if n for c in _clips(row)[:n]]
        size, out = self.tag.batch_size, []
        for start in range(0, len(clips), size):
            chunk = clips[start : start + size]
            with self._autocast():
                video = self.model.encode_video(self._host_batch(chunk))
            out.append(as_stored(video[: len(chunk)].float()))
        return torch.cat(out)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        started = time.perf_counter()
        table, clips = self._tag(batch)
        decode_s = float(np.sum(batch["decode_s"]))
        self._record("add", len(table), clips, decode_s, time.perf_counter() - started, self.device)
        return table

    def _tag(self, batch: dict[str, np.ndarray]) -> tuple[pa.Table, int]:
        """(tag rows of the batch, clips encoded for them)."""
        # A column that is null in the whole batch arrives as float NaN, not None.
        errors = [e if isinstance(e, str) else None for e in batch["error"]]
        ok = np.array([e is None for e in errors], dtype=bool)
        rows = len(ok)
        # Clips per row: its windows (one without tag.segment_s), none for an error row.
        frames = batch["frames"]
        counts = np.array([len(_clips(f)) if k else 0 for f, k in zip(frames, ok, strict=True)])
        tags = top_k = pa.nulls(rows, TAG_LIST)
        segments = pa.nulls(rows, self.schema.field("segments").type)
        embeddings = np.zeros((rows, self.label_embeddings.shape[1]), np.float16)
        if ok.any():
            with torch.inference_mode():
                clips = self._encode(frames, counts)
                # Scores in float32 (bf16 would blur probabilities near the threshold), from
                # the embedding as stored.
                probabilities = self.model.score(clips, self.label_embeddings).cpu().numpy()
            clips = clips.cpu().numpy()
            ranked = rank_tags(
                max_per_video(probabilities, counts[ok]),
                self.labels,
                self.tag.threshold,
                self.tag.top_k,
            )
            tags, top_k = (_scatter(column, ok) for column in ranked)
            embeddings[ok] = mean_embedding(clips, counts[ok])
            if self.tag.segment_s > 0:
                segments = self._segments(batch["segment_bounds"], counts, probabilities, clips)
        columns = {
            "video_id": batch["video_id"].tolist(),
            "uri": batch["uri"].tolist(),
            "tags": tags,
            "top_k": top_k,
            "num_frames": _where(ok, batch["num_frames"], int),
            "duration_s": _where(ok, batch["duration_s"], float),
            "sampling": _optional(batch["sampling"], str),
            "error": errors,
            "error_kind": _optional(batch["error_kind"], str),
            "model_fingerprint": [self.fingerprint] * rows,
            "vocabulary_fingerprint": [self.vocabulary_fingerprint] * rows,
            "segments": segments,
            "segment_s": [float(self.tag.segment_s)] * rows,
            "source_size": _optional(batch["source_size"], int),
            "source_mtime": _optional(batch["source_mtime"], str),
            "run_id": [self.run_id] * rows,
        }
        if "embedding" in self.schema.names:
            dim = embeddings.shape[1]
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(
                pa.array(embeddings.reshape(-1)), dim, mask=pa.array(~ok)
            )
        table = pa.table({name: columns[name] for name in self.schema.names}, schema=self.schema)
        return table, int(counts.sum())

    def _segments(
        self, bounds: np.ndarray, counts: np.ndarray, probabilities: np.ndarray, clips: np.ndarray
    ) -> pa.ListArray:
        """The `segments` column: each window's bounds, tags, top_k and stored embedding."""
        kept = [
            np.asarray(b, np.float64).reshape(-1, 2)
            for b, n in zip(bounds, counts, strict=True)
            if n
        ]
        ranked = rank_tags(probabilities, self.labels, self.tag.threshold, self.tag.top_k)
        kind = self.schema.field("segments").type
        return segments_array(counts, np.concatenate(kept), *ranked, clips, kind)


def _clips(frames: np.ndarray) -> np.ndarray:
    """A decoded row's frames as clips [S, T, H, W, 3] ([T, H, W, 3] is one clip)."""
    frames = np.asarray(frames)
    return frames.reshape(-1, *frames.shape[-4:])


def _scatter(values: pa.Array, ok: np.ndarray) -> pa.Array:
    """`values` (one per ok row) spread over all rows, null where not ok."""
    position = np.where(ok, np.cumsum(ok) - 1, len(values))
    padded = pa.concat_arrays([values, pa.nulls(1, values.type)])
    return padded.take(pa.array(position, pa.int64()))


def _where(ok: np.ndarray, values: np.ndarray, kind: type) -> list:
    """`values` as Python numbers where ok, None elsewhere (error rows carry no video meta)."""
    return [kind(v) if k else None for v, k in zip(values, ok, strict=True)]


def _optional(values: np.ndarray, kind: type) -> list:
    """A nullable column of a numpy batch as Python values (nulls arrive as None or NaN, of
    float32 when the whole batch is null)."""
    nan = (float, np.floating)
    return [None if v is None or (isinstance(v, nan) and np.isnan(v)) else kind(v) for v in values]


@dataclass
class Pending:
    """What a run does with the videos of its manifest."""

    encode: pa.Table  # manifest rows (video_id, uri, source_size, source_mtime) to decode + encode
    rescore: list[str]  # video_ids whose stored embedding gets this run's vocabulary
    skipped: int  # unchanged: same file, model and vocabulary (or an error row not retried)


def pending_videos(
    manifest: pa.Table,
    current: pa.Table | None,
    fingerprint: str,
    vocabulary: str,
    *,
    retry_errors: bool = True,
    segment_s: float = 0.0,
) -> Pending:
    """Sort the manifest's videos by what they need from the model with `fingerprint` and the
    vocabulary with fingerprint `vocabulary`.

    `manifest` has video_id, uri, source_size, source_mtime; `current` the output's current
    rows (INDEX_COLUMNS). A video is encoded when it has no current row, an error row (with
    retry_errors; a permanent error only once its file changed), another model's row, a row
    encoded with another tag.segment_s (rows of older versions count as 0, off), or a row for
    another file (uri, size or mtime differ, or unknown: rows of older versions).
    Otherwise it is re-scored when its vocabulary differs, and skipped when not.
    """
    stored = {}
    if current is not None:
        for row in current.to_pylist():
            stored[row["video_id"]] = row
    encode, rescore = [], []
    for i, video in enumerate(manifest.select(["video_id", *SOURCE_COLUMNS]).to_pylist()):
        row = stored.get(video["video_id"])
        if row is not None and row["error"] is not None:
            permanent = row["error_kind"] == "permanent" and _same_file(row, video)
            need = "encode" if retry_errors and not permanent else "skip"
        elif (
            row is None
            or row["model_fingerprint"] != fingerprint
            or (row.get("segment_s") or 0.0) != segment_s
            or not _same_file(row, video)
        ):
            need = "encode"
        else:
            need = "skip" if row["vocabulary_fingerprint"] == vocabulary else "rescore"
        if need == "encode":
            encode.append(i)
        elif need == "rescore":
            rescore.append(video["video_id"])
    return Pending(
        manifest.take(pa.array(encode, pa.int64())),
        rescore,
        manifest.num_rows - len(encode) - len(rescore),
    )


SOURCE_COLUMNS = ["uri", "source_size", "source_mtime"]


def _same_file(row: dict, video: dict) -> bool:
    known = row["source_size"] is not None and video["source_size"] is not None
    return known and all(row[c] == video[c] for c in SOURCE_COLUMNS)


def stored_rows(
    out: str, video_ids: list[str], filesystems: Filesystems | None = None
) -> tuple[pa.Table, list[str]]:
    """(current rows of `video_ids` that hold an embedding, ids of those that do not: written
    with tag.emit_embedding off, so they must be encoded again)."""
    current = read_tags(out, filesystems=filesystems)
    wanted = current.filter(pc.is_in(current["video_id"], pa.array(video_ids, pa.string())))
    if "embedding" not in wanted.column_names:
        return wanted.slice(0, 0), wanted["video_id"].to_pylist()
    has = pc.is_valid(wanted["embedding"])
    return wanted.filter(has), wanted.filter(pc.invert(has))["video_id"].to_pylist()


def rescore_batch(
    batch: pa.Table,
    *,
    labels: pa.Array,
    label_embeddings: np.ndarray,
    head: ScoreHead,
    vocabulary_fingerprint: str,
    run_id: str,
    tag: TagConfig,
    schema: pa.Schema,
) -> pa.Table:
    """Stored rows with new tags, top_k, vocabulary_fingerprint and run_id: a matrix product
    with the label bank, no video decoded. Stored segments are re-scored the same way, and a
    row's tags are then the max over its segments, as when it was encoded. Everything else
    (embedding, segment bounds and embeddings, num_frames, source_*) is carried over."""
    dim = label_embeddings.shape[1]
    bank = torch.from_numpy(label_embeddings)
    stored = batch["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    video = torch.from_numpy(stored.astype(np.float32).reshape(-1, dim))
    with torch.inference_mode():
        probabilities = head.score(video, bank).numpy()
    rows = batch.num_rows
    new = {
        "vocabulary_fingerprint": pa.array([vocabulary_fingerprint] * rows, pa.string()),
        "run_id": pa.array([run_id] * rows, pa.string()),
    }
    if "segments" in schema.names and "segments" in batch.column_names:
        counts, bounds, values = stored_segments(batch["segments"])
        if counts.any():
            clips = stored_embeddings(values, dim)
            with torch.inference_mode():
                clip_probabilities = head.score(torch.from_numpy(clips), bank).numpy()
            has = counts > 0
            probabilities[has] = max_per_video(clip_probabilities, counts[has])
            ranked = rank_tags(clip_probabilities, labels, tag.threshold, tag.top_k)
            kind = schema.field("segments").type
            new["segments"] = segments_array(counts, bounds, *ranked, clips, kind)
    new["tags"], new["top_k"] = rank_tags(probabilities, labels, tag.threshold, tag.top_k)
    old = dict(zip(batch.column_names, batch.columns, strict=True))
    # Columns the stored rows predate (segments, segment_s of older versions) stay null.
    columns = [new.get(f.name, old.get(f.name, pa.nulls(rows, f.type))) for f in schema]
    return pa.Table.from_arrays(columns, names=schema.names).cast(schema)


def build_rescore_plan(
    rows: pa.Table,
    bank: LabelBank,
    head: ScoreHead,
    *,
    vocabulary_fingerprint: str,
    run_id: str,
    tag: TagConfig,
    schema: pa.Schema,
) -> ray.data.Dataset:
    """The lazy Dataset of re-scored tag rows for stored `rows` (CPU tasks, no actors: the
    work is a [B, D] x [D, L] product per batch)."""
    return task_blocks(rows, tag.rescore_batch_size).map_batches(
        rescore_batch,
        fn_kwargs={
            "labels": pa.array(bank.labels, pa.string()),
            "label_embeddings": np.ascontiguousarray(bank.embeddings, np.float32),
            "head": head,
            "vocabulary_fingerprint": vocabulary_fingerprint,
            "run_id": run_id,
            "tag": tag,
            "schema": schema,
        },
        batch_size=tag.rescore_batch_size,
        batch_format="pyarrow",
        udf_modifying_row_count=False,
    )


def decode_plan(
    pending: pa.Table,
    cfg: Config,
    image_size: int,
    sizing: TagSizing,
    filesystems: Filesystems | None = None,
) -> ray.data.Dataset:
    """The lazy Dataset of decoded rows of `pending` (video_id, uri, source_size,
    source_mtime): frames, decode_s and the decode columns, in decode tasks sized by `sizing`."""
    # A few videos per decode task (sizing): every slot busy early; batches span tasks.
    rows = pending.select(["video_id", *SOURCE_COLUMNS])
    return task_blocks(rows, sizing.decode_rows_per_task).map(
        decode_video_timed,
        fn_kwargs=decode_kwargs(cfg, image_size, filesystems),
        num_cpus=sizing.decode_num_cpus,
        # Fresh decode workers now and then bound what FFmpeg may leak on untrusted input.
        # The differing remote args also keep Ray Data from fusing decode into the actor
        # stage (ray-project/ray#54433), which would cap decode parallelism at the actor count.
        max_calls=DECODE_TASKS_PER_WORKER,
    )


def encode_batch_rows(tag: TagConfig, sizing: TagSizing) -> int:
    """Rows per encoder call: a decode task's worth when that is more than one forward pass
    (the encoder runs tag.batch_size clips per pass): Ray Data's cost per call (tens of ms on
    a busy CPU) dominated cheap clips at 4 rows a call."""
    return max(tag.batch_size, sizing.decode_rows_per_task)


def build_plan(
    decoded: ray.data.Dataset, tagger: dict, sizing: TagSizing, tag: TagConfig
) -> ray.data.Dataset:
    """`decoded` -> tag rows in a pool of encode actors, each a `VideoTagger(**tagger)`."""
    num_gpus = sizing.encode_num_gpus
    return decoded.map_batches(
        VideoTagger,
        fn_constructor_kwargs={**tagger, "num_gpus": num_gpus},
        compute=ray.data.ActorPoolStrategy(
            min_size=tag.encode_actors_min or tag.encode_actors, max_size=tag.encode_actors
        ),
        batch_size=encode_batch_rows(tag, sizing),
        batch_format="numpy",
        num_cpus=sizing.encode_num_cpus,
        num_gpus=num_gpus,
        udf_modifying_row_count=False,
    )


def decode_kwargs(cfg: Config, image_size: int, filesystems: Filesystems | None) -> dict:
    """The keyword arguments of every decode task of a tagging plan."""
    return {
        "num_frames": cfg.model.num_frames,
        "size": image_size,
        "limits": cfg.video,
        "allowed_schemes": cfg.tag.allowed_schemes,
        "filesystems": filesystems,
        "segment_s": cfg.tag.segment_s,
        "max_segments": cfg.tag.max_segments,
    }


def size_stages(
    cfg: Config, facts: ModelFacts, encode: pa.Table, filesystems: Filesystems | None
) -> TagSizing:
    """What the decode tasks and encode actors of this run ask Ray for, on the cluster it
    can have. On CPU, with a field left to the job, both stages are first timed on the first
    videos to encode (decoded here, encoded by the driver's copy of the model)."""
    tag = cfg.tag
    num_gpus = gpus_per_actor(tag.device, tag.encode_num_gpus, "tag")
    cpus = max_cluster_resources().get("CPU", 1.0)
    auto = None in (tag.decode_num_cpus, tag.encode_num_cpus, tag.torch_threads)
    costs = None
    if num_gpus == 0 and auto:
        kwargs = decode_kwargs(cfg, facts.image_size, filesystems)
        rows = encode.slice(0, COST_PROBE_VIDEOS).to_pylist()
        costs = measure_stage_costs(rows, lambda n: clip_encode_s(facts.model, n), **kwargs)
    share, decode_s = (costs.encode_share, costs.decode_s) if costs else (None, None)
    in_driver = encode_in_driver(tag, num_gpus)
    sizing = size_tagging(tag, cpus, num_gpus, encode.num_rows, share, decode_s, in_driver)
    logger.info("%s%s", sizing.format_line().strip(), _costs_text(costs))
    return sizing


def clip_encode_s(model: OVMLModel, clips: int) -> float:
    """Seconds the driver's model takes to encode `clips` clips on one thread, the fastest of
    three after a warm-up (as an encode actor's steady state)."""
    frames = torch.zeros(
        (clips, model.num_frames, model.image_size, model.image_size, 3), dtype=torch.uint8
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            model.encode_video(frames)
            times = []
            for _ in range(3):
                started = time.perf_counter()
                model.encode_video(frames)
                times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return min(times)


def _costs_text(costs: StageCosts | None) -> str:
    if costs is None:
        return ""
    return f" (measured per video: decode {costs.decode_s:.3f} s, encode {costs.encode_s:.3f} s)"


@dataclass
class TagSummary:
    out: str
    run_id: str
    model_fingerprint: str
    ok: int = 0
    errored: int = 0
    skipped: int = 0
    rescored: int = 0
    seconds: float = 0.0
    parts: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (video_id, error), a sample
    stages: StageReport | None = None  # per-stage throughput of the decode + encode plan
    sizing: TagSizing | None = None
    startup: dict[str, float] = field(default_factory=dict)  # step -> seconds, before the plan

    @property
    def processed(self) -> int:
        """Videos decoded and encoded (or failed) by this run; re-scored ones are not."""
        return self.ok + self.errored

    @property
    def videos_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def exit_code(self) -> int:
        """1 when every video of the manifest failed: none tagged now, none tagged before."""
        done = self.ok or self.skipped or self.rescored
        return EXIT_FAILED if self.errored and not done else EXIT_OK

    def format(self) -> str:
        lines = [
            f"tags: {self.out} (run {self.run_id}, model {self.model_fingerprint})",
            f"  ok        {self.ok}",
            f"  errored   {self.errored}",
            f"  skipped   {self.skipped} (unchanged: same file, model and vocabulary)",
            f"  rescored  {self.rescored} (new vocabulary, from stored embeddings: no decode)",
            f"  videos/s  {self.videos_per_s:.2f} ({self.processed} in {self.seconds:.1f} s)",
        ]
        if self.startup:
            steps = ", ".join(f"{k} {v:.1f} s" for k, v in self.startup.items())
            lines.append(f"  before    {steps}")
        lines += [self.sizing.format_line()] if self.sizing else []
        lines += self.stages.format_lines() if self.stages else []
        lines += [f"  error: {printable(vid)}: {printable(msg)}" for vid, msg in self.errors]
        return "\n".join(lines)


def printable(text: str) -> str:
    """`text` with control characters escaped as repr() writes them (newline -> \\n), so a
    file name or label can not forge a line or a terminal escape where it is printed."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True)
class ModelFacts:
    """What the driver learns from one model load; the actors then build their own copy."""

    fingerprint: str
    bank: LabelBank
    image_size: int
    head: ScoreHead
    model: OVMLModel  # the driver's copy: times the encoder to size the stages


def load_model_facts(
    source: ModelSource,
    labels: str | None,
    label_bank: str | None,
    filesystems: Filesystems | None,
) -> ModelFacts:
    if source.checkpoint is None:
        logger.warning(
            "no --checkpoint: the model is UNTRAINED (random weights from model config %r); "
            "its tags are meaningless",
            source.config.clip_model,
        )
    model = source.load()
    fingerprint = model_fingerprint(model)
    if labels is not None:
        bank = label_bank_from_vocabulary(model, labels)
    else:
        bank = label_bank_from_file(label_bank, fingerprint, filesystems)
    return ModelFacts(fingerprint, bank, model.image_size, ScoreHead.of(model), model)


def run_tagging(
    cfg: Config,
    manifest: str,
    out: str,
    *,
    labels: str | None = None,
    label_bank: str | None = None,
    checkpoint: str | None = None,
    full: bool = False,
    filesystems: Filesystems | None = None,
) -> TagSummary:
    """Bring `out` up to date with `manifest`, the model and the vocabulary: encode new or
    changed videos (all of them with `full`), re-score stored embeddings whose vocabulary
    changed, skip the rest. Afterwards every current row is scored against this vocabulary."""
    if (labels is None) == (label_bank is None):
        raise ConfigError("--labels / --label-bank: give exactly one")
    tag = cfg.tag
    clock = time.perf_counter()
    table = read_manifest(manifest, allowed_schemes=tag.allowed_schemes, filesystems=filesystems)
    stats = source_stats(
        table["uri"].to_pylist(), allowed_schemes=tag.allowed_schemes, filesystems=filesystems
    )
    table = (
        table.select(["video_id", "uri"])
        .append_column("source_size", stats["source_size"])
        .append_column("source_mtime", stats["source_mtime"])
    )
    source = ModelSource(cfg.model, checkpoint, filesystems)
    facts = load_model_facts(source, labels, label_bank, filesystems)
    bank = facts.bank
    vocabulary = vocabulary_fingerprint(bank.labels, facts.fingerprint, tag.threshold, tag.top_k)

    current = None if full else read_tags(out, columns=INDEX_COLUMNS, filesystems=filesystems)
    pending = pending_videos(
        table,
        current,
        facts.fingerprint,
        vocabulary,
        retry_errors=tag.retry_errors,
        segment_s=tag.segment_s,
    )
    rescore, unscorable = (
        stored_rows(out, pending.rescore, filesystems) if pending.rescore else (None, [])
    )
    encode = pa.concat_tables(
        [
            pending.encode,
            table.filter(pc.is_in(table["video_id"], pa.array(unscorable, pa.string()))),
        ]
    )
    summary = TagSummary(out, new_run_id(), facts.fingerprint, skipped=pending.skipped)
    summary.startup["inputs, model and labels"] = time.perf_counter() - clock
    logger.info(
        "%d videos in %s: %d to encode, %d to re-score from stored embeddings (%d without one: "
        "encoded), %d unchanged; %d labels; writing part files of run %s to %s",
        table.num_rows,
        manifest,
        encode.num_rows,
        len(pending.rescore),
        len(unscorable),
        summary.skipped,
        len(bank.labels),
        summary.run_id,
        out,
    )
    if encode.num_rows == 0 and (rescore is None or rescore.num_rows == 0):
        return summary

    clock = time.perf_counter()
    init_ray()
    summary.startup["ray start"] = time.perf_counter() - clock
    schema = tags_schema(bank.embeddings.shape[1] if tag.emit_embedding else None)
    started = time.perf_counter()
    if rescore is not None and rescore.num_rows:
        plan = build_rescore_plan(
            rescore,
            bank,
            facts.head,
            vocabulary_fingerprint=vocabulary,
            run_id=summary.run_id,
            tag=tag,
            schema=schema,
        )
        summary.rescored = _write(plan, summary, schema, tag, filesystems).num_rows
    if encode.num_rows:
        clock = time.perf_counter()
        sizing = summary.sizing = size_stages(cfg, facts, encode, filesystems)
        summary.startup["stage sizing"] = time.perf_counter() - clock
        encode_started = time.time()
        decoded = decode_plan(encode, cfg, facts.image_size, sizing, filesystems)
        tagger = {
            "source": source,
            "bank": bank,
            "fingerprint": facts.fingerprint,
            "vocabulary_fingerprint": vocabulary,
            "run_id": summary.run_id,
            "tag": tag,
            "torch_threads": sizing.torch_threads,
        }
        if sizing.encode_in_driver:
            recorder = StageRecorder()
            written = _tag_in_driver(decoded, tagger, facts.model, recorder, summary, schema)
            totals = recorder.get()
        else:
            meter = start_meter()
            plan = build_plan(decoded, {**tagger, "meter": meter}, sizing, tag)
            written = _write(plan, summary, schema, tag, filesystems)
            totals = ray.get(meter.get.remote())
        encoders = 1 if sizing.encode_in_driver else tag.encode_actors
        summary.stages = stage_report(
            totals, encode_started, sizing.decode_slots, encoders, sizing.encode_in_driver
        )
        _count_encoded(summary, written)
    summary.seconds = time.perf_counter() - started
    logger.info("wrote %d part files to %s", len(summary.parts), out)
    if summary.processed != encode.num_rows:
        logger.error("%d videos to encode, but %d rows written", encode.num_rows, summary.processed)
    return summary


def _sink(
    summary: TagSummary, schema: pa.Schema, tag: TagConfig, filesystems: Filesystems | None
) -> PartFileDatasink:
    return PartFileDatasink(
        summary.out,
        summary.run_id,
        schema,
        rows_per_file=tag.rows_per_file,
        filesystems=filesystems,
    )


def _write(
    plan: ray.data.Dataset,
    summary: TagSummary,
    schema: pa.Schema,
    tag: TagConfig,
    filesystems: Filesystems | None,
) -> pa.Table:
    """Run `plan` into part files of this run; (video_id, error) of the rows committed."""
    sink = _sink(summary, schema, tag, filesystems)
    # Stalled for tag.no_progress_timeout_s: Ray Data stops the plan and NoProgressError rises.
    what = "the tagging plan (decode, encode, part-file writes)"
    watch_plan(plan, "tag.no_progress_timeout_s", tag.no_progress_timeout_s, what)
    plan.write_datasink(sink, ray_remote_args={"num_cpus": WRITE_NUM_CPUS})
    return _committed(summary, sink.written, filesystems)


def _tag_in_driver(
    decoded: ray.data.Dataset,
    tagger: dict,
    model: OVMLModel,
    recorder: StageRecorder,
    summary: TagSummary,
    schema: pa.Schema,
) -> pa.Table:
    """Encode and score `decoded` in this process with its `model` (tag.encode_in), writing
    part files of tag.rows_per_file rows as they fill, as the write tasks would; (video_id,
    error) of the rows committed."""
    tag, filesystems = tagger["tag"], tagger["source"].filesystems
    sink = _sink(summary, schema, tag, filesystems)
    what = "the tagging plan (decode; encode and part-file writes in the driver)"
    watch_plan(decoded, "tag.no_progress_timeout_s", tag.no_progress_timeout_s, what)
    threads = torch.get_num_threads()  # the tagger sizes this process's pool; restored after
    try:
        encode = VideoTagger(**tagger, meter=recorder, model=model)
        sink.on_write_start()
        committed, buffered, rows = [], [], 0
        batches = decoded.iter_batches(
            batch_size=encode_batch_rows(tag, summary.sizing), batch_format="numpy"
        )
        for batch in batches:
            buffered.append(encode(batch))
            rows += buffered[-1].num_rows
            if rows >= tag.rows_per_file:
                committed.append(_write_part(sink, buffered, len(committed), summary))
                buffered, rows = [], 0
        if buffered:
            committed.append(_write_part(sink, buffered, len(committed), summary))
    finally:
        torch.set_num_threads(threads)
    return pa.concat_tables(committed) if committed else _NOTHING_COMMITTED


def _write_part(
    sink: PartFileDatasink, tables: list[pa.Table], index: int, summary: TagSummary
) -> pa.Table:
    """Commit `tables` as this run's part file `index`; (video_id, error) of its rows."""
    table = pa.concat_tables(tables)
    summary.parts.append(sink.write_table(table, index))
    return table.select(["video_id", "error"])


_NOTHING_COMMITTED = pa.table(
    {"video_id": pa.array([], pa.string()), "error": pa.array([], pa.string())}
)


def _committed(summary: TagSummary, paths: list[str], filesystems: Filesystems | None) -> pa.Table:
    """(video_id, error) of the rows in this run's part files `paths`, now counted in it."""
    summary.parts += sorted(paths)
    fs, _ = resolve(summary.out, filesystems)
    written = read_parts(fs, sorted(paths), ["video_id", "error"])
    return written if written is not None else _NOTHING_COMMITTED


def _count_encoded(summary: TagSummary, written: pa.Table) -> None:
    """ok / errored from what the encode plan committed, not from what it meant to write."""
    errors = written["error"].to_pylist()
    summary.errored = sum(e is not None for e in errors)
    summary.ok = len(errors) - summary.errored
    ids = written["video_id"].to_pylist()
    summary.errors = [(v, e) for v, e in zip(ids, errors, strict=True) if e is not None][:5]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(
        "ovml tag",
        "Tag videos with any vocabulary: manifest in, Parquet tags out (incremental: new or "
        "changed videos are encoded, a changed vocabulary is re-scored from stored embeddings, "
        "the rest is skipped).",
        "tag.threshold=0.3",
    )
    parser.add_argument(
        "--manifest",
        required=True,
        help="Parquet/CSV/JSONL manifest (video_id, uri) or a directory / glob of videos",
    )
    parser.add_argument("--out", required=True, help="output directory of Parquet part files")
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="vocabulary file (txt: one label per line; CSV; YAML)")
    labels.add_argument("--label-bank", help="Parquet label bank from jobs/build_label_bank.py")
    parser.add_argument(
        "--checkpoint",
        help="trained checkpoint directory, local, s3:// or gs:// (default: untrained)",
    )
    parser.add_argument("--full", action="store_true", help="decode and encode every video again")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        cfg = Config.from_yaml(args.config, args.overrides)
        summary = run_tagging(
            cfg,
            args.manifest,
            args.out,
            labels=args.labels,
            label_bank=args.label_bank,
            checkpoint=args.checkpoint,
            full=args.full,
        )
        print(summary.format())
        return summary.exit_code()

    return run_job(body)
