"""End-to-end tagging throughput: the Ray pipeline vs a plain loop vs a torch DataLoader.

All peers decode the same generated h264 clips with `ovml_core.video.sample_frames` and score
them with the same model and labels; each is timed from "config in hand" to "tags in hand",
model construction included. The DataLoader has one worker per core. The Ray instance is
started before timing (on a cluster it is already up); "steady" is the throughput after the
first batch, start-up excluded. The pipeline runs twice: as the job chooses on this machine
(tag.encode_in auto: the driver encodes on a lone CPU node) and with an encode actor pool
(tag.encode_in=actors, as on clusters that can grow or have GPUs). `--fused` adds a Ray peer that decodes and encodes in the same
actors (one per core), the alternative to sized stages for small models. `--whole-command`
times `python jobs/tag.py` as a user runs it (imports, Ray start, model, plan) against a fresh
process running the DataLoader peer, both ways. The load average is printed before and after: a ratio
measured while it was above the core count is not a result. Run from the repository root:

    .venv/bin/python -m bench.bench_tagging --videos 400 --rounds 2 --fused
    .venv/bin/python -m bench.bench_tagging --videos 1200 --whole-command
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from torch.utils.data import DataLoader, Dataset

from ovml_core.config import Config
from ovml_core.model import create_model
from ovml_core.video import sample_frames
from pipeline.parquet_io import read_tags
from pipeline.tagging import TagSummary, rank_tags, run_tagging
from tests.videos import write_indexed_video

REPO = Path(__file__).resolve().parents[1]
LABELS = ["dog", "cat", "surfing", "rabbit", "bicycle", "car", "forest", "night"]


class ClipDataset(Dataset):
    def __init__(self, uris: list[str], cfg: Config, size: int):
        self.uris, self.cfg, self.size = uris, cfg, size

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i: int) -> np.ndarray:
        frames, _ = sample_frames(
            self.uris[i], self.cfg.model.num_frames, self.size, self.cfg.video
        )
        return frames


def top_labels(model, frames: np.ndarray, label_emb: torch.Tensor, cfg: Config) -> list[str]:
    with torch.inference_mode():
        probs = model.score(model.encode_video(torch.from_numpy(frames)), label_emb)
    _, top_k = rank_tags(probs.numpy(), LABELS, cfg.tag.threshold, cfg.tag.top_k)
    return [top[0]["label"] for top in top_k.to_pylist()]


def plain_loop(cfg: Config, uris: list[str]) -> list[str]:
    model = create_model(cfg.model)
    label_emb = model.encode_labels(LABELS)
    tops, batch = [], []
    for uri in uris:
        frames, _ = sample_frames(uri, cfg.model.num_frames, model.image_size, cfg.video)
        batch.append(frames)
        if len(batch) == cfg.tag.batch_size or uri == uris[-1]:
            tops += top_labels(model, np.stack(batch), label_emb, cfg)
            batch = []
    return tops


def data_loader(cfg: Config, uris: list[str], workers: int, steady: dict) -> list[str]:
    """Top-1 labels; `steady` gets the videos/s after the first batch."""
    model = create_model(cfg.model)
    label_emb = model.encode_labels(LABELS)
    loader = DataLoader(
        ClipDataset(uris, cfg, model.image_size),
        batch_size=cfg.tag.batch_size,
        num_workers=workers,
        collate_fn=np.stack,
    )
    tops, first = [], None
    for frames in loader:
        tops += top_labels(model, frames, label_emb, cfg)
        first = first or (time.perf_counter(), len(tops))
    after = len(tops) - first[1]
    steady["DataLoader"] = after / max(time.perf_counter() - first[0], 1e-9)
    return tops


ACTORS = "tag.encode_in=actors"


def ray_pipeline(
    cfg: Config, manifest: str, labels: str, out: str, steady: dict, name: str
) -> list[str]:
    summary = run_tagging(cfg, manifest, out, labels=labels, full=True)
    assert summary.ok == summary.processed, summary.format()
    steady[name] = summary.stages.steady_videos_per_s
    steady[f"summary {name}"] = summary
    return top1_of(out)


def top1_of(out: str) -> list[str]:
    rows = {r["video_id"]: r for r in read_tags(out).to_pylist()}
    return [rows[f"clip-{i:04d}"]["top_k"][0]["label"] for i in range(len(rows))]


class DecodeAndEncode:
    """The fused peer: one actor decodes its batch's videos and encodes them itself."""

    def __init__(self, cfg: Config):
        torch.set_num_threads(1)
        self.cfg, self.model = cfg, create_model(cfg.model)
        self.label_emb = self.model.encode_labels(LABELS)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg, size = self.cfg, self.model.image_size
        frames = np.stack(
            [sample_frames(u, cfg.model.num_frames, size, cfg.video)[0] for u in batch["uri"]]
        )
        return {
            "uri": batch["uri"],
            "top1": np.array(top_labels(self.model, frames, self.label_emb, cfg)),
        }


