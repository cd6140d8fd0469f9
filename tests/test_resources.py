"""GPU placement from configuration and from what an autoscaling cluster can add."""

from __future__ import annotations

import logging

import pytest
import ray
import torch
from ray.core.generated import autoscaler_pb2
from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

from ovml_core.config import Config, ConfigError
from pipeline.resources import (
    actor_device,
    encode_in_driver,
    gpus_per_actor,
    max_cluster_resources,
)

NAMESPACE = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE
CONFIG_KEY = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY


@pytest.fixture(scope="module")
def cpu_cluster():
    """A local cluster without GPUs, on any host (num_gpus=0 even where CUDA exists)."""
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def gpu_node_group(cpu_cluster):
    """What an autoscaler publishes for a GPU group at min_workers 0: no GPU node exists yet."""
    group = autoscaler_pb2.NodeGroupConfig(
        name="gpu", resources={"CPU": 8, "GPU": 1}, min_count=0, max_count=2
    )
    config = autoscaler_pb2.ClusterConfig(node_group_configs=[group])
    _internal_kv_put(CONFIG_KEY, config.SerializeToString(), overwrite=True, namespace=NAMESPACE)
    yield
    _internal_kv_del(CONFIG_KEY, namespace=NAMESPACE)


def test_auto_uses_gpus_the_autoscaler_can_add_before_any_exists(gpu_node_group):
    assert ray.cluster_resources().get("GPU", 0) == 0  # none now
    assert max_cluster_resources()["GPU"] == 2  # two nodes of one GPU at most
    assert gpus_per_actor("auto", None, "tag") == 1.0
    assert gpus_per_actor("auto", 0.5, "tag") == 0.5


def test_auto_without_gpus_anywhere_runs_on_cpu_and_says_so(cpu_cluster, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.resources"):
        assert gpus_per_actor("auto", None, "label_bank") == 0.0
    assert "label_bank.device=cuda" in caplog.text


def test_cuda_and_cpu_do_not_ask_the_cluster(cpu_cluster, gpu_node_group):
    assert gpus_per_actor("cuda", None, "tag") == 1.0  # waits for GPU nodes, never CPU
    assert gpus_per_actor("cuda", 0.25, "tag") == 0.25
    assert gpus_per_actor("cpu", None, "tag") == 0.0  # even though GPUs can be added


def test_auto_encodes_in_the_driver_only_on_cpu_with_one_actor_on_a_lone_node(cpu_cluster):
    assert encode_in_driver(_tag(), 0.0)  # this local one-node cluster, no autoscaler
    assert not encode_in_driver(_tag(), 1.0)  # GPUs: encode actors own them
    assert not encode_in_driver(_tag(encode_actors=2), 0.0)
    assert not encode_in_driver(_tag(encode_actors=2, encode_actors_min=1), 0.0)
    assert not encode_in_driver(_tag(encode_in="actors"), 0.0)
    assert encode_in_driver(_tag(encode_in="driver", encode_actors=2), 0.0)


def test_auto_keeps_encode_actors_where_an_autoscaler_can_add_nodes(gpu_node_group):
    # Even encoding on CPU: the cluster may grow, and the driver's node is one of many.
    assert not encode_in_driver(_tag(device="cpu"), 0.0)
    assert encode_in_driver(_tag(device="cpu", encode_in="driver"), 0.0)


def test_encode_in_is_checked():
    with pytest.raises(ConfigError, match="tag.encode_in"):
        _tag(encode_in="gpu")
    with pytest.raises(ConfigError, match="tag.encode_in: 'driver' encodes on the job's CPU"):
        _tag(encode_in="driver", device="cuda")


def test_an_actor_given_gpus_uses_cuda_or_fails_loudly():
    assert actor_device(0) == "cpu"
    if torch.cuda.is_available():
        assert actor_device(1) == "cuda"
    else:
        with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
            actor_device(1)


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("tag", "device", "gpu"),
        ("label_bank", "device", "tpu"),
        ("tag", "encode_num_gpus", 0),
        ("label_bank", "num_gpus", 0),
    ],
)
def test_device_settings_are_checked(section, key, value):
    with pytest.raises(ConfigError, match=f"{section}.{key}"):
        Config.from_dict({section: {key: value}})


