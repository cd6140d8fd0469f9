"""No progress for `<section>.no_progress_timeout_s` stops a job with an error naming the field,
instead of waiting forever; a healthy run with the timeout set is unaffected.

The stalls are real: a local Ray whose one GPU (declared, as a cluster would) or whose CPUs are
held by another actor for the whole run, so a stage that asks for them is never scheduled.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ovml_core.config import Config, ConfigError
from pipeline.cli import EXIT_NO_PROGRESS
from pipeline.label_bank import build_label_bank
from pipeline.parquet_io import read_tags
from pipeline.progress import NoProgressError
from pipeline.tagging import main as tag_main
from tests.conftest import TINY_CONFIG
from tests.test_training import _config as train_config
from tests.test_training import write_square_clips
from tests.videos import write_indexed_video

TIMEOUT_S = 8
MARGIN_S = 60  # plan start-up and shutdown on 2 shared cores


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # With the dashboard, as on a cluster: Ray Train's placement group cleaner, which frees a
    # killed controller's placement group, looks the controller up through its state API.
    ray.init(num_cpus=3, num_gpus=1, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


def _hold(ray, **resources):
    """An actor that holds `resources` until killed: other work on the cluster."""

    @ray.remote(**resources)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    return holder


def _live_actors(name: str) -> list[dict]:
    """Actors of this Ray instance whose class name contains `name` and that are not dead (from
    the GCS actor table: the public state API would need the dashboard)."""
    from ray._private import state

    actors = state.actors().values()
    return [a for a in actors if name in a["ActorClassName"] and a["State"] != "DEAD"]


def _wait_gone(name: str, seconds: float = 30) -> list[dict]:
    deadline = time.monotonic() + seconds
    while _live_actors(name) and time.monotonic() < deadline:
        time.sleep(0.5)
    return _live_actors(name)


def test_the_timeout_is_validated_and_zero_means_off():
    for section in ("tag", "label_bank", "train"):
        with pytest.raises(ConfigError, match=f"{section}.no_progress_timeout_s"):
            Config.from_yaml(TINY_CONFIG, [f"{section}.no_progress_timeout_s=-1"])
        off = Config.from_yaml(TINY_CONFIG, [f"{section}.no_progress_timeout_s=0"])
        assert getattr(off, section).no_progress_timeout_s == 0


def _tagging_job(tmp_path: Path) -> tuple[dict[str, Path], Path, list[str]]:
    """Three short videos, their manifest and labels: the videos, the tags folder and the
    tagging job's arguments."""
    videos = {f"v{i}": write_indexed_video(tmp_path / f"v{i}.mp4", 8) for i in range(3)}
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(
        pa.table({"video_id": list(videos), "uri": [str(p) for p in videos.values()]}), manifest
    )
    labels = tmp_path / "labels.txt"
    labels.write_text("dog\ncat\n")
    out = tmp_path / "tags"
    args = ["--config", str(TINY_CONFIG), "--manifest", str(manifest), "--out", str(out)]
    return videos, out, [*args, "--labels", str(labels)]


@pytest.mark.slow
def test_tagging_that_never_gets_its_gpu_fails_naming_the_field_and_a_rerun_completes(
    ray_local, tmp_path, capsys
):
    videos, out, args = _tagging_job(tmp_path)

    gpu_user = _hold(ray_local, num_gpus=1, num_cpus=0)
    started = time.monotonic()
    code = tag_main(
        [*args, "--set", "tag.device=cuda", "--set", f"tag.no_progress_timeout_s={TIMEOUT_S}"]
    )
    elapsed = time.monotonic() - started
    error = capsys.readouterr().err
    assert code == EXIT_NO_PROGRESS, error
    assert f"tag.no_progress_timeout_s={TIMEOUT_S}" in error and "VideoTagger" in error, error
    assert "'num_gpus': 1" in error, error  # what the stalled stage asks for
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + MARGIN_S
    # The plan was stopped: its encode actors, never started, are gone too.
    assert _wait_gone("VideoTagger") == []
    ray_local.kill(gpu_user)

    # Healthy, with the timeout set: unaffected; the rerun tags everything.
    code = tag_main(
        [*args, "--set", "tag.device=cpu", "--set", f"tag.no_progress_timeout_s={MARGIN_S}"]
    )
    assert code == 0, capsys.readouterr().err
    tags = read_tags(str(out))
    assert sorted(tags["video_id"].to_pylist()) == sorted(videos)
    assert tags["error"].null_count == len(videos)


