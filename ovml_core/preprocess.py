"""Video frames -> CLIP input tensors with torch ops only (any device, no PIL).

Mirrors open_clip's eval transform (Resize shorter side, bicubic; CenterCrop; ToTensor;
Normalize) so that frames are seen the way the CLIP weights were trained to see images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def frames_to_clip_input(
    frames: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 frames [B, T, H, W, 3] -> normalised float32 [B, T, 3, size, size].

    The shorter side is resized to `size` (bicubic, antialiased, rounded to uint8 levels as
    PIL does), then the centre `size` x `size` is cropped, scaled to [0, 1] and normalised.
    Frames already `size` x `size` are not resampled, and then match open_clip exactly.
    """
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8:
        raise TypeError(f"frames must be a uint8 torch.Tensor, got {_describe(frames)}")
    if frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [B, T, H, W, 3], got shape {tuple(frames.shape)}")
    if min(frames.shape[2:4]) == 0 or size <= 0:
        raise ValueError(f"cannot crop {size}x{size} from frames {tuple(frames.shape)}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 channel values, got {mean!r} and {std!r}")
    b, t, h, w, _ = frames.shape
    x = frames.reshape(b * t, h, w, 3).permute(0, 3, 1, 2).float()
    resized_h, resized_w = _shorter_side_to(h, w, size)
    # Like PIL: width pass, then height pass, each rounded to uint8 levels in between.
    if resized_w != w:
        x = _resize_uint8_levels(x, (h, resized_w))
    if resized_h != h:
        x = _resize_uint8_levels(x, (resized_h, resized_w))
    top = int(round((resized_h - size) / 2.0))
    left = int(round((resized_w - size) / 2.0))
    x = x[:, :, top : top + size, left : left + size]
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = x.div_(255).sub_(mean_t).div_(std_t)
    return x.reshape(b, t, 3, size, size)


def _resize_uint8_levels(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    return x.clamp_(0, 255).round_()


def _shorter_side_to(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) with the shorter side `size`, the longer truncated as torchvision's Resize does."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def _describe(x: object) -> str:
    return f"{x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
