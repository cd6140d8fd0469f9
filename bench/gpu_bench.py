"""GPU readiness measurements, written as one JSON: decode, video encoder, tagging end to end.

    .venv/bin/python -m bench.gpu_bench --out results.json            # on a GPU machine
    .venv/bin/python -m bench.gpu_bench --out results.json --dry-run  # same code, tiny, CPU
    .venv/bin/python -m bench.gpu_bench --out decode.json --sections decode

Sections (each one a key of the JSON):
- decode: seconds per video of `ovml_core.video.sample_frames` on one core (decoder_threads=1),
  by video length and sampling mode, on generated h264 clips (moving texture, GOP 250).
- encoder: `OVMLModel.encode_video` clips/s from uint8 frames in pinned host memory (so the
  host->device copy and the on-device preprocessing are included), bf16 autocast on CUDA,
  over a batch sweep, eager / channels-last / torch.compile; forward FLOPs per clip from
  torch.utils.flop_counter and the achieved TFLOP/s against the device's bf16 peak.
- tagging: `pipeline.tagging.run_tagging` (what `jobs/tag.py` runs) on generated clips, every
  CPU core available to decode tasks; videos/s and the per-stage report.
`bench/gpu_check.sh` runs this after the GPU tests; `--dry-run` is what tests/test_gpu_bench.py
runs on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ovml_core.capacity import bf16_peak_tflops
from ovml_core.config import Config, VideoConfig
from ovml_core.model import OVMLModel, create_model
from ovml_core.video import sample_frames
from tests.videos import write_video

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("decode", "encoder", "tagging")
VARIANTS = ("eager", "channels_last", "compile")
LABELS = ["dog", "cat", "surfing", "rabbit", "bicycle", "car", "forest", "night"]
GOP = 250  # libx264's default keyframe interval


@dataclass
class Settings:
    """What a run measures; `full()` on a GPU machine, `dry()` for the CPU dry run."""

    config: str
    overrides: list[str]
    decode_lengths_s: list[float]
    video_width: int
    video_height: int
    batches: list[int]
    compile_batches: list[int]
    compile_backend: str
    iters: int
    decode_repeats: int
    tag_videos: int
    tag_video_s: float
    tag_batch_size: int
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))

    @classmethod
    def full(cls) -> Settings:
        return cls(
            config=str(REPO / "configs" / "tiny.yaml"),
            overrides=[
                "model.clip_model=ViT-B-16",
                "model.label_encoder=prompt",
                "model.num_frames=8",
                "video.decoder_threads=1",
                "video.max_decode_s=600",
            ],
            decode_lengths_s=[10.0, 60.0, 300.0],
            video_width=1280,
            video_height=720,
            batches=[8, 16, 32, 64, 128],
            compile_batches=[64],
            compile_backend="inductor",
            iters=10,
            decode_repeats=1,
            tag_videos=600,
            tag_video_s=10.0,
            tag_batch_size=64,
        )

    @classmethod
    def dry(cls) -> Settings:
        return cls(
            config=str(REPO / "configs" / "tiny.yaml"),
            overrides=[
                "model.label_encoder=prompt",
                "video.decoder_threads=1",
                "video.max_decode_s=600",
            ],
            decode_lengths_s=[2.0],
            video_width=320,
            video_height=180,
            batches=[1, 2],
            compile_batches=[2],
            # inductor spends a minute compiling on a CPU; eager still runs dynamo's tracing.
            compile_backend="eager",
            iters=2,
            decode_repeats=1,
            tag_videos=6,
            tag_video_s=2.0,
            tag_batch_size=2,
        )


def median_seconds(step: Callable[[], None], iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):  # compilation, allocator, kernel selection
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------- decode


def textured_frame(index: int, width: int, height: int) -> np.ndarray:
    """A frame of smoothly moving texture with light grain: a bitrate nearer real footage
    than flat test patterns, so decode costs are not flattered."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = index * 0.15
    r = np.sin(x / 23.0 + phase) + np.cos(y / 31.0 - phase)
    g = np.sin((x + y) / 41.0 + 2 * phase)
    b = np.cos(np.hypot(x - width / 2, y - height / 2) / 17.0 - phase)
    image = np.stack([r, g, b], axis=-1) * 50 + 128
    grain = np.random.default_rng(index).integers(-3, 4, image.shape[:2] + (1,))
    return np.clip(image + grain, 0, 255).astype(np.uint8)


