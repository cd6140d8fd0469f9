import pytest

from ovml_core.config import Config, ConfigError, ModelConfig
from tests.conftest import TINY_CONFIG


def test_tiny_config_loads_with_its_values():
    cfg = Config.from_yaml(TINY_CONFIG)
    assert cfg.model.clip_model == "ovml-tiny"
    assert cfg.model.num_frames == 4
    assert cfg.tag.top_k == 3
    assert ModelConfig.from_yaml(TINY_CONFIG) == cfg.model


def test_overrides_are_parsed_as_yaml():
    cfg = Config.from_yaml(
        TINY_CONFIG, ["model.temporal=none", "train.regularizers=[distill, l2sp]"]
    )
    assert cfg.model.temporal == "none"
    assert cfg.train.regularizers == ["distill", "l2sp"]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("model.temporal=sideways", "model.temporal"),
        ("model.num_frames=0", "model.num_frames"),
        ("model.num_frames=two", "model.num_frames"),
        ("tag.threshold=1.5", "tag.threshold"),
        ("tag.allowed_schemes=[http]", "tag.allowed_schemes"),
        ("train.regularizers=[dropout]", "train.regularizers"),
        ("model.colour=red", "model.colour"),
        ("video.mode=fast", "video.mode"),
    ],
)
def test_bad_values_fail_fast_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Config.from_yaml(TINY_CONFIG, [override])


def test_unknown_section_and_missing_file_are_named(tmp_path):
    with pytest.raises(ConfigError, match="modle"):
        Config.from_dict({"modle": {}})
    with pytest.raises(ConfigError, match="not found"):
        Config.from_yaml(tmp_path / "nope.yaml")


def test_ints_are_accepted_for_floats_and_round_trip():
    cfg = Config.from_dict({"tag": {"threshold": 1}, "model": {"init_bias": -5}})
    assert cfg.tag.threshold == 1.0 and isinstance(cfg.model.init_bias, float)
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_exponent_floats_from_the_command_line():
    assert Config.from_yaml(TINY_CONFIG, ["train.lr=1e-5"]).train.lr == 1e-5
    with pytest.raises(ConfigError, match=r"train\.lr"):
        Config.from_yaml(TINY_CONFIG, ["train.lr=fast"])
