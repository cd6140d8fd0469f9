"""Parquet contracts of DESIGN.md §3 as pyarrow schemas, atomic part files, and their readers.

An output directory holds part files `part-<run_id>-<n>.parquet`, each written under a hidden
temporary name and renamed when complete, so a reader (or a rerun after a kill) only ever sees
whole files. Each run writes one row per video it processed. The *current* tags of a directory
are, per video_id, the row of the latest run (`read_tags`): run ids sort by start time, so a
rerun that retries a video supersedes the older row and nothing is rewritten in place.
`pipeline.compaction` folds the current rows into one snapshot part file (rows keep their run
ids) and deletes the parts it replaces; `read_tags` relists when a part vanishes under it.
"""

from __future__ import annotations

import contextlib
import posixpath
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import WriteResult

from pipeline.manifest import Filesystems, resolve

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
TEMP_PREFIX = "."  # hidden while being written; readers skip it

TAG_STRUCT = pa.struct([("label", pa.string()), ("score", pa.float32())])
# "element" is the Parquet-compliant name pyarrow writes and reads lists back with; naming it
# here keeps a table built in memory equal to the same table read from a file.
TAG_LIST = pa.list_(pa.field("element", TAG_STRUCT))

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("labels", pa.list_(pa.string())),
        pa.field("split", pa.string()),
    ]
)

# Stored video embeddings: float16 halves the bytes of float32 and moves a score by far less
# than bfloat16 would (BENCHMARKS.md, "Nightly vocabulary"); scores are computed from the stored
# value, so a row re-scored later gets exactly the scores a fresh tag would.
EMBEDDING_TYPE = pa.float16()  # = ovml_core.model.EMBEDDING_DTYPE, which scoring rounds to

# The columns that decide what a video needs (tag, re-score, skip); read without tags/embeddings.
INDEX_COLUMNS = [
    "video_id",
    "uri",
    "error",
    "error_kind",
    "model_fingerprint",
    "vocabulary_fingerprint",
    "source_size",
    "source_mtime",
    "segment_s",
    "run_id",
]
READ_ATTEMPTS = 5  # listings tried when part files vanish under a reader (a compaction)


def segments_type(embedding_dim: int | None = None) -> pa.DataType:
    """list<struct<start_s, end_s, tags, top_k[, embedding]>>: a video's windows (seconds from
    the stream's start) with their own tags and, when embeddings are emitted, embedding."""
    fields = [
        pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()),
        pa.field("tags", TAG_LIST),
        pa.field("top_k", TAG_LIST),
    ]
    if embedding_dim:
        fields.append(pa.field("embedding", pa.list_(EMBEDDING_TYPE, embedding_dim)))
    return pa.list_(pa.field("element", pa.struct(fields)))


def tags_schema(embedding_dim: int | None = None) -> pa.Schema:
    """Tags output; `embedding` (fixed_size_list<float16>[D], null for error rows) only when
    embeddings are emitted (in `segments` too)."""
    fields = [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("tags", TAG_LIST),  # score >= threshold, highest first
        pa.field("top_k", TAG_LIST),  # the k highest, whatever their score
    ]
    if embedding_dim:
        fields.append(pa.field("embedding", pa.list_(EMBEDDING_TYPE, embedding_dim)))
    fields += [
        # per window with tag.segment_s > 0 (tags = max over them), else null; null for errors
        pa.field("segments", segments_type(embedding_dim)),
        pa.field("segment_s", pa.float64()),  # tag.segment_s it was encoded with; 0 = off
        pa.field("num_frames", pa.int32()),  # frames in the video stream
        pa.field("duration_s", pa.float64()),
        pa.field("sampling", pa.string()),  # exact | keyframe: which video.mode auto chose
        pa.field("error", pa.string()),  # null when the video was tagged
        # "permanent" (retried only when the file changes) | "transient" (retried next run)
        pa.field("error_kind", pa.string()),
        pa.field("model_fingerprint", pa.string(), nullable=False),
        # labels (in scoring order), their model, threshold and top_k: what the tags mean
        pa.field("vocabulary_fingerprint", pa.string()),
        # the video file when it was decoded (pyarrow.fs FileInfo); a change means re-encode
        pa.field("source_size", pa.int64()),
        pa.field("source_mtime", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
    ]
    return pa.schema(fields)


# Types of every column a tags file may hold: what a reader fills in for files that predate one.
TAGS_TYPES = {f.name: f.type for f in tags_schema(1)}


def label_bank_schema(embedding_dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("label", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), embedding_dim), nullable=False),
            pa.field("attributes", pa.string()),  # generated attribute tokens, decoded
            pa.field("model_fingerprint", pa.string(), nullable=False),
        ]
    )


