"""VideoEncoder on the tiny CLIP: frame-mean at init, order (in)sensitivity, training signal."""

import pytest
import torch
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from ovml_core.clip import create_clip
from ovml_core.preprocess import frames_to_clip_input
from ovml_core.vision import VideoEncoder

T = 4
SIZE = 32
LR = 3e-2


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return create_clip("ovml-tiny").eval()


@pytest.fixture(scope="module")
def frames():
    return torch.randn(3, T, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def frame_mean_clip(clip, frames):
    b, t = frames.shape[:2]
    return clip.encode_image(frames.flatten(0, 1)).view(b, t, -1).mean(dim=1)


@pytest.mark.parametrize("temporal", ["none", "divided", "neighbor"])
def test_equals_frame_mean_clip_at_init(clip, frames, temporal):
    encoder = VideoEncoder(clip.visual, temporal, num_frames=T)
    with torch.no_grad():
        video = encoder(frames)
        expected = frame_mean_clip(clip, frames)
    assert video.shape == (3, clip.visual.output_dim)
    torch.testing.assert_close(video, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temporal", ["divided", "neighbor"])
def test_trained_branch_departs_from_frame_mean(clip, frames, temporal):
    """The init equality above must come from the zero init, not from a branch that is inert."""
    encoder = VideoEncoder(clip.visual, temporal, num_frames=T)
    with torch.no_grad():
        for p in encoder.temporal_parameters():
            p.normal_(std=0.5)
        assert (encoder(frames) - frame_mean_clip(clip, frames)).abs().max() > 1e-3


def test_none_is_exactly_frame_order_invariant(clip, frames):
    encoder = VideoEncoder(clip.visual, "none", num_frames=T)
    with torch.no_grad():
        video = encoder(frames)
        for seed in range(3):
            order = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(encoder(frames[:, order]), video)


def test_temporal_blocks_subset(clip):
    divided = VideoEncoder(clip.visual, "divided", num_frames=T, blocks=[1, 3])
    assert sorted(divided.branches) == ["1", "3"]
    neighbor = VideoEncoder(clip.visual, "neighbor", num_frames=T, blocks=[2])
    assert list(neighbor.branches) == ["2"] and len(list(neighbor.temporal_parameters())) == 1
    assert len(list(VideoEncoder(clip.visual, "none", num_frames=T).temporal_parameters())) == 0
    every = VideoEncoder(clip.visual, "divided", num_frames=T)
    assert sorted(every.branches) == ["0", "1", "2", "3"]
    # The branch's parameters are separate from CLIP's, for their own optimiser group.
    clip_ids = {id(p) for p in divided.clip_parameters()}
    assert not clip_ids & {id(p) for p in divided.temporal_parameters()}
    assert clip_ids | {id(p) for p in divided.temporal_parameters()} == {
        id(p) for p in divided.parameters()
    }


@pytest.mark.parametrize("blocks", [[4], [-1], [1, 1]])
def test_bad_temporal_blocks_rejected(clip, blocks):
    with pytest.raises(ValueError, match="temporal blocks"):
        VideoEncoder(clip.visual, "divided", num_frames=T, blocks=blocks)


def test_bad_input_rejected(clip, frames):
    with pytest.raises(ValueError, match="temporal must be one of"):
        VideoEncoder(clip.visual, "timesformer", num_frames=T)
    with pytest.raises(ValueError, match=r"\[B, T, 3, S, S\]"):
        VideoEncoder(clip.visual, "none", num_frames=T)(frames[0])
    with pytest.raises(ValueError, match="built for 4 frames"):
        VideoEncoder(clip.visual, "divided", num_frames=T)(frames[:, :3])


@pytest.mark.parametrize("temporal", ["divided", "neighbor"])
def test_gradients_reach_temporal_parameters(clip, frames, temporal):
    encoder = VideoEncoder(clip.visual, temporal, num_frames=T, blocks=[0, 2])
    encoder.zero_grad()
    # Two steps: at step 0 the divided position embedding sits behind a zero projection.
    optimizer = torch.optim.SGD(encoder.temporal_parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        encoder(frames).pow(2).sum().backward()
        optimizer.step()
    for name, p in encoder.branches.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    encoder.zero_grad()


def moving_square_videos(n: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 [n, T, 32, 32, 3]: a bright 16x16 square moving right; flip time to move left."""
    videos = torch.randint(0, 40, (n, T, SIZE, SIZE, 3), generator=generator, dtype=torch.uint8)
    rows = torch.randint(0, SIZE - 16 + 1, (n,), generator=generator)
    for i in range(n):
        for t in range(T):
            row, col = int(rows[i]), t * 5
            videos[i, t, row : row + 16, col : col + 16] = 255
    return videos


def train_direction_scorer(clip, temporal: str, seed: int = 0, steps: int = 25):
    """Train the temporal branch and a linear score to rank right-moving videos above their time
    reversals (pairwise logistic loss); CLIP frozen. Returns held-out scores of both."""
    torch.manual_seed(seed)
    # The last blocks: there CLS tokens already differ per frame, so order is learnt quickly.
    encoder = VideoEncoder(clip.visual, temporal, num_frames=T, blocks=[2, 3])
    score = torch.nn.Linear(clip.visual.output_dim, 1, bias=False)
    params = list(encoder.temporal_parameters()) + list(score.parameters())
    optimizer = torch.optim.Adam(params, lr=LR)
    generator = torch.Generator().manual_seed(seed)

    def scores(videos):
        x = frames_to_clip_input(videos, SIZE, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
        return score(encoder(x)).squeeze(-1)

    for _ in range(steps):
        right = moving_square_videos(8, generator)
        loss = F.softplus(scores(right.flip(1)) - scores(right)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_out = moving_square_videos(32, torch.Generator().manual_seed(1000 + seed))
    with torch.no_grad():
        return scores(held_out), scores(held_out.flip(1))


def test_divided_learns_direction_that_frame_mean_cannot_see(clip):
    clip.requires_grad_(False)
    try:
        right, left = train_direction_scorer(clip, "divided")
        assert (right > left).all(), f"right > left on {(right > left).float().mean():.0%}"
        right, left = train_direction_scorer(clip, "none")
        assert torch.equal(right, left)  # time reversal is invisible to a frame mean
    finally:
        clip.requires_grad_(True)


def test_neighbor_attention_is_blind_to_time_reversal(clip, frames):
    """Open-VCLIP's t-1/t/t+1 window is symmetric in time: it sees frame order, not direction."""
    encoder = VideoEncoder(clip.visual, "neighbor", num_frames=T)
    with torch.no_grad():
        for branch in encoder.branches.values():
            branch.gate.fill_(1.0)
        video = encoder(frames)
        torch.testing.assert_close(encoder(frames.flip(1)), video, atol=1e-5, rtol=0)
        shuffled = encoder(frames[:, [1, 3, 0, 2]])
        assert (shuffled - video).abs().max() > 1e-3
