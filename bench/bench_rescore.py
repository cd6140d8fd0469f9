"""What adding a label to N tagged videos costs, next to re-tagging them.

Re-scoring: `pipeline.tagging.rescore_batch` (stored float16 embedding x label bank, sigmoid,
`rank_tags`, the output row) over N stored rows in batches of tag.rescore_batch_size, for
vocabularies of 1k and 10k labels; plus reading the stored rows and writing the re-scored ones
as Parquet (measured on `--io-rows` rows, scaled to N). Re-tagging: `pipeline.decode.decode_video`
+ `VideoTagger` (the encode actor's code) per video on a few generated clips, with a random-init
model of the given architecture. Both run on one core (1 torch thread), as a Ray task and an
encode actor do by default, so the costs are CPU-seconds and the ratio does not depend on how
many cores a cluster has. Run from the repository root:

    .venv/bin/python -m bench.bench_rescore --rows 1000000 --labels 1000 10000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from ovml_core.checkpoint import model_fingerprint
from ovml_core.config import Config, TagConfig
from pipeline.decode import decode_video
from pipeline.parquet_io import read_tags, tags_schema, write_parquet_atomic
from pipeline.tagging import LabelBank, ModelSource, ScoreHead, VideoTagger, rescore_batch
from tests.conftest import TINY_CONFIG
from tests.videos import write_indexed_video


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def stored_rows(rng: np.random.Generator, n: int, dim: int) -> pa.Table:
    """N rows as a tagging run stores them (float16 embedding, old vocabulary)."""
    schema = tags_schema(dim)
    flat = pa.array(unit_rows(rng, n, dim).astype(np.float16).reshape(-1))
    columns = {
        "video_id": pa.array([f"v{i:08d}" for i in range(n)]),
        "uri": pa.array([f"s3://videos/v{i:08d}.mp4" for i in range(n)]),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        "num_frames": pa.array(np.full(n, 250, np.int32)),
        "duration_s": pa.array(np.full(n, 10.0)),
        "model_fingerprint": pa.array(["fp"] * n),
        "vocabulary_fingerprint": pa.array(["old"] * n),
        "source_size": pa.array(np.full(n, 1_000_000, np.int64)),
        "source_mtime": pa.array(["2026-01-01T00:00:00+00:00"] * n),
        "run_id": pa.array(["20260101T000000000000Z-old000"] * n),
    }
    arrays = [columns.get(f.name, pa.nulls(n, f.type)) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def storage_error(rng: np.random.Generator, dim: int, rows: int = 4096, labels: int = 1000):
    """{dtype: max |cos(stored video, label) - cos(float32 video, label)|}: a score moves by at
    most logit_scale * that / 4 (the sigmoid's slope is at most 1/4)."""
    video = torch.from_numpy(unit_rows(rng, rows, dim))
    label = torch.from_numpy(unit_rows(rng, labels, dim))
    exact = video @ label.T
    return {
        str(dtype).removeprefix("torch."): float(
            (video.to(dtype).float() @ label.T - exact).abs().max()
        )
        for dtype in (torch.float16, torch.bfloat16)
    }


def time_rescore(rows: pa.Table, labels: int, dim: int, tag: TagConfig, rng) -> tuple[float, float]:
    """(wall s, CPU s) of re-scoring every row against `labels` labels."""
    names = pa.array([f"label {j}" for j in range(labels)])
    bank = unit_rows(rng, labels, dim)
    kwargs = {
        "labels": names,
        "label_embeddings": bank,
        "head": ScoreHead(logit_scale=10.0, logit_bias=-10.0),
        "vocabulary_fingerprint": "new",
        "run_id": "20260102T000000000000Z-new000",
        "tag": tag,
        "schema": rows.schema,
    }
    rescore_batch(rows.slice(0, tag.rescore_batch_size), **kwargs)  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, rows.num_rows, tag.rescore_batch_size):
        rescore_batch(rows.slice(start, tag.rescore_batch_size), **kwargs)
    return time.perf_counter() - wall, time.process_time() - cpu


def time_io(rows: pa.Table) -> tuple[float, float]:
    """(wall s, CPU s) of reading `rows` back as current tags and writing them once more."""
    with tempfile.TemporaryDirectory() as tmp:
        local = pafs.LocalFileSystem()
        write_parquet_atomic(rows, local, f"{tmp}/part-old-00000.parquet")
        wall, cpu = time.perf_counter(), time.process_time()
        current = read_tags(tmp)
        write_parquet_atomic(current, local, f"{tmp}/part-new-00000.parquet")
        return time.perf_counter() - wall, time.process_time() - cpu


