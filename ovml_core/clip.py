"""Create an open_clip CLIP from a model name and a weights source, loading weights safely.

`pretrained` is one of:
- None: random init (the tiny test models; the seed is the caller's business);
- an open_clip pretrained tag for the model ("openai", "laion2b_s34b_b88k", ...): the file is
  fetched by open_clip's own downloader (HF hub first), so it needs the hub or its cache;
- "hf-hub:org/repo": architecture and preprocessing from the repo's open_clip_config.json,
  weights from the repo, both via open_clip (model_name is then only a label);
- a local .safetensors file, or a .bin/.pt/.pth file that `torch.load(weights_only=True)` reads.

Every source ends in one loader, `load_clip_state_dict`: safetensors, or torch.load with
weights_only=True and no fallback, so a pickle that would run code is refused, never executed.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError  # only the exception torch's weights_only loader raises

import open_clip
import torch
from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed
from open_clip.pretrained import download_pretrained, download_pretrained_from_hf
from safetensors import SafetensorError
from safetensors.torch import load_file

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
HF_HUB_PREFIX = "hf-hub:"
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# Preprocessing keys a pretrained tag may override (open_clip merges the same ones).
_TAG_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


class ClipWeightsError(ValueError):
    """A CLIP weights source is unknown, unreadable, unsafe, or does not fit the model."""


def register_model_configs() -> None:
    """Make ovml_core/model_configs/ovml-*.json known to open_clip by name. Idempotent."""
    known = set(open_clip.list_models())
    for path in sorted(MODEL_CONFIG_DIR.glob("ovml-*.json")):
        if path.stem not in known:
            open_clip.add_model_config(path)


@dataclass(frozen=True)
class PretrainedSource:
    """Where CLIP weights come from. kind: random | tag | hf-hub | file."""

    kind: str
    ref: str | None = None  # the tag, the hub repo id, or the file path


def resolve_pretrained(model_name: str, pretrained: str | None) -> PretrainedSource:
    """Classify `pretrained` for `model_name` without touching the network or the file."""
    if pretrained is None:
        return PretrainedSource("random")
    if pretrained.startswith(HF_HUB_PREFIX):
        repo = pretrained[len(HF_HUB_PREFIX) :]
        if not repo:
            raise ClipWeightsError("pretrained 'hf-hub:' needs a repo id, e.g. hf-hub:org/repo")
        return PretrainedSource("hf-hub", repo)
    if pretrained.endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES):
        if not os.path.isfile(pretrained):
            raise ClipWeightsError(f"pretrained CLIP weights file not found: {pretrained}")
        return PretrainedSource("file", pretrained)
    if open_clip.get_pretrained_cfg(model_name, pretrained):
        return PretrainedSource("tag", pretrained)
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    raise ClipWeightsError(
        f"pretrained {pretrained!r} for {model_name!r} is not an open_clip tag "
        f"(known: {', '.join(tags) or 'none'}), an 'hf-hub:' id, or a "
        f"{'/'.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)} file"
    )


def pretrained_weights_file(
    model_name: str, pretrained: str | None, cache_dir: str | None = None
) -> Path | None:
    """The local weights file for a source, fetched through open_clip when remote (or cached)."""
    source = resolve_pretrained(model_name, pretrained)
    if source.kind == "random":
        return None
    if source.kind == "file":
        return Path(source.ref)
    try:
        if source.kind == "tag":
            path = download_pretrained(
                open_clip.get_pretrained_cfg(model_name, source.ref), cache_dir=cache_dir
            )
        else:
            path = download_pretrained_from_hf(source.ref, cache_dir=cache_dir)
    except Exception as err:  # hub, network and cache errors all mean "not available here"
        raise ClipWeightsError(
            f"could not fetch CLIP weights {pretrained!r} for {model_name!r} ({err}); offline, "
            "pass a local .safetensors file instead"
        ) from err
    return Path(path)


def load_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a CLIP state dict from .safetensors or a weights-only torch file, unwrapped.

    Accepts the layouts open_clip checkpoints use: a plain state dict, {"state_dict": ...}
    (training checkpoints), and "module."-prefixed keys (saved from DistributedDataParallel).
    """
    path = Path(path)
    if path.suffix in SAFETENSORS_SUFFIXES:
        try:
            checkpoint = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ClipWeightsError(f"{path}: not a readable safetensors file ({err})") from err
    elif path.suffix in TORCH_SUFFIXES:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except UnpicklingError as err:
            raise ClipWeightsError(
                f"{path}: refused, it is a pickle that needs more than plain tensors to load "
                "(weights_only=True). Convert it to .safetensors from a trusted environment."
            ) from err
        except (RuntimeError, OSError, EOFError) as err:
            raise ClipWeightsError(f"{path}: not a readable torch weights file ({err})") from err
    else:
        raise ClipWeightsError(
            f"{path}: unsupported weights file; expected one of "
            f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
        )
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ClipWeightsError(f"{path}: expected a non-empty state dict of tensors")
    not_tensors = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ClipWeightsError(f"{path}: entries that are not tensors: {not_tensors[:3]}")
    if all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k.removeprefix("module."): v for k, v in checkpoint.items()}
    return checkpoint