def new_run_id() -> str:
    """Sorts by start time (UTC, microseconds); the suffix keeps simultaneous runs apart."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:6]}"


@contextlib.contextmanager
def atomic_output(fs: pafs.FileSystem, path: str) -> Iterator[pa.NativeFile]:
    """A stream to a hidden temporary name next to `path`, renamed to `path` once the block
    ends without error: a reader sees the old file or the new one, never half of one."""
    directory, name = posixpath.split(path)
    temp = posixpath.join(directory, f"{TEMP_PREFIX}{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with fs.open_output_stream(temp) as out:
            yield out
        fs.move(temp, path)
    except BaseException:
        if fs.get_file_info(temp).type == pafs.FileType.File:
            fs.delete_file(temp)
        raise


def write_text_atomic(uri: str, text: str) -> None:
    """`text` as UTF-8 to a local path or URI, through `atomic_output`."""
    fs, path = resolve(uri)
    with atomic_output(fs, path) as out:
        out.write(text.encode())


def write_parquet_atomic(table: pa.Table, fs: pafs.FileSystem, path: str) -> None:
    with atomic_output(fs, path) as out:
        pq.write_table(table, out)


def part_files(fs: pafs.FileSystem, directory: str) -> list[str]:
    """Complete part files of an output directory (temporary files are hidden and skipped)."""
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(directory))
    names = (posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File)
    return sorted(
        posixpath.join(directory, n)
        for n in names
        if n.startswith(PART_PREFIX) and n.endswith(PART_SUFFIX)
    )


def read_parts(
    fs: pafs.FileSystem, paths: Iterable[str], columns: list[str] | None = None
) -> pa.Table | None:
    """The rows of `paths`. Columns a file predates (e.g. `vocabulary_fingerprint` in files
    of older versions) come back null, so old and new files read as one table."""
    return _combine([_read_part(fs, path, columns) for path in paths], columns)


def _read_part(fs: pafs.FileSystem, path: str, columns: list[str] | None) -> pa.Table:
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        present = None if columns is None else [c for c in columns if c in names]
        return _stored_embedding_type(parquet.read(columns=present))


def _combine(tables: list[pa.Table], columns: list[str] | None) -> pa.Table | None:
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="permissive")
    for name in columns or []:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, TAGS_TYPES[name]))
    return table if columns is None else table.select(columns)


def _stored_embedding_type(table: pa.Table) -> pa.Table:
    """Embeddings as EMBEDDING_TYPE (files of older versions stored float32)."""
    if "embedding" not in table.column_names:
        return table
    column = table["embedding"]
    wanted = pa.list_(EMBEDDING_TYPE, column.type.list_size)
    if column.type == wanted:
        return table
    index = table.column_names.index("embedding")
    return table.set_column(index, "embedding", column.cast(wanted))


def read_tags(
    out: str, *, columns: list[str] | None = None, filesystems: Filesystems | None = None
) -> pa.Table | None:
    """The current tags of an output directory: exactly one row per video_id, from its latest
    run. None when the directory holds no part files yet."""
    fs, directory = resolve(out, filesystems)
    needed = None if columns is None else list(dict.fromkeys([*columns, "video_id", "run_id"]))
    table = _combine(_read_current_parts(fs, directory, needed), needed)
    if table is None:
        return None
    table = latest_per_video(table)
    return table if columns is None else table.select(columns)


def _read_current_parts(
    fs: pafs.FileSystem, directory: str, columns: list[str] | None
) -> list[pa.Table]:
    """The tables of every part file, safe against a concurrent compaction.

    A compaction writes its snapshot before it deletes the parts the snapshot holds, so a part
    that vanishes after listing is covered by a file the next listing shows. Files already
    read are kept (their rows are the snapshot's or older ones, which `latest_per_video`
    drops); each listing only reads files not read yet, so a reader never chases a deleter."""
    read: dict[str, pa.Table] = {}
    for _ in range(READ_ATTEMPTS):
        vanished = False
        for path in part_files(fs, directory):
            if path in read:
                continue
            try:
                read[path] = _read_part(fs, path, columns)
            except OSError:
                if fs.get_file_info(path).type != pafs.FileType.NotFound:
                    raise
                vanished = True
        if not vanished:
            return list(read.values())
    raise OSError(
        f"{directory}: part files kept vanishing while being read "
        f"({READ_ATTEMPTS} listings); are several compactions running at once?"
    )


def latest_per_video(table: pa.Table) -> pa.Table:
    """Keep, for each video_id, the row with the greatest run_id. Rows of one video with the
    same run_id are copies (a snapshot beside the parts it replaces), so any one will do."""
    order = table.sort_by([("video_id", "ascending"), ("run_id", "descending")])
    ids = order["video_id"].combine_chunks()
    if len(ids) == 0:
        return order
    changed = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    return order.filter(pa.concat_arrays([pa.array([True]), changed]))


def read_label_bank(
    path: str, filesystems: Filesystems | None = None
) -> tuple[list[str], np.ndarray, list[str]]:
    """(labels, float32 embeddings [L, D], distinct model fingerprints) of a label bank file."""
    fs, local = resolve(path, filesystems)
    with fs.open_input_file(local) as f:
        table = pq.read_table(f, columns=["label", "embedding", "model_fingerprint"])
    embeddings = table["embedding"].combine_chunks()
    if not pa.types.is_fixed_size_list(embeddings.type):
        raise ValueError(f"{path}: embedding must be fixed_size_list<float32>[D]")
    dim = embeddings.type.list_size
    matrix = embeddings.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    fingerprints = sorted(set(table["model_fingerprint"].to_pylist()))
    return table["label"].to_pylist(), matrix.reshape(-1, dim), fingerprints


class PartFileDatasink(Datasink[list[str]]):
    """Ray Data sink: every write task commits its rows as one atomic part file of this run."""

    def __init__(
        self,
        out: str,
        run_id: str,
        schema: pa.Schema,
        *,
        rows_per_file: int | None = None,
        filesystems: Filesystems | None = None,
    ):
        self.out = out
        self.run_id = run_id
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.filesystems = filesystems
        self.written: list[str] = []  # part files committed, set on the driver at the end

    @property
    def min_rows_per_write(self) -> int | None:
        return self.rows_per_file

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        fs, directory = resolve(self.out, self.filesystems)
        fs.create_dir(directory, recursive=True)

    def write(self, blocks: Iterable[Block], ctx) -> list[str]:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        return [self.write_table(pa.concat_tables(tables), ctx.task_idx)]

    def write_table(self, table: pa.Table, index: int) -> str:
        """Commit `table` as the run's part file number `index` (also without Ray Data: the
        tagging job's driver writes its own when it encodes); its path."""
        table = table.select(self.schema.names).cast(self.schema)
        fs, directory = resolve(self.out, self.filesystems)
        # index orders files within a run; the random part keeps a retried task's file apart.
        name = f"{PART_PREFIX}{self.run_id}-{index:05d}-{uuid.uuid4().hex[:6]}{PART_SUFFIX}"
        path = posixpath.join(directory, name)
        write_parquet_atomic(table, fs, path)
        return path

    def on_write_complete(self, write_result: WriteResult[list[str]]) -> None:
        self.written = sorted(p for paths in write_result.write_returns for p in paths)