def fused_pipeline(cfg: Config, uris: list[str], cores: int) -> list[str]:
    blocks = -(-len(uris) // cfg.tag.batch_size)  # no repartition task: the actors hold every CPU
    rows = (
        ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=blocks)
        .map_batches(
            DecodeAndEncode,
            fn_constructor_kwargs={"cfg": cfg},
            compute=ray.data.ActorPoolStrategy(size=cores),
            batch_size=cfg.tag.batch_size,
            num_cpus=1,
        )
        .take_all()
    )
    top1 = {r["uri"]: r["top1"] for r in rows}
    return [top1[u] for u in uris]


def whole_commands(args: argparse.Namespace, manifest: str, labels: str, work: Path) -> None:
    """`python jobs/tag.py` vs a fresh process running the DataLoader peer, best of rounds."""
    python = sys.executable
    settings = [a for o in args.overrides for a in ("--set", o)]
    tag = [python, "jobs/tag.py", "--config", args.config, "--manifest", manifest]
    tag += ["--labels", labels, "--out", str(work / "cmd-tags"), "--full", *settings]
    loader = [python, "-m", "bench.bench_tagging", "--dataloader-only", manifest]
    loader += ["--config", args.config, *settings]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    commands = {
        "DataLoader process": loader,
        "jobs/tag.py": tag,
        "jobs/tag.py, actors": [*tag, "--set", ACTORS],
    }
    walls: dict[str, list[float]] = {name: [] for name in commands}
    summaries = {}
    for _ in range(args.rounds):
        for name, argv in commands.items():
            started = time.perf_counter()
            done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-3000:]
            walls[name].append(time.perf_counter() - started)
            summaries[name] = done.stdout
    print(f"\nwhole commands, {args.videos} videos, best of {args.rounds} (every round):")
    loader_s = min(walls["DataLoader process"])
    for name, seconds in walls.items():
        rounds = " ".join(f"{s:.1f}" for s in seconds)
        best = min(seconds)
        print(
            f"  {name:<22}{best:>8.1f} s  (DataLoader wall / this: {loader_s / best:.2f}x)  {rounds}"
        )
    for name in ("jobs/tag.py", "jobs/tag.py, actors"):
        print(f"{name} summary:\n{summaries[name]}")


def load_line(cores: int, before: bool) -> str:
    """The load average; before the run, flagged when other work already fills the cores (after
    it, this benchmark's own work counts too)."""
    load = os.getloadavg()
    busy = "  ABOVE the core count: not a result" if before and load[0] > cores else ""
    when = "before" if before else "after"
    return f"load average {when}: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {cores} cores{busy}"


