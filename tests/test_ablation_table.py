"""bench/moving_fashion_ablation.py: the table averages each variant over its seeds."""

import importlib.util

from tests.conftest import REPO


def load_ablation():
    spec = importlib.util.spec_from_file_location(
        "moving_fashion_ablation", REPO / "bench" / "moving_fashion_ablation.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(variant, seed, value):
    ablation = load_ablation()
    metrics = {key: value for key, _ in ablation.COLUMNS}
    return {"variant": variant, "seed": seed, **metrics}


def test_one_line_per_variant_with_mean_and_spread_over_seeds():
    ablation = load_ablation()
    rows = [row("zero_shot", 0, 0.3), row("full", 0, 0.4), row("full", 1, 0.6)]
    lines = ablation.table(rows).splitlines()
    assert len(lines) == 4  # header, rule, one line per variant in run order
    zero_shot, full = (line.split(" | ") for line in lines[2:])
    assert zero_shot[0] == "| zero_shot" and zero_shot[1] == "0" and zero_shot[2] == "0.300"
    assert full[1] == "0,1" and full[2] == "0.500 ± 0.141"  # sample std of 0.4 and 0.6
    assert ablation.pair_name("moving left", "moving right") == "left/right"
    assert ablation.TWIN_PAIRS == ("left/right", "up/down", "clockwise/counterclockwise", "in/out")
