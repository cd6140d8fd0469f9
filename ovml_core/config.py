"""One configuration for every job: dataclasses loaded from YAML, validated on load.

`Config` holds a section per concern (model, video decoding, tagging, label bank, training).
A bad value fails fast with a `ConfigError` that names the field, e.g. `model.temporal`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(options)}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _check_device(prefix: str, device: str, gpus_field: str, gpus: float | None) -> None:
    """`device` is a known choice, and a GPU count given beside it says the same thing."""
    _choice(f"{prefix}.device", device, ("auto", "cuda", "cpu"))
    if gpus is not None:
        _positive(f"{prefix}.{gpus_field}", gpus, allow_zero=True)
        if gpus == 0 and device != "cpu":
            raise ConfigError(
                f"{prefix}.{gpus_field}: 0 GPUs with {prefix}.device={device}; "
                f"set {prefix}.device=cpu to run on CPU"
            )


@dataclass
class ModelConfig:
    """What the model is: CLIP backbone, temporal branch, label encoder, frozen LLM."""

    clip_model: str = "ovml-tiny"  # open_clip model name; JSON configs in ovml_core/model_configs
    # open_clip pretrained tag ("openai"), "hf-hub:org/repo", or a local .safetensors/.bin file.
    clip_pretrained: str | None = None
    num_frames: int = 8
    temporal: str = "divided"  # divided | neighbor | none
    temporal_blocks: list[int] | None = None  # ViT block indices with the branch; None = all
    label_encoder: str = "soft"  # prompt | soft | text
    prompt_template: str = "a video of {}."
    # "tiny-llama" (random, model_configs/tiny-llama.json), "smollm2" (offline GGUF),
    # a hub id, a local folder, or a .gguf file.
    llm: str = "tiny-llama"
    attribute_instruction: str = "Describe what a video of this looks like:"
    num_prefix: int = 4  # P learnable prefix vectors fed to the LLM
    num_attributes: int = 8  # M generated attribute tokens
    prompting_layers: int = 1  # depth of the prompting transformer (d_llm -> d_clip_text)
    init_scale: float = math.log(10.0)  # logit scale is exp(scale)
    init_bias: float = -10.0
    # Start the scale from the pretrained CLIP's own `logit_scale` instead of init_scale (and
    # the bias from its `logit_bias`, when it has one, as SigLIP-style CLIPs do).
    init_scale_from_clip: bool = False
    seed: int = 0

    def validate(self, prefix: str = "model") -> None:
        _choice(f"{prefix}.temporal", self.temporal, ("divided", "neighbor", "none"))
        _choice(f"{prefix}.label_encoder", self.label_encoder, ("prompt", "soft", "text"))
        _positive(f"{prefix}.num_frames", self.num_frames)
        _positive(f"{prefix}.num_prefix", self.num_prefix)
        _positive(f"{prefix}.num_attributes", self.num_attributes)
        _positive(f"{prefix}.prompting_layers", self.prompting_layers)
        if "{}" not in self.prompt_template:
            raise ConfigError(f"{prefix}.prompt_template: must contain '{{}}' for the label")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        return Config.from_yaml(path).model


def torchcodec_decoder(name: str = "video.decoder") -> Any:
    """torchcodec's VideoDecoder class, or a ConfigError naming `name` when torchcodec or the
    FFmpeg shared libraries it loads are missing."""
    try:
        from torchcodec.decoders import VideoDecoder
    except (ImportError, RuntimeError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{name}: 'torchcodec' is not usable here ({reason}); install it with "
            "pip install 'ovml[torchcodec]' and FFmpeg's shared libraries "
            "(Debian: apt-get install ffmpeg), or use 'pyav'"
        ) from err
    return VideoDecoder


@dataclass
class VideoConfig:
    """Decoding limits: untrusted video never decodes unbounded."""

    max_pixels: int = 3840 * 2160  # width*height of the stream
    max_duration_s: float = 4 * 3600.0
    max_decode_s: float = 60.0  # wall-clock budget per video, remote reads included
    max_bytes: int = 8 << 30  # size of the video file
    decoder_threads: int = 2
    # exact: the frame at each sampled time; decode on, and seek only when a keyframe lies
    # before the next sampled frame (one pass for short clips, a seek per sample for long ones).
    # sequential / seek: exact, never / always seeking.
    # keyframe: the keyframe nearest each sampled time, decoded alone (no decode forward from
    # it); a video whose keyframes are too sparse for that (one farther than half a segment
    # from its time) is sampled exactly.
    # auto: per video, keyframes where each is within a quarter segment of its time (no
    # measurable tag loss, BENCHMARKS.md) and predicted (from the demuxed frame table) at least
    # 2x cheaper, on videos of 30 s and more; exact otherwise. Rows say which (`sampling`).
    mode: str = "auto"  # auto | exact | sequential | seek | keyframe
    # pyav: PyAV's bundled FFmpeg. torchcodec: torchcodec decodes the frames the same plan picks
    # (optional extra `ovml[torchcodec]`, plus FFmpeg's shared libraries, which it does not ship;
    # about on par with PyAV on CPU, see BENCHMARKS.md).
    decoder: str = "pyav"  # pyav | torchcodec

    def validate(self, prefix: str = "video") -> None:
        if self.mode == "cheapest":
            raise ConfigError(f"{prefix}.mode: 'cheapest' is now called 'auto' (the default)")
        modes = ("auto", "exact", "sequential", "seek", "keyframe")
        _choice(f"{prefix}.mode", self.mode, modes)
        _choice(f"{prefix}.decoder", self.decoder, ("pyav", "torchcodec"))
        if self.decoder == "torchcodec":
            torchcodec_decoder(f"{prefix}.decoder")
        _positive(f"{prefix}.max_pixels", self.max_pixels)
        _positive(f"{prefix}.max_duration_s", self.max_duration_s)
        _positive(f"{prefix}.max_decode_s", self.max_decode_s)
        _positive(f"{prefix}.max_bytes", self.max_bytes)
        _positive(f"{prefix}.decoder_threads", self.decoder_threads, allow_zero=True)


@dataclass
class TagConfig:
    """The tagging job: thresholds and how the Ray stages are sized."""

    threshold: float = 0.5
    top_k: int = 5
    batch_size: int = 8  # clips per encode batch
    # CPUs per decode task and per encode actor, and the encode actor's torch threads. None =
    # sized by the job (pipeline.resources.size_tagging): on GPU 1 CPU each; on CPU the encode
    # actors hold the share of the cores that encoding measurably takes, decode the rest.
    decode_num_cpus: float | None = None
    encode_actors: int = 1  # actor pool size of the encode stage (max when autoscaling)
    encode_actors_min: int | None = None  # None = fixed pool of encode_actors
    encode_num_cpus: float | None = None
    # Where clips are encoded. actors: an actor pool (a process per actor, the model in each).
    # driver: the job's own process, which already holds the model; only for CPU encoding.
    # auto: driver when encoding on CPU with one actor on a cluster that is and stays one node
    # (no autoscaler node groups), else actors. (An actor's start-up, ~5 s of imports, is
    # a sixth of a 1,200-video run on 2 cores; BENCHMARKS.md.)
    encode_in: str = "auto"  # auto | actors | driver
    # auto: GPUs when the cluster has or can get GPU nodes (its autoscaler's node groups count,
    # so a GPU group at min_workers 0 is used); cuda: always request GPUs; cpu: never.
    device: str = "auto"  # auto | cuda | cpu
    encode_num_gpus: float | None = None  # GPUs per encode actor on GPU (None = 1)
    torch_threads: int | None = None  # intra-op threads per encode actor (None = sized)
    compile: bool = False  # torch.compile the video encoder in each encode actor
    # Keep each video's embedding in its row: a changed vocabulary is then re-scored from it
    # without decoding; rows without one are encoded again.
    emit_embedding: bool = True
    rescore_batch_size: int = 4096  # stored rows per re-scoring batch
    # Tags per window as well: a video longer than one segment is cut into windows of
    # segment_s seconds (ovml_core.video.segment_windows), each one clip of T frames, stored in
    # the row's `segments`; the video's tags are then the max over its segments. 0 = off.
    segment_s: float = 0.0
    # At most this many windows per video (longer ones get equal, longer windows): the decoded
    # frames of one video are max_segments x T x size^2 x 3 bytes at most.
    max_segments: int = 720
    allowed_schemes: list[str] = field(default_factory=lambda: ["file", "s3", "gs"])
    # rerun videos whose current row has an error (a permanent one only once its file changed)
    retry_errors: bool = True
    rows_per_file: int = 1000  # rows per output part file (what a killed run can lose, at most)
    # Fail the run when no stage of its plan completes a batch for this long (the first one
    # included): a stage that can never be scheduled or hangs stops the job. 0 = wait forever.
    no_progress_timeout_s: float = 1800.0

    def validate(self, prefix: str = "tag") -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"{prefix}.threshold: must be in [0, 1], got {self.threshold!r}")
        _positive(f"{prefix}.top_k", self.top_k, allow_zero=True)
        _positive(f"{prefix}.batch_size", self.batch_size)
        _positive(f"{prefix}.encode_actors", self.encode_actors)
        for name in ("decode_num_cpus", "encode_num_cpus", "torch_threads"):
            if getattr(self, name) is not None:
                _positive(f"{prefix}.{name}", getattr(self, name))
        _positive(f"{prefix}.rows_per_file", self.rows_per_file)
        _positive(f"{prefix}.rescore_batch_size", self.rescore_batch_size)
        if not 0 <= self.segment_s < float("inf"):  # NaN too
            raise ConfigError(
                f"{prefix}.segment_s: must be a number of seconds >= 0 (0 = off), "
                f"got {self.segment_s!r}"
            )
        _positive(f"{prefix}.max_segments", self.max_segments)
        _positive(f"{prefix}.no_progress_timeout_s", self.no_progress_timeout_s, allow_zero=True)
        _check_device(prefix, self.device, "encode_num_gpus", self.encode_num_gpus)
        _choice(f"{prefix}.encode_in", self.encode_in, ("auto", "actors", "driver"))
        if self.encode_in == "driver" and self.device == "cuda":
            raise ConfigError(
                f"{prefix}.encode_in: 'driver' encodes on the job's CPU; with "
                f"{prefix}.device=cuda use 'actors' (or 'auto')"
            )
        for s in self.allowed_schemes:
            _choice(f"{prefix}.allowed_schemes", s, ("file", "s3", "gs"))


@dataclass
class LabelBankConfig:
    """The label bank job: which LLM backend generates the attribute tokens."""

    backend: str = "hf"  # hf (transformers) | vllm
    batch_size: int = 16
    actors: int = 1
    device: str = "auto"  # auto | cuda | cpu, as tag.device
    num_gpus: float | None = None  # GPUs per actor on GPU (None = 1)
    num_cpus: float = 1.0  # CPUs per actor
    torch_threads: int = 1  # intra-op threads per actor
    # Share of GPU memory the vLLM engine takes; the rest holds the frozen LLM of the
    # teacher-forced pass and the CLIP text tower.
    vllm_gpu_memory_utilization: float = 0.5
    no_progress_timeout_s: float = 1800.0  # as tag.no_progress_timeout_s; 0 = wait forever

    def validate(self, prefix: str = "label_bank") -> None:
        _choice(f"{prefix}.backend", self.backend, ("hf", "vllm"))
        _positive(f"{prefix}.batch_size", self.batch_size)
        _positive(f"{prefix}.actors", self.actors)
        _positive(f"{prefix}.num_cpus", self.num_cpus, allow_zero=True)
        _positive(f"{prefix}.torch_threads", self.torch_threads)
        _positive(f"{prefix}.no_progress_timeout_s", self.no_progress_timeout_s, allow_zero=True)
        _check_device(prefix, self.device, "num_gpus", self.num_gpus)
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"{prefix}.vllm_gpu_memory_utilization: must be in (0, 1], "
                f"got {self.vllm_gpu_memory_utilization!r}"
            )


@dataclass
class TrainConfig:
    """Regularized fine-tuning with Ray Train."""

    train_manifest: str | None = None
    val_manifest: str | None = None
    base_labels: list[str] | None = None  # None = every label in the train manifest
    novel_labels: list[str] | None = None  # evaluated only, never trained on
    storage_path: str = "runs"
    name: str = "ovml-train"
    num_workers: int = 1
    use_gpu: bool = False
    # CPUs each training worker holds; decoding the training clips needs CPUs beside them, so
    # a job whose workers would take every CPU of the cluster is refused at once.
    worker_num_cpus: float = 1.0
    epochs: int = 1
    batch_size: int = 8  # clips per worker per step
    grad_accum: int = 1
    lr: float = 1e-3
    lr_temporal: float | None = None  # None = lr
    lr_prefix: float | None = None
    lr_prompting: float | None = None
    lr_clip: float = 0.0  # > 0 unfreezes the CLIP vision tower at this learning rate
    weight_decay: float = 0.01
    warmup_steps: int = 10
    negatives_per_batch: int = 16
    loss: str = "bce"  # bce | asl
    attribute_refresh_steps: int = 50  # R: regenerate attribute token ids every R steps
    regularizers: list[str] = field(default_factory=list)  # distill | l2sp | patch
    distill_weight: float = 1.0
    l2sp_weight: float = 0.01
    patch_alpha: float = 0.5  # exported weights = alpha*pretrained + (1-alpha)*fine-tuned
    patch_loss_weight: float = 0.0
    max_failures: int = 1
    checkpoint_every_steps: int = 0  # 0 = once per epoch
    seed: int = 0
    # Fail the run when no worker completes an optimizer step for this long (the first one
    # included, so workers that are never placed count). 0 = wait forever.
    no_progress_timeout_s: float = 1800.0

    def validate(self, prefix: str = "train") -> None:
        _choice(f"{prefix}.loss", self.loss, ("bce", "asl"))
        for r in self.regularizers:
            _choice(f"{prefix}.regularizers", r, ("distill", "l2sp", "patch"))
        _positive(f"{prefix}.num_workers", self.num_workers)
        _positive(f"{prefix}.worker_num_cpus", self.worker_num_cpus, allow_zero=True)
        _positive(f"{prefix}.epochs", self.epochs)
        _positive(f"{prefix}.batch_size", self.batch_size)
        _positive(f"{prefix}.grad_accum", self.grad_accum)
        _positive(f"{prefix}.lr", self.lr)
        _positive(f"{prefix}.attribute_refresh_steps", self.attribute_refresh_steps)
        _positive(f"{prefix}.no_progress_timeout_s", self.no_progress_timeout_s, allow_zero=True)
        if not 0.0 <= self.patch_alpha <= 1.0:
            raise ConfigError(f"{prefix}.patch_alpha: must be in [0, 1], got {self.patch_alpha!r}")


@dataclass
class Config:
    """Everything a job needs. `Config.from_yaml(path, overrides=["model.temporal=none"])`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    tag: TagConfig = field(default_factory=TagConfig)
    label_bank: LabelBankConfig = field(default_factory=LabelBankConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Config:
        return _build(cls, data or {}, "").validate()

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] | None = None) -> Config:
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            data = _safe_yaml(path.read_text(), str(path)) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: top level must be a mapping of sections")
        for item in overrides or []:
            _apply_override(data, item)
        return cls.from_dict(data)


def _apply_override(data: dict[str, Any], item: str) -> None:
    """`section.key=value`, the value parsed as YAML (so `3`, `true`, `[a, b]` work)."""
    key, sep, raw = item.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    section, name = key.strip().split(".", 1)
    data.setdefault(section, {})[name] = _safe_yaml(raw, f"override {item!r}")


def _safe_yaml(text: str, where: str) -> Any:
    """Plain YAML data only: safe_load refuses tags such as !!python/object, so a config can
    never construct objects or run code."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from err


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, path)
        else:
            kwargs[name] = _coerce(path, value, hint)
    return cls(**kwargs)


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """Check a YAML value against the field's type; ints are accepted where floats are."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads "1e-5" as a string; accept any float literal.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{path}: expected float, got {value!r}") from None
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r}")
    return value
