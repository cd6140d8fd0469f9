import json

import pytest
import torch
from safetensors.torch import save_file

from ovml_core.checkpoint import (
    CheckpointError,
    checkpoint_state,
    load_checkpoint,
    model_fingerprint,
    save_checkpoint,
)
from ovml_core.model import create_model

LABELS = ["surfing", "dog"]


def frames():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8, generator=g)


@pytest.fixture()
def trained_model(tiny_config):
    """A model whose weights differ from a fresh create_model (as after training)."""
    model = create_model(tiny_config.model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def scores(model):
    with torch.no_grad():
        return model.score(model.encode_video(frames()), model.encode_labels(LABELS))


def test_save_load_gives_identical_scores_and_fingerprint(trained_model, tmp_path):
    save_checkpoint(trained_model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    torch.testing.assert_close(scores(loaded), scores(trained_model), rtol=0, atol=0)
    assert model_fingerprint(loaded) == model_fingerprint(trained_model)
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["model_fingerprint"] == model_fingerprint(trained_model)
    assert meta["llm_identifier"] == trained_model.llm_identifier


def test_fingerprint_changes_when_weights_change(trained_model):
    before = model_fingerprint(trained_model)
    assert model_fingerprint(trained_model) == before
    with torch.no_grad():
        trained_model.logit_bias.add_(1e-3)
    assert model_fingerprint(trained_model) != before


def test_checkpoint_holds_no_frozen_llm_weights(trained_model):
    keys = checkpoint_state(trained_model)
    assert "labels.soft.prefix" in keys and "logit_scale" in keys
    assert not [k for k in keys if ".llm." in k]


def test_overwrite_is_atomic_and_leaves_no_temp_dirs(trained_model, tiny_config, tmp_path):
    save_checkpoint(create_model(tiny_config.model), tmp_path / "ckpt")
    save_checkpoint(trained_model, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert model_fingerprint(load_checkpoint(tmp_path / "ckpt")) == model_fingerprint(trained_model)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    torch.save({"w": torch.zeros(1)}, ckpt / "model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(ckpt)


def test_mismatched_weights_are_refused(trained_model, tmp_path):
    save_checkpoint(trained_model, tmp_path / "ckpt")
    save_file({"unrelated": torch.zeros(2)}, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path / "ckpt")


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent")
