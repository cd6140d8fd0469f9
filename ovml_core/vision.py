"""Video encoder: an open_clip ViT run on every frame, with an optional temporal branch.

Frames go through the ViT as one [B*T] batch, using the CLIP modules and weights as they are.
`temporal` picks how frames see each other inside the selected blocks:

- `none`: they don't; the video feature is the mean of per-frame CLIP features.
- `divided` (TimeSformer-style divided space-time attention): before a block's spatial
  attention, each token (CLS and every patch position) attends over the T frames at its own
  position; pre-LN, residual. Its output projection and temporal position embedding start at
  zero, so at step 0 the block, and the model, is exactly frame-mean CLIP.
- `neighbor` (Open-VCLIP): a frame's spatial attention also reads the keys/values of frames
  t-1 and t+1 (where they exist). Open-VCLIP starts fine-tuning from that changed attention;
  here a per-block scalar gate g, zero-initialised, mixes  own + g * (neighbor - own),  where
  `own` is CLIP's per-frame attention and `neighbor` the Open-VCLIP attention over all three
  frames. g=0 is exactly frame-mean CLIP, g=1 exactly Open-VCLIP, and the gradient wrt g is
  nonzero at 0, so training opens the gate. The projections are CLIP's own (no new weights).
  The t-1/t/t+1 window is symmetric in time, so this branch, like `none`, gives a clip and
  its time reversal the same feature (up to rounding): it cannot learn left vs right motion.
  `divided` can, through its temporal position embedding.

The output is the mean over frames of the projected pooled feature, [B, D], not normalised.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

TEMPORAL_MODES = ("none", "divided", "neighbor")


class DividedTemporalAttention(nn.Module):
    """Self-attention across frames at each token position, added residually to the tokens."""

    def __init__(self, width: int, heads: int, num_frames: int):
        super().__init__()
        self.num_frames = num_frames
        self.ln = nn.LayerNorm(width)
        self.position = nn.Parameter(torch.zeros(num_frames, width))
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        # Zero output projection: the branch adds exactly nothing until it has been trained.
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, block: nn.Module, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x [B*T, N, W] -> the block's output after temporal attention, [B*T, N, W]."""
        if num_frames != self.num_frames:
            raise ValueError(
                f"the divided temporal branch was built for {self.num_frames} frames, "
                f"got {num_frames}"
            )
        bt, n, width = x.shape
        # [B*T, N, W] -> [B*N, T, W]: one sequence over time per video and token position.
        seq = x.view(bt // num_frames, num_frames, n, width).transpose(1, 2)
        seq = seq.reshape(-1, num_frames, width)
        h = self.ln(seq) + self.position.to(seq.dtype)
        update = self.attn(h, h, h, need_weights=False)[0]
        update = update.view(bt // num_frames, n, num_frames, width).transpose(1, 2)
        return block(x + update.reshape(bt, n, width))


class NeighborFrameAttention(nn.Module):
    """Runs a CLIP block whose spatial attention may also read frames t-1 and t+1 (gated)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(
        self, block: ResidualAttentionBlock, x: torch.Tensor, num_frames: int
    ) -> torch.Tensor:
        """x [B*T, N, W] -> the block's output, [B*T, N, W]; the block's own submodules."""
        x = x + block.ls_1(self._attention(block.attn, block.ln_1(x), num_frames))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def _attention(self, attn: nn.MultiheadAttention, h: torch.Tensor, t: int) -> torch.Tensor:
        bt, n, width = h.shape
        heads = attn.num_heads
        # q, k, v with the block's own projection, computed once per frame: [B*T, heads, N, hd].
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = (z.view(bt, n, heads, width // heads).transpose(1, 2) for z in qkv.chunk(3, -1))
        own = F.scaled_dot_product_attention(q, k, v)
        mask = _neighbor_key_mask(t, n, h.device).repeat(bt // t, 1, 1, 1)
        k_all, v_all = self._with_neighbors(k, t), self._with_neighbors(v, t)
        neighbor = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        mixed = own + self.gate.to(own.dtype) * (neighbor - own)
        return attn.out_proj(mixed.transpose(1, 2).reshape(bt, n, width))

    @staticmethod
    def _with_neighbors(z: torch.Tensor, t: int) -> torch.Tensor:
        """[B*T, heads, N, hd] -> [B*T, heads, 3N, hd]: frames t-1, t, t+1 (zeros off the ends)."""
        video = z.unflatten(0, (-1, t))
        pad = torch.zeros_like(video[:, :1])
        previous = torch.cat([pad, video[:, :-1]], dim=1)
        following = torch.cat([video[:, 1:], pad], dim=1)
        return torch.cat([previous, video, following], dim=3).flatten(0, 1)


def _neighbor_key_mask(t: int, n: int, device: torch.device) -> torch.Tensor:
    """[T, 1, 1, 3N] bool, True where frame t's neighbor keys exist (the ends have one side)."""
    frame = torch.arange(t, device=device).view(t, 1)
    has_previous = (frame > 0).expand(t, n)
    has_following = (frame < t - 1).expand(t, n)
    own = torch.ones(t, n, dtype=torch.bool, device=device)
    return torch.cat([has_previous, own, has_following], dim=1).view(t, 1, 1, 3 * n)


class VideoEncoder(nn.Module):
    """open_clip VisionTransformer over frames [B, T, 3, S, S] -> video features [B, D]."""

    def __init__(
        self,
        visual: VisionTransformer,
        temporal: str = "none",
        *,
        num_frames: int,
        blocks: list[int] | None = None,
    ):
        super().__init__()
        if temporal not in TEMPORAL_MODES:
            raise ValueError(f"temporal must be one of {TEMPORAL_MODES}, got {temporal!r}")
        _check_visual(visual, temporal)
        layers = len(visual.transformer.resblocks)
        indices = list(range(layers)) if blocks is None else list(blocks)
        bad = [i for i in indices if not 0 <= i < layers]
        if bad or len(set(indices)) != len(indices):
            raise ValueError(
                f"temporal blocks {indices} must be distinct indices in [0, {layers - 1}]"
            )
        self.visual = visual
        self.temporal = temporal
        self.num_frames = num_frames
        self.branches = nn.ModuleDict()
        if temporal != "none":
            width = visual.transformer.width
            for i in sorted(indices):
                heads = visual.transformer.resblocks[i].attn.num_heads
                self.branches[str(i)] = (
                    DividedTemporalAttention(width, heads, num_frames)
                    if temporal == "divided"
                    else NeighborFrameAttention()
                )

    def temporal_parameters(self) -> Iterator[nn.Parameter]:
        """The temporal branch's own parameters (empty for `none`)."""
        return self.branches.parameters()

    def clip_parameters(self) -> Iterator[nn.Parameter]:
        """The pretrained CLIP vision tower's parameters."""
        return self.visual.parameters()

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be [B, T, 3, S, S], got {tuple(frames.shape)}")
        b, t = frames.shape[:2]
        # open_clip's own embedding and pooling, so per-frame features equal encode_image.
        x = self.visual._embeds(frames.flatten(0, 1).to(self.visual.conv1.weight.dtype))
        for i, block in enumerate(self.visual.transformer.resblocks):
            key = str(i)
            x = self.branches[key](block, x, t) if key in self.branches else block(x)
        pooled = self.visual._pool(x)[0]
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        # Summed in sorted order: float addition is not associative, and this way the frame
        # mean is bitwise independent of frame order (exactly order-free for `none`).
        return pooled.view(b, t, -1).sort(dim=1).values.mean(dim=1)


def _check_visual(visual: nn.Module, temporal: str) -> None:
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"VideoEncoder needs an open_clip VisionTransformer, got {type(visual)}")
    if not visual.transformer.batch_first:
        raise ValueError("VideoEncoder needs a batch-first open_clip transformer")
    if temporal == "divided" and not isinstance(visual.patch_dropout, nn.Identity):
        # Patch dropout keeps different patches per frame: no shared positions across time.
        raise ValueError("temporal='divided' needs patch_dropout disabled")
    if temporal == "neighbor":
        for block in visual.transformer.resblocks:
            if type(block) is not ResidualAttentionBlock:
                raise TypeError(f"temporal='neighbor' needs ResidualAttentionBlock, got {block}")
