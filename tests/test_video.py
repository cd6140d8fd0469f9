"""ovml_core.video.sample_frames on synthetic clips of known content, real clips, broken files."""

import math
from fractions import Fraction

import numpy as np
import pytest

from ovml_core.config import VideoConfig
from ovml_core.video import VideoDecodeError, sample_frames
from tests.videos import (
    CODECS,
    index_frame,
    read_frame_index,
    sample_clips,
    write_broken_files,
    write_indexed_video,
    write_trimmed_copy,
    write_video,
)

MODES = ("exact", "sequential", "seek")


def centre_indices(num_source: int, num_frames: int) -> list[int]:
    """Frames displayed at the centres of equal segments of a constant-rate clip."""
    return [math.floor((i + 0.5) * num_source / num_frames) for i in range(num_frames)]


def indices_of(frames: np.ndarray) -> list[int]:
    return [read_frame_index(f) for f in frames]


def test_index_fixture_round_trips():
    for index in (0, 1, 77, 2**16 - 1):
        assert read_frame_index(index_frame(index, 48, 48)) == index
    assert read_frame_index(index_frame(5, 48, 48)) != read_frame_index(index_frame(6, 48, 48))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("codec", list(CODECS))
def test_samples_segment_centres(tmp_path, codec, mode):
    path = write_indexed_video(tmp_path / f"clip.{CODECS[codec][1]}", 60, codec=codec, gop=12)
    frames, meta = sample_frames(path, 8, 32, VideoConfig(mode=mode))
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8
    assert indices_of(frames) == centre_indices(60, 8)
    assert meta["frame_count"] == 60
    assert meta["duration_s"] == pytest.approx(6.0)
    assert meta["fps"] == pytest.approx(10.0)
    assert (meta["width"], meta["height"], meta["rotation"]) == (64, 48, 0)
    assert meta["frame_times_s"] == pytest.approx([i / 10 for i in centre_indices(60, 8)])
    assert meta["codec"] in {"h264", "mpeg4", "vp9", "libvpx-vp9"}
    expected_seeks = {"sequential": 0, "seek": 8}.get(mode)
    if expected_seeks is None:  # exact: only where a keyframe lies between samples
        assert 0 < meta["seeks"] < 8
    else:
        assert meta["seeks"] == expected_seeks


def test_exact_decodes_short_gop_free_clip_in_one_pass(tmp_path):
    path = write_indexed_video(tmp_path / "one_gop.mp4", 40, gop=100)
    frames, meta = sample_frames(path, 5, 32)
    assert indices_of(frames) == centre_indices(40, 5)
    assert meta["seeks"] == 0


def test_portrait_frames_are_centre_cropped(tmp_path):
    path = write_indexed_video(tmp_path / "portrait.mp4", 20, width=48, height=80)
    frames, meta = sample_frames(path, 4, 24)
    assert indices_of(frames) == centre_indices(20, 4)
    assert (meta["width"], meta["height"]) == (48, 80)


def test_non_square_pixels_are_shown_at_their_display_shape(tmp_path):
    """Stored 48x64 with pixels twice as wide as tall: displayed 96x64, grid in its centre."""
    stored = [index_frame(i, 96, 64)[:, ::2] for i in range(10)]
    path = write_video(tmp_path / "anamorphic.mp4", stored, pixel_aspect=Fraction(2))
    frames, meta = sample_frames(path, 4, 32)
    assert indices_of(frames) == centre_indices(10, 4)
    assert (meta["width"], meta["height"]) == (96, 64)


@pytest.mark.parametrize("num_source", [1, 3])
def test_fewer_frames_than_requested_repeat(tmp_path, num_source):
    path = write_indexed_video(tmp_path / "short.mp4", num_source)
    frames, meta = sample_frames(path, 8, 32)
    assert indices_of(frames) == centre_indices(num_source, 8)
    assert meta["frame_count"] == num_source


