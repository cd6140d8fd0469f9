"""Shared test set-up: offline hubs, quiet Ray, and the tiny model and config."""

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_config():
    from ovml_core.config import Config

    return Config.from_yaml(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """The tiny random model of configs/tiny.yaml; tests must not modify it in place."""
    from ovml_core.model import create_model

    return create_model(tiny_config.model)


@pytest.fixture(autouse=True, scope="module")
def _ray_stops_between_modules():
    """Jobs start a local Ray when none is running; stop it so each module starts clean."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
