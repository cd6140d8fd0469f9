"""Reliability and security: hostile inputs, killed processes, limits, safe loading, escaping.

The hostile-input suite goes through the real tagging job (configs/tiny.yaml) in one Ray run.
Cases already tested elsewhere are not repeated here; docs/reliability.md maps every case to
the test that covers it. One local Ray instance serves the module.
"""

import ast
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ovml_core.config import Config, ConfigError, VideoConfig
from ovml_core.video import VideoDecodeError, sample_frames
from pipeline.decode import decode_video
from pipeline.label_bank import build_label_bank
from pipeline.parquet_io import atomic_output, part_files, read_tags
from pipeline.tagging import TagSummary, run_tagging
from tests.conftest import REPO, TINY_CONFIG

# Shared with the tagging tests: the Ray instance and vocabulary fixtures, the manifest writer.
from tests.test_tagging import OVERRIDES, _manifest, labels_file, ray_local  # noqa: F401
from tests.videos import (
    index_frame,
    read_frame_index,
    write_broken_files,
    write_declared_size_mjpeg,
    write_indexed_video,
)

THREE_HOURS_S = 3 * 3600.0
# A file name a shell, a CSV or a terminal could trip over; the pipeline must not care.
AWKWARD_NAME = "a clip \"quoted\" 'single' ünïcødé 视频 $HOME;.mp4"
# A name that would forge a log line and recolour a terminal if printed as it is.
FORGING_NAME = "forged\nERROR injected line \x1b[31mred.mp4"


