"""The frozen LLM wrapper: loading, freezing, greedy ids, teacher-forced hidden states, GGUF cache."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ovml_core.llm import FrozenLLM, load_llm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "surfing",
    "Describe what a video of this looks like: a birthday party with many guests and a cake",
    "Describe what a video of this looks like: dog",
]


def weights_digest(llm: FrozenLLM) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(llm.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def tiny() -> FrozenLLM:
    return load_llm("tiny-llama")


@pytest.fixture
def prefix(tiny) -> torch.Tensor:
    # Real token embeddings plus noise: what a learned prefix looks like early in training.
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([504, 3365, 282, 451])
    noise = torch.randn(len(ids), tiny.hidden_size, generator=generator)
    return tiny.embed_tokens(ids).detach() + noise


def test_tiny_llama_is_frozen_and_reproducible(tiny):
    rng_before = torch.random.get_rng_state()
    again = load_llm("tiny-llama")
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    assert weights_digest(again) == weights_digest(tiny)
    assert tiny.identifier == "tiny-llama"
    assert tiny.hidden_size == 128
    assert len(tiny.tokenizer) == tiny.model.config.vocab_size == 49152
    assert all(not p.requires_grad for p in tiny.parameters())
    assert not tiny.model.training
    nn.Sequential(again).train()  # a parent switching to training leaves the LLM in eval
    assert not again.training and not again.model.training


def test_tiny_llama_has_the_same_weights_in_another_process(tiny):
    script = (
        "from ovml_core.llm import load_llm; from tests.test_llm import weights_digest; "
        "print(weights_digest(load_llm('tiny-llama')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert out.stdout.strip().splitlines()[-1] == weights_digest(tiny)


def test_embed_tokens_is_the_input_embedding(tiny):
    ids = torch.tensor([[1, 2, 3]])
    weight = tiny.model.get_input_embeddings().weight
    assert torch.equal(tiny.embed_tokens(ids), weight[ids])


def test_greedy_ids_batched_equal_one_at_a_time(tiny, prefix):
    lengths = {len(ids) for ids in tiny.prompt_ids(PROMPTS)}
    assert len(lengths) == len(PROMPTS)  # different lengths: the batch is left-padded
    batched = tiny.generate_attribute_ids(prefix, PROMPTS, max_new_tokens=6)
    alone = [tiny.generate_attribute_ids(prefix, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(ids) == 6 for ids in batched)
    assert len({tuple(ids) for ids in batched}) > 1  # the prompts really steer generation


def test_generation_without_prefix_matches_generate_text(tiny):
    no_prefix = torch.zeros(0, tiny.hidden_size)
    ids = tiny.generate_attribute_ids(no_prefix, PROMPTS[:2], max_new_tokens=5)
    texts = tiny.generate_text(PROMPTS[:2], max_new_tokens=5)
    assert texts == [tiny.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def test_hidden_states_shape_and_gradient_reaches_only_the_prefix(tiny, prefix):
    ids = tiny.generate_attribute_ids(prefix, PROMPTS, max_new_tokens=5)
    learned = nn.Parameter(prefix.clone())
    hidden = tiny.generated_hidden_states(learned, PROMPTS, ids)
    assert hidden.shape == (len(PROMPTS), 5, tiny.hidden_size)
    hidden.square().mean().backward()
    assert learned.grad is not None and learned.grad.abs().sum() > 0
    assert [name for name, p in tiny.named_parameters() if p.grad is not None] == []


def test_hidden_states_are_the_states_generation_decoded_from(tiny, prefix):
    """Teacher forcing sees exactly what greedy decoding saw: the LM head on the state at
    generated position i picks generated token i + 1."""
    ids = tiny.generate_attribute_ids(prefix, PROMPTS, max_new_tokens=6)
    with torch.no_grad():
        hidden = tiny.generated_hidden_states(prefix, PROMPTS, ids)
        picked = tiny.model.get_output_embeddings()(hidden).argmax(-1)
    assert picked[:, :-1].tolist() == [row[1:] for row in ids]


def test_hidden_states_do_not_depend_on_batch_padding(tiny, prefix):
    ids = tiny.generate_attribute_ids(prefix, PROMPTS, max_new_tokens=4)
    with torch.no_grad():
        batched = tiny.generated_hidden_states(prefix, PROMPTS, ids)
        alone = [
            tiny.generated_hidden_states(prefix, [p], [i])
            for p, i in zip(PROMPTS, ids, strict=True)
        ]
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=1e-4)


def test_changing_the_prefix_changes_the_hidden_states(tiny, prefix):
    ids = tiny.generate_attribute_ids(prefix, PROMPTS, max_new_tokens=4)
    with torch.no_grad():
        base = tiny.generated_hidden_states(prefix, PROMPTS, ids)
        same = tiny.generated_hidden_states(prefix.clone(), PROMPTS, ids)
        moved = tiny.generated_hidden_states(prefix + 0.5, PROMPTS, ids)
    assert torch.equal(base, same)
    assert (base - moved).abs().max() > 1e-3


def test_hidden_states_reject_mismatched_inputs(tiny, prefix):
    with pytest.raises(ValueError, match="share one non-zero length"):
        tiny.generated_hidden_states(prefix, PROMPTS[:2], [[1, 2], [3]])
    with pytest.raises(ValueError, match="2 prompts but 1 id lists"):
        tiny.generated_hidden_states(prefix, PROMPTS[:2], [[1, 2]])
    with pytest.raises(ValueError, match=r"prefix must be \[P, 128\]"):
        tiny.generate_attribute_ids(torch.zeros(4, 64), PROMPTS[:1], 3)


def _reference_ids(llm: FrozenLLM, prefix, prompts, max_new_tokens) -> list[list[int]]:
    """Greedy decoding the plain way: one prompt at a time, the whole sequence recomputed for
    every token, no cache, no padding."""
    rows = []
    for ids in llm.prompt_ids(prompts):
        new: list[int] = []
        for _ in range(max_new_tokens):
            if any(t in llm.stop_ids for t in new):
                new.append(llm.stop_ids[0])
                continue
            x = torch.cat([prefix, llm.embed_tokens(torch.tensor(ids + new))])
            new.append(int(llm.model(inputs_embeds=x[None]).logits[0, -1].argmax()))
        rows.append(new)
    return rows


def _reference_hidden(llm: FrozenLLM, prefix, prompts, generated) -> torch.Tensor:
    """Last-layer states at the generated positions, one full sequence at a time."""
    states = []
    for ids, gen in zip(llm.prompt_ids(prompts), generated, strict=True):
        x = torch.cat([prefix, llm.embed_tokens(torch.tensor(ids + gen))])
        states.append(llm.model.base_model(inputs_embeds=x[None]).last_hidden_state[0, -len(gen) :])
    return torch.stack(states)


def test_shared_head_path_equals_the_plain_computation(tiny, prefix):
    """Ids, hidden states, a loss on them and its gradient to the prefix are those of running
    every prompt alone and in full; a repeated prompt runs once, the shared head once."""
    prompts = [*PROMPTS, PROMPTS[2]]
    with torch.inference_mode():
        expected_ids = _reference_ids(tiny, prefix, prompts, 6)
    assert tiny.generate_attribute_ids(prefix, prompts, 6) == expected_ids
    assert len({tuple(ids) for ids in expected_ids}) > 1

    weights = torch.randn(
        len(prompts), 6, tiny.hidden_size, generator=torch.Generator().manual_seed(1)
    )
    shapes = []
    hook = tiny.model.base_model.layers[0].register_forward_pre_hook(
        lambda _, args, kwargs: shapes.append(
            tuple((args or [kwargs["hidden_states"]])[0].shape[:2])
        ),
        with_kwargs=True,
    )
    try:
        learned = nn.Parameter(prefix.clone())
        hidden = tiny.generated_hidden_states(learned, prompts, expected_ids)
    finally:
        hook.remove()
    reference_prefix = nn.Parameter(prefix.clone())
    reference = _reference_hidden(tiny, reference_prefix, prompts, expected_ids)
    torch.testing.assert_close(hidden, reference, atol=1e-5, rtol=1e-4)
    loss, reference_loss = (hidden * weights).sum(), (reference * weights).sum()
    torch.testing.assert_close(loss, reference_loss, atol=1e-4, rtol=1e-5)
    loss.backward()
    reference_loss.backward()
    torch.testing.assert_close(learned.grad, reference_prefix.grad, atol=1e-5, rtol=1e-4)
    # The head as one row, then the 3 distinct tails; head + tail = the longest full row.
    full = max(len(p) + 6 for p in tiny.prompt_ids(prompts)) + len(prefix)
    (head, tails) = shapes
    assert head[0] == 1 and tails[0] == 3 and head[1] + tails[1] == full
    assert head[1] > len(prefix)  # the chat template's tokens are shared too


def test_local_folder_loads_the_same_model(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path, safe_serialization=True)
    tiny.tokenizer.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin"))  # safetensors only
    folder = load_llm(str(tmp_path))
    assert folder.identifier == str(tmp_path.resolve())
    assert weights_digest(folder) == weights_digest(tiny)
    no_prefix = torch.zeros(0, tiny.hidden_size)
    assert folder.generate_attribute_ids(no_prefix, PROMPTS, 4) == tiny.generate_attribute_ids(
        no_prefix, PROMPTS, 4
    )


def test_bad_specs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown LLM spec 'no such model'"):
        load_llm("no such model")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_llm(str(tmp_path / "missing.gguf"))
    with pytest.raises(OSError, match="not a local folder and could not be loaded"):
        load_llm("ovml-test/no-such-llm")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2 loaded twice from a fresh cache: the first load converts the GGUF, the second
    must reuse the cached safetensors folder."""
    cache = tmp_path_factory.mktemp("ovml-cache")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OVML_CACHE", str(cache))
        start = time.perf_counter()
        load_llm("smollm2")
        converting_s = time.perf_counter() - start
        (folder,) = [p for p in (cache / "llm").iterdir() if not p.name.endswith("-tokenizer")]
        weights = folder / "model.safetensors"
        written = weights.stat()
        start = time.perf_counter()
        llm = load_llm("smollm2")
        cached_s = time.perf_counter() - start
    return {
        "llm": llm,
        "converting_s": converting_s,
        "cached_s": cached_s,
        "weights": weights,
        "written": written,
    }


