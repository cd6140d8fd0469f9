"""Creating CLIP from every kind of weights source, offline, with files written here."""

import json
import os
from pathlib import Path

import huggingface_hub.constants
import open_clip
import open_clip.factory
import open_clip.pretrained
import pytest
import torch
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import save_file

from ovml_core.clip import (
    ClipWeightsError,
    PretrainedSource,
    clip_identifier,
    clip_image_params,
    create_clip,
    load_clip_state_dict,
    pretrained_weights_file,
    register_model_configs,
    resolve_pretrained,
)

TINY_CONFIG = Path(__file__).resolve().parents[1] / "ovml_core" / "model_configs" / "ovml-tiny.json"


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    """Hub lookups may only be answered from a local cache; nothing is downloaded."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def source_clip():
    """A tiny CLIP whose weights the files below hold."""
    torch.manual_seed(7)
    return create_clip("ovml-tiny")


def state_of(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def assert_same_parameters(model, reference):
    expected = state_of(reference)
    actual = state_of(model)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def fake_hub_cache(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """The layout huggingface_hub reads offline: refs/main -> snapshots/<commit>/<file>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


def safetensors_bytes(model, path: Path) -> bytes:
    save_file(state_of(model), str(path))
    return path.read_bytes()


def test_register_model_configs_is_idempotent():
    register_model_configs()
    paths = len(open_clip.factory._MODEL_CONFIG_PATHS)
    register_model_configs()
    assert len(open_clip.factory._MODEL_CONFIG_PATHS) == paths
    assert "ovml-tiny" in open_clip.list_models()


