"""`--checkpoint s3://...` / `gs://...`: a remote checkpoint directory as a local cached copy.

Training writes checkpoints to `train.storage_path` (often S3 or GCS); `load_checkpoint` reads
a local directory. `local_checkpoint` downloads the files of the checkpoint directory
(config.json, model.safetensors and what else sits next to them; never a pickle file) through pyarrow.fs, with credentials from
the environment or the `filesystems` given, into

    $OVML_CACHE_DIR (default ~/.cache/ovml) / checkpoints / <key>/

where the key hashes the URI with each file's ETag (S3), size and modification time: a
checkpoint re-uploaded under the same URI gets a new key and is downloaded again; an unchanged
one is reused. The driver and every actor call it (each node fills its own cache once); a copy only
appears under its key when complete, so concurrent callers never load half a checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from ovml_core.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError
from ovml_core.folders import write_folder_once
from pipeline.manifest import Filesystems, resolve, uri_scheme

CACHE_ENV = "OVML_CACHE_DIR"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # never downloaded


def cache_root() -> Path:
    """Where downloaded checkpoints live: $OVML_CACHE_DIR/checkpoints, else ~/.cache/ovml/..."""
    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ovml"
    return Path(base) / "checkpoints"


def local_checkpoint(checkpoint: str, filesystems: Filesystems | None = None) -> str:
    """A local directory holding `checkpoint`: the path itself when it is local, else the
    cached copy of the remote directory (downloaded when missing or changed)."""
    if uri_scheme(checkpoint) == "file":
        return checkpoint
    fs, directory = resolve(checkpoint, filesystems)
    try:
        infos = _remote_files(checkpoint, fs, directory)
        target = cache_root() / _cache_key(checkpoint, fs, infos)
        if not target.is_dir():
            _download(fs, infos, target)
    except (OSError, pa.ArrowException) as err:
        raise CheckpointError(f"checkpoint {checkpoint}: unreadable ({err})") from err
    return str(target)


def _remote_files(checkpoint: str, fs: pafs.FileSystem, directory: str) -> list[pafs.FileInfo]:
    """The checkpoint's files (pickle files and hidden ones left out); CheckpointError unless
    config.json and model.safetensors are among them."""
    listing = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    files = [
        i
        for i in listing
        if i.type == pafs.FileType.File
        and not i.base_name.startswith(".")
        and posixpath.splitext(i.base_name)[1] not in PICKLE_SUFFIXES
    ]
    missing = [name for name in REQUIRED_FILES if name not in {i.base_name for i in files}]
    if missing:
        present = sorted(i.base_name for i in listing) or ["nothing"]
        raise CheckpointError(
            f"checkpoint {checkpoint}: no {' or '.join(missing)} there (found: "
            f"{', '.join(present)}); ovml loads {WEIGHTS_FILE} (safetensors) and {CONFIG_FILE}, "
            "never pickle weights"
        )
    return sorted(files, key=lambda i: i.base_name)


def _cache_key(checkpoint: str, fs: pafs.FileSystem, infos: list[pafs.FileInfo]) -> str:
    identity = [checkpoint.rstrip("/")]
    for info in infos:
        # S3 mtimes have whole seconds; the ETag (from a HEAD request) tells rewrites apart.
        with fs.open_input_file(info.path) as f:
            etag = f.metadata().get("ETag", b"").decode()
        identity.append(f"{info.base_name}:{info.size}:{info.mtime_ns}:{etag}")
    return hashlib.sha256("\n".join(identity).encode()).hexdigest()[:24]


def _download(fs: pafs.FileSystem, infos: list[pafs.FileInfo], target: Path) -> None:
    """Copy the files into a folder written whole at `target`."""

    def write(staging: Path) -> None:
        local = pafs.LocalFileSystem()
        for info in infos:
            pafs.copy_files(
                info.path,
                str(staging / info.base_name),
                source_filesystem=fs,
                destination_filesystem=local,
            )

    write_folder_once(target, write)
