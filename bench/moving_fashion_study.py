"""The whole Moving Fashion study in one command: every variant over seeds, a grid of the
distillation weight, `full` made of the regularizer and weight chosen on val, then every choice.

    python bench/moving_fashion_study.py --out runs/mf-study [--data runs/mf-study/data]
        [--size full] [--jobs 2] [--publish]

Each run is one invocation of bench/moving_fashion_ablation.py into the one --out (so the same
fingerprints, refusals and reuse: a rerun of this command resumes), `--jobs` at a time, each
with its own local Ray. On 2 cores two at once measured no faster than one after the other (a
training run's decode tasks already keep both busy; BENCHMARKS.md). The runs of `full` start once the regularized variants are done:
bench/moving_fashion_choose.py picks their regularizer (and, for distill, its weight from the
grid) on val. At the end it prints the table and the choices, writes them to --out/choices.md,
and with --publish copies the chosen prompt-label and soft-attribute checkpoints to
models/moving-fashion-tiny/{checkpoint,soft}. Test numbers are printed, never read.

The code must be committed (Markdown aside): every table comes from committed code.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import moving_fashion_ablation as ablation  # noqa: E402
import moving_fashion_choose as choose  # noqa: E402

from ovml_core import moving_fashion as mf  # noqa: E402
from pipeline.parquet_io import write_text_atomic  # noqa: E402

WEIGHT = "train.distill_weight"
GRID = (3.0, 10.0)  # beside the configs' 1.0; 3 was the edge of the quick-size grid
SOFT_MODEL = ablation.DEMO_MODEL.parent / "soft"
THREE, TWO = (0, 1, 2), (0, 1)


@dataclass(frozen=True)
class Run:
    variant: str
    seed: int
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return ablation.run_name(self.variant, self.seed, self.overrides)


def runs(variant: str, seeds: tuple[int, ...], overrides: tuple[str, ...] = ()) -> list[Run]:
    return [Run(variant, seed, overrides) for seed in seeds]


# Regularized variants first: `full` waits for their choice. Then the longest (the LLM's).
REGULARIZED = [
    *runs("distill", THREE),
    *(run for w in GRID for run in runs("distill", THREE, (f"{WEIGHT}={w}",))),
    *runs("l2sp", TWO),
    *runs("patch", TWO),
]
OTHERS = [
    *runs("soft_attributes", THREE),
    *runs("text_attributes", TWO),
    *runs("temporal_divided", THREE),
    *runs("temporal_neighbor", TWO),
    *runs("finetune_frame_mean", TWO),
    *runs("zero_shot", THREE),
]


def full_runs(rows: list[dict]) -> list[Run]:
    """`full` (divided + soft attributes) with the regularizer, and its weight, chosen on val."""
    made = choose.choose(rows, WEIGHT, "distill")
    regularizer = made["full_regularizer"][0]
    overrides = (f"train.regularizers=[{regularizer}]",)
    if regularizer == "distill":
        overrides += (f"{WEIGHT}={made['weight'][0]}",)
    return runs("full", THREE, overrides)


def command(run: Run, data: Path, out: Path) -> list[str]:
    args = [sys.executable, str(Path(ablation.__file__)), "--data", str(data), "--out", str(out)]
    args += ["--variants", run.variant, "--seeds", str(run.seed)]
    for override in run.overrides:
        args += ["--set", override]
    return args


class Scheduler:
    """Runs at most `jobs` ablation invocations at once, each appending to --out/logs/<run>.log."""

    def __init__(self, data: Path, out: Path, jobs: int, total: int):
        self.data, self.out, self.jobs, self.total = data, out, jobs, total
        self.running: dict[subprocess.Popen, tuple[Run, float]] = {}
        self.done: set[str] = set()
        self.started = time.perf_counter()

    def log(self, run: Run) -> Path:
        return self.out / "logs" / f"{run.name}.log"

    def start(self, run: Run) -> None:
        log = self.log(run)
        log.parent.mkdir(parents=True, exist_ok=True)
        # Appended: a resumed study must not replace a finished run's log with "reused".
        with open(log, "a") as stream:
            stream.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(run.overrides)}\n")
            stream.flush()
            child = subprocess.Popen(
                command(run, self.data, self.out), stdout=stream, stderr=subprocess.STDOUT
            )
        self.running[child] = (run, time.perf_counter())
        self.say(f"started {run.name}")

    def wait_one(self) -> None:
        """Until a run ends; a failed run stops the study (a rerun resumes it)."""
        while True:
            for child, (run, began) in list(self.running.items()):
                if child.poll() is None:
                    continue
                del self.running[child]
                if child.returncode != 0:
                    self.stop()
                    raise RuntimeError(
                        f"{run.name} failed ({child.returncode}); see {self.log(run)}"
                    )
                self.done.add(run.name)
                self.say(f"finished {run.name} in {time.perf_counter() - began:.0f} s")
                return
            time.sleep(2)

    def stop(self) -> None:
        for child in self.running:
            child.terminate()
        for child in self.running:
            child.wait()

    def say(self, what: str) -> None:
        load = os.getloadavg()[0]
        elapsed = time.perf_counter() - self.started
        print(
            f"[{len(self.done)}/{self.total} done, {elapsed / 60:.1f} min, load {load:.2f}] {what}",
            flush=True,
        )


def run_study(data: Path, out: Path, jobs: int) -> list[dict]:
    queue = [*REGULARIZED, *OTHERS]
    scheduler = Scheduler(data, out, jobs, len(queue) + len(THREE))
    waiting_for = {run.name for run in REGULARIZED}
    full_queued = False
    while queue or scheduler.running or not full_queued:
        if not full_queued and waiting_for <= scheduler.done:
            queue[:0] = full_runs(ablation_rows(out))
            full_queued = True
            scheduler.say(f"full: {' '.join(queue[0].overrides)} (chosen on val)")
        while queue and len(scheduler.running) < jobs:
            scheduler.start(queue.pop(0))
        if scheduler.running:
            scheduler.wait_one()
    return ablation_rows(out)


def ablation_rows(out: Path) -> list[dict]:
    return choose.load_rows([str(out)])


def uncommitted(repo: Path = ablation.REPO) -> str:
    """Tracked changes other than Markdown, as `git status` lists them."""
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)*.md"],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    )
    return status.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="a fresh folder (or this study's, to resume)")
    parser.add_argument("--data", help="benchmark folder (default: --out/data, built if missing)")
    parser.add_argument("--size", choices=sorted(mf.SIZES), default="full")
    parser.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1))
    parser.add_argument(
        "--publish",
        action="store_true",
        help=f"copy the chosen checkpoints to {ablation.DEMO_MODEL} and {SOFT_MODEL}",
    )
    args = parser.parse_args(argv)
    changed = uncommitted()
    if changed:
        print(f"error: commit the code first; changed:\n{changed}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    data = Path(args.data).resolve() if args.data else out / "data"
    if not (data / mf.INFO).is_file():
        print(f"building the {args.size} benchmark in {data}", flush=True)
        mf.build_benchmark(data, args.size)
    rows = run_study(data, out, args.jobs)
    made = choose.choose(rows, WEIGHT, "distill")
    text = f"{ablation.table(rows)}\n\n{choose.report(made, WEIGHT)}\n"
    write_text_atomic(str(out / "choices.md"), text)
    print(f"\n{text}")
    if args.publish:
        for name, directory in (("demo", ablation.DEMO_MODEL), ("soft", SOFT_MODEL)):
            run = made[name]
            print(f"{ablation.publish(run['checkpoint'], directory)}: {run['run']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
