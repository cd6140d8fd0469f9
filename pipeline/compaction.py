"""`ovml compact OUT`: fold an output directory's part files into one snapshot part file.

Every nightly run adds part files and `read_tags` reads them all; a compaction writes the
current rows (one per video, each keeping its run_id) as one snapshot `part-<run>-snapshot-
<id>.parquet` and then deletes the part files it read. Atomic for readers, in this order:

1. the snapshot is written under a hidden name and renamed (`atomic_output`): a reader that
   lists now sees each current row twice, with the same run_id, and keeps one copy;
2. the superseded parts are deleted: a reader whose listing still names one relists and finds
   the snapshot (`parquet_io.read_tags`).

So a reader sees the old state or the new one, never a mix or a loss. A kill at any point leaves
one of those states (plus, at worst, a hidden temporary file readers skip); running the
compaction again finishes the job. Part files a run writes during a compaction are not in its
listing and stay. History (superseded rows) is dropped: ask `tags_as_of`-style questions of
docs/sql.md before compacting. The current rows are held in memory while the snapshot is written.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import posixpath
import sys
import time
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.cli import EXIT_OK, run_job
from pipeline.manifest import Filesystems, resolve
from pipeline.parquet_io import (
    PART_PREFIX,
    PART_SUFFIX,
    latest_per_video,
    part_files,
    read_parts,
    write_parquet_atomic,
)

logger = logging.getLogger(__name__)

PROGRESS_EVERY = 0.1  # log deletions every tenth of the parts


@dataclass
class CompactionResult:
    out: str
    parts_before: int
    rows_before: int  # every stored row, superseded ones included
    videos: int  # current rows, now in the snapshot
    snapshot: str | None  # None when there was nothing to compact
    seconds: float

    def format(self) -> str:
        if self.snapshot is None:
            return f"compact: {self.out}: {self.parts_before} part file(s), nothing to compact"
        return (
            f"compact: {self.out}: {self.parts_before} part files, {self.rows_before} rows -> "
            f"1 snapshot, {self.videos} rows (one per video), in {self.seconds:.1f} s\n"
            f"  snapshot  {self.snapshot}"
        )


class CompactionError(Exception):
    """OUT is not an output directory of part files."""


def compact(out: str, filesystems: Filesystems | None = None) -> CompactionResult:
    fs, directory = resolve(out, filesystems)
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        raise CompactionError(f"OUT {out}: not a directory")
    return compact_directory(fs, directory, out)


def compact_directory(fs: pafs.FileSystem, directory: str, out: str) -> CompactionResult:
    """Compact `directory` of `fs` (`out` names it in messages)."""
    started = time.perf_counter()
    parts = part_files(fs, directory)
    if len(parts) < 2:
        return CompactionResult(out, len(parts), 0, 0, None, 0.0)
    logger.info("%s: reading %d part files", out, len(parts))
    stored = read_parts(fs, parts)
    current = latest_per_video(stored)
    latest_run = max(current["run_id"].to_pylist())
    name = f"{PART_PREFIX}{latest_run}-snapshot-{uuid.uuid4().hex[:6]}{PART_SUFFIX}"
    snapshot = posixpath.join(directory, name)
    logger.info(
        "%s: %d stored rows, %d current; writing snapshot %s",
        out,
        stored.num_rows,
        current.num_rows,
        name,
    )
    write_parquet_atomic(current, fs, snapshot)
    _check_snapshot(fs, snapshot, current.num_rows)
    _delete(fs, parts, out)
    seconds = time.perf_counter() - started
    return CompactionResult(out, len(parts), stored.num_rows, current.num_rows, snapshot, seconds)


def _check_snapshot(fs: pafs.FileSystem, snapshot: str, rows: int) -> None:
    """Read the snapshot's footer back before anything is deleted."""
    with fs.open_input_file(snapshot) as f:
        written = pq.ParquetFile(f).metadata.num_rows
    if written != rows:
        raise OSError(f"{snapshot}: {written} rows read back, {rows} written; nothing deleted")


def _delete(fs: pafs.FileSystem, parts: list[str], out: str) -> None:
    step = max(1, int(len(parts) * PROGRESS_EVERY))
    for i, path in enumerate(parts, 1):
        with contextlib.suppress(FileNotFoundError):  # another compaction got there first
            fs.delete_file(path)
        if i % step == 0 or i == len(parts):
            logger.info("%s: deleted %d/%d superseded part files", out, i, len(parts))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ovml compact",
        description="Fold the part files of a tags output into one snapshot part file (the "
        "current row of every video); readers see the old or the new state throughout.",
    )
    parser.add_argument("out", metavar="OUT", help="tags output directory, local, s3:// or gs://")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        print(compact(args.out).format())
        return EXIT_OK

    return run_job(body, usage_errors=(CompactionError,))


if __name__ == "__main__":
    sys.exit(main())
