"""Every choice of the Moving Fashion ablation, made on val; test is printed beside, never read.

    python bench/moving_fashion_choose.py runs/moving-fashion-ablation [more --out folders ...] \
        [--weight train.distill_weight --weight-variant distill]

Reads the ablation.json of each folder (bench/moving_fashion_ablation.py; all of them must come
from the same code, stage-0 weights and benchmark) and chooses, each from the mean over seeds of
a val number:
- the best variant setting (a variant with its --set overrides): highest val HM;
- the regularizer of `full`: the best of the regularized variants (distill, l2sp, patch) run;
- a regularizer weight: the value of --weight (read from each row's resolved config) whose rows
  of --weight-variant have the highest val HM (a grid: run the ablation with --set over it);
- the demo checkpoint (models/moving-fashion-tiny/checkpoint: prompt labels, so tagging needs
  no LLM): the seed with the highest val HM of the best prompt-label setting, and its tagging
  threshold: the one with the best micro F1 on that run's val base labels;
- the soft-attribute checkpoint (models/moving-fashion-tiny/soft): the same among the settings
  with soft attributes (soft_attributes, full), when any ran.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REGULARIZED = ("distill", "l2sp", "patch")
SAME_ORIGIN = ("code_head", "code_diff_sha256", "clip_sha256", "data_sha256")
KEY = "harmonic_mean"


class ChoiceError(ValueError):
    """The rows cannot support a choice; the message says why."""


def load_rows(paths: list[str]) -> list[dict]:
    """The rows of each ablation.json (or of a folder holding one), refused when they were
    made from different code, weights or data."""
    rows = []
    for path in map(Path, paths):
        rows += json.loads((path / "ablation.json" if path.is_dir() else path).read_text())
    origins = {tuple(r.get("fingerprint", {}).get(k) for k in SAME_ORIGIN) for r in rows}
    if len(origins) > 1:
        raise ChoiceError(
            f"the rows come from {len(origins)} origins ({', '.join(SAME_ORIGIN)}): "
            + " vs ".join(str(o) for o in sorted(origins, key=str))
        )
    return rows


def setting(row: dict) -> str:
    return " ".join([row["variant"], *row.get("overrides", ())])


def summary(rows: list[dict], key: str = KEY) -> dict:
    """Mean (and sd) over seeds of `key` on val and on test."""
    out = {"seeds": sorted(r["seed"] for r in rows)}
    for split in ("val", "test"):
        values = np.array([r[split][key] for r in rows], dtype=float)
        out[split] = float(values.mean())
        out[f"{split}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out


def best(groups: dict[str, list[dict]], key: str = KEY) -> tuple[str, dict]:
    """The group with the highest mean val `key`, and every group's summary (ties: the first
    group, in the rows' order)."""
    if not groups:
        raise ChoiceError("no rows to choose from")
    summaries = {name: summary(rows, key) for name, rows in groups.items()}
    winner = max(summaries, key=lambda name: summaries[name]["val"])
    return winner, summaries


def group(rows: list[dict], by) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(by(row), []).append(row)
    return groups


def config_value(row: dict, field: str):
    """A dotted field ("train.distill_weight") of the row's resolved config."""
    section, key = field.split(".", 1)
    try:
        return row["config"][section][key]
    except KeyError as err:
        raise ChoiceError(f"--weight {field}: not in the resolved config of {row['run']}") from err


def choose(rows: list[dict], weight: str | None = None, weight_variant: str = "distill") -> dict:
    """Every choice, from val numbers only."""
    plain = [r for r in rows if not r.get("overrides")]
    choices = {"variant": best(group(rows, setting))}
    regularized = [r for r in plain if r["variant"] in REGULARIZED]
    if regularized:
        choices["full_regularizer"] = best(group(regularized, setting))
    if weight:
        candidates = [r for r in rows if r["variant"] == weight_variant]
        if not candidates:
            raise ChoiceError(f"--weight-variant {weight_variant}: no rows of it")
        choices["weight"] = best(group(candidates, lambda r: str(config_value(r, weight))))
    choices["demo"] = best_run([r for r in rows if label_encoder(r) == "prompt"])
    soft = [r for r in rows if label_encoder(r) == "soft"]
    if soft:
        choices["soft"] = best_run(soft)
    return choices


def label_encoder(row: dict) -> str:
    return row["config"].get("model", {}).get("label_encoder", "prompt")


def best_run(rows: list[dict]) -> dict:
    """The seed with the highest val HM of the setting with the highest mean val HM, and its
    tagging threshold (best micro F1 on that run's val base labels)."""
    settings = group(rows, setting)
    run = max(settings[best(settings)[0]], key=lambda r: r["val"][KEY])
    return {
        "run": run["run"],
        "checkpoint": run["checkpoint"],
        "val_hm": run["val"][KEY],
        "test_hm": run["test"][KEY],
        "threshold": run["val"]["base_f1_threshold"],
    }


def fmt(s: dict, split: str) -> str:
    sd = f" ± {s[f'{split}_sd']:.3f}" if len(s["seeds"]) > 1 else ""
    return f"{s[split]:.3f}{sd}"


def report(choices: dict, weight: str | None) -> str:
    titles = {
        "variant": "best variant (val HM)",
        "full_regularizer": "regularizer of `full` (val HM among distill / l2sp / patch run)",
        "weight": f"{weight} (val HM)",
    }
    lines = []
    for name, title in titles.items():
        if name not in choices:
            continue
        winner, summaries = choices[name]
        lines += [
            f"{title}: **{winner}**",
            "",
            "| candidate | seeds | val HM | test HM (not used) |",
        ]
        lines.append("|---|---|---|---|")
        for candidate, s in summaries.items():
            mark = " (chosen)" if candidate == winner else ""
            seeds = ",".join(map(str, s["seeds"]))
            lines.append(f"| {candidate}{mark} | {seeds} | {fmt(s, 'val')} | {fmt(s, 'test')} |")
        lines.append("")
    for name, title in (("demo", "demo checkpoint (prompt labels)"), ("soft", "soft checkpoint")):
        if name not in choices:
            continue
        run = choices[name]
        lines.append(
            f"{title}: {run['run']} (val HM {run['val_hm']:.3f}; test HM {run['test_hm']:.3f}, "
            f"not used): {run['checkpoint']}; its threshold (tag.threshold): "
            f"{run['threshold']:.4g}, the best micro F1 on that run's val base labels"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="+", help="ablation --out folders (or ablation.json files)")
    parser.add_argument("--weight", help="a config field run as a grid, e.g. train.distill_weight")
    parser.add_argument("--weight-variant", default="distill", help="the variant of that grid")
    args = parser.parse_args(argv)
    try:
        rows = load_rows(args.out)
        print(report(choose(rows, args.weight, args.weight_variant), args.weight))
    except ChoiceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
