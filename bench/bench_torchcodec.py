"""torchcodec beside PyAV: CPU seconds per video to sample the same T frames (issue 16 item 3).

Every peer delivers the T frames displayed at the centres of T equal segments of the video, as
uint8 [T, S, S, 3] RGB, shorter side resized to S and centre-cropped:

    pyav-exact      ovml_core.video.sample_frames, mode exact (exact frames)
    tc-exact        torchcodec VideoDecoder(seek_mode="exact"): a scan of the file, then
                    get_frames_played_at(times); full-size RGB resized as ours (_square_rgb)
    tc-approx       the same with seek_mode="approximate" (no scan: seeks from the header)
    tc-approx-tf    approximate, with torchcodec's own Resize + CenterCrop decoder transforms
                    (resized inside FFmpeg before RGB, no full-size RGB frame)
    tc-via-ovml     ovml_core.video.sample_frames with video.decoder=torchcodec: our demux
                    plan, torchcodec's decode of those frames by number, our resize
    tc-nvdec        (--cuda) torchcodec on the GPU (NVDEC), resized there by its decoder
                    transforms, copied to the host
    pyav-full       PyAV decodes every frame and converts it to RGB (bench_decode's "naive"):
                    the full-decode baseline

The process is pinned to one core, every decoder runs one thread (torch too), so CPU seconds
are per-core costs. Peers run interleaved in rounds (order rotated per round); each cell is the
median over rounds; pyav-full runs once on videos over a minute. Frames are compared with
pyav-exact's: the times torchcodec reports for its frames (must equal ours) and the mean
absolute pixel difference (0-255; colour conversion and resize order differ slightly).

Videos: bench_decode's generated panning-noise h264 clips (x264 veryfast, 25 fps), 720p, 10 s
and 60 s, keyframe interval 30 and 250 frames, cached in --cache-dir. Needs torchcodec and the
FFmpeg shared libraries it loads (Debian: `apt-get install ffmpeg`), or --pyav-ffmpeg: the
process restarts itself with LD_LIBRARY_PATH on links, named as torchcodec looks for them, to
the FFmpeg that PyAV's wheel bundles (for a machine without FFmpeg, such as the GPU machine).
Run from the repository root:

    .venv/bin/python -m bench.bench_torchcodec
    .venv/bin/python -m bench.bench_torchcodec --seconds 10 --gops 30 --rounds 2
    python -m bench.bench_torchcodec --pyav-ffmpeg --cuda      # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from bench.bench_decode import Video, generated_videos, naive_full_decode, planned_video
from ovml_core.config import VideoConfig
from ovml_core.video import _square_rgb, sample_frames

LONG_VIDEO_S = 60.0  # pyav-full runs once on videos longer than this


@dataclass
class Clip:
    video: Video  # bench_decode's plan: pyav-exact's frames and their frame numbers
    times_s: list[float]  # the T target times, in the stream's time (torchcodec's seconds)
    picked_s: list[float]  # the times of the frames pyav-exact picked, same clock
    start_s: float  # the first shown frame's time: frame_times_s count from it


def stream_start_s(path: Path) -> float:
    """Time of the first shown frame, in seconds of the stream's clock (a demux, no decode)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        first = min(
            p.pts
            for p in container.demux(stream)
            if p.size and p.pts is not None and not p.is_discard
        )
        return float(first * Fraction(stream.time_base))


def planned_clip(path: Path, num_frames: int, size: int) -> Clip:
    video = planned_video(path, num_frames, size)
    _, meta = sample_frames(path, num_frames, size, VideoConfig(decoder_threads=1, mode="exact"))
    start = stream_start_s(path)
    times = [start + (2 * i + 1) * video.duration_s / (2 * num_frames) for i in range(num_frames)]
    return Clip(video, times, [start + t for t in meta["frame_times_s"]], start)


# ---------------------------------------------------------------- peers


def pyav_exact(num_frames: int) -> Callable:
    limits = VideoConfig(decoder_threads=1, mode="exact", max_decode_s=3600.0)

    def peer(clip: Clip, size: int):
        return sample_frames(clip.video.path, num_frames, size, limits)[0], None

    return peer


