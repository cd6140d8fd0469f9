"""Video encoder throughput on CPU: clips/s with temporal none | divided | neighbor.

    .venv/bin/python bench/bench_encoder.py
    .venv/bin/python bench/bench_encoder.py --models ovml-tiny --passes infer train --iters 20

Random-init CLIP towers at their native input size, T frames per clip, every block with the
branch. `infer` is a forward pass under inference_mode (tagging); `train` is forward+backward
through CLIP and the branch (fine-tuning). Each row is the median over timed calls (variants
interleaved) after one warm-up call, and its ratio to `none`, the frame-mean baseline of the
same model and pass.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from ovml_core.clip import clip_image_params, create_clip
from ovml_core.vision import TEMPORAL_MODES, VideoEncoder


def median_seconds(steps: dict[str, Callable[[], None]], iters: int) -> dict[str, float]:
    """Median wall time per call of each step, calls interleaved round-robin so that a busy
    spell on a shared machine slows every variant alike rather than one of them."""
    for step in steps.values():
        step()  # warm-up: allocator, kernel selection
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


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
            steps = {}
            for temporal in TEMPORAL_MODES:
                encoder = VideoEncoder(clip.visual, temporal, num_frames=args.frames)
                encoder.train(pass_name == "train")
                steps[temporal] = encoder_step(encoder, frames, pass_name)
            seconds = median_seconds(steps, iters)
            for temporal in TEMPORAL_MODES:
                ratio = seconds["none"] / seconds[temporal]
                print(
                    f"{model_name:<10} {size:>4} {batch:>5} {pass_name:<5} {temporal:<9} "
                    f"{batch / seconds[temporal]:>8.3g} {ratio:>7.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
