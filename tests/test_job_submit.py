"""The jobs under `ray job submit` on a running cluster, as the README and docs/cluster.md run
them, against the same jobs run locally with `python jobs/...`.

A head is started with `ray start --head --block` (2 CPUs, its own ports and temp dir; ending
that process ends the head, and nothing else on the machine), then each job is submitted with
`--working-dir .`, the code reaching the cluster the way it does on a real one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ovml_core.checkpoint import save_checkpoint
from ovml_core.config import Config
from ovml_core.model import create_model
from pipeline.parquet_io import read_tags
from tests.conftest import REPO, TINY_CONFIG
from tests.videos import write_indexed_video

BIN = Path(sys.executable).parent
LABELS = ["dog", "cat", "surfing"]
EXCLUDES = [".venv", ".venv-*", ".git", "runs", "models", "bench", "docs"]
SUBMIT_TIMEOUT_S = 600
CONFIG = TINY_CONFIG.relative_to(REPO)  # as a user types it, in the working directory


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _env() -> dict[str, str]:
    # Token authentication explicitly off for this loopback-only cluster: Ray turns it on by
    # itself when ~/.ray/auth_token happens to exist, and then only for the head.
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled"
    )
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # the job's `python` is this environment's
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def head():
    """The dashboard address of a 2-CPU head node started with `ray start`."""
    gcs, dashboard, client, agent, metrics = _free_ports(5)
    temp = tempfile.mkdtemp(prefix="ovml-head-")  # short: Ray's socket paths have a limit
    log = open(Path(temp) / "head.log", "w")  # noqa: SIM115 (closed at teardown)
    process = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--metrics-export-port={metrics}",
            "--num-cpus=2",
            "--num-gpus=0",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for(address, process, Path(temp) / "head.log")
        yield address
    finally:
        process.terminate()
        process.wait(timeout=120)
        log.close()


def _wait_for(address: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise RuntimeError(f"the head's dashboard did not answer in 180 s:\n{log.read_text()}")


def _submit(address: str, job: list[str], expect_ok: bool = True) -> str:
    runtime_env = json.dumps({"excludes": EXCLUDES})
    command = [
        str(BIN / "ray"),
        "job",
        "submit",
        f"--address={address}",
        f"--working-dir={REPO}",
        f"--runtime-env-json={runtime_env}",
        "--",
        "python",
        *job,
    ]
    return _run(command, expect_ok)


def _local(job: list[str]) -> str:
    return _run([sys.executable, *job])


def _run(command: list[str], expect_ok: bool = True) -> str:
    done = subprocess.run(
        command,
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=SUBMIT_TIMEOUT_S,
    )
    output = done.stdout + done.stderr
    assert (done.returncode == 0) == expect_ok, (
        f"{command[:4]} exited {done.returncode}:\n{output[-4000:]}"
    )
    return output


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A saved tiny model (so both sides load the same weights), 6 clips and a vocabulary."""
    root = tmp_path_factory.mktemp("submit")
    cfg = Config.from_yaml(TINY_CONFIG, ["model.init_bias=0.0"])
    save_checkpoint(create_model(cfg.model), root / "model")
    ids = [f"v{i}" for i in range(6)]
    uris = [str(write_indexed_video(root / f"{i}.mp4", 12 + 4 * n)) for n, i in enumerate(ids)]
    pq.write_table(pa.table({"video_id": ids, "uri": uris}), root / "manifest.parquet")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return root


def _tag_args(root: Path, out: str, labels: list[str]) -> list[str]:
    return [
        "jobs/tag.py",
        f"--config={CONFIG}",
        f"--manifest={root / 'manifest.parquet'}",
        f"--out={out}",
        f"--checkpoint={root / 'model'}",
        *labels,
    ]


def _scores(out: Path) -> dict[str, dict[str, float]]:
    rows = read_tags(str(out)).to_pylist()
    assert all(row["error"] is None for row in rows)
    return {r["video_id"]: {t["label"]: t["score"] for t in r["top_k"]} for r in rows}


def test_label_bank_and_tagging_jobs_submitted_match_local_runs(head, inputs):
    bank = inputs / "bank.parquet"
    _submit(
        head,
        [
            "jobs/build_label_bank.py",
            f"--config={CONFIG}",
            f"--labels={inputs / 'labels.txt'}",
            f"--out={bank}",
            f"--checkpoint={inputs / 'model'}",
        ],
    )
    assert pq.read_table(bank)["label"].to_pylist() == LABELS
    submitted = _submit(
        head, _tag_args(inputs, str(inputs / "tags-submitted"), [f"--label-bank={bank}"])
    )
    assert "ok        6" in submitted
    _local(_tag_args(inputs, str(inputs / "tags-local"), [f"--labels={inputs / 'labels.txt'}"]))
    remote, local = _scores(inputs / "tags-submitted"), _scores(inputs / "tags-local")
    assert remote.keys() == local.keys() == {f"v{i}" for i in range(6)}
    for video_id, scores in local.items():
        assert remote[video_id].keys() == scores.keys()
        np.testing.assert_allclose(
            [remote[video_id][k] for k in scores], list(scores.values()), atol=1e-5
        )


def test_training_job_on_a_small_cluster_is_refused_at_once_or_finishes(head, tmp_path):
    """2 workers on a 2-CPU head: holding a CPU each they would starve decoding forever, so the
    job fails at once naming the setting; with half a CPU each it trains to the end."""
    rows = []
    for i, label in enumerate(["dog", "cat"] * 3):
        uri = write_indexed_video(tmp_path / f"t{i}.mp4", 16)
        rows.append({"video_id": f"t{i}", "uri": str(uri), "labels": [label], "split": "train"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    job = [
        "jobs/train.py",
        f"--config={CONFIG}",
        "--set",
        f"train.train_manifest={tmp_path / 'train.parquet'}",
        "--set",
        f"train.storage_path={tmp_path / 'runs'}",
        "--set",
        "train.name=submitted",
        "--set",
        "train.num_workers=2",
    ]
    started = time.monotonic()
    refused = _submit(head, job, expect_ok=False)
    assert "train.worker_num_cpus" in refused and "at most 2 CPUs" in refused
    assert time.monotonic() - started < 120
    _submit(head, [*job, "--set", "train.worker_num_cpus=0.5"])
    history = json.loads((tmp_path / "runs" / "submitted" / "metrics.json").read_text())
    assert history and history[-1]["step"] >= 1
