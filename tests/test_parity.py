"""Train/serve parity: what a training run validates is what its exported model tags.

For each label mode a short Ray Train run on moving squares (1 CPU worker); then the tagging
and evaluation jobs, with the run folder's exported `model/`, on the same val clips. Training's
own final `map_base` / `map_novel` (metrics.json) must be theirs, and `attributes.json` the text
the exported model decodes for the trained labels. Again for a run whose worker is killed and
resumed from a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from ovml_core.checkpoint import load_checkpoint
from ovml_core.config import Config
from ovml_core.model import create_model
from tests.conftest import TINY_CONFIG
from tests.test_training import CRASH_STEP, NOVEL, crash_once_loop, ray_local, write_square_clips

__all__ = ["ray_local"]  # the module's local Ray, shared with test_training

pytestmark = pytest.mark.slow
TOLERANCE = 2e-3
# Colours only: a model that has not learned motion yet scores moving left and right within
# the float16 rounding of the stored video embeddings, which tagging scores from; its mAP then
# hangs on that rounding, not on train/serve parity.
BASE = ["green", "red"]
# 8 training clips, 1 worker, batches of 4, 2 epochs: 4 steps. Ids are generated at step 0,
# at step 3 (the refresh) and after step 4 (the last): the schedule ends on the final prefix.
STEPS, REFRESH = 4, 3


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """The training manifest; `val.parquet` beside it holds 4 val clips, no two alike.

    Large squares: the tiny random CLIP sets a colour's clips apart from the others' by far
    more than the float16 rounding of the video embeddings that tagging scores from. Clips of
    one colour and start moving left and right are nearly one clip to a model that has not
    learned motion yet: that rounding makes such twins tie, and ties move AP."""
    manifest = write_square_clips(tmp_path_factory.mktemp("parity-videos"), side=20)
    table = pq.read_table(manifest)
    val = pc.and_(pc.equal(table["split"], "val"), pc.match_substring(table["video_id"], "-right-"))
    pq.write_table(table.filter(val), manifest.parent / "val.parquet")
    return manifest


def _config(manifest: Path, storage: Path, mode: str, **train) -> Config:
    settings = {
        "train_manifest": str(manifest),
        "val_manifest": str(manifest.parent / "val.parquet"),
        "base_labels": f"[{','.join(BASE)}]",
        "novel_labels": f"[{','.join(NOVEL)}]",
        "storage_path": str(storage),
        "name": mode,
        "num_workers": 1,
        "epochs": 2,
        "batch_size": 4,
        "lr": 0.02,
        "warmup_steps": 1,
        "attribute_refresh_steps": REFRESH,
        **train,
    }
    overrides = [f"model.label_encoder={mode}", *(f"train.{k}={v}" for k, v in settings.items())]
    if mode == "text":  # the tiny LLM writes one description for every label; SmolLM2 not
        overrides.append("model.llm=smollm2")
    return Config.from_yaml(TINY_CONFIG, overrides)


def _run_folder(cfg: Config) -> Path:
    return Path(cfg.train.storage_path) / cfg.train.name


def _tag_and_evaluate(cfg: Config, work: Path) -> dict:
    """jobs/tag.py + jobs/evaluate.py with the run folder's exported model, on the val clips
    training validated on."""
    from pipeline.evaluation import main as evaluate
    from pipeline.tagging import main as tag

    vocabulary = work / "labels.txt"
    vocabulary.write_text("\n".join(BASE + NOVEL) + "\n")
    common = ["--config", str(TINY_CONFIG), "--manifest", cfg.train.val_manifest]
    common += ["--labels", str(vocabulary)]
    common += ["--set", f"train.novel_labels=[{','.join(NOVEL)}]", "--set", "tag.top_k=3"]
    model = str(_run_folder(cfg) / "model")
    assert tag([*common, "--out", str(work / "tags"), "--checkpoint", model]) == 0
    assert evaluate([*common, "--tags", str(work / "tags"), "--out", str(work / "eval")]) == 0
    return json.loads((work / "eval" / "metrics.json").read_text())


def _assert_parity(cfg: Config, work: Path) -> list[dict]:
    history = json.loads((_run_folder(cfg) / "metrics.json").read_text())
    final = history[-1]
    assert final["step"] == STEPS and final["epochs_done"] == cfg.train.epochs
    tagged = _tag_and_evaluate(cfg, work)
    print(cfg.train.name, {k: (final[k], tagged[k]) for k in ("map_base", "map_novel")})
    for key in ("map_base", "map_novel"):
        assert tagged[key] == pytest.approx(final[key], abs=TOLERANCE), key
    return history


def _assert_exported_labels(cfg: Config) -> None:
    """The exported model stores the ids (or descriptions) of every label training validated,
    so tagging generates nothing for them, and decodes exactly attributes.json."""
    run = _run_folder(cfg)
    model = load_checkpoint(run / "model")
    if cfg.model.label_encoder == "prompt":
        assert not (run / "attributes.json").exists()
        return
    assert model.labels.cache.missing(BASE + NOVEL) == []
    written = json.loads((run / "attributes.json").read_text())
    assert written == dict(zip(BASE, model.label_attributes(BASE), strict=True))
    if cfg.model.label_encoder == "soft":
        soft = model.labels.soft
        # The last ids came from the final prefix, which moved from its start. (The tiny
        # LLM writes the same ids whatever the prefix, so that a loaded or resumed model uses
        # its stored ids, not new ones, is held by tests/test_checkpoint.py, ids set by hand.)
        assert torch.equal(soft.generation_prefix, soft.prefix)
        assert not torch.equal(soft.prefix, create_model(cfg.model).labels.soft.prefix)
        assert soft.attribute_ids(BASE + NOVEL) == soft.generate_ids(BASE + NOVEL)


@pytest.mark.parametrize(
    ("mode", "train"),
    [
        ("soft", {}),
        ("text", {}),
        # With patch the exported CLIP weights are interpolated: validation must measure those.
        ("prompt", {"regularizers": "[patch]", "lr_clip": 1e-3}),
    ],
    ids=["soft", "text", "prompt-patch"],
)
def test_final_validation_is_what_the_exported_model_tags(ray_local, videos, tmp_path, mode, train):
    from pipeline.training import build_trainer

    cfg = _config(videos, tmp_path / "runs", mode, **train)
    build_trainer(cfg).fit()
    _assert_parity(cfg, tmp_path)
    _assert_exported_labels(cfg)


def test_killed_and_resumed_run_keeps_parity(ray_local, videos, tmp_path):
    from pipeline.training import build_trainer

    cfg = _config(videos, tmp_path / "runs", "soft", max_failures=1, checkpoint_every_steps=1)
    build_trainer(cfg, train_loop=crash_once_loop).fit()
    assert (_run_folder(cfg) / "worker-crashed").exists()
    history = _assert_parity(cfg, tmp_path)
    assert 1 <= history[-1]["resumed_from_step"] < CRASH_STEP
    _assert_exported_labels(cfg)
