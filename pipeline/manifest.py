"""Manifests: which videos to process, read from Parquet/CSV/JSONL or listed from a directory/glob.

A manifest is a table with `video_id` (unique) and `uri`, optionally `labels` and `split`
(DESIGN.md §3). Sources and video URIs may be local paths, `file://`, `s3://` or `gs://`; all
storage goes through pyarrow.fs. Which schemes a job may touch is `tag.allowed_schemes`.
Credentials and endpoints come from the usual environment (AWS_* variables, e.g.
AWS_ENDPOINT_URL for MinIO; Google application credentials); library callers may instead pass
`filesystems`, a filesystem per scheme.

Normalisation, so that every later stage sees one row per video:
- no `video_id` column, or an empty id: the uri is the id;
- relative uris are relative to the manifest file's folder;
- duplicate ids: the first row is kept and the rest are dropped with a warning;
- `labels` in CSV is one string, labels separated by `|`.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
import posixpath
from collections import defaultdict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.fs as pafs
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from ovml_core.config import ConfigError

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset(
    {
        ".mp4",
        ".m4v",
        ".mov",
        ".mkv",
        ".webm",
        ".avi",
        ".mpg",
        ".mpeg",
        ".ts",
        ".flv",
        ".wmv",
        ".ogv",
    }
)
MANIFEST_READERS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "json",
    ".ndjson": "json",
    ".json": "json",
}
CSV_LABEL_SEPARATOR = "|"
_GLOB_CHARS = "*?["
STAT_THREADS = 32  # concurrent metadata calls to object stores (each one a round trip)
STAT_CHUNK = 256  # paths per get_file_info call

# scheme -> filesystem to use instead of pyarrow's default for that scheme (e.g. an
# S3FileSystem with an endpoint override; "file" for local paths too). Filesystems pickle, so Ray tasks can receive them.
Filesystems = Mapping[str, pafs.FileSystem]


def uri_scheme(uri: str) -> str:
    """`s3`, `gs`, ... for URIs; `file` for plain paths."""
    scheme = urlsplit(uri).scheme if "://" in uri else ""
    return scheme.lower() or "file"


def check_scheme(uri: str, allowed: Iterable[str]) -> None:
    """Raise ValueError when `uri`'s scheme is not in the allow-list (`tag.allowed_schemes`)."""
    allowed = list(allowed)
    scheme = uri_scheme(uri)
    if scheme not in allowed:
        raise ValueError(
            f"scheme {scheme!r} is not allowed (tag.allowed_schemes: {', '.join(allowed)})"
        )


def resolve(uri: str, filesystems: Filesystems | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, file://, s3:// or gs:// URI."""
    scheme = uri_scheme(uri)
    if scheme == "file":
        path = urlsplit(uri).path if "://" in uri else uri
        local = (filesystems or {}).get("file") or pafs.LocalFileSystem()
        return local, os.path.abspath(path)
    parts = urlsplit(uri)
    if filesystems and scheme in filesystems:
        return filesystems[scheme], parts.netloc + parts.path
    return _default_filesystem(scheme, parts.netloc), parts.netloc + parts.path


@functools.lru_cache(maxsize=64)
def _default_filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    """pyarrow's filesystem for a bucket, made once per process (it looks up region and
    credentials, which may cost network round trips)."""
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def read_manifest(
    source: str,
    *,
    allowed_schemes: Iterable[str] = ("file", "s3", "gs"),
    filesystems: Filesystems | None = None,
) -> pa.Table:
    """A normalised manifest table (`video_id`, `uri`, and `labels`/`split` when present).

    `source` is a manifest file, a directory of videos (listed recursively), or a glob. A glob
    that matches only manifest files reads and concatenates them (e.g. `out/*.parquet`).
    Problems with the source itself raise ConfigError naming `--manifest`.
    """
    try:
        check_scheme(source, allowed_schemes)
        fs, path = resolve(source, filesystems)
        tables = _read_source(source, fs, path)
    except (OSError, ValueError, pa.ArrowException) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"--manifest {source}: {err}") from err
    return _normalise(pa.concat_tables(tables, promote_options="permissive"), source)


