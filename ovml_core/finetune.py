"""Regularized fine-tuning, the parts that are plain PyTorch (the Ray Train loop is
`pipeline.training`): which parameters train at which learning rate, the schedule, the loss of
one batch with its regularizers, validation, exporting, and resumable training state.

"Pretrained" means the model as `create_model` builds it. Its temporal branch is
zero-initialised, so at that point the video tower is exactly frame-mean CLIP. `patch` and
`l2sp` act only on the weights the fine-tuned model shares with zero-shot CLIP, its vision
tower: `patch` exports them interpolated towards their pretrained values (weight patching,
Ilharco et al. 2022), `l2sp` pulls them back (L2-SP, Li et al. 2018). Parameters new to
fine-tuning (temporal branch, prefix, prompting, scale, bias) have no zero-shot value: they keep
their fine-tuned values and get plain weight decay; pulling the temporal branch back to its zero
init undid what it learned (Moving Fashion, BENCHMARKS.md). `distill` pulls video and label
features towards a frozen frame-mean CLIP with plain prompts (the teacher).
The CLIP text tower and the LLM never train, so the label side is regularized by `distill` only,
and only with `soft` or `text` labels: with `prompt` labels student and teacher read the same
prompt with the same frozen tower, the label term is zero and `distill` pulls the video only.

Training state is safetensors + JSON, never pickle.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ovml_core.checkpoint import CheckpointError, save_checkpoint
from ovml_core.config import ConfigError, ModelConfig, TrainConfig
from ovml_core.losses import asymmetric_loss, bce_loss, sample_labels
from ovml_core.metrics import base_novel_map, subset_map
from ovml_core.model import OVMLModel, as_stored, create_model
from ovml_core.regularizers import (
    distillation_loss,
    draw_alpha,
    interpolated_loss,
    l2sp_penalty,
    patched,
    reference_state,
)

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
LOSSES = {"bce": bce_loss, "asl": asymmetric_loss}


# ---------------------------------------------------------------- what trains, how fast


def set_trainable(model: OVMLModel, train: TrainConfig) -> None:
    """Unfreeze the CLIP vision weights only when `train.lr_clip > 0`; the rest is fixed by the
    model itself (text tower and LLM frozen; temporal branch, prefix, prompting, scale, bias
    trainable)."""
    for param in model.visual.clip_parameters():
        param.requires_grad_(train.lr_clip > 0)


def parameter_groups(model: OVMLModel, train: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups, each with a `name`, its own lr and `(name, parameter)` pairs (so the
    optimizer records `param_names`).

    Every trainable parameter is in exactly one group; a trainable parameter the groups do not
    know (e.g. in the frozen text tower or LLM) is an error rather than silently trained.
    """
    soft = model.labels.soft
    # Prefix vectors are token embeddings and scale/bias are scalars: decaying them towards
    # zero has no meaning, so they get no weight decay.
    candidates = [
        ("temporal", model.visual.temporal_parameters(), train.lr_temporal, train.weight_decay),
        ("clip_vision", model.visual.clip_parameters(), train.lr_clip, train.weight_decay),
        ("prefix", [soft.prefix] if soft else [], train.lr_prefix, 0.0),
        (
            "prompting",
            soft.prompting.parameters() if soft else [],
            train.lr_prompting,
            train.weight_decay,
        ),
        ("scale_bias", [model.logit_scale, model.logit_bias], train.lr, 0.0),
    ]
    names = {id(p): n for n, p in model.named_parameters()}
    groups, grouped = [], set()
    for name, params, lr, decay in candidates:
        params = [p for p in params if p.requires_grad]
        if params:
            grouped |= {id(p) for p in params}
            groups.append(
                {
                    "name": name,
                    "params": [(names[id(p)], p) for p in params],
                    "lr": train.lr if lr is None else lr,
                    "weight_decay": decay,
                }
            )
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
    if stray:
        raise ValueError(f"trainable parameters outside every group: {stray[:5]}")
    return groups


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(
    model: OVMLModel, train: TrainConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(parameter_groups(model, train))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, train.warmup_steps, total_steps)
    )
    return optimizer, scheduler


# ---------------------------------------------------------------- the loss of one batch


def teacher_config(model: ModelConfig) -> ModelConfig:
    """The pretrained model: frame-mean CLIP for video and plain prompts for labels."""
    return replace(model, temporal="none", label_encoder="prompt")


