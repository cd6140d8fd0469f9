import json

import pytest
import torch
from safetensors.torch import save_file

from ovml_core.checkpoint import (
    CheckpointError,
    checkpoint_state,
    load_checkpoint,
    load_label_state,
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
    ckpt = save_checkpoint(trained_model, tmp_path / "ckpt")
    save_file({"unrelated": torch.zeros(2)}, str(ckpt / "model.safetensors"))
    # config.json records the sha256 of the file it was written with: a swapped (or half
    # copied) weights file is refused by name before it is read.
    with pytest.raises(CheckpointError, match="model.safetensors: missing or not the file"):
        load_checkpoint(ckpt)
    # A config.json without sha256s (written before they were recorded): the keys decide.
    meta = json.loads((ckpt / "config.json").read_text())
    del meta["files"]
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_checkpoint(ckpt)


def test_changed_labels_file_is_refused(trained_model, tmp_path):
    trained_model.encode_labels(LABELS)
    ckpt = save_checkpoint(trained_model, tmp_path / "ckpt")
    stored = json.loads((ckpt / "labels.json").read_text())
    stored["attribute_ids"]["dog"][0] += 1
    (ckpt / "labels.json").write_text(json.dumps(stored))
    with pytest.raises(CheckpointError, match="labels.json: missing or not the file"):
        load_checkpoint(ckpt)


def test_stored_ids_and_generation_prefix_survive_save_load(trained_model, tiny_config, tmp_path):
    soft = trained_model.labels.soft
    soft.regenerate(LABELS)  # the trained prefix becomes the generation prefix
    assert not torch.equal(
        soft.generation_prefix, create_model(tiny_config.model).labels.soft.prefix
    )
    # Stored ids are used as they are, even ids the prefix would not generate now.
    soft.ids.stored["surfing"] = [5, 6, 7, 8]
    expected = dict(zip(LABELS, soft.attribute_ids(LABELS), strict=True))
    loaded = load_checkpoint(save_checkpoint(trained_model, tmp_path / "ckpt")).labels.soft
    assert loaded.ids.stored == expected and not loaded.ids.generated
    assert torch.equal(loaded.generation_prefix, soft.generation_prefix)
    assert loaded.attribute_ids(["surfing"]) == [[5, 6, 7, 8]]
    # A label the model never stored gets ids from the stored generation prefix.
    assert loaded.attribute_ids(["cat"]) == soft.generate_ids(["cat"])
    assert loaded.ids.missing(["cat"]) == [] and "cat" not in loaded.ids.stored


def test_resume_takes_the_ids_and_generation_prefix_not_the_weights(
    trained_model, tiny_config, tmp_path
):
    soft = trained_model.labels.soft
    soft.regenerate(LABELS)
    soft.ids.store_generated()
    soft.ids.stored["dog"] = [5, 6, 7, 8]  # ids the restored prefix would not write again
    ckpt = save_checkpoint(trained_model, tmp_path / "ckpt")
    resumed = create_model(tiny_config.model)  # what a restarted worker builds
    load_label_state(resumed, ckpt)
    assert resumed.labels.soft.ids.stored == soft.ids.stored
    assert torch.equal(resumed.labels.soft.generation_prefix, soft.generation_prefix)
    # The weights come from the training state, not from here.
    assert torch.equal(
        resumed.labels.soft.prefix, create_model(tiny_config.model).labels.soft.prefix
    )
    assert resumed.labels.soft.attribute_ids(LABELS) == soft.attribute_ids(LABELS)
    # A checkpoint from before the generation prefix was kept cannot be resumed exactly.
    state = checkpoint_state(trained_model)
    del state["labels.soft.generation_prefix"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt / "model.safetensors"))
    meta = json.loads((ckpt / "config.json").read_text())
    del meta["files"]
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="generation_prefix.*new run"):
        load_label_state(resumed, ckpt)


def test_fingerprint_covers_stored_ids_not_generated_ones(trained_model):
    soft = trained_model.labels.soft
    before = model_fingerprint(trained_model)
    soft.attribute_ids(LABELS)  # generated: a cache the model could rebuild
    assert model_fingerprint(trained_model) == before
    soft.ids.store_generated()  # stored (as saving does): part of the model
    stored = model_fingerprint(trained_model)
    assert stored != before
    soft.ids.stored["dog"] = [*soft.ids.stored["dog"][:-1], soft.ids.stored["dog"][-1] + 1]
    assert model_fingerprint(trained_model) not in (before, stored)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent")