def _read_source(source: str, fs: pafs.FileSystem, path: str) -> list[pa.Table]:
    prefix = _uri_prefix(source)
    if any(c in path for c in _GLOB_CHARS):
        root, files = _glob(fs, path)
        if files and all(_manifest_format(f) for f in files):
            return [_read_manifest_file(fs, f, prefix) for f in files]
        return [_listing_table(files, root, prefix)]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"--manifest {source}: not found")
    if info.type == pafs.FileType.Directory:
        files = _list_files(fs, path)
        videos = [f for f in files if posixpath.splitext(f)[1].lower() in VIDEO_EXTENSIONS]
        return [_listing_table(videos, path, prefix)]
    if not _manifest_format(path):
        raise ConfigError(
            f"--manifest {source}: unknown format; expected {', '.join(sorted(MANIFEST_READERS))}"
            " or a directory / glob of videos"
        )
    return [_read_manifest_file(fs, path, prefix)]


def _uri_prefix(source: str) -> str:
    """What turns a filesystem path back into a URI: `s3://` for S3 sources, nothing locally."""
    scheme = uri_scheme(source)
    return "" if scheme == "file" else f"{scheme}://"


def _manifest_format(path: str) -> str | None:
    return MANIFEST_READERS.get(posixpath.splitext(path)[1].lower())


