"""Bounded frame sampling with PyAV: T frames at the centres of T equal segments of a video, or
of each of its windows (`sample_segments`, for tags per segment).

`sample_frames` first demuxes the video stream without decoding it (about 2% of the cost of a
decode) to learn every frame's presentation time and where the keyframes are. That table gives
an exact duration for any container or frame rate, and a decode plan: decode straight on while
no keyframe lies between the current position and the next target, seek when one does. Short
clips therefore decode in one pass and long ones seek per sample, without a length threshold.
Only the chosen frames are converted to RGB, resized and centre-cropped by swscale.

Windows (`segment_windows`) are planned together: the T targets of every window form one sorted
list that one forward pass over the video serves, so no frame is decoded twice and no window
seeks back; memory is the S x T output frames, at most `max_segments` x T.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import av
import numpy as np

from ovml_core.config import VideoConfig, torchcodec_decoder

# Remote videos are fetched in reads of this size (for object stores each read is a request).
_REMOTE_READ_BYTES = 8 << 20

# The demuxers FFmpeg may use, by FFmpeg's names ("mov" is mp4/m4v/mov/3gp, "matroska" is
# mkv/webm). Left out on purpose: raw-frame formats (yuv4mpeg, rawvideo), whose first packet
# is a whole uncompressed frame of whatever size the header declares, read before any size
# check; playlists and concat lists, which make FFmpeg open other files; still images.
CONTAINER_FORMATS = (
    "mov",
    "matroska",
    "avi",
    "mpegts",
    "mpeg",
    "mpegvideo",
    "flv",
    "asf",
    "ogg",
    "gif",
    "ivf",
    "h264",
    "hevc",
    "m4v",
)


class VideoDecodeError(Exception):
    """A video cannot be sampled; the message names the input and what is wrong with it.

    `transient`: the failure may pass on its own (a read that failed or stalled, a decode that
    ran out of time on a busy machine), so the video is worth trying again as it is; otherwise
    the file itself is the problem (not a video, over a limit, cut off) until it changes."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


@dataclass
class _FrameTable:
    """Presentation times of the stream's frames, from a demux pass (stream time_base ticks).

    Without timestamps (raw elementary streams) times are frame ordinals and `has_pts` is False.
    """

    times: list[int]  # sorted
    keyframes: list[int]  # sorted
    end: int  # time just after the last frame
    has_pts: bool

    @property
    def start(self) -> int:
        return self.times[0]


class _Deadline:
    def __init__(self, uri: str, seconds: float):
        self.uri, self.seconds = uri, seconds
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def check(self) -> None:
        if self.elapsed() > self.seconds:
            raise VideoDecodeError(
                f"{self.uri}: decoding took longer than video.max_decode_s={self.seconds:g} s",
                transient=True,
            )