def via_ovml_torchcodec(num_frames: int) -> Callable:
    limits = VideoConfig(decoder_threads=1, mode="exact", max_decode_s=3600.0)
    limits.decoder = "torchcodec"

    def peer(clip: Clip, size: int):
        frames, meta = sample_frames(clip.video.path, num_frames, size, limits)
        return frames, [clip.start_s + t for t in meta["frame_times_s"]]

    return peer


def torchcodec_peer(seek_mode: str, decoder_transforms: bool) -> Callable:
    from torchcodec.decoders import VideoDecoder
    from torchcodec.transforms import CenterCrop, Resize

    def peer(clip: Clip, size: int):
        transforms = None
        if decoder_transforms:
            width, height = clip.video.width, clip.video.height
            scale = size / min(width, height)
            scaled = (max(size, round(height * scale)), max(size, round(width * scale)))
            transforms = [Resize(scaled), CenterCrop((size, size))]
        decoder = VideoDecoder(
            str(clip.video.path),
            seek_mode=seek_mode,
            num_ffmpeg_threads=1,
            dimension_order="NHWC",
            transforms=transforms,
        )
        batch = decoder.get_frames_played_at(clip.times_s)
        rgb = batch.data.numpy()
        if not decoder_transforms:
            rgb = np.stack(
                [
                    _square_rgb(av.VideoFrame.from_ndarray(f, format="rgb24"), size, 0, Fraction(1))
                    for f in rgb
                ]
            )
        return rgb, batch.pts_seconds.tolist()

    return peer


def torchcodec_cuda(clip: Clip, size: int):
    from torchcodec.decoders import VideoDecoder
    from torchcodec.transforms import CenterCrop, Resize

    width, height = clip.video.width, clip.video.height
    scale = size / min(width, height)
    scaled = (max(size, round(height * scale)), max(size, round(width * scale)))
    decoder = VideoDecoder(
        str(clip.video.path),
        device="cuda",
        seek_mode="approximate",
        dimension_order="NHWC",
        transforms=[Resize(scaled), CenterCrop((size, size))],
    )
    batch = decoder.get_frames_played_at(clip.times_s)
    return batch.data.cpu().numpy(), batch.pts_seconds.tolist()


def pyav_full(clip: Clip, size: int):
    return naive_full_decode(clip.video, size), None


def peers(num_frames: int, cuda: bool) -> dict[str, Callable]:
    named = {
        "pyav-exact": pyav_exact(num_frames),
        "tc-exact": torchcodec_peer("exact", False),
        "tc-approx": torchcodec_peer("approximate", False),
        "tc-approx-tf": torchcodec_peer("approximate", True),
        "pyav-full": pyav_full,
    }
    named["tc-via-ovml"] = via_ovml_torchcodec(num_frames)
    if cuda:
        named["tc-nvdec"] = torchcodec_cuda
    return named


# ---------------------------------------------------------------- timing


@dataclass
class Runs:
    cpu_s: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    mad: float = 0.0  # worst mean abs diff from pyav-exact's frames
    time_error_s: float = 0.0  # worst |reported frame time - pyav-exact's|


def timed_run(peer: Callable, clip: Clip, size: int, runs: Runs) -> None:
    cpu, wall = time.process_time(), time.perf_counter()
    frames, times = peer(clip, size)
    runs.wall_s.append(time.perf_counter() - wall)
    runs.cpu_s.append(time.process_time() - cpu)
    reference = clip.video.reference
    if frames.shape != reference.shape:
        raise RuntimeError(f"{clip.video.name}: frames {frames.shape}, want {reference.shape}")
    diff = np.abs(frames.astype(np.int16) - reference.astype(np.int16)).mean()
    runs.mad = max(runs.mad, float(diff))
    if times is not None:
        error = max(abs(a - b) for a, b in zip(times, clip.picked_s, strict=True))
        runs.time_error_s = max(runs.time_error_s, error)


