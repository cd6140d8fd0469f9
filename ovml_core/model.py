"""OVMLModel: video and label embeddings in CLIP space, one sigmoid score per (video, label).

    p(label | video) = sigmoid(exp(scale) * cos(f_v(video), f_t(label)) + bias)

f_v: CLIP ViT per frame + temporal branch (ovml_core.vision), frames averaged.
f_t: CLIP text tower fed LLM soft attributes (ovml_core.attributes), or a baseline.
`create_model(cfg)` is the one factory; `ovml_core.checkpoint` saves and loads.
"""

from __future__ import annotations

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ovml_core.attributes import LabelEncoder, SoftAttributeEncoder
from ovml_core.clip import clip_identifier, clip_image_params, create_clip, register_model_configs
from ovml_core.config import ModelConfig
from ovml_core.llm import FrozenLLM, load_llm
from ovml_core.preprocess import frames_to_clip_input
from ovml_core.text import ClipTextEncoder
from ovml_core.vision import VideoEncoder


class OVMLModel(nn.Module):
    def __init__(self, cfg: ModelConfig, clip: open_clip.CLIP, tokenizer, llm: FrozenLLM | None):
        super().__init__()
        self.config = cfg
        self.num_frames = cfg.num_frames
        self.image_size, self.image_mean, self.image_std = clip_image_params(clip)
        self.clip_identifier = clip_identifier(cfg.clip_model, cfg.clip_pretrained)
        self.llm_identifier = llm.identifier if llm is not None else None
        self.visual = VideoEncoder(
            clip.visual, cfg.temporal, num_frames=cfg.num_frames, blocks=cfg.temporal_blocks
        )
        text = ClipTextEncoder(clip, tokenizer)
        text.requires_grad_(False)  # the pretrained text tower stays frozen
        soft = None
        if cfg.label_encoder == "soft":
            soft = SoftAttributeEncoder(
                llm,
                d_text=text.width,
                num_prefix=cfg.num_prefix,
                num_attributes=cfg.num_attributes,
                prompting_layers=cfg.prompting_layers,
                instruction=cfg.attribute_instruction,
            )
        self.labels = LabelEncoder(text, cfg.label_encoder, cfg.prompt_template, soft=soft, llm=llm)
        scale, bias = initial_scale_and_bias(cfg, clip)
        self.logit_scale = nn.Parameter(torch.tensor(scale))
        self.logit_bias = nn.Parameter(torch.tensor(bias))

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def encode_video(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 frames [B, T, H, W, 3] -> L2-normalised video embeddings [B, D]."""
        frames = torch.as_tensor(frames)
        if frames.dtype != torch.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
            raise ValueError(
                f"encode_video expects uint8 [B, T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}"
            )
        if frames.shape[1] != self.num_frames:
            raise ValueError(f"model expects {self.num_frames} frames, got {frames.shape[1]}")
        x = frames_to_clip_input(
            frames.to(self.device, non_blocking=True),
            self.image_size,
            self.image_mean,
            self.image_std,
        )
        return F.normalize(self.visual(x), dim=-1)

    def encode_labels(self, labels: list[str]) -> torch.Tensor:
        """Label texts -> L2-normalised label embeddings [L, D]."""
        if not labels:
            raise ValueError("encode_labels needs at least one label")
        return F.normalize(self.labels(list(labels)), dim=-1)

    def label_attributes(self, labels: list[str]) -> list[str]:
        """What the LLM produced for each label, decoded for people to read."""
        return self.labels.attributes(list(labels))

    def logits(self, video_emb: torch.Tensor, label_emb: torch.Tensor) -> torch.Tensor:
        return self.logit_scale.exp() * video_emb @ label_emb.T + self.logit_bias

    def score(self, video_emb: torch.Tensor, label_emb: torch.Tensor) -> torch.Tensor:
        """Independent probabilities [B, L]: multi-label, not a softmax over labels."""
        return torch.sigmoid(self.logits(video_emb, label_emb))


# Video embeddings are stored (tags files, re-scoring, search) as float16, and every score is
# computed from the stored value: training's validation, a fresh tag and a re-scored row then
# rank videos identically (rounding can swap near ties or make two scores equal).
EMBEDDING_DTYPE = torch.float16


def as_stored(video_emb: torch.Tensor) -> torch.Tensor:
    """The video embedding as stored (EMBEDDING_DTYPE), back in float32 for scoring."""
    return video_emb.to(EMBEDDING_DTYPE).float()


def initial_scale_and_bias(cfg: ModelConfig, clip: open_clip.CLIP) -> tuple[float, float]:
    """(log scale, bias) the model starts from: the config's, or with `init_scale_from_clip`
    the CLIP's own `logit_scale` (open_clip keeps it as a log too) and `logit_bias` if any."""
    if not cfg.init_scale_from_clip:
        return float(cfg.init_scale), float(cfg.init_bias)
    bias = getattr(clip, "logit_bias", None)
    scale = clip.logit_scale.detach()  # a trainable parameter: read its value only
    return float(scale), float(cfg.init_bias if bias is None else bias.detach())


def create_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> OVMLModel:
    """Build the model from its config; random parts are seeded by `cfg.seed`."""
    cfg.validate()
    register_model_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        clip = create_clip(cfg.clip_model, cfg.clip_pretrained)
        llm = load_llm(cfg.llm) if cfg.label_encoder != "prompt" else None
        model = OVMLModel(cfg, clip, open_clip.get_tokenizer(cfg.clip_model), llm)
    return model.to(device).eval()