@pytest.mark.slow
def test_smollm2_gguf_is_converted_once_then_loaded_from_cache(smollm2):
    print(
        f"\nSmolLM2 load: converting {smollm2['converting_s']:.1f} s, "
        f"cached {smollm2['cached_s']:.1f} s"
    )
    again = smollm2["weights"].stat()
    assert (again.st_ino, again.st_mtime_ns) == (
        smollm2["written"].st_ino,
        smollm2["written"].st_mtime_ns,
    )
    assert smollm2["cached_s"] < smollm2["converting_s"] / 3
    llm = smollm2["llm"]
    assert llm.identifier.startswith("smollm2:") and len(llm.identifier) == len("smollm2:") + 12
    assert llm.hidden_size == 576
    assert not list(smollm2["weights"].parent.glob("*.bin"))


@pytest.mark.slow
def test_smollm2_writes_readable_descriptions(smollm2):
    llm = smollm2["llm"]
    labels = ["surfing", "birthday party", "playing guitar"]
    prompts = [
        f"Describe in one short sentence what a video of {label} looks like." for label in labels
    ]
    texts = llm.generate_text(prompts, max_new_tokens=16)
    for label, text in zip(labels, texts, strict=True):
        print(f"{label!r}: {text!r}")
    assert "surf" in texts[0].lower()
    assert all(sum(c.isalpha() or c.isspace() for c in t) > 0.8 * len(t) > 0 for t in texts)


@pytest.mark.slow
def test_smollm2_pads_after_eos(smollm2):
    llm = smollm2["llm"]
    no_prefix = torch.zeros(0, llm.hidden_size)
    (ids,) = llm.generate_attribute_ids(
        no_prefix, ["Answer with one word: what colour is snow?"], 12
    )
    eos = llm.tokenizer.eos_token_id
    assert len(ids) == 12 and eos in ids
    assert set(ids[ids.index(eos) :]) == {eos}
    assert llm.tokenizer.decode(ids, skip_special_tokens=True).strip()
