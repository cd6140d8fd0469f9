"""bench/moving_fashion_choose.py: every choice follows val numbers and never test numbers;
bench/moving_fashion_ablation.py: rows and run folders of another fingerprint are refused."""

import copy
import json
import subprocess

import pytest

from ovml_core import moving_fashion as mf
from tests.test_moving_fashion_bench import load_ablation, load_bench

ORIGIN = {"code_head": "abc", "code_diff_sha256": "d", "clip_sha256": "c", "data_sha256": "b"}


def split(hm: float, threshold: float = 0.3) -> dict:
    return {"harmonic_mean": hm, "base_f1_threshold": threshold}


def row(variant, seed, val_hm, test_hm, weight=1.0, overrides=(), threshold=0.3):
    return {
        "run": f"{variant}-{','.join(overrides)}-seed{seed}",
        "variant": variant,
        "seed": seed,
        "overrides": list(overrides),
        "fingerprint": dict(ORIGIN, config_sha256=f"{variant}{overrides}{seed}"),
        "config": {"train": {"distill_weight": weight}},
        "checkpoint": f"/runs/{variant}-{seed}/model",
        "val": split(val_hm, threshold),
        "test": split(test_hm, threshold + 0.5),
    }


def hand_made() -> list[dict]:
    """On val: distill (weight 1) best, then l2sp; on test: weight 3, then divided."""
    return [
        row("zero_shot", 0, 0.30, 0.35),
        row("temporal_divided", 0, 0.40, 0.60, threshold=0.1),
        row("temporal_divided", 1, 0.42, 0.62, threshold=0.15),
        row("distill", 0, 0.50, 0.40, threshold=0.2),
        row("distill", 1, 0.46, 0.42, threshold=0.4),
        row("l2sp", 0, 0.44, 0.55),
        row("distill", 0, 0.45, 0.30, weight=0.3, overrides=["train.distill_weight=0.3"]),
        row("distill", 0, 0.43, 0.70, weight=3.0, overrides=["train.distill_weight=3.0"]),
    ]


def choices(rows):
    choose = load_bench("moving_fashion_choose")
    made = choose.choose(rows, "train.distill_weight", "distill")
    return {
        "variant": made["variant"][0],
        "regularizer": made["full_regularizer"][0],
        "weight": made["weight"][0],
        "demo": made["demo"]["run"],
        "threshold": made["demo"]["threshold"],
    }


def test_choices_are_read_off_val():
    rows = hand_made()
    made = choices(rows)
    assert made["variant"] == "distill"  # mean val HM 0.48 over seeds 0, 1
    assert made["regularizer"] == "distill"  # 0.48 against l2sp's 0.44
    assert made["weight"] == "1.0"  # 0.48 against 0.45 (0.3) and 0.43 (3.0)
    assert made["demo"] == rows[3]["run"]  # distill's seed with the best val HM (0.50)
    assert made["threshold"] == 0.2  # that run's val threshold, not its test one (0.7)
    choose = load_bench("moving_fashion_choose")
    summary = choose.choose(rows)["variant"][1]["distill"]
    assert summary["val"] == pytest.approx(0.48) and summary["test"] == pytest.approx(0.41)
    assert summary["seeds"] == [0, 1]


def test_test_numbers_never_change_a_choice():
    rows = hand_made()
    before = choices(rows)
    reversed_test = copy.deepcopy(rows)
    for i, r in enumerate(reversed_test):
        r["test"] = split(1.0 - 0.1 * i, threshold=0.9)  # every test ranking turned around
    assert choices(reversed_test) == before


def test_val_numbers_change_every_choice():
    rows = hand_made()
    rows[1]["val"]["harmonic_mean"], rows[2]["val"]["harmonic_mean"] = 0.90, 0.95
    rows[5]["val"]["harmonic_mean"] = 0.60  # l2sp above distill
    rows[7]["val"]["harmonic_mean"] = 0.60  # weight 3 above weight 1
    assert choices(rows) == {
        "variant": "temporal_divided",
        "regularizer": "l2sp",
        "weight": "3.0",
        "demo": rows[2]["run"],
        "threshold": 0.15,
    }


def test_rows_of_other_code_or_data_are_not_mixed(tmp_path):
    choose = load_bench("moving_fashion_choose")
    rows = hand_made()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ablation.json").write_text(json.dumps(rows[:4]))
    rows[5]["fingerprint"]["code_head"] = "other"
    (tmp_path / "b.json").write_text(json.dumps(rows[4:]))
    assert len(choose.load_rows([str(tmp_path / "a")])) == 4
    with pytest.raises(choose.ChoiceError, match="2 origins"):
        choose.load_rows([str(tmp_path / "a"), str(tmp_path / "b.json")])


