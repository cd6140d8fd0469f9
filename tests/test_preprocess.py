"""frames_to_clip_input against open_clip's own (PIL) eval preprocessing."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import image_transform
from PIL import Image

from ovml_core.preprocess import frames_to_clip_input

MEAN, STD = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD


def photo_like_frames(b: int, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """uint8 [b, t, h, w, 3]: smooth structure plus noise, with saturated highlights."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b * t, 3, h // 8 + 2, w // 8 + 2, generator=g) * 320 - 30
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    noisy = smooth + torch.randn(smooth.shape, generator=g) * 20
    return noisy.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).reshape(b, t, h, w, 3)


def open_clip_reference(frames: torch.Tensor, size: int) -> torch.Tensor:
    transform = image_transform(size, is_train=False, mean=MEAN, std=STD)
    b, t = frames.shape[:2]
    images = [Image.fromarray(f.numpy()) for f in frames.reshape(b * t, *frames.shape[2:])]
    return torch.stack([transform(im) for im in images]).reshape(b, t, 3, size, size)


def test_matches_open_clip_exactly_without_resize():
    frames = photo_like_frames(2, 3, 32, 32)
    out = frames_to_clip_input(frames, 32, MEAN, STD)
    assert out.shape == (2, 3, 3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, open_clip_reference(frames, 32), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("h", "w", "size"),
    [(240, 320, 224), (360, 640, 224), (270, 480, 32), (100, 80, 224), (48, 48, 32)],
)
def test_matches_open_clip_within_one_level_when_resizing(h, w, size):
    """Tolerance: one uint8 level on a few pixels. PIL resamples in fixed point (22-bit
    coefficients) and rounds to uint8 between its width and height passes; torch's antialiased
    bicubic (same a=-0.5 kernel and support as PIL) is float, rounded here at the same points,
    so only rounding ties of PIL's fixed-point sums differ."""
    frames = photo_like_frames(1, 2, h, w, seed=h + w)
    out = frames_to_clip_input(frames, size, MEAN, STD)
    reference = open_clip_reference(frames, size)
    levels = (out - reference).abs() * torch.tensor(STD).view(1, 1, 3, 1, 1) * 255
    assert levels.max() <= 1 + 1e-3
    assert (levels > 0.5).float().mean() < 0.01


def test_resize_keeps_centre_and_aspect():
    """A wide frame: the shorter side becomes `size`, the crop is the centre."""
    frames = torch.zeros(1, 1, 64, 192, 3, dtype=torch.uint8)
    frames[:, :, :, 48:144] = 255  # white around the centre third, black at the sides
    out = frames_to_clip_input(frames, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert torch.equal(out, torch.ones(1, 1, 3, 32, 32))


def test_bad_input_is_rejected():
    frames = torch.zeros(1, 2, 8, 8, 3, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8 torch.Tensor"):
        frames_to_clip_input(frames.float(), 8, MEAN, STD)
    with pytest.raises(TypeError, match="uint8 torch.Tensor"):
        frames_to_clip_input(np.zeros((1, 2, 8, 8, 3), np.uint8), 8, MEAN, STD)
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
        frames_to_clip_input(frames[0], 8, MEAN, STD)
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
        frames_to_clip_input(frames.permute(0, 1, 4, 2, 3), 8, MEAN, STD)
    with pytest.raises(ValueError, match="3 channel values"):
        frames_to_clip_input(frames, 8, (0.5,), STD)
