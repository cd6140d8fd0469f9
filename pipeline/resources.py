"""What a stage asks Ray for, decided from configuration and from what the cluster *can* have.

On an autoscaling cluster the GPU nodes usually do not exist when a job plans its stages
(cluster.yaml's GPU group starts at min_workers 0): asking `ray.cluster_resources()` would say
"no GPU", the actors would request none, and the autoscaler would never start a GPU node. So
`device: auto` counts what the autoscaler's node groups can add (the same source Ray Data and
Ray Train use to size themselves), and falls back to the live cluster only where no autoscaler
publishes its node groups (a local `ray.init()` or `ray start`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import pyarrow as pa
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ovml_core.config import Config, ConfigError, TagConfig

logger = logging.getLogger(__name__)


def autoscaler_max_resources() -> dict[str, float] | None:
    """The most of each resource the autoscaler's node groups can have (at their max_count),
    when it publishes them (autoscaler v2, KubeRay); None without an autoscaler."""
    try:  # ray's own stages read the same private state; it may move between Ray versions
        from ray._private.state import state

        configured = state.get_max_resources_from_cluster_config()
    except (ImportError, AttributeError, RuntimeError) as err:
        logger.debug("no autoscaler node groups readable (%s); using the live cluster", err)
        configured = None
    return dict(configured) if configured else None


def max_cluster_resources() -> dict[str, float]:
    """The most of each resource the cluster can have: its autoscaler's node groups, else the
    nodes there now."""
    return autoscaler_max_resources() or ray.cluster_resources()


def only_the_driver_node() -> bool:
    """True when the cluster is the driver's node alone and no autoscaler can add another: a
    local `ray.init()` or a single `ray start`, not a Ray Client connection."""
    if ray.util.client.ray.is_connected() or autoscaler_max_resources() is not None:
        return False
    alive = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    return alive == [ray.get_runtime_context().get_node_id()]


def encode_in_driver(tag: TagConfig, encode_num_gpus: float) -> bool:
    """Whether the tagging job encodes in its own process (tag.encode_in) rather than in an
    actor pool. auto: on CPU, one actor, on a cluster that is and stays the driver's node,
    where an actor would only repeat the driver's imports and model load."""
    if tag.encode_in != "auto":
        return tag.encode_in == "driver"
    one_actor = tag.encode_actors == 1 and tag.encode_actors_min is None
    return encode_num_gpus == 0 and one_actor and only_the_driver_node()


def gpus_per_actor(device: str, num_gpus: float | None, field: str) -> float:
    """GPUs each actor of a stage requests. `device` is auto | cuda | cpu, `num_gpus` the count
    per actor on GPU (None = 1); `field` names the config section for messages."""
    if device == "cpu":
        return 0.0
    gpus = 1.0 if num_gpus is None else num_gpus
    if device == "cuda":
        return gpus
    if max_cluster_resources().get("GPU", 0) > 0:
        return gpus
    logger.warning(
        "%s.device=auto: this cluster has no GPU and its autoscaler can add none, so this stage "
        "runs on CPU; set %s.device=cuda to wait for GPU nodes, or %s.device=cpu to silence this",
        field,
        field,
        field,
    )
    return 0.0


def actor_device(num_gpus: float) -> str:
    """The torch device of an actor that asked Ray for `num_gpus`: "cuda" when it got GPUs,
    else "cpu". Never a silent fallback: GPUs granted but invisible to torch is an error."""
    if num_gpus <= 0:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"this actor was given {num_gpus:g} GPU(s) by Ray (ids {ray.get_gpu_ids()}) but "
            "torch sees no CUDA device: a CPU-only torch build, or a node that declares GPUs "
            "it does not have"
        )
    return "cuda"