def test_resolve_pretrained(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert resolve_pretrained("ovml-tiny", None) == PretrainedSource("random")
    assert resolve_pretrained("ViT-B-16", "openai") == PretrainedSource("tag", "openai")
    assert resolve_pretrained("ViT-B-16", "laion2b_s34b_b88k").kind == "tag"
    assert resolve_pretrained("x", "hf-hub:org/repo") == PretrainedSource("hf-hub", "org/repo")
    assert resolve_pretrained("ovml-tiny", str(weights)) == PretrainedSource("file", str(weights))
    with pytest.raises(ClipWeightsError, match="known: openai, laion400m_e31"):
        resolve_pretrained("ViT-B-16", "imagenet")
    with pytest.raises(ClipWeightsError, match="not found"):
        resolve_pretrained("ovml-tiny", str(tmp_path / "missing.bin"))
    with pytest.raises(ClipWeightsError, match="needs a repo id"):
        resolve_pretrained("ovml-tiny", "hf-hub:")


@pytest.mark.parametrize(
    ("tag", "repo"),
    [
        ("laion2b_s34b_b88k", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),
        ("openai", "timm/vit_base_patch16_clip_224.openai"),  # hub preferred over the URL
    ],
)
def test_tag_resolves_through_open_clip_downloader(tmp_path, tag, repo):
    fake_hub_cache(tmp_path, repo, {"open_clip_model.safetensors": b"weights"})
    path = pretrained_weights_file("ViT-B-16", tag, cache_dir=str(tmp_path))
    assert path.read_bytes() == b"weights"
    assert repo.replace("/", "--") in str(path)


def test_unavailable_tag_is_a_clear_error(tmp_path):
    with pytest.raises(ClipWeightsError, match="could not fetch CLIP weights 'openai'"):
        pretrained_weights_file("ViT-B-16", "openai", cache_dir=str(tmp_path))


def test_tag_loads_weights_with_the_tags_preprocessing(tmp_path, monkeypatch, source_clip):
    """A whole tag round trip, on a tag registered for the tiny model the way open_clip's are."""
    tag_cfg = {
        "hf_hub": "ovml-test/tiny-tag/",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
        "quick_gelu": True,
    }
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "ovml-tiny", {"test_tag": tag_cfg})
    weights = safetensors_bytes(source_clip, tmp_path / "w.safetensors")
    fake_hub_cache(tmp_path / "hub", "ovml-test/tiny-tag", {"open_clip_model.safetensors": weights})
    clip = create_clip("ovml-tiny", "test_tag", cache_dir=str(tmp_path / "hub"))
    assert_same_parameters(clip, source_clip)
    assert clip_image_params(clip) == (32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert isinstance(clip.visual.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)


def test_hf_hub_repo(tmp_path, source_clip):
    config = {
        "model_cfg": json.loads(TINY_CONFIG.read_text()),
        "preprocess_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]},
    }
    weights = safetensors_bytes(source_clip, tmp_path / "w.safetensors")
    files = {
        "open_clip_config.json": json.dumps(config).encode(),
        "open_clip_model.safetensors": weights,
    }
    fake_hub_cache(tmp_path / "hub", "ovml-test/tiny-clip", files)
    clip = create_clip("ovml-tiny", "hf-hub:ovml-test/tiny-clip", cache_dir=str(tmp_path / "hub"))
    assert_same_parameters(clip, source_clip)
    assert clip_image_params(clip) == (32, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


@pytest.mark.parametrize(
    ("filename", "layout"),
    [
        ("clip.safetensors", "plain"),
        ("clip.pt", "plain"),
        ("clip.bin", "state_dict"),  # open_clip training checkpoints
        ("clip.bin", "state_dict+module"),  # ... saved from DistributedDataParallel
    ],
)
def test_local_weights_files(tmp_path, source_clip, filename, layout):
    state = state_of(source_clip)
    if layout.endswith("+module"):
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / filename
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"epoch": 3, "state_dict": state} if "state_dict" in layout else state, path)
    clip = create_clip("ovml-tiny", str(path))
    assert_same_parameters(clip, source_clip)
    assert clip_image_params(clip) == (32, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


class RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_unexecuted(tmp_path, source_clip):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.bin"
    torch.save({**state_of(source_clip), "payload": RunsShell(marker)}, path)
    with pytest.raises(ClipWeightsError, match="refused"):
        create_clip("ovml-tiny", str(path))
    assert not marker.exists()


def test_bad_weights_files(tmp_path, source_clip):
    incomplete = tmp_path / "incomplete.safetensors"
    state = state_of(source_clip)
    state.pop("visual.proj")
    save_file(state, str(incomplete))
    with pytest.raises(ClipWeightsError, match="(?s)do not fit the model.*visual.proj"):
        create_clip("ovml-tiny", str(incomplete))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors")
    with pytest.raises(ClipWeightsError, match="not a readable safetensors file"):
        load_clip_state_dict(garbage)
    not_weights = tmp_path / "list.pt"
    torch.save([1, 2], not_weights)
    with pytest.raises(ClipWeightsError, match="state dict"):
        load_clip_state_dict(not_weights)
    with pytest.raises(ClipWeightsError, match="unsupported weights file"):
        load_clip_state_dict(tmp_path / "weights.npz")


def test_clip_identifier(tmp_path, source_clip):
    first = tmp_path / "a.safetensors"
    save_file(state_of(source_clip), str(first))
    renamed = tmp_path / "b.safetensors"
    renamed.write_bytes(first.read_bytes())
    assert clip_identifier("ovml-tiny", None) == "ovml-tiny|random-init"
    assert clip_identifier("ViT-B-16", "openai") == "ViT-B-16|tag:openai"
    assert clip_identifier("ovml-tiny", "hf-hub:o/r") == "ovml-tiny|hf-hub:o/r"
    by_content = clip_identifier("ovml-tiny", str(first))
    assert by_content.startswith("ovml-tiny|file-sha256:")
    assert clip_identifier("ovml-tiny", str(renamed)) == by_content
    state = state_of(source_clip)
    state["visual.proj"] += 1
    save_file(state, str(renamed))
    assert clip_identifier("ovml-tiny", str(renamed)) != by_content


def test_image_params_refuse_preprocessing_we_do_not_implement(source_clip):
    clip = create_clip("ovml-tiny")
    open_clip.model.set_model_preprocess_cfg(
        clip, {**open_clip.get_model_preprocess_cfg(source_clip), "resize_mode": "squash"}
    )
    with pytest.raises(ValueError, match="squash"):
        clip_image_params(clip)
