"""bench/gpu_check.sh --dry-run: every step of the GPU check but the venv creation, on CPU with
tiny sizes, so the script cannot rot between the runs on a GPU machine."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch

from ovml_core.capacity import main as plan_main
from ovml_core.capacity import video_encoder_flops
from ovml_core.clip import register_model_configs
from tests.conftest import REPO


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "results.json"
    script = REPO / "bench" / "gpu_check.sh"
    done = subprocess.run(
        ["bash", str(script), "--python", sys.executable, "--dry-run", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


# The dry run uses whatever device this host has: on a GPU host the GPU tests run and pass.
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.mark.slow
def test_every_step_ran_and_the_gpu_tests_ran_or_skipped_with_a_reason(dry_run):
    results, _ = dry_run
    steps = {row["step"]: row["exit_code"] for row in results["steps"]}
    # The GPU decode step runs where torchcodec is installed (tests/test_torchcodec.py).
    decode_gpu = {"gpu-decode": 0} if importlib.util.find_spec("torchcodec") else {}
    assert steps == {"tests": 0, "decode": 0, "encoder": 0, "tagging": 0, **decode_gpu}
    tests = results["tests"]
    assert tests["failed"]["count"] == 0
    skipped = tests["skipped"]["names"]
    assert all(name.rsplit(": ", 1)[1] for name in skipped)  # every skip says why
    if HAS_CUDA:
        assert tests["passed"]["count"] >= 6
        assert not any("needs a CUDA GPU" in name for name in skipped)
    else:
        assert tests["passed"]["count"] == 0
        assert sum("needs a CUDA GPU" in name for name in skipped) >= 6


@pytest.mark.slow
def test_decode_rows_per_mode_with_positive_costs(dry_run):
    results, _ = dry_run
    rows = results["decode"]
    assert {row["mode"] for row in rows} == {"sequential", "seek", "exact"}
    assert all(row["seconds_per_video"] > 0 and row["wall_s"] > 0 for row in rows)
    seek = next(row for row in rows if row["mode"] == "seek")
    assert seek["seeks"] >= 1  # the seek mode really sought


@pytest.mark.slow
def test_encoder_rows_for_each_variant_and_counted_flops_match_the_model(dry_run):
    results, _ = dry_run
    encoder = results["encoder"]
    variants = {(row["variant"], row["batch"]) for row in encoder["rows"]}
    assert variants == {
        ("eager", 1),
        ("eager", 2),
        ("channels_last", 1),
        ("channels_last", 2),
        ("compile", 2),
    }
    assert all(row["clips_per_s"] > 0 for row in encoder["rows"])
    register_model_configs()
    cfg = open_clip.get_model_config("ovml-tiny")
    expected = video_encoder_flops(
        cfg["vision_cfg"], cfg["embed_dim"], encoder["num_frames"], encoder["temporal"]
    )
    assert encoder["flops_per_clip"] == expected
    if not HAS_CUDA:
        assert encoder["bf16_peak_tflops"] is None  # a CPU has no entry: no made-up fraction
    assert encoder["copy_ms_pinned"] > 0


@pytest.mark.slow
def test_tagging_run_reports_both_stages(dry_run):
    results, stdout = dry_run
    tagging = results["tagging"]
    assert tagging["ok"] == tagging["videos"] == 6 and tagging["errored"] == 0
    stages = tagging["stages"]
    assert stages["videos"] == 6 and stages["encode_device"] == DEVICE
    assert stages["decode_busy_s"] > 0 and stages["encode_busy_s"] > 0
    assert "bottleneck" in stdout


@pytest.mark.slow
def test_plan_reads_the_results(dry_run, tmp_path, capsys):
    results, _ = dry_run
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert (
        plan_main(["--videos", "1000", "--minutes-per-video", "0.1", "--measurements", str(path)])
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "PROJECTION" not in printed and f"measured: {results['environment']['device']}" in printed
    )


def _wheel(folder, name: str, value: int):
    """A minimal pure-Python wheel of package `name` holding VALUE = value."""
    import base64
    import hashlib
    import zipfile

    info = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": f"VALUE = {value}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }

    def digest(text):
        raw = hashlib.sha256(text.encode()).digest()
        return "sha256=" + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    record = "".join(f"{path},{digest(text)},{len(text)}\n" for path, text in files.items())
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as wheel:
        for path, text in {**files, f"{info}/RECORD": record + f"{info}/RECORD,,\n"}.items():
            wheel.writestr(path, text)


def test_site_wheels_install_into_the_site_folder_from_two_transfers(tmp_path):
    """--site-wheels A --site-wheels B --install-only: what the GPU machine runs first (two
    folders, as two transfers), for a GPU image that already holds CUDA torch."""
    _wheel(tmp_path / "a", "ovml_probe_a", 1)
    _wheel(tmp_path / "b", "ovml_probe_b", 2)
    site = tmp_path / "site"
    script = REPO / "bench" / "gpu_check.sh"
    args = ["--site-wheels", str(tmp_path / "a"), "--site-wheels", str(tmp_path / "b")]
    done = subprocess.run(
        ["bash", str(script), "--python", sys.executable, *args, "--install-only"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OVML_GPU_SITE": str(site)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"installed into {site}" in done.stdout
    probe = "import ovml_probe_a as a, ovml_probe_b as b; print(a.VALUE + b.VALUE)"
    ran = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert ran.stdout.strip() == "3", ran.stderr
