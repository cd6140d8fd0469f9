"""Losing a node mid-run (spot preemption, the normal case on autoscaling clusters), on a local
multi-node Ray cluster (`ray.cluster_utils.Cluster`: a head with 1 CPU and 2 worker nodes
with 2 CPUs each, all real raylets). Each test removes a worker node hosting the job's work
once the job has shown progress, and checks that the job still completes: tagging with every
video exactly once, training from its last checkpoint, the label bank with every label. The
node is put back between tests, as an autoscaler would.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from ovml_core.config import Config
from pipeline.label_bank import build_label_bank
from pipeline.parquet_io import part_files, read_tags
from pipeline.tagging import run_tagging
from tests.conftest import REPO, TINY_CONFIG
from tests.test_training import _assert_resumed_history, _config, _history, write_square_clips
from tests.videos import write_indexed_video

# A job that waits forever on a lost node can block inside Ray where the default signal
# timeout never fires: the thread method ends the session instead of hanging CI.
pytestmark = pytest.mark.timeout(420, method="thread")

WORKER_NODES = 2
PAUSE_STEP = 2  # the last training rank waits, after its report of this step, to be removed
WAIT_S = 240  # for progress to show, on 2 shared cores


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    ray.init(
        address=cluster.address,
        log_to_driver=False,
        # Training workers import this module for the pausing loop.
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def nodes(cluster):
    """The cluster with WORKER_NODES worker nodes (a node removed by a test is replaced)."""
    while len(cluster.worker_nodes) < WORKER_NODES:
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    return cluster


def _actors(name: str) -> list[dict]:
    """Alive actors whose class name contains `name` (the GCS actor table)."""
    from ray._private import state

    actors = state.actors().values()
    return [a for a in actors if name in a["ActorClassName"] and a["State"] == "ALIVE"]


def _worker_node_of(cluster, node_ids: set[str]):
    """A worker node (never the head) among `node_ids`, or None."""
    return next((n for n in cluster.worker_nodes if n.node_id in node_ids), None)


def _until(condition, what: str):
    deadline = time.monotonic() + WAIT_S
    while not (found := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return found


class NodeRemover(threading.Thread):
    """Removes the worker node `pick()` returns (None: not yet) while the job runs."""

    def __init__(self, cluster, pick):
        super().__init__(daemon=True)
        self.cluster, self.pick = cluster, pick
        self.removed = None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            node = self.pick()
            if node is not None:
                self.cluster.remove_node(node, allow_graceful=False)
                self.removed = node
                return
            time.sleep(0.1)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join()


@pytest.mark.slow
def test_tagging_loses_a_worker_node_and_still_tags_every_video_once(nodes, tmp_path):
    videos = {f"v{i:02d}": write_indexed_video(tmp_path / f"v{i:02d}.mp4", 8) for i in range(40)}
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(
        pa.table({"video_id": list(videos), "uri": [str(p) for p in videos.values()]}), manifest
    )
    labels = tmp_path / "labels.txt"
    labels.write_text("dog\ncat\n")
    out = tmp_path / "tags"
    cfg = Config.from_yaml(
        TINY_CONFIG,
        ["tag.batch_size=1", "tag.rows_per_file=1", "tag.encode_actors=2", "tag.device=cpu"],
    )
    parts_at_removal = []

    def after_the_first_part_a_node_with_an_encode_actor():
        parts = len(part_files(pafs.LocalFileSystem(), str(out))) if out.exists() else 0
        hosts = {a["Address"]["NodeID"] for a in _actors("VideoTagger")}
        node = _worker_node_of(nodes, hosts) if parts else None
        if node is not None:
            parts_at_removal.append(parts)
        return node

    with NodeRemover(nodes, after_the_first_part_a_node_with_an_encode_actor) as remover:
        summary = run_tagging(cfg, str(manifest), str(out), labels=str(labels))
    assert remover.removed is not None, "the run ended before a node could be removed"
    assert parts_at_removal[0] < len(videos), "the node should be lost mid-run"
    assert (summary.ok, summary.errored) == (len(videos), 0)
    current = read_tags(str(out))
    assert sorted(current["video_id"].to_pylist()) == sorted(videos)  # each exactly once
    assert set(current["run_id"].to_pylist()) == {summary.run_id}


def pause_once_loop(loop_config: dict) -> None:
    """The production loop, except that the last rank, after its report of PAUSE_STEP (so a
    checkpoint exists), writes its node id to a marker file and waits there for its node to
    be removed; the marker makes it once."""
    import ray
    import ray.train

    from pipeline import training

    marker = Path(loop_config["run_dir"]) / "paused-on-node"
    report = training._report

    def report_then_pause(metrics, *args, **kwargs):
        report(metrics, *args, **kwargs)
        context = ray.train.get_context()
        last = context.get_world_rank() == context.get_world_size() - 1
        if last and metrics["step"] == PAUSE_STEP and not marker.exists():
            marker.write_text(ray.get_runtime_context().get_node_id())
            while True:
                time.sleep(1)

    training._report = report_then_pause
    training.train_loop_per_worker(loop_config)


@pytest.mark.slow
def test_training_loses_a_node_and_resumes_from_its_last_checkpoint(nodes, tmp_path):
    from pipeline.training import build_trainer

    (tmp_path / "clips").mkdir()
    clips = write_square_clips(tmp_path / "clips")
    cfg = _config(clips, tmp_path / "runs", "node-loss", max_failures=1)
    marker = tmp_path / "runs" / "node-loss" / "paused-on-node"
    # Written by Ray Train's controller once it has registered a checkpoint. Its reports are
    # collected asynchronously: remove the node before that and there is nothing to resume.
    registered = tmp_path / "runs" / "node-loss" / "checkpoint_manager_snapshot.json"

    def the_node_of_the_paused_worker():
        node_id = marker.read_text() if marker.exists() else None
        if node_id and _worker_node_of(nodes, {node_id}) is None:
            pytest.fail("the paused worker runs on the head node, which is never removed")
        if not (node_id and registered.exists()):
            return None
        return _worker_node_of(nodes, {node_id})

    with NodeRemover(nodes, the_node_of_the_paused_worker) as remover:
        result = build_trainer(cfg, train_loop=pause_once_loop).fit()
    assert remover.removed is not None
    history = _history(cfg)
    resumed = history[-1]["resumed_from_step"]
    # The latest checkpoint Ray Train had registered when the node went: PAUSE_STEP's, or
    # the one before it (reports are collected asynchronously).
    assert 1 <= resumed <= PAUSE_STEP
    _assert_resumed_history(cfg, history, resumed)
    assert result.metrics["step"] == history[-1]["step"]


@pytest.mark.slow
def test_label_bank_loses_a_worker_node_and_still_holds_every_label(nodes, tmp_path, tiny_model):
    from ovml_core.label_embedder import LabelEmbedder

    labels = [f"label {i}" for i in range(80)]
    vocabulary = tmp_path / "labels.txt"
    vocabulary.write_text("\n".join(labels) + "\n")
    out = tmp_path / "bank.parquet"
    cfg = Config.from_yaml(
        TINY_CONFIG, ["label_bank.batch_size=2", "label_bank.actors=2", "label_bank.device=cpu"]
    )

    def a_node_with_a_computing_actor():
        # ALIVE: the actor has loaded its model, so its batches are being computed.
        return _worker_node_of(nodes, {a["Address"]["NodeID"] for a in _actors("LabelBankActor")})

    with NodeRemover(nodes, a_node_with_a_computing_actor) as remover:
        summary = build_label_bank(cfg, str(vocabulary), str(out))
    assert remover.removed is not None
    assert (summary.labels, summary.computed) == (len(labels), len(labels))
    bank = pq.read_table(out)
    assert bank["label"].to_pylist() == labels  # every label, once, in vocabulary order
    expected, _ = LabelEmbedder(tiny_model).embed(labels[:3])
    stored = np.stack(bank["embedding"].to_numpy(zero_copy_only=False)[:3])
    np.testing.assert_allclose(stored, expected, atol=1e-5)
    assert [p.name for p in Path(out).parent.iterdir() if p.name.startswith(".")] == []
    assert os.path.getsize(out) > 0
