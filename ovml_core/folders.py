"""Folders written whole: filled in a hidden sibling, then renamed into place, so that a reader
sees a complete folder or none. Checkpoints and cached model conversions are written this way.

`tempfile.mkdtemp` makes the sibling private (0700) and safetensors writes its files 0600;
renamed as they are, a checkpoint trained by one account could not be read by the account that
tags with it. So before the rename the folder gets the modes a plain mkdir/open would give.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def staging_folder(target: Path) -> Path:
    """An empty hidden folder beside `target`, on the same filesystem so that it renames."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def open_as_umask_allows(folder: Path) -> None:
    """Give `folder` and everything in it the modes mkdir and open would have given them."""
    mask = _umask()
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    folder.chmod(0o777 & ~mask)


def write_folder_once(target: Path, write: Callable[[Path], None]) -> Path:
    """Fill a staging folder with `write`, then rename it to `target`; if another process got
    there first, keep theirs (both wrote the same thing)."""
    staging = staging_folder(target)
    try:
        write(staging)
        open_as_umask_allows(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _umask() -> int:
    """The process umask: from /proc (Linux), else by setting it and straight back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
