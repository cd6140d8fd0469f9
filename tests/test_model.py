"""OVMLModel: the method's invariants on the tiny config."""

import copy

import pytest
import torch

from ovml_core.attributes import LabelCache
from ovml_core.config import Config
from ovml_core.model import create_model
from ovml_core.text import LabelTooLongError
from tests.conftest import TINY_CONFIG

LABELS = ["surfing", "dog", "birthday party"]


def random_frames(batch=2, frames=4, size=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, frames, size, size, 3), dtype=torch.uint8, generator=g)


def model_with(**overrides):
    items = [f"model.{k}={v}" for k, v in overrides.items()]
    return create_model(Config.from_yaml(TINY_CONFIG, items).model)


def test_shapes_norms_and_probabilities(tiny_model):
    with torch.no_grad():
        v = tiny_model.encode_video(random_frames())
        t = tiny_model.encode_labels(LABELS)
        p = tiny_model.score(v, t)
    assert v.shape == (2, 64) and t.shape == (3, 64)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))
    assert p.shape == (2, 3) and bool(((p > 0) & (p < 1)).all())


def test_same_seed_builds_the_same_model(tiny_model, tiny_config):
    other = create_model(tiny_config.model)
    with torch.no_grad():
        torch.testing.assert_close(
            other.encode_labels(LABELS), tiny_model.encode_labels(LABELS), rtol=0, atol=0
        )


@pytest.mark.parametrize("temporal", ["divided", "neighbor"])
def test_temporal_branch_at_init_equals_frame_mean(temporal):
    frames = random_frames()
    with torch.no_grad():
        mean = model_with(temporal="none").encode_video(frames)
        branch = model_with(temporal=temporal).encode_video(frames)
    torch.testing.assert_close(branch, mean, atol=1e-5, rtol=0)


def test_wrong_frame_input_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="uint8"):
        tiny_model.encode_video(torch.zeros(1, 4, 32, 32, 3))
    with pytest.raises(ValueError, match="4 frames"):
        tiny_model.encode_video(random_frames(frames=3))


def test_prompt_mode_is_clip_reading_the_template():
    model = model_with(label_encoder="prompt")
    with torch.no_grad():
        got = model.encode_labels(["dog"])
        want = model.labels.text.encode_texts(["a video of dog."])
    torch.testing.assert_close(got, torch.nn.functional.normalize(want, dim=-1))


def test_soft_tokens_enter_clip_like_real_token_embeddings(tiny_model):
    """Soft tokens equal to the embeddings of 'red' give CLIP's features for 'red dog'."""
    text = tiny_model.labels.text
    red = text.tokenize(["red"])[0, 1:2]  # the token between SOS and EOS
    soft = text.token_embedding(red)[None]
    with torch.no_grad():
        spliced = text.encode_with_soft_tokens(soft, ["dog"])
        plain = text.encode_texts(["red dog"])
    torch.testing.assert_close(spliced, plain, atol=1e-5, rtol=0)


def test_label_too_long_for_the_context_is_named(tiny_model):
    with pytest.raises(LabelTooLongError, match="too long"):
        tiny_model.encode_labels(["word " * 80])


def test_gradients_reach_trainable_parts_only(tiny_config):
    model = create_model(tiny_config.model).train()
    v = model.encode_video(random_frames())
    t = model.encode_labels(LABELS)
    logits = model.logits(v, t)
    logits.square().sum().backward()
    soft = model.labels.soft
    reached = {
        "prefix": soft.prefix.grad,
        "prompting": next(soft.prompting.parameters()).grad,
        "scale": model.logit_scale.grad,
        "bias": model.logit_bias.grad,
    }
    for name, grad in reached.items():
        assert grad is not None and grad.abs().sum() > 0, name
    # Zero-initialised output projections: at step 0 only some branch tensors get gradient.
    temporal = list(model.visual.temporal_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in temporal)
    for name, p in model.labels.text.named_parameters():
        assert p.grad is None and not p.requires_grad, f"CLIP text {name} got a gradient"
    for name, p in soft.llm.named_parameters() if hasattr(soft.llm, "named_parameters") else []:
        assert p.grad is None, f"LLM {name} got a gradient"


def test_ids_come_from_the_generation_prefix_until_regenerate(tiny_config):
    model = create_model(tiny_config.model)
    soft = model.labels.soft
    first = soft.attribute_ids(LABELS)
    assert all(len(ids) == tiny_config.model.num_attributes for ids in first)
    with torch.no_grad():
        soft.prefix.add_(torch.randn_like(soft.prefix) * 5)
    assert soft.attribute_ids(LABELS) == first  # cached: the prefix change is not seen
    soft.refresh()  # forgets the ids, but they are generated from the unmoved generation prefix
    assert soft.attribute_ids(LABELS) == first
    soft.regenerate(LABELS[:2])  # the trained prefix becomes the generation prefix
    assert torch.equal(soft.generation_prefix, soft.prefix)
    assert soft.ids.missing(LABELS) == LABELS[2:]  # generated now, in one batch
    assert soft.attribute_ids(LABELS[:2]) == soft.generate_ids(LABELS[:2])


def test_label_cache_never_overwrites_stored_entries():
    cache = LabelCache()
    asked = []

    def generate(labels):
        asked.append(labels)
        return [f"new {label}" for label in labels]

    cache.stored["dog"] = "trained"
    assert cache.get(["dog", "cat", "cat"], generate) == ["trained", "new cat", "new cat"]
    assert asked == [["cat"]]  # once per distinct missing label
    with pytest.raises(ValueError, match="dog"):
        cache.add(["dog"], ["other"])
    cache.generated["dog"] = "other"  # even one slipped past `add`
    cache.store_generated()
    assert cache.stored == {"dog": "trained", "cat": "new cat"} and not cache.generated
    cache.clear()  # a refresh forgets generated entries only
    assert cache.stored == {"dog": "trained", "cat": "new cat"}
    cache.clear(stored=True)
    assert cache.missing(["dog", "cat"]) == ["dog", "cat"]


def test_text_mode_uses_llm_descriptions():
    model = model_with(label_encoder="text")
    descriptions = model.label_attributes(["dog"])
    assert isinstance(descriptions[0], str)
    with torch.no_grad():
        got = model.encode_labels(["dog"])
        prompt = model.labels.prompt_features(["dog"])
    assert got.shape == (1, 64)
    if descriptions[0].strip():  # a description changes the text CLIP reads
        assert not torch.allclose(got, torch.nn.functional.normalize(prompt, dim=-1))


def test_deepcopy_is_independent(tiny_model):
    clone = copy.deepcopy(tiny_model)
    with torch.no_grad():
        clone.logit_bias.add_(1.0)
    assert clone.logit_bias.item() == tiny_model.logit_bias.item() + 1.0
