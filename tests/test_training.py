"""Fine-tuning: parameter groups, teacher, training state (plain torch), and the Ray Train job
end to end on 2 CPU workers: loss goes down, a killed worker resumes from the last
checkpoint, a rerun of a failed run resumes at its saved step. Plus the cluster manifests."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from ovml_core.checkpoint import load_checkpoint, model_fingerprint
from ovml_core.config import Config, ConfigError
from ovml_core.finetune import (
    Objective,
    Progress,
    build_optimizer,
    check_regularizers,
    create_teacher,
    load_training_state,
    lr_factor,
    parameter_groups,
    save_training_state,
    set_trainable,
)
from ovml_core.model import create_model
from tests.conftest import REPO, TINY_CONFIG
from tests.videos import write_video

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
BASE = ["green", "left", "red", "right"]
NOVEL = ["blue"]
CRASH_STEP = 3  # the last worker (rank 1 of 2) dies when it reaches its report of this step


def _model(**train_overrides):
    cfg = Config.from_yaml(TINY_CONFIG, [f"train.{k}={v}" for k, v in train_overrides.items()])
    model = create_model(cfg.model)
    set_trainable(model, cfg.train)
    return cfg, model


# ---------------------------------------------------------------- plain torch


def test_parameter_groups_hold_exactly_the_trainable_parts():
    cfg, model = _model(lr_temporal=0.5)
    groups = parameter_groups(model, cfg.train)
    assert [g["name"] for g in groups] == ["temporal", "prefix", "prompting", "scale_bias"]
    named = {name: group["name"] for group in groups for name, _ in group["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(named) == trainable and len(named) == sum(len(g["params"]) for g in groups)
    assert all(n.startswith("visual.branches.") for n, g in named.items() if g == "temporal")
    assert {n for n, g in named.items() if g != "temporal"} == {
        "labels.soft.prefix",
        "logit_scale",
        "logit_bias",
        *(f"labels.soft.prompting.{n}" for n, _ in model.labels.soft.prompting.named_parameters()),
    }
    assert not any(
        n.startswith(("labels.text.", "labels.soft.llm.", "visual.visual.")) for n in named
    )
    assert {g["name"]: g["lr"] for g in groups}["temporal"] == 0.5
    assert {g["name"]: g["lr"] for g in groups}["prefix"] == cfg.train.lr

    cfg, model = _model(lr_clip="0.00001")
    groups = {g["name"]: g for g in parameter_groups(model, cfg.train)}
    clip_names = {n for n, _ in groups["clip_vision"]["params"]}
    assert groups["clip_vision"]["lr"] == 0.00001
    assert clip_names == {f"visual.visual.{n}" for n, _ in model.visual.visual.named_parameters()}


def test_warmup_then_cosine_to_zero():
    factors = [lr_factor(step, warmup_steps=4, total_steps=14) for step in range(16)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert factors[4] == 1.0 and factors[9] == pytest.approx(0.5) and factors[14] == 0.0
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))


def test_teacher_is_frame_mean_clip_with_plain_prompts(tiny_model):
    teacher = create_teacher(tiny_model.config)
    assert not any(p.requires_grad for p in teacher.parameters())
    frames = torch.randint(0, 256, (2, tiny_model.num_frames, 32, 32, 3), dtype=torch.uint8)
    labels = ["red", "left"]
    with torch.no_grad():
        # The student's temporal branch starts at zero: at init it is frame-mean CLIP too.
        assert torch.allclose(
            teacher.encode_video(frames), tiny_model.encode_video(frames), atol=1e-5
        )
        prompts = torch.nn.functional.normalize(tiny_model.labels.prompt_features(labels), dim=-1)
        assert torch.allclose(teacher.encode_labels(labels), prompts, atol=1e-5)


def test_training_state_round_trip_is_safetensors_and_json(tmp_path):
    cfg, model = _model()
    optimizer, scheduler = build_optimizer(model, cfg.train, total_steps=10)
    frames = torch.randint(0, 256, (2, model.num_frames, 32, 32, 3), dtype=torch.uint8)
    for _ in range(3):
        model.logits(model.encode_video(frames), model.encode_labels(["red"])).mean().backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    progress = Progress(step=3, epoch=1, batches_done=1, history=[{"map": float("nan")}])
    save_training_state(tmp_path, model, optimizer, scheduler, progress)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "optimizer.safetensors",
        "state.json",
        "trainable.safetensors",
    ]
    json.loads((tmp_path / "state.json").read_text(), parse_constant=pytest.fail)

    _, fresh = _model()
    fresh_optimizer, fresh_scheduler = build_optimizer(fresh, cfg.train, total_steps=10)
    restored = load_training_state(tmp_path, fresh, fresh_optimizer, fresh_scheduler)
    assert restored == Progress(step=3, epoch=1, batches_done=1, history=[{"map": None}])
    assert model_fingerprint(fresh) == model_fingerprint(model)
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    before, after = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert before.keys() == after.keys()
    for index, moments in before.items():
        assert all(torch.equal(value, after[index][key]) for key, value in moments.items())

    _, other = _model()
    other_cfg = Config.from_yaml(TINY_CONFIG, ["train.lr_clip=0.001"])
    set_trainable(other, other_cfg.train)
    other_optimizer, other_scheduler = build_optimizer(other, other_cfg.train, 10)
    with pytest.raises(Exception, match="parameter groups differ"):
        load_training_state(tmp_path, other, other_optimizer, other_scheduler)


def test_targets_keep_only_vocabulary_labels():
    from pipeline.training_data import multi_hot

    batch = pa.table(
        {
            "video_id": ["a", "b"],
            "uri": ["a.mp4", "b.mp4"],
            "labels": [["red", "blue"], None],
        }
    )
    out = multi_hot(batch, vocabulary=BASE)
    assert out["targets"].tolist() == [[0, 0, 1, 0], [0, 0, 0, 0]]


def test_bad_training_config_fails_naming_the_field(videos, tmp_path):
    from pipeline.training_data import plan_training

    with pytest.raises(ConfigError, match="train.train_manifest"):
        plan_training(Config.from_yaml(TINY_CONFIG), image_size=32)
    cfg = _config(videos, tmp_path, "bad", base_labels="[red, green]", novel_labels="[red]")
    with pytest.raises(ConfigError, match="train.novel_labels"):
        plan_training(cfg, image_size=32)
    frame_mean = Config.from_yaml(TINY_CONFIG, ["model.temporal=none", "train.regularizers=[l2sp]"])
    with pytest.raises(ConfigError, match="train.regularizers: l2sp"):
        check_regularizers(frame_mean.model, frame_mean.train)
    # A divided branch alone is new: nothing pretrained for `l2sp` (or `patch`) to act on.
    frozen_clip = Config.from_yaml(TINY_CONFIG, ["train.regularizers=[l2sp]"])
    with pytest.raises(ConfigError, match="train.lr_clip"):
        check_regularizers(frozen_clip.model, frozen_clip.train)


def test_l2sp_pulls_pretrained_clip_weights_but_not_the_new_temporal_branch():
    cfg, model = _model(regularizers="[l2sp]", lr_clip=1e-3)
    objective = Objective(model, cfg.train, BASE)
    video = torch.zeros(1, 4)

    def penalty() -> float:
        return objective.regularizer(model, None, [], video, None, None, None).item()

    with torch.no_grad():
        for param in model.visual.temporal_parameters():
            param.add_(0.5)  # trained far from its zero init: not penalised
        assert penalty() == 0.0
        model.visual.visual.conv1.weight.add_(0.1)  # a pretrained weight moved: penalised
    expected = cfg.train.l2sp_weight * 0.1**2 * model.visual.visual.conv1.weight.numel()
    assert penalty() == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------- Ray Train, end to end


def _square_clip(path: Path, color: str, direction: str, start: int, side: int) -> Path:
    frames = []
    for t in range(8):
        image = np.full((32, 32, 3), 16, np.uint8)
        x = int(np.clip(start + (2 * t if direction == "right" else -2 * t), 0, 32 - side))
        image[16 - side // 2 : 16 + (side + 1) // 2, x : x + side] = COLORS[color]
        frames.append(image)
    return write_video(path, frames, fps=8)


def write_square_clips(root: Path, side: int = 10) -> Path:
    """Moving squares: 8 training clips of the base labels, validation clips with the novel
    colour. Returns the manifest (video_id, uri, labels, split)."""
    rows = []
    for color in COLORS:
        for direction in ("left", "right"):
            for k, start in enumerate((2, 8, 14)):
                if color == "blue" and k == 2:
                    continue
                video_id = f"{color}-{direction}-{k}"
                start = start if direction == "right" else start + 6
                _square_clip(root / f"{video_id}.mp4", color, direction, start, side)
                split = "val" if color == "blue" or k == 2 else "train"
                rows.append(
                    {
                        "video_id": video_id,
                        "uri": f"{video_id}.mp4",
                        "labels": [color, direction],
                        "split": split,
                    }
                )
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    return root / "manifest.parquet"


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return write_square_clips(tmp_path_factory.mktemp("training-videos"))


def _config(manifest: Path, storage: Path, name: str, **train) -> Config:
    settings = {
        "train_manifest": str(manifest),
        "novel_labels": "[blue]",
        "storage_path": str(storage),
        "name": name,
        "num_workers": 2,
        "epochs": 2,
        "batch_size": 2,
        "lr": 0.02,
        "warmup_steps": 1,
        "checkpoint_every_steps": 1,
        "regularizers": "[distill, l2sp, patch]",
        "lr_clip": 1e-3,  # l2sp pulls CLIP vision weights: they must train
        "patch_loss_weight": 0.5,
        **train,
    }
    return Config.from_yaml(TINY_CONFIG, [f"train.{k}={v}" for k, v in settings.items()])


def crash_once_loop(loop_config: dict) -> None:
    """The production loop, except that the worker of the last rank really dies (os._exit) the
    first time it reaches its report of CRASH_STEP; a marker file in the run folder makes it
    once."""
    import ray.train

    from pipeline import training

    marker = Path(loop_config["run_dir"]) / "worker-crashed"
    report = training._report

    def report_or_die(metrics, *args, **kwargs):
        context = ray.train.get_context()
        last = context.get_world_rank() == context.get_world_size() - 1
        if last and metrics["step"] == CRASH_STEP and not marker.exists():
            marker.touch()
            os._exit(1)
        report(metrics, *args, **kwargs)

    training._report = report_or_die
    training.train_loop_per_worker(loop_config)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        # Workers import this module for crash_once_loop.
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    yield ray
    ray.shutdown()


def _history(cfg: Config) -> list[dict]:
    return json.loads((Path(cfg.train.storage_path) / cfg.train.name / "metrics.json").read_text())


def _total_steps(cfg: Config) -> int:
    # 8 training clips over 2 workers, batches of 2: 2 steps per epoch.
    return 2 * cfg.train.epochs


@pytest.fixture(scope="module")
def recovered_run(ray_local, videos, tmp_path_factory):
    """A 2-worker run whose rank-1 worker process dies once mid-run; max_failures=1."""
    from pipeline.training import build_trainer

    cfg = _config(videos, tmp_path_factory.mktemp("runs"), "recover", max_failures=1)
    result = build_trainer(cfg, train_loop=crash_once_loop).fit()
    return cfg, result


@pytest.mark.slow
def test_two_workers_lower_the_loss_and_write_a_loadable_checkpoint(recovered_run, tiny_model):
    cfg, result = recovered_run
    history = _history(cfg)
    losses = [row["train_loss"] for row in history]
    assert losses[-1] < 0.5 * losses[0]
    final = history[-1]
    assert final["step"] == _total_steps(cfg) and final["epochs_done"] == cfg.train.epochs
    assert {"map_base", "map_novel", "harmonic_mean"} <= set(final)
    assert 0 <= final["map_novel"] <= 1 and 0 <= final["map_base"] <= 1

    model_dir = Path(result.checkpoint.path) / "model"
    model = load_checkpoint(model_dir)
    assert model_fingerprint(model) != model_fingerprint(tiny_model)
    assert json.loads((model_dir / "config.json").read_text())["model_fingerprint"] == (
        model_fingerprint(model)
    )
    files = {p.suffix for p in Path(result.checkpoint.path).rglob("*") if p.is_file()}
    assert files <= {".safetensors", ".json"}


@pytest.mark.slow
def test_killed_worker_resumes_from_the_last_checkpoint(recovered_run):
    cfg, result = recovered_run
    assert (Path(cfg.train.storage_path) / cfg.train.name / "worker-crashed").exists()
    history = _history(cfg)
    resumed = history[-1]["resumed_from_step"]
    # Ray restores the latest checkpoint it had registered when the worker died: one before
    # the crash (reports are collected asynchronously, so not necessarily the very last).
    assert 1 <= resumed < CRASH_STEP
    _assert_resumed_history(cfg, history, resumed)
    assert result.metrics["step"] == _total_steps(cfg)


@pytest.mark.slow
def test_rerun_of_a_failed_run_resumes_at_its_saved_step(ray_local, videos, tmp_path):
    import ray.train

    from pipeline.training import build_trainer

    cfg = _config(videos, tmp_path, "rerun", max_failures=0)
    with pytest.raises(ray.train.TrainingFailedError):
        build_trainer(cfg, train_loop=crash_once_loop).fit()
    saved = ray.train.Result.from_path(str(tmp_path / "rerun")).metrics["step"]
    assert 1 <= saved < CRASH_STEP

    result = build_trainer(cfg).fit()  # the same command again
    _assert_resumed_history(cfg, _history(cfg), saved)
    assert result.metrics["step"] == _total_steps(cfg)

    # The same name with another model is refused before any worker starts.
    changed = Config.from_dict(
        {**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "temporal": "none"}}
    )
    with pytest.raises(ConfigError, match="model.temporal"):
        build_trainer(changed)


def _assert_resumed_history(cfg: Config, history: list[dict], resumed: int) -> None:
    """One row per step; rows up to `resumed` from the first workers, the rest from the
    restarted ones; the learning rate follows one schedule across the restart."""
    total = _total_steps(cfg)
    assert [row["step"] for row in history] == list(range(1, total + 1))
    assert [row["resumed_from_step"] for row in history] == [0] * resumed + [resumed] * (
        total - resumed
    )
    for row in history:
        expected = cfg.train.lr * lr_factor(row["step"], cfg.train.warmup_steps, total)
        assert row["lr_scale_bias"] == pytest.approx(expected), row


# ---------------------------------------------------------------- cluster manifests


def _ray_version() -> str:
    import ray

    return ray.__version__


def test_cluster_yaml_names_the_pinned_ray_and_existing_jobs():
    text = (REPO / "cluster.yaml").read_text()
    cluster = yaml.safe_load(text)
    images = [v for k, v in cluster["docker"].items() if k.endswith("image")]
    # The one image deploy/Dockerfile builds on the pinned Ray (tests/test_deploy.py checks it).
    assert images == [f"REGISTRY/ovml:ray{_ray_version()}-py311-gpu"]
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    cpu_workers = [
        t for name, t in types.items() if name != cluster["head_node_type"] and t not in gpu_types
    ]
    assert gpu_types and cpu_workers
    assert any(
        t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        for t in cpu_workers
    )
    for node_type in gpu_types + cpu_workers:  # autoscaling: from none to a few
        assert 0 == node_type["min_workers"] < node_type["max_workers"] <= cluster["max_workers"]
    _assert_jobs_exist(text)


def test_rayjob_manifest_runs_the_train_job_on_the_pinned_ray():
    from pipeline.training import parse_args

    text = (REPO / "deploy" / "rayjob.yaml").read_text()
    job = yaml.safe_load(text)
    assert job["apiVersion"].startswith("ray.io/") and job["kind"] == "RayJob"
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == _ray_version()
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    images = {c["image"] for pod in pods for c in pod["template"]["spec"]["containers"]}
    # One image, built by deploy/Dockerfile from the plain Ray image of the pinned version.
    assert len(images) == 1 and f"ray{_ray_version()}-py311-gpu" in images.pop()
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert re.search(
        rf"^FROM rayproject/ray:{re.escape(_ray_version())}-py311-gpu$", dockerfile, re.M
    )
    assert any(
        r.get("limits", {}).get("nvidia.com/gpu")
        for pod in pods
        for r in (c["resources"] for c in pod["template"]["spec"]["containers"])
    )
    # The entrypoint is a valid command line of the train job, overrides included.
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"]
    args = parse_args(argv[2:])
    cfg = Config.from_yaml(REPO / args.config, args.overrides)
    assert cfg.train.use_gpu and cfg.train.storage_path.startswith("s3://")
    _assert_jobs_exist(text)


def _assert_jobs_exist(text: str) -> None:
    jobs = set(re.findall(r"jobs/\w+\.py", text))
    assert jobs and all((REPO / job).is_file() for job in jobs), jobs
    configs = set(re.findall(r"configs/[\w.-]+\.yaml", text))
    assert all((REPO / c).is_file() for c in configs), configs


def test_relative_clip_weights_are_named_absolutely_for_the_workers(tmp_path, monkeypatch):
    """Workers run in the run's folder: a weights file relative to the driver must not break."""
    from pipeline.training import with_absolute_clip_weights

    weights = tmp_path / "weights" / "clip.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    cfg = Config.from_yaml(TINY_CONFIG, ["model.clip_pretrained=weights/clip.safetensors"])
    resolved = with_absolute_clip_weights(cfg)
    assert resolved.model.clip_pretrained == str(weights)
    assert resolved.train == cfg.train and cfg.model.clip_pretrained == "weights/clip.safetensors"
    random = Config.from_yaml(TINY_CONFIG)
    assert with_absolute_clip_weights(random) is random
