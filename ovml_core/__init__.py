"""ovml_core: the model and its data, in pure PyTorch + PyAV (no Ray).

    from ovml_core import create_model, load_checkpoint, ModelConfig, sample_frames

The public names below are imported on first use (PEP 562), so `import ovml_core.config`
stays light and does not pull in open_clip, transformers or PyAV.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "Config": "ovml_core.config",
    "ConfigError": "ovml_core.config",
    "ModelConfig": "ovml_core.config",
    "OVMLModel": "ovml_core.model",
    "create_model": "ovml_core.model",
    "save_checkpoint": "ovml_core.checkpoint",
    "load_checkpoint": "ovml_core.checkpoint",
    "model_fingerprint": "ovml_core.checkpoint",
    "CheckpointError": "ovml_core.checkpoint",
    "sample_frames": "ovml_core.video",
    "VideoDecodeError": "ovml_core.video",
    "mean_average_precision": "ovml_core.metrics",
    "read_vocabulary": "ovml_core.vocabulary",
}

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "ModelConfig",
    "OVMLModel",
    "VideoDecodeError",
    "create_model",
    "load_checkpoint",
    "mean_average_precision",
    "model_fingerprint",
    "read_vocabulary",
    "sample_frames",
    "save_checkpoint",
]

if TYPE_CHECKING:
    from ovml_core.checkpoint import (
        CheckpointError,
        load_checkpoint,
        model_fingerprint,
        save_checkpoint,
    )
    from ovml_core.config import Config, ConfigError, ModelConfig
    from ovml_core.metrics import mean_average_precision
    from ovml_core.model import OVMLModel, create_model
    from ovml_core.video import VideoDecodeError, sample_frames
    from ovml_core.vocabulary import read_vocabulary


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ovml_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
