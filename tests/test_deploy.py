"""The one image and the cluster manifests.

- deploy/Dockerfile's install block is the Makefile's install set minus test and dev tools, and
  run as written in a fresh virtual environment (no Docker) it is enough for the tagging and
  training jobs on their shipped config. That last check installs torch into a fresh
  environment (~7 minutes, ~6 GB), so it is its own lane, `make test-image`
  (OVML_TEST_IMAGE_INSTALL=1); the default suite checks the block against the Makefile's set.
- Every manifest (deploy/*.yaml, cluster.yaml) runs that image, starts an existing job with an
  existing config that validates, and installs nothing when a node starts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ovml_core.config import Config
from tests.conftest import REPO
from tests.videos import write_indexed_video

DOCKERFILE = REPO / "deploy" / "Dockerfile"
BLOCK_START, BLOCK_END = "# >>> install", "# <<< install"
PRESET = "configs/vitb16.yaml"


def dockerfile_install_commands(text: str) -> list[list[str]]:
    """The argv of each RUN line between the install markers; each must be `pip install ...`."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(BLOCK_START)]
    ends = [i for i, line in enumerate(lines) if line.startswith(BLOCK_END)]
    assert len(starts) == len(ends) == 1 and starts[0] < ends[0], "one delimited install block"
    block = "\n".join(lines[starts[0] + 1 : ends[0]]).replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        if line.startswith("RUN "):
            argv = shlex.split(line[len("RUN ") :])
            assert argv[:2] == ["pip", "install"], f"not a plain pip install line: {line}"
            commands.append(argv)
    assert commands, "no RUN lines in the install block"
    return commands


def makefile_install_commands() -> list[list[str]]:
    """`pip install` argv of the Makefile's `install` recipe, `--quiet` left out."""
    text = (REPO / "Makefile").read_text()
    recipe = text.split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    commands = []
    for line in recipe.splitlines():
        if "-m pip install" in line:
            argv = shlex.split(line.split("-m pip install", 1)[1])
            commands.append(["pip", "install", *(a for a in argv if a != "--quiet")])
    return commands


def test_image_installs_the_makefile_set_without_test_and_dev_tools():
    image = dockerfile_install_commands(DOCKERFILE.read_text())
    # Same commands, order and pins; the package itself without `-e` and the `test` extra.
    expected = [
        ["pip", "install", *(a.replace("test,", "") for a in argv[2:] if a != "-e")]
        for argv in makefile_install_commands()
    ]
    assert image == expected


# ---------------------------------------------------------------- manifests


def _ray_version() -> str:
    import ray

    return ray.__version__


def _manifests() -> dict[str, list[dict]]:
    files = sorted((REPO / "deploy").glob("*.yaml")) + [REPO / "cluster.yaml"]
    return {
        str(p.relative_to(REPO)): [d for d in yaml.safe_load_all(p.read_text()) if d] for p in files
    }


def _ray_jobs(doc: dict) -> list[dict]:
    """The RayJob specs of a KubeRay document: a RayJob's spec, a RayCronJob's jobTemplate."""
    if doc.get("kind") == "RayJob":
        return [doc["spec"]]
    if doc.get("kind") == "RayCronJob":
        return [doc["spec"]["jobTemplate"]]
    return []


def _images(spec: dict) -> set[str]:
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return {c["image"] for pod in pods for c in pod["template"]["spec"]["containers"]}


def _cluster_yaml_jobs(text: str) -> list[str]:
    """The `ray job submit ... -- python jobs/X.py ...` commands in cluster.yaml's comments."""
    joined = re.sub(r"\\\n#\s*", " ", text)
    return [m.split(" -- ", 1)[1] for m in re.findall(r"ray job submit[^\n]* -- [^\n]+", joined)]


def _check_entrypoint(entrypoint: str, where: str) -> Config:
    """An entrypoint runs an existing job on an existing config, and its arguments parse and
    validate with that job's own parser (paths relative to the image's /home/ray/ovml)."""
    argv = shlex.split(entrypoint.split("#", 1)[0])
    assert argv[0] == "python" and re.fullmatch(r"jobs/\w+\.py", argv[1]), (where, argv)
    assert (REPO / argv[1]).is_file(), (where, argv[1])
    job = {
        "jobs/tag.py": "pipeline.tagging",
        "jobs/train.py": "pipeline.training",
        "jobs/build_label_bank.py": "pipeline.label_bank",
    }[argv[1]]
    args = __import__(job, fromlist=["parse_args"]).parse_args(argv[2:])
    assert (REPO / args.config).is_file(), (where, args.config)
    return Config.from_yaml(REPO / args.config, args.overrides)


