"""`--checkpoint` and `--label-bank` from object storage (s3:// through a local moto S3 server;
gs:// through the same code path with a filesystem given for the scheme).

Credentials and the endpoint come from the environment, as on a cluster: the module sets
AWS_ENDPOINT_URL etc. (and OVML_CACHE_DIR) before Ray starts, so the actors see them too.
"""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from ovml_core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_fingerprint,
    save_checkpoint,
)
from ovml_core.config import Config
from ovml_core.model import create_model
from pipeline.label_bank import bank_table
from pipeline.parquet_io import read_tags
from pipeline.remote_checkpoint import CACHE_ENV, cache_root, local_checkpoint
from pipeline.tagging import ModelSource
from pipeline.tagging import main as tag_main
from tests.conftest import TINY_CONFIG
from tests.videos import index_frame, write_indexed_video, write_video

LABELS = ["dog", "cat", "surfing", "rabbit", "bicycle"]
BUCKET = "models"


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """A moto S3 server reached through the environment, and an empty checkpoint cache."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client
    server.stop()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two distinct 'trained' tiny models (other seeds than the config's), saved locally."""
    cfg = Config.from_yaml(TINY_CONFIG).model
    saved = {}
    for seed in (7, 8):
        model = create_model(dataclasses.replace(cfg, seed=seed, init_bias=0.0))
        folder = save_checkpoint(model, tmp_path_factory.mktemp(f"seed{seed}") / "model")
        saved[seed] = (folder, model_fingerprint(model), model)
    return saved


def upload_folder(client, folder: Path, prefix: str) -> str:
    for path in folder.iterdir():
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
    return f"s3://{BUCKET}/{prefix}"


def cached_entries() -> list[str]:
    return sorted(p.name for p in cache_root().iterdir())


def test_local_paths_are_used_as_they_are(tmp_path):
    assert local_checkpoint(str(tmp_path)) == str(tmp_path)


def test_a_remote_checkpoint_is_downloaded_once_and_again_after_it_changes(storage, trained):
    folder, fingerprint, _ = trained[7]
    uri = upload_folder(storage, folder, "runs/ft/checkpoint_epoch0001_step00000010/model")
    local = local_checkpoint(uri)
    assert Path(local).parent == cache_root()
    for name in ("config.json", "model.safetensors"):
        assert (Path(local) / name).read_bytes() == (folder / name).read_bytes()
    assert model_fingerprint(load_checkpoint(local)) == fingerprint
    assert local_checkpoint(uri + "/") == local  # unchanged: the same copy, no second download
    assert cached_entries() == [Path(local).name]  # and no staging folder left behind

    # A re-upload under the same URI is a new checkpoint: fetched again.
    other, other_fingerprint, _ = trained[8]
    upload_folder(storage, other, "runs/ft/checkpoint_epoch0001_step00000010/model")
    again = local_checkpoint(uri)
    assert again != local and model_fingerprint(load_checkpoint(again)) == other_fingerprint
    source = ModelSource(Config.from_yaml(TINY_CONFIG).model, uri)
    assert model_fingerprint(source.load()) == other_fingerprint


def test_pickle_only_and_missing_remote_checkpoints_are_refused(storage, trained, tmp_path):
    folder, _, _ = trained[7]
    (tmp_path / "model.bin").write_bytes(b"\x80\x04 a pickle")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    uri = upload_folder(storage, tmp_path, "pickled/model")
    with pytest.raises(
        CheckpointError, match=r"no model\.safetensors.*found: config\.json, model\.bin"
    ):
        local_checkpoint(uri)
    with pytest.raises(CheckpointError, match="found: nothing"):
        local_checkpoint(f"s3://{BUCKET}/no/such/model")
    with pytest.raises(CheckpointError, match="no-such-bucket/model: no config.json"):
        local_checkpoint("s3://no-such-bucket/model")


def test_gs_checkpoints_take_the_same_path(trained, tmp_path, monkeypatch):
    """No GCS emulator here: a local folder stands in for the gs:// filesystem."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    folder, fingerprint, _ = trained[7]
    shutil.copytree(folder, tmp_path / "gcs" / "bucket" / "ft" / "model")
    bucket = pafs.SubTreeFileSystem(str(tmp_path / "gcs"), pafs.LocalFileSystem())
    local = local_checkpoint("gs://bucket/ft/model", {"gs": bucket})
    assert Path(local).parent == tmp_path / "cache" / "checkpoints"
    assert model_fingerprint(load_checkpoint(local)) == fingerprint


# ---------------------------------------------------------------- end to end (Ray)


@pytest.fixture(scope="module")
def ray_local(storage):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # after the env is set
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_tagging_with_a_checkpoint_and_label_bank_on_s3_matches_the_local_run(
    ray_local, storage, trained, tmp_path
):
    folder, fingerprint, model = trained[7]
    assert fingerprint != model_fingerprint(create_model(Config.from_yaml(TINY_CONFIG).model))
    uri = upload_folder(storage, folder, "runs/e2e/model")
    embeddings = model.encode_labels(LABELS).detach().numpy()
    bank = bank_table(LABELS, embeddings, [""] * len(LABELS), fingerprint)
    pq.write_table(bank, tmp_path / "bank.parquet")
    storage.upload_file(str(tmp_path / "bank.parquet"), BUCKET, "banks/bank.parquet")
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    clips = {
        "indexed": write_indexed_video(tmp_path / "indexed.mp4", 24),
        "ramp": write_video(tmp_path / "ramp.mp4", [index_frame(i) // 2 + i for i in range(24)]),
    }
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(
        pa.table({"video_id": list(clips), "uri": [str(p) for p in clips.values()]}), manifest
    )
    common = ["--config", str(TINY_CONFIG), "--manifest", str(manifest), "--set", "tag.top_k=5"]
    remote = [*common, "--out", str(tmp_path / "remote"), "--checkpoint", uri]
    cached_before = cached_entries()
    assert tag_main([*remote, "--label-bank", f"s3://{BUCKET}/banks/bank.parquet"]) == 0
    # The driver and the actors of this node fetched it into one cache entry, and only that.
    assert cached_entries() == sorted([*cached_before, Path(local_checkpoint(uri)).name])
    local = [*common, "--out", str(tmp_path / "local"), "--checkpoint", str(folder)]
    assert tag_main([*local, "--labels", str(tmp_path / "labels.txt")]) == 0

    got, expected = (
        {r["video_id"]: r for r in read_tags(str(tmp_path / name)).to_pylist()}
        for name in ("remote", "local")
    )
    assert sorted(got) == sorted(expected) == sorted(clips)
    for video_id, row in got.items():
        assert row["error"] is None and row["model_fingerprint"] == fingerprint
        assert [t["label"] for t in row["top_k"]] == [
            t["label"] for t in expected[video_id]["top_k"]
        ]
        np.testing.assert_allclose(
            [t["score"] for t in row["top_k"]],
            [t["score"] for t in expected[video_id]["top_k"]],
            atol=1e-5,
        )