def test_zero_gpus_is_fine_on_cpu():
    cfg = Config.from_dict({"tag": {"device": "cpu", "encode_num_gpus": 0}})
    assert cfg.tag.device == "cpu"


def test_training_that_would_leave_decoding_no_cpu_is_refused(cpu_cluster):
    """The 1-CPU cluster: 2 workers of 1 CPU each would starve the decode tasks forever."""
    from pipeline.resources import check_training_fits

    cfg = Config.from_dict({"train": {"num_workers": 2}})
    with pytest.raises(ConfigError, match=r"train.worker_num_cpus.*at most 1 CPUs.*0 or less"):
        check_training_fits(cfg)
    check_training_fits(Config.from_dict({"train": {"num_workers": 2, "worker_num_cpus": 0}}))


# ---------------------------------------------------------------- stage sizing of tagging


def _tag(**fields):
    return Config.from_dict({"tag": fields}).tag if fields else Config().tag


def test_on_gpu_the_encode_actor_holds_one_cpu_and_decode_the_rest():
    from pipeline.resources import size_tagging

    tag = _tag(encode_actors=2, batch_size=64)
    sizing = size_tagging(tag, cpus=16, encode_num_gpus=1.0, videos=600, encode_share=0.9)
    assert (sizing.encode_num_cpus, sizing.torch_threads, sizing.decode_num_cpus) == (1, 1, 1)
    assert sizing.decode_slots == 14
    # 600 videos on 14 slots: 11 per task, not one task per 64-clip batch (10 tasks, so 4
    # slots idle and the first batch only after a whole task of 64 videos).
    assert sizing.decode_rows_per_task == 11
    many = size_tagging(tag, cpus=16, encode_num_gpus=1.0, videos=10**6)
    assert many.decode_rows_per_task == 16
    few = size_tagging(tag, cpus=16, encode_num_gpus=1.0, videos=5)
    assert few.decode_rows_per_task == 1


@pytest.mark.parametrize(
    "cpus, share, encode, threads",
    [(2, 0.03, 0.06, 1), (2, 0.5, 1.0, 1), (2, 0.99, 1.0, 1), (16, 0.5, 8.0, 8), (4, 0.0, 0.01, 1)],
)
def test_on_cpu_encode_holds_its_measured_share_and_one_decode_task_per_core_fits(
    cpus, share, encode, threads
):
    from pipeline.resources import size_tagging

    sizing = size_tagging(_tag(), cpus=cpus, encode_num_gpus=0.0, videos=100, encode_share=share)
    # Capped so that at least one core (half of a 2-core node) is left to decode.
    assert sizing.encode_num_cpus == pytest.approx(encode)
    assert sizing.torch_threads == threads
    assert sizing.encode_num_cpus + sizing.decode_slots * sizing.decode_num_cpus <= cpus + 1e-9
    assert sizing.decode_slots >= cpus  # every core decodes, beside the encoder's share


def test_sizes_set_in_the_config_are_kept_and_checked():
    from pipeline.resources import size_tagging

    tag = _tag(decode_num_cpus=2, encode_num_cpus=0.5, torch_threads=3)
    sizing = size_tagging(tag, cpus=8, encode_num_gpus=0.0, videos=100, encode_share=0.9)
    assert (sizing.decode_num_cpus, sizing.encode_num_cpus, sizing.torch_threads) == (2, 0.5, 3)
    assert sizing.decode_slots == 3  # (8 - 0.5) // 2
    with pytest.raises(ConfigError, match="tag.decode_num_cpus"):
        Config.from_dict({"tag": {"decode_num_cpus": 0}})


def test_cheap_measured_videos_go_many_to_a_decode_task_and_costly_ones_few():
    from pipeline.resources import size_tagging

    tag = _tag(batch_size=4)
    cheap = size_tagging(tag, cpus=2, encode_num_gpus=0.0, videos=400, decode_s=0.018)
    assert cheap.decode_rows_per_task == 50  # 400 / (4 tasks x 2 slots); 1 s of work is 55
    costly = size_tagging(tag, cpus=2, encode_num_gpus=0.0, videos=1200, decode_s=0.15)
    assert costly.decode_rows_per_task == 6  # about 1 s of decoding each
    slow = size_tagging(tag, cpus=2, encode_num_gpus=0.0, videos=1200, decode_s=5.0)
    assert slow.decode_rows_per_task == 1