@pytest.mark.parametrize("mode", MODES)
def test_variable_frame_rate_samples_by_time(tmp_path, mode):
    times = [0.0, 0.1, 0.15, 0.4, 0.41, 0.42, 0.8, 0.9, 1.0, 1.5, 1.55, 1.9]
    path = write_indexed_video(tmp_path / "vfr.mp4", len(times), times_s=times, gop=4)
    frames, meta = sample_frames(path, 6, 32, VideoConfig(mode=mode))
    duration = meta["duration_s"]
    assert 1.9 < duration <= 2.5
    targets = [(i + 0.5) * duration / 6 for i in range(6)]
    expected = [max(j for j, t in enumerate(times) if t <= target) for target in targets]
    assert indices_of(frames) == expected
    assert len(set(expected)) == 6  # the time grid, not frame counting, decides


@pytest.mark.parametrize("suffix,codec", [("mp4", "h264"), ("webm", "vp9")])
def test_video_stream_that_starts_late(tmp_path, suffix, codec):
    """Audio from 0 s, video from 1 s: segments span the video stream only."""
    times = [1.0 + 0.1 * i for i in range(10)]
    audio = 2.5 if suffix == "mp4" else None  # libvpx webm gets no AAC track
    path = write_indexed_video(
        tmp_path / f"late.{suffix}", 10, codec=codec, times_s=times, audio_s=audio
    )
    frames, meta = sample_frames(path, 5, 32)
    assert indices_of(frames) == centre_indices(10, 5)
    assert meta["duration_s"] == pytest.approx(1.0)
    assert meta["frame_times_s"] == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])


