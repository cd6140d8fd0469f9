"""bench/moving_fashion_study.py: runs in parallel into one --out, `full` made of what val chose."""

import json
import sys

from tests.test_ablation_choice import row
from tests.test_moving_fashion_bench import load_bench

# What each fake run reports on val: distill weight 3 wins the grid, distill beats l2sp/patch.
VAL_HM = {"distill": 0.50, "distill train.distill_weight=3.0": 0.55, "l2sp": 0.45}


def fake_run(study, tmp_path):
    """A stand-in for one ablation invocation: sleeps a little (so runs overlap), then adds a
    row for its run to ablation.json under the ablation's lock (without importing Ray)."""
    script = tmp_path / "fake_run.py"
    script.write_text(
        """
import fcntl, json, sys, time
from pathlib import Path
out, row = json.loads(sys.argv[1])
time.sleep(0.2)
with open(Path(out) / ".ablation.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    path = Path(out) / "ablation.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    path.write_text(json.dumps(rows + [row]))
"""
    )

    def command(run, data, out):
        setting = " ".join([run.variant, *run.overrides])
        weights = [o.split("=")[1] for o in run.overrides if o.startswith("train.distill_weight")]
        weight = float(weights[0]) if weights else 1.0
        made = row(run.variant, run.seed, VAL_HM.get(setting, 0.4), 0.1, weight, run.overrides)
        made["run"] = run.name
        payload = json.dumps([str(out), made])
        return [sys.executable, str(script), payload]

    return command


def test_full_runs_after_the_regularized_ones_with_the_val_choice(tmp_path, monkeypatch):
    study = load_bench("moving_fashion_study")
    monkeypatch.setattr(study, "command", fake_run(study, tmp_path))
    out = tmp_path / "out"
    rows = study.run_study(tmp_path / "data", out, jobs=3)
    names = [r["run"] for r in rows]
    planned = study.REGULARIZED + study.OTHERS
    assert len(names) == len(set(names)) == len(planned) + 3
    full = [r for r in rows if r["variant"] == "full"]
    assert [r["seed"] for r in sorted(full, key=lambda r: r["seed"])] == [0, 1, 2]
    assert {tuple(r["overrides"]) for r in full} == {
        ("train.regularizers=[distill]", "train.distill_weight=3.0")
    }
    # Every regularized row was in ablation.json before the first `full` run started.
    regularized = {run.name for run in study.REGULARIZED}
    first_full = min(names.index(r["run"]) for r in full)
    assert regularized <= set(names[:first_full])
    assert (out / "logs" / f"{full[0]['run']}.log").is_file()


def test_a_failed_run_stops_the_study_and_a_rerun_keeps_its_log(tmp_path, monkeypatch):
    study = load_bench("moving_fashion_study")
    died = [sys.executable, "-c", "print('died'); exit(3)"]
    monkeypatch.setattr(study, "command", lambda run, data, out: died)
    for _ in range(2):  # the first run and its rerun; one job, so distill-seed0 runs to its end
        try:
            study.run_study(tmp_path / "data", tmp_path / "out", jobs=1)
        except RuntimeError as err:
            assert "failed (3)" in str(err) and "distill-seed0" in str(err)
        else:
            raise AssertionError("a failed run went unnoticed")
    log = (tmp_path / "out" / "logs" / "distill-seed0.log").read_text().splitlines()
    assert [line.startswith("===") for line in log] == [True, False, True, False]
    assert log[1] == log[3] == "died"


def test_the_study_refuses_uncommitted_code(tmp_path, monkeypatch, capsys):
    study = load_bench("moving_fashion_study")
    monkeypatch.setattr(study, "uncommitted", lambda: " M pipeline/tagging.py")
    assert study.main(["--out", str(tmp_path / "out")]) == 2
    assert "commit the code first" in capsys.readouterr().err


def test_parallel_rows_are_all_kept(tmp_path):
    """add_row re-reads ablation.json under a lock: 8 writers at once lose no row."""
    from concurrent.futures import ThreadPoolExecutor

    ablation = load_bench("moving_fashion_study").ablation
    results = tmp_path / "ablation.json"
    made = [row("distill", seed, 0.5, 0.5) for seed in range(40)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda r: ablation.add_row(results, r), made))
    assert sorted(r["seed"] for r in json.loads(results.read_text())) == list(range(40))
