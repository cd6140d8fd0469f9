"""Manifest reading: every format, directories and globs, URI schemes, id normalisation."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ovml_core.config import ConfigError
from pipeline.manifest import check_scheme, read_manifest, resolve, uri_scheme


def _rows(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table["video_id"].to_pylist(), table["uri"].to_pylist(), strict=True))


def test_parquet_csv_and_jsonl_read_the_same_manifest(tmp_path):
    (tmp_path / "clips").mkdir()
    rows = [("a", "clips/a.mp4", ["dog", "ball"], "train"), ("b", "/abs/b.mp4", ["cat"], "val")]
    pq.write_table(
        pa.table(
            {
                "video_id": [r[0] for r in rows],
                "uri": [r[1] for r in rows],
                "labels": [r[2] for r in rows],
                "split": [r[3] for r in rows],
                "extra": [1, 2],
            }
        ),
        tmp_path / "m.parquet",
    )
    csv_lines = ["video_id,uri,labels,split"] + [
        f"{a},{u},{'|'.join(ls)},{s}" for a, u, ls, s in rows
    ]
    (tmp_path / "m.csv").write_text("\n".join(csv_lines) + "\n")
    (tmp_path / "m.jsonl").write_text(
        "\n".join(
            json.dumps(dict(zip(["video_id", "uri", "labels", "split"], r, strict=True)))
            for r in rows
        )
    )
    expected = [("a", str(tmp_path / "clips/a.mp4")), ("b", "/abs/b.mp4")]
    for name in ("m.parquet", "m.csv", "m.jsonl"):
        table = read_manifest(str(tmp_path / name))
        assert table.column_names == ["video_id", "uri", "labels", "split"], name
        assert _rows(table) == expected, name  # relative uris: relative to the manifest
        assert table["labels"].to_pylist() == [["dog", "ball"], ["cat"]], name
        assert table["split"].to_pylist() == ["train", "val"], name


def test_file_uri_manifest_and_numeric_ids(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"video_id": 7, "uri": "x.mp4"}\n')
    table = read_manifest(f"file://{tmp_path}/m.jsonl")
    assert _rows(table) == [("7", str(tmp_path / "x.mp4"))]


def test_directory_lists_videos_recursively_with_relative_ids(tmp_path):
    for name in ("b.mp4", "sub/a.webm", "sub/deeper/c.AVI", "notes.txt", "sub/meta.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    table = read_manifest(str(tmp_path))
    assert _rows(table) == [
        ("b.mp4", str(tmp_path / "b.mp4")),
        ("sub/a.webm", str(tmp_path / "sub/a.webm")),
        ("sub/deeper/c.AVI", str(tmp_path / "sub/deeper/c.AVI")),
    ]


def test_globs_match_one_level_or_recursively(tmp_path):
    for name in ("a.mp4", "b.mkv", "sub/c.mp4"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert read_manifest(f"{tmp_path}/*.mp4")["video_id"].to_pylist() == ["a.mp4"]
    assert read_manifest(f"{tmp_path}/**/*.mp4")["video_id"].to_pylist() == ["a.mp4", "sub/c.mp4"]


def test_glob_of_manifest_files_concatenates_them(tmp_path):
    pq.write_table(pa.table({"video_id": ["a"], "uri": ["a.mp4"]}), tmp_path / "part-0.parquet")
    pq.write_table(pa.table({"video_id": ["b"], "uri": ["b.mp4"]}), tmp_path / "part-1.parquet")
    table = read_manifest(f"{tmp_path}/*.parquet")
    assert table["video_id"].to_pylist() == ["a", "b"]


def test_missing_and_empty_ids_use_the_uri_and_duplicates_keep_the_first(tmp_path, caplog):
    (tmp_path / "ids.csv").write_text(
        "video_id,uri\na,/v/1.mp4\n,/v/2.mp4\na,/v/3.mp4\n,\nb,\n"
    )  # a repeated; an empty id; a row with neither; b without a uri
    with caplog.at_level(logging.WARNING, logger="pipeline.manifest"):
        table = read_manifest(str(tmp_path / "ids.csv"))
    assert _rows(table) == [("a", "/v/1.mp4"), ("/v/2.mp4", "/v/2.mp4"), ("b", "")]
    text = caplog.text
    assert "1 rows with a repeated video_id dropped" in text and "'a'" in text
    assert "1 rows without a video_id use their uri" in text
    assert "1 rows without video_id or uri dropped" in text

    (tmp_path / "uris.jsonl").write_text('{"uri": "/v/1.mp4"}\n{"uri": "/v/2.mp4"}\n')
    assert read_manifest(str(tmp_path / "uris.jsonl"))["video_id"].to_pylist() == [
        "/v/1.mp4",
        "/v/2.mp4",
    ]


@pytest.mark.parametrize(
    ("setup", "source", "message"),
    [
        (None, "missing.csv", "not found"),
        ("m.txt", "m.txt", "unknown format"),
        ("m.csv", "m.csv", "no 'uri' column"),
        ("empty_dir/", "empty_dir", "no video files"),
    ],
)
def test_bad_manifest_sources_are_config_errors(tmp_path, setup, source, message):
    if setup and setup.endswith("/"):
        (tmp_path / setup).mkdir()
    elif setup:
        (tmp_path / setup).write_text("video_id,path\na,b\n")
    with pytest.raises(ConfigError, match=message) as err:
        read_manifest(str(tmp_path / source))
    assert "--manifest" in str(err.value)


def test_scheme_allow_list():
    assert [uri_scheme(u) for u in ("/a", "rel/a", "file:///a", "s3://b/k", "GS://b/k")] == [
        "file",
        "file",
        "file",
        "s3",
        "gs",
    ]
    check_scheme("s3://b/k", ["s3"])
    with pytest.raises(ValueError, match="scheme 'http' is not allowed"):
        check_scheme("http://host/v.mp4", ["file", "s3"])
    with pytest.raises(ConfigError, match="--manifest s3://bucket/m.csv: scheme 's3'"):
        read_manifest("s3://bucket/m.csv", allowed_schemes=["file"])


def test_resolve_uses_the_filesystem_given_for_a_scheme(tmp_path):
    from pyarrow.fs import LocalFileSystem, SubTreeFileSystem

    fs = SubTreeFileSystem(str(tmp_path), LocalFileSystem())
    assert resolve("s3://bucket/dir/v.mp4", {"s3": fs}) == (fs, "bucket/dir/v.mp4")
    local, path = resolve("file:///tmp/../tmp/v.mp4")
    assert isinstance(local, LocalFileSystem) and path == "/tmp/v.mp4"
