"""Video encoder throughput on CPU: clips/s with temporal none | divided | neighbor.

    .venv/bin/python bench/bench_encoder.py
    .venv/bin/python bench/bench_encoder.py --models ovml-tiny --passes infer train --iters 20

Random-init CLIP towers at their native input size, T frames per clip, every block with the
branch. `infer` is a forward pass under inference_mode (tagging); `train` is forward+backward
through CLIP and the branch (fine-tuning). Each row is the median over timed calls after one
warm-up call, and its ratio to `none`, the frame-mean baseline of the same model and pass.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from ovml_core.clip import clip_image_params, create_clip
from ovml_core.vision import TEMPORAL_MODES, VideoEncoder


def median_seconds(step: Callable[[], None], iters: int) -> float:
    step()  # warm-up: allocator, kernel selection
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def encoder_step(encoder: VideoEncoder, frames: torch.Tensor, mode: str) -> Callable[[], None]:
    def infer() -> None:
        with torch.inference_mode():
            encoder(frames)

    def train() -> None:
        encoder.zero_grad(set_to_none=True)
        encoder(frames).sum().backward()

    return {"infer": infer, "train": train}[mode]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["ovml-tiny", "ViT-B-16"])
    parser.add_argument(
        "--passes", nargs="+", default=["infer", "train"], choices=["infer", "train"]
    )
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument(
        "--batch", type=int, default=None, help="clips per call (default: per model)"
    )
    parser.add_argument("--iters", type=int, default=None, help="timed calls (default: per model)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--large-train", action="store_true", help="also time train for ViT-B-16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, T={args.frames}, CPU")
    print(
        f"{'model':<10} {'size':>4} {'batch':>5} {'pass':<5} {'temporal':<9} "
        f"{'clips/s':>8} {'vs none':>8}"
    )
    for model_name in args.models:
        tiny = model_name.startswith("ovml-")
        batch = args.batch or (16 if tiny else 1)
        iters = args.iters or (20 if tiny else 3)
        torch.manual_seed(0)
        clip = create_clip(model_name)
        size = clip_image_params(clip)[0]
        frames = torch.randn(batch, args.frames, 3, size, size)
        for pass_name in args.passes:
            if pass_name == "train" and not tiny and not args.large_train:
                continue
            baseline = None
            for temporal in TEMPORAL_MODES:
                encoder = VideoEncoder(clip.visual, temporal, num_frames=args.frames)
                encoder.train(pass_name == "train")
                seconds = median_seconds(encoder_step(encoder, frames, pass_name), iters)
                clips_per_s = batch / seconds
                if temporal == "none":
                    baseline = clips_per_s
                print(
                    f"{model_name:<10} {size:>4} {batch:>5} {pass_name:<5} {temporal:<9} "
                    f"{clips_per_s:>8.2f} {clips_per_s / baseline:>7.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