@pytest.fixture(scope="module")
def cfg():
    return Config.from_yaml(TINY_CONFIG, OVERRIDES)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """video_id -> (uri, what must happen): None = a correct decode, else a piece of the error."""
    root = tmp_path_factory.mktemp("hostile")
    full = write_indexed_video(root / "full.mp4", 100, gop=10, faststart=True)
    broken = write_broken_files(root / "broken", full)
    data = full.read_bytes()
    cases = {
        "zero-byte": (broken["empty"], "empty file"),
        "random-bytes": (broken["garbage"], "not a readable video"),
        "text-named-mp4": (broken["text"], "not a readable video"),
        "audio-only": (broken["audio_only"], "no video stream"),
        "missing-file": (broken["missing"], "file not found"),
    }
    for percent, message in ((10, "not a readable video"), (90, "truncated: frames end")):
        cut = root / f"cut-at-{percent}.mp4"
        cut.write_bytes(data[: len(data) * percent // 100])
        cases[f"truncated-at-{percent}%"] = (cut, message)
    png = root / "image.mp4"
    Image.fromarray(index_frame(7)).save(png, format="PNG")
    cases["png-named-mp4"] = (png, "not one of the container formats")  # a still image
    raw = root / "raw-frames.y4m"  # one uncompressed 16000x16000 frame: 366 MiB, sparse
    header = b"YUV4MPEG2 W16000 H16000 F25:1 Ip A1:1 C420jpeg\nFRAME\n"
    with raw.open("wb") as f:
        f.write(header)
        f.truncate(len(header) + 16000 * 16000 * 3 // 2)
    cases["raw-16000x16000-frame"] = (raw, "not one of the container formats")
    # Text formats FFmpeg can follow to other files: it must not read what they point to.
    one_frame = write_indexed_video(root / "one.mp4", 1)
    playlist, concat = root / "playlist.mp4", root / "concat.mp4"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n{one_frame}\n")
    concat.write_text(f"ffconcat version 1.0\nfile '{one_frame}'\n")
    cases["hls-playlist-named-mp4"] = (playlist, "not a readable video")
    cases["concat-list-named-mp4"] = (concat, "not a readable video")
    folder = root / "a-folder.mp4"
    folder.mkdir()
    forged = root / FORGING_NAME
    forged.write_text("not a video\n")
    three_hours = [600.0 * i for i in range(19)]  # a frame every 10 minutes, one keyframe
    vfr = np.cumsum([0.0] + [0.05, 0.3, 0.02, 0.5] * 5)[:20].tolist()
    cases |= {
        "one-frame": (one_frame, None),
        "declared-20000x20000": (
            write_declared_size_mjpeg(root / "huge.avi", 20000, 20000),
            "no valid frame size",
        ),
        "declared-16000x16000": (
            write_declared_size_mjpeg(root / "big.avi", 16000, 16000),
            "over video.max_pixels",
        ),
        "three-hours": (
            write_indexed_video(root / "3h.mp4", 19, times_s=three_hours, gop=1000),
            None,
        ),
        "variable-frame-rate": (write_indexed_video(root / "vfr.mp4", 20, times_s=vfr), None),
        "rotation-90": (write_indexed_video(root / "rot.mp4", 10, rotation=90), None),
        "10-bit": (write_indexed_video(root / "p10.mp4", 10, pix_fmt="yuv420p10le"), None),
        "yuv444": (write_indexed_video(root / "p444.mp4", 10, pix_fmt="yuv444p"), None),
        "odd-size-33x17": (
            write_indexed_video(root / "odd.mp4", 10, width=33, height=17, pix_fmt="yuv444p"),
            None,
        ),
        "awkward-name": (write_indexed_video(root / AWKWARD_NAME, 10), None),
        "control-characters-in-name": (forged, "not a readable video"),
        "directory": (folder, "not a regular file"),
        "disallowed-scheme": ("http://example.com/v.mp4", "scheme 'http' is not allowed"),
    }
    return {video_id: (str(uri), expected) for video_id, (uri, expected) in cases.items()}


@pytest.fixture(scope="module")
def hostile_run(ray_local, cfg, hostile, labels_file, tmp_path_factory):  # noqa: F811
    """All hostile cases in one run, plus a row without a video_id and a repeated video_id."""
    root = tmp_path_factory.mktemp("hostile-run")
    ids = [*hostile, "", "one-frame"]
    uris = [uri for uri, _ in hostile.values()] + [hostile["yuv444"][0], hostile["10-bit"][0]]
    manifest = root / "manifest.parquet"
    pq.write_table(pa.table({"video_id": ids, "uri": uris}), manifest)
    summary = run_tagging(cfg, str(manifest), str(root / "tags"), labels=labels_file)
    return summary, root / "tags"


# ---------------------------------------------------------------- hostile inputs


@pytest.mark.slow
def test_hostile_inputs_each_give_one_row_with_a_clear_error_or_tags(hostile_run, hostile, cfg):
    summary, out = hostile_run
    # The row without an id is named by its uri; the repeated id keeps its first row only.
    expected = {**hostile, hostile["yuv444"][0]: hostile["yuv444"]}
    tags = read_tags(str(out))
    rows = {r["video_id"]: r for r in tags.to_pylist()}
    assert sorted(rows) == sorted(expected)  # rows in == rows out
    physical = pa.concat_tables(
        pq.read_table(p) for p in part_files(pafs.LocalFileSystem(), str(out))
    )
    assert physical.num_rows == len(expected)  # and not one more
    assert summary.processed == len(expected)
    assert summary.errored == sum(message is not None for _, message in expected.values())
    for video_id, (uri, message) in expected.items():
        row = rows[video_id]
        assert row["uri"] == uri
        if message is None:
            assert row["error"] is None, (video_id, row["error"])
            assert len(row["top_k"]) == cfg.tag.top_k and row["num_frames"] > 0
        else:
            assert message in row["error"], (video_id, row["error"])
            assert row["tags"] is None and row["num_frames"] is None
    assert rows["one-frame"]["uri"] == hostile["one-frame"][0]  # the first of the repeated id
    assert rows["one-frame"]["num_frames"] == 1
    assert rows["three-hours"]["duration_s"] >= THREE_HOURS_S
    assert rows["odd-size-33x17"]["num_frames"] == 10
    assert FORGING_NAME in rows["control-characters-in-name"]["error"]  # data is kept as it is


def test_hostile_decodes_stay_within_time_and_memory(hostile, tmp_path):
    """Every case decoded in a fresh process: the peak RSS grows by less than a single frame of
    the 16000x16000 file would take, and no decode comes near video.max_decode_s."""
    limits = Config.from_yaml(TINY_CONFIG).video
    script = tmp_path / "decode_all.py"
    script.write_text(
        "import json, resource, sys, time\n"
        "from ovml_core.config import VideoConfig\n"
        "from pipeline.decode import decode_video\n"
        "cases, limits = json.loads(sys.argv[1]), VideoConfig(**json.loads(sys.argv[2]))\n"
        "def peak_mb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "decode_video({'uri': cases['yuv444']}, num_frames=8, size=224, limits=limits)\n"
        "before, seconds = peak_mb(), {}\n"
        "for video_id, uri in cases.items():\n"
        "    started = time.monotonic()\n"
        "    decode_video({'uri': uri}, num_frames=8, size=224, limits=limits)\n"
        "    seconds[video_id] = time.monotonic() - started\n"
        "print(json.dumps({'growth_mb': peak_mb() - before, 'seconds': seconds}))\n"
    )
    cases = json.dumps({video_id: uri for video_id, (uri, _) in hostile.items()})
    done = subprocess.run(
        [sys.executable, str(script), cases, json.dumps(limits.__dict__)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    one_big_frame_mb = 16000 * 16000 * 1.5 / 2**20
    assert result["growth_mb"] < min(100, one_big_frame_mb), result
    slowest = max(result["seconds"].values())
    assert slowest < min(5.0, limits.max_decode_s), result["seconds"]


def test_three_hour_video_is_refused_by_its_declared_length_before_reading(hostile):
    path = hostile["three-hours"][0]
    started = time.monotonic()
    with pytest.raises(VideoDecodeError, match="s long, over video.max_duration_s=3600"):
        sample_frames(path, 4, 32, VideoConfig(max_duration_s=3600))
    assert time.monotonic() - started < 1.0
    frames, meta = sample_frames(path, 4, 32)  # within the default 4 h: decoded
    assert meta["duration_s"] >= THREE_HOURS_S
    centres = [(2 * i + 1) * meta["duration_s"] / 8 for i in range(4)]
    assert [read_frame_index(f) for f in frames] == [int(t // 600) for t in centres]
    assert meta["seeks"] == 0 and meta["frame_count"] == 19  # one keyframe: one pass


def test_high_bit_depth_444_and_odd_sizes_decode_to_the_right_frames(hostile):
    for video_id in ("10-bit", "yuv444", "odd-size-33x17"):
        frames, meta = sample_frames(hostile[video_id][0], 4, 32)
        assert [read_frame_index(f) for f in frames] == [1, 3, 6, 8], video_id
    assert (meta["width"], meta["height"]) == (33, 17)


def test_slow_decode_is_cut_off_by_the_per_video_time_limit(tmp_path):
    """The deadline is checked between packets and frames, so a decode that would run long
    stops soon after video.max_decode_s instead of holding its worker."""
    path = write_indexed_video(tmp_path / "long.mp4", 1200, width=320, height=240, gop=1200)
    started = time.monotonic()
    sample_frames(path, 4, 64, VideoConfig(mode="sequential"))
    full = time.monotonic() - started  # wall time of the whole call, like the one below
    started = time.monotonic()
    with pytest.raises(VideoDecodeError, match="video.max_decode_s"):
        sample_frames(path, 4, 64, VideoConfig(mode="sequential", max_decode_s=full / 10))
    assert time.monotonic() - started < full / 2, full  # stopped well before the end


def test_unreadable_file_is_an_error_row():
    """chmod 000 does not stop root, so as root the decode runs in a child that drops to the
    user `nobody` first (forked: `nobody` may not be allowed to start the venv's Python)."""
    import pwd
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="ovml-unreadable-"))  # 0700 parents would hide it
    folder.chmod(0o755)
    path = write_indexed_video(folder / "secret.mp4", 5)
    path.chmod(0)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # only the decode and os._exit run here: nothing of pytest's
        try:
            if os.geteuid() == 0:
                os.setuid(pwd.getpwnam("nobody").pw_uid)
            row = decode_video({"uri": str(path)}, num_frames=2, size=16)
            os.write(write_end, json.dumps(row["error"]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        error = json.loads(pipe.read() or "null")
    os.waitpid(child, 0)
    shutil.rmtree(folder)
    assert error and "not a readable video" in error and "Permission denied" in error, error


# ---------------------------------------------------------------- faults


def _map_workers(udf: str) -> dict[str, dict]:
    """Ray Data's actor-pool workers running `udf` in this Ray instance, by actor id (from the
    GCS actor table: the public state API would need the dashboard)."""
    from ray._private import state

    name = f"MapWorker(MapBatches({udf}))"
    return {a["ActorID"]: a for a in state.actors().values() if a["ActorClassName"] == name}


def _alive(workers: dict[str, dict], earlier: set[str]) -> list[dict]:
    """Workers not in `earlier` (actors of earlier runs) whose constructor has finished."""
    return [w for actor, w in workers.items() if actor not in earlier and w["State"] == "ALIVE"]


def _count_parts(out: Path) -> int:
    return len(part_files(pafs.LocalFileSystem(), str(out)))


@pytest.mark.slow
def test_killed_encode_actor_is_restarted_and_no_row_is_lost(
    ray_local,  # noqa: F811
    hostile,
    labels_file,  # noqa: F811
    tmp_path,
):
    videos = {f"v{i:02d}": hostile["yuv444"][0] for i in range(40)}
    manifest = _manifest(tmp_path / "many.parquet", videos)
    out = tmp_path / "tags"
    settings = ["tag.batch_size=1", "tag.rows_per_file=1", "tag.encode_in=actors"]
    one_by_one = Config.from_yaml(TINY_CONFIG, settings)
    killed: dict = {}
    finished = threading.Event()
    earlier = set(_map_workers("VideoTagger"))  # actors of earlier runs in this Ray instance

    def kill_an_encode_actor_mid_run():
        while not finished.is_set():
            alive = _alive(_map_workers("VideoTagger"), earlier)
            # Decoded clips queue up while the model loads; once ALIVE, the actor has tasks in
            # flight at once and gets through the queue in about a second.
            if alive:
                killed.update({"actor": alive[0]["ActorID"], "parts_before": _count_parts(out)})
                os.kill(alive[0]["Pid"], signal.SIGKILL)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_an_encode_actor_mid_run)
    killer.start()
    try:
        summary = run_tagging(one_by_one, manifest, str(out), labels=labels_file)
    finally:
        finished.set()
        killer.join()
    assert killed, "the run ended before an actor could be killed"
    assert killed["parts_before"] < len(videos), "the kill should land mid-run"
    assert _map_workers("VideoTagger")[killed["actor"]]["NumRestarts"] >= 1
    assert (summary.ok, summary.errored) == (len(videos), 0)
    current = read_tags(str(out))
    assert sorted(current["video_id"].to_pylist()) == sorted(videos)
    assert set(current["run_id"].to_pylist()) == {summary.run_id}


@pytest.mark.slow
def test_label_bank_killed_mid_run_keeps_the_old_bank_and_a_rerun_completes(
    ray_local,  # noqa: F811
    tmp_path,
):
    cfg = Config.from_yaml(TINY_CONFIG, ["label_bank.batch_size=2"])
    old_labels = ["dog", "cat", "surfing"]
    new_labels = [f"new label {i}" for i in range(120)]
    vocabulary, bank = tmp_path / "labels.txt", tmp_path / "bank" / "labels.parquet"
    vocabulary.write_text("\n".join(old_labels) + "\n")
    build_label_bank(cfg, str(vocabulary), str(bank))
    old_bytes = bank.read_bytes()

    vocabulary.write_text("\n".join(old_labels + new_labels) + "\n")
    command = [
        sys.executable,
        str(REPO / "jobs" / "build_label_bank.py"),
        *("--config", str(TINY_CONFIG), "--labels", str(vocabulary), "--out", str(bank)),
        *("--set", "label_bank.batch_size=2"),
    ]
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    earlier = set(_map_workers("LabelBankActor"))
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not _alive(_map_workers("LabelBankActor"), earlier):  # then it is computing
        assert job.poll() is None, job.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the label bank job never started its actors"
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL
    assert bank.read_bytes() == old_bytes  # the old bank, whole, is all a reader can see

    rerun = build_label_bank(cfg, str(vocabulary), str(bank))
    assert (rerun.reused, rerun.computed) == (len(old_labels), len(new_labels))
    labels = pq.read_table(bank)["label"].to_pylist()
    assert labels == old_labels + new_labels  # exactly one row per label
    assert [p.name for p in bank.parent.iterdir()] == [bank.name]


def test_atomic_output_leaves_the_old_file_when_a_write_fails(tmp_path):
    fs, path = pafs.LocalFileSystem(), f"{tmp_path}/metrics.json"
    with atomic_output(fs, path) as out:
        out.write(b'{"step": 1}')
    with pytest.raises(RuntimeError), atomic_output(fs, path) as out:
        out.write(b'{"step": 2, "tr')
        raise RuntimeError("killed mid-write")
    assert json.loads(Path(path).read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# ---------------------------------------------------------------- security

PRODUCT_CODE = [REPO / "ovml_core", REPO / "pipeline", REPO / "jobs"]
# Dynamic imports that exist, each from a fixed list in code, never from a config value.
ALLOWED_DYNAMIC_IMPORTS = {
    "pipeline/cli.py",  # COMMANDS[argparse choice]
    "ovml_core/llm_vllm.py",  # the constant "vllm", imported lazily
    "ovml_core/__init__.py",  # public names -> their modules, a literal table (PEP 562)
}


CODE_FROM_TEXT = {
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
    "yaml.load_all",
    "eval",
    "exec",
}


def _calls(tree: ast.AST):
    """(called name as written, {keyword: value node}) for every call."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), {k.arg: k.value for k in node.keywords}


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str) -> list[str]:
    """Calls that can run code from data: unpickling, unsafe YAML, eval, remote code, and
    dynamic imports (reported as `import:` for the caller to check against an allow-list)."""
    found = []
    for name, keywords in _calls(ast.parse(source)):
        last = name.rsplit(".", 1)[-1]
        if name.split(".")[0] in {"pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}:
            if last in {"load", "loads", "Unpickler", "open"}:
                found.append(name)
        elif name == "torch.load" and not _is_true(keywords.get("weights_only")):
            found.append("torch.load without weights_only=True")
        elif name in CODE_FROM_TEXT:
            found.append(name)
        elif _is_true(keywords.get("trust_remote_code")):
            found.append(f"{name}(trust_remote_code=True)")
        elif last == "from_pretrained" and "Model" in name:
            if not (_is_true(keywords.get("use_safetensors")) or "gguf_file" in keywords):
                found.append(f"{name} without use_safetensors=True")
        elif name in {"importlib.import_module", "__import__"}:
            found.append("import:")
    return found


def test_unsafe_call_detector_finds_what_it_looks_for():
    bad = (
        "pickle.loads(b)\ntorch.load(p)\ntorch.load(p, weights_only=False)\nyaml.load(t)\n"
        "eval(s)\nAutoModel.from_pretrained(d)\nAutoTokenizer.from_pretrained(d, "
        "trust_remote_code=True)\nimportlib.import_module(name)\n"
    )
    assert len(unsafe_calls(bad)) == 8
    good = (
        "torch.load(p, weights_only=True)\nyaml.safe_load(t)\nsafetensors.torch.load_file(p)\n"
        "AutoModel.from_pretrained(d, use_safetensors=True)\nAutoTokenizer.from_pretrained(d)\n"
    )
    assert unsafe_calls(good) == []


def test_product_code_loads_no_pickles_and_imports_nothing_a_config_names():
    problems, dynamic = [], set()
    for folder in PRODUCT_CODE:
        for path in folder.rglob("*.py"):
            relative = path.relative_to(REPO).as_posix()
            for call in unsafe_calls(path.read_text()):
                if call == "import:":
                    dynamic.add(relative)
                else:
                    problems.append(f"{relative}: {call}")
    assert problems == []
    assert dynamic == ALLOWED_DYNAMIC_IMPORTS


def test_yaml_tags_in_a_config_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    payload = f'!!python/object/apply:os.system ["touch {marker}"]'
    config = tmp_path / "evil.yaml"
    config.write_text(f"model:\n  clip_model: {payload}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.from_yaml(config)
    with pytest.raises(ConfigError, match="override"):
        Config.from_yaml(TINY_CONFIG, [f"model.clip_model={payload}"])
    assert not marker.exists()


def test_llm_folder_with_pickle_weights_only_is_refused(tmp_path):
    import torch

    from ovml_core.llm import _tiny_llama, load_llm

    model = _tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle
    with pytest.raises(OSError, match="model.safetensors"):
        load_llm(str(tmp_path))


def test_names_and_labels_cannot_forge_lines_where_they_are_printed():
    import importlib.util

    error = f"VideoDecodeError: /v/{FORGING_NAME}: not a readable video"
    summary = TagSummary("out", "run", "fp", errored=1, errors=[(FORGING_NAME, error)])
    printed = summary.format().splitlines()
    assert not any(line.startswith("ERROR") for line in printed)
    (error_line,) = [line for line in printed if "error:" in line]
    assert "forged\\nERROR injected line \\x1b[31mred.mp4" in error_line

    spec = importlib.util.spec_from_file_location("demo", REPO / "jobs" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    tag = {"label": "dog\nERROR forged", "score": 0.9}
    rows = [
        {"video_id": FORGING_NAME, "top_k": None, "tags": None, "error": error},
        {"video_id": "ok.mp4", "top_k": [tag], "tags": [tag], "error": None},
    ]
    table = demo.tags_table(pa.Table.from_pylist(rows), 0.5).splitlines()
    assert len(table) == 4 and not any(line.startswith("ERROR") for line in table)
    assert "\x1b" not in "".join(table)