def sample_frames(
    uri: str | os.PathLike,
    num_frames: int,
    size: int,
    limits: VideoConfig | None = None,
    filesystem: Any = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode `num_frames` frames at the centres of equal segments, as uint8 [T, size, size, 3].

    Each frame is resized so its shorter side is `size`, centre-cropped, and turned upright by
    its rotation metadata. A video with fewer frames than T repeats frames. `uri` is a local
    path, a file:// URI, or any URI pyarrow.fs understands (s3://, gs://); with `filesystem` (a
    pyarrow FileSystem) it is a path inside that filesystem. `limits` bounds pixels, duration
    and wall-clock decode time. Raises VideoDecodeError for anything that is not a readable video
    within the limits. Meta: duration_s, fps, codec, width and height (as displayed), rotation,
    frame_count, frame_times_s (of the sampled frames, from the stream's start), seeks,
    decoded_frames (frames the decoder produced; both None with video.decoder=torchcodec), sampling ("exact", or "keyframe" when
    video.mode keyframe or auto used keyframes), decode_s.
    """
    frames, _, meta = sample_segments(uri, num_frames, size, 0.0, limits, filesystem)
    return frames[0], meta


def sample_segments(
    uri: str | os.PathLike,
    num_frames: int,
    size: int,
    segment_s: float,
    limits: VideoConfig | None = None,
    filesystem: Any = None,
    max_segments: int = 720,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """`sample_frames` per window of `segment_s` seconds (`segment_windows`; 0 = the whole video
    is one window): uint8 frames [S, T, size, size, 3], T at the centres of T equal parts of
    each window, and the windows' bounds float64 [S, 2] (start, end in seconds from the
    stream's start). All S x T frames come from one forward decode pass (see the module
    docstring); meta as `sample_frames`'s, frame_times_s for all S x T frames in order."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    limits = limits or VideoConfig()
    uri = os.fspath(uri)
    deadline = _Deadline(uri, limits.max_decode_s)
    with _local_source(uri, filesystem, limits, deadline) as source:
        with _container(uri, source) as container:
            stream = _checked_video_stream(uri, container, limits)
            table = _frame_table(uri, container, stream, deadline)
            tick = _tick(stream, table)
            duration_s = float((table.end - table.start) * tick)
        if duration_s > limits.max_duration_s:
            raise VideoDecodeError(_too_long(uri, duration_s, limits))
        segment = Fraction(segment_s) / tick if segment_s > 0 else 0
        windows = segment_windows(table.end - table.start, segment, max_segments)
        targets, reach = _window_targets(table, windows, num_frames)
        keyframes = _keyframe_plan(table, targets, reach, limits.mode, duration_s)
        with _container(uri, source) as container:
            stream = _configured_stream(container, limits, frame_threads=keyframes is None)
            if limits.decoder == "torchcodec":
                frames, picked, rotation = _decode_torchcodec(
                    uri, source, stream, table, tick, keyframes or targets, size, limits, deadline
                )
                seeks = decoded = None  # torchcodec plans its own seeks and does not count them
            elif keyframes is None:
                frames, picked, rotation, seeks, decoded = _decode_targets(
                    uri, container, stream, table, targets, size, limits.mode, deadline
                )
            else:
                frames, rotation, seeks = _decode_keyframes(
                    uri, container, stream, keyframes, size, deadline
                )
                picked, decoded = keyframes, len(set(keyframes))
            codec = stream.codec_context.name
            width, height = round(stream.width * _pixel_aspect(stream)), stream.height
    if rotation % 180:
        width, height = height, width
    meta = {
        "duration_s": duration_s,
        "fps": len(table.times) / duration_s if duration_s > 0 else 0.0,
        "codec": codec,
        "width": width,
        "height": height,
        "rotation": rotation,
        "frame_count": len(table.times),
        "frame_times_s": [float((t - table.start) * tick) for t in picked],
        "seeks": seeks,
        "decoded_frames": decoded,
        "sampling": "exact" if keyframes is None else "keyframe",
        "decode_s": deadline.elapsed(),
    }
    bounds = np.array([[float(a * tick), float(b * tick)] for a, b in windows], np.float64)
    return frames.reshape(len(windows), num_frames, *frames.shape[1:]), bounds, meta


