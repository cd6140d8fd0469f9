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

Soft attribute ids: every base label's ids are generated from the current prefix at the start,
every `train.attribute_refresh_steps` steps and after the last step, so the final validation
and the exported model use ids of the final prefix, for base and novel labels alike; the
exported model stores them (`ovml_core.checkpoint`), and a resumed run continues with the
ids and generation prefix of its checkpoint. The run folder holds the latest exported model
(`model/`, the path to tag with), `attributes.json` (each base label's attribute text as that
model encodes it) and `metrics.json` / `metrics.csv`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from torch.nn.parallel import DistributedDataParallel

from ovml_core.checkpoint import CONFIG_FILE, load_label_state
from ovml_core.clip import clip_image_params, create_clip, resolve_pretrained
from ovml_core.config import Config
from ovml_core.finetune import (
    STATE_FILE,
    Objective,
    Progress,
    StudentForward,
    build_optimizer,
    check_regularizers,
    check_same_model,
    evaluate,
    export_model,
    exported_weights,
    json_safe,
    load_training_state,
    save_training_state,
    set_trainable,
    step_generator,
    with_last,
)
from ovml_core.model import OVMLModel, create_model
from pipeline.cli import EXIT_FAILED, EXIT_OK, job_parser, print_error, run_job
from pipeline.manifest import resolve
from pipeline.parquet_io import atomic_output, write_text_atomic
from pipeline.progress import (
    Stall,
    fit_watched,
    step_counter,
)
from pipeline.resources import check_training_fits
from pipeline.training_data import plan_training

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
STATE_DIR = "train_state"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
ATTRIBUTES_JSON = "attributes.json"
# Resuming needs only the latest checkpoint; one older one survives an interrupted upload.
CHECKPOINTS_TO_KEEP = 2


# ---------------------------------------------------------------- the loop (one per worker)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    WorkerRun(loop_config).run()


class WorkerRun:
    """One Train worker's part of the run: its model, optimizer and schedule (fresh, or
    restored from the run's latest checkpoint), its data shard, validation (rank 0), reports."""

    def __init__(self, loop_config: dict[str, Any]):
        self.cfg = Config.from_dict(loop_config["config"])
        self.train = self.cfg.train
        self.run_dir = loop_config["run_dir"]
        self.base, self.novel = loop_config["base_labels"], loop_config["novel_labels"]
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

        self.model = create_model(self.cfg.model, self.device)
        set_trainable(self.model, self.train)
        # Made before any restore: it keeps the pretrained state the regularizers pull towards.
        self.objective = Objective(self.model, self.train, self.base)
        total_steps = loop_config["steps_per_epoch"] * self.train.epochs
        self.optimizer, self.scheduler = build_optimizer(self.model, self.train, total_steps)
        self.progress = self._restore()
        self.resumed_from = self.progress.step
        # Buffers are constants (masks, rotary tables): no need to broadcast them every step.
        self.student = ray.train.torch.prepare_model(
            StudentForward(self.model), parallel_strategy_kwargs={"broadcast_buffers": False}
        )
        self.meter = _Meter(self.device)
        self.shard = ray.train.get_dataset_shard("train")
        self.step_counter = loop_config.get("step_counter")  # the driver's progress watch
        has_val = "val" in loop_config["datasets"]
        self.val = ray.train.get_dataset_shard("val") if has_val else None

    def _restore(self) -> Progress:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            self.regenerate_attributes()
            return Progress()
        with checkpoint.as_directory() as directory:
            progress = load_training_state(
                Path(directory) / STATE_DIR, self.model, self.optimizer, self.scheduler
            )
            load_label_state(self.model, Path(directory) / MODEL_DIR)
        logger.info("rank %d resumes at step %d", self.rank, progress.step)
        return progress

    def run(self) -> None:
        self.model.train()
        for epoch in range(self.progress.epoch, self.train.epochs):
            self.train_epoch(last_epoch=epoch == self.train.epochs - 1)
            self.progress.epoch, self.progress.batches_done = epoch + 1, 0
            self.report(self.validate())

    def train_epoch(self, last_epoch: bool) -> None:
        train, progress = self.train, self.progress
        batches = self.shard.iter_torch_batches(batch_size=train.batch_size, device=self.device)
        for index, (batch, is_last) in enumerate(with_last(batches)):
            if index < progress.batches_done:
                continue  # done before the restart this run resumed from
            boundary = is_last or (index + 1) % train.grad_accum == 0
            with _gradient_sync(self.student, boundary), _autocast(self.device):
                generator = step_generator(train.seed, self.rank, progress.step, index)
                losses = self.objective(
                    self.student, self.model, batch["frames"], batch["targets"], generator
                )
            (losses["total"] / train.grad_accum).backward()
            self.meter.add(losses, len(batch["frames"]))
            if boundary:
                self.optimizer_step(index, last=last_epoch and is_last)
                every = train.checkpoint_every_steps
                if every and progress.step % every == 0 and not is_last:
                    self.report({})

    def optimizer_step(self, index: int, last: bool) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step, self.progress.batches_done = self.progress.step + 1, index + 1
        if self.step_counter is not None:
            self.step_counter.step.remote()  # not waited for
        if last or self.progress.step % self.train.attribute_refresh_steps == 0:
            self.regenerate_attributes()

    def regenerate_attributes(self) -> None:
        """The LLM writes for every base label in one batch: in `soft` mode ids from the
        current prefix, which becomes the generation prefix (novel labels get theirs from it
        when validation first encodes them); in `text` mode the descriptions, once."""
        soft = self.model.labels.soft
        if soft is not None:
            soft.regenerate(self.base)
        else:
            self.model.label_attributes(self.base)

    def validate(self) -> dict[str, float]:
        """Base (and novel) mAP of the model as exported, over the whole val set, on rank 0;
        {} elsewhere."""
        if self.rank != 0 or self.val is None:
            return {}
        batches = self.val.iter_torch_batches(batch_size=self.train.batch_size, device=self.device)
        with _autocast(self.device), exported_weights(self.model, self.objective) as exported:
            metrics = evaluate(exported, batches, self.base + self.novel, self.base, self.novel)
        logger.info("after epoch %d: %s", self.progress.epoch, metrics)
        return metrics

    def report(self, val_metrics: dict[str, float]) -> None:
        """Every worker calls this at the same points (the loss average is a collective)."""
        metrics = {
            "epochs_done": self.progress.epoch,
            "step": self.progress.step,
            "resumed_from_step": self.resumed_from,
            **self.meter.summary(self.world_size),
            **{f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups},
            **val_metrics,
        }
        _report(metrics, self)


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


