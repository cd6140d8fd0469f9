"""Per-stage throughput of a tagging run, so a user sees which side is the bottleneck.

Decode tasks time themselves (`decode_video_timed` adds `decode_s` to each row); the encode
actors time each batch and add both to one `StageMeter` actor. At the end the driver turns the
totals into a `StageReport`: what each stage achieved, and what it could do with every slot
busy, and when the first batch came out (start-up) apart from the steady rate after it. The
stage with the lower capacity is the one to scale (decode: CPUs or `tag.decode_num_cpus`;
encode: GPUs / `tag.encode_actors`). Before the plan, `measure_stage_costs` times both stages on
a few videos so the job can size them (`pipeline.resources.size_tagging`).

Kept free of model imports: decode workers import this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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


COST_PROBE_VIDEOS = 2  # videos the driver decodes to size the stages (pipeline.resources)


@dataclass(frozen=True)
class StageCosts:
    """Seconds per video of each stage, measured on the driver before the plan starts."""

    decode_s: float
    encode_s: float

    @property
    def encode_share(self) -> float:
        total = self.decode_s + self.encode_s
        return self.encode_s / total if total > 0 else 0.0


def measure_stage_costs(
    rows: list[dict[str, Any]], encode_s: Callable[[int], float], **decode_kwargs: Any
) -> StageCosts | None:
    """Decode the first COST_PROBE_VIDEOS of `rows` here and time `encode_s(clips)` for the
    clips they give; None when none of them decodes (sizing then falls back to defaults)."""
    decode, clips = [], []
    for row in rows[:COST_PROBE_VIDEOS]:
        out = decode_video_timed(row, **decode_kwargs)
        if out["error"] is None:
            decode.append(out["decode_s"])
            frames = out["frames"]
            clips.append(1 if frames.ndim == 4 else len(frames))
    if not decode:
        return None
    per_clip = encode_s(max(clips)) / max(clips)
    return StageCosts(sum(decode) / len(decode), per_clip * sum(clips) / len(clips))


@dataclass
class StageTotals:
    videos: int = 0
    clips: int = 0
    decode_busy_s: float = 0.0  # summed over decode tasks
    encode_busy_s: float = 0.0  # summed over encode actors
    encode_device: str = ""
    model_load_s: float = 0.0  # the slowest encode actor's model + label load
    first_batch_at: float | None = None  # time.time() when the first batch was encoded
    first_batch_videos: int = 0
    last_batch_at: float | None = None


class StageRecorder:
    """Collects what the encoder reports: its start-up, then one call per batch. In the driver
    as it is (tag.encode_in driver); shared by the encode actors as a `StageMeter`."""

    def __init__(self):
        self.totals = StageTotals()

    def loaded(self, seconds: float) -> None:
        self.totals.model_load_s = max(self.totals.model_load_s, seconds)

    def add(self, videos: int, clips: int, decode_s: float, encode_s: float, device: str) -> None:
        t, now = self.totals, time.time()
        if t.first_batch_at is None:
            t.first_batch_at, t.first_batch_videos = now, videos
        t.last_batch_at = now
        t.videos += videos
        t.clips += clips
        t.decode_busy_s += decode_s
        t.encode_busy_s += encode_s
        t.encode_device = device

    def get(self) -> StageTotals:
        return self.totals


StageMeter = ray.remote(num_cpus=0)(StageRecorder)


def start_meter() -> ray.actor.ActorHandle:
    """A StageMeter on the driver's node."""
    from pipeline.resources import on_driver_node  # driver only: decode workers skip torch

    return StageMeter.options(scheduling_strategy=on_driver_node()).remote()


@dataclass
class StageReport:
    wall_s: float
    videos: int
    decode_busy_s: float
    decode_slots: float  # decode tasks the cluster runs at once
    encode_busy_s: float
    encode_actors: int  # 1 for the driver (tag.encode_in)
    encode_device: str
    clips: int = 0  # clips the encoder saw (one per video, or one per segment)
    model_load_s: float = 0.0
    first_batch_s: float = 0.0  # from the plan's start to the first encoded batch
    first_batch_videos: int = 0
    steady_s: float = 0.0  # from the first encoded batch to the last
    in_driver: bool = False

    @property
    def videos_per_s(self) -> float:
        return self.videos / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steady_videos_per_s(self) -> float:
        """Throughput once the stages run: the videos after the first batch over the time
        from the first batch to the last (start-up not counted)."""
        after = self.videos - self.first_batch_videos
        return after / self.steady_s if self.steady_s > 0 and after > 0 else self.videos_per_s

    @property
    def decode_capacity(self) -> float:
        """videos/s with every decode slot busy all the time."""
        busy = self.decode_busy_s / self.videos if self.videos else 0.0
        return self.decode_slots / busy if busy > 0 else float("inf")

    @property
    def encode_capacity(self) -> float:
        """clips/s with every encode actor busy all the time."""
        clips = self.clips or self.videos
        busy = self.encode_busy_s / clips if clips else 0.0
        return self.encode_actors / busy if busy > 0 else float("inf")

    @property
    def bottleneck(self) -> str:
        clips_per_video = (self.clips or self.videos) / self.videos if self.videos else 1.0
        encode_videos = self.encode_capacity / clips_per_video
        return "decode (CPU)" if self.decode_capacity < encode_videos else "encode"

    def format_lines(self) -> list[str]:
        per_video = self.decode_busy_s / self.videos if self.videos else 0.0
        clips = self.clips or self.videos
        per_clip = self.encode_busy_s / clips if clips else 0.0
        encoders = "the driver" if self.in_driver else f"{self.encode_actors} actor(s)"
        loaded = (
            ""
            if self.in_driver
            else f" (encode actors' model and labels {self.model_load_s:.1f} s)"
        )
        return [
            f"  start     first batch after {self.first_batch_s:.1f} s{loaded}; then "
            f"{self.steady_videos_per_s:.2f} videos/s steady",
            f"  decode    {self.videos_per_s:.2f} videos/s achieved; busy "
            f"{self.decode_busy_s:.1f} task-s ({per_video:.3f} s per video); "
            f"capacity {self.decode_capacity:.2f} videos/s on {self.decode_slots:g} slots",
            f"  encode    {self.encode_device}: busy {self.encode_busy_s:.1f} s "
            f"({per_clip * 1000:.1f} ms per clip); capacity {self.encode_capacity:.2f} clips/s "
            f"in {encoders}",
            f"  bottleneck {self.bottleneck}",
        ]


def stage_report(
    totals: StageTotals, started_at: float, slots: float, encode_actors: int, in_driver: bool
) -> StageReport:
    """The report of a plan started at `started_at` (time.time()) and finished now."""
    now = time.time()
    first = totals.first_batch_at or now
    return StageReport(
        wall_s=now - started_at,
        videos=totals.videos,
        decode_busy_s=totals.decode_busy_s,
        decode_slots=slots,
        encode_busy_s=totals.encode_busy_s,
        encode_actors=encode_actors,
        encode_device=totals.encode_device,
        clips=totals.clips,
        model_load_s=totals.model_load_s,
        first_batch_s=first - started_at,
        first_batch_videos=totals.first_batch_videos,
        steady_s=(totals.last_batch_at or first) - first,
        in_driver=in_driver,
    )
