"""Segment tags (tag.segment_s): windows, their one-pass decode, and tags per window end to end.

Decoding is checked on indexed clips (every frame shows its own index) at 10 fps, so frame i is
displayed during [i / 10, (i + 1) / 10) s and a sampled frame tells exactly where it came from.
The end-to-end tests run the real Ray Data plans on configs/tiny.yaml; a batch there holds a
three-segment and a one-segment video, so the encode actor sees rows of different S.
"""

import contextlib
import math
import os
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ovml_core.config import Config, ConfigError, VideoConfig
from ovml_core.model import as_stored, create_model
from ovml_core.video import sample_frames, sample_segments, segment_windows
from pipeline.decode import decode_video
from pipeline.parquet_io import read_tags, segments_type, tags_schema
from pipeline.segments import (
    max_per_video,
    mean_embedding,
    segments_array,
    stored_embeddings,
    stored_segments,
)
from pipeline.tagging import ScoreHead, pending_videos, rank_tags, rescore_batch, run_tagging
from tests.conftest import TINY_CONFIG
from tests.test_tagging import ray_local  # noqa: F401 (the local Ray fixture)
from tests.videos import read_frame_index, write_indexed_video

FPS = 10


def indices_of(frames: np.ndarray) -> list[int]:
    return [read_frame_index(f) for f in frames]


def expected_indices(windows_s: list[tuple[float, float]], num_frames: int) -> list[list[int]]:
    """Frames displayed at the centres of `num_frames` equal parts of each window."""
    return [
        [
            math.floor((a + (2 * i + 1) * (b - a) / (2 * num_frames)) * FPS)
            for i in range(num_frames)
        ]
        for a, b in windows_s
    ]


# ---------------------------------------------------------------- windows


def test_windows_cut_every_segment_and_merge_a_short_remainder():
    assert segment_windows(25, 10, 720) == [(0, 10), (10, 20), (20, 25)]  # 5 s >= half: own
    assert segment_windows(24, 10, 720) == [(0, 10), (10, 24)]  # 4 s < half: joins the last
    assert segment_windows(30, 10, 720) == [(0, 10), (10, 20), (20, 30)]
    assert segment_windows(15, 10, 720) == [(0, 10), (10, 15)]
    # up to one and a half segments, and with segments off: the whole video
    assert segment_windows(10, 10, 720) == [(0, 10)]
    assert segment_windows(14.9, 10, 720) == [(0, 14.9)]
    assert segment_windows(5, 10, 720) == [(0, 5)]
    assert segment_windows(7200, 0, 720) == [(0, 7200)]
    # exact in any unit (the decoder works in stream ticks)
    ticks = segment_windows(25_000, Fraction(10_000), 720)
    assert ticks == [(0, 10_000), (10_000, 20_000), (20_000, 25_000)]


def test_more_windows_than_the_cap_become_equal_longer_ones():
    windows = segment_windows(7200 * 3, 10, 720)  # six hours in 10-s windows: 2160 > 720
    assert len(windows) == 720
    assert windows[0] == (0, 30) and windows[-1] == (21570, 21600)
    assert all(b - a == 30 for a, b in windows)
    assert all(windows[i][1] == windows[i + 1][0] for i in range(719))  # contiguous, no gap
    assert len(segment_windows(7200, 10, 720)) == 720  # two hours fit exactly
    with pytest.raises(ValueError, match="max_segments"):
        segment_windows(10, 1, 0)


def test_config_names_the_segment_fields():
    assert Config.from_yaml(TINY_CONFIG).tag.segment_s == 0  # off by default
    assert Config.from_yaml(TINY_CONFIG, ["tag.segment_s=10"]).tag.segment_s == 10
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ConfigError, match=r"tag\.segment_s: must be .*>= 0"):
            Config.from_yaml(TINY_CONFIG, [f"tag.segment_s={bad}"])
    with pytest.raises(ConfigError, match=r"tag\.max_segments: must be > 0"):
        Config.from_yaml(TINY_CONFIG, ["tag.max_segments=0"])


