"""The DuckDB views of a tags output (pipeline/sql.py) against `read_tags`: on hand-written part
files of three runs (one written before embeddings were stored, a superseded row, an error row,
a snapshot copy) with known answers, and on real tagging runs: a first run over every clip,
then a second run that re-tags two of them at a lower threshold."""

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ovml_core.config import Config, ConfigError
from pipeline.parquet_io import latest_per_video, read_tags, tags_schema
from pipeline.tagging import run_tagging
from tests.conftest import TINY_CONFIG
from tests.videos import sample_clips, write_indexed_video

duckdb = pytest.importorskip("duckdb")
from pipeline.sql import connect  # noqa: E402

LABELS = ["dog", "cat", "surfing", "rabbit", "bicycle"]
OVERRIDES = ["model.init_bias=0.0", "tag.emit_embedding=true", "tag.top_k=5"]
RETAGGED = ["bikes", "synthetic"]


RUN1, RUN2, RUN3 = (f"2026010{d}T000000000000Z-abcdef" for d in (1, 2, 3))


def _row(video_id, run_id, tags=None, embedding=None, error=None):
    tags = [{"label": label, "score": score} for label, score in (tags or {}).items()]
    return {
        "video_id": video_id,
        "uri": f"/videos/{video_id}.mp4",
        "tags": None if error else tags,
        "top_k": None if error else tags,
        "embedding": embedding,
        "error": error,
        "model_fingerprint": "m1",
        "vocabulary_fingerprint": "v1",
        "run_id": run_id,
    }


@pytest.fixture
def written(tmp_path):
    """Three runs' part files. Run 1 predates stored embeddings and vocabulary fingerprints
    (its file lacks both columns); run 2 re-tags b (adding dog) and tags d, whose row a
    compaction snapshot also holds (same run id); run 3 fails on c."""
    old = tags_schema()
    old = pa.schema([f for f in old if f.name != "vocabulary_fingerprint"])
    rows = [_row("a", RUN1, {"dog": 0.9, "cat": 0.6}), _row("b", RUN1, {"cat": 0.85})]
    rows.append(_row("c", RUN1, {"dog": 0.7}))
    pq.write_table(pa.Table.from_pylist(rows, old), tmp_path / f"part-{RUN1}-00000.parquet")
    new = tags_schema(2)
    b = _row("b", RUN2, {"dog": 0.95, "cat": 0.9}, [0.6, 0.8])
    d = _row("d", RUN2, {"dog": 0.81, "bird": 0.5}, [1.0, 0.0])
    pq.write_table(pa.Table.from_pylist([b, d], new), tmp_path / f"part-{RUN2}-00000.parquet")
    pq.write_table(pa.Table.from_pylist([d], new), tmp_path / f"part-{RUN2}-snapshot.parquet")
    c = _row("c", RUN3, error="VideoDecodeError: truncated")
    pq.write_table(pa.Table.from_pylist([c], new), tmp_path / f"part-{RUN3}-00000.parquet")
    (tmp_path / f".part-{RUN3}-00001.parquet.1234.tmp").write_bytes(b"half a file")
    return str(tmp_path)


def test_views_on_written_parts_equal_read_tags(written):
    expected = read_tags(written).to_pylist()
    got = connect(written).sql("SELECT * FROM tags_current ORDER BY video_id").to_arrow_table()
    got = got.to_pylist()
    assert [(r["video_id"], r["run_id"]) for r in got] == [
        ("a", RUN1),
        ("b", RUN2),
        ("c", RUN3),
        ("d", RUN2),
    ]
    for row, want in zip(got, expected, strict=True):
        assert row["video_id"] == want["video_id"]
        assert _tag_pairs(row["tags"]) == _tag_pairs(want["tags"])
        assert (row["error"], row["vocabulary_fingerprint"]) == (
            want["error"],
            want["vocabulary_fingerprint"],
        )
    embeddings = {r["video_id"]: r["embedding"] for r in got}
    assert embeddings["a"] is None and embeddings["c"] is None  # predates / failed
    np.testing.assert_allclose(embeddings["b"], [0.6, 0.8], atol=1e-3)  # float16 stored


