"""The Moving Fashion ablation: train each variant on base labels, tag val and test, evaluate.

    python bench/moving_fashion_ablation.py --data runs/moving-fashion/data [--size quick] [--seeds 0 1]
        [--variants zero_shot temporal_divided ...] [--set train.distill_weight=0.3]

Variants are the configs in configs/moving_fashion/ (`zero_shot` is evaluated as it is: it has
nothing to train, so its seeds must agree; the others are fine-tuned with the training job
first). Every variant runs the real jobs in one process and one local Ray instance:
`pipeline.training.run_training`, then `pipeline.tagging.run_tagging` of the val and the test
clips with the full vocabulary (novel labels included) and again, re-scored from the stored
embeddings, with the unseen wording (configs/moving_fashion/unseen_labels.csv), then
`pipeline.evaluation.run_evaluation`. Calibration (Platt) is fit on the val split's base labels
and applied to test, so ECE and thresholded numbers of test are out-of-sample. Every number is
written for val and test: choices are made on val (bench/moving_fashion_choose.py), test is
only reported.

Prints a Markdown table and writes ablation.json and one report.html per variant, seed and
split under --out. `--set` overrides make another setting of a variant (its own rows and run
folders, e.g. a grid of regularizer weights into the same --out). Every row records a
fingerprint of the code (git HEAD + sha256 of `git diff HEAD`, Markdown excluded), of the
resolved config, of the stage-0 CLIP weights and of the benchmark; a rerun with the same --out
runs only the rows it does not hold yet, and refuses (naming the run and what changed) when a
row or run folder there was made with another fingerprint. Several invocations may run into one
--out at once (bench/moving_fashion_study.py does): each starts its own local Ray and adds its
rows to ablation.json under a lock. The CLIP weights of stage 0 must
exist (jobs/pretrain_clip.py); the benchmark is built first if --data does not hold it.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from ovml_core import moving_fashion as mf
from ovml_core.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from ovml_core.config import Config
from ovml_core.evaluation import EvaluationInput
from ovml_core.finetune import json_safe
from ovml_core.metrics import PlattScaling, best_f1_threshold, twin_hits
from pipeline.cli import add_overrides
from pipeline.evaluation import join_scores, run_evaluation
from pipeline.manifest import read_manifest
from pipeline.parquet_io import read_tags, write_text_atomic
from pipeline.tagging import run_tagging
from pipeline.training import MODEL_DIR, run_training

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "moving_fashion"
UNSEEN_LABELS = CONFIGS / "unseen_labels.csv"
DEMO_MODEL = REPO / "models" / "moving-fashion-tiny" / "checkpoint"
VAL_MANIFEST = "val.parquet"  # written under --out: the benchmark keeps val inside manifest.parquet
SPLITS = ("val", "test")
UNTRAINED = ("zero_shot",)
ORDER = (
    "zero_shot",
    "finetune_frame_mean",
    "temporal_divided",
    "temporal_neighbor",
    "soft_attributes",
    "text_attributes",
    "distill",
    "l2sp",
    "patch",
    "full",
)
EXIT_OK, EXIT_REFUSED = 0, 2


class FingerprintError(RuntimeError):
    """--out holds a row or run folder made with other code, config or inputs."""


def code_fingerprint(repo: Path = REPO) -> dict[str, str]:
    """git HEAD and the sha256 of `git diff HEAD` of tracked files. Markdown is left out: a
    note in BENCHMARKS.md cannot change a number."""

    def git(*args: str) -> bytes:
        return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True).stdout

    diff = git("diff", "HEAD", "--binary", "--", ".", ":(exclude)*.md")
    return {
        "code_head": git("rev-parse", "HEAD").decode().strip(),
        "code_diff_sha256": hashlib.sha256(diff).hexdigest(),
    }


def config_sha256(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def fingerprint(code: dict[str, str], cfg: Config, data: Path) -> dict[str, str]:
    """What a row's numbers depend on: code, resolved config, stage-0 weights, benchmark."""
    return {
        **code,
        "config_sha256": config_sha256(cfg.to_dict()),
        "clip_sha256": file_sha256(Path(cfg.model.clip_pretrained)),
        "data_sha256": file_sha256(data / mf.INFO),
    }


