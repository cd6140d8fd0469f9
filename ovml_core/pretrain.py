"""Stage 0 of Moving Fashion, "web pre-training": a small CLIP learns image-text matching on
still pictures of garments of ALL classes, standing in for the pretrained CLIP that cannot be
downloaded here.

Each still shows one garment posed as in the clips (`ovml_core.moving_fashion.sample_still`).
Its caption names the garment and, like web alt-text, some of what the picture shows: where
the garment is ("on the left", "shifted down"), its size ("zoomed in") and its turn
("turned clockwise"). A pretrained CLIP knows such words; a text tower trained on garment
names alone maps "moving left" and "moving right" to the same point (cosine 1.00 measured),
and then no video encoder can tell them apart. Opposites differ in one word, so that word
("left", "down", "in") carries the meaning: with "up at the top" vs "down at the bottom" the
tower read "top" and "bottom" and kept "moving up" and "moving down" at one point. Stills
cannot show motion: the motion labels stay unseen as phrases, only their words are grounded.

The loss is CLIP's contrastive cross-entropy, both directions, over the batch's captions plus
one bare "a photo of a {garment}." per class. Captions repeat and are partial descriptions, so
each image's targets are every caption true of it (UniCL-style multi-positive targets). Both
towers train. The result is an open_clip state dict in .safetensors, which
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
from ovml_core.moving_fashion import CANVAS, GARMENTS, ImagePool, render, sample_still
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
# Phrases a still's pose makes true, in pairs of opposites (what `facts_of` reads off a pose).
FACT_PAIRS = (
    ("on the left", "on the right"),
    ("shifted up", "shifted down"),
    ("zoomed in", "zoomed out"),
    ("turned clockwise", "turned counterclockwise"),
)
EDGE = 18.0  # a centre this close to a canvas side (pixels of 48) is "on the left" etc.


@dataclass(frozen=True)
class PretrainSettings:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    eval_images: int = 500
    seed: int = 0


@dataclass(frozen=True)
class Caption:
    """A garment and some facts about its picture; true of a still with that garment and at
    least those facts."""

    garment: str
    facts: frozenset[str]
    text: str

    def describes(self, still: Caption) -> bool:
        return self.garment == still.garment and self.facts <= still.facts


def facts_of(pose: tuple[float, float, float, float]) -> frozenset[str]:
    """The FACT_PAIRS phrases true of a still with `pose` (centre x, y; degrees ccw; zoom)."""
    cx, cy, degrees, zoom = pose
    (left, right), (top, bottom), (zoom_in, zoom_out), (clockwise, counter) = FACT_PAIRS
    far = CANVAS - EDGE
    checks = {
        left: cx < EDGE,
        right: cx > far,
        top: cy < EDGE,
        bottom: cy > far,
        zoom_in: zoom >= 1.0,
        zoom_out: zoom <= 0.8,
        # Leaning, not upside down: past 90 degrees an upright garment turned one way looks
        # like an upside-down one turned the other way.
        counter: 20.0 <= degrees % 360 <= 90.0,
        clockwise: 270.0 <= degrees % 360 <= 340.0,
    }
    return frozenset(fact for fact, true in checks.items() if true)


def caption_for(rng: np.random.Generator, truth: Caption) -> Caption:
    """A caption of a still whose whole truth is `truth`: its garment and each true fact with
    probability 1/2, in random order, in a random template."""
    facts = [f for f in sorted(truth.facts) if rng.random() < 0.5]
    rng.shuffle(facts)
    subject = " ".join([truth.garment, *facts])
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return Caption(truth.garment, frozenset(facts), template.format(subject))


def class_captions() -> list[Caption]:
    """One bare caption per garment class (the zero-shot prompt), true of all its stills."""
    return [Caption(g, frozenset(), CAPTION_TEMPLATES[0].format(g)) for g in GARMENTS]


def render_stills(
    rng: np.random.Generator, pool: ImagePool, count: int
) -> tuple[torch.Tensor, list[Caption]]:
    """(uint8 images [count, H, W, 3], the whole truth of each: garment and facts)."""
    specs = [sample_still(rng, pool) for _ in range(count)]
    images = np.stack([render(spec, pool.images)[0] for spec in specs])
    truths = [
        Caption(s.tracks[0].garment, facts_of(s.tracks[0].poses[0]), s.tracks[0].garment)
        for s in specs
    ]
    return torch.from_numpy(images), truths


def batch_captions(
    rng: np.random.Generator, truths: list[Caption]
) -> tuple[list[Caption], torch.Tensor]:
    """The batch's distinct captions (one drawn per still, plus `class_captions`) and the
    [images, captions] 0/1 matrix of which caption is true of which still."""
    drawn = [caption_for(rng, t) for t in truths] + class_captions()
    unique = list({c.text: c for c in drawn}.values())
    truth = torch.tensor([[c.describes(t) for c in unique] for t in truths], dtype=torch.float32)
    return unique, truth


def multi_positive_loss(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive cross-entropy with every true pair a positive, weighted equally
    per row (image -> captions) and per column (caption -> images). A class caption whose
    garment is not in the batch has no positive image and no caption -> image term."""
    image_to_text = -(truth / truth.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    has_image = truth.sum(0) > 0
    column = truth[:, has_image] / truth[:, has_image].sum(0)
    text_to_image = -(column * logits[:, has_image].log_softmax(0)).sum(0).mean()
    return (image_to_text + text_to_image) / 2


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
    """Train `clip` in place; returns `evaluate_stills` on `eval_pool`."""
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
        images, truths = render_stills(rng, train_pool, settings.batch_size)
        texts, truth = batch_captions(rng, truths)
        loss = multi_positive_loss(scorer.logits(images, [c.text for c in texts]), truth)
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
    """Garment mAP and accuracy with the class captions, and for each pair of opposite facts
    how often "a photo of a {garment} {fact}." beats its opposite on stills showing one."""
    rng = np.random.default_rng(settings.seed + 1)
    images, truths = render_stills(rng, pool, settings.eval_images)
    classes = torch.tensor([GARMENTS.index(t.garment) for t in truths])
    logits = scorer.logits(images, [c.text for c in class_captions()])
    metrics = {
        "garment_map": mean_average_precision(logits, F.one_hot(classes, len(GARMENTS))).value,
        "garment_accuracy": float((logits.argmax(dim=1) == classes).float().mean()),
    }
    # Every "a photo of a {garment} {fact}." caption, scored against every still at once.
    facts = [fact for pair in FACT_PAIRS for fact in pair]
    texts = [CAPTION_TEMPLATES[0].format(f"{g} {fact}") for g in GARMENTS for fact in facts]
    fact_logits = scorer.logits(images, texts).view(len(truths), len(GARMENTS), len(facts))
    for pair in FACT_PAIRS:
        columns = [facts.index(fact) for fact in pair]
        shown = [(i, t) for i, t in enumerate(truths) if len(t.facts & set(pair)) == 1]
        right = sum(
            pair[int(fact_logits[i, GARMENTS.index(t.garment), columns].argmax())] in t.facts
            for i, t in shown
        )
        metrics[f"{pair[0]} vs {pair[1]}"] = right / max(1, len(shown))
    return metrics


def save_clip_weights(clip: open_clip.CLIP, path: str | Path) -> Path:
    """The open_clip state dict as .safetensors (what `create_clip(pretrained=path)` reads)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: CLIP weights are written as .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(path))
    return path
