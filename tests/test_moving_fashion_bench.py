"""The Moving Fashion bench scripts: the ablation table averages each variant setting over its
seeds, val next to test; the order probe trains and reports every twin pair."""

import importlib.util
import json
import sys

import pytest

from ovml_core import moving_fashion as mf
from tests.conftest import REPO


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_ablation():
    return load_bench("moving_fashion_ablation")


def row(variant, seed, value, overrides=()):
    """A row of the ablation: every column's number is `value` on val, value + 0.1 on test."""
    ablation = load_ablation()
    row = {"variant": variant, "seed": seed, "overrides": list(overrides), "val": {}, "test": {}}
    for split, key, _ in ablation.COLUMNS:
        if split is None:
            row[key] = value
        else:
            row[split][key] = value + (0.1 if split == "test" else 0.0)
    return row


def test_one_line_per_setting_with_val_next_to_test_and_spread_over_seeds():
    ablation = load_ablation()
    rows = [
        row("zero_shot", 0, 0.3),
        row("full", 0, 0.4),
        row("full", 1, 0.6),
        row("full", 0, 0.2, ["train.distill_weight=3"]),
    ]
    lines = ablation.table(rows).splitlines()
    assert len(lines) == 5  # header, rule, one line per variant setting in run order
    header = lines[0].split(" | ")
    assert header[2:8] == [
        "val mAP base",
        "test mAP base",
        "val mAP novel",
        "test mAP novel",
        "val HM",
        "test HM",
    ]
    assert header[8:10] == ["val HM unseen", "test HM unseen"]
    zero_shot, full, weighted = (line.split(" | ") for line in lines[2:])
    assert zero_shot[0] == "| zero_shot" and zero_shot[1] == "0"
    assert zero_shot[2:4] == ["0.300", "0.400"]  # val, then test
    assert full[1] == "0,1" and full[2] == "0.500 ± 0.141"  # sample std of 0.4 and 0.6
    assert full[3] == "0.600 ± 0.141"
    assert weighted[0] == "| full train.distill_weight=3" and weighted[2] == "0.200"
    assert ablation.pair_name("moving left", "moving right") == "left/right"
    assert ablation.TWIN_PAIRS == ("left/right", "up/down", "clockwise/counterclockwise", "in/out")


@pytest.mark.skipif(
    not (mf.DEFAULT_SOURCE / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_order_probe_reports_maps_and_every_twin_pair(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    probe = load_bench("moving_fashion_order_probe")
    assert probe.main(["--steps", "2", "--every", "1", "--batch-size", "4"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2]
    for line in lines:
        for key in ("base", "novel", "left/right", "up/down", "clockwise/counterclockwise"):
            assert 0.0 <= line[key] <= 1.0, (key, line)
    assert lines[1]["clips/s"] > 0


def test_every_ablation_config_is_valid_and_trains_on_base_labels_only():
    from ovml_core.config import Config
    from ovml_core.finetune import check_regularizers

    ablation = load_ablation()
    for name in ablation.ORDER:
        cfg = Config.from_yaml(ablation.CONFIGS / f"{name}.yaml")
        check_regularizers(cfg.model, cfg.train)
        assert sorted(cfg.train.novel_labels) == sorted(mf.novel_labels()), name
        assert cfg.tag.top_k == len(mf.GARMENTS + mf.MOTIONS), name