def flat(config: dict, prefix: str = "") -> dict[str, object]:
    """{"train": {"seed": 0}} -> {"train.seed": 0}."""
    items = {}
    for key, value in config.items():
        if isinstance(value, dict):
            items |= flat(value, f"{prefix}{key}.")
        else:
            items[f"{prefix}{key}"] = value
    return items


def config_changes(old: dict, new: dict) -> list[str]:
    was, now = flat(old), flat(new)
    keys = sorted(set(was) | set(now))
    return [f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in keys if was.get(k) != now.get(k)]


def what_changed(old: dict, new: dict) -> str:
    """The fingerprint fields in which stamp (or row) `old` differs from `new`, config
    fields by name."""
    before, after = old.get("fingerprint"), new["fingerprint"]
    if not before:
        return "it has no fingerprint (made by an older ablation)"
    parts = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) == after.get(key):
            continue
        if key == "config_sha256" and "config" in old:
            parts.append("config: " + "; ".join(config_changes(old["config"], new["config"])))
        else:
            parts.append(f"{key} {before.get(key)} -> {after.get(key)}")
    return ", ".join(parts)


def setting_name(variant: str, overrides: list[str] = ()) -> str:
    """A variant and its --set overrides, as the table and the choices name it."""
    return " ".join([variant, *overrides])


def run_name(variant: str, seed: int, overrides: list[str] = ()) -> str:
    """The folder name of one variant, setting and seed under runs/, tags/ and eval/."""
    setting = re.sub(r"[^A-Za-z0-9._=-]+", "_", ",".join(overrides))
    return f"{variant}{'+' + setting if setting else ''}-seed{seed}"


def stamp_path(out: Path, run: str) -> Path:
    return out / "fingerprints" / f"{run}.json"


def check_reuse(out: Path, rows: list[dict], stamp: dict) -> bool:
    """True when --out already holds this run's row made with the same fingerprint (reuse
    it), False when the run is still to do (a killed run with the same stamp resumes).
    Raises FingerprintError when a row, stamp or folder of this run has another origin."""
    for row in rows:
        if row_key(row) == row_key(stamp):
            if row.get("fingerprint") == stamp["fingerprint"]:
                return True
            raise refusal(out, stamp, what_changed(row, stamp), f"its row in {out}/ablation.json")
    folders = [out / part / stamp["run"] for part in ("runs", "tags", "eval")]
    path = stamp_path(out, stamp["run"])
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("fingerprint") != stamp["fingerprint"]:
            remedy = ", ".join(map(str, [path, *folders]))
            raise refusal(out, stamp, what_changed(old, stamp), remedy)
        return False
    leftovers = [str(f) for f in folders if f.exists()]
    if leftovers:
        reason = "it has no fingerprint (made by an older ablation)"
        raise refusal(out, stamp, reason, ", ".join(leftovers))
    return False


def refusal(out: Path, stamp: dict, changed: str, remedy: str) -> FingerprintError:
    return FingerprintError(
        f"{out}: {stamp['run']} (variant {stamp['variant']}, seed {stamp['seed']}) was made "
        f"with another fingerprint and would be mixed with this run: {changed}. Use a fresh "
        f"--out, or delete {remedy}"
    )


def row_key(row: dict) -> tuple:
    return row["variant"], tuple(row.get("overrides", ())), row["seed"]


def motion_ap_over_chance(metrics: dict) -> tuple[float, float]:
    """Mean AP and mean chance AP of the motion labels that have twins (all of them)."""
    twins = {label for pair in mf.ORDER_ONLY_PAIRS for label in pair}
    rows = [p for p in metrics["per_label"] if p["label"] in twins and p["positives"]]
    return float(np.mean([p["ap"] for p in rows])), float(np.mean([p["chance_ap"] for p in rows]))


def variant_config(
    name: str, data: Path, out: Path, seed: int, overrides: list[str] = ()
) -> Config:
    cfg = Config.from_yaml(CONFIGS / f"{name}.yaml")
    # The configs name the weights relative to the repository: run from any folder.
    clip_weights = (REPO / cfg.model.clip_pretrained).resolve()
    return Config.from_yaml(
        CONFIGS / f"{name}.yaml",
        [
            f"model.clip_pretrained={clip_weights}",
            f"train.train_manifest={data / mf.MANIFEST}",
            f"train.storage_path={out / 'runs'}",
            f"train.name={run_name(name, seed, overrides)}",
            f"train.seed={seed}",
            f"model.seed={seed}",
            *overrides,
        ],
    )


