"""`ovml compact`: one snapshot holds the current state; readers never see a mix or a loss.

Outputs are simulated nights of part files in the tags schema (no Ray needed). Faults are
injected through a real pyarrow filesystem (the local one behind `PyFileSystem`) that stalls
or fails at one operation, in this process or in a subprocess killed while it stalls.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline import compaction
from pipeline.compaction import compact, compact_directory
from pipeline.parquet_io import part_files, read_tags, tags_schema, write_parquet_atomic
from tests.conftest import REPO

DIM = 8


def night_run_id(night: int) -> str:
    return f"2026{1 + night // 28:02d}{1 + night % 28:02d}T020000000000Z-n{night:05d}"


def write_night(
    out: Path,
    night: int,
    video_ids: list[str],
    rng: np.random.Generator,
    *,
    rows_per_file: int,
    dim: int = DIM,
) -> None:
    """One nightly run's part files: rows for `video_ids`, some of them error rows."""
    run_id = night_run_id(night)
    for start in range(0, len(video_ids), rows_per_file):
        ids = video_ids[start : start + rows_per_file]
        table = _rows(ids, run_id, rng, dim)
        write_parquet_atomic(
            table, pafs.LocalFileSystem(), f"{out}/part-{run_id}-{start:06d}.parquet"
        )


def _rows(ids: list[str], run_id: str, rng: np.random.Generator, dim: int) -> pa.Table:
    n = len(ids)
    errors = [
        f"boom {v}" if bad else None for v, bad in zip(ids, rng.random(n) < 0.15, strict=True)
    ]
    scores = rng.random(n, dtype=np.float32)
    tags = [
        None if e else [{"label": "dog", "score": float(s)}]
        for e, s in zip(errors, scores, strict=True)
    ]
    embedding = rng.standard_normal((n, dim)).astype(np.float16)
    valid = pa.array([e is None for e in errors])
    embeddings = pa.FixedSizeListArray.from_arrays(pa.array(embedding.reshape(-1)), dim)
    return pa.table(
        {
            "video_id": ids,
            "uri": [f"s3://videos/{v}.mp4" for v in ids],
            "tags": tags,
            "top_k": tags,
            "embedding": pc.if_else(valid, embeddings, pa.nulls(n, embeddings.type)),
            "segments": [None] * n,  # tag.segment_s off
            "segment_s": [0.0] * n,
            "num_frames": [None if e else 90 for e in errors],
            "duration_s": [None if e else 3.0 for e in errors],
            "sampling": [None if e else "exact" for e in errors],
            "error": errors,
            "error_kind": ["permanent" if e else None for e in errors],
            "model_fingerprint": ["fp"] * n,
            "vocabulary_fingerprint": [run_id[-6:]] * n,
            "source_size": [None if e else 1000 for e in errors],
            "source_mtime": [None if e else "2026-01-01T00:00:00+00:00" for e in errors],
            "run_id": [run_id] * n,
        },
        schema=tags_schema(dim),
    )


