"""Memory of the decode step over many videos: resident set size after N decodes, in one process.

The pipeline's decode step (`pipeline.decode.decode_video`, what each Ray decode task runs)
is called on N small generated clips in a row, in this one process, and the RSS (current and
peak, from /proc/self/status) is printed at checkpoints. A Ray decode worker is replaced after
`pipeline.tagging.DECODE_TASKS_PER_WORKER` (200) tasks, so N decodes in one process is the
harsher case. Only the decode step's own imports are loaded (no torch), as in a decode task. Flat numbers
from 100 to 1,000 mean nothing accumulates per video. Run from the repository root:

    .venv/bin/python -m bench.bench_decode_memory --videos 1000

`--long-hours 2`: memory while decoding one two-hour 1080p h264 video instead (issue 16 item
5), against a 60-s video of the same stream. Both are one 10-s clip (a smooth panning gradient
at a low bitrate, a keyframe every 2 s) repeated by remuxing its packets with shifted times, no
re-encode: about 130 MB for two hours, deleted afterwards. Each case runs in a fresh process
(peak RSS is per process): exact sampling (mode exact) and mode keyframe, each for the whole
video (T frames) and with segment windows (`--segment-s`, S x T frames), with
video.max_duration_s and max_decode_s raised to let the video through. Printed: RSS after the
imports, peak RSS, the peak's growth over that, and the output frames' own size.

    .venv/bin/python -m bench.bench_decode_memory --long-hours 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

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


# ---------------------------------------------------------------- one long video

LONG_FPS, LONG_GOP, BASE_S = 25, 50, 10


def write_smooth_clip(path: Path, width: int = 1920, height: int = 1080) -> Path:
    """BASE_S seconds of a smooth gradient panning 4 px a frame with an inverted box moving:
    little detail, so x264 at crf 36 needs ~140 kbit/s even at 1080p."""
    rows, cols = np.mgrid[0:height, 0:width]
    chroma = np.full((height // 2, width), 128, np.uint8)
    box = height // 5
    options = {"preset": "veryfast", "g": str(LONG_GOP), "crf": "36"}
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=LONG_FPS, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(BASE_S * LONG_FPS):
            luma = ((cols + 4 * i) * 255 // width % 256 // 2 + rows * 100 // height).astype(
                np.uint8
            )
            left = (8 * i) % (width - box)
            luma[2 * box : 3 * box, left : left + box] ^= 0xFF
            frame = av.VideoFrame.from_ndarray(np.concatenate([luma, chroma]), format="yuv420p")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_repeated(source: Path, path: Path, times: int) -> Path:
    """`source`'s video packets `times` over, each copy shifted by its length (no re-encode)."""
    with av.open(str(source)) as reader:
        stream = reader.streams.video[0]
        packets = [
            (bytes(p), p.pts, p.dts, p.is_keyframe, p.duration)
            for p in reader.demux(stream)
            if p.size
        ]
        span = max(p[1] for p in packets) - min(p[1] for p in packets) + packets[0][4]
        with av.open(str(path), "w") as writer:
            out = writer.add_stream_from_template(stream)
            for k in range(times):
                for data, pts, dts, keyframe, duration in packets:
                    packet = av.Packet(data)
                    packet.pts, packet.dts, packet.duration = (
                        pts + k * span,
                        dts + k * span,
                        duration,
                    )
                    packet.is_keyframe, packet.stream, packet.time_base = (
                        keyframe,
                        out,
                        stream.time_base,
                    )
                    writer.mux(packet)
    return path


def measure_one(path: str, mode: str, segment_s: float, frames: int, size: int) -> dict:
    """In this (fresh) process: decode `path` once through the pipeline's decode step."""
    limits = VideoConfig(
        decoder_threads=1, mode=mode, max_duration_s=3 * 3600.0, max_decode_s=3600.0
    )
    before, _ = rss_mb()
    started = time.process_time()
    row = decode_video(
        {"uri": path}, num_frames=frames, size=size, limits=limits, segment_s=segment_s
    )
    if row["error"] is not None:
        raise RuntimeError(row["error"])
    rss, peak = rss_mb()
    return {
        "before_mib": before,
        "peak_mib": peak,
        "after_mib": rss,
        "windows": 1 if segment_s <= 0 else len(row["segment_bounds"]),
        "frames_mib": row["frames"].nbytes / 2**20,
        "duration_s": row["duration_s"],
        "cpu_s": time.process_time() - started,
    }


def long_video(hours: float, frames: int, size: int, segment_s: float) -> None:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"one {hours:g}-hour 1080p h264 video vs 60 s of the same stream; load {load}")
    cases = [(m, s) for s in (0.0, segment_s) for m in ("exact", "keyframe")]
    with tempfile.TemporaryDirectory(prefix="ovml-long-") as folder:
        base = write_smooth_clip(Path(folder) / "base.mp4")
        videos = {
            "60 s": write_repeated(base, Path(folder) / "short.mp4", 60 // BASE_S),
            f"{hours:g} h": write_repeated(
                base, Path(folder) / "long.mp4", round(hours * 3600 / BASE_S)
            ),
        }
        for name, path in videos.items():
            print(f"  {name}: {path.stat().st_size / 2**20:.1f} MiB")
        print(
            f"{'video':>6} {'mode':>9} {'segment':>7} {'windows':>7} {'rss0 MiB':>9} "
            f"{'peak MiB':>9} {'growth':>7} {'frames':>7} {'CPU s':>6}"
        )
        results = {}
        for mode, seg in cases:
            for name, path in videos.items():
                command = [sys.executable, "-m", "bench.bench_decode_memory", "--case", str(path)]
                command += [mode, str(seg), "--frames", str(frames), "--size", str(size)]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                r = results[name, mode, seg] = json.loads(done.stdout.strip().splitlines()[-1])
                growth = r["peak_mib"] - r["before_mib"]
                print(
                    f"{name:>6} {mode:>9} {seg:>7g} {r['windows']:>7} {r['before_mib']:>9.1f} "
                    f"{r['peak_mib']:>9.1f} {growth:>7.1f} {r['frames_mib']:>7.1f} {r['cpu_s']:>6.1f}"
                )
    print("\nlong / 60 s: peak RSS ratio, growth ratio")
    long_name = f"{hours:g} h"
    for mode, seg in cases:
        a, b = results[long_name, mode, seg], results["60 s", mode, seg]
        ratio = (a["peak_mib"] - a["before_mib"]) / max(b["peak_mib"] - b["before_mib"], 1e-9)
        print(f"  {mode:>9} segment {seg:>4g}: {a['peak_mib'] / b['peak_mib']:.2f}x, {ratio:.2f}x")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load at the end {load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=8, help="T frames sampled per video")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--long-hours", type=float, help="one long 1080p video instead")
    parser.add_argument("--segment-s", type=float, default=60.0, help="windows (--long-hours)")
    parser.add_argument(
        "--case", nargs=3, metavar=("PATH", "MODE", "SEGMENT_S"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.case:
        path, mode, segment_s = args.case
        print(json.dumps(measure_one(path, mode, float(segment_s), args.frames, args.size)))
        return
    if args.long_hours:
        long_video(args.long_hours, args.frames, args.size, args.segment_s)
        return
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
