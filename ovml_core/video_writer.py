"""Encode RGB frames to a video file with PyAV (the benchmark's clips, the demo's clips)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import av
import numpy as np

# Lossless h264 (qp 0): x264's lossy rate control does not always write the same pixels twice
# for the same frames, and benchmark clips must be a pure function of their seed. No scene-cut
# keyframes, so a clip decodes in one pass.
H264_OPTIONS = {"preset": "veryfast", "qp": "0", "sc_threshold": "0"}


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    *,
    fps: int = 8,
    codec: str = "libx264",
    options: dict[str, str] | None = None,
) -> Path:
    """Write RGB uint8 frames [H, W, 3] (H and W even for yuv420p) and return the path.

    `options` are encoder options; default: `H264_OPTIONS` for libx264, none otherwise.
    """
    frames = list(frames)
    if not frames:
        raise ValueError("write_video needs at least one frame")
    height, width = frames[0].shape[:2]
    if options is None:
        options = H264_OPTIONS if codec == "libx264" else {}
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=dict(options))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path