def clip_scores(tags_dir: Path, manifest: Path) -> EvaluationInput:
    """Every clip's score and 0/1 target for the 18 labels, in GARMENTS + MOTIONS order."""
    truth = read_manifest(str(manifest))
    scores, _, _ = join_scores(read_tags(str(tags_dir)), truth, list(mf.GARMENTS + mf.MOTIONS))
    return scores


def twin_accuracy(scores: EvaluationInput) -> dict[str, float]:
    """Per twin pair, over clips with exactly one of its motions (e.g. left, not right): how
    often the true twin scores higher; and "all", over every pair's clips. Order-free video
    features give 0.5 in expectation."""
    accuracy, every = {}, []
    for first, second in mf.ORDER_ONLY_PAIRS:
        first_index, second_index = scores.labels.index(first), scores.labels.index(second)
        hits = twin_hits(scores.scores, scores.targets, first_index, second_index)
        accuracy[pair_name(first, second)] = float(np.mean(hits))
        every += list(hits)
    return {"all": float(np.mean(every)), **accuracy}


def base_f1_threshold(scores: EvaluationInput) -> float:
    """The tagging threshold (on the model's own scores, what `tag.threshold` compares) with
    the best micro F1 over the base labels."""
    columns = [scores.labels.index(label) for label in mf.base_labels()]
    return best_f1_threshold(scores.scores[:, columns], scores.targets[:, columns])


def pair_name(first: str, second: str) -> str:
    """ "moving left", "moving right" -> "left/right"."""
    return f"{first.split()[-1]}/{second.split()[-1]}"


def write_val_manifest(data: Path, out: Path) -> Path:
    """The benchmark's val rows as their own manifest (the tagging job tags a whole file),
    with the clips' uris made absolute: relative ones are read relative to the manifest."""
    table = read_manifest(str(data / mf.MANIFEST))
    path = out / VAL_MANIFEST
    out.mkdir(parents=True, exist_ok=True)
    # Atomic: a parallel invocation into the same --out may be reading it.
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    pq.write_table(table.filter(pc.equal(table["split"], "val")), partial)
    os.replace(partial, path)
    return path


def evaluate_split(
    cfg: Config,
    run: str,
    split: str,
    manifest: Path,
    data: Path,
    out: Path,
    checkpoint: str | None,
    calibration: PlattScaling | None,
) -> tuple[dict, PlattScaling]:
    """Tag one split with the vocabulary and (re-scored) the unseen wording, evaluate both.
    Without `calibration` it is fit here, on this split's base labels (val)."""
    tags, unseen_tags = out / "tags" / run / split, out / "tags" / run / f"{split}-unseen"
    run_tagging(
        cfg,
        str(manifest),
        str(tags),
        labels=str(data / mf.VOCABULARY),
        checkpoint=checkpoint,
        full=True,
    )
    title = f"Moving Fashion: {run}, {split}"
    metrics = run_evaluation(
        cfg,
        str(tags),
        str(manifest),
        str(out / "eval" / run / split),
        str(data / mf.VOCABULARY),
        title=title,
        calibration=calibration,
        fit=calibration is None,
    )
    calibrated = metrics["calibrated"]
    calibration = PlattScaling(calibrated["scale"], calibrated["bias"])
    # The same clips' stored embeddings, scored against the other wording: no second decode.
    shutil.rmtree(unseen_tags, ignore_errors=True)
    shutil.copytree(tags, unseen_tags)
    run_tagging(
        cfg, str(manifest), str(unseen_tags), labels=str(UNSEEN_LABELS), checkpoint=checkpoint
    )
    unseen = run_evaluation(
        cfg,
        str(unseen_tags),
        str(manifest),
        str(out / "eval" / run / f"{split}-unseen"),
        str(UNSEEN_LABELS),
        num_samples=0,
        title=f"{title}, unseen wording",
        calibration=calibration,
    )
    return split_row(metrics, unseen, clip_scores(tags, manifest)), calibration