def load_clip_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a weights file into an open_clip model, strictly (every key must match)."""
    state = load_clip_state_dict(path)
    # The same adaptations open_clip's load_checkpoint makes, minus its unsafe torch.load fallback.
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    state.pop("text.transformer.embeddings.position_ids", None)
    resize_pos_embed(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ClipWeightsError(f"{path}: weights do not fit the model: {err}") from err


def create_clip(
    model_name: str, pretrained: str | None = None, *, cache_dir: str | None = None
) -> open_clip.CLIP:
    """An open_clip CLIP for `model_name` with weights from `pretrained` (see module doc).

    The model is returned as open_clip builds it (train mode, fp32, CPU).
    """
    register_model_configs()
    source = resolve_pretrained(model_name, pretrained)
    weights = pretrained_weights_file(model_name, pretrained, cache_dir=cache_dir)
    options = {}
    if source.kind == "tag":
        # A tag's preprocessing and activation (OpenAI weights use QuickGELU) belong to it.
        tag_cfg = open_clip.get_pretrained_cfg(model_name, source.ref)
        options["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        options["force_preprocess_cfg"] = {
            k: tag_cfg[k] for k in _TAG_PREPROCESS_KEYS if k in tag_cfg
        }
    # hf-hub: open_clip reads architecture and preprocessing from the repo's config; the weights
    # file (already fetched above) is loaded by our safe loader rather than open_clip's.
    architecture = pretrained if source.kind == "hf-hub" else model_name
    clip = open_clip.create_model(
        architecture, pretrained=None, load_weights=False, cache_dir=cache_dir, **options
    )
    if not isinstance(clip, open_clip.CLIP):
        raise ClipWeightsError(
            f"{architecture!r} builds a {type(clip).__name__}; ovml needs an open_clip CLIP "
            "with its built-in text transformer"
        )
    if weights is not None:
        load_clip_weights(clip, weights)
    return clip


def clip_image_params(
    clip: open_clip.CLIP,
) -> tuple[int, tuple[float, float, float], tuple[float, float, float]]:
    """(image_size, mean, std) of the model's preprocessing config; square images only.

    Raises for preprocessing other than what `frames_to_clip_input` implements (bicubic resize
    of the shorter side, centre crop) rather than feeding the model differently made inputs.
    """
    cfg = open_clip.get_model_preprocess_cfg(clip)
    resize = (cfg.get("interpolation", "bicubic"), cfg.get("resize_mode", "shortest"))
    if resize != ("bicubic", "shortest"):
        raise ValueError(
            f"CLIP preprocessing {resize} is not supported; frames are resized bicubic, "
            "shorter side, then centre-cropped"
        )
    size = cfg["size"]
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"only square CLIP inputs are supported, got size {tuple(size)}")
        size = size[0]
    return int(size), tuple(float(m) for m in cfg["mean"]), tuple(float(s) for s in cfg["std"])


def clip_identifier(model_name: str, pretrained: str | None) -> str:
    """A stable name for the frozen CLIP a checkpoint was trained on.

    Local files are named by content (sha256), so a renamed copy matches and a changed file
    does not. Random init is reproducible only together with the model config's seed.
    """
    source = resolve_pretrained(model_name, pretrained)
    if source.kind == "random":
        return f"{model_name}|random-init"
    if source.kind == "file":
        return f"{model_name}|file-sha256:{_file_sha256(source.ref)}"
    return f"{model_name}|{source.kind}:{source.ref}"


def _file_sha256(path: str) -> str:
    stat = os.stat(path)
    return _cached_sha256(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the key so a rewritten file is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