def create_teacher(model: ModelConfig, device: str | torch.device = "cpu") -> OVMLModel:
    """The frozen distillation teacher (same CLIP weights and seed as the student at init)."""
    return create_model(teacher_config(model), device).requires_grad_(False).eval()


class StudentForward(nn.Module):
    """Video and label embeddings and logits in one `forward`, the unit DDP synchronises."""

    def __init__(self, model: OVMLModel):
        super().__init__()
        self.model = model

    def forward(
        self, frames: torch.Tensor, labels: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        video = self.model.encode_video(frames)
        label_emb = self.model.encode_labels(labels)
        return video, label_emb, self.model.logits(video, label_emb)


class Objective:
    """Task loss plus the configured regularizers for one batch.

    Holds what the regularizers compare against, made once per worker at init: the frozen
    teacher (`distill`) and the pretrained CLIP vision weights (`l2sp`, `patch`).
    """

    def __init__(self, model: OVMLModel, train: TrainConfig, base_labels: list[str]):
        self.train = train
        self.base_labels = list(base_labels)
        self.loss_fn = LOSSES[train.loss]
        self.teacher = (
            create_teacher(model.config, model.device) if "distill" in train.regularizers else None
        )
        check_regularizers(model.config, train)
        uses_pretrained = {"l2sp", "patch"} & set(train.regularizers)
        # Named as in `model.visual.visual`; the temporal branch is not in it.
        self.pretrained_clip = reference_state(model.visual.visual) if uses_pretrained else None

    def __call__(
        self,
        student: nn.Module,
        model: OVMLModel,
        frames: torch.Tensor,
        base_targets: torch.Tensor,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """`base_targets` [B, num_base] 0/1 -> {"task", "regularizer", "total"} (scalars)."""
        positives = [
            [self.base_labels[j] for j in row.nonzero().flatten().tolist()] for row in base_targets
        ]
        labels, targets = sample_labels(
            positives, self.base_labels, self.train.negatives_per_batch, generator
        )
        targets = targets.to(frames.device)
        video, label_emb, logits = student(frames, labels)
        task = self.loss_fn(logits.float(), targets)
        reg = self.regularizer(model, frames, labels, video, label_emb, targets, generator)
        return {"task": task, "regularizer": reg, "total": task + reg}

    def regularizer(
        self,
        model: OVMLModel,
        frames: torch.Tensor,
        labels: list[str],
        video: torch.Tensor,
        label_emb: torch.Tensor,
        targets: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        train = self.train
        reg = torch.zeros((), device=video.device)
        if self.teacher is not None:
            with torch.no_grad():
                teacher_video = self.teacher.encode_video(frames)
                teacher_labels = self.teacher.encode_labels(labels)
            reg = reg + train.distill_weight * (
                distillation_loss(video.float(), teacher_video.float())
                + distillation_loss(label_emb.float(), teacher_labels.float())
            )
        if "l2sp" in train.regularizers:
            reg = reg + train.l2sp_weight * l2sp_penalty(model.visual.visual, self.pretrained_clip)
        if "patch" in train.regularizers and train.patch_loss_weight > 0:

            def loss_at_interpolated_weights() -> torch.Tensor:
                logits = model.logits(model.encode_video(frames), label_emb)
                return self.loss_fn(logits.float(), targets)

            alpha = draw_alpha(generator=generator)
            reg = reg + train.patch_loss_weight * interpolated_loss(
                model.visual.visual, self.pretrained_clip, alpha, loss_at_interpolated_weights
            )
        return reg


def check_regularizers(model: ModelConfig, train: TrainConfig) -> None:
    """`l2sp` and `patch` act on the CLIP vision weights only: they must train."""
    for name in ("l2sp", "patch"):
        if name in train.regularizers and train.lr_clip <= 0:
            raise ConfigError(
                f"train.regularizers: {name} acts on the CLIP vision weights (the temporal "
                "branch is new and has no pretrained value), but train.lr_clip is 0 (frozen): "
                f"set train.lr_clip > 0 or drop {name}"
            )


# ---------------------------------------------------------------- validation and export


@torch.no_grad()
def evaluate(
    model: OVMLModel,
    batches: Iterable[dict[str, torch.Tensor]],
    labels: list[str],
    base_labels: list[str],
    novel_labels: list[str],
) -> dict[str, float]:
    """mAP over `batches` of {"frames", "targets" [B, len(labels)]}: base, and with novel
    labels also novel and their harmonic mean."""
    was_training = model.training
    model.eval()
    label_emb = model.encode_labels(labels)
    scores, targets = [], []
    for batch in batches:
        video = as_stored(model.encode_video(batch["frames"]))  # scored as tagging scores it
        scores.append(model.score(video, label_emb).float().cpu())
        targets.append(batch["targets"].float().cpu())
    model.train(was_training)
    if not scores:
        return {}
    scores, targets = torch.cat(scores), torch.cat(targets)
    if novel_labels:
        result = base_novel_map(scores, targets, labels, base_labels, novel_labels)
        return {k: float(result[k]) for k in ("map_base", "map_novel", "harmonic_mean")}
    return {"map_base": subset_map(scores, targets, labels, base_labels).value}


@contextmanager
def exported_weights(model: OVMLModel, objective: Objective) -> Iterator[OVMLModel]:
    """`model` with the weights `export_model` saves, inside the block: validation measures
    the model that is exported."""
    if "patch" not in objective.train.regularizers:
        yield model
        return
    with patched(model.visual.visual, objective.pretrained_clip, objective.train.patch_alpha):
        yield model


def export_model(model: OVMLModel, directory: str | Path, objective: Objective) -> Path:
    """The deliverable checkpoint (`load_checkpoint` reads it). With `patch`, its CLIP vision
    weights are interpolated towards the pretrained ones and every new parameter keeps its
    fine-tuned value; training itself continues from the un-interpolated weights, which
    `save_training_state` keeps."""
    with exported_weights(model, objective):
        return save_checkpoint(model, directory)


# ---------------------------------------------------------------- resumable training state


@dataclass
class Progress:
    """Where training stands. `batches_done` counts micro-batches of the current epoch."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def save_training_state(
    directory: str | Path,
    model: OVMLModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    progress: Progress,
) -> Path:
    """Un-interpolated trainable weights, optimizer moments, schedule and progress."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(directory / TRAINABLE_FILE))
    state = optimizer.state_dict()
    moments = {
        f"{index}.{key}": value.detach().cpu().contiguous()
        for index, param_state in state["state"].items()
        for key, value in param_state.items()
    }
    save_file(moments, str(directory / OPTIMIZER_FILE))
    schedule = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {
        "model": asdict(model.config),
        "param_groups": state["param_groups"],
        "scheduler": schedule,
        "progress": asdict(progress),
    }
    (directory / STATE_FILE).write_text(json.dumps(json_safe(meta), indent=1))
    return directory


def load_training_state(
    directory: str | Path,
    model: OVMLModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
) -> Progress:
    """Restore what `save_training_state` wrote into freshly built model/optimizer/scheduler."""
    directory = Path(directory)
    meta = json.loads((directory / STATE_FILE).read_text())
    check_same_model(meta, model.config, str(directory))
    groups = meta["param_groups"]
    expected = [(g["name"], g["param_names"]) for g in optimizer.param_groups]
    if [(g["name"], g["param_names"]) for g in groups] != expected:
        raise CheckpointError(
            f"{directory}: trained parameter groups differ from this run's "
            "(train.lr_clip or the model changed); use a new train.name"
        )
    weights = load_file(str(directory / TRAINABLE_FILE))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(directory / OPTIMIZER_FILE)).items():
        index, name = key.split(".", 1)
        moments.setdefault(int(index), {})[name] = value
    for group in groups:
        group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": moments, "param_groups": groups})
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(groups)})
    return Progress(**meta["progress"])


def check_same_model(state: dict[str, Any], model: ModelConfig, source: str) -> None:
    """Resuming trains the model it started with: a changed `model.*` field is an error
    (`state` is the content of a training state's state.json)."""
    saved, current = state["model"], asdict(model)
    changed = sorted(k for k in current if saved.get(k) != current[k])
    if changed:
        raise ConfigError(
            f"model.{changed[0]}: {current[changed[0]]!r} differs from {saved.get(changed[0])!r} "
            f"of the run being resumed ({source}); use a new train.name for a different model"
        )


def json_safe(value: Any) -> Any:
    """`value` with NaN/inf (e.g. mAP without positives) as None: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def with_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """(item, is_last) pairs, looking one item ahead."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


def step_generator(seed: int, rank: int, step: int, micro_batch: int) -> torch.Generator:
    """Label sampling randomness that a resumed run reproduces exactly."""
    generator = torch.Generator()
    generator.manual_seed(((seed * 1_000_003 + step) * 1_009 + micro_batch) * 1_013 + rank)
    return generator
