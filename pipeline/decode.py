"""The decode step of every Ray Data plan: a manifest row in, the same row with frames out.

`decode_video` is a plain function for `Dataset.map` (tagging and training both use it):

    ds.map(decode_video, fn_kwargs=dict(num_frames=8, size=224, limits=cfg.video), num_cpus=1)

It never raises for bad input. A video that cannot be sampled (missing, corrupt, truncated, not
a video, over the limits, a scheme outside the allow-list) gets `error` set and all-zero
frames, so every block keeps one fixed tensor shape; consumers must ignore frames of error rows.
With `segment_s` > 0 frames are [S, T, size, size, 3] per window (`sample_segments`; S varies
per row: Ray Data batches such rows as a variable-shaped tensor column) and `segment_bounds`
float64 [S, 2] holds each window's start and end in seconds; an error row has S = 1 all-zero
frames and bounds of shape [0, 2].
`error_kind` says whether trying the same file again may help: "transient" (a read failed or
stalled, time ran out, anything unexpected) or "permanent" (the file is the problem).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ovml_core.config import VideoConfig
from ovml_core.video import VideoDecodeError, sample_segments
from pipeline.manifest import Filesystems, check_scheme, resolve, uri_scheme

# Columns decode_video adds to a manifest row.
DECODED_COLUMNS = ("frames", "num_frames", "duration_s", "sampling", "error", "error_kind")


def decode_video(
    row: dict[str, Any],
    *,
    num_frames: int,
    size: int,
    limits: VideoConfig | None = None,
    allowed_schemes: Iterable[str] = ("file", "s3", "gs"),
    filesystems: Filesystems | None = None,
    segment_s: float = 0.0,
    max_segments: int = 720,
) -> dict[str, Any]:
    """`row` (with `uri`) plus frames uint8 [T, size, size, 3] ([S, T, size, size, 3] and
    segment_bounds with `segment_s` > 0), num_frames (in the video), duration_s, sampling
    ("exact" or "keyframe", see video.mode) and error (None when the frames are valid)."""
    uri = row.get("uri") or ""
    windows = {"segment_s": segment_s, "max_segments": max_segments}
    try:
        if not uri:
            raise ValueError("empty uri")
        check_scheme(uri, allowed_schemes)
        frames, bounds, meta = _sample(uri, num_frames, size, limits, filesystems, windows)
    # Untrusted input: whatever goes wrong with one video becomes that video's error row.
    except Exception as err:  # noqa: BLE001
        frames, bounds = np.zeros((1, num_frames, size, size, 3), np.uint8), np.zeros((0, 2))
        out = {
            "num_frames": None,
            "duration_s": None,
            "sampling": None,
            "error": f"{type(err).__name__}: {err}",
            "error_kind": error_kind(err),
        }
    else:
        out = {
            "num_frames": meta["frame_count"],
            "duration_s": meta["duration_s"],
            "sampling": meta["sampling"],
            "error": None,
            "error_kind": None,
        }
    if segment_s > 0:
        return {**row, "frames": frames, "segment_bounds": bounds, **out}
    return {**row, "frames": frames[0], **out}


def error_kind(err: Exception) -> str:
    """ "permanent" for what the file or its uri decides (not a video, over a limit, a refused
    scheme), "transient" for failures that may pass (I/O, time, anything unexpected)."""
    if isinstance(err, VideoDecodeError):
        return "transient" if err.transient else "permanent"
    return "permanent" if isinstance(err, ValueError) else "transient"


def _sample(
    uri: str,
    num_frames: int,
    size: int,
    limits: VideoConfig | None,
    filesystems: Filesystems | None,
    windows: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    if uri_scheme(uri) == "file":  # PyAV reads local files directly
        return sample_segments(uri, num_frames, size, limits=limits, **windows)
    fs, path = resolve(uri, filesystems)
    return sample_segments(path, num_frames, size, limits=limits, filesystem=fs, **windows)