def _report(metrics: dict[str, Any], run: WorkerRun) -> None:
    """`ray.train.report` is a barrier for all workers; rank 0 writes the checkpoint and the
    metrics files, the others report metrics only."""
    progress = run.progress
    progress.history.append(metrics)
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if run.rank == 0:
            # Before the export: what the LLM writes for a label not encoded yet (a `text`
            # description) is then stored with the model, which tags with exactly that.
            attributes = label_attributes(run.model, run.base)
            exported = export_model(run.model, Path(directory) / MODEL_DIR, run.objective)
            save_training_state(
                Path(directory) / STATE_DIR, run.model, run.optimizer, run.scheduler, progress
            )
            publish_model(exported, run.run_dir)
            if attributes is not None:
                write_text_atomic(f"{run.run_dir}/{ATTRIBUTES_JSON}", json.dumps(attributes))
            write_metrics(run.run_dir, progress.history)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=f"checkpoint_epoch{progress.epoch:04d}_step{progress.step:08d}",
        )


def publish_model(exported: Path, run_dir: str) -> None:
    """The exported model also at `<run folder>/model/` (local path or s3:// / gs://), file by
    file and config.json last: a reader that catches it half-way is refused by
    `load_checkpoint` (config.json records the other files' sha256), never given a mix."""
    target = f"{run_dir.rstrip('/')}/{MODEL_DIR}"
    fs, path = resolve(target)
    fs.create_dir(path, recursive=True)
    for file in sorted(exported.iterdir(), key=lambda f: f.name == CONFIG_FILE):
        with atomic_output(fs, f"{path}/{file.name}") as out:
            out.write(file.read_bytes())


def label_attributes(model: OVMLModel, labels: list[str]) -> dict[str, str] | None:
    """What attributes.json holds: label -> what the LLM wrote for it (soft: the decoded
    attribute ids; text: the description), as the model encodes it now; None for `prompt`."""
    if model.labels.cache is None:
        return None
    return dict(zip(labels, model.label_attributes(labels), strict=True))


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
        write_text_atomic(f"{run_dir.rstrip('/')}/{name}", data)


# ---------------------------------------------------------------- driver


def storage_uri(storage_path: str) -> str:
    """Ray Train needs an absolute local path or a URI."""
    return storage_path if "://" in storage_path else os.path.abspath(storage_path)


