"""`read_tags` after 30 simulated nights, without and with `ovml compact`.

Two kinds of night over the same start (`--videos` tagged on night 0, `tag.rows_per_file` rows
per part file, float16 embeddings of `--dim`): "new videos" adds `--new` videos a night; "new
vocabulary" re-scores every video every night (each night rewrites every row). Timed: the full
`read_tags` (what search and the re-scoring stage read), the index columns only (what every
nightly run reads first), and the compaction itself. Run from the repository root:

    .venv/bin/python -m bench.bench_compaction --videos 20000 --nights 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

from ovml_core.config import TagConfig
from pipeline.compaction import compact
from pipeline.parquet_io import INDEX_COLUMNS, part_files, read_tags
from tests.test_compaction import write_nights


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed_read(out: str, columns: list[str] | None, repeats: int) -> float:
    """Median seconds of `read_tags`."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        read_tags(out, columns=columns)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(name: str, out: Path, repeats: int) -> None:
    parts = len(part_files(pafs.LocalFileSystem(), str(out)))
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    full = timed_read(str(out), None, repeats)
    index = timed_read(str(out), INDEX_COLUMNS, repeats)
    print(
        f"{name:<34} {parts:>5} parts {size:>8.0f} MiB   read_tags {full:7.2f} s   "
        f"index columns {index:6.2f} s   load {load()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=20_000)
    parser.add_argument("--nights", type=int, default=30)
    parser.add_argument("--new", type=int, default=1_000, help="videos added a night")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows_per_file = TagConfig().rows_per_file
    print(
        f"load {load()}; {args.videos} videos, {args.nights} nights, D={args.dim}, "
        f"{rows_per_file} rows per part file, median of {args.repeats} reads"
    )
    kinds = {
        "new videos": {"changed": 0, "new": args.new},
        "new vocabulary (all re-scored)": {"changed": args.videos, "new": 0},
    }
    for kind, night in kinds.items():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "tags"
            write_nights(
                out, args.nights, args.videos, rows_per_file=rows_per_file, dim=args.dim, **night
            )
            measure(f"{kind}: {args.nights} nights", out, args.repeats)
            result = compact(str(out))
            print(
                f"{'':<34} compaction {result.seconds:.2f} s ({result.rows_before} rows -> "
                f"{result.videos}); load {load()}"
            )
            measure(f"{kind}: compacted", out, args.repeats)


if __name__ == "__main__":
    main()