def write_nights(
    out: Path,
    nights: int,
    videos: int,
    *,
    changed: int,
    new: int,
    rows_per_file: int,
    dim: int = DIM,
    seed: int = 0,
) -> None:
    """Night 0 tags `videos` videos; each later night re-writes `changed` of them (re-scored
    or re-tagged) and adds `new` ones."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [f"v{i:07d}" for i in range(videos)]
    write_night(out, 0, ids, rng, rows_per_file=rows_per_file, dim=dim)
    for night in range(1, nights):
        again = sorted(rng.choice(ids, size=min(changed, len(ids)), replace=False).tolist())
        added = [f"v{len(ids) + i:07d}" for i in range(new)]
        ids += added
        write_night(out, night, again + added, rng, rows_per_file=rows_per_file, dim=dim)


class FaultyLocal(pafs.FSSpecHandler):
    """The local filesystem with a fault at every call of one operation (`delete_file`,
    `move` or `open_input_file`): a delay, a hang after touching `hang_marker`, or an OSError
    after `fail_after` calls. `vanished` counts files it was asked to open that were gone."""

    def __init__(self, op, *, delay_s=0.0, hang_marker=None, fail_after=None):
        super().__init__(fsspec.filesystem("file"))
        self.op, self.delay_s = op, delay_s
        self.hang_marker, self.fail_after = hang_marker, fail_after
        self.calls = self.vanished = 0

    def _fault(self, op: str) -> None:
        if op != self.op:
            return
        self.calls += 1
        time.sleep(self.delay_s)
        if self.hang_marker:
            Path(self.hang_marker).touch()
            time.sleep(600)
        if self.fail_after is not None and self.calls > self.fail_after:
            raise OSError(f"injected: {op} failed")

    def delete_file(self, path):
        self._fault("delete_file")
        super().delete_file(path)

    def move(self, src, dest):
        self._fault("move")
        super().move(src, dest)

    def open_input_file(self, path):
        self._fault("open_input_file")
        try:
            return super().open_input_file(path)
        except FileNotFoundError:
            self.vanished += 1
            raise


def faulty_fs(op: str, **kwargs) -> pafs.FileSystem:
    return pafs.PyFileSystem(FaultyLocal(op, **kwargs))


@pytest.fixture
def nights(tmp_path):
    """20 nights, 40 videos and one more each night; (directory, its current state before any compaction)."""
    out = tmp_path / "tags"
    write_nights(out, 20, 40, changed=8, new=1, rows_per_file=4)
    return out, read_tags(str(out))


def _parts(out: Path) -> list[str]:
    return part_files(pafs.LocalFileSystem(), str(out))


def test_compaction_keeps_the_current_state_in_one_snapshot(nights, capsys, caplog):
    out, before = nights
    parts = _parts(out)
    assert len(parts) == 10 + 19 * 3 and before.num_rows == 40 + 19
    stored = sum(pq.read_metadata(p).num_rows for p in parts)
    caplog.set_level("INFO", logger="pipeline.compaction")
    assert compaction.main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{len(parts)} part files, {stored} rows -> 1 snapshot, 59 rows" in printed
    assert f"deleted {len(parts)}/{len(parts)} superseded part files" in caplog.text
    (snapshot,) = _parts(out)
    assert Path(snapshot).name.startswith(f"part-{night_run_id(19)}-snapshot-")
    after = read_tags(str(out))
    assert after.equals(before)  # run ids, errors, embeddings: every column of every row
    assert pq.read_metadata(snapshot).num_rows == before.num_rows

    again = compact(str(out))
    assert again.snapshot is None and _parts(out) == [snapshot]
    assert "nothing to compact" in again.format()
    assert compaction.main([str(out / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_a_reader_during_compaction_always_sees_the_current_rows(nights):
    out, before = nights
    # A slow reader (an object store's round trip per file): parts vanish under its listings.
    slow = FaultyLocal("open_input_file", delay_s=0.005)
    filesystems = {"file": pafs.PyFileSystem(slow)}
    done = threading.Event()
    seen: list[tuple[float, float, bool]] = []  # (start, end, equal)

    def reader():
        while not done.is_set():
            start = time.monotonic()
            equal = read_tags(str(out), filesystems=filesystems).equals(before)
            seen.append((start, time.monotonic(), equal))

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.3)
    began = time.monotonic()
    result = compact(str(out))
    ended = time.monotonic()
    time.sleep(0.5)
    done.set()
    thread.join()
    assert result.videos == before.num_rows and len(_parts(out)) == 1
    assert all(equal for _, _, equal in seen), "a reader saw a mix or a loss"
    assert any(start < ended and end > began for start, end, _ in seen)
    assert slow.vanished > 0, "no part vanished under the reader: the race was not exercised"
    assert seen[-1][0] > ended  # and it reads the snapshot alone afterwards


def test_a_failed_delete_leaves_the_current_state_and_a_rerun_finishes(nights):
    out, before = nights
    parts = _parts(out)
    with pytest.raises(OSError, match="injected"):
        compact_directory(faulty_fs("delete_file", fail_after=3), str(out), str(out))
    left = _parts(out)
    assert len(left) == len(parts) - 3 + 1  # three deleted, the snapshot beside the rest
    assert read_tags(str(out)).equals(before)
    assert compact(str(out)).videos == before.num_rows
    assert len(_parts(out)) == 1 and read_tags(str(out)).equals(before)


@pytest.mark.parametrize("op", ["move", "delete_file"])
def test_a_kill_mid_compaction_leaves_a_readable_state_and_a_rerun_finishes(nights, tmp_path, op):
    """Killed while renaming the snapshot into place, or after writing it, before deleting."""
    out, before = nights
    parts = _parts(out)
    marker = tmp_path / "stalled"
    script = (
        "from tests.test_compaction import faulty_fs\n"
        "from pipeline.compaction import compact_directory\n"
        f"fs = faulty_fs({op!r}, hang_marker={str(marker)!r})\n"
        f"compact_directory(fs, {str(out)!r}, {str(out)!r})\n"
    )
    job = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert job.poll() is None, job.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the compaction never reached the stall"
        time.sleep(0.02)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    job.stderr.close()

    left = _parts(out)
    snapshots = [p for p in left if "-snapshot-" in p]
    if op == "move":  # the snapshot was still a hidden temporary file
        assert left == parts and any(n.startswith(".part-") for n in os.listdir(out))
    else:
        assert len(snapshots) == 1 and sorted(set(left) - set(snapshots)) == parts
    assert read_tags(str(out)).equals(before)
    result = compact(str(out))
    assert result.videos == before.num_rows
    assert len(_parts(out)) == 1 and read_tags(str(out)).equals(before)