@pytest.mark.parametrize("mode", MODES)
def test_edit_list_hides_frames_before_the_start(tmp_path, mode):
    """A trimmed mp4 keeps frames 0-11 for decoding but shows frames 12-59 only."""
    source = write_indexed_video(tmp_path / "source.mp4", 60, gop=30)
    trimmed = write_trimmed_copy(source, tmp_path / "trimmed.mp4", start_s=1.2)
    frames, meta = sample_frames(trimmed, 6, 32, VideoConfig(mode=mode))
    assert indices_of(frames) == [12 + i for i in centre_indices(48, 6)]
    assert meta["frame_count"] == 48
    assert meta["duration_s"] == pytest.approx(4.8)


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotation_metadata_turns_frames_upright(tmp_path, rotation):
    path = write_indexed_video(tmp_path / "rotated.mp4", 12, rotation=rotation)
    frames, meta = sample_frames(path, 3, 32)
    # Displayed = stored frame turned counter-clockwise by `rotation` degrees (for 90 and -90
    # this was checked to equal, pixel for pixel, what the ffmpeg 5.1 CLI's autorotate shows).
    assert [read_frame_index(np.rot90(f, k=-rotation // 90)) for f in frames] == centre_indices(
        12, 3
    )
    assert indices_of(frames) != centre_indices(12, 3)
    assert meta["rotation"] == rotation % 360
    expected_size = (48, 64) if rotation % 180 else (64, 48)
    assert (meta["width"], meta["height"]) == expected_size


def test_stream_without_timestamps_counts_frames(tmp_path):
    path = write_indexed_video(tmp_path / "raw.h264", 30)  # raw H.264: packets carry no times
    frames, meta = sample_frames(path, 8, 32)
    assert indices_of(frames) == centre_indices(30, 8)
    assert meta["frame_count"] == 30 and meta["seeks"] == 0


def test_real_clips_agree_across_modes():
    size = 224
    clips = sample_clips()
    assert len(clips) == 4
    for clip in clips:
        results = {mode: sample_frames(clip, 8, size, VideoConfig(mode=mode)) for mode in MODES}
        frames, meta = results["exact"]
        assert frames.shape == (8, size, size, 3)
        assert frames.std() > 10  # real picture content, not a blank fill
        for mode in ("sequential", "seek"):
            other, other_meta = results[mode]
            np.testing.assert_array_equal(other, frames, err_msg=f"{clip.name} {mode}")
            assert other_meta["frame_times_s"] == meta["frame_times_s"]
        times = meta["frame_times_s"]
        assert times == sorted(times) and times[0] >= 0 and times[-1] < meta["duration_s"]
        for i, t in enumerate(times):  # each sample is the frame shown at its segment centre
            centre = (i + 0.5) * meta["duration_s"] / 8
            assert centre - 1 / meta["fps"] < t <= centre + 1e-9


def test_real_clip_metadata():
    clip = next(c for c in sample_clips() if c.name == "bikes.mp4")
    _, meta = sample_frames(clip, 4, 32)
    assert (meta["width"], meta["height"], meta["codec"]) == (640, 272, "h264")
    assert meta["frame_count"] == 250
    assert meta["duration_s"] == pytest.approx(10.0)
    assert meta["fps"] == pytest.approx(25.0)


def test_broken_inputs_raise_clear_errors(tmp_path):
    files = write_broken_files(tmp_path, sample_clips()[0])
    expected = {
        "missing": "file not found",
        "empty": "empty file",
        "garbage": "not a readable video",
        "text": "not a readable video",
        "truncated": "not a readable video",
        "audio_only": "no video stream",
    }
    assert set(files) == set(expected)
    for name, message in expected.items():
        with pytest.raises(VideoDecodeError, match=message) as err:
            sample_frames(files[name], 4, 32)
        assert str(files[name]) in str(err.value)
    with pytest.raises(VideoDecodeError, match="not a regular file"):
        sample_frames(tmp_path, 4, 32)


@pytest.mark.parametrize("suffix,codec", [("mp4", "h264"), ("webm", "vp9"), ("avi", "mpeg4")])
def test_truncated_clip_whose_header_survives(tmp_path, suffix, codec):
    path = write_indexed_video(
        tmp_path / f"full.{suffix}", 100, codec=codec, gop=10, faststart=suffix == "mp4"
    )
    cut = tmp_path / f"cut.{suffix}"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match="truncated"):
        sample_frames(cut, 4, 32)
    assert len(sample_frames(path, 4, 32)[0]) == 4


def test_limits(tmp_path):
    path = write_indexed_video(tmp_path / "clip.mp4", 30)
    with pytest.raises(VideoDecodeError, match="video.max_pixels"):
        sample_frames(path, 4, 32, VideoConfig(max_pixels=64 * 48 - 1))
    with pytest.raises(VideoDecodeError, match="video.max_duration_s"):
        sample_frames(path, 4, 32, VideoConfig(max_duration_s=2.5))
    with pytest.raises(VideoDecodeError, match="video.max_decode_s"):
        sample_frames(path, 4, 32, VideoConfig(max_decode_s=1e-9))
    frames, _ = sample_frames(path, 4, 32, VideoConfig(max_pixels=64 * 48, max_duration_s=3.0))
    assert indices_of(frames) == centre_indices(30, 4)


def test_bad_arguments(tmp_path):
    path = write_indexed_video(tmp_path / "clip.mp4", 5)
    with pytest.raises(ValueError, match="num_frames"):
        sample_frames(path, 0, 32)
    with pytest.raises(ValueError, match="size"):
        sample_frames(path, 4, 0)


def test_file_uri_and_pyarrow_filesystem_match_local_path(tmp_path):
    from pyarrow.fs import LocalFileSystem

    path = write_indexed_video(tmp_path / "clip.webm", 20, codec="vp9", gop=5)
    local, _ = sample_frames(path, 4, 32)
    from_uri, _ = sample_frames(path.as_uri(), 4, 32)
    # Through a pyarrow filesystem the file is fetched first, as s3:// and gs:// files are.
    from_fs, meta = sample_frames(str(path), 4, 32, filesystem=LocalFileSystem())
    np.testing.assert_array_equal(from_uri, local)
    np.testing.assert_array_equal(from_fs, local)
    assert indices_of(from_fs) == centre_indices(20, 4) and meta["seeks"] > 0
    with pytest.raises(VideoDecodeError, match="file not found"):
        sample_frames(str(tmp_path / "nope.mp4"), 4, 32, filesystem=LocalFileSystem())


def test_s3_uri_through_local_server(tmp_path, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=f"http://{endpoint}")
        s3.create_bucket(Bucket="clips")
        path = write_indexed_video(tmp_path / "clip.mp4", 24, gop=6)
        s3.upload_file(str(path), "clips", "a/clip.mp4")
        query = f"?endpoint_override={endpoint}&scheme=http&region=us-east-1"
        frames, _ = sample_frames(f"s3://clips/a/clip.mp4{query}", 4, 32)
        assert indices_of(frames) == centre_indices(24, 4)
        with pytest.raises(VideoDecodeError, match="clips/a/missing.mp4"):
            sample_frames(f"s3://clips/a/missing.mp4{query}", 4, 32)
    finally:
        server.stop()


def test_frames_and_times_are_explicit_inputs(tmp_path):
    """write_video keeps the given pixels: a solid colour decodes to that colour."""
    colour = np.zeros((48, 64, 3), np.uint8)
    colour[..., 0] = 200
    path = write_video(tmp_path / "red.mp4", [colour] * 4, fps=4)
    frames, meta = sample_frames(path, 2, 16)
    assert meta["duration_s"] == pytest.approx(1.0)
    assert np.abs(frames[..., 0].astype(int) - 200).max() < 12
    assert frames[..., 1:].max() < 12


def test_corrupted_bytes_give_frames_or_a_decode_error(tmp_path):
    """Random byte damage anywhere in a file never escapes as anything but VideoDecodeError."""
    rng = np.random.default_rng(0)
    sources = [
        write_indexed_video(tmp_path / f"clip.{suffix}", 24, codec=codec, gop=6)
        for codec, (_, suffix, _) in CODECS.items()
    ]
    outcomes = {"frames": 0, "error": 0}
    for trial in range(90):
        source = sources[trial % len(sources)]
        data = np.frombuffer(source.read_bytes(), np.uint8).copy()
        hits = rng.integers(0, len(data), int(rng.integers(1, 30)))
        data[hits] = rng.integers(0, 256, len(hits))
        damaged = tmp_path / f"damaged{source.suffix}"
        damaged.write_bytes(data.tobytes())
        try:
            frames, _ = sample_frames(damaged, 4, 16)
        except VideoDecodeError as err:
            assert str(damaged) in str(err)
            outcomes["error"] += 1
        else:
            assert frames.shape == (4, 16, 16, 3)
            outcomes["frames"] += 1
    assert min(outcomes.values()) > 0  # both paths were exercised


def test_avi_with_empty_chunks_is_whole_not_truncated(tmp_path):
    """An AVI index lists one chunk per frame period; captures leave chunks empty ("repeat the
    previous frame"), so a whole file holds fewer coded frames than it lists."""
    import av

    path = tmp_path / "sparse.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(10):  # one coded frame every 4 periods: 0.0 s, 0.4 s, ... 3.6 s
            frame = av.VideoFrame.from_ndarray(index_frame(i), format="rgb24")
            frame.pts = 4 * i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames > 10  # the index lists the empty chunks too
    frames, meta = sample_frames(path, 4, 32)
    assert frames.shape == (4, 32, 32, 3)
    assert meta["duration_s"] == pytest.approx(3.7, abs=0.15)


@pytest.mark.parametrize("codec", list(CODECS))
def test_keyframe_mode_decodes_the_keyframe_nearest_each_centre(tmp_path, codec):
    """Centres of 4 segments of 100 frames: 12.5, 37.5, 62.5, 87.5; keyframes every 10."""
    path = write_indexed_video(tmp_path / f"clip.{CODECS[codec][1]}", 100, codec=codec, gop=10)
    frames, meta = sample_frames(path, 4, 32, VideoConfig(mode="keyframe"))
    assert indices_of(frames) == [10, 40, 60, 90]  # 12.5 -> 10, 37.5 -> 40 (nearest)
    assert meta["sampling"] == "keyframe" and meta["seeks"] == 4
    assert meta["frame_times_s"] == pytest.approx([1.0, 4.0, 6.0, 9.0])
    assert meta["duration_s"] == pytest.approx(10.0)


def test_keyframe_mode_decodes_a_shared_keyframe_once(tmp_path):
    path = write_indexed_video(tmp_path / "clip.mp4", 90, gop=20)  # keyframes 0, 20, ... 80
    frames, meta = sample_frames(path, 9, 32, VideoConfig(mode="keyframe"))
    # centres 5, 15, ... 85, each within half a segment (5 frames) of a keyframe
    assert indices_of(frames) == [0, 20, 20, 40, 40, 60, 60, 80, 80]
    assert meta["seeks"] == 5


def test_keyframe_mode_samples_exactly_when_keyframes_are_too_sparse(tmp_path):
    path = write_indexed_video(tmp_path / "one_gop.mp4", 60, gop=100)  # one keyframe
    frames, meta = sample_frames(path, 6, 32, VideoConfig(mode="keyframe"))
    assert meta["sampling"] == "exact"
    assert indices_of(frames) == centre_indices(60, 6)
