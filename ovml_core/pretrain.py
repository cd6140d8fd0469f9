"""Stage 0 of Moving Fashion, "web pre-training": a small CLIP learns image-text matching on
still scenes of garments of ALL classes with templated captions, standing in for the
pretrained CLIP that cannot be downloaded here.

Each step renders a batch of stills (one garment each, posed as in the clips, see
`ovml_core.moving_fashion.sample_still`) and one caption per garment class, each from a random
template; the loss is CLIP's contrastive cross-entropy of each image over the captions. Both
towers train. (A multi-label variant, 1-3 garments per still with a SigLIP sigmoid loss, barely
left the base-rate loss in 50k images on this tiny ViT; one subject per picture learns fast.) The result is an open_clip state dict in .safetensors, which
`ovml_core.clip.create_clip(name, pretrained=path)` loads like any downloaded CLIP.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ovml_core.clip import clip_image_params
from ovml_core.finetune import lr_factor
from ovml_core.metrics import mean_average_precision
from ovml_core.moving_fashion import GARMENTS, ImagePool, render, sample_still
from ovml_core.preprocess import frames_to_clip_input

logger = logging.getLogger(__name__)

CAPTION_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a video of a {}.",
    "a {} on a dark background.",
    "a {}.",
    "{}",
)


@dataclass(frozen=True)
class PretrainSettings:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    eval_images: int = 500
    seed: int = 0


def render_stills(
    rng: np.random.Generator, pool: ImagePool, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [count, H, W, 3], garment class ids [count])."""
    specs = [sample_still(rng, pool) for _ in range(count)]
    images = np.stack([render(spec, pool.images)[0] for spec in specs])
    classes = [GARMENTS.index(spec.tracks[0].garment) for spec in specs]
    return torch.from_numpy(images), torch.tensor(classes)


def captions(rng: np.random.Generator) -> list[str]:
    """One caption per garment class, each from a random template."""
    picks = rng.integers(len(CAPTION_TEMPLATES), size=len(GARMENTS))
    return [CAPTION_TEMPLATES[p].format(g) for p, g in zip(picks, GARMENTS, strict=True)]


class StillScorer:
    """Image and caption features of a CLIP, and its scaled cosine logits."""

    def __init__(self, clip: open_clip.CLIP, tokenizer):
        self.clip, self.tokenizer = clip, tokenizer
        self.size, self.mean, self.std = clip_image_params(clip)

    def logits(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        x = frames_to_clip_input(images[:, None], self.size, self.mean, self.std)[:, 0]
        image = self.clip.encode_image(x, normalize=True)
        text = self.clip.encode_text(self.tokenizer(texts), normalize=True)
        return self.clip.logit_scale.exp() * image @ text.T


def pretrain_clip(
    clip: open_clip.CLIP,
    tokenizer,
    train_pool: ImagePool,
    eval_pool: ImagePool,
    settings: PretrainSettings,
) -> dict[str, float]:
    """Train `clip` in place; returns held-out garment mAP and accuracy with plain
    "a photo of a {}." prompts."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    scorer = StillScorer(clip, tokenizer)
    optimizer = torch.optim.AdamW(
        clip.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, settings.warmup_steps, settings.steps)
    )
    clip.train()
    started = time.perf_counter()
    for step in range(settings.steps):
        images, classes = render_stills(rng, train_pool, settings.batch_size)
        loss = F.cross_entropy(scorer.logits(images, captions(rng)), classes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % 50 == 0 or step + 1 == settings.steps:
            logger.info(
                "step %d/%d loss %.4f (%.0f images/s)",
                step + 1,
                settings.steps,
                loss.item(),
                (step + 1) * settings.batch_size / (time.perf_counter() - started),
            )
    clip.eval()
    return evaluate_stills(scorer, eval_pool, settings)


@torch.no_grad()
def evaluate_stills(
    scorer: StillScorer, pool: ImagePool, settings: PretrainSettings
) -> dict[str, float]:
    rng = np.random.default_rng(settings.seed + 1)
    images, classes = render_stills(rng, pool, settings.eval_images)
    logits = scorer.logits(images, [CAPTION_TEMPLATES[0].format(g) for g in GARMENTS])
    targets = F.one_hot(classes, len(GARMENTS))
    return {
        "garment_map": mean_average_precision(logits, targets).value,
        "garment_accuracy": float((logits.argmax(dim=1) == classes).float().mean()),
    }


def save_clip_weights(clip: open_clip.CLIP, path: str | Path) -> Path:
    """The open_clip state dict as .safetensors (what `create_clip(pretrained=path)` reads)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: CLIP weights are written as .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(path))
    return path