def test_example_queries_on_written_parts(written):
    con = connect(written)
    above = con.execute(
        "SELECT video_id, score FROM video_tags WHERE label = ? AND score > ? ORDER BY video_id",
        ["dog", 0.8],
    ).fetchall()
    # c's dog 0.7 was never above; and its current row is an error, with no tags at all.
    assert [v for v, _ in above] == ["a", "b", "d"]
    np.testing.assert_allclose([s for _, s in above], [0.9, 0.95, 0.81], rtol=1e-6)
    new = "SELECT video_id, label, run_id FROM new_tags_since(?) ORDER BY video_id, label"
    # b gains dog (cat it had); d is new; c lost its tags, which is not a new tag.
    assert con.execute(new, [RUN1]).fetchall() == [
        ("b", "dog", RUN2),
        ("d", "bird", RUN2),
        ("d", "dog", RUN2),
    ]
    assert con.execute(new, [RUN2]).fetchall() == []
    as_of = con.execute(
        "SELECT video_id, run_id FROM tags_as_of(?) ORDER BY video_id", [RUN1]
    ).fetchall()
    assert as_of == [("a", RUN1), ("b", RUN1), ("c", RUN1)]


def test_a_compaction_keeps_the_current_state_and_drops_history(written):
    """A compaction by hand: the current rows, run ids kept, as one snapshot; other parts gone."""
    current = read_tags(written)
    for part in Path(written).glob("part-*.parquet"):
        part.unlink()
    pq.write_table(current, Path(written) / f"part-{RUN3}-snapshot.parquet")
    con = connect(written)
    got = con.sql("SELECT video_id, run_id FROM tags_current ORDER BY video_id").fetchall()
    assert got == [(r["video_id"], r["run_id"]) for r in current.to_pylist()]
    # b's run-1 row (cat) is gone: as of run 1, b now had no row, so cat counts as new too.
    new = "SELECT video_id, label FROM new_tags_since(?) ORDER BY video_id, label"
    assert con.execute(new, [RUN1]).fetchall() == [
        ("b", "cat"),
        ("b", "dog"),
        ("d", "bird"),
        ("d", "dog"),
    ]


def _manifest(path, clips):
    pq.write_table(
        pa.table({"video_id": list(clips), "uri": [str(p) for p in clips.values()]}), path
    )
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(output after run 1, output after run 2, run 1's id)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    root = tmp_path_factory.mktemp("sql")
    clips = {p.stem: p for p in sample_clips()}
    clips["synthetic"] = write_indexed_video(root / "synthetic.mp4", 24)
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    labels = str(root / "labels.txt")
    cfg = Config.from_yaml(TINY_CONFIG, OVERRIDES)
    out = root / "tags"
    first = run_tagging(cfg, _manifest(root / "all.parquet", clips), str(out), labels=labels)
    shutil.copytree(out, root / "after-first")
    lower = Config.from_yaml(TINY_CONFIG, [*OVERRIDES, "tag.threshold=0.3"])
    subset = _manifest(root / "subset.parquet", {v: clips[v] for v in RETAGGED})
    run_tagging(lower, subset, str(out), labels=labels, full=True)
    yield root / "after-first", out, first.run_id
    ray.shutdown()


def _tag_pairs(tags):
    return [(t["label"], round(t["score"], 5)) for t in tags or []]


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1])
def test_tags_current_is_the_state_read_tags_returns(runs, which):
    out = str(runs[which])
    expected = {r["video_id"]: r for r in read_tags(out).to_pylist()}
    got = connect(out).sql("SELECT * FROM tags_current").to_arrow_table().to_pylist()
    assert sorted(r["video_id"] for r in got) == sorted(expected)  # one row per video
    for row in got:
        want = expected[row["video_id"]]
        assert (row["run_id"], row["uri"], row["error"]) == (
            want["run_id"],
            want["uri"],
            want["error"],
        )
        assert _tag_pairs(row["tags"]) == _tag_pairs(want["tags"])
        np.testing.assert_allclose(row["embedding"], want["embedding"], rtol=1e-3, atol=1e-3)
    if which == 1:  # the re-tagged videos' rows are the second run's
        runs_of = {r["video_id"]: r["run_id"] for r in got}
        assert {runs_of[v] for v in RETAGGED} != {runs[2]} and runs_of["bikes"] > runs[2]