def segment_windows(length: Any, segment: Any, max_segments: int) -> list[tuple[Any, Any]]:
    """Windows [start, end) that cover [0, length): [k * segment, (k + 1) * segment), any units.

    A remainder of at least half a segment is a window of its own; a shorter one joins the last
    window (so windows run from half a segment to one and a half). A video up to one and a half
    segments long, or any video when `segment` is 0, is one window: exactly `sample_frames`.
    More than `max_segments` windows become `max_segments` equal ones, each longer than
    `segment`, so a huge video stays bounded and still covered end to end."""
    if max_segments < 1:
        raise ValueError(f"max_segments must be >= 1, got {max_segments}")
    if segment <= 0 or length <= segment:
        return [(0, length)]
    count = int(length // segment)
    if length - count * segment >= Fraction(segment) / 2:
        count += 1
    if count > max_segments:
        step = Fraction(length) / max_segments
        return [(i * step, (i + 1) * step) for i in range(max_segments)]
    starts = [i * segment for i in range(count)]
    return list(zip(starts, [*starts[1:], length], strict=True))


def _tick(stream: av.video.stream.VideoStream, table: _FrameTable) -> Fraction:
    """Seconds per unit of the table's times."""
    if table.has_pts:
        return Fraction(stream.time_base)
    rate = stream.average_rate or stream.guessed_rate or 25
    return 1 / Fraction(rate)


def _too_long(uri: str, duration_s: float, limits: VideoConfig) -> str:
    return f"{uri}: {duration_s:.0f} s long, over video.max_duration_s={limits.max_duration_s:g}"


@contextlib.contextmanager
def _local_source(
    uri: str, filesystem: Any, limits: VideoConfig, deadline: _Deadline
) -> Iterator[str]:
    """A local path to decode from: the file itself, or a temporary copy of a remote one.

    A remote video is fetched once (the demux and decode passes then read local bytes), within
    the decode deadline and video.max_bytes: a read that stalls mid-body (an object store
    that stops sending) becomes an error when the deadline passes instead of holding the
    worker forever."""
    if filesystem is None:
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            uri = unquote(parsed.path)
        elif len(parsed.scheme) > 1:  # one letter is a Windows drive
            filesystem, uri = _remote_filesystem(uri)
    if filesystem is None:
        _check_local_file(uri, limits)
        yield uri
        return
    with tempfile.TemporaryDirectory(prefix="ovml-video-") as folder:
        local = os.path.join(folder, "video")
        _fetch(uri, filesystem, local, limits, deadline)
        yield local


def _fetch(uri: str, filesystem: Any, local: str, limits: VideoConfig, deadline: _Deadline):
    """Copy a remote file to `local`; reads happen in a daemon thread so that a stalled one
    is abandoned (with its connection) when the deadline passes."""
    blocks: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    threading.Thread(target=_read_blocks, args=(filesystem, uri, blocks, stop), daemon=True).start()
    size = 0
    try:
        with open(local, "wb") as out:
            while (block := _next_block(uri, blocks, deadline)) != b"":
                size += len(block)
                if size > limits.max_bytes:
                    raise VideoDecodeError(
                        f"{uri}: larger than video.max_bytes={limits.max_bytes} bytes"
                    )
                out.write(block)
    finally:
        stop.set()
    if size == 0:
        raise VideoDecodeError(f"{uri}: empty file")


def _read_blocks(filesystem: Any, uri: str, blocks: queue.Queue, stop: threading.Event):
    """Producer: the file's blocks, then b"" (or the exception that ended the reads)."""
    try:
        with filesystem.open_input_file(uri) as handle:
            while not stop.is_set():
                block = handle.read(_REMOTE_READ_BYTES)
                while not stop.is_set():
                    with contextlib.suppress(queue.Full):
                        blocks.put(block, timeout=0.1)
                        break
                if not block:
                    return
    except Exception as err:  # handed to the consumer, which raises it as a decode error
        blocks.put(err)


def _next_block(uri: str, blocks: queue.Queue, deadline: _Deadline) -> bytes:
    try:
        item = blocks.get(timeout=max(deadline.seconds - deadline.elapsed(), 0.0))
    except queue.Empty:
        raise VideoDecodeError(
            f"{uri}: read stalled: the file did not arrive within "
            f"video.max_decode_s={deadline.seconds:g} s",
            transient=True,
        ) from None
    if isinstance(item, FileNotFoundError):
        raise VideoDecodeError(f"{uri}: file not found") from item
    if isinstance(item, Exception):
        raise VideoDecodeError(f"{uri}: read failed: {item}", transient=True) from item
    return item


def _remote_filesystem(uri: str) -> tuple[Any, str]:
    import pyarrow.fs  # only remote inputs need it

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as err:
        raise VideoDecodeError(
            f"{uri}: unsupported or unreachable location: {err}", transient=True
        ) from err


def _check_local_file(path: str, limits: VideoConfig) -> None:
    p = Path(path)
    if not p.exists():
        raise VideoDecodeError(f"{path}: file not found")
    if not p.is_file():  # a FIFO or device would block the demuxer
        raise VideoDecodeError(f"{path}: not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise VideoDecodeError(f"{path}: empty file")
    if size > limits.max_bytes:
        raise VideoDecodeError(f"{path}: larger than video.max_bytes={limits.max_bytes} bytes")


@contextlib.contextmanager
def _container(uri: str, path: str) -> Iterator[av.container.InputContainer]:
    """Open the local file `path` (of `uri`) with PyAV; every FFmpeg failure inside becomes a
    VideoDecodeError."""
    allowed = ",".join(CONTAINER_FORMATS)
    opened = False
    try:
        options = {"format_whitelist": allowed}
        with av.open(path, options=options, metadata_errors="ignore") as container:
            opened = True
            yield container
    except av.FFmpegError as err:
        # FFmpeg answers a format outside the list with a bare EINVAL.
        refused = not opened and isinstance(err, av.error.ArgumentError)
        hint = f" (or not one of the container formats {allowed})" if refused else ""
        raise VideoDecodeError(f"{uri}: not a readable video{hint}: {err}") from err
    except OSError as err:
        raise VideoDecodeError(f"{uri}: read failed: {err}", transient=True) from err


def _checked_video_stream(
    uri: str, container: av.container.InputContainer, limits: VideoConfig
) -> av.video.stream.VideoStream:
    if not container.streams.video:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        raise VideoDecodeError(f"{uri}: no video stream (streams: {kinds})")
    stream = container.streams.best("video")
    if stream.codec_context is None:
        raise VideoDecodeError(f"{uri}: unknown or unsupported video codec")
    pixels = stream.width * stream.height
    if pixels == 0:  # FFmpeg refused the declared size (e.g. 20000x20000) or found none
        raise VideoDecodeError(f"{uri}: no valid frame size in the stream header")
    if pixels > limits.max_pixels:
        raise VideoDecodeError(
            f"{uri}: {stream.width}x{stream.height} frames, over video.max_pixels={limits.max_pixels}"
        )
    # Refuse an overlong video before reading it; the demuxed length is checked again later.
    declared_s = (
        float(stream.duration * stream.time_base)
        if stream.duration
        else (container.duration or 0) / av.time_base
    )
    if declared_s > limits.max_duration_s:
        raise VideoDecodeError(_too_long(uri, declared_s, limits))
    return stream


def _configured_stream(
    container: av.container.InputContainer, limits: VideoConfig, frame_threads: bool = True
) -> av.video.stream.VideoStream:
    stream = container.streams.best("video")
    # Frame threads hold frames back (one per thread) before the first comes out: waste when
    # only a lone keyframe after each seek is wanted, so that case threads within a frame.
    stream.thread_type = "AUTO" if frame_threads else "SLICE"
    stream.codec_context.thread_count = limits.decoder_threads
    return stream


def _frame_table(
    uri: str,
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    deadline: _Deadline,
) -> _FrameTable:
    """Demux (no decode) the video stream: every frame's time, the keyframes, the end time."""
    times, keyframes, durations = [], [], []
    packets = 0
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's final flush packet
            continue
        deadline.check()
        packets += 1
        if packet.is_keyframe:
            keyframes.append(packet.pts if packet.pts is not None else len(times))
        if packet.is_discard:  # before an edit list's start: decoded, never shown
            continue
        times.append(packet.pts)
        durations.append(packet.duration or 0)
    if not times:
        raise VideoDecodeError(f"{uri}: the video stream has no frames")
    if any(t is None for t in times):
        # Without timestamps only a count tells a cut stream from a whole one.
        if stream.frames and packets < stream.frames:
            raise VideoDecodeError(
                f"{uri}: truncated: {packets} of the {stream.frames} frames it lists are present"
            )
        count = len(times)
        return _FrameTable(list(range(count)), keyframes, count, has_pts=False)
    order = sorted(range(len(times)), key=times.__getitem__)
    times = [times[i] for i in order]
    deltas = np.diff(times)
    last_duration = durations[order[-1]] or (int(np.median(deltas)) if len(deltas) else 1)
    table = _FrameTable(times, sorted(keyframes), times[-1] + max(last_duration, 1), True)
    _check_complete(uri, container, stream, table)
    return table


def _check_complete(
    uri: str,
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    table: _FrameTable,
) -> None:
    """A video stream that ends well before its declared duration was cut off.

    Judged by time, not by counting frames: an empty AVI chunk (common in captures and screen
    recordings) means "repeat the previous frame", so a whole file may hold far fewer coded
    frames than its index lists. The stream's own declared duration is used when the container
    gives one; else the container's, and only for a lone video stream (other streams may
    outlast the video). Containers declare either the length or the end time; the end time is
    >= the length, so comparing it with the declared value is right for both.
    """
    if stream.duration:
        declared_s = float(stream.duration * stream.time_base)
    elif len(container.streams) == 1 and container.duration:
        declared_s = container.duration / av.time_base
    else:
        return
    end_s = float(table.end * stream.time_base)
    if end_s < 0.9 * declared_s:
        raise VideoDecodeError(
            f"{uri}: truncated: frames end at {end_s:.2f} s of the {declared_s:.2f} s "
            f"it declares ({len(table.times)} frames present)"
        )


def _window_targets(
    table: _FrameTable, windows: list[tuple[Any, Any]], num_frames: int
) -> tuple[list[Fraction], list[Fraction]]:
    """Exact times (table units, sorted) of the centres of `num_frames` equal parts of each
    window [start, end) (offsets from the stream's start), and each part's half width."""
    targets, reach = [], []
    for start, end in windows:
        half = Fraction(end - start) / (2 * num_frames)
        targets += [table.start + start + (2 * i + 1) * half for i in range(num_frames)]
        reach += [half] * num_frames
    return targets, reach


def _should_seek(mode: str, table: _FrameTable, position: int | None, target: Fraction) -> bool:
    """Seek when it skips decoding: a keyframe lies after `position` and at or before `target`."""
    if not table.has_pts or mode == "sequential":
        return False
    if mode == "seek":
        return True
    after = table.start if position is None else position
    i = bisect.bisect_right(table.keyframes, after)
    return i < len(table.keyframes) and table.keyframes[i] <= target


# video.mode=auto: a video shorter than this stays exact (little to save).
AUTO_MIN_S = 30.0
# auto takes a keyframe for a sampled time only within this share of its segment: a quarter
# measured no tag loss against exact sampling, half a segment (what mode keyframe accepts) lost
# 0.008 mAP (bench/bench_keyframe_agreement.py, BENCHMARKS.md).
AUTO_REACH = Fraction(1, 4)
# Predicted decode cost, in units of one frame decoded on in sequence: a keyframe costs more (an
# intra frame, several times a predicted one, and a seek and decoder flush before it when alone);
# converting a sampled frame to RGB costs both plans alike. Resolution scales both plans alike,
# so frame counts decide. Fitted to bench/bench_decode.py's 720p/1080p h264 25 fps clips (the
# predicted exact/keyframe cost ratios 1.55, 1.42 and 4.39 vs measured 1.55-1.58, 1.37-1.42 and
# 4.07-4.20 at 10 s GOP 30, 60-300 s GOP 30 and 300 s GOP 250; BENCHMARKS.md, keyframe section).
KEYFRAME_COST = 25.0
CONVERT_COST = 12.0
# auto uses keyframes only when the prediction says they cost at most 1/margin of exact.
AUTO_MARGIN = 2.0


def _keyframe_plan(
    table: _FrameTable,
    targets: list[Fraction],
    reach: list[Fraction],
    mode: str,
    duration_s: float,
) -> list[int] | None:
    """The keyframes to decode alone (one per target), or None to sample exactly: mode
    keyframe whenever keyframes are within half a segment (`_nearest_keyframes`); mode auto
    only within AUTO_REACH of a segment, on videos of AUTO_MIN_S and more, and when
    `predicted_costs` says keyframes are AUTO_MARGIN times cheaper."""
    if mode == "keyframe":
        return _nearest_keyframes(table, targets, reach)
    if mode != "auto" or duration_s < AUTO_MIN_S:
        return None
    # `reach` is half a segment.
    keyframes = _nearest_keyframes(table, targets, [r * 2 * AUTO_REACH for r in reach])
    if keyframes is None:
        return None
    exact, alone = predicted_costs(table, targets, keyframes)
    return keyframes if alone * AUTO_MARGIN <= exact else None


def predicted_costs(
    table: _FrameTable, targets: list[Fraction], keyframes: list[int]
) -> tuple[float, float]:
    """Predicted decode cost (frame units, see KEYFRAME_COST) of sampling `targets`
    exactly, as `_decode_targets` plans it in mode exact, and of decoding `keyframes` alone.

    From the demuxed frame table only: exact decodes every frame from where it stands (or from
    the keyframe it seeks to) up to the first frame past each target."""
    is_key = set(table.keyframes)
    frames = keys = 0
    position: int | None = None  # time of the last frame decoded
    next_index = 0  # index in table.times of the next frame the decoder would produce
    for target in targets:
        if _should_seek("exact", table, position, target):
            seek_to = table.keyframes[bisect.bisect_right(table.keyframes, target) - 1]
            next_index = bisect.bisect_left(table.times, seek_to)
        # Frames up to the first one past the target (which resolves it), or to the end.
        stop = min(bisect.bisect_right(table.times, target) + 1, len(table.times))
        if stop > next_index:
            run = table.times[next_index:stop]
            frames += len(run)
            keys += sum(t in is_key for t in run)
            next_index, position = stop, run[-1]
    common = len(targets) * CONVERT_COST
    exact = frames - keys + keys * KEYFRAME_COST + common
    return exact, len(set(keyframes)) * KEYFRAME_COST + common


def _nearest_keyframes(
    table: _FrameTable, targets: list[Fraction], reach: list[Fraction]
) -> list[int] | None:
    """The shown keyframe nearest each target (the earlier one on a tie), or None when one of
    them is farther than its `reach` (at most half its segment) from its target: too sparse to
    stand for it. Within reach, a keyframe stays inside the target's segment and window."""
    shown = [k for k in table.keyframes if k >= table.start] if table.has_pts else []
    if not shown:
        return None
    chosen = []
    for target, tolerance in zip(targets, reach, strict=True):
        i = bisect.bisect_left(shown, target)
        nearest = min(shown[max(i - 1, 0) : i + 1], key=lambda k: abs(k - target))
        if abs(nearest - target) > tolerance:
            return None
        chosen.append(nearest)
    return chosen


def _decode_torchcodec(
    uri: str,
    path: str,
    stream: av.video.stream.VideoStream,
    table: _FrameTable,
    tick: Fraction,
    times: list[Any],
    size: int,
    limits: VideoConfig,
    deadline: _Deadline,
) -> tuple[np.ndarray, list[int], int]:
    """video.decoder=torchcodec: the frame displayed at each of `times` (table units, sorted),
    decoded by torchcodec one at a time (the deadline is checked between them; torchcodec
    decodes on without seeking while the next frame is in reach) and resized as PyAV's are.

    Returns the frames, their times (table units) and the rotation torchcodec applied."""
    video_decoder = torchcodec_decoder()
    out = np.empty((len(times), size, size, 3), np.uint8)
    picked: list[int] = []
    done: dict[int, int] = {}  # frame number -> its first row of `out`
    try:
        # Frames are asked for by number in display order, as in our table: torchcodec's
        # "played at" time lookup picks the next frame when decoded frames carry no duration
        # (seen with variable frame rate mp4), and numbers need its exact mode's own scan.
        decoder = video_decoder(
            path,
            stream_index=stream.index,
            seek_mode="exact",
            num_ffmpeg_threads=limits.decoder_threads,
            dimension_order="NHWC",
        )
        # torchcodec turns frames upright itself; a non-square pixel then lies on the other axis.
        rotation = round((decoder.metadata.rotation or 0) / 90) % 4 * 90
        aspect = _pixel_aspect(stream) ** (-1 if rotation % 180 else 1)
        for i, t in enumerate(times):
            deadline.check()
            number = max(bisect.bisect_right(table.times, t) - 1, 0)  # displayed at t
            if number in done:
                out[i] = out[done[number]]
            else:
                frame = decoder.get_frame_at(number)
                got = round(Fraction(frame.pts_seconds) / tick)
                if table.has_pts and got != table.times[number]:
                    raise VideoDecodeError(
                        f"{uri}: torchcodec's frame {number} is at {frame.pts_seconds:.6f} s, "
                        f"not at {float(table.times[number] * tick):.6f} s as demuxed"
                    )
                image = av.VideoFrame.from_ndarray(
                    np.ascontiguousarray(frame.data.numpy()), format="rgb24"
                )
                out[i], done[number] = _square_rgb(image, size, 0, aspect), i
            picked.append(table.times[number])
    except (RuntimeError, ValueError, IndexError) as err:
        raise VideoDecodeError(f"{uri}: not a readable video (torchcodec): {err}") from err
    return out, picked, rotation


def _decode_keyframes(
    uri: str,
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    keyframes: list[int],
    size: int,
    deadline: _Deadline,
) -> tuple[np.ndarray, int, int]:
    """Each keyframe decoded alone after a seek to it (one decode per distinct keyframe).

    Returns the frames, the rotation in degrees and the number of seeks."""
    out = np.empty((len(keyframes), size, size, 3), np.uint8)
    pixel_aspect = _pixel_aspect(stream)
    rotation = seeks = 0
    done: dict[int, int] = {}  # keyframe -> its first row of `out` (no second copy of frames)
    for i, keyframe in enumerate(keyframes):
        if keyframe in done:
            out[i] = out[done[keyframe]]
            continue
        container.seek(keyframe, stream=stream)  # lands on it: it is a keyframe
        seeks += 1
        frame = _first_frame_from(uri, container, stream, keyframe, deadline)
        rotation = _upright_degrees(frame)
        out[i], done[keyframe] = _square_rgb(frame, size, rotation, pixel_aspect), i
    return out, rotation, seeks


def _first_frame_from(
    uri: str,
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    at: int,
    deadline: _Deadline,
) -> av.VideoFrame:
    """The first decoded frame at or after time `at` (an open GOP's leading frames come first)."""
    for frame in container.decode(stream):
        deadline.check()
        if frame.pts is not None and frame.pts >= at:
            return frame
    raise VideoDecodeError(f"{uri}: no decodable frame at its keyframe (time {at})")


def _decode_targets(
    uri: str,
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    table: _FrameTable,
    targets: list[Fraction],
    size: int,
    mode: str,
    deadline: _Deadline,
) -> tuple[np.ndarray, list[int], int, int, int]:
    """For each target (sorted), the frame displayed at that time (the last one starting at or
    before it), in one forward pass: seeks only ever skip ahead.

    Returns the frames, their times, the rotation in degrees, the number of seeks and the number
    of frames decoded.
    """
    out = np.empty((len(targets), size, size, 3), np.uint8)
    picked: list[int] = []
    rotation = seeks = decoded = 0
    position: int | None = None
    pixel_aspect = _pixel_aspect(stream)
    while len(picked) < len(targets):
        target = targets[len(picked)]
        if _should_seek(mode, table, position, target):
            container.seek(int(target), stream=stream)  # to the keyframe at or before
            seeks += 1
        resolved_in_run = len(picked)
        prev = prev_time = None
        cached: tuple[Any, np.ndarray] | None = None
        for ordinal, frame in enumerate(container.decode(stream)):
            deadline.check()
            decoded += 1
            t = frame.pts if table.has_pts and frame.pts is not None else ordinal
            while len(picked) < len(targets) and t > targets[len(picked)]:
                # An overshooting seek leaves no earlier frame: the nearest one is this.
                chosen, chosen_time = (frame, t) if prev is None else (prev, prev_time)
                if cached is None or cached[0] is not chosen:
                    rotation = _upright_degrees(chosen)
                    cached = (chosen, _square_rgb(chosen, size, rotation, pixel_aspect))
                out[len(picked)] = cached[1]
                picked.append(chosen_time)
            prev, prev_time, position = frame, t, t
            if len(picked) == len(targets):
                break
            if len(picked) > resolved_in_run and _should_seek(
                mode, table, position, targets[len(picked)]
            ):
                break
        else:  # end of stream: the last frame is displayed until the end
            if prev is None:
                raise VideoDecodeError(f"{uri}: no decodable frames")
            rotation = _upright_degrees(prev)
            out[len(picked) :] = _square_rgb(prev, size, rotation, pixel_aspect)
            picked += [prev_time] * (len(targets) - len(picked))
    return out, picked, rotation, seeks, decoded


def _pixel_aspect(stream: av.video.stream.VideoStream) -> Fraction:
    """Width of a stored pixel as displayed, relative to its height (anamorphic video != 1)."""
    return Fraction(stream.sample_aspect_ratio or 1)


def _upright_degrees(frame: av.VideoFrame) -> int:
    """Counter-clockwise rotation (a multiple of 90) that shows the frame as intended."""
    return round(frame.rotation / 90) % 4 * 90


def _square_rgb(
    frame: av.VideoFrame, size: int, rotation: int, pixel_aspect: Fraction
) -> np.ndarray:
    """Shorter side to `size` (in swscale, honouring non-square pixels), centre crop, upright."""
    aspect = frame.width * pixel_aspect / frame.height
    scale_w, scale_h = (size * aspect, size) if aspect >= 1 else (size, size / aspect)
    width, height = max(size, round(scale_w)), max(size, round(scale_h))
    rgb = frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
    top, left = (height - size) // 2, (width - size) // 2
    square = rgb[top : top + size, left : left + size]
    return np.rot90(square, k=rotation // 90) if rotation else square