def test_every_manifest_runs_an_existing_job_on_the_preset_in_one_image():
    manifests = _manifests()
    images, kinds = set(), []
    for name, docs in manifests.items():
        for doc in docs:
            for spec in _ray_jobs(doc):
                kinds.append(doc["kind"])
                cfg = _check_entrypoint(spec["entrypoint"], name)
                assert PRESET in spec["entrypoint"], name
                assert cfg.model.clip_model == "ViT-B-16"
                assert spec["rayClusterSpec"]["rayVersion"] == _ray_version(), name
                assert "runtimeEnvYAML" not in spec or "pip" not in spec["runtimeEnvYAML"], name
                images |= _images(spec)
    cluster = manifests["cluster.yaml"][0]
    images.add(cluster["docker"]["image"])
    assert len(images) == 1, images
    assert images.pop().endswith(f"/ovml:ray{_ray_version()}-py311-gpu")
    assert sorted(set(kinds)) == ["RayCronJob", "RayJob"]
    # Jobs on the launcher's cluster: the same preset, nothing installed when a node starts.
    submitted = _cluster_yaml_jobs((REPO / "cluster.yaml").read_text())
    assert {shlex.split(c)[1] for c in submitted} >= {"jobs/tag.py", "jobs/train.py"}
    for command in submitted:
        _check_entrypoint(command, "cluster.yaml")
    assert not any("pip" in c for c in cluster.get("setup_commands", [])), "installs at start"
    assert cluster["docker"].get("pull_before_run") is True


def test_dockerfile_builds_from_the_pinned_ray_and_ships_what_the_entrypoints_read():
    text = DOCKERFILE.read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(_ray_version())}-py311-gpu$", text, re.M)
    assert "WORKDIR /home/ray/ovml" in text
    copied = set(re.findall(r"^COPY \S+ (\S+) ", text, re.M))
    assert {"jobs", "configs", "ovml_core", "pipeline"} <= copied
    # The preset reads its weights from /models, which the image fills from deploy/models/.
    preset = Config.from_yaml(REPO / PRESET).model
    assert preset.clip_pretrained.startswith("/models/") and preset.llm.startswith("/models/")
    assert re.search(r"^COPY \S+ deploy/models/ /models/$", text, re.M)
    assert (REPO / "deploy" / "models" / "README.md").is_file()


# ---------------------------------------------------------------- the install, end to end


def _run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{argv[:4]} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(
    os.environ.get("OVML_TEST_IMAGE_INSTALL") != "1",
    reason="installs torch into a fresh venv: `make test-image` runs it",
)
def test_dockerfile_install_lines_run_the_tagging_and_training_jobs(tmp_path):
    venv = tmp_path / "venv"
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    # A fresh GGUF cache: the tokenizer conversion must work with only what the image installs.
    env |= {"OVML_CACHE": str(tmp_path / "cache"), "VIRTUAL_ENV": str(venv)}
    started = time.monotonic()
    try:
        _run([sys.executable, "-m", "venv", str(venv)], env, 120)
        for argv in dockerfile_install_commands(DOCKERFILE.read_text()):
            _run([python, "-m", *argv], env, 1200)
        installed = time.monotonic()

        videos = tmp_path / "videos"
        videos.mkdir()
        rows = [
            {
                "video_id": f"v{i}",
                "uri": str(write_indexed_video(videos / f"v{i}.mp4", 12 + 4 * i)),
                "labels": [label],
                "split": "train",
            }
            for i, label in enumerate(["dog", "cat", "dog", "cat"])
        ]
        manifest = tmp_path / "manifest.parquet"
        pq.write_table(pa.Table.from_pylist(rows), manifest)
        labels = tmp_path / "labels.txt"
        labels.write_text("dog\ncat\nbird\n")

        out = tmp_path / "tags"
        tag = [python, "jobs/tag.py", "--config", "configs/tiny.yaml", "--manifest"]
        _run([*tag, str(manifest), "--out", str(out), "--labels", str(labels)], env, 600)
        from pipeline.parquet_io import read_tags

        tags = read_tags(str(out))
        assert sorted(tags["video_id"].to_pylist()) == [r["video_id"] for r in rows]
        assert tags["error"].null_count == len(rows)
        assert all(len(top) == 3 for top in tags["top_k"].to_pylist())

        runs = tmp_path / "runs"
        train = [python, "jobs/train.py", "--config", "configs/tiny.yaml"]
        settings = [
            f"train.train_manifest={manifest}",
            f"train.storage_path={runs}",
            "train.name=deploy",
            "train.num_workers=1",  # one Ray Train worker: the same code path, less start-up
        ]
        _run([*train, *(a for s in settings for a in ("--set", s))], env, 600)
        model_dir = runs / "deploy" / "model"
        assert (model_dir / "model.safetensors").is_file()
        assert json.loads((model_dir / "config.json").read_text())
        history = json.loads((runs / "deploy" / "metrics.json").read_text())
        assert history and history[-1]["step"] >= 1
        from ovml_core.checkpoint import load_checkpoint

        assert load_checkpoint(model_dir).config.clip_model == "ovml-tiny"
        print(
            f"\ninstall {installed - started:.0f} s, jobs {time.monotonic() - installed:.0f} s",
            file=sys.stderr,
        )
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~6 GB
