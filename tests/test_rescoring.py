"""Nightly vocabulary changes: a changed vocabulary is re-scored from the stored embeddings
(no decode), a new model, a changed file or a row of an older version is encoded again.

End to end on the real Ray Data plans, configs/tiny.yaml and synthetic clips. Decodes are
counted by the run itself (the stage meter's videos, the summary's ok/errored), and the
re-scored clips' bytes are replaced (size and mtime kept) while the run reads them, so a
decode would turn them into error rows.
"""

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ovml_core.config import Config
from pipeline.parquet_io import INDEX_COLUMNS, read_tags
from pipeline.tagging import run_tagging, vocabulary_fingerprint
from tests.conftest import TINY_CONFIG
from tests.test_tagging import ray_local  # noqa: F401 (the local Ray fixture)
from tests.videos import write_indexed_video

LABELS = ["dog", "cat", "surfing"]
# top_k above the label count: every row lists every label's score.
OVERRIDES = ["model.init_bias=0.0", "tag.top_k=10", "tag.rows_per_file=2"]
FRAMES = {"c12": 12, "c24": 24, "c36": 36}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cfg():
    return Config.from_yaml(TINY_CONFIG, OVERRIDES)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return {vid: write_indexed_video(root / f"{vid}.mp4", n) for vid, n in FRAMES.items()}


def _manifest(path: Path, clips: dict) -> str:
    pq.write_table(
        pa.table({"video_id": list(clips), "uri": [str(p) for p in clips.values()]}), path
    )
    return str(path)


