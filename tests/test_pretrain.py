"""Stage 0: a few steps of still-image CLIP training, saved and loaded as pretrained weights."""

import numpy as np
import open_clip
import torch

from ovml_core.clip import create_clip
from ovml_core.moving_fashion import GARMENTS, ImagePool
from ovml_core.pretrain import (
    CAPTION_TEMPLATES,
    PretrainSettings,
    captions,
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
    images, classes = render_stills(np.random.default_rng(0), striped_pool(), 16)
    assert images.shape == (16, 48, 48, 3) and images.dtype == torch.uint8
    assert classes.min() >= 0 and classes.max() < len(GARMENTS)
    assert (images.flatten(1).amax(dim=1) > 100).all()  # every still shows its garment


def test_captions_name_every_garment_once():
    texts = captions(np.random.default_rng(0))
    assert len(texts) == len(GARMENTS)
    for text, garment in zip(texts, GARMENTS, strict=True):
        assert any(text == t.format(garment) for t in CAPTION_TEMPLATES)


def test_training_changes_weights_and_saved_file_loads_as_pretrained(tmp_path):
    torch.manual_seed(0)
    clip = create_clip(MODEL)
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    settings = PretrainSettings(steps=3, batch_size=8, warmup_steps=1, eval_images=20)
    metrics = pretrain_clip(
        clip, open_clip.get_tokenizer(MODEL), striped_pool(), striped_pool(), settings
    )
    assert 0.0 <= metrics["garment_map"] <= 1.0
    assert not torch.equal(before["visual.conv1.weight"], clip.state_dict()["visual.conv1.weight"])
    path = save_clip_weights(clip, tmp_path / "clip.safetensors")
    loaded = create_clip(MODEL, pretrained=str(path))
    for key, value in clip.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
