"""video.mode=auto (the default): keyframes where each is within a quarter segment of its time
and predicted much cheaper, on videos of AUTO_MIN_S and more; exact sampling otherwise, with
the very frames of the mode it picked."""

import numpy as np
import pytest

from ovml_core.config import ConfigError, VideoConfig
from ovml_core.video import AUTO_MIN_S, sample_frames, sample_segments
from tests.test_video import indices_of
from tests.videos import write_indexed_video

# 800 frames, T=4: segment centres at frames 100, 300, 500, 700 (half a segment: 100 frames,
# a quarter: 50).
FRAMES, T = 800, 4


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("modes")

    def clip(name, fps, gop):
        return write_indexed_video(folder / f"{name}.mp4", FRAMES, fps=fps, gop=gop)

    return {
        # 40 s, keyframes 6.25 s apart, each centre's nearest 0-50 frames away (a quarter
        # segment at most): exact decodes ~60 frames per sample, keyframes one each.
        "near_gop": clip("near_gop", fps=20, gop=125),
        # 40 s, keyframes 10 s apart, each nearest 100 frames (half a segment) from its centre.
        "long_gop": clip("long_gop", fps=20, gop=200),
        # 40 s, keyframes 1.5 s apart: exact decodes ~10 frames per sample; too little to gain.
        "short_gop": clip("short_gop", fps=20, gop=30),
        # The same frames as near_gop in 10 s: a short clip stays exact.
        "short_clip": clip("short_clip", fps=80, gop=125),
        # 40 s, one keyframe: too sparse for keyframes whatever they would cost.
        "one_gop": clip("one_gop", fps=20, gop=1000),
    }


def sample(path, mode):
    return sample_frames(path, T, 32, VideoConfig(mode=mode))


@pytest.mark.parametrize(
    ("name", "picked", "indices"),
    [
        ("near_gop", "keyframe", [125, 250, 500, 750]),  # nearest keyframes (ties: earlier)
        ("long_gop", "exact", [100, 300, 500, 700]),  # keyframe mode: 0, 200, 400, 600
        ("short_gop", "exact", [100, 300, 500, 700]),  # keyframe mode: 90, 300, 510, 690
        ("short_clip", "exact", [100, 300, 500, 700]),
        ("one_gop", "exact", [100, 300, 500, 700]),
    ],
)
def test_auto_picks_by_reach_and_predicted_cost_and_returns_that_modes_frames(
    clips, name, picked, indices
):
    frames, meta = sample(clips[name], "auto")
    assert meta["sampling"] == picked
    assert indices_of(frames) == indices
    reference, reference_meta = sample(clips[name], "keyframe" if picked == "keyframe" else "exact")
    np.testing.assert_array_equal(frames, reference)
    assert meta["frame_times_s"] == reference_meta["frame_times_s"]
    assert meta["decoded_frames"] == reference_meta["decoded_frames"]


def test_the_rule_is_not_moot(clips):
    """Keyframe mode does use keyframes where auto declines them for reach, cost or length, so
    the cases above exercise those rules, not only the density fallback."""
    assert indices_of(sample(clips["long_gop"], "keyframe")[0]) == [0, 200, 400, 600]
    assert sample(clips["short_gop"], "keyframe")[1]["sampling"] == "keyframe"
    assert indices_of(sample(clips["short_gop"], "keyframe")[0]) == [90, 300, 510, 690]
    _, meta = sample(clips["short_clip"], "keyframe")
    assert meta["sampling"] == "keyframe" and meta["duration_s"] < AUTO_MIN_S
    assert sample(clips["one_gop"], "keyframe")[1]["sampling"] == "exact"


def test_auto_saves_decoding_where_it_picks_keyframes(clips):
    _, exact = sample(clips["near_gop"], "exact")
    _, auto = sample(clips["near_gop"], "auto")
    assert auto["decoded_frames"] == T
    assert exact["decoded_frames"] >= 200  # from each keyframe before a centre up to it


def test_auto_with_segments_plans_all_windows_together(clips):
    """Two 20-s windows of 400 frames, T=2 each: centres 100, 300, 500, 700 as above."""
    frames, bounds, meta = sample_segments(clips["near_gop"], 2, 32, 20.0, VideoConfig())
    assert frames.shape == (2, 2, 32, 32, 3)
    np.testing.assert_allclose(bounds, [[0.0, 20.0], [20.0, 40.0]])
    assert meta["sampling"] == "keyframe"
    assert indices_of(frames.reshape(-1, 32, 32, 3)) == [125, 250, 500, 750]


def test_mode_choices_name_the_field():
    assert VideoConfig().mode == "auto"
    VideoConfig(mode="exact").validate()
    with pytest.raises(ConfigError, match="video.mode"):
        VideoConfig(mode="fastest").validate()
    with pytest.raises(ConfigError, match="video.mode: 'cheapest' is now called 'auto'"):
        VideoConfig(mode="cheapest").validate()