def make_inputs(work: Path, args: argparse.Namespace) -> tuple[list[str], str, str]:
    """(video paths, manifest, labels file): N manifest entries hard-linked to one encoding."""
    fps = 24
    source = write_indexed_video(
        work / "source.mp4", round(args.seconds * fps), width=args.width, height=args.height
    )
    ids = [f"clip-{i:04d}" for i in range(args.videos)]
    uris = [str(work / f"{video_id}.mp4") for video_id in ids]
    for uri in uris:
        os.link(source, uri)
    manifest = work / "manifest.parquet"
    pq.write_table(pa.table({"video_id": ids, "uri": uris}), manifest)
    (work / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return uris, str(manifest), str(work / "labels.txt")


def best_times(peers: dict, rounds: int) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Best wall time and top-1 labels per peer. Rounds interleave the peers, so a busy spell
    on a shared machine hits all of them."""
    times: dict[str, float] = {}
    tops = {}
    for _ in range(rounds):
        for name, run in peers.items():
            started = time.perf_counter()
            tops[name] = run()
            times[name] = min(times.get(name, float("inf")), time.perf_counter() - started)
    return times, tops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each clip")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--rounds", type=int, default=1, help="runs per peer; the best counts")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--fused", action="store_true", help="add the decode+encode actor peer")
    parser.add_argument(
        "--whole-command", action="store_true", help="also time jobs/tag.py as a user runs it"
    )
    parser.add_argument("--dataloader-only", metavar="MANIFEST", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = Config.from_yaml(args.config, args.overrides)
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)  # the single-process peers get every core for the model
    if args.dataloader_only:  # the DataLoader peer of --whole-command, in its own process
        uris = pq.read_table(args.dataloader_only)["uri"].to_pylist()
        data_loader(cfg, uris, cores, {})
        return
    print(load_line(cores, before=True))
    work = Path(tempfile.mkdtemp(prefix="ovml-bench-"))
    uris, manifest, labels = make_inputs(work, args)

    # Its own instance: never a cluster another process left running on this machine.
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    steady: dict = {}
    loader_name = f"DataLoader(num_workers={cores})"
    actors = Config.from_yaml(args.config, [*args.overrides, ACTORS])
    peers = {
        "plain loop": lambda: plain_loop(cfg, uris),
        loader_name: lambda: data_loader(cfg, uris, cores, steady),
        "ray pipeline": lambda: ray_pipeline(
            cfg, manifest, labels, str(work / "tags"), steady, "ray pipeline"
        ),
        "ray pipeline, actors": lambda: ray_pipeline(
            actors, manifest, labels, str(work / "tags-actors"), steady, "ray pipeline, actors"
        ),
    }
    if args.fused:
        peers["ray fused decode+encode"] = lambda: fused_pipeline(cfg, uris, cores)
    times, tops = best_times(peers, args.rounds)
    pipelines = ("ray pipeline", "ray pipeline, actors")
    summaries: list[TagSummary] = [steady.pop(f"summary {name}") for name in pipelines]
    print(
        f"\n{args.videos} videos ({args.width}x{args.height} h264, {args.seconds:g} s), "
        f"config {Path(args.config).name} {' '.join(args.overrides)}, {cores} cores, "
        f"T={cfg.model.num_frames}, batch {cfg.tag.batch_size}, "
        f"encode actors {cfg.tag.encode_actors}; best of {args.rounds} rounds"
    )
    head = f"{'peer':<28}{'seconds':>9}{'videos/s':>10}{'vs plain loop':>15}"
    print(f"{head}{'steady videos/s':>17}  same top-1")
    for name, seconds in times.items():
        rate = steady.get("DataLoader" if name == loader_name else name)
        print(
            f"{name:<28}{seconds:>9.1f}{args.videos / seconds:>10.2f}"
            f"{times['plain loop'] / seconds:>14.2f}x"
            f"{'' if rate is None else f'{rate:.2f}':>17}  {tops[name] == tops['plain loop']}"
        )
    for name, summary in zip(pipelines, summaries, strict=True):
        print(f"steady: {name} / DataLoader = {steady[name] / steady['DataLoader']:.2f}x")
        print(f"last {name} run's summary:\n{summary.format()}")
    ray.shutdown()
    if args.whole_command:
        whole_commands(args, manifest, labels, work)
    print(load_line(cores, before=False))


if __name__ == "__main__":
    main()
