"""Checkpoints: a directory with config.json + model.safetensors. Never pickle.

What is saved is everything that the frozen identifiers cannot rebuild: the video tower with
its temporal branch, the label encoder's prefix and prompting transformer, scale and bias, and
(only when CLIP was randomly initialised) the CLIP text tower. The frozen LLM and pretrained
CLIP text tower are referenced by identifier and checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ovml_core.config import Config, ConfigError, ModelConfig
from ovml_core.model import OVMLModel, create_model

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, unsafe, or does not match the model it claims."""


def _frozen_prefixes(model: OVMLModel) -> tuple[str, ...]:
    prefixes = ["labels.soft.llm.", "labels.llm."]
    if model.config.clip_pretrained is not None:
        prefixes.append("labels.text.")
    return tuple(prefixes)


def checkpoint_state(model: OVMLModel) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds, keyed as in `model.state_dict()`."""
    skip = _frozen_prefixes(model)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}


def model_fingerprint(model: OVMLModel) -> str:
    """Stable across save/load; changes when any saved weight or the config changes."""
    digest = hashlib.sha256()
    header = {
        "model": asdict(model.config),
        "clip": model.clip_identifier,
        "llm": model.llm_identifier,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for key, tensor in sorted(checkpoint_state(model).items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_checkpoint(model: OVMLModel, directory: str | Path) -> Path:
    """Write atomically: a reader sees the old checkpoint or the new one, never half of one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in checkpoint_state(model).items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "model": asdict(model.config),
        "clip_identifier": model.clip_identifier,
        "llm_identifier": model.llm_identifier,
        "model_fingerprint": model_fingerprint(model),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    save_file(state, str(tmp / WEIGHTS_FILE))
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        tmp.rename(directory)
    return directory


def read_checkpoint_config(directory: str | Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    if not (directory / WEIGHTS_FILE).is_file():
        pickles = [p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"{directory} holds only pickle weights ({', '.join(sorted(pickles))}); ovml "
                f"loads {WEIGHTS_FILE} (safetensors) only, because unpickling can run code"
            )
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}")
    try:
        return json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{directory / CONFIG_FILE}: unreadable ({err})") from err


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> OVMLModel:
    directory = Path(directory)
    meta = read_checkpoint_config(directory)
    try:
        cfg: ModelConfig = Config.from_dict({"model": meta["model"]}).model
    except (KeyError, ConfigError) as err:
        raise CheckpointError(f"{directory / CONFIG_FILE}: bad model config ({err})") from err
    model = create_model(cfg)
    for name, expected in (
        ("clip", meta.get("clip_identifier")),
        ("llm", meta.get("llm_identifier")),
    ):
        actual = getattr(model, f"{name}_identifier")
        if expected != actual:
            raise CheckpointError(
                f"{directory} was trained on {name} {expected!r}, but {actual!r} is loaded"
            )
    state = load_file(str(directory / WEIGHTS_FILE))
    expected_keys = set(checkpoint_state(model))
    if set(state) != expected_keys:
        missing = sorted(expected_keys - set(state))[:3]
        unexpected = sorted(set(state) - expected_keys)[:3]
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE} does not match the model: missing {missing}, "
            f"unexpected {unexpected}"
        )
    model.load_state_dict(state, strict=False)
    return model.to(device).eval()