SEGMENT_S = 10.0  # longer clips repeat an encoded segment of this length


def generated_clip(work: Path, seconds: float, width: int, height: int, fps: int = 30) -> Path:
    """An h264 clip of `seconds`: up to SEGMENT_S encoded, longer ones that segment repeated
    by remuxing (the stream stays valid, keyframes every GOP frames or at each repeat)."""
    path = work / f"clip-{width}x{height}-{seconds:g}s.mp4"
    if path.exists():  # reused across runs with the same --work
        return path
    segment_s = min(seconds, SEGMENT_S)
    segment = work / f"segment-{width}x{height}-{segment_s:g}s.mp4"
    if not segment.exists():
        frames = (textured_frame(i, width, height) for i in range(round(segment_s * fps)))
        write_video(segment.with_suffix(".tmp.mp4"), frames, fps=fps, gop=GOP).rename(segment)
    if seconds <= SEGMENT_S:
        return segment
    repeat_segment(segment, path.with_suffix(".tmp.mp4"), math.ceil(seconds / segment_s))
    return path.with_suffix(".tmp.mp4").rename(path)


def repeat_segment(source: Path, path: Path, copies: int) -> None:
    with av.open(str(source)) as src, av.open(str(path), "w") as dst:
        stream = src.streams.video[0]
        out = dst.add_stream_from_template(stream)
        packets = [p for p in src.demux(stream) if p.size]
        span = max(p.pts for p in packets) + packets[0].duration - min(p.pts for p in packets)
        for copy in range(copies):
            for p in packets:
                shifted = av.Packet(bytes(p))
                shifted.pts, shifted.dts = p.pts + copy * span, p.dts + copy * span
                shifted.time_base, shifted.is_keyframe = p.time_base, p.is_keyframe
                shifted.stream = out
                dst.mux(shifted)


def decode_seconds(clip: Path, cfg: Config, size: int, mode: str, repeats: int) -> dict:
    """Median wall and CPU seconds of one single-threaded `sample_frames` call. CPU seconds
    are the core-seconds a video costs, and stay honest on a machine shared with other jobs."""
    limits = VideoConfig(**{**asdict(cfg.video), "mode": mode, "decoder_threads": 1})
    wall, cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        _, meta = sample_frames(clip, cfg.model.num_frames, size, limits)
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return {
        "seeks": meta["seeks"],
        "wall_s": statistics.median(wall),
        "seconds_per_video": statistics.median(cpu),
    }


def measure_decode(s: Settings, cfg: Config, size: int, work: Path) -> list[dict]:
    rows = []
    for seconds in s.decode_lengths_s:
        clip = generated_clip(work, seconds, s.video_width, s.video_height)
        # A full decode of a long video is what exact sampling exists to avoid: not worth the time.
        modes = ("sequential", "seek", "exact") if seconds <= 60 else ("seek", "exact")
        for mode in modes:
            timing = decode_seconds(clip, cfg, size, mode, s.decode_repeats)
            rows.append(
                {
                    "length_s": seconds,
                    "mode": mode,
                    "video": f"{s.video_width}x{s.video_height} h264 30 fps GOP {GOP}",
                    "mbit_s": round(clip.stat().st_size * 8 / seconds / 1e6, 2),
                    "frames_sampled": cfg.model.num_frames,
                    **timing,
                    "videos_per_core_s": 1.0 / timing["seconds_per_video"],
                }
            )
            print(
                f"decode {seconds:g} s {mode:<10} {timing['seconds_per_video']:.3f} CPU s, "
                f"{timing['wall_s']:.3f} wall s per video",
                flush=True,
            )
    return rows