def on_driver_node() -> NodeAffinitySchedulingStrategy:
    """Scheduling for the small actors a job talks to on every batch or step (stage meter,
    step counter): the driver's node, which the job cannot outlive anyway; on a worker node
    they would die with it, and spot preemption is routine."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def init_ray() -> None:
    """Connect to RAY_ADDRESS (`ray job submit`, a cluster) or to the local cluster a `ray
    start` left running, else start one on this machine without the dashboard: a one-shot
    job does not need it, and it costs seconds of start-up and a process on a busy CPU."""
    if not ray.is_initialized():
        ray.init(include_dashboard=bool(os.environ.get("RAY_ADDRESS")))


def training_decode_cpus(cfg: Config) -> float:
    """CPUs per decode task of the training input: tag.decode_num_cpus, 1 when sized by the
    job (training's workers hold their own CPUs; decode tasks take one core each)."""
    return cfg.tag.decode_num_cpus or 1.0


# Without a measurement: the share of a CPU node's work that encoding takes. Only a fallback;
# the tagging job measures its model and videos (pipeline.tagging.size_stages).
DEFAULT_ENCODE_SHARE = 0.5


@dataclass(frozen=True)
class TagSizing:
    """What each stage of the tagging plan asks Ray for."""

    encode_num_gpus: float
    encode_num_cpus: float
    torch_threads: int
    decode_num_cpus: float
    decode_slots: float  # decode tasks that run at once beside the encode actors
    decode_rows_per_task: int  # videos per decode task (Ray Data block)
    encode_share: float | None = None  # measured share of the work that is encoding
    # Encoding runs in the driver (tag.encode_in): encode_num_cpus is then what decode leaves
    # to it, not a Ray request.
    encode_in_driver: bool = False

    def format_line(self) -> str:
        share = "" if self.encode_share is None else f" (encode {self.encode_share:.0%} of work)"
        gpus = f"{self.encode_num_gpus:g} GPU + " if self.encode_num_gpus else ""
        where = "encode in the driver" if self.encode_in_driver else "encode actor"
        return (
            f"  sizing    {where} {gpus}{self.encode_num_cpus:g} CPU, "
            f"{self.torch_threads} thread(s); decode tasks {self.decode_num_cpus:g} CPU, "
            f"{self.decode_slots:g} at once, {self.decode_rows_per_task} video(s) each{share}"
        )


# Videos per decode task at most, when their decode cost is not measured (GPU nodes): a
# task's videos reach the encoder together, so a long task delays the first batch and leaves
# slots idle at the end of a run. When measured: about DECODE_TASK_S of work per task, enough
# to amortise the per-task and per-block overhead of Ray Data (tens of ms) on cheap videos.
MAX_DECODE_ROWS_PER_TASK = 16
DECODE_TASK_S = 1.0
# CPUs per part-file write task: none reserved. Writing a block of tag rows is light, and a
# write task that asked for a whole CPU waited for a decode slot to free up each time, which
# idled decode about half of a run on a 2-core node.
WRITE_NUM_CPUS = 0


def size_tagging(
    tag: TagConfig,
    cpus: float,
    encode_num_gpus: float,
    videos: int,
    encode_share: float | None = None,
    decode_s: float | None = None,
    in_driver: bool = False,
) -> TagSizing:
    """Fill the fields of `tag` left to the job (None) for a cluster of `cpus` CPUs.

    On GPU the encode actor needs one host thread; decode tasks take a CPU each. On CPU the
    encode actors hold the share of the cores that encoding takes (`encode_share`, measured;
    at least 0.01 CPU, at most all but one core between them) and as many threads; decode
    tasks are sized so that one per core fits in the rest, so every core the encoder does
    not use decodes (`in_driver`: the driver encodes, in the same share). Fields set in the
    config are kept as they are.

    Each decode task takes a few of the `videos`: at least 4 tasks per slot, so every slot has
    work from the start and the first batch comes early; and about DECODE_TASK_S of decoding
    when `decode_s` (seconds per video) was measured, else at most tag.batch_size and
    MAX_DECODE_ROWS_PER_TASK videos (the encoder gathers its batches across tasks)."""
    actors = tag.encode_actors
    on_gpu = encode_num_gpus > 0
    if on_gpu:
        encode = tag.encode_num_cpus or 1.0
        threads = tag.torch_threads or 1
    else:
        share = DEFAULT_ENCODE_SHARE if encode_share is None else encode_share
        most = max(cpus - min(1.0, cpus / 2), 0.01) / actors
        encode = tag.encode_num_cpus or min(max(_ceil(share * cpus / actors), 0.01), most)
        threads = tag.torch_threads or max(1, round(encode))
    free = max(cpus - actors * encode, 0.0)
    one_per_core = max(_floor(free / max(cpus, 1.0)), 0.01)
    decode = tag.decode_num_cpus or (1.0 if on_gpu else one_per_core)
    slots = math.floor(free / decode + 1e-9)
    per_task = math.ceil(videos / (4 * max(slots, 1)))
    if decode_s:
        cap = math.floor(DECODE_TASK_S / decode_s)
    else:
        cap = min(tag.batch_size, MAX_DECODE_ROWS_PER_TASK)
    rows = max(1, min(per_task, cap))
    return TagSizing(encode_num_gpus, encode, threads, decode, slots, rows, encode_share, in_driver)


def task_blocks(rows: pa.Table, rows_per_task: int) -> ray.data.Dataset:
    """`rows` as a Dataset of blocks of `rows_per_task` rows, one map task each, cut here on
    the driver: a repartition would be a task of its own (a whole CPU) that every decode task
    waits for, at the start of a run when workers are still starting. `from_blocks`, not
    `from_arrow`: that one reads each block's metadata in a task of its own, which on a
    cluster with no free CPU waits forever, before the plan and its no-progress watch start."""
    blocks = [rows.slice(i, rows_per_task) for i in range(0, rows.num_rows, rows_per_task)]
    return ray.data.from_blocks(blocks or [rows])


def _ceil(x: float) -> float:
    return math.ceil(round(x * 100, 6)) / 100


def _floor(x: float) -> float:
    return math.floor(round(x * 100, 6)) / 100


def check_training_fits(cfg: Config) -> None:
    """Refuse, before any worker starts, a training job whose workers would hold every CPU the
    cluster can have: its decode tasks would never be scheduled and the job would wait forever
    (Ray Data reports it only as backpressure)."""
    train = cfg.train
    cpus = max_cluster_resources().get("CPU", 0.0)
    held = train.num_workers * train.worker_num_cpus
    decode = training_decode_cpus(cfg)
    if held + decode <= cpus:
        return
    room = max(cpus - decode, 0.0) / train.num_workers
    raise ConfigError(
        f"train.num_workers={train.num_workers} x train.worker_num_cpus="
        f"{train.worker_num_cpus:g} CPUs leave no room for decoding "
        f"(tag.decode_num_cpus={decode:g}) on this cluster, which has at most "
        f"{cpus:g} CPUs: set train.worker_num_cpus to {room:g} or less, use fewer workers, "
        "or add CPU nodes"
    )