def _labels(path: Path, labels: list[str]) -> str:
    path.write_text("\n".join(labels) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tagged(ray_local, cfg, clips, tmp_path_factory):  # noqa: F811
    """The clips tagged once with LABELS: (output directory, manifest, summary)."""
    root = tmp_path_factory.mktemp("tagged")
    manifest = _manifest(root / "manifest.parquet", clips)
    summary = run_tagging(cfg, manifest, str(root / "tags"), labels=_labels(root / "l.txt", LABELS))
    assert (summary.ok, summary.errored) == (len(clips), 0)
    return root / "tags", manifest, summary


def _copy(tagged, tmp_path: Path) -> str:
    out = tmp_path / "tags"
    shutil.copytree(tagged[0], out)
    return str(out)


def _scores(out: str) -> dict[str, dict[str, float]]:
    """{video_id: {label: score}} of the current rows (top_k lists every label here)."""
    rows = read_tags(out, columns=["video_id", "top_k"]).to_pylist()
    return {r["video_id"]: {t["label"]: t["score"] for t in r["top_k"]} for r in rows}


@contextlib.contextmanager
def _replaced(path: Path, data: bytes, *, mtime_ns: int | None = None):
    """`path` holds `data`, with mtime `mtime_ns` (its own when None), until the block ends."""
    original, stat = path.read_bytes(), path.stat()
    try:
        path.write_bytes(data)
        os.utime(path, ns=(stat.st_atime_ns, mtime_ns or stat.st_mtime_ns))
        yield
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_an_added_label_reaches_every_tagged_video_without_decoding(cfg, clips, tagged, tmp_path):
    _, manifest, first = tagged
    more = _labels(tmp_path / "more.txt", [*LABELS, "kayak"])
    # The reference: decode + encode every video again with the new vocabulary.
    retagged = _copy(tagged, tmp_path / "full")
    full = run_tagging(cfg, manifest, retagged, labels=more, full=True)
    assert (full.ok, full.rescored, full.stages.videos) == (len(clips), 0, len(clips))

    out = _copy(tagged, tmp_path)
    new_clip = write_indexed_video(tmp_path / "new.mp4", 30)
    grown = _manifest(tmp_path / "grown.parquet", clips | {"new": new_clip})
    with contextlib.ExitStack() as unreadable:
        for path in clips.values():  # same size and mtime, not a video any more
            unreadable.enter_context(_replaced(path, bytes(path.stat().st_size)))
        added = run_tagging(cfg, grown, out, labels=more)
    # One decode + encode (the new video), counted by the stage meter; the rest re-scored.
    assert (added.ok, added.errored, added.rescored, added.skipped) == (1, 0, len(clips), 0)
    assert added.stages.videos == 1
    assert f"rescored  {len(clips)}" in added.format()

    current = read_tags(out)
    assert current["error"].null_count == current.num_rows == len(clips) + 1
    expected = vocabulary_fingerprint(
        [*LABELS, "kayak"], first.model_fingerprint, cfg.tag.threshold, cfg.tag.top_k
    )
    assert set(current["vocabulary_fingerprint"].to_pylist()) == {expected}
    assert set(current["run_id"].to_pylist()) == {added.run_id}
    got, reference = _scores(out), _scores(retagged)
    for video_id in clips:
        assert set(got[video_id]) == {*LABELS, "kayak"}, video_id
        labels = sorted(reference[video_id])
        np.testing.assert_allclose(
            [got[video_id][lb] for lb in labels],
            [reference[video_id][lb] for lb in labels],
            atol=1e-5,
            err_msg=video_id,
        )
    # The thresholded tags agree with the full re-tag too.
    full_tags = read_tags(retagged, columns=["video_id", "tags"])
    ours = current.select(["video_id", "tags"]).filter(
        pc.is_in(current["video_id"], full_tags["video_id"])
    )
    assert [[t["label"] for t in r] for r in ours["tags"].to_pylist()] == [
        [t["label"] for t in r] for r in full_tags["tags"].to_pylist()
    ]


def test_a_removed_label_is_in_no_row_and_an_unchanged_rerun_skips_everything(
    cfg, clips, tagged, tmp_path
):
    out, manifest = _copy(tagged, tmp_path), tagged[1]
    before = _scores(out)
    fewer = _labels(tmp_path / "fewer.txt", ["dog", "surfing"])
    removed = run_tagging(cfg, manifest, out, labels=fewer)
    assert (removed.ok, removed.rescored, removed.skipped) == (0, len(clips), 0)
    assert removed.stages is None  # no decode + encode plan ran at all
    rows = read_tags(out).to_pylist()
    assert all("cat" not in [t["label"] for t in r["tags"] + r["top_k"]] for r in rows)
    after = _scores(out)
    for video_id in clips:  # the labels kept keep their scores
        for label in ("dog", "surfing"):
            assert after[video_id][label] == pytest.approx(before[video_id][label], abs=1e-5)

    again = run_tagging(cfg, manifest, out, labels=fewer)
    assert (again.ok, again.rescored, again.skipped, again.parts) == (0, 0, len(clips), [])


def test_another_model_encodes_again(ray_local, clips, tagged, tmp_path):  # noqa: F811
    out, manifest, first = _copy(tagged, tmp_path), tagged[1], tagged[2]
    other = Config.from_yaml(TINY_CONFIG, [*OVERRIDES, "model.init_bias=-1.0"])
    summary = run_tagging(other, manifest, out, labels=_labels(tmp_path / "l.txt", LABELS))
    assert summary.model_fingerprint != first.model_fingerprint
    assert (summary.ok, summary.rescored, summary.skipped) == (len(clips), 0, 0)
    assert summary.stages.videos == len(clips)
    current = read_tags(out, columns=INDEX_COLUMNS)
    assert set(current["model_fingerprint"].to_pylist()) == {summary.model_fingerprint}


def test_a_changed_file_is_encoded_again(cfg, clips, tagged, tmp_path):
    out, manifest = _copy(tagged, tmp_path), tagged[1]
    labels = _labels(tmp_path / "l.txt", LABELS)
    later = clips["c12"].stat().st_mtime_ns + 60 * 10**9
    other_video = clips["c36"].read_bytes()
    with (
        _replaced(clips["c12"], clips["c12"].read_bytes(), mtime_ns=later),  # touched
        _replaced(clips["c24"], other_video),  # other content and size, same mtime
    ):
        summary = run_tagging(cfg, manifest, out, labels=labels)
    assert (summary.ok, summary.rescored, summary.skipped) == (2, 0, 1)
    rows = {r["video_id"]: r for r in read_tags(out).to_pylist()}
    assert rows["c24"]["num_frames"] == FRAMES["c36"] and rows["c24"]["source_size"] == len(
        other_video
    )
    assert rows["c12"]["run_id"] == rows["c24"]["run_id"] == summary.run_id
    assert rows["c36"]["run_id"] == tagged[2].run_id


def test_rows_of_older_versions_are_encoded_again_not_an_error(cfg, clips, tagged, tmp_path):
    """Part files written before embeddings and vocabulary fingerprints were stored: one
    without an embedding column, one with the float32 embedding older versions emitted."""
    _, manifest, first = tagged
    out = tmp_path / "tags"
    out.mkdir()
    tag_list = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float32())]))
    ids = list(clips)

    def old_rows(video_ids):
        n = len(video_ids)
        return {
            "video_id": video_ids,
            "uri": [str(clips[v]) for v in video_ids],
            "tags": pa.array([[{"label": "dog", "score": 0.9}]] * n, tag_list),
            "top_k": pa.array([[{"label": "dog", "score": 0.9}]] * n, tag_list),
            "num_frames": pa.array([FRAMES[v] for v in video_ids], pa.int32()),
            "duration_s": [1.0] * n,
            "error": pa.nulls(n, pa.string()),
            "model_fingerprint": [first.model_fingerprint] * n,
            "run_id": ["20250101T000000000000Z-old000"] * n,
        }

    pq.write_table(
        pa.table(old_rows(ids[:2])), out / "part-20250101T000000000000Z-old000-0.parquet"
    )
    with_embedding = old_rows(ids[2:])
    dim = len(read_tags(str(tagged[0]))["embedding"][0])
    with_embedding["embedding"] = pa.array([[0.1] * dim], pa.list_(pa.float32(), dim))
    pq.write_table(pa.table(with_embedding), out / "part-20250101T000000000000Z-old000-1.parquet")
    old = read_tags(str(out), columns=INDEX_COLUMNS)
    assert old["vocabulary_fingerprint"].null_count == old["source_size"].null_count == 3

    summary = run_tagging(cfg, manifest, str(out), labels=_labels(tmp_path / "l.txt", LABELS))
    assert (summary.ok, summary.errored, summary.rescored, summary.skipped) == (3, 0, 0, 0)
    current = read_tags(str(out))
    assert set(current["run_id"].to_pylist()) == {summary.run_id}
    assert current["embedding"].null_count == current["vocabulary_fingerprint"].null_count == 0
    # The same scores as the first run's, which encoded these clips from scratch.
    reference = _scores(str(tagged[0]))
    for video_id, scores in _scores(str(out)).items():
        assert scores == pytest.approx(reference[video_id], abs=1e-5)