@pytest.mark.slow
def test_videos_tagged_with_a_label_above_a_score(runs):
    out = str(runs[1])
    current = read_tags(out).to_pylist()
    scores = [t["score"] for r in current for t in r["tags"] or [] if t["label"] == "dog"]
    assert scores, "no video tagged dog: pick another label"
    above = float(np.median(scores))  # docs/sql.md uses 0.8 with a trained model
    query = "SELECT video_id FROM video_tags WHERE label = ? AND score > ? ORDER BY video_id"
    got = [v for (v,) in connect(out).execute(query, ["dog", above]).fetchall()]
    expected = sorted(
        r["video_id"]
        for r in current
        if any(t["label"] == "dog" and t["score"] > above for t in r["tags"] or [])
    )
    assert got == expected and 0 < len(got) < len(current)


@pytest.mark.slow
def test_new_tags_since_a_run(runs):
    _, out, first_run = runs
    rows = pq.ParquetDataset(str(out)).read()  # every physical row of both runs
    before = latest_per_video(rows.filter(pc.less_equal(rows["run_id"], first_run)))
    old = {r["video_id"]: {t["label"] for t in r["tags"] or []} for r in before.to_pylist()}
    expected = sorted(
        (r["video_id"], t["label"])
        for r in read_tags(str(out)).to_pylist()
        if r["run_id"] > first_run
        for t in r["tags"] or []
        if t["label"] not in old.get(r["video_id"], set())
    )
    got = connect(str(out)).execute(
        "SELECT video_id, label, score FROM new_tags_since(?) ORDER BY video_id, label",
        [first_run],
    )
    got = got.fetchall()
    assert [(v, label) for v, label, _ in got] == expected
    assert expected, "the lower threshold of run 2 should add tags"
    assert {v for v, _ in expected} <= set(RETAGGED)
    # New tags are the ones between the two thresholds.
    assert all(0.3 <= score < 0.5 + 1e-4 for _, _, score in got)
    # '~' sorts after every run id (they start with digits): nothing is newer.
    assert connect(str(out)).execute("SELECT count(*) FROM new_tags_since('~')").fetchone() == (0,)


def _window(start, end, tags):
    tags = [{"label": label, "score": score} for label, score in tags.items()]
    return {"start_s": start, "end_s": end, "tags": tags, "top_k": tags, "embedding": [1.0, 0.0]}


def test_segment_tags_are_the_current_rows_windows(tmp_path):
    schema = tags_schema(2)
    old = _row("e", RUN1, {"dog": 0.9}) | {"segments": [_window(0.0, 10.0, {"dog": 0.9})]}
    windows = [_window(0.0, 10.0, {"dog": 0.8}), _window(10.0, 20.0, {"dog": 0.6, "cat": 0.7})]
    new = _row("e", RUN2, {"dog": 0.8, "cat": 0.7}) | {"segments": windows, "segment_s": 10.0}
    whole = _row("f", RUN2, {"cat": 0.9})  # tagged without segments: no segment rows
    pq.write_table(pa.Table.from_pylist([old], schema), tmp_path / f"part-{RUN1}-00000.parquet")
    pq.write_table(pa.Table.from_pylist([new, whole], schema), tmp_path / f"part-{RUN2}-0.parquet")
    got = connect(str(tmp_path)).sql(
        "SELECT video_id, segment, start_s, end_s, label, score, run_id FROM segment_tags "
        "ORDER BY video_id, segment, label"
    )
    assert [row[:5] for row in got.fetchall()] == [
        ("e", 0, 0.0, 10.0, "dog"),
        ("e", 1, 10.0, 20.0, "cat"),
        ("e", 1, 10.0, 20.0, "dog"),
    ]
    scores = [row[5] for row in got.fetchall()]
    assert scores == pytest.approx([0.8, 0.7, 0.6]) and {r[6] for r in got.fetchall()} == {RUN2}


def test_views_refuse_what_they_cannot_read(tmp_path):
    with pytest.raises(ConfigError, match="no part files"):
        connect(str(tmp_path))
    with pytest.raises(ConfigError, match="local directories only"):
        connect("s3://bucket/tags")
