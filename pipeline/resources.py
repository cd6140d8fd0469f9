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

import ray
import torch

from ovml_core.config import Config, ConfigError

logger = logging.getLogger(__name__)


def max_cluster_resources() -> dict[str, float]:
    """The most of each resource the cluster can have: its autoscaler's node groups at their
    max_count when it publishes them (autoscaler v2, KubeRay), else the nodes there now."""
    try:  # ray's own stages read the same private state; it may move between Ray versions
        from ray._private.state import state

        configured = state.get_max_resources_from_cluster_config()
    except (ImportError, AttributeError, RuntimeError) as err:
        logger.debug("no autoscaler node groups readable (%s); using the live cluster", err)
        configured = None
    return dict(configured) if configured else ray.cluster_resources()


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


def check_training_fits(cfg: Config) -> None:
    """Refuse, before any worker starts, a training job whose workers would hold every CPU the
    cluster can have: its decode tasks would never be scheduled and the job would wait forever
    (Ray Data reports it only as backpressure)."""
    train = cfg.train
    cpus = max_cluster_resources().get("CPU", 0.0)
    held = train.num_workers * train.worker_num_cpus
    if held + cfg.tag.decode_num_cpus <= cpus:
        return
    room = max(cpus - cfg.tag.decode_num_cpus, 0.0) / train.num_workers
    raise ConfigError(
        f"train.num_workers={train.num_workers} x train.worker_num_cpus="
        f"{train.worker_num_cpus:g} CPUs leave no room for decoding "
        f"(tag.decode_num_cpus={cfg.tag.decode_num_cpus:g}) on this cluster, which has at most "
        f"{cpus:g} CPUs: set train.worker_num_cpus to {room:g} or less, use fewer workers, "
        "or add CPU nodes"
    )