def run_folder(cfg: Config) -> str:
    """`train.storage_path/train.name`: checkpoints, metrics and the exported `model/`."""
    return f"{storage_uri(cfg.train.storage_path).rstrip('/')}/{cfg.train.name}"


def build_trainer(
    cfg: Config,
    train_loop: Callable[[dict[str, Any]], None] = train_loop_per_worker,
    step_counter: ray.actor.ActorHandle | None = None,
) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer for `cfg`; the same `train.storage_path` + `train.name` resumes. With a
    `pipeline.progress.StepCounter`, workers count their steps on it for `fit_watched`."""
    cfg = with_absolute_clip_weights(cfg)
    train = cfg.train
    check_regularizers(cfg.model, train)
    check_training_fits(cfg)
    storage = storage_uri(train.storage_path)
    run_dir = run_folder(cfg)
    check_resumable(cfg, run_dir)
    model = cfg.model
    image_size = clip_image_params(create_clip(model.clip_model, model.clip_pretrained))[0]
    plan = plan_training(cfg, image_size)
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
            "run_dir": run_dir,
            "step_counter": step_counter,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={
                "CPU": train.worker_num_cpus,
                **({"GPU": 1} if train.use_gpu else {}),
            },
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


def with_absolute_clip_weights(cfg: Config) -> Config:
    """Ray Train runs its workers in the run's folder, where a CLIP weights file named relative
    to the driver's working directory does not resolve: name it absolutely here."""
    source = resolve_pretrained(cfg.model.clip_model, cfg.model.clip_pretrained)
    if source.kind != "file" or os.path.isabs(source.ref):
        return cfg
    return replace(cfg, model=replace(cfg.model, clip_pretrained=os.path.abspath(source.ref)))


def check_resumable(cfg: Config, run_dir: str) -> None:
    """Fail on the driver, before any worker starts, when `train.name` already holds a run of
    another model (the workers would fail on restore, and be retried, otherwise)."""
    try:
        previous = ray.train.Result.from_path(run_dir)
    except RuntimeError:
        return  # no run there yet
    if previous.checkpoint is None:
        return
    checkpoint = previous.checkpoint
    state_path = f"{checkpoint.path}/{STATE_DIR}/{STATE_FILE}"
    with checkpoint.filesystem.open_input_stream(state_path) as f:
        check_same_model(json.loads(f.read()), cfg.model, run_dir)
    logger.info("resuming %s from %s", run_dir, checkpoint_uri(checkpoint))


def checkpoint_uri(checkpoint: ray.train.Checkpoint) -> str:
    scheme = {"s3": "s3://", "gcs": "gs://"}.get(checkpoint.filesystem.type_name, "")
    return scheme + checkpoint.path


def run_training(cfg: Config) -> ray.train.Result:
    """Train `cfg`; stopped with `NoProgressError` when no optimizer step completes for
    train.no_progress_timeout_s (workers never placed, data never decoded, a hung step)."""
    if not ray.is_initialized():
        _init_ray(cfg.train.num_workers)
    train = cfg.train
    counter = step_counter()
    what = f"an optimizer step of the {train.num_workers} training workers"
    stall = Stall("train.no_progress_timeout_s", train.no_progress_timeout_s, what)
    try:
        return fit_watched(lambda: build_trainer(cfg, step_counter=counter), counter, stall)
    finally:
        ray.kill(counter)


def _init_ray(num_workers: int) -> None:
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # the cluster of `ray job submit`
        return
    # Embedded local Ray: every training worker holds a CPU and decoding needs one more, or the
    # data pipeline starves; on a smaller machine the OS shares the cores.
    ray.init(num_cpus=max(os.cpu_count() or 1, num_workers + 1))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(
        "ovml train",
        "Fine-tune on labeled videos with Ray Train (base labels only; novel labels "
        "are evaluated). Rerunning the same command resumes from the latest checkpoint.",
        "train.epochs=3",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        cfg = Config.from_yaml(args.config, args.overrides)
        try:
            result = run_training(cfg)
        except ray.train.TrainingFailedError as err:
            message = f"training failed; rerun the same command to resume: {err}"
            return print_error(message, EXIT_FAILED)
        print(f"run: {result.path}")
        if result.checkpoint is not None:
            print(f"exported model (tag with it): {run_folder(cfg)}/{MODEL_DIR}")
        print(f"metrics: {json.dumps(result.metrics, default=float)}")
        return EXIT_OK

    return run_job(body)
