"""Stage 0: a few steps of still-image CLIP training, saved and loaded as pretrained weights."""

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from ovml_core.clip import create_clip
from ovml_core.moving_fashion import GARMENTS, ImagePool
from ovml_core.pretrain import (
    FACT_PAIRS,
    Caption,
    PretrainSettings,
    batch_captions,
    caption_for,
    class_captions,
    facts_of,
    multi_positive_loss,
    pretrain_clip,
    render_stills,
    save_clip_weights,
)

MODEL = "ovml-fashion"


def striped_pool() -> ImagePool:
    """Ten easily told apart 'garments': class c is a bar at row 2 + 2c."""
    images = np.zeros((10, 28, 28), np.uint8)
    for c in range(10):
        images[c, 2 + 2 * c : 4 + 2 * c, 4:24] = 255
    return ImagePool.of(images, np.arange(10))


def test_stills_show_one_garment_of_its_class():
    images, truths = render_stills(np.random.default_rng(0), striped_pool(), 16)
    assert images.shape == (16, 48, 48, 3) and images.dtype == torch.uint8
    assert all(t.garment in GARMENTS for t in truths)
    assert (images.flatten(1).amax(dim=1) > 100).all()  # every still shows its garment


def test_facts_read_off_the_pose():
    assert facts_of((10.0, 40.0, 90.0, 1.1)) == {
        "on the left",
        "shifted down",
        "zoomed in",
        "turned counterclockwise",
    }
    assert facts_of((40.0, 10.0, 270.0, 0.7)) == {
        "on the right",
        "shifted up",
        "zoomed out",
        "turned clockwise",
    }
    assert facts_of((24.0, 24.0, 0.0, 0.9)) == set()  # centred, mid-size, upright


def test_each_caption_is_true_of_its_still_and_says_only_true_facts():
    rng = np.random.default_rng(0)
    truth = Caption("coat", facts_of((10.0, 10.0, 300.0, 1.1)), "coat")
    drawn = [caption_for(rng, truth) for _ in range(200)]
    assert all(c.describes(truth) and c.garment in c.text for c in drawn)
    assert all(f in c.text for c in drawn for f in c.facts)
    # Every fact is sometimes said and sometimes left out: partial descriptions, as on the web.
    for fact in truth.facts:
        said = sum(fact in c.facts for c in drawn)
        assert 50 < said < 150, fact
    opposite = {b if a in truth.facts else a for a, b in FACT_PAIRS}
    assert not any(f in c.text for c in drawn for f in opposite - truth.facts)


def test_batch_truth_matrix_marks_every_caption_true_of_a_still():
    rng = np.random.default_rng(1)
    _, truths = render_stills(rng, striped_pool(), 12)
    texts, truth = batch_captions(rng, truths)
    assert len({c.text for c in texts}) == len(texts) == truth.shape[1]
    assert truth.shape[0] == 12 and (truth.sum(1) >= 2).all()  # its own + its class caption
    for i, still in enumerate(truths):
        for j, caption in enumerate(texts):
            assert truth[i, j] == float(caption.describes(still))
    bare = {c.text for c in class_captions()}
    assert bare <= {c.text for c in texts}


def test_multi_positive_loss_is_clip_loss_with_one_positive_each_and_finite_without_one():
    torch.manual_seed(0)
    logits = torch.randn(5, 5)
    clip_loss = (
        F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))
    ) / 2
    assert torch.allclose(multi_positive_loss(logits, torch.eye(5)), clip_loss)
    # A caption true of no image in the batch (a class caption) adds to the softmax only.
    truth = torch.cat([torch.eye(5), torch.zeros(5, 1)], dim=1)
    loss = multi_positive_loss(torch.randn(5, 6), truth)
    assert torch.isfinite(loss)


def test_training_changes_weights_and_saved_file_loads_as_pretrained(tmp_path):
    torch.manual_seed(0)
    clip = create_clip(MODEL)
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    settings = PretrainSettings(steps=3, batch_size=8, warmup_steps=1, eval_images=20)
    metrics = pretrain_clip(
        clip, open_clip.get_tokenizer(MODEL), striped_pool(), striped_pool(), settings
    )
    assert 0.0 <= metrics["garment_map"] <= 1.0
    assert all(0.0 <= metrics[f"{a} vs {b}"] <= 1.0 for a, b in FACT_PAIRS)
    assert not torch.equal(before["visual.conv1.weight"], clip.state_dict()["visual.conv1.weight"])
    path = save_clip_weights(clip, tmp_path / "clip.safetensors")
    loaded = create_clip(MODEL, pretrained=str(path))
    for key, value in clip.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
