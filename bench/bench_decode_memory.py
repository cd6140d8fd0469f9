"""Memory of the decode step over many videos: resident set size after N decodes, in one process.

The pipeline's decode step (`pipeline.decode.decode_video`, what each Ray decode task runs)
is called on N small generated clips in a row, in this one process, and the RSS (current and
peak, from /proc/self/status) is printed at checkpoints. A Ray decode worker is replaced after
`pipeline.tagging.DECODE_TASKS_PER_WORKER` (200) tasks, so N decodes in one process is the
harsher case. Only the decode step's own imports are loaded (no torch), as in a decode task. Flat numbers
from 100 to 1,000 mean nothing accumulates per video. Run from the repository root:

    .venv/bin/python -m bench.bench_decode_memory --videos 1000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from ovml_core.config import VideoConfig
from pipeline.decode import decode_video
from tests.videos import write_indexed_video

# (codec, width, height, frames): distinct sources, copied to make N files
SOURCES = [
    ("h264", 320, 240, 48),
    ("h264", 640, 360, 30),
    ("vp9", 320, 240, 48),
    ("mpeg4", 320, 240, 48),
]
SUFFIX = {"h264": "mp4", "vp9": "webm", "mpeg4": "avi"}


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


def make_videos(folder: Path, count: int) -> list[Path]:
    sources = [
        write_indexed_video(
            folder / f"source{i}.{SUFFIX[codec]}", n, width=w, height=h, codec=codec, gop=12
        )
        for i, (codec, w, h, n) in enumerate(SOURCES)
    ]
    videos = []
    for i in range(count):
        source = sources[i % len(sources)]
        videos.append(folder / f"video{i:05d}{source.suffix}")
        shutil.copyfile(source, videos[-1])
    return videos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=8, help="T frames sampled per video")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    limits = VideoConfig(decoder_threads=1)
    checkpoints = {10, 100, *range(200, args.videos + 1, 200), args.videos}
    with tempfile.TemporaryDirectory() as folder:
        videos = make_videos(Path(folder), args.videos)
        print(f"{args.videos} videos ({len(SOURCES)} sources), T={args.frames} at {args.size}")
        print(f"{'decoded':>8} {'rss MiB':>9} {'peak MiB':>9} {'ms/video':>9}")
        started = time.perf_counter()
        for done, path in enumerate(videos, 1):
            row = decode_video(
                {"uri": str(path)}, num_frames=args.frames, size=args.size, limits=limits
            )
            if row["error"] is not None:
                raise RuntimeError(row["error"])
            if done in checkpoints:
                rss, peak = rss_mb()
                ms = (time.perf_counter() - started) / done * 1000
                print(f"{done:>8} {rss:>9.1f} {peak:>9.1f} {ms:>9.1f}")


if __name__ == "__main__":
    main()
