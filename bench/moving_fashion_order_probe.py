"""Does the temporal branch learn frame order? A plain PyTorch loop, no Ray, for choosing the
stage-1 learning rate fast: train on rendered Moving Fashion clips (base labels, the
production `Objective`), and every --every steps print clips/s, base/novel mAP and, per twin
pair, how often the true motion outscores its time reversal on 300 val clips.

    python bench/moving_fashion_order_probe.py --lr 3e-3 --steps 900 --every 150

Clips are rendered in memory from the Fashion-MNIST files (no video encoding, no decoding).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ovml_core import moving_fashion as mf
from ovml_core.config import Config
from ovml_core.finetune import Objective, StudentForward, build_optimizer, set_trainable
from ovml_core.metrics import mean_average_precision, twin_hits
from ovml_core.model import create_model

CONFIG = "configs/moving_fashion/temporal_divided.yaml"
LABELS = list(mf.GARMENTS + mf.MOTIONS)


def rendered(pool: mf.ImagePool, split: str, start: int, count: int):
    specs = [mf.sample_clip(0, split, i, pool) for i in range(start, start + count)]
    frames = np.stack([mf.render(spec, pool.images) for spec in specs])
    return specs, torch.from_numpy(frames)


def targets(specs: list[mf.ClipSpec], labels: list[str]) -> torch.Tensor:
    return torch.tensor([[label in s.labels for label in labels] for s in specs]).float()


@torch.no_grad()
def probe(model, frames: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    model.eval()
    video = torch.cat([model.encode_video(chunk) for chunk in frames.split(50)])
    scores = model.score(video, model.encode_labels(LABELS)).numpy()
    model.train()
    split = {
        "base": [LABELS.index(label) for label in mf.base_labels()],
        "novel": [LABELS.index(label) for label in mf.novel_labels()],
    }
    result = {
        name: mean_average_precision(scores[:, cols], truth[:, cols].numpy()).value
        for name, cols in split.items()
    }
    for first, second in mf.ORDER_ONLY_PAIRS:
        hits = twin_hits(scores, truth.numpy(), LABELS.index(first), LABELS.index(second))
        result[f"{first.split()[-1]}/{second.split()[-1]}"] = float(hits.mean())
    return {k: round(v, 3) for k, v in result.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--lr", type=float, default=3e-3, help="temporal branch, scale, bias")
    parser.add_argument("--lr-clip", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--every", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = [f"train.lr={args.lr}", f"train.lr_clip={args.lr_clip}", "train.warmup_steps=10"]
    cfg = Config.from_yaml(args.config, settings)
    model = create_model(cfg.model)
    set_trainable(model, cfg.train)
    base = mf.base_labels()
    objective = Objective(model, cfg.train, base)
    optimizer, scheduler = build_optimizer(model, cfg.train, args.steps)
    pools = mf.split_pools(mf.DEFAULT_SOURCE)
    val_specs, val_frames = rendered(pools["val"], "val", 0, 300)
    val_truth = targets(val_specs, LABELS)
    print(json.dumps({"step": 0, **probe(model, val_frames, val_truth)}), flush=True)
    student, started = StudentForward(model), time.perf_counter()
    for step in range(args.steps):
        specs, frames = rendered(pools["train"], "train", step * args.batch_size, args.batch_size)
        generator = torch.Generator().manual_seed(step)
        loss = objective(student, model, frames, targets(specs, base), generator)["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % args.every == 0:
            rate = args.every * args.batch_size / (time.perf_counter() - started)
            metrics = probe(model, val_frames, val_truth)
            print(json.dumps({"step": step + 1, "clips/s": round(rate), **metrics}), flush=True)
            started = time.perf_counter()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