# ---------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Indexed h264 clips at 10 fps: 25 s (3 segments of 10 s), 15 s (2), 5 s (short), and
    25 s with a single keyframe (one GOP)."""
    root = tmp_path_factory.mktemp("segment_clips")
    return {
        "long": write_indexed_video(root / "long.mp4", 250, fps=FPS, gop=30),
        "mid": write_indexed_video(root / "mid.mp4", 150, fps=FPS, gop=30),
        "short": write_indexed_video(root / "short.mp4", 50, fps=FPS, gop=30),
        "one_gop": write_indexed_video(root / "one_gop.mp4", 250, fps=FPS, gop=300),
    }


@pytest.mark.parametrize("mode", ["exact", "sequential", "seek"])
def test_each_segment_samples_its_own_window(clips, mode):
    frames, bounds, meta = sample_segments(clips["long"], 4, 32, 10.0, VideoConfig(mode=mode))
    assert frames.shape == (3, 4, 32, 32, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(bounds, [[0, 10], [10, 20], [20, 25]])
    expected = expected_indices(bounds.tolist(), 4)
    assert [indices_of(segment) for segment in frames] == expected
    for (start, end), segment in zip(bounds, frames, strict=True):
        assert all(start <= i / FPS < end for i in indices_of(segment))
    flat = [i for segment in expected for i in segment]
    assert meta["frame_times_s"] == pytest.approx([i / FPS for i in flat])
    assert meta["frame_count"] == 250 and meta["duration_s"] == pytest.approx(25.0)


def test_keyframe_mode_picks_keyframes_inside_each_window(clips):
    # A keyframe every 10 frames (1 s): within half a part (1.25 s / 2) of every target.
    path = write_indexed_video(clips["long"].with_name("gop10.mp4"), 250, fps=FPS, gop=10)
    frames, bounds, meta = sample_segments(path, 4, 32, 10.0, VideoConfig(mode="keyframe"))
    assert meta["sampling"] == "keyframe"
    for (start, end), segment in zip(bounds, frames, strict=True):
        indices = indices_of(segment)
        assert all(i % 10 == 0 and start <= i / FPS < end for i in indices), indices


def test_all_segments_come_from_one_forward_pass(clips):
    """No frame is decoded twice: one GOP means no seek at all and at most every frame once,
    where re-seeking per segment would decode from frame 0 for each of the 3 windows."""
    for mode in ("exact", "sequential"):
        _, _, meta = sample_segments(clips["one_gop"], 4, 32, 10.0, VideoConfig(mode=mode))
        assert meta["seeks"] == 0, mode
        assert meta["decoded_frames"] <= meta["frame_count"] == 250, mode
        assert meta["decoded_frames"] >= 244  # the last target is frame 243
    # With keyframes every 3 s, exact sampling seeks ahead (forward only) and decodes fewer frames.
    _, _, meta = sample_segments(clips["long"], 4, 32, 10.0, VideoConfig(mode="exact"))
    assert meta["seeks"] > 0 and meta["decoded_frames"] < 250
    times = meta["frame_times_s"]
    assert times == sorted(times)


def test_a_short_video_is_one_segment_exactly_as_without_segments(clips):
    frames, bounds, meta = sample_segments(clips["short"], 4, 32, 10.0)
    whole, whole_meta = sample_frames(clips["short"], 4, 32)
    assert frames.shape == (1, 4, 32, 32, 3)
    np.testing.assert_array_equal(frames[0], whole)
    np.testing.assert_allclose(bounds, [[0, 5]])
    assert meta["frame_times_s"] == whole_meta["frame_times_s"]


def test_the_cap_bounds_the_frames_of_a_long_video(clips):
    frames, bounds, _ = sample_segments(clips["long"], 2, 16, 1.0, max_segments=5)
    assert frames.shape == (5, 2, 16, 16, 3)  # 25 one-second windows capped to 5 of 5 s
    np.testing.assert_allclose(bounds, [[5 * k, 5 * k + 5] for k in range(5)])
    assert [indices_of(s) for s in frames] == expected_indices(bounds.tolist(), 2)


def test_decode_video_adds_segment_bounds_and_keeps_error_rows_shaped(clips, tmp_path):
    kwargs = dict(num_frames=4, size=16, allowed_schemes=["file"], segment_s=10.0)
    row = decode_video({"video_id": "l", "uri": str(clips["long"])}, **kwargs)
    assert row["error"] is None and row["frames"].shape == (3, 4, 16, 16, 3)
    np.testing.assert_allclose(row["segment_bounds"], [[0, 10], [10, 20], [20, 25]])
    bad = decode_video({"video_id": "x", "uri": str(tmp_path / "missing.mp4")}, **kwargs)
    assert "file not found" in bad["error"] and bad["frames"].shape == (1, 4, 16, 16, 3)
    assert bad["segment_bounds"].shape == (0, 2)
    off = decode_video({"video_id": "l", "uri": str(clips["long"])}, **{**kwargs, "segment_s": 0})
    assert off["frames"].shape == (4, 16, 16, 3) and "segment_bounds" not in off


# ---------------------------------------------------------------- flat clips <-> rows


def test_segment_helpers_aggregate_and_round_trip():
    rng = np.random.default_rng(0)
    counts = np.array([3, 0, 1, 2])  # row 1 is an error row
    clips = rng.normal(size=(6, 8)).astype(np.float32)
    clips = (clips / np.linalg.norm(clips, axis=1, keepdims=True)).astype(np.float16)
    clips = clips.astype(np.float32)
    probabilities = rng.uniform(size=(6, 3)).astype(np.float32)
    ok = counts > 0
    np.testing.assert_array_equal(
        max_per_video(probabilities, counts[ok]),
        [probabilities[0:3].max(0), probabilities[3], probabilities[4:6].max(0)],
    )
    pooled = mean_embedding(clips, counts[ok])
    np.testing.assert_array_equal(pooled[1], clips[3])  # one segment: its embedding as is
    mean = clips[0:3].mean(0)
    np.testing.assert_allclose(pooled[0], mean / np.linalg.norm(mean), atol=1e-3)
    assert np.linalg.norm(pooled, axis=1) == pytest.approx(1.0, abs=1e-3)

    bounds = np.array([[0, 10], [10, 20], [20, 25], [0, 5], [0, 10], [10, 15]], np.float64)
    tags, top_k = rank_tags(probabilities, ["a", "b", "c"], 0.5, 2)
    column = segments_array(counts, bounds, tags, top_k, clips, segments_type(8))
    assert column.type == tags_schema(8).field("segments").type
    rows = column.to_pylist()
    assert rows[1] is None and [len(r) for r in (rows[0], rows[2], rows[3])] == [3, 1, 2]
    assert [(s["start_s"], s["end_s"]) for s in rows[0]] == [(0, 10), (10, 20), (20, 25)]
    assert all(len(s["top_k"]) == 2 for r in rows if r for s in r)
    stored_counts, stored_bounds, values = stored_segments(pa.chunked_array([column]))
    np.testing.assert_array_equal(stored_counts, counts)
    np.testing.assert_array_equal(stored_bounds, bounds)
    np.testing.assert_array_equal(stored_embeddings(values, 8), clips)
    # without embeddings (tag.emit_embedding off) the struct holds none
    bare = segments_array(counts, bounds, tags, top_k, None, segments_type(None))
    assert "embedding" not in [f.name for f in bare.type.value_type]


def test_a_changed_segment_s_encodes_again():
    t = "2026-01-01T00:00:00+00:00"
    manifest = pa.table(
        {
            "video_id": ["a", "b", "c"],
            "uri": ["a", "b", "c"],
            "source_size": [10, 10, 10],
            "source_mtime": [t, t, t],
        }
    )
    current = pa.table(
        {
            "video_id": ["a", "b", "c"],
            "uri": ["a", "b", "c"],
            "error": pa.nulls(3, pa.string()),
            "error_kind": pa.nulls(3, pa.string()),
            "model_fingerprint": ["fp"] * 3,
            "vocabulary_fingerprint": ["voc"] * 3,
            "source_size": [10, 10, 10],
            "source_mtime": [t, t, t],
            "segment_s": pa.array([10.0, 0.0, None], pa.float64()),  # c: before segments
            "run_id": ["r1"] * 3,
        }
    )
    on = pending_videos(manifest, current, "fp", "voc", segment_s=10.0)
    assert on.encode["video_id"].to_pylist() == ["b", "c"] and on.skipped == 1
    off = pending_videos(manifest, current, "fp", "other", segment_s=0.0)
    assert off.encode["video_id"].to_pylist() == ["a"] and off.rescore == ["b", "c"]


# ---------------------------------------------------------------- end to end (Ray)

LABELS = ["dog", "cat", "surfing"]
# top_k above the label count: every row (and segment) lists every label's score; batches of
# 2 videos: the first holds S = 3 and S = 1, and its 4 clips take 2 forward passes.
OVERRIDES = [
    "model.init_bias=0.0",
    "tag.top_k=10",
    "tag.segment_s=10",
    "tag.batch_size=2",
    "tag.rows_per_file=2",
]


@pytest.fixture(scope="module")
def cfg():
    return Config.from_yaml(TINY_CONFIG, OVERRIDES)


def _manifest(path: Path, videos: dict) -> str:
    uris = [str(v) for v in videos.values()]
    pq.write_table(pa.table({"video_id": list(videos), "uri": uris}), path)
    return str(path)


def _labels(path: Path, labels: list[str]) -> str:
    path.write_text("\n".join(labels) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def videos(clips, tmp_path_factory):
    root = tmp_path_factory.mktemp("segment_videos")
    # Own copies: the re-scoring test makes them unreadable for a while.
    own = {k: Path(shutil.copy(clips[k], root / f"{k}.mp4")) for k in ("long", "short", "mid")}
    return own | {"broken": root / "missing.mp4"}


@pytest.fixture(scope="module")
def tagged(ray_local, cfg, videos, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("segment_tags")
    manifest = _manifest(root / "manifest.parquet", videos)
    out = root / "tags"
    summary = run_tagging(cfg, manifest, str(out), labels=_labels(root / "l.txt", LABELS))
    assert (summary.ok, summary.errored) == (3, 1)
    return out, manifest, summary


def _scores(tags: list[dict]) -> dict[str, float]:
    return {t["label"]: t["score"] for t in tags}


@pytest.mark.slow
def test_rows_carry_segments_whose_max_is_the_video_tags(cfg, videos, tagged):
    out = tagged[0]
    table = read_tags(str(out))
    model = create_model(cfg.model)
    labels = model.encode_labels(LABELS)
    assert table.schema.equals(tags_schema(labels.shape[1]))
    rows = {r["video_id"]: r for r in table.to_pylist()}
    assert rows["broken"]["error"] and rows["broken"]["segments"] is None
    bounds = {"long": [(0, 10), (10, 20), (20, 25)], "mid": [(0, 10), (10, 15)], "short": [(0, 5)]}
    for video_id, expected in bounds.items():
        row = rows[video_id]
        assert row["segment_s"] == 10.0 and row["error"] is None
        segments = row["segments"]
        got = [[s["start_s"], s["end_s"]] for s in segments]
        np.testing.assert_allclose(got, expected, atol=1e-9)
        for segment in segments:
            scores = [t["score"] for t in segment["top_k"]]
            assert len(scores) == len(LABELS) and scores == sorted(scores, reverse=True)
            assert all(t["score"] >= cfg.tag.threshold for t in segment["tags"])
        # The video's scores: the max over its segments, label by label.
        for label in LABELS:
            best = max(_scores(s["top_k"])[label] for s in segments)
            assert _scores(row["top_k"])[label] == best, (video_id, label)
        # Its embedding: the normalised mean of the segments' (exactly theirs for one).
        stored = np.array([s["embedding"] for s in segments], np.float32)
        mean = stored.mean(0)
        np.testing.assert_allclose(row["embedding"], mean / np.linalg.norm(mean), atol=2e-3)

    # Each segment is one clip of T frames through the same encoder.
    frames, _, _ = sample_segments(
        videos["long"], model.num_frames, model.image_size, 10.0, cfg.video
    )
    with torch.inference_mode():
        expected = as_stored(model.encode_video(frames)).numpy()
    got = np.array([s["embedding"] for s in rows["long"]["segments"]], np.float32)
    np.testing.assert_allclose(got, expected, atol=2e-3)


@pytest.mark.slow
def test_a_short_video_is_tagged_as_without_segments(ray_local, cfg, videos, tagged, tmp_path):  # noqa: F811
    off = Config.from_yaml(TINY_CONFIG, [*OVERRIDES, "tag.segment_s=0"])
    manifest = _manifest(tmp_path / "m.parquet", {"short": videos["short"]})
    out = tmp_path / "tags"
    run_tagging(off, manifest, str(out), labels=_labels(tmp_path / "l.txt", LABELS))
    plain = read_tags(str(out)).to_pylist()[0]
    assert plain["segments"] is None and plain["segment_s"] == 0.0
    segmented = {r["video_id"]: r for r in read_tags(str(tagged[0])).to_pylist()}["short"]
    # Equal up to the batch the clip was encoded in (here with others, there alone).
    for key in ("top_k", "tags"):
        assert [t["label"] for t in segmented[key]] == [t["label"] for t in plain[key]]
        np.testing.assert_allclose(
            [t["score"] for t in segmented[key]], [t["score"] for t in plain[key]], atol=1e-4
        )
    np.testing.assert_allclose(segmented["embedding"], plain["embedding"], atol=1e-3)
    assert segmented["segments"][0]["embedding"] == segmented["embedding"]
    assert segmented["segments"][0]["top_k"] == segmented["top_k"]


@contextlib.contextmanager
def _unreadable(paths):
    """The files hold zeros (same size and mtime) until the block ends: a decode would fail."""
    saved = [(p, p.read_bytes(), p.stat()) for p in paths]
    try:
        for p, data, stat in saved:
            p.write_bytes(bytes(len(data)))
            os.utime(p, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        yield
    finally:
        for p, data, stat in saved:
            p.write_bytes(data)
            os.utime(p, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.slow
def test_a_new_vocabulary_rescores_the_segments_without_decoding(cfg, videos, tagged, tmp_path):
    out, manifest, _ = tagged
    more = _labels(tmp_path / "more.txt", [*LABELS, "kayak"])
    reference = tmp_path / "full"
    shutil.copytree(out, reference)
    full = run_tagging(cfg, manifest, str(reference), labels=more, full=True)
    assert (full.ok, full.rescored) == (3, 0)

    rescored = tmp_path / "rescored"
    shutil.copytree(out, rescored)
    good = [videos[v] for v in ("long", "mid", "short")]
    with _unreadable(good):
        summary = run_tagging(cfg, manifest, str(rescored), labels=more)
    # Only the error row was tried again (and failed again); the rest was re-scored.
    assert (summary.ok, summary.errored, summary.rescored) == (0, 1, 3)
    assert summary.stages.videos == 1
    got = {r["video_id"]: r for r in read_tags(str(rescored)).to_pylist()}
    first = {r["video_id"]: r for r in read_tags(str(out)).to_pylist()}
    want = {r["video_id"]: r for r in read_tags(str(reference)).to_pylist()}
    for video_id in ("long", "mid", "short"):
        ours, theirs = got[video_id], want[video_id]
        assert len(ours["segments"]) == len(theirs["segments"])
        for a, b in zip([ours, *ours["segments"]], [theirs, *theirs["segments"]], strict=True):
            assert [t["label"] for t in a["top_k"]] == [t["label"] for t in b["top_k"]]
            assert [t["label"] for t in a["tags"]] == [t["label"] for t in b["tags"]]
            assert "kayak" in _scores(a["top_k"])
            np.testing.assert_allclose(
                [t["score"] for t in a["top_k"]], [t["score"] for t in b["top_k"]], atol=1e-4
            )
            assert a["embedding"] == pytest.approx(b["embedding"], abs=1e-3)
        # Carried over from the first run, not recomputed.
        assert ours["embedding"] == first[video_id]["embedding"]
        assert ours["segments"][-1]["embedding"] == first[video_id]["segments"][-1]["embedding"]


@pytest.mark.slow
def test_a_changed_segment_s_encodes_every_video_again(ray_local, videos, tagged, tmp_path):  # noqa: F811
    out, manifest, _ = tagged
    copy = tmp_path / "tags"
    shutil.copytree(out, copy)
    off = Config.from_yaml(TINY_CONFIG, [*OVERRIDES, "tag.segment_s=0"])
    summary = run_tagging(off, manifest, str(copy), labels=_labels(tmp_path / "l.txt", LABELS))
    assert (summary.ok, summary.errored, summary.rescored, summary.skipped) == (3, 1, 0, 0)
    rows = read_tags(str(copy)).to_pylist()
    assert all(r["segments"] is None and r["segment_s"] == 0.0 for r in rows)


def test_rescore_batch_takes_the_max_over_stored_segments_and_fills_older_rows():
    rng = np.random.default_rng(1)
    dim, labels = 8, pa.array(["a", "b", "c"])
    bank = rng.normal(size=(3, dim)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    clips = rng.normal(size=(3, dim)).astype(np.float32)
    clips = (clips / np.linalg.norm(clips, axis=1, keepdims=True)).astype(np.float16)
    clips = clips.astype(np.float32)
    counts = np.array([2, 1])
    head = ScoreHead(logit_scale=10.0, logit_bias=0.0)
    tag = Config.from_yaml(TINY_CONFIG, ["tag.top_k=3", "tag.segment_s=10"]).tag
    schema = tags_schema(dim)
    stale = rank_tags(np.zeros((3, 3), np.float32), labels, 0.5, 3)  # the old vocabulary's
    segments = segments_array(
        counts, np.array([[0, 10], [10, 25], [0, 5]]), *stale, clips, schema.field("segments").type
    )
    video = mean_embedding(clips, counts).astype(np.float16).reshape(-1)
    stored = {
        "video_id": ["long", "short"],
        "uri": ["l", "s"],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(video), dim),
        "segments": segments,
        "model_fingerprint": ["fp", "fp"],
        "run_id": ["r0", "r0"],
    }
    kwargs = dict(
        labels=labels,
        label_embeddings=bank,
        head=head,
        vocabulary_fingerprint="new",
        run_id="r1",
        tag=tag,
        schema=schema,
    )
    out = rescore_batch(pa.table(stored), **kwargs).to_pylist()
    expected = head.score(torch.from_numpy(clips), torch.from_numpy(bank)).numpy()
    for row, (start, end) in zip(out, [(0, 2), (2, 3)], strict=True):
        assert [_scores(s["top_k"]) for s in row["segments"]] == [
            pytest.approx(dict(zip("abc", p.tolist(), strict=True))) for p in expected[start:end]
        ]
        best = expected[start:end].max(0)
        assert _scores(row["top_k"]) == pytest.approx(dict(zip("abc", best.tolist(), strict=True)))
        assert row["vocabulary_fingerprint"] == "new" and row["segment_s"] is None
    # Rows of versions before segments: no segments column at all, scored from the embedding.
    del stored["segments"]
    old = rescore_batch(pa.table(stored), **kwargs)
    assert old.schema.equals(schema) and old["segments"].null_count == 2
