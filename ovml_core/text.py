"""The frozen CLIP text tower, callable with soft tokens spliced in after [SOS].

`encode_ids` is CLIP's own text path. `encode_with_soft_tokens` feeds
`[SOS] + soft tokens + label tokens + [EOS]` through the same layers, bypassing the token
embedding for the soft part, so gradients reach whatever produced the soft tokens.
"""

from __future__ import annotations

import open_clip
import torch
from torch import nn


class LabelTooLongError(ValueError):
    """A label (plus the soft tokens) does not fit in the CLIP text context."""


class ClipTextEncoder(nn.Module):
    def __init__(self, clip: open_clip.CLIP, tokenizer):
        super().__init__()
        if clip.text_pool_type not in ("argmax", "eos"):
            raise ValueError(f"CLIP text pooling {clip.text_pool_type!r} is not supported")
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.pool_type = clip.text_pool_type
        self.eos_id = clip.text_eos_id
        self.context_length = clip.context_length
        self.tokenizer = tokenizer
        self.width = clip.token_embedding.embedding_dim

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, context_length=self.context_length).to(self._device)

    @property
    def _device(self) -> torch.device:
        return self.token_embedding.weight.device

    def num_label_tokens(self, text: str) -> int:
        """Tokens the text needs, [SOS] and [EOS] included (CLIP truncates silently; we don't)."""
        ids = self.tokenizer([text], context_length=10_000)[0]
        return int((ids != 0).sum())

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """CLIP's own text features for token ids [L, C] -> [L, D] (not normalised)."""
        return self._encode_embeddings(self.token_embedding(ids), self._eos_index(ids))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.encode_ids(self.tokenize(texts))

    def encode_with_soft_tokens(self, soft: torch.Tensor, labels: list[str]) -> torch.Tensor:
        """soft [L, M, W] + labels -> [L, D]: `[SOS] + soft + tokens(label) + [EOS]`."""
        num_soft = soft.shape[1]
        for label in labels:
            if self.num_label_tokens(label) + num_soft > self.context_length:
                raise LabelTooLongError(
                    f"label {label!r} is too long: with {num_soft} soft tokens it needs more than "
                    f"the {self.context_length}-token CLIP context"
                )
        ids = self.tokenize(labels)
        emb = self.token_embedding(ids)
        keep = self.context_length - num_soft  # trailing padding makes room for the soft tokens
        x = torch.cat([emb[:, :1], soft.to(emb.dtype), emb[:, 1:keep]], dim=1)
        return self._encode_embeddings(x, self._eos_index(ids) + num_soft)

    def _eos_index(self, ids: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "argmax":  # the EOT token has the largest id in CLIP's vocabulary
            return ids.argmax(dim=-1)
        return (ids == self.eos_id).int().argmax(dim=-1)

    def _encode_embeddings(self, x: torch.Tensor, eos_index: torch.Tensor) -> torch.Tensor:
        x = x + self.positional_embedding.to(x.dtype)
        x = self.transformer(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eos_index]
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection if self.text_projection is not None else x
