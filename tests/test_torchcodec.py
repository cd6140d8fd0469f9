"""video.decoder=torchcodec: the same plan as PyAV's (demux table, targets, keyframes), decoded by
torchcodec, resized the same way: the same frames at the same times, to a small tolerance
(FFmpeg builds and colour conversion order differ)."""

import sys

import numpy as np
import pytest

from ovml_core.config import ConfigError, VideoConfig, torchcodec_decoder
from ovml_core.video import sample_frames, sample_segments
from tests.test_video import indices_of
from tests.videos import write_indexed_video

try:
    torchcodec_decoder()
    TORCHCODEC = ""
except ConfigError as err:  # not installed, or FFmpeg's shared libraries are missing
    TORCHCODEC = str(err)
needs_torchcodec = pytest.mark.skipif(bool(TORCHCODEC), reason=TORCHCODEC)

T, SIZE = 6, 48
MAX_MEAN_DIFF = 3.0  # of 255, mean over pixels


def both(path, **config):
    """(PyAV's, torchcodec's) frames and meta for the same video and settings."""
    pyav = sample_frames(path, T, SIZE, VideoConfig(**config))
    codec = sample_frames(path, T, SIZE, VideoConfig(decoder="torchcodec", **config))
    return pyav, codec


def assert_same(pyav, codec):
    (frames_a, meta_a), (frames_b, meta_b) = pyav, codec
    assert frames_b.shape == frames_a.shape == (T, SIZE, SIZE, 3) and frames_b.dtype == np.uint8
    assert indices_of(frames_b) == indices_of(frames_a)
    assert np.abs(frames_b.astype(np.int16) - frames_a).mean() < MAX_MEAN_DIFF
    assert meta_b["frame_times_s"] == pytest.approx(meta_a["frame_times_s"], abs=1e-6)
    for key in ("duration_s", "width", "height", "rotation", "frame_count", "sampling"):
        assert meta_b[key] == meta_a[key], key
    assert meta_b["seeks"] is None and meta_b["decoded_frames"] is None


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchcodec")
    return {
        # 12 s at 25 fps, keyframes every 2 s: exact samples decode forward from keyframes.
        "h264": write_indexed_video(folder / "a.mp4", 300, width=96, height=64, fps=25, gop=50),
        "rotated": write_indexed_video(
            folder / "r.mp4", 40, width=96, height=64, fps=10, gop=10, rotation=90
        ),
        "vp9": write_indexed_video(folder / "v.webm", 40, width=64, height=48, codec="vp9"),
        # A late first frame and an uneven frame rate: times from the stream, not from 0.
        "vfr": write_indexed_video(
            folder / "t.mp4",
            30,
            width=64,
            height=48,
            times_s=[1.5 + 0.1 * i**1.2 for i in range(30)],
        ),
    }


@needs_torchcodec
@pytest.mark.parametrize("name", ["h264", "rotated", "vp9", "vfr"])
def test_exact_frames_match_pyav(clips, name):
    assert_same(*both(clips[name]))


@needs_torchcodec
def test_keyframe_mode_decodes_the_same_keyframes(clips):
    pyav, codec = both(clips["h264"], mode="keyframe")
    assert pyav[1]["sampling"] == "keyframe"
    assert_same(pyav, codec)
    assert all(i % 50 == 0 for i in indices_of(codec[0]))


@needs_torchcodec
def test_segments_match_pyav(clips):
    pyav = sample_segments(clips["h264"], T, SIZE, 4.0, VideoConfig())
    codec = sample_segments(clips["h264"], T, SIZE, 4.0, VideoConfig(decoder="torchcodec"))
    assert codec[0].shape == pyav[0].shape == (3, T, SIZE, SIZE, 3)
    np.testing.assert_array_equal(codec[1], pyav[1])
    assert indices_of(codec[0].reshape(-1, SIZE, SIZE, 3)) == indices_of(
        pyav[0].reshape(-1, SIZE, SIZE, 3)
    )
    assert codec[2]["frame_times_s"] == pytest.approx(pyav[2]["frame_times_s"], abs=1e-6)


def test_decoder_field_is_checked():
    with pytest.raises(
        ConfigError, match=r"video\.decoder: 'ffmpeg' is not one of pyav, torchcodec"
    ):
        VideoConfig(decoder="ffmpeg").validate()
    VideoConfig(decoder="pyav").validate()


def test_torchcodec_missing_is_a_config_error_naming_the_field(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # import fails as if absent
    with pytest.raises(ConfigError, match=r"video\.decoder: 'torchcodec' is not usable here"):
        VideoConfig(decoder="torchcodec").validate()