def git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_code_fingerprint_follows_head_and_tracked_changes_but_not_markdown(tmp_path):
    ablation = load_ablation()
    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "notes.md").write_text("n\n")
    git(tmp_path, "add", "a.py", "notes.md")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = ablation.code_fingerprint(tmp_path)
    (tmp_path / "notes.md").write_text("more notes\n")
    assert ablation.code_fingerprint(tmp_path) == clean
    (tmp_path / "a.py").write_text("x = 2\n")
    edited = ablation.code_fingerprint(tmp_path)
    assert edited["code_head"] == clean["code_head"]
    assert edited["code_diff_sha256"] != clean["code_diff_sha256"]
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "two")
    committed = ablation.code_fingerprint(tmp_path)
    assert committed["code_head"] != clean["code_head"]
    assert committed["code_diff_sha256"] == clean["code_diff_sha256"]  # both: no diff


@pytest.fixture
def bench_out(tmp_path):
    """A --data with only what fingerprints read (benchmark.json) and an empty --out."""
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    (data / mf.INFO).write_text('{"size": "quick"}\n')
    return data, out


def plan(ablation, data, out, overrides=()):
    args = ablation.argparse.Namespace(variants=["zero_shot"], seeds=[0], overrides=list(overrides))
    (stamp,) = ablation.planned_stamps(args, data, out)
    return stamp


def run_main(ablation, data, out, capsys, *overrides):
    sets = [item for o in overrides for item in ("--set", o)]
    code = ablation.main(["--data", str(data), "--out", str(out), "--variants", "zero_shot", *sets])
    return code, capsys.readouterr()


def test_rows_of_the_same_fingerprint_are_reused_and_others_refused(bench_out, capsys):
    ablation = load_ablation()
    data, out = bench_out
    stamp = plan(ablation, data, out)
    assert stamp["run"] == "zero_shot-seed0" and len(stamp["fingerprint"]) == 5
    row = stamp | {"val": {"harmonic_mean": 0.4}, "test": {"harmonic_mean": 0.3}}
    out.mkdir()
    (out / "ablation.json").write_text(json.dumps([row]))
    code, printed = run_main(ablation, data, out, capsys)
    assert code == 0 and "| zero_shot | 0 | " in printed.out  # reused: nothing ran

    # zero_shot.yaml said threshold 0.4 when the row was made.
    edited = copy.deepcopy(row)
    edited["config"]["tag"]["threshold"] = 0.4
    edited["fingerprint"]["config_sha256"] = ablation.config_sha256(edited["config"])
    (out / "ablation.json").write_text(json.dumps([edited]))
    code, printed = run_main(ablation, data, out, capsys)
    assert code == 2 and "zero_shot-seed0 (variant zero_shot, seed 0)" in printed.err
    assert "config: tag.threshold 0.4 -> 0.5" in printed.err and "ablation.json" in printed.err

    older = row | {"fingerprint": dict(row["fingerprint"], code_head="0" * 40)}
    (out / "ablation.json").write_text(json.dumps([older]))
    code, printed = run_main(ablation, data, out, capsys)
    assert code == 2 and "code_head " + "0" * 40 + " -> " in printed.err


def test_run_folders_of_another_fingerprint_or_none_are_refused(bench_out, capsys):
    ablation = load_ablation()
    data, out = bench_out
    stamp = plan(ablation, data, out)
    (out / "tags" / stamp["run"]).mkdir(parents=True)  # left by an ablation without stamps
    code, printed = run_main(ablation, data, out, capsys)
    assert code == 2 and "no fingerprint" in printed.err and "tags/zero_shot-seed0" in printed.err

    path = ablation.stamp_path(out, stamp["run"])
    path.parent.mkdir()
    killed = stamp | {"fingerprint": dict(stamp["fingerprint"], code_diff_sha256="e" * 64)}
    path.write_text(json.dumps(killed))
    code, printed = run_main(ablation, data, out, capsys)
    assert code == 2 and "code_diff_sha256 " + "e" * 64 in printed.err
    # The same stamp: the run is to be done (resumed), not refused.
    path.write_text(json.dumps(stamp))
    assert ablation.check_reuse(out, [], stamp) is False


def test_settings_get_their_own_runs(bench_out):
    ablation = load_ablation()
    data, out = bench_out
    plain, other = plan(ablation, data, out), plan(ablation, data, out, ["tag.threshold=0.3"])
    assert other["run"] == "zero_shot+tag.threshold=0.3-seed0" != plain["run"]
    assert other["fingerprint"]["config_sha256"] != plain["fingerprint"]["config_sha256"]
    # A row of one setting is no reason to refuse (nor reuse) the other.
    assert ablation.check_reuse(out, [plain], other) is False


def test_soft_checkpoint_is_chosen_among_soft_runs_and_the_demo_among_prompt_runs():
    choose = load_bench("moving_fashion_choose")
    rows = hand_made()
    soft = [
        row("soft_attributes", 0, 0.60, 0.10, threshold=0.05),
        row("soft_attributes", 1, 0.62, 0.10, threshold=0.07),
        row("full", 0, 0.55, 0.90),
    ]
    for r in soft:
        r["config"]["model"] = {"label_encoder": "soft"}
    made = choose.choose(rows + soft)
    assert made["variant"][0] == "soft_attributes"  # best val HM of all
    assert made["demo"]["run"] == rows[3]["run"]  # the demo keeps prompt labels (no LLM)
    assert made["soft"]["run"] == soft[1]["run"] and made["soft"]["threshold"] == 0.07
    assert "soft" not in choose.choose(rows)