def time_retag(cfg: Config, clips: list[Path], labels: int) -> tuple[float, float, int]:
    """(wall s, CPU s) per video of decode + encode + score, the tagging job's own code, and
    the model's embedding size."""
    source = ModelSource(cfg.model)
    model = source.load()
    dim = model.encode_labels(["a"]).shape[1]
    bank = LabelBank(
        [f"label {j}" for j in range(labels)], unit_rows(np.random.default_rng(1), labels, dim)
    )
    tagger = VideoTagger(source, bank, model_fingerprint(model), "voc", "run", cfg.tag)
    del model
    size, frames = tagger.model.image_size, cfg.model.num_frames

    def tag_one(clip: Path) -> None:
        row = decode_video(
            {"video_id": clip.stem, "uri": str(clip), "source_size": 1, "source_mtime": "t"},
            num_frames=frames,
            size=size,
            limits=cfg.video,
        )
        assert row["error"] is None, row["error"]
        batch = {k: np.array([v]) for k, v in row.items() if k != "frames"}
        batch["frames"] = row["frames"][None]
        batch["error"] = np.array([None], dtype=object)
        tagger(batch)

    tag_one(clips[0])  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    for clip in clips[1:]:
        tag_one(clip)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall / (len(clips) - 1), cpu / (len(clips) - 1), dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="stored embeddings (N)")
    parser.add_argument("--labels", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument(
        "--rows-10k", type=int, default=None, help="rows re-scored for >= 10k labels (scaled to N)"
    )
    parser.add_argument("--io-rows", type=int, default=200_000, help="rows read + written")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture (random init)")
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--clips", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = [
        f"model.clip_model={args.model}",
        f"model.num_frames={args.num_frames}",
        "tag.torch_threads=1",
    ]
    cfg = Config.from_yaml(TINY_CONFIG, overrides)
    tag = cfg.tag
    print(f"load {load()}; 1 torch thread; rescore batch {tag.rescore_batch_size}")

    with tempfile.TemporaryDirectory() as tmp:
        clips = [
            write_indexed_video(Path(tmp) / f"clip{i}.mp4", 125 + i, width=640, height=360)
            for i in range(args.clips + 1)
        ]
        retag_wall, retag_cpu, dim = time_retag(cfg, clips, max(args.labels))
    print(
        f"re-tag ({args.model}, T={args.num_frames}, 640x360 h264 5 s clips): "
        f"{retag_cpu:.3f} CPU s/video, {retag_wall:.3f} s wall/video; load {load()}"
    )

    rng = np.random.default_rng(0)
    for dtype, error in storage_error(rng, dim).items():
        print(
            f"stored as {dtype}: {dim * 2} bytes/row, max |cos error| {error:.2e} -> score error "
            f"<= {100 * error / 4:.2e} at logit_scale 100 (pretrained CLIP's)"
        )
    io_rows = min(args.io_rows, args.rows)
    io_wall, io_cpu = time_io(stored_rows(rng, io_rows, dim))
    io_scale = args.rows / io_rows
    print(
        f"Parquet read_tags + write of {io_rows} rows (D={dim}, float16): {io_cpu:.2f} CPU s, "
        f"{io_wall:.2f} s wall -> x{io_scale:g} for N={args.rows}; load {load()}"
    )
    for labels in args.labels:
        n = args.rows if labels < 10_000 or args.rows_10k is None else args.rows_10k
        rows = stored_rows(rng, n, dim)
        wall, cpu = time_rescore(rows, labels, dim, tag, rng)
        scale = args.rows / n
        total_cpu = cpu * scale + io_cpu * io_scale
        retag_total = retag_cpu * args.rows
        print(
            f"rescore {n} rows x {labels} labels: {n / cpu:,.0f} rows per CPU s "
            f"({cpu:.1f} CPU s, {wall:.1f} s wall); load {load()}"
        )
        print(
            f"  add one label to N={args.rows:,} videos: {total_cpu:,.0f} CPU s "
            f"(re-score{'' if scale == 1 else f' x{scale:g}'} + Parquet I/O) vs re-tag "
            f"{retag_total:,.0f} CPU s -> ratio {100 * total_cpu / retag_total:.3f} %"
        )


if __name__ == "__main__":
    main()
