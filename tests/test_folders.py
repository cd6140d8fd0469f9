"""Folders written whole (checkpoints, cached conversions, downloaded checkpoints): complete or
absent, and readable by whoever the umask lets read what this account writes."""

import os
import stat

import pytest

from ovml_core.checkpoint import save_checkpoint
from ovml_core.folders import write_folder_once
from ovml_core.model import create_model


@pytest.fixture()
def umask():
    """`os.umask`, with the process umask restored after the test."""
    before = os.umask(0o022)
    os.umask(before)
    yield os.umask
    os.umask(before)


def modes(folder):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *sorted(folder.rglob("*"))]}


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_a_saved_checkpoint_has_the_modes_the_umask_gives(tiny_config, tmp_path, umask, mask):
    umask(mask)
    folder = save_checkpoint(create_model(tiny_config.model), tmp_path / "ckpt")
    got = modes(folder)
    assert got.pop("ckpt") == 0o777 & ~mask
    assert sorted(got) == ["config.json", "labels.json", "model.safetensors"]
    assert set(got.values()) == {0o666 & ~mask}  # safetensors alone would write 0600


def test_a_folder_written_once_is_readable_as_the_umask_allows(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "cache" / "entry"

    def write(folder):
        (folder / "sub").mkdir()
        (folder / "sub" / "a.txt").write_text("x")

    assert write_folder_once(target, write) == target
    assert modes(target) == {"entry": 0o755, "sub": 0o755, "a.txt": 0o644}


def test_writes_are_atomic_and_survive_races(tmp_path):
    target = tmp_path / "entry"

    def other_process(folder):
        (folder / "weights").write_text("theirs")

    def this_process(folder):
        (folder / "weights").write_text("ours")
        write_folder_once(target, other_process)  # finishes first

    assert write_folder_once(target, this_process) == target
    assert (target / "weights").read_text() == "theirs"

    def failing(folder):
        (folder / "partial").write_text("half")
        raise RuntimeError("conversion died")

    with pytest.raises(RuntimeError, match="conversion died"):
        write_folder_once(tmp_path / "broken", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # no partial folders left