@pytest.mark.slow
def test_label_bank_that_never_gets_its_gpu_fails_naming_the_field(ray_local, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("dog\ncat\nsurfing\n")
    out = tmp_path / "bank.parquet"
    stalled = Config.from_yaml(
        TINY_CONFIG, ["label_bank.device=cuda", f"label_bank.no_progress_timeout_s={TIMEOUT_S}"]
    )
    gpu_user = _hold(ray_local, num_gpus=1, num_cpus=0)
    started = time.monotonic()
    with pytest.raises(NoProgressError, match=f"label_bank.no_progress_timeout_s={TIMEOUT_S}"):
        build_label_bank(stalled, str(labels), str(out))
    assert TIMEOUT_S <= time.monotonic() - started < TIMEOUT_S + MARGIN_S
    assert not out.exists()
    assert _wait_gone("LabelBankActor") == []
    ray_local.kill(gpu_user)

    healthy = Config.from_yaml(
        TINY_CONFIG, ["label_bank.device=cpu", f"label_bank.no_progress_timeout_s={MARGIN_S}"]
    )
    summary = build_label_bank(healthy, str(labels), str(out))
    assert (summary.labels, summary.computed) == (3, 3)


@pytest.fixture(scope="module")
def square_clips(tmp_path_factory) -> Path:
    return write_square_clips(tmp_path_factory.mktemp("square-clips"))


@pytest.mark.slow
def test_training_whose_workers_are_never_placed_is_stopped_and_releases_the_cluster(
    ray_local, square_clips, tmp_path
):
    from pipeline.training import run_training

    # One worker of 2 CPUs (it fits the cluster's 3 beside decoding), but other work holds 2.
    cfg = train_config(
        square_clips,
        tmp_path,
        "stalled",
        num_workers=1,
        worker_num_cpus=2,
        no_progress_timeout_s=TIMEOUT_S,
    )
    cpus = ray_local.cluster_resources()["CPU"]
    other_work = _hold(ray_local, num_cpus=2)
    started = time.monotonic()
    with pytest.raises(NoProgressError, match=f"train.no_progress_timeout_s={TIMEOUT_S}"):
        run_training(cfg)
    assert TIMEOUT_S <= time.monotonic() - started < TIMEOUT_S + MARGIN_S
    # The aborted run holds nothing: its controller is gone and, once the other work ends,
    # every CPU is free again (no placement group left behind).
    assert _wait_gone("TrainController") == []
    ray_local.kill(other_work)
    deadline = time.monotonic() + 30
    while ray_local.available_resources().get("CPU", 0) < cpus and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_local.available_resources().get("CPU", 0) == cpus


@pytest.mark.slow
def test_healthy_training_with_the_timeout_set_is_unaffected(ray_local, square_clips, tmp_path):
    from pipeline.training import run_training

    cfg = train_config(
        square_clips, tmp_path, "healthy", num_workers=1, epochs=1, no_progress_timeout_s=MARGIN_S
    )
    result = run_training(cfg)
    assert result.metrics["step"] == 4  # 8 clips, one worker, batches of 2


@pytest.mark.slow
def test_tagging_encoding_in_the_driver_whose_decode_never_gets_a_cpu_fails_naming_the_field(
    ray_local, tmp_path, capsys
):
    videos, out, args = _tagging_job(tmp_path)
    args += ["--set", "tag.device=cpu", "--set", "tag.encode_in=driver"]

    other_work = _hold(ray_local, num_cpus=ray_local.cluster_resources()["CPU"])
    started = time.monotonic()
    code = tag_main([*args, "--set", f"tag.no_progress_timeout_s={TIMEOUT_S}"])
    elapsed = time.monotonic() - started
    error = capsys.readouterr().err
    ray_local.kill(other_work)
    assert code == EXIT_NO_PROGRESS, error
    assert f"tag.no_progress_timeout_s={TIMEOUT_S}" in error and "in the driver" in error, error
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + MARGIN_S

    # Once the CPUs are free, a rerun tags every video.
    assert tag_main([*args, "--set", f"tag.no_progress_timeout_s={MARGIN_S}"]) == 0
    tags = read_tags(str(out))
    assert sorted(tags["video_id"].to_pylist()) == sorted(videos)
    assert tags["error"].null_count == len(videos)
