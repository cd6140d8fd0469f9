"""Labels -> label bank rows (embedding + what the LLM wrote), with one model in one process.

The PyTorch half of the label bank job: `pipeline/label_bank.py` runs one `LabelEmbedder` per
actor. The `hf` backend lets the model's own `FrozenLLM` generate (batched, left padding); the
`vllm` backend has a vLLM engine write the same greedy tokens and hands them to the model,
which then runs its usual teacher-forced pass, prompting transformer and CLIP text tower.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from ovml_core.attributes import TEXT_DESCRIPTION_TOKENS
from ovml_core.model import OVMLModel
from ovml_core.vocabulary import Vocabulary, VocabularyError, read_vocabulary

logger = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm")


def clip_token_budget(model: OVMLModel) -> tuple[Callable[[str], int], int]:
    """(CLIP text tokens a label needs in this model's label mode, the context size).

    Soft attributes take M positions before the label; the prompt and text modes put the label
    in the prompt template (the text mode trims the LLM's description, never the label).
    """
    labels = model.labels
    text = labels.text
    if labels.mode == "soft":
        num_soft = labels.soft.num_attributes
        return (lambda label: text.num_label_tokens(label) + num_soft), text.context_length
    return (lambda label: text.num_label_tokens(labels.template.format(label))), text.context_length


def load_vocabulary(path: str, model: OVMLModel) -> Vocabulary:
    """Read a vocabulary checked against this model's text context; log every issue and
    raise `VocabularyError` (naming the lines) for labels the model cannot encode."""
    vocabulary = read_vocabulary(path, *clip_token_budget(model))
    for issue in vocabulary.issues:
        log = logger.error if issue.fatal else logger.warning
        log("%s:%d: %s: %s", path, issue.line, issue.kind, issue.message)
    vocabulary.raise_for_errors()
    if not vocabulary.labels:
        raise VocabularyError(f"{path}: no labels")
    return vocabulary


class LabelEmbedder:
    """`embed(labels)` -> (L2-normalised float32 embeddings [L, D], decoded attributes)."""

    def __init__(self, model: OVMLModel, backend: str = "hf", gpu_memory_utilization: float = 0.5):
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
        self.model = model
        self.generator = None  # None: the model's own FrozenLLM generates
        llm = model.labels.soft.llm if model.labels.soft is not None else model.labels.llm
        if backend == "vllm" and llm is not None:
            from ovml_core.llm_vllm import VllmGenerator  # only this backend needs vLLM

            self.generator = VllmGenerator(llm, model.config.llm, gpu_memory_utilization)

    def embed(self, labels: list[str]) -> tuple[np.ndarray, list[str]]:
        if self.generator is not None:
            self._generate(labels)
        with torch.inference_mode():
            embeddings = self.model.encode_labels(labels).float().cpu().numpy()
        return embeddings, self.model.label_attributes(labels)

    def _generate(self, labels: list[str]) -> None:
        """Fill the model's per-label caches with what the external engine wrote, for the
        labels the model has nothing for: stored outputs (the labels training used) stay."""
        encoder = self.model.labels
        if encoder.cache is None:
            return
        missing = encoder.cache.missing(labels)
        if not missing:
            return
        if encoder.mode == "soft":
            soft = encoder.soft
            ids = self.generator.generate_attribute_ids(
                soft.generation_prefix, soft.prompts(missing), soft.num_attributes
            )
            soft.set_attribute_ids(missing, ids)
        else:
            texts = self.generator.generate_text(
                encoder.description_prompts(missing), TEXT_DESCRIPTION_TOKENS
            )
            encoder.set_descriptions(missing, texts)