def load_text() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(clips: list[Clip], named: dict[str, Callable], size: int, rounds: int) -> dict:
    results = {(c.video.name, p): Runs() for c in clips for p in named}
    names = list(named)
    for round_index in range(rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for clip in clips:
            for name in order:
                if round_index and name == "pyav-full" and clip.video.duration_s > LONG_VIDEO_S - 1:
                    continue
                timed_run(named[name], clip, size, results[clip.video.name, name])
        print(f"round {round_index + 1}/{rounds} done, load {load_text()}", flush=True)
    return results


def report(clips: list[Clip], names: list[str], results: dict) -> None:
    for key, label in (("cpu_s", "CPU"), ("wall_s", "wall-clock")):
        print(
            f"\n{label} seconds per video, median over runs; x = cost / pyav-exact's (<1: cheaper)"
        )
        print(f"{'video':<24}" + "".join(f" {n:>19}" for n in names))
        for clip in clips:
            cost = {n: statistics.median(getattr(results[clip.video.name, n], key)) for n in names}
            cells = "".join(
                f" {cost[n]:>10.3f} {cost[n] / cost['pyav-exact']:>7.2f}x" for n in names
            )
            print(f"{clip.video.name:<24}{cells}")
    print("\nagreement with pyav-exact, worst video: mean abs pixel diff (0-255), frame time error")
    for name in names:
        runs = [results[c.video.name, name] for c in clips]
        mad = max(r.mad for r in runs)
        error = max(r.time_error_s for r in runs)
        counts = sorted({len(r.cpu_s) for r in runs})
        print(f"  {name:<14} diff {mad:6.3f}  time error {error * 1000:7.3f} ms  runs {counts}")


def restart_on_pyav_ffmpeg() -> None:
    """Run this command again with LD_LIBRARY_PATH on links to PyAV's bundled FFmpeg libraries
    (renamed in the wheel, e.g. libavcodec-5e6b81c2.so.62.28.102 -> libavcodec.so.62)."""
    if os.environ.get("OVML_PYAV_FFMPEG"):
        return
    bundled = Path(av.__file__).parent.parent / "av.libs"
    links = Path(tempfile.mkdtemp(prefix="ovml-pyav-ffmpeg-"))
    for lib in bundled.glob("lib*.so*"):
        name = re.fullmatch(r"(lib(?:av|sw)\w+)-\w+\.so\.(\d+).*", lib.name)
        if name:
            (links / f"{name[1]}.so.{name[2]}").symlink_to(lib)
    # The bundled libraries find each other by their renamed names, in their own folder.
    paths = [str(links), str(bundled), os.environ.get("LD_LIBRARY_PATH", "")]
    env = dict(os.environ, OVML_PYAV_FFMPEG="1", LD_LIBRARY_PATH=":".join(p for p in paths if p))
    os.execve(sys.executable, [sys.executable, "-m", "bench.bench_torchcodec", *sys.argv[1:]], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=8, help="T, frames per video")
    parser.add_argument("--size", type=int, default=224, help="S, output side")
    parser.add_argument("--core", type=int, default=0, help="the one CPU core to run on")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/ovml/bench_decode")
    parser.add_argument("--seconds", type=int, nargs="+", default=[10, 60])
    parser.add_argument("--gops", type=int, nargs="+", default=[30, 250])
    parser.add_argument("--height", type=int, default=720, help="720 or 1080")
    parser.add_argument("--cuda", action="store_true", help="add tc-nvdec (torchcodec on CUDA)")
    parser.add_argument("--pyav-ffmpeg", action="store_true", help="torchcodec on PyAV's FFmpeg")
    args = parser.parse_args()
    if args.pyav_ffmpeg:
        restart_on_pyav_ffmpeg()
    import torch
    import torchcodec

    torch.set_num_threads(1)
    os.sched_setaffinity(0, {args.core})
    width = {720: 1280, 1080: 1920}[args.height]
    specs = [(width, args.height, s, g) for s in args.seconds for g in args.gops]
    paths = generated_videos(args.cache_dir, specs)
    print(
        f"PyAV {av.__version__} (libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))}),"
        f" torchcodec {torchcodec.__version__} (FFmpeg {torchcodec.ffmpeg_major_version}), "
        f"torch {torch.__version__}; core {args.core} of {os.cpu_count()}, 1 decoder thread, "
        f"T={args.frames}, S={args.size}, {args.rounds} rounds; load {load_text()}",
        flush=True,
    )
    clips = [planned_clip(p, args.frames, args.size) for p in paths]
    named = peers(args.frames, args.cuda)
    results = measure(clips, named, args.size, args.rounds)
    report(clips, list(named), results)
    print(f"\nload at the end {load_text()}")


if __name__ == "__main__":
    main()
