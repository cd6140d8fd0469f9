"""Checkpoints: a directory with config.json + model.safetensors + labels.json. Never pickle.

What is saved is everything that the frozen identifiers cannot rebuild: the video tower with
its temporal branch, the label encoder's prefix, generation prefix and prompting transformer,
scale and bias, and (only when CLIP was randomly initialised) the CLIP text tower. The frozen
LLM and pretrained CLIP text tower are referenced by identifier and checked on load.

`labels.json` holds what the LLM wrote for the labels the model has encoded when it was saved
(attribute token ids in `soft` mode, descriptions in `text` mode): saving makes them part of
the model, so the labels training used are encoded at tagging with exactly those ids. The
fingerprint covers them. config.json, written last, records the sha256 of the other files,
checked on load: a copy caught half-way (`pipeline.training.publish_model` writes file by
file on object stores) is refused, never loaded as a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ovml_core.config import Config, ConfigError, ModelConfig
from ovml_core.folders import open_as_umask_allows, staging_folder
from ovml_core.model import OVMLModel, create_model

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LABELS_FILE = "labels.json"
GENERATION_PREFIX = "labels.soft.generation_prefix"
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


_LABEL_OUTPUTS = {"soft": "attribute_ids", "text": "descriptions"}


def stored_label_outputs(model: OVMLModel) -> dict[str, dict]:
    """What labels.json holds: the LLM outputs the model stores, by kind ({} for `prompt`)."""
    labels = model.labels
    if labels.cache is None:
        return {}
    return {_LABEL_OUTPUTS[labels.mode]: dict(sorted(labels.cache.stored.items()))}


def restore_label_outputs(model: OVMLModel, data: dict[str, dict]) -> None:
    """Give `model` the stored LLM outputs of `stored_label_outputs` (replacing its own)."""
    cache = model.labels.cache
    if cache is not None:
        cache.clear(stored=True)
        cache.stored.update(data.get(_LABEL_OUTPUTS[model.labels.mode], {}))


def model_fingerprint(model: OVMLModel) -> str:
    """Stable across save/load; changes when any saved weight, stored label output (e.g. the
    attribute ids of trained labels) or the config changes."""
    digest = hashlib.sha256()
    header = {
        "model": asdict(model.config),
        "clip": model.clip_identifier,
        "llm": model.llm_identifier,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    stored = stored_label_outputs(model)
    if any(stored.values()):  # a model that stores nothing keeps its fingerprint of before
        digest.update(json.dumps(stored, sort_keys=True).encode())
    for key, tensor in sorted(checkpoint_state(model).items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_checkpoint(model: OVMLModel, directory: str | Path) -> Path:
    """Write atomically: a reader sees the old checkpoint or the new one, never half of one.

    What the LLM has generated for labels so far becomes stored first (part of the model)."""
    directory = Path(directory)
    if model.labels.cache is not None:
        model.labels.cache.store_generated()
    state = {k: v.detach().to("cpu").contiguous() for k, v in checkpoint_state(model).items()}
    tmp = staging_folder(directory)
    save_file(state, str(tmp / WEIGHTS_FILE))
    (tmp / LABELS_FILE).write_text(json.dumps(stored_label_outputs(model), indent=1))
    meta = {
        "format_version": FORMAT_VERSION,
        "model": asdict(model.config),
        "clip_identifier": model.clip_identifier,
        "llm_identifier": model.llm_identifier,
        "model_fingerprint": model_fingerprint(model),
        "files": {name: file_sha256(tmp / name) for name in (WEIGHTS_FILE, LABELS_FILE)},
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    open_as_umask_allows(tmp)
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        tmp.rename(directory)
    return directory


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_files(directory: Path, meta: dict) -> None:
    """The files config.json names have the content it recorded (checkpoints written before
    it recorded any are taken as they are)."""
    for name, expected in meta.get("files", {}).items():
        path = directory / name
        if not path.is_file() or file_sha256(path) != expected:
            raise CheckpointError(
                f"{path}: missing or not the file {CONFIG_FILE} was written with (a copy "
                "interrupted or still in progress?); copy the checkpoint again"
            )


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
    _check_files(directory, meta)
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
    _restore_labels_file(model, directory)
    return model.to(device).eval()


def load_label_state(model: OVMLModel, directory: str | Path) -> None:
    """Give `model` the generation prefix and stored label outputs of checkpoint `directory`,
    its other weights untouched: a resumed training run continues with the ids it had, not
    ones generated again from the restored prefix."""
    directory = Path(directory)
    _check_files(directory, read_checkpoint_config(directory))
    soft = model.labels.soft
    if soft is not None:
        with safe_open(str(directory / WEIGHTS_FILE), "pt") as f, torch.no_grad():
            saved = f.keys()  # a safetensors handle has no `in`
            if GENERATION_PREFIX not in saved:
                raise CheckpointError(
                    f"{directory / WEIGHTS_FILE} has no {GENERATION_PREFIX} (written before "
                    "checkpoints kept the ids' prefix): start a new run (train.name)"
                )
            soft.generation_prefix.copy_(f.get_tensor(GENERATION_PREFIX))
    _restore_labels_file(model, directory)


def _restore_labels_file(model: OVMLModel, directory: Path) -> None:
    path = directory / LABELS_FILE
    if path.is_file():  # checkpoints written before labels.json store nothing
        restore_label_outputs(model, json.loads(path.read_text()))
