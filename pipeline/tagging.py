"""The tagging job as a Ray Data plan: manifest -> decode -> encode + score -> Parquet tags.

    manifest (driver, pyarrow)          skip videos already tagged by this model
      -> decode_video   (Ray tasks, tag.decode_num_cpus each)        uint8 [T, S, S, 3]
      -> VideoTagger    (actor pool; the model and label bank load once per actor,
                         GPU + bf16 autocast when the cluster has GPUs; uint8 clips go
                         to the device from pinned memory and are preprocessed there)
      -> PartFileDatasink (atomic part files of this run in the output directory)

Nightly semantics: a run skips videos whose current row (see `parquet_io.read_tags`) has this
model's fingerprint, the same uri and no error. Error rows are retried by default
(`tag.retry_errors`), and the retry's row supersedes the old one because it belongs to a later
run. A run killed half-way leaves only complete part files; the next run does the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray
import torch

from ovml_core.checkpoint import CheckpointError, load_checkpoint, model_fingerprint
from ovml_core.config import Config, ConfigError, ModelConfig, TagConfig
from ovml_core.label_embedder import LabelEmbedder, load_vocabulary
from ovml_core.model import OVMLModel, create_model
from ovml_core.vocabulary import VocabularyError
from pipeline.cli import job_parser, log_to_console
from pipeline.manifest import Filesystems, read_manifest, resolve
from pipeline.parquet_io import (
    INDEX_COLUMNS,
    PartFileDatasink,
    new_run_id,
    read_label_bank,
    read_parts,
    read_tags,
    tags_schema,
)
from pipeline.remote_checkpoint import local_checkpoint
from pipeline.stage_meter import (
    StageMeter,
    StageReport,
    decode_slots,
    decode_video_timed,
    stage_report,
)

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_ALL_FAILED, EXIT_CONFIG = 0, 1, 2
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


def rank_tags(
    probabilities: np.ndarray, labels: list[str], threshold: float, top_k: int
) -> list[tuple[list[dict], list[dict]]]:
    """Per video: (labels with probability >= threshold, the top_k labels), highest first."""
    ranked = []
    for row in probabilities:
        order = np.argsort(-row, kind="stable")
        above = order[row[order] >= threshold]
        ranked.append(
            (
                [{"label": labels[j], "score": float(row[j])} for j in above],
                [{"label": labels[j], "score": float(row[j])} for j in order[:top_k]],
            )
        )
    return ranked


class VideoTagger:
    """Encode + score for `map_batches`: one instance per actor, model and labels loaded once."""

    def __init__(
        self,
        source: ModelSource,
        bank: LabelBank,
        fingerprint: str,
        run_id: str,
        tag: TagConfig,
        meter: ray.actor.ActorHandle | None = None,
    ):
        # Ray sets OMP_NUM_THREADS per worker; torch's own pool is sized here, explicitly.
        torch.set_num_threads(tag.torch_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = source.load(self.device)
        actual = model_fingerprint(self.model)
        if actual != fingerprint:
            raise RuntimeError(
                f"actor built model {actual}, the driver planned for {fingerprint}: "
                "workers must see the same checkpoint and library versions"
            )
        self.labels = bank.labels
        self.label_embeddings = torch.tensor(bank.embeddings, device=self.device)
        self.fingerprint, self.run_id, self.tag = fingerprint, run_id, tag
        dim = bank.embeddings.shape[1] if tag.emit_embedding else None
        self.schema = tags_schema(dim)
        self.meter = meter
        if tag.compile:
            # In place: parameter names, and so the fingerprint, stay the eager model's.
            self.model.visual.compile(dynamic=False)

    def _autocast(self):
        if self.device == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _host_batch(self, frames: np.ndarray, ok: np.ndarray) -> torch.Tensor:
        """The valid clips, uint8, gathered straight into pinned memory on CUDA so the copy to
        the device runs async; padded to tag.batch_size when compiled (one graph, no
        recompiles for short batches)."""
        n = int(ok.sum())
        rows = max(n, self.tag.batch_size) if self.tag.compile else n
        pinned = self.device == "cuda"
        host = torch.empty((rows, *frames.shape[1:]), dtype=torch.uint8, pin_memory=pinned)
        np.compress(ok, frames, axis=0, out=host.numpy()[:n])
        host[n:] = 0
        return host

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        started = time.perf_counter()
        table = self._tag(batch)
        if self.meter is not None:
            # Waited for: the driver reads the totals once the last batch has returned.
            ray.get(
                self.meter.add.remote(
                    len(table),
                    float(np.sum(batch["decode_s"])),
                    time.perf_counter() - started,
                    self.device,
                )
            )
        return table

    def _tag(self, batch: dict[str, np.ndarray]) -> pa.Table:
        # A column that is null in the whole batch arrives as float NaN, not None.
        errors = [e if isinstance(e, str) else None for e in batch["error"]]
        ok = np.array([e is None for e in errors], dtype=bool)
        rows = len(ok)
        tags: list = [None] * rows
        top_k: list = [None] * rows
        embeddings = np.zeros((rows, self.label_embeddings.shape[1]), np.float32)
        if ok.any():
            with torch.inference_mode():
                with self._autocast():
                    video = self.model.encode_video(self._host_batch(batch["frames"], ok))
                # Scores in float32: bf16 would blur probabilities near the threshold.
                video = video[: int(ok.sum())].float()
                probabilities = self.model.score(video, self.label_embeddings)
            ranked = rank_tags(
                probabilities.cpu().numpy(), self.labels, self.tag.threshold, self.tag.top_k
            )
            for i, (above, top) in zip(np.flatnonzero(ok), ranked, strict=True):
                tags[i], top_k[i] = above, top
            embeddings[ok] = video.cpu().numpy()
        columns = {
            "video_id": batch["video_id"].tolist(),
            "uri": batch["uri"].tolist(),
            "tags": tags,
            "top_k": top_k,
            "num_frames": _where(ok, batch["num_frames"], int),
            "duration_s": _where(ok, batch["duration_s"], float),
            "error": errors,
            "model_fingerprint": [self.fingerprint] * rows,
            "run_id": [self.run_id] * rows,
        }
        if "embedding" in self.schema.names:
            dim = embeddings.shape[1]
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(
                pa.array(embeddings.reshape(-1)), dim, mask=pa.array(~ok)
            )
        return pa.table({name: columns[name] for name in self.schema.names}, schema=self.schema)


def _where(ok: np.ndarray, values: np.ndarray, kind: type) -> list:
    """`values` as Python numbers where ok, None elsewhere (error rows carry no video meta)."""
    return [kind(v) if k else None for v, k in zip(values, ok, strict=True)]


def pending_videos(
    manifest: pa.Table,
    current: pa.Table | None,
    fingerprint: str,
    *,
    retry_errors: bool = True,
) -> pa.Table:
    """Manifest rows that still need tagging by the model with `fingerprint`.

    `current` holds the output's current rows (INDEX_COLUMNS). A video is done when its current
    row has the same uri and fingerprint and no error (or any error, with retry_errors off).
    """
    if current is None or current.num_rows == 0:
        return manifest
    done = {
        (vid, uri)
        for vid, uri, error, fp in zip(
            current["video_id"].to_pylist(),
            current["uri"].to_pylist(),
            current["error"].to_pylist(),
            current["model_fingerprint"].to_pylist(),
            strict=True,
        )
        if fp == fingerprint and (error is None or not retry_errors)
    }
    keys = zip(manifest["video_id"].to_pylist(), manifest["uri"].to_pylist(), strict=True)
    keep = [i for i, key in enumerate(keys) if key not in done]
    return manifest.take(pa.array(keep, pa.int64()))


def encode_num_gpus(tag: TagConfig) -> float:
    """tag.encode_num_gpus, or 1 when the cluster has GPUs right now and 0 otherwise."""
    if tag.encode_num_gpus is not None:
        return tag.encode_num_gpus
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build_plan(
    pending: pa.Table,
    cfg: Config,
    source: ModelSource,
    bank: LabelBank,
    *,
    fingerprint: str,
    run_id: str,
    image_size: int,
    filesystems: Filesystems | None = None,
    meter: ray.actor.ActorHandle | None = None,
) -> ray.data.Dataset:
    """The lazy Dataset of tag rows for `pending` (video_id, uri); the encode actors report
    their batches to `meter` (a `StageMeter`) when given."""
    tag = cfg.tag
    decoded = (
        ray.data.from_arrow(pending.select(["video_id", "uri"]))
        # One decode task per encode batch: enough tasks to keep every CPU busy.
        .repartition(target_num_rows_per_block=tag.batch_size)
        .map(
            decode_video_timed,
            fn_kwargs={
                "num_frames": cfg.model.num_frames,
                "size": image_size,
                "limits": cfg.video,
                "allowed_schemes": tag.allowed_schemes,
                "filesystems": filesystems,
            },
            num_cpus=tag.decode_num_cpus,
            # Fresh decode workers now and then bound what FFmpeg may leak on untrusted input.
            # The differing remote args also keep Ray Data from fusing decode into the actor
            # stage (ray-project/ray#54433), which would cap decode parallelism at the actor count.
            max_calls=DECODE_TASKS_PER_WORKER,
        )
    )
    return decoded.map_batches(
        VideoTagger,
        fn_constructor_kwargs={
            "source": source,
            "bank": bank,
            "fingerprint": fingerprint,
            "run_id": run_id,
            "tag": tag,
            "meter": meter,
        },
        compute=ray.data.ActorPoolStrategy(
            min_size=tag.encode_actors_min or tag.encode_actors, max_size=tag.encode_actors
        ),
        batch_size=tag.batch_size,
        batch_format="numpy",
        num_cpus=tag.encode_num_cpus,
        num_gpus=encode_num_gpus(tag),
        udf_modifying_row_count=False,
    )


@dataclass
class TagSummary:
    out: str
    run_id: str
    model_fingerprint: str
    ok: int = 0
    errored: int = 0
    skipped: int = 0
    seconds: float = 0.0
    parts: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (video_id, error), a sample
    stages: StageReport | None = None  # per-stage throughput of this run

    @property
    def processed(self) -> int:
        return self.ok + self.errored

    @property
    def videos_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def exit_code(self) -> int:
        """1 when every video of the manifest failed: none tagged now, none tagged before."""
        return EXIT_ALL_FAILED if self.errored and not self.ok and not self.skipped else EXIT_OK

    def format(self) -> str:
        lines = [
            f"tags: {self.out} (run {self.run_id}, model {self.model_fingerprint})",
            f"  ok        {self.ok}",
            f"  errored   {self.errored}",
            f"  skipped   {self.skipped} (already tagged by this model)",
            f"  videos/s  {self.videos_per_s:.2f} ({self.processed} in {self.seconds:.1f} s)",
        ]
        lines += self.stages.format_lines() if self.stages else []
        lines += [f"  error: {printable(vid)}: {printable(msg)}" for vid, msg in self.errors]
        return "\n".join(lines)


def printable(text: str) -> str:
    """`text` with control characters escaped as repr() writes them (newline -> \\n), so a
    file name or label can not forge a line or a terminal escape where it is printed."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def load_model_facts(
    source: ModelSource,
    labels: str | None,
    label_bank: str | None,
    filesystems: Filesystems | None,
) -> tuple[str, LabelBank, int]:
    """(fingerprint, label bank, frame size) from one model load in the driver; the actors
    then build their own copy."""
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
    return fingerprint, bank, model.image_size


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
    """Tag every video of `manifest` not yet tagged in `out` (all of them with `full`)."""
    if (labels is None) == (label_bank is None):
        raise ConfigError("--labels / --label-bank: give exactly one")
    table = read_manifest(
        manifest, allowed_schemes=cfg.tag.allowed_schemes, filesystems=filesystems
    )
    source = ModelSource(cfg.model, checkpoint, filesystems)
    fingerprint, bank, image_size = load_model_facts(source, labels, label_bank, filesystems)

    current = None if full else read_tags(out, columns=INDEX_COLUMNS, filesystems=filesystems)
    pending = pending_videos(table, current, fingerprint, retry_errors=cfg.tag.retry_errors)
    summary = TagSummary(out, new_run_id(), fingerprint, skipped=table.num_rows - pending.num_rows)
    logger.info(
        "%d videos in %s: %d to tag, %d already tagged; %d labels; writing part files of run %s "
        "to %s",
        table.num_rows,
        manifest,
        pending.num_rows,
        summary.skipped,
        len(bank.labels),
        summary.run_id,
        out,
    )
    if pending.num_rows == 0:
        return summary

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS (`ray job submit`) or a local instance
    meter = StageMeter.remote()
    plan = build_plan(
        pending,
        cfg,
        source,
        bank,
        fingerprint=fingerprint,
        run_id=summary.run_id,
        image_size=image_size,
        filesystems=filesystems,
        meter=meter,
    )
    sink = PartFileDatasink(
        out,
        summary.run_id,
        tags_schema(bank.embeddings.shape[1] if cfg.tag.emit_embedding else None),
        rows_per_file=cfg.tag.rows_per_file,
        filesystems=filesystems,
    )
    started = time.perf_counter()
    plan.write_datasink(sink)
    summary.seconds = time.perf_counter() - started
    tag = cfg.tag
    slots = decode_slots(tag.decode_num_cpus, tag.encode_actors, tag.encode_num_cpus)
    summary.stages = stage_report(meter, summary.seconds, slots, tag.encode_actors)
    _count_written(summary, sink.written, filesystems)
    logger.info("wrote %d part files to %s", len(summary.parts), out)
    if summary.processed != pending.num_rows:
        logger.error("%d videos to tag, but %d rows written", pending.num_rows, summary.processed)
    return summary


def _count_written(summary: TagSummary, parts: list[str], filesystems: Filesystems | None):
    """ok / errored from what this run committed, not from what it meant to write."""
    summary.parts = parts
    fs, _ = resolve(summary.out, filesystems)
    written = read_parts(fs, parts, ["video_id", "error"])
    if written is None:
        return
    errors = written["error"].to_pylist()
    summary.errored = sum(e is not None for e in errors)
    summary.ok = len(errors) - summary.errored
    ids = written["video_id"].to_pylist()
    summary.errors = [(v, e) for v, e in zip(ids, errors, strict=True) if e is not None][:5]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(
        "ovml tag",
        "Tag videos with any vocabulary: manifest in, Parquet tags out "
        "(incremental: videos already tagged by the same model are skipped).",
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
    parser.add_argument("--full", action="store_true", help="re-tag every video")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_to_console()
    try:
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
    except (ConfigError, CheckpointError, VocabularyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    print(summary.format())
    return summary.exit_code()