# ---------------------------------------------------------------- encoder


def forward_flops(model: OVMLModel, device: str) -> int:
    """FLOPs of one clip's video-encoder forward (matmuls, convolutions, attention). Counted
    with autograd on (under no_grad nn.MultiheadAttention takes a fused path the counter does
    not see) and attention as plain matmuls (fused CPU attention is not counted either); the
    arithmetic is the same. Equals ovml_core.capacity.video_encoder_flops (tested)."""
    size = model.image_size
    x = torch.zeros(1, model.num_frames, 3, size, size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model.visual(x)
    return counter.get_total_flops()


def host_frames(batch: int, model: OVMLModel, device: str) -> torch.Tensor:
    """uint8 clips as the encode actor holds them: in pinned host memory when on CUDA."""
    size = model.image_size
    shape = (batch, model.num_frames, size, size, 3)
    frames = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator())
    return frames.pin_memory() if device == "cuda" else frames


def prepared_model(cfg: Config, variant: str, device: str, backend: str) -> OVMLModel:
    model = create_model(cfg.model, device)
    if variant == "channels_last":
        model.visual.to(memory_format=torch.channels_last)
    if variant == "compile":
        model.visual.compile(backend=backend, dynamic=False)
    return model


def encode_step(model: OVMLModel, frames: torch.Tensor, device: str) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), torch.autocast(device, torch.bfloat16, device == "cuda"):
            model.encode_video(frames)
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def copy_ms(frames: torch.Tensor, device: str, iters: int) -> float:
    """Milliseconds to copy a uint8 batch to `device` and wait for it."""

    def copy() -> None:
        frames.to(device, non_blocking=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return 1000 * median_seconds(copy, iters)


def measure_encoder(s: Settings, cfg: Config, device: str, out: dict, save: Callable) -> None:
    """Fills `out` row by row (and saves), so a run cut short by its time limit keeps what it
    measured."""
    probe = create_model(cfg.model, device)
    flops_per_clip = forward_flops(probe, device)
    peak = bf16_peak_tflops(torch.cuda.get_device_name() if device == "cuda" else "")
    biggest = host_frames(max(s.batches), probe, device)
    out.update(
        clip_model=cfg.model.clip_model,
        temporal=cfg.model.temporal,
        num_frames=cfg.model.num_frames,
        image_size=probe.image_size,
        dtype="bfloat16 autocast" if device == "cuda" else "float32",
        compile_backend=s.compile_backend,
        flops_per_clip=flops_per_clip,
        bf16_peak_tflops=peak,
        # The host->device copy of the largest batch, uint8: pinned (as the actor sends it)
        # and pageable, to set against the encode time of the same batch.
        copy_batch=max(s.batches),
        copy_ms_pinned=copy_ms(biggest, device, s.iters),
        copy_ms_pageable=copy_ms(biggest.clone(), device, s.iters),
        rows=[],
    )
    del probe, biggest
    for variant in VARIANTS:
        model = prepared_model(cfg, variant, device, s.compile_backend)
        for batch in s.compile_batches if variant == "compile" else s.batches:
            frames = host_frames(batch, model, device)
            seconds = median_seconds(encode_step(model, frames, device), s.iters)
            clips_s = batch / seconds
            tflops = flops_per_clip * clips_s / 1e12
            out["rows"].append(
                {
                    "variant": variant,
                    "batch": batch,
                    "clips_per_s": clips_s,
                    "achieved_tflops": tflops,
                    "fraction_of_peak": tflops / peak if peak else None,
                }
            )
            save()
            print(f"encoder {variant:<13} batch {batch:>4} {clips_s:9.1f} clips/s", flush=True)
        del model


# ---------------------------------------------------------------- tagging end to end


def measure_tagging(s: Settings, cfg: Config, work: Path) -> dict:
    import ray

    from pipeline.tagging import run_tagging

    clip = generated_clip(work, s.tag_video_s, s.video_width, s.video_height)
    ids = [f"video-{i:05d}" for i in range(s.tag_videos)]
    uris = []
    for video_id in ids:  # hard links: many manifest entries, one encoding on disk
        uri = work / "videos" / f"{video_id}.mp4"
        uri.parent.mkdir(exist_ok=True)
        if not uri.exists():
            os.link(clip, uri)
        uris.append(str(uri))
    manifest = work / "manifest.parquet"
    pq.write_table(pa.table({"video_id": ids, "uri": uris}), manifest)
    labels = work / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        summary = run_tagging(cfg, str(manifest), str(work / "tags"), labels=str(labels), full=True)
    finally:
        ray.shutdown()
    print(summary.format(), flush=True)
    return {
        "videos": s.tag_videos,
        "video": f"{s.video_width}x{s.video_height} h264 {s.tag_video_s:g} s",
        "cpu_cores": cores,
        "batch_size": cfg.tag.batch_size,
        "ok": summary.ok,
        "errored": summary.errored,
        "seconds": summary.seconds,
        "videos_per_s": summary.videos_per_s,
        "stages": asdict(summary.stages),
    }


# ---------------------------------------------------------------- the run


def test_results(junit: Path) -> dict:
    """Pass / fail / skip counts and the names (with reasons) of what did not pass."""
    root = ET.parse(junit).getroot()
    outcome: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        problem = case.find("failure")
        problem = problem if problem is not None else case.find("error")
        skipped = case.find("skipped")
        if problem is not None:
            outcome["failed"].append(f"{name}: {problem.get('message', '')[:300]}")
        elif skipped is not None:
            outcome["skipped"].append(f"{name}: {skipped.get('message', '')[:300]}")
        else:
            outcome["passed"].append(name)
    return {key: {"count": len(v), "names": v} for key, v in outcome.items()}


def step_results(steps: Path) -> list[dict]:
    """gpu_check.sh's step log: `name exit_code seconds` per line (124: hit its time limit)."""
    rows = []
    for line in steps.read_text().splitlines():
        name, code, seconds = line.split()
        rows.append({"step": name, "exit_code": int(code), "seconds": int(seconds)})
    return rows


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def environment(device: str) -> dict:
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
        "cpu_cores": os.cpu_count(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run(s: Settings, work: Path, out: Path, junit: Path | None, steps: Path | None) -> dict:
    """Measures `s.sections` into `out`, keeping what earlier runs wrote there (gpu_check.sh
    runs each section in its own process, under its own time limit)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = Config.from_yaml(s.config, [*s.overrides, f"tag.batch_size={s.tag_batch_size}"])
    results: dict = json.loads(out.read_text()) if out.exists() else {}
    results.update(environment=environment(device), settings=asdict(s))

    def save() -> None:
        out.with_suffix(".tmp").write_text(json.dumps(results, indent=1) + "\n")
        out.with_suffix(".tmp").rename(out)

    if junit is not None:
        results["tests"] = test_results(junit)
    if steps is not None:
        results["steps"] = step_results(steps)
    if "decode" in s.sections:
        size = create_model(cfg.model).image_size
        results["decode"] = measure_decode(s, cfg, size, work)
    save()
    if "encoder" in s.sections:
        results["encoder"] = {}
        measure_encoder(s, cfg, device, results["encoder"], save)
    if "tagging" in s.sections:
        results["tagging"] = measure_tagging(s, cfg, work)
    save()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write or update")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU")
    parser.add_argument("--sections", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--work", help="folder for generated clips (default: a temp folder)")
    parser.add_argument("--junit", type=Path, help="pytest --junitxml file to include")
    parser.add_argument("--steps", type=Path, help="gpu_check.sh step log to include")
    args = parser.parse_args(argv)
    settings = Settings.dry() if args.dry_run else Settings.full()
    settings.sections = args.sections
    work = Path(args.work or tempfile.mkdtemp(prefix="ovml-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    run(settings, work, args.out, args.junit, args.steps)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