def _list_files(fs: pafs.FileSystem, directory: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


def _glob(fs: pafs.FileSystem, pattern: str) -> tuple[str, list[str]]:
    """Files matching `pattern` (`*`, `?`, `[...]`; `**` spans folders) and the listed root."""
    parts = pattern.split("/")
    fixed = next(i for i, p in enumerate(parts) if any(c in p for c in _GLOB_CHARS))
    root = "/".join(parts[:fixed]) or "/"
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return root, []
    depth = len(parts) - fixed
    recursive = "**" in parts[fixed:]
    matches = []
    for f in _list_files(fs, root):
        rel = posixpath.relpath(f, root)
        if (recursive or rel.count("/") + 1 == depth) and fnmatch.fnmatch(
            rel, "/".join(parts[fixed:]).replace("**/", "*")
        ):
            matches.append(f)
    return root, matches


def _listing_table(files: list[str], root: str, prefix: str) -> pa.Table:
    """A manifest for listed video files: the id is the path relative to the listed folder."""
    if not files:
        raise ConfigError(
            f"--manifest {prefix}{root}: no video files found "
            f"(extensions: {' '.join(sorted(VIDEO_EXTENSIONS))})"
        )
    ids = [posixpath.relpath(f, root) for f in files]
    return pa.table({"video_id": ids, "uri": [prefix + f for f in files]})


def _read_manifest_file(fs: pafs.FileSystem, path: str, prefix: str) -> pa.Table:
    kind = _manifest_format(path)
    with fs.open_input_file(path) as f:
        if kind == "parquet":
            table = pq.read_table(f)
        elif kind == "csv":
            types = {c: pa.string() for c in ("video_id", "uri", "labels", "split")}
            table = pa_csv.read_csv(f, convert_options=pa_csv.ConvertOptions(column_types=types))
        else:
            table = pa_json.read_json(f)
    if "uri" not in table.column_names:
        raise ConfigError(f"--manifest {prefix}{path}: no 'uri' column (has {table.column_names})")
    table = _cast_known_columns(table)
    base = prefix + posixpath.dirname(path)
    uris = [_join_relative(base, u) for u in table["uri"].to_pylist()]
    return table.set_column(table.column_names.index("uri"), "uri", pa.array(uris, pa.string()))


def _cast_known_columns(table: pa.Table) -> pa.Table:
    """video_id/uri/split as strings, labels as list<string>; other columns are dropped."""
    columns = {}
    for name in ("video_id", "uri", "split"):
        if name in table.column_names:
            columns[name] = table[name].cast(pa.string())
    if "labels" in table.column_names:
        labels = table["labels"]
        if pa.types.is_string(labels.type) or pa.types.is_large_string(labels.type):
            labels = pc.split_pattern(labels, CSV_LABEL_SEPARATOR)
        columns["labels"] = labels.cast(pa.list_(pa.string()))
    return pa.table(columns)


def _join_relative(base: str, uri: str | None) -> str:
    if not uri or "://" in uri or os.path.isabs(uri):
        return uri or ""
    return posixpath.join(base, uri)


def _normalise(table: pa.Table, source: str) -> pa.Table:
    """One row per video_id: empty ids take the uri, rows without either or repeated are dropped."""
    uris = [u or "" for u in table["uri"].to_pylist()]
    given = (
        table["video_id"].to_pylist() if "video_id" in table.column_names else [None] * len(uris)
    )
    ids, keep, seen = [], [], set()
    filled = unidentified = 0
    duplicates: list[str] = []
    for i, (video_id, uri) in enumerate(zip(given, uris, strict=True)):
        if not video_id:
            video_id, filled = uri, filled + (1 if uri else 0)
        if not video_id:
            unidentified += 1
        elif video_id in seen:
            duplicates.append(video_id)
        else:
            seen.add(video_id)
            ids.append(video_id)
            keep.append(i)
    if filled:
        logger.warning("manifest %s: %d rows without a video_id use their uri", source, filled)
    if unidentified:
        logger.warning("manifest %s: %d rows without video_id or uri dropped", source, unidentified)
    if duplicates:
        logger.warning(
            "manifest %s: %d rows with a repeated video_id dropped (first row kept), e.g. %r",
            source,
            len(duplicates),
            duplicates[0],
        )
    table = table.take(pa.array(keep, pa.int64()))
    columns = {"video_id": pa.array(ids, pa.string()), "uri": table["uri"].fill_null("")}
    columns |= {c: table[c] for c in ("labels", "split") if c in table.column_names}
    return pa.table(columns)


def source_stats(
    uris: list[str],
    *,
    allowed_schemes: Iterable[str] = ("file", "s3", "gs"),
    filesystems: Filesystems | None = None,
) -> pa.Table:
    """`source_size` (int64) and `source_mtime` (ISO 8601 UTC string) of each uri: one
    metadata call per file, never a read of the video. Null where the file is missing, the
    scheme is not allowed or the store cannot be asked; decoding then reports why."""
    allowed = list(allowed_schemes)
    sizes: list[int | None] = [None] * len(uris)
    mtimes: list[str | None] = [None] * len(uris)
    # (index, path) per filesystem: local paths all share one LocalFileSystem.
    paths: dict[int, list[tuple[int, str]]] = defaultdict(list)
    systems: dict[int, pafs.FileSystem] = {}
    for i, uri in enumerate(uris):
        if not uri or uri_scheme(uri) not in allowed:
            continue
        try:
            fs, path = resolve(uri, filesystems)
        except (OSError, ValueError, pa.ArrowException):
            continue
        key = 0 if isinstance(fs, pafs.LocalFileSystem) else id(fs)
        systems.setdefault(key, fs)
        paths[key].append((i, path))
    chunks = [
        (systems[key], items[start : start + STAT_CHUNK])
        for key, items in paths.items()
        for start in range(0, len(items), STAT_CHUNK)
    ]
    with ThreadPoolExecutor(max_workers=STAT_THREADS) as pool:
        for chunk, infos in zip(chunks, pool.map(_file_infos, chunks), strict=True):
            for (i, _), info in zip(chunk[1], infos, strict=True):
                if info is not None and info.type == pafs.FileType.File:
                    sizes[i] = info.size
                    mtimes[i] = info.mtime.astimezone(UTC).isoformat() if info.mtime else None
    return pa.table(
        {"source_size": pa.array(sizes, pa.int64()), "source_mtime": pa.array(mtimes, pa.string())}
    )


def _file_infos(chunk: tuple[pafs.FileSystem, list[tuple[int, str]]]) -> list:
    fs, items = chunk
    try:
        return fs.get_file_info([path for _, path in items])
    except (OSError, ValueError, pa.ArrowException) as err:
        logger.warning("could not stat %d video files (e.g. %s): %s", len(items), items[0][1], err)
        return [None] * len(items)
