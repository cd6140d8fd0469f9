"""Per-stage throughput of a tagging run, so a user sees which side is the bottleneck.

Decode tasks time themselves (`decode_video_timed` adds `decode_s` to each row); the encode
actors time each batch and add both to one `StageMeter` actor. At the end the driver turns the
totals into a `StageReport`: what each stage achieved, and what it could do with every slot
busy. The stage with the lower capacity is the one to scale (decode: CPUs or
`tag.decode_num_cpus`; encode: GPUs / `tag.encode_actors`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray

from pipeline.decode import decode_video


def decode_video_timed(row: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """`pipeline.decode.decode_video` plus `decode_s`, the seconds this task spent on it."""
    started = time.perf_counter()
    out = decode_video(row, **kwargs)
    out["decode_s"] = time.perf_counter() - started
    return out


@dataclass
class StageTotals:
    videos: int = 0
    decode_busy_s: float = 0.0  # summed over decode tasks
    encode_busy_s: float = 0.0  # summed over encode actors
    encode_device: str = ""


@ray.remote(num_cpus=0)
class StageMeter:
    """Collects what the encode actors report, one call per batch."""

    def __init__(self):
        self.totals = StageTotals()

    def add(self, videos: int, decode_s: float, encode_s: float, device: str) -> None:
        self.totals.videos += videos
        self.totals.decode_busy_s += decode_s
        self.totals.encode_busy_s += encode_s
        self.totals.encode_device = device

    def get(self) -> StageTotals:
        return self.totals


@dataclass
class StageReport:
    wall_s: float
    videos: int  # one clip of T frames per video, so also the encode stage's clips
    decode_busy_s: float
    decode_slots: float  # decode tasks the cluster runs at once
    encode_busy_s: float
    encode_actors: int
    encode_device: str

    @property
    def videos_per_s(self) -> float:
        return self.videos / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def decode_capacity(self) -> float:
        """videos/s with every decode slot busy all the time."""
        busy = self.decode_busy_s / self.videos if self.videos else 0.0
        return self.decode_slots / busy if busy > 0 else float("inf")

    @property
    def encode_capacity(self) -> float:
        """clips/s with every encode actor busy all the time."""
        busy = self.encode_busy_s / self.videos if self.videos else 0.0
        return self.encode_actors / busy if busy > 0 else float("inf")

    @property
    def bottleneck(self) -> str:
        return "decode (CPU)" if self.decode_capacity < self.encode_capacity else "encode"

    def format_lines(self) -> list[str]:
        per_video = self.decode_busy_s / self.videos if self.videos else 0.0
        per_clip = self.encode_busy_s / self.videos if self.videos else 0.0
        return [
            f"  decode    {self.videos_per_s:.2f} videos/s achieved; busy "
            f"{self.decode_busy_s:.1f} task-s ({per_video:.3f} s per video); "
            f"capacity {self.decode_capacity:.2f} videos/s on {self.decode_slots:g} slots",
            f"  encode    {self.encode_device}: busy {self.encode_busy_s:.1f} s "
            f"({per_clip * 1000:.1f} ms per clip); capacity {self.encode_capacity:.2f} clips/s "
            f"on {self.encode_actors} actor(s)",
            f"  bottleneck {self.bottleneck}",
        ]


def decode_slots(decode_num_cpus: float, encode_actors: int, encode_num_cpus: float) -> float:
    """Decode tasks that fit beside the encode actors on the cluster's CPUs right now."""
    cpus = ray.cluster_resources().get("CPU", 0.0)
    return max(cpus - encode_actors * encode_num_cpus, 0.0) // decode_num_cpus


def stage_report(
    meter: ray.actor.ActorHandle, wall_s: float, slots: float, encode_actors: int
) -> StageReport:
    totals: StageTotals = ray.get(meter.get.remote())
    return StageReport(
        wall_s=wall_s,
        videos=totals.videos,
        decode_busy_s=totals.decode_busy_s,
        decode_slots=slots,
        encode_busy_s=totals.encode_busy_s,
        encode_actors=encode_actors,
        encode_device=totals.encode_device,
    )