def split_row(metrics: dict, unseen: dict, scores: EvaluationInput) -> dict:
    """The ablation's numbers of one split."""
    motion_ap, motion_chance = motion_ap_over_chance(metrics)
    twins = twin_accuracy(scores)
    return {
        "map_base": metrics["map_base"],
        "map_novel": metrics["map_novel"],
        "harmonic_mean": metrics["harmonic_mean"],
        "garment_base": metrics["by_type"]["garment"]["map_base"],
        "garment_novel": metrics["by_type"]["garment"]["map_novel"],
        "motion_base": metrics["by_type"]["motion"]["map_base"],
        "motion_novel": metrics["by_type"]["motion"]["map_novel"],
        "motion_ap": motion_ap,
        "motion_chance_ap": motion_chance,
        "twin_accuracy": twins["all"],
        **{f"twin {pair}": value for pair, value in twins.items() if pair != "all"},
        "ece": metrics["ece"],
        "calibrated_ece": metrics["calibrated"]["ece"],
        "calibrated_f1": metrics["calibrated"]["all"]["f1"],
        "base_f1_threshold": base_f1_threshold(scores),
        "unseen_map_base": unseen["map_base"],
        "unseen_map_novel": unseen["map_novel"],
        "unseen_harmonic_mean": unseen["harmonic_mean"],
    }


def run_variant(stamp: dict, data: Path, out: Path, val_manifest: Path) -> dict:
    name, seed, overrides = stamp["variant"], stamp["seed"], stamp["overrides"]
    cfg = variant_config(name, data, out, seed, overrides)
    started = time.perf_counter()
    checkpoint = None
    if name not in UNTRAINED:
        result = run_training(cfg)
        checkpoint = f"{result.checkpoint.path}/{MODEL_DIR}"
    trained = time.perf_counter()
    row = {**stamp, "checkpoint": checkpoint}
    calibration = None  # fit on val, applied to test
    for split, manifest in (("val", val_manifest), ("test", data / mf.TEST_MANIFEST)):
        row[split], calibration = evaluate_split(
            cfg, stamp["run"], split, manifest, data, out, checkpoint, calibration
        )
    return row | {"train_s": trained - started, "total_s": time.perf_counter() - started}


