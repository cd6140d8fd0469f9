"""Regularized fine-tuning on Ray Train: `python jobs/train.py --config C [--set k=v ...]`.

    manifest rows (driver, pyarrow)       labels -> 0/1 targets over a fixed vocabulary
      -> decode_video (Ray Data CPU tasks) uint8 frames [T, S, S, 3]; failed videos dropped
                                          (pipeline.training_data)
      -> streaming split over N workers   get_dataset_shard("train").iter_torch_batches(...)
      -> TorchTrainer workers             DDP (gloo on CPU, nccl on GPU), bf16 autocast on GPU,
                                          AdamW groups, warm-up + cosine, grad accumulation

The torch side (parameter groups, loss with regularizers, validation, export, training state)
is `ovml_core.finetune`; this module wires it to Ray. Checkpoints go through
`ray.train.report` into `train.storage_path/train.name`; each holds the exported model
(`model/`, what `load_checkpoint` and the tagging job read) and the training state
(`train_state/`: un-interpolated weights, optimizer, schedule, step, metrics history).
Rerunning the same command resumes from the latest checkpoint of that run: Ray Train
restores it and every worker reads it back through `ray.train.get_checkpoint()`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from torch.nn.parallel import DistributedDataParallel

from ovml_core.checkpoint import CheckpointError
from ovml_core.clip import clip_image_params, create_clip
from ovml_core.config import Config, ConfigError
from ovml_core.finetune import (
    Objective,
    Progress,
    StudentForward,
    build_optimizer,
    evaluate,
    export_model,
    json_safe,
    load_training_state,
    save_training_state,
    set_trainable,
    step_generator,
    with_last,
)
from ovml_core.model import create_model
from pipeline.manifest import resolve
from pipeline.training_data import plan_training

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
STATE_DIR = "train_state"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
# Resuming needs only the latest checkpoint; one older one survives an interrupted upload.
CHECKPOINTS_TO_KEEP = 2
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


# ---------------------------------------------------------------- the loop (one per worker)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = Config.from_dict(loop_config["config"])
    train = cfg.train
    base, novel = loop_config["base_labels"], loop_config["novel_labels"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    model = create_model(cfg.model, device)
    set_trainable(model, train)
    objective = Objective(model, train, base)  # snapshots the pretrained state: before restore
    total_steps = loop_config["steps_per_epoch"] * train.epochs
    optimizer, scheduler = build_optimizer(model, train, total_steps)
    progress = Progress()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            progress = load_training_state(Path(directory) / STATE_DIR, model, optimizer, scheduler)
        logger.info("rank %d resumes at step %d (epoch %d)", rank, progress.step, progress.epoch)
    resumed_from = progress.step
    # Buffers are constants (masks, rotary tables): no need to broadcast them every step.
    student = ray.train.torch.prepare_model(
        StudentForward(model), parallel_strategy_kwargs={"broadcast_buffers": False}
    )
    meter = _Meter(device)
    shard = ray.train.get_dataset_shard("train")
    val = ray.train.get_dataset_shard("val") if "val" in loop_config["datasets"] else None

    def report(val_metrics: dict[str, float]) -> None:
        metrics = {
            "epochs_done": progress.epoch,
            "step": progress.step,
            "resumed_from_step": resumed_from,
            **meter.summary(world_size),
            **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups},
            **val_metrics,
        }
        _report(metrics, model, optimizer, scheduler, progress, objective, rank, loop_config)

    model.train()
    for epoch in range(progress.epoch, train.epochs):
        batches = shard.iter_torch_batches(batch_size=train.batch_size, device=device)
        for index, (batch, is_last) in enumerate(with_last(batches)):
            if index < progress.batches_done:
                continue  # done before the restart this run resumed from
            boundary = is_last or (index + 1) % train.grad_accum == 0
            with _gradient_sync(student, boundary), _autocast(device):
                generator = step_generator(train.seed, rank, progress.step, index)
                losses = objective(student, model, batch["frames"], batch["targets"], generator)
            (losses["total"] / train.grad_accum).backward()
            meter.add(losses, len(batch["frames"]))
            if not boundary:
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step, progress.batches_done = progress.step + 1, index + 1
            if model.labels.soft is not None and progress.step % train.attribute_refresh_steps == 0:
                model.labels.soft.refresh()  # regenerate attribute ids with the new prefix
            every = train.checkpoint_every_steps
            if every and progress.step % every == 0 and not is_last:
                report({})
        progress.epoch, progress.batches_done = epoch + 1, 0
        val_metrics = {}
        if rank == 0 and val is not None:
            with _autocast(device):
                val_metrics = evaluate(
                    model,
                    val.iter_torch_batches(batch_size=train.batch_size, device=device),
                    base + novel,
                    base,
                    novel,
                )
            logger.info("epoch %d validation: %s", epoch + 1, val_metrics)
        report(val_metrics)


class _Meter:
    """Losses and throughput since the last report, averaged over all workers."""

    def __init__(self, device: torch.device):
        self.device = device
        self._reset()

    def _reset(self) -> None:
        # task loss, regularizer loss, micro-batches, clips
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.started = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], clips: int) -> None:
        values = [losses["task"].item(), losses["regularizer"].item(), 1.0, float(clips)]
        self.sums += torch.tensor(values, dtype=torch.float64, device=self.device)

    def summary(self, world_size: int) -> dict[str, float]:
        """Collective: every worker must call it at the same point."""
        sums = self.sums.clone()
        if world_size > 1:
            torch.distributed.all_reduce(sums)
        task, regularizer, count, clips = sums.tolist()
        seconds = time.perf_counter() - self.started
        self._reset()
        if count == 0:
            return {}
        return {
            "train_loss": task / count,
            "regularizer_loss": regularizer / count,
            "clips_per_s": clips / seconds,
        }


def _gradient_sync(student: torch.nn.Module, sync: bool):
    """DDP all-reduces gradients only on the last micro-batch of an accumulation window."""
    if sync or not isinstance(student, DistributedDataParallel):
        return contextlib.nullcontext()
    return student.no_sync()


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _report(
    metrics: dict[str, Any],
    model,
    optimizer,
    scheduler,
    progress: Progress,
    objective: Objective,
    rank: int,
    loop_config: dict[str, Any],
) -> None:
    """Every worker reports (it is a barrier); rank 0 writes and hands over the checkpoint."""
    progress.history.append(metrics)
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            export_model(model, Path(directory) / MODEL_DIR, objective)
            save_training_state(Path(directory) / STATE_DIR, model, optimizer, scheduler, progress)
            write_metrics(loop_config["run_dir"], progress.history)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=f"checkpoint_epoch{progress.epoch:04d}_step{progress.step:08d}",
        )


def write_metrics(run_dir: str, history: list[dict[str, Any]]) -> None:
    """metrics.json and metrics.csv in the run folder (local path or s3:// / gs://)."""
    fs, path = resolve(run_dir)
    fs.create_dir(path, recursive=True)
    rows = json_safe(history)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    for name, data in ((METRICS_JSON, json.dumps(rows, indent=1)), (METRICS_CSV, text.getvalue())):
        with fs.open_output_stream(f"{path}/{name}") as f:
            f.write(data.encode())


# ---------------------------------------------------------------- driver


def storage_uri(storage_path: str) -> str:
    """Ray Train needs an absolute local path or a URI."""
    return storage_path if "://" in storage_path else os.path.abspath(storage_path)


def build_trainer(
    cfg: Config, train_loop: Callable[[dict[str, Any]], None] = train_loop_per_worker
) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer for `cfg`; the same `train.storage_path` + `train.name` resumes."""
    model = cfg.model
    image_size = clip_image_params(create_clip(model.clip_model, model.clip_pretrained))[0]
    plan = plan_training(cfg, image_size)
    train = cfg.train
    storage = storage_uri(train.storage_path)
    logger.info(
        "training on %d base labels (%d novel, evaluation only), %d steps per epoch, %d epochs",
        len(plan.base_labels),
        len(plan.novel_labels),
        plan.steps_per_epoch,
        train.epochs,
    )
    return ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={
            "config": cfg.to_dict(),
            "base_labels": plan.base_labels,
            "novel_labels": plan.novel_labels,
            "steps_per_epoch": plan.steps_per_epoch,
            "datasets": sorted(plan.datasets),
            "run_dir": f"{storage.rstrip('/')}/{train.name}",
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu
        ),
        run_config=ray.train.RunConfig(
            name=train.name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
        ),
        datasets=plan.datasets,
        # Validation runs on rank 0 over the whole val set: exact mAP, no rows dropped by an
        # equal split.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def run_training(cfg: Config) -> ray.train.Result:
    if not ray.is_initialized():
        _init_ray(cfg.train.num_workers)
    return build_trainer(cfg).fit()


def _init_ray(num_workers: int) -> None:
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # the cluster of `ray job submit`
        return
    # Embedded local Ray: every training worker holds a CPU and decoding needs one more, or the
    # data pipeline starves; on a smaller machine the OS shares the cores.
    ray.init(num_cpus=max(os.cpu_count() or 1, num_workers + 1))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ovml train",
        description="Fine-tune on labeled videos with Ray Train (base labels only; novel labels "
        "are evaluated). Rerunning the same command resumes from the latest checkpoint.",
    )
    parser.add_argument("--config", required=True, help="YAML config (e.g. configs/tiny.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config field, e.g. --set train.epochs=3 (repeatable)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = Config.from_yaml(args.config, args.overrides)
        result = run_training(cfg)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if result.error is not None:
        print(f"error: training failed: {result.error}", file=sys.stderr)
        return EXIT_FAILED
    print(f"run: {result.path}")
    if result.checkpoint is not None:
        print(f"model checkpoint: {result.checkpoint.path}/{MODEL_DIR}")
    print(f"metrics: {json.dumps(result.metrics, default=float)}")
    return EXIT_OK
