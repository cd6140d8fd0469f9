"""Label encoders: LLM soft attributes, and the two baselines (plain prompt, LLM-written text).

Soft attributes (the method): a frozen LLM reads `[P learned prefix vectors] + tokens(instruction
+ label)` and greedily writes M attribute tokens. One teacher-forced forward gives the hidden
states of those M positions (they carry gradient to the prefix); a small prompting transformer
maps them to M soft tokens in the CLIP text width, which the CLIP text encoder reads before the
label tokens. Token choice has no gradient, so the ids are generated from a snapshot of the
prefix, the *generation prefix*, which moves only on `regenerate()` (training does so every
`train.attribute_refresh_steps`); the teacher-forced pass reads the current prefix.

What the LLM wrote per label lives in a `LabelCache`: ids (or descriptions) the model *stores*
belong to it like its weights (a checkpoint holds them, its fingerprint covers them, nothing
overwrites them), so the labels training used are encoded at tagging with exactly the ids
they were trained on; other labels get ids generated from the stored generation prefix, the
one the trained ids came from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch import nn

from ovml_core.llm import FrozenLLM
from ovml_core.text import ClipTextEncoder

TEXT_DESCRIPTION_PROMPT = "Describe in one short sentence what a video of {} looks like."
TEXT_DESCRIPTION_TOKENS = 24

Output = TypeVar("Output")


class LabelCache(Generic[Output]):
    """What the frozen LLM wrote per label: `stored` entries are part of the model, `generated`
    ones a cache the model could regenerate. Stored entries are never overwritten."""

    def __init__(self) -> None:
        self.stored: dict[str, Output] = {}
        self.generated: dict[str, Output] = {}

    def missing(self, labels: list[str]) -> list[str]:
        """Distinct labels without an entry, in order."""
        return [
            label
            for label in dict.fromkeys(labels)
            if label not in self.stored and label not in self.generated
        ]

    def get(self, labels: list[str], generate: Callable[[list[str]], list[Output]]) -> list[Output]:
        """Entries for `labels`, generating the missing ones in one call."""
        missing = self.missing(labels)
        if missing:
            self.add(missing, generate(missing))
        return [self.stored.get(label, self.generated.get(label)) for label in labels]

    def add(self, labels: list[str], values: list[Output]) -> None:
        stored = [label for label in labels if label in self.stored]
        if stored:
            raise ValueError(f"labels {stored[:3]} have stored entries, which never change")
        self.generated.update(zip(labels, values, strict=True))

    def store_generated(self) -> None:
        """Make the generated entries part of the model (a checkpoint is being written)."""
        self.stored = {**self.generated, **self.stored}
        self.generated.clear()

    def clear(self, stored: bool = False) -> None:
        self.generated.clear()
        if stored:
            self.stored.clear()


class PromptingTransformer(nn.Module):
    """LLM hidden states [L, M, d_llm] -> soft tokens [L, M, d_text]."""

    def __init__(self, d_llm: int, d_text: int, num_tokens: int, layers: int):
        super().__init__()
        # LLM hidden states have large, model-specific norms; normalise before projecting.
        self.norm_in = nn.LayerNorm(d_llm)
        self.proj_in = nn.Linear(d_llm, d_text)
        self.position = nn.Parameter(torch.zeros(num_tokens, d_text))
        layer = nn.TransformerEncoderLayer(
            d_text,
            nhead=max(1, d_text // 64),
            dim_feedforward=4 * d_text,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.proj_out = nn.Linear(d_text, d_text)
        # Start at the scale of CLIP token embeddings (std 0.02) so the text tower sees
        # inputs of a familiar magnitude.
        nn.init.normal_(self.proj_out.weight, std=0.02 / d_text**0.5)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(self.norm_in(hidden)) + self.position
        return self.proj_out(self.blocks(x))


class SoftAttributeEncoder(nn.Module):
    """Labels -> M soft tokens each, through learned prefixes and a frozen LLM."""

    def __init__(
        self,
        llm: FrozenLLM,
        d_text: int,
        num_prefix: int,
        num_attributes: int,
        prompting_layers: int,
        instruction: str,
    ):
        super().__init__()
        self.llm = llm
        self.instruction = instruction
        self.num_attributes = num_attributes
        self.prefix = nn.Parameter(self._initial_prefix(num_prefix))
        # The prefix the ids are generated from; a checkpoint keeps it beside the prefix.
        self.register_buffer("generation_prefix", self.prefix.detach().clone())
        self.prompting = PromptingTransformer(
            llm.hidden_size, d_text, num_attributes, prompting_layers
        )
        self.ids: LabelCache[list[int]] = LabelCache()

    def _initial_prefix(self, num_prefix: int) -> torch.Tensor:
        # Start from real token embeddings (the instruction's first tokens, cycled) so the
        # LLM reads the prefix as ordinary text at step 0.
        ids = self.llm.tokenizer(self.instruction, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ids[i % len(ids)] for i in range(num_prefix)])
        with torch.no_grad():
            return self.llm.embed_tokens(ids).detach().clone().float()

    def prompts(self, labels: list[str]) -> list[str]:
        return [f"{self.instruction} {label}" for label in labels]

    def attribute_ids(self, labels: list[str]) -> list[list[int]]:
        """Token ids per label: stored, cached, or generated now from the generation prefix."""
        return self.ids.get(labels, self.generate_ids)

    def generate_ids(self, labels: list[str]) -> list[list[int]]:
        """Greedy ids from the generation prefix, not cached."""
        return self.llm.generate_attribute_ids(
            self.generation_prefix, self.prompts(labels), self.num_attributes
        )

    def set_attribute_ids(self, labels: list[str], ids: list[list[int]]) -> None:
        """Use ids generated elsewhere (e.g. by a vLLM engine from the generation prefix)."""
        self.ids.add(labels, ids)

    def refresh(self) -> None:
        """Forget generated ids (stored ones stay): the next call generates them again."""
        self.ids.clear()

    def regenerate(self, labels: list[str]) -> None:
        """Training's refresh: the current prefix becomes the generation prefix, every id is
        dropped (stored ones too), and `labels` get their new ids now, in one batch."""
        with torch.no_grad():
            self.generation_prefix.copy_(self.prefix)
        self.ids.clear(stored=True)
        self.attribute_ids(labels)

    def attribute_text(self, labels: list[str]) -> list[str]:
        """The generated attribute tokens decoded, for people to read."""
        return [
            self.llm.tokenizer.decode(ids, skip_special_tokens=True)
            for ids in self.attribute_ids(labels)
        ]

    def forward(self, labels: list[str]) -> torch.Tensor:
        ids = self.attribute_ids(labels)
        hidden = self.llm.generated_hidden_states(self.prefix, self.prompts(labels), ids)
        return self.prompting(hidden.float())


class LabelEncoder(nn.Module):
    """Labels -> CLIP text features [L, D] (not normalised), in one of three modes.

    `prompt`: CLIP reads the template ("a video of {label}."): zero-shot baseline and teacher.
    `text`: the LLM writes a description, CLIP reads "template + description" (CuPL baseline).
    `soft`: the method: soft attribute tokens + label tokens.
    """

    def __init__(
        self,
        text: ClipTextEncoder,
        mode: str,
        template: str,
        soft: SoftAttributeEncoder | None = None,
        llm: FrozenLLM | None = None,
    ):
        super().__init__()
        self.text = text
        self.mode = mode
        self.template = template
        self.soft = soft
        self.llm = llm if soft is None else None  # soft mode reaches the LLM through `soft`
        self.written: LabelCache[str] = LabelCache()  # the `text` mode's descriptions

    def prompt_features(self, labels: list[str]) -> torch.Tensor:
        return self.text.encode_texts([self.template.format(label) for label in labels])

    @staticmethod
    def description_prompts(labels: list[str]) -> list[str]:
        return [TEXT_DESCRIPTION_PROMPT.format(label) for label in labels]

    def descriptions(self, labels: list[str]) -> list[str]:
        return self.written.get(
            labels,
            lambda missing: self.llm.generate_text(
                self.description_prompts(missing), TEXT_DESCRIPTION_TOKENS
            ),
        )

    def set_descriptions(self, labels: list[str], texts: list[str]) -> None:
        """Use descriptions written elsewhere (e.g. by a vLLM engine from the same prompts)."""
        self.written.add(labels, texts)

    @property
    def cache(self) -> LabelCache | None:
        """What the LLM wrote per label in this mode (None for `prompt`)."""
        return {"soft": self.soft.ids if self.soft else None, "text": self.written}.get(self.mode)

    def attributes(self, labels: list[str]) -> list[str]:
        """What the LLM produced per label (empty for `prompt`)."""
        if self.mode == "soft":
            return self.soft.attribute_text(labels)
        if self.mode == "text":
            return self.descriptions(labels)
        return ["" for _ in labels]

    def refresh(self) -> None:
        """Forget generated outputs (stored ones stay): the next call generates them again."""
        if self.cache is not None:
            self.cache.clear()

    def forward(self, labels: list[str]) -> torch.Tensor:
        if self.mode == "prompt":
            return self.prompt_features(labels)
        if self.mode == "text":
            texts = [
                _fit_text(self.text, f"{self.template.format(label)} {desc}")
                for label, desc in zip(labels, self.descriptions(labels), strict=True)
            ]
            return self.text.encode_texts(texts)
        return self.text.encode_with_soft_tokens(self.soft(labels), labels)


def _fit_text(text: ClipTextEncoder, sentence: str) -> str:
    """Drop trailing words of an LLM description until it fits the CLIP context."""
    words = sentence.split()
    while len(words) > 1 and text.num_label_tokens(" ".join(words)) > text.context_length:
        words.pop()
    return " ".join(words)
