"""The Moving Fashion ablation: train each variant on base labels, tag the test split, evaluate.

    python bench/moving_fashion_ablation.py --data runs/moving-fashion/data [--size quick] [--seeds 0 1]
        [--variants zero_shot temporal_divided ...]

Variants are the configs in configs/moving_fashion/ (`zero_shot` is evaluated as it is, the
others are fine-tuned with the training job first). Every variant runs the real jobs in one
process and one local Ray instance: `pipeline.training.run_training`, then
`pipeline.tagging.run_tagging` on test.parquet with the full vocabulary (novel labels
included), then `pipeline.evaluation.run_evaluation`. Prints a Markdown table and writes
ablation.json and one report.html per variant and seed under --out; a rerun with the same
--out runs only the variant/seed pairs it does not hold yet (training resumes its run
folder: after a code change delete <out>/runs/<variant>-seed<N>, or the finished run is
reused). The CLIP weights of stage 0 must exist (jobs/pretrain_clip.py); the benchmark is
built first if --data does not hold it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import ray

from ovml_core import moving_fashion as mf
from ovml_core.checkpoint import load_checkpoint, save_checkpoint
from ovml_core.config import Config
from ovml_core.finetune import json_safe
from ovml_core.metrics import twin_hits
from pipeline.cli import add_overrides
from pipeline.evaluation import join_scores, run_evaluation
from pipeline.manifest import read_manifest
from pipeline.parquet_io import read_tags, write_text_atomic
from pipeline.tagging import run_tagging
from pipeline.training import MODEL_DIR, run_training

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "moving_fashion"
DEMO_MODEL = REPO / "models" / "moving-fashion-tiny" / "checkpoint"
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
            f"train.name={name}-seed{seed}",
            f"train.seed={seed}",
            f"model.seed={seed}",
            *overrides,
        ],
    )


def twin_accuracy(tags_dir: Path, manifest: Path) -> dict[str, float]:
    """Per twin pair, over clips with exactly one of its motions (e.g. left, not right): how
    often the true twin scores higher; and "all", over every pair's clips. Order-free video
    features give 0.5 in expectation."""
    truth = read_manifest(str(manifest))
    scores, _, _ = join_scores(read_tags(str(tags_dir)), truth, list(mf.GARMENTS + mf.MOTIONS))
    accuracy, every = {}, []
    for first, second in mf.ORDER_ONLY_PAIRS:
        first_index, second_index = scores.labels.index(first), scores.labels.index(second)
        hits = twin_hits(scores.scores, scores.targets, first_index, second_index)
        accuracy[pair_name(first, second)] = float(np.mean(hits))
        every += list(hits)
    return {"all": float(np.mean(every)), **accuracy}


def pair_name(first: str, second: str) -> str:
    """ "moving left", "moving right" -> "left/right"."""
    return f"{first.split()[-1]}/{second.split()[-1]}"


def run_variant(name: str, data: Path, out: Path, seed: int, overrides: list[str] = ()) -> dict:
    cfg = variant_config(name, data, out, seed, overrides)
    run = f"{name}-seed{seed}"
    started = time.perf_counter()
    checkpoint = None
    if name not in UNTRAINED:
        result = run_training(cfg)
        checkpoint = f"{result.checkpoint.path}/{MODEL_DIR}"
    trained = time.perf_counter()
    run_tagging(
        cfg,
        str(data / mf.TEST_MANIFEST),
        str(out / "tags" / run),
        labels=str(data / mf.VOCABULARY),
        checkpoint=checkpoint,
        full=True,
    )
    metrics = run_evaluation(
        cfg,
        str(out / "tags" / run),
        str(data / mf.TEST_MANIFEST),
        str(out / "eval" / run),
        str(data / mf.VOCABULARY),
        title=f"Moving Fashion: {name}",
    )
    motion_ap, motion_chance = motion_ap_over_chance(metrics)
    twins = twin_accuracy(out / "tags" / run, data / mf.TEST_MANIFEST)
    return {
        "variant": name,
        "seed": seed,
        "checkpoint": checkpoint,
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
        "train_s": trained - started,
        "total_s": time.perf_counter() - started,
    }


def publish(checkpoint: str, directory: Path) -> Path:
    """Copy a variant's checkpoint for the demo, naming its CLIP weights relative to the
    repository (the runs name them by absolute path) so that a clone anywhere loads it."""
    model = load_checkpoint(checkpoint)
    weights = Path(model.config.clip_pretrained)
    if weights.is_absolute():
        model.config.clip_pretrained = str(weights.relative_to(REPO))
    return save_checkpoint(model, directory)


TWIN_PAIRS = tuple(pair_name(a, b) for a, b in mf.ORDER_ONLY_PAIRS)
COLUMNS = (
    ("map_base", "mAP base"),
    ("map_novel", "mAP novel"),
    ("harmonic_mean", "HM"),
    ("garment_base", "garment base"),
    ("garment_novel", "garment novel"),
    ("motion_base", "motion base"),
    ("motion_novel", "motion novel"),
    ("twin_accuracy", "twin acc."),
    *((f"twin {pair}", pair) for pair in TWIN_PAIRS),
    ("ece", "ECE"),
    ("total_s", "wall s"),
)


def table(rows: list[dict]) -> str:
    """One line per variant, in run order: the mean over its seeds, +- their standard
    deviation when there are several."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = [
        "| variant | seeds | " + " | ".join(h for _, h in COLUMNS) + " |",
        "|" + "---|" * (len(COLUMNS) + 2),
    ]
    for variant in variants:
        runs = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["seed"])
        cells = [variant, ",".join(str(r["seed"]) for r in runs)]
        for key, _ in COLUMNS:
            values = np.array([r[key] for r in runs if key in r], dtype=float)
            if not len(values):
                cells.append("")
                continue
            digits = 0 if key == "total_s" else 3
            cell = f"{values.mean():.{digits}f}"
            if len(values) > 1:
                cell += f" ± {values.std(ddof=1):.{digits}f}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        help="copy that variant's checkpoint from --out's ablation.json to " + str(DEMO_MODEL),
    )
    parser.add_argument(
        "--summarize", action="store_true", help="print the table of --out's ablation.json"
    )
    args = parser.parse_args(argv)
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    if args.publish:
        (row,) = [
            r
            for r in json.loads((out / "ablation.json").read_text())
            if r["variant"] == args.publish and r["seed"] == args.seeds[0]
        ]
        print(f"{publish(row['checkpoint'], DEMO_MODEL)}: {args.publish} from {row['checkpoint']}")
        return 0
    if args.summarize:
        print(table(json.loads((out / "ablation.json").read_text())))
        return 0
    if not (data / mf.INFO).is_file():
        mf.build_benchmark(data, args.size)
    ray.init(num_cpus=max(os.cpu_count() or 1, 2))
    # A rerun with the same --out keeps the rows it finds and runs only the missing ones.
    results = out / "ablation.json"
    rows = json.loads(results.read_text()) if results.is_file() else []
    done = {(r["variant"], r["seed"]) for r in rows}
    for name in args.variants:
        for seed in args.seeds:
            if (name, seed) in done:
                continue
            rows.append(run_variant(name, data, out, seed, args.overrides))
            print(table(rows), flush=True)
            write_text_atomic(str(results), json.dumps(json_safe(rows), indent=1) + "\n")
    print(f"\n{table(rows)}\n\nreports: {out / 'eval'}/<variant>/report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
