"""The GPU path: bf16 autocast against fp32, the encode actor on the GPU (pinned uint8 batches,
torch.compile), GPU placement of the tagging pool, a 1-GPU NCCL Ray Train run, and the vLLM
label bank. Run by `bench/gpu_check.sh` (`pytest -m gpu`); skipped where CUDA is absent."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from ovml_core.checkpoint import model_fingerprint
from ovml_core.config import Config
from ovml_core.llm import SMOLLM2_INSTALL, SMOLLM2_PACKAGE
from ovml_core.model import create_model
from pipeline.tagging import LabelBank, ModelSource, VideoTagger
from tests.conftest import REPO, TINY_CONFIG
from tests.test_tagging import tagger_batch
from tests.videos import write_indexed_video, write_video

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LABELS = ["dog", "cat", "surfing", "car"]


def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _frames(batch: int, frames: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, frames, size, size, 3)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=-1)


@pytest.mark.parametrize("temporal", ["divided", "neighbor"])
def test_bf16_autocast_encode_matches_fp32_for_vit_b16(temporal):
    cfg = Config.from_yaml(
        TINY_CONFIG,
        ["model.clip_model=ViT-B-16", "model.label_encoder=prompt", "model.num_frames=8"],
    )
    cfg.model.temporal = temporal
    model = create_model(cfg.model, "cuda")
    frames = _frames(4, 8, model.image_size)
    with torch.inference_mode():
        fp32 = model.encode_video(frames)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model.encode_video(frames)
    # The embedding comes out of F.normalize, which autocast runs in float32; the encoder ran
    # in bf16 all the same, so the two differ, a little.
    assert fp32.dtype == torch.float32 and not torch.equal(bf16.float(), fp32)
    assert _cosine(bf16, fp32).min() > 0.99
    # Different clips stay apart: the check is not passed by a constant output.
    assert _cosine(fp32[:1], fp32[1:]).max() < 0.999


@pytest.mark.parametrize("compile", [False, True])
def test_encode_actor_on_gpu_matches_the_fp32_cpu_model(compile):
    """The actor's path: valid clips gathered into pinned memory, copied async, preprocessed and
    encoded on the GPU in bf16 (compiled: padded to one batch shape); error rows skipped."""
    cfg = Config.from_yaml(TINY_CONFIG, ["model.label_encoder=prompt", "tag.emit_embedding=true"])
    cfg.tag.compile = compile
    cfg.tag.batch_size = 4
    cpu_model = create_model(cfg.model)
    bank = LabelBank(LABELS, cpu_model.encode_labels(LABELS).detach().numpy())
    fingerprint = model_fingerprint(cpu_model)
    tagger = VideoTagger(ModelSource(cfg.model), bank, fingerprint, "vocab", "run", cfg.tag, 1.0)
    assert tagger.device == "cuda" and model_fingerprint(tagger.model) == fingerprint
    frames = _frames(3, cfg.model.num_frames, cpu_model.image_size).numpy()
    # 3 rows, one an error: a short batch of 2 valid clips (padded to 4 when compiled).
    table = tagger(tagger_batch(frames, [None, "ValueError: broken", None]))
    with torch.inference_mode():
        expected = cpu_model.encode_video(torch.from_numpy(frames[[0, 2]]))
    got = torch.tensor(np.stack(table["embedding"].to_pylist()[::2]))
    assert table["embedding"][1].as_py() is None
    assert _cosine(got, expected).min() > 0.99


def _videos_manifest(root: Path, count: int) -> str:
    clip = write_indexed_video(root / "clip.mp4", 24, width=128, height=96)
    ids = [f"v{i}" for i in range(count)]
    pq.write_table(pa.table({"video_id": ids, "uri": [str(clip)] * count}), root / "m.parquet")
    return str(root / "m.parquet")


def test_tagging_pool_actors_hold_the_gpu(tmp_path):
    import ray

    from pipeline.tagging import run_tagging

    cfg = Config.from_yaml(TINY_CONFIG, ["model.label_encoder=prompt"])
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_tagging(
            cfg,
            _videos_manifest(tmp_path, 6),
            str(tmp_path / "tags"),
            labels=str(tmp_path / "labels.txt"),
        )
    finally:
        ray.shutdown()
    assert summary.ok == 6 and summary.errored == 0
    # tag.device auto: one GPU per actor because the cluster has one; the actor reports the
    # device it encoded on.
    assert summary.stages.encode_device == "cuda"
    assert summary.stages.videos == 6


def recording_loop(loop_config: dict) -> None:
    """The production training loop, after writing down the process group's backend."""
    import ray.train
    import torch.distributed as dist

    from pipeline.training import train_loop_per_worker

    if ray.train.get_context().get_world_rank() == 0:
        facts = {"backend": dist.get_backend(), "device": str(ray.train.torch.get_device())}
        run_dir = Path(loop_config["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "worker.json").write_text(json.dumps(facts))
    train_loop_per_worker(loop_config)


def _square_manifest(root: Path) -> Path:
    rows = []
    for i, (color, label) in enumerate([((220, 30, 30), "red"), ((30, 200, 30), "green")] * 4):
        frames = []
        for t in range(8):
            image = np.full((32, 32, 3), 16, np.uint8)
            image[11:21, 2 + 2 * t : 12 + 2 * t] = color
            frames.append(image)
        write_video(root / f"{i}.mp4", frames, fps=8)
        split = "val" if i >= 6 else "train"
        rows.append({"video_id": str(i), "uri": f"{i}.mp4", "labels": [label], "split": split})
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    return root / "manifest.parquet"


def test_one_gpu_ray_train_run_uses_nccl_and_writes_a_checkpoint(tmp_path):
    import ray

    from pipeline.training import build_trainer

    settings = {
        "train_manifest": str(_square_manifest(tmp_path)),
        "storage_path": str(tmp_path / "runs"),
        "name": "gpu",
        "num_workers": 1,
        "use_gpu": "true",
        "epochs": 2,
        "batch_size": 2,
        "warmup_steps": 1,
    }
    cfg = Config.from_yaml(TINY_CONFIG, [f"train.{k}={v}" for k, v in settings.items()])
    ray.init(
        num_cpus=4,
        num_gpus=1,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},  # workers import this module
    )
    try:
        result = build_trainer(cfg, train_loop=recording_loop).fit()
    finally:
        ray.shutdown()
    facts = json.loads((tmp_path / "runs" / "gpu" / "worker.json").read_text())
    assert facts == {"backend": "nccl", "device": "cuda:0"}
    assert result.checkpoint is not None
    history = json.loads((tmp_path / "runs" / "gpu" / "metrics.json").read_text())
    assert all(np.isfinite(row["train_loss"]) for row in history)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
@pytest.mark.skipif(not _has_smollm2(), reason=f"the SmolLM2 weights need {SMOLLM2_INSTALL}")
def test_vllm_label_bank_equals_the_hf_label_bank(tmp_path):
    import ray

    from pipeline.label_bank import build_label_bank
    from pipeline.parquet_io import read_label_bank

    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    banks = {}
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        for backend in ("hf", "vllm"):
            cfg = Config.from_yaml(
                TINY_CONFIG, ["model.llm=smollm2", f"label_bank.backend={backend}"]
            )
            build_label_bank(cfg, str(labels), str(tmp_path / f"{backend}.parquet"))
            banks[backend] = read_label_bank(str(tmp_path / f"{backend}.parquet"))
    finally:
        ray.shutdown()
    (hf_labels, hf_emb, _), (vllm_labels, vllm_emb, _) = banks["hf"], banks["vllm"]
    assert hf_labels == vllm_labels == LABELS
    # Same greedy attribute tokens, so the same embeddings up to bf16/fp32 kernel rounding.
    assert _cosine(torch.tensor(vllm_emb), torch.tensor(hf_emb)).min() > 0.99