def add_row(results: Path, row: dict) -> list[dict]:
    """Add a finished run's row to ablation.json, re-read under a lock: invocations running in
    parallel into one --out share the file. Returns every row."""
    with open(results.with_name(".ablation.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(results.read_text()) if results.is_file() else []
        rows.append(json_safe(row))
        write_text_atomic(str(results), json.dumps(rows, indent=1) + "\n")
    return rows


def publish(checkpoint: str, directory: Path) -> Path:
    """Copy a variant's checkpoint for the demo, naming its CLIP weights relative to the
    repository (the runs name them by absolute path) so that a clone anywhere loads it."""
    model = load_checkpoint(checkpoint)
    weights = Path(model.config.clip_pretrained)
    if weights.is_absolute():
        model.config.clip_pretrained = str(weights.relative_to(REPO))
    return save_checkpoint(model, directory)


TWIN_PAIRS = tuple(pair_name(a, b) for a, b in mf.ORDER_ONLY_PAIRS)
# (split, key, header): val next to test for what choices read; the rest on test.
COLUMNS = (
    *(
        (split, key, f"{split} {header}")
        for key, header in (
            ("map_base", "mAP base"),
            ("map_novel", "mAP novel"),
            ("harmonic_mean", "HM"),
            ("unseen_harmonic_mean", "HM unseen"),
            ("calibrated_ece", "ECE cal."),
        )
        for split in SPLITS
    ),
    ("test", "unseen_map_novel", "test unseen mAP novel"),
    ("test", "garment_base", "test garment base"),
    ("test", "garment_novel", "test garment novel"),
    ("test", "motion_base", "test motion base"),
    ("test", "motion_novel", "test motion novel"),
    ("test", "twin_accuracy", "test twin acc."),
    *(("test", f"twin {pair}", f"test {pair}") for pair in TWIN_PAIRS),
    (None, "total_s", "wall s"),
)


def cell(values: list[float], digits: int) -> str:
    """Mean, ± the sample standard deviation when there are several values."""
    if not values:
        return ""
    array = np.array(values, dtype=float)
    text = f"{array.mean():.{digits}f}"
    if len(array) > 1:
        text += f" ± {array.std(ddof=1):.{digits}f}"
    return text


def table(rows: list[dict]) -> str:
    """One line per variant setting, in run order: the mean over its seeds, +- their
    standard deviation when there are several."""
    ordered = sorted(rows, key=lambda r: ORDER.index(r["variant"]))  # stable: runs' order within
    settings = list(
        dict.fromkeys(setting_name(r["variant"], r.get("overrides", ())) for r in ordered)
    )
    lines = [
        "| variant | seeds | " + " | ".join(h for _, _, h in COLUMNS) + " |",
        "|" + "---|" * (len(COLUMNS) + 2),
    ]
    for setting in settings:
        runs = sorted(
            (r for r in rows if setting_name(r["variant"], r.get("overrides", ())) == setting),
            key=lambda r: r["seed"],
        )
        cells = [setting, ",".join(str(r["seed"]) for r in runs)]
        for split, key, _ in COLUMNS:
            source = [r if split is None else r.get(split, {}) for r in runs]
            cells.append(cell([s[key] for s in source if key in s], 0 if key == "total_s" else 3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def planned_stamps(args: argparse.Namespace, data: Path, out: Path) -> list[dict]:
    """One stamp (run, variant, seed, overrides, fingerprint, resolved config) per run asked."""
    code = code_fingerprint()
    stamps = []
    for name in args.variants:
        for seed in args.seeds:
            cfg = variant_config(name, data, out, seed, args.overrides)
            stamps.append(
                {
                    "run": run_name(name, seed, args.overrides),
                    "variant": name,
                    "seed": seed,
                    "overrides": list(args.overrides),
                    "fingerprint": fingerprint(code, cfg, data),
                    "config": cfg.to_dict(),
                }
            )
    return stamps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/moving-fashion/data", help="benchmark folder")
    parser.add_argument("--size", choices=sorted(mf.SIZES), default="quick")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="training seeds (the data keeps its own)"
    )
    parser.add_argument("--out", default="runs/moving-fashion-ablation")
    parser.add_argument("--variants", nargs="+", default=list(ORDER), choices=ORDER)
    add_overrides(parser, "override a field of every variant, e.g. --set train.epochs=8")
    parser.add_argument(
        "--publish",
        metavar="VARIANT",
        help="copy that variant's checkpoint (seed: the first of --seeds) from --out's "
        f"ablation.json to {DEMO_MODEL}; bench/moving_fashion_choose.py says which, from val",
    )
    parser.add_argument(
        "--summarize", action="store_true", help="print the table of --out's ablation.json"
    )
    args = parser.parse_args(argv)
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    results = out / "ablation.json"
    if args.publish:
        (row,) = [
            r
            for r in json.loads(results.read_text())
            if r["variant"] == args.publish and r["seed"] == args.seeds[0]
        ]
        print(f"{publish(row['checkpoint'], DEMO_MODEL)}: {args.publish} from {row['checkpoint']}")
        return EXIT_OK
    if args.summarize:
        print(table(json.loads(results.read_text())))
        return EXIT_OK
    if not (data / mf.INFO).is_file():
        mf.build_benchmark(data, args.size)
    rows = json.loads(results.read_text()) if results.is_file() else []
    # Every run is checked before any starts: a refusal costs nothing.
    try:
        todo = [s for s in planned_stamps(args, data, out) if not check_reuse(out, rows, s)]
    except FingerprintError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    if not todo:
        print(table(rows))
        return EXIT_OK
    val_manifest = write_val_manifest(data, out)
    # A Ray of its own ("local"): never one that a parallel invocation started.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2))
    for stamp in todo:
        path = stamp_path(out, stamp["run"])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(str(path), json.dumps(stamp, indent=1) + "\n")
        rows = add_row(results, run_variant(stamp, data, out, val_manifest))
        print(table(rows), flush=True)
    print(f"\n{table(rows)}\n\nreports: {out / 'eval'}/<run>/<split>/report.html")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
